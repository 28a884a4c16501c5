//! Origin load with and without Cachet in front, for a Zipf read workload.
//!
//! Phase 1 sends every read straight to PostgreSQL (the query the example
//! `users` loader runs); phase 2 sends the same reads as GETs to a node
//! (started in this process, over real QUIC) whose `user:` namespace loads
//! through that loader. Origin queries are counted by PostgreSQL itself
//! (`pg_stat_statements`). Both phases offer the same read rate (open
//! loop; latency counts from each send). GET latency is split
//! into misses (the first request of a key, which waits for its load or
//! joins it) and hits.
//!
//! `cargo xtask bench-loaders` builds the loader, starts a throw-away
//! PostgreSQL and runs this; by hand:
//! `cargo run --release -p cachet-examples --example loader_bench -- PG_URL LOADER.wasm [SECONDS] [KEYS] [READS_PER_S]`

use anyhow::{Context, Result, bail};
use cachet::loader::{LoaderConfig, Loaders};
use cachet::node::{Node, NodeConfig, NodeOptions, Running};
use cachet::policies::{self, PolicySpec};
use cachet::server::{ServeOptions, tls::TlsSource};
use cachet::wasm::PolicyEngine;
use cachet_client::{Client, ClientConfig};
use hdrhistogram::Histogram;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const CONCURRENCY: usize = 32;
const ZIPF: f64 = 0.99;
const QUERY: &str = "SELECT id::text, name, email FROM users WHERE id = $1";

/// Zipf(s) over 1..=n by inverse CDF; ranks scattered over ids.
struct Zipf {
    cdf: Vec<f64>,
}

impl Zipf {
    fn new(n: usize, s: f64) -> Self {
        let weights: Vec<f64> = (1..=n).map(|r| 1.0 / (r as f64).powf(s)).collect();
        let total: f64 = weights.iter().sum();
        let mut acc = 0.0;
        Self {
            cdf: weights
                .iter()
                .map(|w| {
                    acc += w / total;
                    acc
                })
                .collect(),
        }
    }

    fn sample(&self, state: &mut u64) -> u64 {
        *state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = *state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        let u = (z ^ (z >> 31)) as f64 / u64::MAX as f64;
        let rank = self.cdf.partition_point(|&c| c < u).min(self.cdf.len() - 1) as u64;
        // Scatter ranks over ids so popularity is not id order.
        rank.wrapping_mul(2_654_435_761) % self.cdf.len() as u64 + 1
    }
}

struct Phase {
    ops: u64,
    seconds: f64,
    hits: Histogram<u64>,
    misses: Histogram<u64>,
}

fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 60_000_000, 3)
        .unwrap_or_else(|_| Histogram::new(3).unwrap_or_else(|_| unreachable!()))
}

async fn pg(url: &str) -> Result<tokio_postgres::Client> {
    let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls).await.context("PostgreSQL")?;
    tokio::spawn(connection);
    Ok(client)
}

async fn origin_calls(db: &tokio_postgres::Client) -> Result<i64> {
    let row = db
        .query_one(
            "SELECT coalesce(sum(calls), 0)::bigint FROM pg_stat_statements
             WHERE dbid = (SELECT oid FROM pg_database WHERE datname = current_database())
               AND query LIKE '%FROM users WHERE id%'",
            &[],
        )
        .await?;
    Ok(row.get(0))
}

/// Every read goes to PostgreSQL.
async fn direct(url: &str, zipf: Arc<Zipf>, duration: Duration, period: Duration) -> Result<Phase> {
    let all = Arc::new(Mutex::new(histogram()));
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for t in 0..CONCURRENCY {
        let (zipf, all) = (zipf.clone(), all.clone());
        let db = pg(url).await?;
        tasks.spawn(async move {
            let statement = db.prepare(QUERY).await?;
            let mut local = histogram();
            let mut state = t as u64 * 7919;
            let mut ops = 0u64;
            let mut next = tokio::time::Instant::now();
            while started.elapsed() < duration {
                // Open loop: reads are sent on a schedule, not when the last
                // one returns. Latency counts from the send (the timer's
                // millisecond granularity would swamp it otherwise).
                next += period;
                tokio::time::sleep_until(next).await;
                let id = zipf.sample(&mut state) as i64;
                let at = Instant::now();
                db.query(&statement, &[&id]).await?;
                let _ = local.record(at.elapsed().as_micros() as u64);
                ops += 1;
            }
            if let Ok(mut all) = all.lock() {
                let _ = all.add(&local);
            }
            anyhow::Ok(ops)
        });
    }
    let mut ops = 0;
    while let Some(done) = tasks.join_next().await {
        ops += done??;
    }
    let seconds = started.elapsed().as_secs_f64();
    let hits = all.lock().map_err(|_| anyhow::anyhow!("poisoned"))?.clone();
    Ok(Phase { ops, seconds, hits, misses: histogram() })
}

/// Every read is a GET through the cache.
async fn cached(
    client: Arc<Client>,
    keys: usize,
    zipf: Arc<Zipf>,
    duration: Duration,
    period: Duration,
) -> Result<Phase> {
    let seen: Arc<Vec<AtomicBool>> = Arc::new((0..=keys).map(|_| AtomicBool::new(false)).collect());
    let totals = Arc::new(Mutex::new((histogram(), histogram())));
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for t in 0..CONCURRENCY {
        let (zipf, client, seen, totals) = (zipf.clone(), client.clone(), seen.clone(), totals.clone());
        tasks.spawn(async move {
            let (mut hits, mut misses) = (histogram(), histogram());
            let mut state = t as u64 * 7919;
            let mut ops = 0u64;
            let mut next = tokio::time::Instant::now();
            while started.elapsed() < duration {
                next += period;
                tokio::time::sleep_until(next).await;
                let id = zipf.sample(&mut state);
                let first = !seen[id as usize].swap(true, Ordering::Relaxed);
                let at = Instant::now();
                let value = client.get(format!("user:{id}")).await?;
                if value.is_none() {
                    bail!("user:{id} was not found");
                }
                let micros = at.elapsed().as_micros() as u64;
                let _ = if first { misses.record(micros) } else { hits.record(micros) };
                ops += 1;
            }
            if let Ok(mut totals) = totals.lock() {
                let _ = totals.0.add(&hits);
                let _ = totals.1.add(&misses);
            }
            anyhow::Ok(ops)
        });
    }
    let mut ops = 0;
    while let Some(done) = tasks.join_next().await {
        ops += done??;
    }
    let seconds = started.elapsed().as_secs_f64();
    let (hits, misses) = totals.lock().map_err(|_| anyhow::anyhow!("poisoned"))?.clone();
    Ok(Phase { ops, seconds, hits, misses })
}

/// Write-behind: SETs at the offered rate for `duration`, on ids split
/// between the tasks (so each id's writes come from one task, in order).
/// Returns the SET latency, the deepest the queue got, and the ids' last
/// written names for checking the origin afterwards.
async fn write_behind(
    client: Arc<Client>,
    loaders: Arc<Loaders>,
    keys: usize,
    duration: Duration,
    period: Duration,
) -> Result<(Phase, usize, Vec<(u64, String)>)> {
    let totals = Arc::new(Mutex::new(histogram()));
    let last = Arc::new(Mutex::new(Vec::new()));
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for t in 0..CONCURRENCY as u64 {
        let (client, totals, last) = (client.clone(), totals.clone(), last.clone());
        tasks.spawn(async move {
            let mut local = histogram();
            let mut mine = std::collections::HashMap::new();
            let mut next = tokio::time::Instant::now();
            let mut ops = 0u64;
            while started.elapsed() < duration {
                next += period;
                tokio::time::sleep_until(next).await;
                let id = (ops * CONCURRENCY as u64 + t) % keys as u64 + 1;
                let name = format!("written {ops} by {t}");
                let value = format!(r#"{{"id":{id},"name":"{name}","email":"w{id}@example.org"}}"#);
                let at = Instant::now();
                client.set(format!("user:{id}"), value).await?;
                let _ = local.record(at.elapsed().as_micros() as u64);
                mine.insert(id, name);
                ops += 1;
            }
            if let (Ok(mut totals), Ok(mut last)) = (totals.lock(), last.lock()) {
                let _ = totals.add(&local);
                last.extend(mine);
            }
            anyhow::Ok(ops)
        });
    }
    let mut deepest = 0;
    while !tasks.is_empty() {
        deepest = deepest.max(loaders.write_queue_depth());
        tokio::select! {
            done = tasks.join_next() => {
                if let Some(done) = done {
                    done??;
                }
            }
            _ = tokio::time::sleep(Duration::from_millis(5)) => {}
        }
    }
    let seconds = started.elapsed().as_secs_f64();
    let hits = totals.lock().map_err(|_| anyhow::anyhow!("poisoned"))?.clone();
    let last = last.lock().map_err(|_| anyhow::anyhow!("poisoned"))?.clone();
    Ok((Phase { ops: hits.len(), seconds, hits, misses: histogram() }, deepest, last))
}

/// A node (S3-FIFO, 2 shards) with `loaders`, served over QUIC from this
/// process, and a client of it.
async fn serve(loaders: LoaderConfig, dir: &std::path::Path) -> Result<(Running, Arc<Loaders>, Arc<Client>)> {
    let engine = PolicyEngine::new()?;
    let policy = policies::resolve(&engine, &PolicySpec { name_or_path: "s3fifo".into(), ..PolicySpec::default() })?;
    let mut options = NodeOptions::new(NodeConfig { shards: 2, ..NodeConfig::default() }, policy);
    options.loaders = Some(loaders);
    options.quic = Some(ServeOptions {
        listen: "127.0.0.1:0".parse()?,
        threads: 1,
        tls: TlsSource::DevCa { data_dir: dir.to_path_buf() },
        max_connections: 100,
        max_streams: 64,
        max_frame: 2 << 20,
        idle_timeout: Duration::from_secs(60),
        clients: Default::default(),
    });
    let running = Node::start(options)?;
    let loaders = running.node().loaders().context("the node has no loaders")?;
    let addr = running.quic_addr().context("no QUIC port")?;
    let client = Arc::new(Client::connect(ClientConfig::new(addr).with_data_dir(dir)?).await?);
    Ok((running, loaders, client))
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (Some(url), Some(loader)) = (args.first(), args.get(1)) else {
        bail!("usage: loader_bench PG_URL LOADER.wasm [SECONDS] [KEYS] [READS_PER_S]");
    };
    let seconds: u64 = args.get(2).map_or(Ok(10), |s| s.parse()).context("SECONDS")?;
    let keys: usize = args.get(3).map_or(Ok(100_000), |s| s.parse()).context("KEYS")?;
    let rate: u64 = args.get(4).map_or(Ok(5_000), |s| s.parse()).context("READS_PER_S")?;
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build()?;
    runtime.block_on(run(url, loader, Duration::from_secs(seconds), keys, rate))
}

async fn run(admin_url: &str, loader: &str, duration: Duration, keys: usize, rate: u64) -> Result<()> {
    // Each task offers its share of the rate.
    let period = Duration::from_nanos(1_000_000_000 * CONCURRENCY as u64 / rate.max(1));
    let admin = pg(admin_url).await?;
    admin.batch_execute("DROP DATABASE IF EXISTS cachet_loader_bench").await?;
    admin.batch_execute("CREATE DATABASE cachet_loader_bench").await?;
    let url = format!("{admin_url} dbname=cachet_loader_bench");
    let db = pg(&url).await?;
    db.batch_execute(&format!(
        "CREATE EXTENSION IF NOT EXISTS pg_stat_statements;
         CREATE TABLE users (id bigint PRIMARY KEY, name text NOT NULL, email text NOT NULL);
         INSERT INTO users SELECT g, 'user ' || g, 'u' || g || '@example.org' FROM generate_series(1, {keys}) g;
         ANALYZE users;"
    ))
    .await?;
    let zipf = Arc::new(Zipf::new(keys, ZIPF));

    db.batch_execute("SELECT pg_stat_statements_reset()").await?;
    let direct = direct(&url, zipf.clone(), duration, period).await?;
    let direct_calls = origin_calls(&db).await?;

    let dir = std::env::temp_dir().join(format!("cachet-loader-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let config_path = dir.join("loaders.toml");
    std::fs::write(
        &config_path,
        format!(
            "seed = 1\n[origins.users-db]\npostgres = \"{url}\"\npool-size = 8\n\
             [[namespace]]\nprefix = \"user:\"\nmodule = \"{loader}\"\norigins = [\"users-db\"]\nttl-ms = 600000\n"
        ),
    )?;
    let (server, _, client) = serve(LoaderConfig::load(&config_path)?, &dir).await?;
    db.batch_execute("SELECT pg_stat_statements_reset()").await?;
    let cached = cached(client, keys, zipf, duration, period).await?;
    let cached_calls = origin_calls(&db).await?;
    server.shutdown();

    // Write-behind on a second node: the same namespace, written to.
    std::fs::write(
        &config_path,
        format!(
            "seed = 1\n[origins.users-db]\npostgres = \"{url}\"\npool-size = 8\n\
             [[namespace]]\nprefix = \"user:\"\nmodule = \"{loader}\"\norigins = [\"users-db\"]\n\
             ttl-ms = 600000\nwrite = \"behind\"\nwrite-queue = 100000\n"
        ),
    )?;
    let (server, loaders, client) = serve(LoaderConfig::load(&config_path)?, &dir).await?;
    let (writes, deepest, last) = write_behind(client, loaders.clone(), keys, duration / 2, period * 2).await?;
    let drain = Instant::now();
    while loaders.write_queue_depth() > 0 {
        if drain.elapsed() > Duration::from_secs(120) {
            bail!("the write-behind queue did not drain");
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let drain_ms = drain.elapsed().as_millis();
    let lag = loaders.write_lag();
    let mut lost = 0;
    for (id, name) in &last {
        let row = db.query_one("SELECT name FROM users WHERE id = $1", &[&(*id as i64)]).await?;
        if row.get::<_, String>(0) != *name {
            lost += 1;
        }
    }
    server.shutdown();
    let _ = std::fs::remove_dir_all(&dir);

    let q = |h: &Histogram<u64>, p: f64| h.value_at_quantile(p);
    println!(
        "{{\"keys\":{keys},\"zipf\":{ZIPF},\"concurrency\":{CONCURRENCY},\"offered_per_s\":{rate},\"seconds\":{:.1},",
        duration.as_secs_f64()
    );
    println!(
        " \"direct\":{{\"reads_per_s\":{:.0},\"origin_queries_per_s\":{:.0},\"p50_us\":{},\"p99_us\":{}}},",
        direct.ops as f64 / direct.seconds,
        direct_calls as f64 / direct.seconds,
        q(&direct.hits, 0.5),
        q(&direct.hits, 0.99)
    );
    println!(
        " \"cached\":{{\"reads_per_s\":{:.0},\"origin_queries_per_s\":{:.0},\"origin_queries\":{cached_calls},\
         \"hit_ratio\":{:.4},\"hit_p50_us\":{},\"hit_p99_us\":{},\"miss_p50_us\":{},\"miss_p99_us\":{}}},",
        cached.ops as f64 / cached.seconds,
        cached_calls as f64 / cached.seconds,
        cached.hits.len() as f64 / cached.ops.max(1) as f64,
        q(&cached.hits, 0.5),
        q(&cached.hits, 0.99),
        q(&cached.misses, 0.5),
        q(&cached.misses, 0.99)
    );
    println!(
        " \"write_behind\":{{\"sets_per_s\":{:.0},\"set_p50_us\":{},\"set_p99_us\":{},\"lag_p50_us\":{},\
         \"lag_p99_us\":{},\"lag_max_us\":{},\"deepest_queue\":{deepest},\"drain_ms\":{drain_ms},\
         \"keys_checked\":{},\"lost\":{lost}}}}}",
        writes.ops as f64 / writes.seconds,
        q(&writes.hits, 0.5),
        q(&writes.hits, 0.99),
        lag.quantile_bound_ns(0.5) / 1_000,
        lag.quantile_bound_ns(0.99) / 1_000,
        lag.quantile_bound_ns(1.0) / 1_000,
        last.len()
    );
    Ok(())
}
