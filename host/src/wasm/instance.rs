use super::bindings::cachet::policy::types as wt;
use super::bindings::{Eviction, EvictionPre};
use super::sandbox::{self, Limits, StoreState, classify};
use crate::core::{EvictionPolicy, FaultKind, PolicyError, PolicyFault};
use cachet_policy_sdk::{Capacity, Entry, EntryId, Event, Need, RemovalCause};
use wasmtime::component::ResourceAny;
use wasmtime::{Engine, Store};

/// One policy instance in its own store. After any fault the instance is
/// unusable (a trapped component cannot be re-entered); the shard drops it.
pub(crate) struct WasmPolicy {
    store: Store<StoreState>,
    bindings: Eviction,
    handle: ResourceAny,
    limits: Limits,
    /// Reused conversion buffer for event batches.
    batch: Vec<wt::Event>,
    /// Fuel for one pass over a full shard: calls that may walk the
    /// policy's state (sized for the whole capacity) get it on top.
    scan_fuel: u64,
}

impl WasmPolicy {
    pub(crate) fn new(
        engine: &Engine,
        pre: &EvictionPre<StoreState>,
        limits: Limits,
        capacity: Capacity,
        seed: u64,
        config: &[(String, String)],
    ) -> Result<Self, PolicyError> {
        let scan_fuel = limits.fuel_per_resident.saturating_mul(capacity.presize() as u64);
        let mut store = sandbox::store(engine, limits.memory_cap(capacity));
        // Creating may size tables for the whole capacity up front (so later
        // calls never grow them), which is work proportional to it.
        let fuel = limits.fuel_per_call.saturating_add(limits.fuel_per_item.saturating_mul(capacity.presize() as u64));
        store.set_fuel(fuel).map_err(|e| PolicyError::Create(e.to_string()))?;
        let bindings = pre.instantiate(&mut store).map_err(|e| PolicyError::Fault(classify(&store, e)))?;
        let capacity = wt::Capacity { max_entries: capacity.max_entries, max_bytes: capacity.max_bytes };
        let handle = bindings
            .cachet_policy_policy()
            .eviction_policy()
            .call_create(&mut store, capacity, seed, config)
            .map_err(|e| PolicyError::Fault(classify(&store, e)))?
            .map_err(PolicyError::Create)?;
        Ok(Self { store, bindings, handle, limits, batch: Vec::new(), scan_fuel })
    }

    /// Refuels for a call carrying `items` events or entries.
    fn refuel(&mut self, items: usize) -> Result<(), PolicyFault> {
        let fuel = self.limits.fuel_per_call + self.limits.fuel_per_item.saturating_mul(items as u64);
        self.store.set_fuel(fuel).map_err(|e| PolicyFault { kind: FaultKind::Trap, detail: e.to_string() })
    }

    /// Refuels for a call that may walk the policy's state once (victim
    /// choice in CLOCK-like policies, S3-FIFO's first eviction after a
    /// warm-up, a sketch's periodic halving, exports), on top of its `items`.
    fn refuel_scan(&mut self, items: usize) -> Result<(), PolicyFault> {
        let fuel = self.limits.fuel_per_call
            + self.limits.fuel_per_item.saturating_mul(items as u64).saturating_add(self.scan_fuel);
        self.store.set_fuel(fuel).map_err(|e| PolicyFault { kind: FaultKind::Trap, detail: e.to_string() })
    }

    fn fault(&self, err: wasmtime::Error) -> PolicyFault {
        classify(&self.store, err)
    }
}

fn wit_entry(e: &Entry) -> wt::Entry {
    wt::Entry { id: e.id, key_hash: e.key_hash, size: e.size, expires_at: e.expires_at, hint: e.hint }
}

fn wit_event(event: &Event) -> wt::Event {
    match event {
        Event::Inserted(e) => wt::Event::Inserted(wit_entry(e)),
        Event::Accessed(id) => wt::Event::Accessed(*id),
        Event::Updated(e) => wt::Event::Updated(wit_entry(e)),
        Event::Removed(id, cause) => wt::Event::Removed((
            *id,
            match cause {
                RemovalCause::Deleted => wt::RemovalCause::Deleted,
                RemovalCause::Expired => wt::RemovalCause::Expired,
                RemovalCause::Dropped => wt::RemovalCause::Dropped,
            },
        )),
        Event::Missed(hash) => wt::Event::Missed(*hash),
    }
}

impl EvictionPolicy for WasmPolicy {
    fn on_events(&mut self, now: u64, events: &[Event]) -> Result<(), PolicyFault> {
        // Events may trigger periodic whole-structure work too (W-TinyLFU
        // halves its sketch every so many hits).
        self.refuel_scan(events.len())?;
        self.batch.clear();
        self.batch.extend(events.iter().map(wit_event));
        let guest = self.bindings.cachet_policy_policy().eviction_policy();
        guest.call_on_events(&mut self.store, self.handle, now, &self.batch).map_err(|e| self.fault(e))
    }

    fn admit(&mut self, now: u64, candidate: &Entry) -> Result<bool, PolicyFault> {
        // Admission may decide evictions (W-TinyLFU's contest walks its
        // window while candidates win), so it gets the eviction budget.
        self.refuel_scan(0)?;
        let guest = self.bindings.cachet_policy_policy().eviction_policy();
        guest.call_admit(&mut self.store, self.handle, now, wit_entry(candidate)).map_err(|e| self.fault(e))
    }

    fn pick_victims(
        &mut self,
        now: u64,
        events: &[Event],
        need: Need,
        out: &mut Vec<EntryId>,
    ) -> Result<(), PolicyFault> {
        self.refuel_scan(events.len() + need.entries as usize)?;
        self.batch.clear();
        self.batch.extend(events.iter().map(wit_event));
        let need = wt::Need { entries: need.entries, bytes: need.bytes };
        let guest = self.bindings.cachet_policy_policy().eviction_policy();
        let ids =
            guest.call_pick_victims(&mut self.store, self.handle, now, &self.batch, need).map_err(|e| self.fault(e))?;
        out.extend(ids);
        Ok(())
    }

    fn expired(&mut self, now: u64, out: &mut Vec<EntryId>) -> Result<(), PolicyFault> {
        self.refuel_scan(0)?;
        let guest = self.bindings.cachet_policy_policy().eviction_policy();
        let ids = guest.call_expired(&mut self.store, self.handle, now).map_err(|e| self.fault(e))?;
        out.extend(ids);
        Ok(())
    }

    fn next_deadline(&mut self) -> Result<Option<u64>, PolicyFault> {
        self.refuel(0)?;
        let guest = self.bindings.cachet_policy_policy().eviction_policy();
        guest.call_next_deadline(&mut self.store, self.handle).map_err(|e| self.fault(e))
    }

    fn export_order(&mut self, out: &mut Vec<EntryId>) -> Result<(), PolicyFault> {
        self.refuel_scan(0)?;
        let guest = self.bindings.cachet_policy_policy().eviction_policy();
        let ids = guest.call_export_order(&mut self.store, self.handle).map_err(|e| self.fault(e))?;
        out.extend(ids);
        Ok(())
    }
}
