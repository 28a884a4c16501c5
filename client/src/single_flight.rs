//! Local single-flight for `get_or_load`: concurrent misses on one key in
//! this process run one loader; every waiter gets its value or its error.

use crate::ClientError;
use bytes::Bytes;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use tokio::sync::oneshot;

/// A failed load, shared by every caller that waited on it.
#[derive(Clone, Debug, thiserror::Error)]
pub enum LoadError {
    /// The cache could not be read or written.
    #[error(transparent)]
    Cache(#[from] ClientError),
    /// The loader failed.
    #[error("loader failed: {0}")]
    Loader(Arc<dyn std::error::Error + Send + Sync>),
}

impl LoadError {
    pub(crate) fn from_client(err: ClientError) -> Self {
        Self::Cache(err)
    }

    pub(crate) fn from_loader<E: std::error::Error + Send + Sync + 'static>(err: E) -> Self {
        Self::Loader(Arc::new(err))
    }
}

type Waiters = Vec<oneshot::Sender<Result<Bytes, LoadError>>>;

#[derive(Default)]
pub(crate) struct SingleFlight {
    in_flight: Mutex<HashMap<Bytes, Waiters>>,
}

impl SingleFlight {
    /// Runs `load` unless a load of `key` is already running, in which case
    /// waits for that one.
    pub(crate) async fn run(
        &self,
        key: Bytes,
        load: impl Future<Output = Result<Bytes, LoadError>>,
    ) -> Result<Bytes, LoadError> {
        let waiter = {
            let mut map = self.in_flight.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            match map.get_mut(&key) {
                Some(waiters) => {
                    let (tx, rx) = oneshot::channel();
                    waiters.push(tx);
                    Some(rx)
                }
                None => {
                    map.insert(key.clone(), Vec::new());
                    None
                }
            }
        };
        if let Some(rx) = waiter {
            return rx.await.unwrap_or_else(|_| {
                Err(LoadError::Cache(ClientError::Connection("the leading load was cancelled".into())))
            });
        }
        // Removes the entry if this future is dropped mid-load, so later
        // callers start a new load instead of waiting forever; disarmed once
        // the load has finished and removed the entry itself (a later leader
        // may own the key by then).
        struct Leader<'a> {
            flight: &'a SingleFlight,
            key: Bytes,
            armed: bool,
        }
        impl Drop for Leader<'_> {
            fn drop(&mut self) {
                if self.armed {
                    let mut map = self.flight.in_flight.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
                    map.remove(&self.key);
                }
            }
        }
        let mut leader = Leader { flight: self, key: key.clone(), armed: true };
        let result = load.await;
        let waiters = {
            let mut map = self.in_flight.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            leader.armed = false;
            map.remove(&key).unwrap_or_default()
        };
        for tx in waiters {
            let _ = tx.send(result.clone());
        }
        result
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};

    #[tokio::test]
    async fn concurrent_loads_of_one_key_run_once_and_share_the_result() {
        let flight = Arc::new(SingleFlight::default());
        let calls = Arc::new(AtomicU32::new(0));
        let (release, gate) = tokio::sync::watch::channel(false);
        let mut tasks = Vec::new();
        for _ in 0..50 {
            let (flight, calls, mut gate) = (flight.clone(), calls.clone(), gate.clone());
            tasks.push(tokio::spawn(async move {
                flight
                    .run(Bytes::from_static(b"k"), async move {
                        calls.fetch_add(1, Ordering::SeqCst);
                        let _ = gate.wait_for(|open| *open).await;
                        Ok(Bytes::from_static(b"v"))
                    })
                    .await
            }));
        }
        // Let every task reach the flight before the leader may finish.
        for _ in 0..20 {
            tokio::task::yield_now().await;
        }
        let _ = release.send(true);
        for task in tasks {
            assert_eq!(task.await.expect("joins").expect("loads"), Bytes::from_static(b"v"));
        }
        assert_eq!(calls.load(Ordering::SeqCst), 1);
    }
}
