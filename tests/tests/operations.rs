//! Operations: what an operator sees when starting, stopping and
//! misconfiguring the broker, and how it copes with misbehaving clients
//! and its configured limits.

use std::path::Path;
use std::time::Duration;

use chatmq_tests::raw::{self, p5, Silence, Wire};
use chatmq_tests::{run_chatmq, the_error_line, v4, v5, Broker, OPEN, PATIENCE};
use tokio::io::AsyncWriteExt;

const QUIET: Duration = Duration::from_millis(500);

/// A data directory override inside `dir`, so failed starts leave nothing
/// behind in the working tree.
fn data_in(dir: &Path) -> String {
    dir.join("data").display().to_string()
}

// An operator stops the broker with SIGTERM (systemd, docker stop). It
// exits with status 0; a connected MQTT 5 client is told DISCONNECT 0x8B
// (Server shutting down) and a 3.1.1 client's connection is closed. The
// will of a client connected at shutdown is not published. Queued
// messages of a persistent session were flushed: after a restart the
// session is there with all three, and nothing else.
#[tokio::test]
async fn sigterm_disconnects_clients_flushes_and_exits_zero() {
    let mut broker = Broker::start(&format!("[storage]\nsync = \"never\"\n{OPEN}"));
    let mut night = {
        let mut o = v4::options(broker.addr, "night-shift");
        o.set_clean_session(false);
        v4::connect(o).await.expect("night-shift")
    };
    night.subscribe("jobs/#", v4::QoS::AtLeastOnce).await;
    night.disconnect().await;
    let mut boss = v4::connect_ok(broker.addr, "boss").await;
    for i in 1..=3 {
        boss.publish_acked(
            "jobs/todo",
            v4::QoS::AtLeastOnce,
            false,
            format!("job {i}").as_bytes(),
        )
        .await;
    }
    let mut watcher = {
        let mut o = v5::options(broker.addr, "watcher");
        o.set_last_will(v5::LastWill::new(
            "jobs/watcher-gone",
            "gone",
            v5::QoS::AtLeastOnce,
            false,
            None,
        ));
        v5::connect(o).await.expect("watcher")
    };

    let status = broker.terminate();
    assert_eq!(status.code(), Some(0), "log:\n{}", broker.log());
    match watcher.next().await {
        Err(e) => assert!(
            e.contains("ServerShuttingDown"),
            "expected DISCONNECT 0x8B, got {e}"
        ),
        Ok(p) => panic!("expected DISCONNECT 0x8B, got {p:?}"),
    }
    assert!(boss.next().await.is_err(), "the 3.1.1 client is closed");

    broker.restart();
    let mut night = {
        let mut o = v4::options(broker.addr, "night-shift");
        o.set_clean_session(false);
        v4::connect(o).await.expect("night-shift after restart")
    };
    assert!(night.connack.session_present);
    for i in 1..=3 {
        assert_eq!(
            &night.publish().await.payload[..],
            format!("job {i}").as_bytes()
        );
    }
    night.no_publish(QUIET).await;
}

// `chatmq serve --config missing.toml`: exit non-zero with one line on
// stderr naming the file.
#[test]
fn a_missing_config_file_is_named() {
    let dir = tempfile::tempdir().expect("temp dir");
    let missing = dir.path().join("missing.toml");
    let out = run_chatmq(
        dir.path(),
        &["serve", "--config", missing.to_str().expect("utf-8")],
        &[],
    );
    let line = the_error_line(&out);
    assert!(line.contains(&missing.display().to_string()), "{line}");
}

// A typo in a key (`max_paylod`) is not silently ignored: the one error
// line names the key in full, `mqtt.max_paylod`.
#[test]
fn an_unknown_key_is_named() {
    let dir = tempfile::tempdir().expect("temp dir");
    std::fs::write(dir.path().join("typo.toml"), "[mqtt]\nmax_paylod = 1\n").expect("write");
    let out = run_chatmq(
        dir.path(),
        &["serve", "--config", "typo.toml"],
        &[("CHATMQ__NODE__DATA_DIR", &data_in(dir.path()))],
    );
    let line = the_error_line(&out);
    assert!(line.contains("mqtt.max_paylod"), "{line}");
    let out = run_chatmq(
        dir.path(),
        &["config", "check", "--config", "typo.toml"],
        &[],
    );
    assert!(the_error_line(&out).contains("mqtt.max_paylod"));
}

// A value of the wrong type names the key and what was expected.
#[test]
fn a_wrong_type_is_named() {
    let dir = tempfile::tempdir().expect("temp dir");
    std::fs::write(
        dir.path().join("bad.toml"),
        "[mqtt]\nmax_payload = \"big\"\n",
    )
    .expect("write");
    let out = run_chatmq(
        dir.path(),
        &["serve", "--config", "bad.toml"],
        &[("CHATMQ__NODE__DATA_DIR", &data_in(dir.path()))],
    );
    let line = the_error_line(&out);
    assert!(line.contains("mqtt.max_payload"), "{line}");
    // An environment override is checked the same way.
    std::fs::write(dir.path().join("good.toml"), OPEN).expect("write");
    let out = run_chatmq(
        dir.path(),
        &["serve", "--config", "good.toml"],
        &[
            ("CHATMQ__MQTT__MAX_PAYLOAD", "lots"),
            ("CHATMQ__NODE__DATA_DIR", &data_in(dir.path())),
        ],
    );
    let line = the_error_line(&out);
    assert!(line.to_lowercase().contains("max_payload"), "{line}");
}

// `chatmq config check` on a good file exits 0 without starting anything.
#[test]
fn config_check_accepts_a_good_file() {
    let dir = tempfile::tempdir().expect("temp dir");
    std::fs::write(
        dir.path().join("good.toml"),
        format!("[mqtt]\nmax_payload = 1000\nlisten = \"127.0.0.1:0\"\n{OPEN}"),
    )
    .expect("write");
    let out = run_chatmq(
        dir.path(),
        &["config", "check", "--config", "good.toml"],
        &[("CHATMQ__NODE__DATA_DIR", &data_in(dir.path()))],
    );
    assert!(
        out.status.success(),
        "stderr: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

// Another process already listens on the MQTT port: the broker exits
// non-zero with one line naming mqtt.listen and the address.
#[test]
fn a_port_in_use_is_named() {
    let dir = tempfile::tempdir().expect("temp dir");
    std::fs::write(dir.path().join("c.toml"), OPEN).expect("write");
    let squatter = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = squatter.local_addr().expect("addr").to_string();
    let out = run_chatmq(
        dir.path(),
        &["serve", "--config", "c.toml"],
        &[
            ("CHATMQ__MQTT__LISTEN", &addr),
            ("CHATMQ__NODE__DATA_DIR", &data_in(dir.path())),
        ],
    );
    let line = the_error_line(&out);
    assert!(line.contains("mqtt.listen"), "{line}");
    assert!(line.contains(&addr), "{line}");
}

// The data directory points at a regular file: the one error line names
// node.data_dir and the path.
#[test]
fn an_unusable_data_dir_is_named() {
    let dir = tempfile::tempdir().expect("temp dir");
    std::fs::write(dir.path().join("c.toml"), OPEN).expect("write");
    let file = dir.path().join("not-a-dir");
    std::fs::write(&file, "x").expect("write");
    let path = file.display().to_string();
    let out = run_chatmq(
        dir.path(),
        &["serve", "--config", "c.toml"],
        &[("CHATMQ__NODE__DATA_DIR", &path)],
    );
    let line = the_error_line(&out);
    assert!(line.contains("node.data_dir"), "{line}");
    assert!(line.contains(&path), "{line}");
}

/// A well-behaved client still gets service: it subscribes, publishes at
/// QoS 1 and receives its message.
async fn still_serving(broker: &Broker, tag: &str) {
    let mut c = v4::connect_ok(broker.addr, &format!("healthy-{tag}")).await;
    let topic = format!("health/{tag}");
    c.subscribe(&topic, v4::QoS::AtLeastOnce).await;
    c.client
        .publish(&topic, v4::QoS::AtLeastOnce, false, b"ok".to_vec())
        .await
        .expect("queue publish");
    assert_eq!(&c.publish().await.payload[..], b"ok", "after {tag}");
    c.disconnect().await;
}

/// Opens a raw 3.1.1 connection and completes CONNECT.
async fn connected_v4(broker: &Broker, id: &str) -> tokio::net::TcpStream {
    let mut s = raw::open(broker.addr).await;
    s.write_all(&raw::connect_v4(id)).await.expect("write");
    let got = raw::read_for(&mut s, Duration::from_millis(300)).await;
    assert_eq!(got, [0x20, 0x02, 0x00, 0x00], "CONNACK accepted");
    s
}

/// Sends `bytes` and asserts the broker answers nothing and closes.
async fn closes_silently(s: &mut tokio::net::TcpStream, bytes: &[u8], what: &str) {
    let (got, closed) = raw::exchange(s, bytes).await;
    assert!(closed, "{what}: the connection was not closed");
    assert!(got.is_empty(), "{what}: the broker answered {got:02x?}");
}

fn xorshift_bytes(mut seed: u64, n: usize) -> Vec<u8> {
    (0..n)
        .map(|_| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed as u8
        })
        .collect()
}

// Garbage instead of CONNECT: an HTTP request sent to the MQTT port, and
// pseudo-random bytes. Each connection is closed without an answer (the
// first packet must be CONNECT [MQTT-3.1.0-1]), promptly (the broker does
// not wait for the body the garbage seems to announce), and the broker
// keeps serving others.
#[tokio::test]
async fn garbage_closes_only_that_connection() {
    let broker = Broker::start(OPEN);
    let mut s = raw::open(broker.addr).await;
    closes_silently(&mut s, b"GET /mqtt HTTP/1.1\r\nHost: x\r\n\r\n", "HTTP").await;
    still_serving(&broker, "http").await;

    for seed in [1u64, 0xDEADBEEF, 0x2545F4914F6CDD1D] {
        let mut bytes = xorshift_bytes(seed, 64);
        if bytes[0] >> 4 == 1 {
            bytes[0] ^= 0x40; // not CONNECT
        }
        let mut s = raw::open(broker.addr).await;
        closes_silently(&mut s, &bytes, "random bytes").await;
        still_serving(&broker, &format!("random-{seed:x}")).await;
    }

    // Garbage after a valid CONNECT closes that session's connection too.
    let mut s = connected_v4(&broker, "then-garbage").await;
    closes_silently(&mut s, b"\x00\x00\x00\x00", "reserved type 0").await;
    still_serving(&broker, "after-connect").await;
}

// A Remaining Length longer than four bytes is malformed (MQTT 2.2.3):
// closed, others unaffected.
#[tokio::test]
async fn a_remaining_length_over_four_bytes_closes_the_connection() {
    let broker = Broker::start(OPEN);
    let mut s = connected_v4(&broker, "long-length").await;
    closes_silently(
        &mut s,
        &[0x30, 0xFF, 0xFF, 0xFF, 0xFF, 0x01],
        "5-byte length",
    )
    .await;
    still_serving(&broker, "long-length").await;
}

// A SUBSCRIBE whose fixed-header flags are 0000 instead of 0010 is
// malformed [MQTT-3.8.1-1]: no SUBACK, the connection is closed.
#[tokio::test]
async fn a_subscribe_with_wrong_flags_closes_the_connection() {
    let broker = Broker::start(OPEN);
    let mut s = connected_v4(&broker, "bad-subscribe").await;
    let bad = [0x80, 0x08, 0x00, 0x01, 0x00, 0x03, b'a', b'/', b'b', 0x01];
    closes_silently(&mut s, &bad, "SUBSCRIBE flags 0000").await;
    still_serving(&broker, "bad-subscribe").await;
}

// A PUBLISH with both QoS bits set is malformed [MQTT-3.3.1-4]; it is not
// routed and the connection is closed.
#[tokio::test]
async fn a_publish_with_qos_3_closes_the_connection() {
    let broker = Broker::start(OPEN);
    let mut watcher = v4::connect_ok(broker.addr, "watcher").await;
    watcher.subscribe("q3/#", v4::QoS::AtLeastOnce).await;
    let mut s = connected_v4(&broker, "qos-3").await;
    let bad = [0x36, 0x07, 0x00, 0x03, b'q', b'3', b'/', 0x00, 0x01];
    closes_silently(&mut s, &bad, "PUBLISH QoS 3").await;
    watcher.no_publish(QUIET).await;
    still_serving(&broker, "qos-3").await;
}

// A CONNECT with the reserved flag set is malformed [MQTT-3.1.2-3]: no
// CONNACK, closed.
#[tokio::test]
async fn a_connect_with_the_reserved_flag_closes_the_connection() {
    let broker = Broker::start(OPEN);
    let mut connect = raw::connect_v4("reserved-flag");
    connect[9] |= 0x01; // fixed header (2) + protocol name (6) + level (1)
    let mut s = raw::open(broker.addr).await;
    closes_silently(&mut s, &connect, "CONNECT reserved flag").await;
    still_serving(&broker, "reserved-flag").await;
}

// A client sends half a CONNECT and goes away: the broker cleans up and
// keeps serving.
#[tokio::test]
async fn a_truncated_connect_followed_by_close_is_cleaned_up() {
    let broker = Broker::start(OPEN);
    let connect = raw::connect_v4("half");
    let mut s = raw::open(broker.addr).await;
    s.write_all(&connect[..7]).await.expect("write");
    s.shutdown().await.expect("shutdown");
    let got = raw::read_for(&mut s, PATIENCE).await;
    assert!(got.is_empty(), "no CONNACK for half a CONNECT: {got:02x?}");
    still_serving(&broker, "half").await;
}

const SMALL: &str = "[mqtt]\nmax_payload = 1000\n";

// With mqtt.max_payload = 1000, a 3.1.1 client announcing a 1 MB PUBLISH
// is closed as soon as the header arrives, without the broker reading (or
// waiting for) the megabyte. Before CONNECT, a 1 MB CONNECT is refused the
// same way.
#[tokio::test]
async fn a_v4_packet_declared_over_the_limit_closes_at_once() {
    let broker = Broker::start(&format!("{SMALL}{OPEN}"));
    let mut header = vec![0x30];
    header.extend([0x80, 0x80, 0x40]); // 1 MiB, body never sent
    let mut s = connected_v4(&broker, "huge").await;
    closes_silently(&mut s, &header, "1 MB PUBLISH").await;
    still_serving(&broker, "huge").await;

    let mut s = raw::open(broker.addr).await;
    closes_silently(&mut s, &[0x10, 0x80, 0x80, 0x40], "1 MB CONNECT").await;
    still_serving(&broker, "huge-connect").await;
}

// The same in MQTT 5, which can be told why: DISCONNECT 0x95 (Packet too
// large), then the connection closes. A payload over max_payload in a
// packet under the announced Maximum Packet Size is refused with PUBACK
// 0x97 (Quota exceeded) and not delivered; the connection stays up.
#[tokio::test]
async fn v5_oversized_packets_and_payloads() {
    let broker = Broker::start(&format!("{SMALL}{OPEN}"));
    let mut w = Wire::open(broker.addr).await;
    let c = p5::Connect {
        keep_alive: 60,
        client_id: "huge5".into(),
        clean_start: true,
        properties: None,
    };
    w.send_v5(&p5::Packet::Connect(c, None, None)).await;
    match w.next_v5(PATIENCE).await {
        Ok(p5::Packet::ConnAck(a)) => {
            assert_eq!(a.code, p5::ConnectReturnCode::Success);
            let max = a.properties.and_then(|p| p.max_packet_size);
            assert!(
                max.is_some_and(|m| m < 1 << 20),
                "Maximum Packet Size announced: {max:?}"
            );
        }
        other => panic!("expected CONNACK, got {other:?}"),
    }
    w.send(&[0x30, 0x80, 0x80, 0x40]).await;
    match w.next_v5(PATIENCE).await {
        Ok(p5::Packet::Disconnect(d)) => {
            assert_eq!(d.reason_code, p5::DisconnectReasonCode::PacketTooLarge)
        }
        other => panic!("expected DISCONNECT 0x95, got {other:?}"),
    }
    assert!(matches!(w.next_v5(PATIENCE).await, Err(Silence::Closed)));
    still_serving(&broker, "huge5").await;

    let mut watcher = v5::connect_ok(broker.addr, "watcher").await;
    watcher.subscribe("big/#", v5::QoS::AtLeastOnce).await;
    let mut sender = v5::connect_ok(broker.addr, "sender").await;
    match sender
        .publish_acked("big/file", v5::QoS::AtLeastOnce, false, &[7u8; 2000])
        .await
    {
        Some(v5::Packet::PubAck(a)) => assert_eq!(a.reason, v5::PubAckReason::QuotaExceeded),
        other => panic!("expected PUBACK 0x97, got {other:?}"),
    }
    match sender
        .publish_acked("big/file", v5::QoS::AtLeastOnce, false, &[7u8; 1000])
        .await
    {
        Some(v5::Packet::PubAck(a)) => assert_eq!(a.reason, v5::PubAckReason::Success),
        other => panic!("expected PUBACK, got {other:?}"),
    }
    let got = watcher.publish().await;
    assert_eq!(got.payload.len(), 1000, "only the payload within the limit");
    watcher.no_publish(QUIET).await;
}

// With mqtt.max_connections = 3, a fourth client is not served while three
// are connected: the broker takes a permit before it accepts, so the fourth
// waits unread (no CONNACK, no memory spent on it). Once one leaves, the
// waiting client gets in.
#[tokio::test]
async fn max_connections_holds_the_one_too_many_until_a_place_frees() {
    let broker = Broker::start(&format!("[mqtt]\nmax_connections = 3\n{OPEN}"));
    let first = v4::connect_ok(broker.addr, "c1").await;
    let _second = v4::connect_ok(broker.addr, "c2").await;
    let _third = v4::connect_ok(broker.addr, "c3").await;
    let fourth = tokio::spawn(v4::connect(v4::options(broker.addr, "c4")));
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(
        !fourth.is_finished(),
        "a fourth connection was answered while three were connected"
    );

    first.disconnect().await;
    let served = tokio::time::timeout(PATIENCE, fourth)
        .await
        .expect("the waiting client was not served after a place freed")
        .expect("join");
    assert!(
        served.is_ok(),
        "the waiting client was refused: {:?}",
        served.err()
    );
}

// With mqtt.max_subscriptions = 2, a session's third filter is refused
// (MQTT 5 SUBACK 0x97 Quota exceeded, 3.1.1 0x80); re-subscribing to a
// filter it has is a replacement, not a new one; after an unsubscribe
// there is room again.
#[tokio::test]
async fn max_subscriptions_refuses_the_third_filter() {
    let broker = Broker::start(&format!("[mqtt]\nmax_subscriptions = 2\n{OPEN}"));
    let mut c = v5::connect_ok(broker.addr, "collector").await;
    let code = |s: v5::SubAck| s.return_codes[0];
    let q = v5::QoS::AtLeastOnce;
    assert_eq!(
        code(c.subscribe("a/#", q).await),
        v5::SubscribeReasonCode::Success(q)
    );
    assert_eq!(
        code(c.subscribe("b/#", q).await),
        v5::SubscribeReasonCode::Success(q)
    );
    assert_eq!(
        code(c.subscribe("c/#", q).await),
        v5::SubscribeReasonCode::QuotaExceeded
    );
    assert_eq!(
        code(c.subscribe("a/#", q).await),
        v5::SubscribeReasonCode::Success(q),
        "a replacement"
    );
    c.unsubscribe("b/#").await;
    assert_eq!(
        code(c.subscribe("c/#", q).await),
        v5::SubscribeReasonCode::Success(q)
    );

    let mut c4 = v4::connect_ok(broker.addr, "collector4").await;
    c4.subscribe("a/#", v4::QoS::AtLeastOnce).await;
    c4.subscribe("b/#", v4::QoS::AtLeastOnce).await;
    let third = c4.subscribe("c/#", v4::QoS::AtLeastOnce).await;
    assert_eq!(third.return_codes, [v4::SubscribeReasonCode::Failure]);
}
