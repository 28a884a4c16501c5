//! The cluster's sans-IO core: replication state machines that take
//! messages, client operations and the time as inputs and produce messages,
//! replies and deadlines as outputs. No sockets, no clock, no threads, so a
//! seeded simulator ([`sim`]) runs hundreds of fault schedules (loss,
//! delay, duplication, partitions, crashes that wipe memory) per test run
//! and checks named invariants after every step.
//!
//! - [`version`]: per-key versions (Lamport counter plus node id), which
//!   order writes without wall clocks.
//! - [`membership`]: SWIM membership and failure detection (the `foca`
//!   crate), sans-IO.
//! - [`transport`]: the node-to-node QUIC transport (ALPN `cachet-peer/1`,
//!   mutual TLS) that carries both.
//! - [`replica`]: one node's replica and coordinator: quorum writes and
//!   reads with tunable consistency, read repair, hinted hand-off, and the
//!   re-sync that keeps a node restarted empty out of every quorum until it
//!   has its ranges back.
//!
//! - [`runtime`]: the thin shell that runs them in `cachet serve
//!   --cluster`: membership events into the replica, frames through the
//!   transport, client operations in and replies out.
//!
//! - [`meta`]: the cluster's metadata (members, slot placement, policy
//!   registry, settings) on a Raft log (raft-rs), with its own seeded
//!   simulator. Built and tested; not yet wired into the runtime.
//! - [`policy`]: what the runtime needs from the node to apply the log's
//!   policy entries on every member.
//! - [`records`]: a node's replicated records live in its bounded shards.
//! - [`update`]: read-modify-write commands as pure functions, which the
//!   replica runs serialized at each key's primary owner.
//!
//! Not here yet (issue 6): members joining or leaving a running cluster
//! (the ring is static) and range streaming.

pub mod loaders;
pub mod membership;
pub mod meta;
pub mod policy;
pub mod records;
pub mod replica;
pub mod runtime;
#[cfg(test)]
mod sim;
pub mod transport;
pub mod update;
pub mod version;
