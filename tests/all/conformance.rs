//! The policy conformance suite: every bundled policy, native and as Wasm,
//! driven through a real shard by a seeded mixed workload, with the shard's
//! contract checked after every operation.

use bytes::Bytes;
use cachet::core::{SetOptions, Shard, ShardConfig};
use cachet::policies::{self, PolicySpec};
use cachet::wasm::PolicyEngine;
use cachet_policy_sdk::rng::SplitMix64;
use std::collections::{HashMap, HashSet};

fn shard(engine: &PolicyEngine, name: &str, native: bool, config: ShardConfig) -> Shard {
    let spec = PolicySpec { name_or_path: name.into(), native, ..PolicySpec::default() };
    let factory = policies::resolve(engine, &spec).expect("policy resolves");
    assert_eq!(factory.is_native(), native);
    Shard::new(config, factory).expect("shard")
}

/// Checks what must hold after any operation.
fn check_invariants(shard: &mut Shard, now: u64, what: &str) {
    let config = shard.config().clone();
    assert!(shard.len() as u64 <= config.max_entries, "{what}: entry bound exceeded");
    assert!(shard.bytes() <= config.max_bytes, "{what}: byte budget exceeded");
    let order = shard.export_order(now);
    assert_eq!(order.len(), shard.len(), "{what}: export order must list every entry");
    let unique: HashSet<_> = order.iter().collect();
    assert_eq!(unique.len(), order.len(), "{what}: export order repeats an entry");
    assert!(order.iter().all(|&id| shard.key_of(id).is_some()), "{what}: export order names a stale id");
    assert_eq!(shard.stats().policy_faults(), 0, "{what}: policy faulted");
}

fn run_workload(engine: &PolicyEngine, name: &str, native: bool, config: ShardConfig, seed: u64) {
    let what = format!("{name} ({})", if native { "native" } else { "wasm" });
    let mut shard = shard(engine, name, native, config);
    let mut rng = SplitMix64::new(seed);
    // What each key must read as, if it is resident: the last value written,
    // with its expiry. Eviction may drop keys; it must never change them.
    let mut model: HashMap<Vec<u8>, (Bytes, Option<u64>)> = HashMap::new();
    let mut now = 0u64;
    for step in 0..3_000u64 {
        now += rng.below(3);
        let key = format!("key:{}", rng.below(300)).into_bytes();
        match rng.below(10) {
            0..=3 => {
                let value = Bytes::from(vec![step as u8; rng.below(48) as usize]);
                let ttl_ms = (rng.below(4) == 0).then(|| 1 + rng.below(50));
                let hint = rng.below(4) as u32;
                shard.set(now, &key, value.clone(), SetOptions { ttl_ms, hint, keep_ttl: false }).expect("set");
                model.insert(key, (value, ttl_ms.map(|t| now + t)));
            }
            4..=7 => {
                if let Some(got) = shard.get(now, &key) {
                    let (want, expires) = model.get(&key).expect("a hit on a key never written");
                    assert_eq!(&got, want, "{what}: wrong value for a key");
                    assert!(expires.is_none_or(|at| at > now), "{what}: an expired entry was served");
                }
            }
            8 => {
                if shard.delete(now, &key) {
                    assert!(model.remove(&key).is_some());
                }
                assert!(shard.get(now, &key).is_none(), "{what}: deleted key still served");
            }
            _ => {
                shard.tick(now);
            }
        }
        if step % 97 == 0 {
            check_invariants(&mut shard, now, &what);
        }
    }
    check_invariants(&mut shard, now, &what);
    let stats = shard.stats();
    assert!(stats.evictions > 0, "{what}: the workload must exercise eviction");
    assert!(stats.hits > 0 && stats.expired > 0, "{what}: the workload must hit and expire");
}

#[test]
fn every_policy_keeps_the_shard_contract_by_entries() {
    let engine = PolicyEngine::new().expect("engine");
    for name in policies::bundled_names() {
        for native in [true, false] {
            let config = ShardConfig { max_entries: 64, ..ShardConfig::default() };
            run_workload(&engine, name, native, config, 7);
        }
    }
}

#[test]
fn every_policy_keeps_the_shard_contract_by_bytes() {
    let engine = PolicyEngine::new().expect("engine");
    for name in policies::bundled_names() {
        for native in [true, false] {
            let config = ShardConfig { max_bytes: 2_000, max_value_size: 64, ..ShardConfig::default() };
            run_workload(&engine, name, native, config, 11);
        }
    }
}

/// A node's default shard (a million entries, 256 MiB) must fit every
/// policy's up-front sizing within the sandbox's memory cap and its creation
/// budget; a policy that cannot start would leave the node unable to serve.
#[test]
fn every_policy_starts_in_a_full_size_shard() {
    let engine = PolicyEngine::new().expect("engine");
    let capacity = cachet_policy_sdk::Capacity { max_entries: 1_000_000, max_bytes: 256 << 20 };
    for name in policies::bundled_names() {
        let spec = PolicySpec { name_or_path: name.into(), ..PolicySpec::default() };
        let factory = policies::resolve(&engine, &spec).expect("policy resolves");
        if let Err(err) = factory.create(capacity, 0) {
            panic!("{name} cannot start in a full-size shard: {err}");
        }
    }
}

/// Every policy through a large shard's first evictions and beyond, as
/// Wasm: a policy whose structures grow inside a call (W-TinyLFU's doomed
/// list once did, on its first contest) runs out of its per-call budget
/// only at sizes like these, never in the small workloads above.
#[test]
fn every_policy_evicts_in_a_large_shard_without_faults() {
    const CAPACITY: u64 = 200_000;
    let engine = PolicyEngine::new().expect("engine");
    for name in policies::bundled_names() {
        let config = ShardConfig { max_entries: CAPACITY, max_bytes: 1 << 30, ..ShardConfig::default() };
        let mut shard = shard(&engine, name, false, config);
        let value = Bytes::from_static(b"v");
        let mut rng = SplitMix64::new(5);
        for i in 0..CAPACITY + 50_000 {
            // New keys, with every fourth request a read of an older one
            // so policies that count hits have some.
            let now = i / 100;
            if i % 4 == 0 {
                let _ = shard.get(now, format!("k{}", rng.next_u64() % (i + 1)).as_bytes());
            }
            shard.set(now, format!("k{i}").as_bytes(), value.clone(), SetOptions::default()).expect("set");
        }
        // Full, or nearly: W-TinyLFU's contest may leave room its window
        // grows into.
        let len = shard.len() as u64;
        assert!(len <= CAPACITY && len + 1_000 > CAPACITY, "{name}: {len} resident");
        assert_eq!(shard.stats().policy_faults(), 0, "{name}: policy faulted: {:?}", shard.stats().faults);
    }
}
