//! Redis commands over a [`Node`]: the same shards, policies and counters
//! as the QUIC port. Commands that `cachet/1` has go through
//! [`Node::execute`] (so metrics and shadow evaluation see them); compound
//! ones (SET ... GET, GETDEL, APPEND, ...) run under the key's shard lock.
//! Replies and error texts follow Redis, so its clients and tools work.

use super::acl::{Acl, Denied, User};
use super::codec::Writer;
use crate::core::{SetOptions, SetOutcome};
use crate::loader::{Lookup, Routed};
use crate::node::Node;
use bytes::{Bytes, BytesMut};
use cachet_proto::{Condition, ErrorCode, ErrorReply, Request, Response, TtlState};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

/// Per-connection state.
#[derive(Debug, Default)]
pub struct Session {
    /// Replies in RESP3 (after `HELLO 3`).
    pub resp3: bool,
    /// `CLIENT SETNAME`.
    pub name: Option<Bytes>,
    /// The client asked to QUIT: reply, then close.
    pub quit: bool,
    /// Connection id for `CLIENT ID` and `HELLO`.
    pub id: u64,
    /// The signed-in user, when the port has users ([`ServerInfo::acl`]);
    /// `None` until AUTH.
    pub user: Option<Arc<User>>,
    /// AUTH attempts on this connection that failed.
    pub failed_auths: u32,
}

/// Failed AUTH attempts after which a connection is closed: guessing
/// passwords then costs a connection each few tries, and connections are
/// capped per address.
pub const MAX_FAILED_AUTHS: u32 = 10;

impl Session {
    /// Whether this connection may run plain GETs and SETs on any key
    /// without a check: the port serves those from its read buffer only
    /// then.
    pub fn unrestricted(&self, info: &ServerInfo) -> bool {
        info.acl.is_none() || self.user.as_ref().is_some_and(|u| u.unrestricted())
    }
}

/// Whether the session may run `args` (`args[0]` is the name); the error
/// reply's text if not. Without users on the port, everyone may run
/// everything.
pub fn authorize(session: &Session, info: &ServerInfo, args: &[Bytes]) -> Result<(), Denied> {
    if info.acl.is_none() {
        return Ok(());
    }
    let Some(first) = args.first() else { return Ok(()) };
    let name = upper(first);
    match &session.user {
        Some(user) => user.check(&name, args),
        // Signing in, and leaving, need no user.
        None if matches!(name.as_str(), "AUTH" | "HELLO" | "QUIT") => Ok(()),
        None => Err(Denied::NoAuth),
    }
}

/// What the commands need to know about the listener.
#[derive(Clone, Debug, Default)]
pub struct ServerInfo {
    /// TCP port of the RESP listener.
    pub port: u16,
    /// Its users; `None` when it has none (everyone may do everything).
    pub acl: Option<Arc<Acl>>,
}

/// Commands this port answers, for `COMMAND COUNT` and docs.
pub const SUPPORTED: &[&str] = &[
    "APPEND", "AUTH", "CLIENT", "COMMAND", "CONFIG", "DBSIZE", "DECR", "DECRBY", "DEL", "ECHO", "EXISTS", "EXPIRE",
    "FLUSHALL", "FLUSHDB", "GET", "GETDEL", "GETEX", "HELLO", "INCR", "INCRBY", "INFO", "MGET", "MSET", "PERSIST",
    "PEXPIRE", "PING", "PTTL", "QUIT", "SELECT", "SET", "STRLEN", "TTL",
];

const WRONG_INT: &str = "ERR value is not an integer or out of range";
const SYNTAX: &str = "ERR syntax error";

fn parse_i64(arg: &[u8]) -> Option<i64> {
    std::str::from_utf8(arg).ok()?.parse().ok()
}

fn upper(arg: &[u8]) -> String {
    String::from_utf8_lossy(arg).to_ascii_uppercase()
}

fn arity(w: &mut Writer<'_>, name: &str) {
    w.error(&format!("ERR wrong number of arguments for '{}' command", name.to_ascii_lowercase()));
}

fn node_error(w: &mut Writer<'_>, err: &ErrorReply) {
    match err.code {
        ErrorCode::WrongType if err.message.contains("overflow") => {
            w.error("ERR increment or decrement would overflow")
        }
        ErrorCode::WrongType => w.error(WRONG_INT),
        // Redis Cluster's word for "cannot serve this key now".
        ErrorCode::Unavailable => w.error(&format!("CLUSTERDOWN {}", err.message)),
        _ => w.error(&format!("ERR {}", err.message)),
    }
}

/// Runs one command (`args[0]` is its name) and writes its reply to `out`.
/// An empty command (`*0`) writes nothing.
pub fn execute(node: &Node, session: &mut Session, info: &ServerInfo, args: Vec<Bytes>, out: &mut BytesMut) {
    let Some(first) = args.first() else {
        return;
    };
    let mut w = Writer::new(out, session.resp3);
    // Most traffic is plain GET: no upper-cased name, no cloned value.
    if args.len() == 2 && first.eq_ignore_ascii_case(b"GET") {
        node.get_with(&args[1], |value| w.bulk_or_null(value));
        return;
    }
    let name = upper(first);
    let n = args.len();
    // Keys written to an origin change only through `origin_write`.
    let changes: Vec<&Bytes> = match name.as_str() {
        "MSET" => args.iter().skip(1).step_by(2).collect(),
        "DEL" => args.iter().skip(1).collect(),
        _ if WRITES.contains(&name.as_str()) => args.get(1).into_iter().collect(),
        _ => Vec::new(),
    };
    if let Some(Response::Error(err)) = changes.into_iter().find_map(|key| node.refuse_origin_write(key)) {
        w.error(&format!("ERR {}", err.message));
        return;
    }
    match name.as_str() {
        "PING" => match n {
            1 => w.simple("PONG"),
            2 => w.bulk(&args[1]),
            _ => arity(&mut w, &name),
        },
        "ECHO" if n == 2 => w.bulk(&args[1]),
        "GET" if n == 2 => match node.execute(Request::Get { key: args[1].clone() }) {
            Response::Value(v) => w.bulk_or_null(v.as_deref()),
            other => unexpected(&mut w, other),
        },
        "SET" if n >= 3 => set(node, &mut w, &args),
        "DEL" if n >= 2 => count(node, &mut w, Request::Del { keys: args[1..].to_vec() }),
        "EXISTS" if n >= 2 => count(node, &mut w, Request::Exists { keys: args[1..].to_vec() }),
        "EXPIRE" | "PEXPIRE" if n == 3 => {
            let scale = if name == "EXPIRE" { 1000 } else { 1 };
            match parse_i64(&args[2]).and_then(|t| t.checked_mul(scale)) {
                Some(ms) => {
                    let request = Request::Expire { key: args[1].clone(), ttl_ms: ms.max(0) as u64 };
                    match node.execute(request) {
                        Response::Applied(done) => w.integer(i64::from(done)),
                        other => unexpected(&mut w, other),
                    }
                }
                None => w.error(&format!("ERR invalid expire time in '{}' command", name.to_ascii_lowercase())),
            }
        }
        "TTL" | "PTTL" if n == 2 => match node.execute(Request::Ttl { key: args[1].clone() }) {
            Response::Ttl(TtlState::Missing) => w.integer(-2),
            Response::Ttl(TtlState::Persistent) => w.integer(-1),
            Response::Ttl(TtlState::Remaining(ms)) if name == "TTL" => w.integer(((ms + 500) / 1000) as i64),
            Response::Ttl(TtlState::Remaining(ms)) => w.integer(ms as i64),
            other => unexpected(&mut w, other),
        },
        "PERSIST" if n == 2 => {
            let done = node.with_shard(&args[1], |shard, now| shard.persist(now, &args[1]));
            w.integer(i64::from(done));
        }
        "MGET" if n >= 2 => match node.execute(Request::MGet { keys: args[1..].to_vec() }) {
            Response::Values(values) => {
                w.array(values.len());
                for v in &values {
                    w.bulk_or_null(v.as_deref());
                }
            }
            other => unexpected(&mut w, other),
        },
        "MSET" if n >= 3 && n % 2 == 1 => {
            let pairs = args[1..].chunks(2).map(|p| (p[0].clone(), p[1].clone())).collect();
            match node.execute(Request::MSet { pairs }) {
                Response::Ok => w.simple("OK"),
                other => unexpected(&mut w, other),
            }
        }
        "INCR" | "DECR" if n == 2 => incr(node, &mut w, &args[1], if name == "INCR" { 1 } else { -1 }),
        "INCRBY" | "DECRBY" if n == 3 => match parse_i64(&args[2]) {
            Some(by) if name == "INCRBY" => incr(node, &mut w, &args[1], by),
            Some(by) => match by.checked_neg() {
                Some(by) => incr(node, &mut w, &args[1], by),
                None => w.error("ERR decrement would overflow"),
            },
            None => w.error(WRONG_INT),
        },
        "APPEND" if n == 3 => {
            let result = node.with_shard(&args[1], |shard, now| {
                let mut value = shard.peek(now, &args[1]).map(|v| v.to_vec()).unwrap_or_default();
                value.extend_from_slice(&args[2]);
                let len = value.len();
                let options = SetOptions { keep_ttl: true, ..SetOptions::default() };
                shard.set(now, &args[1], Bytes::from(value), options).map(|_| len)
            });
            match result {
                Ok(len) => w.integer(len as i64),
                Err(err) => w.error(&format!("ERR {err}")),
            }
        }
        "STRLEN" if n == 2 => match node.execute(Request::Get { key: args[1].clone() }) {
            Response::Value(v) => w.integer(v.map_or(0, |v| v.len()) as i64),
            other => unexpected(&mut w, other),
        },
        "GETDEL" if n == 2 => {
            let value = node.with_shard(&args[1], |shard, now| {
                let value = shard.get(now, &args[1]);
                if value.is_some() {
                    shard.delete(now, &args[1]);
                }
                value
            });
            w.bulk_or_null(value.as_deref());
        }
        "GETEX" if n >= 2 => getex(node, &mut w, &args),
        "DBSIZE" if n == 1 => w.integer(node.len() as i64),
        "FLUSHALL" | "FLUSHDB" if n <= 2 => {
            node.flush_all();
            w.simple("OK");
        }
        "INFO" => {
            let text = info_text(node, info, args.get(1).map(|s| upper(s)));
            w.text(&text);
        }
        "SELECT" if n == 2 => match parse_i64(&args[1]) {
            Some(0) => w.simple("OK"),
            Some(_) => w.error("ERR DB index is out of range"),
            None => w.error(WRONG_INT),
        },
        "CLIENT" if n >= 2 => client(session, &mut w, &args),
        "HELLO" => hello(node, session, info, &mut w, &args),
        "COMMAND" => match args.get(1).map(|a| upper(a)).as_deref() {
            Some("COUNT") => w.integer(SUPPORTED.len() as i64),
            Some("DOCS") => w.map(0),
            Some("INFO") => {
                w.array(n - 2);
                for _ in 2..n {
                    w.null();
                }
            }
            _ => w.array(0),
        },
        "CONFIG" if n >= 2 => match upper(&args[1]).as_str() {
            "GET" => w.map(0),
            "SET" | "RESETSTAT" | "REWRITE" => w.simple("OK"),
            _ => w.error("ERR unknown subcommand for CONFIG"),
        },
        "AUTH" if n == 2 || n == 3 => {
            let (user, password) = if n == 2 { (&b"default"[..], &args[1]) } else { (&args[1][..], &args[2]) };
            match authenticate(node, session, info, user, password) {
                Ok(()) => w.simple("OK"),
                Err(message) => w.error(message),
            }
        }
        "QUIT" => {
            session.quit = true;
            w.simple("OK");
        }
        _ if SUPPORTED.contains(&name.as_str()) => arity(&mut w, &name),
        _ => {
            let mut message =
                format!("ERR unknown command '{}', with args beginning with: ", String::from_utf8_lossy(first));
            for arg in args.iter().skip(1).take(8) {
                message.push_str(&format!("'{}' ", String::from_utf8_lossy(&arg[..arg.len().min(64)])));
            }
            w.error(&message);
        }
    }
}

/// A GET of a key in a loader namespace: the loaders' lookup (a reply
/// now, or a load for the connection to await before answering, which
/// keeps replies in order). `None` for every other command.
pub fn loading_get(node: &Node, args: &[Bytes]) -> Option<Lookup> {
    let [name, key] = args else { return None };
    if !name.eq_ignore_ascii_case(b"GET") {
        return None;
    }
    let loaders = node.loaders()?;
    loaders.covers(key).then(|| loaders.get(node, key.clone()))
}

/// SET and DEL of a key in a namespace that writes to its origin: the
/// write for the connection to await (replies stay in order), or a
/// refusal for the forms that cannot be written through (SET options other
/// than EX/PX, several keys). Other commands that would change such a key
/// are refused by [`execute`]. `None` when the loaders do not take it.
pub fn origin_write(node: &Node, args: &[Bytes]) -> Option<Routed> {
    let loaders = node.loaders()?;
    let name = upper(args.first()?);
    let key = args.get(1)?;
    loaders.write_mode(key)?;
    let request = match (name.as_str(), args.len()) {
        ("SET", 3) => Request::Set {
            key: key.clone(),
            value: args[2].clone(),
            ttl_ms: None,
            condition: Condition::Always,
            hint: 0,
        },
        ("SET", 5) => {
            let scale = match upper(&args[3]).as_str() {
                "EX" => 1000,
                "PX" => 1,
                _ => return Some(refusal("ERR only SET key value [EX s|PX ms] applies to keys written to an origin")),
            };
            let Some(ms) = parse_i64(&args[4]).filter(|&t| t > 0).and_then(|t| t.checked_mul(scale)) else {
                return Some(refusal("ERR invalid expire time in 'set' command"));
            };
            Request::Set {
                key: key.clone(),
                value: args[2].clone(),
                ttl_ms: Some(ms as u64),
                condition: Condition::Always,
                hint: 0,
            }
        }
        ("SET", _) => return Some(refusal("ERR only SET key value [EX s|PX ms] applies to keys written to an origin")),
        ("DEL", 2) => Request::Del { keys: vec![key.clone()] },
        _ => return None,
    };
    loaders.route(node, &request)
}

/// On a clustered node, the data commands become replicated operations
/// (the node forwards them to the key's owners), answered in order once
/// done; commands the replicated store cannot do, or that would act on
/// this node's share alone, are refused. `None`: not clustered, or a
/// command that stays local (PING, INFO, CLIENT, ...).
pub fn cluster_command(node: &Node, args: &[Bytes]) -> Option<(ClusterReply, Routed)> {
    let cluster = node.cluster()?;
    let name = upper(args.first()?);
    let n = args.len();
    let refuse = |why: &str| {
        Some((ClusterReply::Write, Routed::Now(Response::Error(ErrorReply::new(ErrorCode::NotSupported, why)))))
    };
    let (kind, request) = match name.as_str() {
        "GET" if n == 2 => (ClusterReply::Get, Request::Get { key: args[1].clone() }),
        "SET" if n == 3 || n == 5 => {
            let ttl_ms = if n == 5 {
                let scale = match upper(&args[3]).as_str() {
                    "EX" => 1000,
                    "PX" => 1,
                    _ => return refuse("only SET key value [EX s|PX ms] on a clustered node"),
                };
                match parse_i64(&args[4]).filter(|&t| t > 0).and_then(|t| t.checked_mul(scale)) {
                    Some(ms) => Some(ms as u64),
                    None => {
                        let err = ErrorReply::new(ErrorCode::InvalidArgument, "invalid expire time in 'set' command");
                        return Some((ClusterReply::Write, Routed::Now(Response::Error(err))));
                    }
                }
            } else {
                None
            };
            let set = Request::Set {
                key: args[1].clone(),
                value: args[2].clone(),
                ttl_ms,
                condition: Condition::Always,
                hint: 0,
            };
            (ClusterReply::Write, set)
        }
        "SET" => return refuse("only SET key value [EX s|PX ms] on a clustered node"),
        "DEL" | "UNLINK" if n >= 2 => (ClusterReply::Write, Request::Del { keys: args[1..].to_vec() }),
        "EXISTS" if n >= 2 => (ClusterReply::Write, Request::Exists { keys: args[1..].to_vec() }),
        "MGET" if n >= 2 => (ClusterReply::Values, Request::MGet { keys: args[1..].to_vec() }),
        "MSET" if n >= 3 && n % 2 == 1 => {
            let pairs = args[1..].chunks(2).map(|p| (p[0].clone(), p[1].clone())).collect();
            (ClusterReply::Write, Request::MSet { pairs })
        }
        "TTL" if n == 2 => (ClusterReply::Ttl { millis: false }, Request::Ttl { key: args[1].clone() }),
        "PTTL" if n == 2 => (ClusterReply::Ttl { millis: true }, Request::Ttl { key: args[1].clone() }),
        "APPEND" | "INCR" | "INCRBY" | "DECR" | "DECRBY" | "GETDEL" | "GETEX" | "PERSIST" | "EXPIRE" | "PEXPIRE"
        | "STRLEN" | "FLUSHALL" | "FLUSHDB" | "DBSIZE" | "SETNX" | "SETEX" | "PSETEX" => {
            return refuse(&format!("{name} is not supported on a clustered node yet"));
        }
        _ => return None,
    };
    cluster.route(node, &request, None).map(|routed| (kind, routed))
}

/// How to write a clustered command's reply.
#[derive(Clone, Copy, Debug)]
pub enum ClusterReply {
    /// A bulk string or null (GET).
    Get,
    /// OK or a count (SET, MSET, DEL, EXISTS).
    Write,
    /// An array (MGET).
    Values,
    /// A TTL in seconds or milliseconds, Redis's -2/-1 included.
    Ttl {
        /// PTTL.
        millis: bool,
    },
}

/// Writes a clustered command's reply.
pub fn cluster_reply(session: &Session, kind: ClusterReply, response: Response, out: &mut BytesMut) {
    match (kind, response) {
        (ClusterReply::Get, response) => get_reply(session, response, out),
        (ClusterReply::Values, Response::Values(values)) => {
            let mut w = Writer::new(out, session.resp3);
            w.array(values.len());
            for v in values {
                w.bulk_or_null(v.as_deref());
            }
        }
        (ClusterReply::Ttl { millis }, Response::Ttl(state)) => {
            let mut w = Writer::new(out, session.resp3);
            match state {
                TtlState::Missing => w.integer(-2),
                TtlState::Persistent => w.integer(-1),
                TtlState::Remaining(ms) if millis => w.integer(ms as i64),
                TtlState::Remaining(ms) => w.integer(((ms + 500) / 1000) as i64),
            }
        }
        (_, response) => write_reply(session, response, out),
    }
}

fn refusal(message: &str) -> Routed {
    Routed::Now(Response::Error(ErrorReply::new(ErrorCode::NotAllowed, message.trim_start_matches("ERR "))))
}

/// Commands that change their key (`args[1]`), refused for keys written
/// to an origin unless [`origin_write`] took them.
const WRITES: &[&str] =
    &["SET", "DEL", "APPEND", "INCR", "INCRBY", "DECR", "DECRBY", "GETDEL", "GETEX", "PERSIST", "EXPIRE", "PEXPIRE"];

/// Writes the reply to a SET or DEL the loaders ran.
pub fn write_reply(session: &Session, response: Response, out: &mut BytesMut) {
    let mut w = Writer::new(out, session.resp3);
    match response {
        Response::Ok => w.simple("OK"),
        Response::Count(n) => w.integer(n as i64),
        other => unexpected(&mut w, other),
    }
}

/// Writes the reply to a GET.
pub fn get_reply(session: &Session, response: Response, out: &mut BytesMut) {
    let mut w = Writer::new(out, session.resp3);
    match response {
        Response::Value(v) => w.bulk_or_null(v.as_deref()),
        other => unexpected(&mut w, other),
    }
}

fn unexpected(w: &mut Writer<'_>, response: Response) {
    match response {
        Response::Error(err) => node_error(w, &err),
        other => w.error(&format!("ERR unexpected reply {other:?}")),
    }
}

fn count(node: &Node, w: &mut Writer<'_>, request: Request) {
    match node.execute(request) {
        Response::Count(n) => w.integer(n as i64),
        other => unexpected(w, other),
    }
}

fn incr(node: &Node, w: &mut Writer<'_>, key: &Bytes, delta: i64) {
    match node.execute(Request::Incr { key: key.clone(), delta }) {
        Response::Integer(n) => w.integer(n),
        other => unexpected(w, other),
    }
}

/// Milliseconds from now until a Unix time in milliseconds (at least 1, so
/// a time in the past expires the key at once).
fn until_unix_ms(at: i64) -> u64 {
    let now = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0);
    at.saturating_sub(now).max(1) as u64
}

/// Parses an expiry option (`EX s`, `PX ms`, `EXAT s`, `PXAT ms`) at
/// `args[i]`; `Err` carries the error text.
fn expiry(option: &str, value: Option<&Bytes>, command: &str) -> Result<u64, String> {
    let invalid = || format!("ERR invalid expire time in '{command}' command");
    let v = value.and_then(|v| parse_i64(v)).ok_or_else(|| WRONG_INT.to_string())?;
    if v <= 0 {
        return Err(invalid());
    }
    match option {
        "EX" => v.checked_mul(1000).map(|ms| ms as u64).ok_or_else(invalid),
        "PX" => Ok(v as u64),
        "EXAT" => v.checked_mul(1000).map(until_unix_ms).ok_or_else(invalid),
        _ => Ok(until_unix_ms(v)),
    }
}

fn set(node: &Node, w: &mut Writer<'_>, args: &[Bytes]) {
    let (key, value) = (&args[1], &args[2]);
    let (mut ttl_ms, mut condition, mut keep_ttl, mut get) = (None, Condition::Always, false, false);
    let mut i = 3;
    while i < args.len() {
        let option = upper(&args[i]);
        match option.as_str() {
            "NX" if condition == Condition::Always => condition = Condition::IfAbsent,
            "XX" if condition == Condition::Always => condition = Condition::IfPresent,
            "KEEPTTL" if ttl_ms.is_none() => keep_ttl = true,
            "GET" => get = true,
            "EX" | "PX" | "EXAT" | "PXAT" if ttl_ms.is_none() && !keep_ttl => {
                match expiry(&option, args.get(i + 1), "set") {
                    Ok(ms) => ttl_ms = Some(ms),
                    Err(message) => return w.error(&message),
                }
                i += 1;
            }
            _ => return w.error(SYNTAX),
        }
        i += 1;
    }
    if !get && !keep_ttl {
        let request = Request::Set { key: key.clone(), value: value.clone(), ttl_ms, condition, hint: 0 };
        return match node.execute(request) {
            Response::Ok | Response::Applied(true) => w.simple("OK"),
            Response::Applied(false) => w.null(),
            other => unexpected(w, other),
        };
    }
    let result = node.with_shard(key, |shard, now| {
        let old = if get { shard.get(now, key) } else { None };
        let present = if get { old.is_some() } else { shard.contains(now, key) };
        let applies = match condition {
            Condition::Always => true,
            Condition::IfAbsent => !present,
            Condition::IfPresent => present,
        };
        let outcome = if applies {
            let options = SetOptions { ttl_ms, keep_ttl, hint: 0 };
            Some(shard.set(now, key, value.clone(), options)?)
        } else {
            None
        };
        Ok::<_, crate::core::ShardError>((old, outcome))
    });
    match result {
        Err(err) => w.error(&format!("ERR {err}")),
        Ok((old, _)) if get => w.bulk_or_null(old.as_deref()),
        Ok((_, Some(SetOutcome::Inserted | SetOutcome::Updated | SetOutcome::NotAdmitted))) => w.simple("OK"),
        Ok((_, None)) => w.null(),
    }
}

fn getex(node: &Node, w: &mut Writer<'_>, args: &[Bytes]) {
    let key = &args[1];
    // None: leave the TTL; Some(None): PERSIST; Some(Some(ms)): new TTL.
    let change: Option<Option<u64>> = match args.len() {
        2 => None,
        3 if upper(&args[2]) == "PERSIST" => Some(None),
        4 => {
            let option = upper(&args[2]);
            if !["EX", "PX", "EXAT", "PXAT"].contains(&option.as_str()) {
                return w.error(SYNTAX);
            }
            match expiry(&option, args.get(3), "getex") {
                Ok(ms) => Some(Some(ms)),
                Err(message) => return w.error(&message),
            }
        }
        _ => return w.error(SYNTAX),
    };
    let value = node.with_shard(key, |shard, now| {
        let value = shard.get(now, key);
        if value.is_some() {
            match change {
                Some(Some(ms)) => {
                    shard.expire(now, key, ms);
                }
                Some(None) => {
                    shard.persist(now, key);
                }
                None => {}
            }
        }
        value
    });
    w.bulk_or_null(value.as_deref());
}

fn client(session: &mut Session, w: &mut Writer<'_>, args: &[Bytes]) {
    match upper(&args[1]).as_str() {
        "SETNAME" if args.len() == 3 => {
            if args[2].iter().any(|&b| b == b' ' || b == b'\n') {
                return w.error("ERR Client names cannot contain spaces, newlines or special characters.");
            }
            session.name = (!args[2].is_empty()).then(|| args[2].clone());
            w.simple("OK");
        }
        "GETNAME" if args.len() == 2 => w.bulk_or_null(session.name.as_deref()),
        "ID" if args.len() == 2 => w.integer(session.id as i64),
        // Client libraries announce themselves; accepted and ignored.
        "SETINFO" => w.simple("OK"),
        _ => w.error(&format!(
            "ERR unknown subcommand '{}'. Try CLIENT SETNAME, GETNAME or ID.",
            String::from_utf8_lossy(&args[1])
        )),
    }
}

/// `AUTH` and `HELLO ... AUTH`: signs the session in as `user`, or the
/// error reply's text. Failures are counted and logged at a bounded rate;
/// after [`MAX_FAILED_AUTHS`] the connection is closed.
fn authenticate(
    node: &Node,
    session: &mut Session,
    info: &ServerInfo,
    user: &[u8],
    password: &[u8],
) -> Result<(), &'static str> {
    let Some(acl) = &info.acl else {
        return Err("ERR AUTH <password> called without any password configured for the default user. Are you sure \
                    your configuration is correct?");
    };
    let name = String::from_utf8_lossy(user);
    match acl.authenticate(&name, password) {
        Some(found) => {
            session.user = Some(found);
            Ok(())
        }
        None => {
            session.failed_auths += 1;
            node.clients().count_auth_failure();
            if let Some(held_back) = node.clients().auth_log.check(node.now_ms()) {
                tracing::warn!(user = %name.escape_debug(), connection = session.id, held_back, "RESP AUTH failed");
            }
            if session.failed_auths >= MAX_FAILED_AUTHS {
                session.quit = true;
            }
            Err("WRONGPASS invalid username-password pair or user is disabled.")
        }
    }
}

fn hello(node: &Node, session: &mut Session, info: &ServerInfo, w: &mut Writer<'_>, args: &[Bytes]) {
    let mut version = None;
    if let Some(text) = args.get(1) {
        match parse_i64(text) {
            Some(v @ (2 | 3)) => version = Some(v == 3),
            Some(_) => return w.error("NOPROTO unsupported protocol version"),
            None => return w.error("ERR Protocol version is not an integer or out of range"),
        }
    }
    let (mut name, mut auth) = (None, None);
    let mut i = 2;
    while i < args.len() {
        match upper(&args[i]).as_str() {
            "SETNAME" if i + 1 < args.len() => {
                name = Some(args[i + 1].clone());
                i += 2;
            }
            "AUTH" if i + 2 < args.len() => {
                auth = Some((args[i + 1].clone(), args[i + 2].clone()));
                i += 3;
            }
            _ => return w.error(SYNTAX),
        }
    }
    // Signing in comes first: a HELLO that fails it changes nothing.
    if let Some((user, password)) = auth {
        if let Err(message) = authenticate(node, session, info, &user, &password) {
            return w.error(message);
        }
    } else if info.acl.is_some() && session.user.is_none() {
        return w.error(Denied::NoAuth.to_string().as_str());
    }
    if let Some(resp3) = version {
        session.resp3 = resp3;
    }
    if name.is_some() {
        session.name = name;
    }
    // Writer was created before the switch: make one in the new version.
    let mut out = BytesMut::new();
    let mut hw = Writer::new(&mut out, session.resp3);
    hw.map(7);
    hw.bulk(b"server");
    hw.bulk(b"cachet");
    hw.bulk(b"version");
    hw.bulk(env!("CARGO_PKG_VERSION").as_bytes());
    hw.bulk(b"proto");
    hw.integer(if session.resp3 { 3 } else { 2 });
    hw.bulk(b"id");
    hw.integer(session.id as i64);
    hw.bulk(b"mode");
    hw.bulk(b"standalone");
    hw.bulk(b"role");
    hw.bulk(b"master");
    hw.bulk(b"modules");
    hw.array(0);
    w.raw(&out);
}

/// INFO text in Redis's layout (`# Section` headers, `key:value` lines).
fn info_text(node: &Node, info: &ServerInfo, section: Option<String>) -> String {
    let stats = node.stats();
    let want = |s: &str| match section.as_deref() {
        None | Some("ALL") | Some("EVERYTHING") | Some("DEFAULT") => true,
        Some(asked) => asked == s,
    };
    let mut text = String::new();
    if want("SERVER") {
        text.push_str(&format!(
            "# Server\r\nredis_version:7.0.0\r\ncachet_version:{}\r\nredis_mode:standalone\r\nprocess_id:{}\r\ntcp_port:{}\r\nuptime_in_seconds:{}\r\nuptime_in_days:{}\r\n\r\n",
            env!("CARGO_PKG_VERSION"),
            std::process::id(),
            info.port,
            stats.uptime_secs,
            stats.uptime_secs / 86_400
        ));
    }
    if want("CLIENTS") {
        text.push_str(&format!("# Clients\r\nconnected_clients:{}\r\n\r\n", stats.connections));
    }
    if want("MEMORY") {
        text.push_str(&format!(
            "# Memory\r\nused_memory:{}\r\nused_memory_human:{:.2}M\r\nused_memory_dataset:{}\r\nmaxmemory:{}\r\nmaxmemory_human:{:.2}M\r\nmaxmemory_policy:cachet-{}\r\n\r\n",
            stats.bytes,
            stats.bytes as f64 / (1 << 20) as f64,
            stats.bytes,
            stats.max_bytes,
            stats.max_bytes as f64 / (1 << 20) as f64,
            stats.policy
        ));
    }
    if want("STATS") {
        text.push_str(&format!(
            "# Stats\r\nkeyspace_hits:{}\r\nkeyspace_misses:{}\r\nevicted_keys:{}\r\nexpired_keys:{}\r\n\r\n",
            stats.hits,
            stats.misses,
            stats.evictions,
            stats.expired + stats.policy_expired
        ));
    }
    if want("KEYSPACE") {
        text.push_str("# Keyspace\r\n");
        if stats.entries > 0 {
            text.push_str(&format!("db0:keys={},expires={},avg_ttl=0\r\n", stats.entries, node.expiring()));
        }
        text.push_str("\r\n");
    }
    text
}
