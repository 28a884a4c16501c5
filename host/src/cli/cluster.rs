//! `cachet cluster ...`: membership operations and cluster-wide settings
//! on a running cluster, through any member (admin token required). Each
//! is an entry in the cluster's metadata log; `cachet stats` shows its
//! progress.

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
    /// The cluster's read-through loaders: every member builds its loaders
    /// from FILE (the TOML of `cachet serve --loaders`; its modules travel
    /// with it) and puts them in place of the old ones, without a restart.
    /// Answered once the member asked runs them; `cachet stats` shows each
    /// member's.
    Loaders {
        /// The loader configuration.
        #[arg(required_unless_present = "none")]
        file: Option<std::path::PathBuf>,
        /// Drop the cluster's loaders instead.
        #[arg(long, conflicts_with = "file")]
        none: bool,
        #[command(flatten)]
        admin: AdminArgs,
    },
}

pub(crate) fn run_cluster(command: ClusterCommand) -> Result<()> {
    match command {
        ClusterCommand::Decommission { node, admin } => admin_call(&admin, |client, token| async move {
            client.admin(&token, AdminCommand::Decommission { node }).await
        }),
        ClusterCommand::Loaders { file, none: _, admin } => {
            let shared = match file {
                Some(path) => {
                    let config = cachet::loader::LoaderConfig::load(&path)?;
                    Some(cachet::loader::shared::SharedLoaders::from_config(&config)?)
                }
                None => None,
            };
            admin_call(&admin, |client, token| async move {
                let (config, modules) = match shared {
                    Some(shared) => {
                        let modules = shared.modules.into_iter().map(|(sha, bytes)| (sha, bytes.into())).collect();
                        (Some(shared.config), modules)
                    }
                    None => (None, Vec::new()),
                };
                client.set_loaders(&token, config, modules).await
            })
        }
    }
}

/// Runs one admin call on the member `admin` names and prints its answer.
fn admin_call<F, Fut>(admin: &AdminArgs, call: F) -> Result<()>
where
    F: FnOnce(std::sync::Arc<Client>, String) -> Fut,
    Fut: Future<Output = Result<cachet_client::PolicyListing, cachet_client::ClientError>>,
{
    let token = admin.token()?;
    let config = admin.client.config()?;
    block_on(async move {
        let client = std::sync::Arc::new(Client::connect(config).await?);
        let reply = call(client.clone(), token).await;
        client.close().await;
        println!("{}", reply?.message);
        Ok(())
    })
}
