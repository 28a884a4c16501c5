//! The flags every client command takes: how to reach and trust a node
//! (`--server`, `--ca`, `--dev-ca`, a client certificate, timeouts,
//! `--consistency`), and the admin token (`--admin-token-file` or
//! `CACHET_ADMIN_TOKEN`).

use anyhow::{Context, Result, bail};
use cachet::server;
use cachet_client::{Client, ClientConfig};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

#[derive(clap::Args)]
pub(crate) struct AdminArgs {
    /// File holding the node's admin token [default: $CACHET_ADMIN_TOKEN].
    #[arg(long)]
    pub(super) admin_token_file: Option<PathBuf>,
    #[command(flatten)]
    pub(super) client: ClientArgs,
}

impl AdminArgs {
    pub(super) fn token(&self) -> Result<String> {
        match optional_token(self.admin_token_file.as_deref())? {
            Some(token) => Ok(token),
            None => bail!("policy commands need the admin token: --admin-token-file FILE or CACHET_ADMIN_TOKEN"),
        }
    }
}

/// The admin token from `file`, else from `CACHET_ADMIN_TOKEN`, if either
/// is given: commands that work without one but show more with it (hot
/// keys in `stats`).
pub(super) fn optional_token(file: Option<&std::path::Path>) -> Result<Option<String>> {
    match file {
        Some(path) => read_token(path).map(Some),
        None => match std::env::var("CACHET_ADMIN_TOKEN") {
            Ok(token) if !token.trim().is_empty() => Ok(Some(token.trim().to_string())),
            _ => Ok(None),
        },
    }
}

/// Reads a token file; surrounding whitespace (a trailing newline) is not
/// part of the token.
pub(super) fn read_token(path: &std::path::Path) -> Result<String> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading the admin token {}", path.display()))?;
    let token = text.trim();
    if token.is_empty() {
        bail!("the admin token file {} is empty", path.display());
    }
    Ok(token.to_string())
}

#[derive(clap::Args, Clone)]
pub(crate) struct ClientArgs {
    /// The node's address.
    #[arg(long, default_value = "127.0.0.1:7070")]
    pub(super) server: SocketAddr,
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
    pub(super) consistency: Option<cachet_client::Consistency>,
}

impl ClientArgs {
    /// Connects, asking for `--consistency` when given.
    pub(super) async fn connect(&self) -> Result<Client> {
        let client = Client::connect(self.config()?).await?;
        Ok(match self.consistency {
            Some(level) => client.at(level),
            None => client,
        })
    }

    pub(super) fn config(&self) -> Result<ClientConfig> {
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
