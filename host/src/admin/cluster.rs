//! The control plane's part in a cluster-wide policy: what the cluster
//! runtime calls to install a module fetched from a peer and to bring this
//! node to the policy the cluster's metadata log names (see
//! `crate::cluster::policy`), and what an admin command needs to turn into
//! a log entry.

use super::{AdminError, Control, lock};
use crate::cluster::meta::entry::{ActivePolicy, StoredModule};
use crate::registry::{ModuleLimits, ModuleRecord, parse_label};

impl Control {
    /// Whether the registry holds the component with this hash.
    pub(crate) fn has_module(&self, sha256: &str) -> bool {
        lock(&self.registry).as_ref().is_some_and(|r| r.records().any(|m| m.sha256 == sha256))
    }

    /// A stored component's bytes.
    pub(crate) fn module_bytes(&self, sha256: &str) -> Option<Vec<u8>> {
        lock(&self.registry).as_ref().and_then(|r| r.module_bytes(sha256))
    }

    /// The registry's record of `name@version`.
    pub(crate) fn module_record(&self, label: &str) -> Result<ModuleRecord, AdminError> {
        let (name, version) = parse_label(label).ok_or_else(|| AdminError::BadLabel(label.to_string()))?;
        let registry = lock(&self.registry);
        let registry = registry.as_ref().ok_or(AdminError::NoRegistry)?;
        registry
            .records()
            .find(|r| r.name == name && r.version == version)
            .cloned()
            .ok_or_else(|| AdminError::Swap(format!("{label} is not in this member's registry")))
    }

    /// Stores a component fetched from a peer, validated as a load is.
    pub(crate) fn install(&self, module: &StoredModule, bytes: &[u8]) -> Result<String, AdminError> {
        let (name, version) = parse_label(&module.label).ok_or_else(|| AdminError::BadLabel(module.label.clone()))?;
        let limits = ModuleLimits { fuel_per_call: module.fuel_per_call, max_memory_bytes: module.max_memory_bytes };
        let mut registry = lock(&self.registry);
        let registry = registry.as_mut().ok_or(AdminError::NoRegistry)?;
        let record = registry.load(name, version, bytes, module.config.clone(), limits)?;
        Ok(format!("stored {} (sha256 {})", record.label(), record.sha256))
    }

    /// Brings the node to the cluster's policy: activates `active` (or,
    /// when the log names none, the policy the node started with) when it
    /// differs from what runs, and starts or stops the shadow to match.
    pub(crate) fn apply_cluster_policy(
        &self,
        active: Option<&ActivePolicy>,
        shadow: Option<&str>,
    ) -> Result<String, AdminError> {
        let mut done = Vec::new();
        // No cluster-wide policy: the one this node started with.
        let (wanted, config) = match active {
            Some(active) => (active.label.clone(), active.config.clone()),
            None => (self.startup.label(), Some(self.startup.config.clone())),
        };
        let (name, version) = parse_label(&wanted).ok_or_else(|| AdminError::BadLabel(wanted.clone()))?;
        let current = self.activation();
        let same_config = config.as_ref().is_none_or(|c| *c == current.config);
        if current.label() != wanted || !same_config {
            done.push(self.activate(name, version, config, false)?);
        }
        let running = lock(&self.shadow).as_ref().map(|s| s.candidate().to_string());
        if running.as_deref() != shadow {
            done.push(match shadow.and_then(parse_label) {
                Some((name, version)) => self.start_shadow(name, version)?,
                None => self.start_shadow("", "")?,
            });
        }
        Ok(if done.is_empty() { "already running it".into() } else { done.join("; ") })
    }

    /// Calls `hook` with the module and the reason on every quarantine.
    pub(crate) fn on_quarantine(&self, hook: super::QuarantineHook) {
        let _ = self.quarantined_hook.set(hook);
    }
}
