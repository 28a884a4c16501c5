//! The node's policy control plane attached to the cluster: policy
//! commands become metadata log entries ([`Cluster::propose`]), and the
//! runtime applies the log's policy on this member through the node's
//! [`PolicyHost`] (see `shell::policy`).

use super::Cluster;
use crate::cluster::meta::entry::MetaEntry;
use crate::cluster::policy::PolicyHost;
use std::sync::{OnceLock, Weak};
use std::time::Duration;

/// A proposal for the metadata log from a client thread, and where its
/// fate goes (the log index where it applied on this member, or why not).
pub(super) struct Proposal {
    pub(super) entry: MetaEntry,
    pub(super) reply: std::sync::mpsc::SyncSender<Result<u64, String>>,
}

/// The node's policy host, once attached (weak: the node owns the
/// cluster).
pub(super) type Host = OnceLock<Weak<dyn PolicyHost>>;

impl Cluster {
    /// Lets the runtime apply the log's policy entries to the node.
    pub fn attach_policies(&self, host: Weak<dyn PolicyHost>) -> Result<(), String> {
        self.policies.set(host).map_err(|_| "policies attached twice".to_string())
    }

    /// Waits (blocking, at most `limit`) until this member runs the log's
    /// policy as of `index`; whether it does.
    pub fn wait_policy_applied(&self, index: u64, limit: Duration) -> bool {
        let start = std::time::Instant::now();
        while self.policy_applied.load(std::sync::atomic::Ordering::Acquire) < index {
            if start.elapsed() > limit {
                return false;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        true
    }

    /// Proposes `entry` without waiting for its fate (from threads that
    /// must not block, such as the policy supervisor's).
    pub fn propose_detached(&self, entry: MetaEntry) {
        let (reply, _) = std::sync::mpsc::sync_channel(1);
        let _ = self.proposals.send(Proposal { entry, reply });
    }

    /// Proposes `entry` to the cluster's metadata log and waits (blocking,
    /// at most `limit`) until it applied on this member: the log index, or
    /// why it did not (refused by the log's state, no leader reachable).
    /// For blocking threads only (admin commands run on one).
    pub fn propose(&self, entry: MetaEntry, limit: Duration) -> Result<u64, String> {
        let (reply, answer) = std::sync::mpsc::sync_channel(1);
        self.proposals.send(Proposal { entry, reply }).map_err(|_| "the cluster runtime stopped".to_string())?;
        match answer.recv_timeout(limit) {
            Ok(result) => result,
            Err(_) => Err(format!(
                "the cluster's metadata log did not apply it within {:.1} s (no leader reachable?)",
                limit.as_secs_f64()
            )),
        }
    }
}
