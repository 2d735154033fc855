//! The records chatmq stores, and their binary encoding.
//!
//! The encoding is deliberately plain: a version byte, then fields in a fixed
//! order, integers big-endian, strings and byte strings length-prefixed with
//! a u32. A record that does not decode is reported as corrupt, never
//! guessed at.

use crate::schema::{CF_CONV, CF_OUTBOX, CF_PUSH, CF_RETAINED, CF_SESSION};
use crate::StorageError;

const VERSION: u8 = 1;

/// A persistent session: who owns it, when it expires, what it subscribed to.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct SessionRecord {
    /// The user who owns the client id; `None` for anonymous clients.
    pub owner: Option<String>,
    /// 4 for MQTT 3.1.1, 5 for MQTT 5.
    pub protocol: u8,
    /// Seconds the session outlives its connection.
    pub expiry_secs: u32,
    /// Unix milliseconds when the last connection ended; 0 while connected.
    pub disconnected_at_ms: u64,
    pub subscriptions: Vec<SubscriptionRecord>,
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct SubscriptionRecord {
    /// The filter as the client sent it, `$share/...` included.
    pub filter: String,
    pub qos: u8,
    pub no_local: bool,
    pub retain_as_published: bool,
    pub retain_handling: u8,
    /// MQTT 5 subscription identifier; 0 when absent.
    pub identifier: u32,
}

/// The MQTT 5 properties that travel with an application message.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct MessageProps {
    pub payload_format: Option<u8>,
    pub content_type: Option<String>,
    pub response_topic: Option<String>,
    pub correlation_data: Option<Vec<u8>>,
    pub user_properties: Vec<(String, String)>,
}

/// An application message as it is queued or retained.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct MessageRecord {
    pub topic: String,
    pub payload: Vec<u8>,
    pub qos: u8,
    pub retain: bool,
    pub props: MessageProps,
    /// Unix milliseconds after which the message is dropped; 0 = never.
    pub expires_at_ms: u64,
}

/// How far an outgoing QoS 1/2 message has come.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutboxState {
    /// Queued or PUBLISH sent; waiting for PUBACK / PUBREC.
    Publish,
    /// QoS 2: PUBREC received, PUBREL sent; waiting for PUBCOMP.
    Release,
}

/// One message owed to a persistent session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutboxEntry {
    pub state: OutboxState,
    /// The subscription identifiers to send with it (MQTT 5).
    pub subscription_ids: Vec<u32>,
    /// Absent once the state is `Release`: only the packet id matters then.
    /// With `body`, only its `qos` and `retain` are this entry's own (and
    /// all that is written): the rest is the shared body's, filled in by
    /// [`crate::Store::load_sessions`].
    pub message: Option<MessageRecord>,
    /// The message is stored once in the `body` column family, for every
    /// session it is owed to.
    pub body: Option<u64>,
}

/// A retained message: the message itself (its `retain` flag is set).
pub type RetainedRecord = MessageRecord;

/// A conversation's metadata. Direct conversations (`dm:a:b`) get one
/// when their first message is sent.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ConversationRecord {
    pub title: String,
    /// Unix ms of creation.
    pub created_ms: u64,
    /// The last seq assigned; 0 before the first message.
    pub head: u64,
    /// The oldest seq still kept (retention); 1 until trimmed.
    pub first: u64,
}

struct Writer(Vec<u8>);

impl Writer {
    fn new() -> Self {
        Writer(vec![VERSION])
    }
    fn u8(&mut self, v: u8) {
        self.0.push(v);
    }
    fn u32(&mut self, v: u32) {
        self.0.extend_from_slice(&v.to_be_bytes());
    }
    fn u64(&mut self, v: u64) {
        self.0.extend_from_slice(&v.to_be_bytes());
    }
    fn bytes(&mut self, v: &[u8]) {
        self.u32(v.len() as u32);
        self.0.extend_from_slice(v);
    }
    fn opt_bytes(&mut self, v: Option<&[u8]>) {
        match v {
            Some(v) => {
                self.u8(1);
                self.bytes(v);
            }
            None => self.u8(0),
        }
    }
}

struct Reader<'a> {
    buf: &'a [u8],
    cf: &'static str,
}

impl<'a> Reader<'a> {
    fn new(buf: &'a [u8], cf: &'static str) -> Result<Self, StorageError> {
        let mut r = Reader { buf, cf };
        let version = r.u8()?;
        if version != VERSION {
            return Err(r.corrupt(format!("unknown record version {version}")));
        }
        Ok(r)
    }
    fn corrupt(&self, what: String) -> StorageError {
        StorageError::Corrupt { cf: self.cf, what }
    }
    fn take(&mut self, n: usize) -> Result<&'a [u8], StorageError> {
        if self.buf.len() < n {
            return Err(self.corrupt("record is truncated".into()));
        }
        let (head, rest) = self.buf.split_at(n);
        self.buf = rest;
        Ok(head)
    }
    fn u8(&mut self) -> Result<u8, StorageError> {
        Ok(self.take(1)?[0])
    }
    fn bool(&mut self) -> Result<bool, StorageError> {
        Ok(self.u8()? != 0)
    }
    fn u32(&mut self) -> Result<u32, StorageError> {
        let b = self.take(4)?;
        Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }
    fn u64(&mut self) -> Result<u64, StorageError> {
        let b = self.take(8)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        Ok(u64::from_be_bytes(a))
    }
    fn bytes(&mut self) -> Result<Vec<u8>, StorageError> {
        let n = self.u32()? as usize;
        Ok(self.take(n)?.to_vec())
    }
    fn string(&mut self) -> Result<String, StorageError> {
        let b = self.bytes()?;
        String::from_utf8(b).map_err(|_| self.corrupt("string is not UTF-8".into()))
    }
    fn opt_bytes(&mut self) -> Result<Option<Vec<u8>>, StorageError> {
        Ok(if self.bool()? {
            Some(self.bytes()?)
        } else {
            None
        })
    }
    fn opt_string(&mut self) -> Result<Option<String>, StorageError> {
        Ok(if self.bool()? {
            Some(self.string()?)
        } else {
            None
        })
    }
}

impl SessionRecord {
    pub fn encode(&self) -> Vec<u8> {
        let mut w = Writer::new();
        w.opt_bytes(self.owner.as_deref().map(str::as_bytes));
        w.u8(self.protocol);
        w.u32(self.expiry_secs);
        w.u64(self.disconnected_at_ms);
        w.u32(self.subscriptions.len() as u32);
        for s in &self.subscriptions {
            w.bytes(s.filter.as_bytes());
            w.u8(s.qos);
            w.u8(s.no_local as u8);
            w.u8(s.retain_as_published as u8);
            w.u8(s.retain_handling);
            w.u32(s.identifier);
        }
        w.0
    }

    pub fn decode(buf: &[u8]) -> Result<Self, StorageError> {
        let mut r = Reader::new(buf, CF_SESSION)?;
        let owner = r.opt_string()?;
        let protocol = r.u8()?;
        let expiry_secs = r.u32()?;
        let disconnected_at_ms = r.u64()?;
        let count = r.u32()?;
        let mut subscriptions = Vec::new();
        for _ in 0..count {
            subscriptions.push(SubscriptionRecord {
                filter: r.string()?,
                qos: r.u8()?,
                no_local: r.bool()?,
                retain_as_published: r.bool()?,
                retain_handling: r.u8()?,
                identifier: r.u32()?,
            });
        }
        Ok(SessionRecord {
            owner,
            protocol,
            expiry_secs,
            disconnected_at_ms,
            subscriptions,
        })
    }
}

impl MessageRecord {
    fn write(&self, w: &mut Writer) {
        w.bytes(self.topic.as_bytes());
        w.bytes(&self.payload);
        w.u8(self.qos);
        w.u8(self.retain as u8);
        w.u64(self.expires_at_ms);
        let p = &self.props;
        w.opt_bytes(p.payload_format.as_ref().map(std::slice::from_ref));
        w.opt_bytes(p.content_type.as_deref().map(str::as_bytes));
        w.opt_bytes(p.response_topic.as_deref().map(str::as_bytes));
        w.opt_bytes(p.correlation_data.as_deref());
        w.u32(p.user_properties.len() as u32);
        for (k, v) in &p.user_properties {
            w.bytes(k.as_bytes());
            w.bytes(v.as_bytes());
        }
    }

    fn read(r: &mut Reader<'_>) -> Result<Self, StorageError> {
        let topic = r.string()?;
        let payload = r.bytes()?;
        let qos = r.u8()?;
        let retain = r.bool()?;
        let expires_at_ms = r.u64()?;
        let payload_format = r.opt_bytes()?.and_then(|b| b.first().copied());
        let content_type = r.opt_string()?;
        let response_topic = r.opt_string()?;
        let correlation_data = r.opt_bytes()?;
        let count = r.u32()?;
        let mut user_properties = Vec::new();
        for _ in 0..count {
            user_properties.push((r.string()?, r.string()?));
        }
        Ok(MessageRecord {
            topic,
            payload,
            qos,
            retain,
            expires_at_ms,
            props: MessageProps {
                payload_format,
                content_type,
                response_topic,
                correlation_data,
                user_properties,
            },
        })
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut w = Writer::new();
        self.write(&mut w);
        w.0
    }

    pub fn decode(buf: &[u8]) -> Result<Self, StorageError> {
        Self::read(&mut Reader::new(buf, CF_RETAINED)?)
    }
}

impl ConversationRecord {
    pub fn encode(&self) -> Vec<u8> {
        let mut w = Writer::new();
        w.bytes(self.title.as_bytes());
        w.u64(self.created_ms);
        w.u64(self.head);
        w.u64(self.first);
        w.0
    }

    pub fn decode(buf: &[u8]) -> Result<Self, StorageError> {
        let mut r = Reader::new(buf, CF_CONV)?;
        Ok(ConversationRecord {
            title: r.string()?,
            created_ms: r.u64()?,
            head: r.u64()?,
            first: r.u64()?,
        })
    }
}

/// A push notification waiting for its due time: the messages of one
/// conversation that one user has not seen, collapsed into one.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct PushJobRecord {
    /// Messages it stands for.
    pub count: u32,
    /// The latest message's seq, sender and preview text.
    pub seq: u64,
    pub from: String,
    pub preview: String,
}

impl PushJobRecord {
    pub fn encode(&self) -> Vec<u8> {
        let mut w = Writer::new();
        w.u32(self.count);
        w.u64(self.seq);
        w.bytes(self.from.as_bytes());
        w.bytes(self.preview.as_bytes());
        w.0
    }

    pub fn decode(buf: &[u8]) -> Result<Self, StorageError> {
        let mut r = Reader::new(buf, CF_PUSH)?;
        Ok(PushJobRecord {
            count: r.u32()?,
            seq: r.u64()?,
            from: r.string()?,
            preview: r.string()?,
        })
    }
}

impl OutboxEntry {
    pub fn encode(&self) -> Vec<u8> {
        let mut w = Writer::new();
        w.u8(match self.state {
            OutboxState::Publish => 0,
            OutboxState::Release => 1,
        });
        w.u32(self.subscription_ids.len() as u32);
        for id in &self.subscription_ids {
            w.u32(*id);
        }
        match (&self.message, self.body) {
            (Some(m), Some(body)) => {
                w.u8(2);
                w.u64(body);
                w.u8(m.qos);
                w.u8(m.retain as u8);
            }
            (Some(m), None) => {
                w.u8(1);
                m.write(&mut w);
            }
            (None, _) => w.u8(0),
        }
        w.0
    }

    pub fn decode(buf: &[u8]) -> Result<Self, StorageError> {
        let mut r = Reader::new(buf, CF_OUTBOX)?;
        let state = match r.u8()? {
            0 => OutboxState::Publish,
            1 => OutboxState::Release,
            other => return Err(r.corrupt(format!("unknown outbox state {other}"))),
        };
        let count = r.u32()?;
        let mut subscription_ids = Vec::new();
        for _ in 0..count {
            subscription_ids.push(r.u32()?);
        }
        let (message, body) = match r.u8()? {
            0 => (None, None),
            1 => (Some(MessageRecord::read(&mut r)?), None),
            2 => {
                let body = r.u64()?;
                let qos = r.u8()?;
                let retain = r.bool()?;
                let own = MessageRecord {
                    qos,
                    retain,
                    ..MessageRecord::default()
                };
                (Some(own), Some(body))
            }
            other => return Err(r.corrupt(format!("unknown outbox message tag {other}"))),
        };
        Ok(OutboxEntry {
            state,
            subscription_ids,
            message,
            body,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message() -> MessageRecord {
        MessageRecord {
            topic: "a/b".into(),
            payload: vec![0, 1, 2, 255],
            qos: 2,
            retain: true,
            expires_at_ms: 42,
            props: MessageProps {
                payload_format: Some(1),
                content_type: Some("text/plain".into()),
                response_topic: Some("r/t".into()),
                correlation_data: Some(vec![9, 9]),
                user_properties: vec![("k".into(), "v".into()), ("k".into(), "w".into())],
            },
        }
    }

    #[test]
    fn session_round_trips() {
        let s = SessionRecord {
            owner: Some("alice".into()),
            protocol: 5,
            expiry_secs: 3600,
            disconnected_at_ms: 17,
            subscriptions: vec![SubscriptionRecord {
                filter: "$share/g/a/+".into(),
                qos: 1,
                no_local: true,
                retain_as_published: true,
                retain_handling: 2,
                identifier: 7,
            }],
        };
        assert_eq!(SessionRecord::decode(&s.encode()).ok(), Some(s));
    }

    #[test]
    fn outbox_entry_round_trips_with_and_without_message() {
        let full = OutboxEntry {
            state: OutboxState::Publish,
            subscription_ids: vec![1, 5],
            message: Some(message()),
            body: None,
        };
        assert_eq!(OutboxEntry::decode(&full.encode()).ok(), Some(full));
        let release = OutboxEntry {
            state: OutboxState::Release,
            subscription_ids: vec![],
            message: None,
            body: None,
        };
        assert_eq!(OutboxEntry::decode(&release.encode()).ok(), Some(release));
    }

    #[test]
    fn truncated_record_is_reported_corrupt() {
        let bytes = message().encode();
        for cut in 0..bytes.len() {
            assert!(
                MessageRecord::decode(&bytes[..cut]).is_err(),
                "cut at {cut}"
            );
        }
    }
}
