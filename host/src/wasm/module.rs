use super::bindings::EvictionPre;
use super::instance::WasmPolicy;
use super::sandbox::{self, Limits, StoreState, classify};
use crate::core::{EvictionPolicy, PolicyError, PolicyFactory};
use cachet_policy_sdk::{Capacity, PolicyInfo};
use std::sync::Arc;
use wasmtime::component::{Component, Linker};
use wasmtime::{Config, Engine};

/// The interface a policy must export; the one import it may have is the
/// types-only interface its exports use.
pub const EXPORT: &str = "cachet:policy/policy@0.1.0";
const INTERFACE_PACKAGE: &str = "cachet:policy/";
const SUPPORTED: &str = "0.1.";

/// The process's one wasmtime engine for policies.
#[derive(Clone)]
pub struct PolicyEngine {
    engine: Engine,
}

impl PolicyEngine {
    /// An engine with fuel metering, compiling with Cranelift.
    pub fn new() -> Result<Self, PolicyError> {
        let mut config = Config::new();
        config.consume_fuel(true);
        config.wasm_component_model(true);
        config.cranelift_opt_level(wasmtime::OptLevel::Speed);
        // One linear memory per module ([`check_one_memory_per_module`]
        // says so first, with a clearer error).
        config.wasm_multi_memory(false);
        let engine = Engine::new(&config).map_err(|e| PolicyError::NotAComponent(e.to_string()))?;
        Ok(Self { engine })
    }

    /// Compiles and validates `bytes` as a policy component; see
    /// [`WasmPolicyModule`].
    pub fn load(
        &self,
        bytes: &[u8],
        limits: Limits,
        config: Vec<(String, String)>,
    ) -> Result<WasmPolicyModule, PolicyError> {
        WasmPolicyModule::new(self, bytes, limits, config)
    }

    pub(super) fn engine(&self) -> &Engine {
        &self.engine
    }
}

/// One validated policy component, ready to instantiate per shard.
pub struct WasmPolicyModule {
    engine: PolicyEngine,
    pre: EvictionPre<StoreState>,
    info: PolicyInfo,
    limits: Limits,
    config: Arc<Vec<(String, String)>>,
}

impl WasmPolicyModule {
    /// Compiles `bytes`, checks its imports against the allow-list and its
    /// exports against the supported interface, and reads its info.
    pub fn new(
        engine: &PolicyEngine,
        bytes: &[u8],
        limits: Limits,
        config: Vec<(String, String)>,
    ) -> Result<Self, PolicyError> {
        check_is_component(bytes)?;
        check_one_memory_per_module(bytes)?;
        let component =
            Component::new(engine.engine(), bytes).map_err(|e| PolicyError::NotAComponent(format!("{e:#}")))?;
        let ty = component.component_type();
        for (name, _) in ty.imports(engine.engine()) {
            match name.strip_prefix(INTERFACE_PACKAGE).and_then(|rest| rest.split_once('@')) {
                Some(("types", version)) if version.starts_with(SUPPORTED) => {}
                Some((_, version)) if !version.starts_with(SUPPORTED) => {
                    return Err(PolicyError::WrongInterface(format!(
                        "the component is built for `{name}`; this node supports `{EXPORT}` (0.1.x)"
                    )));
                }
                _ => {
                    return Err(PolicyError::ForbiddenImport { name: name.to_string() });
                }
            }
        }
        let exports: Vec<String> = ty.exports(engine.engine()).map(|(n, _)| n.to_string()).collect();
        if !exports.iter().any(|n| n == EXPORT) {
            let found = if exports.is_empty() { "nothing".to_string() } else { exports.join(", ") };
            return Err(PolicyError::WrongInterface(format!(
                "the component does not export `{EXPORT}`; it exports {found}"
            )));
        }
        let linker = Linker::new(engine.engine());
        let pre = linker
            .instantiate_pre(&component)
            .and_then(EvictionPre::new)
            .map_err(|e| PolicyError::WrongInterface(format!("{e:#}")))?;
        let mut probe = sandbox::store(engine.engine(), limits.max_memory_bytes);
        probe.set_fuel(limits.fuel_per_call).map_err(|e| PolicyError::Create(e.to_string()))?;
        let bindings = pre
            .instantiate(&mut probe)
            .map_err(|e| PolicyError::WrongInterface(format!("cannot instantiate: {e:#}")))?;
        let info = bindings
            .cachet_policy_policy()
            .call_info(&mut probe)
            .map_err(|e| PolicyError::Fault(classify(&probe, e)))?;
        let info = PolicyInfo {
            name: info.name,
            version: info.version,
            wants_access_events: info.wants_access_events,
            wants_miss_events: info.wants_miss_events,
            uses_admission: info.uses_admission,
        };
        let module = Self { engine: engine.clone(), pre, info, limits, config: Arc::new(config) };
        // A throw-away instance proves `create` works with this config now,
        // not at the first shard.
        module.create(Capacity { max_entries: 16, max_bytes: 1 << 20 }, 0)?;
        Ok(module)
    }

    /// The limits each instance runs under.
    pub fn limits(&self) -> Limits {
        self.limits
    }

    /// The same compiled component with other settings (and limits), for
    /// activating a stored module with a new config without compiling it
    /// again. Fails like [`WasmPolicyModule::new`] if the policy refuses
    /// the config.
    pub fn reconfigured(&self, limits: Limits, config: Vec<(String, String)>) -> Result<Self, PolicyError> {
        let module = Self {
            engine: self.engine.clone(),
            pre: self.pre.clone(),
            info: self.info.clone(),
            limits,
            config: Arc::new(config),
        };
        module.create(Capacity { max_entries: 16, max_bytes: 1 << 20 }, 0)?;
        Ok(module)
    }
}

impl PolicyFactory for WasmPolicyModule {
    fn info(&self) -> &PolicyInfo {
        &self.info
    }

    fn is_native(&self) -> bool {
        false
    }

    fn create(&self, capacity: Capacity, seed: u64) -> Result<Box<dyn EvictionPolicy>, PolicyError> {
        let policy = WasmPolicy::new(self.engine.engine(), &self.pre, self.limits, capacity, seed, &self.config)?;
        Ok(Box::new(policy))
    }
}

/// Tells a core module (or random bytes) from a component before wasmtime
/// does, so the error says which it is.
fn check_is_component(bytes: &[u8]) -> Result<(), PolicyError> {
    const MAGIC: &[u8] = b"\0asm";
    if bytes.len() < 8 || &bytes[..4] != MAGIC {
        return Err(PolicyError::NotAComponent("the file is not WebAssembly (bad magic number)".into()));
    }
    // Core modules have layer 0 in bytes 6..8; components have layer 1.
    if bytes[6..8] == [0, 0] {
        return Err(PolicyError::NotAComponent(
            "this is a core module; turn it into a component with `cargo xtask build-policies` \
             (wit-component) first"
                .into(),
        ));
    }
    Ok(())
}

/// Refuses a component any of whose core modules has more than one linear
/// memory, counting imported ones: the memory cap is meant for one. (The
/// store's limiter also caps the sum over all memories, for components that
/// instantiate several modules.) Loader modules are checked with it too.
pub(crate) fn check_one_memory_per_module(bytes: &[u8]) -> Result<(), PolicyError> {
    use wasmparser::{Encoding, Parser, Payload, TypeRef};
    let malformed = |e: wasmparser::BinaryReaderError| PolicyError::NotAComponent(e.to_string());
    // Per module or component being parsed (they nest): whether it is a core
    // module, and the memories counted in it so far.
    let mut open: Vec<(bool, u64)> = Vec::new();
    let mut modules = 0usize;
    for payload in Parser::new(0).parse_all(bytes) {
        match payload.map_err(malformed)? {
            Payload::Version { encoding, .. } => open.push((encoding == Encoding::Module, 0)),
            Payload::ImportSection(imports) => {
                for import in imports.into_imports() {
                    if matches!(import.map_err(malformed)?.ty, TypeRef::Memory(_))
                        && let Some((_, memories)) = open.last_mut()
                    {
                        *memories += 1;
                    }
                }
            }
            Payload::MemorySection(section) => {
                if let Some((_, memories)) = open.last_mut() {
                    *memories += u64::from(section.count());
                }
            }
            Payload::End(_) => {
                if let Some((true, memories)) = open.pop() {
                    if memories > 1 {
                        return Err(PolicyError::MultipleMemories { module: modules, memories });
                    }
                    modules += 1;
                }
            }
            _ => {}
        }
    }
    Ok(())
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A core module in binary form with `imported` memory imports and
    /// `defined` memories of one page each, and nothing else.
    pub(crate) fn core_module(imported: u8, defined: u8) -> Vec<u8> {
        let mut module = b"\0asm\x01\0\0\0".to_vec();
        if imported > 0 {
            // Section 2 (imports): "m" "mN" memory (0x02) with min 1 page.
            let mut body = vec![imported];
            for i in 0..imported {
                body.extend_from_slice(&[1, b'm', 2, b'm', b'0' + i, 0x02, 0x00, 0x01]);
            }
            module.extend_from_slice(&[2, body.len() as u8]);
            module.extend_from_slice(&body);
        }
        if defined > 0 {
            // Section 5 (memories): limits with min 1 page each.
            let mut body = vec![defined];
            for _ in 0..defined {
                body.extend_from_slice(&[0x00, 0x01]);
            }
            module.extend_from_slice(&[5, body.len() as u8]);
            module.extend_from_slice(&body);
        }
        module
    }

    /// A component holding `modules` as core module sections (section 1).
    pub(crate) fn component(modules: &[Vec<u8>]) -> Vec<u8> {
        let mut component = b"\0asm\x0d\0\x01\0".to_vec();
        for module in modules {
            component.extend_from_slice(&[1, module.len() as u8]);
            component.extend_from_slice(module);
        }
        component
    }

    /// A core module with two memories, both defined or one imported and
    /// one defined, is refused with an error that says so, before
    /// compiling; one memory per module passes this check.
    #[test]
    fn multi_memory_modules_are_refused() {
        let engine = PolicyEngine::new().expect("engine");
        for (imported, defined) in [(0, 2), (1, 1), (2, 0)] {
            let bytes = component(&[core_module(0, 1), core_module(imported, defined)]);
            let err = engine.load(&bytes, Limits::default(), Vec::new()).err().expect("refused");
            assert!(
                matches!(err, PolicyError::MultipleMemories { module: 1, memories: 2 }),
                "{imported} imported + {defined} defined: {err}"
            );
        }
        assert!(check_one_memory_per_module(&component(&[core_module(0, 1), core_module(1, 0)])).is_ok());
        for name in crate::policies::bundled_names() {
            let bytes = crate::policies::bundled_component(name).expect("bundled");
            assert!(check_one_memory_per_module(bytes).is_ok(), "bundled {name} refused");
        }
    }
}
