//! Sessions across the nodes of a cluster (issue #12 item 4), with real
//! processes: 3 `nats-server` and 2 `chatmq` nodes. A client that moves
//! to another node with the same client id resumes its session there
//! (Session Present, its subscriptions, its chat from its cursors); the
//! connection it left on the first node is closed with 0x8E; after its
//! node is `kill -9`ed it resumes on the survivor with every message and
//! no gap, and the restarted node drops the session it no longer holds; a
//! client id held by one user on one node is refused to another user on
//! the other.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use chatmq_tests::chat::{self, seq_of};
use chatmq_tests::cluster::{eventually, ok, runtime, user};
use chatmq_tests::metrics::{metric, metric_reaches};
use chatmq_tests::nats::NatsCluster;
use chatmq_tests::{v5, Broker};
use rumqttc::v5::mqttbytes::v5::{ConnectReturnCode, DisconnectReasonCode, Packet, Publish};
use rumqttc::v5::mqttbytes::QoS;
use serde_json::json;

/// One test at a time: each runs 3 NATS servers and 2 nodes.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

fn node(nats: &NatsCluster, id: &str) -> Broker {
    Broker::start(&chat::config(&format!(
        "[[acl.rules]]\nuser = \"*\"\ntopic = \"news/#\"\naccess = \"pubsub\"\n\n\
         [cluster]\nnode_id = {id:?}\n{}\npartitions = 2\nlease_ttl_ms = 2000\n",
        nats.urls_toml()
    )))
}

/// `room` created on `a` by alice with bob, and known on `b`.
async fn room(a: &Broker, b: &Broker) {
    ok(
        user(a, "alice")
            .post(
                "/v1/conversations",
                &json!({"conv": "room", "title": "Room", "members": ["bob"]}),
            )
            .await,
        "create",
    );
    eventually("room known on the other node", || async {
        let r = user(b, "bob").get("/v1/conversations").await;
        r.status == 200 && r.text().contains("\"room\"")
    })
    .await;
}

/// alice sends `ids` to `room` through `b`'s HTTP API.
async fn send(b: &Broker, ids: impl IntoIterator<Item = u64>) {
    for i in ids {
        let r = user(b, "alice")
            .post(
                "/v1/conversations/room/messages",
                &json!({"id": format!("m{i}"), "body": {"text": format!("m{i}")}}),
            )
            .await;
        let seq = ok(r, &format!("send m{i}"))["seq"].as_u64();
        assert_eq!(seq, Some(i), "m{i}'s seq");
    }
}

/// The `chat/room` messages `c` receives until it has seen seq `last`.
async fn chat_until(c: &mut v5::Client, last: u64) -> Vec<Publish> {
    let mut got: Vec<Publish> = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    while !got.iter().any(|p| seq_of(&p.payload) == last) {
        assert!(
            Instant::now() < deadline,
            "seq {last} not received; got {:?}",
            got.iter().map(|p| seq_of(&p.payload)).collect::<Vec<_>>()
        );
        let p = c.publish().await;
        if chat::v5_topic(&p) == "chat/room" {
            got.push(p);
        }
    }
    got
}

fn bob_phone(b: &Broker) -> rumqttc::v5::MqttOptions {
    chat::v5_options(b.addr, "bob-phone", "bob", true)
}

#[test]
fn a_client_that_moves_to_another_node_resumes_its_session_and_its_old_connection_is_taken_over() {
    if chatmq_tests::nats::skip() {
        return;
    }
    let _one = serial();
    let nats = NatsCluster::start(3);
    let a = node(&nats, "node-a");
    let b = node(&nats, "node-b");
    runtime().block_on(async {
        room(&a, &b).await;
        // bob on A: chat and a plain topic, a persistent session.
        let mut on_a = chat::v5_login(bob_phone(&a)).await;
        on_a.subscribe("chat/room", QoS::AtLeastOnce).await;
        let granted = on_a.subscribe("news/#", QoS::AtLeastOnce).await;
        assert_eq!(
            granted.return_codes,
            vec![rumqttc::v5::mqttbytes::v5::SubscribeReasonCode::Success(
                QoS::AtLeastOnce
            )]
        );
        send(&a, 1..=5).await;
        chat_until(&mut on_a, 5).await;

        // The same client id on B, while A's connection is up.
        let mut on_b = chat::v5_login(bob_phone(&b)).await;
        assert!(
            on_b.connack.session_present,
            "B resumed the session bob had on A"
        );
        // (rumqttc reports the server's DISCONNECT as the end of its loop.)
        let kicked = on_a.next().await;
        let taken_over = match &kicked {
            Ok(Packet::Disconnect(d)) => d.reason_code == DisconnectReasonCode::SessionTakenOver,
            Err(e) => e.contains("SessionTakenOver"),
            Ok(_) => false,
        };
        assert!(taken_over, "A closed its connection with 0x8E: {kicked:?}");

        // Chat goes on from the cursor: every seq once after dedup by seq,
        // none missing, what may repeat marked DUP.
        send(&a, 6..=8).await;
        let got = chat_until(&mut on_b, 8).await;
        let seqs: BTreeSet<u64> = got.iter().map(|p| seq_of(&p.payload)).collect();
        assert_eq!(
            seqs,
            (got.iter().map(|p| seq_of(&p.payload)).min().unwrap_or(1)..=8).collect(),
            "no gap on B"
        );
        assert!(seqs.contains(&6), "6 after the move: {seqs:?}");
        for p in &got {
            if seq_of(&p.payload) <= 5 {
                assert!(p.dup, "seq {} repeated without DUP", seq_of(&p.payload));
            }
        }

        // The plain subscription moved too: a publish on A reaches bob on
        // B once, through the link between the nodes, without a SUBSCRIBE.
        let mut device =
            chat::v5_login(chat::v5_options(a.addr, "sensor-1", "sensor", false)).await;
        let deadline = Instant::now() + Duration::from_secs(20);
        let heard = loop {
            device
                .publish_acked("news/today", QoS::AtLeastOnce, false, b"extra")
                .await;
            let got = on_b.publishes_for(Duration::from_millis(300)).await;
            let news: Vec<_> = got.iter().filter(|p| p.topic == "news/today").collect();
            if !news.is_empty() {
                break news.len();
            }
            assert!(Instant::now() < deadline, "news/today never reached B");
        };
        assert_eq!(heard, 1, "once");

        metric_reaches(
            &b,
            "chatmq_cluster_sessions_imported_total",
            1.0,
            Duration::from_secs(5),
        )
        .await;
        assert_eq!(
            metric(&a, "chatmq_cluster_sessions_moved_away_total").await,
            1.0
        );
        // And back to A: B's session is the one resumed, A's was removed.
        drop(on_b);
        let back = chat::v5_login(bob_phone(&a)).await;
        assert!(back.connack.session_present, "A resumes it from B's value");
    });
}

#[test]
fn after_its_node_is_killed_a_client_resumes_on_the_survivor_with_no_gap() {
    if chatmq_tests::nats::skip() {
        return;
    }
    let _one = serial();
    let nats = NatsCluster::start(3);
    let mut a = node(&nats, "node-a");
    let b = node(&nats, "node-b");
    runtime().block_on(async {
        room(&a, &b).await;
        let mut on_a = chat::v5_login(bob_phone(&a)).await;
        on_a.subscribe("chat/room", QoS::AtLeastOnce).await;
        send(&b, 1..=40).await;
        chat_until(&mut on_a, 40).await;
        // The cursors written with the 32nd acknowledgement reach the
        // bucket in the next round.
        tokio::time::sleep(Duration::from_millis(500)).await;
        a.kill9();
        on_a.drop_connection();

        send(&b, 41..=50).await;
        let mut on_b = chat::v5_login(bob_phone(&b)).await;
        assert!(on_b.connack.session_present, "resumed on B");
        let got = chat_until(&mut on_b, 50).await;
        let seqs: Vec<u64> = got.iter().map(|p| seq_of(&p.payload)).collect();
        let first = seqs.iter().copied().min().unwrap_or(0);
        assert!(
            first > 1,
            "resumed from its cursor, not from the start: {seqs:?}"
        );
        let unique: BTreeSet<u64> = seqs.iter().copied().collect();
        assert_eq!(
            unique,
            (first..=50).collect(),
            "every seq from the cursor on, none missing"
        );
        for p in &got {
            let s = seq_of(&p.payload);
            if s <= 40 {
                assert!(
                    p.dup,
                    "seq {s}, maybe acknowledged on A, repeated without DUP"
                );
            } else {
                assert_eq!(seqs.iter().filter(|x| **x == s).count(), 1, "{s} once");
            }
        }
    });
    // A back: it learns from the bucket that bob's session is B's now.
    a.restart();
    runtime().block_on(async {
        metric_reaches(
            &a,
            "chatmq_cluster_sessions_moved_away_total",
            1.0,
            Duration::from_secs(20),
        )
        .await;
    });
}

#[test]
fn a_client_id_held_by_one_user_on_one_node_is_refused_to_another_on_the_next() {
    if chatmq_tests::nats::skip() {
        return;
    }
    let _one = serial();
    let nats = NatsCluster::start(3);
    let a = node(&nats, "node-a");
    let b = node(&nats, "node-b");
    runtime().block_on(async {
        let mut alice = chat::v5_login(chat::v5_options(a.addr, "shared-id", "alice", true)).await;
        let refused = v5::connect(chat::v5_options(b.addr, "shared-id", "mallory", true)).await;
        match refused {
            Err(rumqttc::v5::ConnectionError::ConnectionRefused(code)) => {
                assert_eq!(code, ConnectReturnCode::NotAuthorized)
            }
            other => panic!(
                "mallory took alice's client id on B: {:?}",
                other.map(|c| c.connack)
            ),
        }
        // alice was not disturbed.
        alice.no_publish(Duration::from_millis(500)).await;
        let ack = alice
            .publish_acked("news/alice", QoS::AtLeastOnce, false, b"x")
            .await;
        assert!(
            matches!(ack, Some(Packet::PubAck(_))),
            "still connected: {ack:?}"
        );
        // Once alice's session ends, the id is free on every node.
        alice.disconnect().await;
        let mut o = chat::v5_options(a.addr, "shared-id", "alice", true);
        o.set_session_expiry_interval(Some(0));
        chat::v5_login(o).await.disconnect().await;
        eventually("mallory may use the id on B", || async {
            v5::connect(chat::v5_options(b.addr, "shared-id", "mallory", false))
                .await
                .is_ok()
        })
        .await;
    });
}
