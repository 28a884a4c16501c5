//! A deterministic simulator of the replication core: several replicas, a
//! network that loses, delays, duplicates and reorders messages, partitions
//! that cut a node off, crashes that wipe a node's memory, and clients
//! whose operations are checked by an oracle. Everything comes from one
//! seed, so a failing schedule replays exactly:
//!
//! `CACHET_SIM_SEED=N cargo test -p cachet --lib cluster::sim::replay -- --nocapture`
//!
//! Invariants, checked after every step:
//! - **no-invented-values**: every record a replica holds carries a value a
//!   client wrote to that key (or a deletion);
//! - **versions-agree**: two replicas holding the same version of a key
//!   hold the same value;
//! - **acked-writes-survive**: for every key, some running replica holds a
//!   version at least as new as the newest acknowledged QUORUM/ALL write;
//! - **quorum-reads-see-acked-writes** (the client oracle): a QUORUM/ALL
//!   read returns a version at least as new as every QUORUM/ALL write
//!   acknowledged before the read began;
//! - **writes-ordered-in-real-time** (the oracle too): a QUORUM/ALL write
//!   that began after another was acknowledged gets a higher version, so
//!   "the newest version" is "the latest acknowledged write";
//! - **moves-keep-acked-writes** (when a staged move finishes): every
//!   acknowledged QUORUM/ALL write is held by a quorum of its key's new
//!   owners, the members that streamed it as pending ones included.
//!
//! Batch keys (`{gN}a`, `{gN}b`, `{gN}c`: one hash tag, so one set of
//! owners) are written by batches ([`super::replica::BatchEntry`], an
//! MSET) and read one by one; each key of an acknowledged batch is held to
//! the write invariants above as if written alone.
//!
//! Counter keys take INCR (read-modify-writes run at the key's primary
//! owner, [`super::update`]) at QUORUM/ALL, and QUORUM reads:
//! - **increments-applied-once**: no two acknowledged increments of a key
//!   answered the same count (one lost the other's update);
//! - **no-invented-increments**: a count never exceeds the increments
//!   issued, and every counter record holds a decimal count;
//! - **acked-increments-visible**: a QUORUM read of a counter returns at
//!   least as many increments as were acknowledged before it began.
//!
//! The first and last hold strictly while membership is stable (message
//! loss, delay and duplication, no crashes, pauses or partitions:
//! `increments_are_applied_once_while_membership_is_stable`). Under faults
//! two members can each take themselves for a key's primary for a while
//! (their tables or failure detectors disagree), and then two increments
//! can read the same count: the fault schedules count those
//! (`duplicate_counts`) instead of failing, and bound how often they occur.
//! docs/decisions.md says which window this is and what closes it.
//!
//! Five nodes with RF=3, so keys have non-owners to hold hints for a down
//! owner. Owners come from a slot table, as the metadata log hands them
//! out: a fault never changes them by itself. A crash wipes a node; it
//! restarts with the table it had and re-syncs. A pause keeps a node's
//! memory but runs nothing. A partition cuts off one node or two. For
//! half the crashes and single-node partitions the log's leader moves the
//! node's slots to the others (as after `--replace-after-ms`), and back
//! once it returns, each move in two tables as the log makes them (the new
//! owners pending first, owners once every pending replica holds its
//! slots): each replica applies each new table at its own moment,
//! in the log's order (a node cut off or down applies it only once it is
//! back), so coordinators on an older table meet replicas on a newer one,
//! which epoch fencing must make harmless. The fault model is the one RF=3
//! with quorums is built for: at most one node crashed, cut off or
//! re-syncing at a time (a second fault waits until every node is back,
//! counted and on the latest table), a partition of two nodes moves no
//! slots (two of a slot's three owners replaced at once could take the
//! only copies of a write with them).

use super::replica::{BatchEntry, Consistency, Message, NodeIx, Op, OpError, Outcome, Replica, ReplicaConfig};
use super::update::{Effect, Update};
use super::version::Version;
use bytes::Bytes;
use cachet_proto::{Member, Ring};
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

const NODES: u32 = 5;
const KEYS: usize = 6;
/// Keys that only take increments.
const COUNTERS: u64 = 2;

/// SplitMix64: every simulator's one source of randomness, seeded.
pub(super) struct Rng(pub(super) u64);

impl Rng {
    pub(super) fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    pub(super) fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }

    pub(super) fn chance(&mut self, p: f64) -> bool {
        (self.next() >> 11) as f64 / ((1u64 << 53) as f64) < p
    }
}

/// What one seed's run did, for the suite's sanity checks.
#[derive(Default, Debug)]
pub(super) struct Tally {
    pub(super) acked_writes: u64,
    pub(super) failed_ops: u64,
    pub(super) checked_reads: u64,
    pub(super) crashes: u64,
    pub(super) partitions: u64,
    pub(super) dropped: u64,
    pub(super) hints: u64,
    pub(super) duplicated: u64,
    pub(super) ring_changes: u64,
    /// Staged moves finished: every pending member held its slots and the
    /// log made them owners.
    pub(super) moves_finished: u64,
    pub(super) rejoins: u64,
    pub(super) pauses: u64,
    pub(super) acked_increments: u64,
    pub(super) checked_counts: u64,
    /// Acknowledged increments that answered a count another acknowledged
    /// increment had answered (tolerated only under faults).
    pub(super) duplicate_counts: u64,
    /// Acknowledged batch writes (MSET).
    pub(super) acked_batches: u64,
}

struct Started {
    op: Op,
    consistency: Consistency,
    at: u64,
}

struct Sim {
    seed: u64,
    /// Whether faults (crashes, partitions, pauses) are injected.
    faults: bool,
    rng: Rng,
    now: u64,
    replicas: Vec<Replica>,
    up: Vec<bool>,
    /// A node cut off from the others until the given time.
    isolated: Option<(Vec<NodeIx>, u64)>,
    /// A crashed node and when it restarts.
    down: Option<(NodeIx, u64)>,
    /// The latest slot table the log holds, and tables still to reach a
    /// replica: (when, which replica, the table).
    latest: Arc<Ring>,
    ring_changes: Vec<(u64, usize, Arc<Ring>)>,
    /// The node whose slots the log moved away while it was faulted: they
    /// come back to it when it returns.
    moved: Option<NodeIx>,
    /// A move the log has staged (its latest table has pending members):
    /// the node it places no slots on, if any. The log finishes it once
    /// every pending member holds its slots.
    staging: Option<Option<NodeIx>>,
    /// A paused node (memory kept, nothing processed) and when it resumes.
    paused: Option<(NodeIx, u64)>,
    network: BTreeMap<(u64, u64), (NodeIx, NodeIx, u64, Message)>,
    seq: u64,
    started: HashMap<u64, Started>,
    next_op: u64,
    next_op_at: u64,
    ops_left: u64,
    next_fault_at: u64,
    /// Values written per key (for no-invented-values).
    written: HashMap<Bytes, Vec<Option<Bytes>>>,
    /// Acknowledged QUORUM/ALL writes per key: (version, ack time).
    acked: HashMap<Bytes, Vec<(Version, u64)>>,
    /// Increments issued per counter key.
    increments: HashMap<Bytes, u64>,
    /// Acknowledged increments per counter key: (count answered, ack time).
    counted: HashMap<Bytes, Vec<(i64, u64)>>,
    tally: Tally,
    step: u64,
    /// Print every event (`CACHET_SIM_TRACE=1`, for replays).
    trace: bool,
}

fn members() -> Vec<Member> {
    (0..NODES).map(|i| Member { id: i.to_string(), addr: format!("127.0.0.{}:7070", i + 1), weight: 1 }).collect()
}

fn key(i: u64) -> Bytes {
    Bytes::from(format!("k{i}"))
}

fn counter(i: u64) -> Bytes {
    Bytes::from(format!("c{i}"))
}

/// Batch groups written with `Op::PutMany`.
const GROUPS: u64 = 2;

fn group_keys(g: u64) -> Vec<Bytes> {
    ["a", "b", "c"].iter().map(|k| Bytes::from(format!("{{g{g}}}{k}"))).collect()
}

fn is_counter(key: &[u8]) -> bool {
    key.first() == Some(&b'c')
}

impl Sim {
    fn new(seed: u64, ops: u64) -> Self {
        let ring = Arc::new(Ring::balanced(members(), 3).unwrap_or_else(|e| panic!("ring: {e}")));
        let config = ReplicaConfig { rf: 3, request_timeout_ms: 400, retry_ms: 50, ..ReplicaConfig::default() };
        let mut rng = Rng(seed);
        let replicas = (0..NODES).map(|i| Replica::new(i, NODES, ring.clone(), config, rng.next())).collect();
        Self {
            seed,
            faults: true,
            rng,
            now: 0,
            replicas,
            up: vec![true; NODES as usize],
            isolated: None,
            down: None,
            latest: ring.clone(),
            ring_changes: Vec::new(),
            staging: None,
            moved: None,
            paused: None,
            network: BTreeMap::new(),
            seq: 0,
            started: HashMap::new(),
            next_op: 1,
            next_op_at: 0,
            ops_left: ops,
            next_fault_at: 200,
            written: HashMap::new(),
            acked: HashMap::new(),
            increments: HashMap::new(),
            counted: HashMap::new(),
            tally: Tally::default(),
            step: 0,
            trace: std::env::var_os("CACHET_SIM_TRACE").is_some(),
        }
    }

    fn fail(&self, invariant: &str, detail: String) -> ! {
        panic!(
            "invariant `{invariant}` violated at step {} (t={} ms) with seed {}: {detail}\n\
             replay: CACHET_SIM_SEED={} cargo test -p cachet --lib cluster::sim::replay -- --nocapture",
            self.step, self.now, self.seed, self.seed
        );
    }

    fn cut(&self, a: NodeIx, b: NodeIx) -> bool {
        matches!(&self.isolated, Some((cut, _)) if cut.contains(&a) != cut.contains(&b))
    }

    /// Moves every output of the running replicas onto the network (or to
    /// the oracle).
    /// Whether node `i` runs: up and not paused.
    fn runs(&self, i: usize) -> bool {
        self.up[i] && !matches!(self.paused, Some((n, _)) if n as usize == i)
    }

    fn drain(&mut self) {
        for i in 0..NODES as usize {
            if !self.runs(i) {
                continue;
            }
            while let Some((to, epoch, message)) = self.replicas[i].poll_transmit() {
                if matches!(message, Message::Put { hint_for: Some(_), .. }) {
                    self.tally.hints += 1;
                }
                if self.rng.chance(0.08) {
                    self.tally.dropped += 1;
                    continue;
                }
                let copies = if self.rng.chance(0.02) { 2 } else { 1 };
                self.tally.duplicated += copies - 1;
                for _ in 0..copies {
                    // A tail of slow messages outlives crashes and restarts.
                    let delay = if self.rng.chance(0.02) { 100 + self.rng.below(400) } else { 1 + self.rng.below(15) };
                    let at = self.now + delay;
                    self.seq += 1;
                    self.network.insert((at, self.seq), (i as NodeIx, to, epoch, message.clone()));
                }
            }
            while let Some(reply) = self.replicas[i].poll_reply() {
                self.complete(reply.client_req, reply.result);
            }
        }
    }

    fn complete(&mut self, op_id: u64, result: Result<Outcome, OpError>) {
        if self.trace {
            eprintln!("t={} op {op_id} -> {result:?}", self.now);
        }
        let Some(started) = self.started.remove(&op_id) else {
            self.fail("one-reply-per-op", format!("op {op_id} answered twice or never started"));
        };
        let strong = started.consistency != Consistency::One;
        match (started.op, result) {
            (Op::PutMany { entries }, Ok(Outcome::Written(version))) => {
                if strong {
                    for entry in entries {
                        self.acked_write(entry.key, version, started.at);
                    }
                    self.tally.acked_batches += 1;
                }
            }
            (Op::Put { key, .. }, Ok(Outcome::Written(version))) => {
                if strong {
                    self.acked_write(key, version, started.at);
                    self.tally.acked_writes += 1;
                }
            }
            (Op::Update { key, .. }, Ok(Outcome::Updated(effect))) => {
                let Effect::Integer(count) = effect else {
                    self.fail("reply-matches-op", format!("an increment of {key:?} answered {effect:?}"));
                };
                let issued = self.increments.get(&key).copied().unwrap_or(0);
                if count < 1 || count as u64 > issued {
                    self.fail("no-invented-increments", format!("{key:?} counted {count} of {issued} issued"));
                }
                let acked = self.counted.entry(key.clone()).or_default();
                if acked.iter().any(|&(c, _)| c == count) {
                    if !self.faults {
                        self.fail(
                            "increments-applied-once",
                            format!("two acknowledged increments of {key:?} both answered {count}"),
                        );
                    }
                    self.tally.duplicate_counts += 1;
                    if self.trace {
                        eprintln!("t={} DUPLICATE count {count} of {key:?} (op {op_id})", self.now);
                    }
                }
                acked.push((count, self.now));
                self.tally.acked_increments += 1;
            }
            (Op::Get { key }, Ok(Outcome::Read(record))) if is_counter(&key) => {
                let count = match record.as_ref().and_then(|r| r.value.as_ref()) {
                    None => 0,
                    Some(v) => std::str::from_utf8(v).ok().and_then(|s| s.parse::<i64>().ok()).unwrap_or_else(|| {
                        self.fail("no-invented-increments", format!("{key:?} holds {v:?}, not a count"))
                    }),
                };
                let before = self.counted.get(&key).into_iter().flatten().filter(|(_, at)| *at < started.at).count();
                // Under faults, each lost increment lowers the count by one.
                if strong && count as u64 + self.tally.duplicate_counts < before as u64 {
                    self.fail(
                        "acked-increments-visible",
                        format!("read of {key:?} begun at {} saw {count}; {before} increments were acked", started.at),
                    );
                }
                self.tally.checked_counts += 1;
            }
            (Op::Get { key }, Ok(Outcome::Read(record))) => {
                if !strong {
                    return;
                }
                let seen = record.as_ref().map(|r| r.version).unwrap_or_default();
                let newest_before = self
                    .acked
                    .get(&key)
                    .into_iter()
                    .flatten()
                    .filter(|(_, at)| *at < started.at)
                    .map(|(v, _)| *v)
                    .max();
                if let Some(newest) = newest_before
                    && seen < newest
                {
                    self.fail(
                        "quorum-reads-see-acked-writes",
                        format!("read of {key:?} begun at {} saw {seen:?}; {newest:?} was acked before", started.at),
                    );
                }
                self.tally.checked_reads += 1;
            }
            (_, Err(_)) => self.tally.failed_ops += 1,
            (op, result) => self.fail("reply-matches-op", format!("{op:?} got {result:?}")),
        }
    }

    /// A QUORUM/ALL write of `key` begun at `began`, acknowledged at
    /// `version`. A write that began after another was acknowledged must be
    /// ordered after it, or reads would return the older one as the latest.
    fn acked_write(&mut self, key: Bytes, version: Version, began: u64) {
        let earlier = self.acked.get(&key).into_iter().flatten().filter(|(_, at)| *at < began);
        if let Some((before, _)) = earlier.max_by_key(|(v, _)| *v)
            && *before >= version
        {
            self.fail(
                "writes-ordered-in-real-time",
                format!("write of {key:?} begun at {began} got {version:?}, below the acked {before:?}"),
            );
        }
        self.acked.entry(key).or_default().push((version, self.now));
    }

    fn check(&self) {
        let mut by_version: HashMap<(Bytes, Version), Option<Bytes>> = HashMap::new();
        for (i, replica) in self.replicas.iter().enumerate() {
            if !self.up[i] {
                continue;
            }
            for (key, record) in &replica.records() {
                if is_counter(key) {
                    let issued = self.increments.get(key).copied().unwrap_or(0);
                    let count = record.value.as_ref().and_then(|v| std::str::from_utf8(v).ok()?.parse::<u64>().ok());
                    if count.is_none_or(|c| c > issued) {
                        self.fail("no-invented-increments", format!("node {i} holds {key:?} = {:?}", record.value));
                    }
                    continue;
                }
                let known = self.written.get(key).is_some_and(|values| values.contains(&record.value));
                if !known {
                    self.fail("no-invented-values", format!("node {i} holds {key:?} = {:?}", record.value));
                }
                if let Some(other) = by_version.insert((key.clone(), record.version), record.value.clone())
                    && other != record.value
                {
                    self.fail(
                        "versions-agree",
                        format!("{key:?} {:?}: {other:?} vs {:?}", record.version, record.value),
                    );
                }
            }
        }
        for (key, acked) in &self.acked {
            let Some(newest) = acked.iter().map(|(v, _)| *v).max() else { continue };
            let held = self
                .replicas
                .iter()
                .enumerate()
                .any(|(i, r)| self.up[i] && r.record(key).is_some_and(|rec| rec.version >= newest));
            if !held {
                self.fail("acked-writes-survive", format!("no running replica holds {key:?} at {newest:?} or newer"));
            }
        }
    }

    fn issue_op(&mut self) {
        let live: Vec<usize> = (0..NODES as usize).filter(|&i| self.runs(i)).collect();
        let coordinator = live[self.rng.below(live.len() as u64) as usize];
        let k = key(self.rng.below(KEYS as u64));
        let consistency = match self.rng.below(10) {
            0 => Consistency::One,
            1 => Consistency::All,
            _ => Consistency::Quorum,
        };
        let op_id = self.next_op;
        self.next_op += 1;
        let op = if self.rng.chance(0.1) {
            let tag = op_id;
            let entries: Vec<BatchEntry> = group_keys(self.rng.below(GROUPS))
                .into_iter()
                .map(|key| {
                    let value = Some(Bytes::from(format!("b{tag}")));
                    self.written.entry(key.clone()).or_default().push(value.clone());
                    BatchEntry { key, value, expires_at: None, hint: 0 }
                })
                .collect();
            Op::PutMany { entries }
        } else if self.rng.chance(0.1) {
            Op::Get { key: group_keys(self.rng.below(GROUPS))[self.rng.below(3) as usize].clone() }
        } else if self.rng.chance(0.25) {
            // A counter: increments at QUORUM or ALL, reads at QUORUM.
            let c = counter(self.rng.below(COUNTERS));
            if self.rng.chance(0.8) {
                let consistency = if self.rng.chance(0.8) { Consistency::Quorum } else { Consistency::All };
                *self.increments.entry(c.clone()).or_default() += 1;
                let op = Op::Update { key: c, update: Update::Incr(1) };
                self.start(coordinator, op_id, op, consistency);
            } else {
                self.start(coordinator, op_id, Op::Get { key: c }, Consistency::Quorum);
            }
            return;
        } else if self.rng.chance(0.55) {
            let value = if self.rng.chance(0.1) { None } else { Some(Bytes::from(format!("v{op_id}"))) };
            self.written.entry(k.clone()).or_default().push(value.clone());
            Op::Put { key: k, value, expires_at: None, hint: 0 }
        } else {
            Op::Get { key: k }
        };
        self.start(coordinator, op_id, op, consistency);
    }

    fn start(&mut self, coordinator: usize, op_id: u64, op: Op, consistency: Consistency) {
        if self.trace {
            eprintln!("t={} op {op_id} at node {coordinator}: {op:?} {consistency:?}", self.now);
        }
        self.started.insert(op_id, Started { op: op.clone(), consistency, at: self.now });
        self.replicas[coordinator].client(self.now, op_id, op, consistency);
    }

    /// Schedules `ring` to reach every replica but `except`, each at its
    /// own moment, after any change still on its way to it.
    /// The log applies `ring` on every replica but `except`, each at its
    /// own moment and after the tables before it.
    fn spread_ring(&mut self, except: &[NodeIx], ring: &Arc<Ring>) {
        for i in 0..NODES as usize {
            if !except.contains(&(i as NodeIx)) {
                self.apply_later(i, ring);
            }
        }
    }

    fn apply_later(&mut self, i: usize, ring: &Arc<Ring>) {
        let after = self.ring_changes.iter().filter(|c| c.1 == i).map(|c| c.0).max().unwrap_or(self.now);
        let at = after.max(self.now) + 1 + self.rng.below(80);
        self.ring_changes.push((at, i, ring.clone()));
    }

    /// The log's leader plans the next table: slots on every node but
    /// `without`, staged first as the log does (the new owners pending)
    /// unless nothing is gained; [`Sim::finish_move`] makes the pending
    /// members owners once they hold their slots.
    fn plan(&mut self, without: Option<NodeIx>) -> Arc<Ring> {
        self.plan_step(without, false)
    }

    fn plan_step(&mut self, without: Option<NodeIx>, finish: bool) -> Arc<Ring> {
        let placing: Vec<(u32, u32)> = (0..NODES).filter(|&n| Some(n) != without).map(|n| (n, 1)).collect();
        let target = self.latest.table().plan(&placing, 3).unwrap_or_else(|e| panic!("plan: {e}"));
        let staged = self.latest.table().staged(&target).unwrap_or_else(|e| panic!("staged: {e}"));
        let table = if staged.has_pending() && !finish {
            self.staging = Some(without);
            staged
        } else {
            self.staging = None;
            target
        };
        let ring = Arc::new(Ring::new(members(), table).unwrap_or_else(|e| panic!("ring: {e}")));
        self.tally.ring_changes += 1;
        self.latest = ring.clone();
        ring
    }

    /// The log's second step of a staged move: once every pending member
    /// that runs holds its slots on the latest table, the target.
    fn finish_move(&mut self) {
        let Some(without) = self.staging else { return };
        let epoch = self.latest.epoch();
        let pending = self.latest.table().pending_members();
        let held = pending.iter().all(|&p| self.replicas[p as usize].holds_pending() == Some(epoch));
        if !held {
            return;
        }
        if self.trace {
            eprintln!("t={} the log makes {pending:?} owners", self.now);
        }
        self.tally.moves_finished += 1;
        let ring = self.plan_step(without, true);
        // The move is safe to finish: every write acknowledged at QUORUM
        // or ALL is held (at its version or newer) by a quorum of the new
        // owners of its key, pending members' streams included.
        for (key, acks) in &self.acked {
            let Some(&(version, _)) = acks.iter().max_by_key(|a| a.0) else { continue };
            let owners: Vec<NodeIx> = ring.owners(key, 3).iter().filter_map(|m| m.id.parse().ok()).collect();
            let holding = owners
                .iter()
                .filter(|&&o| self.replicas[o as usize].record(key).is_some_and(|r| r.version >= version))
                .count();
            if holding < Consistency::Quorum.required(owners.len()) {
                self.fail(
                    "moves-keep-acked-writes",
                    format!("{key:?} at {version:?} is on {holding} of the new owners {owners:?}"),
                );
            }
        }
        // A node still away applies it when back, as with the first step.
        let except: Vec<NodeIx> = self.moved.into_iter().collect();
        self.spread_ring(&except, &ring);
    }

    /// The log moves `node`'s slots to the others (it is faulted: it
    /// applies the table only once back).
    fn move_away(&mut self, node: NodeIx) {
        if self.trace {
            eprintln!("t={} the log moves node {node}'s slots away", self.now);
        }
        self.moved = Some(node);
        let ring = self.plan(Some(node));
        self.spread_ring(&[node], &ring);
    }

    /// `node` is back: it catches up with the log, and the log gives it
    /// slots again if they were moved.
    fn back(&mut self, node: NodeIx) {
        if self.replicas[node as usize].epoch() < self.latest.epoch() {
            let latest = self.latest.clone();
            self.apply_later(node as usize, &latest);
        }
        if self.moved.take().is_some() {
            self.tally.rejoins += 1;
            let ring = self.plan(None);
            self.spread_ring(&[], &ring);
        }
    }

    fn fault(&mut self) {
        let all_counted = self.replicas.iter().all(Replica::counted);
        let busy = self.down.is_some() || self.isolated.is_some() || self.paused.is_some() || self.moved.is_some();
        let latest = self.replicas.iter().all(|r| r.epoch() == self.latest.epoch());
        if busy || !all_counted || !self.ring_changes.is_empty() || !latest {
            return;
        }
        let node = self.rng.below(u64::from(NODES)) as NodeIx;
        if self.trace {
            eprintln!("t={} fault on node {node}", self.now);
        }
        if self.rng.chance(0.2) {
            // Paused, perhaps long enough to be declared down; it notices
            // nothing until it resumes.
            self.tally.pauses += 1;
            self.paused = Some((node, self.now + 100 + self.rng.below(200)));
            for (i, replica) in self.replicas.iter_mut().enumerate() {
                if i != node as usize {
                    replica.set_alive(self.now, node, false);
                }
            }
        } else if self.rng.chance(0.5) {
            self.tally.crashes += 1;
            self.up[node as usize] = false;
            self.down = Some((node, self.now + 20 + self.rng.below(200)));
            for (i, replica) in self.replicas.iter_mut().enumerate() {
                if i != node as usize {
                    replica.set_alive(self.now, node, false);
                }
            }
            if self.rng.chance(0.5) {
                self.move_away(node);
            }
        } else {
            self.tally.partitions += 1;
            // One node cut off, or two (a minority that still talks to
            // itself).
            let mut cut = vec![node];
            if self.rng.chance(0.3) {
                cut.push((node + 1 + self.rng.below(u64::from(NODES) - 1) as NodeIx) % NODES);
            }
            self.isolated = Some((cut.clone(), self.now + 20 + self.rng.below(200)));
            // The cut-off side stops hearing from the log's leader; past
            // the lease its copies count for nothing, and only then may the
            // leader move its slots.
            for &n in &cut {
                self.replicas[n as usize].set_in_contact(false);
            }
            if cut.len() == 1 && self.rng.chance(0.5) {
                self.move_away(node);
            }
        }
    }

    /// A paused node resumes: the others see it up again.
    fn resume(&mut self, node: NodeIx) {
        if self.trace {
            eprintln!("t={} node {node} resumes", self.now);
        }
        self.paused = None;
        for i in 0..NODES as usize {
            if i != node as usize {
                self.replicas[i].set_alive(self.now, node, true);
            }
        }
    }

    /// A partition ends.
    fn heal(&mut self, nodes: &[NodeIx]) {
        self.isolated = None;
        if self.trace {
            eprintln!("t={} nodes {nodes:?} reconnect", self.now);
        }
        for &n in nodes {
            self.replicas[n as usize].set_in_contact(true);
            self.back(n);
        }
    }

    fn restart(&mut self, node: NodeIx) {
        if self.trace {
            eprintln!("t={} restart node {node}", self.now);
        }
        self.down = None;
        self.up[node as usize] = true;
        let boot = self.rng.next();
        // It comes back with the table it had (its log on disk), empty.
        self.replicas[node as usize].restart(self.now, boot);
        for (i, replica) in self.replicas.iter_mut().enumerate() {
            if i != node as usize {
                replica.set_alive(self.now, node, true);
            }
        }
        self.back(node);
    }

    /// Runs until every op is issued and answered (or lost with a crashed
    /// coordinator) and the network is quiet.
    fn run(mut self) -> Tally {
        let limit = 2_000_000u64;
        loop {
            self.step += 1;
            if self.step > limit {
                self.fail("terminates", "the simulation did not settle".into());
            }
            let deliveries = self.network.keys().next().map(|&(at, _)| at);
            let timeouts =
                (0..NODES as usize).filter(|&i| self.runs(i)).filter_map(|i| self.replicas[i].poll_timeout()).min();
            let resume = self.paused.map(|(_, at)| at);
            let op = (self.ops_left > 0).then_some(self.next_op_at);
            let fault = (self.faults && self.ops_left > 0).then_some(self.next_fault_at);
            let restart = self.down.map(|(_, at)| at);
            let heal = self.isolated.as_ref().map(|(_, at)| *at);
            let ring = self.ring_changes.iter().map(|c| c.0).min();
            let Some(next) = [deliveries, timeouts, op, fault, restart, heal, ring, resume].into_iter().flatten().min()
            else {
                break;
            };
            self.now = self.now.max(next);
            let now = self.now;
            let (due, later): (Vec<_>, Vec<_>) =
                std::mem::take(&mut self.ring_changes).into_iter().partition(|c| c.0 <= now);
            self.ring_changes = later;
            for (_, i, ring) in due {
                if self.trace {
                    eprintln!("t={now} node {i} applies table {}", ring.epoch());
                }
                // A crashed or cut-off replica catches up once back.
                let cut_off = self.isolated.as_ref().is_some_and(|(cut, _)| cut.contains(&(i as NodeIx)));
                if self.up[i] && !cut_off {
                    self.replicas[i].set_ring(now, ring);
                }
            }
            if let Some((node, at)) = self.down
                && at <= self.now
            {
                self.restart(node);
            }
            if let Some((nodes, at)) = self.isolated.clone()
                && at <= self.now
            {
                self.heal(&nodes);
            }
            if let Some((node, at)) = self.paused
                && at <= self.now
            {
                self.resume(node);
            }
            if self.faults && self.ops_left > 0 && self.next_fault_at <= self.now {
                self.fault();
                self.next_fault_at = self.now + 10 + self.rng.below(150);
            }
            if self.ops_left > 0 && self.next_op_at <= self.now {
                self.issue_op();
                self.ops_left -= 1;
                self.next_op_at = self.now + self.rng.below(6);
            }
            while let Some((&(at, seq), _)) = self.network.iter().next() {
                if at > self.now {
                    break;
                }
                let Some((from, to, epoch, message)) = self.network.remove(&(at, seq)) else { break };
                if self.trace {
                    eprintln!("t={} {from}->{to} @{epoch} {message:?}", self.now);
                }
                // Messages already sent arrive even if their sender has
                // crashed since (and may reach it in a later life).
                if self.runs(to as usize) && !self.cut(from, to) {
                    if let Err(err) = self.replicas[to as usize].handle(self.now, from, epoch, message) {
                        panic!("t={} an honest message {from}->{to} was refused: {err}", self.now);
                    }
                } else {
                    self.tally.dropped += 1;
                }
            }
            for i in 0..NODES as usize {
                if self.runs(i) && self.replicas[i].poll_timeout().is_some_and(|t| t <= self.now) {
                    self.replicas[i].tick(self.now);
                }
            }
            self.drain();
            self.check();
            self.finish_move();
        }
        // Unanswered ops are the ones lost with a crashed coordinator.
        self.tally.failed_ops += self.started.len() as u64;
        self.tally
    }
}

pub(super) fn run_seed(seed: u64, ops: u64) -> Tally {
    Sim::new(seed, ops).run()
}

/// With stable membership (loss, delay and duplication only), every key
/// has one primary, and no acknowledged increment is lost or applied twice.
#[test]
fn increments_are_applied_once_while_membership_is_stable() {
    let mut acked = 0;
    for seed in 1..=100 {
        let mut sim = Sim::new(seed, 400);
        sim.faults = false;
        let t = sim.run();
        assert_eq!(t.duplicate_counts, 0);
        acked += t.acked_increments;
    }
    // 100 seeds x 400 operations, a fifth of them increments.
    assert!(acked >= 3_000, "{acked} increments acknowledged");
}

/// 500 fault schedules in every `cargo test`; 10,000 with
/// `CACHET_SIM_SEEDS=10000 cargo test -p cachet --release --lib cluster::sim::fault_schedules`.
#[test]
fn fault_schedules_keep_every_invariant() {
    let seeds: u64 = std::env::var("CACHET_SIM_SEEDS").ok().and_then(|s| s.parse().ok()).unwrap_or(500);
    // The thresholds below were set for 200 schedules; they scale.
    let per = |n: u64| n * seeds / 200;
    let mut total = Tally::default();
    for seed in 1..=seeds {
        let t = run_seed(seed, 400);
        total.acked_writes += t.acked_writes;
        total.failed_ops += t.failed_ops;
        total.checked_reads += t.checked_reads;
        total.crashes += t.crashes;
        total.partitions += t.partitions;
        total.dropped += t.dropped;
        total.duplicated += t.duplicated;
        total.hints += t.hints;
        total.ring_changes += t.ring_changes;
        total.moves_finished += t.moves_finished;
        total.rejoins += t.rejoins;
        total.pauses += t.pauses;
        total.acked_increments += t.acked_increments;
        total.checked_counts += t.checked_counts;
        total.duplicate_counts += t.duplicate_counts;
        total.acked_batches += t.acked_batches;
    }
    eprintln!("{seeds} seeds: {total:?}");
    // The schedules really exercised the faults and the oracle.
    assert!(total.crashes >= per(100) && total.partitions >= per(100), "{total:?}");
    assert!(total.dropped >= per(1_000) && total.duplicated >= per(500), "{total:?}");
    assert!(total.hints >= per(100), "hinted hand-off was never exercised: {total:?}");
    assert!(total.ring_changes >= per(100), "the log rarely moved slots: {total:?}");
    // Most staged moves are given up: the faulted node is back before
    // the streams are done (106 of 1,124 table changes finished one over
    // 500 schedules).
    assert!(total.moves_finished >= per(30), "staged moves rarely finished: {total:?}");
    assert!(total.rejoins >= per(50), "slots rarely came back to a returning node: {total:?}");
    assert!(total.pauses >= per(50), "{total:?}");
    assert!(total.acked_writes >= per(14_000) && total.checked_reads >= per(10_000), "{total:?}");
    assert!(total.acked_increments >= per(3_500) && total.checked_counts >= per(2_000), "{total:?}");
    assert!(total.acked_batches >= per(2_000), "batch writes were rarely acknowledged: {total:?}");
    // The window where two members take themselves for a key's primary
    // (docs/decisions.md): measured at 11 duplicate counts of 4,200
    // acknowledged increments over the first 200 schedules (0.26%) with
    // placement on the log's table and a primary handing back its queue
    // when it stops being one (0.43% under the old serving rings, 2.3%
    // on the log's table before the hand-back).
    assert!(total.duplicate_counts * 100 < total.acked_increments, "{total:?}");
    // Faults are frequent (one every ~85 ms, 8% loss), so many operations
    // time out; most still succeed.
    assert!(total.failed_ops * 2 < seeds * 400, "most operations succeed: {total:?}");
}

/// Schedules that once broke an invariant, at the length they broke it
/// with (they are beyond the 500 of every run).
#[test]
fn schedules_that_once_failed_pass() {
    // 851: a member that took itself for a counter's primary (it saw the
    // real one down) wrote an increment computed from a read made 300 ms
    // earlier over five newer ones: its write now finds the key written
    // since its read and runs the update again (`OpError::Conflict`).
    // 1550: a member back from a partition, in touch with the log again
    // but two tables behind, answered a QUORUM read from a newer table as
    // counting, with a copy that had missed the last write: members count
    // for each other only on the same table now.
    // 6989: the same, with the newer writes reaching the member while a
    // query reply from before them sat 350 ms in the network: the
    // coordinator's own copy now counts as it is when the query ends.
    for seed in [851, 1550, 6989] {
        let tally = run_seed(seed, 2_000);
        assert!(tally.acked_increments > 0, "seed {seed}: {tally:?}");
    }
}

/// Replays `CACHET_SIM_SEED` (default 1) with more operations.
#[test]
fn replay() {
    let seed = std::env::var("CACHET_SIM_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or(1);
    let tally = run_seed(seed, 2_000);
    eprintln!("seed {seed}: {tally:?}");
    assert!(tally.acked_writes > 0);
}
