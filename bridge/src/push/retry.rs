//! When to try a failed send again: exponential backoff from
//! `push.retry_base_ms`, with jitter, at least what Retry-After asked,
//! never more than `push.retry_max_ms`, at most `push.retry_max_attempts`.

use std::collections::hash_map::RandomState;
use std::hash::{BuildHasher, Hasher};
use std::time::Duration;

#[derive(Debug, Clone, Copy)]
pub(super) struct RetryPolicy {
    pub max_attempts: u32,
    pub base: Duration,
    pub max: Duration,
}

impl RetryPolicy {
    pub(super) fn from_settings(s: &chatmq_config::Push) -> RetryPolicy {
        RetryPolicy {
            max_attempts: s.retry_max_attempts.max(1),
            base: Duration::from_millis(s.retry_base_ms),
            max: Duration::from_millis(s.retry_max_ms),
        }
    }

    /// The wait after failed attempt number `attempt` (1-based). `unit` in
    /// [0, 1) picks the jitter: the wait is between half and all of the
    /// exponential step ("equal jitter"), so clients that failed together
    /// do not retry together.
    pub(super) fn delay(&self, attempt: u32, retry_after: Option<Duration>, unit: f64) -> Duration {
        let step = self
            .base
            .saturating_mul(1u32 << attempt.saturating_sub(1).min(20))
            .min(self.max);
        let jittered = step.mul_f64(0.5 + 0.5 * unit.clamp(0.0, 1.0));
        jittered.max(retry_after.unwrap_or_default()).min(self.max)
    }
}

/// A number in [0, 1) that differs from call to call (std's per-instance
/// random hash keys; no random crate needed for jitter).
pub(super) fn jitter_unit() -> f64 {
    let mut h = RandomState::new().build_hasher();
    h.write_u8(0);
    (h.finish() >> 11) as f64 / (1u64 << 53) as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> RetryPolicy {
        RetryPolicy {
            max_attempts: 5,
            base: Duration::from_millis(100),
            max: Duration::from_millis(1000),
        }
    }

    #[test]
    fn delays_double_with_jitter_up_to_the_cap() {
        let p = policy();
        let ms = |a, unit| p.delay(a, None, unit).as_millis();
        assert_eq!((ms(1, 0.0), ms(1, 1.0)), (50, 100));
        assert_eq!((ms(2, 0.0), ms(2, 1.0)), (100, 200));
        assert_eq!((ms(4, 0.0), ms(4, 1.0)), (400, 800));
        assert_eq!(ms(5, 1.0), 1000, "capped");
        assert_eq!(ms(40, 1.0), 1000, "no overflow");
    }

    #[test]
    fn retry_after_is_honoured_within_the_cap() {
        let p = policy();
        let after = |s| Some(Duration::from_millis(s));
        assert_eq!(p.delay(1, after(700), 0.0).as_millis(), 700);
        assert_eq!(p.delay(1, after(60_000), 0.0).as_millis(), 1000);
    }

    #[test]
    fn jitter_varies_within_its_range() {
        let units: Vec<f64> = (0..50).map(|_| jitter_unit()).collect();
        assert!(units.iter().all(|u| (0.0..1.0).contains(u)));
        assert!(units.iter().any(|u| *u != units[0]));
    }
}
