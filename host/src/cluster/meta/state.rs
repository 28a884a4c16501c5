//! The metadata state machine: what the log's entries add up to.
//!
//! [`MetaState::apply`] is a pure function of the state and one entry, so
//! every member that applied the same prefix of the log holds the same
//! state (the simulator checks it by digest). It never panics: an entry
//! that is not valid against the state (an unknown member, a duplicate id,
//! a slot plan made on an old epoch) applies as a refusal, the same on
//! every member, and the proposer is told why.

use super::super::replica::{MAX_NODE_ID, NodeIx};
use super::entry::{
    ActivePolicy, Canary, CanaryOutcome, LoaderRecord, MemberRecord, MemberState, MetaEntry, Proposal, Settings,
    StoredModule,
};
use cachet_proto::SlotTable;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};

/// Nonces a proposer's recent proposals used, kept to apply each once.
const NONCES_KEPT: usize = 1_024;

/// A stored policy module.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModuleRecord {
    /// What was stored.
    pub module: StoredModule,
    /// The member that stored it first (holds its bytes).
    pub origin: NodeIx,
    /// The index of the entry that stored it.
    pub stored_at: u64,
}

/// The proposer's recent nonces: applied ones above `floor`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
struct Nonces {
    floor: u64,
    seen: BTreeSet<u64>,
}

/// What applying one entry did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// The entry changed the state (or was a barrier).
    Applied,
    /// The same proposal applied before (a retry): nothing changed.
    Duplicate,
    /// The entry is not valid against the state: nothing changed.
    Refused(String),
}

/// The cluster's metadata at one log index.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MetaState {
    /// The last index applied.
    pub applied: u64,
    /// Members by node id, removed ones included (their ids' history).
    pub members: BTreeMap<NodeIx, MemberRecord>,
    /// Slot placement.
    pub slots: SlotTable,
    /// Cluster-wide settings.
    pub settings: Settings,
    /// Stored modules by `name@version`.
    pub modules: BTreeMap<String, ModuleRecord>,
    /// The active policy module, if one was activated cluster-wide (else
    /// each member runs the policy it was started with).
    pub active: Option<ActivePolicy>,
    /// Policies active before, most recent last (what `Rollback` returns
    /// to).
    pub history: Vec<ActivePolicy>,
    /// The module every member evaluates in shadow, if any.
    pub shadow: Option<String>,
    /// The canary running, if any.
    pub canary: Option<Canary>,
    /// What became of the last canary.
    pub last_canary: Option<CanaryOutcome>,
    /// Quarantined modules and why.
    pub quarantined: BTreeMap<String, String>,
    /// Entries refused so far (for `cachet stats`).
    pub refused: u64,
    nonces: BTreeMap<NodeIx, Nonces>,
    /// The pending members of the current table that hold their slots
    /// ([`MetaEntry::SlotsHeld`]); emptied by every new table.
    #[serde(default)]
    pub held: BTreeSet<NodeIx>,
    /// The cluster's loader configuration, if one was set.
    #[serde(default)]
    pub loaders: Option<LoaderRecord>,
}

impl MetaState {
    /// The founding state: `founders` serving, the slots balanced over
    /// them at epoch 1.
    pub fn founding(founders: Vec<MemberRecord>, settings: Settings) -> Result<Self, cachet_proto::SlotError> {
        let ids: Vec<u32> = founders.iter().map(|m| m.node).collect();
        let slots = SlotTable::balanced(1, &ids, (settings.rf as usize).min(ids.len()))?;
        Ok(Self {
            applied: 1,
            members: founders.into_iter().map(|m| (m.node, m)).collect(),
            slots,
            settings,
            modules: BTreeMap::new(),
            active: None,
            history: Vec::new(),
            shadow: None,
            canary: None,
            last_canary: None,
            quarantined: BTreeMap::new(),
            refused: 0,
            nonces: BTreeMap::new(),
            held: BTreeSet::new(),
            loaders: None,
        })
    }

    /// The state's bytes (a snapshot's data).
    pub fn encode(&self) -> Vec<u8> {
        // Fields by name: a build that added a field (with a serde
        // default) reads older snapshots, and an older build skips the
        // fields it does not know instead of refusing the snapshot.
        rmp_serde::to_vec_named(self).unwrap_or_default()
    }

    /// A state from a snapshot's bytes.
    pub fn decode(bytes: &[u8]) -> Result<Self, rmp_serde::decode::Error> {
        cachet_proto::frame::from_slice_shallow(bytes)
    }

    /// A digest of the whole state, to compare members' states cheaply.
    pub fn digest(&self) -> u64 {
        use std::hash::{Hash, Hasher};
        let mut h = std::hash::DefaultHasher::new();
        self.encode().hash(&mut h);
        h.finish()
    }

    /// Serving members, by node id.
    pub fn serving(&self) -> Vec<NodeIx> {
        self.members.values().filter(|m| m.state == MemberState::Serving).map(|m| m.node).collect()
    }

    /// The policy `node` must run: the canary's on a canary member, else
    /// the active one.
    pub fn policy_for(&self, node: NodeIx) -> Option<&ActivePolicy> {
        match &self.canary {
            Some(c) if c.members.contains(&node) => Some(&c.policy),
            _ => self.active.as_ref(),
        }
    }

    /// The member whose Raft identity is `raft_id`.
    pub fn by_raft_id(&self, raft_id: u64) -> Option<&MemberRecord> {
        self.members.values().find(|m| m.raft_id == raft_id)
    }

    /// Whether `proposal` would apply (the same check [`Self::apply`]
    /// makes), so a configuration change is handed to Raft only when the
    /// state takes it too.
    pub fn check(&self, proposal: &Proposal) -> Outcome {
        let fresh = self
            .nonces
            .get(&proposal.proposer)
            .is_none_or(|n| proposal.nonce > n.floor && !n.seen.contains(&proposal.nonce));
        if !fresh {
            return Outcome::Duplicate;
        }
        if let MetaEntry::SetClient { node, .. } | MetaEntry::SlotsHeld { node, .. } = &proposal.entry
            && *node != proposal.proposer
        {
            return Outcome::Refused(format!("node {} cannot speak for node {node}", proposal.proposer));
        }
        match self.validate(&proposal.entry) {
            Ok(()) => Outcome::Applied,
            Err(why) => Outcome::Refused(why),
        }
    }

    fn validate(&self, entry: &MetaEntry) -> Result<(), String> {
        let member = |node: NodeIx| self.members.get(&node).filter(|m| m.state != MemberState::Removed);
        match entry {
            MetaEntry::AddMember { member: new, .. } => {
                if new.node > MAX_NODE_ID {
                    return Err(format!("node id {} is over {MAX_NODE_ID}", new.node));
                }
                if member(new.node).is_some() {
                    return Err(format!("node {} is already a member", new.node));
                }
                if new.raft_id == 0 || self.members.values().any(|m| m.raft_id == new.raft_id) {
                    return Err(format!("raft id {:#x} was used before", new.raft_id));
                }
                if new.raft_id & 0xffff_ffff != u64::from(new.node) + 1 {
                    return Err(format!("raft id {:#x} does not name node {}", new.raft_id, new.node));
                }
                let clash = self
                    .members
                    .values()
                    .filter(|m| m.state != MemberState::Removed)
                    .find(|m| m.peer == new.peer || m.client == new.client);
                if let Some(other) = clash {
                    return Err(format!("node {} already uses one of those addresses", other.node));
                }
                if new.weight == 0 {
                    return Err("a member's weight must be at least 1".into());
                }
                Ok(())
            }
            MetaEntry::RemoveMember { node, raft_id } => match member(*node) {
                Some(m) if m.raft_id == *raft_id => Ok(()),
                Some(m) => Err(format!("node {node} is raft id {:#x} now, not {raft_id:#x}", m.raft_id)),
                None => Err(format!("node {node} is not a member")),
            },
            MetaEntry::SetClient { node, client, .. } => {
                if member(*node).is_none() {
                    return Err(format!("node {node} is not a member"));
                }
                match self
                    .members
                    .values()
                    .find(|m| m.node != *node && m.state != MemberState::Removed && m.client == Some(*client))
                {
                    Some(other) => Err(format!("node {} already serves clients at {client}", other.node)),
                    None => Ok(()),
                }
            }
            MetaEntry::Promote { node } | MetaEntry::SetState { node, .. } => {
                member(*node).map(|_| ()).ok_or_else(|| format!("node {node} is not a member"))
            }
            MetaEntry::SetSlots { expected_epoch, table } => {
                if *expected_epoch != self.slots.epoch() {
                    return Err(format!(
                        "the slot plan was made at epoch {expected_epoch}; the table is at {}",
                        self.slots.epoch()
                    ));
                }
                if table.epoch() != expected_epoch + 1 {
                    return Err(format!("a new slot table must be at epoch {}", expected_epoch + 1));
                }
                // Deserialized, so not checked yet: every slot covered once,
                // distinct owners.
                SlotTable::new(table.epoch(), table.ranges().to_vec()).map_err(|e| e.to_string())?;
                let unknown = table
                    .ranges()
                    .iter()
                    .flat_map(|r| r.owners.iter().chain(&r.pending))
                    .find(|o| member(**o).is_none());
                match unknown {
                    Some(o) => Err(format!("slot owner {o} is not a member")),
                    None => Ok(()),
                }
            }
            MetaEntry::Settings(s) => {
                if s.rf == 0 {
                    Err("the replication factor must be at least 1".into())
                } else {
                    Ok(())
                }
            }
            MetaEntry::ModuleStored(m) => match self.modules.get(&m.label) {
                Some(r) if r.module.sha256 != m.sha256 => Err(format!("{} is stored with other contents", m.label)),
                _ => Ok(()),
            },
            MetaEntry::Activate { label, bundled, .. } => {
                if !bundled && !self.modules.contains_key(label) {
                    Err(format!("{label} is not stored in the cluster's registry"))
                } else if let Some(why) = self.quarantined.get(label) {
                    Err(format!("{label} is quarantined: {why}"))
                } else {
                    Ok(())
                }
            }
            MetaEntry::Shadow { label: Some(label) } if !self.modules.contains_key(label) => {
                // Bundled modules cannot be told from unknown ones here; the
                // proposer checked its own registry.
                Ok(())
            }
            MetaEntry::Shadow { .. } => Ok(()),
            MetaEntry::Rollback => {
                if self.history.is_empty() {
                    Err("no earlier cluster-wide policy to roll back to".into())
                } else {
                    Ok(())
                }
            }
            MetaEntry::CanaryStart { label, bundled, members, .. } => {
                let serving = self.serving().len();
                if self.canary.is_some() {
                    Err("a canary is running already; wait for its decision".into())
                } else if !bundled && !self.modules.contains_key(label) {
                    Err(format!("{label} is not stored in the cluster's registry"))
                } else if let Some(why) = self.quarantined.get(label) {
                    Err(format!("{label} is quarantined: {why}"))
                } else if *members == 0 || *members as usize >= serving {
                    Err(format!(
                        "a canary needs between 1 and {} members (of the {serving} serving)",
                        serving.max(1) - 1
                    ))
                } else {
                    Ok(())
                }
            }
            MetaEntry::CanaryDecided { label, .. } => match &self.canary {
                Some(c) if c.policy.label == *label => Ok(()),
                _ => Err(format!("no canary of {label} is running")),
            },
            // Any module a member ran (bundled ones are not in `modules`).
            MetaEntry::Quarantine { label, .. } => {
                if self.quarantined.contains_key(label) {
                    Err(format!("{label} is quarantined already"))
                } else {
                    Ok(())
                }
            }
            MetaEntry::Noop => Ok(()),
            MetaEntry::SetLoaders { setting, if_none } => {
                if *if_none && self.loaders.is_some() {
                    return Err("the cluster has a loader configuration already".into());
                }
                let Some(setting) = setting else { return Ok(()) };
                // The text itself is read by every member that builds
                // loaders from it (and by the member that proposed it):
                // here only what keeps the log small.
                if setting.config.len() > crate::loader::shared::MAX_CONFIG_BYTES {
                    return Err(format!("a loader configuration of {} bytes is too large", setting.config.len()));
                }
                if setting.modules.len() > crate::loader::shared::MAX_MODULES {
                    return Err(format!(
                        "a loader configuration naming {} modules names too many",
                        setting.modules.len()
                    ));
                }
                match setting.modules.iter().find(|(sha, _)| !crate::loader::shared::is_sha256(sha)) {
                    Some((sha, _)) => Err(format!("`{sha}` is not a SHA-256")),
                    None => Ok(()),
                }
            }
            MetaEntry::SlotsHeld { node, epoch } => {
                if *epoch != self.slots.epoch() {
                    Err(format!("slots held at epoch {epoch}; the table is at {}", self.slots.epoch()))
                } else if !self.slots.pending_members().contains(node) {
                    Err(format!("node {node} takes no slots over on table {epoch}"))
                } else {
                    Ok(())
                }
            }
        }
    }

    /// Applies the entry at `index`. `proposal` is `None` for bytes that
    /// did not decode: a refusal like any other.
    pub fn apply(&mut self, index: u64, proposal: Option<&Proposal>) -> Outcome {
        self.applied = self.applied.max(index);
        let Some(proposal) = proposal else {
            self.refused += 1;
            return Outcome::Refused("an entry that does not decode".into());
        };
        let outcome = self.check(proposal);
        if outcome == Outcome::Duplicate {
            return outcome;
        }
        self.remember(proposal.proposer, proposal.nonce);
        if let Outcome::Refused(_) = outcome {
            self.refused += 1;
            return outcome;
        }
        self.change(index, proposal.proposer, &proposal.entry);
        Outcome::Applied
    }

    fn remember(&mut self, proposer: NodeIx, nonce: u64) {
        let nonces = self.nonces.entry(proposer).or_default();
        nonces.seen.insert(nonce);
        while nonces.seen.len() > NONCES_KEPT {
            if let Some(oldest) = nonces.seen.pop_first() {
                nonces.floor = nonces.floor.max(oldest);
            }
        }
    }

    /// The change of a valid entry.
    fn change(&mut self, index: u64, proposer: NodeIx, entry: &MetaEntry) {
        match entry {
            MetaEntry::AddMember { member, .. } => {
                let mut record = member.clone();
                record.since = index;
                self.members.insert(record.node, record);
            }
            MetaEntry::Promote { .. } | MetaEntry::Noop => {}
            MetaEntry::RemoveMember { node, .. } => {
                if let Some(m) = self.members.get_mut(node) {
                    m.state = MemberState::Removed;
                    m.reason = "removed".into();
                    m.since = index;
                }
            }
            MetaEntry::SetState { node, state, reason } => {
                if let Some(m) = self.members.get_mut(node) {
                    m.state = *state;
                    m.reason.clone_from(reason);
                    m.since = index;
                }
            }
            MetaEntry::SetClient { node, client, resp } => {
                if let Some(m) = self.members.get_mut(node) {
                    m.client = Some(*client);
                    m.resp = *resp;
                }
            }
            MetaEntry::SetSlots { table, .. } => {
                self.slots = table.clone();
                self.held.clear();
            }
            MetaEntry::SlotsHeld { node, .. } => {
                self.held.insert(*node);
            }
            MetaEntry::Settings(s) => self.settings = s.clone(),
            MetaEntry::SetLoaders { setting, .. } => {
                self.loaders = setting.clone().map(|setting| LoaderRecord { setting, origin: proposer, since: index });
            }
            MetaEntry::ModuleStored(m) => {
                let origin = proposer;
                self.modules.entry(m.label.clone()).or_insert(ModuleRecord {
                    module: m.clone(),
                    origin,
                    stored_at: index,
                });
            }
            MetaEntry::Activate { label, config, .. } => {
                let sha256 = self.modules.get(label).map(|r| r.module.sha256.clone());
                let next = ActivePolicy { label: label.clone(), config: config.clone(), sha256, since: index };
                // Activating what runs again keeps the rollback target.
                if let Some(previous) = self.active.replace(next).filter(|p| p.label != *label || p.config != *config) {
                    self.history.push(previous);
                }
            }
            MetaEntry::Shadow { label } => self.shadow.clone_from(label),
            MetaEntry::Rollback => {
                self.active = self.history.pop().map(|mut p| {
                    p.since = index;
                    p
                });
            }
            MetaEntry::CanaryStart { label, config, members, window_ms, .. } => {
                let sha256 = self.modules.get(label).map(|r| r.module.sha256.clone());
                let policy = ActivePolicy { label: label.clone(), config: config.clone(), sha256, since: index };
                let members = self.serving().into_iter().take(*members as usize).collect();
                self.canary = Some(Canary { policy, members, window_ms: *window_ms });
            }
            MetaEntry::CanaryDecided { label, rolled_out, why } => {
                if let Some(canary) = self.canary.take()
                    && *rolled_out
                {
                    let mut policy = canary.policy;
                    policy.since = index;
                    if let Some(previous) = self.active.replace(policy) {
                        self.history.push(previous);
                    }
                }
                self.last_canary =
                    Some(CanaryOutcome { label: label.clone(), rolled_out: *rolled_out, why: why.clone(), index });
            }
            MetaEntry::Quarantine { label, reason } => {
                self.quarantined.insert(label.clone(), reason.clone());
                self.history.retain(|p| p.label != *label);
                if self.active.as_ref().is_some_and(|p| p.label == *label) {
                    self.active = self.history.pop();
                }
                if self.shadow.as_ref() == Some(label) {
                    self.shadow = None;
                }
                if self.canary.as_ref().is_some_and(|c| c.policy.label == *label) {
                    self.canary = None;
                    let why = format!("quarantined: {reason}");
                    self.last_canary = Some(CanaryOutcome { label: label.clone(), rolled_out: false, why, index });
                }
            }
        }
    }
}

/// Small states for tests elsewhere in the crate (the policy follower's).
#[cfg(test)]
pub(crate) mod testing {
    use super::super::super::replica::Consistency;
    use super::*;

    /// A serving member with addresses on 127.0.0.1.
    pub(crate) fn member(node: NodeIx) -> MemberRecord {
        MemberRecord {
            node,
            raft_id: u64::from(node) + 1,
            peer: format!("127.0.0.1:{}", 7000 + node).parse().expect("addr"),
            client: Some(format!("127.0.0.1:{}", 8000 + node).parse().expect("addr")),
            weight: 1,
            state: MemberState::Serving,
            reason: String::new(),
            since: 1,
            resp: None,
        }
    }

    /// A state founded by members 0, 1 and 2 (RF 3).
    pub(crate) fn founded() -> MetaState {
        MetaState::founding(vec![member(0), member(1), member(2)], Settings { rf: 3, consistency: Consistency::Quorum })
            .expect("founding")
    }

    /// A `ModuleStored` entry.
    pub(crate) fn stored(label: &str, sha256: &str) -> MetaEntry {
        MetaEntry::ModuleStored(StoredModule {
            label: label.into(),
            sha256: sha256.into(),
            size: 1,
            config: Vec::new(),
            fuel_per_call: 1,
            max_memory_bytes: 1,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::testing::{founded, member, stored};
    use super::*;

    fn p(nonce: u64, entry: MetaEntry) -> Proposal {
        Proposal { proposer: 0, nonce, entry }
    }

    fn activation(label: &str) -> MetaEntry {
        MetaEntry::Activate { label: label.into(), config: None, bundled: false }
    }

    #[test]
    fn retries_apply_once_and_bad_entries_are_refused_alike() {
        let mut s = founded();
        let activate = p(10, activation("lru@1"));
        assert!(matches!(s.apply(2, Some(&activate)), Outcome::Refused(_)), "not stored yet");
        let store = p(11, stored("lru@1", "aa"));
        assert_eq!(s.apply(3, Some(&store)), Outcome::Applied);
        assert_eq!(s.apply(4, Some(&store)), Outcome::Duplicate);
        let activate = p(12, activation("lru@1"));
        assert_eq!(s.apply(5, Some(&activate)), Outcome::Applied);
        assert_eq!(s.active.as_ref().map(|a| a.label.as_str()), Some("lru@1"));
        assert!(matches!(s.apply(6, None), Outcome::Refused(_)));
        let stale = p(13, MetaEntry::SetSlots { expected_epoch: 7, table: s.slots.clone() });
        assert!(matches!(s.apply(7, Some(&stale)), Outcome::Refused(_)));
        let dup = p(14, MetaEntry::AddMember { member: member(1), voter: false });
        assert!(matches!(s.apply(8, Some(&dup)), Outcome::Refused(_)));
        let mut forged = member(5);
        forged.raft_id = 3;
        let forged = p(15, MetaEntry::AddMember { member: forged, voter: false });
        assert!(matches!(s.apply(9, Some(&forged)), Outcome::Refused(_)));
        assert_eq!(s.refused, 5);
        assert_eq!(s.applied, 9);
        let back = MetaState::decode(&s.encode()).expect("decode");
        assert_eq!(back, s);
        assert_eq!(back.digest(), s.digest());
    }

    #[test]
    fn a_canary_runs_on_its_members_then_rolls_out_or_back() {
        let mut s = founded();
        s.apply(2, Some(&p(40, stored("c@1", "cc"))));
        let start = |nonce, members| {
            p(
                nonce,
                MetaEntry::CanaryStart { label: "c@1".into(), config: None, bundled: false, members, window_ms: 1_000 },
            )
        };
        assert!(matches!(s.apply(3, Some(&start(41, 3))), Outcome::Refused(_)), "not every member");
        assert_eq!(s.apply(4, Some(&start(42, 1))), Outcome::Applied);
        assert!(matches!(s.apply(5, Some(&start(43, 1))), Outcome::Refused(_)), "one at a time");
        assert_eq!(s.policy_for(0).map(|p| p.label.as_str()), Some("c@1"));
        assert_eq!(s.policy_for(1), None, "the others keep the active policy");
        let decide = |nonce, label: &str, rolled_out| {
            p(nonce, MetaEntry::CanaryDecided { label: label.into(), rolled_out, why: "figures".into() })
        };
        assert!(matches!(s.apply(6, Some(&decide(44, "x@1", true))), Outcome::Refused(_)));
        assert_eq!(s.apply(7, Some(&decide(45, "c@1", true))), Outcome::Applied);
        assert_eq!(s.policy_for(2).map(|p| p.label.as_str()), Some("c@1"), "rolled out to all");
        assert!(s.last_canary.as_ref().is_some_and(|c| c.rolled_out && c.index == 7));
        assert_eq!(s.apply(8, Some(&start(46, 2))), Outcome::Applied);
        assert_eq!(s.apply(9, Some(&decide(47, "c@1", false))), Outcome::Applied);
        assert_eq!(s.canary, None);
        assert!(s.last_canary.as_ref().is_some_and(|c| !c.rolled_out));
    }

    #[test]
    fn the_loader_configuration_is_set_once_by_a_starting_member_and_replaced_by_an_operator() {
        use super::super::entry::LoaderSetting;
        let setting = |config: &str| LoaderSetting { config: config.into(), modules: vec![("ab".repeat(32), 10)] };
        let set = |nonce, config: &str, if_none| Proposal {
            proposer: 1,
            nonce,
            entry: MetaEntry::SetLoaders { setting: Some(setting(config)), if_none },
        };
        let mut s = founded();
        assert_eq!(s.apply(2, Some(&set(50, "a", true))), Outcome::Applied);
        assert!(matches!(s.apply(3, Some(&set(51, "b", true))), Outcome::Refused(_)), "the log's wins");
        assert_eq!(s.loaders.as_ref().map(|l| (l.setting.config.as_str(), l.origin, l.since)), Some(("a", 1, 2)));
        assert_eq!(s.apply(4, Some(&set(52, "c", false))), Outcome::Applied);
        assert_eq!(s.loaders.as_ref().map(|l| l.setting.config.as_str()), Some("c"));
        let mut bad = setting("d");
        bad.modules[0].0 = "users.wasm".into();
        let bad =
            Proposal { proposer: 1, nonce: 53, entry: MetaEntry::SetLoaders { setting: Some(bad), if_none: false } };
        assert!(matches!(s.apply(5, Some(&bad)), Outcome::Refused(_)));
        let clear = Proposal { proposer: 2, nonce: 54, entry: MetaEntry::SetLoaders { setting: None, if_none: false } };
        assert_eq!(s.apply(6, Some(&clear)), Outcome::Applied);
        assert_eq!(s.loaders, None);
        assert_eq!(MetaState::decode(&s.encode()).expect("decode"), s);
    }

    #[test]
    fn quarantine_and_rollback_move_the_active_module() {
        let mut s = founded();
        for (i, label) in ["a@1", "b@1"].iter().enumerate() {
            let n = i as u64 * 2;
            s.apply(2 + n, Some(&p(20 + n, stored(label, label))));
            s.apply(3 + n, Some(&p(21 + n, activation(label))));
        }
        assert_eq!(s.active.as_ref().map(|a| a.label.as_str()), Some("b@1"));
        s.apply(9, Some(&p(30, MetaEntry::Quarantine { label: "b@1".into(), reason: "trapped".into() })));
        assert_eq!(s.active.as_ref().map(|a| a.label.as_str()), Some("a@1"));
        assert!(matches!(s.apply(10, Some(&p(31, activation("b@1")))), Outcome::Refused(_)));
        assert!(matches!(s.apply(11, Some(&p(32, MetaEntry::Rollback))), Outcome::Refused(_)), "nothing before a@1");
    }
}
