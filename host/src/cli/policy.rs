//! `cachet policy ...`: live policy operations on a node (load, activate,
//! rollback, list, shadow; admin token required); `cachet policies`, the
//! bundled policies' names; and the `--config KEY=VALUE` policy settings
//! `policy` and `sim` take.

use super::block_on;
use super::client_args::AdminArgs;
use anyhow::{Context, Result, bail};
use cachet::config::parse_size;
use cachet::policies;
use cachet_client::{AdminCommand, Client, PolicyListing};
use clap::Subcommand;
use std::path::PathBuf;
use std::time::Duration;

#[derive(Subcommand)]
pub(crate) enum PolicyCommand {
    /// Store a policy component in the node's registry as NAME@VERSION.
    Load {
        /// The component (.wasm).
        path: PathBuf,
        /// Module name.
        #[arg(long)]
        name: String,
        /// Module version.
        #[arg(long)]
        version: String,
        /// Policy setting stored with the module, repeatable.
        #[arg(long = "config", value_name = "KEY=VALUE")]
        config: Vec<String>,
        /// Fuel per policy call [default: the node's].
        #[arg(long)]
        fuel_per_call: Option<u64>,
        /// Base memory cap per instance, e.g. 16MiB [default: the node's].
        #[arg(long)]
        max_memory: Option<String>,
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// Hot-swap every shard of the node to NAME@VERSION; on a cluster,
    /// every member (through the cluster's metadata log).
    Activate {
        /// NAME@VERSION.
        module: String,
        /// Settings replacing the stored ones for this activation, repeatable.
        #[arg(long = "config", value_name = "KEY=VALUE")]
        config: Vec<String>,
        /// On a cluster: run it on K members first; after
        /// `--canary-window`, the cluster rolls it out to every member or
        /// back by their hit ratios, and `cachet stats` says which and why.
        #[arg(long, value_name = "K")]
        canary: Option<u32>,
        /// How long the canary runs before the decision, in seconds.
        #[arg(long, value_name = "SECONDS", default_value_t = 60.0, requires = "canary")]
        canary_window: f64,
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// Swap back to the previously active version.
    Rollback {
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// Modules, versions, hashes, the active one, faults, shadow results.
    List {
        /// As one JSON object.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// Predict NAME@VERSION's hit ratio on sampled live traffic (`--stop`
    /// ends the evaluation).
    Shadow {
        /// NAME@VERSION.
        #[arg(required_unless_present = "stop")]
        module: Option<String>,
        /// Stop the running evaluation.
        #[arg(long, conflicts_with = "module")]
        stop: bool,
        #[command(flatten)]
        admin: AdminArgs,
    },
}

/// `cachet policies`: the bundled policies' names, one per line.
pub(crate) fn list_bundled() -> Result<()> {
    for name in policies::bundled_names() {
        println!("{name}");
    }
    Ok(())
}

pub(crate) fn run_policy(command: PolicyCommand) -> Result<()> {
    let (admin, json, command) = match command {
        PolicyCommand::Load { path, name, version, config, fuel_per_call, max_memory, admin } => {
            let module = std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
            let max_memory_bytes = max_memory.as_deref().map(parse_size).transpose()?;
            let config = parse_config(&config)?;
            let command = AdminCommand::Load {
                name,
                version,
                config,
                module: module.into(),
                fuel_per_call,
                max_memory_bytes,
                upload: None,
            };
            (admin, false, command)
        }
        PolicyCommand::Activate { module, config, canary, canary_window, admin } => {
            let (name, version) = cachet::admin::split_label(&module).map_err(anyhow::Error::msg)?;
            let config = if config.is_empty() { None } else { Some(parse_config(&config)?) };
            let command = match canary {
                Some(members) => {
                    if !(canary_window.is_finite() && canary_window > 0.0) {
                        bail!("--canary-window must be a positive number of seconds");
                    }
                    let window_ms = (canary_window * 1000.0) as u64;
                    AdminCommand::Canary { name, version, config, members, window_ms }
                }
                None => AdminCommand::Activate { name, version, config },
            };
            (admin, false, command)
        }
        PolicyCommand::Rollback { admin } => (admin, false, AdminCommand::Rollback),
        PolicyCommand::List { json, admin } => (admin, json, AdminCommand::List),
        PolicyCommand::Shadow { module, stop: _, admin } => {
            let (name, version) = match module {
                Some(label) => cachet::admin::split_label(&label).map_err(anyhow::Error::msg)?,
                None => (String::new(), String::new()),
            };
            (admin, false, AdminCommand::Shadow { name, version })
        }
    };
    let token = admin.token()?;
    let mut config = admin.client.config()?;
    // Activation hands every resident entry to the new policy: give it time.
    config.timeout = config.timeout.max(Duration::from_secs(120));
    let list = matches!(command, AdminCommand::List);
    block_on(async move {
        let client = Client::connect(config.clone()).await?;
        // On a cluster, `list` also shows what every member runs.
        let clustered = list && !json && client.stats().await.is_ok_and(|s| s.cluster.is_some());
        let listing = match command {
            // Large components go in chunks.
            AdminCommand::Load { name, version, config, module, fuel_per_call, max_memory_bytes, .. } => {
                client.load_module(&token, &name, &version, config, module, fuel_per_call, max_memory_bytes).await
            }
            command => client.admin(&token, command).await,
        };
        client.close().await;
        let listing = listing?;
        if json {
            println!("{}", serde_json::to_string(&listing)?);
        } else {
            print_listing(&listing);
        }
        if clustered {
            print_members(config, &token).await?;
        }
        Ok(())
    })
}

/// Every member's active module, faults and shadow figures, through a
/// cluster client that learns the members from the one asked.
async fn print_members(config: cachet_client::ClientConfig, token: &str) -> Result<()> {
    let cluster = cachet_client::ClusterClient::new(vec![config], cachet_client::RetryPolicy::default())?;
    let listings = cluster.admin_each(token, AdminCommand::List).await;
    println!("\nmembers");
    for (i, listing) in listings.iter().enumerate() {
        match listing {
            Ok(l) => {
                let faults: u64 = l.shards.iter().map(|s| s.faults).sum();
                let fallback = l.shards.iter().filter(|s| s.on_fallback).count();
                let shadow = l.shadow.as_ref().map_or_else(String::new, |s| {
                    format!(
                        ", shadow {} predicted {:.4} vs active {:.4} ({} sampled reads)",
                        s.candidate, s.candidate_hit_ratio, s.active_hit_ratio, s.sampled_reads
                    )
                });
                println!(
                    "  member {i:<3} runs {}, {faults} faults, {fallback} shards on fallback, {} quarantines{shadow}",
                    l.active, l.quarantines
                );
            }
            Err(err) => println!("  member {i:<3} did not answer: {err}"),
        }
    }
    cluster.close().await;
    Ok(())
}

fn print_listing(listing: &PolicyListing) {
    if !listing.message.is_empty() {
        println!("{}\n", listing.message);
    }
    println!("active    {}", listing.active);
    println!("previous  {}", listing.previous.as_deref().unwrap_or("-"));
    println!("swaps     {}   quarantines {}\n", listing.swaps, listing.quarantines);
    println!("| {:<22} | {:<8} | {:<12} | {:>6} | {:<6} | state", "module", "source", "sha256", "faults", "active");
    for m in &listing.modules {
        let sha = if m.sha256.is_empty() { "-" } else { m.sha256.get(..12).unwrap_or(&m.sha256) };
        let label = format!("{}@{}", m.name, m.version);
        let active = if m.active { "yes" } else { "" };
        println!("| {label:<22} | {:<8} | {sha:<12} | {:>6} | {active:<6} | {}", m.source, m.faults, m.state);
    }
    println!();
    for shard in &listing.shards {
        let fallback = if shard.on_fallback { " (on native fallback)" } else { "" };
        println!(
            "shard {:<3} {}{fallback}, {} entries, {} faults",
            shard.shard, shard.module, shard.entries, shard.faults
        );
    }
    if let Some(shadow) = &listing.shadow {
        println!(
            "\nshadow    {} on {:.2}% of keys, {} sampled reads: predicted hit ratio {:.4} vs active {:.4} on the same sample (live {:.4}){}",
            shadow.candidate,
            shadow.sample_rate * 100.0,
            shadow.sampled_reads,
            shadow.candidate_hit_ratio,
            shadow.active_hit_ratio,
            shadow.live_hit_ratio,
            if shadow.candidate_faults > 0 {
                format!("; candidate faulted {} times", shadow.candidate_faults)
            } else {
                String::new()
            }
        );
    }
}

pub(super) fn parse_config(pairs: &[String]) -> Result<Vec<(String, String)>> {
    pairs
        .iter()
        .map(|pair| match pair.split_once('=') {
            Some((k, v)) if !k.is_empty() => Ok((k.to_string(), v.to_string())),
            _ => bail!("--config expects KEY=VALUE, got `{pair}`"),
        })
        .collect()
}
