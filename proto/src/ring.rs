//! The ring: which members own a key, read from the cluster's slot table.
//!
//! A key's place is its Redis hash slot ([`crate::key_slot`]: CRC16 of the
//! key, or of its `{hash tag}`, modulo 16384), and the [`SlotTable`] the
//! cluster's metadata log holds names each slot's owners, primary first.
//! A [`Ring`] is that table plus the members it names (their addresses and
//! weights), at the table's epoch: every process that applied the same log
//! entry holds the same ring, so a node and a client can tell which of two
//! rings is newer, and `CLUSTER SLOTS` is a direct reading of it.
//!
//! Owners do not change when a member goes down: a dead owner simply does
//! not answer, and the log's leader decides when (and to whom) its slots
//! move. Where a write for a down owner goes meanwhile (a hint) is the
//! ring's walk: the owners, then every other member in id order after the
//! primary ([`Ring::walk`]).
//!
//! Sans-IO: the ring is a value; the metadata log decides when to build a
//! new one.

use crate::slot::{SLOTS, SlotError, SlotTable, key_slot};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// One node of the cluster as the ring sees it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Member {
    /// Stable node id (`--node-id`): a number, the one the slot table uses.
    pub id: String,
    /// Where it serves clients (`host:port`).
    pub addr: String,
    /// Relative capacity: a member of weight 2 is given about twice the
    /// slots when the table is planned.
    pub weight: u32,
}

/// A ring that cannot be built.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum RingError {
    /// Two members with one id.
    #[error("member `{0}` appears twice")]
    DuplicateMember(String),
    /// A member with weight 0 would own nothing.
    #[error("member `{0}` has weight 0")]
    ZeroWeight(String),
    /// Member ids are node numbers, as in the slot table.
    #[error("member id `{0}` is not a node number")]
    NotANodeId(String),
    /// The table names an owner that is not among the members.
    #[error("the slot table names node {0}, which is not a member")]
    UnknownOwner(u32),
    /// The table itself is not usable.
    #[error(transparent)]
    Slots(#[from] SlotError),
}

/// An immutable ring at one epoch. See the module docs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Ring {
    members: Vec<Member>,
    /// Each member's node id, in `members` order.
    ids: Vec<u32>,
    /// Index into `members` by node id.
    by_id: BTreeMap<u32, usize>,
    table: SlotTable,
}

/// The part of `key` that is hashed for placement: the text between the
/// first `{` and the next `}` when that is not empty, otherwise the whole
/// key (Redis Cluster's rule, so tagged keys land together here too).
pub fn hash_tag(key: &[u8]) -> &[u8] {
    let Some(open) = key.iter().position(|&b| b == b'{') else {
        return key;
    };
    match key[open + 1..].iter().position(|&b| b == b'}') {
        Some(len) if len > 0 => &key[open + 1..open + 1 + len],
        _ => key,
    }
}

impl Ring {
    /// The ring of `members` placed by `table`. Members are ordered by
    /// node id, so the order they are given in does not matter; every
    /// owner the table names must be one of them.
    pub fn new(mut members: Vec<Member>, table: SlotTable) -> Result<Self, RingError> {
        let mut ids = Vec::with_capacity(members.len());
        for m in &members {
            ids.push(m.id.parse::<u32>().map_err(|_| RingError::NotANodeId(m.id.clone()))?);
            if m.weight == 0 {
                return Err(RingError::ZeroWeight(m.id.clone()));
            }
        }
        let mut order: Vec<usize> = (0..members.len()).collect();
        order.sort_by_key(|&i| ids[i]);
        members = order.iter().map(|&i| members[i].clone()).collect();
        ids = order.iter().map(|&i| ids[i]).collect();
        let mut by_id = BTreeMap::new();
        for (i, &id) in ids.iter().enumerate() {
            if by_id.insert(id, i).is_some() {
                return Err(RingError::DuplicateMember(members[i].id.clone()));
            }
        }
        for range in table.ranges() {
            if let Some(&unknown) = range.owners.iter().chain(&range.pending).find(|o| !by_id.contains_key(o)) {
                return Err(RingError::UnknownOwner(unknown));
            }
        }
        Ok(Self { members, ids, by_id, table })
    }

    /// The founding ring of `members`: [`SlotTable::balanced`] at epoch 1
    /// with `rf` copies (fewer when there are fewer members).
    pub fn balanced(members: Vec<Member>, rf: usize) -> Result<Self, RingError> {
        let ids = members
            .iter()
            .map(|m| m.id.parse::<u32>().map_err(|_| RingError::NotANodeId(m.id.clone())))
            .collect::<Result<Vec<_>, _>>()?;
        let table = SlotTable::balanced(1, &ids, rf.min(ids.len()).max(1))?;
        Self::new(members, table)
    }

    /// The ring's epoch (its table's); a larger one is newer.
    pub fn epoch(&self) -> u64 {
        self.table.epoch()
    }

    /// The slot table.
    pub fn table(&self) -> &SlotTable {
        &self.table
    }

    /// The members, ordered by node id.
    pub fn members(&self) -> &[Member] {
        &self.members
    }

    /// The member with node id `id`.
    pub fn member(&self, id: u32) -> Option<&Member> {
        self.by_id.get(&id).map(|&i| &self.members[i])
    }

    /// Whether the ring has no members.
    pub fn is_empty(&self) -> bool {
        self.members.is_empty()
    }

    /// The node ids owning `slot`: at most `rf`, primary first.
    pub fn slot_owners(&self, slot: u16, rf: usize) -> &[u32] {
        let owners = self.table.owners_of_slot(slot);
        &owners[..owners.len().min(rf)]
    }

    /// The members owning `key`: at most `rf`, primary first.
    pub fn owners(&self, key: &[u8], rf: usize) -> Vec<&Member> {
        self.slot_owners(key_slot(key), rf).iter().filter_map(|&id| self.member(id)).collect()
    }

    /// The members taking `key`'s slot over ([`crate::SlotRange::pending`]).
    pub fn pending(&self, key: &[u8]) -> &[u32] {
        self.table.pending_of_slot(key_slot(key))
    }

    /// The primary owner of `key`.
    pub fn primary(&self, key: &[u8]) -> Option<&Member> {
        self.owners(key, 1).into_iter().next()
    }

    /// Every member, in the order a key's writes fall back through them:
    /// the key's owners, then the other members in node-id order after
    /// the primary (wrapping). A hint for a down owner goes to the first
    /// live member past the owners.
    pub fn walk(&self, key: &[u8]) -> Vec<u32> {
        let owners = self.table.owners_of_slot(key_slot(key));
        let mut out: Vec<u32> = owners.to_vec();
        let start = owners.first().map_or(0, |p| self.ids.partition_point(|id| id <= p));
        for k in 0..self.ids.len() {
            let id = self.ids[(start + k) % self.ids.len()];
            if !out.contains(&id) {
                out.push(id);
            }
        }
        out
    }

    /// Whether node `id` owns or takes over, on this ring, some slot it
    /// neither owns nor takes over on `old` (checked range by range, not
    /// slot by slot): slots it must fetch. A member that was pending for a
    /// slot and becomes its owner gains nothing: it holds the slot already.
    pub fn gains_over(&self, old: &Self, id: u32, rf: usize) -> bool {
        self.gains(old, id, rf, true)
    }

    /// Whether node `id` owns, on this ring, some slot it neither owns nor
    /// takes over on `old`: a gain not staged through the log's pending
    /// members (a founding table, or one from before pending members).
    pub fn gains_as_owner_over(&self, old: &Self, id: u32, rf: usize) -> bool {
        self.gains(old, id, rf, false)
    }

    fn gains(&self, old: &Self, id: u32, rf: usize, pending_too: bool) -> bool {
        let mut slot: u32 = 0;
        while slot < u32::from(SLOTS) {
            let s = slot as u16;
            let end = range_end(&self.table, s).min(range_end(&old.table, s));
            let held =
                |ring: &Self| ring.slot_owners(s, rf).contains(&id) || ring.table.pending_of_slot(s).contains(&id);
            let now =
                self.slot_owners(s, rf).contains(&id) || (pending_too && self.table.pending_of_slot(s).contains(&id));
            if now && !held(old) {
                return true;
            }
            slot = u32::from(end) + 1;
        }
        false
    }
}

/// The last slot of the range holding `slot` in `table`.
fn range_end(table: &SlotTable, slot: u16) -> u16 {
    let ranges = table.ranges();
    let i = ranges.partition_point(|r| r.end < slot);
    ranges.get(i).map_or(SLOTS - 1, |r| r.end)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::slot::SlotRange;

    fn member(id: u32, weight: u32) -> Member {
        Member { id: id.to_string(), addr: format!("127.0.0.1:{}", 7000 + id), weight }
    }

    fn ring(n: u32, rf: usize) -> Ring {
        Ring::balanced((0..n).map(|i| member(i, 1)).collect(), rf).expect("ring")
    }

    #[test]
    fn hash_tags_follow_the_redis_rule() {
        assert_eq!(hash_tag(b"{user:1}:name"), b"user:1");
        assert_eq!(hash_tag(b"plain"), b"plain");
        assert_eq!(hash_tag(b"{}:empty"), b"{}:empty");
        assert_eq!(hash_tag(b"no{close"), b"no{close");
        assert_eq!(hash_tag(b"a{b}c{d}"), b"b");
        let ring = ring(5, 3);
        assert_eq!(ring.owners(b"{user:1}:name", 2), ring.owners(b"{user:1}:email", 2));
    }

    /// Placement is Redis Cluster's: the slot of "foo" is 12182, which a
    /// balanced 3-member table gives to node 2 (slots 10922..=16383).
    #[test]
    fn keys_are_placed_by_their_redis_hash_slot() {
        let ring = ring(3, 2);
        assert_eq!(key_slot(b"foo"), 12182);
        let owners: Vec<&str> = ring.owners(b"foo", 3).iter().map(|m| m.id.as_str()).collect();
        assert_eq!(owners, ["2", "0"]);
        assert_eq!(ring.primary(b"bar").map(|m| m.id.as_str()), Some("0"), "bar is slot 5061");
        let shuffled = Ring::new(ring.members().iter().rev().cloned().collect(), ring.table().clone()).expect("ring");
        assert_eq!(shuffled, ring, "member order must not matter");
    }

    #[test]
    fn the_walk_is_the_owners_then_the_others_after_the_primary() {
        let ring = ring(5, 3);
        // "foo" is slot 12182: the fourth of five ranges, owners 3, 4, 0.
        assert_eq!(ring.walk(b"foo"), vec![3, 4, 0, 1, 2]);
        let owners = ring.owners(b"foo", 3);
        assert_eq!(owners.len(), 3);
        assert_eq!(ring.owners(b"foo", 9).len(), 3, "never more than the table names");
    }

    #[test]
    fn bad_rings_are_refused_by_name() {
        let table = SlotTable::balanced(1, &[0, 1], 2).expect("table");
        assert!(matches!(
            Ring::new(vec![member(0, 1), member(0, 2)], table.clone()),
            Err(RingError::DuplicateMember(_))
        ));
        assert!(matches!(Ring::new(vec![member(0, 1), member(1, 0)], table.clone()), Err(RingError::ZeroWeight(_))));
        assert!(matches!(Ring::new(vec![member(0, 1)], table.clone()), Err(RingError::UnknownOwner(1))));
        let named = Member { id: "node-a".into(), addr: String::new(), weight: 1 };
        assert!(matches!(Ring::new(vec![named], table), Err(RingError::NotANodeId(_))));
    }

    #[test]
    fn a_gain_is_seen_range_by_range() {
        // Balanced, 3 members, 2 copies: 0..=5460 on [0, 1], 5461..=10921
        // on [1, 2], 10922..=16383 on [2, 0].
        let before = ring(3, 2);
        let range = |start, end, owners: &[u32]| SlotRange { start, end, owners: owners.to_vec(), pending: Vec::new() };
        let table = SlotTable::new(
            2,
            vec![
                range(0, 99, &[0, 1]),
                range(100, 100, &[2, 1]),
                range(101, 5460, &[0, 1]),
                range(5461, 10921, &[1, 2]),
                range(10922, SLOTS - 1, &[2, 0]),
            ],
        )
        .expect("table");
        let after = Ring::new(before.members().to_vec(), table).expect("ring");
        assert!(after.gains_over(&before, 2, 2), "node 2 gains slot 100");
        assert!(!after.gains_over(&before, 0, 2), "node 0 only loses");
        assert!(!before.gains_over(&before, 1, 2));
        assert_eq!(after.epoch(), 2);
    }
}
