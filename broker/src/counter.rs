//! Counters for `/metrics` that many cores bump: one slot per cache line,
//! a thread always bumps its own slot, and a read sums them. A single
//! shared `AtomicU64` would bounce its cache line between cores on every
//! message routed or delivered.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

/// Slots per counter: more than the cores a broker usually runs on, so
/// threads rarely share one.
const SLOTS: usize = 16;

#[repr(align(64))]
#[derive(Default)]
struct Slot(AtomicU64);

/// A monotonic counter, sharded by thread.
#[derive(Default)]
pub struct Counter([Slot; SLOTS]);

static NEXT_SLOT: AtomicUsize = AtomicUsize::new(0);

thread_local! {
    /// This thread's slot, handed out round-robin as threads first count.
    static MY_SLOT: usize = NEXT_SLOT.fetch_add(1, Ordering::Relaxed) % SLOTS;
}

impl Counter {
    /// Adds `n`. The name and the (ignored) ordering follow `AtomicU64`,
    /// so a counter reads like one; every bump is `Relaxed`, and nothing is
    /// returned, since no slot holds the total.
    pub fn fetch_add(&self, n: u64, _ordering: Ordering) {
        let i = MY_SLOT.with(|s| *s);
        if let Some(slot) = self.0.get(i) {
            slot.0.fetch_add(n, Ordering::Relaxed);
        }
    }

    /// The total (a sum of slots read one by one: exact once bumps stop).
    pub fn load(&self, _ordering: Ordering) -> u64 {
        self.0
            .iter()
            .fold(0, |sum, s| sum.wrapping_add(s.0.load(Ordering::Relaxed)))
    }
}

/// What `/metrics` reads of a counter, sharded or a plain atomic.
pub trait Total {
    fn total(&self) -> u64;
}

impl Total for Counter {
    fn total(&self) -> u64 {
        self.load(Ordering::Relaxed)
    }
}

impl Total for AtomicU64 {
    fn total(&self) -> u64 {
        self.load(Ordering::Relaxed)
    }
}

/// One count per value of a label, the values a fixed list: a series per
/// value from the start (zeros included), and none a client can add. For
/// what is counted once per connection or per push, not per message: each
/// count is a plain atomic (`counter` for a monotonic count; `add`/`sub`
/// for a gauge).
pub struct ByLabel<L> {
    values: &'static [&'static str],
    counts: Box<[AtomicU64]>,
    label: std::marker::PhantomData<L>,
}

/// The values of one label ([`ByLabel`]).
pub trait LabelValues {
    const VALUES: &'static [&'static str];
}

impl<L: LabelValues> Default for ByLabel<L> {
    fn default() -> Self {
        ByLabel {
            values: L::VALUES,
            counts: L::VALUES.iter().map(|_| AtomicU64::new(0)).collect(),
            label: std::marker::PhantomData,
        }
    }
}

/// `listener`: the MQTT listener a connection came in on (`mqtt.listen`,
/// `tls.listen`, `websocket.listen`, `websocket.tls_listen`).
pub enum Listeners {}

impl LabelValues for Listeners {
    const VALUES: &'static [&'static str] = &["tcp", "tls", "ws", "wss"];
}

impl<L> ByLabel<L> {
    fn slot(&self, value: &str) -> Option<&AtomicU64> {
        let i = self.values.iter().position(|v| *v == value)?;
        self.counts.get(i)
    }

    /// Adds `n` to `value`'s count (a value not in the list is ignored).
    pub fn add(&self, value: &str, n: u64) {
        if let Some(c) = self.slot(value) {
            c.fetch_add(n, Ordering::Relaxed);
        }
    }

    /// Takes `n` from `value`'s count, stopping at 0.
    pub fn sub(&self, value: &str, n: u64) {
        if let Some(c) = self.slot(value) {
            let _ = c.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |v| {
                Some(v.saturating_sub(n))
            });
        }
    }

    /// `(value, count)` for every value, zeros included.
    pub fn snapshot(&self) -> Vec<(&'static str, u64)> {
        self.values
            .iter()
            .zip(self.counts.iter())
            .map(|(v, c)| (*v, c.load(Ordering::Relaxed)))
            .collect()
    }
}

impl<L> Total for ByLabel<L> {
    fn total(&self) -> u64 {
        self.counts
            .iter()
            .fold(0, |sum, c| sum.wrapping_add(c.load(Ordering::Relaxed)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn bumps_from_many_threads_add_up() {
        let c = Arc::new(Counter::default());
        let threads: Vec<_> = (0..8)
            .map(|_| {
                let c = c.clone();
                std::thread::spawn(move || {
                    for _ in 0..10_000 {
                        c.fetch_add(1, Ordering::Relaxed);
                    }
                })
            })
            .collect();
        for t in threads {
            assert!(t.join().is_ok());
        }
        assert_eq!(c.load(Ordering::Relaxed), 80_000);
        assert_eq!(std::mem::align_of::<Slot>(), 64, "one slot per cache line");
    }

    #[test]
    fn a_count_per_label_value_from_a_fixed_list() {
        enum Two {}
        impl LabelValues for Two {
            const VALUES: &'static [&'static str] = &["tcp", "tls"];
        }
        let c = ByLabel::<Two>::default();
        c.add("tls", 2);
        c.add("nonsense", 5);
        c.sub("tls", 1);
        c.sub("tcp", 1);
        assert_eq!(c.snapshot(), [("tcp", 0), ("tls", 1)]);
        assert_eq!(c.total(), 1);
    }
}
