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
//!
//! [`SlotTable::plan`] computes the next placement when members join, leave
//! or change weight, and [`SlotTable::moves`] lists what that placement asks
//! members to stream. Both are pure and deterministic: every replica of the
//! metadata log computes the same table from the same inputs.

mod flow;
mod plan;

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
    /// Members taking these slots over, not owners yet: they receive every
    /// write (a write needs one more acknowledgement per pending member)
    /// and stream the slots from the owners; once each has told the log it
    /// holds them, the next table makes them owners in place of those they
    /// replace. Reads never ask them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub pending: Vec<u32>,
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
    /// A member given with weight 0: its share would be no slot at all,
    /// which is what removing it says, so 0 is refused rather than guessed at.
    #[error("member {node} has weight 0; a member's weight must be at least 1")]
    ZeroWeight {
        /// The member's node id.
        node: u32,
    },
    /// A member listed twice: its weight would be ambiguous.
    #[error("member {node} is listed more than once")]
    DuplicateMember {
        /// The member's node id.
        node: u32,
    },
    /// The table's epoch is already the largest there is, so no placement
    /// can follow it (clients would not see the change).
    #[error("the slot table's epoch {epoch} cannot rise further")]
    EpochExhausted {
        /// The table's epoch.
        epoch: u64,
    },
    /// A plan left slots without `rf` distinct owners. The planner's flows
    /// always exist for valid input, so this guards against a planner bug
    /// rather than reporting a caller's mistake.
    #[error("the plan left slots {start}..={end} without {rf} distinct owners")]
    Unplaced {
        /// First slot of the run.
        start: u16,
        /// Last slot of the run.
        end: u16,
        /// The replication factor asked for.
        rf: usize,
    },
}

/// One owner assignment that changes between two tables: slots
/// `start..=end` gain owner `to`, in place of `from`, which the slots no
/// longer list (`None` when the slots gain a copy, as when the replication
/// factor rises). The slots' data is what `to` must stream before it
/// serves them, so a joining member's moves are its whole catch-up.
/// Owners that only change position (a replica promoted to primary) move
/// no data and are not listed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SlotMove {
    /// First slot.
    pub start: u16,
    /// Last slot, included.
    pub end: u16,
    /// The owner `to` replaces, if any.
    pub from: Option<u32>,
    /// The owner that gains the slots.
    pub to: u32,
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
        check(&ranges)?;
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
                SlotRange { start, end, owners, pending: Vec::new() }
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

    /// The owners of `slot` and the last slot through which they stay the
    /// same: the range holding it, or no owners up to the next range (the
    /// table is then invalid, but [`SlotTable::moves`] still reads it).
    fn piece(&self, slot: u16) -> (&[u32], u16) {
        let i = self.ranges.partition_point(|r| r.end < slot);
        match self.ranges.get(i) {
            Some(r) if r.start <= slot && slot <= r.end => (&r.owners, r.end),
            Some(r) if slot < r.start => (&[], r.start - 1),
            Some(_) => (&[], slot),
            None => (&[], SLOTS - 1),
        }
    }

    /// The owners of `key`, primary first.
    pub fn owners(&self, key: &[u8]) -> &[u32] {
        self.owners_of_slot(key_slot(key))
    }

    /// The members taking `slot` over (see [`SlotRange::pending`]).
    pub fn pending_of_slot(&self, slot: u16) -> &[u32] {
        let i = self.ranges.partition_point(|r| r.end < slot);
        self.ranges.get(i).map_or(&[], |r| r.pending.as_slice())
    }

    /// Whether any slot has members taking it over.
    pub fn has_pending(&self) -> bool {
        self.ranges.iter().any(|r| !r.pending.is_empty())
    }

    /// Every member pending somewhere.
    pub fn pending_members(&self) -> Vec<u32> {
        let mut all: Vec<u32> = self.ranges.iter().flat_map(|r| r.pending.iter().copied()).collect();
        all.sort_unstable();
        all.dedup();
        all
    }

    /// The first step of a move to `target`: this table's owners, each
    /// slot's owners in `target` that it lacks as pending members, at this
    /// table's epoch + 1. Once they hold their slots, `target` (at the
    /// next epoch) finishes the move. Neighbouring slots alike are merged.
    pub fn staged(&self, target: &Self) -> Result<Self, SlotError> {
        let epoch = self.epoch.checked_add(1).ok_or(SlotError::EpochExhausted { epoch: self.epoch })?;
        let mut ranges: Vec<SlotRange> = Vec::new();
        let mut slot: u32 = 0;
        while slot < u32::from(SLOTS) {
            let s = slot as u16;
            let (owners, end) = self.piece(s);
            let (wanted, wanted_end) = target.piece(s);
            let end = end.min(wanted_end);
            let pending: Vec<u32> = wanted.iter().copied().filter(|w| !owners.contains(w)).collect();
            match ranges.last_mut() {
                Some(last) if last.owners == owners && last.pending == pending => last.end = end,
                _ => ranges.push(SlotRange { start: s, end, owners: owners.to_vec(), pending }),
            }
            slot = u32::from(end) + 1;
        }
        Self::new(epoch, ranges)
    }

    /// This table without pending members, at epoch + 1: a move given up
    /// (a pending member left, or is no longer wanted).
    pub fn without_pending(&self) -> Result<Self, SlotError> {
        let epoch = self.epoch.checked_add(1).ok_or(SlotError::EpochExhausted { epoch: self.epoch })?;
        Self::new(epoch, self.owner_ranges())
    }

    /// The ranges with their owners only, neighbours alike merged.
    fn owner_ranges(&self) -> Vec<SlotRange> {
        let mut ranges: Vec<SlotRange> = Vec::new();
        for r in &self.ranges {
            match ranges.last_mut() {
                Some(last) if last.owners == r.owners => last.end = r.end,
                _ => ranges.push(SlotRange { pending: Vec::new(), ..r.clone() }),
            }
        }
        ranges
    }

    /// Whether this table and `other` place the same owners and pending
    /// members on every slot (epochs aside).
    pub fn same_placement(&self, other: &Self) -> bool {
        self.ranges == other.ranges
    }

    /// The table at `epoch + 1` that places `rf` copies of every slot on
    /// `members`, given as `(node id, weight)` pairs, moving as few
    /// slot-owner assignments away from this table as it can.
    ///
    /// The rules, and why:
    ///
    /// - Every slot gets exactly `rf` distinct owners, all from `members`.
    ///   An owner not in `members` leaves every slot it held, and the
    ///   vacancies are filled: this is how a dead or removed member is
    ///   replaced. When `rf` falls, surplus copies are dropped; when it
    ///   rises, copies are added.
    /// - A member's share of the `rf * 16384` copies is proportional to its
    ///   weight, except that no member can hold a slot twice: a share above
    ///   16384 is cut to 16384 and the rest shared out again by weight
    ///   (water-filling). Every member ends with its share rounded down or
    ///   up, so it is less than one slot away from it (guaranteed: such a
    ///   placement always exists and the flow below finds one).
    /// - Primaries (`owners[0]`) are balanced the same way against
    ///   `16384 * weight / sum(weights)`, by a second flow that only swaps
    ///   roles among each slot's owners. That some assignment within one
    ///   slot of every share exists among the chosen owners is not proven
    ///   in general, so this part is best effort (as close as the owners
    ///   allow), but it held in every test: all joins, removals, weight and
    ///   factor changes tried, and about 21,000 random steps of them.
    /// - Within those bounds a member keeps what it has: targets are the
    ///   current counts pulled just into the bounds, and the assignments
    ///   that move are found by a min-cost flow whose cost is the number of
    ///   slot-owner assignments added. So the moves are the fewest that
    ///   reach the targets: a joining member takes exactly its share from
    ///   the members over theirs, and a removed member's slots are refilled
    ///   without anything else moving. A table already within bounds comes
    ///   back with the same ranges (at `epoch + 1`: every plan is a new
    ///   epoch, and the caller compares ranges to skip proposing a no-op).
    /// - Owners that stay keep their positions. A newcomer takes the
    ///   position of the owner it replaces, except that it does not become
    ///   primary over a surviving owner (which has the data): the first
    ///   survivor is promoted and the newcomer takes its place. Primaries
    ///   are then balanced by swapping roles inside slots, preferring
    ///   owners that held the slot before (no data moves for a role).
    /// - Moved slots are taken in contiguous runs and neighbouring slots with
    ///   the same owners are merged, so the table stays a few ranges per
    ///   member.
    /// - No hash map or random number is used: the same table and members
    ///   (in any order) give the same result in every process.
    ///
    /// Errors: `rf == 0` or fewer members than `rf`
    /// ([`SlotError::TooFewMembers`]), a weight of 0
    /// ([`SlotError::ZeroWeight`]), a member listed twice
    /// ([`SlotError::DuplicateMember`]), this table invalid (one deserialized
    /// without [`SlotTable::new`]'s checks: [`SlotError::Coverage`] or
    /// [`SlotError::Owners`]), or its epoch at `u64::MAX`
    /// ([`SlotError::EpochExhausted`]).
    pub fn plan(&self, members: &[(u32, u32)], rf: usize) -> Result<Self, SlotError> {
        check(&self.ranges)?;
        let epoch = self.epoch.checked_add(1).ok_or(SlotError::EpochExhausted { epoch: self.epoch })?;
        // Pending members are ignored: the plan is made from the owners
        // alone, so a table part way through a move plans the same target
        // as the table it started from.
        Self::new(epoch, plan::place(&self.owner_ranges(), members, rf)?)
    }

    /// The owner assignments `next` has that this table does not, as
    /// [`SlotMove`]s sorted by first slot (then by `to`, then `from`), each
    /// run of neighbouring slots with the same change merged into one.
    ///
    /// A gained owner is paired with the lost owner at its position when
    /// there is one, else with the lost owners in order, else with none.
    /// Owners that are dropped without a replacement (the replication
    /// factor fell) gain nothing and are not listed. Linear in the two
    /// tables' ranges (not their slots); any two tables can be compared,
    /// even ones that fail [`SlotTable::new`]'s checks (a slot outside
    /// every range counts as having no owners).
    pub fn moves(&self, next: &Self) -> Vec<SlotMove> {
        let mut out: Vec<SlotMove> = Vec::new();
        // The moves that reached the previous piece: (from, to, index in `out`).
        let mut open: Vec<(Option<u32>, u32, usize)> = Vec::new();
        let mut slot = 0;
        while slot < SLOTS {
            let (current, current_end) = self.piece(slot);
            let (wanted, wanted_end) = next.piece(slot);
            let end = current_end.min(wanted_end).min(SLOTS - 1);
            let mut still_open = Vec::new();
            for (from, to) in changes(current, wanted) {
                let prior = open.iter().find(|&&(f, t, _)| f == from && t == to).map(|&(_, _, i)| i);
                let i = match prior.and_then(|i| out.get_mut(i).map(|m| (i, m))) {
                    Some((i, m)) => {
                        m.end = end;
                        i
                    }
                    None => {
                        out.push(SlotMove { start: slot, end, from, to });
                        out.len() - 1
                    }
                };
                still_open.push((from, to, i));
            }
            open = still_open;
            slot = end.saturating_add(1).max(slot + 1);
        }
        out.sort_by_key(|m| (m.start, m.to, m.from));
        out
    }
}

/// Checks that `ranges` cover every slot once, in order, each with distinct
/// owners (what [`SlotTable::new`] promises).
fn check(ranges: &[SlotRange]) -> Result<(), SlotError> {
    let mut next: u32 = 0;
    for range in ranges {
        if u32::from(range.start) != next || range.end < range.start {
            return Err(SlotError::Coverage { at: next });
        }
        let mut owners = range.owners.clone();
        owners.extend(&range.pending);
        owners.sort_unstable();
        owners.dedup();
        if range.owners.is_empty() || owners.len() != range.owners.len() + range.pending.len() {
            return Err(SlotError::Owners { start: range.start, end: range.end });
        }
        next = u32::from(range.end) + 1;
    }
    if next != u32::from(SLOTS) {
        return Err(SlotError::Coverage { at: next });
    }
    Ok(())
}

/// The owners `next` gains over `current`, each paired with the owner it
/// replaces (see [`SlotTable::moves`]).
fn changes(current: &[u32], next: &[u32]) -> Vec<(Option<u32>, u32)> {
    let lost: Vec<u32> = current.iter().copied().filter(|o| !next.contains(o)).collect();
    let mut taken = vec![false; lost.len()];
    let gained: Vec<(usize, u32)> = next.iter().copied().enumerate().filter(|(_, o)| !current.contains(o)).collect();
    let mut from: Vec<Option<u32>> = vec![None; gained.len()];
    for (slot, &(position, _)) in from.iter_mut().zip(&gained) {
        let Some(&there) = current.get(position) else { continue };
        if let Some(k) = lost.iter().position(|&l| l == there)
            && let Some(t) = taken.get_mut(k)
            && !*t
        {
            *t = true;
            *slot = Some(there);
        }
    }
    for slot in from.iter_mut().filter(|f| f.is_none()) {
        if let Some(k) = taken.iter().position(|t| !t) {
            taken[k] = true;
            *slot = lost.get(k).copied();
        }
    }
    from.into_iter().zip(gained).map(|(f, (_, to))| (f, to)).collect()
}

#[cfg(test)]
mod tests;
