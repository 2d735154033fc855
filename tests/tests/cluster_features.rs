//! Chat features across the nodes of a cluster (issues #12 and #13), with
//! real processes: 3 `nats-server` and 2 `chatmq` nodes. Reactions added
//! on either node are counted on both, with `mine` right for each user,
//! and a reaction taken back on one node is gone from the other.

use chatmq_tests::chat;
use chatmq_tests::cluster::{eventually, ok, runtime, user};
use chatmq_tests::nats::NatsCluster;
use chatmq_tests::Broker;
use serde_json::{json, Value};

/// One test at a time: each runs 3 NATS servers and 2 nodes.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

fn node(nats: &NatsCluster, id: &str) -> Broker {
    Broker::start(&chat::config(&format!(
        "[cluster]\nnode_id = {id:?}\n{}\npartitions = 2\nlease_ttl_ms = 2000\n",
        nats.urls_toml()
    )))
}

/// `room` created on `a` by alice with bob and carol, known on `b`, and
/// alice's message 1 in it.
async fn room_with_a_message(a: &Broker, b: &Broker) {
    ok(
        user(a, "alice")
            .post(
                "/v1/conversations",
                &json!({"conv": "room", "title": "Room", "members": ["bob", "carol"]}),
            )
            .await,
        "create",
    );
    eventually("room known on the other node", || async {
        let r = user(b, "bob").get("/v1/conversations").await;
        r.status == 200 && r.text().contains("\"room\"")
    })
    .await;
    let r = user(a, "alice")
        .post(
            "/v1/conversations/room/messages",
            &json!({"id": "m1", "body": {"text": "lunch?"}}),
        )
        .await;
    assert_eq!(ok(r, "send")["seq"], 1);
}

/// Message `seq` of `room` in `name`'s history on `b`.
async fn message(b: &Broker, name: &str, seq: u64) -> Value {
    let h = ok(
        user(b, name).get("/v1/conversations/room/messages").await,
        "history",
    );
    h["messages"]
        .as_array()
        .and_then(|m| m.iter().find(|m| m["seq"] == seq).cloned())
        .unwrap_or(Value::Null)
}

const THUMBS: &str = "/v1/conversations/room/messages/1/reactions/%F0%9F%91%8D";

#[test]
fn reactions_on_either_node_are_counted_on_both() {
    if chatmq_tests::nats::skip() {
        return;
    }
    let _one = serial();
    let nats = NatsCluster::start(3);
    let (a, b) = (node(&nats, "node-a"), node(&nats, "node-b"));
    runtime().block_on(async {
        room_with_a_message(&a, &b).await;
        eventually("message 1 on the other node", || async {
            message(&b, "bob", 1).await["seq"] == 1
        })
        .await;

        let r = ok(user(&b, "bob").request("PUT", THUMBS, None).await, "bob");
        assert_eq!(
            r["reactions"]["👍"],
            json!({"count": 1, "mine": true}),
            "{r}"
        );
        let r = ok(
            user(&a, "carol").request("PUT", THUMBS, None).await,
            "carol",
        );
        assert_eq!(
            r["reactions"]["👍"],
            json!({"count": 2, "mine": true}),
            "{r}"
        );
        // Twice is once, on any node.
        let r = ok(user(&a, "bob").request("PUT", THUMBS, None).await, "again");
        assert_eq!(
            r["reactions"]["👍"],
            json!({"count": 2, "mine": true}),
            "{r}"
        );
        for (node, name) in [(&a, "a"), (&b, "b")] {
            eventually(&format!("both reactions on node {name}"), || async {
                message(node, "alice", 1).await["reactions"]["👍"]
                    == json!({"count": 2, "mine": false})
            })
            .await;
        }
        assert_eq!(
            message(&b, "carol", 1).await["reactions"]["👍"],
            json!({"count": 2, "mine": true}),
            "carol's own, on the node she did not use"
        );

        // Taken back on node A: gone on B too.
        let r = ok(
            user(&a, "bob").request("DELETE", THUMBS, None).await,
            "unreact",
        );
        assert_eq!(
            r["reactions"]["👍"],
            json!({"count": 1, "mine": false}),
            "{r}"
        );
        eventually("bob's reaction gone on node B", || async {
            message(&b, "bob", 1).await["reactions"]["👍"] == json!({"count": 1, "mine": false})
        })
        .await;
        // Refusals are the node asked's, as on one node.
        let r = user(&b, "dave").request("PUT", THUMBS, None).await;
        assert_eq!(r.status, 403, "not a member: {}", r.text());
        let r = user(&b, "bob")
            .request("PUT", "/v1/conversations/room/messages/9/reactions/x", None)
            .await;
        assert_eq!(r.status, 404, "no message 9: {}", r.text());
    });
}
