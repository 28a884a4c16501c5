//! The metadata log's policy on this member: client proposals in and
//! their fates out, and the shell of [`PolicyFollower`] and [`StartGate`]
//! (`cluster::policy`): modules fetched from the members that have them,
//! the log's active and shadow policy applied through the node's
//! [`PolicyHost`] on a blocking thread.

use super::Shell;
use crate::cluster::meta::entry::MetaEntry;
use crate::cluster::meta::member::{MetaFrame, MetaMember};
use crate::cluster::policy::{Gate, PolicyFollower, PolicyHost, PolicyStep, Target};
use crate::cluster::runtime::policies::Proposal;
use crate::cluster::transport::PeerFrame;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;

/// What the policy side of the shell keeps.
#[derive(Default)]
pub(super) struct PolicyApply {
    /// Client proposals waiting for their fate, by nonce.
    waiting: HashMap<u64, std::sync::mpsc::SyncSender<Result<u64, String>>>,
    /// Where this member stands against the log's policy.
    follower: PolicyFollower,
}

/// What a blocking policy task reports back to the shell.
pub(super) enum PolicyDone {
    /// The target, as of this log index.
    Applied(Target, u64, Result<String, String>),
    Installed(String, Result<String, String>),
    /// The log's loader configuration as of this index was built (or
    /// not); see `shell::loaders`.
    Loaders(Option<crate::cluster::meta::entry::LoaderSetting>, u64, Result<String, String>),
    /// A fetched loader module was kept (or not).
    LoaderModule(String, Result<(), String>),
}

impl Shell {
    fn host(&self) -> Option<Arc<dyn PolicyHost>> {
        self.policy_host.get().and_then(std::sync::Weak::upgrade)
    }

    /// A client's proposal: into the log, its answer kept for later.
    pub(super) fn propose_for_client(&mut self, proposal: Proposal) {
        let now = self.now();
        if let MetaEntry::SetLoaders { setting, if_none: true } = proposal.entry {
            // A member's `--loaders`: proposed until decided, and the
            // member waits for it before serving.
            self.seed_loaders(setting);
            return;
        }
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
    /// tells the start-up gate of its barrier's).
    pub(super) fn answer_decided(&mut self) {
        while let Some((nonce, result)) = self.meta.as_mut().and_then(MetaMember::poll_decided) {
            if let Some(reply) = self.policy.waiting.remove(&nonce) {
                let _ = reply.send(result);
            } else if !self.seed_decided(nonce, &result) {
                self.gate.decided(nonce, result.is_ok());
            }
        }
    }

    /// Whether this member may start serving (see [`StartGate`]):
    /// proposes the gate's no-op when it asks for one.
    ///
    /// [`StartGate`]: crate::cluster::policy::StartGate
    pub(super) fn may_serve(&mut self, now: u64) -> bool {
        let ready =
            self.meta.as_ref().and_then(MetaMember::state).is_some_and(|s| self.policy.follower.ready(self.me, s))
                && self.loaders_ready();
        match self.gate.poll(now, ready) {
            Gate::Propose => {
                if let Some(meta) = self.meta.as_mut()
                    && let Ok(nonce) = meta.propose_for_client(now, MetaEntry::Noop)
                {
                    self.gate.proposed(nonce);
                }
                false
            }
            Gate::Wait => false,
            Gate::Serve => true,
            Gate::ServeWithoutPolicy => {
                tracing::warn!("serving without the cluster's active policy: it could not be installed in time");
                true
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

    /// Brings this member's policy to the log's: asks for the modules it
    /// lacks, applies the target on a blocking thread once they are here.
    pub(super) fn reconcile_policy(&mut self) {
        let Some(host) = self.host() else { return };
        let Some(state) = self.meta.as_ref().and_then(MetaMember::state) else { return };
        let now = self.now();
        let has = |sha: &str| host.has_module(sha);
        let steps = self.policy.follower.reconcile(self.me, now, state, &has);
        self.policy_applied.fetch_max(self.policy.follower.runs_through(), Ordering::AcqRel);
        for step in steps {
            match step {
                PolicyStep::Want { sha256, from } => self.ask_for_module(&sha256, &from),
                PolicyStep::Apply { target, index } => {
                    let done = self.policy_done_tx.clone();
                    let host = host.clone();
                    tokio::task::spawn_blocking(move || {
                        let result = host.apply(target.0.as_ref(), target.1.as_deref());
                        let _ = done.send(PolicyDone::Applied(target, index, result));
                    });
                }
            }
        }
    }

    /// Asks `from` for the bytes of the module (policy or loader) with
    /// this hash.
    pub(super) fn ask_for_module(&mut self, sha256: &str, from: &[crate::cluster::replica::NodeIx]) {
        for node in from {
            if let Some(&addr) = self.peers.get(node) {
                let want = MetaFrame::ModuleWant { sha256: sha256.to_string() };
                self.send_to(addr, PeerFrame::Meta(want));
            }
        }
    }

    /// A blocking policy task finished.
    pub(super) fn policy_done(&mut self, done: PolicyDone) {
        match done {
            done @ (PolicyDone::Loaders(..) | PolicyDone::LoaderModule(..)) => return self.loaders_done(done),
            PolicyDone::Applied(target, index, result) => {
                let label = target.0.as_ref().map(|a| a.label.clone());
                match &result {
                    Ok(message) => {
                        tracing::info!(node = self.me, policy = ?label, shadow = ?target.1, "cluster policy applied: {message}");
                    }
                    Err(err) => {
                        tracing::error!(node = self.me, policy = ?label, %err, "cluster policy not applied on this member");
                    }
                }
                self.policy.follower.applied(target, index, &result);
            }
            PolicyDone::Installed(sha, result) => {
                match &result {
                    Ok(message) => tracing::info!(node = self.me, %sha, "policy module fetched: {message}"),
                    Err(err) => tracing::error!(node = self.me, %sha, %err, "a fetched policy module was refused"),
                }
                self.policy.follower.installed(&sha, &result);
            }
        }
        self.reconcile_policy();
    }

    /// A peer asks for a module's bytes, or sends them.
    pub(super) fn module_frame(&mut self, from: SocketAddr, frame: MetaFrame) {
        if self.loader_module_frame(from, &frame) {
            return;
        }
        let Some(host) = self.host() else { return };
        match frame {
            MetaFrame::ModuleWant { sha256 } => {
                let stored =
                    self.meta.as_ref().and_then(MetaMember::state).is_some_and(|s| PolicyFollower::shares(s, &sha256));
                if !stored {
                    return;
                }
                if let Some(bytes) = host.module_bytes(&sha256) {
                    self.send_to(from, PeerFrame::Meta(MetaFrame::Module { sha256, bytes: bytes.into() }));
                }
            }
            MetaFrame::Module { sha256, bytes } => {
                if crate::registry::sha256_hex(&bytes) != sha256 {
                    tracing::warn!(%from, %sha256, "a policy module whose bytes do not match its hash; dropped");
                    return;
                }
                let Some(state) = self.meta.as_ref().and_then(MetaMember::state) else { return };
                let Some(module) = self.policy.follower.offered(state, &sha256) else { return };
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
