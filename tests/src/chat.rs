//! Chat test support: users who log in with HS256 JWTs, envelopes, and
//! RPC over MQTT (a request on `rpc/{method}`, the reply on
//! `users/{user}/events`).

use std::collections::HashSet;
use std::net::SocketAddr;
use std::time::Duration;

use jsonwebtoken::{encode, EncodingKey, Header};
use serde_json::{json, Value};

use crate::{v4, v5, Broker};

/// The HS256 secret every chat test broker trusts.
pub const SECRET: &str = "chat-tests-secret";

/// A broker config with JWT login (no anonymous access, no ACL rules)
/// followed by `extra` (e.g. `[[acl.rules]]` tables).
pub fn config(extra: &str) -> String {
    format!("[auth]\njwt_secret = \"{SECRET}\"\n\n{extra}\n")
}

/// A JWT for `user`, valid for an hour.
pub fn token(user: &str) -> String {
    let exp = jsonwebtoken::get_current_timestamp() + 3600;
    encode(
        &Header::default(),
        &json!({"sub": user, "exp": exp}),
        &EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .expect("sign JWT")
}

/// 3.1.1 options for `user` on client id `client_id`; `persistent` asks
/// for a session that outlives the connection (Clean Session 0).
pub fn v4_options(
    addr: SocketAddr,
    client_id: &str,
    user: &str,
    persistent: bool,
) -> v4::MqttOptions {
    let mut o = v4::options(addr, client_id);
    o.set_credentials(user, token(user));
    o.set_clean_session(!persistent);
    o
}

/// MQTT 5 options for `user` on client id `client_id`; `persistent` asks
/// for Clean Start 0 and a session that outlives the connection by 10 min.
pub fn v5_options(
    addr: SocketAddr,
    client_id: &str,
    user: &str,
    persistent: bool,
) -> v5::MqttOptions {
    let mut o = v5::options(addr, client_id);
    o.set_credentials(user, token(user));
    if persistent {
        o.set_clean_start(false);
        o.set_session_expiry_interval(Some(600));
    }
    o
}

/// `user` logged in over 3.1.1 with client id = user id, clean session.
pub async fn v4_user(b: &Broker, user: &str) -> v4::Client {
    v4_login(v4_options(b.addr, user, user, false)).await
}

/// `user` logged in over MQTT 5 with client id = user id, clean start.
pub async fn v5_user(b: &Broker, user: &str) -> v5::Client {
    v5_login(v5_options(b.addr, user, user, false)).await
}

/// [`v5_user`] subscribed to its `users/{user}/events`, where RPC replies
/// and membership events come.
pub async fn v5_with_events(b: &Broker, user: &str) -> v5::Client {
    let mut c = v5_user(b, user).await;
    c.subscribe(&format!("users/{user}/events"), v5::QoS::AtLeastOnce)
        .await;
    c
}

pub async fn v4_login(o: v4::MqttOptions) -> v4::Client {
    let id = o.client_id();
    match v4::connect(o).await {
        Ok(c) => c,
        Err(e) => panic!("{id} could not connect: {e}"),
    }
}

pub async fn v5_login(o: v5::MqttOptions) -> v5::Client {
    let id = o.client_id();
    match v5::connect(o).await {
        Ok(c) => c,
        Err(e) => panic!("{id} could not connect: {e}"),
    }
}

/// A chat envelope with id `id` and a text body.
pub fn envelope(id: &str, text: &str) -> Vec<u8> {
    json!({"id": id, "body": {"text": text}})
        .to_string()
        .into_bytes()
}

/// A payload as JSON (panics with the payload if it is not).
pub fn json_of(payload: &[u8]) -> Value {
    serde_json::from_slice(payload)
        .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(payload)))
}

/// The `seq` of a delivered chat message.
pub fn seq_of(payload: &[u8]) -> u64 {
    let v = json_of(payload);
    v["seq"].as_u64().unwrap_or_else(|| panic!("no seq in {v}"))
}

/// Asserts `seqs` is exactly `1..=n`: every seq once, in order.
pub fn assert_dense(seqs: &[u64], n: u64, who: &str) {
    let expected: Vec<u64> = (1..=n).collect();
    if seqs != expected.as_slice() {
        let unique: HashSet<u64> = seqs.iter().copied().collect();
        let missing: Vec<u64> = (1..=n).filter(|s| !unique.contains(s)).collect();
        panic!(
            "{who}: expected seqs 1..={n} once each in order; got {} seqs ({} distinct), missing {missing:?}, got {seqs:?}",
            seqs.len(),
            unique.len()
        );
    }
}

/// The topic of a 3.1.1 PUBLISH.
pub fn v4_topic(p: &v4::Publish) -> String {
    p.topic.clone()
}

/// The topic of an MQTT 5 PUBLISH.
pub fn v5_topic(p: &v5::Publish) -> String {
    String::from_utf8_lossy(&p.topic).into_owned()
}

/// What a 3.1.1 client receives until `done` says enough, or `within`
/// passes (then it panics naming what it got).
pub async fn v4_until(
    c: &mut v4::Client,
    within: Duration,
    mut done: impl FnMut(&[v4::Publish]) -> bool,
) -> Vec<v4::Publish> {
    let deadline = tokio::time::Instant::now() + within;
    let mut got = Vec::new();
    while !done(&got) {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        if left.is_zero() {
            let topics: Vec<String> = got.iter().map(v4_topic).collect();
            panic!(
                "gave up after {within:?}; got {} publishes on {topics:?}",
                got.len()
            );
        }
        got.extend(c.publishes_for(left.min(Duration::from_millis(50))).await);
    }
    got
}

/// What an MQTT 5 client receives until `done` says enough, or `within`
/// passes (then it panics naming what it got).
pub async fn v5_until(
    c: &mut v5::Client,
    within: Duration,
    mut done: impl FnMut(&[v5::Publish]) -> bool,
) -> Vec<v5::Publish> {
    let deadline = tokio::time::Instant::now() + within;
    let mut got = Vec::new();
    while !done(&got) {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        if left.is_zero() {
            let topics: Vec<String> = got.iter().map(v5_topic).collect();
            panic!(
                "gave up after {within:?}; got {} publishes on {topics:?}",
                got.len()
            );
        }
        got.extend(c.publishes_for(left.min(Duration::from_millis(50))).await);
    }
    got
}

/// Events (`users/{user}/events`) among `publishes`, as JSON.
pub fn v5_events(publishes: &[v5::Publish]) -> Vec<Value> {
    publishes
        .iter()
        .filter(|p| v5_topic(p).ends_with("/events"))
        .map(|p| json_of(&p.payload))
        .collect()
}

/// The first event of type `kind` among `got`, waiting for more from `c`
/// until one comes (`got` keeps everything received).
pub async fn v5_event(c: &mut v5::Client, got: &mut Vec<v5::Publish>, kind: &str) -> Value {
    let has = |g: &[v5::Publish]| v5_events(g).iter().any(|e| e["type"] == kind);
    if !has(got) {
        got.extend(v5_until(c, crate::PATIENCE, has).await);
    }
    v5_events(got)
        .into_iter()
        .find(|e| e["type"] == kind)
        .expect("the event waited for")
}

pub fn v4_events(publishes: &[v4::Publish]) -> Vec<Value> {
    publishes
        .iter()
        .filter(|p| p.topic.ends_with("/events"))
        .map(|p| json_of(&p.payload))
        .collect()
}

fn is_reply(v: &Value, id: &str) -> bool {
    v["type"] == "rpc" && v["id"] == id
}

/// Calls `rpc/{method}` with `params` (an object; `"id"` is added) from an
/// MQTT 5 client already subscribed to its events, and returns the reply
/// and every other PUBLISH that arrived meanwhile.
pub async fn v5_rpc(
    c: &mut v5::Client,
    method: &str,
    id: &str,
    params: Value,
) -> (Value, Vec<v5::Publish>) {
    let mut req = params;
    req["id"] = json!(id);
    let is_it =
        |p: &v5::Publish| v5_topic(p).ends_with("/events") && is_reply(&json_of(&p.payload), id);
    let (_, mut got) = c
        .publish_acked_keeping(
            &format!("rpc/{method}"),
            v5::QoS::AtLeastOnce,
            false,
            req.to_string().as_bytes(),
        )
        .await;
    if !got.iter().any(is_it) {
        got.extend(v5_until(c, crate::PATIENCE, |g| g.iter().any(is_it)).await);
    }
    let i = got.iter().position(is_it).expect("reply");
    let reply = json_of(&got.remove(i).payload);
    (reply, got)
}

/// [`v5_rpc`] for a 3.1.1 client.
pub async fn v4_rpc(
    c: &mut v4::Client,
    method: &str,
    id: &str,
    params: Value,
) -> (Value, Vec<v4::Publish>) {
    let mut req = params;
    req["id"] = json!(id);
    let is_it =
        |p: &v4::Publish| p.topic.ends_with("/events") && is_reply(&json_of(&p.payload), id);
    let mut got = c
        .publish_acked_keeping(
            &format!("rpc/{method}"),
            v4::QoS::AtLeastOnce,
            false,
            req.to_string().as_bytes(),
        )
        .await;
    if !got.iter().any(is_it) {
        got.extend(v4_until(c, crate::PATIENCE, |g| g.iter().any(is_it)).await);
    }
    let i = got.iter().position(is_it).expect("reply");
    let reply = json_of(&got.remove(i).payload);
    (reply, got)
}

/// A 3.1.1 publish of `payload` on `topic` at QoS 1, acknowledged (3.1.1
/// has no refusal code, DESIGN §4), and what `c` received meanwhile or,
/// if nothing, until the next PUBLISH: where a refusal's error event
/// (`users/{user}/events`, subscribed to by the caller) comes.
pub async fn v4_publish_answered(
    c: &mut v4::Client,
    topic: &str,
    payload: &[u8],
) -> Vec<v4::Publish> {
    let got = c
        .publish_acked_keeping(topic, v4::QoS::AtLeastOnce, false, payload)
        .await;
    if !got.is_empty() {
        return got;
    }
    v4_until(c, crate::PATIENCE, |g| !g.is_empty()).await
}

/// Creates group `conv` owned by `owner` (an MQTT 5 client subscribed to
/// its events) with `members`, and asserts the reply is ok.
pub async fn create_group(owner: &mut v5::Client, conv: &str, members: &[&str]) {
    let (reply, _) = v5_rpc(
        owner,
        "conversation.create",
        &format!("create-{conv}"),
        json!({"conv": conv, "title": conv, "members": members}),
    )
    .await;
    assert_eq!(reply["ok"], true, "create {conv}: {reply}");
    assert_eq!(reply["result"]["conv"], conv, "{reply}");
}
