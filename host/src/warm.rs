//! Cache warming: GET a list of keys through a node, so each missing key is
//! loaded by its namespace's loader, at a bounded rate, so a new or
//! restarted node fills without stampeding the database.
//!
//! Every GET makes at most one origin query (a miss loads once; a hit makes
//! none), so spacing the GETs' starts `1/rate` s apart bounds the origin's
//! query rate: in any interval of `t` seconds at most `rate * t + 1` loads
//! start. At most `concurrency` GETs are outstanding at once; a slow origin
//! slows warming rather than piling up requests.

use bytes::Bytes;
use cachet_client::Client;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// How warming went.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct WarmReport {
    /// Keys requested.
    pub keys: u64,
    /// Keys that now hold a value (loaded, or already cached).
    pub present: u64,
    /// Keys the origin does not have.
    pub missing: u64,
    /// Keys whose GET failed (the error is logged).
    pub failed: u64,
    /// Wall time.
    pub elapsed: Duration,
}

/// The keys of a key list file: one per line, blank lines skipped, a
/// trailing `\r` dropped.
pub fn parse_key_list(text: &[u8]) -> Vec<Bytes> {
    text.split(|&b| b == b'\n')
        .map(|line| line.strip_suffix(b"\r").unwrap_or(line))
        .filter(|line| !line.is_empty())
        .map(Bytes::copy_from_slice)
        .collect()
}

/// GETs `keys` through `client`, starting at most `rate` per second with at
/// most `concurrency` outstanding; `on_done` is called after each key (for
/// a progress bar).
pub async fn warm(
    client: Arc<Client>,
    keys: Vec<Bytes>,
    rate: u32,
    concurrency: usize,
    on_done: impl Fn() + Send + Sync + 'static,
) -> WarmReport {
    let started = Instant::now();
    let period = Duration::from_secs_f64(1.0 / f64::from(rate.max(1)));
    let slots = Arc::new(tokio::sync::Semaphore::new(concurrency.max(1)));
    let counts = Arc::new([AtomicU64::new(0), AtomicU64::new(0), AtomicU64::new(0)]);
    let on_done = Arc::new(on_done);
    let total = keys.len() as u64;
    let mut tasks = tokio::task::JoinSet::new();
    let mut next = tokio::time::Instant::now();
    for key in keys {
        tokio::time::sleep_until(next).await;
        let Ok(permit) = slots.clone().acquire_owned().await else { break };
        // Spaced from the actual start, so waiting on a slot never
        // lets starts bunch up afterwards.
        next = tokio::time::Instant::now() + period;
        let (client, counts, on_done) = (client.clone(), counts.clone(), on_done.clone());
        tasks.spawn(async move {
            let slot = match client.get(&key).await {
                Ok(Some(_)) => 0,
                Ok(None) => 1,
                Err(err) => {
                    tracing::warn!(key = %key.escape_ascii(), %err, "warming a key failed");
                    2
                }
            };
            counts[slot].fetch_add(1, Ordering::Relaxed);
            on_done();
            drop(permit);
        });
        // Reap finished tasks as we go, so the set stays small.
        while tasks.try_join_next().is_some() {}
    }
    while tasks.join_next().await.is_some() {}
    WarmReport {
        keys: total,
        present: counts[0].load(Ordering::Relaxed),
        missing: counts[1].load(Ordering::Relaxed),
        failed: counts[2].load(Ordering::Relaxed),
        elapsed: started.elapsed(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_lists_skip_blank_lines_and_carriage_returns() {
        let keys = parse_key_list(b"user:1\r\n\nuser:2\nuser:3");
        assert_eq!(keys, vec![Bytes::from("user:1"), Bytes::from("user:2"), Bytes::from("user:3")]);
        assert!(parse_key_list(b"").is_empty());
    }
}
