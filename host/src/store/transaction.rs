//! MULTI/EXEC and WATCH on one node: a transaction's commands run with
//! every shard they touch locked at once, so no other client's command
//! runs between them, and EXEC refuses (runs nothing) when a key WATCH
//! named changed since.
//!
//! Shards are locked in index order, by transactions only (every other
//! path holds one shard at a time), so two transactions never wait on each
//! other in a cycle. A watched key changed if its watch stamp moved
//! ([`Store`]'s stamps: every write moves its key's bucket, under the
//! key's shard lock) or the store was flushed; the check is made with the
//! watched keys' shards locked, and the commands run under the same locks.
//! Two keys sharing a bucket make a change to one abort a transaction
//! watching the other: a spurious abort, which the client retries as it
//! retries any. Evictions and expiries do not count as changes: a cache
//! may drop any key at any time, and a transaction that then writes it
//! does what it would have done just before the drop.

use super::commands::execute_on;
use super::shards::Shards;
use super::{Store, lock};
use crate::core::Shard;
use bytes::Bytes;
use cachet_proto::{Request, Response};
use std::sync::MutexGuard;
use std::sync::atomic::Ordering;

/// Keys watched on a connection, with their stamps when WATCH ran.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Watched {
    keys: Vec<(Bytes, u64)>,
    /// The store's flush count when the first key was watched.
    flushes: Option<u64>,
}

impl Watched {
    /// Keys watched.
    pub fn len(&self) -> usize {
        self.keys.len()
    }

    /// Whether no key is watched.
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// Bytes of watched keys.
    pub fn bytes(&self) -> usize {
        self.keys.iter().map(|(k, _)| k.len()).sum()
    }

    /// The watched keys.
    pub fn keys(&self) -> impl Iterator<Item = &Bytes> {
        self.keys.iter().map(|(k, _)| k)
    }
}

/// The shards a transaction holds, by index.
struct Held<'a> {
    store: &'a Store,
    guards: Vec<Option<MutexGuard<'a, Shard>>>,
}

impl Held<'_> {
    fn shard(&mut self, key: &[u8]) -> &mut Shard {
        let i = self.store.shard_index(key);
        // Every key's shard was locked up front (see `Store::transaction`);
        // one missed would be locked here, out of order, rather than run
        // unlocked.
        self.guards[i].get_or_insert_with(|| lock(&self.store.shards[i]))
    }
}

impl Shards for Held<'_> {
    fn with<R>(&mut self, key: &[u8], f: impl FnOnce(&mut Shard) -> R) -> R {
        f(self.shard(key))
    }

    fn write<R>(&mut self, key: &[u8], f: impl FnOnce(&mut Shard) -> R) -> R {
        let result = f(self.shard(key));
        self.store.touched(key);
        result
    }

    fn count(&mut self) -> u64 {
        self.guards.iter().flatten().map(|s| s.len() as u64).sum()
    }

    fn clear(&mut self) -> u64 {
        self.store.flushes.fetch_add(1, Ordering::AcqRel);
        let now = self.store.now_ms();
        let cleared = self.guards.iter_mut().flatten().map(|s| s.clear(now) as u64).sum();
        self.store.flushes.fetch_add(1, Ordering::AcqRel);
        cleared
    }

    fn max_value_len(&self) -> usize {
        self.store.config.max_value_size
    }

    /// Never called: KEYS, SCAN and RANDOMKEY are refused inside a
    /// transaction (`Node::transaction_refusal`); a walk here would lock
    /// shards already held.
    fn scan(&mut self, _: u64, _: usize, _: &mut crate::core::ScanVisitor<'_>) -> Option<u64> {
        None
    }

    fn shard_count(&self) -> usize {
        self.store.shards.len()
    }

    /// Never called (see `scan`).
    fn slots(&mut self, _: usize) -> usize {
        0
    }
}

impl Store {
    /// WATCH: notes `keys`' stamps (each read under its shard's lock, so
    /// it orders with the writes to the key).
    pub fn watch(&self, keys: &[Bytes], into: &mut Watched) {
        into.flushes.get_or_insert_with(|| self.flushes.load(Ordering::Acquire));
        for key in keys {
            let guard = self.shard(key);
            let stamp = self.stamp(key).load(Ordering::Relaxed);
            drop(guard);
            into.keys.push((key.clone(), stamp));
        }
    }

    /// EXEC: runs `requests` at `now` with every shard they (and the
    /// watched keys) touch locked, in order; `None`, running nothing, if a
    /// watched key changed since it was watched.
    pub fn transaction(&self, now: u64, requests: Vec<Request>, watched: &Watched) -> Option<Vec<Response>> {
        let every = requests.iter().any(|r| matches!(r, Request::DbSize | Request::FlushAll));
        let mut wanted = vec![every; self.shards.len()];
        for key in requests.iter().flat_map(Request::keys).chain(watched.keys()) {
            wanted[self.shard_index(key)] = true;
        }
        let guards = wanted.iter().enumerate().map(|(i, w)| w.then(|| lock(&self.shards[i]))).collect();
        let mut held = Held { store: self, guards };
        let flushed = watched.flushes.is_some_and(|f| f != self.flushes.load(Ordering::Acquire));
        if flushed || watched.keys.iter().any(|(key, stamp)| self.stamp(key).load(Ordering::Relaxed) != *stamp) {
            return None;
        }
        // The replies are bounded as one reply is: past the limit, a value
        // read is dropped and its place answers why (the commands still
        // all run: a transaction is all or nothing).
        let limit = cachet_proto::MAX_REPLY_LEN;
        let mut total = 0usize;
        let replies = requests
            .into_iter()
            .map(|request| {
                let reply = execute_on(&mut held, now, request);
                total = total.saturating_add(reply_size(&reply));
                if total > limit && reply_size(&reply) > 64 {
                    return Response::Error(cachet_proto::ErrorReply::new(
                        cachet_proto::ErrorCode::TooLarge,
                        format!("the transaction's replies would exceed {limit} bytes"),
                    ));
                }
                reply
            })
            .collect();
        Some(replies)
    }
}

/// About how many bytes a reply takes.
fn reply_size(reply: &Response) -> usize {
    match reply {
        Response::Value(Some(v)) => v.len() + 16,
        Response::Values(values) => values.iter().map(|v| v.as_ref().map_or(0, Bytes::len) + 16).sum(),
        Response::Scan { keys, .. } => keys.iter().map(|k| k.len() + 16).sum(),
        _ => 16,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{MonotonicClock, NodeConfig};
    use cachet_proto::Condition;
    use std::sync::Arc;

    fn store(shards: usize) -> Arc<Store> {
        let config = NodeConfig { shards, ..NodeConfig::default() };
        let policy = crate::policies::native(crate::policies::DEFAULT_POLICY, cachet_policy_sdk::Config::default())
            .expect("default policy");
        Arc::new(Store::new(config, policy, Arc::new(MonotonicClock::new())).expect("store"))
    }

    fn set(key: &str, value: &str) -> Request {
        Request::Set {
            key: Bytes::copy_from_slice(key.as_bytes()),
            value: Bytes::copy_from_slice(value.as_bytes()),
            ttl_ms: None,
            condition: Condition::Always,
            hint: 0,
        }
    }

    fn b(s: &str) -> Bytes {
        Bytes::copy_from_slice(s.as_bytes())
    }

    #[test]
    fn a_watched_key_changed_by_another_client_aborts_the_transaction() {
        let store = store(4);
        let mut watched = Watched::default();
        store.watch(&[b("a"), b("b")], &mut watched);
        // Unchanged: runs.
        let ran = store.transaction(0, vec![set("a", "1"), Request::Get { key: b("a") }], &watched);
        assert_eq!(ran, Some(vec![Response::Ok, Response::Value(Some(b("1")))]));
        // The transaction's own write moved the stamp: a second EXEC on the
        // same watch (a client that did not WATCH again) aborts.
        assert_eq!(store.transaction(0, vec![set("a", "2")], &watched), None);
        // Another client's write aborts; reads do not.
        let mut watched = Watched::default();
        store.watch(&[b("a")], &mut watched);
        store.execute(0, Request::Get { key: b("a") });
        store.execute(0, set("unrelated", "x"));
        assert!(store.transaction(0, vec![set("a", "3")], &watched).is_some());
        let mut watched = Watched::default();
        store.watch(&[b("a")], &mut watched);
        store.execute(0, Request::Incr { key: b("a"), delta: 1 });
        assert_eq!(store.transaction(0, vec![set("a", "4")], &watched), None, "nothing ran");
        assert_eq!(store.execute(0, Request::Get { key: b("a") }), Response::Value(Some(b("4"))));
        // A flush changes every key.
        let mut watched = Watched::default();
        store.watch(&[b("zzz")], &mut watched);
        store.clear();
        assert_eq!(store.transaction(0, vec![set("zzz", "1")], &watched), None);
    }

    #[test]
    fn no_command_runs_between_a_transactions_commands() {
        // Two threads: one moves 1 from `x` to `y` in transactions, one
        // reads both in transactions; every read sees x + y = 0.
        let store = store(4);
        let moves = 2_000;
        let mover = {
            let store = store.clone();
            std::thread::spawn(move || {
                for _ in 0..moves {
                    let requests =
                        vec![Request::Incr { key: b("x"), delta: -1 }, Request::Incr { key: b("y"), delta: 1 }];
                    store.transaction(0, requests, &Watched::default()).expect("no watch");
                }
            })
        };
        let mut seen = 0;
        while !mover.is_finished() || seen == 0 {
            let read = vec![Request::MGet { keys: vec![b("x"), b("y")] }];
            let Some(replies) = store.transaction(0, read, &Watched::default()) else { panic!("no watch") };
            let Response::Values(values) = &replies[0] else { panic!("{replies:?}") };
            let n = |v: &Option<Bytes>| {
                v.as_ref().map_or(0, |v| String::from_utf8_lossy(v).parse::<i64>().expect("a counter"))
            };
            assert_eq!(n(&values[0]) + n(&values[1]), 0, "a read between the two halves of a move");
            seen += 1;
        }
        mover.join().expect("mover");
        assert_eq!(store.execute(0, Request::Get { key: b("y") }), Response::Value(Some(b(&moves.to_string()))));
    }
}
