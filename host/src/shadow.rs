//! Shadow evaluation: predicting a candidate policy's hit ratio from the
//! live traffic before it serves a single request.
//!
//! Spatial sampling (SHARDS, Waldspurger et al., FAST '15): a key is in the
//! sample when a hash of it falls below a threshold, so the sample keeps
//! *every* request for a fixed share `R` of the keys. Replayed through a
//! cache scaled to `R` of the real one, it shows about the hit ratio the
//! full cache would have. Two ghosts see the same sample: one runs the
//! candidate, one the active policy, so the operator compares like with
//! like (and the active ghost's prediction against the live hit ratio shows
//! how good the estimate is). Ghosts hold keys but no values: each stores
//! a shared zero slice of the value's length so byte budgets still count.

use crate::core::{PolicyError, PolicyFactory, SetOptions, Shard, ShardConfig};
use crate::store::NodeConfig;
use bytes::Bytes;
use cachet_proto::{Request, ShadowListing};
use std::sync::Arc;

/// Fewest entries a ghost should hold for its estimate to mean much; the
/// sample rate rises (up to every key) for small caches.
const MIN_GHOST_ENTRIES: u64 = 8_192;
/// Sample rate for large caches.
const BASE_RATE: f64 = 0.01;
/// Fixed-point scale of the sampling threshold.
const SCALE: u64 = 1 << 24;

/// Backing for ghost values: never written, so it costs no memory until
/// read, and it is never read.
static ZEROS: [u8; 1 << 20] = [0; 1 << 20];

/// Whether `key` falls in a sample of `threshold` (out of 2^24). Callers
/// decide this before taking the shadow's lock, so unsampled requests (99%
/// of them on a large cache) never touch it.
pub fn in_sample(key: &[u8], threshold: u64) -> bool {
    let mixed = cachet_proto::key_hash(key).wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 40;
    mixed < threshold
}

/// A candidate and the active policy on the same sampled traffic.
pub struct Shadow {
    candidate: String,
    threshold: u64,
    candidate_ghost: Shard,
    active_ghost: Shard,
    reads: u64,
    candidate_hits: u64,
    active_hits: u64,
    /// Live hits and misses when the evaluation started.
    live_start: (u64, u64),
}

impl Shadow {
    /// Ghosts of `node`'s size scaled by the sample rate, one running
    /// `candidate`, one `active`.
    pub fn new(
        candidate_label: String,
        candidate: Arc<dyn PolicyFactory>,
        active: Arc<dyn PolicyFactory>,
        node: &NodeConfig,
        live_start: (u64, u64),
    ) -> Result<Self, PolicyError> {
        let rate = (MIN_GHOST_ENTRIES as f64 / node.max_entries.max(1) as f64).clamp(BASE_RATE, 1.0);
        let threshold = ((rate * SCALE as f64).round() as u64).clamp(1, SCALE);
        let rate = threshold as f64 / SCALE as f64;
        let config = ShardConfig {
            max_entries: ((node.max_entries as f64 * rate).round() as u64).max(1),
            max_bytes: ((node.max_bytes as f64 * rate).round() as u64).max(1),
            max_value_size: node.max_value_size,
            max_key_size: node.max_key_size,
            ..ShardConfig::default()
        };
        Ok(Self {
            candidate: candidate_label,
            threshold,
            candidate_ghost: Shard::new(config.clone(), candidate)?,
            active_ghost: Shard::new(config, active)?,
            reads: 0,
            candidate_hits: 0,
            active_hits: 0,
            live_start,
        })
    }

    /// The candidate's `name@version`.
    pub fn candidate(&self) -> &str {
        &self.candidate
    }

    /// The share of keys sampled.
    pub fn sample_rate(&self) -> f64 {
        self.threshold as f64 / SCALE as f64
    }

    /// Whether requests for `key` are part of the sample. Mixes the key
    /// hash again so the sample is independent of shard placement.
    pub fn sampled(&self, key: &[u8]) -> bool {
        in_sample(key, self.threshold)
    }

    /// The sampling threshold, for deciding [`in_sample`] without the
    /// shadow's lock.
    pub fn threshold(&self) -> u64 {
        self.threshold
    }

    /// A sampled GET.
    pub fn read(&mut self, now: u64, key: &[u8]) {
        self.reads += 1;
        self.candidate_hits += u64::from(self.candidate_ghost.get(now, key).is_some());
        self.active_hits += u64::from(self.active_ghost.get(now, key).is_some());
    }

    /// A sampled write of a `len`-byte value.
    pub fn write(&mut self, now: u64, key: &[u8], len: usize, ttl_ms: Option<u64>) {
        let value = Bytes::from_static(&ZEROS[..len.min(ZEROS.len())]);
        let options = SetOptions { ttl_ms, ..SetOptions::default() };
        // A value the live shard took fits the ghost's limits too; a refusal
        // would only skew the estimate, never the live data.
        let _ = self.candidate_ghost.set(now, key, value.clone(), options);
        let _ = self.active_ghost.set(now, key, value, options);
    }

    /// A sampled DEL.
    pub fn delete(&mut self, now: u64, key: &[u8]) {
        self.candidate_ghost.delete(now, key);
        self.active_ghost.delete(now, key);
    }

    /// Shows the ghosts a request: reads and writes of its sampled keys.
    /// Writes are mirrored whether or not the live write applies (a close
    /// enough model of the traffic; the ghosts only estimate).
    pub fn observe(&mut self, now: u64, request: &Request) {
        match request {
            Request::Get { key } | Request::GetEx { key, .. } if self.sampled(key) => self.read(now, key),
            Request::MGet { keys } => {
                for key in keys {
                    if self.sampled(key) {
                        self.read(now, key);
                    }
                }
            }
            Request::Set { key, value, ttl_ms, .. } | Request::SetWith { key, value, ttl_ms, .. }
                if self.sampled(key) =>
            {
                self.write(now, key, value.len(), *ttl_ms)
            }
            Request::MSet { pairs } => {
                for (key, value) in pairs {
                    if self.sampled(key) {
                        self.write(now, key, value.len(), None);
                    }
                }
            }
            Request::Del { keys } => {
                for key in keys {
                    if self.sampled(key) {
                        self.delete(now, key);
                    }
                }
            }
            Request::GetDel { key } if self.sampled(key) => {
                self.read(now, key);
                self.delete(now, key);
            }
            _ => {}
        }
    }

    /// Periodic work of both ghosts.
    pub fn tick(&mut self, now: u64) {
        self.candidate_ghost.tick(now);
        self.active_ghost.tick(now);
    }

    /// After a swap, the active ghost runs the new active policy.
    pub fn swap_active(&mut self, now: u64, factory: Arc<dyn PolicyFactory>) {
        if let Err(err) = self.active_ghost.swap_policy(now, factory) {
            tracing::warn!(%err, "shadow: cannot swap the active ghost");
        }
    }

    /// Predictions so far, next to the live hit ratio since the start
    /// (`live_now` is the node's hits and misses now).
    pub fn listing(&self, live_now: (u64, u64)) -> ShadowListing {
        let ratio = |hits: u64, reads: u64| if reads == 0 { 0.0 } else { hits as f64 / reads as f64 };
        let live_hits = live_now.0.saturating_sub(self.live_start.0);
        let live_misses = live_now.1.saturating_sub(self.live_start.1);
        ShadowListing {
            candidate: self.candidate.clone(),
            sample_rate: self.sample_rate(),
            sampled_reads: self.reads,
            candidate_hit_ratio: ratio(self.candidate_hits, self.reads),
            active_hit_ratio: ratio(self.active_hits, self.reads),
            live_hit_ratio: ratio(live_hits, live_hits + live_misses),
            candidate_faults: self.candidate_ghost.stats().policy_faults(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::NativeFactory;
    use cachet_policy_sdk::Config;

    #[test]
    fn sampling_keeps_about_the_rate_and_whole_keys() {
        let lru: Arc<dyn PolicyFactory> = Arc::new(NativeFactory::<cachet_policy_lru::Lru>::new(Config::default()));
        let node = NodeConfig { max_entries: 1_000_000, ..NodeConfig::default() };
        let shadow = Shadow::new("lru@1".into(), lru.clone(), lru, &node, (0, 0)).expect("shadow");
        assert!((shadow.sample_rate() - 0.01).abs() < 1e-4, "{}", shadow.sample_rate());
        let sampled = (0..200_000).filter(|i| shadow.sampled(format!("key:{i}").as_bytes())).count();
        assert!((1_600..2_400).contains(&sampled), "{sampled} of 200000 sampled at 1%");
        assert_eq!(shadow.sampled(b"key:42"), shadow.sampled(b"key:42"));
    }

    #[test]
    fn a_better_candidate_predicts_a_better_hit_ratio() {
        // A scan-polluted loop: LFU keeps the hot set, FIFO does not.
        let fifo: Arc<dyn PolicyFactory> = Arc::new(NativeFactory::<cachet_policy_fifo::Fifo>::new(Config::default()));
        let lfu: Arc<dyn PolicyFactory> = Arc::new(NativeFactory::<cachet_policy_lfu::Lfu>::new(Config::default()));
        let node = NodeConfig { max_entries: 1_000, ..NodeConfig::default() };
        let mut shadow = Shadow::new("lfu@1".into(), lfu, fifo, &node, (0, 0)).expect("shadow");
        assert_eq!(shadow.sample_rate(), 1.0, "small caches are sampled whole");
        let mut scan = 0u64;
        for round in 0..200u64 {
            for hot in 0..500u64 {
                let key = format!("hot:{hot}");
                shadow.read(round, key.as_bytes());
                shadow.write(round, key.as_bytes(), 10, None);
                // Read again: LFU learns these keys are popular.
                shadow.read(round, key.as_bytes());
                shadow.read(round, key.as_bytes());
            }
            for _ in 0..2_000 {
                scan += 1;
                let key = format!("scan:{scan}");
                shadow.read(round, key.as_bytes());
                shadow.write(round, key.as_bytes(), 10, None);
            }
        }
        let listing = shadow.listing((0, 0));
        assert!(
            listing.candidate_hit_ratio > listing.active_hit_ratio + 0.1,
            "lfu {:.3} vs fifo {:.3}",
            listing.candidate_hit_ratio,
            listing.active_hit_ratio
        );
    }
}
