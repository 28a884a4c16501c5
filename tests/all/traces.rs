//! The hit-ratio regression suite: miss ratios on the traces in `traces/`
//! must match the reference tables in `traces/reference.md` to 4 decimals,
//! every policy running as Wasm: on cloudPhysicsIO and web12 at every listed
//! size, and on w106 and orm-busy at 10%. Expected values are read from
//! that file itself.

use cachet::policies::PolicySpec;
use cachet::sim::{self, SimOptions};
use cachet::trace::Request;
use cachet::wasm::PolicyEngine;
use cachet_tests::traces_dir;

/// The trace files, as published upstream (`traces/README.md`).
const CLOUD_PHYSICS: &str = "cloudPhysicsIO.oracleGeneral.bin.xz";
const WEB12: &str = "web12.trace.xz";
const W106: &str = "w106.trace.xz";
const ORM_BUSY: &str = "orm-busy.trace.xz";

fn reference_tables() -> String {
    let path = traces_dir().join("reference.md");
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// `(size, miss ratio)` for each column of `policy`'s row in the full table
/// of `trace`.
fn reference(tables: &str, trace: &str, policy: &str) -> Vec<(u64, f64)> {
    let section = tables
        .split("#### ")
        .find(|s| s.starts_with(&format!("{trace} ")))
        .unwrap_or_else(|| panic!("no table for {trace} in traces/reference.md"));
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

/// Replays `trace` through each `(policy, table row)` at every size of the
/// row (or only `only_size`), as Wasm, and compares with the table to 4
/// decimals. Cells of 1.0000 are the reference simulator's tiny-cache
/// artefacts (`traces/reference.md`) and are skipped. Returns `(policy, size, miss ratio)`.
fn check(
    engine: &PolicyEngine,
    trace: &str,
    file: &str,
    policies: &[(&str, &str)],
    only_size: Option<u64>,
) -> Vec<(String, u64, f64)> {
    let tables = reference_tables();
    let path = traces_dir().join(file);
    let requests: Vec<Request> = sim::load_trace(&path, |_| {}).expect("trace loads");
    let mut results = Vec::new();
    for &(policy, row) in policies {
        let mut checked = 0;
        for (size, want) in reference(&tables, trace, row) {
            if only_size.is_some_and(|s| s != size) || want == 1.0 {
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
            results.push((policy.to_string(), size, report.miss_ratio));
            checked += 1;
        }
        assert!(checked > 0, "{trace}/{row}: no size checked");
    }
    results
}

/// The readers decode the upstream formats into the published streams:
/// request and distinct-key counts as `traces/README.md` lists them (w106
/// and orm-busy are left to their miss ratios: loading them takes seconds).
#[test]
fn the_traces_hold_the_published_request_streams() {
    for (file, requests, distinct) in [(CLOUD_PHYSICS, 113_872, 48_974), (WEB12, 95_607, 13_756)] {
        let trace: Vec<Request> = sim::load_trace(&traces_dir().join(file), |_| {}).expect("trace loads");
        assert_eq!((trace.len(), sim::distinct_keys(&trace)), (requests, distinct), "{file}");
    }
}

/// Every policy with a reference row that it must match digit for digit.
const EXACT: [(&str, &str); 8] = [
    ("lru", "LRU"),
    ("fifo", "FIFO"),
    ("lfu", "LFU"),
    ("clock", "CLOCK (1-bit)"),
    ("sieve", "SIEVE"),
    ("s3fifo", "S3-FIFO"),
    ("twoq", "2Q"),
    ("arc", "ARC"),
];

#[test]
fn policies_match_the_tables_on_cloudphysics_at_every_size() {
    let engine = PolicyEngine::new().expect("engine");
    check(&engine, "cloudPhysicsIO", CLOUD_PHYSICS, &EXACT, None);
}

#[test]
fn policies_match_the_tables_on_web12_at_every_size() {
    let engine = PolicyEngine::new().expect("engine");
    check(&engine, "web12", WEB12, &EXACT, None);
}

/// The large traces at 10%, where the default policy must also beat LRU.
fn check_at_ten_percent(trace: &str, file: &str, size: u64) {
    let engine = PolicyEngine::new().expect("engine");
    let policies: Vec<(&str, &str)> = EXACT.iter().copied().filter(|(p, _)| *p != "lfu").collect();
    let results = check(&engine, trace, file, &policies, Some(size));
    let ratio = |name: &str| results.iter().find(|(p, _, _)| p == name).map(|r| r.2).expect("ran");
    assert!(
        ratio(cachet::policies::DEFAULT_POLICY) < ratio("lru"),
        "the default policy must beat LRU on {trace} at 10%"
    );
}

#[test]
fn policies_match_the_tables_on_w106_at_10_percent() {
    check_at_ten_percent("w106", W106, 27_517);
}

#[test]
fn policies_match_the_tables_on_orm_busy_at_10_percent() {
    check_at_ten_percent("orm-busy", ORM_BUSY, 7_634);
}

#[test]
fn the_default_policy_beats_lru_at_10_percent_on_the_small_traces() {
    let engine = PolicyEngine::new().expect("engine");
    for (trace, file, size) in [("cloudPhysicsIO", CLOUD_PHYSICS, 4_897), ("web12", WEB12, 1_375)] {
        let policies = [(cachet::policies::DEFAULT_POLICY, "S3-FIFO"), ("lru", "LRU")];
        let results = check(&engine, trace, file, &policies, Some(size));
        assert!(results[0].2 < results[1].2, "{trace}: {results:?}");
    }
}

/// W-TinyLFU against the reference at every size of 1% of the distinct keys
/// and up on cloudPhysicsIO and web12, and at 10% on w106 and orm-busy:
/// within ±0.005; and the same with a 10% window (`window-ratio=0.1`, the
/// reference's second row) on cloudPhysicsIO and web12. The residual is sketch
/// collisions: the reference hashes object ids with XXH64, a policy sees
/// only Cachet's key hash (with the reference's hash the native replay
/// matches every cell but one, which is one request off).
#[test]
fn wtinylfu_is_within_half_a_point_of_the_reference_from_1_percent() {
    let engine = PolicyEngine::new().expect("engine");
    let tables = reference_tables();
    let mut checked = 0;
    let traces = [
        ("cloudPhysicsIO", CLOUD_PHYSICS, None, true),
        ("web12", WEB12, None, true),
        ("w106", W106, Some(27_517), false),
        ("orm-busy", ORM_BUSY, Some(7_634), false),
    ];
    for (trace, file, only_size, both_windows) in traces {
        let path = traces_dir().join(file);
        let requests: Vec<Request> = sim::load_trace(&path, |_| {}).expect("trace loads");
        let distinct = sim::distinct_keys(&requests);
        let mut rows = vec![("W-TinyLFU (1% win)", vec![])];
        if both_windows {
            rows.push(("W-TinyLFU (10% win)", vec![("window-ratio".to_string(), "0.1".to_string())]));
        }
        for (row, config) in rows {
            for (size, want) in reference(&tables, trace, row) {
                if (size as f64) < 0.01 * distinct as f64 - 1.0 || only_size.is_some_and(|s| s != size) {
                    continue;
                }
                let options = SimOptions {
                    trace: path.clone(),
                    policy: PolicySpec {
                        name_or_path: "wtinylfu".into(),
                        config: config.clone(),
                        ..PolicySpec::default()
                    },
                    capacity: Some(size),
                    capacity_bytes: None,
                    seed: 0,
                };
                let report = sim::replay(&engine, &options, &requests, |_| {}).expect("replay");
                assert_eq!(report.policy_faults, 0, "wtinylfu at {size} faulted");
                assert!(
                    (report.miss_ratio - want).abs() <= 0.005,
                    "wtinylfu ({row}) on {trace} at {size}: {:.4} vs {want}",
                    report.miss_ratio
                );
                checked += 1;
            }
        }
    }
    assert_eq!(checked, 26);
}
