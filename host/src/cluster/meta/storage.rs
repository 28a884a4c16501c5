//! The metadata log's storage: raft-rs's [`Storage`] answered from memory,
//! written through to a [`Durable`] sink (files in the data directory in
//! production, [`MemDurable`] in tests and the simulator).
//!
//! The log is small (membership, placement and policy changes): it is
//! compacted into a snapshot of the state every few hundred entries, and
//! the snapshot is what a member that fell far behind (or joins) receives.

use super::wire::{WireConf, WireEntry, WireHardState, WireSnapshot};
use raft::eraftpb::{ConfState, Entry, HardState, Snapshot};
use raft::{GetEntriesContext, RaftState, Storage, StorageError};
use std::cell::Cell;
use std::io;
use std::sync::{Arc, Mutex};

/// What a durable sink held when it was opened.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Loaded {
    /// The last snapshot, if any.
    pub snapshot: Option<WireSnapshot>,
    /// The vote, term and commit index.
    pub hard_state: WireHardState,
    /// Entries after the snapshot, in order.
    pub entries: Vec<WireEntry>,
}

impl Loaded {
    /// Whether nothing was ever written (a new member, or a wiped one).
    pub fn is_empty(&self) -> bool {
        self.snapshot.is_none() && self.entries.is_empty() && self.hard_state == WireHardState::default()
    }

    /// Applies one write the way a sink must: entries overwrite the tail
    /// from their first index (Raft's rule for a follower's conflicting
    /// suffix), and a snapshot drops every entry it covers.
    pub fn record(&mut self, write: &Write) {
        match write {
            Write::Entries(entries) => {
                if let Some(first) = entries.first() {
                    self.entries.retain(|e| e.index < first.index);
                    self.entries.extend(entries.iter().cloned());
                }
            }
            Write::HardState(hs) => self.hard_state = *hs,
            Write::Snapshot(snap) => {
                self.entries.retain(|e| e.index > snap.index);
                if self.entries.first().is_some_and(|e| e.index != snap.index + 1) {
                    self.entries.clear();
                }
                self.snapshot = Some(snap.clone());
            }
        }
    }
}

/// One change to the durable log.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Write {
    /// Entries, overwriting any from the first one's index on.
    Entries(Vec<WireEntry>),
    /// A new hard state.
    HardState(WireHardState),
    /// A snapshot, replacing the entries it covers.
    Snapshot(WireSnapshot),
}

/// Where the log persists. Writes may be buffered; nothing a write
/// promised is relied on (no vote or acknowledgement is sent) until
/// [`Durable::sync`] returns.
pub trait Durable: Send {
    /// Records one change.
    fn write(&mut self, write: Write) -> io::Result<()>;
    /// Makes every change recorded so far durable.
    fn sync(&mut self) -> io::Result<()>;
}

/// A disk in memory, shared with the simulator so a simulated crash can
/// keep what was synced (a restart with its data directory) or lose
/// everything (one without).
#[derive(Clone, Debug, Default)]
pub struct MemDisk {
    /// What survives a crash.
    pub synced: Loaded,
    /// What was written, synced or not.
    pub written: Loaded,
    /// Syncs so far.
    pub syncs: u64,
}

/// A [`Durable`] on a [`MemDisk`].
#[derive(Clone, Debug, Default)]
pub struct MemDurable(pub Arc<Mutex<MemDisk>>);

impl MemDurable {
    /// What a restart would load: the synced state.
    pub fn load(&self) -> Loaded {
        self.0.lock().map(|d| d.synced.clone()).unwrap_or_default()
    }
}

impl Durable for MemDurable {
    fn write(&mut self, write: Write) -> io::Result<()> {
        let mut disk = self.0.lock().map_err(|_| io::Error::other("disk lock poisoned"))?;
        disk.written.record(&write);
        Ok(())
    }

    fn sync(&mut self) -> io::Result<()> {
        let mut disk = self.0.lock().map_err(|_| io::Error::other("disk lock poisoned"))?;
        disk.synced = disk.written.clone();
        disk.syncs += 1;
        Ok(())
    }
}

/// raft-rs's view of the log, kept in memory and written through.
pub struct MetaStorage {
    hard_state: HardState,
    conf_state: ConfState,
    snapshot: Snapshot,
    entries: Vec<Entry>,
    durable: Box<dyn Durable>,
    /// Set when raft-rs asked for a snapshot newer than the stored one:
    /// the node makes one at its applied index on its next cycle.
    snapshot_wanted: Cell<bool>,
    dirty: bool,
}

impl MetaStorage {
    /// Storage holding what `loaded` held, writing to `durable`.
    pub fn open(loaded: Loaded, durable: Box<dyn Durable>) -> Result<Self, raft::Error> {
        let snapshot = loaded.snapshot.as_ref().map(WireSnapshot::to_snapshot).unwrap_or_default();
        let conf_state = snapshot.get_metadata().get_conf_state().clone();
        let entries = loaded.entries.iter().map(WireEntry::to_entry).collect::<Result<Vec<_>, _>>();
        let entries = entries.map_err(|e| raft::Error::ConfChangeError(format!("stored log: {e}")))?;
        let first = snapshot.get_metadata().index + 1;
        let contiguous = entries.iter().enumerate().all(|(i, e)| e.index == first + i as u64);
        if !contiguous {
            return Err(raft::Error::ConfChangeError("stored log entries are not contiguous with the snapshot".into()));
        }
        Ok(Self {
            hard_state: loaded.hard_state.to_hard_state(),
            conf_state,
            snapshot,
            entries,
            durable,
            snapshot_wanted: Cell::new(false),
            dirty: false,
        })
    }

    /// The founding storage: a snapshot at index 1, term 1, holding the
    /// founding state, identical on every founder.
    pub fn found(snapshot: WireSnapshot, mut durable: Box<dyn Durable>) -> Result<Self, raft::Error> {
        let hs = WireHardState { term: snapshot.term, vote: 0, commit: snapshot.index };
        durable.write(Write::Snapshot(snapshot.clone())).map_err(raft::Error::Io)?;
        durable.write(Write::HardState(hs)).map_err(raft::Error::Io)?;
        durable.sync().map_err(raft::Error::Io)?;
        Self::open(Loaded { snapshot: Some(snapshot), hard_state: hs, entries: Vec::new() }, durable)
    }

    fn first_index(&self) -> u64 {
        self.snapshot.get_metadata().index + 1
    }

    fn last_index(&self) -> u64 {
        self.entries.last().map_or(self.snapshot.get_metadata().index, |e| e.index)
    }

    /// The stored snapshot's index.
    pub fn snapshot_index(&self) -> u64 {
        self.snapshot.get_metadata().index
    }

    /// The stored snapshot (empty data for a member that has none yet).
    pub fn stored_snapshot(&self) -> Option<Snapshot> {
        (!self.snapshot.data.is_empty()).then(|| self.snapshot.clone())
    }

    /// Whether raft-rs asked for a newer snapshot (and clears the flag).
    pub fn take_snapshot_wanted(&self) -> bool {
        self.snapshot_wanted.replace(false)
    }

    /// Appends entries, overwriting a conflicting tail.
    pub fn append(&mut self, entries: &[Entry]) -> io::Result<()> {
        let Some(first) = entries.first() else { return Ok(()) };
        if first.index < self.first_index() || first.index > self.last_index() + 1 {
            return Err(io::Error::other(format!(
                "entries from {} do not attach to the log {}..={}",
                first.index,
                self.first_index(),
                self.last_index()
            )));
        }
        self.entries.retain(|e| e.index < first.index);
        self.entries.extend_from_slice(entries);
        self.dirty = true;
        self.durable.write(Write::Entries(entries.iter().map(WireEntry::from_entry).collect()))
    }

    /// Records a new hard state.
    pub fn set_hard_state(&mut self, hs: &HardState) -> io::Result<()> {
        self.hard_state = hs.clone();
        self.dirty = true;
        self.durable.write(Write::HardState(WireHardState::from_hard_state(hs)))
    }

    /// Records the commit index alone.
    pub fn set_commit(&mut self, commit: u64) -> io::Result<()> {
        let mut hs = self.hard_state.clone();
        hs.commit = commit;
        self.set_hard_state(&hs)
    }

    /// The configuration after an applied change (what the next snapshot
    /// carries).
    pub fn set_conf_state(&mut self, cs: ConfState) {
        self.conf_state = cs;
    }

    /// Installs a snapshot received from the leader: it replaces the whole
    /// log.
    pub fn install(&mut self, snap: &Snapshot) -> io::Result<()> {
        let meta = snap.get_metadata();
        if meta.index < self.snapshot_index() {
            return Ok(());
        }
        self.entries.clear();
        self.conf_state = meta.get_conf_state().clone();
        self.hard_state.term = self.hard_state.term.max(meta.term);
        self.hard_state.commit = self.hard_state.commit.max(meta.index);
        self.snapshot = snap.clone();
        self.dirty = true;
        self.durable.write(Write::Snapshot(WireSnapshot::from_snapshot(snap)))?;
        self.durable.write(Write::HardState(WireHardState::from_hard_state(&self.hard_state)))
    }

    /// Compacts the log into a snapshot of the state at `index` (applied
    /// here): `data` is the encoded state.
    pub fn compact(&mut self, index: u64, data: Vec<u8>) -> io::Result<()> {
        if index <= self.snapshot_index() || index > self.last_index() {
            return Ok(());
        }
        let term = self.term(index).map_err(|e| io::Error::other(e.to_string()))?;
        let snap = WireSnapshot { data: data.into(), index, term, conf: WireConf::from_conf(&self.conf_state) };
        self.snapshot = snap.to_snapshot();
        self.entries.retain(|e| e.index > index);
        self.dirty = true;
        self.durable.write(Write::Snapshot(snap))
    }

    /// Syncs if anything was written since the last sync.
    pub fn sync(&mut self) -> io::Result<()> {
        if self.dirty {
            self.durable.sync()?;
            self.dirty = false;
        }
        Ok(())
    }
}

impl Storage for MetaStorage {
    fn initial_state(&self) -> raft::Result<RaftState> {
        Ok(RaftState::new(self.hard_state.clone(), self.conf_state.clone()))
    }

    fn entries(
        &self,
        low: u64,
        high: u64,
        max_size: impl Into<Option<u64>>,
        _context: GetEntriesContext,
    ) -> raft::Result<Vec<Entry>> {
        if low < self.first_index() {
            return Err(raft::Error::Store(StorageError::Compacted));
        }
        if high > self.last_index() + 1 || low > high {
            return Err(raft::Error::Store(StorageError::Unavailable));
        }
        let offset = self.first_index();
        let slice = &self.entries[(low - offset) as usize..(high - offset) as usize];
        // At least one entry, then as many as fit in max_size.
        let max = max_size.into().unwrap_or(u64::MAX);
        let mut size = 0u64;
        let mut out = Vec::new();
        for e in slice {
            size += (e.data.len() + e.context.len() + 24) as u64;
            if !out.is_empty() && size > max {
                break;
            }
            out.push(e.clone());
        }
        Ok(out)
    }

    fn term(&self, idx: u64) -> raft::Result<u64> {
        let meta = self.snapshot.get_metadata();
        if idx == meta.index {
            return Ok(meta.term);
        }
        if idx < self.first_index() {
            return Err(raft::Error::Store(StorageError::Compacted));
        }
        self.entries
            .get((idx - self.first_index()) as usize)
            .map(|e| e.term)
            .ok_or(raft::Error::Store(StorageError::Unavailable))
    }

    fn first_index(&self) -> raft::Result<u64> {
        Ok(Self::first_index(self))
    }

    fn last_index(&self) -> raft::Result<u64> {
        Ok(Self::last_index(self))
    }

    /// The stored snapshot, if it is recent enough and names `to` in its
    /// configuration (raft-rs refuses to restore one that does not: a
    /// member added after the last compaction needs a newer one). Else the
    /// node makes a fresh one on its next cycle, and raft-rs asks again.
    fn snapshot(&self, request_index: u64, to: u64) -> raft::Result<Snapshot> {
        let conf = self.snapshot.get_metadata().get_conf_state();
        let names_to = conf.voters.iter().chain(&conf.learners).chain(&conf.voters_outgoing).any(|id| *id == to);
        if self.snapshot_index() >= request_index && !self.snapshot.data.is_empty() && names_to {
            return Ok(self.snapshot.clone());
        }
        self.snapshot_wanted.set(true);
        Err(raft::Error::Store(StorageError::SnapshotTemporarilyUnavailable))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    fn entry(index: u64, term: u64) -> Entry {
        WireEntry { kind: 0, term, index, data: Bytes::from(vec![index as u8]), context: Bytes::new() }
            .to_entry()
            .expect("entry")
    }

    fn founded(disk: &MemDurable) -> MetaStorage {
        let snap = WireSnapshot {
            data: Bytes::from_static(b"state"),
            index: 1,
            term: 1,
            conf: WireConf { voters: vec![1, 2, 3], ..WireConf::default() },
        };
        MetaStorage::found(snap, Box::new(disk.clone())).expect("found")
    }

    #[test]
    fn a_restart_loads_only_what_was_synced() {
        let disk = MemDurable::default();
        let mut s = founded(&disk);
        s.append(&[entry(2, 1), entry(3, 1)]).expect("append");
        s.sync().expect("sync");
        s.append(&[entry(3, 2), entry(4, 2)]).expect("overwrite the tail");
        assert_eq!(disk.load().entries.iter().map(|e| (e.index, e.term)).collect::<Vec<_>>(), vec![(2, 1), (3, 1)]);
        s.sync().expect("sync");
        let loaded = disk.load();
        assert_eq!(loaded.entries.iter().map(|e| (e.index, e.term)).collect::<Vec<_>>(), vec![(2, 1), (3, 2), (4, 2)]);
        let again = MetaStorage::open(loaded, Box::new(MemDurable::default())).expect("open");
        assert_eq!(Storage::last_index(&again).expect("last"), 4);
        assert_eq!(again.term(3).expect("term"), 2);
        assert_eq!(again.initial_state().expect("state").conf_state.voters, vec![1, 2, 3]);
    }

    #[test]
    fn compaction_keeps_the_tail_and_asks_for_snapshots_when_behind() {
        let disk = MemDurable::default();
        let mut s = founded(&disk);
        s.append(&(2..=10).map(|i| entry(i, 1)).collect::<Vec<_>>()).expect("append");
        assert!(s.snapshot(5, 2).is_err(), "the stored snapshot is at 1");
        assert!(s.take_snapshot_wanted());
        assert!(s.snapshot(0, 9).is_err(), "member 9 is not in the stored snapshot's configuration");
        assert!(s.take_snapshot_wanted());
        s.compact(6, b"at 6".to_vec()).expect("compact");
        s.sync().expect("sync");
        assert_eq!(s.snapshot(5, 2).expect("snapshot").get_metadata().index, 6);
        assert_eq!(Storage::first_index(&s).expect("first"), 7);
        assert_eq!(s.term(6).expect("the snapshot's term"), 1);
        assert!(matches!(
            s.entries(3, 5, None, GetEntriesContext::empty(false)),
            Err(raft::Error::Store(StorageError::Compacted))
        ));
        assert_eq!(s.entries(7, 11, None, GetEntriesContext::empty(false)).expect("tail").len(), 4);
        assert_eq!(s.entries(7, 11, Some(1), GetEntriesContext::empty(false)).expect("one at least").len(), 1);
        let loaded = disk.load();
        assert_eq!(loaded.snapshot.as_ref().map(|s| s.index), Some(6));
        assert_eq!(loaded.entries.first().map(|e| e.index), Some(7));
        assert!(s.append(&[entry(20, 1)]).is_err(), "a gap is refused, not a panic");
    }
}
