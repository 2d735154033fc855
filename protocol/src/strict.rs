//! Rules on the raw body of a packet that rumqttc's decoders do not check.
//!
//! The codecs read the fields a packet's flags announce and ignore the
//! rest: bytes after the last announced field, reserved option bits, a
//! null character inside a string. Each of those is a malformed packet
//! that must close the connection, so this module walks the body itself,
//! field by field, before the codec sees it. It only reads lengths and
//! flags; what the fields mean is the codec's and the channel's business.

use crate::codec::{DecodeError, Protocol};

/// A cursor over a packet body; every read is bounds-checked.
pub(crate) struct Fields<'a> {
    body: &'a [u8],
    at: usize,
}

impl<'a> Fields<'a> {
    pub(crate) fn new(body: &'a [u8]) -> Self {
        Fields { body, at: 0 }
    }

    pub(crate) fn take(&mut self, n: usize) -> Result<&'a [u8], DecodeError> {
        let end = self.at.checked_add(n).filter(|&e| e <= self.body.len());
        let Some(end) = end else {
            return Err(malformed("a field runs past the end of the packet"));
        };
        let body = self.body;
        let bytes = &body[self.at..end];
        self.at = end;
        Ok(bytes)
    }

    pub(crate) fn byte(&mut self) -> Result<u8, DecodeError> {
        Ok(self.take(1)?[0])
    }

    pub(crate) fn u16(&mut self) -> Result<u16, DecodeError> {
        let b = self.take(2)?;
        Ok(u16::from_be_bytes([b[0], b[1]]))
    }

    /// A length-prefixed string or binary field.
    pub(crate) fn prefixed(&mut self) -> Result<&'a [u8], DecodeError> {
        let n = self.u16()?;
        self.take(usize::from(n))
    }

    /// A UTF-8 string field: no encoding of U+0000 [MQTT-1.5.4-2]
    /// (3.1.1: [MQTT-1.5.3-2]). UTF-8 validity is the codec's check.
    pub(crate) fn string(&mut self, what: &str) -> Result<&'a [u8], DecodeError> {
        let s = self.prefixed()?;
        if s.contains(&0) {
            return Err(malformed(&format!("{what} contains U+0000 [MQTT-1.5.4-2]")));
        }
        Ok(s)
    }

    /// An MQTT 5 property block, each property checked to lie inside it
    /// (the codec reads what they say). rumqttc reads a block until its
    /// count reaches the declared length, so a property that runs past the
    /// end made it read into the fields after the block, while this walk
    /// took them where the length said: the two disagreed on what the
    /// packet holds (fuzz/mqtt_decode found a CONNECT whose user name the
    /// two read differently).
    pub(crate) fn properties(&mut self) -> Result<(), DecodeError> {
        self.properties_each(|_, _| Ok(()))
    }

    /// [`Self::properties`], calling `each` with every property's
    /// identifier and value bytes.
    pub(crate) fn properties_each(
        &mut self,
        mut each: impl FnMut(u8, &[u8]) -> Result<(), DecodeError>,
    ) -> Result<(), DecodeError> {
        let mut p = Fields::new(self.property_block()?);
        while !p.is_done() {
            let id = p.byte()?;
            let start = p.at;
            let size = match id {
                // Byte.
                0x01 | 0x17 | 0x19 | 0x24 | 0x25 | 0x28 | 0x29 | 0x2A => Some(1),
                // Two-byte integer.
                0x13 | 0x21 | 0x22 | 0x23 => Some(2),
                // Four-byte integer.
                0x02 | 0x11 | 0x18 | 0x27 => Some(4),
                _ => None,
            };
            match (id, size) {
                (_, Some(n)) => {
                    p.take(n)?;
                }
                // Variable byte integer: the Subscription Identifier.
                (0x0B, None) => p.varint()?,
                // UTF-8 strings.
                (0x03 | 0x08 | 0x12 | 0x15 | 0x1A | 0x1C | 0x1F, None) => {
                    p.string("a property")?;
                }
                // Binary data.
                (0x09 | 0x16, None) => {
                    p.prefixed()?;
                }
                // A string pair.
                (0x26, None) => {
                    p.string("User Property")?;
                    p.string("User Property")?;
                }
                (other, None) => return Err(malformed(&format!("unknown property {other:#04x}"))),
            }
            each(id, &p.body[start..p.at])?;
        }
        Ok(())
    }

    /// A variable byte integer of at most four bytes.
    pub(crate) fn varint(&mut self) -> Result<(), DecodeError> {
        for _ in 0..4 {
            if self.byte()? & 0x80 == 0 {
                return Ok(());
            }
        }
        Err(malformed("variable byte integer longer than 4 bytes"))
    }

    /// An MQTT 5 property block: its bytes, after its length.
    pub(crate) fn property_block(&mut self) -> Result<&'a [u8], DecodeError> {
        let mut len = 0usize;
        for i in 0..4 {
            let b = self.byte()?;
            len |= usize::from(b & 0x7F) << (7 * i);
            if b & 0x80 == 0 {
                return self.take(len);
            }
        }
        Err(malformed("property length longer than 4 bytes"))
    }

    pub(crate) fn is_done(&self) -> bool {
        self.at == self.body.len()
    }
}

pub(crate) fn malformed(why: &str) -> DecodeError {
    DecodeError::Malformed(why.to_string())
}

/// CONNECT: the reserved flag is 0 [MQTT-3.1.2-3]; a will's QoS and retain
/// are 0 without a will [MQTT-3.1.2-11, -13], its QoS is not 3
/// [MQTT-3.1.2-12]; the will topic is a non-empty topic name
/// [MQTT-4.7.3-1]; client id, will topic and user name hold no U+0000;
/// nothing follows the last field the flags announce (a user name or
/// password with its flag clear: 3.1.1 [MQTT-3.1.2-18, -20], MQTT 5
/// [MQTT-3.1.2-16, -18]); a 3.1.1 password needs a user name
/// [MQTT-3.1.2-22].
pub fn check_connect(body: &[u8], protocol: Protocol) -> Result<(), DecodeError> {
    let mut f = Fields::new(body);
    f.prefixed()?; // protocol name, read by `connect_protocol`
    f.byte()?; // level
    let flags = f.byte()?;
    f.u16()?; // keep alive
    if flags & 0x01 != 0 {
        return Err(malformed("CONNECT reserved flag set [MQTT-3.1.2-3]"));
    }
    let will = flags & 0x04 != 0;
    let will_qos = (flags >> 3) & 0b11;
    let will_retain = flags & 0x20 != 0;
    let user_name = flags & 0x80 != 0;
    let password = flags & 0x40 != 0;
    if !will && (will_qos != 0 || will_retain) {
        return Err(malformed(
            "will QoS or retain set without a will [MQTT-3.1.2-11]",
        ));
    }
    if will_qos == 3 {
        return Err(malformed("will QoS 3 [MQTT-3.1.2-12]"));
    }
    if protocol == Protocol::V4 && password && !user_name {
        return Err(malformed("password without user name [MQTT-3.1.2-22]"));
    }
    if protocol == Protocol::V5 {
        f.properties()?;
    }
    f.string("client identifier")?;
    if will {
        if protocol == Protocol::V5 {
            f.properties()?;
        }
        if f.string("will topic")?.is_empty() {
            return Err(malformed("empty will topic [MQTT-4.7.3-1]"));
        }
        f.prefixed()?; // will payload
    }
    if user_name {
        f.string("user name")?;
    }
    if password {
        f.prefixed()?;
    }
    if !f.is_done() {
        return Err(malformed(
            "bytes after the last field the CONNECT flags announce: a user name or \
             password with its flag clear [MQTT-3.1.2-16, -18]",
        ));
    }
    Ok(())
}

/// SUBSCRIBE: each filter's options byte keeps its reserved bits 0
/// (MQTT 5: bits 6-7 [MQTT-3.8.3-5]; 3.1.1: bits 2-7 [MQTT-3.8.3-4]).
pub fn check_subscribe(body: &[u8], protocol: Protocol) -> Result<(), DecodeError> {
    let mut f = Fields::new(body);
    f.u16()?; // packet id
    if protocol == Protocol::V5 {
        check_subscribe_properties(&mut f)?;
    }
    let reserved = match protocol {
        Protocol::V5 => 0xC0,
        Protocol::V4 => 0xFC,
    };
    while !f.is_done() {
        f.prefixed()?; // the filter: the topic rules check it
        if f.byte()? & reserved != 0 {
            return Err(malformed(
                "reserved subscription option bits set [MQTT-3.8.3-5]",
            ));
        }
    }
    Ok(())
}

/// The property blocks of MQTT 5 packets other than CONNECT and
/// SUBSCRIBE, walked as [`Fields::properties`] does: PUBLISH (after its
/// topic and packet id), the four acks and UNSUBACK-side UNSUBSCRIBE (after
/// the packet id and reason code, when present), DISCONNECT. Packets
/// without properties pass.
pub fn check_properties(kind: u8, flags: u8, body: &[u8]) -> Result<(), DecodeError> {
    let mut f = Fields::new(body);
    match kind {
        3 => {
            f.prefixed()?; // topic: the topic rules check it
            if (flags >> 1) & 0b11 != 0 {
                f.u16()?;
            }
            f.properties()
        }
        // PUBACK, PUBREC, PUBREL, PUBCOMP: packet id, then reason code and
        // properties only if there is room for them [MQTT-3.4.2.1].
        4..=7 => {
            f.u16()?;
            if f.is_done() {
                return Ok(());
            }
            f.byte()?;
            if f.is_done() {
                return Ok(());
            }
            f.properties()
        }
        10 => {
            f.u16()?;
            f.properties()
        }
        14 if body.len() > 1 => {
            f.byte()?;
            f.properties()
        }
        _ => Ok(()),
    }
}

/// A SUBSCRIBE may carry one Subscription Identifier (a variable byte
/// integer, 1 to 268,435,455) and User Properties, nothing else; a second
/// identifier is a protocol error [MQTT-3.8.2.1.2]. Checked here because
/// rumqttc's reader counts the identifier's property byte twice and reads
/// a SUBSCRIBE with two of them differently from what was sent.
fn check_subscribe_properties(f: &mut Fields<'_>) -> Result<(), DecodeError> {
    let mut identifiers = 0;
    f.properties_each(|id, value| match id {
        0x0B => {
            identifiers += 1;
            if identifiers > 1 {
                return Err(DecodeError::Protocol(
                    "two Subscription Identifiers in SUBSCRIBE [MQTT-3.8.2.1.2]".into(),
                ));
            }
            let number = value
                .iter()
                .rev()
                .fold(0u32, |n, b| (n << 7) | u32::from(b & 0x7F));
            if number == 0 {
                return Err(DecodeError::Protocol(
                    "Subscription Identifier 0 [MQTT-3.8.2.1.2]".into(),
                ));
            }
            Ok(())
        }
        0x26 => Ok(()),
        other => Err(malformed(&format!("property {other:#04x} in SUBSCRIBE"))),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    // Found by fuzz/mqtt_decode: a User Property whose key runs past the
    // property block. rumqttc read on into the client id and the fields
    // after it, this walk did not: the user name the channel saw was not
    // the one checked for U+0000. Now the packet is malformed.
    #[test]
    fn a_property_running_past_its_block_is_malformed() {
        // Properties: length 3, a User Property whose key claims 5 bytes.
        let mut body = vec![0, 4, b'M', b'Q', b'T', b'T', 5, 0x02, 0, 60, 3, 0x26, 0, 5];
        body.extend_from_slice(&[0, 2, b'i', b'd']);
        assert!(matches!(
            check_connect(&body, Protocol::V5),
            Err(DecodeError::Malformed(_))
        ));
        // A PUBLISH likewise: topic "t", QoS 0, properties of length 2 with
        // a Content Type that claims 9 bytes.
        let publish = [0, 1, b't', 2, 0x03, 0, 9, b'x'];
        assert!(matches!(
            check_properties(3, 0, &publish),
            Err(DecodeError::Malformed(_))
        ));
        let fine = [0, 1, b't', 4, 0x03, 0, 1, b'x', b'p'];
        assert!(check_properties(3, 0, &fine).is_ok());
    }

    #[test]
    fn a_subscribe_carries_at_most_one_subscription_identifier() {
        // Packet id 1, properties, one filter "a" with QoS 0.
        let subscribe = |props: &[u8]| {
            let mut b = vec![0, 1, props.len() as u8];
            b.extend_from_slice(props);
            b.extend_from_slice(&[0, 1, b'a', 0]);
            b
        };
        assert!(check_subscribe(&subscribe(&[0x0B, 0x05]), Protocol::V5).is_ok());
        assert!(check_subscribe(&subscribe(&[0x0B, 0xFF, 0x7F]), Protocol::V5).is_ok());
        let two = subscribe(&[0x0B, 0x05, 0x0B, 0x06]);
        assert!(matches!(
            check_subscribe(&two, Protocol::V5),
            Err(DecodeError::Protocol(_))
        ));
        let zero = subscribe(&[0x0B, 0x00]);
        assert!(matches!(
            check_subscribe(&zero, Protocol::V5),
            Err(DecodeError::Protocol(_))
        ));
        let long_zero = subscribe(&[0x0B, 0x80, 0x00]);
        assert!(check_subscribe(&long_zero, Protocol::V5).is_err());
        let other = subscribe(&[0x01, 0x01]);
        assert!(matches!(
            check_subscribe(&other, Protocol::V5),
            Err(DecodeError::Malformed(_))
        ));
        let user = subscribe(&[0x26, 0, 1, b'k', 0, 1, b'v']);
        assert!(check_subscribe(&user, Protocol::V5).is_ok());
    }

    /// A CONNECT body: name, level, flags, keepalive 60, then `rest`.
    fn connect(level: u8, flags: u8, rest: &[u8]) -> Vec<u8> {
        let mut b = vec![0, 4, b'M', b'Q', b'T', b'T', level, flags, 0, 60];
        if level == 5 {
            b.push(0); // no properties
        }
        b.extend_from_slice(rest);
        b
    }

    fn s(text: &[u8]) -> Vec<u8> {
        let mut b = (text.len() as u16).to_be_bytes().to_vec();
        b.extend_from_slice(text);
        b
    }

    #[test]
    fn a_plain_connect_passes() {
        for (level, p) in [(4, Protocol::V4), (5, Protocol::V5)] {
            assert_eq!(check_connect(&connect(level, 0x02, &s(b"c1")), p), Ok(()));
            let mut login = s(b"c1");
            login.extend(s(b"alice"));
            login.extend(s(b"pw"));
            assert_eq!(check_connect(&connect(level, 0xC2, &login), p), Ok(()));
        }
    }

    // [MQTT-1.5.4-2]
    #[test]
    fn a_null_character_in_a_connect_string_is_malformed() {
        assert!(check_connect(&connect(4, 0x02, &s(b"c\0")), Protocol::V4).is_err());
        let mut login = s(b"c1");
        login.extend(s(b"al\0ce"));
        assert!(check_connect(&connect(5, 0x82, &login), Protocol::V5).is_err());
        let mut will = s(b"c1");
        will.push(0); // will properties
        will.extend(s(b"w/\0"));
        will.extend(s(b"bye"));
        assert!(check_connect(&connect(5, 0x06, &will), Protocol::V5).is_err());
    }

    // [MQTT-3.1.2-16], [MQTT-3.1.2-18] (MQTT 5), [MQTT-3.1.2-18], [MQTT-3.1.2-20] (3.1.1)
    #[test]
    fn a_user_name_or_password_with_its_flag_clear_is_malformed() {
        let mut body = s(b"c1");
        body.extend(s(b"alice"));
        assert!(check_connect(&connect(4, 0x02, &body), Protocol::V4).is_err());
        assert!(check_connect(&connect(5, 0x02, &body), Protocol::V5).is_err());
        body.extend(s(b"pw"));
        assert!(check_connect(&connect(5, 0x82, &body), Protocol::V5).is_err());
    }

    #[test]
    fn an_empty_will_topic_is_malformed() {
        let mut will = s(b"c1");
        will.extend(s(b""));
        will.extend(s(b"bye"));
        assert!(check_connect(&connect(4, 0x06, &will), Protocol::V4).is_err());
    }

    #[test]
    fn a_truncated_connect_is_malformed_not_a_panic() {
        let full = connect(5, 0xC6, &s(b"c1"));
        for n in 0..full.len() {
            assert!(check_connect(&full[..n], Protocol::V5).is_err());
        }
    }

    // [MQTT-3.8.3-5]
    #[test]
    fn reserved_subscription_option_bits_are_malformed() {
        let mut body = vec![0, 1, 0];
        body.extend(s(b"a/b"));
        body.push(0x01);
        assert_eq!(check_subscribe(&body, Protocol::V5), Ok(()));
        *body.last_mut().unwrap() = 0xC1;
        assert!(check_subscribe(&body, Protocol::V5).is_err());
        let mut v4 = vec![0, 1];
        v4.extend(s(b"a/b"));
        v4.push(0x05);
        assert!(check_subscribe(&v4, Protocol::V4).is_err());
    }
}
