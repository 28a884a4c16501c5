//! Change data capture from PostgreSQL: a namespace's `invalidate` feed
//! LISTENs on a channel and turns each notification (payload = the key
//! without its prefix) into an invalidation of that key.
//!
//! Notifications sent while the feed is not listening are lost, so every
//! connection, the first included, invalidates the whole namespace once it
//! listens: values loaded before the feed first connected (or during an
//! outage) may have changed unseen, so the cache refills from the database.
//!
//! The feed connects with its origin's TLS (`sslmode`, `sslrootcert`).

use super::Loaders;
use super::config::InvalidateConfig;
use super::pg_tls::PgTls;
use std::sync::{Arc, Weak};
use std::time::Duration;
use tokio_postgres::AsyncMessage;

/// Starts the feed of namespace `index` on the loader runtime. It stops
/// when the loaders are dropped.
pub(super) fn start(loaders: &Arc<Loaders>, index: usize, feed: &InvalidateConfig) {
    let Some(handle) = loaders.runtime_handle() else { return };
    let Some((config, tls)) = loaders.origins().postgres_config(&feed.origin) else { return };
    let weak = Arc::downgrade(loaders);
    let channel = feed.channel.clone();
    handle.spawn(async move {
        let mut backoff = Duration::from_millis(100);
        loop {
            match listen(&weak, index, &config, &tls, &channel).await {
                Ok(()) => return,
                Err(err) => tracing::warn!(%err, channel, "invalidation feed lost; reconnecting"),
            }
            if weak.upgrade().is_none() {
                return;
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_secs(5));
        }
    });
}

/// One connection's life: LISTEN, then invalidate on every notification.
/// `Ok` when the loaders are gone.
async fn listen(
    weak: &Weak<Loaders>,
    index: usize,
    config: &tokio_postgres::Config,
    tls: &PgTls,
    channel: &str,
) -> Result<(), String> {
    let (client, mut connection) = config.connect(tls.clone()).await.map_err(|e| e.to_string())?;
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    // The connection must be polled for the LISTEN to complete and for
    // notifications to arrive.
    let pump = tokio::spawn(async move {
        loop {
            match std::future::poll_fn(|cx| connection.poll_message(cx)).await {
                Some(Ok(AsyncMessage::Notification(n))) => {
                    if tx.send(Ok(n.payload().to_string())).is_err() {
                        return;
                    }
                }
                Some(Ok(_)) => {}
                Some(Err(err)) => {
                    let _ = tx.send(Err(err));
                    return;
                }
                None => return,
            }
        }
    });
    // The channel name was checked to be [A-Za-z0-9_]; quoted anyway.
    let listened = client.batch_execute(&format!("LISTEN \"{channel}\"")).await;
    if let Err(err) = listened {
        pump.abort();
        return Err(err.to_string());
    }
    {
        let Some(loaders) = weak.upgrade() else { return Ok(()) };
        // Whatever changed before this LISTEN (before the first connection,
        // or while disconnected) was announced to no one.
        loaders.invalidate_namespace(index);
        tracing::info!(channel, prefix = loaders.namespace_prefix(index), "invalidation feed listening");
    }
    loop {
        let message = tokio::select! {
            message = rx.recv() => message,
            // Wake now and then to notice the loaders going away.
            _ = tokio::time::sleep(Duration::from_secs(1)) => {
                if weak.upgrade().is_none() {
                    pump.abort();
                    return Ok(());
                }
                continue;
            }
        };
        let Some(loaders) = weak.upgrade() else {
            pump.abort();
            return Ok(());
        };
        match message {
            Some(Ok(payload)) => {
                let mut key = loaders.namespace_prefix(index).as_bytes().to_vec();
                key.extend_from_slice(payload.as_bytes());
                loaders.invalidate_key(&key);
            }
            Some(Err(err)) => return Err(err.to_string()),
            None => {
                drop(client);
                return Err("the server closed the connection".into());
            }
        }
    }
}
