//! Prometheus metrics: what the request path counts (latency and errors
//! per command, recorded by the node's dispatcher for every request it
//! serves). [`endpoint`] renders them with the rest of the node's counters
//! in the text exposition format and serves them over HTTP.

pub mod endpoint;

use crate::core::histogram::{Histogram, SharedHistogram};
use cachet_proto::Request;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Command names, in [`command_index`] order.
pub const COMMANDS: [&str; 25] = [
    "get", "set", "del", "exists", "ttl", "expire", "mget", "mset", "incr", "ping", "stats", "admin", "append",
    "strlen", "getdel", "getex", "persist", "dbsize", "flushall", "edit", "msetnx", "rename", "copy", "keys", "scan",
];

/// [`command_index`] of a GET.
pub const GET: usize = 0;

/// [`command_index`] of a SET.
pub const SET: usize = 1;

/// The slot of `request` in [`COMMANDS`].
pub fn command_index(request: &Request) -> usize {
    match request {
        Request::Get { .. } => GET,
        Request::Set { .. } | Request::SetWith { .. } => SET,
        Request::Del { .. } => 2,
        Request::Exists { .. } => 3,
        Request::Ttl { .. } => 4,
        Request::Expire { .. } => 5,
        Request::MGet { .. } => 6,
        Request::MSet { .. } => 7,
        Request::Incr { .. } => 8,
        Request::Ping => 9,
        Request::Stats => 10,
        Request::Admin { .. } => 11,
        Request::Append { .. } => 12,
        Request::Strlen { .. } => 13,
        Request::GetDel { .. } => 14,
        Request::GetEx { .. } => 15,
        Request::Persist { .. } => 16,
        Request::DbSize => 17,
        Request::FlushAll => 18,
        Request::Edit { .. } => 19,
        Request::MSetNx { .. } => 20,
        Request::Rename { .. } => 21,
        Request::Copy { .. } => 22,
        Request::Keys { .. } | Request::RandomKey => 23,
        Request::Scan { .. } => 24,
    }
}

/// Request latency and errors per command, recorded from every I/O thread.
#[derive(Default)]
pub struct RequestMetrics {
    latency: [SharedHistogram; COMMANDS.len()],
    pub(crate) errors: [AtomicU64; COMMANDS.len()],
}

impl RequestMetrics {
    /// Counts one request of command `index`.
    pub fn record(&self, index: usize, took: Duration, failed: bool) {
        self.latency[index].record(took.as_nanos() as u64);
        if failed {
            self.errors[index].fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Latency of command `index` so far.
    pub fn latency(&self, index: usize) -> Histogram {
        self.latency[index].snapshot()
    }
}
