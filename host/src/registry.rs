//! The policy modules a node knows, by `name@version` and content hash.
//!
//! Loaded components live in `<data-dir>/modules/<sha256>.wasm` next to a
//! `manifest.json` naming each (name, version, interface, hash, limits,
//! config, state) and which activation is current and previous, so modules
//! and the active choice survive a restart. The bundled policies are always
//! listed too. A module is only stored after it compiled, passed
//! validation (component, interface version, import allow-list) and a quick
//! conformance run on a scratch shard; a stored version is immutable.
//!
//! The registry decides nothing about shards: the node asks it for a
//! factory and swaps shards itself (see [`crate::admin`]).

use crate::core::{PolicyError, PolicyFactory, SetOptions, Shard, ShardConfig};
use crate::policies;
use crate::wasm::{INTERFACE, Limits, PolicyEngine, WasmPolicyModule};
use bytes::Bytes;
use cachet_policy_sdk::Config;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// A registry operation that failed; nothing was changed.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    /// No module of that name and version.
    #[error("no module `{0}`; `cachet policy list` shows what is loaded")]
    NotFound(String),
    /// The name or version is not usable as one.
    #[error("invalid module name or version `{0}`: use 1-64 characters of A-Z a-z 0-9 . _ -")]
    BadName(String),
    /// `name@version` exists with other contents; versions are immutable.
    #[error("`{0}` already exists with different contents; load it under a new version")]
    Exists(String),
    /// The component was refused.
    #[error(transparent)]
    Invalid(#[from] PolicyError),
    /// The component misbehaved on the scratch shard.
    #[error("module failed the conformance check: {0}")]
    Conformance(String),
    /// The module was quarantined after repeated faults.
    #[error("module `{0}` is quarantined after repeated faults; load a fixed version")]
    Quarantined(String),
    /// There is nothing to roll back to.
    #[error("no previous version to roll back to")]
    NoPrevious,
    /// The data directory could not be read or written.
    #[error("{what} {path}: {source}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// A limit given with `load` is over what this node allows.
    #[error("{limit} {asked} is over this node's maximum of {max}; ask for at most that")]
    OverLimit {
        /// The setting: `--fuel-per-call` or `--max-memory`.
        limit: &'static str,
        /// What was asked for.
        asked: u64,
        /// The node's maximum.
        max: u64,
    },
    /// The manifest does not parse.
    #[error("corrupt manifest {path}: {detail}")]
    Manifest {
        /// The file.
        path: PathBuf,
        /// The parser's message.
        detail: String,
    },
}

/// Where a module came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Source {
    /// Compiled into the binary.
    Bundled,
    /// Loaded by an operator.
    Loaded,
    /// Named by `--policy` at start-up (a path, not stored).
    Startup,
}

impl Source {
    fn name(self) -> &'static str {
        match self {
            Self::Bundled => "bundled",
            Self::Loaded => "loaded",
            Self::Startup => "startup",
        }
    }
}

/// Sandbox limits stored with a module.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModuleLimits {
    /// Fuel one call may use.
    pub fuel_per_call: u64,
    /// Base memory cap of an instance in bytes.
    pub max_memory_bytes: u64,
}

impl Default for ModuleLimits {
    fn default() -> Self {
        let limits = Limits::default();
        Self { fuel_per_call: limits.fuel_per_call, max_memory_bytes: limits.max_memory_bytes as u64 }
    }
}

impl ModuleLimits {
    /// The most a loaded module may ask for: ten times the defaults, so
    /// an operator can give a heavy policy room, but a mistyped (or
    /// hostile) `load` cannot let one policy call hold a shard's lock for
    /// seconds or take gigabytes per shard.
    pub const MAX: Self = Self { fuel_per_call: 20_000_000, max_memory_bytes: 160 << 20 };

    /// Refuses limits over `max`, naming the first one over.
    fn check_within(self, max: Self) -> Result<(), RegistryError> {
        let over = |limit, asked, max| (asked > max).then_some(RegistryError::OverLimit { limit, asked, max });
        match over("--fuel-per-call", self.fuel_per_call, max.fuel_per_call)
            .or_else(|| over("--max-memory", self.max_memory_bytes, max.max_memory_bytes))
        {
            Some(err) => Err(err),
            None => Ok(()),
        }
    }

    fn engine_limits(self) -> Limits {
        Limits {
            fuel_per_call: self.fuel_per_call,
            max_memory_bytes: usize::try_from(self.max_memory_bytes).unwrap_or(usize::MAX),
            ..Limits::default()
        }
    }
}

/// One module's manifest entry.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModuleRecord {
    /// Module name.
    pub name: String,
    /// Module version.
    pub version: String,
    /// WIT interface it implements.
    pub interface: String,
    /// SHA-256 of the component (hex); empty for bundled and start-up ones.
    pub sha256: String,
    /// Where it came from.
    pub source: Source,
    /// Settings passed to `create` unless an activation overrides them.
    pub config: Vec<(String, String)>,
    /// Sandbox limits.
    pub limits: ModuleLimits,
    /// Why it was quarantined, if it was.
    pub quarantined: Option<String>,
}

impl ModuleRecord {
    /// `name@version`.
    pub fn label(&self) -> String {
        label(&self.name, &self.version)
    }
}

/// `name@version`.
pub fn label(name: &str, version: &str) -> String {
    format!("{name}@{version}")
}

/// Splits `name@version`.
pub fn parse_label(text: &str) -> Option<(&str, &str)> {
    text.split_once('@').filter(|(n, v)| !n.is_empty() && !v.is_empty())
}

/// A module chosen for every shard, with the settings it runs with.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Activation {
    /// Module name.
    pub name: String,
    /// Module version.
    pub version: String,
    /// The settings in force.
    pub config: Vec<(String, String)>,
}

impl Activation {
    /// `name@version`.
    pub fn label(&self) -> String {
        label(&self.name, &self.version)
    }
}

#[derive(Default, Serialize, Deserialize)]
pub(crate) struct Manifest {
    modules: Vec<ModuleRecord>,
    active: Option<Activation>,
    previous: Option<Activation>,
}

/// A manifest as read from disk: JSON, and every loaded module's hash
/// 64 lower-case hex digits, since it names a file in the modules folder
/// (a path-like "hash" must not reach a file system call).
pub(crate) fn parse_manifest(bytes: &[u8]) -> Result<Manifest, String> {
    let manifest: Manifest = serde_json::from_slice(bytes).map_err(|e| e.to_string())?;
    for record in &manifest.modules {
        let hex = record.sha256.len() == 64
            && record.sha256.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
        // Bundled and start-up records carry no hash; a loaded one must.
        let exempt = record.sha256.is_empty() && record.source != Source::Loaded;
        if !hex && !exempt {
            return Err(format!(
                "module {}@{}: `{}` is not a SHA-256 in hex",
                record.name,
                record.version,
                record.sha256.escape_debug()
            ));
        }
    }
    Ok(manifest)
}

/// The node's modules. See the module docs.
pub struct Registry {
    dir: Option<PathBuf>,
    engine: PolicyEngine,
    manifest: Manifest,
    /// Bundled and start-up modules (never written to the manifest).
    builtin: Vec<ModuleRecord>,
    /// Compiled components by content hash (or label for built-ins).
    compiled: HashMap<String, Arc<WasmPolicyModule>>,
    startup: Option<(ModuleRecord, Arc<dyn PolicyFactory>)>,
}

impl Registry {
    /// Opens the registry in `dir` (created if missing), or one kept in
    /// memory only when `dir` is `None`.
    pub fn open(dir: Option<&Path>, engine: PolicyEngine) -> Result<Self, RegistryError> {
        let builtin = policies::bundled_names()
            .into_iter()
            .filter_map(|name| {
                let factory = policies::native(name, Config::default()).ok()?;
                let info = factory.info();
                Some(ModuleRecord {
                    name: info.name.clone(),
                    version: info.version.clone(),
                    interface: INTERFACE.to_string(),
                    sha256: String::new(),
                    source: Source::Bundled,
                    config: Vec::new(),
                    limits: ModuleLimits::default(),
                    quarantined: None,
                })
            })
            .collect();
        let mut manifest = Manifest::default();
        if let Some(dir) = dir {
            std::fs::create_dir_all(dir).map_err(|source| RegistryError::Io {
                what: "cannot create",
                path: dir.to_path_buf(),
                source,
            })?;
            let path = dir.join("manifest.json");
            match std::fs::read(&path) {
                Ok(bytes) => match parse_manifest(&bytes) {
                    Ok(parsed) => manifest = parsed,
                    // A node must start even if its manifest was torn (a
                    // crash mid-write on a filesystem that reordered it): the
                    // file is kept aside for the operator, and the node runs
                    // on its start-up policy with an empty registry.
                    Err(err) => {
                        let aside = dir.join("manifest.json.corrupt");
                        let _ = std::fs::rename(&path, &aside);
                        tracing::error!(path = %aside.display(), %err, "corrupt module manifest set aside; starting with none");
                    }
                },
                Err(err) if err.kind() == std::io::ErrorKind::NotFound => {}
                Err(source) => return Err(RegistryError::Io { what: "cannot read", path, source }),
            }
        }
        Ok(Self { dir: dir.map(Path::to_path_buf), engine, manifest, builtin, compiled: HashMap::new(), startup: None })
    }

    /// Records the policy the node was started with, so a rollback can
    /// return to it even when it is a file outside the registry.
    pub fn set_startup(&mut self, factory: Arc<dyn PolicyFactory>, config: Vec<(String, String)>) -> Activation {
        let info = factory.info();
        let activation = Activation { name: info.name.clone(), version: info.version.clone(), config };
        if self.find(&activation.name, &activation.version).is_none() {
            let record = ModuleRecord {
                name: info.name.clone(),
                version: info.version.clone(),
                interface: INTERFACE.to_string(),
                sha256: String::new(),
                source: Source::Startup,
                config: activation.config.clone(),
                limits: ModuleLimits::default(),
                quarantined: None,
            };
            self.startup = Some((record, factory));
        }
        activation
    }

    /// Every module: bundled, start-up, then loaded in load order.
    pub fn records(&self) -> impl Iterator<Item = &ModuleRecord> {
        self.builtin.iter().chain(self.startup.iter().map(|(r, _)| r)).chain(&self.manifest.modules)
    }

    /// The stored active activation (restored at start-up).
    pub fn active(&self) -> Option<&Activation> {
        self.manifest.active.as_ref()
    }

    /// What `rollback` returns to.
    pub fn previous(&self) -> Option<&Activation> {
        self.manifest.previous.as_ref()
    }

    /// The version of the bundled module `name`, if there is one.
    pub fn bundled_version(&self, name: &str) -> Option<String> {
        self.records().find(|r| r.name == name && r.source == Source::Bundled).map(|r| r.version.clone())
    }

    fn find(&self, name: &str, version: &str) -> Option<&ModuleRecord> {
        self.records().find(|r| r.name == name && r.version == version)
    }

    /// Validates and stores a component as `name@version`. Loading the same
    /// bytes and settings again is a no-op; other contents under an
    /// existing version are refused.
    pub fn load(
        &mut self,
        name: &str,
        version: &str,
        bytes: &[u8],
        config: Vec<(String, String)>,
        limits: ModuleLimits,
    ) -> Result<ModuleRecord, RegistryError> {
        for part in [name, version] {
            let ok = !part.is_empty()
                && part.len() <= 64
                && part.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
            if !ok {
                return Err(RegistryError::BadName(part.to_string()));
            }
        }
        limits.check_within(ModuleLimits::MAX)?;
        let sha256 = sha256_hex(bytes);
        if let Some(existing) = self.find(name, version) {
            if existing.sha256 == sha256 && existing.config == config && existing.limits == limits {
                return Ok(existing.clone());
            }
            return Err(RegistryError::Exists(label(name, version)));
        }
        let module = self.engine.load(bytes, limits.engine_limits(), config.clone())?;
        let module = Arc::new(module);
        conformance_check(module.clone())?;
        if let Some(dir) = &self.dir {
            write_atomically(&dir.join(format!("{sha256}.wasm")), bytes)?;
        }
        let record = ModuleRecord {
            name: name.to_string(),
            version: version.to_string(),
            interface: INTERFACE.to_string(),
            sha256: sha256.clone(),
            source: Source::Loaded,
            config,
            limits,
            quarantined: None,
        };
        self.compiled.insert(sha256, module);
        self.manifest.modules.push(record.clone());
        self.save()?;
        Ok(record)
    }

    /// A factory for `name@version`, with `config` replacing the stored
    /// settings when given, checked on a scratch shard. Quarantined
    /// modules are refused.
    pub fn factory(
        &mut self,
        name: &str,
        version: &str,
        config: Option<Vec<(String, String)>>,
    ) -> Result<(Arc<dyn PolicyFactory>, Activation), RegistryError> {
        let record = self.find(name, version).cloned().ok_or_else(|| RegistryError::NotFound(label(name, version)))?;
        if record.quarantined.is_some() {
            return Err(RegistryError::Quarantined(record.label()));
        }
        let activation = Activation {
            name: record.name.clone(),
            version: record.version.clone(),
            config: config.unwrap_or_else(|| record.config.clone()),
        };
        let factory: Arc<dyn PolicyFactory> = match record.source {
            Source::Startup => match &self.startup {
                Some((r, factory)) if r.config == activation.config => factory.clone(),
                _ => {
                    return Err(RegistryError::Conformance(format!(
                        "`{}` was named at start-up and cannot be reconfigured live; load it into the registry",
                        record.label()
                    )));
                }
            },
            Source::Bundled | Source::Loaded => {
                let module = self.compiled_module(&record)?;
                Arc::new(module.reconfigured(record.limits.engine_limits(), activation.config.clone())?)
            }
        };
        conformance_check(factory.clone())?;
        Ok((factory, activation))
    }

    fn compiled_module(&mut self, record: &ModuleRecord) -> Result<Arc<WasmPolicyModule>, RegistryError> {
        let key = if record.sha256.is_empty() { record.label() } else { record.sha256.clone() };
        if let Some(module) = self.compiled.get(&key) {
            return Ok(module.clone());
        }
        let owned;
        let bytes: &[u8] = match record.source {
            Source::Bundled => {
                policies::bundled_component(&record.name).ok_or_else(|| RegistryError::NotFound(record.label()))?
            }
            _ => {
                let dir = self.dir.as_ref().ok_or_else(|| RegistryError::NotFound(record.label()))?;
                let path = dir.join(format!("{}.wasm", record.sha256));
                owned =
                    std::fs::read(&path).map_err(|source| RegistryError::Io { what: "cannot read", path, source })?;
                if sha256_hex(&owned) != record.sha256 {
                    return Err(RegistryError::Manifest {
                        path: dir.join(format!("{}.wasm", record.sha256)),
                        detail: "the file's hash does not match its name; load the module again".into(),
                    });
                }
                &owned
            }
        };
        let module = Arc::new(self.engine.load(bytes, record.limits.engine_limits(), record.config.clone())?);
        self.compiled.insert(key, module.clone());
        Ok(module)
    }

    /// A loaded component's bytes, by hash (read back from the registry's
    /// directory; `None` for a registry kept in memory).
    pub fn module_bytes(&self, sha256: &str) -> Option<Vec<u8>> {
        let dir = self.dir.as_ref()?;
        self.manifest.modules.iter().find(|m| m.sha256 == sha256)?;
        let bytes = std::fs::read(dir.join(format!("{sha256}.wasm"))).ok()?;
        (sha256_hex(&bytes) == sha256).then_some(bytes)
    }

    /// Records `activation` as active, the current one becoming previous.
    pub fn set_active(&mut self, activation: Activation, current: Activation) -> Result<(), RegistryError> {
        self.manifest.previous = Some(current);
        self.manifest.active = Some(activation);
        self.save()
    }

    /// Sets what `rollback` returns to.
    pub fn set_previous(&mut self, previous: Option<Activation>) -> Result<(), RegistryError> {
        self.manifest.previous = previous;
        self.save()
    }

    /// Marks a module as quarantined (persisted), so it is not activated
    /// again by accident.
    pub fn quarantine(&mut self, name: &str, version: &str, reason: &str) -> Result<(), RegistryError> {
        let records = self
            .builtin
            .iter_mut()
            .chain(self.startup.iter_mut().map(|(r, _)| r))
            .chain(self.manifest.modules.iter_mut());
        for record in records.filter(|r| r.name == name && r.version == version) {
            record.quarantined = Some(reason.to_string());
        }
        self.save()
    }

    fn save(&self) -> Result<(), RegistryError> {
        let Some(dir) = &self.dir else {
            return Ok(());
        };
        let path = dir.join("manifest.json");
        let json = serde_json::to_vec_pretty(&self.manifest)
            .map_err(|e| RegistryError::Manifest { path: path.clone(), detail: e.to_string() })?;
        write_atomically(&path, &json)
    }
}

impl ModuleRecord {
    /// The state shown to operators.
    pub fn state(&self) -> String {
        match &self.quarantined {
            Some(reason) => format!("quarantined: {reason}"),
            None => "ready".into(),
        }
    }

    /// Where it came from, for listings.
    pub fn source_name(&self) -> &'static str {
        self.source.name()
    }
}

/// Writes `bytes` to a temporary file beside `path`, syncs it, and renames
/// it over `path`, so a crash never leaves a half-written manifest or
/// module under the real name.
fn write_atomically(path: &Path, bytes: &[u8]) -> Result<(), RegistryError> {
    use std::io::Write;
    let tmp = path.with_extension("tmp");
    let io = |source| RegistryError::Io { what: "cannot write", path: tmp.clone(), source };
    let mut file = std::fs::File::create(&tmp).map_err(io)?;
    file.write_all(bytes).map_err(io)?;
    // On disk before the rename makes it visible.
    file.sync_all().map_err(io)?;
    std::fs::rename(&tmp, path).map_err(|source| RegistryError::Io { what: "cannot write", path: path.into(), source })
}

/// Lower-case hex SHA-256.
pub fn sha256_hex(bytes: &[u8]) -> String {
    let digest = ring::digest::digest(&ring::digest::SHA256, bytes);
    digest.as_ref().iter().map(|b| format!("{b:02x}")).collect()
}

/// A quick run of a deterministic workload through a scratch shard: reads,
/// writes with and without TTLs, deletes, expiry and eviction under
/// pressure. The module must not fault, must keep the shard within its
/// bounds and must export exactly the resident entries. This is what keeps
/// a module that traps or spins on its first calls from ever reaching a
/// live shard.
pub fn conformance_check(factory: Arc<dyn PolicyFactory>) -> Result<(), RegistryError> {
    const CAPACITY: u64 = 64;
    let fail = |detail: String| RegistryError::Conformance(detail);
    let config = ShardConfig { max_entries: CAPACITY, max_bytes: CAPACITY * 64, ..ShardConfig::default() };
    let mut shard = Shard::new(config, factory)?;
    let mut state = 0x5eed_u64;
    let mut now = 0;
    for i in 0..2_000u32 {
        state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        let r = state >> 33;
        let key = format!("k{}", r % 256);
        match r % 10 {
            0..=5 => {
                if shard.get(now, key.as_bytes()).is_none() {
                    let value = Bytes::from(vec![b'v'; (r % 24) as usize]);
                    shard.set(now, key.as_bytes(), value, SetOptions::default()).map_err(|e| fail(e.to_string()))?;
                }
            }
            6..=7 => {
                let options = SetOptions { ttl_ms: Some(1 + r % 50), ..SetOptions::default() };
                shard.set(now, key.as_bytes(), Bytes::from_static(b"t"), options).map_err(|e| fail(e.to_string()))?;
            }
            _ => {
                shard.delete(now, key.as_bytes());
            }
        }
        if i % 100 == 99 {
            now += 20;
            shard.tick(now);
        }
        let faults = shard.stats().policy_faults();
        if faults > 0 {
            let kinds: Vec<&str> = crate::core::FaultKind::ALL
                .iter()
                .filter(|k| shard.stats().faults[k.index()] > 0)
                .map(|k| k.name())
                .collect();
            return Err(fail(format!("policy fault ({}) after {} operations", kinds.join(", "), i + 1)));
        }
        if shard.len() as u64 > CAPACITY {
            return Err(fail(format!("{} entries resident in a shard of {CAPACITY}", shard.len())));
        }
    }
    let order = shard.export_order(now);
    if shard.stats().policy_faults() > 0 {
        return Err(fail("policy fault in export-order".into()));
    }
    let mut seen = std::collections::HashSet::new();
    let exported_resident = order.iter().all(|&id| shard.key_of(id).is_some() && seen.insert(id));
    if !exported_resident || order.len() != shard.len() {
        return Err(fail(format!(
            "export-order listed {} ids for {} resident entries (or unknown or repeated ids)",
            order.len(),
            shard.len()
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bundled(name: &str) -> &'static [u8] {
        policies::bundled_component(name).expect("bundled")
    }

    fn temp_dir(tag: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("cachet-registry-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        dir
    }

    #[test]
    fn modules_and_the_active_choice_survive_a_reopen() {
        let dir = temp_dir("reopen");
        let engine = PolicyEngine::new().expect("engine");
        let mut registry = Registry::open(Some(&dir), engine.clone()).expect("open");
        let config = vec![("small-ratio".to_string(), "0.2".to_string())];
        let record =
            registry.load("mine", "1", bundled("s3fifo"), config.clone(), ModuleLimits::default()).expect("load");
        assert_eq!(record.sha256, sha256_hex(bundled("s3fifo")));
        assert!(dir.join(format!("{}.wasm", record.sha256)).exists());
        // Same bytes again: fine. Other bytes under the same version: refused.
        registry.load("mine", "1", bundled("s3fifo"), config.clone(), ModuleLimits::default()).expect("idempotent");
        let err =
            registry.load("mine", "1", bundled("lru"), Vec::new(), ModuleLimits::default()).expect_err("immutable");
        assert!(matches!(err, RegistryError::Exists(_)), "{err}");
        let (_, activation) = registry.factory("mine", "1", None).expect("factory");
        let before = Activation { name: "lru".into(), version: "0.1.0".into(), config: Vec::new() };
        registry.set_active(activation.clone(), before.clone()).expect("save");
        registry.quarantine("mine", "1", "test").expect("quarantine");
        drop(registry);

        let mut reopened = Registry::open(Some(&dir), engine).expect("reopen");
        assert_eq!(reopened.active(), Some(&activation));
        assert_eq!(reopened.previous(), Some(&before));
        let mine = reopened.records().find(|r| r.name == "mine").expect("listed").clone();
        assert_eq!((mine.config, mine.quarantined.as_deref()), (config, Some("test")));
        assert!(matches!(reopened.factory("mine", "1", None), Err(RegistryError::Quarantined(_))));
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// Fuel and memory asked for with a load are capped by the node's
    /// maxima: over them the load is refused, naming the limit; at them
    /// it goes through.
    #[test]
    fn limits_over_the_node_maxima_are_refused() {
        let mut registry = Registry::open(None, PolicyEngine::new().expect("engine")).expect("open");
        let max = ModuleLimits::MAX;
        let fuel = ModuleLimits { fuel_per_call: max.fuel_per_call + 1, ..ModuleLimits::default() };
        let memory = ModuleLimits { max_memory_bytes: u64::MAX, ..ModuleLimits::default() };
        for (limits, name) in [(fuel, "--fuel-per-call"), (memory, "--max-memory")] {
            let err = registry.load("greedy", "1", bundled("lru"), Vec::new(), limits).expect_err("over the cap");
            assert!(matches!(err, RegistryError::OverLimit { limit, .. } if limit == name), "{err}");
            assert!(err.to_string().contains(name), "{err}");
        }
        assert!(registry.records().all(|r| r.name != "greedy"), "nothing stored");
        registry.load("greedy", "1", bundled("lru"), Vec::new(), max).expect("at the cap");
    }

    #[test]
    fn bad_modules_and_names_are_refused_and_stored_nowhere() {
        let dir = temp_dir("bad");
        let engine = PolicyEngine::new().expect("engine");
        let mut registry = Registry::open(Some(&dir), engine).expect("open");
        let limits = ModuleLimits::default();
        let garbage = registry.load("junk", "1", b"not wasm at all", Vec::new(), limits).expect_err("garbage");
        assert!(matches!(garbage, RegistryError::Invalid(PolicyError::NotAComponent(_))), "{garbage}");
        let bad_config = vec![("no-such-knob".to_string(), "1".to_string())];
        let refused = registry.load("lru2", "1", bundled("lru"), bad_config, limits).expect_err("config");
        assert!(matches!(refused, RegistryError::Invalid(PolicyError::Create(_))), "{refused}");
        assert!(matches!(
            registry.load("a@b", "1", bundled("lru"), Vec::new(), limits),
            Err(RegistryError::BadName(_))
        ));
        assert!(matches!(registry.factory("nope", "9", None), Err(RegistryError::NotFound(_))));
        assert_eq!(std::fs::read_dir(&dir).expect("dir").count(), 0, "nothing written");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_torn_manifest_is_set_aside_and_the_node_still_starts() {
        let dir = temp_dir("torn");
        std::fs::create_dir_all(&dir).expect("dir");
        std::fs::write(dir.join("manifest.json"), b"{\"modules\": [ {\"name\": \"half").expect("write");
        let registry = Registry::open(Some(&dir), PolicyEngine::new().expect("engine")).expect("opens");
        assert!(registry.active().is_none());
        assert!(registry.records().all(|r| r.source == Source::Bundled));
        assert!(dir.join("manifest.json.corrupt").exists(), "kept for the operator");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn bundled_policies_are_listed_and_activatable() {
        let engine = PolicyEngine::new().expect("engine");
        let mut registry = Registry::open(None, engine).expect("open");
        assert!(registry.records().any(|r| r.name == "sieve" && r.source == Source::Bundled));
        let (factory, activation) = registry.factory("sieve", "0.1.0", None).expect("sieve");
        assert_eq!((factory.info().name.as_str(), activation.label().as_str()), ("sieve", "sieve@0.1.0"));
    }
}
