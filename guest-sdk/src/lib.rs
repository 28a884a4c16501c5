//! Write Cachet eviction policies in Rust.
//!
//! A policy is a plain Rust type implementing [`Policy`]. The same code runs
//! natively (the host links it as a built-in, and [`testing::Harness`] drives
//! it in unit tests) and as a sandboxed WebAssembly component: build the crate
//! for `wasm32-unknown-unknown` with `crate-type = ["cdylib", "rlib"]`, call
//! [`export_policy!`] once, and turn the module into a component with
//! `cargo xtask build-policies`.
//!
//! A policy is deterministic: it gets time and a seed as inputs and has no
//! clock, randomness or I/O of its own, so simulations and the differential
//! native-versus-Wasm tests are exact.
//!
//! # Layout
//! - [`types`]: what the host tells a policy (entries, events, needs).
//! - [`Policy`]: the trait to implement; defaults for everything optional.
//! - [`collections`]: the id-keyed structures most policies are built from.
//! - [`rng`]: a small seeded generator for policies that need randomness.
//! - [`testing`]: a native harness for unit tests.
//! - [`export_policy!`]: the Wasm export glue (generated bindings stay hidden).
//! - [`loader`] and [`export_loader!`]: read-through loaders (`cachet:hooks`).

#![warn(missing_docs)]

pub mod collections;
pub mod loader;
mod policy;
pub mod rng;
pub mod testing;
pub mod types;

pub use policy::{Config, ConfigError, Policy, collect_victims};
pub use types::{Capacity, Entry, EntryId, Event, Need, PolicyInfo, RemovalCause};

#[cfg(target_arch = "wasm32")]
#[doc(hidden)]
pub mod __wasm;

/// Exports a [`Policy`] type as the `cachet:policy/policy` interface.
///
/// Expands to nothing on native targets, so a policy crate can call it
/// unconditionally and still be linked natively next to other policies.
#[macro_export]
macro_rules! export_policy {
    ($ty:ty) => {
        #[cfg(target_arch = "wasm32")]
        const _: () = {
            struct __CachetExport;
            impl $crate::__wasm::bindings::exports::cachet::policy::policy::Guest for __CachetExport {
                type EvictionPolicy = $crate::__wasm::Instance<$ty>;
                fn info() -> $crate::__wasm::bindings::exports::cachet::policy::policy::PolicyInfo {
                    $crate::__wasm::info::<$ty>()
                }
            }
            $crate::__wasm::bindings::__export_eviction_world!(
                __CachetExport with_types_in $crate::__wasm::bindings
            );
        };
    };
}
