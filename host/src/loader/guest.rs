//! Loader modules as sandboxed components: validation, and one fresh
//! instance per call with a fuel budget and a memory cap. The `origin`
//! imports are served by [`Origins`], limited to the origins the
//! namespace allows.

use super::origin::{OriginFailure, Origins};
use crate::core::PolicyError;
use crate::wasm::{StoreState, check_one_memory_per_module};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};
use wasmtime::component::{Component, HasSelf, Linker};
use wasmtime::{Config, Engine, ResourceLimiter, Store, Trap};

mod bindings {
    wasmtime::component::bindgen!({
        world: "read-through",
        path: "../wit/hooks",
    });
}

use bindings::cachet::hooks::{origin as wit_origin, types as wt};
use bindings::{ReadThrough, ReadThroughPre};

/// The interface a loader must export.
pub const LOADER_INTERFACE: &str = "cachet:hooks/loader@0.1.0";
const PACKAGE: &str = "cachet:hooks/";
const SUPPORTED: &str = "0.1.";

/// Why a module cannot be used as a loader.
#[derive(Debug, thiserror::Error)]
pub enum LoaderModuleError {
    /// Not a component wasmtime accepts.
    #[error("not a loader component: {0}")]
    NotAComponent(String),
    /// A component of another interface (or version).
    #[error("wrong interface: {0}")]
    WrongInterface(String),
    /// An import outside `cachet:hooks` (WASI included): loaders get no
    /// ambient capabilities.
    #[error("forbidden import `{name}`: loaders may import only cachet:hooks/origin and cachet:hooks/types")]
    ForbiddenImport {
        /// The import.
        name: String,
    },
    /// A core module inside the component has more than one linear memory
    /// (the multi-memory proposal): the memory cap is sized for one.
    #[error(
        "core module {module} of the component has {memories} linear memories (defined or imported); \
         a loader may have one per module"
    )]
    MultipleMemories {
        /// The module's position among the component's core modules, from 0.
        module: usize,
        /// Its memories, imported and defined.
        memories: u64,
    },
}

/// Why a loader call produced no value.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum CallFailure {
    /// The call used up its fuel (a loop, or far too much work).
    #[error("the loader ran out of its instruction budget")]
    Budget,
    /// The instance tried to grow past its memory cap.
    #[error("the loader exceeded its memory cap")]
    Memory,
    /// The guest trapped (a panic, an unreachable).
    #[error("the loader trapped: {0}")]
    Trap(String),
    /// The loader returned an error.
    #[error("{0}")]
    Loader(String),
    /// An origin request failed and the loader passed it on.
    #[error("{0}")]
    Origin(OriginFailure),
    /// The loader does not implement this call.
    #[error("the loader does not implement this call")]
    Unsupported,
}

/// A value a loader produced.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Loaded {
    /// The bytes.
    pub value: Vec<u8>,
    /// The loader's TTL, if it chose one.
    pub ttl_ms: Option<u64>,
}

/// What each loader store carries.
struct State {
    origins: Arc<Origins>,
    allowed: Arc<[String]>,
    /// After this, origin requests are refused (the call's wall-clock
    /// deadline; epoch interruption stops the guest's own code).
    deadline: Instant,
    /// Whether this call's queries run in read-only transactions (loads and
    /// refreshes of a `read-only` namespace).
    read_only: bool,
    /// The memory cap, on the sum of the instance's memories (the policy
    /// sandbox's limiter, so both cap alike).
    limits: StoreState,
}

impl ResourceLimiter for State {
    fn memory_growing(&mut self, current: usize, desired: usize, max: Option<usize>) -> wasmtime::Result<bool> {
        self.limits.memory_growing(current, desired, max)
    }

    fn table_growing(&mut self, current: usize, desired: usize, max: Option<usize>) -> wasmtime::Result<bool> {
        self.limits.table_growing(current, desired, max)
    }
}

fn wit_error(err: OriginFailure) -> wt::OriginError {
    match err {
        OriginFailure::NotAllowed(m) => wt::OriginError::NotAllowed(m),
        OriginFailure::Unavailable(m) => wt::OriginError::Unavailable(m),
        OriginFailure::Timeout => wt::OriginError::Timeout,
        OriginFailure::Failed(m) => wt::OriginError::Failed(m),
        OriginFailure::BadRequest(m) => wt::OriginError::BadRequest(m),
        // The WIT has no TLS case (its 0.1 interface is fixed): the guest
        // sees an unavailable origin, with the reason.
        tls @ OriginFailure::Tls(_) => wt::OriginError::Unavailable(tls.to_string()),
    }
}

fn host_error(err: wt::OriginError) -> OriginFailure {
    match err {
        wt::OriginError::NotAllowed(m) => OriginFailure::NotAllowed(m),
        wt::OriginError::Unavailable(m) => OriginFailure::Unavailable(m),
        wt::OriginError::Timeout => OriginFailure::Timeout,
        wt::OriginError::Failed(m) => OriginFailure::Failed(m),
        wt::OriginError::BadRequest(m) => OriginFailure::BadRequest(m),
    }
}

impl wt::Host for State {}

impl wit_origin::Host for State {
    fn query(
        &mut self,
        origin: String,
        statement: String,
        params: Vec<Option<String>>,
    ) -> Result<Vec<wit_origin::Row>, wt::OriginError> {
        if Instant::now() >= self.deadline {
            return Err(wt::OriginError::Timeout);
        }
        if !self.allowed.contains(&origin) {
            tracing::warn!(%origin, "a loader asked for an origin it is not allowed");
            return Err(wt::OriginError::NotAllowed(origin));
        }
        self.origins.query_blocking(&origin, &statement, &params, self.read_only).map_err(wit_error)
    }

    fn http_get(&mut self, origin: String, path: String) -> Result<wit_origin::HttpResponse, wt::OriginError> {
        if Instant::now() >= self.deadline {
            return Err(wt::OriginError::Timeout);
        }
        if !self.allowed.contains(&origin) {
            tracing::warn!(%origin, "a loader asked for an origin it is not allowed");
            return Err(wt::OriginError::NotAllowed(origin));
        }
        self.origins
            .http_get_blocking(&origin, &path)
            .map(|(status, body)| wit_origin::HttpResponse { status, body })
            .map_err(wit_error)
    }
}

/// A validated loader component, ready to instantiate per call.
pub struct LoaderModule {
    engine: Engine,
    pre: ReadThroughPre<State>,
    origins: Arc<Origins>,
    allowed: Arc<[String]>,
    fuel: u64,
    max_memory: usize,
    /// The namespace's `read-only`: loads and refreshes may not write.
    read_only: bool,
}

/// How often the engine's epoch advances: the granularity of call
/// deadlines.
const EPOCH_MS: u64 = 10;

/// The process's loader engine: fuel for CPU budgets, epochs for wall-clock
/// deadlines, advanced by one background thread. Shared by every
/// [`Loaders`](super::Loaders), so tests and reloads do not start a ticker
/// each.
pub fn engine() -> Result<Engine, LoaderModuleError> {
    static ENGINE: OnceLock<Result<Engine, String>> = OnceLock::new();
    let engine = ENGINE.get_or_init(|| {
        let mut config = Config::new();
        config.consume_fuel(true);
        config.epoch_interruption(true);
        config.wasm_component_model(true);
        // One linear memory per module (`check_one_memory_per_module` says
        // so first, with a clearer error).
        config.wasm_multi_memory(false);
        let engine = Engine::new(&config).map_err(|e| e.to_string())?;
        let ticking = engine.clone();
        std::thread::Builder::new()
            .name("cachet-loader-epoch".into())
            .spawn(move || {
                loop {
                    std::thread::sleep(Duration::from_millis(EPOCH_MS));
                    ticking.increment_epoch();
                }
            })
            .map_err(|e| e.to_string())?;
        Ok(engine)
    });
    engine.clone().map_err(LoaderModuleError::NotAComponent)
}

impl LoaderModule {
    /// Validates `bytes` as a `cachet:hooks` 0.1 loader. With `read_only`,
    /// the queries of its loads and refreshes run in read-only
    /// transactions (its `store`, called only for a namespace that writes
    /// through or behind, is the one call that may write).
    pub fn new(
        engine: &Engine,
        bytes: &[u8],
        origins: Arc<Origins>,
        allowed: Vec<String>,
        fuel: u64,
        max_memory: usize,
        read_only: bool,
    ) -> Result<Self, LoaderModuleError> {
        check_one_memory_per_module(bytes).map_err(|err| match err {
            PolicyError::MultipleMemories { module, memories } => {
                LoaderModuleError::MultipleMemories { module, memories }
            }
            other => LoaderModuleError::NotAComponent(other.to_string()),
        })?;
        let component =
            Component::new(engine, bytes).map_err(|e| LoaderModuleError::NotAComponent(format!("{e:#}")))?;
        let ty = component.component_type();
        for (name, _) in ty.imports(engine) {
            match name.strip_prefix(PACKAGE).and_then(|rest| rest.split_once('@')) {
                Some(("origin" | "types", version)) if version.starts_with(SUPPORTED) => {}
                Some((_, version)) if !version.starts_with(SUPPORTED) => {
                    return Err(LoaderModuleError::WrongInterface(format!(
                        "the component imports `{name}`; this node supports cachet:hooks 0.1.x"
                    )));
                }
                None if name.starts_with("cachet:") => {
                    return Err(LoaderModuleError::WrongInterface(format!(
                        "the component imports `{name}`, another Cachet interface; loaders implement \
                         `{LOADER_INTERFACE}`"
                    )));
                }
                _ => return Err(LoaderModuleError::ForbiddenImport { name: name.to_string() }),
            }
        }
        let exports: Vec<String> = ty.exports(engine).map(|(n, _)| n.to_string()).collect();
        if !exports.iter().any(|n| n == LOADER_INTERFACE) {
            let found = if exports.is_empty() { "nothing".to_string() } else { exports.join(", ") };
            return Err(LoaderModuleError::WrongInterface(format!(
                "the component does not export `{LOADER_INTERFACE}`; it exports {found}"
            )));
        }
        let mut linker = Linker::new(engine);
        ReadThrough::add_to_linker::<State, HasSelf<State>>(&mut linker, |s| s)
            .map_err(|e| LoaderModuleError::WrongInterface(format!("{e:#}")))?;
        let pre = linker
            .instantiate_pre(&component)
            .and_then(ReadThroughPre::new)
            .map_err(|e| LoaderModuleError::WrongInterface(format!("{e:#}")))?;
        Ok(Self { engine: engine.clone(), pre, origins, allowed: allowed.into(), fuel, max_memory, read_only })
    }

    fn new_store(&self, deadline: Duration, read_only: bool) -> Store<State> {
        let state = State {
            origins: self.origins.clone(),
            allowed: self.allowed.clone(),
            deadline: Instant::now() + deadline,
            read_only,
            limits: StoreState::new(self.max_memory),
        };
        let mut store = Store::new(&self.engine, state);
        store.limiter(|s| s);
        store.set_epoch_deadline(deadline.as_millis() as u64 / EPOCH_MS + 1);
        store
    }

    /// Runs `call` in a fresh instance: nothing survives between calls, so a
    /// load never sees another key's data, and a fault cannot poison later
    /// loads. Blocks while origin requests run: call from a blocking thread.
    fn run<R>(
        &self,
        deadline: Duration,
        read_only: bool,
        call: impl FnOnce(&ReadThrough, &mut Store<State>) -> wasmtime::Result<Result<R, wt::LoadError>>,
    ) -> Result<R, CallFailure> {
        let mut store = self.new_store(deadline, read_only);
        store.set_fuel(self.fuel).map_err(|e| CallFailure::Trap(e.to_string()))?;
        let outcome = self.pre.instantiate(&mut store).and_then(|bindings| call(&bindings, &mut store));
        match outcome {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(wt::LoadError::Origin(e))) => Err(CallFailure::Origin(host_error(e))),
            Ok(Err(wt::LoadError::Invalid(m))) => Err(CallFailure::Loader(format!("invalid origin data: {m}"))),
            Ok(Err(wt::LoadError::Unsupported)) => Err(CallFailure::Unsupported),
            Err(_) if store.data().limits.memory_denied() => Err(CallFailure::Memory),
            Err(err) if matches!(err.downcast_ref::<Trap>(), Some(Trap::OutOfFuel)) => Err(CallFailure::Budget),
            Err(err) if matches!(err.downcast_ref::<Trap>(), Some(Trap::Interrupt)) => {
                Err(CallFailure::Loader(format!("the loader missed its {} ms deadline", deadline.as_millis())))
            }
            Err(err) => Err(CallFailure::Trap(format!("{err:#}"))),
        }
    }

    /// `load(key, now)`, stopped after `deadline` of wall time.
    pub fn load(&self, deadline: Duration, key: &[u8], now: u64) -> Result<Option<Loaded>, CallFailure> {
        self.run(deadline, self.read_only, |b, store| b.cachet_hooks_loader().call_load(store, key, now))
            .map(|v| v.map(|l| Loaded { value: l.value, ttl_ms: l.ttl_ms }))
    }

    /// `store(key, value)`: writes (or, for `None`, deletes) at the origin.
    pub fn store(&self, deadline: Duration, key: &[u8], value: Option<&[u8]>) -> Result<(), CallFailure> {
        self.run(deadline, false, |b, store| b.cachet_hooks_loader().call_store(store, key, value))
    }

    /// `refresh(key, current, age, now)`.
    pub fn refresh(
        &self,
        deadline: Duration,
        key: &[u8],
        current: &[u8],
        age_ms: u64,
        now: u64,
    ) -> Result<Option<Loaded>, CallFailure> {
        self.run(deadline, self.read_only, |b, store| {
            b.cachet_hooks_loader().call_refresh(store, key, current, age_ms, now)
        })
        .map(|v| v.map(|l| Loaded { value: l.value, ttl_ms: l.ttl_ms }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wasm::module_tests::{component, core_module};

    fn origins(runtime: &tokio::runtime::Runtime) -> Arc<Origins> {
        Arc::new(Origins::new(&Default::default(), runtime.handle().clone()).expect("no origins"))
    }

    /// A loader component with a core module of two memories is refused,
    /// naming the module, before it is compiled.
    #[test]
    fn multi_memory_loaders_are_refused() {
        let runtime = tokio::runtime::Builder::new_current_thread().build().expect("runtime");
        let engine = engine().expect("engine");
        for (imported, defined) in [(0, 2), (1, 1)] {
            let bytes = component(&[core_module(0, 1), core_module(imported, defined)]);
            let err = LoaderModule::new(&engine, &bytes, origins(&runtime), Vec::new(), 1_000, 1 << 20, false)
                .err()
                .expect("refused");
            assert!(
                matches!(err, LoaderModuleError::MultipleMemories { module: 1, memories: 2 }),
                "{imported} imported + {defined} defined: {err}"
            );
        }
    }

    /// Two memories in one loader store share the cap instead of getting
    /// one each.
    #[test]
    fn the_loader_memory_cap_is_on_the_sum_of_memories() {
        const PAGE: usize = 64 << 10;
        let runtime = tokio::runtime::Builder::new_current_thread().build().expect("runtime");
        let mut state = State {
            origins: origins(&runtime),
            allowed: Arc::from([]),
            deadline: Instant::now(),
            read_only: false,
            limits: StoreState::new(4 * PAGE),
        };
        assert!(state.memory_growing(0, 2 * PAGE, None).expect("first memory"));
        assert!(state.memory_growing(0, 2 * PAGE, None).expect("second memory"));
        assert!(!state.memory_growing(2 * PAGE, 3 * PAGE, None).expect("over the sum"));
        assert!(state.limits.memory_denied());
    }
}
