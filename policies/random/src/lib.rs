//! Uniform random eviction, seeded by the host so runs are reproducible.

use cachet_policy_sdk::collections::{IdMap, id_map_for};
use cachet_policy_sdk::rng::SplitMix64;
use cachet_policy_sdk::{
    Capacity, Config, ConfigError, Entry, EntryId, Need, Policy, PolicyInfo, RemovalCause, collect_victims,
    export_policy,
};

/// Random eviction over a dense vector (swap-remove keeps removal O(1)).
pub struct Random {
    rng: SplitMix64,
    entries: Vec<(EntryId, u64)>,
    index: IdMap<usize>,
}

impl Random {
    fn take(&mut self, at: usize) -> (EntryId, u64) {
        let taken = self.entries.swap_remove(at);
        self.index.remove(&taken.0);
        if let Some(&(moved, _)) = self.entries.get(at) {
            self.index.insert(moved, at);
        }
        taken
    }
}

impl Policy for Random {
    fn info() -> PolicyInfo {
        PolicyInfo::new("random", env!("CARGO_PKG_VERSION"))
    }

    fn create(capacity: Capacity, seed: u64, config: &Config) -> Result<Self, ConfigError> {
        config.reject_unknown(&[])?;
        let n = capacity.presize();
        Ok(Self { rng: SplitMix64::new(seed), entries: Vec::with_capacity(n), index: id_map_for(n) })
    }

    fn on_inserted(&mut self, _: u64, entry: &Entry) {
        self.index.insert(entry.id, self.entries.len());
        self.entries.push((entry.id, entry.size));
    }

    fn on_updated(&mut self, _: u64, entry: &Entry) {
        if let Some(&at) = self.index.get(&entry.id) {
            self.entries[at].1 = entry.size;
        }
    }

    fn on_removed(&mut self, _: u64, id: EntryId, _: RemovalCause) {
        if let Some(&at) = self.index.get(&id) {
            self.take(at);
        }
    }

    fn pick_victims(&mut self, _: u64, need: Need, out: &mut Vec<EntryId>) {
        collect_victims(need, out, || {
            if self.entries.is_empty() {
                return None;
            }
            let at = self.rng.below(self.entries.len() as u64) as usize;
            Some(self.take(at))
        });
    }

    fn export_order(&self, out: &mut Vec<EntryId>) {
        out.extend(self.entries.iter().map(|&(id, _)| id));
    }
}

export_policy!(Random);

#[cfg(test)]
mod tests {
    use super::*;
    use cachet_policy_sdk::testing::{Harness, entries};

    fn survivors(seed: u64) -> Vec<u64> {
        let mut h = Harness::<Random>::with_config(entries(8), seed, &Config::default()).expect("create");
        for key in 0..64 {
            h.request(key, 1);
        }
        let mut keys = h.export_order();
        keys.sort_unstable();
        keys
    }

    #[test]
    fn same_seed_same_victims_other_seed_differs() {
        assert_eq!(survivors(7), survivors(7));
        assert_ne!(survivors(7), survivors(8));
        assert_eq!(survivors(7).len(), 8);
    }
}
