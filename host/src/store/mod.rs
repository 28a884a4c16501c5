//! A node's data: its shards, the clock their `now` comes from, and the
//! limits every write is held to. The store is the only code that locks a
//! shard; the request path ([`crate::node`]), the loaders, the cluster's
//! record store, the policy control plane and the metrics reach the data
//! through it, and it knows none of them (no loaders, leases, cluster or
//! metrics here), so nothing it serves depends on who asked.
//!
//! [`commands`] runs the data commands of the protocol on the shards.

pub mod commands;
mod execute;
mod keyspace;
mod shards;
pub use keyspace::{MAX_SCAN_COUNT, SCAN_COUNT};
pub mod transaction;

use crate::core::{PolicyError, PolicyFactory, PolicyMode, Shard, ShardConfig, ShardError};
use bytes::Bytes;
use cachet_proto::NodeStats;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
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

impl MonotonicClock {
    /// A clock starting now.
    pub fn new() -> Self {
        Self(Instant::now())
    }
}

impl Default for MonotonicClock {
    fn default() -> Self {
        Self::new()
    }
}

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

/// Most slab slots [`Store::scan_from`] looks at under one lock: about
/// 100 µs of walking, so a scan never holds a shard long.
pub const SCAN_VISITS_PER_LOCK: usize = 4_096;

/// The shards of one node, each behind its own lock.
pub struct Store {
    shards: Vec<Mutex<Shard>>,
    config: NodeConfig,
    clock: Arc<dyn Clock>,
    /// Watch stamps: every write to a key moves its bucket's stamp, under
    /// the key's shard lock, so a WATCH sees every change to the keys it
    /// watches (and, rarely, a change to another key of the same bucket:
    /// a spurious abort, which its client retries). See `transaction`.
    stamps: Box<[AtomicU64]>,
    /// Moves with every FLUSHALL and prefix flush (which change keys
    /// without naming them), before the first shard is emptied.
    flushes: AtomicU64,
}

/// Watch stamp buckets.
const STAMPS: usize = 1 << 14;

impl Store {
    /// A store whose shards each get an instance from `policy`.
    pub fn new(config: NodeConfig, policy: Arc<dyn PolicyFactory>, clock: Arc<dyn Clock>) -> Result<Self, PolicyError> {
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
                    stopwatch: Some(crate::stopwatch::monotonic_ns),
                    ..ShardConfig::default()
                };
                Shard::new(shard, policy.clone()).map(Mutex::new)
            })
            .collect::<Result<_, _>>()?;
        let stamps = (0..STAMPS).map(|_| AtomicU64::new(0)).collect();
        Ok(Self { shards, config, clock, stamps, flushes: AtomicU64::new(0) })
    }

    /// The node's limits.
    pub fn config(&self) -> &NodeConfig {
        &self.config
    }

    /// The `now` of every shard call, from the node's clock.
    pub fn now_ms(&self) -> u64 {
        self.clock.now_ms()
    }

    /// [`Store::now_ms`] as of `at`, an instant the caller just read.
    pub fn now_ms_at(&self, at: Instant) -> u64 {
        self.clock.now_ms_at(at)
    }

    /// Shards in the store.
    pub fn shard_count(&self) -> usize {
        self.shards.len()
    }

    /// Shard `i`, locked: for policy swaps, listings, tools and tests.
    pub fn lock_shard(&self, i: usize) -> MutexGuard<'_, Shard> {
        lock(&self.shards[i])
    }

    fn shard(&self, key: &[u8]) -> MutexGuard<'_, Shard> {
        lock(&self.shards[self.shard_index(key)])
    }

    /// The index of `key`'s shard.
    fn shard_index(&self, key: &[u8]) -> usize {
        self.shard_of(cachet_proto::key_hash(key))
    }

    /// The index of the shard of the key whose hash is `hash`.
    fn shard_of(&self, hash: u64) -> usize {
        (hash % self.shards.len() as u64) as usize
    }

    /// `key`'s watch stamp bucket.
    fn stamp(&self, key: &[u8]) -> &AtomicU64 {
        self.stamp_of(cachet_proto::key_hash(key))
    }

    /// The watch stamp bucket of the key whose hash is `hash`: from the
    /// hash's high bits, so one shard's keys spread over all buckets.
    fn stamp_of(&self, hash: u64) -> &AtomicU64 {
        &self.stamps[(hash >> 50) as usize % STAMPS]
    }

    /// `key` changed: its watch stamp moves (called under its shard's
    /// lock).
    fn touched(&self, key: &[u8]) {
        self.stamp(key).fetch_add(1, Ordering::Relaxed);
    }

    /// Runs `f` on the shard owning `key`, under its lock, with the store's
    /// `now`: for what must read and write atomically.
    pub fn with_shard<R>(&self, key: &[u8], f: impl FnOnce(&mut Shard, u64) -> R) -> R {
        let now = self.now_ms();
        f(&mut self.shard(key), now)
    }

    /// Calls `f` with every live entry of every shard, one shard locked at
    /// a time.
    pub fn for_each(&self, mut f: impl FnMut(&[u8], &[u8], u32)) {
        let now = self.now_ms();
        for shard in &self.shards {
            lock(shard).for_each(now, &mut f);
        }
    }

    /// [`Shard::scan_from`] over the whole store, one shard locked at a
    /// time and for no more than [`SCAN_VISITS_PER_LOCK`] slots at once:
    /// calls `f` with entries from `cursor` on (0: the start) until it
    /// returns `false` or `max_visits` slots were looked at, and returns the
    /// cursor to go on from, `None` at the end. The cursor is the shard's
    /// number in the high half and its slab index in the low half.
    pub fn scan_from(&self, cursor: u64, max_visits: usize, f: &mut crate::core::ScanVisitor<'_>) -> Option<u64> {
        let (mut shard, mut index) = ((cursor >> 32) as usize, cursor as u32);
        let mut left = max_visits.max(1);
        let stopped = std::cell::Cell::new(false);
        let mut wrapped = |key: &[u8], value: &[u8], hint: u32| {
            let go_on = f(key, value, hint);
            stopped.set(!go_on);
            go_on
        };
        while shard < self.shards.len() {
            let visits = left.min(SCAN_VISITS_PER_LOCK);
            let guard = lock(&self.shards[shard]);
            let next = guard.scan_from(self.now_ms(), index, visits, &mut wrapped);
            let slots = guard.slot_count();
            drop(guard);
            match next {
                Some(next) => {
                    left = left.saturating_sub((next - index) as usize);
                    index = next;
                }
                None => {
                    // The slots this shard had left: a small shard leaves
                    // the rest of the step to the next one.
                    left = left.saturating_sub(slots.saturating_sub(index as usize).min(visits));
                    (shard, index) = (shard + 1, 0);
                }
            }
            if stopped.get() || left == 0 {
                break;
            }
        }
        (shard < self.shards.len()).then_some(((shard as u64) << 32) | u64::from(index))
    }

    /// Resident entries over all shards.
    pub fn len(&self) -> u64 {
        self.shards.iter().map(|s| lock(s).len() as u64).sum()
    }

    /// Whether no shard holds an entry.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Resident entries with a TTL, over all shards.
    pub fn expiring(&self) -> u64 {
        self.shards.iter().map(|s| lock(s).expiring() as u64).sum()
    }

    /// Drops every entry of every shard; returns how many there were.
    pub fn clear(&self) -> u64 {
        // Before (a WATCH during the flush sees it) and after (a WATCH
        // that read the count mid-flush, of a key not emptied yet).
        self.flushes.fetch_add(1, Ordering::AcqRel);
        let now = self.now_ms();
        let cleared = self.shards.iter().map(|s| lock(s).clear(now) as u64).sum();
        self.flushes.fetch_add(1, Ordering::AcqRel);
        cleared
    }

    /// Deletes every key starting with `prefix` on every shard; returns how
    /// many. Scans everything: for rare events only.
    pub fn delete_prefix(&self, prefix: &[u8]) -> u64 {
        self.flushes.fetch_add(1, Ordering::AcqRel);
        let now = self.now_ms();
        let deleted = self.shards.iter().map(|s| lock(s).delete_prefix(now, prefix) as u64).sum();
        self.flushes.fetch_add(1, Ordering::AcqRel);
        deleted
    }

    /// Periodic work on every shard: active expiry, policy deadlines and
    /// recovery from faults.
    pub fn tick(&self, now: u64) {
        for shard in &self.shards {
            lock(shard).tick(now);
        }
    }

    /// Whether a key and value of these lengths fit: the checks a shard
    /// makes before storing, made up front so a multi-key write can refuse
    /// before changing anything (and by lengths, for values stored with a
    /// header of the node's own, the cluster's records).
    pub fn check_lengths(&self, key_len: usize, value_len: usize) -> Result<(), ShardError> {
        let shard_bytes = self.config.max_bytes / self.shards.len() as u64;
        let size = (key_len + value_len) as u64;
        if key_len > self.config.max_key_size {
            Err(ShardError::KeyTooLarge { size: key_len, limit: self.config.max_key_size })
        } else if value_len > self.config.max_value_size {
            Err(ShardError::ValueTooLarge { size: value_len, limit: self.config.max_value_size })
        } else if size > shard_bytes {
            Err(ShardError::EntryTooLarge { size, limit: shard_bytes })
        } else {
            Ok(())
        }
    }

    /// [`Store::check_lengths`] of a key and value.
    pub fn check_sizes(&self, key: &[u8], value: &[u8]) -> Result<(), ShardError> {
        self.check_lengths(key.len(), value.len())
    }

    /// Counters summed over the shards: hits, misses, evictions, entries,
    /// bytes and the rest of [`NodeStats`] that the data decides (the node
    /// fills in the policy, uptime, connections and cluster).
    pub fn stats(&self) -> NodeStats {
        let mut out = NodeStats {
            shards: self.shards.len() as u64,
            max_bytes: self.config.max_bytes,
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
    /// personal data: only admin callers get them.
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

/// A poisoned shard lock means a panic while it was held; the shard's own
/// invariants are restored on every call, so serving on is safe.
fn lock<T>(shard: &Mutex<T>) -> MutexGuard<'_, T> {
    shard.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}
