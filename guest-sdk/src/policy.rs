use crate::types::{Capacity, Entry, EntryId, Event, Need, PolicyInfo, RemovalCause};

/// An eviction policy. Implement the factory ([`Policy::create`]), victim
/// choice and the bookkeeping of inserts and removals; everything else has a
/// default that suits a policy which ignores it.
///
/// Contract (the host relies on it, the conformance suite checks it):
/// - every id returned by [`Policy::pick_victims`] or [`Policy::expired`] is
///   resident and is forgotten by the policy as it is returned;
/// - [`Policy::export_order`] lists every resident entry exactly once;
/// - the same inputs give the same outputs (no clocks, no ambient randomness).
pub trait Policy: Sized + 'static {
    /// Describes the policy; called once per module, before any instance.
    fn info() -> PolicyInfo;

    /// Creates an instance for a shard of `capacity`. `seed` is the only
    /// randomness a policy may use; `config` carries operator settings.
    fn create(capacity: Capacity, seed: u64, config: &Config) -> Result<Self, ConfigError>;

    /// A new entry became resident.
    fn on_inserted(&mut self, now: u64, entry: &Entry);

    /// A resident entry was read. Only called if `wants_access_events`.
    fn on_accessed(&mut self, now: u64, id: EntryId) {
        let _ = (now, id);
    }

    /// A resident entry changed in place. By default an access.
    fn on_updated(&mut self, now: u64, entry: &Entry) {
        self.on_accessed(now, entry.id);
    }

    /// A resident entry left for a reason other than this policy's choice.
    fn on_removed(&mut self, now: u64, id: EntryId, cause: RemovalCause);

    /// A lookup missed. Only called if `wants_miss_events`.
    fn on_missed(&mut self, now: u64, key_hash: u64) {
        let _ = (now, key_hash);
    }

    /// Applies a batch of events in order. The default dispatches each event
    /// to the `on_*` methods; override only to batch work across events.
    fn on_events(&mut self, now: u64, events: &[Event]) {
        for event in events {
            match event {
                Event::Inserted(entry) => self.on_inserted(now, entry),
                Event::Accessed(id) => self.on_accessed(now, *id),
                Event::Updated(entry) => self.on_updated(now, entry),
                Event::Removed(id, cause) => self.on_removed(now, *id, *cause),
                Event::Missed(hash) => self.on_missed(now, *hash),
            }
        }
    }

    /// Whether to cache a new entry. Only called if `uses_admission`.
    fn admit(&mut self, now: u64, candidate: &Entry) -> bool {
        let _ = (now, candidate);
        true
    }

    /// Pushes victims onto `out`, in eviction order, until `need` is met or
    /// nothing is left; see [`collect_victims`].
    fn pick_victims(&mut self, now: u64, need: Need, out: &mut Vec<EntryId>);

    /// Pushes entries whose policy-owned deadline has passed.
    fn expired(&mut self, now: u64, out: &mut Vec<EntryId>) {
        let _ = (now, out);
    }

    /// The next time [`Policy::expired`] has work.
    fn next_deadline(&self) -> Option<u64> {
        None
    }

    /// Pushes every resident entry, first-to-evict first.
    fn export_order(&self, out: &mut Vec<EntryId>);
}

/// Pops victims from `next` (which yields `(id, size)` and forgets the entry)
/// until `need` is met or `next` runs dry. The loop every policy shares.
pub fn collect_victims(need: Need, out: &mut Vec<EntryId>, mut next: impl FnMut() -> Option<(EntryId, u64)>) {
    let (mut entries, mut bytes) = (0u32, 0u64);
    while !need.is_met(entries, bytes) {
        let Some((id, size)) = next() else { break };
        out.push(id);
        entries = entries.saturating_add(1);
        bytes = bytes.saturating_add(size);
    }
}

/// Operator-supplied `key=value` settings for a policy instance.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Config {
    pairs: Vec<(String, String)>,
}

/// A configuration a policy cannot accept.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConfigError(pub String);

impl std::fmt::Display for ConfigError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for ConfigError {}

impl Config {
    /// Wraps the pairs as the host passed them.
    pub fn new(pairs: Vec<(String, String)>) -> Self {
        Self { pairs }
    }

    /// The pairs in the order given.
    pub fn pairs(&self) -> &[(String, String)] {
        &self.pairs
    }

    /// The last value given for `key`.
    pub fn get(&self, key: &str) -> Option<&str> {
        self.pairs.iter().rev().find(|(k, _)| k == key).map(|(_, v)| v.as_str())
    }

    /// Parses `key` as `T`, or returns `default` when absent; names the key
    /// and the value when it does not parse.
    pub fn parse_or<T: std::str::FromStr>(&self, key: &str, default: T) -> Result<T, ConfigError> {
        match self.get(key) {
            None => Ok(default),
            Some(raw) => raw.parse().map_err(|_| ConfigError(format!("config `{key}`: cannot parse `{raw}`"))),
        }
    }

    /// Rejects any key not in `known`, naming it and the accepted keys.
    pub fn reject_unknown(&self, known: &[&str]) -> Result<(), ConfigError> {
        match self.pairs.iter().find(|(k, _)| !known.contains(&k.as_str())) {
            None => Ok(()),
            Some((k, _)) if known.is_empty() => {
                Err(ConfigError(format!("unknown config key `{k}`: this policy takes none")))
            }
            Some((k, _)) => Err(ConfigError(format!("unknown config key `{k}`; known keys: {}", known.join(", ")))),
        }
    }
}
