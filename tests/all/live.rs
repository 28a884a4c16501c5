//! Live policy operations on a real node over real QUIC: hot-swaps under
//! load, the admin token, hostile modules on live shards, automatic
//! rollback, the metrics endpoint and shadow evaluation.

use bytes::Bytes;
use cachet::core::FaultKind;
use cachet::node::{Node, NodeConfig, NodeOptions, Running};
use cachet::policies::{self, PolicySpec};
use cachet::registry::Registry;
use cachet::server::{ServeOptions, tls::TlsSource};
use cachet::wasm::PolicyEngine;
use cachet_client::{AdminCommand, Client, ClientConfig, ClientError, ErrorCode, PolicyListing};
use cachet_proto::{Request, Response};
use cachet_tests::{TempDir, hostile_component};
use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

const TOKEN: &str = "let-me-in";
const VERSION: &str = env!("CARGO_PKG_VERSION");

struct LiveNode {
    running: Option<Running>,
    node: Arc<Node>,
    dir: TempDir,
}

impl LiveNode {
    fn start(config: NodeConfig, token: Option<&str>) -> Self {
        let dir = TempDir::new("live");
        let mut options = options_in(&dir, config, token);
        options.quic = Some(ServeOptions {
            listen: "127.0.0.1:0".parse().expect("addr"),
            threads: 2,
            tls: TlsSource::DevCa { data_dir: dir.0.clone() },
            max_connections: 100,
            max_streams: 64,
            max_frame: 2 << 20,
            idle_timeout: Duration::from_secs(60),
            clients: Default::default(),
        });
        let running = Node::start(options).expect("node starts");
        Self { node: running.node().clone(), running: Some(running), dir }
    }

    async fn client(&self) -> Client {
        let addr = self.running.as_ref().and_then(Running::quic_addr).expect("running");
        let mut config = ClientConfig::new(addr).with_data_dir(&self.dir.0).expect("ca");
        config.timeout = Duration::from_secs(60);
        Client::connect(config).await.expect("connects")
    }
}

impl Drop for LiveNode {
    fn drop(&mut self) {
        if let Some(running) = self.running.take() {
            running.shutdown();
        }
    }
}

/// A node on LRU with a registry in `dir`.
fn options_in(dir: &TempDir, config: NodeConfig, token: Option<&str>) -> NodeOptions {
    let engine = PolicyEngine::new().expect("engine");
    let spec = PolicySpec { name_or_path: "lru".into(), ..PolicySpec::default() };
    let policy = policies::resolve(&engine, &spec).expect("lru");
    let registry = Registry::open(Some(&dir.0.join("modules")), engine).expect("registry");
    NodeOptions { registry: Some((registry, token.map(str::to_string))), ..NodeOptions::new(config, policy) }
}

/// [`options_in`], started with no ports.
fn node_in(dir: &TempDir, config: NodeConfig, token: Option<&str>) -> Running {
    Node::start(options_in(dir, config, token)).expect("node starts")
}

fn load(name: &str, version: &str, module: &[u8], config: &[(&str, &str)]) -> AdminCommand {
    AdminCommand::Load {
        name: name.into(),
        version: version.into(),
        config: config.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
        module: Bytes::copy_from_slice(module),
        fuel_per_call: None,
        max_memory_bytes: None,
        upload: None,
    }
}

fn activate(name: &str, version: &str) -> AdminCommand {
    AdminCommand::Activate { name: name.into(), version: version.into(), config: None }
}

fn bundled(name: &str) -> &'static [u8] {
    policies::bundled_component(name).expect("bundled")
}

fn server_error(result: Result<PolicyListing, ClientError>) -> (ErrorCode, String) {
    match result {
        Err(ClientError::Server(err)) => (err.code, err.message),
        other => panic!("expected an error reply, got {other:?}"),
    }
}

fn config(max_entries: u64) -> NodeConfig {
    NodeConfig { shards: 2, max_entries, max_value_size: 64 << 10, ..NodeConfig::default() }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_swaps_under_load_fail_no_request_and_lose_no_entry() {
    let live = LiveNode::start(config(200_000), Some(TOKEN));
    let admin = live.client().await;
    for name in ["lru", "s3fifo", "sieve"] {
        admin.admin(TOKEN, load(name, "2", bundled(name), &[])).await.expect("load");
    }
    // Writers add keys and read back ones they wrote; the cache never fills,
    // so every read of a written key must hit, whatever policy is active.
    let stop = Arc::new(AtomicBool::new(false));
    let (ops, failures) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let mut writers = Vec::new();
    for task in 0..4u64 {
        let client = live.client().await;
        let (stop, ops, failures) = (stop.clone(), ops.clone(), failures.clone());
        writers.push(tokio::spawn(async move {
            let mut written = 0u64;
            let mut state = task + 1;
            // Bounded in count as well as by the stop flag.
            while !stop.load(Ordering::Relaxed) && written < 20_000 {
                let key = format!("w{task}:{written}");
                match client.set(&key, key.clone()).await {
                    Ok(()) => written += 1,
                    Err(err) => {
                        eprintln!("set {key}: {err}");
                        failures.fetch_add(1, Ordering::Relaxed);
                    }
                }
                state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                let old = format!("w{task}:{}", (state >> 33) % written.max(1));
                match client.get(&old).await {
                    Ok(Some(value)) if value == old.as_bytes() => {}
                    other => {
                        eprintln!("get {old}: {other:?}");
                        failures.fetch_add(1, Ordering::Relaxed);
                    }
                }
                ops.fetch_add(2, Ordering::Relaxed);
            }
            client.close().await;
            written
        }));
    }
    let cycle = ["lru", "s3fifo", "sieve"];
    let mut entries = 0u64;
    for i in 0..50 {
        let name = cycle[i % cycle.len()];
        let listing = admin.admin(TOKEN, activate(name, "2")).await.expect("activate");
        let label = format!("{name}@2");
        assert_eq!(listing.active, label, "swap {i}");
        assert!(listing.shards.iter().all(|s| s.module == label && !s.on_fallback), "swap {i}: {:?}", listing.shards);
        let listed = admin.admin(TOKEN, AdminCommand::List).await.expect("list");
        assert_eq!(listed.active, label);
        assert!(listed.modules.iter().any(|m| m.name == name && m.version == "2" && m.active));
        let now: u64 = listed.shards.iter().map(|s| s.entries).sum();
        assert!(now >= entries, "swap {i}: entries went from {entries} to {now}");
        entries = now;
        assert_policy_sees_exactly_the_residents(&live.node, i);
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    stop.store(true, Ordering::Relaxed);
    let mut written = 0;
    for writer in writers {
        written += writer.await.expect("writer");
    }
    assert_eq!(failures.load(Ordering::Relaxed), 0, "failed or missing requests during 50 swaps");
    assert!(ops.load(Ordering::Relaxed) > 1_000, "the load ran during the swaps");
    let listing = admin.admin(TOKEN, AdminCommand::List).await.expect("list");
    assert_eq!(listing.swaps, 50);
    assert_eq!(listing.shards.iter().map(|s| s.entries).sum::<u64>(), written, "every written key is resident");
    admin.close().await;
}

/// Each shard's policy exports every resident entry exactly once: what a
/// swap handed over (snapshot plus journal) matches the shard.
fn assert_policy_sees_exactly_the_residents(node: &Node, swap: usize) {
    for i in 0..node.shard_count() {
        let mut shard = node.lock_shard(i);
        let order = shard.export_order(node.now_ms());
        let unique: std::collections::HashSet<_> = order.iter().copied().collect();
        assert_eq!(order.len(), shard.len(), "swap {swap}, shard {i}: exported {} of {}", order.len(), shard.len());
        assert_eq!(unique.len(), order.len(), "swap {swap}, shard {i}: repeated ids");
        assert!(order.iter().all(|&id| shard.key_of(id).is_some()), "swap {swap}, shard {i}: unknown ids");
        assert_eq!(shard.stats().policy_faults(), 0, "swap {swap}, shard {i}: faults");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn swaps_while_every_write_evicts_keep_each_policy_exact() {
    // 2,000 slots, writers cycling through 30,000 keys: the journal of each
    // swap is full of evictions, which the new policy must not miss.
    let live = LiveNode::start(config(2_000), Some(TOKEN));
    let admin = live.client().await;
    for i in 0..2_500 {
        admin.set(format!("fill{i}"), "v").await.expect("fill");
    }
    let evictions_before = live.node.stats().evictions;
    let stop = Arc::new(AtomicBool::new(false));
    let failures = Arc::new(AtomicU64::new(0));
    let mut writers = Vec::new();
    for task in 0..3u64 {
        let client = live.client().await;
        let (stop, failures) = (stop.clone(), failures.clone());
        writers.push(tokio::spawn(async move {
            let mut i = task;
            while !stop.load(Ordering::Relaxed) && i < 3_000_000 {
                let key = format!("e{}", i % 30_000);
                if client.set(&key, "v").await.is_err() {
                    failures.fetch_add(1, Ordering::Relaxed);
                }
                if client.get(format!("e{}", (i * 7) % 30_000)).await.is_err() {
                    failures.fetch_add(1, Ordering::Relaxed);
                }
                i += 3;
            }
            client.close().await;
        }));
    }
    let cycle = ["lru", "s3fifo", "sieve", "fifo", "clock", "twoq"];
    for i in 0..24 {
        tokio::time::sleep(Duration::from_millis(40)).await;
        admin.admin(TOKEN, activate(cycle[i % cycle.len()], VERSION)).await.expect("activate");
        assert_policy_sees_exactly_the_residents(&live.node, i);
    }
    stop.store(true, Ordering::Relaxed);
    for writer in writers {
        writer.await.expect("writer");
    }
    assert_eq!(failures.load(Ordering::Relaxed), 0);
    let stats = live.node.stats();
    let during = stats.evictions - evictions_before;
    assert!(during >= 100, "evictions happened during the swaps: {during}");
    assert!(stats.entries <= 2_000);
    admin.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_commands_need_the_token_and_bad_requests_change_nothing() {
    let closed = LiveNode::start(config(10_000), None);
    let client = closed.client().await;
    let (code, message) = server_error(client.admin(TOKEN, AdminCommand::List).await);
    assert_eq!(code, ErrorCode::Unauthorized);
    assert!(message.contains("--admin-token-file"), "{message}");
    client.close().await;

    let live = LiveNode::start(config(50_000), Some(TOKEN));
    let client = live.client().await;
    client.set("keep", "me").await.expect("set");
    assert_eq!(server_error(client.admin("guess", AdminCommand::List).await).0, ErrorCode::Unauthorized);
    let (code, message) = server_error(client.admin(TOKEN, activate("nope", "1")).await);
    assert_eq!(code, ErrorCode::NotFound);
    assert!(message.contains("nope@1"), "{message}");
    assert_eq!(server_error(client.admin(TOKEN, AdminCommand::Rollback).await).0, ErrorCode::NotFound);
    let (code, message) = server_error(client.admin(TOKEN, load("junk", "1", b"\0asm garbage", &[])).await);
    assert_eq!(code, ErrorCode::InvalidModule);
    assert!(message.contains("component") || message.contains("WebAssembly"), "{message}");
    // Traps on its first calls, or spins in pick-victims: caught by the
    // conformance check at load, never installed.
    for mode in ["panic", "loop", "grow", "bogus-ids"] {
        let (code, message) =
            server_error(client.admin(TOKEN, load("hostile", mode, hostile_component(), &[("mode", mode)])).await);
        assert_eq!(code, ErrorCode::InvalidModule, "{mode}");
        assert!(message.contains("conformance"), "{mode}: {message}");
    }
    // Another interface version, and a forbidden import: refused, named.
    let v2 = crate::sandbox::POLICY_WIT.replace("cachet:policy@0.1.0", "cachet:policy@0.2.0");
    let other =
        crate::sandbox::dummy_component(&v2, "package test:v2; world w { export cachet:policy/policy@0.2.0; }", "w");
    let (code, message) = server_error(client.admin(TOKEN, load("v2", "1", &other, &[])).await);
    assert_eq!(code, ErrorCode::InvalidModule);
    assert!(message.contains("@0.2.0"), "{message}");
    let evil = crate::sandbox::dummy_component(
        crate::sandbox::POLICY_WIT,
        "package test:evil; interface fs { read: func() -> u32; } world e { import fs; export cachet:policy/policy@0.1.0; }",
        "e",
    );
    let (code, message) = server_error(client.admin(TOKEN, load("evil", "1", &evil, &[])).await);
    assert_eq!(code, ErrorCode::InvalidModule);
    assert!(message.contains("forbidden import"), "{message}");
    let (code, message) =
        server_error(client.admin(TOKEN, load("hostile", "x", hostile_component(), &[("colour", "blue")])).await);
    assert_eq!(code, ErrorCode::InvalidModule);
    assert!(message.contains("colour"), "{message}");
    assert_eq!(
        server_error(client.admin(TOKEN, load("bad@name", "1", bundled("lru"), &[])).await).0,
        ErrorCode::InvalidArgument
    );
    client.admin(TOKEN, load("fifo", "7", bundled("fifo"), &[])).await.expect("load");
    let (code, _) = server_error(client.admin(TOKEN, load("fifo", "7", bundled("lru"), &[])).await);
    assert_eq!(code, ErrorCode::InvalidArgument, "versions are immutable");
    let listing = client.admin(TOKEN, AdminCommand::List).await.expect("list");
    assert_eq!(listing.active, format!("lru@{VERSION}"));
    assert!(!listing.modules.iter().any(|m| m.name == "hostile" || m.name == "junk"), "refused modules are not stored");
    assert_eq!(client.get("keep").await.expect("get"), Some(Bytes::from_static(b"me")), "refusals changed nothing");

    // Two activations at once: each succeeds or is told the other is busy,
    // and the node ends on one of them.
    for i in 0..20_000 {
        client.set(format!("fill:{i}"), "x").await.expect("fill");
    }
    let other = live.client().await;
    let (a, b) =
        tokio::join!(client.admin(TOKEN, activate("fifo", "7")), other.admin(TOKEN, activate("sieve", VERSION)));
    for result in [&a, &b] {
        if let Err(err) = result {
            assert!(matches!(err, ClientError::Server(e) if e.code == ErrorCode::Busy), "{err}");
        }
    }
    assert!(a.is_ok() || b.is_ok());
    let listing = client.admin(TOKEN, AdminCommand::List).await.expect("list");
    assert!(listing.active == "fifo@7" || listing.active == format!("sieve@{VERSION}"), "{}", listing.active);
    let rolled = client.admin(TOKEN, AdminCommand::Rollback).await.expect("rollback");
    assert_ne!(rolled.active, listing.active);
    assert_eq!(client.get("keep").await.expect("get"), Some(Bytes::from_static(b"me")));
    assert_eq!(client.stats().await.expect("stats").entries, 20_001);
    client.close().await;
    other.close().await;
}

/// A client guessing the admin token from one address is throttled there,
/// over real QUIC, while the operator on another loopback address gets in.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_guessing_is_throttled_per_source_address() {
    let live = LiveNode::start(config(1_000), Some(TOKEN));
    let addr = live.running.as_ref().and_then(Running::quic_addr).expect("running");
    let from = |ip: &str| {
        let endpoint = quinn::Endpoint::client(format!("{ip}:0").parse().expect("addr")).expect("endpoint");
        let mut config = ClientConfig::new(addr).with_data_dir(&live.dir.0).expect("ca");
        config.timeout = Duration::from_secs(20);
        async move { Client::connect_on(&endpoint, config).await.expect("connects") }
    };
    let guesser = from("127.0.0.2").await;
    let operator = from("127.0.0.1").await;
    for i in 0..10 {
        let (code, message) = server_error(guesser.admin(&format!("guess{i}"), AdminCommand::List).await);
        assert_eq!(code, ErrorCode::Unauthorized);
        assert!(message.contains("wrong admin token"), "{message}");
    }
    let (code, message) = server_error(guesser.admin(TOKEN, AdminCommand::List).await);
    assert_eq!(code, ErrorCode::Unauthorized);
    assert!(message.contains("too many failed admin attempts"), "the right token waits out the back-off: {message}");
    operator.admin(TOKEN, AdminCommand::List).await.expect("the operator's address is not throttled");
    guesser.close().await;
    operator.close().await;
}

/// `module` with a custom section appended, `pad` bytes of payload: the
/// same component, just larger.
fn padded(module: &[u8], pad: usize) -> Vec<u8> {
    fn leb(mut n: usize, out: &mut Vec<u8>) {
        loop {
            let byte = (n & 0x7f) as u8;
            n >>= 7;
            out.push(if n == 0 { byte } else { byte | 0x80 });
            if n == 0 {
                break;
            }
        }
    }
    let name = b"padding";
    let mut body = Vec::new();
    leb(name.len(), &mut body);
    body.extend_from_slice(name);
    body.resize(body.len() + pad, 0);
    let mut out = module.to_vec();
    out.push(0);
    leb(body.len(), &mut out);
    out.extend_from_slice(&body);
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_module_larger_than_a_frame_arrives_in_chunks() {
    let live = LiveNode::start(config(10_000), Some(TOKEN));
    let client = live.client().await;
    // 5 MiB against the node's 2 MiB frame limit.
    let big = padded(bundled("sieve"), 5 << 20);
    let direct = client.admin(TOKEN, load("big", "1", &big, &[])).await;
    assert!(direct.is_err(), "one frame is too small for it");
    let listing = client
        .load_module(TOKEN, "big", "1", Vec::new(), Bytes::from(big.clone()), None, None)
        .await
        .expect("chunked load");
    let module = listing.modules.iter().find(|m| m.name == "big").expect("listed");
    assert_eq!(module.sha256, cachet::registry::sha256_hex(&big));
    let listing = client.admin(TOKEN, activate("big", "1")).await.expect("activate");
    assert_eq!(listing.active, "big@1");
    // Out-of-order chunks and unfinished uploads are refused by name.
    let chunk =
        |offset: u64| AdminCommand::UploadChunk { upload: 7, offset, total: 10, chunk: Bytes::from_static(b"abcde") };
    client.admin(TOKEN, chunk(0)).await.expect("first chunk");
    let (code, message) = server_error(client.admin(TOKEN, chunk(7)).await);
    assert_eq!(code, ErrorCode::InvalidArgument);
    assert!(message.contains("does not follow"), "{message}");
    let mut unfinished = load("half", "1", b"", &[]);
    client.admin(TOKEN, chunk(0)).await.expect("restart");
    if let AdminCommand::Load { upload, .. } = &mut unfinished {
        *upload = Some(7);
    }
    let (_, message) = server_error(client.admin(TOKEN, unfinished).await);
    assert!(message.contains("5 of 10 bytes"), "{message}");
    client.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_module_that_keeps_trapping_is_quarantined_and_the_previous_version_restored() {
    let live = LiveNode::start(config(100_000), Some(TOKEN));
    let client = live.client().await;
    client.admin(TOKEN, load("lru", "2", bundled("lru"), &[])).await.expect("load");
    client.admin(TOKEN, activate("lru", "2")).await.expect("activate");
    // Passes the load-time check, then panics once it has seen 5000 events
    // (and again on every rebuild, which replays more than that).
    let config = [("mode", "panic"), ("after", "5000")];
    client.admin(TOKEN, load("hostile", "1", hostile_component(), &config)).await.expect("load");
    let listing = client.admin(TOKEN, activate("hostile", "1")).await.expect("activate");
    assert_eq!(listing.active, "hostile@1");
    for i in 0..14_000 {
        client.set(format!("k{i}"), "v").await.expect("every write succeeds");
    }
    // The supervisor rolls back after three faults in a row per shard (one
    // immediate, retries after 1 s and 2 s). Bounded wait.
    let deadline = Instant::now() + Duration::from_secs(30);
    let listing = loop {
        let listing = client.admin(TOKEN, AdminCommand::List).await.expect("list");
        if listing.active == "lru@2" || Instant::now() > deadline {
            break listing;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(listing.active, "lru@2", "automatic rollback: {listing:?}");
    assert_eq!(listing.quarantines, 1);
    let hostile = listing.modules.iter().find(|m| m.name == "hostile").expect("listed");
    assert!(hostile.state.starts_with("quarantined"), "{}", hostile.state);
    assert!(hostile.faults >= 3, "faults counted against the module: {}", hostile.faults);
    assert!(listing.shards.iter().all(|s| s.module == "lru@2" && !s.on_fallback));
    let (code, _) = server_error(client.admin(TOKEN, activate("hostile", "1")).await);
    assert_eq!(code, ErrorCode::InvalidModule, "a quarantined module is not activated again");
    for i in (0..14_000).step_by(97) {
        assert!(client.get(format!("k{i}")).await.expect("get").is_some(), "k{i} survived the faults");
    }
    client.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_looping_or_bloating_module_is_cut_off_on_live_shards_and_serving_goes_on() {
    for (mode, kind) in [("loop", FaultKind::Budget), ("grow", FaultKind::Memory)] {
        let live = LiveNode::start(config(4_000), Some(TOKEN));
        let client = live.client().await;
        let mut command = load("hostile", mode, hostile_component(), &[("mode", mode), ("after", "5000")]);
        if let AdminCommand::Load { max_memory_bytes, .. } = &mut command {
            *max_memory_bytes = Some(4 << 20);
        }
        client.admin(TOKEN, command).await.expect("load");
        client.admin(TOKEN, activate("hostile", mode)).await.expect("activate");
        // Twenty thousand keys through 4000 slots: evictions all the way.
        for i in 0..20_000 {
            client.set(format!("k{i}"), "value").await.expect("every write succeeds");
        }
        let faults: u64 =
            (0..live.node.shard_count()).map(|i| live.node.lock_shard(i).stats().faults[kind.index()]).sum();
        assert!(faults >= 1, "{mode}: expected a {} fault", kind.name());
        let stats = client.stats().await.expect("stats");
        assert!(stats.entries <= 4_000 && stats.entries > 3_000, "{mode}: bounds kept: {}", stats.entries);
        assert_eq!(client.get("k19999").await.expect("get"), Some(Bytes::from_static(b"value")), "{mode}");
        client.close().await;
    }
}

/// Parses the Prometheus text format strictly enough to catch a malformed
/// exposition: every sample belongs to a declared family, values are
/// numbers, histogram buckets are cumulative and end in `+Inf` = count.
fn parse_prometheus(text: &str) -> HashMap<String, f64> {
    let mut types: HashMap<String, String> = HashMap::new();
    let mut samples = HashMap::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').expect("TYPE name kind");
            assert!(["counter", "gauge", "histogram"].contains(&kind), "{line}");
            assert!(types.insert(name.to_string(), kind.to_string()).is_none(), "TYPE declared twice: {line}");
            continue;
        }
        if line.starts_with("# HELP ") || line.is_empty() {
            continue;
        }
        let (series, value) = line.rsplit_once(' ').expect("sample value");
        let value: f64 = value.parse().unwrap_or_else(|_| panic!("not a number: {line}"));
        let name = series.split('{').next().expect("name");
        assert!(name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'), "bad name: {line}");
        if let Some(labels) = series.strip_prefix(name) {
            assert!(labels.is_empty() || (labels.starts_with('{') && labels.ends_with('}')), "{line}");
        }
        let family = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|s| name.strip_suffix(s).filter(|f| types.get(*f).is_some_and(|t| t == "histogram")))
            .unwrap_or(name);
        assert!(types.contains_key(family), "sample without a TYPE: {line}");
        assert!(samples.insert(series.to_string(), value).is_none(), "series repeated: {line}");
    }
    // Every histogram's +Inf bucket equals its count.
    for (series, value) in &samples {
        if let Some((name, labels)) = series.split_once("_bucket{")
            && let Some(rest) = labels.strip_suffix("le=\"+Inf\"}")
        {
            let labels = rest.trim_end_matches(',');
            let count = format!("{name}_count{{{labels}}}");
            assert_eq!(samples.get(&count), Some(value), "{series} vs {count}");
        }
    }
    samples
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_metrics_endpoint_serves_prometheus_text() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let live = LiveNode::start(config(10_000), Some(TOKEN));
    let client = live.client().await;
    for i in 0..200 {
        client.set(format!("k{i}"), "v").await.expect("set");
    }
    for i in 0..300 {
        client.get(format!("k{i}")).await.expect("get");
    }
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let (bound, at) = tokio::sync::oneshot::channel();
    let serving = tokio::spawn(cachet::metrics::endpoint::serve(
        live.node.clone(),
        "127.0.0.1:0".parse().expect("addr"),
        stopped,
        bound,
    ));
    let addr = at.await.expect("bound");
    let mut stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
    stream.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n").await.expect("request");
    let mut reply = String::new();
    stream.read_to_string(&mut reply).await.expect("reply");
    let (head, body) = reply.split_once("\r\n\r\n").expect("http reply");
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(head.contains("text/plain; version=0.0.4"), "{head}");
    let samples = parse_prometheus(body);
    assert_eq!(samples["cachet_hits_total"], 200.0);
    assert_eq!(samples["cachet_misses_total"], 100.0);
    assert_eq!(samples["cachet_entries"], 200.0);
    assert_eq!(samples["cachet_request_duration_seconds_count{command=\"get\"}"], 300.0);
    assert_eq!(samples["cachet_request_duration_seconds_bucket{command=\"get\",le=\"+Inf\"}"], 300.0);
    assert_eq!(samples[&format!("cachet_policy_active{{shard=\"1\",module=\"lru@{VERSION}\"}}")], 1.0);
    assert!(samples.contains_key("cachet_policy_faults_total{kind=\"budget\"}"));
    assert!(samples["cachet_policy_hook_duration_seconds_count{hook=\"on_events\"}"] >= 1.0);
    let mut last = 0.0;
    for line in body.lines().filter(|l| l.starts_with("cachet_request_duration_seconds_bucket{command=\"get\"")) {
        let value: f64 = line.rsplit_once(' ').expect("value").1.parse().expect("number");
        assert!(value >= last, "buckets are cumulative: {line}");
        last = value;
    }
    let mut other = tokio::net::TcpStream::connect(addr).await.expect("connect");
    other.write_all(b"GET /nothing HTTP/1.1\r\n\r\n").await.expect("request");
    let mut reply = String::new();
    other.read_to_string(&mut reply).await.expect("reply");
    assert!(reply.starts_with("HTTP/1.1 404"), "{reply}");
    // Idle connections take every scrape slot; the next one is told to
    // come back instead of queueing (the idle ones time out on their own).
    let mut idle = Vec::new();
    for _ in 0..16 {
        idle.push(tokio::net::TcpStream::connect(addr).await.expect("connect"));
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    // The node answers 503 on accept, before any request is read (a request
    // sent first would be unread at close, which resets the connection).
    let mut late = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let mut reply = String::new();
    late.read_to_string(&mut reply).await.expect("reply");
    assert!(reply.starts_with("HTTP/1.1 503"), "{reply}");
    drop(idle);
    let _ = stop.send(true);
    serving.await.expect("joins").expect("served");
    client.close().await;
}

#[test]
fn shadow_evaluation_predicts_the_active_policy_and_ranks_a_candidate() {
    let dir = TempDir::new("shadow");
    let running = node_in(&dir, NodeConfig { shards: 2, max_entries: 20_000, ..NodeConfig::default() }, Some(TOKEN));
    let node = running.node();
    let admin = |command| match node.execute(Request::Admin { token: TOKEN.into(), command }) {
        Response::Policies(listing) => *listing,
        other => panic!("{other:?}"),
    };
    let listing = admin(AdminCommand::Shadow { name: "s3fifo".into(), version: VERSION.into() });
    let shadow = listing.shadow.expect("shadow running");
    assert!(shadow.sample_rate > 0.3 && shadow.sample_rate < 0.5, "{}", shadow.sample_rate);
    // Zipf(1.0) over 200,000 keys, cache-aside: a miss is followed by a SET.
    let cdf: Vec<f64> = (1..=200_000u64)
        .scan(0.0, |sum, k| {
            *sum += 1.0 / k as f64;
            Some(*sum)
        })
        .collect();
    let total = cdf.last().copied().expect("keys");
    let mut state = 7u64;
    for _ in 0..300_000 {
        state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        let target = ((state >> 11) as f64 / (1u64 << 53) as f64) * total;
        let key = cdf.partition_point(|&c| c < target) + 1;
        let key = Bytes::from(format!("user:{key}"));
        if let Response::Value(None) = node.execute(Request::Get { key: key.clone() }) {
            let set = Request::Set {
                key,
                value: Bytes::from_static(b"profile"),
                ttl_ms: None,
                condition: Default::default(),
                hint: 0,
            };
            node.execute(set);
        }
    }
    let listing = admin(AdminCommand::List);
    let shadow = listing.shadow.expect("shadow running");
    assert!(shadow.sampled_reads > 90_000, "{}", shadow.sampled_reads);
    assert!(
        (shadow.active_hit_ratio - shadow.live_hit_ratio).abs() < 0.02,
        "the active policy's prediction {:.4} tracks its live hit ratio {:.4}",
        shadow.active_hit_ratio,
        shadow.live_hit_ratio
    );
    assert!(
        shadow.candidate_hit_ratio > shadow.active_hit_ratio,
        "S3-FIFO beats LRU on a Zipf workload: {:.4} vs {:.4}",
        shadow.candidate_hit_ratio,
        shadow.active_hit_ratio
    );
    assert_eq!(shadow.candidate_faults, 0);
    let stopped = admin(AdminCommand::Shadow { name: String::new(), version: String::new() });
    assert!(stopped.shadow.is_none());
}
