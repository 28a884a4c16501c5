//! `cachet serve`: its flags, over the `--config` file's settings, become
//! a node's options (QUIC, RESP, metrics, TLS, cluster membership,
//! loaders); the node then runs until SIGINT or SIGTERM.

use super::client_args::read_token;
use super::{block_on, cores};
use anyhow::{Context, Result, bail};
use cachet::cluster::transport::PeerTls;
use cachet::config::{FileConfig, parse_size};
use cachet::node::{Node, NodeConfig, NodeOptions};
use cachet::policies::{self, PolicySpec};
use cachet::registry::Registry;
use cachet::server::{self, ServeOptions, tls::TlsSource};
use cachet::wasm::PolicyEngine;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

#[derive(clap::Args)]
pub(crate) struct ServeArgs {
    /// UDP address to listen on [default: 127.0.0.1:7070].
    #[arg(long)]
    listen: Option<SocketAddr>,
    /// Where the development CA and certificates live [default: ./.cachet].
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Byte budget over all shards, e.g. 256MiB [default: 256MiB].
    #[arg(long)]
    max_memory: Option<String>,
    /// Entry bound over all shards [default: 1000000].
    #[arg(long)]
    max_entries: Option<u64>,
    /// Largest value accepted [default: 1MiB].
    #[arg(long)]
    max_value_size: Option<String>,
    /// A bundled policy name or the path of a policy component.
    #[arg(long)]
    policy: Option<String>,
    /// TOML file with these settings (kebab-case keys); flags override it.
    #[arg(long)]
    config: Option<PathBuf>,
    /// I/O threads, each with its own runtime and endpoint [default: cores].
    #[arg(long)]
    threads: Option<usize>,
    /// Shards, each with its own policy instance [default: cores].
    #[arg(long)]
    shards: Option<usize>,
    /// Connections beyond this many are refused [default: 10000].
    #[arg(long)]
    max_connections: Option<u32>,
    /// Seconds a silent QUIC client keeps its connection (and its place
    /// under --max-connections) before the node drops it [default: 60].
    #[arg(long)]
    idle_timeout: Option<u64>,
    /// Production certificate chain (PEM); with --tls-key.
    #[arg(long, requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// Production private key (PEM); with --tls-cert.
    #[arg(long, requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// Require client certificates signed by this CA (mutual TLS); with
    /// --tls-cert and --tls-key.
    #[arg(long, requires = "tls_cert")]
    tls_ca: Option<PathBuf>,
    /// A development CA shared by local nodes: created in DIR by the first
    /// node to start (safely if several start at once); each node gets its
    /// own certificate from it, so nodes with different --data-dirs and
    /// clients given `--dev-ca DIR` trust each other.
    #[arg(long, conflicts_with = "tls_cert")]
    dev_ca: Option<PathBuf>,
    /// File holding the admin token that `cachet policy` commands must
    /// present; without it admin commands are refused.
    #[arg(long)]
    admin_token_file: Option<PathBuf>,
    /// TCP address serving Prometheus metrics at /metrics.
    #[arg(long)]
    metrics_listen: Option<SocketAddr>,
    /// TCP address of the Redis-protocol port (off without it).
    #[arg(long)]
    resp_listen: Option<SocketAddr>,
    /// Connections from one source address beyond this many are refused,
    /// on each port; 0 for no such cap [default: 0].
    #[arg(long)]
    max_connections_per_address: Option<u32>,
    /// Largest RESP command, headers included (Redis's
    /// client-query-buffer-limit); a client sending a bigger one is
    /// answered with an error and closed [default: 16 x (max value + max
    /// key size) + 64KiB, 17MiB with the defaults].
    #[arg(long)]
    resp_max_command: Option<String>,
    /// Seconds a silent RESP client keeps its connection; 0 for ever
    /// (Redis's `timeout 0`) [default: 300].
    #[arg(long)]
    resp_idle_timeout: Option<u64>,
    /// Seconds a client may leave its replies unread before it is cut off
    /// (Redis's soft client-output-buffer-limit) [default: 60].
    #[arg(long)]
    output_timeout: Option<u64>,
    /// File holding the RESP port's password (Redis's requirepass): the
    /// `default` user then needs it, with every permission.
    #[arg(long)]
    resp_password_file: Option<PathBuf>,
    /// RESP users and their permissions, in Redis's ACL-file syntax (a
    /// subset: on/off, >password, #sha256, nopass, ~pattern, allkeys,
    /// +@read/+@write/+@admin/+@all and their `-` forms).
    #[arg(long)]
    resp_acl: Option<PathBuf>,
    /// TLS on the RESP port, with the node's certificate (`redis-cli
    /// --tls --cacert CA`); client certificates are required when
    /// --tls-ca is given.
    #[arg(long)]
    resp_tls: bool,
    /// Let the RESP port listen beyond loopback with no password.
    #[arg(long)]
    resp_insecure: bool,
    /// On a cluster member, answer the RESP port's keyed commands for
    /// slots another member is primary of with Redis Cluster's `MOVED`
    /// (and multi-key commands across slots with `CROSSSLOT`), as
    /// cluster-aware clients expect, instead of forwarding them (which
    /// plain clients need).
    #[arg(long)]
    resp_cluster_redirects: bool,
    /// Read-through loader configuration (TOML): origins and the key
    /// namespaces whose misses a loader module fills.
    #[arg(long)]
    loaders: Option<PathBuf>,
    /// Faults in a row after which a shard gives up on a policy module and
    /// the node quarantines it and re-activates the previous version
    /// [default: 3].
    #[arg(long)]
    policy_fault_limit: Option<u32>,
    /// First wait before a faulted shard retries its module, doubling with
    /// each fault in a row, in milliseconds [default: 1000].
    #[arg(long)]
    policy_retry_ms: Option<u64>,
    /// Every cluster member's node-to-node (peer) address, comma-separated,
    /// the same list on every member; a node's id is its index. Needs
    /// --node-id, and --dev-ca or --tls-cert/--tls-key/--tls-ca (a
    /// certificate naming the node id, from `cachet cert issue`).
    #[arg(long, value_delimiter = ',', requires = "node_id")]
    cluster: Vec<SocketAddr>,
    /// Peer addresses of running members, comma-separated: join their
    /// cluster as --node-id (an id no member has; the next free one).
    /// Needs --peer-listen, and --dev-ca or --tls-cert/--tls-key/--tls-ca.
    #[arg(long, value_delimiter = ',', requires_all = ["node_id", "peer_listen"], conflicts_with = "cluster")]
    seeds: Vec<SocketAddr>,
    /// With --seeds: where this node's peer transport listens.
    #[arg(long, requires = "seeds")]
    peer_listen: Option<SocketAddr>,
    /// This node's id: its index in --cluster, or a new id with --seeds
    /// (0 to 1023).
    #[arg(long, value_parser = clap::value_parser!(u32).range(0..=1023))]
    node_id: Option<u32>,
    /// Copies of each key in the cluster [default: 2].
    #[arg(long)]
    replication_factor: Option<usize>,
    /// Consistency of requests that do not name one: one, quorum or all
    /// [default: quorum].
    #[arg(long)]
    consistency: Option<cachet_client::Consistency>,
    /// A dead member is declared down within about this many milliseconds
    /// [default: 2000].
    #[arg(long)]
    detect_ms: Option<u64>,
    /// A member down this many milliseconds has its slots moved to the
    /// other members (until then the other owners of its slots serve
    /// them without it) [default: 30000].
    #[arg(long)]
    replace_after_ms: Option<u64>,
    /// MiB per second a member streams to others when slots move or a
    /// member re-syncs, over all of them [default: 64].
    #[arg(long)]
    stream_mib_per_sec: Option<u64>,
}

pub(crate) fn run_serve(args: ServeArgs) -> Result<()> {
    let file = match &args.config {
        Some(path) => FileConfig::load(path)?,
        None => FileConfig::default(),
    };
    let listen = match (args.listen, &file.listen) {
        (Some(addr), _) => addr,
        (None, Some(text)) => text.parse().with_context(|| format!("listen address `{text}`"))?,
        (None, None) => "127.0.0.1:7070".parse()?,
    };
    let data_dir = args.data_dir.or(file.data_dir).unwrap_or_else(|| PathBuf::from("./.cachet"));
    let max_memory = parse_size(args.max_memory.as_deref().or(file.max_memory.as_deref()).unwrap_or("256MiB"))?;
    let max_value_size =
        parse_size(args.max_value_size.as_deref().or(file.max_value_size.as_deref()).unwrap_or("1MiB"))?;
    let max_value_size = usize::try_from(max_value_size).context("--max-value-size")?;
    let policy_name = args.policy.or(file.policy).unwrap_or_else(|| policies::DEFAULT_POLICY.to_string());
    let threads = args.threads.or(file.threads).unwrap_or_else(cores).max(1);
    let node_config = NodeConfig {
        shards: args.shards.or(file.shards).unwrap_or_else(cores).max(1),
        max_entries: args.max_entries.or(file.max_entries).unwrap_or(1_000_000),
        max_bytes: max_memory,
        max_value_size,
        policy_fault_limit: args.policy_fault_limit.or(file.policy_fault_limit).unwrap_or(3),
        policy_retry_ms: args.policy_retry_ms.or(file.policy_retry_ms).unwrap_or(1_000),
        ..NodeConfig::default()
    };
    let tls = match (args.tls_cert.or(file.tls_cert), args.tls_key.or(file.tls_key)) {
        (Some(cert), Some(key)) => TlsSource::Files { cert, key, client_ca: args.tls_ca.or(file.tls_ca) },
        (None, None) => match args.dev_ca.clone() {
            Some(ca_dir) => TlsSource::SharedDevCa { ca_dir, data_dir: data_dir.clone(), node_id: args.node_id },
            None => TlsSource::DevCa { data_dir: data_dir.clone() },
        },
        _ => bail!("--tls-cert and --tls-key go together"),
    };
    let engine = PolicyEngine::new()?;
    let spec = PolicySpec { name_or_path: policy_name, ..PolicySpec::default() };
    let policy = policies::resolve(&engine, &spec)?;
    let registry = Registry::open(Some(&data_dir.join("modules")), engine)?;
    let token = match args.admin_token_file.or(file.admin_token_file) {
        Some(path) => Some(read_token(&path)?),
        None => None,
    };
    let mut options = NodeOptions::new(node_config, policy);
    options.registry = Some((registry, token));
    if let Some(node_id) = args.node_id {
        if args.cluster.is_empty() && args.seeds.is_empty() {
            bail!("--node-id needs --cluster (founding members) or --seeds (to join a running cluster)");
        }
        // Members authenticate each other with the cluster's CA, and each
        // is held to the node id its certificate names.
        let peer_tls = match &tls {
            TlsSource::SharedDevCa { ca_dir, .. } => PeerTls::DevCa { ca_dir: ca_dir.clone() },
            TlsSource::Files { cert, key, client_ca: Some(ca) } => {
                PeerTls::Files { cert: cert.clone(), key: key.clone(), ca: ca.clone() }
            }
            TlsSource::Files { client_ca: None, .. } => bail!(
                "--cluster with --tls-cert needs --tls-ca CA.pem: the cluster's CA, the only one members' (and \
                 clients') certificates may come from"
            ),
            TlsSource::DevCa { .. } => bail!(
                "--cluster needs --dev-ca DIR (a local cluster) or --tls-cert, --tls-key and --tls-ca (certificates \
                 from `cachet cert issue` or your own CA): members authenticate each other with that CA"
            ),
        };
        if max_value_size > 32 << 20 {
            bail!("--max-value-size is at most 32MiB with --cluster (records travel in peer frames of at most 64MiB)");
        }
        if listen.port() == 0 || listen.ip().is_unspecified() {
            bail!("--cluster needs a --listen address other members' clients can reach (not {listen})");
        }
        options.cluster = Some(cachet::cluster::runtime::ClusterOptions {
            node_id,
            members: args.cluster.clone(),
            seeds: args.seeds.clone(),
            peer_listen: args.peer_listen,
            client_addr: listen,
            // Set below, once the Redis port's address is known.
            resp_addr: None,
            replication_factor: args.replication_factor.unwrap_or(2),
            consistency: args.consistency.unwrap_or_default(),
            detect_within_ms: args.detect_ms.unwrap_or(2_000),
            replace_after_ms: args.replace_after_ms.unwrap_or(30_000),
            stream_bytes_per_sec: args.stream_mib_per_sec.unwrap_or(64).max(1) << 20,
            request_timeout_ms: 1_000,
            tls: peer_tls,
            data_dir: data_dir.clone(),
        });
    }
    if let Some(path) = args.loaders.or(file.loaders) {
        let config = cachet::loader::LoaderConfig::load(&path)?;
        let prefixes: Vec<&str> = config.namespaces.iter().map(|ns| ns.prefix.as_str()).collect();
        eprintln!("cachet: loaders for {}", prefixes.join(", "));
        options.loaders = Some(config);
    }
    let metrics_listen = match (args.metrics_listen, &file.metrics_listen) {
        (Some(addr), _) => Some(addr),
        (None, Some(text)) => Some(text.parse().with_context(|| format!("metrics address `{text}`"))?),
        (None, None) => None,
    };
    options.metrics = metrics_listen;
    let resp_tls_source = tls.clone();
    let quic = ServeOptions {
        listen,
        threads,
        tls,
        max_connections: args.max_connections.or(file.max_connections).unwrap_or(10_000),
        max_streams: 64,
        max_frame: max_value_size + (128 << 10),
        idle_timeout: Duration::from_secs(args.idle_timeout.or(file.idle_timeout).unwrap_or(60).max(1)),
        clients: Default::default(),
    };
    let max_connections = quic.max_connections;
    options.quic = Some(quic);
    let resp_listen = match (args.resp_listen, &file.resp_listen) {
        (Some(addr), _) => Some(addr),
        (None, Some(text)) => Some(text.parse().with_context(|| format!("RESP address `{text}`"))?),
        (None, None) => None,
    };
    if let (Some(cluster), Some(resp)) = (options.cluster.as_mut(), resp_listen) {
        // Announced to Redis clients (`CLUSTER SLOTS`): a wildcard address
        // is replaced by the one the QUIC port was given, if that is not a
        // wildcard too.
        let mut announced = resp;
        if resp.ip().is_unspecified() {
            announced.set_ip(cluster.client_addr.ip());
        }
        if announced.ip().is_unspecified() || announced.port() == 0 {
            eprintln!(
                "cachet: --resp-listen {resp} names no address clients can reach: CLUSTER SLOTS will not list this \
                 member (give both ports a specific address and port)"
            );
        } else {
            cluster.resp_addr = Some(announced);
        }
    }
    options.resp = match resp_listen {
        Some(listen) => {
            let defaults = cachet::resp::RespOptions::new(listen);
            let max_command = match args.resp_max_command.as_deref().or(file.resp_max_command.as_deref()) {
                Some(text) => Some(usize::try_from(parse_size(text)?).context("--resp-max-command")?),
                None => None,
            };
            let idle_timeout = match args.resp_idle_timeout.or(file.resp_idle_timeout) {
                Some(0) => None,
                Some(seconds) => Some(Duration::from_secs(seconds)),
                None => defaults.idle_timeout,
            };
            let acl = match args.resp_acl.as_ref().or(file.resp_acl.as_ref()) {
                Some(path) => Some(cachet::resp::acl::Acl::load(path)?),
                None => None,
            };
            let acl = match args.resp_password_file.as_ref().or(file.resp_password_file.as_ref()) {
                Some(path) => {
                    let text = std::fs::read_to_string(path).with_context(|| format!("{}", path.display()))?;
                    let password = text.trim_end_matches(['\r', '\n']);
                    if password.is_empty() {
                        bail!("{} is empty: give the RESP password in it", path.display());
                    }
                    Some(acl.unwrap_or_default().with_default_password(password))
                }
                None => acl,
            };
            let resp_tls = match args.resp_tls || file.resp_tls.unwrap_or(false) {
                true => Some(Arc::new(server::tls::tcp_server_config(&resp_tls_source)?)),
                false => None,
            };
            Some(cachet::resp::RespOptions {
                acl: acl.map(Arc::new),
                tls: resp_tls,
                insecure: args.resp_insecure || file.resp_insecure.unwrap_or(false),
                redirects: args.resp_cluster_redirects || file.resp_cluster_redirects.unwrap_or(false),
                threads,
                max_connections,
                max_connections_per_address: args
                    .max_connections_per_address
                    .or(file.max_connections_per_address)
                    .unwrap_or(0),
                max_command,
                idle_timeout,
                output_timeout: args
                    .output_timeout
                    .or(file.output_timeout)
                    .map_or(defaults.output_timeout, |s| Duration::from_secs(s.max(1))),
                ..defaults
            })
        }
        None => None,
    };
    let running = Node::start(options)?;
    if let Some(cluster) = running.node().cluster() {
        eprintln!("cachet: cluster member {}, peers on {}", cluster.stats().node_id, cluster.peer_addr());
    }
    if let Some(addr) = running.quic_addr() {
        eprintln!("cachet: serving on {addr} (data dir {})", data_dir.display());
    }
    if let Some(addr) = running.resp_addr() {
        eprintln!("cachet: Redis protocol on {addr}");
    }
    if let Some(addr) = running.metrics_addr() {
        eprintln!("cachet: metrics on http://{addr}/metrics");
    }
    block_on(async move {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
        Ok(())
    })?;
    eprintln!("cachet: shutting down");
    running.shutdown();
    Ok(())
}
