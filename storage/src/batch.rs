//! A batch of typed writes that commit together, atomically.

use std::any::Any;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;

use crate::record::{MessageRecord, OutboxEntry, SessionRecord};
use crate::schema::{
    client_prefix, inbound_key, outbox_key, prefix_end, CF_BODY, CF_CURSOR, CF_INBOUND, CF_OUTBOX,
    CF_RETAINED, CF_SESSION,
};

/// The next body id. Every open store raises it past the ids it holds
/// ([`crate::Store::open`]), so ids are unique within each database.
static NEXT_BODY: AtomicU64 = AtomicU64::new(1);

pub(crate) fn body_ids_above(last: u64) {
    NEXT_BODY.fetch_max(last.saturating_add(1), Ordering::Relaxed);
}

/// A message stored once in the `body` column family for every persistent
/// session it is owed to, each of whose `outbox` entries refers to it by
/// id. Counts the entries that still do: the one whose release takes the
/// count to zero deletes the body, in the same batch.
///
/// A body is written only by the batch that first shares it, with the
/// entries that refer to it, and once its count reached zero it is never
/// shared again (a later delivery of the same message stores a new body):
/// no batch can delete a body that another, later batch refers to.
#[derive(Debug)]
pub struct SharedBody {
    id: u64,
    refs: AtomicUsize,
}

impl SharedBody {
    /// A body found on disk at start-up; each entry that refers to it
    /// [`hold`](SharedBody::hold)s it.
    pub fn restored(id: u64) -> Arc<SharedBody> {
        Arc::new(SharedBody {
            id,
            refs: AtomicUsize::new(0),
        })
    }

    /// One more entry refers to the body.
    pub fn hold(&self) {
        self.refs.fetch_add(1, Ordering::AcqRel);
    }

    pub fn id(&self) -> u64 {
        self.id
    }

    /// Another reference, unless the count already fell to zero (then the
    /// body is deleted, or about to be, and must not be referred to).
    fn try_hold(&self) -> bool {
        self.refs
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |r| {
                (r > 0).then(|| r + 1)
            })
            .is_ok()
    }
}

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
    /// The bodies this batch stored, by the message they store (kept
    /// alive here, so its address is not reused while the batch is built).
    bodies: Vec<(Arc<dyn Any + Send + Sync>, Arc<SharedBody>)>,
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
        self.bodies.append(&mut other.bodies);
    }

    /// The stored body of `message` for one more outbox entry: the one this
    /// batch already stored for it, or a new one (`record`, written once).
    pub fn share_body<T: Any + Send + Sync>(
        &mut self,
        message: &Arc<T>,
        record: impl FnOnce() -> MessageRecord,
    ) -> Arc<SharedBody> {
        let same = |m: &Arc<dyn Any + Send + Sync>| {
            std::ptr::eq(
                Arc::as_ptr(m) as *const (),
                Arc::as_ptr(message) as *const (),
            )
        };
        if let Some((_, body)) = self.bodies.iter().rev().find(|(m, _)| same(m)) {
            if body.try_hold() {
                return body.clone();
            }
        }
        let body = Arc::new(SharedBody {
            id: NEXT_BODY.fetch_add(1, Ordering::Relaxed),
            refs: AtomicUsize::new(1),
        });
        self.put(CF_BODY, body.id.to_be_bytes().to_vec(), record().encode());
        let owner: Arc<dyn Any + Send + Sync> = message.clone();
        self.bodies.push((owner, body.clone()));
        body
    }

    /// An outbox entry no longer refers to `body`: the last one's release
    /// deletes it.
    pub fn release_body(&mut self, body: Option<&Arc<SharedBody>>) {
        if let Some(b) = body {
            let before = b
                .refs
                .fetch_update(Ordering::AcqRel, Ordering::Acquire, |r| r.checked_sub(1));
            if before == Ok(1) {
                self.delete(CF_BODY, b.id.to_be_bytes().to_vec());
            }
        }
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
        for cf in [CF_OUTBOX, CF_INBOUND, CF_CURSOR] {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::{ConversationRecord, PushJobRecord};
    use crate::{Device, Role};

    /// What a batch writes, as (kind, column family, key, value or range end).
    fn written(batch: &Batch) -> Vec<(&'static str, &'static str, Vec<u8>, Vec<u8>)> {
        batch
            .ops
            .iter()
            .map(|op| match op {
                Op::Put { cf, key, value } => ("put", *cf, key.clone(), value.clone()),
                Op::Delete { cf, key } => ("delete", *cf, key.clone(), Vec::new()),
                Op::DeleteRange { cf, from, to } => ("range", *cf, from.clone(), to.clone()),
            })
            .collect()
    }

    fn cat(parts: &[&[u8]]) -> Vec<u8> {
        parts.concat()
    }

    /// The bytes every write puts on disk, spelled out: data directories
    /// written by earlier versions must read the same, so a change here is
    /// a change of the on-disk format.
    #[test]
    fn every_write_keeps_its_on_disk_layout() {
        let seven = 7u64.to_be_bytes();
        let entry = OutboxEntry {
            state: crate::OutboxState::Release,
            subscription_ids: vec![],
            message: None,
            body: None,
        };
        let mut b = Batch::new();
        b.put_outbox("c", 7, &entry);
        b.delete_outbox("c", 7);
        b.put_inbound("c", 0x0102);
        b.delete_inbound("c", 0x0102);
        b.delete_session("c");
        b.put_message("room", 7, b"{}");
        b.delete_messages("room", 1, 7);
        b.put_reaction("room", 7, "ok", "al");
        b.delete_reaction("room", 7, "ok", "al");
        b.delete_reactions("room", 7);
        b.put_conversation("room", &ConversationRecord::default());
        b.put_member("room", "al", Role::Owner);
        b.put_member("room", "bo", Role::Member);
        b.delete_member("room", "bo");
        b.put_cursor("c", "room", 7);
        b.delete_cursors("c");
        b.put_read("al", "room", 7);
        b.put_device(
            "al",
            &Device {
                platform: "fcm".into(),
                token: "tk".into(),
                app_id: Some("app".into()),
            },
        );
        b.delete_device("al", "fcm", "tk");
        b.put_mute("al", "room", true);
        b.put_mute("al", "room", false);
        b.put_push_job(7, "al", "room", &PushJobRecord::default());
        b.delete_push_job(7, "al", "room");
        b.put_client_owner("c", "al", 7);
        b.delete_client_owner("c");
        let c = b"\x00\x01c".as_slice();
        let room = b"\x00\x04room".as_slice();
        let al = b"\x00\x02al".as_slice();
        let expected = vec![
            ("put", "offline", cat(&[c, &seven]), entry.encode()),
            ("delete", "offline", cat(&[c, &seven]), vec![]),
            ("put", "inbound", cat(&[c, &[1, 2]]), vec![]),
            ("delete", "inbound", cat(&[c, &[1, 2]]), vec![]),
            ("delete", "session", b"c".to_vec(), vec![]),
            ("range", "offline", c.to_vec(), b"\x00\x01d".to_vec()),
            ("range", "inbound", c.to_vec(), b"\x00\x01d".to_vec()),
            ("range", "cursor", c.to_vec(), b"\x00\x01d".to_vec()),
            ("put", "msg", cat(&[room, &seven]), b"{}".to_vec()),
            (
                "range",
                "msg",
                cat(&[room, &1u64.to_be_bytes()]),
                cat(&[room, &seven]),
            ),
            // A trimmed span's reactions and attachment references go
            // with it (issue #13).
            (
                "range",
                "reaction",
                cat(&[room, &1u64.to_be_bytes()]),
                cat(&[room, &seven]),
            ),
            (
                "range",
                "attach_ref",
                cat(&[room, &1u64.to_be_bytes()]),
                cat(&[room, &seven]),
            ),
            // (conv, seq, emoji, user): the emoji length-prefixed.
            (
                "put",
                "reaction",
                cat(&[room, &seven, b"\x00\x02ok", b"al"]),
                vec![],
            ),
            (
                "delete",
                "reaction",
                cat(&[room, &seven, b"\x00\x02ok", b"al"]),
                vec![],
            ),
            (
                "range",
                "reaction",
                cat(&[room, &seven]),
                cat(&[room, &8u64.to_be_bytes()]),
            ),
            (
                "put",
                "conv",
                b"room".to_vec(),
                ConversationRecord::default().encode(),
            ),
            ("put", "member", cat(&[room, b"al"]), vec![1]),
            ("put", "user_conv", cat(&[al, b"room"]), vec![]),
            ("put", "member", cat(&[room, b"bo"]), vec![0]),
            ("put", "user_conv", cat(&[b"\x00\x02bo", b"room"]), vec![]),
            ("delete", "member", cat(&[room, b"bo"]), vec![]),
            (
                "delete",
                "user_conv",
                cat(&[b"\x00\x02bo", b"room"]),
                vec![],
            ),
            ("put", "cursor", cat(&[c, b"room"]), seven.to_vec()),
            ("range", "cursor", c.to_vec(), b"\x00\x01d".to_vec()),
            ("put", "read", cat(&[al, b"room"]), seven.to_vec()),
            (
                "put",
                "device",
                cat(&[al, b"\x00\x03fcm", b"tk"]),
                b"app".to_vec(),
            ),
            (
                "put",
                "device_token",
                b"\x00\x03fcmtk".to_vec(),
                b"al".to_vec(),
            ),
            (
                "delete",
                "device",
                cat(&[al, b"\x00\x03fcm", b"tk"]),
                vec![],
            ),
            ("delete", "device_token", b"\x00\x03fcmtk".to_vec(), vec![]),
            ("put", "mute", cat(&[al, b"room"]), vec![]),
            ("delete", "mute", cat(&[al, b"room"]), vec![]),
            (
                "put",
                "push",
                cat(&[&seven, al, b"room"]),
                PushJobRecord::default().encode(),
            ),
            ("delete", "push", cat(&[&seven, al, b"room"]), vec![]),
            ("put", "client", b"c".to_vec(), cat(&[&[1], &seven, b"al"])),
            ("delete", "client", b"c".to_vec(), vec![]),
        ];
        assert_eq!(written(&b), expected);
    }

    #[test]
    fn an_idempotency_key_holds_its_seq_then_when_it_was_written() {
        let mut b = Batch::new();
        b.put_dedup("room", "al", "m1", 7);
        let ops = written(&b);
        let [("put", "dedup", key, value)] = ops.as_slice() else {
            panic!("one put into dedup");
        };
        assert_eq!(key, &cat(&[b"\x00\x04room", b"\x00\x02al", b"m1"]));
        assert_eq!(value.len(), 16);
        assert_eq!(value[..8], 7u64.to_be_bytes());
    }
}
