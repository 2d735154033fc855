//! Deadlines by key (a client id, a conversation), earliest first, one
//! entry per key: what the broker's timers take when due instead of
//! scanning everything they might concern (session expiry, delayed wills,
//! retention). Entries can be stale (the session resumed, a trim raced an
//! append); whoever takes one checks the thing itself before acting.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{watch, Notify};

use crate::clock::now_ms;

/// What a timer task does between passes: sleeps until `next` (unix ms;
/// `None`: nothing is due), until `wake` says an earlier deadline was set,
/// or until the broker stops (false).
pub async fn wait_for(
    next: Option<u64>,
    wake: &Notify,
    shutdown: &mut watch::Receiver<bool>,
) -> bool {
    let until_due = async {
        match next {
            Some(at) => {
                tokio::time::sleep(Duration::from_millis(at.saturating_sub(now_ms()))).await
            }
            None => std::future::pending().await,
        }
    };
    tokio::select! {
        _ = shutdown.changed() => false,
        _ = wake.notified() => true,
        _ = until_due => true,
    }
}

#[derive(Debug, Default)]
pub struct Deadlines {
    by_time: BTreeSet<(u64, Arc<str>)>,
    by_key: HashMap<Arc<str>, u64>,
}

impl Deadlines {
    /// Sets `key`'s deadline to `at` (moving an earlier or later one: a
    /// client that leaves again cannot grow the index). True if `at` is
    /// now the earliest of all (a sleeping timer must be woken).
    pub fn schedule(&mut self, key: &str, at: u64) -> bool {
        let key = self.unset(key).unwrap_or_else(|| key.into());
        let earliest = self.next().is_none_or(|t| at < t);
        self.by_key.insert(key.clone(), at);
        self.by_time.insert((at, key));
        earliest
    }

    /// Makes `key` due at `at` at the latest: an earlier deadline stays.
    /// True if `at` is now the earliest of all.
    pub fn due_by(&mut self, key: &str, at: u64) -> bool {
        if self.by_key.get(key).is_some_and(|t| *t <= at) {
            return false;
        }
        self.schedule(key, at)
    }

    /// Removes `key`'s deadline; its shared key, if it had one.
    fn unset(&mut self, key: &str) -> Option<Arc<str>> {
        let (key, t) = self.by_key.remove_entry(key)?;
        self.by_time.remove(&(t, key.clone()));
        Some(key)
    }

    /// The earliest deadline.
    pub fn next(&self) -> Option<u64> {
        self.by_time.first().map(|(t, _)| *t)
    }

    /// The keys due at `now_ms`, taken out of the index.
    pub fn take_due(&mut self, now_ms: u64) -> Vec<Arc<str>> {
        let mut due = Vec::new();
        while self.by_time.first().is_some_and(|(t, _)| *t <= now_ms) {
            if let Some((_, key)) = self.by_time.pop_first() {
                self.by_key.remove(&key);
                due.push(key);
            }
        }
        due
    }

    /// Keys with a deadline.
    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.by_key.len()
    }

    #[cfg(test)]
    pub fn is_empty(&self) -> bool {
        self.by_key.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_entry_per_key_and_what_is_due_comes_out() {
        let mut e = Deadlines::default();
        for t in 0..1000 {
            e.schedule("a", 10_000 + t);
        }
        assert!(e.schedule("b", 5_000), "b comes first");
        assert_eq!(e.len(), 2, "a key scheduled again moves its entry");
        assert!(e.take_due(4_999).is_empty());
        assert_eq!(e.take_due(5_000), [Arc::<str>::from("b")]);
        assert!(e.take_due(10_998).is_empty(), "a's latest deadline counts");
        assert_eq!(e.take_due(u64::MAX), [Arc::<str>::from("a")]);
        assert!(e.is_empty() && e.next().is_none());
    }

    #[test]
    fn due_by_keeps_the_earlier_deadline() {
        let mut d = Deadlines::default();
        assert!(d.due_by("a", 500), "the first deadline is the earliest");
        assert!(!d.due_by("b", 700));
        assert!(!d.due_by("a", 900), "a later deadline does not move a's");
        assert!(d.due_by("b", 100), "an earlier one does");
        assert_eq!((d.len(), d.next()), (2, Some(100)));
        assert_eq!(d.take_due(100), [Arc::<str>::from("b")]);
        assert_eq!(d.next(), Some(500));
    }
}
