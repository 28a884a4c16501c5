//! Versions that order writes to a key without trusting wall clocks.
//!
//! A version is a Lamport counter with the writing coordinator's id as tie
//! breaker, so versions are totally ordered and two coordinators never mint
//! the same one. Every node advances its counter past any version it sees,
//! so a write coordinated after another one was observed is ordered after
//! it. Concurrent writes to one key are ordered arbitrarily but identically
//! everywhere: every replica keeps the highest version, so replicas agree.

use serde::{Deserialize, Serialize};

/// A write's position in its key's history.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Version {
    /// The Lamport counter; compared first.
    pub counter: u64,
    /// The coordinating node's index; breaks ties.
    pub node: u32,
}

/// Bits of a counter below the millisecond in [`ceiling`]: counters may
/// grow by up to 2^20 a millisecond before the bound catches up with them.
pub const SUB_MS_BITS: u32 = 20;

/// How far past a receiver's wall clock, in milliseconds, the bound on
/// received counters lies ([`ceiling`]): the largest clock difference
/// between members that cannot be told from an attack.
pub const MAX_LEAD_MS: u64 = 60_000;

/// The highest counter a node accepts from a peer when its wall clock reads
/// `wall_ms` (Unix milliseconds): `(wall_ms + MAX_LEAD_MS) << SUB_MS_BITS`.
///
/// Why: every node moves its clock past any version it sees, and a record
/// at `u64::MAX` would make every later write to its key lose (the counter
/// saturates), so a peer must not be able to hand out versions near the
/// top of the range. Honest counters grow by one per write and stay far
/// below this bound (it starts near 2^60 today); a hostile peer can push
/// counters up to it, but the bound itself only rises with time, 2^20 a
/// millisecond, and reaches the top of the range in the year 2527. So a
/// hostile write can win over later ones only until the wall clock passes
/// its counter (at most [`MAX_LEAD_MS`] plus the time those writes take),
/// never for ever.
pub fn ceiling(wall_ms: u64) -> u64 {
    let ms = wall_ms.saturating_add(MAX_LEAD_MS).min(u64::MAX >> SUB_MS_BITS);
    (ms << SUB_MS_BITS) | ((1 << SUB_MS_BITS) - 1)
}

/// A version from a peer beyond [`ceiling`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error(
    "version counter {counter} is beyond the bound {limit} (this node's wall clock plus {MAX_LEAD_MS} ms); \
     a member whose clock is that far ahead must fix its clock"
)]
pub struct VersionTooFarAhead {
    /// The counter received.
    pub counter: u64,
    /// The bound it broke.
    pub limit: u64,
}

/// Refuses `seen` if it is beyond [`ceiling`]`(wall_ms)`.
pub fn check(seen: Version, wall_ms: u64) -> Result<(), VersionTooFarAhead> {
    let limit = ceiling(wall_ms);
    if seen.counter > limit { Err(VersionTooFarAhead { counter: seen.counter, limit }) } else { Ok(()) }
}

/// A node's Lamport clock.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LamportClock {
    counter: u64,
}

impl LamportClock {
    /// A new version for a write this node coordinates.
    pub fn tick(&mut self, node: u32) -> Version {
        // Saturating: a peer cannot make the clock wrap around.
        self.counter = self.counter.saturating_add(1);
        Version { counter: self.counter, node }
    }

    /// Moves past a version seen in a message.
    pub fn observe(&mut self, seen: Version) {
        self.counter = self.counter.max(seen.counter);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_order_by_counter_then_node() {
        let a = Version { counter: 3, node: 9 };
        let b = Version { counter: 4, node: 0 };
        let c = Version { counter: 4, node: 1 };
        assert!(a < b && b < c);
    }

    /// The bound refuses the top of the range, accepts every counter a
    /// write count could reach, and only rises with time.
    #[test]
    fn the_bound_keeps_counters_far_from_the_top() {
        let now = 1_700_000_000_000;
        let limit = ceiling(now);
        assert!(check(Version { counter: u64::MAX, node: 0 }, now).is_err());
        assert!(check(Version { counter: u64::MAX - 1_000_000, node: 0 }, now).is_err());
        assert_eq!(
            check(Version { counter: limit + 1, node: 0 }, now),
            Err(VersionTooFarAhead { counter: limit + 1, limit })
        );
        assert!(check(Version { counter: limit, node: 0 }, now).is_ok());
        assert!(check(Version { counter: 1 << 50, node: 0 }, now).is_ok(), "2^50 writes are far below the bound");
        assert!(ceiling(now + 1) > limit);
        assert!(u64::MAX - limit > 1 << 62, "the bound is far from the top today");
        assert_eq!(ceiling(u64::MAX), u64::MAX, "saturates, never wraps");
    }

    #[test]
    fn a_write_after_an_observed_one_is_newer() {
        let mut left = LamportClock::default();
        let mut right = LamportClock::default();
        let first = left.tick(0);
        let first = left.tick(0).max(first);
        right.observe(first);
        assert!(right.tick(1) > first);
    }
}
