//! 2Q (Johnson & Shasha, VLDB'94), the full version: new keys enter `A1in`,
//! a FIFO holding 25% of the cache; keys evicted from it are remembered in
//! the ghost `A1out` (50% of the cache, keys only); a miss found in `A1out`
//! goes to `Am`, an LRU holding the rest. Evict from `A1in` while it is over
//! its share, otherwise from `Am`. As libCacheSim's `twoq`.

use cachet_policy_sdk::collections::{Ghost, IdList, IdMap, id_map_for};
use cachet_policy_sdk::{
    Capacity, Config, ConfigError, Entry, EntryId, Need, Policy, PolicyInfo, RemovalCause, collect_victims,
    export_policy,
};

/// `A1in` (FIFO), `Am` (LRU) and the `A1out` ghost.
pub struct TwoQ {
    capacity: Capacity,
    a1in: IdList<u64>,
    am: IdList<u64>,
    a1out: Ghost,
    hashes: IdMap<u64>,
    a1in_used: u64,
    a1in_limit: u64,
    ghost_hit: Option<u64>,
}

impl TwoQ {
    fn evict_one(&mut self) -> Option<(EntryId, u64)> {
        if (self.a1in_used > self.a1in_limit || self.am.is_empty())
            && let Some((id, size)) = self.a1in.pop_front()
        {
            let w = self.capacity.weight(size);
            self.a1in_used -= w;
            if let Some(hash) = self.hashes.remove(&id) {
                self.a1out.insert(hash, w);
            }
            return Some((id, size));
        }
        let (id, size) = self.am.pop_front()?;
        self.hashes.remove(&id);
        Some((id, size))
    }
}

impl Policy for TwoQ {
    fn info() -> PolicyInfo {
        PolicyInfo::new("twoq", env!("CARGO_PKG_VERSION")).with_access_events().with_miss_events()
    }

    fn create(capacity: Capacity, _: u64, config: &Config) -> Result<Self, ConfigError> {
        config.reject_unknown(&["in-ratio", "out-ratio"])?;
        let in_ratio: f64 = config.parse_or("in-ratio", 0.25)?;
        let out_ratio: f64 = config.parse_or("out-ratio", 0.5)?;
        if !(0.0..1.0).contains(&in_ratio) || !(0.0..=10.0).contains(&out_ratio) {
            return Err(ConfigError(format!(
                "in-ratio must be in [0, 1) and out-ratio in [0, 10]; got {in_ratio} and {out_ratio}"
            )));
        }
        let limit = capacity.limit();
        let n = capacity.presize();
        Ok(Self {
            capacity,
            a1in: IdList::with_capacity(n),
            am: IdList::with_capacity(n),
            a1out: Ghost::new((limit as f64 * out_ratio) as u64, n),
            hashes: id_map_for(n),
            a1in_used: 0,
            a1in_limit: (limit as f64 * in_ratio) as u64,
            ghost_hit: None,
        })
    }

    fn on_inserted(&mut self, _: u64, entry: &Entry) {
        if self.ghost_hit.take() == Some(entry.key_hash) {
            self.am.push_back(entry.id, entry.size);
        } else {
            self.a1in.push_back(entry.id, entry.size);
            self.a1in_used += self.capacity.weight(entry.size);
        }
        self.hashes.insert(entry.id, entry.key_hash);
    }

    /// Hits in `Am` refresh recency; hits in `A1in` change nothing.
    fn on_accessed(&mut self, _: u64, id: EntryId) {
        self.am.move_to_back(id);
    }

    fn on_updated(&mut self, now: u64, entry: &Entry) {
        if let Some(size) = self.a1in.get_mut(entry.id) {
            self.a1in_used = self.a1in_used - self.capacity.weight(*size) + self.capacity.weight(entry.size);
            *size = entry.size;
        } else if let Some(size) = self.am.get_mut(entry.id) {
            *size = entry.size;
        }
        self.on_accessed(now, entry.id);
    }

    fn on_removed(&mut self, _: u64, id: EntryId, _: RemovalCause) {
        if let Some(size) = self.a1in.remove(id) {
            self.a1in_used -= self.capacity.weight(size);
        }
        self.am.remove(id);
        self.hashes.remove(&id);
    }

    fn on_missed(&mut self, _: u64, key_hash: u64) {
        self.ghost_hit = self.a1out.remove(key_hash).then_some(key_hash);
    }

    fn pick_victims(&mut self, _: u64, need: Need, out: &mut Vec<EntryId>) {
        collect_victims(need, out, || self.evict_one());
    }

    fn export_order(&self, out: &mut Vec<EntryId>) {
        out.extend(self.a1in.iter().chain(self.am.iter()).map(|(id, _)| id));
    }
}

export_policy!(TwoQ);

#[cfg(test)]
mod tests {
    use super::*;
    use cachet_policy_sdk::testing::{Harness, entries};

    #[test]
    fn keys_seen_twice_reach_am_and_survive_scans() {
        let mut h = Harness::<TwoQ>::new(entries(8)).expect("create");
        for key in 1..=8 {
            h.request(key, 1);
        }
        // A1in holds 2; 1..=6 went to A1out as 7 and 8 came in... and more.
        for key in 9..=12 {
            h.request(key, 1);
        }
        assert!(!h.contains_key(1));
        h.request(1, 1); // a ghost hit: straight to Am
        for key in 100..120 {
            h.request(key, 1);
        }
        assert!(h.contains_key(1), "a key in Am outlives a scan through A1in");
    }
}
