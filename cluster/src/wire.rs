//! What the nodes write to JetStream and read back: the headers of a chat
//! record in a partition stream, the records of the records stream, and
//! the forwarded publish. Everything read from NATS is untrusted input:
//! bounded, parsed without panics, refused whole when malformed.

use async_nats::HeaderMap;
use bytes::Bytes;
use serde::{Deserialize, Serialize};

/// The conversation a chat record belongs to.
pub const H_CONV: &str = "Chatmq-Conv";
/// Its dense per-conversation seq.
pub const H_SEQ: &str = "Chatmq-Seq";
/// Who sent it.
pub const H_SENDER: &str = "Chatmq-Sender";
/// The sender's envelope id (the idempotency key with conv and sender).
pub const H_ID: &str = "Chatmq-Id";
/// The epoch of the owner that sequenced it.
pub const H_EPOCH: &str = "Chatmq-Epoch";
/// The node that sequenced it.
pub const H_NODE: &str = "Chatmq-Node";
/// A forwarded publish's QoS (0, 1).
pub const H_QOS: &str = "Chatmq-Qos";
/// A forwarded change of a message: `edit` or `delete`.
pub const H_CHANGE: &str = "Chatmq-Change";
/// The seq of the message a forwarded change is of.
pub const H_TARGET: &str = "Chatmq-Target";
/// A forwarded change asked with the admin token (`1`).
pub const H_ADMIN: &str = "Chatmq-Admin";
/// The NATS deduplication id.
pub const H_MSG_ID: &str = "Nats-Msg-Id";
/// The stream-level expected last sequence.
pub const H_EXPECTED: &str = "Nats-Expected-Last-Sequence";

/// The longest header value read back (ids are 64 characters, escaped at
/// most three bytes each; conversation ids 128 bytes).
const MAX_HEADER: usize = 512;

/// A message a partition owner sequenced: what its record carries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChatRecord {
    pub conv: String,
    pub seq: u64,
    pub sender: String,
    pub envelope_id: String,
    pub epoch: u64,
    pub node: String,
    /// The delivered envelope (JSON), as subscribers and history get it.
    pub body: Bytes,
}

impl ChatRecord {
    /// The `Nats-Msg-Id`: one record per (conversation, seq), so that the
    /// stream itself refuses a second record of the same seq within its
    /// duplicate window, whoever sends it.
    pub fn msg_id(&self) -> String {
        format!("{}#{}", escape(&self.conv), self.seq)
    }

    pub fn headers(&self) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(H_CONV, escape(&self.conv));
        h.insert(H_SEQ, self.seq.to_string());
        h.insert(H_SENDER, escape(&self.sender));
        h.insert(H_ID, escape(&self.envelope_id));
        h.insert(H_EPOCH, self.epoch.to_string());
        h.insert(H_NODE, escape(&self.node));
        h.insert(H_MSG_ID, self.msg_id());
        h
    }

    /// A record read back from a stream; `None` if anything is missing,
    /// too long or malformed.
    pub fn parse(headers: Option<&HeaderMap>, payload: Bytes) -> Option<ChatRecord> {
        let h = headers?;
        Some(ChatRecord {
            conv: text(h, H_CONV)?,
            seq: number(h, H_SEQ)?,
            sender: text(h, H_SENDER)?,
            envelope_id: text(h, H_ID)?,
            epoch: number(h, H_EPOCH)?,
            node: text(h, H_NODE)?,
            body: payload,
        })
    }
}

/// A header's value, unescaped.
pub fn text(h: &HeaderMap, name: &str) -> Option<String> {
    let v = h.get(name)?.as_str();
    if v.len() > MAX_HEADER {
        return None;
    }
    unescape(v)
}

/// A header's decimal value.
pub fn number(h: &HeaderMap, name: &str) -> Option<u64> {
    let v = h.get(name)?.as_str();
    if v.len() > 20 {
        return None;
    }
    v.parse().ok()
}

/// Percent-escapes every byte that is not printable ASCII (and `%`), so
/// any string fits a header value.
pub fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if (0x21..=0x7e).contains(&b) && b != b'%' {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// The inverse of [`escape`]; `None` on a malformed escape or bytes that
/// are not UTF-8.
pub fn unescape(s: &str) -> Option<String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let b = *bytes.get(i)?;
        if b == b'%' {
            let hex = s.get(i + 1..i + 3)?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(b);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

/// A change that is not a message, replicated through the records stream
/// and applied by every node in the stream's order (docs/CLUSTER.md says
/// why they are not in the partition streams).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum MetaRecord {
    /// A group conversation created with its members.
    Create {
        conv: String,
        title: String,
        owner: Option<String>,
        members: Vec<String>,
    },
    /// Users added to a group.
    Add {
        conv: String,
        users: Vec<String>,
        by: Option<String>,
    },
    /// A member removed (or who left).
    Remove {
        conv: String,
        user: String,
        by: Option<String>,
    },
    /// A user read a conversation up to `seq`.
    Read {
        user: String,
        conv: String,
        seq: u64,
    },
    /// A push device registered to `user` (moved from whoever had its
    /// token), or, `registered: false`, forgotten.
    Device {
        user: String,
        platform: String,
        token: String,
        app_id: Option<String>,
        registered: bool,
    },
    /// A member added (or removed, `add: false`) a reaction to a message.
    React {
        conv: String,
        seq: u64,
        user: String,
        emoji: String,
        add: bool,
    },
    /// A user muted (or unmuted) a conversation's notifications.
    Mute {
        user: String,
        conv: String,
        muted: bool,
    },
}

impl MetaRecord {
    pub fn encode(&self) -> Bytes {
        Bytes::from(serde_json::to_vec(self).unwrap_or_default())
    }

    /// `None` if the payload is not a record (untrusted input).
    pub fn parse(payload: &[u8]) -> Option<MetaRecord> {
        serde_json::from_slice(payload).ok()
    }
}

/// What the owner answers a forwarded publish.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "result")]
pub enum ForwardReply {
    /// Sequenced and in the stream: its seq.
    Ok { seq: u64 },
    /// The node asked does not own the partition (any more).
    NotOwner,
    /// It owns it but could not get it into the stream.
    Failed,
    /// The envelope was not valid.
    Bad,
    /// A forwarded change was made: the message's seq, and the seq of the
    /// change record (an earlier one when it changed nothing).
    Changed { seq: u64, event_seq: u64 },
    /// A forwarded change was refused, for this reason (as the RPC's
    /// error: `forbidden`, `not_found`, ...).
    Refused { code: String, message: String },
}

impl ForwardReply {
    pub fn encode(&self) -> Bytes {
        Bytes::from(serde_json::to_vec(self).unwrap_or_default())
    }
    pub fn parse(payload: &[u8]) -> Option<ForwardReply> {
        if payload.len() > 1024 {
            return None;
        }
        serde_json::from_slice(payload).ok()
    }
}

/// The subject token of a conversation: itself when it is one or more
/// valid subject tokens, else hex.
pub fn subject_token(conv: &str) -> String {
    let plain = !conv.is_empty()
        && conv.split('.').all(|t| !t.is_empty())
        && conv
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b':' | b'-'));
    if plain {
        conv.to_string()
    } else {
        let hex: String = conv.bytes().map(|b| format!("{b:02x}")).collect();
        format!("x-{hex}")
    }
}

/// The partition of a conversation: FNV-1a 64 of its id, mod `partitions`.
/// Fixed by this definition on every node and every version (a library
/// hasher may change between releases; this may not).
pub fn partition_of(conv: &str, partitions: u32) -> u32 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in conv.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    (h % u64::from(partitions.max(1))) as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_record_round_trips_through_its_headers() {
        let r = ChatRecord {
            conv: "dm:a:b".into(),
            seq: 7,
            sender: "alice".into(),
            envelope_id: "id with spaces % and ü".into(),
            epoch: 12,
            node: "node-1".into(),
            body: Bytes::from_static(b"{}"),
        };
        let back = ChatRecord::parse(Some(&r.headers()), r.body.clone());
        assert_eq!(back, Some(r));
    }

    #[test]
    fn malformed_headers_are_refused_not_panicked_on() {
        let mut h = HeaderMap::new();
        h.insert(H_CONV, "room");
        h.insert(H_SEQ, "not a number");
        assert_eq!(ChatRecord::parse(Some(&h), Bytes::new()), None);
        assert_eq!(unescape("%"), None);
        assert_eq!(unescape("%zz"), None);
        assert_eq!(unescape("%C3"), None, "not UTF-8");
        assert_eq!(unescape(&"a".repeat(10)), Some("a".repeat(10)));
        assert_eq!(ChatRecord::parse(None, Bytes::new()), None);
        assert_eq!(MetaRecord::parse(b"{\"kind\":\"nope\"}"), None);
        assert_eq!(ForwardReply::parse(b"[1,2"), None);
    }

    #[test]
    fn partitions_are_fixed_by_definition() {
        // FNV-1a 64 of "room" is 0x9c3a6e3f8ae7f2d6... : pinned, since
        // every node of every version must agree.
        assert_eq!(partition_of("", 16), (0xcbf2_9ce4_8422_2325u64 % 16) as u32);
        let p = partition_of("room", 16);
        assert_eq!(p, partition_of("room", 16));
        assert!(p < 16);
        assert_eq!(subject_token("a.b"), "a.b");
        assert_eq!(subject_token("a..b"), "x-612e2e62");
    }
}
