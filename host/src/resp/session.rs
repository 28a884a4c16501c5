//! A RESP connection's state ([`Session`]), a transaction it has open
//! ([`Multi`]), and what every connection of a port shares
//! ([`ServerInfo`]).

use super::acl::{Acl, User};
use super::reply::Reply;
use bytes::Bytes;
use cachet_proto::Request;
use std::sync::Arc;

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
    /// The transaction opened with MULTI, if any (see `resp::multi`).
    pub multi: Option<Multi>,
    /// The keys WATCH named, until EXEC, DISCARD or UNWATCH.
    pub watched: crate::store::transaction::Watched,
    /// `READONLY`: reads are served here (at consistency ONE) when this
    /// member owns the key's slot without being its primary.
    pub readonly: bool,
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

/// What the commands need to know about the listener.
#[derive(Clone, Debug, Default)]
pub struct ServerInfo {
    /// TCP port of the RESP listener.
    pub port: u16,
    /// Its users; `None` when it has none (everyone may do everything).
    pub acl: Option<Arc<Acl>>,
    /// The address it listens on.
    pub bind: String,
    /// Its idle timeout in milliseconds, 0 for none (`CONFIG GET/SET
    /// timeout`; a change applies to each connection from its next read).
    pub idle_ms: Arc<std::sync::atomic::AtomicU64>,
    /// Its connection cap (`maxclients`).
    pub max_connections: u32,
    /// The largest command it reads (`client-query-buffer-limit`).
    pub max_command: usize,
    /// Counters as of the last `CONFIG RESETSTAT`.
    pub stats_base: Arc<StatsBase>,
    /// Redis Cluster redirects (`MOVED`) on a cluster member.
    pub redirects: bool,
}

impl ServerInfo {
    /// The idle timeout now.
    pub fn idle(&self) -> Option<std::time::Duration> {
        let ms = self.idle_ms.load(std::sync::atomic::Ordering::Relaxed);
        (ms > 0).then(|| std::time::Duration::from_millis(ms))
    }
}

/// What `CONFIG RESETSTAT` zeroes, kept as offsets: the node's own
/// counters (and the metrics endpoint's) never go back.
#[derive(Debug, Default)]
pub struct StatsBase {
    /// Commands processed.
    pub commands: std::sync::atomic::AtomicU64,
    /// Keyspace hits.
    pub hits: std::sync::atomic::AtomicU64,
    /// Keyspace misses.
    pub misses: std::sync::atomic::AtomicU64,
}

/// A queued command.
#[derive(Debug)]
pub enum Queued {
    /// A data command: run in the transaction.
    Data(Request, Reply),
    /// A command the port answers itself: run when EXEC writes its reply.
    Local(Vec<Bytes>),
}

/// A transaction opened with MULTI on a connection.
#[derive(Debug, Default)]
pub struct Multi {
    pub(super) queued: Vec<Queued>,
    /// Argument bytes queued.
    pub(super) bytes: usize,
    /// A command failed its check: EXEC aborts.
    pub(super) failed: bool,
}

impl Multi {
    /// A command was refused before it could be queued (by the ACL, say):
    /// EXEC aborts.
    pub fn refuse(&mut self) {
        self.failed = true;
    }
}
