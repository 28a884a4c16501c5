//! The host's monotonic clock for timing policy calls: the
//! [`ShardConfig::stopwatch`](crate::core::ShardConfig::stopwatch) a node
//! hands its shards, since the sans-IO core reads no clock itself.

use std::sync::OnceLock;
use std::time::Instant;

/// Nanoseconds since a process-wide base (the first call), monotonic.
/// Only differences mean anything.
pub fn monotonic_ns() -> u64 {
    static BASE: OnceLock<Instant> = OnceLock::new();
    let base = *BASE.get_or_init(Instant::now);
    u64::try_from(base.elapsed().as_nanos()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Readings never go backwards, and time spent shows up between them.
    #[test]
    fn readings_are_monotonic() {
        let first = monotonic_ns();
        std::thread::sleep(std::time::Duration::from_millis(2));
        let second = monotonic_ns();
        assert!(second >= first + 1_000_000, "{first} then {second}");
    }
}
