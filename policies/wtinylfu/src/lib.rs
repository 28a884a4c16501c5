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
//! The contest is the policy's admission: it runs in the `admit` hook when
//! a new key needs room, and `pick-victims` hands out its losers.
//!
//! This follows libCacheSim's `wtinyLFU` step for step where that decides a
//! miss ratio, including its warm-up (the window keeps every key until the
//! first eviction), its segmented LRU's rounding (a promotion can push
//! probation over its share, which evicts probation's LRU) and its eviction
//! loop (after a window key wins, the next one duels too). All are
//! reproduced without walking the whole cache in one call (a contest walks
//! at most the window); see [`WTinyLfuWith`].

use cachet_policy_sdk::collections::{IdLists, IdMap, id_map_for};
use cachet_policy_sdk::{
    Capacity, Config, ConfigError, Entry, EntryId, Need, Policy, PolicyInfo, RemovalCause, export_policy,
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

/// What a list holds, in the unit of [`Capacity::weight`] and in entries.
/// Limits are kept in both: with a byte budget the entry bound can be the
/// one that fills first. With only an entry bound the two are equal.
#[derive(Clone, Copy, Default, Debug, PartialEq, Eq)]
struct Load {
    weight: u64,
    entries: u64,
}

impl Load {
    fn add(&mut self, weight: u64) {
        *self = self.plus(weight);
    }

    fn sub(&mut self, weight: u64) {
        *self = self.without(weight);
    }

    /// This load with one more entry of `weight`.
    fn plus(self, weight: u64) -> Self {
        Self { weight: self.weight.saturating_add(weight), entries: self.entries.saturating_add(1) }
    }

    /// This load with one entry of `weight` fewer.
    fn without(self, weight: u64) -> Self {
        Self { weight: self.weight.saturating_sub(weight), entries: self.entries.saturating_sub(1) }
    }

    /// Both loads together.
    fn with(self, other: Self) -> Self {
        Self { weight: self.weight.saturating_add(other.weight), entries: self.entries.saturating_add(other.entries) }
    }

    fn within(self, limit: Self) -> bool {
        self.weight <= limit.weight && self.entries <= limit.entries
    }

    fn over(self, limit: Self) -> bool {
        !self.within(limit)
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Segment {
    Window,
    Probation,
    Protected,
    /// Lost an admission contest or was evicted by a promotion (probation
    /// over its share), but still resident in the host until the next
    /// `pick-victims` hands it out.
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
/// back as a fresh window key (the reference's miss and insert). The
/// admission contest's losers are doomed too, and handed out by the
/// `pick-victims` call that follows `admit`, so nothing reads them first.
pub struct WTinyLfuWith<H> {
    capacity: Capacity,
    /// The five segments' lists, in one slot-indexed table (an id is in
    /// at most one): `WINDOW`, `PROBATION_OLD` (probation's oldest part:
    /// filled only during warm-up, then drained; logical probation is
    /// `PROBATION_OLD` followed by `PROBATION`), `PROBATION`, `PROTECTED`,
    /// `DOOMED`.
    lists: Segments,
    meta: IdMap<(u64, Segment)>,
    sketch: Sketch<H>,
    /// True until the first eviction: main is still only staged.
    warm: bool,
    window_used: Load,
    probation_old_used: Load,
    /// All of logical probation, `probation_old` included.
    probation_used: Load,
    protected_used: Load,
    window_limit: Load,
    main_limit: Load,
    probation_limit: Load,
    protected_limit: Load,
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

    fn main_used(&self) -> Load {
        self.probation_used.with(self.protected_used)
    }

    fn probation_front(&self) -> Option<(EntryId, u64)> {
        self.lists.front(PROBATION_OLD).or_else(|| self.lists.front(PROBATION))
    }

    fn push_probation(&mut self, id: EntryId, size: u64) {
        self.lists.push_back(PROBATION, id, size);
        self.probation_used.add(self.weight(size));
        self.set_segment(id, Segment::Probation);
    }

    fn push_protected(&mut self, id: EntryId, size: u64) {
        self.lists.push_back(PROTECTED, id, size);
        self.protected_used.add(self.weight(size));
        self.set_segment(id, Segment::Protected);
    }

    fn remove_probation(&mut self, id: EntryId) -> Option<u64> {
        let size = if let Some(size) = self.lists.remove(PROBATION_OLD, id) {
            self.probation_old_used.sub(self.weight(size));
            size
        } else {
            self.lists.remove(PROBATION, id)?
        };
        self.probation_used.sub(self.weight(size));
        Some(size)
    }

    fn remove_protected(&mut self, id: EntryId) -> Option<u64> {
        let size = self.lists.remove(PROTECTED, id)?;
        self.protected_used.sub(self.weight(size));
        Some(size)
    }

    fn remove_main(&mut self, id: EntryId) -> Option<u64> {
        self.remove_probation(id).or_else(|| self.remove_protected(id))
    }

    /// The main cache's next victim: probation's LRU, else protected's.
    fn main_victim(&self) -> Option<(EntryId, u64)> {
        self.probation_front().or_else(|| self.lists.front(PROTECTED))
    }

    /// Takes main's victim out of main and marks it doomed.
    fn doom_main_victim(&mut self) -> bool {
        let Some((id, _)) = self.main_victim() else { return false };
        let Some(size) = self.remove_main(id) else { return false };
        self.doom(id, size);
        true
    }

    /// Inserts into main as the reference's segmented LRU does: into the
    /// lowest segment with room (probation, then protected); when neither
    /// has room, into probation, after making room in main if it is full.
    fn admit_to_main(&mut self, id: EntryId, size: u64) {
        let w = self.weight(size);
        if self.probation_used.plus(w).within(self.probation_limit) {
            self.push_probation(id, size);
        } else if self.protected_used.plus(w).within(self.protected_limit) {
            self.push_protected(id, size);
        } else {
            // Only with sizes: one victim may not free enough for the key.
            while !self.main_used().plus(w).within(self.main_limit) && self.doom_main_victim() {}
            self.push_probation(id, size);
        }
    }

    /// Marks `id`, already out of its list, doomed: gone for the policy,
    /// handed to the host by the next `pick-victims`.
    fn doom(&mut self, id: EntryId, size: u64) {
        self.lists.push_back(DOOMED, id, size);
        self.set_segment(id, Segment::Doomed);
    }

    /// The admission contest, one eviction step of the reference: the
    /// window's oldest key moves to main while main has room; once main is
    /// full it duels main's victim and the sketch's lower estimate loses
    /// (ties keep main's). A candidate that loses ends the step. One that
    /// wins takes the victim's place and the step goes on with the next
    /// candidate, so a step can cost main several keys; if the window runs
    /// dry, main's next victim goes too and the step ends. That continuation
    /// is the reference's (libCacheSim at the commit the tables were made
    /// with) and it decides cells: with a one-object window every win costs
    /// main a second key, and the window grows into the room. Candidates are
    /// counted once per contest, and when moved (no doorkeeper). Losers are
    /// doomed. With an entry bound a step dooms at most the window's length
    /// plus one; with a byte budget a key moving to main may need several
    /// victims. Returns whether anything was doomed.
    fn contest(&mut self) -> bool {
        // The staged lists are main from now on.
        self.warm = false;
        loop {
            let Some((candidate, size)) = self.lists.front(WINDOW) else {
                return self.doom_main_victim();
            };
            let w = self.weight(size);
            let hash = self.hash_of(candidate);
            self.lists.pop_front(WINDOW);
            self.window_used.sub(w);
            if self.main_used().plus(w).within(self.main_limit) {
                // Main has room after the first eviction only when entries
                // left it (doomed, deleted, expired, or the last step's
                // eviction from main), so this moves about as many keys.
                self.admit_to_main(candidate, size);
            } else if let Some((victim, _)) = self.main_victim()
                && self.sketch.estimate(hash) > self.sketch.estimate(self.hash_of(victim))
                && let Some(victim_size) = self.remove_main(victim)
            {
                self.doom(victim, victim_size);
                self.admit_to_main(candidate, size);
            } else {
                self.doom(candidate, size);
                self.sketch.add(hash);
                return true;
            }
            self.sketch.add(hash);
        }
    }

    /// Whether a new entry of `size` bytes needs room, not counting doomed
    /// keys (the reference has evicted them already). Mirrors the host's
    /// own check, in entries and, with a byte budget, in bytes.
    fn needs_room_for(&self, size: u64) -> bool {
        let total = Load { weight: self.capacity.limit(), entries: self.capacity.max_entries };
        !self.window_used.with(self.main_used()).plus(self.weight(size)).within(total)
    }

    /// During warm-up, moves the window's oldest keys past its share to the
    /// end of the staged lists.
    fn spill_window(&mut self) {
        while self.window_used.over(self.window_limit) {
            let Some((id, size)) = self.lists.pop_front(WINDOW) else { break };
            self.window_used.sub(self.weight(size));
            self.stage(id, size);
        }
    }

    /// Appends to the staged lists where the first eviction would put this
    /// position: probation's share first, then protected's, then probation.
    fn stage(&mut self, id: EntryId, size: u64) {
        let w = self.weight(size);
        let hash = self.hash_of(id);
        self.sketch.add(hash);
        let later_empty = self.lists.is_empty(PROTECTED) && self.lists.is_empty(PROBATION);
        if later_empty && self.probation_old_used.plus(w).within(self.probation_limit) {
            self.lists.push_back(PROBATION_OLD, id, size);
            self.probation_old_used.add(w);
            self.probation_used.add(w);
            self.set_segment(id, Segment::Probation);
        } else if self.protected_used.plus(w).within(self.protected_limit) && self.lists.is_empty(PROBATION) {
            self.push_protected(id, size);
        } else {
            self.push_probation(id, size);
        }
    }

    /// Takes a key out of the staged lists (warm-up only), un-counts it,
    /// and shifts the later positions up so the lists stay laid out as the
    /// first eviction would fill main.
    fn unstage(&mut self, id: EntryId) -> Option<u64> {
        let from_old = self.lists.contains(PROBATION_OLD, id);
        let from_protected = self.lists.contains(PROTECTED, id);
        let size = self.remove_main(id)?;
        let hash = self.hash_of(id);
        self.sketch.undo_add(hash);
        if from_old && let Some((next, next_size)) = self.lists.front(PROTECTED) {
            let w = self.weight(next_size);
            if self.probation_old_used.plus(w).within(self.probation_limit) {
                self.remove_protected(next);
                self.lists.push_back(PROBATION_OLD, next, next_size);
                self.probation_old_used.add(w);
                self.probation_used.add(w);
                self.set_segment(next, Segment::Probation);
            }
        }
        if (from_old || from_protected)
            && let Some((next, next_size)) = self.lists.front(PROBATION)
            && self.protected_used.plus(self.weight(next_size)).within(self.protected_limit)
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
        while self.protected_used.over(self.protected_limit) {
            let Some((old, old_size)) = self.lists.front(PROTECTED) else { break };
            self.remove_protected(old);
            self.push_probation(old, old_size);
            while self.probation_used.over(self.probation_limit) && self.doom_main_victim() {}
        }
    }
}

impl<H: SketchHash> Policy for WTinyLfuWith<H> {
    fn info() -> PolicyInfo {
        PolicyInfo::new("wtinylfu", env!("CARGO_PKG_VERSION")).with_access_events().with_admission()
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
        // Shares of both bounds: with a byte budget, the entry bound may
        // be what fills first (small values), and a window or main bounded
        // only in bytes would then hold everything, making the first
        // contest move the whole cache in one call.
        let share = |of: u64, ratio: f64| (of as f64 * ratio) as u64;
        let window_limit = Load {
            weight: share(limit, window_ratio).max(capacity.weight(1)),
            entries: share(capacity.max_entries, window_ratio).max(1),
        };
        let main_limit = Load {
            weight: limit.saturating_sub(window_limit.weight),
            entries: capacity.max_entries.saturating_sub(window_limit.entries),
        };
        let of_main =
            |ratio: f64| Load { weight: share(main_limit.weight, ratio), entries: share(main_limit.entries, ratio) };
        // `1 - 0.8` is 0.19999999999999996 in floating point, which would
        // round a probation of exactly a fifth down by one; snap the share
        // to twelve decimals so it is the 0.2 the reference multiplies by.
        let probation_ratio = ((1.0 - protected_ratio) * 1e12).round() / 1e12;
        let n = capacity.presize();
        Ok(Self {
            capacity,
            lists: Segments(IdLists::with_capacity(n)),
            meta: id_map_for(n),
            // Sized for main's entries; with only a byte budget, for main's bytes
            // (one-byte entries at worst) but never past the presizing cap, so
            // a large budget cannot make a sketch that does not fit.
            sketch: Sketch::new(main_limit.entries.min(main_limit.weight).min(capacity.presize() as u64)),
            warm: true,
            window_used: Load::default(),
            probation_old_used: Load::default(),
            probation_used: Load::default(),
            protected_used: Load::default(),
            window_limit,
            main_limit,
            probation_limit: of_main(probation_ratio),
            protected_limit: of_main(protected_ratio),
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
        self.lists.push_back(WINDOW, entry.id, entry.size);
        self.window_used.add(w);
        self.meta.insert(entry.id, (entry.key_hash, Segment::Window));
        if self.warm {
            self.spill_window();
            return;
        }
        while self.window_used.without(w).over(self.window_limit) {
            let Some((id, size)) = self.lists.front(WINDOW) else { break };
            let front_w = self.weight(size);
            if id == entry.id || !self.main_used().plus(front_w).within(self.main_limit) {
                break;
            }
            self.lists.pop_front(WINDOW);
            self.window_used.sub(front_w);
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
                self.lists.move_to_back(WINDOW, id);
            }
            Segment::Probation | Segment::Protected if self.warm => {
                if let Some(size) = self.unstage(id) {
                    self.lists.push_back(WINDOW, id, size);
                    self.window_used.add(self.weight(size));
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
                self.lists.move_to_back(PROTECTED, id);
            }
            Segment::Doomed => {
                // The reference missed and re-inserted it: a new window key.
                if let Some(size) = self.lists.remove(DOOMED, id) {
                    let hash = self.hash_of(id);
                    self.sketch.add(hash);
                    self.lists.push_back(WINDOW, id, size);
                    self.window_used.add(self.weight(size));
                    self.set_segment(id, Segment::Window);
                }
            }
        }
    }

    fn on_updated(&mut self, now: u64, entry: &Entry) {
        let (id, size) = (entry.id, entry.size);
        let capacity = self.capacity;
        let reweigh =
            |used: &mut Load, old: u64| used.weight = used.weight + capacity.weight(size) - capacity.weight(old);
        match self.segment_of(id) {
            Some(Segment::Window) => {
                if let Some(old) = resize(&mut self.lists, WINDOW, id, size) {
                    reweigh(&mut self.window_used, old);
                }
            }
            Some(Segment::Probation) => {
                if let Some(old) = resize(&mut self.lists, PROBATION_OLD, id, size) {
                    reweigh(&mut self.probation_old_used, old);
                    reweigh(&mut self.probation_used, old);
                } else if let Some(old) = resize(&mut self.lists, PROBATION, id, size) {
                    reweigh(&mut self.probation_used, old);
                }
            }
            Some(Segment::Protected) => {
                if let Some(old) = resize(&mut self.lists, PROTECTED, id, size) {
                    reweigh(&mut self.protected_used, old);
                }
            }
            Some(Segment::Doomed) => {
                resize(&mut self.lists, DOOMED, id, size);
            }
            None => return,
        }
        self.on_accessed(now, id);
    }

    fn on_removed(&mut self, _: u64, id: EntryId, _: RemovalCause) {
        match self.segment_of(id) {
            Some(Segment::Window) => {
                if let Some(size) = self.lists.remove(WINDOW, id) {
                    self.window_used.sub(self.weight(size));
                }
            }
            Some(Segment::Probation | Segment::Protected) if self.warm => {
                self.unstage(id);
            }
            Some(Segment::Probation | Segment::Protected) => {
                self.remove_main(id);
            }
            Some(Segment::Doomed) => {
                self.lists.remove(DOOMED, id);
            }
            None => {}
        }
        self.meta.remove(&id);
    }

    /// W-TinyLFU admits every new key to the window; what the sketch admits
    /// or turns away is the window's oldest key, on its way into main. That
    /// contest runs here, when the new key needs room, and its losers are
    /// doomed for the `pick-victims` call that follows. Always `true`.
    fn admit(&mut self, _: u64, candidate: &Entry) -> bool {
        if self.needs_room_for(candidate.size) {
            self.contest();
        }
        true
    }

    /// Hands over every doomed key, needed or not (the reference evicted
    /// them already), then runs more contests only if that is not enough:
    /// with a byte budget a big key can need several.
    fn pick_victims(&mut self, _: u64, need: Need, out: &mut Vec<EntryId>) {
        let (mut entries, mut bytes) = (0u32, 0u64);
        loop {
            while let Some((id, size)) = self.lists.pop_front(DOOMED) {
                self.meta.remove(&id);
                out.push(id);
                entries = entries.saturating_add(1);
                bytes = bytes.saturating_add(size);
            }
            if need.is_met(entries, bytes) || !self.contest() {
                return;
            }
        }
    }

    fn export_order(&self, out: &mut Vec<EntryId>) {
        let order = [DOOMED, WINDOW, PROBATION_OLD, PROBATION, PROTECTED];
        out.extend(order.into_iter().flat_map(|list| self.lists.iter(list).map(|(id, _)| id)));
    }
}

/// Sets the size stored with `id` if it is in `list`, returning the old one.
fn resize(lists: &mut Segments, list: usize, id: EntryId, size: u64) -> Option<u64> {
    lists.get_mut(list, id).map(|s| std::mem::replace(s, size))
}

const WINDOW: usize = 0;
const PROBATION_OLD: usize = 1;
const PROBATION: usize = 2;
const PROTECTED: usize = 3;
const DOOMED: usize = 4;

/// The segments' lists, each entry's size as the value. The lookups are
/// per segment, as with one list per segment: an id in another segment
/// is not found.
struct Segments(IdLists<u64, 5>);

impl Segments {
    fn contains(&self, list: usize, id: EntryId) -> bool {
        self.0.get(id).is_some_and(|(held_in, _)| held_in == list)
    }

    fn front(&self, list: usize) -> Option<(EntryId, u64)> {
        self.0.front(list)
    }

    fn pop_front(&mut self, list: usize) -> Option<(EntryId, u64)> {
        self.0.pop_front(list)
    }

    fn push_back(&mut self, list: usize, id: EntryId, size: u64) {
        let _ = self.0.push_back(list, id, size);
    }

    fn remove(&mut self, list: usize, id: EntryId) -> Option<u64> {
        if !self.contains(list, id) {
            return None;
        }
        self.0.remove(id).map(|(_, size)| size)
    }

    fn move_to_back(&mut self, list: usize, id: EntryId) -> bool {
        self.contains(list, id) && self.0.move_to_back(id)
    }

    fn get_mut(&mut self, list: usize, id: EntryId) -> Option<&mut u64> {
        if !self.contains(list, id) {
            return None;
        }
        self.0.get_mut(id)
    }

    fn is_empty(&self, list: usize) -> bool {
        self.0.is_empty(list)
    }

    #[cfg(test)]
    fn len(&self, list: usize) -> usize {
        self.0.len(list)
    }

    fn iter(&self, list: usize) -> impl Iterator<Item = (EntryId, u64)> + '_ {
        self.0.iter(list)
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
        // Main has room for 1000. Key 1 (counted at insert, when it went to
        // main and again now) beats main's victim 2 (counted twice), so the
        // contest goes on, finds the window empty and takes 3 as well.
        assert!(!h.request(2000, 1));
        assert!(h.contains_key(1) && h.contains_key(1000) && h.contains_key(2000));
        assert!(!h.contains_key(2) && !h.contains_key(3));
        assert_eq!(h.len(), 99);
    }

    /// The reference's eviction loop goes on after a window key wins its
    /// duel; with a one-object window, main then loses a second key and the
    /// window grows into the room. This is what puts web12 at 1% on the
    /// reference's 0.6290 (0.6471 when a win ended the step).
    #[test]
    fn a_winning_candidate_costs_main_a_second_key_and_the_window_grows() {
        let mut h = warmed_up();
        assert!(!h.request(1000, 1));
        // Key 0 lost the first contest (counted once more for it); back
        // again it beats 1000 to the window's place: 1000 (counted once)
        // loses to main's victim 1 (counted twice).
        assert!(!h.request(0, 1));
        assert!(!h.contains_key(1000) && h.contains_key(0));
        // Now 0 (counted three times) beats 1: 1 goes, 0 enters main, the
        // window is empty and main's next victim, 2, goes too.
        assert!(!h.request(3000, 1));
        assert!(h.contains_key(0) && h.contains_key(3000));
        assert!(!h.contains_key(1) && !h.contains_key(2));
        assert_eq!(h.len(), 99);
        // The room is the window's: the next key needs no eviction and the
        // window holds two keys.
        assert!(!h.request(4000, 1));
        assert_eq!(h.len(), 100);
        assert_eq!(&h.export_order()[..2], &[3000, 4000]);
    }

    /// The contest runs in `admit`, before `pick-victims`: its loser is
    /// handed out even by a call that needs nothing, which would run no
    /// contest of its own.
    #[test]
    fn admission_runs_the_contest_and_pick_victims_hands_out_its_loser() {
        assert!(WTinyLfu::info().uses_admission);
        let mut p = WTinyLfu::create(entries(10), 0, &Config::default()).expect("create");
        let entry = |id: u64| Entry {
            id,
            key_hash: id.wrapping_mul(0x9E37_79B9_7F4A_7C15),
            size: 1,
            expires_at: None,
            hint: 0,
        };
        let nothing = |p: &mut WTinyLfu| {
            let mut out = Vec::new();
            p.pick_victims(0, Need::default(), &mut out);
            out
        };
        for id in 0..10 {
            assert!(p.admit(0, &entry(id)), "a cache with room admits");
            p.on_inserted(0, &entry(id));
            assert!(nothing(&mut p).is_empty(), "no contest while there is room");
        }
        // Full: the window's only key, 9 (counted once), loses to main's
        // victim 0 (counted when inserted and when staged).
        assert!(p.admit(0, &entry(10)), "W-TinyLFU admits every new key to the window");
        assert_eq!(nothing(&mut p), vec![9]);
        assert!(nothing(&mut p).is_empty(), "handed out once");
    }

    /// With a byte budget that small values never reach, the entry bound
    /// fills first; the window and main keep their shares of entries too,
    /// so the first contest duels instead of moving the whole cache to main
    /// in one call (which ran a Wasm policy out of its budget).
    #[test]
    fn an_entry_bound_under_a_byte_budget_keeps_the_window_small() {
        let capacity = Capacity { max_entries: 1_000, max_bytes: 1 << 30 };
        let mut h = Harness::<WTinyLfu>::new(capacity).expect("create");
        for key in 0..1_000 {
            assert!(!h.request(key, 20));
        }
        assert!(h.policy().lists.len(WINDOW) <= 10, "window holds {}", h.policy().lists.len(WINDOW));
        for key in 1_000..3_000 {
            h.request(key, 20);
            assert!(h.policy().lists.len(WINDOW) <= 12, "window holds {}", h.policy().lists.len(WINDOW));
            assert!(h.policy().main_used().entries <= 990);
        }
    }

    /// With only a byte budget the sketch is sized for main's bytes as if
    /// entries were tiny, capped at the presizing limit: 256 MiB would
    /// otherwise ask for 3.8 billion counters.
    #[test]
    fn a_large_byte_budget_sizes_the_sketch_within_the_presizing_cap() {
        let capacity = Capacity { max_entries: u64::MAX, max_bytes: 256 << 20 };
        let p = WTinyLfu::create(capacity, 0, &Config::default()).expect("create");
        assert!(p.sketch.counters.len() <= 15 << 20, "{} counters", p.sketch.counters.len());
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
