//! Plain MQTT across the nodes of a cluster (issue #12 item 5), with real
//! processes: 3 `nats-server` and 3 `chatmq` nodes. A device publishes on
//! node A; subscribers on node B get it once, in order, with its MQTT 5
//! properties, whatever wildcard they used; A's own subscribers get it
//! once too (no echo back); node C, with no subscriber, is sent nothing
//! (NATS's interest, not a broadcast); retained messages and wills reach
//! the other nodes; a filter no session holds any more is no longer sent;
//! a `$share` group with members on two nodes gets each message once,
//! whichever node it was published on.

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

#[test]
fn a_shared_group_spanning_nodes_gets_each_message_once() {
    if chatmq_tests::nats::skip() {
        return;
    }
    let nats = NatsCluster::start(3);
    let (a, b, c) = (
        node(&nats, "node-a"),
        node(&nats, "node-b"),
        node(&nats, "node-c"),
    );
    runtime().block_on(shared_across_nodes(&a, &b, &c));
}

async fn shared_across_nodes(a: &Broker, b: &Broker, c: &Broker) {
    const GROUP: &str = "$share/workers/jobs/+";
    let mut on_a = v5::connect_ok(a.addr, "worker-a").await;
    on_a.subscribe(GROUP, QoS::AtLeastOnce).await;
    let mut on_b = v5::connect_ok(b.addr, "worker-b").await;
    on_b.subscribe(GROUP, QoS::AtLeastOnce).await;
    // Another group of the same filter, on node C only: it gets every
    // message too, on its own.
    let mut auditor = v5::connect_ok(c.addr, "auditor").await;
    auditor
        .subscribe("$share/audit/jobs/+", QoS::AtLeastOnce)
        .await;
    let mut watcher = v5::connect_ok(c.addr, "watcher").await;
    watcher.subscribe("jobs/#", QoS::AtLeastOnce).await;
    let mut from_a = v5::connect_ok(a.addr, "publisher-a").await;
    let mut from_c = v5::connect_ok(c.addr, "publisher-c").await;

    // Until both workers have been chosen once: their queue subscriptions
    // have reached NATS's routes.
    let (mut heard_a, mut heard_b) = (false, false);
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while !(heard_a && heard_b) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "probes never reached both workers (a: {heard_a}, b: {heard_b})"
        );
        from_c
            .publish_acked("jobs/probe", QoS::AtMostOnce, false, b"probe")
            .await;
        heard_a |= !on_a
            .publishes_for(Duration::from_millis(50))
            .await
            .is_empty();
        heard_b |= !on_b
            .publishes_for(Duration::from_millis(50))
            .await
            .is_empty();
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    for client in [&mut on_a, &mut on_b, &mut auditor, &mut watcher] {
        client.publishes_for(Duration::from_millis(200)).await;
    }

    // Published on a node with a member (A) and on one without (C).
    let mut want = Vec::new();
    for i in 1..=40 {
        for (name, publisher) in [("a", &mut from_a), ("c", &mut from_c)] {
            let job = format!("job-{name}-{i}");
            publisher
                .publish_acked(
                    &format!("jobs/{name}"),
                    QoS::AtLeastOnce,
                    false,
                    job.as_bytes(),
                )
                .await;
            want.push(job);
        }
    }
    want.sort();
    let (mut got_a, mut got_b, mut audited, mut watched) = (vec![], vec![], vec![], vec![]);
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while (got_a.len() + got_b.len() < want.len()
        || audited.len() < want.len()
        || watched.len() < want.len())
        && tokio::time::Instant::now() < deadline
    {
        got_a.extend(payloads(
            &on_a.publishes_for(Duration::from_millis(100)).await,
        ));
        got_b.extend(payloads(
            &on_b.publishes_for(Duration::from_millis(100)).await,
        ));
        audited.extend(payloads(
            &auditor.publishes_for(Duration::from_millis(100)).await,
        ));
        watched.extend(payloads(
            &watcher.publishes_for(Duration::from_millis(100)).await,
        ));
    }
    // Anything late would be a duplicate.
    got_a.extend(payloads(
        &on_a.publishes_for(Duration::from_millis(500)).await,
    ));
    got_b.extend(payloads(
        &on_b.publishes_for(Duration::from_millis(500)).await,
    ));
    audited.extend(payloads(
        &auditor.publishes_for(Duration::from_millis(300)).await,
    ));

    let mut workers: Vec<String> = got_a.iter().chain(&got_b).cloned().collect();
    workers.sort();
    assert_eq!(workers, want, "the workers together: each job exactly once");
    assert!(
        !got_a.is_empty() && !got_b.is_empty(),
        "both nodes' members get a share: a {} b {}",
        got_a.len(),
        got_b.len()
    );
    audited.sort();
    assert_eq!(audited, want, "the other group: each job once");
    watched.sort();
    assert_eq!(watched, want, "a plain subscriber: each job once");

    // A member that leaves: the rest of the group, on the other node, gets
    // everything.
    on_a.unsubscribe(GROUP).await;
    metric_becomes(a, "chatmq_cluster_mqtt_subjects", 0.0).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    for i in 1..=10 {
        from_a
            .publish_acked(
                "jobs/late",
                QoS::AtLeastOnce,
                false,
                format!("late-{i}").as_bytes(),
            )
            .await;
    }
    let mut late = Vec::new();
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while late.len() < 10 && tokio::time::Instant::now() < deadline {
        late.extend(payloads(
            &on_b.publishes_for(Duration::from_millis(100)).await,
        ));
    }
    let want_late: Vec<String> = (1..=10).map(|i| format!("late-{i}")).collect();
    assert_eq!(
        late, want_late,
        "the member left on node B: all of them, in order"
    );
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
