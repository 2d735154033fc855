//! Strict MQTT, byte by byte: packets a well-behaved client never sends
//! (U+0000 in a string, a field its flag does not announce, reserved
//! bits, an ack of the wrong kind), and the answers a strict broker owes
//! them. Raw bytes through `raw`, so nothing is corrected on the way.
//! Each test names the normative statement it checks.

use std::time::Duration;

use chatmq_tests::raw::{
    self, connect_bytes, connected_v4, expect_disconnect, field, p4, p5, packet, Silence, Wire,
};
use chatmq_tests::v5::{self, QoS};
use chatmq_tests::{Broker, OPEN, PATIENCE};
use rumqttc::v5::mqttbytes::v5::{DisconnectReasonCode, PubRecReason};

/// A short wait for something that must not happen.
const QUIET: Duration = Duration::from_millis(500);

/// Clean session / Clean Start.
const CLEAN: u8 = 0x02;
const USER_NAME: u8 = 0x80;
const PASSWORD: u8 = 0x40;
/// Will flag, will QoS 0.
const WILL: u8 = 0x04;

/// Sends `bytes` as the first packet and expects the connection to close
/// without a CONNACK.
async fn closed_without_connack(b: &Broker, bytes: &[u8]) {
    let mut w = Wire::open(b.addr).await;
    w.send(bytes).await;
    let (got, closed) = raw::exchange(&mut w.stream, &[]).await;
    assert!(closed, "the connection stayed open");
    assert!(got.is_empty(), "expected no CONNACK, got {got:02x?}");
}

/// The CONNACK answering `bytes`, as an MQTT 5 packet.
async fn v5_connack(b: &Broker, bytes: &[u8]) -> (Wire, p5::ConnAck) {
    let mut w = Wire::open(b.addr).await;
    w.send(bytes).await;
    match w.next_v5(PATIENCE).await {
        Ok(p5::Packet::ConnAck(a)) => (w, a),
        other => panic!("expected CONNACK, got {other:?}"),
    }
}

/// A raw MQTT 5 session that completed CONNECT / CONNACK.
async fn v5_session(b: &Broker, client_id: &str) -> Wire {
    let (w, ack) = v5_connack(
        b,
        &connect_bytes(5, CLEAN, &[], &field(client_id.as_bytes())),
    )
    .await;
    assert_eq!(ack.code, p5::ConnectReturnCode::Success);
    w
}

/// An MQTT 5 SUBSCRIBE (packet id 1, no properties) of one filter with
/// the options byte as given.
fn subscribe_v5(filter: &str, options: u8) -> Vec<u8> {
    let mut body = vec![0, 1, 0];
    body.extend(field(filter.as_bytes()));
    body.push(options);
    packet(0x82, &body)
}

/// A raw MQTT 5 subscriber to `topic` at QoS 2 and a publisher of one QoS 2
/// message there; returns the subscriber and the packet id it got.
async fn delivered_qos2(b: &Broker, topic: &str) -> (Wire, u16) {
    let mut sub = v5_session(b, "sub").await;
    sub.send(&subscribe_v5(topic, 0x02)).await;
    assert!(matches!(
        sub.next_v5(PATIENCE).await,
        Ok(p5::Packet::SubAck(_))
    ));
    let mut publisher = v5::connect_ok(b.addr, "pub").await;
    publisher
        .publish_acked(topic, QoS::ExactlyOnce, false, b"x")
        .await;
    match sub.next_v5(PATIENCE).await {
        Ok(p5::Packet::Publish(p)) => {
            assert_eq!(p.qos, QoS::ExactlyOnce);
            (sub, p.pkid)
        }
        other => panic!("expected the PUBLISH, got {other:?}"),
    }
}

// ------------------------------------------------------------- CONNECT

// [MQTT-1.5.4-2] (3.1.1: [MQTT-1.5.3-2]) a UTF-8 string holds no U+0000: a
// client id with one is a malformed packet, closed without CONNACK.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtt_1_5_4_2_a_null_character_in_the_client_id_is_malformed() {
    let b = Broker::start(OPEN);
    for level in [4, 5] {
        closed_without_connack(&b, &connect_bytes(level, CLEAN, &[], &field(b"dev\0ice"))).await;
    }
}

// [MQTT-1.5.4-2] the same for the user name and the will topic.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtt_1_5_4_2_a_null_character_in_the_user_name_or_will_topic_is_malformed() {
    let b = Broker::start(OPEN);
    let mut login = field(b"c1");
    login.extend(field(b"al\0ce"));
    login.extend(field(b"pw"));
    for level in [4, 5] {
        closed_without_connack(
            &b,
            &connect_bytes(level, CLEAN | USER_NAME | PASSWORD, &[], &login),
        )
        .await;
    }
    let mut will = field(b"c2");
    will.extend(field(b"wills/\0"));
    will.extend(field(b"gone"));
    closed_without_connack(&b, &connect_bytes(4, CLEAN | WILL, &[], &will)).await;
}

// 3.1.1 [MQTT-3.1.2-18], [MQTT-3.1.2-20]; MQTT 5 [MQTT-3.1.2-16],
// [MQTT-3.1.2-18]: with its flag clear, a user name or password must not be
// present. Bytes after the last announced field are a malformed packet.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtt_3_1_2_16_a_user_name_or_password_with_its_flag_clear_is_malformed() {
    let b = Broker::start(OPEN);
    let mut user_only = field(b"c1");
    user_only.extend(field(b"alice"));
    for level in [4, 5] {
        closed_without_connack(&b, &connect_bytes(level, CLEAN, &[], &user_only)).await;
    }
    let mut both = user_only.clone();
    both.extend(field(b"pw"));
    for level in [4, 5] {
        closed_without_connack(&b, &connect_bytes(level, CLEAN | USER_NAME, &[], &both)).await;
    }
}

// [MQTT-4.7.3-1] a topic name has at least one character: an empty will
// topic is a malformed CONNECT (closed without CONNACK, in both versions).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtt_4_7_3_1_an_empty_will_topic_is_malformed() {
    let b = Broker::start(OPEN);
    let mut v4 = field(b"c1");
    v4.extend(field(b""));
    v4.extend(field(b"gone"));
    closed_without_connack(&b, &connect_bytes(4, CLEAN | WILL, &[], &v4)).await;
    let mut v5 = field(b"c2");
    v5.push(0); // will properties
    v5.extend(field(b""));
    v5.extend(field(b"gone"));
    closed_without_connack(&b, &connect_bytes(5, CLEAN | WILL, &[], &v5)).await;
}

// [MQTT-3.1.4-1] a 3.1.1 CONNECT that breaks the rules (a will on a
// wildcard topic) closes without CONNACK: return code 3 would tell the
// client the server is unavailable, which is not what is wrong.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtt_3_1_4_1_a_v4_bad_will_closes_without_a_misleading_connack() {
    let b = Broker::start(OPEN);
    let mut will = field(b"c1");
    will.extend(field(b"wills/#"));
    will.extend(field(b"gone"));
    closed_without_connack(&b, &connect_bytes(4, CLEAN | WILL, &[], &will)).await;
}

// [MQTT-4.12.0-1] an Authentication Method the server does not support is
// refused with CONNACK 0x8C (Bad authentication method).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtt_4_12_0_1_an_unsupported_authentication_method_gets_0x8c() {
    let b = Broker::start(OPEN);
    let mut props = vec![0x15]; // Authentication Method
    props.extend(field(b"SCRAM-SHA-256"));
    let (mut w, ack) = v5_connack(&b, &connect_bytes(5, CLEAN, &props, &field(b"c1"))).await;
    assert_eq!(ack.code, p5::ConnectReturnCode::BadAuthenticationMethod);
    assert!(w.closed_within(PATIENCE).await);
}

// [MQTT-3.1.2-24], [MQTT-3.1.2-25] nothing larger than the client's
// Maximum Packet Size is sent. A CONNACK that would be too large goes out
// without its optional properties, instead of never (a stalled connection).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtt_3_1_2_24_a_connack_too_large_for_the_client_is_shortened() {
    let b = Broker::start(OPEN);
    let mut props = vec![0x27]; // Maximum Packet Size
    props.extend(40u32.to_be_bytes());
    let mut w = Wire::open(b.addr).await;
    // An empty client id: the Assigned Client Identifier must still come.
    w.send(&connect_bytes(5, CLEAN, &props, &field(b""))).await;
    let mut header = [0u8; 2];
    let read = tokio::time::timeout(PATIENCE, async {
        use tokio::io::AsyncReadExt;
        w.stream.read_exact(&mut header).await
    })
    .await;
    assert!(matches!(read, Ok(Ok(_))), "no CONNACK came");
    assert_eq!(header[0], 0x20, "a CONNACK");
    assert!(
        2 + usize::from(header[1]) <= 40,
        "CONNACK of {} bytes",
        2 + header[1]
    );
}

// [MQTT-3.1.2-25] ... and if not even the short form fits, the connection
// closes rather than waiting forever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtt_3_1_2_25_a_client_too_small_for_any_connack_is_closed() {
    let b = Broker::start(OPEN);
    let mut props = vec![0x27];
    props.extend(8u32.to_be_bytes());
    closed_without_connack(&b, &connect_bytes(5, CLEAN, &props, &field(b""))).await;
}

// ----------------------------------------------------------- SUBSCRIBE

// [MQTT-3.8.3-5] the reserved bits 6-7 of the subscription options are 0:
// set, the SUBSCRIBE is malformed (DISCONNECT 0x81).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtt_3_8_3_5_reserved_subscription_option_bits_are_malformed() {
    let b = Broker::start(OPEN);
    let mut w = v5_session(&b, "c1").await;
    w.send(&subscribe_v5("a/b", 0xC1)).await;
    expect_disconnect(&mut w, DisconnectReasonCode::MalformedPacket).await;

    // 3.1.1 [MQTT-3.8.3-4]: the upper 6 bits of the requested QoS byte.
    let mut w = connected_v4(b.addr, "c2").await;
    let mut body = vec![0, 1];
    body.extend(field(b"a/b"));
    body.push(0x41);
    w.send(&packet(0x82, &body)).await;
    assert!(w.closed_within(PATIENCE).await);
}

// ---------------------------------------------------------- DISCONNECT

// [MQTT-3.14.2-1] an MQTT 5 DISCONNECT may carry its reason code without a
// property length (`E0 01 00`): a normal disconnection, the will is
// discarded [MQTT-3.14.4-3].
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtt_3_14_2_1_a_one_byte_disconnect_is_normal_and_discards_the_will() {
    let b = Broker::start(OPEN);
    let mut watcher = v5::connect_ok(b.addr, "watcher").await;
    watcher.subscribe("wills/#", QoS::AtLeastOnce).await;
    let mut will = field(b"polite");
    will.push(0); // will properties
    will.extend(field(b"wills/polite"));
    will.extend(field(b"gone"));
    let (mut w, ack) = v5_connack(&b, &connect_bytes(5, CLEAN | WILL, &[], &will)).await;
    assert_eq!(ack.code, p5::ConnectReturnCode::Success);
    w.send(&[0xE0, 0x01, 0x00]).await;
    assert!(w.closed_within(PATIENCE).await);
    watcher.no_publish(QUIET).await;
}

// --------------------------------------------------------- QoS 2 acks

// [MQTT-4.3.3-4] PUBREL answers a PUBREC below 0x80 only: a subscriber
// that refuses a QoS 2 message gets no PUBREL, and the message is done.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtt_4_3_3_4_a_refusing_pubrec_gets_no_pubrel() {
    let b = Broker::start(OPEN);
    let (mut sub, pkid) = delivered_qos2(&b, "q2/refused").await;
    let mut rec = p5::PubRec::new(pkid, None);
    rec.reason = PubRecReason::QuotaExceeded;
    sub.send_v5(&p5::Packet::PubRec(rec)).await;
    assert_eq!(sub.next_v5(QUIET).await, Err(Silence::Timeout), "no PUBREL");
}

// [MQTT-4.8.0-1] an acknowledgement of the wrong kind for a packet id (a
// PUBACK for a QoS 2 message, a PUBCOMP before PUBREC) is a protocol
// error: MQTT 5 DISCONNECT 0x82.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtt_4_8_0_1_an_ack_of_the_wrong_type_is_a_protocol_error() {
    let b = Broker::start(OPEN);
    let (mut sub, pkid) = delivered_qos2(&b, "q2/puback").await;
    sub.send_v5(&p5::Packet::PubAck(p5::PubAck::new(pkid, None)))
        .await;
    expect_disconnect(&mut sub, DisconnectReasonCode::ProtocolError).await;

    let b = Broker::start(OPEN);
    let (mut sub, pkid) = delivered_qos2(&b, "q2/pubcomp").await;
    sub.send_v5(&p5::Packet::PubComp(p5::PubComp::new(pkid, None)))
        .await;
    expect_disconnect(&mut sub, DisconnectReasonCode::ProtocolError).await;
}

// The same in 3.1.1, which has no DISCONNECT from the server: a PUBREC for
// a QoS 1 message closes the connection [MQTT-4.8.0-1].
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtt_4_8_0_1_v4_a_pubrec_for_qos1_closes() {
    let b = Broker::start(OPEN);
    let mut sub = connected_v4(b.addr, "sub").await;
    let mut subscribe = p4::Subscribe::new("q1/t", rumqttc::mqttbytes::QoS::AtLeastOnce);
    subscribe.pkid = 1;
    sub.send_v4(&p4::Packet::Subscribe(subscribe)).await;
    assert!(matches!(
        sub.next_v4(PATIENCE).await,
        Ok(p4::Packet::SubAck(_))
    ));
    let mut publisher = v5::connect_ok(b.addr, "pub").await;
    publisher
        .publish_acked("q1/t", QoS::AtLeastOnce, false, b"x")
        .await;
    let pkid = match sub.next_v4(PATIENCE).await {
        Ok(p4::Packet::Publish(p)) => p.pkid,
        other => panic!("expected the PUBLISH, got {other:?}"),
    };
    sub.send_v4(&p4::Packet::PubRec(p4::PubRec::new(pkid)))
        .await;
    assert!(sub.closed_within(PATIENCE).await);
}

// [MQTT-2.2.1-3] packet ids are non-zero; the broker numbers a session's
// messages from 1.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtt_2_2_1_3_the_first_packet_id_is_1() {
    let b = Broker::start(OPEN);
    let mut sub = v5_session(&b, "sub").await;
    sub.send(&subscribe_v5("ids/t", 0x01)).await;
    assert!(matches!(
        sub.next_v5(PATIENCE).await,
        Ok(p5::Packet::SubAck(_))
    ));
    let mut publisher = v5::connect_ok(b.addr, "pub").await;
    publisher
        .publish_acked("ids/t", QoS::AtLeastOnce, false, b"x")
        .await;
    match sub.next_v5(PATIENCE).await {
        Ok(p5::Packet::Publish(p)) => assert_eq!(p.pkid, 1),
        other => panic!("expected the PUBLISH, got {other:?}"),
    }
}

// [MQTT-3.1.4-7] (3.1.1: [MQTT-3.1.4-5]'s note) a client may send packets
// right after CONNECT, before CONNACK. A client that writes CONNECT,
// SUBSCRIBE and PINGREQ in one go, then only waits, gets CONNACK, SUBACK
// and PINGRESP: what came with the CONNECT is handled at once, not when
// the next bytes arrive.
#[tokio::test]
async fn mqtt_3_1_4_7_packets_sent_with_the_connect_are_handled_at_once() {
    let b = Broker::start(OPEN);
    let mut w = Wire::open(b.addr).await;
    let mut burst = raw::connect_v4("pipelined");
    let mut subscribe = p4::Subscribe::new("pipe/t", rumqttc::QoS::AtLeastOnce);
    subscribe.pkid = 1;
    burst.extend(raw::v4_bytes(&p4::Packet::Subscribe(subscribe)));
    burst.extend(raw::v4_bytes(&p4::Packet::PingReq));
    w.send(&burst).await;
    assert!(matches!(
        w.next_v4(PATIENCE).await,
        Ok(p4::Packet::ConnAck(_))
    ));
    match w.next_v4(PATIENCE).await {
        Ok(p4::Packet::SubAck(a)) => assert_eq!(a.pkid, 1),
        other => panic!("expected SUBACK, got {other:?}"),
    }
    assert!(matches!(
        w.next_v4(PATIENCE).await,
        Ok(p4::Packet::PingResp)
    ));
}

// [MQTT-3.8.2.1.2] a SUBSCRIBE carries at most one Subscription
// Identifier. With two, rumqttc's reader took the second for something
// else; the broker now answers DISCONNECT 0x82 and subscribes nothing.
#[tokio::test]
async fn mqtt_3_8_2_1_2_two_subscription_identifiers_are_a_protocol_error() {
    let b = Broker::start(OPEN);
    let mut w = v5_session(&b, "two-ids").await;
    // Packet id 1; properties: identifier 5, identifier 6; filter "ids/t" QoS 0.
    let mut body = vec![0, 1, 4, 0x0B, 0x05, 0x0B, 0x06];
    body.extend(field(b"ids/t"));
    body.push(0);
    w.send(&packet(0x82, &body)).await;
    expect_disconnect(&mut w, DisconnectReasonCode::ProtocolError).await;
}

// [MQTT-2.2.2-1] a property block holds exactly its properties. A User
// Property whose key claims more bytes than the block has (found by
// fuzz/mqtt_decode) is malformed: the CONNECT is closed without CONNACK,
// and a PUBLISH so built ends with DISCONNECT 0x81.
#[tokio::test]
async fn mqtt_2_2_2_1_a_property_running_past_its_block_is_malformed() {
    let b = Broker::start(OPEN);
    // The fuzzer's CONNECT: its user property's key runs 32 bytes into the
    // client id; read that way, the user name held U+0000 and was refused
    // as a bad user name (0x86) instead of closing as malformed.
    const STRADDLING_CONNECT: &[u8] = &[
        0x10, 0x7c, 0x00, 0x04, 0x4d, 0x51, 0x54, 0x54, 0x05, 0xcc, 0x00, 0x1e, 0x22, 0x11, 0x00,
        0x00, 0x0e, 0x10, 0x21, 0x00, 0x20, 0x27, 0x00, 0x01, 0x00, 0x00, 0x22, 0x00, 0x08, 0x19,
        0x01, 0x17, 0x01, 0x26, 0x00, 0x20, 0x61, 0x70, 0x70, 0x00, 0x06, 0x6d, 0x6f, 0x62, 0x69,
        0x6c, 0x65, 0x00, 0x0a, 0x62, 0x6f, 0x62, 0x2d, 0x6c, 0x61, 0x70, 0x74, 0x6f, 0x70, 0x19,
        0x18, 0x00, 0x00, 0x00, 0x05, 0x02, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x0a,
        0x74, 0x65, 0x78, 0x74, 0x2f, 0x70, 0x6c, 0x61, 0x69, 0x6e, 0x00, 0x10, 0x75, 0x73, 0x65,
        0x72, 0x73, 0x2f, 0x62, 0x6f, 0x62, 0x2f, 0x73, 0x74, 0x61, 0x74, 0x7a, 0x73, 0x00, 0x07,
        0x6f, 0x66, 0x66, 0x0d, 0x00, 0x77, 0x65, 0x00, 0x03, 0x62, 0x6f, 0x62, 0x00, 0x07, 0x65,
        0x6e, 0x74, 0x68, 0x75, 0x72, 0x34,
    ];
    closed_without_connack(&b, STRADDLING_CONNECT).await;

    let mut w = v5_session(&b, "straddle").await;
    // QoS 0 PUBLISH "t": properties of length 2, a Content Type claiming 9 bytes.
    w.send(&packet(0x30, &[0, 1, b't', 2, 0x03, 0, 9, b'x']))
        .await;
    expect_disconnect(&mut w, DisconnectReasonCode::MalformedPacket).await;
}
