//! `cargo xtask bench-compare`: Cachet against redis-server (and memcached
//! for memory) on this machine, back to back, with one load generator
//! (`cachet bench`) for every server. Servers are pinned to core 0 and the
//! generator to core 1.

use crate::{median, number as f};
use anyhow::{Context, Result, bail};
use std::io::{Read, Write};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// Installs the comparison servers with apt-get when they are missing.
fn ensure_installed() -> Result<()> {
    let missing: Vec<&str> =
        [("redis-server", "redis-server"), ("redis-cli", "redis-tools"), ("memcached", "memcached")]
            .into_iter()
            .filter(|(bin, _)| {
                !Command::new("sh").args(["-c", &format!("command -v {bin}")]).status().is_ok_and(|s| s.success())
            })
            .map(|(_, package)| package)
            .collect();
    if missing.is_empty() {
        return Ok(());
    }
    eprintln!("xtask: installing {}", missing.join(" "));
    let root = Command::new("id").arg("-u").output().map(|o| o.stdout.starts_with(b"0")).unwrap_or(false);
    let apt = |args: &[&str]| -> Result<()> {
        let mut command = if root { Command::new("apt-get") } else { Command::new("sudo") };
        if !root {
            command.arg("apt-get");
        }
        let status = command.args(args).env("DEBIAN_FRONTEND", "noninteractive").status()?;
        if !status.success() {
            bail!("apt-get {} failed", args.join(" "));
        }
        Ok(())
    };
    apt(&["update", "-q"])?;
    let mut args = vec!["install", "-y", "-q"];
    args.extend(missing);
    apt(&args)
}

fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// A server process, killed on drop.
struct Server {
    child: Child,
    _dir: Option<tempdir::Dir>,
}

mod tempdir {
    /// A directory removed on drop.
    pub(super) struct Dir(pub(super) std::path::PathBuf);

    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Server {
    fn pid(&self) -> String {
        self.child.id().to_string()
    }

    fn rss_kib(&self) -> Result<u64> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))?;
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .context("VmRSS")
    }
}

/// How long after a load RSS is read, for every server alike: allocators
/// return the pages a load outgrew (a doubled table's old array) a little
/// after they fall idle, and the figure wanted is what stays.
const SETTLE: Duration = Duration::from_secs(3);

/// `rss` read after [`SETTLE`].
fn settled(rss: impl FnOnce() -> Result<u64>) -> Result<u64> {
    std::thread::sleep(SETTLE);
    rss()
}

fn pinned(program: &Path) -> Command {
    let mut command = Command::new("taskset");
    command.args(["-c", "0"]).arg(program);
    command
}

fn wait_for_tcp(port: u16) -> Result<()> {
    for _ in 0..100 {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    bail!("nothing listening on port {port} after 10 s")
}

fn redis(port: u16) -> Result<Server> {
    let child = pinned(Path::new("redis-server"))
        .args(["--port", &port.to_string(), "--save", "", "--appendonly", "no", "--bind", "127.0.0.1"])
        .stdout(Stdio::null())
        .spawn()
        .context("redis-server")?;
    wait_for_tcp(port)?;
    Ok(Server { child, _dir: None })
}

/// A Cachet node with one I/O thread per port and one shard, like
/// redis-server's one thread.
fn cachet_node(cachet: &Path, quic: u16, resp: u16) -> Result<Server> {
    let dir = std::env::temp_dir().join(format!("cachet-compare-{}-{quic}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let child = pinned(cachet)
        .args(["serve", "--listen", &format!("127.0.0.1:{quic}"), "--resp-listen", &format!("127.0.0.1:{resp}")])
        .args(["--threads", "1", "--shards", "1", "--max-entries", "2000000", "--max-memory", "1GiB", "--data-dir"])
        .arg(&dir)
        .stderr(Stdio::null())
        .spawn()
        .context("cachet serve")?;
    wait_for_tcp(resp)?;
    Ok(Server { child, _dir: Some(tempdir::Dir(dir)) })
}

fn memcached(port: u16) -> Result<Server> {
    let child = pinned(Path::new("memcached"))
        .args(["-p", &port.to_string(), "-U", "0", "-l", "127.0.0.1", "-m", "1024", "-t", "1", "-u", "root"])
        .spawn()
        .context("memcached")?;
    wait_for_tcp(port)?;
    Ok(Server { child, _dir: None })
}

/// `cachet bench` on core 1; the JSON report.
fn bench(cachet: &Path, args: &[String]) -> Result<serde_json::Value> {
    let out = Command::new("taskset").args(["-c", "1"]).arg(cachet).arg("bench").args(args).arg("--json").output()?;
    if !out.status.success() {
        bail!("cachet bench {} failed: {}", args.join(" "), String::from_utf8_lossy(&out.stderr));
    }
    let stdout = String::from_utf8_lossy(&out.stdout);
    serde_json::from_str(stdout.lines().last().unwrap_or_default()).context("bench --json")
}

/// Writes `n` keys of `size`-byte values to memcached, pipelined.
fn load_memcached(port: u16, n: u64, size: usize) -> Result<()> {
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", port))?;
    let value = vec![b'x'; size];
    let mut batch = Vec::new();
    for i in 0..n {
        batch.extend_from_slice(format!("set key:{i} 0 0 {size} noreply\r\n").as_bytes());
        batch.extend_from_slice(&value);
        batch.extend_from_slice(b"\r\n");
        if batch.len() > 256 << 10 {
            stream.write_all(&batch)?;
            batch.clear();
        }
    }
    batch.extend_from_slice(b"version\r\n");
    stream.write_all(&batch)?;
    let mut reply = [0u8; 64];
    let read = stream.read(&mut reply)?;
    if !reply[..read].starts_with(b"VERSION") {
        bail!("memcached did not confirm the load: {}", String::from_utf8_lossy(&reply[..read]));
    }
    Ok(())
}

pub(crate) fn bench_compare(cachet: &Path, floor: &Path) -> Result<()> {
    ensure_installed()?;
    let (redis_port, quic_port, resp_port) = (free_port()?, free_port()?, free_port()?);
    let redis_server = redis(redis_port)?;
    let node = cachet_node(cachet, quic_port, resp_port)?;
    let targets = [
        ("redis-server", "resp", redis_port, redis_server.pid()),
        ("cachet RESP", "resp", resp_port, node.pid()),
        ("cachet QUIC", "quic", quic_port, node.pid()),
    ];
    // Prefill 100K keys of 100 bytes on each server (the node's two ports
    // share its data; prefilled once through RESP).
    for (name, protocol, port, _) in &targets[..2] {
        eprintln!("xtask: prefilling {name}");
        let args: Vec<String> = ["--protocol", protocol, "--server", &format!("127.0.0.1:{port}"), "--keys", "100000"]
            .into_iter()
            .map(String::from)
            .chain(["--duration", "0.2", "--connections", "8", "--threads", "1"].map(String::from))
            .collect();
        bench(cachet, &args)?;
    }
    println!("## Cachet against redis-server: 100K keys, 100-byte values, 50 connections, 5 s per run\n");
    println!("| workload | server | ops/s (median of 2) | p99 us | server CPU us/op | ops/s vs redis |");
    println!("|---|---|---:|---:|---:|---:|");
    let mut resp_get_p1 = f64::NAN;
    for (op, get_ratio) in [("GET", "1"), ("SET", "0")] {
        for pipeline in [1usize, 16] {
            let mut results: Vec<Vec<serde_json::Value>> = vec![Vec::new(); targets.len()];
            for _round in 0..2 {
                for (i, (_, protocol, port, pid)) in targets.iter().enumerate() {
                    let in_flight = (50 * pipeline).to_string();
                    let mut args: Vec<String> = [
                        "--protocol",
                        protocol,
                        "--server",
                        &format!("127.0.0.1:{port}"),
                        "--keys",
                        "100000",
                        "--value-size",
                        "100",
                        "--get-ratio",
                        get_ratio,
                        "--duration",
                        "5",
                        "--connections",
                        "50",
                        "--threads",
                        "1",
                        "--no-preload",
                        "--server-pid",
                        pid,
                    ]
                    .into_iter()
                    .map(String::from)
                    .collect();
                    if *protocol == "resp" {
                        args.extend(["--pipeline".to_string(), pipeline.to_string()]);
                    } else {
                        let dir =
                            std::env::temp_dir().join(format!("cachet-compare-{}-{quic_port}", std::process::id()));
                        args.extend(["--concurrency".to_string(), in_flight, "--data-dir".to_string()]);
                        args.push(dir.display().to_string());
                    }
                    results[i].push(bench(cachet, &args)?);
                }
            }
            let redis_rate = median(results[0].iter().map(|r| f(r, "ops_per_sec")).collect());
            for ((name, ..), runs) in targets.iter().zip(&results) {
                let rate = median(runs.iter().map(|r| f(r, "ops_per_sec")).collect());
                let p99 = median(runs.iter().map(|r| f(r, "p99_us")).collect());
                let cpu = median(runs.iter().map(|r| f(r, "server_cpu_us_per_op")).collect());
                if (*name, op, pipeline) == ("cachet RESP", "GET", 1) {
                    resp_get_p1 = rate;
                }
                println!(
                    "| {op} pipeline {pipeline} | {name} | {rate:.0} | {p99:.0} | {cpu:.2} | {:.2} |",
                    rate / redis_rate
                );
            }
        }
    }
    drop(node);
    drop(redis_server);
    quic_floor(floor, resp_get_p1)?;

    println!(
        "\n## Memory per key: RSS growth after loading 1,000,000 keys of 100 bytes (read {SETTLE:?} after the load)\n"
    );
    println!("| server | RSS before (MiB) | RSS after (MiB) | bytes per key | vs redis |");
    println!("|---|---:|---:|---:|---:|");
    let load =
        ["--keys", "1000000", "--value-size", "100", "--duration", "0.1", "--connections", "8", "--threads", "1"];
    let mut per_key = Vec::new();
    let port = free_port()?;
    let redis_server = redis(port)?;
    let before = redis_server.rss_kib()?;
    let mut args: Vec<String> = load.map(String::from).to_vec();
    args.extend(["--protocol", "resp", "--server"].map(String::from));
    args.push(format!("127.0.0.1:{port}"));
    bench(cachet, &args)?;
    per_key.push(("redis-server", before, settled(|| redis_server.rss_kib())?));
    drop(redis_server);
    let (quic, resp) = (free_port()?, free_port()?);
    let node = cachet_node(cachet, quic, resp)?;
    let before = node.rss_kib()?;
    let mut args: Vec<String> = load.map(String::from).to_vec();
    args.extend(["--protocol", "resp", "--server"].map(String::from));
    args.push(format!("127.0.0.1:{resp}"));
    bench(cachet, &args)?;
    per_key.push(("cachet (s3fifo)", before, settled(|| node.rss_kib())?));
    drop(node);
    let port = free_port()?;
    let mc = memcached(port)?;
    let before = mc.rss_kib()?;
    load_memcached(port, 1_000_000, 100)?;
    per_key.push(("memcached", before, settled(|| mc.rss_kib())?));
    drop(mc);
    let redis_bytes = (per_key[0].2.saturating_sub(per_key[0].1) * 1024) as f64 / 1e6;
    for (name, before, after) in per_key {
        let bytes = (after.saturating_sub(before) * 1024) as f64 / 1e6;
        println!(
            "| {name} | {:.1} | {:.1} | {bytes:.0} | {:.2} |",
            before as f64 / 1024.0,
            after as f64 / 1024.0,
            bytes / redis_bytes
        );
    }
    Ok(())
}

/// Runs the `quic_floor` example with `args`, the load side pinned to
/// core 1, and parses its JSON line.
fn floor_run(floor: &Path, args: &[&str]) -> Result<serde_json::Value> {
    let out = Command::new("taskset").args(["-c", "1"]).arg(floor).args(args).output()?;
    if !out.status.success() {
        bail!("quic_floor {} failed: {}", args.join(" "), String::from_utf8_lossy(&out.stderr));
    }
    let stdout = String::from_utf8_lossy(&out.stdout);
    serde_json::from_str(stdout.lines().last().unwrap_or_default()).context("quic_floor output")
}

/// What a request over QUIC cannot cost less than on this machine, server
/// side, against what the 1.5x-RESP target allows: the socket work alone
/// (an echo server on core 0 with no QUIC, driven at pipeline 1 from 50
/// sockets on core 1), quinn-proto's own work (client and server in one
/// process, in memory) and the cache's work on a GET (decode, execute,
/// encode). Two rounds each, medians.
fn quic_floor(floor: &Path, resp_get_p1: f64) -> Result<()> {
    eprintln!("xtask: measuring the QUIC floor");
    let mut sockets: [Vec<(f64, f64)>; 2] = [Vec::new(), Vec::new()];
    let mut proto = Vec::new();
    for _round in 0..2 {
        for (i, mode) in [None, Some("--sendmmsg")].into_iter().enumerate() {
            let port = free_port()?;
            let addr = format!("127.0.0.1:{port}");
            let mut command = pinned(floor);
            command.args(["udp-server", &addr]).args(mode);
            let server =
                Server { child: command.stdout(Stdio::null()).spawn().context("quic_floor udp-server")?, _dir: None };
            std::thread::sleep(Duration::from_millis(300));
            let run = floor_run(
                floor,
                &["udp-client", &addr, "--connections", "50", "--duration", "5", "--server-pid", &server.pid()],
            )?;
            sockets[i].push((f(&run, "ops_per_sec"), f(&run, "server_cpu_us_per_op")));
        }
        let run = floor_run(floor, &["exchange", "--requests", "100000"])?;
        proto.push((
            f(&run, "server_us_per_request"),
            f(&run, "client_us_per_request"),
            f(&run, "datagrams_per_request"),
            f(&run, "cache_us_per_request"),
        ));
    }
    let rate = |i: usize| median(sockets[i].iter().map(|r| r.0).collect());
    let cpu = |i: usize| median(sockets[i].iter().map(|r| r.1).collect());
    let server = median(proto.iter().map(|r| r.0).collect());
    let client = median(proto.iter().map(|r| r.1).collect());
    let datagrams = median(proto.iter().map(|r| r.2).collect());
    let cache = median(proto.iter().map(|r| r.3).collect());
    let budget = 1e6 / (1.5 * resp_get_p1);
    let floor_us = cpu(1) + server + cache;
    println!("\n## The floor of a GET over QUIC at pipeline 1, server side (medians of 2)\n");
    println!("| part | server CPU us per request | measured |");
    println!("|---|---:|---|");
    println!(
        "| sockets, quinn's calls (quinn-udp's batched receive, one send per datagram, tokio) | {:.2} | UDP echo, no QUIC, {:.0} requests/s |",
        cpu(0),
        rate(0)
    );
    println!(
        "| sockets, cheapest (blocking `recvmmsg` and one `sendmmsg` per batch) | {:.2} | UDP echo, no QUIC, {:.0} requests/s |",
        cpu(1),
        rate(1)
    );
    println!(
        "| quinn-proto, server side (client side: {client:.2}) | {server:.2} | in memory, {datagrams:.2} datagrams per request |"
    );
    println!(
        "| cache work: decode the frame, execute on a node of 100K keys (S3-FIFO as Wasm), encode | {cache:.2} | in memory, same run |"
    );
    println!("| **floor**: cheapest sockets + quinn-proto + cache work | **{floor_us:.2}** | |");
    println!(
        "| **allowed** for 1.5x the RESP port's GET rate ({resp_get_p1:.0}/s) on one fully busy core | **{budget:.2}** | 1 / (1.5 x {resp_get_p1:.0}) |"
    );
    println!(
        "\nAt the floor, one core would serve {:.0} GETs/s over QUIC: {:.2}x the RESP port's rate in this run.",
        1e6 / floor_us,
        1e6 / floor_us / resp_get_p1
    );
    Ok(())
}
