//! MQTT over WebSocket: the same broker, the same sessions and the same
//! chat as over TCP, reached through the `[websocket]` listener. Clients are
//! rumqttc's WebSocket transport and a raw WebSocket client for the
//! transport's own rules (path, subprotocol, origin, limits, framing).

use std::net::SocketAddr;
use std::time::Duration;

use chatmq_tests::chat::{self, envelope, json_of, seq_of, token};
use chatmq_tests::raw::Silence;
use chatmq_tests::ws::{self, Ending};
use chatmq_tests::{v4, v5, Broker, OPEN, PATIENCE};
use futures_util::SinkExt;
use rumqttc::v5::mqttbytes::v5 as p5;
use rumqttc::Transport;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::Message;

const SHORT: Duration = Duration::from_millis(500);

fn ws_url(addr: SocketAddr, path: &str) -> String {
    format!("ws://{addr}{path}")
}

/// rumqttc MQTT 5 options for `user` over WebSocket.
fn v5_ws(b: &Broker, client_id: &str, user: &str, persistent: bool) -> v5::MqttOptions {
    let addr = b.ws_addr();
    let mut o = v5::MqttOptions::new(client_id, ws_url(addr, "/mqtt"), addr.port());
    o.set_transport(Transport::Ws);
    o.set_keep_alive(Duration::from_secs(30));
    o.set_credentials(user, token(user));
    if persistent {
        o.set_clean_start(false);
        o.set_session_expiry_interval(Some(600));
    }
    o
}

/// rumqttc 3.1.1 options for `user` over WebSocket.
fn v4_ws(b: &Broker, client_id: &str, user: &str) -> v4::MqttOptions {
    let addr = b.ws_addr();
    let mut o = v4::MqttOptions::new(client_id, ws_url(addr, "/mqtt"), addr.port());
    o.set_transport(Transport::Ws);
    o.set_keep_alive(Duration::from_secs(30));
    o.set_credentials(user, token(user));
    o
}

#[tokio::test]
async fn websocket_and_tcp_clients_chat_under_both_protocol_versions() {
    let b = Broker::start(&chat::config(""));
    // alice: MQTT 5 over WebSocket; bob: 3.1.1 over TCP.
    let mut alice = chat::v5_login(v5_ws(&b, "alice-ws", "alice", false)).await;
    let mut bob = chat::v4_user(&b, "bob").await;
    alice
        .subscribe("chat/dm:alice:bob", v5::QoS::AtLeastOnce)
        .await;
    bob.subscribe("chat/dm:alice:bob", v4::QoS::AtLeastOnce)
        .await;

    // Each side sees each message, in seq order (publish_acked skips what
    // arrives before its ack, so each message is read before the next send).
    let (_, mut seen) = alice
        .publish_acked_keeping(
            "chat/dm:alice:bob",
            v5::QoS::AtLeastOnce,
            false,
            &envelope("a1", "hi bob"),
        )
        .await;
    let to_bob = bob.publish().await.payload;
    assert_eq!(
        (seq_of(&to_bob), json_of(&to_bob)["from"].clone()),
        (1, "alice".into())
    );
    bob.publish_acked(
        "chat/dm:alice:bob",
        v4::QoS::AtLeastOnce,
        false,
        &envelope("b1", "hi alice"),
    )
    .await;
    seen.extend(alice.publishes_for(Duration::from_secs(1)).await);
    let seen_by_alice: Vec<u64> = seen.iter().map(|p| seq_of(&p.payload)).collect();
    assert_eq!(
        seen_by_alice,
        [1, 2],
        "alice sees both messages in order, once"
    );

    // And the other way round: 3.1.1 over WebSocket, MQTT 5 over TCP.
    let mut carol = chat::v4_login(v4_ws(&b, "carol-ws", "carol")).await;
    let mut dave = chat::v5_user(&b, "dave").await;
    carol.subscribe("chat/+", v4::QoS::AtLeastOnce).await;
    dave.publish_acked(
        "chat/dm:carol:dave",
        v5::QoS::AtLeastOnce,
        false,
        &envelope("d1", "yo"),
    )
    .await;
    let got = carol.publish().await;
    assert_eq!(json_of(&got.payload)["conv"], "dm:carol:dave");
    assert_eq!(seq_of(&got.payload), 1);
}

#[tokio::test]
async fn a_session_started_over_tcp_resumes_over_websocket_with_what_was_queued() {
    let config =
        chat::config("[[acl.rules]]\nuser = \"*\"\ntopic = \"news/#\"\naccess = \"pubsub\"\n");
    let b = Broker::start(&config);
    // erin's phone: a persistent session over TCP.
    let mut erin = chat::v5_login(chat::v5_options(b.addr, "erin-phone", "erin", true)).await;
    erin.subscribe("news/#", v5::QoS::AtLeastOnce).await;
    erin.subscribe("chat/+", v5::QoS::AtLeastOnce).await;
    erin.disconnect().await;

    // While she is away: plain MQTT and chat messages for her.
    let mut frank = chat::v5_user(&b, "frank").await;
    for i in 0..3 {
        frank
            .publish_acked(
                &format!("news/{i}"),
                v5::QoS::AtLeastOnce,
                false,
                format!("n{i}").as_bytes(),
            )
            .await;
        frank
            .publish_acked(
                "chat/dm:erin:frank",
                v5::QoS::AtLeastOnce,
                false,
                &envelope(&format!("f{i}"), "hey"),
            )
            .await;
    }

    // The same client id, now over WebSocket (a browser tab of the same app).
    let mut erin = chat::v5_login(v5_ws(&b, "erin-phone", "erin", true)).await;
    assert!(erin.connack.session_present, "the TCP session is resumed");
    let got = erin.publishes_for(Duration::from_secs(2)).await;
    let news: Vec<String> = got
        .iter()
        .filter(|p| p.topic.starts_with(b"news/"))
        .map(|p| String::from_utf8_lossy(&p.payload).into_owned())
        .collect();
    assert_eq!(
        news,
        ["n0", "n1", "n2"],
        "queued plain messages, in order, once"
    );
    let seqs: Vec<u64> = got
        .iter()
        .filter(|p| p.topic.starts_with(b"chat/"))
        .map(|p| seq_of(&p.payload))
        .collect();
    assert_eq!(
        seqs,
        [1, 2, 3],
        "the chat messages replayed, in order, once"
    );
}

#[tokio::test]
async fn the_upgrade_accepts_the_mqtt_path_and_root_and_negotiates_the_subprotocol() {
    let b = Broker::start(OPEN);
    let addr = b.ws_addr();
    let wire = ws::open(addr, "/mqtt", &["mqtt"], None)
        .await
        .expect("upgrade");
    assert_eq!(wire.protocol.as_deref(), Some("mqtt"));
    let wire = ws::open(addr, "/", &["mqtt"], None)
        .await
        .expect("upgrade at /");
    assert_eq!(wire.protocol.as_deref(), Some("mqtt"));
    let wire = ws::open(addr, "/mqtt", &["mqttv3.1"], None)
        .await
        .expect("old clients");
    assert_eq!(wire.protocol.as_deref(), Some("mqttv3.1"));
    let wire = ws::open(addr, "/mqtt", &["wamp", "mqtt"], None)
        .await
        .expect("a list");
    assert_eq!(wire.protocol.as_deref(), Some("mqtt"));
    let wire = ws::open(addr, "/mqtt", &[], None)
        .await
        .expect("no subprotocol offered");
    assert_eq!(wire.protocol, None, "none offered, none answered");

    assert_eq!(
        ws::open(addr, "/other", &["mqtt"], None).await.err(),
        Some(404)
    );
    assert_eq!(
        ws::open(addr, "/mqtt", &["wamp"], None).await.err(),
        Some(400)
    );
}

#[tokio::test]
async fn an_origin_allow_list_refuses_other_origins() {
    let config = format!("{OPEN}\n[websocket]\nallowed_origins = [\"https://chat.example.com\"]\n");
    let b = Broker::start(&config);
    let addr = b.ws_addr();
    assert!(
        ws::open(addr, "/mqtt", &["mqtt"], Some("https://chat.example.com"))
            .await
            .is_ok()
    );
    assert_eq!(
        ws::open(addr, "/mqtt", &["mqtt"], Some("https://evil.example.net"))
            .await
            .err(),
        Some(403)
    );
    assert_eq!(
        ws::open(addr, "/mqtt", &["mqtt"], None).await.err(),
        Some(403)
    );
}

#[tokio::test]
async fn connections_per_address_are_limited_and_freed() {
    let config = format!("{OPEN}\n[websocket]\nmax_connections_per_ip = 2\n");
    let b = Broker::start(&config);
    let addr = b.ws_addr();
    let first = ws::open(addr, "/mqtt", &["mqtt"], None)
        .await
        .expect("first");
    let _second = ws::open(addr, "/mqtt", &["mqtt"], None)
        .await
        .expect("second");
    assert_eq!(
        ws::open(addr, "/mqtt", &["mqtt"], None).await.err(),
        Some(429)
    );
    drop(first);
    // The broker notices the closed socket, then frees the place.
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        match ws::open(addr, "/mqtt", &["mqtt"], None).await {
            Ok(_) => break,
            Err(429) if tokio::time::Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(50)).await
            }
            Err(status) => panic!("a freed place stays taken: {status}"),
        }
    }
}

#[tokio::test]
async fn a_silent_socket_is_closed_after_the_handshake_timeout() {
    let config = format!("{OPEN}\n[websocket]\nhandshake_timeout_secs = 1\n");
    let b = Broker::start(&config);
    let mut socket = chatmq_tests::raw::Wire::open(b.ws_addr()).await;
    assert!(
        !socket.closed_within(SHORT).await,
        "open before the timeout"
    );
    assert!(
        socket.closed_within(Duration::from_secs(3)).await,
        "closed after it"
    );
}

fn connect_packet(id: &str) -> p5::Packet {
    p5::Packet::Connect(
        p5::Connect {
            keep_alive: 30,
            client_id: id.to_string(),
            clean_start: true,
            properties: None,
        },
        None,
        None,
    )
}

#[tokio::test]
async fn packets_split_across_messages_or_packed_into_one_are_served() {
    let b = Broker::start(OPEN);
    let mut wire = ws::open(b.ws_addr(), "/mqtt", &["mqtt"], None)
        .await
        .expect("upgrade");
    // CONNECT one byte per WebSocket message.
    for byte in chatmq_tests::raw::v5_bytes(&connect_packet("split")) {
        wire.send(&[byte]).await;
    }
    match wire.next_v5(PATIENCE).await {
        Ok(p5::Packet::ConnAck(ack)) => assert_eq!(ack.code, p5::ConnectReturnCode::Success),
        other => panic!("expected CONNACK, got {other:?}"),
    }
    // SUBSCRIBE and a PUBLISH to it in one message.
    let mut subscribe = p5::Subscribe::new(p5::Filter::new("echo/#", v5::QoS::AtMostOnce), None);
    subscribe.pkid = 1;
    let subscribe = p5::Packet::Subscribe(subscribe);
    let publish = p5::Packet::Publish(p5::Publish::new(
        "echo/1",
        v5::QoS::AtMostOnce,
        "packed",
        None,
    ));
    let mut packed = chatmq_tests::raw::v5_bytes(&subscribe);
    packed.extend(chatmq_tests::raw::v5_bytes(&publish));
    wire.send(&packed).await;
    match wire.next_v5(PATIENCE).await {
        Ok(p5::Packet::SubAck(_)) => {}
        other => panic!("expected SUBACK, got {other:?}"),
    }
    match wire.next_v5(PATIENCE).await {
        Ok(p5::Packet::Publish(p)) => assert_eq!(&p.payload[..], b"packed"),
        other => panic!("expected the PUBLISH back, got {other:?}"),
    }
}

#[tokio::test]
async fn a_ping_frame_is_answered_with_a_pong() {
    let b = Broker::start(OPEN);
    let mut wire = ws::open(b.ws_addr(), "/mqtt", &["mqtt"], None)
        .await
        .expect("upgrade");
    wire.send_v5(&connect_packet("pinger")).await;
    assert!(matches!(
        wire.next_v5(PATIENCE).await,
        Ok(p5::Packet::ConnAck(_))
    ));
    wire.ws
        .send(Message::Ping(b"are you there".to_vec().into()))
        .await
        .expect("ping");
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        use futures_util::StreamExt;
        match tokio::time::timeout_at(deadline, wire.ws.next()).await {
            Ok(Some(Ok(Message::Pong(data)))) => {
                assert_eq!(&data[..], b"are you there");
                break;
            }
            Ok(Some(Ok(_))) => {}
            other => panic!("no pong: {other:?}"),
        }
    }
}

#[tokio::test]
async fn a_text_frame_closes_that_connection_with_1003_and_only_that_one() {
    let b = Broker::start(OPEN);
    let mut bystander = v5::connect_ok(b.addr, "bystander").await;
    let mut wire = ws::open(b.ws_addr(), "/mqtt", &["mqtt"], None)
        .await
        .expect("upgrade");
    wire.send_v5(&connect_packet("texter")).await;
    assert!(matches!(
        wire.next_v5(PATIENCE).await,
        Ok(p5::Packet::ConnAck(_))
    ));
    wire.ws
        .send(Message::text("hello"))
        .await
        .expect("send text");
    assert_eq!(
        wire.ending(PATIENCE).await,
        Some(Ending::Close(Some(CloseCode::Unsupported)))
    );
    bystander
        .subscribe("still/here", v5::QoS::AtLeastOnce)
        .await;
    bystander
        .publish_acked("still/here", v5::QoS::AtLeastOnce, false, b"yes")
        .await;
    assert_eq!(&bystander.publish().await.payload[..], b"yes");
}

#[tokio::test]
async fn a_frame_over_the_limit_closes_with_1009() {
    let config = format!("{OPEN}\n[websocket]\nmax_frame_size = 1024\nmax_message_size = 4096\n");
    let b = Broker::start(&config);
    let mut wire = ws::open(b.ws_addr(), "/mqtt", &["mqtt"], None)
        .await
        .expect("upgrade");
    wire.send_v5(&connect_packet("big")).await;
    assert!(matches!(
        wire.next_v5(PATIENCE).await,
        Ok(p5::Packet::ConnAck(_))
    ));
    wire.send(&[0u8; 2048]).await;
    assert_eq!(
        wire.ending(PATIENCE).await,
        Some(Ending::Close(Some(CloseCode::Size)))
    );
}

#[tokio::test]
async fn malformed_mqtt_over_websocket_closes_that_connection_only() {
    let b = Broker::start(OPEN);
    let mut wire = ws::open(b.ws_addr(), "/mqtt", &["mqtt"], None)
        .await
        .expect("upgrade");
    // A CONNECT whose protocol name is garbage.
    wire.send(&[
        0x10, 0x0c, 0x00, 0x04, b'X', b'Q', b'T', b'T', 0x05, 0x02, 0x00, 0x1e, 0x00, 0x00,
    ])
    .await;
    assert!(wire.ending(PATIENCE).await.is_some(), "closed");
    let mut fine = ws::open(b.ws_addr(), "/mqtt", &["mqtt"], None)
        .await
        .expect("upgrade");
    fine.send_v5(&connect_packet("fine")).await;
    assert!(matches!(
        fine.next_v5(PATIENCE).await,
        Ok(p5::Packet::ConnAck(_))
    ));
    assert_ne!(fine.next_v5(SHORT).await.err(), Some(Silence::Closed));
}

#[tokio::test]
async fn the_websocket_listener_can_be_turned_off() {
    let b = Broker::start_with_env(OPEN, &[("CHATMQ__WEBSOCKET__ENABLED", "false")]);
    assert!(!b.listeners.contains_key("websocket"), "{:?}", b.listeners);
}
