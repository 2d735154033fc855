//! Chat stories about coming back (DESIGN §3 step 9): a persistent
//! session keeps a cursor per conversation; after a disconnect or a broker
//! crash it gets everything after its cursor, in order, then live messages,
//! with no gap and no duplicate at the seam.
//!
//! Chat deliveries are at most QoS 1: a message the client never
//! acknowledged may come again, marked DUP [MQTT-3.3.1-1] [MQTT-4.4.0-1];
//! a client recognises it by (conv, seq). Anything else arriving twice is a
//! duplicate.

use std::time::Duration;

use chatmq_tests::chat::*;
use chatmq_tests::{v4, v5, Broker, PATIENCE};
use serde_json::Value;

const QUIET: Duration = Duration::from_millis(500);
const DM: &str = "dm:alice:bob";

/// What a chat app keeps of a delivery: the seq, and whether the broker
/// marked it as a redelivery.
#[derive(Debug, Clone, Copy)]
struct Seen {
    seq: u64,
    dup: bool,
}

fn seen_v4(p: &v4::Publish) -> Seen {
    Seen {
        seq: seq_of(&p.payload),
        dup: p.dup,
    }
}

fn seen_v5(p: &v5::Publish) -> Seen {
    Seen {
        seq: seq_of(&p.payload),
        dup: p.dup,
    }
}

/// Drops redeliveries (DUP) of seqs already seen, as a client does, and
/// asserts the rest is exactly 1..=n.
fn assert_exactly_once(seen: &[Seen], n: u64, who: &str) {
    let mut kept = Vec::new();
    for s in seen {
        if s.dup && kept.contains(&s.seq) {
            continue;
        }
        kept.push(s.seq);
    }
    assert_dense(&kept, n, who);
}

/// Checks a delivered DM from alice: conv, seq, sender, id and body.
fn assert_from_alice(v: &Value, seq: u64) {
    assert_eq!(v["conv"], DM, "{v}");
    assert_eq!(v["seq"], seq, "{v}");
    assert_eq!(v["from"], "alice", "{v}");
    assert_eq!(v["id"], format!("m{seq}"), "{v}");
    assert_eq!(v["body"]["text"], format!("hello {seq}"), "{v}");
    assert_eq!(v["type"], "text", "{v}");
    assert!(v["ts"].as_u64().is_some_and(|ts| ts > 0), "{v}");
}

/// alice (MQTT 5) sends `from..=to` to bob, each acknowledged (on disk).
async fn alice_sends(b: &Broker, from: u64, to: u64) {
    let mut alice = v5_login(v5_options(b.addr, "alice", "alice", false)).await;
    for i in from..=to {
        let ack = alice
            .publish_acked(
                &format!("chat/{DM}"),
                v5::QoS::AtLeastOnce,
                false,
                &envelope(&format!("m{i}"), &format!("hello {i}")),
            )
            .await;
        match ack {
            Some(v5::Packet::PubAck(a)) => assert_eq!(a.reason, v5::PubAckReason::Success),
            other => panic!("message {i}: {other:?}"),
        }
    }
    alice.disconnect().await;
}

/// Story 1 (3.1.1, wildcard): bob's phone follows all his conversations
/// with `chat/+` and is offline; alice writes him five messages; the
/// broker is killed; bob comes back and gets all five once, in order, then
/// a sixth live.
#[tokio::test]
async fn dms_sent_while_bob_is_offline_survive_kill9_wildcard_v4() {
    let mut b = Broker::start(&config(""));
    let opts = |b: &Broker| v4_options(b.addr, "bob-phone", "bob", true);
    let mut bob = v4_login(opts(&b)).await;
    let ack = bob.subscribe("chat/+", v4::QoS::AtLeastOnce).await;
    assert_eq!(
        ack.return_codes,
        [v4::SubscribeReasonCode::Success(v4::QoS::AtLeastOnce)]
    );
    bob.disconnect().await;

    alice_sends(&b, 1, 5).await;
    b.kill9();
    b.restart();

    let mut bob = v4_login(opts(&b)).await;
    assert!(
        bob.connack.session_present,
        "[MQTT-3.2.2-2] the session survived the crash"
    );
    let got = v4_until(&mut bob, PATIENCE, |g| g.len() >= 5).await;
    for (i, p) in got.iter().enumerate() {
        assert_eq!(p.topic, format!("chat/{DM}"));
        assert_from_alice(&json_of(&p.payload), i as u64 + 1);
    }
    assert_eq!(got.len(), 5, "{got:?}");

    alice_sends(&b, 6, 6).await;
    let mut rest = v4_until(&mut bob, PATIENCE, |g| !g.is_empty()).await;
    rest.extend(bob.publishes_for(QUIET).await);
    assert_eq!(rest.len(), 1, "only the live sixth: {rest:?}");
    assert_from_alice(&json_of(&rest[0].payload), 6);
}

/// Story 1 (MQTT 5, the conversation named): the same with bob's laptop
/// subscribed to `chat/dm:alice:bob` before the conversation had a message.
#[tokio::test]
async fn dms_sent_while_bob_is_offline_survive_kill9_named_v5() {
    let mut b = Broker::start(&config(""));
    let opts = |b: &Broker| v5_options(b.addr, "bob-laptop", "bob", true);
    let mut bob = v5_login(opts(&b)).await;
    let ack = bob
        .subscribe(&format!("chat/{DM}"), v5::QoS::AtLeastOnce)
        .await;
    assert_eq!(
        ack.return_codes,
        [v5::SubscribeReasonCode::Success(v5::QoS::AtLeastOnce)]
    );
    bob.disconnect().await;

    alice_sends(&b, 1, 5).await;
    b.kill9();
    b.restart();

    let mut bob = v5_login(opts(&b)).await;
    assert!(
        bob.connack.session_present,
        "[MQTT-3.2.2-2] the session survived the crash"
    );
    let got = v5_until(&mut bob, PATIENCE, |g| g.len() >= 5).await;
    for (i, p) in got.iter().enumerate() {
        assert_eq!(v5_topic(p), format!("chat/{DM}"));
        assert_eq!(p.qos, v5::QoS::AtLeastOnce);
        assert_from_alice(&json_of(&p.payload), i as u64 + 1);
    }
    assert_eq!(got.len(), 5, "{got:?}");

    alice_sends(&b, 6, 6).await;
    let mut rest = v5_until(&mut bob, PATIENCE, |g| !g.is_empty()).await;
    rest.extend(bob.publishes_for(QUIET).await);
    assert_eq!(rest.len(), 1, "only the live sixth: {rest:?}");
    assert_from_alice(&json_of(&rest[0].payload), 6);
}

/// Story 1, a second time offline: the cursor bob acknowledged before the
/// crash is where he resumes, so he gets 6..=8, not 1..=8.
#[tokio::test]
async fn a_second_absence_resumes_from_the_acknowledged_cursor() {
    let mut b = Broker::start(&config(""));
    let opts = |b: &Broker| v4_options(b.addr, "bob-phone", "bob", true);
    let mut bob = v4_login(opts(&b)).await;
    bob.subscribe(&format!("chat/{DM}"), v4::QoS::AtLeastOnce)
        .await;
    alice_sends(&b, 1, 5).await;
    let got = v4_until(&mut bob, PATIENCE, |g| g.len() >= 5).await;
    assert_eq!(
        got.iter().map(|p| seq_of(&p.payload)).collect::<Vec<_>>(),
        [1, 2, 3, 4, 5]
    );
    bob.disconnect().await;

    alice_sends(&b, 6, 8).await;
    b.kill9();
    b.restart();
    let mut bob = v4_login(opts(&b)).await;
    let mut got = v4_until(&mut bob, PATIENCE, |g| g.len() >= 3).await;
    got.extend(bob.publishes_for(QUIET).await);
    let seqs: Vec<u64> = got.iter().map(|p| seq_of(&p.payload)).collect();
    assert_eq!(seqs, [6, 7, 8]);
}

/// alice (3.1.1) writes `n` messages to `conv`, one every few ms, each
/// acknowledged before the next.
async fn keep_talking_v4(mut alice: v4::Client, conv: &'static str, n: u64) {
    for i in 1..=n {
        alice
            .publish_acked(
                &format!("chat/{conv}"),
                v4::QoS::AtLeastOnce,
                false,
                &envelope(&format!("m{i}"), "..."),
            )
            .await;
        tokio::time::sleep(Duration::from_millis(3)).await;
    }
    alice.disconnect().await;
}

/// The same from an MQTT 5 client.
async fn keep_talking_v5(mut alice: v5::Client, conv: &'static str, n: u64) {
    for i in 1..=n {
        alice
            .publish_acked(
                &format!("chat/{conv}"),
                v5::QoS::AtLeastOnce,
                false,
                &envelope(&format!("m{i}"), "..."),
            )
            .await;
        tokio::time::sleep(Duration::from_millis(3)).await;
    }
    alice.disconnect().await;
}

const TALK: u64 = 200;

/// Story 4 (MQTT 5): bob's laptop goes away and comes back three times
/// while alice keeps writing; what he got adds up to 1..=N once each.
#[tokio::test]
async fn resuming_while_alice_keeps_talking_loses_and_repeats_nothing_v5() {
    let b = Broker::start(&config(""));
    let opts = || v5_options(b.addr, "bob-laptop", "bob", true);
    let mut bob = v5_login(opts()).await;
    bob.subscribe(&format!("chat/{DM}"), v5::QoS::AtLeastOnce)
        .await;
    let talker = tokio::spawn(keep_talking_v4(v4_user(&b, "alice").await, DM, TALK));

    let mut seen = Vec::new();
    for round in 1..=3 {
        let got = v5_until(&mut bob, PATIENCE, |g| g.len() >= 15).await;
        seen.extend(got.iter().map(seen_v5));
        // A clean DISCONNECT; whatever arrives while closing still counts.
        let _ = bob.client.disconnect().await;
        seen.extend(bob.publishes_for(PATIENCE).await.iter().map(seen_v5));
        tokio::time::sleep(Duration::from_millis(20)).await;
        bob = v5_login(opts()).await;
        assert!(bob.connack.session_present, "round {round}");
    }
    talker.await.expect("alice");
    let last = |s: &[Seen]| s.iter().any(|s| s.seq == TALK);
    if !last(&seen) {
        let got = v5_until(&mut bob, PATIENCE, |g| {
            g.iter().any(|p| seq_of(&p.payload) == TALK)
        })
        .await;
        seen.extend(got.iter().map(seen_v5));
    }
    seen.extend(bob.publishes_for(QUIET).await.iter().map(seen_v5));
    assert_exactly_once(&seen, TALK, "bob");
}

/// Story 4 (3.1.1, a group, `chat/+`): the same, with bob's phone
/// dropping the connection without DISCONNECT.
#[tokio::test]
async fn resuming_while_a_group_keeps_talking_loses_and_repeats_nothing_v4() {
    let b = Broker::start(&config(""));
    let mut alice = v5_with_events(&b, "alice").await;
    create_group(&mut alice, "team", &["bob"]).await;
    let opts = || v4_options(b.addr, "bob-phone", "bob", true);
    let mut bob = v4_login(opts()).await;
    bob.subscribe("chat/+", v4::QoS::AtLeastOnce).await;
    let talker = tokio::spawn(keep_talking_v5(alice, "team", TALK));

    let mut seen = Vec::new();
    for round in 1..=3 {
        let got = v4_until(&mut bob, PATIENCE, |g| g.len() >= 15).await;
        seen.extend(got.iter().map(seen_v4));
        if round == 2 {
            // The phone loses its network: no DISCONNECT, acks may be lost.
            bob.drop_connection();
        } else {
            let _ = bob.client.disconnect().await;
            seen.extend(bob.publishes_for(PATIENCE).await.iter().map(seen_v4));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
        bob = v4_login(opts()).await;
        assert!(bob.connack.session_present, "round {round}");
    }
    talker.await.expect("alice");
    let last = |s: &[Seen]| s.iter().any(|s| s.seq == TALK);
    if !last(&seen) {
        let got = v4_until(&mut bob, PATIENCE, |g| {
            g.iter().any(|p| seq_of(&p.payload) == TALK)
        })
        .await;
        seen.extend(got.iter().map(seen_v4));
    }
    seen.extend(bob.publishes_for(QUIET).await.iter().map(seen_v4));
    // After a dropped connection, what bob received but had not acked may
    // come again (DUP); nothing may be missing and nothing else repeated.
    assert_exactly_once(&seen, TALK, "bob");
}

/// Story 4, the seam made deterministic: bob's laptop received 1..=5 but
/// acknowledged only 1..=3 when it disconnected. Coming back it gets 4 and
/// 5 again (DUP, the same packet ids may be reused [MQTT-4.4.0-1]), then
/// 6 and 7, each once.
#[tokio::test]
async fn unacknowledged_messages_come_back_once_marked_dup() {
    let b = Broker::start(&config(""));
    let mut o = v5_options(b.addr, "bob-laptop", "bob", true);
    o.set_manual_acks(true);
    let mut bob = v5_login(o).await;
    bob.subscribe(&format!("chat/{DM}"), v5::QoS::AtLeastOnce)
        .await;
    alice_sends(&b, 1, 5).await;
    let got = v5_until(&mut bob, PATIENCE, |g| g.len() >= 5).await;
    assert_eq!(
        got.iter().map(|p| seq_of(&p.payload)).collect::<Vec<_>>(),
        [1, 2, 3, 4, 5]
    );
    for p in &got[..3] {
        bob.client.ack(p).await.expect("ack");
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    bob.disconnect().await;

    alice_sends(&b, 6, 7).await;
    let mut bob = v5_login(v5_options(b.addr, "bob-laptop", "bob", true)).await;
    assert!(bob.connack.session_present);
    let mut got = v5_until(&mut bob, PATIENCE, |g| g.len() >= 4).await;
    got.extend(bob.publishes_for(QUIET).await);
    let seen: Vec<(u64, bool)> = got.iter().map(|p| (seq_of(&p.payload), p.dup)).collect();
    assert_eq!(seen, [(4, true), (5, true), (6, false), (7, false)]);
}

/// A long absence: bob missed more messages than `max_offline_messages`,
/// which bounds plain MQTT topics only (DESIGN §4): chat messages are in
/// the log, so he still gets every one, once, in order.
#[tokio::test]
async fn a_long_absence_replays_more_than_the_offline_queue_limit() {
    let b = Broker::start(&config("[mqtt]\nmax_offline_messages = 10\n"));
    let opts = |b: &Broker| v5_options(b.addr, "bob-laptop", "bob", true);
    let mut bob = v5_login(opts(&b)).await;
    bob.subscribe(&format!("chat/{DM}"), v5::QoS::AtLeastOnce)
        .await;
    bob.disconnect().await;

    alice_sends(&b, 1, 40).await;
    let mut bob = v5_login(opts(&b)).await;
    let mut got = v5_until(&mut bob, PATIENCE, |g| g.len() >= 40).await;
    alice_sends(&b, 41, 41).await;
    got.extend(v5_until(&mut bob, PATIENCE, |g| !g.is_empty()).await);
    got.extend(bob.publishes_for(QUIET).await);
    let seqs: Vec<u64> = got.iter().map(|p| seq_of(&p.payload)).collect();
    assert_dense(&seqs, 41, "bob");
}

/// The start of the seam: bob's devices subscribe one after another while
/// alice is writing. Each gets a contiguous run of seqs that includes
/// every message alice started sending after that device's SUBACK (the
/// subscription is in force once acknowledged).
#[tokio::test]
async fn subscribing_to_a_busy_conversation_misses_nothing_sent_after_the_suback() {
    use std::sync::{Arc, Mutex};
    use tokio::time::Instant;

    let b = Broker::start(&config(""));
    let mut alice = v4_user(&b, "alice").await;
    let started: Arc<Mutex<Vec<Instant>>> = Arc::default();
    let log = started.clone();
    let talker = tokio::spawn(async move {
        for i in 1..=5000u64 {
            log.lock().expect("log").push(Instant::now());
            alice
                .publish_acked(
                    &format!("chat/{DM}"),
                    v4::QoS::AtLeastOnce,
                    false,
                    &envelope(&format!("m{i}"), "..."),
                )
                .await;
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    });

    for round in 0..16 {
        let id = format!("bob-{round}");
        let persistent = round % 2 == 0;
        let mut bob = v5_login(v5_options(b.addr, &id, "bob", persistent)).await;
        bob.subscribe(&format!("chat/{DM}"), v5::QoS::AtLeastOnce)
            .await;
        let subacked = Instant::now();
        let got = v5_until(&mut bob, PATIENCE, |g| g.len() >= 8).await;
        let seqs: Vec<u64> = got.iter().map(|p| seq_of(&p.payload)).collect();
        // The first message whose PUBLISH alice began after the SUBACK.
        let owed = started
            .lock()
            .expect("log")
            .iter()
            .position(|t| *t > subacked)
            .map(|i| i as u64 + 1)
            .expect("alice kept talking");
        assert!(
            seqs.windows(2).all(|w| w[1] == w[0] + 1),
            "{id}: a contiguous run: {seqs:?}"
        );
        assert!(
            seqs[0] <= owed,
            "{id}: seq {owed} was sent after the SUBACK, but the first delivered is {seqs:?}"
        );
        bob.disconnect().await;
    }
    talker.abort();
}

/// A very long absence: bob missed more messages than a replay keeps
/// waiting in his session at once (the replay window, 1024). The replay
/// pauses, goes on as he acknowledges, and he still gets every message
/// once, in order, then the next live one.
#[tokio::test]
async fn a_backlog_larger_than_the_replay_window_arrives_whole_and_in_order() {
    let b = Broker::start(&config("[storage]\nsync = \"never\"\n"));
    let opts = |b: &Broker| v5_options(b.addr, "bob-laptop", "bob", true);
    let mut bob = v5_login(opts(&b)).await;
    bob.subscribe(&format!("chat/{DM}"), v5::QoS::AtLeastOnce)
        .await;
    bob.disconnect().await;

    alice_sends(&b, 1, 2500).await;
    let mut bob = v5_login(opts(&b)).await;
    let mut got = v5_until(&mut bob, Duration::from_secs(60), |g| g.len() >= 2500).await;
    alice_sends(&b, 2501, 2501).await;
    got.extend(v5_until(&mut bob, PATIENCE, |g| !g.is_empty()).await);
    got.extend(bob.publishes_for(QUIET).await);
    let seqs: Vec<u64> = got.iter().map(|p| seq_of(&p.payload)).collect();
    assert_dense(&seqs, 2501, "bob");
}

/// Issue #11: cursors are written once per 32 acknowledgements (and when
/// the connection ends), not per message. bob acknowledges five messages
/// and the broker is killed while he is still connected, before his cursor
/// was written: after the restart he may get those five again, but each
/// marked DUP, so his app drops them by (conv, seq); the sixth comes once.
#[tokio::test]
async fn acked_messages_replayed_after_a_crash_come_marked_dup() {
    let mut b = Broker::start(&config(""));
    let opts = |b: &Broker| v5_options(b.addr, "bob-laptop", "bob", true);
    let mut bob = v5_login(opts(&b)).await;
    bob.subscribe(&format!("chat/{DM}"), v5::QoS::AtLeastOnce)
        .await;
    alice_sends(&b, 1, 5).await;
    let first = v5_until(&mut bob, PATIENCE, |g| g.len() >= 5).await;
    let mut seen: Vec<Seen> = first.iter().map(seen_v5).collect();
    assert!(seen.iter().all(|s| !s.dup), "first deliveries: {seen:?}");
    // His PUBACKs reach the broker; then it dies with him connected.
    seen.extend(bob.publishes_for(QUIET).await.iter().map(seen_v5));
    b.kill9();
    drop(bob);
    b.restart();

    let mut bob = v5_login(opts(&b)).await;
    assert!(bob.connack.session_present);
    let again: Vec<Seen> = bob.publishes_for(QUIET).await.iter().map(seen_v5).collect();
    for s in &again {
        assert!(
            s.seq <= 5 && s.dup,
            "a replay of an acked seq without DUP: {again:?}"
        );
    }
    // Five acks are fewer than a cursor write needs: all five come again.
    assert_eq!(again.len(), 5, "{again:?}");
    seen.extend(again);
    alice_sends(&b, 6, 6).await;
    let live = v5_until(&mut bob, PATIENCE, |g| !g.is_empty()).await;
    seen.extend(live.iter().map(seen_v5));
    seen.extend(bob.publishes_for(QUIET).await.iter().map(seen_v5));
    assert_exactly_once(&seen, 6, "bob");
}
