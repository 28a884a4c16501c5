//! `cachet bench`: a load generator for a node, built on the client SDK.
//!
//! One OS thread per core, each with a current-thread runtime and its share
//! of the connections; each connection runs `concurrency / connections`
//! request loops, pipelined on the connection's streams. Closed loop by
//! default; with a rate, open loop, where each request has an intended send
//! time and latency is measured from it, so a stalled server shows up as
//! latency instead of silently lowering the load (no coordinated omission).
//!
//! Against a cluster (`--cluster-members`), each "connection" is a
//! [`ClusterClient`] over every member, with its retries: what an
//! application sees, failovers included.

mod resp;

use bytes::Bytes;
use cachet_client::{Client, ClientConfig, ClientError, ClusterClient, Consistency, RetryPolicy};
use cachet_policy_sdk::rng::SplitMix64;
use hdrhistogram::Histogram;
use serde::Serialize;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// What to run.
#[derive(Clone, Debug)]
pub struct BenchOptions {
    /// How to reach the node.
    pub client: ClientConfig,
    /// Measured time.
    pub duration: Duration,
    /// QUIC connections.
    pub connections: usize,
    /// Requests in flight, over all connections.
    pub concurrency: usize,
    /// Distinct keys (all preloaded).
    pub keys: u64,
    /// Value size in bytes.
    pub value_size: usize,
    /// Share of GETs (the rest are SETs).
    pub get_ratio: f64,
    /// Zipf exponent for key choice; uniform when `None`.
    pub zipf: Option<f64>,
    /// Open-loop target rate, requests per second.
    pub rate: Option<f64>,
    /// OS threads driving the load.
    pub threads: usize,
    /// Server process whose CPU time to report per request.
    pub server_pid: Option<u32>,
    /// Write every key before measuring (off when an earlier run did).
    pub preload: bool,
    /// Which protocol to drive: `cachet/1` over QUIC, or RESP over TCP
    /// (redis-server or Cachet's RESP port at `client.server`).
    pub protocol: Protocol,
    /// RESP only: commands per batch on each connection (closed loop);
    /// in flight = connections × pipeline.
    pub pipeline: usize,
    /// Cluster members to spread the load over, through the cluster SDK
    /// (retries included); empty: the single node of `client`.
    pub cluster: Vec<ClientConfig>,
    /// Consistency to ask a cluster for (its default when `None`).
    pub consistency: Option<Consistency>,
}

/// Where requests go: one node, or a cluster through its SDK.
#[derive(Clone)]
enum Target {
    Node(Client),
    Cluster(ClusterClient),
}

impl Target {
    /// Connects on `endpoint` when given (one socket for a thread's
    /// connections, like an application's pool), else on a socket of its
    /// own.
    async fn connect(options: &BenchOptions, endpoint: Option<&quinn::Endpoint>) -> Result<Self, ClientError> {
        if options.cluster.is_empty() {
            let client = match endpoint {
                Some(endpoint) => Client::connect_on(endpoint, options.client.clone()).await?,
                None => Client::connect(options.client.clone()).await?,
            };
            return Ok(Self::Node(match options.consistency {
                Some(level) => client.at(level),
                None => client,
            }));
        }
        let cluster = ClusterClient::new(options.cluster.clone(), RetryPolicy::default())?;
        Ok(Self::Cluster(match options.consistency {
            Some(level) => cluster.at(level),
            None => cluster,
        }))
    }

    async fn get(&self, key: &[u8]) -> Result<Option<Bytes>, ClientError> {
        match self {
            Self::Node(c) => c.get(key).await,
            Self::Cluster(c) => c.get(key).await,
        }
    }

    async fn set(&self, key: &[u8], value: Bytes) -> Result<(), ClientError> {
        match self {
            Self::Node(c) => c.set(key, value).await,
            Self::Cluster(c) => c.set(key, value).await,
        }
    }
}

/// The wire protocol a benchmark speaks.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    /// `cachet/1` over QUIC, through the client SDK.
    #[default]
    Quic,
    /// RESP2 over TCP.
    Resp,
}

impl std::str::FromStr for Protocol {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "quic" => Ok(Self::Quic),
            "resp" => Ok(Self::Resp),
            other => Err(format!("unknown protocol `{other}`: quic or resp")),
        }
    }
}

/// What happened.
#[derive(Clone, Debug, Serialize)]
pub struct BenchReport {
    /// Requests completed in the measured time.
    pub ops: u64,
    /// ops / seconds.
    pub ops_per_sec: f64,
    /// Failed requests.
    pub errors: u64,
    /// Latency percentiles in microseconds.
    pub p50_us: f64,
    /// 99th percentile.
    pub p99_us: f64,
    /// 99.9th percentile.
    pub p999_us: f64,
    /// Worst.
    pub max_us: f64,
    /// GET hits over GETs.
    pub hit_ratio: f64,
    /// Server CPU (user + system) per request, when `--server-pid` is given.
    pub server_cpu_us_per_op: Option<f64>,
    /// `closed` or `open`.
    pub mode: &'static str,
    /// Target rate in open-loop mode.
    pub target_rate: Option<f64>,
}

/// A benchmark that could not run.
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    /// Connecting or preloading failed.
    #[error(transparent)]
    Client(#[from] ClientError),
    /// Bad options.
    #[error("{0}")]
    Options(String),
}

/// Draws key indices, uniformly or Zipf-distributed (by inverted CDF).
struct Keys {
    cdf: Option<Arc<Vec<f64>>>,
    n: u64,
}

impl Keys {
    fn new(n: u64, zipf: Option<f64>) -> Self {
        let cdf = zipf.map(|s| {
            let weights: Vec<f64> = (1..=n).map(|rank| 1.0 / (rank as f64).powf(s)).collect();
            let total: f64 = weights.iter().sum();
            let mut acc = 0.0;
            Arc::new(
                weights
                    .into_iter()
                    .map(|w| {
                        acc += w / total;
                        acc
                    })
                    .collect(),
            )
        });
        Self { cdf, n }
    }

    fn pick(&self, rng: &mut SplitMix64) -> u64 {
        match &self.cdf {
            None => rng.below(self.n),
            Some(cdf) => {
                let u = rng.next_u64() as f64 / u64::MAX as f64;
                (cdf.partition_point(|&c| c < u) as u64).min(self.n - 1)
            }
        }
    }
}

fn key(i: u64) -> String {
    format!("key:{i}")
}

/// CPU time (user + system) of `pid` in microseconds, from /proc.
pub fn process_cpu_us(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name, which is in parentheses and may hold spaces.
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    // /proc reports clock ticks of USER_HZ, which Linux fixes at 100.
    Some((utime + stime) * 10_000)
}

struct ThreadResult {
    histogram: Histogram<u64>,
    ops: u64,
    errors: u64,
    gets: u64,
    hits: u64,
}

/// Preloads the keys, runs the load and reports.
pub fn run(options: &BenchOptions) -> Result<BenchReport, BenchError> {
    if options.keys == 0 || options.connections == 0 || options.concurrency < options.connections {
        return Err(BenchError::Options("need keys > 0 and concurrency >= connections > 0".into()));
    }
    if options.protocol == Protocol::Resp && options.rate.is_some() && options.pipeline > 1 {
        return Err(BenchError::Options(
            "--pipeline is for the closed loop; an open-loop RESP run pipelines what queues up".into(),
        ));
    }
    let value = Bytes::from(vec![b'x'; options.value_size]);
    if options.preload {
        match options.protocol {
            Protocol::Quic => preload(options, value.clone())?,
            Protocol::Resp => resp::preload(options, &value)?,
        }
    }
    let keys = Arc::new(Keys::new(options.keys, options.zipf));
    let threads = options.threads.clamp(1, options.connections);
    let cpu_before = options.server_pid.and_then(process_cpu_us);
    let start = Instant::now() + Duration::from_millis(200);
    let handles: Vec<_> = (0..threads)
        .map(|t| {
            let (options, keys, value) = (options.clone(), keys.clone(), value.clone());
            std::thread::spawn(move || match options.protocol {
                Protocol::Quic => run_thread(t, threads, &options, &keys, value, start),
                Protocol::Resp => match options.rate {
                    None => resp::run_thread(t, threads, &options, &keys, start),
                    Some(rate) => resp::run_thread_open(t, threads, &options, rate, &keys, start),
                },
            })
        })
        .collect();
    let mut total = ThreadResult::new();
    for handle in handles {
        total.merge(&handle.join().map_err(|_| BenchError::Options("a load thread panicked".into()))??)?;
    }
    let cpu_after = options.server_pid.and_then(process_cpu_us);
    let secs = options.duration.as_secs_f64();
    let h = &total.histogram;
    Ok(BenchReport {
        ops: total.ops,
        ops_per_sec: total.ops as f64 / secs,
        errors: total.errors,
        p50_us: h.value_at_quantile(0.5) as f64,
        p99_us: h.value_at_quantile(0.99) as f64,
        p999_us: h.value_at_quantile(0.999) as f64,
        max_us: h.max() as f64,
        hit_ratio: if total.gets == 0 { 0.0 } else { total.hits as f64 / total.gets as f64 },
        server_cpu_us_per_op: match (cpu_before, cpu_after) {
            (Some(a), Some(b)) if total.ops > 0 => Some((b - a) as f64 / total.ops as f64),
            _ => None,
        },
        mode: if options.rate.is_some() { "open" } else { "closed" },
        target_rate: options.rate,
    })
}

fn new_histogram() -> Histogram<u64> {
    // 1 µs to 60 s at 3 significant digits: constant, valid bounds.
    Histogram::new_with_bounds(1, 60_000_000, 3).expect("constant histogram bounds are valid")
}

fn runtime() -> Result<tokio::runtime::Runtime, BenchError> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| BenchError::Options(format!("cannot start a runtime: {e}")))
}

fn preload(options: &BenchOptions, value: Bytes) -> Result<(), BenchError> {
    runtime()?.block_on(async {
        let client = Target::connect(options, None).await?;
        let workers = options.concurrency.clamp(1, 64) as u64;
        let tasks: Vec<_> = (0..workers)
            .map(|w| {
                let (client, value, n) = (client.clone(), value.clone(), options.keys);
                tokio::spawn(async move {
                    let mut i = w;
                    while i < n {
                        client.set(key(i).as_bytes(), value.clone()).await?;
                        i += workers;
                    }
                    Ok::<_, ClientError>(())
                })
            })
            .collect();
        for task in tasks {
            task.await.map_err(|e| BenchError::Options(e.to_string()))??;
        }
        Ok(())
    })
}

/// Waits until `at` with better than the timer wheel's 1 ms resolution:
/// sleeps to within a millisecond, then yields until the instant passes.
/// Without this, every open-loop request would start up to 1 ms late and
/// that delay would be reported as server latency.
async fn pace_until(at: Instant) {
    let coarse = at.checked_sub(Duration::from_millis(1)).unwrap_or(at);
    if coarse > Instant::now() {
        tokio::time::sleep_until(coarse.into()).await;
    }
    while Instant::now() < at {
        tokio::task::yield_now().await;
    }
}

/// One request of the mix; returns whether it was a GET and, if it
/// succeeded, whether it hit.
async fn one_request(
    client: &Target,
    keys: &Keys,
    rng: &mut SplitMix64,
    value: &Bytes,
    get_ratio: f64,
) -> (bool, Result<bool, ClientError>) {
    let k = key(keys.pick(rng));
    let is_get = (rng.next_u64() as f64 / u64::MAX as f64) < get_ratio;
    let outcome = if is_get {
        client.get(k.as_bytes()).await.map(|v| v.is_some())
    } else {
        client.set(k.as_bytes(), value.clone()).await.map(|()| false)
    };
    (is_get, outcome)
}

impl ThreadResult {
    fn new() -> Self {
        Self { histogram: new_histogram(), ops: 0, errors: 0, gets: 0, hits: 0 }
    }

    fn record(&mut self, since: Instant, is_get: bool, outcome: Result<bool, ClientError>) {
        let (ok, hit) = match outcome {
            Ok(hit) => (true, hit),
            Err(_) => (false, false),
        };
        self.record_outcome(since, is_get, ok, hit);
    }

    /// Counts one request sent at `since`: answered (`ok`) or failed, and
    /// for a GET whether it hit.
    fn record_outcome(&mut self, since: Instant, is_get: bool, ok: bool, hit: bool) {
        self.histogram.saturating_record((since.elapsed().as_micros() as u64).max(1));
        if ok {
            self.ops += 1;
            if is_get {
                self.gets += 1;
                self.hits += u64::from(hit);
            }
        } else {
            self.errors += 1;
        }
    }

    fn merge(&mut self, other: &Self) -> Result<(), BenchError> {
        self.histogram.add(&other.histogram).map_err(|e| BenchError::Options(e.to_string()))?;
        self.ops += other.ops;
        self.errors += other.errors;
        self.gets += other.gets;
        self.hits += other.hits;
        Ok(())
    }
}

fn run_thread(
    thread: usize,
    threads: usize,
    options: &BenchOptions,
    keys: &Arc<Keys>,
    value: Bytes,
    start: Instant,
) -> Result<ThreadResult, BenchError> {
    let connections = (thread..options.connections).step_by(threads).count();
    runtime()?.block_on(async {
        // The thread's connections share one socket: its receive calls
        // take many connections' datagrams at once, where 50 sockets would
        // each wake the thread for one.
        let endpoint = Client::endpoint_for(options.client.server)?;
        let mut clients = Vec::new();
        for _ in 0..connections {
            clients.push(Target::connect(options, Some(&endpoint)).await?);
        }
        match options.rate {
            None => closed_loop(thread, options, &clients, keys, value, start).await,
            Some(rate) => open_loop(thread, threads, options, rate, &clients, keys, value, start).await,
        }
    })
}

/// `concurrency / connections` loops per connection, each sending its next
/// request as soon as the last one is answered.
async fn closed_loop(
    thread: usize,
    options: &BenchOptions,
    clients: &[Target],
    keys: &Arc<Keys>,
    value: Bytes,
    start: Instant,
) -> Result<ThreadResult, BenchError> {
    let end = start + options.duration;
    let loops = clients.len() * (options.concurrency / options.connections);
    let mut tasks = Vec::new();
    for l in 0..loops {
        let client = clients[l % clients.len()].clone();
        let (keys, value, get_ratio) = (keys.clone(), value.clone(), options.get_ratio);
        let seed = ((thread as u64) << 32 | l as u64) ^ 0x9E37_79B9;
        tasks.push(tokio::spawn(async move {
            let mut rng = SplitMix64::new(seed);
            let mut result = ThreadResult::new();
            tokio::time::sleep_until(start.into()).await;
            loop {
                let sent = Instant::now();
                if sent >= end {
                    break;
                }
                let (is_get, outcome) = one_request(&client, &keys, &mut rng, &value, get_ratio).await;
                result.record(sent, is_get, outcome);
            }
            result
        }));
    }
    let mut total = ThreadResult::new();
    for task in tasks {
        total.merge(&task.await.map_err(|e| BenchError::Options(e.to_string()))?)?;
    }
    Ok(total)
}

/// One pacer per thread starts each request at its intended time, whether
/// or not earlier ones are answered; latency counts from the intended time.
#[allow(clippy::too_many_arguments)]
async fn open_loop(
    thread: usize,
    threads: usize,
    options: &BenchOptions,
    rate: f64,
    clients: &[Target],
    keys: &Arc<Keys>,
    value: Bytes,
    start: Instant,
) -> Result<ThreadResult, BenchError> {
    let end = start + options.duration;
    let interval = Duration::from_secs_f64(threads as f64 / rate);
    // Threads interleave their schedules instead of firing together.
    let mut intended = start + interval.mul_f64(thread as f64 / threads as f64);
    let result = Arc::new(std::sync::Mutex::new(ThreadResult::new()));
    let mut rng = SplitMix64::new((thread as u64) ^ 0x0123_4567_89AB_CDEF);
    let mut in_flight = tokio::task::JoinSet::new();
    let mut n = 0usize;
    while intended < end {
        pace_until(intended).await;
        let client = clients[n % clients.len()].clone();
        let (keys, value, result, get_ratio) = (keys.clone(), value.clone(), result.clone(), options.get_ratio);
        let mut task_rng = SplitMix64::new(rng.next_u64());
        let sent = intended;
        in_flight.spawn(async move {
            let (is_get, outcome) = one_request(&client, &keys, &mut task_rng, &value, get_ratio).await;
            if let Ok(mut r) = result.lock() {
                r.record(sent, is_get, outcome);
            }
        });
        while in_flight.try_join_next().is_some() {}
        n += 1;
        intended += interval;
    }
    while in_flight.join_next().await.is_some() {}
    let mut total = ThreadResult::new();
    if let Ok(r) = result.lock() {
        total.merge(&r)?;
    }
    Ok(total)
}
