//! MQTT 3.1.1 conformance over real TCP: a rumqttc v4 client where a
//! well-behaved client is enough, raw bytes where the test needs a client
//! to misbehave. Each test names the normative statements it checks.

use std::time::{Duration, Instant};

use chatmq_tests::raw::{self, p4, Silence, Wire};
use chatmq_tests::v4::{self, ConnectReturnCode, LastWill, Publish, QoS, SubscribeReasonCode};
use chatmq_tests::{Broker, OPEN, PATIENCE};

/// A short wait for something that must not happen.
const QUIET: Duration = Duration::from_millis(500);

/// OPEN plus more TOML (new tables only).
fn open_with(extra: &str) -> String {
    format!("{OPEN}\n{extra}\n")
}

fn qos(n: u8) -> QoS {
    match n {
        0 => QoS::AtMostOnce,
        1 => QoS::AtLeastOnce,
        _ => QoS::ExactlyOnce,
    }
}

/// A raw 3.1.1 CONNECT.
fn connect_packet(id: &str, clean: bool, keep_alive: u16, will: Option<LastWill>) -> p4::Packet {
    let mut c = p4::Connect::new(id);
    c.clean_session = clean;
    c.keep_alive = keep_alive;
    c.last_will = will;
    p4::Packet::Connect(c)
}

/// Opens a raw connection and completes CONNECT / CONNACK.
async fn raw_session(b: &Broker, connect: p4::Packet) -> Wire {
    let mut w = Wire::open(b.addr).await;
    w.send_v4(&connect).await;
    match w.next_v4(PATIENCE).await {
        Ok(p4::Packet::ConnAck(a)) => assert_eq!(a.code, p4::ConnectReturnCode::Success),
        other => panic!("expected CONNACK, got {other:?}"),
    }
    w
}

fn payload(p: &Publish) -> String {
    String::from_utf8_lossy(&p.payload).into_owned()
}

// ---------------------------------------------------------------- CONNECT

// [MQTT-3.1.3-6] an empty client id with clean session gets a unique id of
// its own: two such clients do not take each other over.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn empty_client_id_with_clean_session_is_accepted() {
    let b = Broker::start(OPEN);
    let mut a = v4::connect(v4::options(b.addr, ""))
        .await
        .expect("accepted");
    assert_eq!(a.connack.code, ConnectReturnCode::Success);
    assert!(!a.connack.session_present, "[MQTT-3.2.2-1]");
    let mut c = v4::connect(v4::options(b.addr, ""))
        .await
        .expect("accepted");
    assert_eq!(c.connack.code, ConnectReturnCode::Success);

    a.subscribe("anon/t", QoS::AtLeastOnce).await;
    c.subscribe("anon/t", QoS::AtLeastOnce).await;
    // QoS 0: `publish_acked` would swallow a's own copy while awaiting PUBACK.
    a.publish_acked("anon/t", QoS::AtMostOnce, false, b"hi")
        .await;
    assert_eq!(payload(&a.publish().await), "hi");
    assert_eq!(payload(&c.publish().await), "hi");
}

// [MQTT-3.1.3-8] empty client id without clean session: CONNACK 0x02, close.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn empty_client_id_without_clean_session_is_refused_with_0x02() {
    let b = Broker::start(OPEN);
    let mut w = Wire::open(b.addr).await;
    w.send_v4(&connect_packet("", false, 60, None)).await;
    match w.next_v4(PATIENCE).await {
        Ok(p4::Packet::ConnAck(a)) => {
            assert_eq!(a.code, p4::ConnectReturnCode::BadClientId);
            assert!(!a.session_present, "[MQTT-3.2.2-4]");
        }
        other => panic!("expected CONNACK 0x02, got {other:?}"),
    }
    assert!(w.closed_within(PATIENCE).await, "[MQTT-3.2.2-5]");
}

// [MQTT-3.1.0-2] a second CONNECT is a protocol violation: the connection closes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_connect_closes_the_connection() {
    let b = Broker::start(OPEN);
    let mut w = raw_session(&b, connect_packet("twice", true, 60, None)).await;
    // The connection is healthy before the second CONNECT...
    w.send_v4(&p4::Packet::PingReq).await;
    assert_eq!(w.next_v4(PATIENCE).await, Ok(p4::Packet::PingResp));
    // ...and closed by it, with no second CONNACK.
    w.send_v4(&connect_packet("twice", true, 60, None)).await;
    assert_eq!(w.next_v4(PATIENCE).await, Err(Silence::Closed));
}

// [MQTT-3.1.0-1] the first packet must be CONNECT; anything else closes
// the connection without a CONNACK, and is not processed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_first_packet_other_than_connect_closes_the_connection() {
    let b = Broker::start(OPEN);
    let mut watcher = v4::connect_ok(b.addr, "watcher").await;
    watcher.subscribe("#", QoS::AtMostOnce).await;

    let mut s = raw::open(b.addr).await;
    let (got, closed) = raw::exchange(&mut s, &[0xC0, 0x00]).await; // PINGREQ
    assert!(closed, "PINGREQ before CONNECT must close");
    assert!(got.is_empty(), "no PINGRESP, no CONNACK: {got:?}");

    let mut s = raw::open(b.addr).await;
    let (got, closed) = raw::exchange(&mut s, &raw::publish_v4("first/publish", b"x")).await;
    assert!(closed, "PUBLISH before CONNECT must close");
    assert!(got.is_empty(), "{got:?}");
    watcher.no_publish(QUIET).await;
}

// [MQTT-3.1.2-2] an unsupported protocol level gets CONNACK 0x01, then close.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unsupported_protocol_level_gets_0x01_then_close() {
    let b = Broker::start(OPEN);
    let refusal = [0x20u8, 0x02, 0x00, 0x01];

    // MQTT 3.1: protocol name "MQIsdp", level 3.
    let mqtt31 = [
        0x10u8, 16, 0, 6, b'M', b'Q', b'I', b's', b'd', b'p', 3, 0x02, 0, 60, 0, 2, b'c', b'3',
    ];
    let mut s = raw::open(b.addr).await;
    let (got, closed) = raw::exchange(&mut s, &mqtt31).await;
    assert_eq!(got, refusal, "MQTT 3.1 (level 3)");
    assert!(closed);

    // A level from the future.
    let level6 = [
        0x10u8, 14, 0, 4, b'M', b'Q', b'T', b'T', 6, 0x02, 0, 60, 0, 2, b'c', b'6',
    ];
    let mut s = raw::open(b.addr).await;
    let (got, closed) = raw::exchange(&mut s, &level6).await;
    assert_eq!(got, refusal, "level 6");
    assert!(closed);
}

// A socket that never sends CONNECT is closed after mqtt.connect_timeout_secs;
// one that sends it in time is served beyond that.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_socket_is_closed_after_the_connect_timeout() {
    let b = Broker::start(&open_with("[mqtt]\nconnect_timeout_secs = 1"));
    let mut silent = Wire::open(b.addr).await;
    let mut prompt = raw_session(&b, connect_packet("prompt", true, 60, None)).await;
    let start = Instant::now();
    assert!(
        silent.closed_within(Duration::from_secs(5)).await,
        "silent socket still open"
    );
    assert!(
        start.elapsed() >= Duration::from_millis(800),
        "closed before the timeout: {:?}",
        start.elapsed()
    );
    prompt.send_v4(&p4::Packet::PingReq).await;
    assert_eq!(prompt.next_v4(PATIENCE).await, Ok(p4::Packet::PingResp));
}

// [MQTT-3.1.2-24] keepalive 1 s: a client that pings keeps its connection;
// one that goes silent is closed after 1.5 s (and not before).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keepalive_is_enforced_at_one_and_a_half_times() {
    let b = Broker::start(OPEN);
    let mut w = raw_session(&b, connect_packet("ka", true, 1, None)).await;
    for _ in 0..3 {
        tokio::time::sleep(Duration::from_millis(700)).await;
        w.send_v4(&p4::Packet::PingReq).await;
        assert_eq!(
            w.next_v4(PATIENCE).await,
            Ok(p4::Packet::PingResp),
            "a pinging client must stay connected"
        );
    }
    let silent_since = Instant::now();
    assert!(w.closed_within(Duration::from_secs(5)).await);
    let after = silent_since.elapsed();
    assert!(
        after >= Duration::from_millis(1400) && after < Duration::from_millis(3000),
        "closed {after:?} after the last packet; expected about 1.5 s"
    );
}

// ---------------------------------------------------------------- QoS

// [MQTT-3.8.4-6] every publisher QoS x subscription QoS pair is delivered
// at the minimum of the two, never upgraded; [MQTT-2.3.1-1] QoS > 0 carries
// a non-zero packet id, [MQTT-2.3.1-5] QoS 0 none.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delivery_qos_is_the_minimum_of_publish_and_subscription() {
    let b = Broker::start(OPEN);
    let mut subs = Vec::new();
    for sq in 0..3u8 {
        let mut s = v4::connect_ok(b.addr, &format!("sub{sq}")).await;
        let ack = s.subscribe("matrix/#", qos(sq)).await;
        assert_eq!(ack.return_codes, [SubscribeReasonCode::Success(qos(sq))]);
        subs.push(s);
    }
    let mut p = v4::connect_ok(b.addr, "pub").await;
    for pq in 0..3u8 {
        p.publish_acked(&format!("matrix/{pq}"), qos(pq), false, &[pq])
            .await;
    }
    for (sq, s) in subs.iter_mut().enumerate() {
        let mut got = Vec::new();
        for _ in 0..3 {
            got.push(s.publish().await);
        }
        got.sort_by(|a, b| a.topic.cmp(&b.topic));
        for (pq, m) in got.iter().enumerate() {
            assert_eq!(m.topic, format!("matrix/{pq}"));
            assert_eq!(m.payload.as_ref(), [pq as u8]);
            let want = qos(pq.min(sq) as u8);
            assert_eq!(m.qos, want, "published QoS {pq}, subscribed QoS {sq}");
            if want == QoS::AtMostOnce {
                assert_eq!(m.pkid, 0, "QoS 0 has no packet id");
            } else {
                assert_ne!(m.pkid, 0, "QoS > 0 needs a packet id");
            }
            assert!(!m.dup);
        }
        s.no_publish(QUIET).await;
    }
}

// QoS 2 end to end: every message arrives exactly once, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qos2_messages_arrive_exactly_once() {
    let b = Broker::start(OPEN);
    let mut s = v4::connect_ok(b.addr, "q2sub").await;
    s.subscribe("q2/t", QoS::ExactlyOnce).await;
    let mut p = v4::connect_ok(b.addr, "q2pub").await;
    for i in 0..20 {
        p.publish_acked("q2/t", QoS::ExactlyOnce, false, format!("{i}").as_bytes())
            .await;
    }
    for i in 0..20 {
        let m = s.publish().await;
        assert_eq!(m.qos, QoS::ExactlyOnce);
        assert_eq!(payload(&m), i.to_string());
    }
    s.no_publish(QUIET).await;
}

// [MQTT-4.3.3-2] a QoS 2 PUBLISH resent before PUBREL is acknowledged again
// but not delivered again; after PUBCOMP the same packet id is a new message.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resent_qos2_publish_is_not_delivered_twice() {
    let b = Broker::start(OPEN);
    let mut s = v4::connect_ok(b.addr, "dupsub").await;
    s.subscribe("dup/t", QoS::ExactlyOnce).await;
    let mut w = raw_session(&b, connect_packet("duppub", true, 60, None)).await;

    let mut publish = p4::Publish::new("dup/t", QoS::ExactlyOnce, b"once".to_vec());
    publish.pkid = 7;
    w.send_v4(&p4::Packet::Publish(publish.clone())).await;
    assert_eq!(
        w.next_v4(PATIENCE).await,
        Ok(p4::Packet::PubRec(p4::PubRec::new(7)))
    );
    publish.dup = true;
    w.send_v4(&p4::Packet::Publish(publish.clone())).await;
    assert_eq!(
        w.next_v4(PATIENCE).await,
        Ok(p4::Packet::PubRec(p4::PubRec::new(7)))
    );
    w.send_v4(&p4::Packet::PubRel(p4::PubRel::new(7))).await;
    assert_eq!(
        w.next_v4(PATIENCE).await,
        Ok(p4::Packet::PubComp(p4::PubComp::new(7)))
    );
    assert_eq!(payload(&s.publish().await), "once");
    s.no_publish(QUIET).await;

    let mut again = p4::Publish::new("dup/t", QoS::ExactlyOnce, b"twice".to_vec());
    again.pkid = 7;
    w.send_v4(&p4::Packet::Publish(again)).await;
    assert_eq!(
        w.next_v4(PATIENCE).await,
        Ok(p4::Packet::PubRec(p4::PubRec::new(7)))
    );
    assert_eq!(payload(&s.publish().await), "twice");
}

// ---------------------------------------------------------------- subscriptions

/// Topics received until `done` arrives.
async fn topics_until_done(c: &mut v4::Client) -> Vec<String> {
    let mut got = Vec::new();
    loop {
        let m = c.publish().await;
        if m.topic == "done" {
            return got;
        }
        got.push(m.topic);
    }
}

// [MQTT-4.7.1-2] `#` matches its parent level and everything below;
// [MQTT-4.7.1-3] `+` matches exactly one level.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plus_and_hash_match_whole_levels() {
    let b = Broker::start(OPEN);
    let mut plus_mid = v4::connect_ok(b.addr, "plusmid").await;
    plus_mid
        .subscribe("sport/+/player1", QoS::AtLeastOnce)
        .await;
    plus_mid.subscribe("done", QoS::AtLeastOnce).await;
    let mut hash = v4::connect_ok(b.addr, "hash").await;
    hash.subscribe("sport/#", QoS::AtLeastOnce).await;
    hash.subscribe("done", QoS::AtLeastOnce).await;
    let mut plus_top = v4::connect_ok(b.addr, "plustop").await;
    plus_top.subscribe("+", QoS::AtLeastOnce).await;

    let mut p = v4::connect_ok(b.addr, "pub").await;
    for t in [
        "sport",
        "sport/tennis",
        "sport/tennis/player1",
        "sport/tennis/player2",
        "sport/tennis/player1/ranking",
        "other/tennis/player1",
        "sports",
        "done",
    ] {
        p.publish_acked(t, QoS::AtLeastOnce, false, b"x").await;
    }
    assert_eq!(
        topics_until_done(&mut plus_mid).await,
        ["sport/tennis/player1"]
    );
    assert_eq!(
        topics_until_done(&mut hash).await,
        [
            "sport",
            "sport/tennis",
            "sport/tennis/player1",
            "sport/tennis/player2",
            "sport/tennis/player1/ranking",
        ]
    );
    assert_eq!(topics_until_done(&mut plus_top).await, ["sport", "sports"]);
}

// [MQTT-4.7.2-1] filters starting with a wildcard do not match `$` topics;
// `$SYS/#` does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dollar_topics_are_not_matched_by_leading_wildcards() {
    let b = Broker::start(&open_with(
        "[[acl.rules]]\nuser = \"*\"\ntopic = \"$SYS/#\"\naccess = \"pubsub\"",
    ));
    let mut all = v4::connect_ok(b.addr, "all").await;
    all.subscribe("#", QoS::AtLeastOnce).await;
    let mut plus = v4::connect_ok(b.addr, "plus").await;
    plus.subscribe("+/x", QoS::AtLeastOnce).await;
    let mut sys = v4::connect_ok(b.addr, "sys").await;
    sys.subscribe("$SYS/#", QoS::AtLeastOnce).await;
    sys.subscribe("done/x", QoS::AtLeastOnce).await;

    let mut p = v4::connect_ok(b.addr, "pub").await;
    p.publish_acked("$SYS/x", QoS::AtLeastOnce, false, b"sys")
        .await;
    p.publish_acked("done/x", QoS::AtLeastOnce, false, b"done")
        .await;
    assert_eq!(all.publish().await.topic, "done/x", "`#` matched $SYS/x");
    assert_eq!(plus.publish().await.topic, "done/x", "`+/x` matched $SYS/x");
    assert_eq!(sys.publish().await.topic, "$SYS/x");
    assert_eq!(sys.publish().await.topic, "done/x");
}

// [MQTT-4.7.1-2], [MQTT-4.7.1-3] malformed filters are refused one by one
// with SUBACK 0x80 [MQTT-3.9.3-1]; the valid ones in the same SUBSCRIBE work.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_filters_get_suback_failure() {
    let b = Broker::start(OPEN);
    let mut w = raw_session(&b, connect_packet("badfilters", true, 60, None)).await;
    let mut sub = p4::Subscribe::new_many([
        p4::SubscribeFilter::new("a/#/b".into(), QoS::AtLeastOnce),
        p4::SubscribeFilter::new("a+".into(), QoS::AtLeastOnce),
        p4::SubscribeFilter::new("ok/+".into(), QoS::AtLeastOnce),
    ]);
    sub.pkid = 3;
    w.send_v4(&p4::Packet::Subscribe(sub)).await;
    match w.next_v4(PATIENCE).await {
        Ok(p4::Packet::SubAck(a)) => {
            assert_eq!(a.pkid, 3, "[MQTT-3.8.4-2]");
            assert_eq!(
                a.return_codes,
                [
                    p4::SubscribeReasonCode::Failure,
                    p4::SubscribeReasonCode::Failure,
                    p4::SubscribeReasonCode::Success(QoS::AtLeastOnce),
                ]
            );
        }
        other => panic!("expected SUBACK, got {other:?}"),
    }
    let mut p = v4::connect_ok(b.addr, "pub").await;
    p.publish_acked("ok/x", QoS::AtLeastOnce, false, b"x").await;
    match w.next_v4(PATIENCE).await {
        Ok(p4::Packet::Publish(m)) => assert_eq!(m.topic, "ok/x"),
        other => panic!("expected the PUBLISH on ok/x, got {other:?}"),
    }
}

// [MQTT-3.3.2-2] a PUBLISH topic with wildcards closes the connection and
// reaches nobody.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publishing_to_a_wildcard_topic_closes_the_connection() {
    let b = Broker::start(OPEN);
    let mut watcher = v4::connect_ok(b.addr, "watcher").await;
    watcher.subscribe("#", QoS::AtMostOnce).await;
    for (i, topic) in ["a/+", "a/#"].into_iter().enumerate() {
        let mut w = raw_session(&b, connect_packet(&format!("wild{i}"), true, 60, None)).await;
        w.send(&raw::publish_v4(topic, b"x")).await;
        assert!(w.closed_within(PATIENCE).await, "PUBLISH to {topic}");
    }
    watcher.no_publish(QUIET).await;
}

// [MQTT-3.3.5-1] overlapping subscriptions: one copy, at the highest QoS.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overlapping_subscriptions_deliver_one_copy_at_the_highest_qos() {
    let b = Broker::start(OPEN);
    let mut s = v4::connect_ok(b.addr, "overlap").await;
    s.subscribe("a/+", QoS::AtMostOnce).await;
    s.subscribe("a/#", QoS::ExactlyOnce).await;
    let mut p = v4::connect_ok(b.addr, "pub").await;
    p.publish_acked("a/b", QoS::ExactlyOnce, false, b"one")
        .await;
    let m = s.publish().await;
    assert_eq!(m.topic, "a/b");
    assert_eq!(m.qos, QoS::ExactlyOnce);
    s.no_publish(QUIET).await;
}

// [MQTT-3.10.4-2] after UNSUBACK nothing more arrives on that filter;
// other subscriptions go on. [MQTT-3.10.4-5] an UNSUBSCRIBE of nothing is
// answered too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unsubscribe_stops_delivery() {
    let b = Broker::start(OPEN);
    let mut s = v4::connect_ok(b.addr, "unsub").await;
    s.subscribe("u/t", QoS::AtLeastOnce).await;
    s.subscribe("u/other", QoS::AtLeastOnce).await;
    let mut p = v4::connect_ok(b.addr, "pub").await;
    p.publish_acked("u/t", QoS::AtLeastOnce, false, b"before")
        .await;
    assert_eq!(payload(&s.publish().await), "before");

    s.unsubscribe("u/t").await;
    s.unsubscribe("never/subscribed").await;
    p.publish_acked("u/t", QoS::AtLeastOnce, false, b"after")
        .await;
    p.publish_acked("u/other", QoS::AtLeastOnce, false, b"other")
        .await;
    let m = s.publish().await;
    assert_eq!(
        (m.topic.as_str(), payload(&m).as_str()),
        ("u/other", "other")
    );
    s.no_publish(QUIET).await;
}

// [MQTT-3.8.4-3] subscribing again to the same filter replaces its QoS.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resubscribing_replaces_the_qos() {
    let b = Broker::start(OPEN);
    let mut s = v4::connect_ok(b.addr, "resub").await;
    let mut p = v4::connect_ok(b.addr, "pub").await;
    s.subscribe("r/t", QoS::ExactlyOnce).await;
    p.publish_acked("r/t", QoS::ExactlyOnce, false, b"1").await;
    assert_eq!(s.publish().await.qos, QoS::ExactlyOnce);

    let ack = s.subscribe("r/t", QoS::AtMostOnce).await;
    assert_eq!(
        ack.return_codes,
        [SubscribeReasonCode::Success(QoS::AtMostOnce)]
    );
    p.publish_acked("r/t", QoS::ExactlyOnce, false, b"2").await;
    let m = s.publish().await;
    assert_eq!(payload(&m), "2");
    assert_eq!(m.qos, QoS::AtMostOnce);
    s.no_publish(QUIET).await;
}

// ---------------------------------------------------------------- retained

/// Subscribes a new client to `filter` and returns what it is sent on
/// subscribing.
async fn retained_on_subscribe(b: &Broker, id: &str, filter: &str) -> Vec<Publish> {
    let mut c = v4::connect_ok(b.addr, id).await;
    c.subscribe(filter, QoS::AtLeastOnce).await;
    c.publishes_for(QUIET).await
}

// [MQTT-3.3.1-5] a retained message is kept and replaced by the next one;
// [MQTT-3.3.1-6], [MQTT-3.3.1-8] a new subscription gets it with RETAIN=1;
// [MQTT-3.3.1-10], [MQTT-3.3.1-11] an empty retained payload clears it (and
// is delivered normally); [MQTT-3.3.1-12] a non-retained publish leaves it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retained_messages_are_set_replaced_and_cleared() {
    let b = Broker::start(OPEN);
    let mut p = v4::connect_ok(b.addr, "pub").await;
    p.publish_acked("ret/a", QoS::AtLeastOnce, true, b"one")
        .await;
    p.publish_acked("ret/a", QoS::AtLeastOnce, true, b"two")
        .await;
    p.publish_acked("ret/b", QoS::AtLeastOnce, true, b"kept")
        .await;
    p.publish_acked("ret/b", QoS::AtLeastOnce, false, b"not retained")
        .await;

    let mut got = retained_on_subscribe(&b, "s1", "ret/#").await;
    got.sort_by(|a, b| a.topic.cmp(&b.topic));
    assert_eq!(got.len(), 2, "{got:?}");
    assert_eq!(
        (got[0].topic.as_str(), payload(&got[0]).as_str()),
        ("ret/a", "two")
    );
    assert_eq!(
        (got[1].topic.as_str(), payload(&got[1]).as_str()),
        ("ret/b", "kept")
    );
    assert!(got.iter().all(|m| m.retain), "RETAIN=1 on subscribe");

    let mut live = v4::connect_ok(b.addr, "live").await;
    live.subscribe("ret/a", QoS::AtLeastOnce).await;
    live.publishes_for(QUIET).await;
    p.publish_acked("ret/a", QoS::AtLeastOnce, true, b"").await;
    let cleared = live.publish().await;
    assert_eq!(cleared.topic, "ret/a");
    assert!(cleared.payload.is_empty(), "the empty message is delivered");

    let got = retained_on_subscribe(&b, "s2", "ret/#").await;
    assert_eq!(got.len(), 1, "{got:?}");
    assert_eq!(got[0].topic, "ret/b");
}

// [MQTT-3.3.1-9] a retained publish reaching an existing subscription has
// RETAIN=0; [MQTT-3.3.1-8] the same message sent on a new subscription has
// RETAIN=1.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retain_flag_is_set_only_on_subscribe() {
    let b = Broker::start(OPEN);
    let mut existing = v4::connect_ok(b.addr, "existing").await;
    existing.subscribe("flag/#", QoS::AtLeastOnce).await;
    let mut p = v4::connect_ok(b.addr, "pub").await;
    p.publish_acked("flag/t", QoS::AtLeastOnce, true, b"r")
        .await;
    let m = existing.publish().await;
    assert!(!m.retain, "live delivery must have RETAIN=0");

    let got = retained_on_subscribe(&b, "newcomer", "flag/#").await;
    assert_eq!(got.len(), 1);
    assert!(got[0].retain, "delivery on subscribe must have RETAIN=1");
}

// ---------------------------------------------------------------- wills

// [MQTT-3.1.2-8] the will is published when the connection is lost without
// DISCONNECT; [MQTT-3.1.2-17] with Will Retain it is also kept as retained.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_will_is_published_when_the_connection_drops() {
    let b = Broker::start(OPEN);
    let mut watcher = v4::connect_ok(b.addr, "watcher").await;
    watcher.subscribe("will/#", QoS::AtLeastOnce).await;
    let mut o = v4::options(b.addr, "dying");
    o.set_last_will(LastWill::new("will/dying", "gone", QoS::AtLeastOnce, true));
    let c = v4::connect(o).await.expect("connect");
    c.drop_connection();

    let m = watcher.publish().await;
    assert_eq!(
        (m.topic.as_str(), payload(&m).as_str()),
        ("will/dying", "gone")
    );
    assert_eq!(m.qos, QoS::AtLeastOnce);
    let got = retained_on_subscribe(&b, "later", "will/#").await;
    assert_eq!(got.len(), 1, "the will was retained");
    assert_eq!(payload(&got[0]), "gone");
}

// [MQTT-3.1.2-24] a keepalive expiry is treated as a network failure: the
// will is published.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_will_is_published_on_keepalive_expiry() {
    let b = Broker::start(OPEN);
    let mut watcher = v4::connect_ok(b.addr, "watcher").await;
    watcher.subscribe("will/#", QoS::AtLeastOnce).await;
    let will = LastWill::new("will/silent", "timed out", QoS::AtLeastOnce, false);
    let _w = raw_session(&b, connect_packet("silent", true, 1, Some(will))).await;
    let start = Instant::now();
    let m = watcher.publish().await;
    assert_eq!(payload(&m), "timed out");
    assert!(
        start.elapsed() >= Duration::from_millis(1300),
        "the will came {:?} after CONNECT, before keepalive x 1.5",
        start.elapsed()
    );
}

// [MQTT-3.1.2-10], [MQTT-3.14.4-3] a clean DISCONNECT discards the will.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_will_is_not_published_after_a_clean_disconnect() {
    let b = Broker::start(OPEN);
    let mut watcher = v4::connect_ok(b.addr, "watcher").await;
    watcher.subscribe("will/#", QoS::AtLeastOnce).await;
    let mut o = v4::options(b.addr, "polite");
    o.set_last_will(LastWill::new("will/polite", "x", QoS::AtLeastOnce, false));
    v4::connect(o).await.expect("connect").disconnect().await;
    let mut o = v4::options(b.addr, "rude");
    o.set_last_will(LastWill::new("will/rude", "x", QoS::AtLeastOnce, false));
    v4::connect(o).await.expect("connect").drop_connection();

    assert_eq!(watcher.publish().await.topic, "will/rude");
    watcher.no_publish(QUIET).await;
}

// ---------------------------------------------------------------- limits and ACL

// DESIGN: an unauthorised SUBSCRIBE gets SUBACK failure 0x80 in 3.1.1.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_acl_refused_filter_gets_suback_failure() {
    let b = Broker::start(&open_with(
        "[[acl.rules]]\nuser = \"*\"\ntopic = \"secret/#\"\naccess = \"deny\"",
    ));
    let mut s = v4::connect_ok(b.addr, "acl").await;
    let ack = s.subscribe("secret/x", QoS::AtLeastOnce).await;
    assert_eq!(ack.return_codes, [SubscribeReasonCode::Failure]);
    let ack = s.subscribe("public/x", QoS::AtLeastOnce).await;
    assert_eq!(
        ack.return_codes,
        [SubscribeReasonCode::Success(QoS::AtLeastOnce)]
    );
}

// ARCHITECTURE: a payload above mqtt.max_payload in a packet below the
// maximum packet size is acked (3.1.1 cannot be told) and dropped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversized_payload_is_acked_and_dropped() {
    let b = Broker::start(&open_with("[mqtt]\nmax_payload = 1024"));
    let mut s = v4::connect_ok(b.addr, "sub").await;
    s.subscribe("big/t", QoS::AtLeastOnce).await;
    let mut p = v4::connect_ok(b.addr, "pub").await;
    p.publish_acked("big/t", QoS::AtLeastOnce, false, &[b'x'; 2000])
        .await;
    p.publish_acked("big/t", QoS::AtLeastOnce, false, b"small")
        .await;
    assert_eq!(payload(&s.publish().await), "small");
    s.no_publish(QUIET).await;
}
