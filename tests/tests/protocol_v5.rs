//! MQTT 5 conformance over real TCP: a rumqttc v5 client where a
//! well-behaved client is enough, raw bytes where the test needs a client
//! to misbehave or to use what rumqttc does not offer (DISCONNECT reason
//! codes, aliases above the maximum). Each test names the normative
//! statements it checks.

use std::time::{Duration, Instant};

use bytes::Bytes;
use chatmq_tests::raw::{expect_disconnect, p5, Wire};
use chatmq_tests::v5::{
    self, ConnectReturnCode, Filter, LastWill, LastWillProperties, Packet, PubAckReason, Publish,
    PublishProperties, QoS, RetainForwardRule, SubscribeProperties, SubscribeReasonCode,
};
use chatmq_tests::{Broker, OPEN, PATIENCE};
use rumqttc::v5::mqttbytes::v5::{DisconnectReasonCode, PubRecReason, UnsubAckReason};

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

fn payload(p: &Publish) -> String {
    String::from_utf8_lossy(&p.payload).into_owned()
}

fn topic(p: &Publish) -> String {
    String::from_utf8_lossy(&p.topic).into_owned()
}

fn sub_ids(p: &Publish) -> Vec<usize> {
    let mut ids = p
        .properties
        .as_ref()
        .map(|pp| pp.subscription_identifiers.clone())
        .unwrap_or_default();
    ids.sort();
    ids
}

fn with_id(id: usize) -> Option<SubscribeProperties> {
    Some(SubscribeProperties {
        id: Some(id),
        user_properties: vec![],
    })
}

fn filter(path: &str, q: QoS, rule: RetainForwardRule) -> Filter {
    let mut f = Filter::new(path, q);
    f.retain_forward_rule = rule;
    f
}

/// A raw MQTT 5 CONNECT with clean start.
fn connect_packet(id: &str, keep_alive: u16, will: Option<p5::LastWill>) -> p5::Packet {
    p5::Packet::Connect(
        p5::Connect {
            keep_alive,
            client_id: id.into(),
            clean_start: true,
            properties: None,
        },
        will,
        None,
    )
}

/// Opens a raw connection and completes CONNECT / CONNACK.
async fn raw_session(b: &Broker, connect: p5::Packet) -> (Wire, p5::ConnAck) {
    let mut w = Wire::open(b.addr).await;
    w.send_v5(&connect).await;
    match w.next_v5(PATIENCE).await {
        Ok(p5::Packet::ConnAck(a)) => {
            assert_eq!(a.code, p5::ConnectReturnCode::Success);
            (w, a)
        }
        other => panic!("expected CONNACK, got {other:?}"),
    }
}

fn will_props(delay: u32) -> LastWillProperties {
    LastWillProperties {
        delay_interval: Some(delay),
        payload_format_indicator: None,
        message_expiry_interval: None,
        content_type: None,
        response_topic: None,
        correlation_data: None,
        user_properties: vec![],
    }
}

// ---------------------------------------------------------------- CONNECT

// The CONNACK tells the client the limits it must respect and the features
// it may use (ARCHITECTURE: Maximum Packet Size = max_payload + 65 KiB).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connack_announces_limits_and_features() {
    let b = Broker::start(OPEN);
    let c = v5::connect_ok(b.addr, "props").await;
    assert_eq!(c.connack.code, ConnectReturnCode::Success);
    let p = c.connack.properties.clone().expect("CONNACK properties");
    assert_eq!(p.receive_max, Some(100), "mqtt.max_inflight");
    assert_eq!(p.max_packet_size, Some(262_144 + 65 * 1024));
    assert_eq!(p.topic_alias_max, Some(16), "mqtt.topic_alias_max");
    assert_eq!(p.max_qos, None, "QoS 2 is supported");
    assert_eq!(p.retain_available, Some(1));
    assert_eq!(p.wildcard_subscription_available, Some(1));
    assert_eq!(p.subscription_identifiers_available, Some(1));
    assert_eq!(p.shared_subscription_available, Some(1));
    assert_eq!(
        p.assigned_client_identifier, None,
        "the client chose its id"
    );
}

// [MQTT-3.1.3-6], [MQTT-3.1.3-7], [MQTT-3.2.2-16] an empty client id gets a
// new, unique Assigned Client Identifier.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_empty_client_id_gets_an_assigned_identifier() {
    let b = Broker::start(OPEN);
    let mut ids = Vec::new();
    let mut clients = Vec::new();
    for _ in 0..2 {
        let c = v5::connect(v5::options(b.addr, ""))
            .await
            .expect("accepted");
        let id = c
            .connack
            .properties
            .as_ref()
            .and_then(|p| p.assigned_client_identifier.clone())
            .expect("Assigned Client Identifier");
        assert!(!id.is_empty());
        ids.push(id);
        clients.push(c);
    }
    assert_ne!(ids[0], ids[1]);
    // Both sessions are alive: neither took the other over.
    for c in &mut clients {
        c.subscribe("anon/t", QoS::AtLeastOnce).await;
    }
}

// [MQTT-3.2.2-21] a keepalive above mqtt.keepalive_max is answered with
// Server Keep Alive; [MQTT-3.2.2-22] one within it is left as asked.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_keep_alive_caps_the_clients_keepalive() {
    let b = Broker::start(&open_with("[mqtt]\nkeepalive_max = 5"));
    let mut o = v5::options(b.addr, "greedy");
    o.set_keep_alive(Duration::from_secs(60));
    let c = v5::connect(o).await.expect("connect");
    let p = c.connack.properties.clone().expect("CONNACK properties");
    assert_eq!(p.server_keep_alive, Some(5));

    let mut o = v5::options(b.addr, "modest");
    o.set_keep_alive(Duration::from_secs(5));
    let c = v5::connect(o).await.expect("connect");
    let p = c.connack.properties.clone().expect("CONNACK properties");
    assert_eq!(p.server_keep_alive, None);
}

// [MQTT-3.1.2-22] keepalive 0 is replaced by keepalive_max (here 1 s), and
// enforced: silence for 1.5 s ends with DISCONNECT 0x8D.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_keep_alive_is_enforced() {
    let b = Broker::start(&open_with("[mqtt]\nkeepalive_max = 1"));
    let (mut w, ack) = raw_session(&b, connect_packet("nokeepalive", 0, None)).await;
    assert_eq!(
        ack.properties.and_then(|p| p.server_keep_alive),
        Some(1),
        "keepalive 0 must be overridden"
    );
    let start = Instant::now();
    expect_disconnect(&mut w, DisconnectReasonCode::KeepAliveTimeout).await;
    let after = start.elapsed();
    assert!(
        after >= Duration::from_millis(1300) && after < Duration::from_millis(3000),
        "closed after {after:?}; expected about 1.5 s"
    );
}

// ---------------------------------------------------------------- QoS

// [MQTT-3.8.4-8] delivery at min(publish QoS, granted QoS), never upgraded;
// [MQTT-2.2.1-2] QoS 0 has no packet id, QoS > 0 a non-zero one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delivery_qos_is_the_minimum_of_publish_and_subscription() {
    let b = Broker::start(OPEN);
    let mut subs = Vec::new();
    for sq in 0..3u8 {
        let mut s = v5::connect_ok(b.addr, &format!("sub{sq}")).await;
        let ack = s.subscribe("matrix/#", qos(sq)).await;
        assert_eq!(ack.return_codes, [SubscribeReasonCode::Success(qos(sq))]);
        subs.push(s);
    }
    let mut p = v5::connect_ok(b.addr, "pub").await;
    for pq in 0..3u8 {
        p.publish_acked(&format!("matrix/{pq}"), qos(pq), false, &[pq])
            .await;
    }
    for (sq, s) in subs.iter_mut().enumerate() {
        let mut got = Vec::new();
        for _ in 0..3 {
            got.push(s.publish().await);
        }
        got.sort_by_key(topic);
        for (pq, m) in got.iter().enumerate() {
            assert_eq!(m.payload.as_ref(), [pq as u8]);
            let want = qos(pq.min(sq) as u8);
            assert_eq!(m.qos, want, "published QoS {pq}, subscribed QoS {sq}");
            assert_eq!(m.pkid == 0, want == QoS::AtMostOnce, "packet id {}", m.pkid);
        }
        s.no_publish(QUIET).await;
    }
}

// ---------------------------------------------------------------- subscriptions

// Malformed filters get SUBACK 0x8F each [MQTT-3.9.3-1]; valid ones in the
// same SUBSCRIBE are granted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_filters_get_suback_0x8f() {
    let b = Broker::start(OPEN);
    let (mut w, _) = raw_session(&b, connect_packet("badfilters", 60, None)).await;
    let mut sub = p5::Subscribe::new_many(
        [
            Filter::new("a/#/b", QoS::AtLeastOnce),
            Filter::new("a+", QoS::AtLeastOnce),
            Filter::new("ok/+", QoS::AtLeastOnce),
        ],
        None,
    );
    sub.pkid = 9;
    w.send_v5(&p5::Packet::Subscribe(sub)).await;
    match w.next_v5(PATIENCE).await {
        Ok(p5::Packet::SubAck(a)) => {
            assert_eq!(a.pkid, 9, "[MQTT-3.8.4-2]");
            assert_eq!(
                a.return_codes,
                [
                    SubscribeReasonCode::TopicFilterInvalid,
                    SubscribeReasonCode::TopicFilterInvalid,
                    SubscribeReasonCode::Success(QoS::AtLeastOnce),
                ]
            );
        }
        other => panic!("expected SUBACK, got {other:?}"),
    }
}

// [MQTT-3.3.2-2] a topic name with wildcards: DISCONNECT 0x90 and close.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publishing_to_a_wildcard_topic_is_disconnected_with_0x90() {
    let b = Broker::start(OPEN);
    let (mut w, _) = raw_session(&b, connect_packet("wild", 60, None)).await;
    let p = p5::Publish::new("a/+", QoS::AtMostOnce, "x", None);
    w.send_v5(&p5::Packet::Publish(p)).await;
    expect_disconnect(&mut w, DisconnectReasonCode::TopicNameInvalid).await;
}

// [MQTT-3.3.4-2] overlapping subscriptions: one copy at the highest QoS,
// [MQTT-3.3.4-3], [MQTT-3.3.4-4] carrying every matching subscription
// identifier; a subscription without one adds none.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overlapping_subscriptions_deliver_one_copy_with_all_identifiers() {
    let b = Broker::start(OPEN);
    let mut s = v5::connect_ok(b.addr, "overlap").await;
    s.subscribe_with(Filter::new("a/+", QoS::AtMostOnce), with_id(1))
        .await;
    s.subscribe_with(Filter::new("a/#", QoS::ExactlyOnce), with_id(2))
        .await;
    let mut single = v5::connect_ok(b.addr, "single").await;
    single
        .subscribe_with(Filter::new("a/b", QoS::AtLeastOnce), with_id(77))
        .await;
    let mut plain = v5::connect_ok(b.addr, "plain").await;
    plain.subscribe("a/b", QoS::AtLeastOnce).await;

    let mut p = v5::connect_ok(b.addr, "pub").await;
    p.publish_acked("a/b", QoS::ExactlyOnce, false, b"one")
        .await;
    let m = s.publish().await;
    assert_eq!(m.qos, QoS::ExactlyOnce);
    assert_eq!(sub_ids(&m), [1, 2]);
    s.no_publish(QUIET).await;
    assert_eq!(sub_ids(&single.publish().await), [77]);
    assert_eq!(sub_ids(&plain.publish().await), Vec::<usize>::new());
}

// [MQTT-3.10.4-2] no delivery after UNSUBACK; [MQTT-3.11.3-1] one reason per
// filter: Success, or 0x11 No subscription existed [MQTT-3.10.4-5].
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unsubscribe_answers_per_filter_and_stops_delivery() {
    let b = Broker::start(OPEN);
    let mut s = v5::connect_ok(b.addr, "unsub").await;
    s.subscribe("u/t", QoS::AtLeastOnce).await;
    s.subscribe("u/other", QoS::AtLeastOnce).await;
    assert_eq!(
        s.unsubscribe("u/t").await.reasons,
        [UnsubAckReason::Success]
    );
    assert_eq!(
        s.unsubscribe("u/t").await.reasons,
        [UnsubAckReason::NoSubscriptionExisted]
    );
    let mut p = v5::connect_ok(b.addr, "pub").await;
    p.publish_acked("u/t", QoS::AtLeastOnce, false, b"gone")
        .await;
    p.publish_acked("u/other", QoS::AtLeastOnce, false, b"kept")
        .await;
    assert_eq!(payload(&s.publish().await), "kept");
    s.no_publish(QUIET).await;
}

// Shared subscriptions (section 4.8.2): each message goes to one member of
// the group, the members share the load, and retained messages are not
// sent when a shared subscription is made.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shared_subscription_splits_messages_between_members() {
    let b = Broker::start(OPEN);
    let mut p = v5::connect_ok(b.addr, "pub").await;
    p.publish_acked("jobs/old", QoS::AtLeastOnce, true, b"retained")
        .await;
    let mut members = Vec::new();
    for id in ["worker1", "worker2"] {
        let mut m = v5::connect_ok(b.addr, id).await;
        let ack = m.subscribe("$share/g/jobs/#", QoS::AtLeastOnce).await;
        assert_eq!(
            ack.return_codes,
            [SubscribeReasonCode::Success(QoS::AtLeastOnce)]
        );
        members.push(m);
    }
    for i in 0..10 {
        p.publish_acked(
            &format!("jobs/{i}"),
            QoS::AtLeastOnce,
            false,
            i.to_string().as_bytes(),
        )
        .await;
    }
    let mut all = Vec::new();
    for m in &mut members {
        let got = m.publishes_for(QUIET).await;
        assert!(!got.is_empty(), "a member got nothing: no load sharing");
        all.extend(got.iter().map(payload));
    }
    all.sort_by_key(|p| p.parse::<u32>().unwrap_or(u32::MAX));
    let want: Vec<String> = (0..10).map(|i| i.to_string()).collect();
    assert_eq!(all, want, "each message exactly once, no retained message");
}

// ---------------------------------------------------------------- retained

// Retain Handling on subscribe: 0 always sends [MQTT-3.3.1-9], also when
// re-subscribing [MQTT-3.8.4-4]; 1 only for a new subscription
// [MQTT-3.3.1-10]; 2 never [MQTT-3.3.1-11].
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retain_handling_decides_what_a_subscribe_gets() {
    let b = Broker::start(OPEN);
    let mut p = v5::connect_ok(b.addr, "pub").await;
    p.publish_acked("rh/t", QoS::AtLeastOnce, true, b"retained")
        .await;

    let cases = [
        ("always", RetainForwardRule::OnEverySubscribe, [1, 1]),
        ("ifnew", RetainForwardRule::OnNewSubscribe, [1, 0]),
        ("never", RetainForwardRule::Never, [0, 0]),
    ];
    let mut clients = Vec::new();
    for (id, rule, want) in cases {
        let mut c = v5::connect_ok(b.addr, id).await;
        for (round, n) in want.into_iter().enumerate() {
            c.subscribe_with(filter("rh/#", QoS::AtLeastOnce, rule.clone()), None)
                .await;
            let got = c.publishes_for(QUIET).await;
            assert_eq!(got.len(), n, "{id}, subscribe #{}", round + 1);
            for m in got {
                assert_eq!(payload(&m), "retained");
                assert!(m.retain, "[MQTT-3.3.1-8] RETAIN=1 on subscribe");
            }
        }
        clients.push(c);
    }
    // Every subscription is live.
    p.publish_acked("rh/t", QoS::AtLeastOnce, false, b"live")
        .await;
    for c in &mut clients {
        let m = c.publish().await;
        assert_eq!(payload(&m), "live");
        assert!(!m.retain);
    }
}

// Retain As Published: 1 keeps the publisher's RETAIN flag [MQTT-3.3.1-13],
// 0 clears it on live delivery [MQTT-3.3.1-12].
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retain_as_published_keeps_the_flag() {
    let b = Broker::start(OPEN);
    let mut keep = v5::connect_ok(b.addr, "keep").await;
    let mut f = Filter::new("rap/#", QoS::AtLeastOnce);
    f.preserve_retain = true;
    keep.subscribe_with(f, None).await;
    let mut clear = v5::connect_ok(b.addr, "clear").await;
    clear.subscribe("rap/#", QoS::AtLeastOnce).await;

    let mut p = v5::connect_ok(b.addr, "pub").await;
    p.publish_acked("rap/x", QoS::AtLeastOnce, true, b"r").await;
    p.publish_acked("rap/x", QoS::AtLeastOnce, false, b"n")
        .await;
    let (r, n) = (keep.publish().await, keep.publish().await);
    assert_eq!((payload(&r), r.retain), ("r".into(), true));
    assert_eq!((payload(&n), n.retain), ("n".into(), false));
    let (r, n) = (clear.publish().await, clear.publish().await);
    assert_eq!((payload(&r), r.retain), ("r".into(), false));
    assert_eq!((payload(&n), n.retain), ("n".into(), false));
}

// [MQTT-3.3.1-6], [MQTT-3.3.1-7] an empty retained payload clears the topic.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_empty_retained_payload_clears_the_retained_message() {
    let b = Broker::start(OPEN);
    let mut p = v5::connect_ok(b.addr, "pub").await;
    p.publish_acked("clr/a", QoS::AtLeastOnce, true, b"a").await;
    p.publish_acked("clr/b", QoS::AtLeastOnce, true, b"b").await;
    p.publish_acked("clr/a", QoS::AtLeastOnce, true, b"").await;
    let mut s = v5::connect_ok(b.addr, "late").await;
    s.subscribe("clr/#", QoS::AtLeastOnce).await;
    let got = s.publishes_for(QUIET).await;
    assert_eq!(got.iter().map(topic).collect::<Vec<_>>(), ["clr/b"]);
}

// ---------------------------------------------------------------- wills

// A DISCONNECT with reason 0x04 publishes the will; a normal one
// discards it [MQTT-3.14.4-3].
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disconnect_with_will_message_publishes_the_will() {
    let b = Broker::start(OPEN);
    let mut watcher = v5::connect_ok(b.addr, "watcher").await;
    watcher.subscribe("will/#", QoS::AtLeastOnce).await;

    let mut o = v5::options(b.addr, "polite");
    o.set_last_will(LastWill::new(
        "will/polite",
        "x",
        QoS::AtLeastOnce,
        false,
        None,
    ));
    v5::connect(o).await.expect("connect").disconnect().await;

    let will = p5::LastWill::new("will/asked", "bye", QoS::AtLeastOnce, false, None);
    let (mut w, _) = raw_session(&b, connect_packet("asked", 60, Some(will))).await;
    w.send_v5(&p5::Packet::Disconnect(p5::Disconnect::new(
        DisconnectReasonCode::DisconnectWithWillMessage,
    )))
    .await;
    assert!(w.closed_within(PATIENCE).await);

    let m = watcher.publish().await;
    assert_eq!(
        (topic(&m), payload(&m)),
        ("will/asked".into(), "bye".into())
    );
    watcher.no_publish(QUIET).await;
}

// Will Delay Interval: the will of a lost connection waits for the delay;
// [MQTT-3.1.3-9] a client that resumes its session within the delay
// cancels it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_will_delay_waits_and_a_resume_cancels_it() {
    let b = Broker::start(OPEN);
    let mut watcher = v5::connect_ok(b.addr, "watcher").await;
    watcher.subscribe("will/#", QoS::AtLeastOnce).await;
    let options = |id: &str| {
        let mut o = v5::options(b.addr, id);
        o.set_session_expiry_interval(Some(10));
        o.set_last_will(LastWill::new(
            format!("will/{id}"),
            "gone",
            QoS::AtLeastOnce,
            false,
            Some(will_props(2)),
        ));
        o
    };
    let gone = v5::connect(options("gone")).await.expect("connect");
    let back = v5::connect(options("back")).await.expect("connect");
    let lost_at = Instant::now();
    gone.drop_connection();
    back.drop_connection();

    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut o = options("back");
    o.set_clean_start(false);
    let back = v5::connect(o).await.expect("resume");
    assert!(back.connack.session_present);

    let m = watcher.publish().await;
    assert_eq!(topic(&m), "will/gone");
    let waited = lost_at.elapsed();
    assert!(
        waited >= Duration::from_millis(1500),
        "the will came {waited:?} after the loss, before its 2 s delay"
    );
    // "back"'s will would have come at the same moment.
    watcher.no_publish(Duration::from_secs(1)).await;
    back.disconnect().await;
}

// ---------------------------------------------------------------- PUBLISH properties

// [MQTT-3.3.2-5] a message whose expiry passed while the subscriber was
// offline is not delivered; [MQTT-3.3.2-6] one still valid carries the
// interval minus its wait.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn message_expiry_drops_stale_messages_for_offline_sessions() {
    let b = Broker::start(OPEN);
    let options = |clean: bool| {
        let mut o = v5::options(b.addr, "offline");
        o.set_session_expiry_interval(Some(60));
        o.set_clean_start(clean);
        o
    };
    let mut s = v5::connect(options(true)).await.expect("connect");
    s.subscribe("exp/#", QoS::AtLeastOnce).await;
    s.disconnect().await;

    let mut p = v5::connect_ok(b.addr, "pub").await;
    let expiring = |secs| PublishProperties {
        message_expiry_interval: Some(secs),
        ..Default::default()
    };
    p.publish_props_acked("exp/short", QoS::AtLeastOnce, false, b"short", expiring(1))
        .await;
    tokio::time::sleep(Duration::from_millis(2000)).await;
    p.publish_props_acked("exp/long", QoS::AtLeastOnce, false, b"long", expiring(60))
        .await;

    let mut s = v5::connect(options(false)).await.expect("resume");
    assert!(s.connack.session_present);
    let m = s.publish().await;
    assert_eq!(topic(&m), "exp/long", "the expired message was delivered");
    let left = m
        .properties
        .as_ref()
        .and_then(|pp| pp.message_expiry_interval)
        .expect("Message Expiry Interval forwarded");
    assert!((1..=60).contains(&left), "{left}");
    s.no_publish(QUIET).await;
}

// Payload Format Indicator [MQTT-3.3.2-4], Response Topic [MQTT-3.3.2-15],
// Correlation Data [MQTT-3.3.2-16], User Properties in order
// [MQTT-3.3.2-17], [MQTT-3.3.2-18] and Content Type [MQTT-3.3.2-20] reach
// the subscriber unaltered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publish_properties_pass_through_unchanged() {
    let b = Broker::start(OPEN);
    let mut s = v5::connect_ok(b.addr, "sub").await;
    s.subscribe("props/t", QoS::AtLeastOnce).await;
    let mut p = v5::connect_ok(b.addr, "pub").await;
    let user = vec![
        ("k".to_string(), "1".to_string()),
        ("a".to_string(), "2".to_string()),
        ("k".to_string(), "3".to_string()),
    ];
    let props = PublishProperties {
        payload_format_indicator: Some(1),
        content_type: Some("application/json".into()),
        response_topic: Some("reply/to/me".into()),
        correlation_data: Some(Bytes::from_static(b"\x00\x01corr\xff")),
        user_properties: user.clone(),
        ..Default::default()
    };
    p.publish_props_acked("props/t", QoS::AtLeastOnce, false, b"{}", props)
        .await;
    let m = s.publish().await;
    let got = m.properties.expect("properties forwarded");
    assert_eq!(got.payload_format_indicator, Some(1));
    assert_eq!(got.content_type.as_deref(), Some("application/json"));
    assert_eq!(got.response_topic.as_deref(), Some("reply/to/me"));
    assert_eq!(
        got.correlation_data.as_deref(),
        Some(&b"\x00\x01corr\xff"[..])
    );
    assert_eq!(got.user_properties, user);
    assert_eq!(got.message_expiry_interval, None);
    assert_eq!(
        got.topic_alias, None,
        "[MQTT-3.1.2-27] no alias was allowed"
    );
}

// [MQTT-3.8.3-3] No Local: a client does not get its own messages on that
// subscription; messages from others still arrive.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_local_subscribers_do_not_get_their_own_messages() {
    let b = Broker::start(OPEN);
    let mut a = v5::connect_ok(b.addr, "a").await;
    let mut f = Filter::new("nl/t", QoS::AtLeastOnce);
    f.nolocal = true;
    a.subscribe_with(f, None).await;
    let mut other = v5::connect_ok(b.addr, "other").await;
    other.subscribe("nl/t", QoS::AtLeastOnce).await;

    // QoS 0 so that nothing is skipped while waiting for an ack.
    a.publish_acked("nl/t", QoS::AtMostOnce, false, b"from a")
        .await;
    assert_eq!(payload(&other.publish().await), "from a");
    a.no_publish(QUIET).await;
    other
        .publish_acked("nl/t", QoS::AtMostOnce, false, b"from other")
        .await;
    assert_eq!(payload(&a.publish().await), "from other");
}

// Topic aliases from the client: an alias set with a topic stands for it
// until remapped [MQTT-3.3.2-12]; alias 0 or above the announced maximum
// gets DISCONNECT 0x94 [MQTT-3.3.2-8], [MQTT-3.3.2-9], an unknown alias
// with an empty topic 0x82.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn topic_aliases_from_the_client() {
    let b = Broker::start(OPEN);
    let mut s = v5::connect_ok(b.addr, "sub").await;
    s.subscribe("alias/#", QoS::AtLeastOnce).await;
    let mut p = v5::connect_ok(b.addr, "pub").await;
    let alias = |n| PublishProperties {
        topic_alias: Some(n),
        ..Default::default()
    };
    for (t, body) in [
        ("alias/t", "one"),
        ("", "two"),
        ("alias/u", "three"),
        ("", "four"),
    ] {
        p.publish_props_acked(t, QoS::AtLeastOnce, false, body.as_bytes(), alias(1))
            .await;
    }
    let mut got = Vec::new();
    for _ in 0..4 {
        let m = s.publish().await;
        got.push((topic(&m), payload(&m)));
    }
    let want = [
        ("alias/t", "one"),
        ("alias/t", "two"),
        ("alias/u", "three"),
        ("alias/u", "four"),
    ]
    .map(|(t, b)| (t.to_string(), b.to_string()));
    assert_eq!(got, want);

    for (i, (n, t, reason)) in [
        (17, "alias/x", DisconnectReasonCode::TopicAliasInvalid),
        (0, "alias/x", DisconnectReasonCode::TopicAliasInvalid),
        (5, "", DisconnectReasonCode::ProtocolError),
    ]
    .into_iter()
    .enumerate()
    {
        let (mut w, _) = raw_session(&b, connect_packet(&format!("raw{i}"), 60, None)).await;
        let publish = p5::Publish::new(t, QoS::AtMostOnce, "x", Some(alias(n)));
        w.send_v5(&p5::Packet::Publish(publish)).await;
        expect_disconnect(&mut w, reason).await;
    }
    s.no_publish(QUIET).await;
}

// [MQTT-3.1.2-24], [MQTT-3.1.2-25] a message larger than the client's
// Maximum Packet Size is not sent to it (and does not block what follows).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_above_the_clients_maximum_packet_size_are_not_sent() {
    let b = Broker::start(OPEN);
    let mut o = v5::options(b.addr, "small");
    o.set_max_packet_size(Some(200));
    let mut s = v5::connect(o).await.expect("connect");
    s.subscribe("mps/t", QoS::AtLeastOnce).await;
    let mut p = v5::connect_ok(b.addr, "pub").await;
    p.publish_acked("mps/t", QoS::AtLeastOnce, false, &[b'x'; 1000])
        .await;
    p.publish_acked("mps/t", QoS::AtMostOnce, false, &[b'y'; 1000])
        .await;
    p.publish_acked("mps/t", QoS::AtLeastOnce, false, b"small")
        .await;
    let m = s.publish().await;
    assert_eq!(payload(&m), "small");
    s.no_publish(QUIET).await;
}

// [MQTT-3.3.4-9], [MQTT-4.9.0-2] no more unacknowledged QoS 1 messages in
// flight than the client's Receive Maximum; each PUBACK lets one more go.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn receive_maximum_limits_unacknowledged_deliveries() {
    let b = Broker::start(OPEN);
    let mut o = v5::options(b.addr, "slow");
    o.set_receive_maximum(Some(2));
    o.set_manual_acks(true);
    let mut s = v5::connect(o).await.expect("connect");
    s.subscribe("rm/t", QoS::AtLeastOnce).await;
    let mut p = v5::connect_ok(b.addr, "pub").await;
    for i in 0..5 {
        p.publish_acked("rm/t", QoS::AtLeastOnce, false, i.to_string().as_bytes())
            .await;
    }
    let m0 = s.publish().await;
    let m1 = s.publish().await;
    assert_eq!((payload(&m0), payload(&m1)), ("0".into(), "1".into()));
    s.no_publish(QUIET).await;

    s.client.ack(&m0).await.expect("ack");
    let m2 = s.publish().await;
    assert_eq!(payload(&m2), "2");
    s.no_publish(QUIET).await;

    s.client.ack(&m1).await.expect("ack");
    s.client.ack(&m2).await.expect("ack");
    let m3 = s.publish().await;
    let m4 = s.publish().await;
    assert_eq!((payload(&m3), payload(&m4)), ("3".into(), "4".into()));
}

// ---------------------------------------------------------------- reason codes

// DESIGN: an ACL-refused SUBSCRIBE gets SUBACK 0x87, an ACL-refused PUBLISH
// PUBACK 0x87; a payload over mqtt.max_payload PUBACK/PUBREC 0x97. Refused
// messages reach nobody.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusals_carry_reason_codes() {
    let b = Broker::start(&open_with(
        "[mqtt]\nmax_payload = 1024\n\n\
         [[acl.rules]]\nuser = \"*\"\ntopic = \"secret/#\"\naccess = \"deny\"",
    ));
    let mut s = v5::connect_ok(b.addr, "sub").await;
    let ack = s.subscribe("secret/x", QoS::AtLeastOnce).await;
    assert_eq!(ack.return_codes, [SubscribeReasonCode::NotAuthorized]);
    s.subscribe("#", QoS::ExactlyOnce).await;

    let mut p = v5::connect_ok(b.addr, "pub").await;
    match p
        .publish_acked("secret/x", QoS::AtLeastOnce, false, b"x")
        .await
    {
        Some(Packet::PubAck(a)) => assert_eq!(a.reason, PubAckReason::NotAuthorized),
        other => panic!("expected PUBACK 0x87, got {other:?}"),
    }
    match p
        .publish_acked("big/t", QoS::AtLeastOnce, false, &[b'x'; 2000])
        .await
    {
        Some(Packet::PubAck(a)) => assert_eq!(a.reason, PubAckReason::QuotaExceeded),
        other => panic!("expected PUBACK 0x97, got {other:?}"),
    }
    match p
        .publish_acked("big/t", QoS::ExactlyOnce, false, &[b'x'; 2000])
        .await
    {
        Some(Packet::PubRec(r)) => assert_eq!(r.reason, PubRecReason::QuotaExceeded),
        other => panic!("expected PUBREC 0x97, got {other:?}"),
    }
    p.publish_acked("small/t", QoS::AtLeastOnce, false, b"ok")
        .await;
    assert_eq!(topic(&s.publish().await), "small/t");
    s.no_publish(QUIET).await;
}
