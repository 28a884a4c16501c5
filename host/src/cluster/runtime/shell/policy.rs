//! The metadata log's policy on this member: client proposals in and
//! their fates out, the log's active and shadow policy applied through the
//! node's [`PolicyHost`] on a blocking thread, and policy modules fetched
//! from the members that have them.

use super::Shell;
use crate::cluster::meta::entry::ActivePolicy;
use crate::cluster::meta::member::{MetaFrame, MetaMember};
use crate::cluster::policy::PolicyHost;
use crate::cluster::replica::NodeIx;
use crate::cluster::runtime::policies::Proposal;
use crate::cluster::transport::PeerFrame;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::SocketAddr;
use std::sync::Arc;

/// A module's bytes are asked for again after this long without them.
const ASK_AGAIN_MS: u64 = 1_000;

/// What the log asks this member to run.
pub(super) type Target = (Option<ActivePolicy>, Option<String>);

/// What the policy side of the shell keeps.
#[derive(Default)]
pub(super) struct PolicyApply {
    /// Client proposals waiting for their fate, by nonce.
    waiting: HashMap<u64, std::sync::mpsc::SyncSender<Result<u64, String>>>,
    /// The target last applied (or given up on: a failure is logged and
    /// shown, not retried until the log changes).
    applied: Option<Target>,
    /// A blocking apply or install runs.
    busy: bool,
    /// Modules asked for, by hash: when to ask again.
    wanted: BTreeMap<String, u64>,
    /// Modules being installed.
    installing: BTreeSet<String>,
    /// The last failure, for the logs.
    pub(super) last_error: Option<String>,
}

/// The start-up barrier (see [`Shell::caught_up`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Barrier {
    Proposed(u64),
    Retry,
    Passed,
}

/// What a blocking policy task reports back to the shell.
pub(super) enum PolicyDone {
    /// The target, as of this log index.
    Applied(Target, u64, Result<String, String>),
    Installed(String, Result<String, String>),
}

impl Shell {
    fn host(&self) -> Option<Arc<dyn PolicyHost>> {
        self.policy_host.get().and_then(std::sync::Weak::upgrade)
    }

    /// A client's proposal: into the log, its answer kept for later.
    pub(super) fn propose_for_client(&mut self, proposal: Proposal) {
        let now = self.now();
        let Some(meta) = self.meta.as_mut() else {
            let _ = proposal.reply.send(Err("this member runs without the cluster's metadata log".into()));
            return;
        };
        match meta.propose_for_client(now, proposal.entry) {
            Ok(nonce) => {
                self.policy.waiting.insert(nonce, proposal.reply);
            }
            Err(err) => {
                let _ = proposal.reply.send(Err(err.to_string()));
            }
        }
    }

    /// Answers the client proposals decided since the last call (and
    /// notes the start-up barrier's).
    pub(super) fn answer_decided(&mut self) {
        while let Some((nonce, result)) = self.meta.as_mut().and_then(MetaMember::poll_decided) {
            if let Some(reply) = self.policy.waiting.remove(&nonce) {
                let _ = reply.send(result);
            } else if self.barrier == Some(Barrier::Proposed(nonce)) {
                self.barrier = Some(if result.is_ok() { Barrier::Passed } else { Barrier::Retry });
            }
        }
    }

    /// Whether this member has caught up with the log since it started: a
    /// no-op it proposed has applied here, so every entry committed before
    /// it (an `activate` made while this member was down, a table change)
    /// has too. Proposes the no-op the first time, and again if it failed.
    pub(super) fn caught_up(&mut self, now: u64) -> bool {
        match self.barrier {
            Some(Barrier::Passed) => true,
            Some(Barrier::Proposed(_)) => false,
            None | Some(Barrier::Retry) => {
                if let Some(meta) = self.meta.as_mut()
                    && let Ok(nonce) = meta.propose_for_client(now, crate::cluster::meta::entry::MetaEntry::Noop)
                {
                    self.barrier = Some(Barrier::Proposed(nonce));
                }
                false
            }
        }
    }

    /// Hands the node's hit counts to the metadata log (for canaries).
    pub(super) fn report_counts(&mut self) {
        let Some(host) = self.host() else { return };
        let (hits, misses) = host.hit_counts();
        if let Some(meta) = self.meta.as_mut() {
            meta.set_counts(hits, misses);
        }
    }

    /// Whether this member runs the policy the log asks of it (or the log
    /// asks none): a member starts serving only then.
    pub(super) fn policy_ready(&self) -> bool {
        let Some(state) = self.meta.as_ref().and_then(MetaMember::state) else { return false };
        match state.policy_for(self.me) {
            None => true,
            Some(wanted) => {
                self.policy.last_error.is_none()
                    && self.policy.applied.as_ref().is_some_and(|(active, _)| active.as_ref() == Some(wanted))
            }
        }
    }

    /// Brings this member's policy to the log's: fetches modules it lacks,
    /// then applies on a blocking thread.
    pub(super) fn reconcile_policy(&mut self) {
        if self.policy.busy {
            return;
        }
        let Some(host) = self.host() else { return };
        let Some(state) = self.meta.as_ref().and_then(MetaMember::state) else { return };
        // A canary member runs the canary's module; the rest the active one.
        let target: Target = (state.policy_for(self.me).cloned(), state.shadow.clone());
        let index = state.applied;
        if self.policy.applied.as_ref() == Some(&target) {
            // Runs it (unless applying it failed: then a waiting admin
            // command times out and says so).
            if self.policy.last_error.is_none() {
                self.policy_applied.fetch_max(index, std::sync::atomic::Ordering::AcqRel);
            }
            return;
        }
        // The modules the target needs, by hash, with who stored them.
        let mut needed: Vec<(String, NodeIx)> = Vec::new();
        if let Some(sha) = target.0.as_ref().and_then(|a| a.sha256.clone()) {
            let origin = state.modules.values().find(|m| m.module.sha256 == sha).map_or(self.me, |m| m.origin);
            needed.push((sha, origin));
        }
        if let Some(m) = target.1.as_ref().and_then(|l| state.modules.get(l)) {
            needed.push((m.module.sha256.clone(), m.origin));
        }
        let serving: Vec<NodeIx> = state
            .members
            .values()
            .filter(|m| m.state == crate::cluster::meta::entry::MemberState::Serving && m.node != self.me)
            .map(|m| m.node)
            .collect();
        let now = self.now();
        let mut missing = false;
        for (sha, origin) in needed {
            if host.has_module(&sha) {
                self.policy.wanted.remove(&sha);
                continue;
            }
            missing = true;
            if self.policy.installing.contains(&sha) {
                continue;
            }
            let due = self.policy.wanted.get(&sha).is_none_or(|at| now >= *at);
            if due {
                self.policy.wanted.insert(sha.clone(), now + ASK_AGAIN_MS);
                // The member that stored it first, and one other serving
                // member in turn (the origin may be down).
                let other = serving.get((now / ASK_AGAIN_MS) as usize % serving.len().max(1)).copied();
                let asks: BTreeSet<NodeIx> =
                    [Some(origin), other].into_iter().flatten().filter(|n| *n != self.me).collect();
                for node in asks {
                    if let Some(&addr) = self.peers.get(&node) {
                        self.send_to(addr, PeerFrame::Meta(MetaFrame::ModuleWant { sha256: sha.clone() }));
                    }
                }
            }
        }
        if missing {
            return;
        }
        self.policy.busy = true;
        let done = self.policy_done_tx.clone();
        tokio::task::spawn_blocking(move || {
            let result = host.apply(target.0.as_ref(), target.1.as_deref());
            let _ = done.send(PolicyDone::Applied(target, index, result));
        });
    }

    /// A blocking policy task finished.
    pub(super) fn policy_done(&mut self, done: PolicyDone) {
        match done {
            PolicyDone::Applied(target, index, result) => {
                self.policy.busy = false;
                if result.is_ok() {
                    self.policy_applied.fetch_max(index, std::sync::atomic::Ordering::AcqRel);
                }
                let label = target.0.as_ref().map(|a| a.label.clone());
                match result {
                    Ok(message) => {
                        tracing::info!(node = self.me, policy = ?label, shadow = ?target.1, "cluster policy applied: {message}");
                        self.policy.last_error = None;
                    }
                    Err(err) => {
                        tracing::error!(node = self.me, policy = ?label, %err, "cluster policy not applied on this member");
                        self.policy.last_error = Some(err);
                    }
                }
                self.policy.applied = Some(target);
            }
            PolicyDone::Installed(sha, result) => {
                self.policy.installing.remove(&sha);
                match result {
                    Ok(message) => tracing::info!(node = self.me, %sha, "policy module fetched: {message}"),
                    Err(err) => {
                        tracing::error!(node = self.me, %sha, %err, "a fetched policy module was refused");
                        self.policy.last_error = Some(err);
                    }
                }
            }
        }
        self.reconcile_policy();
    }

    /// A peer asks for a module's bytes, or sends them.
    pub(super) fn module_frame(&mut self, from: SocketAddr, frame: MetaFrame) {
        let Some(host) = self.host() else { return };
        match frame {
            MetaFrame::ModuleWant { sha256 } => {
                // Only modules the log stores are handed out.
                let stored = self
                    .meta
                    .as_ref()
                    .and_then(MetaMember::state)
                    .is_some_and(|s| s.modules.values().any(|m| m.module.sha256 == sha256));
                if !stored {
                    return;
                }
                if let Some(bytes) = host.module_bytes(&sha256) {
                    self.send_to(from, PeerFrame::Meta(MetaFrame::Module { sha256, bytes: bytes.into() }));
                }
            }
            MetaFrame::Module { sha256, bytes } => {
                let Some(state) = self.meta.as_ref().and_then(MetaMember::state) else { return };
                let Some(record) = state.modules.values().find(|m| m.module.sha256 == sha256) else { return };
                if !self.policy.wanted.contains_key(&sha256) || self.policy.installing.contains(&sha256) {
                    return;
                }
                if crate::registry::sha256_hex(&bytes) != sha256 {
                    tracing::warn!(%from, %sha256, "a policy module whose bytes do not match its hash; dropped");
                    return;
                }
                let module = record.module.clone();
                self.policy.installing.insert(sha256.clone());
                let done = self.policy_done_tx.clone();
                tokio::task::spawn_blocking(move || {
                    let result = host.install(&module, &bytes);
                    let _ = done.send(PolicyDone::Installed(sha256, result));
                });
            }
            _ => {}
        }
    }
}
