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
//! - `starts-on-the-active-module`: a (re)started member starts serving
//!   only once it has applied every entry committed before it started and
//!   runs the module the log names for it (unless it waited
//!   [`POLICY_WAIT_MS`](crate::cluster::policy::POLICY_WAIT_MS) for bytes no member it can reach holds: counted).
//! - `serving-members-run-the-active-module` (at the end): every member
//!   serves, runs the module the log names for it and shadows the log's,
//!   including one activated through a random member after the faults.
//!
//! Each member follows the log's policy entries (stored modules,
//! activate, rollback, shadow, canaries, quarantine) with the runtime's own
//! [`PolicyFollower`] and [`StartGate`], against a host whose swaps and
//! installs take a few milliseconds, fetching module bytes from its peers
//! over the same faulty network; a crash keeps the modules a member holds,
//! a wipe loses them.

use super::entry::{MemberRecord, MemberState, MetaEntry, Settings, StoredModule};
use super::state::{MetaState, Outcome};
use super::storage::{Loaded, MemDurable, MetaStorage};
use super::wire::{RaftWire, WireConf, WireSnapshot};
use super::{MetaConfig, MetaEvent, MetaNode, raft_id};
use crate::cluster::policy::{Gate, PolicyFollower, PolicyStep, StartGate, Target};
use crate::cluster::replica::{Consistency, NodeIx};
use crate::cluster::sim::Rng;
use std::collections::{BTreeMap, BTreeSet, BinaryHeap};

/// What travels between members: the log's messages, and policy modules
/// asked for and sent (by hash; the bytes are not modelled).
#[derive(Clone, Debug, PartialEq, Eq)]
enum Wire {
    Raft(Box<RaftWire>),
    Want(String),
    Module(String),
}

/// A message in flight, ordered by delivery time then send order.
#[derive(PartialEq, Eq)]
struct Flight {
    at: u64,
    seq: u64,
    from: NodeIx,
    to: NodeIx,
    wire: Wire,
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

/// A swap or an install the host is busy with, and when it finishes.
enum HostOp {
    Apply(Target, u64),
    Install(String),
}

/// A member's node as the policy follower sees it.
#[derive(Default)]
struct Host {
    /// Module hashes in its registry (kept across a crash, lost in a wipe).
    modules: BTreeSet<String>,
    /// What it runs.
    running: Target,
    /// Operations in progress, with when they finish.
    ops: Vec<(u64, HostOp)>,
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
    host: Host,
    follower: PolicyFollower,
    gate: StartGate,
    serving: bool,
    /// The highest index any member had applied when this one restarted:
    /// it may serve only once it has applied as far.
    floor: u64,
    /// When its policy side runs next (at once after a log change, a
    /// finished host operation or a module message; else every 100 ms, as
    /// the runtime's tick).
    policy_due: u64,
    /// The log index its policy side last ran at.
    policy_seen: u64,
}

impl Member {
    /// The process stops: what it ran and was doing goes; its registry
    /// stays unless the data directory is wiped.
    fn crash(&mut self, wipe: bool) {
        self.meta = None;
        self.host.running = (None, None);
        self.host.ops.clear();
        if wipe {
            self.host.modules.clear();
        }
        self.follower = PolicyFollower::default();
        self.gate = StartGate::default();
        self.serving = false;
        self.policy_due = 0;
        self.policy_seen = 0;
    }
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
    pub policy_proposals: u64,
    pub applies: u64,
    pub fetched: u64,
    pub starts: u64,
    pub started_without_policy: u64,
    pub bytes_nowhere: u64,
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
        resp: None,
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
                    host: Host::default(),
                    follower: PolicyFollower::default(),
                    gate: StartGate::default(),
                    serving: false,
                    floor: 0,
                    policy_due: 0,
                    policy_seen: 0,
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
            self.send(i as NodeIx, to, Wire::Raft(Box::new(wire)));
        }
        for e in events {
            match e {
                MetaEvent::Decided { nonce, outcome, .. }
                    if self.members[i].gate.decided(nonce, outcome == Outcome::Applied) => {}
                MetaEvent::Abandoned { nonce, .. } if self.members[i].gate.decided(nonce, false) => {}
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

    /// Puts a message on the network (or loses it, or duplicates it).
    fn send(&mut self, from: NodeIx, to: NodeIx, wire: Wire) {
        if self.cuts.contains(&(from, to)) || self.rng.chance(self.loss) || to as usize >= self.members.len() {
            self.tally.dropped += 1;
            return;
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

    /// A member's policy side: finished host operations reported, the
    /// start-up gate, and the follower's next steps.
    fn follow_policy(&mut self, i: usize) {
        if !self.live(i) {
            return;
        }
        let now = self.now;
        let m = &mut self.members[i];
        let applied = m.meta.as_ref().map_or(0, MetaNode::applied);
        let finished = m.host.ops.iter().any(|(at, _)| *at <= now);
        if !finished && applied == m.policy_seen && now < m.policy_due {
            return;
        }
        m.policy_seen = applied;
        m.policy_due = now + 100;
        let (done, ops): (Vec<_>, Vec<_>) = std::mem::take(&mut m.host.ops).into_iter().partition(|(at, _)| *at <= now);
        m.host.ops = ops;
        for (_, op) in done {
            match op {
                HostOp::Apply(target, index) => {
                    m.host.running = target.clone();
                    m.follower.applied(target, index, &Ok(String::new()));
                    self.tally.applies += 1;
                }
                HostOp::Install(sha) => {
                    m.host.modules.insert(sha.clone());
                    m.follower.installed(&sha, &Ok(String::new()));
                    self.tally.fetched += 1;
                }
            }
        }
        let me = i as NodeIx;
        let Some(meta) = m.meta.as_mut() else { return };
        let Some(state) = meta.state() else { return };
        let modules = &m.host.modules;
        let steps = m.follower.reconcile(me, now, state, &|sha| modules.contains(sha));
        let mut broken = None;
        if !m.serving {
            let ready = m.follower.ready(me, state);
            let (applied, wanted) = (state.applied, state.policy_for(me).cloned());
            match m.gate.poll(now, ready) {
                Gate::Propose => {
                    if let Ok(nonce) = meta.propose(now, MetaEntry::Noop) {
                        m.gate.proposed(nonce);
                    }
                }
                Gate::Wait => {}
                Gate::Serve => {
                    m.serving = true;
                    self.tally.starts += 1;
                    if applied < m.floor {
                        let floor = m.floor;
                        broken = Some(format!(
                            "member {i} serves at index {applied}, before {floor} committed before it started"
                        ));
                    } else if m.host.running.0 != wanted {
                        let runs = m.host.running.0.clone();
                        broken = Some(format!("member {i} serves running {runs:?}; the log names {wanted:?}"));
                    }
                }
                Gate::ServeWithoutPolicy => {
                    m.serving = true;
                    self.tally.starts += 1;
                    self.tally.started_without_policy += 1;
                }
            }
        }
        if let Some(detail) = broken {
            self.violated("starts-on-the-active-module", detail);
        }
        for step in steps {
            match step {
                PolicyStep::Want { sha256, from } => {
                    for to in from {
                        self.send(me, to, Wire::Want(sha256.clone()));
                    }
                }
                PolicyStep::Apply { target, index } => {
                    let at = now + 1 + self.rng.below(30);
                    self.members[i].host.ops.push((at, HostOp::Apply(target, index)));
                }
            }
        }
        self.flush(i);
    }

    /// A policy message arrives at member `to`.
    fn module_message(&mut self, from: NodeIx, to: usize, wire: Wire) {
        let m = &mut self.members[to];
        m.policy_due = self.now;
        let Some(state) = m.meta.as_ref().and_then(MetaNode::state) else { return };
        match wire {
            Wire::Want(sha) => {
                if PolicyFollower::shares(state, &sha) && m.host.modules.contains(&sha) {
                    self.send(to as NodeIx, from, Wire::Module(sha));
                }
            }
            Wire::Module(sha) => {
                if m.follower.offered(state, &sha).is_some() {
                    let at = self.now + 1 + self.rng.below(30);
                    m.host.ops.push((at, HostOp::Install(sha)));
                }
            }
            Wire::Raft(_) => {}
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
        // As `cachet policy load` does, the member stores the module in its
        // own registry before it proposes it.
        let sha256 = format!("{:x}", self.labels);
        self.members[i].host.modules.insert(sha256.clone());
        let entry = MetaEntry::ModuleStored(StoredModule {
            label: label.clone(),
            sha256,
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

    /// A policy operation through member `i`: activate, roll back, shadow,
    /// a canary started or decided, a quarantine.
    fn propose_policy(&mut self, i: usize) {
        if !self.live(i) {
            return;
        }
        let Some(state) = self.members[i].meta.as_ref().and_then(MetaNode::state) else { return };
        let labels: Vec<String> = state.modules.keys().cloned().collect();
        let canary = state.canary.as_ref().map(|c| c.policy.label.clone());
        if labels.is_empty() {
            return;
        }
        let label = labels[self.rng.below(labels.len() as u64) as usize].clone();
        let entry = match self.rng.below(20) {
            0..=8 => MetaEntry::Activate { label, config: None, bundled: false },
            9..=10 => MetaEntry::Rollback,
            11..=12 => MetaEntry::Shadow { label: self.rng.chance(0.7).then_some(label) },
            13..=15 => MetaEntry::CanaryStart {
                label,
                config: None,
                bundled: false,
                members: 1 + self.rng.below(2) as u32,
                window_ms: 1_000,
            },
            16..=18 => match canary {
                Some(label) => MetaEntry::CanaryDecided { label, rolled_out: self.rng.chance(0.5), why: String::new() },
                None => MetaEntry::Activate { label, config: None, bundled: false },
            },
            _ => MetaEntry::Quarantine { label, reason: "simulated fault".into() },
        };
        self.tally.policy_proposals += 1;
        let now = self.now;
        if let Some(meta) = self.members[i].meta.as_mut() {
            let _ = meta.propose(now, entry);
        }
        self.flush(i);
    }

    fn restart(&mut self, i: usize) {
        let floor = self.members.iter().filter_map(|m| m.meta.as_ref()).map(MetaNode::applied).max().unwrap_or(0);
        let m = &mut self.members[i];
        m.floor = floor;
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
                self.members[i].crash(false);
                self.members[i].down_until = self.now + 200 + self.rng.below(3_000);
                self.tally.crashes += 1;
            }
            1 if faulty == 0 && self.rng.chance(0.5) => {
                self.members[i].crash(true);
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
                for (at, _) in &m.host.ops {
                    next = next.min((*at).max(m.paused_until));
                }
                if m.meta.is_some() {
                    next = next.min(m.policy_due.max(m.paused_until));
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
                let wire = match f.wire {
                    Wire::Raft(wire) => *wire,
                    other => {
                        self.module_message(f.from, to, other);
                        continue;
                    }
                };
                if let Some(meta) = self.members[to].meta.as_mut() {
                    let _ = meta.handle(now, f.from, wire);
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
            for i in 0..self.members.len() {
                self.follow_policy(i);
            }
            if proposals && self.now >= next_proposal {
                let i = self.rng.below(self.members.len() as u64) as usize;
                if self.rng.chance(0.5) {
                    self.propose_label(i);
                } else {
                    self.propose_policy(i);
                }
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
        self.activate_everywhere();
    }

    /// One `activate` of the module just stored, through a random member
    /// (after the running canary, if any, is rolled back): within 5 s every
    /// member serves, runs the module the log names for it (that one) and
    /// shadows the log's.
    fn activate_everywhere(&mut self) {
        let label = format!("m{}@1", self.labels);
        let through = self.rng.below(self.members.len() as u64) as usize;
        let now = self.now;
        if let Some(meta) = self.members[through].meta.as_mut() {
            let canary = meta.state().and_then(|s| s.canary.as_ref()).map(|c| c.policy.label.clone());
            if let Some(canary) = canary {
                let _ = meta
                    .propose(now, MetaEntry::CanaryDecided { label: canary, rolled_out: false, why: String::new() });
            }
            let _ = meta.propose(now, MetaEntry::Activate { label: label.clone(), config: None, bundled: false });
        }
        self.flush(through);
        let deadline = self.now + 5_000;
        self.run(deadline, false, false);
        let held: BTreeSet<String> = self.members.iter().flat_map(|m| m.host.modules.iter().cloned()).collect();
        for i in 0..self.members.len() {
            let m = &self.members[i];
            let Some(state) = m.meta.as_ref().and_then(MetaNode::state) else { continue };
            if state.active.as_ref().is_none_or(|a| a.label != label) {
                let active = state.active.clone();
                self.violated("heals", format!("an activate of {label} through member {through}: {active:?}"));
            }
            let target: Target = (state.policy_for(i as NodeIx).cloned(), state.shadow.clone());
            // A module whose bytes no member holds (its only holder wiped
            // before any other fetched it) cannot run anywhere: counted.
            let shadow_sha = target.1.as_ref().and_then(|l| state.modules.get(l)).map(|r| r.module.sha256.clone());
            let shas = target.0.as_ref().and_then(|a| a.sha256.clone()).into_iter().chain(shadow_sha);
            if shas.into_iter().any(|sha| !held.contains(&sha)) {
                self.tally.bytes_nowhere += 1;
                continue;
            }
            if !m.serving || m.host.running != target {
                let (serving, runs) = (m.serving, m.host.running.clone());
                self.violated(
                    "serving-members-run-the-active-module",
                    format!("member {i} (serving: {serving}) runs {runs:?}; the log names {target:?}"),
                );
            }
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
        total.policy_proposals += t.policy_proposals;
        total.applies += t.applies;
        total.fetched += t.fetched;
        total.starts += t.starts;
        total.started_without_policy += t.started_without_policy;
        total.bytes_nowhere += t.bytes_nowhere;
    }
    eprintln!("{seeds} seeds: {total:?}");
    // The faults happened, and the log still moved under them.
    assert!(total.crashes > seeds && total.pauses > seeds && total.cuts > seeds, "{total:?}");
    assert!(total.wipes > 0 && total.rejoined > 0, "{total:?}");
    assert!(total.acknowledged > seeds * 50, "{total:?}");
    // Members swapped policies, fetched modules and restarted into them.
    assert!(total.applies > seeds * 20 && total.fetched > seeds * 20 && total.starts > seeds * 5, "{total:?}");
}

/// Seeds that once broke an invariant (beyond the 500 of every run).
#[test]
fn seeds_that_once_failed_pass() {
    // 1357: a member that had run a canary restarted its policy side while
    // the canary was rolled back with no cluster-wide policy recorded, and
    // served before its return to its own policy had finished.
    run_seed(1357);
}

#[test]
fn one_seed() {
    let seed = std::env::var("CACHET_META_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or(1);
    let tally = run_seed(seed);
    eprintln!("seed {seed}: {tally:?}");
}
