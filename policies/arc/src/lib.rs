//! ARC (Megiddo & Modha, FAST'03): two LRU lists of resident keys, `T1`
//! (seen once recently) and `T2` (seen at least twice), two ghost lists `B1`
//! and `B2` of keys evicted from each, and a target `p` for the size of `T1`
//! that a ghost hit in `B1` raises and one in `B2` lowers. Victims come from
//! `T1` while it is over `p`, otherwise from `T2`. As libCacheSim's `ARC`,
//! with sizes in entries, or in bytes for byte-bounded shards.

use cachet_policy_sdk::collections::{Ghost, IdList, IdMap, id_map_for};
use cachet_policy_sdk::{
    Capacity, Config, ConfigError, Entry, EntryId, Need, Policy, PolicyInfo, RemovalCause, collect_victims,
    export_policy,
};

/// Which ghost the current miss was found in.
#[derive(Clone, Copy, PartialEq, Eq)]
enum GhostHit {
    None,
    B1,
    B2,
}

/// `T1`, `T2` (MRU at the back), the ghosts and the adaptive target.
pub struct Arc {
    capacity: Capacity,
    t1: IdList<u64>,
    t2: IdList<u64>,
    b1: Ghost,
    b2: Ghost,
    hashes: IdMap<u64>,
    t1_used: u64,
    t2_used: u64,
    p: f64,
    /// The last miss: its key hash and whether a ghost held it.
    pending: Option<(u64, GhostHit)>,
}

impl Arc {
    fn hit(&self) -> GhostHit {
        self.pending.map_or(GhostHit::None, |(_, hit)| hit)
    }

    /// Evicts the LRU entry of `T1` (into `B1`) or of `T2` (into `B2`).
    fn evict_lru(&mut self, from_t1: bool) -> Option<(EntryId, u64)> {
        let (list, used, ghost) = if from_t1 {
            (&mut self.t1, &mut self.t1_used, &mut self.b1)
        } else {
            (&mut self.t2, &mut self.t2_used, &mut self.b2)
        };
        let (id, size) = list.pop_front()?;
        let w = self.capacity.weight(size);
        *used -= w;
        if let Some(hash) = self.hashes.remove(&id) {
            ghost.insert(hash, w);
        }
        Some((id, size))
    }

    /// The paper's REPLACE.
    fn replace(&mut self) -> Option<(EntryId, u64)> {
        let t1 = self.t1_used as f64;
        let from_t1 = self.t1_used > 0 && (t1 > self.p || (t1 == self.p && self.hit() == GhostHit::B2));
        self.evict_lru(from_t1).or_else(|| self.evict_lru(true))
    }

    fn evict_one(&mut self) -> Option<(EntryId, u64)> {
        if self.hit() != GhostHit::None {
            return self.replace();
        }
        let c = self.capacity.limit();
        if self.t1_used + self.b1.weight() >= c {
            if self.b1.is_empty() {
                // T1 holds the whole cache: its LRU leaves without a ghost.
                let (id, size) = self.t1.pop_front()?;
                self.t1_used -= self.capacity.weight(size);
                self.hashes.remove(&id);
                return Some((id, size));
            }
            self.b1.pop_oldest();
        } else if self.t1_used + self.t2_used + self.b1.weight() + self.b2.weight() >= 2 * c {
            self.b2.pop_oldest();
        }
        self.replace()
    }
}

impl Policy for Arc {
    fn info() -> PolicyInfo {
        PolicyInfo::new("arc", env!("CARGO_PKG_VERSION")).with_access_events().with_miss_events()
    }

    fn create(capacity: Capacity, _: u64, config: &Config) -> Result<Self, ConfigError> {
        config.reject_unknown(&[])?;
        let n = capacity.presize();
        Ok(Self {
            capacity,
            // Every structure is sized for the whole cache up front (T1 or T2,
            // either ghost, may hold it all): growing one inside a budgeted
            // call would copy it all at once.
            t1: IdList::with_capacity(n),
            t2: IdList::with_capacity(n),
            b1: Ghost::new(u64::MAX, n),
            b2: Ghost::new(u64::MAX, n),
            hashes: id_map_for(n),
            t1_used: 0,
            t2_used: 0,
            p: 0.0,
            pending: None,
        })
    }

    fn on_missed(&mut self, _: u64, key_hash: u64) {
        let (b1, b2) = (self.b1.weight().max(1) as f64, self.b2.weight().max(1) as f64);
        let hit = if self.b1.remove(key_hash) {
            self.p = (self.p + (b2 / b1).max(1.0)).min(self.capacity.limit() as f64);
            GhostHit::B1
        } else if self.b2.remove(key_hash) {
            self.p = (self.p - (b1 / b2).max(1.0)).max(0.0);
            GhostHit::B2
        } else {
            GhostHit::None
        };
        self.pending = Some((key_hash, hit));
    }

    fn on_inserted(&mut self, _: u64, entry: &Entry) {
        let w = self.capacity.weight(entry.size);
        let ghost_hit =
            matches!(self.pending.take(), Some((hash, hit)) if hash == entry.key_hash && hit != GhostHit::None);
        if ghost_hit {
            self.t2.push_back(entry.id, entry.size);
            self.t2_used += w;
        } else {
            self.t1.push_back(entry.id, entry.size);
            self.t1_used += w;
        }
        self.hashes.insert(entry.id, entry.key_hash);
    }

    /// A hit anywhere moves the entry to the MRU end of `T2`.
    fn on_accessed(&mut self, _: u64, id: EntryId) {
        if let Some(size) = self.t1.remove(id) {
            let w = self.capacity.weight(size);
            self.t1_used -= w;
            self.t2_used += w;
            self.t2.push_back(id, size);
        } else {
            self.t2.move_to_back(id);
        }
    }

    fn on_updated(&mut self, now: u64, entry: &Entry) {
        self.on_accessed(now, entry.id);
        if let Some(size) = self.t2.get_mut(entry.id) {
            self.t2_used = self.t2_used - self.capacity.weight(*size) + self.capacity.weight(entry.size);
            *size = entry.size;
        }
    }

    fn on_removed(&mut self, _: u64, id: EntryId, _: RemovalCause) {
        if let Some(size) = self.t1.remove(id) {
            self.t1_used -= self.capacity.weight(size);
        } else if let Some(size) = self.t2.remove(id) {
            self.t2_used -= self.capacity.weight(size);
        }
        self.hashes.remove(&id);
    }

    fn pick_victims(&mut self, _: u64, need: Need, out: &mut Vec<EntryId>) {
        collect_victims(need, out, || self.evict_one());
    }

    fn export_order(&self, out: &mut Vec<EntryId>) {
        out.extend(self.t1.iter().chain(self.t2.iter()).map(|(id, _)| id));
    }
}

export_policy!(Arc);

#[cfg(test)]
mod tests {
    use super::*;
    use cachet_policy_sdk::testing::{Harness, entries};

    #[test]
    fn frequent_keys_survive_a_scan() {
        let mut h = Harness::<Arc>::new(entries(8)).expect("create");
        for _ in 0..2 {
            for key in 1..=4 {
                h.request(key, 1);
            }
        }
        for key in 100..140 {
            h.request(key, 1);
        }
        for key in 1..=4 {
            assert!(h.contains_key(key), "{key} was seen twice and sits in T2");
        }
    }
}
