//! The wire format: framing, and the two MQTT versions mapped onto one
//! packet model.
//!
//! rumqttc's codecs do the byte-level work. This module adds what a broker
//! needs on top: it frames packets itself (so it can refuse an oversized
//! packet before reading it and check fixed-header flags the codecs ignore),
//! runs the codecs so that no input can panic the broker, and converts MQTT
//! 3.1.1 packets to and from the MQTT 5 types, which every other module
//! uses. It never decides what a packet means.

use std::panic::{catch_unwind, AssertUnwindSafe};

use bytes::{Bytes, BytesMut};
use rumqttc::mqttbytes::{self as m4, v4};
use rumqttc::v5::mqttbytes::v5::{self, *};
use rumqttc::v5::mqttbytes::QoS;

use crate::auth::{self, Auth};
use crate::strict;

/// The MQTT version a connection speaks, fixed by its CONNECT.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    V4,
    V5,
}

impl Protocol {
    pub fn level(self) -> u8 {
        match self {
            Protocol::V4 => 4,
            Protocol::V5 => 5,
        }
    }
}

/// Why bytes could not become a packet. Each closes the connection.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DecodeError {
    #[error("packet of {size} bytes exceeds the maximum of {max}")]
    TooLarge { size: usize, max: usize },
    #[error("malformed packet: {0}")]
    Malformed(String),
    #[error("protocol error: {0}")]
    Protocol(String),
    /// CONNECT with a protocol name/level we do not speak; carries the level
    /// so the refusal can be sent in a form the client understands.
    #[error("unsupported protocol level {0}")]
    UnsupportedProtocol(u8),
}

/// Decodes the next complete packet in `buf`, if there is one.
///
/// `protocol` is `None` until CONNECT has been read: then the only packet
/// allowed is CONNECT, and its level picks the codec. `max_size` bounds the
/// whole packet, fixed header included.
pub fn decode(
    buf: &mut BytesMut,
    protocol: Option<Protocol>,
    max_size: usize,
) -> Result<Option<(Protocol, Packet)>, DecodeError> {
    match decode_frame(buf, protocol, max_size)? {
        None => Ok(None),
        Some((protocol, Frame::Packet(p))) => Ok(Some((protocol, p))),
        Some((_, Frame::Auth(_))) => Err(DecodeError::Protocol(
            "AUTH where no authentication exchange is possible".into(),
        )),
    }
}

/// What a client sent: a packet of rumqttc's model, or an MQTT 5 AUTH,
/// which that model cannot carry (see [`crate::auth`]).
#[derive(Debug, Clone, PartialEq)]
pub enum Frame {
    Packet(Packet),
    Auth(Auth),
}

/// A PUBACK or PUBCOMP in its four-byte form: no reason code and no
/// properties, the only form MQTT 3.1.1 has and the one MQTT 5 clients
/// send on success. A subscriber sends one for nearly every message it
/// gets, so a connection reads these without building a packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ShortAck {
    PubAck(u16),
    PubComp(u16),
}

/// The bytes of a [`ShortAck`] on the wire.
pub const SHORT_ACK_LEN: usize = 4;

/// The [`ShortAck`] at the front of `buf`, if one is there whole. Anything
/// else, packet id 0 included (a protocol error), is left to
/// [`decode_frame`].
pub fn short_ack(buf: &[u8]) -> Option<ShortAck> {
    let &[byte1, 2, hi, lo, ..] = buf else {
        return None;
    };
    let pkid = u16::from_be_bytes([hi, lo]);
    match (byte1, pkid) {
        (_, 0) => None,
        (0x40, _) => Some(ShortAck::PubAck(pkid)),
        (0x70, _) => Some(ShortAck::PubComp(pkid)),
        _ => None,
    }
}

/// [`decode`], with AUTH: what a connection reads once it is established.
pub fn decode_frame(
    buf: &mut BytesMut,
    protocol: Option<Protocol>,
    max_size: usize,
) -> Result<Option<(Protocol, Frame)>, DecodeError> {
    let Some((byte1, header_len, remaining)) = fixed_header(buf)? else {
        return Ok(None);
    };
    let size = header_len + remaining;
    if size > max_size {
        return Err(DecodeError::TooLarge {
            size,
            max: max_size,
        });
    }
    let kind = byte1 >> 4;
    // The first byte alone can condemn a packet: refuse it before waiting
    // for a body that may never come (an HTTP client on the MQTT port).
    check_flags(byte1)?;
    match (protocol, kind) {
        (Some(_), 1) => {
            return Err(DecodeError::Protocol(
                "second CONNECT [MQTT-3.1.0-2]".into(),
            ))
        }
        (None, k) if k != 1 => {
            return Err(DecodeError::Protocol(
                "first packet is not CONNECT [MQTT-3.1.0-1]".into(),
            ))
        }
        _ => {}
    }
    if buf.len() < size {
        return Ok(None);
    }
    let protocol = match protocol {
        Some(p) => p,
        None => connect_protocol(&buf[header_len..size])?,
    };
    match (kind, protocol) {
        (1, _) => strict::check_connect(&buf[header_len..size], protocol)?,
        (8, _) => strict::check_subscribe(&buf[header_len..size], protocol)?,
        (3..=7 | 10 | 14, Protocol::V5) => {
            strict::check_properties(kind, byte1 & 0x0F, &buf[header_len..size])?
        }
        _ => {}
    }
    let frame = buf.split_to(size);
    if protocol == Protocol::V5 && kind == 15 {
        let auth = auth::read(&frame[header_len..])?;
        return Ok(Some((protocol, Frame::Auth(auth))));
    }
    // MQTT 5 allows a DISCONNECT with no body (reason 0x00) or with a
    // reason code and no property length [MQTT-3.14.2-1]; the codec
    // reads neither.
    if protocol == Protocol::V5 && kind == 14 && remaining <= 1 {
        let reason_code = match frame.get(header_len) {
            None => DisconnectReasonCode::NormalDisconnection,
            Some(&code) => DisconnectReasonCode::try_from(code)
                .map_err(|_| DecodeError::Malformed(format!("DISCONNECT reason {code:#04x}")))?,
        };
        return Ok(Some((
            protocol,
            Frame::Packet(Packet::Disconnect(Disconnect {
                reason_code,
                properties: None,
            })),
        )));
    }
    let mut frame = frame;
    let decoded = catch_unwind(AssertUnwindSafe(|| match protocol {
        Protocol::V4 => v4::Packet::read(&mut frame, max_size)
            .map(from_v4)
            .map_err(|e| e.to_string()),
        Protocol::V5 => {
            v5::Packet::read(&mut frame, Some(max_size as u32)).map_err(|e| e.to_string())
        }
    }));
    let packet = match decoded {
        Ok(Ok(p)) => p,
        Ok(Err(e)) => return Err(DecodeError::Malformed(e)),
        Err(_) => return Err(DecodeError::Malformed("codec failure".into())),
    };
    check_packet(&packet)?;
    Ok(Some((protocol, Frame::Packet(packet))))
}

/// (first byte, fixed header length, remaining length), or `None` while
/// the header is incomplete.
fn fixed_header(buf: &[u8]) -> Result<Option<(u8, usize, usize)>, DecodeError> {
    let Some(&byte1) = buf.first() else {
        return Ok(None);
    };
    let mut remaining = 0usize;
    for i in 0..4 {
        let Some(&b) = buf.get(1 + i) else {
            return Ok(None);
        };
        remaining |= ((b & 0x7F) as usize) << (7 * i);
        if b & 0x80 == 0 {
            return Ok(Some((byte1, 2 + i, remaining)));
        }
    }
    Err(DecodeError::Malformed(
        "remaining length longer than 4 bytes".into(),
    ))
}

/// Fixed-header flags are fixed for every packet but PUBLISH [MQTT-2.2.2-1],
/// [MQTT-2.2.2-2]; a QoS 0 PUBLISH must not have DUP set [MQTT-3.3.1-2].
fn check_flags(byte1: u8) -> Result<(), DecodeError> {
    let kind = byte1 >> 4;
    let flags = byte1 & 0x0F;
    let ok = match kind {
        3 => {
            let qos = (flags >> 1) & 0b11;
            qos != 3 && !(qos == 0 && flags & 0b1000 != 0)
        }
        6 | 8 | 10 => flags == 0b0010,
        1 | 2 | 4 | 5 | 7 | 9 | 11 | 12 | 13 | 14 | 15 => flags == 0,
        _ => false,
    };
    if ok {
        Ok(())
    } else {
        Err(DecodeError::Malformed(format!(
            "invalid flags {flags:#06b} for packet type {kind}"
        )))
    }
}

/// Reads protocol name and level from a CONNECT body.
fn connect_protocol(body: &[u8]) -> Result<Protocol, DecodeError> {
    let name_len = match body {
        [a, b, ..] => u16::from_be_bytes([*a, *b]) as usize,
        _ => return Err(DecodeError::Malformed("CONNECT too short".into())),
    };
    let name = body.get(2..2 + name_len);
    let level = body.get(2 + name_len).copied();
    match (name, level) {
        (Some(b"MQTT"), Some(4)) => Ok(Protocol::V4),
        (Some(b"MQTT"), Some(5)) => Ok(Protocol::V5),
        (Some(b"MQTT") | Some(b"MQIsdp"), Some(level)) => {
            Err(DecodeError::UnsupportedProtocol(level))
        }
        _ => Err(DecodeError::Malformed(
            "unknown protocol name [MQTT-3.1.2-1]".into(),
        )),
    }
}

/// Rules the codecs leave to the receiver.
fn check_packet(packet: &Packet) -> Result<(), DecodeError> {
    match packet {
        Packet::Subscribe(s) if s.filters.is_empty() => Err(DecodeError::Protocol(
            "SUBSCRIBE with no filters [MQTT-3.8.3-3]".into(),
        )),
        Packet::Unsubscribe(u) if u.filters.is_empty() => Err(DecodeError::Protocol(
            "UNSUBSCRIBE with no filters [MQTT-3.10.3-2]".into(),
        )),
        Packet::Subscribe(s) if s.pkid == 0 => Err(DecodeError::Protocol("packet id 0".into())),
        // rumqttc also miscounts this property's length, so the rest of the
        // properties would be read as payload (found by fuzz/mqtt_decode).
        Packet::Publish(p)
            if p.properties
                .as_ref()
                .is_some_and(|props| !props.subscription_identifiers.is_empty()) =>
        {
            Err(DecodeError::Protocol(
                "Subscription Identifier in a client PUBLISH [MQTT-3.3.4-6]".into(),
            ))
        }
        Packet::Unsubscribe(u) if u.pkid == 0 => Err(DecodeError::Protocol("packet id 0".into())),
        Packet::ConnAck(_) | Packet::SubAck(_) | Packet::UnsubAck(_) | Packet::PingResp(_) => Err(
            DecodeError::Protocol("a server-to-client packet was sent by the client".into()),
        ),
        // Never: an MQTT 5 AUTH is read by `auth`, and 3.1.1 has none.
        Packet::Auth(_) => Err(DecodeError::Protocol("AUTH in 3.1.1".into())),
        _ => Ok(()),
    }
}

fn qos_from_v4(q: m4::QoS) -> QoS {
    match q {
        m4::QoS::AtMostOnce => QoS::AtMostOnce,
        m4::QoS::AtLeastOnce => QoS::AtLeastOnce,
        m4::QoS::ExactlyOnce => QoS::ExactlyOnce,
    }
}

fn qos_to_v4(q: QoS) -> m4::QoS {
    match q {
        QoS::AtMostOnce => m4::QoS::AtMostOnce,
        QoS::AtLeastOnce => m4::QoS::AtLeastOnce,
        QoS::ExactlyOnce => m4::QoS::ExactlyOnce,
    }
}

fn from_v4(p: v4::Packet) -> Packet {
    match p {
        v4::Packet::Connect(c) => Packet::Connect(
            Connect {
                keep_alive: c.keep_alive,
                client_id: c.client_id,
                clean_start: c.clean_session,
                properties: None,
            },
            c.last_will.map(|w| LastWill {
                topic: Bytes::from(w.topic.into_bytes()),
                message: w.message,
                qos: qos_from_v4(w.qos),
                retain: w.retain,
                properties: None,
            }),
            c.login.map(|l| Login {
                username: l.username,
                password: l.password,
            }),
        ),
        v4::Packet::Publish(p) => Packet::Publish(Publish {
            dup: p.dup,
            qos: qos_from_v4(p.qos),
            retain: p.retain,
            topic: Bytes::from(p.topic.into_bytes()),
            pkid: p.pkid,
            payload: p.payload,
            properties: None,
        }),
        v4::Packet::PubAck(a) => Packet::PubAck(PubAck::new(a.pkid, None)),
        v4::Packet::PubRec(a) => Packet::PubRec(PubRec::new(a.pkid, None)),
        v4::Packet::PubRel(a) => Packet::PubRel(PubRel::new(a.pkid, None)),
        v4::Packet::PubComp(a) => Packet::PubComp(PubComp::new(a.pkid, None)),
        v4::Packet::Subscribe(s) => Packet::Subscribe(Subscribe {
            pkid: s.pkid,
            filters: s
                .filters
                .into_iter()
                .map(|f| Filter::new(f.path, qos_from_v4(f.qos)))
                .collect(),
            properties: None,
        }),
        v4::Packet::Unsubscribe(u) => Packet::Unsubscribe(Unsubscribe {
            pkid: u.pkid,
            filters: u.topics,
            properties: None,
        }),
        v4::Packet::PingReq => Packet::PingReq(PingReq),
        v4::Packet::Disconnect => Packet::Disconnect(Disconnect {
            reason_code: DisconnectReasonCode::NormalDisconnection,
            properties: None,
        }),
        // Server-to-client packets: refused by `check_packet`.
        v4::Packet::ConnAck(_) => Packet::ConnAck(ConnAck {
            session_present: false,
            code: ConnectReturnCode::ProtocolError,
            properties: None,
        }),
        v4::Packet::SubAck(a) => Packet::SubAck(SubAck {
            pkid: a.pkid,
            return_codes: vec![],
            properties: None,
        }),
        v4::Packet::UnsubAck(a) => Packet::UnsubAck(UnsubAck {
            pkid: a.pkid,
            reasons: vec![],
            properties: None,
        }),
        v4::Packet::PingResp => Packet::PingResp(PingResp),
    }
}

/// The 3.1.1 form of a server packet, or `None` when 3.1.1 has no such
/// packet (DISCONNECT and AUTH from the server: the connection just closes).
fn to_v4(p: &Packet) -> Option<v4::Packet> {
    Some(match p {
        Packet::ConnAck(c) => v4::Packet::ConnAck(v4::ConnAck::new(
            match c.code {
                ConnectReturnCode::Success => v4::ConnectReturnCode::Success,
                ConnectReturnCode::UnsupportedProtocolVersion
                | ConnectReturnCode::RefusedProtocolVersion => {
                    v4::ConnectReturnCode::RefusedProtocolVersion
                }
                ConnectReturnCode::ClientIdentifierNotValid | ConnectReturnCode::BadClientId => {
                    v4::ConnectReturnCode::BadClientId
                }
                ConnectReturnCode::BadUserNamePassword => {
                    v4::ConnectReturnCode::BadUserNamePassword
                }
                ConnectReturnCode::NotAuthorized | ConnectReturnCode::Banned => {
                    v4::ConnectReturnCode::NotAuthorized
                }
                _ => v4::ConnectReturnCode::ServiceUnavailable,
            },
            c.session_present,
        )),
        Packet::Publish(p) => v4::Packet::Publish(v4::Publish {
            dup: p.dup,
            qos: qos_to_v4(p.qos),
            retain: p.retain,
            topic: String::from_utf8_lossy(&p.topic).into_owned(),
            pkid: p.pkid,
            payload: p.payload.clone(),
        }),
        Packet::PubAck(a) => v4::Packet::PubAck(v4::PubAck::new(a.pkid)),
        Packet::PubRec(a) => v4::Packet::PubRec(v4::PubRec::new(a.pkid)),
        Packet::PubRel(a) => v4::Packet::PubRel(v4::PubRel::new(a.pkid)),
        Packet::PubComp(a) => v4::Packet::PubComp(v4::PubComp::new(a.pkid)),
        Packet::SubAck(a) => v4::Packet::SubAck(v4::SubAck::new(
            a.pkid,
            a.return_codes
                .iter()
                .map(|c| match c {
                    SubscribeReasonCode::Success(q) => {
                        v4::SubscribeReasonCode::Success(qos_to_v4(*q))
                    }
                    _ => v4::SubscribeReasonCode::Failure,
                })
                .collect(),
        )),
        Packet::UnsubAck(a) => v4::Packet::UnsubAck(v4::UnsubAck::new(a.pkid)),
        Packet::PingResp(_) => v4::Packet::PingResp,
        _ => return None,
    })
}

/// Appends `packet` to `out` in the connection's protocol. Returns false if
/// the packet has no form in that protocol or is larger than `max_size`
/// (the client's Maximum Packet Size), in which case nothing is written.
pub fn encode(
    packet: &Packet,
    protocol: Protocol,
    out: &mut BytesMut,
    max_size: Option<u32>,
) -> bool {
    match protocol {
        // rumqttc cannot write a DISCONNECT with a reason code and no
        // properties: without properties it declares one byte fewer than it
        // writes, and with empty ones the Remaining Length is 2, which it
        // takes for its own short form and writes `E0 00`, losing the reason
        // code [MQTT-3.14.2-1]. Written here: reason code, empty properties.
        Protocol::V5 => match packet {
            Packet::Disconnect(d)
                if d.properties.is_none()
                    && d.reason_code != DisconnectReasonCode::NormalDisconnection =>
            {
                if max_size.is_some_and(|m| m < 4) {
                    return false;
                }
                out.extend_from_slice(&[0xE0, 0x02, d.reason_code as u8, 0x00]);
                true
            }
            _ => packet.write(out, max_size).is_ok(),
        },
        Protocol::V4 => match to_v4(packet) {
            Some(p) => p
                .write(out, max_size.map_or(usize::MAX, |m| m as usize))
                .is_ok(),
            None => false,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // A short ack is exactly what the full decoder makes of the same bytes,
    // in both protocol versions; every other packet is left to it.
    #[test]
    fn a_short_ack_is_what_the_decoder_reads() {
        for proto in [Protocol::V4, Protocol::V5] {
            for (byte1, pkid) in [(0x40u8, 1u16), (0x40, 0xFFFF), (0x70, 7), (0x70, 0x1234)] {
                let bytes = [byte1, 2, (pkid >> 8) as u8, pkid as u8, 0xE0, 0];
                let short = short_ack(&bytes).expect("a short ack");
                let mut buf = BytesMut::from(&bytes[..]);
                let decoded = decode_frame(&mut buf, Some(proto), 1024);
                let full = match decoded {
                    Ok(Some((_, Frame::Packet(Packet::PubAck(a))))) => ShortAck::PubAck(a.pkid),
                    Ok(Some((_, Frame::Packet(Packet::PubComp(c))))) => ShortAck::PubComp(c.pkid),
                    other => panic!("{proto:?} {bytes:?}: {other:?}"),
                };
                assert_eq!(short, full);
                assert_eq!(buf.len(), 2, "four bytes taken");
            }
        }
        for not_short in [
            &[0x40u8, 2, 0, 0][..], // packet id 0
            &[0x40, 3, 0, 1, 0x10], // with a reason code
            &[0x42, 2, 0, 1],       // bad flags
            &[0x50, 2, 0, 1],       // PUBREC
            &[0x62, 2, 0, 1],       // PUBREL
            &[0x40, 2, 0],          // not whole
            &[0x30, 2, 0, 1],       // PUBLISH
        ] {
            assert_eq!(short_ack(not_short), None, "{not_short:?}");
        }
    }

    fn decode_all(
        bytes: &[u8],
        protocol: Option<Protocol>,
    ) -> Result<Option<(Protocol, Packet)>, DecodeError> {
        let mut buf = BytesMut::from(bytes);
        decode(&mut buf, protocol, 1 << 20)
    }

    #[test]
    fn a_3_1_1_connect_is_read_as_v4() {
        let mut out = BytesMut::new();
        let mut c = v4::Connect::new("c1");
        c.clean_session = false;
        v4::Packet::Connect(c).write(&mut out, 1000).unwrap();
        let (protocol, packet) = decode_all(&out, None).unwrap().unwrap();
        assert_eq!(protocol, Protocol::V4);
        match packet {
            Packet::Connect(c, None, None) => {
                assert_eq!(c.client_id, "c1");
                assert!(!c.clean_start);
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn an_incomplete_packet_waits_for_more_bytes() {
        assert_eq!(decode_all(&[0x30], Some(Protocol::V4)), Ok(None));
        assert_eq!(decode_all(&[0x30, 0x80], Some(Protocol::V4)), Ok(None));
        assert_eq!(
            decode_all(&[0x30, 0x05, 0, 1], Some(Protocol::V4)),
            Ok(None)
        );
    }

    #[test]
    fn an_oversized_packet_is_refused_from_its_header() {
        let mut buf = BytesMut::from(&[0x30u8, 0xFF, 0xFF, 0xFF, 0x7F][..]);
        assert!(matches!(
            decode(&mut buf, Some(Protocol::V4), 1024),
            Err(DecodeError::TooLarge { .. })
        ));
    }

    // [MQTT-3.1.0-1] the first packet must be CONNECT.
    #[test]
    fn the_first_packet_must_be_connect() {
        assert!(matches!(
            decode_all(&[0xC0, 0x00], None),
            Err(DecodeError::Protocol(_))
        ));
    }

    // [MQTT-3.8.1-1] SUBSCRIBE flags must be 0010.
    #[test]
    fn reserved_flags_are_checked() {
        let sub = [0x80u8, 0x06, 0x00, 0x01, 0x00, 0x01, b'a', 0x00];
        assert!(matches!(
            decode_all(&sub, Some(Protocol::V4)),
            Err(DecodeError::Malformed(_))
        ));
        let mut ok = sub;
        ok[0] = 0x82;
        assert!(matches!(decode_all(&ok, Some(Protocol::V4)), Ok(Some(_))));
    }

    #[test]
    fn old_protocol_levels_are_reported_for_refusal() {
        // MQTT 3.1: "MQIsdp", level 3
        let body = [
            0x10u8, 12, 0, 6, b'M', b'Q', b'I', b's', b'd', b'p', 3, 2, 0, 60,
        ];
        assert_eq!(
            decode_all(&body, None),
            Err(DecodeError::UnsupportedProtocol(3))
        );
    }

    #[test]
    fn a_v5_disconnect_without_body_is_normal() {
        let got = decode_all(&[0xE0, 0x00], Some(Protocol::V5))
            .unwrap()
            .unwrap()
            .1;
        assert!(
            matches!(got, Packet::Disconnect(d) if d.reason_code == DisconnectReasonCode::NormalDisconnection)
        );
    }

    // [MQTT-3.14.2-1] a reason code with no property length is complete.
    #[test]
    fn a_v5_disconnect_of_one_byte_carries_its_reason() {
        let got = decode_all(&[0xE0, 0x01, 0x04], Some(Protocol::V5))
            .unwrap()
            .unwrap()
            .1;
        assert!(
            matches!(got, Packet::Disconnect(d) if d.reason_code == DisconnectReasonCode::DisconnectWithWillMessage)
        );
        assert!(decode_all(&[0xE0, 0x01, 0x03], Some(Protocol::V5)).is_err());
    }

    #[test]
    fn garbage_never_panics() {
        // A cheap deterministic fuzz: every prefix of many pseudo-random
        // buffers, in both protocols.
        let mut seed = 0x2545F4914F6CDD1Du64;
        for _ in 0..20_000 {
            let mut bytes = Vec::new();
            for _ in 0..(seed % 40) {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                bytes.push(seed as u8);
            }
            if let Some(b) = bytes.first_mut() {
                *b = (*b & 0xF0)
                    | if *b & 0xF0 == 0x30 {
                        *b & 0x0F
                    } else {
                        (*b >> 4 == 6 || *b >> 4 == 8 || *b >> 4 == 10) as u8 * 2
                    };
            }
            for p in [Some(Protocol::V4), Some(Protocol::V5), None] {
                let _ = decode_all(&bytes, p);
            }
        }
    }

    // [MQTT-3.3.4-6], found by fuzz/mqtt_decode: rumqttc counts the property
    // byte of a Subscription Identifier twice, so here it stops reading the
    // properties early and takes the Payload Format Indicator for payload: the
    // PUBLISH was forwarded altered, as `01 01 78`.
    #[test]
    fn a_client_publish_with_a_subscription_identifier_is_a_protocol_error() {
        // QoS 0 PUBLISH "a": properties (6 bytes) = Subscription Identifiers
        // 5 and 6, Payload Format Indicator 1; payload "x".
        let publish = [
            0x30, 0x0B, 0x00, 0x01, b'a', 0x06, 0x0B, 0x05, 0x0B, 0x06, 0x01, 0x01, b'x',
        ];
        assert!(matches!(
            decode_all(&publish, Some(Protocol::V5)),
            Err(DecodeError::Protocol(_))
        ));
    }

    // MQTT 5 2.1.4: the Remaining Length counts exactly the bytes that follow.
    #[test]
    fn a_disconnect_with_a_reason_declares_its_real_length() {
        let mut out = BytesMut::new();
        let d = Packet::Disconnect(Disconnect::new(DisconnectReasonCode::SessionTakenOver));
        assert!(encode(&d, Protocol::V5, &mut out, None));
        assert_eq!(&out[..], [0xE0, 0x02, 0x8E, 0x00]);
    }

    #[test]
    fn a_bad_first_byte_is_refused_before_its_body_arrives() {
        // An HTTP request on the MQTT port: 'G' (type 4) declares 69 bytes.
        assert!(decode_all(b"GET / HTTP/1.1\r\n", None).is_err());
        // A PUBLISH before CONNECT, body still to come [MQTT-3.1.0-1].
        assert!(matches!(
            decode_all(&[0x30, 0x7F], None),
            Err(DecodeError::Protocol(_))
        ));
        // [MQTT-3.8.1-1] SUBSCRIBE flags 0000, body still to come.
        assert!(matches!(
            decode_all(&[0x80, 0x10, 0x00], Some(Protocol::V4)),
            Err(DecodeError::Malformed(_))
        ));
    }
}
