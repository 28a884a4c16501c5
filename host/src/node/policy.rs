//! Policy commands on a clustered node go through the cluster's metadata
//! log, so one `activate` through any member changes every member (issue
//! 20): a module is loaded here first (validated, conformance-checked,
//! stored), then recorded in the log by its hash; `activate`, `rollback`
//! and `shadow` are log entries each member applies when it reaches them,
//! fetching a module it lacks from the member that stored it. The node is
//! also the cluster runtime's [`PolicyHost`]: what it calls to apply them.

use super::Node;
use crate::cluster::meta::entry::{ActivePolicy, MemberState, MetaEntry, StoredModule};
use crate::cluster::policy::PolicyHost;
use crate::cluster::runtime::Cluster;
use crate::registry::{ModuleRecord, Source, label};
use cachet_proto::{AdminCommand, ErrorCode, ErrorReply, Response};
use std::net::IpAddr;
use std::time::Duration;

/// How long a policy command waits for the log (a leader election takes
/// about a second).
const LOG_WAIT: Duration = Duration::from_secs(10);
/// How long `activate` waits for this member to swap after the log applied
/// the entry.
const SWAP_WAIT: Duration = Duration::from_secs(10);
/// How long `cachet cluster loaders` waits for the log and for this
/// member to build the new loaders (compiling their modules).
const LOADERS_WAIT: Duration = Duration::from_secs(30);

impl PolicyHost for Node {
    fn has_module(&self, sha256: &str) -> bool {
        self.control.has_module(sha256)
    }

    fn module_bytes(&self, sha256: &str) -> Option<Vec<u8>> {
        self.control.module_bytes(sha256)
    }

    fn install(&self, module: &StoredModule, bytes: &[u8]) -> Result<String, String> {
        self.control.install(module, bytes).map_err(|e| e.to_string())
    }

    fn apply(&self, active: Option<&ActivePolicy>, shadow: Option<&str>) -> Result<String, String> {
        self.control.apply_cluster_policy(active, shadow).map_err(|e| e.to_string())
    }

    fn hit_counts(&self) -> (u64, u64) {
        let stats = self.store.stats();
        (stats.hits, stats.misses)
    }
}

/// Whether `command` is a cluster-wide policy operation on a clustered
/// node.
pub(super) fn cluster_wide(command: &AdminCommand) -> bool {
    matches!(
        command,
        AdminCommand::Load { .. }
            | AdminCommand::Activate { .. }
            | AdminCommand::Canary { .. }
            | AdminCommand::Rollback
            | AdminCommand::Shadow { .. }
            | AdminCommand::Decommission { .. }
            | AdminCommand::SetLoaders { .. }
    )
}

fn applied_here(done: bool) -> &'static str {
    if done {
        "; this member runs it, the others as they apply the entry"
    } else {
        "; this member has not applied it yet (see its log)"
    }
}

fn unavailable(message: String) -> Response {
    Response::Error(ErrorReply::new(ErrorCode::Unavailable, message))
}

impl Node {
    /// A policy command on a clustered node, admitted already.
    pub(super) fn cluster_policy(
        &self,
        cluster: &Cluster,
        token: &str,
        source: Option<IpAddr>,
        command: AdminCommand,
    ) -> Response {
        let what = command.name();
        let result = match command {
            AdminCommand::Load { .. } => {
                let name_version = match &command {
                    AdminCommand::Load { name, version, .. } => label(name, version),
                    _ => String::new(),
                };
                // Loaded (and checked) here first; then recorded. The
                // runtime may be applying the log's policy right now (the
                // registry is busy for a swap's length): wait for it.
                let start = std::time::Instant::now();
                let local = loop {
                    let local = self.admin_from_local(token, source, command.clone());
                    let busy = matches!(&local, Response::Error(e) if e.code == ErrorCode::Busy);
                    if !busy || start.elapsed() > LOG_WAIT {
                        break local;
                    }
                    std::thread::sleep(Duration::from_millis(20));
                };
                if matches!(local, Response::Error(_)) {
                    return local;
                }
                self.store_in_log(cluster, &name_version).map(|index| {
                    format!("loaded {name_version} here and stored it in the cluster's registry (log index {index}); every member fetches it now")
                })
            }
            AdminCommand::Activate { name, version, config } => {
                let label = label(&name, &version);
                self.activate_in_log(cluster, &label, config)
            }
            AdminCommand::Canary { name, version, config, members, window_ms } => {
                let label = label(&name, &version);
                self.ensure_stored(cluster, &label).and_then(|bundled| {
                    let entry = MetaEntry::CanaryStart { label: label.clone(), config, bundled, members, window_ms };
                    let index = cluster.propose(entry, LOG_WAIT)?;
                    let here = if cluster.wait_policy_applied(index, SWAP_WAIT) { "" } else { " (not applied here yet)" };
                    Ok(format!(
                        "canary: {label} runs on {members} member(s) for {:.0} s (log index {index}), then the leader \
                         rolls it out to every member or back by their hit ratios{here}; `cachet stats` shows the decision",
                        window_ms as f64 / 1000.0
                    ))
                })
            }
            AdminCommand::Decommission { node } => {
                let entry = MetaEntry::SetState {
                    node,
                    state: MemberState::Leaving,
                    reason: "decommissioned by an operator".into(),
                };
                cluster.propose(entry, LOG_WAIT).map(|index| {
                    format!(
                        "member {node} is leaving (log index {index}): the leader moves its slots to the other \
                         members, then removes it from the log; `cachet stats` shows it leaving, then removed"
                    )
                })
            }
            AdminCommand::Rollback => cluster.propose(MetaEntry::Rollback, LOG_WAIT).map(|index| {
                let here = cluster.wait_policy_applied(index, SWAP_WAIT);
                format!("rolled back cluster-wide (log index {index}){}", applied_here(here))
            }),
            AdminCommand::Shadow { name, version } => {
                let label = (!name.is_empty()).then(|| label(&name, &version));
                let stored = match &label {
                    Some(l) => self.ensure_stored(cluster, l).map(|_| ()),
                    None => Ok(()),
                };
                stored.and_then(|()| cluster.propose(MetaEntry::Shadow { label: label.clone() }, LOG_WAIT)).map(
                    |index| {
                        let here = applied_here(cluster.wait_policy_applied(index, SWAP_WAIT));
                        match label {
                            Some(l) => format!("shadowing {l} on every member (log index {index}){here}"),
                            None => format!("shadow evaluation stopped on every member (log index {index}){here}"),
                        }
                    },
                )
            }
            AdminCommand::SetLoaders { config, modules } => self.shared_loaders(config, modules).and_then(|shared| {
                let what = match &shared {
                    Some(_) => "the cluster's loader configuration changed",
                    None => "the cluster's loaders are dropped",
                };
                cluster.set_loaders(shared, LOADERS_WAIT).map(|done| format!("{what}: {done}"))
            }),
            other => return self.admin_from_local(token, source, other),
        };
        match result {
            Ok(message) => {
                tracing::info!(command = what, "{message}");
                Response::Policies(Box::new(self.control.policy_listing(message)))
            }
            Err(message) => {
                tracing::warn!(command = what, %message, "cluster policy command failed");
                unavailable(message)
            }
        }
    }

    fn record(&self, label: &str) -> Result<ModuleRecord, String> {
        self.control.module_record(label).map_err(|e| e.to_string())
    }

    /// Records a module of this member's registry in the log (by hash);
    /// bundled modules need not be.
    fn store_in_log(&self, cluster: &Cluster, label: &str) -> Result<u64, String> {
        let record = self.record(label)?;
        let size = self.control.module_bytes(&record.sha256).map_or(0, |b| b.len() as u64);
        if size == 0 {
            return Err(format!("{label}'s bytes are not in this member's registry directory"));
        }
        let module = StoredModule {
            label: label.to_string(),
            sha256: record.sha256.clone(),
            size,
            config: record.config.clone(),
            fuel_per_call: record.limits.fuel_per_call,
            max_memory_bytes: record.limits.max_memory_bytes,
        };
        cluster.propose(MetaEntry::ModuleStored(module), LOG_WAIT)
    }

    /// Whether `label` is bundled; a loaded one is stored in the log first
    /// (a no-op when it is already, with the same contents); one this
    /// member lacks is left to the log.
    fn ensure_stored(&self, cluster: &Cluster, label: &str) -> Result<bool, String> {
        // Not here: the log may store it (loaded through another member);
        // its state refuses the entry otherwise.
        let Ok(record) = self.record(label) else { return Ok(false) };
        match record.source {
            Source::Bundled => Ok(true),
            Source::Loaded => self.store_in_log(cluster, label).map(|_| false),
            Source::Startup => Err(format!(
                "{label} was named at start-up as a file: load it with `cachet policy load` to use it cluster-wide"
            )),
        }
    }

    /// Makes the bundled policy `name` the node's (on a cluster, every
    /// member's, through the log): `CONFIG SET maxmemory-policy`. The
    /// caller authorized it.
    pub fn set_bundled_policy(&self, name: &str) -> Result<String, String> {
        let label = self.control.bundled_label(name)?;
        match self.cluster() {
            Some(cluster) => self.activate_in_log(cluster, &label, None),
            None => self.control.activate_bundled(&label),
        }
    }

    fn activate_in_log(
        &self,
        cluster: &Cluster,
        label: &str,
        config: Option<Vec<(String, String)>>,
    ) -> Result<String, String> {
        let bundled = self.ensure_stored(cluster, label)?;
        let index = cluster.propose(MetaEntry::Activate { label: label.to_string(), config, bundled }, LOG_WAIT)?;
        // The log applied it here; the swap follows on the runtime's
        // blocking thread.
        let here = cluster.wait_policy_applied(index, SWAP_WAIT);
        Ok(format!("activated {label} cluster-wide (log index {index}){}", applied_here(here)))
    }
}
