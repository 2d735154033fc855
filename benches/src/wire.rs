//! The lean MQTT 3.1.1 client path of the load generator: hand-written
//! encoding of the few packets a benchmark client sends, and framing and
//! decoding of the few it receives. No allocation per message beyond the
//! frame itself, so the generator spends its CPU on the broker, not on
//! itself (see benches/README.md for the rumqttc comparison).

use bytes::{Buf, BufMut, Bytes, BytesMut};

pub const CONNACK: u8 = 2;
pub const PUBLISH: u8 = 3;
pub const PUBACK: u8 = 4;
pub const SUBACK: u8 = 9;

fn put_remaining_length(out: &mut BytesMut, mut len: usize) {
    loop {
        let mut byte = (len % 128) as u8;
        len /= 128;
        if len > 0 {
            byte |= 0x80;
        }
        out.put_u8(byte);
        if len == 0 {
            break;
        }
    }
}

fn put_str(out: &mut BytesMut, s: &[u8]) {
    out.put_u16(s.len() as u16);
    out.put_slice(s);
}

/// CONNECT, MQTT 3.1.1.
pub fn connect(
    out: &mut BytesMut,
    client_id: &str,
    login: Option<(&str, &str)>,
    clean: bool,
    keep_alive: u16,
) {
    let mut len = 10 + 2 + client_id.len();
    if let Some((u, p)) = login {
        len += 2 + u.len() + 2 + p.len();
    }
    out.put_u8(0x10);
    put_remaining_length(out, len);
    put_str(out, b"MQTT");
    out.put_u8(4);
    let mut flags = if clean { 0x02 } else { 0 };
    if login.is_some() {
        flags |= 0xC0;
    }
    out.put_u8(flags);
    out.put_u16(keep_alive);
    put_str(out, client_id.as_bytes());
    if let Some((u, p)) = login {
        put_str(out, u.as_bytes());
        put_str(out, p.as_bytes());
    }
}

/// SUBSCRIBE to `filters`, all at `qos`.
pub fn subscribe(out: &mut BytesMut, pkid: u16, filters: &[String], qos: u8) {
    let len = 2 + filters.iter().map(|f| 2 + f.len() + 1).sum::<usize>();
    out.put_u8(0x82);
    put_remaining_length(out, len);
    out.put_u16(pkid);
    for f in filters {
        put_str(out, f.as_bytes());
        out.put_u8(qos);
    }
}

pub fn publish(out: &mut BytesMut, topic: &str, qos: u8, pkid: u16, payload: &[u8]) {
    let len = 2 + topic.len() + if qos > 0 { 2 } else { 0 } + payload.len();
    out.put_u8(0x30 | (qos << 1));
    put_remaining_length(out, len);
    put_str(out, topic.as_bytes());
    if qos > 0 {
        out.put_u16(pkid);
    }
    out.put_slice(payload);
}

pub fn puback(out: &mut BytesMut, pkid: u16) {
    out.put_slice(&[0x40, 2]);
    out.put_u16(pkid);
}

pub fn pingreq(out: &mut BytesMut) {
    out.put_slice(&[0xC0, 0]);
}

pub fn disconnect(out: &mut BytesMut) {
    out.put_slice(&[0xE0, 0]);
}

/// One received packet: its type, flags and body.
pub struct Frame {
    pub kind: u8,
    pub flags: u8,
    pub body: Bytes,
}

/// Splits the next complete packet off `buf`, if there is one.
pub fn next_frame(buf: &mut BytesMut) -> Result<Option<Frame>, String> {
    let mut len = 0usize;
    let mut shift = 0;
    let mut i = 1;
    loop {
        let Some(&b) = buf.get(i) else {
            return Ok(None);
        };
        len |= ((b & 0x7F) as usize) << shift;
        i += 1;
        if b & 0x80 == 0 {
            break;
        }
        shift += 7;
        if shift > 21 {
            return Err("malformed remaining length".into());
        }
    }
    if buf.len() < i + len {
        return Ok(None);
    }
    let byte1 = buf[0];
    let mut frame = buf.split_to(i + len);
    frame.advance(i);
    Ok(Some(Frame {
        kind: byte1 >> 4,
        flags: byte1 & 0x0F,
        body: frame.freeze(),
    }))
}

/// A PUBLISH body taken apart: (topic, qos, packet id, payload).
pub fn parse_publish(f: &Frame) -> Result<(Bytes, u8, u16, Bytes), String> {
    let qos = (f.flags >> 1) & 3;
    let mut body = f.body.clone();
    if body.len() < 2 {
        return Err("short PUBLISH".into());
    }
    let tlen = body.get_u16() as usize;
    let extra = if qos > 0 { 2 } else { 0 };
    if body.len() < tlen + extra {
        return Err("short PUBLISH".into());
    }
    let topic = body.split_to(tlen);
    let pkid = if qos > 0 { body.get_u16() } else { 0 };
    Ok((topic, qos, pkid, body))
}

/// The packet id of a PUBACK or SUBACK.
pub fn packet_id(f: &Frame) -> u16 {
    match f.body.get(..2) {
        Some(b) => u16::from_be_bytes([b[0], b[1]]),
        None => 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn publish_round_trips_through_the_framer() {
        let mut buf = BytesMut::new();
        publish(&mut buf, "a/b", 1, 7, b"hello");
        puback(&mut buf, 9);
        let f = next_frame(&mut buf).unwrap().unwrap();
        assert_eq!(f.kind, PUBLISH);
        let (topic, qos, pkid, payload) = parse_publish(&f).unwrap();
        assert_eq!(
            (&topic[..], qos, pkid, &payload[..]),
            (&b"a/b"[..], 1, 7, &b"hello"[..])
        );
        let f = next_frame(&mut buf).unwrap().unwrap();
        assert_eq!((f.kind, packet_id(&f)), (PUBACK, 9));
        assert!(next_frame(&mut buf).unwrap().is_none());
    }

    #[test]
    fn long_remaining_lengths_are_framed() {
        let mut buf = BytesMut::new();
        let payload = vec![7u8; 70_000];
        publish(&mut buf, "t", 0, 0, &payload);
        let mut partial = buf.split_to(1000);
        assert!(next_frame(&mut partial).unwrap().is_none());
        partial.unsplit(buf);
        let f = next_frame(&mut partial).unwrap().unwrap();
        assert_eq!(parse_publish(&f).unwrap().3.len(), 70_000);
    }
}
