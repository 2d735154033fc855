//! Attachments' records (issue #13 item 5): who uploaded which file to
//! which conversation (`attachment`), and which messages reference it
//! (`attach_ref`). The files themselves are the broker's, in
//! `[attachments] dir`; this crate keeps only these small records. The
//! layout is `schema.rs`'s.

use std::collections::HashSet;

use crate::batch::{Batch, Op};
use crate::schema::{
    attach_ref_key, attachment_key, attachment_value, client_prefix, msg_key, split_attach_ref,
    split_attachment_key, split_attachment_value, CF_ATTACHMENT, CF_ATTACH_REF,
};
use crate::store::Store;
use crate::StorageError;

/// One upload of an attachment to a conversation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Upload {
    /// The file's SHA-256, lower-case hex.
    pub id: String,
    pub conv: String,
    pub uploader: String,
    pub size: u64,
    /// Unix ms of the (latest) upload.
    pub uploaded_ms: u64,
    pub content_type: String,
}

impl Batch {
    /// Records `upload` (a repeated upload refreshes its time).
    pub fn put_upload(&mut self, upload: &Upload) {
        self.ops.push(Op::Put {
            cf: CF_ATTACHMENT,
            key: attachment_key(&upload.id, &upload.conv, &upload.uploader),
            value: attachment_value(upload.size, upload.uploaded_ms, &upload.content_type),
        });
    }

    /// Forgets one upload (the collector found nothing referencing it).
    pub fn delete_upload(&mut self, id: &str, conv: &str, uploader: &str) {
        self.ops.push(Op::Delete {
            cf: CF_ATTACHMENT,
            key: attachment_key(id, conv, uploader),
        });
    }

    /// Message `seq` of `conv` references attachment `id`.
    pub fn put_attachment_ref(&mut self, conv: &str, seq: u64, id: &str) {
        self.ops.push(Op::Put {
            cf: CF_ATTACH_REF,
            key: attach_ref_key(conv, seq, id),
            value: Vec::new(),
        });
    }

    /// Drops the references of message `seq` of `conv` (it was deleted).
    pub fn delete_attachment_refs(&mut self, conv: &str, seq: u64) {
        self.ops.push(Op::DeleteRange {
            cf: CF_ATTACH_REF,
            from: msg_key(conv, seq),
            to: msg_key(conv, seq.saturating_add(1)),
        });
    }
}

impl Store {
    /// Every upload of attachment `id`, by conversation then uploader. A
    /// scan: blocking.
    pub fn uploads_of(&self, id: &str) -> Result<Vec<Upload>, StorageError> {
        let prefix = client_prefix(id);
        let mut out = Vec::new();
        self.scan_prefix(CF_ATTACHMENT, &prefix, |k, v| {
            if let Some(u) = upload(k, v) {
                out.push(u);
            }
            true
        })?;
        Ok(out)
    }

    /// Every upload of every attachment, for the collector. A full scan of
    /// a small column family: blocking.
    pub fn all_uploads(&self) -> Result<Vec<Upload>, StorageError> {
        let mut out = Vec::new();
        self.scan_prefix(CF_ATTACHMENT, &[], |k, v| {
            if let Some(u) = upload(k, v) {
                out.push(u);
            }
            true
        })?;
        Ok(out)
    }

    /// The ids some message references. A full scan of `attach_ref` (one
    /// key per reference): blocking.
    pub fn referenced_attachments(&self) -> Result<HashSet<String>, StorageError> {
        let mut out = HashSet::new();
        self.scan_prefix(CF_ATTACH_REF, &[], |k, _| {
            if let Some(id) = split_attach_ref(k) {
                out.insert(id);
            }
            true
        })?;
        Ok(out)
    }
}

fn upload(key: &[u8], value: &[u8]) -> Option<Upload> {
    let (id, conv, uploader) = split_attachment_key(key)?;
    let (size, uploaded_ms, content_type) = split_attachment_value(value)?;
    Some(Upload {
        id,
        conv,
        uploader,
        size,
        uploaded_ms,
        content_type,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::SyncMode;

    fn up(id: &str, conv: &str, uploader: &str) -> Upload {
        Upload {
            id: id.into(),
            conv: conv.into(),
            uploader: uploader.into(),
            size: 3,
            uploaded_ms: 4,
            content_type: "image/png".into(),
        }
    }

    #[tokio::test]
    async fn uploads_and_references_are_kept_and_dropped_with_their_messages() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(
            dir.path(),
            SyncMode::Always,
            std::time::Duration::from_millis(5),
        )
        .unwrap();
        let mut b = Batch::new();
        b.put_upload(&up("aa", "room", "al"));
        b.put_upload(&up("aa", "hall", "bo"));
        b.put_upload(&up("ab", "room", "al"));
        b.put_attachment_ref("room", 1, "aa");
        b.put_attachment_ref("room", 2, "ab");
        b.put_attachment_ref("room", 3, "ab");
        store.write(b).await.unwrap();
        let convs: Vec<String> = store
            .uploads_of("aa")
            .unwrap()
            .into_iter()
            .map(|u| u.conv)
            .collect();
        assert_eq!(convs, ["hall", "room"]);
        assert_eq!(store.all_uploads().unwrap().len(), 3);
        let referenced = store.referenced_attachments().unwrap();
        assert!(referenced.contains("aa") && referenced.contains("ab"));
        let mut b = Batch::new();
        b.delete_messages("room", 1, 2);
        b.delete_attachment_refs("room", 2);
        b.delete_upload("aa", "hall", "bo");
        store.write(b).await.unwrap();
        let referenced = store.referenced_attachments().unwrap();
        assert!(!referenced.contains("aa"), "trimmed with its message");
        assert!(referenced.contains("ab"), "message 3 still refers to it");
        assert_eq!(
            store.uploads_of("aa").unwrap(),
            vec![up("aa", "room", "al")]
        );
    }
}
