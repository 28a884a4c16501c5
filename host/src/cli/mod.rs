//! The `cachet` command line: the clap definitions of the command and its
//! subcommands, one module per subcommand (or family of them), and the
//! helpers they share.
//!
//! Where a subcommand lives: `serve` in `serve.rs`; `get`, `set`, `del` and
//! `incr` in `kv.rs`; `stats` and `hot-keys` in `stats.rs`; `warm` in
//! `warm.rs`; `policy ...` and `policies` in `policy.rs`; `bench` in
//! `bench.rs`; `sim` in `sim.rs`; `cert ...` in `cert.rs`; `cluster ...`
//! in `cluster.rs`; the flags every
//! client command takes (`--server`, `--ca`, the admin token) in
//! `client_args.rs`.

pub(super) mod bench;
pub(super) mod cert;
mod client_args;
pub(super) mod cluster;
pub(super) mod kv;
pub(super) mod policy;
pub(super) mod serve;
pub(super) mod sim;
pub(super) mod stats;
pub(super) mod warm;

use anyhow::Result;
use bench::BenchArgs;
use cert::CertCommand;
use clap::{Parser, Subcommand};
use client_args::{AdminArgs, ClientArgs};
use policy::PolicyCommand;
use serve::ServeArgs;
use sim::SimArgs;
use std::net::SocketAddr;
use std::path::PathBuf;

#[derive(Parser)]
#[command(name = "cachet", version, about = "A programmable cache: eviction policies as sandboxed Wasm")]
pub(crate) struct Cli {
    #[command(subcommand)]
    pub(crate) command: Command,
}

#[derive(Subcommand)]
pub(crate) enum Command {
    /// Replay a trace through a shard and policy; print hit and miss counts.
    Sim(SimArgs),
    /// List the bundled policies.
    Policies,
    /// Run a cache node serving `cachet/1` over QUIC.
    Serve(Box<ServeArgs>),
    /// Read a key; prints the value, or exits 1 with nothing on stdout on a miss.
    Get {
        /// The key.
        key: String,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Write a key.
    Set {
        /// The key.
        key: String,
        /// The value.
        value: String,
        /// Time to live in seconds.
        #[arg(long)]
        ttl: Option<f64>,
        /// Only if the key is absent.
        #[arg(long, conflicts_with = "xx")]
        nx: bool,
        /// Only if the key is present.
        #[arg(long)]
        xx: bool,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Delete keys; prints how many existed.
    Del {
        /// The keys.
        #[arg(required = true)]
        keys: Vec<String>,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Add to a decimal integer value (0 when absent); prints the result.
    /// On a cluster it runs at the key's primary owner, one at a time.
    Incr {
        /// The key.
        key: String,
        /// The amount (negative to decrement).
        #[arg(default_value_t = 1, allow_negative_numbers = true)]
        by: i64,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Fill a node by GETting a key list at a bounded rate, so each missing
    /// key is loaded by its namespace's loader without stampeding the
    /// origin (at most --rate loads start per second).
    Warm {
        /// File with one key per line.
        #[arg(long, conflicts_with = "from_node", required_unless_present = "from_node")]
        keys: Option<PathBuf>,
        /// Take the hot keys of this node (trusted like --server); needs
        /// that node's admin token, as hot keys are key bytes.
        #[arg(long)]
        from_node: Option<SocketAddr>,
        /// File holding --from-node's admin token [default:
        /// $CACHET_ADMIN_TOKEN].
        #[arg(long, requires = "from_node")]
        admin_token_file: Option<PathBuf>,
        /// Keys started per second (an upper bound on origin queries).
        #[arg(long, default_value_t = 100)]
        rate: u32,
        /// GETs outstanding at once.
        #[arg(long, default_value_t = 16)]
        concurrency: usize,
        /// No progress bar.
        #[arg(long)]
        quiet: bool,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Print the node's hottest keys, one per line (a key list for `warm`;
    /// admin token required, as they are key bytes).
    HotKeys {
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// Print the node's counters; its hot keys too when given the admin
    /// token.
    Stats {
        /// As one JSON object.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// Load-test a node.
    Bench(Box<BenchArgs>),
    /// Live policy operations on a node: load, activate, rollback, list,
    /// shadow (admin token required).
    #[command(subcommand)]
    Policy(PolicyCommand),
    /// Certificates for running a cluster on a CA of its own.
    #[command(subcommand)]
    Cert(CertCommand),
    /// Membership operations on a running cluster (admin token required).
    #[command(subcommand)]
    Cluster(cluster::ClusterCommand),
}

fn block_on<F: Future<Output = Result<()>>>(future: F) -> Result<()> {
    tokio::runtime::Builder::new_current_thread().enable_all().build()?.block_on(future)
}

fn cores() -> usize {
    std::thread::available_parallelism().map(usize::from).unwrap_or(1)
}
