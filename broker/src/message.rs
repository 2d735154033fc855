//! An application message on its way through the broker, and its
//! conversions to the stored record and to the PUBLISH a subscriber gets.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};

use bytes::{Bytes, BytesMut};
use chatmq_storage::{MessageProps, MessageRecord};
use rumqttc::v5::mqttbytes::v5::{Packet, Publish, PublishProperties};
use rumqttc::v5::mqttbytes::QoS;

use crate::clock::now_ms;
use crate::codec::{self, Protocol};

/// One published message, shared by every subscriber it goes to.
#[derive(Debug, Clone)]
pub struct Message {
    pub topic: String,
    pub payload: Bytes,
    pub qos: QoS,
    pub retain: bool,
    pub props: MessageProps,
    /// Unix milliseconds after which nobody gets it; 0 = never.
    pub expires_at_ms: u64,
    /// The publishing client, for No Local; `None` for server messages.
    pub publisher: Option<Arc<str>>,
    /// Its QoS 0 PUBLISH as written on the wire, once per protocol version,
    /// for a fan-out to many sessions (see [`Message::wire_qos0`]).
    pub wire: WireCache,
}

/// A message's QoS 0 PUBLISH (packet id none, RETAIN clear, no
/// subscription identifiers), encoded the first time a fan-out needs it
/// and then copied by every subscriber's connection. A clone starts empty:
/// a copy may be changed (the retained copy loses its publisher), and what
/// is cached must always be what the message says.
#[derive(Default)]
pub struct WireCache {
    v4: OnceLock<Bytes>,
    v5: OnceLock<Bytes>,
    /// The QoS 1/2 PUBLISH ([`Message::wire_acked`]).
    v4_acked: OnceLock<Option<Acked>>,
    v5_acked: OnceLock<Option<Acked>>,
    /// Routed to more than one session ([`Message::mark_shared`]): worth
    /// encoding once. For a single delivery the encoding would be one more
    /// allocation and copy (QoS 1 pairs measured 20% slower with it).
    shared: AtomicBool,
}

/// A QoS 1/2 PUBLISH as written on the wire, and where its packet id is.
#[derive(Debug)]
pub struct Acked {
    bytes: Bytes,
    pkid_at: usize,
}

impl Acked {
    /// The encoded length.
    pub fn len(&self) -> usize {
        self.bytes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.bytes.is_empty()
    }

    /// Appends this PUBLISH to `out` with one subscriber's QoS, packet id,
    /// DUP and RETAIN: the fixed header's flags [MQTT-2.2.2] and the
    /// packet id after the topic are all that differ between deliveries.
    pub fn write(&self, out: &mut BytesMut, qos: QoS, pkid: u16, dup: bool, retain: bool) {
        let at = out.len();
        out.extend_from_slice(&self.bytes);
        let flags = (u8::from(dup) << 3) | ((qos as u8) << 1) | u8::from(retain);
        if let Some(first) = out.get_mut(at) {
            *first = (*first & 0xF0) | flags;
        }
        let id = at + self.pkid_at;
        if let Some(slot) = out.get_mut(id..id + 2) {
            slot.copy_from_slice(&pkid.to_be_bytes());
        }
    }
}

/// Where the packet id of the QoS 1/2 PUBLISH in `wire` is: after the
/// fixed header (a byte and the remaining length, 1 to 4 bytes) and the
/// topic (a 2-byte length and the name).
fn pkid_offset(wire: &[u8]) -> Option<usize> {
    let len_bytes = wire.iter().skip(1).take(4).position(|b| b & 0x80 == 0)? + 1;
    let topic_at = 1 + len_bytes;
    let topic_len = u16::from_be_bytes([*wire.get(topic_at)?, *wire.get(topic_at + 1)?]);
    let pkid_at = topic_at + 2 + usize::from(topic_len);
    (pkid_at + 2 <= wire.len()).then_some(pkid_at)
}

impl Clone for WireCache {
    fn clone(&self) -> Self {
        WireCache::default()
    }
}

impl std::fmt::Debug for WireCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("WireCache")
    }
}

impl Message {
    /// Builds the message a client's PUBLISH carries.
    pub fn from_publish(topic: String, p: &Publish, publisher: Option<Arc<str>>) -> Message {
        let mut props = MessageProps::default();
        let mut expires_at_ms = 0;
        if let Some(pp) = &p.properties {
            props.payload_format = pp.payload_format_indicator;
            props.content_type = pp.content_type.clone();
            props.response_topic = pp.response_topic.clone();
            props.correlation_data = pp.correlation_data.as_ref().map(|b| b.to_vec());
            props.user_properties = pp.user_properties.clone();
            if let Some(secs) = pp.message_expiry_interval {
                expires_at_ms = now_ms().saturating_add(u64::from(secs) * 1000);
            }
        }
        Message {
            topic,
            payload: p.payload.clone(),
            qos: p.qos,
            retain: p.retain,
            props,
            expires_at_ms,
            publisher,
            wire: WireCache::default(),
        }
    }

    /// A message the server itself publishes (chat deliveries, events,
    /// presence, typing): no properties, no expiry, no publisher.
    pub fn from_server(
        topic: String,
        payload: impl Into<Bytes>,
        qos: QoS,
        retain: bool,
    ) -> Message {
        Message {
            topic,
            payload: payload.into(),
            qos,
            retain,
            props: MessageProps::default(),
            expires_at_ms: 0,
            publisher: None,
            wire: WireCache::default(),
        }
    }

    /// What the message counts for against a session's byte budget
    /// (`mqtt.session_queue_bytes`): topic and payload.
    pub fn budget_size(&self) -> usize {
        self.topic.len().saturating_add(self.payload.len())
    }

    pub fn is_expired(&self, now_ms: u64) -> bool {
        self.expires_at_ms != 0 && now_ms >= self.expires_at_ms
    }

    /// The PUBLISH a subscriber receives: `qos` already reduced to the
    /// subscription's, the Message Expiry Interval counting down
    /// [MQTT-3.3.2-6], and the matching subscription identifiers.
    pub fn to_publish(
        &self,
        qos: QoS,
        pkid: u16,
        dup: bool,
        retain: bool,
        sub_ids: &[u32],
    ) -> Publish {
        let p = &self.props;
        let expiry = (self.expires_at_ms != 0)
            .then(|| (self.expires_at_ms.saturating_sub(now_ms()).div_ceil(1000)).max(1) as u32);
        let has_props = p.payload_format.is_some()
            || p.content_type.is_some()
            || p.response_topic.is_some()
            || p.correlation_data.is_some()
            || !p.user_properties.is_empty()
            || expiry.is_some()
            || !sub_ids.is_empty();
        Publish {
            dup,
            qos,
            retain,
            topic: Bytes::copy_from_slice(self.topic.as_bytes()),
            pkid,
            payload: self.payload.clone(),
            properties: has_props.then(|| PublishProperties {
                payload_format_indicator: p.payload_format,
                message_expiry_interval: expiry,
                topic_alias: None,
                response_topic: p.response_topic.clone(),
                correlation_data: p.correlation_data.clone().map(Bytes::from),
                user_properties: p.user_properties.clone(),
                subscription_identifiers: sub_ids.iter().map(|&i| i as usize).collect(),
                content_type: p.content_type.clone(),
            }),
        }
    }

    /// The QoS 0 PUBLISH every subscriber of a fan-out gets, encoded once
    /// per protocol version; `None` when it differs per subscriber or over
    /// time (a Message Expiry Interval counts down [MQTT-3.3.2-6]) and
    /// must be built for each one with [`Message::to_publish`].
    pub fn wire_qos0(&self, protocol: Protocol) -> Option<&Bytes> {
        if self.expires_at_ms != 0 {
            return None;
        }
        let cell = match protocol {
            Protocol::V4 => &self.wire.v4,
            Protocol::V5 => &self.wire.v5,
        };
        Some(cell.get_or_init(|| {
            // Without a size limit this cannot fail; an empty encoding
            // (were it to) is skipped by the caller as too large.
            self.encoded(QoS::AtMostOnce, 0, protocol)
                .unwrap_or_default()
                .freeze()
        }))
    }

    /// This message's PUBLISH at `qos` with packet id `pkid`, no DUP, no
    /// RETAIN and no subscription identifiers, as written on the wire;
    /// `None` if the encoder refused it.
    fn encoded(&self, qos: QoS, pkid: u16, protocol: Protocol) -> Option<BytesMut> {
        let p = self.to_publish(qos, pkid, false, false, &[]);
        let mut out = BytesMut::new();
        codec::encode(&Packet::Publish(p), protocol, &mut out, None).then_some(out)
    }

    /// The QoS 1/2 PUBLISH of this message for `protocol`, encoded once
    /// and shared by every delivery of it ([`Acked::write`] sets each one's
    /// flags and packet id); `None` when deliveries differ in more (a
    /// Message Expiry Interval counts down [MQTT-3.3.2-6]; subscription
    /// identifiers are the subscriber's: the caller checks those).
    pub fn wire_acked(&self, protocol: Protocol) -> Option<&Acked> {
        if self.expires_at_ms != 0 {
            return None;
        }
        let cell = match protocol {
            Protocol::V4 => &self.wire.v4_acked,
            Protocol::V5 => &self.wire.v5_acked,
        };
        cell.get_or_init(|| {
            let out = self.encoded(QoS::AtLeastOnce, 1, protocol)?;
            let pkid_at = pkid_offset(&out)?;
            Some(Acked {
                bytes: out.freeze(),
                pkid_at,
            })
        })
        .as_ref()
    }

    /// The message goes to more than one session: its QoS 1/2 deliveries
    /// copy one encoding ([`Message::wire_acked`]).
    pub fn mark_shared(&self) {
        self.wire.shared.store(true, Ordering::Relaxed);
    }

    pub fn is_shared(&self) -> bool {
        self.wire.shared.load(Ordering::Relaxed)
    }

    pub fn to_record(&self) -> MessageRecord {
        MessageRecord {
            topic: self.topic.clone(),
            payload: self.payload.to_vec(),
            qos: self.qos as u8,
            retain: self.retain,
            props: self.props.clone(),
            expires_at_ms: self.expires_at_ms,
        }
    }

    pub fn from_record(r: MessageRecord) -> Message {
        Message {
            topic: r.topic,
            payload: Bytes::from(r.payload),
            qos: qos_from_u8(r.qos),
            retain: r.retain,
            props: r.props,
            expires_at_ms: r.expires_at_ms,
            publisher: None,
            wire: WireCache::default(),
        }
    }
}

pub fn qos_from_u8(q: u8) -> QoS {
    match q {
        0 => QoS::AtMostOnce,
        1 => QoS::AtLeastOnce,
        _ => QoS::ExactlyOnce,
    }
}

pub fn min_qos(a: QoS, b: QoS) -> QoS {
    if (a as u8) <= (b as u8) {
        a
    } else {
        b
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // Issue #11 item 1: one encoding per protocol version, patched per
    // delivery, must be byte for byte what encoding that delivery alone
    // gives: for both versions, both QoS, DUP, RETAIN, any packet id, a
    // short and a long remaining length, with and without properties.
    #[test]
    fn a_shared_encoding_patched_per_delivery_is_what_each_would_encode() {
        let mut plain = Message::from_server(
            "a/b".into(),
            Bytes::from_static(b"hi"),
            QoS::AtLeastOnce,
            false,
        );
        plain.payload = Bytes::from(vec![7u8; 300]);
        let mut with_props = plain.clone();
        with_props.props.content_type = Some("text/plain".into());
        with_props.props.user_properties = vec![("k".into(), "v".into())];
        let short = Message::from_server(
            "t".into(),
            Bytes::from_static(b"x"),
            QoS::AtLeastOnce,
            false,
        );
        for msg in [&plain, &with_props, &short] {
            for protocol in [Protocol::V4, Protocol::V5] {
                let shared = msg.wire_acked(protocol).expect("shared encoding");
                for (qos, pkid, dup, retain) in [
                    (QoS::AtLeastOnce, 1, false, false),
                    (QoS::AtLeastOnce, 0xFFFF, true, true),
                    (QoS::ExactlyOnce, 300, false, true),
                    (QoS::ExactlyOnce, 2, true, false),
                ] {
                    let mut alone = BytesMut::new();
                    let p = msg.to_publish(qos, pkid, dup, retain, &[]);
                    assert!(codec::encode(
                        &Packet::Publish(p),
                        protocol,
                        &mut alone,
                        None
                    ));
                    let mut patched = BytesMut::from(&b"before"[..]);
                    shared.write(&mut patched, qos, pkid, dup, retain);
                    assert_eq!(&patched[..6], b"before");
                    assert_eq!(
                        &patched[6..],
                        &alone[..],
                        "{protocol:?} {qos:?} pkid {pkid} dup {dup} retain {retain} topic {}",
                        msg.topic
                    );
                }
            }
        }
        let mut expiring = short.clone();
        expiring.expires_at_ms = now_ms() + 60_000;
        assert!(
            expiring.wire_acked(Protocol::V5).is_none(),
            "its expiry counts down"
        );
    }
}
