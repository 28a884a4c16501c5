//! The loader configuration as a cluster shares it: one TOML text in the
//! metadata log, each namespace's `module` naming its component by hash
//! (`sha256:HEX`), and the components' bytes beside the log,
//! content-addressed, so every member builds the same loaders whatever
//! files it has (see `cluster::loaders`).

use super::config::{LoaderConfig, LoaderConfigError};
use std::path::{Path, PathBuf};

/// How a shared configuration names a module: this, then its hash.
pub const MODULE_SCHEME: &str = "sha256:";

/// A shared configuration's text is refused beyond this size.
pub const MAX_CONFIG_BYTES: usize = 64 << 10;

/// A shared configuration names at most this many distinct modules.
pub const MAX_MODULES: usize = 64;

/// A loader configuration ready to share: its text and the modules it
/// names.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SharedLoaders {
    /// The configuration, modules named by hash.
    pub config: String,
    /// The modules: hash and bytes, in the order the namespaces name them
    /// (each once).
    pub modules: Vec<(String, Vec<u8>)>,
}

/// Why a configuration cannot be shared.
#[derive(Debug, thiserror::Error)]
pub enum SharedLoadersError {
    /// The configuration is invalid.
    #[error(transparent)]
    Config(#[from] LoaderConfigError),
    /// A module file cannot be read.
    #[error("cannot read loader module {path}: {source}")]
    Module {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The configuration cannot be written out again.
    #[error("cannot encode the loader configuration: {0}")]
    Encode(String),
    /// A shared configuration is not one this build can use.
    #[error("shared loader configuration: {0}")]
    Invalid(String),
}

impl SharedLoaders {
    /// Reads each namespace's module (paths as `config` holds them:
    /// [`LoaderConfig::load`] made them relative to its file) and names it
    /// by hash.
    pub fn from_config(config: &LoaderConfig) -> Result<Self, SharedLoadersError> {
        Self::with_modules(config, &|path| std::fs::read(path))
    }

    /// [`Self::from_config`], with the module bytes from `read`.
    pub fn with_modules(
        config: &LoaderConfig,
        read: &dyn Fn(&Path) -> std::io::Result<Vec<u8>>,
    ) -> Result<Self, SharedLoadersError> {
        config.check()?;
        let mut shared = config.clone();
        let mut modules: Vec<(String, Vec<u8>)> = Vec::new();
        for ns in &mut shared.namespaces {
            let bytes =
                read(&ns.module).map_err(|source| SharedLoadersError::Module { path: ns.module.clone(), source })?;
            let sha = crate::registry::sha256_hex(&bytes);
            ns.module = PathBuf::from(format!("{MODULE_SCHEME}{sha}"));
            if !modules.iter().any(|(s, _)| *s == sha) {
                modules.push((sha, bytes));
            }
        }
        let config = toml::to_string(&shared).map_err(|e| SharedLoadersError::Encode(e.to_string()))?;
        let this = Self { config, modules };
        // What is shared must read back as what was read.
        parse(&this.config)?;
        Ok(this)
    }
}

/// A shared configuration's text read back: the configuration, and the
/// hashes of the modules it names (each once, in order). Refused when it
/// is too large, names a module by anything but its hash, or names too
/// many.
pub fn parse(text: &str) -> Result<(LoaderConfig, Vec<String>), SharedLoadersError> {
    if text.len() > MAX_CONFIG_BYTES {
        return Err(SharedLoadersError::Invalid(format!(
            "{} bytes of configuration, over the {MAX_CONFIG_BYTES} allowed",
            text.len()
        )));
    }
    let config = LoaderConfig::parse(text)?;
    let mut hashes: Vec<String> = Vec::new();
    for ns in &config.namespaces {
        let named = ns.module.to_str().and_then(|m| m.strip_prefix(MODULE_SCHEME));
        let Some(sha) = named.filter(|sha| is_sha256(sha)) else {
            return Err(SharedLoadersError::Invalid(format!(
                "namespace `{}` names its module `{}`, not `{MODULE_SCHEME}` and a SHA-256",
                ns.prefix,
                ns.module.display()
            )));
        };
        if !hashes.iter().any(|h| h == sha) {
            hashes.push(sha.to_string());
        }
    }
    if hashes.len() > MAX_MODULES {
        return Err(SharedLoadersError::Invalid(format!("{} modules, over the {MAX_MODULES} allowed", hashes.len())));
    }
    Ok((config, hashes))
}

/// Whether `text` is a SHA-256 in lower-case hex.
pub fn is_sha256(text: &str) -> bool {
    text.len() == 64 && text.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_configuration_shares_its_modules_by_hash_and_reads_back() {
        let text = "seed = 7\n[origins.db]\npostgres = \"host=x\"\n\
                    [[namespace]]\nprefix = \"user:\"\nmodule = \"a.wasm\"\norigins = [\"db\"]\nttl-ms = 5000\n\
                    invalidate = { origin = \"db\", channel = \"users\" }\n\
                    [[namespace]]\nprefix = \"item:\"\nmodule = \"a.wasm\"\n\
                    [[namespace]]\nprefix = \"blob:\"\nmodule = \"b.wasm\"\nwrite = \"behind\"\n";
        let config = LoaderConfig::parse(text).expect("config");
        let read = |path: &Path| Ok(path.to_string_lossy().as_bytes().to_vec());
        let shared = SharedLoaders::with_modules(&config, &read).expect("shared");
        assert_eq!(shared.modules.len(), 2, "a module two namespaces use travels once");
        let (back, hashes) = parse(&shared.config).expect("reads back");
        assert_eq!(hashes, shared.modules.iter().map(|(h, _)| h.clone()).collect::<Vec<_>>());
        let mut expected = config.clone();
        for ns in &mut expected.namespaces {
            let sha = crate::registry::sha256_hex(ns.module.to_string_lossy().as_bytes());
            ns.module = PathBuf::from(format!("{MODULE_SCHEME}{sha}"));
        }
        assert_eq!(back, expected, "everything but the module names survives");
    }

    #[test]
    fn a_shared_configuration_names_modules_only_by_hash() {
        let bad = [
            ("[[namespace]]\nprefix = \"u:\"\nmodule = \"users.wasm\"", "not `sha256:`"),
            ("[[namespace]]\nprefix = \"u:\"\nmodule = \"sha256:ABC\"", "not `sha256:`"),
            ("[[namespace]]\nprefix = \"u:\"\nmodule = \"m\"\nbogus = 1", "unknown field"),
        ];
        for (text, why) in bad {
            let err = parse(text).expect_err(text).to_string();
            assert!(err.contains(why), "{text}: {err}");
        }
        let huge = format!("seed = 1\n#{}", "x".repeat(MAX_CONFIG_BYTES));
        assert!(parse(&huge).expect_err("too large").to_string().contains("over the"));
    }
}
