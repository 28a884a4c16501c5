//! The loader modules a member holds, by hash: those of the cluster's
//! loader configuration, kept in memory and in the data directory
//! (`loader-modules/SHA.wasm`), so a restarted member builds its loaders
//! without asking anyone, and hands them to members that lack them.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Where in the data directory.
const DIR: &str = "loader-modules";

/// A module's bytes and when this member kept them.
type Kept = (Arc<Vec<u8>>, Instant);

/// The held modules.
pub(super) struct LoaderModules {
    dir: PathBuf,
    /// Each module and when it was kept.
    held: Mutex<HashMap<String, Kept>>,
}

impl LoaderModules {
    /// The modules kept in `data_dir`; a file whose bytes do not match its
    /// name (a torn write, a disk fault) is skipped and fetched again.
    pub(super) fn open(data_dir: &Path) -> Self {
        let dir = data_dir.join(DIR);
        let mut held = HashMap::new();
        if let Ok(entries) = std::fs::read_dir(&dir) {
            for entry in entries.flatten() {
                let path = entry.path();
                let Some(sha) = path.file_stem().and_then(|s| s.to_str()).map(str::to_string) else { continue };
                if path.extension().is_none_or(|e| e != "wasm") {
                    continue;
                }
                match std::fs::read(&path) {
                    Ok(bytes) if crate::registry::sha256_hex(&bytes) == sha => {
                        held.insert(sha, (Arc::new(bytes), Instant::now()));
                    }
                    _ => {
                        tracing::warn!(file = %path.display(), "a kept loader module does not match its hash; ignored")
                    }
                }
            }
        }
        Self { dir, held: Mutex::new(held) }
    }

    fn held(&self) -> std::sync::MutexGuard<'_, HashMap<String, Kept>> {
        self.held.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Whether the module with this hash is here.
    pub(super) fn has(&self, sha256: &str) -> bool {
        self.held().contains_key(sha256)
    }

    /// The module's bytes.
    pub(super) fn get(&self, sha256: &str) -> Option<Arc<Vec<u8>>> {
        self.held().get(sha256).map(|(bytes, _)| bytes.clone())
    }

    /// Keeps a module, checked against its hash, in memory and on disk (a
    /// disk that refuses it is logged: the member still has it until it
    /// restarts).
    pub(super) fn put(&self, sha256: &str, bytes: Vec<u8>) -> Result<(), String> {
        if crate::registry::sha256_hex(&bytes) != sha256 {
            return Err(format!("the bytes offered as loader module {sha256} do not match that hash"));
        }
        if self.has(sha256) {
            return Ok(());
        }
        let path = self.dir.join(format!("{sha256}.wasm"));
        let tmp = path.with_extension("tmp");
        let saved = std::fs::create_dir_all(&self.dir)
            .and_then(|()| std::fs::write(&tmp, &bytes))
            .and_then(|()| std::fs::rename(&tmp, &path));
        if let Err(err) = saved {
            tracing::warn!(%err, file = %path.display(), "cannot keep a loader module on disk");
        }
        self.held().insert(sha256.to_string(), (Arc::new(bytes), Instant::now()));
        Ok(())
    }

    /// Forgets every module but `keep` (those of the configurations in
    /// force and in the log) and those kept less than `young` ago (a
    /// configuration proposed through this member, not in the log yet),
    /// in memory and on disk.
    pub(super) fn retain(&self, keep: &[&str], young: Duration) {
        let mut held = self.held();
        let gone: Vec<String> = held
            .iter()
            .filter(|(sha, (_, at))| !keep.contains(&sha.as_str()) && at.elapsed() >= young)
            .map(|(sha, _)| sha.clone())
            .collect();
        for sha in gone {
            held.remove(&sha);
            let _ = std::fs::remove_file(self.dir.join(format!("{sha}.wasm")));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn modules_are_kept_by_hash_across_a_restart_and_bad_ones_refused() {
        let dir = std::env::temp_dir().join(format!("cachet-loader-modules-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let modules = LoaderModules::open(&dir);
        let (a, b) = (b"module a".to_vec(), b"module b".to_vec());
        let (sha_a, sha_b) = (crate::registry::sha256_hex(&a), crate::registry::sha256_hex(&b));
        assert!(modules.put(&sha_a, b.clone()).is_err(), "bytes that do not match the hash");
        modules.put(&sha_a, a.clone()).expect("a");
        modules.put(&sha_b, b.clone()).expect("b");
        // A torn file is not taken for the module.
        std::fs::write(dir.join(DIR).join(format!("{}.wasm", "cd".repeat(32))), b"torn").expect("write");
        let reopened = LoaderModules::open(&dir);
        assert_eq!(reopened.get(&sha_a).as_deref(), Some(&a));
        assert!(reopened.has(&sha_b) && !reopened.has(&"cd".repeat(32)));
        reopened.retain(&[sha_b.as_str()], Duration::from_secs(60));
        assert!(reopened.has(&sha_a), "a module kept a moment ago stays");
        reopened.retain(&[sha_b.as_str()], Duration::ZERO);
        assert!(!LoaderModules::open(&dir).has(&sha_a), "forgotten on disk too");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
