//! One long-lived stream carrying pipelined requests. A writer task sends
//! every queued request in one write; a reader task matches replies to
//! waiting callers by id.

use crate::ClientError;
use bytes::BytesMut;
use cachet_proto::{Decoded, Response};
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use tokio::io::AsyncReadExt;
use tokio::sync::{mpsc, oneshot};

/// Largest reply frame a client accepts (the node never sends more).
const MAX_REPLY: usize = cachet_proto::MAX_REPLY_LEN + (1 << 20);

/// Where a caller waits for its reply.
type Reply = oneshot::Sender<Result<Response, ClientError>>;
/// A request waiting to be written: its id, its frame, its caller.
type Queued = (u64, BytesMut, Reply);
type Pending = Arc<Mutex<HashMap<u64, Reply>>>;

pub(crate) struct Lane {
    queue: mpsc::Sender<Queued>,
    open: Arc<AtomicBool>,
}

impl Lane {
    pub(crate) fn start(send: quinn::SendStream, recv: quinn::RecvStream) -> Self {
        let (queue, requests) = mpsc::channel(1024);
        let pending: Pending = Arc::default();
        let open = Arc::new(AtomicBool::new(true));
        tokio::spawn(write_loop(send, requests, pending.clone(), open.clone()));
        tokio::spawn(read_loop(recv, pending, open.clone()));
        Self { queue, open }
    }

    pub(crate) fn is_open(&self) -> bool {
        self.open.load(Ordering::Relaxed)
    }

    pub(crate) async fn call(&self, id: u64, frame: BytesMut) -> Result<Response, ClientError> {
        let (tx, rx) = oneshot::channel();
        self.queue.send((id, frame, tx)).await.map_err(|_| ClientError::Connection("stream closed".into()))?;
        rx.await.map_err(|_| ClientError::Connection("stream closed".into()))?
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

async fn write_loop(
    mut send: quinn::SendStream,
    mut requests: mpsc::Receiver<Queued>,
    pending: Pending,
    open: Arc<AtomicBool>,
) {
    let mut out = BytesMut::new();
    while let Some(first) = requests.recv().await {
        let mut next = Some(first);
        while let Some((id, frame, tx)) = next {
            if !open.load(Ordering::Relaxed) {
                let _ = tx.send(Err(ClientError::Connection("stream closed".into())));
                next = requests.try_recv().ok();
                continue;
            }
            if let Ok(mut map) = pending.lock() {
                map.insert(id, tx);
            }
            out.extend_from_slice(&frame);
            next = requests.try_recv().ok();
        }
        if let Err(err) = send.write_all(&out).await {
            open.store(false, Ordering::Relaxed);
            fail_all(&pending, &err.to_string());
            return;
        }
        out.clear();
    }
    let _ = send.finish();
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
/// so they never queue behind or ahead of small requests).
pub(crate) async fn one_shot(connection: &quinn::Connection, frame: BytesMut) -> Result<Response, ClientError> {
    let lost = |e: &dyn std::fmt::Display| ClientError::Connection(e.to_string());
    let (mut send, mut recv) = connection.open_bi().await.map_err(|e| lost(&e))?;
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
