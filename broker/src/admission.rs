//! Who may open a connection, decided before a byte of it is read: a
//! permit from a listener's connection budget, taken *before* `accept`
//! (like tokio's mini-redis, so a flood waits in the kernel's backlog
//! instead of costing tasks and buffers), then the limits of the peer's
//! address: how many connections it holds and how fast it opens new ones.
//! Also the socket options every accepted connection gets, and the
//! counters of what was refused, by reason, for `/metrics`.
//!
//! Every MQTT listener (TCP, TLS, WebSocket, secure WebSocket) shares one
//! [`Admission`]; the HTTP API has its own permits. This module never
//! reads from or writes to a socket.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv6Addr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chatmq_config::Mqtt;
use socket2::SockRef;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::limits::TokenBucket;

/// Seconds between TCP keepalive probes once they start, and how many go
/// unanswered before the OS drops the connection.
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(10);
const KEEPALIVE_PROBES: u32 = 3;

/// The address table is swept of entries that hold nothing when it has
/// doubled since the last sweep, and not below this size.
const SWEEP_FLOOR: usize = 1024;

/// The MQTT listeners' gate: `mqtt.max_connections` permits and the
/// per-address limits of `[mqtt]`.
#[derive(Clone)]
pub struct Admission {
    permits: Arc<Semaphore>,
    addresses: AddressLimiter,
    keepalive: Option<Duration>,
}

/// One connection's right to exist: its permit and its place in the
/// address table, given back when the connection's task drops it.
pub struct Admitted {
    _permit: OwnedSemaphorePermit,
    _place: Place,
}

impl Admission {
    pub fn new(mqtt: &Mqtt) -> Admission {
        Admission {
            permits: Arc::new(Semaphore::new(mqtt.max_connections)),
            addresses: AddressLimiter::new(AddressLimits {
                max_open: mqtt.max_connections_per_ip,
                rate_per_sec: mqtt.accept_rate_per_ip,
                burst: mqtt.accept_burst_per_ip,
            }),
            keepalive: (mqtt.tcp_keepalive_secs > 0)
                .then(|| Duration::from_secs(mqtt.tcp_keepalive_secs)),
        }
    }

    /// Waits for a free connection permit: call before `accept`. (`None`
    /// would mean the semaphore was closed, which nothing does.)
    pub async fn permit(&self) -> Option<OwnedSemaphorePermit> {
        self.permits.clone().acquire_owned().await.ok()
    }

    /// Gives `listener` the socket options of [`tune`], and says whether
    /// the sockets it accepts have them from it. Linux copies a listening
    /// socket's TCP_NODELAY and keepalive settings into each socket it
    /// accepts, so a connection then costs no `setsockopt` at all (five
    /// system calls per CONNECT fewer, measured in a connection storm);
    /// elsewhere, or if setting them fails, each accepted socket is tuned.
    pub fn tune_listener(&self, listener: &TcpListener) -> Inherits {
        if !cfg!(target_os = "linux") {
            return Inherits::No;
        }
        match set_options(SockRef::from(listener), self.keepalive) {
            Ok(()) => Inherits::Yes,
            Err(e) => {
                tracing::debug!(error = %e, "cannot set the listener's socket options");
                Inherits::No
            }
        }
    }

    /// Lets the connection just accepted from `socket` in, or says why not.
    /// The socket gets its options either way (cheap, and it may live),
    /// unless it `inherits` them from its listener.
    pub fn admit(
        &self,
        permit: OwnedSemaphorePermit,
        socket: &TcpStream,
        peer: IpAddr,
        inherits: Inherits,
    ) -> Result<Admitted, Refusal> {
        if inherits == Inherits::No {
            tune(socket, self.keepalive);
        }
        let place = self.addresses.enter(peer, Instant::now())?;
        Ok(Admitted {
            _permit: permit,
            _place: place,
        })
    }
}

/// TCP_NODELAY (MQTT packets are small and latency matters) and, when
/// configured, TCP keepalive, which finds a peer that vanished without a
/// FIN (a phone that lost its network) even when MQTT keepalive is off.
pub fn tune(socket: &TcpStream, keepalive: Option<Duration>) {
    if let Err(e) = set_options(SockRef::from(socket), keepalive) {
        tracing::debug!(error = %e, "cannot set the socket's options");
    }
}

/// Whether an accepted socket has its options from its listener
/// ([`Admission::tune_listener`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Inherits {
    Yes,
    No,
}

fn set_options(socket: SockRef<'_>, keepalive: Option<Duration>) -> std::io::Result<()> {
    socket.set_tcp_nodelay(true)?;
    if let Some(idle) = keepalive {
        let params = socket2::TcpKeepalive::new()
            .with_time(idle)
            .with_interval(KEEPALIVE_INTERVAL)
            .with_retries(KEEPALIVE_PROBES);
        socket.set_tcp_keepalive(&params)?;
    }
    Ok(())
}

/// Why a connection was refused or closed before it became an MQTT client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// Its address already holds its `max_connections_per_ip`.
    AddressLimit,
    /// Its address opens connections faster than `accept_rate_per_ip`.
    AddressRate,
    /// The TLS handshake or WebSocket upgrade failed or timed out.
    Handshake,
    /// No CONNECT within `mqtt.connect_timeout_secs`.
    ConnectTimeout,
    /// A CONNECT larger than `mqtt.max_connect_packet`.
    ConnectTooLarge,
}

impl Refusal {
    const ALL: [Refusal; 5] = [
        Refusal::AddressLimit,
        Refusal::AddressRate,
        Refusal::Handshake,
        Refusal::ConnectTimeout,
        Refusal::ConnectTooLarge,
    ];

    /// The `reason` label of `chatmq_connections_refused_total`.
    pub fn label(self) -> &'static str {
        match self {
            Refusal::AddressLimit => "address_limit",
            Refusal::AddressRate => "address_rate",
            Refusal::Handshake => "handshake",
            Refusal::ConnectTimeout => "connect_timeout",
            Refusal::ConnectTooLarge => "connect_too_large",
        }
    }
}

/// Connections refused, by [`Refusal`].
#[derive(Debug, Default)]
pub struct Refusals([AtomicU64; 5]);

impl Refusals {
    pub fn count(&self, why: Refusal) {
        self.0[why as usize].fetch_add(1, Ordering::Relaxed);
    }

    /// `(label, count)` for every reason, zeros included.
    pub fn snapshot(&self) -> Vec<(&'static str, u64)> {
        Refusal::ALL
            .iter()
            .map(|&why| (why.label(), self.0[why as usize].load(Ordering::Relaxed)))
            .collect()
    }
}

/// What one address may do; 0 turns a limit off.
#[derive(Debug, Clone, Copy)]
pub struct AddressLimits {
    /// Connections it may hold at once.
    pub max_open: usize,
    /// Connections it may open per second, sustained.
    pub rate_per_sec: u32,
    /// Connections it may open at once after a quiet spell.
    pub burst: u32,
}

/// Counts connections and recent accepts per address: a token bucket per
/// address for the rate, a count for the connections held. One type serves
/// every listener (the `[mqtt]` limits, and `websocket.max_connections_per_ip`).
///
/// An IPv6 client usually holds a whole /64, so IPv6 addresses are counted
/// by their /64 prefix; an IPv4-mapped IPv6 address counts as the IPv4 one.
#[derive(Debug, Clone)]
pub struct AddressLimiter {
    limits: AddressLimits,
    table: Arc<Mutex<Table>>,
}

#[derive(Debug, Default)]
struct Table {
    by_address: HashMap<IpAddr, Entry>,
    /// Size after the last sweep: the next one runs at twice that.
    swept_len: usize,
}

#[derive(Debug)]
struct Entry {
    open: usize,
    /// Accepts left, refilled at `rate_per_sec` up to `burst`; none when
    /// the rate is off.
    accepts: Option<TokenBucket>,
}

/// One connection's place in an [`AddressLimiter`], freed on drop.
#[derive(Debug)]
pub struct Place {
    address: IpAddr,
    table: Arc<Mutex<Table>>,
}

impl AddressLimiter {
    pub fn new(limits: AddressLimits) -> AddressLimiter {
        AddressLimiter {
            limits,
            table: Arc::default(),
        }
    }

    /// A place for one more connection from `peer` at `now`, or why not.
    pub fn enter(&self, peer: IpAddr, now: Instant) -> Result<Place, Refusal> {
        let address = group(peer);
        let limits = self.limits;
        let mut table = self.table.lock().unwrap_or_else(|e| e.into_inner());
        table.sweep(now);
        let entry = table.by_address.entry(address).or_insert_with(|| Entry {
            open: 0,
            accepts: (limits.rate_per_sec != 0)
                .then(|| TokenBucket::new(limits.rate_per_sec.into(), limits.burst.into(), now)),
        });
        if limits.max_open != 0 && entry.open >= limits.max_open {
            return Err(Refusal::AddressLimit);
        }
        if let Some(accepts) = &mut entry.accepts {
            if !accepts.take(1, now) {
                return Err(Refusal::AddressRate);
            }
        }
        entry.open = entry.open.saturating_add(1);
        Ok(Place {
            address,
            table: self.table.clone(),
        })
    }

    /// Addresses in the table (holding connections or refilling).
    #[cfg(test)]
    fn tracked(&self) -> usize {
        self.table.lock().map(|t| t.by_address.len()).unwrap_or(0)
    }
}

impl Entry {
    /// Holds nothing a fresh entry would not: no connection, a full bucket.
    fn idle(&mut self, now: Instant) -> bool {
        self.open == 0 && self.accepts.as_mut().is_none_or(|b| b.is_full(now))
    }
}

impl Table {
    /// Forgets idle addresses once the table has doubled since the last
    /// sweep: the table stays proportional to the addresses that hold
    /// connections or connected within the last `burst / rate` seconds,
    /// at an amortised constant cost per accept.
    fn sweep(&mut self, now: Instant) {
        if self.by_address.len() < self.swept_len.saturating_mul(2).max(SWEEP_FLOOR) {
            return;
        }
        self.by_address.retain(|_, e| !e.idle(now));
        self.swept_len = self.by_address.len();
    }
}

impl Drop for Place {
    fn drop(&mut self) {
        let mut table = self.table.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(entry) = table.by_address.get_mut(&self.address) {
            entry.open = entry.open.saturating_sub(1);
        }
    }
}

/// The unit an address limit counts (connections here, failed logins in
/// `login_guard`): an IPv4 address, or an IPv6 /64, which one host
/// usually holds whole; an IPv4-mapped IPv6 address is its IPv4 one.
pub fn group(peer: IpAddr) -> IpAddr {
    match peer.to_canonical() {
        IpAddr::V4(v4) => IpAddr::V4(v4),
        IpAddr::V6(v6) => {
            let prefix = u128::from(v6) & !((1u128 << 64) - 1);
            IpAddr::V6(Ipv6Addr::from(prefix))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limiter(max_open: usize, rate_per_sec: u32, burst: u32) -> AddressLimiter {
        AddressLimiter::new(AddressLimits {
            max_open,
            rate_per_sec,
            burst,
        })
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn connections_are_counted_per_address_and_freed_on_drop() {
        let limiter = limiter(2, 0, 0);
        let now = Instant::now();
        let first = limiter.enter(ip("10.0.0.1"), now).unwrap();
        let _second = limiter.enter(ip("10.0.0.1"), now).unwrap();
        assert_eq!(
            limiter.enter(ip("10.0.0.1"), now).err(),
            Some(Refusal::AddressLimit)
        );
        assert!(limiter.enter(ip("10.0.0.2"), now).is_ok());
        drop(first);
        assert!(limiter.enter(ip("10.0.0.1"), now).is_ok());
    }

    #[test]
    fn zero_means_no_limit() {
        let limiter = limiter(0, 0, 0);
        let now = Instant::now();
        let places: Vec<Place> = (0..1000)
            .filter_map(|_| limiter.enter(ip("10.0.0.1"), now).ok())
            .collect();
        assert_eq!(places.len(), 1000);
    }

    #[test]
    fn the_rate_allows_a_burst_then_refills_with_time() {
        let limiter = limiter(0, 10, 3);
        let start = Instant::now();
        let a = ip("10.0.0.1");
        for _ in 0..3 {
            assert!(limiter.enter(a, start).is_ok());
        }
        assert_eq!(limiter.enter(a, start).err(), Some(Refusal::AddressRate));
        // 10 per second: one more after 100 ms, not two.
        let later = start + Duration::from_millis(100);
        assert!(limiter.enter(a, later).is_ok());
        assert_eq!(limiter.enter(a, later).err(), Some(Refusal::AddressRate));
        // Another address has its own bucket.
        assert!(limiter.enter(ip("10.0.0.2"), later).is_ok());
    }

    #[test]
    fn an_ipv6_slash_64_counts_as_one_address() {
        let limiter = limiter(1, 0, 0);
        let now = Instant::now();
        let _held = limiter.enter(ip("2001:db8:1:2::1"), now).unwrap();
        assert_eq!(
            limiter.enter(ip("2001:db8:1:2:ffff::9"), now).err(),
            Some(Refusal::AddressLimit)
        );
        assert!(limiter.enter(ip("2001:db8:1:3::1"), now).is_ok());
        let _v4 = limiter.enter(ip("192.0.2.7"), now).unwrap();
        assert_eq!(
            limiter.enter(ip("::ffff:192.0.2.7"), now).err(),
            Some(Refusal::AddressLimit)
        );
    }

    #[test]
    fn idle_addresses_are_forgotten_so_the_table_stays_bounded() {
        let limiter = limiter(0, 100, 1);
        let start = Instant::now();
        for i in 0..(4 * SWEEP_FLOOR as u32) {
            let peer = IpAddr::V4(std::net::Ipv4Addr::from(0x0a00_0000 + i));
            // Each address's bucket is full again 10 ms after its accept.
            let at = start + Duration::from_millis(u64::from(i) * 20);
            drop(limiter.enter(peer, at).unwrap());
        }
        assert!(
            limiter.tracked() <= 2 * SWEEP_FLOOR,
            "{}",
            limiter.tracked()
        );
    }

    #[cfg(target_os = "linux")]
    #[tokio::test]
    async fn accepted_sockets_have_their_options_from_the_listener() {
        let mut mqtt = Mqtt::default();
        mqtt.tcp_keepalive_secs = 42;
        let admission = Admission::new(&mqtt);
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        assert_eq!(admission.tune_listener(&listener), Inherits::Yes);
        let addr = listener.local_addr().unwrap();
        let (client, accepted) = tokio::join!(TcpStream::connect(addr), listener.accept());
        let (_client, (socket, _)) = (client.unwrap(), accepted.unwrap());
        let socket = SockRef::from(&socket);
        assert!(socket.tcp_nodelay().unwrap());
        assert!(socket.keepalive().unwrap());
        assert_eq!(
            socket.tcp_keepalive_time().unwrap(),
            Duration::from_secs(42)
        );
        assert_eq!(socket.tcp_keepalive_interval().unwrap(), KEEPALIVE_INTERVAL);
        assert_eq!(socket.tcp_keepalive_retries().unwrap(), KEEPALIVE_PROBES);
    }

    #[test]
    fn refusals_are_counted_by_reason() {
        let refusals = Refusals::default();
        refusals.count(Refusal::AddressRate);
        refusals.count(Refusal::AddressRate);
        refusals.count(Refusal::ConnectTimeout);
        let snapshot = refusals.snapshot();
        assert!(snapshot.contains(&("address_rate", 2)));
        assert!(snapshot.contains(&("connect_timeout", 1)));
        assert!(snapshot.contains(&("address_limit", 0)));
    }
}
