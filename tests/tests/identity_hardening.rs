//! Identity hardening (issue #10 items 2, 3, 4, 9, 11, 12, 13), told as an
//! attacker would try it against the real binary: taking over someone
//! else's session, injecting ACL levels through a user name, steering an
//! RPC reply onto another user's topic, guessing passwords, flooding the
//! password hasher, hoarding sessions, keeping a connection after its
//! token expired; and that client-id claims do not pile up forever.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use argon2::password_hash::{PasswordHasher, SaltString};
use argon2::Argon2;
use chatmq_tests::chat::{json_of, v5_topic};
use chatmq_tests::http::Http;
use chatmq_tests::metrics::metric;
use chatmq_tests::raw::{connect_bytes, field, p5, packet, varint, Wire};
use chatmq_tests::{v4, v5, Broker, PATIENCE};
use jsonwebtoken::{encode, EncodingKey, Header};
use serde_json::{json, Value};
use tokio::io::AsyncReadExt;

const QUIET: Duration = Duration::from_millis(700);
const SECRET: &str = "identity-tests-secret";

/// alice and bob are static users; anonymous clients are let in (the
/// README's quick start), and plain topics follow `sensors/%u/#`.
const OPEN: &str = r#"
[auth]
allow_anonymous = true
[[auth.users]]
name = "alice"
password = "wonderland"
[[auth.users]]
name = "bob"
password = "builder"
[[acl.rules]]
user = "*"
topic = "sensors/%u/#"
access = "pubsub"
[[acl.rules]]
user = "*"
topic = "inbox/#"
access = "pub"
[[acl.rules]]
user = "alice"
topic = "inbox/#"
access = "sub"
"#;

fn v4_opts(b: &Broker, id: &str, login: Option<(&str, &str)>, clean: bool) -> v4::MqttOptions {
    let mut o = v4::options(b.addr, id);
    if let Some((user, pass)) = login {
        o.set_credentials(user, pass);
    }
    o.set_clean_session(clean);
    o
}

fn v5_opts(b: &Broker, id: &str, login: Option<(&str, &str)>, expiry: u32) -> v5::MqttOptions {
    let mut o = v5::options(b.addr, id);
    if let Some((user, pass)) = login {
        o.set_credentials(user, pass);
    }
    o.set_clean_start(false);
    o.set_session_expiry_interval(Some(expiry));
    o
}

async fn v4_try(o: v4::MqttOptions) -> Result<v4::Client, v4::ConnectReturnCode> {
    match v4::connect(o).await {
        Ok(c) => Ok(c),
        Err(v4::ConnectionError::ConnectionRefused(code)) => Err(code),
        Err(e) => panic!("expected a CONNACK, got {e}"),
    }
}

async fn v5_try(o: v5::MqttOptions) -> Result<v5::Client, v5::ConnectReturnCode> {
    match v5::connect(o).await {
        Ok(c) => Ok(c),
        Err(v5::ConnectionError::ConnectionRefused(code)) => Err(code),
        Err(e) => panic!("expected a CONNACK, got {e}"),
    }
}

fn refusal<T, E>(r: Result<T, E>) -> E {
    match r {
        Ok(_) => panic!("the connection was accepted"),
        Err(code) => code,
    }
}

fn jwt(claims: Value) -> String {
    encode(
        &Header::default(),
        &claims,
        &EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .expect("sign JWT")
}

fn now() -> u64 {
    jsonwebtoken::get_current_timestamp()
}

// ---- Item 2: a client id belongs to its owner, anonymous included --------

// The exact reproduction: alice has a persistent 3.1.1 session on
// `alice-phone` with two messages queued while she is away. An anonymous
// client presents her client id with clean_session = 0 (3.1.1 and MQTT 5):
// it is refused (3.1.1 rc 5, MQTT 5 0x87 Not authorized) instead of
// getting Session Present = 1 and her messages. alice then resumes her
// session and gets both messages.
#[tokio::test]
async fn an_anonymous_client_cannot_take_over_a_users_persistent_session() {
    let broker = Broker::start(OPEN);
    let mut alice = v4_try(v4_opts(
        &broker,
        "alice-phone",
        Some(("alice", "wonderland")),
        false,
    ))
    .await
    .expect("alice");
    alice.subscribe("inbox/alice", v4::QoS::AtLeastOnce).await;
    alice.disconnect().await;
    let mut bob = v4_try(v4_opts(&broker, "bob-1", Some(("bob", "builder")), true))
        .await
        .expect("bob");
    for text in ["one", "two"] {
        bob.publish_acked("inbox/alice", v4::QoS::AtLeastOnce, false, text.as_bytes())
            .await;
    }

    assert_eq!(
        refusal(v4_try(v4_opts(&broker, "alice-phone", None, false)).await),
        v4::ConnectReturnCode::NotAuthorized,
        "anonymous 3.1.1 with alice's client id"
    );
    assert_eq!(
        refusal(v5_try(v5_opts(&broker, "alice-phone", None, 600)).await),
        v5::ConnectReturnCode::NotAuthorized,
        "anonymous MQTT 5 with alice's client id"
    );

    let mut alice = v4_try(v4_opts(
        &broker,
        "alice-phone",
        Some(("alice", "wonderland")),
        false,
    ))
    .await
    .expect("alice comes back");
    assert!(alice.connack.session_present, "her session is still there");
    let got: Vec<String> = alice
        .publishes_for(QUIET * 2)
        .await
        .iter()
        .map(|p| String::from_utf8_lossy(&p.payload).into_owned())
        .collect();
    assert_eq!(got, ["one", "two"], "her queued messages, to her");
}

// The other way round: a device that connects anonymously with a
// persistent session owns its client id while that session lives. A user
// presenting the id is refused; the anonymous device resumes its session.
#[tokio::test]
async fn a_user_cannot_take_over_an_anonymous_persistent_session() {
    let broker = Broker::start(OPEN);
    v4_try(v4_opts(&broker, "sensor-7", None, false))
        .await
        .expect("anonymous device")
        .disconnect()
        .await;
    assert_eq!(
        refusal(
            v4_try(v4_opts(
                &broker,
                "sensor-7",
                Some(("alice", "wonderland")),
                false
            ))
            .await
        ),
        v4::ConnectReturnCode::NotAuthorized
    );
    assert_eq!(
        refusal(v5_try(v5_opts(&broker, "sensor-7", Some(("bob", "builder")), 60)).await),
        v5::ConnectReturnCode::NotAuthorized
    );
    let device = v4_try(v4_opts(&broker, "sensor-7", None, false))
        .await
        .expect("the device resumes");
    assert!(device.connack.session_present);
    assert!(metric(&broker, "chatmq_client_id_refused_total").await >= 2.0);
}

// The race: alice and bob both CONNECT, many times at once, with a client
// id nobody has used. Exactly one of them gets it, every round: the check
// and the claim are one step where the session is attached.
#[tokio::test]
async fn two_users_racing_for_a_fresh_client_id_never_both_get_it() {
    let broker = Broker::start(OPEN);
    for round in 0..12 {
        let id = format!("contested-{round}");
        let mut tries = Vec::new();
        for i in 0..16 {
            let (user, pass) = if i % 2 == 0 {
                ("alice", "wonderland")
            } else {
                ("bob", "builder")
            };
            let o = v4_opts(&broker, &id, Some((user, pass)), false);
            tries.push(tokio::spawn(async move {
                match v4::connect(o).await {
                    Ok(c) => {
                        c.drop_connection();
                        Some(user)
                    }
                    Err(v4::ConnectionError::ConnectionRefused(
                        v4::ConnectReturnCode::NotAuthorized,
                    )) => None,
                    Err(e) => panic!("{user}: expected a CONNACK, got {e}"),
                }
            }));
        }
        let mut winners = HashSet::new();
        for t in tries {
            if let Some(user) = t.await.expect("task") {
                winners.insert(user);
            }
        }
        // Nobody else may have it afterwards either.
        let loser = if winners.contains("alice") {
            ("bob", "builder")
        } else {
            ("alice", "wonderland")
        };
        assert_eq!(
            refusal(v4_try(v4_opts(&broker, &id, Some(loser), false)).await),
            v4::ConnectReturnCode::NotAuthorized,
            "round {round}"
        );
        assert_eq!(winners.len(), 1, "round {round}: winners {winners:?}");
    }
}

// ---- Item 3: a user name is a user id, or nothing -------------------------

// The app server signs tokens with the broker's secret, and an attacker
// gets one whose `sub` is `#` (or `+`, or `a/b`). With a rule
// `sensors/%u/#` such a login would grant every user's sensors. It is
// refused at CONNECT (MQTT 5 0x86, 3.1.1 rc 4: the user name is not a user
// id), and the same token is refused as an HTTP bearer token; erin's own
// token still logs her in to her own sensors only.
#[tokio::test]
async fn a_jwt_subject_that_is_not_a_user_id_is_refused() {
    let broker = Broker::start(&format!(
        "[auth]\njwt_secret = \"{SECRET}\"\n[[acl.rules]]\nuser = \"*\"\ntopic = \"sensors/%u/#\"\naccess = \"pubsub\"\n"
    ));
    let exp = now() + 600;
    for sub in ["#", "+", "a/b", "sensors/#"] {
        let token = jwt(json!({"sub": sub, "exp": exp}));
        assert_eq!(
            refusal(
                v5_try(v5_opts(
                    &broker,
                    "intruder5",
                    Some((sub, token.as_str())),
                    0
                ))
                .await
            ),
            v5::ConnectReturnCode::BadUserNamePassword,
            "MQTT 5 sub {sub:?}"
        );
        let o = v4_opts(&broker, "intruder4", Some((sub, token.as_str())), true);
        assert_eq!(
            refusal(v4_try(o).await),
            v4::ConnectReturnCode::BadUserNamePassword,
            "3.1.1 sub {sub:?}"
        );
        let r = Http::new(broker.http_addr)
            .with_token(&token)
            .get("/v1/conversations")
            .await;
        assert_eq!(r.status, 401, "HTTP bearer sub {sub:?}");
    }
    let token = jwt(json!({"sub": "erin", "exp": exp}));
    let mut erin = v5_try(v5_opts(
        &broker,
        "erin-1",
        Some(("erin", token.as_str())),
        0,
    ))
    .await
    .expect("erin");
    let own = erin.subscribe("sensors/erin/#", v5::QoS::AtLeastOnce).await;
    assert!(matches!(
        own.return_codes[..],
        [v5::SubscribeReasonCode::Success(_)]
    ));
    let all = erin.subscribe("sensors/#", v5::QoS::AtLeastOnce).await;
    assert_eq!(
        all.return_codes[..],
        [v5::SubscribeReasonCode::NotAuthorized]
    );
}

// ---- Item 4: an RPC reply goes only where the requester may publish ------

/// An MQTT 5 request with a Response Topic; returns the PUBACK reason.
async fn rpc_with_response_topic(
    c: &mut v5::Client,
    method: &str,
    payload: &Value,
    response_topic: &str,
) -> v5::PubAckReason {
    let props = v5::PublishProperties {
        response_topic: Some(response_topic.into()),
        correlation_data: Some("corr".into()),
        ..Default::default()
    };
    c.client
        .publish_with_properties(
            format!("rpc/{method}"),
            v5::QoS::AtLeastOnce,
            false,
            payload.to_string().into_bytes(),
            props,
        )
        .await
        .expect("queue publish");
    loop {
        match c.next().await {
            Ok(v5::Packet::PubAck(a)) => return a.reason,
            Ok(_) => continue,
            Err(e) => panic!("waiting for PUBACK: {e}"),
        }
    }
}

/// The next reply that arrives on `topic`, skipping anything else.
async fn reply_on(c: &mut v5::Client, topic: &str) -> Value {
    loop {
        let p = c.publish().await;
        if v5_topic(&p) == topic {
            return json_of(&p.payload);
        }
    }
}

// The exact reproduction: dana listens on `sensors/dana/cmd`. mallory
// sends `rpc/conversations` with Response Topic `sensors/dana/cmd` and an
// `id` that is a JSON command. dana receives nothing; mallory's request is
// refused (PUBACK 0x87) and not run, and her events say why. A Response
// Topic mallory may publish to herself gets the reply with the echoed id;
// an `id` that is not a short string is refused and not echoed.
#[tokio::test]
async fn an_rpc_response_topic_must_be_one_the_requester_may_publish_to() {
    let broker = Broker::start(&format!(
        "[auth]\njwt_secret = \"{SECRET}\"\n[[acl.rules]]\nuser = \"*\"\ntopic = \"sensors/%u/#\"\naccess = \"pubsub\"\n"
    ));
    let token = |u: &str| jwt(json!({"sub": u, "exp": now() + 600}));
    let mut dana = v5_try(v5_opts(
        &broker,
        "dana-1",
        Some(("dana", token("dana").as_str())),
        0,
    ))
    .await
    .expect("dana");
    dana.subscribe("sensors/dana/#", v5::QoS::AtLeastOnce).await;
    let mut mallory = v5_try(v5_opts(
        &broker,
        "mallory-1",
        Some(("mallory", token("mallory").as_str())),
        0,
    ))
    .await
    .expect("mallory");
    mallory
        .subscribe("users/mallory/events", v5::QoS::AtLeastOnce)
        .await;
    mallory
        .subscribe("sensors/mallory/replies", v5::QoS::AtLeastOnce)
        .await;

    let evil = json!({"id": {"cmd": "unlock", "door": "front"}});
    assert_eq!(
        rpc_with_response_topic(&mut mallory, "conversations", &evil, "sensors/dana/cmd").await,
        v5::PubAckReason::NotAuthorized
    );
    dana.no_publish(QUIET).await;
    let events = mallory.publishes_for(QUIET).await;
    let refused: Vec<Value> = events.iter().map(|p| json_of(&p.payload)).collect();
    assert!(
        refused
            .iter()
            .any(|v| v["ok"] == false && v["error"]["code"] == "forbidden" && v["id"].is_null()),
        "mallory is told why, without her id echoed: {refused:?}"
    );

    // Her own topic, or her own events, are fine.
    assert_eq!(
        rpc_with_response_topic(
            &mut mallory,
            "conversations",
            &json!({"id": "r1"}),
            "sensors/mallory/replies"
        )
        .await,
        v5::PubAckReason::Success
    );
    let v = reply_on(&mut mallory, "sensors/mallory/replies").await;
    assert_eq!(
        (v["id"].clone(), v["ok"].clone()),
        (json!("r1"), json!(true))
    );

    assert_eq!(
        rpc_with_response_topic(
            &mut mallory,
            "conversations",
            &json!({"id": "r2"}),
            "users/mallory/events"
        )
        .await,
        v5::PubAckReason::Success
    );
    let v = reply_on(&mut mallory, "users/mallory/events").await;
    assert_eq!(
        (v["id"].clone(), v["ok"].clone()),
        (json!("r2"), json!(true))
    );

    // Someone else's events, or a chat topic, are not.
    for topic in ["users/dana/events", "chat/dm:dana:mallory"] {
        assert_eq!(
            rpc_with_response_topic(&mut mallory, "conversations", &json!({"id": "r3"}), topic)
                .await,
            v5::PubAckReason::NotAuthorized,
            "{topic}"
        );
    }

    // A long or structured id is refused and never echoed.
    let long = "x".repeat(129);
    for id in [json!(long), json!({"cmd": "unlock"}), json!(7)] {
        assert_eq!(
            rpc_with_response_topic(
                &mut mallory,
                "conversations",
                &json!({ "id": id }),
                "sensors/mallory/replies"
            )
            .await,
            v5::PubAckReason::Success
        );
        let v = reply_on(&mut mallory, "sensors/mallory/replies").await;
        assert_eq!(v["ok"], false, "{v}");
        assert!(v["id"].is_null(), "not echoed: {v}");
    }
    dana.no_publish(QUIET).await;
}

// ---- Item 13: JWT claims and expiry -----------------------------------------

// The operator names the issuer and audience of user tokens. A token from
// another issuer, for another audience, without them, or not valid yet
// (`nbf` in the future) is refused; the right one logs in.
#[tokio::test]
async fn jwt_issuer_audience_and_not_before_are_checked() {
    let broker = Broker::start(&format!(
        "[auth]\njwt_secret = \"{SECRET}\"\njwt_issuer = \"https://id.example\"\njwt_audience = \"chatmq\"\n"
    ));
    let exp = now() + 600;
    let good = json!({"sub": "alice", "exp": exp, "iss": "https://id.example", "aud": "chatmq"});
    let mut bad = Vec::new();
    for (k, v) in [
        ("iss", json!("https://evil.example")),
        ("aud", json!("billing")),
        ("nbf", json!(now() + 300)),
    ] {
        let mut c = good.clone();
        c[k] = v;
        bad.push(c);
    }
    for k in ["iss", "aud"] {
        let mut c = good.clone();
        c.as_object_mut().expect("object").remove(k);
        bad.push(c);
    }
    for claims in bad {
        assert_eq!(
            refusal(
                v5_try(v5_opts(
                    &broker,
                    "a1",
                    Some(("alice", jwt(claims.clone()).as_str())),
                    0
                ))
                .await
            ),
            v5::ConnectReturnCode::BadUserNamePassword,
            "{claims}"
        );
    }
    v5_try(v5_opts(
        &broker,
        "a1",
        Some(("alice", jwt(good).as_str())),
        0,
    ))
    .await
    .expect("the right token");
}

// alice logs in with a token that expires in two seconds and stays idle
// (keepalive 60 s). When the token expires the broker ends the connection:
// MQTT 5 gets DISCONNECT 0xA0 (Maximum connect time); a 3.1.1 connection
// is closed. (A client that wants to stay refreshes its token with AUTH:
// next test.)
#[tokio::test]
async fn a_connection_ends_when_its_token_expires() {
    let broker = Broker::start(&format!("[auth]\njwt_secret = \"{SECRET}\"\n"));
    let token = jwt(json!({"sub": "alice", "exp": now() + 2}));

    let mut w = Wire::open(broker.addr).await;
    let connect = p5::Connect {
        keep_alive: 60,
        client_id: "expiring5".into(),
        clean_start: true,
        properties: None,
    };
    let login = p5::Login {
        username: "alice".into(),
        password: token.clone(),
    };
    w.send_v5(&p5::Packet::Connect(connect, None, Some(login)))
        .await;
    match w.next_v5(PATIENCE).await {
        Ok(p5::Packet::ConnAck(a)) => assert_eq!(a.code, p5::ConnectReturnCode::Success),
        other => panic!("expected CONNACK, got {other:?}"),
    }
    match w.next_v5(PATIENCE).await {
        Ok(p5::Packet::Disconnect(d)) => {
            assert_eq!(d.reason_code, p5::DisconnectReasonCode::MaximumConnectTime)
        }
        other => panic!("expected DISCONNECT 0xA0, got {other:?}"),
    }

    let token = jwt(json!({"sub": "alice", "exp": now() + 2}));
    let mut o = v4::options(broker.addr, "expiring4");
    o.set_credentials("alice", token);
    o.set_keep_alive(Duration::from_secs(60));
    let mut c = v4::connect(o).await.expect("3.1.1 login");
    let started = Instant::now();
    loop {
        match c.next().await {
            Ok(v4::Packet::PingResp) => continue,
            Ok(p) => panic!("unexpected {p:?}"),
            Err(e) => {
                assert!(
                    !e.contains("nothing arrived"),
                    "still connected after {:?}",
                    started.elapsed()
                );
                break;
            }
        }
    }
}

// ---- Items 9 and 11: what logging in may cost ------------------------------

// A password guesser tries alice's password from one address. After three
// failures (`failed_logins_per_ip = 3`) every further CONNECT from that
// address is refused at once, even with the right password (MQTT 5 0x9F
// Connection rate exceeded, 3.1.1 rc 5), and the credentials are no longer
// checked: the failure count stops at three.
#[tokio::test]
async fn repeated_failed_logins_from_one_address_are_refused_unchecked() {
    let broker = Broker::start(&format!(
        "{OPEN}\n[auth.limits]\nfailed_logins_per_ip = 3\nfailed_logins_per_user = 0\n"
    ));
    for i in 0..3 {
        assert_eq!(
            refusal(
                v5_try(v5_opts(
                    &broker,
                    &format!("g{i}"),
                    Some(("alice", "guess")),
                    0
                ))
                .await
            ),
            v5::ConnectReturnCode::BadUserNamePassword
        );
    }
    assert_eq!(
        refusal(v5_try(v5_opts(&broker, "g3", Some(("alice", "wonderland")), 0)).await),
        v5::ConnectReturnCode::ConnectionRateExceeded
    );
    assert_eq!(
        refusal(v4_try(v4_opts(&broker, "g4", Some(("bob", "wrong")), true)).await),
        v4::ConnectReturnCode::NotAuthorized
    );
    assert_eq!(metric(&broker, "chatmq_login_failures_total").await, 3.0);
    assert_eq!(
        metric(&broker, "chatmq_logins_rate_limited_total").await,
        2.0
    );
}

// The same per user name: three failures for alice lock alice's name for
// the window, while bob, from the same address, still logs in.
#[tokio::test]
async fn repeated_failed_logins_for_one_user_name_are_refused_unchecked() {
    let broker = Broker::start(&format!(
        "{OPEN}\n[auth.limits]\nfailed_logins_per_ip = 0\nfailed_logins_per_user = 3\n"
    ));
    for i in 0..3 {
        assert_eq!(
            refusal(
                v4_try(v4_opts(
                    &broker,
                    &format!("g{i}"),
                    Some(("alice", "guess")),
                    true
                ))
                .await
            ),
            v4::ConnectReturnCode::BadUserNamePassword
        );
    }
    assert_eq!(
        refusal(v4_try(v4_opts(&broker, "g3", Some(("alice", "wonderland")), true)).await),
        v4::ConnectReturnCode::NotAuthorized
    );
    v4_try(v4_opts(&broker, "b1", Some(("bob", "builder")), true))
        .await
        .expect("bob is not locked out");
}

// bob's password is stored as argon2 (19 MiB per check). With one check at
// a time and no queue, a burst of simultaneous logins does not run them
// all: those that find the hasher busy are refused with 0x89 Server busy
// (counted), the others log in.
#[tokio::test]
async fn password_checks_are_bounded_and_the_rest_refused_as_busy() {
    let salt = SaltString::encode_b64(b"chatmq-test-salt").expect("salt");
    let phc = Argon2::default()
        .hash_password(b"s3cret", &salt)
        .expect("hash")
        .to_string();
    let broker = Broker::start(&format!(
        "[[auth.users]]\nname = \"bob\"\npassword = \"{phc}\"\n[auth.limits]\npassword_checks = 1\npassword_check_queue = 0\n"
    ));
    let mut tries = Vec::new();
    for i in 0..24 {
        let o = v5_opts(&broker, &format!("burst-{i}"), Some(("bob", "s3cret")), 0);
        tries.push(tokio::spawn(async move {
            match v5::connect(o).await {
                Ok(c) => {
                    c.drop_connection();
                    None
                }
                Err(v5::ConnectionError::ConnectionRefused(code)) => Some(code),
                Err(e) => panic!("expected a CONNACK, got {e}"),
            }
        }));
    }
    let mut busy = 0;
    let mut ok = 0;
    for t in tries {
        match t.await.expect("task") {
            None => ok += 1,
            Some(v5::ConnectReturnCode::ServerBusy) => busy += 1,
            Some(other) => panic!("unexpected refusal {other:?}"),
        }
    }
    assert!(ok >= 1, "someone got through");
    assert!(busy >= 1, "the burst was not all hashed at once");
    assert_eq!(
        metric(&broker, "chatmq_logins_busy_total").await,
        busy as f64
    );
}

// ---- Item 12: sessions per user, and claims that lapse ---------------------

// With `max_sessions_per_user = 2` alice keeps two persistent sessions; a
// third is refused (MQTT 5 0x97 Quota exceeded, 3.1.1 rc 3), while a clean
// session and resuming one of hers still work. Once one of her sessions
// ends, the third may be created.
#[tokio::test]
async fn a_user_holds_at_most_max_sessions_per_user_persistent_sessions() {
    let broker = Broker::start(&format!("{OPEN}\n[mqtt]\nmax_sessions_per_user = 2\n"));
    let alice = Some(("alice", "wonderland"));
    for id in ["p1", "p2"] {
        v5_try(v5_opts(&broker, id, alice, 600))
            .await
            .expect(id)
            .disconnect()
            .await;
    }
    assert_eq!(
        refusal(v5_try(v5_opts(&broker, "p3", alice, 600)).await),
        v5::ConnectReturnCode::QuotaExceeded
    );
    assert_eq!(
        refusal(v4_try(v4_opts(&broker, "p3", alice, false)).await),
        v4::ConnectReturnCode::ServiceUnavailable
    );
    v4_try(v4_opts(&broker, "p4", alice, true))
        .await
        .expect("a clean session is not counted")
        .disconnect()
        .await;
    let p1 = v5_try(v5_opts(&broker, "p1", alice, 600))
        .await
        .expect("resuming is not a new session");
    assert!(p1.connack.session_present);
    p1.disconnect().await;
    assert!(metric(&broker, "chatmq_session_quota_refused_total").await >= 2.0);

    // p1 ends: Clean Start with no expiry, then gone.
    let mut clean = v5_opts(&broker, "p1", alice, 0);
    clean.set_clean_start(true);
    v5_try(clean).await.expect("p1, clean").disconnect().await;
    v5_try(v5_opts(&broker, "p3", alice, 600))
        .await
        .expect("room for p3");
}

// Anonymous clients have no user to count against: together they hold at
// most mqtt.max_anonymous_sessions sessions, so a loop of anonymous
// CONNECTs with fresh client ids cannot pile up stored sessions forever.
// At the cap a new persistent one is refused (0x97 / 3.1.1 rc 3); resuming
// one and clean sessions below the cap still work, and ending one makes room.
#[tokio::test]
async fn anonymous_clients_hold_at_most_max_anonymous_sessions() {
    let broker = Broker::start(&format!("{OPEN}\n[mqtt]\nmax_anonymous_sessions = 2\n"));
    v5_try(v5_opts(&broker, "anon-1", None, 600))
        .await
        .expect("anon-1")
        .disconnect()
        .await;
    let mut clean = v5_opts(&broker, "anon-clean", None, 0);
    clean.set_clean_start(true);
    let connected = v5_try(clean).await.expect("a clean session below the cap");
    assert_eq!(
        refusal(v5_try(v5_opts(&broker, "anon-2", None, 600)).await),
        v5::ConnectReturnCode::QuotaExceeded,
        "two sessions held: one stored, one connected"
    );
    connected.disconnect().await;
    v5_try(v5_opts(&broker, "anon-2", None, 600))
        .await
        .expect("the clean session ended: room for anon-2")
        .disconnect()
        .await;
    assert_eq!(
        refusal(v4_try(v4_opts(&broker, "anon-3", None, false)).await),
        v4::ConnectReturnCode::ServiceUnavailable
    );
    let resumed = v5_try(v5_opts(&broker, "anon-1", None, 600))
        .await
        .expect("resuming is not a new session");
    assert!(resumed.connack.session_present);
    resumed.disconnect().await;
    // alice is not anonymous: her quota is her own.
    v5_try(v5_opts(
        &broker,
        "alices",
        Some(("alice", "wonderland")),
        600,
    ))
    .await
    .expect("a user's session");
    assert!(metric(&broker, "chatmq_session_quota_refused_total").await >= 2.0);
}

// alice's old phone had a short session (expiry 2 s) and is never seen
// again. With `client_owner_ttl_secs = 1` her claim on `old-phone` lapses
// after the session ends and the time passes, and bob may then use the id.
// Her other phone's session (expiry 10 min) is still alive, so that id
// stays hers however long the wait.
#[tokio::test]
async fn a_client_id_claim_lapses_only_after_its_session_is_gone() {
    let broker = Broker::start(&format!("{OPEN}\n[mqtt]\nclient_owner_ttl_secs = 1\n"));
    let alice = Some(("alice", "wonderland"));
    let bob = Some(("bob", "builder"));
    v5_try(v5_opts(&broker, "old-phone", alice, 2))
        .await
        .expect("old phone")
        .disconnect()
        .await;
    assert_eq!(
        refusal(v5_try(v5_opts(&broker, "old-phone", bob, 0)).await),
        v5::ConnectReturnCode::NotAuthorized,
        "the claim holds while the session lives"
    );
    v5_try(v5_opts(&broker, "home-phone", alice, 600))
        .await
        .expect("home phone")
        .disconnect()
        .await;
    let deadline = Instant::now() + PATIENCE * 2;
    loop {
        match v5_try(v5_opts(&broker, "old-phone", bob, 0)).await {
            Ok(c) => {
                c.disconnect().await;
                break;
            }
            Err(v5::ConnectReturnCode::NotAuthorized) if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(300)).await;
            }
            Err(code) => panic!("old-phone is still refused to bob: {code:?}"),
        }
    }
    assert!(metric(&broker, "chatmq_client_owners_removed_total").await >= 1.0);
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        refusal(v5_try(v5_opts(&broker, "home-phone", bob, 0)).await),
        v5::ConnectReturnCode::NotAuthorized,
        "a claim with a live session never lapses"
    );
    let home = v5_try(v5_opts(&broker, "home-phone", alice, 600))
        .await
        .expect("alice's home phone");
    assert!(home.connack.session_present);
}

/// An MQTT 5 CONNECT of alice with `properties` (without their length) and
/// `password`, keepalive 60.
fn alice_connect(client_id: &str, properties: &[u8], password: Option<&str>) -> Vec<u8> {
    let mut payload = field(client_id.as_bytes());
    payload.extend(field(b"alice"));
    let mut flags = 0x02 | 0x80;
    if let Some(p) = password {
        flags |= 0x40;
        payload.extend(field(p.as_bytes()));
    }
    connect_bytes(5, flags, properties, &payload)
}

/// The Authentication Method property "JWT".
fn jwt_method() -> Vec<u8> {
    let mut p = vec![0x15];
    p.extend(field(b"JWT"));
    p
}

/// AUTH with `reason`, the JWT method and `token` as Authentication Data.
fn auth_bytes(reason: u8, method: &[u8], token: &str) -> Vec<u8> {
    let mut props = vec![0x15];
    props.extend(field(method));
    props.push(0x16);
    props.extend(field(token.as_bytes()));
    let mut body = vec![reason];
    body.extend(varint(props.len()));
    body.extend(props);
    packet(0xF0, &body)
}

/// Reads exactly `want.len()` bytes (or what arrives within PATIENCE).
async fn read_exactly(w: &mut Wire, want: &[u8]) -> Vec<u8> {
    let mut got = vec![0; want.len()];
    let read = tokio::time::timeout(PATIENCE, w.stream.read_exact(&mut got)).await;
    assert!(
        matches!(read, Ok(Ok(_))),
        "expected {want:02x?}, got {read:?}"
    );
    got
}

// [MQTT-4.12.1] alice connects with the Authentication Method "JWT" and a
// token that expires in two seconds. Before it does, she sends AUTH 0x19
// with a fresh token and is answered AUTH 0x00: her connection outlives the
// first token. A token of another user ends it with DISCONNECT 0x87; AUTH
// on a connection that named no method at CONNECT, or with another method,
// is a protocol error (0x82).
#[tokio::test]
async fn a_jwt_connection_refreshes_its_token_with_auth_instead_of_ending() {
    let broker = Broker::start(&format!("[auth]\njwt_secret = \"{SECRET}\"\n"));
    let short = jwt(json!({"sub": "alice", "exp": now() + 2}));
    let mut w = Wire::open(broker.addr).await;
    w.send(&alice_connect("refresher", &jwt_method(), Some(&short)))
        .await;
    match w.next_v5(PATIENCE).await {
        Ok(p5::Packet::ConnAck(a)) => {
            assert_eq!(a.code, p5::ConnectReturnCode::Success);
            let method = a.properties.and_then(|p| p.authentication_method);
            assert_eq!(method.as_deref(), Some("JWT"), "CONNACK names the method");
        }
        other => panic!("expected CONNACK, got {other:?}"),
    }
    let fresh = jwt(json!({"sub": "alice", "exp": now() + 600}));
    w.send(&auth_bytes(0x19, b"JWT", &fresh)).await;
    // AUTH, reason 0x00 Success, properties: the method "JWT".
    let success = [0xF0, 0x08, 0x00, 0x06, 0x15, 0x00, 0x03, b'J', b'W', b'T'];
    assert_eq!(read_exactly(&mut w, &success).await, success);
    tokio::time::sleep(Duration::from_secs(3)).await;
    w.send(&[0xC0, 0x00]).await;
    assert!(
        matches!(w.next_v5(PATIENCE).await, Ok(p5::Packet::PingResp(_))),
        "still connected after the first token expired"
    );
    assert_eq!(metric(&broker, "chatmq_reauthentications_total").await, 1.0);

    let bobs = jwt(json!({"sub": "bob", "exp": now() + 600}));
    w.send(&auth_bytes(0x19, b"JWT", &bobs)).await;
    match w.next_v5(PATIENCE).await {
        Ok(p5::Packet::Disconnect(d)) => {
            assert_eq!(d.reason_code, p5::DisconnectReasonCode::NotAuthorized)
        }
        other => panic!("expected DISCONNECT 0x87, got {other:?}"),
    }

    // The token may also come as Authentication Data instead of a password.
    let mut props = jwt_method();
    props.push(0x16);
    props.extend(field(fresh.as_bytes()));
    let mut w = Wire::open(broker.addr).await;
    w.send(&alice_connect("data-token", &props, None)).await;
    match w.next_v5(PATIENCE).await {
        Ok(p5::Packet::ConnAck(a)) => assert_eq!(a.code, p5::ConnectReturnCode::Success),
        other => panic!("expected CONNACK, got {other:?}"),
    }
    w.send(&auth_bytes(0x19, b"SCRAM-SHA-1", &fresh)).await;
    match w.next_v5(PATIENCE).await {
        Ok(p5::Packet::Disconnect(d)) => {
            assert_eq!(d.reason_code, p5::DisconnectReasonCode::ProtocolError)
        }
        other => panic!("another method: expected DISCONNECT 0x82, got {other:?}"),
    }

    let mut w = Wire::open(broker.addr).await;
    w.send(&alice_connect("no-method", &[], Some(&fresh))).await;
    assert!(matches!(
        w.next_v5(PATIENCE).await,
        Ok(p5::Packet::ConnAck(_))
    ));
    w.send(&auth_bytes(0x19, b"JWT", &fresh)).await;
    match w.next_v5(PATIENCE).await {
        Ok(p5::Packet::Disconnect(d)) => {
            assert_eq!(d.reason_code, p5::DisconnectReasonCode::ProtocolError)
        }
        other => panic!("no method at CONNECT: expected DISCONNECT 0x82, got {other:?}"),
    }
}
