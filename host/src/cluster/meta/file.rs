//! The metadata log on disk, in `<data>/meta/`: the only I/O of the
//! metadata log.
//!
//! - `log`: records appended back to back, each `[length u32 LE][CRC32 u32
//!   LE][MessagePack record]`, a record being entries (overwriting the
//!   tail from their first index, Raft's rule) or a hard state. Opening
//!   replays them; a short or corrupt record ends the log there and the file
//!   is cut back to the last good one. Such a tail can only be a write torn
//!   by a crash before its sync, which nothing was promised on (votes and
//!   acknowledgements wait for the sync).
//! - `snapshot`: the last snapshot, written to a temporary file, synced and
//!   renamed over the old one; the log is then rewritten the same way with
//!   only what follows the snapshot, so the files stay small.

use super::storage::{Durable, Loaded, Write};
use super::wire::{WireEntry, WireHardState, WireSnapshot};
use serde::{Deserialize, Serialize};
use std::fs::{self, File, OpenOptions};
use std::io::{self, BufWriter, Read, Seek, SeekFrom, Write as _};
use std::path::{Path, PathBuf};

/// The largest record accepted when reading the log back (a corrupt length
/// must not make the node allocate gigabytes).
const MAX_RECORD: u32 = 64 << 20;

/// One record of the `log` file.
#[derive(Serialize, Deserialize)]
enum Record {
    Entries(Vec<WireEntry>),
    HardState(WireHardState),
}

/// The metadata log in a directory.
pub struct FileDurable {
    dir: PathBuf,
    log: BufWriter<File>,
    /// What the files hold, kept to rewrite the log after a snapshot.
    mirror: Loaded,
}

fn encode(record: &Record) -> io::Result<Vec<u8>> {
    let body = rmp_serde::to_vec(record).map_err(io::Error::other)?;
    let len = u32::try_from(body.len())
        .ok()
        .filter(|l| *l <= MAX_RECORD)
        .ok_or_else(|| io::Error::other("a log record over 64 MiB"))?;
    let mut out = Vec::with_capacity(8 + body.len());
    out.extend_from_slice(&len.to_le_bytes());
    out.extend_from_slice(&crc32fast::hash(&body).to_le_bytes());
    out.extend_from_slice(&body);
    Ok(out)
}

/// Replays `bytes`; returns the records' effect and the length of the good
/// prefix.
fn replay(bytes: &[u8], into: &mut Loaded) -> usize {
    let mut at = 0;
    while bytes.len() - at >= 8 {
        let len = u32::from_le_bytes([bytes[at], bytes[at + 1], bytes[at + 2], bytes[at + 3]]);
        let crc = u32::from_le_bytes([bytes[at + 4], bytes[at + 5], bytes[at + 6], bytes[at + 7]]);
        let end = at + 8 + len as usize;
        if len > MAX_RECORD || end > bytes.len() {
            break;
        }
        let body = &bytes[at + 8..end];
        if crc32fast::hash(body) != crc {
            break;
        }
        match cachet_proto::frame::from_slice_shallow::<Record>(body) {
            Ok(Record::Entries(entries)) => into.record(&Write::Entries(entries)),
            Ok(Record::HardState(hs)) => into.record(&Write::HardState(hs)),
            Err(_) => break,
        }
        at = end;
    }
    at
}

/// Writes `bytes` to `path` atomically: a temporary file, synced, renamed
/// over it, the directory synced.
fn replace(dir: &Path, name: &str, bytes: &[u8]) -> io::Result<()> {
    let tmp = dir.join(format!("{name}.tmp"));
    {
        let mut f = File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
    }
    fs::rename(&tmp, dir.join(name))?;
    File::open(dir)?.sync_all()
}

impl FileDurable {
    /// Opens (creating) the log in `dir` and returns what it held.
    pub fn open(dir: &Path) -> io::Result<(Self, Loaded)> {
        fs::create_dir_all(dir)?;
        let mut loaded = Loaded::default();
        match fs::read(dir.join("snapshot")) {
            Ok(bytes) => {
                let snap: WireSnapshot = cachet_proto::frame::from_slice_shallow(&bytes).map_err(|e| {
                    io::Error::new(io::ErrorKind::InvalidData, format!("{}: {e}", dir.join("snapshot").display()))
                })?;
                loaded.snapshot = Some(snap);
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        let path = dir.join("log");
        let mut file = OpenOptions::new().create(true).truncate(false).read(true).write(true).open(&path)?;
        let mut bytes = Vec::new();
        file.read_to_end(&mut bytes)?;
        let good = replay(&bytes, &mut loaded);
        if good < bytes.len() {
            tracing::warn!(
                target: "cachet::meta",
                "{}: cut {} bytes of a torn or corrupt tail",
                path.display(),
                bytes.len() - good
            );
            file.set_len(good as u64)?;
            file.sync_all()?;
        }
        file.seek(SeekFrom::End(0))?;
        if let Some(snap) = loaded.snapshot.clone() {
            // Entries the snapshot covers (a crash between writing it and
            // rewriting the log) are dropped.
            loaded.record(&Write::Snapshot(snap));
        }
        let durable = Self { dir: dir.to_path_buf(), log: BufWriter::new(file), mirror: loaded.clone() };
        Ok((durable, loaded))
    }

    fn append(&mut self, record: &Record) -> io::Result<()> {
        let bytes = encode(record)?;
        self.log.write_all(&bytes)
    }

    /// The snapshot file, then the log rewritten to what follows it.
    fn snapshot(&mut self, snap: WireSnapshot) -> io::Result<()> {
        self.log.flush()?;
        replace(&self.dir, "snapshot", &rmp_serde::to_vec(&snap).map_err(io::Error::other)?)?;
        let hs = self.mirror.hard_state;
        self.mirror.record(&Write::Snapshot(snap));
        let mut bytes = encode(&Record::HardState(hs))?;
        if !self.mirror.entries.is_empty() {
            bytes.extend(encode(&Record::Entries(self.mirror.entries.clone()))?);
        }
        replace(&self.dir, "log", &bytes)?;
        let mut file = OpenOptions::new().read(true).write(true).open(self.dir.join("log"))?;
        file.seek(SeekFrom::End(0))?;
        self.log = BufWriter::new(file);
        Ok(())
    }
}

impl Durable for FileDurable {
    fn write(&mut self, write: Write) -> io::Result<()> {
        match write {
            Write::Entries(entries) => {
                self.append(&Record::Entries(entries.clone()))?;
                self.mirror.record(&Write::Entries(entries));
                Ok(())
            }
            Write::HardState(hs) => {
                self.append(&Record::HardState(hs))?;
                self.mirror.hard_state = hs;
                Ok(())
            }
            Write::Snapshot(snap) => self.snapshot(snap),
        }
    }

    fn sync(&mut self) -> io::Result<()> {
        self.log.flush()?;
        self.log.get_ref().sync_data()
    }
}

#[cfg(test)]
mod tests {
    use super::super::wire::WireConf;
    use super::*;
    use bytes::Bytes;

    fn entry(index: u64, term: u64) -> WireEntry {
        WireEntry { kind: 0, term, index, data: Bytes::from(format!("e{index}t{term}")), context: Bytes::new() }
    }

    fn dir(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("cachet-meta-file-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&d);
        d
    }

    #[test]
    fn the_log_reopens_as_written_with_overwrites_and_snapshots() {
        let d = dir("reopen");
        let (mut f, loaded) = FileDurable::open(&d).expect("open");
        assert!(loaded.is_empty());
        f.write(Write::Entries(vec![entry(1, 1), entry(2, 1), entry(3, 1)])).expect("write");
        f.write(Write::HardState(WireHardState { term: 2, vote: 3, commit: 2 })).expect("write");
        f.write(Write::Entries(vec![entry(3, 2), entry(4, 2)])).expect("overwrite");
        f.sync().expect("sync");
        drop(f);
        let (mut f, loaded) = FileDurable::open(&d).expect("reopen");
        let ids: Vec<_> = loaded.entries.iter().map(|e| (e.index, e.term)).collect();
        assert_eq!(ids, vec![(1, 1), (2, 1), (3, 2), (4, 2)]);
        assert_eq!(loaded.hard_state, WireHardState { term: 2, vote: 3, commit: 2 });
        let snap = WireSnapshot {
            data: Bytes::from_static(b"state@3"),
            index: 3,
            term: 2,
            conf: WireConf { voters: vec![1, 2], ..WireConf::default() },
        };
        f.write(Write::Snapshot(snap.clone())).expect("snapshot");
        f.write(Write::Entries(vec![entry(5, 2)])).expect("write");
        f.sync().expect("sync");
        drop(f);
        let (_, loaded) = FileDurable::open(&d).expect("reopen");
        assert_eq!(loaded.snapshot, Some(snap));
        assert_eq!(loaded.entries.iter().map(|e| e.index).collect::<Vec<_>>(), vec![4, 5]);
        assert_eq!(loaded.hard_state.vote, 3, "the hard state survives the log's rewrite");
        let _ = fs::remove_dir_all(&d);
    }

    #[test]
    fn a_torn_or_corrupt_tail_is_cut_and_the_rest_kept() {
        let d = dir("torn");
        let (mut f, _) = FileDurable::open(&d).expect("open");
        f.write(Write::Entries(vec![entry(1, 1), entry(2, 1)])).expect("write");
        f.write(Write::Entries(vec![entry(3, 1)])).expect("write");
        f.sync().expect("sync");
        drop(f);
        let path = d.join("log");
        let full = fs::read(&path).expect("read");
        // Every cut point inside the last record: the first record stays.
        let first_len = 8 + u32::from_le_bytes([full[0], full[1], full[2], full[3]]) as usize;
        for cut in first_len..full.len() {
            fs::write(&path, &full[..cut]).expect("tear");
            let (_, loaded) = FileDurable::open(&d).expect("reopen a torn log");
            assert_eq!(loaded.entries.len(), 2, "cut at {cut}");
            assert_eq!(fs::metadata(&path).expect("meta").len(), first_len as u64, "the tail is cut off");
        }
        // A flipped bit in the last record, and a length claiming 4 GiB.
        let mut bad = full.clone();
        let last = bad.len() - 1;
        bad[last] ^= 0x40;
        fs::write(&path, &bad).expect("corrupt");
        assert_eq!(FileDurable::open(&d).expect("reopen").1.entries.len(), 2);
        let mut huge = full[..first_len].to_vec();
        huge.extend_from_slice(&u32::MAX.to_le_bytes());
        huge.extend_from_slice(&[0; 12]);
        fs::write(&path, &huge).expect("huge");
        assert_eq!(FileDurable::open(&d).expect("reopen").1.entries.len(), 2);
        // A snapshot file that is not one is an error naming the file, not a panic.
        fs::write(d.join("snapshot"), b"\xc1garbage").expect("bad snapshot");
        let err = FileDurable::open(&d).err().expect("refused");
        assert!(err.to_string().contains("snapshot"), "{err}");
        let _ = fs::remove_dir_all(&d);
    }
}
