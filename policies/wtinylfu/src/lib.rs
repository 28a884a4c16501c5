//! W-TinyLFU (Einziger et al., 2017): a small LRU window admits every new
//! key; when the cache is full, the window's LRU key (the candidate) competes
//! with the main cache's victim, and the one a frequency sketch estimates as
//! more frequent stays. The main cache is a segmented LRU (probation 20%,
//! protected 80%; a hit promotes, protected's overflow is demoted). The
//! sketch is a counting Bloom filter counting inserts, main-cache hits and
//! each contest's candidate, halved after `32 × main size` main hits so old
//! popularity fades. The window's share is fixed (`window-ratio`, default
//! 1%); Caffeine's adaptive window is not modelled.
//!
//! This follows libCacheSim's `wtinyLFU` step for step where that decides a
//! miss ratio, including its warm-up (the window keeps every key until the
//! first eviction) and its segmented LRU's rounding (a promotion can push
//! probation over its share, which evicts probation's LRU). Both are
//! reproduced with bounded work per call; see [`WTinyLfuWith`].

use cachet_policy_sdk::collections::{IdList, IdMap, id_map_for};
use cachet_policy_sdk::{
    Capacity, Config, ConfigError, Entry, EntryId, Need, Policy, PolicyInfo, RemovalCause, collect_victims,
    export_policy,
};
use std::marker::PhantomData;

/// Where the sketch's probes come from. A policy only sees Cachet's key
/// hash; the parameter exists so a native replay can plug in the hash the
/// reference simulator uses and check that every other difference is gone.
pub trait SketchHash: 'static {
    /// The two 32-bit bases `(a, b)` of the double hashing: probe `i` is
    /// counter `(a + i·b) mod len`, in 32-bit wrapping arithmetic.
    fn bases(key_hash: u64) -> (u32, u32);
}

/// The production probes: the two halves of Cachet's key hash (XXH3, so
/// already uniform; no further mixing needed).
pub struct KeyHashHalves;

impl SketchHash for KeyHashHalves {
    fn bases(key_hash: u64) -> (u32, u32) {
        (key_hash as u32, (key_hash >> 32) as u32)
    }
}

/// The frequency sketch: a counting Bloom filter sized for `n` keys at a
/// 0.1% false-positive rate (about 14.4 counters per key, 10 probes, at
/// least two counters per probe); the estimate is the smallest of a key's
/// counters. Every add increments all of them (libCacheSim's "minimal
/// increment" filter does so too, despite its name), so an add can be undone
/// exactly, which the warm-up relies on. Halved every `32 × n` hits in the
/// main cache so old popularity fades.
struct Sketch<H> {
    counters: Vec<u32>,
    probes: u32,
    hits: u64,
    decay_every: u64,
    hash: PhantomData<H>,
}

impl<H: SketchHash> Sketch<H> {
    fn new(n: u64) -> Self {
        // The constants and rounding of the reference filter, so its size
        // (and thus which keys collide) is the same for the same `n`.
        let per_key = -(0.001f64.ln()) / 0.480_453_013_918_201;
        let probes = (std::f64::consts::LN_2 * per_key).ceil() as u32;
        let size = ((per_key * n as f64).ceil() as usize).max(2 * probes as usize);
        Self { counters: vec![0; size], probes, hits: 0, decay_every: 32 * n.max(1), hash: PhantomData }
    }

    fn positions(&self, key: u64) -> impl Iterator<Item = usize> + use<H> {
        let (a, b) = H::bases(key);
        let len = self.counters.len() as u32;
        (0..self.probes).map(move |i| (a.wrapping_add(i.wrapping_mul(b)) % len) as usize)
    }

    fn estimate(&self, key: u64) -> u32 {
        self.positions(key).map(|i| self.counters[i]).min().unwrap_or(0)
    }

    fn add(&mut self, key: u64) {
        for i in self.positions(key) {
            self.counters[i] = self.counters[i].saturating_add(1);
        }
    }

    /// Takes back one [`Sketch::add`] of `key`.
    fn undo_add(&mut self, key: u64) {
        for i in self.positions(key) {
            self.counters[i] = self.counters[i].saturating_sub(1);
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
    /// Evicted by a promotion (probation over its share) but still resident
    /// in the host until the next `pick-victims` hands it out.
    Doomed,
}

/// W-TinyLFU with the sketch probes of `H`; [`WTinyLfu`] is the policy.
///
/// **Warm-up.** In the reference, the window keeps every key until the
/// cache is first full, and the first eviction then moves the window's
/// oldest keys into main (first probation's share, then protected's, then
/// probation again) until main is full, counting each in the sketch. Doing
/// that in one call is unbounded work, so the policy keeps that future
/// already in place: until the first eviction, keys beyond the window's
/// share spill (oldest first) into *staged* lists laid out exactly as the
/// first eviction would fill main — `probation_old`, then `protected`, then
/// `probation` — and are counted in the sketch as they spill. A hit on a
/// staged key is a window hit: the key goes back to the window's newest end,
/// its count is taken back, the lists shift up by one position, and the
/// window's oldest key spills in its place. At the first eviction the staged
/// lists simply become main, with nothing to move.
///
/// **Promotion evictions.** Probation and protected get `floor` of their
/// shares, so when main's size is not a multiple of five the reference's
/// probation holds one key over its share; a promotion that then demotes
/// protected's LRU into probation evicts probation's LRU on the spot. A
/// policy cannot evict from an access, so that key is *doomed*: out of main
/// at once, handed to the host by the next `pick-victims` (which is the
/// reference's next insert that needs no eviction), or, if read first, put
/// back as a fresh window key (the reference's miss and insert).
pub struct WTinyLfuWith<H> {
    capacity: Capacity,
    window: IdList<u64>,
    /// Probation's oldest part: filled only during warm-up, then drained.
    /// Logical probation is `probation_old` followed by `probation`.
    probation_old: IdList<u64>,
    probation: IdList<u64>,
    protected: IdList<u64>,
    doomed: IdList<u64>,
    meta: IdMap<(u64, Segment)>,
    sketch: Sketch<H>,
    /// True until the first eviction: main is still only staged.
    warm: bool,
    window_used: u64,
    probation_old_used: u64,
    /// All of logical probation, `probation_old` included.
    probation_used: u64,
    protected_used: u64,
    window_limit: u64,
    main_limit: u64,
    probation_limit: u64,
    protected_limit: u64,
}

/// The policy: W-TinyLFU probing its sketch with Cachet's key hash.
pub type WTinyLfu = WTinyLfuWith<KeyHashHalves>;

impl<H: SketchHash> WTinyLfuWith<H> {
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

    fn main_used(&self) -> u64 {
        self.probation_used + self.protected_used
    }

    fn probation_front(&self) -> Option<(EntryId, u64)> {
        self.probation_old.front().or_else(|| self.probation.front())
    }

    fn push_probation(&mut self, id: EntryId, size: u64) {
        self.probation.push_back(id, size);
        self.probation_used += self.weight(size);
        self.set_segment(id, Segment::Probation);
    }

    fn push_protected(&mut self, id: EntryId, size: u64) {
        self.protected.push_back(id, size);
        self.protected_used += self.weight(size);
        self.set_segment(id, Segment::Protected);
    }

    fn remove_probation(&mut self, id: EntryId) -> Option<u64> {
        let size = if let Some(size) = self.probation_old.remove(id) {
            self.probation_old_used -= self.weight(size);
            size
        } else {
            self.probation.remove(id)?
        };
        self.probation_used -= self.weight(size);
        Some(size)
    }

    fn remove_protected(&mut self, id: EntryId) -> Option<u64> {
        let size = self.protected.remove(id)?;
        self.protected_used -= self.weight(size);
        Some(size)
    }

    fn remove_main(&mut self, id: EntryId) -> Option<u64> {
        self.remove_probation(id).or_else(|| self.remove_protected(id))
    }

    /// The main cache's next victim: probation's LRU, else protected's.
    fn main_victim(&self) -> Option<(EntryId, u64)> {
        self.probation_front().or_else(|| self.protected.front())
    }

    /// Takes main's victim out of main and marks it doomed.
    fn doom_main_victim(&mut self) -> bool {
        let Some((id, _)) = self.main_victim() else { return false };
        let Some(size) = self.remove_main(id) else { return false };
        self.doomed.push_back(id, size);
        self.set_segment(id, Segment::Doomed);
        true
    }

    /// Inserts into main as the reference's segmented LRU does: into the
    /// lowest segment with room (probation, then protected); when neither
    /// has room, into probation, after making room in main if it is full.
    fn admit_to_main(&mut self, id: EntryId, size: u64) {
        let w = self.weight(size);
        if self.probation_used + w <= self.probation_limit {
            self.push_probation(id, size);
        } else if self.protected_used + w <= self.protected_limit {
            self.push_protected(id, size);
        } else {
            // Only with sizes: one victim may not free enough for the key.
            while self.main_used() + w > self.main_limit && self.doom_main_victim() {}
            self.push_probation(id, size);
        }
    }

    /// Evicts one entry: a doomed one if any (already out of main), else
    /// the window's oldest key moves to main while main has room, and once
    /// main is full it duels main's victim and the one the sketch rates
    /// lower leaves (ties keep main's). Candidates are counted once per
    /// contest, and when moved (no doorkeeper).
    fn evict_one(&mut self) -> Option<(EntryId, u64)> {
        if let Some((id, size)) = self.doomed.pop_front() {
            self.meta.remove(&id);
            return Some((id, size));
        }
        // The staged lists are main from now on.
        self.warm = false;
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
            let evicted = if self.main_used() + w <= self.main_limit {
                // Main has room after the first eviction only when entries
                // left it (doomed, deleted, expired), so this loop moves
                // about as many keys as left: bounded by the window's size.
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
            self.sketch.add(hash);
            if evicted.is_some() {
                return evicted;
            }
        }
    }

    /// During warm-up, moves the window's oldest keys past its share to the
    /// end of the staged lists.
    fn spill_window(&mut self) {
        while self.window_used > self.window_limit {
            let Some((id, size)) = self.window.pop_front() else { break };
            self.window_used -= self.weight(size);
            self.stage(id, size);
        }
    }

    /// Appends to the staged lists where the first eviction would put this
    /// position: probation's share first, then protected's, then probation.
    fn stage(&mut self, id: EntryId, size: u64) {
        let w = self.weight(size);
        let hash = self.hash_of(id);
        self.sketch.add(hash);
        let later_empty = self.protected.is_empty() && self.probation.is_empty();
        if later_empty && self.probation_old_used + w <= self.probation_limit {
            self.probation_old.push_back(id, size);
            self.probation_old_used += w;
            self.probation_used += w;
            self.set_segment(id, Segment::Probation);
        } else if self.protected_used + w <= self.protected_limit && self.probation.is_empty() {
            self.push_protected(id, size);
        } else {
            self.push_probation(id, size);
        }
    }

    /// Takes a key out of the staged lists (warm-up only), un-counts it,
    /// and shifts the later positions up so the lists stay laid out as the
    /// first eviction would fill main.
    fn unstage(&mut self, id: EntryId) -> Option<u64> {
        let from_old = self.probation_old.contains(id);
        let from_protected = self.protected.contains(id);
        let size = self.remove_main(id)?;
        let hash = self.hash_of(id);
        self.sketch.undo_add(hash);
        if from_old && let Some((next, next_size)) = self.protected.front() {
            let w = self.weight(next_size);
            if self.probation_old_used + w <= self.probation_limit {
                self.remove_protected(next);
                self.probation_old.push_back(next, next_size);
                self.probation_old_used += w;
                self.probation_used += w;
                self.set_segment(next, Segment::Probation);
            }
        }
        if (from_old || from_protected)
            && let Some((next, next_size)) = self.probation.front()
            && self.protected_used + self.weight(next_size) <= self.protected_limit
        {
            self.remove_probation(next);
            self.push_protected(next, next_size);
        }
        Some(size)
    }

    /// A hit on a probation key: it moves to protected; protected's overflow
    /// is demoted to probation's newest end, and probation's overflow (only
    /// possible when its share was rounded down) is doomed.
    fn promote(&mut self, id: EntryId) {
        let Some(size) = self.remove_probation(id) else { return };
        self.push_protected(id, size);
        while self.protected_used > self.protected_limit {
            let Some((old, old_size)) = self.protected.front() else { break };
            self.remove_protected(old);
            self.push_probation(old, old_size);
            while self.probation_used > self.probation_limit && self.doom_main_victim() {}
        }
    }
}

impl<H: SketchHash> Policy for WTinyLfuWith<H> {
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
        // `1 - 0.8` is 0.19999999999999996 in floating point, which would
        // round a probation of exactly a fifth down by one; snap the share
        // to twelve decimals so it is the 0.2 the reference multiplies by.
        let probation_ratio = ((1.0 - protected_ratio) * 1e12).round() / 1e12;
        let n = capacity.presize();
        Ok(Self {
            capacity,
            window: IdList::with_capacity(n),
            probation_old: IdList::with_capacity(n),
            probation: IdList::with_capacity(n),
            protected: IdList::with_capacity(n),
            doomed: IdList::new(),
            meta: id_map_for(n),
            sketch: Sketch::new(capacity.max_entries.min(main_limit)),
            warm: true,
            window_used: 0,
            probation_old_used: 0,
            probation_used: 0,
            protected_used: 0,
            window_limit,
            main_limit,
            probation_limit: (main_limit as f64 * probation_ratio) as u64,
            protected_limit: (main_limit as f64 * protected_ratio) as u64,
        })
    }

    /// New keys enter the window, counted in the sketch. During warm-up the
    /// window's overflow is staged for main. Afterwards the window may run
    /// over its share by the key just inserted (the reference moves keys to
    /// main only when evicting); beyond that, when main has room (entries
    /// were deleted or expired), its oldest key moves to main at once, so
    /// no later eviction has more than a few keys to move.
    fn on_inserted(&mut self, _: u64, entry: &Entry) {
        self.sketch.add(entry.key_hash);
        let w = self.weight(entry.size);
        self.window.push_back(entry.id, entry.size);
        self.window_used += w;
        self.meta.insert(entry.id, (entry.key_hash, Segment::Window));
        if self.warm {
            self.spill_window();
            return;
        }
        while self.window_used - w > self.window_limit {
            let Some((id, size)) = self.window.front() else { break };
            let front_w = self.weight(size);
            if id == entry.id || self.main_used() + front_w > self.main_limit {
                break;
            }
            self.window.pop_front();
            self.window_used -= front_w;
            self.admit_to_main(id, size);
            let hash = self.hash_of(id);
            self.sketch.add(hash);
        }
    }

    /// Window hits (and, during warm-up, staged hits) refresh recency only;
    /// main hits also count in the sketch and promote.
    fn on_accessed(&mut self, _: u64, id: EntryId) {
        let Some(segment) = self.segment_of(id) else { return };
        match segment {
            Segment::Window => {
                self.window.move_to_back(id);
            }
            Segment::Probation | Segment::Protected if self.warm => {
                if let Some(size) = self.unstage(id) {
                    self.window.push_back(id, size);
                    self.window_used += self.weight(size);
                    self.set_segment(id, Segment::Window);
                    self.spill_window();
                }
            }
            Segment::Probation => {
                let hash = self.hash_of(id);
                self.sketch.main_hit(hash);
                self.promote(id);
            }
            Segment::Protected => {
                let hash = self.hash_of(id);
                self.sketch.main_hit(hash);
                self.protected.move_to_back(id);
            }
            Segment::Doomed => {
                // The reference missed and re-inserted it: a new window key.
                if let Some(size) = self.doomed.remove(id) {
                    let hash = self.hash_of(id);
                    self.sketch.add(hash);
                    self.window.push_back(id, size);
                    self.window_used += self.weight(size);
                    self.set_segment(id, Segment::Window);
                }
            }
        }
    }

    fn on_updated(&mut self, now: u64, entry: &Entry) {
        let (id, size) = (entry.id, entry.size);
        let capacity = self.capacity;
        let reweigh = |used: &mut u64, old: u64| *used = *used + capacity.weight(size) - capacity.weight(old);
        match self.segment_of(id) {
            Some(Segment::Window) => {
                if let Some(old) = resize(&mut self.window, id, size) {
                    reweigh(&mut self.window_used, old);
                }
            }
            Some(Segment::Probation) => {
                if let Some(old) = resize(&mut self.probation_old, id, size) {
                    reweigh(&mut self.probation_old_used, old);
                    reweigh(&mut self.probation_used, old);
                } else if let Some(old) = resize(&mut self.probation, id, size) {
                    reweigh(&mut self.probation_used, old);
                }
            }
            Some(Segment::Protected) => {
                if let Some(old) = resize(&mut self.protected, id, size) {
                    reweigh(&mut self.protected_used, old);
                }
            }
            Some(Segment::Doomed) => {
                resize(&mut self.doomed, id, size);
            }
            None => return,
        }
        self.on_accessed(now, id);
    }

    fn on_removed(&mut self, _: u64, id: EntryId, _: RemovalCause) {
        match self.segment_of(id) {
            Some(Segment::Window) => {
                if let Some(size) = self.window.remove(id) {
                    self.window_used -= self.weight(size);
                }
            }
            Some(Segment::Probation | Segment::Protected) if self.warm => {
                self.unstage(id);
            }
            Some(Segment::Probation | Segment::Protected) => {
                self.remove_main(id);
            }
            Some(Segment::Doomed) => {
                self.doomed.remove(id);
            }
            None => {}
        }
        self.meta.remove(&id);
    }

    fn pick_victims(&mut self, _: u64, need: Need, out: &mut Vec<EntryId>) {
        collect_victims(need, out, || self.evict_one());
    }

    fn export_order(&self, out: &mut Vec<EntryId>) {
        let lists = [&self.doomed, &self.window, &self.probation_old, &self.probation, &self.protected];
        out.extend(lists.into_iter().flat_map(|list| list.iter().map(|(id, _)| id)));
    }
}

/// Sets the size stored with `id` in `list`, returning the old one.
fn resize(list: &mut IdList<u64>, id: EntryId, size: u64) -> Option<u64> {
    list.get_mut(id).map(|s| std::mem::replace(s, size))
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

    /// Capacity 100 at the default 1% window: window 1, main 99, probation
    /// 19, protected 79, so probation ends up one over its share.
    fn warmed_up() -> Harness<WTinyLfu> {
        let mut h = Harness::<WTinyLfu>::new(entries(100)).expect("create");
        for key in 0..100 {
            assert!(!h.request(key, 1));
        }
        // A hit before the first eviction is a window hit: key 0 becomes
        // the newest and the first eviction's candidate.
        assert!(h.request(0, 1));
        h
    }

    #[test]
    fn first_eviction_fills_main_in_recency_order_without_moving_keys() {
        let mut h = warmed_up();
        assert!(!h.request(1000, 1));
        // Key 0 (seen twice, counted once) loses to main's victim, key 1
        // (counted at insert and when it went to main).
        assert!(!h.contains_key(0));
        let mut want = vec![1000];
        want.extend(1..=19);
        want.push(99);
        want.extend(20..=98);
        assert_eq!(h.export_order(), want);
    }

    #[test]
    fn promotion_past_probation_share_evicts_at_the_next_insert() {
        let mut h = warmed_up();
        h.request(1000, 1);
        // Promoting 5 demotes protected's oldest (20) into probation, which
        // is then over its share: its oldest (1) is out of main at once.
        assert!(h.request(5, 1));
        assert!(h.contains_key(1), "the host still holds it until the next eviction");
        // The next insert evicts exactly that key and nothing else.
        assert!(!h.request(2000, 1));
        assert!(!h.contains_key(1));
        assert!(h.contains_key(1000) && h.contains_key(2000));
        assert_eq!(h.len(), 100);
    }

    #[test]
    fn a_doomed_key_read_again_is_a_new_window_key() {
        let mut h = warmed_up();
        h.request(1000, 1);
        h.request(5, 1);
        assert!(h.request(1, 1));
        let order = h.export_order();
        assert_eq!(&order[..2], &[1000, 1], "window holds 1000 then 1: {order:?}");
        assert!(!h.request(2000, 1));
        assert_eq!(h.len(), 100);
    }

    #[test]
    fn byte_capacity_frees_enough_bytes() {
        let capacity = Capacity { max_entries: u64::MAX, max_bytes: 10_000 };
        let mut h = Harness::<WTinyLfu>::new(capacity).expect("create");
        for i in 0..5_000u64 {
            // The harness asserts every eviction frees what was needed.
            h.request(i % 700, 10 + (i * 37) % 400);
        }
    }
}
