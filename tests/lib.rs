//! Helpers shared by Cachet's integration tests (`tests/all`).

use std::path::PathBuf;

/// The misbehaving test policy (`tests/guests/hostile`) as a component,
/// built by this crate's build script.
pub fn hostile_component() -> &'static [u8] {
    include_bytes!(concat!(env!("OUT_DIR"), "/guests/hostile.wasm"))
}

/// The workspace root.
pub fn workspace() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// The shared trace directory (`../shared/traces` beside the checkout, or
/// `$CACHET_TRACES`). Panics with a clear message when it is missing: the
/// trace tests must fail, not pass silently, without their data.
pub fn traces_dir() -> PathBuf {
    let dir =
        std::env::var_os("CACHET_TRACES").map(PathBuf::from).unwrap_or_else(|| workspace().join("../shared/traces"));
    assert!(
        dir.join("README.md").is_file(),
        "trace directory {} not found; set CACHET_TRACES to shared/traces",
        dir.display()
    );
    dir
}
