//! Push notifications told as an operator and a phone would see them
//! (DESIGN §3 step 8, issue #6): members who are offline and registered a
//! device get a notification through a mock push service (the webhook,
//! FCM HTTP v1 with its OAuth2 flow, or APNs over HTTP/2 and TLS with an
//! ES256 provider token); members who are online get none; a
//! burst collapses per debounce window; dead tokens delete the device;
//! retries stop at the cap; a queued job survives a crash.

use std::time::Duration;

use chatmq_tests::chat::*;
use chatmq_tests::http::Http;
use chatmq_tests::metrics::{metric, metric_reaches};
use chatmq_tests::push_mock::{Mock, Recorded, Reply, ACCESS_TOKEN};
use chatmq_tests::tls::TestPki;
use chatmq_tests::tools::openssl_pair;
use chatmq_tests::{v5, Broker, PATIENCE};
use hmac::{Hmac, Mac};
use serde_json::{json, Value};
use sha2::Sha256;

const DM: &str = "dm:alice:bob";
const SECRET: &str = "webhook-secret";
/// The debounce window the test brokers use.
const DEBOUNCE_MS: u64 = 300;
/// Long enough for a push that should not come to have come.
const QUIET: Duration = Duration::from_millis(1200);

/// A chat broker whose `[push.webhook]` is `mock`, with a short debounce
/// window and quick retries (3 attempts).
fn webhook_config(mock: &Mock, extra: &str) -> String {
    config(&format!(
        "[push]\ndebounce_ms = {DEBOUNCE_MS}\nretry_max_attempts = 3\nretry_base_ms = 50\nretry_max_ms = 200\n\n\
         [push.webhook]\nurl = \"{}\"\nsecret = \"{SECRET}\"\n\n{extra}",
        mock.url("/notify")
    ))
}

/// `user` connects over MQTT 5, registers `token` for the webhook platform
/// with `rpc/device.register`, and stays connected.
async fn register_over_mqtt(b: &Broker, user: &str, token: &str) -> v5::Client {
    let mut c = v5_user(b, user).await;
    c.subscribe(&format!("users/{user}/events"), v5::QoS::AtLeastOnce)
        .await;
    let (reply, _) = v5_rpc(
        &mut c,
        "device.register",
        "reg",
        json!({"platform": "webhook", "token": token}),
    )
    .await;
    assert_eq!(reply["ok"], true, "{reply}");
    assert_eq!(reply["result"]["token"], token, "{reply}");
    c
}

/// `user` registers a device and leaves: from now on they are offline.
async fn offline_with_device(b: &Broker, user: &str, token: &str) {
    register_over_mqtt(b, user, token).await.disconnect().await;
    tokio::time::sleep(Duration::from_millis(200)).await;
}

async fn send(c: &mut v5::Client, conv: &str, id: &str, text: &str) {
    let ack = c
        .publish_acked(
            &format!("chat/{conv}"),
            v5::QoS::AtLeastOnce,
            false,
            &envelope(id, text),
        )
        .await;
    match ack {
        Some(v5::Packet::PubAck(a)) => assert_eq!(a.reason, v5::PubAckReason::Success, "{id}"),
        other => panic!("{id}: expected a PUBACK, got {other:?}"),
    }
}

fn hmac_hex(body: &[u8]) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(SECRET.as_bytes()).expect("key");
    mac.update(body);
    mac.finalize()
        .into_bytes()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

async fn devices_of(b: &Broker, user: &str) -> Vec<Value> {
    let r = Http::new(b.http_addr)
        .with_token(&token(user))
        .get("/v1/devices")
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    r.json()["devices"].as_array().cloned().unwrap_or_default()
}

/// The issue's own check: an operator's webhook receives a notification
/// for an offline member who registered over MQTT, with exactly the
/// documented body, signed.
#[tokio::test]
async fn an_offline_member_gets_the_documented_webhook_body_signed() {
    let mock = Mock::start().await;
    let b = Broker::start(&webhook_config(&mock, ""));
    offline_with_device(&b, "bob", "bob-phone").await;
    let mut alice = v5_user(&b, "alice").await;
    send(&mut alice, DM, "m1", "dinner at 8?").await;

    let got = mock.wait_for("/notify", 1, PATIENCE).await;
    let r = &got[0];
    assert_eq!(r.method, "POST");
    assert_eq!(
        r.json(),
        json!({
            "user": "bob",
            "platform": "webhook",
            "token": "bob-phone",
            "conv": DM,
            "count": 1,
            "preview": {"from": "alice", "body": "dinner at 8?"},
        })
    );
    let expected = format!("sha256={}", hmac_hex(&r.body));
    assert_eq!(r.header("x-chatmq-signature"), Some(expected.as_str()));
    tokio::time::sleep(QUIET).await;
    assert_eq!(mock.requests("/notify").len(), 1, "one message, one push");
    assert_eq!(metric(&b, "chatmq_push_sent_total").await, 1.0);
    assert_eq!(
        metric(&b, "chatmq_push_sent_total{provider=\"webhook\"}").await,
        1.0,
        "counted for its provider"
    );
    assert_eq!(
        metric(&b, "chatmq_push_sent_total{provider=\"fcm\"}").await,
        0.0
    );
    assert_eq!(metric(&b, "chatmq_push_queue_depth").await, 0.0);
}

/// Bob is connected: no push. Once he leaves, the next message pushes.
#[tokio::test]
async fn a_member_who_is_online_gets_no_push() {
    let mock = Mock::start().await;
    let b = Broker::start(&webhook_config(&mock, ""));
    let bob = register_over_mqtt(&b, "bob", "bob-phone").await;
    let mut alice = v5_user(&b, "alice").await;
    send(&mut alice, DM, "m1", "you there?").await;
    send(&mut alice, DM, "m2", "hello?").await;
    tokio::time::sleep(QUIET).await;
    assert!(
        mock.requests("/notify").is_empty(),
        "bob is online: {:?}",
        mock.requests("/notify")
    );

    bob.disconnect().await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    send(&mut alice, DM, "m3", "gone already").await;
    let got = mock.wait_for("/notify", 1, PATIENCE).await;
    assert_eq!(got[0].json()["count"], 1, "only what came while offline");
    assert_eq!(got[0].json()["preview"]["body"], "gone already");
}

/// Bob was offline when the message came, but is back before its debounce
/// window ends: the messages reach his session, and no push follows.
#[tokio::test]
async fn a_member_back_within_the_window_gets_no_push() {
    let mock = Mock::start().await;
    let cfg = webhook_config(&mock, "").replace(
        &format!("debounce_ms = {DEBOUNCE_MS}"),
        "debounce_ms = 1500",
    );
    let b = Broker::start(&cfg);
    offline_with_device(&b, "bob", "bob-phone").await;
    let mut alice = v5_user(&b, "alice").await;
    send(&mut alice, DM, "m1", "are you up?").await;
    let bob = v5_user(&b, "bob").await;
    tokio::time::sleep(Duration::from_millis(1500) + QUIET).await;
    assert!(
        mock.requests("/notify").is_empty(),
        "bob came back within the window: {:?}",
        mock.requests("/notify")
    );
    assert_eq!(
        metric(&b, "chatmq_push_queue_depth").await,
        0.0,
        "the job is gone"
    );

    // Away again: the next message pushes, and counts only itself.
    bob.disconnect().await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    send(&mut alice, DM, "m2", "ok, later").await;
    let got = mock.wait_for("/notify", 1, PATIENCE).await;
    assert_eq!(got[0].json()["count"], 1);
    assert_eq!(got[0].json()["preview"]["body"], "ok, later");
}

/// Thirty messages in a burst reach an offline member as at most a few
/// notifications (one per debounce window) whose counts add up to thirty,
/// the last one previewing the last message.
#[tokio::test]
async fn a_burst_collapses_into_one_notification_per_debounce_window() {
    let mock = Mock::start().await;
    let b = Broker::start(&webhook_config(&mock, ""));
    offline_with_device(&b, "bob", "bob-phone").await;
    let mut alice = v5_user(&b, "alice").await;
    let started = std::time::Instant::now();
    for i in 1..=30 {
        send(&mut alice, DM, &format!("m{i}"), &format!("message {i}")).await;
    }
    let burst_ms = started.elapsed().as_millis() as u64;
    // Wait until the counts cover the burst.
    let deadline = tokio::time::Instant::now() + PATIENCE;
    let total = |got: &[Recorded]| -> u64 {
        got.iter()
            .map(|r| r.json()["count"].as_u64().unwrap_or(0))
            .sum()
    };
    while total(&mock.requests("/notify")) < 30 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "counts cover only {} of 30: {:?}",
            total(&mock.requests("/notify")),
            mock.requests("/notify")
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(QUIET).await;
    let got = mock.requests("/notify");
    assert_eq!(total(&got), 30, "every message counted once: {got:?}");
    let windows = burst_ms / DEBOUNCE_MS + 1;
    assert!(
        got.len() as u64 <= windows,
        "{} notifications for a {burst_ms} ms burst ({windows} windows of {DEBOUNCE_MS} ms)",
        got.len()
    );
    let last = got.last().expect("a notification").json();
    assert_eq!(last["preview"]["body"], "message 30");
    assert!(got.iter().all(|r| r.json()["conv"] == DM));
}

/// Bob mutes the group over RPC: its messages push nothing, while the
/// direct conversation still does.
#[tokio::test]
async fn a_muted_conversation_gets_no_push() {
    let mock = Mock::start().await;
    let b = Broker::start(&webhook_config(&mock, ""));
    let mut alice = v5_with_events(&b, "alice").await;
    create_group(&mut alice, "team", &["bob"]).await;
    let mut bob = register_over_mqtt(&b, "bob", "bob-phone").await;
    let (reply, _) = v5_rpc(
        &mut bob,
        "conversation.mute",
        "mute",
        json!({"conv": "team", "muted": true}),
    )
    .await;
    assert_eq!(reply["ok"], true, "{reply}");
    let (list, _) = v5_rpc(&mut bob, "conversations", "list", json!({})).await;
    let team = list["result"]["conversations"]
        .as_array()
        .and_then(|a| a.iter().find(|c| c["conv"] == "team").cloned())
        .expect("team listed");
    assert_eq!(team["muted"], true, "{list}");
    bob.disconnect().await;
    tokio::time::sleep(Duration::from_millis(200)).await;

    send(&mut alice, "team", "t1", "standup in 5").await;
    tokio::time::sleep(QUIET).await;
    assert!(mock.requests("/notify").is_empty(), "team is muted");
    send(&mut alice, DM, "d1", "psst").await;
    let got = mock.wait_for("/notify", 1, PATIENCE).await;
    assert_eq!(got[0].json()["conv"], DM);

    // The same setting over HTTP: unmuted, team pushes again; a non-member
    // cannot mute it.
    let http = Http::new(b.http_addr).with_token(&token("bob"));
    let body = serde_json::to_vec(&json!({"muted": false})).expect("json");
    let r = http
        .request("PUT", "/v1/conversations/team/mute", Some(&body))
        .await;
    assert_eq!(
        (r.status, r.json()["muted"].clone()),
        (200, json!(false)),
        "{}",
        r.text()
    );
    send(&mut alice, "team", "t2", "standup now").await;
    let got = mock.wait_for("/notify", 2, PATIENCE).await;
    assert_eq!(got[1].json()["conv"], "team");
    let carol = Http::new(b.http_addr).with_token(&token("carol"));
    let r = carol
        .request("PUT", "/v1/conversations/team/mute", Some(&body))
        .await;
    assert_eq!((r.status, r.error_code().as_str()), (403, "not_member"));
}

/// The webhook answers 410 Gone: the token is dead, the device is deleted,
/// and later messages push nothing.
#[tokio::test]
async fn a_dead_token_deletes_the_device() {
    let mock = Mock::start().await;
    mock.script([Reply::status(410)]);
    let b = Broker::start(&webhook_config(&mock, ""));
    offline_with_device(&b, "bob", "old-phone").await;
    assert_eq!(devices_of(&b, "bob").await.len(), 1);
    let mut alice = v5_user(&b, "alice").await;
    send(&mut alice, DM, "m1", "hi").await;
    mock.wait_for("/notify", 1, PATIENCE).await;
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while !devices_of(&b, "bob").await.is_empty() {
        assert!(tokio::time::Instant::now() < deadline, "device not removed");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(metric(&b, "chatmq_push_tokens_removed_total").await, 1.0);
    send(&mut alice, DM, "m2", "still there?").await;
    tokio::time::sleep(QUIET).await;
    assert_eq!(mock.requests("/notify").len(), 1, "no device, no push");
}

/// The webhook keeps answering 503: the gateway tries
/// `push.retry_max_attempts` (3) times and gives up; the job leaves the
/// queue.
#[tokio::test]
async fn retries_stop_at_the_cap() {
    let mock = Mock::start().await;
    mock.script((0..10).map(|_| Reply::status(503)));
    let b = Broker::start(&webhook_config(&mock, ""));
    offline_with_device(&b, "bob", "bob-phone").await;
    let mut alice = v5_user(&b, "alice").await;
    send(&mut alice, DM, "m1", "hi").await;
    let got = mock.wait_for("/notify", 3, PATIENCE).await;
    assert!(got.iter().all(|r| r.json()["count"] == 1));
    tokio::time::sleep(QUIET).await;
    assert_eq!(mock.requests("/notify").len(), 3, "three attempts, no more");
    assert_eq!(metric(&b, "chatmq_push_retried_total").await, 2.0);
    assert_eq!(metric(&b, "chatmq_push_failed_total").await, 1.0);
    assert_eq!(metric(&b, "chatmq_push_sent_total").await, 0.0);
    assert_eq!(metric(&b, "chatmq_push_queue_depth").await, 0.0);
    assert_eq!(devices_of(&b, "bob").await.len(), 1, "503 keeps the device");
}

/// The broker is killed inside the debounce window, before the job was
/// sent: after the restart the job is still queued and goes out.
#[tokio::test]
async fn a_queued_job_survives_a_crash_and_is_sent_after_the_restart() {
    let mock = Mock::start().await;
    let cfg = config(&format!(
        "[push]\ndebounce_ms = 3000\n\n[push.webhook]\nurl = \"{}\"\n",
        mock.url("/notify")
    ));
    let mut b = Broker::start(&cfg);
    offline_with_device(&b, "bob", "bob-phone").await;
    let mut alice = v5_user(&b, "alice").await;
    send(&mut alice, DM, "m1", "before the crash").await;
    send(&mut alice, DM, "m2", "and this").await;
    drop(alice);
    b.kill9();
    assert!(
        mock.requests("/notify").is_empty(),
        "killed inside the window"
    );

    b.restart();
    let got = mock.wait_for("/notify", 1, PATIENCE).await;
    let body = got[0].json();
    assert_eq!(body["count"], 2, "{body}");
    assert_eq!(body["preview"]["body"], "and this");
    tokio::time::sleep(QUIET).await;
    assert_eq!(mock.requests("/notify").len(), 1);
}

/// A token registered by a second user moves to them; over HTTP the same
/// registry answers, and unregistering someone else's token is refused.
#[tokio::test]
async fn a_token_moves_between_users_instead_of_duplicating() {
    let mock = Mock::start().await;
    let b = Broker::start(&webhook_config(&mock, ""));
    register_over_mqtt(&b, "bob", "shared-phone")
        .await
        .disconnect()
        .await;
    register_over_mqtt(&b, "bob", "bob-tablet")
        .await
        .disconnect()
        .await;
    assert_eq!(devices_of(&b, "bob").await.len(), 2, "several devices");
    let carol = Http::new(b.http_addr).with_token(&token("carol"));
    let r = carol
        .post(
            "/v1/devices",
            &json!({"platform": "webhook", "token": "shared-phone", "app_id": "com.example"}),
        )
        .await;
    assert_eq!(r.status, 201, "{}", r.text());
    let bob_tokens: Vec<Value> = devices_of(&b, "bob")
        .await
        .iter()
        .map(|d| d["token"].clone())
        .collect();
    assert_eq!(bob_tokens, [json!("bob-tablet")]);
    assert_eq!(
        devices_of(&b, "carol").await,
        [json!({"platform": "webhook", "token": "shared-phone", "app_id": "com.example"})]
    );
    let r = Http::new(b.http_addr)
        .with_token(&token("bob"))
        .delete("/v1/devices/webhook/shared-phone")
        .await;
    assert_eq!(r.status, 404, "not bob's any more: {}", r.text());
    let r = carol.delete("/v1/devices/webhook/shared-phone").await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(devices_of(&b, "carol").await.is_empty());
    let r = carol
        .post("/v1/devices", &json!({"platform": "gcm", "token": "x"}))
        .await;
    assert_eq!(r.status, 400, "{}", r.text());
}

/// An RSA key pair from openssl: (private PEM, public PEM).
fn rsa_key_pair(dir: &std::path::Path) -> (String, String) {
    let rsa = ["-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048"];
    let (private, public) = openssl_pair(dir, "fcm", &rsa);
    (
        std::fs::read_to_string(private).expect("private key"),
        std::fs::read_to_string(public).expect("public key"),
    )
}

/// FCM HTTP v1 against a local HTTP/2 mock: the broker gets an access
/// token with a service-account assertion the mock verifies (RS256 with
/// the account's public key; iss, aud, scope, lifetime), sends a v1
/// message carrying the conversation as collapse and thread id, and
/// deletes the device when FCM says UNREGISTERED.
#[tokio::test]
async fn fcm_gets_a_verified_oauth2_assertion_and_a_v1_message() {
    let mock = Mock::start().await;
    let keys = tempfile::tempdir().expect("temp dir");
    let (private_pem, public_pem) = rsa_key_pair(keys.path());
    let account = keys.path().join("service-account.json");
    let email = "push@demo-project.iam.gserviceaccount.com";
    std::fs::write(
        &account,
        json!({
            "type": "service_account",
            "project_id": "demo-project",
            "client_email": email,
            "private_key": private_pem,
            "token_uri": mock.url("/token"),
        })
        .to_string(),
    )
    .expect("write service account");
    let b = Broker::start(&config(&format!(
        "[push]\ndebounce_ms = {DEBOUNCE_MS}\n\n[push.fcm]\nservice_account_file = \"{}\"\nbase_url = \"{}\"\n",
        account.display(),
        mock.url("")
    )));
    let bob = Http::new(b.http_addr).with_token(&token("bob"));
    let r = bob
        .post(
            "/v1/devices",
            &json!({"platform": "fcm", "token": "fcm-token-1"}),
        )
        .await;
    assert_eq!(r.status, 201, "{}", r.text());
    let mut alice = v5_with_events(&b, "alice").await;
    create_group(&mut alice, "team", &["bob"]).await;
    send(&mut alice, "team", "t1", "ship it").await;

    let sends = mock
        .wait_for("/v1/projects/demo-project/messages:send", 1, PATIENCE)
        .await;
    let tokens = mock.requests("/token");
    assert_eq!(tokens.len(), 1, "one access token, cached");
    let t = &tokens[0];
    let form: Vec<(String, String)> = String::from_utf8_lossy(&t.body)
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.to_string(), v.replace("%3A", ":")))
        .collect();
    let field = |k: &str| {
        form.iter()
            .find(|(n, _)| n == k)
            .map(|(_, v)| v.clone())
            .unwrap_or_else(|| panic!("no {k} in the token request: {form:?}"))
    };
    assert_eq!(
        field("grant_type"),
        "urn:ietf:params:oauth:grant-type:jwt-bearer"
    );
    let mut validation = jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::RS256);
    validation.set_audience(&[mock.url("/token")]);
    validation.set_issuer(&[email]);
    let claims = jsonwebtoken::decode::<Value>(
        &field("assertion"),
        &jsonwebtoken::DecodingKey::from_rsa_pem(public_pem.as_bytes()).expect("public key"),
        &validation,
    )
    .expect("the assertion verifies with the service account's key")
    .claims;
    assert_eq!(
        claims["scope"],
        "https://www.googleapis.com/auth/firebase.messaging"
    );
    let lifetime = claims["exp"].as_u64().unwrap_or(0) - claims["iat"].as_u64().unwrap_or(0);
    assert!((1..=3600).contains(&lifetime), "{claims}");

    let s = &sends[0];
    assert_eq!(s.version, "HTTP/2.0", "one HTTP/2 connection to FCM");
    let bearer = format!("Bearer {ACCESS_TOKEN}");
    assert_eq!(s.header("authorization"), Some(bearer.as_str()));
    let m = &s.json()["message"];
    assert_eq!(m["token"], "fcm-token-1");
    assert_eq!(
        m["notification"],
        json!({"title": "alice", "body": "ship it"})
    );
    assert_eq!(m["data"]["conv"], "team");
    assert_eq!(m["data"]["count"], "1");
    assert_eq!(m["android"]["collapse_key"], "team");
    assert_eq!(m["apns"]["payload"]["aps"]["thread-id"], "team");
    assert_eq!(
        m["apns"]["payload"]["aps"]["badge"], 1,
        "bob's unread total"
    );

    // FCM says the token is gone: the device is deleted.
    mock.script([Reply::json(
        404,
        json!({"error": {"code": 404, "message": "Requested entity was not found.", "status": "NOT_FOUND",
            "details": [{"@type": "type.googleapis.com/google.firebase.fcm.v1.FcmError", "errorCode": "UNREGISTERED"}]}}),
    )]);
    send(&mut alice, "team", "t2", "again").await;
    mock.wait_for("/messages:send", 2, PATIENCE).await;
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while !devices_of(&b, "bob").await.is_empty() {
        assert!(tokio::time::Instant::now() < deadline, "device not removed");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(metric(&b, "chatmq_push_tokens_removed_total").await, 1.0);
    assert_eq!(
        mock.requests("/token").len(),
        1,
        "the access token was reused"
    );
}

/// Provider keys are read at start-up: a real .p8 key gives a broker that
/// serves; a missing service-account file stops it with one line naming
/// the key and the path.
#[tokio::test]
async fn provider_keys_are_checked_at_start() {
    let keys = tempfile::tempdir().expect("temp dir");
    let p256 = ["-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256"];
    let (p8, _) = openssl_pair(keys.path(), "AuthKey_TEST", &p256);
    let apns = config(&format!(
        "[push.apns]\nkey_file = \"{}\"\nkey_id = \"ABC123\"\nteam_id = \"TEAM123\"\ntopic = \"com.example.chat\"\nsandbox = true\n",
        p8.display()
    ));
    let b = Broker::start(&apns);
    let r = Http::new(b.http_addr)
        .with_token(&token("bob"))
        .post(
            "/v1/devices",
            &json!({"platform": "apns", "token": "ab".repeat(32)}),
        )
        .await;
    assert_eq!(r.status, 201, "{}", r.text());

    let missing = keys.path().join("missing.json");
    let cfg = keys.path().join("c.toml");
    std::fs::write(
        &cfg,
        config(&format!(
            "[push.fcm]\nservice_account_file = \"{}\"\n",
            missing.display()
        )),
    )
    .expect("write config");
    let out = std::process::Command::new(chatmq_tests::binary())
        .arg("serve")
        .arg("--config")
        .arg(&cfg)
        .env("CHATMQ__NODE__DATA_DIR", keys.path().join("data"))
        .env("CHATMQ__MQTT__LISTEN", "127.0.0.1:0")
        .env("CHATMQ__HTTP__LISTEN", "127.0.0.1:0")
        .env("CHATMQ__WEBSOCKET__LISTEN", "127.0.0.1:0")
        .env_remove("RUST_LOG")
        .output()
        .expect("run chatmq");
    assert!(
        !out.status.success(),
        "a missing key file must stop the broker"
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(lines.len(), 1, "one line: {stderr}");
    assert!(
        lines[0].contains("push.fcm.service_account_file"),
        "{stderr}"
    );
    assert!(lines[0].contains("missing.json"), "{stderr}");
}

/// An APNs device token (hex, as Apple hands them out).
const IPHONE: &str = "7d5c0e9b3a1f42d8b6e0c4a9f1d2e3b47d5c0e9b3a1f42d8b6e0c4a9f1d2e3b4";
const KEY_ID: &str = "KEY123ABCD";
const TEAM_ID: &str = "TEAM456XYZ";
const TOPIC: &str = "com.example.chat";

/// A chat broker whose `[push.apns]` points at a local HTTP/2 TLS mock,
/// trusting the mock's test CA, with its .p8 key's public half (what Apple
/// verifies provider tokens with). Bob registered an iPhone over HTTP and
/// has no MQTT session: he is offline.
struct Apple {
    mock: Mock,
    broker: Broker,
    public_key: jsonwebtoken::DecodingKey,
    _keys: tempfile::TempDir,
}

impl Apple {
    async fn start(replies: Vec<Reply>) -> Apple {
        let keys = tempfile::tempdir().expect("temp dir");
        let pki = TestPki::new(keys.path());
        let mock = Mock::start_tls(&pki).await;
        mock.script(replies);
        let p256 = ["-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256"];
        let (p8, public) = openssl_pair(keys.path(), &format!("AuthKey_{KEY_ID}"), &p256);
        let public_key =
            jsonwebtoken::DecodingKey::from_ec_pem(&std::fs::read(public).expect("public key"))
                .expect("EC public key");
        let broker = Broker::start(&config(&format!(
            "[push]\ndebounce_ms = {DEBOUNCE_MS}\nretry_max_attempts = 3\nretry_base_ms = 50\nretry_max_ms = 200\n\n\
             [push.apns]\nkey_file = \"{}\"\nkey_id = \"{KEY_ID}\"\nteam_id = \"{TEAM_ID}\"\ntopic = \"{TOPIC}\"\n\
             endpoint = \"{}\"\nca_file = \"{}\"\n",
            p8.display(),
            mock.url(""),
            pki.ca.display()
        )));
        let r = Http::new(broker.http_addr)
            .with_token(&token("bob"))
            .post("/v1/devices", &json!({"platform": "apns", "token": IPHONE}))
            .await;
        assert_eq!(r.status, 201, "{}", r.text());
        Apple {
            mock,
            broker,
            public_key,
            _keys: keys,
        }
    }

    /// The APNs requests for bob's iPhone, once there are `n`.
    async fn pushes(&self, n: usize) -> Vec<Recorded> {
        self.mock
            .wait_for(&format!("/3/device/{IPHONE}"), n, PATIENCE)
            .await
    }

    /// The provider token of `r`, verified with the key's public half:
    /// its `kid` header and its claims.
    fn provider_token(&self, r: &Recorded) -> (String, Value) {
        let bearer = r
            .header("authorization")
            .and_then(|v| v.strip_prefix("Bearer ").or(v.strip_prefix("bearer ")))
            .unwrap_or_else(|| panic!("no bearer token: {:?}", r.headers));
        let mut validation = jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::ES256);
        validation.set_issuer(&[TEAM_ID]);
        validation.set_required_spec_claims(&["iss"]);
        validation.validate_exp = false;
        let data = jsonwebtoken::decode::<Value>(bearer, &self.public_key, &validation)
            .expect("the provider token verifies with the .p8 key's public key");
        (data.header.kid.unwrap_or_default(), data.claims)
    }
}

/// Apple's error body.
fn apns_error(status: u16, reason: &str) -> Reply {
    Reply::json(status, json!({"reason": reason}))
}

/// An offline member's iPhone gets an alert through APNs: HTTP/2 over TLS
/// to `/3/device/<token>` with Apple's headers (topic, push type,
/// priority, expiration, collapse id = the conversation), the documented
/// payload, and a provider token signed with the .p8 key (ES256, kid = key
/// id, iss = team id, iat = now).
#[tokio::test]
async fn apns_gets_an_alert_with_a_verified_provider_token() {
    let apple = Apple::start(Vec::new()).await;
    let mut alice = v5_user(&apple.broker, "alice").await;
    send(&mut alice, DM, "m1", "dinner at 8?").await;

    let got = apple.pushes(1).await;
    let r = &got[0];
    let now = jsonwebtoken::get_current_timestamp();
    assert_eq!(
        (r.method.as_str(), r.path.as_str(), r.version.as_str()),
        ("POST", format!("/3/device/{IPHONE}").as_str(), "HTTP/2.0")
    );
    assert_eq!(r.header("apns-topic"), Some(TOPIC));
    assert_eq!(r.header("apns-push-type"), Some("alert"));
    assert_eq!(r.header("apns-priority"), Some("10"));
    assert_eq!(r.header("apns-collapse-id"), Some(DM));
    let expiration: u64 = r
        .header("apns-expiration")
        .and_then(|v| v.parse().ok())
        .expect("apns-expiration in Unix seconds");
    assert!(
        expiration.abs_diff(now + 24 * 3600) < 60,
        "kept a day: {expiration}"
    );
    assert_eq!(
        r.json(),
        json!({
            "aps": {
                "alert": {"title": "alice", "body": "dinner at 8?"},
                "badge": 1,
                "sound": "default",
                "thread-id": DM,
            },
            "conv": DM,
            "seq": 1,
            "count": 1,
        })
    );
    let (kid, claims) = apple.provider_token(r);
    assert_eq!(kid, KEY_ID);
    assert_eq!(claims["iss"], TEAM_ID);
    let iat = claims["iat"].as_u64().expect("iat");
    assert!(iat <= now && now - iat < 120, "iat {iat}, now {now}");
    tokio::time::sleep(QUIET).await;
    assert_eq!(apple.pushes(1).await.len(), 1, "one message, one push");
    assert_eq!(metric(&apple.broker, "chatmq_push_sent_total").await, 1.0);
}

/// APNs answers 410 Unregistered: the device is deleted, and the next
/// message sends nothing to APNs.
#[tokio::test]
async fn apns_unregistered_deletes_the_device() {
    let apple = Apple::start(vec![apns_error(410, "Unregistered")]).await;
    let mut alice = v5_user(&apple.broker, "alice").await;
    send(&mut alice, DM, "m1", "hi").await;
    apple.pushes(1).await;
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while !devices_of(&apple.broker, "bob").await.is_empty() {
        assert!(tokio::time::Instant::now() < deadline, "device not removed");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        metric(&apple.broker, "chatmq_push_tokens_removed_total").await,
        1.0
    );
    send(&mut alice, DM, "m2", "still there?").await;
    tokio::time::sleep(QUIET).await;
    assert_eq!(apple.mock.requests("").len(), 1, "no device, no request");
}

/// APNs answers 503 once: the notification is sent again after a backoff,
/// and delivered once.
#[tokio::test]
async fn apns_unavailable_is_retried_and_delivered_once() {
    let apple = Apple::start(vec![apns_error(503, "ServiceUnavailable")]).await;
    let mut alice = v5_user(&apple.broker, "alice").await;
    send(&mut alice, DM, "m1", "knock knock").await;
    let got = apple.pushes(2).await;
    assert_eq!(got[0].body, got[1].body, "the same notification again");
    tokio::time::sleep(QUIET).await;
    assert_eq!(apple.pushes(2).await.len(), 2, "sent once it got through");
    let b = &apple.broker;
    assert_eq!(metric(b, "chatmq_push_retried_total").await, 1.0);
    assert_eq!(metric(b, "chatmq_push_sent_total").await, 1.0);
    assert_eq!(metric(b, "chatmq_push_failed_total").await, 0.0);
    assert_eq!(devices_of(b, "bob").await.len(), 1, "503 keeps the device");
}

/// APNs answers 403 ExpiredProviderToken: the broker signs a new provider
/// token (a later iat), sends again at once with it, and keeps using it.
#[tokio::test]
async fn apns_expired_provider_token_is_renewed() {
    let apple = Apple::start(vec![apns_error(403, "ExpiredProviderToken")]).await;
    let mut alice = v5_user(&apple.broker, "alice").await;
    send(&mut alice, DM, "m1", "first").await;
    let got = apple.pushes(2).await;
    let (_, refused) = apple.provider_token(&got[0]);
    let (kid, renewed) = apple.provider_token(&got[1]);
    assert_eq!(kid, KEY_ID);
    assert!(
        renewed["iat"].as_u64().unwrap_or(0) > refused["iat"].as_u64().unwrap_or(u64::MAX),
        "a new token: {refused} then {renewed}"
    );
    assert_eq!(got[0].body, got[1].body);
    metric_reaches(&apple.broker, "chatmq_push_sent_total", 1.0, PATIENCE).await;
    assert_eq!(
        metric(&apple.broker, "chatmq_push_retried_total").await,
        0.0,
        "sent again at once, not after a backoff"
    );

    send(&mut alice, DM, "m2", "second").await;
    let got = apple.pushes(3).await;
    assert_eq!(
        got[2].header("authorization"),
        got[1].header("authorization"),
        "the renewed token is kept"
    );
}
