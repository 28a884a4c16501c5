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
//! Membership is static for now: `--cluster` lists every member's peer
//! address, and a node's id is its index in that list. The failure detector
//! (SWIM) decides who is up; the replica sends down members' writes as
//! hints and asks only live owners.

use super::membership::{Membership, MembershipConfig, MembershipEvent, Peer};
use super::records::ShardRecords;
use super::replica::{self, NodeIx, Op, OpError, Outcome, RecordStore, Replica, ReplicaConfig};
use super::transport::{Incoming, PeerFrame, PeerTransport, TransportError};
use crate::loader::Routed;
use crate::node::Node;
use bytes::Bytes;
use cachet_proto::{ClusterStats, Consistency, ErrorCode, ErrorReply, Member, Request, Response, Ring};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, oneshot, watch};

/// Frames queued per peer before new ones are dropped.
const PEER_QUEUE: usize = 8192;
/// After a failed connection attempt, frames to that peer are dropped
/// without trying for this long.
const REDIAL_AFTER: Duration = Duration::from_millis(200);
/// A connection attempt gives up after this long.
const DIAL_TIMEOUT: Duration = Duration::from_millis(1_000);

/// How a node joins its cluster.
#[derive(Clone, Debug)]
pub struct ClusterOptions {
    /// This node's index in `members`.
    pub node_id: NodeIx,
    /// Every member's peer (node-to-node) address, by node id; this node's
    /// own entry is where its peer transport listens.
    pub members: Vec<SocketAddr>,
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
    /// The cluster's CA (the shared development CA of `--dev-ca`).
    pub ca_dir: PathBuf,
    /// This node's data directory (its peer certificate).
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
    status: Arc<Mutex<ClusterStats>>,
    default: Consistency,
    stop: watch::Sender<bool>,
    thread: Mutex<Option<std::thread::JoinHandle<()>>>,
    peer_addr: SocketAddr,
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
    }
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
    pub fn start(options: ClusterOptions, node: Arc<Node>) -> Result<Arc<Self>, ClusterError> {
        let n = options.members.len();
        let me = options.node_id as usize;
        if n == 0 || me >= n {
            return Err(ClusterError::Config(format!("--node-id {me} is not an index into the {n} members")));
        }
        if options.replication_factor == 0 || options.replication_factor > n {
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
        let members: Vec<Member> = options
            .members
            .iter()
            .enumerate()
            .map(|(i, addr)| Member { id: i.to_string(), addr: addr.to_string(), weight: 1 })
            .collect();
        let ring =
            Ring::new(1, members, cachet_proto::DEFAULT_VNODES).map_err(|e| ClusterError::Config(e.to_string()))?;
        let status = Arc::new(Mutex::new(ClusterStats {
            node_id: options.node_id,
            members: options.members.iter().map(ToString::to_string).collect(),
            alive: vec![true; n],
            clients: (0..n).map(|i| if i == me { options.client_addr.to_string() } else { String::new() }).collect(),
            replication_factor: options.replication_factor as u32,
            ..ClusterStats::default()
        }));
        let default = options.consistency;
        let (commands, commands_rx) = mpsc::unbounded_channel();
        let (stop, stopped) = watch::channel(false);
        let (bound_tx, bound_rx) = std::sync::mpsc::channel();
        let thread_status = status.clone();
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
                    let listen = options.members[options.node_id as usize];
                    let (transport, incoming) = match PeerTransport::bind(listen, &options.ca_dir, &options.data_dir) {
                        Ok(bound) => bound,
                        Err(err) => {
                            let _ = bound_tx.send(Err(err.into()));
                            return;
                        }
                    };
                    let _ = bound_tx.send(Ok(transport.local_addr().unwrap_or(listen)));
                    let store = Box::new(ShardRecords::new(node));
                    let shell = Shell::new(options, Arc::new(ring), transport, thread_status, store);
                    shell.run(commands_rx, incoming, stopped).await;
                });
            })
            .map_err(|e| ClusterError::Runtime(e.to_string()))?;
        let peer_addr = match bound_rx.recv() {
            Ok(Ok(addr)) => addr,
            Ok(Err(err)) => return Err(err),
            Err(_) => return Err(ClusterError::Runtime("the cluster thread died while starting".into())),
        };
        Ok(Arc::new(Self { commands, status, default, stop, thread: Mutex::new(Some(thread)), peer_addr }))
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

    async fn read(self: Arc<Self>, key: Bytes, level: replica::Consistency) -> Result<Option<Bytes>, OpError> {
        match self.run(Op::Get { key }, level).await? {
            Outcome::Read(record) => Ok(record.and_then(|r| r.value)),
            Outcome::Written(_) => Err(OpError::Unavailable),
        }
    }

    async fn write(
        self: Arc<Self>,
        key: Bytes,
        value: Option<Bytes>,
        level: replica::Consistency,
    ) -> Result<(), OpError> {
        self.run(Op::Put { key, value }, level).await.map(|_| ())
    }

    /// Takes the data commands of a clustered node: each becomes replicated
    /// operations coordinated here, answered later. `None` for commands
    /// that stay local (PING, STATS, admin). Commands the replicated store
    /// cannot do yet are refused with `NotSupported`, never served from the
    /// local shards (which would answer with data no other node has).
    pub fn route(self: &Arc<Self>, node: &Node, body: &Request, asked: Option<Consistency>) -> Option<Routed> {
        let level = level(asked.unwrap_or(self.default));
        let this = self.clone();
        let later = |f: std::pin::Pin<Box<dyn Future<Output = Response> + Send>>| Some(Routed::Later(f));
        match body {
            Request::Get { key } => {
                let key = key.clone();
                later(Box::pin(async move {
                    match this.read(key, level).await {
                        Ok(value) => Response::Value(value),
                        Err(err) => op_error(err),
                    }
                }))
            }
            Request::Set { key, value, ttl_ms: None, condition: cachet_proto::Condition::Always, .. } => {
                if let Some(refused) = node.check_sizes(key, value) {
                    return Some(Routed::Now(refused));
                }
                let (key, value) = (key.clone(), value.clone());
                later(Box::pin(async move {
                    match this.write(key, Some(value), level).await {
                        Ok(()) => Response::Ok,
                        Err(err) => op_error(err),
                    }
                }))
            }
            Request::MSet { pairs } => {
                if let Some(refused) = pairs.iter().find_map(|(k, v)| node.check_sizes(k, v)) {
                    return Some(Routed::Now(refused));
                }
                let pairs = pairs.clone();
                later(Box::pin(async move {
                    let writes = pairs.into_iter().map(|(k, v)| this.clone().write(k, Some(v), level));
                    match futures_util::future::join_all(writes).await.into_iter().find_map(Result::err) {
                        None => Response::Ok,
                        Some(err) => op_error(err),
                    }
                }))
            }
            Request::MGet { keys } | Request::Exists { keys } => {
                let exists = matches!(body, Request::Exists { .. });
                let keys = keys.clone();
                later(Box::pin(async move {
                    let reads = keys.into_iter().map(|k| this.clone().read(k, level));
                    let values: Result<Vec<_>, _> = futures_util::future::join_all(reads).await.into_iter().collect();
                    match values {
                        Ok(values) if exists => Response::Count(values.iter().filter(|v| v.is_some()).count() as u64),
                        Ok(values) => Response::Values(values),
                        Err(err) => op_error(err),
                    }
                }))
            }
            // How many existed is read first, then the deletions are written
            // (tombstones, so repair cannot bring the values back).
            Request::Del { keys } => {
                let keys = keys.clone();
                later(Box::pin(async move {
                    let deletes = keys.into_iter().map(|key| {
                        let this = this.clone();
                        async move {
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
            Request::Set { .. } | Request::Ttl { .. } | Request::Expire { .. } | Request::Incr { .. } => {
                Some(Routed::Now(error(
                    ErrorCode::NotSupported,
                    format!(
                        "{} is not supported on a clustered node yet (replicated keys have no TTL, \
                         NX/XX or INCR); plain GET, SET, DEL, EXISTS, MGET and MSET are",
                        body.name()
                    ),
                )))
            }
            Request::Ping | Request::Stats | Request::Admin { .. } => None,
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let _ = self.stop.send(true);
    }
}

/// The runtime thread's state.
struct Shell {
    me: NodeIx,
    members: Vec<SocketAddr>,
    by_addr: HashMap<SocketAddr, NodeIx>,
    replica: Replica,
    membership: Membership,
    senders: Vec<Option<mpsc::Sender<PeerFrame>>>,
    started: Instant,
    waiting: HashMap<u64, oneshot::Sender<Result<Outcome, OpError>>>,
    next_op: u64,
    status: Arc<Mutex<ClusterStats>>,
    alive: Vec<bool>,
    ops_ok: Arc<AtomicU64>,
    ops_failed: Arc<AtomicU64>,
}

impl Shell {
    fn new(
        options: ClusterOptions,
        ring: Arc<Ring>,
        transport: Arc<PeerTransport>,
        status: Arc<Mutex<ClusterStats>>,
        store: Box<dyn RecordStore>,
    ) -> Self {
        let me = options.node_id;
        let n = options.members.len();
        let boot = boot_nonce();
        let config = ReplicaConfig {
            rf: options.replication_factor,
            request_timeout_ms: options.request_timeout_ms,
            ..ReplicaConfig::default()
        };
        let mut replica = Replica::with_store(me, n as u32, ring, config, boot, store);
        replica.restart(0, boot);
        // A restarted node is a new incarnation, so the others take its
        // announcement over their memory of the dead one.
        let incarnation =
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(1, |d| d.as_millis() as u64);
        let peer = |i: usize, incarnation: u64| Peer {
            node: i.to_string(),
            addr: options.members[i].to_string(),
            incarnation,
            client: if i == me as usize { options.client_addr.to_string() } else { String::new() },
        };
        let mut membership = Membership::new(
            peer(me as usize, incarnation),
            MembershipConfig { detect_within_ms: options.detect_within_ms },
            boot,
        );
        for i in (0..n).filter(|&i| i != me as usize) {
            if let Err(err) = membership.join(0, peer(i, 0)) {
                tracing::warn!(%err, member = i, "cannot announce to a member");
            }
        }
        let senders = (0..n)
            .map(|i| {
                (i != me as usize).then(|| {
                    let (tx, rx) = mpsc::channel(PEER_QUEUE);
                    tokio::spawn(send_loop(transport.clone(), options.members[i], rx));
                    tx
                })
            })
            .collect();
        let by_addr = options.members.iter().enumerate().map(|(i, a)| (*a, i as NodeIx)).collect();
        Self {
            me,
            members: options.members,
            by_addr,
            replica,
            membership,
            senders,
            started: Instant::now(),
            waiting: HashMap::new(),
            next_op: 1,
            status,
            alive: vec![true; n],
            ops_ok: Arc::default(),
            ops_failed: Arc::default(),
        }
    }

    fn now(&self) -> u64 {
        self.started.elapsed().as_millis() as u64
    }

    async fn run(
        mut self,
        mut commands: mpsc::UnboundedReceiver<Command>,
        mut incoming: mpsc::Receiver<Incoming>,
        mut stopped: watch::Receiver<bool>,
    ) {
        tracing::info!(node = self.me, members = ?self.members, "cluster runtime started");
        loop {
            self.flush();
            let now = self.now();
            let next = [self.replica.poll_timeout(), self.membership.poll_timeout()]
                .into_iter()
                .flatten()
                .min()
                .unwrap_or(now + 100)
                .clamp(now, now + 100);
            let wake = tokio::time::Instant::from_std(self.started + Duration::from_millis(next));
            tokio::select! {
                command = commands.recv() => {
                    let Some(command) = command else { break };
                    let id = self.next_op;
                    self.next_op += 1;
                    self.waiting.insert(id, command.reply);
                    let now = self.now();
                    self.replica.client(now, id, command.op, command.level);
                }
                frame = incoming.recv() => {
                    let Some(frame) = frame else { break };
                    self.handle(frame);
                }
                _ = tokio::time::sleep_until(wake) => {
                    let now = self.now();
                    self.replica.tick(now);
                    self.membership.tick(now);
                }
                _ = stopped.changed() => break,
            }
        }
        tracing::info!(node = self.me, "cluster runtime stopped");
    }

    fn handle(&mut self, frame: Incoming) {
        let Some(&from) = self.by_addr.get(&frame.from) else {
            tracing::warn!(from = %frame.from, "a frame from an address that is no member; dropped");
            return;
        };
        let now = self.now();
        tracing::trace!(from, gossip = matches!(frame.frame, PeerFrame::Gossip(_)), "frame in");
        match frame.frame {
            PeerFrame::Gossip(data) => {
                if let Err(err) = self.membership.handle_data(now, &data) {
                    tracing::debug!(%err, from, "gossip refused");
                }
            }
            PeerFrame::Replica(message) => self.replica.handle(now, from, message),
        }
    }

    /// Carries everything the core produced out: membership changes into
    /// the replica, messages to the peers, replies to the waiting clients,
    /// and the view into the stats.
    fn flush(&mut self) {
        let now = self.now();
        while let Some(event) = self.membership.poll_event() {
            let (peer, up) = match event {
                MembershipEvent::Up(peer) => (peer, true),
                MembershipEvent::Down(peer) => (peer, false),
            };
            let Ok(ix) = peer.node.parse::<NodeIx>() else { continue };
            if ix == self.me || ix as usize >= self.alive.len() {
                continue;
            }
            if up {
                tracing::info!(node = ix, "member up");
            } else {
                tracing::warn!(node = ix, "member down");
            }
            self.alive[ix as usize] = up;
            self.replica.set_alive(now, ix, up);
            if up
                && !peer.client.is_empty()
                && let Ok(mut status) = self.status.lock()
                && let Some(slot) = status.clients.get_mut(ix as usize)
            {
                slot.clone_from(&peer.client);
            }
        }
        while let Some((peer, data)) = self.membership.poll_transmit() {
            if let Ok(ix) = peer.node.parse::<NodeIx>() {
                self.send(ix, PeerFrame::Gossip(data));
            }
        }
        while let Some((to, message)) = self.replica.poll_transmit() {
            self.send(to, PeerFrame::Replica(message));
        }
        while let Some(reply) = self.replica.poll_reply() {
            match &reply.result {
                Ok(_) => self.ops_ok.fetch_add(1, Ordering::Relaxed),
                Err(_) => self.ops_failed.fetch_add(1, Ordering::Relaxed),
            };
            if let Some(waiting) = self.waiting.remove(&reply.client_req) {
                let _ = waiting.send(reply.result);
            }
        }
        if let Ok(mut status) = self.status.lock() {
            status.alive.clone_from(&self.alive);
            status.synced = self.replica.counted();
            status.resync_waiting = self.replica.resync_waiting();
            status.records = self.replica.record_count() as u64;
            status.hints = self.replica.hints_held() as u64;
            status.ops_ok = self.ops_ok.load(Ordering::Relaxed);
            status.ops_failed = self.ops_failed.load(Ordering::Relaxed);
        }
    }

    fn send(&mut self, to: NodeIx, frame: PeerFrame) {
        if let Some(Some(sender)) = self.senders.get(to as usize)
            && sender.try_send(frame).is_err()
        {
            tracing::debug!(to, "peer queue full; frame dropped");
        }
    }
}

/// Bytes batched into one stream.
const BATCH_BYTES: usize = 4 << 20;

/// Sends one peer's frames in order over a connection of its own, each
/// stream carrying what was queued, reconnecting after failures. While the
/// peer is unreachable its frames are dropped, backlog included: they are
/// stale by the time it is back, and the protocol re-sends what matters.
async fn send_loop(transport: Arc<PeerTransport>, to: SocketAddr, mut frames: mpsc::Receiver<PeerFrame>) {
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
            let dialed = match tokio::time::timeout(DIAL_TIMEOUT, transport.dial(to)).await {
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
