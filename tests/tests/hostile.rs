//! A hostile client, told as a story: alice and bob chat while an attacker
//! throws thousands of mutated MQTT packets of both versions at the same
//! broker, over many connections in sequence and in parallel. The broker
//! never dies, every batch is followed by a healthy QoS 1 chat round trip,
//! and at the end every message alice had acknowledged is in history
//! exactly once.
//!
//! The inputs come from a seeded xorshift generator written here (no
//! dependency, and a failure reproduces from its seed and input number):
//! real sessions of both versions, mutated by bit flips, truncations,
//! remaining lengths that lie, random bytes after a valid CONNECT, huge
//! remaining lengths, spliced and repeated packets.
//!
//! What the fuzz targets (`fuzz/`, docs/FUZZING.md) found is checked here
//! too, against the real binary.

use chatmq_tests::chat::*;
use chatmq_tests::metrics::metric;
use chatmq_tests::raw::{p4, p5, v4_bytes, v5_bytes, Silence, Wire};
use chatmq_tests::{v4, v5, Broker, OPEN, PATIENCE};
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const SEED: u64 = 0x5EED_C4A7_0F_F00D;
/// 20 batches of 520: 10,400 hostile inputs.
const BATCHES: usize = 20;
const PER_BATCH: usize = 520;
/// Hostile connections open at once within a batch.
const PARALLEL: usize = 8;
const DM: &str = "dm:alice:bob";

/// xorshift64* (Vigna): small, deterministic, good enough to mutate bytes.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// A number in `0..n` (`n` > 0).
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }

    fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next() as u8).collect()
    }
}

/// A real session of one version: its packets, CONNECT first.
type Session = Vec<Vec<u8>>;

fn v4_session(client_id: &str, clean: bool) -> Session {
    let mut connect = p4::Connect::new(client_id);
    connect.clean_session = clean;
    connect.keep_alive = 30;
    connect.last_will = Some(p4::LastWill::new(
        "fuzz/will",
        "gone",
        v4::QoS::AtLeastOnce,
        false,
    ));
    // Topics of its own, so that thousands of persistent sessions left behind
    // do not all receive each other's messages.
    let mine = format!("fuzz/{client_id}");
    let mut subscribe = p4::Subscribe::new_many([
        p4::SubscribeFilter::new(format!("{mine}/+"), v4::QoS::ExactlyOnce),
        p4::SubscribeFilter::new("chat/+".into(), v4::QoS::AtLeastOnce),
    ]);
    subscribe.pkid = 1;
    let mut qos1 = p4::Publish::new(format!("{mine}/a"), v4::QoS::AtLeastOnce, b"one".to_vec());
    qos1.pkid = 2;
    let mut qos2 = p4::Publish::new(format!("{mine}/b"), v4::QoS::ExactlyOnce, b"two".to_vec());
    qos2.pkid = 3;
    let mut chat = p4::Publish::new(
        format!("chat/{DM}"),
        v4::QoS::AtLeastOnce,
        envelope("intruder", "hi"),
    );
    chat.pkid = 4;
    let mut unsubscribe = p4::Unsubscribe::new(format!("{mine}/+"));
    unsubscribe.pkid = 5;
    [
        p4::Packet::Connect(connect),
        p4::Packet::Subscribe(subscribe),
        p4::Packet::Publish(qos1),
        p4::Packet::Publish(qos2),
        p4::Packet::PubRel(p4::PubRel::new(3)),
        p4::Packet::Publish(chat),
        p4::Packet::Publish(p4::Publish::new(
            "rpc/history",
            v4::QoS::AtMostOnce,
            br#"{"id":"r","conv":"dm:alice:bob"}"#.to_vec(),
        )),
        p4::Packet::Unsubscribe(unsubscribe),
        p4::Packet::PingReq,
        p4::Packet::Disconnect,
    ]
    .iter()
    .map(v4_bytes)
    .collect()
}

fn v5_session(client_id: &str, clean: bool) -> Session {
    let mine = format!("fuzz/{client_id}");
    let connect = p5::Packet::Connect(
        p5::Connect {
            keep_alive: 30,
            client_id: client_id.into(),
            clean_start: clean,
            properties: Some(p5::ConnectProperties {
                session_expiry_interval: Some(if clean { 0 } else { 60 }),
                receive_maximum: Some(4),
                max_packet_size: Some(4096),
                topic_alias_max: Some(4),
                request_response_info: Some(1),
                request_problem_info: Some(1),
                user_properties: vec![("k".into(), "v".into())],
                authentication_method: None,
                authentication_data: None,
            }),
        },
        Some(p5::LastWill::new(
            "fuzz/will",
            "gone",
            v5::QoS::AtMostOnce,
            false,
            None,
        )),
        None,
    );
    let mut subscribe = p5::Subscribe::new_many(
        [
            p5::Filter::new(format!("{mine}/#"), v5::QoS::ExactlyOnce),
            p5::Filter::new("$share/g/fuzz/+", v5::QoS::AtLeastOnce),
        ],
        None,
    );
    subscribe.pkid = 1;
    let mut aliased = p5::Publish::new(
        format!("{mine}/alias"),
        v5::QoS::AtLeastOnce,
        b"a".to_vec(),
        Some(p5::PublishProperties {
            topic_alias: Some(1),
            response_topic: Some("fuzz/reply".into()),
            correlation_data: Some(b"c".to_vec().into()),
            message_expiry_interval: Some(30),
            ..Default::default()
        }),
    );
    aliased.pkid = 2;
    let mut by_alias = p5::Publish::new(
        "",
        v5::QoS::ExactlyOnce,
        b"b".to_vec(),
        Some(p5::PublishProperties {
            topic_alias: Some(1),
            ..Default::default()
        }),
    );
    by_alias.pkid = 3;
    let mut rpc = p5::Publish::new(
        "rpc/conversations",
        v5::QoS::AtLeastOnce,
        br#"{"id":"r"}"#.to_vec(),
        Some(p5::PublishProperties {
            response_topic: Some("fuzz/r".into()),
            ..Default::default()
        }),
    );
    rpc.pkid = 4;
    let mut unsubscribe = p5::Unsubscribe::new(format!("{mine}/#"), None);
    unsubscribe.pkid = 5;
    [
        connect,
        p5::Packet::Subscribe(subscribe),
        p5::Packet::Publish(aliased),
        p5::Packet::Publish(by_alias),
        p5::Packet::PubRel(p5::PubRel::new(3, None)),
        p5::Packet::Publish(rpc),
        p5::Packet::PubAck(p5::PubAck::new(9, None)),
        p5::Packet::Unsubscribe(unsubscribe),
        p5::Packet::PingReq(p5::PingReq),
        p5::Packet::Disconnect(p5::Disconnect::new(
            p5::DisconnectReasonCode::DisconnectWithWillMessage,
        )),
    ]
    .iter()
    .map(v5_bytes)
    .collect()
}

/// The length of the fixed header at the start of `packet` (1 to 5).
fn header_len(packet: &[u8]) -> usize {
    1 + packet[1..]
        .iter()
        .take(4)
        .position(|b| b & 0x80 == 0)
        .map_or(4, |i| i + 1)
}

/// One hostile input: a mutation of a prefix of `session`.
fn mutate(rng: &mut Rng, session: &Session) -> Vec<u8> {
    let keep = 1 + rng.below(session.len());
    let mut packets: Vec<Vec<u8>> = session[..keep].to_vec();
    let victim = rng.below(packets.len());
    let bytes: Vec<u8> = match rng.below(8) {
        // Bit flips anywhere.
        0 => {
            let mut all = packets.concat();
            for _ in 0..=rng.below(8) {
                let i = rng.below(all.len());
                all[i] ^= 1 << rng.below(8);
            }
            all
        }
        // Cut short.
        1 => {
            let all = packets.concat();
            all[..rng.below(all.len())].to_vec()
        }
        // A remaining length that lies (shorter or longer than the body).
        2 => {
            let p = &mut packets[victim];
            let lie = rng.below(200) as u8 & 0x7F;
            let h = header_len(p);
            p.splice(1..h, [lie]);
            packets.concat()
        }
        // Random bytes after a valid CONNECT.
        3 => {
            let n = 1 + rng.below(300);
            [packets[0].clone(), rng.bytes(n)].concat()
        }
        // A huge remaining length (up to the 4-byte maximum), little body.
        4 => {
            let kinds = [0x30, 0x32, 0x82, 0xA2, 0x62, 0xE0, 0x10];
            let huge = [0xFF, 0xFF, 0xFF, 0x7F - rng.below(0x70) as u8];
            let n = rng.below(64);
            [
                packets[0].clone(),
                vec![kinds[rng.below(kinds.len())]],
                huge.to_vec(),
                rng.bytes(n),
            ]
            .concat()
        }
        // A random byte overwritten in one packet's body.
        5 => {
            let p = &mut packets[victim];
            let i = rng.below(p.len());
            p[i] = rng.next() as u8;
            packets.concat()
        }
        // Packets repeated and spliced out of order (a second CONNECT too).
        6 => {
            let mut out = Vec::new();
            for _ in 0..=rng.below(6) {
                out.extend_from_slice(&session[rng.below(session.len())]);
            }
            out
        }
        // Random bytes from the first byte: not even a CONNECT.
        _ => {
            let n = 1 + rng.below(100);
            rng.bytes(n)
        }
    };
    if bytes.is_empty() {
        vec![0x10]
    } else {
        bytes
    }
}

/// Sends one hostile input on a fresh connection, closes its write side,
/// and reads (discarding) until the broker closes or PATIENCE passes. A
/// refused or reset connection is an answer too: only the broker's health
/// between batches is checked.
async fn attack(addr: std::net::SocketAddr, input: Vec<u8>) {
    let Ok(mut stream) = TcpStream::connect(addr).await else {
        return;
    };
    let _ = stream.write_all(&input).await;
    let _ = stream.shutdown().await;
    let mut scratch = [0u8; 4096];
    let _ = tokio::time::timeout(PATIENCE, async {
        while let Ok(n) = stream.read(&mut scratch).await {
            if n == 0 {
                break;
            }
        }
    })
    .await;
}

/// alice sends one envelope over MQTT 5 at QoS 1, the broker acks it, and
/// bob, on 3.1.1, receives it with its seq.
async fn round_trip(alice: &mut v5::Client, bob: &mut v4::Client, id: &str) {
    let ack = alice
        .publish_acked(
            &format!("chat/{DM}"),
            v5::QoS::AtLeastOnce,
            false,
            &envelope(id, "still here?"),
        )
        .await;
    match ack {
        Some(v5::Packet::PubAck(a)) => {
            assert_eq!(a.reason, v5::PubAckReason::Success, "alice's {id}")
        }
        other => panic!("alice's {id}: expected a PUBACK, got {other:?}"),
    }
    let got = v4_until(bob, PATIENCE, |g| {
        g.iter().any(|p| json_of(&p.payload)["id"] == id)
    })
    .await;
    assert!(got.iter().all(|p| v4_topic(p) == format!("chat/{DM}")));
}

// An attacker sends 10,400 mutated packets of MQTT 3.1.1 and 5 (bit flips,
// truncations, remaining lengths that lie, garbage after a valid CONNECT,
// huge remaining lengths, spliced sessions), 8 connections at a time, while
// alice chats with bob. After every batch of 520 the broker still accepts
// alice's QoS 1 message and delivers it to bob; at the end history holds
// every message alice had acked exactly once, in the order she sent them.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn mutated_packets_of_both_versions_never_stop_the_chat() {
    // Every input must reach the decoder: the per-address limits, which
    // would refuse most of these connections from one address at accept,
    // are off (as behind a load balancer).
    let b = Broker::start(&config(
        "allow_anonymous = true\n\n\
         [[acl.rules]]\nuser = \"*\"\ntopic = \"fuzz/#\"\naccess = \"pubsub\"\n\n\
         [mqtt]\nmax_connections_per_ip = 0\naccept_rate_per_ip = 0\n",
    ));
    let mut alice = v5_user(&b, "alice").await;
    // Where her RPC replies (the history read at the end) arrive.
    alice
        .subscribe("users/alice/events", v5::QoS::AtLeastOnce)
        .await;
    let mut bob = v4_user(&b, "bob").await;
    let ack = bob
        .subscribe(&format!("chat/{DM}"), v4::QoS::AtLeastOnce)
        .await;
    assert_eq!(
        ack.return_codes,
        [v4::SubscribeReasonCode::Success(v4::QoS::AtLeastOnce)]
    );

    let mut rng = Rng(SEED);
    let mut sent = Vec::new();
    for batch in 0..BATCHES {
        let mut lanes: Vec<Vec<Vec<u8>>> = vec![Vec::new(); PARALLEL];
        for n in 0..PER_BATCH {
            let id = format!("hostile-{batch}-{n}");
            let clean = rng.below(4) != 0;
            let session = if rng.below(2) == 0 {
                v4_session(&id, clean)
            } else {
                v5_session(&id, clean)
            };
            lanes[n % PARALLEL].push(mutate(&mut rng, &session));
        }
        let lanes: Vec<_> = lanes
            .into_iter()
            .map(|inputs| {
                let addr = b.addr;
                tokio::spawn(async move {
                    for input in inputs {
                        attack(addr, input).await;
                    }
                })
            })
            .collect();
        for lane in lanes {
            lane.await.expect("an attacking lane");
        }
        let id = format!("alice-{batch}");
        round_trip(&mut alice, &mut bob, &id).await;
        sent.push(id);
    }

    for reason in ["address_limit", "address_rate"] {
        let series = format!("chatmq_connections_refused_total{{reason=\"{reason}\"}}");
        assert_eq!(
            metric(&b, &series).await,
            0.0,
            "no input was refused at accept"
        );
    }
    // And they got past CONNECT: the hostile sessions' own publishes were
    // decoded and handled (about 4,900 of this seed's inputs carry one that
    // survives its mutation), not only alice's 20.
    let handled = metric(&b, "chatmq_mqtt_publishes_received_total").await;
    assert!(
        handled > 2_000.0,
        "only {handled} publishes reached the broker"
    );

    let (reply, _) = v5_rpc(
        &mut alice,
        "history",
        "history-after-attack",
        json!({"conv": DM, "after": 0, "limit": 200}),
    )
    .await;
    assert_eq!(reply["ok"], true, "{reply}");
    let messages = reply["result"]["messages"]
        .as_array()
        .unwrap_or_else(|| panic!("no messages in {reply}"));
    let ids: Vec<&str> = messages
        .iter()
        .map(|m| m["id"].as_str().expect("an id"))
        .collect();
    assert_eq!(
        ids, sent,
        "history holds each acked message once, in order, and nothing else"
    );
    let seqs: Vec<u64> = messages
        .iter()
        .map(|m| m["seq"].as_u64().expect("a seq"))
        .collect();
    assert_dense(&seqs, sent.len() as u64, "history");
}

// Found by fuzz/mqtt_decode. A client must not put a Subscription
// Identifier in a PUBLISH [MQTT-3.3.4-6]; rumqttc's decoder also counts its
// property byte twice, so with two of them the Payload Format Indicator
// after them was taken for payload and the watcher got `01 01 78` for "x".
// Now the publisher gets DISCONNECT 0x82 (protocol error) and the watcher
// nothing.
#[tokio::test]
async fn a_publish_carrying_subscription_identifiers_is_a_protocol_error_mqtt_3_3_4_6() {
    let b = Broker::start(OPEN);
    let mut watcher = v5::connect_ok(b.addr, "watcher").await;
    watcher.subscribe("fuzz/t", v5::QoS::AtMostOnce).await;

    let mut w = Wire::open(b.addr).await;
    w.send_v5(&p5::Packet::Connect(
        p5::Connect {
            keep_alive: 30,
            client_id: "sender".into(),
            clean_start: true,
            properties: None,
        },
        None,
        None,
    ))
    .await;
    assert!(matches!(
        w.next_v5(PATIENCE).await,
        Ok(p5::Packet::ConnAck(_))
    ));
    // QoS 0 PUBLISH "fuzz/t": properties = Subscription Identifiers 5 and 6,
    // Payload Format Indicator 1; payload "x".
    let mut publish = vec![0x30, 0x10, 0x00, 0x06];
    publish.extend_from_slice(b"fuzz/t");
    publish.extend_from_slice(&[0x06, 0x0B, 0x05, 0x0B, 0x06, 0x01, 0x01, b'x']);
    w.send(&publish).await;
    match w.next_v5(PATIENCE).await {
        Ok(p5::Packet::Disconnect(d)) => {
            assert_eq!(d.reason_code, p5::DisconnectReasonCode::ProtocolError)
        }
        other => panic!("expected DISCONNECT 0x82, got {other:?}"),
    }
    assert_eq!(w.next_v5(PATIENCE).await, Err(Silence::Closed));
    watcher
        .no_publish(std::time::Duration::from_millis(500))
        .await;
}
