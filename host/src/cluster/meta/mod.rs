//! The cluster's metadata on a Raft log: members and their states, the
//! slot placement and its epoch, the policy registry and the active
//! policy, cluster-wide settings. Consensus is tikv's raft-rs (`RawNode`),
//! chosen for being sans-IO like the rest of this module (docs/decisions.md,
//! "Metadata on raft-rs"); this module drives it the way the shell drives
//! [`super::membership`] and [`super::replica`]: messages and the time go
//! in, messages, events and a deadline come out.
//!
//! - [`wire`]: raft-rs's messages in Cachet's own (MessagePack) encoding,
//!   checked, so protobuf never parses a peer's bytes.
//! - [`entry`]: the log's commands.
//! - [`state`]: the state machine they drive.
//! - [`storage`]: the log in memory, written through to a durable sink.
//! - [`file`]: that sink in the data directory.
//! - [`member`]: founding, reopening or joining the log, and the leader's
//!   duties (joins, the failure detector's verdicts).
//!
//! One [`MetaNode`] per member. Each call runs raft-rs's Ready cycle to the
//! end in the order raft-rs documents: messages a leader may send at once,
//! then a received snapshot installed, committed entries applied, new
//! entries and the hard state persisted and synced, and only then the
//! messages that promise something (votes, acknowledgements).

pub mod entry;
pub mod file;
pub mod member;
#[cfg(test)]
mod sim;
pub mod state;
pub mod storage;
pub mod wire;

use super::replica::NodeIx;
use entry::{MetaEntry, Proposal};
use raft::eraftpb::{ConfChangeSingle, ConfChangeType, ConfChangeV2, Entry, EntryType, Message, MessageType};
use raft::{RawNode, SnapshotStatus, StateRole};
use state::{MetaState, Outcome};
use std::collections::{BTreeMap, VecDeque};
use std::panic::{AssertUnwindSafe, catch_unwind};
use storage::MetaStorage;
use wire::RaftWire;

/// The Raft identity of `node` in its `generation`: a member that lost its
/// data directory rejoins under the next generation, so an identity whose
/// vote was forgotten never votes again.
pub fn raft_id(node: NodeIx, generation: u32) -> u64 {
    (u64::from(generation) << 32) | (u64::from(node) + 1)
}

/// The node a Raft identity belongs to.
pub fn node_of(raft_id: u64) -> Option<NodeIx> {
    let low = raft_id & 0xffff_ffff;
    (low != 0).then(|| (low - 1) as NodeIx)
}

/// Timing and sizes.
#[derive(Clone, Debug)]
pub struct MetaConfig {
    /// One Raft tick.
    pub tick_ms: u64,
    /// Ticks without a leader before an election (randomised up to twice
    /// that).
    pub election_tick: usize,
    /// Ticks between a leader's heartbeats.
    pub heartbeat_tick: usize,
    /// Applied entries between two compactions of the log.
    pub compact_every: u64,
    /// A proposal not applied within this is proposed again (same nonce).
    pub retry_ms: u64,
    /// A proposal not applied within this is given up.
    pub give_up_ms: u64,
    /// The leader moves the slots of a member down this long to the
    /// others.
    pub replace_after_ms: u64,
}

impl Default for MetaConfig {
    /// 50 ms ticks: heartbeats every 100 ms, elections after 0.5-1 s, so a
    /// dead leader is replaced well within the 2 s the cluster promises to
    /// serve a dead member's ranges again.
    fn default() -> Self {
        Self {
            tick_ms: 50,
            election_tick: 10,
            heartbeat_tick: 2,
            compact_every: 512,
            retry_ms: 1_000,
            give_up_ms: 30_000,
            replace_after_ms: 30_000,
        }
    }
}

/// What the metadata log tells its member.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MetaEvent {
    /// One of this member's proposals reached the log and applied here
    /// (or was refused by the state, the same on every member).
    Decided {
        /// The proposal's nonce.
        nonce: u64,
        /// Its log index.
        index: u64,
        /// What applying it did.
        outcome: Outcome,
    },
    /// One of this member's proposals did not reach the log in time.
    Abandoned {
        /// The proposal's nonce.
        nonce: u64,
        /// Why.
        why: String,
    },
    /// The state changed; it is at `index` now.
    Changed {
        /// The last applied index.
        index: u64,
    },
    /// Who leads changed.
    Leader {
        /// The leader, if one is known.
        leader: Option<NodeIx>,
        /// The term.
        term: u64,
    },
}

/// Why the metadata log refused a call.
#[derive(Debug, thiserror::Error)]
pub enum MetaError {
    /// A peer's Raft message is malformed.
    #[error(transparent)]
    Wire(#[from] wire::WireError),
    /// A message whose sender is not the node its certificate names.
    #[error("node {node} sent a raft message as raft id {claimed:#x}")]
    Impostor {
        /// The node the certificate names.
        node: NodeIx,
        /// The identity the message claims.
        claimed: u64,
    },
    /// A message for another identity (an older incarnation of this node).
    #[error("a raft message for raft id {to:#x}, not this member's")]
    NotForMe {
        /// The recipient it names.
        to: u64,
    },
    /// Configuration changes are proposed on the leader only.
    #[error("not the metadata leader (the leader is {leader:?})")]
    NotLeader {
        /// The leader, if known.
        leader: Option<NodeIx>,
    },
    /// The state refuses the proposal as it stands.
    #[error("refused: {0}")]
    Refused(String),
    /// raft-rs refused the message or proposal.
    #[error("raft: {0}")]
    Raft(#[from] raft::Error),
    /// The log could not be persisted, or raft-rs failed: this member stops
    /// taking part in the metadata log (it keeps serving with the state it
    /// has) until it restarts from its durable log.
    #[error("the metadata log stopped on this member: {0}")]
    Failed(String),
}

/// A proposal of this member's waiting to apply.
#[derive(Debug)]
struct Pending {
    proposal: Proposal,
    since: u64,
    retry_at: u64,
}

/// Forwards raft-rs's `slog` records to `tracing`.
struct TracingDrain;

impl slog::Drain for TracingDrain {
    type Ok = ();
    type Err = slog::Never;

    fn log(&self, record: &slog::Record<'_>, _: &slog::OwnedKVList) -> Result<(), slog::Never> {
        match record.level() {
            slog::Level::Critical | slog::Level::Error => {
                tracing::warn!(target: "cachet::meta", "raft: {}", record.msg())
            }
            slog::Level::Warning | slog::Level::Info => {
                tracing::debug!(target: "cachet::meta", "raft: {}", record.msg())
            }
            _ => tracing::trace!(target: "cachet::meta", "raft: {}", record.msg()),
        }
        Ok(())
    }
}

/// One member's part in the metadata log.
pub struct MetaNode {
    me: NodeIx,
    raw: RawNode<MetaStorage>,
    state: Option<MetaState>,
    config: MetaConfig,
    rng: u64,
    /// When a message from the current leader last arrived (this
    /// member's clock), for [`MetaNode::in_contact`].
    leader_heard_at: Option<u64>,
    next_tick: u64,
    outbox: VecDeque<(NodeIx, RaftWire)>,
    events: VecDeque<MetaEvent>,
    role: (u64, StateRole, u64),
    nonce: u64,
    pending: BTreeMap<u64, Pending>,
    failed: Option<String>,
}

impl MetaNode {
    /// The member `me` under Raft identity `raft_id`, on `storage` (a
    /// founding snapshot, a log loaded from the data directory, or nothing
    /// for a member that joins). `seed` draws election timeouts (the boot
    /// nonce in production, the simulator's seed in tests); `nonce_base`
    /// must exceed every nonce this member used before it restarted (the
    /// boot time in microseconds does).
    pub fn new(
        me: NodeIx,
        raft_id: u64,
        storage: MetaStorage,
        config: MetaConfig,
        seed: u64,
        nonce_base: u64,
        now: u64,
    ) -> Result<Self, MetaError> {
        let snapshot = storage.stored_snapshot();
        let state = match snapshot.as_ref().filter(|s| !s.data.is_empty()) {
            Some(s) => {
                Some(MetaState::decode(&s.data).map_err(|e| MetaError::Failed(format!("stored snapshot: {e}")))?)
            }
            None => None,
        };
        let raft_config = raft::Config {
            id: raft_id,
            election_tick: config.election_tick,
            heartbeat_tick: config.heartbeat_tick,
            pre_vote: true,
            check_quorum: true,
            max_size_per_msg: 1 << 20,
            max_inflight_msgs: 256,
            ..raft::Config::default()
        };
        let logger = slog::Logger::root(TracingDrain, slog::o!());
        let raw = RawNode::new(&raft_config, storage, &logger)?;
        let mut node = Self {
            me,
            raw,
            state,
            config,
            rng: seed,
            leader_heard_at: None,
            next_tick: now,
            outbox: VecDeque::new(),
            events: VecDeque::new(),
            role: (0, StateRole::Follower, 0),
            nonce: nonce_base,
            pending: BTreeMap::new(),
            failed: None,
        };
        node.next_tick = now + node.config.tick_ms;
        node.rejitter();
        node.role = node.role_now();
        node.drive();
        Ok(node)
    }

    /// This member's node id.
    pub fn me(&self) -> NodeIx {
        self.me
    }

    /// The state as this member last applied it (`None` for a joining
    /// member that has not received it yet).
    pub fn state(&self) -> Option<&MetaState> {
        self.state.as_ref()
    }

    /// Whether this member leads.
    pub fn is_leader(&self) -> bool {
        self.raw.raft.state == StateRole::Leader
    }

    /// The leader this member knows of.
    pub fn leader(&self) -> Option<NodeIx> {
        match self.raw.raft.leader_id {
            0 => None,
            id => node_of(id),
        }
    }

    /// The current term.
    pub fn term(&self) -> u64 {
        self.raw.raft.term
    }

    /// The last index applied here.
    pub fn applied(&self) -> u64 {
        self.state.as_ref().map_or(0, |s| s.applied)
    }

    /// The voters' Raft identities.
    pub fn voters(&self) -> Vec<u64> {
        self.raw.raft.prs().conf().to_conf_state().voters
    }

    /// Whether `raft_id` holds every committed entry, as this member
    /// knows (the leader knows; others answer for themselves only).
    pub fn caught_up(&self, raft_id: u64) -> bool {
        if raft_id == self.raw.raft.id {
            return true;
        }
        self.raw.raft.prs().get(raft_id).is_some_and(|p| p.matched >= self.raw.raft.raft_log.committed)
    }

    /// Whether a configuration change is proposed and not applied yet.
    pub fn has_pending_conf_change(&self) -> bool {
        self.raw.raft.pending_conf_index > self.applied()
    }

    /// Why this member stopped taking part in the log, if it did.
    pub fn failed(&self) -> Option<&str> {
        self.failed.as_deref()
    }

    /// Proposals of this member's still waiting.
    pub fn pending(&self) -> usize {
        self.pending.len()
    }

    /// A peer's Raft message. `from` is the node the sender's certificate
    /// names; the message must claim that node's identity and be for this
    /// member's.
    pub fn handle(&mut self, now: u64, from: NodeIx, wire: RaftWire) -> Result<(), MetaError> {
        self.check_alive()?;
        if node_of(wire.from) != Some(from) {
            return Err(MetaError::Impostor { node: from, claimed: wire.from });
        }
        if wire.to != self.raw.raft.id {
            return Err(MetaError::NotForMe { to: wire.to });
        }
        let (sender, term) = (wire.from, wire.term);
        let message = wire.to_message()?;
        self.step(message)?;
        if sender == self.raw.raft.leader_id && term == self.raw.raft.term {
            self.leader_heard_at = Some(now);
        }
        self.drive();
        self.check_alive()
    }

    /// Hands leadership to `raft_id` (a voter): a leader that is leaving
    /// does so before the new leader removes it from the log.
    pub fn transfer_leader(&mut self, raft_id: u64) {
        if self.failed.is_some() || !self.is_leader() {
            return;
        }
        self.raw.transfer_leader(raft_id);
        self.drive();
    }

    /// Whether this member is in touch with the log: it leads (and, with
    /// check-quorum, a leader cut off from a majority steps down within an
    /// election timeout), or it heard from the current leader within
    /// `lease_ms`. A member out of touch may be on the minority side of a
    /// partition, where the majority's leader can move its slots away: its
    /// copies stop counting before that can happen.
    pub fn in_contact(&self, now: u64, lease_ms: u64) -> bool {
        self.failed.is_none()
            && (self.is_leader()
                || (self.raw.raft.leader_id != 0
                    && self.leader_heard_at.is_some_and(|t| now.saturating_sub(t) <= lease_ms)))
    }

    /// Advances the clock: Raft ticks (at most two after a long gap, such
    /// as a paused process: pre-vote keeps a member that slept from
    /// disrupting the rest) and proposal retries.
    pub fn tick(&mut self, now: u64) {
        if self.failed.is_some() {
            return;
        }
        let mut ticks = 0;
        while now >= self.next_tick && ticks < 2 {
            self.raw.tick();
            self.next_tick += self.config.tick_ms;
            ticks += 1;
        }
        if now >= self.next_tick {
            self.next_tick = now + self.config.tick_ms;
        }
        let due: Vec<u64> = self.pending.iter().filter(|(_, p)| p.retry_at <= now).map(|(n, _)| *n).collect();
        for nonce in due {
            let Some(p) = self.pending.get_mut(&nonce) else { continue };
            if now.saturating_sub(p.since) >= self.config.give_up_ms {
                self.pending.remove(&nonce);
                self.events.push_back(MetaEvent::Abandoned { nonce, why: "not applied in time".into() });
                continue;
            }
            p.retry_at = now + self.config.retry_ms;
            let proposal = p.proposal.clone();
            if let Err(e @ MetaError::NotLeader { .. }) = self.submit(&proposal) {
                self.pending.remove(&nonce);
                self.events.push_back(MetaEvent::Abandoned { nonce, why: e.to_string() });
            }
        }
        self.drive();
    }

    /// Proposes `entry`; its fate arrives as [`MetaEvent::Decided`] (or
    /// [`MetaEvent::Abandoned`]) with the returned nonce. Configuration
    /// changes are taken on the leader only.
    pub fn propose(&mut self, now: u64, entry: MetaEntry) -> Result<u64, MetaError> {
        self.check_alive()?;
        if entry.is_conf_change() && !self.is_leader() {
            return Err(MetaError::NotLeader { leader: self.leader() });
        }
        self.nonce += 1;
        let proposal = Proposal { proposer: self.me, nonce: self.nonce, entry };
        if let Some(Outcome::Refused(why)) = self.state.as_ref().map(|s| s.check(&proposal)) {
            return Err(MetaError::Refused(why));
        }
        // Dropped while no leader is known: the retry proposes it again.
        let _ = self.submit(&proposal);
        let nonce = proposal.nonce;
        self.pending.insert(nonce, Pending { proposal, since: now, retry_at: now + self.config.retry_ms });
        self.drive();
        self.check_alive()?;
        Ok(nonce)
    }

    /// The next message to send, and to which node.
    pub fn poll_transmit(&mut self) -> Option<(NodeIx, RaftWire)> {
        self.outbox.pop_front()
    }

    /// The next event.
    pub fn poll_event(&mut self) -> Option<MetaEvent> {
        self.events.pop_front()
    }

    /// When [`Self::tick`] is next due.
    pub fn poll_timeout(&self) -> Option<u64> {
        if self.failed.is_some() {
            return None;
        }
        let retry = self.pending.values().map(|p| p.retry_at).min();
        Some(retry.map_or(self.next_tick, |r| r.min(self.next_tick)))
    }

    /// The shell could not reach `node`: the leader stops streaming
    /// appends to it until it answers again.
    pub fn report_unreachable(&mut self, node: NodeIx) {
        let ids: Vec<u64> =
            self.raw.raft.prs().iter().map(|(id, _)| *id).filter(|id| node_of(*id) == Some(node)).collect();
        for id in ids {
            self.raw.report_unreachable(id);
        }
    }

    fn check_alive(&self) -> Result<(), MetaError> {
        match &self.failed {
            Some(why) => Err(MetaError::Failed(why.clone())),
            None => Ok(()),
        }
    }

    fn fail(&mut self, why: String) {
        tracing::error!(target: "cachet::meta", node = self.me, "metadata log stopped: {why}");
        self.failed.get_or_insert(why);
    }

    /// Steps one message. raft-rs panics on some inconsistencies (a
    /// "leader" contradicting a committed entry: only a member whose
    /// certificate is valid but which is broken or hostile can cause it,
    /// Raft not being Byzantine-tolerant); the panic is caught and this
    /// member stops taking part in the log rather than the node going down.
    fn step(&mut self, message: Message) -> Result<(), MetaError> {
        match catch_unwind(AssertUnwindSafe(|| self.raw.step(message))) {
            Ok(result) => result.map_err(MetaError::from),
            Err(_) => {
                self.fail("raft-rs panicked on a peer's message".into());
                Err(MetaError::Failed("raft-rs panicked on a peer's message".into()))
            }
        }
    }

    fn submit(&mut self, proposal: &Proposal) -> Result<(), MetaError> {
        let bytes = proposal.encode();
        let result = if proposal.entry.is_conf_change() {
            if !self.is_leader() {
                return Err(MetaError::NotLeader { leader: self.leader() });
            }
            let Some(cc) = self.conf_change(&proposal.entry) else {
                return Err(MetaError::Refused("no such member".into()));
            };
            catch_unwind(AssertUnwindSafe(|| self.raw.propose_conf_change(bytes, cc)))
        } else {
            catch_unwind(AssertUnwindSafe(|| self.raw.propose(Vec::new(), bytes)))
        };
        match result {
            Ok(r) => r.map_err(MetaError::from),
            Err(_) => {
                self.fail("raft-rs panicked on a proposal".into());
                Err(MetaError::Failed("raft-rs panicked on a proposal".into()))
            }
        }
    }

    /// The Raft configuration change a membership entry makes, built from
    /// Cachet's own entry (never parsed from raft-rs's protobuf bytes).
    fn conf_change(&self, entry: &MetaEntry) -> Option<ConfChangeV2> {
        let member_id = |node: &NodeIx| self.state.as_ref()?.members.get(node).map(|m| m.raft_id);
        let (kind, id) = match entry {
            MetaEntry::AddMember { member, voter: true } => (ConfChangeType::AddNode, member.raft_id),
            MetaEntry::AddMember { member, voter: false } => (ConfChangeType::AddLearnerNode, member.raft_id),
            MetaEntry::Promote { node } => (ConfChangeType::AddNode, member_id(node)?),
            MetaEntry::RemoveMember { raft_id, .. } => (ConfChangeType::RemoveNode, *raft_id),
            _ => return None,
        };
        let mut single = ConfChangeSingle::default();
        single.set_change_type(kind);
        single.node_id = id;
        let mut cc = ConfChangeV2::default();
        cc.changes.push(single);
        Some(cc)
    }

    fn role_now(&self) -> (u64, StateRole, u64) {
        (self.raw.raft.term, self.raw.raft.state, self.raw.raft.leader_id)
    }

    /// Election timeouts drawn from this member's seeded generator, not
    /// raft-rs's thread-local one, so a simulated schedule replays exactly.
    fn rejitter(&mut self) {
        self.rng = self.rng.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.rng;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        let et = self.config.election_tick;
        self.raw.raft.set_randomized_election_timeout(et + (z % et.max(1) as u64) as usize);
    }

    /// Runs Ready cycles until raft-rs has nothing more; a storage failure
    /// stops this member's part in the log.
    fn drive(&mut self) {
        for _ in 0..16 {
            if self.failed.is_some() || !self.raw.has_ready() {
                break;
            }
            let cycle = catch_unwind(AssertUnwindSafe(|| self.ready_cycle()));
            match cycle {
                Ok(Ok(())) => {}
                Ok(Err(why)) => self.fail(why),
                Err(_) => self.fail("raft-rs panicked in a ready cycle".into()),
            }
        }
        if self.failed.is_none()
            && let Err(why) = self.maybe_compact()
        {
            self.fail(why);
        }
        let role = self.role_now();
        if role != self.role {
            if (role.0, role.1) != (self.role.0, self.role.1) {
                self.rejitter();
            }
            if role.2 != self.role.2 || role.0 != self.role.0 {
                self.events.push_back(MetaEvent::Leader { leader: self.leader(), term: role.0 });
            }
            self.role = role;
        }
    }

    fn ready_cycle(&mut self) -> Result<(), String> {
        let mut rd = self.raw.ready();
        self.send(rd.take_messages());
        if !rd.snapshot().is_empty() {
            let snap = rd.snapshot().clone();
            let state = MetaState::decode(&snap.data).map_err(|e| format!("a snapshot from the leader: {e}"))?;
            self.raw.mut_store().install(&snap).map_err(|e| e.to_string())?;
            let index = snap.get_metadata().index;
            let mut state = state;
            state.applied = index;
            self.state = Some(state);
            self.events.push_back(MetaEvent::Changed { index });
        }
        self.apply(rd.take_committed_entries())?;
        let store = self.raw.mut_store();
        store.append(rd.entries()).map_err(|e| e.to_string())?;
        if let Some(hs) = rd.hs() {
            store.set_hard_state(hs).map_err(|e| e.to_string())?;
        }
        store.sync().map_err(|e| e.to_string())?;
        self.send(rd.take_persisted_messages());
        let mut light = self.raw.advance(rd);
        if let Some(commit) = light.commit_index() {
            self.raw.mut_store().set_commit(commit).map_err(|e| e.to_string())?;
        }
        self.send(light.take_messages());
        self.apply(light.take_committed_entries())?;
        self.raw.advance_apply();
        self.raw.mut_store().sync().map_err(|e| e.to_string())
    }

    fn send(&mut self, messages: Vec<Message>) {
        for m in messages {
            let Some(to) = node_of(m.to) else { continue };
            if m.get_msg_type() == MessageType::MsgSnapshot {
                // raft-rs pauses the follower until told how the snapshot
                // went; a lost one is noticed by the follower's rejection.
                self.raw.report_snapshot(m.to, SnapshotStatus::Finish);
            }
            self.outbox.push_back((to, RaftWire::from_message(&m)));
        }
    }

    fn apply(&mut self, entries: Vec<Entry>) -> Result<(), String> {
        for entry in entries {
            let Some(applied) = self.state.as_ref().map(|s| s.applied) else {
                return Err(format!("entry {} committed before any state arrived", entry.index));
            };
            if entry.index <= applied {
                continue;
            }
            let (proposal, outcome) = match entry.get_entry_type() {
                EntryType::EntryNormal if entry.data.is_empty() => {
                    // A new leader's empty entry.
                    if let Some(state) = self.state.as_mut() {
                        state.applied = entry.index;
                    }
                    continue;
                }
                EntryType::EntryNormal => {
                    let proposal = Proposal::decode(&entry.data).ok();
                    let outcome = self.apply_plain(entry.index, proposal.as_ref());
                    (proposal, outcome)
                }
                EntryType::EntryConfChangeV2 => {
                    let proposal = Proposal::decode(&entry.context).ok();
                    let outcome = self.apply_conf_change(entry.index, proposal.as_ref());
                    (proposal, outcome)
                }
                EntryType::EntryConfChange => (None, self.apply_plain(entry.index, None)),
            };
            if outcome == Outcome::Applied {
                self.events.push_back(MetaEvent::Changed { index: entry.index });
            }
            if let Some(p) = proposal.filter(|p| p.proposer == self.me)
                && self.pending.remove(&p.nonce).is_some()
            {
                self.events.push_back(MetaEvent::Decided { nonce: p.nonce, index: entry.index, outcome });
            }
        }
        Ok(())
    }

    fn apply_plain(&mut self, index: u64, proposal: Option<&Proposal>) -> Outcome {
        match self.state.as_mut() {
            Some(state) => state.apply(index, proposal),
            None => Outcome::Refused("no state".into()),
        }
    }

    /// A committed configuration change: raft-rs's configuration changes
    /// only when the state takes the entry, so both agree on every member.
    fn apply_conf_change(&mut self, index: u64, proposal: Option<&Proposal>) -> Outcome {
        let check = match (self.state.as_ref(), proposal) {
            (Some(state), Some(p)) => state.check(p),
            _ => Outcome::Refused("a configuration change that does not decode".into()),
        };
        let cc = proposal.filter(|_| check == Outcome::Applied).and_then(|p| self.conf_change(&p.entry));
        let mut proposal = proposal;
        if let Some(cc) = cc {
            match self.raw.apply_conf_change(&cc) {
                Ok(cs) => self.raw.mut_store().set_conf_state(cs),
                Err(e) => {
                    tracing::warn!(target: "cachet::meta", "configuration change at {index} refused by raft: {e}");
                    proposal = None;
                }
            }
        }
        self.apply_plain(index, proposal)
    }

    fn maybe_compact(&mut self) -> Result<(), String> {
        let Some(state) = self.state.as_ref() else { return Ok(()) };
        let store = self.raw.store();
        let wanted = store.take_snapshot_wanted();
        let behind = state.applied.saturating_sub(store.snapshot_index());
        if behind == 0 || (!wanted && behind < self.config.compact_every) {
            return Ok(());
        }
        let (applied, data) = (state.applied, state.encode());
        let store = self.raw.mut_store();
        store.compact(applied, data).map_err(|e| e.to_string())?;
        store.sync().map_err(|e| e.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::entry::{MemberRecord, MemberState, Settings, StoredModule};
    use super::storage::MemDurable;
    use super::wire::{WireConf, WireSnapshot};
    use super::*;
    use crate::cluster::replica::Consistency;

    fn three() -> Vec<MetaNode> {
        let founders: Vec<MemberRecord> = (0..3)
            .map(|i| MemberRecord {
                node: i,
                raft_id: raft_id(i, 0),
                peer: ([127, 0, 0, 1], 7000 + i as u16).into(),
                client: None,
                weight: 1,
                state: MemberState::Serving,
                reason: String::new(),
                since: 1,
                resp: None,
            })
            .collect();
        let state =
            MetaState::founding(founders.clone(), Settings { rf: 3, consistency: Consistency::Quorum }).expect("state");
        let snap = WireSnapshot {
            data: state.encode().into(),
            index: 1,
            term: 1,
            conf: WireConf { voters: founders.iter().map(|m| m.raft_id).collect(), ..WireConf::default() },
        };
        (0..3)
            .map(|i| {
                let storage = MetaStorage::found(snap.clone(), Box::new(MemDurable::default())).expect("storage");
                MetaNode::new(i, raft_id(i, 0), storage, MetaConfig::default(), u64::from(i), 1 << 40, 0).expect("node")
            })
            .collect()
    }

    fn stored(label: &str) -> StoredModule {
        StoredModule {
            label: label.into(),
            sha256: label.into(),
            size: 1,
            config: Vec::new(),
            fuel_per_call: 1,
            max_memory_bytes: 1,
        }
    }

    /// Runs the three members on a perfect network for `ms`.
    fn run(nodes: &mut [MetaNode], from: u64, ms: u64) {
        for now in from..from + ms {
            for i in 0..nodes.len() {
                nodes[i].tick(now);
                while let Some((to, wire)) = nodes[i].poll_transmit() {
                    let _ = nodes[to as usize].handle(now, i as NodeIx, wire);
                }
            }
        }
    }

    #[test]
    fn three_members_elect_commit_and_agree() {
        let mut nodes = three();
        run(&mut nodes, 0, 2_000);
        let leader = nodes.iter().position(MetaNode::is_leader).expect("a leader within 2 s");
        assert!(nodes.iter().all(|n| n.leader() == Some(leader as NodeIx)));
        let follower = (leader + 1) % 3;
        let nonce = nodes[follower]
            .propose(2_000, MetaEntry::ModuleStored(stored("lru@1")))
            .expect("a follower forwards plain proposals");
        run(&mut nodes, 2_000, 500);
        let events: Vec<_> = std::iter::from_fn(|| nodes[follower].poll_event()).collect();
        assert!(
            events
                .iter()
                .any(|e| matches!(e, MetaEvent::Decided { nonce: n, outcome: Outcome::Applied, .. } if *n == nonce)),
            "{events:?}"
        );
        let digests: Vec<_> = nodes.iter().map(|n| n.state().map(MetaState::digest)).collect();
        assert!(digests.iter().all(|d| *d == digests[0]), "{digests:?}");
        assert!(nodes.iter().all(|n| n.state().is_some_and(|s| s.modules.contains_key("lru@1"))));
        // Membership changes go through the leader only.
        let err = nodes[follower].propose(2_500, MetaEntry::Promote { node: 1 }).err();
        assert!(matches!(err, Some(MetaError::NotLeader { leader: Some(l) }) if l == leader as NodeIx), "{err:?}");
    }

    #[test]
    fn hostile_raft_messages_are_refused_and_a_lying_leader_stops_only_the_log() {
        let mut nodes = three();
        run(&mut nodes, 0, 2_000);
        let leader = nodes.iter().position(MetaNode::is_leader).expect("a leader");
        for k in 0..5 {
            let _ = nodes[leader].propose(2_000, MetaEntry::ModuleStored(stored(&format!("m{k}@1"))));
        }
        run(&mut nodes, 2_000, 500);
        let victim = (leader + 1) % 3;
        let liar = (leader + 2) % 3;
        let committed = nodes[victim].applied();
        assert!(committed >= 6, "{committed}");
        let base = RaftWire {
            term: nodes[victim].term(),
            ..RaftWire::empty(3, raft_id(victim as NodeIx, 0), raft_id(liar as NodeIx, 0))
        };
        let t = 2_600;
        // A certificate for one node, a message claiming another.
        let err = nodes[victim].handle(t, leader as NodeIx, base.clone()).err();
        assert!(matches!(err, Some(MetaError::Impostor { .. })), "{err:?}");
        let err = nodes[victim]
            .handle(t, liar as NodeIx, RaftWire { to: raft_id(victim as NodeIx, 1), ..base.clone() })
            .err();
        assert!(matches!(err, Some(MetaError::NotForMe { .. })), "{err:?}");
        let err = nodes[victim].handle(t, liar as NodeIx, RaftWire { kind: 0, ..base.clone() }).err();
        assert!(
            matches!(err, Some(MetaError::Wire(wire::WireError::MessageType(0)))),
            "a peer cannot start an election here"
        );
        assert!(nodes[victim].failed().is_none());
        // A member with a valid certificate lying as leader of a later
        // term, claiming a commit index past the end of this member's log:
        // raft-rs panics on that (Raft is not Byzantine tolerant). This
        // member's log stops with a typed error; the process and its data
        // path do not.
        let lie = RaftWire { kind: 8, term: 99, commit: committed + 100, ..base };
        let err = nodes[victim].handle(t, liar as NodeIx, lie).err();
        assert!(matches!(err, Some(MetaError::Failed(_))), "{err:?}");
        assert!(nodes[victim].failed().is_some());
        assert!(nodes[victim].state().is_some_and(|s| s.modules.contains_key("m4@1")), "the applied state stays");
        assert!(matches!(nodes[victim].propose(t, MetaEntry::Noop), Err(MetaError::Failed(_))));
    }
}
