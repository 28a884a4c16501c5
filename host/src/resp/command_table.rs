//! `COMMAND` and its subcommands, describing the commands this port
//! answers the way redis-server 7 does: arity, flags, key positions and
//! ACL categories. Clients read it: redis-py's `RedisCluster` finds each
//! command's keys from `COMMAND` before it routes the command to a slot's
//! owner, and refuses commands the table lacks.
//!
//! This table is also the list of commands the port answers (the parser
//! answers any other name as unknown). The key positions here are the ones
//! the ACL checks ([`super::acl::key_positions`]) and the categories the
//! ACL's; tests hold the two to each other.

use super::acl::{Category, categories};
use super::codec::Writer;
use bytes::Bytes;

/// One command as `COMMAND INFO` describes it.
#[derive(Clone, Copy, Debug)]
pub struct Spec {
    /// Lower-case name.
    pub name: &'static str,
    /// Redis's arity: the exact argument count (name included) when
    /// positive, the least when negative.
    pub arity: i64,
    /// Redis's command flags.
    pub flags: &'static [&'static str],
    /// First key's position (0 for none), last key's (-1: the last
    /// argument) and the step between keys.
    pub keys: (i64, i64, i64),
}

const R: &[&str] = &["readonly", "fast"];
const W: &[&str] = &["write", "fast"];
const WD: &[&str] = &["write", "denyoom", "fast"];
const FAST: &[&str] = &["fast"];
const CONN: &[&str] = &["noscript", "loading", "stale", "fast"];
const TX: &[&str] = &["noscript", "loading", "stale", "fast", "allow_busy"];
const ONE: (i64, i64, i64) = (1, 1, 1);
const ALL: (i64, i64, i64) = (1, -1, 1);
const NONE: (i64, i64, i64) = (0, 0, 0);

const fn spec(name: &'static str, arity: i64, flags: &'static [&'static str], keys: (i64, i64, i64)) -> Spec {
    Spec { name, arity, flags, keys }
}

/// Every command the port answers, by name.
pub const TABLE: &[Spec] = &[
    spec("append", 3, WD, ONE),
    spec("asking", 1, FAST, NONE),
    spec("auth", -2, &["noscript", "loading", "stale", "fast", "no_auth"], NONE),
    spec("bitcount", -2, &["readonly"], ONE),
    spec("bitpos", -3, &["readonly"], ONE),
    spec("client", -2, CONN, NONE),
    spec("cluster", -2, &["stale"], NONE),
    spec("copy", -3, &["write", "denyoom"], (1, 2, 1)),
    spec("command", -1, &["loading", "stale"], NONE),
    spec("config", -2, &["admin", "noscript", "loading", "stale"], NONE),
    spec("dbsize", 1, R, NONE),
    spec("decr", 2, WD, ONE),
    spec("decrby", 3, WD, ONE),
    spec("del", -2, &["write"], ALL),
    spec("discard", 1, TX, NONE),
    spec("echo", 2, FAST, NONE),
    spec("exec", 1, &["noscript", "loading", "stale", "skip_slowlog"], NONE),
    spec("exists", -2, R, ALL),
    spec("expire", -3, W, ONE),
    spec("expireat", -3, W, ONE),
    spec("expiretime", 2, R, ONE),
    spec("flushall", -1, &["write"], NONE),
    spec("flushdb", -1, &["write"], NONE),
    spec("get", 2, R, ONE),
    spec("getbit", 3, R, ONE),
    spec("getdel", 2, W, ONE),
    spec("getex", -2, W, ONE),
    spec("getrange", 4, &["readonly"], ONE),
    spec("getset", 3, WD, ONE),
    spec("hello", -1, CONN, NONE),
    spec("incr", 2, WD, ONE),
    spec("incrby", 3, WD, ONE),
    spec("incrbyfloat", 3, WD, ONE),
    spec("info", -1, &["loading", "stale"], NONE),
    spec("keys", 2, &["readonly"], NONE),
    spec("lcs", -3, &["readonly"], (1, 2, 1)),
    spec("mget", -2, R, ALL),
    spec("mset", -3, &["write", "denyoom"], (1, -1, 2)),
    spec("msetnx", -3, &["write", "denyoom"], (1, -1, 2)),
    spec("multi", 1, TX, NONE),
    spec("persist", 2, W, ONE),
    spec("pexpire", -3, W, ONE),
    spec("pexpireat", -3, W, ONE),
    spec("pexpiretime", 2, R, ONE),
    spec("ping", -1, FAST, NONE),
    spec("psetex", 4, &["write", "denyoom"], ONE),
    spec("pttl", 2, R, ONE),
    spec("quit", -1, CONN, NONE),
    spec("randomkey", 1, &["readonly"], NONE),
    spec("readonly", 1, FAST, NONE),
    spec("readwrite", 1, FAST, NONE),
    spec("rename", 3, &["write"], (1, 2, 1)),
    spec("renamenx", 3, W, (1, 2, 1)),
    spec("scan", -2, &["readonly"], NONE),
    spec("select", 2, CONN, NONE),
    spec("set", -3, &["write", "denyoom"], ONE),
    spec("setbit", 4, WD, ONE),
    spec("setex", 4, &["write", "denyoom"], ONE),
    spec("setnx", 3, WD, ONE),
    spec("setrange", 4, WD, ONE),
    spec("strlen", 2, R, ONE),
    spec("substr", 4, &["readonly"], ONE),
    spec("time", 1, &["loading", "stale", "fast"], NONE),
    spec("touch", -2, R, ALL),
    spec("ttl", 2, R, ONE),
    spec("type", 2, R, ONE),
    spec("unlink", -2, W, ALL),
    spec("unwatch", 1, TX, NONE),
    spec("watch", -2, TX, ALL),
];

/// The command named `name` (any case).
pub fn find(name: &[u8]) -> Option<&'static Spec> {
    TABLE.iter().find(|s| s.name.as_bytes().eq_ignore_ascii_case(name))
}

/// The ACL categories of a command, as Redis names them.
fn acl_names(spec: &Spec) -> Vec<&'static str> {
    let mut names: Vec<&'static str> = categories(&spec.name.to_ascii_uppercase())
        .unwrap_or_default()
        .iter()
        .flat_map(|c| match c {
            Category::Read => &["@read", "@keyspace"][..],
            Category::Write => &["@write", "@keyspace"][..],
            Category::Admin => &["@admin", "@dangerous"][..],
            Category::Connection => &["@connection"][..],
        })
        .copied()
        .collect();
    if spec.flags.contains(&"fast") {
        names.push("@fast");
    } else {
        names.push("@slow");
    }
    names.sort_unstable();
    names.dedup();
    names
}

/// One command's `COMMAND INFO` entry: name, arity, flags, first key,
/// last key, step, ACL categories, then (Redis 7) tips, key
/// specifications and subcommands, empty here.
fn write_spec(w: &mut Writer<'_>, spec: &Spec) {
    w.array(10);
    w.bulk(spec.name.as_bytes());
    w.integer(spec.arity);
    w.array(spec.flags.len());
    for flag in spec.flags {
        w.simple(flag);
    }
    w.integer(spec.keys.0);
    w.integer(spec.keys.1);
    w.integer(spec.keys.2);
    let acl = acl_names(spec);
    w.array(acl.len());
    for name in acl {
        w.simple(name);
    }
    w.array(0);
    w.array(0);
    w.array(0);
}

/// The keys of `args` (a whole command) by its table entry.
fn keys_of<'a>(spec: &Spec, args: &'a [Bytes]) -> Vec<&'a Bytes> {
    let (first, last, step) = spec.keys;
    if first == 0 || args.len() <= first as usize {
        return Vec::new();
    }
    let last = if last < 0 { args.len() as i64 + last } else { last };
    (first..=last).step_by(step.max(1) as usize).filter_map(|i| args.get(i as usize)).collect()
}

/// `COMMAND [COUNT | INFO name... | LIST | DOCS [name...] | GETKEYS cmd
/// args...]` (`args[0]` is `COMMAND`).
pub fn command(w: &mut Writer<'_>, args: &[Bytes]) {
    let sub = args.get(1).map(|a| String::from_utf8_lossy(a).to_ascii_uppercase());
    match sub.as_deref() {
        None => {
            w.array(TABLE.len());
            for spec in TABLE {
                write_spec(w, spec);
            }
        }
        Some("COUNT") if args.len() == 2 => w.integer(TABLE.len() as i64),
        Some("LIST") if args.len() == 2 => {
            w.array(TABLE.len());
            for spec in TABLE {
                w.bulk(spec.name.as_bytes());
            }
        }
        Some("INFO") => {
            let named: Vec<Option<&Spec>> = if args.len() == 2 {
                TABLE.iter().map(Some).collect()
            } else {
                args[2..].iter().map(|n| find(n)).collect()
            };
            w.array(named.len());
            for spec in named {
                match spec {
                    Some(spec) => write_spec(w, spec),
                    None => w.null(),
                }
            }
        }
        Some("DOCS") => {
            let named: Vec<&Spec> = if args.len() == 2 {
                TABLE.iter().collect()
            } else {
                args[2..].iter().filter_map(|n| find(n)).collect()
            };
            w.map(named.len());
            for spec in named {
                w.bulk(spec.name.as_bytes());
                w.map(2);
                w.bulk(b"summary");
                w.bulk(format!("the Redis {} command, as Cachet answers it (see the README)", spec.name).as_bytes());
                w.bulk(b"group");
                w.bulk(if spec.keys.0 > 0 { b"string".as_slice() } else { b"server".as_slice() });
            }
        }
        Some("GETKEYS") if args.len() >= 3 => match find(&args[2]) {
            None => w.error("ERR Invalid command specified"),
            Some(spec) => {
                let command = &args[2..];
                let n = command.len() as i64;
                if (spec.arity > 0 && n != spec.arity) || (spec.arity < 0 && n < -spec.arity) {
                    w.error("ERR Invalid number of arguments specified for command");
                    return;
                }
                let keys = keys_of(spec, command);
                if keys.is_empty() {
                    w.error("ERR The command has no key arguments");
                    return;
                }
                w.array(keys.len());
                for key in keys {
                    w.bulk(key);
                }
            }
        },
        Some("COUNT" | "LIST" | "GETKEYS") => w.error(&format!(
            "ERR wrong number of arguments for 'command|{}' command",
            sub.unwrap_or_default().to_lowercase()
        )),
        Some(_) => w.error(&format!(
            "ERR unknown subcommand '{}'. Try COMMAND HELP.",
            String::from_utf8_lossy(&args[1]).escape_debug()
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::super::acl::key_positions;
    use super::*;
    use bytes::BytesMut;

    fn words(words: &[&str]) -> Vec<Bytes> {
        words.iter().map(|w| Bytes::copy_from_slice(w.as_bytes())).collect()
    }

    /// A command the port answers but the ACL does not know would be let
    /// through for every user, its keys unchecked (SETNX and ten others
    /// were, for a while).
    #[test]
    fn every_command_the_port_answers_has_categories_and_its_keys_are_checked() {
        for spec in TABLE {
            let command = spec.name.to_ascii_uppercase();
            let command = command.as_str();
            let needed = categories(command).unwrap_or_else(|| panic!("{command} has no ACL categories"));
            let keyed = needed.iter().any(|c| matches!(c, Category::Read | Category::Write))
                && !matches!(command, "DBSIZE" | "FLUSHALL" | "FLUSHDB" | "KEYS" | "SCAN" | "RANDOMKEY");
            if keyed {
                assert_eq!(key_positions(command, 4).next(), Some(1), "{command}'s key is not checked");
            }
        }
        let acl = super::super::acl::Acl::parse("user viewer on nopass ~app:* +@read\n").expect("parses");
        let viewer = acl.authenticate("viewer", b"").expect("signs in");
        for write in [&["SETNX", "app:1", "v"][..], &["SETEX", "app:1", "9", "v"], &["GETSET", "app:1", "v"]] {
            assert!(viewer.check(write[0], &words(write)).is_err(), "{write:?}");
        }
        assert_eq!(viewer.check("GETRANGE", &words(&["GETRANGE", "app:1", "0", "1"])), Ok(()));
        assert_eq!(viewer.check("TYPE", &words(&["TYPE", "other:1"])), Err(super::super::acl::Denied::Key));
        assert_eq!(viewer.check("TOUCH", &words(&["TOUCH", "app:1", "other:2"])), Err(super::super::acl::Denied::Key));
    }

    #[test]
    fn the_tables_keys_are_the_acls() {
        for spec in TABLE {
            let upper = spec.name.to_ascii_uppercase();
            let args: Vec<Bytes> = std::iter::once(Bytes::from(upper.clone()))
                .chain((0..4).map(|i| Bytes::from(format!("a{i}"))))
                .collect();
            let ours: Vec<usize> =
                keys_of(spec, &args).iter().filter_map(|k| args.iter().position(|a| std::ptr::eq(a, *k))).collect();
            let acl: Vec<usize> = key_positions(&upper, args.len()).collect();
            assert_eq!(ours, acl, "{upper}: COMMAND's keys and the ACL's");
        }
    }

    #[test]
    fn command_info_and_getkeys_answer_as_redis_does() {
        let mut out = BytesMut::new();
        let args: Vec<Bytes> = ["COMMAND", "INFO", "get", "nosuch"].iter().map(|s| Bytes::from(*s)).collect();
        command(&mut Writer::new(&mut out, false), &args);
        let text = String::from_utf8_lossy(&out).to_string();
        assert!(
            text.starts_with("*2\r\n*10\r\n$3\r\nget\r\n:2\r\n*2\r\n+readonly\r\n+fast\r\n:1\r\n:1\r\n:1\r\n"),
            "{text}"
        );
        assert!(text.ends_with("$-1\r\n") || text.ends_with("_\r\n"), "{text}");
        let mut out = BytesMut::new();
        let args: Vec<Bytes> =
            ["COMMAND", "GETKEYS", "MSET", "a", "1", "b", "2"].iter().map(|s| Bytes::from(*s)).collect();
        command(&mut Writer::new(&mut out, false), &args);
        assert_eq!(&out[..], b"*2\r\n$1\r\na\r\n$1\r\nb\r\n");
    }
}
