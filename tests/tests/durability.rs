//! Durability: what a client was promised survives disconnects, session
//! takeovers and a broker killed with SIGKILL. Each test is a user story
//! told against the real binary over TCP.

use std::time::Duration;

use chatmq_tests::raw::{p4, Silence, Wire};
use chatmq_tests::{v4, v5, Broker, OPEN};

const QUIET: Duration = Duration::from_millis(500);

/// 3.1.1 options for a persistent session (clean_session = 0).
fn persistent_v4(b: &Broker, id: &str) -> v4::MqttOptions {
    let mut o = v4::options(b.addr, id);
    o.set_clean_session(false);
    o
}

/// MQTT 5 options for a session that outlives its connection by an hour.
fn persistent_v5(b: &Broker, id: &str) -> v5::MqttOptions {
    let mut o = v5::options(b.addr, id);
    o.set_clean_start(false);
    o.set_session_expiry_interval(Some(3600));
    o
}

async fn connect_v4(o: v4::MqttOptions) -> v4::Client {
    match v4::connect(o).await {
        Ok(c) => c,
        Err(e) => panic!("connect refused: {e}"),
    }
}

async fn connect_v5(o: v5::MqttOptions) -> v5::Client {
    match v5::connect(o).await {
        Ok(c) => c,
        Err(e) => panic!("connect refused: {e}"),
    }
}

fn text(payload: &[u8]) -> String {
    String::from_utf8_lossy(payload).into_owned()
}

/// A raw 3.1.1 CONNECT with clean_session as given.
fn raw_connect_v4(id: &str, clean: bool) -> p4::Packet {
    let mut c = p4::Connect::new(id);
    c.clean_session = clean;
    c.keep_alive = 60;
    p4::Packet::Connect(c)
}

/// Connects a raw 3.1.1 client and returns its wire and Session Present.
async fn raw_session_v4(b: &Broker, id: &str, clean: bool) -> (Wire, bool) {
    let mut w = Wire::open(b.addr).await;
    w.send_v4(&raw_connect_v4(id, clean)).await;
    match w.next_v4(chatmq_tests::PATIENCE).await {
        Ok(p4::Packet::ConnAck(c)) => {
            assert_eq!(c.code, p4::ConnectReturnCode::Success);
            (w, c.session_present)
        }
        other => panic!("expected CONNACK, got {other:?}"),
    }
}

fn raw_publish_v4(topic: &str, qos: v4::QoS, pkid: u16, dup: bool, payload: &[u8]) -> p4::Packet {
    let mut p = p4::Publish::new(topic, qos, payload.to_vec());
    p.pkid = pkid;
    p.dup = dup;
    p4::Packet::Publish(p)
}

// bob's phone keeps a persistent session (clean_session = 0) on news/# and
// goes offline. Three QoS 1 and three QoS 2 messages are published and
// acknowledged; the broker is killed with SIGKILL and restarted. bob
// reconnects with clean_session = 0: Session Present is 1 [MQTT-3.2.2-2],
// every message arrives exactly once, in publish order [MQTT-4.6.0-6], at
// the QoS it was published with. His subscription survived as well: a
// message published after the restart reaches him.
#[tokio::test]
async fn v4_persistent_session_keeps_queued_qos1_and_qos2_messages_through_kill9() {
    let mut broker = Broker::start(OPEN);
    let mut bob = connect_v4(persistent_v4(&broker, "bob-phone")).await;
    assert!(!bob.connack.session_present);
    bob.subscribe("news/#", v4::QoS::ExactlyOnce).await;
    bob.disconnect().await;

    let mut alice = v4::connect_ok(broker.addr, "alice").await;
    let sent: Vec<(String, v4::QoS)> = (1..=6)
        .map(|i| {
            let qos = if i % 2 == 1 {
                v4::QoS::AtLeastOnce
            } else {
                v4::QoS::ExactlyOnce
            };
            (format!("m{i}"), qos)
        })
        .collect();
    for (m, qos) in &sent {
        alice
            .publish_acked("news/world", *qos, false, m.as_bytes())
            .await;
    }
    broker.kill9();
    broker.restart();

    let mut bob = connect_v4(persistent_v4(&broker, "bob-phone")).await;
    assert!(bob.connack.session_present, "the session survived SIGKILL");
    for (m, qos) in &sent {
        let p = bob.publish().await;
        assert_eq!(text(&p.payload), *m, "in publish order");
        assert_eq!(p.qos, *qos);
        assert_eq!(p.topic, "news/world");
    }
    bob.no_publish(QUIET).await;

    let mut alice = v4::connect_ok(broker.addr, "alice").await;
    alice
        .publish_acked("news/world", v4::QoS::AtLeastOnce, false, b"after")
        .await;
    assert_eq!(text(&bob.publish().await.payload), "after");
}

// The same story in MQTT 5: clean_start = 0 and a Session Expiry Interval
// of an hour make the session outlive its connection [MQTT-3.1.2-23]; it
// survives SIGKILL with its queue and its subscription.
#[tokio::test]
async fn v5_persistent_session_keeps_queued_qos1_and_qos2_messages_through_kill9() {
    let mut broker = Broker::start(OPEN);
    let mut bob = connect_v5(persistent_v5(&broker, "bob-tablet")).await;
    assert!(!bob.connack.session_present);
    bob.subscribe("news/#", v5::QoS::ExactlyOnce).await;
    bob.disconnect().await;

    let mut alice = v5::connect_ok(broker.addr, "alice").await;
    let sent: Vec<(String, v5::QoS)> = (1..=6)
        .map(|i| {
            let qos = if i % 2 == 1 {
                v5::QoS::AtLeastOnce
            } else {
                v5::QoS::ExactlyOnce
            };
            (format!("m{i}"), qos)
        })
        .collect();
    for (m, qos) in &sent {
        alice
            .publish_acked("news/world", *qos, false, m.as_bytes())
            .await;
    }
    broker.kill9();
    broker.restart();

    let mut bob = connect_v5(persistent_v5(&broker, "bob-tablet")).await;
    assert!(bob.connack.session_present, "the session survived SIGKILL");
    for (m, qos) in &sent {
        let p = bob.publish().await;
        assert_eq!(text(&p.payload), *m, "in publish order");
        assert_eq!(p.qos, *qos);
        assert_eq!(&p.topic[..], b"news/world");
    }
    bob.no_publish(QUIET).await;

    let mut alice = v5::connect_ok(broker.addr, "alice").await;
    alice
        .publish_acked("news/world", v5::QoS::AtLeastOnce, false, b"after")
        .await;
    assert_eq!(text(&bob.publish().await.payload), "after");
}

// A slow reader receives two QoS 1 messages but its connection drops
// before it acknowledges them. When it reconnects with clean_session = 0
// the broker sends both again, in order, with DUP = 1 and their original
// packet ids [MQTT-4.4.0-1], [MQTT-3.3.1-1]. Once acknowledged they are
// not sent a third time.
#[tokio::test]
async fn v4_unacknowledged_messages_are_resent_with_dup_and_the_same_packet_id() {
    let broker = Broker::start(OPEN);
    let manual = |b: &Broker| {
        let mut o = persistent_v4(b, "slow-reader");
        o.set_manual_acks(true);
        o
    };
    let mut reader = connect_v4(manual(&broker)).await;
    reader.subscribe("inbox/slow", v4::QoS::AtLeastOnce).await;
    let mut writer = v4::connect_ok(broker.addr, "writer").await;
    for m in ["a", "b"] {
        writer
            .publish_acked("inbox/slow", v4::QoS::AtLeastOnce, false, m.as_bytes())
            .await;
    }
    let first = [reader.publish().await, reader.publish().await];
    assert!(first.iter().all(|p| !p.dup), "first delivery has DUP = 0");
    reader.drop_connection();

    let mut reader = connect_v4(manual(&broker)).await;
    assert!(reader.connack.session_present);
    for original in &first {
        let again = reader.publish().await;
        assert!(again.dup, "a redelivery has DUP = 1 [MQTT-3.3.1-1]");
        assert_eq!(again.pkid, original.pkid, "same packet id [MQTT-4.4.0-1]");
        assert_eq!(again.payload, original.payload);
        reader.client.ack(&again).await.expect("queue PUBACK");
    }
    reader.no_publish(QUIET).await;
    // DISCONNECT follows the PUBACKs on the same connection.
    reader.disconnect().await;

    let mut reader = connect_v4(manual(&broker)).await;
    assert!(reader.connack.session_present);
    reader.no_publish(QUIET).await;
}

// The same in MQTT 5, with a QoS 1 and a QoS 2 message, and the broker
// killed with SIGKILL while both are unacknowledged: after the restart
// both are resent with DUP = 1 and their original packet ids
// [MQTT-4.4.0-1]; acknowledged, they are gone for good.
#[tokio::test]
async fn v5_unacknowledged_messages_are_resent_with_dup_after_kill9() {
    let mut broker = Broker::start(OPEN);
    let manual = |b: &Broker| {
        let mut o = persistent_v5(b, "slow-tablet");
        o.set_manual_acks(true);
        o
    };
    let mut reader = connect_v5(manual(&broker)).await;
    reader.subscribe("inbox/#", v5::QoS::ExactlyOnce).await;
    let mut writer = v5::connect_ok(broker.addr, "writer").await;
    writer
        .publish_acked("inbox/a", v5::QoS::AtLeastOnce, false, b"one")
        .await;
    writer
        .publish_acked("inbox/b", v5::QoS::ExactlyOnce, false, b"two")
        .await;
    let first = [reader.publish().await, reader.publish().await];
    assert_eq!(text(&first[0].payload), "one");
    assert_eq!(text(&first[1].payload), "two");
    assert!(first.iter().all(|p| !p.dup));
    broker.kill9();
    broker.restart();

    let mut reader = connect_v5(manual(&broker)).await;
    assert!(reader.connack.session_present);
    for original in &first {
        let again = reader.publish().await;
        assert!(again.dup, "a redelivery has DUP = 1");
        assert_eq!(again.pkid, original.pkid, "same packet id [MQTT-4.4.0-1]");
        assert_eq!(again.qos, original.qos);
        assert_eq!(again.payload, original.payload);
        reader.client.ack(&again).await.expect("queue ack");
    }
    // The QoS 2 exchange completes: PUBREL from the broker, PUBCOMP back.
    loop {
        match reader.next().await {
            Ok(v5::Packet::PubRel(r)) => {
                assert_eq!(r.pkid, first[1].pkid);
                break;
            }
            Ok(v5::Packet::Publish(p)) => panic!("unexpected PUBLISH {:?}", p.payload),
            Ok(_) => continue,
            Err(e) => panic!("waiting for PUBREL: {e}"),
        }
    }
    reader.disconnect().await;

    let mut reader = connect_v5(manual(&broker)).await;
    assert!(reader.connack.session_present);
    reader.no_publish(QUIET).await;
}

// A till sends a QoS 2 payment (packet id 7), gets PUBREC, and loses its
// connection before it can send PUBREL. It reconnects with clean_session =
// 0 and, not knowing whether the broker got the first copy, sends the
// PUBLISH again with DUP = 1. The broker answers PUBREC again and does not
// forward the message a second time [MQTT-4.3.3-2]; PUBREL gets PUBCOMP.
#[tokio::test]
async fn a_resent_qos2_publish_after_a_reconnect_is_delivered_once() {
    let broker = Broker::start(OPEN);
    let mut ledger = v4::connect_ok(broker.addr, "ledger").await;
    ledger.subscribe("payments/#", v4::QoS::ExactlyOnce).await;

    let (mut till, present) = raw_session_v4(&broker, "till-1", false).await;
    assert!(!present);
    till.send_v4(&raw_publish_v4(
        "payments/42",
        v4::QoS::ExactlyOnce,
        7,
        false,
        b"pay 42",
    ))
    .await;
    assert_eq!(
        till.next_v4(chatmq_tests::PATIENCE).await,
        Ok(p4::Packet::PubRec(p4::PubRec::new(7)))
    );
    drop(till);
    assert_eq!(text(&ledger.publish().await.payload), "pay 42");

    let (mut till, present) = raw_session_v4(&broker, "till-1", false).await;
    assert!(present);
    till.send_v4(&raw_publish_v4(
        "payments/42",
        v4::QoS::ExactlyOnce,
        7,
        true,
        b"pay 42",
    ))
    .await;
    assert_eq!(
        till.next_v4(chatmq_tests::PATIENCE).await,
        Ok(p4::Packet::PubRec(p4::PubRec::new(7)))
    );
    till.send_v4(&p4::Packet::PubRel(p4::PubRel::new(7))).await;
    assert_eq!(
        till.next_v4(chatmq_tests::PATIENCE).await,
        Ok(p4::Packet::PubComp(p4::PubComp::new(7)))
    );
    ledger.no_publish(QUIET).await;
}

// The same through SIGKILL: the till got PUBREC (so the broker had the
// message on disk), the broker is killed and restarted, the till resends
// the PUBLISH with DUP = 1. The ledger, a persistent session that was
// offline all along, receives the payment exactly once [MQTT-4.3.3-2].
#[tokio::test]
async fn a_resent_qos2_publish_after_kill9_is_delivered_once() {
    let mut broker = Broker::start(OPEN);
    let mut ledger = connect_v4(persistent_v4(&broker, "ledger")).await;
    ledger.subscribe("payments/#", v4::QoS::ExactlyOnce).await;
    ledger.disconnect().await;

    let (mut till, _) = raw_session_v4(&broker, "till-2", false).await;
    till.send_v4(&raw_publish_v4(
        "payments/43",
        v4::QoS::ExactlyOnce,
        9,
        false,
        b"pay 43",
    ))
    .await;
    assert_eq!(
        till.next_v4(chatmq_tests::PATIENCE).await,
        Ok(p4::Packet::PubRec(p4::PubRec::new(9)))
    );
    broker.kill9();
    broker.restart();

    let (mut till, present) = raw_session_v4(&broker, "till-2", false).await;
    assert!(present);
    till.send_v4(&raw_publish_v4(
        "payments/43",
        v4::QoS::ExactlyOnce,
        9,
        true,
        b"pay 43",
    ))
    .await;
    assert_eq!(
        till.next_v4(chatmq_tests::PATIENCE).await,
        Ok(p4::Packet::PubRec(p4::PubRec::new(9)))
    );
    till.send_v4(&p4::Packet::PubRel(p4::PubRel::new(9))).await;
    assert_eq!(
        till.next_v4(chatmq_tests::PATIENCE).await,
        Ok(p4::Packet::PubComp(p4::PubComp::new(9)))
    );

    let mut ledger = connect_v4(persistent_v4(&broker, "ledger")).await;
    assert!(ledger.connack.session_present);
    assert_eq!(text(&ledger.publish().await.payload), "pay 43");
    ledger.no_publish(QUIET).await;
}

/// A raw persistent subscriber that takes a QoS 2 message as far as
/// PUBREC and receives the broker's PUBREL; returns the packet id.
async fn receive_qos2_up_to_pubrel(broker: &Broker, id: &str, topic: &str) -> u16 {
    let (mut dash, _) = raw_session_v4(broker, id, false).await;
    let mut sub = p4::Subscribe::new(topic, v4::QoS::ExactlyOnce);
    sub.pkid = 1;
    dash.send_v4(&p4::Packet::Subscribe(sub)).await;
    match dash.next_v4(chatmq_tests::PATIENCE).await {
        Ok(p4::Packet::SubAck(_)) => {}
        other => panic!("expected SUBACK, got {other:?}"),
    }
    let mut sensor = v4::connect_ok(broker.addr, "sensor").await;
    sensor
        .publish_acked(topic, v4::QoS::ExactlyOnce, false, b"fire")
        .await;
    let pkid = match dash.next_v4(chatmq_tests::PATIENCE).await {
        Ok(p4::Packet::Publish(p)) => {
            assert_eq!(p.qos, v4::QoS::ExactlyOnce);
            assert!(!p.dup);
            p.pkid
        }
        other => panic!("expected PUBLISH, got {other:?}"),
    };
    dash.send_v4(&p4::Packet::PubRec(p4::PubRec::new(pkid)))
        .await;
    assert_eq!(
        dash.next_v4(chatmq_tests::PATIENCE).await,
        Ok(p4::Packet::PubRel(p4::PubRel::new(pkid)))
    );
    pkid
}

/// Reconnects `id` and checks the broker owes exactly PUBREL `pkid`, not
/// the message; completes the exchange and checks nothing is owed after.
async fn expect_only_pubrel(broker: &Broker, id: &str, pkid: u16) {
    let (mut dash, present) = raw_session_v4(broker, id, false).await;
    assert!(present);
    assert_eq!(
        dash.next_v4(chatmq_tests::PATIENCE).await,
        Ok(p4::Packet::PubRel(p4::PubRel::new(pkid))),
        "PUBREL is resent with the original packet id [MQTT-4.4.0-1]"
    );
    assert_eq!(
        dash.next_v4(QUIET).await,
        Err(Silence::Timeout),
        "the message itself is not sent again"
    );
    dash.send_v4(&p4::Packet::PubComp(p4::PubComp::new(pkid)))
        .await;
    // PINGREQ/PINGRESP: the PUBCOMP before it has been handled.
    dash.send_v4(&p4::Packet::PingReq).await;
    assert_eq!(
        dash.next_v4(chatmq_tests::PATIENCE).await,
        Ok(p4::Packet::PingResp)
    );
    drop(dash);

    let (mut dash, present) = raw_session_v4(broker, id, false).await;
    assert!(present);
    assert_eq!(dash.next_v4(QUIET).await, Err(Silence::Timeout));
}

// A dashboard receives a QoS 2 alert, answers PUBREC, gets PUBREL, and
// its connection drops before it sends PUBCOMP. On reconnect the broker
// resends PUBREL with the same packet id, not the alert [MQTT-4.4.0-1],
// [MQTT-4.3.3-1]; after PUBCOMP nothing more is owed.
#[tokio::test]
async fn a_subscriber_that_sent_pubrec_gets_pubrel_not_the_message_again() {
    let broker = Broker::start(OPEN);
    let pkid = receive_qos2_up_to_pubrel(&broker, "dash-1", "alerts/fire").await;
    expect_only_pubrel(&broker, "dash-1", pkid).await;
}

// The same through SIGKILL: the broker had recorded the PUBREC before it
// was killed, so after the restart it owes only PUBREL.
#[tokio::test]
async fn a_subscriber_that_sent_pubrec_gets_pubrel_after_kill9() {
    let mut broker = Broker::start(OPEN);
    let pkid = receive_qos2_up_to_pubrel(&broker, "dash-2", "alerts/flood").await;
    // A client's PUBREC is written without waiting for the disk (a crash
    // right after it may only cause a resend with DUP, which MQTT allows);
    // give the write a moment before pulling the plug.
    tokio::time::sleep(Duration::from_millis(300)).await;
    broker.kill9();
    broker.restart();
    expect_only_pubrel(&broker, "dash-2", pkid).await;
}

// The office lamp's state is retained; carol's is retained then replaced;
// the hall sensor's is retained then cleared with an empty retained
// message [MQTT-3.3.1-10]. After SIGKILL and a restart, a new subscriber
// gets the lamp and carol's latest state with RETAIN = 1 [MQTT-3.3.1-8],
// and nothing for the cleared topic.
#[tokio::test]
async fn retained_messages_survive_kill9_and_a_cleared_one_stays_cleared() {
    let mut broker = Broker::start(OPEN);
    let mut p = v4::connect_ok(broker.addr, "publisher").await;
    let q = v4::QoS::AtLeastOnce;
    p.publish_acked("state/lamp", q, true, b"on").await;
    p.publish_acked("state/carol", q, true, b"v1").await;
    p.publish_acked("state/carol", q, true, b"v2").await;
    p.publish_acked("state/hall", q, true, b"motion").await;
    p.publish_acked("state/hall", q, true, b"").await;
    broker.kill9();
    broker.restart();

    let mut s = v4::connect_ok(broker.addr, "late-subscriber").await;
    s.subscribe("state/#", v4::QoS::AtLeastOnce).await;
    let mut got: Vec<(String, String, bool)> = Vec::new();
    for _ in 0..2 {
        let m = s.publish().await;
        got.push((m.topic.clone(), text(&m.payload), m.retain));
    }
    got.sort();
    assert_eq!(
        got,
        [
            ("state/carol".to_string(), "v2".to_string(), true),
            ("state/lamp".to_string(), "on".to_string(), true),
        ]
    );
    s.no_publish(QUIET).await;
}

// alice's tablet holds a persistent MQTT 5 session and has received one
// message it has not acknowledged. Her tablet reconnects on a new network
// with the same client id: the old connection is told DISCONNECT 0x8E
// (Session taken over) and closed [MQTT-3.1.4-3]; the new one gets Session
// Present = 1, the unacknowledged message again (DUP = 1), and what is
// published from then on. The old connection gets nothing more.
#[tokio::test]
async fn v5_takeover_kicks_the_old_connection_and_moves_the_session() {
    let broker = Broker::start(OPEN);
    let mut old = {
        let mut o = persistent_v5(&broker, "alice-tablet");
        o.set_manual_acks(true);
        connect_v5(o).await
    };
    old.subscribe("rooms/general", v5::QoS::AtLeastOnce).await;
    let mut bob = v5::connect_ok(broker.addr, "bob").await;
    bob.publish_acked("rooms/general", v5::QoS::AtLeastOnce, false, b"m1")
        .await;
    let m1 = old.publish().await;
    assert_eq!(text(&m1.payload), "m1");

    let mut new = connect_v5(persistent_v5(&broker, "alice-tablet")).await;
    assert!(new.connack.session_present);
    match old.next().await {
        Err(e) => assert!(
            e.contains("SessionTakenOver"),
            "expected DISCONNECT 0x8E, got {e}"
        ),
        Ok(p) => panic!("expected DISCONNECT 0x8E, got {p:?}"),
    }
    let again = new.publish().await;
    assert_eq!(text(&again.payload), "m1");
    assert!(again.dup);
    assert_eq!(again.pkid, m1.pkid);

    bob.publish_acked("rooms/general", v5::QoS::AtLeastOnce, false, b"m2")
        .await;
    assert_eq!(text(&new.publish().await.payload), "m2");
}

// The same in 3.1.1, which has no DISCONNECT from the server: the old
// connection is closed [MQTT-3.1.4-3] and the session, with the message
// it had not acknowledged, continues on the new one.
#[tokio::test]
async fn v4_takeover_closes_the_old_connection_and_moves_the_session() {
    let broker = Broker::start(OPEN);
    let mut old = {
        let mut o = persistent_v4(&broker, "alice-laptop");
        o.set_manual_acks(true);
        connect_v4(o).await
    };
    old.subscribe("rooms/general", v4::QoS::AtLeastOnce).await;
    let mut bob = v4::connect_ok(broker.addr, "bob").await;
    bob.publish_acked("rooms/general", v4::QoS::AtLeastOnce, false, b"m1")
        .await;
    let m1 = old.publish().await;

    let mut new = connect_v4(persistent_v4(&broker, "alice-laptop")).await;
    assert!(new.connack.session_present);
    assert!(
        old.next().await.is_err(),
        "the old connection is closed by the broker"
    );
    let again = new.publish().await;
    assert_eq!(text(&again.payload), "m1");
    assert!(again.dup);
    assert_eq!(again.pkid, m1.pkid);

    bob.publish_acked("rooms/general", v4::QoS::AtLeastOnce, false, b"m2")
        .await;
    assert_eq!(text(&new.publish().await.payload), "m2");
}

// A kiosk had a persistent session with a subscription and a message
// waiting, then reconnects with clean_session = 1: the old session is
// discarded [MQTT-3.1.2-6], Session Present is 0 [MQTT-3.2.2-1], the
// waiting message is not delivered and the old subscription is gone.
#[tokio::test]
async fn v4_clean_session_discards_the_old_session() {
    let broker = Broker::start(OPEN);
    let mut kiosk = connect_v4(persistent_v4(&broker, "kiosk")).await;
    kiosk.subscribe("ads/#", v4::QoS::AtLeastOnce).await;
    kiosk.disconnect().await;
    let mut ads = v4::connect_ok(broker.addr, "ads").await;
    ads.publish_acked("ads/1", v4::QoS::AtLeastOnce, false, b"old")
        .await;

    let mut kiosk = v4::connect_ok(broker.addr, "kiosk").await;
    assert!(!kiosk.connack.session_present);
    kiosk.no_publish(QUIET).await;
    ads.publish_acked("ads/2", v4::QoS::AtLeastOnce, false, b"new")
        .await;
    kiosk.no_publish(QUIET).await;
}

// The same in MQTT 5: Clean Start = 1 discards the session [MQTT-3.1.2-4]
// and Session Present is 0 [MQTT-3.2.2-2], even though the new connection
// asks for a persistent session of its own.
#[tokio::test]
async fn v5_clean_start_discards_the_old_session() {
    let broker = Broker::start(OPEN);
    let mut kiosk = connect_v5(persistent_v5(&broker, "kiosk5")).await;
    kiosk.subscribe("ads/#", v5::QoS::AtLeastOnce).await;
    kiosk.disconnect().await;
    let mut ads = v5::connect_ok(broker.addr, "ads").await;
    ads.publish_acked("ads/1", v5::QoS::AtLeastOnce, false, b"old")
        .await;

    let mut o = persistent_v5(&broker, "kiosk5");
    o.set_clean_start(true);
    let mut kiosk = connect_v5(o).await;
    assert!(!kiosk.connack.session_present);
    kiosk.no_publish(QUIET).await;
    ads.publish_acked("ads/2", v5::QoS::AtLeastOnce, false, b"new")
        .await;
    kiosk.no_publish(QUIET).await;
}

// A visitor's MQTT 5 session expires one second after it disconnects; a
// member's lasts an hour. A message is queued for both, and 2.5 s later
// both reconnect with clean_start = 0: the visitor's session is gone
// (Session Present 0, nothing delivered), the member's is there with the
// message (MQTT 5 3.1.2.11.2 Session Expiry Interval).
#[tokio::test]
async fn v5_a_session_is_discarded_when_its_expiry_interval_passes() {
    let broker = Broker::start(OPEN);
    let short = |b: &Broker| {
        let mut o = persistent_v5(b, "visitor");
        o.set_session_expiry_interval(Some(1));
        o
    };
    let mut visitor = connect_v5(short(&broker)).await;
    visitor.subscribe("lobby/#", v5::QoS::AtLeastOnce).await;
    visitor.disconnect().await;
    let mut member = connect_v5(persistent_v5(&broker, "member")).await;
    member.subscribe("lobby/#", v5::QoS::AtLeastOnce).await;
    member.disconnect().await;

    let mut desk = v5::connect_ok(broker.addr, "desk").await;
    desk.publish_acked("lobby/news", v5::QoS::AtLeastOnce, false, b"hello")
        .await;
    tokio::time::sleep(Duration::from_millis(2500)).await;

    let mut visitor = connect_v5(short(&broker)).await;
    assert!(
        !visitor.connack.session_present,
        "the visitor's session expired"
    );
    visitor.no_publish(QUIET).await;
    let mut member = connect_v5(persistent_v5(&broker, "member")).await;
    assert!(member.connack.session_present);
    assert_eq!(text(&member.publish().await.payload), "hello");
}

// Expiry comes from an index of deadlines, not a scan. A session left
// before a restart is indexed again from disk and still expires; a session
// that comes back and leaves again expires from its last departure, not
// its first.
#[tokio::test]
async fn v5_sessions_expire_from_their_last_departure_and_across_a_restart() {
    let mut broker = Broker::start(OPEN);
    let with_expiry = |b: &Broker, id: &str, secs: u32| {
        let mut o = persistent_v5(b, id);
        o.set_session_expiry_interval(Some(secs));
        o
    };
    connect_v5(with_expiry(&broker, "before-restart", 2))
        .await
        .disconnect()
        .await;
    broker.restart();
    connect_v5(with_expiry(&broker, "commuter", 3))
        .await
        .disconnect()
        .await;
    tokio::time::sleep(Duration::from_millis(2000)).await;
    let back = connect_v5(with_expiry(&broker, "commuter", 3)).await;
    assert!(back.connack.session_present, "within its 3 s");
    back.disconnect().await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    // 3.5 s after the first departure, 1.5 s after the last.
    let again = connect_v5(with_expiry(&broker, "commuter", 3)).await;
    assert!(
        again.connack.session_present,
        "counted from the last departure"
    );
    again.disconnect().await;

    let gone = connect_v5(with_expiry(&broker, "before-restart", 2)).await;
    assert!(
        !gone.connack.session_present,
        "the session restored from disk expired"
    );
    gone.disconnect().await;
    tokio::time::sleep(Duration::from_millis(3800)).await;
    let late = connect_v5(with_expiry(&broker, "commuter", 3)).await;
    assert!(!late.connack.session_present, "expired 3 s after it left");
}

// The operator caps session expiry at 5 s (mqtt.session_expiry_max). A
// client asking for 100 s is told in CONNACK that 5 s is in force
// (MQTT 5 3.2.2.3.2); one asking for 3 s keeps its own value.
#[tokio::test]
async fn v5_session_expiry_is_capped_by_session_expiry_max() {
    let broker = Broker::start(&format!("[mqtt]\nsession_expiry_max = 5\n{OPEN}"));
    let mut o = persistent_v5(&broker, "greedy");
    o.set_session_expiry_interval(Some(100));
    let greedy = connect_v5(o).await;
    let props = greedy
        .connack
        .properties
        .clone()
        .expect("CONNACK properties");
    assert_eq!(props.session_expiry_interval, Some(5));

    let mut o = persistent_v5(&broker, "modest");
    o.set_session_expiry_interval(Some(3));
    let modest = connect_v5(o).await;
    let given = modest
        .connack
        .properties
        .clone()
        .and_then(|p| p.session_expiry_interval);
    assert!(
        given.is_none() || given == Some(3),
        "a value under the cap is kept, got {given:?}"
    );
}

// 3.1.1 cannot say how long a session should live: its persistent sessions
// last mqtt.session_expiry_max. With a cap of 1 s, a 3.1.1 persistent
// session is gone 2.5 s after its client left.
#[tokio::test]
async fn v4_persistent_sessions_expire_after_session_expiry_max() {
    let broker = Broker::start(&format!("[mqtt]\nsession_expiry_max = 1\n{OPEN}"));
    let mut s = connect_v4(persistent_v4(&broker, "short-lived")).await;
    s.subscribe("t/#", v4::QoS::AtLeastOnce).await;
    s.disconnect().await;
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let s = connect_v4(persistent_v4(&broker, "short-lived")).await;
    assert!(!s.connack.session_present);
}

/// Queues eight QoS 1 messages `q1..q8` for an offline persistent
/// session of `id` on a broker with max_offline_messages = 5.
async fn queue_eight(broker: &Broker, id: &str) {
    let mut phone = connect_v4(persistent_v4(broker, id)).await;
    phone.subscribe("feed", v4::QoS::AtLeastOnce).await;
    phone.disconnect().await;
    let mut p = v4::connect_ok(broker.addr, "feeder").await;
    for i in 1..=8 {
        p.publish_acked(
            "feed",
            v4::QoS::AtLeastOnce,
            false,
            format!("q{i}").as_bytes(),
        )
        .await;
    }
}

async fn expect_last_five(broker: &Broker, id: &str) {
    let mut phone = connect_v4(persistent_v4(broker, id)).await;
    assert!(phone.connack.session_present);
    for i in 4..=8 {
        assert_eq!(text(&phone.publish().await.payload), format!("q{i}"));
    }
    phone.no_publish(QUIET).await;
}

// An offline persistent subscriber's queue is bounded by
// mqtt.max_offline_messages = 5: after eight messages it gets the last
// five, in order; the three oldest were dropped.
#[tokio::test]
async fn a_full_offline_queue_keeps_the_newest_messages() {
    let broker = Broker::start(&format!("[mqtt]\nmax_offline_messages = 5\n{OPEN}"));
    queue_eight(&broker, "phone-a").await;
    expect_last_five(&broker, "phone-a").await;
}

// The same bound holds on disk: after SIGKILL and a restart the queue is
// still the last five messages, not all eight.
#[tokio::test]
async fn a_full_offline_queue_keeps_the_newest_messages_through_kill9() {
    let mut broker = Broker::start(&format!("[mqtt]\nmax_offline_messages = 5\n{OPEN}"));
    queue_eight(&broker, "phone-b").await;
    broker.kill9();
    broker.restart();
    expect_last_five(&broker, "phone-b").await;
}

// A publisher sends 200 QoS 1 messages to a topic a persistent offline
// subscriber has; right after the last PUBACK the broker is killed with
// SIGKILL. After the restart the subscriber gets all 200, in order: a
// PUBACK means the message is on disk.
#[tokio::test]
async fn no_acknowledged_message_is_lost_on_kill9() {
    const N: usize = 200;
    let mut broker = Broker::start(OPEN);
    let mut archive = connect_v4(persistent_v4(&broker, "archive")).await;
    archive.subscribe("log/app", v4::QoS::AtLeastOnce).await;
    archive.disconnect().await;

    let mut app = v4::connect_ok(broker.addr, "app").await;
    for i in 0..N {
        app.client
            .publish(
                "log/app",
                v4::QoS::AtLeastOnce,
                false,
                format!("line-{i:03}").into_bytes(),
            )
            .await
            .expect("queue publish");
    }
    let mut acked = 0;
    while acked < N {
        match app.next().await {
            Ok(v4::Packet::PubAck(_)) => acked += 1,
            Ok(_) => {}
            Err(e) => panic!("after {acked} PUBACKs: {e}"),
        }
    }
    broker.kill9();
    broker.restart();

    let mut archive = connect_v4(persistent_v4(&broker, "archive")).await;
    assert!(archive.connack.session_present);
    for i in 0..N {
        assert_eq!(
            text(&archive.publish().await.payload),
            format!("line-{i:03}")
        );
    }
    archive.no_publish(QUIET).await;
}

/// Bytes in the broker's data directory (RocksDB's log and tables).
fn stored_bytes(b: &Broker) -> u64 {
    std::fs::read_dir(b.data_dir())
        .map(|d| {
            d.filter_map(Result::ok)
                .filter_map(|f| f.metadata().ok())
                .map(|m| m.len())
                .sum()
        })
        .unwrap_or(0)
}

// Twelve field devices keep persistent sessions on alerts/# and are all
// offline when 40 alerts of 8 KiB each are published at QoS 1 and 2. The
// broker writes each alert once, not once per device (issue #11 item 2):
// the data directory grows by far less than the 3.8 MB that twelve copies
// would take. Killed with SIGKILL and restarted, every device gets every
// alert, in order, at its QoS, with its payload intact; once they have
// acknowledged them, another restart owes them nothing.
#[tokio::test]
async fn a_message_for_many_offline_sessions_is_stored_once_and_survives_kill9() {
    let mut broker = Broker::start(OPEN);
    let devices: Vec<String> = (0..12).map(|i| format!("device-{i}")).collect();
    for d in &devices {
        let mut c = connect_v4(persistent_v4(&broker, d)).await;
        c.subscribe("alerts/#", v4::QoS::ExactlyOnce).await;
        c.disconnect().await;
    }
    let before = stored_bytes(&broker);
    let mut ops = v4::connect_ok(broker.addr, "ops").await;
    let alerts: Vec<(Vec<u8>, v4::QoS)> = (0..40u8)
        .map(|i| {
            let qos = if i % 2 == 0 {
                v4::QoS::AtLeastOnce
            } else {
                v4::QoS::ExactlyOnce
            };
            (vec![i; 8 * 1024], qos)
        })
        .collect();
    for (payload, qos) in &alerts {
        ops.publish_acked("alerts/plant-1", *qos, false, payload)
            .await;
    }
    let grown = stored_bytes(&broker).saturating_sub(before);
    let one_copy = 40 * 8 * 1024;
    assert!(
        grown < 3 * one_copy,
        "the data directory grew by {grown} bytes; one copy of the alerts is {one_copy}"
    );

    broker.kill9();
    broker.restart();
    for d in &devices {
        let mut c = connect_v4(persistent_v4(&broker, d)).await;
        assert!(c.connack.session_present, "{d}: the session survived");
        for (i, (payload, qos)) in alerts.iter().enumerate() {
            let p = c.publish().await;
            assert_eq!(p.topic, "alerts/plant-1");
            assert_eq!(
                (p.payload.len(), p.payload.first()),
                (payload.len(), payload.first()),
                "{d}: alert {i} in order"
            );
            assert_eq!(p.qos, *qos, "{d}: alert {i}");
        }
        c.no_publish(QUIET).await;
        c.disconnect().await;
    }

    broker.kill9();
    broker.restart();
    for d in &devices {
        let mut c = connect_v4(persistent_v4(&broker, d)).await;
        assert!(c.connack.session_present);
        c.no_publish(QUIET).await;
        c.disconnect().await;
    }
}
