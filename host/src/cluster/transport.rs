//! The node-to-node transport: QUIC with ALPN `cachet-peer/1` and mutual
//! TLS. Both ends present a certificate from the cluster's CA (the
//! operator's, with `--tls-cert/--tls-key/--tls-ca`; for local clusters, the
//! shared development CA of `--dev-ca DIR`) and accept only peers whose
//! certificate that CA signed and which names a node (a `cachet://node/ID`
//! URI, see [`tls::cert_node_id`]): a connection from a certificate naming
//! none is closed, and every frame arrives with the node its sender's
//! certificate names, for the runtime to hold against the id the frame
//! claims. A dialer that knows which member it is calling checks the
//! answering certificate names that one. Clients' `cachet/1` port is
//! separate.
//!
//! Frames (gossip datagrams and replica messages, MessagePack) ride
//! unidirectional streams, a batch of whatever was queued per stream, so a
//! backlog drains in a few streams rather than one per message.
//! Frames are bounded before they are read; a peer that sends garbage is
//! disconnected and logged, and the node goes on.

use super::meta::member::MetaFrame;
use super::replica::Message;
use crate::server::tls::{self, TlsError, TlsSource};
use bytes::Bytes;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use tokio::sync::{Mutex, mpsc};

/// The peer protocol's ALPN.
pub const PEER_ALPN: &[u8] = b"cachet-peer/1";
/// The largest frame a peer may send (a sync batch included).
pub const MAX_PEER_FRAME: usize = 64 << 20;

/// Where a node's peer certificate comes from, and which CA it trusts.
#[derive(Clone, Debug)]
pub enum PeerTls {
    /// The shared development CA of `--dev-ca DIR`: the node's certificate
    /// in its data directory, issued by it for the node's id (again when
    /// missing, from another CA or for another id).
    DevCa {
        /// The CA's directory.
        ca_dir: PathBuf,
    },
    /// The operator's files (`--tls-cert/--tls-key/--tls-ca`), as made by
    /// `cachet cert issue` or the operator's own PKI.
    Files {
        /// This node's certificate chain (PEM), naming its node id.
        cert: PathBuf,
        /// Its private key (PEM).
        key: PathBuf,
        /// The cluster's CA (PEM): the only one peers' certificates may
        /// come from.
        ca: PathBuf,
    },
}

/// What peers send each other.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum PeerFrame {
    /// A membership (SWIM) datagram.
    Gossip(Bytes),
    /// A replication message, with the slot-table epoch its sender made it
    /// under (see `replica`: epoch fencing).
    Replica {
        /// The sender's table epoch.
        epoch: u64,
        /// The message.
        message: Message,
    },
    /// A metadata log frame (Raft, founding, joining).
    Meta(MetaFrame),
}

/// A frame from a peer.
#[derive(Debug)]
pub struct Incoming {
    /// The peer's address.
    pub from: SocketAddr,
    /// The node the peer's certificate names: who it is, whatever the
    /// frame claims.
    pub node: u32,
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
    /// Binds `addr` as node `node_id`, with the certificate `source` names
    /// (issued into `data_dir` for a development CA), trusting only the
    /// cluster's CA. Frames from peers arrive on the returned channel. Call
    /// inside a tokio runtime.
    ///
    /// A certificate naming no node is refused: no peer would take it. One
    /// naming another node than `node_id` is logged as an error but used:
    /// the other members refuse this node's frames then, and it is they
    /// who must, since a node that lies about its id would not check.
    pub fn bind(
        addr: SocketAddr,
        source: &PeerTls,
        data_dir: &Path,
        node_id: u32,
    ) -> Result<(Arc<Self>, mpsc::Receiver<Incoming>), TransportError> {
        let (cert, key, ca) = match source {
            PeerTls::DevCa { ca_dir } => {
                tls::ensure_node_cert(ca_dir, data_dir, Some(node_id))?;
                let (cert, key) = tls::node_cert_files(data_dir);
                (cert, key, ca_dir.join(tls::CA_CERT))
            }
            PeerTls::Files { cert, key, ca } => (cert.clone(), key.clone(), ca.clone()),
        };
        let own = tls::load_certs(&cert)?;
        match own.first().map(tls::cert_node_id) {
            Some(Ok(id)) if id == node_id => {}
            Some(Ok(id)) => tracing::error!(
                certificate = %cert.display(),
                "this node's certificate names node {id}, but it runs as --node-id {node_id}: the other members \
                 will refuse its frames"
            ),
            Some(Err(err)) => {
                return Err(TlsError::Pem { path: cert, detail: format!("{err}; peers would refuse it") }.into());
            }
            None => return Err(TlsError::Pem { path: cert, detail: "no certificate in the file".into() }.into()),
        }
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
    /// own (so a peer that is slow to answer holds up no other). With
    /// `expected`, the peer's certificate must name that node.
    pub async fn dial(&self, to: SocketAddr, expected: Option<u32>) -> Result<quinn::Connection, TransportError> {
        let failed = |detail: String| TransportError::Connect { addr: to, detail };
        let name = tls::peer_server_name(expected);
        let connecting =
            self.endpoint.connect_with(self.client.clone(), to, &name).map_err(|e| failed(e.to_string()))?;
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
        let name = tls::peer_server_name(None);
        let connecting =
            self.endpoint.connect_with(self.client.clone(), to, &name).map_err(|e| failed(e.to_string()))?;
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

/// The node the certificate a peer presented names.
fn peer_node(connection: &quinn::Connection) -> Result<u32, String> {
    let identity = connection.peer_identity().ok_or("no certificate")?;
    let chain = identity
        .downcast::<Vec<rustls_pki_types::CertificateDer<'static>>>()
        .map_err(|_| "not an X.509 certificate chain".to_string())?;
    let leaf = chain.first().ok_or("an empty certificate chain")?;
    tls::cert_node_id(leaf).map_err(|e| e.to_string())
}

/// Connections refused for their certificate, logged at most once a second.
static REFUSED_LOG: crate::clients::LogLimiter = crate::clients::LogLimiter::new(1_000);
/// Failed handshakes (a stranger's certificate, or a peer refusing ours),
/// logged at most once a second: a peer that keeps redialing, or a flood,
/// must not fill the log.
static HANDSHAKE_LOG: crate::clients::LogLimiter = crate::clients::LogLimiter::new(1_000);

fn unix_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

async fn accept(endpoint: quinn::Endpoint, tx: mpsc::Sender<Incoming>) {
    while let Some(incoming) = endpoint.accept().await {
        let tx = tx.clone();
        tokio::spawn(async move {
            let connection = match incoming.await {
                Ok(connection) => connection,
                Err(err) => {
                    if let Some(suppressed) = HANDSHAKE_LOG.check(unix_ms()) {
                        tracing::warn!(%err, suppressed, "a peer connection failed its handshake");
                    }
                    return;
                }
            };
            let from = connection.remote_address();
            // The CA signed it, but a certificate naming no node (a
            // client's, say) is no member's.
            let node = match peer_node(&connection) {
                Ok(node) => node,
                Err(err) => {
                    if let Some(suppressed) = REFUSED_LOG.check(unix_ms()) {
                        tracing::warn!(%from, %err, suppressed, "refused a peer connection: its certificate names no node");
                    }
                    connection.close(2u32.into(), b"certificate names no node");
                    return;
                }
            };
            while let Ok(mut stream) = connection.accept_uni().await {
                let frames = match stream.read_to_end(MAX_PEER_FRAME).await {
                    Ok(bytes) => decode_batch(&bytes),
                    Err(err) => Err(err.to_string()),
                };
                match frames {
                    Ok(frames) => {
                        for frame in frames {
                            if tx.send(Incoming { from, node, frame }).await.is_err() {
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

    fn temp(tag: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("cachet-peer-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        dir
    }

    #[tokio::test]
    async fn peers_of_one_ca_talk_and_strangers_are_refused() {
        let (ca, other_ca) = (temp("ca"), temp("other-ca"));
        let any = "127.0.0.1:0".parse().expect("addr");
        let dev = |ca_dir: &PathBuf| PeerTls::DevCa { ca_dir: ca_dir.clone() };
        let (a, _a_in) = PeerTransport::bind(any, &dev(&ca), &temp("a"), 0).expect("a");
        let (b, mut b_in) = PeerTransport::bind(any, &dev(&ca), &temp("b"), 1).expect("b");
        let (stranger, _s_in) = PeerTransport::bind(any, &dev(&other_ca), &temp("stranger"), 2).expect("stranger");
        let b_addr = b.local_addr().expect("b addr");

        let put = PeerFrame::Replica {
            epoch: 1,
            message: Message::Put {
                req: 7,
                key: Bytes::from_static(b"k"),
                record: Record {
                    version: Version { counter: 3, node: 1 },
                    value: Some(Bytes::from_static(b"v")),
                    expires_at: None,
                    hint: 0,
                },
                hint_for: None,
            },
        };
        a.send(b_addr, &put).await.expect("a reaches b");
        a.send(b_addr, &PeerFrame::Gossip(Bytes::from_static(b"swim"))).await.expect("again, same connection");
        let first = tokio::time::timeout(Duration::from_secs(5), b_in.recv()).await.expect("in time").expect("frame");
        assert_eq!(first.frame, put);
        assert_eq!(first.from.port(), a.local_addr().expect("a addr").port());
        assert_eq!(first.node, 0, "the development CA's certificate names a's node id");
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

    /// Every frame carries the node its sender's certificate names; a
    /// dialer expecting another member is refused at the handshake; a
    /// certificate of the cluster's CA that names no node (a client's)
    /// neither binds a peer port nor gets a frame through one.
    #[tokio::test]
    async fn peers_are_the_node_their_certificate_names() {
        use crate::server::tls::{CertSubject, issue_cert};
        let (ca, out) = (temp("id-ca"), temp("id-out"));
        let any: SocketAddr = "127.0.0.1:0".parse().expect("addr");
        let ca_pem = ca.join(tls::CA_CERT);
        let node = |id| {
            let (cert, key) = issue_cert(&ca, &out, &CertSubject::Node(id), &[]).expect("node certificate");
            PeerTls::Files { cert, key, ca: ca_pem.clone() }
        };
        // a runs as node 7 on node 4's certificate: it binds (and logs an
        // error), and what it sends arrives as node 4's.
        let (a, _a_in) = PeerTransport::bind(any, &node(4), &temp("id-a"), 7).expect("a");
        let (b, mut b_in) = PeerTransport::bind(any, &node(5), &temp("id-b"), 5).expect("b");
        let b_addr = b.local_addr().expect("b addr");
        let gossip = PeerFrame::Gossip(Bytes::from_static(b"swim"));
        a.send(b_addr, &gossip).await.expect("a reaches b");
        let got = tokio::time::timeout(Duration::from_secs(5), b_in.recv()).await.expect("in time").expect("frame");
        assert_eq!((got.node, got.frame), (4, gossip.clone()));

        assert!(a.dial(b_addr, Some(4)).await.is_err(), "b's certificate passed for node 4's");
        assert!(a.dial(b_addr, Some(5)).await.is_ok(), "b is node 5");
        assert!(a.dial(b_addr, None).await.is_ok(), "any member will do");

        let (cert, key) = issue_cert(&ca, &out, &CertSubject::Client("app".into()), &[]).expect("client certificate");
        let client_only = PeerTls::Files { cert: cert.clone(), key: key.clone(), ca: ca_pem.clone() };
        let refused = PeerTransport::bind(any, &client_only, &temp("id-c"), 6).err().map(|e| e.to_string());
        assert!(refused.as_deref().is_some_and(|e| e.contains("names no node")), "{refused:?}");
        let config = tls::peer_client_config(&ca_pem, &cert, &key, PEER_ALPN).expect("client config");
        let endpoint = quinn::Endpoint::client(any).expect("endpoint");
        let connecting = endpoint.connect_with(config, b_addr, &tls::peer_server_name(None)).expect("connect");
        if let Ok(connection) = connecting.await {
            let mut batch = Vec::new();
            PeerTransport::encode(&gossip, &mut batch).expect("encode");
            let _ = PeerTransport::send_on(&connection, &batch).await;
            let closed = tokio::time::timeout(Duration::from_secs(5), connection.closed()).await;
            assert!(closed.is_ok(), "b kept a connection whose certificate names no node");
        }
        let nothing = tokio::time::timeout(Duration::from_millis(300), b_in.recv()).await;
        assert!(nothing.is_err(), "a frame got through on a certificate naming no node");
        for t in [a, b] {
            t.close();
        }
        endpoint.close(0u32.into(), b"");
        for dir in ["id-ca", "id-out", "id-a", "id-b", "id-c"] {
            let _ = std::fs::remove_dir_all(temp(dir));
        }
    }
}
