//! Builds the bundled policies to Wasm components and embeds them, so the
//! `cachet` binary runs with no files beside it.

#[path = "../xtask/src/guests.rs"]
#[allow(dead_code)]
mod guests;

fn main() {
    if let Err(err) = run() {
        eprintln!("error: {err}");
        std::process::exit(1);
    }
}

fn run() -> Result<(), String> {
    let components = guests::build_script(guests::policy_guests)?;
    let mut table = String::from(
        "/// Bundled policy components, by name, sorted.\npub(crate) const BUNDLED: &[(&str, &[u8])] = &[\n",
    );
    for path in &components {
        let name = path.file_stem().and_then(|s| s.to_str()).ok_or("bad component file name")?;
        table.push_str(&format!("    ({name:?}, include_bytes!({:?})),\n", path.display().to_string()));
    }
    table.push_str("];\n");
    let out_dir = std::env::var("OUT_DIR").map_err(|e| e.to_string())?;
    std::fs::write(std::path::Path::new(&out_dir).join("bundled.rs"), table).map_err(|e| e.to_string())
}
