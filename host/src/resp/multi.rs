//! MULTI, EXEC, DISCARD, WATCH and UNWATCH, as Redis runs them.
//!
//! After MULTI each command is checked (name, arity, syntax, and whether
//! this node can make it part of a transaction) and queued, answered
//! `QUEUED`; one that fails the check is answered with its error and
//! makes EXEC discard the whole transaction (`EXECABORT`), so nothing of a
//! transaction a client got wrong is applied. EXEC runs the data commands
//! as one transaction on the store (`store::transaction`: every shard they
//! touch locked at once, so no other client's command runs between them)
//! and answers an array with every command's reply in order; a command
//! that fails at run time (a value too large, INCR of a non-number) has
//! its error in its place, and the others run, as in Redis. With WATCH,
//! EXEC runs nothing and answers a null array when a watched key changed
//! since it was watched.
//!
//! Where the node cannot make a transaction atomic (a cluster; keys a
//! loader fills) the commands are refused at queue time and EXEC aborts,
//! rather than running them one by one. redis-py's default `pipeline()`
//! is a MULTI/EXEC transaction.

use super::codec::Writer;
use super::commands::{self, Parsed, Reply, ServerInfo, Session};
use super::session::{Multi, Queued};
use crate::node::Node;
use bytes::{Bytes, BytesMut};
use cachet_proto::Request;

/// Bytes of arguments one transaction may queue: beyond, the transaction
/// is discarded (memory stays bounded whatever a client sends).
pub const MAX_QUEUED_BYTES: usize = 64 << 20;

/// Commands one transaction may queue: a transaction holds its shards'
/// locks while it runs, so its length bounds how long other clients wait.
pub const MAX_QUEUED: usize = 100_000;

/// Keys one connection may watch at once.
pub const MAX_WATCHED: usize = 100_000;

/// Commands that change how the connection speaks or who it is: not
/// inside a transaction, whose replies form one array.
/// CONFIG too: CONFIG SET may swap the policy, which must not run on the
/// I/O thread where EXEC runs the port's own commands.
const NOT_IN_MULTI: &[&str] = &["HELLO", "AUTH", "RESET", "SUBSCRIBE", "PSUBSCRIBE", "SSUBSCRIBE", "MONITOR", "CONFIG"];

/// Handles `args` if it is a transaction command or comes inside a MULTI;
/// returns whether it did. Everything else is left to the ordinary path.
pub fn handle(node: &Node, session: &mut Session, info: &ServerInfo, args: &[Bytes], out: &mut BytesMut) -> bool {
    let Some(first) = args.first() else { return false };
    let name = String::from_utf8_lossy(first).to_ascii_uppercase();
    let in_multi = session.multi.is_some();
    if !in_multi && !matches!(name.as_str(), "MULTI" | "EXEC" | "DISCARD" | "WATCH" | "UNWATCH") {
        return false;
    }
    let resp3 = session.resp3;
    match name.as_str() {
        "MULTI" if args.len() != 1 => {
            Writer::new(out, resp3).error("ERR wrong number of arguments for 'multi' command")
        }
        "MULTI" if in_multi => Writer::new(out, resp3).error("ERR MULTI calls can not be nested"),
        "MULTI" => {
            session.multi = Some(Multi::default());
            Writer::new(out, resp3).simple("OK");
        }
        "EXEC" if !in_multi => Writer::new(out, resp3).error("ERR EXEC without MULTI"),
        "DISCARD" if !in_multi => Writer::new(out, resp3).error("ERR DISCARD without MULTI"),
        "EXEC" => exec(node, session, info, out),
        "DISCARD" => {
            session.multi = None;
            session.watched = Default::default();
            Writer::new(out, resp3).simple("OK");
        }
        "WATCH" if in_multi => Writer::new(out, resp3).error("ERR WATCH inside MULTI is not allowed"),
        "WATCH" if args.len() < 2 => Writer::new(out, resp3).error("ERR wrong number of arguments for 'watch' command"),
        "WATCH"
            if session.watched.len() + args.len() - 1 > MAX_WATCHED
                || session.watched.bytes() + args[1..].iter().map(Bytes::len).sum::<usize>() > MAX_QUEUED_BYTES =>
        {
            Writer::new(out, resp3).error(&format!(
                "ERR a connection may watch at most {MAX_WATCHED} keys and {MAX_QUEUED_BYTES} bytes of keys"
            ));
        }
        "WATCH" => match node.watch(&args[1..], &mut session.watched) {
            Ok(()) => Writer::new(out, resp3).simple("OK"),
            Err(why) => Writer::new(out, resp3).error(&format!("ERR {why}")),
        },
        "UNWATCH" if !in_multi => {
            session.watched = Default::default();
            Writer::new(out, resp3).simple("OK");
        }
        _ => queue(node, session, args, &name, out),
    }
    true
}

/// A command inside MULTI: checked and queued, or refused (and the
/// transaction with it).
fn queue(node: &Node, session: &mut Session, args: &[Bytes], name: &str, out: &mut BytesMut) {
    let mut w = Writer::new(out, session.resp3);
    let Some(multi) = session.multi.as_mut() else { return };
    let size: usize = args.iter().map(|a| a.len() + 16).sum();
    let refusal = if NOT_IN_MULTI.contains(&name) {
        Some("ERR Command not allowed inside a transaction".to_string())
    } else if multi.bytes + size > MAX_QUEUED_BYTES || multi.queued.len() >= MAX_QUEUED {
        Some(format!("ERR a transaction may queue at most {MAX_QUEUED} commands and {MAX_QUEUED_BYTES} bytes"))
    } else {
        match super::command_table::find(args[0].as_ref()) {
            None => Some(format!(
                "ERR unknown command '{}', with args beginning with: {}",
                String::from_utf8_lossy(&args[0]).escape_debug(),
                args[1..]
                    .iter()
                    .map(|a| format!("'{}' ", String::from_utf8_lossy(a).escape_debug()))
                    .collect::<String>()
            )),
            Some(spec) if !arity_fits(spec.arity, args.len()) => {
                Some(format!("ERR wrong number of arguments for '{}' command", spec.name))
            }
            Some(_) => None,
        }
    };
    let queued = match refusal {
        Some(refusal) => Err(refusal),
        None => match commands::parse(args) {
            Parsed::Data(request, reply) => match node.transaction_refusal(&request) {
                Some(why) => Err(format!("ERR {why}")),
                None => Ok(Queued::Data(request, reply)),
            },
            Parsed::Invalid(message) => Err(message),
            Parsed::Local => Ok(Queued::Local(args.to_vec())),
        },
    };
    match queued {
        Ok(queued) => {
            multi.bytes += size;
            multi.queued.push(queued);
            w.simple("QUEUED");
        }
        Err(message) => {
            multi.failed = true;
            w.error(&message);
        }
    }
}

/// Whether `n` arguments (the name included) fit Redis's `arity`.
fn arity_fits(arity: i64, n: usize) -> bool {
    if arity >= 0 { n as i64 == arity } else { n as i64 >= -arity }
}

/// EXEC: aborted if a command was refused; else the data commands run as
/// one transaction (nothing, and a null array, if a watched key changed),
/// and the replies are written in order, the port's own commands run in
/// their place.
fn exec(node: &Node, session: &mut Session, info: &ServerInfo, out: &mut BytesMut) {
    let Some(multi) = session.multi.take() else { return };
    let watched = std::mem::take(&mut session.watched);
    if multi.failed {
        Writer::new(out, session.resp3).error("EXECABORT Transaction discarded because of previous errors.");
        return;
    }
    // The requests move into the transaction; each slot keeps how to
    // write its reply.
    let mut requests: Vec<Request> = Vec::new();
    let mut slots: Vec<Result<Reply, Vec<Bytes>>> = Vec::with_capacity(multi.queued.len());
    for queued in multi.queued {
        match queued {
            Queued::Data(request, reply) => {
                requests.push(request);
                slots.push(Ok(reply));
            }
            Queued::Local(args) => slots.push(Err(args)),
        }
    }
    let Some(replies) = node.transaction(requests, &watched) else {
        // A watched key changed: Redis's null array.
        let mut w = Writer::new(out, session.resp3);
        if session.resp3 {
            w.null();
        } else {
            w.raw(b"*-1\r\n");
        }
        return;
    };
    Writer::new(out, session.resp3).array(slots.len());
    let mut replies = replies.into_iter();
    for slot in slots {
        match slot {
            Ok(reply) => match replies.next() {
                Some(response) => commands::write_response(session, reply, response, out),
                None => Writer::new(out, session.resp3).error("ERR a transaction's reply is missing"),
            },
            Err(args) => commands::execute_local(node, session, info, args, out),
        }
    }
}
