//! Cachet client SDK.
//!
//! One QUIC connection (TLS 1.3, ALPN `cachet/1`) carries a few long-lived
//! bidirectional streams ("lanes"); requests are pipelined on them with ids,
//! and each lane writes whatever requests are queued in one write. Values
//! larger than [`ClientConfig::large_value`] travel on a stream of their own
//! so they never hold up small requests. Every request has a timeout, and a
//! broken connection is replaced on the next request.
//!
//! ```no_run
//! # async fn demo() -> Result<(), cachet_client::ClientError> {
//! use cachet_client::{Client, ClientConfig};
//! let config = ClientConfig::new("127.0.0.1:7070".parse().unwrap()).with_ca_file(".cachet/ca.pem".as_ref())?;
//! let client = Client::connect(config).await?;
//! client.set("user:1", "Ada").await?;
//! assert_eq!(client.get("user:1").await?.as_deref(), Some(&b"Ada"[..]));
//! # Ok(()) }
//! ```

#![warn(missing_docs)]

mod cluster;
mod lane;
mod reply;
mod single_flight;

pub use cluster::{ClusterClient, RetryPolicy};

pub use cachet_proto::{
    AdminCommand, ClusterStats, Condition, Consistency, ErrorCode, ErrorReply, HotKey, ModuleListing, NodeStats,
    PolicyListing, SentModule, ShadowListing, ShardListing, TtlChange, TtlState, key_hash,
};
pub use single_flight::LoadError;

use bytes::{Bytes, BytesMut};
use cachet_proto::{Request, Response};
use lane::Lane;
use reply::Failure;
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

/// Why a request failed.
#[derive(Clone, Debug, thiserror::Error)]
pub enum ClientError {
    /// Could not reach or handshake with the node.
    #[error("cannot connect to {addr}: {detail}")]
    Connect {
        /// The node.
        addr: SocketAddr,
        /// What failed.
        detail: String,
    },
    /// The TLS set-up (CA file) is unusable.
    #[error("TLS: {0}")]
    Tls(String),
    /// No reply within the timeout.
    #[error("no reply within {0:?}")]
    Timeout(Duration),
    /// The connection broke while the request was in flight.
    #[error("connection lost: {0}")]
    Connection(String),
    /// The node answered with an error.
    #[error("{}: {}", code_name(.0.code), .0.message)]
    Server(ErrorReply),
    /// The node answered with something that does not fit the request.
    #[error("unexpected reply: {0}")]
    Protocol(String),
    /// A setting in [`ClientConfig`] cannot be used.
    #[error("invalid client configuration: {0}")]
    Config(String),
}

fn code_name(code: ErrorCode) -> &'static str {
    match code {
        ErrorCode::TooLarge => "too large",
        ErrorCode::WrongType => "wrong type",
        ErrorCode::UnknownCommand => "unknown command",
        ErrorCode::BadFrame => "bad frame",
        ErrorCode::UnsupportedVersion => "unsupported version",
        ErrorCode::NotOwner => "not owner",
        ErrorCode::NotAllowed => "not allowed",
        ErrorCode::InvalidArgument => "invalid argument",
        ErrorCode::Internal => "internal error",
        ErrorCode::Unauthorized => "unauthorized",
        ErrorCode::NotFound => "not found",
        ErrorCode::Busy => "busy",
        ErrorCode::InvalidModule => "invalid module",
        ErrorCode::LoadFailed => "load failed",
        ErrorCode::OriginFailed => "origin failed",
        ErrorCode::Unavailable => "unavailable",
        ErrorCode::NotSupported => "not supported",
    }
}

/// How to reach a node.
#[derive(Clone, Debug)]
pub struct ClientConfig {
    /// The node's address.
    pub server: SocketAddr,
    /// Name checked against the node's certificate.
    pub server_name: String,
    /// PEM file of the CA that signed the node's certificate.
    pub ca_file: Option<PathBuf>,
    /// Per-request timeout.
    pub timeout: Duration,
    /// Long-lived streams to pipeline requests on. Keep it below the node's
    /// stream limit (64 by default): large requests open streams of their
    /// own on top of these.
    pub lanes: usize,
    /// Requests whose frame is larger than this get a stream of their own.
    pub large_value: usize,
    /// Client certificate and key (PEM) for nodes that require mutual TLS.
    pub identity: Option<(PathBuf, PathBuf)>,
    /// A node silent for this long is taken for dead. A node that crashed or
    /// lost its network sends nothing, not even a close, so without this the
    /// requests in flight to it would each wait out [`Self::timeout`]; with
    /// it the connection closes, they fail at once with
    /// [`ClientError::Connection`] (which a [`ClusterClient`] retries on
    /// another member), and the next request reconnects. The client pings
    /// every third of it, so a live but idle node is never mistaken for a
    /// dead one (as long as the node's `--idle-timeout` is not shorter than
    /// that). Both ends use the smaller of this and the node's
    /// `--idle-timeout`. Zero turns the pings off and leaves quinn's default
    /// idle timeout (30 s), or the node's if shorter; otherwise it must be
    /// at least 1 ms.
    pub dead_after: Duration,
}

impl ClientConfig {
    /// Defaults for `server`: name `localhost`, 5 s timeout, 4 lanes, a
    /// node taken for dead after 2 s of silence.
    pub fn new(server: SocketAddr) -> Self {
        Self {
            server,
            server_name: "localhost".into(),
            ca_file: None,
            timeout: Duration::from_secs(5),
            lanes: 4,
            large_value: 64 << 10,
            identity: None,
            dead_after: Duration::from_secs(2),
        }
    }

    /// Presents the certificate in `cert` (with its key in `key`) to nodes
    /// that require client certificates.
    pub fn with_identity(mut self, cert: &Path, key: &Path) -> Self {
        self.identity = Some((cert.to_path_buf(), key.to_path_buf()));
        self
    }

    /// Trusts the CA in `path` (PEM).
    pub fn with_ca_file(mut self, path: &Path) -> Result<Self, ClientError> {
        if !path.is_file() {
            return Err(ClientError::Tls(format!(
                "CA file {} not found (start `cachet serve` with this data dir, or pass --ca)",
                path.display()
            )));
        }
        self.ca_file = Some(path.to_path_buf());
        Ok(self)
    }

    /// Trusts the development CA a node created in `data_dir`.
    pub fn with_data_dir(self, data_dir: &Path) -> Result<Self, ClientError> {
        self.with_ca_file(&data_dir.join("ca.pem"))
    }

    /// The quinn client configuration the SDK connects with (TLS 1.3 over
    /// ring, this config's CA and identity, the `cachet/1` ALPN), for an
    /// endpoint of one's own that must trust nodes the same way.
    pub fn quinn_config(&self) -> Result<quinn::ClientConfig, ClientError> {
        let transport = self.transport()?;
        let tls = |e: &dyn std::fmt::Display| ClientError::Tls(e.to_string());
        let mut roots = rustls::RootCertStore::empty();
        let path = self.ca_file.as_ref().ok_or_else(|| ClientError::Tls("no CA configured".into()))?;
        for cert in CertificateDer::pem_file_iter(path).map_err(|e| tls(&e))? {
            roots.add(cert.map_err(|e| tls(&e))?).map_err(|e| tls(&e))?;
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = rustls::ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| tls(&e))?
            .with_root_certificates(roots);
        let mut crypto = match &self.identity {
            None => builder.with_no_client_auth(),
            Some((cert, key)) => {
                let chain = CertificateDer::pem_file_iter(cert)
                    .map_err(|e| tls(&e))?
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(|e| tls(&e))?;
                let key = rustls_pki_types::PrivateKeyDer::from_pem_file(key).map_err(|e| tls(&e))?;
                builder.with_client_auth_cert(chain, key).map_err(|e| tls(&e))?
            }
        };
        crypto.alpn_protocols = vec![cachet_proto::ALPN.to_vec()];
        let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(crypto).map_err(|e| tls(&e))?;
        let mut config = quinn::ClientConfig::new(Arc::new(crypto));
        config.transport_config(Arc::new(transport));
        Ok(config)
    }

    /// The liveness check of [`Self::dead_after`] as QUIC settings.
    fn transport(&self) -> Result<quinn::TransportConfig, ClientError> {
        let mut transport = quinn::TransportConfig::default();
        if !self.dead_after.is_zero() {
            // The idle timeout counts whole milliseconds, and 0 would mean none.
            let bad = |why: &str| ClientError::Config(format!("dead_after {:?} is {why}", self.dead_after));
            if self.dead_after < Duration::from_millis(1) {
                return Err(bad("under 1 ms"));
            }
            let idle = quinn::IdleTimeout::try_from(self.dead_after).map_err(|_| bad("too long"))?;
            transport.max_idle_timeout(Some(idle));
            transport.keep_alive_interval(Some(self.dead_after / 3));
        }
        Ok(transport)
    }
}

/// Options of one write. What only some writes need (keep the key's TTL,
/// answer with the value replaced) has methods of its own:
/// [`Client::set_keep_ttl`], [`Client::set_get`].
#[derive(Clone, Copy, Debug, Default)]
pub struct SetOptions {
    /// Time to live.
    pub ttl: Option<Duration>,
    /// NX / XX.
    pub condition: Condition,
    /// Hint for the node's policy (cost or priority).
    pub hint: u32,
}

struct Connection {
    connection: quinn::Connection,
    lanes: Vec<Lane>,
}

/// A client of one node. Cheap to clone; clones share the connection.
#[derive(Clone)]
pub struct Client {
    inner: Arc<Inner>,
    /// Asked of a clustered node with every request; `None` takes the
    /// node's default.
    consistency: Option<Consistency>,
}

struct Inner {
    config: ClientConfig,
    /// TLS and transport settings for (re)connecting.
    quic: quinn::ClientConfig,
    endpoint: quinn::Endpoint,
    /// The endpoint is this client's alone (not shared through
    /// [`Client::connect_on`]).
    owned: bool,
    /// Reconnect when the connection broke; a [`ClusterClient`]'s members
    /// do not (the cluster client reconnects them in the background and
    /// meanwhile sends their requests elsewhere).
    reconnect: bool,
    connection: tokio::sync::Mutex<Option<Arc<Connection>>>,
    /// Connection attempts that failed: requests that queued behind an
    /// attempt take its failure rather than each making their own (a
    /// handshake with a dead node takes seconds to fail).
    connect_failures: AtomicU64,
    next_id: AtomicU64,
    next_lane: AtomicUsize,
    loads: single_flight::SingleFlight,
}

impl Client {
    /// Connects to the node in `config`, on an endpoint (a UDP socket) of
    /// its own.
    pub async fn connect(config: ClientConfig) -> Result<Self, ClientError> {
        let endpoint = Self::endpoint_for(config.server)?;
        Self::start(config, endpoint, true, true).await
    }

    /// A client that fails its requests once its connection broke instead
    /// of reconnecting, for a [`ClusterClient`] member.
    pub(crate) async fn connect_once(config: ClientConfig) -> Result<Self, ClientError> {
        let endpoint = Self::endpoint_for(config.server)?;
        Self::start(config, endpoint, true, false).await
    }

    /// Whether `self` and `other` are handles on the same client.
    pub(crate) fn same_as(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.inner, &other.inner)
    }

    /// A client endpoint (one UDP socket on an ephemeral port) able to reach
    /// `server`, for [`Client::connect_on`] to share between clients.
    pub fn endpoint_for(server: SocketAddr) -> Result<quinn::Endpoint, ClientError> {
        let bind: SocketAddr = if server.is_ipv6() { "[::]:0" } else { "0.0.0.0:0" }
            .parse()
            .map_err(|_| ClientError::Protocol("bad bind address".into()))?;
        quinn::Endpoint::client(bind).map_err(|e| ClientError::Connect { addr: server, detail: e.to_string() })
    }

    /// Connects to the node in `config` on `endpoint`, which other clients
    /// may share: many connections from one process then use one socket,
    /// and its receive calls take many connections' datagrams at once.
    /// Closing or dropping this client closes its connection only.
    pub async fn connect_on(endpoint: &quinn::Endpoint, config: ClientConfig) -> Result<Self, ClientError> {
        Self::start(config, endpoint.clone(), false, true).await
    }

    async fn start(
        config: ClientConfig,
        endpoint: quinn::Endpoint,
        owned: bool,
        reconnect: bool,
    ) -> Result<Self, ClientError> {
        let quic = config.quinn_config()?;
        let client = Self {
            inner: Arc::new(Inner {
                config,
                quic,
                endpoint,
                owned,
                reconnect,
                connection: tokio::sync::Mutex::new(None),
                connect_failures: AtomicU64::new(0),
                next_id: AtomicU64::new(1),
                next_lane: AtomicUsize::new(0),
                loads: single_flight::SingleFlight::default(),
            }),
            consistency: None,
        };
        client.connection().await?;
        Ok(client)
    }

    /// A handle on the same connection whose requests ask a clustered
    /// node for `level` (ONE, QUORUM or ALL replicas). A single node
    /// ignores it.
    pub fn at(&self, level: Consistency) -> Self {
        Self { inner: self.inner.clone(), consistency: Some(level) }
    }

    /// The live connection, reconnecting if the last one broke.
    async fn connection(&self) -> Result<Arc<Connection>, ClientError> {
        let failures = self.inner.connect_failures.load(Ordering::Acquire);
        let mut slot = self.inner.connection.lock().await;
        if let Some(conn) = slot.as_ref() {
            if conn.connection.close_reason().is_none() && conn.lanes.iter().all(Lane::is_open) {
                return Ok(conn.clone());
            }
            if !self.inner.reconnect {
                return Err(ClientError::Connection("the connection to the node is gone".into()));
            }
        }
        let config = &self.inner.config;
        if self.inner.connect_failures.load(Ordering::Acquire) != failures {
            return Err(ClientError::Connect {
                addr: config.server,
                detail: "the connection attempt this request waited for failed".into(),
            });
        }
        let result = self.open(&mut slot).await;
        if result.is_err() {
            self.inner.connect_failures.fetch_add(1, Ordering::AcqRel);
        }
        result
    }

    async fn open(&self, slot: &mut Option<Arc<Connection>>) -> Result<Arc<Connection>, ClientError> {
        let config = &self.inner.config;
        let connect = |e: &dyn std::fmt::Display| ClientError::Connect { addr: config.server, detail: e.to_string() };
        let connecting = self
            .inner
            .endpoint
            .connect_with(self.inner.quic.clone(), config.server, &config.server_name)
            .map_err(|e| connect(&e))?;
        let connection = tokio::time::timeout(config.timeout, connecting)
            .await
            .map_err(|_| ClientError::Timeout(config.timeout))?
            .map_err(|e| connect(&e))?;
        let mut lanes = Vec::with_capacity(config.lanes.max(1));
        for _ in 0..config.lanes.max(1) {
            let (send, recv) = connection.open_bi().await.map_err(|e| connect(&e))?;
            lanes.push(Lane::start(send, recv));
        }
        let conn = Arc::new(Connection { connection, lanes });
        *slot = Some(conn.clone());
        Ok(conn)
    }

    /// Closes the connection cleanly and, on an endpoint of its own, waits
    /// until the node has been told, so it stops counting this client at
    /// once. (A shared endpoint sends the close when its driver next runs.)
    pub async fn close(&self) {
        if let Some(conn) = self.inner.connection.lock().await.take() {
            conn.connection.close(0u32.into(), b"client closed");
        }
        if self.inner.owned {
            let _ = tokio::time::timeout(Duration::from_secs(1), self.inner.endpoint.wait_idle()).await;
        }
    }

    /// Sends one request and waits for its reply; the timeout covers
    /// reconnecting too.
    async fn call(&self, request: Request) -> Result<Response, ClientError> {
        self.exchange(request).await.map_err(|failure| failure.error)
    }

    /// [`Self::call`], telling on failure whether the request may have
    /// reached the node (for a [`ClusterClient`] deciding whether it may
    /// send it again elsewhere).
    pub(crate) async fn exchange(&self, request: Request) -> Result<Response, Failure> {
        let timeout = self.inner.config.timeout;
        let id = self.inner.next_id.fetch_add(1, Ordering::Relaxed);
        let mut frame = BytesMut::new();
        cachet_proto::encode_at(id, &request, self.consistency, &mut frame)
            .map_err(|e| Failure::unsent(ClientError::Protocol(e.to_string())))?;
        // Big frames (a large value, a long key list) get a stream of their
        // own: they never delay small requests, and if the node refuses one
        // (closing that stream) no other request shares its fate.
        // Admin commands (a swap can take a while) also go alone, so no
        // data request waits behind one on a shared lane.
        let large = frame.len() > self.inner.config.large_value || matches!(request, Request::Admin { .. });
        // Set once any of the frame may have left.
        let sent = AtomicBool::new(false);
        let exchange = async {
            let conn = self.connection().await?;
            if large {
                lane::one_shot(&conn.connection, frame, &sent).await
            } else {
                let lane = self.inner.next_lane.fetch_add(1, Ordering::Relaxed) % conn.lanes.len();
                conn.lanes[lane].call(id, frame, &sent).await
            }
        };
        let result = tokio::time::timeout(timeout, exchange).await.map_err(|_| ClientError::Timeout(timeout));
        let sent = sent.load(Ordering::Acquire);
        match result {
            Ok(Ok(Response::Error(err))) => Err(Failure { error: ClientError::Server(err), sent: true }),
            Ok(Ok(reply)) => Ok(reply),
            Ok(Err(error)) | Err(error) => Err(Failure { error, sent }),
        }
    }

    /// Reads `key`; `None` on a miss.
    pub async fn get(&self, key: impl AsRef<[u8]>) -> Result<Option<Bytes>, ClientError> {
        reply::value(self.call(Request::Get { key: reply::key(key) }).await?)
    }

    /// Stores `value` under `key` with no TTL.
    pub async fn set(&self, key: impl AsRef<[u8]>, value: impl Into<Bytes>) -> Result<(), ClientError> {
        self.set_with(key, value, SetOptions::default()).await.map(|_| ())
    }

    /// Stores `value` under `key`; returns whether the write applied (always
    /// true without a condition).
    pub async fn set_with(
        &self,
        key: impl AsRef<[u8]>,
        value: impl Into<Bytes>,
        options: SetOptions,
    ) -> Result<bool, ClientError> {
        reply::applied(self.call(reply::set(reply::key(key), value.into(), options, false, false)).await?)
    }

    /// Stores `value` under `key` and keeps the TTL the key has (`SET ...
    /// KEEPTTL`; none when the key is new); `options.ttl` is ignored.
    /// Returns whether the write applied (always true without a condition).
    pub async fn set_keep_ttl(
        &self,
        key: impl AsRef<[u8]>,
        value: impl Into<Bytes>,
        options: SetOptions,
    ) -> Result<bool, ClientError> {
        reply::applied(self.call(reply::set(reply::key(key), value.into(), options, true, false)).await?)
    }

    /// Stores `value` under `key` as [`Client::set_with`] does and returns
    /// the value it replaced (`SET ... GET`; `None` when there was none).
    /// With a condition, whether it applied follows from the answer: NX
    /// applied if it is `None`, XX if it is not.
    pub async fn set_get(
        &self,
        key: impl AsRef<[u8]>,
        value: impl Into<Bytes>,
        options: SetOptions,
    ) -> Result<Option<Bytes>, ClientError> {
        reply::value(self.call(reply::set(reply::key(key), value.into(), options, false, true)).await?)
    }

    /// [`Client::set_get`] keeping the TTL the key has (`SET ... KEEPTTL
    /// GET`); `options.ttl` is ignored.
    pub async fn set_get_keep_ttl(
        &self,
        key: impl AsRef<[u8]>,
        value: impl Into<Bytes>,
        options: SetOptions,
    ) -> Result<Option<Bytes>, ClientError> {
        reply::value(self.call(reply::set(reply::key(key), value.into(), options, true, true)).await?)
    }

    /// Deletes keys; returns how many existed.
    pub async fn delete<K: AsRef<[u8]>>(&self, keys: &[K]) -> Result<u64, ClientError> {
        reply::count(self.call(Request::Del { keys: reply::keys(keys) }).await?)
    }

    /// Counts how many of `keys` exist (a key named twice counts twice, as
    /// in Redis).
    pub async fn exists<K: AsRef<[u8]>>(&self, keys: &[K]) -> Result<u64, ClientError> {
        reply::count(self.call(Request::Exists { keys: reply::keys(keys) }).await?)
    }

    /// Reads several keys, in order.
    pub async fn mget<K: AsRef<[u8]>>(&self, keys: &[K]) -> Result<Vec<Option<Bytes>>, ClientError> {
        reply::values(self.call(Request::MGet { keys: reply::keys(keys) }).await?, keys.len())
    }

    /// Writes several keys (no TTL). A single node checks them all before
    /// storing any, and stores all or none; a clustered node stores each
    /// key on its owners, so a failure there may leave some stored (see
    /// [`ClusterClient::mset`]).
    pub async fn mset(&self, pairs: Vec<(Bytes, Bytes)>) -> Result<(), ClientError> {
        reply::ok(self.call(Request::MSet { pairs }).await?)
    }

    /// Adds `delta` to the integer at `key` (0 when absent); returns the
    /// result. A negative `delta` decrements (DECR, DECRBY).
    pub async fn incr(&self, key: impl AsRef<[u8]>, delta: i64) -> Result<i64, ClientError> {
        reply::integer(self.call(Request::Incr { key: reply::key(key), delta }).await?)
    }

    /// Appends `value` to the value at `key` (creating it when absent, with
    /// no TTL); returns the new length.
    pub async fn append(&self, key: impl AsRef<[u8]>, value: impl Into<Bytes>) -> Result<u64, ClientError> {
        reply::length(self.call(Request::Append { key: reply::key(key), value: value.into() }).await?)
    }

    /// The length of the value at `key`; 0 when absent.
    pub async fn strlen(&self, key: impl AsRef<[u8]>) -> Result<u64, ClientError> {
        reply::length(self.call(Request::Strlen { key: reply::key(key) }).await?)
    }

    /// Reads `key` and deletes it; `None` when it was absent.
    pub async fn getdel(&self, key: impl AsRef<[u8]>) -> Result<Option<Bytes>, ClientError> {
        reply::value(self.call(Request::GetDel { key: reply::key(key) }).await?)
    }

    /// Reads `key` and, if it exists, changes its TTL as `ttl` says
    /// (`GETEX`): keep it, remove it, or set a new one (at least 1 ms).
    pub async fn getex(&self, key: impl AsRef<[u8]>, ttl: TtlChange) -> Result<Option<Bytes>, ClientError> {
        reply::value(self.call(Request::GetEx { key: reply::key(key), ttl }).await?)
    }

    /// Gives `key` a new TTL; false if it does not exist. A zero TTL
    /// deletes the key, as in Redis.
    pub async fn expire(&self, key: impl AsRef<[u8]>, ttl: Duration) -> Result<bool, ClientError> {
        let request =
            Request::Expire { key: reply::key(key), ttl_ms: ttl.as_millis() as u64, when: Default::default() };
        reply::applied(self.call(request).await?)
    }

    /// Removes the TTL of `key`; false if it had none or does not exist.
    pub async fn persist(&self, key: impl AsRef<[u8]>) -> Result<bool, ClientError> {
        reply::applied(self.call(Request::Persist { key: reply::key(key) }).await?)
    }

    /// The remaining lifetime of `key`.
    pub async fn ttl(&self, key: impl AsRef<[u8]>) -> Result<TtlState, ClientError> {
        reply::ttl(self.call(Request::Ttl { key: reply::key(key) }).await?)
    }

    /// Entries on the node (`DBSIZE`). A clustered node counts the
    /// replicated records it holds itself, deletions kept for a while
    /// included.
    pub async fn dbsize(&self) -> Result<u64, ClientError> {
        reply::count(self.call(Request::DbSize).await?)
    }

    /// Drops every entry on the node (`FLUSHALL`); returns how many there
    /// were. A clustered node refuses it ([`ErrorCode::NotSupported`]).
    pub async fn flush_all(&self) -> Result<u64, ClientError> {
        reply::count(self.call(Request::FlushAll).await?)
    }

    /// The node's counters. Its hot keys are left out
    /// ([`NodeStats::hot_keys_hidden`]): they are key bytes, for
    /// [`Client::admin_stats`] only.
    pub async fn stats(&self) -> Result<NodeStats, ClientError> {
        reply::stats(self.call(Request::Stats).await?)
    }

    /// The node's counters with its hot keys, for a caller holding the
    /// node's admin token. A wrong token fails with
    /// [`ErrorCode::Unauthorized`] (and counts toward the node's back-off
    /// on guesses); a node older than this command answers
    /// [`ErrorCode::UnknownCommand`], and its plain [`Client::stats`]
    /// carries the hot keys.
    pub async fn admin_stats(&self, token: &str) -> Result<NodeStats, ClientError> {
        reply::stats(self.call(Request::Admin { token: token.to_string(), command: AdminCommand::Stats }).await?)
    }

    /// Runs a policy operation (`cachet policy ...`) with the node's admin
    /// token; replies with the registry as it is afterwards. For
    /// [`AdminCommand::Stats`], whose reply is not a listing, use
    /// [`Client::admin_stats`].
    pub async fn admin(&self, token: &str, command: AdminCommand) -> Result<PolicyListing, ClientError> {
        reply::listing(self.call(Request::Admin { token: token.to_string(), command }).await?)
    }

    /// Stores a policy component in the node's registry as
    /// `name@version` (`cachet policy load`). Components larger than one
    /// frame travel in chunks first.
    #[allow(clippy::too_many_arguments)]
    pub async fn load_module(
        &self,
        token: &str,
        name: &str,
        version: &str,
        config: Vec<(String, String)>,
        module: Bytes,
        fuel_per_call: Option<u64>,
        max_memory_bytes: Option<u64>,
    ) -> Result<PolicyListing, ClientError> {
        let mut load = AdminCommand::Load {
            name: name.to_string(),
            version: version.to_string(),
            config,
            module: Bytes::new(),
            fuel_per_call,
            max_memory_bytes,
            upload: None,
        };
        let sent = self.send_module(token, module).await?;
        if let AdminCommand::Load { module, upload, .. } = &mut load {
            (*module, *upload) = sent;
        }
        self.admin(token, load).await
    }

    /// On a cluster: makes `config` (a loader configuration whose modules
    /// are named `sha256:HEX`) the cluster's, with `modules`' bytes by
    /// hash, or drops the cluster's loaders (`None`); `cachet cluster
    /// loaders`.
    pub async fn set_loaders(
        &self,
        token: &str,
        config: Option<String>,
        modules: Vec<(String, Bytes)>,
    ) -> Result<PolicyListing, ClientError> {
        let mut sent = Vec::new();
        for (sha256, module) in modules {
            let (bytes, upload) = self.send_module(token, module).await?;
            sent.push(SentModule { sha256, bytes, upload });
        }
        self.admin(token, AdminCommand::SetLoaders { config, modules: sent }).await
    }

    /// A module to name in an admin command: inline when it fits in one
    /// frame, else sent in chunks first and named by its upload.
    async fn send_module(&self, token: &str, module: Bytes) -> Result<(Bytes, Option<u64>), ClientError> {
        const CHUNK: usize = 512 << 10;
        if module.len() <= CHUNK {
            return Ok((module, None));
        }
        let upload = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0)
            ^ u64::from(std::process::id()).rotate_left(32);
        let total = module.len() as u64;
        for offset in (0..module.len()).step_by(CHUNK) {
            let chunk = module.slice(offset..(offset + CHUNK).min(module.len()));
            self.admin(token, AdminCommand::UploadChunk { upload, offset: offset as u64, total, chunk }).await?;
        }
        Ok((Bytes::new(), Some(upload)))
    }

    /// Round trip to the node.
    pub async fn ping(&self) -> Result<(), ClientError> {
        reply::pong(self.call(Request::Ping).await?)
    }

    /// Reads `key`; on a miss runs `loader` once per key in this process
    /// (concurrent callers wait for that one load and share its value or
    /// error), stores the value with `ttl` and returns it.
    pub async fn get_or_load<F, Fut, E>(
        &self,
        key: impl AsRef<[u8]>,
        ttl: Option<Duration>,
        loader: F,
    ) -> Result<Bytes, LoadError>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<Bytes, E>>,
        E: std::error::Error + Send + Sync + 'static,
    {
        let key = Bytes::copy_from_slice(key.as_ref());
        if let Some(value) = self.get(&key).await.map_err(LoadError::from_client)? {
            return Ok(value);
        }
        self.inner
            .loads
            .run(key.clone(), async {
                let value = loader().await.map_err(LoadError::from_loader)?;
                let options = SetOptions { ttl, ..SetOptions::default() };
                self.set_with(&key, value.clone(), options).await.map_err(LoadError::from_client)?;
                Ok(value)
            })
            .await
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        // Best effort: tell the node now rather than at its idle timeout.
        if self.owned {
            self.endpoint.close(0u32.into(), b"client dropped");
        } else if let Ok(mut slot) = self.connection.try_lock()
            && let Some(conn) = slot.take()
        {
            conn.connection.close(0u32.into(), b"client dropped");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_dead_after_quinn_cannot_express_is_refused_by_name() {
        let mut config = ClientConfig::new(SocketAddr::from(([127, 0, 0, 1], 7070)));
        for (dead_after, why) in
            [(Duration::from_micros(500), "under 1 ms"), (Duration::from_secs(u64::MAX / 1000), "too long")]
        {
            config.dead_after = dead_after;
            match config.quinn_config() {
                Err(ClientError::Config(message)) => assert!(message.contains(why), "{message}"),
                other => panic!("{dead_after:?}: expected a configuration error, got {:?}", other.map(|_| ())),
            }
        }
        // Zero and ordinary values pass this check (and then need a CA).
        for dead_after in [Duration::ZERO, Duration::from_millis(1), Duration::from_secs(2)] {
            config.dead_after = dead_after;
            assert!(matches!(config.quinn_config(), Err(ClientError::Tls(_))), "{dead_after:?}");
        }
    }
}
