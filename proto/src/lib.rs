//! Types shared by Cachet nodes and clients, with no I/O: the key hash and
//! the `cachet/1` wire protocol (requests, replies, frame codec). Everything
//! that decides *where* a key lives or *how* a policy sees it hashes keys
//! here, so every process agrees.

#![warn(missing_docs)]

pub mod edit;
pub mod frame;
pub mod message;
pub mod ring;
pub mod slot;

pub use edit::{Edit, EditAnswer, EditError, Edited};
pub use frame::{
    Decoded, Envelope, FrameError, MAX_DEPTH, MAX_REPLY_LEN, decode, encode, encode_at, from_slice_shallow,
};
pub use message::{
    ALPN, AdminCommand, ClusterStats, Condition, Consistency, ErrorCode, ErrorReply, ExpireIf, HotKey, MetaMemberStats,
    MetaStats, ModuleListing, NodeStats, PROTOCOL_VERSION, PolicyListing, Request, Response, SentModule, ShadowListing,
    ShardListing, TtlChange, TtlState,
};
pub use ring::{Member, Ring, RingError, hash_tag};
pub use slot::{SLOTS, SlotError, SlotMove, SlotRange, SlotTable, key_slot};

/// The stable 64-bit hash of a key (XXH3), the same in every process and on
/// every platform. Policies see it in place of the key bytes.
pub fn key_hash(key: &[u8]) -> u64 {
    xxhash_rust::xxh3::xxh3_64(key)
}

#[cfg(test)]
mod tests {
    #[test]
    fn key_hash_is_stable_across_builds() {
        // Fixed expectations: a change here would move every key in a cluster.
        assert_eq!(super::key_hash(b""), 0x2d06_8005_38d3_94c2);
        assert_ne!(super::key_hash(b"user:1"), super::key_hash(b"user:2"));
    }
}
