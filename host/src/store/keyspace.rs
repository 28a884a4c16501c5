//! Commands over several keys at once or the whole keyspace: MSETNX,
//! RENAME, RENAMENX and COPY (run with every shard they touch held, so
//! they apply whole: `store::execute` sends them through
//! `store::transaction`), and KEYS, SCAN and RANDOMKEY (walks of the
//! shards' slabs, one shard locked at a time).

use super::shards::{Shards, shard_error};
use crate::core::SetOptions;
use bytes::Bytes;
use cachet_proto::{ErrorCode, ErrorReply, Response};
use std::sync::atomic::{AtomicU64, Ordering};

/// SCAN looks at about this many entries when the client names no COUNT.
pub const SCAN_COUNT: u32 = 10;

/// A SCAN step looks at no more than this many entries, whatever COUNT
/// says: one step's work and reply stay bounded.
pub const MAX_SCAN_COUNT: u32 = 100_000;

fn error(code: ErrorCode, message: impl Into<String>) -> Response {
    Response::Error(ErrorReply::new(code, message))
}

/// MSETNX: every pair, or none if any key exists.
pub(super) fn mset_nx(shards: &mut impl Shards, now: u64, pairs: Vec<(Bytes, Bytes)>) -> Response {
    if pairs.iter().any(|(key, _)| shards.with(key, |s| s.contains(now, key))) {
        return Response::Applied(false);
    }
    for (key, value) in pairs {
        if let Err(err) = shards.write(&key, |s| s.set(now, &key, value, SetOptions::default())) {
            return shard_error(&err);
        }
    }
    Response::Applied(true)
}

/// RENAME and RENAMENX (`only_if_absent`), COPY (`keep` the source,
/// overwriting the destination only with `replace`): the value and its
/// TTL go to `to`.
pub(super) fn move_value(
    shards: &mut impl Shards,
    now: u64,
    (from, to): (&[u8], &[u8]),
    keep: bool,
    replace: bool,
) -> Response {
    let source = shards.with(from, |s| s.peek(now, from).map(|v| (v, s.ttl(now, from).flatten())));
    let Some((value, ttl_ms)) = source else {
        return if keep { Response::Applied(false) } else { error(ErrorCode::NotFound, "no such key") };
    };
    if from == to {
        return match (keep, replace) {
            (true, _) => error(ErrorCode::InvalidArgument, "source and destination objects are the same"),
            (false, true) => Response::Ok,
            (false, false) => Response::Applied(false),
        };
    }
    if !replace && shards.with(to, |s| s.contains(now, to)) {
        return Response::Applied(false);
    }
    let options = SetOptions { ttl_ms, ..SetOptions::default() };
    if let Err(err) = shards.write(to, |s| s.set(now, to, value, options)) {
        return shard_error(&err);
    }
    if !keep {
        shards.write(from, |s| s.delete(now, from));
    }
    if keep || !replace { Response::Applied(true) } else { Response::Ok }
}

/// KEYS: every live key matching `pattern`, refused once the reply would
/// be over the reply limit.
pub(super) fn keys(shards: &mut impl Shards, pattern: &[u8]) -> Response {
    let limit = cachet_proto::MAX_REPLY_LEN - (64 << 10);
    let over = std::cell::Cell::new(false);
    let (mut found, mut total) = (Vec::new(), 0usize);
    let mut visit = |key: &[u8], _: &[u8], _: u32| {
        if crate::glob::glob_match(pattern, key) {
            total += key.len() + 16;
            if total > limit {
                over.set(true);
                return false;
            }
            found.push(Some(Bytes::copy_from_slice(key)));
        }
        true
    };
    let mut cursor = 0;
    while let Some(next) = shards.scan(cursor, usize::MAX, &mut visit) {
        if over.get() {
            break;
        }
        cursor = next;
    }
    if over.get() {
        return error(
            ErrorCode::TooLarge,
            format!("KEYS {} would reply over {limit} bytes; use SCAN", String::from_utf8_lossy(pattern)),
        );
    }
    Response::Values(found)
}

/// SCAN: the keys among about `count` entries from `cursor` on that match
/// `pattern`, and where to go on from. The cursor names a shard and a
/// slot of its slab; entries never move between slots, so a key present
/// from the first step to the last is returned (once, unless it is
/// deleted and set again meanwhile).
pub(super) fn scan(shards: &mut impl Shards, cursor: u64, pattern: Option<&[u8]>, count: u32) -> Response {
    let count = count.clamp(1, MAX_SCAN_COUNT) as usize;
    let mut keys = Vec::new();
    let mut visit = |key: &[u8], _: &[u8], _: u32| {
        if pattern.is_none_or(|p| crate::glob::glob_match(p, key)) {
            keys.push(Bytes::copy_from_slice(key));
        }
        true
    };
    let next = shards.scan(cursor, count, &mut visit);
    // 0 is both the start and the end, as in Redis: a cursor that would
    // be 0 mid-scan (shard 0, slot 0) cannot come back from a step.
    Response::Scan { cursor: next.unwrap_or(0), keys }
}

/// RANDOMKEY: the first live key from a random place, going round once.
pub(super) fn random_key(shards: &mut impl Shards, shard_count: usize) -> Response {
    static DRAWS: AtomicU64 = AtomicU64::new(0x9e37_79b9_7f4a_7c15);
    let draw = DRAWS.fetch_add(0x9e37_79b9_7f4a_7c15, Ordering::Relaxed);
    let mixed = cachet_proto::key_hash(&draw.to_le_bytes());
    let shard = mixed % shard_count.max(1) as u64;
    let slots = shards.slots(shard as usize).max(1) as u64;
    let start = (shard << 32) | ((mixed >> 32) % slots);
    let found = std::cell::RefCell::new(None);
    let mut take = |key: &[u8], _: &[u8], _: u32| {
        *found.borrow_mut() = Some(Bytes::copy_from_slice(key));
        false
    };
    // From the random place to the end, then from the start up to it.
    for (mut cursor, stop) in [(start, u64::MAX), (0, start)] {
        while found.borrow().is_none() && cursor < stop {
            match shards.scan(cursor, usize::MAX, &mut take) {
                Some(next) => cursor = next,
                None => break,
            }
        }
    }
    let found = found.into_inner();
    Response::Value(found)
}
