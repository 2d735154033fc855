//! The chat data: conversations, members, the message log, cursors,
//! read state and idempotency keys (DESIGN §5): the writes a batch can
//! carry and the reads the chat layer makes. The layout is `schema.rs`'s.

use rocksdb::{Direction, IteratorMode};

use crate::batch::{Batch, Op};
use crate::record::ConversationRecord;
use crate::schema::{
    client_prefix, dedup_key, dedup_value, is_owner, msg_key, pair, prefix_end, reaction_key,
    role_byte, seq_after, seq_bytes, seq_value, split_dedup_value, split_pair, split_reaction,
    CF_ATTACH_REF, CF_CONV, CF_CURSOR, CF_DEDUP, CF_MEMBER, CF_MSG, CF_REACTION, CF_READ,
    CF_USER_CONV,
};
use crate::store::Store;
use crate::StorageError;

/// A member's role in a conversation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Member,
    Owner,
}

impl Batch {
    /// Appends message `seq` of `conv`; `envelope` is the JSON subscribers get.
    pub fn put_message(&mut self, conv: &str, seq: u64, envelope: &[u8]) {
        self.ops.push(Op::Put {
            cf: CF_MSG,
            key: msg_key(conv, seq),
            value: envelope.to_vec(),
        });
    }

    /// Drops messages of `conv` with seq in `from..to` (retention), their
    /// reactions and their attachment references.
    pub fn delete_messages(&mut self, conv: &str, from: u64, to: u64) {
        for cf in [CF_MSG, CF_REACTION, CF_ATTACH_REF] {
            self.ops.push(Op::DeleteRange {
                cf,
                from: msg_key(conv, from),
                to: msg_key(conv, to),
            });
        }
    }

    /// `user` reacted to message `seq` of `conv` with `emoji`.
    pub fn put_reaction(&mut self, conv: &str, seq: u64, emoji: &str, user: &str) {
        self.ops.push(Op::Put {
            cf: CF_REACTION,
            key: reaction_key(conv, seq, emoji, user),
            value: Vec::new(),
        });
    }

    /// `user` took back its `emoji` on message `seq` of `conv`.
    pub fn delete_reaction(&mut self, conv: &str, seq: u64, emoji: &str, user: &str) {
        self.ops.push(Op::Delete {
            cf: CF_REACTION,
            key: reaction_key(conv, seq, emoji, user),
        });
    }

    /// Drops every reaction to message `seq` of `conv` (it was deleted).
    pub fn delete_reactions(&mut self, conv: &str, seq: u64) {
        self.ops.push(Op::DeleteRange {
            cf: CF_REACTION,
            from: msg_key(conv, seq),
            to: msg_key(conv, seq.saturating_add(1)),
        });
    }

    pub fn put_conversation(&mut self, conv: &str, record: &ConversationRecord) {
        self.ops.push(Op::Put {
            cf: CF_CONV,
            key: conv.as_bytes().to_vec(),
            value: record.encode(),
        });
    }

    pub fn put_member(&mut self, conv: &str, user: &str, role: Role) {
        self.ops.push(Op::Put {
            cf: CF_MEMBER,
            key: pair(conv, user),
            value: role_byte(role == Role::Owner),
        });
        self.ops.push(Op::Put {
            cf: CF_USER_CONV,
            key: pair(user, conv),
            value: Vec::new(),
        });
    }

    pub fn delete_member(&mut self, conv: &str, user: &str) {
        self.ops.push(Op::Delete {
            cf: CF_MEMBER,
            key: pair(conv, user),
        });
        self.ops.push(Op::Delete {
            cf: CF_USER_CONV,
            key: pair(user, conv),
        });
    }

    /// The last seq of `conv` that client `client_id` acknowledged.
    pub fn put_cursor(&mut self, client_id: &str, conv: &str, seq: u64) {
        self.ops.push(Op::Put {
            cf: CF_CURSOR,
            key: pair(client_id, conv),
            value: seq_bytes(seq),
        });
    }

    /// Forgets every cursor of a session that ended.
    pub fn delete_cursors(&mut self, client_id: &str) {
        let prefix = client_prefix(client_id);
        self.ops.push(Op::DeleteRange {
            cf: CF_CURSOR,
            to: prefix_end(&prefix),
            from: prefix,
        });
    }

    pub fn put_read(&mut self, user: &str, conv: &str, seq: u64) {
        self.ops.push(Op::Put {
            cf: CF_READ,
            key: pair(user, conv),
            value: seq_bytes(seq),
        });
    }

    /// Remembers that `sender`'s message `id` in `conv` got `seq`, and
    /// when (the key expires `chat.dedup_ttl_secs` later).
    pub fn put_dedup(&mut self, conv: &str, sender: &str, id: &str, seq: u64) {
        self.ops.push(Op::Put {
            cf: CF_DEDUP,
            key: dedup_key(conv, sender, id),
            value: dedup_value(seq, unix_ms()),
        });
    }

    /// Applies one page of the idempotency-key sweep: expired keys go,
    /// keys written before keys had a time get one now (so they expire a
    /// whole window later, never at once after an upgrade).
    pub fn expire_dedup(&mut self, page: &DedupPage, now_ms: u64) {
        for key in &page.expired {
            self.ops.push(Op::Delete {
                cf: CF_DEDUP,
                key: key.clone(),
            });
        }
        for (key, seq) in &page.unstamped {
            self.ops.push(Op::Put {
                cf: CF_DEDUP,
                key: key.clone(),
                value: dedup_value(*seq, now_ms),
            });
        }
    }
}

fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// The answer of a lookup that may not touch the disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cached<T> {
    Known(T),
    /// Only a disk read could tell.
    Uncached,
}

/// One page of the `dedup` column family, read for the expiry sweep.
#[derive(Debug, Default)]
pub struct DedupPage {
    /// Keys written before the cutoff.
    pub expired: Vec<Vec<u8>>,
    /// Keys with no write time, and their seq.
    pub unstamped: Vec<(Vec<u8>, u64)>,
    /// Where the next page starts; `None` at the end of the column family.
    pub next: Option<Vec<u8>>,
}

impl Store {
    pub fn conversation(&self, conv: &str) -> Result<Option<ConversationRecord>, StorageError> {
        match self
            .db()
            .get_cf(self.cf_handle(CF_CONV)?, conv.as_bytes())?
        {
            Some(v) => Ok(Some(ConversationRecord::decode(&v)?)),
            None => Ok(None),
        }
    }

    /// Every conversation record, by id (retention walks them).
    pub fn conversations(&self) -> Result<Vec<(String, ConversationRecord)>, StorageError> {
        let mut out = Vec::new();
        let mut bad = None;
        self.scan_prefix(CF_CONV, &[], |k, v| {
            match (String::from_utf8(k.to_vec()), ConversationRecord::decode(v)) {
                (Ok(conv), Ok(record)) => out.push((conv, record)),
                (_, Err(e)) => bad = Some(e),
                (Err(_), _) => {
                    bad = Some(StorageError::Corrupt {
                        cf: CF_CONV,
                        what: "conversation id is not UTF-8".into(),
                    })
                }
            }
            bad.is_none()
        })?;
        match bad {
            Some(e) => Err(e),
            None => Ok(out),
        }
    }

    /// Every (conversation, user, role) membership. Used once at start-up.
    pub fn all_members(&self) -> Result<Vec<(String, String, Role)>, StorageError> {
        let mut out = Vec::new();
        self.scan_prefix(CF_MEMBER, &[], |k, v| {
            if let Some((conv, user)) = split_pair(k) {
                let role = if is_owner(v) {
                    Role::Owner
                } else {
                    Role::Member
                };
                out.push((conv, user, role));
            }
            true
        })?;
        Ok(out)
    }

    /// Messages of `conv` with `from <= seq < to`, at most `limit`, in
    /// ascending order (or descending with `reverse`).
    pub fn messages(
        &self,
        conv: &str,
        from: u64,
        to: u64,
        limit: usize,
        reverse: bool,
    ) -> Result<Vec<(u64, Vec<u8>)>, StorageError> {
        let prefix = client_prefix(conv);
        let handle = self.cf_handle(CF_MSG)?;
        let mut out = Vec::new();
        if from >= to || limit == 0 {
            return Ok(out);
        }
        let (start, mode) = if reverse {
            (msg_key(conv, to.saturating_sub(1)), Direction::Reverse)
        } else {
            (msg_key(conv, from), Direction::Forward)
        };
        for item in self
            .db()
            .iterator_cf(handle, IteratorMode::From(&start, mode))
        {
            let (key, value) = item?;
            if !key.starts_with(&prefix) {
                break;
            }
            let Some(seq) = seq_after(&key, &prefix) else {
                break;
            };
            if seq < from || seq >= to {
                break;
            }
            out.push((seq, value.to_vec()));
            if out.len() >= limit {
                break;
            }
        }
        Ok(out)
    }

    /// Every (emoji, user) reaction to message `seq` of `conv`, by emoji
    /// then user. A scan: blocking.
    pub fn reactions(&self, conv: &str, seq: u64) -> Result<Vec<(String, String)>, StorageError> {
        let prefix = msg_key(conv, seq);
        let mut out = Vec::new();
        self.scan_prefix(CF_REACTION, &prefix, |k, _| {
            if let Some(r) = k.get(prefix.len()..).and_then(split_reaction) {
                out.push(r);
            }
            true
        })?;
        Ok(out)
    }

    /// One message of the log. Blocking.
    pub fn message(&self, conv: &str, seq: u64) -> Result<Option<Vec<u8>>, StorageError> {
        Ok(self
            .db()
            .get_cf(self.cf_handle(CF_MSG)?, msg_key(conv, seq))?)
    }

    /// Makes overwritten messages of `conv` (deleted ones) leave the files
    /// too, not only every read: writes every memtable out (so the
    /// write-ahead log holding the old text becomes obsolete and is
    /// removed) and compacts the key ranges of `seqs` in `msg` and
    /// `reaction` down to the last level, where an overwritten version is
    /// dropped. Blocking, and costly: batch the seqs.
    pub fn scrub_messages(&self, conv: &str, seqs: &[u64]) -> Result<(), StorageError> {
        self.flush_memtables()?;
        let mut options = rocksdb::CompactOptions::default();
        options.set_bottommost_level_compaction(rocksdb::BottommostLevelCompaction::Force);
        for cf in [CF_MSG, CF_REACTION] {
            let handle = self.cf_handle(cf)?;
            for seq in seqs {
                let from = msg_key(conv, *seq);
                let to = msg_key(conv, seq.saturating_add(1));
                self.db()
                    .compact_range_cf_opt(handle, Some(&from), Some(&to), &options);
            }
        }
        Ok(())
    }

    pub fn read_seq(&self, user: &str, conv: &str) -> Result<u64, StorageError> {
        Ok(self
            .db()
            .get_cf(self.cf_handle(CF_READ)?, pair(user, conv))?
            .and_then(|v| seq_value(&v))
            .unwrap_or(0))
    }

    /// The seq an earlier publish of (`conv`, `sender`, `id`) got, if any.
    /// May read the disk: for the blocking pool.
    pub fn dedup(&self, conv: &str, sender: &str, id: &str) -> Result<Option<u64>, StorageError> {
        Ok(self
            .db()
            .get_cf(self.cf_handle(CF_DEDUP)?, dedup_key(conv, sender, id))?
            .and_then(|v| split_dedup_value(&v))
            .map(|(seq, _)| seq))
    }

    /// [`Store::dedup`] from memory alone (memtables, block cache and the
    /// SST files' bloom filters), never the disk: safe on an async worker.
    /// A key the filters rule out, the common case, is answered here;
    /// `Uncached` when only a disk read could tell.
    pub fn dedup_cached(
        &self,
        conv: &str,
        sender: &str,
        id: &str,
    ) -> Result<Cached<Option<u64>>, StorageError> {
        Ok(
            match self.get_in_memory(CF_DEDUP, &dedup_key(conv, sender, id))? {
                Cached::Known(v) => {
                    Cached::Known(v.and_then(|v| split_dedup_value(&v)).map(|(seq, _)| seq))
                }
                Cached::Uncached => Cached::Uncached,
            },
        )
    }

    /// Reads up to `limit` idempotency keys from `from` (the start when
    /// `None`) and sorts out those written before `cutoff_ms`. A scan, for
    /// the blocking pool.
    pub fn dedup_page(
        &self,
        from: Option<&[u8]>,
        cutoff_ms: u64,
        limit: usize,
    ) -> Result<DedupPage, StorageError> {
        let handle = self.cf_handle(CF_DEDUP)?;
        let mode = match from {
            Some(k) => IteratorMode::From(k, Direction::Forward),
            None => IteratorMode::Start,
        };
        let mut page = DedupPage::default();
        for (n, item) in self.db().iterator_cf(handle, mode).enumerate() {
            let (key, value) = item?;
            if n == limit {
                page.next = Some(key.to_vec());
                break;
            }
            match split_dedup_value(&value) {
                Some((_, Some(written))) if written < cutoff_ms => page.expired.push(key.to_vec()),
                Some((seq, None)) => page.unstamped.push((key.to_vec(), seq)),
                Some((_, Some(_))) => {}
                // Not a value this schema writes: nothing to dedup with.
                None => page.expired.push(key.to_vec()),
            }
        }
        Ok(page)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::SyncMode;
    use std::time::Duration;

    // Issue #11 item 3: the idempotency lookup on the append path must not
    // read the disk on an async worker. From memory it answers a key the
    // bloom filter rules out, and never says "absent" for a key that is
    // there: it says `Uncached` and the caller reads the disk elsewhere.
    // Issue #13 item 3: reactions are keys of their own column family,
    // one per (message, emoji, user), read back by message; one message's
    // are dropped by a delete, a trimmed span's with its messages, and
    // nothing of a neighbouring message or conversation goes with them.
    #[tokio::test]
    async fn reactions_are_kept_per_message_and_dropped_with_it() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), SyncMode::Always, Duration::from_millis(5)).unwrap();
        let mut b = Batch::new();
        for seq in 1..=4 {
            b.put_reaction("room", seq, "👍", "bob");
            b.put_reaction("room", seq, "👍", "alice");
            b.put_reaction("room", seq, "🎉", "bob");
        }
        b.put_reaction("room2", 1, "👍", "bob");
        b.put_reaction("room", 256, "👍", "bob");
        store.write(b).await.unwrap();
        let two = |a: &str, b: &str| (a.to_string(), b.to_string());
        assert_eq!(
            store.reactions("room", 1).unwrap(),
            [two("🎉", "bob"), two("👍", "alice"), two("👍", "bob")]
        );
        let mut b = Batch::new();
        b.delete_reaction("room", 2, "👍", "alice");
        b.delete_reactions("room", 3);
        b.delete_messages("room", 1, 2);
        store.write(b).await.unwrap();
        assert!(store.reactions("room", 1).unwrap().is_empty(), "trimmed");
        assert_eq!(store.reactions("room", 2).unwrap().len(), 2);
        assert!(store.reactions("room", 3).unwrap().is_empty(), "deleted");
        assert_eq!(store.reactions("room", 4).unwrap().len(), 3);
        assert_eq!(store.reactions("room", 256).unwrap().len(), 1);
        assert_eq!(store.reactions("room2", 1).unwrap().len(), 1);
    }

    #[tokio::test]
    async fn the_cached_idempotency_lookup_never_misses_a_stored_key() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store =
                Store::open(dir.path(), SyncMode::Always, Duration::from_millis(5)).unwrap();
            let mut b = Batch::new();
            for i in 0..2000u64 {
                b.put_dedup("room", "alice", &format!("id-{i}"), i + 1);
            }
            store.write(b).await.unwrap();
            // In the memtable: answered from memory.
            assert_eq!(
                store.dedup_cached("room", "alice", "id-7").unwrap(),
                Cached::Known(Some(8))
            );
            let cf = store.cf_handle(CF_DEDUP).unwrap();
            store.db().flush_cf(cf).unwrap();
            store.close();
        }
        // Reopened: the keys are in an SST file, its blocks not yet cached.
        let store = Store::open(dir.path(), SyncMode::Always, Duration::from_millis(5)).unwrap();
        let mut uncached = 0;
        for i in 0..2000u64 {
            match store
                .dedup_cached("room", "alice", &format!("id-{i}"))
                .unwrap()
            {
                Cached::Known(seq) => assert_eq!(seq, Some(i + 1), "id-{i}"),
                Cached::Uncached => uncached += 1,
            }
        }
        assert!(
            uncached > 0,
            "the first lookup of a cold block must not read it"
        );
        let mut from_memory = 0;
        for i in 0..1000u64 {
            let id = format!("absent-{i}");
            match store.dedup_cached("room", "alice", &id).unwrap() {
                Cached::Known(seq) => {
                    assert_eq!(seq, None, "{id}");
                    from_memory += 1;
                }
                Cached::Uncached => {}
            }
        }
        assert!(
            from_memory > 900,
            "the bloom filter answers most misses: {from_memory} of 1000"
        );
        assert_eq!(store.dedup("room", "alice", "id-1999").unwrap(), Some(2000));
    }

    #[tokio::test]
    async fn idempotency_keys_expire_after_their_window_and_old_ones_get_a_time() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), SyncMode::Never, Duration::from_millis(5)).unwrap();
        let mut b = Batch::new();
        b.put_dedup("room", "alice", "new", 1);
        b.ops.push(Op::Put {
            cf: CF_DEDUP,
            key: dedup_key("room", "alice", "old-format"),
            value: 2u64.to_be_bytes().to_vec(),
        });
        b.ops.push(Op::Put {
            cf: CF_DEDUP,
            key: dedup_key("room", "bob", "stale"),
            value: dedup_value(3, 1000),
        });
        store.write(b).await.unwrap();
        let page = store.dedup_page(None, 5000, 10).unwrap();
        assert_eq!(page.expired, vec![dedup_key("room", "bob", "stale")]);
        assert_eq!(
            page.unstamped,
            vec![(dedup_key("room", "alice", "old-format"), 2)]
        );
        assert!(page.next.is_none());
        let mut b = Batch::new();
        b.expire_dedup(&page, 9000);
        store.write(b).await.unwrap();
        assert_eq!(store.dedup("room", "bob", "stale").unwrap(), None);
        assert_eq!(store.dedup("room", "alice", "old-format").unwrap(), Some(2));
        assert_eq!(store.dedup("room", "alice", "new").unwrap(), Some(1));
        let later = store.dedup_page(None, 9001, 10).unwrap();
        assert_eq!(
            later.expired,
            vec![dedup_key("room", "alice", "old-format")],
            "a restamped key expires a window after its stamp; a fresh one does not"
        );
    }

    #[tokio::test]
    async fn the_log_pages_both_ways_and_membership_is_indexed_both_ways() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), SyncMode::Never, Duration::from_millis(5)).unwrap();
        let mut b = Batch::new();
        for seq in 1..=10u64 {
            b.put_message("room", seq, format!("m{seq}").as_bytes());
        }
        b.put_message("room2", 1, b"other");
        b.put_member("room", "alice", Role::Owner);
        b.put_member("room", "bob", Role::Member);
        b.put_dedup("room", "alice", "x1", 3);
        b.put_session("c1", &crate::SessionRecord::default());
        b.put_cursor("c1", "room", 7);
        b.put_read("bob", "room", 4);
        store.write(b).await.unwrap();

        let fwd = store.messages("room", 4, 11, 3, false).unwrap();
        assert_eq!(fwd.iter().map(|m| m.0).collect::<Vec<_>>(), [4, 5, 6]);
        let back = store.messages("room", 1, 9, 3, true).unwrap();
        assert_eq!(back.iter().map(|m| m.0).collect::<Vec<_>>(), [8, 7, 6]);
        assert_eq!(
            store
                .messages("room", 1, u64::MAX, 100, false)
                .unwrap()
                .len(),
            10
        );
        assert_eq!(store.all_members().unwrap().len(), 2);
        assert!(store.conversations().unwrap().is_empty());
        let mut b = Batch::new();
        let record = ConversationRecord {
            title: "t".into(),
            created_ms: 1,
            head: 10,
            first: 1,
        };
        b.put_conversation("room", &record);
        store.write(b).await.unwrap();
        assert_eq!(
            store.conversations().unwrap(),
            [("room".to_string(), record)]
        );
        assert_eq!(store.dedup("room", "alice", "x1").unwrap(), Some(3));
        assert_eq!(store.dedup("room", "bob", "x1").unwrap(), None);
        let cursors = |store: &Store| store.load_sessions().unwrap()[0].cursors.clone();
        assert_eq!(cursors(&store), [("room".to_string(), 7)]);
        assert_eq!(store.read_seq("bob", "room").unwrap(), 4);

        let mut b = Batch::new();
        b.delete_messages("room", 1, 5);
        b.delete_member("room", "bob");
        b.delete_cursors("c1");
        store.write(b).await.unwrap();
        assert_eq!(store.messages("room", 1, 100, 100, false).unwrap()[0].0, 5);
        assert_eq!(store.all_members().unwrap().len(), 1);
        assert!(cursors(&store).is_empty());
        store.close();
    }
}
