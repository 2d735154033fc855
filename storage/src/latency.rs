//! How long group commits take: a fixed-bucket histogram of atomics that
//! the writer thread records into and anyone can read without a lock.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Upper bounds of the buckets, in seconds (Prometheus `le` values).
pub const COMMIT_BUCKETS: [f64; 12] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
];

/// Commit durations recorded so far.
#[derive(Default)]
pub(crate) struct CommitLatency {
    /// Commits whose duration fell in each bucket (not cumulative); the
    /// last slot counts those above every bound.
    buckets: [AtomicU64; COMMIT_BUCKETS.len() + 1],
    count: AtomicU64,
    sum_nanos: AtomicU64,
}

impl CommitLatency {
    pub(crate) fn record(&self, took: Duration) {
        let secs = took.as_secs_f64();
        let slot = COMMIT_BUCKETS
            .iter()
            .position(|bound| secs <= *bound)
            .unwrap_or(COMMIT_BUCKETS.len());
        self.buckets[slot].fetch_add(1, Ordering::Relaxed);
        let nanos = u64::try_from(took.as_nanos()).unwrap_or(u64::MAX);
        self.sum_nanos.fetch_add(nanos, Ordering::Relaxed);
        self.count.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn snapshot(&self) -> LatencySnapshot {
        let mut cumulative = Vec::with_capacity(COMMIT_BUCKETS.len());
        let mut running = 0;
        for (bound, bucket) in COMMIT_BUCKETS.iter().zip(&self.buckets) {
            running += bucket.load(Ordering::Relaxed);
            cumulative.push((*bound, running));
        }
        let above = self.buckets[COMMIT_BUCKETS.len()].load(Ordering::Relaxed);
        LatencySnapshot {
            buckets: cumulative,
            // Read from the buckets so that count and buckets agree even
            // while the writer records.
            count: running + above,
            sum_secs: self.sum_nanos.load(Ordering::Relaxed) as f64 / 1e9,
        }
    }
}

/// A copy of the commit-latency histogram, in Prometheus' shape.
#[derive(Debug, Clone, PartialEq)]
pub struct LatencySnapshot {
    /// (upper bound in seconds, commits at or below it), cumulative.
    pub buckets: Vec<(f64, u64)>,
    /// Every commit recorded (the `+Inf` bucket).
    pub count: u64,
    /// Total time of all commits, in seconds.
    pub sum_secs: f64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_are_cumulative_and_count_everything() {
        let h = CommitLatency::default();
        h.record(Duration::from_micros(100));
        h.record(Duration::from_micros(500));
        h.record(Duration::from_millis(3));
        h.record(Duration::from_secs(5));
        let s = h.snapshot();
        assert_eq!(s.count, 4);
        assert_eq!(s.buckets[0], (0.0005, 2), "<= 0.5 ms, bound included");
        assert_eq!(s.buckets[2], (0.0025, 2));
        assert_eq!(s.buckets[3], (0.005, 3));
        assert_eq!(s.buckets.last(), Some(&(2.5, 3)), "5 s is only in +Inf");
        assert!((s.sum_secs - 5.0036).abs() < 1e-9, "{}", s.sum_secs);
    }
}
