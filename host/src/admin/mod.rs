//! Live policy operations on a node: load, activate (hot-swap), rollback,
//! list, shadow evaluation, and the supervisor that quarantines a module
//! that keeps faulting and puts the previous version back.
//!
//! A swap goes shard by shard: each shard is locked only while its new
//! policy is instantiated and fed the resident entries in the old policy's
//! eviction order, so there is no global pause and no request fails; other
//! shards keep serving meanwhile. If any shard refuses the new policy, the
//! shards already swapped are swapped back and the activation fails as a
//! whole. One policy operation runs at a time; a second one gets `Busy`.

mod cluster;
mod guard;

use crate::core::{PolicyFactory, Shard, replay_snapshot};
use crate::registry::{Activation, ModuleLimits, Registry, RegistryError, parse_label};
use crate::shadow::Shadow;
use crate::store::Store;
use cachet_proto::{
    AdminCommand, ErrorCode, ErrorReply, ModuleListing, NodeStats, PolicyListing, Response, ShardListing,
};
use guard::{Source, TokenGuard};
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, TryLockError};
use std::time::{Duration, Instant};

/// What every shard is configured with, and what each module has cost.
pub(crate) struct ActiveState {
    pub(crate) activation: Activation,
    pub(crate) factory: Arc<dyn PolicyFactory>,
    /// `name@version` per shard; they differ only during a swap.
    shard_labels: Vec<String>,
    /// Faults counted against modules no longer installed, by label.
    retired_faults: HashMap<String, u64>,
    /// Per-shard durations of the last swap, in microseconds.
    pub(crate) last_swap_us: Vec<u64>,
}

/// Told of a quarantine: the module's `name@version` and the reason.
pub(crate) type QuarantineHook = Box<dyn Fn(&str, &str) + Send + Sync>;

/// A node's policy control plane. See the module docs.
pub(crate) struct Control {
    /// The shards the policies run in.
    store: Arc<Store>,
    /// SHA-256 of the admin token, `None` when admin commands are disabled.
    /// Only the digest is kept so that comparing costs the same whatever the
    /// guess's length and wherever it differs.
    token: Option<TokenDigest>,
    /// Failed admin attempts: throttling per source and for the node, and
    /// their bounded-rate log.
    guard: Mutex<TokenGuard>,
    /// Also the lock that serialises policy operations.
    registry: Mutex<Option<Registry>>,
    pub(crate) state: Mutex<ActiveState>,
    shadow: Mutex<Option<Shadow>>,
    /// The running shadow's sampling threshold; 0 when none runs.
    shadow_threshold: AtomicU64,
    pub(crate) swaps: AtomicU64,
    pub(crate) quarantines: AtomicU64,
    /// Components arriving in chunks, by upload id.
    uploads: Mutex<HashMap<u64, (u64, Vec<u8>)>>,
    /// Told of every quarantine (a clustered node records it in the
    /// cluster's log, so every member drops the module).
    quarantined_hook: std::sync::OnceLock<QuarantineHook>,
    /// What the node was started with: what a cluster member returns to
    /// when the cluster's log names no policy (a canary rolled back before
    /// any cluster-wide activation).
    startup: Activation,
}

/// Largest component accepted through chunked upload.
const MAX_UPLOAD: u64 = 64 << 20;
/// Uploads in progress at once; a new one beyond this drops the oldest.
const MAX_UPLOADS: usize = 4;

impl Control {
    pub(crate) fn new(factory: Arc<dyn PolicyFactory>, store: Arc<Store>) -> Self {
        let shards = store.shard_count();
        let info = factory.info();
        let activation = Activation { name: info.name.clone(), version: info.version.clone(), config: Vec::new() };
        let startup = activation.clone();
        Self {
            store,
            token: None,
            guard: Mutex::new(TokenGuard::default()),
            registry: Mutex::new(None),
            state: Mutex::new(ActiveState {
                shard_labels: vec![activation.label(); shards],
                activation,
                factory,
                retired_faults: HashMap::new(),
                last_swap_us: Vec::new(),
            }),
            shadow: Mutex::new(None),
            shadow_threshold: AtomicU64::new(0),
            swaps: AtomicU64::new(0),
            quarantines: AtomicU64::new(0),
            uploads: Mutex::new(HashMap::new()),
            quarantined_hook: std::sync::OnceLock::new(),
            startup,
        }
    }

    /// Appends `chunk` at `offset` of upload `id` (chunks come in order);
    /// returns the bytes received so far.
    fn uploads_receive(&self, id: u64, offset: u64, total: u64, chunk: &[u8]) -> Result<u64, AdminError> {
        if total > MAX_UPLOAD {
            return Err(AdminError::Upload(format!("{total} bytes is over the {MAX_UPLOAD}-byte limit")));
        }
        let mut uploads = lock(&self.uploads);
        if offset == 0 {
            if uploads.len() >= MAX_UPLOADS
                && let Some(&oldest) = uploads.keys().min()
            {
                uploads.remove(&oldest);
            }
            uploads.insert(id, (total, Vec::with_capacity(total as usize)));
        }
        let (expected, data) =
            uploads.get_mut(&id).ok_or_else(|| AdminError::Upload(format!("no upload {id} in progress")))?;
        if data.len() as u64 != offset || offset + chunk.len() as u64 > total || *expected != total {
            let have = data.len();
            uploads.remove(&id);
            return Err(AdminError::Upload(format!(
                "chunk at {offset} does not follow the {have} bytes received (total {total}); start again"
            )));
        }
        data.extend_from_slice(chunk);
        Ok(data.len() as u64)
    }

    /// The assembled bytes of upload `id`, which ends it.
    pub(crate) fn uploads_take(&self, id: u64) -> Result<bytes::Bytes, AdminError> {
        match lock(&self.uploads).remove(&id) {
            Some((total, data)) if data.len() as u64 == total => Ok(bytes::Bytes::from(data)),
            Some((total, data)) => {
                Err(AdminError::Upload(format!("upload {id} has {} of {total} bytes; send the rest first", data.len())))
            }
            None => Err(AdminError::Upload(format!("no upload {id}; send its chunks first"))),
        }
    }

    /// The running shadow evaluation, if any; `None` costs one atomic load.
    pub(crate) fn shadow(&self) -> Option<MutexGuard<'_, Option<Shadow>>> {
        (self.shadow_threshold.load(Ordering::Relaxed) > 0).then(|| lock(&self.shadow))
    }

    /// The running shadow's sampling threshold, `None` when none runs.
    pub(crate) fn shadow_threshold(&self) -> Option<u64> {
        Some(self.shadow_threshold.load(Ordering::Relaxed)).filter(|&t| t > 0)
    }
}

/// A failed admin command, mapped to a protocol error.
#[derive(Debug, thiserror::Error)]
pub(crate) enum AdminError {
    #[error(transparent)]
    Registry(#[from] RegistryError),
    #[error("admin commands are disabled on this node: start it with --admin-token-file")]
    Disabled,
    #[error("wrong admin token")]
    WrongToken,
    /// Too many wrong tokens lately: every admin attempt, right or wrong,
    /// waits out the back-off, so guessing cannot go on at wire speed.
    #[error("too many failed admin attempts; admin commands are refused for {0} more seconds")]
    Throttled(u64),
    #[error("another policy operation is in progress; try again when it is done")]
    Busy,
    #[error("this node has no policy registry")]
    NoRegistry,
    #[error("{0}")]
    Swap(String),
    #[error("`{0}` is not NAME@VERSION")]
    BadLabel(String),
    #[error("upload: {0}")]
    Upload(String),
}

impl AdminError {
    pub(crate) fn code(&self) -> ErrorCode {
        match self {
            Self::Disabled | Self::WrongToken | Self::Throttled(_) => ErrorCode::Unauthorized,
            Self::Busy => ErrorCode::Busy,
            Self::NoRegistry => ErrorCode::NotAllowed,
            Self::BadLabel(_) | Self::Upload(_) => ErrorCode::InvalidArgument,
            Self::Swap(_) => ErrorCode::InvalidModule,
            Self::Registry(err) => match err {
                RegistryError::NotFound(_) | RegistryError::NoPrevious => ErrorCode::NotFound,
                RegistryError::BadName(_) | RegistryError::Exists(_) | RegistryError::OverLimit { .. } => {
                    ErrorCode::InvalidArgument
                }
                RegistryError::Invalid(_) | RegistryError::Conformance(_) | RegistryError::Quarantined(_) => {
                    ErrorCode::InvalidModule
                }
                RegistryError::Io { .. } | RegistryError::Manifest { .. } => ErrorCode::Internal,
            },
        }
    }
}

/// The SHA-256 of an admin token.
type TokenDigest = [u8; 32];

fn token_digest(token: &str) -> TokenDigest {
    let mut out = [0u8; 32];
    out.copy_from_slice(ring::digest::digest(&ring::digest::SHA256, token.as_bytes()).as_ref());
    out
}

/// Whether `given` is the token whose digest is `expected`, in time that
/// depends only on the length of `given` (which its sender knows): the
/// guess is hashed to the same fixed size as the token, so neither a
/// length mismatch nor the first differing byte can end the comparison
/// early, and the comparison visits every byte of the two digests.
fn token_matches(expected: &TokenDigest, given: &str) -> bool {
    let given = token_digest(given);
    let diff = expected.iter().zip(&given).fold(0u8, |acc, (x, y)| acc | (x ^ y));
    // Keeps the optimiser from turning the fold into an early-exit compare.
    std::hint::black_box(diff) == 0
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Control {
    /// Gives the node a module registry and an admin token (admin commands
    /// are refused without one), and restores the registry's active module
    /// if it has one. A stored activation that no longer works is logged
    /// and the start-up policy kept.
    pub(crate) fn with_registry(mut self, mut registry: Registry, token: Option<String>) -> Self {
        let startup = {
            let state = lock(&self.state);
            registry.set_startup(state.factory.clone(), state.activation.config.clone())
        };
        lock(&self.state).activation = startup.clone();
        self.startup = startup.clone();
        let restore = registry.active().filter(|a| **a != startup).cloned();
        let stored_previous = registry.previous().cloned();
        self.token = token.filter(|t| !t.is_empty()).as_deref().map(token_digest);
        *lock(&self.registry) = Some(registry);
        if let Some(active) = restore {
            match self.activate(&active.name, &active.version, Some(active.config.clone()), false) {
                Ok(message) => {
                    tracing::info!(module = %active.label(), "restored the stored active policy: {message}");
                    // Restoring is not a new activation: rollback still goes
                    // where it went before the restart.
                    if let Some(registry) = lock(&self.registry).as_mut()
                        && let Err(err) = registry.set_previous(stored_previous)
                    {
                        tracing::warn!(%err, "cannot keep the previous version");
                    }
                }
                Err(err) => tracing::warn!(module = %active.label(), %err, "cannot restore the stored active policy"),
            }
        }
        self
    }

    /// Whether `token` opens admin commands on this node now, for a caller
    /// at `source`; the I/O threads answer a wrong token (or any during a
    /// back-off) at once, through [`Control::admin`], instead of handing it
    /// to a blocking thread. Records nothing: [`Control::admin`] counts the
    /// failure.
    pub(crate) fn authorized(&self, token: &str, source: Source) -> bool {
        lock(&self.guard).blocked(Instant::now(), source).is_none()
            && self.token.as_ref().is_some_and(|expected| token_matches(expected, token))
    }

    /// Runs an admin command from `source` if `token` is the node's admin
    /// token and no back-off after failed attempts (from that address, or
    /// from everywhere) is running.
    /// `node_stats` gives the node's stats with its hot keys, for
    /// [`AdminCommand::Stats`].
    pub(crate) fn admin(
        &self,
        token: &str,
        source: Source,
        command: AdminCommand,
        node_stats: impl FnOnce() -> NodeStats,
    ) -> Response {
        let what = command.name();
        let result = self.admit(Instant::now(), token, source).and_then(|()| match command {
            // Read-only and polled by monitoring: not worth a log line.
            AdminCommand::Stats => Ok(Response::Stats(node_stats())),
            command => self.run_admin(command).map(|message| {
                tracing::info!(command = what, "{message}");
                Response::Policies(Box::new(self.policy_listing(message)))
            }),
        });
        match result {
            Ok(reply) => reply,
            Err(err) => {
                if !matches!(err, AdminError::WrongToken | AdminError::Throttled(_)) {
                    tracing::warn!(command = what, %err, "admin command refused");
                }
                Response::Error(ErrorReply::new(err.code(), err.to_string()))
            }
        }
    }

    /// [`Control::admin`]'s admission alone: `None` when `token` from
    /// `source` may run `what`, else the refusal to answer with.
    pub(crate) fn refuse(&self, token: &str, source: Source, what: &str) -> Option<Response> {
        let err = self.admit(Instant::now(), token, source).err()?;
        if !matches!(err, AdminError::WrongToken | AdminError::Throttled(_)) {
            tracing::warn!(command = what, %err, "admin command refused");
        }
        Some(Response::Error(ErrorReply::new(err.code(), err.to_string())))
    }

    /// Checks `token` from `source` at `now` against the back-offs and the
    /// node's token, counting and (at a bounded rate) logging a refusal.
    fn admit(&self, now: Instant, token: &str, source: Source) -> Result<(), AdminError> {
        let Some(expected) = &self.token else {
            return Err(AdminError::Disabled);
        };
        let mut guard = lock(&self.guard);
        let refused = if let Some(left) = guard.blocked(now, source) {
            AdminError::Throttled(left.as_secs().max(1))
        } else if token_matches(expected, token) {
            return Ok(());
        } else {
            guard.fail(now, source);
            AdminError::WrongToken
        };
        if let Some(suppressed) = guard.log_refusal(now) {
            let throttled = guard.blocked(now, source).is_some();
            let source = source.map_or_else(|| "this process".to_owned(), |ip| ip.to_string());
            tracing::warn!(%refused, %source, suppressed, throttled, "admin attempt refused");
        }
        Err(refused)
    }

    /// Runs a policy command; [`AdminCommand::Stats`] is answered by
    /// [`Control::admin`] and never reaches here.
    fn run_admin(&self, command: AdminCommand) -> Result<String, AdminError> {
        match command {
            AdminCommand::Stats => Ok(String::new()),
            AdminCommand::UploadChunk { upload, offset, total, chunk } => {
                let received = self.uploads_receive(upload, offset, total, &chunk)?;
                Ok(format!("upload {upload}: {received} of {total} bytes"))
            }
            AdminCommand::Load { name, version, config, module, fuel_per_call, max_memory_bytes, upload } => {
                let module = match upload {
                    None => module,
                    Some(id) => self.uploads_take(id)?,
                };
                let mut registry = self.try_registry()?;
                let registry = registry.as_mut().ok_or(AdminError::NoRegistry)?;
                let defaults = ModuleLimits::default();
                let limits = ModuleLimits {
                    fuel_per_call: fuel_per_call.unwrap_or(defaults.fuel_per_call),
                    max_memory_bytes: max_memory_bytes.unwrap_or(defaults.max_memory_bytes),
                };
                let record = registry.load(&name, &version, &module, config, limits)?;
                Ok(format!("loaded {} (sha256 {}, {} bytes)", record.label(), record.sha256, module.len()))
            }
            AdminCommand::Activate { name, version, config } => self.activate(&name, &version, config, true),
            AdminCommand::Canary { .. } => Err(AdminError::Swap(
                "a canary needs a cluster: on one node, use `policy shadow` then `activate`".into(),
            )),
            AdminCommand::Decommission { .. } => Err(AdminError::Swap("this node is not in a cluster".into())),
            AdminCommand::SetLoaders { .. } => Err(AdminError::Swap(
                "this node is not in a cluster: its loaders come from `cachet serve --loaders`".into(),
            )),
            AdminCommand::Rollback => {
                let previous = {
                    let registry = self.try_registry()?;
                    let registry = registry.as_ref().ok_or(AdminError::NoRegistry)?;
                    registry.previous().cloned().ok_or(RegistryError::NoPrevious)?
                };
                self.activate(&previous.name, &previous.version, Some(previous.config), true)
                    .map(|m| format!("rolled back: {m}"))
            }
            AdminCommand::List => Ok(String::new()),
            AdminCommand::Shadow { name, version } => self.start_shadow(&name, &version),
        }
    }

    fn try_registry(&self) -> Result<MutexGuard<'_, Option<Registry>>, AdminError> {
        match self.registry.try_lock() {
            Ok(guard) => Ok(guard),
            Err(TryLockError::Poisoned(poisoned)) => Ok(poisoned.into_inner()),
            Err(TryLockError::WouldBlock) => Err(AdminError::Busy),
        }
    }

    /// The label of the bundled policy `name` (`name@version`), if the
    /// registry has one.
    pub(crate) fn bundled_label(&self, name: &str) -> Result<String, String> {
        let guard = self.try_registry().map_err(|e| e.to_string())?;
        let registry = guard.as_ref().ok_or_else(|| AdminError::NoRegistry.to_string())?;
        match registry.bundled_version(name) {
            Some(version) => Ok(crate::registry::label(name, &version)),
            None => Err(format!("no bundled policy named `{name}`")),
        }
    }

    /// Hot-swaps every shard to the bundled policy `label` (`name@version`)
    /// without an admin token: for callers that authorized the change
    /// themselves (`CONFIG SET maxmemory-policy` by a RESP user with
    /// `@admin`, or on a port without users, which is loopback-only).
    pub(crate) fn activate_bundled(&self, label: &str) -> Result<String, String> {
        let (name, version) = split_label(label)?;
        self.activate(&name, &version, None, true).map_err(|e| e.to_string())
    }

    /// Hot-swaps every shard to `name@version`. `exclusive`: fail with
    /// `Busy` rather than wait for another operation.
    fn activate(
        &self,
        name: &str,
        version: &str,
        config: Option<Vec<(String, String)>>,
        exclusive: bool,
    ) -> Result<String, AdminError> {
        let mut guard = if exclusive { self.try_registry()? } else { lock(&self.registry) };
        let registry = guard.as_mut().ok_or(AdminError::NoRegistry)?;
        let (factory, activation) = registry.factory(name, version, config)?;
        let current = lock(&self.state).activation.clone();
        let message = self.swap_all(factory, &activation)?;
        // Re-activating what runs (a fresh instance) keeps the rollback target.
        if activation != current
            && let Err(err) = registry.set_active(activation, current)
        {
            // The shards already run the new module: say so, and that a
            // restart will not remember it.
            tracing::error!(%err, "activation not persisted");
            return Ok(format!("{message}; NOT persisted, a restart restores the previous choice: {err}"));
        }
        Ok(message)
    }

    /// Swaps shard after shard; on a refusal, swaps the ones done back.
    /// Each shard is locked twice, briefly: to snapshot its residents in
    /// eviction order, and to replay what happened since into the new
    /// instance (built and fed the snapshot in between, off the lock) and
    /// install it.
    fn swap_all(&self, factory: Arc<dyn PolicyFactory>, activation: &Activation) -> Result<String, AdminError> {
        let new_label = activation.label();
        let old_factory = lock(&self.state).factory.clone();
        let mut durations = Vec::with_capacity(self.store.shard_count());
        let mut longest_lock = Duration::ZERO;
        let mut entries = 0usize;
        for i in 0..self.store.shard_count() {
            let started = Instant::now();
            let (snapshot, (capacity, seed), retired) = {
                let mut shard = self.store.lock_shard(i);
                let snapshot = shard.begin_swap(self.store.now_ms(), factory.info());
                (snapshot, shard.policy_capacity(), shard.configured_faults())
            };
            let first_lock = started.elapsed();
            let built = factory.create(capacity, seed).and_then(|mut fresh| {
                replay_snapshot(self.store.now_ms(), fresh.as_mut(), &snapshot.entries)?;
                Ok(fresh)
            });
            drop(snapshot);
            let relocked = Instant::now();
            let mut shard = self.store.lock_shard(i);
            let result = match built {
                Ok(fresh) => shard.finish_swap(self.store.now_ms(), factory.clone(), fresh),
                Err(err) => {
                    shard.abort_swap();
                    Err(err)
                }
            };
            drop(shard);
            longest_lock = longest_lock.max(first_lock).max(relocked.elapsed());
            match result {
                Ok(n) => {
                    entries += n;
                    durations.push(started.elapsed().as_micros() as u64);
                    let mut state = lock(&self.state);
                    let old = std::mem::replace(&mut state.shard_labels[i], new_label.clone());
                    *state.retired_faults.entry(old).or_default() += retired;
                }
                Err(err) => {
                    for j in 0..i {
                        let mut shard = self.store.lock_shard(j);
                        if let Err(back) = shard.swap_policy(self.store.now_ms(), old_factory.clone()) {
                            tracing::error!(shard = j, %back, "cannot swap back; the shard keeps the new policy");
                            continue;
                        }
                        drop(shard);
                        let mut state = lock(&self.state);
                        let current = state.activation.label();
                        state.shard_labels[j] = current;
                    }
                    return Err(AdminError::Swap(format!(
                        "shard {i} refused {new_label}: {err}; shards already swapped were put back"
                    )));
                }
            }
        }
        if let Some(shadow) = self.shadow().as_mut().and_then(|s| s.as_mut()) {
            shadow.swap_active(self.store.now_ms(), factory.clone());
        }
        {
            let mut state = lock(&self.state);
            state.activation = activation.clone();
            state.factory = factory;
            state.last_swap_us = durations.clone();
        }
        self.swaps.fetch_add(1, Ordering::Relaxed);
        let total: u64 = durations.iter().sum();
        let slowest = durations.iter().copied().max().unwrap_or(0);
        Ok(format!(
            "activated {new_label} on {} shards ({entries} resident entries handed over) in {:.1} ms; \
             slowest shard {:.1} ms, longest lock {:.1} ms",
            durations.len(),
            total as f64 / 1000.0,
            slowest as f64 / 1000.0,
            longest_lock.as_secs_f64() * 1000.0
        ))
    }

    /// Periodic work (from the node's tick): the shadow's ghosts, and the
    /// supervisor.
    pub(crate) fn tick(&self, now: u64) {
        if let Some(shadow) = self.shadow().as_mut().and_then(|s| s.as_mut()) {
            shadow.tick(now);
        }
        self.supervise();
    }

    /// What every shard is configured to run.
    pub(crate) fn activation(&self) -> Activation {
        lock(&self.state).activation.clone()
    }

    /// Supervisor step (from [`Control::tick`]): when a shard has given up on
    /// the active module after repeated faults, quarantine the module and
    /// put the previous version back on every shard.
    pub(crate) fn supervise(&self) {
        let gave_up = (0..self.store.shard_count()).find(|&i| self.store.lock_shard(i).gave_up());
        let Some(shard) = gave_up else {
            return;
        };
        // Busy with an operator's command: look again at the next tick.
        let Ok(mut guard) = self.try_registry() else {
            return;
        };
        let Some(registry) = guard.as_mut() else {
            return;
        };
        // What that shard runs, read under the registry lock so no swap is
        // halfway; it is the active module unless a swap-back failed.
        let (active, culprit) = {
            let state = lock(&self.state);
            (state.activation.clone(), state.shard_labels.get(shard).cloned().unwrap_or_default())
        };
        if culprit != active.label() {
            tracing::error!(shard, module = %culprit, "a shard gave up on a module that is not the active one; it stays on the fallback");
            return;
        }
        let already =
            registry.records().any(|r| r.name == active.name && r.version == active.version && r.quarantined.is_some());
        if already {
            return;
        }
        let reason = format!("repeated faults on shard {shard}");
        if let Err(err) = registry.quarantine(&active.name, &active.version, &reason) {
            tracing::error!(%err, "cannot record the quarantine");
        }
        self.quarantines.fetch_add(1, Ordering::Relaxed);
        tracing::error!(module = %active.label(), %reason, "module quarantined");
        if let Some(hook) = self.quarantined_hook.get() {
            hook(&active.label(), &reason);
        }
        let Some(previous) = registry.previous().cloned().filter(|p| p.label() != active.label()) else {
            tracing::error!(module = %active.label(), "no previous version; shards stay on the native fallback");
            return;
        };
        let result = registry
            .factory(&previous.name, &previous.version, Some(previous.config.clone()))
            .map_err(AdminError::from)
            .and_then(|(factory, activation)| {
                let message = self.swap_all(factory, &activation)?;
                registry.set_active(activation, active.clone())?;
                Ok(message)
            });
        match result {
            Ok(message) => tracing::warn!(module = %previous.label(), "automatic rollback: {message}"),
            Err(err) => tracing::error!(module = %previous.label(), %err, "automatic rollback failed"),
        }
    }

    fn start_shadow(&self, name: &str, version: &str) -> Result<String, AdminError> {
        if name.is_empty() {
            self.shadow_threshold.store(0, Ordering::Relaxed);
            *lock(&self.shadow) = None;
            return Ok("shadow evaluation stopped".into());
        }
        let mut registry = self.try_registry()?;
        let registry = registry.as_mut().ok_or(AdminError::NoRegistry)?;
        let (candidate, activation) = registry.factory(name, version, None)?;
        let active = lock(&self.state).factory.clone();
        let stats = self.store.stats();
        let shadow =
            Shadow::new(activation.label(), candidate, active, self.store.config(), (stats.hits, stats.misses))
                .map_err(|e| AdminError::Swap(e.to_string()))?;
        let (rate, threshold) = (shadow.sample_rate(), shadow.threshold());
        *lock(&self.shadow) = Some(shadow);
        self.shadow_threshold.store(threshold, Ordering::Relaxed);
        Ok(format!("shadowing {} on {:.2}% of keys", activation.label(), rate * 100.0))
    }

    /// The registry and shards, for `cachet policy list`.
    pub(crate) fn policy_listing(&self, message: String) -> PolicyListing {
        self.listing(message, true)
    }

    /// [`Control::policy_listing`] without waiting for a policy operation in
    /// progress (a scrape must not stall behind a swap): while one runs,
    /// the module list is left empty.
    pub(crate) fn policy_listing_now(&self) -> PolicyListing {
        self.listing(String::new(), false)
    }

    fn listing(&self, message: String, wait_for_registry: bool) -> PolicyListing {
        let mut shards = Vec::with_capacity(self.store.shard_count());
        let mut live_faults: HashMap<String, u64> = HashMap::new();
        let labels = lock(&self.state).shard_labels.clone();
        for (i, label) in labels.iter().enumerate() {
            let shard: MutexGuard<'_, Shard> = self.store.lock_shard(i);
            *live_faults.entry(label.clone()).or_default() += shard.configured_faults();
            shards.push(ShardListing {
                shard: i as u64,
                module: label.clone(),
                on_fallback: !matches!(shard.policy_mode(), crate::core::PolicyMode::Configured),
                entries: shard.len() as u64,
                faults: shard.stats().policy_faults(),
            });
        }
        let (active, retired) = {
            let state = lock(&self.state);
            (state.activation.label(), state.retired_faults.clone())
        };
        let faults_of = |l: &str| retired.get(l).copied().unwrap_or(0) + live_faults.get(l).copied().unwrap_or(0);
        // Never hold the state lock while taking the registry's: activation
        // takes them in the other order.
        let registry = if wait_for_registry { Some(lock(&self.registry)) } else { self.try_registry().ok() };
        let (modules, previous) = match registry.as_ref().and_then(|r| r.as_ref()) {
            Some(registry) => (
                registry
                    .records()
                    .map(|r| ModuleListing {
                        name: r.name.clone(),
                        version: r.version.clone(),
                        source: r.source_name().into(),
                        interface: r.interface.clone(),
                        sha256: r.sha256.clone(),
                        config: r.config.clone(),
                        state: r.state(),
                        active: r.label() == active,
                        faults: faults_of(&r.label()),
                    })
                    .collect(),
                registry.previous().map(Activation::label),
            ),
            None => (Vec::new(), None),
        };
        drop(registry);
        let stats = self.store.stats();
        let shadow = lock(&self.shadow).as_ref().map(|s| s.listing((stats.hits, stats.misses)));
        PolicyListing {
            message,
            active,
            previous,
            modules,
            shards,
            swaps: self.swaps.load(Ordering::Relaxed),
            quarantines: self.quarantines.load(Ordering::Relaxed),
            shadow,
        }
    }
}

/// Parses `name@version` for the CLI.
pub fn split_label(text: &str) -> Result<(String, String), String> {
    parse_label(text)
        .map(|(n, v)| (n.to_string(), v.to_string()))
        .ok_or_else(|| AdminError::BadLabel(text.to_string()).to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_must_match_exactly() {
        let expected = token_digest("s3cret");
        assert!(token_matches(&expected, "s3cret"));
        assert!(!token_matches(&expected, "s3cre"));
        assert!(!token_matches(&expected, "s3cret\0"));
        assert!(!token_matches(&expected, "s3creT"));
        assert!(!token_matches(&expected, ""));
    }

    /// Wrong tokens lock the right one out too from the guesser's address
    /// (not from others), and the I/O threads' quick check agrees.
    #[test]
    fn the_node_refuses_every_attempt_during_a_back_off() {
        let factory = crate::policies::native(crate::policies::DEFAULT_POLICY, Default::default()).expect("policy");
        let clock = Arc::new(crate::store::MonotonicClock::new());
        let store = Arc::new(Store::new(crate::store::NodeConfig::default(), factory.clone(), clock).expect("store"));
        let registry = Registry::open(None, crate::wasm::PolicyEngine::new().expect("engine")).expect("registry");
        let node = Control::new(factory, store).with_registry(registry, Some("s3cret".into()));
        let now = Instant::now();
        let guesser = Some(std::net::IpAddr::from([10, 0, 0, 1]));
        let operator = Some(std::net::IpAddr::from([10, 0, 0, 2]));
        assert!(node.admit(now, "s3cret", guesser).is_ok());
        assert!(node.authorized("s3cret", guesser));
        for _ in 0..guard::MAX_FAILURES {
            assert!(matches!(node.admit(now, "guess", guesser), Err(AdminError::WrongToken)));
        }
        assert!(matches!(node.admit(now, "s3cret", guesser), Err(AdminError::Throttled(30))));
        assert!(!node.authorized("s3cret", guesser), "the I/O thread's check ignores the back-off");
        assert!(node.admit(now + guard::BACKOFF, "s3cret", guesser).is_ok());
        assert!(node.admit(now, "s3cret", operator).is_ok(), "another address is let in meanwhile");
        assert!(node.authorized("s3cret", operator));
    }
}
