//! What the fuzz targets share: reading a byte stream the way the broker's
//! connection does, and the codec properties checked on every packet.

use bytes::BytesMut;
use chatmq_protocol::auth::{self, Auth};
use chatmq_protocol::codec::{self, Frame, Protocol};
use rumqttc::v5::mqttbytes::v5::Packet;

/// At least the broker's default packet limit (`mqtt.max_payload` plus
/// headers); the exact value only decides which packets are `TooLarge`.
pub const MAX_PACKET: usize = 1 << 20;

/// Decodes every whole packet at the front of `buf` as the connection does:
/// until CONNECT has fixed the version, `protocol` is `None`; then the
/// version it chose. Stops at an incomplete packet (`Ok`, more bytes may
/// come) or at the first error (the connection would close).
pub fn read_packets(buf: &mut BytesMut, protocol: &mut Option<Protocol>) -> Result<(), ()> {
    loop {
        match codec::decode_frame(buf, *protocol, MAX_PACKET) {
            Ok(Some((version, Frame::Packet(packet)))) => {
                *protocol = Some(version);
                check_round_trip(version, &packet);
            }
            Ok(Some((_, Frame::Auth(a)))) => check_auth_round_trip(&a),
            Ok(None) => return Ok(()),
            Err(_) => return Err(()),
        }
    }
}

/// Decode, encode, decode gives the same packet, for every packet the codec
/// can write in `version` (3.1.1 writes only what a server sends, so there
/// the client packets it has no form for are skipped).
fn check_round_trip(version: Protocol, packet: &Packet) {
    let mut wire = BytesMut::new();
    if !codec::encode(packet, version, &mut wire, None) {
        return;
    }
    let written = wire.clone();
    // A second CONNECT on one connection is refused, so a CONNECT is read
    // back as the first packet of a new one.
    let expect = match packet {
        Packet::Connect(..) => None,
        _ => Some(version),
    };
    match codec::decode(&mut wire, expect, MAX_PACKET) {
        Ok(Some((again_version, again))) => {
            assert_eq!(again_version, version, "version changed: {written:02x?}");
            assert_eq!(
                &again, packet,
                "round trip changed the packet: {written:02x?}"
            );
            assert!(
                wire.is_empty(),
                "encoder wrote trailing bytes: {written:02x?}"
            );
        }
        other => panic!("the codec cannot read what it wrote ({other:?}): {written:02x?}"),
    }
}

/// An AUTH the reader accepted is written and read back unchanged.
fn check_auth_round_trip(a: &Auth) {
    let mut wire = BytesMut::new();
    if !auth::write(a, &mut wire, None) {
        return;
    }
    let written = wire.clone();
    match codec::decode_frame(&mut wire, Some(Protocol::V5), MAX_PACKET) {
        Ok(Some((_, Frame::Auth(again)))) => {
            assert_eq!(&again, a, "round trip changed the AUTH: {written:02x?}");
            assert!(wire.is_empty(), "trailing bytes: {written:02x?}");
        }
        other => panic!("cannot read the AUTH it wrote ({other:?}): {written:02x?}"),
    }
}
