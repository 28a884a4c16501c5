//! Host bindings generated from `wit/policy` (`cachet:policy@0.1.0`). A
//! future interface version gets a module of its own next to this one.

wasmtime::component::bindgen!({
    world: "eviction",
    path: "../wit/policy",
});
