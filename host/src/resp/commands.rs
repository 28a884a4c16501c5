//! Redis commands: each is parsed once, into the same [`Request`] the QUIC
//! port carries (with the shape of its RESP reply), and handed to the
//! node's dispatcher ([`Node::dispatch`]), which routes it (cluster,
//! loaders, store) as it routes every request; or, for what only RESP has
//! (HELLO, AUTH, CLIENT, INFO, ...), answered here. Replies and error
//! texts follow Redis, so its clients and tools work.

use super::acl::Denied;
use super::codec::Writer;
pub use super::reply::{Parsed, Reply};
pub use super::session::{MAX_FAILED_AUTHS, ServerInfo, Session, StatsBase};
use crate::node::Node;
use bytes::{Bytes, BytesMut};
use cachet_proto::{Condition, ErrorCode, ErrorReply, ExpireIf, Request, Response, TtlChange, TtlState};
use std::time::{SystemTime, UNIX_EPOCH};

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

const WRONG_INT: &str = "ERR value is not an integer or out of range";

/// EXPIRE's options (NX, XX, GT, LT; repeated ones allowed, as Redis
/// does), with Redis's error texts.
fn expire_if(options: &[Bytes]) -> Result<ExpireIf, String> {
    let (mut nx, mut xx, mut gt, mut lt) = (false, false, false, false);
    for option in options {
        match upper(option).as_str() {
            "NX" => nx = true,
            "XX" => xx = true,
            "GT" => gt = true,
            "LT" => lt = true,
            _ => return Err(format!("ERR Unsupported option {}", String::from_utf8_lossy(option))),
        }
    }
    if nx && (xx || gt || lt) {
        return Err("ERR NX and XX, GT or LT options at the same time are not compatible".into());
    }
    if gt && lt {
        return Err("ERR GT and LT options at the same time are not compatible".into());
    }
    Ok(match (nx, xx, gt, lt) {
        (true, ..) => ExpireIf::NoTtl,
        (_, _, true, _) => ExpireIf::Later,
        (_, true, _, true) => ExpireIf::SoonerWithTtl,
        (_, false, _, true) => ExpireIf::Sooner,
        (_, true, ..) => ExpireIf::HasTtl,
        _ => ExpireIf::Always,
    })
}
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

/// Parses a data command (`args[0]` is its name) into its request;
/// [`Parsed::Local`] for every other command, and for a data command with
/// the wrong number of arguments (answered by [`execute_local`]).
pub fn parse(args: &[Bytes]) -> Parsed {
    let Some(first) = args.first() else { return Parsed::Local };
    let n = args.len();
    let key = || args[1].clone();
    // Most traffic is plain GET: no upper-cased name.
    if n == 2 && first.eq_ignore_ascii_case(b"GET") {
        return Parsed::Data(Request::Get { key: key() }, Reply::Bulk);
    }
    let name = upper(first);
    let data = |request, reply| Parsed::Data(request, reply);
    match name.as_str() {
        "SET" if n >= 3 => parse_set(args),
        "DEL" | "UNLINK" if n >= 2 => data(Request::Del { keys: args[1..].to_vec() }, Reply::Write),
        "EXISTS" if n >= 2 => data(Request::Exists { keys: args[1..].to_vec() }, Reply::Write),
        "EXPIRE" | "PEXPIRE" if n >= 3 => {
            let scale = if name == "EXPIRE" { 1000 } else { 1 };
            let when = match expire_if(&args[3..]) {
                Ok(when) => when,
                Err(message) => return Parsed::Invalid(message),
            };
            match parse_i64(&args[2]).and_then(|t| t.checked_mul(scale)) {
                Some(ms) => data(Request::Expire { key: key(), ttl_ms: ms.max(0) as u64, when }, Reply::Flag),
                None => Parsed::Invalid(format!("ERR invalid expire time in '{}' command", name.to_ascii_lowercase())),
            }
        }
        "TTL" | "PTTL" if n == 2 => data(Request::Ttl { key: key() }, Reply::Ttl { millis: name == "PTTL" }),
        "PERSIST" if n == 2 => data(Request::Persist { key: key() }, Reply::Flag),
        "MGET" if n >= 2 => data(Request::MGet { keys: args[1..].to_vec() }, Reply::Values),
        "MSET" if n >= 3 && n % 2 == 1 => {
            let pairs = args[1..].chunks(2).map(|p| (p[0].clone(), p[1].clone())).collect();
            data(Request::MSet { pairs }, Reply::Write)
        }
        "INCR" | "DECR" if n == 2 => {
            data(Request::Incr { key: key(), delta: if name == "INCR" { 1 } else { -1 } }, Reply::Integer)
        }
        "INCRBY" | "DECRBY" if n == 3 => match parse_i64(&args[2]) {
            Some(by) if name == "INCRBY" => data(Request::Incr { key: key(), delta: by }, Reply::Integer),
            Some(by) => match by.checked_neg() {
                Some(by) => data(Request::Incr { key: key(), delta: by }, Reply::Integer),
                None => Parsed::Invalid("ERR decrement would overflow".into()),
            },
            None => Parsed::Invalid(WRONG_INT.into()),
        },
        "APPEND" if n == 3 => data(Request::Append { key: key(), value: args[2].clone() }, Reply::Integer),
        "STRLEN" if n == 2 => data(Request::Strlen { key: key() }, Reply::Integer),
        // Redis's older string commands, as the SET options they are.
        "SETNX" if n == 3 => {
            let request = Request::Set {
                key: key(),
                value: args[2].clone(),
                ttl_ms: None,
                condition: Condition::IfAbsent,
                hint: 0,
            };
            data(request, Reply::Flag)
        }
        "SETEX" | "PSETEX" if n == 4 => {
            let option = if name == "SETEX" { "EX" } else { "PX" };
            match expiry(option, args.get(2), &name.to_ascii_lowercase()) {
                Ok(ms) => {
                    let (value, condition) = (args[3].clone(), Condition::Always);
                    data(Request::Set { key: key(), value, ttl_ms: Some(ms), condition, hint: 0 }, Reply::Write)
                }
                Err(message) => Parsed::Invalid(message),
            }
        }
        "GETSET" if n == 3 => {
            let (value, condition) = (args[2].clone(), Condition::Always);
            let request =
                Request::SetWith { key: key(), value, ttl_ms: None, keep_ttl: false, condition, get: true, hint: 0 };
            data(request, Reply::Bulk)
        }
        "GETRANGE" | "SUBSTR" if n == 4 => match (parse_i64(&args[2]), parse_i64(&args[3])) {
            (Some(start), Some(end)) => data(Request::Get { key: key() }, Reply::Range { start, end }),
            _ => Parsed::Invalid(WRONG_INT.into()),
        },
        "EXPIREAT" | "PEXPIREAT" if n >= 3 => {
            let scale = if name == "EXPIREAT" { 1000 } else { 1 };
            let when = match expire_if(&args[3..]) {
                Ok(when) => when,
                Err(message) => return Parsed::Invalid(message),
            };
            match parse_i64(&args[2]).and_then(|t| t.checked_mul(scale)) {
                // A time in the past deletes the key, as a negative EXPIRE does.
                Some(at) => data(Request::Expire { key: key(), ttl_ms: until_unix_ms_or_now(at), when }, Reply::Flag),
                None => Parsed::Invalid(WRONG_INT.into()),
            }
        }
        "EXPIRETIME" | "PEXPIRETIME" if n == 2 => {
            data(Request::Ttl { key: key() }, Reply::ExpireTime { millis: name == "PEXPIRETIME" })
        }
        // The policy sees an EXISTS as no access: TOUCH counts keys, as
        // Redis does, without refreshing them.
        "TOUCH" if n >= 2 => data(Request::Exists { keys: args[1..].to_vec() }, Reply::Write),
        "TYPE" if n == 2 => data(Request::Exists { keys: vec![key()] }, Reply::Type),
        "GETDEL" if n == 2 => data(Request::GetDel { key: key() }, Reply::Bulk),
        "GETEX" if n >= 2 => parse_getex(args),
        "DBSIZE" if n == 1 => data(Request::DbSize, Reply::Write),
        "FLUSHALL" | "FLUSHDB" if n <= 2 => data(Request::FlushAll, Reply::Ok),
        "MSETNX" if n >= 3 && n % 2 == 1 => {
            let pairs = args[1..].chunks(2).map(|p| (p[0].clone(), p[1].clone())).collect();
            data(Request::MSetNx { pairs }, Reply::Flag)
        }
        "RENAME" | "RENAMENX" if n == 3 => {
            let only_if_absent = name == "RENAMENX";
            let request = Request::Rename { from: key(), to: args[2].clone(), only_if_absent };
            data(request, if only_if_absent { Reply::Flag } else { Reply::Write })
        }
        "COPY" if n >= 3 => parse_copy(args),
        "KEYS" if n == 2 => data(Request::Keys { pattern: key() }, Reply::Values),
        "SCAN" if n >= 2 => parse_scan(args),
        "RANDOMKEY" if n == 1 => data(Request::RandomKey, Reply::Bulk),
        _ => super::strings::parse(&name, args).unwrap_or(Parsed::Local),
    }
}

fn parse_set(args: &[Bytes]) -> Parsed {
    let (key, value) = (args[1].clone(), args[2].clone());
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
                    Err(message) => return Parsed::Invalid(message),
                }
                i += 1;
            }
            _ => return Parsed::Invalid(SYNTAX.into()),
        }
        i += 1;
    }
    if !get && !keep_ttl {
        return Parsed::Data(Request::Set { key, value, ttl_ms, condition, hint: 0 }, Reply::Write);
    }
    let request = Request::SetWith { key, value, ttl_ms, keep_ttl, condition, get, hint: 0 };
    Parsed::Data(request, if get { Reply::Bulk } else { Reply::Write })
}

/// COPY source destination [DB 0] [REPLACE]: one database here.
fn parse_copy(args: &[Bytes]) -> Parsed {
    let mut replace = false;
    let mut i = 3;
    while i < args.len() {
        match upper(&args[i]).as_str() {
            "REPLACE" => replace = true,
            "DB" if i + 1 < args.len() => {
                if parse_i64(&args[i + 1]) != Some(0) {
                    return Parsed::Invalid("ERR DB index is out of range".into());
                }
                i += 1;
            }
            _ => return Parsed::Invalid(SYNTAX.into()),
        }
        i += 1;
    }
    let request = Request::Copy { from: args[1].clone(), to: args[2].clone(), replace };
    Parsed::Data(request, Reply::Flag)
}

/// SCAN cursor [MATCH pattern] [COUNT n] [TYPE type].
fn parse_scan(args: &[Bytes]) -> Parsed {
    let Some(cursor) = std::str::from_utf8(&args[1]).ok().and_then(|c| c.parse::<u64>().ok()) else {
        return Parsed::Invalid("ERR invalid cursor".into());
    };
    let (mut pattern, mut count, mut none) = (None, crate::store::SCAN_COUNT, false);
    let mut i = 2;
    while i < args.len() {
        let Some(value) = args.get(i + 1) else { return Parsed::Invalid(SYNTAX.into()) };
        match upper(&args[i]).as_str() {
            "MATCH" => pattern = Some(value.clone()),
            "COUNT" => match parse_i64(value).and_then(|c| u32::try_from(c).ok()).filter(|c| *c > 0) {
                Some(c) => count = c,
                None if parse_i64(value).is_some() => return Parsed::Invalid(SYNTAX.into()),
                None => return Parsed::Invalid(WRONG_INT.into()),
            },
            "TYPE" => none = !value.eq_ignore_ascii_case(b"string"),
            _ => return Parsed::Invalid(SYNTAX.into()),
        }
        i += 2;
    }
    Parsed::Data(Request::Scan { cursor, pattern, count }, Reply::Scan { none })
}

fn parse_getex(args: &[Bytes]) -> Parsed {
    let ttl = match args.len() {
        2 => TtlChange::Keep,
        3 if upper(&args[2]) == "PERSIST" => TtlChange::Persist,
        4 => {
            let option = upper(&args[2]);
            if !["EX", "PX", "EXAT", "PXAT"].contains(&option.as_str()) {
                return Parsed::Invalid(SYNTAX.into());
            }
            match expiry(&option, args.get(3), "getex") {
                Ok(ms) => TtlChange::Set(ms),
                Err(message) => return Parsed::Invalid(message),
            }
        }
        _ => return Parsed::Invalid(SYNTAX.into()),
    };
    Parsed::Data(Request::GetEx { key: args[1].clone(), ttl }, Reply::Bulk)
}

/// Writes a data command's reply in the shape its command asks for.
pub fn write_response(session: &Session, reply: Reply, response: Response, out: &mut BytesMut) {
    let mut w = Writer::new(out, session.resp3);
    match (reply, response) {
        (_, Response::Error(err)) => node_error(&mut w, &err),
        (Reply::Bulk, Response::Value(v)) => w.bulk_or_null(v.as_deref()),
        (Reply::Write | Reply::Ok, Response::Ok | Response::Applied(true)) => w.simple("OK"),
        (Reply::Write, Response::Applied(false)) => w.null(),
        (Reply::Write | Reply::Integer, Response::Count(n)) => w.integer(n as i64),
        (Reply::Ok, Response::Count(_)) => w.simple("OK"),
        (Reply::Flag, Response::Applied(done)) => w.integer(i64::from(done)),
        (Reply::Flag, Response::Ok) => w.integer(1),
        (Reply::Range { start, end }, Response::Value(v)) => {
            w.bulk(range(v.as_deref().unwrap_or_default(), start, end))
        }
        (Reply::ExpireTime { millis }, Response::Ttl(state)) => match state {
            TtlState::Missing => w.integer(-2),
            TtlState::Persistent => w.integer(-1),
            TtlState::Remaining(ms) => {
                let at = unix_ms().saturating_add(ms as i64);
                w.integer(if millis { at } else { (at + 500) / 1000 })
            }
        },
        (Reply::Type, Response::Count(n)) => w.simple(if n > 0 { "string" } else { "none" }),
        (Reply::Strings(reply), response) => super::strings::write(&mut w, reply, response),
        (Reply::Scan { none }, Response::Scan { cursor, keys }) => {
            w.array(2);
            w.bulk(cursor.to_string().as_bytes());
            let keys = if none { &[][..] } else { &keys[..] };
            w.array(keys.len());
            for key in keys {
                w.bulk(key);
            }
        }
        (Reply::Integer, Response::Integer(n)) => w.integer(n),
        (Reply::Values, Response::Values(values)) => {
            w.array(values.len());
            for v in &values {
                w.bulk_or_null(v.as_deref());
            }
        }
        (Reply::Ttl { millis }, Response::Ttl(state)) => match state {
            TtlState::Missing => w.integer(-2),
            TtlState::Persistent => w.integer(-1),
            TtlState::Remaining(ms) if millis => w.integer(ms as i64),
            TtlState::Remaining(ms) => w.integer(((ms + 500) / 1000) as i64),
        },
        (_, other) => w.error(&format!("ERR unexpected reply {other:?}")),
    }
}

/// Writes the reply to a plain SET (the port's fast path).
pub fn write_reply(session: &Session, response: Response, out: &mut BytesMut) {
    write_response(session, Reply::Write, response, out);
}

/// Runs a command the port answers itself (`args[0]` is its name) and
/// writes its reply to `out`: connection state, introspection, and the
/// arity and unknown-command errors. An empty command (`*0`) writes
/// nothing.
pub fn execute_local(node: &Node, session: &mut Session, info: &ServerInfo, args: Vec<Bytes>, out: &mut BytesMut) {
    let Some(first) = args.first() else {
        return;
    };
    let mut w = Writer::new(out, session.resp3);
    let name = upper(first);
    let n = args.len();
    match name.as_str() {
        "PING" => match n {
            1 => w.simple("PONG"),
            2 => w.bulk(&args[1]),
            _ => arity(&mut w, &name),
        },
        "ECHO" if n == 2 => w.bulk(&args[1]),
        "TIME" if n == 1 => {
            let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default();
            w.array(2);
            w.bulk(now.as_secs().to_string().as_bytes());
            w.bulk(now.subsec_micros().to_string().as_bytes());
        }
        "INFO" => {
            let sections: Vec<String> = args[1..].iter().map(|s| upper(s)).collect();
            w.text(&super::introspection::info_text(node, info, &sections));
        }
        "SELECT" if n == 2 => match parse_i64(&args[1]) {
            Some(0) => w.simple("OK"),
            Some(_) => w.error("ERR DB index is out of range"),
            None => w.error(WRONG_INT),
        },
        "CLIENT" if n >= 2 => client(session, &mut w, &args),
        "CLUSTER" => super::cluster::cluster(node, &mut w, &args),
        "READONLY" | "READWRITE" | "ASKING" if n == 1 => {
            if super::cluster::enabled(node) {
                match name.as_str() {
                    "READONLY" => session.readonly = true,
                    "READWRITE" => session.readonly = false,
                    _ => {}
                }
            }
            super::cluster::connection(node, &mut w);
        }
        "HELLO" => hello(node, session, info, &mut w, &args),
        "COMMAND" => super::command_table::command(&mut w, &args),
        "CONFIG" if n >= 2 => match upper(&args[1]).as_str() {
            "GET" if n >= 3 => super::introspection::config_get(node, info, &mut w, &args[2..]),
            "RESETSTAT" if n == 2 => {
                super::introspection::reset_stats(node, info);
                w.simple("OK");
            }
            // CONFIG SET runs off the I/O thread (see `resp::serve_until_done`).
            // Settings are taken at start (flags, --config): a write that
            // would change nothing is refused, not acknowledged.
            "REWRITE" => w.error(&format!(
                "ERR CONFIG {} is not supported: Cachet takes its settings at start (flags or --config)",
                upper(&args[1])
            )),
            "GET" => arity(&mut w, "config|get"),
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
        _ if super::command_table::find(name.as_bytes()).is_some() => arity(&mut w, &name),
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

fn unix_ms() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0)
}

/// Milliseconds from now until a Unix time in milliseconds (at least 1, so
/// a time in the past expires the key at once).
fn until_unix_ms(at: i64) -> u64 {
    at.saturating_sub(unix_ms()).max(1) as u64
}

/// [`until_unix_ms`], but 0 for a time not in the future: EXPIREAT in the
/// past deletes the key at once (and answers whether it was there).
fn until_unix_ms_or_now(at: i64) -> u64 {
    at.saturating_sub(unix_ms()).max(0) as u64
}

/// GETRANGE's slice of `value`: negative indexes count from the end, both
/// are clamped to the value, and an empty range is empty.
fn range(value: &[u8], start: i64, end: i64) -> &[u8] {
    let len = value.len() as i64;
    if len == 0 {
        return &[];
    }
    let from_end = |i: i64| if i < 0 { (len + i).max(0) } else { i };
    let (start, end) = (from_end(start), from_end(end).min(len - 1));
    if start > end {
        return &[];
    }
    &value[start as usize..=end as usize]
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
