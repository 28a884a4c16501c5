//! The contract between a shard and whatever chooses its victims, native or
//! Wasm. The shard only ever talks to [`EvictionPolicy`]; a
//! [`PolicyFactory`] makes fresh instances (one per shard, and again after a
//! fault).

use cachet_policy_sdk::{Capacity, Config, Entry, EntryId, Event, Need, Policy, PolicyInfo};
use std::fmt;
use std::marker::PhantomData;

/// What kind of misbehaviour a policy fault was; counted per kind.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum FaultKind {
    /// The guest trapped (panic, unreachable, bad memory access...).
    Trap,
    /// The call ran out of its instruction budget (fuel).
    Budget,
    /// The guest tried to grow memory past its cap.
    Memory,
    /// The policy returned an id that is not resident.
    InvalidVictim,
    /// The policy could not free the space the shard needed.
    InsufficientVictims,
}

impl FaultKind {
    /// Every kind, in the order [`FaultKind::index`] numbers them.
    pub const ALL: [Self; 5] = [Self::Trap, Self::Budget, Self::Memory, Self::InvalidVictim, Self::InsufficientVictims];

    /// A dense index for per-kind counters.
    pub fn index(self) -> usize {
        self as usize
    }

    /// The name used in stats and logs.
    pub fn name(self) -> &'static str {
        match self {
            Self::Trap => "trap",
            Self::Budget => "budget",
            Self::Memory => "memory",
            Self::InvalidVictim => "invalid_victim",
            Self::InsufficientVictims => "insufficient_victims",
        }
    }
}

/// A policy call that failed at run time. The shard answers every fault by
/// switching to its native fallback, so this never reaches a client.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("policy fault ({}): {detail}", kind.name())]
pub struct PolicyFault {
    /// What went wrong.
    pub kind: FaultKind,
    /// The engine's message, for logs.
    pub detail: String,
}

/// A policy that could not be loaded or created.
#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    /// No bundled policy has this name.
    #[error("unknown policy `{name}`; known policies: {}", known.join(", "))]
    Unknown {
        /// The name asked for.
        name: String,
        /// The names that exist.
        known: Vec<String>,
    },
    /// The file could not be read.
    #[error("cannot read policy module {path}: {source}")]
    Io {
        /// The path given.
        path: String,
        /// The OS error.
        source: std::io::Error,
    },
    /// The bytes are not a WebAssembly component (a core module, or garbage).
    #[error("not a WebAssembly component: {0}")]
    NotAComponent(String),
    /// The component imports something outside the allow-list.
    #[error("forbidden import `{name}`: a policy may import only cachet:policy/types@0.1.x")]
    ForbiddenImport {
        /// The import's name.
        name: String,
    },
    /// A core module inside the component has more than one linear memory
    /// (the multi-memory proposal): the sandbox is sized for one memory per
    /// module, and a second would double what a policy may hold.
    #[error(
        "core module {module} of the component has {memories} linear memories (defined or imported); \
         a policy may have one"
    )]
    MultipleMemories {
        /// The module's position among the component's core modules, from 0.
        module: usize,
        /// Its memories, imported and defined.
        memories: u64,
    },
    /// The component does not implement the supported interface version.
    #[error("wrong interface: {0}")]
    WrongInterface(String),
    /// The policy refused to create an instance (usually a config error).
    #[error("policy refused to start: {0}")]
    Create(String),
    /// The policy faulted while starting.
    #[error("policy faulted while starting: {0}")]
    Fault(#[from] PolicyFault),
}

/// One live policy instance serving one shard.
///
/// Calls follow the WIT contract in `wit/policy/policy.wit`: the shard
/// flushes buffered events before any other call, validates every returned
/// id, and treats any `Err` as a fault.
pub trait EvictionPolicy: Send {
    /// Applies events in order.
    fn on_events(&mut self, now: u64, events: &[Event]) -> Result<(), PolicyFault>;
    /// Whether to cache `candidate`; only called if the info asks for it.
    fn admit(&mut self, now: u64, candidate: &Entry) -> Result<bool, PolicyFault>;
    /// Applies `events` (as [`EvictionPolicy::on_events`] would), then
    /// pushes victims until `need` is met. One call where a flush and a pick
    /// would be two: this is the path of every eviction.
    fn pick_victims(
        &mut self,
        now: u64,
        events: &[Event],
        need: Need,
        out: &mut Vec<EntryId>,
    ) -> Result<(), PolicyFault>;
    /// Pushes entries past a policy-owned deadline.
    fn expired(&mut self, now: u64, out: &mut Vec<EntryId>) -> Result<(), PolicyFault>;
    /// When [`EvictionPolicy::expired`] next has work.
    fn next_deadline(&mut self) -> Result<Option<u64>, PolicyFault>;
    /// Pushes every resident entry, first-to-evict first.
    fn export_order(&mut self, out: &mut Vec<EntryId>) -> Result<(), PolicyFault>;
}

/// Makes policy instances of one kind, configured once.
pub trait PolicyFactory: Send + Sync {
    /// What the policy says of itself.
    fn info(&self) -> &PolicyInfo;
    /// Whether instances run natively (`false`: sandboxed Wasm).
    fn is_native(&self) -> bool;
    /// A fresh instance for a shard of `capacity`.
    fn create(&self, capacity: Capacity, seed: u64) -> Result<Box<dyn EvictionPolicy>, PolicyError>;
}

/// A policy crate linked into the host and run natively: the built-in
/// fallback, and `cachet sim --native` for measuring the Wasm overhead.
pub struct NativeFactory<P: Policy> {
    info: PolicyInfo,
    config: Config,
    _policy: PhantomData<fn() -> P>,
}

impl<P: Policy> NativeFactory<P> {
    /// A factory passing `config` to every instance.
    pub fn new(config: Config) -> Self {
        Self { info: P::info(), config, _policy: PhantomData }
    }
}

impl<P: Policy> fmt::Debug for NativeFactory<P> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NativeFactory").field("policy", &self.info.name).finish()
    }
}

impl<P: Policy + Send> PolicyFactory for NativeFactory<P> {
    fn info(&self) -> &PolicyInfo {
        &self.info
    }

    fn is_native(&self) -> bool {
        true
    }

    fn create(&self, capacity: Capacity, seed: u64) -> Result<Box<dyn EvictionPolicy>, PolicyError> {
        let policy = P::create(capacity, seed, &self.config).map_err(|e| PolicyError::Create(e.0))?;
        Ok(Box::new(Native(policy)))
    }
}

/// A native policy behind the fault-returning contract; it cannot trap.
struct Native<P>(P);

impl<P: Policy + Send> EvictionPolicy for Native<P> {
    fn on_events(&mut self, now: u64, events: &[Event]) -> Result<(), PolicyFault> {
        self.0.on_events(now, events);
        Ok(())
    }

    fn admit(&mut self, now: u64, candidate: &Entry) -> Result<bool, PolicyFault> {
        Ok(self.0.admit(now, candidate))
    }

    fn pick_victims(
        &mut self,
        now: u64,
        events: &[Event],
        need: Need,
        out: &mut Vec<EntryId>,
    ) -> Result<(), PolicyFault> {
        self.0.on_events(now, events);
        self.0.pick_victims(now, need, out);
        Ok(())
    }

    fn expired(&mut self, now: u64, out: &mut Vec<EntryId>) -> Result<(), PolicyFault> {
        self.0.expired(now, out);
        Ok(())
    }

    fn next_deadline(&mut self) -> Result<Option<u64>, PolicyFault> {
        Ok(self.0.next_deadline())
    }

    fn export_order(&mut self, out: &mut Vec<EntryId>) -> Result<(), PolicyFault> {
        self.0.export_order(out);
        Ok(())
    }
}
