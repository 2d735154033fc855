//! Push across the nodes of a cluster (issue #12 item 6), with real
//! processes: 3 `nats-server` and 2 `chatmq` nodes, one partition (so one
//! node sequences every message and queues its pushes), and a webhook
//! mock. A device registered on the node that does not sequence, and a
//! mute set there, are what the sequencing node acts on: an offline
//! member gets one notification (not one per node), a muted conversation
//! none, and a device forgotten on one node is gone from the other.

use std::time::Duration;

use chatmq_tests::chat;
use chatmq_tests::cluster::{eventually, ok, runtime, user};
use chatmq_tests::metrics::metric;
use chatmq_tests::nats::NatsCluster;
use chatmq_tests::push_mock::Mock;
use chatmq_tests::{Broker, PATIENCE};
use serde_json::{json, Value};

const DM: &str = "dm:alice:bob";
/// Long enough for a push that should not come to have come (the
/// debounce window is 300 ms).
const QUIET: Duration = Duration::from_millis(1500);

fn node(nats: &NatsCluster, id: &str, mock: &Mock) -> Broker {
    Broker::start(&chat::config(&format!(
        "[push]\ndebounce_ms = 300\n\n[push.webhook]\nurl = \"{}\"\n\n\
         [cluster]\nnode_id = {id:?}\n{}\npartitions = 1\nlease_ttl_ms = 2000\n",
        mock.url("/notify"),
        nats.urls_toml()
    )))
}

async fn devices(b: &Broker, name: &str) -> Vec<Value> {
    let r = ok(user(b, name).get("/v1/devices").await, "devices");
    r["devices"].as_array().cloned().unwrap_or_default()
}

async fn muted(b: &Broker, name: &str, conv: &str) -> Option<bool> {
    let r = ok(user(b, name).get("/v1/conversations").await, "list");
    r["conversations"]
        .as_array()?
        .iter()
        .find(|c| c["conv"] == conv)
        .and_then(|c| c["muted"].as_bool())
}

async fn send(b: &Broker, id: &str) -> u64 {
    let r = user(b, "alice")
        .post(
            &format!("/v1/conversations/{DM}/messages"),
            &json!({"id": id, "body": {"text": id}}),
        )
        .await;
    ok(r, id)["seq"].as_u64().unwrap_or(0)
}

#[test]
fn devices_and_mutes_set_on_one_node_are_what_the_sequencing_node_pushes_by() {
    if chatmq_tests::nats::skip() {
        return;
    }
    let nats = NatsCluster::start(3);
    let rt = runtime();
    let mock = rt.block_on(Mock::start());
    let (a, b) = (node(&nats, "node-a", &mock), node(&nats, "node-b", &mock));
    rt.block_on(async {
        // Which node sequences (holds the one partition), and which not.
        let a_sequences = async {
            for _ in 0..300 {
                let on_a = metric(&a, "chatmq_cluster_partitions_owned").await;
                let on_b = metric(&b, "chatmq_cluster_partitions_owned").await;
                if on_a + on_b == 1.0 {
                    return on_a == 1.0;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            panic!("no single node held the partition within 30 s");
        }
        .await;
        let (owner, other) = if a_sequences { (&a, &b) } else { (&b, &a) };

        // bob registers his phone on the node that does not sequence.
        let r = user(other, "bob")
            .post(
                "/v1/devices",
                &json!({"platform": "webhook", "token": "bob-phone"}),
            )
            .await;
        assert_eq!(r.status, 201, "{}", r.text());
        eventually("the device known on the sequencing node", || async {
            devices(owner, "bob").await.len() == 1
        })
        .await;

        assert_eq!(send(other, "m1").await, 1);
        let got = mock.wait_for("/notify", 1, PATIENCE).await;
        let body = got[0].json();
        assert_eq!(
            (
                body["user"].clone(),
                body["token"].clone(),
                body["conv"].clone()
            ),
            (json!("bob"), json!("bob-phone"), json!(DM)),
            "{body}"
        );
        tokio::time::sleep(QUIET).await;
        assert_eq!(
            mock.requests("/notify").len(),
            1,
            "one message, one push: not one per node"
        );

        // bob mutes the DM, on the node that does not sequence.
        let mute = serde_json::to_vec(&json!({"muted": true})).unwrap_or_default();
        let r = user(other, "bob")
            .request("PUT", &format!("/v1/conversations/{DM}/mute"), Some(&mute))
            .await;
        ok(r, "mute");
        eventually("the mute known on the sequencing node", || async {
            muted(owner, "bob", DM).await == Some(true)
        })
        .await;
        assert_eq!(send(other, "m2").await, 2);
        tokio::time::sleep(QUIET).await;
        assert_eq!(mock.requests("/notify").len(), 1, "muted: no push");

        // Forgotten on the sequencing node: gone from the other too.
        let r = user(owner, "bob")
            .request("DELETE", "/v1/devices/webhook/bob-phone", None)
            .await;
        ok(r, "unregister");
        eventually("the device gone from the other node", || async {
            devices(other, "bob").await.is_empty()
        })
        .await;
        let r = user(other, "bob")
            .request("DELETE", "/v1/devices/webhook/bob-phone", None)
            .await;
        assert_eq!(r.status, 404, "forgotten already: {}", r.text());
    });
}
