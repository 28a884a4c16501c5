//! Builds the policy crates in `policies/` for `wasm32-unknown-unknown` and
//! turns each core module into a component with wit-component.
//!
//! Shared, by `#[path]`, between `cargo xtask build-policies` and the host's
//! build script (which embeds the components in the `cachet` binary), so
//! the two can never build policies differently.

use std::path::{Path, PathBuf};
use std::process::Command;

/// The Rust target policies are compiled for: it imports nothing, unlike
/// `wasm32-wasip2`, so a componentized policy imports only our interface.
pub(crate) const WASM_TARGET: &str = "wasm32-unknown-unknown";

/// Names of the policy crates (`policies/NAME`), sorted.
pub(crate) fn policy_names(workspace: &Path) -> Result<Vec<String>, String> {
    let dir = workspace.join("policies");
    let entries = std::fs::read_dir(&dir).map_err(|e| format!("cannot list {}: {e}", dir.display()))?;
    let mut names: Vec<String> = entries
        .filter_map(Result::ok)
        .filter(|e| e.path().join("Cargo.toml").is_file())
        .filter_map(|e| e.file_name().into_string().ok())
        .collect();
    names.sort();
    Ok(names)
}

/// Installs the Wasm target with rustup when the toolchain lacks it.
pub(crate) fn ensure_wasm_target(rustc: &str) -> Result<(), String> {
    let sysroot =
        Command::new(rustc).args(["--print", "sysroot"]).output().map_err(|e| format!("cannot run {rustc}: {e}"))?;
    let sysroot = String::from_utf8_lossy(&sysroot.stdout).trim().to_string();
    if Path::new(&sysroot).join("lib/rustlib").join(WASM_TARGET).is_dir() {
        return Ok(());
    }
    let status = Command::new("rustup")
        .args(["target", "add", WASM_TARGET])
        .status()
        .map_err(|e| format!("the {WASM_TARGET} target is missing and rustup cannot run: {e}"))?;
    if status.success() { Ok(()) } else { Err(format!("`rustup target add {WASM_TARGET}` failed ({status})")) }
}

/// A guest crate to build: its package name and the component's file stem.
pub(crate) struct Guest {
    /// Cargo package, e.g. `cachet-policy-lru`.
    pub(crate) package: String,
    /// Output file stem, e.g. `lru` for `lru.wasm`.
    pub(crate) name: String,
}

/// The policy crates in `policies/` as guests.
pub(crate) fn policy_guests(workspace: &Path) -> Result<Vec<Guest>, String> {
    Ok(policy_names(workspace)?
        .into_iter()
        .map(|name| Guest { package: format!("cachet-policy-{name}"), name })
        .collect())
}

/// Builds `guests` (release, for [`WASM_TARGET`]) into `target_dir`,
/// componentizes each and writes `out_dir/NAME.wasm`. Returns the paths
/// written.
pub(crate) fn build_components(
    cargo: &str,
    workspace: &Path,
    target_dir: &Path,
    out_dir: &Path,
    guests: &[Guest],
) -> Result<Vec<PathBuf>, String> {
    let mut cmd = Command::new(cargo);
    cmd.current_dir(workspace)
        .args(["build", "--release", "--target", WASM_TARGET])
        .env("CARGO_TARGET_DIR", target_dir)
        // Small, fast guests: no debug info, one codegen unit.
        .env("CARGO_PROFILE_RELEASE_DEBUG", "false")
        .env("CARGO_PROFILE_RELEASE_CODEGEN_UNITS", "1")
        .env("CARGO_PROFILE_RELEASE_LTO", "true")
        .env("CARGO_PROFILE_RELEASE_PANIC", "abort");
    // Flags and wrappers meant for the host build must not leak into the
    // guest build (a build script inherits them from the outer cargo).
    for var in ["CARGO_ENCODED_RUSTFLAGS", "RUSTC_WRAPPER", "RUSTC_WORKSPACE_WRAPPER", "CARGO_BUILD_TARGET"] {
        cmd.env_remove(var);
    }
    // Bulk memory turns every `memcpy`/`memset` (a `Vec` growing, a table
    // being cleared) into one `memory.copy`/`memory.fill` instruction: one
    // unit of fuel instead of a loop whose cost grows with the data, which
    // made growing a 100,000-entry list blow a call's budget.
    cmd.env("RUSTFLAGS", "-C target-feature=+bulk-memory");
    for guest in guests {
        cmd.args(["-p", &guest.package]);
    }
    let status = cmd.status().map_err(|e| format!("cannot run {cargo}: {e}"))?;
    if !status.success() {
        return Err(format!("building the guests for {WASM_TARGET} failed ({status})"));
    }
    std::fs::create_dir_all(out_dir).map_err(|e| format!("cannot create {}: {e}", out_dir.display()))?;
    let mut written = Vec::new();
    for guest in guests {
        let core_path =
            target_dir.join(WASM_TARGET).join("release").join(format!("{}.wasm", guest.package.replace('-', "_")));
        let core = std::fs::read(&core_path).map_err(|e| format!("cannot read {}: {e}", core_path.display()))?;
        let component = componentize(&core).map_err(|e| format!("componentizing {}: {e}", guest.name))?;
        let out = out_dir.join(format!("{}.wasm", guest.name));
        std::fs::write(&out, component).map_err(|e| format!("cannot write {}: {e}", out.display()))?;
        written.push(out);
    }
    Ok(written)
}

/// Turns a core module built with wit-bindgen into a component.
pub(crate) fn componentize(core: &[u8]) -> Result<Vec<u8>, String> {
    wit_component::ComponentEncoder::default()
        .module(core)
        .and_then(|encoder| encoder.validate(true).encode())
        .map_err(|e| format!("{e:#}"))
}

/// The body of a build script that needs guest components: watches the
/// guest sources, installs the target if missing, builds `select(workspace)`
/// into `<target>/wasm-guests` (a directory of its own: the outer build
/// holds the lock on ours) and writes the components to `OUT_DIR/guests`.
pub(crate) fn build_script(select: impl FnOnce(&Path) -> Result<Vec<Guest>, String>) -> Result<Vec<PathBuf>, String> {
    let env = |name: &str| std::env::var(name).map_err(|e| format!("{name}: {e}"));
    let manifest = PathBuf::from(env("CARGO_MANIFEST_DIR")?);
    let workspace = manifest
        .ancestors()
        .find(|dir| dir.join("Cargo.lock").is_file() || dir.join("wit").is_dir())
        .ok_or("cannot find the workspace root")?
        .to_path_buf();
    let out_dir = PathBuf::from(env("OUT_DIR")?);
    for watched in ["wit", "guest-sdk", "policies", "examples", "tests/guests", "xtask/src/guests.rs"] {
        println!("cargo:rerun-if-changed={}", workspace.join(watched).display());
    }
    let cargo = env("CARGO").unwrap_or_else(|_| "cargo".into());
    let rustc = env("RUSTC").unwrap_or_else(|_| "rustc".into());
    ensure_wasm_target(&rustc)?;
    // OUT_DIR is `<target>[/<triple>]/<profile>/build/<pkg>/out`.
    let target_dir = out_dir
        .ancestors()
        .nth(4)
        .map(|target| target.join("wasm-guests"))
        .unwrap_or_else(|| out_dir.join("wasm-guests"));
    let guests = select(&workspace)?;
    build_components(&cargo, &workspace, &target_dir, &out_dir.join("guests"), &guests)
}
