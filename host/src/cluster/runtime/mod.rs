//! The cluster's thin shell: one thread with its own tokio runtime owns a
//! node's [`Replica`] and [`Membership`], feeds them the peer transport's
//! frames, the clock and the client operations the QUIC server hands over,
//! and carries their output back out. All the decisions stay in the sans-IO
//! core, which the simulator checks; this module only moves messages.
//!
//! Each peer gets a sender task with a bounded queue and a connection of its
//! own, so a dead or slow peer (a connection attempt can take a while to
//! fail) delays no message to the others. When a queue is full, frames are
//! dropped: the replication protocol already retries what it must
//! (hints, re-sync requests) and fails client operations that miss their
//! deadline, so a lost frame costs time, never correctness.
//!
//! Founders are listed by `--cluster` (a node's id is its index there);
//! others join through `--seeds` and are learnt from the gossip. Where keys
//! live is the slot table of the cluster's metadata log (`meta`): every
//! member applies the same tables in the same order, and the replica
//! follows each one. The failure detector (SWIM) decides who is up: a
//! member declared down keeps its slots (its co-owners serve them, and
//! writes for it wait as hints) until the log's leader moves them
//! (`--replace-after-ms`); a member that learns it was declared down
//! (paused, cut off) re-syncs before it counts again. A member never heard
//! from since this node started counts as down after a grace period.
//!
//! Where things are: [`Cluster`], the handle a clustered node holds, and
//! its routing of client requests are here; `loaders` attaches the
//! node's read-through loaders; `shell` is the runtime thread's state and
//! event loop (`shell::ring`, the ring from the log; `shell::peers`, what the
//! peers send); `sender`, each peer's sender task; `persist`, what a node
//! keeps in its data directory across restarts.
//!
//! [`Replica`]: super::replica::Replica
//! [`Membership`]: super::membership::Membership

use super::records::{ShardRecords, as_of};
use super::replica::{self, NodeIx, Op, OpError, Outcome, Record};
use super::transport::{PeerTls, PeerTransport, TransportError};
use super::update::{Effect, Update};
use crate::reply::Routed;
use crate::store::Store;
use bytes::Bytes;
use cachet_proto::{ClusterStats, Consistency, ErrorCode, ErrorReply, Request, Response, Ring, TtlState};
use shell::Shell;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use tokio::sync::{mpsc, oneshot, watch};

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
    /// Where this node serves the Redis protocol, if it does: recorded in
    /// the log for `CLUSTER SLOTS` and `CLUSTER NODES`.
    pub resp_addr: Option<SocketAddr>,
    /// Copies of each key.
    pub replication_factor: usize,
    /// The level of requests that do not name one.
    pub consistency: Consistency,
    /// A dead member is declared down within about this long.
    pub detect_within_ms: u64,
    /// A member down this long has its slots moved to the others by the
    /// log's leader (until then its co-owners serve them without it).
    pub replace_after_ms: u64,
    /// Re-sync stream bytes this member sends per second (see
    /// [`crate::cluster::replica::ReplicaConfig::stream_bytes_per_sec`]).
    pub stream_bytes_per_sec: u64,
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
    loaders: Arc<crate::loader::LoaderSlot>,
    /// The node's loader host, for the runtime to build the log's loaders.
    loader_host: Arc<loaders::LoaderHostSlot>,
    /// The loader modules this member holds.
    loader_modules: Arc<loader_modules::LoaderModules>,
    /// The last loader configuration applied here, and what came of it.
    loader_outcome: Arc<loaders::LoaderOutcome>,
    /// The ring (the log's slot table) the replica routes by, for checks made before a
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
    /// The node's policy host, for the runtime to apply the log's policy.
    policies: Arc<policies::Host>,
    /// Proposals for the metadata log from client threads.
    proposals: mpsc::UnboundedSender<policies::Proposal>,
    /// The log index up to which this member runs the log's policy.
    policy_applied: Arc<std::sync::atomic::AtomicU64>,
    /// This member's node id.
    me: NodeIx,
    /// Every member's Redis-protocol address, as the log records them.
    resp_addrs: RespAddrs,
}

/// Members' Redis-protocol addresses by node id, shared with the shell.
pub(super) type RespAddrs = Arc<Mutex<std::collections::BTreeMap<NodeIx, SocketAddr>>>;

/// A range of hash slots as Redis Cluster clients see it: its owners, the
/// primary first, with their Redis-protocol addresses (`None` for one that
/// has not announced one).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RedisSlots {
    /// First slot.
    pub start: u16,
    /// Last slot, included.
    pub end: u16,
    /// Owners and their addresses.
    pub owners: Vec<(NodeIx, Option<SocketAddr>)>,
}

/// The log's slot table read the way `CLUSTER SLOTS`, `CLUSTER SHARDS` and
/// `CLUSTER NODES` answer it.
#[derive(Clone, Debug)]
pub struct RedisView {
    /// This member.
    pub me: NodeIx,
    /// The table's epoch (Redis's `current_epoch`).
    pub epoch: u64,
    /// Every range of slots.
    pub ranges: Vec<RedisSlots>,
    /// Every member the table names, with its address and whether this
    /// member sees it up.
    pub members: Vec<(NodeIx, Option<SocketAddr>, bool)>,
}

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
        OpError::Conflict => error(
            ErrorCode::Unavailable,
            "the key was written by another member while this update ran; nothing was written, retry",
        ),
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

/// Milliseconds since the Unix epoch: the wall clock the runtime reads
/// for the replicas (their `wall_epoch_ms`) and for expiry times.
pub fn unix_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
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
        let loaders: Arc<crate::loader::LoaderSlot> = Arc::default();
        let loader_host: Arc<loaders::LoaderHostSlot> = Arc::default();
        let loader_modules = Arc::new(loader_modules::LoaderModules::open(&options.data_dir));
        let loader_outcome: Arc<loaders::LoaderOutcome> = Arc::new(Mutex::new((0, Ok(String::new()))));
        let thread_loaders = shell::LoaderShared {
            slot: loaders.clone(),
            host: loader_host.clone(),
            modules: loader_modules.clone(),
            outcome: loader_outcome.clone(),
        };
        let ring: Arc<Mutex<Option<Arc<Ring>>>> = Arc::default();
        let thread_ring = ring.clone();
        let policies: Arc<policies::Host> = Arc::default();
        let thread_policies = policies.clone();
        let (proposals, proposals_rx) = mpsc::unbounded_channel();
        let policy_applied: Arc<std::sync::atomic::AtomicU64> = Arc::default();
        let thread_policy_applied = policy_applied.clone();
        let resp_addrs: RespAddrs = Arc::default();
        let thread_resp_addrs = resp_addrs.clone();
        let me = options.node_id;
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
                    let mut shell =
                        Shell::new(options, listen, transport, thread_status, store, limits, thread_loaders);
                    shell.shared_ring = thread_ring;
                    shell.policy_host = thread_policies;
                    shell.policy_applied = thread_policy_applied;
                    shell.resp_addrs = thread_resp_addrs;
                    shell.run(commands_rx, incoming, proposals_rx, stopped).await;
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
            loader_host,
            loader_modules,
            loader_outcome,
            ring,
            status,
            default,
            stop,
            thread: Mutex::new(Some(thread)),
            peer_addr,
            invalidating: Arc::new(std::sync::atomic::AtomicUsize::new(0)),
            rf,
            policies,
            proposals,
            policy_applied,
            me,
            resp_addrs,
        }))
    }

    /// The slot table as Redis Cluster clients read it; `None` until this
    /// member has a table.
    pub fn redis_view(&self) -> Option<RedisView> {
        let ring = self.ring.lock().ok()?.clone()?;
        let addrs = self.resp_addrs.lock().ok()?.clone();
        let alive = self.status.lock().ok().map(|s| s.alive.clone()).unwrap_or_default();
        let table = ring.table();
        let ranges: Vec<RedisSlots> = table
            .ranges()
            .iter()
            .map(|r| RedisSlots {
                start: r.start,
                end: r.end,
                owners: r.owners.iter().map(|&n| (n, addrs.get(&n).copied())).collect(),
            })
            .collect();
        let mut nodes: Vec<NodeIx> = ranges.iter().flat_map(|r| r.owners.iter().map(|(n, _)| *n)).collect();
        nodes.extend(addrs.keys());
        nodes.sort_unstable();
        nodes.dedup();
        let members = nodes
            .into_iter()
            .map(|n| (n, addrs.get(&n).copied(), n == self.me || alive.get(n as usize).copied().unwrap_or(false)))
            .collect();
        Some(RedisView { me: self.me, epoch: table.epoch(), ranges, members })
    }

    /// The owners of `slot` (its primary first) and the primary's
    /// Redis-protocol address, if it announced one: where a Redis Cluster
    /// client is sent (`MOVED`).
    pub fn slot_owners(&self, slot: u16) -> Option<(Vec<NodeIx>, Option<SocketAddr>)> {
        let ring = self.ring.lock().ok()?.clone()?;
        let owners = ring.table().owners_of_slot(slot).to_vec();
        let addr = owners.first().and_then(|p| self.resp_addrs.lock().ok()?.get(p).copied());
        Some((owners, addr))
    }

    /// This member's node id.
    pub fn me(&self) -> NodeIx {
        self.me
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
            Request::Edit { key, edit } => self.updated(store, key, Update::Edit(edit.clone()), level),
            Request::Expire { key, ttl_ms, when } if when.always() => {
                self.updated(store, key, Update::Expire(*ttl_ms), level)
            }
            Request::Expire { key, ttl_ms, when } => self.updated(store, key, Update::ExpireIf(*ttl_ms, *when), level),
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
            Request::MSetNx { .. }
            | Request::Rename { .. }
            | Request::Copy { .. }
            | Request::Keys { .. }
            | Request::Scan { .. }
            | Request::RandomKey => Some(Routed::Now(error(
                ErrorCode::NotSupported,
                format!(
                    "{} is not supported on a Cachet cluster yet: its keys live on several members",
                    body.name().to_ascii_uppercase()
                ),
            ))),
            Request::Ping | Request::Stats | Request::Admin { .. } => None,
        }
    }
}

impl Cluster {
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
        Effect::EditRefused { too_large, message } => {
            error(if too_large { ErrorCode::TooLarge } else { ErrorCode::InvalidArgument }, message)
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

mod loader_modules;
mod loaders;
mod persist;
mod policies;
mod sender;
mod shell;
