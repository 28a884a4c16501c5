//! `cargo xtask bench-live`: what live policy operations cost on a real
//! node (release build, loopback, `cachet bench` as the load):
//!
//! 1. swap duration per shard with 1M resident entries;
//! 2. request latency during swaps under open-loop load, against the same
//!    load without swaps (interleaved rounds);
//! 3. throughput while a module that loops forever in `pick-victims` keeps
//!    being retried and cut off by its budget, against a well-behaved one.

use crate::{median, number as f};
use anyhow::{Context, Result, bail};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output};
use std::time::Duration;

const TOKEN: &str = "bench-live-token";

/// A `cachet serve` process on loopback with an admin token.
struct NodeProcess {
    cachet: PathBuf,
    child: Child,
    addr: String,
    data_dir: PathBuf,
}

impl NodeProcess {
    fn start(cachet: &Path, data_dir: PathBuf, args: &[&str]) -> Result<Self> {
        let _ = std::fs::remove_dir_all(&data_dir);
        std::fs::create_dir_all(&data_dir)?;
        let token_file = data_dir.join("admin-token");
        std::fs::write(&token_file, TOKEN)?;
        let port = std::net::UdpSocket::bind("127.0.0.1:0")?.local_addr()?.port();
        let addr = format!("127.0.0.1:{port}");
        let mut command = if Path::new("/usr/bin/taskset").exists() {
            let mut c = Command::new("taskset");
            c.args(["-c", "0"]).arg(cachet);
            c
        } else {
            Command::new(cachet)
        };
        let child = command
            .args(["serve", "--listen", &addr, "--data-dir"])
            .arg(&data_dir)
            .arg("--admin-token-file")
            .arg(&token_file)
            .args(args)
            .spawn()
            .context("cannot start cachet serve")?;
        let node = Self { cachet: cachet.to_path_buf(), child, addr, data_dir };
        for _ in 0..100 {
            if node.cli(&["stats"])?.status.success() {
                return Ok(node);
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        bail!("the node did not answer within 10 s")
    }

    fn cli(&self, args: &[&str]) -> Result<Output> {
        let mut command = if args.first() == Some(&"bench") && Path::new("/usr/bin/taskset").exists() {
            let mut c = Command::new("taskset");
            c.args(["-c", "1"]).arg(&self.cachet);
            c
        } else {
            Command::new(&self.cachet)
        };
        Ok(command
            .args(args)
            .args(["--server", &self.addr, "--data-dir"])
            .arg(&self.data_dir)
            .env("CACHET_ADMIN_TOKEN", TOKEN)
            .output()?)
    }

    fn ok(&self, args: &[&str]) -> Result<String> {
        let out = self.cli(args)?;
        if !out.status.success() {
            bail!("cachet {} failed: {}", args.join(" "), String::from_utf8_lossy(&out.stderr));
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    fn json(&self, args: &[&str]) -> Result<serde_json::Value> {
        let out = self.ok(args)?;
        serde_json::from_str(out.lines().last().unwrap_or_default()).context("json")
    }

    fn pid(&self) -> String {
        self.child.id().to_string()
    }
}

impl Drop for NodeProcess {
    fn drop(&mut self) {
        let _ = Command::new("kill").args(["-TERM", &self.child.id().to_string()]).status();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.data_dir);
    }
}

/// A figure in milliseconds that follows `label` in an activation's
/// message ("slowest shard 12.3 ms, longest lock 4.5 ms").
fn ms_after(message: &str, label: &str) -> Option<f64> {
    let rest = message.split(label).nth(1)?;
    rest.split_whitespace().next()?.parse().ok()
}

pub(crate) fn bench_live(cachet: &Path, hostile: &Path, target: &Path, version: &str) -> Result<()> {
    let cycle = ["lru", "s3fifo", "sieve"];
    println!("== 1. Swap duration per shard, 1,000,000 resident entries (1 shard, node pinned to core 0) ==\n");
    let node = NodeProcess::start(
        cachet,
        target.join("bench-live-1"),
        &["--shards", "1", "--threads", "1", "--max-entries", "2000000", "--max-memory", "2GiB"],
    )?;
    let fill = [
        "bench",
        "--keys",
        "1000000",
        "--duration",
        "1",
        "--get-ratio",
        "1",
        "--connections",
        "4",
        "--concurrency",
        "128",
        "--threads",
        "1",
    ];
    node.ok(&fill)?;
    let entries = node.json(&["stats", "--json"])?["entries"].as_u64().unwrap_or(0);
    let (mut swap_ms, mut lock_ms) = (Vec::new(), Vec::new());
    for i in 0..9 {
        let module = format!("{}@{version}", cycle[(i + 1) % cycle.len()]);
        let message = node.ok(&["policy", "activate", &module])?;
        let ms = ms_after(&message, "slowest shard ").context("activation message")?;
        let locked = ms_after(&message, "longest lock ").context("activation message")?;
        println!("  activate {module:<14} {ms:>7.1} ms, shard locked at most {locked:>6.1} ms");
        swap_ms.push(ms);
        lock_ms.push(locked);
    }
    println!(
        "\n  resident entries {entries}; median swap {:.1} ms per shard, median longest lock {:.1} ms\n",
        median(swap_ms),
        median(lock_ms)
    );
    drop(node);

    println!("== 2. Latency under open-loop load (20,000 req/s, 90% GET) with and without swaps every second ==");
    println!("   (2 shards, 1,000,000 entries; node on core 0, load on core 1; 2 interleaved rounds of 10 s)\n");
    let node = NodeProcess::start(
        cachet,
        target.join("bench-live-2"),
        &["--shards", "2", "--threads", "1", "--max-entries", "2000000", "--max-memory", "2GiB"],
    )?;
    node.ok(&fill)?;
    let pid = node.pid();
    let load = [
        "bench",
        "--no-preload",
        "--keys",
        "1000000",
        "--rate",
        "20000",
        "--duration",
        "10",
        "--connections",
        "8",
        "--concurrency",
        "256",
        "--threads",
        "1",
        "--json",
        "--server-pid",
        &pid,
    ];
    println!("| run | swaps | ops/s | errors | p50 us | p99 us | p99.9 us | max us |");
    println!("|---|---:|---:|---:|---:|---:|---:|---:|");
    for round in 0..2 {
        for with_swaps in [false, true] {
            let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
            let swapper = with_swaps.then(|| {
                let (stop, cachet, addr, data) =
                    (stop.clone(), node.cachet.clone(), node.addr.clone(), node.data_dir.clone());
                let version = version.to_string();
                std::thread::spawn(move || {
                    let mut swaps = 0;
                    std::thread::sleep(Duration::from_millis(500));
                    while !stop.load(std::sync::atomic::Ordering::Relaxed) && swaps < 30 {
                        let module = format!("{}@{version}", cycle[swaps % cycle.len()]);
                        let ok = Command::new(&cachet)
                            .args(["policy", "activate", &module, "--server", &addr, "--data-dir"])
                            .arg(&data)
                            .env("CACHET_ADMIN_TOKEN", TOKEN)
                            .output()
                            .map(|o| o.status.success())
                            .unwrap_or(false);
                        swaps += usize::from(ok);
                        std::thread::sleep(Duration::from_secs(1));
                    }
                    swaps
                })
            });
            let report = node.json(&load)?;
            stop.store(true, std::sync::atomic::Ordering::Relaxed);
            let swaps = swapper.map(|t| t.join().unwrap_or(0)).unwrap_or(0);
            println!(
                "| round {} {} | {swaps} | {:.0} | {} | {:.0} | {:.0} | {:.0} | {:.0} |",
                round + 1,
                if with_swaps { "swapping" } else { "baseline" },
                f(&report, "ops_per_sec"),
                report["errors"],
                f(&report, "p50_us"),
                f(&report, "p99_us"),
                f(&report, "p999_us"),
                f(&report, "max_us")
            );
        }
    }
    drop(node);

    println!("\n== 3. Closed-loop throughput while a module loops forever in pick-victims, retried and cut off ==");
    println!("   (2 shards, 100,000 entries, 200,000 keys, 50% SET so every write evicts; fault limit 1000,");
    println!("    retry after 1 ms doubling; 2 interleaved rounds of 8 s)\n");
    let node = NodeProcess::start(
        cachet,
        target.join("bench-live-3"),
        &[
            "--shards",
            "2",
            "--threads",
            "1",
            "--max-entries",
            "100000",
            "--policy-fault-limit",
            "1000",
            "--policy-retry-ms",
            "1",
        ],
    )?;
    let hostile_path = hostile.to_str().context("non-UTF-8 path")?;
    node.ok(&[
        "policy",
        "load",
        hostile_path,
        "--name",
        "looper",
        "--version",
        "1",
        "--config",
        "mode=loop",
        "--config",
        "after=60000",
    ])?;
    let pid = node.pid();
    let closed = [
        "bench",
        "--keys",
        "200000",
        "--get-ratio",
        "0.5",
        "--duration",
        "8",
        "--connections",
        "8",
        "--concurrency",
        "256",
        "--threads",
        "1",
        "--json",
        "--server-pid",
        &pid,
    ];
    node.ok(&["bench", "--keys", "200000", "--duration", "1", "--threads", "1"])?;
    let closed_no_preload: Vec<&str> = closed.iter().copied().chain(["--no-preload"]).collect();
    println!("| run | ops/s | errors | budget faults | p99 us | server CPU us/op |");
    println!("|---|---:|---:|---:|---:|---:|");
    let mut ratios = Vec::new();
    for round in 0..2 {
        let mut rates = [0.0; 2];
        for (i, module) in [format!("lru@{version}"), "looper@1".to_string()].iter().enumerate() {
            node.ok(&["policy", "activate", module])?;
            let faults_before = budget_faults(&node)?;
            let report = node.json(&closed_no_preload)?;
            let faults = budget_faults(&node)? - faults_before;
            rates[i] = f(&report, "ops_per_sec");
            println!(
                "| round {} {module} | {:.0} | {} | {faults} | {:.0} | {:.2} |",
                round + 1,
                rates[i],
                report["errors"],
                f(&report, "p99_us"),
                f(&report, "server_cpu_us_per_op")
            );
        }
        ratios.push(rates[1] / rates[0]);
    }
    println!("\n  looping module / well-behaved throughput: median ratio {:.3}", median(ratios));
    Ok(())
}

/// Policy faults so far, summed over shards; the looping module only ever
/// faults on its budget, so in its runs these are budget faults.
fn budget_faults(node: &NodeProcess) -> Result<u64> {
    let listing = node.json(&["policy", "list", "--json"])?;
    Ok(listing["shards"].as_array().map(|s| s.iter().map(|s| s["faults"].as_u64().unwrap_or(0)).sum()).unwrap_or(0))
}
