//! The QUIC port's event loop, one per I/O thread, over quinn-proto.
//!
//! quinn's async API gives each connection and each stream a task of its
//! own, joined by channels and wakers: a request woke four tasks on its way
//! to a reply, and tokio and quinn's glue were a sixth of the node's CPU at
//! one request per round trip. Here one loop owns the endpoint and every
//! connection outright. A batch of datagrams comes off the socket; each
//! connection it touched is then driven once: its events handled, complete
//! frames executed, replies written and its datagrams sent. Only work that
//! must wait (a load, an admin command) leaves the loop, and its reply comes
//! back on one channel.

use crate::clients::{ConnectionGate, Cutoff, GatePermit, HandshakeRate, Refusal};
use crate::node::{ConnectionGuard, Node};
use crate::reply::Routed;
use bytes::{Bytes, BytesMut};
use cachet_proto::{Decoded, ErrorCode, ErrorReply, FrameError, Request, Response};
use hashbrown::HashMap;
use quinn_proto::{
    ConnectionEvent, ConnectionHandle, DatagramEvent, Dir, EcnCodepoint, Endpoint, EndpointConfig, Event, ReadError,
    ReadableError, ServerConfig, StreamEvent, StreamId, Transmit, WriteError,
};
use std::io::IoSliceMut;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::Interest;
use tokio::sync::{mpsc, watch};

/// Replies buffered per stream before they are handed to the connection.
const FLUSH_AT: usize = 256 << 10;
/// Requests one stream may have waiting (loads, admin commands) at once;
/// a stream with this many stops executing until one answers, which stops
/// reading it and so pushes back on the client.
const MAX_WAITING: usize = 4096;
/// Datagrams a connection may hand over in one go (one GSO send).
const MAX_SEGMENTS: usize = 10;
/// Frames one stream may execute per turn before the loop looks at the
/// socket, the timers and the other connections again.
const FRAMES_PER_TURN: usize = 256;
/// After a stop, how long connections get to finish their replies before
/// they are closed, and how long closing may take.
const STOP_GRACE: Duration = Duration::from_millis(50);
const CLOSE_WAIT: Duration = Duration::from_secs(2);

/// What the loop needs to know besides the node.
#[derive(Clone, Debug)]
pub(super) struct Limits {
    pub(super) max_connections: u32,
    pub(super) max_frame: usize,
    /// The port's connection caps, shared by its threads.
    pub(super) gate: Arc<ConnectionGate>,
    /// See [`super::ClientLimits::retry_above`].
    pub(super) retry_above: u32,
    /// See [`super::ClientLimits::max_output`].
    pub(super) max_output: usize,
}

/// Requests one connection may have waiting (loads, admin commands) over
/// all its streams; at this many its streams stop executing until one
/// answers, which stops reading them and so pushes back on the client.
const MAX_WAITING_PER_CONNECTION: usize = 16_384;

/// A reply that had to wait, and where it goes. quinn-proto reuses a
/// drained connection's handle for the next one, so the connection's
/// serial number must match too.
struct Deferred {
    connection: ConnectionHandle,
    serial: u64,
    stream: StreamId,
    id: u64,
    reply: Response,
    /// It answers an admin command (the stream waited for it).
    admin: bool,
}

/// One bidirectional stream carrying pipelined frames.
#[derive(Default)]
struct Stream {
    /// Bytes read, not yet a complete frame.
    input: BytesMut,
    /// Replies not yet taken by the connection (flow control).
    output: BytesMut,
    /// Requests of this stream still waiting for a reply.
    waiting: usize,
    /// An admin command of this stream is running: the frames after it
    /// wait for it, in order (an upload's chunks, then its load).
    admin: bool,
    /// The client finished sending, or reset the stream.
    ended: bool,
    /// A frame too large was refused, or the client stopped reading: no
    /// more frames run, and the stream closes once its waiting requests
    /// have answered.
    fatal: bool,
}

struct Conn {
    inner: quinn_proto::Connection,
    serial: u64,
    streams: HashMap<StreamId, Stream>,
    /// Counts the connection in the node's connections from its
    /// handshake's end until it is lost.
    counted: Option<ConnectionGuard>,
    /// Its place under the port's caps, from the first packet until it is
    /// lost: handshakes under way count, so a burst of them cannot slip
    /// past the cap.
    permit: Option<GatePermit>,
    /// Requests of all its streams still waiting for a reply.
    waiting: usize,
    /// Cut off for a limit: no more frames run.
    cut: bool,
    /// In the list of connections to drive.
    queued: bool,
    /// When its timers next need it.
    timeout: Option<Instant>,
}

/// The socket and what sends on it.
struct Io {
    socket: tokio::net::UdpSocket,
    state: quinn_udp::UdpSocketState,
    /// A connection's datagram that found the socket's send buffer full;
    /// nothing more is asked of any connection until it is out.
    unsent: Option<(Vec<u8>, Transmit)>,
    buf: Vec<u8>,
}

impl Io {
    fn try_send(&self, transmit: &Transmit, contents: &[u8]) -> std::io::Result<()> {
        let udp = udp_transmit(transmit, contents);
        match self.socket.try_io(Interest::WRITABLE, || self.state.send((&self.socket).into(), &udp)) {
            Err(err) if err.kind() == std::io::ErrorKind::WouldBlock => Err(err),
            Err(err) => {
                // Lost like any datagram; QUIC's recovery resends.
                tracing::debug!(%err, "send failed");
                Ok(())
            }
            Ok(()) => Ok(()),
        }
    }

    /// Sends a connection's `transmit` (its bytes in `self.buf`); false if
    /// the socket is full, the datagram then kept for [`Io::flush`].
    fn send(&mut self, transmit: Transmit) -> bool {
        if self.try_send(&transmit, &self.buf[..transmit.size]).is_ok() {
            return true;
        }
        self.unsent = Some((self.buf[..transmit.size].to_vec(), transmit));
        false
    }

    /// Sends an endpoint's own answer (a refusal, a version negotiation, a
    /// stateless reset), dropped if the socket is full, as quinn does.
    fn respond(&self, transmit: Transmit) {
        let _ = self.try_send(&transmit, &self.buf[..transmit.size]);
    }

    /// Sends the kept datagram; false while the socket is still full.
    fn flush(&mut self) -> bool {
        if let Some((bytes, transmit)) = &self.unsent {
            if self.try_send(transmit, bytes).is_err() {
                return false;
            }
            self.unsent = None;
        }
        true
    }
}

fn udp_transmit<'a>(t: &Transmit, contents: &'a [u8]) -> quinn_udp::Transmit<'a> {
    quinn_udp::Transmit {
        destination: t.destination,
        ecn: t.ecn.and_then(|e| quinn_udp::EcnCodepoint::from_bits(e as u8)),
        contents,
        segment_size: t.segment_size,
        src_ip: t.src_ip,
    }
}

fn error(code: ErrorCode, message: impl Into<String>) -> Response {
    Response::Error(ErrorReply::new(code, message))
}

/// The loop's state: the endpoint, its connections, the node.
struct Driver {
    endpoint: Endpoint,
    connections: HashMap<ConnectionHandle, Conn>,
    next_serial: u64,
    /// Connections to drive before waiting again.
    queue: Vec<ConnectionHandle>,
    /// Connections with frames left when their turn's budget ran out.
    again: Vec<ConnectionHandle>,
    /// Connections with datagrams to send once the socket has room.
    blocked: Vec<ConnectionHandle>,
    node: Arc<Node>,
    limits: Limits,
    deferred: mpsc::UnboundedSender<Deferred>,
    /// The node is stopping: new connections are refused, no more frames
    /// are read, and streams finish once their replies are out.
    stopping: bool,
    /// The earliest timer of any connection (may be early: checked when it
    /// comes).
    next_timeout: Option<Instant>,
    /// The streams a drive serves (kept to save an allocation a drive).
    touched: Vec<StreamId>,
    /// Handshakes lately, to tell when to ask for a Retry.
    handshakes: HandshakeRate,
}

/// Serves QUIC on `socket` until `stopped`, then lets replies finish and
/// closes every connection.
pub(super) async fn run(
    node: Arc<Node>,
    socket: std::net::UdpSocket,
    config: ServerConfig,
    limits: Limits,
    mut stopped: watch::Receiver<bool>,
) {
    let socket = match tokio::net::UdpSocket::from_std(socket) {
        Ok(socket) => socket,
        Err(err) => {
            tracing::error!(%err, "cannot register the QUIC socket");
            return;
        }
    };
    let state = match quinn_udp::UdpSocketState::new((&socket).into()) {
        Ok(state) => state,
        Err(err) => {
            tracing::error!(%err, "cannot configure the QUIC socket");
            return;
        }
    };
    let endpoint_config = EndpointConfig::default();
    let chunk = (endpoint_config.get_max_udp_payload_size().min(64 << 10) as usize) * state.gro_segments();
    // Path MTU discovery only where the socket refuses to fragment, as
    // quinn decides it.
    let allow_mtud = !state.may_fragment();
    let mut io = Io { socket, state, unsent: None, buf: Vec::with_capacity(64 << 10) };
    let (deferred_tx, mut deferred_rx) = mpsc::unbounded_channel();
    let limits_retry_above = limits.retry_above;
    let mut driver = Driver {
        endpoint: Endpoint::new(Arc::new(endpoint_config), Some(Arc::new(config)), allow_mtud, None),
        connections: HashMap::new(),
        next_serial: 0,
        queue: Vec::new(),
        again: Vec::new(),
        blocked: Vec::new(),
        node,
        limits,
        deferred: deferred_tx,
        stopping: false,
        next_timeout: None,
        touched: Vec::new(),
        handshakes: HandshakeRate::new(limits_retry_above),
    };
    let mut recv_buf = vec![0u8; chunk * quinn_udp::BATCH_SIZE];
    let mut bufs: Vec<IoSliceMut> = recv_buf.chunks_mut(chunk).map(IoSliceMut::new).collect();
    let mut metas = vec![quinn_udp::RecvMeta::default(); quinn_udp::BATCH_SIZE];
    // After a stop: first a grace period, then closing, then giving up.
    let mut close_at: Option<Instant> = None;
    let mut give_up_at: Option<Instant> = None;
    loop {
        // Timers and the stop's deadlines are checked on every turn, not
        // only when the loop sleeps: under steady load the socket is always
        // readable, and loss recovery, idle timeouts and the close must
        // still happen.
        let now = Instant::now();
        if close_at.is_some_and(|at| at <= now) {
            close_at = None;
            give_up_at = Some(now + CLOSE_WAIT);
            driver.close_all(now);
        }
        if give_up_at.is_some_and(|at| at <= now) {
            break;
        }
        if driver.next_timeout.is_some_and(|at| at <= now) {
            driver.timers(now);
        }
        for handle in std::mem::take(&mut driver.again) {
            driver.enqueue(handle);
        }
        driver.drive_queued(&mut io);
        if give_up_at.is_some() && driver.connections.is_empty() && io.unsent.is_none() {
            break;
        }
        // With frames left over, only look around before the next turn.
        let wake_at = match driver.again.is_empty() {
            true => [driver.next_timeout, close_at, give_up_at].into_iter().flatten().min(),
            false => Some(now),
        };
        let sleep = async {
            match wake_at {
                Some(at) => tokio::time::sleep_until(at.into()).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            ready = io.socket.writable(), if io.unsent.is_some() => {
                if ready.is_ok() && io.flush() {
                    for handle in std::mem::take(&mut driver.blocked) {
                        driver.enqueue(handle);
                    }
                }
            }
            ready = io.socket.readable() => {
                if ready.is_err() {
                    continue;
                }
                let received = io.socket.try_io(Interest::READABLE, || {
                    io.state.recv((&io.socket).into(), &mut bufs, &mut metas)
                });
                match received {
                    Ok(count) => {
                        let now = Instant::now();
                        for (meta, buf) in metas.iter().zip(bufs.iter()).take(count) {
                            let mut data = BytesMut::from(&buf[..meta.len]);
                            while !data.is_empty() {
                                let datagram = data.split_to(meta.stride.min(data.len()));
                                driver.datagram(now, meta, datagram, &mut io);
                            }
                        }
                    }
                    Err(err) if err.kind() == std::io::ErrorKind::WouldBlock => {}
                    // ECONNRESET and the like: ICMP news about a peer,
                    // which QUIC does not rely on.
                    Err(err) => tracing::debug!(%err, "receive failed"),
                }
            }
            Some(first) = deferred_rx.recv() => {
                driver.answer(first);
                while let Ok(next) = deferred_rx.try_recv() {
                    driver.answer(next);
                }
            }
            // Whatever fell due is handled at the top of the loop.
            () = sleep => {}
            changed = stopped.changed(), if !driver.stopping => {
                // A dropped sender also means stop.
                let _ = changed;
                driver.stop();
                close_at = Some(Instant::now() + STOP_GRACE);
            }
        }
    }
}

impl Driver {
    fn enqueue(&mut self, handle: ConnectionHandle) {
        if let Some(conn) = self.connections.get_mut(&handle)
            && !conn.queued
        {
            conn.queued = true;
            self.queue.push(handle);
        }
    }

    /// One datagram off the socket.
    fn datagram(&mut self, now: Instant, meta: &quinn_udp::RecvMeta, data: BytesMut, io: &mut Io) {
        io.buf.clear();
        let ecn = meta.ecn.and_then(|e| EcnCodepoint::from_bits(e as u8));
        match self.endpoint.handle(now, meta.addr, meta.dst_ip, ecn, data, &mut io.buf) {
            Some(DatagramEvent::ConnectionEvent(handle, event)) => self.connection_event(handle, event),
            Some(DatagramEvent::NewConnection(incoming)) => {
                let remote = incoming.remote_address();
                if self.stopping {
                    let transmit = self.endpoint.refuse(incoming, &mut io.buf);
                    io.respond(transmit);
                    return;
                }
                // Established connections count on every thread (the
                // node's total over both ports); the port's gate counts
                // handshakes under way too.
                let admitted = if self.node.stats_connections() >= u64::from(self.limits.max_connections) {
                    Err(Refusal::PortFull { max: self.limits.max_connections })
                } else {
                    self.limits.gate.admit(remote.ip())
                };
                let permit = match admitted {
                    Ok(permit) => permit,
                    Err(refusal) => {
                        let clients = self.node.clients();
                        clients.count(Cutoff::from(&refusal));
                        if let Some(held_back) = clients.refusal_log.check(self.node.now_ms()) {
                            tracing::warn!(%remote, %refusal, held_back, "QUIC connection refused");
                        }
                        let transmit = self.endpoint.refuse(incoming, &mut io.buf);
                        io.respond(transmit);
                        return;
                    }
                };
                // Under a burst, a client must show it receives at its
                // address before it costs a handshake.
                if !incoming.remote_address_validated() && self.handshakes.over(self.node.now_ms()) {
                    drop(permit);
                    match self.endpoint.retry(incoming, &mut io.buf) {
                        Ok(transmit) => {
                            self.node.clients().count_retry();
                            io.respond(transmit);
                        }
                        Err(err) => self.endpoint.ignore(err.into_incoming()),
                    }
                    return;
                }
                match self.endpoint.accept(incoming, now, &mut io.buf, None) {
                    Ok((handle, inner)) => {
                        self.next_serial += 1;
                        let conn = Conn {
                            inner,
                            serial: self.next_serial,
                            streams: HashMap::new(),
                            counted: None,
                            permit: Some(permit),
                            waiting: 0,
                            cut: false,
                            queued: false,
                            timeout: None,
                        };
                        self.connections.insert(handle, conn);
                        self.enqueue(handle);
                    }
                    Err(err) => {
                        tracing::debug!(%remote, cause = %err.cause, "handshake refused");
                        if let Some(transmit) = err.response {
                            io.respond(transmit);
                        }
                    }
                }
            }
            Some(DatagramEvent::Response(transmit)) => io.respond(transmit),
            None => {}
        }
    }

    fn connection_event(&mut self, handle: ConnectionHandle, event: ConnectionEvent) {
        if let Some(conn) = self.connections.get_mut(&handle) {
            conn.inner.handle_event(event);
            self.enqueue(handle);
        }
    }

    /// Runs the timers that are due, and finds the next one. A scan of
    /// every connection: it runs only when the earliest known deadline
    /// passes, and a busy connection's earliest timer (loss detection, at
    /// least max_ack_delay + 1 ms away) keeps moving later, so scans come at
    /// most every few tens of milliseconds: under 1% of a core at 10,000
    /// connections. A timer wheel would make it O(1) per change.
    fn timers(&mut self, now: Instant) {
        let mut due = Vec::new();
        let mut next: Option<Instant> = None;
        for (handle, conn) in &mut self.connections {
            match conn.timeout {
                Some(at) if at <= now => {
                    conn.inner.handle_timeout(now);
                    due.push(*handle);
                }
                Some(at) => next = Some(next.map_or(at, |n| n.min(at))),
                None => {}
            }
        }
        self.next_timeout = next;
        for handle in due {
            self.enqueue(handle);
        }
    }

    /// A reply that waited: onto its stream, which may now go on.
    fn answer(&mut self, deferred: Deferred) {
        let Some(conn) = self.connections.get_mut(&deferred.connection) else { return };
        if conn.serial != deferred.serial {
            // Its connection is gone; the handle is another's now.
            return;
        }
        conn.waiting = conn.waiting.saturating_sub(1);
        let Some(stream) = conn.streams.get_mut(&deferred.stream) else { return };
        stream.waiting = stream.waiting.saturating_sub(1);
        if deferred.admin {
            stream.admin = false;
        }
        if let Err(err) = cachet_proto::encode(deferred.id, &deferred.reply, &mut stream.output) {
            tracing::error!(%err, "cannot encode a reply");
            stream.fatal = true;
        }
        self.enqueue(deferred.connection);
    }

    /// Stops taking work: no new connections, no more frames read.
    fn stop(&mut self) {
        self.stopping = true;
        let handles: Vec<_> = self.connections.keys().copied().collect();
        for handle in handles {
            self.enqueue(handle);
        }
    }

    fn close_all(&mut self, now: Instant) {
        for conn in self.connections.values_mut() {
            conn.inner.close(now, 0u32.into(), Bytes::from_static(b"node shutting down"));
        }
        let handles: Vec<_> = self.connections.keys().copied().collect();
        for handle in handles {
            self.enqueue(handle);
        }
    }

    /// Drives every queued connection once.
    fn drive_queued(&mut self, io: &mut Io) {
        while !self.queue.is_empty() {
            for handle in std::mem::take(&mut self.queue) {
                self.drive(handle, io);
            }
        }
    }

    /// Handles a connection's events, serves its streams, passes its
    /// endpoint events on and sends what it has to send.
    fn drive(&mut self, handle: ConnectionHandle, io: &mut Io) {
        let Some(conn) = self.connections.get_mut(&handle) else { return };
        let now = Instant::now();
        conn.queued = false;
        let mut touched = std::mem::take(&mut self.touched);
        touched.clear();
        while let Some(event) = conn.inner.poll() {
            match event {
                Event::Stream(StreamEvent::Opened { dir: Dir::Bi }) => {
                    while let Some(id) = conn.inner.streams().accept(Dir::Bi) {
                        conn.streams.insert(id, Stream::default());
                        touched.push(id);
                    }
                }
                Event::Stream(StreamEvent::Readable { id } | StreamEvent::Writable { id }) => touched.push(id),
                Event::Stream(StreamEvent::Stopped { id, .. }) => {
                    // The client will read no more replies on it.
                    if let Some(stream) = conn.streams.get_mut(&id) {
                        stream.output.clear();
                        stream.ended = true;
                        stream.fatal = true;
                        touched.push(id);
                    }
                }
                Event::Connected => conn.counted = Some(self.node.connection()),
                Event::ConnectionLost { reason } => {
                    tracing::debug!(remote = %conn.inner.remote_address(), %reason, "connection ended");
                    // Its place under the cap is free now, not when its
                    // state is finally drained.
                    conn.counted = None;
                    conn.permit = None;
                }
                _ => {}
            }
        }
        // Streams with work left over from an earlier turn (replies that
        // waited for room or a load, frames beyond the turn's budget) are
        // served on every turn too.
        for (id, stream) in &conn.streams {
            if !stream.output.is_empty() || !stream.input.is_empty() || stream.ended || stream.fatal || self.stopping {
                touched.push(*id);
            }
        }
        touched.sort_unstable();
        touched.dedup();
        let mut more = false;
        for &id in &touched {
            let turn = Turn {
                node: &self.node,
                deferred: &self.deferred,
                limits: &self.limits,
                handle,
                serial: conn.serial,
                remote: conn.inner.remote_address(),
                stopping: self.stopping,
            };
            more |= turn.serve(conn, id);
        }
        self.touched = touched;
        if more {
            self.again.push(handle);
        }
        if !conn.cut {
            let queued: usize = conn.streams.values().map(|stream| stream.output.len()).sum();
            if queued > self.limits.max_output {
                // Its client asks and does not read: what it asked for
                // goes, and so does it.
                conn.cut = true;
                for stream in conn.streams.values_mut() {
                    stream.output = BytesMut::new();
                    stream.input = BytesMut::new();
                }
                let reason = format!("over the output limit: {queued} bytes of replies not read");
                conn.inner.close(now, 1u32.into(), Bytes::from(reason));
                let clients = self.node.clients();
                clients.count(Cutoff::OutputLimit);
                if let Some(held_back) = clients.refusal_log.check(self.node.now_ms()) {
                    tracing::info!(remote = %conn.inner.remote_address(), queued, held_back, "QUIC client cut off");
                }
            }
        }
        let mut drained = false;
        while let Some(event) = conn.inner.poll_endpoint_events() {
            drained |= event.is_drained();
            if let Some(event) = self.endpoint.handle_event(handle, event) {
                conn.inner.handle_event(event);
            }
        }
        if io.unsent.is_some() {
            // The socket is full: send nothing more (quinn-proto would
            // count it as sent) until it has room.
            self.blocked.push(handle);
        } else {
            // quinn-udp may lower its segment count after a failed send.
            let segments = io.state.max_gso_segments().clamp(1, MAX_SEGMENTS);
            loop {
                io.buf.clear();
                let Some(transmit) = conn.inner.poll_transmit(now, segments, &mut io.buf) else { break };
                if !io.send(transmit) {
                    self.blocked.push(handle);
                    break;
                }
            }
        }
        conn.timeout = conn.inner.poll_timeout();
        if let Some(at) = conn.timeout {
            self.next_timeout = Some(self.next_timeout.map_or(at, |n| n.min(at)));
        }
        if drained || conn.inner.is_drained() {
            self.connections.remove(&handle);
        }
    }
}

/// What serving a stream needs from the loop.
struct Turn<'a> {
    node: &'a Arc<Node>,
    deferred: &'a mpsc::UnboundedSender<Deferred>,
    limits: &'a Limits,
    handle: ConnectionHandle,
    serial: u64,
    /// The client's address: admin attempts are throttled per address.
    remote: std::net::SocketAddr,
    stopping: bool,
}

impl Turn<'_> {
    /// Serves one stream as far as it can go this turn: writes pending
    /// replies, executes complete frames, reads more while nothing holds it
    /// back, and closes it once the client is done (or the stream failed)
    /// and every reply is out. True if frames are left for another turn.
    fn serve(&self, conn: &mut Conn, id: StreamId) -> bool {
        let Some(stream) = conn.streams.get_mut(&id) else { return false };
        let mut budget = FRAMES_PER_TURN;
        loop {
            if !write_out(&mut conn.inner, id, stream) {
                // No room: the client is not reading. A Writable event
                // brings the stream back.
                return false;
            }
            if stream.fatal {
                break;
            }
            if conn.cut {
                break;
            }
            self.execute(id, stream, &mut conn.waiting, &mut budget);
            if !stream.output.is_empty() {
                continue;
            }
            if budget == 0 {
                return true;
            }
            if stream.ended
                || self.stopping
                || stream.admin
                || stream.waiting >= MAX_WAITING
                || conn.waiting >= MAX_WAITING_PER_CONNECTION
            {
                break;
            }
            // Everything read was answered: read more, if there is any.
            let before = stream.input.len();
            read_in(&mut conn.inner, id, stream);
            if stream.input.len() == before {
                break;
            }
        }
        if stream.fatal {
            // Unread requests are dropped: tell the client to stop sending.
            // (Once only; later calls fail harmlessly.)
            let _ = conn.inner.recv_stream(id).stop(0u32.into());
        }
        let done = stream.ended || stream.fatal || self.stopping;
        // Requests still waiting keep the stream (and so the client's
        // stream credit) until they answer.
        if done && stream.waiting == 0 && stream.output.is_empty() {
            if !stream.fatal && !stream.ended {
                // Stopping: the client's unsent requests will not be read.
                let _ = conn.inner.recv_stream(id).stop(0u32.into());
            }
            let _ = conn.inner.send_stream(id).finish();
            conn.streams.remove(&id);
        }
        false
    }

    /// Executes complete frames in the stream's input until its replies
    /// reach [`FLUSH_AT`], too many wait, an admin command must finish
    /// first, or the turn's budget is spent.
    fn execute(&self, id: StreamId, stream: &mut Stream, conn_waiting: &mut usize, budget: &mut usize) {
        let node = self.node;
        while stream.output.len() < FLUSH_AT
            && stream.waiting < MAX_WAITING
            && *conn_waiting < MAX_WAITING_PER_CONNECTION
            && !stream.admin
            && *budget > 0
        {
            let (request_id, reply) = match cachet_proto::decode::<Request>(&mut stream.input, self.limits.max_frame) {
                Ok(Decoded::Frame(envelope)) => {
                    *budget -= 1;
                    let span = tracing::debug_span!("request", id = envelope.id, command = envelope.body.name());
                    // An admin command holds the frames after it until it
                    // is done (it may swap the policy they run under).
                    let admin = matches!(envelope.body, Request::Admin { .. });
                    let source = Some(self.remote.ip());
                    let later = match span.in_scope(|| node.dispatch_from(envelope.body, envelope.consistency, source))
                    {
                        Routed::Now(reply) => Ok(reply),
                        Routed::Later(later) => Err(later),
                    };
                    let admin = admin && later.is_err();
                    match later {
                        Ok(reply) => (envelope.id, reply),
                        // Loads, and writes to an origin, may take a while:
                        // they answer when done (replies carry their id) and
                        // the stream goes on meanwhile. An admin command
                        // holds the frames after it.
                        Err(later) => {
                            stream.waiting += 1;
                            *conn_waiting += 1;
                            stream.admin |= admin;
                            let (tx, request_id) = (self.deferred.clone(), envelope.id);
                            let (connection, serial) = (self.handle, self.serial);
                            tokio::spawn(async move {
                                // A panicking load still gets its request
                                // an answer.
                                let reply = match tokio::spawn(later).await {
                                    Ok(reply) => reply,
                                    Err(err) => error(ErrorCode::Internal, format!("the request failed: {err}")),
                                };
                                let _ =
                                    tx.send(Deferred { connection, serial, stream: id, id: request_id, reply, admin });
                            });
                            continue;
                        }
                    }
                }
                Ok(Decoded::Incomplete { .. }) => return,
                Err(err @ FrameError::TooLarge { .. }) => {
                    stream.fatal = true;
                    stream.input.clear();
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
            if let Err(err) = cachet_proto::encode(request_id, &reply, &mut stream.output) {
                tracing::error!(%err, "cannot encode a reply");
                stream.fatal = true;
            }
            if stream.fatal {
                return;
            }
        }
    }
}

/// Hands the stream's replies to the connection; false if some are left
/// for lack of room.
fn write_out(connection: &mut quinn_proto::Connection, id: StreamId, stream: &mut Stream) -> bool {
    while !stream.output.is_empty() {
        match connection.send_stream(id).write(&stream.output) {
            Ok(written) => {
                let _ = stream.output.split_to(written);
            }
            Err(WriteError::Blocked) => return false,
            Err(WriteError::Stopped(_) | WriteError::ClosedStream) => {
                stream.output.clear();
                stream.ended = true;
                stream.fatal = true;
            }
        }
    }
    true
}

/// Reads what the client sent on the stream (bounded by the stream's
/// receive window).
fn read_in(connection: &mut quinn_proto::Connection, id: StreamId, stream: &mut Stream) {
    let mut recv = connection.recv_stream(id);
    let mut chunks = match recv.read(true) {
        Ok(chunks) => chunks,
        Err(ReadableError::ClosedStream | ReadableError::IllegalOrderedRead) => {
            stream.ended = true;
            return;
        }
    };
    loop {
        match chunks.next(usize::MAX) {
            Ok(Some(chunk)) => stream.input.extend_from_slice(&chunk.bytes),
            Ok(None) => {
                stream.ended = true;
                break;
            }
            Err(ReadError::Blocked) => break,
            Err(ReadError::Reset(_)) => {
                stream.ended = true;
                stream.input.clear();
                break;
            }
        }
    }
    // Whether the window update needs sending is for poll_transmit to see.
    let _ = chunks.finalize();
}
