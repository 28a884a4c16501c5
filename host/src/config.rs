//! Node configuration: a TOML file whose settings command-line flags
//! override, and human-readable sizes (`256MiB`).

use serde::Deserialize;
use std::path::{Path, PathBuf};

/// Settings of `cachet serve`, as read from `--config FILE`. Every field is
/// optional; flags override what the file says.
#[derive(Clone, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct FileConfig {
    /// `--listen`.
    pub listen: Option<String>,
    /// `--data-dir`.
    pub data_dir: Option<PathBuf>,
    /// `--max-memory`, e.g. `"256MiB"`.
    pub max_memory: Option<String>,
    /// `--max-entries`.
    pub max_entries: Option<u64>,
    /// `--max-value-size`, e.g. `"1MiB"`.
    pub max_value_size: Option<String>,
    /// `--policy`.
    pub policy: Option<String>,
    /// `--threads`.
    pub threads: Option<usize>,
    /// `--shards`.
    pub shards: Option<usize>,
    /// `--max-connections`.
    pub max_connections: Option<u32>,
    /// `--idle-timeout`, in seconds.
    pub idle_timeout: Option<u64>,
    /// `--tls-cert`.
    pub tls_cert: Option<PathBuf>,
    /// `--tls-key`.
    pub tls_key: Option<PathBuf>,
    /// `--tls-ca`.
    pub tls_ca: Option<PathBuf>,
    /// `--admin-token-file`.
    pub admin_token_file: Option<PathBuf>,
    /// `--metrics-listen`.
    pub metrics_listen: Option<String>,
    /// `--policy-fault-limit`.
    pub policy_fault_limit: Option<u32>,
    /// `--policy-retry-ms`.
    pub policy_retry_ms: Option<u64>,
    /// `--resp-listen`.
    pub resp_listen: Option<String>,
    /// `--max-connections-per-address`.
    pub max_connections_per_address: Option<u32>,
    /// `--resp-max-command`, e.g. `"32MiB"`.
    pub resp_max_command: Option<String>,
    /// `--resp-idle-timeout`, in seconds (0: never).
    pub resp_idle_timeout: Option<u64>,
    /// `--output-timeout`, in seconds.
    pub output_timeout: Option<u64>,
    /// `--resp-password-file`.
    pub resp_password_file: Option<PathBuf>,
    /// `--resp-acl`.
    pub resp_acl: Option<PathBuf>,
    /// `--resp-tls`.
    pub resp_tls: Option<bool>,
    /// `--resp-insecure`.
    pub resp_insecure: Option<bool>,
    /// `--resp-cluster-redirects`.
    pub resp_cluster_redirects: Option<bool>,
    /// `--loaders`.
    pub loaders: Option<PathBuf>,
}

/// A configuration that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file cannot be read.
    #[error("cannot read {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// The file is not valid TOML for these settings.
    #[error("{path}: {detail}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// The parser's message (names the bad key or value).
        detail: String,
    },
    /// A size does not parse.
    #[error("bad size `{0}`: expected a number of bytes with an optional unit (B, KiB, MiB, GiB, KB, MB, GB)")]
    Size(String),
}

impl FileConfig {
    /// Reads and parses `path`.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Io { path: path.into(), source })?;
        toml::from_str(&text).map_err(|e| ConfigError::Parse { path: path.into(), detail: e.to_string() })
    }
}

/// Parses `1024`, `64KiB`, `256MiB`, `1GiB`, `10MB`... into bytes.
pub fn parse_size(text: &str) -> Result<u64, ConfigError> {
    let text = text.trim();
    let split = text.find(|c: char| !c.is_ascii_digit()).unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let number: u64 = number.parse().map_err(|_| ConfigError::Size(text.into()))?;
    let scale: u64 = match unit.trim() {
        "" | "B" => 1,
        "KiB" | "K" => 1 << 10,
        "MiB" | "M" => 1 << 20,
        "GiB" | "G" => 1 << 30,
        "KB" => 1_000,
        "MB" => 1_000_000,
        "GB" => 1_000_000_000,
        _ => return Err(ConfigError::Size(text.into())),
    };
    number.checked_mul(scale).ok_or_else(|| ConfigError::Size(text.into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_with_binary_and_decimal_units() {
        assert_eq!(parse_size("256MiB").ok(), Some(256 << 20));
        assert_eq!(parse_size("1MiB").ok(), Some(1 << 20));
        assert_eq!(parse_size("10MB").ok(), Some(10_000_000));
        assert_eq!(parse_size("4096").ok(), Some(4096));
        for bad in ["", "MiB", "12 parsecs", "99999999999999GiB"] {
            assert!(parse_size(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn config_files_reject_unknown_keys() {
        let ok: FileConfig =
            toml::from_str("listen = \"127.0.0.1:9000\"\nmax-memory = \"64MiB\"\nidle-timeout = 30").expect("parses");
        assert_eq!(ok.max_memory.as_deref(), Some("64MiB"));
        assert_eq!(ok.idle_timeout, Some(30));
        let err = toml::from_str::<FileConfig>("max-memroy = \"64MiB\"").expect_err("typo");
        assert!(err.to_string().contains("max-memroy"), "{err}");
    }
}
