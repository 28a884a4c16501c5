//! The client SDK against a node started in this process: connect, write,
//! read, count, and fill a miss with `get_or_load`.
//!
//! `cargo run -p cachet-examples --example client`
//!
//! Against a node you started yourself (`cachet serve`), build the config
//! with `ClientConfig::new("127.0.0.1:7070".parse()?).with_data_dir(".cachet".as_ref())?`.

use anyhow::{Context, Result};
use bytes::Bytes;
use cachet::node::{Node, NodeConfig, NodeOptions};
use cachet::policies::{self, PolicySpec};
use cachet::server::{ServeOptions, tls::TlsSource};
use cachet::wasm::PolicyEngine;
use cachet_client::{Client, ClientConfig, SetOptions};
use std::time::Duration;

fn main() -> Result<()> {
    let data_dir = std::env::temp_dir().join(format!("cachet-example-{}", std::process::id()));
    let engine = PolicyEngine::new()?;
    let policy = policies::resolve(&engine, &PolicySpec { name_or_path: "lru".into(), ..PolicySpec::default() })?;
    let mut options = NodeOptions::new(NodeConfig::default(), policy);
    options.quic = Some(ServeOptions {
        listen: "127.0.0.1:0".parse()?,
        threads: 1,
        tls: TlsSource::DevCa { data_dir: data_dir.clone() },
        max_connections: 100,
        max_streams: 64,
        max_frame: 2 << 20,
        idle_timeout: Duration::from_secs(60),
        clients: Default::default(),
    });
    let server = Node::start(options)?;
    let config = ClientConfig::new(server.quic_addr().context("no QUIC port")?).with_data_dir(&data_dir)?;

    tokio::runtime::Builder::new_current_thread().enable_all().build()?.block_on(async {
        let client = Client::connect(config).await?;
        client.set("user:1", "Ada Lovelace").await?;
        let ttl = SetOptions { ttl: Some(Duration::from_secs(30)), ..SetOptions::default() };
        client.set_with("session:9", "token", ttl).await?;
        println!("user:1 = {:?}", client.get("user:1").await?);
        println!("page views = {}", client.incr("views", 1).await?);
        let profile = client
            .get_or_load("user:2", Some(Duration::from_secs(60)), || async {
                // Stands in for a database query; runs once however many
                // tasks miss on user:2 at the same time.
                Ok::<_, std::io::Error>(Bytes::from_static(b"Grace Hopper"))
            })
            .await?;
        println!("user:2 = {profile:?} (loaded, now cached: {:?})", client.get("user:2").await?);
        let stats = client.stats().await?;
        println!("hits {} misses {} entries {}", stats.hits, stats.misses, stats.entries);
        client.close().await;
        anyhow::Ok(())
    })?;
    server.shutdown();
    let _ = std::fs::remove_dir_all(&data_dir);
    Ok(())
}
