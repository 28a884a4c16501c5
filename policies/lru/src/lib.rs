//! Least recently used: evict the entry whose last access is oldest.
//! Textbook LRU, as libCacheSim's `lru` (so miss ratios compare exactly).

use cachet_policy_sdk::collections::IdList;
use cachet_policy_sdk::{
    Capacity, Config, ConfigError, Entry, EntryId, Need, Policy, PolicyInfo, RemovalCause, collect_victims,
    export_policy,
};

/// LRU over one recency list; the front is least recently used.
pub struct Lru {
    /// Resident ids with their sizes, least recent first.
    recency: IdList<u64>,
}

impl Policy for Lru {
    fn info() -> PolicyInfo {
        PolicyInfo::new("lru", env!("CARGO_PKG_VERSION")).with_access_events()
    }

    fn create(capacity: Capacity, _: u64, config: &Config) -> Result<Self, ConfigError> {
        config.reject_unknown(&[])?;
        Ok(Self { recency: IdList::with_capacity(capacity.presize()) })
    }

    fn on_inserted(&mut self, _: u64, entry: &Entry) {
        self.recency.push_back(entry.id, entry.size);
    }

    fn on_accessed(&mut self, _: u64, id: EntryId) {
        self.recency.move_to_back(id);
    }

    fn on_updated(&mut self, _: u64, entry: &Entry) {
        if self.recency.contains(entry.id) {
            self.recency.push_back(entry.id, entry.size);
        }
    }

    fn on_removed(&mut self, _: u64, id: EntryId, _: RemovalCause) {
        self.recency.remove(id);
    }

    fn pick_victims(&mut self, _: u64, need: Need, out: &mut Vec<EntryId>) {
        collect_victims(need, out, || self.recency.pop_front());
    }

    fn export_order(&self, out: &mut Vec<EntryId>) {
        out.extend(self.recency.iter().map(|(id, _)| id));
    }
}

export_policy!(Lru);

#[cfg(test)]
mod tests {
    use super::*;
    use cachet_policy_sdk::testing::{Harness, entries};

    #[test]
    fn evicts_least_recently_used() {
        let mut h = Harness::<Lru>::new(entries(3)).expect("create");
        for key in [1, 2, 3] {
            assert!(!h.request(key, 1));
        }
        assert!(h.request(1, 1));
        assert!(!h.request(4, 1));
        assert!(!h.contains_key(2), "2 was least recently used");
        assert_eq!(h.export_order(), vec![3, 1, 4]);
    }

    #[test]
    fn frees_bytes_until_need_is_met() {
        let cap = Capacity { max_entries: 100, max_bytes: 10 };
        let mut h = Harness::<Lru>::new(cap).expect("create");
        for key in 1..=5 {
            h.request(key, 2);
        }
        h.request(6, 5);
        assert_eq!(h.export_order(), vec![4, 5, 6]);
    }

    #[test]
    fn rejects_unknown_config() {
        let config = Config::new(vec![("window".into(), "1".into())]);
        let err = Harness::<Lru>::with_config(entries(3), 0, &config).err().expect("rejected");
        assert!(err.0.contains("window"), "{err}");
    }
}
