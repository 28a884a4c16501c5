//! The loader configuration (`cachet serve --loaders FILE`, TOML): the
//! origins the node may reach and the namespaces bound to loader modules.
//!
//! ```toml
//! [origins.users-db]
//! postgres = "host=127.0.0.1 port=5432 user=app dbname=app"
//! pool-size = 8
//! statement-timeout-ms = 2000
//!
//! [[namespace]]
//! prefix = "user:"
//! module = "target/loaders/users.wasm"
//! origins = ["users-db"]
//! ttl-ms = 60000
//! grace-ms = 10000
//! invalidate = { origin = "users-db", channel = "users_changed" }
//! read-only = true
//! ```

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// The whole file.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct LoaderConfig {
    /// Seed of the draws behind TTL jitter and early refresh; random when
    /// unset.
    pub seed: Option<u64>,
    /// Origins by name.
    #[serde(default)]
    pub origins: BTreeMap<String, OriginConfig>,
    /// Namespaces; a key is served by the longest matching prefix.
    #[serde(default, rename = "namespace")]
    pub namespaces: Vec<NamespaceConfig>,
}

/// One origin. Exactly one of `postgres` and `http` is set.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct OriginConfig {
    /// A PostgreSQL connection string (`host=... port=... user=...
    /// dbname=...` or a `postgres://` URL).
    pub postgres: Option<String>,
    /// HTTP base URLs a loader may GET below (`http://host:port/prefix/`);
    /// several are tried in order when one is unreachable or answers 5xx.
    pub http: Option<Vec<String>>,
    /// Connections kept open to a PostgreSQL origin.
    #[serde(default = "default_pool")]
    pub pool_size: usize,
    /// The server-side `statement_timeout`, and (plus a second) the
    /// client-side deadline of each query.
    #[serde(default = "default_statement_timeout")]
    pub statement_timeout_ms: u64,
    /// How long to wait for a connection (new or from the pool).
    #[serde(default = "default_connect_timeout")]
    pub connect_timeout_ms: u64,
    /// Deadline of one HTTP request, connection included.
    #[serde(default = "default_statement_timeout")]
    pub request_timeout_ms: u64,
}

/// A key namespace bound to a loader module.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct NamespaceConfig {
    /// Keys starting with this prefix are loaded on a miss.
    pub prefix: String,
    /// The loader component (`.wasm`), relative to the config file.
    pub module: PathBuf,
    /// Origins the loader may use.
    #[serde(default)]
    pub origins: Vec<String>,
    /// TTL of loaded values when the loader gives none.
    #[serde(default = "default_ttl")]
    pub ttl_ms: u64,
    /// Stale-while-revalidate: for this long before a value expires it is
    /// still served while one background refresh runs.
    #[serde(default)]
    pub grace_ms: u64,
    /// TTLs are spread by up to this fraction either way.
    #[serde(default)]
    pub jitter: f64,
    /// XFetch's beta: 0 turns probabilistic early refresh off; 1 is the
    /// paper's default; larger refreshes earlier.
    #[serde(default = "default_beta")]
    pub xfetch_beta: f64,
    /// How long "not found" is remembered (0: not at all).
    #[serde(default = "default_negative_ttl")]
    pub negative_ttl_ms: u64,
    /// Deadline of one load, origin calls included; waiting clients get an
    /// error after it.
    #[serde(default = "default_load_timeout")]
    pub load_timeout_ms: u64,
    /// Fuel for one loader call (Wasm instructions, roughly).
    #[serde(default = "default_fuel")]
    pub fuel_per_call: u64,
    /// Linear memory one loader instance may grow to.
    #[serde(default = "default_memory")]
    pub max_memory_bytes: usize,
    /// Change data capture: invalidate `prefix + payload` for every
    /// notification on a PostgreSQL channel.
    pub invalidate: Option<InvalidateConfig>,
    /// Whether client writes (SET, DEL) go to the origin through the
    /// loader's `store`: `none`, `through` or `behind`.
    #[serde(default)]
    pub write: WriteMode,
    /// Write-behind: writes queued at most; a write beyond is refused.
    #[serde(default = "default_write_queue")]
    pub write_queue: usize,
    /// Write-behind: attempts per queued write before it is dropped (and
    /// counted, and logged).
    #[serde(default = "default_write_attempts")]
    pub write_attempts: u32,
    /// Loads and refreshes query PostgreSQL in `READ ONLY` transactions, so
    /// a loader (buggy, or fed hostile keys) cannot change the database
    /// through them: PostgreSQL refuses the write. `store` (write-through or
    /// write-behind) is not covered: it is the namespace's declared writer.
    #[serde(default)]
    pub read_only: bool,
}

/// How a namespace's client writes reach the origin.
#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum WriteMode {
    /// Writes change only the cache (cache-aside: the application writes
    /// the origin itself, and a DEL or a notification invalidates).
    #[default]
    None,
    /// A SET or DEL is stored to the origin first and answered after; a
    /// failed store changes nothing.
    Through,
    /// A SET or DEL changes the cache and is answered at once; a bounded
    /// queue stores it to the origin in order, retrying. What is queued is
    /// lost if the node dies.
    Behind,
}

/// A PostgreSQL LISTEN/NOTIFY invalidation feed.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct InvalidateConfig {
    /// The PostgreSQL origin to LISTEN on.
    pub origin: String,
    /// The channel; each notification's payload is a key without the prefix.
    pub channel: String,
}

fn default_pool() -> usize {
    8
}
fn default_statement_timeout() -> u64 {
    2_000
}
fn default_connect_timeout() -> u64 {
    2_000
}
fn default_ttl() -> u64 {
    60_000
}
fn default_beta() -> f64 {
    1.0
}
fn default_negative_ttl() -> u64 {
    5_000
}
fn default_load_timeout() -> u64 {
    5_000
}
fn default_write_queue() -> usize {
    10_000
}
fn default_write_attempts() -> u32 {
    5
}
fn default_fuel() -> u64 {
    200_000_000
}
fn default_memory() -> usize {
    64 << 20
}

/// A configuration that cannot be used, named.
#[derive(Debug, thiserror::Error)]
pub enum LoaderConfigError {
    /// The file cannot be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The file is not valid TOML of this shape.
    #[error("{path}: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// What the parser said.
        message: String,
    },
    /// A value is out of range or names something that does not exist.
    #[error("loader configuration: {0}")]
    Invalid(String),
}

impl LoaderConfig {
    /// Reads and checks `path`; module paths become relative to its
    /// directory.
    pub fn load(path: &Path) -> Result<Self, LoaderConfigError> {
        let text =
            std::fs::read_to_string(path).map_err(|source| LoaderConfigError::Read { path: path.into(), source })?;
        let mut config: Self = toml::from_str(&text)
            .map_err(|e| LoaderConfigError::Parse { path: path.into(), message: e.to_string() })?;
        let base = path.parent().unwrap_or(Path::new("."));
        for ns in &mut config.namespaces {
            if ns.module.is_relative() {
                ns.module = base.join(&ns.module);
            }
        }
        config.check()?;
        Ok(config)
    }

    /// Parses and checks a configuration's text, module paths as written.
    pub fn parse(text: &str) -> Result<Self, LoaderConfigError> {
        let config: Self = toml::from_str(text)
            .map_err(|e| LoaderConfigError::Parse { path: PathBuf::new(), message: e.to_string() })?;
        config.check()?;
        Ok(config)
    }

    /// Checks ranges and cross-references.
    pub fn check(&self) -> Result<(), LoaderConfigError> {
        let invalid = |m: String| Err(LoaderConfigError::Invalid(m));
        for (name, origin) in &self.origins {
            match (&origin.postgres, &origin.http) {
                (Some(_), None) | (None, Some(_)) => {}
                _ => return invalid(format!("origin `{name}` needs exactly one of `postgres` and `http`")),
            }
            if let Some(bases) = &origin.http {
                if bases.is_empty() {
                    return invalid(format!("origin `{name}`: `http` needs at least one base URL"));
                }
                for base in bases {
                    let scheme_ok = base.starts_with("http://") || base.starts_with("https://");
                    if !scheme_ok || !base.ends_with('/') {
                        return invalid(format!(
                            "origin `{name}`: base URL `{base}` must start with http:// or https:// and end with /"
                        ));
                    }
                }
            }
            if origin.pool_size == 0 || origin.pool_size > 1024 {
                return invalid(format!("origin `{name}`: pool-size must be 1..=1024"));
            }
        }
        let mut prefixes = std::collections::HashSet::new();
        for ns in &self.namespaces {
            let p = &ns.prefix;
            if p.is_empty() {
                return invalid("a namespace prefix cannot be empty".into());
            }
            if !prefixes.insert(p.clone()) {
                return invalid(format!("namespace `{p}` is declared twice"));
            }
            for origin in &ns.origins {
                if !self.origins.contains_key(origin) {
                    return invalid(format!("namespace `{p}` allows origin `{origin}`, which is not declared"));
                }
            }
            if let Some(feed) = &ns.invalidate {
                match self.origins.get(&feed.origin) {
                    Some(o) if o.postgres.is_some() => {}
                    _ => return invalid(format!("namespace `{p}`: invalidate needs a PostgreSQL origin")),
                }
                let ok = !feed.channel.is_empty()
                    && feed.channel.len() <= 63
                    && feed.channel.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_');
                if !ok {
                    return invalid(format!(
                        "namespace `{p}`: channel `{}` must be [A-Za-z0-9_]{{1,63}}",
                        feed.channel
                    ));
                }
            }
            if ns.ttl_ms == 0 {
                return invalid(format!("namespace `{p}`: ttl-ms must be at least 1"));
            }
            if !(0.0..=1.0).contains(&ns.jitter) {
                return invalid(format!("namespace `{p}`: jitter is a fraction in 0..=1"));
            }
            if !(0.0..=100.0).contains(&ns.xfetch_beta) {
                return invalid(format!("namespace `{p}`: xfetch-beta must be in 0..=100"));
            }
            if ns.write == WriteMode::Behind && (ns.write_queue == 0 || ns.write_attempts == 0) {
                return invalid(format!("namespace `{p}`: write-queue and write-attempts must be at least 1"));
            }
            if ns.load_timeout_ms == 0 {
                return invalid(format!("namespace `{p}`: load-timeout-ms must be at least 1"));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<LoaderConfig, String> {
        LoaderConfig::parse(text).map_err(|e| e.to_string())
    }

    #[test]
    fn a_full_config_parses_with_defaults() {
        let config = parse(
            r#"
            seed = 3
            [origins.db]
            postgres = "host=127.0.0.1"
            [[namespace]]
            prefix = "user:"
            module = "users.wasm"
            origins = ["db"]
            invalidate = { origin = "db", channel = "users_changed" }
            "#,
        )
        .expect("valid");
        assert_eq!(config.seed, Some(3));
        let ns = &config.namespaces[0];
        assert_eq!((ns.ttl_ms, ns.grace_ms, ns.negative_ttl_ms), (60_000, 0, 5_000));
        assert_eq!(config.origins["db"].pool_size, 8);
    }

    #[test]
    fn bad_configs_are_named() {
        let cases = [
            ("[origins.db]\npostgres = \"x\"\nhttp = [\"http://a/\"]", "exactly one"),
            ("[[namespace]]\nprefix = \"u:\"\nmodule = \"m\"\norigins = [\"nope\"]", "not declared"),
            ("[[namespace]]\nprefix = \"\"\nmodule = \"m\"", "cannot be empty"),
            ("[[namespace]]\nprefix = \"u:\"\nmodule = \"m\"\njitter = 2.0", "jitter"),
            ("[[namespace]]\nprefix = \"u:\"\nmodule = \"m\"\n[[namespace]]\nprefix = \"u:\"\nmodule = \"n\"", "twice"),
            ("[origins.web]\nhttp = [\"ftp://x/\"]", "http://"),
            ("[origins.web]\nhttp = []", "at least one"),
            (
                "[origins.db]\npostgres = \"x\"\n[[namespace]]\nprefix = \"u:\"\nmodule = \"m\"\ninvalidate = { origin = \"db\", channel = \"a;b\" }",
                "channel",
            ),
            ("[[namespace]]\nprefix = \"u:\"\nmodule = \"m\"\nbogus = 1", "unknown field"),
        ];
        for (text, expected) in cases {
            let err = parse(text).expect_err(text);
            assert!(err.contains(expected), "{text}: {err}");
        }
    }
}
