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
//!
//! What one client can hold is bounded: a command over the query limit
//! ([`codec::Limits::max_command`]) is refused as its headers declare it,
//! before its bytes arrive; replies queue up to [`FLUSH_AT`] plus one reply
//! (whose size is capped where it is built) and then wait on the socket, and
//! a client that reads none of them for the output timeout is cut off; a
//! client silent for the idle timeout is closed; connections are capped per
//! port and, optionally, per source address. Every cut-off is counted in
//! the node's metrics (`cachet_client_cutoffs_total`).

pub mod acl;
pub mod cluster;
pub mod codec;
pub mod command_table;
pub mod commands;
mod introspection;
pub mod multi;
pub mod reply;
pub mod session;
pub mod strings;

use crate::clients::{ConnectionGate, Cutoff};
use crate::node::Node;
use bytes::{Buf, BytesMut};
use codec::{Limits, Parser, Writer};
use commands::{ServerInfo, Session};
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::watch;

/// A RESP listener that could not start.
#[derive(Debug, thiserror::Error)]
#[error("RESP port {addr}: {what}: {source}")]
pub struct RespError {
    addr: SocketAddr,
    what: &'static str,
    source: std::io::Error,
}

/// How the RESP port listens, and what it holds each client to.
#[derive(Clone, Debug)]
pub struct RespOptions {
    /// TCP address (port 0 picks one).
    pub listen: SocketAddr,
    /// Threads, each with its own runtime and listener.
    pub threads: usize,
    /// Connections on this port beyond this many are refused (and over
    /// both ports, beyond the node's total of this many).
    pub max_connections: u32,
    /// Connections from one source address beyond this many are refused;
    /// 0 for no such cap.
    pub max_connections_per_address: u32,
    /// Largest command, headers included; `None` derives it from the
    /// node's largest value and key ([`Limits::for_values`]).
    pub max_command: Option<usize>,
    /// A client that sends nothing for this long, with nothing pending, is
    /// closed; `None` never closes an idle client (Redis's `timeout 0`).
    pub idle_timeout: Option<Duration>,
    /// A client that reads none of its queued replies for this long is
    /// cut off (Redis's soft output-buffer limit).
    pub output_timeout: Duration,
    /// Users and what they may do; `None`: anyone may do anything.
    pub acl: Option<Arc<acl::Acl>>,
    /// TLS for every connection (`redis-cli --tls`); `None`: plain TCP.
    pub tls: Option<Arc<rustls::ServerConfig>>,
    /// Listen beyond loopback with no password required. Refused without
    /// it: an open cache port on a network is a data leak and a way in.
    pub insecure: bool,
    /// On a cluster member: `MOVED` for keys whose slot another member is
    /// primary of (see `resp::cluster::redirect`), instead of forwarding.
    pub redirects: bool,
}

impl RespOptions {
    /// The defaults, listening on `listen`: one thread, 10,000 connections,
    /// no per-address cap, the derived command limit, idle clients closed
    /// after 300 s, stalled readers after 60 s.
    pub fn new(listen: SocketAddr) -> Self {
        Self {
            listen,
            threads: 1,
            max_connections: 10_000,
            max_connections_per_address: 0,
            max_command: None,
            idle_timeout: Some(Duration::from_secs(300)),
            output_timeout: Duration::from_secs(60),
            acl: None,
            tls: None,
            insecure: false,
            redirects: false,
        }
    }
}

/// What each connection of a port is held to.
#[derive(Clone, Copy, Debug)]
struct ConnectionLimits {
    parse: Limits,
    idle: Option<Duration>,
    output: Duration,
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

/// Binds and starts serving `node` over RESP. Refuses an address beyond
/// loopback unless a password is required or `insecure` says so.
pub fn start(node: Arc<Node>, options: RespOptions) -> Result<RunningResp, RespError> {
    let protected = options.acl.as_ref().is_some_and(|acl| acl.requires_auth());
    if !options.listen.ip().is_loopback() && !protected && !options.insecure {
        return Err(RespError {
            addr: options.listen,
            what: "refusing to listen beyond loopback with no password: give --resp-password or --resp-acl (users \
                   without nopass), or --resp-insecure to serve anyone who can reach it",
            source: std::io::Error::from(std::io::ErrorKind::PermissionDenied),
        });
    }
    if !protected {
        tracing::warn!(addr = %options.listen, "the RESP port requires no password: anyone who can reach it may read, write and flush");
    }
    // As for the QUIC port: a plain bind first, so SO_REUSEPORT never
    // shares the port with another process already listening on it. Port
    // 0 is claimed afresh when another socket takes the port between the
    // claim and the listener (tests start many nodes at once).
    let mut attempts = 0;
    let first = loop {
        let claim = std::net::TcpListener::bind(options.listen).map_err(|source| RespError {
            addr: options.listen,
            what: "the port is taken (is another node running?)",
            source,
        })?;
        let listen =
            claim.local_addr().map_err(|source| RespError { addr: options.listen, what: "address", source })?;
        drop(claim);
        match listener(listen) {
            Err(err)
                if options.listen.port() == 0
                    && err.source.kind() == std::io::ErrorKind::AddrInUse
                    && attempts < 10 =>
            {
                attempts += 1;
            }
            bound => break bound?,
        }
    };
    let addr = first.local_addr().map_err(|source| RespError { addr: options.listen, what: "address", source })?;
    let mut listeners = vec![first];
    for _ in 1..options.threads.max(1) {
        listeners.push(listener(addr)?);
    }
    let ids = Arc::new(AtomicU64::new(1));
    let info = ServerInfo {
        port: addr.port(),
        acl: options.acl.clone(),
        bind: addr.ip().to_string(),
        idle_ms: Arc::new(AtomicU64::new(options.idle_timeout.map_or(0, |t| t.as_millis() as u64))),
        max_connections: options.max_connections,
        max_command: options.max_command.unwrap_or_else(|| {
            Limits::for_values(node.config().max_value_size, node.config().max_key_size).max_command
        }),
        stats_base: Arc::default(),
        redirects: options.redirects,
    };
    let tls = options.tls.clone().map(tokio_rustls::TlsAcceptor::from);
    let count = listeners.len();
    let config = node.config();
    let mut parse = Limits::for_values(config.max_value_size, config.max_key_size);
    if let Some(max_command) = options.max_command {
        parse.max_command = max_command;
    }
    let limits = ConnectionLimits { parse, idle: options.idle_timeout, output: options.output_timeout };
    let gate = ConnectionGate::new(options.max_connections, options.max_connections_per_address);
    let max = options.max_connections;
    let running = crate::server::threads::spawn("cachet-resp", addr, listeners, move |_, listener, stopped| {
        let accepting = Accepting { gate: gate.clone(), max_connections: max, limits, tls: tls.clone() };
        accept_loop(node.clone(), listener, stopped, ids.clone(), info.clone(), accepting)
    })
    .map_err(|source| RespError { addr, what: "spawn thread", source })?;
    tracing::info!(%addr, threads = count, "serving RESP");
    Ok(running)
}

/// What a listener admits connections with.
struct Accepting {
    gate: Arc<ConnectionGate>,
    /// The node's total over both ports.
    max_connections: u32,
    limits: ConnectionLimits,
    tls: Option<tokio_rustls::TlsAcceptor>,
}

async fn accept_loop(
    node: Arc<Node>,
    listener: std::net::TcpListener,
    mut stopped: watch::Receiver<bool>,
    ids: Arc<AtomicU64>,
    info: ServerInfo,
    accepting: Accepting,
) {
    let listener = match tokio::net::TcpListener::from_std(listener) {
        Ok(listener) => listener,
        Err(err) => {
            tracing::error!(%err, "cannot register the RESP listener");
            return;
        }
    };
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, remote)) => {
                    let admitted = if node.stats_connections() >= u64::from(accepting.max_connections) {
                        Err(crate::clients::Refusal::PortFull { max: accepting.max_connections })
                    } else {
                        accepting.gate.admit(remote.ip())
                    };
                    let permit = match admitted {
                        Ok(permit) => permit,
                        Err(refusal) => {
                            node.clients().count(Cutoff::from(&refusal));
                            if let Some(held_back) = node.clients().refusal_log.check(node.now_ms()) {
                                tracing::warn!(%remote, %refusal, held_back, "RESP connection refused");
                            }
                            // Best effort and never waited on: the refused
                            // client must not hold the accept loop.
                            let _ = stream.try_write(b"-ERR max number of clients reached\r\n");
                            continue;
                        }
                    };
                    let _ = stream.set_nodelay(true);
                    let session = Session {
                        id: ids.fetch_add(1, Ordering::Relaxed),
                        user: info.acl.as_ref().and_then(|acl| acl.initial_user()),
                        ..Session::default()
                    };
                    let counted = (node.connection(), permit);
                    let (node, info, limits, stopped) = (node.clone(), info.clone(), accepting.limits, stopped.clone());
                    match accepting.tls.clone() {
                        None => {
                            tokio::spawn(serve(node, counted, stream, remote, session, info, limits, stopped));
                        }
                        Some(tls) => {
                            tokio::spawn(async move {
                                // The handshake counts as reading: an idle
                                // timeout bounds it too.
                                let handshake = tls.accept(stream);
                                let handshake = tokio::time::timeout(limits.idle.unwrap_or(HANDSHAKE_TIMEOUT).min(HANDSHAKE_TIMEOUT), handshake);
                                match handshake.await {
                                    Ok(Ok(stream)) => serve(node, counted, stream, remote, session, info, limits, stopped).await,
                                    Ok(Err(err)) => tracing::debug!(%remote, %err, "RESP TLS handshake failed"),
                                    Err(_) => node.clients().count(Cutoff::Idle),
                                }
                            });
                        }
                    }
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

/// The longest a TLS handshake may take.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Replies buffered before they are written out mid-batch.
const FLUSH_AT: usize = 256 << 10;

/// Why a connection ends early.
enum Ended {
    /// The client left, or its socket failed.
    Gone,
    /// A limit cut it off.
    Cut(Cutoff),
}

/// Writes all of `output`, cutting the client off if the socket takes
/// none of it for `stall` (the client is not reading its replies).
async fn write_out<S: AsyncWrite + Unpin>(stream: &mut S, output: &mut BytesMut, stall: Duration) -> Result<(), Ended> {
    while !output.is_empty() {
        match tokio::time::timeout(stall, stream.write(output)).await {
            Ok(Ok(0) | Err(_)) => return Err(Ended::Gone),
            Ok(Ok(written)) => output.advance(written),
            Err(_) => return Err(Ended::Cut(Cutoff::OutputLimit)),
        }
    }
    output.clear();
    Ok(())
}

#[allow(clippy::too_many_arguments)]
async fn serve<S: AsyncRead + AsyncWrite + Unpin>(
    node: Arc<Node>,
    counted: (crate::node::ConnectionGuard, crate::clients::GatePermit),
    mut stream: S,
    peer: SocketAddr,
    session: Session,
    info: ServerInfo,
    limits: ConnectionLimits,
    stopped: watch::Receiver<bool>,
) {
    if let Err(Ended::Cut(why)) = serve_until_done(&node, &mut stream, session, &info, limits, stopped).await {
        node.clients().count(why);
        if let Some(held_back) = node.clients().refusal_log.check(node.now_ms()) {
            tracing::info!(%peer, reason = why.label(), held_back, "RESP client cut off");
        }
    }
    drop(counted);
}

async fn serve_until_done<S: AsyncRead + AsyncWrite + Unpin>(
    node: &Arc<Node>,
    stream: &mut S,
    mut session: Session,
    info: &ServerInfo,
    limits: ConnectionLimits,
    mut stopped: watch::Receiver<bool>,
) -> Result<(), Ended> {
    // No buffer until the client sends something: a connection that only
    // sits there costs its socket and this task, not 32 KiB of buffers.
    let mut input = BytesMut::new();
    let mut output = BytesMut::new();
    let mut first = [0u8; 512];
    let mut parser = Parser::default();
    let parse = &limits.parse;
    loop {
        let fresh = input.capacity() == 0;
        if !fresh {
            input.reserve(16 << 10);
        }
        let idle = async {
            match info.idle() {
                Some(idle) => tokio::time::sleep(idle).await,
                None => std::future::pending().await,
            }
        };
        let reading = async {
            if fresh {
                let n = stream.read(&mut first).await?;
                input.reserve((16 << 10).max(n));
                input.extend_from_slice(&first[..n]);
                Ok(n)
            } else {
                stream.read_buf(&mut input).await
            }
        };
        let read = tokio::select! {
            read = reading => read,
            _ = stopped.changed() => return Ok(()),
            _ = idle => return Err(Ended::Cut(Cutoff::Idle)),
        };
        match read {
            Ok(0) | Err(_) => return Err(Ended::Gone),
            Ok(_) => {}
        }
        let mut close = None;
        // Plain GETs and SETs are served straight from the read buffer
        // unless a cluster or loaders may have to route them.
        let direct = node.cluster().is_none() && node.loaders().is_none();
        // When the plain GET or SET before this one ended: the next one's
        // clock starts there (see `Node::get_with_since`).
        let mut last_end: Option<Instant> = None;
        loop {
            let plain = (direct && parser.idle() && session.unrestricted(info) && session.multi.is_none())
                .then(|| serve_plain(node, &session, parse, &mut input, &mut output, last_end));
            if let Some(ended) = plain.flatten() {
                last_end = Some(ended);
            } else {
                last_end = None;
                match parser.parse(&mut input, parse) {
                    Ok(Some(args)) if commands::authorize(&session, info, &args).is_err() => {
                        if let Err(denied) = commands::authorize(&session, info, &args) {
                            Writer::new(&mut output, session.resp3).error(&denied.to_string());
                        }
                        // A command refused inside MULTI discards the
                        // transaction, as Redis does.
                        if let Some(multi) = session.multi.as_mut() {
                            multi.refuse();
                        }
                    }
                    // One parse into the request the QUIC port carries; the
                    // dispatcher routes it. A reply that comes later (a load,
                    // a replicated operation) is awaited here: RESP answers
                    // in order.
                    // MULTI/EXEC/WATCH, and commands queued in a
                    // transaction (see `multi`).
                    Ok(Some(args)) if multi::handle(node, &mut session, info, &args, &mut output) => {}
                    Ok(Some(args)) => match commands::parse(&args) {
                        commands::Parsed::Data(request, reply) => {
                            // A cluster client's connection: redirected to
                            // the slot's primary, or a READONLY read served
                            // here at ONE.
                            if info.redirects
                                && let Some(refusal) = cluster::redirect(node, session.readonly, &request)
                            {
                                Writer::new(&mut output, session.resp3).error(&refusal);
                            } else {
                                let level =
                                    (session.readonly && !request.is_write()).then_some(cachet_proto::Consistency::One);
                                let response = node.dispatch(request, level).response().await;
                                commands::write_response(&session, reply, response, &mut output);
                            }
                        }
                        commands::Parsed::Invalid(message) => Writer::new(&mut output, session.resp3).error(&message),
                        // CONFIG SET may swap the policy (on a cluster,
                        // through the log): off the I/O thread.
                        commands::Parsed::Local if introspection::is_config_set(&args) => {
                            let (node, info, pairs) = (node.clone(), info.clone(), args[2..].to_vec());
                            let done =
                                tokio::task::spawn_blocking(move || introspection::config_set(&node, &info, &pairs))
                                    .await;
                            let mut w = Writer::new(&mut output, session.resp3);
                            match done {
                                Ok(Ok(())) => w.simple("OK"),
                                Ok(Err(message)) => w.error(&message),
                                Err(_) => w.error("ERR CONFIG SET did not finish"),
                            }
                        }
                        commands::Parsed::Local => {
                            let _span = tracing::debug_span!("resp", command = %args.first().map_or(&b""[..], |a| &a[..]).escape_ascii()).entered();
                            commands::execute_local(node, &mut session, info, args, &mut output);
                        }
                    },
                    Ok(None) => break,
                    Err(err) => {
                        Writer::new(&mut output, session.resp3).error(&format!("ERR {err}"));
                        close = Some(match err {
                            codec::ProtocolError::CommandTooBig { .. } => Err(Ended::Cut(Cutoff::QueryLimit)),
                            _ => Ok(()),
                        });
                        break;
                    }
                }
            }
            if session.quit {
                close = Some(Ok(()));
                break;
            }
            if output.len() >= FLUSH_AT {
                write_out(stream, &mut output, limits.output).await?;
                last_end = None;
            }
        }
        write_out(stream, &mut output, limits.output).await?;
        if let Some(result) = close {
            let _ = stream.shutdown().await;
            return result;
        }
    }
}
