//! `cargo xtask fuzz`: runs the coverage-guided fuzz targets of `fuzz/`
//! (cargo-fuzz, libFuzzer) for a bounded time each and reports executions,
//! corpus size and crashes. The targets' entry points are in
//! `host/src/fuzz.rs`; every CI run replays the committed corpora and past
//! crashes as an ordinary test, so this command is for the long runs.

use crate::workspace;
use anyhow::{Context, Result, bail};
use std::process::Command;

/// The targets, as `host/src/fuzz.rs` names them.
const TARGETS: [&str; 6] = ["resp", "frame", "peer", "manifest", "loader_config", "http_path"];

/// `cargo xtask fuzz [TARGET|all] [--seconds N]`.
pub(crate) fn fuzz(args: &[String]) -> Result<()> {
    let mut targets: Vec<&str> = TARGETS.to_vec();
    let mut seconds = 60u64;
    let mut rest = args.iter();
    while let Some(arg) = rest.next() {
        match arg.as_str() {
            "--seconds" => {
                let value = rest.next().context("--seconds needs a number")?;
                seconds = value.parse().with_context(|| format!("--seconds {value}"))?;
            }
            "all" => targets = TARGETS.to_vec(),
            name => match TARGETS.iter().find(|t| **t == name) {
                Some(target) => targets = vec![target],
                None => bail!("unknown fuzz target `{name}`; targets: {}", TARGETS.join(", ")),
            },
        }
    }
    ensure_cargo_fuzz()?;
    let dir = workspace().join("fuzz");
    let mut report = Vec::new();
    for target in targets {
        let corpus = dir.join("corpus").join(target);
        std::fs::create_dir_all(&corpus)?;
        eprintln!("xtask: fuzzing {target} for {seconds} s (corpus {})", corpus.display());
        // No sanitizer: the code under test is safe Rust, and libFuzzer's
        // coverage instrumentation alone needs no nightly toolchain.
        let output = Command::new("cargo")
            .current_dir(&dir)
            .args(["fuzz", "run", "--sanitizer", "none", "-O", target])
            .arg(&corpus)
            .args(["--", &format!("-max_total_time={seconds}"), "-rss_limit_mb=2048", "-print_final_stats=1"])
            .output()
            .context("cannot run cargo fuzz")?;
        let stderr = String::from_utf8_lossy(&output.stderr);
        let stat = |name: &str| -> Option<u64> {
            stderr.lines().find_map(|l| l.strip_prefix(&format!("stat::{name}:")).and_then(|v| v.trim().parse().ok()))
        };
        let executions = stat("number_of_executed_units").unwrap_or(0);
        let rate = stat("average_exec_per_sec").unwrap_or(0);
        let corpus_files = std::fs::read_dir(&corpus).map(|d| d.count()).unwrap_or(0);
        let crashed = !output.status.success();
        if crashed {
            eprintln!(
                "{}",
                stderr.lines().rev().take(40).collect::<Vec<_>>().into_iter().rev().collect::<Vec<_>>().join("\n")
            );
            eprintln!(
                "xtask: {target} crashed; the input is in fuzz/artifacts/{target}/. Copy it to \
                 fuzz/regressions/{target}/ (replayed by every CI run) once fixed."
            );
        }
        report.push((target, executions, rate, corpus_files, crashed));
    }
    println!("{:<14} {:>14} {:>8} {:>9} {:>8}", "target", "executions", "exec/s", "corpus", "crashed");
    for (target, executions, rate, corpus, crashed) in &report {
        println!("{target:<14} {executions:>14} {rate:>8} {corpus:>9} {:>8}", if *crashed { "YES" } else { "no" });
    }
    if report.iter().any(|r| r.4) {
        bail!("a fuzz target crashed");
    }
    Ok(())
}

/// Installs cargo-fuzz from crates.io when it is missing.
fn ensure_cargo_fuzz() -> Result<()> {
    let present = Command::new("cargo").args(["fuzz", "--version"]).output().is_ok_and(|o| o.status.success());
    if !present {
        eprintln!("xtask: installing cargo-fuzz");
        let status = Command::new("cargo").args(["install", "cargo-fuzz", "--locked"]).status()?;
        if !status.success() {
            bail!("cargo install cargo-fuzz failed");
        }
    }
    Ok(())
}
