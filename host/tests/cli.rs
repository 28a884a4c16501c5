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
}

impl ServeProcess {
    fn start() -> Self {
        let port = std::net::UdpSocket::bind("127.0.0.1:0").expect("probe").local_addr().expect("addr").port();
        let addr = format!("127.0.0.1:{port}");
        let data_dir = std::env::temp_dir().join(format!("cachet-cli-node-{}-{port}", std::process::id()));
        let _ = std::fs::remove_dir_all(&data_dir);
        let child = Command::new(env!("CARGO_BIN_EXE_cachet"))
            .args([
                "serve",
                "--listen",
                &addr,
                "--data-dir",
                data_dir.to_str().expect("utf-8"),
                "--max-value-size",
                "1KiB",
            ])
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("serve starts");
        let node = Self { child, addr, data_dir };
        // Bounded wait for the node to answer.
        for _ in 0..100 {
            if node.cli(&["stats"]).status.success() {
                return node;
            }
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        panic!("cachet serve did not come up on {}", node.addr);
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
    let out = node.cli(&["stats", "--json"]);
    let stats: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json stats");
    assert_eq!(stats["entries"], 0);
    assert_eq!(stats["deletes"], 1);
    assert_eq!(stats["hits"], 1);
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
