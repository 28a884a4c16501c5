//! `cachet bench`: load-test a node, or a cluster's members, over QUIC or
//! RESP.

use super::client_args::ClientArgs;
use super::cores;
use anyhow::Result;
use cachet::bench::{self, BenchOptions, BenchReport};
use cachet_client::ClientConfig;
use std::net::SocketAddr;
use std::time::Duration;

#[derive(clap::Args)]
pub(crate) struct BenchArgs {
    #[command(flatten)]
    client: ClientArgs,
    /// Measured seconds.
    #[arg(long, default_value_t = 10.0)]
    duration: f64,
    /// QUIC connections.
    #[arg(long, default_value_t = 50)]
    connections: usize,
    /// Requests in flight over all connections.
    #[arg(long, default_value_t = 200)]
    concurrency: usize,
    /// Distinct keys, all preloaded.
    #[arg(long, default_value_t = 100_000)]
    keys: u64,
    /// Value size in bytes.
    #[arg(long, default_value_t = 100)]
    value_size: usize,
    /// Share of GETs (the rest are SETs).
    #[arg(long, default_value_t = 0.9)]
    get_ratio: f64,
    /// Zipf exponent for key popularity (uniform without it).
    #[arg(long)]
    zipf: Option<f64>,
    /// Open-loop rate in requests per second (closed loop without it).
    #[arg(long)]
    rate: Option<f64>,
    /// Load threads [default: cores].
    #[arg(long)]
    threads: Option<usize>,
    /// Report this server process's CPU microseconds per request.
    #[arg(long)]
    server_pid: Option<u32>,
    /// Print one JSON object as the last line.
    #[arg(long)]
    json: bool,
    /// Skip writing every key first (an earlier run already did).
    #[arg(long)]
    no_preload: bool,
    /// `quic` (cachet/1 through the SDK) or `resp` (RESP over TCP to
    /// --server: redis-server or a node's --resp-listen port).
    #[arg(long, default_value = "quic")]
    protocol: bench::Protocol,
    /// RESP: commands per batch on each connection.
    #[arg(long, default_value_t = 1)]
    pipeline: usize,
    /// Client addresses of cluster members to spread the load over, with
    /// the cluster SDK's retries (instead of --server alone).
    #[arg(long, value_delimiter = ',')]
    cluster_members: Vec<SocketAddr>,
}

pub(crate) fn run_bench(args: BenchArgs) -> Result<()> {
    let client = match args.protocol {
        // Plain TCP: no certificates to find.
        bench::Protocol::Resp => ClientConfig::new(args.client.server),
        bench::Protocol::Quic => args.client.config()?,
    };
    let options = BenchOptions {
        client: client.clone(),
        duration: Duration::from_secs_f64(args.duration),
        connections: args.connections,
        concurrency: args.concurrency,
        keys: args.keys,
        value_size: args.value_size,
        get_ratio: args.get_ratio,
        zipf: args.zipf,
        rate: args.rate,
        threads: args.threads.unwrap_or_else(cores),
        server_pid: args.server_pid,
        preload: !args.no_preload,
        protocol: args.protocol,
        pipeline: args.pipeline,
        cluster: args
            .cluster_members
            .iter()
            .map(|addr| {
                let mut config = client.clone();
                config.server = *addr;
                config
            })
            .collect(),
        consistency: args.client.consistency,
    };
    let report: BenchReport = bench::run(&options)?;
    println!(
        "mode          {} loop{}",
        report.mode,
        report.target_rate.map(|r| format!(" at {r:.0} req/s")).unwrap_or_default()
    );
    println!("ops           {} ({:.0} ops/s), {} errors", report.ops, report.ops_per_sec, report.errors);
    println!(
        "latency us    p50 {:.0}  p99 {:.0}  p99.9 {:.0}  max {:.0}",
        report.p50_us, report.p99_us, report.p999_us, report.max_us
    );
    println!("hit ratio     {:.4}", report.hit_ratio);
    if let Some(cpu) = report.server_cpu_us_per_op {
        println!("server CPU    {cpu:.2} us/op");
    }
    if args.json {
        println!("{}", serde_json::to_string(&report)?);
    }
    Ok(())
}
