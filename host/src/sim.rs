//! `cachet sim`: replays a trace through the real [`Shard`] and policy, the
//! same code a node runs, with no network and no special simulation path.
//!
//! Each request reads its key; a miss writes it back (evicting as needed),
//! the way a look-aside cache is filled. Counting is per request, including
//! cold misses, as in the reference tables.

use crate::core::{PolicyError, SetOptions, Shard, ShardConfig};
use crate::policies::{self, PolicySpec};
use crate::trace::{Request, TraceError, TraceReader};
use crate::wasm::PolicyEngine;
use bytes::Bytes;
use serde::Serialize;
use std::path::PathBuf;
use std::time::Instant;

/// What to replay, through which policy, at which size.
#[derive(Clone, Debug)]
pub struct SimOptions {
    /// The trace file.
    pub trace: PathBuf,
    /// The policy to run.
    pub policy: PolicySpec,
    /// Capacity in objects (every object counts 1).
    pub capacity: Option<u64>,
    /// Capacity in bytes (objects count their trace size).
    pub capacity_bytes: Option<u64>,
    /// Seed for the policy.
    pub seed: u64,
}

/// The outcome of one replay.
#[derive(Clone, Debug, Serialize)]
pub struct SimReport {
    /// The policy's name.
    pub policy: String,
    /// Its version.
    pub policy_version: String,
    /// `native` or `wasm`.
    pub runtime: &'static str,
    /// Capacity in objects (`null` when unbounded).
    pub capacity: Option<u64>,
    /// Capacity in bytes (`null` when unbounded).
    pub capacity_bytes: Option<u64>,
    /// Requests replayed.
    pub requests: u64,
    /// Requests that hit.
    pub hits: u64,
    /// Requests that missed.
    pub misses: u64,
    /// misses / requests.
    pub miss_ratio: f64,
    /// Entries evicted.
    pub evictions: u64,
    /// Objects larger than the whole cache (never stored).
    pub too_large: u64,
    /// Replay rate, excluding reading and decompressing the trace.
    pub requests_per_sec: f64,
    /// Seconds spent replaying.
    pub replay_secs: f64,
    /// Policy faults of every kind.
    pub policy_faults: u64,
    /// Switches to the native fallback.
    pub fallbacks: u64,
}

/// A simulation that could not run.
#[derive(Debug, thiserror::Error)]
pub enum SimError {
    /// The trace is unreadable or malformed.
    #[error(transparent)]
    Trace(#[from] TraceError),
    /// The policy cannot be loaded or started.
    #[error(transparent)]
    Policy(#[from] PolicyError),
    /// Neither capacity was given.
    #[error("give --capacity N (objects) or --capacity-bytes N")]
    NoCapacity,
}

/// A zeroed region that values are sliced from, so byte-sized replays
/// allocate nothing per miss.
static ZEROS: [u8; 1 << 20] = [0; 1 << 20];

/// Reads the whole trace first so the replay rate measures the cache, not
/// the decompressor. `progress` is called with (requests read so far).
pub fn load_trace(path: &std::path::Path, mut progress: impl FnMut(u64)) -> Result<Vec<Request>, TraceError> {
    let mut requests = Vec::new();
    for request in TraceReader::open(path)? {
        requests.push(request?);
        if requests.len() % (1 << 16) == 0 {
            progress(requests.len() as u64);
        }
    }
    Ok(requests)
}

/// Replays `requests` through a fresh shard running `options.policy`.
/// `progress` is called with the number of requests replayed so far.
pub fn replay(
    engine: &PolicyEngine,
    options: &SimOptions,
    requests: &[Request],
    mut progress: impl FnMut(u64),
) -> Result<SimReport, SimError> {
    if options.capacity.is_none() && options.capacity_bytes.is_none() {
        return Err(SimError::NoCapacity);
    }
    let factory = policies::resolve(engine, &options.policy)?;
    let config = ShardConfig {
        max_entries: options.capacity.unwrap_or(u64::MAX),
        max_bytes: options.capacity_bytes.unwrap_or(u64::MAX),
        max_value_size: ZEROS.len(),
        seed: options.seed,
        ..ShardConfig::default()
    };
    let by_bytes = options.capacity_bytes.is_some();
    let mut shard = Shard::new(config, factory.clone())?;
    let mut too_large = 0u64;
    let started = Instant::now();
    for (i, request) in requests.iter().enumerate() {
        let now = request.timestamp;
        let key = request.key.to_le_bytes();
        if shard.get(now, &key).is_none() {
            // Entry size = key + value; make it the trace's object size.
            let len = if by_bytes { (request.size as usize).saturating_sub(key.len()) } else { 0 };
            let value = Bytes::from_static(&ZEROS[..len.min(ZEROS.len())]);
            if shard.set(now, &key, value, SetOptions::default()).is_err() {
                too_large += 1;
            }
        }
        if i % 1024 == 1023 {
            shard.tick(now);
            if i % (1 << 16) == (1 << 16) - 1 {
                progress(i as u64 + 1);
            }
        }
    }
    let secs = started.elapsed().as_secs_f64();
    let stats = shard.stats();
    let total = requests.len() as u64;
    Ok(SimReport {
        policy: factory.info().name.clone(),
        policy_version: factory.info().version.clone(),
        runtime: if factory.is_native() { "native" } else { "wasm" },
        capacity: options.capacity,
        capacity_bytes: options.capacity_bytes,
        requests: total,
        hits: stats.hits,
        misses: stats.misses,
        miss_ratio: if total == 0 { 0.0 } else { stats.misses as f64 / total as f64 },
        evictions: stats.evictions,
        too_large,
        requests_per_sec: if secs > 0.0 { total as f64 / secs } else { 0.0 },
        replay_secs: secs,
        policy_faults: stats.policy_faults(),
        fallbacks: stats.fallbacks,
    })
}

/// The standard sweep: these fractions of the trace's distinct keys, as in
/// libCacheSim and the reference tables.
pub const SWEEP_FRACTIONS: [f64; 8] = [0.001, 0.003, 0.01, 0.03, 0.1, 0.2, 0.4, 0.8];

/// Distinct keys in `requests`.
pub fn distinct_keys(requests: &[Request]) -> u64 {
    let mut seen = std::collections::HashSet::with_capacity(requests.len() / 4);
    for r in requests {
        seen.insert(r.key);
    }
    seen.len() as u64
}

/// `(fraction, objects)` of the sweep for a trace of `distinct` keys:
/// `floor(f * distinct)`, skipping sizes of 4 objects or fewer.
pub fn sweep_sizes(distinct: u64) -> Vec<(f64, u64)> {
    SWEEP_FRACTIONS.iter().map(|&f| (f, (f * distinct as f64).floor() as u64)).filter(|&(_, size)| size > 4).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sweep_sizes_follow_the_reference_tables() {
        // cloudPhysicsIO has 48,974 distinct keys: the table's columns.
        let sizes: Vec<u64> = sweep_sizes(48_974).into_iter().map(|(_, s)| s).collect();
        assert_eq!(sizes, [48, 146, 489, 1_469, 4_897, 9_794, 19_589, 39_179]);
        // Tiny traces lose the sizes of 4 objects or fewer.
        assert_eq!(sweep_sizes(2_000).len(), 7, "0.1% of 2,000 is 2 objects");
    }
}
