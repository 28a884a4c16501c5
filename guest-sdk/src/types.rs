//! What the host tells a policy. These mirror `cachet:policy/types` in
//! `wit/policy/policy.wit`; the WIT documents each item in full.

/// A host-assigned entry id: low 32 bits a dense slot number (reused once
/// the entry leaves), high 32 bits a generation telling reuses apart.
pub type EntryId = u64;

/// What a policy knows of one resident entry (never the key bytes).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Entry {
    /// Host-assigned id.
    pub id: EntryId,
    /// Stable 64-bit hash of the key, for ghosts and sketches.
    pub key_hash: u64,
    /// Bytes charged against the byte budget (key plus value).
    pub size: u64,
    /// Absolute expiry time in milliseconds, if any.
    pub expires_at: Option<u64>,
    /// Application hint (cost or priority), 0 when unset.
    pub hint: u32,
}

/// Why an entry left for a reason the policy did not choose.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum RemovalCause {
    /// A client deleted the key.
    Deleted,
    /// Its TTL passed.
    Expired,
    /// The host dropped it for its own reasons.
    Dropped,
}

/// One thing that happened in the shard; delivered in order, in batches.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Event {
    /// A new entry became resident.
    Inserted(Entry),
    /// A resident entry was read.
    Accessed(EntryId),
    /// A resident entry changed in place (counts as an access).
    Updated(Entry),
    /// A resident entry left for a reason other than this policy's choice.
    Removed(EntryId, RemovalCause),
    /// A lookup missed; carries the key hash.
    Missed(u64),
}

/// How much one `pick_victims` call must free.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Need {
    /// Entries to free.
    pub entries: u32,
    /// Bytes to free.
    pub bytes: u64,
}

impl Need {
    /// True once `entries` entries totalling `bytes` bytes cover the need.
    pub fn is_met(&self, entries: u32, bytes: u64) -> bool {
        entries >= self.entries && bytes >= self.bytes
    }
}

/// The bounds of the shard a policy serves.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Capacity {
    /// Maximum resident entries.
    pub max_entries: u64,
    /// Maximum resident bytes.
    pub max_bytes: u64,
}

impl Capacity {
    /// How many entries a policy should reserve room for when it is created.
    ///
    /// Every call runs on a budget of about a millisecond, and growing a
    /// hash table of tens of thousands of entries inside one call can take
    /// longer, so policies size their tables up front. Capped so a shard
    /// bounded only by bytes does not reserve absurd amounts.
    pub fn presize(&self) -> usize {
        self.max_entries.min(1 << 20) as usize
    }

    /// Whether queue sizes are measured in bytes (the shard has a byte
    /// budget) or in entries (it is bounded only by count, as the reference
    /// simulations are).
    pub fn by_bytes(&self) -> bool {
        self.max_bytes != u64::MAX
    }

    /// The budget in the unit of [`Capacity::weight`].
    pub fn limit(&self) -> u64 {
        if self.by_bytes() { self.max_bytes } else { self.max_entries }
    }

    /// What an entry of `size` bytes counts against [`Capacity::limit`].
    pub fn weight(&self, size: u64) -> u64 {
        if self.by_bytes() { size } else { 1 }
    }
}

/// Describes a policy module. Build it with [`PolicyInfo::new`] and the
/// `with_*` methods for the events and hooks the policy needs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PolicyInfo {
    /// Short name, e.g. `lru`.
    pub name: String,
    /// The module's own version.
    pub version: String,
    /// Send `Accessed` events (policies that ignore reads say no).
    pub wants_access_events: bool,
    /// Send `Missed` events.
    pub wants_miss_events: bool,
    /// Call `admit` before each insert.
    pub uses_admission: bool,
}

impl PolicyInfo {
    /// A policy called `name` at `version` that wants no optional events
    /// and no admission calls.
    pub fn new(name: &str, version: &str) -> Self {
        Self {
            name: name.into(),
            version: version.into(),
            wants_access_events: false,
            wants_miss_events: false,
            uses_admission: false,
        }
    }

    /// Also send `Accessed` events (reads).
    pub fn with_access_events(mut self) -> Self {
        self.wants_access_events = true;
        self
    }

    /// Also send `Missed` events (for ghost lists and sketches).
    pub fn with_miss_events(mut self) -> Self {
        self.wants_miss_events = true;
        self
    }

    /// Ask `admit` before each insert.
    pub fn with_admission(mut self) -> Self {
        self.uses_admission = true;
        self
    }
}
