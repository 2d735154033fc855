//! Retention (`[chat] retention_max_messages`, `retention_max_age_secs`):
//! a background task drops the oldest messages of each conversation and
//! raises its `first` seq. It never touches the newest messages' order or
//! seqs: the log keeps its numbering, history starts at `first`, and a
//! session that comes back having missed trimmed messages gets a `gap`
//! event from [`Chat::catch_up`].
//!
//! The task never walks every conversation after start-up. It keeps
//! [`Deadlines`], when each conversation next has something to drop, and
//! sleeps until the earliest: one pass over the stored conversations seeds
//! them, then each append feeds them ([`Chat::retention_due`]): a
//! conversation past the message limit is due at once, and one whose
//! oldest kept message is new is due `max_age` after that message's `ts`.
//! A trim reschedules its conversation from the new oldest message.

use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::Duration;

use chatmq_storage::{Batch, ConversationRecord, StorageError, Store};
use serde_json::Value;
use tokio::sync::{watch, Notify};

use super::Chat;
use crate::clock::now_ms;
use crate::deadlines::{wait_for, Deadlines};

/// The least time between two passes, so that a busy conversation at its
/// message limit is trimmed once for what that time brought, not once
/// (one range delete) per message.
const MIN_GAP: Duration = Duration::from_secs(2);
/// How soon a conversation whose trim failed is tried again.
const RETRY_MS: u64 = 2_000;
/// Messages read per step while looking for the first one young enough.
const SCAN_PAGE: usize = 256;

/// What each conversation keeps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Policy {
    /// The newest this many messages; 0 = no limit.
    pub max_messages: u64,
    /// Messages at most this old; 0 = no limit.
    pub max_age_ms: u64,
}

impl Policy {
    /// The policy `[chat]` configures, or `None` when it keeps everything.
    pub fn from_settings(chat: &chatmq_config::Chat) -> Option<Policy> {
        let policy = Policy {
            max_messages: chat.retention_max_messages,
            max_age_ms: chat.retention_max_age_secs.saturating_mul(1000),
        };
        (policy.max_messages > 0 || policy.max_age_ms > 0).then_some(policy)
    }

    /// The lowest seq the message limit keeps when the head is `head`.
    fn count_floor(&self, head: u64) -> u64 {
        if self.max_messages == 0 {
            return 0;
        }
        head.saturating_add(1).saturating_sub(self.max_messages)
    }

    /// Messages stamped before this are too old (`None`: no age limit).
    fn age_cutoff(&self, now_ms: u64) -> Option<u64> {
        (self.max_age_ms > 0).then(|| now_ms.saturating_sub(self.max_age_ms))
    }

    /// When a conversation whose oldest kept message was stamped `ts` is
    /// due for the age limit: the first ms that message is older than the
    /// limit (`None`: no age limit).
    fn age_deadline(&self, ts: u64) -> Option<u64> {
        (self.max_age_ms > 0).then(|| ts.saturating_add(self.max_age_ms).saturating_add(1))
    }
}

/// What [`Chat`] holds for retention: the policy once the task runs (until
/// then appends schedule nothing) and the deadlines.
#[derive(Default)]
pub(super) struct Retention {
    policy: OnceLock<Policy>,
    deadlines: Mutex<Deadlines>,
    /// Woken when a deadline earlier than every other is set.
    wake: Notify,
}

impl Retention {
    fn deadlines(&self) -> MutexGuard<'_, Deadlines> {
        self.deadlines.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Trims conversations as they fall due until the broker stops.
pub async fn run(chat: Arc<Chat>, policy: Policy, mut shutdown: watch::Receiver<bool>) {
    while let Err(e) = start(&chat, policy).await {
        tracing::warn!(error = %e, "retention could not read the conversations; retrying");
        tokio::select! {
            _ = shutdown.changed() => return,
            _ = tokio::time::sleep(Duration::from_millis(RETRY_MS)) => {}
        }
    }
    loop {
        if pass(&chat, &policy, now_ms()).await > 0 {
            tokio::select! {
                _ = shutdown.changed() => return,
                _ = tokio::time::sleep(MIN_GAP) => {}
            }
        }
        let next = chat.retention.deadlines().next();
        if !wait_for(next, &chat.retention.wake, &mut shutdown).await {
            return;
        }
    }
}

/// Turns retention on for `chat` (appends schedule from now on), then
/// seeds the deadlines with one pass over the stored conversations.
async fn start(chat: &Chat, policy: Policy) -> Result<(), StorageError> {
    let _ = chat.retention.policy.set(policy);
    let store = chat.store.clone();
    let now = now_ms();
    let due = tokio::task::spawn_blocking(move || {
        let mut due = Vec::new();
        for (conv, record) in store.conversations()? {
            let kept = (record.head, record.first);
            if let Some(at) = deadline(&store, &conv, kept, &policy, now)? {
                due.push((conv, at));
            }
        }
        Ok::<_, StorageError>(due)
    })
    .await
    .map_err(|_| StorageError::WriterGone)??;
    for (conv, at) in due {
        chat.schedule(&conv, at);
    }
    Ok(())
}

/// Trims every conversation due at `now` and reschedules it. Returns how
/// many conversations it looked at: only those due.
async fn pass(chat: &Chat, policy: &Policy, now: u64) -> usize {
    let due = chat.retention.deadlines().take_due(now);
    for conv in &due {
        let next = match chat.trim(conv, policy, now).await {
            Ok(_) => chat.next_deadline(conv, policy, now).await,
            Err(e) => Err(e),
        };
        match next {
            Ok(Some(at)) => chat.schedule(conv, at),
            Ok(None) => {}
            Err(e) => {
                tracing::warn!(error = %e, conv = %conv, "retention trim failed; retrying");
                chat.schedule(conv, now.saturating_add(RETRY_MS));
            }
        }
    }
    due.len()
}

/// When `conv`, with seqs `first..=head` kept, next has something to drop
/// at time `now`: now if it holds more messages than the limit, else
/// `max_age` after its oldest message's `ts`; `None` if nothing it holds
/// will ever be dropped without another append. Reads one message:
/// blocking.
fn deadline(
    store: &Store,
    conv: &str,
    (head, first): (u64, u64),
    policy: &Policy,
    now: u64,
) -> Result<Option<u64>, StorageError> {
    if first > head {
        return Ok(None);
    }
    if policy.count_floor(head) > first {
        return Ok(Some(now));
    }
    if policy.max_age_ms == 0 {
        return Ok(None);
    }
    let oldest = store.messages(conv, first, u64::MAX, 1, false)?;
    // A message without a `ts` is never too old, nor is anything after it.
    Ok(oldest
        .first()
        .and_then(|(_, body)| stamp(body))
        .and_then(|ts| policy.age_deadline(ts)))
}

/// The first seq from `from` on whose message is stamped at or after
/// `cutoff` (one past the last message read when all are older).
async fn first_young(chat: &Chat, conv: &str, from: u64, cutoff: u64) -> Result<u64, StorageError> {
    let store = chat.store.clone();
    let conv = conv.to_string();
    tokio::task::spawn_blocking(move || {
        let mut next = from;
        loop {
            let page = store.messages(&conv, next, u64::MAX, SCAN_PAGE, false)?;
            let full = page.len() == SCAN_PAGE;
            for (seq, body) in page {
                if stamp(&body).is_none_or(|ts| ts >= cutoff) {
                    return Ok(seq);
                }
                next = seq.saturating_add(1);
            }
            if !full {
                return Ok(next);
            }
        }
    })
    .await
    .map_err(|_| StorageError::WriterGone)?
}

/// The `ts` of a stored envelope.
fn stamp(body: &[u8]) -> Option<u64> {
    serde_json::from_slice::<Value>(body)
        .ok()?
        .get("ts")?
        .as_u64()
}

impl Chat {
    /// Drops the messages of `conv` that `policy` no longer keeps at time
    /// `now` (unix ms) and raises the conversation's `first`. Returns how
    /// many seqs were dropped.
    pub async fn trim(&self, conv: &str, policy: &Policy, now: u64) -> Result<u64, StorageError> {
        let (head, first) = self.bounds(conv).await?;
        let mut keep_from = policy.count_floor(head).max(first);
        if let Some(cutoff) = policy.age_cutoff(now) {
            // Read outside the lock; messages appended meanwhile are newer.
            keep_from = first_young(self, conv, keep_from, cutoff).await?;
        }
        let state = self.conv_state(conv).await?;
        let mut st = state.lock().await;
        let first = st.record.first;
        let keep_from = keep_from.min(st.record.head.saturating_add(1));
        if keep_from <= first {
            return Ok(0);
        }
        st.record.first = keep_from;
        let mut batch = Batch::new();
        batch.delete_messages(conv, first, keep_from);
        batch.put_conversation(conv, &st.record);
        // Submitted under the lock so that it lands in order with appends,
        // which write the record too; waited for outside it.
        let commit = self.store.submit(batch).await;
        drop(st);
        commit.await?;
        self.replay.trimmed(conv, keep_from);
        Ok(keep_from - first)
    }

    /// The retention hook of [`Chat::append`], called under the
    /// conversation's lock with the record it wrote and the new message's
    /// `ts`: schedules the conversation when the message gave it something
    /// to drop (one message too many, or a first kept message that will
    /// age). Any older message already has the conversation scheduled.
    pub(super) fn retention_due(&self, conv: &str, record: &ConversationRecord, ts: u64) {
        let Some(policy) = self.retention.policy.get() else {
            return;
        };
        if policy.count_floor(record.head) > record.first {
            self.schedule(conv, ts);
        } else if record.first == record.head {
            if let Some(at) = policy.age_deadline(ts) {
                self.schedule(conv, at);
            }
        }
    }

    /// Makes `conv` due at `at` at the latest, waking the task if that is
    /// sooner than it meant to wake.
    fn schedule(&self, conv: &str, at: u64) {
        if self.retention.deadlines().due_by(conv, at) {
            self.retention.wake.notify_one();
        }
    }

    /// When `conv` next has something to drop, from its state now.
    async fn next_deadline(
        &self,
        conv: &str,
        policy: &Policy,
        now: u64,
    ) -> Result<Option<u64>, StorageError> {
        let kept = self.bounds(conv).await?;
        let (store, conv, policy) = (self.store.clone(), conv.to_string(), *policy);
        tokio::task::spawn_blocking(move || deadline(&store, &conv, kept, &policy, now))
            .await
            .map_err(|_| StorageError::WriterGone)?
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::broker::Metrics;
    use crate::chat::Envelope;
    use chatmq_storage::{Store, SyncMode};
    use rumqttc::v5::mqttbytes::QoS;

    #[test]
    fn the_policy_comes_from_the_chat_section() {
        let mut c = chatmq_config::Chat::default();
        assert_eq!(
            Policy::from_settings(&c),
            None,
            "keeps everything by default"
        );
        c.retention_max_messages = 5;
        c.retention_max_age_secs = 2;
        let p = Policy::from_settings(&c).unwrap();
        assert_eq!(
            p,
            Policy {
                max_messages: 5,
                max_age_ms: 2000
            }
        );
        assert_eq!(p.count_floor(12), 8, "12 messages, the newest 5 are 8..=12");
        assert_eq!(p.count_floor(5), 1);
        assert_eq!(p.count_floor(3), 0, "nothing to drop");
        assert_eq!(p.age_cutoff(10_000), Some(8000));
        let unlimited = Policy {
            max_messages: 0,
            max_age_ms: 0,
        };
        assert_eq!(unlimited.count_floor(100), 0);
        assert_eq!(unlimited.age_cutoff(100), None);
    }

    /// A chat with `messages` in "room" and its dispatcher running while
    /// the returned sender lives.
    async fn chat_with(dir: &std::path::Path, messages: u64) -> (Arc<Chat>, watch::Sender<bool>) {
        let store = Store::open(dir, SyncMode::Never, Duration::from_millis(5)).unwrap();
        let push = chatmq_bridge::push::Push::open(store.clone(), &Default::default()).unwrap();
        let chat = Arc::new(Chat::new(store, Arc::new(Metrics::default()), push).unwrap());
        let (stop, watch) = watch::channel(false);
        tokio::spawn(chat.clone().run_dispatcher(watch));
        chat.create("room", "t", Some("alice"), &[]).await.unwrap();
        let alice: Arc<str> = "alice".into();
        for i in 1..=messages {
            let e = Envelope::parse(format!(r#"{{"id":"m{i}","body":{i}}}"#).as_bytes()).unwrap();
            let (commit, seq) = chat
                .append("room", &alice, &e, QoS::AtLeastOnce)
                .await
                .unwrap();
            assert_eq!(seq, i);
            commit.await.unwrap();
        }
        (chat, stop)
    }

    fn seqs(history: &Value) -> Vec<u64> {
        history["messages"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m["seq"].as_u64().unwrap())
            .collect()
    }

    #[tokio::test]
    async fn the_message_limit_keeps_the_newest() {
        let dir = tempfile::tempdir().unwrap();
        let (chat, _dispatching) = chat_with(dir.path(), 12).await;
        let policy = Policy {
            max_messages: 5,
            max_age_ms: 0,
        };
        // A catch-up read the page before the trim; after it, the shared
        // page serves only what is kept.
        let room: Arc<str> = "room".into();
        let before = chat.replay.read(&chat.store, &room, 1, 12).await.unwrap();
        assert_eq!(before.entries.len(), 12);
        assert_eq!(chat.trim("room", &policy, now_ms()).await.unwrap(), 7);
        let after = chat.replay.read(&chat.store, &room, 1, 12).await.unwrap();
        assert!(after.shared, "the kept part is still shared");
        let kept: Vec<u64> = after.entries.iter().map(|(s, _)| *s).collect();
        assert_eq!(kept, [8, 9, 10, 11, 12]);
        assert_eq!(
            chat.trim("room", &policy, now_ms()).await.unwrap(),
            0,
            "idempotent"
        );
        assert_eq!(chat.bounds("room").await.unwrap(), (12, 8));
        let h = chat
            .history("room", Some(0), None, 100, None)
            .await
            .unwrap();
        assert_eq!(seqs(&h), [8, 9, 10, 11, 12], "the log itself is trimmed");
        let h = chat.history("room", None, None, 100, None).await.unwrap();
        assert_eq!(seqs(&h), [8, 9, 10, 11, 12]);
        assert_eq!(h["first"], 8);
        // The record on disk says so too (a restart keeps the trim).
        let stored = chat.store.conversation("room").unwrap().unwrap();
        assert_eq!((stored.head, stored.first), (12, 8));
        // New messages keep their numbering.
        let e = Envelope::parse(br#"{"id":"m13","body":13}"#).unwrap();
        let (_, seq) = chat
            .append("room", &"alice".into(), &e, QoS::AtLeastOnce)
            .await
            .unwrap();
        assert_eq!(seq, 13);
    }

    #[tokio::test]
    async fn the_age_limit_drops_what_is_older() {
        let dir = tempfile::tempdir().unwrap();
        let (chat, _dispatching) = chat_with(dir.path(), 3).await;
        let policy = Policy {
            max_messages: 0,
            max_age_ms: 60_000,
        };
        let (_, record) = chat.store.conversations().unwrap().remove(0);
        let kept = (record.head, record.first);
        let due = deadline(&chat.store, "room", kept, &policy, now_ms()).unwrap();
        let oldest = chat.store.messages("room", 1, 2, 1, false).unwrap();
        let ts = stamp(&oldest[0].1).unwrap();
        assert_eq!(
            due,
            Some(ts + 60_001),
            "due once the oldest is over a minute old"
        );
        assert_eq!(
            chat.trim("room", &policy, now_ms()).await.unwrap(),
            0,
            "all are young"
        );
        // A minute and more later, all three are too old: the conversation
        // is empty but keeps its head.
        let later = now_ms() + 120_000;
        assert_eq!(chat.trim("room", &policy, later).await.unwrap(), 3);
        assert_eq!(chat.bounds("room").await.unwrap(), (3, 4));
        let h = chat.history("room", None, None, 100, None).await.unwrap();
        assert!(seqs(&h).is_empty());
        assert_eq!(h["head"], 3);
        assert_eq!(
            deadline(&chat.store, "room", (3, 4), &policy, later).unwrap(),
            None,
            "an empty conversation is not due until its next message"
        );
    }

    /// Appends `n` new messages from alice to `conv`, each committed.
    async fn send(chat: &Chat, conv: &str, n: u64) {
        let alice: Arc<str> = "alice".into();
        for _ in 0..n {
            let (head, _) = chat.bounds(conv).await.unwrap();
            let id = format!("{conv}-{}", head + 1);
            let e = Envelope::parse(format!(r#"{{"id":"{id}","body":1}}"#).as_bytes()).unwrap();
            let (commit, _) = chat
                .append(conv, &alice, &e, QoS::AtLeastOnce)
                .await
                .unwrap();
            commit.await.unwrap();
        }
    }

    #[tokio::test]
    async fn a_pass_trims_the_conversations_due_and_looks_at_no_other() {
        let dir = tempfile::tempdir().unwrap();
        // "room" has 12 messages before retention starts: the seed pass
        // finds it past the limit.
        let (chat, _dispatching) = chat_with(dir.path(), 12).await;
        let hour = 3_600_000;
        let policy = Policy {
            max_messages: 5,
            max_age_ms: hour,
        };
        start(&chat, policy).await.unwrap();
        let quiet: Vec<String> = (0..20).map(|i| format!("quiet{i}")).collect();
        for conv in &quiet {
            chat.create(conv, "t", Some("alice"), &[]).await.unwrap();
            send(&chat, conv, 2).await;
        }
        let now = now_ms();
        assert_eq!(
            chat.retention.deadlines().len(),
            21,
            "every conversation with messages has a deadline"
        );
        assert_eq!(pass(&chat, &policy, now).await, 1, "only room was due");
        assert_eq!(chat.bounds("room").await.unwrap(), (12, 8));
        assert_eq!(chat.bounds("quiet0").await.unwrap(), (2, 1));
        assert!(
            chat.retention.deadlines().next() > Some(now),
            "room is rescheduled for its new oldest message, an hour on"
        );
        assert_eq!(pass(&chat, &policy, now).await, 0, "nothing else is due");

        // An append past the limit makes its conversation due at once.
        send(&chat, "quiet3", 4).await;
        let next = chat.retention.deadlines().next();
        assert!(next <= Some(now_ms()), "{next:?}");
        assert_eq!(pass(&chat, &policy, now_ms()).await, 1);
        assert_eq!(chat.bounds("quiet3").await.unwrap(), (6, 2));

        // Two hours on, every message is too old: all are due, and trimmed.
        let later = now + 2 * hour;
        assert_eq!(pass(&chat, &policy, later).await, 21);
        assert_eq!(chat.bounds("room").await.unwrap(), (12, 13));
        assert_eq!(chat.bounds("quiet3").await.unwrap(), (6, 7));
        assert_eq!(
            chat.retention.deadlines().len(),
            0,
            "empty ones wait for a message"
        );
        send(&chat, "quiet0", 1).await;
        assert_eq!(chat.retention.deadlines().len(), 1);
    }
}
