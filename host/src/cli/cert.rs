//! `cachet cert issue`: node and client certificates signed by a cluster's
//! own CA.

use anyhow::{Result, bail};
use cachet::server;
use clap::Subcommand;
use std::path::PathBuf;

#[derive(Subcommand)]
pub(crate) enum CertCommand {
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

/// `cachet cert ...`: prints the files written.
pub(crate) fn run_cert(command: CertCommand) -> Result<()> {
    let CertCommand::Issue { node_id, client, ca, out, names } = command;
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
