//! A real node on loopback, over real QUIC: every command through the SDK,
//! and the bad inputs a node must survive. Time-based behaviour uses a
//! manual clock, not sleeps.

use bytes::{BufMut, Bytes, BytesMut};
use cachet::node::{Clock, ManualClock, Node, NodeConfig, NodeOptions, Running};
use cachet::policies::{self, PolicySpec};
use cachet::server::{self, ServeOptions, tls::TlsSource};
use cachet::wasm::PolicyEngine;
use cachet_client::{Client, ClientConfig, ClientError, Condition, ErrorCode, SetOptions, TtlState};
use cachet_proto::{Decoded, Request, Response};
use cachet_tests::{TempDir, raw_endpoint};
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

struct TestNode {
    running: Option<Running>,
    clock: Arc<ManualClock>,
    dir: TempDir,
}

impl TestNode {
    fn start() -> Self {
        Self::start_with(NodeConfig { shards: 2, max_value_size: 4096, ..NodeConfig::default() }, 4)
    }

    fn start_with(config: NodeConfig, max_streams: u32) -> Self {
        let dir = TempDir::new("node");
        let tls = TlsSource::DevCa { data_dir: dir.0.clone() };
        Self::start_at("127.0.0.1:0".parse().expect("addr"), dir, tls, config, max_streams, 100)
    }

    fn start_at(
        listen: std::net::SocketAddr,
        dir: TempDir,
        tls: TlsSource,
        config: NodeConfig,
        max_streams: u32,
        max_connections: u32,
    ) -> Self {
        let engine = PolicyEngine::new().expect("engine");
        let policy = policies::resolve(&engine, &PolicySpec { name_or_path: "lru".into(), ..PolicySpec::default() })
            .expect("policy");
        let clock = Arc::new(ManualClock::default());
        let mut options = NodeOptions::new(config.clone(), policy);
        options.clock = Some(clock.clone() as Arc<dyn Clock>);
        options.quic = Some(ServeOptions {
            listen,
            threads: 2,
            tls,
            max_connections,
            max_streams,
            max_frame: config.max_value_size + 1024,
            idle_timeout: Duration::from_secs(60),
            clients: Default::default(),
        });
        let running = Node::start(options).expect("node starts");
        Self { running: Some(running), clock, dir }
    }

    fn addr(&self) -> std::net::SocketAddr {
        self.running.as_ref().and_then(Running::quic_addr).expect("running")
    }

    fn client_config(&self) -> ClientConfig {
        let mut config = ClientConfig::new(self.addr()).with_data_dir(&self.dir.0).expect("ca");
        config.timeout = Duration::from_secs(10);
        config
    }

    async fn client(&self) -> Client {
        Client::connect(self.client_config()).await.expect("connects")
    }

    fn raw(&self, alpn: &[u8]) -> quinn::Endpoint {
        raw_endpoint(&self.dir.0.join("ca.pem"), alpn)
    }
}

impl Drop for TestNode {
    fn drop(&mut self) {
        if let Some(running) = self.running.take() {
            running.shutdown();
        }
    }
}

#[tokio::test]
async fn every_command_works_through_the_sdk() {
    let node = TestNode::start();
    let client = node.client().await;
    client.ping().await.expect("ping");
    assert_eq!(client.get("missing").await.expect("get"), None);
    client.set("user:1", "Ada").await.expect("set");
    assert_eq!(client.get("user:1").await.expect("get"), Some(Bytes::from_static(b"Ada")));
    let nx = SetOptions { condition: Condition::IfAbsent, ..SetOptions::default() };
    assert!(!client.set_with("user:1", "Bob", nx).await.expect("nx"));
    let xx = SetOptions { condition: Condition::IfPresent, ..SetOptions::default() };
    assert!(!client.set_with("user:2", "Bob", xx).await.expect("xx"));
    assert!(client.set_with("user:1", "Ada L.", xx).await.expect("xx"));
    client
        .mset(vec![
            (Bytes::from_static(b"a"), Bytes::from_static(b"1")),
            (Bytes::from_static(b"b"), Bytes::from_static(b"2")),
        ])
        .await
        .expect("mset");
    assert_eq!(
        client.mget(&["a", "nope", "b"]).await.expect("mget"),
        vec![Some(Bytes::from_static(b"1")), None, Some(Bytes::from_static(b"2"))]
    );
    assert_eq!(client.exists(&["a", "b", "c"]).await.expect("exists"), 2);
    assert_eq!(client.incr("counter", 10).await.expect("incr"), 10);
    assert_eq!(client.incr("counter", -3).await.expect("decr"), 7);
    let err = client.incr("user:1", 1).await.expect_err("not a number");
    assert!(matches!(err, ClientError::Server(ref e) if e.code == ErrorCode::WrongType), "{err}");
    assert_eq!(client.delete(&["a", "zzz"]).await.expect("del"), 1);
    assert_eq!(client.ttl("b").await.expect("ttl"), TtlState::Persistent);
    assert_eq!(client.ttl("a").await.expect("ttl"), TtlState::Missing);
    let stats = client.stats().await.expect("stats");
    assert_eq!(stats.entries, 3, "user:1, b, counter");
    assert!(stats.hits >= 3 && stats.misses >= 2, "{stats:?}");
    assert_eq!(stats.policy, "lru");
    assert!(stats.connections >= 1);
    client.close().await;
}

#[tokio::test]
async fn ttls_expire_on_the_node_clock() {
    let node = TestNode::start();
    let client = node.client().await;
    let ttl = SetOptions { ttl: Some(Duration::from_secs(10)), ..SetOptions::default() };
    client.set_with("session", "s", ttl).await.expect("set");
    client.set("forever", "f").await.expect("set");
    assert!(client.expire("forever", Duration::from_secs(20)).await.expect("expire"));
    assert!(!client.expire("nothing", Duration::from_secs(1)).await.expect("expire"));
    assert_eq!(client.ttl("session").await.expect("ttl"), TtlState::Remaining(10_000));
    node.clock.advance(9_999);
    assert_eq!(client.ttl("session").await.expect("ttl"), TtlState::Remaining(1));
    assert!(client.get("session").await.expect("get").is_some());
    node.clock.advance(1);
    assert_eq!(client.get("session").await.expect("get"), None, "expired at its deadline");
    assert_eq!(client.ttl("forever").await.expect("ttl"), TtlState::Remaining(10_000));
    node.clock.advance(10_000);
    assert_eq!(client.exists(&["forever"]).await.expect("exists"), 0);
    let stats = client.stats().await.expect("stats");
    assert!(stats.expired >= 1, "{stats:?}");
}

#[tokio::test]
async fn many_concurrent_requests_share_one_connection() {
    let node = TestNode::start();
    let client = node.client().await;
    let tasks: Vec<_> = (0..200)
        .map(|i| {
            let client = client.clone();
            tokio::spawn(async move {
                let key = format!("k{i}");
                client.set(&key, format!("v{i}")).await.expect("set");
                client.get(&key).await.expect("get")
            })
        })
        .collect();
    for (i, task) in tasks.into_iter().enumerate() {
        assert_eq!(task.await.expect("task"), Some(Bytes::from(format!("v{i}"))));
    }
    assert_eq!(client.stats().await.expect("stats").connections, 1);
}

#[tokio::test]
async fn get_or_load_runs_one_load_for_many_concurrent_misses() {
    let node = TestNode::start();
    let client = node.client().await;
    let loads = Arc::new(AtomicU32::new(0));
    let tasks: Vec<_> = (0..100)
        .map(|_| {
            let (client, loads) = (client.clone(), loads.clone());
            tokio::spawn(async move {
                client
                    .get_or_load("profile:7", None, || async move {
                        loads.fetch_add(1, Ordering::SeqCst);
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        Ok::<_, std::io::Error>(Bytes::from_static(b"loaded"))
                    })
                    .await
            })
        })
        .collect();
    for task in tasks {
        assert_eq!(task.await.expect("task").expect("load"), Bytes::from_static(b"loaded"));
    }
    assert_eq!(loads.load(Ordering::SeqCst), 1);
    assert_eq!(client.get("profile:7").await.expect("get"), Some(Bytes::from_static(b"loaded")), "stored");
}

#[tokio::test]
async fn values_over_the_limit_are_refused_and_change_nothing() {
    let node = TestNode::start();
    let client = node.client().await;
    client.set("k", "small").await.expect("set");
    let err = client.set("k", vec![7u8; 4097]).await.expect_err("too large");
    assert!(matches!(err, ClientError::Server(ref e) if e.code == ErrorCode::TooLarge), "{err}");
    assert_eq!(client.get("k").await.expect("get"), Some(Bytes::from_static(b"small")));
    // A large value within the limit travels on a stream of its own.
    client.set("big", vec![1u8; 4096]).await.expect("large set");
    assert_eq!(client.get("big").await.expect("get").map(|v| v.len()), Some(4096));
}

/// Opens a stream on a raw `cachet/1` connection and returns its replies
/// to whatever `wire` holds, read until the node closes the stream.
async fn exchange(node: &TestNode, wire: &[u8], finish: bool) -> (Vec<(u64, Response)>, quinn::Connection) {
    let endpoint = node.raw(cachet_proto::ALPN);
    let conn = endpoint.connect(node.addr(), "localhost").expect("connect").await.expect("handshake");
    let (mut send, mut recv) = conn.open_bi().await.expect("stream");
    send.write_all(wire).await.expect("write");
    if finish {
        send.finish().expect("finish");
    }
    let mut buf = BytesMut::new();
    let mut replies = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        let mut chunk = [0u8; 4096];
        let read = tokio::time::timeout_at(deadline, recv.read(&mut chunk)).await;
        match read {
            Ok(Ok(Some(n))) => buf.extend_from_slice(&chunk[..n]),
            _ => break,
        }
        while let Ok(Decoded::Frame(env)) = cachet_proto::decode::<Response>(&mut buf, 1 << 20) {
            replies.push((env.id, env.body));
        }
        if !finish && !replies.is_empty() {
            break;
        }
    }
    (replies, conn)
}

fn code(reply: &Response) -> Option<ErrorCode> {
    match reply {
        Response::Error(e) => Some(e.code),
        _ => None,
    }
}

#[tokio::test]
async fn garbage_and_unknown_commands_get_typed_errors_and_the_stream_goes_on() {
    let node = TestNode::start();
    let mut wire = BytesMut::new();
    wire.put_u32(5);
    wire.put_slice(b"\xc1\xc1\xc1\xc1\xc1");
    #[derive(serde::Serialize)]
    enum Future {
        Teleport { to: u32 },
    }
    cachet_proto::encode(41, &Future::Teleport { to: 3 }, &mut wire).expect("encode");
    cachet_proto::encode(42, &Request::Ping, &mut wire).expect("encode");
    let (replies, _conn) = exchange(&node, &wire, true).await;
    assert_eq!(replies.len(), 3, "{replies:?}");
    assert_eq!(code(&replies[0].1), Some(ErrorCode::BadFrame));
    assert_eq!((replies[1].0, code(&replies[1].1)), (41, Some(ErrorCode::UnknownCommand)));
    assert_eq!(replies[2], (42, Response::Pong));
}

#[tokio::test]
async fn a_huge_declared_length_closes_only_that_stream() {
    let node = TestNode::start();
    let mut wire = BytesMut::new();
    wire.put_u32(u32::MAX);
    wire.put_slice(b"never sent");
    let (replies, conn) = exchange(&node, &wire, false).await;
    assert_eq!(replies.len(), 1);
    assert_eq!(code(&replies[0].1), Some(ErrorCode::TooLarge));
    // The connection and the node carry on.
    let (mut send, mut recv) = conn.open_bi().await.expect("new stream");
    let mut ping = BytesMut::new();
    cachet_proto::encode(1, &Request::Ping, &mut ping).expect("encode");
    send.write_all(&ping).await.expect("write");
    send.finish().expect("finish");
    let reply = recv.read_to_end(1024).await.expect("reply");
    let mut reply = BytesMut::from(&reply[..]);
    assert!(
        matches!(cachet_proto::decode::<Response>(&mut reply, 1024), Ok(Decoded::Frame(e)) if e.body == Response::Pong)
    );
    node.client().await.ping().await.expect("others unaffected");
}

#[tokio::test]
async fn a_truncated_frame_is_dropped_without_harm() {
    let node = TestNode::start();
    let client = node.client().await;
    client.set("k", "v").await.expect("set");
    let mut frame = BytesMut::new();
    cachet_proto::encode(7, &Request::Del { keys: vec![Bytes::from_static(b"k")] }, &mut frame).expect("encode");
    let half = frame.len() / 2;
    let (replies, _conn) = exchange(&node, &frame[..half], true).await;
    assert!(replies.is_empty(), "no reply to half a frame: {replies:?}");
    assert_eq!(client.get("k").await.expect("get"), Some(Bytes::from_static(b"v")), "nothing changed");
}

#[tokio::test]
async fn wrong_alpn_and_untrusted_clients_are_refused() {
    let node = TestNode::start();
    let wrong = node.raw(b"http/1.1");
    let result = wrong.connect(node.addr(), "localhost").expect("connect").await;
    assert!(result.is_err(), "a wrong-ALPN handshake must fail");
    // A client trusting another CA refuses the node's certificate.
    let other = TempDir::new("other-ca");
    server::tls::ensure_dev_ca(&other.0).expect("other ca");
    let config = ClientConfig::new(node.addr()).with_data_dir(&other.0).expect("ca");
    let err = Client::connect(config).await.err().expect("untrusted");
    assert!(matches!(err, ClientError::Connect { .. }), "{err}");
    node.client().await.ping().await.expect("node still serves");
}

#[tokio::test]
async fn a_client_hoarding_streams_and_never_reading_does_not_hurt_others() {
    let node = TestNode::start();
    let endpoint = node.raw(cachet_proto::ALPN);
    let conn = endpoint.connect(node.addr(), "localhost").expect("connect").await.expect("handshake");
    let mut request = BytesMut::new();
    for id in 0..2_000u64 {
        cachet_proto::encode(id, &Request::Get { key: Bytes::from(vec![b'x'; 200]) }, &mut request).expect("encode");
    }
    let mut opened = 0;
    let mut held = Vec::new();
    // The node allows 4 concurrent streams per connection; more must wait.
    for _ in 0..16 {
        match tokio::time::timeout(Duration::from_millis(200), conn.open_bi()).await {
            Ok(Ok((mut send, recv))) => {
                // Writes until flow control stops us; never reads replies.
                let _ = tokio::time::timeout(Duration::from_millis(300), send.write_all(&request)).await;
                held.push((send, recv));
                opened += 1;
            }
            _ => break,
        }
    }
    assert!(opened <= 4, "stream limit not enforced: {opened} open");
    let client = node.client().await;
    for i in 0..50 {
        client.set(format!("k{i}"), "v").await.expect("others are served");
    }
    assert_eq!(client.get("k49").await.expect("get"), Some(Bytes::from_static(b"v")));
}

#[tokio::test]
async fn shutdown_is_graceful() {
    let mut node = TestNode::start();
    let client = node.client().await;
    client.set("k", "v").await.expect("set");
    let server = node.running.take().expect("running");
    tokio::task::spawn_blocking(move || server.shutdown()).await.expect("shutdown returns");
    assert!(client.get("k").await.is_err(), "the node is gone");
}

#[tokio::test]
async fn keys_over_the_limit_are_refused() {
    let node = TestNode::start_with(NodeConfig { max_key_size: 16, ..NodeConfig::default() }, 4);
    let client = node.client().await;
    let err = client.set("k".repeat(17), "v").await.expect_err("key too long");
    assert!(
        matches!(err, ClientError::Server(ref e) if e.code == ErrorCode::TooLarge && e.message.contains("key")),
        "{err}"
    );
    assert_eq!(client.stats().await.expect("stats").entries, 0);
}

#[tokio::test]
async fn the_client_reconnects_after_the_node_restarts() {
    let mut node = TestNode::start();
    let addr = node.addr();
    let client = node.client().await;
    client.set("k", "v").await.expect("set");
    let server = node.running.take().expect("running");
    tokio::task::spawn_blocking(move || server.shutdown()).await.expect("stopped");
    assert!(client.ping().await.is_err(), "no node");
    // Same address and data dir (so the same CA): a fresh, empty node.
    let dir = std::mem::replace(&mut node.dir, TempDir::new("unused"));
    let tls = TlsSource::DevCa { data_dir: dir.0.clone() };
    let restarted = TestNode::start_at(addr, dir, tls, NodeConfig::default(), 4, 100);
    client.ping().await.expect("reconnected");
    assert_eq!(client.get("k").await.expect("get"), None, "the new node starts empty");
    drop(restarted);
}

#[tokio::test]
async fn connections_over_the_cap_are_refused() {
    let dir = TempDir::new("cap");
    let tls = TlsSource::DevCa { data_dir: dir.0.clone() };
    let node = TestNode::start_at("127.0.0.1:0".parse().expect("addr"), dir, tls, NodeConfig::default(), 4, 2);
    let a = node.client().await;
    let b = node.client().await;
    a.ping().await.expect("first");
    b.ping().await.expect("second");
    let mut config = node.client_config();
    config.timeout = Duration::from_secs(2);
    let err = Client::connect(config).await.err().expect("third is refused");
    assert!(matches!(err, ClientError::Connect { .. } | ClientError::Timeout(_)), "{err}");
    a.ping().await.expect("existing connections keep working");
}

#[tokio::test]
async fn production_certificates_from_files_work() {
    // An operator's CA and node certificate, made elsewhere.
    let certs = TempDir::new("prod-certs");
    server::tls::ensure_dev_ca(&certs.0).expect("certs");
    let tls = TlsSource::Files { cert: certs.0.join("node.pem"), key: certs.0.join("node-key.pem"), client_ca: None };
    let dir = TempDir::new("prod");
    let node = TestNode::start_at("127.0.0.1:0".parse().expect("addr"), dir, tls, NodeConfig::default(), 4, 100);
    assert!(!node.dir.0.join("ca.pem").exists(), "no development CA is created");
    let config = ClientConfig::new(node.addr()).with_ca_file(&certs.0.join("ca.pem")).expect("ca");
    let client = Client::connect(config).await.expect("trusts the operator's CA");
    client.set("k", "v").await.expect("set");
}

#[tokio::test]
async fn mutual_tls_admits_only_clients_with_a_certificate_from_the_ca() {
    let certs = TempDir::new("mtls-certs");
    server::tls::ensure_dev_ca(&certs.0).expect("certs");
    let tls = TlsSource::Files {
        cert: certs.0.join("node.pem"),
        key: certs.0.join("node-key.pem"),
        client_ca: Some(certs.0.join("ca.pem")),
    };
    let node = TestNode::start_at(
        "127.0.0.1:0".parse().expect("addr"),
        TempDir::new("mtls"),
        tls,
        NodeConfig::default(),
        4,
        100,
    );
    let base = ClientConfig::new(node.addr()).with_ca_file(&certs.0.join("ca.pem")).expect("ca");
    // Without a certificate the handshake (or the first request) fails.
    let anonymous = match Client::connect(base.clone()).await {
        Ok(client) => client.ping().await.is_err(),
        Err(_) => true,
    };
    assert!(anonymous, "a client without a certificate must be refused");
    let (cert, key) = server::tls::issue_client_cert(&certs.0, "app-1").expect("client cert");
    let client = Client::connect(base.with_identity(&cert, &key)).await.expect("admitted");
    client.set("k", "v").await.expect("set");
    assert_eq!(client.get("k").await.expect("get"), Some(Bytes::from_static(b"v")));
}

#[tokio::test]
async fn an_oversized_request_fails_alone_and_other_requests_go_on() {
    // Room for the client's 4 lanes plus one-shot streams, as in production.
    let node = TestNode::start_with(NodeConfig { shards: 2, max_value_size: 4096, ..NodeConfig::default() }, 16);
    let mut config = node.client_config();
    // Like production, where a frame over the node's limit is always over
    // the client's large-request threshold.
    config.large_value = 1024;
    let client = Client::connect(config).await.expect("connects");
    client.set("k", "v").await.expect("set");
    let keys: Vec<String> = (0..200).map(|i| format!("{i:0>64}")).collect();
    let pings: Vec<_> = (0..20)
        .map(|_| {
            let client = client.clone();
            tokio::spawn(async move { client.get("k").await })
        })
        .collect();
    let err = client.delete(&keys).await.expect_err("frame over the node's limit");
    assert!(matches!(err, ClientError::Server(ref e) if e.code == ErrorCode::TooLarge), "{err}");
    for ping in pings {
        assert_eq!(ping.await.expect("task").expect("unaffected"), Some(Bytes::from_static(b"v")));
    }
    assert_eq!(client.get("k").await.expect("get"), Some(Bytes::from_static(b"v")));
}

#[tokio::test]
async fn a_second_server_on_a_taken_port_is_refused() {
    let node = TestNode::start();
    let engine = PolicyEngine::new().expect("engine");
    let policy = policies::resolve(&engine, &PolicySpec { name_or_path: "lru".into(), ..PolicySpec::default() })
        .expect("policy");
    let other = Arc::new(Node::new(NodeConfig::default(), policy).expect("node"));
    let options = ServeOptions {
        listen: node.addr(),
        threads: 2,
        tls: TlsSource::DevCa { data_dir: node.dir.0.clone() },
        max_connections: 10,
        max_streams: 4,
        max_frame: 1 << 20,
        idle_timeout: Duration::from_secs(60),
        clients: Default::default(),
    };
    let err = server::start(other, options).err().expect("the port is taken");
    assert!(err.to_string().contains("taken"), "{err}");
    // The first node still answers.
    let client = node.client().await;
    client.ping().await.expect("still serving");
    client.close().await;
}

/// A node on one I/O thread whose connection count a test watches: at
/// most `max_connections`, each dropped after `idle_timeout` of silence.
fn one_thread_node(dir: &TempDir, max_connections: u32, idle_timeout: Duration) -> (Arc<Node>, Running) {
    let engine = PolicyEngine::new().expect("engine");
    let policy = policies::resolve(&engine, &PolicySpec { name_or_path: "lru".into(), ..PolicySpec::default() })
        .expect("policy");
    let mut options = NodeOptions::new(NodeConfig::default(), policy);
    options.quic = Some(ServeOptions {
        listen: "127.0.0.1:0".parse().expect("addr"),
        threads: 1,
        tls: TlsSource::DevCa { data_dir: dir.0.clone() },
        max_connections,
        max_streams: 4,
        max_frame: 1 << 20,
        idle_timeout,
        clients: Default::default(),
    });
    let running = Node::start(options).expect("node starts");
    (running.node().clone(), running)
}

/// A client that vanishes without closing (its process killed, its
/// network gone) is dropped after the idle timeout, freeing its place
/// under the cap, while a busy client keeps the node's socket readable:
/// the node's timers must run under load, not only when it sleeps.
#[tokio::test]
async fn a_vanished_client_is_dropped_after_the_idle_timeout_under_load() {
    let dir = TempDir::new("idle");
    let (node, server) = one_thread_node(&dir, 2, Duration::from_secs(1));
    let config = ClientConfig::new(server.quic_addr().expect("QUIC port")).with_data_dir(&dir.0).expect("ca");
    // The vanishing client runs on a runtime of its own; dropping that
    // runtime stops its endpoint without a word to the node.
    let vanishing = config.clone();
    std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
        runtime.block_on(async move {
            let client = Client::connect(vanishing).await.expect("connects");
            client.ping().await.expect("ping");
            // Its Drop would close the connection: skip it.
            std::mem::forget(client);
        });
    })
    .join()
    .expect("the vanishing client's thread");
    let busy = Client::connect(config.clone()).await.expect("connects");
    // A connection counts once the node has seen its handshake finish,
    // which may be a moment after the client has.
    let counted = std::time::Instant::now();
    while node.stats_connections() < 2 && counted.elapsed() < Duration::from_secs(5) {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(node.stats_connections(), 2, "both clients are counted");
    let mut third = config.clone();
    third.timeout = Duration::from_millis(500);
    assert!(Client::connect(third).await.is_err(), "the cap is reached");
    // Keep the node busy until the silent connection is gone (bounded).
    let started = std::time::Instant::now();
    let mut requests = 0u64;
    while node.stats_connections() > 1 && started.elapsed() < Duration::from_secs(15) {
        busy.set("k", Bytes::from_static(b"v")).await.expect("set");
        requests += 1;
    }
    assert_eq!(node.stats_connections(), 1, "the vanished client was dropped ({requests} requests meanwhile)");
    assert!(started.elapsed() >= Duration::from_millis(500), "not before its idle timeout");
    assert!(requests > 100, "the node was busy meanwhile");
    // Its place under the cap is free again.
    let again = Client::connect(config).await.expect("a new client fits under the cap");
    again.ping().await.expect("ping");
    busy.ping().await.expect("the busy client is unaffected");
    again.close().await;
    busy.close().await;
    server.shutdown();
}

/// A request that times out while its frame is held up by flow control
/// (the node stopped reading) must not leave half a frame on the stream it
/// shares with later requests: the rest of the frame still goes out, whole,
/// before the next one.
#[tokio::test]
async fn a_write_abandoned_by_its_timeout_leaves_the_stream_whole() {
    let dir = TempDir::new("stalled");
    let mut config =
        server::tls::server_config(&TlsSource::DevCa { data_dir: dir.0.clone() }, cachet_proto::ALPN).expect("tls");
    let mut transport = quinn::TransportConfig::default();
    // Room for a little of one frame until the server reads.
    transport.stream_receive_window(1024u32.into());
    config.transport_config(Arc::new(transport));
    let endpoint = quinn::Endpoint::server(config, "127.0.0.1:0".parse().expect("addr")).expect("endpoint");
    let addr = endpoint.local_addr().expect("addr");
    // The server reads nothing for a while, then decodes what arrives.
    let stalled = tokio::spawn(async move {
        let connection = endpoint.accept().await.expect("incoming").await.expect("handshake");
        let (_send, mut recv) = connection.accept_bi().await.expect("stream");
        tokio::time::sleep(Duration::from_millis(800)).await;
        let mut input = BytesMut::new();
        let mut frames = Vec::new();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while frames.len() < 2 && tokio::time::Instant::now() < deadline {
            let mut chunk = [0u8; 4096];
            match tokio::time::timeout(Duration::from_millis(200), recv.read(&mut chunk)).await {
                Ok(Ok(Some(n))) => input.extend_from_slice(&chunk[..n]),
                Ok(_) => break,
                Err(_) => continue,
            }
            while let Decoded::Frame(envelope) =
                cachet_proto::decode::<Request>(&mut input, 1 << 20).expect("every frame arrives whole")
            {
                frames.push(envelope.body);
            }
        }
        frames
    });
    let mut client_config = ClientConfig::new(addr).with_data_dir(&dir.0).expect("ca");
    client_config.timeout = Duration::from_millis(300);
    client_config.lanes = 1;
    let client = Client::connect(client_config).await.expect("connects");
    let err = client.set("k", Bytes::from(vec![b'v'; 8 << 10])).await.expect_err("the write stalls");
    assert!(matches!(err, ClientError::Timeout(_)), "{err}");
    // Later requests share the stream; they time out too (nobody answers),
    // but must follow the whole frame.
    for _ in 0..4 {
        let _ = client.ping().await;
    }
    let frames = stalled.await.expect("server task");
    assert!(frames.len() >= 2, "the set and a ping arrived: {frames:?}");
    assert!(
        matches!(&frames[0], Request::Set { key, value, .. } if key.as_ref() == b"k" && value.len() == 8 << 10),
        "the stalled set arrived whole, first"
    );
    assert!(matches!(frames[1], Request::Ping), "then a ping: {:?}", frames[1]);
}

/// A node that stops answering at the UDP level (crashed, hung, or cut
/// off) sends no close. Requests in flight to it must fail with a
/// connection error once the client's `dead_after` passes, not each wait
/// out its timeout: that is what lets a cluster client move them to a
/// replica quickly.
#[tokio::test]
async fn requests_in_flight_to_a_node_gone_silent_fail_after_dead_after_not_the_timeout() {
    let dir = TempDir::new("silent");
    let config =
        server::tls::server_config(&TlsSource::DevCa { data_dir: dir.0.clone() }, cachet_proto::ALPN).expect("tls");
    let (addr_tx, addr_rx) = std::sync::mpsc::channel();
    // The node runs on a runtime of its own. Once it has read a request it
    // goes silent: its handles are leaked (no close is sent, the socket
    // stays bound, so not even an ICMP error comes back) and its runtime is
    // dropped, which stops everything it ran.
    let silent = std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
        runtime.block_on(async move {
            let endpoint = quinn::Endpoint::server(config, "127.0.0.1:0".parse().expect("addr")).expect("endpoint");
            addr_tx.send(endpoint.local_addr().expect("addr")).expect("send addr");
            let connection = endpoint.accept().await.expect("incoming").await.expect("handshake");
            let (send, mut recv) = connection.accept_bi().await.expect("stream");
            let mut chunk = [0u8; 256];
            let read = recv.read(&mut chunk).await.expect("read").unwrap_or(0);
            std::mem::forget((send, recv, connection, endpoint));
            read
        })
    });
    let addr = addr_rx.recv().expect("the node's address");
    let mut client_config = ClientConfig::new(addr).with_data_dir(&dir.0).expect("ca");
    client_config.timeout = Duration::from_secs(30);
    client_config.dead_after = Duration::from_secs(1);
    client_config.lanes = 1;
    let client = Client::connect(client_config).await.expect("connects");
    let err = client.get("k").await.expect_err("nobody answers");
    assert!(silent.join().expect("the node's thread") > 0, "the node read the request before going silent");
    assert!(matches!(err, ClientError::Connection(_)), "a connection error well inside the 30 s timeout: {err}");
    // The requests that follow queue behind one reconnection attempt, which
    // takes seconds to fail against a silent address; they share its
    // failure instead of each making an attempt of their own in turn
    // (twenty of those would outlast the 30 s timeout).
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..20 {
        let client = client.clone();
        tasks.spawn(async move { client.get(format!("k{i}")).await });
    }
    while let Some(result) = tasks.join_next().await {
        let err = result.expect("task").expect_err("nobody answers");
        assert!(matches!(err, ClientError::Connect { .. }), "the attempt's failure, not a timeout: {err}");
    }
}

/// The pings that keep `dead_after` honest: a live node the client has
/// nothing to ask for several times `dead_after` keeps the same connection.
#[tokio::test]
async fn an_idle_client_keeps_its_connection_past_dead_after() {
    let dir = TempDir::new("keepalive");
    let (node, server) = one_thread_node(&dir, 4, Duration::from_secs(60));
    let mut config = ClientConfig::new(server.quic_addr().expect("QUIC port")).with_data_dir(&dir.0).expect("ca");
    config.dead_after = Duration::from_millis(600);
    let client = Client::connect(config).await.expect("connects");
    client.ping().await.expect("ping");
    // Five times dead_after with nothing to send; the connection would be
    // gone (the count at 0) after 600 ms without the pings.
    for step in 0..60 {
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(node.stats_connections(), 1, "still connected after {} ms", (step + 1) * 50);
    }
    client.ping().await.expect("ping on the same connection");
    assert_eq!(node.stats_connections(), 1);
    client.close().await;
    server.shutdown();
}
