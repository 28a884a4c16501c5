//! Hostile and malformed modules: each is rejected with a typed error that
//! names the problem, or becomes a counted fault and a fallback, with no
//! panic and no resident entry lost or double-counted.

use bytes::Bytes;
use cachet::core::{FaultKind, PolicyError, PolicyFactory, PolicyMode, SetOptions, Shard, ShardConfig};
use cachet::policies;
use cachet::wasm::{Limits, PolicyEngine};
use cachet_tests::hostile_component;
use std::sync::Arc;

fn hostile(
    engine: &PolicyEngine,
    config: &[(&str, &str)],
    limits: Limits,
) -> Result<Arc<dyn PolicyFactory>, PolicyError> {
    let config = config.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
    Ok(Arc::new(engine.load(hostile_component(), limits, config)?))
}

fn config(max_entries: u64) -> ShardConfig {
    ShardConfig { max_entries, retry_after_ms: 100, max_faults_in_a_row: 3, ..ShardConfig::default() }
}

/// Fills `shard` with `n` keys, returning them.
fn fill(shard: &mut Shard, now: u64, range: std::ops::Range<u32>) -> Vec<Vec<u8>> {
    range
        .map(|i| {
            let key = format!("k{i}").into_bytes();
            shard.set(now, &key, Bytes::from(vec![7; 10]), SetOptions::default()).expect("set");
            key
        })
        .collect()
}

/// Every key the shard claims to hold is readable with its value, and the
/// accounting matches what is there.
fn assert_intact(shard: &mut Shard, now: u64) {
    let order = shard.export_order(now);
    assert_eq!(order.len(), shard.len(), "every resident entry is accounted for");
    let keys: Vec<Vec<u8>> = order.iter().map(|&id| shard.key_of(id).expect("live id").to_vec()).collect();
    let mut bytes = 0;
    for key in keys {
        let value = shard.get(now, &key).expect("resident key reads back");
        assert_eq!(&value[..], &[7u8; 10][..]);
        bytes += (key.len() + value.len()) as u64;
    }
    assert_eq!(bytes, shard.bytes(), "byte accounting matches resident entries");
    assert!(shard.len() as u64 <= shard.config().max_entries);
}

fn assert_fault_and_fallback(mode: &str, kind: FaultKind, limits: Limits) {
    let engine = PolicyEngine::new().expect("engine");
    let factory = hostile(&engine, &[("mode", mode), ("after", "20")], limits).expect("loads");
    let mut shard = Shard::new(config(16), factory).expect("shard");
    let keys = fill(&mut shard, 1, 0..40);
    let stats = shard.stats().clone();
    assert!(stats.faults[kind.index()] >= 1, "{mode}: expected a {kind:?} fault, got {:?}", stats.faults);
    assert_eq!(stats.fallbacks, 1, "{mode}: one switch to the fallback");
    assert!(matches!(shard.policy_mode(), PolicyMode::Fallback { retry_at: Some(_) }), "{mode}");
    assert_eq!(shard.active_policy().name, "lru", "{mode}: native LRU took over");
    assert_eq!(shard.len(), 16, "{mode}: the shard stayed full, within bounds");
    // The most recent writes are all resident: nothing was lost on the switch.
    for key in &keys[24..] {
        assert!(shard.contains(1, key), "{mode}: {} lost", String::from_utf8_lossy(key));
    }
    assert_intact(&mut shard, 1);
}

#[test]
fn a_guest_that_loops_forever_is_cut_off_by_its_budget() {
    assert_fault_and_fallback("loop", FaultKind::Budget, Limits::default());
}

#[test]
fn a_guest_that_grows_memory_without_bound_hits_its_cap() {
    let limits = Limits { max_memory_bytes: 8 << 20, ..Limits::default() };
    assert_fault_and_fallback("grow", FaultKind::Memory, limits);
}

#[test]
fn a_guest_that_panics_is_a_trap() {
    assert_fault_and_fallback("panic", FaultKind::Trap, Limits::default());
}

#[test]
fn ids_that_do_not_exist_are_ignored_and_counted() {
    let engine = PolicyEngine::new().expect("engine");
    let factory = hostile(&engine, &[("mode", "bogus-ids"), ("after", "20")], Limits::default()).expect("loads");
    let mut shard = Shard::new(config(16), factory).expect("shard");
    fill(&mut shard, 1, 0..40);
    let stats = shard.stats();
    assert!(stats.faults[FaultKind::InvalidVictim.index()] >= 3, "{:?}", stats.faults);
    assert_eq!(stats.faults[FaultKind::InsufficientVictims.index()], 1);
    assert_eq!(shard.len(), 16);
    assert_intact(&mut shard, 1);
}

#[test]
fn the_configured_policy_is_rebuilt_after_a_fault_and_given_up_on_when_it_keeps_faulting() {
    let engine = PolicyEngine::new().expect("engine");
    // Panics once it has seen 40 events; a rebuild replays 16, so it recovers.
    let factory = hostile(&engine, &[("mode", "panic"), ("after", "40")], Limits::default()).expect("loads");
    let mut shard = Shard::new(config(16), factory).expect("shard");
    fill(&mut shard, 0, 0..50);
    assert_eq!(shard.stats().fallbacks, 1);
    shard.tick(50);
    assert!(matches!(shard.policy_mode(), PolicyMode::Fallback { .. }), "retry not yet due");
    shard.tick(100);
    assert_eq!(shard.policy_mode(), &PolicyMode::Configured);
    assert_eq!(shard.stats().recoveries, 1);
    assert_eq!(shard.active_policy().name, "hostile");
    assert_intact(&mut shard, 100);

    // Faulting again and again within the window: the shard gives up.
    let mut now = 100;
    for round in 0..3 {
        fill(&mut shard, now, 100 * (round + 1)..100 * (round + 1) + 40);
        now += 1_000;
        shard.tick(now);
    }
    assert_eq!(shard.policy_mode(), &PolicyMode::Fallback { retry_at: None }, "given up");
    assert!(shard.stats().policy_faults() >= 3);
    assert_intact(&mut shard, now);
}

#[test]
fn a_policy_that_refuses_to_start_is_a_create_error() {
    let engine = PolicyEngine::new().expect("engine");
    let err = hostile(&engine, &[("mode", "fail-create")], Limits::default()).err().expect("refused");
    assert!(matches!(err, PolicyError::Create(ref m) if m.contains("refusing to start")), "{err}");
    let err = hostile(&engine, &[("colour", "blue")], Limits::default()).err().expect("refused");
    assert!(err.to_string().contains("unknown config key `colour`"), "{err}");
}

#[test]
fn bytes_that_are_not_a_component_are_rejected() {
    let engine = PolicyEngine::new().expect("engine");
    let garbage = engine.load(b"definitely not wasm", Limits::default(), vec![]).err().expect("rejected");
    assert!(matches!(garbage, PolicyError::NotAComponent(ref m) if m.contains("magic")), "{garbage}");
    // A core module: the policy before componentization.
    let core = wit_component_core_module();
    let err = engine.load(&core, Limits::default(), vec![]).err().expect("rejected");
    assert!(matches!(err, PolicyError::NotAComponent(ref m) if m.contains("core module")), "{err}");
    // Truncated component.
    let lru = policies::bundled_component("lru").expect("bundled");
    let err = engine.load(&lru[..lru.len() / 2], Limits::default(), vec![]).err().expect("rejected");
    assert!(matches!(err, PolicyError::NotAComponent(_)), "{err}");
}

fn wit_component_core_module() -> Vec<u8> {
    // The smallest valid core module.
    b"\0asm\x01\0\0\0".to_vec()
}

pub(crate) const POLICY_WIT: &str = include_str!("../../wit/policy/policy.wit");

/// A component with dummy bodies for `world` of `wit`, with the package
/// `cachet:policy` taken from `policy_wit` (the real one, or a doctored copy).
pub(crate) fn dummy_component(policy_wit: &str, wit: &str, world: &str) -> Vec<u8> {
    let mut resolve = wit_parser::Resolve::default();
    resolve.push_str("policy.wit", policy_wit).expect("policy wit parses");
    let pkg = resolve.push_str("test.wit", wit).expect("test wit parses");
    let world = resolve.select_world(&[pkg], Some(world)).expect("world");
    let mut module = wit_component::dummy_module(&resolve, world, wit_parser::ManglingAndAbi::Standard32);
    wit_component::embed_component_metadata(&mut module, &resolve, world, wit_component::StringEncoding::UTF8, false)
        .expect("embed");
    wit_component::ComponentEncoder::default().module(&module).and_then(|e| e.validate(true).encode()).expect("encode")
}

fn load_err(bytes: &[u8]) -> PolicyError {
    let engine = PolicyEngine::new().expect("engine");
    engine.load(bytes, Limits::default(), vec![]).err().expect("rejected")
}

#[test]
fn a_module_with_a_forbidden_import_is_rejected_naming_it() {
    let wit = r#"
        package test:evil;
        interface filesystem { read: func(path: string) -> list<u8>; }
        world evil { import filesystem; export cachet:policy/policy@0.1.0; }
    "#;
    let err = load_err(&dummy_component(POLICY_WIT, wit, "evil"));
    assert!(matches!(err, PolicyError::ForbiddenImport { ref name } if name == "test:evil/filesystem"), "{err}");
}

#[test]
fn a_module_of_another_interface_version_is_rejected_naming_it() {
    let v2 = POLICY_WIT.replace("cachet:policy@0.1.0", "cachet:policy@0.2.0");
    let wit = "package test:v2; world other { export cachet:policy/policy@0.2.0; }";
    let err = load_err(&dummy_component(&v2, wit, "other"));
    let msg = err.to_string();
    assert!(matches!(err, PolicyError::WrongInterface(_)), "{msg}");
    assert!(msg.contains("cachet:policy/policy@0.1.0") && msg.contains("@0.2.0"), "{msg}");
}

#[test]
fn a_module_missing_a_function_is_rejected_naming_it() {
    // Same interface name and version, but the export lacks `info`.
    let trimmed = POLICY_WIT.replace("    info: func() -> policy-info;\n", "");
    assert_ne!(trimmed, POLICY_WIT);
    let wit = "package test:partial; world partial { export cachet:policy/policy@0.1.0; }";
    let err = load_err(&dummy_component(&trimmed, wit, "partial"));
    assert!(matches!(err, PolicyError::WrongInterface(_)), "{err}");
    assert!(err.to_string().contains("info"), "{err}");
}

#[test]
fn policy_deadlines_expire_idle_entries_through_wasm() {
    let engine = PolicyEngine::new().expect("engine");
    let factory = hostile(&engine, &[("idle-ms", "100")], Limits::default()).expect("loads");
    let mut shard = Shard::new(config(16), factory).expect("shard");
    fill(&mut shard, 0, 0..4);
    // Events carry the time of the call that delivers them: k0..k2 were
    // flushed at 0 (admission flushes before each insert), k3 and k1's read
    // are delivered by the tick at 60.
    assert!(shard.get(60, b"k1").is_some());
    assert_eq!(shard.tick(60), 0);
    assert_eq!(shard.tick(99), 0);
    assert_eq!(shard.tick(100), 2, "k0 and k2 idle for 100 ms");
    assert_eq!(shard.stats().policy_expired, 2);
    assert_eq!(shard.len(), 2);
    assert!(shard.contains(100, b"k1") && shard.contains(100, b"k3"));
    assert_eq!(shard.tick(160), 2);
    assert!(shard.is_empty());
    assert_eq!(shard.bytes(), 0);
    assert_eq!(shard.stats().policy_faults(), 0);
}

#[test]
fn admission_can_decline_new_entries() {
    let engine = PolicyEngine::new().expect("engine");
    let factory = hostile(&engine, &[("admit", "none")], Limits::default()).expect("loads");
    let mut shard = Shard::new(config(16), factory).expect("shard");
    let outcome = shard.set(0, b"k", Bytes::from_static(b"v"), SetOptions::default()).expect("set");
    assert_eq!(outcome, cachet::core::SetOutcome::NotAdmitted);
    assert!(shard.is_empty());
    assert_eq!(shard.stats().not_admitted, 1);
}
