//! Cachet's integration tests, one binary with a module per area.

mod conformance;
mod differential;
mod live;
mod loaders;
mod node;
mod quic_limits;
mod resp;
mod resp_auth;
mod sandbox;
mod seed;
mod traces;
