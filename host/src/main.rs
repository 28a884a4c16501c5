//! The `cachet` command.

use anyhow::{Context, Result, bail};
use cachet::policies::{self, PolicySpec};
use cachet::sim::{self, SimOptions, SimReport};
use cachet::wasm::{Limits, PolicyEngine};
use clap::{Parser, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};
use std::io::IsTerminal;
use std::path::PathBuf;

#[derive(Parser)]
#[command(name = "cachet", version, about = "A programmable cache: eviction policies as sandboxed Wasm")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Replay a trace through a shard and policy; print hit and miss counts.
    Sim(SimArgs),
    /// List the bundled policies.
    Policies,
}

#[derive(clap::Args)]
struct SimArgs {
    /// Trace file: CSV `timestamp,key,size`, plain, .gz or .xz.
    #[arg(long)]
    trace: PathBuf,
    /// A bundled policy name, or the path of a policy component (.wasm).
    #[arg(long, default_value = policies::DEFAULT_POLICY)]
    policy: String,
    /// Capacity in objects.
    #[arg(long)]
    capacity: Option<u64>,
    /// Capacity in bytes (objects count their trace size).
    #[arg(long)]
    capacity_bytes: Option<u64>,
    /// Run the bundled policy's crate natively (to measure the Wasm cost).
    #[arg(long)]
    native: bool,
    /// Policy setting, repeatable.
    #[arg(long = "config", value_name = "KEY=VALUE")]
    config: Vec<String>,
    /// Seed for policies that use randomness.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Fuel per policy call (Wasm only).
    #[arg(long, default_value_t = Limits::default().fuel_per_call)]
    fuel_per_call: u64,
    /// Base memory cap per policy instance in bytes, plus 128 bytes per
    /// entry of capacity (Wasm only).
    #[arg(long, default_value_t = Limits::default().max_memory_bytes)]
    max_policy_memory: usize,
    /// Print one JSON object as the last line.
    #[arg(long)]
    json: bool,
}

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
        Command::Sim(args) => run_sim(args),
        Command::Policies => {
            for name in policies::bundled_names() {
                println!("{name}");
            }
            Ok(())
        }
    }
}

fn parse_config(pairs: &[String]) -> Result<Vec<(String, String)>> {
    pairs
        .iter()
        .map(|pair| match pair.split_once('=') {
            Some((k, v)) if !k.is_empty() => Ok((k.to_string(), v.to_string())),
            _ => bail!("--config expects KEY=VALUE, got `{pair}`"),
        })
        .collect()
}

fn progress_bar(len: Option<u64>, what: &str) -> ProgressBar {
    if !std::io::stderr().is_terminal() {
        return ProgressBar::hidden();
    }
    let bar = match len {
        Some(len) => ProgressBar::new(len).with_style(
            ProgressStyle::with_template("{msg} [{bar:40}] {pos}/{len} ({per_sec})")
                .unwrap_or_else(|_| ProgressStyle::default_bar()),
        ),
        None => ProgressBar::new_spinner(),
    };
    bar.with_message(what.to_string())
}

fn run_sim(args: SimArgs) -> Result<()> {
    let options = SimOptions {
        trace: args.trace.clone(),
        policy: PolicySpec {
            name_or_path: args.policy.clone(),
            native: args.native,
            config: parse_config(&args.config)?,
            limits: Limits {
                fuel_per_call: args.fuel_per_call,
                max_memory_bytes: args.max_policy_memory,
                ..Limits::default()
            },
        },
        capacity: args.capacity,
        capacity_bytes: args.capacity_bytes,
        seed: args.seed,
    };
    let engine = PolicyEngine::new()?;
    let bar = progress_bar(None, "reading trace");
    let requests = sim::load_trace(&args.trace, |n| bar.set_position(n))?;
    bar.finish_and_clear();
    let bar = progress_bar(Some(requests.len() as u64), "replaying");
    let report = sim::replay(&engine, &options, &requests, |n| bar.set_position(n))
        .with_context(|| format!("simulating {}", args.trace.display()))?;
    bar.finish_and_clear();
    print_report(&report);
    if args.json {
        println!("{}", serde_json::to_string(&report)?);
    }
    Ok(())
}

fn print_report(r: &SimReport) {
    let capacity = match (r.capacity, r.capacity_bytes) {
        (Some(n), None) => format!("{n} objects"),
        (None, Some(b)) => format!("{b} bytes"),
        (Some(n), Some(b)) => format!("{n} objects / {b} bytes"),
        (None, None) => "unbounded".into(),
    };
    println!("policy          {} {} ({})", r.policy, r.policy_version, r.runtime);
    println!("capacity        {capacity}");
    println!("requests        {}", r.requests);
    println!("hits / misses   {} / {}", r.hits, r.misses);
    println!("miss ratio      {:.4}", r.miss_ratio);
    println!("evictions       {}", r.evictions);
    println!("replay rate     {:.0} requests/s", r.requests_per_sec);
    println!("policy faults   {}", r.policy_faults);
}
