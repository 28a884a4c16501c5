//! raft-rs's messages in Cachet's own encoding.
//!
//! raft-rs 0.7 speaks protobuf 2 types (`eraftpb`), and protobuf 2.28's
//! parser has a known stack overflow on crafted input (RUSTSEC-2024-0437).
//! So peer bytes never reach it: a Raft message crosses the wire as
//! [`RaftWire`], a serde mirror of `eraftpb::Message` carried inside the
//! peer transport's MessagePack frames (depth-limited like every other
//! frame), and is converted field by field. The same mirror types are what
//! the log's durable files hold.
//!
//! The conversion refuses what no honest peer sends: message types that
//! raft-rs only makes for itself (`MsgHup`, `MsgBeat`, ... would let a peer
//! start an election here or fake a snapshot report), entry types that do
//! not exist, and forwarded proposals carrying configuration changes (raft-rs
//! parses those with protobuf on the leader; a member proposes them only on
//! its own leader, never through a peer).

use bytes::Bytes;
use raft::eraftpb::{ConfState, Entry, EntryType, HardState, Message, MessageType, Snapshot, SnapshotMetadata};
use serde::{Deserialize, Serialize};

/// Why a peer's Raft message was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    /// A message type that does not exist or that only a node makes for
    /// itself.
    #[error("raft message type {0} is not accepted from a peer")]
    MessageType(u8),
    /// An entry type that does not exist.
    #[error("raft entry type {0} does not exist")]
    EntryType(u8),
    /// A forwarded proposal that is not a plain entry.
    #[error("a forwarded raft proposal may carry only normal entries")]
    ForwardedConfChange,
}

/// One log entry.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct WireEntry {
    /// `EntryNormal` = 0, `EntryConfChange` = 1, `EntryConfChangeV2` = 2.
    pub kind: u8,
    /// The term it was proposed in.
    pub term: u64,
    /// Its index in the log.
    pub index: u64,
    /// raft-rs's payload: for normal entries Cachet's encoded proposal; for
    /// configuration changes raft-rs's own encoding, which Cachet never
    /// parses (it reads `context`).
    pub data: Bytes,
    /// For configuration changes, Cachet's encoded proposal.
    pub context: Bytes,
}

/// Who votes and who learns.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct WireConf {
    /// Voters of the (incoming) configuration.
    pub voters: Vec<u64>,
    /// Learners.
    pub learners: Vec<u64>,
    /// Voters of the outgoing configuration, during a joint change.
    pub voters_outgoing: Vec<u64>,
    /// Learners once the joint change ends.
    pub learners_next: Vec<u64>,
    /// Whether the joint change ends by itself.
    pub auto_leave: bool,
}

/// A snapshot of the metadata state at `index`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct WireSnapshot {
    /// The encoded `MetaState`.
    pub data: Bytes,
    /// The last index it includes.
    pub index: u64,
    /// That entry's term.
    pub term: u64,
    /// The configuration as of `index`.
    pub conf: WireConf,
}

/// The vote and the term, persisted before any message that depends on
/// them is sent.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct WireHardState {
    /// The current term.
    pub term: u64,
    /// Who this node voted for in it (0: nobody).
    pub vote: u64,
    /// The highest index known committed.
    pub commit: u64,
}

/// One Raft message between members.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RaftWire {
    /// `eraftpb::MessageType` as its number.
    pub kind: u8,
    /// Recipient's raft id.
    pub to: u64,
    /// Sender's raft id.
    pub from: u64,
    /// The sender's term.
    pub term: u64,
    /// The term of the entry before `entries`.
    pub log_term: u64,
    /// The index of the entry before `entries` (or the index acknowledged).
    pub index: u64,
    /// Entries appended.
    pub entries: Vec<WireEntry>,
    /// The sender's commit index.
    pub commit: u64,
    /// The term of the sender's commit index.
    pub commit_term: u64,
    /// A snapshot (`MsgSnapshot` only).
    pub snapshot: Option<WireSnapshot>,
    /// An index a follower asks a snapshot for.
    pub request_snapshot: u64,
    /// Whether the answer refuses.
    pub reject: bool,
    /// Where a refusing follower's log may match.
    pub reject_hint: u64,
    /// Read-index and campaign contexts.
    pub context: Bytes,
    /// The sender's election priority.
    pub priority: i64,
}

fn entry_type(kind: u8) -> Result<EntryType, WireError> {
    match kind {
        0 => Ok(EntryType::EntryNormal),
        1 => Ok(EntryType::EntryConfChange),
        2 => Ok(EntryType::EntryConfChangeV2),
        other => Err(WireError::EntryType(other)),
    }
}

/// The message types a peer may send: replication, votes, heartbeats,
/// snapshots, leadership transfer and read-index traffic. The rest are
/// raft-rs's local signals.
fn peer_message_type(kind: u8) -> Result<MessageType, WireError> {
    use MessageType::*;
    let t = match kind {
        2 => MsgPropose,
        3 => MsgAppend,
        4 => MsgAppendResponse,
        5 => MsgRequestVote,
        6 => MsgRequestVoteResponse,
        7 => MsgSnapshot,
        8 => MsgHeartbeat,
        9 => MsgHeartbeatResponse,
        13 => MsgTransferLeader,
        14 => MsgTimeoutNow,
        15 => MsgReadIndex,
        16 => MsgReadIndexResp,
        17 => MsgRequestPreVote,
        18 => MsgRequestPreVoteResponse,
        other => return Err(WireError::MessageType(other)),
    };
    Ok(t)
}

impl WireEntry {
    /// raft-rs's entry in wire form.
    pub fn from_entry(e: &Entry) -> Self {
        Self {
            kind: e.get_entry_type() as u8,
            term: e.term,
            index: e.index,
            data: e.data.clone(),
            context: e.context.clone(),
        }
    }

    /// Back to raft-rs's entry; an unknown type is refused.
    pub fn to_entry(&self) -> Result<Entry, WireError> {
        let mut e = Entry::default();
        e.set_entry_type(entry_type(self.kind)?);
        e.term = self.term;
        e.index = self.index;
        e.data = self.data.clone();
        e.context = self.context.clone();
        Ok(e)
    }
}

impl WireConf {
    /// raft-rs's configuration in wire form.
    pub fn from_conf(c: &ConfState) -> Self {
        Self {
            voters: c.voters.clone(),
            learners: c.learners.clone(),
            voters_outgoing: c.voters_outgoing.clone(),
            learners_next: c.learners_next.clone(),
            auto_leave: c.auto_leave,
        }
    }

    /// Back to raft-rs's configuration.
    pub fn to_conf(&self) -> ConfState {
        let mut c = ConfState::default();
        c.voters.clone_from(&self.voters);
        c.learners.clone_from(&self.learners);
        c.voters_outgoing.clone_from(&self.voters_outgoing);
        c.learners_next.clone_from(&self.learners_next);
        c.auto_leave = self.auto_leave;
        c
    }
}

impl WireSnapshot {
    /// raft-rs's snapshot in wire form.
    pub fn from_snapshot(s: &Snapshot) -> Self {
        let meta = s.get_metadata();
        Self {
            data: s.data.clone(),
            index: meta.index,
            term: meta.term,
            conf: WireConf::from_conf(meta.get_conf_state()),
        }
    }

    /// Back to raft-rs's snapshot.
    pub fn to_snapshot(&self) -> Snapshot {
        let mut meta = SnapshotMetadata { index: self.index, term: self.term, ..SnapshotMetadata::default() };
        meta.set_conf_state(self.conf.to_conf());
        let mut s = Snapshot { data: self.data.clone(), ..Snapshot::default() };
        s.set_metadata(meta);
        s
    }
}

impl WireHardState {
    /// raft-rs's hard state in wire form.
    pub fn from_hard_state(h: &HardState) -> Self {
        Self { term: h.term, vote: h.vote, commit: h.commit }
    }

    /// Back to raft-rs's hard state.
    pub fn to_hard_state(self) -> HardState {
        HardState { term: self.term, vote: self.vote, commit: self.commit, ..HardState::default() }
    }
}

impl RaftWire {
    /// A message of `kind` from `from` to `to` with every other field empty
    /// (for tests that craft messages).
    #[cfg(test)]
    pub(crate) fn empty(kind: u8, to: u64, from: u64) -> Self {
        Self {
            kind,
            to,
            from,
            term: 0,
            log_term: 0,
            index: 0,
            entries: vec![],
            commit: 0,
            commit_term: 0,
            snapshot: None,
            request_snapshot: 0,
            reject: false,
            reject_hint: 0,
            context: Bytes::new(),
            priority: 0,
        }
    }

    /// A message raft-rs produced, for the wire.
    pub fn from_message(m: &Message) -> Self {
        Self {
            kind: m.get_msg_type() as u8,
            to: m.to,
            from: m.from,
            term: m.term,
            log_term: m.log_term,
            index: m.index,
            entries: m.entries.iter().map(WireEntry::from_entry).collect(),
            commit: m.commit,
            commit_term: m.commit_term,
            snapshot: m.snapshot.as_ref().map(WireSnapshot::from_snapshot),
            request_snapshot: m.request_snapshot,
            reject: m.reject,
            reject_hint: m.reject_hint,
            context: m.context.clone(),
            priority: m.priority,
        }
    }

    /// A peer's message for raft-rs, checked (see the module's doc).
    pub fn to_message(&self) -> Result<Message, WireError> {
        let kind = peer_message_type(self.kind)?;
        let mut m = Message::default();
        m.set_msg_type(kind);
        m.to = self.to;
        m.from = self.from;
        m.term = self.term;
        m.log_term = self.log_term;
        m.index = self.index;
        for e in &self.entries {
            let entry = e.to_entry()?;
            if kind == MessageType::MsgPropose && entry.get_entry_type() != EntryType::EntryNormal {
                return Err(WireError::ForwardedConfChange);
            }
            m.entries.push(entry);
        }
        m.commit = self.commit;
        m.commit_term = self.commit_term;
        if let Some(s) = &self.snapshot {
            m.set_snapshot(s.to_snapshot());
        }
        m.request_snapshot = self.request_snapshot;
        m.reject = self.reject;
        m.reject_hint = self.reject_hint;
        m.context = self.context.clone();
        m.priority = self.priority;
        Ok(m)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn entry() -> impl Strategy<Value = WireEntry> {
        (
            0u8..3,
            any::<u64>(),
            any::<u64>(),
            proptest::collection::vec(any::<u8>(), 0..20),
            proptest::collection::vec(any::<u8>(), 0..8),
        )
            .prop_map(|(kind, term, index, data, context)| WireEntry {
                kind,
                term,
                index,
                data: data.into(),
                context: context.into(),
            })
    }

    fn conf() -> impl Strategy<Value = WireConf> {
        let ids = || proptest::collection::vec(1u64..1_000, 0..5);
        (ids(), ids(), ids(), ids(), any::<bool>()).prop_map(
            |(voters, learners, voters_outgoing, learners_next, auto_leave)| WireConf {
                voters,
                learners,
                voters_outgoing,
                learners_next,
                auto_leave,
            },
        )
    }

    fn wire() -> impl Strategy<Value = RaftWire> {
        let kinds = prop_oneof![Just(3u8), Just(4), Just(5), Just(6), Just(7), Just(8), Just(9), Just(17), Just(18)];
        let snapshot = proptest::option::of(
            (proptest::collection::vec(any::<u8>(), 0..30), any::<u64>(), any::<u64>(), conf())
                .prop_map(|(data, index, term, conf)| WireSnapshot { data: data.into(), index, term, conf }),
        );
        (
            kinds,
            (any::<u64>(), any::<u64>(), any::<u64>(), any::<u64>(), any::<u64>()),
            proptest::collection::vec(entry(), 0..4),
            (any::<u64>(), any::<u64>(), snapshot, any::<u64>(), any::<bool>(), any::<u64>()),
            (proptest::collection::vec(any::<u8>(), 0..8), any::<i64>()),
        )
            .prop_map(
                |(
                    kind,
                    (to, from, term, log_term, index),
                    entries,
                    (commit, commit_term, snapshot, request_snapshot, reject, reject_hint),
                    (context, priority),
                )| {
                    RaftWire {
                        kind,
                        to,
                        from,
                        term,
                        log_term,
                        index,
                        entries,
                        commit,
                        commit_term,
                        snapshot,
                        request_snapshot,
                        reject,
                        reject_hint,
                        context: context.into(),
                        priority,
                    }
                },
            )
    }

    proptest! {
        /// Every field survives wire -> raft-rs -> wire, and MessagePack.
        #[test]
        fn messages_round_trip(w in wire()) {
            let m = w.to_message().expect("a peer type");
            prop_assert_eq!(&RaftWire::from_message(&m), &w);
            let bytes = rmp_serde::to_vec(&w).expect("encode");
            let back: RaftWire = cachet_proto::frame::from_slice_shallow(&bytes).expect("decode");
            prop_assert_eq!(back, w);
        }

        #[test]
        fn hard_states_round_trip(term in any::<u64>(), vote in any::<u64>(), commit in any::<u64>()) {
            let h = WireHardState { term, vote, commit };
            prop_assert_eq!(WireHardState::from_hard_state(&h.to_hard_state()), h);
        }
    }

    #[test]
    fn local_only_types_and_forwarded_conf_changes_are_refused() {
        let base = RaftWire { term: 1, ..RaftWire::empty(3, 1, 2) };
        for local in [0u8, 1, 10, 11, 12, 19, 255] {
            let w = RaftWire { kind: local, ..base.clone() };
            assert_eq!(w.to_message().err(), Some(WireError::MessageType(local)), "type {local}");
        }
        let cc = WireEntry { kind: 2, term: 1, index: 1, data: Bytes::new(), context: Bytes::new() };
        let w = RaftWire { kind: 2, entries: vec![cc.clone()], ..base.clone() };
        assert_eq!(w.to_message().err(), Some(WireError::ForwardedConfChange));
        let w = RaftWire { kind: 3, entries: vec![cc], ..base.clone() };
        assert!(w.to_message().is_ok(), "a leader replicates conf changes in appends");
        let bad = WireEntry { kind: 7, term: 1, index: 1, data: Bytes::new(), context: Bytes::new() };
        let w = RaftWire { kind: 3, entries: vec![bad], ..base };
        assert_eq!(w.to_message().err(), Some(WireError::EntryType(7)));
    }
}
