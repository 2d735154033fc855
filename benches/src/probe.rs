//! What every benchmark message carries so the receiver can count it:
//! the publisher, its sequence number and the time it was meant to be
//! sent. Plain scenarios carry it in binary; chat scenarios carry it as the
//! `body` of the JSON envelope (DESIGN §4), which chatmq re-wraps on
//! delivery and other brokers pass through unchanged.

use std::sync::OnceLock;
use std::time::Instant;

/// Nanoseconds since the process's first call: one clock for publishers
/// and receivers, which live in the same process.
pub fn now_ns() -> u64 {
    static START: OnceLock<Instant> = OnceLock::new();
    START.get_or_init(Instant::now).elapsed().as_nanos() as u64
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Probe {
    pub publisher: u32,
    pub seq: u64,
    /// When the message was due (open loop) or sent (closed loop), `now_ns`.
    pub due_ns: u64,
}

const BINARY_HEAD: usize = 20;

/// A binary payload of `size` bytes (at least 20).
pub fn binary(p: Probe, size: usize, out: &mut Vec<u8>) {
    out.clear();
    out.extend_from_slice(&p.publisher.to_le_bytes());
    out.extend_from_slice(&p.seq.to_le_bytes());
    out.extend_from_slice(&p.due_ns.to_le_bytes());
    out.resize(size.max(BINARY_HEAD), b'x');
}

pub fn parse_binary(b: &[u8]) -> Option<Probe> {
    if b.len() < BINARY_HEAD {
        return None;
    }
    Some(Probe {
        publisher: u32::from_le_bytes(b[0..4].try_into().ok()?),
        seq: u64::from_le_bytes(b[4..12].try_into().ok()?),
        due_ns: u64::from_le_bytes(b[12..20].try_into().ok()?),
    })
}

/// A chat envelope whose body is the probe, padded to about `size` bytes.
/// `run` keeps ids unique across runs against the same broker.
pub fn envelope(p: Probe, run: &str, size: usize, out: &mut Vec<u8>) {
    use std::io::Write;
    out.clear();
    let _ = write!(
        out,
        r#"{{"id":"{run}-{}-{}","type":"text","body":{{"p":{},"s":{},"t":{},"x":""#,
        p.publisher, p.seq, p.publisher, p.seq, p.due_ns
    );
    let tail = br#""}}"#;
    while out.len() + tail.len() < size {
        out.push(b'x');
    }
    out.extend_from_slice(tail);
}

#[derive(serde::Deserialize)]
struct Body {
    p: u32,
    s: u64,
    t: u64,
}

#[derive(serde::Deserialize)]
struct Delivered {
    body: Body,
}

pub fn parse_envelope(b: &[u8]) -> Option<Probe> {
    let d: Delivered = serde_json::from_slice(b).ok()?;
    Some(Probe {
        publisher: d.body.p,
        seq: d.body.s,
        due_ns: d.body.t,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn probes_round_trip() {
        let p = Probe {
            publisher: 3,
            seq: 99,
            due_ns: 123_456,
        };
        let mut buf = Vec::new();
        binary(p, 64, &mut buf);
        assert_eq!(buf.len(), 64);
        assert_eq!(parse_binary(&buf), Some(p));
        envelope(p, "r1", 120, &mut buf);
        assert_eq!(buf.len(), 120);
        assert_eq!(parse_envelope(&buf), Some(p));
        // As chatmq delivers it: the envelope re-wrapped with conv, seq, ...
        let delivered = format!(
            r#"{{"conv":"c","seq":1,"id":"x","from":"u","ts":1,"type":"text","body":{}}}"#,
            r#"{"p":3,"s":99,"t":123456,"x":"xx"}"#
        );
        assert_eq!(parse_envelope(delivered.as_bytes()), Some(p));
    }
}
