//! Read-modify-write commands on a replicated key (INCR, APPEND, SET with
//! NX/XX/GET/KEEPTTL, GETDEL, GETEX, EXPIRE, PERSIST), as pure functions:
//! given the key's live record and the wall clock, what to write and what
//! to answer. The replica ([`super::replica`]) runs them serialized at the
//! key's primary owner: one update of a key at a time there, each a read
//! and then a write at the request's consistency, so two increments
//! acknowledged at QUORUM never both read the same value (see
//! docs/decisions.md for the window that remains while members disagree
//! about who is primary).

use bytes::{Bytes, BytesMut};
use cachet_proto::{Condition, TtlChange};
use serde::{Deserialize, Serialize};

/// A read-modify-write of one key.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Update {
    /// Add to a decimal integer (0 when absent); the TTL is kept.
    Incr(i64),
    /// Append bytes (creating the value); the TTL is kept.
    Append(Bytes),
    /// A conditional or value-returning SET.
    Set {
        /// The new value.
        value: Bytes,
        /// Time to live in milliseconds from the write (ignored with
        /// `keep_ttl`); `None`: no expiry.
        ttl_ms: Option<u64>,
        /// Keep the TTL the key has.
        keep_ttl: bool,
        /// NX / XX.
        condition: Condition,
        /// Answer with the value replaced.
        get: bool,
        /// The policy hint to store with it.
        #[serde(default)]
        hint: u32,
    },
    /// Read and delete.
    GetDel,
    /// Read and change the TTL.
    GetEx(TtlChange),
    /// Set the TTL (0 deletes); answers whether the key existed.
    Expire(u64),
    /// The same, only when the key's current TTL allows it (Redis's NX,
    /// XX, GT, LT); answers whether it applied. A variant of its own, so
    /// members of an older build never meet a field they do not know.
    ExpireIf(u64, cachet_proto::ExpireIf),
    /// Remove the TTL; answers whether it had one.
    Persist,
    /// An in-place edit of the value (SETRANGE, SETBIT, INCRBYFLOAT); the
    /// TTL is kept.
    Edit(cachet_proto::Edit),
    /// A read-through GET of a loader namespace: the value if the key has
    /// one, else the primary loads it (once, however many ask at once),
    /// writes it to the replicas and answers it.
    Load {
        /// How long the load may take at the primary (the namespace's load
        /// timeout), for the asking member's deadline.
        wait_ms: u64,
        /// When a live value is served stale and refreshed in the
        /// background (stale-while-revalidate, early refresh); `None`: a
        /// live value is simply served.
        #[serde(default)]
        fresh: Option<FreshRule>,
    },
    /// A SET (`Some`) or DEL (`None`) of a key whose namespace writes to
    /// its origin: the primary writes it to the origin through its loader
    /// (at once, or queued for write-behind), then to the replicas.
    Store {
        /// The value, `None` to delete.
        value: Option<Bytes>,
        /// The client's TTL in milliseconds (the namespace's otherwise).
        ttl_ms: Option<u64>,
        /// How long the origin write may take (the namespace's timeout).
        wait_ms: u64,
    },
}

/// A loader namespace's refresh rule, carried with each read-through GET to
/// the key's primary, which decides with it (and the value's expiry and
/// cost hint, the load's milliseconds) whether to refresh: see
/// [`crate::loader::refresh::freshness`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FreshRule {
    /// The stale-while-revalidate window before the hard expiry.
    pub grace_ms: u64,
    /// XFetch's beta in thousandths (0: no early refresh).
    pub beta_milli: u32,
    /// The random draw for XFetch, made where the GET arrived.
    pub draw: u64,
}

impl FreshRule {
    /// Whether a value of `entry` read at `wall_ms` should be refreshed
    /// (it is past its soft expiry, or XFetch picks it early).
    pub fn refresh(&self, entry: &Entry, wall_ms: u64) -> bool {
        let Some(expires_at) = entry.expires_at else { return false };
        let beta = f64::from(self.beta_milli) / 1000.0;
        let u = crate::loader::refresh::unit(self.draw);
        crate::loader::refresh::freshness(wall_ms, expires_at, self.grace_ms, entry.hint, beta, u)
            == crate::loader::refresh::Freshness::Refresh
    }
}

impl Update {
    /// The largest value the update carries, for checking a peer's message
    /// against the node's limits.
    pub fn value_len(&self) -> usize {
        match self {
            Self::Append(bytes) | Self::Set { value: bytes, .. } | Self::Store { value: Some(bytes), .. } => {
                bytes.len()
            }
            _ => 0,
        }
    }
}

/// What the client is answered.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Effect {
    /// The new integer (INCR) or length (APPEND).
    Integer(i64),
    /// A value read (GETDEL, GETEX, SET ... GET).
    Value(Option<Bytes>),
    /// Whether a conditional write or a TTL change applied.
    Applied(bool),
    /// An unconditional SET without GET.
    Ok,
    /// INCR of a value that is not a decimal 64-bit integer.
    NotAnInteger,
    /// INCR past the 64-bit range.
    Overflow,
    /// The load at the primary failed: the loader's or the origin's error.
    LoadFailed {
        /// Whether the origin failed (else the loader).
        origin: bool,
        /// Why.
        message: String,
    },
    /// An edit that does not apply: why (its `EditError` text), and
    /// whether for the value's size.
    EditRefused {
        /// Refused for the value's size.
        too_large: bool,
        /// Why.
        message: String,
    },
    /// The new value (an APPEND's) would be over the node's limit.
    TooLarge {
        /// Its length.
        len: usize,
        /// The limit.
        limit: usize,
    },
}

/// A key's value and expiry: what an update reads (the live value) and
/// what it writes (the whole new record).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    /// The value; `None` deletes.
    pub value: Option<Bytes>,
    /// Expiry in Unix milliseconds.
    pub expires_at: Option<u64>,
    /// The policy hint stored with it.
    pub hint: u32,
}

/// `entry` if it holds a value that has not expired at `wall_ms`.
pub fn live(entry: Option<Entry>, wall_ms: u64) -> Option<Entry> {
    entry.filter(|e| e.value.is_some() && e.expires_at.is_none_or(|at| at > wall_ms))
}

/// Applies `update` to the key's live entry (see [`live`]) at `wall_ms`:
/// the write to make, if any, and the answer. A value longer than
/// `max_len` is refused, not written.
pub fn apply(update: &Update, current: Option<&Entry>, wall_ms: u64, max_len: usize) -> (Option<Entry>, Effect) {
    if let Update::Edit(edit) = update {
        // Checked against the limit before the new value is built.
        let value = current.and_then(|e| e.value.as_deref());
        return match edit.apply(value, max_len) {
            Ok(edited) => {
                let effect = match edited.answer {
                    cachet_proto::EditAnswer::Integer(n) => Effect::Integer(n),
                    cachet_proto::EditAnswer::Value(v) => Effect::Value(Some(v)),
                };
                let (expires_at, hint) = current.map_or((None, 0), |e| (e.expires_at, e.hint));
                (edited.value.map(|v| Entry { value: Some(v), expires_at, hint }), effect)
            }
            Err(err) => {
                let too_large =
                    matches!(err, cachet_proto::EditError::TooLong | cachet_proto::EditError::OverLimit { .. });
                (None, Effect::EditRefused { too_large, message: err.to_string() })
            }
        };
    }
    let (write, effect) = apply_unbounded(update, current, wall_ms);
    match write.as_ref().and_then(|w| w.value.as_ref()).map(Bytes::len) {
        Some(len) if len > max_len => (None, Effect::TooLarge { len, limit: max_len }),
        _ => (write, effect),
    }
}

fn apply_unbounded(update: &Update, current: Option<&Entry>, wall_ms: u64) -> (Option<Entry>, Effect) {
    let current_entry = current;
    let value = current.and_then(|r| r.value.clone());
    let expires_at = current.and_then(|r| r.expires_at);
    // A read-modify-write keeps the hint the value was stored with.
    let hint = current.map_or(0, |r| r.hint);
    let after = |ms: u64| Some(wall_ms.saturating_add(ms.max(1)));
    match update {
        Update::Incr(delta) => {
            let now = match &value {
                None => 0,
                Some(bytes) => match std::str::from_utf8(bytes).ok().and_then(|s| s.parse::<i64>().ok()) {
                    Some(n) => n,
                    None => return (None, Effect::NotAnInteger),
                },
            };
            match now.checked_add(*delta) {
                Some(next) => {
                    let write = Entry { value: Some(Bytes::from(next.to_string())), expires_at, hint };
                    (Some(write), Effect::Integer(next))
                }
                None => (None, Effect::Overflow),
            }
        }
        Update::Append(tail) => {
            let mut next = BytesMut::with_capacity(value.as_ref().map_or(0, Bytes::len) + tail.len());
            if let Some(value) = &value {
                next.extend_from_slice(value);
            }
            next.extend_from_slice(tail);
            let len = next.len() as i64;
            (Some(Entry { value: Some(next.freeze()), expires_at, hint }), Effect::Integer(len))
        }
        Update::Set { value: new, ttl_ms, keep_ttl, condition, get, hint: new_hint } => {
            let applies = match condition {
                Condition::Always => true,
                Condition::IfAbsent => value.is_none(),
                Condition::IfPresent => value.is_some(),
            };
            let effect = match (get, applies, condition) {
                (true, _, _) => Effect::Value(value.clone()),
                (false, true, Condition::Always) => Effect::Ok,
                (false, applied, _) => Effect::Applied(applied),
            };
            if !applies {
                return (None, effect);
            }
            let expires_at = if *keep_ttl { expires_at } else { ttl_ms.and_then(after) };
            (Some(Entry { value: Some(new.clone()), expires_at, hint: *new_hint }), effect)
        }
        Update::GetDel => match value {
            None => (None, Effect::Value(None)),
            Some(old) => (Some(Entry { value: None, expires_at: None, hint: 0 }), Effect::Value(Some(old))),
        },
        Update::GetEx(change) => {
            let Some(old) = value else { return (None, Effect::Value(None)) };
            let expiry = match change {
                TtlChange::Keep => return (None, Effect::Value(Some(old))),
                TtlChange::Persist => None,
                TtlChange::Set(ms) => after(*ms),
            };
            (Some(Entry { value: Some(old.clone()), expires_at: expiry, hint }), Effect::Value(Some(old)))
        }
        Update::ExpireIf(ms, when) => {
            let current = expires_at.map(|at| at.saturating_sub(wall_ms));
            match value {
                Some(_) if when.allows(current, *ms) => apply_unbounded(&Update::Expire(*ms), current_entry, wall_ms),
                _ => (None, Effect::Applied(false)),
            }
        }
        Update::Expire(ms) => match value {
            None => (None, Effect::Applied(false)),
            Some(_) if *ms == 0 => (Some(Entry { value: None, expires_at: None, hint: 0 }), Effect::Applied(true)),
            Some(old) => (Some(Entry { value: Some(old), expires_at: after(*ms), hint }), Effect::Applied(true)),
        },
        // A hit; a miss is loaded by the replica before anything is written.
        Update::Load { .. } => (None, Effect::Value(value)),
        // Run by the replica through the origin, never applied here.
        Update::Store { .. } => (None, Effect::Applied(value.is_some())),
        // Applied by `apply`, against the value size limit.
        Update::Edit(_) => (None, Effect::Value(None)),
        Update::Persist => match (value, expires_at) {
            (Some(old), Some(_)) => (Some(Entry { value: Some(old), expires_at: None, hint }), Effect::Applied(true)),
            _ => (None, Effect::Applied(false)),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn apply_t(update: &Update, current: Option<&Entry>, wall_ms: u64) -> (Option<Entry>, Effect) {
        apply(update, current, wall_ms, 1 << 20)
    }

    fn record(value: &str, expires_at: Option<u64>) -> Entry {
        Entry { value: Some(Bytes::from(value.to_string())), expires_at, hint: 7 }
    }

    #[test]
    fn updates_do_what_the_single_node_commands_do() {
        let wall = 1_000;
        let n = record("41", Some(5_000));
        let (write, effect) = apply_t(&Update::Incr(1), Some(&n), wall);
        assert_eq!(effect, Effect::Integer(42));
        assert_eq!(write, Some(Entry { value: Some(Bytes::from_static(b"42")), expires_at: Some(5_000), hint: 7 }));
        assert_eq!(apply_t(&Update::Incr(1), None, wall).1, Effect::Integer(1));
        assert_eq!(apply_t(&Update::Incr(1), Some(&record("x", None)), wall), (None, Effect::NotAnInteger));
        assert_eq!(apply_t(&Update::Incr(i64::MAX), Some(&n), wall), (None, Effect::Overflow));
        let (write, effect) = apply_t(&Update::Append(Bytes::from_static(b"!")), Some(&n), wall);
        assert_eq!((write.and_then(|w| w.value), effect), (Some(Bytes::from_static(b"41!")), Effect::Integer(3)));
        let nx = Update::Set {
            value: Bytes::from_static(b"v"),
            ttl_ms: Some(10),
            keep_ttl: false,
            condition: Condition::IfAbsent,
            get: false,
            hint: 3,
        };
        assert_eq!(apply_t(&nx, Some(&n), wall), (None, Effect::Applied(false)));
        let (write, effect) = apply_t(&nx, None, wall);
        assert_eq!((write.map(|w| w.expires_at), effect), (Some(Some(1_010)), Effect::Applied(true)));
        let get = Update::Set {
            value: Bytes::from_static(b"v"),
            ttl_ms: None,
            keep_ttl: true,
            condition: Condition::Always,
            get: true,
            hint: 0,
        };
        let (write, effect) = apply_t(&get, Some(&n), wall);
        assert_eq!(write.map(|w| w.expires_at), Some(Some(5_000)), "KEEPTTL");
        assert_eq!(effect, Effect::Value(Some(Bytes::from_static(b"41"))));
        assert_eq!(apply_t(&Update::GetDel, Some(&n), wall).0, Some(Entry { value: None, expires_at: None, hint: 0 }));
        assert_eq!(apply_t(&Update::Persist, Some(&n), wall).1, Effect::Applied(true));
        assert_eq!(apply_t(&Update::Persist, Some(&record("v", None)), wall), (None, Effect::Applied(false)));
        assert_eq!(
            apply_t(&Update::Expire(0), Some(&n), wall).0,
            Some(Entry { value: None, expires_at: None, hint: 0 })
        );
        assert_eq!(apply_t(&Update::Expire(5), None, wall), (None, Effect::Applied(false)));
        let (write, _) = apply_t(&Update::GetEx(TtlChange::Set(100)), Some(&n), wall);
        assert_eq!(write.map(|w| w.expires_at), Some(Some(1_100)));
        assert_eq!(live(Some(record("v", Some(wall))), wall), None, "expired at the wall clock");
        let long = Update::Append(Bytes::from_static(b"12345"));
        assert_eq!(apply(&long, Some(&n), wall, 6), (None, Effect::TooLarge { len: 7, limit: 6 }));
    }
}
