//! SIEVE (Zhang et al., NSDI'24): one FIFO queue, a visited bit per entry
//! and a hand that moves from old to new. The hand skips (and clears)
//! visited entries and evicts the first unvisited one; new entries go to the
//! new end, behind the hand. As libCacheSim's `sieve`.

use cachet_policy_sdk::collections::IdList;
use cachet_policy_sdk::{
    Capacity, Config, ConfigError, Entry, EntryId, Need, Policy, PolicyInfo, RemovalCause, collect_victims,
    export_policy,
};

/// The queue (front = oldest) with each entry's size and visited bit.
pub struct Sieve {
    queue: IdList<(u64, bool)>,
    /// Where the next eviction starts looking; `None` means at the oldest.
    hand: Option<EntryId>,
}

impl Sieve {
    fn evict_one(&mut self) -> Option<(EntryId, u64)> {
        let mut at = self.hand.or_else(|| self.queue.front().map(|(id, _)| id))?;
        loop {
            let (size, visited) = self.queue.get(at)?;
            if !visited {
                self.hand = self.queue.next_after(at);
                self.queue.remove(at);
                return Some((at, size));
            }
            if let Some((_, bit)) = self.queue.get_mut(at) {
                *bit = false;
            }
            at = match self.queue.next_after(at) {
                Some(next) => next,
                None => self.queue.front()?.0,
            };
        }
    }
}

impl Policy for Sieve {
    fn info() -> PolicyInfo {
        PolicyInfo::new("sieve", env!("CARGO_PKG_VERSION")).with_access_events()
    }

    fn create(capacity: Capacity, _: u64, config: &Config) -> Result<Self, ConfigError> {
        config.reject_unknown(&[])?;
        Ok(Self { queue: IdList::with_capacity(capacity.presize()), hand: None })
    }

    fn on_inserted(&mut self, _: u64, entry: &Entry) {
        self.queue.push_back(entry.id, (entry.size, false));
    }

    fn on_accessed(&mut self, _: u64, id: EntryId) {
        if let Some((_, visited)) = self.queue.get_mut(id) {
            *visited = true;
        }
    }

    fn on_updated(&mut self, _: u64, entry: &Entry) {
        if let Some((size, visited)) = self.queue.get_mut(entry.id) {
            *size = entry.size;
            *visited = true;
        }
    }

    fn on_removed(&mut self, _: u64, id: EntryId, _: RemovalCause) {
        if self.hand == Some(id) {
            self.hand = self.queue.next_after(id);
        }
        self.queue.remove(id);
    }

    fn pick_victims(&mut self, _: u64, need: Need, out: &mut Vec<EntryId>) {
        collect_victims(need, out, || self.evict_one());
    }

    /// From the hand to the new end, then from the old end to the hand: the
    /// order the hand would visit them.
    fn export_order(&self, out: &mut Vec<EntryId>) {
        let ids: Vec<EntryId> = self.queue.iter().map(|(id, _)| id).collect();
        let at = self.hand.and_then(|h| ids.iter().position(|&id| id == h)).unwrap_or(0);
        out.extend(ids[at..].iter().chain(&ids[..at]));
    }
}

export_policy!(Sieve);

#[cfg(test)]
mod tests {
    use super::*;
    use cachet_policy_sdk::testing::{Harness, entries};

    #[test]
    fn the_hand_keeps_its_place() {
        let mut h = Harness::<Sieve>::new(entries(3)).expect("create");
        for key in [1, 2, 3] {
            h.request(key, 1);
        }
        h.request(1, 1);
        h.request(2, 1);
        // The hand clears 1 and 2, evicts 3, and stays past it.
        h.request(4, 1);
        assert!(!h.contains_key(3));
        // Next it starts at the old end: 1 and 2 are no longer visited.
        h.request(5, 1);
        assert!(!h.contains_key(1));
        assert!(h.contains_key(2) && h.contains_key(4) && h.contains_key(5));
    }
}
