//! The arithmetic of refreshing: when an entry counts as stale, when to
//! refresh it early (XFetch), and TTL jitter. Pure functions of their inputs
//! and a random draw, so their shape is tested statistically with a fixed
//! seed.

/// A small seeded generator (SplitMix64), shared by a node's namespaces
/// through an atomic counter, so draws need no lock and a seed replays.
pub(crate) fn mix(state: u64) -> u64 {
    let mut z = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// A draw in (0, 1]: never 0, so `ln` stays finite.
pub fn unit(bits: u64) -> f64 {
    ((bits >> 11) as f64 + 1.0) / (1u64 << 53) as f64
}

/// Where a loaded entry stands at `now`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Freshness {
    /// Serve it; nothing to do.
    Fresh,
    /// Serve it and refresh it in the background: early (XFetch) or past its
    /// soft expiry, inside the grace window.
    Refresh,
}

/// Decides whether a hit on an entry expiring (hard) at `expires_at`, with
/// a stale-while-revalidate `grace_ms` before that, should start a refresh.
///
/// Past the soft expiry (`expires_at - grace_ms`) it always should. Before
/// it, XFetch (Vattani et al., "Optimal probabilistic cache stampede
/// prevention") refreshes when `now - load_ms * beta * ln(u) >= soft`: the
/// chance is `exp(-remaining / (load_ms * beta))`, rising to 1 as expiry
/// nears and sooner for values that take long to load. `beta = 0` or an
/// unmeasured load time turns early refresh off.
pub fn freshness(now: u64, expires_at: u64, grace_ms: u64, load_ms: u32, beta: f64, u: f64) -> Freshness {
    let soft = expires_at.saturating_sub(grace_ms);
    if now >= soft {
        return Freshness::Refresh;
    }
    if beta <= 0.0 || load_ms == 0 {
        return Freshness::Fresh;
    }
    let lead = f64::from(load_ms) * beta * -u.ln();
    if now as f64 + lead >= soft as f64 { Freshness::Refresh } else { Freshness::Fresh }
}

/// `ttl_ms` spread by up to `±jitter` (a fraction), so keys loaded together
/// do not all expire together. Never below 1 ms.
pub fn jittered(ttl_ms: u64, jitter: f64, u: f64) -> u64 {
    if jitter <= 0.0 {
        return ttl_ms.max(1);
    }
    let factor = 1.0 + jitter.min(1.0) * (2.0 * u - 1.0);
    ((ttl_ms as f64 * factor).round() as u64).max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn draws(seed: u64, n: usize) -> impl Iterator<Item = f64> {
        (0..n as u64).map(move |i| unit(mix(seed.wrapping_add(i.wrapping_mul(0x9E37_79B9_7F4A_7C15)))))
    }

    #[test]
    fn past_the_soft_expiry_always_refreshes() {
        assert_eq!(freshness(900, 1000, 100, 0, 0.0, 0.5), Freshness::Refresh);
        assert_eq!(freshness(899, 1000, 100, 0, 0.0, 0.5), Freshness::Fresh);
        assert_eq!(freshness(999, 1000, 0, 0, 0.0, 0.5), Freshness::Fresh);
        assert_eq!(freshness(1000, 1000, 0, 0, 0.0, 0.5), Freshness::Refresh);
    }

    /// The empirical refresh rate at several distances from expiry matches
    /// `exp(-remaining / (load * beta))` within sampling error, and rises
    /// monotonically as expiry nears.
    #[test]
    fn xfetch_follows_the_exponential_shape() {
        let (expiry, load, beta) = (100_000u64, 50u32, 1.5f64);
        let n = 20_000;
        let mut previous = -1.0;
        for remaining in [400u64, 200, 100, 50, 20, 5] {
            let now = expiry - remaining;
            let hits = draws(remaining, n).filter(|&u| freshness(now, expiry, 0, load, beta, u) == Freshness::Refresh);
            let rate = hits.count() as f64 / n as f64;
            let expected = (-(remaining as f64) / (f64::from(load) * beta)).exp();
            let sigma = (expected * (1.0 - expected) / n as f64).sqrt();
            assert!((rate - expected).abs() <= 4.0 * sigma + 1e-3, "remaining {remaining}: {rate} vs {expected}");
            assert!(rate > previous, "the rate must rise as expiry nears");
            previous = rate;
        }
    }

    #[test]
    fn xfetch_off_without_beta_or_load_time() {
        assert_eq!(freshness(999, 1000, 0, 50, 0.0, 1e-9), Freshness::Fresh);
        assert_eq!(freshness(999, 1000, 0, 0, 1.0, 1e-9), Freshness::Fresh);
    }

    #[test]
    fn jitter_stays_in_bounds_and_spreads() {
        let ttls: Vec<u64> = draws(7, 10_000).map(|u| jittered(10_000, 0.1, u)).collect();
        assert!(ttls.iter().all(|&t| (9_000..=11_000).contains(&t)));
        let mean = ttls.iter().sum::<u64>() as f64 / ttls.len() as f64;
        assert!((mean - 10_000.0).abs() < 50.0, "mean {mean}");
        let distinct: std::collections::HashSet<_> = ttls.iter().collect();
        assert!(distinct.len() > 1_000);
        assert_eq!(jittered(10_000, 0.0, 0.3), 10_000);
        assert_eq!(jittered(1, 1.0, 0.0), 1);
    }
}
