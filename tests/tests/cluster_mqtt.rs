//! Plain MQTT across the nodes of a cluster (issue #12 item 5), with real
//! processes: 3 `nats-server` and 3 `chatmq` nodes. A device publishes on
//! node A; subscribers on node B get it once, in order, with its MQTT 5
//! properties, whatever wildcard they used; A's own subscribers get it
//! once too (no echo back); node C, with no subscriber, is sent nothing
//! (NATS's interest, not a broadcast); retained messages and wills reach
//! the other nodes; a filter no session holds any more is no longer sent.

use std::time::Duration;

use chatmq_tests::cluster::runtime;
use chatmq_tests::metrics::{metric, metric_becomes, metric_reaches};
use chatmq_tests::nats::NatsCluster;
use chatmq_tests::{v5, Broker, OPEN, PATIENCE};
use rumqttc::v5::mqttbytes::v5::{LastWill, PublishProperties};
use rumqttc::v5::mqttbytes::QoS;

fn node(nats: &NatsCluster, id: &str) -> Broker {
    Broker::start(&format!(
        "{OPEN}\n[cluster]\nnode_id = {id:?}\n{}\npartitions = 2\n",
        nats.urls_toml()
    ))
}

/// Publishes `probe` topics from `from` until `to` hears one: the other
/// node's interest has reached NATS's routes.
async fn until_heard(from: &mut v5::Client, to: &mut v5::Client, probe: &str) {
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        from.publish_acked(probe, QoS::AtMostOnce, false, b"probe")
            .await;
        if !to
            .publishes_for(Duration::from_millis(100))
            .await
            .is_empty()
        {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{probe} from one node never reached the other"
        );
    }
}

fn payloads(got: &[rumqttc::v5::mqttbytes::v5::Publish]) -> Vec<String> {
    got.iter()
        .map(|p| String::from_utf8_lossy(&p.payload).into_owned())
        .collect()
}

#[test]
fn a_publish_on_one_node_reaches_the_subscribers_on_the_others_once() {
    if chatmq_tests::nats::skip() {
        return;
    }
    let nats = NatsCluster::start(3);
    let (a, b, c) = (
        node(&nats, "node-a"),
        node(&nats, "node-b"),
        node(&nats, "node-c"),
    );
    runtime().block_on(across_nodes(&a, &b, &c));
}

async fn across_nodes(a: &Broker, b: &Broker, c: &Broker) {
    let mut on_b = v5::connect_ok(b.addr, "dashboard").await;
    on_b.subscribe("sensors/+/temp", QoS::AtLeastOnce).await;
    on_b.subscribe("alerts/#", QoS::AtLeastOnce).await;
    let mut on_a = v5::connect_ok(a.addr, "local-logger").await;
    on_a.subscribe("sensors/#", QoS::AtLeastOnce).await;
    let mut device = v5::connect_ok(a.addr, "device-k1").await;
    until_heard(&mut device, &mut on_b, "sensors/probe/temp").await;
    on_a.publishes_for(Duration::from_millis(300)).await;

    let props = PublishProperties {
        content_type: Some("text/plain".into()),
        user_properties: vec![("unit".into(), "celsius".into())],
        ..Default::default()
    };
    for i in 1..=20 {
        device
            .publish_props_acked(
                "sensors/k1/temp",
                QoS::AtLeastOnce,
                false,
                format!("t{i}").as_bytes(),
                props.clone(),
            )
            .await;
    }
    device
        .publish_acked("alerts", QoS::AtLeastOnce, false, b"parent level")
        .await;
    device
        .publish_acked("other/x", QoS::AtLeastOnce, false, b"nobody")
        .await;
    let want: Vec<String> = (1..=20).map(|i| format!("t{i}")).collect();

    let mut got = Vec::new();
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while got.len() < 21 && tokio::time::Instant::now() < deadline {
        got.extend(on_b.publishes_for(Duration::from_millis(200)).await);
    }
    got.extend(on_b.publishes_for(Duration::from_millis(500)).await);
    let temps: Vec<_> = got
        .iter()
        .filter(|p| p.topic == "sensors/k1/temp")
        .cloned()
        .collect();
    assert_eq!(payloads(&temps), want, "on node B: once each, in order");
    assert!(temps.iter().all(|p| p.qos == QoS::AtLeastOnce));
    let p = temps[0].properties.clone().unwrap_or_default();
    assert_eq!(p.content_type.as_deref(), Some("text/plain"));
    assert_eq!(
        p.user_properties,
        vec![("unit".to_string(), "celsius".to_string())]
    );
    assert!(
        got.iter()
            .any(|p| p.topic == "alerts" && &p.payload[..] == b"parent level"),
        "alerts/# matches alerts on the other node too"
    );
    assert!(
        !got.iter().any(|p| p.topic == "other/x"),
        "B has no subscriber for other/x"
    );

    let local = on_a.publishes_for(Duration::from_millis(500)).await;
    let local: Vec<_> = local
        .into_iter()
        .filter(|p| p.topic == "sensors/k1/temp")
        .collect();
    assert_eq!(
        payloads(&local),
        want,
        "on node A itself: once each, no echo"
    );

    // Node C has no subscriber: NATS sends it nothing.
    assert!(metric(b, "chatmq_cluster_mqtt_received_total").await >= 21.0);
    assert_eq!(metric(c, "chatmq_cluster_mqtt_received_total").await, 0.0);
    assert_eq!(metric(c, "chatmq_cluster_mqtt_subjects").await, 0.0);
    assert_eq!(metric(b, "chatmq_cluster_mqtt_dropped_total").await, 0.0);

    // Retained on the other node: a later subscriber there gets it.
    on_b.subscribe("status/#", QoS::AtLeastOnce).await;
    until_heard(&mut device, &mut on_b, "status/probe").await;
    device
        .publish_acked("status/k1", QoS::AtLeastOnce, true, b"online")
        .await;
    let live = on_b.publishes_for(Duration::from_millis(500)).await;
    assert_eq!(payloads(&live), vec!["online"]);
    let mut late = v5::connect_ok(b.addr, "late-viewer").await;
    late.subscribe("status/k1", QoS::AtLeastOnce).await;
    let retained = late.publishes_for(Duration::from_millis(500)).await;
    assert_eq!(payloads(&retained), vec!["online"], "retained on node B");
    assert!(retained[0].retain);

    // A will of a device on A reaches B.
    let mut o = v5::options(a.addr, "device-k2");
    o.set_last_will(LastWill::new(
        "alerts/k2",
        "k2 lost",
        QoS::AtLeastOnce,
        false,
        None,
    ));
    let k2 = v5::connect(o).await.expect("k2 connects");
    k2.drop_connection();
    let mut will = Vec::new();
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while will.is_empty() && tokio::time::Instant::now() < deadline {
        will = on_b.publishes_for(Duration::from_millis(200)).await;
    }
    assert_eq!(payloads(&will), vec!["k2 lost"], "the will crossed nodes");
}

#[test]
fn a_filter_nobody_holds_any_more_is_no_longer_sent() {
    if chatmq_tests::nats::skip() {
        return;
    }
    let nats = NatsCluster::start(3);
    let (a, b) = (node(&nats, "node-a"), node(&nats, "node-b"));
    runtime().block_on(interest_follows_sessions(&a, &b));
}

async fn interest_follows_sessions(a: &Broker, b: &Broker) {
    let mut on_b = v5::connect_ok(b.addr, "viewer").await;
    on_b.subscribe("feed/+", QoS::AtMostOnce).await;
    let mut publisher = v5::connect_ok(a.addr, "feeder").await;
    until_heard(&mut publisher, &mut on_b, "feed/probe").await;
    metric_reaches(b, "chatmq_cluster_mqtt_subjects", 1.0, PATIENCE).await;

    on_b.unsubscribe("feed/+").await;
    metric_becomes(b, "chatmq_cluster_mqtt_subjects", 0.0).await;
    let before = metric(b, "chatmq_cluster_mqtt_received_total").await;
    for _ in 0..10 {
        publisher
            .publish_acked("feed/x", QoS::AtMostOnce, false, b"unwanted")
            .await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        metric(b, "chatmq_cluster_mqtt_received_total").await,
        before,
        "node B is still sent a topic none of its sessions wants"
    );
    // A session that ends takes its interest with it too.
    let mut again = v5::connect_ok(b.addr, "viewer-2").await;
    again.subscribe("feed/+", QoS::AtMostOnce).await;
    metric_reaches(b, "chatmq_cluster_mqtt_subjects", 1.0, PATIENCE).await;
    again.disconnect().await;
    metric_becomes(b, "chatmq_cluster_mqtt_subjects", 0.0).await;
}

/// The retained message of `topic` a new subscriber on `b` gets, polled
/// until it is `want` (`None`: none) or 20 s passed.
async fn retained_on(b: &Broker, topic: &str, want: Option<&str>) -> Option<String> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let mut c = v5::connect_ok(b.addr, "retained-viewer").await;
        c.subscribe(topic, QoS::AtLeastOnce).await;
        let got = c.publishes_for(Duration::from_millis(300)).await;
        c.disconnect().await;
        let got = payloads(&got).into_iter().next();
        if got.as_deref() == want || tokio::time::Instant::now() > deadline {
            return got;
        }
    }
}

#[test]
fn retained_messages_reach_every_node_even_one_without_subscribers_or_started_later() {
    if chatmq_tests::nats::skip() {
        return;
    }
    let nats = NatsCluster::start(3);
    let (a, c) = (node(&nats, "node-a"), node(&nats, "node-c"));
    let rt = runtime();
    rt.block_on(async {
        // Nobody anywhere subscribes: retained on A, then on C all the same.
        let mut device = v5::connect_ok(a.addr, "device-r1").await;
        device
            .publish_acked("config/r1", QoS::AtLeastOnce, true, b"v1")
            .await;
        device
            .publish_acked("config/r1", QoS::AtLeastOnce, true, b"v2")
            .await;
        device
            .publish_acked("config/r2", QoS::AtLeastOnce, true, b"keep")
            .await;
        assert_eq!(
            retained_on(&c, "config/r1", Some("v2")).await.as_deref(),
            Some("v2"),
            "the last one, on C"
        );
        // Cleared on A: cleared on C.
        device
            .publish_acked("config/r1", QoS::AtLeastOnce, true, b"")
            .await;
        assert_eq!(
            retained_on(&c, "config/r1", None).await,
            None,
            "cleared on C"
        );
    });
    // A node that was not there: it gets what is retained from the stream.
    let d = node(&nats, "node-d");
    rt.block_on(async {
        assert_eq!(
            retained_on(&d, "config/r2", Some("keep")).await.as_deref(),
            Some("keep")
        );
        assert_eq!(retained_on(&d, "config/r1", None).await, None);
    });
}
