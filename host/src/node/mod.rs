//! A node's shards and the commands of the `cachet/1` protocol, with no
//! network: [`Node::execute`] turns a request into a reply. The QUIC server
//! (and later the RESP port) are thin shells around it, and tests drive it
//! directly.

use crate::admin::Control;
use crate::core::EntryView;
use crate::core::{PolicyError, PolicyFactory, PolicyMode, SetOptions, SetOutcome, Shard, ShardConfig, ShardError};
use crate::loader::Loaders;
use crate::metrics::RequestMetrics;
use bytes::Bytes;
use cachet_proto::{Condition, ErrorCode, ErrorReply, NodeStats, Request, Response, TtlState};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::Instant;

/// Sizing of a node.
#[derive(Clone, Debug)]
pub struct NodeConfig {
    /// Shards (each with its own policy instance); usually one per core.
    pub shards: usize,
    /// Entries across all shards.
    pub max_entries: u64,
    /// Bytes across all shards.
    pub max_bytes: u64,
    /// Largest value accepted.
    pub max_value_size: usize,
    /// Largest key accepted.
    pub max_key_size: usize,
    /// First delay before a faulted shard retries its configured policy
    /// (doubling with each fault in a row).
    pub policy_retry_ms: u64,
    /// Faults in a row (each within `policy_fault_window_ms` of the last)
    /// after which a shard gives up on its policy, and the node quarantines
    /// the module and rolls back to the previous version.
    pub policy_fault_limit: u32,
    /// A fault this long after the previous one starts a new count.
    pub policy_fault_window_ms: u64,
}

impl Default for NodeConfig {
    fn default() -> Self {
        Self {
            shards: 1,
            max_entries: 1_000_000,
            max_bytes: 256 << 20,
            max_value_size: 1 << 20,
            max_key_size: 64 << 10,
            policy_retry_ms: 1_000,
            policy_fault_limit: 3,
            policy_fault_window_ms: 60_000,
        }
    }
}

/// Where a node reads the time; tests substitute a clock they move by hand
/// so expiry is tested without sleeping.
pub trait Clock: Send + Sync {
    /// Milliseconds since an arbitrary start; never decreases.
    fn now_ms(&self) -> u64;

    /// [`Clock::now_ms`] as of `at`, an instant the caller just read: the
    /// request path times each request anyway, and one clock read is
    /// cheaper than two.
    fn now_ms_at(&self, at: Instant) -> u64 {
        let _ = at;
        self.now_ms()
    }
}

/// The real clock: milliseconds since the node started.
pub struct MonotonicClock(Instant);

impl Clock for MonotonicClock {
    fn now_ms(&self) -> u64 {
        self.0.elapsed().as_millis() as u64
    }

    fn now_ms_at(&self, at: Instant) -> u64 {
        at.saturating_duration_since(self.0).as_millis() as u64
    }
}

/// A clock that moves only when told.
#[derive(Default)]
pub struct ManualClock(AtomicU64);

impl ManualClock {
    /// Moves the clock forward by `ms`.
    pub fn advance(&self, ms: u64) {
        self.0.fetch_add(ms, Ordering::SeqCst);
    }
}

impl Clock for ManualClock {
    fn now_ms(&self) -> u64 {
        self.0.load(Ordering::SeqCst)
    }
}

/// The shards of one node, each behind its own lock.
pub struct Node {
    shards: Vec<Mutex<Shard>>,
    config: NodeConfig,
    pub(crate) control: Control,
    pub(crate) metrics: RequestMetrics,
    clock: Arc<dyn Clock>,
    started: Instant,
    connections: AtomicU64,
    /// Clients cut off or turned away by the ports' limits, for metrics.
    clients: crate::clients::ClientCounters,
    loaders: OnceLock<Arc<Loaders>>,
    cluster: OnceLock<Arc<crate::cluster::runtime::Cluster>>,
}

impl Node {
    /// A node whose shards each get an instance from `policy`.
    pub fn new(config: NodeConfig, policy: Arc<dyn PolicyFactory>) -> Result<Self, PolicyError> {
        Self::with_clock(config, policy, Arc::new(MonotonicClock(Instant::now())))
    }

    /// [`Node::new`] reading time from `clock`.
    pub fn with_clock(
        config: NodeConfig,
        policy: Arc<dyn PolicyFactory>,
        clock: Arc<dyn Clock>,
    ) -> Result<Self, PolicyError> {
        let n = config.shards.max(1) as u64;
        let shards = (0..n)
            .map(|i| {
                let shard = ShardConfig {
                    max_entries: config.max_entries.div_ceil(n),
                    max_bytes: config.max_bytes / n,
                    max_value_size: config.max_value_size,
                    max_key_size: config.max_key_size,
                    seed: i,
                    retry_after_ms: config.policy_retry_ms,
                    max_faults_in_a_row: config.policy_fault_limit.max(1),
                    fault_window_ms: config.policy_fault_window_ms,
                    track_hot_keys: true,
                    ..ShardConfig::default()
                };
                Shard::new(shard, policy.clone()).map(Mutex::new)
            })
            .collect::<Result<_, _>>()?;
        Ok(Self {
            control: Control::new(policy, n as usize),
            metrics: RequestMetrics::default(),
            shards,
            config,
            clock,
            started: Instant::now(),
            connections: AtomicU64::new(0),
            clients: crate::clients::ClientCounters::default(),
            loaders: OnceLock::new(),
            cluster: OnceLock::new(),
        })
    }

    /// The node's limits.
    pub fn config(&self) -> &NodeConfig {
        &self.config
    }

    /// The `now` of every shard call, from the node's clock.
    pub fn now_ms(&self) -> u64 {
        self.clock.now_ms()
    }

    /// Open client connections.
    pub fn stats_connections(&self) -> u64 {
        self.connections.load(Ordering::Relaxed)
    }

    /// Clients the ports cut off or turned away, by reason.
    pub fn clients(&self) -> &crate::clients::ClientCounters {
        &self.clients
    }

    /// Counts a client connection for stats; the guard uncounts it.
    pub fn connection(self: &Arc<Self>) -> ConnectionGuard {
        self.connections.fetch_add(1, Ordering::Relaxed);
        ConnectionGuard(self.clone())
    }

    fn shard(&self, key: &[u8]) -> MutexGuard<'_, Shard> {
        let i = (cachet_proto::key_hash(key) % self.shards.len() as u64) as usize;
        lock(&self.shards[i])
    }

    /// Runs `f` on the shard owning `key`, under its lock, with the node's
    /// `now`: for compound commands (the RESP port's GETDEL, APPEND, SET
    /// ... GET) that must read and write atomically. Counts as a write to
    /// `key`: a load of it in flight will not be installed.
    pub fn with_shard<R>(&self, key: &[u8], f: impl FnOnce(&mut Shard, u64) -> R) -> R {
        let _lease = self.invalidate_load(key);
        self.with_shard_raw(key, f)
    }

    /// [`Node::with_shard`] without breaking a load's lease: for the
    /// loaders' own installs.
    pub(crate) fn with_shard_raw<R>(&self, key: &[u8], f: impl FnOnce(&mut Shard, u64) -> R) -> R {
        let now = self.now_ms();
        f(&mut self.shard(key), now)
    }

    /// Binds read-through loaders to this node: GETs of their namespaces
    /// load on a miss (through [`Loaders::get`]), and writes break leases.
    /// At most once per node; a second call is refused.
    pub fn attach_loaders(self: &Arc<Self>, loaders: Arc<Loaders>) -> Result<(), Arc<Loaders>> {
        self.loaders.set(loaders.clone())?;
        loaders.attach(self);
        Ok(())
    }

    /// The loaders, if any are attached.
    pub fn loaders(&self) -> Option<&Arc<Loaders>> {
        self.loaders.get()
    }

    /// Makes this node a cluster member: its data commands become
    /// replicated operations (see [`crate::cluster::runtime::Cluster::route`]).
    /// At most once per node.
    pub fn attach_cluster(
        &self,
        cluster: Arc<crate::cluster::runtime::Cluster>,
    ) -> Result<(), Arc<crate::cluster::runtime::Cluster>> {
        self.cluster.set(cluster)
    }

    /// The raw value of `key` in its shard, bypassing loaders and leases
    /// (for the cluster's record store); `touch` counts it as a read.
    pub(crate) fn raw_get(&self, key: &[u8], touch: bool) -> Option<Bytes> {
        self.with_shard_raw(key, |shard, now| if touch { shard.get(now, key) } else { shard.peek(now, key) })
    }

    /// Stores `value` under `key`, bypassing loaders and leases.
    pub(crate) fn raw_set(&self, key: &[u8], value: Bytes, ttl_ms: Option<u64>) -> Result<(), ShardError> {
        let options = SetOptions { ttl_ms, ..SetOptions::default() };
        self.with_shard_raw(key, |shard, now| shard.set(now, key, value, options).map(|_| ()))
    }

    /// Calls `f` with every live entry of every shard, one shard locked at
    /// a time.
    pub(crate) fn raw_for_each(&self, mut f: impl FnMut(&[u8], &[u8])) {
        let now = self.now_ms();
        for shard in &self.shards {
            lock(shard).for_each(now, &mut f);
        }
    }

    /// Entries over all shards.
    pub(crate) fn raw_len(&self) -> usize {
        self.shards.iter().map(|s| lock(s).len()).sum()
    }

    /// Drops every entry of every shard.
    pub(crate) fn raw_clear(&self) {
        let now = self.now_ms();
        for shard in &self.shards {
            lock(shard).clear(now);
        }
    }

    /// The cluster, if the node is in one.
    pub fn cluster(&self) -> Option<&Arc<crate::cluster::runtime::Cluster>> {
        self.cluster.get()
    }

    /// A refusal when `key` belongs to a namespace that writes to its
    /// origin: only the loaders' own SET and DEL may change such keys
    /// (see [`Loaders::route`]), or the cache and the origin would part.
    pub fn refuse_origin_write(&self, key: &[u8]) -> Option<Response> {
        self.loaders.get()?.write_mode(key)?;
        Some(Response::Error(ErrorReply::new(
            ErrorCode::NotAllowed,
            format!(
                "`{}` is in a namespace written to its origin: only SET (unconditional) and DEL of one key apply",
                String::from_utf8_lossy(key)
            ),
        )))
    }

    /// A write to `key` is about to happen: a load in flight must not
    /// install what it read before. Hold the guard until the write is done,
    /// so no load starts and installs in between.
    fn invalidate_load(&self, key: &[u8]) -> Option<crate::loader::LeaseGuard<'_>> {
        self.loaders.get()?.break_lease(key)
    }

    /// A GET that also returns the entry's expiry and hint, timed and
    /// counted like [`Node::execute`]'s GET.
    pub fn get_entry(&self, key: &Bytes) -> Option<EntryView> {
        let started = Instant::now();
        let now = self.now_ms();
        let entry = self.shard(key).get_entry(now, key);
        let command = crate::metrics::command_index(&Request::Get { key: key.clone() });
        self.metrics.record(command, started.elapsed(), false);
        entry
    }

    /// Deletes every key starting with `prefix` on every shard; returns how
    /// many. Scans everything: for rare events only.
    pub fn delete_prefix(&self, prefix: &[u8]) -> u64 {
        let now = self.now_ms();
        self.shards.iter().map(|s| lock(s).delete_prefix(now, prefix) as u64).sum()
    }

    /// Deletes every entry on every shard; returns how many there were.
    pub fn flush_all(&self) -> u64 {
        if let Some(loaders) = self.loaders.get() {
            loaders.invalidate_all();
        }
        let now = self.now_ms();
        self.shards.iter().map(|s| lock(s).clear(now) as u64).sum()
    }

    /// Resident entries over all shards.
    pub fn len(&self) -> u64 {
        self.shards.iter().map(|s| lock(s).len() as u64).sum()
    }

    /// Resident entries with a TTL, over all shards.
    pub fn expiring(&self) -> u64 {
        self.shards.iter().map(|s| lock(s).expiring() as u64).sum()
    }

    /// Whether no shard holds an entry.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Shards on the node.
    pub fn shard_count(&self) -> usize {
        self.shards.len()
    }

    /// Shard `i`, locked: for inspection, tools and tests.
    pub fn lock_shard(&self, i: usize) -> MutexGuard<'_, Shard> {
        lock(&self.shards[i])
    }

    /// Periodic work on every shard (active expiry, policy deadlines and
    /// recovery), the shadow ghosts, and the supervisor that rolls back a
    /// module that keeps faulting; call every ~100 ms, off the I/O path
    /// (a rollback swaps every shard).
    pub fn tick(&self) {
        let now = self.now_ms();
        for shard in &self.shards {
            lock(shard).tick(now);
        }
        if let Some(shadow) = self.control.shadow().as_mut().and_then(|s| s.as_mut()) {
            shadow.tick(now);
        }
        self.supervise();
        if let Some(loaders) = self.loaders.get() {
            loaders.tick(now);
        }
    }

    /// Runs one request, timing it for the metrics. Never panics on client
    /// input; every failure is an error reply.
    pub fn execute(&self, request: Request) -> Response {
        let started = Instant::now();
        let command = crate::metrics::command_index(&request);
        let response = self.run(self.clock.now_ms_at(started), request);
        self.metrics.record(command, started.elapsed(), matches!(response, Response::Error(_)));
        response
    }

    /// A GET whose value `f` sees under the shard's lock instead of a
    /// clone: the RESP port copies it straight into the reply. Counted,
    /// sampled for the shadow and timed exactly as `execute` times a GET.
    pub fn get_with<R>(&self, key: &[u8], f: impl FnOnce(Option<&[u8]>) -> R) -> R {
        self.get_with_since(Instant::now(), key, f).0
    }

    /// [`Node::get_with`] timed from `started`, returning when it ended: a
    /// run of pipelined GETs times each from the end of the one before,
    /// one clock read per GET instead of two (a read is ~4% of a
    /// pipelined GET's cost).
    pub fn get_with_since<R>(&self, started: Instant, key: &[u8], f: impl FnOnce(Option<&[u8]>) -> R) -> (R, Instant) {
        let now = self.clock.now_ms_at(started);
        self.observe_sampled(now, key, || Request::Get { key: Bytes::copy_from_slice(key) });
        let out = self.shard(key).get_with(now, key, f);
        let ended = Instant::now();
        self.metrics.record(crate::metrics::GET, ended.saturating_duration_since(started), false);
        (out, ended)
    }

    /// A plain SET (no TTL, no condition) of slices, which the shard copies:
    /// the RESP port's path for the commonest write, timed from `started`
    /// like [`Node::get_with_since`], `reply` (writing the answer) included;
    /// otherwise as `execute` runs it.
    pub fn set_since<R>(
        &self,
        started: Instant,
        key: &[u8],
        value: &[u8],
        reply: impl FnOnce(Response) -> R,
    ) -> (R, Instant) {
        let now = self.clock.now_ms_at(started);
        self.observe_sampled(now, key, || {
            let (key, value) = (Bytes::copy_from_slice(key), Bytes::copy_from_slice(value));
            Request::Set { key, value, ttl_ms: None, condition: Condition::Always, hint: 0 }
        });
        let response = self.set(now, key, value, None, Condition::Always, 0);
        let failed = matches!(response, Response::Error(_));
        let out = reply(response);
        let ended = Instant::now();
        self.metrics.record(crate::metrics::SET, ended.saturating_duration_since(started), failed);
        (out, ended)
    }

    fn set(
        &self,
        now: u64,
        key: &[u8],
        value: &[u8],
        ttl_ms: Option<u64>,
        condition: Condition,
        hint: u32,
    ) -> Response {
        if let Some(refusal) = self.refuse_origin_write(key) {
            return refusal;
        }
        if ttl_ms == Some(0) {
            return Response::Error(ErrorReply::new(ErrorCode::InvalidArgument, "a TTL must be at least 1 ms"));
        }
        let _lease = self.invalidate_load(key);
        let mut shard = self.shard(key);
        let applies = match condition {
            Condition::Always => true,
            Condition::IfAbsent => !shard.contains(now, key),
            Condition::IfPresent => shard.contains(now, key),
        };
        if !applies {
            return Response::Applied(false);
        }
        let options = SetOptions { ttl_ms, hint, keep_ttl: false };
        match shard.set_slice(now, key, value, options) {
            Ok(SetOutcome::NotAdmitted) if condition == Condition::Always => Response::Ok,
            Ok(SetOutcome::NotAdmitted) => Response::Applied(false),
            Ok(_) if condition == Condition::Always => Response::Ok,
            Ok(_) => Response::Applied(true),
            Err(err) => shard_error(&err),
        }
    }

    /// Shows the shadow evaluation a request on `key` if `key` is sampled;
    /// the request (copies of borrowed bytes) is built only then.
    fn observe_sampled(&self, now: u64, key: &[u8], request: impl FnOnce() -> Request) {
        if let Some(threshold) = self.control.shadow_threshold()
            && crate::shadow::in_sample(key, threshold)
            && let Some(mut shadow) = self.control.shadow()
        {
            observe(shadow.as_mut(), now, &request());
        }
    }

    fn run(&self, now: u64, request: Request) -> Response {
        if let Some(threshold) = self.control.shadow_threshold()
            && touches_sample(&request, threshold)
            && let Some(mut shadow) = self.control.shadow()
        {
            observe(shadow.as_mut(), now, &request);
        }
        match request {
            Request::Admin { token, command } => self.admin(&token, command),
            Request::Get { key } => Response::Value(self.shard(&key).get(now, &key)),
            Request::Set { key, value, ttl_ms, condition, hint } => {
                self.set(now, &key, &value, ttl_ms, condition, hint)
            }
            Request::Del { keys } => {
                if let Some(refusal) = keys.iter().find_map(|key| self.refuse_origin_write(key)) {
                    return refusal;
                }
                let deleted = keys.iter().filter(|key| {
                    let _lease = self.invalidate_load(key);
                    self.shard(key).delete(now, key)
                });
                Response::Count(deleted.count() as u64)
            }
            Request::Exists { keys } => {
                Response::Count(keys.iter().filter(|key| self.shard(key).contains(now, key)).count() as u64)
            }
            Request::Ttl { key } => Response::Ttl(match self.shard(&key).ttl(now, &key) {
                None => TtlState::Missing,
                Some(None) => TtlState::Persistent,
                Some(Some(ms)) => TtlState::Remaining(ms),
            }),
            Request::Expire { key, ttl_ms } => {
                if let Some(refusal) = self.refuse_origin_write(&key) {
                    return refusal;
                }
                if ttl_ms == 0 {
                    let _lease = self.invalidate_load(&key);
                    Response::Applied(self.shard(&key).delete(now, &key))
                } else {
                    Response::Applied(self.shard(&key).expire(now, &key, ttl_ms))
                }
            }
            Request::MGet { keys } => {
                // The reply's size is checked before any value is copied (a
                // few bytes per key can ask for many copies of a large
                // value), and again as values are read, in case they grew.
                let limit = cachet_proto::MAX_REPLY_LEN - (64 << 10);
                let too_large = || {
                    Response::Error(ErrorReply::new(
                        ErrorCode::TooLarge,
                        format!("the reply would exceed {} bytes; ask for fewer keys", cachet_proto::MAX_REPLY_LEN),
                    ))
                };
                let sized = keys.iter().try_fold(0usize, |total, key| {
                    Some(total + self.shard(key).value_len(now, key).unwrap_or(0) + 16).filter(|&t| t <= limit)
                });
                if sized.is_none() {
                    return too_large();
                }
                let mut values = Vec::with_capacity(keys.len());
                let mut total = 0usize;
                for key in &keys {
                    let value = self.shard(key).get(now, key);
                    total += value.as_ref().map_or(0, |v| v.len()) + 16;
                    if total > limit {
                        return too_large();
                    }
                    values.push(value);
                }
                Response::Values(values)
            }
            Request::MSet { pairs } => {
                // Check every pair first so a refused one changes nothing.
                for (key, value) in &pairs {
                    if let Some(refusal) = self.refuse_origin_write(key) {
                        return refusal;
                    }
                    if let Some(err) = self.check_sizes(key, value) {
                        return err;
                    }
                }
                for (key, value) in pairs {
                    let _lease = self.invalidate_load(&key);
                    if let Err(err) = self.shard(&key).set(now, &key, value, SetOptions::default()) {
                        return shard_error(&err);
                    }
                }
                Response::Ok
            }
            Request::Incr { key, delta } => {
                if let Some(refusal) = self.refuse_origin_write(&key) {
                    return refusal;
                }
                let _lease = self.invalidate_load(&key);
                self.incr(now, key, delta)
            }
            Request::Ping => Response::Pong,
            Request::Stats => Response::Stats(self.stats()),
        }
    }

    /// The checks a shard makes before storing, made up front so a multi-key
    /// write can refuse before changing anything.
    pub(crate) fn check_sizes(&self, key: &[u8], value: &[u8]) -> Option<Response> {
        self.check_lengths(key.len(), value.len())
    }

    /// [`Node::check_sizes`] by lengths: for values stored with a header
    /// of the node's own (the cluster's records).
    pub(crate) fn check_lengths(&self, key_len: usize, value_len: usize) -> Option<Response> {
        let shard_bytes = self.config.max_bytes / self.shards.len() as u64;
        let size = (key_len + value_len) as u64;
        let err = if key_len > self.config.max_key_size {
            ShardError::KeyTooLarge { size: key_len, limit: self.config.max_key_size }
        } else if value_len > self.config.max_value_size {
            ShardError::ValueTooLarge { size: value_len, limit: self.config.max_value_size }
        } else if size > shard_bytes {
            ShardError::EntryTooLarge { size, limit: shard_bytes }
        } else {
            return None;
        };
        Some(shard_error(&err))
    }

    fn incr(&self, now: u64, key: Bytes, delta: i64) -> Response {
        let mut shard = self.shard(&key);
        let current = match shard.get(now, &key) {
            None => 0,
            Some(value) => match std::str::from_utf8(&value).ok().and_then(|s| s.parse::<i64>().ok()) {
                Some(n) => n,
                None => {
                    return Response::Error(ErrorReply::new(
                        ErrorCode::WrongType,
                        "value is not a decimal 64-bit integer",
                    ));
                }
            },
        };
        let Some(next) = current.checked_add(delta) else {
            return Response::Error(ErrorReply::new(ErrorCode::WrongType, "increment would overflow a 64-bit integer"));
        };
        let options = SetOptions { keep_ttl: true, ..SetOptions::default() };
        match shard.set(now, &key, Bytes::from(next.to_string()), options) {
            Ok(_) => Response::Integer(next),
            Err(err) => shard_error(&err),
        }
    }

    /// Counters summed over the shards, without the hot keys (see
    /// [`Node::hot_keys`]): what any client, the RESP port's INFO and the
    /// metrics endpoint may see.
    pub fn stats(&self) -> NodeStats {
        let active = lock(&self.control.state).activation.clone();
        let mut out = NodeStats {
            policy: active.name,
            policy_version: active.version,
            shards: self.shards.len() as u64,
            max_bytes: self.config.max_bytes,
            uptime_secs: self.started.elapsed().as_secs(),
            connections: self.connections.load(Ordering::Relaxed),
            cluster: self.cluster.get().map(|c| Box::new(c.stats())),
            hot_keys_hidden: true,
            ..NodeStats::default()
        };
        for shard in &self.shards {
            let shard = lock(shard);
            let s = shard.stats();
            out.hits += s.hits;
            out.misses += s.misses;
            out.evictions += s.evictions;
            out.expired += s.expired;
            out.policy_expired += s.policy_expired;
            out.deletes += s.deletes;
            out.policy_faults += s.policy_faults();
            out.entries += shard.len() as u64;
            out.bytes += shard.bytes();
            out.shards_on_fallback += u64::from(matches!(shard.policy_mode(), PolicyMode::Fallback { .. }));
        }
        let reads = out.hits + out.misses;
        out.hit_ratio = if reads == 0 { 0.0 } else { out.hits as f64 / reads as f64 };
        out
    }

    /// The hottest keys read lately, hottest first. Key bytes can be
    /// personal data (user ids, e-mail addresses in keys): only admin
    /// callers get them ([`cachet_proto::AdminCommand::Stats`]), never plain
    /// stats, INFO or the metrics endpoint.
    pub fn hot_keys(&self) -> Vec<cachet_proto::HotKey> {
        let mut hot: Vec<cachet_proto::HotKey> = self
            .shards
            .iter()
            .flat_map(|shard| lock(shard).hot_keys())
            .map(|(key, reads)| cachet_proto::HotKey { key: Bytes::from(key.into_vec()), reads: u64::from(reads) })
            .collect();
        hot.sort_by(|a, b| b.reads.cmp(&a.reads).then_with(|| a.key.cmp(&b.key)));
        hot.truncate(crate::core::hotkeys::TOP * 2);
        hot
    }
}

/// Whether any key of `request` is in the shadow's sample, decided
/// without its lock.
fn touches_sample(request: &Request, threshold: u64) -> bool {
    use crate::shadow::in_sample;
    match request {
        Request::Get { key } | Request::Set { key, .. } => in_sample(key, threshold),
        Request::MGet { keys } | Request::Del { keys } => keys.iter().any(|k| in_sample(k, threshold)),
        Request::MSet { pairs } => pairs.iter().any(|(k, _)| in_sample(k, threshold)),
        _ => false,
    }
}

/// Shows a request to the shadow evaluation if its key is sampled. Writes
/// are mirrored whether or not the live write applies (a close enough
/// model of the traffic; the ghosts only estimate).
fn observe(shadow: Option<&mut crate::shadow::Shadow>, now: u64, request: &Request) {
    let Some(shadow) = shadow else {
        return;
    };
    match request {
        Request::Get { key } if shadow.sampled(key) => shadow.read(now, key),
        Request::MGet { keys } => {
            for key in keys {
                if shadow.sampled(key) {
                    shadow.read(now, key);
                }
            }
        }
        Request::Set { key, value, ttl_ms, .. } if shadow.sampled(key) => shadow.write(now, key, value.len(), *ttl_ms),
        Request::MSet { pairs } => {
            for (key, value) in pairs {
                if shadow.sampled(key) {
                    shadow.write(now, key, value.len(), None);
                }
            }
        }
        Request::Del { keys } => {
            for key in keys {
                if shadow.sampled(key) {
                    shadow.delete(now, key);
                }
            }
        }
        _ => {}
    }
}

/// Keeps a connection counted while it lives.
pub struct ConnectionGuard(Arc<Node>);

impl Drop for ConnectionGuard {
    fn drop(&mut self) {
        self.0.connections.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A poisoned shard lock means a panic while it was held; the shard's own
/// invariants are restored on every call, so serving on is safe.
fn lock<T>(shard: &Mutex<T>) -> MutexGuard<'_, T> {
    shard.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn shard_error(err: &ShardError) -> Response {
    Response::Error(ErrorReply::new(ErrorCode::TooLarge, err.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::NativeFactory;
    use cachet_policy_sdk::Config;

    fn node() -> Node {
        let policy: Arc<dyn PolicyFactory> = Arc::new(NativeFactory::<cachet_policy_lru::Lru>::new(Config::default()));
        let config = NodeConfig { shards: 3, max_value_size: 16, ..NodeConfig::default() };
        Node::new(config, policy).expect("node")
    }

    fn b(s: &str) -> Bytes {
        Bytes::copy_from_slice(s.as_bytes())
    }

    fn set(key: &str, value: &str, condition: Condition) -> Request {
        Request::Set { key: b(key), value: b(value), ttl_ms: None, condition, hint: 0 }
    }

    #[test]
    fn commands_do_what_they_say() {
        let node = node();
        assert_eq!(node.execute(set("a", "1", Condition::Always)), Response::Ok);
        assert_eq!(node.execute(set("a", "2", Condition::IfAbsent)), Response::Applied(false));
        assert_eq!(node.execute(set("b", "2", Condition::IfPresent)), Response::Applied(false));
        assert_eq!(node.execute(set("a", "3", Condition::IfPresent)), Response::Applied(true));
        assert_eq!(node.execute(Request::Get { key: b("a") }), Response::Value(Some(b("3"))));
        assert_eq!(node.execute(Request::MSet { pairs: vec![(b("x"), b("1")), (b("y"), b("2"))] }), Response::Ok);
        assert_eq!(
            node.execute(Request::MGet { keys: vec![b("x"), b("nope"), b("y")] }),
            Response::Values(vec![Some(b("1")), None, Some(b("2"))])
        );
        assert_eq!(node.execute(Request::Exists { keys: vec![b("x"), b("y"), b("z")] }), Response::Count(2));
        assert_eq!(node.execute(Request::Del { keys: vec![b("x"), b("z")] }), Response::Count(1));
        assert_eq!(node.execute(Request::Incr { key: b("n"), delta: 5 }), Response::Integer(5));
        assert_eq!(node.execute(Request::Incr { key: b("n"), delta: -7 }), Response::Integer(-2));
        let overflow = node.execute(Request::Incr { key: b("a"), delta: i64::MAX });
        assert!(
            matches!(overflow, Response::Error(ErrorReply { code: ErrorCode::WrongType, ref message }) if message.contains("overflow"))
        );
        node.execute(set("w", "word", Condition::Always));
        let not_a_number = node.execute(Request::Incr { key: b("w"), delta: 1 });
        assert!(matches!(not_a_number, Response::Error(ErrorReply { code: ErrorCode::WrongType, .. })));
        assert_eq!(node.execute(Request::Get { key: b("w") }), Response::Value(Some(b("word"))));
        assert_eq!(node.execute(Request::Ttl { key: b("a") }), Response::Ttl(TtlState::Persistent));
        assert_eq!(node.execute(Request::Ttl { key: b("zz") }), Response::Ttl(TtlState::Missing));
        assert_eq!(node.execute(Request::Expire { key: b("a"), ttl_ms: 60_000 }), Response::Applied(true));
        assert!(
            matches!(node.execute(Request::Ttl { key: b("a") }), Response::Ttl(TtlState::Remaining(ms)) if ms <= 60_000 && ms > 50_000)
        );
        assert_eq!(node.execute(Request::Expire { key: b("zz"), ttl_ms: 1 }), Response::Applied(false));
        assert_eq!(node.execute(Request::Ping), Response::Pong);
        let Response::Stats(stats) = node.execute(Request::Stats) else { panic!("stats") };
        assert_eq!((stats.entries, stats.shards, stats.policy.as_str()), (4, 3, "lru"));
    }

    /// The RESP port's GET lends the value instead of cloning it; it must
    /// count, time and expire exactly as `execute` does.
    #[test]
    fn a_lent_read_counts_and_times_like_a_get() {
        let node = node();
        node.execute(set("a", "1", Condition::Always));
        assert_eq!(node.get_with(&b("a"), |v| v.map(<[u8]>::to_vec)), Some(b"1".to_vec()));
        assert_eq!(node.get_with(&b("nope"), |v| v.map(<[u8]>::to_vec)), None);
        assert_eq!(node.execute(Request::Get { key: b("a") }), Response::Value(Some(b("1"))));
        let stats = node.stats();
        assert_eq!((stats.hits, stats.misses), (2, 1));
        assert_eq!(node.metrics.latency(crate::metrics::GET).count(), 3, "every read is timed as a GET");
    }

    #[test]
    fn replies_are_bounded_and_ttls_must_be_positive() {
        let policy: Arc<dyn PolicyFactory> = Arc::new(NativeFactory::<cachet_policy_lru::Lru>::new(Config::default()));
        let config = NodeConfig { shards: 1, max_value_size: 1 << 20, ..NodeConfig::default() };
        let node = Node::new(config, policy).expect("node");
        node.execute(Request::Set {
            key: b("big"),
            value: Bytes::from(vec![0u8; 1 << 20]),
            ttl_ms: None,
            condition: Condition::Always,
            hint: 0,
        });
        // 70 copies of a 1 MiB value: a 3-byte-per-key request for a 70 MiB reply.
        let reply = node.execute(Request::MGet { keys: vec![b("big"); 70] });
        assert!(matches!(reply, Response::Error(ErrorReply { code: ErrorCode::TooLarge, .. })), "{reply:?}");
        assert!(matches!(node.execute(Request::MGet { keys: vec![b("big"); 3] }), Response::Values(v) if v.len() == 3));
        let zero = node.execute(Request::Set {
            key: b("k"),
            value: b("v"),
            ttl_ms: Some(0),
            condition: Condition::Always,
            hint: 0,
        });
        assert!(matches!(zero, Response::Error(ErrorReply { code: ErrorCode::InvalidArgument, .. })), "{zero:?}");
        node.execute(set("k", "v", Condition::Always));
        assert_eq!(node.execute(Request::Expire { key: b("k"), ttl_ms: 0 }), Response::Applied(true));
        assert_eq!(node.execute(Request::Get { key: b("k") }), Response::Value(None), "EXPIRE 0 deletes");
    }

    #[test]
    fn oversized_values_are_refused_and_change_nothing() {
        let node = node();
        node.execute(set("k", "small", Condition::Always));
        let reply = node.execute(set("k", "this value is far too long", Condition::Always));
        assert!(matches!(reply, Response::Error(ErrorReply { code: ErrorCode::TooLarge, .. })), "{reply:?}");
        let reply =
            node.execute(Request::MSet { pairs: vec![(b("m"), b("ok")), (b("k"), b("this one is too long!"))] });
        assert!(matches!(reply, Response::Error(ErrorReply { code: ErrorCode::TooLarge, .. })));
        assert_eq!(node.execute(Request::Get { key: b("k") }), Response::Value(Some(b("small"))));
        assert_eq!(node.execute(Request::Get { key: b("m") }), Response::Value(None), "mset is all or nothing");
    }
}
