//! Hostile clients at the edges, before anyone is authenticated: slowloris
//! on MQTT, WebSocket and HTTP, connection floods, per-address limits,
//! oversized WebSocket messages, and the shape of the HTTP API's errors.
//!
//! Timeouts are configured short (1 s) so that each story takes seconds.
//! A healthy client keeps round-tripping while the hostile ones are at
//! work; its round trip is compared, generously, with its own idle one.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use chatmq_tests::http::Http;
use chatmq_tests::metrics::{metric, metric_becomes};
use chatmq_tests::raw::{self, p4, Silence, Wire};
use chatmq_tests::{Broker, PATIENCE};
use rumqttc::QoS;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const ADMIN: &str = "edges-admin-token";

/// Anyone may connect and use any plain topic; the admin token is set;
/// every pre-authentication timeout is 1 s; no per-address limits. `extra`
/// goes into `[mqtt]`, replacing those defaults it sets.
fn config(extra: &str) -> String {
    let mut mqtt = String::new();
    for (key, value) in [
        ("connect_timeout_secs", "1"),
        ("max_connections_per_ip", "0"),
        ("accept_rate_per_ip", "0"),
    ] {
        if !extra.contains(key) {
            mqtt.push_str(&format!("{key} = {value}\n"));
        }
    }
    format!(
        r##"
[mqtt]
{mqtt}{extra}

[http]
header_timeout_secs = 1
request_timeout_secs = 1

[websocket]
handshake_timeout_secs = 1

[auth]
allow_anonymous = true
admin_token = "{ADMIN}"

[[acl.rules]]
user = "*"
topic = "#"
access = "pubsub"
"##
    )
}

// ------------------------------------------------------------ helpers

/// A well-behaved 3.1.1 client that publishes to itself and times the echo.
struct Healthy {
    wire: Wire,
}

impl Healthy {
    async fn connect(addr: SocketAddr) -> Healthy {
        Healthy::connect_as(addr, "healthy").await
    }

    async fn connect_as(addr: SocketAddr, client_id: &str) -> Healthy {
        let mut wire = Wire::open(addr).await;
        wire.send(&raw::connect_v4(client_id)).await;
        match wire.next_v4(PATIENCE).await {
            Ok(p4::Packet::ConnAck(a)) => assert_eq!(a.code, p4::ConnectReturnCode::Success),
            other => panic!("expected CONNACK, got {other:?}"),
        }
        let mut sub = p4::Subscribe::new("health/echo", QoS::AtMostOnce);
        sub.pkid = 1;
        wire.send_v4(&p4::Packet::Subscribe(sub)).await;
        match wire.next_v4(PATIENCE).await {
            Ok(p4::Packet::SubAck(_)) => {}
            other => panic!("expected SUBACK, got {other:?}"),
        }
        Healthy { wire }
    }

    async fn round_trip(&mut self) -> Duration {
        let start = Instant::now();
        self.wire
            .send(&raw::publish_v4("health/echo", b"ping"))
            .await;
        match self.wire.next_v4(PATIENCE).await {
            Ok(p4::Packet::Publish(_)) => start.elapsed(),
            other => panic!("the healthy client lost its echo: {other:?}"),
        }
    }

    /// The slowest of `n` round trips.
    async fn worst_of(&mut self, n: usize) -> Duration {
        let mut worst = Duration::ZERO;
        for _ in 0..n {
            worst = worst.max(self.round_trip().await);
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        worst
    }
}

/// The healthy client is still served: its worst round trip under attack
/// stays within ten times its idle worst, plus a second for a loaded
/// machine. A broker stalled by the attack misses this by far.
fn assert_still_served(idle: Duration, busy: Duration) {
    let bound = idle * 10 + Duration::from_secs(1);
    assert!(
        busy <= bound,
        "the healthy client's round trip went from {idle:?} idle to {busy:?} under attack"
    );
}

fn status_field(b: &Broker, field: &str) -> u64 {
    let pid = b.pid().expect("broker running");
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("proc status");
    status
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{field}:")))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no {field} in /proc/{pid}/status"))
}

/// The broker's resident memory in KiB.
fn rss_kib(b: &Broker) -> u64 {
    status_field(b, "VmRSS")
}

/// The broker's open file descriptors.
fn open_fds(b: &Broker) -> usize {
    let pid = b.pid().expect("broker running");
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .expect("proc fd")
        .count()
}

/// Whether the peer has closed `stream` within `within` (anything it sends
/// first is discarded).
async fn closed_within(stream: &mut TcpStream, within: Duration) -> bool {
    let deadline = tokio::time::Instant::now() + within;
    let mut scratch = [0u8; 4096];
    loop {
        match tokio::time::timeout_at(deadline, stream.read(&mut scratch)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return true,
            Ok(Ok(_)) => {}
            Err(_) => return false,
        }
    }
}

/// Opens a WebSocket by hand (so frames can be written raw afterwards);
/// panics unless the server answers 101.
async fn ws_upgrade(addr: SocketAddr) -> TcpStream {
    let mut s = TcpStream::connect(addr).await.expect("connect");
    let request = format!(
        "GET /mqtt HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\
         Sec-WebSocket-Protocol: mqtt\r\n\r\n"
    );
    s.write_all(request.as_bytes())
        .await
        .expect("upgrade request");
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        let n = tokio::time::timeout(PATIENCE, s.read(&mut byte))
            .await
            .expect("upgrade answer in time")
            .expect("read upgrade answer");
        assert_eq!(
            n,
            1,
            "closed during the upgrade: {:?}",
            String::from_utf8_lossy(&head)
        );
        head.push(byte[0]);
    }
    assert!(
        head.starts_with(b"HTTP/1.1 101"),
        "{}",
        String::from_utf8_lossy(&head)
    );
    s
}

/// A masked client frame (RFC 6455 §5.2): `opcode` 0 is a continuation,
/// 2 binary; `fin` marks the last frame of a message.
fn ws_frame(opcode: u8, fin: bool, payload: &[u8]) -> Vec<u8> {
    let mask = [0x12, 0x34, 0x56, 0x78];
    let mut frame = vec![if fin { 0x80 } else { 0 } | opcode];
    match payload.len() {
        n if n < 126 => frame.push(0x80 | n as u8),
        n if n <= 0xFFFF => {
            frame.push(0x80 | 126);
            frame.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            frame.push(0x80 | 127);
            frame.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    frame.extend_from_slice(&mask);
    frame.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    frame
}

/// Writes `bytes` unless the broker has closed the connection; false then.
async fn try_write(s: &mut TcpStream, bytes: &[u8]) -> bool {
    matches!(
        tokio::time::timeout(PATIENCE, s.write_all(bytes)).await,
        Ok(Ok(()))
    )
}

// ------------------------------------------------------------ MQTT

/// Twenty clients trickle the bytes of a CONNECT, one every 200 ms, and
/// never finish it. Each is closed once `connect_timeout_secs` has passed
/// (trickling does not extend it), and counted; meanwhile a healthy client
/// keeps its round trip.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connect_trickled_and_never_finished_is_closed_at_the_connect_timeout() {
    let b = Broker::start(&config(""));
    let mut healthy = Healthy::connect(b.addr).await;
    let idle = healthy.worst_of(10).await;

    // A CONNECT announcing 100 bytes, of which only 15 will come.
    let mut connect = raw::connect_v4("slow");
    connect[1] = 100;
    let mut slow = Vec::new();
    for _ in 0..20 {
        slow.push(TcpStream::connect(b.addr).await.expect("connect"));
    }
    let trickle = tokio::spawn(async move {
        let mut closed = vec![false; slow.len()];
        for byte in connect.iter().cycle().take(15) {
            for (i, s) in slow.iter_mut().enumerate() {
                if !closed[i] && s.write_all(&[*byte]).await.is_err() {
                    closed[i] = true;
                }
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        let mut all_closed = true;
        for s in &mut slow {
            all_closed &= closed_within(s, Duration::from_secs(3)).await;
        }
        all_closed
    });
    let busy = healthy.worst_of(50).await;
    let all_closed = trickle.await.expect("trickle task");
    assert!(all_closed, "a trickling CONNECT was never closed");
    assert_still_served(idle, busy);
    metric_becomes(
        &b,
        "chatmq_connections_refused_total{reason=\"connect_timeout\"}",
        20.0,
    )
    .await;
}

/// A CONNECT larger than `mqtt.max_connect_packet` is refused from its
/// fixed header, before its body is read: an unauthenticated client cannot
/// make the broker buffer a will payload the size of `max_payload`.
#[tokio::test]
async fn a_connect_over_the_pre_connect_limit_is_refused_from_its_header() {
    let b = Broker::start(&config("max_connect_packet = 1024\nmax_payload = 1048576"));
    let will = rumqttc::LastWill::new("wills/big", vec![b'x'; 4096], QoS::AtMostOnce, false);
    let mut connect = p4::Connect::new("big-will");
    connect.last_will = Some(will);
    let mut w = Wire::open(b.addr).await;
    w.send_v4(&p4::Packet::Connect(connect)).await;
    assert_eq!(w.next_v4(PATIENCE).await, Err(Silence::Closed));
    metric_becomes(
        &b,
        "chatmq_connections_refused_total{reason=\"connect_too_large\"}",
        1.0,
    )
    .await;
    // A CONNECT within the limit, will included, is served as before.
    let will = rumqttc::LastWill::new("wills/small", vec![b'x'; 512], QoS::AtMostOnce, false);
    let mut connect = p4::Connect::new("small-will");
    connect.last_will = Some(will);
    let mut w = Wire::open(b.addr).await;
    w.send_v4(&p4::Packet::Connect(connect)).await;
    assert!(matches!(
        w.next_v4(PATIENCE).await,
        Ok(p4::Packet::ConnAck(a)) if a.code == p4::ConnectReturnCode::Success
    ));
}

/// A flood: 100 connections that never send CONNECT and 100 that do,
/// against `max_connections = 40`. The permit is taken before `accept`, so
/// the broker never holds more than 40 of them (the rest wait in the
/// backlog), its memory stays bounded, the silent ones are closed by the
/// connect timeout, and once the clients leave, the connection gauge is
/// back to 0 and every descriptor is released.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_half_silent_is_held_to_max_connections_and_fully_released() {
    let b = Broker::start(&config("max_connections = 40"));
    let fds_before = open_fds(&b);
    let rss_before = rss_kib(&b);

    let mut flood = Vec::new();
    for i in 0..200 {
        let mut s = TcpStream::connect(b.addr).await.expect("connect");
        if i % 2 == 0 {
            let _ = s.write_all(&raw::connect_v4(&format!("flood-{i}"))).await;
        }
        flood.push(s);
    }
    let mut peak_fds = 0;
    let mut peak_rss = 0;
    for _ in 0..30 {
        peak_fds = peak_fds.max(open_fds(&b));
        peak_rss = peak_rss.max(rss_kib(&b));
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        peak_fds <= fds_before + 40 + 8,
        "the broker held {} descriptors for a limit of 40 connections (before: {fds_before})",
        peak_fds
    );
    // 40 connections cost far less than this; the bound is for a leak.
    assert!(
        peak_rss <= rss_before + 64 * 1024,
        "RSS grew from {rss_before} KiB to {peak_rss} KiB"
    );
    assert!(metric(&b, "chatmq_connections").await <= 40.0);

    drop(flood);
    metric_becomes(&b, "chatmq_connections", 0.0).await;
    let deadline = Instant::now() + PATIENCE;
    while open_fds(&b) > fds_before + 2 {
        assert!(
            Instant::now() < deadline,
            "descriptors not released: {} open, {fds_before} before the flood",
            open_fds(&b)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // The broker still serves.
    Healthy::connect(b.addr).await.round_trip().await;
}

/// `mqtt.max_connections_per_ip = 3`: a fourth connection from the same
/// address is closed at once, on the TCP and the WebSocket listener alike,
/// while the three it holds stay served; a place freed is free again.
#[tokio::test]
async fn connections_per_address_are_limited_on_every_listener() {
    let b = Broker::start(&config("max_connections_per_ip = 3"));
    let mut held = Vec::new();
    for i in 0..2 {
        held.push(Healthy::connect_as(b.addr, &format!("held-{i}")).await);
    }
    let mut ws_held = ws_upgrade(b.ws_addr()).await;
    ws_held
        .write_all(&ws_frame(2, true, &raw::connect_v4("held-ws")))
        .await
        .expect("CONNECT over WebSocket");
    let mut fourth = TcpStream::connect(b.addr).await.expect("connect");
    assert!(
        closed_within(&mut fourth, PATIENCE).await,
        "the fourth stays open"
    );
    let mut fourth_ws = TcpStream::connect(b.ws_addr()).await.expect("connect");
    assert!(
        closed_within(&mut fourth_ws, PATIENCE).await,
        "the fourth (ws) stays open"
    );
    for h in &mut held {
        h.round_trip().await;
    }
    metric_becomes(
        &b,
        "chatmq_connections_refused_total{reason=\"address_limit\"}",
        2.0,
    )
    .await;
    drop(ws_held);
    // The broker notices the closed socket, then frees the place.
    let deadline = Instant::now() + PATIENCE;
    loop {
        let mut w = Wire::open(b.addr).await;
        w.send(&raw::connect_v4("freed")).await;
        match w.next_v4(Duration::from_secs(2)).await {
            Ok(p4::Packet::ConnAck(_)) => break,
            _ if Instant::now() < deadline => tokio::time::sleep(Duration::from_millis(50)).await,
            other => panic!("a freed place stays taken: {other:?}"),
        }
    }
}

/// `accept_rate_per_ip = 1` after a burst of 2: a third connection opened
/// at once is closed and counted; a second later there is room again.
#[tokio::test]
async fn an_address_opening_connections_too_fast_is_refused() {
    let b = Broker::start(&config("accept_rate_per_ip = 1\naccept_burst_per_ip = 2"));
    let mut first = Healthy::connect_as(b.addr, "first").await;
    let _second = TcpStream::connect(b.ws_addr()).await.expect("connect");
    let mut third = TcpStream::connect(b.addr).await.expect("connect");
    assert!(
        closed_within(&mut third, PATIENCE).await,
        "the third stays open"
    );
    first.round_trip().await;
    assert_eq!(
        metric(
            &b,
            "chatmq_connections_refused_total{reason=\"address_rate\"}"
        )
        .await,
        1.0
    );
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let mut w = Wire::open(b.addr).await;
    w.send(&raw::connect_v4("later")).await;
    assert!(matches!(
        w.next_v4(PATIENCE).await,
        Ok(p4::Packet::ConnAck(_))
    ));
}

// ------------------------------------------------------------ WebSocket

/// Slowloris over WebSocket: twenty upgrade requests trickled and never
/// finished, and twenty upgraded connections whose first message (a
/// fragment of a CONNECT) never ends. The first are closed by the
/// handshake timeout, the others by the connect timeout; a healthy client
/// keeps its round trip meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_upgrades_and_messages_never_finished_are_closed_by_timeouts() {
    let b = Broker::start(&config(""));
    let mut healthy = Healthy::connect(b.addr).await;
    let idle = healthy.worst_of(10).await;

    let ws = b.ws_addr();
    let mut upgrades = Vec::new();
    let mut fragments = Vec::new();
    for _ in 0..20 {
        let mut s = TcpStream::connect(ws).await.expect("connect");
        s.write_all(b"GET /mqtt HTTP/1.1\r\nHost: x\r\n")
            .await
            .expect("write");
        upgrades.push(s);
        let mut s = ws_upgrade(ws).await;
        let connect = raw::connect_v4("fragmented");
        s.write_all(&ws_frame(2, false, &connect[..4]))
            .await
            .expect("write");
        fragments.push(s);
    }
    let attack = tokio::spawn(async move {
        // Keep both kinds busy: a header line, a continuation byte.
        for _ in 0..8 {
            for s in &mut upgrades {
                let _ = s.write_all(b"X-Slow: 1\r\n").await;
            }
            for s in &mut fragments {
                let _ = s.write_all(&ws_frame(0, false, b"\x00")).await;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        let mut open = 0;
        for s in upgrades.iter_mut().chain(fragments.iter_mut()) {
            if !closed_within(s, Duration::from_secs(3)).await {
                open += 1;
            }
        }
        open
    });
    let busy = healthy.worst_of(20).await;
    assert_eq!(
        attack.await.expect("attack task"),
        0,
        "slow connections left open"
    );
    assert_still_served(idle, busy);
    metric_becomes(
        &b,
        "chatmq_connections_refused_total{reason=\"handshake\"}",
        20.0,
    )
    .await;
    metric_becomes(
        &b,
        "chatmq_connections_refused_total{reason=\"connect_timeout\"}",
        20.0,
    )
    .await;
}

/// The hostile run's case: twenty unauthenticated WebSocket connections
/// each send a fragmented message of up to 15 MB and never finish it
/// (`max_message_size` is 16 MiB). Before CONNECT a message may not exceed
/// `max_connect_packet`, so each is closed after its first 64 KiB or so,
/// and the broker's memory does not grow by the 300 MB they offered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unfinished_huge_websocket_messages_before_connect_cost_no_memory() {
    // Long enough that no connection is closed for being slow.
    let b = Broker::start(&config("connect_timeout_secs = 60"));
    let rss_before = rss_kib(&b);
    let megabyte = vec![0x10u8; 1 << 20];
    let mut sockets = Vec::new();
    for _ in 0..20 {
        sockets.push(ws_upgrade(b.ws_addr()).await);
    }
    let mut refused = 0;
    for s in &mut sockets {
        let mut sent = 0;
        let mut open = try_write(s, &ws_frame(2, false, &megabyte)).await;
        while open && sent < 14 {
            open = try_write(s, &ws_frame(0, false, &megabyte)).await;
            sent += 1;
        }
        if !open || closed_within(s, Duration::from_secs(3)).await {
            refused += 1;
        }
    }
    let rss_after = rss_kib(&b);
    assert_eq!(refused, 20, "unfinished messages were held");
    assert!(
        rss_after <= rss_before + 64 * 1024,
        "RSS grew from {rss_before} KiB to {rss_after} KiB"
    );
}

/// After CONNECT, a WebSocket message may be as large as an MQTT packet
/// and no larger: a message of six 64 KiB fragments (`max_payload` 256 KiB,
/// so packets of at most 321 KiB, though `max_message_size` says 16 MiB) is
/// refused with close code 1009 (Message Too Big) before it is assembled.
#[tokio::test]
async fn a_websocket_message_over_the_mqtt_packet_limit_is_refused_with_1009() {
    let b = Broker::start(&config(""));
    let mut s = ws_upgrade(b.ws_addr()).await;
    s.write_all(&ws_frame(2, true, &raw::connect_v4("big-message")))
        .await
        .expect("CONNECT");
    let mut connack = [0u8; 6];
    tokio::time::timeout(PATIENCE, s.read_exact(&mut connack))
        .await
        .expect("CONNACK in time")
        .expect("CONNACK");
    assert_eq!(&connack[2..4], &[0x20, 2], "a CONNACK in one binary frame");
    let fragment = vec![0u8; 64 * 1024];
    let mut open = try_write(&mut s, &ws_frame(2, false, &fragment)).await;
    for _ in 0..5 {
        open = open && try_write(&mut s, &ws_frame(0, false, &fragment)).await;
    }
    // The broker's close frame: opcode 8, status 1009.
    let mut answer = Vec::new();
    let mut buf = [0u8; 1024];
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while let Ok(Ok(n)) = tokio::time::timeout_at(deadline, s.read(&mut buf)).await {
        if n == 0 {
            break;
        }
        answer.extend_from_slice(&buf[..n]);
    }
    let close = answer
        .windows(4)
        .any(|w| w[0] == 0x88 && w[2..4] == 1009u16.to_be_bytes());
    assert!(
        close,
        "no close frame with 1009 (open: {open}): {answer:02x?}"
    );
}

// ------------------------------------------------------------ HTTP

/// Fifty requests whose headers never end (a header line every 200 ms) and
/// fifty whose body never ends are all closed: the first by the header
/// timeout, the others answered 408 with the JSON error body. Before, none
/// of the hundred was closed after 45 s. A healthy HTTP client and a
/// healthy MQTT client keep being served meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_requests_that_never_finish_are_closed_by_timeouts() {
    let b = Broker::start(&config(""));
    let http = Http::new(b.http_addr);
    let mut healthy = Healthy::connect(b.addr).await;
    let idle = healthy.worst_of(10).await;

    let mut heads = Vec::new();
    let mut bodies = Vec::new();
    for _ in 0..50 {
        let mut s = TcpStream::connect(b.http_addr).await.expect("connect");
        s.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
            .await
            .expect("write");
        heads.push(s);
        let mut s = TcpStream::connect(b.http_addr).await.expect("connect");
        let head = format!(
            "POST /v1/conversations HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {ADMIN}\r\n\
             Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n{{\"title\""
        );
        s.write_all(head.as_bytes()).await.expect("write");
        bodies.push(s);
    }
    let attack = tokio::spawn(async move {
        for _ in 0..8 {
            for s in &mut heads {
                let _ = s.write_all(b"X-Slow: 1\r\n").await;
            }
            for s in &mut bodies {
                let _ = s.write_all(b" ").await;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        let mut open = 0;
        for s in &mut heads {
            if !closed_within(s, Duration::from_secs(3)).await {
                open += 1;
            }
        }
        let mut answered_408 = 0;
        for s in &mut bodies {
            let mut answer = Vec::new();
            let read = tokio::time::timeout(Duration::from_secs(3), s.read_to_end(&mut answer));
            match read.await {
                Ok(_) => {
                    let text = String::from_utf8_lossy(&answer);
                    if text.starts_with("HTTP/1.1 408") && text.contains("\"code\":\"timeout\"") {
                        answered_408 += 1;
                    }
                }
                Err(_) => open += 1,
            }
        }
        (open, answered_408)
    });
    let mut http_served = 0;
    for _ in 0..5 {
        if http.get("/healthz").await.status == 200 {
            http_served += 1;
        }
    }
    let busy = healthy.worst_of(20).await;
    let (open, answered_408) = attack.await.expect("attack task");
    assert_eq!(open, 0, "never-ending HTTP requests left open");
    assert_eq!(answered_408, 50, "never-ending bodies not answered 408");
    assert_eq!(http_served, 5);
    assert_still_served(idle, busy);
    metric_becomes(&b, "chatmq_http_timeouts_total{phase=\"header\"}", 50.0).await;
    metric_becomes(&b, "chatmq_http_timeouts_total{phase=\"request\"}", 50.0).await;
}

/// `http.max_connections = 4`: four silent connections hold every permit,
/// and a fifth request waits in the backlog, to be served as soon as the
/// header timeout frees a permit, not refused and not lost.
#[tokio::test]
async fn http_connections_beyond_the_limit_wait_for_a_permit() {
    let b = Broker::start(&format!("{}\n", config("")).replace(
        "request_timeout_secs = 1",
        "request_timeout_secs = 1\nmax_connections = 4",
    ));
    let mut silent = Vec::new();
    for _ in 0..4 {
        silent.push(TcpStream::connect(b.http_addr).await.expect("connect"));
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let r = Http::new(b.http_addr).get("/healthz").await;
    assert_eq!(r.status, 200);
    for s in &mut silent {
        assert!(closed_within(s, PATIENCE).await);
    }
}

/// Sends `request` as is on a fresh connection and reads the whole answer.
async fn raw_http(addr: SocketAddr, request: &[u8]) -> (u16, String, serde_json::Value) {
    let mut s = TcpStream::connect(addr).await.expect("connect");
    let _ = s.write_all(request).await;
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(PATIENCE, s.read_to_end(&mut answer)).await;
    let text = String::from_utf8_lossy(&answer).into_owned();
    let (head, body) = text
        .split_once("\r\n\r\n")
        .unwrap_or_else(|| panic!("no answer head in {text:?}"));
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("bad status line in {head:?}"));
    let json = serde_json::from_str(body)
        .unwrap_or_else(|e| panic!("status {status}: body is not JSON ({e}): {body:?}"));
    (status, head.to_ascii_lowercase(), json)
}

/// Every error answer has the API's JSON shape, whoever gave it: axum's
/// 405 (keeping its `Allow`), hyper's own 414 for a URI over 64 KiB and 400
/// for a `Content-Length` that is no number, and 413 for a body announced
/// far larger than allowed.
#[tokio::test]
async fn every_http_error_answer_has_the_json_error_body() {
    let b = Broker::start(&config(""));
    let addr = b.http_addr;

    let (status, head, json) = raw_http(
        addr,
        b"DELETE /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(status, 405);
    assert_eq!(json["error"]["code"], "method_not_allowed");
    assert!(head.contains("\r\nallow: "), "{head}");
    assert!(head.contains("content-type: application/json"), "{head}");

    let long = format!(
        "GET /v1/conversations?q={} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        "a".repeat(70_000)
    );
    let (status, _, json) = raw_http(addr, long.as_bytes()).await;
    assert_eq!(status, 414);
    assert_eq!(json["error"]["code"], "uri_too_long");

    let huge = format!(
        "POST /v1/conversations HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {ADMIN}\r\n\
         Content-Length: 1000000000000\r\nConnection: close\r\n\r\n{{}}"
    );
    let (status, _, json) = raw_http(addr, huge.as_bytes()).await;
    assert_eq!(status, 413);
    assert_eq!(json["error"]["code"], "too_large");

    let nonsense = b"POST /v1/conversations HTTP/1.1\r\nHost: x\r\n\
        Content-Length: 99999999999999999999999999\r\n\r\n";
    let (status, _, json) = raw_http(addr, nonsense).await;
    assert_eq!(status, 400);
    assert_eq!(json["error"]["code"], "bad_request");
}
