//! The sequencer: each conversation's state in memory (head seq, recent
//! idempotency keys), the lock that orders its appends, and the bounded
//! cache that holds those states. [`Chat::append`] gives a message its seq
//! and submits its writes; it never delivers (that is [`super::fanout`],
//! once the commit resolved).

use std::collections::{HashMap, VecDeque};
use std::ops::Deref;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use chatmq_storage::{Batch, Cached, Commit, ConversationRecord, Role, StorageError};
use rumqttc::v5::mqttbytes::QoS;
use serde_json::Value;

use super::fanout::Dispatch;
use super::{lock, namespace, Chat, Envelope};
use crate::blocking;
use crate::clock::now_ms;
use crate::message::Message;

/// Idempotency keys remembered in memory per conversation, on top of the
/// durable ones (covers retries that arrive before the original commits).
const RECENT_IDS: usize = 1024;

pub(super) struct ConvState {
    pub(super) record: ConversationRecord,
    recent: VecDeque<(Arc<str>, String)>,
    recent_seq: HashMap<(Arc<str>, String), u64>,
    /// Set by the dispatcher when a commit of this conversation failed:
    /// `record.head` and `recent` may then count messages that are not on
    /// disk, and the next append reloads them ([`Chat::reload`]).
    pub(super) failed: Arc<AtomicBool>,
    /// With `[cluster]`: the partition generation this state was read
    /// under on the owner (`replicated.rs`); another one means reload.
    pub(super) generation: u64,
}

/// A conversation's state in memory, with what its eviction must know.
/// Derefs to the per-conversation lock that orders appends.
pub(super) struct ConvSlot {
    pub(super) state: Arc<tokio::sync::Mutex<ConvState>>,
    /// The highest seq whose commit resolved (set by the dispatcher). The
    /// state leaves memory only when its head is durable: reloaded from
    /// disk, it must be the same head, or a seq would be given twice.
    pub(super) durable_head: AtomicU64,
    /// With `[cluster]`: the highest seq this node's copy has applied
    /// from the partition stream (`replicated.rs`).
    pub(super) applied: AtomicU64,
    /// Unix ms of the last use.
    used_ms: AtomicU64,
}

impl Deref for ConvSlot {
    type Target = tokio::sync::Mutex<ConvState>;
    fn deref(&self) -> &Self::Target {
        &self.state
    }
}

/// A conversation's state under its lock. It holds the slot too: a slot
/// someone holds is never evicted, so no second state of the same
/// conversation can be loaded while this one is in use.
pub(super) struct Locked {
    pub(super) guard: tokio::sync::OwnedMutexGuard<ConvState>,
    _slot: Arc<ConvSlot>,
}

impl Deref for Locked {
    type Target = ConvState;
    fn deref(&self) -> &ConvState {
        &self.guard
    }
}

impl std::ops::DerefMut for Locked {
    fn deref_mut(&mut self) -> &mut ConvState {
        &mut self.guard
    }
}

/// The bounds of the conversation cache (`chat.conv_cache_max`,
/// `chat.conv_idle_secs`).
pub(super) struct ConvCache {
    pub(super) max: usize,
    pub(super) idle_ms: u64,
    /// When idle entries were last swept, and how many entries were left:
    /// a sweep runs when the map has grown by a tenth of `max` since, or
    /// half the idle time has passed.
    pub(super) swept_ms: u64,
    pub(super) swept_len: usize,
}

impl Chat {
    pub(super) async fn conv_state(&self, conv: &str) -> Result<Arc<ConvSlot>, StorageError> {
        let now = now_ms();
        {
            let mut convs = lock(&self.convs);
            if let Some(s) = convs.get(conv).cloned() {
                s.used_ms.store(now, Ordering::Relaxed);
                self.evict_idle(&mut convs, now);
                return Ok(s);
            }
        }
        let name = conv.to_string();
        let stored = blocking::read(&self.store, move |s| s.conversation(&name)).await?;
        let record = stored.unwrap_or(ConversationRecord {
            title: String::new(),
            created_ms: now_ms(),
            head: 0,
            first: 1,
        });
        let state = Arc::new(ConvSlot {
            durable_head: AtomicU64::new(record.head),
            applied: AtomicU64::new(record.head),
            used_ms: AtomicU64::new(now),
            state: Arc::new(tokio::sync::Mutex::new(ConvState {
                record,
                recent: VecDeque::new(),
                recent_seq: HashMap::new(),
                failed: Arc::default(),
                generation: 0,
            })),
        });
        let mut convs = lock(&self.convs);
        let slot = convs.entry(conv.into()).or_insert(state).clone();
        self.evict_idle(&mut convs, now);
        Ok(slot)
    }

    /// Bounds the conversation cache: drops entries unused for
    /// `chat.conv_idle_secs`, and, above `chat.conv_cache_max`, the least
    /// recently used down to nine tenths of it. Only an entry nobody holds
    /// (no call in progress), whose lock is free and whose head is durable
    /// may go: reading it back from disk then gives the same state (the
    /// idempotency keys of its recent messages are in the `dedup` column
    /// family once durable).
    fn evict_idle(&self, convs: &mut HashMap<Arc<str>, Arc<ConvSlot>>, now: u64) {
        let mut cache = lock(&self.conv_cache);
        let grown = convs.len() > cache.swept_len.saturating_add(cache.max / 10);
        let over = convs.len() > cache.max;
        let stale = now.saturating_sub(cache.swept_ms) >= cache.idle_ms / 2;
        if !(stale || (over && grown)) {
            return;
        }
        let evictable = |slot: &Arc<ConvSlot>| {
            Arc::strong_count(slot) == 1
                && slot
                    .state
                    .try_lock()
                    .is_ok_and(|st| st.record.head <= slot.durable_head.load(Ordering::Acquire))
        };
        let before = convs.len();
        convs.retain(|_, slot| {
            now.saturating_sub(slot.used_ms.load(Ordering::Relaxed)) < cache.idle_ms
                || !evictable(slot)
        });
        if convs.len() > cache.max {
            let mut lru: Vec<(u64, Arc<str>)> = convs
                .iter()
                .filter(|(_, slot)| evictable(slot))
                .map(|(k, slot)| (slot.used_ms.load(Ordering::Relaxed), k.clone()))
                .collect();
            lru.sort_unstable();
            let target = cache.max - cache.max / 10;
            let excess = convs.len().saturating_sub(target);
            for (_, k) in lru.into_iter().take(excess) {
                convs.remove(&k);
            }
        }
        let evicted = before.saturating_sub(convs.len());
        self.metrics
            .conv_cache_evicted
            .fetch_add(evicted as u64, Ordering::Relaxed);
        cache.swept_ms = now;
        cache.swept_len = convs.len();
    }

    /// Conversations whose state is in memory now.
    pub fn cached_conversations(&self) -> usize {
        lock(&self.convs).len()
    }

    /// The head seq and oldest kept seq of a conversation.
    pub async fn bounds(&self, conv: &str) -> Result<(u64, u64), StorageError> {
        let s = self.locked(conv).await?;
        Ok((s.record.head, s.record.first))
    }

    /// The conversation's state under its lock, reloaded from disk first
    /// if one of its commits failed.
    pub(super) async fn locked(&self, conv: &str) -> Result<Locked, StorageError> {
        let slot = self.conv_state(conv).await?;
        let mut st = Locked {
            guard: slot.state.clone().lock_owned().await,
            _slot: slot,
        };
        if st.failed.load(Ordering::Acquire) {
            self.reload(conv, &mut st).await?;
        }
        Ok(st)
    }

    /// Appends a member's message. Returns the commit to acknowledge after
    /// (durable and fanned out) and the message's seq. A retry of an id
    /// already appended gets the original seq and appends nothing.
    pub async fn append(
        &self,
        conv: &str,
        from: &Arc<str>,
        envelope: &Envelope,
        qos: QoS,
    ) -> Result<(Commit, u64), StorageError> {
        if let Some(r) = self.replicated() {
            return self.append_replicated(&r, conv, from, envelope, qos).await;
        }
        let st = self.locked(conv).await?;
        let key = (from.clone(), envelope.id.clone());
        let (mut st, earlier) = self.earlier(conv, &key, st).await?;
        if let Some(seq) = earlier {
            // Acknowledged no earlier than the original.
            let (done, commit) = Commit::deferred();
            let _ = self.shard(conv).send(Dispatch::Barrier(done)).await;
            return Ok((commit, seq));
        }
        let seq = st.record.head + 1;
        st.record.head = seq;
        let ts = now_ms();
        let body = envelope.delivered(conv, seq, from, ts);
        let mut batch = Batch::new();
        batch.put_message(conv, seq, &body);
        batch.put_conversation(conv, &st.record);
        batch.put_dedup(conv, from, &envelope.id, seq);
        // Checked by the caller (`Chat::check_attachments`); kept with the
        // message, dropped with it.
        for id in super::attachments::referenced_ids(&envelope.body).unwrap_or_default() {
            batch.put_attachment_ref(conv, seq, &id);
        }
        if seq == 1 {
            if let Some((a, b)) = namespace::direct_members(conv) {
                // A direct conversation appears in both users' lists.
                batch.put_member(conv, a, Role::Member);
                batch.put_member(conv, b, Role::Member);
                {
                    let mut m = self.members_write();
                    m.add(conv, a, Role::Member);
                    m.add(conv, b, Role::Member);
                }
                self.join(conv, a, 0);
                self.join(conv, b, 0);
            }
        }
        self.queue_pushes(conv, from, seq, &envelope.body, &mut batch);
        Self::remember(&mut st, key, seq);
        self.submit_and_dispatch(conv, &st, seq, ts, body, qos, batch)
            .await
    }

    /// The seq an earlier append of `key` (sender, envelope id) got, if
    /// any: the recent ids in memory, then the store's keys (from memory,
    /// else read on the blocking pool without the conversation's lock).
    pub(super) async fn earlier(
        &self,
        conv: &str,
        key: &(Arc<str>, String),
        mut st: Locked,
    ) -> Result<(Locked, Option<u64>), StorageError> {
        let (from, id) = (&key.0, &key.1);
        loop {
            if let Some(seq) = st.recent_seq.get(key) {
                let seq = *seq;
                return Ok((st, Some(seq)));
            }
            match self.store.dedup_cached(conv, from, id)? {
                Cached::Known(seq) => return Ok((st, seq)),
                Cached::Uncached => {}
            }
            // Only the disk can tell (a bloom filter's false positive, or
            // the key's block not cached): read it on the blocking pool,
            // without the conversation's lock.
            let head = st.record.head;
            drop(st);
            self.metrics
                .chat_dedup_disk_reads
                .fetch_add(1, Ordering::Relaxed);
            let (c, f, i) = (conv.to_string(), from.to_string(), id.clone());
            let stored = blocking::read(&self.store, move |s| s.dedup(&c, &f, &i)).await?;
            st = self.locked(conv).await?;
            // What was appended meanwhile is among the recent ids, unless
            // so much was that some left them: then look again.
            let since = st.record.head.saturating_sub(head);
            if since < RECENT_IDS as u64 {
                let seq = st.recent_seq.get(key).copied().or(stored);
                return Ok((st, seq));
            }
        }
    }

    /// Remembers that `key` got `seq` (the recent ids, bounded).
    pub(super) fn remember(st: &mut ConvState, key: (Arc<str>, String), seq: u64) {
        st.recent.push_back(key.clone());
        st.recent_seq.insert(key, seq);
        if st.recent.len() > RECENT_IDS {
            if let Some(old) = st.recent.pop_front() {
                st.recent_seq.remove(&old);
            }
        }
    }

    /// Resolves once everything appended to `conv` before is durable and
    /// out (what a read of the log then finds includes it).
    pub(super) async fn settled(&self, conv: &str) -> Result<(), StorageError> {
        let (done, settled) = Commit::deferred();
        if self
            .shard(conv)
            .send(Dispatch::Barrier(done))
            .await
            .is_err()
        {
            return Err(StorageError::WriterGone);
        }
        settled.await
    }

    /// Appends a record the server makes (an edit or delete event) under
    /// the conversation's lock `st`: the next seq, `make(seq, ts, batch)`
    /// gives its envelope and adds the writes that go with it, and it is
    /// fanned out once durable, in seq order with the members' messages.
    pub(super) async fn append_event(
        &self,
        conv: &str,
        st: &mut Locked,
        make: impl FnOnce(u64, u64, &mut Batch) -> Vec<u8>,
    ) -> Result<(Commit, u64), StorageError> {
        let seq = st.record.head + 1;
        st.record.head = seq;
        let ts = now_ms();
        let mut batch = Batch::new();
        let body = make(seq, ts, &mut batch);
        batch.put_message(conv, seq, &body);
        batch.put_conversation(conv, &st.record);
        self.submit_and_dispatch(conv, st, seq, ts, body, QoS::AtLeastOnce, batch)
            .await
    }

    /// The end of every append: `batch` (the record at `seq`) goes to the
    /// writer, and the record to its dispatcher shard, which fans it out
    /// once durable, in seq order. Returns the commit to acknowledge after
    /// (durable and fanned out) and the seq.
    #[allow(clippy::too_many_arguments)]
    pub(super) async fn submit_and_dispatch(
        &self,
        conv: &str,
        st: &Locked,
        seq: u64,
        ts: u64,
        body: Vec<u8>,
        qos: QoS,
        batch: Batch,
    ) -> Result<(Commit, u64), StorageError> {
        let commit = self.store.submit(batch).await;
        self.metrics.chat_appended.fetch_add(1, Ordering::Relaxed);
        self.retention_due(conv, &st.record, ts);
        let msg = Arc::new(Message::from_server(
            format!("chat/{conv}"),
            Bytes::from(body),
            qos,
            false,
        ));
        let (done, acked) = Commit::deferred();
        let item = Dispatch::Message {
            conv: conv.into(),
            seq,
            msg,
            commit,
            done,
            failed: st.failed.clone(),
        };
        if self.shard(conv).send(item).await.is_err() {
            return Err(StorageError::WriterGone);
        }
        Ok((acked, seq))
    }

    /// After a failed commit: waits until every append submitted before
    /// has settled, then takes the head and the idempotency keys from disk
    /// again, so a retry of the lost message is appended anew (not acked
    /// as a duplicate of nothing) and gets the seq that was lost (no hole).
    /// Called under the conversation's lock, so no append runs meanwhile.
    pub(super) async fn reload(&self, conv: &str, st: &mut ConvState) -> Result<(), StorageError> {
        let (done, settled) = Commit::deferred();
        if self
            .shard(conv)
            .send(Dispatch::Barrier(done))
            .await
            .is_err()
        {
            return Err(StorageError::WriterGone);
        }
        // Its outcome does not matter, only that everything before it is done.
        let _ = settled.await;
        let name = conv.to_string();
        let stored = blocking::read(&self.store, move |s| s.conversation(&name)).await?;
        st.record = stored.unwrap_or(ConversationRecord {
            head: 0,
            first: 1,
            ..st.record.clone()
        });
        st.recent.clear();
        st.recent_seq.clear();
        st.failed = Arc::default();
        Ok(())
    }

    /// DESIGN §3 step 8: every member but the sender with no live session
    /// gets a push job, written in the message's own batch, so the job is
    /// durable exactly when the message is. Who is online is judged now, at
    /// append time (the dispatcher's fan-out follows within a commit).
    pub(super) fn queue_pushes(
        &self,
        conv: &str,
        from: &str,
        seq: u64,
        body: &Value,
        batch: &mut Batch,
    ) {
        if !self.push.enabled() {
            return;
        }
        let members = self.members(conv);
        let offline: Vec<&str> = {
            let online = lock(&self.online);
            members
                .iter()
                .filter(|u| ***u != *from && !online.contains_key(*u) && !self.online_elsewhere(u))
                .map(|u| &**u)
                .collect()
        };
        self.push.enqueue(batch, offline, conv, seq, from, body);
    }
}

#[cfg(test)]
pub(super) mod tests {
    use std::time::Duration;

    use chatmq_bridge::push::Push;
    use chatmq_storage::{Store, SyncMode};

    use super::*;
    use crate::broker::Metrics;

    pub(in crate::chat) fn envelope(id: &str) -> Envelope {
        Envelope::parse(format!(r#"{{"id":"{id}","body":"hi"}}"#).as_bytes()).expect("envelope")
    }

    /// A chat layer on a store in `path`, its dispatcher running until the
    /// returned sender is dropped.
    fn running_chat(
        path: &std::path::Path,
        sync: SyncMode,
    ) -> (Store, Arc<Chat>, tokio::sync::watch::Sender<bool>) {
        let store = Store::open(path, sync, Duration::from_millis(5)).expect("store");
        let push = Push::open(store.clone(), &Default::default()).expect("push");
        let chat =
            Arc::new(Chat::new(store.clone(), Arc::new(Metrics::default()), push).expect("chat"));
        let (stop, watch) = tokio::sync::watch::channel(false);
        tokio::spawn(chat.clone().run_dispatcher(watch));
        (store, chat, stop)
    }

    /// alice's message `id` in "room": its seq and its commit's outcome.
    async fn send(chat: &Chat, id: &str) -> (u64, Result<(), StorageError>) {
        let (commit, seq) = chat
            .append("room", &"alice".into(), &envelope(id), QoS::AtLeastOnce)
            .await
            .expect("appended");
        (seq, commit.await)
    }

    // Issue #11 item 3: the idempotency lookup reads no disk on an async
    // worker. After a restart whose keys are only in table files (no
    // memtable, a cold block cache), a retried envelope id is found by the
    // read on the blocking pool and keeps its seq; a new id gets the next.
    #[tokio::test]
    async fn a_retry_found_only_on_disk_keeps_its_seq() {
        let dir = tempfile::tempdir().expect("temp dir");
        let copy = tempfile::tempdir().expect("temp dir");
        let open = |path: &std::path::Path| running_chat(path, SyncMode::Always);
        let sent = |chat: Arc<Chat>, id: &'static str| async move {
            let (seq, acked) = send(&chat, id).await;
            assert!(acked.is_ok(), "{id} committed");
            seq
        };
        {
            let (store, chat, _stop) = open(dir.path());
            chat.create("room", "t", Some("alice"), &[])
                .await
                .expect("room");
            assert_eq!(sent(chat.clone(), "m1").await, 1);
            assert_eq!(sent(chat.clone(), "m2").await, 2);
            let s = store.clone();
            tokio::task::spawn_blocking(move || s.flush_memtables())
                .await
                .expect("joined")
                .expect("flushed");
            // The stopped database, copied as a backup would be: the
            // original stays locked while this process holds it.
            tokio::task::spawn_blocking(move || store.close())
                .await
                .expect("closed");
            for f in std::fs::read_dir(dir.path()).expect("listed") {
                let f = f.expect("entry");
                if f.file_name() != "LOCK" {
                    std::fs::copy(f.path(), copy.path().join(f.file_name())).expect("copied");
                }
            }
            drop(chat);
        }
        let (_store, chat, _stop) = open(copy.path());
        assert_eq!(sent(chat.clone(), "m1").await, 1, "a retry keeps its seq");
        assert!(
            chat.metrics.chat_dedup_disk_reads.load(Ordering::Relaxed) >= 1,
            "the key was only on disk: read on the blocking pool"
        );
        assert_eq!(
            sent(chat.clone(), "m3").await,
            3,
            "a new id gets the next seq"
        );
        assert_eq!(sent(chat.clone(), "m2").await, 2, "another retry");
    }

    // Issue #10 item 7: a commit of an append fails (here: the writer is
    // gone, as on a failing disk). A retry of the same envelope id must not
    // be acknowledged as a duplicate of a message that is not on disk, and
    // the next message must not leave a hole where the lost one was.
    #[tokio::test]
    async fn a_failed_commit_rolls_the_conversation_back() {
        let dir = tempfile::tempdir().expect("temp dir");
        let (store, chat, _stop) = running_chat(dir.path(), SyncMode::Never);
        chat.create("room", "t", Some("alice"), &[])
            .await
            .expect("room");
        let send = |id: &'static str| send(&chat, id);
        let (seq, acked) = send("m1").await;
        assert_eq!((seq, acked.is_ok()), (1, true));

        tokio::task::spawn_blocking(move || store.close())
            .await
            .expect("writer stops");
        let (seq, acked) = send("m2").await;
        assert_eq!(seq, 2);
        assert!(acked.is_err(), "m2 is not on disk");

        let (seq, acked) = send("m2").await;
        assert!(
            acked.is_err(),
            "the retry of m2 was acknowledged with nothing on disk"
        );
        assert_eq!(seq, 2);
        let (seq, _) = send("m3").await;
        assert_eq!(seq, 2, "the head counted the lost message: a hole at 2");
        assert_eq!(chat.bounds("room").await.expect("bounds").0, 1);
    }
}
