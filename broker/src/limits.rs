//! Rate limits: the token bucket every rate limit of the broker is made of,
//! and the publish rates of one connection and of one user.
//!
//! The publish limits can change while the broker runs (a reload,
//! [`PublishLimits::set`]): users' shared buckets take the new numbers at
//! once, each connection's own bucket at its next publish (one atomic load
//! tells it), keeping the tokens it has up to the new burst.
//!
//! A bucket holds up to `burst` tokens and gains `rate` per second; an
//! action costing `n` tokens passes if `n` are there and takes them. A
//! publish costs one token of a message bucket and its payload size in a
//! byte bucket, so both "messages per second" and "bytes per second" hold,
//! each with its own burst. This module only decides; the caller refuses
//! with the reason code and counts the refusal. It never sleeps or blocks.
//!
//! Arithmetic is in `f64` on purpose: a client chooses the sizes it
//! publishes, and floating point saturates where integers would overflow.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use chatmq_config::Mqtt;

/// Tokens that refill continuously up to a burst.
#[derive(Debug, Clone)]
pub struct TokenBucket {
    /// Tokens gained per second.
    rate: f64,
    /// The most tokens held (what a client may spend at once after a pause).
    burst: f64,
    tokens: f64,
    refilled: Instant,
}

impl TokenBucket {
    /// A full bucket: a client starts with its whole burst.
    pub fn new(rate_per_sec: u64, burst: u64, now: Instant) -> TokenBucket {
        TokenBucket {
            rate: rate_per_sec as f64,
            burst: burst as f64,
            tokens: burst as f64,
            refilled: now,
        }
    }

    fn refill(&mut self, now: Instant) {
        let elapsed = now.saturating_duration_since(self.refilled).as_secs_f64();
        self.tokens = (self.tokens + elapsed * self.rate).min(self.burst);
        self.refilled = now;
    }

    /// Takes new numbers, keeping the tokens held up to the new burst (a
    /// raised burst fills at the new rate, it is not handed out at once).
    pub fn relimit(&mut self, rate_per_sec: u64, burst: u64, now: Instant) {
        self.refill(now);
        self.rate = rate_per_sec as f64;
        self.burst = burst as f64;
        self.tokens = self.tokens.min(self.burst);
    }

    /// Would `cost` tokens be available now?
    pub fn allows(&mut self, cost: u64, now: Instant) -> bool {
        self.refill(now);
        self.tokens >= cost as f64
    }

    /// Takes `cost` tokens if they are there.
    pub fn take(&mut self, cost: u64, now: Instant) -> bool {
        let ok = self.allows(cost, now);
        if ok {
            self.tokens -= cost as f64;
        }
        ok
    }

    /// Full again: a bucket in this state is the same as a new one, so it
    /// can be forgotten.
    pub fn is_full(&mut self, now: Instant) -> bool {
        self.refill(now);
        self.tokens >= self.burst
    }
}

/// Publishes per second and payload bytes per second, each with a burst.
#[derive(Debug, Clone)]
pub struct PublishRate {
    messages: TokenBucket,
    bytes: TokenBucket,
}

/// The four numbers of one publish rate.
#[derive(Debug, Clone, Copy)]
pub struct RateLimit {
    pub messages_per_sec: u64,
    pub messages_burst: u64,
    pub bytes_per_sec: u64,
    pub bytes_burst: u64,
}

impl RateLimit {
    /// The per-connection rate of `mqtt.publish_*`.
    pub fn connection(mqtt: &Mqtt) -> RateLimit {
        RateLimit {
            messages_per_sec: mqtt.publish_rate,
            messages_burst: mqtt.publish_burst,
            bytes_per_sec: mqtt.publish_bytes_rate,
            bytes_burst: mqtt.publish_bytes_burst,
        }
    }

    /// The per-user rate of `mqtt.user_publish_*`, shared by all of a
    /// user's connections.
    pub fn user(mqtt: &Mqtt) -> RateLimit {
        RateLimit {
            messages_per_sec: mqtt.user_publish_rate,
            messages_burst: mqtt.user_publish_burst,
            bytes_per_sec: mqtt.user_publish_bytes_rate,
            bytes_burst: mqtt.user_publish_bytes_burst,
        }
    }
}

impl PublishRate {
    pub fn new(limit: RateLimit, now: Instant) -> PublishRate {
        PublishRate {
            messages: TokenBucket::new(limit.messages_per_sec, limit.messages_burst, now),
            bytes: TokenBucket::new(limit.bytes_per_sec, limit.bytes_burst, now),
        }
    }

    /// Takes the numbers of `limit` (see [`TokenBucket::relimit`]).
    pub fn relimit(&mut self, limit: RateLimit, now: Instant) {
        self.messages
            .relimit(limit.messages_per_sec, limit.messages_burst, now);
        self.bytes
            .relimit(limit.bytes_per_sec, limit.bytes_burst, now);
    }

    fn allows(&mut self, bytes: u64, now: Instant) -> bool {
        self.messages.allows(1, now) && self.bytes.allows(bytes, now)
    }

    fn take(&mut self, bytes: u64, now: Instant) {
        self.messages.take(1, now);
        self.bytes.take(bytes, now);
    }

    fn is_full(&mut self, now: Instant) -> bool {
        self.messages.is_full(now) && self.bytes.is_full(now)
    }
}

/// Admits a publish of `bytes` only if every rate in `rates` allows it,
/// and only then charges them all: a publish refused by the user's rate
/// costs the connection nothing.
pub fn admit(rates: &mut [&mut PublishRate], bytes: usize, now: Instant) -> bool {
    let bytes = u64::try_from(bytes).unwrap_or(u64::MAX);
    if !rates.iter_mut().all(|r| r.allows(bytes, now)) {
        return false;
    }
    for r in rates.iter_mut() {
        r.take(bytes, now);
    }
    true
}

/// A user's shared rate, held by each of its connections.
pub type UserRate = Arc<Mutex<PublishRate>>;

/// The per-user publish rates. An entry lives while a connection of its
/// user holds it or its buckets are still refilling: reconnecting does not
/// give a user a fresh burst, and users who went quiet cost nothing.
pub struct UserRates {
    limit: Mutex<RateLimit>,
    rates: Mutex<HashMap<Arc<str>, UserRate>>,
    /// Entries after the last sweep: the next sweep runs when the map has
    /// doubled, so sweeping costs O(1) per call on average.
    swept_len: Mutex<usize>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl UserRates {
    pub fn new(limit: RateLimit) -> UserRates {
        UserRates {
            limit: Mutex::new(limit),
            rates: Mutex::new(HashMap::new()),
            swept_len: Mutex::new(0),
        }
    }

    /// The rate `user` shares with its other connections.
    pub fn of(&self, user: &Arc<str>) -> UserRate {
        let now = Instant::now();
        let limit = *lock(&self.limit);
        let mut rates = lock(&self.rates);
        let mut swept = lock(&self.swept_len);
        if rates.len() >= (*swept * 2).max(64) {
            rates.retain(|_, r| Arc::strong_count(r) > 1 || !lock(r).is_full(now));
            *swept = rates.len();
        }
        rates
            .entry(user.clone())
            .or_insert_with(|| Arc::new(Mutex::new(PublishRate::new(limit, now))))
            .clone()
    }

    /// New numbers for every user: those with a rate now and those to come.
    pub fn set_limit(&self, limit: RateLimit) {
        *lock(&self.limit) = limit;
        let now = Instant::now();
        for rate in lock(&self.rates).values() {
            lock(rate).relimit(limit, now);
        }
    }

    /// Users with a rate in memory (for tests and metrics).
    pub fn len(&self) -> usize {
        lock(&self.rates).len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The publish limits in force (`mqtt.publish_*` per connection,
/// `mqtt.user_publish_*` per user) and every user's shared rate.
pub struct PublishLimits {
    /// What a connection's own rate is made with, and how many times it
    /// changed (under one lock, so the two are read together).
    connection: Mutex<(RateLimit, u64)>,
    /// The count of changes, read without the lock on every publish.
    generation: AtomicU64,
    users: UserRates,
}

impl PublishLimits {
    pub fn new(mqtt: &Mqtt) -> PublishLimits {
        PublishLimits {
            connection: Mutex::new((RateLimit::connection(mqtt), 0)),
            generation: AtomicU64::new(0),
            users: UserRates::new(RateLimit::user(mqtt)),
        }
    }

    /// The limit a new connection's rate starts with, and its generation.
    pub fn connection(&self) -> (RateLimit, u64) {
        *lock(&self.connection)
    }

    /// The limit to take if it changed since `generation`: one atomic load
    /// when it did not.
    pub fn newer_than(&self, generation: u64) -> Option<(RateLimit, u64)> {
        (self.generation.load(Ordering::Relaxed) != generation).then(|| self.connection())
    }

    /// The rate `user` shares with its other connections.
    pub fn of(&self, user: &Arc<str>) -> UserRate {
        self.users.of(user)
    }

    /// Every user's shared rate.
    pub fn users(&self) -> &UserRates {
        &self.users
    }

    /// Puts the publish limits of `mqtt` in force.
    pub fn set(&self, mqtt: &Mqtt) {
        self.users.set_limit(RateLimit::user(mqtt));
        let mut connection = lock(&self.connection);
        let generation = connection.1.wrapping_add(1);
        *connection = (RateLimit::connection(mqtt), generation);
        self.generation.store(generation, Ordering::Relaxed);
    }
}

/// Locks a user's rate (a poisoned lock still yields the buckets).
pub fn lock_rate(rate: &UserRate) -> MutexGuard<'_, PublishRate> {
    lock(rate)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn limit(messages: u64, burst: u64, bytes: u64, bytes_burst: u64) -> RateLimit {
        RateLimit {
            messages_per_sec: messages,
            messages_burst: burst,
            bytes_per_sec: bytes,
            bytes_burst,
        }
    }

    #[test]
    fn a_bucket_spends_its_burst_then_refills_at_its_rate() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(10, 3, t0);
        assert!(b.take(1, t0) && b.take(1, t0) && b.take(1, t0));
        assert!(!b.take(1, t0), "the burst is spent");
        assert!(
            b.take(1, t0 + Duration::from_millis(100)),
            "10/s: one per 100 ms"
        );
        assert!(!b.take(1, t0 + Duration::from_millis(150)));
        assert!(
            b.is_full(t0 + Duration::from_secs(10)),
            "never above the burst"
        );
        assert!(!b.take(4, t0 + Duration::from_secs(10)));
    }

    #[test]
    fn huge_costs_and_clock_steps_cannot_overflow() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(u64::MAX, u64::MAX, t0);
        assert!(b.take(u64::MAX, t0));
        let mut r = PublishRate::new(limit(1, 1, 1, 1), t0);
        assert!(!admit(&mut [&mut r], usize::MAX, t0));
        // An earlier instant than the last refill is treated as no time.
        assert!(admit(&mut [&mut r], 1, t0 - Duration::from_secs(1)));
    }

    #[test]
    fn bytes_and_messages_are_both_limited() {
        let t0 = Instant::now();
        let mut r = PublishRate::new(limit(100, 100, 10, 10), t0);
        assert!(admit(&mut [&mut r], 10, t0));
        assert!(!admit(&mut [&mut r], 1, t0), "the byte burst is spent");
        let mut r = PublishRate::new(limit(1, 1, 1000, 1000), t0);
        assert!(admit(&mut [&mut r], 1, t0));
        assert!(!admit(&mut [&mut r], 1, t0), "one message per second");
    }

    #[test]
    fn a_refusal_by_one_rate_charges_none() {
        let t0 = Instant::now();
        let mut conn = PublishRate::new(limit(10, 10, 1000, 1000), t0);
        let mut user = PublishRate::new(limit(1, 1, 1000, 1000), t0);
        assert!(admit(&mut [&mut conn, &mut user], 1, t0));
        for _ in 0..5 {
            assert!(!admit(&mut [&mut conn, &mut user], 1, t0));
        }
        let mut alone = [&mut conn];
        for _ in 0..9 {
            assert!(admit(&mut alone, 1, t0), "the connection kept its tokens");
        }
    }

    #[test]
    fn new_limits_reach_users_at_once_and_connections_when_they_look() {
        let t0 = Instant::now();
        let mqtt = Mqtt::default();
        let limits = PublishLimits::new(&mqtt);
        let (limit, seen) = limits.connection();
        let mut conn = PublishRate::new(limit, t0);
        let alice = limits.of(&"alice".into());
        assert!(limits.newer_than(seen).is_none());
        limits.set(&Mqtt {
            publish_rate: 1,
            publish_burst: 1,
            user_publish_rate: 1,
            user_publish_burst: 2,
            ..mqtt
        });
        let now = Instant::now();
        let mut user = lock_rate(&alice);
        assert!(admit(&mut [&mut user], 1, now));
        assert!(admit(&mut [&mut user], 1, now));
        assert!(
            !admit(&mut [&mut user], 1, now),
            "the user's burst is now 2"
        );
        drop(user);
        let (limit, _) = limits.newer_than(seen).expect("changed");
        conn.relimit(limit, now);
        assert!(admit(&mut [&mut conn], 1, now));
        assert!(
            !admit(&mut [&mut conn], 1, now),
            "the connection's burst is now 1"
        );
    }

    #[test]
    fn a_user_keeps_its_rate_across_connections_and_idle_users_are_forgotten() {
        let rates = UserRates::new(limit(1, 1, 1000, 1000));
        let alice: Arc<str> = "alice".into();
        let t0 = Instant::now();
        let first = rates.of(&alice);
        assert!(admit(&mut [&mut lock_rate(&first)], 1, t0));
        drop(first);
        let again = rates.of(&alice);
        assert!(
            !admit(&mut [&mut lock_rate(&again)], 1, t0),
            "a reconnect does not refill the bucket"
        );
        drop(again);
        for i in 0..200 {
            drop(rates.of(&Arc::from(format!("u{i}"))));
        }
        assert!(rates.len() < 200, "full, unheld buckets are swept");
    }
}
