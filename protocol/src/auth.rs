//! The MQTT 5 AUTH packet [MQTT-3.15], read and written here.
//!
//! rumqttc's AUTH cannot be used: its reason code and property types are
//! private to the crate, its reader counts two bytes too few for each
//! string property (so it fails on every AUTH that names its method, as
//! each must), and its writer declares wrong lengths. The broker uses AUTH
//! for one thing, re-authentication [MQTT-4.12.1]: a client that connected
//! with an Authentication Method sends AUTH 0x19 with a new token, and is
//! answered AUTH 0x00 or disconnected.

use bytes::{Bytes, BytesMut};

use crate::codec::DecodeError;
use crate::strict::{malformed, Fields};

/// Why an AUTH is sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthReason {
    Success = 0x00,
    ContinueAuthentication = 0x18,
    ReAuthenticate = 0x19,
}

/// An AUTH packet and its properties.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Auth {
    pub reason: AuthReason,
    pub method: Option<String>,
    pub data: Option<Bytes>,
    pub reason_string: Option<String>,
    pub user_properties: Vec<(String, String)>,
}

impl Auth {
    /// An AUTH with `reason` and `method`, nothing else.
    pub fn new(reason: AuthReason, method: &str) -> Auth {
        Auth {
            reason,
            method: Some(method.to_string()),
            data: None,
            reason_string: None,
            user_properties: Vec::new(),
        }
    }
}

/// Reads an AUTH body (after the fixed header). A remaining length of 0
/// is reason 0x00 with no properties [MQTT-3.15.2.1].
pub fn read(body: &[u8]) -> Result<Auth, DecodeError> {
    let mut f = Fields::new(body);
    let reason = if f.is_done() {
        AuthReason::Success
    } else {
        match f.byte()? {
            0x00 => AuthReason::Success,
            0x18 => AuthReason::ContinueAuthentication,
            0x19 => AuthReason::ReAuthenticate,
            other => return Err(malformed(&format!("AUTH reason code {other:#04x}"))),
        }
    };
    let mut auth = Auth {
        reason,
        method: None,
        data: None,
        reason_string: None,
        user_properties: Vec::new(),
    };
    if f.is_done() {
        return Ok(auth);
    }
    let mut props = Fields::new(f.property_block()?);
    if !f.is_done() {
        return Err(malformed("bytes after the AUTH properties"));
    }
    let text = |bytes: &[u8], what: &str| {
        String::from_utf8(bytes.to_vec()).map_err(|_| malformed(&format!("{what} is not UTF-8")))
    };
    let twice = |what: &str| DecodeError::Protocol(format!("{what} twice in AUTH [MQTT-3.15.2.2]"));
    while !props.is_done() {
        match props.byte()? {
            0x15 => {
                let m = text(
                    props.string("Authentication Method")?,
                    "Authentication Method",
                )?;
                if auth.method.replace(m).is_some() {
                    return Err(twice("Authentication Method"));
                }
            }
            0x16 => {
                let d = Bytes::copy_from_slice(props.prefixed()?);
                if auth.data.replace(d).is_some() {
                    return Err(twice("Authentication Data"));
                }
            }
            0x1F => {
                let r = text(props.string("Reason String")?, "Reason String")?;
                if auth.reason_string.replace(r).is_some() {
                    return Err(twice("Reason String"));
                }
            }
            0x26 => {
                let k = text(props.string("User Property")?, "User Property")?;
                let v = text(props.string("User Property")?, "User Property")?;
                auth.user_properties.push((k, v));
            }
            other => return Err(malformed(&format!("property {other:#04x} in AUTH"))),
        }
    }
    Ok(auth)
}

/// Writes `auth`; false, and nothing written, if a field is longer than
/// MQTT allows or the packet is larger than `max_size`.
pub fn write(auth: &Auth, out: &mut BytesMut, max_size: Option<u32>) -> bool {
    let mut props = Vec::new();
    let mut fits = true;
    let single = [
        (0x15, auth.method.as_ref().map(|m| m.as_bytes())),
        (0x16, auth.data.as_deref()),
        (0x1F, auth.reason_string.as_ref().map(|r| r.as_bytes())),
    ];
    for (id, value) in single {
        if let Some(v) = value {
            props.push(id);
            fits &= field(&mut props, v);
        }
    }
    for (k, v) in &auth.user_properties {
        props.push(0x26);
        fits &= field(&mut props, k.as_bytes()) && field(&mut props, v.as_bytes());
    }
    let mut body = vec![auth.reason as u8];
    varint(&mut body, props.len());
    body.extend_from_slice(&props);
    let mut packet = vec![0xF0];
    varint(&mut packet, body.len());
    packet.extend_from_slice(&body);
    if !fits || max_size.is_some_and(|m| packet.len() > m as usize) {
        return false;
    }
    out.extend_from_slice(&packet);
    true
}

/// A length-prefixed string or binary field; false if it is too long.
fn field(out: &mut Vec<u8>, bytes: &[u8]) -> bool {
    let Ok(n) = u16::try_from(bytes.len()) else {
        return false;
    };
    out.extend_from_slice(&n.to_be_bytes());
    out.extend_from_slice(bytes);
    true
}

/// An MQTT variable byte integer (every length here is under 2^28: at
/// most four fields of 64 KiB).
fn varint(out: &mut Vec<u8>, mut n: usize) {
    loop {
        let byte = (n % 128) as u8;
        n /= 128;
        if n == 0 {
            out.push(byte);
            return;
        }
        out.push(byte | 0x80);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn framed(auth: &Auth) -> BytesMut {
        let mut out = BytesMut::new();
        assert!(write(auth, &mut out, None));
        out
    }

    #[test]
    fn an_auth_with_every_property_is_written_and_read_back() {
        let auth = Auth {
            reason: AuthReason::ReAuthenticate,
            method: Some("JWT".into()),
            data: Some(Bytes::from_static(b"token")),
            reason_string: Some("refresh".into()),
            user_properties: vec![("k".into(), "v".into())],
        };
        let out = framed(&auth);
        // Type, remaining length 33, reason 0x19, property length 31.
        assert_eq!(&out[..4], &[0xF0, 33, 0x19, 31]);
        assert_eq!(read(&out[2..]).unwrap(), auth);
        let mut small = BytesMut::new();
        assert!(!write(&auth, &mut small, Some(20)));
        assert!(small.is_empty(), "nothing past the client's maximum");
    }

    #[test]
    fn a_short_auth_is_success_and_bad_ones_are_refused() {
        assert_eq!(read(&[]).unwrap().reason, AuthReason::Success);
        assert!(matches!(
            read(&[0x42, 0x00]),
            Err(DecodeError::Malformed(_))
        ));
        let twice = [0x19, 0x0A, 0x15, 0, 3, b'J', b'W', b'T', 0x15, 0, 1, b'x'];
        assert!(matches!(read(&twice), Err(DecodeError::Protocol(_))));
        let nul = [0x19, 0x06, 0x15, 0, 3, b'J', 0, b'T'];
        assert!(matches!(read(&nul), Err(DecodeError::Malformed(_))));
        let short = [0x19, 0x09, 0x15, 0, 3, b'J', b'W', b'T'];
        assert!(read(&short).is_err(), "a property block past the packet");
    }
}
