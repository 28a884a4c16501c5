//! A client of a whole cluster. Any member coordinates any key (it sends
//! the operation to the key's replicas), so the client spreads requests over
//! the members and, when one fails (the member is down, or too few replicas
//! answered), retries on the next member after a short pause. Retries make
//! an operation succeed through a failover; they also mean a write that
//! failed may still have been applied, as with any replicated store.

use crate::{Client, ClientConfig, ClientError, Consistency, ErrorCode, NodeStats};
use bytes::Bytes;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
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
}

struct Member {
    config: ClientConfig,
    client: Mutex<Option<Client>>,
    /// After a failure that looked like the member itself (no connection,
    /// no reply), it is passed over until then, so a dead member does not
    /// cost every operation a timeout.
    avoid_until: std::sync::Mutex<Option<Instant>>,
}

/// How long a member that failed is passed over.
const AVOID_FOR: Duration = Duration::from_secs(1);

impl Member {
    fn avoided(&self, now: Instant) -> bool {
        self.avoid_until.lock().map(|t| t.is_some_and(|t| now < t)).unwrap_or(false)
    }

    fn avoid(&self) {
        if let Ok(mut t) = self.avoid_until.lock() {
            *t = Some(Instant::now() + AVOID_FOR);
        }
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
            .map(|config| Member { config, client: Mutex::new(None), avoid_until: std::sync::Mutex::new(None) })
            .collect();
        Ok(Self { members: Arc::new(members), next: Arc::default(), retry, consistency: None })
    }

    /// A handle whose requests ask for `level`.
    pub fn at(&self, level: Consistency) -> Self {
        Self { consistency: Some(level), ..self.clone() }
    }

    async fn member(&self, i: usize) -> Result<Client, ClientError> {
        let member = &self.members[i];
        let mut slot = member.client.lock().await;
        if let Some(client) = slot.as_ref() {
            return Ok(client.clone());
        }
        let client = Client::connect(member.config.clone()).await?;
        *slot = Some(client.clone());
        Ok(client)
    }

    /// After a failure that looks like the member itself: pass it over for
    /// a while and drop its connection. A member killed outright never
    /// closes its connections, and one restarted cannot (it has new keys),
    /// so the old connection would swallow requests until its idle timeout.
    async fn forget(&self, i: usize) {
        self.members[i].avoid();
        if let Some(client) = self.members[i].client.lock().await.take() {
            tokio::spawn(async move { client.close().await });
        }
    }

    /// Runs `op` on one member after another until it succeeds, fails in
    /// a way no other member would change, or the attempts run out.
    async fn with_retries<T, F, Fut>(&self, op: F) -> Result<T, ClientError>
    where
        F: Fn(Client) -> Fut,
        Fut: Future<Output = Result<T, ClientError>>,
    {
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        let mut pause = self.retry.backoff;
        let mut last = None;
        for attempt in 0..self.retry.attempts.max(1) {
            if attempt > 0 {
                tokio::time::sleep(pause).await;
                pause *= 2;
            }
            let n = self.members.len();
            let now = Instant::now();
            // The next member not passed over (or, if all are, the next).
            let i = (0..n)
                .map(|k| (start + attempt as usize + k) % n)
                .find(|&i| !self.members[i].avoided(now))
                .unwrap_or((start + attempt as usize) % n);
            let result = match self.member(i).await {
                Ok(client) => {
                    let client = match self.consistency {
                        Some(level) => client.at(level),
                        None => client,
                    };
                    op(client).await
                }
                Err(err) => Err(err),
            };
            match result {
                Ok(value) => return Ok(value),
                Err(err) if retryable(&err) => {
                    if !matches!(err, ClientError::Server(_)) {
                        self.forget(i).await;
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
        self.with_retries(|c| {
            let key = key.clone();
            async move { c.get(&key).await }
        })
        .await
    }

    /// Writes `value` under `key`.
    pub async fn set(&self, key: impl AsRef<[u8]>, value: impl Into<Bytes>) -> Result<(), ClientError> {
        let (key, value) = (Bytes::copy_from_slice(key.as_ref()), value.into());
        self.with_retries(|c| {
            let (key, value) = (key.clone(), value.clone());
            async move { c.set(&key, value).await }
        })
        .await
    }

    /// Deletes `key`; returns whether it existed.
    pub async fn delete(&self, key: impl AsRef<[u8]>) -> Result<bool, ClientError> {
        let key = Bytes::copy_from_slice(key.as_ref());
        self.with_retries(|c| {
            let key = key.clone();
            async move { c.delete(&[&key]).await.map(|n| n > 0) }
        })
        .await
    }

    /// The stats of member `i` (no retries: they are that member's).
    pub async fn stats_of(&self, i: usize) -> Result<NodeStats, ClientError> {
        if i >= self.members.len() {
            return Err(ClientError::Protocol(format!("no member {i}")));
        }
        let result = match self.member(i).await {
            Ok(client) => client.stats().await,
            Err(err) => Err(err),
        };
        if let Err(err) = &result
            && retryable(err)
            && !matches!(err, ClientError::Server(_))
        {
            self.forget(i).await;
        }
        result
    }

    /// Closes every connection.
    pub async fn close(&self) {
        for member in self.members.iter() {
            if let Some(client) = member.client.lock().await.take() {
                client.close().await;
            }
        }
    }
}
