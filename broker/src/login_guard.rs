//! What logging in may cost the broker. Failed logins are counted per
//! source address and per user name; once either count reaches its limit
//! within the window, CONNECTs from that address or for that name are
//! refused before any credential is checked, until the window ends. argon2
//! checks (about 19 MiB and tens of milliseconds each) run at most
//! `password_checks` at a time on the blocking pool, behind a bounded
//! queue; beyond it a CONNECT is refused as busy instead of waiting.
//!
//! This module only counts and admits; [`crate::access`] checks the
//! credentials and the channel turns a refusal into a CONNACK.

use std::collections::HashMap;
use std::hash::Hash;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use chatmq_config::LoginLimits;
use tokio::sync::Semaphore;

use crate::access::{Login, Refusal};
use crate::admission::group;
use crate::broker::Broker;
use crate::chat::namespace::valid_user;
use crate::clock::now_ms;

/// Addresses (and user names) tracked at most; beyond, the oldest tenth is
/// forgotten, so an attacker spreading failures over many keys costs a
/// bounded amount of memory.
const MAX_TRACKED: usize = 65_536;

/// Counters for `/metrics`.
#[derive(Default)]
pub struct LoginMetrics {
    /// CONNECTs whose credentials were wrong.
    pub failures: AtomicU64,
    /// CONNECTs refused by the failed-login limit, unchecked.
    pub rate_limited: AtomicU64,
    /// CONNECTs refused because the password-check queue was full.
    pub busy: AtomicU64,
}

/// Failed logins in the current window of one key.
struct Window {
    start_ms: u64,
    failures: u32,
}

/// Failed logins by key (an address or a user name).
struct Failures<K> {
    limit: u32,
    windows: HashMap<K, Window>,
}

impl<K: Hash + Eq> Failures<K> {
    fn new(limit: u32) -> Self {
        Failures {
            limit,
            windows: HashMap::new(),
        }
    }

    fn blocked(&self, key: &K, now: u64, window_ms: u64) -> bool {
        self.limit > 0
            && self.windows.get(key).is_some_and(|w| {
                now.saturating_sub(w.start_ms) < window_ms && w.failures >= self.limit
            })
    }

    fn fail(&mut self, key: K, now: u64, window_ms: u64) {
        if self.limit == 0 {
            return;
        }
        if self.windows.len() >= MAX_TRACKED && !self.windows.contains_key(&key) {
            self.prune(now, window_ms);
        }
        let w = self.windows.entry(key).or_insert(Window {
            start_ms: now,
            failures: 0,
        });
        if now.saturating_sub(w.start_ms) >= window_ms {
            *w = Window {
                start_ms: now,
                failures: 0,
            };
        }
        w.failures = w.failures.saturating_add(1);
    }

    /// Drops ended windows; if that is not enough, the oldest tenth.
    fn prune(&mut self, now: u64, window_ms: u64) {
        self.windows
            .retain(|_, w| now.saturating_sub(w.start_ms) < window_ms);
        if self.windows.len() >= MAX_TRACKED {
            let mut starts: Vec<u64> = self.windows.values().map(|w| w.start_ms).collect();
            let tenth = starts.len() / 10;
            let (_, cut, _) = starts.select_nth_unstable(tenth);
            let cut = *cut;
            self.windows.retain(|_, w| w.start_ms > cut);
        }
    }
}

/// At most `checks` argon2 verifications at once; at most `queue` more
/// waiting for one.
struct PasswordPool {
    permits: Arc<Semaphore>,
    waiting: AtomicUsize,
    queue: usize,
}

/// Leaves the pool's queue when dropped (also when the CONNECT is abandoned).
struct Waiting<'a>(&'a AtomicUsize);

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

impl PasswordPool {
    /// Runs `check` on the blocking pool once a permit is free; `None` if
    /// the queue is full. The permit moves into the blocking task, so a
    /// CONNECT abandoned meanwhile still cannot raise the concurrency.
    async fn run<T: Send + 'static>(
        &self,
        check: impl FnOnce() -> T + Send + 'static,
    ) -> Option<T> {
        let permit = match self.permits.clone().try_acquire_owned() {
            Ok(p) => p,
            Err(_) => {
                if self.waiting.fetch_add(1, Ordering::AcqRel) >= self.queue {
                    self.waiting.fetch_sub(1, Ordering::AcqRel);
                    return None;
                }
                let _waiting = Waiting(&self.waiting);
                self.permits.clone().acquire_owned().await.ok()?
            }
        };
        tokio::task::spawn_blocking(move || {
            let _permit = permit;
            check()
        })
        .await
        .ok()
    }
}

/// The failed-login limits and the password-check pool of one broker.
pub struct LoginGuard {
    /// `auth.limits.failed_login_window_secs`, in ms (a reload may change it).
    window_ms: AtomicU64,
    by_source: Mutex<Failures<IpAddr>>,
    by_user: Mutex<Failures<String>>,
    pool: PasswordPool,
    pub metrics: LoginMetrics,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl LoginGuard {
    pub fn new(limits: &LoginLimits) -> LoginGuard {
        LoginGuard {
            window_ms: AtomicU64::new(limits.failed_login_window_secs.saturating_mul(1000)),
            by_source: Mutex::new(Failures::new(limits.failed_logins_per_ip)),
            by_user: Mutex::new(Failures::new(limits.failed_logins_per_user)),
            pool: PasswordPool {
                permits: Arc::new(Semaphore::new(limits.password_checks.max(1))),
                waiting: AtomicUsize::new(0),
                queue: limits.password_check_queue,
            },
            metrics: LoginMetrics::default(),
        }
    }

    /// Puts new failed-login limits in force (a reload); the counts so far
    /// are kept. The password-check pool keeps its size until a restart.
    pub fn set_limits(&self, limits: &LoginLimits) {
        let window_ms = limits.failed_login_window_secs.saturating_mul(1000);
        self.window_ms.store(window_ms, Ordering::Relaxed);
        lock(&self.by_source).limit = limits.failed_logins_per_ip;
        lock(&self.by_user).limit = limits.failed_logins_per_user;
    }

    fn window_ms(&self) -> u64 {
        self.window_ms.load(Ordering::Relaxed)
    }

    fn blocked(&self, source: IpAddr, username: &str, now: u64) -> bool {
        let window_ms = self.window_ms();
        lock(&self.by_source).blocked(&group(source), now, window_ms)
            || lock(&self.by_user).blocked(&username.to_string(), now, window_ms)
    }

    fn failed(&self, source: IpAddr, username: &str, now: u64) {
        self.metrics.failures.fetch_add(1, Ordering::Relaxed);
        let window_ms = self.window_ms();
        lock(&self.by_source).fail(group(source), now, window_ms);
        // Only user ids are tracked by name: any other name is refused
        // without a check, and an unbounded name must not become a key.
        if valid_user(username) {
            lock(&self.by_user).fail(username.to_string(), now, window_ms);
        }
    }
}

/// Checks the credentials of a CONNECT from `source`: refused unchecked
/// while its address or user name is over the failed-login limit, argon2
/// checks through the bounded pool, every other check on the blocking pool
/// as before. A wrong password or token counts as a failure.
pub async fn login(
    broker: &Arc<Broker>,
    source: IpAddr,
    username: String,
    password: String,
) -> Result<Login, Refusal> {
    let guard = &broker.auth.guard;
    if guard.blocked(source, &username, now_ms()) {
        guard.metrics.rate_limited.fetch_add(1, Ordering::Relaxed);
        return Err(Refusal::RateLimited);
    }
    let hashes = broker.auth.hashes(&username);
    let name = username.clone();
    let b = broker.clone();
    let check = move || b.auth.login(Some(&name), Some(password.as_bytes()));
    let result = if hashes {
        match guard.pool.run(check).await {
            Some(r) => r,
            None => {
                guard.metrics.busy.fetch_add(1, Ordering::Relaxed);
                return Err(Refusal::ServerBusy);
            }
        }
    } else {
        tokio::task::spawn_blocking(check)
            .await
            .unwrap_or(Err(Refusal::NotAuthorized))
    };
    if result == Err(Refusal::BadCredentials) {
        guard.failed(source, &username, now_ms());
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failures_block_until_the_window_ends() {
        let mut f = Failures::new(3);
        for _ in 0..2 {
            f.fail("ip", 1_000, 60_000);
        }
        assert!(!f.blocked(&"ip", 1_000, 60_000));
        f.fail("ip", 1_000, 60_000);
        assert!(f.blocked(&"ip", 1_000, 60_000));
        assert!(!f.blocked(&"other", 1_000, 60_000));
        assert!(!f.blocked(&"ip", 61_000, 60_000), "the window ended");
        f.fail("ip", 61_000, 60_000);
        assert!(!f.blocked(&"ip", 61_000, 60_000), "a new window");
    }

    #[test]
    fn a_limit_of_zero_counts_nothing() {
        let mut f = Failures::new(0);
        for _ in 0..10 {
            f.fail(1u32, 0, 60_000);
        }
        assert!(!f.blocked(&1, 0, 60_000));
        assert!(f.windows.is_empty());
    }

    #[test]
    fn tracking_stays_bounded() {
        let mut f = Failures::new(5);
        for k in 0..(MAX_TRACKED as u64 + 10_000) {
            f.fail(k, k, u64::MAX);
        }
        assert!(f.windows.len() <= MAX_TRACKED);
        assert!(f.windows.contains_key(&(MAX_TRACKED as u64 + 9_999)));
    }

    #[test]
    fn an_ipv6_client_is_counted_by_its_64_prefix() {
        let a: IpAddr = "2001:db8:1:2:aaaa::1".parse().unwrap();
        let b: IpAddr = "2001:db8:1:2:bbbb::2".parse().unwrap();
        assert_eq!(group(a), group(b));
        let mapped: IpAddr = "::ffff:192.0.2.7".parse().unwrap();
        assert_eq!(group(mapped), "192.0.2.7".parse::<IpAddr>().unwrap());
    }

    #[tokio::test]
    async fn the_pool_refuses_beyond_its_queue() {
        let pool = Arc::new(PasswordPool {
            permits: Arc::new(Semaphore::new(1)),
            waiting: AtomicUsize::new(0),
            queue: 1,
        });
        let (release, hold) = std::sync::mpsc::channel::<()>();
        let running = {
            let pool = pool.clone();
            tokio::spawn(async move { pool.run(move || hold.recv().is_ok()).await })
        };
        while pool.permits.available_permits() > 0 {
            tokio::task::yield_now().await;
        }
        let queued = {
            let pool = pool.clone();
            tokio::spawn(async move { pool.run(|| true).await })
        };
        while pool.waiting.load(Ordering::Acquire) == 0 {
            tokio::task::yield_now().await;
        }
        assert_eq!(pool.run(|| true).await, None, "the queue is full");
        release.send(()).unwrap();
        assert_eq!(running.await.unwrap(), Some(true));
        assert_eq!(queued.await.unwrap(), Some(true));
        assert_eq!(pool.waiting.load(Ordering::Acquire), 0);
    }
}
