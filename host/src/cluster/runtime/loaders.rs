//! The node's read-through loaders on a cluster: attached to the
//! [`Cluster`], they run at each key's primary owner, and a CDC
//! notification becomes a delete on every replica, retried while the
//! cluster cannot take it.

use super::{Cluster, Command, level};
use crate::cluster::replica::Op;
use crate::cluster::update::Update;
use crate::loader::Loaders;
use bytes::Bytes;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::oneshot;

/// How long a CDC invalidation is retried before it is given up (logged;
/// the value then lives until its TTL).
const INVALIDATE_FOR: Duration = Duration::from_secs(30);
/// CDC invalidations retried at once, at most; beyond it one is tried once.
const MAX_INVALIDATING: usize = 10_000;

impl Cluster {
    /// Makes the node's loaders run at each key's primary owner: GETs of
    /// their namespaces load there once, writes of those keys are
    /// serialized with the loads, and a CDC notification deletes the key on
    /// every replica. Refused for namespaces that write to their origin.
    pub fn attach_loaders(self: &Arc<Self>, loaders: &Arc<Loaders>) -> Result<(), String> {
        let this = Arc::downgrade(self);
        loaders.replicate(Box::new(move |key| {
            if let Some(this) = this.upgrade() {
                this.invalidate(key);
            }
        }))?;
        self.loaders.set(loaders.clone()).map_err(|_| "the cluster already has loaders".to_string())
    }

    /// Deletes `key` on every replica, through its primary (serialized with
    /// a load in flight), retrying with back-off for up to
    /// [`INVALIDATE_FOR`] when it fails (a primary failing over, a member
    /// not serving yet): a lost invalidation would leave a stale value
    /// until its TTL. A retried delete may remove a value loaded since,
    /// which only costs a load. Beyond [`MAX_INVALIDATING`] at once (the
    /// cluster down under a flood of changes) each is tried once.
    fn invalidate(self: &Arc<Self>, key: Bytes) {
        use std::sync::atomic::Ordering;
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            let (reply, _) = oneshot::channel();
            let op = Op::Update { key, update: Update::Expire(0) };
            let _ = self.commands.send(Command { op, level: level(self.default), reply });
            return;
        };
        let retry = self.invalidating.fetch_add(1, Ordering::AcqRel) < MAX_INVALIDATING;
        let this = self.clone();
        runtime.spawn(async move {
            let give_up = Instant::now() + INVALIDATE_FOR;
            let mut wait = Duration::from_millis(50);
            loop {
                let op = Op::Update { key: key.clone(), update: Update::Expire(0) };
                match this.run(op, level(this.default)).await {
                    Ok(_) => break,
                    Err(err) if retry && Instant::now() + wait < give_up => {
                        tracing::debug!(?err, "a CDC invalidation failed; retrying");
                        tokio::time::sleep(wait).await;
                        wait = (wait * 2).min(Duration::from_secs(2));
                    }
                    Err(err) => {
                        tracing::error!(
                            key = %key.escape_ascii(),
                            ?err,
                            "a CDC invalidation could not be applied; the value lives until its TTL"
                        );
                        break;
                    }
                }
            }
            this.invalidating.fetch_sub(1, Ordering::AcqRel);
        });
    }

    /// Whether `key`'s loader namespace writes to its origin.
    pub(super) fn writes_to_origin(&self, key: &[u8]) -> bool {
        self.loaders.get().is_some_and(|l| l.write_mode(key).is_some())
    }

    /// The load timeout of `key`'s loader namespace; `None` when no loader
    /// covers it.
    pub(super) fn loads(&self, key: &[u8]) -> Option<u64> {
        self.loaders.get()?.load_timeout_ms(key)
    }
}
