//! A member's part in the metadata log, between the runtime's shell and
//! [`MetaNode`]: how a member comes to have a log (founding it, reopening
//! it, or joining), the frames members exchange for that, and what the
//! leader does with what the failure detector and joining members tell it.
//!
//! **Founding without double votes.** A founder (`--cluster`) whose data
//! directory has no log cannot tell by itself whether this is the
//! cluster's first start or a restart after its disk was lost; founding
//! again under its old identity would let it vote twice in a term it
//! forgot. So it first asks the other founders (`Hello`): if any of them
//! holds a log, the cluster exists and this member joins as a new
//! incarnation; it founds only once a majority of the founders (itself
//! included) said they have none.
//!
//! **Joining.** A member with no log (a wiped founder, or one started with
//! `--seeds`) takes a fresh random generation, saves its identity, and
//! sends `Join` to every peer it knows until it has the state. The leader
//! removes an older incarnation of the same node if there is one, adds the
//! new one (a voter while there are fewer than five), and raft-rs brings it
//! up to date with a snapshot. A `Join` is believed only for the node the
//! sender's certificate names.
//!
//! **The failure detector's verdicts** (SWIM, foca) reach every member;
//! only the leader records them in the log (`SetState` down or serving),
//! so a member cut off from the majority records nothing.
//!
//! **Client addresses**: founders know only each other's peer addresses;
//! each member announces its own client address once it is in the log.

use super::entry::{MemberRecord, MemberState, MetaEntry, Settings};
use super::file::FileDurable;
use super::state::{MetaState, Outcome};
use super::storage::{Loaded, MetaStorage};
use super::wire::{RaftWire, WireConf, WireSnapshot};
use super::{MetaConfig, MetaError, MetaEvent, MetaNode, node_of, raft_id};
use crate::cluster::replica::NodeIx;
use cachet_proto::{MetaMemberStats, MetaStats};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::net::SocketAddr;
use std::path::PathBuf;

/// The metadata log's directory inside the data directory.
pub const META_DIR: &str = "meta";
/// This member's node id and Raft identity, beside the log.
const IDENTITY_FILE: &str = "identity";
const HELLO_EVERY_MS: u64 = 250;
const JOIN_EVERY_MS: u64 = 500;
const RECONCILE_EVERY_MS: u64 = 250;
/// Members report their hit counts to the leader this often.
const REPORT_EVERY_MS: u64 = 500;
/// Lookups the canary members must see in the window to be judged.
const CANARY_MIN_LOOKUPS: u64 = 100;
/// The canary may trail the others' hit ratio by this much and still roll
/// out (members see different keys; noise is not a regression).
const CANARY_TOLERANCE: f64 = 0.005;
/// `open`'s key for the leader's canary decision.
const CANARY_DECISION: NodeIx = NodeIx::MAX;
/// `open`'s key for the leader's slot plans.
const SLOT_PLAN: NodeIx = NodeIx::MAX - 1;
/// `open`'s key for this member's [`MetaEntry::SlotsHeld`].
const SLOTS_HELD: NodeIx = NodeIx::MAX - 2;
/// A member that has not heard from the log's leader for this long stops
/// counting toward quorums (see [`MetaNode::in_contact`]).
pub const LEASE_MS: u64 = 1_500;
/// The leader moves a down member's slots no sooner than this: twice the
/// lease, so a member cut off with them has stopped counting by then.
const MIN_REPLACE_AFTER_MS: u64 = 2 * LEASE_MS;
/// Voters in the log, at most; further members are learners (they get
/// every entry and do not slow commits down).
const MAX_VOTERS: usize = 5;

/// What members send each other about the metadata log.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum MetaFrame {
    /// A Raft message (boxed: it dwarfs the other frames).
    Raft(Box<RaftWire>),
    /// A founder with no log asks whether the cluster was founded.
    Hello,
    /// The answer: whether the sender holds a log.
    Founded(bool),
    /// A member with no log asks to be added under `raft_id`.
    Join {
        /// Its new Raft identity.
        raft_id: u64,
        /// Where it serves clients.
        client: SocketAddr,
    },
    /// A member asks for a policy module's bytes (one the log stores).
    ModuleWant {
        /// SHA-256 of the component, hex.
        sha256: String,
    },
    /// A member's cumulative cache hits and misses, for the leader's
    /// canary decisions.
    Report {
        /// Hits so far.
        hits: u64,
        /// Misses so far.
        misses: u64,
    },
    /// A policy module's bytes.
    Module {
        /// SHA-256 of the component, hex (checked by the receiver).
        sha256: String,
        /// The component.
        bytes: bytes::Bytes,
    },
}

/// What the member needs to know about itself.
#[derive(Clone, Debug)]
pub struct MetaOptions {
    /// This node's id.
    pub me: NodeIx,
    /// The founders' peer addresses by node id (`--cluster`); empty for a
    /// member joining through `--seeds`.
    pub founders: Vec<SocketAddr>,
    /// Its own peer address.
    pub peer: SocketAddr,
    /// Where it serves clients.
    pub client: SocketAddr,
    /// Where it serves the Redis protocol, if it does.
    pub resp: Option<SocketAddr>,
    /// The settings a founding writes into the log.
    pub settings: Settings,
    /// The data directory (the log goes in its `meta/`).
    pub data_dir: PathBuf,
    /// Timing.
    pub config: MetaConfig,
}

#[derive(Serialize, Deserialize)]
struct Identity {
    node: NodeIx,
    raft_id: u64,
}

#[derive(Debug)]
enum Phase {
    Probing { empty: BTreeSet<NodeIx>, next_hello: u64 },
    Joining { next_join: u64 },
    Running,
}

/// A join request the leader has yet to act on.
#[derive(Clone, Debug)]
struct JoinRequest {
    raft_id: u64,
    peer: SocketAddr,
    client: SocketAddr,
}

/// One member's metadata log and what surrounds it.
pub struct MetaMember {
    opts: MetaOptions,
    node: Option<MetaNode>,
    raft_id: u64,
    phase: Phase,
    seed: u64,
    outbox: VecDeque<(NodeIx, MetaFrame)>,
    joins: BTreeMap<NodeIx, JoinRequest>,
    verdicts: BTreeMap<NodeIx, bool>,
    next_reconcile: u64,
    /// Nonces of this member's proposals still open, by what they are for.
    open: BTreeMap<u64, NodeIx>,
    /// Nonces of proposals made for clients (policy commands), and their
    /// fates once decided.
    client_open: BTreeSet<u64>,
    decided: VecDeque<(u64, Result<u64, String>)>,
    changed: bool,
    error: Option<String>,
    /// This member's cumulative hits and misses (set by the runtime).
    counts: (u64, u64),
    next_report: u64,
    /// Every member's last reported counts (the leader's view).
    reports: BTreeMap<NodeIx, (u64, u64)>,
    /// The canary the leader watches: its label and start index, when
    /// this leader started watching, and the counts then.
    watch: Option<CanaryWatch>,
    /// Since when (this member's clock) each member has been down in the
    /// log, as the leader saw it: its slots move once that is
    /// `replace_after_ms` ago.
    down_since: BTreeMap<NodeIx, u64>,
    /// This process founded the log: the cluster is new, and no member
    /// holds data yet.
    founded_here: bool,
}

/// The slot table the leader wants next, if it differs from the log's:
/// every serving member places slots; a member down keeps its own for
/// `replace_after_ms` (its co-owners serve them meanwhile, so a restart
/// moves nothing), then the others take them over; a member joining or
/// syncing keeps what it owns and gets slots once it serves. Only the set
/// of members changes the table: [`SlotTable::plan`] then moves as few
/// slots as it can.
fn wanted_slots(
    state: &MetaState,
    down_since: &BTreeMap<NodeIx, u64>,
    now: u64,
    replace_after_ms: u64,
) -> Option<cachet_proto::SlotTable> {
    let owners: BTreeSet<NodeIx> = state.slots.ranges().iter().flat_map(|r| r.owners.iter().copied()).collect();
    let mut placing: Vec<(NodeIx, u32)> = Vec::new();
    for m in state.members.values() {
        let keep = match m.state {
            MemberState::Serving => true,
            MemberState::Joining | MemberState::Syncing => owners.contains(&m.node),
            MemberState::Down => {
                owners.contains(&m.node) && down_since.get(&m.node).is_none_or(|&t| now < t + replace_after_ms)
            }
            MemberState::Leaving | MemberState::Removed => false,
        };
        if keep {
            placing.push((m.node, m.weight.max(1)));
        }
    }
    let same: BTreeSet<NodeIx> = placing.iter().map(|p| p.0).collect();
    if placing.is_empty() || same == owners {
        return None;
    }
    let rf = (state.settings.rf as usize).min(placing.len()).max(1);
    match state.slots.plan(&placing, rf) {
        Ok(table) => Some(table),
        Err(e) => {
            tracing::warn!(target: "cachet::meta", "no slot plan: {e}");
            None
        }
    }
}

/// The next table on the way to `target`, the leader's wanted placement.
/// A move is two tables: first the current owners with the new ones
/// pending ([`cachet_proto::SlotTable::staged`]), who take every write and
/// stream the slots; then, once each pending member has told the log it
/// holds them ([`MetaEntry::SlotsHeld`]), `target` itself. So a new owner
/// counts for a key only once the log records that it holds it, and the
/// owners it replaces serve until then.
///
/// - No target and no move running: nothing.
/// - No target but pending members (the move is no longer wanted: the
///   member it was for came back, or a pending member left): the table
///   without them.
/// - A target that adds no owner anywhere (owners only drop out): the
///   target at once.
/// - A target not staged yet (or staged for another target): the staged
///   table.
/// - Staged, and every pending member holds its slots: the target.
/// - Staged, still streaming: nothing.
fn next_table(state: &MetaState, target: Option<cachet_proto::SlotTable>) -> Option<cachet_proto::SlotTable> {
    let table = &state.slots;
    let Some(target) = target else {
        return if table.has_pending() { table.without_pending().ok() } else { None };
    };
    let staged = table.staged(&target).ok()?;
    if !staged.has_pending() {
        return Some(target);
    }
    if !staged.same_placement(table) {
        return Some(staged);
    }
    table.pending_members().iter().all(|p| state.held.contains(p)).then_some(target)
}

/// The leader's watch over a running canary.
struct CanaryWatch {
    label: String,
    since: u64,
    started: u64,
    baseline: BTreeMap<NodeIx, (u64, u64)>,
}

fn io_error(e: std::io::Error) -> MetaError {
    MetaError::Failed(format!("the metadata log's files: {e}"))
}

impl MetaMember {
    /// Opens this member's log: reopened from the data directory when it
    /// has one; otherwise probing the founders (a founder) or joining.
    pub fn open(opts: MetaOptions, seed: u64, now: u64) -> Result<Self, MetaError> {
        let dir = opts.data_dir.join(META_DIR);
        std::fs::create_dir_all(&dir).map_err(io_error)?;
        let identity = match std::fs::read(dir.join(IDENTITY_FILE)) {
            Ok(bytes) => Some(
                cachet_proto::frame::from_slice_shallow::<Identity>(&bytes)
                    .map_err(|e| MetaError::Failed(format!("{}: {e}", dir.join(IDENTITY_FILE).display())))?,
            ),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => return Err(io_error(e)),
        };
        if let Some(id) = &identity
            && id.node != opts.me
        {
            return Err(MetaError::Failed(format!(
                "the data directory's metadata log belongs to node {}, not {}",
                id.node, opts.me
            )));
        }
        let mut member = Self {
            raft_id: raft_id(opts.me, 0),
            opts,
            node: None,
            phase: Phase::Running,
            seed,
            outbox: VecDeque::new(),
            joins: BTreeMap::new(),
            verdicts: BTreeMap::new(),
            next_reconcile: now,
            open: BTreeMap::new(),
            client_open: BTreeSet::new(),
            decided: VecDeque::new(),
            changed: false,
            error: None,
            counts: (0, 0),
            next_report: now,
            reports: BTreeMap::new(),
            watch: None,
            down_since: BTreeMap::new(),
            founded_here: false,
        };
        let (durable, loaded) = FileDurable::open(&dir).map_err(io_error)?;
        match identity {
            Some(id) if !loaded.is_empty() => {
                member.raft_id = id.raft_id;
                let has_state = loaded.snapshot.is_some();
                let storage = MetaStorage::open(loaded, Box::new(durable))?;
                member.start(storage, now)?;
                member.phase = if has_state { Phase::Running } else { Phase::Joining { next_join: now } };
                tracing::info!(node = member.opts.me, raft_id = member.raft_id, "metadata log reopened");
            }
            // A joiner that never received the state: join again, under the
            // identity it asked for.
            Some(id) if id.raft_id >> 32 != 0 => {
                member.raft_id = id.raft_id;
                member.join_as(id.raft_id, durable, now)?;
            }
            _ if member.opts.founders.is_empty() => member.join(durable, now)?,
            _ => member.phase = Phase::Probing { empty: BTreeSet::new(), next_hello: now },
        }
        Ok(member)
    }

    fn start(&mut self, storage: MetaStorage, now: u64) -> Result<(), MetaError> {
        // Above every nonce of an earlier life of this member.
        let nonce_base =
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_micros() as u64);
        self.node = Some(MetaNode::new(
            self.opts.me,
            self.raft_id,
            storage,
            self.opts.config.clone(),
            self.seed,
            nonce_base,
            now,
        )?);
        Ok(())
    }

    fn save_identity(&self) -> Result<(), MetaError> {
        let dir = self.opts.data_dir.join(META_DIR);
        let bytes = rmp_serde::to_vec(&Identity { node: self.opts.me, raft_id: self.raft_id })
            .map_err(|e| MetaError::Failed(e.to_string()))?;
        let tmp = dir.join(format!("{IDENTITY_FILE}.tmp"));
        std::fs::write(&tmp, bytes).map_err(io_error)?;
        std::fs::File::open(&tmp).and_then(|f| f.sync_all()).map_err(io_error)?;
        std::fs::rename(&tmp, dir.join(IDENTITY_FILE)).map_err(io_error)
    }

    /// The founding state every founder computes alike.
    fn founding(&self) -> Result<WireSnapshot, MetaError> {
        let founders: Vec<MemberRecord> = self
            .opts
            .founders
            .iter()
            .enumerate()
            .map(|(i, peer)| MemberRecord {
                node: i as NodeIx,
                raft_id: raft_id(i as NodeIx, 0),
                peer: *peer,
                client: None,
                weight: 1,
                state: MemberState::Serving,
                reason: "founder".into(),
                since: 1,
                resp: None,
            })
            .collect();
        let ids: Vec<u64> = founders.iter().map(|m| m.raft_id).collect();
        let state = MetaState::founding(founders, self.opts.settings.clone())
            .map_err(|e| MetaError::Failed(format!("founding placement: {e}")))?;
        let voters = ids.iter().take(MAX_VOTERS).copied().collect();
        let learners = ids.iter().skip(MAX_VOTERS).copied().collect();
        Ok(WireSnapshot {
            data: state.encode().into(),
            index: 1,
            term: 1,
            conf: WireConf { voters, learners, ..WireConf::default() },
        })
    }

    fn found(&mut self, now: u64) -> Result<(), MetaError> {
        let snapshot = self.founding()?;
        self.raft_id = raft_id(self.opts.me, 0);
        self.save_identity()?;
        let (durable, _) = FileDurable::open(&self.opts.data_dir.join(META_DIR)).map_err(io_error)?;
        let storage = MetaStorage::found(snapshot, Box::new(durable))?;
        self.start(storage, now)?;
        self.phase = Phase::Running;
        self.founded_here = true;
        tracing::info!(node = self.opts.me, founders = self.opts.founders.len(), "metadata log founded");
        Ok(())
    }

    fn join(&mut self, durable: FileDurable, now: u64) -> Result<(), MetaError> {
        // A new generation, never 0 (the founders'), drawn from the boot
        // nonce; the log refuses an identity used before.
        let generation = (self.seed % u64::from(u32::MAX - 1)) as u32 + 1;
        let id = raft_id(self.opts.me, generation);
        self.join_as(id, durable, now)
    }

    fn join_as(&mut self, id: u64, durable: FileDurable, now: u64) -> Result<(), MetaError> {
        self.raft_id = id;
        self.save_identity()?;
        let storage = MetaStorage::open(Loaded::default(), Box::new(durable))?;
        self.start(storage, now)?;
        self.phase = Phase::Joining { next_join: now };
        tracing::info!(node = self.opts.me, raft_id = id, "joining the metadata log as a new incarnation");
        Ok(())
    }

    /// This member's log, once it has one.
    pub fn node(&self) -> Option<&MetaNode> {
        self.node.as_ref()
    }

    /// Whether this member is in touch with the log's leader (see
    /// [`MetaNode::in_contact`]).
    pub fn in_contact(&self, now: u64) -> bool {
        self.node.as_ref().is_some_and(|n| n.in_contact(now, LEASE_MS))
    }

    /// Whether this process founded the log (the cluster is new: nothing
    /// was ever written to it, so there is nothing to re-sync).
    pub fn founded_here(&self) -> bool {
        self.founded_here
    }

    /// The state as applied here, once there is one.
    pub fn state(&self) -> Option<&MetaState> {
        self.node.as_ref().and_then(MetaNode::state)
    }

    /// Whether the state changed since the last call.
    pub fn take_changed(&mut self) -> bool {
        std::mem::take(&mut self.changed)
    }

    /// A frame from `from` (the node its certificate names), sent from
    /// `addr`.
    pub fn handle(&mut self, now: u64, from: NodeIx, addr: SocketAddr, frame: MetaFrame) -> Result<(), MetaError> {
        match frame {
            MetaFrame::Raft(wire) => {
                // While probing there is no log to step it into (founders
                // starting together campaign before the last one founded).
                match self.node.as_mut() {
                    Some(node) => node.handle(now, from, *wire),
                    None => Ok(()),
                }
            }
            MetaFrame::Hello => {
                // Founded means "the log moved on since its founding":
                // founders starting together all found; one that asks
                // after the first election (a lost disk, or a late first
                // start) joins as a new incarnation, which is always safe.
                let founded = self.node.as_ref().is_some_and(|n| n.term() > 1 || n.applied() > 1);
                self.outbox.push_back((from, MetaFrame::Founded(founded)));
                Ok(())
            }
            MetaFrame::Founded(founded) => {
                let Phase::Probing { empty, .. } = &mut self.phase else { return Ok(()) };
                if founded {
                    return self.become_joiner(now);
                }
                empty.insert(from);
                let majority = self.opts.founders.len() / 2 + 1;
                if empty.iter().filter(|n| **n != self.opts.me).count() + 1 >= majority {
                    self.found(now)?;
                }
                Ok(())
            }
            // The runtime answers these itself (it has the node's registry).
            MetaFrame::ModuleWant { .. } | MetaFrame::Module { .. } => Ok(()),
            MetaFrame::Report { hits, misses } => {
                self.reports.insert(from, (hits, misses));
                Ok(())
            }
            MetaFrame::Join { raft_id, client } => {
                if node_of(raft_id) != Some(from) {
                    return Err(MetaError::Impostor { node: from, claimed: raft_id });
                }
                self.joins.insert(from, JoinRequest { raft_id, peer: addr, client });
                Ok(())
            }
        }
    }

    fn become_joiner(&mut self, now: u64) -> Result<(), MetaError> {
        let (durable, _) = FileDurable::open(&self.opts.data_dir.join(META_DIR)).map_err(io_error)?;
        self.join(durable, now)
    }

    /// This member's cumulative cache hits and misses.
    pub fn set_counts(&mut self, hits: u64, misses: u64) {
        self.counts = (hits, misses);
    }

    /// The failure detector's verdict on `node`.
    pub fn verdict(&mut self, node: NodeIx, up: bool) {
        self.verdicts.insert(node, up);
    }

    /// Advances the clock; `peers` are the members this node knows how to
    /// reach (where a joiner sends `Join`).
    pub fn tick(&mut self, now: u64, peers: &[NodeIx]) {
        let has_state = self.state().is_some();
        match &mut self.phase {
            Phase::Probing { next_hello, .. } if now >= *next_hello => {
                *next_hello = now + HELLO_EVERY_MS;
                for i in 0..self.opts.founders.len() as NodeIx {
                    if i != self.opts.me {
                        self.outbox.push_back((i, MetaFrame::Hello));
                    }
                }
                if self.opts.founders.len() == 1
                    && let Err(e) = self.found(now)
                {
                    self.error = Some(e.to_string());
                }
            }
            Phase::Joining { .. } if has_state => {
                self.phase = Phase::Running;
                tracing::info!(node = self.opts.me, "joined the metadata log");
            }
            Phase::Joining { next_join } if now >= *next_join => {
                *next_join = now + JOIN_EVERY_MS;
                for &p in peers.iter().filter(|p| **p != self.opts.me) {
                    self.outbox.push_back((p, MetaFrame::Join { raft_id: self.raft_id, client: self.opts.client }));
                }
            }
            _ => {}
        }
        if let Some(node) = self.node.as_mut() {
            node.tick(now);
        }
        if matches!(self.phase, Phase::Running) && now >= self.next_report {
            self.next_report = now + REPORT_EVERY_MS;
            self.reports.insert(self.opts.me, self.counts);
            let leader = self.node.as_ref().and_then(MetaNode::leader).filter(|l| *l != self.opts.me);
            if let Some(leader) = leader {
                self.outbox.push_back((leader, MetaFrame::Report { hits: self.counts.0, misses: self.counts.1 }));
            }
        }
        if matches!(self.phase, Phase::Running) && now >= self.next_reconcile {
            self.next_reconcile = now + RECONCILE_EVERY_MS;
            self.announce(now);
            if self.node.as_ref().is_some_and(MetaNode::is_leader) {
                self.reconcile(now);
            }
        }
        self.drain_events();
    }

    fn propose(&mut self, now: u64, about: NodeIx, entry: MetaEntry) {
        let Some(node) = self.node.as_mut() else { return };
        match node.propose(now, entry) {
            Ok(nonce) => {
                self.open.insert(nonce, about);
            }
            Err(e) => tracing::debug!(target: "cachet::meta", "proposal not made: {e}"),
        }
    }

    fn busy_with(&self, node: NodeIx) -> bool {
        self.open.values().any(|n| *n == node)
    }

    /// Tells the log that this member holds the slots it is pending for on
    /// the table at `epoch` (the shell calls it when the replica's streams
    /// are done on that table), until the log has it.
    pub fn slots_held(&mut self, now: u64, epoch: u64) {
        let me = self.opts.me;
        let Some(state) = self.state() else { return };
        let wanted =
            state.slots.epoch() == epoch && state.slots.pending_members().contains(&me) && !state.held.contains(&me);
        if wanted && !self.busy_with(SLOTS_HELD) {
            self.propose(now, SLOTS_HELD, MetaEntry::SlotsHeld { node: me, epoch });
        }
    }

    /// Tells the log this member's client address, once.
    fn announce(&mut self, now: u64) {
        let me = self.opts.me;
        let known = self.state().and_then(|s| s.members.get(&me)).map(|m| (m.client, m.resp, m.raft_id));
        if let Some((client, resp, id)) = known
            && id == self.raft_id
            && (client != Some(self.opts.client) || resp != self.opts.resp)
            && !self.busy_with(me)
        {
            let entry = MetaEntry::SetClient { node: me, client: self.opts.client, resp: self.opts.resp };
            self.propose(now, me, entry);
        }
    }

    /// The leader's duties: joins, promotions, and the failure detector's
    /// verdicts into the log. One configuration change at a time (raft-rs
    /// takes one at a time).
    fn reconcile(&mut self, now: u64) {
        let Some(node) = self.node.as_ref() else { return };
        let Some(state) = node.state() else { return };
        let mut proposals: Vec<(NodeIx, MetaEntry)> = Vec::new();
        let mut transfer: Option<u64> = None;
        let conf_busy = node.has_pending_conf_change();
        let voters = node.voters();
        if !conf_busy {
            let mut done = Vec::new();
            for (n, join) in &self.joins {
                match state.members.get(n) {
                    Some(rec) if rec.raft_id == join.raft_id && rec.state != MemberState::Removed => done.push(*n),
                    Some(rec) if rec.state != MemberState::Removed => {
                        proposals.push((*n, MetaEntry::RemoveMember { node: *n, raft_id: rec.raft_id }));
                        break;
                    }
                    _ => {
                        let member = MemberRecord {
                            node: *n,
                            raft_id: join.raft_id,
                            peer: join.peer,
                            client: Some(join.client),
                            weight: 1,
                            state: MemberState::Joining,
                            reason: "joined".into(),
                            since: 0,
                            resp: None,
                        };
                        proposals.push((*n, MetaEntry::AddMember { member, voter: voters.len() < MAX_VOTERS }));
                        break;
                    }
                }
            }
            for n in done {
                self.joins.remove(&n);
            }
            if proposals.is_empty() && voters.len() < MAX_VOTERS {
                // A learner the detector sees up becomes a voter.
                let learner = state.members.values().find(|m| {
                    m.state != MemberState::Removed
                        && !voters.contains(&m.raft_id)
                        && self.verdicts.get(&m.node).copied().unwrap_or(false)
                        && node.caught_up(m.raft_id)
                });
                if let Some(m) = learner {
                    proposals.push((m.node, MetaEntry::Promote { node: m.node }));
                }
            }
            // A member leaving whose slots have all moved leaves the log.
            // The leader does not remove itself: it hands leadership to a
            // voter the detector sees up, which then removes it.
            let owners: BTreeSet<NodeIx> = state.slots.ranges().iter().flat_map(|r| r.owners.iter().copied()).collect();
            let gone = state.members.values().find(|m| m.state == MemberState::Leaving && !owners.contains(&m.node));
            if proposals.is_empty()
                && let Some(m) = gone
            {
                if m.node == self.opts.me {
                    let heir = state.members.values().find(|o| {
                        o.node != self.opts.me
                            && voters.contains(&o.raft_id)
                            && o.state == MemberState::Serving
                            && self.verdicts.get(&o.node).copied().unwrap_or(false)
                    });
                    if let Some(heir) = heir.map(|h| h.raft_id) {
                        transfer = Some(heir);
                    }
                } else {
                    proposals.push((m.node, MetaEntry::RemoveMember { node: m.node, raft_id: m.raft_id }));
                }
            }
        }
        for m in state.members.values().filter(|m| m.state != MemberState::Removed) {
            let up = if m.node == self.opts.me { Some(true) } else { self.verdicts.get(&m.node).copied() };
            let next = match (m.state, up) {
                (MemberState::Down | MemberState::Joining, Some(true)) if node.caught_up(m.raft_id) => {
                    Some((MemberState::Serving, "the failure detector sees it up"))
                }
                (MemberState::Serving | MemberState::Joining | MemberState::Syncing, Some(false)) => {
                    Some((MemberState::Down, "the failure detector declared it down"))
                }
                _ => None,
            };
            if let Some((state, reason)) = next {
                proposals.push((m.node, MetaEntry::SetState { node: m.node, state, reason: reason.into() }));
            }
        }
        for m in state.members.values() {
            if m.state == MemberState::Down {
                self.down_since.entry(m.node).or_insert(now);
            } else {
                self.down_since.remove(&m.node);
            }
        }
        let replace_after = self.opts.config.replace_after_ms.max(MIN_REPLACE_AFTER_MS);
        if let Some(table) = next_table(state, wanted_slots(state, &self.down_since, now, replace_after)) {
            let expected_epoch = state.slots.epoch();
            tracing::info!(target: "cachet::meta", epoch = table.epoch(), "proposing a new slot table");
            proposals.push((SLOT_PLAN, MetaEntry::SetSlots { expected_epoch, table }));
        }
        if let Some(decision) = self.judge_canary(now) {
            proposals.push((CANARY_DECISION, decision));
        }
        for (about, entry) in proposals {
            if !self.busy_with(about) {
                self.propose(now, about, entry);
            }
        }
        if let (Some(heir), Some(node)) = (transfer, self.node.as_mut()) {
            tracing::info!(target: "cachet::meta", heir, "leaving: handing leadership over");
            node.transfer_leader(heir);
        }
    }

    /// The leader's canary decision, once the window has passed: the
    /// canary members' hit ratio over the window against the other serving
    /// members'. A leader that took over mid-window starts its own window
    /// (it has no earlier counts).
    fn judge_canary(&mut self, now: u64) -> Option<MetaEntry> {
        let state = self.node.as_ref()?.state()?;
        let Some(canary) = &state.canary else {
            self.watch = None;
            return None;
        };
        let fresh =
            self.watch.as_ref().is_none_or(|w| w.label != canary.policy.label || w.since != canary.policy.since);
        if fresh {
            self.watch = Some(CanaryWatch {
                label: canary.policy.label.clone(),
                since: canary.policy.since,
                started: now,
                baseline: self.reports.clone(),
            });
            return None;
        }
        let watch = self.watch.as_ref()?;
        if now < watch.started + canary.window_ms {
            return None;
        }
        let delta = |members: &mut dyn Iterator<Item = NodeIx>| {
            members.fold((0u64, 0u64), |(h, l), n| {
                let now = self.reports.get(&n).copied().unwrap_or_default();
                let then = watch.baseline.get(&n).copied().unwrap_or_default();
                let hits = now.0.saturating_sub(then.0);
                let misses = now.1.saturating_sub(then.1);
                (h + hits, l + hits + misses)
            })
        };
        let serving = state.serving();
        let (c_hits, c_lookups) = delta(&mut canary.members.iter().copied());
        let (o_hits, o_lookups) = delta(&mut serving.iter().copied().filter(|n| !canary.members.contains(n)));
        let ratio = |h: u64, l: u64| if l == 0 { 0.0 } else { h as f64 / l as f64 };
        let (c, o) = (ratio(c_hits, c_lookups), ratio(o_hits, o_lookups));
        let secs = canary.window_ms as f64 / 1000.0;
        let (rolled_out, why) = if c_lookups < CANARY_MIN_LOOKUPS {
            (false, format!("too little traffic on the canary members to judge ({c_lookups} lookups in {secs:.0} s)"))
        } else if o_lookups == 0 {
            (
                true,
                format!("canary hit ratio {c:.4} over {c_lookups} lookups; no traffic on the other members to compare"),
            )
        } else if c + CANARY_TOLERANCE >= o {
            (
                true,
                format!(
                    "canary hit ratio {c:.4} ({c_lookups} lookups) against {o:.4} ({o_lookups}) on the others over {secs:.0} s"
                ),
            )
        } else {
            (
                false,
                format!(
                    "canary hit ratio {c:.4} ({c_lookups} lookups) is below {o:.4} ({o_lookups}) on the others over {secs:.0} s"
                ),
            )
        };
        Some(MetaEntry::CanaryDecided { label: canary.policy.label.clone(), rolled_out, why })
    }

    fn drain_events(&mut self) {
        let Some(node) = self.node.as_mut() else { return };
        while let Some(event) = node.poll_event() {
            match event {
                MetaEvent::Decided { nonce, index, outcome } => {
                    self.open.remove(&nonce);
                    if self.client_open.remove(&nonce) {
                        let result = match outcome {
                            Outcome::Refused(why) => Err(why),
                            Outcome::Applied | Outcome::Duplicate => Ok(index),
                        };
                        self.decided.push_back((nonce, result));
                    }
                }
                MetaEvent::Abandoned { nonce, why } => {
                    self.open.remove(&nonce);
                    if self.client_open.remove(&nonce) {
                        self.decided.push_back((nonce, Err(why)));
                    }
                }
                MetaEvent::Changed { .. } => self.changed = true,
                MetaEvent::Leader { leader, term } => {
                    tracing::info!(target: "cachet::meta", node = self.opts.me, ?leader, term, "metadata leader");
                }
            }
        }
    }

    /// Proposes `entry` for a client (a policy command); its fate comes
    /// out of [`Self::poll_decided`] with the returned nonce: the log
    /// index where it applied here, or why not.
    pub fn propose_for_client(&mut self, now: u64, entry: MetaEntry) -> Result<u64, MetaError> {
        if !matches!(self.phase, Phase::Running) {
            return Err(MetaError::Failed("this member has not joined the metadata log yet".into()));
        }
        let node = self.node.as_mut().ok_or_else(|| MetaError::Failed("no metadata log".into()))?;
        let nonce = node.propose(now, entry)?;
        self.client_open.insert(nonce);
        self.drain_events();
        Ok(nonce)
    }

    /// A client proposal's fate.
    pub fn poll_decided(&mut self) -> Option<(u64, Result<u64, String>)> {
        self.decided.pop_front()
    }

    /// The next frame to send, and to which node.
    pub fn poll_transmit(&mut self) -> Option<(NodeIx, MetaFrame)> {
        if let Some(out) = self.outbox.pop_front() {
            return Some(out);
        }
        let node = self.node.as_mut()?;
        node.poll_transmit().map(|(to, wire)| (to, MetaFrame::Raft(Box::new(wire))))
    }

    /// When [`Self::tick`] is next due.
    pub fn poll_timeout(&self) -> Option<u64> {
        let phase = match &self.phase {
            Phase::Probing { next_hello, .. } => Some(*next_hello),
            Phase::Joining { next_join } => Some(*next_join),
            Phase::Running => Some(self.next_reconcile),
        };
        let node = self.node.as_ref().and_then(MetaNode::poll_timeout);
        [phase, node].into_iter().flatten().min()
    }

    /// What `cachet stats` shows of the log.
    pub fn stats(&self) -> MetaStats {
        let phase = match (&self.error, self.node.as_ref().and_then(MetaNode::failed), &self.phase) {
            (Some(e), _, _) => format!("stopped: {e}"),
            (_, Some(e), _) => format!("stopped: {e}"),
            (_, _, Phase::Probing { .. }) => "probing".into(),
            (_, _, Phase::Joining { .. }) => "joining".into(),
            (_, _, Phase::Running) => "running".into(),
        };
        let mut stats = MetaStats { phase, raft_id: self.raft_id, ..MetaStats::default() };
        let Some(node) = self.node.as_ref() else { return stats };
        stats.leader = node.leader();
        stats.term = node.term();
        stats.applied = node.applied();
        let voters = node.voters();
        if let Some(state) = node.state() {
            stats.members = state
                .members
                .values()
                .map(|m| MetaMemberStats {
                    node: m.node,
                    raft_id: m.raft_id,
                    state: m.state.name().into(),
                    reason: m.reason.clone(),
                    voter: voters.contains(&m.raft_id),
                    peer: m.peer.to_string(),
                    client: m.client.map(|c| c.to_string()).unwrap_or_default(),
                })
                .collect();
            stats.slots_epoch = state.slots.epoch();
            stats.active_policy = state.active.as_ref().map(|a| a.label.clone());
            stats.canary = state.canary.as_ref().map(|c| {
                format!("{} on members {:?} for {:.0} s", c.policy.label, c.members, c.window_ms as f64 / 1000.0)
            });
            stats.last_canary = state.last_canary.as_ref().map(|c| {
                let verdict = if c.rolled_out { "rolled out" } else { "rolled back" };
                format!("{} {verdict} at log index {}: {}", c.label, c.index, c.why)
            });
            stats.refused = state.refused;
        }
        stats
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cluster::replica::Consistency;

    /// The leader's steps of a move, from the log's state alone: a member
    /// that joins is staged as pending; the target comes only once every
    /// pending member holds its slots; a pending member that goes down is
    /// staged out again; a move no longer wanted is given up.
    #[test]
    fn a_move_goes_through_pending_members_and_the_log_records_their_holding() {
        let record = |node: NodeIx, state: MemberState| MemberRecord {
            node,
            raft_id: raft_id(node, 0),
            peer: SocketAddr::from(([127, 0, 0, 1], 7100 + node as u16)),
            client: None,
            weight: 1,
            state,
            reason: String::new(),
            since: 1,
            resp: None,
        };
        let settings = Settings { rf: 3, consistency: Consistency::Quorum };
        let founders = (0..3).map(|n| record(n, MemberState::Serving)).collect();
        let mut state = MetaState::founding(founders, settings).expect("state");
        let never_down = BTreeMap::new();
        let wanted = |state: &MetaState| wanted_slots(state, &never_down, 0, 30_000);
        assert!(next_table(&state, wanted(&state)).is_none(), "founders: nothing to move");
        // Member 3 joins and serves: staged, with 3 pending.
        state.members.insert(3, record(3, MemberState::Serving));
        let staged = next_table(&state, wanted(&state)).expect("a move");
        assert_eq!(staged.pending_members(), vec![3]);
        assert_eq!(staged.epoch(), 2);
        for r in staged.ranges() {
            assert_eq!(r.owners.len(), 3, "the owners stay while 3 streams");
        }
        state.slots = staged.clone();
        assert!(next_table(&state, wanted(&state)).is_none(), "nothing until 3 holds its slots");
        state.held.insert(3);
        let target = next_table(&state, wanted(&state)).expect("the move's second step");
        assert!(!target.has_pending() && target.epoch() == 3);
        assert!(target.ranges().iter().any(|r| r.owners.contains(&3)), "3 owns slots now");
        // Member 3 goes down while pending: the move is given up.
        state.members.insert(3, record(3, MemberState::Down));
        state.held.clear();
        let given_up = next_table(&state, wanted(&state)).expect("given up");
        assert!(!given_up.has_pending() && given_up.epoch() == 3);
        assert!(given_up.ranges().iter().all(|r| !r.owners.contains(&3)));
    }

    fn opts(me: NodeIx, founders: usize, dir: &std::path::Path) -> MetaOptions {
        let addr = |i: NodeIx, port: u16| SocketAddr::from(([127, 0, 0, 1], port + i as u16));
        MetaOptions {
            me,
            founders: (0..founders as NodeIx).map(|i| addr(i, 7100)).collect(),
            peer: addr(me, 7100),
            client: addr(me, 8100),
            resp: None,
            settings: Settings { rf: 3, consistency: Consistency::Quorum },
            data_dir: dir.join(format!("node{me}")),
            config: MetaConfig::default(),
        }
    }

    /// Runs the members on a perfect network from `from` for `ms`, the
    /// failure detector seeing `up`.
    fn run(members: &mut [Option<MetaMember>], up: &[bool], from: u64, ms: u64) {
        let ids: Vec<NodeIx> = (0..members.len() as NodeIx).collect();
        for now in from..from + ms {
            for i in 0..members.len() {
                let Some(m) = members[i].as_mut() else { continue };
                for (j, u) in up.iter().enumerate() {
                    if j != i {
                        m.verdict(j as NodeIx, *u);
                    }
                }
                m.tick(now, &ids);
                let mut out = Vec::new();
                while let Some(f) = members[i].as_mut().and_then(MetaMember::poll_transmit) {
                    out.push(f);
                }
                for (to, frame) in out {
                    let from_addr = SocketAddr::from(([127, 0, 0, 1], 7100 + i as u16));
                    if let Some(peer) = members.get_mut(to as usize).and_then(Option::as_mut) {
                        let _ = peer.handle(now, i as NodeIx, from_addr, frame);
                    }
                }
            }
        }
    }

    fn serving(m: &MetaMember) -> Vec<(NodeIx, String, bool)> {
        m.stats().members.iter().map(|s| (s.node, s.state.clone(), s.client.is_empty())).collect()
    }

    #[test]
    fn founders_found_once_joiners_join_and_a_wiped_founder_comes_back_as_a_new_incarnation() {
        let dir = std::env::temp_dir().join(format!("cachet-meta-member-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let mut members: Vec<Option<MetaMember>> =
            (0..3).map(|i| Some(MetaMember::open(opts(i, 3, &dir), 10 + u64::from(i), 0).expect("open"))).collect();
        members.push(None);
        assert_eq!(members[0].as_ref().map(|m| m.stats().phase), Some("probing".into()));
        run(&mut members, &[true, true, true, false], 0, 3_000);
        for m in members.iter().flatten() {
            let stats = m.stats();
            assert_eq!(stats.phase, "running");
            assert_eq!(stats.raft_id >> 32, 0, "founders starting together found at generation 0");
            assert!(stats.leader.is_some());
            assert_eq!(
                serving(m),
                vec![(0, "serving".into(), false), (1, "serving".into(), false), (2, "serving".into(), false)]
            );
        }
        // A fourth member joins through the others.
        let mut o = opts(3, 3, &dir);
        o.founders.clear();
        members[3] = Some(MetaMember::open(o, 99, 3_000).expect("open"));
        run(&mut members, &[true; 4], 3_000, 3_000);
        let stats = members[3].as_ref().expect("member 3").stats();
        assert_eq!(stats.phase, "running");
        assert_ne!(stats.raft_id >> 32, 0);
        assert_eq!(stats.members.len(), 4);
        assert!(stats.members.iter().all(|m| m.state == "serving" && m.voter), "{stats:?}");
        // Founder 1 loses its disk: it asks, hears the log moved on, and
        // comes back as a new incarnation in place of the old one.
        members[1] = None;
        run(&mut members, &[true, false, true, true], 6_000, 3_000);
        let leader = members.iter().flatten().find(|m| m.node().is_some_and(MetaNode::is_leader)).expect("a leader");
        assert_eq!(leader.stats().members.iter().find(|m| m.node == 1).map(|m| m.state.clone()), Some("down".into()));
        std::fs::remove_dir_all(dir.join("node1")).expect("wipe");
        members[1] = Some(MetaMember::open(opts(1, 3, &dir), 1_234, 9_000).expect("open"));
        run(&mut members, &[true; 4], 9_000, 4_000);
        let stats = members[1].as_ref().expect("member 1").stats();
        assert_eq!(stats.phase, "running", "{stats:?}");
        assert_ne!(stats.raft_id >> 32, 0, "a new incarnation");
        let one = stats.members.iter().find(|m| m.node == 1).expect("node 1");
        assert_eq!((one.raft_id, one.state.as_str()), (stats.raft_id, "serving"));
        // Founder 2 restarts with its disk: same identity, same log.
        let before = members[2].as_ref().map(|m| m.stats().raft_id);
        members[2] = None;
        members[2] = Some(MetaMember::open(opts(2, 3, &dir), 5, 13_000).expect("reopen"));
        assert_eq!(members[2].as_ref().map(|m| m.stats().phase), Some("running".into()));
        run(&mut members, &[true; 4], 13_000, 2_000);
        assert_eq!(members[2].as_ref().map(|m| m.stats().raft_id), before);
        let applied: BTreeSet<u64> = members.iter().flatten().map(|m| m.stats().applied).collect();
        assert_eq!(applied.len(), 1, "{applied:?}");
        // The data directory of another node is refused.
        assert!(MetaMember::open(MetaOptions { me: 0, ..opts(2, 3, &dir) }, 1, 0).is_err());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
