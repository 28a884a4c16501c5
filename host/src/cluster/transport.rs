//! The node-to-node transport: QUIC with ALPN `cachet-peer/1` and mutual
//! TLS. Both ends present a certificate from the cluster's CA (for local
//! clusters, the shared development CA of `--dev-ca DIR`) and accept only
//! peers whose certificate that CA signed; clients' `cachet/1` port is
//! separate.
//!
//! Frames (gossip datagrams and replica messages, MessagePack) ride
//! unidirectional streams, a batch of whatever was queued per stream, so a
//! backlog drains in a few streams rather than one per message.
//! Frames are bounded before they are read; a peer that sends garbage is
//! disconnected and logged, and the node goes on.

use super::replica::Message;
use crate::server::tls::{self, TlsError, TlsSource};
use bytes::Bytes;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use tokio::sync::{Mutex, mpsc};

/// The peer protocol's ALPN.
pub const PEER_ALPN: &[u8] = b"cachet-peer/1";
/// The largest frame a peer may send (a sync batch included).
pub const MAX_PEER_FRAME: usize = 64 << 20;
/// The name peers check each other's certificates against.
const PEER_NAME: &str = "localhost";

/// What peers send each other.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum PeerFrame {
    /// A membership (SWIM) datagram.
    Gossip(Bytes),
    /// A replication message.
    Replica(Message),
}

/// A frame from a peer.
#[derive(Debug)]
pub struct Incoming {
    /// The peer's address.
    pub from: SocketAddr,
    /// What it sent.
    pub frame: PeerFrame,
}

/// Why the transport failed.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    /// Certificates could not be set up.
    #[error(transparent)]
    Tls(#[from] TlsError),
    /// The socket could not be bound.
    #[error("cannot bind the peer port {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
    /// No connection to the peer (unreachable, or it refused our
    /// certificate, or we refused its).
    #[error("cannot reach peer {addr}: {detail}")]
    Connect {
        /// The peer.
        addr: SocketAddr,
        /// What went wrong.
        detail: String,
    },
    /// The frame could not be sent or encoded.
    #[error("sending to {addr}: {detail}")]
    Send {
        /// The peer.
        addr: SocketAddr,
        /// What went wrong.
        detail: String,
    },
}

/// One node's peer endpoint.
pub struct PeerTransport {
    endpoint: quinn::Endpoint,
    client: quinn::ClientConfig,
    connections: Mutex<HashMap<SocketAddr, quinn::Connection>>,
}

impl PeerTransport {
    /// Binds `addr` with the node certificate of `data_dir`, signed by (and
    /// trusting only) the CA in `ca_dir`. Frames from peers arrive on the
    /// returned channel. Call inside a tokio runtime.
    pub fn bind(
        addr: SocketAddr,
        ca_dir: &Path,
        data_dir: &Path,
    ) -> Result<(Arc<Self>, mpsc::Receiver<Incoming>), TransportError> {
        tls::ensure_node_cert(ca_dir, data_dir)?;
        let (cert, key) = tls::node_cert_files(data_dir);
        let ca = ca_dir.join(tls::CA_CERT);
        let mut server = tls::server_config(
            &TlsSource::Files { cert: cert.clone(), key: key.clone(), client_ca: Some(ca.clone()) },
            PEER_ALPN,
        )?;
        let mut client = tls::peer_client_config(&ca, &cert, &key, PEER_ALPN)?;
        // A peer killed outright sends no close: without keep-alives and a
        // short idle timeout its connection would look open (and swallow
        // frames) for quinn's default 30 s. Both sides use the same timing.
        let timing = Arc::new(peer_timing());
        server.transport_config(timing.clone());
        client.transport_config(timing);
        let endpoint = quinn::Endpoint::server(server, addr).map_err(|source| TransportError::Bind { addr, source })?;
        let (tx, rx) = mpsc::channel(4096);
        let transport = Arc::new(Self { endpoint: endpoint.clone(), client, connections: Mutex::default() });
        tokio::spawn(accept(endpoint, tx));
        Ok((transport, rx))
    }

    /// Where it listens.
    pub fn local_addr(&self) -> Option<SocketAddr> {
        self.endpoint.local_addr().ok()
    }

    /// A new connection to `to`, not shared: for a sender that keeps its
    /// own (so a peer that is slow to answer holds up no other).
    pub async fn dial(&self, to: SocketAddr) -> Result<quinn::Connection, TransportError> {
        let failed = |detail: String| TransportError::Connect { addr: to, detail };
        let connecting =
            self.endpoint.connect_with(self.client.clone(), to, PEER_NAME).map_err(|e| failed(e.to_string()))?;
        connecting.await.map_err(|e| failed(e.to_string()))
    }

    /// Appends `frame`, encoded, to a batch for [`PeerTransport::send_on`].
    pub fn encode(frame: &PeerFrame, batch: &mut Vec<u8>) -> Result<(), TransportError> {
        rmp_serde::encode::write(batch, frame)
            .map_err(|e| TransportError::Send { addr: SocketAddr::from(([0, 0, 0, 0], 0)), detail: e.to_string() })
    }

    /// Sends a batch of encoded frames (at most [`MAX_PEER_FRAME`] bytes)
    /// over `connection` (from [`PeerTransport::dial`]) on one stream.
    pub async fn send_on(connection: &quinn::Connection, batch: &[u8]) -> Result<(), TransportError> {
        let to = connection.remote_address();
        let failed = |detail: String| TransportError::Send { addr: to, detail };
        let mut stream = connection.open_uni().await.map_err(|e| failed(e.to_string()))?;
        stream.write_all(batch).await.map_err(|e| failed(e.to_string()))?;
        stream.finish().map_err(|e| failed(e.to_string()))?;
        Ok(())
    }

    async fn connection(&self, to: SocketAddr) -> Result<quinn::Connection, TransportError> {
        let mut connections = self.connections.lock().await;
        if let Some(connection) = connections.get(&to)
            && connection.close_reason().is_none()
        {
            return Ok(connection.clone());
        }
        let failed = |detail: String| TransportError::Connect { addr: to, detail };
        let connecting =
            self.endpoint.connect_with(self.client.clone(), to, PEER_NAME).map_err(|e| failed(e.to_string()))?;
        let connection = connecting.await.map_err(|e| failed(e.to_string()))?;
        connections.insert(to, connection.clone());
        Ok(connection)
    }

    /// Sends `frame` to the peer at `to`, connecting first if needed.
    pub async fn send(&self, to: SocketAddr, frame: &PeerFrame) -> Result<(), TransportError> {
        let mut bytes = Vec::new();
        Self::encode(frame, &mut bytes)?;
        let connection = self.connection(to).await?;
        Self::send_on(&connection, &bytes).await
    }

    /// Sends `frame` to `to` on a stream of its own and waits until the peer
    /// has acknowledged all of it: for a last word, which must not be lost
    /// when the process exits right after.
    pub async fn send_acknowledged(&self, to: SocketAddr, frame: &PeerFrame) -> Result<(), TransportError> {
        let failed = |detail: String| TransportError::Send { addr: to, detail };
        let mut bytes = Vec::new();
        Self::encode(frame, &mut bytes)?;
        let connection = self.connection(to).await?;
        let mut stream = connection.open_uni().await.map_err(|e| failed(e.to_string()))?;
        stream.write_all(&bytes).await.map_err(|e| failed(e.to_string()))?;
        stream.finish().map_err(|e| failed(e.to_string()))?;
        match stream.stopped().await {
            Ok(None) => Ok(()),
            Ok(Some(code)) => Err(failed(format!("stopped by the peer ({code})"))),
            Err(err) => Err(failed(err.to_string())),
        }
    }

    /// Closes every connection and the endpoint.
    pub fn close(&self) {
        self.endpoint.close(0u32.into(), b"bye");
    }

    /// [`Self::close`], then waits (at most `limit`) until the peers have
    /// been told, so they drop their connections now rather than at their
    /// idle timeout.
    pub async fn close_and_wait(&self, limit: std::time::Duration) {
        self.close();
        let _ = tokio::time::timeout(limit, self.endpoint.wait_idle()).await;
    }
}

/// A stream's frames: MessagePack values back to back. All or nothing: one
/// bad frame refuses the batch.
pub(crate) fn decode_batch(mut bytes: &[u8]) -> Result<Vec<PeerFrame>, String> {
    let mut frames = Vec::new();
    while !bytes.is_empty() {
        // Nesting is limited as for client frames: a small hostile batch
        // must not recurse deep enough to overflow the thread's stack.
        let mut deserializer = rmp_serde::Deserializer::new(&mut bytes);
        deserializer.set_max_depth(cachet_proto::MAX_DEPTH);
        frames.push(PeerFrame::deserialize(&mut deserializer).map_err(|e| e.to_string())?);
    }
    if frames.is_empty() {
        return Err("an empty stream".into());
    }
    Ok(frames)
}

/// Keep-alives every 250 ms and a 1.5 s idle timeout: a dead peer's
/// connection closes well within the failure detector's 2 s, so frames stop
/// going into the void and the next send reconnects.
fn peer_timing() -> quinn::TransportConfig {
    let mut timing = quinn::TransportConfig::default();
    timing.keep_alive_interval(Some(std::time::Duration::from_millis(250)));
    timing.max_idle_timeout(Some(quinn::IdleTimeout::from(quinn::VarInt::from_u32(1_500))));
    timing.max_concurrent_uni_streams(1024u32.into());
    // quinn's default initial RTT (333 ms) makes a lost first packet (a
    // peer not listening yet) cost about a second; peers sit on one
    // network, so start from a LAN's RTT.
    timing.initial_rtt(std::time::Duration::from_millis(20));
    timing
}

async fn accept(endpoint: quinn::Endpoint, tx: mpsc::Sender<Incoming>) {
    while let Some(incoming) = endpoint.accept().await {
        let tx = tx.clone();
        tokio::spawn(async move {
            let connection = match incoming.await {
                Ok(connection) => connection,
                Err(err) => {
                    tracing::warn!(%err, "a peer connection failed its handshake");
                    return;
                }
            };
            let from = connection.remote_address();
            while let Ok(mut stream) = connection.accept_uni().await {
                let frames = match stream.read_to_end(MAX_PEER_FRAME).await {
                    Ok(bytes) => decode_batch(&bytes),
                    Err(err) => Err(err.to_string()),
                };
                match frames {
                    Ok(frames) => {
                        for frame in frames {
                            if tx.send(Incoming { from, frame }).await.is_err() {
                                return;
                            }
                        }
                    }
                    Err(err) => {
                        tracing::warn!(%from, %err, "a peer sent an unreadable frame; disconnecting it");
                        connection.close(1u32.into(), b"bad frame");
                        return;
                    }
                }
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cluster::replica::Record;
    use crate::cluster::version::Version;
    use std::time::Duration;

    fn temp(tag: &str) -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!("cachet-peer-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        dir
    }

    #[tokio::test]
    async fn peers_of_one_ca_talk_and_strangers_are_refused() {
        let (ca, other_ca) = (temp("ca"), temp("other-ca"));
        let any = "127.0.0.1:0".parse().expect("addr");
        let (a, _a_in) = PeerTransport::bind(any, &ca, &temp("a")).expect("a");
        let (b, mut b_in) = PeerTransport::bind(any, &ca, &temp("b")).expect("b");
        let (stranger, _s_in) = PeerTransport::bind(any, &other_ca, &temp("stranger")).expect("stranger");
        let b_addr = b.local_addr().expect("b addr");

        let put = PeerFrame::Replica(Message::Put {
            req: 7,
            key: Bytes::from_static(b"k"),
            record: Record {
                version: Version { counter: 3, node: 1 },
                value: Some(Bytes::from_static(b"v")),
                expires_at: None,
            },
            hint_for: None,
        });
        a.send(b_addr, &put).await.expect("a reaches b");
        a.send(b_addr, &PeerFrame::Gossip(Bytes::from_static(b"swim"))).await.expect("again, same connection");
        let first = tokio::time::timeout(Duration::from_secs(5), b_in.recv()).await.expect("in time").expect("frame");
        assert_eq!(first.frame, put);
        assert_eq!(first.from.port(), a.local_addr().expect("a addr").port());
        let second = tokio::time::timeout(Duration::from_secs(5), b_in.recv()).await.expect("in time").expect("frame");
        assert_eq!(second.frame, PeerFrame::Gossip(Bytes::from_static(b"swim")));

        // Garbage on a stream: that connection is closed, nothing is
        // delivered, and the peer reconnects and is heard again.
        let connection = a.connection(b_addr).await.expect("connection");
        let mut stream = connection.open_uni().await.expect("stream");
        stream.write_all(b"\xc1 not messagepack").await.expect("write");
        stream.finish().expect("finish");
        let closed = tokio::time::timeout(Duration::from_secs(5), connection.closed()).await;
        assert!(closed.is_ok(), "b kept a connection that sent garbage");
        a.send(b_addr, &put).await.expect("a reconnects");
        let again = tokio::time::timeout(Duration::from_secs(5), b_in.recv()).await.expect("in time").expect("frame");
        assert_eq!(again.frame, put);

        // A node of another CA cannot connect (b refuses its certificate,
        // and it refuses b's), and nothing reaches b.
        let refused = stranger.send(b_addr, &put).await;
        assert!(refused.is_err(), "a stranger got through");
        let nothing = tokio::time::timeout(Duration::from_millis(300), b_in.recv()).await;
        assert!(nothing.is_err(), "b received a stranger's frame");
        for t in [a, b, stranger] {
            t.close();
        }
        for dir in ["ca", "other-ca", "a", "b", "stranger"] {
            let _ = std::fs::remove_dir_all(temp(dir));
        }
    }
}
