//! The Redis-protocol port (`--resp-listen`): RESP2, and RESP3 after
//! `HELLO 3`, over TCP, on the same shards as the QUIC port.
//!
//! Like the QUIC server, it runs one current-thread tokio runtime per
//! thread, each with its own listener on the same port (`SO_REUSEPORT`).
//! A connection reads what is there, executes every complete command, and
//! writes all their replies at once: pipelining costs one read and one
//! write per batch. Replies are written before more is read, so a client
//! that pipelines without reading stalls on its own socket buffer and the
//! node holds at most one read's commands and their replies for it.
//! Protocol errors are answered in Redis's format and close the
//! connection, as Redis does.

pub mod codec;
pub mod commands;

use crate::loader::{Lookup, Routed};
use crate::node::Node;
use bytes::{Buf, BytesMut};
use codec::{Limits, Writer};
use commands::{ServerInfo, Session};
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::watch;

/// A RESP listener that could not start.
#[derive(Debug, thiserror::Error)]
#[error("RESP port {addr}: {what}: {source}")]
pub struct RespError {
    addr: SocketAddr,
    what: &'static str,
    source: std::io::Error,
}

/// How the RESP port listens.
#[derive(Clone, Debug)]
pub struct RespOptions {
    /// TCP address (port 0 picks one).
    pub listen: SocketAddr,
    /// Threads, each with its own runtime and listener.
    pub threads: usize,
    /// Connections (over both ports) beyond this many are refused.
    pub max_connections: u32,
}

/// A running RESP port; [`RunningResp::shutdown`] stops accepting and
/// closes connections after their current batch.
pub type RunningResp = crate::server::threads::Running;

fn listener(addr: SocketAddr) -> Result<std::net::TcpListener, RespError> {
    use socket2::{Domain, Protocol, Socket, Type};
    let err = |what| move |source| RespError { addr, what, source };
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP)).map_err(err("socket"))?;
    socket.set_reuse_address(true).map_err(err("SO_REUSEADDR"))?;
    socket.set_reuse_port(true).map_err(err("SO_REUSEPORT"))?;
    socket.set_nonblocking(true).map_err(err("non-blocking"))?;
    socket.bind(&addr.into()).map_err(err("bind"))?;
    socket.listen(1024).map_err(err("listen"))?;
    Ok(socket.into())
}

/// Binds and starts serving `node` over RESP.
pub fn start(node: Arc<Node>, options: RespOptions) -> Result<RunningResp, RespError> {
    // As for the QUIC port: a plain bind first, so SO_REUSEPORT never
    // shares the port with another process already listening on it.
    let claim = std::net::TcpListener::bind(options.listen).map_err(|source| RespError {
        addr: options.listen,
        what: "the port is taken (is another node running?)",
        source,
    })?;
    let listen = claim.local_addr().map_err(|source| RespError { addr: options.listen, what: "address", source })?;
    drop(claim);
    let first = listener(listen)?;
    let addr = first.local_addr().map_err(|source| RespError { addr: options.listen, what: "address", source })?;
    let mut listeners = vec![first];
    for _ in 1..options.threads.max(1) {
        listeners.push(listener(addr)?);
    }
    let ids = Arc::new(AtomicU64::new(1));
    let info = ServerInfo { port: addr.port() };
    let (count, max) = (listeners.len(), options.max_connections);
    let running = crate::server::threads::spawn("cachet-resp", addr, listeners, move |_, listener, stopped| {
        accept_loop(node.clone(), listener, stopped, ids.clone(), info.clone(), max)
    })
    .map_err(|source| RespError { addr, what: "spawn thread", source })?;
    tracing::info!(%addr, threads = count, "serving RESP");
    Ok(running)
}

async fn accept_loop(
    node: Arc<Node>,
    listener: std::net::TcpListener,
    mut stopped: watch::Receiver<bool>,
    ids: Arc<AtomicU64>,
    info: ServerInfo,
    max_connections: u32,
) {
    let listener = match tokio::net::TcpListener::from_std(listener) {
        Ok(listener) => listener,
        Err(err) => {
            tracing::error!(%err, "cannot register the RESP listener");
            return;
        }
    };
    let limits = Limits {
        max_bulk: node.config().max_value_size.max(node.config().max_key_size) + (64 << 10),
        ..Limits::default()
    };
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, remote)) => {
                    if node.stats_connections() >= u64::from(max_connections) {
                        tracing::warn!(%remote, "RESP connection refused: at the connection cap");
                        let mut stream = stream;
                        let _ = stream.write_all(b"-ERR max number of clients reached\r\n").await;
                        continue;
                    }
                    let _ = stream.set_nodelay(true);
                    let session = Session { id: ids.fetch_add(1, Ordering::Relaxed), ..Session::default() };
                    let counted = node.connection();
                    tokio::spawn(serve(node.clone(), counted, stream, session, info.clone(), limits, stopped.clone()));
                }
                Err(err) => {
                    tracing::debug!(%err, "RESP accept failed");
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            },
            _ = stopped.changed() => break,
        }
    }
}

/// Serves a plain `GET key` or `SET key value` at the front of `input`
/// straight from the buffer, timed from when the one before ended (`since`;
/// see `Node::get_with_since`). When it ended; `None`, with nothing taken,
/// for anything else.
fn serve_plain(
    node: &Node,
    session: &Session,
    limits: &Limits,
    input: &mut BytesMut,
    output: &mut BytesMut,
    since: Option<Instant>,
) -> Option<Instant> {
    let started = since.unwrap_or_else(Instant::now);
    let (ended, len) = if let Some((key, len)) = codec::plain_get(input, limits) {
        let reply = |value: Option<&[u8]>| Writer::new(output, session.resp3).bulk_or_null(value);
        (node.get_with_since(started, &input[key], reply).1, len)
    } else {
        let (key, value, len) = codec::plain_set(input, limits)?;
        let reply = |response| commands::write_reply(session, response, output);
        (node.set_since(started, &input[key], &input[value], reply).1, len)
    };
    input.advance(len);
    Some(ended)
}

/// Replies buffered before they are written out mid-batch.
const FLUSH_AT: usize = 256 << 10;

async fn serve(
    node: Arc<Node>,
    _counted: crate::node::ConnectionGuard,
    mut stream: tokio::net::TcpStream,
    mut session: Session,
    info: ServerInfo,
    limits: Limits,
    mut stopped: watch::Receiver<bool>,
) {
    let mut input = BytesMut::with_capacity(16 << 10);
    let mut output = BytesMut::with_capacity(16 << 10);
    loop {
        input.reserve(16 << 10);
        let read = tokio::select! {
            read = stream.read_buf(&mut input) => read,
            _ = stopped.changed() => return,
        };
        match read {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
        let mut close = false;
        // Plain GETs and SETs are served straight from the read buffer
        // unless a cluster or loaders may have to route them.
        let direct = node.cluster().is_none() && node.loaders().is_none();
        // When the plain GET or SET before this one ended: the next one's
        // clock starts there (see `Node::get_with_since`).
        let mut last_end: Option<Instant> = None;
        loop {
            let plain = direct.then(|| serve_plain(&node, &session, &limits, &mut input, &mut output, last_end));
            if let Some(ended) = plain.flatten() {
                last_end = Some(ended);
            } else {
                last_end = None;
                match codec::parse_command(&mut input, &limits) {
                    // A clustered node forwards data commands to the owners and
                    // answers in order.
                    Ok(Some(args)) => match commands::cluster_command(&node, &args) {
                        Some((kind, routed)) => {
                            let response = match routed {
                                Routed::Now(response) => response,
                                Routed::Later(later) => later.await,
                            };
                            commands::cluster_reply(&session, kind, response, &mut output);
                        }
                        None => match commands::loading_get(&node, &args) {
                            // A miss in a loader namespace waits for its load here:
                            // RESP answers in order.
                            Some(lookup) => {
                                let response = match lookup {
                                    Lookup::Ready(response) => response,
                                    Lookup::Pending(pending) => pending.response().await,
                                };
                                commands::get_reply(&session, response, &mut output);
                            }
                            None => match commands::origin_write(&node, &args) {
                                Some(routed) => {
                                    let response = match routed {
                                        Routed::Now(response) => response,
                                        Routed::Later(later) => later.await,
                                    };
                                    commands::write_reply(&session, response, &mut output);
                                }
                                None => {
                                    let _span = tracing::debug_span!("resp", command = %String::from_utf8_lossy(args.first().map_or(&b""[..], |a| &a[..]))).entered();
                                    commands::execute(&node, &mut session, &info, args, &mut output);
                                }
                            },
                        },
                    },
                    Ok(None) => break,
                    Err(err) => {
                        Writer::new(&mut output, session.resp3).error(&format!("ERR {err}"));
                        close = true;
                        break;
                    }
                }
            }
            if session.quit {
                close = true;
                break;
            }
            if output.len() >= FLUSH_AT {
                if stream.write_all(&output).await.is_err() {
                    return;
                }
                output.clear();
                last_end = None;
            }
        }
        if !output.is_empty() {
            if stream.write_all(&output).await.is_err() {
                return;
            }
            output.clear();
        }
        if close {
            let _ = stream.shutdown().await;
            return;
        }
    }
}
