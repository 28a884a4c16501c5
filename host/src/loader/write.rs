//! Write-through and write-behind: client SETs and DELs of a namespace that
//! writes go to the origin through the loader's `store`.
//!
//! Writes to one key are serialized (a lock stripe per key hash), so the
//! origin and the cache see them in the same order. Installing a written
//! value breaks the lease of any load in flight for the key, under the lock
//! loads install under: a load that read the row before the write can never
//! overwrite the written value.
//!
//! Write-behind answers once the cache holds the value and the write is
//! queued. One worker per namespace stores the queue in order, retrying
//! with back-off; the queue is bounded, and a write that finds it full is
//! refused (nothing changes). What is queued when the node dies is lost:
//! the window is the queue's depth over the origin's store rate, and
//! `write_lag` (enqueue to commit) measures it.

use super::config::WriteMode;
use super::guest::CallFailure;
use super::{Loaders, lock};
use crate::core::{SetOptions, SharedHistogram};
use crate::node::Node;
use bytes::Bytes;
use cachet_proto::{ErrorCode, ErrorReply, Response};
use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};
use tokio::sync::Notify;

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
    wake: Notify,
    capacity: usize,
    /// Time from enqueue to the origin's acknowledgement.
    pub(super) lag: SharedHistogram,
}

impl WriteQueue {
    pub(super) fn new(capacity: usize) -> Self {
        Self { items: Mutex::default(), wake: Notify::new(), capacity, lag: SharedHistogram::default() }
    }

    /// Writes waiting.
    pub(super) fn depth(&self) -> usize {
        lock(&self.items).len()
    }
}

/// What a client write asks for.
pub enum Write {
    /// SET with an optional TTL in milliseconds.
    Set(Bytes, Option<u64>),
    /// DEL.
    Delete,
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

    /// Runs a client SET or DEL of `key`, which [`Loaders::write_mode`]
    /// says writes to its origin.
    pub async fn write(self: &Arc<Self>, key: Bytes, write: Write) -> Response {
        let Some(index) = self.namespace(&key) else {
            return Response::Error(ErrorReply::new(ErrorCode::Internal, "not a write namespace"));
        };
        let Some(node) = lock(&self.node).upgrade() else {
            return Response::Error(ErrorReply::new(ErrorCode::Internal, "the node is stopping"));
        };
        if let Write::Set(value, _) = &write
            && value.len() > node.config().max_value_size
        {
            let limit = node.config().max_value_size;
            let message = format!("value of {} bytes exceeds the limit of {limit}", value.len());
            return Response::Error(ErrorReply::new(ErrorCode::TooLarge, message));
        }
        let stripe = (cachet_proto::key_hash(&key) % WRITE_STRIPES as u64) as usize;
        let _serial = self.write_locks[stripe].lock().await;
        match self.namespaces[index].config.write {
            WriteMode::Through => self.write_through(&node, index, key, write).await,
            WriteMode::Behind => self.write_behind(&node, index, key, write),
            WriteMode::None => Response::Error(ErrorReply::new(ErrorCode::Internal, "not a write namespace")),
        }
    }

    async fn write_through(&self, node: &Node, index: usize, key: Bytes, write: Write) -> Response {
        let value = match &write {
            Write::Set(value, _) => Some(value.clone()),
            Write::Delete => None,
        };
        let deadline = Duration::from_millis(self.namespaces[index].config.load_timeout_ms);
        match self.store(index, key.clone(), value, deadline).await {
            Ok(()) => {
                self.counters.writes_through.fetch_add(1, Ordering::Relaxed);
                self.install_write(node, index, &key, write)
            }
            Err(failure) => {
                self.counters.write_failures.fetch_add(1, Ordering::Relaxed);
                Response::Error(failure_reply(&failure))
            }
        }
    }

    fn write_behind(&self, node: &Node, index: usize, key: Bytes, write: Write) -> Response {
        let Some(queue) = self.queues[index].as_ref() else {
            return Response::Error(ErrorReply::new(ErrorCode::Internal, "no write-behind queue"));
        };
        let value = match &write {
            Write::Set(value, _) => Some(value.clone()),
            Write::Delete => None,
        };
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
        let reply = self.install_write(node, index, &key, write);
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
    /// install under.
    fn install_write(&self, node: &Node, index: usize, key: &Bytes, write: Write) -> Response {
        let ns = &self.namespaces[index].config;
        let mut flights = lock(&self.flights);
        if let Some(flight) = flights.remove(key) {
            lock(&self.detached_senders).insert(flight.id, flight.result);
        }
        lock(&self.negative).remove(key);
        let reply = match write {
            Write::Set(value, ttl) => {
                let ttl = ttl.unwrap_or(ns.ttl_ms).saturating_add(ns.grace_ms);
                let options = SetOptions { ttl_ms: Some(ttl), hint: 0, keep_ttl: false };
                match node.with_shard_raw(key, |shard, now| shard.set(now, key, value, options)) {
                    Ok(_) => Response::Ok,
                    Err(err) => Response::Error(ErrorReply::new(ErrorCode::TooLarge, err.to_string())),
                }
            }
            Write::Delete => Response::Count(u64::from(node.with_shard_raw(key, |shard, now| shard.delete(now, key)))),
        };
        drop(flights);
        reply
    }

    /// Runs the loader's `store` on a blocking thread, within `deadline`.
    async fn store(
        &self,
        index: usize,
        key: Bytes,
        value: Option<Bytes>,
        deadline: Duration,
    ) -> Result<(), CallFailure> {
        let Some(handle) = self.handle() else { return Err(CallFailure::Trap("the loaders are stopping".into())) };
        let module = self.namespaces[index].module.clone();
        let call = handle.spawn_blocking(move || module.store(&key, value.as_deref()));
        match tokio::time::timeout(deadline, call).await {
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
        handle.spawn(async move {
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
                let ns = &loaders.namespaces[index].config;
                let deadline = Duration::from_millis(ns.load_timeout_ms);
                let mut backoff = Duration::from_millis(50);
                let mut stored = false;
                for attempt in 1..=ns.write_attempts {
                    match loaders.store(index, key.clone(), value.clone(), deadline).await {
                        Ok(()) => {
                            stored = true;
                            break;
                        }
                        Err(failure) => {
                            tracing::warn!(key = %String::from_utf8_lossy(&key), attempt, %failure, "write-behind store failed");
                            if attempt < ns.write_attempts {
                                tokio::time::sleep(backoff).await;
                                backoff = (backoff * 2).min(Duration::from_secs(5));
                            }
                        }
                    }
                }
                if stored {
                    loaders.counters.writes_behind_stored.fetch_add(1, Ordering::Relaxed);
                    queue.lag.record(at.elapsed().as_nanos() as u64);
                } else {
                    loaders.counters.write_failures.fetch_add(1, Ordering::Relaxed);
                    tracing::error!(key = %String::from_utf8_lossy(&key), "write-behind gave up on a write; the origin misses it");
                }
                lock(&queue.items).pop_front();
            }
        });
    }
}
