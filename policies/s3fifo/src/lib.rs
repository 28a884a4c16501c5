//! S3-FIFO (Yang et al., SOSP'23): a small FIFO that filters one-hit
//! wonders, a main FIFO with reinsertion, and a ghost FIFO of recently
//! filtered keys. As libCacheSim's `s3fifo` with its published defaults:
//!
//! - new keys enter the small queue (10% of the cache); a key found in the
//!   ghost goes straight to main;
//! - evicting from small, a key hit at least `move-to-main-threshold` (2)
//!   times moves to main, otherwise it leaves and its hash joins the ghost
//!   (90% of the cache, keys only);
//! - evicting from main, a key with a non-zero count is re-queued with
//!   `min(count, 3) - 1`;
//! - eviction takes from main when main is over its share or small is empty,
//!   otherwise from small.
//!
//! One deliberate difference: the small queue always has room for at least
//! one entry (libCacheSim admits nothing when 10% of the cache rounds to one
//! object or fewer).

use cachet_policy_sdk::collections::{Ghost, IdLists};
use cachet_policy_sdk::{
    Capacity, Config, ConfigError, Entry, EntryId, Need, Policy, PolicyInfo, RemovalCause, collect_victims,
    export_policy,
};

const SMALL: usize = 0;
const MAIN: usize = 1;

/// What the policy keeps per resident entry besides its queue links: 12
/// bytes, aligned to 4, so with the links an entry costs 28 bytes in one
/// table indexed by slot. (Two linked lists and a map cost 80 and more;
/// the policy's state is a large share of a node's memory per key.)
#[derive(Clone, Copy, Default)]
struct Meta {
    /// The key hash, in halves so the struct aligns to 4.
    hash: [u32; 2],
    /// The size the queues were charged in the low 30 bits, saturated (the
    /// host's value limit keeps it far below; charged and refunded alike),
    /// and the access count (0-3) in the top two.
    packed: u32,
}

/// Largest size a [`Meta`] holds.
const MAX_SIZE: u32 = (1 << 30) - 1;

impl Meta {
    fn new(key_hash: u64, size: u64) -> Self {
        Self { hash: [key_hash as u32, (key_hash >> 32) as u32], packed: 0 }.with_size(size)
    }

    fn key_hash(self) -> u64 {
        u64::from(self.hash[0]) | (u64::from(self.hash[1]) << 32)
    }

    fn size(self) -> u32 {
        self.packed & MAX_SIZE
    }

    fn count(self) -> u8 {
        (self.packed >> 30) as u8
    }

    fn with_size(self, size: u64) -> Self {
        let size = u32::try_from(size).unwrap_or(u32::MAX).min(MAX_SIZE);
        Self { packed: (self.packed & !MAX_SIZE) | size, ..self }
    }

    /// `count` capped at 3.
    fn with_count(self, count: u8) -> Self {
        Self { packed: (u32::from(count.min(3)) << 30) | self.size(), ..self }
    }
}

/// The three queues and the bookkeeping that balances them.
pub struct S3Fifo {
    capacity: Capacity,
    /// The small (`SMALL`) and main (`MAIN`) queues.
    queues: IdLists<Meta, 2>,
    ghost: Ghost,
    /// Weight in each queue.
    used: [u64; 2],
    main_limit: u64,
    move_threshold: u8,
    /// The key hash of the last miss that found its key in the ghost: its
    /// insert goes to main.
    ghost_hit: Option<u64>,
}

impl S3Fifo {
    fn weight(&self, size: u32) -> u64 {
        self.capacity.weight(u64::from(size))
    }

    fn evict_small(&mut self) -> Option<(EntryId, u64)> {
        while let Some((id, meta)) = self.queues.pop_front(SMALL) {
            let w = self.weight(meta.size());
            self.used[SMALL] -= w;
            if meta.count() >= self.move_threshold {
                let _ = self.queues.push_back(MAIN, id, meta.with_count(0));
                self.used[MAIN] += w;
            } else {
                self.ghost.insert(meta.key_hash(), w);
                return Some((id, u64::from(meta.size())));
            }
        }
        None
    }

    fn evict_main(&mut self) -> Option<(EntryId, u64)> {
        while let Some((id, meta)) = self.queues.pop_front(MAIN) {
            if meta.count() >= 1 {
                let _ = self.queues.push_back(MAIN, id, meta.with_count(meta.count() - 1));
            } else {
                self.used[MAIN] -= self.weight(meta.size());
                return Some((id, u64::from(meta.size())));
            }
        }
        None
    }

    fn evict_one(&mut self) -> Option<(EntryId, u64)> {
        // Moving keys from small to main can leave a round without an
        // eviction; the next round then takes from main.
        while self.used[SMALL] + self.used[MAIN] > 0 {
            let victim = if self.used[MAIN] > self.main_limit || self.used[SMALL] == 0 {
                self.evict_main()
            } else {
                self.evict_small()
            };
            if victim.is_some() {
                return victim;
            }
        }
        None
    }

    fn forget(&mut self, id: EntryId) {
        if let Some((queue, meta)) = self.queues.remove(id) {
            self.used[queue] -= self.weight(meta.size());
        }
    }
}

impl Policy for S3Fifo {
    fn info() -> PolicyInfo {
        PolicyInfo::new("s3fifo", env!("CARGO_PKG_VERSION")).with_access_events().with_miss_events()
    }

    fn create(capacity: Capacity, _: u64, config: &Config) -> Result<Self, ConfigError> {
        config.reject_unknown(&["small-ratio", "ghost-ratio", "move-to-main-threshold"])?;
        let small_ratio: f64 = config.parse_or("small-ratio", 0.1)?;
        let ghost_ratio: f64 = config.parse_or("ghost-ratio", 0.9)?;
        let move_threshold: u8 = config.parse_or("move-to-main-threshold", 2)?;
        if !(0.0..1.0).contains(&small_ratio) || !(0.0..=10.0).contains(&ghost_ratio) {
            return Err(ConfigError(format!(
                "small-ratio must be in [0, 1) and ghost-ratio in [0, 10]; got {small_ratio} and {ghost_ratio}"
            )));
        }
        let limit = capacity.limit();
        let small_limit = ((limit as f64 * small_ratio) as u64).max(capacity.weight(1));
        let n = capacity.presize();
        Ok(Self {
            capacity,
            queues: IdLists::with_capacity(n),
            ghost: Ghost::new((limit as f64 * ghost_ratio) as u64, n),
            used: [0; 2],
            main_limit: limit.saturating_sub(small_limit),
            move_threshold,
            ghost_hit: None,
        })
    }

    fn on_inserted(&mut self, _: u64, entry: &Entry) {
        let meta = Meta::new(entry.key_hash, entry.size);
        let queue = if self.ghost_hit.take() == Some(entry.key_hash) { MAIN } else { SMALL };
        // Whatever the slot held (the host never inserts a live id, nor
        // reuses a slot before its removal; but if it did, the charge must
        // not stay behind, or eviction would chase weight nothing holds).
        if let Some((held_in, held)) = self.queues.push_back(queue, entry.id, meta) {
            self.used[held_in] -= self.weight(held.size());
        }
        self.used[queue] += self.weight(meta.size());
    }

    fn on_accessed(&mut self, _: u64, id: EntryId) {
        if let Some(meta) = self.queues.get_mut(id) {
            *meta = meta.with_count(meta.count() + 1);
        }
    }

    fn on_updated(&mut self, now: u64, entry: &Entry) {
        if let Some((queue, meta)) = self.queues.get(entry.id) {
            let resized = meta.with_size(entry.size);
            self.used[queue] = self.used[queue] - self.weight(meta.size()) + self.weight(resized.size());
            if let Some(meta) = self.queues.get_mut(entry.id) {
                *meta = resized;
            }
        }
        self.on_accessed(now, entry.id);
    }

    fn on_removed(&mut self, _: u64, id: EntryId, _: RemovalCause) {
        self.forget(id);
    }

    fn on_missed(&mut self, _: u64, key_hash: u64) {
        self.ghost_hit = self.ghost.remove(key_hash).then_some(key_hash);
    }

    fn pick_victims(&mut self, _: u64, need: Need, out: &mut Vec<EntryId>) {
        collect_victims(need, out, || self.evict_one());
    }

    fn export_order(&self, out: &mut Vec<EntryId>) {
        out.extend(self.queues.iter(SMALL).chain(self.queues.iter(MAIN)).map(|(id, _)| id));
    }
}

export_policy!(S3Fifo);

#[cfg(test)]
mod tests {
    use super::*;
    use cachet_policy_sdk::testing::{Harness, entries};

    #[test]
    fn meta_packs_hash_size_and_count_without_mixing_them() {
        assert_eq!(size_of::<Meta>(), 12);
        let hash = 0xDEAD_BEEF_0123_4567;
        let meta = Meta::new(hash, 1000).with_count(2);
        assert_eq!((meta.key_hash(), meta.size(), meta.count()), (hash, 1000, 2));
        let meta = meta.with_size(u64::MAX).with_count(9);
        assert_eq!((meta.key_hash(), meta.size(), meta.count()), (hash, MAX_SIZE, 3));
        assert_eq!(meta.with_size(0).count(), 3);
    }

    #[test]
    fn one_hit_wonders_leave_through_the_small_queue_and_ghosts_return_to_main() {
        let mut h = Harness::<S3Fifo>::new(entries(10)).expect("create");
        // 1 and 2 are hit twice while in small: they move to main.
        for key in [1, 2] {
            h.request(key, 1);
        }
        for _ in 0..2 {
            h.request(1, 1);
            h.request(2, 1);
        }
        // A scan of one-hit keys passes through small without touching them.
        for key in 100..130 {
            h.request(key, 1);
        }
        assert!(h.contains_key(1) && h.contains_key(2), "frequent keys survive a scan");
        // 100 was filtered into the ghost; asking again puts it in main.
        assert!(!h.contains_key(100));
        h.request(100, 1);
        assert!(h.contains_key(100));
        for key in 200..204 {
            h.request(key, 1);
        }
        assert!(h.contains_key(100), "a ghost hit lands in main, out of the scan's way");
    }
}
