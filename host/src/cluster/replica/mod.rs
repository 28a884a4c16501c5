//! One node's replica of its key ranges, and the coordinator of the client
//! requests it receives. Sans-IO: inputs are [`Replica::client`],
//! [`Replica::handle`], [`Replica::set_alive`] and [`Replica::tick`], each
//! with `now`; outputs are drained with [`Replica::poll_transmit`],
//! [`Replica::poll_reply`] and [`Replica::poll_timeout`].
//!
//! - **Writes** at QUORUM or ALL take two round trips, as in ABD
//!   (Attiya, Bar-Noy, Dolev): first the highest version a read quorum
//!   holds, then the write with a version above it, to the owners. A write
//!   that starts after another one was acknowledged therefore gets a higher
//!   version and wins everywhere, whatever the coordinators' clocks. ONE
//!   writes skip the first round (faster, and ordered only by the Lamport
//!   clock).
//! - **Reads** ask the owners, answer with the highest version among the
//!   first `required` counted replies (and any others already in), then
//!   repair every owner that answered with an older version.
//! - **Hinted hand-off**: a write for an owner the failure detector calls
//!   down goes to the next live node on the ring as a hint, which it
//!   forwards once the owner is back. Hints never count toward a quorum:
//!   reads ask owners only, so a counted copy must live on an owner.
//! - **Re-sync**: a replica restarted empty ([`Replica::restart`]) asks every
//!   other node for the records it owns and counts toward no quorum (its
//!   acknowledgements and replies say `counted: false`) until all of them
//!   have answered. Otherwise a quorum could include a node that lost an
//!   acknowledged write and a node that never had it.
//! - **Ring changes**: the ring is the slot table of the cluster's
//!   metadata log, so every member goes through the same tables in the same
//!   order, and owners do not change when one goes down (a dead owner does
//!   not answer; its writes wait as hints). When the log moves slots
//!   ([`Replica::set_ring`]), a node that gains some re-syncs them from the
//!   other owners and counts toward no quorum *for the keys it gained*
//!   until it has; for the keys it already owned, whose copies are
//!   complete, it keeps counting.
//! - **Epoch fencing**: every message carries its sender's table epoch. A
//!   replica on a newer table answers a request from an older one as not
//!   counting (a coordinator on a table that moved on cannot complete a
//!   quorum with it), and answers a re-sync request only from a member on
//!   its own table, so what it sends holds every write it acknowledged as
//!   counting under the table before.

use super::update::{self, Effect, Update};
use super::version::{self, LamportClock, Version, VersionTooFarAhead};
use bytes::Bytes;
use cachet_proto::Ring;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::Arc;

/// A node's index in the membership (its ring member id is this number).
pub type NodeIx = u32;

/// The highest node id: ids index per-member tables, so a peer announcing
/// a huge one must not make every member allocate for it.
pub const MAX_NODE_ID: NodeIx = 1_023;

/// How many owners must take part in a request.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Consistency {
    /// One owner.
    One,
    /// A majority of the owners.
    Quorum,
    /// Every owner.
    All,
}

impl Consistency {
    /// Owners that must answer, out of `owners`.
    pub fn required(self, owners: usize) -> usize {
        match self {
            Self::One => 1.min(owners),
            Self::Quorum => owners / 2 + 1,
            Self::All => owners,
        }
    }
}

/// A key's value at one version; `None` is a deletion (a tombstone, kept so
/// an older value cannot come back through repair).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    /// Its version.
    pub version: Version,
    /// The value, or `None` for a deletion.
    pub value: Option<Bytes>,
    /// When the value expires, in milliseconds since the Unix epoch (wall
    /// clock: every replica must agree on it, so it is fixed by the
    /// coordinator when the write is made). An expired value reads as a
    /// deletion at the same version.
    #[serde(default)]
    pub expires_at: Option<u64>,
    /// The application's cost or priority hint for the eviction policy,
    /// stored with every copy (0: none).
    #[serde(default)]
    pub hint: u32,
}

/// Where a replica keeps its records. The simulator uses a map; a node
/// keeps them in its bounded shards ([`super::records::ShardRecords`]), so
/// the cluster obeys the node's memory and entry bounds and its eviction
/// policy like any other data.
pub trait RecordStore: Send {
    /// The record of `key`; `touch` counts it as a read for the eviction
    /// policy (a client's read, not a version check).
    fn get(&self, key: &[u8], touch: bool) -> Option<Record>;
    /// Stores `record` under `key`, replacing what was there; `false` when
    /// the store refused it (too large, or not admitted by the policy). A
    /// store may also evict it later: a cache holds what fits. `wall_ms`
    /// is the wall clock now (Unix milliseconds), which the record's expiry
    /// is measured against: the replica passes it in, so no store reads a
    /// clock.
    fn put(&mut self, wall_ms: u64, key: &Bytes, record: &Record) -> bool;
    /// Records held.
    fn len(&self) -> usize;
    /// Whether none are held.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Drops every record (a restart).
    fn clear(&mut self);
    /// Calls `f` with every record.
    fn scan(&self, f: &mut dyn FnMut(&Bytes, &Record));
    /// One part of a walk over the records, for a stream: calls `f` with
    /// the records whose keys are `wanted` (the others are not decoded),
    /// from `cursor` on (empty: the start), until `f` returns
    /// `false` or about `max_visits` entries were looked at, and returns the
    /// cursor to go on from (`None`: the walk is over). Cursors are opaque
    /// to all but the store that made them. A walk sees every record held
    /// all through it; records written meanwhile may be missed (a stream's
    /// receiver gets those as an owner, directly).
    fn scan_part(
        &self,
        cursor: &[u8],
        max_visits: usize,
        wanted: &dyn Fn(&[u8]) -> bool,
        f: &mut dyn FnMut(&Bytes, &Record) -> bool,
    ) -> Option<Bytes>;
}

impl RecordStore for BTreeMap<Bytes, Record> {
    fn get(&self, key: &[u8], _touch: bool) -> Option<Record> {
        Self::get(self, key).cloned()
    }

    fn put(&mut self, _wall_ms: u64, key: &Bytes, record: &Record) -> bool {
        self.insert(key.clone(), record.clone());
        true
    }

    fn len(&self) -> usize {
        Self::len(self)
    }

    fn clear(&mut self) {
        Self::clear(self);
    }

    fn scan(&self, f: &mut dyn FnMut(&Bytes, &Record)) {
        for (key, record) in self {
            f(key, record);
        }
    }

    /// The cursor is the last key seen, after a marker byte (so the empty
    /// key is a key, not the start).
    fn scan_part(
        &self,
        cursor: &[u8],
        max_visits: usize,
        wanted: &dyn Fn(&[u8]) -> bool,
        f: &mut dyn FnMut(&Bytes, &Record) -> bool,
    ) -> Option<Bytes> {
        use std::ops::Bound;
        let from = match cursor.split_first() {
            None => Bound::Unbounded,
            Some((_, last)) => Bound::Excluded(Bytes::copy_from_slice(last)),
        };
        for (visited, (key, record)) in self.range((from, Bound::Unbounded)).enumerate() {
            let go_on = !wanted(key) || f(key, record);
            if !go_on || visited + 1 >= max_visits.max(1) {
                let mut next = Vec::with_capacity(key.len() + 1);
                next.push(1);
                next.extend_from_slice(key);
                return Some(Bytes::from(next));
            }
        }
        None
    }
}

/// What replicas say to each other.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Message {
    /// Store `record` under `key` if newer (or keep it as a hint for
    /// `hint_for`). `req` 0 wants no acknowledgement.
    Put {
        /// Request id at the sender.
        req: u64,
        /// The key.
        key: Bytes,
        /// The record.
        record: Record,
        /// Set when the receiver holds it for a down owner.
        hint_for: Option<NodeIx>,
    },
    /// A `Put` was applied.
    PutAck {
        /// The `Put`'s request id.
        req: u64,
        /// Whether the sender counts toward quorums (is not re-syncing).
        counted: bool,
    },
    /// Send your record of `key`.
    Get {
        /// Request id at the sender.
        req: u64,
        /// The key.
        key: Bytes,
    },
    /// The answer to a `Get`.
    GetReply {
        /// The `Get`'s request id.
        req: u64,
        /// The record, if any.
        record: Option<Record>,
        /// Whether the sender counts toward quorums.
        counted: bool,
    },
    /// Send the highest version you hold of any of `keys`, and whether
    /// your copies count (a batch write's first round, see `batch`).
    Versions {
        /// Request id at the sender.
        req: u64,
        /// The keys.
        keys: Vec<Bytes>,
    },
    /// The answer to `Versions`.
    VersionsReply {
        /// The `Versions`' request id.
        req: u64,
        /// The highest version held of any of the keys.
        highest: Version,
        /// Whether the sender's copies of all of them count.
        counted: bool,
    },
    /// Store every record of the batch (all or, if the receiver holds
    /// newer ones, those it has not); acknowledged with `PutAck`.
    PutBatch {
        /// Request id at the sender.
        req: u64,
        /// The keys and their records, one version for all.
        entries: Vec<(Bytes, Record)>,
    },
    /// Send the sizes of your values of `keys` (a size probe, see
    /// `sizes`).
    Sizes {
        /// Request id at the sender.
        req: u64,
        /// The keys.
        keys: Vec<Bytes>,
    },
    /// The answer to `Sizes`: each key's value length here (0: none), in
    /// the order asked.
    SizesReply {
        /// The `Sizes`' request id.
        req: u64,
        /// The lengths.
        sizes: Vec<u64>,
    },
    /// A re-syncing replica asks for the next part of the records it owns
    /// on its table, from where the last part ended (answered only by a
    /// member on the same table: see the module docs).
    SyncRequest {
        /// The requester's re-sync round, echoed back.
        round: u64,
        /// Where the part starts in the sender's walk of its store (empty:
        /// the start), as the previous part's `next` said.
        #[serde(default)]
        cursor: Bytes,
    },
    /// One part of the stream of records the requester owns.
    SyncData {
        /// The request's round.
        round: u64,
        /// The request's cursor, echoed back: a part is taken only where
        /// the requester is.
        #[serde(default)]
        cursor: Bytes,
        /// Where the next part starts; `None`: this was the last.
        next: Option<Bytes>,
        /// The records.
        entries: Vec<(Bytes, Record)>,
    },
    /// A read-modify-write for the key's primary owner to run (one at a
    /// time per key there), from the member a client asked.
    Update {
        /// The sender's request id.
        req: u64,
        /// The key.
        key: Bytes,
        /// What to do.
        update: Update,
        /// The client's consistency, for the update's read and write.
        level: Consistency,
    },
    /// FLUSHALL: drop every record (and hint) held.
    Flush {
        /// The coordinator's request id.
        req: u64,
    },
    /// A member dropped what it held for [`Message::Flush`].
    FlushAck {
        /// The `Flush`'s request id.
        req: u64,
        /// Records it dropped.
        dropped: u64,
    },
    /// The primary's answer to an [`Message::Update`].
    UpdateReply {
        /// The `Update`'s request id.
        req: u64,
        /// What the client is answered.
        result: Result<Effect, OpError>,
    },
}

/// A record's value and expiry, as an update sees them.
fn entry(record: Option<Record>) -> Option<update::Entry> {
    record.map(|r| update::Entry { value: r.value, expires_at: r.expires_at, hint: r.hint })
}

/// Client request ids with this bit set are the replica's own: the read
/// and the write of an update it runs as a key's primary owner.
const INTERNAL: u64 = 1 << 63;

/// Updates queued at a primary over all keys; beyond it one is refused as
/// unavailable rather than queued without bound.
pub const MAX_QUEUED_UPDATES: usize = 65_536;

/// Forwarded updates remembered for spotting a duplicate delivery.
const MAX_SEEN_UPDATES: usize = 262_144;

/// Who an update is answered to.
#[derive(Clone, Copy, Debug)]
enum Origin {
    /// A client of this node, by its request id.
    Client(u64),
    /// The member that forwarded it, by that member's request id.
    Peer { from: NodeIx, req: u64 },
    /// A background refresh of a value served stale: nobody waits on it.
    Refresh,
}

/// An update waiting at its key's primary; the queue's head is running.
struct Queued {
    origin: Origin,
    update: Update,
    level: Consistency,
    /// Times it was run again after an [`OpError::Conflict`].
    attempts: u32,
}

/// The step of a running update an internal request is.
#[derive(Clone)]
enum Step {
    Read,
    /// Waiting for the node's loader ([`Replica::poll_load`]).
    Load,
    /// Waiting for the node's loader to write to the origin; whether the
    /// key held a value (a DEL's answer).
    Store(bool),
    Write(Effect),
}

/// What the node's loader found for [`Replica::loaded`]: the value, the
/// TTL to cache it with and its cost hint (the load's milliseconds), `None`
/// when the origin has no such key.
pub type LoadResult = Result<Option<(Bytes, u64, u32)>, Effect>;

/// Work for the node's loader ([`Replica::poll_load`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LoadRequest {
    /// Answer it under this id: [`Replica::loaded`] for a load or a
    /// refresh, [`Replica::stored`] for a store.
    pub id: u64,
    /// The key.
    pub key: Bytes,
    /// What to do.
    pub kind: LoadKind,
}

/// What a [`LoadRequest`] asks of the loader.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LoadKind {
    /// Load a missing key.
    Load,
    /// Refresh a value still served (the loader's refresh hook).
    Refresh(RefreshOf),
    /// Write a client's SET (`Some`) or DEL (`None`) to the origin, through
    /// (at once) or behind (queued), as the key's namespace says.
    Store {
        /// The value written, `None` for a delete.
        value: Option<Bytes>,
        /// The client's TTL in milliseconds, if it gave one.
        ttl_ms: Option<u64>,
    },
}

/// What the node's loader did with a store for [`Replica::stored`]: the
/// TTL to cache the written value with (`None` for a delete), or the
/// error to answer (the origin may or may not have the write).
pub type StoreResult = Result<Option<u64>, Effect>;

/// The value a refresh replaces.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RefreshOf {
    /// The value served meanwhile.
    pub current: Bytes,
    /// Whether it was past its soft expiry (stale-while-revalidate), not
    /// picked early.
    pub stale: bool,
    /// Its hard expiry, in Unix milliseconds (the loader derives the
    /// value's age from it).
    pub expires_at: u64,
}

/// A client operation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Op {
    /// Write (or, with `None`, delete) `key`.
    Put {
        /// The key.
        key: Bytes,
        /// The value.
        value: Option<Bytes>,
        /// Expiry, in Unix milliseconds (see [`Record::expires_at`]).
        expires_at: Option<u64>,
        /// The policy hint stored with every copy ([`Record::hint`]).
        hint: u32,
    },
    /// Read `key`.
    Get {
        /// The key.
        key: Bytes,
    },
    /// Drop every record on every member (FLUSHALL). Refused unless every
    /// member of the ring is up: one that missed it would repair its old
    /// records back.
    FlushAll,
    /// Read-modify-write `key`: run at the key's primary owner, serialized
    /// there with every other update of the key.
    Update {
        /// The key.
        key: Bytes,
        /// What to do.
        update: Update,
    },
    /// The sizes of the values of `keys`, largest over the owners heard
    /// (see `sizes`): an MGET sizes its reply before any value travels.
    Sizes {
        /// The keys.
        keys: Vec<Bytes>,
    },
    /// Write several keys with the same owners as one (see `batch`): an
    /// MSET. Answered `Written` with the batch's version.
    PutMany {
        /// The keys and what to write.
        entries: Vec<BatchEntry>,
    },
}

/// Why an operation failed. A failed write may still have reached some
/// replicas (it was not acknowledged, and may or may not survive).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum OpError {
    /// Fewer owners are alive than the consistency level needs.
    Unavailable,
    /// Not enough counted answers before the deadline.
    Timeout,
    /// An update's write found the key written since the update read it
    /// (another member ran an update of it as primary meanwhile): nothing
    /// was written. The primary runs the update again from its read, so a
    /// client sees this only after several such races in a row.
    Conflict,
}

/// What an operation produced.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// The write was acknowledged at this version.
    Written(Version),
    /// The read's record (`None`: never written).
    Read(Option<Record>),
    /// An update's answer.
    Updated(Effect),
    /// FLUSHALL done: the records dropped over every member (each key once
    /// per copy).
    Flushed(u64),
    /// A size probe's answer: per key, in order, the largest value length
    /// heard (0: no value).
    Sizes(Vec<u64>),
}

/// The answer to a client operation, by the client's request id.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Reply {
    /// The id the client gave.
    pub client_req: u64,
    /// What happened.
    pub result: Result<Outcome, OpError>,
}

/// Tunables.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ReplicaConfig {
    /// Replication factor.
    pub rf: usize,
    /// Deadline of one client operation.
    pub request_timeout_ms: u64,
    /// Resend interval of hints and sync requests.
    pub retry_ms: u64,
    /// The wall clock (Unix milliseconds) when `now` was 0: received
    /// versions are bounded by the wall clock ([`version::ceiling`]), and
    /// the core reads no clock of its own.
    pub wall_epoch_ms: u64,
    /// Longest key a peer may send: the node's own limit.
    pub max_key_len: usize,
    /// Longest value a peer may send: the node's own limit. Hints are held
    /// in memory, outside the shards' bounds, so they must be bounded here.
    pub max_value_len: usize,
    /// Bytes of re-sync streams this replica sends per second, over all
    /// the members it streams to (a token bucket): moving slots must not
    /// take the bandwidth and CPU the clients' requests need.
    pub stream_bytes_per_sec: u64,
}

impl Default for ReplicaConfig {
    fn default() -> Self {
        Self {
            rf: 2,
            request_timeout_ms: 1_000,
            retry_ms: 100,
            wall_epoch_ms: 0,
            max_key_len: 64 << 10,
            max_value_len: 1 << 20,
            stream_bytes_per_sec: DEFAULT_STREAM_BYTES_PER_SEC,
        }
    }
}

/// Why a peer's message was refused. Checked before the message touches
/// anything, so a refused message changes no state; it is dropped and the
/// member serves on. A peer holding a valid certificate is trusted to be a
/// member, not to be honest.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum PeerMessageError {
    /// The sender's id is this node's own or over [`MAX_NODE_ID`]: ids
    /// index per-member tables.
    #[error("sender {from} is not another member (this node is {me}; ids go up to {MAX_NODE_ID})")]
    UnknownSender {
        /// The id the message came from.
        from: NodeIx,
        /// This node's id.
        me: NodeIx,
    },
    /// A record's version is too far ahead (see [`version::ceiling`]).
    #[error(transparent)]
    Version(#[from] VersionTooFarAhead),
    /// A hint for a node that is not a member, or for its own sender (the
    /// coordinator hints only for owners it sees down).
    #[error("hint for node {target}, which is not a member other than the sender")]
    HintTarget {
        /// The node named.
        target: NodeIx,
    },
    /// A key or value over the node's limits.
    #[error("a {what} of {len} bytes is over this node's limit of {limit}")]
    TooLarge {
        /// `key` or `value`.
        what: &'static str,
        /// Its length.
        len: usize,
        /// The limit.
        limit: usize,
    },
    /// A list longer than any honest member sends.
    #[error("{count} {what} in one message, over the limit of {limit}")]
    TooMany {
        /// What the list holds.
        what: &'static str,
        /// Its length.
        count: usize,
        /// The limit.
        limit: usize,
    },
}

enum Phase {
    /// ABD's first round: the highest version a read quorum holds.
    Query { answered: BTreeSet<NodeIx>, counted: usize, needed: usize, highest: Version },
    /// The write itself.
    Store { record: Record, acked: BTreeSet<NodeIx>, counted: usize },
}

enum Pending {
    Write {
        client_req: u64,
        key: Bytes,
        value: Option<Bytes>,
        expires_at: Option<u64>,
        hint: u32,
        required: usize,
        deadline: u64,
        phase: Phase,
        /// For an update's write, the version its read found (see
        /// [`OpError::Conflict`]).
        base: Option<Version>,
    },
    Read {
        client_req: u64,
        key: Bytes,
        required: usize,
        deadline: u64,
        expected: usize,
        replies: Vec<Answer>,
        done: bool,
    },
    /// Delivering hint `id`.
    Hint { id: u64 },
    /// A FLUSHALL: the members yet to drop their records, and the records
    /// dropped so far.
    Flush { client_req: u64, deadline: u64, waiting: BTreeSet<NodeIx>, dropped: u64 },
    /// An update forwarded to the key's primary owner; `also` are the
    /// clients of loads of the same key that joined it.
    /// `load` is the key when it is a load (see `forwarded_loads`); `to`
    /// is the primary it went to, the only member whose answer counts.
    Forward { client_req: u64, deadline: u64, also: Vec<u64>, load: Option<Bytes>, to: NodeIx },
    /// A size probe (see `sizes`).
    Sizes(sizes::SizeProbe),
    /// A batch write (see `batch`).
    Batch(batch::BatchWrite),
}

struct Answer {
    from: NodeIx,
    record: Option<Record>,
    counted: bool,
}

impl Resync {
    fn new(round: u64, waiting: BTreeSet<NodeIx>, next_try: u64) -> Self {
        Self {
            round,
            waiting,
            next_try,
            cursors: BTreeMap::new(),
            asked: BTreeMap::new(),
            then: None,
            trusted: Vec::new(),
            not_before: 0,
            pending_only: false,
        }
    }
}

/// Hints held at most, over all targets.
pub const MAX_HINTS: usize = 100_000;

/// Record bytes per re-sync part: parts stay far below the transport's
/// frame limit whatever a node holds, and one part is all a stream holds
/// in memory at a time.
const SYNC_PART_BYTES: usize = 256 << 10;

/// Store entries one part looks at, at most (whether or not the requester
/// owns them): a part's work is bounded even where the requester owns
/// few keys.
const SYNC_PART_VISITS: usize = 65_536;

/// What looking at one entry costs a stream's token bucket, in bytes: a
/// part that found little still spent the walk.
const SYNC_VISIT_COST: u64 = 16;

/// The default of [`ReplicaConfig::stream_bytes_per_sec`]: 64 MiB/s.
pub const DEFAULT_STREAM_BYTES_PER_SEC: u64 = 64 << 20;

/// A request for a stream's next part, waiting for the token bucket.
struct StreamAsk {
    round: u64,
    cursor: Bytes,
    /// The table it was asked under: served only on that one.
    epoch: u64,
}

/// The streams' token bucket, in bytes: it may go into debt by one part,
/// and nothing is sent until it is out again.
struct Bucket {
    tokens: i64,
    at: u64,
}

impl Bucket {
    fn refill(&mut self, now: u64, per_sec: u64) {
        let ms = now.saturating_sub(self.at);
        self.at = self.at.max(now);
        let cap = (SYNC_PART_BYTES as i64).max(per_sec as i64 / 10);
        let gained = (ms.saturating_mul(per_sec) / 1_000).min(i64::MAX as u64) as i64;
        self.tokens = self.tokens.saturating_add(gained).min(cap);
    }

    /// When the bucket is out of debt again.
    fn ready_at(&self, per_sec: u64) -> u64 {
        if self.tokens > 0 {
            return self.at;
        }
        let missing = self.tokens.unsigned_abs() + 1;
        self.at + (missing.saturating_mul(1_000)).div_ceil(per_sec.max(1))
    }
}

struct Hint {
    target: NodeIx,
    key: Bytes,
    record: Record,
    next_try: u64,
}

struct Resync {
    round: u64,
    waiting: BTreeSet<NodeIx>,
    next_try: u64,
    /// Where each member's stream is: the cursor of the next part to ask
    /// for (none yet: the start).
    cursors: BTreeMap<NodeIx, Bytes>,
    /// When each member was last asked without an answer, and how often in
    /// a row: the interval doubles while it stays silent.
    asked: BTreeMap<NodeIx, (u64, u32)>,
    /// Run a second pass this long after the first completes (see
    /// [`Replica::join`]).
    then: Option<u64>,
    /// Rings under which this replica's copies were complete when the
    /// re-sync began: it still counts for a key it owns on each of them
    /// (and on the current ring). Empty after a restart: nothing counts.
    trusted: Vec<Arc<Ring>>,
    /// No request before this time, whatever else moves `next_try` (the
    /// second pass must wait out the old ring's operations).
    not_before: u64,
    /// Started by a table on which this node only takes slots over (see
    /// [`Replica::skip_dead_sources`]).
    pending_only: bool,
}

/// One node's replica and coordinator. See the module docs.
pub struct Replica {
    me: NodeIx,
    nodes: u32,
    ring: Arc<Ring>,
    config: ReplicaConfig,
    alive: Vec<bool>,
    store: Box<dyn RecordStore>,
    clock: LamportClock,
    resync: Option<Resync>,
    /// This boot's nonce: the high half of every request id and the round
    /// of its re-sync, so replies meant for an earlier life of this node
    /// (delayed in the network across a crash) match nothing.
    boot: u64,
    hints: BTreeMap<u64, Hint>,
    /// Re-syncs started in this life: numbers each one's rounds, so parts
    /// sent for an earlier one cannot complete a later one.
    resyncs: u64,
    /// The hint held per target and key.
    hint_of: BTreeMap<(NodeIx, Bytes), u64>,
    pending: BTreeMap<u64, Pending>,
    next_req: u64,
    /// In touch with the metadata log (see [`Replica::set_in_contact`]).
    in_contact: bool,
    /// Stream parts asked for and not sent yet, one per member (a newer
    /// ask replaces an older one, counted in `syncs_refused`), sent in turn
    /// as the token bucket allows.
    streams: BTreeMap<NodeIx, StreamAsk>,
    bucket: Bucket,
    /// The member whose stream was served last (the next turn is the
    /// following one's).
    streamed_last: NodeIx,
    /// Record bytes sent in stream parts.
    streamed_bytes: u64,
    /// Updates' writes that found their key written since their read.
    update_conflicts: u64,
    syncs_refused: u64,
    /// Messages to send, each with the table epoch it was made under.
    outbox: VecDeque<(NodeIx, u64, Message)>,
    replies: VecDeque<Reply>,
    /// Updates of keys this node is primary for, queued per key.
    updates: BTreeMap<Bytes, VecDeque<Queued>>,
    /// Updates queued over all keys.
    updates_queued: usize,
    /// The running updates' internal requests: their key and step.
    steps: BTreeMap<u64, (Bytes, Step)>,
    next_internal: u64,
    /// Forwarded updates already taken, by sender and its request id, until
    /// when they are remembered: a message delivered twice must not apply
    /// an increment twice.
    seen_updates: BTreeMap<(NodeIx, u64), u64>,
    /// Writes stored for other coordinators (for the stats).
    peer_writes: u64,
    /// Updates run as a key's primary (for the stats).
    updates_run: u64,
    /// Loads forwarded to their key's primary and not answered yet, by key:
    /// later GETs of the key here join them.
    forwarded_loads: BTreeMap<Bytes, u64>,
    /// Loads the node's loader must run: (internal request, key).
    loads: VecDeque<LoadRequest>,
    /// Keys whose value is being refreshed in the background, with the
    /// value served meanwhile to every read-through GET.
    refreshing: BTreeMap<Bytes, Bytes>,
    /// Set while internal replies are being consumed (see
    /// [`Replica::pump_updates`]).
    pumping: bool,
}

impl Replica {
    /// Replica `me` of a cluster whose ring members are named `"0"`,
    /// `"1"`, ... (`nodes` of them). Every node starts alive. `boot` must
    /// differ between a node's lives (a random number per process start).
    pub fn new(me: NodeIx, nodes: u32, ring: Arc<Ring>, config: ReplicaConfig, boot: u64) -> Self {
        Self::with_store(me, nodes, ring, config, boot, Box::new(BTreeMap::new()))
    }

    /// [`Replica::new`] keeping its records in `store`.
    pub fn with_store(
        me: NodeIx,
        nodes: u32,
        ring: Arc<Ring>,
        config: ReplicaConfig,
        boot: u64,
        store: Box<dyn RecordStore>,
    ) -> Self {
        let boot = (boot & 0xFFFF_FFFF) | 1;
        Self {
            me,
            nodes,
            ring,
            config,
            alive: vec![true; nodes as usize],
            store,
            clock: LamportClock::default(),
            resync: None,
            boot,
            hints: BTreeMap::new(),
            resyncs: 0,
            hint_of: BTreeMap::new(),
            in_contact: true,
            streams: BTreeMap::new(),
            bucket: Bucket { tokens: SYNC_PART_BYTES as i64, at: 0 },
            streamed_last: 0,
            streamed_bytes: 0,
            update_conflicts: 0,
            syncs_refused: 0,
            pending: BTreeMap::new(),
            next_req: boot << 32,
            outbox: VecDeque::new(),
            replies: VecDeque::new(),
            updates: BTreeMap::new(),
            updates_queued: 0,
            steps: BTreeMap::new(),
            next_internal: 0,
            seen_updates: BTreeMap::new(),
            loads: VecDeque::new(),
            refreshing: BTreeMap::new(),
            forwarded_loads: BTreeMap::new(),
            peer_writes: 0,
            updates_run: 0,
            pumping: false,
        }
    }

    /// This node's index.
    pub fn id(&self) -> NodeIx {
        self.me
    }

    /// Whether this replica counts toward quorums: it is in touch with the
    /// metadata log and not re-syncing.
    pub fn counted(&self) -> bool {
        self.in_contact && self.resync.is_none()
    }

    /// Whether this node is in touch with the metadata log's leader. Out of
    /// touch it may be cut off on a minority side while the majority moves
    /// its slots away, so none of its copies counts (its requests are
    /// still served; it simply cannot make up a quorum with them). No
    /// re-sync is needed when touch comes back: under the slot table it
    /// still holds, a QUORUM read meets every acknowledged write elsewhere,
    /// and a table that moved arrives through [`Replica::set_ring`].
    pub fn set_in_contact(&mut self, in_contact: bool) {
        self.in_contact = in_contact;
    }

    /// Whether this node is in touch with the metadata log's leader.
    pub fn in_contact(&self) -> bool {
        self.in_contact
    }

    /// The epoch of the table this replica places keys by.
    pub fn epoch(&self) -> u64 {
        self.ring.epoch()
    }

    /// Whether this replica's copy of `key` counts toward quorums. Only an
    /// owner's copy does, on this node's own ring: a coordinator whose ring
    /// is newer may ask a node that does not know yet that it gained the
    /// key, and whose copy is therefore not complete. While re-syncing,
    /// only the keys it owned, with a complete copy, before the ring change
    /// that started the re-sync, and has owned ever since, count.
    pub fn counted_for(&self, key: &[u8]) -> bool {
        if !self.in_contact {
            return false;
        }
        let me = self.me.to_string();
        let owns = |ring: &Ring| ring.owners(key, self.config.rf).iter().any(|m| m.id == me);
        if !owns(&self.ring) {
            return false;
        }
        let Some(resync) = &self.resync else { return true };
        !resync.trusted.is_empty() && resync.trusted.iter().all(|ring| owns(ring))
    }

    /// A new re-sync round number.
    fn next_round(&mut self) -> u64 {
        self.resyncs += 1;
        self.boot | (self.resyncs << 40)
    }

    /// Its record of `key`.
    pub fn record(&self, key: &[u8]) -> Option<Record> {
        self.store.get(key, false)
    }

    /// Every record it holds (a copy: for checks and tests).
    pub fn records(&self) -> Vec<(Bytes, Record)> {
        let mut out = Vec::new();
        self.store.scan(&mut |key, record| out.push((key.clone(), record.clone())));
        out
    }

    /// How many records it holds.
    pub fn record_count(&self) -> usize {
        self.store.len()
    }

    /// The members a re-sync still waits for (empty once counted).
    pub fn resync_waiting(&self) -> Vec<NodeIx> {
        self.resync.as_ref().map(|r| r.waiting.iter().copied().collect()).unwrap_or_default()
    }

    /// Stream requests dropped because a newer one from the same member
    /// came before they were served (a member asking in a loop gets its
    /// share of the stream rate, no more).
    pub fn syncs_refused(&self) -> u64 {
        self.syncs_refused
    }

    /// Updates' writes refused before storing anything because their key
    /// was written since their read ([`OpError::Conflict`]).
    pub fn update_conflicts(&self) -> u64 {
        self.update_conflicts
    }

    /// Record bytes this replica has streamed to re-syncing members.
    pub fn streamed_bytes(&self) -> u64 {
        self.streamed_bytes
    }

    /// Hints waiting for their owner.
    pub fn hints_held(&self) -> usize {
        self.hints.len()
    }

    /// The owners of `key`, primary first.
    pub fn owners(&self, key: &[u8]) -> Vec<NodeIx> {
        self.ring.owners(key, self.config.rf).iter().filter_map(|m| m.id.parse().ok()).collect()
    }

    /// Whom a write of `key` goes to: its owners, then the members taking
    /// its slot over ([`cachet_proto::SlotRange::pending`]), each of whom
    /// must acknowledge it too.
    pub(super) fn write_targets(&self, key: &[u8]) -> Vec<NodeIx> {
        let mut targets = self.owners(key);
        for &p in self.ring.pending(key) {
            if !targets.contains(&p) {
                targets.push(p);
            }
        }
        targets
    }

    /// Whether this node takes `key`'s slot over and is in touch with the
    /// log: its acknowledgement of a write counts (the write is there),
    /// though its copy answers no read until the log makes it an owner.
    pub(super) fn pending_here(&self, key: &[u8]) -> bool {
        self.in_contact && self.ring.pending(key).contains(&self.me)
    }

    /// The table's epoch if this node takes slots over on it and holds
    /// them: its streams are done and it has taken every write since the
    /// table came (the shell tells the log, [`crate::cluster::meta`]'s
    /// `SlotsHeld`).
    pub fn holds_pending(&self) -> Option<u64> {
        let pending = self.ring.table().pending_members().contains(&self.me);
        (pending && self.in_contact && self.resync.is_none()).then(|| self.ring.epoch())
    }

    /// The ring's members' ids.
    fn ring_nodes(&self) -> Vec<NodeIx> {
        self.ring.members().iter().filter_map(|m| m.id.parse().ok()).collect()
    }

    /// The members that own some slot on the current table, other than
    /// this node: whom a re-sync waits for (a member that owns nothing, such
    /// as one whose slots the log moved away while it was down, holds no
    /// copy that counts).
    fn other_owners(&self) -> BTreeSet<NodeIx> {
        let mut out = BTreeSet::new();
        for range in self.ring.table().ranges() {
            out.extend(range.owners.iter().take(self.config.rf).copied().filter(|&n| n != self.me));
        }
        out
    }

    /// The next slot table from the metadata log; ownership follows it
    /// at once.
    ///
    /// - This node only loses slots: nothing to fetch. Members keep
    ///   records they no longer own (a cache can afford the space more than
    ///   the traffic of deleting them) until evicted. A re-sync in progress
    ///   now waits for the current owners.
    /// - This node gains slots: it re-syncs from every other owner (on the
    ///   new table, so each answers only once it is on it too, see the
    ///   module docs), counting meanwhile only for the keys it already
    ///   owned ([`Replica::counted_for`]).
    pub fn set_ring(&mut self, now: u64, ring: Arc<Ring>) {
        if ring.epoch() <= self.ring.epoch() && !self.ring.is_empty() {
            return;
        }
        let highest = ring.members().iter().filter_map(|m| m.id.parse::<NodeIx>().ok()).max().unwrap_or(0);
        self.nodes = self.nodes.max(highest.min(MAX_NODE_ID) + 1);
        self.alive.resize(self.nodes as usize, true);
        let before = self.other_owners();
        let old = std::mem::replace(&mut self.ring, ring);
        self.shed_moved_updates(now);
        let others = self.other_owners();
        let owner_gains = self.ring.gains_as_owner_over(&old, self.me, self.config.rf);
        if !self.ring.gains_over(&old, self.me, self.config.rf) {
            // A re-sync in progress must hear from new owners too (they may
            // hold records this node owns), and no longer waits for members
            // that own nothing now.
            if let Some(resync) = &mut self.resync {
                resync.waiting.retain(|n| others.contains(n));
                resync.waiting.extend(others.iter().copied().filter(|n| !before.contains(n)));
                if !resync.trusted.is_empty() {
                    resync.trusted.push(old);
                }
            }
            self.pass_done(now);
            return;
        }
        let trusted = match self.resync.take() {
            None => vec![old],
            Some(mut earlier) if !earlier.trusted.is_empty() => {
                earlier.trusted.push(old);
                earlier.trusted
            }
            Some(_) => Vec::new(),
        };
        if others.is_empty() {
            return;
        }
        let round = self.next_round();
        let mut resync = Resync::new(round, others, now);
        resync.trusted = trusted;
        // Staged through the log (it takes slots over, owning none new): a
        // source that is down may be skipped where that is safe.
        resync.pending_only = !owner_gains;
        self.resync = Some(resync);
        self.skip_dead_sources(now);
    }

    /// A re-sync for slots this node takes over stops waiting for sources
    /// that are down when that is safe: for every slot it takes over, fewer
    /// of the owners are down than a write quorum, so every write
    /// acknowledged at QUORUM is on an owner it streams from. (Waiting
    /// would hold the move up for good when it replaces a dead member.)
    fn skip_dead_sources(&mut self, now: u64) {
        let Some(resync) = &self.resync else { return };
        if !resync.pending_only {
            return;
        }
        let dead: BTreeSet<NodeIx> = resync.waiting.iter().copied().filter(|&n| !self.is_alive(n)).collect();
        if dead.is_empty() {
            return;
        }
        let safe = self.ring.table().ranges().iter().filter(|r| r.pending.contains(&self.me)).all(|r| {
            let down = r.owners.iter().filter(|o| dead.contains(o)).count();
            down < Consistency::Quorum.required(r.owners.len())
        });
        if safe && let Some(resync) = &mut self.resync {
            resync.waiting.retain(|n| !dead.contains(n));
            self.pass_done(now);
        }
    }

    /// Ends a re-sync pass once no member is waited for: starts the second
    /// pass if one is due, else the replica counts again.
    fn pass_done(&mut self, now: u64) {
        let others = self.other_owners();
        let second = self.boot | ((self.resyncs + 1) << 40);
        let Some(resync) = &mut self.resync else { return };
        if !resync.waiting.is_empty() {
            return;
        }
        match resync.then.take() {
            Some(delay) if !others.is_empty() => {
                let trusted = std::mem::take(&mut resync.trusted);
                *resync = Resync::new(second, others, now + delay);
                resync.not_before = now + delay;
                resync.trusted = trusted;
                self.resyncs += 1;
            }
            _ => self.resync = None,
        }
    }

    /// This node may have missed writes for any of its keys: the others
    /// declared it down (it was paused, or cut off) and wrote without it.
    /// Its copies still count toward QUORUM safely (a quorum read meets
    /// the writes' quorums elsewhere), but one answering ONE from them
    /// would serve what it missed; so it keeps them (a re-sync only adds
    /// newer versions), re-syncs everything, and counts toward nothing
    /// until it has.
    pub fn rejoin(&mut self, now: u64) {
        let waiting = self.other_owners();
        if waiting.is_empty() {
            return;
        }
        let round = self.next_round();
        self.resync = Some(Resync::new(round, waiting, now));
        self.tick(now);
    }

    /// The failure detector's verdict on `node`. A node coming back gets
    /// its hints, and a re-syncing replica asks it again.
    /// A node not known yet (up to [`MAX_NODE_ID`]) becomes known: its
    /// messages are accepted from then on ([`Replica::check`]).
    pub fn set_alive(&mut self, now: u64, node: NodeIx, alive: bool) {
        if node <= MAX_NODE_ID && node >= self.nodes {
            self.nodes = node + 1;
            self.alive.resize(self.nodes as usize, false);
        }
        if let Some(slot) = self.alive.get_mut(node as usize) {
            *slot = alive;
        }
        if !alive {
            self.skip_dead_sources(now);
        }
        if alive {
            self.shed_moved_updates(now);
            for hint in self.hints.values_mut().filter(|h| h.target == node) {
                hint.next_try = now;
            }
            if let Some(resync) = &mut self.resync {
                resync.next_try = now;
            }
        }
    }

    /// The node restarts with nothing: every record, hint, clock and
    /// request is gone, and `boot` is its new life's nonce. It asks the
    /// others for its records and counts toward no quorum until all have
    /// answered.
    pub fn restart(&mut self, now: u64, boot: u64) {
        let mut store = std::mem::replace(&mut self.store, Box::new(BTreeMap::new()));
        store.clear();
        let in_contact = self.in_contact;
        *self = Self::with_store(self.me, self.nodes, self.ring.clone(), self.config, boot, store);
        self.in_contact = in_contact;
        let waiting = self.other_owners();
        if waiting.is_empty() {
            return;
        }
        self.resync = Some(Resync::new(self.boot, waiting, now));
        self.tick(now);
    }

    /// [`Replica::restart`] for a node whose ring may be new to the others
    /// (it is joining, or the ring grew while it was away): two re-sync
    /// passes, the second one operation deadline after the first. A member
    /// answers the first only once the joiner is in its ring; writes it
    /// coordinated on the old ring started before that, so by the second
    /// pass each has finished (or failed) and every replica that
    /// acknowledged one holds it in the snapshot it sends. One pass could
    /// miss such a write at the new owners.
    pub fn join(&mut self, now: u64, boot: u64) {
        self.restart(now, boot);
        let delay = self.config.request_timeout_ms;
        if let Some(resync) = &mut self.resync {
            resync.then = Some(delay);
        }
    }

    fn request_id(&mut self) -> u64 {
        let id = self.next_req;
        self.next_req += 1;
        id
    }

    fn is_alive(&self, node: NodeIx) -> bool {
        self.alive.get(node as usize).copied().unwrap_or(false)
    }

    /// The key a pending client request is about.
    fn pending_key(&self, req: u64) -> Option<&Bytes> {
        match self.pending.get(&req)? {
            Pending::Read { key, .. } | Pending::Write { key, .. } => Some(key),
            Pending::Batch(batch) => batch.first_key(),
            Pending::Hint { .. } | Pending::Forward { .. } | Pending::Flush { .. } | Pending::Sizes(_) => None,
        }
    }

    fn send(&mut self, to: NodeIx, message: Message) {
        self.outbox.push_back((to, self.ring.epoch(), message));
    }

    /// Keeps `record` if it is newer than what `key` holds; whether `key`
    /// now holds it or a newer one (`false`: the store refused it, so this
    /// replica must not acknowledge it as stored).
    fn apply(&mut self, now: u64, key: &Bytes, record: &Record) -> bool {
        self.clock.observe(record.version);
        let newer = self.store.get(key, false).is_none_or(|have| have.version < record.version);
        !newer || self.store.put(self.config.wall_epoch_ms.saturating_add(now), key, record)
    }

    /// The first live node after the owners on `key`'s ring walk: where a
    /// down owner's hint goes.
    fn hint_holder(&self, key: &[u8], owners: &[NodeIx]) -> Option<NodeIx> {
        self.ring
            .walk(key)
            .into_iter()
            .find(|n| !owners.contains(n) && self.alive.get(*n as usize).copied().unwrap_or(false))
    }

    /// A client operation coordinated here, answered through
    /// [`Replica::poll_reply`] with `client_req`.
    pub fn client(&mut self, now: u64, client_req: u64, op: Op, consistency: Consistency) {
        self.coordinate(now, client_req, op, consistency);
        self.pump_updates(now);
    }

    fn coordinate(&mut self, now: u64, client_req: u64, op: Op, consistency: Consistency) {
        self.coordinate_with(now, client_req, op, consistency, None);
    }

    /// [`Replica::coordinate`]; a write given `base` (the version an
    /// update read) fails with [`OpError::Conflict`] before storing
    /// anything if its read quorum holds a newer one.
    pub(super) fn coordinate_with(
        &mut self,
        now: u64,
        client_req: u64,
        op: Op,
        consistency: Consistency,
        base: Option<Version>,
    ) {
        let key = match &op {
            Op::Put { key, .. } | Op::Get { key } | Op::Update { key, .. } => key.clone(),
            Op::FlushAll => {
                self.flush_all(now, client_req);
                return;
            }
            Op::PutMany { entries } => {
                self.write_batch(now, client_req, entries.clone(), consistency);
                return;
            }
            Op::Sizes { keys } => {
                self.probe_sizes(now, client_req, keys.clone(), consistency);
                return;
            }
        };
        let owners = self.owners(&key);
        // A write needs one more acknowledgement per member taking the slot
        // over: then, whichever owners it replaces, a quorum of the new
        // owners holds every acknowledged write.
        let pending = match op {
            Op::Put { .. } => self.ring.pending(&key).len(),
            _ => 0,
        };
        let required = consistency.required(owners.len()) + pending;
        let targets = if pending > 0 { self.write_targets(&key) } else { owners.clone() };
        let alive = targets.iter().filter(|&&n| n == self.me || self.is_alive(n)).count();
        if required == pending || alive < required {
            self.replies.push_back(Reply { client_req, result: Err(OpError::Unavailable) });
            return;
        }
        if let Op::Update { update, .. } = op {
            // The primary is the first owner this node sees up; it runs the
            // update unless it is this node.
            match owners.iter().copied().find(|&n| n == self.me || self.is_alive(n)) {
                Some(primary) if primary == self.me => {
                    self.enqueue_update(now, Origin::Client(client_req), key, update, consistency);
                }
                Some(_) if matches!(update, Update::Load { .. }) && self.join_load(&key, client_req) => {}
                Some(primary) => {
                    let req = self.request_id();
                    let load = matches!(update, Update::Load { .. }).then(|| key.clone());
                    if load.is_some() {
                        self.forwarded_loads.insert(key.clone(), req);
                    }
                    // Queued behind others, then a read and a write there
                    // (and a load between them).
                    let wait = match update {
                        Update::Load { wait_ms, .. } | Update::Store { wait_ms, .. } => wait_ms,
                        _ => 0,
                    };
                    let deadline = now + 3 * self.config.request_timeout_ms + wait;
                    let forward = Pending::Forward { client_req, deadline, also: Vec::new(), load, to: primary };
                    self.pending.insert(req, forward);
                    self.send(primary, Message::Update { req, key, update, level: consistency });
                }
                None => self.replies.push_back(Reply { client_req, result: Err(OpError::Unavailable) }),
            }
            return;
        }
        let req = self.request_id();
        let deadline = now + self.config.request_timeout_ms;
        match op {
            Op::Update { .. } | Op::FlushAll | Op::Sizes { .. } | Op::PutMany { .. } => {}
            Op::Get { .. } => {
                let expected = self.live(&owners);
                let read = Pending::Read {
                    client_req,
                    key: key.clone(),
                    required,
                    deadline,
                    expected,
                    replies: Vec::new(),
                    done: false,
                };
                self.pending.insert(req, read);
                self.ask(req, &key, &owners);
            }
            Op::Put { value, expires_at, hint, .. } => {
                // At ONE a counted coordinator stores at once. A re-syncing
                // one's clock may be far behind, and an update's write must
                // check its read: they ask a read quorum for the current
                // version first, as every other level does (it must meet the
                // quorum of every earlier acknowledged write).
                let at_once = consistency == Consistency::One && self.counted() && base.is_none();
                let record = at_once.then(|| Record {
                    version: self.clock.tick(self.me),
                    value: value.clone(),
                    expires_at,
                    hint,
                });
                let phase = match &record {
                    Some(record) => Phase::Store { record: record.clone(), acked: BTreeSet::new(), counted: 0 },
                    None => {
                        let needed = Consistency::Quorum.required(owners.len());
                        Phase::Query { answered: BTreeSet::new(), counted: 0, needed, highest: Version::default() }
                    }
                };
                let write = Pending::Write {
                    client_req,
                    key: key.clone(),
                    value,
                    expires_at,
                    hint,
                    required,
                    deadline,
                    phase,
                    base,
                };
                self.pending.insert(req, write);
                match record {
                    Some(record) => self.store_at_owners(now, req, &key, &record),
                    None => self.ask(req, &key, &owners),
                }
            }
        }
        self.progress(now, req);
    }

    /// FLUSHALL coordinated here: every member of the ring must be up (one
    /// that missed it would repair its records back); each drops what it
    /// holds and acknowledges.
    fn flush_all(&mut self, now: u64, client_req: u64) {
        // Every member, owner or not: one that missed it would come back
        // with its old records and repair them into the others.
        let others: BTreeSet<NodeIx> = self.ring_nodes().into_iter().filter(|&n| n != self.me).collect();
        if others.iter().any(|&n| !self.is_alive(n)) {
            self.replies.push_back(Reply { client_req, result: Err(OpError::Unavailable) });
            return;
        }
        let dropped = self.drop_everything();
        if others.is_empty() {
            self.replies.push_back(Reply { client_req, result: Ok(Outcome::Flushed(dropped)) });
            return;
        }
        let req = self.request_id();
        for &member in &others {
            self.send(member, Message::Flush { req });
        }
        let deadline = now + self.config.request_timeout_ms;
        self.pending.insert(req, Pending::Flush { client_req, deadline, waiting: others, dropped });
    }

    /// Drops every record and hint held; how many records there were.
    fn drop_everything(&mut self) -> u64 {
        let dropped = self.store.len() as u64;
        self.store.clear();
        self.hints.clear();
        self.hint_of.clear();
        self.pending.retain(|_, p| !matches!(p, Pending::Hint { .. }));
        dropped
    }

    /// Owners that are this node or alive: who will be asked.
    fn live(&self, owners: &[NodeIx]) -> usize {
        owners.iter().filter(|&&n| n == self.me || self.alive.get(n as usize).copied().unwrap_or(false)).count()
    }

    /// Sends `Get` to the live owners (answering itself directly).
    fn ask(&mut self, req: u64, key: &Bytes, owners: &[NodeIx]) {
        for &owner in owners {
            if owner == self.me {
                let record = self.store.get(key, true);
                let counted = self.counted_for(key);
                self.answer(req, owner, record, counted);
            } else if self.is_alive(owner) {
                self.send(owner, Message::Get { req, key: key.clone() });
            }
        }
    }

    /// Sends the write to every owner and member taking the slot over:
    /// live ones directly, down owners as a hint to the next live node (a
    /// member taking the slot over that is down is given up by the log).
    fn store_at_owners(&mut self, now: u64, req: u64, key: &Bytes, record: &Record) {
        let owners = self.owners(key);
        for owner in self.write_targets(key) {
            if owner == self.me {
                let counted = self.apply(now, key, record) && (self.counted_for(key) || self.pending_here(key));
                self.acked(req, owner, counted);
            } else if self.is_alive(owner) {
                self.send(owner, Message::Put { req, key: key.clone(), record: record.clone(), hint_for: None });
            } else if owners.contains(&owner)
                && let Some(holder) = self.hint_holder(key, &owners)
            {
                let hint = Message::Put { req: 0, key: key.clone(), record: record.clone(), hint_for: Some(owner) };
                if holder == self.me {
                    self.keep_hint(now, owner, key.clone(), record.clone());
                } else {
                    self.send(holder, hint);
                }
            }
        }
    }

    /// Holds `record` for `target`: one hint per target and key (the
    /// newest), and at most [`MAX_HINTS`] in all. Dropping one is safe:
    /// hints never count toward a quorum; they only speed up the owner's
    /// catch-up, which re-sync and read repair also do.
    fn keep_hint(&mut self, now: u64, target: NodeIx, key: Bytes, record: Record) {
        if let Some(&id) = self.hint_of.get(&(target, key.clone()))
            && let Some(hint) = self.hints.get_mut(&id)
        {
            if hint.record.version < record.version {
                hint.record = record;
                hint.next_try = now;
                // A delivery of the older record in flight must not retire
                // the newer one when it is acknowledged.
                self.pending.retain(|_, p| !matches!(p, Pending::Hint { id: h } if *h == id));
            }
            return;
        }
        if self.hints.len() >= MAX_HINTS {
            tracing::warn!(target, "hint limit reached; a write for a down member is not held");
            return;
        }
        let id = self.request_id();
        self.hint_of.insert((target, key.clone()), id);
        self.hints.insert(id, Hint { target, key, record, next_try: now });
    }

    fn answer(&mut self, req: u64, from: NodeIx, record: Option<Record>, counted: bool) {
        // Only the key's owners answer for it.
        if self.pending_key(req).is_some_and(|key| !self.owners(key).contains(&from)) {
            return;
        }
        if let Some(record) = &record {
            self.clock.observe(record.version);
        }
        match self.pending.get_mut(&req) {
            // A duplicated reply must not count twice.
            Some(Pending::Read { replies, .. }) if !replies.iter().any(|a| a.from == from) => {
                replies.push(Answer { from, record, counted });
            }
            Some(Pending::Write { phase: Phase::Query { answered, counted: n, highest, .. }, .. }) => {
                // Duplicates count once.
                let fresh = answered.insert(from);
                *n += usize::from(fresh && counted);
                if let Some(record) = record.filter(|_| fresh) {
                    *highest = (*highest).max(record.version);
                }
            }
            _ => {}
        }
    }

    fn acked(&mut self, req: u64, from: NodeIx, counted: bool) {
        if self.pending_key(req).is_some_and(|key| !self.write_targets(key).contains(&from)) {
            return;
        }
        match self.pending.get_mut(&req) {
            Some(Pending::Write { phase: Phase::Store { acked, counted: n, .. }, .. }) => {
                let fresh = acked.insert(from);
                *n += usize::from(fresh && counted);
            }
            Some(Pending::Hint { id }) => {
                let id = *id;
                if let Some(hint) = self.hints.remove(&id) {
                    self.hint_of.remove(&(hint.target, hint.key));
                }
                self.pending.remove(&req);
            }
            _ => {}
        }
    }

    /// Moves request `req` on as far as its answers allow.
    fn progress(&mut self, now: u64, req: u64) {
        let Some(pending) = self.pending.get_mut(&req) else { return };
        match pending {
            Pending::Read { client_req, required, replies, done, expected, .. } => {
                let counted = replies.iter().filter(|a| a.counted).count();
                if !*done && counted >= *required {
                    *done = true;
                    let best = replies.iter().filter_map(|a| a.record.clone()).max_by_key(|r| r.version);
                    let client_req = *client_req;
                    self.replies.push_back(Reply { client_req, result: Ok(Outcome::Read(best)) });
                }
                // Everyone asked has answered: repair now.
                if *done && replies.len() >= *expected {
                    self.finish_read(now, req);
                }
            }
            Pending::Write { client_req, key, value, expires_at, hint, required, phase, deadline, base } => match phase
            {
                // Its query answered only past the deadline (this process
                // was paused, or starved, with the replies queued): its
                // client has given up and may have written the key again
                // through another member since. Stored now, it would take
                // a version above those newer writes (the clock has seen
                // them) and undo them; it fails instead.
                Phase::Query { counted, needed, .. } if *counted >= *needed && now >= *deadline => {
                    let client_req = *client_req;
                    self.pending.remove(&req);
                    self.replies.push_back(Reply { client_req, result: Err(OpError::Timeout) });
                }
                // An update's write whose key was written since the update
                // read it: a member that was its primary too (by its own
                // view of who is up) ran another update meanwhile, or a
                // plain write landed. Written now, it would undo that write
                // with a value computed from the older one.
                // The coordinator's own copy counts as it is now, not as
                // it was when the query began: a reply delayed in the
                // network describes the key as it was then, and the other
                // primary's newer writes may have reached this member
                // meanwhile (simulator seed 6989).
                Phase::Query { counted, needed, highest, .. }
                    if *counted >= *needed
                        && base.is_some_and(|base| {
                            *highest > base || self.store.get(key, false).is_some_and(|own| own.version > base)
                        }) =>
                {
                    let client_req = *client_req;
                    self.pending.remove(&req);
                    self.update_conflicts += 1;
                    self.replies.push_back(Reply { client_req, result: Err(OpError::Conflict) });
                }
                Phase::Query { counted, needed, highest, .. } => {
                    if *counted >= *needed {
                        self.clock.observe(*highest);
                        let version = self.clock.tick(self.me);
                        let record = Record { version, value: value.clone(), expires_at: *expires_at, hint: *hint };
                        let key = key.clone();
                        *phase = Phase::Store { record: record.clone(), acked: BTreeSet::new(), counted: 0 };
                        self.store_at_owners(now, req, &key, &record);
                        self.progress(now, req);
                    }
                }
                Phase::Store { record, counted, .. } => {
                    if *counted >= *required {
                        let reply = Reply { client_req: *client_req, result: Ok(Outcome::Written(record.version)) };
                        self.replies.push_back(reply);
                        self.pending.remove(&req);
                    }
                }
            },
            Pending::Hint { .. }
            | Pending::Forward { .. }
            | Pending::Flush { .. }
            | Pending::Sizes(_)
            | Pending::Batch(_) => {}
        }
    }

    /// Read repair: every owner that answered with an older record gets
    /// the newest one.
    fn finish_read(&mut self, now: u64, req: u64) {
        let Some(Pending::Read { key, replies, .. }) = self.pending.remove(&req) else { return };
        let Some(best) = replies.iter().filter_map(|a| a.record.clone()).max_by_key(|r| r.version) else { return };
        for answer in &replies {
            let behind = answer.record.as_ref().is_none_or(|r| r.version < best.version);
            if !behind {
                continue;
            }
            if answer.from == self.me {
                self.apply(now, &key, &best);
            } else {
                self.send(answer.from, Message::Put { req: 0, key: key.clone(), record: best.clone(), hint_for: None });
            }
        }
    }

    /// Whether a message from `from` may be handled at `now`: every id,
    /// version, size and count in it within bounds. Reads nothing but the
    /// message and this replica's tables, changes nothing.
    pub fn check(&self, now: u64, from: NodeIx, message: &Message) -> Result<(), PeerMessageError> {
        // Not `from >= self.nodes`: a member that joined may be heard from
        // before this replica's ring has it; tables are read with `get`.
        if from == self.me || from > MAX_NODE_ID {
            return Err(PeerMessageError::UnknownSender { from, me: self.me });
        }
        let wall_ms = self.config.wall_epoch_ms.saturating_add(now);
        let key_ok = |key: &Bytes| {
            let limit = self.config.max_key_len;
            if key.len() > limit {
                Err(PeerMessageError::TooLarge { what: "key", len: key.len(), limit })
            } else {
                Ok(())
            }
        };
        // A stream cursor is a store's position: a key at most, and a byte.
        let cursor_ok = |cursor: &Bytes| {
            let limit = self.config.max_key_len + 1;
            if cursor.len() > limit {
                Err(PeerMessageError::TooLarge { what: "cursor", len: cursor.len(), limit })
            } else {
                Ok(())
            }
        };
        let record_ok = |record: &Record| {
            version::check(record.version, wall_ms)?;
            let (len, limit) = (record.value.as_ref().map_or(0, Bytes::len), self.config.max_value_len);
            if len > limit { Err(PeerMessageError::TooLarge { what: "value", len, limit }) } else { Ok(()) }
        };
        match message {
            Message::Put { key, record, hint_for, .. } => {
                key_ok(key)?;
                record_ok(record)?;
                if let Some(target) = *hint_for
                    && (target == from || target >= self.nodes || target > MAX_NODE_ID)
                {
                    return Err(PeerMessageError::HintTarget { target });
                }
            }
            Message::Get { key, .. } => key_ok(key)?,
            Message::GetReply { record: Some(record), .. } => record_ok(record)?,
            Message::SyncRequest { cursor, .. } => cursor_ok(cursor)?,
            Message::SyncData { cursor, next, entries, .. } => {
                cursor_ok(cursor)?;
                if let Some(next) = next {
                    cursor_ok(next)?;
                }
                for (key, record) in entries {
                    key_ok(key)?;
                    record_ok(record)?;
                }
            }
            Message::Update { key, update, .. } => {
                key_ok(key)?;
                let (len, limit) = (update.value_len(), self.config.max_value_len);
                if len > limit {
                    return Err(PeerMessageError::TooLarge { what: "value", len, limit });
                }
            }
            Message::UpdateReply { result: Ok(Effect::LoadFailed { message, .. }), .. } if message.len() > 64 << 10 => {
                return Err(PeerMessageError::TooLarge { what: "error", len: message.len(), limit: 64 << 10 });
            }
            Message::UpdateReply { result: Ok(Effect::Value(Some(value))), .. } => {
                // An APPEND's value may be the key's limit plus what was
                // appended; never more than twice the limit.
                let (len, limit) = (value.len(), self.config.max_value_len.saturating_mul(2));
                if len > limit {
                    return Err(PeerMessageError::TooLarge { what: "value", len, limit });
                }
            }
            Message::Versions { .. } | Message::VersionsReply { .. } | Message::PutBatch { .. } => {
                self.check_batch(message, key_ok, record_ok, wall_ms)?;
            }
            Message::Sizes { keys, .. } => {
                if keys.len() > MAX_PROBE_KEYS {
                    return Err(PeerMessageError::TooMany { what: "keys", count: keys.len(), limit: MAX_PROBE_KEYS });
                }
                keys.iter().try_for_each(key_ok)?;
            }
            Message::SizesReply { sizes, .. } if sizes.len() > MAX_PROBE_KEYS => {
                return Err(PeerMessageError::TooMany { what: "sizes", count: sizes.len(), limit: MAX_PROBE_KEYS });
            }
            Message::GetReply { record: None, .. }
            | Message::SizesReply { .. }
            | Message::PutAck { .. }
            | Message::UpdateReply { .. }
            | Message::Flush { .. }
            | Message::FlushAck { .. } => {}
        }
        Ok(())
    }

    /// A message from `from`, handled if [`Replica::check`] passes; a
    /// refused one is returned untouched as an error and changes nothing.
    /// `epoch` is the table epoch the sender made it under.
    pub fn handle(&mut self, now: u64, from: NodeIx, epoch: u64, message: Message) -> Result<(), PeerMessageError> {
        self.check(now, from, &message)?;
        self.handle_checked(now, from, epoch, message);
        self.pump_updates(now);
        Ok(())
    }

    fn handle_checked(&mut self, now: u64, from: NodeIx, epoch: u64, message: Message) {
        // Only members on the same table count for each other. A sender
        // on an older table is fenced: its requests are served, but nothing
        // answered to it counts, so it cannot complete a quorum among owners
        // that moved on. A sender on a newer one gets no counted answer
        // either: this replica is behind (back from a partition with its
        // lease renewed before the log's newest tables applied here, say),
        // and its copies may lack writes the newer table's owners took.
        // Answers are held to the same rule, in case the answerer is the one
        // behind or ahead.
        let current = epoch == self.ring.epoch();
        match message {
            Message::Put { req, key, record, hint_for: Some(target) } => {
                self.clock.observe(record.version);
                let counted = self.counted_for(&key) && current;
                if target == self.me {
                    self.apply(now, &key, &record);
                } else {
                    self.keep_hint(now, target, key, record);
                }
                if req != 0 {
                    self.send(from, Message::PutAck { req, counted });
                }
            }
            Message::Put { req, key, record, hint_for: None } => {
                // A record the store refused is acknowledged as not
                // counting: the coordinator must not count a copy that is
                // not there.
                let counted =
                    self.apply(now, &key, &record) && (self.counted_for(&key) || self.pending_here(&key)) && current;
                self.peer_writes += u64::from(req != 0);
                if req != 0 {
                    self.send(from, Message::PutAck { req, counted });
                }
            }
            Message::PutAck { req, counted } if matches!(self.pending.get(&req), Some(Pending::Batch(_))) => {
                self.batch_acked(now, req, from, counted && current);
            }
            Message::PutAck { req, counted } => {
                self.acked(req, from, counted && current);
                self.progress(now, req);
            }
            Message::Versions { req, keys } => self.answer_versions(from, req, &keys, current),
            Message::VersionsReply { req, highest, counted } => {
                self.versions_answered(now, req, from, highest, counted && current)
            }
            Message::PutBatch { req, entries } => {
                let counted = self.apply_batch(now, &entries) && current;
                self.peer_writes += 1;
                self.send(from, Message::PutAck { req, counted });
            }
            // Run here whatever this node's own view says: the sender took
            // this node for the key's primary, and a second hop could bounce
            // between two members that disagree.
            Message::Update { req, key, update, level } => {
                // Remembered until the sender's deadline for it has passed;
                // beyond MAX_SEEN_UPDATES (a flood) a duplicate could slip
                // through, which the peer transport's reliable streams do
                // not produce anyway.
                let until = now + 3 * self.config.request_timeout_ms + 1;
                if self.seen_updates.len() >= MAX_SEEN_UPDATES {
                    self.seen_updates.retain(|_, at| *at > now);
                }
                let fresh = match self.seen_updates.get(&(from, req)) {
                    Some(_) => false,
                    None if self.seen_updates.len() < MAX_SEEN_UPDATES => {
                        self.seen_updates.insert((from, req), until);
                        true
                    }
                    None => true,
                };
                if fresh {
                    self.enqueue_update(now, Origin::Peer { from, req }, key, update, level);
                }
            }
            Message::Flush { req } => {
                let dropped = self.drop_everything();
                self.send(from, Message::FlushAck { req, dropped });
            }
            Message::FlushAck { req, dropped } => {
                if let Some(Pending::Flush { waiting, dropped: total, .. }) = self.pending.get_mut(&req)
                    && waiting.remove(&from)
                {
                    *total += dropped;
                    if waiting.is_empty()
                        && let Some(Pending::Flush { client_req, dropped, .. }) = self.pending.remove(&req)
                    {
                        self.replies.push_back(Reply { client_req, result: Ok(Outcome::Flushed(dropped)) });
                    }
                }
            }
            Message::UpdateReply { req, result } => {
                // Only from the member it was forwarded to: another could
                // otherwise answer for a primary it is not.
                if matches!(self.pending.get(&req), Some(Pending::Forward { to, .. }) if *to == from) {
                    self.answer_forward(req, result.map(Outcome::Updated));
                }
            }
            Message::Get { req, key } => {
                let record = self.store.get(&key, true);
                let counted = self.counted_for(&key) && current;
                self.send(from, Message::GetReply { req, record, counted });
            }
            Message::GetReply { req, record, counted } => {
                self.answer(req, from, record, counted && current);
                self.progress(now, req);
            }
            Message::Sizes { req, keys } => self.answer_sizes(from, req, &keys),
            Message::SizesReply { req, sizes } => self.sizes_answered(from, req, &sizes),
            // Answered only on the same table: from an older one the
            // requester would miss what it gained; from a newer one this
            // replica may still acknowledge writes of the old table that
            // its answer would not hold. Either way it asks again, and the
            // metadata log brings the one behind up to date meanwhile.
            Message::SyncRequest { .. } if epoch != self.ring.epoch() => {}
            // Queued, one per member, and served in turn as the stream
            // rate allows: a member asking in a loop (it holds a valid
            // certificate) only replaces its own ask, and gets its share
            // of the rate while the others get theirs.
            Message::SyncRequest { round, cursor } => {
                if self.streams.insert(from, StreamAsk { round, cursor, epoch }).is_some() {
                    self.syncs_refused += 1;
                }
                self.serve_streams(now);
            }
            Message::SyncData { round, cursor, next, entries } => {
                for (key, record) in &entries {
                    self.apply(now, key, record);
                }
                let Some(resync) = &mut self.resync else { return };
                // Only the part asked for moves the stream on: a late
                // duplicate, or one of an earlier round, is data, no more.
                let at = resync.cursors.get(&from).cloned().unwrap_or_default();
                if resync.round != round || !resync.waiting.contains(&from) || at != cursor {
                    return;
                }
                resync.asked.remove(&from);
                match next {
                    None => {
                        resync.waiting.remove(&from);
                        self.pass_done(now);
                    }
                    Some(next) => {
                        resync.cursors.insert(from, next.clone());
                        resync.asked.insert(from, (now, 0));
                        self.send(from, Message::SyncRequest { round, cursor: next });
                    }
                }
            }
        }
    }

    /// Deadlines: expired requests fail (or finish their repair), hints
    /// and sync requests are resent.
    pub fn tick(&mut self, now: u64) {
        self.expire(now);
        self.pump_updates(now);
    }

    fn expire(&mut self, now: u64) {
        self.seen_updates.retain(|_, until| *until > now);
        let expired: Vec<u64> = self
            .pending
            .iter()
            .filter(|(_, p)| match p {
                Pending::Read { deadline, .. }
                | Pending::Write { deadline, .. }
                | Pending::Forward { deadline, .. }
                | Pending::Flush { deadline, .. } => *deadline <= now,
                Pending::Sizes(probe) => probe.deadline <= now,
                Pending::Batch(batch) => batch.deadline <= now,
                Pending::Hint { .. } => false,
            })
            .map(|(&req, _)| req)
            .collect();
        for req in expired {
            match self.pending.get(&req) {
                Some(Pending::Read { done: true, .. }) => self.finish_read(now, req),
                Some(Pending::Forward { .. }) => self.answer_forward(req, Err(OpError::Timeout)),
                Some(Pending::Sizes(_)) => self.finish_probe(req),
                Some(Pending::Batch(batch)) => {
                    let client_req = batch.client_req;
                    self.pending.remove(&req);
                    self.replies.push_back(Reply { client_req, result: Err(OpError::Timeout) });
                }
                Some(
                    Pending::Read { client_req, .. }
                    | Pending::Write { client_req, .. }
                    | Pending::Flush { client_req, .. },
                ) => {
                    let client_req = *client_req;
                    self.pending.remove(&req);
                    self.replies.push_back(Reply { client_req, result: Err(OpError::Timeout) });
                }
                _ => {}
            }
        }
        let due: Vec<u64> = self
            .hints
            .iter()
            .filter(|(_, h)| h.next_try <= now && self.alive.get(h.target as usize).copied().unwrap_or(false))
            .map(|(&id, _)| id)
            .collect();
        for id in due {
            let req = self.request_id();
            let Some(hint) = self.hints.get_mut(&id) else { continue };
            hint.next_try = now + self.config.retry_ms;
            let message = Message::Put { req, key: hint.key.clone(), record: hint.record.clone(), hint_for: None };
            let target = hint.target;
            // Earlier attempts' requests for this hint are superseded.
            self.pending.retain(|_, p| !matches!(p, Pending::Hint { id: h } if *h == id));
            self.pending.insert(req, Pending::Hint { id });
            self.send(target, message);
        }
        let mut sync = None;
        if let Some(resync) = &mut self.resync
            && resync.next_try <= now
            && resync.not_before <= now
        {
            resync.next_try = now + self.config.retry_ms;
            // A member is asked again for the part it has not sent, one
            // retry period after the last ask and then less and less often
            // while it stays silent (an ask waiting at a busy sender is
            // only replaced by the next: asking again costs it nothing).
            let (retry, quiet) = (self.config.retry_ms, 10 * self.config.retry_ms);
            let asked = &resync.asked;
            let due = |p: &NodeIx| asked.get(p).is_none_or(|&(at, n)| now >= at + (retry << n.min(10)).min(quiet));
            let ask: Vec<(NodeIx, Bytes)> = resync
                .waiting
                .iter()
                .copied()
                .filter(due)
                .map(|p| (p, resync.cursors.get(&p).cloned().unwrap_or_default()))
                .collect();
            for (p, _) in &ask {
                let n = resync.asked.get(p).map_or(0, |&(_, n)| n + 1);
                resync.asked.insert(*p, (now, n));
            }
            sync = Some((resync.round, ask));
        }
        if let Some((round, waiting)) = sync {
            for (peer, cursor) in waiting {
                if self.is_alive(peer) {
                    self.send(peer, Message::SyncRequest { round, cursor });
                }
            }
        }
        self.serve_streams(now);
    }

    /// Sends the parts asked for while the token bucket allows, one member
    /// at a time in turn. Each part is built from the store as it is sent:
    /// a stream holds one part in memory, never a snapshot of the store.
    fn serve_streams(&mut self, now: u64) {
        let per_sec = self.config.stream_bytes_per_sec.max(1);
        self.bucket.refill(now, per_sec);
        while self.bucket.tokens > 0 {
            let turn = self
                .streams
                .range(self.streamed_last.saturating_add(1)..)
                .next()
                .or_else(|| self.streams.iter().next())
                .map(|(&member, _)| member);
            let Some(member) = turn else { break };
            let Some(ask) = self.streams.remove(&member) else { break };
            self.streamed_last = member;
            // Asked under another table: the requester asks again once on
            // this one (see the module docs).
            if ask.epoch != self.ring.epoch() {
                continue;
            }
            let cost = self.stream_part(member, ask);
            self.bucket.tokens = self.bucket.tokens.saturating_sub(cost.min(i64::MAX as u64) as i64);
        }
    }

    /// Sends `member` the part of its stream `ask` starts; returns what it
    /// cost (bytes sent and entries looked at).
    fn stream_part(&mut self, member: NodeIx, ask: StreamAsk) -> u64 {
        let ring = self.ring.clone();
        let rf = self.config.rf;
        // What it owns or takes over: a member taking slots over streams
        // them from their owners.
        let theirs = |key: &[u8]| {
            ring.owners(key, rf).iter().any(|m| m.id.parse() == Ok(member)) || ring.pending(key).contains(&member)
        };
        let mut entries: Vec<(Bytes, Record)> = Vec::new();
        let mut bytes = 0usize;
        // Hints held for the requester ride along with the first part, as
        // many as fit in it, and stay until their own delivery is
        // acknowledged (this part may be lost); hinted hand-off resends
        // every hint until then, so the ones left out arrive too.
        if ask.cursor.is_empty() {
            for hint in self.hints.values().filter(|h| h.target == member) {
                if bytes >= SYNC_PART_BYTES {
                    break;
                }
                bytes += hint.key.len() + hint.record.value.as_ref().map_or(0, Bytes::len) + 32;
                entries.push((hint.key.clone(), hint.record.clone()));
            }
        }
        let next = self.store.scan_part(&ask.cursor, SYNC_PART_VISITS, &theirs, &mut |key, record| {
            bytes += key.len() + record.value.as_ref().map_or(0, Bytes::len) + 32;
            entries.push((key.clone(), record.clone()));
            bytes < SYNC_PART_BYTES
        });
        let cost = bytes as u64 + SYNC_VISIT_COST * SYNC_PART_VISITS.min(self.store.len()) as u64;
        self.streamed_bytes += bytes as u64;
        self.send(member, Message::SyncData { round: ask.round, cursor: ask.cursor, next, entries });
        cost
    }

    /// The next message to send, to whom, and the table epoch it was made
    /// under (sent along: see [`Replica::handle`]).
    pub fn poll_transmit(&mut self) -> Option<(NodeIx, u64, Message)> {
        self.outbox.pop_front()
    }

    /// The next answer to a client.
    pub fn poll_reply(&mut self) -> Option<Reply> {
        self.replies.pop_front()
    }

    /// When [`Replica::tick`] next has work.
    pub fn poll_timeout(&self) -> Option<u64> {
        let requests = self.pending.values().filter_map(|p| match p {
            Pending::Read { deadline, .. }
            | Pending::Write { deadline, .. }
            | Pending::Forward { deadline, .. }
            | Pending::Flush { deadline, .. } => Some(*deadline),
            Pending::Sizes(probe) => Some(probe.deadline),
            Pending::Batch(batch) => Some(batch.deadline),
            Pending::Hint { .. } => None,
        });
        let hints = self
            .hints
            .values()
            .filter(|h| self.alive.get(h.target as usize).copied().unwrap_or(false))
            .map(|h| h.next_try);
        let sync = self.resync.as_ref().map(|r| r.next_try.max(r.not_before));
        let streams = (!self.streams.is_empty()).then(|| self.bucket.ready_at(self.config.stream_bytes_per_sec));
        requests.chain(hints).chain(sync).chain(streams).min()
    }
}

mod batch;
mod sizes;
#[cfg(test)]
mod tests;
mod updates;

pub use batch::{BatchEntry, MAX_BATCH_KEYS};
pub use sizes::MAX_PROBE_KEYS;
pub use updates::MAX_STORE_WAIT_MS;
