//! `cachet get`, `set`, `del` and `incr`: one request to a node, its
//! answer on stdout.

use super::block_on;
use super::client_args::ClientArgs;
use anyhow::{Result, bail};
use cachet_client::{Condition, SetOptions};
use std::time::Duration;

/// `cachet get`: prints the value, or fails with nothing on stdout on a miss.
pub(crate) fn get(key: String, client: ClientArgs) -> Result<()> {
    block_on(async move {
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
    })
}

/// `cachet set`: prints `OK`, or fails when the `--nx`/`--xx` condition did not hold.
pub(crate) fn set(key: String, value: String, ttl: Option<f64>, nx: bool, xx: bool, client: ClientArgs) -> Result<()> {
    block_on(async move {
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
    })
}

/// `cachet del`: prints how many of the keys existed.
pub(crate) fn del(keys: Vec<String>, client: ClientArgs) -> Result<()> {
    block_on(async move {
        let client = client.connect().await?;
        let deleted = client.delete(&keys).await;
        client.close().await;
        println!("{}", deleted?);
        Ok(())
    })
}

/// `cachet incr`: prints the new value.
pub(crate) fn incr(key: String, by: i64, client: ClientArgs) -> Result<()> {
    block_on(async move {
        let client = client.connect().await?;
        let counted = client.incr(&key, by).await;
        client.close().await;
        println!("{}", counted?);
        Ok(())
    })
}
