//! The QUIC shell around a [`Node`]: `cachet/1` over QUIC, thread per core.
//!
//! Each of `threads` OS threads runs a current-thread tokio runtime and its
//! own QUIC endpoint on the same UDP port (`SO_REUSEPORT`; the kernel keeps
//! each client's datagrams on one socket), so a connection never crosses
//! threads and no runtime work is shared: quinn on a current-thread runtime
//! was measured here at 4.6× less CPU per request than on the multi-thread
//! runtime. Shards are shared by all threads behind one lock each.
//!
//! Each thread's runtime runs one event loop over quinn-proto ([`driver`])
//! that owns its endpoint and connections. A stream carries pipelined
//! frames: every complete frame read is handed to the node's dispatcher,
//! and the replies go out together. The node's periodic work is not the
//! port's: [`Node::start`] runs it whichever ports a node serves.

mod driver;
pub mod threads;
pub mod tls;

use crate::node::Node;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;

/// How a server listens.
#[derive(Clone, Debug)]
pub struct ServeOptions {
    /// UDP address to listen on (port 0 picks one).
    pub listen: SocketAddr,
    /// Threads, each with its own runtime and endpoint.
    pub threads: usize,
    /// Certificates.
    pub tls: tls::TlsSource,
    /// Connections beyond this many are refused.
    pub max_connections: u32,
    /// Concurrent bidirectional streams a client may open per connection.
    pub max_streams: u32,
    /// Largest frame accepted (a value plus its key and framing).
    pub max_frame: usize,
    /// A client silent this long is dropped (it may have vanished without
    /// closing), freeing its place under the cap.
    pub idle_timeout: Duration,
    /// What each client is held to besides.
    pub clients: ClientLimits,
}

/// What the QUIC port holds each client to, beyond the connection cap.
#[derive(Clone, Debug)]
pub struct ClientLimits {
    /// Connections from one source address beyond this many are refused
    /// (handshakes under way included); 0 for no such cap.
    pub max_per_address: u32,
    /// Handshakes a second, per I/O thread, beyond which a client must
    /// first prove it receives at its address (a QUIC Retry, one round trip
    /// more) before the node spends a handshake's work on it. Spoofed
    /// sources then cost the node a stateless packet each, not a
    /// connection. 0: always.
    pub retry_above: u32,
    /// Replies a connection may have queued, not yet taken by its client
    /// (half-sent frames included), before it is cut off: a client that
    /// asks and never reads must not hold the node's memory.
    pub max_output: usize,
}

impl Default for ClientLimits {
    /// No per-address cap, Retry above 1,000 handshakes a second per
    /// thread, and room for the largest reply plus 16 MiB of others.
    fn default() -> Self {
        Self { max_per_address: 0, retry_above: 1_000, max_output: cachet_proto::MAX_REPLY_LEN + (16 << 20) }
    }
}

/// A server that could not start.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// Certificates.
    #[error(transparent)]
    Tls(#[from] tls::TlsError),
    /// Sockets or threads.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// The OS error.
        source: std::io::Error,
    },
}

/// A running server; [`RunningServer::shutdown`] stops accepting, lets
/// open streams finish their replies, closes connections and waits for
/// the threads.
pub type RunningServer = threads::Running;

fn udp_socket(addr: SocketAddr) -> Result<std::net::UdpSocket, ServerError> {
    use socket2::{Domain, Protocol, Socket, Type};
    let io = |what: &str| {
        let what = format!("{what} {addr}");
        move |source| ServerError::Io { what, source }
    };
    let socket = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP)).map_err(io("socket for"))?;
    socket.set_reuse_port(true).map_err(io("SO_REUSEPORT on"))?;
    socket.set_nonblocking(true).map_err(io("non-blocking"))?;
    socket.bind(&addr.into()).map_err(io("bind"))?;
    Ok(socket.into())
}

/// Binds and starts serving `node`.
pub fn start(node: Arc<Node>, options: ServeOptions) -> Result<RunningServer, ServerError> {
    let server_config = server_config(&options)?;
    // SO_REUSEPORT would let this node share a port with another process
    // already on it, each getting some of the clients. A plain bind first
    // fails if anyone holds the port (and picks the port for port 0).
    let claim = std::net::UdpSocket::bind(options.listen).map_err(|source| ServerError::Io {
        what: format!("UDP {} is taken (is another node running?)", options.listen),
        source,
    })?;
    let listen = claim.local_addr().map_err(|source| ServerError::Io { what: "local address".into(), source })?;
    drop(claim);
    let first = udp_socket(listen)?;
    let addr = first.local_addr().map_err(|source| ServerError::Io { what: "local address".into(), source })?;
    let mut sockets = vec![first];
    for _ in 1..options.threads.max(1) {
        sockets.push(udp_socket(addr)?);
    }
    let count = sockets.len();
    // One gate for the port: the cap holds across its threads.
    let gate = crate::clients::ConnectionGate::new(options.max_connections, options.clients.max_per_address);
    let running = threads::spawn("cachet-io", addr, sockets, move |_, socket, stopped| {
        run_endpoint(node.clone(), socket, server_config.clone(), options.clone(), gate.clone(), stopped)
    })
    .map_err(|source| ServerError::Io { what: "spawn thread".into(), source })?;
    tracing::info!(%addr, threads = count, "serving cachet/1 over QUIC");
    Ok(running)
}

fn server_config(options: &ServeOptions) -> Result<quinn::ServerConfig, ServerError> {
    let mut config = tls::server_config(&options.tls, cachet_proto::ALPN)?;
    let mut transport = quinn::TransportConfig::default();
    transport.max_concurrent_bidi_streams(options.max_streams.into());
    transport.max_concurrent_uni_streams(0u32.into());
    // Bounds what one client can make the node buffer.
    let window = (options.max_frame as u64 + (64 << 10)).min(u32::MAX as u64) as u32;
    transport.stream_receive_window(window.into());
    transport.receive_window((window as u64 * 4).min(u32::MAX as u64).try_into().unwrap_or(quinn::VarInt::MAX));
    let idle = options.idle_timeout.try_into().unwrap_or(quinn::IdleTimeout::from(quinn::VarInt::from_u32(60_000)));
    transport.max_idle_timeout(Some(idle));
    config.transport_config(Arc::new(transport));
    Ok(config)
}

async fn run_endpoint(
    node: Arc<Node>,
    socket: std::net::UdpSocket,
    config: quinn::ServerConfig,
    options: ServeOptions,
    gate: Arc<crate::clients::ConnectionGate>,
    stopped: watch::Receiver<bool>,
) {
    let limits = driver::Limits {
        max_connections: options.max_connections,
        max_frame: options.max_frame,
        gate,
        retry_above: options.clients.retry_above,
        max_output: options.clients.max_output,
    };
    driver::run(node, socket, config, limits, stopped).await;
}
