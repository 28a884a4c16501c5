//! Hot-key tracking: a count-min sketch of key frequencies with periodic
//! halving (so yesterday's hot keys fade), and the top keys by estimated
//! frequency. Per shard, fixed size (64 KiB of counters plus the top list),
//! updated on every read under the shard's lock.
//!
//! It answers "which keys should a new node load first" (`cachet warm
//! --from-node`) and "what is hot right now" (`cachet stats`), so estimates
//! need to rank keys, not count them exactly.

/// Counters per sketch row.
const WIDTH: usize = 4096;
/// Sketch rows (independent hashes).
const ROWS: usize = 4;
/// Keys kept in the top list.
pub const TOP: usize = 32;
/// Increments between halvings.
const AGE_EVERY: u64 = 10 * WIDTH as u64;
/// Reads counted one by one before sampling starts: small and quiet shards
/// (and tests) see exact counts.
const EXACT_READS: u64 = 4_096;
/// After that, one read in this many is counted: ranking survives
/// sampling, and the read path pays an eighth of the cost.
const SAMPLE_EVERY: u64 = 8;

/// A shard's sketch and top list.
pub struct HotKeys {
    counters: Vec<u32>,
    top: Vec<(u64, Box<[u8]>, u32)>,
    /// A lower bound of the smallest estimate in a full `top` (estimates
    /// only grow between halvings), so most reads skip the scan for it.
    floor: u32,
    increments: u64,
    reads: u64,
}

impl Default for HotKeys {
    fn default() -> Self {
        Self { counters: vec![0; WIDTH * ROWS], top: Vec::with_capacity(TOP), floor: 0, increments: 0, reads: 0 }
    }
}

fn slot(hash: u64, row: usize) -> usize {
    // Each row mixes the key hash with its own odd constant.
    let mixed = (hash ^ (row as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    row * WIDTH + ((mixed >> 32) as usize % WIDTH)
}

impl HotKeys {
    /// Counts one read of `key` (hash `hash`).
    pub fn record(&mut self, hash: u64, key: &[u8]) {
        self.reads += 1;
        if self.reads > EXACT_READS && !self.reads.is_multiple_of(SAMPLE_EVERY) {
            return;
        }
        let mut estimate = u32::MAX;
        for row in 0..ROWS {
            let c = &mut self.counters[slot(hash, row)];
            *c = c.saturating_add(1);
            estimate = estimate.min(*c);
        }
        self.increments += 1;
        if self.increments.is_multiple_of(AGE_EVERY) {
            self.counters.iter_mut().for_each(|c| *c /= 2);
            self.top.iter_mut().for_each(|t| t.2 /= 2);
            self.floor /= 2;
        }
        if estimate <= self.floor {
            // Not hotter than anything listed (and, at or below the floor,
            // not worth a refreshed estimate if it is listed).
            return;
        }
        if let Some(entry) = self.top.iter_mut().find(|t| t.0 == hash && *t.1 == *key) {
            entry.2 = estimate;
            return;
        }
        if self.top.len() < TOP {
            self.top.push((hash, key.into(), estimate));
            return;
        }
        if let Some(min) = self.top.iter_mut().min_by_key(|t| t.2)
            && estimate > min.2
        {
            *min = (hash, key.into(), estimate);
        }
        self.floor = self.top.iter().map(|t| t.2).min().unwrap_or(0);
    }

    /// The top keys, hottest first, with their estimated (aged, and past
    /// the first reads sampled) read counts: a measure of heat for
    /// ranking, not an exact count.
    pub fn top(&self) -> Vec<(Box<[u8]>, u32)> {
        let mut out: Vec<_> = self.top.iter().map(|(_, k, n)| (k.clone(), *n)).collect();
        out.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hash(key: &[u8]) -> u64 {
        cachet_proto::key_hash(key)
    }

    #[test]
    fn the_hottest_keys_rise_to_the_top() {
        let mut hot = HotKeys::default();
        // 10 hot keys read 200 times each, among 5,000 keys read once.
        for round in 0..200 {
            for k in 0..10 {
                let key = format!("hot:{k}");
                hot.record(hash(key.as_bytes()), key.as_bytes());
            }
            for c in 0..25 {
                let key = format!("cold:{}", round * 25 + c);
                hot.record(hash(key.as_bytes()), key.as_bytes());
            }
        }
        let top = hot.top();
        assert!(top.len() <= TOP);
        let first: Vec<String> = top.iter().take(10).map(|(k, _)| String::from_utf8_lossy(k).into_owned()).collect();
        for k in 0..10 {
            assert!(first.contains(&format!("hot:{k}")), "hot:{k} missing from {first:?}");
        }
        // ~117 rounds counted exactly, the last ~83 one read in eight.
        assert!(top[0].1 >= 100, "estimate {}", top[0].1);
    }

    #[test]
    fn old_heat_fades() {
        let mut hot = HotKeys::default();
        for _ in 0..1_000 {
            hot.record(hash(b"old"), b"old");
        }
        // Enough other reads to age the sketch several times.
        for i in 0..(AGE_EVERY * 4 * SAMPLE_EVERY) {
            let key = format!("k{}", i % 50);
            hot.record(hash(key.as_bytes()), key.as_bytes());
        }
        let old = hot.top().into_iter().find(|(k, _)| &**k == b"old").map_or(0, |(_, n)| n);
        assert!(old < 100, "old key still at {old}");
    }
}
