//! The QUIC shell around a [`Node`]: `cachet/1` over quinn, thread per core.
//!
//! Each of `threads` OS threads runs a current-thread tokio runtime and its
//! own quinn endpoint on the same UDP port (`SO_REUSEPORT`; the kernel keeps
//! each client's datagrams on one socket), so a connection never crosses
//! threads and no runtime work is shared: quinn on a current-thread runtime
//! was measured here at 4.6× less CPU per request than on the multi-thread
//! runtime. Shards are shared by all threads behind one lock each.
//!
//! A stream carries pipelined frames: every complete frame in a read is
//! executed, and all the replies go out in one write.

pub mod threads;
pub mod tls;

use crate::loader::Routed;
use crate::node::Node;
use bytes::BytesMut;
use cachet_proto::{Decoded, ErrorCode, ErrorReply, FrameError, Request, Response};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::AsyncReadExt;
use tokio::sync::{mpsc, watch};

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
    let running = threads::spawn("cachet-io", addr, sockets, move |i, socket, stopped| {
        run_endpoint(node.clone(), socket, server_config.clone(), options.clone(), stopped, i == 0)
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
    transport.max_idle_timeout(Some(
        Duration::from_secs(60).try_into().unwrap_or(quinn::IdleTimeout::from(quinn::VarInt::from_u32(60_000))),
    ));
    config.transport_config(Arc::new(transport));
    Ok(config)
}

async fn run_endpoint(
    node: Arc<Node>,
    socket: std::net::UdpSocket,
    config: quinn::ServerConfig,
    options: ServeOptions,
    mut stopped: watch::Receiver<bool>,
    ticks: bool,
) {
    let runtime = Arc::new(quinn::TokioRuntime);
    let endpoint = match quinn::Endpoint::new(quinn::EndpointConfig::default(), Some(config), socket, runtime) {
        Ok(endpoint) => endpoint,
        Err(err) => {
            tracing::error!(%err, "cannot start the QUIC endpoint");
            return;
        }
    };
    if ticks {
        let node = node.clone();
        let mut stopped = stopped.clone();
        tokio::spawn(async move {
            let mut every = tokio::time::interval(Duration::from_millis(100));
            loop {
                tokio::select! {
                    _ = every.tick() => {
                        // A tick may swap every shard (automatic rollback):
                        // never on the I/O thread.
                        let node = node.clone();
                        let _ = tokio::task::spawn_blocking(move || node.tick()).await;
                    }
                    _ = stopped.changed() => break,
                }
            }
        });
    }
    loop {
        tokio::select! {
            incoming = endpoint.accept() => {
                let Some(incoming) = incoming else { break };
                // The cap counts connections on every thread.
                if node.stats_connections() >= u64::from(options.max_connections) {
                    tracing::warn!(remote = %incoming.remote_address(), "connection refused: at the connection cap");
                    incoming.refuse();
                    continue;
                }
                // Counted from acceptance, so a burst of handshakes cannot
                // slip past the cap before any of them completes.
                let counted = node.connection();
                tokio::spawn(handle_connection(node.clone(), counted, incoming, options.max_frame, stopped.clone()));
            }
            _ = stopped.changed() => break,
        }
    }
    // Let connection tasks see the stop and finish their replies.
    tokio::time::sleep(Duration::from_millis(50)).await;
    endpoint.close(0u32.into(), b"node shutting down");
    let _ = tokio::time::timeout(Duration::from_secs(2), endpoint.wait_idle()).await;
}

async fn handle_connection(
    node: Arc<Node>,
    _counted: crate::node::ConnectionGuard,
    incoming: quinn::Incoming,
    max_frame: usize,
    mut stopped: watch::Receiver<bool>,
) {
    let remote = incoming.remote_address();
    let connection = match incoming.await {
        Ok(connection) => connection,
        Err(err) => {
            tracing::debug!(%remote, %err, "handshake failed");
            return;
        }
    };
    loop {
        tokio::select! {
            stream = connection.accept_bi() => match stream {
                Ok((send, recv)) => {
                    tokio::spawn(handle_stream(node.clone(), send, recv, max_frame, stopped.clone()));
                }
                Err(err) => {
                    tracing::debug!(%remote, %err, "connection ended");
                    return;
                }
            },
            _ = stopped.changed() => {
                tokio::time::sleep(Duration::from_millis(20)).await;
                connection.close(0u32.into(), b"node shutting down");
                return;
            }
        }
    }
}

/// Replies buffered per stream before they are written out.
const FLUSH_AT: usize = 256 << 10;
/// GETs one stream may have waiting for loads at once; a stream with more
/// waits inline for the next one, which stops reading it.
const MAX_WAITING: usize = 4096;

fn error(code: ErrorCode, message: impl Into<String>) -> Response {
    Response::Error(ErrorReply::new(code, message))
}

/// Serves one stream: decodes every complete frame, executes it and sends
/// all the replies of one read in one write.
async fn handle_stream(
    node: Arc<Node>,
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
    max_frame: usize,
    mut stopped: watch::Receiver<bool>,
) {
    let mut input = BytesMut::with_capacity(16 << 10);
    let mut output = BytesMut::with_capacity(16 << 10);
    // GETs waiting for a load answer out of order (replies carry their
    // request's id), so one slow load never holds up the stream.
    let (deferred_tx, mut deferred) = mpsc::unbounded_channel::<(u64, Response)>();
    let mut waiting = 0usize;
    loop {
        input.reserve(16 << 10);
        let read = tokio::select! {
            read = recv.read_buf(&mut input) => read,
            Some((id, reply)) = deferred.recv() => {
                waiting -= 1;
                if let Err(err) = cachet_proto::encode(id, &reply, &mut output) {
                    tracing::error!(%err, "cannot encode a reply");
                    return;
                }
                if send.write_all(&output).await.is_err() {
                    return;
                }
                output.clear();
                continue;
            }
            _ = stopped.changed() => break,
        };
        match read {
            Ok(0) => break,
            Ok(_) => {}
            Err(err) => {
                tracing::debug!(%err, "stream read failed");
                return;
            }
        }
        let mut fatal = false;
        let mut frames = 0u32;
        loop {
            let (id, reply) = match cachet_proto::decode::<Request>(&mut input, max_frame) {
                Ok(Decoded::Frame(envelope)) => {
                    let span = tracing::debug_span!("request", id = envelope.id, command = envelope.body.name());
                    let reply = match envelope.body {
                        // Loading compiles a component and activation swaps
                        // every shard: off the I/O thread, so this thread's
                        // other connections keep being served.
                        Request::Admin { ref token, .. } if !node.admin_authorized(token) => {
                            span.in_scope(|| node.execute(envelope.body))
                        }
                        admin @ Request::Admin { .. } => {
                            let node = node.clone();
                            match tokio::task::spawn_blocking(move || span.in_scope(|| node.execute(admin))).await {
                                Ok(reply) => reply,
                                Err(err) => error(ErrorCode::Internal, format!("admin command failed: {err}")),
                            }
                        }
                        // Loads, and writes to an origin, may take a while:
                        // they answer when done (replies carry their id) and
                        // the stream goes on meanwhile.
                        body => {
                            let routed = match node.cluster() {
                                Some(cluster) => cluster.route(&node, &body, envelope.consistency),
                                None => node.loaders().and_then(|loaders| loaders.route(&node, &body)),
                            };
                            match routed {
                                None => span.in_scope(|| node.execute(body)),
                                Some(Routed::Now(reply)) => reply,
                                Some(Routed::Later(later)) if waiting < MAX_WAITING => {
                                    waiting += 1;
                                    let tx = deferred_tx.clone();
                                    let id = envelope.id;
                                    tokio::spawn(async move {
                                        // A panicking load still gets its
                                        // request an answer.
                                        let reply = match tokio::spawn(later).await {
                                            Ok(reply) => reply,
                                            Err(err) => {
                                                error(ErrorCode::Internal, format!("the request failed: {err}"))
                                            }
                                        };
                                        let _ = tx.send((id, reply));
                                    });
                                    continue;
                                }
                                // Too many waiting on this stream: wait for this
                                // one here, which stops reading (and so pushes
                                // back on the client) meanwhile.
                                Some(Routed::Later(later)) => later.await,
                            }
                        }
                    };
                    (envelope.id, reply)
                }
                Ok(Decoded::Incomplete { .. }) => break,
                Err(err @ FrameError::TooLarge { .. }) => {
                    fatal = true;
                    (0, error(ErrorCode::TooLarge, format!("{err}; closing the stream")))
                }
                Err(err @ FrameError::Malformed { id, .. }) => {
                    (id.unwrap_or(0), error(ErrorCode::BadFrame, err.to_string()))
                }
                Err(err @ FrameError::UnknownCommand { id, .. }) => {
                    (id, error(ErrorCode::UnknownCommand, err.to_string()))
                }
                Err(err @ FrameError::UnsupportedVersion { id, .. }) => {
                    (id, error(ErrorCode::UnsupportedVersion, err.to_string()))
                }
                Err(err @ FrameError::Encode(_)) => (0, error(ErrorCode::Internal, err.to_string())),
            };
            if let Err(err) = cachet_proto::encode(id, &reply, &mut output) {
                tracing::error!(%err, "cannot encode a reply");
                fatal = true;
            }
            if fatal {
                break;
            }
            // Pipelined requests may ask for far more reply bytes than they
            // carry: send what is ready before executing more, so the node
            // never buffers more than a bounded amount per stream, and let
            // other connections on this thread run now and then.
            frames += 1;
            if output.len() >= FLUSH_AT {
                if send.write_all(&output).await.is_err() {
                    return;
                }
                output.clear();
            }
            if frames.is_multiple_of(64) {
                tokio::task::yield_now().await;
            }
        }
        if !output.is_empty() {
            if send.write_all(&output).await.is_err() {
                return;
            }
            output.clear();
        }
        if fatal {
            break;
        }
    }
    // The client finished sending (or the node is stopping): answer the
    // loads still pending before closing.
    drop(deferred_tx);
    while waiting > 0 {
        let Some((id, reply)) = deferred.recv().await else { break };
        waiting -= 1;
        if cachet_proto::encode(id, &reply, &mut output).is_err() || send.write_all(&output).await.is_err() {
            return;
        }
        output.clear();
    }
    let _ = send.finish();
}
