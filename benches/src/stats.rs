//! Counting at the receivers: messages, duplicates, and latency from the
//! time each message was due (open loop, so a stalled broker cannot hide
//! its stall: coordinated omission is corrected by construction).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use hdrhistogram::Histogram;

use crate::probe::{now_ns, Probe};

/// Latencies are recorded in microseconds, 1 µs to 100 s, 3 significant digits.
pub fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 100_000_000, 3)
        .unwrap_or_else(|_| Histogram::new(3).unwrap_or_else(|_| unreachable!()))
}

/// The measurement window, shared by every task of a run.
pub struct Window {
    pub start_ns: AtomicU64,
    pub end_ns: AtomicU64,
    /// Receipts so far, for the progress bar.
    pub received: AtomicU64,
}

impl Window {
    pub fn new() -> Arc<Window> {
        Arc::new(Window {
            start_ns: AtomicU64::new(u64::MAX),
            end_ns: AtomicU64::new(u64::MAX),
            received: AtomicU64::new(0),
        })
    }

    pub fn contains(&self, t: u64) -> bool {
        t >= self.start_ns.load(Ordering::Relaxed) && t < self.end_ns.load(Ordering::Relaxed)
    }
}

/// What one receiving connection saw.
pub struct Receipts {
    /// Unique messages received, whenever.
    pub unique: u64,
    /// Unique messages that arrived inside the window.
    pub in_window: u64,
    pub duplicates: u64,
    /// Payloads that carried no probe.
    pub foreign: u64,
    /// Delivery latency of messages due inside the window, µs.
    pub latency: Histogram<u64>,
    seen: HashMap<u32, Vec<u64>>,
}

impl Default for Receipts {
    fn default() -> Self {
        Receipts {
            unique: 0,
            in_window: 0,
            duplicates: 0,
            foreign: 0,
            latency: histogram(),
            seen: HashMap::new(),
        }
    }
}

impl Receipts {
    pub fn record(&mut self, probe: Option<Probe>, window: &Window) {
        let Some(p) = probe else {
            self.foreign += 1;
            return;
        };
        let bits = self.seen.entry(p.publisher).or_default();
        let (word, bit) = ((p.seq / 64) as usize, p.seq % 64);
        if bits.len() <= word {
            bits.resize(word + 1, 0);
        }
        if bits[word] & (1 << bit) != 0 {
            self.duplicates += 1;
            return;
        }
        bits[word] |= 1 << bit;
        self.unique += 1;
        let now = now_ns();
        if window.contains(now) {
            self.in_window += 1;
        }
        if window.contains(p.due_ns) {
            let us = now.saturating_sub(p.due_ns) / 1000;
            let _ = self.latency.record(us.max(1));
        }
    }

    pub fn merge(&mut self, other: Receipts) {
        self.unique += other.unique;
        self.in_window += other.in_window;
        self.duplicates += other.duplicates;
        self.foreign += other.foreign;
        let _ = self.latency.add(&other.latency);
    }
}

/// What many lean receivers count together (the members of a large
/// group): shared counters and one histogram, taken once per read rather
/// than a [`Receipts`] per connection, so 10,000 members cost kilobytes
/// each, not a histogram each. Duplicates are not told apart here: a
/// count above what was owed shows them.
pub struct Tally {
    /// Deliveries received, whenever.
    pub received: AtomicU64,
    /// Deliveries that arrived inside the window.
    pub in_window: AtomicU64,
    /// Payloads that carried no probe.
    pub foreign: AtomicU64,
    /// Delivery latency of messages due inside the window, µs.
    pub latency: Mutex<Histogram<u64>>,
}

impl Tally {
    pub fn new() -> Arc<Tally> {
        Arc::new(Tally {
            received: AtomicU64::new(0),
            in_window: AtomicU64::new(0),
            foreign: AtomicU64::new(0),
            latency: Mutex::new(histogram()),
        })
    }

    /// Counts one read's deliveries, each by the time it was due (`None`:
    /// no probe in the payload).
    pub fn record(&self, window: &Window, due: &[Option<u64>]) {
        if due.is_empty() {
            return;
        }
        let now = now_ns();
        let n = due.len() as u64;
        self.received.fetch_add(n, Ordering::Relaxed);
        window.received.fetch_add(n, Ordering::Relaxed);
        if window.contains(now) {
            self.in_window.fetch_add(n, Ordering::Relaxed);
        }
        let mut h = self.latency.lock().unwrap_or_else(|e| e.into_inner());
        for d in due {
            match d {
                Some(d) if window.contains(*d) => {
                    let _ = h.record((now.saturating_sub(*d) / 1000).max(1));
                }
                Some(_) => {}
                None => {
                    self.foreign.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
    }
}

/// What one publishing connection did.
pub struct Sends {
    pub sent: u64,
    pub sent_in_window: u64,
    pub acked: u64,
    /// PUBLISH to PUBACK, µs (QoS 1): for chat, the commit latency.
    pub ack_latency: Histogram<u64>,
}

impl Default for Sends {
    fn default() -> Self {
        Sends {
            sent: 0,
            sent_in_window: 0,
            acked: 0,
            ack_latency: histogram(),
        }
    }
}

impl Sends {
    pub fn merge(&mut self, other: Sends) {
        self.sent += other.sent;
        self.sent_in_window += other.sent_in_window;
        self.acked += other.acked;
        let _ = self.ack_latency.add(&other.ack_latency);
    }
}

/// p50, p99, p99.9 in µs, or None if nothing was recorded.
pub fn percentiles(h: &Histogram<u64>) -> Option<[u64; 3]> {
    (!h.is_empty()).then(|| {
        [
            h.value_at_quantile(0.5),
            h.value_at_quantile(0.99),
            h.value_at_quantile(0.999),
        ]
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn duplicates_and_window_are_counted() {
        let w = Window::new();
        w.start_ns.store(0, Ordering::Relaxed);
        let mut r = Receipts::default();
        let p = |seq| {
            Some(Probe {
                publisher: 1,
                seq,
                due_ns: now_ns(),
            })
        };
        r.record(p(0), &w);
        r.record(p(200), &w);
        r.record(p(0), &w);
        r.record(None, &w);
        assert_eq!(
            (r.unique, r.in_window, r.duplicates, r.foreign),
            (2, 2, 1, 1)
        );
        assert_eq!(r.latency.len(), 2);
    }
}
