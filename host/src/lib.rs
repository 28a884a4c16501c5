//! Cachet: a cache node whose eviction behaviour is a sandboxed WebAssembly
//! component.
//!
//! # Layout
//! - [`core`]: sans-IO shard, TTL index and the policy contract (time is an
//!   argument; nothing here reads a clock or touches a socket).
//! - [`wasm`]: the wasmtime engine, module validation, sandboxed instances.
//! - [`policies`]: bundled policies by name, native twins, modules on disk.
//! - [`trace`]: streaming reader of request traces.
//! - [`sim`]: trace replay through the real shard (`cachet sim`).
//! - [`cluster`]: the sans-IO replication core and its fault simulator.
//! - [`store`]: a node's shards, clock and limits; the data commands.
//! - [`node`]: the node and its one request path (the dispatcher), no
//!   network.
//! - [`reply`]: a reply now or later, as the request path hands it back.
//! - [`server`]: the QUIC shell (thread per core) and TLS.
//! - [`registry`]: policy modules by name, version and hash, on disk.
//! - [`admin`]: live policy operations (hot-swap, rollback, quarantine).
//! - [`shadow`]: predicting a candidate's hit ratio on sampled traffic.
//! - [`metrics`]: Prometheus text exposition and its HTTP endpoint.
//! - [`resp`]: the Redis-protocol port (RESP2/RESP3 over TCP).
//! - [`clients`]: what every client connection is held to (caps, cut-offs).
//! - [`loader`]: read-through loaders (`cachet:hooks`) with herd protection.
//! - [`warm`]: rate-limited cache warming from a key list.
//! - [`stopwatch`]: the monotonic clock policy calls are timed with (the
//!   core takes it as [`core::ShardConfig::stopwatch`]).
//! - `fuzz`: the fuzz targets' entry points (`fuzz/`, `cargo xtask fuzz`).

#![warn(missing_docs)]

pub mod admin;
pub mod bench;
pub mod clients;
pub mod cluster;
pub mod config;
pub mod core;
#[doc(hidden)]
pub mod fuzz;
pub mod glob;
pub mod loader;
pub mod metrics;
pub mod node;
pub mod plot;
pub mod policies;
pub mod registry;
pub mod reply;
pub mod resp;
pub mod server;
pub mod shadow;
pub mod sim;
pub mod stopwatch;
pub mod store;
pub mod trace;
pub mod warm;
pub mod wasm;
