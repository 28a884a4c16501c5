//! Where a data command finds its keys' shards: [`Shards`], locked for
//! each use on the ordinary path ([`Locking`]) or held for a whole
//! transaction (`store::transaction`).

use super::{Store, lock};
use crate::core::{Shard, ShardError};
use cachet_proto::{ErrorCode, ErrorReply, Response};

/// The error reply of a write a shard refused.
pub fn shard_error(err: &ShardError) -> Response {
    Response::Error(ErrorReply::new(ErrorCode::TooLarge, err.to_string()))
}

/// Where a command finds its keys' shards.
pub(super) trait Shards {
    /// Runs `f` on `key`'s shard.
    fn with<R>(&mut self, key: &[u8], f: impl FnOnce(&mut Shard) -> R) -> R;
    /// Runs `f` on `key`'s shard to change the key: its watch stamp moves
    /// under the same lock, so a transaction watching it sees the change.
    fn write<R>(&mut self, key: &[u8], f: impl FnOnce(&mut Shard) -> R) -> R;
    /// Entries over every shard (DBSIZE).
    fn count(&mut self) -> u64;
    /// Empties every shard (FLUSHALL); how many entries there were.
    fn clear(&mut self) -> u64;
    /// The largest value the store takes.
    fn max_value_len(&self) -> usize;
    /// [`Store::scan_from`]: entries from `cursor` on, one shard locked at
    /// a time; where to go on from.
    fn scan(&mut self, cursor: u64, max_visits: usize, f: &mut crate::core::ScanVisitor<'_>) -> Option<u64>;
    /// Shards in the store.
    fn shard_count(&self) -> usize;
    /// Slab slots of shard `shard` (where a scan of it ends).
    fn slots(&mut self, shard: usize) -> usize;
}

/// The ordinary path: each use locks the key's shard.
pub(super) struct Locking<'a>(pub(super) &'a Store);

impl Shards for Locking<'_> {
    fn with<R>(&mut self, key: &[u8], f: impl FnOnce(&mut Shard) -> R) -> R {
        f(&mut self.0.shard(key))
    }

    fn write<R>(&mut self, key: &[u8], f: impl FnOnce(&mut Shard) -> R) -> R {
        // One hash for the shard and the stamp: this is every write's path.
        let hash = cachet_proto::key_hash(key);
        let mut shard = lock(&self.0.shards[self.0.shard_of(hash)]);
        let result = f(&mut shard);
        self.0.stamp_of(hash).fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        result
    }

    fn count(&mut self) -> u64 {
        self.0.len()
    }

    fn clear(&mut self) -> u64 {
        self.0.clear()
    }

    fn max_value_len(&self) -> usize {
        self.0.config.max_value_size
    }

    fn scan(&mut self, cursor: u64, max_visits: usize, f: &mut crate::core::ScanVisitor<'_>) -> Option<u64> {
        self.0.scan_from(cursor, max_visits, f)
    }

    fn shard_count(&self) -> usize {
        self.0.shards.len()
    }

    fn slots(&mut self, shard: usize) -> usize {
        self.0.shards.get(shard).map_or(0, |s| lock(s).slot_count())
    }
}
