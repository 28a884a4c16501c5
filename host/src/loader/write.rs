//! Write-through and write-behind: client SETs and DELs of a namespace that
//! writes go to the origin through the loader's `store`.
//!
//! Writes to one key are serialized (a lock stripe per key hash), and the
//! stripe is held until the loader's `store` call has really ended, even
//! when the client was already told it timed out, so the origin and the
//! cache see one key's writes in the same order. Installing a written value
//! breaks the lease of any load in flight for the key, under the lock loads
//! install under: a load that read the row before the write can never
//! overwrite the written value.
//!
//! Write-behind answers once the cache holds the value and the write is
//! queued. One worker per namespace stores the queue in order, retrying
//! with back-off; the queue is bounded, and a write that finds it full is
//! refused (nothing changes). While a key has a write queued, its reads
//! are answered from that write and loads of it install nothing, since the
//! origin still holds the older value. What is queued when the node dies
//! is lost: the window is the queue's depth over the origin's store rate,
//! and `write_lag` (enqueue to commit) measures it.

use super::config::WriteMode;
use super::guest::CallFailure;
use super::{Loaders, lock};
use crate::core::{SetOptions, SharedHistogram};
use crate::store::Store;
use bytes::Bytes;
use cachet_proto::{ErrorCode, ErrorReply, Response};
use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};
use tokio::sync::{Notify, OwnedMutexGuard};

/// Lock stripes serializing writes per key.
pub(super) const WRITE_STRIPES: usize = 256;

/// One queued write-behind store.
struct Queued {
    key: Bytes,
    value: Option<Bytes>,
    at: Instant,
}

/// A namespace's write-behind queue.
pub(super) struct WriteQueue {
    items: Mutex<VecDeque<Queued>>,
    /// Keys with writes still queued: how many, and the latest value.
    pending: Mutex<HashMap<Bytes, (usize, Option<Bytes>)>>,
    wake: Notify,
    capacity: usize,
    /// Time from enqueue to the origin's acknowledgement.
    pub(super) lag: SharedHistogram,
}

impl WriteQueue {
    pub(super) fn new(capacity: usize) -> Self {
        Self {
            items: Mutex::default(),
            pending: Mutex::default(),
            wake: Notify::new(),
            capacity,
            lag: SharedHistogram::default(),
        }
    }

    /// Writes waiting.
    pub(super) fn depth(&self) -> usize {
        lock(&self.items).len()
    }

    /// The latest queued value of `key`, if a write of it is queued
    /// (`Some(None)`: a queued delete).
    pub(super) fn queued(&self, key: &[u8]) -> Option<Option<Bytes>> {
        lock(&self.pending).get(key).map(|(_, value)| value.clone())
    }

    fn done(&self, key: &Bytes) {
        let mut pending = lock(&self.pending);
        if let Some((count, _)) = pending.get_mut(key) {
            *count -= 1;
            if *count == 0 {
                pending.remove(key);
            }
        }
    }
}

/// What a client write asks for.
pub enum Write {
    /// SET with an optional TTL in milliseconds.
    Set(Bytes, Option<u64>),
    /// DEL.
    Delete,
}

impl Write {
    fn value(&self) -> Option<Bytes> {
        match self {
            Self::Set(value, _) => Some(value.clone()),
            Self::Delete => None,
        }
    }
}

fn failure_reply(failure: &CallFailure) -> ErrorReply {
    let code = if matches!(failure, CallFailure::Origin(_)) { ErrorCode::OriginFailed } else { ErrorCode::LoadFailed };
    ErrorReply::new(code, format!("the write was not stored: {failure}"))
}

impl Loaders {
    /// How `key`'s namespace writes, if it writes to its origin.
    pub fn write_mode(&self, key: &[u8]) -> Option<WriteMode> {
        let index = self.namespace(key)?;
        let mode = self.namespaces[index].config.write;
        (mode != WriteMode::None).then_some(mode)
    }

    /// The latest write-behind value queued for `key`, if any.
    pub(super) fn queued_write(&self, index: usize, key: &[u8]) -> Option<Option<Bytes>> {
        self.queues.get(index)?.as_ref()?.queued(key)
    }

    /// Runs a client SET or DEL of `key`, which [`Loaders::write_mode`]
    /// says writes to its origin.
    pub async fn write(self: &Arc<Self>, key: Bytes, write: Write) -> Response {
        let Some(index) = self.namespace(&key) else {
            return Response::Error(ErrorReply::new(ErrorCode::Internal, "not a write namespace"));
        };
        let Some(data) = self.data.get().cloned() else {
            return Response::Error(ErrorReply::new(ErrorCode::Internal, "the loaders are not attached"));
        };
        // Refuse what the cache would refuse before the origin sees it.
        let sized = match &write {
            Write::Set(value, _) => data.check_sizes(&key, value),
            Write::Delete => data.check_sizes(&key, b""),
        };
        if let Err(err) = sized {
            return crate::store::commands::shard_error(&err);
        }
        let stripe = (cachet_proto::key_hash(&key) % WRITE_STRIPES as u64) as usize;
        let serial = self.write_locks[stripe].clone().lock_owned().await;
        match self.namespaces[index].config.write {
            WriteMode::Through => self.write_through(&data, index, key, write, serial).await,
            WriteMode::Behind => self.write_behind(&data, index, key, write),
            WriteMode::None => Response::Error(ErrorReply::new(ErrorCode::Internal, "not a write namespace")),
        }
    }

    async fn write_through(
        &self,
        data: &Store,
        index: usize,
        key: Bytes,
        write: Write,
        serial: OwnedMutexGuard<()>,
    ) -> Response {
        let deadline = Duration::from_millis(self.namespaces[index].config.load_timeout_ms);
        match self.store(index, key.clone(), write.value(), deadline, serial).await {
            Ok(_serial) => {
                self.counters.writes_through.fetch_add(1, Ordering::Relaxed);
                let reply = self.install_write(data, index, &key, write, None);
                if matches!(reply, Response::Error(_)) {
                    self.counters.write_failures.fetch_add(1, Ordering::Relaxed);
                }
                reply
            }
            Err(failure) => {
                // The origin may or may not have the write (a timeout, a
                // trap after the query): drop the cached value so the next
                // read loads whatever the origin has.
                self.counters.write_failures.fetch_add(1, Ordering::Relaxed);
                self.install_write(data, index, &key, Write::Delete, None);
                Response::Error(failure_reply(&failure))
            }
        }
    }

    fn write_behind(&self, data: &Store, index: usize, key: Bytes, write: Write) -> Response {
        let Some(queue) = self.queues[index].as_ref() else {
            return Response::Error(ErrorReply::new(ErrorCode::Internal, "no write-behind queue"));
        };
        let value = write.value();
        // The queue lock is held across the install so the queue's order
        // is the cache's order for every key.
        let mut items = lock(&queue.items);
        if items.len() >= queue.capacity {
            drop(items);
            self.counters.writes_refused.fetch_add(1, Ordering::Relaxed);
            let prefix = &self.namespaces[index].config.prefix;
            let message =
                format!("the write-behind queue of `{prefix}` is full ({} writes); retry later", queue.capacity);
            return Response::Error(ErrorReply::new(ErrorCode::Busy, message));
        }
        let reply = self.install_write(data, index, &key, write, Some(queue));
        if matches!(reply, Response::Error(_)) {
            return reply;
        }
        items.push_back(Queued { key, value, at: Instant::now() });
        drop(items);
        self.counters.writes_behind_queued.fetch_add(1, Ordering::Relaxed);
        queue.wake.notify_one();
        reply
    }

    /// Puts a written value in the cache (or removes a deleted one),
    /// breaking the lease of a load in flight first, under the lock loads
    /// install under. For write-behind, `queued` records the write as
    /// pending under that same lock, so no load completing afterwards
    /// installs the origin's older value.
    fn install_write(
        &self,
        data: &Store,
        index: usize,
        key: &Bytes,
        write: Write,
        queued: Option<&WriteQueue>,
    ) -> Response {
        let ns = &self.namespaces[index].config;
        let mut flights = lock(&self.flights);
        if let Some(flight) = flights.remove(key) {
            lock(&self.detached_senders).insert(flight.id, flight.result);
        }
        self.counters.invalidations.fetch_add(1, Ordering::Relaxed);
        lock(&self.negative).remove(key);
        let value = write.value();
        let reply = match write {
            Write::Set(value, ttl) => {
                // A client's TTL is the TTL; otherwise the namespace's, with
                // its grace window like a loaded value.
                let ttl = ttl.unwrap_or_else(|| ns.ttl_ms.saturating_add(ns.grace_ms));
                let options = SetOptions { ttl_ms: Some(ttl), hint: 0, keep_ttl: false };
                match data.with_shard(key, |shard, now| shard.set(now, key, value, options)) {
                    Ok(_) => Response::Ok,
                    Err(err) => Response::Error(ErrorReply::new(ErrorCode::TooLarge, err.to_string())),
                }
            }
            Write::Delete => Response::Count(u64::from(data.with_shard(key, |shard, now| shard.delete(now, key)))),
        };
        if let (Some(queue), false) = (queued, matches!(reply, Response::Error(_))) {
            let mut pending = lock(&queue.pending);
            let entry = pending.entry(key.clone()).or_insert((0, None));
            entry.0 += 1;
            entry.1 = value;
        }
        drop(flights);
        reply
    }

    /// A client SET (`Some`) or DEL (`None`) of `key` at a cluster's
    /// primary, which serializes it with every other update and load of the
    /// key: written to the origin at once (write-through) or queued
    /// (write-behind), never installed in this node's shards (the cluster
    /// writes the replicas with what this answers). The TTL to cache a
    /// written value with (the client's, else the namespace's with its
    /// grace window); `None` for a delete.
    pub fn store_for_cluster(
        self: &Arc<Self>,
        key: Bytes,
        value: Option<Bytes>,
        ttl_ms: Option<u64>,
    ) -> impl Future<Output = Result<Option<u64>, ErrorReply>> + use<> {
        let this = self.clone();
        async move {
            let Some(index) = this.namespace(&key) else {
                return Err(ErrorReply::new(ErrorCode::Internal, "not a write namespace"));
            };
            let ns = &this.namespaces[index].config;
            let ttl = value.as_ref().map(|_| ttl_ms.unwrap_or_else(|| ns.ttl_ms.saturating_add(ns.grace_ms)));
            match ns.write {
                WriteMode::Through => {
                    let deadline = Duration::from_millis(ns.load_timeout_ms);
                    let stripe = (cachet_proto::key_hash(&key) % WRITE_STRIPES as u64) as usize;
                    let serial = this.write_locks[stripe].clone().lock_owned().await;
                    match this.store(index, key.clone(), value, deadline, serial).await {
                        Ok(_serial) => {
                            this.counters.writes_through.fetch_add(1, Ordering::Relaxed);
                            this.forget_loads(&key, None);
                            Ok(ttl)
                        }
                        Err(failure) => {
                            this.counters.write_failures.fetch_add(1, Ordering::Relaxed);
                            this.forget_loads(&key, None);
                            Err(failure_reply(&failure))
                        }
                    }
                }
                WriteMode::Behind => {
                    let Some(queue) = this.queues[index].as_ref() else {
                        return Err(ErrorReply::new(ErrorCode::Internal, "no write-behind queue"));
                    };
                    let mut items = lock(&queue.items);
                    if items.len() >= queue.capacity {
                        drop(items);
                        this.counters.writes_refused.fetch_add(1, Ordering::Relaxed);
                        let message = format!(
                            "the write-behind queue of `{}` is full ({} writes); retry later",
                            ns.prefix, queue.capacity
                        );
                        return Err(ErrorReply::new(ErrorCode::Busy, message));
                    }
                    this.forget_loads(&key, Some((queue, value.clone())));
                    items.push_back(Queued { key, value, at: Instant::now() });
                    drop(items);
                    this.counters.writes_behind_queued.fetch_add(1, Ordering::Relaxed);
                    queue.wake.notify_one();
                    Ok(ttl)
                }
                WriteMode::None => Err(ErrorReply::new(ErrorCode::Internal, "not a write namespace")),
            }
        }
    }

    /// A write of `key` happened: a load of it in flight loses its lease
    /// and its negative entry is dropped, under the lock loads install
    /// under; for write-behind, `queued` records the write as pending under
    /// that same lock, so loads answer it until the origin has it.
    fn forget_loads(&self, key: &Bytes, queued: Option<(&WriteQueue, Option<Bytes>)>) {
        let mut flights = lock(&self.flights);
        if let Some(flight) = flights.remove(key) {
            lock(&self.detached_senders).insert(flight.id, flight.result);
        }
        self.counters.invalidations.fetch_add(1, Ordering::Relaxed);
        lock(&self.negative).remove(key);
        if let Some((queue, value)) = queued {
            let mut pending = lock(&queue.pending);
            let entry = pending.entry(key.clone()).or_insert((0, None));
            entry.0 += 1;
            entry.1 = value;
        }
        drop(flights);
    }

    /// Runs the loader's `store` on a blocking thread within `deadline`.
    /// `serial` (the key's write lock) travels with the call and comes back
    /// on success; on a timeout it stays with the still-running call, so
    /// the key's next write waits for it to really end.
    async fn store(
        &self,
        index: usize,
        key: Bytes,
        value: Option<Bytes>,
        deadline: Duration,
        serial: OwnedMutexGuard<()>,
    ) -> Result<OwnedMutexGuard<()>, CallFailure> {
        let Some(handle) = self.handle() else { return Err(CallFailure::Trap("the loaders are stopping".into())) };
        let module = self.namespaces[index].module.clone();
        let running = self.running.clone();
        let started = Instant::now();
        let permit = match tokio::time::timeout(deadline, running.acquire_owned()).await {
            Ok(Ok(permit)) => permit,
            Ok(Err(_)) => return Err(CallFailure::Trap("the loaders are stopping".into())),
            Err(_) => return Err(CallFailure::Loader("no loader slot within the deadline".into())),
        };
        let left = deadline.saturating_sub(started.elapsed());
        let call = handle.spawn_blocking(move || {
            let result = module.store(left, &key, value.as_deref());
            drop(permit);
            result.map(|()| serial)
        });
        match tokio::time::timeout(deadline + Duration::from_secs(1), call).await {
            Ok(Ok(result)) => result,
            Ok(Err(err)) => Err(CallFailure::Trap(format!("the store call was lost: {err}"))),
            Err(_) => Err(CallFailure::Loader(format!("the store missed its {} ms deadline", deadline.as_millis()))),
        }
    }

    /// Writes waiting in every write-behind queue.
    pub fn write_queue_depth(&self) -> usize {
        self.queues.iter().flatten().map(|q| q.depth()).sum()
    }

    /// Enqueue-to-commit time of write-behind stores (all namespaces).
    pub fn write_lag(&self) -> crate::core::Histogram {
        let mut all = crate::core::Histogram::default();
        for queue in self.queues.iter().flatten() {
            all.merge(&queue.lag.snapshot());
        }
        all
    }

    /// Starts the write-behind worker of namespace `index`.
    pub(super) fn start_writer(self: &Arc<Self>, index: usize) {
        let (Some(handle), Some(queue)) = (self.handle(), self.queues[index].clone()) else { return };
        let weak = Arc::downgrade(self);
        let predecessor = self.predecessor.get().cloned();
        handle.spawn(async move {
            // Loaders that replaced others store nothing before the old
            // ones' queues are empty: a key's writes reach the origin in
            // the order they were answered.
            while let Some(old) = predecessor.as_ref().and_then(std::sync::Weak::upgrade) {
                if old.queued_in_chain() == 0 {
                    break;
                }
                drop(old);
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            loop {
                let next = lock(&queue.items).front().map(|q| (q.key.clone(), q.value.clone(), q.at));
                let Some((key, value, at)) = next else {
                    // Wake on a new write, or now and then to notice the
                    // loaders going away.
                    let _ = tokio::time::timeout(Duration::from_secs(1), queue.wake.notified()).await;
                    if weak.strong_count() == 0 {
                        return;
                    }
                    continue;
                };
                let Some(loaders) = weak.upgrade() else { return };
                let stored = loaders.store_queued(index, &key, &value).await;
                if stored {
                    loaders.counters.writes_behind_stored.fetch_add(1, Ordering::Relaxed);
                    queue.lag.record(at.elapsed().as_nanos() as u64);
                } else {
                    loaders.counters.write_failures.fetch_add(1, Ordering::Relaxed);
                    tracing::error!(key = %key.escape_ascii(), "write-behind gave up on a write; the origin misses it");
                }
                lock(&queue.items).pop_front();
                queue.done(&key);
                // The cache must not keep what the origin never got: on a
                // cluster, deleted on every replica.
                if !stored {
                    match loaders.replicated.get() {
                        Some(invalidate) => invalidate(key.clone()),
                        None => {
                            if let Some(data) = loaders.data.get() {
                                loaders.install_write(data, index, &key, Write::Delete, None);
                            }
                        }
                    }
                }
            }
        });
    }

    /// Stores one queued write, retrying with back-off; true once the
    /// origin took it. The key's write lock is taken for each attempt and
    /// held until the attempt really ends.
    async fn store_queued(&self, index: usize, key: &Bytes, value: &Option<Bytes>) -> bool {
        let ns = &self.namespaces[index].config;
        let deadline = Duration::from_millis(ns.load_timeout_ms);
        let stripe = (cachet_proto::key_hash(key) % WRITE_STRIPES as u64) as usize;
        let mut backoff = Duration::from_millis(50);
        for attempt in 1..=ns.write_attempts {
            let serial = self.write_locks[stripe].clone().lock_owned().await;
            match self.store(index, key.clone(), value.clone(), deadline, serial).await {
                Ok(_) => return true,
                Err(failure) => {
                    tracing::warn!(key = %key.escape_ascii(), attempt, %failure, "write-behind store failed");
                    if attempt < ns.write_attempts {
                        tokio::time::sleep(backoff).await;
                        backoff = (backoff * 2).min(Duration::from_secs(5));
                    }
                }
            }
        }
        false
    }
}
