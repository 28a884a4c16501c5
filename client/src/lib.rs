//! Cachet client SDK.
//!
//! The QUIC client (connection multiplexing, typed errors, ring-aware
//! routing) arrives with the network node; until then this crate only
//! re-exports the shared key hash so applications can pre-compute placement.

#![warn(missing_docs)]

pub use cachet_proto::key_hash;
