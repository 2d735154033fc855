//! Flow control, told as the stories of careless and hostile clients: a
//! reader that stops reading while others chat, a 3.1.1 client that never
//! says how long it may stay silent, a session that falls behind, clients
//! that publish too fast, typing indicators in a loop, history asked with
//! numbers at the edge of u64, and the caches that must not only grow.
//! Every limit is observed on the wire and in `/metrics`.

use std::time::Duration;

use chatmq_tests::chat::{
    config, create_group, envelope, json_of, seq_of, token, v4_user, v5_login, v5_options, v5_rpc,
    v5_topic, v5_until,
};
use chatmq_tests::http::Http;
use chatmq_tests::metrics::{metric, metric_reaches};
use chatmq_tests::raw::{p4, p5, Silence, Wire};
use chatmq_tests::v5::{Packet, PubAckReason, QoS};
use chatmq_tests::{Broker, PATIENCE};
use rumqttc::v5::mqttbytes::v5::DisconnectReasonCode;
use serde_json::{json, Value};
use tokio::net::TcpSocket;

/// A raw MQTT 5 CONNECT of `user` (JWT) as `client_id`; persistent asks
/// for Clean Start 0 and a 10 minute session expiry.
fn connect_v5(
    client_id: &str,
    user: &str,
    keep_alive: u16,
    persistent: bool,
    receive_maximum: Option<u16>,
) -> p5::Packet {
    let mut props = p5::ConnectProperties::new();
    props.session_expiry_interval = persistent.then_some(600);
    props.receive_maximum = receive_maximum;
    p5::Packet::Connect(
        p5::Connect {
            keep_alive,
            client_id: client_id.into(),
            clean_start: !persistent,
            properties: Some(props),
        },
        None,
        Some(p5::Login {
            username: user.into(),
            password: token(user),
        }),
    )
}

/// Completes CONNECT / CONNACK and one SUBSCRIBE on `w`.
async fn raw_subscriber(w: &mut Wire, connect: p5::Packet, filter: &str, qos: QoS) {
    w.send_v5(&connect).await;
    match w.next_v5(PATIENCE).await {
        Ok(p5::Packet::ConnAck(a)) => assert_eq!(a.code, p5::ConnectReturnCode::Success),
        other => panic!("expected CONNACK, got {other:?}"),
    }
    let mut sub = p5::Subscribe::new(p5::Filter::new(filter, qos), None);
    sub.pkid = 1;
    w.send_v5(&p5::Packet::Subscribe(sub)).await;
    match w.next_v5(PATIENCE).await {
        Ok(p5::Packet::SubAck(a)) => {
            assert!(matches!(
                a.return_codes[0],
                p5::SubscribeReasonCode::Success(_)
            ))
        }
        other => panic!("expected SUBACK, got {other:?}"),
    }
}

/// A socket whose receive buffer is small, so that a client that does not
/// read fills it (and the broker's send buffer) quickly.
async fn small_window_socket(b: &Broker) -> Wire {
    let socket = TcpSocket::new_v4().expect("socket");
    socket.set_recv_buffer_size(8 * 1024).expect("SO_RCVBUF");
    Wire::over(socket.connect(b.addr).await.expect("connect"))
}

/// Sends envelope `id` on `topic` and expects it accepted.
async fn send_chat(c: &mut chatmq_tests::v5::Client, topic: &str, id: &str) {
    send_chat_text(c, topic, id, "hi").await;
}

async fn send_chat_text(c: &mut chatmq_tests::v5::Client, topic: &str, id: &str, text: &str) {
    let ack = c
        .publish_acked(topic, QoS::AtLeastOnce, false, &envelope(id, text))
        .await;
    assert_eq!(reason(ack), PubAckReason::Success, "{id}");
}

fn reason(ack: Option<Packet>) -> PubAckReason {
    match ack {
        Some(Packet::PubAck(a)) => a.reason,
        other => panic!("expected PUBACK, got {other:?}"),
    }
}

/// DESIGN §3 step 9 and issue 10 item 16, "a reader that never reads while
/// others chat": carol's phone hangs with its socket open, subscribed to
/// a busy room at QoS 1 with a persistent session. Alice keeps sending
/// large messages; bob gets every one of them in order while carol is
/// stuck (no head-of-line blocking); what the broker holds for carol in
/// memory stays within `mqtt.session_queue_bytes` (the rest waits in the
/// log); carol's connection is closed by the write deadline
/// (`mqtt.write_timeout_secs`) and counted. When carol's phone comes back
/// it resumes from its cursor and gets every message once, in order.
#[tokio::test]
async fn a_reader_that_never_reads_is_closed_by_the_write_deadline_and_resumes_without_gap() {
    let budget = 4 * 1024 * 1024;
    let b = Broker::start(&config(&format!(
        "[mqtt]\nwrite_timeout_secs = 2\nsession_queue_bytes = {budget}\n[storage]\nsync = \"never\"\n"
    )));
    let mut alice = v5_login(v5_options(b.addr, "alice", "alice", false)).await;
    alice
        .subscribe("users/alice/events", QoS::AtLeastOnce)
        .await;
    create_group(&mut alice, "room", &["bob", "carol"]).await;
    // The metric sums every session: bob's own window (at most BOB_WINDOW
    // messages in flight to him) is allowed for beside carol's budget.
    const BOB_WINDOW: u16 = 8;
    let mut bob_options = v5_options(b.addr, "bob", "bob", false);
    bob_options.set_receive_maximum(Some(BOB_WINDOW));
    let mut bob = v5_login(bob_options).await;
    bob.subscribe("chat/room", QoS::AtLeastOnce).await;

    let mut carol = small_window_socket(&b).await;
    raw_subscriber(
        &mut carol,
        connect_v5("carol-phone", "carol", 300, true, None),
        "chat/room",
        QoS::AtLeastOnce,
    )
    .await;
    // From here on carol reads nothing.

    let n = 300u64;
    let text = "x".repeat(48 * 1024);
    let mut held_max = 0f64;
    for i in 1..=n {
        let ack = alice
            .publish_acked(
                "chat/room",
                QoS::AtLeastOnce,
                false,
                &envelope(&format!("m{i}"), &text),
            )
            .await;
        assert_eq!(reason(ack), PubAckReason::Success, "message {i}");
        if i % 50 == 0 {
            held_max = held_max.max(metric(&b, "chatmq_session_held_bytes").await);
        }
    }
    let got = v5_until(&mut bob, Duration::from_secs(60), |g| {
        g.iter().filter(|p| v5_topic(p) == "chat/room").count() as u64 >= n
    })
    .await;
    let seqs: Vec<u64> = got.iter().map(|p| seq_of(&p.payload)).collect();
    chatmq_tests::chat::assert_dense(&seqs, n, "bob, while carol is stuck");

    metric_reaches(&b, "chatmq_write_timeouts_total", 1.0, PATIENCE).await;
    held_max = held_max.max(metric(&b, "chatmq_session_held_bytes").await);
    let bobs = usize::from(BOB_WINDOW) * (text.len() + 1024);
    assert!(
        held_max <= (budget + bobs + 64 * 1024) as f64,
        "the sessions held {held_max} bytes in memory; carol's budget is {budget}, \
         bob's window {bobs}"
    );
    assert!(
        carol.closed_within(PATIENCE).await,
        "carol's stuck connection is closed"
    );

    let mut carol = v5_login(v5_options(b.addr, "carol-phone", "carol", true)).await;
    assert!(carol.connack.session_present);
    let got = v5_until(&mut carol, Duration::from_secs(60), |g| {
        g.iter().filter(|p| v5_topic(p) == "chat/room").count() as u64 >= n
    })
    .await;
    let seqs: Vec<u64> = got
        .iter()
        .filter(|p| v5_topic(p) == "chat/room")
        .map(|p| seq_of(&p.payload))
        .collect();
    chatmq_tests::chat::assert_dense(&seqs, n, "carol after resuming");
    carol.no_publish(Duration::from_millis(500)).await;
}

/// A 3.1.1 client cannot be told a Server Keep Alive. Dave's device sends
/// keepalive 0 ("never time me out") and then goes silent; another sends
/// 65535 s. Neither may hold a connection forever: both are closed after
/// 1.5 x `mqtt.keepalive_max` without a packet [MQTT-3.1.2-24]
/// (ARCHITECTURE.md, "Keepalive").
#[tokio::test]
async fn a_3_1_1_client_with_keepalive_0_or_above_the_maximum_is_closed_when_silent() {
    let b = Broker::start(&format!(
        "{}\n[mqtt]\nkeepalive_max = 2\n",
        chatmq_tests::OPEN
    ));
    for keep_alive in [0u16, u16::MAX] {
        let mut w = Wire::open(b.addr).await;
        let mut connect = p4::Connect::new(format!("dave-{keep_alive}"));
        connect.keep_alive = keep_alive;
        w.send_v4(&p4::Packet::Connect(connect)).await;
        match w.next_v4(PATIENCE).await {
            Ok(p4::Packet::ConnAck(a)) => assert_eq!(a.code, p4::ConnectReturnCode::Success),
            other => panic!("expected CONNACK, got {other:?}"),
        }
        assert!(
            w.closed_within(Duration::from_secs(8)).await,
            "a silent 3.1.1 client with keepalive {keep_alive} is closed after 1.5 x keepalive_max"
        );
    }
}

/// Erin publishes faster than her connection's rate (`mqtt.publish_rate`
/// 1/s, burst 3). MQTT 5 QoS 1 publishes over it are refused with PUBACK
/// 0x97 Quota exceeded (0x96 is not a PUBACK code in MQTT 5 3.4.2.1, only
/// a DISCONNECT one); a QoS 0 flood, which has no ack, ends with
/// DISCONNECT 0x96 Message rate too high (MQTT 5 3.14.2.1). Each refusal
/// is counted.
#[tokio::test]
async fn publishing_faster_than_the_connection_rate_is_refused_and_counted() {
    let b = Broker::start(&config(
        "[mqtt]\npublish_rate = 1\npublish_burst = 3\n\n[[acl.rules]]\nuser = \"*\"\ntopic = \"t/#\"\naccess = \"pubsub\"\n",
    ));
    let mut erin = v5_login(v5_options(b.addr, "erin", "erin", false)).await;
    let mut reasons = Vec::new();
    for i in 0..5 {
        let ack = erin
            .publish_acked("t/x", QoS::AtLeastOnce, false, format!("{i}").as_bytes())
            .await;
        reasons.push(reason(ack));
    }
    assert_eq!(&reasons[..3], &[PubAckReason::Success; 3], "{reasons:?}");
    assert_eq!(reasons[3], PubAckReason::QuotaExceeded, "{reasons:?}");
    assert!(metric(&b, "chatmq_publishes_rate_limited_total").await >= 1.0);

    let mut w = Wire::open(b.addr).await;
    w.send_v5(&connect_v5("erin-flood", "frank", 60, false, None))
        .await;
    assert!(matches!(
        w.next_v5(PATIENCE).await,
        Ok(p5::Packet::ConnAck(_))
    ));
    for _ in 0..10 {
        let p = p5::Publish::new("t/flood", QoS::AtMostOnce, "x", None);
        w.send_v5(&p5::Packet::Publish(p)).await;
    }
    match w.next_v5(PATIENCE).await {
        Ok(p5::Packet::Disconnect(d)) => {
            assert_eq!(d.reason_code, DisconnectReasonCode::MessageRateTooHigh)
        }
        other => panic!("expected DISCONNECT 0x96, got {other:?}"),
    }
    assert_eq!(w.next_v5(PATIENCE).await, Err(Silence::Closed));
}

/// Grace opens three connections to share out her publishes; the user's
/// rate (`mqtt.user_publish_rate` 1/s, burst 3) holds over all of them.
/// Over 3.1.1, which has no reason codes, the refused chat message is
/// acknowledged and reported as a `rate_limited` error event carrying its
/// envelope id (DESIGN §4).
#[tokio::test]
async fn a_users_rate_holds_across_connections_and_3_1_1_is_told_by_an_event() {
    let b = Broker::start(&config(
        "[mqtt]\nuser_publish_rate = 1\nuser_publish_burst = 3\n",
    ));
    let conv = "chat/dm:grace:heidi";
    let mut phones = Vec::new();
    for i in 0..3 {
        phones.push(v5_login(v5_options(b.addr, &format!("grace-{i}"), "grace", false)).await);
    }
    for (i, phone) in phones.iter_mut().enumerate() {
        let ack = phone
            .publish_acked(
                conv,
                QoS::AtLeastOnce,
                false,
                &envelope(&format!("g{i}"), "hi"),
            )
            .await;
        assert_eq!(reason(ack), PubAckReason::Success, "phone {i}");
    }
    let mut laptop = v4_user(&b, "grace").await;
    laptop
        .subscribe("users/grace/events", rumqttc::QoS::AtLeastOnce)
        .await;
    laptop
        .publish_acked(
            conv,
            rumqttc::QoS::AtLeastOnce,
            false,
            &envelope("g3", "hi"),
        )
        .await;
    let events = chatmq_tests::chat::v4_until(&mut laptop, PATIENCE, |g| {
        chatmq_tests::chat::v4_events(g)
            .iter()
            .any(|e| e["code"] == "rate_limited")
    })
    .await;
    let refusal = chatmq_tests::chat::v4_events(&events)
        .into_iter()
        .find(|e| e["code"] == "rate_limited")
        .expect("event");
    assert_eq!(refusal["type"], "error");
    assert_eq!(refusal["id"], "g3");
    assert_eq!(refusal["topic"], conv);
    assert!(metric(&b, "chatmq_publishes_rate_limited_total").await >= 1.0);
}

/// Ivan's client sends a typing indicator on every key press. Members get
/// at most one per `chat.typing_interval_ms` from him in a conversation;
/// the rest are acknowledged, dropped and counted. An indicator larger than
/// `chat.typing_max_bytes` is refused (MQTT 5: 0x97) and counted.
#[tokio::test]
async fn typing_indicators_are_throttled_per_user_and_conversation_and_size_capped() {
    let b = Broker::start(&config(
        "[chat]\ntyping_interval_ms = 60000\ntyping_max_bytes = 64\n",
    ));
    let mut judy = v5_login(v5_options(b.addr, "judy", "judy", false)).await;
    judy.subscribe("typing/dm:ivan:judy", QoS::AtMostOnce).await;
    let mut ivan = v5_login(v5_options(b.addr, "ivan", "ivan", false)).await;
    for _ in 0..10 {
        let ack = ivan
            .publish_acked(
                "typing/dm:ivan:judy",
                QoS::AtLeastOnce,
                false,
                br#"{"typing":true}"#,
            )
            .await;
        assert_eq!(reason(ack), PubAckReason::Success);
    }
    let got = judy.publishes_for(Duration::from_secs(1)).await;
    assert_eq!(got.len(), 1, "one indicator forwarded: {got:?}");
    assert_eq!(json_of(&got[0].payload)["from"], "ivan");
    assert!(metric(&b, "chatmq_typing_throttled_total").await >= 9.0);

    let big = format!(r#"{{"typing":true,"pad":"{}"}}"#, "x".repeat(100));
    let ack = ivan
        .publish_acked(
            "typing/dm:ivan:judy",
            QoS::AtLeastOnce,
            false,
            big.as_bytes(),
        )
        .await;
    assert_eq!(reason(ack), PubAckReason::QuotaExceeded);
    assert!(metric(&b, "chatmq_typing_too_large_total").await >= 1.0);
}

/// Kim's app asks history with numbers at the edges of u64, over HTTP and
/// over RPC. `after = u64::MAX` has nothing after it, `before = 0`
/// nothing before it, a huge `limit` is capped by `chat.history_limit`:
/// answers, never a panic or a wrapped-around page.
#[tokio::test]
async fn history_with_extreme_numbers_is_answered_not_a_panic() {
    let b = Broker::start(&config(""));
    let mut kim = v5_login(v5_options(b.addr, "kim", "kim", false)).await;
    kim.subscribe("users/kim/events", QoS::AtLeastOnce).await;
    for i in 1..=3 {
        let ack = kim
            .publish_acked(
                "chat/dm:kim:leo",
                QoS::AtLeastOnce,
                false,
                &envelope(&format!("k{i}"), "hi"),
            )
            .await;
        assert_eq!(reason(ack), PubAckReason::Success);
    }
    let http = Http::new(b.http_addr).with_token(&token("kim"));
    let page = |q: &str| format!("/v1/conversations/dm:kim:leo/messages?{q}");
    let count = |v: &Value| v["messages"].as_array().map(Vec::len);
    for (q, expected) in [
        ("after=18446744073709551615", 0),
        ("after=18446744073709551614", 0),
        ("before=0", 0),
        ("after=0&before=18446744073709551615", 3),
        ("limit=18446744073709551615", 3),
        ("after=1&limit=18446744073709551615", 2),
    ] {
        let r = http.get(&page(q)).await;
        assert_eq!(r.status, 200, "{q}: {}", r.text());
        assert_eq!(count(&r.json()), Some(expected), "{q}: {}", r.text());
    }
    for (i, params) in [
        json!({"conv": "dm:kim:leo", "after": u64::MAX}),
        json!({"conv": "dm:kim:leo", "before": 0}),
        json!({"conv": "dm:kim:leo", "after": u64::MAX, "limit": u64::MAX}),
    ]
    .into_iter()
    .enumerate()
    {
        let (reply, _) = v5_rpc(&mut kim, "history", &format!("h{i}"), params.clone()).await;
        assert_eq!(reply["ok"], true, "{params}: {reply}");
        assert_eq!(count(&reply["result"]), Some(0), "{params}: {reply}");
    }
    let (reply, _) = v5_rpc(
        &mut kim,
        "history",
        "h-all",
        json!({"conv": "dm:kim:leo", "after": 0, "limit": u64::MAX}),
    )
    .await;
    assert_eq!(count(&reply["result"]), Some(3), "{reply}");
}

/// Mallory subscribes to everything at QoS 1 with Receive Maximum 1 and
/// never acknowledges nor reads: plain messages pile up in her session.
/// At `mqtt.session_queue_bytes` the oldest are dropped (counted) and her
/// connection is closed as overloaded with DISCONNECT 0x97, counted.
#[tokio::test]
async fn a_session_over_its_byte_budget_is_disconnected_as_overloaded() {
    let b = Broker::start(&config(
        "[mqtt]\nsession_queue_bytes = 65536\n\n[[acl.rules]]\nuser = \"*\"\ntopic = \"t/#\"\naccess = \"pubsub\"\n",
    ));
    let mut mallory = Wire::open(b.addr).await;
    raw_subscriber(
        &mut mallory,
        connect_v5("mallory", "mallory", 300, false, Some(1)),
        "t/#",
        QoS::AtLeastOnce,
    )
    .await;
    let mut nick = v5_login(v5_options(b.addr, "nick", "nick", false)).await;
    let body = vec![b'x'; 2048];
    for _ in 0..100 {
        let ack = nick
            .publish_acked("t/x", QoS::AtLeastOnce, false, &body)
            .await;
        assert_eq!(reason(ack), PubAckReason::Success);
    }
    metric_reaches(&b, "chatmq_overload_disconnects_total", 1.0, PATIENCE).await;
    assert!(metric(&b, "chatmq_messages_dropped_total").await >= 1.0);
    loop {
        match mallory.next_v5(PATIENCE).await {
            Ok(p5::Packet::Publish(_)) => continue,
            Ok(p5::Packet::Disconnect(d)) => {
                assert_eq!(d.reason_code, DisconnectReasonCode::QuotaExceeded);
                break;
            }
            other => panic!("expected DISCONNECT 0x97, got {other:?}"),
        }
    }
    assert!(mallory.closed_within(PATIENCE).await);
}

/// Olivia chats in one direct conversation, goes quiet, and chats in
/// another. The quiet conversation's state leaves memory
/// (`chat.conv_idle_secs`); coming back to it continues its seqs, and a
/// retry of her last envelope id still gets its original seq (the key is
/// on disk). After `chat.dedup_ttl_secs` the idempotency keys are deleted
/// in the background: a retry that late is a new message with a new seq.
#[tokio::test]
async fn idle_conversations_leave_memory_and_idempotency_keys_expire() {
    let b = Broker::start(&config("[chat]\nconv_idle_secs = 1\ndedup_ttl_secs = 4\n"));
    let mut olivia = v5_login(v5_options(b.addr, "olivia", "olivia", false)).await;
    let quiet = "chat/dm:olivia:pat";
    let other = "chat/dm:olivia:quinn";
    send_chat(&mut olivia, quiet, "m1").await;
    tokio::time::sleep(Duration::from_millis(1600)).await;
    send_chat(&mut olivia, other, "c1").await;
    assert!(metric(&b, "chatmq_conv_cache_evicted_total").await >= 1.0);
    send_chat(&mut olivia, quiet, "m1").await; // a retry, within the window
    send_chat(&mut olivia, quiet, "m2").await;

    metric_reaches(
        &b,
        "chatmq_dedup_expired_total",
        3.0,
        Duration::from_secs(15),
    )
    .await;
    tokio::time::sleep(Duration::from_millis(1600)).await;
    send_chat(&mut olivia, other, "c2").await; // the quiet conversation leaves memory again
    send_chat(&mut olivia, quiet, "m1").await; // too late to be a retry

    let http = Http::new(b.http_addr).with_token(&token("olivia"));
    let r = http
        .get("/v1/conversations/dm:olivia:pat/messages?after=0")
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    let ids: Vec<(u64, String)> = r.json()["messages"]
        .as_array()
        .expect("messages")
        .iter()
        .map(|m| {
            (
                m["seq"].as_u64().unwrap_or(0),
                m["id"].as_str().unwrap_or("").to_string(),
            )
        })
        .collect();
    assert_eq!(
        ids,
        [
            (1, "m1".to_string()),
            (2, "m2".to_string()),
            (3, "m1".to_string())
        ],
        "seqs continue after eviction; the retry in the window was not stored; the late one was"
    );
}

/// Waits until the `chatmq_connections` gauge is `n`; panics after PATIENCE.
async fn connections_become(b: &Broker, n: f64) {
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        let v = metric(b, "chatmq_connections").await;
        if v == n {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "chatmq_connections is {v}, not {n}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Rosa's phone hangs while the broker is writing a busy room to it (the
/// write deadline is far away). She opens the app on her tablet with the
/// same client id: the takeover ends the stuck connection at once
/// [MQTT-3.1.4-3], without waiting for the write to finish.
#[tokio::test]
async fn a_takeover_ends_a_connection_stuck_in_a_write() {
    let b = Broker::start(&config(
        "[mqtt]\nwrite_timeout_secs = 600\n[storage]\nsync = \"never\"\n",
    ));
    let mut sam = v5_login(v5_options(b.addr, "sam", "sam", false)).await;
    let mut rosa = small_window_socket(&b).await;
    raw_subscriber(
        &mut rosa,
        connect_v5("rosa-app", "rosa", 300, false, None),
        "chat/dm:rosa:sam",
        QoS::AtMostOnce,
    )
    .await;
    let text = "x".repeat(48 * 1024);
    for i in 0..200 {
        send_chat_text(&mut sam, "chat/dm:rosa:sam", &format!("s{i}"), &text).await;
    }
    connections_become(&b, 2.0).await;
    let tablet = v5_login(v5_options(b.addr, "rosa-app", "rosa", false)).await;
    connections_become(&b, 2.0).await;
    assert!(
        rosa.closed_within(PATIENCE).await,
        "the stuck connection is closed"
    );
    drop(tablet);
}
