//! A client of a whole cluster, with the whole [`Client`] API. Any member
//! coordinates any key (it forwards the operation to the key's replicas),
//! but the client learns the ring from a member's stats and sends each
//! request to the key's primary owner, which holds a copy and so saves a
//! hop. The ring also names every member's client address: the client
//! reaches every member, also those it was not given. It connects to
//! those in the background, with the first configured member's TLS
//! settings and timeouts, and sends them requests once connected (a
//! member that died since the ring was fetched costs no request a
//! timeout). Without a ring (not fetched yet) it spreads requests over the
//! members.
//!
//! Multi-key commands (MGET, MSET, EXISTS, DEL of several keys) are split
//! by primary owner, the parts sent at once and their replies merged back
//! in the caller's order.
//!
//! # Retries
//!
//! When a member fails (it is down, or too few replicas answered), a
//! request is retried on the key's next owner, then the other members,
//! after a short pause. Which requests are retried depends on whether
//! sending them twice is harmless:
//!
//! - Reads, and writes whose second application changes nothing (a plain
//!   SET, MSET, DEL), are retried after any failure another member may not
//!   have. Such a write that failed may still have been applied, as with
//!   any replicated store.
//! - Read-modify-writes (INCR, APPEND, a conditional SET or SET ... GET,
//!   GETDEL, GETEX, EXPIRE, PERSIST) are retried only when the request
//!   surely never left (the member could not be connected to, or its
//!   connection was gone before the request was written). Once it may have
//!   reached a node, its failure is returned: a second INCR could apply
//!   twice. The caller decides whether to read back and try again.

use crate::reply::{self, Failure};
use crate::single_flight::SingleFlight;
use crate::{
    AdminCommand, Client, ClientConfig, ClientError, ClusterStats, Consistency, ErrorCode, LoadError, NodeStats,
    PolicyListing, SetOptions, TtlChange, TtlState,
};
use bytes::Bytes;
use cachet_proto::{Member as RingMember, Request, Response, Ring};
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, PoisonError, RwLock};
use std::task::Poll;
use std::time::{Duration, Instant};
use tokio::sync::{Mutex, OwnedMutexGuard};

/// How hard a [`ClusterClient`] tries.
#[derive(Clone, Copy, Debug)]
pub struct RetryPolicy {
    /// Attempts per operation, the first included.
    pub attempts: u32,
    /// Pause before the first retry, doubled for each further one.
    pub backoff: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self { attempts: 6, backoff: Duration::from_millis(50) }
    }
}

/// A client of every member of a cluster; see the module docs.
///
/// Members are numbered for [`Self::stats_of`] and the other per-member
/// methods: the configured ones first, in the order given, then those
/// learned from the ring, in the order learned ([`Self::members`] lists
/// their addresses).
#[derive(Clone)]
pub struct ClusterClient {
    /// Only ever grows, so a member's number stays its own.
    members: Arc<RwLock<Vec<Arc<Member>>>>,
    /// How members learned from the ring are reached: the first configured
    /// member's settings, with their own address.
    template: Arc<ClientConfig>,
    next: Arc<AtomicUsize>,
    retry: RetryPolicy,
    consistency: Option<Consistency>,
    ring: Arc<RwLock<Option<Arc<RingView>>>>,
    /// When the ring was last fetched (or tried): it is fetched again every
    /// [`RING_MAX_AGE`], so members that joined get their keys.
    ring_checked: Arc<std::sync::Mutex<Option<Instant>>>,
    /// Set by [`Self::close`]: a reconnection still running then must not
    /// open a connection again.
    closed: Arc<AtomicBool>,
    /// Loads of [`Self::get_or_load`] in flight.
    loads: Arc<SingleFlight>,
}

/// The cluster's ring as a member described it.
struct RingView {
    ring: Ring,
    rf: usize,
    /// Member index by node id, where the node's client address is known.
    member_of_node: Vec<Option<usize>>,
    /// Which nodes the member described as up.
    alive: Vec<bool>,
}

impl RingView {
    /// Members to try for `key`: its owners whose client address is known,
    /// primary first, those up before those down (an owner that is down
    /// keeps its slots until the cluster's leader moves them).
    fn owners(&self, key: &[u8]) -> Vec<usize> {
        let nodes: Vec<usize> =
            self.ring.owners(key, self.rf).iter().filter_map(|m| m.id.parse::<usize>().ok()).collect();
        let up = |node: &usize| self.alive.get(*node).copied().unwrap_or(true);
        nodes
            .iter()
            .filter(|n| up(n))
            .chain(nodes.iter().filter(|n| !up(n)))
            .filter_map(|&node| self.member_of_node.get(node).copied().flatten())
            .collect()
    }
}

/// The ring `cluster` describes: its slot table and every member it names.
fn ring_of(cluster: &ClusterStats) -> Result<Ring, String> {
    if cluster.slots.is_empty() {
        return Err("the member has no slot table yet".into());
    }
    let table = cachet_proto::SlotTable::new(cluster.ring_epoch, cluster.slots.clone()).map_err(|e| e.to_string())?;
    let members = (0..cluster.members.len())
        .filter(|&id| !cluster.members[id].is_empty())
        .map(|id| RingMember { id: id.to_string(), addr: cluster.members[id].clone(), weight: 1 })
        .collect();
    Ring::new(members, table).map_err(|e| e.to_string())
}

struct Member {
    config: ClientConfig,
    /// Held by the background connection of a member learned from the
    /// ring while it makes its first connection, so per-member commands
    /// wait for it.
    client: Arc<Mutex<Option<Client>>>,
    /// After a failure that looked like the member itself (no connection,
    /// no reply), it is passed over until then, so a dead member does not
    /// cost every operation a timeout; and how many such failures in a row.
    avoid_until: std::sync::Mutex<(Option<Instant>, u32)>,
    /// A connection is being made in the background (the first to a
    /// member learned from the ring, or a reconnection after a failure);
    /// requests pass the member over until it succeeds.
    probing: AtomicBool,
}

/// How long a fetched ring is used before it is fetched again.
const RING_MAX_AGE: Duration = Duration::from_secs(10);

/// How long a member that failed once is passed over; doubled for each
/// failure in a row, up to [`AVOID_AT_MOST`].
const AVOID_FOR: Duration = Duration::from_millis(500);
const AVOID_AT_MOST: Duration = Duration::from_secs(8);

impl Member {
    fn new(config: ClientConfig) -> Self {
        Self {
            config,
            client: Arc::default(),
            avoid_until: std::sync::Mutex::new((None, 0)),
            probing: AtomicBool::new(false),
        }
    }

    fn avoided(&self, now: Instant) -> bool {
        self.avoid_until.lock().map(|t| t.0.is_some_and(|t| now < t)).unwrap_or(false)
    }

    fn avoid(&self) {
        if let Ok(mut t) = self.avoid_until.lock() {
            let wait = AVOID_FOR.saturating_mul(1 << t.1.min(8)).min(AVOID_AT_MOST);
            *t = (Some(Instant::now() + wait), t.1.saturating_add(1));
        }
    }

    fn healthy(&self) {
        if let Ok(mut t) = self.avoid_until.lock() {
            *t = (None, 0);
        }
    }

    /// Whether it failed and has not answered since.
    fn failed(&self) -> bool {
        self.avoid_until.lock().map(|t| t.1 > 0).unwrap_or(false)
    }
}

/// Whether another member may succeed where this one failed.
fn retryable(err: &ClientError) -> bool {
    match err {
        ClientError::Server(reply) => matches!(reply.code, ErrorCode::Unavailable | ErrorCode::Internal),
        ClientError::Connect { .. } | ClientError::Timeout(_) | ClientError::Connection(_) => true,
        _ => false,
    }
}

/// Whether a request that failed with `failure` is tried again: only on
/// a failure another member may not have, and, for a request that must
/// not apply twice (see [`reply::repeatable`]), only if it never left.
fn try_again(failure: &Failure, repeatable: bool) -> bool {
    retryable(&failure.error) && (repeatable || !failure.sent)
}

/// Where a member's client port is reached: the address it advertises,
/// or, when it advertises a wildcard (it listens on `0.0.0.0`), that port
/// on the IP of its peer address. `None` when neither tells.
fn client_address(advertised: &str, peer: Option<&str>) -> Option<SocketAddr> {
    let addr: SocketAddr = advertised.parse().ok()?;
    if !addr.ip().is_unspecified() {
        return Some(addr);
    }
    let peer: SocketAddr = peer?.parse().ok()?;
    (!peer.ip().is_unspecified()).then(|| SocketAddr::new(peer.ip(), addr.port()))
}

/// The positions of `keys` grouped by the member that is their primary
/// owner (keys whose owner is unknown together), each group in the order
/// of its first key.
fn by_owner(view: Option<&RingView>, keys: &[Bytes], whole: bool) -> Vec<Vec<usize>> {
    type Owners = (Option<usize>, Vec<usize>);
    let mut groups: Vec<(Owners, Vec<usize>)> = Vec::new();
    for (position, key) in keys.iter().enumerate() {
        let all = view.map(|v| v.owners(key)).unwrap_or_default();
        let mut set = if whole { all.clone() } else { Vec::new() };
        set.sort_unstable();
        let owner = (all.first().copied(), set);
        match groups.iter_mut().find(|(o, _)| *o == owner) {
            Some((_, group)) => group.push(position),
            None => groups.push((owner, vec![position])),
        }
    }
    groups.into_iter().map(|(_, group)| group).collect()
}

/// The keys at `positions`, in order.
fn pick(keys: &[Bytes], positions: &[usize]) -> Vec<Bytes> {
    positions.iter().map(|&p| keys[p].clone()).collect()
}

/// Runs `futures` at once on this task; their outputs in order.
async fn join_all<F: Future>(futures: impl IntoIterator<Item = F>) -> Vec<F::Output> {
    let mut futures: Vec<Pin<Box<F>>> = futures.into_iter().map(Box::pin).collect();
    let mut outputs: Vec<Option<F::Output>> = futures.iter().map(|_| None).collect();
    std::future::poll_fn(|cx| {
        let mut done = true;
        for (future, output) in futures.iter_mut().zip(outputs.iter_mut()) {
            if output.is_none() {
                match future.as_mut().poll(cx) {
                    Poll::Ready(value) => *output = Some(value),
                    Poll::Pending => done = false,
                }
            }
        }
        if done { Poll::Ready(()) } else { Poll::Pending }
    })
    .await;
    outputs.into_iter().flatten().collect()
}

impl ClusterClient {
    /// A client of the members in `configs` (one per member's client
    /// address; one is enough, the others are learned from the ring).
    /// Connects lazily: members that are down now are tried again later.
    pub fn new(configs: Vec<ClientConfig>, retry: RetryPolicy) -> Result<Self, ClientError> {
        let Some(template) = configs.first().cloned() else {
            return Err(ClientError::Protocol("a cluster client needs at least one member".into()));
        };
        let members = configs.into_iter().map(|config| Arc::new(Member::new(config))).collect();
        Ok(Self {
            members: Arc::new(RwLock::new(members)),
            template: Arc::new(template),
            next: Arc::default(),
            retry,
            consistency: None,
            ring: Arc::default(),
            ring_checked: Arc::default(),
            closed: Arc::default(),
            loads: Arc::default(),
        })
    }

    /// A handle whose requests ask for `level`.
    pub fn at(&self, level: Consistency) -> Self {
        Self { consistency: Some(level), ..self.clone() }
    }

    /// The client address of every member known, by member number: the
    /// configured ones, then those learned from the ring.
    pub fn members(&self) -> Vec<SocketAddr> {
        self.roster().iter().map(|m| m.config.server).collect()
    }

    fn roster(&self) -> Vec<Arc<Member>> {
        self.members.read().unwrap_or_else(PoisonError::into_inner).clone()
    }

    fn member_at(&self, i: usize) -> Result<Arc<Member>, ClientError> {
        let members = self.members.read().unwrap_or_else(PoisonError::into_inner);
        members.get(i).cloned().ok_or_else(|| ClientError::Protocol(format!("no member {i}")))
    }

    fn member_count(&self) -> usize {
        self.members.read().unwrap_or_else(PoisonError::into_inner).len()
    }

    /// Fetches the ring from the first member that answers, so requests
    /// go to their keys' owners, and learns the client address of every
    /// member in it. Called on first use and every 10 s after; call it
    /// again after the cluster changed.
    pub async fn refresh_ring(&self) -> Result<(), ClientError> {
        let mut last = None;
        let mut i = 0;
        // Members learned before are asked too, should every configured
        // one be down.
        while i < self.member_count() {
            let cluster = match self.stats_of(i).await {
                Ok(stats) => stats.cluster,
                Err(err) => {
                    last = Some(err);
                    i += 1;
                    continue;
                }
            };
            let Some(cluster) = cluster else {
                return Err(ClientError::Protocol("the node is not in a cluster".into()));
            };
            // The slot table from the cluster's metadata log: a member
            // that has none yet (still joining) sends the asking on.
            let ring = match ring_of(&cluster) {
                Ok(ring) => ring,
                Err(err) => {
                    last = Some(ClientError::Protocol(format!("the member's ring: {err}")));
                    i += 1;
                    continue;
                }
            };
            let member_of_node = self.learn(&cluster);
            let view = RingView {
                ring,
                rf: cluster.replication_factor as usize,
                member_of_node,
                alive: cluster.alive.clone(),
            };
            if let Ok(mut slot) = self.ring.write() {
                *slot = Some(Arc::new(view));
            }
            return Ok(());
        }
        Err(last.unwrap_or(ClientError::Protocol("no member to ask for the ring".into())))
    }

    /// The member number of every node in `cluster`, by node id, adding a
    /// member for each client address not known yet.
    ///
    /// A new member is connected to in the background: requests pass it
    /// over until that connection is up (so none waits on a member that
    /// died since the ring was fetched), and per-member commands wait for
    /// it.
    fn learn(&self, cluster: &ClusterStats) -> Vec<Option<usize>> {
        let mut new = Vec::new();
        let mut members = self.members.write().unwrap_or_else(PoisonError::into_inner);
        let mapped = (0..cluster.clients.len())
            .map(|id| {
                let addr = client_address(&cluster.clients[id], cluster.members.get(id).map(String::as_str))?;
                if let Some(i) = members.iter().position(|m| m.config.server == addr) {
                    return Some(i);
                }
                let config = ClientConfig { server: addr, ..(*self.template).clone() };
                tracing::debug!(node = id, %addr, "learned a member from the ring");
                let member = Arc::new(Member::new(config));
                member.probing.store(true, Ordering::Release);
                // Nobody else has it yet: the lock is free.
                if let Ok(slot) = member.client.clone().try_lock_owned() {
                    new.push((member.clone(), slot));
                }
                members.push(member);
                Some(members.len() - 1)
            })
            .collect();
        drop(members);
        for (member, slot) in new {
            spawn_probe(member, self.closed.clone(), Some(slot));
        }
        mapped
    }

    /// The ring, fetched again when it is older than [`RING_MAX_AGE`]
    /// (best effort: without a ring any member will do).
    async fn view(&self) -> Option<Arc<RingView>> {
        let stale = self.ring_checked.lock().is_ok_and(|mut checked| {
            let stale = checked.is_none_or(|at| at.elapsed() >= RING_MAX_AGE);
            if stale {
                *checked = Some(Instant::now());
            }
            stale
        });
        if stale {
            let _ = self.refresh_ring().await;
        }
        self.ring.read().ok().and_then(|r| r.clone())
    }

    /// The order to try members in for `key`: its owners (primary first)
    /// when the ring is known, then the others from a rotating start.
    async fn route(&self, key: &[u8]) -> Vec<usize> {
        let view = self.view().await;
        let n = self.member_count();
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        let mut order = view.map(|v| v.owners(key)).unwrap_or_default();
        for k in 0..n {
            let i = (start + k) % n;
            if !order.contains(&i) {
                order.push(i);
            }
        }
        order
    }

    /// Whether member `i` is passed over now: it failed a moment ago, or
    /// it failed before and is being reconnected in the background.
    ///
    /// Once its pause is over, a member that failed gets its connection
    /// back from a background probe rather than from the next request: a
    /// connection attempt to a dead member hangs for seconds (QUIC's
    /// handshake gives up when its idle timer fires, after the larger of
    /// the idle timeout and three probe timeouts: some 3 s at the initial
    /// RTT estimate), and every request that made it, or queued behind it,
    /// would wait that long.
    fn passed_over(&self, member: &Arc<Member>, now: Instant) -> bool {
        if member.probing.load(Ordering::Acquire) || member.avoided(now) {
            return true;
        }
        if !member.failed() {
            return false;
        }
        if member.probing.swap(true, Ordering::AcqRel) {
            // Another request started the probe just now.
            return true;
        }
        spawn_probe(member.clone(), self.closed.clone(), None);
        true
    }

    /// Member `i`'s client, connecting if needed. While the member is
    /// passed over this fails at once unless `force` (every member is
    /// passed over, so one must be tried anyway).
    async fn member(&self, i: usize, force: bool) -> Result<Client, ClientError> {
        let member = self.member_at(i)?;
        let mut slot = member.client.lock().await;
        if let Some(client) = slot.as_ref() {
            return Ok(client.clone());
        }
        // Others waiting here while a connection attempt failed need not
        // each make their own.
        if !force && self.passed_over(&member, Instant::now()) {
            return Err(ClientError::Connect {
                addr: member.config.server,
                detail: "passed over after failing just now".into(),
            });
        }
        let client = Client::connect_once(member.config.clone()).await?;
        *slot = Some(client.clone());
        Ok(client)
    }

    /// After a failure that looks like the member itself: pass it over for
    /// a while and drop its connection. A member killed outright never
    /// closes its connections, and one restarted cannot (it has new keys),
    /// so the old connection would swallow requests until its idle timeout.
    ///
    /// `failed` is the client the failure came through, if any: only that
    /// one is dropped, never a fresh one a reconnection just put in place.
    async fn forget(&self, i: usize, failed: Option<&Client>) {
        let Ok(member) = self.member_at(i) else { return };
        // Failing fast while passed over is not a new failure.
        if member.probing.load(Ordering::Acquire) || member.avoided(Instant::now()) {
            return;
        }
        member.avoid();
        let mut slot = member.client.lock().await;
        if let (Some(current), Some(failed)) = (slot.as_ref(), failed)
            && current.same_as(failed)
            && let Some(client) = slot.take()
        {
            tokio::spawn(async move { client.close().await });
        }
    }

    /// Runs `op` on one member after another until it succeeds, fails in
    /// a way no other member would change (or, unless `repeatable`, after
    /// the request may have reached a node), or the attempts run out.
    async fn with_retries<T, F, Fut>(&self, key: &[u8], repeatable: bool, op: F) -> Result<T, ClientError>
    where
        F: Fn(Client) -> Fut,
        Fut: Future<Output = Result<T, Failure>>,
    {
        let order = self.route(key).await;
        let mut pause = self.retry.backoff;
        let mut last = None;
        for attempt in 0..self.retry.attempts.max(1) as usize {
            if attempt > 0 {
                tokio::time::sleep(pause).await;
                pause *= 2;
            }
            let n = order.len();
            let now = Instant::now();
            // The next member in the key's order not passed over (or, if
            // all are, the next one anyway).
            let next = (0..n)
                .map(|k| order[(attempt + k) % n])
                .find(|&i| self.member_at(i).is_ok_and(|m| !self.passed_over(&m, now)));
            let (i, force) = match next {
                Some(i) => (i, false),
                None => (order[attempt % n], true),
            };
            let (result, used) = match self.member(i, force).await {
                Ok(client) => {
                    let handle = match self.consistency {
                        Some(level) => client.at(level),
                        None => client.clone(),
                    };
                    (op(handle).await, Some(client))
                }
                Err(err) => (Err(Failure::unsent(err)), None),
            };
            match result {
                Ok(value) => {
                    if let Ok(member) = self.member_at(i) {
                        member.healthy();
                    }
                    return Ok(value);
                }
                Err(failure) => {
                    if retryable(&failure.error) && !matches!(failure.error, ClientError::Server(_)) {
                        self.forget(i, used.as_ref()).await;
                    }
                    if !try_again(&failure, repeatable) {
                        return Err(failure.error);
                    }
                    last = Some(failure.error);
                }
            }
        }
        Err(last.unwrap_or(ClientError::Protocol("no attempt was made".into())))
    }

    /// Sends `request` for `key`, retried as the module docs say.
    async fn send(&self, key: &[u8], request: Request) -> Result<Response, ClientError> {
        let repeatable = reply::repeatable(&request);
        self.with_retries(key, repeatable, |client| {
            let request = request.clone();
            async move { client.exchange(request).await }
        })
        .await
    }

    /// Reads `key`.
    pub async fn get(&self, key: impl AsRef<[u8]>) -> Result<Option<Bytes>, ClientError> {
        let key = reply::key(key);
        reply::value(self.send(&key, Request::Get { key: key.clone() }).await?)
    }

    /// Writes `value` under `key` with no TTL. Retried after any failure.
    pub async fn set(&self, key: impl AsRef<[u8]>, value: impl Into<Bytes>) -> Result<(), ClientError> {
        self.set_with(key, value, SetOptions::default()).await.map(|_| ())
    }

    /// Writes `value` under `key` with a TTL, a condition (NX, XX) and a
    /// hint for the members' policy; returns whether the write applied
    /// (always true without a condition). Without a condition it is
    /// retried after any failure; with one only when it surely never
    /// reached a node, or a retry could answer about the first attempt's
    /// write (see the module docs).
    pub async fn set_with(
        &self,
        key: impl AsRef<[u8]>,
        value: impl Into<Bytes>,
        options: SetOptions,
    ) -> Result<bool, ClientError> {
        let key = reply::key(key);
        reply::applied(self.send(&key, reply::set(key.clone(), value.into(), options, false, false)).await?)
    }

    /// [`Client::set_keep_ttl`]: writes `value` under `key` and keeps the
    /// key's TTL. Retried as [`Self::set_with`].
    pub async fn set_keep_ttl(
        &self,
        key: impl AsRef<[u8]>,
        value: impl Into<Bytes>,
        options: SetOptions,
    ) -> Result<bool, ClientError> {
        let key = reply::key(key);
        reply::applied(self.send(&key, reply::set(key.clone(), value.into(), options, true, false)).await?)
    }

    /// [`Client::set_get`]: writes `value` under `key` and returns the
    /// value it replaced. Not retried once it may have reached a node (a
    /// second attempt would answer with this write's own value).
    pub async fn set_get(
        &self,
        key: impl AsRef<[u8]>,
        value: impl Into<Bytes>,
        options: SetOptions,
    ) -> Result<Option<Bytes>, ClientError> {
        let key = reply::key(key);
        reply::value(self.send(&key, reply::set(key.clone(), value.into(), options, false, true)).await?)
    }

    /// [`Client::set_get_keep_ttl`]: [`Self::set_get`] keeping the key's
    /// TTL. Not retried once it may have reached a node.
    pub async fn set_get_keep_ttl(
        &self,
        key: impl AsRef<[u8]>,
        value: impl Into<Bytes>,
        options: SetOptions,
    ) -> Result<Option<Bytes>, ClientError> {
        let key = reply::key(key);
        reply::value(self.send(&key, reply::set(key.clone(), value.into(), options, true, true)).await?)
    }

    /// Deletes `key`; returns whether it existed. Retried after any
    /// failure (a deletion applies the same twice), so after a retry it
    /// may say false for a key the failed attempt deleted.
    pub async fn delete(&self, key: impl AsRef<[u8]>) -> Result<bool, ClientError> {
        let key = reply::key(key);
        reply::count(self.send(&key, Request::Del { keys: vec![key.clone()] }).await?).map(|n| n > 0)
    }

    /// Deletes several keys, one request per primary owner, sent at once;
    /// returns how many existed (a key named twice counts once). Not
    /// atomic across owners: when it fails, the parts of other owners may
    /// have been deleted. Retried as [`Self::delete`].
    pub async fn delete_keys<K: AsRef<[u8]>>(&self, keys: &[K]) -> Result<u64, ClientError> {
        let keys = reply::keys(keys);
        let del = |part: &[usize]| Request::Del { keys: pick(&keys, part) };
        let counts = self.per_owner(&keys, del, reply::count).await?;
        Ok(counts.into_iter().map(|(_, n)| n).sum())
    }

    /// Counts how many of `keys` exist (a key named twice counts twice),
    /// asking each primary owner about its keys at once.
    pub async fn exists<K: AsRef<[u8]>>(&self, keys: &[K]) -> Result<u64, ClientError> {
        let keys = reply::keys(keys);
        let exists = |part: &[usize]| Request::Exists { keys: pick(&keys, part) };
        let counts = self.per_owner(&keys, exists, reply::count).await?;
        Ok(counts.into_iter().map(|(_, n)| n).sum())
    }

    /// Reads several keys: one MGET per primary owner, sent at once, the
    /// values back in the order of `keys`. Any part failing fails it.
    pub async fn mget<K: AsRef<[u8]>>(&self, keys: &[K]) -> Result<Vec<Option<Bytes>>, ClientError> {
        let keys = reply::keys(keys);
        let mget = |part: &[usize]| Request::MGet { keys: pick(&keys, part) };
        let parts = self.per_owner(&keys, mget, Ok).await?;
        let mut values = vec![None; keys.len()];
        for (positions, reply) in parts {
            for (position, value) in positions.iter().zip(reply::values(reply, positions.len())?) {
                values[*position] = value;
            }
        }
        Ok(values)
    }

    /// Writes several keys (no TTL): one MSET per primary owner, sent at
    /// once. A part refused or failed is an error for the whole.
    ///
    /// **Not atomic across owners**, as MSET on a clustered node is not:
    /// each owner stores its keys whatever the others do, so when this
    /// fails some keys may be stored and others not (a value over the
    /// members' size limit fails its owner's part only). Write keys that
    /// must change together under one hash tag (`{user:1}:name`,
    /// `{user:1}:mail`): they have one owner. Retried after any failure,
    /// as a plain SET.
    pub async fn mset(&self, pairs: Vec<(Bytes, Bytes)>) -> Result<(), ClientError> {
        let keys: Vec<Bytes> = pairs.iter().map(|(k, _)| k.clone()).collect();
        let mset = |part: &[usize]| Request::MSet { pairs: part.iter().map(|&p| pairs[p].clone()).collect() };
        // One part per set of owners (the primary first): the members
        // write each part as one batch.
        self.per_owners(&keys, true, mset, reply::ok).await.map(|_| ())
    }

    /// One request per primary owner of `keys` (made by `request` from
    /// the positions in `keys` of that owner's keys, in order), sent at
    /// once; each part's positions with its reply as `parse` reads it. The
    /// first part (in key order) that failed fails the whole, once every
    /// part has answered.
    async fn per_owner<T>(
        &self,
        keys: &[Bytes],
        request: impl Fn(&[usize]) -> Request,
        parse: impl Fn(Response) -> Result<T, ClientError>,
    ) -> Result<Vec<(Vec<usize>, T)>, ClientError> {
        self.per_owners(keys, false, request, parse).await
    }

    /// [`Self::per_owner`], split by the whole set of owners when `whole`
    /// (keys of one primary may differ in their other owners).
    async fn per_owners<T>(
        &self,
        keys: &[Bytes],
        whole: bool,
        request: impl Fn(&[usize]) -> Request,
        parse: impl Fn(Response) -> Result<T, ClientError>,
    ) -> Result<Vec<(Vec<usize>, T)>, ClientError> {
        if keys.is_empty() {
            return Ok(Vec::new());
        }
        let view = self.view().await;
        let groups = by_owner(view.as_deref(), keys, whole);
        let sends = groups.iter().map(|positions| {
            // Routed by its first key: every key of the part has the same
            // primary, and the retries' order differs little.
            let first = positions.first().map(|&p| keys[p].clone()).unwrap_or_default();
            let request = request(positions);
            async move { self.send(&first, request).await }
        });
        let replies = join_all(sends).await;
        groups.into_iter().zip(replies).map(|(positions, reply)| Ok((positions, parse(reply?)?))).collect()
    }

    /// Adds `delta` to the integer at `key` (0 when absent; a negative
    /// `delta` decrements); returns the result. The owner applies it once
    /// per request: it is not retried once it may have reached a node, so
    /// on a timeout or a lost connection the increment may or may not
    /// have applied (read the key to know).
    pub async fn incr(&self, key: impl AsRef<[u8]>, delta: i64) -> Result<i64, ClientError> {
        let key = reply::key(key);
        reply::integer(self.send(&key, Request::Incr { key: key.clone(), delta }).await?)
    }

    /// Appends `value` to the value at `key`; returns the new length. Not
    /// retried once it may have reached a node (it could apply twice).
    pub async fn append(&self, key: impl AsRef<[u8]>, value: impl Into<Bytes>) -> Result<u64, ClientError> {
        let key = reply::key(key);
        reply::length(self.send(&key, Request::Append { key: key.clone(), value: value.into() }).await?)
    }

    /// The length of the value at `key`; 0 when absent.
    pub async fn strlen(&self, key: impl AsRef<[u8]>) -> Result<u64, ClientError> {
        let key = reply::key(key);
        reply::length(self.send(&key, Request::Strlen { key: key.clone() }).await?)
    }

    /// Reads `key` and deletes it. Not retried once it may have reached a
    /// node (a second attempt would find the key gone and answer `None`).
    pub async fn getdel(&self, key: impl AsRef<[u8]>) -> Result<Option<Bytes>, ClientError> {
        let key = reply::key(key);
        reply::value(self.send(&key, Request::GetDel { key: key.clone() }).await?)
    }

    /// [`Client::getex`]: reads `key` and changes its TTL. Not retried once
    /// it may have reached a node.
    pub async fn getex(&self, key: impl AsRef<[u8]>, ttl: TtlChange) -> Result<Option<Bytes>, ClientError> {
        let key = reply::key(key);
        reply::value(self.send(&key, Request::GetEx { key: key.clone(), ttl }).await?)
    }

    /// Gives `key` a new TTL (a zero TTL deletes it); false if it does not
    /// exist. Not retried once it may have reached a node.
    pub async fn expire(&self, key: impl AsRef<[u8]>, ttl: Duration) -> Result<bool, ClientError> {
        let key = reply::key(key);
        let request = Request::Expire { key: key.clone(), ttl_ms: ttl.as_millis() as u64, when: Default::default() };
        reply::applied(self.send(&key, request).await?)
    }

    /// Removes the TTL of `key`; false if it had none or does not exist.
    /// Not retried once it may have reached a node.
    pub async fn persist(&self, key: impl AsRef<[u8]>) -> Result<bool, ClientError> {
        let key = reply::key(key);
        reply::applied(self.send(&key, Request::Persist { key: key.clone() }).await?)
    }

    /// The remaining lifetime of `key`.
    pub async fn ttl(&self, key: impl AsRef<[u8]>) -> Result<TtlState, ClientError> {
        let key = reply::key(key);
        reply::ttl(self.send(&key, Request::Ttl { key: key.clone() }).await?)
    }

    /// Reads `key`; on a miss runs `loader` once per key in this process
    /// (concurrent callers wait for that one load and share its value or
    /// error), stores the value with `ttl` and returns it. (A namespace
    /// the members load themselves, `--loaders`, needs none of this: a
    /// plain [`Self::get`] loads at the key's owner.)
    pub async fn get_or_load<F, Fut, E>(
        &self,
        key: impl AsRef<[u8]>,
        ttl: Option<Duration>,
        loader: F,
    ) -> Result<Bytes, LoadError>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<Bytes, E>>,
        E: std::error::Error + Send + Sync + 'static,
    {
        let key = reply::key(key);
        if let Some(value) = self.get(&key).await.map_err(LoadError::from_client)? {
            return Ok(value);
        }
        self.loads
            .run(key.clone(), async {
                let value = loader().await.map_err(LoadError::from_loader)?;
                let options = SetOptions { ttl, ..SetOptions::default() };
                self.set_with(&key, value.clone(), options).await.map_err(LoadError::from_client)?;
                Ok(value)
            })
            .await
    }

    /// Runs `op` on member `i`'s client (no retries: the answer is that
    /// member's).
    async fn on_member<T, F, Fut>(&self, i: usize, op: F) -> Result<T, ClientError>
    where
        F: FnOnce(Client) -> Fut,
        Fut: Future<Output = Result<T, ClientError>>,
    {
        let (result, used) = match self.member(i, false).await {
            Ok(client) => (op(client.clone()).await, Some(client)),
            Err(err) => (Err(err), None),
        };
        if let Err(err) = &result
            && retryable(err)
            && !matches!(err, ClientError::Server(_))
        {
            self.forget(i, used.as_ref()).await;
        }
        result
    }

    /// Runs `op` on every member known at once (the ring fetched first if
    /// due, so learned members are included); the results by member
    /// number.
    async fn on_each<T, F, Fut>(&self, op: F) -> Vec<Result<T, ClientError>>
    where
        F: Fn(Client) -> Fut,
        Fut: Future<Output = Result<T, ClientError>>,
    {
        let _ = self.view().await;
        join_all((0..self.member_count()).map(|i| self.on_member(i, &op))).await
    }

    /// Round trip to member `i`.
    pub async fn ping_of(&self, i: usize) -> Result<(), ClientError> {
        self.on_member(i, |c| async move { c.ping().await }).await
    }

    /// The stats of every member, by member number (see [`Self::members`]),
    /// without their hot keys.
    pub async fn stats(&self) -> Vec<Result<NodeStats, ClientError>> {
        self.on_each(|c| async move { c.stats().await }).await
    }

    /// The stats of member `i` (no retries: they are that member's),
    /// without its hot keys.
    pub async fn stats_of(&self, i: usize) -> Result<NodeStats, ClientError> {
        self.on_member(i, |c| async move { c.stats().await }).await
    }

    /// The stats of member `i` with its hot keys, given the admin token
    /// (see [`Client::admin_stats`]).
    pub async fn admin_stats_of(&self, i: usize, token: &str) -> Result<NodeStats, ClientError> {
        self.on_member(i, |c| async move { c.admin_stats(token).await }).await
    }

    /// The records member `i` holds (`DBSIZE` counts the member asked, as
    /// in Redis Cluster; deletions kept for a while included).
    pub async fn dbsize_of(&self, i: usize) -> Result<u64, ClientError> {
        self.on_member(i, |c| async move { c.dbsize().await }).await
    }

    /// Runs a policy operation on member `i` with its admin token (see
    /// [`Client::admin`]).
    pub async fn admin_of(&self, i: usize, token: &str, command: AdminCommand) -> Result<PolicyListing, ClientError> {
        self.on_member(i, |c| async move { c.admin(token, command).await }).await
    }

    /// Runs a policy operation on every member at once (each member runs
    /// its own policy: activate a version on all of them); the results by
    /// member number. Not all or nothing: check each.
    pub async fn admin_each(&self, token: &str, command: AdminCommand) -> Vec<Result<PolicyListing, ClientError>> {
        self.on_each(|c| {
            let command = command.clone();
            async move { c.admin(token, command).await }
        })
        .await
    }

    /// Stores a policy component in member `i`'s registry (see
    /// [`Client::load_module`]).
    #[allow(clippy::too_many_arguments)]
    pub async fn load_module_of(
        &self,
        i: usize,
        token: &str,
        name: &str,
        version: &str,
        config: Vec<(String, String)>,
        module: Bytes,
        fuel_per_call: Option<u64>,
        max_memory_bytes: Option<u64>,
    ) -> Result<PolicyListing, ClientError> {
        self.on_member(i, |c| async move {
            c.load_module(token, name, version, config, module, fuel_per_call, max_memory_bytes).await
        })
        .await
    }

    /// Stores a policy component in every member's registry at once; the
    /// results by member number.
    #[allow(clippy::too_many_arguments)]
    pub async fn load_module_each(
        &self,
        token: &str,
        name: &str,
        version: &str,
        config: Vec<(String, String)>,
        module: Bytes,
        fuel_per_call: Option<u64>,
        max_memory_bytes: Option<u64>,
    ) -> Vec<Result<PolicyListing, ClientError>> {
        self.on_each(|c| {
            let (config, module) = (config.clone(), module.clone());
            async move { c.load_module(token, name, version, config, module, fuel_per_call, max_memory_bytes).await }
        })
        .await
    }

    /// Closes every connection.
    pub async fn close(&self) {
        self.closed.store(true, Ordering::Release);
        for member in self.roster() {
            // A connection being made in the background sees `closed` and
            // closes itself; its slot may be held meanwhile.
            let taken = if member.probing.load(Ordering::Acquire) {
                member.client.try_lock().ok().and_then(|mut slot| slot.take())
            } else {
                member.client.lock().await.take()
            };
            if let Some(client) = taken {
                client.close().await;
            }
        }
    }
}

/// Connects to `member` in the background; the caller has set its
/// `probing` flag, which is cleared when this ends. `first` is the
/// member's slot, held for its first connection (see [`Member::client`]);
/// a reconnection holds nothing, so nothing ever waits on a dead member.
fn spawn_probe(member: Arc<Member>, closed: Arc<AtomicBool>, first: Option<OwnedMutexGuard<Option<Client>>>) {
    if tokio::runtime::Handle::try_current().is_err() {
        // No runtime to connect on: the first request connects.
        member.probing.store(false, Ordering::Release);
        return;
    }
    tokio::spawn(async move {
        // Cleared however the task ends, even dropped with its runtime,
        // or the member would be passed over for good.
        let _probing = ClearOnDrop(&member.probing);
        let connected = Client::connect_once(member.config.clone()).await;
        let mut slot = match first {
            Some(slot) => slot,
            None => member.client.clone().lock_owned().await,
        };
        match connected {
            Ok(client) => {
                let spare = if slot.is_some() || closed.load(Ordering::Acquire) {
                    // A forced request connected meanwhile, or the
                    // cluster client was closed.
                    Some(client)
                } else {
                    *slot = Some(client);
                    None
                };
                drop(slot);
                member.healthy();
                if let Some(spare) = spare {
                    spare.close().await;
                }
            }
            Err(err) => {
                tracing::debug!(member = %member.config.server, %err, "connection in the background failed");
                // Unless a forced request got through meanwhile.
                if slot.is_none() {
                    member.avoid();
                }
            }
        }
    });
}

/// Clears its flag when dropped.
struct ClearOnDrop<'a>(&'a AtomicBool);

impl Drop for ClearOnDrop<'_> {
    fn drop(&mut self) {
        self.0.store(false, Ordering::Release);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ErrorReply;

    fn config(addr: &str) -> ClientConfig {
        let mut config = ClientConfig::new(addr.parse().expect("addr"));
        config.ca_file = Some("/etc/cachet/ca.pem".into());
        config.identity = Some(("/etc/cachet/client.pem".into(), "/etc/cachet/client-key.pem".into()));
        config.server_name = "cachet.internal".into();
        config.timeout = Duration::from_millis(750);
        config
    }

    /// What a member's stats say of a 3-member cluster on 10.0.0.1-3.
    fn cluster_stats() -> ClusterStats {
        ClusterStats {
            members: (1..=3).map(|i| format!("10.0.0.{i}:7071")).collect(),
            clients: (1..=3).map(|i| format!("10.0.0.{i}:7070")).collect(),
            alive: vec![true; 3],
            replication_factor: 2,
            ring_epoch: 1,
            slots: cachet_proto::SlotTable::balanced(1, &[0, 1, 2], 2).expect("table").ranges().to_vec(),
            ..ClusterStats::default()
        }
    }

    fn view_of(client: &ClusterClient, cluster: &ClusterStats) -> RingView {
        let ring = ring_of(cluster).expect("ring");
        RingView {
            ring,
            rf: cluster.replication_factor as usize,
            member_of_node: client.learn(cluster),
            alive: cluster.alive.clone(),
        }
    }

    #[test]
    fn a_client_given_one_member_learns_the_others_with_its_tls_settings() {
        let client = ClusterClient::new(vec![config("10.0.0.2:7070")], RetryPolicy::default()).expect("client");
        assert_eq!(client.members(), vec!["10.0.0.2:7070".parse::<SocketAddr>().expect("addr")]);
        let mapped = client.learn(&cluster_stats());
        // Node 1 is the configured member 0; nodes 0 and 2 are new.
        assert_eq!(mapped, vec![Some(1), Some(0), Some(2)]);
        let learned: Vec<SocketAddr> =
            ["10.0.0.2:7070", "10.0.0.1:7070", "10.0.0.3:7070"].iter().map(|a| a.parse().expect("addr")).collect();
        assert_eq!(client.members(), learned);
        for member in client.roster() {
            let (template, c) = (config("10.0.0.2:7070"), &member.config);
            assert_eq!(
                (&c.ca_file, &c.identity, &c.server_name, c.timeout),
                (&template.ca_file, &template.identity, &template.server_name, template.timeout),
                "{} is reached as the configured member is",
                c.server
            );
        }
        // Learning again adds nothing.
        assert_eq!(client.learn(&cluster_stats()), mapped);
        assert_eq!(client.members().len(), 3);
    }

    #[tokio::test]
    async fn a_learned_member_is_passed_over_until_its_background_connection_is_up() {
        let client = ClusterClient::new(vec![config("10.0.0.2:7070")], RetryPolicy::default()).expect("client");
        client.learn(&cluster_stats());
        let now = Instant::now();
        let roster = client.roster();
        assert!(!client.passed_over(&roster[0], now), "the configured member connects on first use");
        assert!(client.passed_over(&roster[1], now) && client.passed_over(&roster[2], now), "learned: connecting");
        // Their CA file does not exist, so the connections fail, and the
        // members are avoided for a while (their slots were held meanwhile).
        for member in &roster[1..] {
            let slot = member.client.lock().await;
            assert!(slot.is_none());
            drop(slot);
            tokio::task::yield_now().await;
            assert!(member.failed() && client.passed_over(member, Instant::now()), "{}", member.config.server);
        }
    }

    #[test]
    fn a_wildcard_client_address_is_reached_on_the_peer_ip() {
        let at = |s: &str| Some(s.parse::<SocketAddr>().expect("addr"));
        assert_eq!(client_address("10.0.0.1:7070", Some("10.0.0.9:7071")), at("10.0.0.1:7070"));
        assert_eq!(client_address("0.0.0.0:7070", Some("10.0.0.9:7071")), at("10.0.0.9:7070"));
        assert_eq!(client_address("[::]:7070", Some("[fd00::9]:7071")), at("[fd00::9]:7070"));
        assert_eq!(client_address("0.0.0.0:7070", Some("0.0.0.0:7071")), None);
        assert_eq!(client_address("0.0.0.0:7070", None), None);
        assert_eq!(client_address("", Some("10.0.0.9:7071")), None, "not known yet");
        let mut cluster = cluster_stats();
        cluster.clients[2] = "0.0.0.0:7070".into();
        cluster.clients[1] = String::new();
        let client = ClusterClient::new(vec![config("10.0.0.1:7070")], RetryPolicy::default()).expect("client");
        assert_eq!(client.learn(&cluster), vec![Some(0), None, Some(1)]);
        assert_eq!(client.members()[1], "10.0.0.3:7070".parse::<SocketAddr>().expect("addr"));
    }

    #[test]
    fn keys_are_grouped_by_primary_owner_in_the_callers_order() {
        let client = ClusterClient::new(vec![config("10.0.0.1:7070")], RetryPolicy::default()).expect("client");
        // Member 0 is primary of two ranges with different second owners.
        let range = |start, end, owners: [u32; 2]| cachet_proto::SlotRange {
            start,
            end,
            owners: owners.to_vec(),
            pending: Vec::new(),
        };
        let slots = vec![
            range(0, 4_000, [0, 1]),
            range(4_001, 8_191, [0, 2]),
            range(8_192, 12_000, [1, 2]),
            range(12_001, 16_383, [2, 0]),
        ];
        let view = view_of(&client, &ClusterStats { slots, ..cluster_stats() });
        let keys: Vec<Bytes> = (0..40).map(|i| Bytes::from(format!("k{i}"))).collect();
        let groups = by_owner(Some(&view), &keys, false);
        assert_eq!(groups.len(), 3, "40 keys over 3 members");
        let mut seen: Vec<usize> = groups.iter().flatten().copied().collect();
        seen.sort_unstable();
        assert_eq!(seen, (0..40).collect::<Vec<_>>(), "every position once");
        for group in &groups {
            let owner = view.owners(&keys[group[0]])[0];
            assert!(group.windows(2).all(|w| w[0] < w[1]), "in the caller's order: {group:?}");
            assert!(group.iter().all(|&p| view.owners(&keys[p])[0] == owner), "one primary per group");
        }
        assert!(groups.windows(2).all(|g| g[0][0] < g[1][0]), "groups in the order of their first key");
        // For an MSET, by the whole set of owners (member 0's keys have
        // member 1 or member 2 beside it).
        let whole = by_owner(Some(&view), &keys, true);
        assert!(whole.len() > groups.len(), "{} sets of owners", whole.len());
        for group in &whole {
            let mut owners = view.owners(&keys[group[0]]);
            owners.sort_unstable();
            assert!(group.iter().all(|&p| {
                let mut these = view.owners(&keys[p]);
                these.sort_unstable();
                these == owners && view.owners(&keys[p])[0] == view.owners(&keys[group[0]])[0]
            }));
        }
        // Without a ring, one group.
        assert_eq!(by_owner(None, &keys, false), vec![(0..40).collect::<Vec<_>>()]);
        assert!(by_owner(Some(&view), &[], true).is_empty());
    }

    #[test]
    fn a_read_modify_write_is_retried_only_when_it_never_left() {
        let timeout = || ClientError::Timeout(Duration::from_secs(1));
        let unavailable = || ClientError::Server(ErrorReply::new(ErrorCode::Unavailable, "too few replicas"));
        let refused = || ClientError::Server(ErrorReply::new(ErrorCode::WrongType, "not an integer"));
        let connect = || ClientError::Connect { addr: "10.0.0.1:7070".parse().expect("addr"), detail: "down".into() };
        for (error, sent, repeatable, expected) in [
            (connect(), false, false, true),
            (timeout(), false, false, true),
            (ClientError::Connection("gone".into()), false, false, true),
            (timeout(), true, false, false),
            (ClientError::Connection("stream closed".into()), true, false, false),
            (unavailable(), true, false, false),
            (timeout(), true, true, true),
            (unavailable(), true, true, true),
            (refused(), true, true, false),
            (refused(), false, false, false),
        ] {
            let failure = Failure { error, sent };
            assert_eq!(try_again(&failure, repeatable), expected, "{failure:?}, repeatable {repeatable}");
        }
    }

    #[tokio::test]
    async fn join_all_keeps_the_order_of_its_futures() {
        let slow_first = (0..4u64).map(|i| async move {
            tokio::time::sleep(Duration::from_millis(40 - 10 * i)).await;
            i
        });
        assert_eq!(join_all(slow_first).await, vec![0, 1, 2, 3]);
        assert!(join_all(Vec::<std::future::Ready<u8>>::new()).await.is_empty());
    }
}
