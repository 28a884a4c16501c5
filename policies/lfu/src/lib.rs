//! Least frequently used, counting only while resident (a key starts at 1
//! and forgets its count when it leaves). Ties go FIFO by arrival at the
//! current count: an entry that has just reached count `n` is evicted after
//! every entry that reached `n` before it. This is libCacheSim's `lfu` (one
//! FIFO list per frequency), and it reproduces the reference tables digit
//! for digit; ordering ties by first insertion instead does not.

use cachet_policy_sdk::collections::{IdMap, id_map_for};
use cachet_policy_sdk::{
    Capacity, Config, ConfigError, Entry, EntryId, Need, Policy, PolicyInfo, RemovalCause, collect_victims,
    export_policy,
};
use std::collections::BTreeSet;

#[derive(Clone, Copy)]
struct Slot {
    count: u64,
    /// When the entry reached `count`: the tie-breaker.
    seq: u64,
    size: u64,
}

/// LFU ordered by `(count, arrival at that count)`; the smallest goes first.
pub struct Lfu {
    order: BTreeSet<(u64, u64, EntryId)>,
    slots: IdMap<Slot>,
    next_seq: u64,
}

impl Lfu {
    fn bump(&mut self, id: EntryId, size: Option<u64>) {
        let Some(slot) = self.slots.get_mut(&id) else {
            return;
        };
        self.order.remove(&(slot.count, slot.seq, id));
        slot.count += 1;
        slot.seq = self.next_seq;
        self.next_seq += 1;
        if let Some(size) = size {
            slot.size = size;
        }
        self.order.insert((slot.count, slot.seq, id));
    }
}

impl Policy for Lfu {
    fn info() -> PolicyInfo {
        PolicyInfo::new("lfu", env!("CARGO_PKG_VERSION")).with_access_events()
    }

    fn create(capacity: Capacity, _: u64, config: &Config) -> Result<Self, ConfigError> {
        config.reject_unknown(&[])?;
        Ok(Self { order: BTreeSet::new(), slots: id_map_for(capacity.presize()), next_seq: 0 })
    }

    fn on_inserted(&mut self, _: u64, entry: &Entry) {
        let seq = self.next_seq;
        self.next_seq += 1;
        self.slots.insert(entry.id, Slot { count: 1, seq, size: entry.size });
        self.order.insert((1, seq, entry.id));
    }

    fn on_accessed(&mut self, _: u64, id: EntryId) {
        self.bump(id, None);
    }

    fn on_updated(&mut self, _: u64, entry: &Entry) {
        self.bump(entry.id, Some(entry.size));
    }

    fn on_removed(&mut self, _: u64, id: EntryId, _: RemovalCause) {
        if let Some(slot) = self.slots.remove(&id) {
            self.order.remove(&(slot.count, slot.seq, id));
        }
    }

    fn pick_victims(&mut self, _: u64, need: Need, out: &mut Vec<EntryId>) {
        collect_victims(need, out, || {
            let (_, _, id) = self.order.pop_first()?;
            let slot = self.slots.remove(&id)?;
            Some((id, slot.size))
        });
    }

    fn export_order(&self, out: &mut Vec<EntryId>) {
        out.extend(self.order.iter().map(|&(_, _, id)| id));
    }
}

export_policy!(Lfu);

#[cfg(test)]
mod tests {
    use super::*;
    use cachet_policy_sdk::testing::{Harness, entries};

    #[test]
    fn evicts_least_frequent_then_oldest() {
        let mut h = Harness::<Lfu>::new(entries(3)).expect("create");
        for key in [1, 2, 3] {
            h.request(key, 1);
        }
        h.request(1, 1);
        h.request(3, 1);
        h.request(4, 1);
        assert!(!h.contains_key(2), "2 had the lowest count");
        h.request(5, 1);
        assert!(!h.contains_key(4), "4 was the only count-1 entry");
        assert_eq!(h.export_order(), vec![5, 1, 3]);
    }
}
