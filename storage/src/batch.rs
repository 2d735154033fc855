//! A batch of typed writes that commit together, atomically.

use crate::keys::*;
use crate::record::{MessageRecord, OutboxEntry, SessionRecord};

pub(crate) enum Op {
    Put {
        cf: &'static str,
        key: Vec<u8>,
        value: Vec<u8>,
    },
    Delete {
        cf: &'static str,
        key: Vec<u8>,
    },
    DeleteRange {
        cf: &'static str,
        from: Vec<u8>,
        to: Vec<u8>,
    },
}

/// Writes that must land together. Build one per protocol event (a PUBLISH
/// routed to several sessions, an ack, a subscription change) and submit it.
#[derive(Default)]
pub struct Batch {
    pub(crate) ops: Vec<Op>,
}

impl Batch {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn is_empty(&self) -> bool {
        self.ops.is_empty()
    }

    pub fn len(&self) -> usize {
        self.ops.len()
    }

    /// Moves every write of `other` into this batch, after this batch's own.
    pub fn append(&mut self, mut other: Batch) {
        self.ops.append(&mut other.ops);
    }

    fn put(&mut self, cf: &'static str, key: Vec<u8>, value: Vec<u8>) {
        self.ops.push(Op::Put { cf, key, value });
    }

    fn delete(&mut self, cf: &'static str, key: Vec<u8>) {
        self.ops.push(Op::Delete { cf, key });
    }

    pub fn put_session(&mut self, client_id: &str, session: &SessionRecord) {
        self.put(CF_SESSION, client_id.as_bytes().to_vec(), session.encode());
    }

    /// Removes a session with everything it was owed and its QoS 2 state.
    pub fn delete_session(&mut self, client_id: &str) {
        self.delete(CF_SESSION, client_id.as_bytes().to_vec());
        let prefix = client_prefix(client_id);
        for cf in [CF_OUTBOX, CF_INBOUND, crate::chat::CF_CURSOR] {
            self.ops.push(Op::DeleteRange {
                cf,
                from: prefix.clone(),
                to: prefix_end(&prefix),
            });
        }
    }

    pub fn put_outbox(&mut self, client_id: &str, n: u64, entry: &OutboxEntry) {
        self.put(CF_OUTBOX, outbox_key(client_id, n), entry.encode());
    }

    pub fn delete_outbox(&mut self, client_id: &str, n: u64) {
        self.delete(CF_OUTBOX, outbox_key(client_id, n));
    }

    /// Records that an incoming QoS 2 PUBLISH with `pkid` was accepted and
    /// PUBREC is owed, so a resent copy after a crash is not routed twice.
    pub fn put_inbound(&mut self, client_id: &str, pkid: u16) {
        self.put(CF_INBOUND, inbound_key(client_id, pkid), Vec::new());
    }

    pub fn delete_inbound(&mut self, client_id: &str, pkid: u16) {
        self.delete(CF_INBOUND, inbound_key(client_id, pkid));
    }

    pub fn put_retained(&mut self, message: &MessageRecord) {
        self.put(
            CF_RETAINED,
            message.topic.as_bytes().to_vec(),
            message.encode(),
        );
    }

    pub fn delete_retained(&mut self, topic: &str) {
        self.delete(CF_RETAINED, topic.as_bytes().to_vec());
    }
}
