//! `cachet warm`: fill a node by GETting a key list (a file, or another
//! node's hot keys) at a bounded rate.

use super::block_on;
use super::client_args::{ClientArgs, optional_token};
use super::stats::{HOT_KEYS_NEED_TOKEN, node_stats};
use anyhow::{Context, Result};
use cachet_client::Client;
use indicatif::ProgressBar;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

/// `cachet warm`: prints what it found; fails if any key failed.
pub(crate) fn run_warm(
    keys: Option<PathBuf>,
    from_node: Option<SocketAddr>,
    admin_token_file: Option<PathBuf>,
    rate: u32,
    concurrency: usize,
    quiet: bool,
    client: ClientArgs,
) -> Result<()> {
    block_on(async move {
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
    })
}
