//! The seed example, through the bundled Wasm LRU.

use bytes::Bytes;
use cachet::core::{SetOptions, Shard, ShardConfig};
use cachet::policies::{self, PolicySpec};
use cachet::wasm::PolicyEngine;

#[test]
fn wasm_lru_evicts_the_least_recently_used_user() {
    let engine = PolicyEngine::new().expect("engine");
    let spec = PolicySpec { name_or_path: "lru".into(), ..PolicySpec::default() };
    let factory = policies::resolve(&engine, &spec).expect("bundled lru");
    assert!(!factory.is_native());
    let config = ShardConfig { max_entries: 3, ..ShardConfig::default() };
    let mut shard = Shard::new(config, factory).expect("shard");
    for user in ["user:1", "user:2", "user:3"] {
        shard.set(0, user.as_bytes(), Bytes::from(format!("{user}'s profile")), SetOptions::default()).expect("set");
    }
    assert_eq!(shard.get(1, b"user:1").as_deref(), Some(&b"user:1's profile"[..]));
    shard.set(2, b"user:4", Bytes::from_static(b"new"), SetOptions::default()).expect("set");
    assert!(shard.get(3, b"user:2").is_none(), "user:2 was least recently used");
    for user in ["user:1", "user:3", "user:4"] {
        assert!(shard.contains(3, user.as_bytes()), "{user} stays");
    }
    let stats = shard.stats();
    assert_eq!((stats.hits, stats.misses, stats.evictions), (1, 1, 1));
    assert_eq!(stats.hit_ratio(), 0.5);
    assert_eq!(stats.policy_faults(), 0);
}
