//! The sans-IO heart of a node: the shard, its TTL index and the policy
//! contract. Nothing here reads a clock, touches a socket or knows about
//! Wasm; callers pass `now` in milliseconds.

pub mod histogram;
pub mod hotkeys;
pub mod policy;
pub mod shard;
pub mod ttl;

pub use histogram::{Histogram, SharedHistogram};
pub use policy::{EvictionPolicy, FaultKind, NativeFactory, PolicyError, PolicyFactory, PolicyFault};
pub use shard::{
    EntryView, Hook, PolicyMode, ScanVisitor, SetOptions, SetOutcome, Shard, ShardConfig, ShardError, ShardStats,
    SwapSnapshot, replay_snapshot,
};
