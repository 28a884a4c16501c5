//! `cachet cluster ...`: membership operations on a running cluster,
//! through any member (admin token required). Each is an entry in the
//! cluster's metadata log; `cachet stats` shows its progress.

use super::block_on;
use super::client_args::AdminArgs;
use anyhow::Result;
use cachet_client::{AdminCommand, Client};
use clap::Subcommand;

#[derive(Subcommand)]
pub(crate) enum ClusterCommand {
    /// Member NODE leaves for good: its slots move to the other members
    /// (each re-syncs what it gains), then it leaves the metadata log and
    /// can be stopped. For a member that is dead, the same command
    /// replaces it: its slots move to the members that are up.
    Decommission {
        /// The member's node id.
        node: u32,
        #[command(flatten)]
        admin: AdminArgs,
    },
}

pub(crate) fn run_cluster(command: ClusterCommand) -> Result<()> {
    let ClusterCommand::Decommission { node, admin } = command;
    let token = admin.token()?;
    let config = admin.client.config()?;
    block_on(async move {
        let client = Client::connect(config).await?;
        let reply = client.admin(&token, AdminCommand::Decommission { node }).await;
        client.close().await;
        println!("{}", reply?.message);
        Ok(())
    })
}
