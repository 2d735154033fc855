//! Reconnect delays: exponential backoff with jitter, capped.
//!
//! A phone that lost its broker must neither hammer it (every client of a
//! restarted broker retrying at once) nor wait minutes once it is back.
//! Delays double from `base` up to `cap`; each one is drawn uniformly from
//! its upper half ("equal jitter"), so clients spread out but never retry
//! sooner than half the nominal delay. A successful connection resets it.

use std::collections::hash_map::RandomState;
use std::hash::{BuildHasher, Hasher};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// The delay before each reconnect attempt.
#[derive(Debug, Clone)]
pub struct Backoff {
    base: Duration,
    cap: Duration,
    attempt: u32,
}

impl Backoff {
    pub fn new(base: Duration, cap: Duration) -> Backoff {
        Backoff {
            base,
            cap: cap.max(base),
            attempt: 0,
        }
    }

    /// The nominal delay of the next attempt, before jitter.
    pub fn nominal(&self) -> Duration {
        let factor = 1u32.checked_shl(self.attempt).unwrap_or(u32::MAX);
        self.base.saturating_mul(factor).min(self.cap)
    }

    /// The delay to wait now; the next one will be twice as long (up to the cap).
    pub fn next_delay(&mut self) -> Duration {
        let nominal = self.nominal();
        self.attempt = self.attempt.saturating_add(1);
        let half = nominal / 2;
        let spread = u64::try_from(half.as_micros()).unwrap_or(u64::MAX);
        let jitter = if spread == 0 {
            0
        } else {
            random_u64() % (spread + 1)
        };
        half + Duration::from_micros(jitter)
    }

    /// Called once connected: the next loss starts again from `base`.
    pub fn reset(&mut self) {
        self.attempt = 0;
    }
}

/// 64 unpredictable bits from the standard library (no `rand` in the
/// workspace): `RandomState` keys are seeded from the OS per process and
/// advanced per instance; the clock and the process id are mixed in.
pub fn random_u64() -> u64 {
    let mut h = RandomState::new().build_hasher();
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or_default();
    h.write_u128(nanos);
    h.write_u32(std::process::id());
    h.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    const BASE: Duration = Duration::from_millis(250);
    const CAP: Duration = Duration::from_secs(10);

    #[test]
    fn delays_double_from_the_base_up_to_the_cap() {
        let mut b = Backoff::new(BASE, CAP);
        let mut nominals = Vec::new();
        for _ in 0..10 {
            nominals.push(b.nominal().as_millis());
            b.next_delay();
        }
        assert_eq!(
            nominals,
            [250, 500, 1000, 2000, 4000, 8000, 10_000, 10_000, 10_000, 10_000]
        );
    }

    #[test]
    fn each_delay_lies_in_the_upper_half_of_its_nominal_value() {
        let mut b = Backoff::new(BASE, CAP);
        for _ in 0..40 {
            let nominal = b.nominal();
            let d = b.next_delay();
            assert!(d >= nominal / 2 && d <= nominal, "{d:?} for {nominal:?}");
        }
    }

    #[test]
    fn jitter_spreads_the_delays() {
        let delays: std::collections::HashSet<Duration> = (0..20)
            .map(|_| Backoff::new(CAP, CAP).next_delay())
            .collect();
        assert!(
            delays.len() > 1,
            "20 clients would retry in lockstep: {delays:?}"
        );
    }

    #[test]
    fn a_reset_starts_again_from_the_base() {
        let mut b = Backoff::new(BASE, CAP);
        for _ in 0..5 {
            b.next_delay();
        }
        b.reset();
        assert_eq!(b.nominal(), BASE);
        assert!(b.next_delay() <= BASE);
    }

    #[test]
    fn many_failures_never_overflow() {
        let mut b = Backoff::new(BASE, CAP);
        for _ in 0..1000 {
            assert!(b.next_delay() <= CAP);
        }
    }
}
