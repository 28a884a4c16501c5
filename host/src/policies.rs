//! Finding a policy by name or path: the bundled components (embedded in
//! the binary at build time), their native twins, and modules on disk.

use crate::core::{NativeFactory, PolicyError, PolicyFactory};
use crate::wasm::{Limits, PolicyEngine};
use cachet_policy_sdk::Config;
use std::path::Path;
use std::sync::Arc;

include!(concat!(env!("OUT_DIR"), "/bundled.rs"));

/// The policy a node uses when none is named.
pub const DEFAULT_POLICY: &str = "s3fifo";

/// Names of the bundled policies, sorted.
pub fn bundled_names() -> Vec<&'static str> {
    BUNDLED.iter().map(|(name, _)| *name).collect()
}

/// The component bytes of bundled policy `name`.
pub fn bundled_component(name: &str) -> Option<&'static [u8]> {
    BUNDLED.iter().find(|(n, _)| *n == name).map(|(_, bytes)| *bytes)
}

/// How to run the policy a user named.
#[derive(Clone, Debug, Default)]
pub struct PolicySpec {
    /// A bundled name (`lru`) or a path to a component (`./my.wasm`).
    pub name_or_path: String,
    /// Run the bundled policy's crate natively instead of as Wasm.
    pub native: bool,
    /// `key=value` settings passed to the policy.
    pub config: Vec<(String, String)>,
    /// Sandbox limits for Wasm instances.
    pub limits: Limits,
}

/// True when `spec` names a file rather than a bundled policy.
fn is_path(spec: &str) -> bool {
    spec.contains('/') || spec.ends_with(".wasm")
}

/// Resolves `spec` to a factory, validating Wasm modules on the way.
pub fn resolve(engine: &PolicyEngine, spec: &PolicySpec) -> Result<Arc<dyn PolicyFactory>, PolicyError> {
    let name = spec.name_or_path.as_str();
    if spec.native {
        return native(name, Config::new(spec.config.clone()));
    }
    let owned;
    let bytes: &[u8] = if is_path(name) {
        owned = std::fs::read(Path::new(name)).map_err(|source| PolicyError::Io { path: name.to_string(), source })?;
        &owned
    } else {
        bundled_component(name).ok_or_else(|| unknown(name))?
    };
    Ok(Arc::new(engine.load(bytes, spec.limits, spec.config.clone())?))
}

/// The native build of bundled policy `name`.
pub fn native(name: &str, config: Config) -> Result<Arc<dyn PolicyFactory>, PolicyError> {
    // Create one instance up front so a bad config fails here, as for Wasm.
    let factory: Arc<dyn PolicyFactory> = match name {
        "arc" => Arc::new(NativeFactory::<cachet_policy_arc::Arc>::new(config)),
        "clock" => Arc::new(NativeFactory::<cachet_policy_clock::Clock>::new(config)),
        "fifo" => Arc::new(NativeFactory::<cachet_policy_fifo::Fifo>::new(config)),
        "lfu" => Arc::new(NativeFactory::<cachet_policy_lfu::Lfu>::new(config)),
        "lru" => Arc::new(NativeFactory::<cachet_policy_lru::Lru>::new(config)),
        "random" => Arc::new(NativeFactory::<cachet_policy_random::Random>::new(config)),
        "s3fifo" => Arc::new(NativeFactory::<cachet_policy_s3fifo::S3Fifo>::new(config)),
        "sieve" => Arc::new(NativeFactory::<cachet_policy_sieve::Sieve>::new(config)),
        "ttl" => Arc::new(NativeFactory::<cachet_policy_ttl::Ttl>::new(config)),
        "twoq" => Arc::new(NativeFactory::<cachet_policy_twoq::TwoQ>::new(config)),
        "wtinylfu" => Arc::new(NativeFactory::<cachet_policy_wtinylfu::WTinyLfu>::new(config)),
        _ if is_path(name) => {
            return Err(PolicyError::Create(format!("`{name}` is a file; --native runs bundled policies only")));
        }
        _ => return Err(unknown(name)),
    };
    let probe = cachet_policy_sdk::Capacity { max_entries: 16, max_bytes: 1 << 20 };
    factory.create(probe, 0)?;
    Ok(factory)
}

fn unknown(name: &str) -> PolicyError {
    PolicyError::Unknown { name: name.to_string(), known: bundled_names().iter().map(|s| s.to_string()).collect() }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_bundled_policy_has_a_native_twin() {
        assert_eq!(
            bundled_names(),
            ["arc", "clock", "fifo", "lfu", "lru", "random", "s3fifo", "sieve", "ttl", "twoq", "wtinylfu"]
        );
        for name in bundled_names() {
            let factory = native(name, Config::default()).expect("native twin");
            assert_eq!(factory.info().name, name);
        }
    }

    #[test]
    fn unknown_names_list_the_known_ones() {
        let err = native("lru2", Config::default()).err().expect("unknown");
        let msg = err.to_string();
        assert!(
            msg.contains("lru2")
                && msg.contains("arc, clock, fifo, lfu, lru, random, s3fifo, sieve, ttl, twoq, wtinylfu"),
            "{msg}"
        );
    }
}
