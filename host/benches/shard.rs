//! Hot paths of the shard with the LRU policy, native and as Wasm:
//! a read hit, and a write that must evict. The Wasm/native ratio of these
//! is the sandbox's per-request cost. A read hit is also measured with
//! hot-key tracking on, as nodes run it.
//!
//! `cargo bench -p cachet --bench shard`

use bytes::Bytes;
use cachet::core::{SetOptions, Shard, ShardConfig};
use cachet::policies::{self, PolicySpec};
use cachet::wasm::PolicyEngine;
use criterion::{BatchSize, Criterion, Throughput, criterion_group, criterion_main};
use std::hint::black_box;

const ENTRIES: u64 = 100_000;

fn full_shard(engine: &PolicyEngine, native: bool, track_hot_keys: bool) -> Shard {
    let spec = PolicySpec { name_or_path: "lru".into(), native, ..PolicySpec::default() };
    let factory = policies::resolve(engine, &spec).expect("lru");
    // Policy calls are timed as a node times them, so the per-request cost
    // measured here includes the two clock reads around each call.
    let stopwatch = Some(cachet::stopwatch::monotonic_ns as fn() -> u64);
    let config = ShardConfig { max_entries: ENTRIES, track_hot_keys, stopwatch, ..ShardConfig::default() };
    let mut shard = Shard::new(config, factory).expect("shard");
    for i in 0..ENTRIES {
        shard.set(0, &i.to_le_bytes(), Bytes::from_static(&[0; 100]), SetOptions::default()).expect("set");
    }
    shard
}

fn bench(c: &mut Criterion) {
    let engine = PolicyEngine::new().expect("engine");
    let mut group = c.benchmark_group("shard");
    group.throughput(Throughput::Elements(1));
    for native in [true, false] {
        let runtime = if native { "native" } else { "wasm" };
        let mut shard = full_shard(&engine, native, false);
        let mut i = 0u64;
        group.bench_function(format!("get_hit/lru/{runtime}"), |b| {
            b.iter(|| {
                i = (i + 7919) % ENTRIES;
                black_box(shard.get(1, &i.to_le_bytes()))
            })
        });
        let mut next = ENTRIES;
        group.bench_function(format!("set_evict/lru/{runtime}"), |b| {
            b.iter_batched(
                || {
                    next += 1;
                    next
                },
                |key| shard.set(1, &key.to_le_bytes(), Bytes::from_static(&[0; 100]), SetOptions::default()),
                BatchSize::SmallInput,
            )
        });
    }
    let mut tracked = full_shard(&engine, true, true);
    let mut i = 0u64;
    group.bench_function("get_hit/lru/native+hot-keys", |b| {
        b.iter(|| {
            i = (i + 7919) % ENTRIES;
            black_box(tracked.get(1, &i.to_le_bytes()))
        })
    });
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
