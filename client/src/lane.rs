//! One long-lived stream carrying pipelined requests. Callers write their
//! frames straight to the stream, one at a time (the connection packs what
//! several wrote before it next sends), and a task finishes any write the
//! node's flow control holds up; a reader task matches replies to waiting
//! callers by id.

use crate::ClientError;
use bytes::BytesMut;
use cachet_proto::{Decoded, Response};
use std::collections::HashMap;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::Poll;
use tokio::io::AsyncReadExt;
use tokio::sync::oneshot;

/// Largest reply frame a client accepts (the node never sends more).
const MAX_REPLY: usize = cachet_proto::MAX_REPLY_LEN + (1 << 20);

/// Where a caller waits for its reply.
type Reply = oneshot::Sender<Result<Response, ClientError>>;
type Pending = Arc<Mutex<HashMap<u64, Reply>>>;

pub(crate) struct Lane {
    send: Arc<tokio::sync::Mutex<quinn::SendStream>>,
    pending: Pending,
    open: Arc<AtomicBool>,
}

impl Lane {
    pub(crate) fn start(send: quinn::SendStream, recv: quinn::RecvStream) -> Self {
        let pending: Pending = Arc::default();
        let open = Arc::new(AtomicBool::new(true));
        tokio::spawn(read_loop(recv, pending.clone(), open.clone()));
        Self { send: Arc::new(tokio::sync::Mutex::new(send)), pending, open }
    }

    pub(crate) fn is_open(&self) -> bool {
        self.open.load(Ordering::Relaxed)
    }

    /// Sends `frame` and waits for the reply with `id`. `sent` is set once
    /// any of the frame may have left: before that, a failure means the
    /// node surely never saw the request.
    pub(crate) async fn call(&self, id: u64, frame: BytesMut, sent: &AtomicBool) -> Result<Response, ClientError> {
        let closed = || ClientError::Connection("stream closed".into());
        let (tx, rx) = oneshot::channel();
        // Frames go out whole and in order: one writer at a time.
        let mut send = self.send.clone().lock_owned().await;
        // Waiting before the frame leaves, so no reply can beat it; the
        // lane is checked after, so a close that emptied the waiting list
        // just before is seen.
        if let Ok(mut map) = self.pending.lock() {
            map.insert(id, tx);
        }
        if !self.is_open() {
            if let Ok(mut map) = self.pending.lock() {
                map.remove(&id);
            }
            return Err(closed());
        }
        // Usually the whole frame fits at once. When it does not (the node
        // is pushing back), a task finishes the write: a caller giving up
        // (its timeout) must never leave half a frame on the stream.
        sent.store(true, Ordering::Release);
        let written = std::future::poll_fn(|cx| Poll::Ready(Pin::new(&mut *send).poll_write(cx, &frame))).await;
        let rest = match written {
            Poll::Ready(Ok(n)) if n == frame.len() => None,
            Poll::Ready(Ok(n)) => Some(frame.freeze().slice(n..)),
            Poll::Pending => Some(frame.freeze()),
            Poll::Ready(Err(err)) => {
                self.open.store(false, Ordering::Relaxed);
                fail_all(&self.pending, &err.to_string());
                None
            }
        };
        if let Some(rest) = rest {
            let (pending, open) = (self.pending.clone(), self.open.clone());
            tokio::spawn(async move {
                if let Err(err) = send.write_all(&rest).await {
                    open.store(false, Ordering::Relaxed);
                    fail_all(&pending, &err.to_string());
                }
            });
        } else {
            drop(send);
        }
        rx.await.map_err(|_| closed())?
    }
}

impl Drop for Lane {
    fn drop(&mut self) {
        // The node sees the stream end once the lane is gone (a write still
        // finishing holds the lock and ends it when the connection goes).
        if let Ok(mut send) = self.send.try_lock() {
            let _ = send.finish();
        }
    }
}

fn fail_all(pending: &Pending, why: &str) {
    let waiting: Vec<_> = match pending.lock() {
        Ok(mut map) => map.drain().collect(),
        Err(poisoned) => poisoned.into_inner().drain().collect(),
    };
    for (_, tx) in waiting {
        let _ = tx.send(Err(ClientError::Connection(why.to_string())));
    }
}

async fn read_loop(mut recv: quinn::RecvStream, pending: Pending, open: Arc<AtomicBool>) {
    let mut input = BytesMut::with_capacity(16 << 10);
    let why = loop {
        input.reserve(16 << 10);
        match recv.read_buf(&mut input).await {
            Ok(0) => break "the node closed the stream".to_string(),
            Ok(_) => {}
            Err(err) => break err.to_string(),
        }
        loop {
            match cachet_proto::decode::<Response>(&mut input, MAX_REPLY) {
                Ok(Decoded::Frame(envelope)) => {
                    let waiter = pending.lock().ok().and_then(|mut map| map.remove(&envelope.id));
                    match waiter {
                        Some(tx) => {
                            let _ = tx.send(Ok(envelope.body));
                        }
                        // A reply to a request that timed out, or an error
                        // about a frame the node could not read (id 0).
                        None => tracing::debug!(id = envelope.id, reply = ?envelope.body, "unclaimed reply"),
                    }
                }
                Ok(Decoded::Incomplete { .. }) => break,
                Err(err @ cachet_proto::FrameError::TooLarge { .. }) => {
                    open.store(false, Ordering::Relaxed);
                    fail_all(&pending, &err.to_string());
                    return;
                }
                Err(err) => {
                    // A reply this client cannot read: fail its caller now
                    // rather than at the timeout.
                    tracing::warn!(%err, "undecodable reply");
                    let id = match &err {
                        cachet_proto::FrameError::Malformed { id, .. } => *id,
                        cachet_proto::FrameError::UnknownCommand { id, .. }
                        | cachet_proto::FrameError::UnsupportedVersion { id, .. } => Some(*id),
                        _ => None,
                    };
                    let waiter = id.and_then(|id| pending.lock().ok().and_then(|mut map| map.remove(&id)));
                    if let Some(tx) = waiter {
                        let _ = tx.send(Err(ClientError::Protocol(err.to_string())));
                    }
                }
            }
        }
    };
    open.store(false, Ordering::Relaxed);
    fail_all(&pending, &why);
}

/// Sends one request on a fresh stream and reads its reply (for large values,
/// so they never queue behind or ahead of small requests). `sent` as for
/// [`Lane::call`].
pub(crate) async fn one_shot(
    connection: &quinn::Connection,
    frame: BytesMut,
    sent: &AtomicBool,
) -> Result<Response, ClientError> {
    let lost = |e: &dyn std::fmt::Display| ClientError::Connection(e.to_string());
    let (mut send, mut recv) = connection.open_bi().await.map_err(|e| lost(&e))?;
    sent.store(true, Ordering::Release);
    send.write_all(&frame).await.map_err(|e| lost(&e))?;
    send.finish().map_err(|e| lost(&e))?;
    let mut input = BytesMut::new();
    loop {
        input.reserve(64 << 10);
        let n = recv.read_buf(&mut input).await.map_err(|e| lost(&e))?;
        match cachet_proto::decode::<Response>(&mut input, MAX_REPLY) {
            Ok(Decoded::Frame(envelope)) => return Ok(envelope.body),
            Ok(Decoded::Incomplete { .. }) if n == 0 => return Err(lost(&"stream ended before the reply")),
            Ok(Decoded::Incomplete { .. }) => {}
            Err(err) => return Err(ClientError::Protocol(err.to_string())),
        }
    }
}
