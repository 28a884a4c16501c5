//! The `cachet` command.
//!
//! This file sets up the allocator and tracing, parses the command line and
//! dispatches to the subcommands, which live with their flags in `cli/`.

mod cli;

use anyhow::Result;
use clap::Parser;
use cli::{Cli, Command, bench, cert, cluster, kv, policy, serve, sim, stats, warm};

/// jemalloc rather than the system allocator: a cache is mostly small
/// allocations of a few sizes, and jemalloc's size classes have no
/// per-allocation header (glibc puts 8 bytes before each and rounds to 16),
/// so an entry of 110 bytes takes 112, not 128. See docs/decisions.md.
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// jemalloc's options, read at its start (a C `const char *`; this build
/// prefixes its symbols with `_rjem_`). A background thread returns freed
/// pages to the system a second after they fall idle, where by default
/// they wait ten seconds for the next allocation that happens to purge:
/// after a load, the slab's and the index's outgrown arrays would stay
/// resident (about 11 bytes per key at 1M keys). Redis runs jemalloc with a
/// background thread too.
#[unsafe(export_name = "_rjem_malloc_conf")]
static JEMALLOC_CONF: &[u8; 68] = b"background_thread:true,max_background_threads:1,dirty_decay_ms:1000\0";

fn main() -> std::process::ExitCode {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .init();
    match run(Cli::parse()) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Sim(args) => sim::run_sim(args),
        Command::Policies => policy::list_bundled(),
        Command::Serve(args) => serve::run_serve(*args),
        Command::Cert(command) => cert::run_cert(command),
        Command::Get { key, client } => kv::get(key, client),
        Command::Set { key, value, ttl, nx, xx, client } => kv::set(key, value, ttl, nx, xx, client),
        Command::Del { keys, client } => kv::del(keys, client),
        Command::Incr { key, by, client } => kv::incr(key, by, client),
        Command::Stats { json, admin } => stats::run_stats(json, admin),
        Command::HotKeys { admin } => stats::run_hot_keys(admin),
        Command::Warm { keys, from_node, admin_token_file, rate, concurrency, quiet, client } => {
            warm::run_warm(keys, from_node, admin_token_file, rate, concurrency, quiet, client)
        }
        Command::Bench(args) => bench::run_bench(*args),
        Command::Policy(command) => policy::run_policy(command),
        Command::Cluster(command) => cluster::run_cluster(command),
    }
}
