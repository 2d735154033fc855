//! Writes the seed corpora in `fuzz/corpus/<target>/`: real packets from
//! rumqttc's encoders (both MQTT versions, with properties, wills and
//! logins), the same sessions framed as WebSocket client frames, and real
//! envelopes, RPC requests and config files. Run from the repository root:
//! `cargo run --manifest-path fuzz/Cargo.toml --example seed_corpus`.

use std::fs;
use std::path::Path;

use bytes::{Bytes, BytesMut};
use rumqttc::mqttbytes::{v4, QoS as Q4};
use rumqttc::v5::mqttbytes::v5::*;
use rumqttc::v5::mqttbytes::QoS;

fn v4_bytes(packets: &[v4::Packet]) -> Vec<u8> {
    let mut out = BytesMut::new();
    for p in packets {
        p.write(&mut out, usize::MAX).expect("a 3.1.1 seed packet");
    }
    out.to_vec()
}

fn v5_bytes(packets: &[Packet]) -> Vec<u8> {
    let mut out = BytesMut::new();
    for p in packets {
        p.write(&mut out, None).expect("an MQTT 5 seed packet");
    }
    out.to_vec()
}

fn v4_sessions() -> Vec<(&'static str, Vec<u8>)> {
    let mut connect = v4::Connect::new("alice-phone");
    connect.clean_session = false;
    connect.last_will = Some(v4::LastWill::new(
        "users/alice/status",
        "offline",
        Q4::AtLeastOnce,
        true,
    ));
    connect.login = Some(v4::Login::new("alice", "secret"));
    let connect = v4::Packet::Connect(connect);
    let mut publish1 = v4::Publish::new(
        "chat/room",
        Q4::AtLeastOnce,
        &br#"{"id":"m1","body":{"text":"hi"}}"#[..],
    );
    publish1.pkid = 1;
    let mut publish2 = v4::Publish::new("chat/room", Q4::ExactlyOnce, &b"{}"[..]);
    publish2.pkid = 2;
    let mut subscribe = v4::Subscribe::new_many([
        v4::SubscribeFilter::new("chat/+".into(), Q4::AtLeastOnce),
        v4::SubscribeFilter::new("users/alice/#".into(), Q4::ExactlyOnce),
    ]);
    subscribe.pkid = 3;
    let mut unsubscribe = v4::Unsubscribe::new("chat/+");
    unsubscribe.pkid = 4;
    vec![
        ("v4_connect", v4_bytes(&[connect.clone()])),
        (
            "v4_connect_bare",
            v4_bytes(&[v4::Packet::Connect(v4::Connect::new("c"))]),
        ),
        (
            "v4_session",
            v4_bytes(&[
                connect.clone(),
                v4::Packet::Subscribe(subscribe),
                v4::Packet::Publish(publish1),
                v4::Packet::Publish(v4::Publish::new(
                    "sensors/alice/t",
                    Q4::AtMostOnce,
                    &b"21.5"[..],
                )),
                v4::Packet::PubAck(v4::PubAck::new(7)),
                v4::Packet::Publish(publish2),
                v4::Packet::PubRel(v4::PubRel::new(2)),
                v4::Packet::PubRec(v4::PubRec::new(8)),
                v4::Packet::PubComp(v4::PubComp::new(8)),
                v4::Packet::Unsubscribe(unsubscribe),
                v4::Packet::PingReq,
                v4::Packet::Disconnect,
            ]),
        ),
    ]
}

fn v5_sessions() -> Vec<(&'static str, Vec<u8>)> {
    let properties = ConnectProperties {
        session_expiry_interval: Some(3600),
        receive_maximum: Some(32),
        max_packet_size: Some(65_536),
        topic_alias_max: Some(8),
        request_response_info: Some(1),
        request_problem_info: Some(1),
        user_properties: vec![("app".into(), "mobile".into())],
        authentication_method: None,
        authentication_data: None,
    };
    let will = LastWill::new(
        "users/bob/status",
        "offline",
        QoS::AtLeastOnce,
        false,
        Some(LastWillProperties {
            delay_interval: Some(5),
            payload_format_indicator: Some(1),
            message_expiry_interval: Some(60),
            content_type: Some("text/plain".into()),
            response_topic: None,
            correlation_data: None,
            user_properties: vec![],
        }),
    );
    let connect = Packet::Connect(
        Connect {
            keep_alive: 30,
            client_id: "bob-laptop".into(),
            clean_start: false,
            properties: Some(properties),
        },
        Some(will),
        Some(Login::new("bob", "hunter2")),
    );
    let bare = Packet::Connect(
        Connect {
            keep_alive: 60,
            client_id: String::new(),
            clean_start: true,
            properties: None,
        },
        None,
        None,
    );
    let mut publish = Publish::new(
        "rpc/history",
        QoS::AtLeastOnce,
        Bytes::from_static(br#"{"id":"r1","conv":"room","limit":10}"#),
        Some(PublishProperties {
            payload_format_indicator: Some(1),
            message_expiry_interval: Some(120),
            topic_alias: Some(1),
            response_topic: Some("users/bob/events".into()),
            correlation_data: Some(Bytes::from_static(b"corr")),
            user_properties: vec![("k".into(), "v".into())],
            subscription_identifiers: vec![],
            content_type: Some("application/json".into()),
        }),
    );
    publish.pkid = 1;
    let mut aliased = Publish::new("", QoS::AtMostOnce, Bytes::from_static(b"again"), None);
    aliased.properties = Some(PublishProperties {
        topic_alias: Some(1),
        ..Default::default()
    });
    let mut exactly_once = Publish::new(
        "chat/room",
        QoS::ExactlyOnce,
        Bytes::from_static(br#"{"id":"m2","body":2}"#),
        None,
    );
    exactly_once.pkid = 2;
    exactly_once.retain = false;
    let mut filter = Filter::new("chat/#", QoS::ExactlyOnce);
    filter.nolocal = true;
    filter.preserve_retain = true;
    filter.retain_forward_rule = RetainForwardRule::OnNewSubscribe;
    let mut subscribe = Subscribe::new_many(
        [filter, Filter::new("$share/g/jobs/+", QoS::AtLeastOnce)],
        Some(SubscribeProperties {
            id: Some(7),
            user_properties: vec![],
        }),
    );
    subscribe.pkid = 3;
    let mut unsubscribe = Unsubscribe::new("chat/#", None);
    unsubscribe.pkid = 4;
    let mut puback = PubAck::new(9, None);
    puback.reason = PubAckReason::NoMatchingSubscribers;
    let mut disconnect = Disconnect::new(DisconnectReasonCode::DisconnectWithWillMessage);
    disconnect.properties = Some(DisconnectProperties {
        session_expiry_interval: Some(0),
        reason_string: Some("bye".into()),
        user_properties: vec![],
        server_reference: None,
    });
    vec![
        ("v5_connect", v5_bytes(&[connect.clone()])),
        ("v5_connect_bare", v5_bytes(&[bare])),
        (
            "v5_session",
            v5_bytes(&[
                connect.clone(),
                Packet::Subscribe(subscribe),
                Packet::Publish(publish),
                Packet::Publish(aliased),
                Packet::Publish(exactly_once),
                Packet::PubRel(PubRel::new(2, None)),
                Packet::PubAck(puback),
                Packet::PubRec(PubRec::new(10, None)),
                Packet::PubComp(PubComp::new(10, None)),
                Packet::Unsubscribe(unsubscribe),
                Packet::PingReq(PingReq),
                Packet::Disconnect(disconnect),
            ]),
        ),
        // The short DISCONNECT forms MQTT 5 allows.
        (
            "v5_disconnect_short",
            [v5_bytes(&[connect]), vec![0xE0, 0x01, 0x00]].concat(),
        ),
    ]
}

/// `payload` as masked client frames: split into messages of at most
/// `chunk` bytes, a ping in between, the last message fragmented.
fn ws_frames(payload: &[u8], chunk: usize) -> Vec<u8> {
    fn frame(out: &mut Vec<u8>, first: u8, data: &[u8]) {
        let key = [0x37, 0xFA, 0x21, 0x3D];
        out.push(first);
        match data.len() {
            n @ 0..=125 => out.push(0x80 | n as u8),
            n @ 126..=0xFFFF => {
                out.push(0x80 | 126);
                out.extend_from_slice(&(n as u16).to_be_bytes());
            }
            n => {
                out.push(0x80 | 127);
                out.extend_from_slice(&(n as u64).to_be_bytes());
            }
        }
        out.extend_from_slice(&key);
        out.extend(data.iter().enumerate().map(|(i, b)| b ^ key[i % 4]));
    }
    let mut out = Vec::new();
    let pieces: Vec<&[u8]> = payload.chunks(chunk.max(1)).collect();
    for (i, piece) in pieces.iter().enumerate() {
        if i + 1 == pieces.len() && piece.len() > 1 {
            let (a, b) = piece.split_at(piece.len() / 2);
            frame(&mut out, 0x02, a); // binary, not final
            frame(&mut out, 0x89, b"ping"); // a control frame between fragments
            frame(&mut out, 0x80, b); // continuation, final
        } else {
            frame(&mut out, 0x82, piece);
        }
    }
    frame(&mut out, 0x88, &[0x03, 0xE8]); // close, 1000
    out
}

fn write(dir: &Path, target: &str, name: &str, bytes: &[u8]) {
    let dir = dir.join(target);
    fs::create_dir_all(&dir).expect("create the corpus directory");
    fs::write(dir.join(name), bytes).expect("write a seed");
}

fn main() {
    let corpus = Path::new("fuzz/corpus");
    let sessions: Vec<_> = v4_sessions().into_iter().chain(v5_sessions()).collect();
    for (name, bytes) in &sessions {
        write(corpus, "mqtt_decode", name, bytes);
        write(
            corpus,
            "websocket",
            &format!("{name}_whole"),
            &ws_frames(bytes, usize::MAX),
        );
        write(
            corpus,
            "websocket",
            &format!("{name}_split"),
            &ws_frames(bytes, 7),
        );
    }
    for (name, json) in [
        ("text", r#"{"id":"m1","body":{"text":"hello"}}"#),
        (
            "typed",
            r#"{"id":"m2","type":"image","body":{"url":"https://x/y.png","w":640}}"#,
        ),
        (
            "unicode",
            r#"{"id":"é-✓","body":"\u00e9\ud83d\ude00","extra":[1,2.5,null,true]}"#,
        ),
        (
            "numbers",
            r#"{"id":"n","body":[0,-1,1e308,1.5e-7,18446744073709551615]}"#,
        ),
        ("bad_id", r#"{"id":"","body":1}"#),
    ] {
        write(corpus, "envelope", name, json.as_bytes());
    }
    for (name, json) in [
        (
            "history",
            r#"{"id":"r1","conv":"room","after":10,"before":20,"limit":50}"#,
        ),
        (
            "create",
            r#"{"id":2,"conv":"g-team","title":"Team","members":["bob","carol"]}"#,
        ),
        ("add", r#"{"id":"r3","conv":"g-team","user":"dave"}"#),
        ("read", r#"{"id":"r4","conv":"room","seq":42}"#),
        ("mute", r#"{"id":"r5","conv":"room","muted":false}"#),
        (
            "device",
            r#"{"id":"r6","platform":"apns","token":"ab12","app_id":null}"#,
        ),
        ("empty", r#"{}"#),
    ] {
        write(corpus, "rpc_request", name, json.as_bytes());
    }
    let example = fs::read("config/chatmq.toml").expect("run from the repository root");
    write(corpus, "config", "chatmq_toml", &example);
    for (name, toml) in [
        ("quick_start", "[node]\ndata_dir = \"data\"\n[auth]\nallow_anonymous = true\n"),
        (
            "users_acl",
            "[mqtt]\nlisten = \"127.0.0.1:1883\"\nmax_payload = 65536\n\n[[auth.users]]\nname = \"alice\"\npassword = \"x\"\n\n[[acl.rules]]\nuser = \"*\"\ntopic = \"sensors/%u/#\"\naccess = \"pubsub\"\n",
        ),
        ("unknown_key", "[mqtt]\nmax_paylod = 3\n"),
        ("bad_syntax", "[mqtt\nlisten = = 1\n"),
    ] {
        write(corpus, "config", name, toml.as_bytes());
    }
}
