//! QoS 0 delivery through a connected session's inbox (issue #11): one
//! message routed to many sessions is encoded once per protocol version
//! and each subscriber still gets it as it subscribed (3.1.1 or 5, Retain
//! As Published, subscription identifiers, properties, expiry); a
//! publisher's order holds across QoS levels; a subscriber that stops
//! reading loses QoS 0 messages, counted, never their order, and the
//! broker stays responsive for everyone else.

use std::time::Duration;

use chatmq_tests::metrics::{metric, metric_reaches};
use chatmq_tests::raw::{connected_v5, p5, v5_bytes};
use chatmq_tests::v4;
use chatmq_tests::v5::{self, Filter, PublishProperties, QoS, SubscribeProperties};
use chatmq_tests::{Broker, OPEN, PATIENCE};

const QUIET: Duration = Duration::from_millis(400);

/// Publish rates far above what a test sends: the flood measures the
/// inbox, not the rate limit.
const UNLIMITED: &str = "publish_rate = 1000000000\npublish_burst = 1000000000\n\
    publish_bytes_rate = 1000000000000\npublish_bytes_burst = 1000000000000\n\
    user_publish_rate = 1000000000\nuser_publish_burst = 1000000000\n\
    user_publish_bytes_rate = 1000000000000\nuser_publish_bytes_burst = 1000000000000\n";

fn text(p: &[u8]) -> String {
    String::from_utf8_lossy(p).into_owned()
}

/// Four subscribers of one topic, each asking for something else: the
/// shared encoding must not leak one's flags or identifiers to another.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_qos0_fan_out_gives_each_subscriber_what_it_asked_for() {
    let b = Broker::start(OPEN);
    let mut old = v4::connect_ok(b.addr, "old").await;
    old.subscribe("fo/#", rumqttc::QoS::AtMostOnce).await;
    let mut keep = v5::connect_ok(b.addr, "keep").await;
    let mut f = Filter::new("fo/#", QoS::AtMostOnce);
    f.preserve_retain = true;
    keep.subscribe_with(f, None).await;
    let mut ids = v5::connect_ok(b.addr, "ids").await;
    let props = SubscribeProperties {
        id: Some(7),
        user_properties: vec![],
    };
    ids.subscribe_with(Filter::new("fo/+", QoS::AtMostOnce), Some(props))
        .await;
    let mut plain = v5::connect_ok(b.addr, "plain").await;
    plain.subscribe("fo/#", QoS::AtLeastOnce).await;

    let mut p = v5::connect_ok(b.addr, "pub").await;
    let props = PublishProperties {
        content_type: Some("text/plain".into()),
        user_properties: vec![("k".into(), "v".into())],
        ..Default::default()
    };
    p.publish_props_acked("fo/a", QoS::AtMostOnce, true, b"one", props)
        .await;
    let expiring = PublishProperties {
        message_expiry_interval: Some(60),
        ..Default::default()
    };
    p.publish_props_acked("fo/a", QoS::AtMostOnce, false, b"two", expiring)
        .await;

    let got = old.publishes_for(QUIET).await;
    let seen: Vec<_> = got.iter().map(|m| (text(&m.payload), m.retain)).collect();
    assert_eq!(
        seen,
        [("one".into(), false), ("two".into(), false)],
        "3.1.1"
    );

    let got = keep.publishes_for(QUIET).await;
    assert_eq!(got.len(), 2, "{got:?}");
    assert_eq!((text(&got[0].payload), got[0].retain), ("one".into(), true));
    assert_eq!(
        (text(&got[1].payload), got[1].retain),
        ("two".into(), false)
    );
    let p0 = got[0].properties.as_ref().expect("properties");
    assert_eq!(p0.content_type.as_deref(), Some("text/plain"));
    assert_eq!(p0.user_properties, [("k".to_string(), "v".to_string())]);
    assert!(p0.subscription_identifiers.is_empty());
    let p1 = got[1].properties.as_ref().expect("the expiry");
    assert!(
        matches!(p1.message_expiry_interval, Some(59..=60)),
        "{p1:?}"
    );

    let got = ids.publishes_for(QUIET).await;
    assert_eq!(got.len(), 2, "{got:?}");
    for m in &got {
        assert!(!m.retain);
        let props = m.properties.as_ref().expect("properties");
        assert_eq!(props.subscription_identifiers, [7]);
    }

    let got = plain.publishes_for(QUIET).await;
    let seen: Vec<_> = got
        .iter()
        .map(|m| (text(&m.payload), m.retain, m.qos))
        .collect();
    assert_eq!(
        seen,
        [
            ("one".into(), false, QoS::AtMostOnce),
            ("two".into(), false, QoS::AtMostOnce)
        ]
    );
}

/// A publisher interleaves QoS 0 and QoS 1 as fast as it can; a
/// subscriber at QoS 1 gets both in the order they were sent (QoS 0 may
/// take the inbox, QoS 1 the session's queue).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_publishers_order_holds_across_qos_levels() {
    let b = Broker::start(&format!("{OPEN}\n[mqtt]\n{UNLIMITED}"));
    let mut sub = v5::connect_ok(b.addr, "sub").await;
    sub.subscribe("ord/t", QoS::AtLeastOnce).await;
    let p = v5::connect_ok(b.addr, "pub").await;
    const N: usize = 600;
    for i in 0..N {
        let qos = if i % 3 == 0 {
            QoS::AtLeastOnce
        } else {
            QoS::AtMostOnce
        };
        p.client
            .publish("ord/t", qos, false, i.to_string().into_bytes())
            .await
            .expect("queue publish");
    }
    let mut seen = Vec::new();
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while seen.len() < N && tokio::time::Instant::now() < deadline {
        for m in sub.publishes_for(QUIET).await {
            let n: usize = text(&m.payload).parse().expect("a number");
            seen.push(n);
        }
    }
    assert_eq!(seen, (0..N).collect::<Vec<_>>());
}

/// Mallory subscribes at QoS 0 and stops reading while Nick floods the
/// topic. Her inbox fills and further messages are dropped and counted;
/// Nick and a second subscriber are served meanwhile, and when Mallory
/// reads again what she gets is in order and never duplicated.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_inbox_drops_qos0_counted_and_keeps_the_order() {
    let b = Broker::start(&format!(
        "{OPEN}\n[mqtt]\nmax_offline_messages = 50\n{UNLIMITED}"
    ));
    let mut mallory = connected_v5(b.addr, "mallory").await;
    let mut s = p5::Subscribe::new(p5::Filter::new("flood/t", QoS::AtMostOnce), None);
    s.pkid = 1;
    mallory.send_v5(&p5::Packet::Subscribe(s)).await;
    assert!(matches!(
        mallory.next_v5(PATIENCE).await,
        Ok(p5::Packet::SubAck(_))
    ));
    let dropped_before = metric(&b, "chatmq_messages_dropped_total").await;

    let nick = v5::connect_ok(b.addr, "nick").await;
    let body = vec![b'x'; 1000];
    const N: usize = 20_000;
    for i in 0..N {
        let mut payload = format!("{i:08}").into_bytes();
        payload.extend_from_slice(&body);
        nick.client
            .publish("flood/t", QoS::AtMostOnce, false, payload)
            .await
            .expect("queue publish");
    }
    metric_reaches(
        &b,
        "chatmq_messages_dropped_total",
        dropped_before + 1.0,
        PATIENCE,
    )
    .await;

    // Everyone else is still served while Mallory's socket is full.
    let mut olga = v5::connect_ok(b.addr, "olga").await;
    olga.subscribe("other/t", QoS::AtLeastOnce).await;
    let mut nick = nick;
    nick.publish_acked("other/t", QoS::AtLeastOnce, false, b"hi")
        .await;
    assert_eq!(text(&olga.publish().await.payload), "hi");

    let mut last: Option<usize> = None;
    let mut got = 0usize;
    while let Ok(p) = mallory.next_v5(Duration::from_millis(500)).await {
        let p5::Packet::Publish(m) = p else { continue };
        let n: usize = text(&m.payload[..8]).parse().expect("a number");
        assert!(last.is_none_or(|l| n > l), "{n} after {last:?}");
        last = Some(n);
        got += 1;
    }
    assert!(got > 0 && got < N, "got {got} of {N}");
    let dropped = metric(&b, "chatmq_messages_dropped_total").await - dropped_before;
    assert!(
        dropped as usize >= N - got,
        "{dropped} counted, {} missing",
        N - got
    );
}

/// A client writes 200 QoS 0 publishes, a retained one among them, then a
/// QoS 1 publish, all in one write: they are read
/// together and routed in batches, and the subscriber still gets every
/// one in order, the QoS 1 last; the retained one is kept.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publishes_read_together_are_routed_in_order() {
    let b = Broker::start(&format!("{OPEN}\n[mqtt]\n{UNLIMITED}"));
    let mut sub = v5::connect_ok(b.addr, "sub").await;
    sub.subscribe("batch/#", QoS::AtLeastOnce).await;
    let mut w = connected_v5(b.addr, "burst").await;
    let mut bytes = Vec::new();
    const N: usize = 200;
    for i in 0..N {
        let topic = if i == 77 { "batch/kept" } else { "batch/t" };
        let mut p = p5::Publish::new(topic, QoS::AtMostOnce, i.to_string(), None);
        p.retain = i == 77;
        bytes.extend(v5_bytes(&p5::Packet::Publish(p)));
    }
    let mut last = p5::Publish::new("batch/t", QoS::AtLeastOnce, "last", None);
    last.pkid = 1;
    bytes.extend(v5_bytes(&p5::Packet::Publish(last)));
    w.send(&bytes).await;
    assert!(matches!(
        w.next_v5(PATIENCE).await,
        Ok(p5::Packet::PubAck(_))
    ));

    let mut seen = Vec::new();
    while seen.len() < N + 1 {
        let m = sub.publish().await;
        seen.push(text(&m.payload));
    }
    let mut want: Vec<String> = (0..N).map(|i| i.to_string()).collect();
    want.push("last".into());
    assert_eq!(seen, want);

    let mut late = v5::connect_ok(b.addr, "late").await;
    late.subscribe("batch/kept", QoS::AtMostOnce).await;
    let m = late.publish().await;
    assert_eq!((text(&m.payload), m.retain), ("77".into(), true));
}
