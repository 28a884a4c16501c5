//! The `cachet` command.

use anyhow::{Context, Result, bail};
use cachet::bench::{self, BenchOptions, BenchReport};
use cachet::cluster::transport::PeerTls;
use cachet::config::{FileConfig, parse_size};
use cachet::node::{Node, NodeConfig, NodeOptions};
use cachet::plot;
use cachet::policies::{self, PolicySpec};
use cachet::registry::Registry;
use cachet::server::{self, ServeOptions, tls::TlsSource};
use cachet::sim::{self, SimOptions, SimReport};
use cachet::wasm::{Limits, PolicyEngine};
use cachet_client::{AdminCommand, Client, ClientConfig, Condition, PolicyListing, SetOptions};
use clap::{Parser, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};
use std::io::{IsTerminal, Write as _};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

/// jemalloc rather than the system allocator: a cache is mostly small
/// allocations of a few sizes, and jemalloc's size classes have no
/// per-allocation header (glibc puts 8 bytes before each and rounds to 16),
/// so an entry of 110 bytes takes 112, not 128. See docs/decisions.md.
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// jemalloc's options, read at its start (a C `const char *`; this build
/// prefixes its symbols with `_rjem_`). A background thread returns freed
/// pages to the system a second after they fall idle, where by default
/// they wait ten seconds for the next allocation that happens to purge:
/// after a load, the slab's and the index's outgrown arrays would stay
/// resident (about 11 bytes per key at 1M keys). Redis runs jemalloc with a
/// background thread too.
#[unsafe(export_name = "_rjem_malloc_conf")]
static JEMALLOC_CONF: &[u8; 68] = b"background_thread:true,max_background_threads:1,dirty_decay_ms:1000\0";

#[derive(Parser)]
#[command(name = "cachet", version, about = "A programmable cache: eviction policies as sandboxed Wasm")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Replay a trace through a shard and policy; print hit and miss counts.
    Sim(SimArgs),
    /// List the bundled policies.
    Policies,
    /// Run a cache node serving `cachet/1` over QUIC.
    Serve(Box<ServeArgs>),
    /// Read a key; prints the value, or exits 1 with nothing on stdout on a miss.
    Get {
        /// The key.
        key: String,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Write a key.
    Set {
        /// The key.
        key: String,
        /// The value.
        value: String,
        /// Time to live in seconds.
        #[arg(long)]
        ttl: Option<f64>,
        /// Only if the key is absent.
        #[arg(long, conflicts_with = "xx")]
        nx: bool,
        /// Only if the key is present.
        #[arg(long)]
        xx: bool,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Delete keys; prints how many existed.
    Del {
        /// The keys.
        #[arg(required = true)]
        keys: Vec<String>,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Add to a decimal integer value (0 when absent); prints the result.
    /// On a cluster it runs at the key's primary owner, one at a time.
    Incr {
        /// The key.
        key: String,
        /// The amount (negative to decrement).
        #[arg(default_value_t = 1, allow_negative_numbers = true)]
        by: i64,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Fill a node by GETting a key list at a bounded rate, so each missing
    /// key is loaded by its namespace's loader without stampeding the
    /// origin (at most --rate loads start per second).
    Warm {
        /// File with one key per line.
        #[arg(long, conflicts_with = "from_node", required_unless_present = "from_node")]
        keys: Option<PathBuf>,
        /// Take the hot keys of this node (trusted like --server); needs
        /// that node's admin token, as hot keys are key bytes.
        #[arg(long)]
        from_node: Option<SocketAddr>,
        /// File holding --from-node's admin token [default:
        /// $CACHET_ADMIN_TOKEN].
        #[arg(long, requires = "from_node")]
        admin_token_file: Option<PathBuf>,
        /// Keys started per second (an upper bound on origin queries).
        #[arg(long, default_value_t = 100)]
        rate: u32,
        /// GETs outstanding at once.
        #[arg(long, default_value_t = 16)]
        concurrency: usize,
        /// No progress bar.
        #[arg(long)]
        quiet: bool,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Print the node's hottest keys, one per line (a key list for `warm`;
    /// admin token required, as they are key bytes).
    HotKeys {
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// Print the node's counters; its hot keys too when given the admin
    /// token.
    Stats {
        /// As one JSON object.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// Load-test a node.
    Bench(Box<BenchArgs>),
    /// Live policy operations on a node: load, activate, rollback, list,
    /// shadow (admin token required).
    #[command(subcommand)]
    Policy(PolicyCommand),
    /// Certificates for running a cluster on a CA of its own.
    #[command(subcommand)]
    Cert(CertCommand),
}

#[derive(Subcommand)]
enum CertCommand {
    /// Issue a node certificate, naming the node id its peers hold it to
    /// (`cachet://node/N`), or a client certificate, signed by the CA in
    /// --ca (created there first if missing). Writes `node-N.pem` and
    /// `node-N-key.pem` (or `client-NAME.pem` and `client-NAME-key.pem`,
    /// the key readable by its owner only) into --out.
    Issue {
        /// The cluster member the certificate is for (`serve --node-id N`).
        #[arg(
            long,
            required_unless_present = "client",
            conflicts_with = "client",
            value_parser = clap::value_parser!(u32).range(0..=1023)
        )]
        node_id: Option<u32>,
        /// A client certificate for NAME instead, for nodes started with
        /// --tls-ca (which then require one).
        #[arg(long)]
        client: Option<String>,
        /// The CA's directory: `ca.pem` (for --tls-ca and for clients) and
        /// `ca-key.pem` (keep it private).
        #[arg(long)]
        ca: PathBuf,
        /// Where the certificate and its key go.
        #[arg(long, default_value = ".")]
        out: PathBuf,
        /// Another DNS name or IP address clients reach the node by,
        /// repeatable (`localhost` and the loopback addresses are always in).
        #[arg(long = "name", value_name = "HOST")]
        names: Vec<String>,
    },
}

#[derive(Subcommand)]
enum PolicyCommand {
    /// Store a policy component in the node's registry as NAME@VERSION.
    Load {
        /// The component (.wasm).
        path: PathBuf,
        /// Module name.
        #[arg(long)]
        name: String,
        /// Module version.
        #[arg(long)]
        version: String,
        /// Policy setting stored with the module, repeatable.
        #[arg(long = "config", value_name = "KEY=VALUE")]
        config: Vec<String>,
        /// Fuel per policy call [default: the node's].
        #[arg(long)]
        fuel_per_call: Option<u64>,
        /// Base memory cap per instance, e.g. 16MiB [default: the node's].
        #[arg(long)]
        max_memory: Option<String>,
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// Hot-swap every shard of the node to NAME@VERSION.
    Activate {
        /// NAME@VERSION.
        module: String,
        /// Settings replacing the stored ones for this activation, repeatable.
        #[arg(long = "config", value_name = "KEY=VALUE")]
        config: Vec<String>,
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// Swap back to the previously active version.
    Rollback {
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// Modules, versions, hashes, the active one, faults, shadow results.
    List {
        /// As one JSON object.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// Predict NAME@VERSION's hit ratio on sampled live traffic (`--stop`
    /// ends the evaluation).
    Shadow {
        /// NAME@VERSION.
        #[arg(required_unless_present = "stop")]
        module: Option<String>,
        /// Stop the running evaluation.
        #[arg(long, conflicts_with = "module")]
        stop: bool,
        #[command(flatten)]
        admin: AdminArgs,
    },
}

#[derive(clap::Args)]
struct AdminArgs {
    /// File holding the node's admin token [default: $CACHET_ADMIN_TOKEN].
    #[arg(long)]
    admin_token_file: Option<PathBuf>,
    #[command(flatten)]
    client: ClientArgs,
}

impl AdminArgs {
    fn token(&self) -> Result<String> {
        match optional_token(self.admin_token_file.as_deref())? {
            Some(token) => Ok(token),
            None => bail!("policy commands need the admin token: --admin-token-file FILE or CACHET_ADMIN_TOKEN"),
        }
    }
}

/// The admin token from `file`, else from `CACHET_ADMIN_TOKEN`, if either
/// is given: commands that work without one but show more with it (hot
/// keys in `stats`).
fn optional_token(file: Option<&std::path::Path>) -> Result<Option<String>> {
    match file {
        Some(path) => read_token(path).map(Some),
        None => match std::env::var("CACHET_ADMIN_TOKEN") {
            Ok(token) if !token.trim().is_empty() => Ok(Some(token.trim().to_string())),
            _ => Ok(None),
        },
    }
}

/// The node's stats, with its hot keys when `token` is given. A node that
/// predates admin stats answers `UnknownCommand`; its plain stats still
/// carry the hot keys, so those are used.
async fn node_stats(client: &Client, token: Option<&str>) -> Result<cachet_client::NodeStats> {
    let Some(token) = token else {
        return Ok(client.stats().await?);
    };
    match client.admin_stats(token).await {
        Err(cachet_client::ClientError::Server(reply)) if reply.code == cachet_client::ErrorCode::UnknownCommand => {
            Ok(client.stats().await?)
        }
        result => Ok(result.context("admin stats (hot keys)")?),
    }
}

/// Why a command that needs hot keys got none: they are shown to admin
/// callers only.
const HOT_KEYS_NEED_TOKEN: &str = "hot keys are key bytes, shown only to admin callers: give the node's admin token \
                                   (--admin-token-file FILE or CACHET_ADMIN_TOKEN)";

/// Reads a token file; surrounding whitespace (a trailing newline) is not
/// part of the token.
fn read_token(path: &std::path::Path) -> Result<String> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading the admin token {}", path.display()))?;
    let token = text.trim();
    if token.is_empty() {
        bail!("the admin token file {} is empty", path.display());
    }
    Ok(token.to_string())
}

#[derive(clap::Args, Clone)]
struct ClientArgs {
    /// The node's address.
    #[arg(long, default_value = "127.0.0.1:7070")]
    server: SocketAddr,
    /// Data directory of a local node, whose development CA to trust.
    #[arg(long, default_value = "./.cachet")]
    data_dir: PathBuf,
    /// CA certificate (PEM) to trust instead of the data directory's.
    #[arg(long)]
    ca: Option<PathBuf>,
    /// Trust the shared development CA in this directory (as the nodes
    /// started with `serve --dev-ca DIR` do).
    #[arg(long, conflicts_with = "ca")]
    dev_ca: Option<PathBuf>,
    /// Name to check the node's certificate against.
    #[arg(long, default_value = "localhost")]
    server_name: String,
    /// Per-request timeout in milliseconds.
    #[arg(long, default_value_t = 5_000)]
    timeout_ms: u64,
    /// Take a node silent this long (milliseconds) for dead: requests in
    /// flight to it fail then instead of at their timeout (0: no pings;
    /// QUIC's 30 s idle timeout, or the node's if shorter).
    #[arg(long, default_value_t = 2_000)]
    dead_after_ms: u64,
    /// Client certificate (PEM) for nodes started with --tls-ca.
    #[arg(long, requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// Client private key (PEM); with --tls-cert.
    #[arg(long, requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// Replicas that must take part, on a clustered node: one, quorum or
    /// all [default: the node's --consistency].
    #[arg(long)]
    consistency: Option<cachet_client::Consistency>,
}

impl ClientArgs {
    /// Connects, asking for `--consistency` when given.
    async fn connect(&self) -> Result<Client> {
        let client = Client::connect(self.config()?).await?;
        Ok(match self.consistency {
            Some(level) => client.at(level),
            None => client,
        })
    }

    fn config(&self) -> Result<ClientConfig> {
        let mut config = ClientConfig::new(self.server);
        config.server_name = self.server_name.clone();
        config.timeout = Duration::from_millis(self.timeout_ms);
        config.dead_after = Duration::from_millis(self.dead_after_ms);
        if let (Some(cert), Some(key)) = (&self.tls_cert, &self.tls_key) {
            config = config.with_identity(cert, key);
        }
        Ok(match (&self.ca, &self.dev_ca) {
            (Some(ca), _) => config.with_ca_file(ca)?,
            (None, Some(dir)) => config.with_ca_file(&dir.join(server::tls::CA_CERT))?,
            (None, None) => config.with_data_dir(&self.data_dir)?,
        })
    }
}

#[derive(clap::Args)]
struct ServeArgs {
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
}

#[derive(clap::Args)]
struct BenchArgs {
    #[command(flatten)]
    client: ClientArgs,
    /// Measured seconds.
    #[arg(long, default_value_t = 10.0)]
    duration: f64,
    /// QUIC connections.
    #[arg(long, default_value_t = 50)]
    connections: usize,
    /// Requests in flight over all connections.
    #[arg(long, default_value_t = 200)]
    concurrency: usize,
    /// Distinct keys, all preloaded.
    #[arg(long, default_value_t = 100_000)]
    keys: u64,
    /// Value size in bytes.
    #[arg(long, default_value_t = 100)]
    value_size: usize,
    /// Share of GETs (the rest are SETs).
    #[arg(long, default_value_t = 0.9)]
    get_ratio: f64,
    /// Zipf exponent for key popularity (uniform without it).
    #[arg(long)]
    zipf: Option<f64>,
    /// Open-loop rate in requests per second (closed loop without it).
    #[arg(long)]
    rate: Option<f64>,
    /// Load threads [default: cores].
    #[arg(long)]
    threads: Option<usize>,
    /// Report this server process's CPU microseconds per request.
    #[arg(long)]
    server_pid: Option<u32>,
    /// Print one JSON object as the last line.
    #[arg(long)]
    json: bool,
    /// Skip writing every key first (an earlier run already did).
    #[arg(long)]
    no_preload: bool,
    /// `quic` (cachet/1 through the SDK) or `resp` (RESP over TCP to
    /// --server: redis-server or a node's --resp-listen port).
    #[arg(long, default_value = "quic")]
    protocol: bench::Protocol,
    /// RESP: commands per batch on each connection.
    #[arg(long, default_value_t = 1)]
    pipeline: usize,
    /// Client addresses of cluster members to spread the load over, with
    /// the cluster SDK's retries (instead of --server alone).
    #[arg(long, value_delimiter = ',')]
    cluster_members: Vec<SocketAddr>,
}

#[derive(clap::Args)]
struct SimArgs {
    /// Trace file, plain, .gz or .xz: CSV `timestamp,key,size`, or by its
    /// name libCacheSim's `*.oracleGeneral*` or Caffeine's `*.trace`.
    #[arg(long)]
    trace: PathBuf,
    /// A bundled policy name, or the path of a policy component (.wasm).
    #[arg(long, default_value = policies::DEFAULT_POLICY)]
    policy: String,
    /// Several policies, comma-separated, compared in one run (overrides --policy).
    #[arg(long, value_delimiter = ',')]
    policies: Vec<String>,
    /// Capacity in objects.
    #[arg(long, required_unless_present_any = ["sweep", "capacity_bytes"])]
    capacity: Option<u64>,
    /// Run the eight standard sizes (0.1% to 80% of the distinct keys).
    #[arg(long, conflicts_with_all = ["capacity", "capacity_bytes"])]
    sweep: bool,
    /// Write a miss-ratio chart (SVG) of the runs to this file.
    #[arg(long)]
    plot: Option<PathBuf>,
    /// Capacity in bytes (objects count their trace size).
    #[arg(long)]
    capacity_bytes: Option<u64>,
    /// Run the bundled policy's crate natively (to measure the Wasm cost).
    #[arg(long)]
    native: bool,
    /// Policy setting, repeatable.
    #[arg(long = "config", value_name = "KEY=VALUE")]
    config: Vec<String>,
    /// Seed for policies that use randomness.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Fuel per policy call (Wasm only).
    #[arg(long, default_value_t = Limits::default().fuel_per_call)]
    fuel_per_call: u64,
    /// Base memory cap per policy instance in bytes, plus 512 bytes per
    /// entry of capacity (Wasm only).
    #[arg(long, default_value_t = Limits::default().max_memory_bytes)]
    max_policy_memory: usize,
    /// Print one JSON object as the last line.
    #[arg(long)]
    json: bool,
}

fn main() -> std::process::ExitCode {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .init();
    match run(Cli::parse()) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Sim(args) => run_sim(args),
        Command::Policies => {
            for name in policies::bundled_names() {
                println!("{name}");
            }
            Ok(())
        }
        Command::Serve(args) => run_serve(*args),
        Command::Cert(CertCommand::Issue { node_id, client, ca, out, names }) => {
            let subject = match (node_id, client) {
                (Some(id), None) => server::tls::CertSubject::Node(id),
                (None, Some(name)) => server::tls::CertSubject::Client(name),
                _ => bail!("give --node-id N or --client NAME"),
            };
            let (cert, key) = server::tls::issue_cert(&ca, &out, &subject, &names)?;
            println!("certificate {}", cert.display());
            println!("key         {}", key.display());
            println!("ca          {}", ca.join(server::tls::CA_CERT).display());
            Ok(())
        }
        Command::Get { key, client } => block_on(async move {
            let client = client.connect().await?;
            let value = client.get(&key).await;
            client.close().await;
            match value? {
                Some(value) => {
                    use std::io::Write;
                    let mut out = std::io::stdout().lock();
                    out.write_all(&value)?;
                    out.write_all(b"\n")?;
                    Ok(())
                }
                None => bail!("(nil): no key `{key}`"),
            }
        }),
        Command::Set { key, value, ttl, nx, xx, client } => block_on(async move {
            let client = client.connect().await?;
            let condition = if nx {
                Condition::IfAbsent
            } else if xx {
                Condition::IfPresent
            } else {
                Condition::Always
            };
            let ttl = ttl.map(Duration::from_secs_f64);
            let applied = client.set_with(&key, value, SetOptions { ttl, condition, hint: 0 }).await;
            client.close().await;
            if applied? {
                println!("OK");
                Ok(())
            } else {
                bail!("not stored: the {} condition did not hold", if nx { "--nx" } else { "--xx" })
            }
        }),
        Command::Del { keys, client } => block_on(async move {
            let client = client.connect().await?;
            let deleted = client.delete(&keys).await;
            client.close().await;
            println!("{}", deleted?);
            Ok(())
        }),
        Command::Incr { key, by, client } => block_on(async move {
            let client = client.connect().await?;
            let counted = client.incr(&key, by).await;
            client.close().await;
            println!("{}", counted?);
            Ok(())
        }),
        Command::Stats { json, admin } => block_on(async move {
            let token = optional_token(admin.admin_token_file.as_deref())?;
            let client = admin.client.connect().await?;
            let stats = node_stats(&client, token.as_deref()).await;
            client.close().await;
            let stats = stats?;
            if json {
                println!("{}", serde_json::to_string(&stats)?);
            } else {
                println!("policy            {} {}", stats.policy, stats.policy_version);
                println!("hits / misses     {} / {} (hit ratio {:.4})", stats.hits, stats.misses, stats.hit_ratio);
                println!("entries / bytes   {} / {} of {}", stats.entries, stats.bytes, stats.max_bytes);
                println!("evictions         {}", stats.evictions);
                println!("expired           {} (+{} at policy deadlines)", stats.expired, stats.policy_expired);
                println!("deletes           {}", stats.deletes);
                println!("policy faults     {} ({} shards on fallback)", stats.policy_faults, stats.shards_on_fallback);
                println!("shards            {}", stats.shards);
                println!("connections       {}", stats.connections);
                println!("uptime            {} s", stats.uptime_secs);
                if let Some(cluster) = &stats.cluster {
                    let up: Vec<String> = cluster
                        .members
                        .iter()
                        .zip(&cluster.alive)
                        .enumerate()
                        .map(|(i, (addr, up))| format!("{i}={addr}{}", if *up { "" } else { " (down)" }))
                        .collect();
                    println!(
                        "cluster node      {} of [{}], RF {}",
                        cluster.node_id,
                        up.join(", "),
                        cluster.replication_factor
                    );
                    let synced = if cluster.synced {
                        "synced".to_string()
                    } else {
                        format!("re-syncing from {:?}", cluster.resync_waiting)
                    };
                    println!("replica           {} records, {} hints, {synced}", cluster.records, cluster.hints);
                    println!("replicated ops    {} ok, {} failed", cluster.ops_ok, cluster.ops_failed);
                    println!(
                        "as a replica      {} writes for other members, {} updates run as primary",
                        cluster.replica_writes, cluster.primary_updates
                    );
                    if cluster.peer_identity_refused > 0 {
                        let refused = cluster.peer_identity_refused;
                        println!("impostor frames   {refused} dropped (sender's certificate names another node)");
                    }
                }
                if stats.hot_keys_hidden {
                    println!("hot keys          hidden: {HOT_KEYS_NEED_TOKEN}");
                }
                for (i, hot) in stats.hot_keys.iter().take(10).enumerate() {
                    let label = if i == 0 { "hot keys" } else { "" };
                    println!("{label:<17} {} (~{} reads)", String::from_utf8_lossy(&hot.key).escape_debug(), hot.reads);
                }
            }
            Ok(())
        }),
        Command::HotKeys { admin } => block_on(async move {
            let token = optional_token(admin.admin_token_file.as_deref())?
                .ok_or_else(|| anyhow::anyhow!("{HOT_KEYS_NEED_TOKEN}"))?;
            let client = Client::connect(admin.client.config()?).await?;
            let stats = node_stats(&client, Some(&token)).await;
            client.close().await;
            let mut out = std::io::stdout().lock();
            for hot in stats?.hot_keys {
                out.write_all(&hot.key)?;
                out.write_all(b"\n")?;
            }
            Ok(())
        }),
        Command::Warm { keys, from_node, admin_token_file, rate, concurrency, quiet, client } => block_on(async move {
            let list = match (keys, from_node) {
                (Some(path), _) => {
                    let text = std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
                    cachet::warm::parse_key_list(&text)
                }
                (None, Some(addr)) => {
                    let Some(token) = optional_token(admin_token_file.as_deref())? else {
                        anyhow::bail!("--from-node: {HOT_KEYS_NEED_TOKEN}");
                    };
                    let mut config = client.config()?;
                    config.server = addr;
                    let source = Client::connect(config).await?;
                    let stats = node_stats(&source, Some(&token)).await;
                    source.close().await;
                    stats?.hot_keys.into_iter().map(|h| h.key).collect()
                }
                (None, None) => anyhow::bail!("give --keys FILE or --from-node ADDR"),
            };
            let target = Arc::new(Client::connect(client.config()?).await?);
            let bar = if quiet { ProgressBar::hidden() } else { ProgressBar::new(list.len() as u64) };
            let tick = bar.clone();
            let report = cachet::warm::warm(target.clone(), list, rate, concurrency, move || tick.inc(1)).await;
            bar.finish_and_clear();
            target.close().await;
            println!(
                "warmed {} keys in {:.1} s: {} present, {} not found, {} failed",
                report.keys,
                report.elapsed.as_secs_f64(),
                report.present,
                report.missing,
                report.failed
            );
            if report.failed > 0 {
                anyhow::bail!("{} keys failed", report.failed);
            }
            Ok(())
        }),
        Command::Bench(args) => run_bench(*args),
        Command::Policy(command) => run_policy(command),
    }
}

fn run_policy(command: PolicyCommand) -> Result<()> {
    let (admin, json, command) = match command {
        PolicyCommand::Load { path, name, version, config, fuel_per_call, max_memory, admin } => {
            let module = std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
            let max_memory_bytes = max_memory.as_deref().map(parse_size).transpose()?;
            let config = parse_config(&config)?;
            let command = AdminCommand::Load {
                name,
                version,
                config,
                module: module.into(),
                fuel_per_call,
                max_memory_bytes,
                upload: None,
            };
            (admin, false, command)
        }
        PolicyCommand::Activate { module, config, admin } => {
            let (name, version) = cachet::admin::split_label(&module).map_err(anyhow::Error::msg)?;
            let config = if config.is_empty() { None } else { Some(parse_config(&config)?) };
            (admin, false, AdminCommand::Activate { name, version, config })
        }
        PolicyCommand::Rollback { admin } => (admin, false, AdminCommand::Rollback),
        PolicyCommand::List { json, admin } => (admin, json, AdminCommand::List),
        PolicyCommand::Shadow { module, stop: _, admin } => {
            let (name, version) = match module {
                Some(label) => cachet::admin::split_label(&label).map_err(anyhow::Error::msg)?,
                None => (String::new(), String::new()),
            };
            (admin, false, AdminCommand::Shadow { name, version })
        }
    };
    let token = admin.token()?;
    let mut config = admin.client.config()?;
    // Activation hands every resident entry to the new policy: give it time.
    config.timeout = config.timeout.max(Duration::from_secs(120));
    block_on(async move {
        let client = Client::connect(config).await?;
        let listing = match command {
            // Large components go in chunks.
            AdminCommand::Load { name, version, config, module, fuel_per_call, max_memory_bytes, .. } => {
                client.load_module(&token, &name, &version, config, module, fuel_per_call, max_memory_bytes).await
            }
            command => client.admin(&token, command).await,
        };
        client.close().await;
        let listing = listing?;
        if json {
            println!("{}", serde_json::to_string(&listing)?);
        } else {
            print_listing(&listing);
        }
        Ok(())
    })
}

fn print_listing(listing: &PolicyListing) {
    if !listing.message.is_empty() {
        println!("{}\n", listing.message);
    }
    println!("active    {}", listing.active);
    println!("previous  {}", listing.previous.as_deref().unwrap_or("-"));
    println!("swaps     {}   quarantines {}\n", listing.swaps, listing.quarantines);
    println!("| {:<22} | {:<8} | {:<12} | {:>6} | {:<6} | state", "module", "source", "sha256", "faults", "active");
    for m in &listing.modules {
        let sha = if m.sha256.is_empty() { "-" } else { m.sha256.get(..12).unwrap_or(&m.sha256) };
        let label = format!("{}@{}", m.name, m.version);
        let active = if m.active { "yes" } else { "" };
        println!("| {label:<22} | {:<8} | {sha:<12} | {:>6} | {active:<6} | {}", m.source, m.faults, m.state);
    }
    println!();
    for shard in &listing.shards {
        let fallback = if shard.on_fallback { " (on native fallback)" } else { "" };
        println!(
            "shard {:<3} {}{fallback}, {} entries, {} faults",
            shard.shard, shard.module, shard.entries, shard.faults
        );
    }
    if let Some(shadow) = &listing.shadow {
        println!(
            "\nshadow    {} on {:.2}% of keys, {} sampled reads: predicted hit ratio {:.4} vs active {:.4} on the same sample (live {:.4}){}",
            shadow.candidate,
            shadow.sample_rate * 100.0,
            shadow.sampled_reads,
            shadow.candidate_hit_ratio,
            shadow.active_hit_ratio,
            shadow.live_hit_ratio,
            if shadow.candidate_faults > 0 {
                format!("; candidate faulted {} times", shadow.candidate_faults)
            } else {
                String::new()
            }
        );
    }
}

fn block_on<F: Future<Output = Result<()>>>(future: F) -> Result<()> {
    tokio::runtime::Builder::new_current_thread().enable_all().build()?.block_on(future)
}

fn cores() -> usize {
    std::thread::available_parallelism().map(usize::from).unwrap_or(1)
}

fn run_serve(args: ServeArgs) -> Result<()> {
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
            replication_factor: args.replication_factor.unwrap_or(2),
            consistency: args.consistency.unwrap_or_default(),
            detect_within_ms: args.detect_ms.unwrap_or(2_000),
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

fn run_bench(args: BenchArgs) -> Result<()> {
    let client = match args.protocol {
        // Plain TCP: no certificates to find.
        bench::Protocol::Resp => ClientConfig::new(args.client.server),
        bench::Protocol::Quic => args.client.config()?,
    };
    let options = BenchOptions {
        client: client.clone(),
        duration: Duration::from_secs_f64(args.duration),
        connections: args.connections,
        concurrency: args.concurrency,
        keys: args.keys,
        value_size: args.value_size,
        get_ratio: args.get_ratio,
        zipf: args.zipf,
        rate: args.rate,
        threads: args.threads.unwrap_or_else(cores),
        server_pid: args.server_pid,
        preload: !args.no_preload,
        protocol: args.protocol,
        pipeline: args.pipeline,
        cluster: args
            .cluster_members
            .iter()
            .map(|addr| {
                let mut config = client.clone();
                config.server = *addr;
                config
            })
            .collect(),
        consistency: args.client.consistency,
    };
    let report: BenchReport = bench::run(&options)?;
    println!(
        "mode          {} loop{}",
        report.mode,
        report.target_rate.map(|r| format!(" at {r:.0} req/s")).unwrap_or_default()
    );
    println!("ops           {} ({:.0} ops/s), {} errors", report.ops, report.ops_per_sec, report.errors);
    println!(
        "latency us    p50 {:.0}  p99 {:.0}  p99.9 {:.0}  max {:.0}",
        report.p50_us, report.p99_us, report.p999_us, report.max_us
    );
    println!("hit ratio     {:.4}", report.hit_ratio);
    if let Some(cpu) = report.server_cpu_us_per_op {
        println!("server CPU    {cpu:.2} us/op");
    }
    if args.json {
        println!("{}", serde_json::to_string(&report)?);
    }
    Ok(())
}

fn parse_config(pairs: &[String]) -> Result<Vec<(String, String)>> {
    pairs
        .iter()
        .map(|pair| match pair.split_once('=') {
            Some((k, v)) if !k.is_empty() => Ok((k.to_string(), v.to_string())),
            _ => bail!("--config expects KEY=VALUE, got `{pair}`"),
        })
        .collect()
}

fn progress_bar(len: Option<u64>, what: &str) -> ProgressBar {
    if !std::io::stderr().is_terminal() {
        return ProgressBar::hidden();
    }
    let bar = match len {
        Some(len) => ProgressBar::new(len).with_style(
            ProgressStyle::with_template("{msg} [{bar:40}] {pos}/{len} ({per_sec})")
                .unwrap_or_else(|_| ProgressStyle::default_bar()),
        ),
        None => ProgressBar::new_spinner(),
    };
    bar.with_message(what.to_string())
}

fn run_sim(args: SimArgs) -> Result<()> {
    let policy_names = if args.policies.is_empty() { vec![args.policy.clone()] } else { args.policies.clone() };
    let spec = |name: &str| -> Result<PolicySpec> {
        Ok(PolicySpec {
            name_or_path: name.to_string(),
            native: args.native,
            config: parse_config(&args.config)?,
            limits: Limits {
                fuel_per_call: args.fuel_per_call,
                max_memory_bytes: args.max_policy_memory,
                ..Limits::default()
            },
        })
    };
    let engine = PolicyEngine::new()?;
    let bar = progress_bar(None, "reading trace");
    let requests = sim::load_trace(&args.trace, |n| bar.set_position(n))?;
    bar.finish_and_clear();
    let distinct = sim::distinct_keys(&requests);
    let sizes: Vec<Option<u64>> = if args.sweep {
        sim::sweep_sizes(distinct).into_iter().map(|(_, size)| Some(size)).collect()
    } else {
        vec![args.capacity]
    };
    let mut reports = Vec::new();
    for name in &policy_names {
        for &capacity in &sizes {
            let options = SimOptions {
                trace: args.trace.clone(),
                policy: spec(name)?,
                capacity,
                capacity_bytes: args.capacity_bytes,
                seed: args.seed,
            };
            let bar = progress_bar(Some(requests.len() as u64), &format!("{name} at {}", capacity.unwrap_or(0)));
            let report = sim::replay(&engine, &options, &requests, |n| bar.set_position(n))
                .with_context(|| format!("simulating {} with {name}", args.trace.display()))?;
            bar.finish_and_clear();
            reports.push(report);
        }
    }
    if let Some(path) = &args.plot {
        let series: Vec<plot::Series> = policy_names
            .iter()
            .zip(reports.chunks(sizes.len()))
            .map(|(name, runs)| plot::Series {
                label: name.clone(),
                points: runs.iter().map(|r| (r.capacity.unwrap_or(0), r.miss_ratio)).collect(),
            })
            .collect();
        let title = format!(
            "{}: miss ratio by cache size",
            args.trace.file_name().map(|f| f.to_string_lossy()).unwrap_or_default()
        );
        std::fs::write(path, plot::svg(&title, &series)).with_context(|| format!("writing {}", path.display()))?;
        eprintln!("wrote {}", path.display());
    }
    if let [report] = reports.as_slice() {
        print_report(report);
        if args.json {
            println!("{}", serde_json::to_string(report)?);
        }
        return Ok(());
    }
    print_table(&args.trace, distinct, &sizes, &policy_names, &reports);
    if args.json {
        let summary = serde_json::json!({
            "trace": args.trace.display().to_string(),
            "requests": requests.len(),
            "distinct_keys": distinct,
            "results": reports,
        });
        println!("{summary}");
    }
    Ok(())
}

/// Rows are policies, columns sizes.
fn print_table(trace: &std::path::Path, distinct: u64, sizes: &[Option<u64>], names: &[String], reports: &[SimReport]) {
    println!("{} ({} distinct keys): miss ratio by cache size (objects)\n", trace.display(), distinct);
    print!("| {:<10} |", "policy");
    for size in sizes {
        print!(" {:>9} |", size.map(|s| s.to_string()).unwrap_or_else(|| "bytes".into()));
    }
    println!();
    print!("|{}|", "-".repeat(12));
    for _ in sizes {
        print!("{}|", "-".repeat(11));
    }
    println!();
    for (name, runs) in names.iter().zip(reports.chunks(sizes.len())) {
        print!("| {name:<10} |");
        for r in runs {
            print!(" {:>9.4} |", r.miss_ratio);
        }
        println!();
    }
}

fn print_report(r: &SimReport) {
    let capacity = match (r.capacity, r.capacity_bytes) {
        (Some(n), None) => format!("{n} objects"),
        (None, Some(b)) => format!("{b} bytes"),
        (Some(n), Some(b)) => format!("{n} objects / {b} bytes"),
        (None, None) => "unbounded".into(),
    };
    println!("policy          {} {} ({})", r.policy, r.policy_version, r.runtime);
    println!("capacity        {capacity}");
    println!("requests        {}", r.requests);
    println!("hits / misses   {} / {}", r.hits, r.misses);
    println!("miss ratio      {:.4}", r.miss_ratio);
    println!("evictions       {}", r.evictions);
    println!("replay rate     {:.0} requests/s", r.requests_per_sec);
    println!("policy faults   {}", r.policy_faults);
}
