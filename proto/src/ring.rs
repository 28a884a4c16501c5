//! The consistent-hash ring: which nodes own a key.
//!
//! Every member gets `vnodes × weight` points on a 64-bit circle, placed by
//! hashing its id with the point's index (XXH3, so every process on every
//! platform computes the same ring from the same membership). A key is
//! hashed (only its hash tag, if it has one: `{user:1}:name` hashes
//! `user:1`, so related keys live together) and owned by the members of the
//! first `rf` distinct points clockwise from it. Adding a member moves only
//! the keys its new points take over, about `1/(N+1)` of them; removing one
//! moves only its keys. Each change of membership is a new epoch, so a node
//! and a client can tell which of two rings is newer.
//!
//! Sans-IO: the ring is a value; membership and failure detection decide
//! when to build a new one.

use serde::{Deserialize, Serialize};

/// Virtual nodes per unit of weight. With 4096 points per member the
/// share of keys each member owns stays within a few percent of the mean
/// (the property tests check ±5% over a million keys).
pub const DEFAULT_VNODES: u32 = 4096;

/// One node of the cluster as the ring sees it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Member {
    /// Stable node id (`--node-id`).
    pub id: String,
    /// Where it serves clients (`host:port`).
    pub addr: String,
    /// Relative capacity: a member of weight 2 owns about twice the keys.
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
}

/// An immutable ring at one epoch. See the module docs.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ring {
    epoch: u64,
    vnodes: u32,
    members: Vec<Member>,
    /// `(point, member index)`, sorted by point.
    points: Vec<(u64, u32)>,
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

/// Where `key` falls on the ring.
pub fn ring_hash(key: &[u8]) -> u64 {
    crate::key_hash(hash_tag(key))
}

fn point(id: &str, index: u32) -> u64 {
    let mut bytes = Vec::with_capacity(id.len() + 5);
    bytes.extend_from_slice(id.as_bytes());
    bytes.push(0);
    bytes.extend_from_slice(&index.to_le_bytes());
    xxhash_rust::xxh3::xxh3_64(&bytes)
}

impl Ring {
    /// A ring of `members` at `epoch`, with `vnodes` points per unit of
    /// weight. Members are ordered by id, so the order they are given in
    /// does not matter.
    pub fn new(epoch: u64, mut members: Vec<Member>, vnodes: u32) -> Result<Self, RingError> {
        members.sort_by(|a, b| a.id.cmp(&b.id));
        for pair in members.windows(2) {
            if pair[0].id == pair[1].id {
                return Err(RingError::DuplicateMember(pair[0].id.clone()));
            }
        }
        if let Some(m) = members.iter().find(|m| m.weight == 0) {
            return Err(RingError::ZeroWeight(m.id.clone()));
        }
        let mut points = Vec::with_capacity(members.iter().map(|m| (m.weight * vnodes.max(1)) as usize).sum());
        for (index, member) in members.iter().enumerate() {
            for v in 0..member.weight.saturating_mul(vnodes.max(1)) {
                points.push((point(&member.id, v), index as u32));
            }
        }
        // Ties (astronomically rare) break by member index: still the same
        // order in every process.
        points.sort_unstable();
        Ok(Self { epoch, vnodes: vnodes.max(1), members, points })
    }

    /// The ring's epoch; a larger one is newer.
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// Points per unit of weight.
    pub fn vnodes(&self) -> u32 {
        self.vnodes
    }

    /// Every point on the ring, in order. The owners of a hash are those of
    /// the first point at or after it, so checking each point of two rings
    /// compares their placement of every key.
    pub fn points(&self) -> impl Iterator<Item = u64> + '_ {
        self.points.iter().map(|&(point, _)| point)
    }

    /// The members, ordered by id.
    pub fn members(&self) -> &[Member] {
        &self.members
    }

    /// Whether the ring has no members.
    pub fn is_empty(&self) -> bool {
        self.members.is_empty()
    }

    /// The members owning `key`: up to `rf` distinct ones, primary first.
    pub fn owners(&self, key: &[u8], rf: usize) -> Vec<&Member> {
        self.owners_of_hash(ring_hash(key), rf)
    }

    /// [`Ring::owners`] for an already hashed key.
    pub fn owners_of_hash(&self, hash: u64, rf: usize) -> Vec<&Member> {
        let want = rf.min(self.members.len());
        let mut out: Vec<&Member> = Vec::with_capacity(want);
        if want == 0 {
            return out;
        }
        let start = self.points.partition_point(|&(p, _)| p < hash);
        for i in 0..self.points.len() {
            let (_, index) = self.points[(start + i) % self.points.len()];
            let member = &self.members[index as usize];
            if !out.iter().any(|m| m.id == member.id) {
                out.push(member);
                if out.len() == want {
                    break;
                }
            }
        }
        out
    }

    /// The primary owner of `key`.
    pub fn primary(&self, key: &[u8]) -> Option<&Member> {
        self.owners(key, 1).into_iter().next()
    }

    /// The next epoch's ring with `member` added (or its entry replaced).
    pub fn with_member(&self, member: Member) -> Result<Self, RingError> {
        let mut members: Vec<Member> = self.members.iter().filter(|m| m.id != member.id).cloned().collect();
        members.push(member);
        Self::new(self.epoch + 1, members, self.vnodes)
    }

    /// The next epoch's ring without member `id`.
    pub fn without_member(&self, id: &str) -> Result<Self, RingError> {
        let members = self.members.iter().filter(|m| m.id != id).cloned().collect();
        Self::new(self.epoch + 1, members, self.vnodes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::HashMap;

    fn member(id: &str, weight: u32) -> Member {
        Member { id: id.into(), addr: format!("127.0.0.1:{}", 7000 + id.len()), weight }
    }

    fn ring(n: usize) -> Ring {
        let members = (0..n).map(|i| member(&format!("node-{i}"), 1)).collect();
        Ring::new(1, members, DEFAULT_VNODES).expect("ring")
    }

    fn key(i: u64) -> Vec<u8> {
        format!("key:{i}").into_bytes()
    }

    #[test]
    fn hash_tags_follow_the_redis_rule() {
        assert_eq!(hash_tag(b"{user:1}:name"), b"user:1");
        assert_eq!(hash_tag(b"plain"), b"plain");
        assert_eq!(hash_tag(b"{}:empty"), b"{}:empty");
        assert_eq!(hash_tag(b"no{close"), b"no{close");
        assert_eq!(hash_tag(b"a{b}c{d}"), b"b");
        let ring = ring(5);
        assert_eq!(ring.owners(b"{user:1}:name", 2), ring.owners(b"{user:1}:email", 2));
    }

    #[test]
    fn placement_is_the_same_in_every_process() {
        // Fixed expectations: a change here moves keys between nodes of a
        // running cluster, so it must be deliberate.
        let owners: Vec<String> = (0..6).map(|i| ring(3).primary(&key(i)).expect("owner").id.clone()).collect();
        assert_eq!(owners, ["node-2", "node-1", "node-1", "node-2", "node-1", "node-1"]);
        let ring = ring(3);
        let shuffled = Ring::new(1, ring.members().iter().rev().cloned().collect(), DEFAULT_VNODES).expect("ring");
        for i in 0..1_000 {
            assert_eq!(ring.primary(&key(i)), shuffled.primary(&key(i)), "member order must not matter");
        }
    }

    #[test]
    fn owners_are_distinct_and_as_many_as_asked() {
        let ring = ring(4);
        for i in 0..1_000 {
            let owners = ring.owners(&key(i), 3);
            assert_eq!(owners.len(), 3);
            assert!(owners[0].id != owners[1].id && owners[1].id != owners[2].id && owners[0].id != owners[2].id);
            assert_eq!(owners[0], ring.primary(&key(i)).expect("primary"));
        }
        assert_eq!(ring.owners(&key(1), 9).len(), 4, "never more than the members");
        assert!(Ring::new(1, Vec::new(), 8).expect("empty").owners(&key(1), 2).is_empty());
        assert!(matches!(Ring::new(1, vec![member("a", 1), member("a", 2)], 8), Err(RingError::DuplicateMember(_))));
        assert!(matches!(Ring::new(1, vec![member("a", 0)], 8), Err(RingError::ZeroWeight(_))));
    }

    #[test]
    fn a_million_keys_spread_within_five_percent_of_the_mean() {
        for n in [3usize, 5, 8] {
            let ring = ring(n);
            let mut counts: HashMap<&str, u64> = HashMap::new();
            for i in 0..1_000_000 {
                *counts.entry(&ring.primary(&key(i)).expect("owner").id).or_default() += 1;
            }
            let mean = 1_000_000.0 / n as f64;
            for (id, count) in counts {
                let off = (count as f64 - mean).abs() / mean;
                assert!(off <= 0.05, "{n} nodes: {id} owns {count} keys, {:.1}% from the mean", off * 100.0);
            }
        }
    }

    #[test]
    fn weight_scales_ownership() {
        let ring = Ring::new(1, vec![member("a", 1), member("b", 2), member("c", 1)], DEFAULT_VNODES).expect("ring");
        let b = (0..200_000).filter(|&i| ring.primary(&key(i)).expect("owner").id == "b").count();
        let share = b as f64 / 200_000.0;
        assert!((share - 0.5).abs() < 0.03, "weight 2 of 4 owns {share:.3}");
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(16))]

        #[test]
        fn a_new_member_takes_about_its_share_and_only_that(n in 2usize..9) {
            let before = ring(n);
            let after = before.with_member(member("newcomer", 1)).expect("ring");
            prop_assert_eq!(after.epoch(), before.epoch() + 1);
            let keys = 100_000u64;
            let mut moved = 0u64;
            for i in 0..keys {
                let (old, new) = (before.primary(&key(i)).expect("old"), after.primary(&key(i)).expect("new"));
                if old != new {
                    prop_assert_eq!(&new.id, "newcomer", "a key moved between old members");
                    moved += 1;
                }
            }
            let share = moved as f64 / keys as f64;
            let expected = 1.0 / (n + 1) as f64;
            prop_assert!((share - expected).abs() < expected * 0.15, "moved {:.3}, expected about {:.3}", share, expected);
        }

        #[test]
        fn a_removed_member_gives_up_only_its_keys(n in 3usize..9, gone in 0usize..8) {
            let before = ring(n);
            let gone = format!("node-{}", gone % n);
            let after = before.without_member(&gone).expect("ring");
            for i in 0..50_000u64 {
                let old = before.owners(&key(i), 2);
                let new = after.owners(&key(i), 2);
                if old[0].id != gone {
                    prop_assert_eq!(&old[0].id, &new[0].id, "a key moved though its owner stayed");
                }
                // Replicas shift up: the surviving owners keep their places.
                let survivors: Vec<&str> = old.iter().filter(|m| m.id != gone).map(|m| m.id.as_str()).collect();
                prop_assert_eq!(new[0].id.as_str(), survivors[0]);
            }
        }
    }
}
