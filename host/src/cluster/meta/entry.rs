//! The metadata log's commands.
//!
//! Every entry is a [`Proposal`]: the command plus who proposed it and a
//! nonce, so the proposer recognises its own entry when it applies (and
//! answers its caller), and a proposal retried after a lost message or a
//! change of leader applies once. Entries are MessagePack, decoded with
//! nesting limited; one that does not decode applies as a no-op on every
//! member alike, never a panic.

use super::super::replica::{Consistency, NodeIx};
use cachet_proto::SlotTable;
use serde::{Deserialize, Serialize};
use std::net::SocketAddr;

/// Where a member stands in the cluster.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum MemberState {
    /// Added to the log; catching up with it.
    Joining,
    /// Taking its ranges over; not counted for reads yet.
    Syncing,
    /// Serving its ranges.
    Serving,
    /// Handing its ranges off before it goes.
    Leaving,
    /// The failure detector's verdict, recorded by the leader.
    Down,
    /// Gone for good: its id's raft identity never votes again.
    Removed,
}

impl MemberState {
    /// The state's name, as `cachet stats` shows it.
    pub fn name(self) -> &'static str {
        match self {
            Self::Joining => "joining",
            Self::Syncing => "syncing",
            Self::Serving => "serving",
            Self::Leaving => "leaving",
            Self::Down => "down",
            Self::Removed => "removed",
        }
    }
}

/// One member as the log knows it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemberRecord {
    /// Its node id (what its certificate names).
    pub node: NodeIx,
    /// Its Raft identity: `generation << 32 | (node + 1)`. A member that
    /// lost its data directory comes back under a new generation, never
    /// voting under an identity whose vote it forgot.
    pub raft_id: u64,
    /// Its peer (QUIC) address.
    pub peer: SocketAddr,
    /// Its client (`cachet/1`) address, once it announced it (founders
    /// know only each other's peer addresses).
    pub client: Option<SocketAddr>,
    /// Its share of the slots, relative to the others'.
    pub weight: u32,
    /// Where it stands.
    pub state: MemberState,
    /// Why it got there (the last `SetState`'s reason).
    pub reason: String,
    /// The log index of its last state change.
    pub since: u64,
    /// Its Redis-protocol address, once it announced one: `CLUSTER SLOTS`
    /// hands it to cluster-aware Redis clients.
    #[serde(default)]
    pub resp: Option<SocketAddr>,
}

/// Cluster-wide settings.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Settings {
    /// Copies of each slot.
    pub rf: u32,
    /// Consistency of requests that name none.
    pub consistency: Consistency,
}

/// A policy module as the log records it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredModule {
    /// `name@version`.
    pub label: String,
    /// SHA-256 of the component, hex.
    pub sha256: String,
    /// Its size in bytes.
    pub size: u64,
    /// Its stored settings.
    pub config: Vec<(String, String)>,
    /// Fuel per policy call.
    pub fuel_per_call: u64,
    /// Base memory cap per instance, bytes.
    pub max_memory_bytes: u64,
}

/// The cluster's read-through loader configuration: the TOML of
/// `cachet serve --loaders`, each namespace's module named by its hash
/// (`sha256:HEX`), and those modules, whose bytes travel beside the log
/// as policy modules' do (see `loader::shared`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LoaderSetting {
    /// The configuration.
    pub config: String,
    /// The modules it names: hash (hex) and size in bytes.
    pub modules: Vec<(String, u64)>,
}

/// The loader configuration in force, as the log records it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LoaderRecord {
    /// The configuration.
    pub setting: LoaderSetting,
    /// The member that set it (holds its modules' bytes).
    pub origin: NodeIx,
    /// The log index that set it.
    pub since: u64,
}

/// The policy a cluster runs.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ActivePolicy {
    /// `name@version`.
    pub label: String,
    /// Settings overriding the stored ones.
    pub config: Option<Vec<(String, String)>>,
    /// The component's hash (`None` for a bundled module).
    pub sha256: Option<String>,
    /// The log index that activated it.
    pub since: u64,
}

/// A canary in progress.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Canary {
    /// What the canary members run.
    pub policy: ActivePolicy,
    /// The members that run it.
    pub members: Vec<NodeIx>,
    /// How long before the leader decides.
    pub window_ms: u64,
}

/// What became of a canary.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CanaryOutcome {
    /// The canary's `name@version`.
    pub label: String,
    /// Rolled out to every member, or back.
    pub rolled_out: bool,
    /// The figures behind the decision.
    pub why: String,
    /// The log index of the decision.
    pub index: u64,
}

/// A command of the metadata log.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum MetaEntry {
    /// A member joins, as a learner or a voter (a configuration change).
    AddMember {
        /// Its record (its state is `Joining`).
        member: MemberRecord,
        /// Whether it votes.
        voter: bool,
    },
    /// A learner becomes a voter (a configuration change).
    Promote {
        /// The member.
        node: NodeIx,
    },
    /// A member leaves the configuration for good (a configuration change).
    RemoveMember {
        /// The member.
        node: NodeIx,
        /// The incarnation removed: a removal planned for an old one must
        /// not remove the member that replaced it.
        raft_id: u64,
    },
    /// A member's state changes.
    SetState {
        /// The member.
        node: NodeIx,
        /// Its new state.
        state: MemberState,
        /// Why.
        reason: String,
    },
    /// The slot table changes, if it is still at `expected_epoch` (a
    /// compare-and-set: a plan made on an older table, retried or racing
    /// another, applies as a no-op).
    SetSlots {
        /// The epoch the plan was made on.
        expected_epoch: u64,
        /// The new table, at `expected_epoch + 1`.
        table: SlotTable,
    },
    /// A member announces where it serves clients (only for itself: the
    /// proposer must be `node`).
    SetClient {
        /// The member.
        node: NodeIx,
        /// Its client address.
        client: SocketAddr,
        /// Its Redis-protocol address, if it has that port open.
        #[serde(default)]
        resp: Option<SocketAddr>,
    },
    /// Cluster-wide settings change.
    Settings(Settings),
    /// A policy module is stored on the members (its bytes travel beside
    /// the log, content-addressed: a member lacking them fetches them from
    /// a member that has them).
    ModuleStored(StoredModule),
    /// A module becomes the active policy on every member.
    Activate {
        /// `name@version`.
        label: String,
        /// Settings overriding the stored ones.
        config: Option<Vec<(String, String)>>,
        /// A module bundled in the binary (every member has it; not in the
        /// log's registry).
        bundled: bool,
    },
    /// Shadow evaluation of a module on every member, or none.
    Shadow {
        /// `name@version`, or `None` to stop.
        label: Option<String>,
    },
    /// The previous active policy comes back.
    Rollback,
    /// A canary: a module runs on the first `members` serving members (by
    /// node id) for `window_ms`, while the others keep the active policy;
    /// the leader then decides ([`MetaEntry::CanaryDecided`]).
    CanaryStart {
        /// `name@version`.
        label: String,
        /// Settings overriding the stored ones.
        config: Option<Vec<(String, String)>>,
        /// Bundled in the binary.
        bundled: bool,
        /// How many members run it.
        members: u32,
        /// How long they run it before the decision.
        window_ms: u64,
    },
    /// The leader's decision on the running canary: rolled out to every
    /// member (it becomes the active policy) or rolled back, and why.
    CanaryDecided {
        /// The canary's `name@version` (a decision on another is refused).
        label: String,
        /// Rolled out, or back.
        rolled_out: bool,
        /// The figures behind it.
        why: String,
    },
    /// A module is taken out of service everywhere.
    Quarantine {
        /// `name@version`.
        label: String,
        /// The fault that caused it.
        reason: String,
    },
    /// Nothing: a barrier a member proposes to learn that its view is
    /// current.
    Noop,
    /// The cluster's loader configuration changes: every member builds
    /// its loaders from it and puts them in place of the old ones, or
    /// drops its loaders for `None`.
    SetLoaders {
        /// The new configuration, or none.
        setting: Option<LoaderSetting>,
        /// Only if the log has none yet: what a member started with
        /// `--loaders` proposes (refused, harmlessly, once the cluster has
        /// one: the log's wins).
        if_none: bool,
    },
    /// A member pending for slots on the table at `epoch` holds them now
    /// (its streams from their owners are done, and it has taken every
    /// write since): once every pending member has said so, the leader
    /// makes them owners. Only for itself: the proposer must be `node`.
    SlotsHeld {
        /// The member.
        node: NodeIx,
        /// The table it streamed for.
        epoch: u64,
    },
}

impl MetaEntry {
    /// Whether the entry changes Raft's configuration (proposed as a
    /// configuration change, only on the leader).
    pub fn is_conf_change(&self) -> bool {
        matches!(self, Self::AddMember { .. } | Self::Promote { .. } | Self::RemoveMember { .. })
    }
}

/// An entry as proposed: the command, its proposer and the proposer's
/// nonce.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Proposal {
    /// Who proposed it.
    pub proposer: NodeIx,
    /// Unique per proposer across its restarts (it starts from the boot
    /// time), so a retry applies once and a new proposal is never taken
    /// for an old one.
    pub nonce: u64,
    /// The command.
    pub entry: MetaEntry,
}

impl Proposal {
    /// The proposal's bytes in the log.
    pub fn encode(&self) -> Vec<u8> {
        // Encoding plain data into a Vec cannot fail; an empty payload
        // would apply as a no-op if it somehow did. Fields by name, as the
        // state's (see `MetaState::encode`).
        rmp_serde::to_vec_named(self).unwrap_or_default()
    }

    /// A proposal from the log's bytes.
    pub fn decode(bytes: &[u8]) -> Result<Self, rmp_serde::decode::Error> {
        cachet_proto::frame::from_slice_shallow(bytes)
    }
}
