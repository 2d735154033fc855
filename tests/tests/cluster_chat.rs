//! Chat across `[cluster]` nodes (issue #12 items 2 and 3, with the
//! leases of item 7): real `nats-server`s (3, routed, JetStream) and real
//! `chatmq` binaries on free ports and temporary directories. What a user
//! checks: a message sent on one node reaches a member on another, seqs
//! dense everywhere; a retry of the same envelope id on another node gets
//! the same seq and delivers nothing twice; history, conversation lists,
//! unread counts and membership answer the same on every node; a node
//! stopped while others write, and a new empty one, catch up exactly.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use chatmq_tests::chat::{self, envelope, seq_of};
use chatmq_tests::cluster::{acked_within, eventually, ok, runtime, user};
use chatmq_tests::http::Http;
use chatmq_tests::nats::NatsCluster;
use chatmq_tests::Broker;
use rumqttc::v5::mqttbytes::QoS;
use serde_json::{json, Value};

const ADMIN: &str = "cluster-chat-admin";

/// One test at a time: each runs 3 NATS servers and 2-3 nodes, and on
/// two cores several at once starve each other's start-up and leases.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

/// A chat node `node` of the cluster on `nats`.
fn node_config(nats: &NatsCluster, node: &str) -> String {
    node_config_ttl(nats, node, 2000)
}

/// The same with a lease TTL of `ttl_ms`.
fn node_config_ttl(nats: &NatsCluster, node: &str, ttl_ms: u64) -> String {
    chat::config(&format!(
        "admin_token = \"{ADMIN}\"\n\n[cluster]\nnode_id = {node:?}\n{}\npartitions = 4\nlease_ttl_ms = {ttl_ms}\n",
        nats.urls_toml()
    ))
}

fn admin(b: &Broker) -> Http {
    Http::new(b.http_addr).with_token(ADMIN)
}

/// The seqs of `conv`'s history on `b` as `viewer` (all, up to 200).
async fn history(b: &Broker, viewer: &str, conv: &str) -> Vec<u64> {
    let r = user(b, viewer)
        .get(&format!("/v1/conversations/{conv}/messages?limit=200"))
        .await;
    if r.status == 404 {
        // Not applied here yet.
        return Vec::new();
    }
    let h = ok(r, "history");
    h["messages"]
        .as_array()
        .map(|m| m.iter().filter_map(|m| m["seq"].as_u64()).collect())
        .unwrap_or_default()
}

/// Polls `b`'s history of `conv` until it has `n` messages (a node
/// applies what others sequenced a moment later).
async fn history_reaches(b: &Broker, viewer: &str, conv: &str, n: usize) -> Vec<u64> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let seqs = history(b, viewer, conv).await;
        if seqs.len() >= n || Instant::now() > deadline {
            return seqs;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Sends `id` as `from` through `b`'s HTTP API; the seq.
async fn send(b: &Broker, from: &str, conv: &str, id: &str) -> u64 {
    let r = user(b, from)
        .post(
            &format!("/v1/conversations/{conv}/messages"),
            &json!({"id": id, "body": {"text": id}}),
        )
        .await;
    ok(r, &format!("send {id} on {}", b.http_addr))["seq"]
        .as_u64()
        .expect("seq")
}

/// `user`'s entry for `conv` in `GET /v1/conversations` on `b`.
async fn listed(b: &Broker, who: &str, conv: &str) -> Option<Value> {
    let list = ok(user(b, who).get("/v1/conversations").await, "list");
    list["conversations"]
        .as_array()?
        .iter()
        .find(|c| c["conv"] == conv)
        .cloned()
}

#[test]
fn a_message_sent_on_one_node_reaches_a_member_on_another_and_a_retry_elsewhere_keeps_its_seq() {
    if chatmq_tests::nats::skip() {
        return;
    }
    let _one = serial();
    let nats = NatsCluster::start(3);
    let a = Broker::start(&node_config(&nats, "node-a"));
    let b = Broker::start(&node_config(&nats, "node-b"));
    let rt = runtime();
    rt.block_on(async {
        // Created on A, seen on B: membership is replicated.
        ok(
            user(&a, "alice")
                .post(
                    "/v1/conversations",
                    &json!({"conv": "room", "title": "Room", "members": ["bob"]}),
                )
                .await,
            "create on A",
        );
        eventually("bob is a member on B", || async {
            listed(&b, "bob", "room").await.is_some()
        })
        .await;

        // bob listens on B; alice publishes on A over MQTT.
        let mut bob = chat::v5_user(&b, "bob").await;
        bob.subscribe("chat/room", QoS::AtLeastOnce).await;
        let mut alice = chat::v5_user(&a, "alice").await;
        for i in 1..=10 {
            let ack = alice
                .publish_acked(
                    "chat/room",
                    QoS::AtLeastOnce,
                    false,
                    &envelope(&format!("m{i}"), "hi"),
                )
                .await;
            assert!(
                matches!(ack, Some(rumqttc::v5::mqttbytes::v5::Packet::PubAck(ref p)) if p.reason == rumqttc::v5::mqttbytes::v5::PubAckReason::Success),
                "m{i} acknowledged: {ack:?}"
            );
        }
        let mut got = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(20);
        while got.len() < 10 && Instant::now() < deadline {
            let p = bob.publish().await;
            if chat::v5_topic(&p) == "chat/room" {
                got.push(seq_of(&p.payload));
            }
        }
        chat::assert_dense(&got, 10, "bob on node B");

        // A retry of m3 through the other node: the same seq, nothing new.
        let again = send(&b, "alice", "room", "m3").await;
        assert_eq!(again, 3, "the retry on B kept m3's seq");
        let again = send(&a, "alice", "room", "m3").await;
        assert_eq!(again, 3, "and on A");
        bob.no_publish(Duration::from_secs(1)).await;
        let next = send(&b, "bob", "room", "b1").await;
        assert_eq!(next, 11, "a new id gets the next seq");

        // History and unread counts answer the same on both nodes.
        for node in [&a, &b] {
            let seqs = history_reaches(node, "bob", "room", 11).await;
            assert_eq!(seqs, (1..=11).collect::<Vec<u64>>(), "history on {}", node.http_addr);
        }
        let entry = listed(&b, "bob", "room").await.expect("listed on B");
        assert_eq!(entry["head"], 11, "{entry}");
        assert_eq!(entry["unread"], 11, "{entry}");
        // Read on A; the unread count on B follows.
        let r = user(&a, "bob")
            .request("PUT", "/v1/conversations/room/read", Some(br#"{"seq":9}"#))
            .await;
        ok(r, "read on A");
        eventually("bob's read state on B", || async {
            listed(&b, "bob", "room")
                .await
                .is_some_and(|e| e["unread"] == 2)
        })
        .await;

        // Membership changes on B reach A.
        ok(
            admin(&b)
                .post("/v1/conversations/room/members", &json!({"user": "carol"}))
                .await,
            "add carol on B",
        );
        eventually("carol is a member on A", || async {
            listed(&a, "carol", "room").await.is_some()
        })
        .await;
        let from_carol = send(&a, "carol", "room", "c1").await;
        assert_eq!(from_carol, 12);
    });
}

#[test]
fn a_stopped_node_catches_up_exactly_and_a_new_empty_node_from_the_streams_alone() {
    if chatmq_tests::nats::skip() {
        return;
    }
    let _one = serial();
    let nats = NatsCluster::start(3);
    let a = Broker::start(&node_config(&nats, "node-a"));
    let mut b = Broker::start(&node_config(&nats, "node-b"));
    let rt = runtime();
    rt.block_on(async {
        ok(
            user(&a, "alice")
                .post(
                    "/v1/conversations",
                    &json!({"conv": "log", "members": ["bob"]}),
                )
                .await,
            "create",
        );
        for i in 1..=5 {
            assert_eq!(send(&a, "alice", "log", &format!("x{i}")).await, i);
        }
        assert_eq!(history_reaches(&b, "bob", "log", 5).await.len(), 5);
    });
    // B stops; A goes on writing (taking over B's partitions).
    assert!(b.terminate().success(), "B stops cleanly");
    rt.block_on(async {
        for i in 6..=25 {
            assert_eq!(
                send(&a, "alice", "log", &format!("x{i}")).await,
                i,
                "x{i} while B is down"
            );
        }
    });
    b.restart();
    let c = Broker::start(&node_config(&nats, "node-c"));
    rt.block_on(async {
        // Ready means caught up: from then on its history is complete.
        for (name, node) in [("restarted B", &b), ("new C", &c)] {
            eventually("ready", || async {
                Http::new(node.http_addr).get("/readyz").await.status == 200
            })
            .await;
            assert_eq!(
                history(node, "bob", "log").await,
                (1..=25).collect::<Vec<u64>>(),
                "{name} said ready before it had caught up"
            );
        }
        for (name, node) in [("restarted B", &b), ("new C", &c)] {
            let seqs = history_reaches(node, "bob", "log", 25).await;
            assert_eq!(
                seqs,
                (1..=25).collect::<Vec<u64>>(),
                "{name}: every message once, in order; its log:\n{}",
                node.log()
            );
            let unique: HashSet<u64> = seqs.iter().copied().collect();
            assert_eq!(unique.len(), 25, "{name}: no duplicate");
        }
        // And they sequence on: the next message, wherever it is sent.
        assert_eq!(send(&c, "bob", "log", "y1").await, 26);
        assert_eq!(send(&b, "alice", "log", "y2").await, 27);
        assert_eq!(history_reaches(&a, "alice", "log", 27).await.len(), 27);
    });
}

#[test]
fn with_nats_quorum_lost_a_publish_is_not_acknowledged_until_quorum_is_back() {
    if chatmq_tests::nats::skip() {
        return;
    }
    let _one = serial();
    let mut nats = NatsCluster::start(3);
    let a = Broker::start(&node_config(&nats, "node-a"));
    let b = Broker::start(&node_config(&nats, "node-b"));
    let rt = runtime();
    rt.block_on(async {
        ok(
            user(&a, "alice")
                .post(
                    "/v1/conversations",
                    &json!({"conv": "q", "members": ["bob"]}),
                )
                .await,
            "create",
        );
        assert_eq!(send(&a, "alice", "q", "before").await, 1);
    });
    // Two of three servers gone: no stream can take a write.
    nats.servers[1].kill9();
    nats.servers[2].kill9();
    rt.block_on(async {
        let mut alice = chat::v5_login(chat::v5_options(a.addr, "alice-1", "alice", false)).await;
        let acked = acked_within(
            &mut alice,
            "chat/q",
            &envelope("during", "x"),
            Duration::from_secs(15),
        )
        .await;
        assert_ne!(acked, Some(true), "acknowledged while NATS had no quorum");
    });
    nats.restart(1);
    nats.restart(2);
    rt.block_on(async {
        // The client resends (same envelope id) until it is acknowledged.
        let deadline = Instant::now() + Duration::from_secs(120);
        let mut n = 0;
        loop {
            n += 1;
            let o = chat::v5_options(a.addr, &format!("alice-r{n}"), "alice", false);
            if let Ok(mut c) = chatmq_tests::v5::connect(o).await {
                let r = acked_within(
                    &mut c,
                    "chat/q",
                    &envelope("during", "x"),
                    Duration::from_secs(20),
                )
                .await;
                if r == Some(true) {
                    break;
                }
            }
            assert!(
                Instant::now() < deadline,
                "not acknowledged within 2 min of quorum back; logs:\n{}",
                a.log()
            );
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        for node in [&a, &b] {
            let seqs = history_reaches(node, "bob", "q", 2).await;
            assert_eq!(
                seqs,
                vec![1, 2],
                "the resent message once, on {}",
                node.http_addr
            );
        }
    });
}

#[test]
fn a_partition_owner_killed_under_load_loses_no_acknowledged_message() {
    if chatmq_tests::nats::skip() {
        return;
    }
    let _one = serial();
    let nats = NatsCluster::start(3);
    let mut a = Broker::start(&node_config(&nats, "node-a"));
    let b = Broker::start(&node_config(&nats, "node-b"));
    let rt = runtime();
    // Eight conversations: with two nodes sharing four partitions, some
    // are sequenced by A, whose death the senders on B ride out.
    let convs: Vec<String> = (0..8).map(|i| format!("load-{i}")).collect();
    rt.block_on(async {
        for c in &convs {
            ok(
                user(&b, "alice")
                    .post(
                        "/v1/conversations",
                        &json!({"conv": c, "members": ["bob", "carol", "dave"]}),
                    )
                    .await,
                "create",
            );
        }
    });
    // Both nodes sequence some partitions.
    let owned = |n: &Broker| {
        let n = n.http_addr;
        async move {
            let text = Http::new(n).get("/metrics").await.text();
            chatmq_tests::metrics::parse(&text)
                .get("chatmq_cluster_partitions_owned")
                .copied()
                .unwrap_or(0.0)
        }
    };
    rt.block_on(eventually("the partitions shared by A and B", || async {
        let (x, y) = (owned(&a).await, owned(&b).await);
        x >= 1.0 && y >= 1.0 && x + y == 4.0
    }));
    let senders = ["alice", "bob", "carol", "dave"];
    let per_sender = 40;
    let acked = rt.block_on(async {
        let mut tasks = Vec::new();
        for (k, who) in senders.iter().enumerate() {
            let (addr, who, convs) = (b.addr, who.to_string(), convs.clone());
            tasks.push(tokio::spawn(async move {
                let mut c =
                    chat::v5_login(chat::v5_options(addr, &format!("{who}-load"), &who, false))
                        .await;
                let mut acked = Vec::new();
                for i in 0..per_sender {
                    let conv = &convs[(i + k) % convs.len()];
                    let id = format!("{who}-{i}");
                    let r = acked_within(
                        &mut c,
                        &format!("chat/{conv}"),
                        &envelope(&id, "x"),
                        Duration::from_secs(30),
                    )
                    .await;
                    assert_eq!(r, Some(true), "{id} on {conv}: not acknowledged");
                    acked.push((conv.clone(), id));
                }
                acked
            }));
        }
        // Kill A while they send, once B has forwarded to it.
        let forwarded = || async {
            chatmq_tests::metrics::metric(&b, "chatmq_cluster_forwarded_total").await >= 10.0
        };
        eventually("B forwards to A", forwarded).await;
        let gained = chatmq_tests::metrics::metric(
            &b,
            "chatmq_cluster_lease_changes_total{change=\"gained\"}",
        )
        .await;
        a.kill9();
        let mut all = Vec::new();
        for t in tasks {
            all.extend(t.await.expect("sender"));
        }
        (all, gained)
    });
    let (acked, gained) = acked;
    assert_eq!(acked.len(), senders.len() * per_sender);
    rt.block_on(async {
        // B took A's partitions over (and went on).
        assert_eq!(owned(&b).await, 4.0, "B sequences every partition");
        let now = chatmq_tests::metrics::metric(
            &b,
            "chatmq_cluster_lease_changes_total{change=\"gained\"}",
        )
        .await;
        assert!(now > gained, "B gained leases after A died");
    });
    a.restart();
    let mut seq_of_id: std::collections::HashMap<(String, String), u64> = Default::default();
    rt.block_on(async {
        for (name, node) in [("B", &b), ("restarted A", &a)] {
            let mut total = 0;
            for conv in &convs {
                let deadline = Instant::now() + Duration::from_secs(30);
                let expected = acked.iter().filter(|(c, _)| c == conv).count();
                let msgs = loop {
                    let h = ok(
                        user(node, "alice")
                            .get(&format!("/v1/conversations/{conv}/messages?limit=200"))
                            .await,
                        "history",
                    );
                    let msgs = h["messages"].as_array().cloned().unwrap_or_default();
                    if msgs.len() >= expected || Instant::now() > deadline {
                        break msgs;
                    }
                    tokio::time::sleep(Duration::from_millis(200)).await;
                };
                let seqs: Vec<u64> = msgs.iter().filter_map(|m| m["seq"].as_u64()).collect();
                chat::assert_dense(&seqs, expected as u64, &format!("{conv} on {name}"));
                let ids: Vec<&str> = msgs.iter().filter_map(|m| m["id"].as_str()).collect();
                let unique: HashSet<&str> = ids.iter().copied().collect();
                assert_eq!(unique.len(), ids.len(), "{conv} on {name}: an id twice");
                for who in senders {
                    // Each sender's messages in the order it sent them.
                    let order: Vec<usize> = ids
                        .iter()
                        .filter_map(|i| i.strip_prefix(&format!("{who}-")))
                        .filter_map(|n| n.parse().ok())
                        .collect();
                    let mut sorted = order.clone();
                    sorted.sort_unstable();
                    assert_eq!(order, sorted, "{who}'s order in {conv} on {name}");
                }
                total += ids.len();
                if name == "B" {
                    for m in &msgs {
                        if let (Some(id), Some(seq)) = (m["id"].as_str(), m["seq"].as_u64()) {
                            seq_of_id.insert((conv.clone(), id.to_string()), seq);
                        }
                    }
                }
            }
            assert_eq!(total, acked.len(), "every acknowledged message on {name}");
        }
        // After the failover a retry of any of them, on either node, gets
        // the seq it got the first time (A sequenced some of them).
        for (conv, id) in acked.iter().step_by(7) {
            let who = id.split('-').next().expect("sender");
            let first = seq_of_id[&(conv.clone(), id.clone())];
            for node in [&a, &b] {
                assert_eq!(
                    send(node, who, conv, id).await,
                    first,
                    "{id} retried on {}",
                    node.http_addr
                );
            }
        }
    });
}

/// `chatmq_cluster_partitions_owned` of `b`.
async fn partitions_owned(b: &Broker) -> f64 {
    let text = Http::new(b.http_addr).get("/metrics").await.text();
    chatmq_tests::metrics::parse(&text)
        .get("chatmq_cluster_partitions_owned")
        .copied()
        .unwrap_or(0.0)
}

#[test]
fn three_nodes_share_the_partitions_and_a_stopped_one_hands_its_own_over() {
    if chatmq_tests::nats::skip() {
        return;
    }
    let _one = serial();
    let nats = NatsCluster::start(3);
    // A long TTL, so that a lease handed over is told from one expired.
    let a = Broker::start(&node_config_ttl(&nats, "node-a", 8000));
    let b = Broker::start(&node_config_ttl(&nats, "node-b", 8000));
    let mut c = Broker::start(&node_config_ttl(&nats, "node-c", 8000));
    let rt = runtime();
    rt.block_on(eventually(
        "each of three nodes sequences some of the four partitions",
        || async {
            let owned = [
                partitions_owned(&a).await,
                partitions_owned(&b).await,
                partitions_owned(&c).await,
            ];
            owned.iter().all(|n| *n >= 1.0) && owned.iter().sum::<f64>() == 4.0
        },
    ));
    // A stop gives the leases back: the others take them at once, long
    // before the TTL would have let them.
    let stopped = Instant::now();
    assert!(c.terminate().success());
    rt.block_on(eventually("A and B sequence all four", || async {
        partitions_owned(&a).await + partitions_owned(&b).await == 4.0
    }));
    assert!(
        // Measured here: 5.0 s handed over (a few lease rounds of 2 s),
        // 8.1 s when the leases had to expire instead.
        stopped.elapsed() < Duration::from_secs(7),
        "took {:?}: the leases expired (8 s TTL, renewed every 2 s) rather than being handed over",
        stopped.elapsed()
    );
    rt.block_on(async {
        ok(
            user(&a, "alice")
                .post(
                    "/v1/conversations",
                    &json!({"conv": "after", "members": ["bob"]}),
                )
                .await,
            "create",
        );
        for i in 1..=4 {
            assert_eq!(send(&b, "bob", "after", &format!("z{i}")).await, i);
        }
    });
}

#[test]
fn a_drained_node_hands_its_partitions_over_before_its_clients_leave() {
    if chatmq_tests::nats::skip() {
        return;
    }
    let _one = serial();
    let nats = NatsCluster::start(3);
    let mut a = Broker::start(&node_config(&nats, "node-a"));
    let b = Broker::start(&node_config(&nats, "node-b"));
    let rt = runtime();
    rt.block_on(async {
        eventually("A and B share the partitions", || async {
            let (x, y) = (partitions_owned(&a).await, partitions_owned(&b).await);
            x >= 1.0 && y >= 1.0 && x + y == 4.0
        })
        .await;
        // Clients on A keep it up while they are moved away one by one.
        let mut clients = Vec::new();
        for i in 0..10 {
            clients.push(chat::v5_user(&a, &format!("user-{i}")).await);
        }
        let r = admin(&a)
            .post("/v1/admin/drain", &json!({"spread_secs": 30}))
            .await;
        assert!(r.status < 300, "drain: {} {}", r.status, r.text());
        // The partitions move at once, while the node is still up and its
        // clients are being moved away over 30 s.
        eventually("B sequences all four while A drains", || async {
            partitions_owned(&b).await == 4.0 && partitions_owned(&a).await == 0.0
        })
        .await;
        assert_eq!(Http::new(a.http_addr).get("/readyz").await.status, 503);
        // What is sent through A now is forwarded to B, the owner.
        ok(
            user(&b, "carol")
                .post(
                    "/v1/conversations",
                    &json!({"conv": "drained", "members": ["dave"]}),
                )
                .await,
            "create",
        );
        eventually("the conversation is on A", || async {
            listed(&a, "carol", "drained").await.is_some()
        })
        .await;
        assert_eq!(
            send(&a, "carol", "drained", "c1").await,
            1,
            "sent through A"
        );
        assert_eq!(history_reaches(&b, "carol", "drained", 1).await, vec![1]);
    });
    let _ = a.terminate();
}
