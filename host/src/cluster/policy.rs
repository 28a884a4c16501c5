//! Policies across a cluster: what the cluster runtime needs from the
//! node's policy control plane to apply the metadata log's policy entries
//! on every member, and what the node asks of the cluster to make them.
//!
//! The log records which modules are stored (by content hash), which one
//! is active and which one is in shadow; each member's runtime compares
//! that with what its node runs and changes it through [`PolicyHost`], on
//! a blocking thread (a swap locks every shard in turn; installing a
//! fetched module compiles it). A member lacking a module's bytes fetches
//! them from the member that stored it (or any that has them), checks the
//! hash against the log's, and installs them through the same validation
//! as `cachet policy load`.

use super::meta::entry::{ActivePolicy, StoredModule};

/// The node's side: its registry and its shards.
pub trait PolicyHost: Send + Sync {
    /// Whether the registry holds the component with this hash.
    fn has_module(&self, sha256: &str) -> bool;
    /// The component's bytes, to send a member that lacks them.
    fn module_bytes(&self, sha256: &str) -> Option<Vec<u8>>;
    /// Stores a fetched component (validated and checked for conformance,
    /// as `cachet policy load` does).
    fn install(&self, module: &StoredModule, bytes: &[u8]) -> Result<String, String>;
    /// Makes the node run `active` (when the log names one) and shadow
    /// `shadow`, changing only what differs; says what it did.
    fn apply(&self, active: Option<&ActivePolicy>, shadow: Option<&str>) -> Result<String, String>;
    /// Cache hits and misses so far (the leader judges canaries by them).
    fn hit_counts(&self) -> (u64, u64);
}
