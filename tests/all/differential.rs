//! Native and Wasm builds of each policy must choose identical victims from
//! the same event stream; anything else means the Wasm glue changes
//! behaviour.

use cachet::core::EvictionPolicy;
use cachet::policies::{self, PolicySpec};
use cachet::wasm::PolicyEngine;
use cachet_policy_sdk::rng::SplitMix64;
use cachet_policy_sdk::{Capacity, Entry, Event, Need, RemovalCause};

fn instance(engine: &PolicyEngine, name: &str, native: bool, capacity: Capacity) -> Box<dyn EvictionPolicy> {
    let spec = PolicySpec { name_or_path: name.into(), native, ..PolicySpec::default() };
    let factory = policies::resolve(engine, &spec).expect("policy resolves");
    factory.create(capacity, 42).expect("instance")
}

#[test]
fn native_and_wasm_pick_identical_victims() {
    let engine = PolicyEngine::new().expect("engine");
    let capacity = Capacity { max_entries: 50, max_bytes: 4_000 };
    for name in policies::bundled_names() {
        let mut native = instance(&engine, name, true, capacity);
        let mut wasm = instance(&engine, name, false, capacity);
        let mut rng = SplitMix64::new(3);
        let mut resident: Vec<Entry> = Vec::new();
        let mut batch = Vec::new();
        let mut next_id = 1u64;
        let mut compared = 0usize;
        for now in 0..4_000u64 {
            let pick = rng.below(10);
            if pick < 4 || resident.is_empty() {
                let entry = Entry {
                    id: next_id,
                    key_hash: rng.next_u64(),
                    size: 1 + rng.below(100),
                    expires_at: (rng.below(3) == 0).then(|| now + rng.below(1_000)),
                    hint: rng.below(3) as u32,
                };
                next_id += 1;
                resident.push(entry);
                batch.push(Event::Inserted(entry));
            } else if pick < 8 {
                let at = rng.below(resident.len() as u64) as usize;
                batch.push(Event::Accessed(resident[at].id));
            } else if pick == 8 {
                let at = rng.below(resident.len() as u64) as usize;
                resident[at].size = 1 + rng.below(100);
                batch.push(Event::Updated(resident[at]));
            } else {
                let at = rng.below(resident.len() as u64) as usize;
                let gone = resident.swap_remove(at);
                batch.push(Event::Removed(gone.id, RemovalCause::Deleted));
            }
            if rng.below(16) == 0 {
                batch.push(Event::Missed(rng.next_u64()));
            }
            let bytes: u64 = resident.iter().map(|e| e.size).sum();
            let need = Need {
                entries: (resident.len() as u64).saturating_sub(capacity.max_entries) as u32,
                bytes: bytes.saturating_sub(capacity.max_bytes),
            };
            if batch.len() >= 64 {
                native.on_events(now, &batch).expect("native events");
                wasm.on_events(now, &batch).expect("wasm events");
                batch.clear();
            }
            if need != Need::default() {
                let (mut a, mut b) = (Vec::new(), Vec::new());
                native.pick_victims(now, &batch, need, &mut a).expect("native victims");
                wasm.pick_victims(now, &batch, need, &mut b).expect("wasm victims");
                batch.clear();
                assert_eq!(a, b, "{name}: victims differ at t={now}");
                assert!(!a.is_empty(), "{name}: no victims for {need:?}");
                resident.retain(|e| !a.contains(&e.id));
                compared += a.len();
            }
        }
        native.on_events(4_000, &batch).expect("native events");
        wasm.on_events(4_000, &batch).expect("wasm events");
        let (mut a, mut b) = (Vec::new(), Vec::new());
        native.export_order(&mut a).expect("native export");
        wasm.export_order(&mut b).expect("wasm export");
        assert_eq!(a, b, "{name}: export orders differ");
        assert_eq!(a.len(), resident.len(), "{name}: export order must list every entry");
        assert!(compared > 500, "{name}: only {compared} victims compared");
    }
}
