//! The cluster's thin shell: one thread with its own tokio runtime owns a
//! node's [`Replica`] and [`Membership`], feeds them the peer transport's
//! frames, the clock and the client operations the QUIC server hands over,
//! and carries their output back out. All the decisions stay in the sans-IO
//! core, which the simulator checks; this file only moves messages.
//!
//! Each peer gets a sender task with a bounded queue and a connection of its
//! own, so a dead or slow peer (a connection attempt can take a while to
//! fail) delays no message to the others. When a queue is full, frames are
//! dropped: the replication protocol already retries what it must
//! (hints, re-sync requests) and fails client operations that miss their
//! deadline, so a lost frame costs time, never correctness.
//!
//! Founders are listed by `--cluster` (a node's id is its index there);
//! others join through `--seeds` and are learnt from the gossip. The
//! failure detector (SWIM) decides who is up, and the *serving ring* holds
//! the members that are: a member declared down leaves it, so the next
//! nodes on the ring take over its ranges and re-sync them from the
//! survivors (restoring the replication factor). Only a node that sees a
//! majority of the members up moves its ring; one that does not counts for
//! nothing. A member that comes back is readmitted: held out of the ring
//! until it answers a `Readmit` by starting a full re-sync. A member never
//! heard from since this node started counts as down after a grace period,
//! so a restarted node does not wait for a member that is gone.

use super::membership::{Membership, MembershipConfig, MembershipEvent, Peer};
use super::records::{ShardRecords, as_of};
use super::replica::{self, Message, NodeIx, Op, OpError, Outcome, Record, RecordStore, Replica, ReplicaConfig};
use super::transport::{Incoming, PeerFrame, PeerTls, PeerTransport, TransportError};
use super::update::{Effect, Update};
use crate::loader::Loaders;
use crate::reply::Routed;
use crate::store::Store;
use bytes::Bytes;
use cachet_proto::{ClusterStats, Consistency, ErrorCode, ErrorReply, Member, Request, Response, Ring, TtlState};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, oneshot, watch};

/// How often a `Readmit` is resent until the member answers.
const READMIT_EVERY_MS: u64 = 200;

/// The members of the serving ring, and whether this node sees a strict
/// majority of the known members up. The ring holds this node and every
/// known member that is up (and not held out, waiting to be readmitted),
/// as long as that is a majority. A node that sees only a minority may be
/// the one cut off: if it dropped the others from its ring it would own
/// every key alone. So it keeps every known member instead, and counts
/// for nothing ([`Replica::set_quorate`]).
fn serving(
    me: NodeIx,
    known: impl Iterator<Item = NodeIx>,
    alive: &std::collections::BTreeMap<NodeIx, bool>,
    held_out: &std::collections::BTreeMap<NodeIx, u64>,
) -> (Vec<NodeIx>, bool) {
    let known: Vec<NodeIx> = known.collect();
    // A member held out is not counted for the majority either: a node
    // whose only company is members it has not readmitted yet is still
    // alone (it would otherwise own every key on a ring of itself).
    let serves = |i: NodeIx| i == me || (alive.get(&i).copied().unwrap_or(false) && !held_out.contains_key(&i));
    let up: Vec<NodeIx> = known.iter().copied().filter(|&i| serves(i)).collect();
    if up.len() * 2 > known.len() { (up, true) } else { (known, false) }
}

/// Frames queued per peer before new ones are dropped.
const PEER_QUEUE: usize = 8192;

/// How long a stopping node waits for the members it tells of its
/// departure to acknowledge it.
const LEAVE_GRACE: Duration = Duration::from_millis(500);
/// After a failed connection attempt, frames to that peer are dropped
/// without trying for this long.
const REDIAL_AFTER: Duration = Duration::from_millis(200);
/// A connection attempt gives up after this long.
const DIAL_TIMEOUT: Duration = Duration::from_millis(1_000);

/// Keys of one MGET or EXISTS read from the replicas at once.
const MGET_READS_AT_ONCE: usize = 32;

/// How a node joins its cluster.
#[derive(Clone, Debug)]
pub struct ClusterOptions {
    /// This node's index in `members`.
    pub node_id: NodeIx,
    /// Every founding member's peer (node-to-node) address, by node id;
    /// this node's own entry is where its peer transport listens. Empty
    /// for a node joining a running cluster through `seeds`.
    pub members: Vec<SocketAddr>,
    /// Peer addresses of running members to join through (with an empty
    /// `members`).
    pub seeds: Vec<SocketAddr>,
    /// Where this node's peer transport listens when it joins through
    /// `seeds`.
    pub peer_listen: Option<SocketAddr>,
    /// Where this node serves clients, told to the other members (and
    /// through them to clients, which route by it).
    pub client_addr: SocketAddr,
    /// Copies of each key.
    pub replication_factor: usize,
    /// The level of requests that do not name one.
    pub consistency: Consistency,
    /// A dead member is declared down within about this long.
    pub detect_within_ms: u64,
    /// Deadline of one replicated operation at its coordinator.
    pub request_timeout_ms: u64,
    /// The peer certificate and the cluster's CA: the operator's files, or
    /// the shared development CA of `--dev-ca`.
    pub tls: PeerTls,
    /// This node's data directory (its development peer certificate, the
    /// member list, the incarnation).
    pub data_dir: PathBuf,
}

/// Why the cluster could not start.
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    /// The options do not describe a cluster this node can be in.
    #[error("cluster configuration: {0}")]
    Config(String),
    /// The peer transport failed.
    #[error(transparent)]
    Transport(#[from] TransportError),
    /// The runtime thread could not start.
    #[error("cluster runtime: {0}")]
    Runtime(String),
}

struct Command {
    op: Op,
    level: replica::Consistency,
    reply: oneshot::Sender<Result<Outcome, OpError>>,
}

/// A running cluster membership and replica; hand requests to
/// [`Cluster::route`].
pub struct Cluster {
    commands: mpsc::UnboundedSender<Command>,
    /// The node's read-through loaders, run at each key's primary owner.
    loaders: Arc<std::sync::OnceLock<Arc<Loaders>>>,
    /// The serving ring the replica routes by, for checks made before a
    /// request reaches it (MSET's owners).
    ring: Arc<Mutex<Option<Arc<Ring>>>>,
    status: Arc<Mutex<ClusterStats>>,
    default: Consistency,
    stop: watch::Sender<bool>,
    thread: Mutex<Option<std::thread::JoinHandle<()>>>,
    peer_addr: SocketAddr,
    /// CDC invalidations being retried (see [`Cluster::invalidate`]).
    invalidating: Arc<std::sync::atomic::AtomicUsize>,
    /// Copies of each key.
    rf: usize,
}

/// How long a CDC invalidation is retried before it is given up (logged;
/// the value then lives until its TTL).
const INVALIDATE_FOR: Duration = Duration::from_secs(30);
/// CDC invalidations retried at once, at most; beyond it one is tried once.
const MAX_INVALIDATING: usize = 10_000;

fn level(consistency: Consistency) -> replica::Consistency {
    match consistency {
        Consistency::One => replica::Consistency::One,
        Consistency::Quorum => replica::Consistency::Quorum,
        Consistency::All => replica::Consistency::All,
    }
}

fn error(code: ErrorCode, message: impl Into<String>) -> Response {
    Response::Error(ErrorReply::new(code, message))
}

fn op_error(err: OpError) -> Response {
    match err {
        OpError::Unavailable => {
            error(ErrorCode::Unavailable, "too few replicas of the key are up for this consistency")
        }
        OpError::Timeout => error(ErrorCode::Unavailable, "too few replicas of the key answered in time"),
    }
}

/// A value too large to store, with the record's own header (the bare
/// value's limits first, so the message names what the client sent).
fn check_record(store: &Store, key: &[u8], value: &[u8]) -> Option<Response> {
    store
        .check_sizes(key, value)
        .and_then(|()| store.check_lengths(key.len(), value.len() + super::records::OVERHEAD))
        .err()
        .map(|err| crate::store::commands::shard_error(&err))
}

/// The first identity in a gossip datagram (its sender, then the members
/// it relays news of) whose incarnation is over `ceiling`: incarnations
/// start at the wall clock and grow by one per renewal, so one far ahead of
/// it is forged (and would leave its member no higher one to refute it).
fn forged_incarnation<'a>(sender: &'a Peer, relayed: &'a [Peer], ceiling: u64) -> Option<&'a Peer> {
    std::iter::once(sender).chain(relayed).find(|p| p.incarnation > ceiling)
}

/// Whether news that a member is up at `addr` is believed: it is where
/// this node knows the member (`known`), or where the member itself last
/// spoke from (`verified`). Otherwise it is news relayed by others of a
/// joiner or a move, which waits until the member speaks from there.
fn up_believed(known: Option<&SocketAddr>, verified: Option<&SocketAddr>, addr: &SocketAddr) -> bool {
    known == Some(addr) || verified == Some(addr)
}

/// Milliseconds since the Unix epoch: the wall clock the runtime reads
/// for the replicas (their `wall_epoch_ms`) and for expiry times.
pub fn unix_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

/// A nonce for this process's life: request ids and re-sync rounds of an
/// earlier life of this node (still in flight after a crash) match nothing.
fn boot_nonce() -> u64 {
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64);
    nanos ^ (u64::from(std::process::id()) << 32)
}

impl Cluster {
    /// Binds the peer transport and starts the runtime thread. The node
    /// starts as if restarted empty: it counts toward no quorum until every
    /// other member has sent it the records it owns.
    pub fn start(options: ClusterOptions, store: Arc<Store>) -> Result<Arc<Self>, ClusterError> {
        let n = options.members.len();
        let me = options.node_id as usize;
        let listen = match (n, options.peer_listen) {
            (0, Some(listen)) if !options.seeds.is_empty() => listen,
            (0, _) => {
                return Err(ClusterError::Config(
                    "a node needs --cluster (the founding members) or --seeds with --peer-listen (to join)".into(),
                ));
            }
            _ if me >= n => {
                return Err(ClusterError::Config(format!("--node-id {me} is not an index into the {n} members")));
            }
            _ => options.members[me],
        };
        if options.replication_factor == 0 || (n > 0 && options.replication_factor > n) {
            return Err(ClusterError::Config(format!(
                "--replication-factor {} must be between 1 and the {n} members",
                options.replication_factor
            )));
        }
        for (i, a) in options.members.iter().enumerate() {
            if options.members[..i].contains(a) {
                return Err(ClusterError::Config(format!("member address {a} is listed twice")));
            }
        }
        // Peers recognise each other's messages by address: it must be one
        // they can reach and will see.
        if let Some(a) = options.members.iter().chain([&listen]).find(|a| a.ip().is_unspecified() || a.port() == 0) {
            return Err(ClusterError::Config(format!(
                "peer address {a} must be a specific address and port other members can reach"
            )));
        }
        let status = Arc::new(Mutex::new(ClusterStats {
            node_id: options.node_id,
            replication_factor: options.replication_factor as u32,
            ..ClusterStats::default()
        }));
        let default = options.consistency;
        let rf = options.replication_factor;
        let (commands, commands_rx) = mpsc::unbounded_channel();
        let (stop, stopped) = watch::channel(false);
        let (bound_tx, bound_rx) = std::sync::mpsc::channel();
        let thread_status = status.clone();
        let loaders: Arc<std::sync::OnceLock<Arc<Loaders>>> = Arc::default();
        let thread_loaders = loaders.clone();
        let ring: Arc<Mutex<Option<Arc<Ring>>>> = Arc::default();
        let thread_ring = ring.clone();
        let thread = std::thread::Builder::new()
            .name("cachet-cluster".into())
            .spawn(move || {
                let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
                    Ok(runtime) => runtime,
                    Err(err) => {
                        let _ = bound_tx.send(Err(ClusterError::Runtime(err.to_string())));
                        return;
                    }
                };
                runtime.block_on(async move {
                    let bound = PeerTransport::bind(listen, &options.tls, &options.data_dir, options.node_id);
                    let (transport, incoming) = match bound {
                        Ok(bound) => bound,
                        Err(err) => {
                            let _ = bound_tx.send(Err(err.into()));
                            return;
                        }
                    };
                    let _ = bound_tx.send(Ok(transport.local_addr().unwrap_or(listen)));
                    // Peers' records are held to this node's own limits.
                    let limits = (store.config().max_key_size, store.config().max_value_size);
                    let store = Box::new(ShardRecords::new(store));
                    let mut shell = Shell::new(options, listen, transport, thread_status, store, limits);
                    shell.loaders = thread_loaders;
                    shell.shared_ring = thread_ring;
                    shell.run(commands_rx, incoming, stopped).await;
                });
            })
            .map_err(|e| ClusterError::Runtime(e.to_string()))?;
        let peer_addr = match bound_rx.recv() {
            Ok(Ok(addr)) => addr,
            Ok(Err(err)) => return Err(err),
            Err(_) => return Err(ClusterError::Runtime("the cluster thread died while starting".into())),
        };
        Ok(Arc::new(Self {
            commands,
            loaders,
            ring,
            status,
            default,
            stop,
            thread: Mutex::new(Some(thread)),
            peer_addr,
            invalidating: Arc::new(std::sync::atomic::AtomicUsize::new(0)),
            rf,
        }))
    }

    /// Where the peer transport listens.
    pub fn peer_addr(&self) -> SocketAddr {
        self.peer_addr
    }

    /// The node's current view, for `cachet stats`.
    pub fn stats(&self) -> ClusterStats {
        self.status.lock().map(|s| s.clone()).unwrap_or_default()
    }

    /// Stops the runtime thread.
    pub fn shutdown(&self) {
        let _ = self.stop.send(true);
        let thread = self.thread.lock().ok().and_then(|mut t| t.take());
        if let Some(thread) = thread {
            let _ = thread.join();
        }
    }

    async fn run(&self, op: Op, level: replica::Consistency) -> Result<Outcome, OpError> {
        let (reply, answer) = oneshot::channel();
        if self.commands.send(Command { op, level, reply }).is_err() {
            return Err(OpError::Unavailable);
        }
        answer.await.unwrap_or(Err(OpError::Unavailable))
    }

    /// The key's live record (`None` when absent, deleted or expired).
    async fn read_record(self: Arc<Self>, key: Bytes, level: replica::Consistency) -> Result<Option<Record>, OpError> {
        match self.run(Op::Get { key }, level).await? {
            Outcome::Read(record) => Ok(record.map(|r| as_of(r, unix_ms())).filter(|r| r.value.is_some())),
            Outcome::Written(_) | Outcome::Updated(_) | Outcome::Flushed(_) | Outcome::Sizes(_) => {
                Err(OpError::Unavailable)
            }
        }
    }

    async fn read(self: Arc<Self>, key: Bytes, level: replica::Consistency) -> Result<Option<Bytes>, OpError> {
        Ok(self.read_record(key, level).await?.and_then(|r| r.value))
    }

    async fn write(
        self: Arc<Self>,
        key: Bytes,
        value: Option<Bytes>,
        level: replica::Consistency,
    ) -> Result<(), OpError> {
        self.write_expiring(key, value, None, 0, level).await
    }

    async fn write_expiring(
        self: Arc<Self>,
        key: Bytes,
        value: Option<Bytes>,
        expires_at: Option<u64>,
        hint: u32,
        level: replica::Consistency,
    ) -> Result<(), OpError> {
        self.run(Op::Put { key, value, expires_at, hint }, level).await.map(|_| ())
    }

    /// Takes the data commands of a clustered node: each becomes replicated
    /// operations coordinated here, answered later. `None` for commands
    /// that stay local (PING, STATS, admin). Commands the replicated store
    /// cannot do yet are refused with `NotSupported`, never served from the
    /// local shards (which would answer with data no other node has).
    pub fn route(self: &Arc<Self>, store: &Store, body: &Request, asked: Option<Consistency>) -> Option<Routed> {
        let level = level(asked.unwrap_or(self.default));
        let this = self.clone();
        let later = |f: std::pin::Pin<Box<dyn Future<Output = Response> + Send>>| Some(Routed::Later(f));
        match body {
            // A SET or DEL of a key whose namespace writes to its origin:
            // written there by the key's primary, serialized with its loads,
            // then to the replicas (the single node's rules for which
            // writes apply).
            Request::Set { key, value, ttl_ms, condition, .. } if self.writes_to_origin(key) => {
                if *condition != cachet_proto::Condition::Always {
                    return Some(Routed::Now(error(
                        ErrorCode::NotAllowed,
                        "conditional SET is not supported for keys written to an origin",
                    )));
                }
                if *ttl_ms == Some(0) {
                    return Some(Routed::Now(error(ErrorCode::InvalidArgument, "a TTL must be at least 1 ms")));
                }
                let wait_ms = self.loads(key).unwrap_or(0).min(replica::MAX_STORE_WAIT_MS);
                let update = Update::Store { value: Some(value.clone()), ttl_ms: *ttl_ms, wait_ms };
                self.updated(store, key, update, level)
            }
            Request::Del { keys } if keys.iter().any(|k| self.writes_to_origin(k)) => {
                let [key] = keys.as_slice() else {
                    return Some(Routed::Now(error(
                        ErrorCode::InvalidArgument,
                        "DEL of keys written to an origin takes one key at a time",
                    )));
                };
                let wait_ms = self.loads(key).unwrap_or(0).min(replica::MAX_STORE_WAIT_MS);
                let update = Update::Store { value: None, ttl_ms: None, wait_ms };
                let key = key.clone();
                later(Box::pin(async move {
                    match this.run(Op::Update { key, update }, level).await {
                        Ok(Outcome::Updated(Effect::Applied(existed))) => Response::Count(u64::from(existed)),
                        Ok(Outcome::Updated(effect)) => effect_response(effect),
                        Ok(_) => error(ErrorCode::Internal, "an update was answered as a read or write"),
                        Err(err) => op_error(err),
                    }
                }))
            }
            // A read-through GET: loaded at the key's primary, once for the
            // whole cluster however many members ask at once.
            Request::Get { key } if self.loads(key).is_some() => {
                let wait_ms = self.loads(key).unwrap_or(0);
                let fresh = self
                    .loaders
                    .get()
                    .and_then(|l| l.refresh_rule(key))
                    .map(|(grace_ms, beta_milli, draw)| super::update::FreshRule { grace_ms, beta_milli, draw });
                self.updated(store, key, Update::Load { wait_ms, fresh }, level)
            }
            Request::Get { key } => {
                let key = key.clone();
                later(Box::pin(async move {
                    match this.read(key, level).await {
                        Ok(value) => Response::Value(value),
                        Err(err) => op_error(err),
                    }
                }))
            }
            // Writes of loaded keys are serialized with their loads at the
            // primary: a load that read the origin before the write cannot
            // install over it.
            Request::Set { key, value, ttl_ms, condition: cachet_proto::Condition::Always, hint }
                if self.loads(key).is_none() =>
            {
                if let Some(refused) = check_record(store, key, value) {
                    return Some(Routed::Now(refused));
                }
                if *ttl_ms == Some(0) {
                    return Some(Routed::Now(error(ErrorCode::InvalidArgument, "a TTL must be at least 1 ms")));
                }
                // The expiry is fixed here, in wall-clock time, so every
                // replica expires the value at the same moment.
                let expires_at = ttl_ms.map(|ttl| unix_ms().saturating_add(ttl));
                let (key, value, hint) = (key.clone(), value.clone(), *hint);
                later(Box::pin(async move {
                    match this.write_expiring(key, Some(value), expires_at, hint, level).await {
                        Ok(()) => Response::Ok,
                        Err(err) => op_error(err),
                    }
                }))
            }
            Request::Ttl { key } => {
                let key = key.clone();
                later(Box::pin(async move {
                    match this.read_record(key, level).await {
                        Ok(None) => Response::Ttl(TtlState::Missing),
                        Ok(Some(Record { expires_at: None, .. })) => Response::Ttl(TtlState::Persistent),
                        Ok(Some(Record { expires_at: Some(at), .. })) => {
                            Response::Ttl(TtlState::Remaining(at.saturating_sub(unix_ms()).max(1)))
                        }
                        Err(err) => op_error(err),
                    }
                }))
            }
            Request::MSet { pairs } => {
                if let Some(refused) = pairs.iter().find_map(|(k, v)| check_record(store, k, v)) {
                    return Some(Routed::Now(refused));
                }
                // One batch message per owner carries them all.
                if pairs.len() > replica::MAX_BATCH_KEYS {
                    return Some(Routed::Now(error(
                        ErrorCode::TooLarge,
                        format!(
                            "an MSET on a cluster takes at most {} keys, not {}: send it in parts",
                            replica::MAX_BATCH_KEYS,
                            pairs.len()
                        ),
                    )));
                }
                if let Some(refused) = self.cross_owner(pairs.iter().map(|(k, _)| k)) {
                    return Some(Routed::Now(refused));
                }
                // Writes of loaded keys must be serialized with their loads
                // at the primary, one key at a time.
                if let Some((key, _)) = pairs.iter().find(|(k, _)| self.loads(k).is_some()) {
                    return Some(Routed::Now(error(
                        ErrorCode::NotSupported,
                        format!(
                            "MSET of `{}`, a key a loader covers, is not supported on a cluster: SET it on its own",
                            String::from_utf8_lossy(key).escape_debug()
                        ),
                    )));
                }
                // Written as one batch: every owner applies all of it or
                // none (see `replica::batch`). A key named twice keeps its
                // last value, as in Redis.
                let mut entries: Vec<replica::BatchEntry> = Vec::with_capacity(pairs.len());
                let mut at = HashMap::new();
                for (key, value) in pairs {
                    let entry =
                        replica::BatchEntry { key: key.clone(), value: Some(value.clone()), expires_at: None, hint: 0 };
                    match at.get(key) {
                        Some(&i) => entries[i] = entry,
                        None => {
                            at.insert(key.clone(), entries.len());
                            entries.push(entry);
                        }
                    }
                }
                later(Box::pin(async move {
                    match this.run(Op::PutMany { entries }, level).await {
                        Ok(_) => Response::Ok,
                        Err(err) => op_error(err),
                    }
                }))
            }
            Request::MGet { keys } | Request::Exists { keys } => {
                let exists = matches!(body, Request::Exists { .. });
                let keys = keys.clone();
                let limit = cachet_proto::MAX_REPLY_LEN - (64 << 10);
                // Whether the values could pass the reply limit at all: if
                // so, their sizes are asked first and the MGET refused
                // before any value is copied (see `replica::sizes`).
                let probe = !exists && keys.len().saturating_mul(store.config().max_value_size + 16) > limit;
                later(Box::pin(async move {
                    use futures_util::StreamExt as _;
                    let too_large = || {
                        error(
                            ErrorCode::TooLarge,
                            format!("the reply would exceed {} bytes; ask for fewer keys", cachet_proto::MAX_REPLY_LEN),
                        )
                    };
                    if probe {
                        match this.run(Op::Sizes { keys: keys.clone() }, level).await {
                            Ok(Outcome::Sizes(sizes)) => {
                                let total = sizes.iter().fold(0u64, |sum, &size| sum.saturating_add(size + 16));
                                if total > limit as u64 {
                                    return too_large();
                                }
                            }
                            Ok(_) => {
                                return error(ErrorCode::Internal, "a size probe was answered as another operation");
                            }
                            Err(err) => return op_error(err),
                        }
                    }
                    // A bounded number of reads at once, and the reply's
                    // size still checked as values arrive (they may have
                    // grown since the probe): what a coordinator holds for
                    // one request stays under the reply limit plus the reads
                    // in flight.
                    let mut reads = futures_util::stream::iter(keys)
                        .map(|k| this.clone().read(k, level))
                        .buffered(MGET_READS_AT_ONCE);
                    let mut values = Vec::new();
                    let mut total = 0usize;
                    while let Some(value) = reads.next().await {
                        let value = match value {
                            Ok(value) => value,
                            Err(err) => return op_error(err),
                        };
                        total += value.as_ref().map_or(0, |v| v.len()) + 16;
                        if total > limit && !exists {
                            return too_large();
                        }
                        values.push(if exists { value.map(|_| Bytes::new()) } else { value });
                    }
                    if exists {
                        Response::Count(values.iter().filter(|v| v.is_some()).count() as u64)
                    } else {
                        Response::Values(values)
                    }
                }))
            }
            // How many existed is read first, then the deletions are written
            // (tombstones, so repair cannot bring the values back).
            Request::Del { keys } => {
                // A key named twice is deleted (and counted) once, as in Redis.
                let mut keys = keys.clone();
                let mut seen = std::collections::HashSet::new();
                keys.retain(|k| seen.insert(k.clone()));
                later(Box::pin(async move {
                    let deletes = keys.into_iter().map(|key| {
                        let this = this.clone();
                        async move {
                            if this.loads(&key).is_some() {
                                return match this.run(Op::Update { key, update: Update::Expire(0) }, level).await? {
                                    Outcome::Updated(Effect::Applied(existed)) => Ok(existed),
                                    _ => Err(OpError::Unavailable),
                                };
                            }
                            let existed = this.clone().read(key.clone(), level).await?.is_some();
                            this.write(key, None, level).await?;
                            Ok::<bool, OpError>(existed)
                        }
                    });
                    let results: Result<Vec<bool>, _> =
                        futures_util::future::join_all(deletes).await.into_iter().collect();
                    match results {
                        Ok(existed) => Response::Count(existed.iter().filter(|&&e| e).count() as u64),
                        Err(err) => op_error(err),
                    }
                }))
            }
            // Read-modify-writes run at the key's primary owner, one at a
            // time per key there (see `super::update`).
            Request::Set { key, value, ttl_ms, condition, hint } => {
                let update = Update::Set {
                    value: value.clone(),
                    ttl_ms: *ttl_ms,
                    keep_ttl: false,
                    condition: *condition,
                    get: false,
                    hint: *hint,
                };
                self.updated(store, key, update, level)
            }
            Request::SetWith { key, value, ttl_ms, keep_ttl, condition, get, hint } => {
                let update = Update::Set {
                    value: value.clone(),
                    ttl_ms: *ttl_ms,
                    keep_ttl: *keep_ttl,
                    condition: *condition,
                    get: *get,
                    hint: *hint,
                };
                self.updated(store, key, update, level)
            }
            Request::Incr { key, delta } => self.updated(store, key, Update::Incr(*delta), level),
            Request::Append { key, value } => self.updated(store, key, Update::Append(value.clone()), level),
            Request::GetDel { key } => self.updated(store, key, Update::GetDel, level),
            Request::GetEx { key, ttl } => self.updated(store, key, Update::GetEx(*ttl), level),
            Request::Persist { key } => self.updated(store, key, Update::Persist, level),
            Request::Expire { key, ttl_ms } => self.updated(store, key, Update::Expire(*ttl_ms), level),
            Request::Strlen { key } => {
                let key = key.clone();
                later(Box::pin(async move {
                    match this.read(key, level).await {
                        Ok(value) => Response::Integer(value.map_or(0, |v| v.len()) as i64),
                        Err(err) => op_error(err),
                    }
                }))
            }
            // Redis Cluster's DBSIZE counts the node asked: here the records
            // this member holds (deletions kept for a while included).
            Request::DbSize => Some(Routed::Now(Response::Count(store.len()))),
            // Every member drops its records; refused unless every member is
            // up (one that missed it would repair its records back).
            Request::FlushAll => later(Box::pin(async move {
                match this.run(Op::FlushAll, level).await {
                    Ok(Outcome::Flushed(dropped)) => Response::Count(dropped),
                    Ok(_) => error(ErrorCode::Internal, "FLUSHALL was answered as another operation"),
                    Err(OpError::Unavailable) => error(
                        ErrorCode::Unavailable,
                        "FLUSHALL needs every member of the cluster up (one that missed it would bring its \
                         records back); retry when `cachet stats` shows them all alive",
                    ),
                    Err(err) => op_error(err),
                }
            })),
            Request::Ping | Request::Stats | Request::Admin { .. } => None,
        }
    }
}

impl Cluster {
    /// Makes the node's loaders run at each key's primary owner: GETs of
    /// their namespaces load there once, writes of those keys are
    /// serialized with the loads, and a CDC notification deletes the key on
    /// every replica. Refused for namespaces that write to their origin.
    pub fn attach_loaders(self: &Arc<Self>, loaders: &Arc<Loaders>) -> Result<(), String> {
        let this = Arc::downgrade(self);
        loaders.replicate(Box::new(move |key| {
            if let Some(this) = this.upgrade() {
                this.invalidate(key);
            }
        }))?;
        self.loaders.set(loaders.clone()).map_err(|_| "the cluster already has loaders".to_string())
    }

    /// Deletes `key` on every replica, through its primary (serialized with
    /// a load in flight), retrying with back-off for up to
    /// [`INVALIDATE_FOR`] when it fails (a primary failing over, a member
    /// not serving yet): a lost invalidation would leave a stale value
    /// until its TTL. A retried delete may remove a value loaded since,
    /// which only costs a load. Beyond [`MAX_INVALIDATING`] at once (the
    /// cluster down under a flood of changes) each is tried once.
    fn invalidate(self: &Arc<Self>, key: Bytes) {
        use std::sync::atomic::Ordering;
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            let (reply, _) = oneshot::channel();
            let op = Op::Update { key, update: Update::Expire(0) };
            let _ = self.commands.send(Command { op, level: level(self.default), reply });
            return;
        };
        let retry = self.invalidating.fetch_add(1, Ordering::AcqRel) < MAX_INVALIDATING;
        let this = self.clone();
        runtime.spawn(async move {
            let give_up = Instant::now() + INVALIDATE_FOR;
            let mut wait = Duration::from_millis(50);
            loop {
                let op = Op::Update { key: key.clone(), update: Update::Expire(0) };
                match this.run(op, level(this.default)).await {
                    Ok(_) => break,
                    Err(err) if retry && Instant::now() + wait < give_up => {
                        tracing::debug!(?err, "a CDC invalidation failed; retrying");
                        tokio::time::sleep(wait).await;
                        wait = (wait * 2).min(Duration::from_secs(2));
                    }
                    Err(err) => {
                        tracing::error!(
                            key = %key.escape_ascii(),
                            ?err,
                            "a CDC invalidation could not be applied; the value lives until its TTL"
                        );
                        break;
                    }
                }
            }
            this.invalidating.fetch_sub(1, Ordering::AcqRel);
        });
    }

    /// A refusal when `keys` do not all have the same owners (the same
    /// primary first): MSET implies atomicity, which a batch written as one
    /// (`replica::batch`) gives only to keys the same members hold (Redis
    /// Cluster's CROSSSLOT). The SDK's `ClusterClient::mset` splits by
    /// owner; `{hash tags}` put keys together.
    fn cross_owner<'a>(&self, mut keys: impl Iterator<Item = &'a Bytes>) -> Option<Response> {
        let ring = self.ring.lock().ok()?.clone()?;
        let owners = |key: &[u8]| {
            let all: Vec<String> = ring.owners(key, self.rf).iter().map(|m| m.id.clone()).collect();
            let mut set = all.clone();
            set.sort();
            (all.first().cloned(), set)
        };
        let first = owners(keys.next()?);
        let other = keys.find(|k| owners(k) != first)?;
        Some(error(
            ErrorCode::NotSupported,
            format!(
                "CROSSSLOT MSET keys belong to different members (`{}` is not with the first key's): a \
                 cluster cannot write them atomically; send one MSET per owner (ClusterClient::mset \
                 does) or give the keys one {{hash tag}}",
                String::from_utf8_lossy(other).escape_debug()
            ),
        ))
    }

    /// Whether `key`'s loader namespace writes to its origin.
    fn writes_to_origin(&self, key: &[u8]) -> bool {
        self.loaders.get().is_some_and(|l| l.write_mode(key).is_some())
    }

    /// The load timeout of `key`'s loader namespace; `None` when no loader
    /// covers it.
    fn loads(&self, key: &[u8]) -> Option<u64> {
        self.loaders.get()?.load_timeout_ms(key)
    }

    /// A read-modify-write of `key` at its primary owner, answered later.
    fn updated(
        self: &Arc<Self>,
        store: &Store,
        key: &Bytes,
        update: Update,
        level: replica::Consistency,
    ) -> Option<Routed> {
        if let Some(refused) = check_record(store, key, &update_value(&update)) {
            return Some(Routed::Now(refused));
        }
        let (this, key) = (self.clone(), key.clone());
        Some(Routed::Later(Box::pin(async move {
            match this.run(Op::Update { key, update }, level).await {
                Ok(Outcome::Updated(effect)) => effect_response(effect),
                Ok(_) => error(ErrorCode::Internal, "an update was answered as a read or write"),
                Err(err) => op_error(err),
            }
        })))
    }
}

/// The value an update carries, for the size checks (empty for none).
fn update_value(update: &Update) -> Bytes {
    match update {
        Update::Set { value, .. } | Update::Append(value) | Update::Store { value: Some(value), .. } => value.clone(),
        _ => Bytes::new(),
    }
}

/// The answer to one load the replica asked for: sent once, and on drop
/// if it never was.
struct LoadAnswer {
    tx: mpsc::UnboundedSender<(u64, LoaderAnswer)>,
    id: u64,
    /// A store (answered with [`LoaderAnswer::Stored`]), not a load.
    store: bool,
    sent: bool,
}

/// What the loader did for a [`replica::LoadRequest`].
enum LoaderAnswer {
    Loaded(replica::LoadResult),
    Stored(replica::StoreResult),
}

impl LoadAnswer {
    fn send(&mut self, answer: LoaderAnswer) {
        self.sent = true;
        let _ = self.tx.send((self.id, answer));
    }

    /// The answer when the loader could not be asked, or ended early.
    fn failed(&mut self, message: &str) {
        let effect = Effect::LoadFailed { origin: false, message: message.to_string() };
        self.send(if self.store { LoaderAnswer::Stored(Err(effect)) } else { LoaderAnswer::Loaded(Err(effect)) });
    }
}

impl Drop for LoadAnswer {
    fn drop(&mut self) {
        if !self.sent {
            self.failed(if self.store {
                "the store ended without an answer"
            } else {
                "the load ended without an answer"
            });
        }
    }
}

/// A loader's error as the update's answer.
fn loader_failed(err: ErrorReply) -> Effect {
    Effect::LoadFailed { origin: err.code == ErrorCode::OriginFailed, message: err.message }
}

/// The reply to an update, as a single node gives it.
fn effect_response(effect: Effect) -> Response {
    match effect {
        Effect::Integer(n) => Response::Integer(n),
        Effect::Value(value) => Response::Value(value),
        Effect::Applied(applied) => Response::Applied(applied),
        Effect::Ok => Response::Ok,
        Effect::NotAnInteger => error(ErrorCode::WrongType, "value is not a decimal 64-bit integer"),
        Effect::Overflow => error(ErrorCode::WrongType, "increment would overflow a 64-bit integer"),
        Effect::LoadFailed { origin, message } => {
            error(if origin { ErrorCode::OriginFailed } else { ErrorCode::LoadFailed }, message)
        }
        Effect::TooLarge { len, limit } => {
            error(ErrorCode::TooLarge, format!("the value would be {len} bytes; values are limited to {limit}"))
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let _ = self.stop.send(true);
    }
}

/// The last incarnation this node went by, in its data directory.
const INCARNATION_FILE: &str = "cluster-incarnation";

/// The incarnation to start with: the wall clock in milliseconds, so it
/// outranks whatever the others remember of this node, but never at or
/// below the last one used. A clock stepped back further than the node
/// was down would otherwise make the others keep the old, down identity
/// and ignore the new one (foca forgets down members only after a day).
fn next_incarnation(path: &std::path::Path, now_ms: u64) -> u64 {
    let last = std::fs::read_to_string(path).ok().and_then(|text| text.trim().parse::<u64>().ok());
    let next = last.map_or(now_ms, |last| now_ms.max(last.saturating_add(1)));
    save_incarnation(path, next);
    next
}

/// Written to a temporary file and renamed, like the member list.
fn save_incarnation(path: &std::path::Path, incarnation: u64) {
    let tmp = path.with_extension("tmp");
    let saved = std::fs::write(&tmp, format!("{incarnation}\n")).and_then(|()| std::fs::rename(&tmp, path));
    if let Err(err) = saved {
        tracing::warn!(%err, file = %path.display(), "cannot save the node's incarnation");
    }
}

/// The member list in a node's data directory: `ID ADDRESS` per line.
const MEMBERS_FILE: &str = "cluster-members";

fn load_members(path: &std::path::Path) -> Vec<(NodeIx, SocketAddr)> {
    let Ok(text) = std::fs::read_to_string(path) else { return Vec::new() };
    text.lines()
        .filter_map(|line| {
            let (id, addr) = line.split_once(' ')?;
            match (id.parse(), addr.parse()) {
                (Ok(id), Ok(addr)) => Some((id, addr)),
                _ => {
                    tracing::warn!(line, file = %path.display(), "an unreadable member line; ignored");
                    None
                }
            }
        })
        .collect()
}

/// Written to a temporary file and renamed, so a crash leaves the old list
/// or the new one.
fn save_members(path: &std::path::Path, peers: &std::collections::BTreeMap<NodeIx, SocketAddr>) {
    let text: String = peers.iter().map(|(id, addr)| format!("{id} {addr}\n")).collect();
    let tmp = path.with_extension("tmp");
    let saved = std::fs::write(&tmp, text).and_then(|()| std::fs::rename(&tmp, path));
    if let Err(err) = saved {
        tracing::warn!(%err, file = %path.display(), "cannot save the member list");
    }
}

/// A node builds its ring once no new member has shown up for this long
/// (so it does not re-sync against half a cluster).
const SETTLE_MS: u64 = 1_000;

/// The runtime thread's state.
struct Shell {
    me: NodeIx,
    config: ReplicaConfig,
    /// Every known member's peer address (this node's included), by id.
    peers: std::collections::BTreeMap<NodeIx, SocketAddr>,
    by_addr: HashMap<SocketAddr, NodeIx>,
    transport: Arc<PeerTransport>,
    senders: HashMap<SocketAddr, mpsc::Sender<PeerFrame>>,
    /// `None` while a joining node waits for the member list to settle.
    replica: Option<Replica>,
    store: Option<Box<dyn RecordStore>>,
    /// When the member list last grew.
    changed_at: u64,
    /// Members heard to be up since this node started.
    heard: std::collections::BTreeSet<NodeIx>,
    /// Until when members never heard from still count as up.
    grace_until: u64,
    /// The members of the serving ring last handed to the replica.
    serving: Vec<NodeIx>,
    /// Members back up after this node dropped them from its ring: they
    /// stay out of it until they answer a `Readmit` (by nonce), which
    /// makes them re-sync everything first, since they missed the writes
    /// made meanwhile. The value is the nonce; the time of the next resend
    /// is in `readmit_at`.
    held_out: std::collections::BTreeMap<NodeIx, u64>,
    readmit_at: u64,
    /// Members this node dropped from its ring while it had a majority:
    /// held out when they come back, until readmitted.
    dropped: std::collections::BTreeSet<NodeIx>,
    /// Members this node readmitted since they were last down: a `Readmit`
    /// from one of them (it had dropped this node while cut off) is
    /// acknowledged without a re-sync, like one from a dropped member.
    readmitted: std::collections::BTreeSet<NodeIx>,
    /// Members this node had dropped when it lost its majority: they may
    /// hold writes it missed, so when they are readmitted it pulls from
    /// them, even after the re-sync it did on getting a majority back.
    owe_pull: std::collections::BTreeSet<NodeIx>,
    /// When the loop last turned (see `check_stall`).
    last_turn: u64,
    /// The failure detector's budget (`--detect-ms`).
    detect_ms: u64,
    /// Started with the founding member list (not joining through seeds).
    founder: bool,
    /// Where the member list is kept across restarts.
    members_file: PathBuf,
    /// Where the last incarnation is kept, renewals included.
    incarnation_file: PathBuf,
    membership: Membership,
    started: Instant,
    boot: u64,
    waiting: HashMap<u64, oneshot::Sender<Result<Outcome, OpError>>>,
    /// The node's loaders (set once attached), which run the loads the
    /// replica asks for as a key's primary.
    loaders: Arc<std::sync::OnceLock<Arc<Loaders>>>,
    /// The serving ring, shared with [`Cluster`] for checks made before a
    /// request reaches the replica.
    shared_ring: Arc<Mutex<Option<Arc<Ring>>>>,
    /// Loads finished, for [`Replica::loaded`].
    loaded_tx: mpsc::UnboundedSender<(u64, LoaderAnswer)>,
    loaded_rx: Option<mpsc::UnboundedReceiver<(u64, LoaderAnswer)>>,
    next_op: u64,
    status: Arc<Mutex<ClusterStats>>,
    alive: std::collections::BTreeMap<NodeIx, bool>,
    clients: std::collections::BTreeMap<NodeIx, String>,
    ops_ok: u64,
    ops_failed: u64,
    /// When the stats' expensive part was last refreshed.
    status_at: u64,
    /// Peer messages refused by [`Replica::check`] since the start.
    refused: u64,
    /// When a refusal was last logged, and the refusals not logged since:
    /// a hostile peer's flood is a line a second, not a line each.
    refused_log: (Option<u64>, u64),
    /// Peer frames dropped since the start because their sender claimed
    /// to be another member than its certificate names
    /// ([`Shell::refuse_impostor`]).
    impostor_frames: u64,
    /// Such drops are logged at most once a second.
    impostor_log: crate::clients::LogLimiter,
    /// Where each member last spoke from itself (a gossip datagram whose
    /// certificate names it, sent from the address it gives): news relayed
    /// by others of a member at another address waits for this.
    verified: std::collections::BTreeMap<NodeIx, SocketAddr>,
    /// Members relayed as up at an address not confirmed by the member
    /// itself: taken in when it speaks from there ([`Shell::confirm`]).
    unconfirmed: std::collections::BTreeMap<NodeIx, Peer>,
}

impl Shell {
    fn new(
        options: ClusterOptions,
        listen: SocketAddr,
        transport: Arc<PeerTransport>,
        status: Arc<Mutex<ClusterStats>>,
        store: Box<dyn RecordStore>,
        (max_key_len, max_value_len): (usize, usize),
    ) -> Self {
        let (loaded_tx, loaded_rx) = mpsc::unbounded_channel();
        let me = options.node_id;
        let boot = boot_nonce();
        let config = ReplicaConfig {
            rf: options.replication_factor,
            request_timeout_ms: options.request_timeout_ms,
            // `now` counts from here (`started` below).
            wall_epoch_ms: unix_ms(),
            max_key_len,
            max_value_len,
            ..ReplicaConfig::default()
        };
        // A restarted node is a new incarnation, so the others take its
        // announcement over their memory of the dead one.
        let incarnation = next_incarnation(&options.data_dir.join(INCARNATION_FILE), unix_ms());
        let myself = Peer {
            node: me.to_string(),
            addr: listen.to_string(),
            incarnation,
            client: options.client_addr.to_string(),
        };
        let mut membership =
            Membership::new(myself, MembershipConfig { detect_within_ms: options.detect_within_ms }, boot);
        let mut peers: std::collections::BTreeMap<NodeIx, SocketAddr> =
            options.members.iter().enumerate().map(|(i, a)| (i as NodeIx, *a)).collect();
        // Members that joined since the founding list, as this node saw
        // them before it restarted: it must wait for their re-sync too, even
        // if they are down now and nobody tells it they exist.
        let members_file = options.data_dir.join(MEMBERS_FILE);
        for (id, addr) in load_members(&members_file) {
            // Not this node (under another id, or at another address), and
            // no address twice.
            if id == me || addr == listen || peers.values().any(|a| *a == addr) {
                continue;
            }
            peers.entry(id).or_insert(addr);
        }
        peers.insert(me, listen);
        save_members(&members_file, &peers);
        // Founders know each other by id; a joiner knows only addresses,
        // and learns ids from the members' answers.
        let contacts: Vec<Peer> = if options.members.is_empty() {
            options
                .seeds
                .iter()
                .map(|a| Peer { node: format!("seed {a}"), addr: a.to_string(), incarnation: 0, client: String::new() })
                .collect()
        } else {
            peers
                .iter()
                .filter(|&(&i, _)| i != me)
                .map(|(i, a)| Peer { node: i.to_string(), addr: a.to_string(), incarnation: 0, client: String::new() })
                .collect()
        };
        for contact in contacts {
            if let Err(err) = membership.join(0, contact) {
                tracing::warn!(%err, "cannot announce to a member");
            }
        }
        let alive = peers.keys().map(|&i| (i, true)).collect();
        Self {
            me,
            config,
            by_addr: peers.iter().map(|(&i, &a)| (a, i)).collect(),
            peers,
            transport,
            senders: HashMap::new(),
            replica: None,
            store: Some(store),
            changed_at: 0,
            heard: std::collections::BTreeSet::new(),
            grace_until: 2 * options.detect_within_ms + SETTLE_MS,
            serving: Vec::new(),
            held_out: std::collections::BTreeMap::new(),
            readmit_at: 0,
            dropped: std::collections::BTreeSet::new(),
            readmitted: std::collections::BTreeSet::new(),
            owe_pull: std::collections::BTreeSet::new(),
            last_turn: 0,
            detect_ms: options.detect_within_ms,
            founder: !options.members.is_empty(),
            members_file,
            incarnation_file: options.data_dir.join(INCARNATION_FILE),
            membership,
            started: Instant::now(),
            boot,
            waiting: HashMap::new(),
            loaders: Arc::default(),
            shared_ring: Arc::default(),
            loaded_tx,
            loaded_rx: Some(loaded_rx),
            next_op: 1,
            status,
            alive,
            clients: [(me, options.client_addr.to_string())].into_iter().collect(),
            ops_ok: 0,
            ops_failed: 0,
            status_at: 0,
            refused: 0,
            refused_log: (None, 0),
            impostor_frames: 0,
            impostor_log: crate::clients::LogLimiter::new(1_000),
            verified: std::collections::BTreeMap::new(),
            unconfirmed: std::collections::BTreeMap::new(),
        }
    }

    fn now(&self) -> u64 {
        self.started.elapsed().as_millis() as u64
    }

    /// The members that serve (see [`serving`]).
    fn serving_members(&self) -> Vec<NodeIx> {
        serving(self.me, self.peers.keys().copied(), &self.alive, &self.held_out).0
    }

    /// The serving ring. Its epoch is the known member count (members are
    /// never forgotten, so nodes that know the same members agree on it);
    /// who serves is in the stats' `alive`.
    fn ring(&self) -> Option<Arc<Ring>> {
        let members = self
            .serving_members()
            .into_iter()
            .filter_map(|i| self.peers.get(&i).map(|a| Member { id: i.to_string(), addr: a.to_string(), weight: 1 }))
            .collect::<Vec<_>>();
        match Ring::new(self.peers.len() as u64, members, cachet_proto::DEFAULT_VNODES) {
            Ok(ring) => Some(Arc::new(ring)),
            Err(err) => {
                tracing::error!(%err, "cannot build the ring");
                None
            }
        }
    }

    /// Starts the replica, empty and re-syncing from every known member.
    fn build_replica(&mut self, now: u64) {
        let (Some(ring), Some(store)) = (self.ring(), self.store.take()) else { return };
        let nodes = self.peers.keys().max().map_or(1, |m| m + 1);
        let (serving, quorate) = serving(self.me, self.peers.keys().copied(), &self.alive, &self.held_out);
        self.serving = serving;
        if let Ok(mut shared) = self.shared_ring.lock() {
            *shared = Some(ring.clone());
        }
        let mut replica = Replica::with_store(self.me, nodes, ring, self.config, self.boot, store);
        replica.join(now, self.boot);
        replica.set_quorate(now, quorate);
        for (&node, &up) in &self.alive {
            if node != self.me {
                replica.set_alive(now, node, up);
            }
        }
        tracing::info!(members = self.peers.len(), "replica started; re-syncing");
        self.replica = Some(replica);
    }

    /// A member this node did not know joined: it takes its share of the
    /// ring at once.
    fn learn(&mut self, now: u64, node: NodeIx, addr: SocketAddr) {
        if self.peers.get(&node) == Some(&addr) {
            return;
        }
        if let Some(old) = self.peers.insert(node, addr) {
            self.by_addr.remove(&old);
        }
        self.by_addr.insert(addr, node);
        // Its sender dials expecting the member known there when it started
        // (see `send_to`): a new one starts with the new expectation.
        self.senders.remove(&addr);
        self.changed_at = now;
        save_members(&self.members_file, &self.peers);
        tracing::info!(node, %addr, members = self.peers.len(), "member joined the ring");
        self.refresh_ring(now);
    }

    /// Hands the replica the serving ring when its members changed.
    fn refresh_ring(&mut self, now: u64) {
        if self.replica.is_none() {
            return;
        }
        let (serving, quorate) = serving(self.me, self.peers.keys().copied(), &self.alive, &self.held_out);
        // Dropped: left a ring that had a majority for one that still has
        // one (losing the majority keeps every member in the ring, and
        // drops nobody).
        let was_quorate = self.replica.as_ref().is_some_and(Replica::quorate);
        if quorate && was_quorate {
            let gone: Vec<NodeIx> = self.serving.iter().copied().filter(|n| !serving.contains(n)).collect();
            self.dropped.extend(gone);
        }
        if !quorate {
            self.owe_pull.extend(self.dropped.iter().copied());
        }
        if let Some(replica) = self.replica.as_mut() {
            if replica.counted() != quorate && !quorate {
                tracing::warn!("this node sees a minority of the members up; it counts for nothing");
            }
            replica.set_quorate(now, quorate);
        }
        if serving == self.serving {
            return;
        }
        let Some(ring) = self.ring() else { return };
        tracing::info!(serving = ?serving, was = ?self.serving, "serving ring changed");
        self.serving = serving;
        if let Ok(mut shared) = self.shared_ring.lock() {
            *shared = Some(ring.clone());
        }
        if let Some(replica) = self.replica.as_mut() {
            replica.set_ring(now, ring);
        }
    }

    /// Members never heard from since this node started count as down
    /// once the grace period is over (a restarted node must not wait for
    /// a member that died while it was away; if that member is up after
    /// all, its gossip brings it back).
    fn end_grace(&mut self, now: u64) {
        if now < self.grace_until || self.grace_until == 0 {
            return;
        }
        self.grace_until = 0;
        let silent: Vec<NodeIx> =
            self.peers.keys().copied().filter(|i| *i != self.me && !self.heard.contains(i)).collect();
        for node in silent {
            tracing::warn!(node, "member not heard from since start; counted as down");
            self.alive.insert(node, false);
            if let Some(replica) = self.replica.as_mut() {
                replica.set_alive(now, node, false);
            }
        }
        self.refresh_ring(now);
    }

    /// Fences the replica after this loop overslept its wake-up (a paused
    /// process, a starved thread) for as long as the others need to
    /// declare a silent node down (a probe period plus the suspicion time,
    /// see `membership`): checked before anything queued meanwhile is
    /// handled. The loop's own work does not count (a long snapshot is not
    /// a pause), and it wakes at least every 100 ms when idle.
    fn check_stall(&mut self, wake: u64) {
        let now = self.now();
        let budget = self.detect_ms.max(400);
        let overslept = now.saturating_sub(wake.max(self.last_turn));
        if self.last_turn > 0 && overslept > budget / 8 + budget * 3 / 10 {
            tracing::warn!(overslept_ms = overslept, "the cluster loop stalled; fenced until readmitted");
            if let Some(replica) = self.replica.as_mut() {
                replica.stalled(now + 2 * budget);
            }
        }
        self.last_turn = now;
    }

    async fn run(
        mut self,
        mut commands: mpsc::UnboundedReceiver<Command>,
        mut incoming: mpsc::Receiver<Incoming>,
        mut stopped: watch::Receiver<bool>,
    ) {
        tracing::info!(node = self.me, members = ?self.peers, "cluster runtime started");
        let Some(mut loaded) = self.loaded_rx.take() else { return };
        loop {
            self.flush();
            let now = self.now();
            let next = [self.replica.as_ref().and_then(Replica::poll_timeout), self.membership.poll_timeout()]
                .into_iter()
                .flatten()
                .min()
                .unwrap_or(now + 100)
                .clamp(now, now + 100);
            let wake = tokio::time::Instant::from_std(self.started + Duration::from_millis(next));
            tokio::select! {
                command = commands.recv() => {
                    self.check_stall(next);
                    let Some(command) = command else { break };
                    let now = self.now();
                    match self.replica.as_mut() {
                        Some(replica) => {
                            let id = self.next_op;
                            self.next_op += 1;
                            self.waiting.insert(id, command.reply);
                            replica.client(now, id, command.op, command.level);
                        }
                        // Still joining: no ring to route by yet.
                        None => {
                            let _ = command.reply.send(Err(OpError::Unavailable));
                        }
                    }
                }
                frame = incoming.recv() => {
                    self.check_stall(next);
                    let Some(frame) = frame else { break };
                    self.handle(frame);
                }
                Some((id, answer)) = loaded.recv() => {
                    let now = self.now();
                    if let Some(replica) = self.replica.as_mut() {
                        match answer {
                            LoaderAnswer::Loaded(result) => replica.loaded(now, id, result),
                            LoaderAnswer::Stored(result) => replica.stored(now, id, result),
                        }
                    }
                }
                _ = tokio::time::sleep_until(wake) => {
                    self.check_stall(next);
                    let now = self.now();
                    if let Some(replica) = self.replica.as_mut() {
                        replica.tick(now);
                    }
                    self.membership.tick(now);
                    let known = self.founder || self.peers.len() > 1;
                    if self.replica.is_none() && known && now >= self.changed_at + SETTLE_MS {
                        // Founders too: a founder restarted after others
                        // joined hears of them first.
                        self.build_replica(now);
                    }
                    if self.replica.is_some() {
                        self.end_grace(now);
                    }
                    self.readmit(now);
                }
                _ = stopped.changed() => break,
            }
        }
        self.leave().await;
        tracing::info!(node = self.me, "cluster runtime stopped");
    }

    /// A stop is a departure: the others hear of it now and move this
    /// node's ranges at once, rather than fail requests to it until their
    /// failure detector gives up on it. The farewell goes out on streams of
    /// its own (not behind a re-sync batch or a dead peer's dial in the
    /// queues) and is waited for until acknowledged, within a bound, since a
    /// peer that is itself gone must not hold up the stop. Then the peer
    /// connections are closed, so a quick restart finds none half-dead.
    async fn leave(&mut self) {
        if let Err(err) = self.membership.leave(self.now()) {
            tracing::debug!(%err, "membership leave");
        }
        let mut farewells = tokio::task::JoinSet::new();
        while let Some((peer, data)) = self.membership.poll_transmit() {
            let Ok(addr) = peer.addr.parse::<SocketAddr>() else { continue };
            let transport = self.transport.clone();
            farewells.spawn(async move { (addr, transport.send_acknowledged(addr, &PeerFrame::Gossip(data)).await) });
        }
        let told = tokio::time::timeout(LEAVE_GRACE, async {
            let mut told = 0;
            while let Some(done) = farewells.join_next().await {
                match done {
                    Ok((_, Ok(()))) => told += 1,
                    Ok((addr, Err(err))) => tracing::debug!(%addr, %err, "farewell not delivered"),
                    Err(err) => tracing::debug!(%err, "farewell task"),
                }
            }
            told
        })
        .await;
        self.transport.close_and_wait(Duration::from_millis(100)).await;
        match told {
            Ok(told) => tracing::info!(node = self.me, told, "left the cluster"),
            Err(_) => tracing::warn!(node = self.me, "left the cluster; not every farewell was acknowledged in time"),
        }
    }

    /// Drops a frame whose sender claims to be another member than its
    /// certificate names (`claimed` says whom): counted in the stats, and
    /// logged at most once a second, naming both.
    fn refuse_impostor(&mut self, now: u64, from: SocketAddr, certified: u32, claimed: &str) {
        self.impostor_frames += 1;
        if let Some(suppressed) = self.impostor_log.check(now) {
            tracing::error!(
                %from,
                certified,
                suppressed,
                total = self.impostor_frames,
                "peer frame dropped: the sender's certificate names node {certified} but it claims to be {claimed}"
            );
        }
    }

    /// A member up or down, as the gossip tells. A member up at an address
    /// this node does not know it at (a joiner, or one that moved) is taken
    /// in only once it has spoken from there itself: news relayed by a
    /// member holding a valid certificate could otherwise point another
    /// member's traffic at an address that cannot serve it.
    fn member_event(&mut self, now: u64, peer: Peer, up: bool) {
        let (Ok(ix), Ok(addr)) = (peer.node.parse::<NodeIx>(), peer.addr.parse::<SocketAddr>()) else { return };
        if ix > replica::MAX_NODE_ID {
            tracing::warn!(node = ix, "a member with an id over the limit; ignored");
            return;
        }
        if ix == self.me {
            return;
        }
        // The last news of an address the member has left (it restarted
        // elsewhere) says nothing about the member.
        if !up && self.peers.get(&ix).is_some_and(|known| *known != addr) {
            self.unconfirmed.remove(&ix);
            return;
        }
        if up && !up_believed(self.peers.get(&ix), self.verified.get(&ix), &addr) {
            tracing::debug!(node = ix, %addr, "member relayed up at a new address; waiting to hear from it there");
            self.unconfirmed.insert(ix, peer);
            return;
        }
        self.unconfirmed.remove(&ix);
        if up {
            tracing::info!(node = ix, "member up");
            // Back after this node dropped it from its ring: it serves
            // again once it has answered a `Readmit`.
            if self.dropped.contains(&ix) && !self.held_out.contains_key(&ix) {
                let nonce = self.boot ^ now.rotate_left(17) ^ u64::from(ix);
                self.held_out.insert(ix, nonce);
                self.readmit_at = now;
            }
            self.heard.insert(ix);
            self.learn(now, ix, addr);
            if !peer.client.is_empty() {
                self.clients.insert(ix, peer.client.clone());
            }
        } else {
            tracing::warn!(node = ix, "member down");
            self.held_out.remove(&ix);
            self.readmitted.remove(&ix);
        }
        self.alive.insert(ix, up);
        if let Some(replica) = self.replica.as_mut() {
            replica.set_alive(now, ix, up);
        }
        self.refresh_ring(now);
    }

    /// `node` spoke from `addr` itself: news of it there held back
    /// ([`Shell::member_event`]) is taken in now.
    fn confirm(&mut self, now: u64, node: NodeIx, addr: SocketAddr) {
        if self.unconfirmed.get(&node).is_some_and(|p| p.addr.parse::<SocketAddr>().ok() == Some(addr))
            && let Some(peer) = self.unconfirmed.remove(&node)
        {
            self.member_event(now, peer, true);
        }
    }

    fn handle(&mut self, frame: Incoming) {
        let now = self.now();
        match frame.frame {
            // Gossip is how a joiner is first heard of: taken from any
            // member of the cluster's CA, as long as the datagram's sender
            // is the node its certificate names, speaking from the address
            // it gives (what the gossip says of others is relayed news).
            PeerFrame::Gossip(data) => {
                let (sender, relayed) = match Membership::read(&data) {
                    Ok(read) => read,
                    Err(err) => {
                        tracing::debug!(%err, from = %frame.from, "gossip refused");
                        return;
                    }
                };
                let claimed = sender.node.parse::<NodeIx>().ok();
                if claimed != Some(frame.node) || sender.addr.parse::<SocketAddr>().ok() != Some(frame.from) {
                    let claim = format!("node {} at {}", sender.node, sender.addr);
                    self.refuse_impostor(now, frame.from, frame.node, &claim);
                    return;
                }
                // Incarnations start at the wall clock and grow by one per
                // renewal: one far ahead of it is forged, and believing it
                // would leave the member no higher one to refute it with.
                let ceiling = unix_ms().saturating_add(super::version::MAX_LEAD_MS);
                if let Some(forged) = forged_incarnation(&sender, &relayed, ceiling) {
                    // Counted with the frames of impostors: a forged
                    // identity either way.
                    self.impostor_frames += 1;
                    if let Some(suppressed) = self.impostor_log.check(now) {
                        tracing::error!(
                            from = %frame.from,
                            node = %forged.node,
                            incarnation = forged.incarnation,
                            suppressed,
                            "gossip dropped: an incarnation far ahead of this node's clock"
                        );
                    }
                    return;
                }
                self.verified.insert(frame.node, frame.from);
                if let Err(err) = self.membership.handle_data(now, &data) {
                    tracing::debug!(%err, from = %frame.from, "gossip refused");
                }
                self.confirm(now, frame.node, frame.from);
            }
            PeerFrame::Replica(message) => {
                let Some(&from) = self.by_addr.get(&frame.from) else {
                    tracing::debug!(from = %frame.from, "a replica message from an address that is no member yet");
                    return;
                };
                // The address is the member's claim: the certificate must
                // name that member.
                if from != frame.node {
                    self.refuse_impostor(now, frame.from, frame.node, &format!("node {from}"));
                    return;
                }
                match (message, self.replica.as_mut()) {
                    // From a member this node dropped and has not taken
                    // back: from here, that member was the one cut off,
                    // and this node's copies kept receiving every write.
                    (Message::Readmit { nonce }, _)
                        if self.dropped.contains(&from) || self.readmitted.contains(&from) =>
                    {
                        tracing::info!(node = from, "readmitted by a member this node had dropped; no re-sync");
                        self.send_to(frame.from, PeerFrame::Replica(Message::ReadmitAck { nonce }));
                    }
                    (Message::ReadmitAck { nonce }, _) => {
                        if self.held_out.get(&from) == Some(&nonce) {
                            tracing::info!(node = from, "member readmitted to the ring");
                            self.held_out.remove(&from);
                            self.dropped.remove(&from);
                            self.readmitted.insert(from);
                            if self.owe_pull.remove(&from)
                                && let Some(replica) = self.replica.as_mut()
                            {
                                replica.pull_from(now, from);
                            }
                            self.refresh_ring(now);
                        }
                    }
                    (message, Some(replica)) => {
                        if let Err(err) = replica.handle(now, from, message) {
                            self.refused += 1;
                            let (last, suppressed) = &mut self.refused_log;
                            if last.is_some_and(|t| now < t + 1_000) {
                                *suppressed += 1;
                            } else {
                                *last = Some(now);
                                let suppressed = std::mem::take(suppressed);
                                tracing::warn!(node = from, %err, suppressed, total = self.refused, "peer message refused");
                            }
                        }
                    }
                    // No replica yet: the one built will re-sync everything.
                    (Message::Readmit { nonce }, None) => {
                        self.send_to(frame.from, PeerFrame::Replica(Message::ReadmitAck { nonce }));
                    }
                    (_, None) => {}
                }
            }
        }
    }

    /// Asks every held-out member again to re-sync and answer.
    fn readmit(&mut self, now: u64) {
        if self.held_out.is_empty() || now < self.readmit_at {
            return;
        }
        self.readmit_at = now + READMIT_EVERY_MS;
        let asks: Vec<(SocketAddr, u64)> =
            self.held_out.iter().filter_map(|(ix, &nonce)| self.peers.get(ix).map(|&a| (a, nonce))).collect();
        for (addr, nonce) in asks {
            self.send_to(addr, PeerFrame::Replica(Message::Readmit { nonce }));
        }
    }

    /// Carries everything the core produced out: membership changes into
    /// the ring and the replica, messages to the peers, replies to the
    /// waiting clients, and the view into the stats.
    fn flush(&mut self) {
        let now = self.now();
        while let Some(event) = self.membership.poll_event() {
            let (peer, up) = match event {
                MembershipEvent::Up(peer) => (peer, true),
                MembershipEvent::Down(peer) => (peer, false),
                // Nothing to do here: a member that had dropped this node
                // from its ring readmits it explicitly (`Readmit`), and the
                // minority side of a healed partition says so to members
                // that kept receiving every write.
                MembershipEvent::Rejoined => {
                    tracing::info!("renewed this node's identity after being declared down by some member");
                    save_incarnation(&self.incarnation_file, self.membership.me().incarnation);
                    continue;
                }
            };
            self.member_event(now, peer, up);
        }
        while let Some((peer, data)) = self.membership.poll_transmit() {
            match peer.addr.parse::<SocketAddr>() {
                Ok(addr) => self.send_to(addr, PeerFrame::Gossip(data)),
                Err(err) => tracing::debug!(%err, "gossip for an unparsable address"),
            }
        }
        if let Some(replica) = self.replica.as_mut() {
            let mut out = Vec::new();
            while let Some(message) = replica.poll_transmit() {
                out.push(message);
            }
            let mut replies = Vec::new();
            while let Some(reply) = replica.poll_reply() {
                replies.push(reply);
            }
            // Loads this node runs as a key's primary: on the loaders' own
            // runtime, answered through `loaded`.
            while let Some(replica::LoadRequest { id, key, kind }) = replica.poll_load() {
                let store = matches!(kind, replica::LoadKind::Store { .. });
                // Answers even if the task ends early (a panic, the runtime
                // stopping): the key's update queue waits on it.
                let mut answer = LoadAnswer { tx: self.loaded_tx.clone(), id, store, sent: false };
                let Some(loaders) = self.loaders.get() else {
                    answer.failed("this member has no loaders (start every member with the same --loaders)");
                    continue;
                };
                match kind {
                    replica::LoadKind::Store { value, ttl_ms } => {
                        let write = loaders.store_for_cluster(key, value, ttl_ms);
                        tokio::spawn(async move {
                            answer.send(LoaderAnswer::Stored(write.await.map_err(loader_failed)));
                        });
                    }
                    kind => {
                        let refresh = match kind {
                            replica::LoadKind::Refresh(refresh) => {
                                loaders.count_refresh(refresh.stale);
                                Some((refresh.current, refresh.expires_at))
                            }
                            _ => None,
                        };
                        let fetch = loaders.fetch(key, refresh);
                        tokio::spawn(async move {
                            answer.send(LoaderAnswer::Loaded(fetch.await.map_err(loader_failed)));
                        });
                    }
                }
            }
            for (to, message) in out {
                if let Some(&addr) = self.peers.get(&to) {
                    self.send_to(addr, PeerFrame::Replica(message));
                }
            }
            for reply in &replies {
                match &reply.result {
                    Ok(_) => self.ops_ok += 1,
                    Err(_) => self.ops_failed += 1,
                }
            }
            // The stats count an operation before its client hears back.
            self.update_status();
            for reply in replies {
                if let Some(waiting) = self.waiting.remove(&reply.client_req) {
                    let _ = waiting.send(reply.result);
                }
            }
        } else {
            self.update_status();
        }
    }

    /// The view `cachet stats` shows. Counting records locks every shard,
    /// so that part is refreshed at most every 100 ms; the rest is cheap.
    fn update_status(&mut self) {
        let now = self.now();
        let full = now >= self.status_at + 100 || self.status_at == 0;
        if full {
            self.status_at = now.max(1);
        }
        let top = self.peers.keys().max().map_or(0, |m| m + 1) as usize;
        if let Ok(mut status) = self.status.lock() {
            status.ops_ok = self.ops_ok;
            status.ops_failed = self.ops_failed;
            status.peer_identity_refused = self.impostor_frames;
            if let Some(replica) = &self.replica {
                status.replica_writes = replica.peer_writes();
                status.primary_updates = replica.updates_run();
            }
            status.synced = self.replica.as_ref().is_some_and(Replica::counted);
            if !full {
                return;
            }
            status.members =
                (0..top as NodeIx).map(|i| self.peers.get(&i).map(ToString::to_string).unwrap_or_default()).collect();
            // Up and serving: a member back up but not yet readmitted is
            // not in the ring, so clients should not route by it either.
            let serves = |i: NodeIx| self.alive.get(&i).copied().unwrap_or(false) && !self.held_out.contains_key(&i);
            status.alive = (0..top as NodeIx).map(|i| i == self.me || serves(i)).collect();
            status.clients = (0..top as NodeIx).map(|i| self.clients.get(&i).cloned().unwrap_or_default()).collect();
            status.ring_epoch = self.peers.len() as u64;
            match &self.replica {
                Some(replica) => {
                    status.resync_waiting = replica.resync_waiting();
                    status.records = replica.record_count() as u64;
                    status.hints = replica.hints_held() as u64;
                }
                None => status.resync_waiting = Vec::new(),
            }
        }
    }

    fn send_to(&mut self, addr: SocketAddr, frame: PeerFrame) {
        let transport = &self.transport;
        // The member known at `addr` (none for a seed known only by its
        // address): the certificate answering there must name it.
        let expected = self.by_addr.get(&addr).copied();
        let sender = self.senders.entry(addr).or_insert_with(|| {
            let (tx, rx) = mpsc::channel(PEER_QUEUE);
            tokio::spawn(send_loop(transport.clone(), addr, expected, rx));
            tx
        });
        if sender.try_send(frame).is_err() {
            tracing::debug!(%addr, "peer queue full; frame dropped");
        }
    }
}

/// Bytes batched into one stream.
const BATCH_BYTES: usize = 4 << 20;

/// Sends one peer's frames in order over a connection of its own, each
/// stream carrying what was queued, reconnecting after failures. While the
/// peer is unreachable its frames are dropped, backlog included: they are
/// stale by the time it is back, and the protocol re-sends what matters.
/// When `expected` names the member at `to`, a peer answering there with
/// a certificate for another node is refused at the handshake (and its
/// frames dropped like an unreachable peer's).
async fn send_loop(
    transport: Arc<PeerTransport>,
    to: SocketAddr,
    expected: Option<NodeIx>,
    mut frames: mpsc::Receiver<PeerFrame>,
) {
    let mut connection: Option<quinn::Connection> = None;
    let mut quiet_until: Option<tokio::time::Instant> = None;
    let mut batch = Vec::new();
    while let Some(first) = frames.recv().await {
        if quiet_until.is_some_and(|t| tokio::time::Instant::now() < t) {
            while frames.try_recv().is_ok() {}
            continue;
        }
        batch.clear();
        let mut next = Some(first);
        while let Some(frame) = next.take() {
            if let Err(err) = PeerTransport::encode(&frame, &mut batch) {
                tracing::error!(%err, "cannot encode a peer frame");
            }
            if batch.len() < BATCH_BYTES {
                next = frames.try_recv().ok();
            }
        }
        if batch.is_empty() {
            continue;
        }
        if connection.as_ref().is_none_or(|c| c.close_reason().is_some()) {
            let dialed = match tokio::time::timeout(DIAL_TIMEOUT, transport.dial(to, expected)).await {
                Ok(Ok(c)) => Some(c),
                Ok(Err(err)) => {
                    tracing::debug!(%to, %err, "peer unreachable");
                    None
                }
                Err(_) => {
                    tracing::debug!(%to, "peer connection attempt timed out");
                    None
                }
            };
            connection = dialed;
            if connection.is_none() {
                quiet_until = Some(tokio::time::Instant::now() + REDIAL_AFTER);
                while frames.try_recv().is_ok() {}
                continue;
            }
            quiet_until = None;
        }
        let Some(c) = &connection else { continue };
        tracing::trace!(%to, bytes = batch.len(), "frames out");
        if let Err(err) = PeerTransport::send_on(c, &batch).await {
            tracing::debug!(%to, %err, "peer send failed");
            connection = None;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{forged_incarnation, next_incarnation, serving, up_believed};
    use crate::cluster::membership::Peer;
    use std::net::SocketAddr;

    /// Relayed news of a member at an address it has not spoken from is
    /// not believed; an incarnation far ahead of the clock is forged.
    #[test]
    fn relayed_news_is_believed_only_when_the_member_confirms_it() {
        let at = |port: u16| -> SocketAddr { SocketAddr::from(([127, 0, 0, 1], port)) };
        assert!(up_believed(Some(&at(1)), None, &at(1)), "where it is known");
        assert!(!up_believed(Some(&at(1)), None, &at(9)), "moved, by hearsay");
        assert!(!up_believed(None, None, &at(9)), "a joiner, by hearsay");
        assert!(!up_believed(None, Some(&at(8)), &at(9)), "it spoke from elsewhere");
        assert!(up_believed(Some(&at(1)), Some(&at(9)), &at(9)), "it spoke from there itself");
        let peer = |node: &str, incarnation: u64| Peer {
            node: node.into(),
            addr: "127.0.0.1:1".into(),
            incarnation,
            client: String::new(),
        };
        let now = 1_700_000_000_000;
        assert_eq!(forged_incarnation(&peer("0", now), &[peer("1", now - 5)], now + 60_000), None);
        let relayed = [peer("1", now), peer("2", u64::MAX - 1)];
        assert_eq!(forged_incarnation(&peer("0", now), &relayed, now + 60_000), Some(&relayed[1]));
        assert_eq!(forged_incarnation(&peer("0", now + 61_000), &[], now + 60_000).map(|p| p.node.as_str()), Some("0"));
    }
    use std::collections::BTreeMap;

    /// The wall clock, unless it went back: then one past the last
    /// incarnation used, which is saved for the next start.
    #[test]
    fn incarnations_only_go_up_even_when_the_clock_goes_back() {
        let dir = std::env::temp_dir().join(format!("cachet-incarnation-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let path = dir.join("cluster-incarnation");
        let _ = std::fs::remove_file(&path);
        assert_eq!(next_incarnation(&path, 5_000), 5_000, "first start: the clock");
        assert_eq!(next_incarnation(&path, 9_000), 9_000, "the clock moved on");
        assert_eq!(next_incarnation(&path, 7_000), 9_001, "the clock went back");
        assert_eq!(next_incarnation(&path, 7_500), 9_002, "still behind");
        std::fs::write(&path, "garbage").expect("write");
        assert_eq!(next_incarnation(&path, 8_000), 8_000, "an unreadable file counts as none");
        assert_eq!(std::fs::read_to_string(&path).expect("saved").trim(), "8000");
        let _ = std::fs::remove_dir_all(&dir);
    }

    fn alive(up: &[(u32, bool)]) -> BTreeMap<u32, bool> {
        up.iter().copied().collect()
    }

    /// Members declared down leave the serving ring only while this node
    /// sees a strict majority up; a node on the minority side keeps every
    /// member and is not quorate (it counts for nothing). A member held out
    /// for readmission stays out while quorate.
    #[test]
    fn the_serving_ring_shrinks_only_with_a_majority_up() {
        let none = BTreeMap::new();
        let ring = |known: std::ops::Range<u32>, up: &[(u32, bool)]| serving(0, known, &alive(up), &none);
        assert_eq!(ring(0..3, &[(1, true), (2, true)]), (vec![0, 1, 2], true));
        assert_eq!(ring(0..3, &[(1, true), (2, false)]), (vec![0, 1], true));
        assert_eq!(ring(0..3, &[(1, false), (2, false)]), (vec![0, 1, 2], false));
        // Two of four is no majority; three of five is.
        assert_eq!(ring(0..4, &[(1, true), (2, false), (3, false)]), (vec![0, 1, 2, 3], false));
        assert_eq!(ring(0..5, &[(1, true), (2, true), (3, false), (4, false)]), (vec![0, 1, 2], true));
        // A member never heard of counts as down.
        assert_eq!(ring(0..3, &[(1, true)]), (vec![0, 1], true));
        // Alone in a one-member cluster.
        assert_eq!(ring(0..1, &[]), (vec![0], true));
        // Back up, but not yet readmitted.
        let held: BTreeMap<u32, u64> = [(2, 7)].into_iter().collect();
        assert_eq!(serving(0, 0..3, &alive(&[(1, true), (2, true)]), &held), (vec![0, 1], true));
        // Company that is only held out is no majority.
        let held: BTreeMap<u32, u64> = [(1, 7), (2, 8)].into_iter().collect();
        assert_eq!(serving(0, 0..3, &alive(&[(1, true), (2, true)]), &held), (vec![0, 1, 2], false));
    }
}
