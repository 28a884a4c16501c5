//! What [`crate::Client`] and [`crate::ClusterClient`] share: the requests
//! their methods send, what each reply must be, and which requests may be
//! sent twice.

use crate::{ClientError, SetOptions};
use bytes::Bytes;
use cachet_proto::{Condition, NodeStats, PolicyListing, Request, Response, TtlState};

/// A failed call, and whether its request may have reached the node.
#[derive(Debug)]
pub(crate) struct Failure {
    pub(crate) error: ClientError,
    /// Some of the request may have left: the node may have applied it.
    pub(crate) sent: bool,
}

impl Failure {
    /// A failure before anything was sent.
    pub(crate) fn unsent(error: ClientError) -> Self {
        Self { error, sent: false }
    }
}

/// The key bytes of a request.
pub(crate) fn key(key: impl AsRef<[u8]>) -> Bytes {
    Bytes::copy_from_slice(key.as_ref())
}

/// The key bytes of several.
pub(crate) fn keys<K: AsRef<[u8]>>(keys: &[K]) -> Vec<Bytes> {
    keys.iter().map(key).collect()
}

/// The SET a write with `options` takes: the original `Set` frame unless
/// it keeps the key's TTL or asks for the value replaced, so nodes older
/// than `SetWith` still take plain writes.
pub(crate) fn set(key: Bytes, value: Bytes, options: SetOptions, keep_ttl: bool, get: bool) -> Request {
    let ttl_ms = options.ttl.map(|t| t.as_millis() as u64);
    if !keep_ttl && !get {
        return Request::Set { key, value, ttl_ms, condition: options.condition, hint: options.hint };
    }
    Request::SetWith {
        key,
        value,
        ttl_ms: if keep_ttl { None } else { ttl_ms },
        keep_ttl,
        condition: options.condition,
        get,
        hint: options.hint,
    }
}

/// Whether `request` may be sent again after an attempt that may have
/// reached a node. Reads may, and so may writes whose second application
/// changes nothing (a plain SET, MSET, DEL). A read-modify-write may not:
/// a second INCR or APPEND would apply twice, a second conditional SET or
/// GETDEL would answer about the first one's result, a second EXPIRE
/// would restart the TTL. Admin commands act on the member asked, so they
/// are never sent elsewhere.
pub(crate) fn repeatable(request: &Request) -> bool {
    match request {
        Request::Get { .. }
        | Request::Ttl { .. }
        | Request::Exists { .. }
        | Request::MGet { .. }
        | Request::Strlen { .. }
        | Request::Ping
        | Request::Stats
        | Request::DbSize
        | Request::Keys { .. }
        | Request::Scan { .. }
        | Request::RandomKey => true,
        Request::Set { condition: Condition::Always, .. }
        | Request::SetWith { condition: Condition::Always, get: false, .. }
        | Request::MSet { .. }
        | Request::Del { .. } => true,
        Request::Set { .. }
        | Request::SetWith { .. }
        | Request::Incr { .. }
        | Request::Append { .. }
        | Request::GetDel { .. }
        | Request::GetEx { .. }
        | Request::Persist { .. }
        | Request::Expire { .. }
        | Request::FlushAll
        | Request::Edit { .. }
        | Request::MSetNx { .. }
        | Request::Rename { .. }
        | Request::Copy { .. }
        | Request::Admin { .. } => false,
    }
}

fn unexpected(reply: &Response) -> ClientError {
    ClientError::Protocol(format!("{reply:?}"))
}

/// A value, or none (a miss).
pub(crate) fn value(reply: Response) -> Result<Option<Bytes>, ClientError> {
    match reply {
        Response::Value(value) => Ok(value),
        other => Err(unexpected(&other)),
    }
}

/// `expected` values, in request order.
pub(crate) fn values(reply: Response, expected: usize) -> Result<Vec<Option<Bytes>>, ClientError> {
    match reply {
        Response::Values(values) if values.len() == expected => Ok(values),
        Response::Values(values) => Err(ClientError::Protocol(format!("{} values for {expected} keys", values.len()))),
        other => Err(unexpected(&other)),
    }
}

/// Whether a write applied: `Ok` for an unconditional one.
pub(crate) fn applied(reply: Response) -> Result<bool, ClientError> {
    match reply {
        Response::Ok => Ok(true),
        Response::Applied(applied) => Ok(applied),
        other => Err(unexpected(&other)),
    }
}

pub(crate) fn ok(reply: Response) -> Result<(), ClientError> {
    match reply {
        Response::Ok => Ok(()),
        other => Err(unexpected(&other)),
    }
}

pub(crate) fn count(reply: Response) -> Result<u64, ClientError> {
    match reply {
        Response::Count(n) => Ok(n),
        other => Err(unexpected(&other)),
    }
}

pub(crate) fn integer(reply: Response) -> Result<i64, ClientError> {
    match reply {
        Response::Integer(n) => Ok(n),
        other => Err(unexpected(&other)),
    }
}

/// A length (APPEND, STRLEN), sent as an integer.
pub(crate) fn length(reply: Response) -> Result<u64, ClientError> {
    let n = integer(reply)?;
    u64::try_from(n).map_err(|_| ClientError::Protocol(format!("a negative length: {n}")))
}

pub(crate) fn ttl(reply: Response) -> Result<TtlState, ClientError> {
    match reply {
        Response::Ttl(state) => Ok(state),
        other => Err(unexpected(&other)),
    }
}

pub(crate) fn stats(reply: Response) -> Result<NodeStats, ClientError> {
    match reply {
        Response::Stats(stats) => Ok(stats),
        other => Err(unexpected(&other)),
    }
}

pub(crate) fn listing(reply: Response) -> Result<PolicyListing, ClientError> {
    match reply {
        Response::Policies(listing) => Ok(*listing),
        other => Err(unexpected(&other)),
    }
}

pub(crate) fn pong(reply: Response) -> Result<(), ClientError> {
    match reply {
        Response::Pong => Ok(()),
        other => Err(unexpected(&other)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use cachet_proto::{AdminCommand, TtlChange};
    use std::time::Duration;

    fn b(s: &str) -> Bytes {
        Bytes::copy_from_slice(s.as_bytes())
    }

    #[test]
    fn plain_writes_keep_the_original_frame_and_the_rest_use_set_with() {
        let options = SetOptions { ttl: Some(Duration::from_secs(2)), condition: Condition::IfAbsent, hint: 7 };
        assert_eq!(
            set(b("k"), b("v"), options, false, false),
            Request::Set { key: b("k"), value: b("v"), ttl_ms: Some(2_000), condition: Condition::IfAbsent, hint: 7 }
        );
        assert_eq!(
            set(b("k"), b("v"), options, false, true),
            Request::SetWith {
                key: b("k"),
                value: b("v"),
                ttl_ms: Some(2_000),
                keep_ttl: false,
                condition: Condition::IfAbsent,
                get: true,
                hint: 7
            }
        );
        // KEEPTTL drops a TTL given with it, as the node would ignore it.
        assert_eq!(
            set(b("k"), b("v"), options, true, false),
            Request::SetWith {
                key: b("k"),
                value: b("v"),
                ttl_ms: None,
                keep_ttl: true,
                condition: Condition::IfAbsent,
                get: false,
                hint: 7
            }
        );
    }

    #[test]
    fn read_modify_writes_are_never_sent_twice() {
        let (k, v) = (b("k"), b("v"));
        let once = [
            Request::Incr { key: k.clone(), delta: 1 },
            Request::Incr { key: k.clone(), delta: -1 },
            Request::Append { key: k.clone(), value: v.clone() },
            Request::GetDel { key: k.clone() },
            Request::GetEx { key: k.clone(), ttl: TtlChange::Persist },
            Request::GetEx { key: k.clone(), ttl: TtlChange::Set(5) },
            Request::Persist { key: k.clone() },
            Request::Expire { key: k.clone(), ttl_ms: 5, when: Default::default() },
            set(
                k.clone(),
                v.clone(),
                SetOptions { condition: Condition::IfAbsent, ..SetOptions::default() },
                false,
                false,
            ),
            set(
                k.clone(),
                v.clone(),
                SetOptions { condition: Condition::IfPresent, ..SetOptions::default() },
                true,
                false,
            ),
            set(k.clone(), v.clone(), SetOptions::default(), false, true),
            Request::FlushAll,
            Request::Admin { token: "t".into(), command: AdminCommand::Rollback },
        ];
        for request in &once {
            assert!(!repeatable(request), "{request:?} must not be retried once sent");
        }
        let again = [
            Request::Get { key: k.clone() },
            Request::Ttl { key: k.clone() },
            Request::Strlen { key: k.clone() },
            Request::Exists { keys: vec![k.clone()] },
            Request::MGet { keys: vec![k.clone()] },
            Request::MSet { pairs: vec![(k.clone(), v.clone())] },
            Request::Del { keys: vec![k.clone()] },
            Request::DbSize,
            Request::Ping,
            Request::Stats,
            set(
                k.clone(),
                v.clone(),
                SetOptions { ttl: Some(Duration::from_secs(1)), ..SetOptions::default() },
                false,
                false,
            ),
            set(k.clone(), v.clone(), SetOptions::default(), true, false),
        ];
        for request in &again {
            assert!(repeatable(request), "{request:?} may be retried");
        }
    }

    #[test]
    fn replies_of_the_wrong_shape_are_protocol_errors() {
        assert_eq!(applied(Response::Ok).ok(), Some(true));
        assert_eq!(applied(Response::Applied(false)).ok(), Some(false));
        assert!(matches!(length(Response::Integer(-1)), Err(ClientError::Protocol(_))));
        assert!(matches!(values(Response::Values(vec![None]), 2), Err(ClientError::Protocol(_))));
        assert!(matches!(count(Response::Ok), Err(ClientError::Protocol(_))));
    }
}
