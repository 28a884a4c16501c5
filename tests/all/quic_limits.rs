//! What the QUIC port holds each client to: queued replies, connections
//! per source address, and address validation under a burst of
//! handshakes. Real QUIC, raw connections for the misbehaving clients.

use bytes::{Bytes, BytesMut};
use cachet::clients::Cutoff;
use cachet::node::{Node, NodeConfig, NodeOptions, Running};
use cachet::policies::{self, PolicySpec};
use cachet::server::tls::TlsSource;
use cachet::server::{ClientLimits, ServeOptions};
use cachet::wasm::PolicyEngine;
use cachet_client::{Client, ClientConfig};
use cachet_proto::Request;
use cachet_tests::{TempDir, raw_endpoint};
use std::sync::Arc;
use std::time::Duration;

struct LimitedNode {
    node: Arc<Node>,
    running: Option<Running>,
    dir: TempDir,
}

impl LimitedNode {
    fn start(clients: ClientLimits) -> Self {
        let dir = TempDir::new("quic-limits");
        let engine = PolicyEngine::new().expect("engine");
        let policy = policies::resolve(&engine, &PolicySpec { name_or_path: "lru".into(), ..PolicySpec::default() })
            .expect("policy");
        let config = NodeConfig { max_value_size: 256 << 10, ..NodeConfig::default() };
        let mut options = NodeOptions::new(config, policy);
        options.quic = Some(ServeOptions {
            listen: "127.0.0.1:0".parse().expect("addr"),
            threads: 1,
            tls: TlsSource::DevCa { data_dir: dir.0.clone() },
            max_connections: 100,
            max_streams: 32,
            max_frame: (256 << 10) + 1024,
            idle_timeout: Duration::from_secs(60),
            clients,
        });
        let running = Node::start(options).expect("node starts");
        Self { node: running.node().clone(), running: Some(running), dir }
    }

    fn addr(&self) -> std::net::SocketAddr {
        self.running.as_ref().and_then(Running::quic_addr).expect("running")
    }

    async fn client(&self) -> Result<Client, cachet_client::ClientError> {
        let mut config = ClientConfig::new(self.addr()).with_data_dir(&self.dir.0).expect("ca");
        config.timeout = Duration::from_secs(5);
        Client::connect(config).await
    }

    async fn raw(&self) -> Result<quinn::Connection, quinn::ConnectionError> {
        let endpoint = raw_endpoint(&self.dir.0.join("ca.pem"), cachet_proto::ALPN);
        endpoint.connect(self.addr(), "localhost").expect("connect").await
    }
}

impl Drop for LimitedNode {
    fn drop(&mut self) {
        if let Some(running) = self.running.take() {
            running.shutdown();
        }
    }
}

async fn eventually(limit: Duration, mut check: impl FnMut() -> bool) -> bool {
    let deadline = tokio::time::Instant::now() + limit;
    while tokio::time::Instant::now() < deadline {
        if check() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    check()
}

#[tokio::test]
async fn a_connection_that_asks_and_never_reads_is_cut_off_at_the_output_limit() {
    let node = LimitedNode::start(ClientLimits { max_output: 1 << 20, ..ClientLimits::default() });
    let client = node.client().await.expect("connects");
    client.set("big", vec![7u8; 200 << 10]).await.expect("set");
    let greedy = node.raw().await.expect("handshake");
    let mut requests = BytesMut::new();
    for id in 0..500u64 {
        cachet_proto::encode(id, &Request::Get { key: Bytes::from_static(b"big") }, &mut requests).expect("encode");
    }
    // Sixteen streams of GETs for 100 MB of replies, none read: more than
    // the connection's send window, so replies queue on the node.
    let mut held = Vec::new();
    for _ in 0..16 {
        let (mut send, recv) = greedy.open_bi().await.expect("stream");
        let _ = tokio::time::timeout(Duration::from_millis(200), send.write_all(&requests)).await;
        held.push((send, recv));
    }
    assert!(
        eventually(Duration::from_secs(10), || node.node.clients().get(Cutoff::OutputLimit) == 1).await,
        "not cut off"
    );
    let closed = tokio::time::timeout(Duration::from_secs(5), greedy.closed()).await.expect("closed");
    assert!(
        matches!(&closed, quinn::ConnectionError::ApplicationClosed(c) if String::from_utf8_lossy(&c.reason).contains("output limit")),
        "{closed:?}"
    );
    // The well-behaved client is served throughout.
    assert_eq!(client.get("big").await.expect("get").map(|v| v.len()), Some(200 << 10));
}

#[tokio::test]
async fn connections_are_capped_per_source_address() {
    let node = LimitedNode::start(ClientLimits { max_per_address: 1, ..ClientLimits::default() });
    let first = node.raw().await.expect("the first connection");
    let second = node.raw().await;
    assert!(matches!(second, Err(quinn::ConnectionError::ConnectionClosed(_))), "{second:?}");
    assert_eq!(node.node.clients().get(Cutoff::AddressFull), 1);
    first.close(0u32.into(), b"done");
    assert!(
        eventually(Duration::from_secs(5), || node.node.stats_connections() == 0).await,
        "the first connection's place was given back"
    );
    let third = node.raw().await.expect("a freed place is taken again");
    third.close(0u32.into(), b"done");
}

#[tokio::test]
async fn a_burst_of_handshakes_must_validate_addresses_first() {
    // A rate of 0: every new client gets a Retry, and gets in after it.
    let node = LimitedNode::start(ClientLimits { retry_above: 0, ..ClientLimits::default() });
    let client = node.client().await.expect("connects after a Retry");
    client.set("k", "v").await.expect("served");
    assert_eq!(client.get("k").await.expect("get"), Some(Bytes::from_static(b"v")));
    assert!(node.node.clients().retries() >= 1);
}
