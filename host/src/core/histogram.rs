//! Latency histograms with fixed, power-of-two buckets, cheap enough to
//! record on every request and every policy call and to sum across shards
//! and threads. The bucket bounds are the same everywhere, so the metrics
//! endpoint can publish them as Prometheus histograms without rebinning.

use std::sync::atomic::{AtomicU64, Ordering};

/// Buckets: upper bounds of 250 ns × 2^k for k in 0..BUCKETS, the last
/// bucket (about 1 s) catching everything slower.
pub const BUCKETS: usize = 23;

/// The upper bound of bucket `i` in nanoseconds.
pub fn bucket_bound_ns(i: usize) -> u64 {
    250u64 << i.min(BUCKETS - 1)
}

fn bucket_of(nanos: u64) -> usize {
    // 0..=250 ns is bucket 0, 251..=500 bucket 1, and so on.
    let quarter_micros = nanos.saturating_sub(1) / 250;
    (u64::BITS - quarter_micros.leading_zeros()).min(BUCKETS as u32 - 1) as usize
}

/// A histogram owned by one thread (a shard's, behind its lock).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Histogram {
    counts: [u64; BUCKETS],
    sum_ns: u64,
}

impl Histogram {
    /// Counts one observation of `nanos`.
    pub fn record(&mut self, nanos: u64) {
        self.counts[bucket_of(nanos)] += 1;
        self.sum_ns = self.sum_ns.saturating_add(nanos);
    }

    /// Adds `other`'s observations to these.
    pub fn merge(&mut self, other: &Self) {
        for (mine, theirs) in self.counts.iter_mut().zip(other.counts) {
            *mine += theirs;
        }
        self.sum_ns = self.sum_ns.saturating_add(other.sum_ns);
    }

    /// Observations per bucket (not cumulative).
    pub fn counts(&self) -> &[u64; BUCKETS] {
        &self.counts
    }

    /// All observations.
    pub fn count(&self) -> u64 {
        self.counts.iter().sum()
    }

    /// Sum of all observations in nanoseconds.
    pub fn sum_ns(&self) -> u64 {
        self.sum_ns
    }

    /// The upper bound of the bucket holding quantile `q` (0..=1), in
    /// nanoseconds; 0 when empty.
    pub fn quantile_bound_ns(&self, q: f64) -> u64 {
        let total = self.count();
        if total == 0 {
            return 0;
        }
        let rank = ((q.clamp(0.0, 1.0) * total as f64).ceil() as u64).max(1);
        let mut seen = 0;
        for (i, &n) in self.counts.iter().enumerate() {
            seen += n;
            if seen >= rank {
                return bucket_bound_ns(i);
            }
        }
        bucket_bound_ns(BUCKETS - 1)
    }
}

/// A histogram recorded from many threads at once (request latency).
#[derive(Debug, Default)]
pub struct SharedHistogram {
    counts: [AtomicU64; BUCKETS],
    sum_ns: AtomicU64,
}

impl SharedHistogram {
    /// Counts one observation of `nanos`.
    pub fn record(&self, nanos: u64) {
        self.counts[bucket_of(nanos)].fetch_add(1, Ordering::Relaxed);
        self.sum_ns.fetch_add(nanos, Ordering::Relaxed);
    }

    /// A copy of the counts so far.
    pub fn snapshot(&self) -> Histogram {
        let mut out = Histogram::default();
        for (dst, src) in out.counts.iter_mut().zip(&self.counts) {
            *dst = src.load(Ordering::Relaxed);
        }
        out.sum_ns = self.sum_ns.load(Ordering::Relaxed);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn observations_land_in_the_first_bucket_that_bounds_them() {
        assert_eq!(bucket_of(0), 0);
        assert_eq!(bucket_of(250), 0);
        assert_eq!(bucket_of(251), 1);
        assert_eq!(bucket_of(500), 1);
        assert_eq!(bucket_of(501), 2);
        assert_eq!(bucket_of(u64::MAX), BUCKETS - 1);
        for nanos in [1, 999, 1_000, 77_777, 3_000_000, 900_000_000] {
            let i = bucket_of(nanos);
            assert!(nanos <= bucket_bound_ns(i), "{nanos} above bucket {i}");
            assert!(i == 0 || nanos > bucket_bound_ns(i - 1), "{nanos} fits bucket {}", i - 1);
        }
    }

    #[test]
    fn quantiles_merge_and_share() {
        let mut h = Histogram::default();
        for _ in 0..99 {
            h.record(200);
        }
        h.record(5_000_000);
        assert_eq!(h.quantile_bound_ns(0.5), 250);
        assert_eq!(h.quantile_bound_ns(0.99), 250);
        assert!(h.quantile_bound_ns(1.0) >= 5_000_000);
        let shared = SharedHistogram::default();
        shared.record(200);
        let mut merged = shared.snapshot();
        merged.merge(&h);
        assert_eq!(merged.count(), 101);
        assert_eq!(merged.sum_ns(), 99 * 200 + 5_000_000 + 200);
    }
}
