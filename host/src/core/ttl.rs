//! Deadlines of entries with a TTL, ordered so active expiry finds the due
//! ones without scanning.

use cachet_policy_sdk::EntryId;
use std::collections::BTreeSet;

/// `(expires_at, id)` pairs in deadline order.
#[derive(Debug, Default)]
pub struct TtlIndex {
    due: BTreeSet<(u64, EntryId)>,
}

impl TtlIndex {
    /// Tracks `id` expiring at `at`.
    pub fn insert(&mut self, at: u64, id: EntryId) {
        self.due.insert((at, id));
    }

    /// Stops tracking `id` at `at`.
    pub fn remove(&mut self, at: u64, id: EntryId) {
        self.due.remove(&(at, id));
    }

    /// The earliest deadline, if any.
    pub fn next(&self) -> Option<u64> {
        self.due.first().map(|&(at, _)| at)
    }

    /// Removes and returns one entry due at or before `now`.
    pub fn pop_due(&mut self, now: u64) -> Option<EntryId> {
        let &(at, id) = self.due.first()?;
        (at <= now).then(|| {
            self.due.pop_first();
            id
        })
    }

    /// Number of tracked deadlines.
    pub fn len(&self) -> usize {
        self.due.len()
    }

    /// True when no entry has a TTL.
    pub fn is_empty(&self) -> bool {
        self.due.is_empty()
    }
}
