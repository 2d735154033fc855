//! Topics and retained messages as an attacker or a careless client uses
//! them: filters thousands of levels deep, names past the configured
//! limits, NUL inside a name, one wildcard over 10,000 retained topics, one
//! client holding 100,000 subscriptions. Every story ends with a healthy
//! client still round-tripping: one client never takes the broker down.

use std::collections::HashSet;

use chatmq_tests::metrics::metric;
use chatmq_tests::raw::{connected_v4, connected_v5, expect_disconnect, p4, p5, Silence};
use chatmq_tests::{v4, v5, Broker, OPEN, PATIENCE};
use rumqttc::v5::mqttbytes::v5::{
    DisconnectReasonCode, PubAckReason, PubRecReason, SubscribeReasonCode, UnsubAckReason,
};
use std::time::Duration;

const QUIET: Duration = Duration::from_millis(500);

/// erin's filter from the crash report: her own subtree, then 5,000 `/`.
/// Valid MQTT, about 5 KB: far under the 65,535-byte string limit.
fn erins_deep_filter() -> String {
    format!("sensors/erin/{}", "/".repeat(5_000))
}

/// erin may use her subtree (`sensors/%u/#`); anyone may use `health/#`.
const ERIN: &str = r#"
[auth]
allow_anonymous = true

[[auth.users]]
name = "erin"
password = "pw"

[[acl.rules]]
user = "*"
topic = "sensors/%u/#"
access = "pubsub"

[[acl.rules]]
user = "*"
topic = "health/#"
access = "pubsub"
"#;

/// ERIN with limits raised past erin's filter, so it reaches the trie.
fn erin_unlimited() -> String {
    format!("{ERIN}\n[mqtt]\nmax_topic_levels = 10000\nmax_topic_length = 65535\n")
}

fn with_mqtt(base: &str, mqtt: &str) -> String {
    format!("{base}\n[mqtt]\n{mqtt}\n")
}

async fn erin_v4(b: &Broker, id: &str) -> v4::Client {
    let mut o = v4::options(b.addr, id);
    o.set_credentials("erin", "pw");
    match v4::connect(o).await {
        Ok(c) => c,
        Err(e) => panic!("erin ({id}) could not connect: {e}"),
    }
}

async fn erin_v5(b: &Broker, id: &str, expiry: u32) -> v5::Client {
    let mut o = v5::options(b.addr, id);
    o.set_credentials("erin", "pw");
    o.set_clean_start(expiry == 0);
    o.set_session_expiry_interval(Some(expiry));
    match v5::connect(o).await {
        Ok(c) => c,
        Err(e) => panic!("erin ({id}) could not connect: {e}"),
    }
}

/// A new client subscribes to its own topic, publishes there at QoS 1 and
/// gets the message back: the broker is up and serving.
async fn healthy_round_trip(b: &Broker, id: &str) {
    let mut c = v5::connect_ok(b.addr, id).await;
    let topic = format!("health/{id}");
    let ack = c.subscribe(&topic, v5::QoS::AtLeastOnce).await;
    assert_eq!(
        ack.return_codes,
        [SubscribeReasonCode::Success(v5::QoS::AtLeastOnce)]
    );
    let (_, mut got) = c
        .publish_acked_keeping(&topic, v5::QoS::AtLeastOnce, false, b"ping")
        .await;
    if got.is_empty() {
        got.push(c.publish().await);
    }
    assert_eq!(&got[0].payload[..], b"ping");
    c.disconnect().await;
}

fn publish_v5(topic: &str, qos: v5::QoS, pkid: u16) -> p5::Packet {
    let mut p = p5::Publish::new(topic, qos, "x", None);
    p.pkid = pkid;
    p5::Packet::Publish(p)
}

fn subscribe_v5(pkid: u16, filters: &[&str]) -> p5::Packet {
    let filters: Vec<p5::Filter> = filters
        .iter()
        .map(|f| p5::Filter::new(*f, v5::QoS::AtMostOnce))
        .collect();
    let mut s = p5::Subscribe::new_many(filters, None);
    s.pkid = pkid;
    p5::Packet::Subscribe(s)
}

// --- Item 1: the deep-filter crash -------------------------------------

/// erin (3.1.1, clean session), allowed `sensors/%u/#`, subscribes to
/// `sensors/erin/` followed by 5,000 `/` and disconnects. That aborted the
/// broker (`tokio-rt-worker has overflowed its stack`). Now the filter is
/// past `mqtt.max_topic_levels` (128 by default): 3.1.1 gets SUBACK failure
/// and MQTT 5 gets 0x8F for that filter only, and the broker stays up.
#[tokio::test]
async fn erins_5000_level_filter_is_refused_by_default_and_the_broker_stays_up() {
    let broker = Broker::start(ERIN);
    let deep = erins_deep_filter();
    let mut erin = erin_v4(&broker, "erin-deep").await;
    let ack = erin.subscribe(&deep, v4::QoS::AtLeastOnce).await;
    assert_eq!(ack.return_codes, [v4::SubscribeReasonCode::Failure]);
    erin.disconnect().await;
    healthy_round_trip(&broker, "after-3-1-1").await;

    let mut erin = erin_v5(&broker, "erin-deep-5", 0).await;
    let both = vec![
        v5::Filter::new(deep.clone(), v5::QoS::AtLeastOnce),
        v5::Filter::new("sensors/erin/temp", v5::QoS::AtLeastOnce),
    ];
    erin.client.subscribe_many(both).await.expect("subscribe");
    let ack = loop {
        match erin.next().await {
            Ok(v5::Packet::SubAck(a)) => break a,
            Ok(_) => continue,
            Err(e) => panic!("waiting for SUBACK: {e}"),
        }
    };
    assert_eq!(
        ack.return_codes,
        [
            SubscribeReasonCode::TopicFilterInvalid,
            SubscribeReasonCode::Success(v5::QoS::AtLeastOnce)
        ]
    );
    erin.disconnect().await;
    healthy_round_trip(&broker, "after-5").await;
    assert!(metric(&broker, "chatmq_topics_refused_total").await >= 2.0);
}

/// With the limits raised so that erin's 5,000-level filter is accepted,
/// every walk of the trie over it is still safe: a PUBLISH that matches it
/// is delivered, UNSUBSCRIBE removes it, and a session that ends holding it
/// is cleaned up, each followed by a healthy round trip.
#[tokio::test]
async fn a_5000_level_filter_in_the_trie_is_matched_removed_and_dropped_safely() {
    let broker = Broker::start(&erin_unlimited());
    let deep = erins_deep_filter();
    let mut erin = erin_v4(&broker, "erin-deep").await;
    let ack = erin.subscribe(&deep, v4::QoS::AtLeastOnce).await;
    assert_eq!(
        ack.return_codes,
        [v4::SubscribeReasonCode::Success(v4::QoS::AtLeastOnce)]
    );

    // A PUBLISH matching it (the topic with the same 5,000 levels).
    let mut sender = erin_v4(&broker, "erin-sender").await;
    sender
        .publish_acked(&deep, v4::QoS::AtLeastOnce, false, b"deep")
        .await;
    let got = erin.publish().await;
    assert_eq!(got.topic, deep);
    assert_eq!(&got.payload[..], b"deep");
    healthy_round_trip(&broker, "after-publish").await;

    // UNSUBSCRIBE of it.
    erin.unsubscribe(&deep).await;
    healthy_round_trip(&broker, "after-unsubscribe").await;

    // A clean session that ends holding it.
    erin.subscribe(&deep, v4::QoS::AtLeastOnce).await;
    erin.disconnect().await;
    sender.disconnect().await;
    healthy_round_trip(&broker, "after-disconnect").await;
    assert!(!broker.log().contains("overflowed"), "{}", broker.log());
}

/// The MQTT 5 variant: erin's session outlives her connection (expiry 1 s)
/// holding the deep filter. It used to abort the broker when the session
/// expired, and again seconds after every restart, since the session was
/// restored from disk each time. Now it expires quietly, is gone from disk,
/// and the broker stays up across restarts. By default the filter is not
/// even accepted (0x8F).
#[tokio::test]
async fn a_persistent_session_with_a_deep_filter_expires_without_taking_the_broker_down() {
    let mut broker = Broker::start(&erin_unlimited());
    let deep = erins_deep_filter();
    let mut erin = erin_v5(&broker, "erin-persistent", 1).await;
    let ack = erin.subscribe(&deep, v5::QoS::AtLeastOnce).await;
    assert_eq!(
        ack.return_codes,
        [SubscribeReasonCode::Success(v5::QoS::AtLeastOnce)]
    );
    erin.disconnect().await;

    for round in 0..2 {
        broker.restart();
        // Past the expiry and a sweep of the expiry timer (every 0.5 s).
        tokio::time::sleep(Duration::from_secs(3)).await;
        healthy_round_trip(&broker, &format!("after-restart-{round}")).await;
    }
    let erin = erin_v5(&broker, "erin-persistent", 1).await;
    assert!(!erin.connack.session_present, "the session expired");
    erin.disconnect().await;
    healthy_round_trip(&broker, "at-the-end").await;
}

// --- Topic limits and NUL ------------------------------------------------

/// A topic name past `mqtt.max_topic_levels` (129 levels) or
/// `mqtt.max_topic_length` (4,097 bytes) is valid MQTT the broker will not
/// carry. An MQTT 5 QoS 1/2 publish is refused on its own (PUBACK/PUBREC
/// 0x90 Topic Name invalid) and the connection goes on; QoS 0 has no ack,
/// so DISCONNECT 0x90; a 3.1.1 client has no reason codes: it is closed.
#[tokio::test]
async fn a_topic_name_past_the_limits_is_refused_with_0x90() {
    let broker = Broker::start(OPEN);
    let too_deep = format!("{}end", "a/".repeat(128));
    let too_long = "x".repeat(4_097);
    let mut w = connected_v5(broker.addr, "limits-5").await;
    w.send_v5(&publish_v5(&too_deep, v5::QoS::AtLeastOnce, 1))
        .await;
    match w.next_v5(PATIENCE).await {
        Ok(p5::Packet::PubAck(a)) => assert_eq!(a.reason, PubAckReason::TopicNameInvalid),
        other => panic!("expected PUBACK 0x90, got {other:?}"),
    }
    w.send_v5(&publish_v5(&too_long, v5::QoS::ExactlyOnce, 2))
        .await;
    match w.next_v5(PATIENCE).await {
        Ok(p5::Packet::PubRec(r)) => assert_eq!(r.reason, PubRecReason::TopicNameInvalid),
        other => panic!("expected PUBREC 0x90, got {other:?}"),
    }
    // The connection goes on: a topic within the limits is accepted.
    let fine = format!("{}end", "a/".repeat(127));
    w.send_v5(&publish_v5(&fine, v5::QoS::AtLeastOnce, 3)).await;
    match w.next_v5(PATIENCE).await {
        Ok(p5::Packet::PubAck(a)) => assert_eq!(a.reason, PubAckReason::Success),
        other => panic!("expected PUBACK, got {other:?}"),
    }
    w.send_v5(&publish_v5(&too_deep, v5::QoS::AtMostOnce, 0))
        .await;
    expect_disconnect(&mut w, DisconnectReasonCode::TopicNameInvalid).await;

    let mut w = connected_v4(broker.addr, "limits-4").await;
    let mut p = p4::Publish::new(&too_deep, v4::QoS::AtLeastOnce, "x");
    p.pkid = 1;
    w.send_v4(&p4::Packet::Publish(p)).await;
    assert_eq!(w.next_v4(PATIENCE).await, Err(Silence::Closed));
    healthy_round_trip(&broker, "after-limits").await;
    assert_eq!(metric(&broker, "chatmq_topics_refused_total").await, 4.0);
}

/// A filter past the limits gets 0x8F in its own SUBACK slot; the other
/// filters of the same SUBSCRIBE are granted.
#[tokio::test]
async fn a_filter_past_the_limits_gets_0x8f_for_that_filter_only() {
    let broker = Broker::start(&with_mqtt(
        OPEN,
        "max_topic_levels = 4\nmax_topic_length = 20",
    ));
    let mut w = connected_v5(broker.addr, "filters").await;
    w.send_v5(&subscribe_v5(
        1,
        &[
            "a/b/c/d",
            "a/b/c/d/e",
            "a/+/#",
            &"y".repeat(21),
            "$share/g/a/b/c/+",
        ],
    ))
    .await;
    match w.next_v5(PATIENCE).await {
        Ok(p5::Packet::SubAck(a)) => assert_eq!(
            a.return_codes,
            [
                SubscribeReasonCode::Success(v5::QoS::AtMostOnce),
                SubscribeReasonCode::TopicFilterInvalid,
                SubscribeReasonCode::Success(v5::QoS::AtMostOnce),
                SubscribeReasonCode::TopicFilterInvalid,
                SubscribeReasonCode::Success(v5::QoS::AtMostOnce),
            ]
        ),
        other => panic!("expected SUBACK, got {other:?}"),
    }
}

/// [MQTT-1.5.4-2] a UTF-8 string in a packet must not contain U+0000: a
/// topic name or filter with NUL makes the packet malformed. The broker
/// closes that connection (MQTT 5: DISCONNECT 0x81) without acting on any
/// filter of the packet, and serves everyone else.
#[tokio::test]
async fn nul_in_a_topic_or_filter_is_a_malformed_packet_mqtt_1_5_4_2() {
    let broker = Broker::start(OPEN);

    let mut w = connected_v5(broker.addr, "nul-publish").await;
    w.send_v5(&publish_v5("a\0b", v5::QoS::AtLeastOnce, 1))
        .await;
    expect_disconnect(&mut w, DisconnectReasonCode::MalformedPacket).await;

    let mut w = connected_v5(broker.addr, "nul-subscribe").await;
    w.send_v5(&subscribe_v5(1, &["fine/x", "a\0b"])).await;
    expect_disconnect(&mut w, DisconnectReasonCode::MalformedPacket).await;

    let mut w = connected_v5(broker.addr, "nul-unsubscribe").await;
    let mut u = p5::Unsubscribe::new("a\0b", None);
    u.pkid = 1;
    w.send_v5(&p5::Packet::Unsubscribe(u)).await;
    expect_disconnect(&mut w, DisconnectReasonCode::MalformedPacket).await;

    let mut w = connected_v4(broker.addr, "nul-subscribe-4").await;
    let mut s = p4::Subscribe::new("a\0b", v4::QoS::AtMostOnce);
    s.pkid = 1;
    w.send_v4(&p4::Packet::Subscribe(s)).await;
    assert_eq!(w.next_v4(PATIENCE).await, Err(Silence::Closed));

    healthy_round_trip(&broker, "after-nul").await;
}

// --- Retained messages ----------------------------------------------------

/// Publishes `count` retained QoS 1 messages on `fleet/{i}/state` and waits
/// for every PUBACK.
async fn retain_fleet(b: &Broker, count: usize) {
    let mut publisher = v5::connect_ok(b.addr, "fleet-publisher").await;
    for i in 0..count {
        let payload = format!("state of {i}").into_bytes();
        publisher
            .client
            .publish(
                format!("fleet/{i}/state"),
                v5::QoS::AtLeastOnce,
                true,
                payload,
            )
            .await
            .expect("queue publish");
    }
    let mut acked = 0;
    while acked < count {
        match publisher.next().await {
            Ok(v5::Packet::PubAck(a)) => {
                assert_eq!(a.reason, PubAckReason::Success);
                acked += 1;
            }
            Ok(_) => {}
            Err(e) => panic!("{acked} of {count} retained publishes acked: {e}"),
        }
    }
    publisher.disconnect().await;
}

/// Receives retained messages until `expected` arrived or the broker goes
/// quiet; returns the topics, checking each carries RETAIN.
async fn receive_retained(c: &mut v5::Client, expected: usize) -> Vec<String> {
    let mut topics = Vec::new();
    while topics.len() < expected {
        match c.next().await {
            Ok(v5::Packet::Publish(p)) => {
                assert!(p.retain, "retained on subscribe keep RETAIN [MQTT-3.3.1-8]");
                topics.push(String::from_utf8_lossy(&p.topic).into_owned());
            }
            Ok(_) => {}
            Err(e) => panic!("{} of {expected} retained messages: {e}", topics.len()),
        }
    }
    topics.extend(
        c.publishes_for(QUIET)
            .await
            .into_iter()
            .map(|p| String::from_utf8_lossy(&p.topic).into_owned()),
    );
    topics
}

/// A device fleet keeps its state in 10,000 retained topics. A dashboard
/// subscribing to `fleet/#` gets every one of them, once each. It used to
/// get 1,000 (the offline-queue bound) and the rest vanished, uncounted.
#[tokio::test]
async fn a_wildcard_subscriber_gets_all_10000_retained_topics_once_each() {
    // The fleet's gateway writes all 10,000 at once: its operator lets a
    // publisher burst that far (the default publish_burst is 2,000).
    let broker = Broker::start(&format!(
        "{OPEN}\n[mqtt]\npublish_burst = 20000\nuser_publish_burst = 20000\n\n\
         [storage]\nsync = \"never\"\n"
    ));
    retain_fleet(&broker, 10_000).await;
    assert_eq!(metric(&broker, "chatmq_retained_messages").await, 10_000.0);

    let mut dashboard = v5::connect_ok(broker.addr, "dashboard").await;
    dashboard
        .client
        .subscribe("fleet/#", v5::QoS::AtLeastOnce)
        .await
        .expect("subscribe");
    let topics = receive_retained(&mut dashboard, 10_000).await;
    let distinct: HashSet<&String> = topics.iter().collect();
    assert_eq!(topics.len(), 10_000, "each retained topic exactly once");
    assert_eq!(distinct.len(), 10_000);
    assert!(distinct.contains(&"fleet/9999/state".to_string()));
    assert_eq!(metric(&broker, "chatmq_messages_dropped_total").await, 0.0);
    assert_eq!(metric(&broker, "chatmq_retained_not_sent_total").await, 0.0);
    dashboard.disconnect().await;
    healthy_round_trip(&broker, "after-fleet").await;
}

/// With `mqtt.max_retained_per_subscription = 50`, a subscription matching
/// 80 retained topics gets 50 of them; the other 30 are counted on
/// `/metrics` and logged, never silently lost.
#[tokio::test]
async fn retained_beyond_the_per_subscription_limit_are_counted() {
    let config = format!(
        "{OPEN}\n[mqtt]\nmax_retained_per_subscription = 50\n[storage]\nsync = \"never\"\n"
    );
    let broker = Broker::start(&config);
    retain_fleet(&broker, 80).await;
    let mut dashboard = v5::connect_ok(broker.addr, "dashboard").await;
    dashboard
        .client
        .subscribe("fleet/+/state", v5::QoS::AtLeastOnce)
        .await
        .expect("subscribe");
    let topics = receive_retained(&mut dashboard, 50).await;
    assert_eq!(topics.len(), 50);
    assert_eq!(
        metric(&broker, "chatmq_retained_not_sent_total").await,
        30.0
    );
    assert!(broker.log().contains("max_retained_per_subscription"));
}

/// The retained store is capped (`mqtt.max_retained_messages = 3`,
/// `mqtt.max_retained_bytes = 1000`). Once full, an MQTT 5 QoS 1 retained
/// publish on a new topic is refused with 0x97 and not delivered; replacing
/// or clearing a topic still works. A 3.1.1 client cannot be told: its
/// message is delivered to current subscribers but not retained. Each
/// refusal is counted.
#[tokio::test]
async fn the_retained_store_is_capped_by_count_and_bytes() {
    let config = with_mqtt(OPEN, "max_retained_messages = 3\nmax_retained_bytes = 1000");
    let broker = Broker::start(&config);
    let mut live = v5::connect_ok(broker.addr, "live").await;
    live.subscribe("t/#", v5::QoS::AtLeastOnce).await;
    let mut publisher = v5::connect_ok(broker.addr, "publisher-5").await;
    let reason = |ack: Option<v5::Packet>| match ack {
        Some(v5::Packet::PubAck(a)) => a.reason,
        other => panic!("expected PUBACK, got {other:?}"),
    };
    for t in ["t/1", "t/2", "t/3"] {
        let ack = publisher
            .publish_acked(t, v5::QoS::AtLeastOnce, true, b"on")
            .await;
        assert_eq!(reason(ack), PubAckReason::Success, "{t}");
        assert_eq!(live.publish().await.topic, t);
    }
    let ack = publisher
        .publish_acked("t/4", v5::QoS::AtLeastOnce, true, b"on")
        .await;
    assert_eq!(reason(ack), PubAckReason::QuotaExceeded);
    live.no_publish(QUIET).await;
    // Replacing a topic's message fits; more bytes than the cap do not.
    let ack = publisher
        .publish_acked("t/1", v5::QoS::AtLeastOnce, true, b"replaced")
        .await;
    assert_eq!(reason(ack), PubAckReason::Success);
    let ack = publisher
        .publish_acked("t/1", v5::QoS::AtLeastOnce, true, &[b'x'; 2_000])
        .await;
    assert_eq!(reason(ack), PubAckReason::QuotaExceeded);
    // Clearing frees a place.
    let ack = publisher
        .publish_acked("t/2", v5::QoS::AtLeastOnce, true, b"")
        .await;
    assert_eq!(reason(ack), PubAckReason::Success);
    let ack = publisher
        .publish_acked("t/4", v5::QoS::AtLeastOnce, true, b"on")
        .await;
    assert_eq!(reason(ack), PubAckReason::Success);
    let seen: Vec<String> = live
        .publishes_for(QUIET)
        .await
        .into_iter()
        .map(|p| String::from_utf8_lossy(&p.topic).into_owned())
        .collect();
    assert_eq!(seen, ["t/1", "t/2", "t/4"]);

    // A 3.1.1 publisher, store full again (t/1, t/3, t/4).
    let mut old = v4::connect_ok(broker.addr, "publisher-4").await;
    old.publish_acked("t/5", v4::QoS::AtLeastOnce, true, b"on")
        .await;
    assert_eq!(live.publish().await.topic, "t/5", "delivered all the same");
    let mut newcomer = v5::connect_ok(broker.addr, "newcomer").await;
    newcomer
        .client
        .subscribe("t/#", v5::QoS::AtLeastOnce)
        .await
        .expect("subscribe");
    let mut retained = receive_retained(&mut newcomer, 3).await;
    retained.sort();
    assert_eq!(retained, ["t/1", "t/3", "t/4"], "t/5 was not retained");
    assert_eq!(metric(&broker, "chatmq_retained_refused_total").await, 3.0);
    assert_eq!(metric(&broker, "chatmq_retained_messages").await, 3.0);
}

// --- Many subscriptions ----------------------------------------------------

/// One client holds 100,000 subscriptions (the configured maximum), sent
/// as 100 SUBSCRIBEs of 1,000 filters, while another client keeps
/// round-tripping: it is served throughout. Filter 100,001 is refused with
/// 0x97 Quota exceeded, and a message on one of the 100,000 still arrives.
#[tokio::test]
async fn one_client_with_100000_subscriptions_does_not_stall_the_others() {
    let broker = Broker::start(&with_mqtt(OPEN, "max_subscriptions = 100000"));
    let mut hoarder = v5::connect_ok(broker.addr, "hoarder").await;
    let flood = tokio::spawn(async move {
        for batch in 0..100 {
            let filters = (0..1_000)
                .map(|i| {
                    v5::Filter::new(format!("load/{}", batch * 1_000 + i), v5::QoS::AtLeastOnce)
                })
                .collect::<Vec<_>>();
            hoarder
                .client
                .subscribe_many(filters)
                .await
                .expect("subscribe");
        }
        let mut granted = 0;
        for _ in 0..100 {
            let ack = loop {
                match hoarder.next().await {
                    Ok(v5::Packet::SubAck(a)) => break a,
                    Ok(_) => continue,
                    Err(e) => panic!("after {granted} granted: {e}"),
                }
            };
            granted += ack
                .return_codes
                .iter()
                .filter(|c| matches!(c, SubscribeReasonCode::Success(_)))
                .count();
        }
        (hoarder, granted)
    });

    let mut healthy = v5::connect_ok(broker.addr, "healthy").await;
    healthy
        .subscribe("health/healthy", v5::QoS::AtLeastOnce)
        .await;
    let mut round_trips = 0;
    while !flood.is_finished() {
        let (_, mut got) = healthy
            .publish_acked_keeping("health/healthy", v5::QoS::AtLeastOnce, false, b"ping")
            .await;
        if got.is_empty() {
            got.push(healthy.publish().await);
        }
        round_trips += 1;
    }
    let (mut hoarder, granted) = flood.await.expect("the subscribing task");
    assert_eq!(granted, 100_000);
    assert!(round_trips > 0, "the healthy client was served meanwhile");

    let ack = hoarder
        .subscribe("load/one-too-many", v5::QoS::AtLeastOnce)
        .await;
    assert_eq!(ack.return_codes, [SubscribeReasonCode::QuotaExceeded]);
    healthy
        .publish_acked("load/77777", v5::QoS::AtLeastOnce, false, b"found")
        .await;
    let p = hoarder.publish().await;
    assert_eq!(
        (&p.topic[..], &p.payload[..]),
        (&b"load/77777"[..], &b"found"[..])
    );
    let ack = hoarder.unsubscribe("load/77777").await;
    assert_eq!(ack.reasons, [UnsubAckReason::Success]);
    hoarder.disconnect().await;
    healthy_round_trip(&broker, "after-hoarder").await;
}
