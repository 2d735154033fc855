//! The schema: every column family chatmq keeps, and the byte layout of
//! their keys and of the small fixed-width values (seqs, roles, the
//! idempotency-key stamp). Records with fields of their own are encoded in
//! `record.rs` (and `owner.rs`).
//!
//! Every other module of this crate takes names and keys from here, and
//! this module takes nothing from them: it knows no RocksDB handle, no
//! batch, no store. What it must never do is change an existing layout:
//! data directories written by earlier versions have to open and read the
//! same (the test in `batch.rs` spells the bytes out).
//!
//! Keys are big-endian, and ids inside keys are length-prefixed (a u16,
//! then the UTF-8 bytes), so that a prefix scan returns one session's,
//! conversation's or user's entries, in order, and "ab" + x never collides
//! with "a" + y.

// Column families. The names are the on-disk names: renaming one loses
// its data.

/// Epoch and schema version.
pub(crate) const CF_META: &str = "meta";
/// Client id → [`crate::SessionRecord`].
pub(crate) const CF_SESSION: &str = "session";
/// (client id, n) → [`crate::OutboxEntry`]: queued or in-flight messages.
pub(crate) const CF_OUTBOX: &str = "offline";
/// (client id, packet id) → nothing: incoming QoS 2 awaiting PUBREL.
pub(crate) const CF_INBOUND: &str = "inbound";
/// Topic → [`crate::RetainedRecord`].
pub(crate) const CF_RETAINED: &str = "retained";
/// Client id → its owner and when it was last used (`owner.rs`).
pub(crate) const CF_CLIENT: &str = "client";
/// (conv, seq) → the envelope subscribers get.
pub(crate) const CF_MSG: &str = "msg";
/// Conv → [`crate::ConversationRecord`].
pub(crate) const CF_CONV: &str = "conv";
/// (conv, user) → role byte.
pub(crate) const CF_MEMBER: &str = "member";
/// (user, conv) → nothing: the index of `member` by user.
pub(crate) const CF_USER_CONV: &str = "user_conv";
/// (client id, conv) → seq: the last seq the session acknowledged.
pub(crate) const CF_CURSOR: &str = "cursor";
/// (user, conv) → seq: the last seq the user read.
pub(crate) const CF_READ: &str = "read";
/// (conv, sender, message id) → seq and write time: idempotency keys.
pub(crate) const CF_DEDUP: &str = "dedup";
/// (user, platform, token) → app id.
pub(crate) const CF_DEVICE: &str = "device";
/// (platform, token) → user: the index of `device` by token.
pub(crate) const CF_DEVICE_TOKEN: &str = "device_token";
/// (user, conv) → nothing: muted conversations.
pub(crate) const CF_MUTE: &str = "mute";
/// (due ms, user, conv) → [`crate::PushJobRecord`]: the push queue, in the
/// order it falls due.
pub(crate) const CF_PUSH: &str = "push";

/// body id (u64, big-endian) → [`crate::MessageRecord`]: a message owed to
/// several persistent sessions, stored once; their `outbox` entries refer
/// to it (see [`crate::SharedBody`]).
pub(crate) const CF_BODY: &str = "body";

/// (conv, seq, emoji, user) → nothing: one member's reaction to one
/// message (issue #13 item 3). Keys start as `msg` keys do, so one range
/// drops a trimmed span's reactions with its messages.
pub(crate) const CF_REACTION: &str = "reaction";

/// (attachment id, conv, uploader) → [`attachment_value`]: `uploader`
/// uploaded the file `id` (its SHA-256, hex) to `conv` (issue #13 item 5).
/// A prefix scan by id answers which conversations may see it.
pub(crate) const CF_ATTACHMENT: &str = "attachment";

/// (conv, seq, attachment id) → nothing: message `seq` of `conv`
/// references the attachment. Keys start as `msg` keys do, so the range
/// that trims or deletes messages drops their references too.
pub(crate) const CF_ATTACH_REF: &str = "attach_ref";

/// Every column family, opened together (RocksDB refuses to open a
/// database without naming every column family it has). Those added later
/// (`reaction`, `attachment`, `attach_ref`) are created when an older
/// database opens (`create_missing_column_families`); an older binary
/// cannot open a database that has them (it would not name them).
pub(crate) const ALL_CFS: [&str; 21] = [
    CF_META,
    CF_SESSION,
    CF_OUTBOX,
    CF_INBOUND,
    CF_RETAINED,
    CF_CLIENT,
    CF_MSG,
    CF_CONV,
    CF_MEMBER,
    CF_USER_CONV,
    CF_CURSOR,
    CF_READ,
    CF_DEDUP,
    CF_DEVICE,
    CF_DEVICE_TOKEN,
    CF_MUTE,
    CF_PUSH,
    CF_BODY,
    CF_REACTION,
    CF_ATTACHMENT,
    CF_ATTACH_REF,
];

/// The column families read with point lookups (`get`); the others are
/// read by prefix or range scans. `options.rs` gives the first a bloom
/// filter.
pub(crate) const POINT_LOOKUP_CFS: [&str; 6] = [
    CF_META,
    CF_CLIENT,
    CF_CONV,
    CF_READ,
    CF_DEDUP,
    CF_DEVICE_TOKEN,
];

pub(crate) const META_EPOCH: &[u8] = b"epoch";
pub(crate) const META_SCHEMA: &[u8] = b"schema";
pub(crate) const SCHEMA_VERSION: u32 = 1;

// Keys.

/// An id, length-prefixed: the first part of most keys, and the prefix
/// that scans one client's, conversation's or user's entries.
pub(crate) fn client_prefix(id: &str) -> Vec<u8> {
    let id = id.as_bytes();
    let mut key = Vec::with_capacity(2 + id.len() + 8);
    // Ids are bounded far below 64 KiB by the protocol and the broker.
    key.extend_from_slice(&(id.len() as u16).to_be_bytes());
    key.extend_from_slice(id);
    key
}

/// The id of a key that starts with a [`client_prefix`], and the rest of
/// the key; `None` if the key is too short for the length it gives.
pub(crate) fn split_client(key: &[u8]) -> Option<(&[u8], &[u8])> {
    let len = usize::from(u16::from_be_bytes([*key.first()?, *key.get(1)?]));
    let id = key.get(2..2 + len)?;
    Some((id, &key[2 + len..]))
}

/// The first key after every key that starts with `prefix`.
pub(crate) fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < u8::MAX {
            end.push(last + 1);
            return end;
        }
    }
    // A prefix of all 0xFF bytes has no successor: the scan runs to the end.
    vec![0xFF; prefix.len() + 9]
}

/// (a, b): the key of `member`, `user_conv`, `cursor`, `read`, `mute`
/// and `device_token`.
pub(crate) fn pair(a: &str, b: &str) -> Vec<u8> {
    let mut key = client_prefix(a);
    key.extend_from_slice(b.as_bytes());
    key
}

/// The (a, b) of a [`pair`] key.
pub(crate) fn split_pair(key: &[u8]) -> Option<(String, String)> {
    let (a, b) = split_client(key)?;
    Some((
        String::from_utf8(a.to_vec()).ok()?,
        String::from_utf8(b.to_vec()).ok()?,
    ))
}

/// (id, n): a session's queued message n (`offline`), a conversation's
/// message seq (`msg`).
fn seq_key(id: &str, n: u64) -> Vec<u8> {
    let mut key = client_prefix(id);
    key.extend_from_slice(&n.to_be_bytes());
    key
}

/// (client id, n): one queued or in-flight message of a session.
pub(crate) fn outbox_key(client_id: &str, n: u64) -> Vec<u8> {
    seq_key(client_id, n)
}

/// (conv, seq): one message of the log.
pub(crate) fn msg_key(conv: &str, seq: u64) -> Vec<u8> {
    seq_key(conv, seq)
}

/// (conv, seq, emoji, user): one reaction; the emoji is length-prefixed.
pub(crate) fn reaction_key(conv: &str, seq: u64, emoji: &str, user: &str) -> Vec<u8> {
    let mut key = msg_key(conv, seq);
    key.extend_from_slice(&client_prefix(emoji));
    key.extend_from_slice(user.as_bytes());
    key
}

/// The (emoji, user) of a [`reaction_key`] after its (conv, seq) part.
pub(crate) fn split_reaction(rest: &[u8]) -> Option<(String, String)> {
    split_pair(rest)
}

/// (id, conv, uploader): one upload of an attachment to a conversation.
pub(crate) fn attachment_key(id: &str, conv: &str, uploader: &str) -> Vec<u8> {
    let mut key = client_prefix(id);
    key.extend_from_slice(&pair(conv, uploader));
    key
}

/// The (id, conv, uploader) of an [`attachment_key`].
pub(crate) fn split_attachment_key(key: &[u8]) -> Option<(String, String, String)> {
    let (id, rest) = split_pair(key)?;
    let (conv, uploader) = split_pair(rest.as_bytes())?;
    Some((id, conv, uploader))
}

/// (conv, seq, id): message `seq` references attachment `id`.
pub(crate) fn attach_ref_key(conv: &str, seq: u64, id: &str) -> Vec<u8> {
    let mut key = msg_key(conv, seq);
    key.extend_from_slice(id.as_bytes());
    key
}

/// The id of an [`attach_ref_key`]: what follows (conv, seq).
pub(crate) fn split_attach_ref(key: &[u8]) -> Option<String> {
    let (_, rest) = split_client(key)?;
    String::from_utf8(rest.get(8..)?.to_vec()).ok()
}

/// An `attachment` value: size (u64), upload time in unix ms (u64), both
/// big-endian, then the content type's UTF-8 bytes.
pub(crate) fn attachment_value(size: u64, uploaded_ms: u64, content_type: &str) -> Vec<u8> {
    let mut v = size.to_be_bytes().to_vec();
    v.extend_from_slice(&uploaded_ms.to_be_bytes());
    v.extend_from_slice(content_type.as_bytes());
    v
}

/// The (size, upload ms, content type) of an [`attachment_value`].
pub(crate) fn split_attachment_value(v: &[u8]) -> Option<(u64, u64, String)> {
    let size = seq_value(v.get(..8)?)?;
    let at = seq_value(v.get(8..16)?)?;
    let kind = String::from_utf8(v.get(16..)?.to_vec()).ok()?;
    Some((size, at, kind))
}

/// The n (or seq) of an `offline` or `msg` key that starts with `prefix`
/// (the id's [`client_prefix`]).
pub(crate) fn seq_after(key: &[u8], prefix: &[u8]) -> Option<u64> {
    seq_value(key.strip_prefix(prefix)?)
}

/// (client id, packet id): an incoming QoS 2 message awaiting PUBREL.
pub(crate) fn inbound_key(client_id: &str, pkid: u16) -> Vec<u8> {
    let mut key = client_prefix(client_id);
    key.extend_from_slice(&pkid.to_be_bytes());
    key
}

/// (conv, sender, message id): an idempotency key.
pub(crate) fn dedup_key(conv: &str, sender: &str, id: &str) -> Vec<u8> {
    let mut key = client_prefix(conv);
    key.extend_from_slice(&client_prefix(sender));
    key.extend_from_slice(id.as_bytes());
    key
}

/// (user, platform, token): a registered device.
pub(crate) fn device_key(user: &str, platform: &str, token: &str) -> Vec<u8> {
    let mut key = client_prefix(user);
    key.extend_from_slice(&client_prefix(platform));
    key.extend_from_slice(token.as_bytes());
    key
}

/// The (user, platform, token) of a [`device_key`].
pub(crate) fn split_device_key(key: &[u8]) -> Option<(String, String, String)> {
    let (user, rest) = split_pair(key)?;
    let (platform, token) = split_pair(rest.as_bytes())?;
    Some((user, platform, token))
}

/// (due ms, user, conv): a queued notification, sorting by due time.
pub(crate) fn job_key(due_ms: u64, user: &str, conv: &str) -> Vec<u8> {
    let mut key = due_ms.to_be_bytes().to_vec();
    key.extend_from_slice(&pair(user, conv));
    key
}

/// The (due ms, user, conv) of a [`job_key`].
pub(crate) fn split_job_key(key: &[u8]) -> Option<(u64, String, String)> {
    let due = seq_value(key.get(..8)?)?;
    let (user, conv) = split_pair(key.get(8..)?)?;
    Some((due, user, conv))
}

// Small values.

/// A seq (or any u64) as stored: 8 bytes, big-endian. The value of
/// `cursor` and `read`.
pub(crate) fn seq_bytes(seq: u64) -> Vec<u8> {
    seq.to_be_bytes().to_vec()
}

/// The u64 of exactly 8 big-endian bytes.
pub(crate) fn seq_value(v: &[u8]) -> Option<u64> {
    Some(u64::from_be_bytes(v.try_into().ok()?))
}

/// A `member` value: 1 for the owner, 0 for a member.
pub(crate) fn role_byte(owner: bool) -> Vec<u8> {
    vec![u8::from(owner)]
}

/// Whether a `member` value names the owner.
pub(crate) fn is_owner(value: &[u8]) -> bool {
    value.first() == Some(&1)
}

/// An idempotency key's value: the seq, then the unix ms it was written.
pub(crate) fn dedup_value(seq: u64, written_ms: u64) -> Vec<u8> {
    let mut v = seq.to_be_bytes().to_vec();
    v.extend_from_slice(&written_ms.to_be_bytes());
    v
}

/// The seq and write time of a [`dedup_value`]. Keys written before the
/// time was recorded hold the seq alone: their time is `None`. `None`
/// altogether for a value this schema never writes.
pub(crate) fn split_dedup_value(v: &[u8]) -> Option<(u64, Option<u64>)> {
    let seq = seq_value(v.get(..8)?)?;
    Some((seq, v.get(8..16).and_then(seq_value)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outbox_keys_sort_by_n_within_a_client() {
        assert!(outbox_key("c", 2) < outbox_key("c", 256));
        assert!(outbox_key("c", u64::MAX) < prefix_end(&client_prefix("c")));
        assert!(outbox_key("c", 0) >= client_prefix("c"));
    }

    #[test]
    fn client_prefixes_do_not_overlap() {
        let a = client_prefix("a");
        let ab = outbox_key("ab", 0);
        assert!(!ab.starts_with(&a));
    }

    #[test]
    fn every_column_family_is_named_once() {
        let mut names = ALL_CFS.to_vec();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), ALL_CFS.len());
        assert!(POINT_LOOKUP_CFS.iter().all(|cf| ALL_CFS.contains(cf)));
    }

    #[test]
    fn keys_split_back_into_what_built_them() {
        assert_eq!(
            split_pair(&pair("room", "al")),
            Some(("room".into(), "al".into()))
        );
        assert_eq!(
            split_device_key(&device_key("al", "fcm", "tk")),
            Some(("al".into(), "fcm".into(), "tk".into()))
        );
        assert_eq!(
            split_job_key(&job_key(7, "al", "room")),
            Some((7, "al".into(), "room".into()))
        );
        let prefix = client_prefix("c");
        assert_eq!(seq_after(&outbox_key("c", 9), &prefix), Some(9));
        assert_eq!(seq_after(&msg_key("c", 9), &client_prefix("d")), None);
        assert_eq!(
            split_client(&inbound_key("c", 0x0102)),
            Some((&b"c"[..], &[1u8, 2][..]))
        );
        assert_eq!(split_dedup_value(&dedup_value(3, 4)), Some((3, Some(4))));
        assert_eq!(split_dedup_value(&seq_bytes(3)), Some((3, None)));
        assert!(is_owner(&role_byte(true)) && !is_owner(&role_byte(false)));
        assert_eq!(
            split_attachment_key(&attachment_key("ab", "room", "al")),
            Some(("ab".into(), "room".into(), "al".into()))
        );
        assert_eq!(
            split_attach_ref(&attach_ref_key("room", 7, "ab")),
            Some("ab".into())
        );
        assert_eq!(
            split_attachment_value(&attachment_value(3, 4, "image/png")),
            Some((3, 4, "image/png".into()))
        );
        assert_eq!(split_attachment_value(b"short"), None);
    }

    #[test]
    fn keys_from_disk_that_do_not_parse_are_none_not_a_panic() {
        assert_eq!(split_pair(b""), None);
        assert_eq!(split_pair(b"\x00"), None);
        assert_eq!(split_pair(b"\xff\xffab"), None, "a length past the end");
        assert_eq!(split_pair(b"\x00\x01\xff"), None, "not UTF-8");
        assert_eq!(split_job_key(b"\x00\x00\x00"), None);
        assert_eq!(split_device_key(b"\x00\x01ab"), None);
        assert_eq!(split_client(b"\x00\x02c"), None, "a length past the end");
        assert_eq!(split_dedup_value(b"1234567"), None);
        assert_eq!(seq_value(b"123456789"), None);
    }
}
