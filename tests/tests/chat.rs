//! The chat layer told as user stories (DESIGN §3-§4): users log in with
//! JWTs, talk in direct and group conversations over `chat/{conv}`, and
//! check what a chat app checks: who got which message, with which seq, in
//! which order, exactly once; what history says; who is refused.
//!
//! Resume and restart stories are in `chat_resume.rs`.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use chatmq_tests::chat::*;
use chatmq_tests::{v4, v5, Broker, PATIENCE};
use serde_json::{json, Value};

/// Long enough for a message that should not come to have come.
const QUIET: Duration = Duration::from_millis(500);
const DM: &str = "dm:alice:bob";

fn v5_ok(ack: Option<v5::Packet>, what: &str) {
    match ack {
        Some(v5::Packet::PubAck(a)) => assert_eq!(a.reason, v5::PubAckReason::Success, "{what}"),
        other => panic!("{what}: expected a PUBACK, got {other:?}"),
    }
}

fn v5_refused(ack: Option<v5::Packet>, reason: v5::PubAckReason, what: &str) {
    match ack {
        Some(v5::Packet::PubAck(a)) => assert_eq!(a.reason, reason, "{what}"),
        other => panic!("{what}: expected a PUBACK {reason:?}, got {other:?}"),
    }
}

/// Story 2: a 50-member group, 10 members send 20 messages each at the same
/// time, 5 members watch: every watcher gets all 200 in one dense order,
/// and history tells the same story.
#[tokio::test]
async fn a_busy_group_gives_every_member_the_same_dense_order() {
    let b = Broker::start(&config(""));
    let members: Vec<String> = (1..=49).map(|i| format!("u{i:02}")).collect();
    let member_refs: Vec<&str> = members.iter().map(String::as_str).collect();
    let mut owner = v5_with_events(&b, "owner").await;
    create_group(&mut owner, "team", &member_refs).await;

    // Five watchers, three on MQTT 5 and two on 3.1.1.
    let mut v5_watchers = Vec::new();
    for u in ["u40", "u41", "u42"] {
        let mut c = v5_user(&b, u).await;
        let ack = c.subscribe("chat/team", v5::QoS::AtLeastOnce).await;
        assert_eq!(
            ack.return_codes,
            [v5::SubscribeReasonCode::Success(v5::QoS::AtLeastOnce)]
        );
        v5_watchers.push((u, c));
    }
    let mut v4_watchers = Vec::new();
    for u in ["u43", "u44"] {
        let mut c = v4_user(&b, u).await;
        let ack = c.subscribe("chat/+", v4::QoS::AtLeastOnce).await;
        assert_eq!(
            ack.return_codes,
            [v4::SubscribeReasonCode::Success(v4::QoS::AtLeastOnce)]
        );
        v4_watchers.push((u, c));
    }

    // Ten senders, each on its own connection, all at once.
    let mut senders = Vec::new();
    for i in 1..=10 {
        let user = format!("u{i:02}");
        if i % 2 == 0 {
            let mut c = v5_user(&b, &user).await;
            senders.push(tokio::spawn(async move {
                for n in 1..=20 {
                    let ack = c
                        .publish_acked(
                            "chat/team",
                            v5::QoS::AtLeastOnce,
                            false,
                            &envelope(&format!("{user}-{n}"), "hi"),
                        )
                        .await;
                    v5_ok(ack, &format!("{user} message {n}"));
                }
            }));
        } else {
            let mut c = v4_user(&b, &user).await;
            senders.push(tokio::spawn(async move {
                for n in 1..=20 {
                    c.publish_acked(
                        "chat/team",
                        v4::QoS::AtLeastOnce,
                        false,
                        &envelope(&format!("{user}-{n}"), "hi"),
                    )
                    .await;
                }
            }));
        }
    }
    for s in senders {
        s.await.expect("sender");
    }

    let check = |who: &str, payloads: Vec<Value>| -> Vec<Value> {
        let seqs: Vec<u64> = payloads
            .iter()
            .map(|v| v["seq"].as_u64().expect("seq"))
            .collect();
        assert_dense(&seqs, 200, who);
        // Each sender's messages keep the order it sent them in.
        let mut last: HashMap<String, u64> = HashMap::new();
        for v in &payloads {
            assert_eq!(v["conv"], "team");
            let from = v["from"].as_str().expect("from").to_string();
            let id = v["id"].as_str().expect("id");
            assert!(id.starts_with(&format!("{from}-")), "{v}");
            let n: u64 = id[from.len() + 1..].parse().expect("n");
            assert_eq!(
                n,
                last.get(&from).copied().unwrap_or(0) + 1,
                "{who}: {from}'s order: {v}"
            );
            last.insert(from, n);
        }
        assert_eq!(last.len(), 10, "{who}: ten senders");
        payloads
    };
    let mut orders = Vec::new();
    for (u, c) in &mut v5_watchers {
        let got = v5_until(c, PATIENCE, |g| g.len() >= 200).await;
        let got: Vec<Value> = got.iter().map(|p| json_of(&p.payload)).collect();
        orders.push(check(u, got));
    }
    for (u, c) in &mut v4_watchers {
        let got = v4_until(c, PATIENCE, |g| g.len() >= 200).await;
        let got: Vec<Value> = got.iter().map(|p| json_of(&p.payload)).collect();
        orders.push(check(u, got));
    }
    for (_, c) in &mut v5_watchers {
        c.no_publish(Duration::from_millis(200)).await;
    }
    for (_, c) in &mut v4_watchers {
        c.no_publish(Duration::from_millis(200)).await;
    }
    // Everyone saw the same message at each seq.
    let ids = |o: &Vec<Value>| o.iter().map(|v| v["id"].clone()).collect::<Vec<_>>();
    for o in &orders[1..] {
        assert_eq!(ids(o), ids(&orders[0]));
    }

    // History, in two pages, is the same log.
    let mut history = Vec::new();
    for (page, after) in [(1, 0), (2, 100)] {
        let (reply, _) = v5_rpc(
            &mut owner,
            "history",
            &format!("h{page}"),
            json!({"conv": "team", "after": after, "limit": 100}),
        )
        .await;
        assert_eq!(reply["ok"], true, "{reply}");
        assert_eq!(reply["result"]["head"], 200);
        history.extend(
            reply["result"]["messages"]
                .as_array()
                .expect("messages")
                .clone(),
        );
    }
    assert_eq!(ids(&history), ids(&orders[0]));
    assert_eq!(history, orders[0], "history returns what was delivered");
}

/// Story 3: a client that retries a message (same envelope id) creates one
/// message: one seq, one copy per subscriber, every PUBACK answered, also
/// when the retry comes after a broker restart.
#[tokio::test]
async fn a_retried_message_id_is_one_message_even_across_a_restart() {
    let mut b = Broker::start(&config(""));
    let mut bob = v5_user(&b, "bob").await;
    bob.subscribe(&format!("chat/{DM}"), v5::QoS::AtLeastOnce)
        .await;

    // alice's 3.1.1 phone sends, times out waiting, sends again.
    let mut phone = v4_user(&b, "alice").await;
    let m = envelope("m-1", "are you there?");
    phone
        .publish_acked(&format!("chat/{DM}"), v4::QoS::AtLeastOnce, false, &m)
        .await;
    phone
        .publish_acked(&format!("chat/{DM}"), v4::QoS::AtLeastOnce, false, &m)
        .await;
    // And her MQTT 5 laptop sends the same id once more.
    let mut laptop = v5_login(v5_options(b.addr, "alice-laptop", "alice", false)).await;
    let ack = laptop
        .publish_acked(&format!("chat/{DM}"), v5::QoS::AtLeastOnce, false, &m)
        .await;
    v5_ok(ack, "the laptop's retry");

    let got = bob.publishes_for(QUIET).await;
    assert_eq!(got.len(), 1, "bob gets one copy: {got:?}");
    let v = json_of(&got[0].payload);
    assert_eq!(
        (v["seq"].as_u64(), v["id"].as_str(), v["from"].as_str()),
        (Some(1), Some("m-1"), Some("alice"))
    );

    b.restart();
    let mut bob = v5_with_events(&b, "bob").await;
    bob.subscribe(&format!("chat/{DM}"), v5::QoS::AtLeastOnce)
        .await;
    let mut phone = v4_user(&b, "alice").await;
    phone
        .publish_acked(&format!("chat/{DM}"), v4::QoS::AtLeastOnce, false, &m)
        .await;
    phone
        .publish_acked(
            &format!("chat/{DM}"),
            v4::QoS::AtLeastOnce,
            false,
            &envelope("m-2", "hello?"),
        )
        .await;
    let got = v5_until(&mut bob, PATIENCE, |g| {
        g.iter().any(|p| v5_topic(p).starts_with("chat/"))
    })
    .await;
    let chat: Vec<Value> = got
        .iter()
        .filter(|p| v5_topic(p).starts_with("chat/"))
        .map(|p| json_of(&p.payload))
        .collect();
    assert_eq!(chat.len(), 1, "{chat:?}");
    assert_eq!(chat[0]["id"], "m-2");
    assert_eq!(chat[0]["seq"], 2, "the retry after the restart took no seq");

    let (reply, _) = v5_rpc(&mut bob, "history", "h", json!({"conv": DM, "after": 0})).await;
    let ids: Vec<&str> = reply["result"]["messages"]
        .as_array()
        .expect("messages")
        .iter()
        .map(|m| m["id"].as_str().expect("id"))
        .collect();
    assert_eq!(ids, ["m-1", "m-2"], "{reply}");
    assert_eq!(reply["result"]["head"], 2);
}

/// Story 5: carol is removed from a group while connected and subscribed:
/// she is told, gets nothing sent after the owner's reply, and can no
/// longer post there.
#[tokio::test]
async fn a_removed_member_stops_receiving_and_cannot_post() {
    let b = Broker::start(&config(""));
    let mut alice = v5_with_events(&b, "alice").await;
    create_group(&mut alice, "team", &["bob", "carol"]).await;
    alice.subscribe("chat/team", v5::QoS::AtLeastOnce).await;
    let mut bob = v5_user(&b, "bob").await;

    // carol has a 3.1.1 phone and an MQTT 5 laptop.
    let mut phone = v4_login(v4_options(b.addr, "carol-phone", "carol", false)).await;
    phone.subscribe("chat/team", v4::QoS::AtLeastOnce).await;
    phone
        .subscribe("users/carol/events", v4::QoS::AtLeastOnce)
        .await;
    let mut laptop = v5_login(v5_options(b.addr, "carol-laptop", "carol", false)).await;
    laptop.subscribe("chat/+", v5::QoS::AtLeastOnce).await;

    let ack = bob
        .publish_acked(
            "chat/team",
            v5::QoS::AtLeastOnce,
            false,
            &envelope("b1", "before"),
        )
        .await;
    v5_ok(ack, "bob's first message");
    assert_eq!(seq_of(&phone.publish().await.payload), 1);
    assert_eq!(seq_of(&laptop.publish().await.payload), 1);
    assert_eq!(seq_of(&alice.publish().await.payload), 1);

    let (reply, _) = v5_rpc(
        &mut alice,
        "conversation.remove",
        "rm",
        json!({"conv": "team", "user": "carol"}),
    )
    .await;
    assert_eq!(reply["ok"], true, "{reply}");

    for (id, text) in [("b2", "after"), ("b3", "still after")] {
        let ack = bob
            .publish_acked(
                "chat/team",
                v5::QoS::AtLeastOnce,
                false,
                &envelope(id, text),
            )
            .await;
        v5_ok(ack, id);
    }
    let seen: Vec<u64> = v5_until(&mut alice, PATIENCE, |g| g.len() >= 2)
        .await
        .iter()
        .map(|p| seq_of(&p.payload))
        .collect();
    assert_eq!(seen, [2, 3], "the remaining members still talk");

    let phone_got = phone.publishes_for(QUIET).await;
    let topics: Vec<&str> = phone_got.iter().map(|p| p.topic.as_str()).collect();
    assert_eq!(
        topics,
        ["users/carol/events"],
        "carol's phone gets only the removal: {phone_got:?}"
    );
    let event = json_of(&phone_got[0].payload);
    assert_eq!(
        (
            event["type"].as_str(),
            event["conv"].as_str(),
            event["user"].as_str()
        ),
        (Some("member.removed"), Some("team"), Some("carol"))
    );
    laptop.no_publish(Duration::from_millis(100)).await;

    // Her phone's post is acked (3.1.1 has no refusal code) and refused by an event.
    let got = v4_publish_answered(&mut phone, "chat/team", &envelope("c1", "hello?")).await;
    let e = json_of(&got[0].payload);
    assert_eq!(
        (
            e["type"].as_str(),
            e["code"].as_str(),
            e["topic"].as_str(),
            e["id"].as_str()
        ),
        (
            Some("error"),
            Some("not_member"),
            Some("chat/team"),
            Some("c1")
        )
    );
    // Her laptop's is refused with Not Authorized.
    let ack = laptop
        .publish_acked(
            "chat/team",
            v5::QoS::AtLeastOnce,
            false,
            &envelope("c2", "hello??"),
        )
        .await;
    v5_refused(
        ack,
        v5::PubAckReason::NotAuthorized,
        "a removed member posting",
    );
    alice.no_publish(QUIET).await;
    let (reply, _) = v5_rpc(
        &mut alice,
        "history",
        "h",
        json!({"conv": "team", "after": 0}),
    )
    .await;
    assert_eq!(
        reply["result"]["head"], 3,
        "carol's posts were not stored: {reply}"
    );
}

/// Story 6: eve is in no conversation. Even with an ACL that grants her
/// every wildcard subscription, nothing of alice and bob's group or direct
/// conversation reaches her: messages, typing, presence, events.
#[tokio::test]
async fn a_non_member_sees_nothing_through_any_wildcard() {
    let b = Broker::start(&config(
        "[[acl.rules]]\nuser = \"*\"\ntopic = \"#\"\naccess = \"sub\"\n",
    ));
    let mut eve5 = v5_login(v5_options(b.addr, "eve-5", "eve", false)).await;
    let mut eve4 = v4_login(v4_options(b.addr, "eve-4", "eve", false)).await;
    use v5::SubscribeReasonCode as R5;
    for f in ["#", "chat/#", "chat/+", "+/+", "$share/g/#"] {
        let ack = eve5.subscribe(f, v5::QoS::AtLeastOnce).await;
        assert_eq!(
            ack.return_codes,
            [R5::Success(v5::QoS::AtLeastOnce)],
            "v5 {f}"
        );
        let ack = eve4.subscribe(f, v4::QoS::AtLeastOnce).await;
        assert_eq!(
            ack.return_codes,
            [v4::SubscribeReasonCode::Success(v4::QoS::AtLeastOnce)],
            "v4 {f}"
        );
    }
    // A shared subscription inside the chat namespace: granted or not, it
    // must deliver nothing to her.
    eve5.subscribe("$share/g/chat/+", v5::QoS::AtLeastOnce)
        .await;
    eve4.subscribe("$share/g/chat/+", v4::QoS::AtLeastOnce)
        .await;

    let mut alice = v5_with_events(&b, "alice").await;
    create_group(&mut alice, "team", &["bob"]).await;
    alice.subscribe("chat/+", v5::QoS::AtLeastOnce).await;
    let mut bob = v4_user(&b, "bob").await;
    bob.subscribe("chat/+", v4::QoS::AtLeastOnce).await;
    bob.subscribe("typing/team", v4::QoS::AtLeastOnce).await;
    bob.subscribe("presence/alice", v4::QoS::AtLeastOnce).await;

    // Naming the conversations outright is refused [MQTT-3.9.3-2 style: 0x80 / 0x87].
    for f in [
        "chat/team",
        &format!("chat/{DM}"),
        "typing/team",
        "presence/alice",
        "users/alice/events",
    ] {
        let ack = eve5.subscribe(f, v5::QoS::AtLeastOnce).await;
        assert_eq!(ack.return_codes, [R5::NotAuthorized], "v5 {f}");
        let ack = eve4.subscribe(f, v4::QoS::AtLeastOnce).await;
        assert_eq!(
            ack.return_codes,
            [v4::SubscribeReasonCode::Failure],
            "v4 {f}"
        );
    }

    v5_ok(
        alice
            .publish_acked(
                "chat/team",
                v5::QoS::AtLeastOnce,
                false,
                &envelope("a1", "team secret"),
            )
            .await,
        "a1",
    );
    v5_ok(
        alice
            .publish_acked(
                &format!("chat/{DM}"),
                v5::QoS::AtLeastOnce,
                false,
                &envelope("a2", "dm secret"),
            )
            .await,
        "a2",
    );
    let mut early = bob
        .publish_acked_keeping(
            "chat/team",
            v4::QoS::AtLeastOnce,
            false,
            &envelope("b1", "re: team"),
        )
        .await;
    early.extend(
        bob.publish_acked_keeping(
            &format!("chat/{DM}"),
            v4::QoS::AtLeastOnce,
            false,
            &envelope("b2", "re: dm"),
        )
        .await,
    );
    alice
        .publish_acked("typing/team", v5::QoS::AtMostOnce, false, br#""typing""#)
        .await;
    // (alice and bob coming online after eve subscribed made presence news.)

    // The members do get it all (so silence at eve's means something).
    let mut got = early;
    let enough = |g: &[v4::Publish]| {
        g.iter().filter(|p| p.topic.starts_with("chat/")).count() >= 4
            && g.iter().any(|p| p.topic == "typing/team")
    };
    if !enough(&got) {
        let more = v4_until(&mut bob, PATIENCE, |g| {
            let all: Vec<v4::Publish> = got.iter().chain(g).cloned().collect();
            enough(&all)
        })
        .await;
        got.extend(more);
    }
    let convs: HashSet<String> = got
        .iter()
        .filter(|p| p.topic.starts_with("chat/"))
        .map(|p| {
            json_of(&p.payload)["conv"]
                .as_str()
                .expect("conv")
                .to_string()
        })
        .collect();
    assert_eq!(convs, HashSet::from(["team".to_string(), DM.to_string()]));

    let allowed = |t: &str| t == "presence/eve" || t == "users/eve/events";
    let leaked5: Vec<String> = eve5
        .publishes_for(QUIET)
        .await
        .iter()
        .map(v5_topic)
        .filter(|t| !allowed(t))
        .collect();
    let leaked4: Vec<String> = eve4
        .publishes_for(QUIET)
        .await
        .iter()
        .map(v4_topic)
        .filter(|t| !allowed(t))
        .collect();
    assert!(leaked5.is_empty(), "eve's MQTT 5 client got {leaked5:?}");
    assert!(leaked4.is_empty(), "eve's 3.1.1 client got {leaked4:?}");
}

/// Story 7: history pages by `after`, `before` and `limit`, always in
/// ascending seq order, with the head and a stable epoch; a non-member is
/// refused.
#[tokio::test]
async fn history_pages_forward_and_backward() {
    let mut b = Broker::start(&config(""));
    let mut alice = v5_with_events(&b, "alice").await;
    create_group(&mut alice, "team", &["bob"]).await;
    for i in 1..=30 {
        v5_ok(
            alice
                .publish_acked(
                    "chat/team",
                    v5::QoS::AtLeastOnce,
                    false,
                    &envelope(&format!("m{i}"), &format!("#{i}")),
                )
                .await,
            "send",
        );
    }
    let mut bob = v4_user(&b, "bob").await;
    bob.subscribe("users/bob/events", v4::QoS::AtLeastOnce)
        .await;

    let mut epoch = None;
    let cases: [(Value, Vec<u64>); 7] = [
        (json!({"limit": 10}), (21..=30).collect()),
        (json!({"after": 0, "limit": 10}), (1..=10).collect()),
        (json!({"after": 10, "limit": 5}), (11..=15).collect()),
        (json!({"before": 11, "limit": 5}), (6..=10).collect()),
        (json!({"after": 5, "before": 9}), vec![6, 7, 8]),
        (json!({"after": 28, "limit": 10}), vec![29, 30]),
        (json!({"after": 30}), vec![]),
    ];
    for (i, (params, want)) in cases.iter().enumerate() {
        let mut req = params.clone();
        req["conv"] = json!("team");
        let (reply, _) = v4_rpc(&mut bob, "history", &format!("q{i}"), req).await;
        assert_eq!(reply["ok"], true, "{params}: {reply}");
        let r = &reply["result"];
        let seqs: Vec<u64> = r["messages"]
            .as_array()
            .expect("messages")
            .iter()
            .map(|m| m["seq"].as_u64().expect("seq"))
            .collect();
        assert_eq!(&seqs, want, "{params}");
        for m in r["messages"].as_array().expect("messages") {
            let s = m["seq"].as_u64().expect("seq");
            assert_eq!(m["id"], format!("m{s}"));
            assert_eq!(m["body"]["text"], format!("#{s}"));
            assert_eq!(m["from"], "alice");
        }
        assert_eq!(r["head"], 30, "{params}");
        let e = r["epoch"].as_str().expect("epoch").to_string();
        assert!(!e.is_empty());
        assert_eq!(epoch.get_or_insert(e.clone()), &e, "the epoch is stable");
    }

    // A restart keeps the store, so the epoch does not change.
    b.restart();
    let mut bob = v4_user(&b, "bob").await;
    bob.subscribe("users/bob/events", v4::QoS::AtLeastOnce)
        .await;
    let (reply, _) = v4_rpc(
        &mut bob,
        "history",
        "again",
        json!({"conv": "team", "after": 29}),
    )
    .await;
    assert_eq!(reply["result"]["epoch"].as_str(), epoch.as_deref());
    assert_eq!(reply["result"]["head"], 30);

    let mut eve = v5_with_events(&b, "eve").await;
    let (reply, _) = v5_rpc(
        &mut eve,
        "history",
        "peek",
        json!({"conv": "team", "after": 0}),
    )
    .await;
    assert_eq!(reply["ok"], false, "{reply}");
    assert_eq!(reply["error"]["code"], "not_member");
    assert!(reply.get("result").is_none(), "{reply}");
}

/// Story 8: alice is online while any of her devices is; bob, who shares a
/// conversation with her, sees it change; eve, who shares none, may not look.
#[tokio::test]
async fn presence_follows_the_last_device() {
    let b = Broker::start(&config(""));
    let mut bob = v5_with_events(&b, "bob").await;
    create_group(&mut bob, "team", &["alice"]).await;
    let ack = bob.subscribe("presence/alice", v5::QoS::AtLeastOnce).await;
    assert_eq!(
        ack.return_codes,
        [v5::SubscribeReasonCode::Success(v5::QoS::AtLeastOnce)]
    );
    // Retained: a new subscriber learns the current state at once.
    let first = bob.publish().await;
    assert_eq!(v5_topic(&first), "presence/alice");
    assert!(first.retain, "presence is retained");
    assert_eq!(json_of(&first.payload)["status"], "offline");

    let status = |p: &v5::Publish| {
        assert_eq!(v5_topic(p), "presence/alice");
        json_of(&p.payload)
    };
    let phone = v4_login(v4_options(b.addr, "alice-phone", "alice", false)).await;
    let online = status(&bob.publish().await);
    assert_eq!(online["status"], "online");
    assert!(online["ts"].as_u64().expect("ts") > 0);

    let laptop = v5_login(v5_options(b.addr, "alice-laptop", "alice", false)).await;
    bob.no_publish(QUIET).await;
    phone.disconnect().await;
    bob.no_publish(QUIET).await;
    laptop.drop_connection();
    let offline = status(&bob.publish().await);
    assert_eq!(offline["status"], "offline");
    assert!(offline["ts"].as_u64().expect("ts") >= online["ts"].as_u64().expect("ts"));

    let mut eve = v4_user(&b, "eve").await;
    let ack = eve.subscribe("presence/alice", v4::QoS::AtLeastOnce).await;
    assert_eq!(ack.return_codes, [v4::SubscribeReasonCode::Failure]);
    let mut eve5 = v5_login(v5_options(b.addr, "eve-5", "eve", false)).await;
    let ack = eve5.subscribe("presence/alice", v5::QoS::AtLeastOnce).await;
    assert_eq!(ack.return_codes, [v5::SubscribeReasonCode::NotAuthorized]);
    // Through a wildcard eve learns only about herself.
    eve5.subscribe("presence/+", v5::QoS::AtLeastOnce).await;
    let _phone = v4_login(v4_options(b.addr, "alice-phone", "alice", false)).await;
    assert_eq!(json_of(&bob.publish().await.payload)["status"], "online");
    let leaked: Vec<String> = eve5
        .publishes_for(QUIET)
        .await
        .iter()
        .map(v5_topic)
        .filter(|t| t != "presence/eve")
        .collect();
    assert!(leaked.is_empty(), "{leaked:?}");
}

/// A member who flaps (connects and drops again and again, faster than the
/// announcement window) costs a watcher at most one presence message per
/// window, not one per change, and the last message the watcher gets is
/// the member's real state.
#[tokio::test]
async fn a_flapping_member_is_told_once_per_window() {
    const WINDOW_MS: u64 = 400;
    let b = Broker::start(&config(&format!(
        "[chat]\nannounce_window_ms = {WINDOW_MS}\n"
    )));
    let mut bob = v5_with_events(&b, "bob").await;
    create_group(&mut bob, "team", &["alice"]).await;
    bob.subscribe("presence/alice", v5::QoS::AtLeastOnce).await;
    assert_eq!(json_of(&bob.publish().await.payload)["status"], "offline");

    let started = std::time::Instant::now();
    const FLAPS: usize = 20;
    for _ in 0..FLAPS {
        let phone = v4_login(v4_options(b.addr, "alice-phone", "alice", false)).await;
        phone.disconnect().await;
    }
    // Offline in the end: told when the first window closes.
    let flapping = started.elapsed();

    let told: Vec<String> = bob
        .publishes_for(Duration::from_millis(3 * WINDOW_MS))
        .await
        .iter()
        .map(|p| {
            assert_eq!(v5_topic(p), "presence/alice");
            json_of(&p.payload)["status"]
                .as_str()
                .unwrap_or_default()
                .to_string()
        })
        .collect();
    assert_eq!(
        told.last().map(String::as_str),
        Some("offline"),
        "the last word is her real state: {told:?}"
    );
    // One at once, then at most one per window that ended while she
    // flapped, and one after.
    let windows = flapping.as_millis() as usize / WINDOW_MS as usize;
    assert!(
        told.len() <= windows + 2,
        "{} messages for {} changes in {flapping:?}: {told:?}",
        told.len(),
        2 * FLAPS
    );
    let coalesced = chatmq_tests::metrics::metric(&b, "chatmq_presence_coalesced_total").await;
    assert!(coalesced as usize >= 2 * FLAPS - told.len(), "{coalesced}");
}

/// Story 9: typing indicators reach the other members subscribed to
/// `typing/{conv}` at QoS 0 and never become messages.
#[tokio::test]
async fn typing_reaches_the_others_at_qos0_and_is_never_stored() {
    let b = Broker::start(&config(""));
    let mut alice = v5_with_events(&b, "alice").await;
    create_group(&mut alice, "team", &["bob", "carol"]).await;
    alice.subscribe("typing/team", v5::QoS::AtLeastOnce).await;
    let mut bob = v4_user(&b, "bob").await;
    bob.subscribe("typing/team", v4::QoS::AtLeastOnce).await;
    let mut carol = v5_user(&b, "carol").await;
    carol.subscribe("typing/+", v5::QoS::ExactlyOnce).await;

    v5_ok(
        alice
            .publish_acked(
                "typing/team",
                v5::QoS::AtLeastOnce,
                false,
                br#"{"typing":true}"#,
            )
            .await,
        "typing",
    );
    let p = bob.publish().await;
    assert_eq!(p.topic, "typing/team");
    assert_eq!(
        p.qos,
        v4::QoS::AtMostOnce,
        "typing is QoS 0 whatever the subscription asks"
    );
    let v = json_of(&p.payload);
    assert_eq!(
        (v["conv"].as_str(), v["from"].as_str()),
        (Some("team"), Some("alice"))
    );
    assert_eq!(v["state"], json!({"typing": true}));
    let p = carol.publish().await;
    assert_eq!(p.qos, v5::QoS::AtMostOnce);
    assert_eq!(json_of(&p.payload)["from"], "alice");
    alice.no_publish(QUIET).await;

    // eve is not in the group: refused.
    let mut eve = v5_user(&b, "eve").await;
    let ack = eve
        .publish_acked("typing/team", v5::QoS::AtLeastOnce, false, b"{}")
        .await;
    v5_refused(ack, v5::PubAckReason::NotAuthorized, "a non-member typing");
    bob.no_publish(Duration::from_millis(200)).await;

    let (reply, _) = v5_rpc(
        &mut alice,
        "history",
        "h",
        json!({"conv": "team", "after": 0}),
    )
    .await;
    assert_eq!(reply["result"]["head"], 0, "{reply}");
    assert_eq!(reply["result"]["messages"], json!([]));
}

/// Story 10: what each protocol version is told when a chat publish is
/// refused: MQTT 5 by PUBACK reason code, 3.1.1 by an error event.
#[tokio::test]
async fn refused_chat_publishes_are_explained_in_both_protocol_versions() {
    let b = Broker::start(&config(""));
    let mut owner = v5_with_events(&b, "alice").await;
    create_group(&mut owner, "team", &["bob"]).await;
    owner.unsubscribe("users/alice/events").await;
    let mut watcher = v5_user(&b, "bob").await;
    watcher.subscribe("chat/team", v5::QoS::AtLeastOnce).await;
    watcher
        .subscribe("users/bob/events", v5::QoS::AtLeastOnce)
        .await;

    let long_id = "x".repeat(65);
    let bad: [(&str, Vec<u8>, Value); 5] = [
        ("not JSON", b"hello".to_vec(), Value::Null),
        ("not an object", b"[1,2]".to_vec(), Value::Null),
        ("no id", br#"{"body":"hi"}"#.to_vec(), Value::Null),
        ("empty id", br#"{"id":"","body":"hi"}"#.to_vec(), json!("")),
        (
            "id of 65 chars",
            json!({"id": long_id, "body": "hi"})
                .to_string()
                .into_bytes(),
            json!(long_id),
        ),
    ];
    // MQTT 5: 0x99 Payload format invalid.
    for (what, payload, _) in &bad {
        let ack = owner
            .publish_acked("chat/team", v5::QoS::AtLeastOnce, false, payload)
            .await;
        v5_refused(ack, v5::PubAckReason::PayloadFormatInvalid, what);
    }
    let ok64 = json!({"id": "y".repeat(64), "body": "a 64-char id is fine"}).to_string();
    v5_ok(
        owner
            .publish_acked("chat/team", v5::QoS::AtLeastOnce, false, ok64.as_bytes())
            .await,
        "64 chars",
    );

    // 3.1.1: the usual PUBACK, then an error event naming the problem.
    let mut phone = v4_login(v4_options(b.addr, "alice-phone", "alice", false)).await;
    phone
        .subscribe("users/alice/events", v4::QoS::AtLeastOnce)
        .await;
    for (what, payload, id) in &bad {
        let got = v4_publish_answered(&mut phone, "chat/team", payload).await;
        assert_eq!(got.len(), 1, "{what}: {got:?}");
        let e = json_of(&got[0].payload);
        assert_eq!(e["type"], "error", "{what}");
        assert_eq!(e["code"], "bad_envelope", "{what}");
        assert_eq!(e["topic"], "chat/team", "{what}");
        assert_eq!(&e["id"], id, "{what}");
    }

    // Not a member: 0x87 / not_member.
    let mut eve5 = v5_user(&b, "eve").await;
    v5_refused(
        eve5.publish_acked(
            "chat/team",
            v5::QoS::AtLeastOnce,
            false,
            &envelope("e1", "hi"),
        )
        .await,
        v5::PubAckReason::NotAuthorized,
        "non-member",
    );
    v5_refused(
        eve5.publish_acked(
            "chat/dm:alice:bob",
            v5::QoS::AtLeastOnce,
            false,
            &envelope("e2", "hi"),
        )
        .await,
        v5::PubAckReason::NotAuthorized,
        "a DM between others",
    );
    let mut eve4 = v4_login(v4_options(b.addr, "eve-phone", "eve", false)).await;
    eve4.subscribe("users/eve/events", v4::QoS::AtLeastOnce)
        .await;
    let got = v4_publish_answered(&mut eve4, "chat/team", &envelope("e3", "hi")).await;
    let e = json_of(&got[0].payload);
    assert_eq!(
        (e["code"].as_str(), e["id"].as_str()),
        (Some("not_member"), Some("e3"))
    );

    // Topics only the server publishes on: 0x87 / server_only.
    for t in [
        "presence/alice",
        "presence/bob",
        "users/bob/events",
        "users/alice/events",
    ] {
        let forged = json!({"id": "f", "status": "online", "type": "rpc"}).to_string();
        v5_refused(
            owner
                .publish_acked(t, v5::QoS::AtLeastOnce, false, forged.as_bytes())
                .await,
            v5::PubAckReason::NotAuthorized,
            t,
        );
        let got = v4_publish_answered(&mut phone, t, forged.as_bytes()).await;
        let e = json_of(&got[0].payload);
        assert_eq!(
            (e["type"].as_str(), e["code"].as_str(), e["topic"].as_str()),
            (Some("error"), Some("server_only"), Some(t)),
            "{t}"
        );
    }

    // bob saw only the one good message; nothing forged reached his events.
    let got = watcher.publishes_for(QUIET).await;
    let topics: Vec<String> = got.iter().map(v5_topic).collect();
    assert_eq!(topics, ["chat/team"], "{got:?}");
    assert_eq!(seq_of(&got[0].payload), 1);
}

/// Story 11: bob reads up to seq 3 of 5: alice gets a read receipt, and
/// bob's conversation list shows what is left unread.
#[tokio::test]
async fn read_receipts_and_unread_counts() {
    let b = Broker::start(&config(""));
    let mut alice = v5_with_events(&b, "alice").await;
    create_group(&mut alice, "team", &["bob"]).await;
    for i in 1..=5 {
        v5_ok(
            alice
                .publish_acked(
                    "chat/team",
                    v5::QoS::AtLeastOnce,
                    false,
                    &envelope(&format!("t{i}"), "x"),
                )
                .await,
            "team",
        );
    }
    v5_ok(
        alice
            .publish_acked(
                &format!("chat/{DM}"),
                v5::QoS::AtLeastOnce,
                false,
                &envelope("d1", "x"),
            )
            .await,
        "dm",
    );

    let mut bob = v4_user(&b, "bob").await;
    bob.subscribe("users/bob/events", v4::QoS::AtLeastOnce)
        .await;
    let (reply, _) = v4_rpc(&mut bob, "read", "r1", json!({"conv": "team", "seq": 3})).await;
    assert_eq!(reply["ok"], true, "{reply}");
    assert_eq!(reply["result"]["seq"], 3);

    let receipt = v5_event(&mut alice, &mut Vec::new(), "read").await;
    assert_eq!(
        receipt,
        json!({"type": "read", "conv": "team", "user": "bob", "seq": 3})
    );

    // Reading never goes backwards.
    let (reply, _) = v4_rpc(&mut bob, "read", "r2", json!({"conv": "team", "seq": 2})).await;
    assert_eq!(reply["result"]["seq"], 3, "{reply}");

    let (reply, _) = v4_rpc(&mut bob, "conversations", "l", json!({})).await;
    assert_eq!(reply["ok"], true, "{reply}");
    let list = reply["result"]["conversations"].as_array().expect("list");
    let by_conv: HashMap<&str, &Value> = list
        .iter()
        .map(|c| (c["conv"].as_str().expect("conv"), c))
        .collect();
    assert_eq!(by_conv.len(), 2, "{reply}");
    let team = by_conv["team"];
    assert_eq!(
        (
            team["head"].as_u64(),
            team["read"].as_u64(),
            team["unread"].as_u64()
        ),
        (Some(5), Some(3), Some(2)),
        "{team}"
    );
    let dm = by_conv[DM];
    assert_eq!(
        (
            dm["head"].as_u64(),
            dm["read"].as_u64(),
            dm["unread"].as_u64()
        ),
        (Some(1), Some(0), Some(1)),
        "{dm}"
    );

    // Reading in a conversation one is not in is refused.
    let mut eve = v5_with_events(&b, "eve").await;
    let (reply, _) = v5_rpc(&mut eve, "read", "r", json!({"conv": "team", "seq": 5})).await;
    assert_eq!(reply["error"]["code"], "not_member", "{reply}");
}

/// A watcher who subscribes while a member's presence window is open is
/// given the member's state of that moment; if the member then flaps back
/// to what was told before, the window's end tells the watcher the real
/// state all the same (it once left a watcher with "offline" for a member
/// who was online: the web demo's fallback test, when a page reconnected
/// its event stream just as its contact subscribed).
#[tokio::test]
async fn a_watcher_who_subscribed_mid_window_learns_the_real_state_when_it_ends() {
    const WINDOW_MS: u64 = 1500;
    let b = Broker::start(&config(&format!(
        "[chat]\nannounce_window_ms = {WINDOW_MS}\n"
    )));
    let mut bob = v5_with_events(&b, "bob").await;
    create_group(&mut bob, "team", &["alice"]).await;
    // alice online: told, and her window opens.
    let phone = v4_login(v4_options(b.addr, "alice-phone", "alice", false)).await;
    // Offline and online again within it; bob subscribes in between.
    phone.disconnect().await;
    let mut watcher = v5_login(v5_options(b.addr, "bob-watch", "bob", false)).await;
    watcher
        .subscribe("presence/alice", v5::QoS::AtLeastOnce)
        .await;
    let first = json_of(&watcher.publish().await.payload)["status"].clone();
    assert_eq!(first, "offline", "her state when bob subscribed");
    let _again = v4_login(v4_options(b.addr, "alice-phone", "alice", false)).await;
    let told: Vec<Value> = watcher
        .publishes_for(Duration::from_millis(3 * WINDOW_MS))
        .await
        .iter()
        .map(|p| json_of(&p.payload)["status"].clone())
        .collect();
    assert_eq!(
        told.last().and_then(Value::as_str),
        Some("online"),
        "bob ends knowing she is online: {told:?}"
    );
}
