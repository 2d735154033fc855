//! When to try a failed send again: exponential backoff from
//! `push.retry_base_ms` with equal jitter ([`chatmq_backoff`]), at least
//! what Retry-After asked, never more than `push.retry_max_ms`, at most
//! `push.retry_max_attempts`.

use std::time::Duration;

use chatmq_backoff::Backoff;

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

    /// The delays of one send's retries.
    pub(super) fn backoff(&self) -> Backoff {
        Backoff::new(self.base, self.max)
    }

    /// The wait before the next attempt: the backoff's next delay, or the
    /// provider's Retry-After if longer, within `push.retry_max_ms`.
    pub(super) fn wait(&self, backoff: &mut Backoff, retry_after: Option<Duration>) -> Duration {
        backoff
            .next_delay()
            .max(retry_after.unwrap_or_default())
            .min(self.max)
    }
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
    fn waits_grow_and_stay_under_the_cap() {
        let p = policy();
        let mut b = p.backoff();
        let waits: Vec<u128> = (0..8).map(|_| p.wait(&mut b, None).as_millis()).collect();
        assert!((50..=100).contains(&waits[0]), "{waits:?}");
        assert!((400..=800).contains(&waits[3]), "{waits:?}");
        assert!(waits.iter().all(|w| *w <= 1000), "{waits:?}");
    }

    #[test]
    fn retry_after_is_honoured_within_the_cap() {
        let p = policy();
        let after = |s| Some(Duration::from_millis(s));
        assert_eq!(p.wait(&mut p.backoff(), after(700)).as_millis(), 700);
        assert_eq!(p.wait(&mut p.backoff(), after(60_000)).as_millis(), 1000);
    }
}
