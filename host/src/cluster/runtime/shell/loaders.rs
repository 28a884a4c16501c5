//! The metadata log's loader configuration on this member: the shell of
//! [`LoaderFollower`] (`cluster::loaders`). Modules come from the members
//! that hold them (the same `ModuleWant`/`Module` frames as policy
//! modules), are kept in [`LoaderModules`], and the node builds its
//! loaders from the log's configuration through its [`LoaderHost`] on a
//! blocking thread (building compiles every module). A member started
//! with `--loaders` proposes its file's configuration once, for a log
//! that has none, and does not serve before that proposal is decided.

use super::Shell;
use super::policy::PolicyDone;
use crate::cluster::loaders::{LoaderFollower, LoaderHost, LoaderStep};
use crate::cluster::meta::entry::{LoaderSetting, MetaEntry};
use crate::cluster::meta::member::{MetaFrame, MetaMember};
use crate::cluster::runtime::loader_modules::LoaderModules;
use crate::cluster::runtime::loaders::{LoaderHostSlot, LoaderOutcome};
use crate::cluster::transport::PeerFrame;
use crate::loader::LoaderSlot;
use std::net::SocketAddr;
use std::sync::Arc;

/// Modules kept this recently are not forgotten, whatever the log says.
const KEEP_RECENT: std::time::Duration = std::time::Duration::from_secs(600);

/// What the shell shares with the [`Cluster`] handle about loaders.
///
/// [`Cluster`]: crate::cluster::runtime::Cluster
pub(in crate::cluster::runtime) struct LoaderShared {
    /// The loaders loads run with.
    pub(in crate::cluster::runtime) slot: Arc<LoaderSlot>,
    /// The node, which builds them.
    pub(in crate::cluster::runtime) host: Arc<LoaderHostSlot>,
    /// The modules held here.
    pub(in crate::cluster::runtime) modules: Arc<LoaderModules>,
    /// The last configuration applied, and how it went.
    pub(in crate::cluster::runtime) outcome: Arc<LoaderOutcome>,
}

/// The loader side of the shell.
pub(super) struct LoaderApply {
    pub(super) shared: LoaderShared,
    follower: LoaderFollower,
    /// This member's `--loaders` configuration, until the log decided its
    /// proposal; the nonce it was proposed under.
    seed: Option<(LoaderSetting, Option<u64>)>,
}

impl LoaderApply {
    pub(super) fn new(shared: LoaderShared) -> Self {
        Self { shared, follower: LoaderFollower::default(), seed: None }
    }
}

impl Shell {
    fn loader_host(&self) -> Option<Arc<dyn LoaderHost>> {
        self.loader.shared.host.get().and_then(std::sync::Weak::upgrade)
    }

    /// Takes this member's `--loaders` configuration (a `SetLoaders` with
    /// `if_none`): proposed until the log decides it.
    pub(super) fn seed_loaders(&mut self, setting: Option<LoaderSetting>) {
        if let Some(setting) = setting {
            self.loader.seed = Some((setting, None));
            self.propose_seed();
        }
    }

    /// Proposes the seed if it is not in flight (the log may not be
    /// running yet: tried again on the next tick).
    fn propose_seed(&mut self) {
        let now = self.now();
        let (Some((setting, nonce @ None)), Some(meta)) = (self.loader.seed.as_mut(), self.meta.as_mut()) else {
            return;
        };
        let entry = MetaEntry::SetLoaders { setting: Some(setting.clone()), if_none: true };
        if let Ok(proposed) = meta.propose_for_client(now, entry) {
            *nonce = Some(proposed);
        }
    }

    /// A proposal of this member's was decided: whether it was the seed's.
    pub(super) fn seed_decided(&mut self, nonce: u64, result: &Result<u64, String>) -> bool {
        if !matches!(&self.loader.seed, Some((_, Some(n))) if *n == nonce) {
            return false;
        }
        let has_one = self.meta.as_ref().and_then(MetaMember::state).is_some_and(|s| s.loaders.is_some());
        match result {
            Ok(_) => self.loader.seed = None,
            Err(_) if has_one => {
                tracing::info!(node = self.me, "the cluster has a loader configuration: following it, not --loaders");
                self.loader.seed = None;
            }
            // Not decided (no leader reachable): proposed again.
            Err(err) => {
                tracing::debug!(%err, "the --loaders proposal did not apply; proposing it again");
                if let Some((_, nonce)) = self.loader.seed.as_mut() {
                    *nonce = None;
                }
            }
        }
        true
    }

    /// Whether this member runs the log's loader configuration (and its
    /// own `--loaders` proposal, if any, was decided).
    pub(super) fn loaders_ready(&self) -> bool {
        self.loader.seed.is_none()
            && self.meta.as_ref().and_then(MetaMember::state).is_some_and(|s| self.loader.follower.ready(s))
    }

    /// Brings this member's loaders to the log's configuration.
    pub(super) fn reconcile_loaders(&mut self) {
        self.propose_seed();
        let Some(host) = self.loader_host() else { return };
        let Some(state) = self.meta.as_ref().and_then(MetaMember::state) else { return };
        let now = self.now();
        let modules = self.loader.shared.modules.clone();
        let has = |sha: &str| modules.has(sha);
        let steps = self.loader.follower.reconcile(self.me, now, state, &has);
        if self.loader.follower.ready(state) {
            // Already running the log's configuration (set again, say):
            // as of this index too, for whoever waits on it.
            let mut outcome = self.loader.shared.outcome.lock().unwrap_or_else(|p| p.into_inner());
            if outcome.0 < state.applied {
                *outcome = (state.applied, Ok("this member runs it".into()));
            }
        }
        for step in steps {
            match step {
                LoaderStep::Want { sha256, from } => self.ask_for_module(&sha256, &from),
                LoaderStep::Apply { setting, index } => {
                    let done = self.policy_done_tx.clone();
                    let host = host.clone();
                    let modules = modules.clone();
                    tokio::task::spawn_blocking(move || {
                        let result = host.apply_loaders(setting.as_ref(), &|sha| modules.get(sha));
                        let _ = done.send(PolicyDone::Loaders(setting, index, result));
                    });
                }
            }
        }
    }

    /// A blocking loader task finished.
    pub(super) fn loaders_done(&mut self, done: PolicyDone) {
        match done {
            PolicyDone::Loaders(setting, index, result) => {
                match &result {
                    Ok(message) => tracing::info!(node = self.me, index, "cluster loaders applied: {message}"),
                    Err(err) => {
                        tracing::error!(node = self.me, index, %err, "cluster loaders not applied on this member")
                    }
                }
                *self.loader.shared.outcome.lock().unwrap_or_else(|p| p.into_inner()) = (index, result.clone());
                if result.is_ok() {
                    self.forget_old_modules(setting.as_ref());
                }
                let now = self.now();
                self.loader.follower.applied(now, setting, &result);
            }
            PolicyDone::LoaderModule(sha, result) => {
                if let Err(err) = &result {
                    tracing::error!(node = self.me, %sha, %err, "a fetched loader module was not kept");
                }
                self.loader.follower.stored(&sha, &result);
            }
            _ => return,
        }
        self.reconcile_loaders();
    }

    /// Keeps only the modules of the configuration just applied, of the
    /// log's, and those kept recently (a configuration proposed through
    /// this member, whose entry is not applied yet: this member is the
    /// one the others fetch it from).
    fn forget_old_modules(&self, applied: Option<&LoaderSetting>) {
        let state = self.meta.as_ref().and_then(MetaMember::state);
        let in_log = state.and_then(|s| s.loaders.as_ref()).map(|r| &r.setting);
        let keep: Vec<String> =
            applied.into_iter().chain(in_log).flat_map(|s| &s.modules).map(|(sha, _)| sha.clone()).collect();
        let keep: Vec<&str> = keep.iter().map(String::as_str).collect();
        self.loader.shared.modules.retain(&keep, KEEP_RECENT);
    }

    /// A peer asks for a loader module, or sends one: whether the frame
    /// was about a loader module.
    pub(super) fn loader_module_frame(&mut self, from: SocketAddr, frame: &MetaFrame) -> bool {
        let Some(state) = self.meta.as_ref().and_then(MetaMember::state) else { return false };
        match frame {
            MetaFrame::ModuleWant { sha256 } if LoaderFollower::shares(state, sha256) => {
                if let Some(bytes) = self.loader.shared.modules.get(sha256) {
                    let module = MetaFrame::Module { sha256: sha256.clone(), bytes: bytes.to_vec().into() };
                    self.send_to(from, PeerFrame::Meta(module));
                }
                true
            }
            MetaFrame::Module { sha256, bytes } if LoaderFollower::shares(state, sha256) => {
                if !self.loader.follower.offered(state, sha256) {
                    return true;
                }
                let (done, modules) = (self.policy_done_tx.clone(), self.loader.shared.modules.clone());
                let (sha256, bytes) = (sha256.clone(), bytes.to_vec());
                tokio::task::spawn_blocking(move || {
                    let result = modules.put(&sha256, bytes);
                    let _ = done.send(PolicyDone::LoaderModule(sha256, result));
                });
                true
            }
            _ => false,
        }
    }

    /// What `cachet stats` shows of this member's loaders.
    pub(super) fn loader_status(&self) -> Option<String> {
        let state = self.meta.as_ref().and_then(MetaMember::state)?;
        let record = state.loaders.as_ref()?;
        let hash = crate::registry::sha256_hex(record.setting.config.as_bytes());
        let (index, result) = self.loader.shared.outcome.lock().map(|o| o.clone()).ok()?;
        let here = match (self.loader.follower.ready(state), result) {
            (true, _) => "running here".to_string(),
            (false, Err(err)) if index >= record.since => format!("not running here: {err}"),
            (false, _) => match self.loader.follower.last_error() {
                Some(err) => format!("not running here: {err}"),
                None => "being built here".to_string(),
            },
        };
        Some(format!(
            "configuration {} ({} module{}) set at log index {} by node {}; {here}",
            &hash[..12],
            record.setting.modules.len(),
            if record.setting.modules.len() == 1 { "" } else { "s" },
            record.since,
            record.origin
        ))
    }
}
