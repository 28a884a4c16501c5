//! Running policies as sandboxed WebAssembly components.
//!
//! One [`PolicyEngine`] (a wasmtime engine with fuel metering) per process
//! compiles modules; a [`WasmPolicyModule`] is one validated component and a
//! [`PolicyFactory`](crate::core::PolicyFactory) for instances; each instance
//! lives in a store of its own with a memory cap, and every call runs on a
//! fuel budget. Validation rejects anything that is not a component of the
//! supported interface, and any import outside the allow-list (WASI
//! included), naming what is wrong.

mod bindings;
mod instance;
mod module;
mod sandbox;

pub(crate) use module::check_one_memory_per_module;
#[cfg(test)]
pub(crate) use module::tests as module_tests;
pub use module::{EXPORT as INTERFACE, PolicyEngine, WasmPolicyModule};
pub use sandbox::Limits;
pub(crate) use sandbox::StoreState;
