//! Requests and replies of the `cachet/1` protocol.

use bytes::Bytes;
use serde::{Deserialize, Serialize};

/// Protocol version carried by every frame; a node answers other versions
/// with [`ErrorCode::UnsupportedVersion`].
pub const PROTOCOL_VERSION: u16 = 1;

/// ALPN identifier of the client protocol.
pub const ALPN: &[u8] = b"cachet/1";

/// When a `Set` applies.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum Condition {
    /// Always (plain SET).
    #[default]
    Always,
    /// Only if the key is absent (NX).
    IfAbsent,
    /// Only if the key is present (XX).
    IfPresent,
}

/// How many replicas of a key must take part in a request (cluster mode;
/// a single node ignores it). Carried per request in the frame's envelope.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum Consistency {
    /// One replica: fastest, and may read a value older than the latest
    /// acknowledged write.
    One,
    /// A majority of the replicas: a QUORUM read sees every write
    /// acknowledged at QUORUM before it began.
    #[default]
    Quorum,
    /// Every replica: fails while any of them is down.
    All,
}

impl std::str::FromStr for Consistency {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        match text.to_ascii_lowercase().as_str() {
            "one" => Ok(Self::One),
            "quorum" => Ok(Self::Quorum),
            "all" => Ok(Self::All),
            _ => Err(format!("unknown consistency `{text}` (one, quorum or all)")),
        }
    }
}

/// One client request.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Request {
    /// Read one key.
    Get {
        /// The key.
        key: Bytes,
    },
    /// Write one key.
    Set {
        /// The key.
        key: Bytes,
        /// The value.
        value: Bytes,
        /// Time to live in milliseconds.
        ttl_ms: Option<u64>,
        /// NX / XX.
        condition: Condition,
        /// Application hint for the policy (cost or priority).
        hint: u32,
    },
    /// Delete keys; replies with how many existed.
    Del {
        /// The keys.
        keys: Vec<Bytes>,
    },
    /// Count how many of the keys exist.
    Exists {
        /// The keys.
        keys: Vec<Bytes>,
    },
    /// Remaining time to live of a key.
    Ttl {
        /// The key.
        key: Bytes,
    },
    /// Set a key's time to live; replies whether the key existed. A TTL of
    /// 0 deletes the key, as in Redis.
    Expire {
        /// The key.
        key: Bytes,
        /// New time to live in milliseconds.
        ttl_ms: u64,
        /// When it applies (Redis's NX, XX, GT, LT); absent: always.
        #[serde(default, skip_serializing_if = "ExpireIf::always")]
        when: ExpireIf,
    },
    /// Read several keys.
    MGet {
        /// The keys.
        keys: Vec<Bytes>,
    },
    /// Write several keys (no TTL).
    MSet {
        /// Key/value pairs.
        pairs: Vec<(Bytes, Bytes)>,
    },
    /// Add `delta` to a decimal integer value (0 when absent).
    Incr {
        /// The key.
        key: Bytes,
        /// Amount to add (negative for DECR).
        delta: i64,
    },
    /// Liveness check.
    Ping,
    /// Node statistics.
    Stats,
    /// An operator command; refused unless `token` matches the node's
    /// admin token.
    Admin {
        /// The node's admin token.
        token: String,
        /// What to do.
        command: AdminCommand,
    },
    /// A SET with what only some callers need: keep the key's TTL
    /// (`KEEPTTL`), or answer with the value it replaced (`GET`). Replies
    /// `Value(old)` when `get`, else as [`Request::Set`]. (A variant of its
    /// own, not new fields on `Set`: frames from older clients decode
    /// unchanged.)
    SetWith {
        /// The key.
        key: Bytes,
        /// The value.
        value: Bytes,
        /// Time to live in milliseconds; ignored when `keep_ttl`.
        ttl_ms: Option<u64>,
        /// Keep the TTL the key has.
        keep_ttl: bool,
        /// NX / XX.
        condition: Condition,
        /// Reply with the value replaced (nil when there was none).
        get: bool,
        /// Application hint for the policy (cost or priority).
        hint: u32,
    },
    /// Append to a value, creating it when absent; replies the new length
    /// (`Integer`).
    Append {
        /// The key.
        key: Bytes,
        /// Bytes to append.
        value: Bytes,
    },
    /// A value's length, 0 when absent (`Integer`).
    Strlen {
        /// The key.
        key: Bytes,
    },
    /// Read and delete a key (`Value`).
    GetDel {
        /// The key.
        key: Bytes,
    },
    /// Read a key and change its TTL if it exists (`Value`).
    GetEx {
        /// The key.
        key: Bytes,
        /// What happens to its TTL.
        ttl: TtlChange,
    },
    /// Remove a key's TTL; replies whether it had one (`Applied`).
    Persist {
        /// The key.
        key: Bytes,
    },
    /// Entries on the node (on a cluster: on the member asked) (`Count`).
    DbSize,
    /// Drop every entry (`Count` of entries dropped).
    FlushAll,
    /// Edit one key's value in place, its TTL kept (SETRANGE, SETBIT:
    /// `Integer`; INCRBYFLOAT: `Value`).
    Edit {
        /// The key.
        key: Bytes,
        /// The edit.
        edit: crate::Edit,
    },
    /// Set every pair only if no key exists, all at once (MSETNX:
    /// `Applied`).
    MSetNx {
        /// The pairs.
        pairs: Vec<(Bytes, Bytes)>,
    },
    /// Move a value and its TTL to another key, at once (RENAME: `Ok`, or
    /// `NotFound`; with `only_if_absent`, RENAMENX: `Applied`).
    Rename {
        /// The key moved.
        from: Bytes,
        /// Its new name.
        to: Bytes,
        /// Only if `to` does not exist.
        only_if_absent: bool,
    },
    /// Copy a value and its TTL to another key (COPY: `Applied`).
    Copy {
        /// The source.
        from: Bytes,
        /// The destination.
        to: Bytes,
        /// Overwrite an existing destination.
        replace: bool,
    },
    /// Every key matching a glob pattern (KEYS: `Values`); walks the whole
    /// node.
    Keys {
        /// The pattern.
        pattern: Bytes,
    },
    /// One step of a key scan (SCAN: `Scan`).
    Scan {
        /// Where to go on from (0: the start).
        cursor: u64,
        /// Only keys matching this glob pattern.
        pattern: Option<Bytes>,
        /// About how many entries to look at.
        count: u32,
    },
    /// A key picked at random (RANDOMKEY: `Value`, none when empty).
    RandomKey,
}

/// When an EXPIRE applies, by the key's current TTL (Redis's options).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum ExpireIf {
    /// Always.
    #[default]
    Always,
    /// Only if the key has no TTL (NX).
    NoTtl,
    /// Only if the key has a TTL (XX).
    HasTtl,
    /// Only if the new TTL ends later than the current one (GT); a key
    /// without a TTL never expires, so never.
    Later,
    /// Only if the new TTL ends sooner than the current one (LT); a key
    /// without a TTL always.
    Sooner,
    /// Only if the key has a TTL that ends later than the new one (XX and
    /// LT).
    SoonerWithTtl,
}

impl ExpireIf {
    /// Whether this is [`ExpireIf::Always`].
    pub fn always(&self) -> bool {
        *self == Self::Always
    }

    /// Whether a TTL of `new_ms` from now applies to a key whose remaining
    /// TTL is `current` (`None`: it has none).
    pub fn allows(self, current: Option<u64>, new_ms: u64) -> bool {
        match self {
            Self::Always => true,
            Self::NoTtl => current.is_none(),
            Self::HasTtl => current.is_some(),
            Self::Later => current.is_some_and(|c| new_ms > c),
            Self::Sooner => current.is_none_or(|c| new_ms < c),
            Self::SoonerWithTtl => current.is_some_and(|c| new_ms < c),
        }
    }
}

/// What a read-and-touch ([`Request::GetEx`]) does to the key's TTL.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum TtlChange {
    /// Leave it.
    Keep,
    /// Remove it (the key never expires).
    Persist,
    /// Expire in this many milliseconds (at least 1).
    Set(u64),
}

/// A module sent with an admin command, by hash: its bytes, or the
/// upload that carried them ([`AdminCommand::UploadChunk`]) when they are
/// too large for one frame.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SentModule {
    /// SHA-256 of the bytes, hex (checked by the node).
    pub sha256: String,
    /// The bytes (empty when `upload` carries them).
    pub bytes: Bytes,
    /// The finished upload holding the bytes instead.
    pub upload: Option<u64>,
}

/// Policy operations on a live node (`cachet policy ...`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum AdminCommand {
    /// Store a policy component in the node's registry as `name@version`,
    /// after validating it and running a quick conformance check.
    Load {
        /// Module name.
        name: String,
        /// Module version (any string without `@`).
        version: String,
        /// Policy settings stored with the module.
        config: Vec<(String, String)>,
        /// The component's bytes.
        module: Bytes,
        /// Fuel per policy call (the node's default when absent).
        fuel_per_call: Option<u64>,
        /// Base memory cap per instance in bytes (the node's default when
        /// absent).
        max_memory_bytes: Option<u64>,
        /// Take the bytes from this finished upload instead of `module`
        /// (for components larger than one frame).
        upload: Option<u64>,
    },
    /// One piece of a component too large for one frame, sent in order;
    /// a `Load` naming `upload` then uses the assembled bytes.
    UploadChunk {
        /// Chosen by the client, unique per upload.
        upload: u64,
        /// Where `chunk` starts: the bytes received so far.
        offset: u64,
        /// The whole component's size.
        total: u64,
        /// The bytes.
        chunk: Bytes,
    },
    /// Hot-swap every shard to `name@version`; `config`, when given,
    /// replaces the module's stored settings for this activation.
    Activate {
        /// Module name.
        name: String,
        /// Module version.
        version: String,
        /// Settings overriding the stored ones.
        config: Option<Vec<(String, String)>>,
    },
    /// On a cluster: run `name@version` on `members` members for
    /// `window_ms`, then let the metadata log's leader roll it out to every
    /// member or back, by the canary members' hit ratio against the
    /// others'.
    Canary {
        /// Module name.
        name: String,
        /// Module version.
        version: String,
        /// Settings overriding the stored ones.
        config: Option<Vec<(String, String)>>,
        /// Members that run it first.
        members: u32,
        /// How long before the decision, in milliseconds.
        window_ms: u64,
    },
    /// Swap back to the previously active version.
    Rollback,
    /// The registry and what each shard runs.
    List,
    /// Evaluate `name@version` on a sampled ghost of the live traffic, or
    /// stop the evaluation when `name` is empty.
    Shadow {
        /// Module name.
        name: String,
        /// Module version.
        version: String,
    },
    /// On a cluster: member `node` leaves for good. The metadata log's
    /// leader moves its slots to the other members, then removes it from
    /// the log; `cachet stats` shows it leaving, then removed.
    Decommission {
        /// The member's node id.
        node: u32,
    },
    /// On a cluster: the cluster's read-through loader configuration
    /// becomes `config` (the TOML of `cachet serve --loaders`, each
    /// namespace's `module` named `sha256:HEX`), its modules sent along;
    /// every member builds its loaders from it and puts them in place of
    /// the old ones. `None` drops the cluster's loaders.
    SetLoaders {
        /// The configuration, or none.
        config: Option<String>,
        /// The modules it names.
        modules: Vec<SentModule>,
    },
    /// The node's statistics with its hot keys, answered with
    /// [`Response::Stats`]. Hot keys are key bytes (user ids, e-mail
    /// addresses), so plain [`Request::Stats`] leaves them out; a node that
    /// predates this command answers `UnknownCommand` (its plain stats
    /// still carry them).
    Stats,
}

impl AdminCommand {
    /// The command's name, for logs and metrics.
    pub fn name(&self) -> &'static str {
        match self {
            Self::Load { .. } => "policy_load",
            Self::UploadChunk { .. } => "policy_upload",
            Self::Activate { .. } => "policy_activate",
            Self::Canary { .. } => "policy_canary",
            Self::Rollback => "policy_rollback",
            Self::List => "policy_list",
            Self::Shadow { .. } => "policy_shadow",
            Self::Decommission { .. } => "cluster_decommission",
            Self::SetLoaders { .. } => "cluster_loaders",
            Self::Stats => "stats",
        }
    }
}

/// One module known to a node.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ModuleListing {
    /// Module name.
    pub name: String,
    /// Module version.
    pub version: String,
    /// Where it came from: `bundled` or `loaded`.
    pub source: String,
    /// The WIT interface it implements.
    pub interface: String,
    /// SHA-256 of the component, hex (empty for bundled ones).
    pub sha256: String,
    /// Stored settings.
    pub config: Vec<(String, String)>,
    /// `ready`, `quarantined` or `invalid: why`.
    pub state: String,
    /// Whether every shard is configured with it.
    pub active: bool,
    /// Faults counted against it since the node started.
    pub faults: u64,
}

/// What one shard runs.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ShardListing {
    /// Shard index.
    pub shard: u64,
    /// `name@version` of the configured module.
    pub module: String,
    /// Whether the shard is on the native fallback right now.
    pub on_fallback: bool,
    /// Resident entries.
    pub entries: u64,
    /// Faults of its policy so far.
    pub faults: u64,
}

/// A candidate evaluated on sampled live traffic.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ShadowListing {
    /// `name@version` of the candidate.
    pub candidate: String,
    /// Share of keys sampled (0..1).
    pub sample_rate: f64,
    /// Sampled reads so far.
    pub sampled_reads: u64,
    /// Predicted hit ratio of the candidate.
    pub candidate_hit_ratio: f64,
    /// Predicted hit ratio of the active policy on the same sample, to
    /// compare like with like.
    pub active_hit_ratio: f64,
    /// The active policy's hit ratio on all live reads since the
    /// evaluation started.
    pub live_hit_ratio: f64,
    /// Faults of the candidate in its ghost (a faulting candidate is
    /// measured on the native fallback, so its prediction means little).
    pub candidate_faults: u64,
}

/// A node's policy registry and shards.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct PolicyListing {
    /// What the command did, for humans.
    pub message: String,
    /// `name@version` every shard is configured with.
    pub active: String,
    /// The version `rollback` goes back to.
    pub previous: Option<String>,
    /// Every module, bundled and loaded.
    pub modules: Vec<ModuleListing>,
    /// Per shard.
    pub shards: Vec<ShardListing>,
    /// Hot-swaps since the node started.
    pub swaps: u64,
    /// Modules quarantined (and rolled back from) since the node started.
    pub quarantines: u64,
    /// The running shadow evaluation.
    pub shadow: Option<ShadowListing>,
}

impl Request {
    /// The command's name, for logs and metrics.
    pub fn name(&self) -> &'static str {
        match self {
            Self::Get { .. } => "get",
            Self::Set { .. } => "set",
            Self::Del { .. } => "del",
            Self::Exists { .. } => "exists",
            Self::Ttl { .. } => "ttl",
            Self::Expire { .. } => "expire",
            Self::MGet { .. } => "mget",
            Self::MSet { .. } => "mset",
            Self::Incr { .. } => "incr",
            Self::Ping => "ping",
            Self::Stats => "stats",
            Self::Admin { .. } => "admin",
            Self::SetWith { .. } => "set",
            Self::Append { .. } => "append",
            Self::Strlen { .. } => "strlen",
            Self::GetDel { .. } => "getdel",
            Self::GetEx { .. } => "getex",
            Self::Persist { .. } => "persist",
            Self::DbSize => "dbsize",
            Self::FlushAll => "flushall",
            Self::MSetNx { .. } => "msetnx",
            Self::Rename { only_if_absent: false, .. } => "rename",
            Self::Rename { only_if_absent: true, .. } => "renamenx",
            Self::Copy { .. } => "copy",
            Self::Keys { .. } => "keys",
            Self::Scan { .. } => "scan",
            Self::RandomKey => "randomkey",
            Self::Edit { edit, .. } => match edit {
                crate::Edit::SetRange { .. } => "setrange",
                crate::Edit::SetBit { .. } => "setbit",
                crate::Edit::IncrByFloat(_) => "incrbyfloat",
            },
        }
    }

    /// The keys the request reads or writes, in order.
    pub fn keys(&self) -> Vec<&Bytes> {
        match self {
            Self::Get { key }
            | Self::Set { key, .. }
            | Self::SetWith { key, .. }
            | Self::Ttl { key }
            | Self::Expire { key, .. }
            | Self::Incr { key, .. }
            | Self::Append { key, .. }
            | Self::Strlen { key }
            | Self::GetDel { key }
            | Self::GetEx { key, .. }
            | Self::Persist { key }
            | Self::Edit { key, .. } => vec![key],
            Self::Del { keys } | Self::Exists { keys } | Self::MGet { keys } => keys.iter().collect(),
            Self::MSet { pairs } | Self::MSetNx { pairs } => pairs.iter().map(|(k, _)| k).collect(),
            Self::Rename { from, to, .. } | Self::Copy { from, to, .. } => vec![from, to],
            Self::Keys { .. } | Self::Scan { .. } | Self::RandomKey => Vec::new(),
            Self::Ping | Self::Stats | Self::Admin { .. } | Self::DbSize | Self::FlushAll => Vec::new(),
        }
    }

    /// Whether the request reads or writes several keys that must change
    /// together (MSETNX, RENAME, COPY): run with all their shards held.
    pub fn spans_keys(&self) -> bool {
        matches!(self, Self::MSetNx { .. } | Self::Rename { .. } | Self::Copy { .. })
    }

    /// Whether the request walks the whole keyspace (KEYS, SCAN,
    /// RANDOMKEY).
    pub fn walks_keys(&self) -> bool {
        matches!(self, Self::Keys { .. } | Self::Scan { .. } | Self::RandomKey)
    }

    /// Whether the request changes state (never accepted in 0-RTT data).
    pub fn is_write(&self) -> bool {
        matches!(
            self,
            Self::Set { .. }
                | Self::Del { .. }
                | Self::Expire { .. }
                | Self::MSet { .. }
                | Self::Incr { .. }
                | Self::Admin { .. }
                | Self::SetWith { .. }
                | Self::Append { .. }
                | Self::GetDel { .. }
                | Self::GetEx { ttl: TtlChange::Persist | TtlChange::Set(_), .. }
                | Self::Persist { .. }
                | Self::FlushAll
                | Self::Edit { .. }
                | Self::MSetNx { .. }
                | Self::Rename { .. }
                | Self::Copy { .. }
        )
    }
}

/// Remaining lifetime of a key.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum TtlState {
    /// No such key.
    Missing,
    /// The key never expires.
    Persistent,
    /// Milliseconds left.
    Remaining(u64),
}

/// A node's counters, summed over its shards.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct NodeStats {
    /// Reads that hit.
    pub hits: u64,
    /// Reads that missed.
    pub misses: u64,
    /// hits / (hits + misses).
    pub hit_ratio: f64,
    /// Entries evicted by the policy.
    pub evictions: u64,
    /// Entries removed because their TTL passed.
    pub expired: u64,
    /// Entries removed at policy deadlines.
    pub policy_expired: u64,
    /// Entries deleted by clients.
    pub deletes: u64,
    /// Resident entries.
    pub entries: u64,
    /// Resident bytes.
    pub bytes: u64,
    /// Byte budget.
    pub max_bytes: u64,
    /// Configured policy name.
    pub policy: String,
    /// Its version.
    pub policy_version: String,
    /// Policy faults of every kind.
    pub policy_faults: u64,
    /// Shards currently on the native fallback.
    pub shards_on_fallback: u64,
    /// Shards on the node.
    pub shards: u64,
    /// Seconds since the node started.
    pub uptime_secs: u64,
    /// Open client connections.
    pub connections: u64,
    /// The hottest keys read lately, hottest first, with a measure of
    /// their heat (reads, aged, and sampled on busy shards): what `cachet
    /// warm --from-node` loads first. Only in replies to
    /// [`AdminCommand::Stats`]: key bytes can be personal data, so plain
    /// [`Request::Stats`] leaves this empty and sets `hot_keys_hidden`.
    #[serde(default)]
    pub hot_keys: Vec<HotKey>,
    /// Whether the node left `hot_keys` out because the caller is not an
    /// admin, so an empty list is not mistaken for a node that read
    /// nothing. Absent (`false`) from nodes that put hot keys in every
    /// reply.
    #[serde(default)]
    pub hot_keys_hidden: bool,
    /// The node's view of its cluster, when it is in one.
    #[serde(default)]
    pub cluster: Option<Box<ClusterStats>>,
}

/// A clustered node's view, in [`NodeStats`].
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterStats {
    /// This node's id.
    pub node_id: u32,
    /// Every member's peer address, by node id.
    pub members: Vec<String>,
    /// Every member's client (`cachet/1`) address, by node id, as learned
    /// from the membership; empty where not known yet.
    #[serde(default)]
    pub clients: Vec<String>,
    /// Which members are up, by node id, as this node's failure detector
    /// sees them.
    pub alive: Vec<bool>,
    /// Replication factor.
    pub replication_factor: u32,
    /// The slot table's epoch, from the cluster's metadata log (0 before
    /// this node has one).
    #[serde(default)]
    pub ring_epoch: u64,
    /// The slot table at `ring_epoch`: every hash slot's owners, primary
    /// first (what `CLUSTER SLOTS` lists). Empty before this node has one.
    #[serde(default)]
    pub slots: Vec<crate::SlotRange>,
    /// Whether this node counts toward quorums; `false` while it re-syncs
    /// (after starting empty or gaining slots).
    pub synced: bool,
    /// Members this node still waits for a re-sync from.
    pub resync_waiting: Vec<u32>,
    /// Replicated records held (tombstones included).
    pub records: u64,
    /// Writes held for down members (hinted hand-off).
    pub hints: u64,
    /// Client operations coordinated here that succeeded.
    pub ops_ok: u64,
    /// Client operations coordinated here that failed (unavailable or
    /// timed out).
    pub ops_failed: u64,
    /// Peer frames dropped because their sender claimed to be another
    /// member than its certificate names.
    #[serde(default)]
    pub peer_identity_refused: u64,
    /// Re-sync stream requests dropped because a newer one from the same
    /// member came before they were served (one that asks in a loop).
    #[serde(default)]
    pub sync_requests_refused: u64,
    /// Record bytes this member has streamed to members re-syncing or
    /// taking slots (at most `--stream-mib-per-sec`).
    #[serde(default)]
    pub streamed_bytes: u64,
    /// Writes this member stored as a replica for other coordinators
    /// (replication, repair, hints delivered and re-sync parts excluded).
    #[serde(default)]
    pub replica_writes: u64,
    /// Read-modify-writes and loads this member ran as a key's primary.
    #[serde(default)]
    pub primary_updates: u64,
    /// The cluster's metadata log as this member sees it.
    #[serde(default)]
    pub meta: Option<MetaStats>,
}

/// The cluster's metadata log (membership, placement, policy registry) as
/// one member sees it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MetaStats {
    /// `probing` (a founder with an empty data directory asking whether
    /// the cluster exists), `joining` (waiting to be added and caught up),
    /// `running`, or `stopped: why`.
    pub phase: String,
    /// This member's Raft identity (generation << 32 | node + 1).
    pub raft_id: u64,
    /// The leader it knows of.
    pub leader: Option<u32>,
    /// The current term.
    pub term: u64,
    /// The last log index applied here.
    pub applied: u64,
    /// Every member in the log, removed ones included.
    pub members: Vec<MetaMemberStats>,
    /// The slot table's epoch.
    pub slots_epoch: u64,
    /// The policy module active cluster-wide, if one was activated.
    pub active_policy: Option<String>,
    /// The canary running, if any: its module, members and window.
    #[serde(default)]
    pub canary: Option<String>,
    /// What became of the last canary, and why.
    #[serde(default)]
    pub last_canary: Option<String>,
    /// Log entries the state machine refused (not valid when applied).
    pub refused: u64,
    /// The cluster's loader configuration, if one is set: its hash, who
    /// set it and when, and whether this member runs it.
    #[serde(default)]
    pub loaders: Option<String>,
}

/// One member as the metadata log records it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MetaMemberStats {
    /// Its node id.
    pub node: u32,
    /// Its Raft identity.
    pub raft_id: u64,
    /// `joining`, `syncing`, `serving`, `leaving`, `down` or `removed`.
    pub state: String,
    /// Why it got there.
    pub reason: String,
    /// Whether it votes in the log.
    pub voter: bool,
    /// Its peer address.
    pub peer: String,
    /// Its client address, once announced.
    pub client: String,
}

/// One hot key in [`NodeStats`].
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct HotKey {
    /// The key.
    pub key: Bytes,
    /// Its heat: recent reads as counted (one in eight once a shard is
    /// busy), for ranking.
    pub reads: u64,
}

/// What a reply can be.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum Response {
    /// A value, or none (a miss).
    Value(Option<Bytes>),
    /// Values in request order.
    Values(Vec<Option<Bytes>>),
    /// Whether a conditional write or an EXPIRE applied.
    Applied(bool),
    /// A count (DEL, EXISTS).
    Count(u64),
    /// A key's remaining lifetime.
    Ttl(TtlState),
    /// The new value of INCR.
    Integer(i64),
    /// Done.
    Ok,
    /// Reply to PING.
    Pong,
    /// Node statistics.
    Stats(NodeStats),
    /// The policy registry after an admin command.
    Policies(Box<PolicyListing>),
    /// The request failed.
    Error(ErrorReply),
    /// One step of a SCAN: the cursor to go on from (0: done) and the keys
    /// found.
    Scan {
        /// Where to go on from; 0 when the scan is complete.
        cursor: u64,
        /// The keys.
        keys: Vec<Bytes>,
    },
}

/// Why a request failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ErrorCode {
    /// A key, value or frame over its limit.
    TooLarge,
    /// INCR on a value that is not a decimal integer.
    WrongType,
    /// A command this node does not know.
    UnknownCommand,
    /// A frame that does not decode.
    BadFrame,
    /// A protocol version this node does not speak.
    UnsupportedVersion,
    /// This node does not own the key (cluster).
    NotOwner,
    /// A write sent in 0-RTT data.
    NotAllowed,
    /// An argument out of its range (a TTL of 0).
    InvalidArgument,
    /// An admin command without the right token, or on a node without one.
    Unauthorized,
    /// The named module or version does not exist.
    NotFound,
    /// Another policy operation is in progress; try again.
    Busy,
    /// A policy module was refused (not a component, wrong interface,
    /// forbidden import, failed conformance check).
    InvalidModule,
    /// The node failed; the message says how.
    Internal,
    /// A loader could not produce the value: it trapped, ran out of its
    /// budget or memory, returned invalid data, or missed its deadline.
    LoadFailed,
    /// A loader's origin is down, timed out or answered with an error.
    OriginFailed,
    /// Too few replicas of the key answered for the consistency asked
    /// (they are down, re-syncing, or slow): retry, possibly elsewhere.
    Unavailable,
    /// The command is not available on a clustered node (yet); the message
    /// says which.
    NotSupported,
}

/// A typed error with a message for humans.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorReply {
    /// What kind of failure.
    pub code: ErrorCode,
    /// What was wrong and what to do.
    pub message: String,
}

impl ErrorReply {
    /// A reply of `code` saying `message`.
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self { code, message: message.into() }
    }
}
