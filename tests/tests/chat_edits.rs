//! Edits and deletes told as user stories (issue #13 item 2): the sender
//! (or the conversation's owner) changes a message by its seq; the change
//! is a sequenced record of its own (`message.edit` / `message.delete`
//! naming the `target` seq) that every member gets live or on resume, in
//! seq order; history shows the latest version with `edited` / `deleted`;
//! a deleted text is gone from the data directory, not only from reads.

use std::path::Path;
use std::time::Duration;

use chatmq_tests::chat::*;
use chatmq_tests::http::{Http, Response};
use chatmq_tests::{v5, Broker, PATIENCE};
use serde_json::{json, Value};

const ADMIN: &str = "edits-admin-token";

fn config() -> String {
    chatmq_tests::chat::config(&format!("admin_token = \"{ADMIN}\"\n"))
}

fn api(b: &Broker, user: &str) -> Http {
    Http::new(b.http_addr).with_token(&token(user))
}

/// A member over MQTT 5, subscribed to the room and its events (the
/// room must exist for the first to succeed).
async fn member(b: &Broker, user: &str) -> v5::Client {
    let mut c = v5_with_events(b, user).await;
    c.subscribe("chat/room", v5::QoS::AtLeastOnce).await;
    c
}

/// `c` sends `text` as message `id`; its seq.
async fn send(c: &mut v5::Client, id: &str, text: &str) -> u64 {
    let mine = |p: &v5::Publish| v5_topic(p) == "chat/room" && json_of(&p.payload)["id"] == id;
    let (_, mut got) = c
        .publish_acked_keeping(
            "chat/room",
            v5::QoS::AtLeastOnce,
            false,
            &envelope(id, text),
        )
        .await;
    if !got.iter().any(mine) {
        got.extend(v5_until(c, PATIENCE, |g| g.iter().any(mine)).await);
    }
    let p = got.iter().find(|p| mine(p)).expect("own message");
    seq_of(&p.payload)
}

/// The chat messages `c` gets until one with seq `seq` came.
async fn chat_until_seq(c: &mut v5::Client, seq: u64) -> Vec<Value> {
    let got = v5_until(c, PATIENCE, |g| {
        g.iter()
            .any(|p| v5_topic(p) == "chat/room" && seq_of(&p.payload) == seq)
    })
    .await;
    got.iter()
        .filter(|p| v5_topic(p) == "chat/room")
        .map(|p| json_of(&p.payload))
        .collect()
}

async fn history(b: &Broker, user: &str) -> Vec<Value> {
    let r = api(b, user)
        .get("/v1/conversations/room/messages?after=0")
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    r.json()["messages"].as_array().expect("messages").clone()
}

fn at(history: &[Value], seq: u64) -> &Value {
    history
        .iter()
        .find(|m| m["seq"] == seq)
        .unwrap_or_else(|| panic!("no seq {seq} in {history:?}"))
}

async fn edit_via_http(b: &Broker, user: &str, seq: u64, body: Value) -> Response {
    api(b, user)
        .request(
            "PATCH",
            &format!("/v1/conversations/room/messages/{seq}"),
            Some(json!({ "body": body }).to_string().as_bytes()),
        )
        .await
}

async fn delete_via_http(b: &Broker, user: &str, seq: u64) -> Response {
    api(b, user)
        .delete(&format!("/v1/conversations/room/messages/{seq}"))
        .await
}

/// Alice edits her message over MQTT: Bob and Carol each get the edit as
/// seq 2 naming seq 1, with the new text; history shows seq 1 with the
/// new text and `edited`, then the edit record itself. Editing to the same
/// text again changes nothing.
#[tokio::test]
async fn an_edit_reaches_every_member_and_history_shows_the_new_text() {
    let b = Broker::start(&config());
    let mut alice = member(&b, "alice").await;
    create_group(&mut alice, "room", &["bob", "carol"]).await;
    alice.subscribe("chat/room", v5::QoS::AtLeastOnce).await;
    let mut bob = member(&b, "bob").await;
    let mut carol = member(&b, "carol").await;
    let seq = send(&mut alice, "m1", "helo").await;
    assert_eq!(seq, 1);

    let (reply, _) = v5_rpc(
        &mut alice,
        "message.edit",
        "e1",
        json!({"conv": "room", "seq": 1, "body": {"text": "hello"}}),
    )
    .await;
    assert_eq!(reply["ok"], true, "{reply}");
    assert_eq!(reply["result"]["event_seq"], 2, "{reply}");

    for (who, c) in [("bob", &mut bob), ("carol", &mut carol)] {
        let got = chat_until_seq(c, 2).await;
        let seqs: Vec<u64> = got.iter().filter_map(|m| m["seq"].as_u64()).collect();
        assert_dense(&seqs, 2, who);
        let edit = &got[1];
        assert_eq!(edit["type"], "message.edit", "{who}: {edit}");
        assert_eq!(edit["target"], 1, "{edit}");
        assert_eq!(edit["from"], "alice", "{edit}");
        assert_eq!(edit["body"]["text"], "hello", "{edit}");
    }

    let h = history(&b, "carol").await;
    assert_eq!(h.len(), 2, "{h:?}");
    let m1 = at(&h, 1);
    assert_eq!(m1["body"]["text"], "hello", "{m1}");
    assert_eq!(m1["edited"]["seq"], 2, "{m1}");
    assert_eq!(m1["edited"]["by"], "alice", "{m1}");
    assert_eq!(at(&h, 2)["type"], "message.edit");

    // The same text again (a retry): nothing new.
    let r = edit_via_http(&b, "alice", 1, json!({"text": "hello"})).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["event_seq"], 2, "{}", r.text());
    assert_eq!(history(&b, "bob").await.len(), 2);
    bob.no_publish(Duration::from_millis(300)).await;

    // A change record is not a message: it cannot be edited, and a client
    // cannot publish one.
    let r = edit_via_http(&b, "alice", 2, json!("x")).await;
    assert_eq!((r.status, r.error_code()), (409, "not_editable".into()));
    let forged = json!({"id": "f1", "type": "message.delete", "target": 1, "body": null});
    let ack = alice
        .publish_acked(
            "chat/room",
            v5::QoS::AtLeastOnce,
            false,
            forged.to_string().as_bytes(),
        )
        .await;
    assert!(
        matches!(ack, Some(v5::Packet::PubAck(ref a)) if a.reason != v5::PubAckReason::Success),
        "a forged change record was accepted: {ack:?}"
    );
    assert_eq!(history(&b, "bob").await.len(), 2, "nothing was appended");
}

/// Bob (a member, not the sender, not the owner) may neither edit nor
/// delete Carol's message; Alice, the owner, may delete it. A retried
/// delete answers the same change and appends nothing.
#[tokio::test]
async fn only_the_sender_or_the_owner_may_change_a_message() {
    let b = Broker::start(&config());
    let mut alice = member(&b, "alice").await;
    create_group(&mut alice, "room", &["bob", "carol"]).await;
    let mut carol = member(&b, "carol").await;
    let seq = send(&mut carol, "c1", "carol's words").await;

    let r = delete_via_http(&b, "bob", seq).await;
    assert_eq!(
        (r.status, r.error_code()),
        (403, "forbidden".into()),
        "{}",
        r.text()
    );
    let r = edit_via_http(&b, "bob", seq, json!("bob's words")).await;
    assert_eq!(
        (r.status, r.error_code()),
        (403, "forbidden".into()),
        "{}",
        r.text()
    );
    let mut bob = member(&b, "bob").await;
    let (reply, _) = v5_rpc(
        &mut bob,
        "message.delete",
        "d1",
        json!({"conv": "room", "seq": seq}),
    )
    .await;
    assert_eq!(reply["ok"], false, "{reply}");
    assert_eq!(reply["error"]["code"], "forbidden", "{reply}");
    let h = history(&b, "bob").await;
    assert_eq!(h.len(), 1);
    assert_eq!(at(&h, seq)["body"]["text"], "carol's words");

    // An outsider is not even a member.
    let r = delete_via_http(&b, "mallory", seq).await;
    assert_eq!(r.status, 403, "{}", r.text());

    let r = delete_via_http(&b, "alice", seq).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["event_seq"], 2);
    let r = delete_via_http(&b, "alice", seq).await;
    assert_eq!(r.status, 200, "a retried delete is fine: {}", r.text());
    assert_eq!(r.json()["event_seq"], 2, "the same change");
    let h = history(&b, "carol").await;
    assert_eq!(h.len(), 2, "{h:?}");
    let m = at(&h, seq);
    assert_eq!(m["body"], Value::Null, "{m}");
    assert_eq!(m["deleted"]["by"], "alice", "{m}");
    assert_eq!(at(&h, 2)["type"], "message.delete");
    assert_eq!(at(&h, 2)["target"], seq);
    let r = edit_via_http(&b, "carol", seq, json!("back")).await;
    assert_eq!((r.status, r.error_code()), (409, "deleted".into()));
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

/// Carol sends a secret, edits it to another, and deletes it. Before the
/// delete both texts are in the data directory (the write-ahead log and
/// table files); once the DELETE answers, no file there holds either, and
/// they do not come back after a restart.
#[tokio::test]
async fn a_deleted_text_is_gone_from_the_data_directory() {
    let mut b = Broker::start(&config());
    let mut alice = member(&b, "alice").await;
    create_group(&mut alice, "room", &["carol"]).await;
    let mut carol = member(&b, "carol").await;
    let first = "first-secret-Zq8vW3kP";
    let second = "second-secret-Hn5xR2tJ";
    let seq = send(&mut carol, "s1", first).await;
    send(&mut carol, "other", "an ordinary message").await;
    let r = edit_via_http(&b, "carol", seq, json!({"text": second})).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let dir = b.data_dir();
    assert!(
        !files_holding(&dir, first.as_bytes()).is_empty(),
        "the check cannot see stored text"
    );
    assert!(!files_holding(&dir, second.as_bytes()).is_empty());

    let r = delete_via_http(&b, "carol", seq).await;
    assert_eq!(r.status, 200, "{}", r.text());
    for secret in [first, second] {
        let found = files_holding(&dir, secret.as_bytes());
        assert!(found.is_empty(), "{secret} is still in {found:?}");
    }
    b.restart();
    for secret in [first, second] {
        let found = files_holding(&dir, secret.as_bytes());
        assert!(found.is_empty(), "{secret} is back in {found:?}");
    }
    let h = history(&b, "alice").await;
    assert_eq!(at(&h, seq)["body"], Value::Null);
    assert_eq!(at(&h, 2)["body"]["text"], "an ordinary message");
    let edit = at(&h, 3);
    assert_eq!(edit["type"], "message.edit");
    assert_eq!(
        edit["body"],
        Value::Null,
        "the edit's text went too: {edit}"
    );
    assert_eq!(at(&h, 4)["type"], "message.delete");
}

/// Bob's persistent session is offline while Alice sends two messages,
/// edits the first and deletes the second, then sends a third. Coming
/// back, Bob gets seqs 1..=5 once each in order: the messages (as they
/// are now), the edit naming 1, the delete naming 2, the third message.
#[tokio::test]
async fn a_member_back_from_offline_gets_the_changes_in_seq_order() {
    let b = Broker::start(&config());
    let mut alice = member(&b, "alice").await;
    create_group(&mut alice, "room", &["bob"]).await;
    alice.subscribe("chat/room", v5::QoS::AtLeastOnce).await;
    let opts = |b: &Broker| v5_options(b.addr, "bob-phone", "bob", true);
    let mut bob = v5_login(opts(&b)).await;
    bob.subscribe("chat/room", v5::QoS::AtLeastOnce).await;
    bob.disconnect().await;

    send(&mut alice, "m1", "one").await;
    send(&mut alice, "m2", "two").await;
    let r = edit_via_http(&b, "alice", 1, json!({"text": "one, edited"})).await;
    assert_eq!(r.json()["event_seq"], 3, "{}", r.text());
    let r = delete_via_http(&b, "alice", 2).await;
    assert_eq!(r.json()["event_seq"], 4, "{}", r.text());
    send(&mut alice, "m3", "three").await;

    let mut bob = v5_login(opts(&b)).await;
    let got = chat_until_seq(&mut bob, 5).await;
    let mut seqs: Vec<u64> = Vec::new();
    for m in &got {
        let s = m["seq"].as_u64().expect("seq");
        if !seqs.contains(&s) {
            seqs.push(s);
        }
    }
    assert_dense(&seqs, 5, "bob");
    let by_seq = |s: u64| got.iter().find(|m| m["seq"] == s).expect("seq");
    assert_eq!(by_seq(3)["type"], "message.edit");
    assert_eq!(by_seq(3)["target"], 1);
    assert_eq!(by_seq(3)["body"]["text"], "one, edited");
    assert_eq!(by_seq(4)["type"], "message.delete");
    assert_eq!(by_seq(4)["target"], 2);
    assert_eq!(by_seq(2)["body"], Value::Null, "the log holds no old text");
    assert_eq!(by_seq(5)["body"]["text"], "three");
    bob.no_publish(Duration::from_millis(300)).await;
}
