//! `cachet stats` (a node's counters, its cluster and metadata log, and its
//! hot keys given the admin token) and `cachet hot-keys` (the hot keys
//! alone, one per line).

use super::block_on;
use super::client_args::{AdminArgs, optional_token};
use anyhow::{Context, Result};
use cachet_client::Client;
use std::io::Write as _;

/// The node's stats, with its hot keys when `token` is given. A node that
/// predates admin stats answers `UnknownCommand`; its plain stats still
/// carry the hot keys, so those are used.
pub(super) async fn node_stats(client: &Client, token: Option<&str>) -> Result<cachet_client::NodeStats> {
    let Some(token) = token else {
        return Ok(client.stats().await?);
    };
    match client.admin_stats(token).await {
        Err(cachet_client::ClientError::Server(reply)) if reply.code == cachet_client::ErrorCode::UnknownCommand => {
            Ok(client.stats().await?)
        }
        result => Ok(result.context("admin stats (hot keys)")?),
    }
}

/// Why a command that needs hot keys got none: they are shown to admin
/// callers only.
pub(super) const HOT_KEYS_NEED_TOKEN: &str = "hot keys are key bytes, shown only to admin callers: give the node's admin token \
                                   (--admin-token-file FILE or CACHET_ADMIN_TOKEN)";

/// `cachet stats`: the node's counters as text, or as one JSON object.
pub(crate) fn run_stats(json: bool, admin: AdminArgs) -> Result<()> {
    block_on(async move {
        let token = optional_token(admin.admin_token_file.as_deref())?;
        let client = admin.client.connect().await?;
        let stats = node_stats(&client, token.as_deref()).await;
        client.close().await;
        let stats = stats?;
        if json {
            println!("{}", serde_json::to_string(&stats)?);
        } else {
            println!("policy            {} {}", stats.policy, stats.policy_version);
            println!("hits / misses     {} / {} (hit ratio {:.4})", stats.hits, stats.misses, stats.hit_ratio);
            println!("entries / bytes   {} / {} of {}", stats.entries, stats.bytes, stats.max_bytes);
            println!("evictions         {}", stats.evictions);
            println!("expired           {} (+{} at policy deadlines)", stats.expired, stats.policy_expired);
            println!("deletes           {}", stats.deletes);
            println!("policy faults     {} ({} shards on fallback)", stats.policy_faults, stats.shards_on_fallback);
            println!("shards            {}", stats.shards);
            println!("connections       {}", stats.connections);
            println!("uptime            {} s", stats.uptime_secs);
            if let Some(cluster) = &stats.cluster {
                let up: Vec<String> = cluster
                    .members
                    .iter()
                    .zip(&cluster.alive)
                    .enumerate()
                    .map(|(i, (addr, up))| format!("{i}={addr}{}", if *up { "" } else { " (down)" }))
                    .collect();
                println!(
                    "cluster node      {} of [{}], RF {}",
                    cluster.node_id,
                    up.join(", "),
                    cluster.replication_factor
                );
                let synced = if cluster.synced {
                    "synced".to_string()
                } else {
                    format!("re-syncing from {:?}", cluster.resync_waiting)
                };
                println!("replica           {} records, {} hints, {synced}", cluster.records, cluster.hints);
                println!("replicated ops    {} ok, {} failed", cluster.ops_ok, cluster.ops_failed);
                // A move in progress: members taking slots over, not owners yet.
                let mut taking: std::collections::BTreeMap<u32, u32> = std::collections::BTreeMap::new();
                for range in &cluster.slots {
                    for &p in &range.pending {
                        *taking.entry(p).or_default() += u32::from(range.end - range.start) + 1;
                    }
                }
                if !taking.is_empty() {
                    let moving: Vec<String> = taking.iter().map(|(n, s)| format!("node {n} takes {s} slots")).collect();
                    println!("moving slots      {} (pending: streaming, then owners)", moving.join(", "));
                }
                println!(
                    "as a replica      {} writes for other members, {} updates run as primary",
                    cluster.replica_writes, cluster.primary_updates
                );
                if cluster.peer_identity_refused > 0 {
                    let refused = cluster.peer_identity_refused;
                    println!("impostor frames   {refused} dropped (sender's certificate names another node)");
                }
                if cluster.sync_requests_refused > 0 {
                    let refused = cluster.sync_requests_refused;
                    println!("re-sync requests  {refused} dropped (asked again before the last was served)");
                }
                if cluster.streamed_bytes > 0 {
                    println!("streamed          {} bytes to re-syncing members", cluster.streamed_bytes);
                }
                if let Some(meta) = &cluster.meta {
                    print_meta(meta);
                }
            }
            if stats.hot_keys_hidden {
                println!("hot keys          hidden: {HOT_KEYS_NEED_TOKEN}");
            }
            for (i, hot) in stats.hot_keys.iter().take(10).enumerate() {
                let label = if i == 0 { "hot keys" } else { "" };
                println!("{label:<17} {} (~{} reads)", String::from_utf8_lossy(&hot.key).escape_debug(), hot.reads);
            }
        }
        Ok(())
    })
}

/// `cachet hot-keys`: the node's hottest keys, one per line.
pub(crate) fn run_hot_keys(admin: AdminArgs) -> Result<()> {
    block_on(async move {
        let token = optional_token(admin.admin_token_file.as_deref())?
            .ok_or_else(|| anyhow::anyhow!("{HOT_KEYS_NEED_TOKEN}"))?;
        let client = Client::connect(admin.client.config()?).await?;
        let stats = node_stats(&client, Some(&token)).await;
        client.close().await;
        let mut out = std::io::stdout().lock();
        for hot in stats?.hot_keys {
            out.write_all(&hot.key)?;
            out.write_all(b"\n")?;
        }
        Ok(())
    })
}

/// The metadata log's part of `cachet stats`.
fn print_meta(meta: &cachet_proto::MetaStats) {
    let leader = meta.leader.map_or_else(|| "none known".to_string(), |l| format!("node {l}"));
    println!(
        "metadata log      {}, leader {leader}, term {}, applied {}, slots epoch {}{}",
        meta.phase,
        meta.term,
        meta.applied,
        meta.slots_epoch,
        if meta.refused > 0 { format!(", {} entries refused", meta.refused) } else { String::new() }
    );
    if let Some(active) = &meta.active_policy {
        println!("cluster policy    {active}");
    }
    if let Some(canary) = &meta.canary {
        println!("canary            {canary}");
    }
    if let Some(loaders) = &meta.loaders {
        println!("loaders           {loaders}");
    }
    if let Some(last) = &meta.last_canary {
        println!("last canary       {last}");
    }
    for m in &meta.members {
        let role = if m.voter { "voter" } else { "learner" };
        let client = if m.client.is_empty() { "-" } else { m.client.as_str() };
        println!(
            "  member {:<8} {:<8} {role:<7} peer {} client {client} (raft id {:#x}; {})",
            m.node, m.state, m.peer, m.raft_id, m.reason
        );
    }
}
