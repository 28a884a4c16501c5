//! Redis Cluster's hash slots: the unit of placement the cluster's metadata
//! log will assign to members (docs/plans/issue-20-raft-metadata-log.md),
//! so that `CLUSTER SLOTS` and `MOVED` are direct readings of it.
//!
//! A key's slot is CRC16 (XMODEM: polynomial 0x1021, initial value 0, no
//! reflection) of its hash tag ([`crate::hash_tag`], the text between the
//! first `{` and the next `}` when not empty, else the whole key), modulo
//! 16384: the function Redis Cluster and its clients compute, so a Redis
//! client's own routing agrees with Cachet's. A [`SlotTable`] maps
//! contiguous slot ranges to their owners, primary first.

use serde::{Deserialize, Serialize};

/// Slots in the keyspace.
pub const SLOTS: u16 = 16_384;

/// CRC16/XMODEM of `bytes`, bit by bit (a key's tag is short; a table
/// would buy little).
pub fn crc16(bytes: &[u8]) -> u16 {
    let mut crc: u16 = 0;
    for &byte in bytes {
        crc ^= u16::from(byte) << 8;
        for _ in 0..8 {
            crc = if crc & 0x8000 != 0 { (crc << 1) ^ 0x1021 } else { crc << 1 };
        }
    }
    crc
}

/// The hash slot of `key`, as Redis Cluster computes it.
pub fn key_slot(key: &[u8]) -> u16 {
    crc16(crate::hash_tag(key)) % SLOTS
}

/// Slots `start..=end` and who holds them, primary first.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SlotRange {
    /// First slot.
    pub start: u16,
    /// Last slot, included.
    pub end: u16,
    /// Node ids of the owners, the primary first.
    pub owners: Vec<u32>,
}

/// Why a slot table is not usable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SlotError {
    /// The ranges leave a slot out, overlap, or run past the last slot.
    #[error("slot ranges must cover 0..=16383 in order without gaps or overlaps (at slot {at})")]
    Coverage {
        /// The first slot where the ranges go wrong.
        at: u32,
    },
    /// A range whose owners are empty or repeat a node.
    #[error("slots {start}..={end} need distinct owners, at least one")]
    Owners {
        /// First slot of the range.
        start: u16,
        /// Last slot of the range.
        end: u16,
    },
    /// More copies asked for than there are members.
    #[error("{rf} copies of each slot need at least {rf} members, not {members}")]
    TooFewMembers {
        /// The replication factor.
        rf: usize,
        /// The members given.
        members: usize,
    },
}

/// Every slot's owners at one epoch: sorted, contiguous ranges covering the
/// whole keyspace. Lookups are a binary search over the ranges.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SlotTable {
    epoch: u64,
    ranges: Vec<SlotRange>,
}

impl SlotTable {
    /// A table of `ranges` at `epoch`, checked: they must cover every slot
    /// once, in order, each with distinct owners.
    pub fn new(epoch: u64, ranges: Vec<SlotRange>) -> Result<Self, SlotError> {
        let mut next: u32 = 0;
        for range in &ranges {
            if u32::from(range.start) != next || range.end < range.start {
                return Err(SlotError::Coverage { at: next });
            }
            let mut owners = range.owners.clone();
            owners.sort_unstable();
            owners.dedup();
            if range.owners.is_empty() || owners.len() != range.owners.len() {
                return Err(SlotError::Owners { start: range.start, end: range.end });
            }
            next = u32::from(range.end) + 1;
        }
        if next != u32::from(SLOTS) {
            return Err(SlotError::Coverage { at: next });
        }
        Ok(Self { epoch, ranges })
    }

    /// The founding placement of `members` (node ids) with `rf` copies:
    /// the members sorted, the slots cut into as many contiguous primary
    /// ranges of (nearly) equal size, and each range's other owners the
    /// members that follow its primary in order, so every member holds
    /// about `rf / n` of the keys and is primary of `1 / n` of them.
    pub fn balanced(epoch: u64, members: &[u32], rf: usize) -> Result<Self, SlotError> {
        let mut sorted = members.to_vec();
        sorted.sort_unstable();
        sorted.dedup();
        let n = sorted.len();
        if rf == 0 || n < rf {
            return Err(SlotError::TooFewMembers { rf, members: n });
        }
        let total = u32::from(SLOTS);
        let ranges = (0..n)
            .map(|i| {
                let start = (total * i as u32 / n as u32) as u16;
                let end = (total * (i as u32 + 1) / n as u32 - 1) as u16;
                let owners = (0..rf).map(|k| sorted[(i + k) % n]).collect();
                SlotRange { start, end, owners }
            })
            .collect();
        Self::new(epoch, ranges)
    }

    /// The table's epoch: it rises with every change of placement.
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// The ranges, in slot order (what `CLUSTER SLOTS` lists).
    pub fn ranges(&self) -> &[SlotRange] {
        &self.ranges
    }

    /// The owners of `slot`, primary first.
    pub fn owners_of_slot(&self, slot: u16) -> &[u32] {
        let i = self.ranges.partition_point(|r| r.end < slot);
        self.ranges.get(i).map_or(&[], |r| r.owners.as_slice())
    }

    /// The owners of `key`, primary first.
    pub fn owners(&self, key: &[u8]) -> &[u32] {
        self.owners_of_slot(key_slot(key))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The values Redis documents and its `CLUSTER KEYSLOT` returns.
    #[test]
    fn slots_match_redis() {
        assert_eq!(crc16(b"123456789"), 0x31C3, "the CRC16/XMODEM check value");
        assert_eq!(key_slot(b"foo"), 12_182);
        assert_eq!(key_slot(b"bar"), 5_061);
        assert_eq!(key_slot(b"somekey"), 11_058);
        assert_eq!(key_slot(b"foo{hash_tag}"), 2_515);
        assert_eq!(key_slot(b"{user1000}.following"), key_slot(b"{user1000}.followers"));
        assert_eq!(key_slot(b"foo{}{bar}"), crc16(b"foo{}{bar}") % SLOTS, "an empty tag hashes the whole key");
        assert_eq!(key_slot(b"foo{{bar}}zap"), key_slot(b"{bar"), "the tag ends at the first closing brace");
        assert_eq!(key_slot(b"foo{bar}{zap}"), key_slot(b"bar"), "only the first tag counts");
        assert_eq!(key_slot(b""), 0);
    }

    #[test]
    fn a_balanced_table_spreads_primaries_and_copies() {
        let table = SlotTable::balanced(1, &[2, 0, 1], 2).expect("table");
        assert_eq!(table.ranges().len(), 3);
        assert_eq!(table.ranges()[0], SlotRange { start: 0, end: 5_460, owners: vec![0, 1] });
        assert_eq!(table.ranges()[2].end, SLOTS - 1);
        assert_eq!(table.owners_of_slot(0), &[0, 1]);
        assert_eq!(table.owners_of_slot(5_461), &[1, 2]);
        assert_eq!(table.owners_of_slot(SLOTS - 1), &[2, 0]);
        let mut primaries = [0u32; 3];
        let mut copies = [0u32; 3];
        for slot in 0..SLOTS {
            let owners = table.owners_of_slot(slot);
            assert_eq!(owners.len(), 2, "slot {slot}");
            primaries[owners[0] as usize] += 1;
            for &o in owners {
                copies[o as usize] += 1;
            }
        }
        assert!(primaries.iter().all(|&p| p.abs_diff(u32::from(SLOTS) / 3) <= 1), "{primaries:?}");
        assert!(copies.iter().all(|&c| c.abs_diff(2 * u32::from(SLOTS) / 3) <= 2), "{copies:?}");
        assert_eq!(table.owners(b"{user1000}.following"), table.owners_of_slot(key_slot(b"user1000")));
        assert!(matches!(SlotTable::balanced(1, &[0, 1], 3), Err(SlotError::TooFewMembers { rf: 3, members: 2 })));
    }

    #[test]
    fn tables_that_miss_or_repeat_slots_are_refused() {
        let range = |start, end, owners: &[u32]| SlotRange { start, end, owners: owners.to_vec() };
        assert!(SlotTable::new(1, vec![range(0, SLOTS - 1, &[0])]).is_ok());
        assert_eq!(SlotTable::new(1, vec![range(0, 100, &[0])]), Err(SlotError::Coverage { at: 101 }));
        assert_eq!(
            SlotTable::new(1, vec![range(0, 100, &[0]), range(100, SLOTS - 1, &[1])]),
            Err(SlotError::Coverage { at: 101 })
        );
        assert_eq!(
            SlotTable::new(1, vec![range(0, SLOTS - 1, &[1, 1])]),
            Err(SlotError::Owners { start: 0, end: SLOTS - 1 })
        );
        assert_eq!(
            SlotTable::new(1, vec![range(0, SLOTS - 1, &[])]),
            Err(SlotError::Owners { start: 0, end: SLOTS - 1 })
        );
    }
}
