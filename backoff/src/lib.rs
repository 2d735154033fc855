//! chatmq-backoff: how long to wait before trying again, for everything in
//! chatmq that retries (the push gateway's sends, `chatmq-cli`'s
//! reconnects).
//!
//! Delays double from `base` up to `cap`; each is drawn uniformly from the
//! upper half of its nominal value ("equal jitter"), so clients that failed
//! together spread out but none retries sooner than half the nominal
//! delay, and no delay is ever above `cap`. A success resets it.
//!
//! Hand-written rather than `backon`: backon's jitter adds up to a whole
//! delay on top of it, so a jittered wait can pass its `max_delay`
//! (`push.retry_max_ms` is documented as a cap), and neither of our two
//! users wants its retry loop: the gateway sleeps between attempts it
//! counts itself, the client reconnects from its own event loop.

use std::time::Duration;

/// The delays before each retry of one operation.
#[derive(Debug, Clone)]
pub struct Backoff {
    base: Duration,
    cap: Duration,
    /// Delays handed out since the last reset.
    attempt: u32,
}

impl Backoff {
    /// Starts at `base`, doubling up to `cap` (at least `base`).
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

    /// The delay to wait now, with random jitter; the next one is twice as
    /// long (up to the cap).
    pub fn next_delay(&mut self) -> Duration {
        self.next_delay_with(fastrand::f64())
    }

    /// [`Backoff::next_delay`] with the jitter picked by `unit` in [0, 1]:
    /// 0 waits half the nominal delay, 1 all of it (for tests).
    pub fn next_delay_with(&mut self, unit: f64) -> Duration {
        let nominal = self.nominal();
        self.attempt = self.attempt.saturating_add(1);
        // NaN and values outside [0, 1] are no jitter, never a panic.
        let unit = if (0.0..=1.0).contains(&unit) {
            unit
        } else {
            0.0
        };
        let half = nominal / 2;
        half + half.mul_f64(unit)
    }

    /// Called on success: the next failure starts again from `base`.
    pub fn reset(&mut self) {
        self.attempt = 0;
    }
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
    fn the_jitter_picks_within_the_upper_half() {
        let ms = |attempts: u32, unit| {
            let mut b = Backoff::new(Duration::from_millis(100), Duration::from_millis(1000));
            for _ in 1..attempts {
                b.next_delay();
            }
            b.next_delay_with(unit).as_millis()
        };
        assert_eq!((ms(1, 0.0), ms(1, 1.0)), (50, 100));
        assert_eq!((ms(2, 0.0), ms(2, 1.0)), (100, 200));
        assert_eq!((ms(4, 0.0), ms(4, 1.0)), (400, 800));
        assert_eq!(ms(5, 1.0), 1000, "capped");
        assert_eq!(ms(40, 1.0), 1000, "capped, no overflow");
        assert_eq!(ms(1, f64::NAN), 50, "no jitter, no panic");
        assert_eq!(ms(1, 7.0), 50);
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
