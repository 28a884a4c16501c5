//! Who may do what on the RESP port: a subset of Redis's ACL.
//!
//! Users come from a file in Redis's ACL-file syntax, one per line:
//!
//! ```text
//! user app on >s3cret ~app:* +@read +@write
//! user ops on #<sha256 hex of the password> allkeys +@all
//! user viewer on nopass ~* +@read
//! user old off >whatever +@all
//! ```
//!
//! Rules, in order on the line: `on`/`off`; `>password` (or `#sha256hex`,
//! or `nopass`); `~pattern` (a Redis glob over key names; `allkeys` is
//! `~*`); `+@category`/`-@category` with `read`, `write`, `admin` and `all`
//! (`allcommands`, `nocommands`). Connection commands (AUTH, HELLO, PING,
//! QUIT, ...) are open to every signed-in user. A user named `default` is
//! the one a connection starts as; without one in the file, a connection
//! must AUTH before anything else. `--resp-password` alone gives a
//! `default` user with every permission and that password (Redis's
//! `requirepass`).
//!
//! Passwords are kept as SHA-256 digests and compared in constant time,
//! as Redis does.

use crate::glob::glob_match;
use ring::digest::{SHA256, digest};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// A command's category, as the ACL grants them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Category {
    /// Reads keys (GET, MGET, TTL, ...).
    Read,
    /// Changes keys (SET, DEL, INCR, FLUSHALL, ...).
    Write,
    /// Operates the server (CONFIG, INFO, DBSIZE, FLUSHALL, ...).
    Admin,
    /// The connection itself (AUTH, HELLO, PING, QUIT, ...): open to every
    /// signed-in user.
    Connection,
}

impl Category {
    fn bit(self) -> u8 {
        match self {
            Self::Read => 1,
            Self::Write => 2,
            Self::Admin => 4,
            Self::Connection => 8,
        }
    }
}

/// The categories of a command (upper-case name); `None` for a command
/// the port does not know (answered as unknown, whoever asks).
pub fn categories(command: &str) -> Option<&'static [Category]> {
    use Category::{Admin, Connection, Read, Write};
    Some(match command {
        "GET" | "MGET" | "EXISTS" | "TTL" | "PTTL" | "STRLEN" | "GETRANGE" | "SUBSTR" | "EXPIRETIME"
        | "PEXPIRETIME" | "TYPE" | "TOUCH" | "GETBIT" | "BITCOUNT" | "BITPOS" | "LCS" => &[Read],
        "SET" | "DEL" | "UNLINK" | "MSET" | "INCR" | "DECR" | "INCRBY" | "DECRBY" | "APPEND" | "EXPIRE" | "PEXPIRE"
        | "PERSIST" | "SETNX" | "SETEX" | "PSETEX" | "EXPIREAT" | "PEXPIREAT" | "SETRANGE" | "SETBIT"
        | "INCRBYFLOAT" | "MSETNX" | "RENAME" | "RENAMENX" => &[Write],
        "COPY" => &[Read, Write],
        // They list key names whatever a user's key patterns: only for
        // users who may also administer.
        "KEYS" | "SCAN" | "RANDOMKEY" => &[Read, Admin],
        "GETDEL" | "GETEX" | "GETSET" => &[Read, Write],
        "FLUSHALL" | "FLUSHDB" => &[Write, Admin],
        "DBSIZE" | "INFO" | "CONFIG" => &[Admin],
        // Cluster clients read COMMAND when they start (redis-py's
        // RedisCluster): Redis puts it in @connection too.
        "AUTH" | "HELLO" | "PING" | "ECHO" | "QUIT" | "SELECT" | "CLIENT" | "TIME" | "COMMAND" | "MULTI" | "EXEC"
        | "DISCARD" | "WATCH" | "UNWATCH" | "CLUSTER" | "READONLY" | "READWRITE" | "ASKING" => &[Connection],
        _ => return None,
    })
}

/// The positions of a command's key arguments (`args[0]` is its name).
pub fn key_positions(command: &str, args: usize) -> impl Iterator<Item = usize> {
    let (first, step) = match command {
        "MGET" | "EXISTS" | "DEL" | "UNLINK" | "TOUCH" | "WATCH" => (1, 1),
        // Two keys, then options.
        "LCS" => return (1..args.min(3)).step_by(1),
        "MSET" | "MSETNX" => (1, 2),
        "RENAME" | "RENAMENX" | "COPY" => return (1..args.min(3)).step_by(1),
        "GET" | "SET" | "TTL" | "PTTL" | "STRLEN" | "INCR" | "DECR" | "INCRBY" | "DECRBY" | "APPEND" | "EXPIRE"
        | "PEXPIRE" | "PERSIST" | "GETDEL" | "GETEX" | "SETNX" | "SETEX" | "PSETEX" | "GETSET" | "GETRANGE"
        | "SUBSTR" | "EXPIREAT" | "PEXPIREAT" | "EXPIRETIME" | "PEXPIRETIME" | "TYPE" | "SETRANGE" | "SETBIT"
        | "INCRBYFLOAT" | "GETBIT" | "BITCOUNT" | "BITPOS" => (1, usize::MAX),
        _ => (args, 1),
    };
    (first..args).step_by(step.min(args.max(1)))
}

/// One user.
#[derive(Debug)]
pub struct User {
    /// Its name.
    pub name: String,
    enabled: bool,
    /// SHA-256 digests of its passwords; empty with `nopass`.
    passwords: Vec<[u8; 32]>,
    nopass: bool,
    /// Bits of the categories it may run ([`Category::bit`]).
    allowed: u8,
    /// Key patterns it may touch; `None` for every key.
    keys: Option<Vec<Vec<u8>>>,
}

/// Why a command is refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Denied {
    /// Nobody is signed in, and the command needs a user.
    #[error("NOAUTH Authentication required.")]
    NoAuth,
    /// The user may not run this command.
    #[error("NOPERM User {user} has no permissions to run the '{command}' command")]
    Command {
        /// The user.
        user: String,
        /// The command, lower-case.
        command: String,
    },
    /// The user may not touch one of the command's keys.
    #[error("NOPERM No permissions to access a key")]
    Key,
}

impl User {
    /// Whether this user may run `command` (upper-case) on `args`.
    pub fn check(&self, command: &str, args: &[bytes::Bytes]) -> Result<(), Denied> {
        let Some(needed) = categories(command) else { return Ok(()) };
        let connection = needed.contains(&Category::Connection);
        if !connection && needed.iter().any(|c| self.allowed & c.bit() == 0) {
            return Err(Denied::Command { user: self.name.clone(), command: command.to_ascii_lowercase() });
        }
        if let Some(patterns) = &self.keys {
            let denied = key_positions(command, args.len())
                .filter_map(|i| args.get(i))
                .any(|key| !patterns.iter().any(|p| glob_match(p, key)));
            if denied {
                return Err(Denied::Key);
            }
        }
        Ok(())
    }

    /// Whether this user may run plain GETs and SETs on any key: the port
    /// serves those from its read buffer only then.
    pub fn unrestricted(&self) -> bool {
        self.keys.is_none() && self.allowed & (Category::Read.bit() | Category::Write.bit()) == 3
    }

    fn password_matches(&self, password: &[u8]) -> bool {
        if !self.enabled {
            return false;
        }
        if self.nopass {
            return true;
        }
        let given = digest(&SHA256, password);
        // Every digest is compared, whatever matches: the time taken says
        // nothing about which one or how much of it.
        self.passwords.iter().fold(false, |found, stored| found | constant_time_eq(stored, given.as_ref()))
    }
}

/// Compares equal-length byte strings in time independent of their
/// contents.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |diff, (x, y)| diff | (x ^ y)) == 0
}

/// The port's users.
#[derive(Debug, Default)]
pub struct Acl {
    users: HashMap<String, Arc<User>>,
}

/// An ACL file that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum AclError {
    /// The file cannot be read.
    #[error("cannot read the ACL file {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// A line that does not parse.
    #[error("{path}:{line}: {what}")]
    Syntax {
        /// The file.
        path: PathBuf,
        /// Its line number (from 1).
        line: usize,
        /// What is wrong.
        what: String,
    },
}

impl Acl {
    /// Reads an ACL file.
    pub fn load(path: &Path) -> Result<Self, AclError> {
        let text = std::fs::read_to_string(path).map_err(|source| AclError::Io { path: path.into(), source })?;
        Self::parse(&text).map_err(|(line, what)| AclError::Syntax { path: path.into(), line, what })
    }

    /// Parses an ACL file's text; the error is a line number and what is
    /// wrong with it.
    pub fn parse(text: &str) -> Result<Self, (usize, String)> {
        let mut acl = Self::default();
        for (i, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let user = parse_user(line).map_err(|what| (i + 1, what))?;
            if acl.users.contains_key(&user.name) {
                return Err((i + 1, format!("user `{}` is defined twice", user.name)));
            }
            acl.users.insert(user.name.clone(), Arc::new(user));
        }
        Ok(acl)
    }

    /// A `default` user with every permission and `password` (Redis's
    /// `requirepass`), added to these users.
    pub fn with_default_password(mut self, password: &str) -> Self {
        let user = User {
            name: "default".into(),
            enabled: true,
            passwords: vec![sha256(password.as_bytes())],
            nopass: false,
            allowed: 0xff,
            keys: None,
        };
        self.users.insert(user.name.clone(), Arc::new(user));
        self
    }

    /// The user a new connection starts as: `default` if it needs no
    /// password, else nobody (the client must AUTH).
    pub fn initial_user(&self) -> Option<Arc<User>> {
        self.users.get("default").filter(|u| u.enabled && u.nopass).cloned()
    }

    /// `AUTH [user] password`: the user, if the pair is right.
    pub fn authenticate(&self, user: &str, password: &[u8]) -> Option<Arc<User>> {
        // A missing user costs the same digest as a present one.
        match self.users.get(user) {
            Some(found) if found.password_matches(password) => Some(found.clone()),
            Some(_) => None,
            None => {
                let _ = digest(&SHA256, password);
                None
            }
        }
    }

    /// Whether any user needs a password: the port then counts as
    /// protected beyond loopback.
    pub fn requires_auth(&self) -> bool {
        self.initial_user().is_none()
    }
}

fn sha256(bytes: &[u8]) -> [u8; 32] {
    let mut out = [0u8; 32];
    out.copy_from_slice(digest(&SHA256, bytes).as_ref());
    out
}

fn parse_user(line: &str) -> Result<User, String> {
    let mut words = line.split_whitespace();
    if words.next() != Some("user") {
        return Err("a line must start with `user NAME`".into());
    }
    let name = words.next().ok_or("`user` without a name")?.to_string();
    let mut user =
        User { name, enabled: false, passwords: Vec::new(), nopass: false, allowed: 0, keys: Some(Vec::new()) };
    for rule in words {
        match rule {
            "on" => user.enabled = true,
            "off" => user.enabled = false,
            "nopass" => user.nopass = true,
            "allkeys" => user.keys = None,
            "resetkeys" => user.keys = Some(Vec::new()),
            "allcommands" => user.allowed = 0xff,
            "nocommands" => user.allowed = 0,
            _ if rule.starts_with('>') => user.passwords.push(sha256(&rule.as_bytes()[1..])),
            _ if rule.starts_with('#') => {
                let hex = &rule[1..];
                let digest = decode_hex(hex).ok_or_else(|| format!("`{rule}`: `#` takes 64 hex digits (a SHA-256)"))?;
                user.passwords.push(digest);
            }
            _ if rule.starts_with('~') => {
                if let Some(keys) = &mut user.keys {
                    keys.push(rule.as_bytes()[1..].to_vec());
                }
            }
            _ if rule.starts_with("+@") || rule.starts_with("-@") => {
                let bits = match &rule[2..] {
                    "all" => 0xff,
                    "read" => Category::Read.bit(),
                    "write" => Category::Write.bit(),
                    "admin" => Category::Admin.bit(),
                    "connection" => Category::Connection.bit(),
                    other => return Err(format!("unknown category `@{other}` (read, write, admin, all)")),
                };
                if rule.starts_with('+') {
                    user.allowed |= bits;
                } else {
                    user.allowed &= !bits;
                }
            }
            _ => {
                return Err(format!(
                    "unsupported rule `{rule}` (on, off, >password, #sha256, nopass, ~pattern, allkeys, +@category, \
                     -@category, allcommands, nocommands)"
                ));
            }
        }
    }
    if user.enabled && !user.nopass && user.passwords.is_empty() {
        return Err(format!("user `{}` is on but has no password (give >password, #sha256 or nopass)", user.name));
    }
    Ok(user)
}

fn decode_hex(hex: &str) -> Option<[u8; 32]> {
    if hex.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(hex.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    fn args(words: &[&str]) -> Vec<Bytes> {
        words.iter().map(|w| Bytes::copy_from_slice(w.as_bytes())).collect()
    }

    #[test]
    fn globs_match_as_redis_does() {
        let cases: [(&str, &str, bool); 15] = [
            ("\\x", "\\", false),
            ("*", "anything", true),
            ("app:*", "app:1", true),
            ("app:*", "other:1", false),
            ("a?c", "abc", true),
            ("a?c", "ac", false),
            ("*:user:*", "x:user:7", true),
            ("[ab]x", "bx", true),
            ("[ab]x", "cx", false),
            ("[^ab]x", "cx", true),
            ("[a-c]1", "b1", true),
            ("[a-c]1", "d1", false),
            ("\\*x", "*x", true),
            ("\\*x", "ax", false),
            ("*a*a*a*a*b", "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa", false),
        ];
        for (pattern, text, expected) in cases {
            assert_eq!(glob_match(pattern.as_bytes(), text.as_bytes()), expected, "{pattern} ~ {text}");
        }
    }

    #[test]
    fn users_are_held_to_their_categories_and_keys() {
        let acl = Acl::parse(
            "# comment\nuser app on >s3cret ~app:* +@read +@write\nuser viewer on nopass allkeys +@read\nuser old off \
             >pw +@all\n",
        )
        .expect("parses");
        assert!(acl.requires_auth(), "no default user");
        assert!(acl.authenticate("app", b"wrong").is_none());
        assert!(acl.authenticate("nobody", b"s3cret").is_none());
        assert!(acl.authenticate("old", b"pw").is_none(), "a disabled user cannot sign in");
        let app = acl.authenticate("app", b"s3cret").expect("signs in");
        assert_eq!(app.check("SET", &args(&["SET", "app:1", "v"])), Ok(()));
        assert_eq!(
            app.check("MSET", &args(&["MSET", "app:1", "v", "app:2", "other:3"])),
            Ok(()),
            "values are not keys"
        );
        assert_eq!(app.check("MGET", &args(&["MGET", "app:1", "other:2"])), Err(Denied::Key));
        assert_eq!(
            app.check("CONFIG", &args(&["CONFIG", "GET", "maxmemory"])),
            Err(Denied::Command { user: "app".into(), command: "config".into() })
        );
        assert_eq!(app.check("PING", &args(&["PING"])), Ok(()), "connection commands are open");
        assert!(!app.unrestricted());
        let viewer = acl.authenticate("viewer", b"").expect("nopass");
        assert_eq!(viewer.check("GET", &args(&["GET", "anything"])), Ok(()));
        assert!(matches!(viewer.check("DEL", &args(&["DEL", "k"])), Err(Denied::Command { .. })));
        assert!(matches!(viewer.check("GETDEL", &args(&["GETDEL", "k"])), Err(Denied::Command { .. })));
        let hashed =
            format!("user h on #{} +@all allkeys", "5e884898da28047151d0e56f8dc6292773603d0d6aabbdd62a11ef721d1542d8");
        let acl = Acl::parse(&hashed).expect("parses").with_default_password("pw");
        assert!(acl.authenticate("h", b"password").is_some_and(|u| u.unrestricted()), "sha256('password')");
        assert!(acl.authenticate("default", b"pw").is_some());
        assert!(acl.requires_auth());
    }

    #[test]
    fn bad_acl_lines_name_their_problem() {
        assert_eq!(Acl::parse("user a on +@all").err().map(|e| e.0), Some(1), "on without a password");
        let (line, what) = Acl::parse("\nuser a on nopass +@fly").expect_err("refused");
        assert_eq!(line, 2);
        assert!(what.contains("@fly"), "{what}");
        assert!(Acl::parse("usr a").is_err());
        assert!(Acl::parse("user a on #abc").is_err());
        assert!(Acl::parse("user a on nopass\nuser a on nopass").is_err());
        let open = Acl::parse("user default on nopass allkeys +@all").expect("parses");
        assert!(!open.requires_auth());
        assert!(open.initial_user().is_some_and(|u| u.unrestricted()));
    }
}
