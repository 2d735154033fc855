//! The HTTP API, told as an app server and an operator use it: health,
//! readiness and metrics; conversations and members; history of messages
//! sent over MQTT; server-side sends that MQTT members receive in seq
//! order; bearer tokens; and retention, which a resuming session learns
//! about through a `gap` event.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use chatmq_tests::chat::{self, envelope, json_of, seq_of, v5_topic, v5_until};
use chatmq_tests::http::{Http, Response};
use chatmq_tests::v5::QoS;
use chatmq_tests::{Broker, PATIENCE};
use serde_json::{json, Value};

const ADMIN: &str = "http-tests-admin-token";

/// JWT login (the chat test secret), the admin token, and `extra` keys or
/// sections after them.
fn config(extra: &str) -> String {
    chat::config(&format!("admin_token = \"{ADMIN}\"\n{extra}"))
}

struct Api {
    anonymous: Http,
    admin: Http,
}

impl Api {
    fn of(b: &Broker) -> Api {
        let anonymous = Http::new(b.http_addr);
        Api {
            admin: anonymous.with_token(ADMIN),
            anonymous,
        }
    }

    fn user(&self, user: &str) -> Http {
        self.anonymous.with_token(&chat::token(user))
    }
}

fn assert_status(r: &Response, status: u16, what: &str) {
    assert_eq!(r.status, status, "{what}: {}", r.text());
}

/// An error response with `status` and `code`, in the API's JSON shape.
fn assert_error(r: &Response, status: u16, code: &str, what: &str) {
    assert_status(r, status, what);
    assert_eq!(r.error_code(), code, "{what}: {}", r.text());
    assert!(
        r.json()["error"]["message"]
            .as_str()
            .is_some_and(|m| !m.is_empty()),
        "{what}: a message says why: {}",
        r.text()
    );
}

async fn create(api: &Http, body: Value) -> Response {
    api.post("/v1/conversations", &body).await
}

fn seqs(history: &Value) -> Vec<u64> {
    history["messages"]
        .as_array()
        .unwrap_or_else(|| panic!("no messages in {history}"))
        .iter()
        .map(|m| m["seq"].as_u64().expect("seq"))
        .collect()
}

fn roles(list: &Value) -> HashMap<String, String> {
    list["conversations"]
        .as_array()
        .unwrap_or_else(|| panic!("no conversations in {list}"))
        .iter()
        .map(|c| {
            (
                c["conv"].as_str().expect("conv").to_string(),
                c["role"].as_str().expect("role").to_string(),
            )
        })
        .collect()
}

/// Every sample of an OpenMetrics text exposition by series (name and
/// labels; a labelled metric also as its sum under its bare name); panics
/// on a line that is not a comment or a sample, or if `# EOF` does not
/// end it.
fn samples(text: &str) -> HashMap<String, f64> {
    assert!(text.ends_with("# EOF\n"), "the exposition ends with # EOF");
    for line in text.lines().filter(|l| !l.is_empty()) {
        if let Some(comment) = line.strip_prefix('#') {
            let kind = comment.split_whitespace().next();
            assert!(
                matches!(kind, Some("HELP" | "TYPE" | "EOF")),
                "comment line {line:?}"
            );
            continue;
        }
        let (series, value) = line
            .rsplit_once(' ')
            .unwrap_or_else(|| panic!("not a sample: {line:?}"));
        let value: f64 = value
            .parse()
            .unwrap_or_else(|_| panic!("bad value in {line:?}"));
        assert!(series.starts_with("chatmq_"), "unprefixed series {line:?}");
        assert!(value.is_finite(), "{line:?}");
    }
    chatmq_tests::metrics::parse(text)
}

async fn metrics(api: &Api) -> HashMap<String, f64> {
    let r = api.anonymous.get("/metrics").await;
    assert_status(&r, 200, "GET /metrics");
    assert_eq!(
        r.header("content-type"),
        Some("application/openmetrics-text; version=1.0.0; charset=utf-8")
    );
    samples(&r.text())
}

#[tokio::test]
async fn health_readiness_and_metrics_are_served_and_counters_move() {
    let b = Broker::start(&config(""));
    let api = Api::of(&b);

    let r = api.anonymous.get("/healthz").await;
    assert_status(&r, 200, "healthz");
    assert_eq!(r.json()["status"], "ok");
    let r = api.anonymous.get("/readyz").await;
    assert_status(&r, 200, "readyz once serving");
    assert_error(
        &api.anonymous.get("/nowhere").await,
        404,
        "not_found",
        "unknown route",
    );

    let before = metrics(&api).await;
    for name in [
        "chatmq_connections",
        "chatmq_sessions",
        "chatmq_mqtt_publishes_received_total",
        "chatmq_messages_delivered_total",
        "chatmq_chat_messages_appended_total",
        "chatmq_messages_dropped_total",
        "chatmq_storage_writer_queue_depth",
        "chatmq_storage_commit_seconds_count",
        "chatmq_storage_commit_seconds_sum",
        "chatmq_storage_commit_seconds_bucket{le=\"+Inf\"}",
    ] {
        assert!(before.contains_key(name), "{name} is exported");
    }

    let r = create(
        &api.admin,
        json!({"conv": "room", "members": ["alice", "bob"]}),
    )
    .await;
    assert_status(&r, 201, "create room");
    let mut alice = chat::v5_user(&b, "alice").await;
    let mut bob = chat::v5_user(&b, "bob").await;
    bob.subscribe("chat/room", QoS::AtLeastOnce).await;
    for i in 1..=3 {
        alice
            .publish_acked(
                "chat/room",
                QoS::AtLeastOnce,
                false,
                &envelope(&format!("m{i}"), "hi"),
            )
            .await;
    }
    let got = v5_until(&mut bob, PATIENCE, |g| g.len() >= 3).await;
    assert_eq!(
        got.iter().map(|p| seq_of(&p.payload)).collect::<Vec<_>>(),
        [1, 2, 3]
    );

    let after = metrics(&api).await;
    let moved = |name: &str| after[name] - before[name];
    assert!(
        after["chatmq_connections"] >= 2.0,
        "alice and bob are connected"
    );
    assert!(after["chatmq_sessions"] >= 2.0);
    assert!(moved("chatmq_mqtt_publishes_received_total") >= 3.0);
    assert_eq!(moved("chatmq_chat_messages_appended_total"), 3.0);
    assert!(
        moved("chatmq_messages_delivered_total") >= 3.0,
        "bob got three"
    );
    assert!(moved("chatmq_storage_commit_seconds_count") >= 1.0);
    // The histogram is cumulative and ends at +Inf = count.
    let mut buckets: Vec<(f64, f64)> = after
        .iter()
        .filter_map(|(series, v)| {
            let le = series
                .strip_prefix("chatmq_storage_commit_seconds_bucket{le=\"")?
                .strip_suffix("\"}")?;
            let le = if le == "+Inf" {
                f64::INFINITY
            } else {
                le.parse().expect("le")
            };
            Some((le, *v))
        })
        .collect();
    buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
    assert!(buckets.len() > 5, "{buckets:?}");
    assert!(
        buckets.windows(2).all(|w| w[0].1 <= w[1].1),
        "cumulative: {buckets:?}"
    );
    assert_eq!(
        buckets.last().map(|b| b.1),
        Some(after["chatmq_storage_commit_seconds_count"])
    );
}

/// bob's phone keeps at most 2 messages while offline: the 3 oldest of 5
/// are dropped, and the operator sees them counted.
#[tokio::test]
async fn messages_dropped_by_a_full_offline_queue_are_counted() {
    let b = Broker::start(&config(
        "[mqtt]\nmax_offline_messages = 2\n\n[[acl.rules]]\nuser = \"*\"\ntopic = \"news/#\"\naccess = \"pubsub\"\n",
    ));
    let api = Api::of(&b);
    let phone = || chat::v5_options(b.addr, "bob-phone", "bob", true);
    let mut bob = chat::v5_login(phone()).await;
    bob.subscribe("news/#", QoS::AtLeastOnce).await;
    bob.disconnect().await;
    let before = metrics(&api).await;

    let mut alice = chat::v5_user(&b, "alice").await;
    for i in 1..=5 {
        alice
            .publish_acked(
                "news/today",
                QoS::AtLeastOnce,
                false,
                format!("n{i}").as_bytes(),
            )
            .await;
    }
    let after = metrics(&api).await;
    let moved = |name: &str| after[name] - before[name];
    assert_eq!(moved("chatmq_messages_dropped_total"), 3.0);
    assert_eq!(moved("chatmq_mqtt_publishes_received_total"), 5.0);

    let mut bob = chat::v5_login(phone()).await;
    let got = v5_until(&mut bob, PATIENCE, |g| g.len() >= 2).await;
    let texts: Vec<String> = got
        .iter()
        .map(|p| String::from_utf8_lossy(&p.payload).into_owned())
        .collect();
    assert_eq!(texts, ["n4", "n5"], "the newest two were kept");
}

#[tokio::test]
async fn conversations_are_created_by_the_admin_and_by_users() {
    let b = Broker::start(&config(""));
    let api = Api::of(&b);

    // The admin creates a conversation on carol's behalf.
    let body =
        json!({"conv": "ops", "title": "Ops", "members": ["alice", "bob"], "owner": "carol"});
    let r = create(&api.admin, body.clone()).await;
    assert_status(&r, 201, "admin creates ops");
    assert_eq!(r.json(), json!({"conv": "ops"}));
    assert_error(&create(&api.admin, body).await, 409, "exists", "ops again");

    let r = api.user("carol").get("/v1/conversations").await;
    assert_status(&r, 200, "carol's list");
    assert_eq!(
        roles(&r.json()).get("ops").map(String::as_str),
        Some("owner")
    );
    let list = api.user("alice").get("/v1/conversations").await.json();
    assert_eq!(roles(&list).get("ops").map(String::as_str), Some("member"));
    let ops = &list["conversations"][0];
    assert_eq!(
        (ops["title"].clone(), ops["head"].clone()),
        (json!("Ops"), json!(0))
    );
    assert!(roles(&api.user("dave").get("/v1/conversations").await.json()).is_empty());

    // A user creates one and owns it; the id is generated when absent.
    let r = create(
        &api.user("bob"),
        json!({"title": "Lunch", "members": ["alice"]}),
    )
    .await;
    assert_status(&r, 201, "bob creates lunch");
    let lunch = r.json()["conv"].as_str().expect("generated id").to_string();
    let r = create(
        &api.user("bob"),
        json!({"title": "Again", "members": ["alice"]}),
    )
    .await;
    assert_ne!(
        r.json()["conv"].as_str(),
        Some(lunch.as_str()),
        "ids are unique"
    );
    let bob = roles(&api.user("bob").get("/v1/conversations").await.json());
    assert_eq!(bob.get(&lunch).map(String::as_str), Some("owner"));
    assert_eq!(bob.get("ops").map(String::as_str), Some("member"));

    // What is refused, and why.
    let r = create(
        &api.user("bob"),
        json!({"conv": "x", "members": [], "owner": "alice"}),
    )
    .await;
    assert_error(&r, 403, "forbidden", "a user naming another owner");
    let r = create(&api.admin, json!({"conv": "empty"})).await;
    assert_error(&r, 400, "bad_request", "no owner and no members");
    let r = create(&api.admin, json!({"conv": "bad id", "owner": "carol"})).await;
    assert_error(&r, 400, "bad_request", "invalid conversation id");
    let r = create(
        &api.admin,
        json!({"conv": "dm:alice:bob", "owner": "carol"}),
    )
    .await;
    assert_error(&r, 400, "bad_request", "direct conversations are implicit");
    let r = create(&api.admin, json!({"conv": "y", "members": ["not valid"]})).await;
    assert_error(&r, 400, "bad_request", "invalid member id");
    let r = api
        .admin
        .request("POST", "/v1/conversations", Some(b"{not json"))
        .await;
    assert_error(&r, 400, "bad_request", "a body that is not JSON");
    let r = api.admin.get("/v1/conversations").await;
    assert_error(&r, 400, "bad_request", "the admin has no list of its own");
    assert_error(
        &create(&api.anonymous, json!({"conv": "z", "owner": "a"})).await,
        401,
        "unauthorized",
        "no token",
    );
}

#[tokio::test]
async fn the_owner_adds_and_removes_members_and_a_member_may_leave() {
    let b = Broker::start(&config(""));
    let api = Api::of(&b);
    let (alice, bob, carol) = (api.user("alice"), api.user("bob"), api.user("carol"));
    let r = create(&alice, json!({"conv": "team", "members": ["bob"]})).await;
    assert_status(&r, 201, "alice creates team");
    let members = "/v1/conversations/team/members";
    let history = "/v1/conversations/team/messages";

    let r = bob.post(members, &json!({"user": "carol"})).await;
    assert_error(&r, 403, "forbidden", "bob is not the owner");
    assert_error(
        &carol.get(history).await,
        403,
        "not_member",
        "carol is not in yet",
    );

    let r = alice.post(members, &json!({"user": "carol"})).await;
    assert_status(&r, 200, "the owner adds carol");
    assert_eq!(r.json(), json!({"conv": "team", "user": "carol"}));
    assert!(roles(&carol.get("/v1/conversations").await.json()).contains_key("team"));
    assert_status(
        &carol.get(history).await,
        200,
        "carol reads the history now",
    );

    let r = bob.delete("/v1/conversations/team/members/carol").await;
    assert_error(&r, 403, "forbidden", "bob removing carol");
    let r = bob.delete("/v1/conversations/team/members/bob").await;
    assert_status(&r, 200, "bob leaves");
    assert!(!roles(&bob.get("/v1/conversations").await.json()).contains_key("team"));
    assert_error(&bob.get(history).await, 403, "not_member", "bob left");

    let r = api
        .admin
        .delete("/v1/conversations/team/members/carol")
        .await;
    assert_status(&r, 200, "the admin removes carol");
    assert_error(
        &carol.get(history).await,
        403,
        "not_member",
        "carol removed",
    );
    let r = api.admin.post(members, &json!({"user": "dave"})).await;
    assert_status(&r, 200, "the admin adds dave");

    let r = alice.delete("/v1/conversations/team/members/carol").await;
    assert_error(&r, 404, "not_found", "carol is no longer a member");
    let r = alice
        .post("/v1/conversations/nope/members", &json!({"user": "bob"}))
        .await;
    assert_error(&r, 404, "not_found", "no such conversation");
    let r = alice.post(members, &json!({"user": "no such user!"})).await;
    assert_error(&r, 400, "bad_request", "invalid user id");
    let r = alice.post(members, &json!({"name": "bob"})).await;
    assert_error(&r, 400, "bad_request", "body without user");
    let r = api
        .admin
        .post(
            "/v1/conversations/dm:alice:bob/members",
            &json!({"user": "carol"}),
        )
        .await;
    assert_error(
        &r,
        403,
        "forbidden",
        "direct conversations have fixed members",
    );
}

#[tokio::test]
async fn history_pages_messages_sent_over_mqtt_and_survives_a_restart() {
    let mut b = Broker::start(&config("[chat]\nhistory_limit = 6\n"));
    let api = Api::of(&b);
    let r = create(
        &api.admin,
        json!({"conv": "room", "members": ["alice", "bob"]}),
    )
    .await;
    assert_status(&r, 201, "create room");
    let mut alice = chat::v5_user(&b, "alice").await;
    for i in 1..=10 {
        // Acked means on disk, so history has it.
        alice
            .publish_acked(
                "chat/room",
                QoS::AtLeastOnce,
                false,
                &envelope(&format!("m{i}"), &format!("text {i}")),
            )
            .await;
    }
    let bob = api.user("bob");
    let page = |q: &str| format!("/v1/conversations/room/messages{q}");

    let r = bob.get(&page("?after=0&limit=3")).await;
    assert_status(&r, 200, "first page");
    let first = r.json();
    assert_eq!(seqs(&first), [1, 2, 3]);
    assert_eq!(first["head"], 10);
    let epoch = first["epoch"].as_str().expect("epoch").to_string();
    assert!(!epoch.is_empty());
    let m = &first["messages"][0];
    assert_eq!(
        (
            m["conv"].clone(),
            m["id"].clone(),
            m["from"].clone(),
            m["type"].clone(),
            m["body"].clone()
        ),
        (
            json!("room"),
            json!("m1"),
            json!("alice"),
            json!("text"),
            json!({"text": "text 1"})
        )
    );
    assert!(
        m["ts"].as_u64().is_some_and(|ts| ts > 1_600_000_000_000),
        "ts in unix ms"
    );

    assert_eq!(
        seqs(&bob.get(&page("?after=3&limit=3")).await.json()),
        [4, 5, 6]
    );
    assert_eq!(
        seqs(&bob.get(&page("?limit=3")).await.json()),
        [8, 9, 10],
        "the latest"
    );
    assert_eq!(
        seqs(&bob.get(&page("?before=5&limit=2")).await.json()),
        [3, 4]
    );
    assert_eq!(
        seqs(&bob.get(&page("?after=2&before=5")).await.json()),
        [3, 4]
    );
    assert_eq!(
        seqs(&bob.get(&page("?after=10")).await.json()),
        Vec::<u64>::new()
    );
    // chat.history_limit caps every page.
    assert_eq!(seqs(&bob.get(&page("")).await.json()), [5, 6, 7, 8, 9, 10]);
    assert_eq!(
        seqs(&bob.get(&page("?after=0&limit=100")).await.json()),
        [1, 2, 3, 4, 5, 6]
    );
    // The admin reads any conversation.
    assert_eq!(seqs(&api.admin.get(&page("?limit=1")).await.json()), [10]);

    assert_error(
        &bob.get(&page("?limit=lots")).await,
        400,
        "bad_request",
        "limit not a number",
    );
    assert_error(
        &api.user("dave").get(&page("")).await,
        403,
        "not_member",
        "dave is no member",
    );
    let r = bob.get("/v1/conversations/nowhere/messages").await;
    assert_error(&r, 404, "not_found", "unknown conversation");

    // After a restart: the same log, the same epoch, the same ports.
    b.restart();
    let again = bob.get(&page("?after=0&limit=3")).await.json();
    assert_eq!(again, first, "history and epoch survive a restart");
}

#[tokio::test]
async fn bearer_tokens_are_checked() {
    let b = Broker::start(&config(""));
    let api = Api::of(&b);
    let r = create(&api.admin, json!({"conv": "room", "members": ["alice"]})).await;
    assert_status(&r, 201, "create room");
    let path = "/v1/conversations/room/messages";

    let r = api.anonymous.get(path).await;
    assert_error(&r, 401, "unauthorized", "no token");
    assert_eq!(r.header("www-authenticate"), Some("Bearer"));
    assert_error(
        &api.anonymous.with_token("nonsense").get(path).await,
        401,
        "unauthorized",
        "garbage token",
    );
    let sign = |claims: Value, secret: &str| {
        jsonwebtoken::encode(
            &jsonwebtoken::Header::default(),
            &claims,
            &jsonwebtoken::EncodingKey::from_secret(secret.as_bytes()),
        )
        .expect("sign")
    };
    let now = jsonwebtoken::get_current_timestamp();
    let forged = sign(json!({"sub": "alice", "exp": now + 600}), "another secret");
    assert_error(
        &api.anonymous.with_token(&forged).get(path).await,
        401,
        "unauthorized",
        "wrong key",
    );
    let expired = sign(json!({"sub": "alice", "exp": now - 60}), chat::SECRET);
    assert_error(
        &api.anonymous.with_token(&expired).get(path).await,
        401,
        "unauthorized",
        "expired",
    );
    let almost_admin = format!("{ADMIN}x");
    assert_error(
        &api.anonymous.with_token(&almost_admin).get(path).await,
        401,
        "unauthorized",
        "not the admin token",
    );
    let r = api
        .anonymous
        .with_token(&sign(
            json!({"sub": "alice", "exp": now + 600}),
            chat::SECRET,
        ))
        .get(path)
        .await;
    assert_status(&r, 200, "a valid token");
    // Health, readiness and metrics need none.
    assert_status(&api.anonymous.get("/metrics").await, 200, "metrics");
}

#[tokio::test]
async fn a_server_side_send_reaches_mqtt_members_through_the_same_sequence() {
    let b = Broker::start(&config(""));
    let api = Api::of(&b);
    let r = create(
        &api.admin,
        json!({"conv": "room", "members": ["alice", "bob"]}),
    )
    .await;
    assert_status(&r, 201, "create room");
    let mut bob = chat::v5_user(&b, "bob").await;
    bob.subscribe("chat/room", QoS::AtLeastOnce).await;
    let mut alice_mqtt = chat::v5_user(&b, "alice").await;
    let send = "/v1/conversations/room/messages";

    // alice sends from her app server with her own token.
    let r = api
        .user("alice")
        .post(send, &json!({"id": "h1", "body": {"text": "from http"}}))
        .await;
    assert_status(&r, 200, "alice sends");
    assert_eq!(r.json(), json!({"conv": "room", "seq": 1}));
    // The admin sends as bob, and as the system user.
    let r = api
        .admin
        .post(send, &json!({"id": "a1", "body": "as bob", "from": "bob"}))
        .await;
    assert_eq!(r.json(), json!({"conv": "room", "seq": 2}), "{}", r.text());
    let r = api
        .admin
        .post(
            send,
            &json!({"id": "s1", "body": "maintenance", "type": "notice"}),
        )
        .await;
    assert_eq!(r.json(), json!({"conv": "room", "seq": 3}), "{}", r.text());
    // MQTT publishes take the next seq of the same sequence.
    alice_mqtt
        .publish_acked(
            "chat/room",
            QoS::AtLeastOnce,
            false,
            &envelope("q1", "from mqtt"),
        )
        .await;

    let got = v5_until(&mut bob, PATIENCE, |g| g.len() >= 4).await;
    let got: Vec<Value> = got
        .iter()
        .inspect(|p| assert_eq!(v5_topic(p), "chat/room"))
        .map(|p| json_of(&p.payload))
        .collect();
    let summary: Vec<(u64, &str, &str)> = got
        .iter()
        .map(|m| {
            (
                m["seq"].as_u64().expect("seq"),
                m["from"].as_str().expect("from"),
                m["id"].as_str().expect("id"),
            )
        })
        .collect();
    assert_eq!(
        summary,
        [
            (1, "alice", "h1"),
            (2, "bob", "a1"),
            (3, "system", "s1"),
            (4, "alice", "q1")
        ]
    );
    assert_eq!(
        (got[2]["type"].clone(), got[2]["body"].clone()),
        (json!("notice"), json!("maintenance"))
    );
    assert_eq!(got[0]["body"], json!({"text": "from http"}));

    // A retry of the same id is the same message: same seq, no new delivery.
    let r = api
        .admin
        .post(
            send,
            &json!({"id": "s1", "body": "maintenance", "type": "notice"}),
        )
        .await;
    assert_eq!(
        r.json(),
        json!({"conv": "room", "seq": 3}),
        "idempotent: {}",
        r.text()
    );
    bob.no_publish(Duration::from_millis(300)).await;

    // Refusals.
    let body = json!({"id": "x1", "body": 1});
    assert_error(
        &api.user("dave").post(send, &body).await,
        403,
        "not_member",
        "dave is no member",
    );
    let r = api
        .admin
        .post(send, &json!({"id": "x2", "body": 1, "from": "dave"}))
        .await;
    assert_error(&r, 403, "not_member", "the admin sending as a non-member");
    let r = api
        .user("alice")
        .post(send, &json!({"id": "x3", "body": 1, "from": "bob"}))
        .await;
    assert_error(&r, 403, "forbidden", "a user sending as someone else");
    assert_error(
        &api.anonymous.post(send, &body).await,
        401,
        "unauthorized",
        "no token",
    );
    let r = api.user("alice").post(send, &json!({"body": 1})).await;
    assert_error(&r, 400, "bad_envelope", "no id");
    let big = json!({"id": "x5", "body": "x".repeat(300_000)});
    let r = api.user("alice").post(send, &big).await;
    assert_error(
        &r,
        413,
        "too_large",
        "larger than mqtt.max_payload, like a publish",
    );
    let r = api.user("alice").post(send, &json!({"id": "x4"})).await;
    assert_error(&r, 400, "bad_envelope", "no body");
    let r = api
        .admin
        .post("/v1/conversations/nowhere/messages", &body)
        .await;
    assert_error(
        &r,
        404,
        "not_found",
        "the system user needs an existing conversation",
    );
    bob.no_publish(Duration::from_millis(200)).await;

    let history = api
        .user("bob")
        .get("/v1/conversations/room/messages?after=0")
        .await
        .json();
    assert_eq!(seqs(&history), [1, 2, 3, 4]);
}

#[tokio::test]
async fn retention_trims_the_log_and_a_resuming_session_is_told_of_the_gap() {
    let b = Broker::start(&config("[chat]\nretention_max_messages = 5\n"));
    let api = Api::of(&b);
    let r = create(
        &api.admin,
        json!({"conv": "room", "members": ["alice", "bob"]}),
    )
    .await;
    assert_status(&r, 201, "create room");

    // bob's phone keeps a session; it gets message 1 and goes offline.
    let phone = || chat::v5_options(b.addr, "bob-phone", "bob", true);
    let mut bob = chat::v5_login(phone()).await;
    bob.subscribe("chat/room", QoS::AtLeastOnce).await;
    bob.subscribe("users/bob/events", QoS::AtLeastOnce).await;
    let mut alice = chat::v5_user(&b, "alice").await;
    alice
        .publish_acked("chat/room", QoS::AtLeastOnce, false, &envelope("m1", "one"))
        .await;
    assert_eq!(seq_of(&bob.publish().await.payload), 1);
    bob.disconnect().await;

    for i in 2..=12 {
        alice
            .publish_acked(
                "chat/room",
                QoS::AtLeastOnce,
                false,
                &envelope(&format!("m{i}"), "more"),
            )
            .await;
    }
    // The retention task keeps the newest 5: history starts at seq 8.
    let deadline = Instant::now() + PATIENCE;
    let history = loop {
        let h = api
            .admin
            .get("/v1/conversations/room/messages?after=0")
            .await
            .json();
        if seqs(&h).first() == Some(&8) || Instant::now() > deadline {
            break h;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(seqs(&history), [8, 9, 10, 11, 12], "{history}");
    assert_eq!(
        (history["head"].clone(), history["first"].clone()),
        (json!(12), json!(8))
    );
    let latest = api
        .user("alice")
        .get("/v1/conversations/room/messages")
        .await
        .json();
    assert_eq!(seqs(&latest), [8, 9, 10, 11, 12]);

    // bob comes back: first a gap event for 2..=7, then 8..=12 in order.
    let mut bob = chat::v5_login(phone()).await;
    assert!(bob.connack.session_present, "the session was kept");
    let got = v5_until(&mut bob, PATIENCE, |g| {
        g.iter().filter(|p| v5_topic(p) == "chat/room").count() >= 5
    })
    .await;
    let gap_at = got
        .iter()
        .position(|p| v5_topic(p) == "users/bob/events" && json_of(&p.payload)["type"] == "gap")
        .unwrap_or_else(|| {
            panic!(
                "no gap event among {:?}",
                got.iter().map(v5_topic).collect::<Vec<_>>()
            )
        });
    assert_eq!(
        json_of(&got[gap_at].payload),
        json!({"type": "gap", "conv": "room", "from": 2, "to": 7})
    );
    let chat_msgs: Vec<(usize, u64)> = got
        .iter()
        .enumerate()
        .filter(|(_, p)| v5_topic(p) == "chat/room")
        .map(|(i, p)| (i, seq_of(&p.payload)))
        .collect();
    assert_eq!(
        chat_msgs.iter().map(|m| m.1).collect::<Vec<_>>(),
        [8, 9, 10, 11, 12]
    );
    assert!(
        chat_msgs[0].0 > gap_at,
        "the gap is announced before the kept messages"
    );
}
