//! Miss ratios on the shared traces must match the reference tables in
//! `shared/traces/README.md` to 4 decimals: the Wasm LRU, FIFO and LFU on
//! cloudPhysicsIO and web12 at every listed size, and on w106 and orm-busy
//! at 10%. Expected values are read from the README itself.

use cachet::policies::PolicySpec;
use cachet::sim::{self, SimOptions};
use cachet::trace::Request;
use cachet::wasm::PolicyEngine;
use cachet_tests::traces_dir;

/// `(size, miss ratio)` for each column of `policy`'s row in the full table
/// of `trace`.
fn reference(readme: &str, trace: &str, policy: &str) -> Vec<(u64, f64)> {
    let section = readme
        .split("#### ")
        .find(|s| s.starts_with(&format!("{trace} ")))
        .unwrap_or_else(|| panic!("no table for {trace} in the README"));
    let mut lines = section.lines().filter(|l| l.starts_with('|'));
    let header = lines.next().expect("header row");
    let sizes: Vec<u64> = header
        .split('|')
        .filter_map(|cell| {
            let inner = cell.split_once('(')?.1.split_once(')')?.0;
            inner.replace(',', "").parse().ok()
        })
        .collect();
    let row = lines
        .find(|l| l.split('|').nth(1).map(str::trim) == Some(policy))
        .unwrap_or_else(|| panic!("no {policy} row for {trace}"));
    let ratios: Vec<f64> = row.split('|').skip(2).filter_map(|c| c.trim().trim_matches('*').parse().ok()).collect();
    assert_eq!(sizes.len(), ratios.len(), "{trace}/{policy}: table shape");
    sizes.into_iter().zip(ratios).collect()
}

fn check(engine: &PolicyEngine, trace: &str, file: &str, policy: &str, row: &str, only_size: Option<u64>) {
    let readme = std::fs::read_to_string(traces_dir().join("README.md")).expect("README");
    let path = traces_dir().join("csv").join(file);
    let requests: Vec<Request> = sim::load_trace(&path, |_| {}).expect("trace loads");
    let mut checked = 0;
    for (size, want) in reference(&readme, trace, row) {
        if only_size.is_some_and(|s| s != size) {
            continue;
        }
        let options = SimOptions {
            trace: path.clone(),
            policy: PolicySpec { name_or_path: policy.into(), ..PolicySpec::default() },
            capacity: Some(size),
            capacity_bytes: None,
            seed: 0,
        };
        let report = sim::replay(engine, &options, &requests, |_| {}).expect("replay");
        assert_eq!(report.runtime, "wasm");
        assert_eq!(report.policy_faults, 0);
        let got = (report.miss_ratio * 10_000.0).round() / 10_000.0;
        assert_eq!(got, want, "{policy} on {trace} at {size}: got {:.6}, table says {want}", report.miss_ratio);
        checked += 1;
    }
    assert!(checked > 0, "{trace}/{row}: no size checked");
}

#[test]
fn lru_fifo_lfu_match_the_tables_on_cloudphysics_and_web12() {
    let engine = PolicyEngine::new().expect("engine");
    for (trace, file) in [("cloudPhysicsIO", "cloudPhysicsIO.csv.gz"), ("web12", "web12.csv.gz")] {
        for (policy, row) in [("lru", "LRU"), ("fifo", "FIFO"), ("lfu", "LFU")] {
            check(&engine, trace, file, policy, row, None);
        }
    }
}

#[test]
fn lru_and_fifo_match_the_tables_on_w106_at_10_percent() {
    let engine = PolicyEngine::new().expect("engine");
    for (policy, row) in [("lru", "LRU"), ("fifo", "FIFO")] {
        check(&engine, "w106", "w106.csv.xz", policy, row, Some(27_517));
    }
}

#[test]
fn lru_and_fifo_match_the_tables_on_orm_busy_at_10_percent() {
    let engine = PolicyEngine::new().expect("engine");
    for (policy, row) in [("lru", "LRU"), ("fifo", "FIFO")] {
        check(&engine, "orm-busy", "orm-busy.csv.xz", policy, row, Some(7_634));
    }
}
