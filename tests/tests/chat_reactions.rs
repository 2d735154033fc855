//! Reactions told as user stories (issue #13 item 3): members react to a
//! message by its seq, once per (user, emoji); everyone sees the summary
//! (`{"👍": {"count": 50}}`) coalesced per conversation per
//! `chat.reaction_window_ms`, not one delivery per reaction; history
//! carries each message's summary with the caller's `mine`; reactions
//! survive a restart. Room reactions (`reactions/{conv}`) are live only,
//! throttled like typing.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use chatmq_tests::chat::*;
use chatmq_tests::http::Http;
use chatmq_tests::{v5, Broker};
use futures_util::future::join_all;
use serde_json::{json, Value};

const WINDOW_MS: u64 = 100;
const SETTLE: Duration = Duration::from_millis(6 * WINDOW_MS);
const EMOJI: [&str; 20] = [
    "👍", "❤️", "😂", "😮", "😢", "🎉", "🔥", "👀", "🙏", "💯", "✅", "🚀", "🤔", "👏", "😍", "🥳",
    "😎", "🙌", "💡", "⭐",
];

fn config() -> String {
    chatmq_tests::chat::config(&format!(
        "[chat]\nreaction_window_ms = {WINDOW_MS}\nroom_reaction_interval_ms = 2000\n"
    ))
}

/// `reactions` events of `conv` among `events`.
fn summaries<'a>(events: &'a [Value], conv: &str) -> Vec<&'a Value> {
    events
        .iter()
        .filter(|e| e["type"] == "reactions" && e["conv"] == conv)
        .collect()
}

/// The latest summary of message `seq` the events gave.
fn last_summary(events: &[&Value], seq: u64) -> Value {
    let mut last = Value::Null;
    for e in events {
        for m in e["messages"].as_array().expect("messages") {
            if m["seq"] == seq {
                last = m["reactions"].clone();
            }
        }
    }
    last
}

/// Everything `c` gets until nothing has come for [`SETTLE`].
async fn events_until_quiet(c: &mut v5::Client) -> Vec<Value> {
    let mut got = Vec::new();
    loop {
        let more = c.publishes_for(SETTLE).await;
        if more.is_empty() {
            return got;
        }
        got.extend(v5_events(&more));
    }
}

async fn history(b: &Broker, user: &str, conv: &str) -> Vec<Value> {
    let r = Http::new(b.http_addr)
        .with_token(&token(user))
        .get(&format!("/v1/conversations/{conv}/messages?after=0"))
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    r.json()["messages"].as_array().expect("messages").clone()
}

/// 50 members each react with 20 emoji to one message, all at once: 1,000
/// reactions. Every member ends with the summary "20 emoji, 50 each",
/// got from a bounded number of `reactions` events (about one per window,
/// far fewer than 1,000); history gives the same with `mine`. Reacting
/// twice counts once; taking one back counts down.
#[tokio::test]
async fn a_thousand_reactions_end_in_the_right_summary_with_few_deliveries() {
    let b = Broker::start(&config());
    let names: Vec<String> = (0..50).map(|i| format!("u{i:02}")).collect();
    let mut all: Vec<&str> = names.iter().map(String::as_str).collect();
    all.push("zed");
    let mut owner = v5_with_events(&b, "u00").await;
    create_group(&mut owner, "room", &all).await;
    let r = Http::new(b.http_addr)
        .with_token(&token("zed"))
        .post(
            "/v1/conversations/room/messages",
            &json!({"id": "m1", "body": {"text": "react to me"}}),
        )
        .await;
    assert_eq!(r.json()["seq"], 1, "{}", r.text());
    owner.disconnect().await;
    let mut clients = Vec::new();
    for n in &names {
        clients.push(v5_with_events(&b, n).await);
    }
    let mut zed = v5_with_events(&b, "zed").await;

    let started = Instant::now();
    let runs = clients
        .into_iter()
        .zip(names.iter())
        .map(|(mut c, n)| async move {
            let mut events = Vec::new();
            for (i, e) in EMOJI.iter().enumerate() {
                let (reply, others) = v5_rpc(
                    &mut c,
                    "reaction.add",
                    &format!("{n}-{i}"),
                    json!({"conv": "room", "seq": 1, "emoji": e}),
                )
                .await;
                assert_eq!(reply["ok"], true, "{n} {e}: {reply}");
                assert_eq!(reply["result"]["reactions"][e]["mine"], true, "{reply}");
                events.extend(v5_events(&others));
            }
            (c, events)
        });
    let mut done = join_all(runs).await;
    let took = started.elapsed();
    let windows = (took.as_millis() as u64 / WINDOW_MS + 2) as usize;

    let want: Value = EMOJI
        .iter()
        .map(|e| (e.to_string(), json!({"count": 50})))
        .collect::<serde_json::Map<_, _>>()
        .into();
    join_all(done.iter_mut().map(|(c, events)| async move {
        events.extend(events_until_quiet(c).await);
    }))
    .await;
    let mut most = 0;
    for ((_, events), n) in done.iter().zip(&names) {
        let s = summaries(events, "room");
        most = most.max(s.len());
        assert!(
            s.len() <= windows && s.len() < 100,
            "{n} got {} reactions events for 1,000 reactions over {took:?} ({windows} windows)",
            s.len()
        );
        assert_eq!(last_summary(&s, 1), want, "{n}'s final summary");
    }
    let zed_events = events_until_quiet(&mut zed).await;
    assert_eq!(last_summary(&summaries(&zed_events, "room"), 1), want);
    eprintln!("1,000 reactions in {took:?}: at most {most} events per member");

    let h = history(&b, "u07", "room").await;
    for e in EMOJI {
        assert_eq!(
            h[0]["reactions"][e],
            json!({"count": 50, "mine": true}),
            "{e}"
        );
    }
    let h = history(&b, "zed", "room").await;
    assert_eq!(h[0]["reactions"]["👍"], json!({"count": 50, "mine": false}));
    assert_eq!(h.len(), 1, "reactions are not messages of the log");

    let (c, _) = &mut done[0];
    let (reply, _) = v5_rpc(
        c,
        "reaction.add",
        "again",
        json!({"conv": "room", "seq": 1, "emoji": "👍"}),
    )
    .await;
    assert_eq!(reply["result"]["reactions"]["👍"]["count"], 50, "{reply}");
    let (reply, _) = v5_rpc(
        c,
        "reaction.remove",
        "back",
        json!({"conv": "room", "seq": 1, "emoji": "👍"}),
    )
    .await;
    assert_eq!(
        reply["result"]["reactions"]["👍"],
        json!({"count": 49, "mine": false}),
        "{reply}"
    );
    let zed_events = events_until_quiet(&mut zed).await;
    assert_eq!(
        last_summary(&summaries(&zed_events, "room"), 1)["👍"],
        json!({"count": 49})
    );

    // Bounds: a 21st distinct emoji, an over-long one, a message that is not there.
    for (emoji, seq, code) in [
        ("🦀", 1, "too_many_reactions"),
        (&*"x".repeat(33), 1, "bad_request"),
        ("👍", 9, "not_found"),
    ] {
        let (reply, _) = v5_rpc(
            c,
            "reaction.add",
            "bound",
            json!({"conv": "room", "seq": seq, "emoji": emoji}),
        )
        .await;
        assert_eq!(reply["error"]["code"], code, "{reply}");
    }
}

/// Alice reacts over HTTP, Bob over MQTT; after a restart history still
/// shows both, and Alice reacting again still counts once.
#[tokio::test]
async fn reactions_survive_a_restart() {
    let mut b = Broker::start(&config());
    let mut alice = v5_with_events(&b, "alice").await;
    create_group(&mut alice, "room", &["bob"]).await;
    let api = |b: &Broker, u: &str| Http::new(b.http_addr).with_token(&token(u));
    let r = api(&b, "alice")
        .post(
            "/v1/conversations/room/messages",
            &json!({"id": "m1", "body": "hi"}),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    // 👍, percent-encoded in the path.
    let thumbs = "/v1/conversations/room/messages/1/reactions/%F0%9F%91%8D";
    let r = api(&b, "alice").request("PUT", thumbs, None).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(
        r.json()["reactions"]["👍"],
        json!({"count": 1, "mine": true})
    );
    let mut bob = v5_with_events(&b, "bob").await;
    let (reply, _) = v5_rpc(
        &mut bob,
        "reaction.add",
        "r1",
        json!({"conv": "room", "seq": 1, "emoji": "👍"}),
    )
    .await;
    assert_eq!(reply["result"]["reactions"]["👍"]["count"], 2, "{reply}");
    drop((alice, bob));

    b.restart();
    let h = history(&b, "bob", "room").await;
    assert_eq!(h[0]["reactions"], json!({"👍": {"count": 2, "mine": true}}));
    let r = api(&b, "alice").request("PUT", thumbs, None).await;
    assert_eq!(r.json()["reactions"]["👍"]["count"], 2, "{}", r.text());
    let r = api(&b, "alice").request("DELETE", thumbs, None).await;
    assert_eq!(
        r.json()["reactions"]["👍"],
        json!({"count": 1, "mine": false})
    );
    let r = api(&b, "carol").request("PUT", thumbs, None).await;
    assert_eq!(r.status, 403, "a non-member cannot react: {}", r.text());
}

/// Room reactions: Bob, subscribed to `reactions/room`, gets Alice's 🎉
/// live; a burst of ten within the throttle gives one; nothing is stored.
#[tokio::test]
async fn room_reactions_are_live_throttled_and_not_stored() {
    let b = Broker::start(&config());
    let mut alice = v5_with_events(&b, "alice").await;
    create_group(&mut alice, "room", &["bob"]).await;
    let mut bob = v5_with_events(&b, "bob").await;
    bob.subscribe("reactions/room", v5::QoS::AtMostOnce).await;
    let mut mallory = v5_with_events(&b, "mallory").await;
    let ack = mallory
        .subscribe("reactions/room", v5::QoS::AtMostOnce)
        .await;
    assert!(
        ack.return_codes
            .iter()
            .all(|c| !matches!(c, v5::SubscribeReasonCode::Success(_))),
        "a non-member may not watch the room: {ack:?}"
    );
    for _ in 0..10 {
        alice
            .publish_acked(
                "reactions/room",
                v5::QoS::AtLeastOnce,
                false,
                json!({"emoji": "🎉"}).to_string().as_bytes(),
            )
            .await;
    }
    let got = bob.publishes_for(Duration::from_millis(500)).await;
    let live: Vec<Value> = got
        .iter()
        .filter(|p| v5_topic(p) == "reactions/room")
        .map(|p| json_of(&p.payload))
        .collect();
    assert_eq!(live.len(), 1, "{live:?}");
    assert_eq!(live[0]["emoji"], "🎉");
    assert_eq!(live[0]["from"], "alice");
    let mut counted = BTreeMap::new();
    for p in &got {
        *counted.entry(v5_topic(p)).or_insert(0) += 1;
    }
    assert_eq!(counted.len(), 1, "{counted:?}");
    assert!(history(&b, "bob", "room").await.is_empty());
}
