//! Retention (`[chat] retention_max_messages`, `retention_max_age_secs`):
//! a background task drops the oldest messages of each conversation and
//! raises its `first` seq. It never touches the newest messages' order or
//! seqs: the log keeps its numbering, history starts at `first`, and a
//! session that comes back having missed trimmed messages gets a `gap`
//! event from [`Chat::catch_up`].

use std::sync::Arc;
use std::time::Duration;

use chatmq_storage::{Batch, ConversationRecord, StorageError};
use serde_json::Value;
use tokio::sync::watch;

use super::Chat;
use crate::clock::now_ms;

/// How often the conversations are checked.
const PERIOD: Duration = Duration::from_secs(2);
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
        (head + 1).saturating_sub(self.max_messages)
    }

    /// Messages stamped before this are too old (`None`: no age limit).
    fn age_cutoff(&self, now_ms: u64) -> Option<u64> {
        (self.max_age_ms > 0).then(|| now_ms.saturating_sub(self.max_age_ms))
    }
}

/// Trims every conversation every [`PERIOD`] until the broker stops.
pub async fn run(chat: Arc<Chat>, policy: Policy, mut shutdown: watch::Receiver<bool>) {
    let mut tick = tokio::time::interval(PERIOD);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.changed() => return,
            _ = tick.tick() => {
                if let Err(e) = sweep(&chat, &policy).await {
                    tracing::warn!(error = %e, "retention sweep failed; retrying next period");
                }
            }
        }
    }
}

/// One pass over every conversation.
async fn sweep(chat: &Chat, policy: &Policy) -> Result<(), StorageError> {
    let store = chat.store.clone();
    let records = tokio::task::spawn_blocking(move || store.conversations())
        .await
        .map_err(|_| StorageError::WriterGone)??;
    for (conv, record) in records {
        if might_trim(chat, &conv, &record, policy, now_ms()).await? {
            chat.trim(&conv, policy, now_ms()).await?;
        }
    }
    Ok(())
}

/// A cheap look at the stored record (and the oldest message), so that
/// conversations with nothing to drop are not loaded into memory.
async fn might_trim(
    chat: &Chat,
    conv: &str,
    record: &ConversationRecord,
    policy: &Policy,
    now: u64,
) -> Result<bool, StorageError> {
    if record.first > record.head {
        return Ok(false);
    }
    if policy.count_floor(record.head) > record.first {
        return Ok(true);
    }
    let Some(cutoff) = policy.age_cutoff(now) else {
        return Ok(false);
    };
    let oldest = first_young(chat, conv, record.first, cutoff, 1).await?;
    Ok(oldest > record.first)
}

/// The first seq from `from` on whose message is stamped at or after
/// `cutoff` (one past the last message read when all are older), reading
/// at most `max_pages` pages.
async fn first_young(
    chat: &Chat,
    conv: &str,
    from: u64,
    cutoff: u64,
    max_pages: usize,
) -> Result<u64, StorageError> {
    let store = chat.store.clone();
    let conv = conv.to_string();
    tokio::task::spawn_blocking(move || {
        let mut next = from;
        for _ in 0..max_pages {
            let page = store.messages(&conv, next, u64::MAX, SCAN_PAGE, false)?;
            let full = page.len() == SCAN_PAGE;
            for (seq, body) in page {
                if stamp(&body).is_none_or(|ts| ts >= cutoff) {
                    return Ok(seq);
                }
                next = seq + 1;
            }
            if !full {
                break;
            }
        }
        Ok(next)
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
            keep_from = first_young(self, conv, keep_from, cutoff, usize::MAX).await?;
        }
        let state = self.conv_state(conv).await?;
        let mut st = state.lock().await;
        let first = st.record.first;
        let keep_from = keep_from.min(st.record.head + 1);
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
        Ok(keep_from - first)
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
        assert_eq!(chat.trim("room", &policy, now_ms()).await.unwrap(), 7);
        assert_eq!(
            chat.trim("room", &policy, now_ms()).await.unwrap(),
            0,
            "idempotent"
        );
        assert_eq!(chat.bounds("room").await.unwrap(), (12, 8));
        let h = chat.history("room", Some(0), None, 100).await.unwrap();
        assert_eq!(seqs(&h), [8, 9, 10, 11, 12], "the log itself is trimmed");
        let h = chat.history("room", None, None, 100).await.unwrap();
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
        assert!(!might_trim(&chat, "room", &record, &policy, now_ms())
            .await
            .unwrap());
        assert_eq!(
            chat.trim("room", &policy, now_ms()).await.unwrap(),
            0,
            "all are young"
        );
        // A minute and more later, all three are too old: the conversation
        // is empty but keeps its head.
        let later = now_ms() + 120_000;
        assert!(might_trim(&chat, "room", &record, &policy, later)
            .await
            .unwrap());
        assert_eq!(chat.trim("room", &policy, later).await.unwrap(), 3);
        assert_eq!(chat.bounds("room").await.unwrap(), (3, 4));
        let h = chat.history("room", None, None, 100).await.unwrap();
        assert!(seqs(&h).is_empty());
        assert_eq!(h["head"], 3);
    }
}
