//! W-TinyLFU (Einziger et al., 2017): a small LRU window admits every new
//! key; when the window overflows, its LRU key (the candidate) competes with
//! the main cache's victim, and the one a frequency sketch estimates as more
//! frequent stays. The main cache is a segmented LRU (probation 20%,
//! protected 80%; a hit promotes, protected's overflow is demoted). The
//! sketch is a counting Bloom filter with minimal increments, counting
//! inserts, main-cache hits and each contest's candidate, halved after
//! `32 × main size` main hits so old popularity fades. The window's share is
//! fixed (`window-ratio`, default 1%); Caffeine's adaptive window is not
//! modelled. This follows libCacheSim's `wtinyLFU`.

use cachet_policy_sdk::collections::{IdList, IdMap, id_map_for};
use cachet_policy_sdk::{
    Capacity, Config, ConfigError, Entry, EntryId, Need, Policy, PolicyInfo, RemovalCause, collect_victims,
    export_policy,
};

/// The frequency sketch: a counting Bloom filter sized for `n` keys at a
/// 0.1% false-positive rate (about 14.4 counters per key, 10 probes); the
/// estimate is the smallest of a key's counters. Every add increments all of
/// them (libCacheSim's "minimal increment" filter does so too, despite its
/// name). Halved every `32 × n` hits in the main cache so old popularity
/// fades.
struct Sketch {
    counters: Vec<u32>,
    probes: usize,
    hits: u64,
    decay_every: u64,
}

impl Sketch {
    fn new(n: u64) -> Self {
        let n = n.max(1) as f64;
        let per_key = -(0.001f64.ln()) / (std::f64::consts::LN_2 * std::f64::consts::LN_2);
        let size = (n * per_key).ceil().max(64.0) as usize;
        Self {
            counters: vec![0; size],
            probes: (std::f64::consts::LN_2 * per_key).ceil() as usize,
            hits: 0,
            decay_every: (32.0 * n) as u64,
        }
    }

    /// Double hashing (32-bit) from two mixes of the key hash.
    fn positions(&self, key: u64) -> impl Iterator<Item = usize> + '_ {
        let a = ((key ^ (key >> 33)).wrapping_mul(0xFF51_AFD7_ED55_8CCD) >> 32) as u32;
        let b = ((key ^ (key >> 29)).wrapping_mul(0xC4CE_B9FE_1A85_EC53) >> 32) as u32;
        let len = self.counters.len() as u32;
        (0..self.probes as u32).map(move |i| (a.wrapping_add(i.wrapping_mul(b)) % len) as usize)
    }

    fn estimate(&self, key: u64) -> u32 {
        self.positions(key).map(|i| self.counters[i]).min().unwrap_or(0)
    }

    fn add(&mut self, key: u64) {
        let positions: Vec<usize> = self.positions(key).collect();
        for i in positions {
            self.counters[i] = self.counters[i].saturating_add(1);
        }
    }

    /// A hit in the main cache: counted, and ages the sketch when due.
    fn main_hit(&mut self, key: u64) {
        self.add(key);
        self.hits += 1;
        if self.hits >= self.decay_every {
            self.hits = 0;
            for c in &mut self.counters {
                *c >>= 1;
            }
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Segment {
    Window,
    Probation,
    Protected,
}

/// The window, the two main segments and the sketch.
pub struct WTinyLfu {
    capacity: Capacity,
    window: IdList<u64>,
    probation: IdList<u64>,
    protected: IdList<u64>,
    meta: IdMap<(u64, Segment)>,
    sketch: Sketch,
    window_used: u64,
    probation_used: u64,
    protected_used: u64,
    window_limit: u64,
    main_limit: u64,
    probation_limit: u64,
    protected_limit: u64,
}

impl WTinyLfu {
    fn weight(&self, size: u64) -> u64 {
        self.capacity.weight(size)
    }

    fn segment_of(&self, id: EntryId) -> Option<Segment> {
        self.meta.get(&id).map(|&(_, s)| s)
    }

    fn set_segment(&mut self, id: EntryId, segment: Segment) {
        if let Some(meta) = self.meta.get_mut(&id) {
            meta.1 = segment;
        }
    }

    fn hash_of(&self, id: EntryId) -> u64 {
        self.meta.get(&id).map_or(0, |&(h, _)| h)
    }

    /// Keeps protected within its share by demoting its LRU to probation.
    fn rebalance(&mut self) {
        while self.protected_used > self.protected_limit {
            let Some((id, size)) = self.protected.pop_front() else { break };
            let w = self.weight(size);
            self.protected_used -= w;
            self.probation.push_back(id, size);
            self.probation_used += w;
            self.set_segment(id, Segment::Probation);
        }
    }

    /// The main cache's next victim: probation's LRU, else protected's.
    fn main_victim(&self) -> Option<(EntryId, u64)> {
        self.probation.front().or_else(|| self.protected.front())
    }

    fn remove_main(&mut self, id: EntryId) -> Option<u64> {
        if let Some(size) = self.probation.remove(id) {
            self.probation_used -= self.weight(size);
            Some(size)
        } else if let Some(size) = self.protected.remove(id) {
            self.protected_used -= self.weight(size);
            Some(size)
        } else {
            None
        }
    }

    /// Every eviction starts from the window's LRU (the candidate): it moves
    /// to main while main has room; otherwise it duels main's victim and the
    /// one the sketch rates lower leaves. The window has no bound of its own:
    /// main's share is fixed, and the window holds the rest.
    fn evict_one(&mut self) -> Option<(EntryId, u64)> {
        loop {
            let Some((candidate, size)) = self.window.front() else {
                let (id, _) = self.main_victim()?;
                let size = self.remove_main(id)?;
                self.meta.remove(&id);
                return Some((id, size));
            };
            let w = self.weight(size);
            let hash = self.hash_of(candidate);
            self.window.pop_front();
            self.window_used -= w;
            let main_used = self.probation_used + self.protected_used;
            let evicted = if main_used + w <= self.main_limit {
                self.admit_to_main(candidate, size);
                None
            } else if let Some((victim, _)) = self.main_victim()
                && self.sketch.estimate(hash) > self.sketch.estimate(self.hash_of(victim))
            {
                let victim_size = self.remove_main(victim)?;
                self.meta.remove(&victim);
                self.admit_to_main(candidate, size);
                Some((victim, victim_size))
            } else {
                self.meta.remove(&candidate);
                Some((candidate, size))
            };
            // The candidate is counted once per contest (no doorkeeper).
            self.sketch.add(hash);
            if evicted.is_some() {
                return evicted;
            }
        }
    }

    /// Admits to main, into the lower segment that has room (probation,
    /// then protected), as libCacheSim's SLRU inserts.
    fn admit_to_main(&mut self, id: EntryId, size: u64) {
        let w = self.weight(size);
        if self.probation_used + w > self.probation_limit && self.protected_used + w <= self.protected_limit {
            self.protected.push_back(id, size);
            self.protected_used += w;
            self.set_segment(id, Segment::Protected);
        } else {
            self.probation.push_back(id, size);
            self.probation_used += w;
            self.set_segment(id, Segment::Probation);
        }
    }
}

impl Policy for WTinyLfu {
    fn info() -> PolicyInfo {
        PolicyInfo::new("wtinylfu", env!("CARGO_PKG_VERSION")).with_access_events()
    }

    fn create(capacity: Capacity, _: u64, config: &Config) -> Result<Self, ConfigError> {
        config.reject_unknown(&["window-ratio", "protected-ratio"])?;
        let window_ratio: f64 = config.parse_or("window-ratio", 0.01)?;
        let protected_ratio: f64 = config.parse_or("protected-ratio", 0.8)?;
        if !(0.0..1.0).contains(&window_ratio) || !(0.0..1.0).contains(&protected_ratio) {
            return Err(ConfigError(format!(
                "window-ratio and protected-ratio must be in [0, 1); got {window_ratio} and {protected_ratio}"
            )));
        }
        let limit = capacity.limit();
        let window_limit = ((limit as f64 * window_ratio) as u64).max(capacity.weight(1));
        let main_limit = limit.saturating_sub(window_limit);
        let n = capacity.presize();
        Ok(Self {
            capacity,
            window: IdList::with_capacity(n),
            probation: IdList::with_capacity(n),
            protected: IdList::with_capacity(n),
            meta: id_map_for(n),
            sketch: Sketch::new(capacity.max_entries.min(main_limit.max(1))),
            window_used: 0,
            probation_used: 0,
            protected_used: 0,
            window_limit,
            main_limit,
            probation_limit: (main_limit as f64 * (1.0 - protected_ratio)) as u64,
            protected_limit: (main_limit as f64 * protected_ratio) as u64,
        })
    }

    /// New keys enter the window. While main still has room, keys beyond
    /// the window's share move on to main at once: the same keys would move
    /// at the first eviction anyway, and moving them one per insert keeps
    /// every call's work bounded instead of migrating the whole cache in one.
    fn on_inserted(&mut self, _: u64, entry: &Entry) {
        self.sketch.add(entry.key_hash);
        self.window.push_back(entry.id, entry.size);
        self.window_used += self.weight(entry.size);
        self.meta.insert(entry.id, (entry.key_hash, Segment::Window));
        while self.window_used > self.window_limit {
            let Some((id, size)) = self.window.front() else { break };
            let w = self.weight(size);
            if self.probation_used + self.protected_used + w > self.main_limit {
                break;
            }
            self.window.pop_front();
            self.window_used -= w;
            self.admit_to_main(id, size);
        }
    }

    /// Window hits refresh recency only; main hits also count in the sketch.
    fn on_accessed(&mut self, _: u64, id: EntryId) {
        let segment = self.segment_of(id);
        if matches!(segment, Some(Segment::Probation | Segment::Protected)) {
            let hash = self.hash_of(id);
            self.sketch.main_hit(hash);
        }
        match segment {
            Some(Segment::Window) => {
                self.window.move_to_back(id);
            }
            Some(Segment::Probation) => {
                if let Some(size) = self.probation.remove(id) {
                    let w = self.weight(size);
                    self.probation_used -= w;
                    self.protected.push_back(id, size);
                    self.protected_used += w;
                    self.set_segment(id, Segment::Protected);
                    self.rebalance();
                }
            }
            Some(Segment::Protected) => {
                self.protected.move_to_back(id);
            }
            None => {}
        }
    }

    fn on_updated(&mut self, now: u64, entry: &Entry) {
        let new = self.weight(entry.size);
        let (list, used) = match self.segment_of(entry.id) {
            Some(Segment::Window) => (&mut self.window, &mut self.window_used),
            Some(Segment::Probation) => (&mut self.probation, &mut self.probation_used),
            Some(Segment::Protected) => (&mut self.protected, &mut self.protected_used),
            None => return,
        };
        if let Some(size) = list.get_mut(entry.id) {
            *used = *used - self.capacity.weight(*size) + new;
            *size = entry.size;
        }
        self.on_accessed(now, entry.id);
    }

    fn on_removed(&mut self, _: u64, id: EntryId, _: RemovalCause) {
        if let Some(size) = self.window.remove(id) {
            self.window_used -= self.weight(size);
        } else {
            self.remove_main(id);
        }
        self.meta.remove(&id);
    }

    fn pick_victims(&mut self, _: u64, need: Need, out: &mut Vec<EntryId>) {
        collect_victims(need, out, || self.evict_one());
    }

    fn export_order(&self, out: &mut Vec<EntryId>) {
        out.extend(self.window.iter().chain(self.probation.iter()).chain(self.protected.iter()).map(|(id, _)| id));
    }
}

export_policy!(WTinyLfu);

#[cfg(test)]
mod tests {
    use super::*;
    use cachet_policy_sdk::testing::{Harness, entries};

    #[test]
    fn frequent_keys_win_admission_over_one_hit_keys() {
        let mut h = Harness::<WTinyLfu>::new(entries(100)).expect("create");
        let mut next_unique = 1_000;
        for _ in 0..30 {
            for key in 1..=20 {
                h.request(key, 1);
            }
            for _ in 0..40 {
                h.request(next_unique, 1);
                next_unique += 1;
            }
        }
        let kept = (1..=20).filter(|&k| h.contains_key(k)).count();
        assert!(kept >= 18, "only {kept} of 20 popular keys are resident");
    }
}
