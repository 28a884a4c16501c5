//! Cachet's integration tests, one binary with a module per area.

mod conformance;
mod differential;
mod live;
mod loaders;
mod node;
mod resp;
mod sandbox;
mod seed;
mod traces;
