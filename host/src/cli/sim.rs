//! `cachet sim`: replay a trace through one or more policies at one size or
//! a sweep of sizes; print a report or a miss-ratio table, and optionally
//! plot the runs.

use super::policy::parse_config;
use anyhow::{Context, Result, bail};
use cachet::plot;
use cachet::policies::{self, PolicySpec};
use cachet::sim::{self, SimOptions, SimReport};
use cachet::wasm::{Limits, PolicyEngine};
use indicatif::{ProgressBar, ProgressStyle};
use std::io::IsTerminal;
use std::path::PathBuf;

#[derive(clap::Args)]
pub(crate) struct SimArgs {
    /// Trace file, plain, .gz or .xz: CSV `timestamp,key,size`, or by its
    /// name libCacheSim's `*.oracleGeneral*` or Caffeine's `*.trace`.
    #[arg(long)]
    trace: PathBuf,
    /// A bundled policy name, or the path of a policy component (.wasm).
    #[arg(long, default_value = policies::DEFAULT_POLICY)]
    policy: String,
    /// Several policies, comma-separated, compared in one run (overrides --policy).
    #[arg(long, value_delimiter = ',')]
    policies: Vec<String>,
    /// Capacity in objects.
    #[arg(long, required_unless_present_any = ["sweep", "capacity_bytes"])]
    capacity: Option<u64>,
    /// Run the eight standard sizes (0.1% to 80% of the distinct keys).
    #[arg(long, conflicts_with_all = ["capacity", "capacity_bytes"])]
    sweep: bool,
    /// Write a miss-ratio chart (SVG) of the runs to this file.
    #[arg(long)]
    plot: Option<PathBuf>,
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
    /// Base memory cap per policy instance in bytes, plus 512 bytes per
    /// entry of capacity (Wasm only).
    #[arg(long, default_value_t = Limits::default().max_memory_bytes)]
    max_policy_memory: usize,
    /// Print one JSON object as the last line.
    #[arg(long)]
    json: bool,
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

pub(crate) fn run_sim(args: SimArgs) -> Result<()> {
    let policy_names = if args.policies.is_empty() { vec![args.policy.clone()] } else { args.policies.clone() };
    let spec = |name: &str| -> Result<PolicySpec> {
        Ok(PolicySpec {
            name_or_path: name.to_string(),
            native: args.native,
            config: parse_config(&args.config)?,
            limits: Limits {
                fuel_per_call: args.fuel_per_call,
                max_memory_bytes: args.max_policy_memory,
                ..Limits::default()
            },
        })
    };
    let engine = PolicyEngine::new()?;
    let bar = progress_bar(None, "reading trace");
    let requests = sim::load_trace(&args.trace, |n| bar.set_position(n))?;
    bar.finish_and_clear();
    let distinct = sim::distinct_keys(&requests);
    let sizes: Vec<Option<u64>> = if args.sweep {
        sim::sweep_sizes(distinct).into_iter().map(|(_, size)| Some(size)).collect()
    } else {
        vec![args.capacity]
    };
    if sizes.is_empty() {
        bail!(
            "{} has {distinct} distinct keys: too few for --sweep (its sizes are 0.1% to 80% of them, and each \
             must be over 4 objects); give --capacity instead",
            args.trace.display()
        );
    }
    let mut reports = Vec::new();
    for name in &policy_names {
        for &capacity in &sizes {
            let options = SimOptions {
                trace: args.trace.clone(),
                policy: spec(name)?,
                capacity,
                capacity_bytes: args.capacity_bytes,
                seed: args.seed,
            };
            let bar = progress_bar(Some(requests.len() as u64), &format!("{name} at {}", capacity.unwrap_or(0)));
            let report = sim::replay(&engine, &options, &requests, |n| bar.set_position(n))
                .with_context(|| format!("simulating {} with {name}", args.trace.display()))?;
            bar.finish_and_clear();
            reports.push(report);
        }
    }
    if let Some(path) = &args.plot {
        let series: Vec<plot::Series> = policy_names
            .iter()
            .zip(reports.chunks(sizes.len()))
            .map(|(name, runs)| plot::Series {
                label: name.clone(),
                points: runs.iter().map(|r| (r.capacity.unwrap_or(0), r.miss_ratio)).collect(),
            })
            .collect();
        let title = format!(
            "{}: miss ratio by cache size",
            args.trace.file_name().map(|f| f.to_string_lossy()).unwrap_or_default()
        );
        std::fs::write(path, plot::svg(&title, &series)).with_context(|| format!("writing {}", path.display()))?;
        eprintln!("wrote {}", path.display());
    }
    if let [report] = reports.as_slice() {
        print_report(report);
        if args.json {
            println!("{}", serde_json::to_string(report)?);
        }
        return Ok(());
    }
    print_table(&args.trace, distinct, &sizes, &policy_names, &reports);
    if args.json {
        let summary = serde_json::json!({
            "trace": args.trace.display().to_string(),
            "requests": requests.len(),
            "distinct_keys": distinct,
            "results": reports,
        });
        println!("{summary}");
    }
    Ok(())
}

/// Rows are policies, columns sizes.
fn print_table(trace: &std::path::Path, distinct: u64, sizes: &[Option<u64>], names: &[String], reports: &[SimReport]) {
    println!("{} ({} distinct keys): miss ratio by cache size (objects)\n", trace.display(), distinct);
    print!("| {:<10} |", "policy");
    for size in sizes {
        print!(" {:>9} |", size.map(|s| s.to_string()).unwrap_or_else(|| "bytes".into()));
    }
    println!();
    print!("|{}|", "-".repeat(12));
    for _ in sizes {
        print!("{}|", "-".repeat(11));
    }
    println!();
    for (name, runs) in names.iter().zip(reports.chunks(sizes.len())) {
        print!("| {name:<10} |");
        for r in runs {
            print!(" {:>9.4} |", r.miss_ratio);
        }
        println!();
    }
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
