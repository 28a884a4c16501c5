//! A clustered node keeps its replicated records in its ordinary shards, so
//! `--max-memory`, `--max-entries` and the eviction policy bound and shape
//! them like any cached data, and `cachet stats` counts them.
//!
//! Each shard value is the record's version (counter and node, 12 bytes),
//! a tag byte (value, value with expiry, or deletion), the expiry (8 bytes,
//! Unix milliseconds) when there is one, and the value. Deletions are kept
//! as small tombstones so repair cannot bring an older value back; like any
//! entry, a tombstone can be evicted, after which an older copy on another
//! replica may resurface through read repair. That is a cache's trade:
//! bounded memory over remembering every deletion.
//!
//! An expired value reads as a deletion at its version, and its shard entry
//! outlives the expiry by [`EXPIRED_KEPT_MS`] for the same reason: a
//! replica that missed the write must not repair an older value back.

use super::replica::{Record, RecordStore};
use super::version::Version;
use crate::core::SetOptions;
use crate::store::Store;
use bytes::{BufMut, Bytes, BytesMut};
use std::sync::Arc;

const VALUE: u8 = 1;
const EXPIRING: u8 = 2;
const TOMBSTONE: u8 = 0;
/// Version and tag.
const HEADER: usize = 13;
/// The most a record adds to its value's length in a shard (version, tag
/// and expiry).
pub const OVERHEAD: usize = HEADER + 8;
/// How long an expired record is kept (as a deletion) before its shard
/// entry goes.
pub const EXPIRED_KEPT_MS: u64 = 60_000;

/// Encodes `record` as a shard value.
pub fn encode(record: &Record) -> Bytes {
    let len = HEADER + 8 + record.value.as_ref().map_or(0, Bytes::len);
    let mut out = BytesMut::with_capacity(len);
    out.put_u64(record.version.counter);
    out.put_u32(record.version.node);
    match (&record.value, record.expires_at) {
        (Some(value), None) => {
            out.put_u8(VALUE);
            out.put_slice(value);
        }
        (Some(value), Some(at)) => {
            out.put_u8(EXPIRING);
            out.put_u64(at);
            out.put_slice(value);
        }
        (None, _) => out.put_u8(TOMBSTONE),
    }
    out.freeze()
}

/// Decodes a shard value written by [`encode`]; `None` for anything else
/// (which only a bug could have stored).
pub fn decode(raw: &Bytes) -> Option<Record> {
    if raw.len() < HEADER {
        return None;
    }
    let counter = u64::from_be_bytes(raw[..8].try_into().ok()?);
    let node = u32::from_be_bytes(raw[8..12].try_into().ok()?);
    let (value, expires_at) = match raw[12] {
        VALUE => (Some(raw.slice(HEADER..)), None),
        EXPIRING if raw.len() >= HEADER + 8 => {
            let at = u64::from_be_bytes(raw[HEADER..HEADER + 8].try_into().ok()?);
            (Some(raw.slice(HEADER + 8..)), Some(at))
        }
        TOMBSTONE if raw.len() == HEADER => (None, None),
        _ => return None,
    };
    // The hint is the shard entry's own, not part of the value.
    Some(Record { version: Version { counter, node }, value, expires_at, hint: 0 })
}

/// `record` as of `now` (Unix ms): past its expiry, a deletion at the same
/// version.
pub fn as_of(mut record: Record, now: u64) -> Record {
    if record.expires_at.is_some_and(|at| at <= now) {
        record.value = None;
    }
    record
}

/// The replica's records in a node's shards, bypassing loaders and
/// leases: the records are the cluster's, stored with a header of their
/// own.
pub struct ShardRecords {
    store: Arc<Store>,
}

impl ShardRecords {
    /// Records in `store`'s shards.
    pub fn new(store: Arc<Store>) -> Self {
        Self { store }
    }
}

impl RecordStore for ShardRecords {
    fn get(&self, key: &[u8], touch: bool) -> Option<Record> {
        let entry = self
            .store
            .with_shard(key, |shard, now| if touch { shard.get_entry(now, key) } else { shard.peek_entry(now, key) })?;
        let record = decode(&entry.value).map(|record| Record { hint: entry.hint, ..record });
        if record.is_none() {
            tracing::error!(key = %key.escape_ascii(), "a shard entry is not a replicated record");
        }
        // Raw, expiry included: replicas compare versions, and only the
        // coordinator's answer to a client applies the expiry (with one
        // clock), so replicas whose clocks differ cannot disagree about a
        // record at one version.
        record
    }

    fn put(&mut self, wall_ms: u64, key: &Bytes, record: &Record) -> bool {
        // The entry outlives the value's expiry, as a deletion, for a while.
        let ttl_ms = record.expires_at.map(|at| at.saturating_sub(wall_ms) + EXPIRED_KEPT_MS);
        let options = SetOptions { ttl_ms, hint: record.hint, ..SetOptions::default() };
        match self.store.with_shard(key, |shard, now| shard.set(now, key, encode(record), options)) {
            // Not admitted by the policy is as if evicted at once: a
            // cache's right, not a refusal.
            Ok(_) => true,
            Err(err) => {
                // Over a size bound: the coordinator checked sizes, so only
                // a peer with other limits sends such a record.
                tracing::warn!(%err, key = %key.escape_ascii(), "a replicated record was not stored");
                false
            }
        }
    }

    fn len(&self) -> usize {
        self.store.len() as usize
    }

    fn clear(&mut self) {
        self.store.clear();
    }

    fn scan(&self, f: &mut dyn FnMut(&Bytes, &Record)) {
        self.store.for_each(|key, raw, hint| {
            if let Some(record) = decode(&Bytes::copy_from_slice(raw)) {
                f(&Bytes::copy_from_slice(key), &Record { hint, ..record });
            }
        });
    }

    /// The cursor is [`Store::scan_from`]'s, 8 bytes big-endian; anything
    /// else but the empty start is the end (only the replica that made a
    /// cursor reads it back, through its peer: a made-up one ends that
    /// peer's own stream).
    fn scan_part(
        &self,
        cursor: &[u8],
        max_visits: usize,
        wanted: &dyn Fn(&[u8]) -> bool,
        f: &mut dyn FnMut(&Bytes, &Record) -> bool,
    ) -> Option<Bytes> {
        let start = match cursor.len() {
            0 => 0,
            8 => u64::from_be_bytes(cursor.try_into().ok()?),
            _ => return None,
        };
        let next = self.store.scan_from(start, max_visits, &mut |key, raw, hint| {
            if !wanted(key) {
                return true;
            }
            match decode(&Bytes::copy_from_slice(raw)) {
                Some(record) => f(&Bytes::copy_from_slice(key), &Record { hint, ..record }),
                None => true,
            }
        })?;
        Some(Bytes::copy_from_slice(&next.to_be_bytes()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{MonotonicClock, NodeConfig};

    fn unix_ms() -> u64 {
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
    }

    fn store(config: NodeConfig) -> Arc<Store> {
        let policy =
            policies::native(policies::DEFAULT_POLICY, cachet_policy_sdk::Config::default()).expect("default policy");
        Arc::new(Store::new(config, policy, Arc::new(MonotonicClock::new())).expect("store"))
    }
    use crate::policies;

    #[test]
    fn records_round_trip_and_garbage_is_refused() {
        for value in [Some(Bytes::from_static(b"hello")), Some(Bytes::new()), None] {
            for expires_at in [None, Some(1_700_000_000_123)] {
                let expires_at = expires_at.filter(|_| value.is_some());
                let record = Record {
                    version: Version { counter: u64::MAX - 3, node: 7 },
                    value: value.clone(),
                    expires_at,
                    hint: 0,
                };
                assert_eq!(decode(&encode(&record)), Some(record));
            }
        }
        for garbage in [&b""[..], b"short", b"0123456789AB\x02", b"0123456789AB\x03", b"0123456789AB\x00extra"] {
            assert_eq!(decode(&Bytes::copy_from_slice(garbage)), None, "{garbage:?}");
        }
    }

    /// The shards' bounds hold for replicated records: past the entry
    /// bound the policy evicts, and the store reports what it holds.
    #[test]
    fn records_in_shards_are_bounded_by_the_node() {
        let config = NodeConfig { shards: 2, max_entries: 100, ..NodeConfig::default() };
        let node = store(config);
        let mut store = ShardRecords::new(node.clone());
        for i in 0..1_000u64 {
            let value = Some(Bytes::from(vec![1; 10]));
            let record = Record { version: Version { counter: i + 1, node: 0 }, value, expires_at: None, hint: 0 };
            store.put(unix_ms(), &Bytes::from(format!("k{i}")), &record);
        }
        assert!(store.len() <= 100, "{} records held", store.len());
        assert!(node.stats().evictions >= 900, "{:?}", node.stats().evictions);
        let mut seen = 0;
        store.scan(&mut |_, record| {
            assert_eq!(record.value.as_deref(), Some(&[1u8; 10][..]));
            seen += 1;
        });
        assert_eq!(seen, store.len());
        let last = Bytes::from_static(b"k999");
        assert_eq!(store.get(&last, false).map(|r| r.version.counter), Some(1_000), "the newest write is resident");
        store.clear();
        assert!(store.is_empty());
    }

    /// A store keeps an expired record as it is (replicas compare raw
    /// records), and [`as_of`] reads it as a deletion at its own version, so
    /// an older value elsewhere cannot win a repair.
    #[test]
    fn an_expired_record_reads_as_a_deletion_at_its_version() {
        let mut store = ShardRecords::new(store(NodeConfig::default()));
        let version = Version { counter: 9, node: 1 };
        let past =
            Record { version, value: Some(Bytes::from_static(b"old")), expires_at: Some(unix_ms() - 1), hint: 0 };
        let future =
            Record { version, value: Some(Bytes::from_static(b"new")), expires_at: Some(unix_ms() + 60_000), hint: 0 };
        store.put(unix_ms(), &Bytes::from_static(b"gone"), &past);
        store.put(unix_ms(), &Bytes::from_static(b"here"), &future);
        let kept = store.get(b"gone", false).expect("kept");
        assert_eq!(kept, past);
        let gone = as_of(kept, unix_ms());
        assert_eq!((gone.version, gone.value), (version, None));
        assert_eq!(store.get(b"here", false), Some(future));
        assert_eq!(store.len(), 2);
    }

    /// A record's policy hint is stored with the shard entry (the policy
    /// sees it on every replica) and read back with the record, so repairs,
    /// updates and re-sync snapshots carry it on.
    #[test]
    fn hints_travel_with_records() {
        let node = store(NodeConfig::default());
        let mut records = ShardRecords::new(node.clone());
        let record = Record {
            version: Version { counter: 1, node: 0 },
            value: Some(Bytes::from_static(b"v")),
            expires_at: None,
            hint: 250,
        };
        records.put(unix_ms(), &Bytes::from_static(b"costly"), &record);
        assert_eq!(records.get(b"costly", false).map(|r| r.hint), Some(250));
        assert_eq!(records.get(b"costly", true), Some(record));
        let hint = node.with_shard(b"costly", |shard, now| shard.peek_entry(now, b"costly").map(|e| e.hint));
        assert_eq!(hint, Some(250), "the shard's policy sees the hint");
        // A re-sync's snapshot carries it too.
        let mut scanned = Vec::new();
        records.scan(&mut |key, record| scanned.push((key.clone(), record.hint)));
        assert_eq!(scanned, vec![(Bytes::from_static(b"costly"), 250)], "snapshots keep the hint");
    }

    /// A stream walks the shards in parts, a few entries under each lock,
    /// while keys are written, rewritten at other sizes and deleted between
    /// parts: it sees every record held all through exactly once, and only
    /// the keys it wants.
    #[test]
    fn a_walk_in_parts_sees_every_record_held_throughout_once() {
        let node = store(NodeConfig { shards: 4, ..NodeConfig::default() });
        let mut records = ShardRecords::new(node.clone());
        let record = |counter: u64, len: usize| Record {
            version: Version { counter, node: 0 },
            value: Some(Bytes::from(vec![5; len])),
            expires_at: None,
            hint: 0,
        };
        for i in 0..1_000u64 {
            records.put(unix_ms(), &Bytes::from(format!("k{i}")), &record(1, 10));
            records.put(unix_ms(), &Bytes::from(format!("churn{i}")), &record(1, 10));
        }
        let mut seen: std::collections::BTreeMap<Bytes, usize> = std::collections::BTreeMap::new();
        let mut cursor = Bytes::new();
        let wanted = |key: &[u8]| key.starts_with(b"k");
        for part in 0u64.. {
            assert!(part < 10_000, "the walk ends");
            let mut taken = 0;
            let next = records.scan_part(&cursor, 37, &wanted, &mut |key, _| {
                *seen.entry(key.clone()).or_default() += 1;
                taken += 1;
                taken < 5
            });
            // Churn between parts: deletes free slab slots that new keys
            // take, and rewrites change sizes.
            node.with_shard(format!("churn{part}").as_bytes(), |shard, now| {
                shard.delete(now, format!("churn{part}").as_bytes())
            });
            records.put(unix_ms(), &Bytes::from(format!("knew{part}")), &record(1, 10));
            records.put(unix_ms(), &Bytes::from(format!("k{}", part % 1_000)), &record(2 + part, 100));
            match next {
                Some(next) => cursor = next,
                None => break,
            }
        }
        for i in 0..1_000u64 {
            assert_eq!(seen.get(format!("k{i}").as_bytes()), Some(&1), "k{i}");
        }
        assert!(seen.keys().all(|k| k.starts_with(b"k")), "only wanted keys");
        assert!(seen.values().all(|&n| n == 1), "no key twice");
    }

    /// A key's bytes reach a log line escaped: a client cannot end the line
    /// and forge another, or send escape codes to an operator's terminal.
    #[test]
    fn keys_in_log_lines_are_escaped() {
        #[derive(Clone, Default)]
        struct Captured(Arc<std::sync::Mutex<Vec<u8>>>);
        impl std::io::Write for Captured {
            fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
                self.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner).extend_from_slice(buf);
                Ok(buf.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let node = store(NodeConfig::default());
        let key = b"k\n2024-01-01T00:00:00Z ERROR forged\x1b[2J";
        node.with_shard(key, |shard, now| {
            shard.set(now, key, Bytes::from_static(b"not a record"), SetOptions::default())
        })
        .expect("set");
        let captured = Captured::default();
        let writer = captured.clone();
        let subscriber = tracing_subscriber::fmt().with_ansi(false).with_writer(move || writer.clone()).finish();
        tracing::subscriber::with_default(subscriber, || ShardRecords::new(node).get(key, false));
        let log = String::from_utf8(captured.0.lock().expect("log").clone()).expect("text");
        assert_eq!(log.lines().count(), 1, "one line: {log:?}");
        assert!(log.contains("forged") && !log.contains('\x1b'), "{log:?}");
    }
}
