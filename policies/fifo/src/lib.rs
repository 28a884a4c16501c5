//! First in, first out: evict the oldest insertion; reads change nothing.
//! Textbook FIFO, as libCacheSim's `fifo`.

use cachet_policy_sdk::collections::IdList;
use cachet_policy_sdk::{
    Capacity, Config, ConfigError, Entry, EntryId, Need, Policy, PolicyInfo, RemovalCause, collect_victims,
    export_policy,
};

/// FIFO over one insertion-ordered queue; the front is oldest.
pub struct Fifo {
    /// Resident ids with their sizes, in insertion order.
    queue: IdList<u64>,
}

impl Policy for Fifo {
    fn info() -> PolicyInfo {
        PolicyInfo::new("fifo", env!("CARGO_PKG_VERSION"))
    }

    fn create(capacity: Capacity, _: u64, config: &Config) -> Result<Self, ConfigError> {
        config.reject_unknown(&[])?;
        Ok(Self { queue: IdList::with_capacity(capacity.presize()) })
    }

    fn on_inserted(&mut self, _: u64, entry: &Entry) {
        self.queue.push_back(entry.id, entry.size);
    }

    /// An update keeps the entry's place in the queue; only its size changes.
    fn on_updated(&mut self, _: u64, entry: &Entry) {
        if let Some(size) = self.queue.get_mut(entry.id) {
            *size = entry.size;
        }
    }

    fn on_removed(&mut self, _: u64, id: EntryId, _: RemovalCause) {
        self.queue.remove(id);
    }

    fn pick_victims(&mut self, _: u64, need: Need, out: &mut Vec<EntryId>) {
        collect_victims(need, out, || self.queue.pop_front());
    }

    fn export_order(&self, out: &mut Vec<EntryId>) {
        out.extend(self.queue.iter().map(|(id, _)| id));
    }
}

export_policy!(Fifo);

#[cfg(test)]
mod tests {
    use super::*;
    use cachet_policy_sdk::testing::{Harness, entries};

    #[test]
    fn evicts_oldest_insert_even_if_read() {
        let mut h = Harness::<Fifo>::new(entries(3)).expect("create");
        for key in [1, 2, 3] {
            h.request(key, 1);
        }
        assert!(h.request(1, 1));
        h.request(4, 1);
        assert!(!h.contains_key(1), "1 was inserted first");
        assert_eq!(h.export_order(), vec![2, 3, 4]);
    }
}
