//! Each peer's sender task: the frames queued for one peer, batched
//! into streams over a connection of its own, and dropped while the peer
//! cannot be reached.

use crate::cluster::replica::NodeIx;
use crate::cluster::transport::{PeerFrame, PeerTransport};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;

/// After a failed connection attempt, frames to that peer are dropped
/// without trying for this long.
const REDIAL_AFTER: Duration = Duration::from_millis(200);
/// A connection attempt gives up after this long.
const DIAL_TIMEOUT: Duration = Duration::from_millis(1_000);

/// Bytes batched into one stream.
const BATCH_BYTES: usize = 4 << 20;

/// Sends one peer's frames in order over a connection of its own, each
/// stream carrying what was queued, reconnecting after failures. While the
/// peer is unreachable its frames are dropped, backlog included: they are
/// stale by the time it is back, and the protocol re-sends what matters.
/// When `expected` names the member at `to`, a peer answering there with
/// a certificate for another node is refused at the handshake (and its
/// frames dropped like an unreachable peer's).
pub(super) async fn send_loop(
    transport: Arc<PeerTransport>,
    to: SocketAddr,
    expected: Option<NodeIx>,
    mut frames: mpsc::Receiver<PeerFrame>,
) {
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
            let dialed = match tokio::time::timeout(DIAL_TIMEOUT, transport.dial(to, expected)).await {
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
