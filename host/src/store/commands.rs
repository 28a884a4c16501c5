//! The data commands of `cachet/1` run on a node's own shards: what a
//! single node answers, and what a cluster member's dispatcher runs when
//! a request stays local. Each command locks the key's shard once, so
//! read-modify-write commands (INCR, APPEND, SET ... GET, GETDEL, GETEX)
//! are atomic on the node. Requests arrive validated by the dispatcher
//! (TTLs at least 1 ms, multi-key writes checked for size before any is
//! applied); a shard still refuses what does not fit, as an error reply.
//!
//! The commands find their keys' shards through `store::shards::Shards`:
//! locked for each use on the ordinary path, or held for a whole MULTI/EXEC
//! transaction (`store::transaction`), which runs the same code;
//! `store::execute` picks the path.

use super::Store;
pub use super::shards::shard_error;
use super::shards::{Locking, Shards};
use crate::core::{SetOptions, SetOutcome, Shard};
use bytes::{Bytes, BytesMut};
use cachet_proto::{Condition, EditAnswer, ErrorCode, ErrorReply, Request, Response, TtlChange, TtlState};

/// The error reply of an edit that does not apply.
pub fn edit_error(err: &cachet_proto::EditError) -> Response {
    let code = match err {
        cachet_proto::EditError::OverLimit { .. } | cachet_proto::EditError::TooLong => ErrorCode::TooLarge,
        _ => ErrorCode::InvalidArgument,
    };
    Response::Error(ErrorReply::new(code, err.to_string()))
}

/// What [`Store::execute`] answers for requests that are not data commands
/// (PING, STATS, admin): the dispatcher answers those itself.
fn not_data(request: &Request) -> Response {
    Response::Error(ErrorReply::new(ErrorCode::Internal, format!("{} is not a data command", request.name())))
}

impl Store {
    /// A GET whose value `f` sees under the shard's lock instead of a
    /// clone: the RESP port copies it straight into its reply.
    pub fn get_with<R>(&self, now: u64, key: &[u8], f: impl FnOnce(Option<&[u8]>) -> R) -> R {
        self.shard(key).get_with(now, key, f)
    }

    /// A SET of slices, which the shard copies.
    pub fn set_slice(
        &self,
        now: u64,
        key: &[u8],
        value: &[u8],
        ttl_ms: Option<u64>,
        condition: Condition,
        hint: u32,
    ) -> Response {
        set_slice(&mut Locking(self), now, key, value, ttl_ms, condition, hint)
    }
}

/// Runs a data command at `now` on `shards`.
pub(super) fn execute_on(shards: &mut impl Shards, now: u64, request: Request) -> Response {
    match request {
        Request::Get { key } => Response::Value(shards.with(&key, |s| s.get(now, &key))),
        Request::Set { key, value, ttl_ms, condition, hint } => {
            set_slice(shards, now, &key, &value, ttl_ms, condition, hint)
        }
        Request::SetWith { key, value, ttl_ms, keep_ttl, condition, get, hint } => {
            set_with(shards, now, &key, value, ttl_ms, keep_ttl, condition, get, hint)
        }
        Request::Del { keys } => {
            Response::Count(keys.iter().filter(|key| shards.write(key, |s| s.delete(now, key))).count() as u64)
        }
        Request::Exists { keys } => {
            Response::Count(keys.iter().filter(|key| shards.with(key, |s| s.contains(now, key))).count() as u64)
        }
        Request::Ttl { key } => Response::Ttl(match shards.with(&key, |s| s.ttl(now, &key)) {
            None => TtlState::Missing,
            Some(None) => TtlState::Persistent,
            Some(Some(ms)) => TtlState::Remaining(ms),
        }),
        // The condition and the change under one shard lock.
        Request::Expire { key, ttl_ms, when } => Response::Applied(shards.write(&key, |shard| {
            let applies = shard.ttl(now, &key).is_some_and(|current| when.allows(current, ttl_ms));
            applies && if ttl_ms == 0 { shard.delete(now, &key) } else { shard.expire(now, &key, ttl_ms) }
        })),
        Request::Persist { key } => Response::Applied(shards.write(&key, |s| s.persist(now, &key))),
        Request::MGet { keys } => mget(shards, now, &keys),
        Request::MSet { pairs } => {
            for (key, value) in pairs {
                if let Err(err) = shards.write(&key, |s| s.set(now, &key, value, SetOptions::default())) {
                    return shard_error(&err);
                }
            }
            Response::Ok
        }
        Request::Incr { key, delta } => incr(shards, now, &key, delta),
        Request::Append { key, value } => append(shards, now, &key, &value),
        Request::Strlen { key } => Response::Integer(shards.with(&key, |s| s.value_len(now, &key)).unwrap_or(0) as i64),
        Request::GetDel { key } => Response::Value(shards.write(&key, |shard| {
            let value = shard.get(now, &key);
            if value.is_some() {
                shard.delete(now, &key);
            }
            value
        })),
        Request::GetEx { key, ttl } => {
            let change = |shard: &mut Shard| {
                let value = shard.get(now, &key);
                if value.is_some() {
                    match ttl {
                        TtlChange::Keep => {}
                        TtlChange::Persist => {
                            shard.persist(now, &key);
                        }
                        TtlChange::Set(ms) => {
                            shard.expire(now, &key, ms.max(1));
                        }
                    }
                }
                value
            };
            Response::Value(match ttl {
                TtlChange::Keep => shards.with(&key, change),
                _ => shards.write(&key, change),
            })
        }
        Request::Edit { key, edit } => {
            let max_len = shards.max_value_len();
            shards.write(&key, |shard| {
                let current = shard.peek(now, &key);
                let edited = match edit.apply(current.as_deref(), max_len) {
                    Ok(edited) => edited,
                    Err(err) => return edit_error(&err),
                };
                if let Some(value) = edited.value {
                    let options = SetOptions { keep_ttl: true, ..SetOptions::default() };
                    if let Err(err) = shard.set(now, &key, value, options) {
                        return shard_error(&err);
                    }
                }
                match edited.answer {
                    EditAnswer::Integer(n) => Response::Integer(n),
                    EditAnswer::Value(value) => Response::Value(Some(value)),
                }
            })
        }
        Request::MSetNx { pairs } => super::keyspace::mset_nx(shards, now, pairs),
        Request::Rename { from, to, only_if_absent } => {
            super::keyspace::move_value(shards, now, (&from, &to), false, !only_if_absent)
        }
        Request::Copy { from, to, replace } => super::keyspace::move_value(shards, now, (&from, &to), true, replace),
        Request::Keys { pattern } => super::keyspace::keys(shards, &pattern),
        Request::Scan { cursor, pattern, count } => super::keyspace::scan(shards, cursor, pattern.as_deref(), count),
        Request::RandomKey => {
            let n = shards.shard_count();
            super::keyspace::random_key(shards, n)
        }
        Request::DbSize => Response::Count(shards.count()),
        Request::FlushAll => Response::Count(shards.clear()),
        other @ (Request::Ping | Request::Stats | Request::Admin { .. }) => not_data(&other),
    }
}

fn set_slice(
    shards: &mut impl Shards,
    now: u64,
    key: &[u8],
    value: &[u8],
    ttl_ms: Option<u64>,
    condition: Condition,
    hint: u32,
) -> Response {
    shards.write(key, |shard| {
        let applies = match condition {
            Condition::Always => true,
            Condition::IfAbsent => !shard.contains(now, key),
            Condition::IfPresent => shard.contains(now, key),
        };
        if !applies {
            return Response::Applied(false);
        }
        let options = SetOptions { ttl_ms, hint, keep_ttl: false };
        match shard.set_slice(now, key, value, options) {
            Ok(_) if condition == Condition::Always => Response::Ok,
            Ok(SetOutcome::NotAdmitted) => Response::Applied(false),
            Ok(_) => Response::Applied(true),
            Err(err) => shard_error(&err),
        }
    })
}

#[allow(clippy::too_many_arguments)]
fn set_with(
    shards: &mut impl Shards,
    now: u64,
    key: &[u8],
    value: Bytes,
    ttl_ms: Option<u64>,
    keep_ttl: bool,
    condition: Condition,
    get: bool,
    hint: u32,
) -> Response {
    shards.write(key, |shard| {
        let old = if get { shard.get(now, key) } else { None };
        let present = if get { old.is_some() } else { shard.contains(now, key) };
        let applies = match condition {
            Condition::Always => true,
            Condition::IfAbsent => !present,
            Condition::IfPresent => present,
        };
        if applies {
            let options = SetOptions { ttl_ms: if keep_ttl { None } else { ttl_ms }, keep_ttl, hint };
            if let Err(err) = shard.set(now, key, value, options) {
                return shard_error(&err);
            }
        }
        match (get, applies, condition) {
            (true, _, _) => Response::Value(old),
            (false, true, Condition::Always) => Response::Ok,
            (false, applied, _) => Response::Applied(applied),
        }
    })
}

/// The reply's size is checked before any value is copied (a few bytes
/// per key can ask for many copies of a large value), and again as
/// values are read, in case they grew.
fn mget(shards: &mut impl Shards, now: u64, keys: &[Bytes]) -> Response {
    let limit = cachet_proto::MAX_REPLY_LEN - (64 << 10);
    let too_large = || {
        Response::Error(ErrorReply::new(
            ErrorCode::TooLarge,
            format!("the reply would exceed {} bytes; ask for fewer keys", cachet_proto::MAX_REPLY_LEN),
        ))
    };
    let sized = keys.iter().try_fold(0usize, |total, key| {
        Some(total + shards.with(key, |s| s.value_len(now, key)).unwrap_or(0) + 16).filter(|&t| t <= limit)
    });
    if sized.is_none() {
        return too_large();
    }
    let mut values = Vec::with_capacity(keys.len());
    let mut total = 0usize;
    for key in keys {
        let value = shards.with(key, |s| s.get(now, key));
        total += value.as_ref().map_or(0, |v| v.len()) + 16;
        if total > limit {
            return too_large();
        }
        values.push(value);
    }
    Response::Values(values)
}

fn incr(shards: &mut impl Shards, now: u64, key: &[u8], delta: i64) -> Response {
    shards.write(key, |shard| {
        let current = match shard.get(now, key) {
            None => 0,
            Some(value) => match std::str::from_utf8(&value).ok().and_then(|s| s.parse::<i64>().ok()) {
                Some(n) => n,
                None => {
                    return Response::Error(ErrorReply::new(
                        ErrorCode::WrongType,
                        "value is not a decimal 64-bit integer",
                    ));
                }
            },
        };
        let Some(next) = current.checked_add(delta) else {
            return Response::Error(ErrorReply::new(ErrorCode::WrongType, "increment would overflow a 64-bit integer"));
        };
        let options = SetOptions { keep_ttl: true, ..SetOptions::default() };
        match shard.set(now, key, Bytes::from(next.to_string()), options) {
            Ok(_) => Response::Integer(next),
            Err(err) => shard_error(&err),
        }
    })
}

fn append(shards: &mut impl Shards, now: u64, key: &[u8], tail: &[u8]) -> Response {
    shards.write(key, |shard| {
        let current = shard.peek(now, key);
        let mut value = BytesMut::with_capacity(current.as_ref().map_or(0, |v| v.len()) + tail.len());
        if let Some(current) = current {
            value.extend_from_slice(&current);
        }
        value.extend_from_slice(tail);
        let len = value.len();
        let options = SetOptions { keep_ttl: true, ..SetOptions::default() };
        match shard.set(now, key, value.freeze(), options) {
            Ok(_) => Response::Integer(len as i64),
            Err(err) => shard_error(&err),
        }
    })
}
