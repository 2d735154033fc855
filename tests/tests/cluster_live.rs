//! Presence, typing and room reactions across the nodes of a cluster
//! (issue #12 item 6), with real processes: 3 `nats-server` and 2
//! `chatmq`. Bob on node B sees alice, on node A, come online, type, send
//! a room reaction and go offline; alice online on both nodes stays online
//! while either session is; and when her only node is `kill -9`ed she goes
//! offline within the bound (docs/CLUSTER.md).

use std::time::{Duration, Instant};

use chatmq_tests::chat::{self, json_of};
use chatmq_tests::cluster::runtime;
use chatmq_tests::http::Http;
use chatmq_tests::nats::NatsCluster;
use chatmq_tests::{v5, Broker};
use rumqttc::v5::mqttbytes::v5::Publish;
use rumqttc::v5::mqttbytes::QoS;
use serde_json::json;

static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn node(nats: &NatsCluster, id: &str) -> Broker {
    Broker::start(&chat::config(&format!(
        "[cluster]\nnode_id = {id:?}\n{}\npartitions = 2\nlease_ttl_ms = 2000\n",
        nats.urls_toml()
    )))
}

/// The next publish on `topic` that `want` accepts, within 15 s.
async fn until(c: &mut v5::Client, topic: &str, want: impl Fn(&Publish) -> bool) -> Publish {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        assert!(
            Instant::now() < deadline,
            "nothing on {topic} as wanted within 15 s"
        );
        for p in c.publishes_for(Duration::from_millis(200)).await {
            if p.topic == topic && want(&p) {
                return p;
            }
        }
    }
}

fn status(p: &Publish) -> String {
    json_of(&p.payload)["status"]
        .as_str()
        .unwrap_or("")
        .to_string()
}

#[test]
fn presence_typing_and_room_reactions_reach_members_on_other_nodes() {
    if chatmq_tests::nats::skip() {
        return;
    }
    let _one = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let nats = NatsCluster::start(3);
    let mut a = node(&nats, "node-a");
    let b = node(&nats, "node-b");
    runtime().block_on(async {
        let r = Http::new(a.http_addr)
            .with_token(&chat::token("alice"))
            .post(
                "/v1/conversations",
                &json!({"conv": "room", "title": "Room", "members": ["bob"]}),
            )
            .await;
        assert_eq!(r.status, 201, "{}", r.text());
        let deadline = Instant::now() + Duration::from_secs(30);
        while Http::new(b.http_addr)
            .with_token(&chat::token("bob"))
            .get("/v1/conversations/room/messages")
            .await
            .status
            != 200
        {
            assert!(Instant::now() < deadline, "room not on B");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }

        // bob watches on B.
        let mut bob = chat::v5_user(&b, "bob").await;
        for f in ["presence/alice", "typing/room", "reactions/room"] {
            bob.subscribe(f, QoS::AtMostOnce).await;
        }
        // alice comes online on A.
        let mut alice = chat::v5_user(&a, "alice").await;
        until(&mut bob, "presence/alice", |p| status(p) == "online").await;
        assert!(
            Http::new(b.http_addr)
                .with_token(&chat::token("bob"))
                .get("/v1/conversations/room/occupancy")
                .await
                .text()
                .contains("\"connected\":2"),
            "B counts alice as connected"
        );

        // She types and reacts: bob on B gets both.
        alice
            .publish_acked("typing/room", QoS::AtMostOnce, false, br#""typing""#)
            .await;
        let t = until(&mut bob, "typing/room", |_| true).await;
        assert_eq!(json_of(&t.payload)["from"], "alice");
        alice
            .publish_acked(
                "reactions/room",
                QoS::AtMostOnce,
                false,
                r#"{"emoji":"🎉"}"#.as_bytes(),
            )
            .await;
        let r = until(&mut bob, "reactions/room", |_| true).await;
        assert_eq!(json_of(&r.payload)["emoji"], "🎉");

        // Online on B too; leaving A keeps her online.
        let mut o = chat::v5_options(b.addr, "alice-laptop", "alice", false);
        o.set_keep_alive(Duration::from_secs(30));
        let alice_b = chat::v5_login(o).await;
        tokio::time::sleep(Duration::from_millis(500)).await;
        alice.disconnect().await;
        let quiet = bob.publishes_for(Duration::from_secs(3)).await;
        assert!(
            !quiet
                .iter()
                .any(|p| p.topic == "presence/alice" && status(p) == "offline"),
            "alice is still online on B"
        );
        // Gone from B as well: offline.
        alice_b.disconnect().await;
        until(&mut bob, "presence/alice", |p| status(p) == "offline").await;

        // Online on A only, and A is killed: offline within the bound.
        let _again = chat::v5_user(&a, "alice").await;
        until(&mut bob, "presence/alice", |p| status(p) == "online").await;
        a.kill9();
        until(&mut bob, "presence/alice", |p| status(p) == "offline").await;
    });
}
