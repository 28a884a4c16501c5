//! How cheap can a request over QUIC be on this machine? Two floors, each
//! leaving out everything a node adds:
//!
//! - `exchange`: a quinn-proto client and server connection in one
//!   process, passing datagrams in memory. One GET and its reply per
//!   exchange on one long-lived stream, no sockets, no runtime. It prints
//!   the CPU time each side spends in quinn-proto (and the TLS record
//!   protection it calls) per exchange, and apart from it the server's
//!   cache work: decoding the frame, executing it on a node holding 100,000
//!   keys of 100 bytes (S3-FIFO, as in the comparison) and encoding the
//!   reply.
//! - `udp-server ADDR [--sendmmsg]` / `udp-client ADDR`: a server that
//!   answers each datagram with one of a reply's size, and no QUIC at all,
//!   through the socket calls a quinn endpoint makes (quinn-udp's batched
//!   receive, one send per datagram) or, with `--sendmmsg`, the cheapest
//!   there are (every reply of a batch in one `sendmmsg`). The client keeps
//!   one datagram in flight on each of its sockets, like `cachet bench` at
//!   pipeline 1, and reports the rate and the server's CPU per request.
//!
//! A QUIC server cannot spend less than the sum per request; `cargo xtask
//! bench-compare` runs both next to the comparison with redis-server.

use anyhow::{Context, Result, anyhow, bail};
use bytes::{Bytes, BytesMut};
use quinn_proto::{
    ClientConfig, Connection, ConnectionHandle, DatagramEvent, Dir, Endpoint, EndpointConfig, Event, ServerConfig,
    StreamEvent, StreamId,
};
use std::io::IoSliceMut;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Value size of the GET reply, as in the comparison's workload.
const VALUE: usize = 100;

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let flag = |name: &str| args.iter().position(|a| a == name).and_then(|i| args.get(i + 1));
    match args.first().map(String::as_str) {
        Some("exchange") => {
            let requests = flag("--requests").map(|n| n.parse()).transpose()?.unwrap_or(200_000);
            exchange(requests)
        }
        Some("udp-server") => {
            udp_server(args.get(1).context("udp-server ADDR")?.parse()?, args.iter().any(|a| a == "--sendmmsg"))
        }
        Some("udp-client") => {
            let addr: SocketAddr = args.get(1).context("udp-client ADDR")?.parse()?;
            let sockets = flag("--connections").map(|n| n.parse()).transpose()?.unwrap_or(50);
            let seconds: f64 = flag("--duration").map(|n| n.parse()).transpose()?.unwrap_or(5.0);
            let server_pid = flag("--server-pid").map(|n| n.parse()).transpose()?;
            udp_client(addr, sockets, Duration::from_secs_f64(seconds), server_pid)
        }
        _ => bail!(
            "usage: quic_floor exchange [--requests N] | udp-server ADDR | udp-client ADDR [--connections N] [--duration S] [--server-pid P]"
        ),
    }
}

/// The request and reply frames of a GET, as the node's protocol encodes
/// them, for the UDP floor's datagram sizes.
fn frames() -> Result<(Bytes, Bytes)> {
    let mut request = BytesMut::new();
    cachet_proto::encode(1, &cachet_proto::Request::Get { key: Bytes::from_static(b"key:0000042") }, &mut request)?;
    let mut reply = BytesMut::new();
    cachet_proto::encode(1, &cachet_proto::Response::Value(Some(Bytes::from(vec![b'v'; VALUE]))), &mut reply)?;
    Ok((request.freeze(), reply.freeze()))
}

/// One side of the in-memory pair: its endpoint, its one connection and
/// the CPU time spent in its calls.
struct Side {
    endpoint: Endpoint,
    addr: SocketAddr,
    connection: Option<(ConnectionHandle, Connection)>,
    busy: Duration,
    sent: u64,
}

impl Side {
    fn new(server: Option<ServerConfig>, addr: SocketAddr) -> Self {
        let endpoint = Endpoint::new(Arc::new(EndpointConfig::default()), server.map(Arc::new), true, None);
        Self { endpoint, addr, connection: None, busy: Duration::ZERO, sent: 0 }
    }

    fn connection(&mut self) -> Result<&mut Connection> {
        self.connection.as_mut().map(|(_, c)| c).ok_or_else(|| anyhow!("no connection yet"))
    }

    /// Takes one datagram from the peer, as an endpoint driver would.
    fn receive(&mut self, from: SocketAddr, datagram: &[u8], replies: &mut Vec<Vec<u8>>) -> Result<()> {
        let started = Instant::now();
        let now = started;
        let mut buf = Vec::new();
        match self.endpoint.handle(now, from, None, None, BytesMut::from(datagram), &mut buf) {
            Some(DatagramEvent::NewConnection(incoming)) => {
                let (handle, connection) = self
                    .endpoint
                    .accept(incoming, now, &mut buf, None)
                    .map_err(|e| anyhow!("accept: {:?}", e.cause))?;
                self.connection = Some((handle, connection));
            }
            Some(DatagramEvent::ConnectionEvent(_, event)) => self.connection()?.handle_event(event),
            Some(DatagramEvent::Response(transmit)) => replies.push(buf[..transmit.size].to_vec()),
            None => {}
        }
        self.busy += started.elapsed();
        Ok(())
    }

    /// Runs timers and endpoint events, and collects what the connection
    /// wants to send.
    fn transmit(&mut self, out: &mut Vec<Vec<u8>>) {
        let started = Instant::now();
        let Some((handle, connection)) = self.connection.as_mut() else { return };
        if connection.poll_timeout().is_some_and(|at| at <= started) {
            connection.handle_timeout(started);
        }
        while let Some(event) = connection.poll_endpoint_events() {
            if let Some(event) = self.endpoint.handle_event(*handle, event) {
                connection.handle_event(event);
            }
        }
        let mut buf = Vec::with_capacity(1500);
        while let Some(transmit) = connection.poll_transmit(started, 1, &mut buf) {
            out.push(buf[..transmit.size].to_vec());
            buf.clear();
            self.sent += 1;
        }
        self.busy += started.elapsed();
    }
}

/// Moves datagrams both ways until neither side has anything to send.
fn pump(client: &mut Side, server: &mut Side) -> Result<()> {
    loop {
        let (mut to_server, mut to_client) = (Vec::new(), Vec::new());
        client.transmit(&mut to_server);
        for datagram in &to_server {
            server.receive(client.addr, datagram, &mut to_client)?;
        }
        server.transmit(&mut to_client);
        for datagram in &to_client {
            client.receive(server.addr, datagram, &mut Vec::new())?;
        }
        if to_server.is_empty() && to_client.is_empty() {
            return Ok(());
        }
    }
}

/// Appends everything readable on `stream` to `into`.
fn drain(connection: &mut Connection, stream: StreamId, into: &mut BytesMut) -> Result<()> {
    let mut recv = connection.recv_stream(stream);
    let mut chunks = recv.read(true).map_err(|e| anyhow!("read: {e:?}"))?;
    while let Ok(Some(chunk)) = chunks.next(usize::MAX) {
        into.extend_from_slice(&chunk.bytes);
    }
    let _ = chunks.finalize();
    Ok(())
}

/// A node like the comparison's (one shard, S3-FIFO as Wasm) holding
/// `keys` keys of [`VALUE`] bytes.
fn node(keys: u64) -> Result<Arc<cachet::node::Node>> {
    use cachet::policies::{PolicySpec, resolve};
    let engine = cachet::wasm::PolicyEngine::new()?;
    let policy = resolve(&engine, &PolicySpec { name_or_path: "s3fifo".into(), ..PolicySpec::default() })?;
    let config = cachet::node::NodeConfig { max_entries: 2_000_000, max_bytes: 1 << 30, ..Default::default() };
    let node = Arc::new(cachet::node::Node::new(config, policy)?);
    for i in 0..keys {
        let set = cachet_proto::Request::Set {
            key: Bytes::from(format!("key:{i}")),
            value: Bytes::from(vec![b'v'; VALUE]),
            ttl_ms: None,
            condition: cachet_proto::Condition::Always,
            hint: 0,
        };
        if let cachet_proto::Response::Error(err) = node.execute(set) {
            bail!("preload: {err:?}");
        }
    }
    Ok(node)
}

fn tls_configs() -> Result<(ServerConfig, ClientConfig)> {
    let dir = std::env::temp_dir().join(format!("cachet-quic-floor-{}", std::process::id()));
    let server = cachet::server::tls::server_config(
        &cachet::server::tls::TlsSource::DevCa { data_dir: dir.clone() },
        cachet_proto::ALPN,
    )?;
    let client = cachet_client::ClientConfig::new("127.0.0.1:1".parse()?).with_data_dir(&dir)?.quinn_config()?;
    let _ = std::fs::remove_dir_all(&dir);
    Ok((server, client))
}

fn exchange(requests: u64) -> Result<()> {
    const KEYS: u64 = 100_000;
    let (server_config, client_config) = tls_configs()?;
    let node = node(KEYS)?;
    let mut server = Side::new(Some(server_config), "127.0.0.1:4433".parse()?);
    let mut client = Side::new(None, "127.0.0.1:50000".parse()?);
    let (handle, connection) = client.endpoint.connect(Instant::now(), client_config, server.addr, "localhost")?;
    client.connection = Some((handle, connection));
    // Handshake, then one stream carried through the whole run.
    pump(&mut client, &mut server)?;
    let stream = client.connection()?.streams().open(Dir::Bi).context("open a stream")?;
    let mut server_stream = None;
    let rounds = 5;
    let (mut server_us, mut client_us, mut cache_us, mut datagrams) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let (mut request, mut input, mut output, mut reply) =
        (BytesMut::new(), BytesMut::new(), BytesMut::new(), BytesMut::new());
    let mut cache = Duration::ZERO;
    let mut rng = 0x9e37_79b9_7f4a_7c15u64;
    for round in 0..=rounds {
        let (server_before, client_before, cache_before) = (server.busy, client.busy, cache);
        let sent_before = client.sent + server.sent;
        for id in 0..requests {
            let started = Instant::now();
            rng = rng.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1_442_695_040_888_963_407);
            let key = Bytes::from(format!("key:{}", (rng >> 33) % KEYS));
            request.clear();
            cachet_proto::encode(id, &cachet_proto::Request::Get { key }, &mut request)?;
            client.connection()?.send_stream(stream).write(&request).map_err(|e| anyhow!("write: {e:?}"))?;
            client.busy += started.elapsed();
            let mut to_server = Vec::new();
            client.transmit(&mut to_server);
            let mut to_client = Vec::new();
            for datagram in &to_server {
                server.receive(client.addr, datagram, &mut to_client)?;
            }
            // The server: find the stream and read the request ...
            let started = Instant::now();
            let connection = server.connection()?;
            while let Some(event) = connection.poll() {
                if let Event::Stream(StreamEvent::Opened { dir: Dir::Bi }) = event {
                    server_stream = connection.streams().accept(Dir::Bi);
                }
            }
            let id = server_stream.context("the request opened no stream")?;
            drain(connection, id, &mut input)?;
            server.busy += started.elapsed();
            // ... do the cache's work ...
            let started = Instant::now();
            match cachet_proto::decode::<cachet_proto::Request>(&mut input, 1 << 20)? {
                cachet_proto::Decoded::Frame(envelope) => {
                    let answer = node.execute(envelope.body);
                    if !matches!(answer, cachet_proto::Response::Value(Some(_))) {
                        bail!("a GET of a preloaded key answered {answer:?}");
                    }
                    cachet_proto::encode(envelope.id, &answer, &mut output)?;
                }
                cachet_proto::Decoded::Incomplete { .. } => bail!("the server read part of a request"),
            }
            cache += started.elapsed();
            // ... and answer.
            let started = Instant::now();
            let connection = server.connection()?;
            connection.send_stream(id).write(&output).map_err(|e| anyhow!("reply: {e:?}"))?;
            let reply_len = output.len();
            output.clear();
            server.busy += started.elapsed();
            server.transmit(&mut to_client);
            for datagram in &to_client {
                client.receive(server.addr, datagram, &mut Vec::new())?;
            }
            let started = Instant::now();
            let connection = client.connection()?;
            while connection.poll().is_some() {}
            drain(connection, stream, &mut reply)?;
            client.busy += started.elapsed();
            if reply.len() != reply_len {
                bail!("the client read {} bytes of a {reply_len}-byte reply", reply.len());
            }
            reply.clear();
        }
        // Round 0 warms up.
        if round > 0 {
            let per = |d: Duration| d.as_secs_f64() * 1e6 / requests as f64;
            server_us.push(per(server.busy - server_before));
            client_us.push(per(client.busy - client_before));
            cache_us.push(per(cache - cache_before));
            datagrams.push((client.sent + server.sent - sent_before) as f64 / requests as f64);
        }
    }
    // Each figure comes from clock reads around the calls (four pairs a
    // request for the server's QUIC work, four for the client's, one for
    // the cache work); their own cost is taken off.
    let pair = clock_pair_us();
    let median = |v: &mut Vec<f64>, pairs: f64| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2] - pairs * pair
    };
    println!(
        "{{\"requests\":{requests},\"rounds\":{rounds},\"server_us_per_request\":{:.3},\"cache_us_per_request\":{:.3},\"client_us_per_request\":{:.3},\"datagrams_per_request\":{:.2},\"clock_pair_us\":{pair:.3}}}",
        median(&mut server_us, 4.0),
        median(&mut cache_us, 1.0),
        median(&mut client_us, 4.0),
        median(&mut datagrams, 0.0)
    );
    Ok(())
}

/// What one `Instant::now()` and `elapsed()` cost, in microseconds.
fn clock_pair_us() -> f64 {
    let rounds = 1_000_000;
    let started = Instant::now();
    let mut sum = Duration::ZERO;
    for _ in 0..rounds {
        sum += std::hint::black_box(Instant::now()).elapsed();
    }
    std::hint::black_box(sum);
    started.elapsed().as_secs_f64() * 1e6 / rounds as f64
}

/// Answers every datagram with one of a GET reply's size, through the
/// calls quinn makes: quinn-udp's batched receive and one send each.
fn udp_server(addr: SocketAddr, batched: bool) -> Result<()> {
    if batched {
        return udp_server_batched(addr);
    }
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    runtime.block_on(async move {
        let socket = tokio::net::UdpSocket::bind(addr).await?;
        let state = quinn_udp::UdpSocketState::new((&socket).into())?;
        // A reply the size of a GET reply in a QUIC packet: the frame
        // plus a short header and the AEAD tag.
        let reply = vec![b'r'; frames()?.1.len() + 30];
        let mut storage = vec![[0u8; 2048]; quinn_udp::BATCH_SIZE];
        let mut meta = vec![quinn_udp::RecvMeta::default(); quinn_udp::BATCH_SIZE];
        loop {
            socket.readable().await?;
            let mut bufs: Vec<IoSliceMut> = storage.iter_mut().map(|b| IoSliceMut::new(b)).collect();
            let count = match socket
                .try_io(tokio::io::Interest::READABLE, || state.recv((&socket).into(), &mut bufs, &mut meta))
            {
                Ok(count) => count,
                Err(err) if err.kind() == std::io::ErrorKind::WouldBlock => continue,
                Err(err) => return Err(err.into()),
            };
            for from in meta.iter().take(count).map(|m| m.addr) {
                let transmit = quinn_udp::Transmit {
                    destination: from,
                    ecn: None,
                    contents: &reply,
                    segment_size: None,
                    src_ip: None,
                };
                loop {
                    match socket.try_io(tokio::io::Interest::WRITABLE, || state.send((&socket).into(), &transmit)) {
                        Ok(()) => break,
                        Err(err) if err.kind() == std::io::ErrorKind::WouldBlock => socket.writable().await?,
                        Err(err) => return Err(err.into()),
                    }
                }
            }
        }
    })
}

/// The cheapest server there is: a blocking socket, one `recvmmsg` that
/// waits for the first datagram and takes whatever else is queued, and
/// one `sendmmsg` for all the replies. No runtime, no readiness polling.
fn udp_server_batched(addr: SocketAddr) -> Result<()> {
    use std::os::fd::AsRawFd;
    const BATCH: usize = 64;
    let socket = std::net::UdpSocket::bind(addr)?;
    let fd = socket.as_raw_fd();
    let reply = vec![b'r'; frames()?.1.len() + 30];
    let mut storage = vec![[0u8; 2048]; BATCH];
    // SAFETY: zeroed sockaddr_storage values are valid (empty) addresses.
    let mut from: Vec<libc::sockaddr_storage> = (0..BATCH).map(|_| unsafe { std::mem::zeroed() }).collect();
    let mut iovecs: Vec<libc::iovec> = storage
        .iter_mut()
        .map(|b| libc::iovec { iov_base: b.as_mut_ptr() as *mut libc::c_void, iov_len: b.len() })
        .collect();
    let mut reply_iov = libc::iovec { iov_base: reply.as_ptr() as *mut libc::c_void, iov_len: reply.len() };
    let reply_iov: *mut libc::iovec = &raw mut reply_iov;
    loop {
        let mut messages: Vec<libc::mmsghdr> = (0..BATCH)
            .map(|i| {
                // SAFETY: a zeroed msghdr is a valid empty header; the
                // fields set point at buffers that outlive the calls.
                let mut header: libc::msghdr = unsafe { std::mem::zeroed() };
                header.msg_name = (&raw mut from[i]) as *mut libc::c_void;
                header.msg_namelen = size_of::<libc::sockaddr_storage>() as libc::socklen_t;
                header.msg_iov = &raw mut iovecs[i];
                header.msg_iovlen = 1;
                libc::mmsghdr { msg_hdr: header, msg_len: 0 }
            })
            .collect();
        // SAFETY: BATCH initialised headers whose buffers stay alive.
        let count = unsafe {
            libc::recvmmsg(fd, messages.as_mut_ptr(), BATCH as u32, libc::MSG_WAITFORONE, std::ptr::null_mut())
        };
        if count <= 0 {
            continue;
        }
        // The same headers answer: each keeps its sender's address and
        // now points at the reply.
        let count = count as usize;
        for message in &mut messages[..count] {
            message.msg_hdr.msg_iov = reply_iov;
        }
        let mut sent = 0;
        while sent < count {
            // SAFETY: as above; the kernel only reads the headers.
            let n = unsafe { libc::sendmmsg(fd, messages[sent..].as_mut_ptr(), (count - sent) as u32, 0) };
            if n <= 0 {
                break;
            }
            sent += n as usize;
        }
    }
}

/// Keeps one request in flight on each of `sockets` sockets for `duration`.
fn udp_client(addr: SocketAddr, sockets: usize, duration: Duration, server_pid: Option<u32>) -> Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    runtime.block_on(async move {
        let request = frames()?.0;
        let mut loops = Vec::new();
        let cpu_before = server_pid.and_then(cachet::bench::process_cpu_us);
        let started = Instant::now();
        for _ in 0..sockets {
            let socket = tokio::net::UdpSocket::bind("127.0.0.1:0").await?;
            socket.connect(addr).await?;
            let request = request.clone();
            loops.push(tokio::spawn(async move {
                let mut buf = [0u8; 2048];
                let mut done = 0u64;
                while started.elapsed() < duration {
                    socket.send(&request).await?;
                    // A lost datagram would stall this loop: give up on it.
                    match tokio::time::timeout(Duration::from_millis(200), socket.recv(&mut buf)).await {
                        Ok(received) => {
                            received?;
                            done += 1;
                        }
                        Err(_) => continue,
                    }
                }
                Ok::<u64, std::io::Error>(done)
            }));
        }
        let mut total = 0;
        for handle in loops {
            total += handle.await??;
        }
        let elapsed = started.elapsed().as_secs_f64();
        let cpu = cpu_before
            .zip(server_pid.and_then(cachet::bench::process_cpu_us))
            .map(|(a, b)| (b - a) as f64 / total as f64);
        println!(
            "{{\"ops\":{total},\"ops_per_sec\":{:.0},\"server_cpu_us_per_op\":{}}}",
            total as f64 / elapsed,
            cpu.map_or("null".to_string(), |c| format!("{c:.3}"))
        );
        Ok(())
    })
}
