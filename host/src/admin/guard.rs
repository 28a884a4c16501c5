//! Failed admin attempts: who may keep guessing, and for how long.
//!
//! Two budgets, both sans-IO (every call takes `now`, so the tests do not
//! sleep):
//! - one per source address: [`MAX_FAILURES`] wrong tokens within
//!   [`FAILURE_WINDOW`] refuse that address for [`BACKOFF`]. A guesser on
//!   one address cannot lock the operator, on another, out.
//! - one for the node: [`NODE_MAX_FAILURES`] wrong tokens from all sources
//!   within the window refuse everyone for the back-off. A guesser with
//!   many addresses does not get many budgets: at most
//!   [`NODE_MAX_FAILURES`] guesses a minute, at the price that such a
//!   flood also holds the operator off for [`BACKOFF`].
//!
//! The per-address table is bounded ([`MAX_SOURCES`]); when it is full of
//! live entries, a new address's failures count toward the node's budget
//! only.

use crate::clients::LogLimiter;
use std::collections::HashMap;
use std::net::IpAddr;
use std::time::{Duration, Instant};

/// Wrong tokens from one address within [`FAILURE_WINDOW`] that start its
/// back-off.
pub(crate) const MAX_FAILURES: u32 = 10;
/// Wrong tokens from all addresses within [`FAILURE_WINDOW`] that start a
/// back-off for everyone.
pub(crate) const NODE_MAX_FAILURES: u32 = 100;
/// How far back failures count.
pub(crate) const FAILURE_WINDOW: Duration = Duration::from_secs(60);
/// How long attempts are refused once a budget is spent.
pub(crate) const BACKOFF: Duration = Duration::from_secs(30);
/// Addresses tracked at most.
pub(crate) const MAX_SOURCES: usize = 4096;

/// Where an admin attempt came from: a client's address, or `None` for a
/// caller inside the process (tools, tests), which has a budget of its own.
pub(crate) type Source = Option<IpAddr>;

/// Failures in the current window and any back-off they started.
#[derive(Debug, Default, Clone, Copy)]
struct Budget {
    /// Start of the current counting window and the failures in it.
    window: Option<(Instant, u32)>,
    /// Attempts are refused until then.
    blocked_until: Option<Instant>,
}

impl Budget {
    /// The back-off left at `now`, if one is running.
    fn blocked(&self, now: Instant) -> Option<Duration> {
        self.blocked_until.filter(|&until| now < until).map(|until| until - now)
    }

    /// Records a wrong token at `now`; the `max`th in a window starts the
    /// back-off (and a new window after it).
    fn fail(&mut self, now: Instant, max: u32) {
        let (start, count) = match self.window {
            Some((start, count)) if now.saturating_duration_since(start) < FAILURE_WINDOW => (start, count + 1),
            _ => (now, 1),
        };
        if count >= max {
            self.blocked_until = Some(now + BACKOFF);
            self.window = None;
        } else {
            self.window = Some((start, count));
        }
    }

    /// Whether it still matters at `now`: a back-off runs or its window
    /// counts failures.
    fn live(&self, now: Instant) -> bool {
        self.blocked(now).is_some()
            || self.window.is_some_and(|(start, _)| now.saturating_duration_since(start) < FAILURE_WINDOW)
    }
}

/// The node's guard against token guessing. See the module docs.
#[derive(Debug)]
pub(crate) struct TokenGuard {
    node: Budget,
    by_source: HashMap<Source, Budget>,
    /// Refusals are logged at most once a second.
    log: LogLimiter,
    /// The zero of the log limiter's milliseconds.
    epoch: Instant,
}

impl Default for TokenGuard {
    fn default() -> Self {
        Self { node: Budget::default(), by_source: HashMap::new(), log: LogLimiter::new(1_000), epoch: Instant::now() }
    }
}

impl TokenGuard {
    /// The back-off `source` must wait out at `now`, if any: its own or the
    /// node's, whichever ends later.
    pub(crate) fn blocked(&self, now: Instant, source: Source) -> Option<Duration> {
        let own = self.by_source.get(&source).and_then(|b| b.blocked(now));
        own.max(self.node.blocked(now))
    }

    /// Records a wrong token from `source` at `now`.
    pub(crate) fn fail(&mut self, now: Instant, source: Source) {
        self.node.fail(now, NODE_MAX_FAILURES);
        if self.by_source.len() >= MAX_SOURCES && !self.by_source.contains_key(&source) {
            self.by_source.retain(|_, budget| budget.live(now));
        }
        if self.by_source.len() < MAX_SOURCES || self.by_source.contains_key(&source) {
            self.by_source.entry(source).or_default().fail(now, MAX_FAILURES);
        }
    }

    /// `Some(n)` when a refusal at `now` should be logged, `n` being how
    /// many were held back since the last line.
    pub(crate) fn log_refusal(&self, now: Instant) -> Option<u64> {
        let ms = now.saturating_duration_since(self.epoch).as_millis();
        self.log.check(u64::try_from(ms).unwrap_or(u64::MAX))
    }

    #[cfg(test)]
    fn sources(&self) -> usize {
        self.by_source.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv4Addr;

    fn addr(i: u32) -> Source {
        Some(IpAddr::V4(Ipv4Addr::from(0x0a00_0000 + i)))
    }

    /// Ten wrong tokens from one address within a minute start a 30 s
    /// back-off for it; failures spread wider than the window do not add
    /// up; the back-off ends by itself.
    #[test]
    fn failed_attempts_are_throttled() {
        let t0 = Instant::now();
        let mut guard = TokenGuard::default();
        let a = addr(1);
        for i in 0..MAX_FAILURES - 1 {
            let at = t0 + Duration::from_secs(u64::from(i));
            guard.fail(at, a);
            assert_eq!(guard.blocked(at, a), None, "blocked after {} failures", i + 1);
        }
        // The window has moved past the first failures: no back-off yet.
        let late = t0 + FAILURE_WINDOW + Duration::from_secs(1);
        guard.fail(late, a);
        assert_eq!(guard.blocked(late, a), None);
        for i in 1..MAX_FAILURES {
            assert_eq!(guard.blocked(late, a), None, "blocked after {i} failures in the window");
            guard.fail(late, a);
        }
        assert_eq!(guard.blocked(late, a), Some(BACKOFF));
        assert_eq!(guard.blocked(late + BACKOFF - Duration::from_millis(1), a), Some(Duration::from_millis(1)));
        assert_eq!(guard.blocked(late + BACKOFF, a), None);
    }

    /// A guesser on one address does not lock out the operator on
    /// another.
    #[test]
    fn one_address_guessing_leaves_the_others_in() {
        let now = Instant::now();
        let mut guard = TokenGuard::default();
        for _ in 0..MAX_FAILURES {
            guard.fail(now, addr(1));
        }
        assert_eq!(guard.blocked(now, addr(1)), Some(BACKOFF));
        assert_eq!(guard.blocked(now, addr(2)), None, "another address is not throttled");
        assert_eq!(guard.blocked(now, None), None, "nor a caller in the process");
    }

    /// Many addresses share the node's budget: the hundredth wrong token
    /// within a minute, from wherever, refuses everyone.
    #[test]
    fn many_addresses_share_the_nodes_budget() {
        let now = Instant::now();
        let mut guard = TokenGuard::default();
        for i in 0..NODE_MAX_FAILURES - 1 {
            guard.fail(now, addr(i));
        }
        assert_eq!(guard.blocked(now, addr(5_000)), None);
        guard.fail(now, addr(NODE_MAX_FAILURES));
        assert_eq!(guard.blocked(now, addr(5_000)), Some(BACKOFF), "the node's budget is spent");
        assert_eq!(guard.blocked(now + BACKOFF, addr(5_000)), None);
    }

    /// The table of addresses stays bounded: stale entries are dropped
    /// when it fills, and a full table of live ones still counts new
    /// addresses' failures toward the node's budget.
    #[test]
    fn the_address_table_is_bounded() {
        let t0 = Instant::now();
        let mut guard = TokenGuard::default();
        for i in 0..MAX_SOURCES as u32 {
            guard.fail(t0, addr(i));
            // Keeps the node's budget out of the way of this test.
            guard.node = Budget::default();
        }
        assert_eq!(guard.sources(), MAX_SOURCES);
        guard.fail(t0, addr(1 << 20));
        assert_eq!(guard.sources(), MAX_SOURCES, "full of live entries: the new address is not tracked");
        let later = t0 + FAILURE_WINDOW + Duration::from_secs(1);
        guard.fail(later, addr(1 << 20));
        assert_eq!(guard.sources(), 1, "stale entries were dropped");
    }

    /// A flood of refusals is logged once a second.
    #[test]
    fn refusals_are_logged_at_a_bounded_rate() {
        let guard = TokenGuard::default();
        let t0 = guard.epoch;
        assert_eq!(guard.log_refusal(t0), Some(0));
        let logged: Vec<_> = (1..=1000).filter_map(|ms| guard.log_refusal(t0 + Duration::from_millis(ms))).collect();
        assert_eq!(logged, vec![999], "one line at 1 s, counting the 999 before it");
    }
}
