//! What one sandboxed instance is held to: its [`Limits`], the store that
//! enforces the memory cap, and the naming of the fault behind a failed
//! call. A leaf: modules (`module.rs`) and instances (`instance.rs`) both
//! build on it, and it on neither.

use crate::core::{FaultKind, PolicyFault};
use cachet_policy_sdk::Capacity;
use wasmtime::{Engine, ResourceLimiter, Store, Trap};

/// Per-instance sandbox limits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Fuel (roughly, Wasm instructions) one call may use; a call that runs
    /// out is a `budget` fault. About 1 ms of work on this machine at the
    /// default.
    pub fuel_per_call: u64,
    /// Extra fuel per event or entry for calls that carry many (batches,
    /// hand-off replays).
    pub fuel_per_item: u64,
    /// Extra fuel per entry of capacity ([`Capacity::presize`]) for calls
    /// that may walk the policy's whole state once (events, victim choice,
    /// policy deadlines, exports). CLOCK's hand, SIEVE's hand and S3-FIFO's
    /// queues can legitimately pass over everything in one eviction, and
    /// W-TinyLFU halves a sketch sized by the cache, so a shard's worst call
    /// grows with its size.
    pub fuel_per_resident: u64,
    /// Base cap on the instance's linear memory; growing past the cap is a
    /// `memory` fault.
    pub max_memory_bytes: usize,
    /// Added to the cap per entry the shard may hold (up to the
    /// [`Capacity::presize`] bound), since a policy's state grows with it.
    pub memory_per_entry: usize,
}

impl Limits {
    /// The memory cap of an instance serving a shard of `capacity`.
    pub fn memory_cap(&self, capacity: Capacity) -> usize {
        self.max_memory_bytes.saturating_add(self.memory_per_entry.saturating_mul(capacity.presize()))
    }
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            fuel_per_call: 2_000_000,
            fuel_per_item: 5_000,
            fuel_per_resident: 300,
            max_memory_bytes: 16 << 20,
            memory_per_entry: 512,
        }
    }
}

/// What each policy store carries: its memory cap, and whether the cap was
/// hit (so a trap that follows can be named a memory fault). Loader stores
/// ([`crate::loader`]) hold one too, so both sandboxes cap memory alike.
pub(crate) struct StoreState {
    max_memory_bytes: usize,
    /// Bytes of all linear memories in the store together: the cap is on
    /// their sum, so a component that instantiates several modules, each
    /// with a memory, gets no more than one with a single memory.
    memory_bytes: usize,
    memory_denied: bool,
}

impl StoreState {
    pub(crate) fn new(max_memory_bytes: usize) -> Self {
        Self { max_memory_bytes, memory_bytes: 0, memory_denied: false }
    }

    /// Whether a memory grow was refused: a trap that follows is the cap's.
    pub(crate) fn memory_denied(&self) -> bool {
        self.memory_denied
    }
}

impl ResourceLimiter for StoreState {
    fn memory_growing(&mut self, current: usize, desired: usize, _max: Option<usize>) -> wasmtime::Result<bool> {
        let total = self.memory_bytes.saturating_sub(current).saturating_add(desired);
        let ok = total <= self.max_memory_bytes;
        if ok {
            self.memory_bytes = total;
        }
        self.memory_denied |= !ok;
        Ok(ok)
    }

    fn table_growing(&mut self, _current: usize, desired: usize, _max: Option<usize>) -> wasmtime::Result<bool> {
        Ok(desired <= 100_000)
    }
}

/// A policy store on `engine` whose memories may grow to
/// `max_memory_bytes` together.
pub(crate) fn store(engine: &Engine, max_memory_bytes: usize) -> Store<StoreState> {
    let mut store = Store::new(engine, StoreState::new(max_memory_bytes));
    store.limiter(|state| state);
    store
}

/// Names the fault behind a failed call.
pub(crate) fn classify(store: &Store<StoreState>, err: wasmtime::Error) -> PolicyFault {
    let kind = if store.data().memory_denied {
        FaultKind::Memory
    } else if matches!(err.downcast_ref::<Trap>(), Some(Trap::OutOfFuel)) {
        FaultKind::Budget
    } else {
        FaultKind::Trap
    };
    PolicyFault { kind, detail: format!("{err:#}") }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Two memories in one store share the cap instead of getting one each.
    #[test]
    fn the_memory_cap_is_on_the_sum_of_memories() {
        const PAGE: usize = 64 << 10;
        let mut state = StoreState::new(4 * PAGE);
        assert!(state.memory_growing(0, 2 * PAGE, None).expect("first memory"));
        assert!(state.memory_growing(0, 2 * PAGE, None).expect("second memory"));
        assert!(!state.memory_growing(2 * PAGE, 3 * PAGE, None).expect("over the sum"));
        assert!(state.memory_denied);
        assert_eq!(state.memory_bytes, 4 * PAGE);
    }
}
