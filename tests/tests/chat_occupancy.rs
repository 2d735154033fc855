//! Occupancy told as a user story (issue #13 item 4): a member asks how
//! many members a conversation has and how many are connected now (RPC
//! `occupancy`, `GET /v1/conversations/{id}/occupancy`), or subscribes to
//! `occupancy/{conv}`: the count at once, then at most one update per
//! `chat.occupancy_window_ms` while members come and go.

use std::time::{Duration, Instant};

use chatmq_tests::chat::*;
use chatmq_tests::http::Http;
use chatmq_tests::{v5, Broker, PATIENCE};
use serde_json::{json, Value};

const WINDOW_MS: u64 = 300;

fn config() -> String {
    chatmq_tests::chat::config(&format!("[chat]\noccupancy_window_ms = {WINDOW_MS}\n"))
}

fn occupancy(publishes: &[v5::Publish]) -> Vec<Value> {
    publishes
        .iter()
        .filter(|p| v5_topic(p) == "occupancy/room")
        .map(|p| json_of(&p.payload))
        .collect()
}

/// What `c` gets on `occupancy/room` until an update says `connected`.
async fn until_connected(c: &mut v5::Client, connected: u64) -> Vec<Value> {
    let got = v5_until(c, PATIENCE, |g| {
        occupancy(g)
            .last()
            .is_some_and(|o| o["connected"] == connected)
    })
    .await;
    occupancy(&got)
}

#[tokio::test]
async fn occupancy_goes_up_and_down_with_throttled_updates() {
    let b = Broker::start(&config());
    let mut alice = v5_with_events(&b, "alice").await;
    create_group(&mut alice, "room", &["bob", "carol", "dave"]).await;
    let mut mallory = v5_user(&b, "mallory").await;
    let ack = mallory
        .subscribe("occupancy/room", v5::QoS::AtMostOnce)
        .await;
    assert!(
        !matches!(ack.return_codes[0], v5::SubscribeReasonCode::Success(_)),
        "a non-member may not watch: {ack:?}"
    );

    alice.subscribe("occupancy/room", v5::QoS::AtMostOnce).await;
    let first = until_connected(&mut alice, 1).await;
    assert_eq!(
        first[0],
        json!({"conv": "room", "members": 4, "connected": 1})
    );

    let bob = v5_user(&b, "bob").await;
    let carol = v5_user(&b, "carol").await;
    let seen = until_connected(&mut alice, 3).await;
    assert_eq!(seen.last().expect("update")["members"], 4);

    // Dave comes and goes ten times quickly: a few updates, not twenty.
    let started = Instant::now();
    for _ in 0..10 {
        let dave = v5_user(&b, "dave").await;
        dave.disconnect().await;
    }
    let dave = v5_user(&b, "dave").await;
    let flapping = until_connected(&mut alice, 4).await;
    let windows = (started.elapsed().as_millis() as u64 / WINDOW_MS + 2) as usize;
    assert!(
        flapping.len() <= windows && flapping.len() < 20,
        "{} updates for 21 changes over {windows} windows",
        flapping.len()
    );

    bob.disconnect().await;
    carol.disconnect().await;
    let down = until_connected(&mut alice, 2).await;
    assert_eq!(down.last().expect("update")["members"], 4);

    // On request: the RPC and HTTP agree.
    let (reply, _) = v5_rpc(&mut alice, "occupancy", "o1", json!({"conv": "room"})).await;
    assert_eq!(
        reply["result"],
        json!({"conv": "room", "members": 4, "connected": 2}),
        "{reply}"
    );
    let r = Http::new(b.http_addr)
        .with_token(&token("dave"))
        .get("/v1/conversations/room/occupancy")
        .await;
    assert_eq!(r.json(), reply["result"], "{}", r.text());
    let r = Http::new(b.http_addr)
        .with_token(&token("mallory"))
        .get("/v1/conversations/room/occupancy")
        .await;
    assert_eq!(r.status, 403, "{}", r.text());

    // A member leaving the conversation changes the count too.
    let (reply, _) = v5_rpc(
        &mut alice,
        "conversation.remove",
        "rm",
        json!({"conv": "room", "user": "carol"}),
    )
    .await;
    assert_eq!(reply["ok"], true, "{reply}");
    let got = v5_until(&mut alice, PATIENCE, |g| {
        occupancy(g).last().is_some_and(|o| o["members"] == 3)
    })
    .await;
    assert_eq!(occupancy(&got).last().expect("update")["connected"], 2);
    // Quiet: no update without a change.
    let more = alice
        .publishes_for(Duration::from_millis(3 * WINDOW_MS))
        .await;
    assert!(occupancy(&more).is_empty(), "{:?}", occupancy(&more));
    drop(dave);
}
