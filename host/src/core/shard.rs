//! One shard: a byte- and entry-bounded key-value store with per-key TTL
//! whose eviction decisions come from a policy.
//!
//! The shard owns the truth (what is resident, how many bytes) and keeps the
//! policy advisory: it validates every id the policy returns, never lets the
//! budget be exceeded, and on any policy fault switches at once to a native
//! LRU rebuilt from its own records, then retries a fresh instance of the
//! configured policy later (backing off, and giving up after repeated
//! faults).
//!
//! Reads and writes are buffered as events and handed to the policy in
//! batches (flushed at `batch_size` and before any other policy call), which
//! is what makes a sandboxed policy cheap: a Wasm call costs a few hundred
//! nanoseconds, an event in a batch about sixteen.

use crate::core::histogram::Histogram;
use crate::core::hotkeys::HotKeys;
use crate::core::policy::{EvictionPolicy, FaultKind, NativeFactory, PolicyError, PolicyFactory, PolicyFault};
use crate::core::ttl::TtlIndex;
use bytes::Bytes;
use cachet_policy_lru::Lru;
use cachet_policy_sdk::{Capacity, Config, Entry, EntryId, Event, Need, PolicyInfo, RemovalCause};
use hashbrown::HashTable;
use std::sync::Arc;

/// Limits and tuning of one shard.
#[derive(Clone, Debug)]
pub struct ShardConfig {
    /// At most this many resident entries.
    pub max_entries: u64,
    /// At most this many resident bytes (keys plus values).
    pub max_bytes: u64,
    /// Largest accepted key.
    pub max_key_size: usize,
    /// Largest accepted value.
    pub max_value_size: usize,
    /// Events buffered before a flush to the policy.
    pub batch_size: usize,
    /// Seed handed to the policy (its only randomness).
    pub seed: u64,
    /// Most expired entries removed by one [`Shard::tick`], bounding its pause.
    pub expire_per_tick: usize,
    /// First delay before retrying the configured policy after a fault;
    /// doubles with each fault in a row.
    pub retry_after_ms: u64,
    /// Faults in a row after which the configured policy is given up on and
    /// the shard stays on its fallback.
    pub max_faults_in_a_row: u32,
    /// A fault this long after the previous one starts a new count.
    pub fault_window_ms: u64,
    /// Track the hottest keys read ([`Shard::hot_keys`]); off for trace
    /// replay, where nobody asks.
    pub track_hot_keys: bool,
    /// Where policy calls are timed from, for [`ShardStats::hooks`]: a
    /// monotonic clock in nanoseconds, read before and after each call. The
    /// core reads no clock of its own, so `None` (the default) times nothing
    /// and leaves the histograms empty; a node passes
    /// `crate::stopwatch::monotonic_ns`.
    pub stopwatch: Option<fn() -> u64>,
}

impl Default for ShardConfig {
    fn default() -> Self {
        Self {
            max_entries: 1_000_000,
            max_bytes: 256 << 20,
            max_key_size: 64 << 10,
            max_value_size: 1 << 20,
            batch_size: 64,
            seed: 0,
            expire_per_tick: 1_000,
            retry_after_ms: 1_000,
            max_faults_in_a_row: 3,
            fault_window_ms: 60_000,
            track_hot_keys: false,
            stopwatch: None,
        }
    }
}

/// A request the shard refuses; nothing is changed when one is returned.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ShardError {
    /// The key is longer than `max_key_size`.
    #[error("key of {size} bytes exceeds the limit of {limit} bytes")]
    KeyTooLarge {
        /// The key's length.
        size: usize,
        /// The configured limit.
        limit: usize,
    },
    /// The value is longer than `max_value_size`.
    #[error("value of {size} bytes exceeds the limit of {limit} bytes")]
    ValueTooLarge {
        /// The value's length.
        size: usize,
        /// The configured limit.
        limit: usize,
    },
    /// Key plus value would not fit even in an empty shard.
    #[error("entry of {size} bytes exceeds the shard's byte budget of {limit} bytes")]
    EntryTooLarge {
        /// Key plus value.
        size: u64,
        /// The shard's byte budget.
        limit: u64,
    },
}

/// How a write should be stored.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SetOptions {
    /// Time to live in milliseconds; `None` keeps the entry until evicted.
    pub ttl_ms: Option<u64>,
    /// Application hint passed to the policy (cost or priority).
    pub hint: u32,
    /// When replacing an entry, keep its current expiry (`ttl_ms` is
    /// ignored), as INCR does.
    pub keep_ttl: bool,
}

/// A live entry as read by [`Shard::get_entry`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EntryView {
    /// The value.
    pub value: Bytes,
    /// Absolute expiry in the shard's milliseconds, if any.
    pub expires_at: Option<u64>,
    /// The hint stored with the value (for loaded entries: the load time).
    pub hint: u32,
}

/// What a successful write did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SetOutcome {
    /// A new entry was stored.
    Inserted,
    /// An existing entry was replaced in place.
    Updated,
    /// The policy's admission check declined to cache the new entry.
    NotAdmitted,
}

/// Which policy is choosing victims right now.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PolicyMode {
    /// The configured policy.
    Configured,
    /// The native fallback, with a retry of the configured policy due at
    /// `retry_at` (if it has not been given up on).
    Fallback {
        /// When the configured policy is tried again; `None` once given up.
        retry_at: Option<u64>,
    },
}

/// The policy calls whose latency is measured.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Hook {
    /// A batch of events.
    Events,
    /// Victim choice (with the batch it carries).
    PickVictims,
    /// An admission check.
    Admit,
    /// `next-deadline` and `expired`.
    Deadlines,
    /// `export-order`.
    Export,
}

impl Hook {
    /// Every hook, in the order [`Hook::index`] numbers them.
    pub const ALL: [Self; 5] = [Self::Events, Self::PickVictims, Self::Admit, Self::Deadlines, Self::Export];

    /// A dense index for per-hook histograms.
    pub fn index(self) -> usize {
        self as usize
    }

    /// The name used in metrics.
    pub fn name(self) -> &'static str {
        match self {
            Self::Events => "on_events",
            Self::PickVictims => "pick_victims",
            Self::Admit => "admit",
            Self::Deadlines => "deadlines",
            Self::Export => "export_order",
        }
    }
}

/// Runs a policy call and, given a `stopwatch` (monotonic nanoseconds, see
/// [`ShardConfig::stopwatch`]), records how long it took. Durations feed
/// metrics only; no decision depends on them, so the core stays
/// deterministic under a manual clock.
fn timed<T>(
    stopwatch: Option<fn() -> u64>,
    hooks: &mut [Histogram; Hook::ALL.len()],
    hook: Hook,
    call: impl FnOnce() -> T,
) -> T {
    let _span = tracing::trace_span!("policy_call", hook = hook.name()).entered();
    let Some(now_ns) = stopwatch else {
        return call();
    };
    let start = now_ns();
    let out = call();
    hooks[hook.index()].record(now_ns().saturating_sub(start));
    out
}

/// Counters of one shard.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ShardStats {
    /// Reads that found a live entry.
    pub hits: u64,
    /// Reads that found nothing (or an expired entry).
    pub misses: u64,
    /// New entries stored.
    pub inserts: u64,
    /// Entries replaced in place.
    pub updates: u64,
    /// Entries removed by a client.
    pub deletes: u64,
    /// Entries evicted on the policy's advice.
    pub evictions: u64,
    /// Entries removed because their TTL passed.
    pub expired: u64,
    /// Entries removed at the policy's own deadlines.
    pub policy_expired: u64,
    /// New entries the policy's admission check declined.
    pub not_admitted: u64,
    /// Policy faults, by [`FaultKind::index`].
    pub faults: [u64; FaultKind::ALL.len()],
    /// Times the shard switched to its fallback policy.
    pub fallbacks: u64,
    /// Times a fresh instance of the configured policy was put back.
    pub recoveries: u64,
    /// Hot-swaps to another configured policy.
    pub swaps: u64,
    /// Policy call latency, by [`Hook::index`].
    pub hooks: [Histogram; Hook::ALL.len()],
}

impl ShardStats {
    /// Faults of every kind.
    pub fn policy_faults(&self) -> u64 {
        self.faults.iter().sum()
    }

    /// Hits over reads, 0 when there were none.
    pub fn hit_ratio(&self) -> f64 {
        let reads = self.hits + self.misses;
        if reads == 0 { 0.0 } else { self.hits as f64 / reads as f64 }
    }
}

/// One entry: 40 bytes, and one allocation holding its key's length, key
/// and value. Memory per key is what a cache is chosen for: a `Bytes` value
/// (a 32-byte handle and an allocation of its own, with its header and size
/// rounding), an inline key and the whole key hash made this 96 bytes plus
/// a second allocation, and the generation another 4 bytes beside it.
/// The price is a copy on each write (the request's buffer is never kept
/// anyway) and on each read that wants `Bytes` rather than a lent slice.
struct Slot {
    /// The key's length (LEB128: one byte below 128), the key, the value;
    /// `None` while the slot is free.
    data: Option<Box<[u8]>>,
    /// Absolute expiry, [`NEVER`] for none (an `Option` would take 8 more
    /// bytes).
    expires: u64,
    /// Half of the key hash: enough to place the entry in the index and to
    /// pass over other keys without reading theirs. The policy's events get
    /// the whole hash, recomputed from the key when it is not at hand.
    hash: u32,
    /// The low half of the logical time of the last read or write, so a
    /// fallback can be rebuilt in recency order without trusting a faulted
    /// policy's export; ages are taken with wrapping arithmetic, which
    /// misorders only entries untouched for four billion operations.
    touched: u32,
    hint: u32,
    /// Bumped each time the slot is freed, so a stale id never matches a
    /// later entry; kept while the slot is free.
    generation: u32,
}

/// The index's hash of an entry whose key hash has `half` as its low half:
/// hashbrown places by the low bits and tags by the top seven, so the half
/// is repeated in both, independent up to 2^25 buckets.
fn table_hash(half: u32) -> u64 {
    let half = u64::from(half);
    half | (half << 32)
}

/// The `expires` of an entry without a time to live.
const NEVER: u64 = u64::MAX;

/// When a time to live of `ttl_ms` set at `now` runs out; never [`NEVER`].
fn deadline(now: u64, ttl_ms: u64) -> u64 {
    now.saturating_add(ttl_ms).min(NEVER - 1)
}

/// `key`'s length as LEB128, then `key`, then `value`, in one allocation
/// of exactly that size (a spare byte could cross a size class and make the
/// boxing reallocate).
fn pack(key: &[u8], value: &[u8]) -> Box<[u8]> {
    let prefix = (usize::BITS - key.len().leading_zeros()).div_ceil(7).max(1) as usize;
    let mut data = Vec::with_capacity(prefix + key.len() + value.len());
    let mut len = key.len();
    while len >= 0x80 {
        data.push((len as u8) | 0x80);
        len >>= 7;
    }
    data.push(len as u8);
    data.extend_from_slice(key);
    data.extend_from_slice(value);
    data.into_boxed_slice()
}

/// Where the key of [`pack`]ed `data` starts and ends.
#[inline]
fn key_span(data: &[u8]) -> (usize, usize) {
    // Keys under 128 bytes, nearly all: one length byte. Every lookup
    // that meets a candidate with its hash comes here.
    if let Some(&len) = data.first()
        && len < 0x80
    {
        return (1, (1 + usize::from(len)).min(data.len()));
    }
    let (mut len, mut shift, mut at) = (0usize, 0, 0);
    while let Some(&byte) = data.get(at) {
        len |= usize::from(byte & 0x7f) << shift;
        at += 1;
        shift += 7;
        if byte & 0x80 == 0 {
            break;
        }
    }
    (at, (at + len).min(data.len()))
}

impl Slot {
    /// A slot for `key` and `value` (its generation is the slab's to set).
    fn new(key: &[u8], value: &[u8], key_hash: u64, expires_at: Option<u64>, hint: u32, touched: u64) -> Self {
        Self {
            data: Some(pack(key, value)),
            expires: expires_at.unwrap_or(NEVER),
            hash: key_hash as u32,
            touched: touched as u32,
            hint,
            generation: 0,
        }
    }

    /// A free slot of `generation`.
    fn free(generation: u32) -> Self {
        Self { data: None, expires: NEVER, hash: 0, touched: 0, hint: 0, generation }
    }

    fn bytes(&self) -> &[u8] {
        self.data.as_deref().unwrap_or_default()
    }

    fn key(&self) -> &[u8] {
        let data = self.bytes();
        let (start, end) = key_span(data);
        &data[start..end]
    }

    fn value(&self) -> &[u8] {
        let data = self.bytes();
        &data[key_span(data).1..]
    }

    /// Replaces the value, keeping the key.
    fn set_value(&mut self, value: &[u8]) {
        let Some(data) = &mut self.data else { return };
        let (_, key_end) = key_span(data);
        if data.len() == key_end + value.len() {
            data[key_end..].copy_from_slice(value);
        } else {
            let mut packed = Vec::with_capacity(key_end + value.len());
            packed.extend_from_slice(&data[..key_end]);
            packed.extend_from_slice(value);
            *data = packed.into_boxed_slice();
        }
    }

    fn expires_at(&self) -> Option<u64> {
        (self.expires != NEVER).then_some(self.expires)
    }

    fn set_expires_at(&mut self, at: Option<u64>) {
        self.expires = at.unwrap_or(NEVER);
    }

    /// Key plus value, what the byte budget counts.
    fn size(&self) -> u64 {
        let data = self.bytes();
        (data.len() - key_span(data).0) as u64
    }
}

/// Slot storage with generation-tagged ids: the low 32 bits index `slots`,
/// the high 32 bits are the slot's generation, bumped on every reuse, so a
/// stale id never matches a newer entry.
#[derive(Default)]
struct Slab {
    slots: Vec<Slot>,
    free: Vec<u32>,
}

impl Slab {
    fn id(&self, index: u32) -> EntryId {
        (u64::from(self.slots[index as usize].generation) << 32) | u64::from(index)
    }

    fn insert(&mut self, slot: Slot) -> u32 {
        match self.free.pop() {
            Some(index) => {
                let cell = &mut self.slots[index as usize];
                *cell = Slot { generation: cell.generation, ..slot };
                index
            }
            None => {
                self.slots.push(slot);
                (self.slots.len() - 1) as u32
            }
        }
    }

    /// The live slot index behind `id`, if `id` is current.
    fn resolve(&self, id: EntryId) -> Option<u32> {
        let index = (id & u64::from(u32::MAX)) as u32;
        let slot = self.slots.get(index as usize)?;
        (slot.data.is_some() && slot.generation == (id >> 32) as u32).then_some(index)
    }

    fn get(&self, index: u32) -> &Slot {
        let slot = &self.slots[index as usize];
        debug_assert!(slot.data.is_some(), "slot index {index} is not live");
        slot
    }

    fn get_mut(&mut self, index: u32) -> &mut Slot {
        let slot = &mut self.slots[index as usize];
        debug_assert!(slot.data.is_some(), "slot index {index} is not live");
        slot
    }

    fn remove(&mut self, index: u32) -> Option<Slot> {
        let cell = &mut self.slots[index as usize];
        cell.data.as_ref()?;
        let next = Slot::free(cell.generation.wrapping_add(1));
        self.free.push(index);
        Some(std::mem::replace(cell, next))
    }

    fn live(&self) -> impl Iterator<Item = (u32, &Slot)> {
        self.slots.iter().enumerate().filter(|(_, s)| s.data.is_some()).map(|(i, s)| (i as u32, s))
    }
}

/// The policy serving a shard, with what is needed to replace it.
struct PolicySlot {
    configured: Arc<dyn PolicyFactory>,
    active: Box<dyn EvictionPolicy>,
    /// Info of the active policy (the fallback's while in fallback).
    info: PolicyInfo,
    mode: PolicyMode,
    faults_in_a_row: u32,
    last_fault_at: Option<u64>,
    /// Faults since `configured` was installed, so an operator sees what
    /// each module cost, across swaps.
    configured_faults: u64,
    /// When the configured policy last started serving (installed or
    /// recovered): a fault more than a fault window after that starts a new
    /// count, a fault sooner (or a failed rebuild) adds to it, however long
    /// the back-off between retries has grown.
    healthy_since: u64,
}

/// What [`Shard::scan_from`] calls with each entry's key, value and hint;
/// `false` stops the walk after it.
pub type ScanVisitor<'a> = dyn FnMut(&[u8], &[u8], u32) -> bool + 'a;

/// A byte- and entry-bounded cache shard. See the module docs.
pub struct Shard {
    config: ShardConfig,
    slab: Slab,
    table: HashTable<u32>,
    ttl: TtlIndex,
    bytes: u64,
    clock: u64,
    events: Vec<Event>,
    victims: Vec<EntryId>,
    policy: PolicySlot,
    stats: ShardStats,
    /// Events since [`Shard::begin_swap`], for the policy being built.
    journal: Option<Journal>,
    hot: Option<Box<HotKeys>>,
}

/// What happened in a shard while its next policy was being built outside
/// the shard's lock: replayed into that policy before it takes over.
struct Journal {
    events: Vec<Event>,
    wants_access: bool,
    wants_miss: bool,
    /// More than [`JOURNAL_LIMIT`] events: the swap falls back to a full
    /// rebuild under the lock rather than buffer without bound.
    overflowed: bool,
}

impl Journal {
    fn record(&mut self, event: Event) {
        let wanted = match event {
            Event::Accessed(_) => self.wants_access,
            Event::Missed(_) => self.wants_miss,
            _ => true,
        };
        if !wanted || self.overflowed {
            return;
        }
        if self.events.len() >= JOURNAL_LIMIT {
            self.overflowed = true;
            self.events = Vec::new();
            return;
        }
        self.events.push(event);
    }
}

/// Most events journaled during one swap (an event is 56 bytes: 56 MiB).
const JOURNAL_LIMIT: usize = 1 << 20;

/// The resident entries of a shard in its policy's eviction order, taken
/// by [`Shard::begin_swap`] for building the next policy off the lock.
pub struct SwapSnapshot {
    /// Entries to feed the new policy as inserts, first-to-evict first.
    pub entries: Vec<Entry>,
}

impl Shard {
    /// A shard whose victims come from instances made by `policy`.
    pub fn new(config: ShardConfig, policy: Arc<dyn PolicyFactory>) -> Result<Self, PolicyError> {
        let active = policy.create(capacity(&config), config.seed)?;
        Ok(Self {
            slab: Slab::default(),
            table: HashTable::new(),
            ttl: TtlIndex::default(),
            bytes: 0,
            clock: 0,
            events: Vec::with_capacity(config.batch_size),
            victims: Vec::new(),
            policy: PolicySlot {
                info: policy.info().clone(),
                configured: policy,
                active,
                mode: PolicyMode::Configured,
                faults_in_a_row: 0,
                last_fault_at: None,
                configured_faults: 0,
                healthy_since: 0,
            },
            stats: ShardStats::default(),
            journal: None,
            hot: config.track_hot_keys.then(Box::default),
            config,
        })
    }

    /// The shard's limits.
    pub fn config(&self) -> &ShardConfig {
        &self.config
    }

    /// Counters so far.
    pub fn stats(&self) -> &ShardStats {
        &self.stats
    }

    /// Resident entries.
    pub fn len(&self) -> usize {
        self.table.len()
    }

    /// True when nothing is resident.
    pub fn is_empty(&self) -> bool {
        self.table.is_empty()
    }

    /// Resident bytes (keys plus values).
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// Which policy is choosing victims.
    pub fn policy_mode(&self) -> &PolicyMode {
        &self.policy.mode
    }

    /// Info of the policy choosing victims now.
    pub fn active_policy(&self) -> &PolicyInfo {
        &self.policy.info
    }

    /// Info of the configured policy (which may be sidelined by a fault).
    pub fn configured_policy(&self) -> &PolicyInfo {
        self.policy.configured.info()
    }

    /// Resident entries with a TTL.
    pub fn expiring(&self) -> usize {
        self.ttl.len()
    }

    /// The capacity and seed a policy instance for this shard is created
    /// with.
    pub fn policy_capacity(&self) -> (Capacity, u64) {
        (capacity(&self.config), self.config.seed)
    }

    /// Faults of the configured policy since it was installed.
    pub fn configured_faults(&self) -> u64 {
        self.policy.configured_faults
    }

    /// Whether the shard gave up on its configured policy after repeated
    /// faults and stays on the fallback until another one is installed.
    pub fn gave_up(&self) -> bool {
        matches!(self.policy.mode, PolicyMode::Fallback { retry_at: None })
    }

    /// Hot-swap: makes `factory` the configured policy. A fresh instance is
    /// fed every resident entry in the current policy's eviction order (so
    /// what was about to go still goes first), then replaces the current
    /// one; the caller holds the shard, so no request sees a half-built
    /// policy. Returns the entries handed over. On error nothing changes
    /// and the current policy keeps serving.
    pub fn swap_policy(&mut self, now: u64, factory: Arc<dyn PolicyFactory>) -> Result<usize, PolicyError> {
        let order = self.handover_order(now);
        let mut fresh = factory.create(capacity(&self.config), self.config.seed)?;
        self.replay(now, fresh.as_mut(), &order)?;
        self.install(now, factory, fresh);
        Ok(order.len())
    }

    /// First half of a hot-swap that keeps the shard's lock short: returns
    /// the resident entries in the current eviction order and starts
    /// journaling what happens next for a policy that wants accesses
    /// and/or misses as `info` says. The caller builds the new instance
    /// from the snapshot without holding the shard, then calls
    /// [`Shard::finish_swap`] (or [`Shard::abort_swap`]).
    pub fn begin_swap(&mut self, now: u64, info: &PolicyInfo) -> SwapSnapshot {
        let order = self.handover_order(now);
        let entries = order.iter().filter_map(|&id| self.slab.resolve(id)).map(|i| self.entry_rehashed(i)).collect();
        self.journal = Some(Journal {
            events: Vec::new(),
            wants_access: info.wants_access_events,
            wants_miss: info.wants_miss_events,
            overflowed: false,
        });
        SwapSnapshot { entries }
    }

    /// Second half of a hot-swap: feeds `fresh` (built from the snapshot)
    /// what happened since, then installs it as the configured policy made
    /// by `factory`. If the journal overflowed, or `fresh` faults on it, the
    /// shard is rebuilt under the lock instead ([`Shard::swap_policy`]).
    /// Returns the entries handed over; on error nothing changes.
    pub fn finish_swap(
        &mut self,
        now: u64,
        factory: Arc<dyn PolicyFactory>,
        mut fresh: Box<dyn EvictionPolicy>,
    ) -> Result<usize, PolicyError> {
        let Some(journal) = self.journal.take() else {
            return self.swap_policy(now, factory);
        };
        if journal.overflowed {
            tracing::info!("swap journal overflowed; rebuilding under the lock");
            return self.swap_policy(now, factory);
        }
        for chunk in journal.events.chunks(REPLAY_BATCH) {
            if let Err(fault) = fresh.on_events(now, chunk) {
                tracing::warn!(%fault, "new policy faulted on the swap journal; rebuilding under the lock");
                return self.swap_policy(now, factory);
            }
        }
        // Buffered events were journaled already; they were for the old
        // policy only.
        self.events.clear();
        self.install(now, factory, fresh);
        Ok(self.len())
    }

    /// Makes `fresh` (an instance of `factory`, already fed the residents)
    /// the configured and active policy, with a clean fault record.
    fn install(&mut self, now: u64, factory: Arc<dyn PolicyFactory>, fresh: Box<dyn EvictionPolicy>) {
        self.policy = PolicySlot {
            info: factory.info().clone(),
            configured: factory,
            active: fresh,
            mode: PolicyMode::Configured,
            faults_in_a_row: 0,
            last_fault_at: None,
            configured_faults: 0,
            healthy_since: now,
        };
        self.stats.swaps += 1;
    }

    /// Stops journaling after a swap that will not finish.
    pub fn abort_swap(&mut self) {
        self.journal = None;
    }

    /// Reads `key`. A hit is reported to the policy; an expired entry is
    /// removed and reads as a miss.
    pub fn get(&mut self, now: u64, key: &[u8]) -> Option<Bytes> {
        let index = self.read(now, key)?;
        Some(Bytes::copy_from_slice(self.slab.get(index).value()))
    }

    /// Reads `key` like [`Shard::get`] but lends the value to `f` instead
    /// of copying it out: a reply can copy the bytes straight into its
    /// buffer, one allocation less.
    pub fn get_with<R>(&mut self, now: u64, key: &[u8], f: impl FnOnce(Option<&[u8]>) -> R) -> R {
        match self.read(now, key) {
            Some(index) => f(Some(self.slab.get(index).value())),
            None => f(None),
        }
    }

    /// A read of `key`: counted as a hit (recency, policy access event)
    /// or a miss (an expired entry is reaped first); the slot on a hit.
    fn read(&mut self, now: u64, key: &[u8]) -> Option<u32> {
        let hash = cachet_proto::key_hash(key);
        if let Some(hot) = &mut self.hot {
            hot.record(hash, key);
        }
        let Some(index) = self.find(hash, key) else {
            self.miss(now, hash);
            return None;
        };
        if self.is_expired(index, now) {
            self.remove(now, index, RemovalCause::Expired);
            self.stats.expired += 1;
            self.miss(now, hash);
            return None;
        }
        self.stats.hits += 1;
        self.clock += 1;
        self.slab.get_mut(index).touched = self.clock as u32;
        let id = self.slab.id(index);
        self.push_event(now, Event::Accessed(id));
        Some(index)
    }

    /// Reads `key` like [`Shard::get`], with the entry's expiry and hint:
    /// what a loader namespace needs to decide on an early refresh.
    pub fn get_entry(&mut self, now: u64, key: &[u8]) -> Option<EntryView> {
        let value = self.get(now, key)?;
        let index = self.find(cachet_proto::key_hash(key), key)?;
        let slot = self.slab.get(index);
        Some(EntryView { value, expires_at: slot.expires_at(), hint: slot.hint })
    }

    /// The hottest keys read lately, hottest first, with their estimated
    /// (aged) read counts; empty unless `track_hot_keys` is on.
    pub fn hot_keys(&self) -> Vec<(Box<[u8]>, u32)> {
        self.hot.as_ref().map(|h| h.top()).unwrap_or_default()
    }

    /// Whether `key` is resident and live; not reported as an access.
    pub fn contains(&self, now: u64, key: &[u8]) -> bool {
        let hash = cachet_proto::key_hash(key);
        self.find(hash, key).is_some_and(|index| !self.is_expired(index, now))
    }

    /// Stores `value` under `key`, evicting on the policy's advice to stay
    /// within budget. Refused writes change nothing. Key and value are
    /// copied into the entry's own allocation, so `value` may be a slice of
    /// a larger buffer: the shard keeps nothing of it.
    pub fn set(&mut self, now: u64, key: &[u8], value: Bytes, options: SetOptions) -> Result<SetOutcome, ShardError> {
        self.set_slice(now, key, &value, options)
    }

    /// [`Shard::set`] of a borrowed value.
    pub fn set_slice(
        &mut self,
        now: u64,
        key: &[u8],
        value: &[u8],
        options: SetOptions,
    ) -> Result<SetOutcome, ShardError> {
        if key.len() > self.config.max_key_size {
            return Err(ShardError::KeyTooLarge { size: key.len(), limit: self.config.max_key_size });
        }
        if value.len() > self.config.max_value_size {
            return Err(ShardError::ValueTooLarge { size: value.len(), limit: self.config.max_value_size });
        }
        let size = (key.len() + value.len()) as u64;
        if size > self.config.max_bytes {
            return Err(ShardError::EntryTooLarge { size, limit: self.config.max_bytes });
        }
        let hash = cachet_proto::key_hash(key);
        let expires_at = options.ttl_ms.map(|ttl| deadline(now, ttl));
        self.clock += 1;
        let mut found = self.find(hash, key);
        if let Some(index) = found.filter(|&i| self.is_expired(i, now)) {
            // Dead but not yet reaped: it expires now and the write is a new
            // entry, not a hit on the old one.
            self.remove(now, index, RemovalCause::Expired);
            self.stats.expired += 1;
            found = None;
        }
        if let Some(index) = found {
            let expires_at = if options.keep_ttl { self.slab.get(index).expires_at() } else { expires_at };
            self.update(now, index, hash, value, expires_at, options.hint);
            return Ok(SetOutcome::Updated);
        }
        let id_hint = Entry { id: 0, key_hash: hash, size, expires_at, hint: options.hint };
        if self.policy.info.uses_admission && !self.admit(now, &id_hint) {
            self.stats.not_admitted += 1;
            return Ok(SetOutcome::NotAdmitted);
        }
        let need = self.need(1, size);
        self.make_room(now, need);
        let index = self.slab.insert(Slot::new(key, value, hash, expires_at, options.hint, self.clock));
        let Self { table, slab, .. } = self;
        table.insert_unique(table_hash(hash as u32), index, |&i| table_hash(slab.get(i).hash));
        let id = self.slab.id(index);
        if let Some(at) = expires_at {
            self.ttl.insert(at, id);
        }
        self.bytes += size;
        self.stats.inserts += 1;
        self.push_event(now, Event::Inserted(Entry { id, ..id_hint }));
        Ok(SetOutcome::Inserted)
    }

    /// The remaining lifetime of `key` in milliseconds: `None` if absent,
    /// `Some(None)` if it never expires. Not reported as an access.
    pub fn ttl(&self, now: u64, key: &[u8]) -> Option<Option<u64>> {
        let index = self.find(cachet_proto::key_hash(key), key).filter(|&i| !self.is_expired(i, now))?;
        Some(self.slab.get(index).expires_at().map(|at| at - now))
    }

    /// The entry of `key` (value, expiry, hint) if resident and live,
    /// without counting a read or telling the policy: for read-modify-write
    /// commands whose write is the access, and replicas comparing versions.
    pub fn peek_entry(&self, now: u64, key: &[u8]) -> Option<EntryView> {
        let index = self.find(cachet_proto::key_hash(key), key).filter(|&i| !self.is_expired(i, now))?;
        let slot = self.slab.get(index);
        Some(EntryView { value: Bytes::copy_from_slice(slot.value()), expires_at: slot.expires_at(), hint: slot.hint })
    }

    /// `key`'s live value without counting a read (a copy).
    pub fn peek(&self, now: u64, key: &[u8]) -> Option<Bytes> {
        let index = self.find(cachet_proto::key_hash(key), key).filter(|&i| !self.is_expired(i, now))?;
        Some(Bytes::copy_from_slice(self.slab.get(index).value()))
    }

    /// The length of `key`'s value if resident and live, without counting a
    /// read or copying it: what a multi-key read checks its reply size with
    /// before it copies any value.
    pub fn value_len(&self, now: u64, key: &[u8]) -> Option<usize> {
        let index = self.find(cachet_proto::key_hash(key), key).filter(|&i| !self.is_expired(i, now))?;
        Some(self.slab.get(index).value().len())
    }

    /// Removes `key`'s time to live; false if it is not resident or had
    /// none.
    pub fn persist(&mut self, now: u64, key: &[u8]) -> bool {
        let hash = cachet_proto::key_hash(key);
        let Some(index) = self.find(hash, key).filter(|&i| !self.is_expired(i, now)) else {
            return false;
        };
        let id = self.slab.id(index);
        let slot = self.slab.get_mut(index);
        let Some(at) = slot.expires_at() else {
            return false;
        };
        slot.set_expires_at(None);
        self.ttl.remove(at, id);
        let entry = self.entry(index, hash);
        self.push_event(now, Event::Updated(entry));
        true
    }

    /// Calls `f` with the key, value and hint of every live entry. A scan
    /// of the whole shard under its lock, for a cluster re-sync, not for
    /// the request path; the policy is not told (nothing was read).
    pub fn for_each(&self, now: u64, mut f: impl FnMut(&[u8], &[u8], u32)) {
        for (index, slot) in self.slab.live() {
            if !self.is_expired(index, now) {
                f(slot.key(), slot.value(), slot.hint);
            }
        }
    }

    /// Calls `f` with the key, value and hint of live entries from slab
    /// index `start` on, looking at no more than `max_visits` slots (free
    /// ones included, so the time under the lock is bounded whatever the
    /// shard holds), until `f` returns `false`. Returns the index to go on
    /// from, `None` once the end was reached.
    ///
    /// A walk of calls sees every entry that stays live through all of it
    /// exactly once: an entry keeps its slab index while it lives (updates
    /// are in place, and nothing compacts the slab). Entries inserted
    /// meanwhile may or may not be seen, as with Redis's `SCAN`.
    pub fn scan_from(&self, now: u64, start: u32, max_visits: usize, f: &mut ScanVisitor<'_>) -> Option<u32> {
        let slots = &self.slab.slots;
        let start = start as usize;
        let end = slots.len().min(start.saturating_add(max_visits.max(1)));
        for (index, slot) in slots.iter().enumerate().take(end).skip(start) {
            if slot.data.is_none() || slot.expires <= now {
                continue;
            }
            if !f(slot.key(), slot.value(), slot.hint) {
                return Some(index as u32 + 1);
            }
        }
        (end < slots.len()).then_some(end as u32)
    }

    /// Slab slots, free ones included: how far [`Shard::scan_from`] walks.
    pub fn slot_count(&self) -> usize {
        self.slab.slots.len()
    }

    /// Deletes every entry whose key starts with `prefix`; returns how
    /// many. A scan of the whole shard: for rare events such as a lost
    /// invalidation feed, not for the request path.
    pub fn delete_prefix(&mut self, now: u64, prefix: &[u8]) -> usize {
        let matching: Vec<u32> =
            self.slab.live().filter(|(_, slot)| slot.key().starts_with(prefix)).map(|(i, _)| i).collect();
        for &index in &matching {
            self.remove(now, index, RemovalCause::Deleted);
        }
        self.stats.deletes += matching.len() as u64;
        matching.len()
    }

    /// Deletes every entry (FLUSHALL), telling the policy each removal.
    /// Returns how many were resident.
    pub fn clear(&mut self, now: u64) -> usize {
        let live: Vec<u32> = self.slab.live().map(|(i, _)| i).collect();
        for &index in &live {
            self.remove(now, index, RemovalCause::Deleted);
        }
        self.stats.deletes += live.len() as u64;
        live.len()
    }

    /// Gives `key` a new time to live; false if it is not resident.
    pub fn expire(&mut self, now: u64, key: &[u8], ttl_ms: u64) -> bool {
        let hash = cachet_proto::key_hash(key);
        let Some(index) = self.find(hash, key).filter(|&i| !self.is_expired(i, now)) else {
            return false;
        };
        let id = self.slab.id(index);
        let slot = self.slab.get_mut(index);
        if let Some(at) = slot.expires_at() {
            self.ttl.remove(at, id);
        }
        let at = deadline(now, ttl_ms);
        slot.set_expires_at(Some(at));
        self.ttl.insert(at, id);
        let entry = self.entry(index, hash);
        self.push_event(now, Event::Updated(entry));
        true
    }

    /// Removes `key`; true if it was resident and live.
    pub fn delete(&mut self, now: u64, key: &[u8]) -> bool {
        let hash = cachet_proto::key_hash(key);
        let Some(index) = self.find(hash, key) else {
            return false;
        };
        if self.is_expired(index, now) {
            self.remove(now, index, RemovalCause::Expired);
            self.stats.expired += 1;
            return false;
        }
        self.remove(now, index, RemovalCause::Deleted);
        self.stats.deletes += 1;
        true
    }

    /// Periodic work driven by the caller's clock: removes up to
    /// `expire_per_tick` expired entries, runs the policy's own deadlines,
    /// and retries the configured policy when a retry is due. Returns the
    /// number of entries removed.
    pub fn tick(&mut self, now: u64) -> usize {
        let mut removed = 0;
        while removed < self.config.expire_per_tick {
            let Some(id) = self.ttl.pop_due(now) else {
                break;
            };
            if let Some(index) = self.slab.resolve(id) {
                // Already out of the TTL index; remove the rest.
                self.slab.get_mut(index).set_expires_at(None);
                self.remove(now, index, RemovalCause::Expired);
                self.stats.expired += 1;
                removed += 1;
            }
        }
        removed += self.run_policy_deadlines(now);
        if let PolicyMode::Fallback { retry_at: Some(at) } = self.policy.mode
            && now >= at
        {
            self.try_recover(now);
        }
        removed
    }

    /// Hands buffered events to the policy now.
    pub fn flush(&mut self, now: u64) {
        if self.events.is_empty() {
            return;
        }
        let result = timed(self.config.stopwatch, &mut self.stats.hooks, Hook::Events, || {
            self.policy.active.on_events(now, &self.events)
        });
        self.events.clear();
        if let Err(fault) = result {
            self.fault(now, fault);
        }
    }

    /// Resident entries in the active policy's eviction order (first to go
    /// first), for hand-off and inspection. A faulting policy is replaced by
    /// the fallback first.
    pub fn export_order(&mut self, now: u64) -> Vec<EntryId> {
        self.flush(now);
        let mut out = Vec::with_capacity(self.len());
        if let Err(fault) = timed(self.config.stopwatch, &mut self.stats.hooks, Hook::Export, || {
            self.policy.active.export_order(&mut out)
        }) {
            self.fault(now, fault);
            out.clear();
            // The fallback is native and cannot fault.
            let _ = self.policy.active.export_order(&mut out);
        }
        out
    }

    /// The order resident entries are handed to a new policy in: the active
    /// policy's export if it lists every resident exactly once, otherwise
    /// (a policy that lost or repeated ids) the shard's own recency order,
    /// so one policy's corruption is never handed to the next.
    fn handover_order(&mut self, now: u64) -> Vec<EntryId> {
        let order = self.export_order(now);
        let mut seen = hashbrown::HashSet::with_capacity(order.len());
        let exact =
            order.len() == self.len() && order.iter().all(|&id| self.slab.resolve(id).is_some() && seen.insert(id));
        if exact {
            return order;
        }
        tracing::warn!(exported = order.len(), resident = self.len(), "export-order does not match the residents");
        self.by_recency()
    }

    /// The key of a resident entry, for tools and tests.
    pub fn key_of(&self, id: EntryId) -> Option<&[u8]> {
        self.slab.resolve(id).map(|i| self.slab.get(i).key())
    }

    /// Resident entries, least recently read or written first.
    fn by_recency(&self) -> Vec<EntryId> {
        let now = self.clock as u32;
        let mut order: Vec<(u32, u32)> = self.slab.live().map(|(i, s)| (now.wrapping_sub(s.touched), i)).collect();
        order.sort_unstable_by(|a, b| b.cmp(a));
        order.into_iter().map(|(_, i)| self.slab.id(i)).collect()
    }

    fn find(&self, hash: u64, key: &[u8]) -> Option<u32> {
        let half = hash as u32;
        self.table
            .find(table_hash(half), |&i| {
                let slot = self.slab.get(i);
                slot.hash == half && slot.key() == key
            })
            .copied()
    }

    fn is_expired(&self, index: u32, now: u64) -> bool {
        self.slab.get(index).expires <= now
    }

    fn miss(&mut self, now: u64, hash: u64) {
        self.stats.misses += 1;
        self.push_event(now, Event::Missed(hash));
    }

    /// Buffers `event` for the active policy (accesses and misses only if
    /// it asked for them) and journals it for a policy being built.
    fn push_event(&mut self, now: u64, event: Event) {
        if let Some(journal) = &mut self.journal {
            journal.record(event);
        }
        let wanted = match event {
            Event::Accessed(_) => self.policy.info.wants_access_events,
            Event::Missed(_) => self.policy.info.wants_miss_events,
            _ => true,
        };
        if !wanted {
            return;
        }
        self.events.push(event);
        if self.events.len() >= self.config.batch_size {
            self.flush(now);
        }
    }

    /// Journals a removal the active policy already knows of (it chose the
    /// victim), which a policy being built must still hear about.
    fn journal_removal(&mut self, id: EntryId, cause: RemovalCause) {
        if let Some(journal) = &mut self.journal {
            journal.record(Event::Removed(id, cause));
        }
    }

    /// What the policy is told of a resident entry whose key hashes to
    /// `key_hash` (the slot keeps only half of it).
    fn entry(&self, index: u32, key_hash: u64) -> Entry {
        let slot = self.slab.get(index);
        Entry { id: self.slab.id(index), key_hash, size: slot.size(), expires_at: slot.expires_at(), hint: slot.hint }
    }

    /// [`Shard::entry`] with the hash computed from the stored key, where
    /// the caller has not hashed it already.
    fn entry_rehashed(&self, index: u32) -> Entry {
        self.entry(index, cachet_proto::key_hash(self.slab.get(index).key()))
    }

    fn update(&mut self, now: u64, index: u32, key_hash: u64, value: &[u8], expires_at: Option<u64>, hint: u32) {
        let id = self.slab.id(index);
        let clock = self.clock;
        let slot = self.slab.get_mut(index);
        if let Some(at) = slot.expires_at() {
            self.ttl.remove(at, id);
        }
        let old = slot.size();
        slot.set_value(value);
        slot.set_expires_at(expires_at);
        slot.hint = hint;
        slot.touched = clock as u32;
        let new = slot.size();
        if let Some(at) = expires_at {
            self.ttl.insert(at, id);
        }
        self.bytes = self.bytes - old + new;
        self.stats.updates += 1;
        let entry = self.entry(index, key_hash);
        self.push_event(now, Event::Updated(entry));
        if self.bytes > self.config.max_bytes {
            let need = self.need(0, 0);
            self.make_room(now, need);
        }
    }

    /// What must be freed so `entries` more entries of `bytes` more bytes fit.
    fn need(&self, entries: u64, bytes: u64) -> Need {
        let over_entries = (self.len() as u64 + entries).saturating_sub(self.config.max_entries);
        Need {
            entries: u32::try_from(over_entries).unwrap_or(u32::MAX),
            bytes: (self.bytes + bytes).saturating_sub(self.config.max_bytes),
        }
    }

    /// Evicts on the policy's advice until `need` is met. A policy that
    /// returns ids that are not resident is faulted for each; one that
    /// cannot free enough is replaced by the fallback, which always can.
    fn make_room(&mut self, now: u64, need: Need) {
        if need == Need::default() {
            return;
        }
        let (mut entries, mut bytes) = (0u32, 0u64);
        // The configured policy gets one call; the fallback (native LRU over
        // everything resident) finishes the job if it falls short.
        for _attempt in 0..2 {
            let rest = Need { entries: need.entries.saturating_sub(entries), bytes: need.bytes.saturating_sub(bytes) };
            let mut victims = std::mem::take(&mut self.victims);
            victims.clear();
            // Buffered events ride along with the pick: one call, not two.
            let result = timed(self.config.stopwatch, &mut self.stats.hooks, Hook::PickVictims, || {
                self.policy.active.pick_victims(now, &self.events, rest, &mut victims)
            });
            self.events.clear();
            let mut invalid = 0u64;
            for &id in &victims {
                match self.slab.resolve(id) {
                    Some(index) => {
                        bytes += self.slab.get(index).size();
                        entries = entries.saturating_add(1);
                        self.unlink(index);
                        self.journal_removal(id, RemovalCause::Dropped);
                        self.stats.evictions += 1;
                    }
                    None => invalid += 1,
                }
            }
            self.victims = victims;
            if let Err(fault) = result {
                self.fault(now, fault);
            } else if invalid > 0 {
                self.stats.faults[FaultKind::InvalidVictim.index()] += invalid;
                tracing::warn!(policy = %self.policy.info.name, invalid, "policy returned ids that are not resident");
            }
            if need.is_met(entries, bytes) || self.is_empty() {
                return;
            }
            if matches!(self.policy.mode, PolicyMode::Configured) {
                self.fault(
                    now,
                    PolicyFault {
                        kind: FaultKind::InsufficientVictims,
                        detail: format!("freed {entries} entries / {bytes} bytes of {need:?}"),
                    },
                );
            }
        }
    }

    fn admit(&mut self, now: u64, candidate: &Entry) -> bool {
        self.flush(now);
        match timed(self.config.stopwatch, &mut self.stats.hooks, Hook::Admit, || {
            self.policy.active.admit(now, candidate)
        }) {
            Ok(admit) => admit,
            Err(fault) => {
                self.fault(now, fault);
                true
            }
        }
    }

    /// Removes a resident entry for a reason other than eviction and tells
    /// the policy.
    fn remove(&mut self, now: u64, index: u32, cause: RemovalCause) {
        let id = self.slab.id(index);
        self.unlink(index);
        self.push_event(now, Event::Removed(id, cause));
    }

    /// Drops an entry from every index; the policy is not told.
    fn unlink(&mut self, index: u32) {
        let id = self.slab.id(index);
        let hash = table_hash(self.slab.get(index).hash);
        if let Ok(found) = self.table.find_entry(hash, |&i| i == index) {
            found.remove();
        }
        if let Some(slot) = self.slab.remove(index) {
            if let Some(at) = slot.expires_at() {
                self.ttl.remove(at, id);
            }
            self.bytes -= slot.size();
        }
    }

    fn run_policy_deadlines(&mut self, now: u64) -> usize {
        self.flush(now);
        match timed(self.config.stopwatch, &mut self.stats.hooks, Hook::Deadlines, || {
            self.policy.active.next_deadline()
        }) {
            Ok(Some(at)) if at <= now => {}
            Ok(_) => return 0,
            Err(fault) => {
                self.fault(now, fault);
                return 0;
            }
        }
        let mut due = Vec::new();
        if let Err(fault) = timed(self.config.stopwatch, &mut self.stats.hooks, Hook::Deadlines, || {
            self.policy.active.expired(now, &mut due)
        }) {
            self.fault(now, fault);
            return 0;
        }
        let mut removed = 0;
        for id in due {
            match self.slab.resolve(id) {
                Some(index) => {
                    self.unlink(index);
                    self.journal_removal(id, RemovalCause::Expired);
                    self.stats.policy_expired += 1;
                    removed += 1;
                }
                None => self.stats.faults[FaultKind::InvalidVictim.index()] += 1,
            }
        }
        removed
    }

    /// Counts `fault` and switches to the native fallback, rebuilt from the
    /// shard's own records in recency order. Pending events are dropped: the
    /// rebuild already reflects them.
    fn fault(&mut self, now: u64, fault: PolicyFault) {
        self.stats.faults[fault.kind.index()] += 1;
        if matches!(self.policy.mode, PolicyMode::Configured) {
            self.policy.configured_faults += 1;
        }
        self.events.clear();
        tracing::warn!(policy = %self.policy.info.name, %fault, "policy fault");
        if matches!(self.policy.mode, PolicyMode::Fallback { .. }) {
            // The fallback is native: a fault here is an invalid id at most.
            return;
        }
        self.schedule_retry(now);
        let factory = NativeFactory::<Lru>::new(Config::default());
        let ids = self.by_recency();
        let fallback = factory
            .create(capacity(&self.config), self.config.seed)
            .ok()
            .and_then(|mut p| self.replay(now, p.as_mut(), &ids).is_ok().then_some(p));
        match fallback {
            Some(fallback) => {
                self.policy.active = fallback;
                self.policy.info = factory.info().clone();
                self.stats.fallbacks += 1;
            }
            None => tracing::error!("native fallback failed to start; keeping the faulted policy"),
        }
    }

    /// Counts one more fault in a row (a quiet `fault_window_ms` resets the
    /// count) and schedules the next retry of the configured policy with
    /// exponential back-off, or gives up after `max_faults_in_a_row`.
    fn schedule_retry(&mut self, now: u64) {
        let served_well = matches!(self.policy.mode, PolicyMode::Configured)
            && now.saturating_sub(self.policy.healthy_since) > self.config.fault_window_ms;
        if served_well {
            self.policy.faults_in_a_row = 0;
        }
        self.policy.last_fault_at = Some(now);
        self.policy.faults_in_a_row += 1;
        let faults = self.policy.faults_in_a_row;
        let retry_at = (faults < self.config.max_faults_in_a_row).then(|| {
            let backoff = self.config.retry_after_ms.saturating_mul(1 << (faults - 1).min(16));
            now.saturating_add(backoff)
        });
        if retry_at.is_none() {
            tracing::error!(
                policy = %self.policy.configured.info().name,
                faults,
                "policy faulted too often; staying on the native fallback"
            );
        }
        self.policy.mode = PolicyMode::Fallback { retry_at };
    }

    /// Puts a fresh instance of the configured policy back, fed the resident
    /// entries in the fallback's order. A failure counts as another fault.
    fn try_recover(&mut self, now: u64) {
        let order = self.export_order(now);
        let result = self
            .policy
            .configured
            .create(capacity(&self.config), self.config.seed)
            .map_err(|err| PolicyFault { kind: FaultKind::Trap, detail: err.to_string() })
            .and_then(|mut fresh| self.replay(now, fresh.as_mut(), &order).map(|()| fresh));
        match result {
            Ok(fresh) => {
                tracing::info!(policy = %self.policy.configured.info().name, "configured policy restored");
                self.policy.active = fresh;
                self.policy.info = self.policy.configured.info().clone();
                self.policy.mode = PolicyMode::Configured;
                self.policy.healthy_since = now;
                self.stats.recoveries += 1;
            }
            Err(fault) => {
                self.stats.faults[fault.kind.index()] += 1;
                self.policy.configured_faults += 1;
                tracing::warn!(%fault, "policy rebuild failed");
                self.schedule_retry(now);
            }
        }
    }

    /// Feeds resident entries `ids` to `policy` as inserts, in batches of
    /// [`REPLAY_BATCH`]: a swap of a million entries is a thousand calls,
    /// not sixteen thousand, and each stays well inside its budget.
    fn replay(&self, now: u64, policy: &mut dyn EvictionPolicy, ids: &[EntryId]) -> Result<(), PolicyFault> {
        let mut batch = Vec::with_capacity(REPLAY_BATCH.min(ids.len()));
        for chunk in ids.chunks(REPLAY_BATCH) {
            batch.clear();
            batch.extend(
                chunk.iter().filter_map(|&id| self.slab.resolve(id)).map(|i| Event::Inserted(self.entry_rehashed(i))),
            );
            policy.on_events(now, &batch)?;
        }
        Ok(())
    }
}

/// Entries per call when a policy is rebuilt from the resident set.
pub const REPLAY_BATCH: usize = 1024;

/// Feeds `entries` to `policy` as inserts, [`REPLAY_BATCH`] per call: how a
/// policy being swapped in learns a snapshot's residents.
pub fn replay_snapshot(now: u64, policy: &mut dyn EvictionPolicy, entries: &[Entry]) -> Result<(), PolicyFault> {
    let mut batch = Vec::with_capacity(REPLAY_BATCH.min(entries.len()));
    for chunk in entries.chunks(REPLAY_BATCH) {
        batch.clear();
        batch.extend(chunk.iter().map(|&e| Event::Inserted(e)));
        policy.on_events(now, &batch)?;
    }
    Ok(())
}

fn capacity(config: &ShardConfig) -> Capacity {
    Capacity { max_entries: config.max_entries, max_bytes: config.max_bytes }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::VecDeque;

    fn lru_shard(config: ShardConfig) -> Shard {
        let factory: Arc<dyn PolicyFactory> = Arc::new(NativeFactory::<Lru>::new(Config::default()));
        Shard::new(config, factory).expect("native lru starts")
    }

    fn set(shard: &mut Shard, now: u64, key: &str, value: &str, ttl_ms: Option<u64>) -> SetOutcome {
        let options = SetOptions { ttl_ms, ..SetOptions::default() };
        shard.set(now, key.as_bytes(), Bytes::copy_from_slice(value.as_bytes()), options).expect("set")
    }

    /// The core reads no clock: policy calls are timed with the stopwatch
    /// the host injects, and not at all without one.
    #[test]
    fn policy_calls_are_timed_only_with_an_injected_stopwatch() {
        thread_local! {
            static TICKS: std::cell::Cell<u64> = const { std::cell::Cell::new(0) };
        }
        /// Advances 100 ns per reading, so every call takes exactly 100.
        fn ticking() -> u64 {
            TICKS.with(|t| {
                t.set(t.get() + 100);
                t.get()
            })
        }
        for stopwatch in [None, Some(ticking as fn() -> u64)] {
            let mut shard = lru_shard(ShardConfig { stopwatch, ..ShardConfig::default() });
            set(&mut shard, 0, "a", "1", None);
            assert!(shard.get(1, b"a").is_some());
            shard.export_order(2);
            let hooks = &shard.stats().hooks;
            let (events, export) = (&hooks[Hook::Events.index()], &hooks[Hook::Export.index()]);
            if stopwatch.is_some() {
                assert_eq!((events.count(), events.sum_ns()), (1, 100), "one batch of events, timed");
                assert_eq!((export.count(), export.sum_ns()), (1, 100), "one export, timed");
            } else {
                assert!(hooks.iter().all(|h| h.count() == 0), "nothing timed without a stopwatch");
            }
        }
    }

    #[test]
    fn an_entry_is_one_40_byte_slot_and_one_allocation_whatever_its_updates() {
        assert_eq!(size_of::<Slot>(), 40, "the slot's size is memory per key");
        let mut shard = lru_shard(ShardConfig::default());
        set(&mut shard, 0, "key", "abc", None);
        let first = shard.slab.get(0).bytes().as_ptr();
        // The same length is written in place; another length moves it.
        set(&mut shard, 1, "key", "xyz", None);
        assert_eq!(shard.slab.get(0).bytes().as_ptr(), first, "same-size update reuses the allocation");
        assert_eq!(shard.get(2, b"key").as_deref(), Some(&b"xyz"[..]));
        set(&mut shard, 3, "key", "a longer value", None);
        assert_eq!(shard.get(4, b"key").as_deref(), Some(&b"a longer value"[..]));
        set(&mut shard, 5, "key", "", None);
        assert_eq!(shard.get(6, b"key").as_deref(), Some(&b""[..]));
        assert_eq!((shard.len(), shard.bytes()), (1, 3));
        let mut seen = Vec::new();
        shard.for_each(7, |k, v, _| seen.push((k.to_vec(), v.to_vec())));
        assert_eq!(seen, vec![(b"key".to_vec(), Vec::new())]);
        // A time to live that saturates the clock still expires (it is not
        // mistaken for "no expiry") and can be persisted away.
        set(&mut shard, 8, "far", "v", Some(u64::MAX));
        assert_eq!(shard.ttl(8, b"far"), Some(Some(u64::MAX - 1 - 8)));
        assert!(shard.persist(9, b"far"));
        assert_eq!(shard.ttl(9, b"far"), Some(None));
    }

    #[test]
    fn packed_keys_of_every_length_class_split_back() {
        for len in [0usize, 1, 127, 128, 300, 16_383, 16_384, 70_000] {
            let key: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
            let data = pack(&key, b"value");
            let (start, end) = key_span(&data);
            assert_eq!((&data[start..end], &data[end..]), (&key[..], &b"value"[..]), "key of {len}");
            assert_eq!(data.len(), start + len + 5, "no spare byte for the boxing to trim");
            assert_eq!(
                start,
                if len < 128 {
                    1
                } else if len < 16_384 {
                    2
                } else {
                    3
                }
            );
        }
    }

    #[test]
    fn a_freed_slot_keeps_its_generation_for_the_next_entry() {
        let mut shard = lru_shard(ShardConfig::default());
        set(&mut shard, 0, "a", "1", None);
        let old = shard.slab.id(0);
        assert!(shard.delete(1, b"a"));
        set(&mut shard, 2, "b", "2", None);
        let new = shard.slab.id(0);
        assert_eq!(new & u64::from(u32::MAX), old & u64::from(u32::MAX), "the slot is reused");
        assert_ne!(new, old);
        assert_eq!(shard.slab.resolve(old), None);
        assert_eq!(shard.key_of(new), Some(&b"b"[..]));
    }

    #[test]
    fn recency_order_survives_the_stamp_wrapping() {
        let mut shard = lru_shard(ShardConfig::default());
        shard.clock = u64::from(u32::MAX) - 1;
        for key in ["a", "b", "c"] {
            set(&mut shard, 0, key, "v", None);
        }
        // a's stamp is u32::MAX, b's and c's wrapped to 0 and 1: a is still
        // the oldest.
        let keys: Vec<&[u8]> = shard.by_recency().into_iter().filter_map(|id| shard.key_of(id)).collect();
        assert_eq!(keys, vec![&b"a"[..], b"b", b"c"]);
        assert!(shard.get(0, b"a").is_some());
        let keys: Vec<&[u8]> = shard.by_recency().into_iter().filter_map(|id| shard.key_of(id)).collect();
        assert_eq!(keys, vec![&b"b"[..], b"c", b"a"]);
    }

    #[test]
    fn oversized_writes_are_refused_and_change_nothing() {
        let config = ShardConfig { max_bytes: 100, max_key_size: 8, max_value_size: 50, ..ShardConfig::default() };
        let mut shard = lru_shard(config);
        set(&mut shard, 0, "a", "1", None);
        let too_long_key = shard.set(0, b"123456789", Bytes::new(), SetOptions::default());
        assert_eq!(too_long_key, Err(ShardError::KeyTooLarge { size: 9, limit: 8 }));
        let too_long_value = shard.set(0, b"a", Bytes::from(vec![0; 51]), SetOptions::default());
        assert_eq!(too_long_value, Err(ShardError::ValueTooLarge { size: 51, limit: 50 }));
        assert_eq!(shard.get(0, b"a").as_deref(), Some(&b"1"[..]), "the old value survives");
        assert_eq!((shard.len(), shard.bytes()), (1, 2));
        let mut tiny = lru_shard(ShardConfig { max_bytes: 10, ..ShardConfig::default() });
        let err = tiny.set(0, b"k", Bytes::from(vec![0; 10]), SetOptions::default());
        assert_eq!(err, Err(ShardError::EntryTooLarge { size: 11, limit: 10 }));
    }

    #[test]
    fn ttl_expires_lazily_on_read_and_actively_on_tick() {
        let mut shard = lru_shard(ShardConfig::default());
        set(&mut shard, 0, "short", "x", Some(10));
        set(&mut shard, 0, "long", "y", Some(1_000));
        set(&mut shard, 0, "forever", "z", None);
        assert!(shard.get(9, b"short").is_some());
        assert!(shard.get(10, b"short").is_none(), "expired exactly at its deadline");
        assert_eq!(shard.stats().expired, 1);
        assert_eq!(shard.tick(999), 0);
        assert_eq!(shard.tick(1_000), 1, "active expiry removes `long` without a read");
        assert_eq!((shard.len(), shard.stats().expired), (1, 2));
        assert_eq!(shard.bytes(), "foreverz".len() as u64);
        // A rewrite replaces the deadline.
        set(&mut shard, 1_000, "forever", "z", Some(5));
        set(&mut shard, 1_001, "forever", "z", None);
        assert_eq!(shard.tick(2_000), 0);
        assert!(shard.contains(2_000, b"forever"));
    }

    #[test]
    fn writing_an_expired_unreaped_key_is_a_new_insert() {
        let mut shard = lru_shard(ShardConfig::default());
        set(&mut shard, 0, "k", "old", Some(10));
        assert_eq!(set(&mut shard, 20, "k", "new", None), SetOutcome::Inserted);
        assert_eq!(shard.stats().expired, 1);
        assert_eq!((shard.len(), shard.stats().inserts, shard.stats().updates), (1, 2, 0));
        assert_eq!(shard.get(20, b"k").as_deref(), Some(&b"new"[..]));
    }

    #[test]
    fn active_expiry_is_bounded_per_tick() {
        let mut shard = lru_shard(ShardConfig { expire_per_tick: 10, ..ShardConfig::default() });
        for i in 0..25 {
            set(&mut shard, 0, &format!("k{i}"), "v", Some(1));
        }
        assert_eq!(shard.tick(5), 10);
        assert_eq!(shard.tick(5), 10);
        assert_eq!(shard.tick(5), 5);
        assert!(shard.is_empty());
        assert_eq!(shard.bytes(), 0);
    }

    #[test]
    fn updates_keep_byte_accounting_and_evict_when_growing() {
        let mut shard = lru_shard(ShardConfig { max_bytes: 20, ..ShardConfig::default() });
        set(&mut shard, 0, "a", "123", None);
        set(&mut shard, 0, "b", "123", None);
        assert_eq!(shard.bytes(), 8);
        assert_eq!(set(&mut shard, 0, "b", "12345678901234567", None), SetOutcome::Updated);
        assert!(shard.bytes() <= 20);
        assert!(!shard.contains(0, b"a"), "growing b evicted a");
        assert_eq!(shard.bytes(), 18);
        assert!(shard.delete(0, b"b"));
        assert!(!shard.delete(0, b"b"));
        assert_eq!((shard.len(), shard.bytes()), (0, 0));
    }

    /// Mixed traffic for the swap tests: reads, writes, deletes, evictions.
    fn churn(shard: &mut Shard, now: u64, from: u32, to: u32) {
        for i in from..to {
            let key = format!("k{}", i % 97);
            match i % 5 {
                0 => {
                    shard.delete(now, key.as_bytes());
                }
                1 | 2 => {
                    shard.get(now, key.as_bytes());
                }
                _ => {
                    shard.set(now, key.as_bytes(), Bytes::from(format!("v{i}")), SetOptions::default()).expect("set");
                }
            }
        }
    }

    fn keys_in_order(shard: &mut Shard, now: u64) -> Vec<Vec<u8>> {
        shard.export_order(now).into_iter().map(|id| shard.key_of(id).expect("resident").to_vec()).collect()
    }

    #[test]
    fn a_swap_built_off_the_lock_catches_up_on_the_journal() {
        let config = ShardConfig { max_entries: 40, ..ShardConfig::default() };
        let (mut swapped, mut reference) = (lru_shard(config.clone()), lru_shard(config));
        for shard in [&mut swapped, &mut reference] {
            churn(shard, 0, 0, 500);
        }
        let factory: Arc<dyn PolicyFactory> = Arc::new(NativeFactory::<Lru>::new(Config::default()));
        let snapshot = swapped.begin_swap(0, factory.info());
        // Traffic while the new instance is being built elsewhere: accesses,
        // inserts, deletes and evictions the new policy has not seen.
        for shard in [&mut swapped, &mut reference] {
            churn(shard, 1, 500, 900);
        }
        let (capacity, seed) = swapped.policy_capacity();
        let mut fresh = factory.create(capacity, seed).expect("create");
        replay_snapshot(1, fresh.as_mut(), &snapshot.entries).expect("replay");
        let handed = swapped.finish_swap(1, factory, fresh).expect("finish");
        assert_eq!(handed, swapped.len());
        assert_eq!(swapped.stats().swaps, 1);
        // An LRU rebuilt from snapshot plus journal orders keys exactly as
        // the LRU that never stopped.
        assert_eq!(keys_in_order(&mut swapped, 1), keys_in_order(&mut reference, 1));
        for shard in [&mut swapped, &mut reference] {
            churn(shard, 2, 900, 1400);
        }
        assert_eq!(keys_in_order(&mut swapped, 2), keys_in_order(&mut reference, 2));
    }

    #[test]
    fn an_aborted_swap_changes_nothing() {
        let mut shard = lru_shard(ShardConfig { max_entries: 40, ..ShardConfig::default() });
        churn(&mut shard, 0, 0, 300);
        let before = keys_in_order(&mut shard, 0);
        let info = shard.active_policy().clone();
        let _snapshot = shard.begin_swap(0, &info);
        shard.abort_swap();
        assert_eq!(keys_in_order(&mut shard, 0), before);
        assert_eq!(shard.stats().swaps, 0);
    }

    #[test]
    fn stale_ids_never_resolve() {
        let mut shard = lru_shard(ShardConfig::default());
        set(&mut shard, 0, "a", "1", None);
        let old = shard.export_order(0)[0];
        shard.delete(0, b"a");
        set(&mut shard, 0, "b", "2", None);
        let new = shard.export_order(0)[0];
        assert_eq!(old & 0xffff_ffff, new & 0xffff_ffff, "the slot is reused");
        assert_ne!(old, new);
        assert_eq!(shard.key_of(old), None);
        assert_eq!(shard.key_of(new), Some(&b"b"[..]));
    }

    #[derive(Clone, Debug)]
    enum Op {
        Get(u8),
        Set(u8, u8),
        Del(u8),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            (0u8..24).prop_map(Op::Get),
            (0u8..24, 0u8..40).prop_map(|(k, len)| Op::Set(k, len)),
            (0u8..24).prop_map(Op::Del),
        ]
    }

    /// A tiny reference LRU: most recent at the back.
    #[derive(Default)]
    struct Model {
        order: VecDeque<(u8, usize)>,
    }

    impl Model {
        fn position(&self, key: u8) -> Option<usize> {
            self.order.iter().position(|&(k, _)| k == key)
        }

        fn bytes(&self) -> u64 {
            self.order.iter().map(|&(_, len)| 1 + len as u64).sum()
        }
    }

    proptest! {
        /// With the native LRU, the shard is exactly a byte- and
        /// entry-bounded LRU cache: same residents, same bytes, same hits.
        #[test]
        fn shard_with_lru_matches_a_reference_lru(ops in proptest::collection::vec(op(), 1..300)) {
            let config = ShardConfig { max_entries: 8, max_bytes: 120, batch_size: 5, ..ShardConfig::default() };
            let mut shard = lru_shard(config);
            let mut model = Model::default();
            for op in ops {
                match op {
                    Op::Get(k) => {
                        let hit = shard.get(0, &[k]).is_some();
                        let pos = model.position(k);
                        prop_assert_eq!(hit, pos.is_some());
                        if let Some(p) = pos {
                            let e = model.order.remove(p).expect("present");
                            model.order.push_back(e);
                        }
                    }
                    Op::Set(k, len) => {
                        shard.set(0, &[k], Bytes::from(vec![k; len as usize]), SetOptions::default()).expect("fits");
                        if let Some(p) = model.position(k) {
                            model.order.remove(p);
                        }
                        model.order.push_back((k, len as usize));
                        while model.order.len() > 8 || model.bytes() > 120 {
                            model.order.pop_front();
                        }
                    }
                    Op::Del(k) => {
                        let was = shard.delete(0, &[k]);
                        let pos = model.position(k);
                        prop_assert_eq!(was, pos.is_some());
                        if let Some(p) = pos {
                            model.order.remove(p);
                        }
                    }
                }
                prop_assert_eq!(shard.len(), model.order.len());
                prop_assert_eq!(shard.bytes(), model.bytes());
            }
            let order: Vec<u8> = shard.export_order(0).iter().map(|&id| shard.key_of(id).expect("live")[0]).collect();
            let want: Vec<u8> = model.order.iter().map(|&(k, _)| k).collect();
            prop_assert_eq!(order, want);
            prop_assert_eq!(shard.stats().policy_faults(), 0);
        }
    }
}
