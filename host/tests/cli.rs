//! The `cachet` command as a user runs it: exit codes, messages, `--json`.

use std::io::Write;
use std::process::{Command, Output};

fn cachet(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_cachet")).args(args).output().expect("cachet runs")
}

fn trace_file(body: &str) -> tempfile_path::TempTrace {
    tempfile_path::TempTrace::new(body)
}

/// A trace file under the target directory, removed on drop.
mod tempfile_path {
    use super::Write;
    use std::path::PathBuf;

    pub(super) struct TempTrace(pub(super) PathBuf);

    impl TempTrace {
        pub(super) fn new(body: &str) -> Self {
            static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
            let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let path = std::env::temp_dir().join(format!("cachet-cli-{}-{n}.csv", std::process::id()));
            let mut file = std::fs::File::create(&path).expect("create trace");
            file.write_all(body.as_bytes()).expect("write trace");
            Self(path)
        }

        pub(super) fn path(&self) -> &str {
            self.0.to_str().expect("utf-8 temp path")
        }
    }

    impl Drop for TempTrace {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }
}

#[test]
fn sim_prints_a_json_report_as_its_last_line() {
    let trace = trace_file("timestamp,key,size\n0,1,1\n1,2,1\n2,1,1\n3,3,1\n4,2,1\n");
    for native in [false, true] {
        let mut args = vec!["sim", "--trace", trace.path(), "--policy", "lru", "--capacity", "2", "--json"];
        if native {
            args.push("--native");
        }
        let out = cachet(&args);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let stdout = String::from_utf8_lossy(&out.stdout);
        let report: serde_json::Value = serde_json::from_str(stdout.lines().last().expect("a line")).expect("json");
        // 1 2 1(hit) 3(evicts 2) 2(miss): 1 hit, 4 misses.
        assert_eq!(report["requests"], 5);
        assert_eq!(report["hits"], 1);
        assert_eq!(report["misses"], 4);
        assert_eq!(report["miss_ratio"], 0.8);
        assert_eq!(report["policy"], "lru");
        assert_eq!(report["capacity"], 2);
        assert_eq!(report["policy_faults"], 0);
        assert_eq!(report["runtime"], if native { "native" } else { "wasm" });
        assert!(report["requests_per_sec"].as_f64().expect("rate") > 0.0);
    }
}

/// A sweep over a trace with too few distinct keys for any of its sizes
/// is refused by name (it used to panic on an empty size list).
#[test]
fn a_sweep_of_a_tiny_trace_is_refused_with_a_reason() {
    let trace = trace_file("timestamp,key,size\n0,1,1\n1,2,1\n2,1,1\n");
    let out = cachet(&["sim", "--trace", trace.path(), "--sweep"]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("2 distinct keys") && stderr.contains("--capacity"), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
}

#[test]
fn an_unknown_policy_lists_the_known_ones() {
    let trace = trace_file("timestamp,key,size\n0,1,1\n");
    let out = cachet(&["sim", "--trace", trace.path(), "--policy", "lru2", "--capacity", "2"]);
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("unknown policy `lru2`; known policies: arc, clock, fifo, lfu, lru, random, s3fifo, sieve, ttl, twoq, wtinylfu"), "{stderr}");
}

#[test]
fn a_malformed_trace_line_is_named_by_number() {
    let trace = trace_file("timestamp,key,size\n0,1,1\n1,oops,1\n");
    let out = cachet(&["sim", "--trace", trace.path(), "--capacity", "2"]);
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("line 3: key is not an unsigned 64-bit integer"), "{stderr}");
}

#[test]
fn a_file_that_is_not_a_component_is_refused() {
    let trace = trace_file("timestamp,key,size\n0,1,1\n");
    let bogus = trace_file("not wasm at all");
    let policy = format!("{}.wasm", bogus.path());
    std::fs::copy(bogus.path(), &policy).expect("copy");
    let out = cachet(&["sim", "--trace", trace.path(), "--policy", &policy, "--capacity", "2"]);
    let _ = std::fs::remove_file(&policy);
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("not a WebAssembly component"), "{stderr}");
}

/// A `cachet serve` process on a free loopback port with its own data dir,
/// stopped with SIGTERM on drop.
struct ServeProcess {
    child: std::process::Child,
    addr: String,
    data_dir: std::path::PathBuf,
    extra: Vec<String>,
}

impl ServeProcess {
    fn start() -> Self {
        Self::start_with(&[])
    }

    /// A node with `extra` serve flags.
    fn start_with(extra: &[&str]) -> Self {
        let port = std::net::UdpSocket::bind("127.0.0.1:0").expect("probe").local_addr().expect("addr").port();
        let addr = format!("127.0.0.1:{port}");
        let data_dir = std::env::temp_dir().join(format!("cachet-cli-node-{}-{port}", std::process::id()));
        let _ = std::fs::remove_dir_all(&data_dir);
        let extra: Vec<String> = extra.iter().map(|s| s.to_string()).collect();
        let child = Self::spawn(&addr, &data_dir, &extra);
        let node = Self { child, addr, data_dir, extra };
        node.wait_until_up();
        node
    }

    fn spawn(addr: &str, data_dir: &std::path::Path, extra: &[String]) -> std::process::Child {
        Command::new(env!("CARGO_BIN_EXE_cachet"))
            .args([
                "serve",
                "--listen",
                addr,
                "--data-dir",
                data_dir.to_str().expect("utf-8"),
                "--max-value-size",
                "1KiB",
            ])
            .args(extra)
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("serve starts")
    }

    fn wait_until_up(&self) {
        // Bounded wait for the node to answer.
        for _ in 0..100 {
            if self.cli(&["stats"]).status.success() {
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        panic!("cachet serve did not come up on {}", self.addr);
    }

    /// SIGTERM, then the same command line again on the same data dir.
    fn restart(&mut self) {
        assert!(self.stop().success());
        self.child = Self::spawn(&self.addr, &self.data_dir, &self.extra);
        self.wait_until_up();
    }

    fn cli(&self, args: &[&str]) -> Output {
        let mut all = args.to_vec();
        all.extend(["--server", &self.addr, "--data-dir", self.data_dir.to_str().expect("utf-8")]);
        cachet(&all)
    }

    fn stop(&mut self) -> std::process::ExitStatus {
        let _ = Command::new("kill").args(["-TERM", &self.child.id().to_string()]).status();
        self.child.wait().expect("serve exits")
    }
}

impl Drop for ServeProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.data_dir);
    }
}

#[test]
fn serve_then_get_set_del_stats_from_another_process() {
    let mut node = ServeProcess::start();
    let out = node.cli(&["set", "user:1", "Ada", "--ttl", "60"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let out = node.cli(&["get", "user:1"]);
    assert!(out.status.success());
    assert_eq!(out.stdout, b"Ada\n");
    let out = node.cli(&["set", "user:1", "Bob", "--nx"]);
    assert_eq!(out.status.code(), Some(1), "NX on an existing key does not store");
    let out = node.cli(&["get", "missing"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(out.stdout.is_empty(), "a miss prints nothing on stdout");
    assert_eq!(String::from_utf8_lossy(&out.stderr).lines().count(), 1, "one-line message");
    let out = node.cli(&["set", "big", &"x".repeat(2000)]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("exceeds the limit"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = node.cli(&["del", "user:1", "nope"]);
    assert_eq!(out.stdout, b"1\n");
    let out = node.cli(&["incr", "visits"]);
    assert_eq!(out.stdout, b"1\n");
    let out = node.cli(&["incr", "visits", "-5"]);
    assert_eq!(out.stdout, b"-4\n", "a negative amount decrements");
    let out = node.cli(&["del", "visits"]);
    assert_eq!(out.stdout, b"1\n");
    let out = node.cli(&["stats", "--json"]);
    let stats: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json stats");
    assert_eq!(stats["entries"], 0);
    assert_eq!(stats["deletes"], 2);
    assert_eq!(stats["hits"], 2, "the GET and the second INCR");
    assert!(stats["misses"].as_u64().expect("misses") >= 1);
    assert_eq!(stats["policy"], "s3fifo", "the default policy");
    let status = node.stop();
    assert!(status.success(), "SIGTERM shuts down cleanly: {status:?}");
}

#[test]
fn client_verbs_without_a_node_fail_with_one_line() {
    let out = cachet(&["get", "k", "--server", "127.0.0.1:9", "--ca", "/nonexistent/ca.pem"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("CA file /nonexistent/ca.pem not found"));
}

fn free_tcp_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").expect("probe").local_addr().expect("addr").port()
}

fn scrape(addr: &str) -> String {
    use std::io::Read;
    let mut stream = std::net::TcpStream::connect(addr).expect("metrics endpoint");
    stream.write_all(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\n\r\n").expect("request");
    let mut reply = String::new();
    stream.read_to_string(&mut reply).expect("reply");
    assert!(reply.starts_with("HTTP/1.1 200"), "{reply}");
    reply
}

fn json_of(out: &Output) -> serde_json::Value {
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let stdout = String::from_utf8_lossy(&out.stdout);
    serde_json::from_str(stdout.lines().last().expect("a line")).expect("json")
}

#[test]
fn policy_verbs_load_activate_shadow_and_roll_back_a_live_node() {
    let token_file = std::env::temp_dir().join(format!("cachet-cli-token-{}", std::process::id()));
    std::fs::write(&token_file, "open-sesame\n").expect("token file");
    let token_path = token_file.to_str().expect("utf-8");
    let metrics = format!("127.0.0.1:{}", free_tcp_port());
    let mut node = ServeProcess::start_with(&["--admin-token-file", token_path, "--metrics-listen", &metrics]);
    let module = concat!(env!("OUT_DIR"), "/guests/sieve.wasm");
    let version = env!("CARGO_PKG_VERSION");

    let out = node.cli(&["policy", "list"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("admin token"), "{}", String::from_utf8_lossy(&out.stderr));
    let wrong = Command::new(env!("CARGO_BIN_EXE_cachet"))
        .args(["policy", "list", "--server", &node.addr, "--data-dir", node.data_dir.to_str().expect("utf-8")])
        .env("CACHET_ADMIN_TOKEN", "guess")
        .output()
        .expect("runs");
    assert_eq!(wrong.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&wrong.stderr).contains("wrong admin token"));

    let admin = |node: &ServeProcess, args: &[&str]| {
        let mut all = args.to_vec();
        all.extend(["--admin-token-file", token_path]);
        node.cli(&all)
    };
    let out = admin(&node, &["policy", "load", module, "--name", "sieve", "--version", "9"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains("loaded sieve@9"));
    let out = admin(&node, &["policy", "activate", "sieve@9"]);
    assert!(String::from_utf8_lossy(&out.stdout).contains("activated sieve@9"), "{out:?}");
    let out = admin(&node, &["policy", "activate", "sieve@10"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no module `sieve@10`"));
    let out = admin(&node, &["policy", "shadow", &format!("s3fifo@{version}")]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let listing = json_of(&admin(&node, &["policy", "list", "--json"]));
    assert_eq!(listing["active"], "sieve@9");
    assert_eq!(listing["previous"], format!("s3fifo@{version}"));
    assert_eq!(listing["shadow"]["candidate"], format!("s3fifo@{version}"));
    let sieve = listing["modules"].as_array().expect("modules").iter().find(|m| m["version"] == "9").expect("sieve@9");
    assert_eq!(sieve["sha256"].as_str().expect("hash").len(), 64);
    let text = scrape(&metrics);
    assert!(text.contains("cachet_policy_swaps_total 1"), "{text}");
    assert!(text.contains("module=\"sieve@9\""));
    assert!(text.contains("cachet_shadow_hit_ratio{role=\"candidate\""));

    // The module and the active choice survive a restart.
    node.restart();
    let listing = json_of(&admin(&node, &["policy", "list", "--json"]));
    assert_eq!(listing["active"], "sieve@9", "restored after restart");
    let out = admin(&node, &["policy", "rollback"]);
    assert!(String::from_utf8_lossy(&out.stdout).contains("rolled back"), "{out:?}");
    let listing = json_of(&admin(&node, &["policy", "list", "--json"]));
    assert_eq!(listing["active"], format!("s3fifo@{version}"));
    let stats = json_of(&node.cli(&["stats", "--json"]));
    assert_eq!(stats["policy"], "s3fifo");
    let _ = std::fs::remove_file(&token_file);
}

/// Hot keys are key bytes: `stats` hides them (and says so) without the
/// admin token, `hot-keys` and `warm --from-node` refuse without it or with
/// a wrong one; with it they list them and warm reads the list back.
#[test]
fn hot_keys_export_a_list_that_warm_reads_back() {
    let token_file = std::env::temp_dir().join(format!("cachet-cli-hot-token-{}", std::process::id()));
    std::fs::write(&token_file, "open-sesame\n").expect("token file");
    let token = token_file.to_str().expect("utf-8");
    let node = ServeProcess::start_with(&["--admin-token-file", token]);
    assert!(node.cli(&["set", "hot", "1"]).status.success());
    assert!(node.cli(&["set", "warm", "2"]).status.success());
    for _ in 0..5 {
        assert!(node.cli(&["get", "hot"]).status.success());
    }
    assert!(node.cli(&["get", "warm"]).status.success());

    let stdout = |out: &Output| String::from_utf8_lossy(&out.stdout).to_string();
    let stderr = |out: &Output| String::from_utf8_lossy(&out.stderr).to_string();
    let out = node.cli(&["stats"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stdout(&out).contains("hot keys          hidden: hot keys are key bytes"), "{}", stdout(&out));
    assert!(!stdout(&out).contains("hot (~"), "plain stats leak hot keys: {}", stdout(&out));
    let plain = json_of(&node.cli(&["stats", "--json"]));
    assert_eq!(plain["hot_keys"], serde_json::json!([]));
    assert_eq!(plain["hot_keys_hidden"], true);
    let out = node.cli(&["hot-keys"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("admin token") && out.stdout.is_empty(), "{}", stderr(&out));
    let wrong = std::env::temp_dir().join(format!("cachet-cli-hot-wrong-{}", std::process::id()));
    std::fs::write(&wrong, "guess\n").expect("token file");
    let out = node.cli(&["hot-keys", "--admin-token-file", wrong.to_str().expect("utf-8")]);
    let _ = std::fs::remove_file(&wrong);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("wrong admin token") && out.stdout.is_empty(), "{}", stderr(&out));
    let out = node.cli(&["warm", "--from-node", &node.addr, "--quiet"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("admin token"), "{}", stderr(&out));

    let out = node.cli(&["hot-keys", "--admin-token-file", token]);
    assert!(out.status.success(), "{}", stderr(&out));
    let list = stdout(&out);
    assert_eq!(list.lines().take(2).collect::<Vec<_>>(), ["hot", "warm"], "hottest first: {list}");
    let out = node.cli(&["stats", "--admin-token-file", token]);
    assert!(stdout(&out).contains("hot keys          hot (~"), "stats shows them: {}", stdout(&out));

    let file = std::env::temp_dir().join(format!("cachet-cli-keys-{}", std::process::id()));
    std::fs::write(&file, format!("{list}absent\n")).expect("key list");
    let out = node.cli(&["warm", "--keys", file.to_str().expect("utf-8"), "--rate", "50", "--quiet"]);
    let _ = std::fs::remove_file(&file);
    assert!(out.status.success(), "{}", stderr(&out));
    let report = stdout(&out);
    assert!(report.starts_with("warmed 3 keys") && report.contains("2 present, 1 not found"), "{report}");
    let out = node.cli(&["warm", "--from-node", &node.addr, "--admin-token-file", token, "--quiet"]);
    let _ = std::fs::remove_file(&token_file);
    assert!(out.status.success() && stdout(&out).contains("present"), "{}", stderr(&out));
}

#[test]
fn nodes_started_at_once_share_a_development_ca() {
    let ca_dir = std::env::temp_dir().join(format!("cachet-cli-dev-ca-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&ca_dir);
    let ca = ca_dir.to_str().expect("utf-8").to_string();
    let extra = vec!["--dev-ca".to_string(), ca.clone()];
    // Spawn all three before any is up, so they race to create the CA.
    let nodes: Vec<ServeProcess> = (0..3)
        .map(|_| {
            let port = std::net::UdpSocket::bind("127.0.0.1:0").expect("probe").local_addr().expect("addr").port();
            let addr = format!("127.0.0.1:{port}");
            let data_dir = std::env::temp_dir().join(format!("cachet-cli-shared-{}-{port}", std::process::id()));
            let _ = std::fs::remove_dir_all(&data_dir);
            let child = ServeProcess::spawn(&addr, &data_dir, &extra);
            ServeProcess { child, addr, data_dir, extra: extra.clone() }
        })
        .collect();
    for node in &nodes {
        node.wait_until_up();
    }
    for (i, node) in nodes.iter().enumerate() {
        // A client that trusts only the shared CA reaches every node.
        let value = format!("v{i}");
        let out = cachet(&["set", "k", &value, "--server", &node.addr, "--dev-ca", &ca, "--data-dir", "/nonexistent"]);
        assert!(out.status.success(), "node {i}: {}", String::from_utf8_lossy(&out.stderr));
        let out = cachet(&["get", "k", "--server", &node.addr, "--dev-ca", &ca, "--data-dir", "/nonexistent"]);
        assert_eq!(out.stdout, format!("{value}\n").as_bytes());
        let copy = std::fs::read(node.data_dir.join("ca.pem")).expect("CA copy");
        assert_eq!(copy, std::fs::read(ca_dir.join("ca.pem")).expect("shared CA"), "node {i} has another CA");
    }
    drop(nodes);
    let _ = std::fs::remove_dir_all(&ca_dir);
}

/// `cachet cert issue` makes the CA once and node certificates naming
/// their node id (a client certificate names none); keys are the owner's
/// alone; a missing or doubled subject is refused by name.
#[test]
fn cert_issue_makes_a_ca_and_certificates_naming_their_node() {
    use cachet::server::tls::{NodeIdError, cert_node_id, load_certs};
    let root = std::env::temp_dir().join(format!("cachet-cli-cert-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&root);
    let (ca, certs) = (root.join("ca"), root.join("certs"));
    let (ca_arg, out_arg) = (ca.to_str().expect("utf-8"), certs.to_str().expect("utf-8"));
    let named = |path: &std::path::Path| cert_node_id(&load_certs(path).expect("certificate")[0]);
    let out =
        cachet(&["cert", "issue", "--node-id", "3", "--ca", ca_arg, "--out", out_arg, "--name", "cache3.example"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let printed = String::from_utf8_lossy(&out.stdout);
    let (cert, key) = (certs.join("node-3.pem"), certs.join("node-3-key.pem"));
    for path in [&cert, &key, &ca.join("ca.pem")] {
        assert!(printed.contains(path.to_str().expect("utf-8")), "{} not named in {printed}", path.display());
    }
    assert_eq!(named(&cert), Ok(3));
    #[cfg(unix)]
    for secret in [&key, &ca.join("ca-key.pem")] {
        use std::os::unix::fs::PermissionsExt as _;
        let mode = std::fs::metadata(secret).expect("key").permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "{} is readable by others", secret.display());
    }
    // The CA is made once: the next certificate comes from the same one.
    let ca_pem = std::fs::read(ca.join("ca.pem")).expect("CA");
    let out = cachet(&["cert", "issue", "--node-id", "4", "--ca", ca_arg, "--out", out_arg]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(std::fs::read(ca.join("ca.pem")).expect("CA"), ca_pem, "the CA was made again");
    assert_eq!(named(&certs.join("node-4.pem")), Ok(4));
    let out = cachet(&["cert", "issue", "--client", "app", "--ca", ca_arg, "--out", out_arg]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(named(&certs.join("client-app.pem")), Err(NodeIdError::Missing));
    for (args, says) in [
        (vec!["--ca", ca_arg], "--node-id"),
        (vec!["--node-id", "1", "--client", "app", "--ca", ca_arg], "--client"),
        (vec!["--node-id", "5000", "--ca", ca_arg], "5000"),
    ] {
        let out = cachet(&[&["cert", "issue"][..], &args].concat());
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success() && stderr.contains(says), "{args:?}: {stderr}");
    }
    let _ = std::fs::remove_dir_all(&root);
}

/// `cachet bench --protocol resp --rate` runs open loop: about the asked
/// number of requests, every one answered, latency from the intended send
/// times.
#[test]
fn bench_drives_the_resp_port_at_a_fixed_rate() {
    let resp = format!("127.0.0.1:{}", free_tcp_port());
    let node = ServeProcess::start_with(&["--resp-listen", &resp]);
    let out = cachet(&[
        "bench",
        "--protocol",
        "resp",
        "--server",
        &resp,
        "--keys",
        "1000",
        "--rate",
        "2000",
        "--duration",
        "1",
        "--connections",
        "4",
        "--threads",
        "1",
        "--json",
    ]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let report = json_of(&out);
    assert_eq!(report["mode"], "open", "{report}");
    let ops = report["ops"].as_u64().expect("ops");
    assert!((1_900..=2_100).contains(&ops), "2,000 requests asked for in 1 s, {ops} answered: {report}");
    assert_eq!(report["errors"].as_u64(), Some(0), "{report}");
    let refused = cachet(&["bench", "--protocol", "resp", "--server", &resp, "--rate", "100", "--pipeline", "4"]);
    assert!(!refused.status.success());
    assert!(String::from_utf8_lossy(&refused.stderr).contains("--pipeline"));
    drop(node);
}
