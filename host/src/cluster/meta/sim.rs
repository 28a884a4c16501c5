//! A seeded simulator for the metadata log: several [`MetaNode`]s on one
//! thread, a network that delays, reorders, loses and cuts messages (both
//! ways or one way), members paused past the election timeout, crashed and
//! restarted with their synced log or with nothing (a new incarnation the
//! leader swaps in for the old). Everything comes from one seed, so a
//! failing schedule replays exactly:
//! `CACHET_META_SEED=N cargo test -p cachet --lib cluster::meta::sim::one_seed -- --nocapture`.
//!
//! Invariants, checked after every step:
//! - `one-leader-per-term`: no two members lead in the same term.
//! - `same-state-at-same-index`: members that applied the same index hold
//!   the same state (digest, compared at every fourth index).
//! - `applied-never-regresses`: a member's applied index never goes back,
//!   except by a crash.
//! - `slots-fully-owned`: every slot has `rf` owners, all of them members.
//! - `acknowledged-proposals-kept` (at the end): every proposal a member
//!   was told applied is in every member's state.
//! - `heals` (at the end): once the faults stop, one leader, every member
//!   at the same index, a new proposal applied within 3 s.

use super::entry::{MemberRecord, MemberState, MetaEntry, Settings, StoredModule};
use super::state::{MetaState, Outcome};
use super::storage::{Loaded, MemDurable, MetaStorage};
use super::wire::{RaftWire, WireConf, WireSnapshot};
use super::{MetaConfig, MetaEvent, MetaNode, raft_id};
use crate::cluster::replica::{Consistency, NodeIx};
use crate::cluster::sim::Rng;
use std::collections::{BTreeMap, BTreeSet, BinaryHeap};

/// A message in flight, ordered by delivery time then send order.
#[derive(PartialEq, Eq)]
struct Flight {
    at: u64,
    seq: u64,
    from: NodeIx,
    to: NodeIx,
    wire: RaftWire,
}

impl Ord for Flight {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        (other.at, other.seq).cmp(&(self.at, self.seq))
    }
}

impl PartialOrd for Flight {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

struct Member {
    meta: Option<MetaNode>,
    disk: MemDurable,
    generation: u32,
    paused_until: u64,
    down_until: u64,
    wiped: bool,
    last_applied: u64,
    digested: bool,
}

/// What one seed's run did.
#[derive(Debug, Default, Clone, Copy)]
pub(super) struct Tally {
    pub acknowledged: u64,
    pub abandoned: u64,
    pub elections: u64,
    pub crashes: u64,
    pub wipes: u64,
    pub rejoined: u64,
    pub pauses: u64,
    pub cuts: u64,
    pub delivered: u64,
    pub dropped: u64,
    pub snapshots_installed: u64,
}

struct Sim {
    seed: u64,
    rng: Rng,
    now: u64,
    step: u64,
    members: Vec<Member>,
    net: BinaryHeap<Flight>,
    seq: u64,
    loss: f64,
    cuts: BTreeSet<(NodeIx, NodeIx)>,
    cuts_until: u64,
    config: MetaConfig,
    leaders: BTreeMap<u64, NodeIx>,
    digests: BTreeMap<u64, u64>,
    acked: BTreeSet<String>,
    proposed: BTreeMap<(NodeIx, u64), String>,
    labels: u64,
    tally: Tally,
}

const RF: u32 = 3;

fn record(node: NodeIx, generation: u32) -> MemberRecord {
    MemberRecord {
        node,
        raft_id: raft_id(node, generation),
        peer: format!("127.0.0.{}:7000", node + 1).parse().unwrap_or_else(|_| ([127, 0, 0, 1], 7000).into()),
        client: format!("127.0.0.{}:8000", node + 1).parse().ok(),
        weight: 1,
        state: MemberState::Serving,
        reason: String::new(),
        since: 1,
    }
}

impl Sim {
    fn new(seed: u64, n: u32) -> Self {
        let config = MetaConfig { compact_every: 16, ..MetaConfig::default() };
        let founders: Vec<MemberRecord> = (0..n).map(|i| record(i, 0)).collect();
        let state = MetaState::founding(founders.clone(), Settings { rf: RF, consistency: Consistency::Quorum })
            .expect("a founding state");
        let snapshot = WireSnapshot {
            data: state.encode().into(),
            index: 1,
            term: 1,
            conf: WireConf { voters: founders.iter().map(|m| m.raft_id).collect(), ..WireConf::default() },
        };
        let members = (0..n)
            .map(|i| {
                let disk = MemDurable::default();
                let storage = MetaStorage::found(snapshot.clone(), Box::new(disk.clone())).expect("found");
                let meta =
                    MetaNode::new(i, raft_id(i, 0), storage, config.clone(), seed ^ u64::from(i) << 8, 1 << 40, 0)
                        .expect("a node");
                Member {
                    meta: Some(meta),
                    disk,
                    generation: 0,
                    paused_until: 0,
                    down_until: 0,
                    wiped: false,
                    last_applied: 1,
                    digested: false,
                }
            })
            .collect();
        Self {
            seed,
            rng: Rng(seed),
            now: 0,
            step: 0,
            members,
            net: BinaryHeap::new(),
            seq: 0,
            loss: 0.0,
            cuts: BTreeSet::new(),
            cuts_until: 0,
            config,
            leaders: BTreeMap::new(),
            digests: BTreeMap::new(),
            acked: BTreeSet::new(),
            proposed: BTreeMap::new(),
            labels: 0,
            tally: Tally::default(),
        }
    }

    fn violated(&self, invariant: &str, detail: String) -> ! {
        panic!(
            "invariant `{invariant}` violated at step {} (t={} ms) with seed {}: {detail}\n\
             replay: CACHET_META_SEED={} cargo test -p cachet --lib cluster::meta::sim::one_seed -- --nocapture",
            self.step, self.now, self.seed, self.seed
        )
    }

    fn live(&self, i: usize) -> bool {
        self.members[i].meta.is_some() && self.members[i].paused_until <= self.now
    }

    /// Sends what every member queued and takes in its events.
    fn flush(&mut self, i: usize) {
        let Some(meta) = self.members[i].meta.as_mut() else { return };
        let mut out = Vec::new();
        while let Some(m) = meta.poll_transmit() {
            out.push(m);
        }
        let mut events = Vec::new();
        while let Some(e) = meta.poll_event() {
            events.push(e);
        }
        for (to, wire) in out {
            let from = i as NodeIx;
            if self.cuts.contains(&(from, to)) || self.rng.chance(self.loss) || to as usize >= self.members.len() {
                self.tally.dropped += 1;
                continue;
            }
            let at = self.now + 1 + self.rng.below(15);
            if self.rng.chance(0.01) {
                // A duplicate, late.
                self.seq += 1;
                let late = at + self.rng.below(40);
                self.net.push(Flight { at: late, seq: self.seq, from, to, wire: wire.clone() });
            }
            self.seq += 1;
            self.net.push(Flight { at, seq: self.seq, from, to, wire });
        }
        for e in events {
            match e {
                MetaEvent::Decided { nonce, outcome: Outcome::Applied, .. } => {
                    if let Some(label) = self.proposed.remove(&(i as NodeIx, nonce)) {
                        self.acked.insert(label);
                        self.tally.acknowledged += 1;
                    }
                }
                MetaEvent::Decided { nonce, .. } | MetaEvent::Abandoned { nonce, .. } => {
                    if self.proposed.remove(&(i as NodeIx, nonce)).is_some() {
                        self.tally.abandoned += 1;
                    }
                }
                MetaEvent::Leader { .. } => self.tally.elections += 1,
                MetaEvent::Changed { .. } => {}
            }
        }
    }

    fn check(&mut self) {
        if let Some((invariant, detail)) = self.violation() {
            self.violated(invariant, detail);
        }
    }

    fn violation(&mut self) -> Option<(&'static str, String)> {
        for (i, m) in self.members.iter_mut().enumerate() {
            let Some(meta) = m.meta.as_ref() else { continue };
            if meta.is_leader()
                && let Some(other) = self.leaders.insert(meta.term(), i as NodeIx).filter(|o| *o != i as NodeIx)
            {
                let term = meta.term();
                return Some(("one-leader-per-term", format!("members {other} and {i} both led term {term}")));
            }
            let Some(state) = meta.state() else { continue };
            if state.applied < m.last_applied {
                let (was, now) = (m.last_applied, state.applied);
                return Some(("applied-never-regresses", format!("member {i} went from {was} to {now}")));
            }
            if state.applied == m.last_applied && m.digested {
                continue;
            }
            m.last_applied = state.applied;
            m.digested = true;
            // Every fourth index: encoding the state is most of the
            // simulator's cost, and a divergence persists past the index
            // where it begins.
            if state.applied % 4 != 0 {
                continue;
            }
            let digest = state.digest();
            if let Some(d) = self.digests.insert(state.applied, digest).filter(|d| *d != digest) {
                let at = state.applied;
                return Some((
                    "same-state-at-same-index",
                    format!("member {i} at index {at}: {digest:#x}, another {d:#x}"),
                ));
            }
            for r in state.slots.ranges() {
                if r.owners.len() != RF as usize {
                    return Some(("slots-fully-owned", format!("slots {}..={} have {:?}", r.start, r.end, r.owners)));
                }
                if let Some(o) = r.owners.iter().find(|o| !state.members.contains_key(o)) {
                    return Some(("slots-fully-owned", format!("slot owner {o} is not a member")));
                }
            }
        }
        None
    }

    fn propose_label(&mut self, i: usize) {
        if !self.live(i) {
            return;
        }
        self.labels += 1;
        let label = format!("m{}@1", self.labels);
        let entry = MetaEntry::ModuleStored(StoredModule {
            label: label.clone(),
            sha256: format!("{:x}", self.labels),
            size: 1,
            config: Vec::new(),
            fuel_per_call: 1,
            max_memory_bytes: 1,
        });
        let now = self.now;
        let Some(meta) = self.members[i].meta.as_mut() else { return };
        if let Ok(nonce) = meta.propose(now, entry) {
            self.proposed.insert((i as NodeIx, nonce), label);
        }
        self.flush(i);
    }

    fn restart(&mut self, i: usize) {
        let m = &mut self.members[i];
        let loaded = if m.wiped {
            m.generation += 1;
            if let Ok(mut d) = m.disk.0.lock() {
                *d = Default::default();
            }
            Loaded::default()
        } else {
            m.disk.load()
        };
        if let Ok(mut d) = m.disk.0.lock() {
            d.written = d.synced.clone();
        }
        let storage = match MetaStorage::open(loaded, Box::new(m.disk.clone())) {
            Ok(s) => s,
            Err(e) => self.violated("restarts", format!("member {i}'s log does not reopen: {e}")),
        };
        let seed = self.seed ^ (self.now << 16) ^ i as u64;
        match MetaNode::new(
            i as NodeIx,
            raft_id(i as NodeIx, m.generation),
            storage,
            self.config.clone(),
            seed,
            (1 << 40) + (self.now << 20),
            self.now,
        ) {
            Ok(meta) => {
                m.last_applied = meta.applied();
                m.digested = false;
                m.meta = Some(meta);
            }
            Err(e) => self.violated("restarts", format!("member {i} does not restart: {e}")),
        }
    }

    /// The operator's part for a wiped member: the leader removes the old
    /// incarnation and adds the new one, which catches up by snapshot.
    fn rejoin(&mut self) {
        let Some(l) = (0..self.members.len())
            .find(|&l| self.live(l) && self.members[l].meta.as_ref().is_some_and(MetaNode::is_leader))
        else {
            return;
        };
        for i in 0..self.members.len() {
            if !self.members[i].wiped || self.members[i].meta.is_none() {
                continue;
            }
            let want = raft_id(i as NodeIx, self.members[i].generation);
            let now = self.now;
            let generation = self.members[i].generation;
            let Some(leader) = self.members[l].meta.as_mut() else { return };
            let Some(rec) = leader.state().and_then(|s| s.members.get(&(i as NodeIx))).cloned() else { continue };
            let entry = if rec.raft_id == want {
                self.members[i].wiped = false;
                self.tally.rejoined += 1;
                continue;
            } else if rec.state != MemberState::Removed {
                MetaEntry::RemoveMember { node: i as NodeIx, raft_id: rec.raft_id }
            } else {
                MetaEntry::AddMember { member: record(i as NodeIx, generation), voter: true }
            };
            let _ = leader.propose(now, entry);
            self.flush(l);
        }
    }

    fn fault(&mut self) {
        let n = self.members.len();
        let i = self.rng.below(n as u64) as usize;
        let faulty = (0..n).filter(|&j| !self.live(j) || self.members[j].wiped).count();
        match self.rng.below(6) {
            0 if faulty < 2 => {
                self.members[i].meta = None;
                self.members[i].down_until = self.now + 200 + self.rng.below(3_000);
                self.tally.crashes += 1;
            }
            1 if faulty == 0 && self.rng.chance(0.5) => {
                self.members[i].meta = None;
                self.members[i].wiped = true;
                self.members[i].down_until = self.now + 200 + self.rng.below(1_000);
                self.tally.wipes += 1;
            }
            2 if faulty < 2 => {
                self.members[i].paused_until = self.now + 600 + self.rng.below(2_500);
                self.tally.pauses += 1;
            }
            3 => {
                // An asymmetric cut: some links one way only.
                self.cuts.clear();
                for _ in 0..1 + self.rng.below(4) {
                    let a = self.rng.below(n as u64) as NodeIx;
                    let b = self.rng.below(n as u64) as NodeIx;
                    if a != b {
                        self.cuts.insert((a, b));
                        if self.rng.chance(0.5) {
                            self.cuts.insert((b, a));
                        }
                    }
                }
                self.cuts_until = self.now + 300 + self.rng.below(3_000);
                self.tally.cuts += 1;
            }
            4 => {
                // A clean split: a minority cut off both ways.
                self.cuts.clear();
                let side: Vec<NodeIx> = (0..n as NodeIx).filter(|_| self.rng.chance(0.4)).collect();
                for &a in &side {
                    for b in (0..n as NodeIx).filter(|b| !side.contains(b)) {
                        self.cuts.insert((a, b));
                        self.cuts.insert((b, a));
                    }
                }
                self.cuts_until = self.now + 300 + self.rng.below(3_000);
                self.tally.cuts += 1;
            }
            _ => self.loss = [0.0, 0.02, 0.1][self.rng.below(3) as usize],
        }
    }

    /// Runs until `until`, with faults while `faults`.
    fn run(&mut self, until: u64, faults: bool, proposals: bool) {
        let mut next_fault = self.now + 500;
        let mut next_proposal = self.now + 50;
        let mut next_rejoin = self.now + 200;
        while self.now < until {
            self.step += 1;
            let mut next = until.min(next_rejoin);
            if proposals {
                next = next.min(next_proposal);
            }
            if faults {
                next = next.min(next_fault);
            }
            if let Some(f) = self.net.peek() {
                next = next.min(f.at);
            }
            for m in &self.members {
                if let Some(t) = m.meta.as_ref().and_then(MetaNode::poll_timeout) {
                    next = next.min(t.max(m.paused_until));
                }
                if m.meta.is_none() {
                    next = next.min(m.down_until);
                }
            }
            if self.cuts_until > self.now {
                next = next.min(self.cuts_until);
            }
            self.now = next.max(self.now);
            if self.cuts_until <= self.now {
                self.cuts.clear();
            }
            for i in 0..self.members.len() {
                if self.members[i].meta.is_none() && self.members[i].down_until <= self.now {
                    self.restart(i);
                }
            }
            while self.net.peek().is_some_and(|f| f.at <= self.now) {
                let Some(f) = self.net.pop() else { break };
                let to = f.to as usize;
                if self.members[to].meta.is_none() {
                    self.tally.dropped += 1;
                    continue;
                }
                if self.members[to].paused_until > self.now {
                    // Held by the paused process's socket until it resumes.
                    let at = self.members[to].paused_until;
                    self.net.push(Flight { at, ..f });
                    continue;
                }
                self.tally.delivered += 1;
                let now = self.now;
                if let Some(meta) = self.members[to].meta.as_mut() {
                    let _ = meta.handle(now, f.from, f.wire);
                    if meta.failed().is_some() {
                        let why = meta.failed().unwrap_or_default().to_string();
                        self.violated("no-failures", format!("member {to} stopped: {why}"));
                    }
                }
                self.flush(to);
            }
            for i in 0..self.members.len() {
                if !self.live(i) {
                    continue;
                }
                let now = self.now;
                if let Some(meta) = self.members[i].meta.as_mut()
                    && meta.poll_timeout().is_some_and(|t| t <= now)
                {
                    meta.tick(now);
                }
                self.flush(i);
            }
            if proposals && self.now >= next_proposal {
                let i = self.rng.below(self.members.len() as u64) as usize;
                self.propose_label(i);
                next_proposal = self.now + 20 + self.rng.below(200);
            }
            if self.now >= next_rejoin {
                self.rejoin();
                next_rejoin = self.now + 200;
            }
            if faults && self.now >= next_fault {
                self.fault();
                next_fault = self.now + 300 + self.rng.below(1_500);
            }
            self.check();
        }
    }

    /// Stops every fault, lets the cluster settle, and checks it healed.
    fn heal(&mut self) {
        self.loss = 0.0;
        self.cuts.clear();
        for m in &mut self.members {
            m.paused_until = m.paused_until.min(self.now);
            m.down_until = m.down_until.min(self.now);
        }
        let settle = self.now + 8_000;
        self.run(settle, false, false);
        let mut leaders = BTreeSet::new();
        let mut applied = BTreeSet::new();
        for (i, m) in self.members.iter().enumerate() {
            let Some(meta) = m.meta.as_ref() else { self.violated("heals", format!("member {i} is down")) };
            if m.wiped {
                self.violated("heals", format!("member {i} was not swapped in as a new incarnation"));
            }
            leaders.insert(meta.leader());
            applied.insert(meta.applied());
        }
        let views: Vec<_> = self
            .members
            .iter()
            .filter_map(|m| m.meta.as_ref())
            .map(|m| {
                (
                    m.me(),
                    m.raw.raft.id,
                    m.applied(),
                    m.leader(),
                    m.term(),
                    m.raw.raft.raft_log.committed,
                    m.raw.raft.raft_log.last_index(),
                    m.raw.raft.prs().conf().to_conf_state().voters,
                )
            })
            .collect();
        if leaders.len() != 1 || leaders.contains(&None) {
            self.violated("heals", format!("members see leaders {leaders:?}: {views:?}"));
        }
        if applied.len() != 1 {
            self.violated("heals", format!("members applied different indexes {applied:?} after 8 s: {views:?}"));
        }
        // Every member sees every acknowledged proposal.
        for (i, m) in self.members.iter().enumerate() {
            let Some(state) = m.meta.as_ref().and_then(MetaNode::state) else { continue };
            if let Some(lost) = self.acked.iter().find(|l| !state.modules.contains_key(*l)) {
                self.violated("acknowledged-proposals-kept", format!("member {i} lacks {lost}: {views:?}"));
            }
        }
        let before = self.tally.acknowledged;
        let proposer = self.rng.below(self.members.len() as u64) as usize;
        self.propose_label(proposer);
        let deadline = self.now + 3_000;
        self.run(deadline, false, false);
        if self.tally.acknowledged == before {
            self.violated(
                "heals",
                format!("a proposal through member {proposer} did not apply within 3 s ({applied:?})"),
            );
        }
    }
}

/// One seed: 5 members, 30 s of faults, then healing.
pub(super) fn run_seed(seed: u64) -> Tally {
    let mut sim = Sim::new(seed, 5);
    sim.run(30_000, true, true);
    sim.heal();
    let mut tally = sim.tally;
    tally.snapshots_installed =
        sim.members.iter().filter_map(|m| m.meta.as_ref()).map(|m| m.raw.store().snapshot_index()).sum();
    tally
}

#[test]
fn seeds() {
    // 500 in every `cargo test`; 10,000 with
    // `CACHET_META_SEEDS=10000 cargo test -p cachet --release --lib cluster::meta::sim::seeds`.
    let seeds: u64 = std::env::var("CACHET_META_SEEDS").ok().and_then(|s| s.parse().ok()).unwrap_or(500);
    let mut total = Tally::default();
    for seed in 1..=seeds {
        let t = run_seed(seed);
        total.acknowledged += t.acknowledged;
        total.abandoned += t.abandoned;
        total.elections += t.elections;
        total.crashes += t.crashes;
        total.wipes += t.wipes;
        total.rejoined += t.rejoined;
        total.pauses += t.pauses;
        total.cuts += t.cuts;
        total.dropped += t.dropped;
        total.delivered += t.delivered;
    }
    eprintln!("{seeds} seeds: {total:?}");
    // The faults happened, and the log still moved under them.
    assert!(total.crashes > seeds && total.pauses > seeds && total.cuts > seeds, "{total:?}");
    assert!(total.wipes > 0 && total.rejoined > 0, "{total:?}");
    assert!(total.acknowledged > seeds * 50, "{total:?}");
}

#[test]
fn one_seed() {
    let seed = std::env::var("CACHET_META_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or(1);
    let tally = run_seed(seed);
    eprintln!("seed {seed}: {tally:?}");
}
