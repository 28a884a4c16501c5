//! CLOCK: FIFO with second chances. A hit raises an entry's counter (up to
//! `2^bits - 1`); at eviction an entry with a non-zero counter loses one and
//! goes back to the new end instead. With `bits=1` (the default) this is
//! libCacheSim's `clock` with a 1-bit counter, so miss ratios compare
//! exactly with the reference tables.

use cachet_policy_sdk::collections::IdList;
use cachet_policy_sdk::{
    Capacity, Config, ConfigError, Entry, EntryId, Need, Policy, PolicyInfo, RemovalCause, collect_victims,
    export_policy,
};

/// One FIFO queue; each entry carries its size and counter.
pub struct Clock {
    queue: IdList<(u64, u8)>,
    max_count: u8,
}

impl Policy for Clock {
    fn info() -> PolicyInfo {
        PolicyInfo::new("clock", env!("CARGO_PKG_VERSION")).with_access_events()
    }

    fn create(capacity: Capacity, _: u64, config: &Config) -> Result<Self, ConfigError> {
        config.reject_unknown(&["bits"])?;
        let bits: u32 = config.parse_or("bits", 1)?;
        if !(1..=7).contains(&bits) {
            return Err(ConfigError(format!("config `bits`: expected 1 to 7, got {bits}")));
        }
        Ok(Self { queue: IdList::with_capacity(capacity.presize()), max_count: (1u8 << bits) - 1 })
    }

    fn on_inserted(&mut self, _: u64, entry: &Entry) {
        self.queue.push_back(entry.id, (entry.size, 0));
    }

    fn on_accessed(&mut self, _: u64, id: EntryId) {
        if let Some((_, count)) = self.queue.get_mut(id) {
            *count = (*count + 1).min(self.max_count);
        }
    }

    fn on_updated(&mut self, now: u64, entry: &Entry) {
        if let Some((size, _)) = self.queue.get_mut(entry.id) {
            *size = entry.size;
        }
        self.on_accessed(now, entry.id);
    }

    fn on_removed(&mut self, _: u64, id: EntryId, _: RemovalCause) {
        self.queue.remove(id);
    }

    fn pick_victims(&mut self, _: u64, need: Need, out: &mut Vec<EntryId>) {
        collect_victims(need, out, || {
            loop {
                let (id, (size, count)) = self.queue.pop_front()?;
                if count == 0 {
                    return Some((id, size));
                }
                self.queue.push_back(id, (size, count - 1));
            }
        });
    }

    fn export_order(&self, out: &mut Vec<EntryId>) {
        out.extend(self.queue.iter().map(|(id, _)| id));
    }
}

export_policy!(Clock);

#[cfg(test)]
mod tests {
    use super::*;
    use cachet_policy_sdk::testing::{Harness, entries};

    #[test]
    fn a_hit_buys_one_more_round() {
        let mut h = Harness::<Clock>::new(entries(3)).expect("create");
        for key in [1, 2, 3] {
            h.request(key, 1);
        }
        h.request(1, 1);
        h.request(4, 1);
        assert!(h.contains_key(1) && !h.contains_key(2), "1 had its bit set, 2 did not");
        assert_eq!(h.export_order(), vec![3, 1, 4]);
        h.request(5, 1);
        assert!(!h.contains_key(3));
    }
}
