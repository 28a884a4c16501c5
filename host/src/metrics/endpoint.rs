//! The metrics in the Prometheus text format, and a small HTTP endpoint
//! (`--metrics-listen`) that serves them to scrapers.
//!
//! Everything is rendered on demand from the node's own counters (shard
//! stats, request histograms, the control plane), so scraping costs nothing
//! between scrapes and cannot drift from `cachet stats`.

use super::COMMANDS;
use crate::core::histogram::{BUCKETS, Histogram, bucket_bound_ns};
use crate::core::{FaultKind, Hook, PolicyMode};
use crate::node::Node;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::watch;

/// Writes `# HELP` and `# TYPE` for a metric family.
fn family(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
}

/// Label values are quoted; backslashes, quotes and newlines escaped.
fn escape(value: &str) -> String {
    value.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

fn histogram(out: &mut String, name: &str, labels: &str, h: &Histogram) {
    let sep = if labels.is_empty() { "" } else { "," };
    let mut cumulative = 0;
    for (i, count) in h.counts().iter().enumerate().take(BUCKETS - 1) {
        cumulative += count;
        let le = bucket_bound_ns(i) as f64 / 1e9;
        let _ = writeln!(out, "{name}_bucket{{{labels}{sep}le=\"{le:e}\"}} {cumulative}");
    }
    let _ = writeln!(out, "{name}_bucket{{{labels}{sep}le=\"+Inf\"}} {}", h.count());
    let _ = writeln!(out, "{name}_sum{{{labels}}} {:e}", h.sum_ns() as f64 / 1e9);
    let _ = writeln!(out, "{name}_count{{{labels}}} {}", h.count());
}

/// The node's metrics in the Prometheus text format (version 0.0.4).
pub fn render(node: &Node) -> String {
    let mut out = String::with_capacity(16 << 10);
    let stats = node.stats();
    let counters = [
        ("cachet_hits_total", "Reads that found a live entry.", stats.hits),
        ("cachet_misses_total", "Reads that found nothing.", stats.misses),
    ];
    for (name, help, value) in counters {
        family(&mut out, name, "counter", help);
        let _ = writeln!(out, "{name} {value}");
    }
    family(&mut out, "cachet_hit_ratio", "gauge", "Hits over reads since the node started.");
    let _ = writeln!(out, "cachet_hit_ratio {}", stats.hit_ratio);
    family(&mut out, "cachet_removals_total", "counter", "Entries removed, by cause.");
    for (cause, value) in [
        ("evicted", stats.evictions),
        ("expired", stats.expired),
        ("policy_deadline", stats.policy_expired),
        ("deleted", stats.deletes),
    ] {
        let _ = writeln!(out, "cachet_removals_total{{cause=\"{cause}\"}} {value}");
    }
    family(&mut out, "cachet_entries", "gauge", "Resident entries.");
    let _ = writeln!(out, "cachet_entries {}", stats.entries);
    family(
        &mut out,
        "cachet_client_cutoffs_total",
        "counter",
        "Client connections cut off or refused by a limit, by reason.",
    );
    for why in crate::clients::Cutoff::ALL {
        let _ = writeln!(out, "cachet_client_cutoffs_total{{reason=\"{}\"}} {}", why.label(), node.clients().get(why));
    }
    family(
        &mut out,
        "cachet_quic_retries_total",
        "counter",
        "QUIC handshakes asked to validate their address first (a burst of handshakes).",
    );
    let _ = writeln!(out, "cachet_quic_retries_total {}", node.clients().retries());
    family(&mut out, "cachet_auth_failures_total", "counter", "RESP AUTH attempts with a wrong user or password.");
    let _ = writeln!(out, "cachet_auth_failures_total {}", node.clients().auth_failures());
    family(&mut out, "cachet_bytes", "gauge", "Resident bytes (keys and values).");
    let _ = writeln!(out, "cachet_bytes {}", stats.bytes);
    family(&mut out, "cachet_max_bytes", "gauge", "Byte budget.");
    let _ = writeln!(out, "cachet_max_bytes {}", stats.max_bytes);
    family(&mut out, "cachet_connections", "gauge", "Open client connections.");
    let _ = writeln!(out, "cachet_connections {}", stats.connections);
    if let Some(loaders) = node.loaders() {
        render_loaders(&mut out, &loaders);
    }
    if let Some(cluster) = &stats.cluster {
        render_cluster(&mut out, cluster);
    }

    family(&mut out, "cachet_request_duration_seconds", "histogram", "Time to execute a request, by command.");
    for (i, command) in COMMANDS.iter().enumerate() {
        histogram(
            &mut out,
            "cachet_request_duration_seconds",
            &format!("command=\"{command}\""),
            &node.metrics.latency(i),
        );
    }
    family(&mut out, "cachet_request_errors_total", "counter", "Requests answered with an error, by command.");
    for (i, command) in COMMANDS.iter().enumerate() {
        let errors = node.metrics.errors[i].load(Ordering::Relaxed);
        let _ = writeln!(out, "cachet_request_errors_total{{command=\"{command}\"}} {errors}");
    }

    // Per-shard policy state, gathered under each shard's lock in turn.
    let mut hooks = vec![Histogram::default(); Hook::ALL.len()];
    let mut faults = [0u64; FaultKind::ALL.len()];
    let (mut fallbacks, mut recoveries) = (0, 0);
    let listing = node.policy_listing_now();
    family(&mut out, "cachet_policy_active", "gauge", "The module each shard is configured with (value 1).");
    for shard in &listing.shards {
        let module = escape(&shard.module);
        let _ = writeln!(out, "cachet_policy_active{{shard=\"{}\",module=\"{module}\"}} 1", shard.shard);
    }
    family(&mut out, "cachet_policy_on_fallback", "gauge", "1 while a shard runs the native fallback.");
    for i in 0..node.shard_count() {
        let shard = node.lock_shard(i);
        let s = shard.stats();
        for (all, one) in hooks.iter_mut().zip(&s.hooks) {
            all.merge(one);
        }
        for (all, one) in faults.iter_mut().zip(s.faults) {
            *all += one;
        }
        fallbacks += s.fallbacks;
        recoveries += s.recoveries;
        let on_fallback = u8::from(!matches!(shard.policy_mode(), PolicyMode::Configured));
        let _ = writeln!(out, "cachet_policy_on_fallback{{shard=\"{i}\"}} {on_fallback}");
    }
    family(&mut out, "cachet_policy_hook_duration_seconds", "histogram", "Time of policy calls, by hook.");
    for (hook, h) in Hook::ALL.iter().zip(&hooks) {
        histogram(&mut out, "cachet_policy_hook_duration_seconds", &format!("hook=\"{}\"", hook.name()), h);
    }
    family(&mut out, "cachet_policy_faults_total", "counter", "Policy faults, by kind.");
    for (kind, value) in FaultKind::ALL.iter().zip(faults) {
        let _ = writeln!(out, "cachet_policy_faults_total{{kind=\"{}\"}} {value}", kind.name());
    }
    let transitions = [
        ("cachet_policy_fallbacks_total", "Switches of a shard to the native fallback.", fallbacks),
        ("cachet_policy_recoveries_total", "Fresh instances of the configured policy put back.", recoveries),
        ("cachet_policy_swaps_total", "Hot-swaps of every shard to another module.", listing.swaps),
        ("cachet_policy_quarantines_total", "Modules quarantined after repeated faults.", listing.quarantines),
    ];
    for (name, help, value) in transitions {
        family(&mut out, name, "counter", help);
        let _ = writeln!(out, "{name} {value}");
    }
    family(&mut out, "cachet_policy_module_faults_total", "counter", "Faults counted against each module.");
    for module in listing.modules.iter().filter(|m| m.faults > 0 || m.active) {
        let label = escape(&format!("{}@{}", module.name, module.version));
        let _ = writeln!(out, "cachet_policy_module_faults_total{{module=\"{label}\"}} {}", module.faults);
    }
    if let Some(shadow) = &listing.shadow {
        family(&mut out, "cachet_shadow_hit_ratio", "gauge", "Predicted hit ratio on sampled live traffic.");
        let candidate = escape(&shadow.candidate);
        let active = escape(&listing.active);
        let _ = writeln!(
            out,
            "cachet_shadow_hit_ratio{{role=\"candidate\",module=\"{candidate}\"}} {}",
            shadow.candidate_hit_ratio
        );
        let _ =
            writeln!(out, "cachet_shadow_hit_ratio{{role=\"active\",module=\"{active}\"}} {}", shadow.active_hit_ratio);
        family(&mut out, "cachet_shadow_sampled_reads_total", "counter", "Reads seen by the shadow evaluation.");
        let _ = writeln!(out, "cachet_shadow_sampled_reads_total {}", shadow.sampled_reads);
    }
    out
}

/// A metrics endpoint that could not start.
#[derive(Debug, thiserror::Error)]
#[error("cannot listen for metrics on {addr}: {source}")]
pub struct MetricsError {
    addr: SocketAddr,
    source: std::io::Error,
}

impl MetricsError {
    /// `source` while listening on `addr`.
    pub fn new(addr: SocketAddr, source: std::io::Error) -> Self {
        Self { addr, source }
    }
}

/// Largest request head read from a scraper; anything longer is refused.
const MAX_REQUEST: usize = 8 << 10;

/// Scrapes served at once; more connections get 503 at once.
const MAX_SCRAPES: usize = 16;

/// Serves `GET /metrics` on `addr` until `stop` turns true. Runs on the
/// caller's tokio runtime; every connection is answered and closed.
pub async fn serve(
    node: Arc<Node>,
    addr: SocketAddr,
    mut stop: watch::Receiver<bool>,
    bound: tokio::sync::oneshot::Sender<SocketAddr>,
) -> Result<(), MetricsError> {
    let listener = tokio::net::TcpListener::bind(addr).await.map_err(|source| MetricsError { addr, source })?;
    let local = listener.local_addr().map_err(|source| MetricsError { addr, source })?;
    let _ = bound.send(local);
    tracing::info!(%local, "serving metrics");
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_SCRAPES));
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((mut stream, _)) => match slots.clone().try_acquire_owned() {
                    Ok(slot) => {
                        let node = node.clone();
                        tokio::spawn(async move {
                            answer(node, stream).await;
                            drop(slot);
                        });
                    }
                    // Idle or slow clients holding every slot must not
                    // pile up tasks: the rest are told to come back.
                    Err(_) => {
                        let busy = "HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\nConnection: close\r\n\r\n";
                        let _ = stream.write_all(busy.as_bytes()).await;
                    }
                },
                Err(err) => tracing::debug!(%err, "metrics accept failed"),
            },
            _ = stop.changed() => return Ok(()),
        }
    }
}

async fn answer(node: Arc<Node>, mut stream: tokio::net::TcpStream) {
    let mut head = Vec::with_capacity(1024);
    let mut buf = [0u8; 1024];
    // One deadline for the whole request head, so a client trickling bytes
    // cannot hold a slot for longer.
    let read_head = async {
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return false,
                Ok(n) => head.extend_from_slice(&buf[..n]),
            }
            if head.windows(4).any(|w| w == b"\r\n\r\n") {
                return true;
            }
            if head.len() > MAX_REQUEST {
                return false;
            }
        }
    };
    let complete = tokio::time::timeout(Duration::from_secs(5), read_head).await.unwrap_or(false);
    let line = head.split(|&b| b == b'\n').next().unwrap_or_default();
    let (status, body) = if !complete {
        ("400 Bad Request", "incomplete or oversized request\n".to_string())
    } else if line.starts_with(b"GET /metrics ") || line.starts_with(b"GET / ") {
        // Rendering takes every shard lock briefly; keep it off the I/O loop.
        let node = node.clone();
        match tokio::task::spawn_blocking(move || render(&node)).await {
            Ok(text) => ("200 OK", text),
            Err(_) => ("500 Internal Server Error", "rendering failed\n".to_string()),
        }
    } else {
        ("404 Not Found", "try GET /metrics\n".to_string())
    };
    let reply = format!(
        "HTTP/1.1 {status}\r\nContent-Type: text/plain; version=0.0.4; charset=utf-8\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = stream.write_all(reply.as_bytes()).await;
    let _ = stream.shutdown().await;
}

/// A clustered node's view: who is up, its re-sync, what it holds and
/// coordinates.
fn render_cluster(out: &mut String, c: &cachet_proto::ClusterStats) {
    family(
        out,
        "cachet_cluster_member_up",
        "gauge",
        "Whether a member serves (up, and in this node's ring), by node id.",
    );
    for (id, up) in c.alive.iter().enumerate() {
        let _ = writeln!(out, "cachet_cluster_member_up{{node=\"{id}\"}} {}", u8::from(*up));
    }
    family(
        out,
        "cachet_cluster_ring_epoch",
        "gauge",
        "The epoch of the slot table this node places keys by (from the metadata log).",
    );
    let _ = writeln!(out, "cachet_cluster_ring_epoch {}", c.ring_epoch);
    family(
        out,
        "cachet_cluster_synced",
        "gauge",
        "1 while this node counts toward quorums; 0 while it re-syncs (after a restart, gaining slots, or being declared down).",
    );
    let _ = writeln!(out, "cachet_cluster_synced {}", u8::from(c.synced));
    family(out, "cachet_cluster_resync_waiting", "gauge", "Members this node still waits for a re-sync from.");
    let _ = writeln!(out, "cachet_cluster_resync_waiting {}", c.resync_waiting.len());
    family(out, "cachet_cluster_records", "gauge", "Replicated records held (tombstones included).");
    let _ = writeln!(out, "cachet_cluster_records {}", c.records);
    family(out, "cachet_cluster_hints", "gauge", "Writes held for members that are down.");
    let _ = writeln!(out, "cachet_cluster_hints {}", c.hints);
    family(out, "cachet_cluster_operations_total", "counter", "Replicated operations coordinated here, by result.");
    let _ = writeln!(out, "cachet_cluster_operations_total{{result=\"ok\"}} {}", c.ops_ok);
    let _ = writeln!(out, "cachet_cluster_operations_total{{result=\"failed\"}} {}", c.ops_failed);
    family(
        out,
        "cachet_cluster_replica_writes_total",
        "counter",
        "Writes stored here as a replica for other coordinators.",
    );
    let _ = writeln!(out, "cachet_cluster_replica_writes_total {}", c.replica_writes);
    family(
        out,
        "cachet_cluster_primary_updates_total",
        "counter",
        "Read-modify-writes and loads run here as the key's primary owner.",
    );
    let _ = writeln!(out, "cachet_cluster_primary_updates_total {}", c.primary_updates);
    family(
        out,
        "cachet_cluster_peer_identity_refused_total",
        "counter",
        "Peer frames dropped: the sender claimed another member than its certificate names.",
    );
    let _ = writeln!(out, "cachet_cluster_peer_identity_refused_total {}", c.peer_identity_refused);
    family(
        out,
        "cachet_cluster_sync_requests_refused_total",
        "counter",
        "Re-sync stream requests dropped: a newer one from the same member came before they were served.",
    );
    let _ = writeln!(out, "cachet_cluster_sync_requests_refused_total {}", c.sync_requests_refused);
    family(
        out,
        "cachet_cluster_streamed_bytes_total",
        "counter",
        "Record bytes streamed to members re-syncing or taking slots.",
    );
    let _ = writeln!(out, "cachet_cluster_streamed_bytes_total {}", c.streamed_bytes);
}

/// The read-through loaders' counters and their origins'.
fn render_loaders(out: &mut String, loaders: &crate::loader::Loaders) {
    use std::sync::atomic::Ordering::Relaxed;
    let c = loaders.counters();
    family(out, "cachet_loader_events_total", "counter", "Read-through loader events, by kind.");
    for (kind, value) in [
        ("load", c.loads.load(Relaxed)),
        ("coalesced", c.coalesced.load(Relaxed)),
        ("refresh", c.refreshes.load(Relaxed)),
        ("early_refresh", c.early_refreshes.load(Relaxed)),
        ("stale_served", c.stale_served.load(Relaxed)),
        ("negative_hit", c.negative_hits.load(Relaxed)),
        ("failure", c.failures.load(Relaxed)),
        ("lease_break", c.lease_breaks.load(Relaxed)),
        ("invalidation", c.invalidations.load(Relaxed)),
        ("write_through", c.writes_through.load(Relaxed)),
        ("write_behind_queued", c.writes_behind_queued.load(Relaxed)),
        ("write_behind_stored", c.writes_behind_stored.load(Relaxed)),
        ("write_refused", c.writes_refused.load(Relaxed)),
        ("write_failure", c.write_failures.load(Relaxed)),
    ] {
        let _ = writeln!(out, "cachet_loader_events_total{{kind=\"{kind}\"}} {value}");
    }
    family(out, "cachet_loader_in_flight", "gauge", "Keys being loaded or refreshed.");
    let _ = writeln!(out, "cachet_loader_in_flight {}", loaders.in_flight());
    family(out, "cachet_write_queue_depth", "gauge", "Write-behind writes not yet stored at the origin.");
    let _ = writeln!(out, "cachet_write_queue_depth {}", loaders.write_queue_depth());
    let lag = loaders.write_lag();
    family(
        out,
        "cachet_write_lag_seconds",
        "gauge",
        "Write-behind time from the reply to the origin's acknowledgement (upper bounds), since start.",
    );
    for q in [0.5, 0.99, 1.0] {
        let seconds = lag.quantile_bound_ns(q) as f64 / 1e9;
        let _ = writeln!(out, "cachet_write_lag_seconds{{quantile=\"{q}\"}} {seconds}");
    }
    family(out, "cachet_origin_queries_total", "counter", "Origin requests, by origin and result.");
    for origin in loaders.origin_stats() {
        let ok = origin.queries.saturating_sub(origin.failures);
        let _ = writeln!(out, "cachet_origin_queries_total{{origin=\"{}\",result=\"ok\"}} {ok}", origin.name);
        let _ = writeln!(
            out,
            "cachet_origin_queries_total{{origin=\"{}\",result=\"error\"}} {}",
            origin.name, origin.failures
        );
    }
}
