//! Read-through loaders: key namespaces whose misses are filled by a Wasm
//! loader module (`cachet:hooks`), with herd protection built into the host.
//!
//! - **Single flight**: one load per key at a time; every concurrent miss on
//!   the key waits for it and shares its value or its error.
//! - **Leases**: a load installs its value only if its flight is still the
//!   key's flight when it completes. An invalidation (client `DEL`/`SET`,
//!   a change-data-capture notification, `FLUSHALL`) detaches the flight
//!   first, under the same lock the install takes, so a load that raced an
//!   invalidation never installs what it read before it.
//! - **Stale-while-revalidate**: a value lives `ttl + grace`; in its last
//!   `grace` it is still served while one background refresh runs.
//! - **Early refresh** (XFetch) before the soft expiry, with a probability
//!   scaled by the measured load time, which is stored as the entry's hint
//!   (a cost hint to cost-aware policies, too).
//! - **TTL jitter** and **negative caching** of "not found".
//!
//! The node's request path calls [`Loaders::get`]: hits and negative hits
//! are answered at once; misses return a [`Pending`] the I/O task awaits
//! without blocking other requests. Loads run on this module's own runtime
//! (a blocking thread per running guest call; origin I/O on its workers).

pub mod cdc;
pub mod config;
pub mod guest;
pub mod origin;
mod pg_tls;
pub mod refresh;
pub mod shared;
pub mod slot;
pub mod write;

use crate::core::SetOptions;
use crate::store::Store;
use bytes::Bytes;
use cachet_proto::{Condition, ErrorCode, ErrorReply, Request, Response};
pub use config::{LoaderConfig, LoaderConfigError, NamespaceConfig};
pub use guest::{CallFailure, LoaderModule, LoaderModuleError};
pub use origin::{OriginFailure, OriginStats, Origins};
use refresh::Freshness;
pub use slot::LoaderSlot;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};
use tokio::sync::{Semaphore, watch};
pub use write::Write;

/// Loads (and refreshes) running at once, node-wide; more wait for a slot
/// (within their deadline).
const MAX_RUNNING: usize = 256;
/// "Not found" answers remembered at once.
const MAX_NEGATIVE: usize = 100_000;

/// How a cluster member's loaders delete a key everywhere (a CDC
/// notification): a replicated delete, given by the node.
pub type Invalidator = Box<dyn Fn(Bytes) + Send + Sync>;

/// The result a flight hands to everyone waiting on it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// The value (installed unless an invalidation raced the load), the
    /// TTL it is cached with (jittered, grace window included) and its cost
    /// hint (the load's milliseconds).
    Value(Bytes, u64, u32),
    /// The origin has no such key.
    NotFound,
    /// No value: the reply to send, with why.
    Failed(ErrorReply),
}

impl Outcome {
    /// The reply to a GET.
    pub fn into_response(self) -> Response {
        match self {
            Self::Value(v, ..) => Response::Value(Some(v)),
            Self::NotFound => Response::Value(None),
            Self::Failed(err) => Response::Error(err),
        }
    }
}

/// A GET's answer: now, or once a load finishes.
pub enum Lookup {
    /// Ready (a hit, a negative hit, or a refused request).
    Ready(Response),
    /// Waiting for the key's load.
    Pending(Pending),
}

pub use crate::reply::{Later, Routed};

/// GETs that may wait for loads on one node at once, over every port and
/// connection: a flood of misses on distinct cold keys must not hold an
/// unbounded number of waiting requests (each with its key and, later, its
/// value). Beyond it a miss is answered `Busy` at once.
pub const MAX_WAITING_LOADS: usize = 100_000;

/// A GET waiting for a flight.
pub struct Pending {
    result: watch::Receiver<Option<Outcome>>,
    deadline: Duration,
    /// Its place among the node's waiting GETs, given back when it is
    /// answered or dropped.
    _waiting: WaitingGuard,
}

/// A place among [`MAX_WAITING_LOADS`].
struct WaitingGuard(Arc<AtomicUsize>);

impl WaitingGuard {
    fn take(count: &Arc<AtomicUsize>) -> Option<Self> {
        count
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| (n < MAX_WAITING_LOADS).then_some(n + 1))
            .ok()
            .map(|_| Self(count.clone()))
    }
}

impl Drop for WaitingGuard {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Pending {
    /// Waits for the flight (at most its deadline, plus a margin for the
    /// flight's own timeout to win) and turns its outcome into a reply.
    pub async fn response(mut self) -> Response {
        let waited = tokio::time::timeout(self.deadline + Duration::from_millis(1_500), async {
            self.result.wait_for(Option::is_some).await.map(|v| v.clone())
        })
        .await;
        match waited {
            Ok(Ok(Some(outcome))) => outcome.into_response(),
            Ok(_) => Response::Error(ErrorReply::new(ErrorCode::LoadFailed, "the load was abandoned")),
            Err(_) => Response::Error(ErrorReply::new(ErrorCode::LoadFailed, "the load missed its deadline")),
        }
    }
}

/// Counters of the loader machinery.
#[derive(Debug, Default)]
pub struct LoaderCounters {
    /// Loads started (misses that found no flight).
    pub loads: AtomicU64,
    /// Misses that joined a running flight instead of loading.
    pub coalesced: AtomicU64,
    /// Background refreshes started.
    pub refreshes: AtomicU64,
    /// Hits served from the grace window (stale, refresh running).
    pub stale_served: AtomicU64,
    /// Refreshes started early by XFetch.
    pub early_refreshes: AtomicU64,
    /// Misses answered from the negative cache.
    pub negative_hits: AtomicU64,
    /// Loads or refreshes that failed.
    pub failures: AtomicU64,
    /// Values not installed because an invalidation broke the lease.
    pub lease_breaks: AtomicU64,
    /// Invalidations applied (client writes and CDC notifications).
    pub invalidations: AtomicU64,
    /// Writes stored to the origin before being answered.
    pub writes_through: AtomicU64,
    /// Writes queued for write-behind.
    pub writes_behind_queued: AtomicU64,
    /// Write-behind writes the origin acknowledged.
    pub writes_behind_stored: AtomicU64,
    /// Writes refused because the write-behind queue was full.
    pub writes_refused: AtomicU64,
    /// Write-through stores that failed, and write-behind writes dropped
    /// after their last attempt.
    pub write_failures: AtomicU64,
}

/// Held while a client write changes a key of a loader namespace: no load
/// of any key installs meanwhile (see [`Loaders::break_lease`]).
pub(crate) struct LeaseGuard<'a> {
    _flights: MutexGuard<'a, HashMap<Bytes, Flight>>,
}

/// A namespace and its module.
struct Namespace {
    config: NamespaceConfig,
    module: Arc<LoaderModule>,
}

/// The flight of one key.
struct Flight {
    id: u64,
    result: watch::Sender<Option<Outcome>>,
}

/// What a flight runs.
enum Work {
    Load,
    Refresh { current: Bytes, age_ms: u64 },
}

/// A node's loader namespaces and the flights in progress.
pub struct Loaders {
    namespaces: Vec<Namespace>,
    origins: Arc<Origins>,
    runtime: Option<tokio::runtime::Runtime>,
    running: Arc<Semaphore>,
    flights: Mutex<HashMap<Bytes, Flight>>,
    /// On a cluster member: loaded values are not installed in this node's
    /// shards; the cluster writes what [`Loaders::fetch`] returns to the
    /// key's replicas, and invalidations go through [`Loaders::invalidator`].
    replicated: OnceLock<Invalidator>,
    /// Senders of flights an invalidation detached, by flight id, until
    /// they complete.
    detached_senders: Mutex<HashMap<u64, watch::Sender<Option<Outcome>>>>,
    negative: Mutex<HashMap<Bytes, u64>>,
    next_flight: AtomicU64,
    rng: AtomicU64,
    counters: LoaderCounters,
    /// The node's data, once attached.
    data: OnceLock<Arc<Store>>,
    /// Serialize writes per key (by key hash).
    write_locks: Vec<Arc<tokio::sync::Mutex<()>>>,
    /// Write-behind queues, per namespace.
    queues: Vec<Option<Arc<write::WriteQueue>>>,
    /// GETs waiting for a load now (at most [`MAX_WAITING_LOADS`]).
    waiting: Arc<AtomicUsize>,
    /// The loaders these replaced, while they drain their write-behind
    /// queues (see [`Loaders::replace`]).
    predecessor: OnceLock<std::sync::Weak<Self>>,
}

impl Drop for Loaders {
    fn drop(&mut self) {
        // The last reference may go inside an async context, where a
        // blocking shutdown would panic.
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Why the loader configuration could not be put to work.
#[derive(Debug, thiserror::Error)]
pub enum LoadersError {
    /// The configuration is invalid.
    #[error(transparent)]
    Config(#[from] LoaderConfigError),
    /// A module file cannot be read.
    #[error("cannot read loader module {path}: {source}")]
    Module {
        /// The file.
        path: std::path::PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// A module is not a usable loader.
    #[error("loader module {path}: {source}")]
    Invalid {
        /// The file.
        path: std::path::PathBuf,
        /// What is wrong.
        source: LoaderModuleError,
    },
    /// The runtime or an origin could not be set up.
    #[error("loaders: {0}")]
    Setup(String),
}

impl Loaders {
    /// Validates every module and builds the origins; nothing connects yet.
    pub fn new(config: &LoaderConfig) -> Result<Arc<Self>, LoadersError> {
        Self::with_modules(config, &|path| std::fs::read(path))
    }

    /// [`Self::new`], each namespace's module bytes from `read` (a cluster
    /// member reads them from its content-addressed store).
    pub fn with_modules(
        config: &LoaderConfig,
        read: &dyn Fn(&std::path::Path) -> std::io::Result<Vec<u8>>,
    ) -> Result<Arc<Self>, LoadersError> {
        config.check()?;
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .max_blocking_threads(MAX_RUNNING)
            .thread_name("cachet-loader")
            .enable_all()
            .build()
            .map_err(|e| LoadersError::Setup(format!("cannot start the loader runtime: {e}")))?;
        let origins = {
            let _entered = runtime.enter();
            Arc::new(Origins::new(&config.origins, runtime.handle().clone()).map_err(LoadersError::Setup)?)
        };
        let engine = guest::engine().map_err(|e| LoadersError::Setup(e.to_string()))?;
        let mut namespaces = Vec::new();
        for ns in &config.namespaces {
            let bytes = read(&ns.module).map_err(|source| LoadersError::Module { path: ns.module.clone(), source })?;
            let module = LoaderModule::new(
                &engine,
                &bytes,
                origins.clone(),
                ns.origins.clone(),
                ns.fuel_per_call,
                ns.max_memory_bytes,
                ns.read_only,
            )
            .map_err(|source| LoadersError::Invalid { path: ns.module.clone(), source })?;
            namespaces.push(Namespace { config: ns.clone(), module: Arc::new(module) });
        }
        // Longest prefix first, so `user:vip:` wins over `user:`.
        namespaces.sort_by_key(|ns| std::cmp::Reverse(ns.config.prefix.len()));
        let queues = namespaces
            .iter()
            .map(|ns| {
                (ns.config.write == config::WriteMode::Behind)
                    .then(|| Arc::new(write::WriteQueue::new(ns.config.write_queue)))
            })
            .collect();
        let seed = config.seed.unwrap_or_else(|| {
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64)
        });
        Ok(Arc::new(Self {
            namespaces,
            origins,
            runtime: Some(runtime),
            running: Arc::new(Semaphore::new(MAX_RUNNING)),
            flights: Mutex::default(),
            detached_senders: Mutex::default(),
            negative: Mutex::default(),
            next_flight: AtomicU64::new(1),
            rng: AtomicU64::new(seed),
            counters: LoaderCounters::default(),
            data: OnceLock::new(),
            replicated: OnceLock::new(),
            write_locks: (0..write::WRITE_STRIPES).map(|_| Arc::new(tokio::sync::Mutex::new(()))).collect(),
            queues,
            waiting: Arc::new(AtomicUsize::new(0)),
            predecessor: OnceLock::new(),
        }))
    }

    /// Binds the loaders to their node's store and starts the
    /// invalidation feeds.
    pub(crate) fn attach(self: &Arc<Self>, store: &Arc<Store>) {
        if self.data.set(store.clone()).is_err() {
            return;
        }
        for (index, ns) in self.namespaces.iter().enumerate() {
            if let Some(feed) = &ns.config.invalidate {
                cdc::start(self, index, feed);
            }
            if ns.config.write == config::WriteMode::Behind {
                self.start_writer(index);
            }
        }
    }

    /// Makes these loaders the successors of `old` (a cluster's loader
    /// configuration changed), before [`Loaders::attach`]: their
    /// write-behind workers wait for `old`'s queues to empty. The caller
    /// keeps `old` until [`Loaders::retire`] returns.
    pub(crate) fn replace(&self, old: &Arc<Self>) {
        let _ = self.predecessor.set(Arc::downgrade(old));
    }

    /// Waits (blocking, at most `limit`) until these loaders' write-behind
    /// queues are empty, so that dropping them loses no queued write;
    /// whether they are.
    pub(crate) fn retire(&self, limit: Duration) -> bool {
        let start = Instant::now();
        while self.queued_in_chain() > 0 {
            if start.elapsed() > limit {
                return false;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        true
    }

    /// Write-behind writes queued here and in every loaders these
    /// replaced that are still draining: a successor stores nothing
    /// before the whole chain is empty (A replaced by B replaced by C: C
    /// waits for A too).
    pub(crate) fn queued_in_chain(&self) -> usize {
        let mut queued = self.write_queue_depth();
        let mut next = self.predecessor.get().and_then(std::sync::Weak::upgrade);
        while let Some(old) = next {
            queued += old.write_queue_depth();
            next = old.predecessor.get().and_then(std::sync::Weak::upgrade);
        }
        queued
    }

    /// The namespaces' prefixes, longest first.
    pub fn prefixes(&self) -> Vec<&str> {
        self.namespaces.iter().map(|ns| ns.config.prefix.as_str()).collect()
    }

    fn handle(&self) -> Option<&tokio::runtime::Handle> {
        self.runtime.as_ref().map(tokio::runtime::Runtime::handle)
    }

    /// The counters.
    pub fn counters(&self) -> &LoaderCounters {
        &self.counters
    }

    /// Origin counters.
    pub fn origin_stats(&self) -> Vec<OriginStats> {
        self.origins.stats()
    }

    /// Keys loaded or refreshing right now.
    pub fn in_flight(&self) -> usize {
        lock(&self.flights).len()
    }

    /// The namespace serving `key`, if any.
    fn namespace(&self, key: &[u8]) -> Option<usize> {
        self.namespaces.iter().position(|ns| key.starts_with(ns.config.prefix.as_bytes()))
    }

    /// Whether `key` belongs to a loader namespace.
    pub fn covers(&self, key: &[u8]) -> bool {
        self.namespace(key).is_some()
    }

    /// A uniform draw in (0, 1].
    fn draw(&self) -> f64 {
        refresh::unit(refresh::mix(self.rng.fetch_add(0x9E37_79B9_7F4A_7C15, Ordering::Relaxed)))
    }

    /// A GET of `key` (which [`Loaders::covers`]).
    pub fn get(self: &Arc<Self>, key: Bytes) -> Lookup {
        let Some(store) = self.data.get() else {
            return Lookup::Ready(Response::Error(ErrorReply::new(
                ErrorCode::Internal,
                "the loaders are not attached",
            )));
        };
        let entry = |key: &[u8]| store.with_shard(key, |shard, now| shard.get_entry(now, key));
        let Some(index) = self.namespace(&key) else {
            return Lookup::Ready(Response::Value(entry(&key).map(|e| e.value)));
        };
        let ns = &self.namespaces[index].config;
        let now = store.now_ms();
        if key.len() > store.config().max_key_size {
            let message =
                format!("key of {} bytes exceeds the limit of {} bytes", key.len(), store.config().max_key_size);
            return Lookup::Ready(Response::Error(ErrorReply::new(ErrorCode::TooLarge, message)));
        }
        // A write-behind write not yet at the origin is the key's value: a
        // load now would read what it replaces.
        let queued = self.queued_write(index, &key);
        if let Some(entry) = entry(&key) {
            if let (Some(expires_at), None) = (entry.expires_at, &queued) {
                let state = refresh::freshness(now, expires_at, ns.grace_ms, entry.hint, ns.xfetch_beta, self.draw());
                if state == Freshness::Refresh {
                    let soft = expires_at.saturating_sub(ns.grace_ms);
                    let stale = now >= soft;
                    let loaded_at = soft.saturating_sub(ns.ttl_ms);
                    let work = Work::Refresh { current: entry.value.clone(), age_ms: now.saturating_sub(loaded_at) };
                    if self.start(store, index, &key, work, false).is_some() {
                        let counter = if stale { &self.counters.stale_served } else { &self.counters.early_refreshes };
                        counter.fetch_add(1, Ordering::Relaxed);
                    } else if stale {
                        self.counters.stale_served.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
            return Lookup::Ready(Response::Value(Some(entry.value)));
        }
        if let Some(value) = queued {
            return Lookup::Ready(Response::Value(value));
        }
        if lock(&self.negative).get(&key).is_some_and(|&until| until > now) {
            self.counters.negative_hits.fetch_add(1, Ordering::Relaxed);
            return Lookup::Ready(Response::Value(None));
        }
        let Some(waiting) = WaitingGuard::take(&self.waiting) else {
            let message = format!("{MAX_WAITING_LOADS} requests are waiting for loads on this node; retry later");
            return Lookup::Ready(Response::Error(ErrorReply::new(ErrorCode::Busy, message)));
        };
        match self.start(store, index, &key, Work::Load, true) {
            Some(result) => Lookup::Pending(Pending {
                result,
                deadline: Duration::from_millis(ns.load_timeout_ms),
                _waiting: waiting,
            }),
            None => Lookup::Ready(Response::Error(ErrorReply::new(ErrorCode::LoadFailed, "the loaders are stopping"))),
        }
    }

    /// Takes the requests the loaders serve: GETs of a loader namespace,
    /// and SETs and DELs of a namespace that writes to its origin (where
    /// conditional SETs and multi-key DELs are refused). `None` for every
    /// other request, which the node's dispatcher runs.
    pub fn route(self: &Arc<Self>, request: &Request) -> Option<Routed> {
        let refuse = |code, message: &str| Some(Routed::Now(Response::Error(ErrorReply::new(code, message))));
        match request {
            Request::Get { key } if self.covers(key) => Some(match self.get(key.clone()) {
                Lookup::Ready(reply) => Routed::Now(reply),
                Lookup::Pending(pending) => Routed::Later(Box::pin(pending.response())),
            }),
            Request::Set { key, value, ttl_ms, condition, .. } if self.write_mode(key).is_some() => {
                if *condition != Condition::Always {
                    return refuse(
                        ErrorCode::NotAllowed,
                        "conditional SET is not supported for keys written to an origin",
                    );
                }
                if *ttl_ms == Some(0) {
                    return refuse(ErrorCode::InvalidArgument, "a TTL must be at least 1 ms");
                }
                let (this, key, write) = (self.clone(), key.clone(), Write::Set(value.clone(), *ttl_ms));
                Some(Routed::Later(Box::pin(async move { this.write(key, write).await })))
            }
            Request::Del { keys } if keys.iter().any(|k| self.write_mode(k).is_some()) => {
                let [key] = keys.as_slice() else {
                    return refuse(
                        ErrorCode::InvalidArgument,
                        "DEL of keys written to an origin takes one key at a time",
                    );
                };
                let (this, key) = (self.clone(), key.clone());
                Some(Routed::Later(Box::pin(async move { this.write(key, Write::Delete).await })))
            }
            _ => None,
        }
    }

    /// Joins `key`'s flight, or starts one running `work`. Returns the
    /// flight's result channel; for a refresh (`join` false) only when a new
    /// flight was started.
    fn start(
        self: &Arc<Self>,
        store: &Store,
        index: usize,
        key: &Bytes,
        work: Work,
        join: bool,
    ) -> Option<watch::Receiver<Option<Outcome>>> {
        let handle = self.handle()?.clone();
        let mut flights = lock(&self.flights);
        if let Some(flight) = flights.get(key) {
            if !join {
                return None;
            }
            self.counters.coalesced.fetch_add(1, Ordering::Relaxed);
            return Some(flight.result.subscribe());
        }
        let id = self.next_flight.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = watch::channel(None);
        flights.insert(key.clone(), Flight { id, result: tx });
        drop(flights);
        let counter = if matches!(work, Work::Load) { &self.counters.loads } else { &self.counters.refreshes };
        counter.fetch_add(1, Ordering::Relaxed);
        let this = self.clone();
        let key = key.clone();
        let now = store.now_ms();
        let max_value = store.config().max_value_size;
        handle.spawn(async move {
            let ns = &this.namespaces[index];
            let deadline = Duration::from_millis(ns.config.load_timeout_ms);
            let module = ns.module.clone();
            let started = Instant::now();
            let running = this.running.clone();
            let call_key = key.clone();
            let missed = || CallFailure::Loader(format!("the load missed its {} ms deadline", deadline.as_millis()));
            let call = async move {
                // Waiting for a slot counts against the deadline; the slot is
                // held until the guest call really ends, which its own
                // wall-clock deadline (epochs, and origin requests refused
                // after it) bounds.
                let permit = match tokio::time::timeout(deadline, running.acquire_owned()).await {
                    Ok(Ok(permit)) => permit,
                    Ok(Err(_)) => return Err(CallFailure::Trap("the loaders are stopping".into())),
                    Err(_) => return Err(missed()),
                };
                let left = deadline.saturating_sub(started.elapsed());
                tokio::task::spawn_blocking(move || {
                    let result = match work {
                        Work::Load => module.load(left, &call_key, now),
                        Work::Refresh { current, age_ms } => module.refresh(left, &call_key, &current, age_ms, now),
                    };
                    drop(permit);
                    result
                })
                .await
                .map_err(|e| CallFailure::Trap(format!("the loader call was lost: {e}")))?
            };
            // A margin over the guest's own deadline: the call normally ends
            // by itself (an origin request already running finishes first).
            let result = match tokio::time::timeout(deadline + Duration::from_secs(1), call).await {
                Ok(result) => result,
                Err(_) => Err(missed()),
            };
            let load_ms = started.elapsed().as_millis().clamp(1, u128::from(u32::MAX)) as u32;
            this.complete(index, &key, id, result, load_ms, max_value);
        });
        Some(rx)
    }

    /// Ends flight `id` of `key`: installs its value if the lease still
    /// holds, and wakes everyone waiting.
    fn complete(
        &self,
        index: usize,
        key: &Bytes,
        id: u64,
        result: Result<Option<guest::Loaded>, CallFailure>,
        load_ms: u32,
        max_value: usize,
    ) {
        let ns = &self.namespaces[index].config;
        let store = self.data.get();
        let mut flights = lock(&self.flights);
        let current = flights.get(key).is_some_and(|f| f.id == id);
        let flight = if current { flights.remove(key) } else { None };
        // A write-behind write still queued for the key holds the lease too:
        // the origin has not seen it yet.
        let leased = current && self.queued_write(index, key).is_none();
        let outcome = match result {
            Ok(Some(loaded)) if loaded.value.len() > max_value => {
                self.counters.failures.fetch_add(1, Ordering::Relaxed);
                Outcome::Failed(ErrorReply::new(
                    ErrorCode::LoadFailed,
                    format!("the loader returned {} bytes; values are limited to {max_value}", loaded.value.len()),
                ))
            }
            Ok(Some(loaded)) => {
                let value = Bytes::from(loaded.value);
                let ttl = refresh::jittered(loaded.ttl_ms.unwrap_or(ns.ttl_ms), ns.jitter, self.draw())
                    .saturating_add(ns.grace_ms);
                let store = store.filter(|_| self.replicated.get().is_none());
                if let (true, Some(store)) = (leased, store) {
                    let options = SetOptions { ttl_ms: Some(ttl), hint: load_ms, keep_ttl: false };
                    // Installed under the flights lock: an invalidation either
                    // detached this flight already, or deletes after this.
                    if let Err(err) = store.with_shard(key, |shard, now| shard.set(now, key, value.clone(), options)) {
                        tracing::warn!(%err, "a loaded value could not be stored");
                    }
                } else if !leased {
                    self.counters.lease_breaks.fetch_add(1, Ordering::Relaxed);
                }
                Outcome::Value(value, ttl, load_ms)
            }
            Ok(None) => {
                if !leased {
                    self.counters.lease_breaks.fetch_add(1, Ordering::Relaxed);
                }
                if let (true, Some(store)) = (leased, store) {
                    let now = store.now_ms();
                    // The origin no longer has it: drop a refreshed key too
                    // (on a cluster, the primary answers "not found" and
                    // writes nothing).
                    if self.replicated.get().is_none() {
                        store.with_shard(key, |shard, now| shard.delete(now, key));
                    }
                    if ns.negative_ttl_ms > 0 {
                        let mut negative = lock(&self.negative);
                        if negative.len() >= MAX_NEGATIVE {
                            negative.retain(|_, until| *until > now);
                        }
                        if negative.len() < MAX_NEGATIVE {
                            negative.insert(key.clone(), now.saturating_add(ns.negative_ttl_ms));
                        }
                    }
                }
                Outcome::NotFound
            }
            Err(failure) => {
                self.counters.failures.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(key = %key.escape_ascii(), %failure, "load failed");
                let code = match failure {
                    CallFailure::Origin(_) => ErrorCode::OriginFailed,
                    _ => ErrorCode::LoadFailed,
                };
                Outcome::Failed(ErrorReply::new(code, failure.to_string()))
            }
        };
        drop(flights);
        // A detached flight's waiters still get what it read: their GETs
        // began before the invalidation finished.
        let sender = flight.map(|f| f.result);
        match sender {
            Some(tx) => {
                let _ = tx.send(Some(outcome));
            }
            None => self.finish_detached(id, outcome),
        }
    }

    /// Flights detached by an invalidation keep their sender in
    /// `detached` until they complete.
    fn finish_detached(&self, id: u64, outcome: Outcome) {
        if let Some(tx) = lock(&self.detached_senders).remove(&id) {
            let _ = tx.send(Some(outcome));
        }
    }

    /// Breaks the lease of `key`'s flight (its value will not be
    /// installed) and forgets a "not found"; the caller then deletes or
    /// overwrites the key.
    pub fn invalidate(&self, key: &[u8]) {
        drop(self.break_lease(key));
    }

    /// [`Loaders::invalidate`], returning the lock loads install under:
    /// the caller changes the key while holding it, so no load can start
    /// and install in between. `None` for keys outside every namespace.
    pub(crate) fn break_lease(&self, key: &[u8]) -> Option<LeaseGuard<'_>> {
        self.namespace(key)?;
        self.counters.invalidations.fetch_add(1, Ordering::Relaxed);
        let mut flights = lock(&self.flights);
        if let Some(flight) = flights.remove(key) {
            lock(&self.detached_senders).insert(flight.id, flight.result);
        }
        lock(&self.negative).remove(key);
        Some(LeaseGuard { _flights: flights })
    }

    /// Breaks every lease and forgets every "not found" (FLUSHALL).
    pub fn invalidate_all(&self) {
        // The flights lock is held until every sender is parked: a load
        // completing in between would find neither its flight nor its
        // sender and strand its waiters.
        let mut flights = lock(&self.flights);
        let mut detached = lock(&self.detached_senders);
        self.counters.invalidations.fetch_add(flights.len() as u64, Ordering::Relaxed);
        for (_, flight) in flights.drain() {
            detached.insert(flight.id, flight.result);
        }
        drop(detached);
        lock(&self.negative).clear();
        drop(flights);
    }

    /// Invalidates `key` and deletes it from the node (on a cluster, from
    /// every replica, through the cluster): what a CDC notification does.
    pub(crate) fn invalidate_key(&self, key: &[u8]) {
        if let Some(invalidator) = self.replicated.get() {
            self.invalidate(key);
            invalidator(Bytes::copy_from_slice(key));
        } else if let Some(store) = self.data.get() {
            self.invalidate(key);
            store.with_shard(key, |shard, now| shard.delete(now, key));
        }
    }

    /// Makes these loaders a cluster member's: loaded values go to the
    /// caller of [`Loaders::fetch`] (the key's primary, which writes them to
    /// the replicas) instead of this node's shards, and a CDC notification
    /// deletes the key through `invalidator` (a replicated delete), as does
    /// a write-behind write the origin never took. Writes to the origin run
    /// at each key's primary through [`Loaders::store_for_cluster`].
    pub fn replicate(&self, invalidator: Invalidator) -> Result<(), String> {
        self.replicated.set(invalidator).map_err(|_| "the loaders are already a cluster's".to_string())
    }

    /// Loads `key` (single flight on this node, negative cache included)
    /// without installing it: for the key's primary on a cluster, which
    /// writes the value to the replicas. The value, the TTL (ms) to cache
    /// it with and its cost hint (the load's ms); `None` when the origin
    /// has no such key. With `refresh` (the value served meanwhile and its
    /// hard expiry in Unix ms), the loader's refresh hook runs instead, as
    /// for a single node's background refresh.
    pub fn fetch(
        self: &Arc<Self>,
        key: Bytes,
        refresh: Option<(Bytes, u64)>,
    ) -> impl Future<Output = Result<Option<(Bytes, u64, u32)>, ErrorReply>> + use<> {
        let this = self.clone();
        async move {
            let refused = |code, message: String| Err(ErrorReply::new(code, message));
            let Some(index) = this.namespace(&key) else {
                return refused(ErrorCode::Internal, "not a loader namespace".into());
            };
            let Some(store) = this.data.get().cloned() else {
                return refused(ErrorCode::Internal, "the loaders are not attached".into());
            };
            let now = store.now_ms();
            // A write-behind write not yet at the origin is the key's value:
            // a load now would read what it replaces.
            if let Some(queued) = this.queued_write(index, &key) {
                let ns = &this.namespaces[index].config;
                let ttl = ns.ttl_ms.saturating_add(ns.grace_ms);
                return Ok(queued.map(|value| (value, ttl, 0)));
            }
            if refresh.is_none() && lock(&this.negative).get(&key).is_some_and(|&until| until > now) {
                this.counters.negative_hits.fetch_add(1, Ordering::Relaxed);
                return Ok(None);
            }
            let Some(waiting) = WaitingGuard::take(&this.waiting) else {
                let message = format!("{MAX_WAITING_LOADS} requests are waiting for loads on this node; retry later");
                return refused(ErrorCode::Busy, message);
            };
            let work = match refresh {
                None => Work::Load,
                Some((current, expires_at)) => {
                    // Loaded at its soft expiry minus the TTL (jitter aside),
                    // as the single node reckons it.
                    let ns = &this.namespaces[index].config;
                    let loaded_at = expires_at.saturating_sub(ns.grace_ms).saturating_sub(ns.ttl_ms);
                    let wall_ms = std::time::SystemTime::now()
                        .duration_since(std::time::UNIX_EPOCH)
                        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
                    Work::Refresh { current, age_ms: wall_ms.saturating_sub(loaded_at) }
                }
            };
            let Some(mut result) = this.start(&store, index, &key, work, true) else {
                return refused(ErrorCode::LoadFailed, "the loaders are stopping".into());
            };
            let deadline = Duration::from_millis(this.namespaces[index].config.load_timeout_ms);
            let waited = tokio::time::timeout(deadline + Duration::from_millis(1_500), async {
                result.wait_for(Option::is_some).await.map(|v| v.clone())
            })
            .await;
            drop(waiting);
            match waited {
                Ok(Ok(Some(Outcome::Value(value, ttl, hint)))) => Ok(Some((value, ttl, hint))),
                Ok(Ok(Some(Outcome::NotFound))) => Ok(None),
                Ok(Ok(Some(Outcome::Failed(err)))) => Err(err),
                Ok(_) => refused(ErrorCode::LoadFailed, "the load was abandoned".into()),
                Err(_) => refused(ErrorCode::LoadFailed, "the load missed its deadline".into()),
            }
        }
    }

    /// The longest a load of `key` may take (its namespace's load
    /// timeout); `None` outside every namespace.
    pub fn load_timeout_ms(&self, key: &[u8]) -> Option<u64> {
        self.namespace(key).map(|i| self.namespaces[i].config.load_timeout_ms)
    }

    /// The refresh rule of `key`'s namespace for a cluster's primary: its
    /// grace window, XFetch's beta in thousandths and a fresh random draw;
    /// `None` when the namespace neither serves stale values nor refreshes
    /// early (or no loader covers the key).
    pub fn refresh_rule(&self, key: &[u8]) -> Option<(u64, u32, u64)> {
        let ns = &self.namespaces[self.namespace(key)?].config;
        let beta_milli = (ns.xfetch_beta * 1000.0).round() as u32;
        if ns.grace_ms == 0 && beta_milli == 0 {
            return None;
        }
        Some((ns.grace_ms, beta_milli, refresh::mix(self.rng.fetch_add(0x9E37_79B9_7F4A_7C15, Ordering::Relaxed))))
    }

    /// Counts a background refresh a cluster's primary started: of a value
    /// past its soft expiry (`stale`), or picked early.
    pub fn count_refresh(&self, stale: bool) {
        let counter = if stale { &self.counters.stale_served } else { &self.counters.early_refreshes };
        counter.fetch_add(1, Ordering::Relaxed);
    }

    /// Invalidates every key of namespace `index`: after an invalidation
    /// feed reconnects, notifications sent while it was down are lost, so
    /// nothing cached before can be trusted.
    pub(crate) fn invalidate_namespace(&self, index: usize) {
        let prefix = self.namespaces[index].config.prefix.clone();
        let Some(store) = self.data.get() else { return };
        {
            let mut flights = lock(&self.flights);
            let keys: Vec<Bytes> = flights.keys().filter(|k| k.starts_with(prefix.as_bytes())).cloned().collect();
            let mut detached = lock(&self.detached_senders);
            for key in keys {
                if let Some(flight) = flights.remove(&key) {
                    detached.insert(flight.id, flight.result);
                }
            }
        }
        lock(&self.negative).retain(|k, _| !k.starts_with(prefix.as_bytes()));
        // On a cluster the shards hold replicated records: deleting them
        // here would leave the other copies to repair them back. Each key
        // this member holds is deleted through its primary instead (every
        // member's feed does the same, so every key is covered).
        if let Some(invalidator) = self.replicated.get() {
            let mut keys = Vec::new();
            store.for_each(|key, _, _| {
                if key.starts_with(prefix.as_bytes()) {
                    keys.push(Bytes::copy_from_slice(key));
                }
            });
            let removed = keys.len();
            for key in keys {
                invalidator(key);
            }
            tracing::info!(prefix, removed, "namespace invalidated through the cluster");
            return;
        }
        let removed = store.delete_prefix(prefix.as_bytes());
        tracing::info!(prefix, removed, "namespace invalidated");
    }

    /// Drops expired "not found" answers; called from the node's tick.
    pub(crate) fn tick(&self, now: u64) {
        let mut negative = lock(&self.negative);
        if !negative.is_empty() {
            negative.retain(|_, until| *until > now);
        }
    }

    pub(crate) fn namespace_prefix(&self, index: usize) -> &str {
        &self.namespaces[index].config.prefix
    }

    pub(crate) fn origins(&self) -> &Arc<Origins> {
        &self.origins
    }

    pub(crate) fn runtime_handle(&self) -> Option<tokio::runtime::Handle> {
        self.handle().cloned()
    }
}

#[cfg(test)]
mod tests {
    use super::{MAX_WAITING_LOADS, WaitingGuard};
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[test]
    fn waiting_gets_are_bounded_per_node() {
        let count = Arc::new(AtomicUsize::new(MAX_WAITING_LOADS - 2));
        let a = WaitingGuard::take(&count).expect("a place");
        let b = WaitingGuard::take(&count).expect("the last place");
        assert!(WaitingGuard::take(&count).is_none(), "full");
        drop(a);
        let c = WaitingGuard::take(&count).expect("a place given back");
        drop((b, c));
        assert_eq!(count.load(Ordering::Acquire), MAX_WAITING_LOADS - 2);
    }
}
