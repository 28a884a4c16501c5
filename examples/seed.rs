//! The seed example: a three-entry shard whose victims come from the bundled
//! LRU policy running as a sandboxed Wasm component.
//!
//! `cargo run -p cachet-examples --example seed`

use anyhow::Result;
use bytes::Bytes;
use cachet::core::{SetOptions, Shard, ShardConfig};
use cachet::policies::{self, PolicySpec};
use cachet::wasm::PolicyEngine;

fn main() -> Result<()> {
    let engine = PolicyEngine::new()?;
    let spec = PolicySpec { name_or_path: "lru".into(), ..PolicySpec::default() };
    let policy = policies::resolve(&engine, &spec)?;
    let mut shard = Shard::new(ShardConfig { max_entries: 3, ..ShardConfig::default() }, policy)?;

    let mut now = 0;
    for user in ["user:1", "user:2", "user:3"] {
        shard.set(now, user.as_bytes(), Bytes::from(format!("profile of {user}")), SetOptions::default())?;
        now += 1;
    }
    let hit = shard.get(now, b"user:1");
    println!("get user:1 -> {:?}", hit.as_deref().map(String::from_utf8_lossy));
    shard.set(now, b"user:4", Bytes::from_static(b"profile of user:4"), SetOptions::default())?;
    for user in ["user:1", "user:2", "user:3", "user:4"] {
        let state = if shard.contains(now, user.as_bytes()) { "resident" } else { "evicted" };
        println!("{user}: {state}");
    }
    let miss = shard.get(now, b"user:2");
    let stats = shard.stats();
    println!(
        "get user:2 -> {:?}; hits {} misses {} hit ratio {:.2}; evictions {}; policy {} ({} faults)",
        miss,
        stats.hits,
        stats.misses,
        stats.hit_ratio(),
        stats.evictions,
        shard.active_policy().name,
        stats.policy_faults()
    );
    Ok(())
}
