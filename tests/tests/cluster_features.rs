//! Chat features across the nodes of a cluster (issues #12 and #13), with
//! real processes: 3 `nats-server` and 2 `chatmq` nodes. Reactions added
//! on either node are counted on both, with `mine` right for each user,
//! and a reaction taken back on one node is gone from the other. An edit
//! and a delete asked on either node (whichever sequences the
//! conversation) are change records with the next seqs on both, reach a
//! live member on the other node, rewrite the message in both nodes'
//! history, and a deleted text leaves both nodes' data directories.

use std::path::Path;

use chatmq_tests::chat::{self, json_of, seq_of, v5_topic, v5_until};
use chatmq_tests::cluster::{eventually, ok, runtime, user};
use chatmq_tests::nats::NatsCluster;
use chatmq_tests::{Broker, PATIENCE};
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

/// Every file under `dir` that holds `needle`.
fn files_holding(dir: &Path, needle: &[u8]) -> Vec<String> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in entries.flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else if let Ok(bytes) = std::fs::read(&p) {
                if bytes.windows(needle.len()).any(|w| w == needle) {
                    out.push(p.display().to_string());
                }
            }
        }
    }
    out
}

async fn edit(b: &Broker, name: &str, seq: u64, text: &str) -> chatmq_tests::http::Response {
    user(b, name)
        .request(
            "PATCH",
            &format!("/v1/conversations/room/messages/{seq}"),
            Some(json!({"body": {"text": text}}).to_string().as_bytes()),
        )
        .await
}

async fn delete(b: &Broker, name: &str, seq: u64) -> chatmq_tests::http::Response {
    user(b, name)
        .request(
            "DELETE",
            &format!("/v1/conversations/room/messages/{seq}"),
            None,
        )
        .await
}

#[test]
fn edits_and_deletes_asked_on_either_node_change_the_message_on_both() {
    if chatmq_tests::nats::skip() {
        return;
    }
    let _one = serial();
    let nats = NatsCluster::start(3);
    let (a, b) = (node(&nats, "node-a"), node(&nats, "node-b"));
    runtime().block_on(async {
        room_with_a_message(&a, &b).await;
        let mut bob = chat::v5_user(&b, "bob").await;
        bob.subscribe("chat/room", rumqttc::v5::mqttbytes::QoS::AtLeastOnce)
            .await;
        let secret = "edited-secret-Vb7qT2mX";

        // Edited on node B, whichever node sequences the room.
        let r = edit(&b, "alice", 1, secret).await;
        assert_eq!(
            ok(r, "edit"),
            json!({"conv": "room", "seq": 1, "event_seq": 2})
        );
        // The same edit again changes nothing, on the other node too.
        let r = edit(&a, "alice", 1, secret).await;
        assert_eq!(
            ok(r, "again"),
            json!({"conv": "room", "seq": 1, "event_seq": 2})
        );
        // Only the sender or the owner: bob may not, on either node.
        for node in [&a, &b] {
            let r = edit(node, "bob", 1, "mine now").await;
            assert_eq!(
                (r.status, r.error_code()),
                (403, "forbidden".to_string()),
                "{}",
                r.text()
            );
        }
        for (node, name) in [(&a, "a"), (&b, "b")] {
            eventually(&format!("the edit in node {name}'s history"), || async {
                let m = message(node, "carol", 1).await;
                m["body"]["text"] == secret && m["edited"]["seq"] == 2
            })
            .await;
            let e = message(node, "carol", 2).await;
            assert_eq!(
                (e["type"].clone(), e["target"].clone()),
                (json!("message.edit"), json!(1)),
                "{e}"
            );
        }

        // Deleted on node A.
        let r = delete(&a, "alice", 1).await;
        assert_eq!(
            ok(r, "delete"),
            json!({"conv": "room", "seq": 1, "event_seq": 3})
        );
        let r = edit(&b, "alice", 1, "too late").await;
        assert_eq!(
            (r.status, r.error_code()),
            (409, "deleted".to_string()),
            "{}",
            r.text()
        );
        let r = delete(&b, "alice", 1).await;
        assert_eq!(
            ok(r, "retried delete"),
            json!({"conv": "room", "seq": 1, "event_seq": 3})
        );
        for (node, name) in [(&a, "a"), (&b, "b")] {
            eventually(&format!("the delete in node {name}'s history"), || async {
                let m = message(node, "carol", 1).await;
                m["body"].is_null() && m["deleted"]["seq"] == 3
            })
            .await;
            let e = message(node, "carol", 2).await;
            assert!(
                e["body"].is_null(),
                "the edit's text went too, on node {name}: {e}"
            );
            let found = files_holding(&node.data_dir(), secret.as_bytes());
            assert!(
                found.is_empty(),
                "the text is still in node {name}'s {found:?}"
            );
        }

        // bob, live on node B, got both change records in order.
        let got = v5_until(&mut bob, PATIENCE, |g| {
            g.iter()
                .any(|p| v5_topic(p) == "chat/room" && seq_of(&p.payload) == 3)
        })
        .await;
        let changes: Vec<(u64, String)> = got
            .iter()
            .filter(|p| v5_topic(p) == "chat/room")
            .map(|p| json_of(&p.payload))
            .filter(|m| m["seq"].as_u64() > Some(1))
            .map(|m| {
                (
                    m["seq"].as_u64().unwrap_or(0),
                    m["type"].as_str().unwrap_or("").to_string(),
                )
            })
            .collect();
        assert_eq!(
            changes,
            [
                (2, "message.edit".to_string()),
                (3, "message.delete".to_string())
            ]
        );
    });
}
