//! Local clusters of `cachet serve --cluster` processes on 127.0.0.1-N: the
//! demo's failover run, `cargo xtask bench-cluster` and `cargo xtask chaos`.

use anyhow::{Context, Result, bail};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A cluster of local processes; every member is killed on drop.
pub(crate) struct LocalCluster {
    cachet: PathBuf,
    root: PathBuf,
    ca: PathBuf,
    port: u16,
    rf: usize,
    members: Vec<(Vec<String>, Option<Child>)>,
    /// Client addresses, by node id.
    pub(crate) addrs: Vec<String>,
}

impl Drop for LocalCluster {
    fn drop(&mut self) {
        for (_, child) in &mut self.members {
            if let Some(mut child) = child.take() {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
    }
}

/// A port free on 127.0.0.1 to .`n`, with the next one (the peer port).
fn free_port_pair(n: usize) -> Result<u16> {
    for _ in 0..200 {
        let port = std::net::UdpSocket::bind("127.0.0.1:0")?.local_addr()?.port();
        if port >= u16::MAX - 1 {
            continue;
        }
        let free = (1..=n)
            .all(|i| [port, port + 1].iter().all(|p| std::net::UdpSocket::bind(format!("127.0.0.{i}:{p}")).is_ok()));
        if free {
            return Ok(port);
        }
    }
    bail!("no free port pair on 127.0.0.1-{n}")
}

impl LocalCluster {
    /// Starts `n` members with replication factor `rf` under `root` and
    /// waits until they have formed.
    pub(crate) fn start(cachet: &Path, root: &Path, n: usize, rf: usize, extra: &[&str]) -> Result<Self> {
        let _ = std::fs::remove_dir_all(root);
        std::fs::create_dir_all(root)?;
        let ca = root.join("ca");
        // One spare address for a member that joins later.
        let port = free_port_pair(n + 1)?;
        let peers: Vec<String> = (1..=n).map(|i| format!("127.0.0.{i}:{}", port + 1)).collect();
        let addrs: Vec<String> = (1..=n).map(|i| format!("127.0.0.{i}:{port}")).collect();
        let path = |p: &Path| p.to_str().map(str::to_string).context("non-UTF-8 path");
        let mut members = Vec::new();
        for (i, addr) in addrs.iter().enumerate() {
            let mut args: Vec<String> = vec![
                "serve".into(),
                "--listen".into(),
                addr.clone(),
                "--data-dir".into(),
                path(&root.join(format!("node{i}")))?,
                "--dev-ca".into(),
                path(&ca)?,
                "--cluster".into(),
                peers.join(","),
                "--node-id".into(),
                i.to_string(),
                "--replication-factor".into(),
                rf.to_string(),
            ];
            // `{host}` in an extra argument is this member's address.
            let host = format!("127.0.0.{}", i + 1);
            args.extend(extra.iter().map(|s| s.replace("{host}", &host)));
            members.push((args, None));
        }
        let mut cluster = Self { cachet: cachet.to_path_buf(), root: root.to_path_buf(), ca, port, rf, members, addrs };
        for i in 0..n {
            cluster.spawn(i)?;
        }
        cluster.wait_healthy(Duration::from_secs(30))?;
        Ok(cluster)
    }

    /// Starts member `i` (again).
    pub(crate) fn spawn(&mut self, i: usize) -> Result<()> {
        let log = std::fs::File::create(self.root.join(format!("node{i}.log")))?;
        let child = Command::new(&self.cachet)
            .args(&self.members[i].0)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .context("cannot start cachet serve")?;
        self.members[i].1 = Some(child);
        Ok(())
    }

    /// Starts one more member, joining through the others (`--seeds`).
    pub(crate) fn join(&mut self, extra: &[&str]) -> Result<()> {
        let i = self.members.len();
        let path = |p: &Path| p.to_str().map(str::to_string).context("non-UTF-8 path");
        let seeds: Vec<String> = (1..=i).map(|k| format!("127.0.0.{k}:{}", self.port + 1)).collect();
        let addr = format!("127.0.0.{}:{}", i + 1, self.port);
        let mut args: Vec<String> = vec![
            "serve".into(),
            "--listen".into(),
            addr.clone(),
            "--data-dir".into(),
            path(&self.root.join(format!("node{i}")))?,
            "--dev-ca".into(),
            path(&self.ca)?,
            "--seeds".into(),
            seeds.join(","),
            "--peer-listen".into(),
            format!("127.0.0.{}:{}", i + 1, self.port + 1),
            "--node-id".into(),
            i.to_string(),
            "--replication-factor".into(),
            self.rf.to_string(),
        ];
        args.extend(extra.iter().map(|s| s.to_string()));
        self.members.push((args, None));
        self.addrs.push(addr);
        self.spawn(i)
    }

    /// Sends `signal` (`STOP`, `CONT`) to member `i`, if it runs.
    pub(crate) fn signal(&self, i: usize, signal: &str) -> Result<()> {
        let Some(child) = self.members[i].1.as_ref() else { return Ok(()) };
        let pid = child.id().to_string();
        if !Command::new("kill").args([&format!("-{signal}"), &pid]).status()?.success() {
            bail!("kill -{signal} {pid} failed");
        }
        Ok(())
    }

    /// SIGKILL member `i`.
    pub(crate) fn kill(&mut self, i: usize) -> Result<()> {
        if let Some(mut child) = self.members[i].1.take() {
            child.kill()?;
            child.wait()?;
        }
        Ok(())
    }

    /// SIGTERM member `i` (a clean stop: it leaves the cluster) and waits
    /// (at most 10 s) for it to exit.
    pub(crate) fn terminate(&mut self, i: usize) -> Result<()> {
        let Some(child) = self.members[i].1.as_mut() else { return Ok(()) };
        let pid = child.id().to_string();
        if !Command::new("kill").args(["-TERM", &pid]).status()?.success() {
            bail!("kill -TERM {pid} failed");
        }
        let start = Instant::now();
        while child.try_wait()?.is_none() {
            if start.elapsed() > Duration::from_secs(10) {
                bail!("member {i} did not exit within 10 s of SIGTERM");
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        self.members[i].1 = None;
        Ok(())
    }

    /// Runs a client verb against member `i`.
    pub(crate) fn cli(&self, i: usize, args: &[&str]) -> Result<std::process::Output> {
        Ok(Command::new(&self.cachet)
            .args(args)
            .args(["--server", &self.addrs[i], "--dev-ca"])
            .arg(&self.ca)
            .stderr(Stdio::piped())
            .output()?)
    }

    /// Runs an admin verb against member `i` with the demo's token.
    pub(crate) fn cli_as_admin(&self, i: usize, args: &[&str]) -> Result<std::process::Output> {
        Ok(Command::new(&self.cachet)
            .args(args)
            .args(["--server", &self.addrs[i], "--dev-ca"])
            .arg(&self.ca)
            .env("CACHET_ADMIN_TOKEN", "demo-cluster-token")
            .stderr(Stdio::piped())
            .output()?)
    }

    /// Member `i`'s stats, as JSON.
    pub(crate) fn stats(&self, i: usize) -> Result<serde_json::Value> {
        let out = self.cli(i, &["stats", "--json", "--timeout-ms", "1000"])?;
        if !out.status.success() {
            bail!("member {i}: {}", String::from_utf8_lossy(&out.stderr).trim());
        }
        Ok(serde_json::from_slice(&out.stdout)?)
    }

    /// Waits until every running member sees every member up, is
    /// re-synced, and routes by the same slot table, on which every member
    /// owns slots; returns how long that took.
    pub(crate) fn wait_healthy(&self, limit: Duration) -> Result<Duration> {
        let start = Instant::now();
        loop {
            let mut epochs = std::collections::BTreeSet::new();
            let healthy = (0..self.members.len()).all(|i| {
                self.stats(i).is_ok_and(|s| {
                    let c = &s["cluster"];
                    let owners: std::collections::BTreeSet<u64> = c["slots"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .flat_map(|r| {
                            r["owners"].as_array().into_iter().flatten().filter_map(serde_json::Value::as_u64)
                        })
                        .collect();
                    epochs.insert(c["ring_epoch"].as_u64().unwrap_or(0));
                    c["synced"].as_bool() == Some(true)
                        && owners.len() == self.members.len()
                        && c["alive"].as_array().is_some_and(|a| {
                            a.len() == self.members.len() && a.iter().all(|u| u.as_bool() == Some(true))
                        })
                })
            });
            if healthy && epochs.len() == 1 {
                return Ok(start.elapsed());
            }
            if start.elapsed() > limit {
                bail!("the cluster was not healthy within {limit:?} (logs in {})", self.root.display());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// How long until member `observer` declares member `dead` down.
    pub(crate) fn time_to_down(&self, observer: usize, dead: usize, since: Instant) -> Result<Duration> {
        loop {
            let stats = self.stats(observer)?;
            if stats["cluster"]["alive"][dead].as_bool() == Some(false) {
                return Ok(since.elapsed());
            }
            if since.elapsed() > Duration::from_secs(15) {
                bail!("member {dead} was not declared down within 15 s");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// `cachet bench` over every member through the cluster SDK.
    pub(crate) fn bench(&self, args: &[&str]) -> Result<Child> {
        Command::new(&self.cachet)
            .args(["bench", "--cluster-members", &self.addrs.join(","), "--server", &self.addrs[0], "--dev-ca"])
            .arg(&self.ca)
            .args(args)
            .args(["--json"])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .context("cannot start cachet bench")
    }
}

/// The last line of a finished `cachet bench --json`.
pub(crate) fn bench_report(child: Child) -> Result<serde_json::Value> {
    let out = child.wait_with_output()?;
    if !out.status.success() {
        bail!("cachet bench failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    let stdout = String::from_utf8_lossy(&out.stdout);
    serde_json::from_str(stdout.lines().last().unwrap_or_default()).context("bench --json")
}

/// Three members, RF=3, a QUORUM workload through the cluster SDK; one
/// member is SIGKILLed mid-run and restarted empty.
pub(crate) fn demo(cachet: &Path, root: &Path) -> Result<()> {
    println!("\n== A 3-node cluster on 127.0.0.1-3, RF=3, QUORUM reads and writes; node 2 is SIGKILLed mid-run ==\n");
    // Outside `root`, which the cluster's start clears.
    let token = root.with_extension("admin-token");
    std::fs::write(&token, "demo-cluster-token\n")?;
    let token = token.to_str().context("non-UTF-8 path")?.to_string();
    let mut cluster = LocalCluster::start(cachet, root, 3, 3, &["--threads", "1", "--admin-token-file", &token])?;
    println!("cluster formed  3 members up and synced (clients: {})", cluster.addrs.join(", "));
    let bench = cluster.bench(&[
        "--duration",
        "8",
        "--keys",
        "5000",
        "--connections",
        "4",
        "--concurrency",
        "32",
        "--get-ratio",
        "0.8",
        "--consistency",
        "quorum",
    ])?;
    // Preloading takes a moment; kill a member well inside the measured run.
    std::thread::sleep(Duration::from_secs(4));
    cluster.kill(2)?;
    let killed = Instant::now();
    let down = cluster.time_to_down(0, 2, killed)?;
    println!("SIGKILL node 2  declared down by node 0 after {} ms", down.as_millis());
    let view = cluster.stats(0)?["cluster"].clone();
    let epoch = view["ring_epoch"].as_u64().unwrap_or(0);
    let serving: Vec<String> = view["alive"]
        .as_array()
        .into_iter()
        .flatten()
        .enumerate()
        .filter(|(_, up)| up.as_bool() == Some(true))
        .map(|(i, _)| i.to_string())
        .collect();
    println!(
        "slot table      epoch {epoch} (the metadata log's): node 2 keeps its slots; nodes [{}] serve them at QUORUM meanwhile",
        serving.join(", ")
    );
    std::thread::sleep(Duration::from_secs(2));
    cluster.spawn(2)?;
    let restarted = Instant::now();
    let healed = cluster.wait_healthy(Duration::from_secs(30))?;
    let records = cluster.stats(2)?["cluster"]["records"].as_u64().unwrap_or(0);
    println!(
        "restart node 2  empty; re-synced and counted again after {} ms (holds {records} records); {:.1} s after the kill",
        healed.as_millis(),
        (restarted - killed).as_secs_f64() + healed.as_secs_f64()
    );
    let report = bench_report(bench)?;
    let n = crate::number;
    let (ops, errors) = (n(&report, "ops"), n(&report, "errors"));
    println!(
        "workload        {ops:.0} operations, {errors:.0} failed after retries ({:.3}% succeeded); {:.0} ops/s (release build)",
        100.0 * ops / (ops + errors).max(1.0),
        n(&report, "ops_per_sec")
    );
    println!(
        "latency         p50 {:.0} us, p99 {:.0} us, max {:.0} us (the max spans the failover)",
        n(&report, "p50_us"),
        n(&report, "p99_us"),
        n(&report, "max_us")
    );
    for i in 0..3 {
        let c = &cluster.stats(i)?["cluster"];
        println!(
            "node {i}          {} records, coordinated {} ok / {} failed",
            c["records"], c["ops_ok"], c["ops_failed"]
        );
    }
    // Read-modify-writes through every member at once: each INCR runs at
    // the key's primary owner, one at a time, so none is lost.
    let started = Instant::now();
    let results: Vec<Result<u64>> = std::thread::scope(|scope| {
        let workers: Vec<_> = (0..3)
            .map(|i| {
                let cluster = &cluster;
                scope.spawn(move || {
                    let mut done = 0u64;
                    for _ in 0..40 {
                        let out = cluster.cli(i, &["incr", "demo:counter"])?;
                        if !out.status.success() {
                            bail!("INCR through node {i}: {}", String::from_utf8_lossy(&out.stderr).trim());
                        }
                        done += 1;
                    }
                    Ok(done)
                })
            })
            .collect();
        workers.into_iter().map(|w| w.join().unwrap_or_else(|_| Err(anyhow::anyhow!("a worker panicked")))).collect()
    });
    let acknowledged: u64 = results.into_iter().sum::<Result<u64>>()?;
    let out = cluster.cli(0, &["get", "demo:counter"])?;
    let counter = String::from_utf8_lossy(&out.stdout).trim().to_string();
    println!(
        "INCR            {acknowledged} increments through all 3 members at once ({} ms): counter = {counter}",
        started.elapsed().as_millis()
    );
    if counter != acknowledged.to_string() {
        bail!("the counter reads {counter} after {acknowledged} acknowledged increments");
    }
    canary_rollout(&cluster)
}

/// The cluster's metadata log, and a policy rolled out to every member
/// through one of them with a canary, under load.
fn canary_rollout(cluster: &LocalCluster) -> Result<()> {
    let meta = cluster.stats(0)?["cluster"]["meta"].clone();
    let members = meta["members"].as_array().cloned().unwrap_or_default();
    let states: Vec<String> =
        members.iter().map(|m| format!("{}={}", m["node"], m["state"].as_str().unwrap_or("?"))).collect();
    println!(
        "metadata log    Raft (raft-rs): leader node {}, term {}, applied index {}; members {}",
        meta["leader"],
        meta["term"],
        meta["applied"],
        states.join(", ")
    );
    let bench = cluster.bench(&["--duration", "9", "--keys", "2000", "--connections", "3", "--concurrency", "16"])?;
    std::thread::sleep(Duration::from_secs(2));
    let label = format!("sieve@{}", env!("CARGO_PKG_VERSION"));
    let started = Instant::now();
    let out = cluster.cli_as_admin(1, &["policy", "activate", &label, "--canary", "1", "--canary-window", "3"])?;
    let said = String::from_utf8_lossy(if out.status.success() { &out.stdout } else { &out.stderr }).to_string();
    if !out.status.success() {
        bail!("the canary through node 1 failed: {}", said.trim());
    }
    println!("canary          `cachet policy activate {label} --canary 1 --canary-window 3` through node 1");
    let decision = loop {
        let meta = cluster.stats(0)?["cluster"]["meta"].clone();
        if meta["canary"].is_null()
            && let Some(last) = meta["last_canary"].as_str()
        {
            break last.to_string();
        }
        if started.elapsed() > Duration::from_secs(20) {
            bail!("no canary decision within 20 s: {meta}");
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    println!("decision        {decision} ({:.1} s after the command)", started.elapsed().as_secs_f64());
    let mut running = Vec::new();
    for i in 0..3 {
        let out = cluster.cli_as_admin(i, &["policy", "list", "--json"])?;
        let listing: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
        running.push(format!("node {i} runs {}", listing["active"].as_str().unwrap_or("?")));
    }
    println!("policies        {}", running.join(", "));
    let report = bench_report(bench)?;
    let n = crate::number;
    println!(
        "workload        {:.0} operations during the rollout, {:.0} failed; p99 {:.0} us",
        n(&report, "ops"),
        n(&report, "errors"),
        n(&report, "p99_us")
    );
    Ok(())
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values.get(values.len() / 2).copied().unwrap_or(f64::NAN)
}

/// Three members (RF=3) under a QUORUM load of `secs` seconds (`load` with
/// its duration replaced), four seconds into it.
fn loaded_trio(cachet: &Path, root: &Path, load: &[&str], secs: &str) -> Result<(LocalCluster, Child)> {
    let cluster = LocalCluster::start(cachet, root, 3, 3, &["--threads", "1"])?;
    let mut args: Vec<&str> = load.to_vec();
    args[1] = secs;
    args.extend(["--consistency", "quorum", "--threads", "1"]);
    let bench = cluster.bench(&args)?;
    std::thread::sleep(Duration::from_secs(4));
    Ok((cluster, bench))
}

/// What stopping a member of a loaded trio did.
#[derive(Debug)]
struct StopUnderLoad {
    /// From the stop until member 0 no longer counted it.
    down_ms: f64,
    /// Share of operations that failed after the SDK's retries.
    failed: f64,
    /// The slowest operation of the run.
    slowest_ms: f64,
}

/// Stops member 2 of a loaded trio with `stop` (SIGKILL or SIGTERM) and
/// reports the member's way out and the load's.
fn stop_under_load(
    cachet: &Path,
    root: &Path,
    load: &[&str],
    stop: fn(&mut LocalCluster, usize) -> Result<()>,
) -> Result<StopUnderLoad> {
    let (mut cluster, bench) = loaded_trio(cachet, root, load, "8")?;
    let stopped = Instant::now();
    stop(&mut cluster, 2)?;
    let down = cluster.time_to_down(0, 2, stopped)?;
    let report = bench_report(bench)?;
    Ok(StopUnderLoad {
        down_ms: down.as_secs_f64() * 1000.0,
        failed: crate::number(&report, "errors") / crate::number(&report, "ops").max(1.0),
        slowest_ms: crate::number(&report, "max_us") / 1000.0,
    })
}

/// `cargo xtask bench-cluster`: throughput of 1, 2 and 3 members (RF=1,
/// and RF=members at QUORUM), three interleaved rounds, medians; then the
/// failover time over three SIGKILLs of a 3-member cluster under load.
/// The throughput table only, this build (`cachet`) against `baseline` in
/// the same interleaved rounds (the two swapped every other round): each
/// row's medians and their ratio, so a change to the cluster's path is
/// checked for regressions on one noisy machine.
fn bench_against(cachet: &Path, baseline: &Path, root: &Path) -> Result<()> {
    let load =
        ["--duration", "5", "--keys", "20000", "--connections", "8", "--concurrency", "128", "--get-ratio", "0.9"];
    let configs: Vec<(usize, usize)> = vec![(1, 1), (2, 1), (3, 1), (2, 2), (3, 3)];
    let mut rates: Vec<[Vec<f64>; 2]> = vec![[Vec::new(), Vec::new()]; configs.len()];
    for round in 0..3 {
        for (c, &(n, rf)) in configs.iter().enumerate() {
            let order = if round % 2 == 0 { [0, 1] } else { [1, 0] };
            for which in order {
                let binary = if which == 0 { cachet } else { baseline };
                let cluster = LocalCluster::start(binary, root, n, rf, &["--threads", "1"])?;
                let mut args: Vec<&str> = load.to_vec();
                args.extend(["--consistency", "quorum", "--threads", "1"]);
                let report = bench_report(cluster.bench(&args)?)?;
                let rate = crate::number(&report, "ops_per_sec");
                eprintln!("round {round}: {n} members, RF {rf}, {}: {rate:.0} ops/s", binary.display());
                rates[c][which].push(rate);
            }
        }
    }
    println!("Baseline: `{}`; medians of 3 interleaved rounds.\n", baseline.display());
    println!("| members | RF | this build ops/s | baseline ops/s | ratio |");
    println!("|---:|---:|---:|---:|---:|");
    for (c, &(n, rf)) in configs.iter().enumerate() {
        let (now, old) = (median(rates[c][0].clone()), median(rates[c][1].clone()));
        println!("| {n} | {rf} | {now:.0} | {old:.0} | {:.3} |", now / old);
    }
    Ok(())
}

pub(crate) fn bench(cachet: &Path, root: &Path, baseline: Option<&Path>) -> Result<()> {
    if let Some(baseline) = baseline {
        return bench_against(cachet, baseline, root);
    }
    let load =
        ["--duration", "5", "--keys", "20000", "--connections", "8", "--concurrency", "128", "--get-ratio", "0.9"];
    let configs: Vec<(usize, usize)> = vec![(1, 1), (2, 1), (3, 1), (2, 2), (3, 3)];
    let mut results: Vec<Vec<serde_json::Value>> = vec![Vec::new(); configs.len()];
    for round in 0..3 {
        for (c, &(n, rf)) in configs.iter().enumerate() {
            let cluster = LocalCluster::start(cachet, root, n, rf, &["--threads", "1"])?;
            let mut args: Vec<&str> = load.to_vec();
            args.extend(["--consistency", "quorum", "--threads", "1"]);
            let report = bench_report(cluster.bench(&args)?)?;
            eprintln!(
                "round {round}: {n} members, RF {rf}: {:.0} ops/s, {} errors",
                crate::number(&report, "ops_per_sec"),
                report["errors"]
            );
            results[c].push(report);
        }
    }
    println!("| members | RF | ops/s (median of 3) | per member | p50 us | p99 us | errors |");
    println!("|---:|---:|---:|---:|---:|---:|---:|");
    for (c, &(n, rf)) in configs.iter().enumerate() {
        let m = |key: &str| median(results[c].iter().map(|r| crate::number(r, key)).collect());
        println!(
            "| {n} | {rf} | {:.0} | {:.0} | {:.0} | {:.0} | {:.0} |",
            m("ops_per_sec"),
            m("ops_per_sec") / n as f64,
            m("p50_us"),
            m("p99_us"),
            m("errors")
        );
    }
    // Failover, interleaved with the same run on a client that waits out
    // its timeout for requests in flight to the dead member (no
    // `dead_after`), to show what the client's liveness check saves.
    let (mut kills, mut kills_without) = (Vec::new(), Vec::new());
    for round in 0..3 {
        for dead_after in ["2000", "0"] {
            let mut with: Vec<&str> = load.to_vec();
            with.extend(["--dead-after-ms", dead_after]);
            let stop = stop_under_load(cachet, root, &with, LocalCluster::kill)?;
            eprintln!("failover round {round}, dead-after {dead_after} ms: {stop:?}");
            if dead_after == "0" { &mut kills_without } else { &mut kills }.push(stop);
        }
    }
    let rounded = |v: &[f64]| v.iter().map(|d| d.round()).collect::<Vec<_>>();
    let column =
        |stops: &[StopUnderLoad], pick: fn(&StopUnderLoad) -> f64| -> Vec<f64> { stops.iter().map(pick).collect() };
    let (downs, slowest) = (column(&kills, |s| s.down_ms), column(&kills, |s| s.slowest_ms));
    let slowest_without = column(&kills_without, |s| s.slowest_ms);
    println!(
        "\nfailover: member declared down {:.0} ms after SIGKILL (median of 3: {:?}); failed operations {:.4}% (median)",
        median(downs.clone()),
        rounded(&downs),
        100.0 * median(column(&kills, |s| s.failed))
    );
    println!(
        "slowest operation across the failover: {:.0} ms (median of 3: {:?}); {:.0} ms with --dead-after-ms 0 ({:?})",
        median(slowest.clone()),
        rounded(&slowest),
        median(slowest_without.clone()),
        rounded(&slowest_without)
    );
    // A clean stop under the same load: the member leaves, so the others
    // need not detect it.
    let mut leaves = Vec::new();
    for round in 0..3 {
        let stop = stop_under_load(cachet, root, &load, LocalCluster::terminate)?;
        eprintln!("leave round {round}: {stop:?}");
        leaves.push(stop);
    }
    let (lefts, left_slowest) = (column(&leaves, |s| s.down_ms), column(&leaves, |s| s.slowest_ms));
    println!(
        "graceful stop (SIGTERM) under load: member out of the ring {:.0} ms after the signal, exit included (median of 3: {:?}); failed operations {:.4}% (median); slowest operation {:.0} ms ({:?})",
        median(lefts.clone()),
        rounded(&lefts),
        100.0 * median(column(&leaves, |s| s.failed)),
        median(left_slowest.clone()),
        rounded(&left_slowest)
    );
    // Re-replication: three members at RF=2 under load; one is killed and
    // the two left pull its ranges until each holds every key again.
    let mut rereplications = Vec::new();
    for round in 0..3 {
        // The log moves a dead member's slots after a second here (30 s
        // by default).
        let mut cluster = LocalCluster::start(cachet, root, 3, 2, &["--threads", "1", "--replace-after-ms", "1000"])?;
        let mut args: Vec<&str> = load.to_vec();
        args[1] = "10";
        args.extend(["--consistency", "quorum", "--threads", "1"]);
        let bench = cluster.bench(&args)?;
        std::thread::sleep(Duration::from_secs(4));
        let mut copies = 0;
        for i in 0..3 {
            copies += cluster.stats(i)?["cluster"]["records"].as_u64().unwrap_or(0);
        }
        let keys = copies / 2;
        cluster.kill(2)?;
        let killed = Instant::now();
        loop {
            let restored = (0..2).all(|i| {
                cluster.stats(i).is_ok_and(|s| {
                    let c = &s["cluster"];
                    let moved = c["slots"].as_array().is_some_and(|slots| {
                        slots.iter().all(|r| r["owners"].as_array().is_some_and(|o| !o.contains(&2.into())))
                    });
                    c["alive"][2].as_bool() == Some(false)
                        && c["synced"].as_bool() == Some(true)
                        && moved
                        && c["records"].as_u64().unwrap_or(0) >= keys
                })
            });
            if restored {
                break;
            }
            if killed.elapsed() > Duration::from_secs(30) {
                bail!("the copies were not restored within 30 s (logs in {})", root.display());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let took = killed.elapsed();
        let report = bench_report(bench)?;
        eprintln!(
            "re-replication round {round}: {keys} keys held twice again {} ms after SIGKILL, {} failed ops",
            took.as_millis(),
            report["errors"]
        );
        rereplications.push((took.as_secs_f64() * 1000.0, keys as f64, crate::number(&report, "errors")));
    }
    println!(
        "re-replication: 3 members at RF=2, one SIGKILLed under load: both survivors hold all {:.0} keys \
         {:.0} ms after the kill (median of 3; detection included); failed operations {:.0} (median)",
        median(rereplications.iter().map(|r| r.1).collect()),
        median(rereplications.iter().map(|r| r.0).collect()),
        median(rereplications.iter().map(|r| r.2).collect())
    );
    // A fourth member joins three (RF=3) under load.
    let mut joins = Vec::new();
    for round in 0..3 {
        let (mut cluster, bench) = loaded_trio(cachet, root, &load, "10")?;
        let keys_before = cluster.stats(0)?["cluster"]["records"].as_u64().unwrap_or(0);
        cluster.join(&["--threads", "1"])?;
        let took = cluster.wait_healthy(Duration::from_secs(60))?;
        let report = bench_report(bench)?;
        let held = cluster.stats(3)?["cluster"]["records"].as_u64().unwrap_or(0);
        let total = cluster.stats(0)?["cluster"]["records"].as_u64().unwrap_or(keys_before).max(1);
        eprintln!(
            "join round {round}: synced after {} ms, holds {held} of {total} keys, {} failed ops",
            took.as_millis(),
            report["errors"]
        );
        joins.push((took.as_secs_f64() * 1000.0, held as f64 / total as f64, crate::number(&report, "errors")));
    }
    println!(
        "join: 4th member counted {:.0} ms after start (median of 3), holding {:.1}% of the keys (RF 3 of 4 members: \
         75% expected); failed operations {:.0} (median)",
        median(joins.iter().map(|j| j.0).collect()),
        100.0 * median(joins.iter().map(|j| j.1).collect()),
        median(joins.iter().map(|j| j.2).collect())
    );
    Ok(())
}
