//! Large groups told as user stories (issue #11 item 3): in a group with
//! more than `chat.large_group_members` members, read receipts and
//! membership changes come as one `reads` / `members` digest per
//! `chat.announce_window_ms`, not one event per receipt or change to every
//! member; smaller groups still get each `read` and `member.added` at once.
//! A whole group coming back at once replays the log from pages read once
//! and shared, not read again for every member.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use chatmq_tests::chat::*;
use chatmq_tests::http::{Http, Response};
use chatmq_tests::metrics::metric;
use chatmq_tests::{v5, Broker};
use futures_util::stream::{self, StreamExt};
use serde_json::{json, Value};

const ADMIN: &str = "large-groups-admin-token";
/// Groups above this many members are large in these tests.
const LARGE: usize = 50;
const WINDOW_MS: u64 = 200;
/// Long enough for every digest still due to have gone out.
const SETTLE: Duration = Duration::from_millis(4 * WINDOW_MS);

fn config() -> String {
    chatmq_tests::chat::config(&format!(
        "admin_token = \"{ADMIN}\"\n\n[chat]\nlarge_group_members = {LARGE}\nannounce_window_ms = {WINDOW_MS}\n"
    ))
}

fn user_api(b: &Broker, user: &str) -> Http {
    Http::new(b.http_addr).with_token(&token(user))
}

fn assert_ok(r: &Response, what: &str) {
    assert!(r.status < 300, "{what}: {} {}", r.status, r.text());
}

async fn read_via_http(b: &Broker, user: &str, conv: &str, seq: u64) -> Response {
    let body = json!({ "seq": seq }).to_string();
    user_api(b, user)
        .request(
            "PUT",
            &format!("/v1/conversations/{conv}/read"),
            Some(body.as_bytes()),
        )
        .await
}

/// A member logged in over MQTT 5, subscribed to its events.
async fn listener(b: &Broker, user: &str) -> v5::Client {
    let mut c = v5_user(b, user).await;
    c.subscribe(&format!("users/{user}/events"), v5::QoS::AtLeastOnce)
        .await;
    c
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

/// A 1,200-member group, 5 messages; 400 members read (some twice, further
/// the second time) through the HTTP API. The owner, watching her events,
/// gets a few `reads` digests instead of 500 `read` events, and together
/// they hold every reader's latest read seq.
#[tokio::test]
async fn receipts_in_a_thousand_member_group_come_as_a_few_digests() {
    let b = Broker::start(&config());
    let members: Vec<String> = (0..1200).map(|i| format!("u{i:04}")).collect();
    let refs: Vec<&str> = members.iter().map(String::as_str).collect();
    let mut alice = listener(&b, "alice").await;
    create_group(&mut alice, "big", &refs).await;
    for i in 1..=5 {
        let (_, _) = alice
            .publish_acked_keeping(
                "chat/big",
                v5::QoS::AtLeastOnce,
                false,
                &envelope(&format!("m{i}"), "x"),
            )
            .await;
    }
    alice.publishes_for(Duration::from_millis(300)).await;

    let mut receipts: Vec<(String, u64)> = Vec::new();
    for (i, m) in members.iter().take(400).enumerate() {
        receipts.push((m.clone(), 1 + (i as u64 % 4)));
        if i % 4 == 0 {
            receipts.push((m.clone(), 5));
        }
    }
    let sent = receipts.len();
    let mut expected: BTreeMap<String, u64> = BTreeMap::new();
    for (u, s) in &receipts {
        let e = expected.entry(u.clone()).or_default();
        *e = (*e).max(*s);
    }
    // Each reader's receipts in order, readers at the same time.
    let mut by_reader: BTreeMap<String, Vec<u64>> = BTreeMap::new();
    for (u, s) in receipts {
        by_reader.entry(u).or_default().push(s);
    }
    let b_ref = &b;
    let started = Instant::now();
    stream::iter(by_reader)
        .for_each_concurrent(16, |(u, seqs)| async move {
            for s in seqs {
                let r = read_via_http(b_ref, &u, "big", s).await;
                assert_ok(&r, &format!("{u} reads {s}"));
                assert_eq!(r.json()["seq"], s, "{}", r.text());
            }
        })
        .await;

    let events = events_until_quiet(&mut alice).await;
    let windows = started.elapsed().as_millis() as usize / WINDOW_MS as usize + 2;
    assert!(
        !events.iter().any(|e| e["type"] == "read"),
        "no receipt comes one by one in a large group"
    );
    let digests: Vec<&Value> = events.iter().filter(|e| e["type"] == "reads").collect();
    assert!(
        !digests.is_empty() && digests.len() <= windows && digests.len() * 5 <= sent,
        "{} digests for {sent} receipts over {windows} windows",
        digests.len()
    );
    let mut seen: BTreeMap<String, u64> = BTreeMap::new();
    for d in &digests {
        assert_eq!(d["conv"], "big", "{d}");
        for (u, s) in d["reads"].as_object().expect("reads") {
            let s = s.as_u64().expect("seq");
            let e = seen.entry(u.clone()).or_default();
            *e = (*e).max(s);
        }
    }
    assert_eq!(seen, expected, "every reader's latest read seq is told");
}

/// A group grows to 1,000 members one HTTP add at a time, then 500 more in
/// one `conversation.add` call and two in one HTTP call. An early member gets each `member.added`
/// while the group is small, then a few `members` digests; a user added
/// later is told at once that it joined; a removed member is told at once,
/// the others in a digest.
#[tokio::test]
async fn a_group_built_one_add_at_a_time_is_announced_in_digests() {
    let b = Broker::start(&config());
    let mut alice = listener(&b, "alice").await;
    create_group(&mut alice, "grow", &["bob"]).await;
    let mut bob = listener(&b, "bob").await;
    let mut carol = listener(&b, "carol").await;
    let alice_api = user_api(&b, "alice");

    let started = Instant::now();
    let singles: Vec<String> = (0..1000).map(|i| format!("s{i:04}")).collect();
    for u in &singles {
        let r = alice_api
            .post("/v1/conversations/grow/members", &json!({ "user": u }))
            .await;
        assert_ok(&r, u);
        assert_eq!(r.json(), json!({"conv": "grow", "user": u}));
    }
    let took = started.elapsed();
    let bulk: Vec<String> = (0..500).map(|i| format!("k{i:04}")).collect();
    let (reply, _) = v5_rpc(
        &mut alice,
        "conversation.add",
        "bulk",
        json!({"conv": "grow", "users": bulk}),
    )
    .await;
    assert_eq!(reply["ok"], true, "{reply}");
    assert_eq!(reply["result"]["added"].as_array().map(Vec::len), Some(500));
    // The operator adds several over HTTP; who was in already is not added again.
    let r = Http::new(b.http_addr)
        .with_token(ADMIN)
        .post(
            "/v1/conversations/grow/members",
            &json!({"users": ["h1", "s0001", "h2", "h1"]}),
        )
        .await;
    assert_ok(&r, "bulk over HTTP");
    assert_eq!(r.json(), json!({"conv": "grow", "added": ["h1", "h2"]}));
    let r = alice_api
        .post(
            "/v1/conversations/grow/members",
            &json!({ "user": "carol" }),
        )
        .await;
    assert_ok(&r, "carol");
    let event = v5_event(&mut carol, &mut Vec::new(), "member.added").await;
    assert_eq!(
        (&event["conv"], &event["user"]),
        (&json!("grow"), &json!("carol"))
    );

    let removed = alice_api
        .delete("/v1/conversations/grow/members/s0500")
        .await;
    assert_ok(&removed, "remove s0500");

    let events = events_until_quiet(&mut bob).await;
    let singles_told: Vec<&Value> = events
        .iter()
        .filter(|e| e["type"] == "member.added")
        .collect();
    let digests: Vec<&Value> = events.iter().filter(|e| e["type"] == "members").collect();
    let total = 1000 + 500 + 3;
    // At most one digest per window, and no more windows than it took.
    let windows = started.elapsed().as_millis() as usize / WINDOW_MS as usize + 2;
    assert!(
        singles_told.len() <= LARGE && digests.len() <= windows && events.len() * 5 <= total,
        "bob got {} events ({} member.added, {} digests over {windows} windows) for {total} adds; 1,000 single adds took {took:?}",
        events.len(),
        singles_told.len(),
        digests.len()
    );
    let mut added: BTreeSet<String> = singles_told
        .iter()
        .map(|e| e["user"].as_str().expect("user").to_string())
        .collect();
    let mut gone = BTreeSet::new();
    for d in &digests {
        assert_eq!(d["conv"], "grow", "{d}");
        for u in d["added"].as_array().expect("added") {
            added.insert(u.as_str().expect("user").to_string());
        }
        for u in d["removed"].as_array().expect("removed") {
            gone.insert(u.as_str().expect("user").to_string());
        }
    }
    let mut everyone: BTreeSet<String> = singles.iter().chain(&bulk).cloned().collect();
    everyone.extend(["carol", "h1", "h2"].map(String::from));
    assert_eq!(added, everyone, "every join is told");
    assert_eq!(gone, BTreeSet::from(["s0500".to_string()]));
}

/// In a small group of the same broker, a receipt and a join still come
/// at once, one event each, in the shape clients already know.
#[tokio::test]
async fn small_groups_still_get_each_receipt_and_join_at_once() {
    let b = Broker::start(&config());
    let mut alice = listener(&b, "alice").await;
    create_group(&mut alice, "team", &["bob"]).await;
    let (_, _) = alice
        .publish_acked_keeping(
            "chat/team",
            v5::QoS::AtLeastOnce,
            false,
            &envelope("t1", "x"),
        )
        .await;
    alice.publishes_for(Duration::from_millis(200)).await;

    let r = read_via_http(&b, "bob", "team", 1).await;
    assert_ok(&r, "bob reads");
    let receipt = v5_event(&mut alice, &mut Vec::new(), "read").await;
    assert_eq!(
        receipt,
        json!({"type": "read", "conv": "team", "user": "bob", "seq": 1})
    );

    let (reply, mut got) = v5_rpc(
        &mut alice,
        "conversation.add",
        "add",
        json!({"conv": "team", "user": "carol"}),
    )
    .await;
    assert_eq!(reply["result"]["added"], json!(["carol"]), "{reply}");
    v5_event(&mut alice, &mut got, "member.added").await;
    assert!(
        !v5_events(&got).iter().any(|e| e["type"] == "members"),
        "no digest in a small group"
    );
}

/// A 200-member group is offline (a deploy, an outage) while alice sends
/// 300 messages; then every member's phone reconnects at once. Each gets
/// all 300 once, in order, and the broker read each page of the log about
/// once for all of them: far fewer storage reads than members × pages.
#[tokio::test]
async fn a_whole_group_reconnecting_at_once_shares_the_replay() {
    const MEMBERS: usize = 200;
    const MESSAGES: u64 = 300;
    // 256 seqs a page, and each catch-up ends with a look past its last.
    const PAGES: f64 = 3.0;
    // Phones reconnecting at the same moment. With all 200 at once the
    // test client's connects time out (5 s) before the debug-built broker
    // has answered them all, with or without shared pages.
    const RECONNECTING: usize = 100;
    let b = Broker::start(&config());
    let members: Vec<String> = (0..MEMBERS).map(|i| format!("p{i:03}")).collect();
    let refs: Vec<&str> = members.iter().map(String::as_str).collect();
    let mut alice = listener(&b, "alice").await;
    create_group(&mut alice, "crowd", &refs).await;
    let phone = |b: &Broker, user: &str| v5_options(b.addr, &format!("{user}-phone"), user, true);
    let b_ref = &b;
    stream::iter(&members)
        .for_each_concurrent(16, |u| async move {
            let mut c = v5_login(phone(b_ref, u)).await;
            c.subscribe("chat/crowd", v5::QoS::AtLeastOnce).await;
            c.disconnect().await;
        })
        .await;

    for i in 1..=MESSAGES {
        let (_, _) = alice
            .publish_acked_keeping(
                "chat/crowd",
                v5::QoS::AtLeastOnce,
                false,
                &envelope(&format!("m{i}"), "while you were away"),
            )
            .await;
    }
    let read_before = metric(&b, "chatmq_chat_replay_pages_read_total").await;

    let everyone = stream::iter(&members).map(|u| async move {
        let mut c = v5_login(phone(b_ref, u)).await;
        assert!(c.connack.session_present, "{u}");
        let mut got = v5_until(&mut c, Duration::from_secs(60), |g| {
            g.len() >= MESSAGES as usize
        })
        .await;
        got.extend(c.publishes_for(Duration::from_millis(300)).await);
        let seqs: Vec<u64> = got.iter().map(|p| seq_of(&p.payload)).collect();
        assert_dense(&seqs, MESSAGES, u);
        c
    });
    let _connected: Vec<v5::Client> = everyone.buffer_unordered(RECONNECTING).collect().await;

    let read = metric(&b, "chatmq_chat_replay_pages_read_total").await - read_before;
    let shared = metric(&b, "chatmq_chat_replay_pages_shared_total").await;
    let unshared = MEMBERS as f64 * PAGES;
    assert!(
        read >= 2.0 && read <= unshared / 10.0,
        "{read} pages read from storage for {MEMBERS} members, {unshared} without sharing"
    );
    assert!(shared >= MEMBERS as f64, "{shared} pages shared");
}
