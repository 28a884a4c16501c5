//! A native harness that plays the host's part, so a policy's unit tests run
//! without Wasm. It keeps its own view of what is resident and panics (these
//! are tests) when the policy breaks the contract: a victim that is not
//! resident, or an export order that does not list every entry once.

use crate::collections::{IdMap, id_map};
use crate::policy::{Config, ConfigError, Policy};
use crate::types::{Capacity, Entry, EntryId, Event, Need, RemovalCause};
use std::collections::HashMap;

/// Drives one policy instance like a count- and byte-bounded cache would.
pub struct Harness<P: Policy> {
    policy: P,
    capacity: Capacity,
    now: u64,
    /// Next never-used slot; freed slots are reused first, with a new
    /// generation, as the host does.
    next_slot: u64,
    free: Vec<u64>,
    generation: u64,
    resident: IdMap<Entry>,
    by_key: HashMap<u64, EntryId>,
    bytes: u64,
}

impl<P: Policy> Harness<P> {
    /// A harness around a policy created with seed 0 and no configuration.
    pub fn new(capacity: Capacity) -> Result<Self, ConfigError> {
        Self::with_config(capacity, 0, &Config::default())
    }

    /// A harness around a policy created with `seed` and `config`.
    pub fn with_config(capacity: Capacity, seed: u64, config: &Config) -> Result<Self, ConfigError> {
        Ok(Self {
            policy: P::create(capacity, seed, config)?,
            capacity,
            now: 0,
            next_slot: 0,
            free: Vec::new(),
            generation: 0,
            resident: id_map(),
            by_key: HashMap::new(),
            bytes: 0,
        })
    }

    /// The policy under test.
    pub fn policy(&self) -> &P {
        &self.policy
    }

    /// Moves the clock forward by `ms`.
    pub fn advance(&mut self, ms: u64) {
        self.now += ms;
    }

    /// Number of resident entries.
    pub fn len(&self) -> usize {
        self.resident.len()
    }

    /// True when nothing is resident.
    pub fn is_empty(&self) -> bool {
        self.resident.is_empty()
    }

    /// Whether `key` is resident.
    pub fn contains_key(&self, key: u64) -> bool {
        self.by_key.contains_key(&key)
    }

    /// The id of resident `key`.
    pub fn id_of(&self, key: u64) -> Option<EntryId> {
        self.by_key.get(&key).copied()
    }

    /// One cache request: a hit reports an access; a miss reports the miss
    /// and inserts `key` (evicting to fit, asking `admit` if the policy uses
    /// admission). Returns whether it hit.
    pub fn request(&mut self, key: u64, size: u64) -> bool {
        self.request_with(key, size, None, 0)
    }

    /// [`Harness::request`] with an expiry and a hint for inserts.
    pub fn request_with(&mut self, key: u64, size: u64, expires_at: Option<u64>, hint: u32) -> bool {
        let info = P::info();
        if let Some(&id) = self.by_key.get(&key) {
            if info.wants_access_events {
                self.policy.on_events(self.now, &[Event::Accessed(id)]);
            }
            return true;
        }
        if info.wants_miss_events {
            self.policy.on_events(self.now, &[Event::Missed(key)]);
        }
        let entry = Entry { id: self.fresh_id(), key_hash: key, size, expires_at, hint };
        if info.uses_admission && !self.policy.admit(self.now, &entry) {
            return false;
        }
        let need = Need {
            entries: u32::try_from((self.resident.len() as u64 + 1).saturating_sub(self.capacity.max_entries))
                .unwrap_or(u32::MAX),
            bytes: (self.bytes + size).saturating_sub(self.capacity.max_bytes),
        };
        if need != Need::default() {
            let victims = self.victims(need);
            let freed: u64 = victims.iter().map(|e| e.size).sum();
            assert!(
                need.is_met(victims.len() as u32, freed) || self.resident.is_empty(),
                "policy freed {} entries / {freed} bytes for {need:?} with entries left",
                victims.len()
            );
        }
        self.insert_entry(entry);
        false
    }

    /// Inserts a new entry with a fresh id (no eviction) and returns the id.
    pub fn insert(&mut self, key: u64, size: u64) -> EntryId {
        let entry = Entry { id: self.fresh_id(), key_hash: key, size, expires_at: None, hint: 0 };
        self.insert_entry(entry);
        entry.id
    }

    /// A dense id: a free slot (or a new one) with a fresh generation.
    fn fresh_id(&mut self) -> EntryId {
        self.generation += 1;
        let slot = self.free.pop().unwrap_or_else(|| {
            self.next_slot += 1;
            self.next_slot - 1
        });
        (self.generation << 32) | slot
    }

    fn insert_entry(&mut self, entry: Entry) {
        self.resident.insert(entry.id, entry);
        self.by_key.insert(entry.key_hash, entry.id);
        self.bytes += entry.size;
        self.policy.on_events(self.now, &[Event::Inserted(entry)]);
    }

    /// Removes resident `key` for `cause` and tells the policy.
    pub fn remove(&mut self, key: u64, cause: RemovalCause) -> bool {
        let Some(id) = self.by_key.get(&key).copied() else {
            return false;
        };
        self.forget(id);
        self.policy.on_events(self.now, &[Event::Removed(id, cause)]);
        true
    }

    /// Asks for victims, checks each is resident, forgets them and returns
    /// their entries in the order given.
    pub fn victims(&mut self, need: Need) -> Vec<Entry> {
        let mut ids = Vec::new();
        self.policy.pick_victims(self.now, need, &mut ids);
        ids.into_iter()
            .map(|id| match self.forget(id) {
                Some(entry) => entry,
                None => panic!("policy returned id {id}, which is not resident"),
            })
            .collect()
    }

    /// The policy's export order as keys, checked to list every resident
    /// entry exactly once.
    pub fn export_order(&self) -> Vec<u64> {
        let mut ids = Vec::new();
        self.policy.export_order(&mut ids);
        let mut seen = std::collections::HashSet::new();
        let keys: Vec<u64> = ids
            .iter()
            .map(|id| {
                assert!(seen.insert(*id), "id {id} exported twice");
                match self.resident.get(id) {
                    Some(e) => e.key_hash,
                    None => panic!("exported id {id} is not resident"),
                }
            })
            .collect();
        assert_eq!(keys.len(), self.resident.len(), "export order misses entries");
        keys
    }

    fn forget(&mut self, id: EntryId) -> Option<Entry> {
        let entry = self.resident.remove(&id)?;
        self.by_key.remove(&entry.key_hash);
        self.free.push(crate::collections::slot_of(id) as u64);
        self.bytes -= entry.size;
        Some(entry)
    }
}

/// Capacity bounded by entries only.
pub fn entries(max_entries: u64) -> Capacity {
    Capacity { max_entries, max_bytes: u64::MAX }
}
