//! The Wasm export glue behind `export_policy!`: generated bindings (of the
//! policy world and of the loader world), and one generic resource type that
//! adapts any [`Policy`] to them. It knows nothing of loaders: the loader
//! side ([`crate::loader`]) converts its own types and uses the bindings
//! from here, never the other way round.

use crate::policy::{Config, Policy};
use crate::types;
use std::cell::RefCell;

#[allow(missing_docs, unreachable_pub, unused_qualifications, clippy::all)]
pub mod bindings {
    wit_bindgen::generate!({
        world: "eviction",
        path: "../wit/policy",
        pub_export_macro: true,
        export_macro_name: "__export_eviction_world",
        default_bindings_module: "cachet_policy_sdk::__wasm::bindings",
    });
}

use bindings::cachet::policy::types as wt;
use bindings::exports::cachet::policy::policy as wit;

/// One policy instance behind the `eviction-policy` resource. The component
/// model hands resources out by shared reference, hence the `RefCell`; a
/// guest is single-threaded, so the borrow never contends.
pub struct Instance<P: Policy> {
    policy: RefCell<P>,
    scratch: RefCell<Vec<types::Event>>,
}

/// The module's info in WIT form.
pub fn info<P: Policy>() -> wit::PolicyInfo {
    let i = P::info();
    wit::PolicyInfo {
        name: i.name,
        version: i.version,
        wants_access_events: i.wants_access_events,
        wants_miss_events: i.wants_miss_events,
        uses_admission: i.uses_admission,
    }
}

fn entry(e: wt::Entry) -> types::Entry {
    types::Entry { id: e.id, key_hash: e.key_hash, size: e.size, expires_at: e.expires_at, hint: e.hint }
}

fn cause(c: wt::RemovalCause) -> types::RemovalCause {
    match c {
        wt::RemovalCause::Deleted => types::RemovalCause::Deleted,
        wt::RemovalCause::Expired => types::RemovalCause::Expired,
        wt::RemovalCause::Dropped => types::RemovalCause::Dropped,
    }
}

impl<P: Policy> Instance<P> {
    fn apply(&self, now: u64, events: Vec<wt::Event>) {
        let mut batch = self.scratch.borrow_mut();
        batch.clear();
        batch.extend(events.into_iter().map(|e| match e {
            wt::Event::Inserted(e) => types::Event::Inserted(entry(e)),
            wt::Event::Accessed(id) => types::Event::Accessed(id),
            wt::Event::Updated(e) => types::Event::Updated(entry(e)),
            wt::Event::Removed((id, c)) => types::Event::Removed(id, cause(c)),
            wt::Event::Missed(hash) => types::Event::Missed(hash),
        }));
        self.policy.borrow_mut().on_events(now, &batch);
    }
}

impl<P: Policy> wit::GuestEvictionPolicy for Instance<P> {
    fn create(capacity: wt::Capacity, seed: u64, config: Vec<(String, String)>) -> Result<wit::EvictionPolicy, String> {
        let capacity = types::Capacity { max_entries: capacity.max_entries, max_bytes: capacity.max_bytes };
        let policy = P::create(capacity, seed, &Config::new(config)).map_err(|e| e.0)?;
        Ok(wit::EvictionPolicy::new(Self { policy: RefCell::new(policy), scratch: RefCell::new(Vec::new()) }))
    }

    fn on_events(&self, now: u64, events: Vec<wt::Event>) {
        self.apply(now, events);
    }

    fn admit(&self, now: u64, candidate: wt::Entry) -> bool {
        self.policy.borrow_mut().admit(now, &entry(candidate))
    }

    fn pick_victims(&self, now: u64, events: Vec<wt::Event>, need: wt::Need) -> Vec<u64> {
        if !events.is_empty() {
            self.apply(now, events);
        }
        let mut out = Vec::new();
        let need = types::Need { entries: need.entries, bytes: need.bytes };
        self.policy.borrow_mut().pick_victims(now, need, &mut out);
        out
    }

    fn expired(&self, now: u64) -> Vec<u64> {
        let mut out = Vec::new();
        self.policy.borrow_mut().expired(now, &mut out);
        out
    }

    fn next_deadline(&self) -> Option<u64> {
        self.policy.borrow().next_deadline()
    }

    fn export_order(&self) -> Vec<u64> {
        let mut out = Vec::new();
        self.policy.borrow().export_order(&mut out);
        out
    }
}

/// Bindings of the loader world (`cachet:hooks`), behind `export_loader!`.
#[allow(missing_docs, unreachable_pub, unused_qualifications, clippy::all)]
pub mod hooks {
    wit_bindgen::generate!({
        world: "read-through",
        path: "../wit/hooks",
        pub_export_macro: true,
        export_macro_name: "__export_read_through_world",
        default_bindings_module: "cachet_policy_sdk::__wasm::hooks",
    });
}
