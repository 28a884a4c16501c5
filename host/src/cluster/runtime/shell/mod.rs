//! The runtime thread's state, [`Shell`], and its event loop: client
//! operations, peer frames, finished loads and the clock go in; the
//! core's messages, replies and load requests come out. The ring comes
//! from the metadata log in `ring`, what the peers send is taken in
//! `peers`.

use super::persist::{INCARNATION_FILE, MEMBERS_FILE, load_members, next_incarnation, save_incarnation, save_members};
use super::sender::send_loop;
use super::{ClusterOptions, Command, unix_ms};
use crate::cluster::membership::{Membership, MembershipConfig, MembershipEvent, Peer};
use crate::cluster::meta::MetaConfig;
use crate::cluster::meta::entry::Settings;
use crate::cluster::meta::member::{MetaMember, MetaOptions};
use crate::cluster::replica::{self, NodeIx, OpError, Outcome, RecordStore, Replica, ReplicaConfig};
use crate::cluster::transport::{Incoming, PeerFrame, PeerTransport};
use crate::cluster::update::Effect;
use cachet_proto::{ClusterStats, ErrorCode, ErrorReply, Ring};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, oneshot, watch};

/// Frames queued per peer before new ones are dropped.
const PEER_QUEUE: usize = 8192;

/// How long a stopping node waits for the members it tells of its
/// departure to acknowledge it.
const LEAVE_GRACE: Duration = Duration::from_millis(500);

/// A nonce for this process's life: request ids and re-sync rounds of an
/// earlier life of this node (still in flight after a crash) match nothing.
fn boot_nonce() -> u64 {
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64);
    nanos ^ (u64::from(std::process::id()) << 32)
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

/// Members never heard from count as down this long after the start, on
/// top of twice the detection budget.
const GRACE_MS: u64 = 1_000;

/// The runtime thread's state.
pub(super) struct Shell {
    me: NodeIx,
    config: ReplicaConfig,
    /// Every known member's peer address (this node's included), by id.
    peers: std::collections::BTreeMap<NodeIx, SocketAddr>,
    by_addr: HashMap<SocketAddr, NodeIx>,
    transport: Arc<PeerTransport>,
    senders: HashMap<SocketAddr, mpsc::Sender<PeerFrame>>,
    /// `None` until the metadata log gives this node a slot table.
    replica: Option<Replica>,
    store: Option<Box<dyn RecordStore>>,
    /// Members heard to be up since this node started.
    heard: std::collections::BTreeSet<NodeIx>,
    /// Until when members never heard from still count as up.
    grace_until: u64,
    /// Where the member list is kept across restarts.
    members_file: PathBuf,
    /// Where the last incarnation is kept, renewals included.
    incarnation_file: PathBuf,
    membership: Membership,
    started: Instant,
    boot: u64,
    waiting: HashMap<u64, oneshot::Sender<Result<Outcome, OpError>>>,
    /// The log's loader configuration on this member; its loaders run the
    /// loads the replica asks for as a key's primary.
    loader: loaders::LoaderApply,
    /// The ring from the log, shared with [`Cluster`] for checks made before a
    /// request reaches the replica.
    ///
    /// [`Cluster`]: super::Cluster
    pub(super) shared_ring: Arc<Mutex<Option<Arc<Ring>>>>,
    /// Members' Redis-protocol addresses from the log, for `CLUSTER SLOTS`.
    pub(super) resp_addrs: super::RespAddrs,
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
    /// The cluster's metadata log (`None` if it could not be opened: the
    /// error is in the stats). It runs beside the failure detector's ring
    /// and does not steer it yet (issue 20, step 6).
    meta: Option<MetaMember>,
    meta_error: Option<String>,
    /// The node's policy host (set once attached).
    pub(super) policy_host: Arc<super::policies::Host>,
    /// The log index up to which this member runs the log's policy.
    pub(super) policy_applied: Arc<std::sync::atomic::AtomicU64>,
    policy: policy::PolicyApply,
    policy_done_tx: mpsc::UnboundedSender<policy::PolicyDone>,
    policy_done_rx: Option<mpsc::UnboundedReceiver<policy::PolicyDone>>,
    /// When the node's hit counts were last read for the metadata log.
    counts_at: u64,
    /// When this member may start serving.
    gate: crate::cluster::policy::StartGate,
}

impl Shell {
    pub(super) fn new(
        options: ClusterOptions,
        listen: SocketAddr,
        transport: Arc<PeerTransport>,
        status: Arc<Mutex<ClusterStats>>,
        store: Box<dyn RecordStore>,
        (max_key_len, max_value_len): (usize, usize),
        loaders: LoaderShared,
    ) -> Self {
        let (loaded_tx, loaded_rx) = mpsc::unbounded_channel();
        let (policy_done_tx, policy_done_rx) = mpsc::unbounded_channel();
        let me = options.node_id;
        let boot = boot_nonce();
        let config = ReplicaConfig {
            rf: options.replication_factor,
            request_timeout_ms: options.request_timeout_ms,
            // `now` counts from here (`started` below).
            wall_epoch_ms: unix_ms(),
            max_key_len,
            max_value_len,
            stream_bytes_per_sec: options.stream_bytes_per_sec,
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
        let meta_options = MetaOptions {
            me,
            founders: options.members.clone(),
            peer: listen,
            client: options.client_addr,
            resp: options.resp_addr,
            settings: Settings {
                rf: options.replication_factor as u32,
                consistency: super::level(options.consistency),
            },
            data_dir: options.data_dir.clone(),
            config: MetaConfig { replace_after_ms: options.replace_after_ms, ..MetaConfig::default() },
        };
        let (meta, meta_error) = match MetaMember::open(meta_options, boot, 0) {
            Ok(meta) => (Some(meta), None),
            Err(err) => {
                tracing::error!(%err, "the cluster's metadata log cannot be opened; running without it");
                (None, Some(err.to_string()))
            }
        };
        Self {
            me,
            config,
            by_addr: peers.iter().map(|(&i, &a)| (a, i)).collect(),
            peers,
            transport,
            senders: HashMap::new(),
            replica: None,
            store: Some(store),
            heard: std::collections::BTreeSet::new(),
            grace_until: 2 * options.detect_within_ms + GRACE_MS,
            members_file,
            incarnation_file: options.data_dir.join(INCARNATION_FILE),
            membership,
            started: Instant::now(),
            boot,
            waiting: HashMap::new(),
            loader: loaders::LoaderApply::new(loaders),
            shared_ring: Arc::default(),
            resp_addrs: Arc::default(),
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
            meta,
            meta_error,
            policy_host: Arc::default(),
            policy_applied: Arc::default(),
            policy: policy::PolicyApply::default(),
            policy_done_tx,
            policy_done_rx: Some(policy_done_rx),
            counts_at: 0,
            gate: crate::cluster::policy::StartGate::default(),
        }
    }

    fn now(&self) -> u64 {
        self.started.elapsed().as_millis() as u64
    }

    pub(super) async fn run(
        mut self,
        mut commands: mpsc::UnboundedReceiver<Command>,
        mut incoming: mpsc::Receiver<Incoming>,
        mut proposals: mpsc::UnboundedReceiver<super::policies::Proposal>,
        mut stopped: watch::Receiver<bool>,
    ) {
        tracing::info!(node = self.me, members = ?self.peers, "cluster runtime started");
        let Some(mut loaded) = self.loaded_rx.take() else { return };
        let Some(mut policy_done) = self.policy_done_rx.take() else { return };
        loop {
            self.flush();
            let now = self.now();
            let next = [
                self.replica.as_ref().and_then(Replica::poll_timeout),
                self.membership.poll_timeout(),
                self.meta.as_ref().and_then(MetaMember::poll_timeout),
            ]
            .into_iter()
            .flatten()
            .min()
            .unwrap_or(now + 100)
            .clamp(now, now + 100);
            let wake = tokio::time::Instant::from_std(self.started + Duration::from_millis(next));
            tokio::select! {
                command = commands.recv() => {
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
                    let Some(frame) = frame else { break };
                    self.handle(frame);
                }
                Some(proposal) = proposals.recv() => self.propose_for_client(proposal),
                Some(done) = policy_done.recv() => self.policy_done(done),
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
                    let now = self.now();
                    if let Some(replica) = self.replica.as_mut() {
                        replica.tick(now);
                    }
                    self.membership.tick(now);
                    if let Some(meta) = self.meta.as_mut() {
                        let peers: Vec<NodeIx> = self.peers.keys().copied().collect();
                        meta.tick(now, &peers);
                    }
                    // Modules still missing are asked for again.
                    self.reconcile_policy();
                    self.reconcile_loaders();
                    if now >= self.counts_at + 500 {
                        self.counts_at = now;
                        self.report_counts();
                    }
                    if self.replica.is_none() {
                        self.follow_log(now);
                    } else {
                        self.end_grace(now);
                    }
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

    /// Carries everything the core produced out: membership changes into
    /// the ring and the replica, messages to the peers, replies to the
    /// waiting clients, and the view into the stats.
    fn flush(&mut self) {
        let now = self.now();
        while let Some(event) = self.membership.poll_event() {
            let (peer, up) = match event {
                MembershipEvent::Up(peer) => (peer, true),
                MembershipEvent::Down(peer) => (peer, false),
                // Owners change only through the log; but this node missed
                // the writes made while it was held down, so it re-syncs
                // before it answers from its copies again.
                MembershipEvent::Rejoined => {
                    tracing::info!("renewed this node's identity after being declared down by some member; re-syncing");
                    save_incarnation(&self.incarnation_file, self.membership.me().incarnation);
                    if let Some(replica) = self.replica.as_mut() {
                        replica.rejoin(now);
                    }
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
        let mut meta_out = Vec::new();
        while let Some(frame) = self.meta.as_mut().and_then(MetaMember::poll_transmit) {
            meta_out.push(frame);
        }
        for (to, frame) in meta_out {
            if let Some(&addr) = self.peers.get(&to) {
                self.send_to(addr, PeerFrame::Meta(frame));
            }
        }
        self.answer_decided();
        if self.meta.as_mut().is_some_and(MetaMember::take_changed) {
            self.follow_log(now);
            self.reconcile_policy();
            self.reconcile_loaders();
        }
        let in_contact = self.meta.as_ref().is_some_and(|m| m.in_contact(now));
        if let Some(replica) = self.replica.as_mut() {
            if replica.in_contact() != in_contact {
                if in_contact {
                    tracing::info!("in touch with the metadata log's leader again; this node's copies count");
                } else {
                    tracing::warn!("out of touch with the metadata log's leader; this node's copies count for nothing");
                }
                replica.set_in_contact(in_contact);
            }
            // Streams done for the slots this node takes over: the log
            // makes it an owner once every member taking slots over says so.
            if let (Some(epoch), Some(meta)) = (replica.holds_pending(), self.meta.as_mut()) {
                meta.slots_held(now, epoch);
            }
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
                let Some(loaders) = self.loader.shared.slot.get() else {
                    answer.failed("this member runs no loaders: the cluster's loader configuration is not built here");
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
            for (to, epoch, message) in out {
                if let Some(&addr) = self.peers.get(&to) {
                    self.send_to(addr, PeerFrame::Replica { epoch, message });
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
                status.sync_requests_refused = replica.syncs_refused();
                status.streamed_bytes = replica.streamed_bytes();
            }
            if !full {
                return;
            }
            // With the table it re-synced for, not before it: a view
            // saying "synced" beside the old table's slots would claim a
            // member counted for slots it never re-synced.
            status.synced = self.replica.as_ref().is_some_and(Replica::counted);
            status.members =
                (0..top as NodeIx).map(|i| self.peers.get(&i).map(ToString::to_string).unwrap_or_default()).collect();
            let up = |i: NodeIx| self.alive.get(&i).copied().unwrap_or(false);
            status.alive = (0..top as NodeIx).map(|i| i == self.me || up(i)).collect();
            status.clients = (0..top as NodeIx).map(|i| self.clients.get(&i).cloned().unwrap_or_default()).collect();
            let table = self.shared_ring.lock().ok().and_then(|r| r.as_ref().map(|r| r.table().clone()));
            status.ring_epoch = table.as_ref().map_or(0, cachet_proto::SlotTable::epoch);
            status.slots = table.map(|t| t.ranges().to_vec()).unwrap_or_default();
            status.meta = match (&self.meta, &self.meta_error) {
                (Some(meta), _) => Some(cachet_proto::MetaStats { loaders: self.loader_status(), ..meta.stats() }),
                (None, Some(err)) => {
                    Some(cachet_proto::MetaStats { phase: format!("stopped: {err}"), ..Default::default() })
                }
                (None, None) => None,
            };
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

mod loaders;
mod peers;
mod policy;
mod ring;

pub(super) use loaders::LoaderShared;
