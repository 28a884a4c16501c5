//! What every client connection is held to, on either port: caps on
//! connections per port and per source address, refusals logged at a
//! bounded rate, and counts of the clients cut off for breaking a limit.
//!
//! Sans-IO: callers pass `now`; nothing here reads a clock or a socket.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

/// Why a connection was not taken.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// The port holds as many connections as it may.
    #[error("at the port's connection cap ({max})")]
    PortFull {
        /// The cap.
        max: u32,
    },
    /// The client's address holds as many connections as one address may.
    #[error("{ip} is at the per-address connection cap ({max})")]
    AddressFull {
        /// The address.
        ip: IpAddr,
        /// The cap.
        max: u32,
    },
}

/// Counts a port's open connections, in all and per source address, and
/// refuses those over a cap. Shared by the port's threads.
#[derive(Debug)]
pub struct ConnectionGate {
    max: u32,
    /// Per source address; 0 for no cap.
    per_address: u32,
    open: AtomicU32,
    /// Open connections per address, kept only while there is a cap (and
    /// an entry only while the address has a connection, so the map is no
    /// bigger than the port's connections).
    by_address: Mutex<HashMap<IpAddr, u32>>,
}

impl ConnectionGate {
    /// A gate taking at most `max` connections, and `per_address` from one
    /// address (0: no per-address cap).
    pub fn new(max: u32, per_address: u32) -> Arc<Self> {
        Arc::new(Self { max, per_address, open: AtomicU32::new(0), by_address: Mutex::new(HashMap::new()) })
    }

    /// Takes a connection from `ip`, or says why not. The permit gives its
    /// place back when dropped.
    pub fn admit(self: &Arc<Self>, ip: IpAddr) -> Result<GatePermit, Refusal> {
        let admitted = self.open.fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| (n < self.max).then_some(n + 1));
        if admitted.is_err() {
            return Err(Refusal::PortFull { max: self.max });
        }
        if self.per_address > 0 {
            let mut by_address = self.by_address.lock().unwrap_or_else(PoisonError::into_inner);
            let count = by_address.entry(ip).or_insert(0);
            if *count >= self.per_address {
                drop(by_address);
                self.open.fetch_sub(1, Ordering::AcqRel);
                return Err(Refusal::AddressFull { ip, max: self.per_address });
            }
            *count += 1;
        }
        Ok(GatePermit { gate: self.clone(), ip })
    }

    /// Connections open through this gate.
    pub fn open(&self) -> u32 {
        self.open.load(Ordering::Acquire)
    }
}

/// A connection's place under its port's caps.
#[derive(Debug)]
pub struct GatePermit {
    gate: Arc<ConnectionGate>,
    ip: IpAddr,
}

impl Drop for GatePermit {
    fn drop(&mut self) {
        if self.gate.per_address > 0 {
            let mut by_address = self.gate.by_address.lock().unwrap_or_else(PoisonError::into_inner);
            if let Some(count) = by_address.get_mut(&self.ip) {
                *count -= 1;
                if *count == 0 {
                    by_address.remove(&self.ip);
                }
            }
        }
        self.gate.open.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Lets a log line through at most once per interval, counting the ones
/// held back: a flood of refusals or bad attempts must not become a flood
/// of log lines (the log is a resource an attacker could otherwise fill).
#[derive(Debug)]
pub struct LogLimiter {
    interval_ms: u64,
    /// `now` after which the next line may go out; 0 before the first.
    next_ms: AtomicU64,
    suppressed: AtomicU64,
}

impl LogLimiter {
    /// At most one line per `interval_ms`.
    pub const fn new(interval_ms: u64) -> Self {
        Self { interval_ms, next_ms: AtomicU64::new(0), suppressed: AtomicU64::new(0) }
    }

    /// Whether a line may be logged at `now_ms`: `Some(n)` with the number
    /// of lines held back since the last one let through, `None` to hold
    /// this one back (it is counted).
    pub fn check(&self, now_ms: u64) -> Option<u64> {
        let next = self.next_ms.load(Ordering::Acquire);
        if now_ms >= next
            && self
                .next_ms
                .compare_exchange(next, now_ms + self.interval_ms, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
        {
            return Some(self.suppressed.swap(0, Ordering::AcqRel));
        }
        self.suppressed.fetch_add(1, Ordering::AcqRel);
        None
    }
}

/// Handshakes begun on one thread in the current second, to tell when a
/// burst calls for address validation (a QUIC Retry) first.
#[derive(Debug)]
pub struct HandshakeRate {
    per_second: u32,
    /// The second counted, as `now_ms / 1000`.
    second: u64,
    count: u32,
}

impl HandshakeRate {
    /// Bursts are handshakes beyond `per_second` in one second (0: all).
    pub fn new(per_second: u32) -> Self {
        Self { per_second, second: 0, count: 0 }
    }

    /// Counts a handshake at `now_ms`; true if it is beyond the rate (the
    /// client should then validate its address first; it is not counted,
    /// since its retried attempt comes back validated).
    pub fn over(&mut self, now_ms: u64) -> bool {
        let second = now_ms / 1000;
        if second != self.second {
            self.second = second;
            self.count = 0;
        }
        if self.count >= self.per_second {
            return true;
        }
        self.count += 1;
        false
    }
}

/// Why a client was cut off or turned away, for metrics.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Cutoff {
    /// A command over the query buffer limit.
    QueryLimit,
    /// Replies queued past the output limit, or not read for the output
    /// timeout.
    OutputLimit,
    /// Silent for the idle timeout.
    Idle,
    /// Refused at the port's connection cap.
    PortFull,
    /// Refused at the per-address connection cap.
    AddressFull,
}

impl Cutoff {
    /// Every reason, in [`Cutoff::index`] order.
    pub const ALL: [Self; 5] = [Self::QueryLimit, Self::OutputLimit, Self::Idle, Self::PortFull, Self::AddressFull];

    /// The metric label.
    pub fn label(self) -> &'static str {
        match self {
            Self::QueryLimit => "query_limit",
            Self::OutputLimit => "output_limit",
            Self::Idle => "idle",
            Self::PortFull => "port_full",
            Self::AddressFull => "address_full",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

impl From<&Refusal> for Cutoff {
    fn from(refusal: &Refusal) -> Self {
        match refusal {
            Refusal::PortFull { .. } => Self::PortFull,
            Refusal::AddressFull { .. } => Self::AddressFull,
        }
    }
}

/// Clients cut off or turned away, by reason, over both ports.
#[derive(Debug)]
pub struct ClientCounters {
    counts: [AtomicU64; Cutoff::ALL.len()],
    /// QUIC handshakes answered with a Retry (address validation).
    retries: AtomicU64,
    /// RESP AUTH attempts that failed.
    auth_failures: AtomicU64,
    /// Failed-AUTH log lines, one a second at most.
    pub auth_log: LogLimiter,
    /// Refusal log lines, one a second at most.
    pub refusal_log: LogLimiter,
}

impl Default for ClientCounters {
    fn default() -> Self {
        Self {
            counts: Default::default(),
            retries: AtomicU64::new(0),
            auth_failures: AtomicU64::new(0),
            auth_log: LogLimiter::new(1_000),
            refusal_log: LogLimiter::new(1_000),
        }
    }
}

impl ClientCounters {
    /// Counts one client cut off for `why`.
    pub fn count(&self, why: Cutoff) {
        self.counts[why.index()].fetch_add(1, Ordering::Relaxed);
    }

    /// Counts a handshake answered with a Retry.
    pub fn count_retry(&self) {
        self.retries.fetch_add(1, Ordering::Relaxed);
    }

    /// Counts a failed AUTH.
    pub fn count_auth_failure(&self) {
        self.auth_failures.fetch_add(1, Ordering::Relaxed);
    }

    /// AUTH attempts that failed so far.
    pub fn auth_failures(&self) -> u64 {
        self.auth_failures.load(Ordering::Relaxed)
    }

    /// Handshakes answered with a Retry so far.
    pub fn retries(&self) -> u64 {
        self.retries.load(Ordering::Relaxed)
    }

    /// Clients cut off for `why` so far.
    pub fn get(&self, why: Cutoff) -> u64 {
        self.counts[why.index()].load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_gate_caps_the_port_and_each_address() {
        let gate = ConnectionGate::new(3, 2);
        let a: IpAddr = "127.0.0.2".parse().expect("ip");
        let b: IpAddr = "127.0.0.3".parse().expect("ip");
        let first = gate.admit(a).expect("first");
        let _second = gate.admit(a).expect("second");
        assert_eq!(gate.admit(a).err(), Some(Refusal::AddressFull { ip: a, max: 2 }));
        let _third = gate.admit(b).expect("another address");
        assert_eq!(gate.admit(b).err(), Some(Refusal::PortFull { max: 3 }));
        assert_eq!(gate.open(), 3, "refusals hold no place");
        drop(first);
        assert_eq!(gate.open(), 2);
        let _again = gate.admit(a).expect("a place given back is taken again");
        let by_address = gate.by_address.lock().expect("lock");
        assert_eq!((by_address.get(&a), by_address.get(&b)), (Some(&2), Some(&1)));
    }

    #[test]
    fn no_address_cap_keeps_no_map() {
        let gate = ConnectionGate::new(10, 0);
        let ip: IpAddr = "::1".parse().expect("ip");
        let permits: Vec<_> = (0..10).map(|_| gate.admit(ip).expect("under the port cap")).collect();
        assert!(gate.by_address.lock().expect("lock").is_empty());
        assert_eq!(gate.admit(ip).err(), Some(Refusal::PortFull { max: 10 }));
        drop(permits);
        assert_eq!(gate.open(), 0);
    }

    #[test]
    fn handshakes_beyond_the_rate_are_told_to_retry() {
        let mut rate = HandshakeRate::new(3);
        assert_eq!((0..5).map(|i| rate.over(1_000 + i)).collect::<Vec<_>>(), [false, false, false, true, true]);
        assert!(!rate.over(2_000), "a new second");
        let mut always = HandshakeRate::new(0);
        assert!(always.over(0) && always.over(5_000));
    }

    #[test]
    fn the_log_limiter_lets_one_line_through_per_interval() {
        let limiter = LogLimiter::new(1_000);
        assert_eq!(limiter.check(5), Some(0));
        assert_eq!((0..500).filter(|i| limiter.check(6 + i).is_some()).count(), 0, "a flood within the second");
        assert_eq!(limiter.check(1_004), None, "still within the second");
        assert_eq!(limiter.check(1_005), Some(501), "the next line says how many were held back");
        assert_eq!(limiter.check(9_000), Some(0));
    }
}
