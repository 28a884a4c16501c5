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
