//! The node's read-through loaders on a cluster: attached to the
//! [`Cluster`], they run at each key's primary owner, and a CDC
//! notification becomes a delete on every replica, retried while the
//! cluster cannot take it. Which loaders run is the metadata log's
//! loader configuration (`cluster::loaders`): set here through
//! [`Cluster::set_loaders`] or seeded by a member's `--loaders`, built on
//! every member by the shell (`shell::loaders`) through the node's
//! [`LoaderHost`].

use super::{Cluster, Command, level};
use crate::cluster::loaders::LoaderHost;
use crate::cluster::meta::entry::{LoaderSetting, MetaEntry};
use crate::cluster::replica::Op;
use crate::cluster::update::Update;
use crate::loader::Loaders;
use crate::loader::shared::SharedLoaders;
use bytes::Bytes;
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::{Duration, Instant};
use tokio::sync::oneshot;

/// The node's loader host, once attached (weak: the node owns the
/// cluster).
pub(super) type LoaderHostSlot = OnceLock<Weak<dyn LoaderHost>>;

/// The last loader configuration this member applied: the log index it
/// was the log's at, and what came of it.
pub(super) type LoaderOutcome = Mutex<(u64, Result<String, String>)>;

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
    /// The loaders the cluster runs loads with from now on (`None`: none),
    /// replacing those it had.
    pub fn attach_loaders(self: &Arc<Self>, loaders: Option<&Arc<Loaders>>) -> Result<(), String> {
        if let Some(loaders) = loaders {
            let this = Arc::downgrade(self);
            loaders.replicate(Box::new(move |key| {
                if let Some(this) = this.upgrade() {
                    this.invalidate(key);
                }
            }))?;
        }
        self.loaders.replace(loaders.cloned());
        Ok(())
    }

    /// Lets the runtime build the log's loaders on this node.
    pub fn attach_loader_host(&self, host: Weak<dyn LoaderHost>) -> Result<(), String> {
        self.loader_host.set(host).map_err(|_| "a loader host attached twice".to_string())
    }

    /// Keeps `shared`'s modules here and the configuration, as this
    /// member's proposal, for the log if it has none yet (a member started
    /// with `--loaders`): the log's configuration wins over a member's
    /// file, and the member does not serve before it runs the log's.
    pub fn seed_loaders(&self, shared: SharedLoaders) -> Result<(), String> {
        let setting = self.keep_modules(shared)?;
        self.propose_detached(MetaEntry::SetLoaders { setting: Some(setting), if_none: true });
        Ok(())
    }

    /// Makes `shared` the cluster's loader configuration (`None`: no
    /// loaders): its modules kept here, the configuration proposed to the
    /// log, and waited for (blocking, at most `limit`) until this member
    /// runs it. What this member did, or why not.
    pub fn set_loaders(&self, shared: Option<SharedLoaders>, limit: Duration) -> Result<String, String> {
        let setting = shared.map(|shared| self.keep_modules(shared)).transpose()?;
        let start = Instant::now();
        let index = self.propose(MetaEntry::SetLoaders { setting, if_none: false }, limit)?;
        loop {
            {
                let outcome = self.loader_outcome.lock().unwrap_or_else(|p| p.into_inner());
                if outcome.0 >= index {
                    return outcome.1.clone().map(|done| format!("log index {index}: {done}"));
                }
            }
            if start.elapsed() > limit {
                return Err(format!(
                    "the loader configuration is in the log (index {index}) but this member did not run it within {:.1} s",
                    limit.as_secs_f64()
                ));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Checks a shared configuration and keeps its modules here (this
    /// member is where the others fetch them from); its log form.
    fn keep_modules(&self, shared: SharedLoaders) -> Result<LoaderSetting, String> {
        let (_, named) = crate::loader::shared::parse(&shared.config).map_err(|e| e.to_string())?;
        if let Some(missing) = named.iter().find(|sha| !shared.modules.iter().any(|(s, _)| s == *sha)) {
            return Err(format!("the loader configuration names module {missing}, which was not sent"));
        }
        let mut modules = Vec::new();
        for (sha, bytes) in shared.modules {
            modules.push((sha.clone(), bytes.len() as u64));
            self.loader_modules.put(&sha, bytes)?;
        }
        Ok(LoaderSetting { config: shared.config, modules })
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
