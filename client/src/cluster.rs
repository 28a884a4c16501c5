//! A client of a whole cluster. Any member coordinates any key (it
//! forwards the operation to the key's replicas), but the client learns the
//! ring from a member's stats and sends each request to the key's primary
//! owner, which holds a copy and so saves a hop; without a ring (not
//! fetched yet, or the owner not among the configured members) it spreads
//! requests over the members. When a member fails (it is down, or too few
//! replicas answered), the request is retried on the key's next owner, then
//! the other members, after a short pause. Retries make an operation succeed
//! through a failover; they also mean a write that failed may still have
//! been applied, as with any replicated store.

use crate::{Client, ClientConfig, ClientError, Consistency, ErrorCode, NodeStats};
use bytes::Bytes;
use cachet_proto::{Member as RingMember, Ring};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};
use tokio::sync::Mutex;

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
#[derive(Clone)]
pub struct ClusterClient {
    members: Arc<Vec<Member>>,
    next: Arc<AtomicUsize>,
    retry: RetryPolicy,
    consistency: Option<Consistency>,
    ring: Arc<std::sync::RwLock<Option<Arc<RingView>>>>,
    /// When the ring was last fetched (or tried): it is fetched again every
    /// [`RING_MAX_AGE`], so members that joined get their keys.
    ring_checked: Arc<std::sync::Mutex<Option<Instant>>>,
    /// Set by [`Self::close`]: a reconnection still running then must not
    /// open a connection again.
    closed: Arc<AtomicBool>,
}

/// The cluster's ring as a member described it.
struct RingView {
    ring: Ring,
    rf: usize,
    /// Configured member index by node id, where the addresses match.
    member_of_node: Vec<Option<usize>>,
}

impl RingView {
    /// Members to try for `key`: its owners that are configured here,
    /// primary first.
    fn owners(&self, key: &[u8]) -> Vec<usize> {
        self.ring
            .owners(key, self.rf)
            .iter()
            .filter_map(|m| m.id.parse::<usize>().ok())
            .filter_map(|node| self.member_of_node.get(node).copied().flatten())
            .collect()
    }
}

struct Member {
    config: ClientConfig,
    client: Mutex<Option<Client>>,
    /// After a failure that looked like the member itself (no connection,
    /// no reply), it is passed over until then, so a dead member does not
    /// cost every operation a timeout; and how many such failures in a row.
    avoid_until: std::sync::Mutex<(Option<Instant>, u32)>,
    /// A reconnection is being tried in the background; the member is
    /// passed over until it succeeds.
    probing: AtomicBool,
}

/// How long a fetched ring is used before it is fetched again.
const RING_MAX_AGE: Duration = Duration::from_secs(10);

/// How long a member that failed once is passed over; doubled for each
/// failure in a row, up to [`AVOID_AT_MOST`].
const AVOID_FOR: Duration = Duration::from_millis(500);
const AVOID_AT_MOST: Duration = Duration::from_secs(8);

impl Member {
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

impl ClusterClient {
    /// A client of the members in `configs` (one per member's client
    /// address). Connects lazily: members that are down now are tried again
    /// later.
    pub fn new(configs: Vec<ClientConfig>, retry: RetryPolicy) -> Result<Self, ClientError> {
        if configs.is_empty() {
            return Err(ClientError::Protocol("a cluster client needs at least one member".into()));
        }
        let members = configs
            .into_iter()
            .map(|config| Member {
                config,
                client: Mutex::new(None),
                avoid_until: std::sync::Mutex::new((None, 0)),
                probing: AtomicBool::new(false),
            })
            .collect();
        Ok(Self {
            members: Arc::new(members),
            next: Arc::default(),
            retry,
            consistency: None,
            ring: Arc::default(),
            ring_checked: Arc::default(),
            closed: Arc::default(),
        })
    }

    /// A handle whose requests ask for `level`.
    pub fn at(&self, level: Consistency) -> Self {
        Self { consistency: Some(level), ..self.clone() }
    }

    /// Fetches the ring from the first member that answers, so requests
    /// go to their keys' owners. Called on first use; call again after the
    /// cluster changed.
    pub async fn refresh_ring(&self) -> Result<(), ClientError> {
        let mut last = None;
        for i in 0..self.members.len() {
            let cluster = match self.stats_of(i).await {
                Ok(stats) => stats.cluster,
                Err(err) => {
                    last = Some(err);
                    continue;
                }
            };
            let Some(cluster) = cluster else {
                return Err(ClientError::Protocol("the node is not in a cluster".into()));
            };
            // The serving ring: members declared down have left it, and
            // their ranges moved to the next members.
            let members = (0..cluster.members.len())
                .filter(|&id| !cluster.members[id].is_empty() && cluster.alive.get(id).copied().unwrap_or(true))
                .map(|id| RingMember { id: id.to_string(), addr: cluster.members[id].clone(), weight: 1 })
                .collect();
            let ring = Ring::new(1, members, cachet_proto::DEFAULT_VNODES)
                .map_err(|e| ClientError::Protocol(format!("the member's ring: {e}")))?;
            let member_of_node = cluster
                .clients
                .iter()
                .map(|addr| self.members.iter().position(|m| !addr.is_empty() && m.config.server.to_string() == *addr))
                .collect();
            let view = RingView { ring, rf: cluster.replication_factor as usize, member_of_node };
            if let Ok(mut slot) = self.ring.write() {
                *slot = Some(Arc::new(view));
            }
            return Ok(());
        }
        Err(last.unwrap_or(ClientError::Protocol("no member to ask for the ring".into())))
    }

    /// The order to try members in for `key`: its owners (primary first)
    /// when the ring is known, then the others from a rotating start.
    async fn route(&self, key: &[u8]) -> Vec<usize> {
        let stale = self.ring_checked.lock().is_ok_and(|mut checked| {
            let stale = checked.is_none_or(|at| at.elapsed() >= RING_MAX_AGE);
            if stale {
                *checked = Some(Instant::now());
            }
            stale
        });
        if stale {
            // Best effort: without a ring any member will do.
            let _ = self.refresh_ring().await;
        }
        let view = self.ring.read().ok().and_then(|r| r.clone());
        let n = self.members.len();
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
    fn passed_over(&self, i: usize, now: Instant) -> bool {
        let member = &self.members[i];
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
        let (members, closed) = (self.members.clone(), self.closed.clone());
        tokio::spawn(async move {
            let member = &members[i];
            // Cleared however the task ends, even dropped with its runtime,
            // or the member would be passed over for good.
            let _probing = ClearOnDrop(&member.probing);
            match Client::connect_once(member.config.clone()).await {
                Ok(client) => {
                    let mut slot = member.client.lock().await;
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
                    tracing::debug!(member = %member.config.server, %err, "reconnection failed");
                    // Unless a forced request got through meanwhile.
                    if member.failed() && member.client.lock().await.is_none() {
                        member.avoid();
                    }
                }
            }
        });
        true
    }

    /// Member `i`'s client, connecting if needed. While the member is
    /// passed over this fails at once unless `force` (every member is
    /// passed over, so one must be tried anyway).
    async fn member(&self, i: usize, force: bool) -> Result<Client, ClientError> {
        let member = &self.members[i];
        let mut slot = member.client.lock().await;
        if let Some(client) = slot.as_ref() {
            return Ok(client.clone());
        }
        // Others waiting here while a connection attempt failed need not
        // each make their own.
        if !force && self.passed_over(i, Instant::now()) {
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
        let member = &self.members[i];
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
    /// a way no other member would change, or the attempts run out.
    async fn with_retries<T, F, Fut>(&self, key: &[u8], op: F) -> Result<T, ClientError>
    where
        F: Fn(Client) -> Fut,
        Fut: Future<Output = Result<T, ClientError>>,
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
            let next = (0..n).map(|k| order[(attempt + k) % n]).find(|&i| !self.passed_over(i, now));
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
                Err(err) => (Err(err), None),
            };
            match result {
                Ok(value) => {
                    self.members[i].healthy();
                    return Ok(value);
                }
                Err(err) if retryable(&err) => {
                    if !matches!(err, ClientError::Server(_)) {
                        self.forget(i, used.as_ref()).await;
                    }
                    last = Some(err);
                }
                Err(err) => return Err(err),
            }
        }
        Err(last.unwrap_or(ClientError::Protocol("no attempt was made".into())))
    }

    /// Reads `key`.
    pub async fn get(&self, key: impl AsRef<[u8]>) -> Result<Option<Bytes>, ClientError> {
        let key = Bytes::copy_from_slice(key.as_ref());
        self.with_retries(&key, |c| {
            let key = key.clone();
            async move { c.get(&key).await }
        })
        .await
    }

    /// Writes `value` under `key`.
    pub async fn set(&self, key: impl AsRef<[u8]>, value: impl Into<Bytes>) -> Result<(), ClientError> {
        let (key, value) = (Bytes::copy_from_slice(key.as_ref()), value.into());
        self.with_retries(&key, |c| {
            let (key, value) = (key.clone(), value.clone());
            async move { c.set(&key, value).await }
        })
        .await
    }

    /// Deletes `key`; returns whether it existed.
    pub async fn delete(&self, key: impl AsRef<[u8]>) -> Result<bool, ClientError> {
        let key = Bytes::copy_from_slice(key.as_ref());
        self.with_retries(&key, |c| {
            let key = key.clone();
            async move { c.delete(&[&key]).await.map(|n| n > 0) }
        })
        .await
    }

    /// The stats of member `i` (no retries: they are that member's),
    /// without its hot keys.
    pub async fn stats_of(&self, i: usize) -> Result<NodeStats, ClientError> {
        self.member_stats(i, None).await
    }

    /// The stats of member `i` with its hot keys, given the admin token
    /// (see [`Client::admin_stats`]).
    pub async fn admin_stats_of(&self, i: usize, token: &str) -> Result<NodeStats, ClientError> {
        self.member_stats(i, Some(token)).await
    }

    async fn member_stats(&self, i: usize, token: Option<&str>) -> Result<NodeStats, ClientError> {
        if i >= self.members.len() {
            return Err(ClientError::Protocol(format!("no member {i}")));
        }
        let (result, used) = match self.member(i, false).await {
            Ok(client) => {
                let stats = match token {
                    Some(token) => client.admin_stats(token).await,
                    None => client.stats().await,
                };
                (stats, Some(client))
            }
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

    /// Closes every connection.
    pub async fn close(&self) {
        self.closed.store(true, Ordering::Release);
        for member in self.members.iter() {
            if let Some(client) = member.client.lock().await.take() {
                client.close().await;
            }
        }
    }
}

/// Clears its flag when dropped.
struct ClearOnDrop<'a>(&'a AtomicBool);

impl Drop for ClearOnDrop<'_> {
    fn drop(&mut self) {
        self.0.store(false, Ordering::Release);
    }
}
