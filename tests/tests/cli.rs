//! The terminal client `chatmq-cli` (mobile-demo/cli) told as a user
//! would tell it: alice chats from the CLI, bob from an MQTT 5 phone; the
//! broker crashes while alice types; the CLI reconnects on its own, sends
//! what waited in its outbox, and both see every message once, in order.
//! Stopped and started again, the CLI shows only what is new.
//!
//! The CLI runs with `--json` and is read through its events (connected,
//! disconnected, message, sent, acked); its state file is read as JSON.

use std::collections::HashSet;
use std::path::Path;
use std::time::Duration;

use chatmq_tests::chat::*;
use chatmq_tests::cli::{state_of, subscribed, Cli};
use chatmq_tests::tls::TestPki;
use chatmq_tests::{v5, Broker, PATIENCE};
use serde_json::Value;

const DM: &str = "dm:alice:bob";
const QUIET: Duration = Duration::from_millis(700);

/// The bodies waiting in the state file's outbox.
fn outbox_bodies(path: &Path) -> Vec<String> {
    state_of(path)["outbox"]
        .as_array()
        .expect("an outbox")
        .iter()
        .map(|p| p["body"].as_str().expect("a text body").to_string())
        .collect()
}

/// What bob's phone keeps of a delivery: seq, sender, text body; a
/// redelivery (DUP) of a seq already kept is dropped, as an app does.
fn keep(kept: &mut Vec<(u64, String, String)>, publishes: &[v5::Publish]) {
    for p in publishes {
        let v = json_of(&p.payload);
        assert_eq!(v["conv"], DM, "{v}");
        let seq = seq_of(&p.payload);
        if p.dup && kept.iter().any(|(s, _, _)| *s == seq) {
            continue;
        }
        let body = v["body"]
            .as_str()
            .map(str::to_string)
            .unwrap_or_else(|| v["body"].to_string());
        kept.push((
            seq,
            v["from"].as_str().unwrap_or_default().to_string(),
            body,
        ));
    }
}

/// The message events the CLI printed, as (conv, seq).
fn shown(cli: &Cli) -> Vec<(String, u64)> {
    cli.logged("message")
        .iter()
        .map(|e| {
            (
                e["conv"].as_str().unwrap_or_default().to_string(),
                e["seq"].as_u64().unwrap_or(0),
            )
        })
        .collect()
}

/// (seq, envelope id) of every message the CLI showed from `from`
/// (anyone when `None`), in the order shown.
fn seq_ids(cli: &Cli, from: Option<&str>) -> Vec<(u64, String)> {
    cli.logged("message")
        .iter()
        .filter(|e| from.is_none_or(|f| e["from"] == f))
        .map(|e| {
            (
                e["seq"].as_u64().unwrap_or(0),
                e["id"].as_str().unwrap_or_default().to_string(),
            )
        })
        .collect()
}

fn assert_shown_once(cli: &Cli) {
    let all = shown(cli);
    let unique: HashSet<&(String, u64)> = all.iter().collect();
    assert_eq!(
        unique.len(),
        all.len(),
        "a message was shown twice: {all:?}"
    );
}

/// bob sends `texts` to alice, each acknowledged (on disk).
async fn bob_sends(bob: &mut v5::Client, texts: &[&str]) {
    for t in texts {
        let ack = bob
            .publish_acked(
                &format!("chat/{DM}"),
                v5::QoS::AtLeastOnce,
                false,
                &envelope(t, t),
            )
            .await;
        match ack {
            Some(v5::Packet::PubAck(a)) => assert_eq!(a.reason, v5::PubAckReason::Success, "{t}"),
            other => panic!("{t}: {other:?}"),
        }
    }
}

/// The whole story of the issue: a crash mid-stream, an outbox drained
/// after the restart, bob's messages shown once, and a CLI restarted from
/// its state file that shows only what is new.
#[tokio::test]
async fn the_cli_rides_out_a_broker_crash_and_resumes_from_its_state_file() {
    let mut b = Broker::start(&config(""));
    let dir = tempfile::tempdir().expect("temp dir");
    let state = dir.path().join("alice.json");
    let bob_options = |b: &Broker| v5_options(b.addr, "bob-phone", "bob", true);
    let mut bob = v5_login(bob_options(&b)).await;
    bob.subscribe("chat/+", v5::QoS::AtLeastOnce).await;

    let mut alice = Cli::start(b.addr, "alice", &state);
    let connected = alice.next_event("connected").await;
    assert_eq!(
        connected["session_present"], false,
        "a first run: {connected}"
    );
    let client_id = connected["client_id"]
        .as_str()
        .expect("client id")
        .to_string();
    assert_eq!(
        state_of(&state)["client_id"],
        client_id.as_str(),
        "the client id is kept"
    );
    alice.type_line("/dm bob");
    alice.next_event("opened").await;

    // Three messages, each acknowledged.
    for i in 1..=3 {
        alice.type_line(&format!("a{i}"));
    }
    let mut acked = 0;
    alice
        .until(PATIENCE, |e| {
            acked += (e["event"] == "acked") as usize;
            acked == 3
        })
        .await;

    // Three more, and the broker dies while they are on their way.
    for i in 4..=6 {
        alice.type_line(&format!("a{i}"));
    }
    alice.next_event("sent").await;
    b.kill9();
    let mut kept = Vec::new();
    keep(
        &mut kept,
        &bob.publishes_for(Duration::from_millis(100)).await,
    );
    alice.next_event("disconnected").await;

    // alice keeps typing while the broker is down: the outbox holds it.
    for i in 7..=9 {
        alice.type_line(&format!("a{i}"));
    }
    // Each send is in the state file before its `sent` event.
    alice
        .until(PATIENCE, |e| {
            e["event"] == "sent" && outbox_bodies(&state).contains(&"a9".to_string())
        })
        .await;
    let waiting = outbox_bodies(&state);
    for t in ["a7", "a8", "a9"] {
        assert!(
            waiting.contains(&t.to_string()),
            "{t} waits in the outbox: {waiting:?}"
        );
    }
    let acked_ids: HashSet<String> = alice
        .logged("acked")
        .iter()
        .map(|e| e["id"].as_str().unwrap_or_default().to_string())
        .collect();
    let outbox_ids: Vec<String> = state_of(&state)["outbox"]
        .as_array()
        .expect("outbox")
        .iter()
        .map(|p| p["id"].as_str().unwrap_or_default().to_string())
        .collect();
    assert!(
        outbox_ids.iter().all(|id| !acked_ids.contains(id)),
        "only unacknowledged sends wait: {outbox_ids:?} vs acked {acked_ids:?}"
    );

    // The broker comes back; the CLI reconnects by itself and drains.
    b.restart();
    let connected = alice.next_event("connected").await;
    assert_eq!(
        connected["session_present"], true,
        "the session survived: {connected}"
    );
    let sent_ids: HashSet<String> = alice
        .logged("sent")
        .iter()
        .map(|e| e["id"].as_str().unwrap_or_default().to_string())
        .collect();
    assert_eq!(sent_ids.len(), 9, "nine sends: {sent_ids:?}");
    let acked = loop {
        let acked: Vec<String> = alice
            .logged("acked")
            .iter()
            .map(|e| e["id"].as_str().unwrap_or_default().to_string())
            .collect();
        if acked.len() >= sent_ids.len() {
            break acked;
        }
        alice.next_event("acked").await;
    };
    let unique: HashSet<String> = acked.iter().cloned().collect();
    assert_eq!(unique.len(), acked.len(), "each send acked once: {acked:?}");
    assert_eq!(unique, sent_ids, "every send acked");
    assert!(outbox_bodies(&state).is_empty(), "the outbox is drained");
    // Each send got the seq of its place in the conversation.
    let sent_order: Vec<String> = alice
        .logged("sent")
        .iter()
        .map(|e| e["id"].as_str().unwrap_or_default().to_string())
        .collect();
    let seq_of_send: Vec<u64> = sent_order
        .iter()
        .map(|id| {
            let e = alice
                .logged("acked")
                .into_iter()
                .find(|e| e["id"] == id.as_str());
            e.and_then(|e| e["seq"].as_u64())
                .unwrap_or_else(|| panic!("no seq acked for {id}"))
        })
        .collect();
    assert_eq!(seq_of_send, (1..=9).collect::<Vec<u64>>());

    // bob's phone comes back too and has every message once, in order.
    let mut bob = v5_login(bob_options(&b)).await;
    assert!(bob.connack.session_present);
    while kept.len() < 9 {
        let got = v5_until(&mut bob, PATIENCE, |g| !g.is_empty()).await;
        keep(&mut kept, &got);
    }
    keep(&mut kept, &bob.publishes_for(QUIET).await);
    let seqs: Vec<u64> = kept.iter().map(|(s, _, _)| *s).collect();
    assert_dense(&seqs, 9, "bob");
    let texts: Vec<&str> = kept.iter().map(|(_, _, t)| t.as_str()).collect();
    assert_eq!(
        texts,
        ["a1", "a2", "a3", "a4", "a5", "a6", "a7", "a8", "a9"]
    );
    assert!(kept.iter().all(|(_, from, _)| from == "alice"));

    // alice saw her own nine come back, once each, in order.
    while shown(&alice).len() < 9 {
        alice.next_event("message").await;
    }
    assert_eq!(
        shown(&alice).iter().map(|(_, s)| *s).collect::<Vec<_>>(),
        (1..=9).collect::<Vec<_>>()
    );

    // bob writes while alice's CLI runs: shown once each, in order.
    bob_sends(&mut bob, &["b1", "b2", "b3"]).await;
    while shown(&alice).len() < 12 {
        alice.next_event("message").await;
    }
    alice.events_for(QUIET).await;
    let from_bob = seq_ids(&alice, Some("bob"));
    assert_eq!(
        from_bob,
        [(10, "b1".into()), (11, "b2".into()), (12, "b3".into())]
    );
    assert_shown_once(&alice);

    // alice stops; bob writes more; alice starts again from her state file.
    assert!(alice.quit().await.success(), "stderr: {}", alice.stderr());
    assert_eq!(state_of(&state)["last_seq"][DM], 12);
    bob_sends(&mut bob, &["b4", "b5", "b6"]).await;

    let mut alice = Cli::start(b.addr, "alice", &state);
    let connected = alice.next_event("connected").await;
    assert_eq!(
        connected["client_id"],
        client_id.as_str(),
        "the same client id"
    );
    assert_eq!(connected["session_present"], true);
    while shown(&alice).len() < 3 {
        alice.next_event("message").await;
    }
    alice.events_for(QUIET).await;
    let got = seq_ids(&alice, None);
    assert_eq!(
        got,
        [(13, "b4".into()), (14, "b5".into()), (15, "b6".into())],
        "only the new ones"
    );
    assert!(alice.quit().await.success());
}

/// A session the broker no longer has (here another login of alice's took
/// the client id with a clean start) is noticed at CONNACK: the CLI fills
/// each known conversation from history after its stored last seq, shows
/// the missed messages once each, in order, then goes on live.
#[tokio::test]
async fn a_lost_session_is_filled_from_history() {
    let b = Broker::start(&config(""));
    let dir = tempfile::tempdir().expect("temp dir");
    let state = dir.path().join("alice.json");
    let mut bob = v5_user(&b, "bob").await;

    let mut alice = Cli::start(b.addr, "alice", &state);
    alice.next_event("connected").await;
    alice.type_line("/dm bob");
    alice.type_line("hello bob");
    let acked = alice.next_event("acked").await;
    assert_eq!(acked["seq"], 1, "{acked}");
    bob_sends(&mut bob, &["b1"]).await;
    let m = alice
        .until(PATIENCE, |e| e["event"] == "message" && e["from"] == "bob")
        .await;
    assert_eq!(m["seq"], 2, "{m}");
    assert!(alice.quit().await.success());

    let client_id = state_of(&state)["client_id"]
        .as_str()
        .expect("client id")
        .to_string();
    let other = v5_login(v5_options(b.addr, &client_id, "alice", false)).await;
    assert!(!other.connack.session_present);
    other.disconnect().await;
    bob_sends(&mut bob, &["b2", "b3", "b4"]).await;

    let mut alice = Cli::start(b.addr, "alice", &state);
    let connected = alice.next_event("connected").await;
    assert_eq!(
        connected["session_present"], false,
        "the broker lost it: {connected}"
    );
    while shown(&alice).len() < 3 {
        alice.next_event("message").await;
    }
    bob_sends(&mut bob, &["b5"]).await;
    while shown(&alice).len() < 4 {
        alice.next_event("message").await;
    }
    alice.events_for(QUIET).await;
    let got = seq_ids(&alice, None);
    assert_eq!(
        got,
        [
            (3, "b2".into()),
            (4, "b3".into()),
            (5, "b4".into()),
            (6, "b5".into())
        ],
        "the gap from history, then live"
    );
    assert_eq!(state_of(&state)["last_seq"][DM], 6);
}

/// A state file that is not one stops the CLI before it connects, with a
/// line naming the file, and the file is left as it was.
#[tokio::test]
async fn a_corrupt_state_file_is_a_clear_error() {
    let dir = tempfile::tempdir().expect("temp dir");
    let state = dir.path().join("alice.json");
    std::fs::write(&state, "{\"version\": 1, \"user\": \"al").expect("write");
    let nobody = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let mut alice = Cli::start(nobody.local_addr().expect("addr"), "alice", &state);
    let status = alice.wait().await;
    assert!(!status.success());
    let stderr = alice.stderr();
    assert!(stderr.contains(&state.display().to_string()), "{stderr}");
    assert!(stderr.contains("not a chatmq-cli state"), "{stderr}");
    assert_eq!(
        std::fs::read_to_string(&state).expect("read"),
        "{\"version\": 1, \"user\": \"al"
    );
}

/// A login the broker refuses is not retried forever: the CLI says why
/// and exits.
#[tokio::test]
async fn a_refused_login_stops_the_cli() {
    let b = Broker::start(&config(""));
    let dir = tempfile::tempdir().expect("temp dir");
    let mut alice =
        Cli::start_with_password(b.addr, "alice", &dir.path().join("a.json"), "not-a-jwt");
    let status = alice.wait().await;
    assert!(!status.success());
    let stderr = alice.stderr();
    assert!(stderr.contains("refused"), "{stderr}");
    assert!(alice.logged("connected").is_empty());
}

/// The same client over TLS and over secure WebSocket, trusting the test
/// CA given with `--ca`: one session per transport, one conversation.
#[tokio::test]
async fn the_cli_chats_over_tls_and_secure_websocket() {
    let dir = tempfile::tempdir().expect("temp dir");
    let pki = TestPki::new(dir.path());
    let b = Broker::start(&config(&format!(
        "{}\n{}",
        pki.section("mqtt.tls"),
        pki.section("websocket.tls")
    )));
    let mut bob = v5_user(&b, "bob").await;
    bob.subscribe(&format!("chat/{DM}"), v5::QoS::AtLeastOnce)
        .await;
    let ca = pki.ca.display().to_string();
    let servers = [
        format!("mqtts://127.0.0.1:{}", b.listener("mqtt-tls").port()),
        format!(
            "wss://127.0.0.1:{}/mqtt",
            b.listener("websocket-tls").port()
        ),
    ];
    for (seq, server) in (1u64..).zip(&servers) {
        let state = dir.path().join(format!("alice-{seq}.json"));
        let mut alice = Cli::start_at(server, &["--ca", &ca], "alice", &state, &token("alice"));
        alice.next_event("connected").await;
        alice.type_line("/dm bob");
        alice.type_line(&format!("over {server}"));
        let acked = alice.next_event("acked").await;
        assert_eq!(acked["seq"], seq, "{server}: {acked}");
        let got = json_of(&bob.publish().await.payload);
        assert_eq!(
            (got["seq"].as_u64(), got["from"].as_str()),
            (Some(seq), Some("alice"))
        );
        assert!(alice.quit().await.success(), "{server}");
    }
}

/// alice and bob, each on a CLI with the HTTP API, in `dm:alice:bob`.
async fn dm_pair(b: &Broker, dir: &Path) -> (Cli, Cli) {
    let mut clis = Vec::new();
    for (me, other) in [("alice", "bob"), ("bob", "alice")] {
        let state = dir.join(format!("{me}.json"));
        let mut cli = Cli::start_with_http(b, me, &state);
        cli.next_event("connected").await;
        subscribed(&state).await;
        cli.type_line(&format!("/dm {other}"));
        cli.next_event("opened").await;
        clis.push(cli);
    }
    let bob = clis.pop().expect("bob");
    let alice = clis.pop().expect("alice");
    (alice, bob)
}

/// alice types `text`; its seq, once acknowledged.
async fn alice_says(alice: &mut Cli, text: &str) -> u64 {
    alice.type_line(text);
    let acked = alice.next_event("acked").await;
    acked["seq"].as_u64().expect("a seq")
}

/// The next message `cli` shows with seq `seq`.
async fn message_at(cli: &mut Cli, seq: u64) -> Value {
    cli.until(PATIENCE, |e| e["event"] == "message" && e["seq"] == seq)
        .await
}

/// `/history` on `cli`'s open conversation: its messages by seq.
async fn history_of(cli: &mut Cli) -> Vec<Value> {
    cli.type_line("/history");
    let h = cli.next_event("history").await;
    h["messages"].as_array().expect("messages").clone()
}

fn at(history: &[Value], seq: u64) -> &Value {
    history
        .iter()
        .find(|m| m["seq"] == seq)
        .unwrap_or_else(|| panic!("no seq {seq} in {history:?}"))
}

/// alice fixes a typo from her CLI, then deletes the message: bob's CLI
/// shows each change live, naming the message it changes, and his
/// `/history` shows the message as it is now (edited, then deleted, its
/// text gone). bob cannot edit alice's message.
#[tokio::test]
async fn alice_edits_then_deletes_her_message_and_bob_sees_each_change() {
    let b = Broker::start(&config(""));
    let dir = tempfile::tempdir().expect("temp dir");
    let (mut alice, mut bob) = dm_pair(&b, dir.path()).await;
    let seq = alice_says(&mut alice, "see you at 5").await;
    assert_eq!(message_at(&mut bob, seq).await["body"], "see you at 5");

    bob.type_line(&format!("/edit {seq} see you never"));
    let refused = bob.next_event("error").await;
    assert!(
        refused["message"]
            .as_str()
            .unwrap_or("")
            .contains("forbidden"),
        "bob may not edit alice's message: {refused}"
    );

    alice.type_line(&format!("/edit {seq} see you at 6"));
    let edited = alice.next_event("edited").await;
    assert_eq!(
        (edited["seq"].as_u64(), edited["conv"].as_str()),
        (Some(seq), Some(DM))
    );
    let edit_seq = edited["event_seq"].as_u64().expect("event_seq");
    let edit = message_at(&mut bob, edit_seq).await;
    assert_eq!(edit["type"], "message.edit", "{edit}");
    assert_eq!(edit["target"], seq, "{edit}");
    assert_eq!(edit["from"], "alice", "{edit}");
    assert_eq!(edit["body"], "see you at 6", "{edit}");
    let h = history_of(&mut bob).await;
    let m = at(&h, seq);
    assert_eq!(m["body"], "see you at 6", "{m}");
    assert_eq!(m["edited"]["seq"], edit_seq, "{m}");
    assert_eq!(m["edited"]["by"], "alice", "{m}");

    alice.type_line(&format!("/delete {seq}"));
    let deleted = alice.next_event("deleted").await;
    assert_eq!(deleted["seq"], seq, "{deleted}");
    let delete_seq = deleted["event_seq"].as_u64().expect("event_seq");
    let delete = message_at(&mut bob, delete_seq).await;
    assert_eq!(delete["type"], "message.delete", "{delete}");
    assert_eq!(delete["target"], seq, "{delete}");
    let h = history_of(&mut bob).await;
    let m = at(&h, seq);
    assert_eq!(m["body"], Value::Null, "the text is gone: {m}");
    assert_eq!(m["deleted"]["by"], "alice", "{m}");
    let old_edit = at(&h, edit_seq);
    assert_eq!(old_edit["body"], Value::Null, "{old_edit}");
    assert_eq!(old_edit["deleted"], true, "{old_edit}");
    assert!(
        !h.iter().any(|m| m.to_string().contains("see you")),
        "{h:?}"
    );

    // Each change shown once, in the conversation's order.
    bob.events_for(QUIET).await;
    assert_shown_once(&bob);
    assert_eq!(
        shown(&bob).iter().map(|(_, s)| *s).collect::<Vec<_>>(),
        [seq, edit_seq, delete_seq]
    );
}

/// bob reacts to alice's message from his CLI: alice's CLI shows the
/// summary as it comes (counts), her `/history` has it on the message, and
/// when bob takes it back the summary alice gets has no 👍 left.
#[tokio::test]
async fn bob_reacts_and_alice_sees_the_summary() {
    let b = Broker::start(&config(""));
    let dir = tempfile::tempdir().expect("temp dir");
    let (mut alice, mut bob) = dm_pair(&b, dir.path()).await;
    let seq = alice_says(&mut alice, "lunch?").await;
    message_at(&mut bob, seq).await;

    bob.type_line(&format!("/react {seq} 👍"));
    let reacted = bob.next_event("reacted").await;
    assert_eq!(reacted["added"], true, "{reacted}");
    assert_eq!(
        reacted["reactions"]["👍"],
        serde_json::json!({"count": 1, "mine": true}),
        "{reacted}"
    );
    let summary = alice.next_event("reactions").await;
    assert_eq!(
        (summary["conv"].as_str(), summary["seq"].as_u64()),
        (Some(DM), Some(seq))
    );
    assert_eq!(summary["reactions"]["👍"]["count"], 1, "{summary}");
    let h = history_of(&mut alice).await;
    assert_eq!(
        at(&h, seq)["reactions"],
        serde_json::json!({"👍": {"count": 1, "mine": false}})
    );

    bob.type_line(&format!("/unreact {seq} 👍"));
    let taken = bob.next_event("reacted").await;
    assert_eq!(taken["added"], false, "{taken}");
    let summary = alice.next_event("reactions").await;
    assert_eq!(summary["seq"], seq, "{summary}");
    assert_eq!(summary["reactions"], serde_json::json!({}), "no 👍 left");
    let h = history_of(&mut alice).await;
    assert!(at(&h, seq).get("reactions").is_none(), "{h:?}");
}

/// alice sends a picture from her CLI (`/attach`): bob's CLI shows the
/// message with the attachment's id, `/download` saves the very same
/// bytes; carol, in no conversation with alice, gets `not_found` and no
/// file.
#[tokio::test]
async fn alice_attaches_a_file_bob_downloads_it_and_a_stranger_cannot() {
    let b = Broker::start(&config(""));
    let dir = tempfile::tempdir().expect("temp dir");
    let (mut alice, mut bob) = dm_pair(&b, dir.path()).await;
    // A PNG's signature (the broker checks the first bytes), then every
    // byte value, twice.
    let mut picture = b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR".to_vec();
    picture.extend((0..=255u8).chain(0..=255u8));
    let file = dir.path().join("cat.png");
    std::fs::write(&file, &picture).expect("write the picture");

    alice.type_line(&format!("/attach {} look at this", file.display()));
    let uploaded = alice.next_event("uploaded").await;
    let id = uploaded["id"].as_str().expect("an id").to_string();
    assert_eq!(uploaded["size"], picture.len(), "{uploaded}");
    assert_eq!(uploaded["content_type"], "image/png", "{uploaded}");
    let seq = alice.next_event("acked").await["seq"]
        .as_u64()
        .expect("seq");

    let m = message_at(&mut bob, seq).await;
    assert_eq!(m["body"]["text"], "look at this", "{m}");
    assert_eq!(m["body"]["attachments"][0]["id"], id.as_str(), "{m}");
    assert_eq!(m["body"]["attachments"][0]["name"], "cat.png", "{m}");
    let saved = dir.path().join("bob-got.png");
    bob.type_line(&format!("/download {id} {}", saved.display()));
    let downloaded = bob.next_event("downloaded").await;
    assert_eq!(downloaded["size"], picture.len(), "{downloaded}");
    assert_eq!(downloaded["content_type"], "image/png", "{downloaded}");
    assert_eq!(
        std::fs::read(&saved).expect("bob's file"),
        picture,
        "byte for byte"
    );

    // Without --http the CLI says what it needs.
    let mut bob_plain = Cli::start(b.addr, "bob", &dir.path().join("bob-plain.json"));
    bob_plain.next_event("connected").await;
    bob_plain.type_line(&format!("/download {id}"));
    let refused = bob_plain.next_event("error").await;
    assert!(
        refused["message"].as_str().unwrap_or("").contains("--http"),
        "{refused}"
    );

    let state = dir.path().join("carol.json");
    let mut carol = Cli::start_with_http(&b, "carol", &state);
    carol.next_event("connected").await;
    let stolen = dir.path().join("carol-got.png");
    carol.type_line(&format!("/download {id} {}", stolen.display()));
    let refused = carol.next_event("error").await;
    assert!(
        refused["message"]
            .as_str()
            .unwrap_or("")
            .contains("not_found"),
        "{refused}"
    );
    assert!(carol.logged("downloaded").is_empty());
    assert!(!stolen.exists(), "carol got no file");
    let names: Vec<String> = std::fs::read_dir(dir.path())
        .expect("list")
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    assert!(!names.iter().any(|n| n.ends_with(".part")), "{names:?}");
}
