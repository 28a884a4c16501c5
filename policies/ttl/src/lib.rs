//! Evict the entry closest to expiry first; entries without a TTL go after
//! all that have one, oldest insertion first.

use cachet_policy_sdk::collections::{IdMap, id_map_for};
use cachet_policy_sdk::{
    Capacity, Config, ConfigError, Entry, EntryId, Need, Policy, PolicyInfo, RemovalCause, collect_victims,
    export_policy,
};
use std::collections::BTreeMap;

/// Ordered by `(expiry or u64::MAX, insertion sequence)`.
pub struct Ttl {
    order: BTreeMap<(u64, u64), (EntryId, u64)>,
    keys: IdMap<(u64, u64)>,
    next_seq: u64,
}

impl Ttl {
    fn place(&mut self, entry: &Entry, seq: u64) {
        let key = (entry.expires_at.unwrap_or(u64::MAX), seq);
        self.order.insert(key, (entry.id, entry.size));
        self.keys.insert(entry.id, key);
    }
}

impl Policy for Ttl {
    fn info() -> PolicyInfo {
        PolicyInfo::new("ttl", env!("CARGO_PKG_VERSION"))
    }

    fn create(capacity: Capacity, _: u64, config: &Config) -> Result<Self, ConfigError> {
        config.reject_unknown(&[])?;
        Ok(Self { order: BTreeMap::new(), keys: id_map_for(capacity.presize()), next_seq: 0 })
    }

    fn on_inserted(&mut self, _: u64, entry: &Entry) {
        let seq = self.next_seq;
        self.next_seq += 1;
        self.place(entry, seq);
    }

    /// A new TTL re-sorts the entry; it keeps its insertion sequence.
    fn on_updated(&mut self, _: u64, entry: &Entry) {
        if let Some(old) = self.keys.remove(&entry.id) {
            self.order.remove(&old);
            self.place(entry, old.1);
        }
    }

    fn on_removed(&mut self, _: u64, id: EntryId, _: RemovalCause) {
        if let Some(key) = self.keys.remove(&id) {
            self.order.remove(&key);
        }
    }

    fn pick_victims(&mut self, _: u64, need: Need, out: &mut Vec<EntryId>) {
        collect_victims(need, out, || {
            let (_, (id, size)) = self.order.pop_first()?;
            self.keys.remove(&id);
            Some((id, size))
        });
    }

    fn export_order(&self, out: &mut Vec<EntryId>) {
        out.extend(self.order.values().map(|&(id, _)| id));
    }
}

export_policy!(Ttl);

#[cfg(test)]
mod tests {
    use super::*;
    use cachet_policy_sdk::testing::{Harness, entries};

    #[test]
    fn evicts_soonest_expiry_then_untimed() {
        let mut h = Harness::<Ttl>::new(entries(3)).expect("create");
        h.request_with(1, 1, None, 0);
        h.request_with(2, 1, Some(500), 0);
        h.request_with(3, 1, Some(100), 0);
        h.request_with(4, 1, Some(900), 0);
        assert!(!h.contains_key(3), "3 expired soonest");
        h.request_with(5, 1, None, 0);
        assert!(!h.contains_key(2));
        h.request_with(6, 1, None, 0);
        assert!(!h.contains_key(4), "timed entries go before untimed ones");
        assert_eq!(h.export_order(), vec![1, 5, 6]);
    }
}
