//! Announcements in large groups (issue #11 item 3). Read receipts and
//! membership changes of a group with more than `chat.large_group_members`
//! members are not sent to every member one by one: they are gathered per
//! conversation, the latest read seq of each reader and the latest change
//! of each user, and go out as one `reads` and one `members` event per
//! `chat.announce_window_ms`. So N members reading cost O(members)
//! deliveries per window instead of O(members) per receipt, and a group
//! built by N single adds costs O(members) per window instead of O(N²).
//! Smaller groups get each `read`, `member.added` and `member.removed` at
//! once, as before.
//!
//! What waits is bounded by membership: one entry per (conversation,
//! user), latest wins. The flush task sleeps until the earliest
//! conversation is due ([`Deadlines`]); it never walks the conversations.
//! This file never decides who is a member.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use serde_json::{json, Map, Value};
use tokio::sync::{watch, Notify};

use super::{lock, Chat};
use crate::clock::now_ms;
use crate::deadlines::{wait_for, Deadlines};

/// The most entries (readers, or changed members) one `reads` or `members`
/// event carries, so an event stays a few KB; the rest goes in the next
/// window, oldest first.
pub const MAX_DIGEST_ENTRIES: usize = 512;

/// The most messages one `reactions` event carries (each summary is at
/// most `reactions::MAX_DISTINCT` entries); the rest go a window later.
pub const MAX_DIGEST_MESSAGES: usize = 64;

/// The latest value per user (or per message), in the order they first came.
struct Latest<V, K = Arc<str>> {
    values: HashMap<K, V>,
    order: VecDeque<K>,
}

impl<V, K> Default for Latest<V, K> {
    fn default() -> Self {
        Latest {
            values: HashMap::new(),
            order: VecDeque::new(),
        }
    }
}

impl<V, K: std::hash::Hash + Eq + Clone> Latest<V, K> {
    /// Records `value` for `user`; one already waiting is `merge`d with it.
    fn set(&mut self, user: &K, value: V, merge: impl FnOnce(&mut V, V)) {
        match self.values.get_mut(user) {
            Some(old) => merge(old, value),
            None => {
                self.values.insert(user.clone(), value);
                self.order.push_back(user.clone());
            }
        }
    }

    /// Takes out the first `max` users that came and their values.
    fn take(&mut self, max: usize) -> Vec<(K, V)> {
        let mut out = Vec::new();
        while out.len() < max {
            let Some(user) = self.order.pop_front() else {
                break;
            };
            if let Some(v) = self.values.remove(&user) {
                out.push((user, v));
            }
        }
        out
    }

    fn is_empty(&self) -> bool {
        self.order.is_empty()
    }
}

/// What one conversation has waiting for its next digest.
#[derive(Default)]
struct Pending {
    /// Reader -> highest read seq.
    reads: Latest<u64>,
    /// User -> added (true) or removed (false), the latest change.
    changes: Latest<bool>,
}

impl Pending {
    fn is_empty(&self) -> bool {
        self.reads.is_empty() && self.changes.is_empty()
    }
}

/// A window per conversation: what waits and when it is due.
#[derive(Default)]
struct Window<P> {
    pending: Mutex<HashMap<Arc<str>, P>>,
    deadlines: Mutex<Deadlines>,
}

/// What [`Chat`] holds for announcements: the `[chat]` settings, what
/// waits per conversation and when each is due.
pub(super) struct Announcements {
    /// Groups with more members than this are coalesced.
    pub(super) large_group: usize,
    pub(super) window_ms: u64,
    pending: Mutex<HashMap<Arc<str>, Pending>>,
    deadlines: Mutex<Deadlines>,
    /// `chat.reaction_window_ms`: changed messages' reaction summaries,
    /// the latest per message.
    pub(super) reaction_window_ms: u64,
    reactions: Window<Latest<Value, u64>>,
    /// `chat.occupancy_window_ms`: watched conversations whose occupancy
    /// changed.
    pub(super) occupancy_window_ms: u64,
    occupancy: Window<()>,
    /// Woken when a deadline earlier than every other is set.
    wake: Notify,
}

impl Default for Announcements {
    fn default() -> Self {
        Announcements {
            large_group: usize::MAX,
            window_ms: 1000,
            pending: Mutex::new(HashMap::new()),
            deadlines: Mutex::new(Deadlines::default()),
            reaction_window_ms: 250,
            reactions: Window::default(),
            occupancy_window_ms: 1000,
            occupancy: Window::default(),
            wake: Notify::new(),
        }
    }
}

impl Chat {
    /// Does `conv` have more members than `chat.large_group_members`?
    pub(super) fn is_large_group(&self, conv: &str) -> bool {
        self.members_read().len(conv) > self.announcements.large_group
    }

    /// `user` read `conv` up to `seq`: the other members are told at once
    /// in a small group, in the next `reads` digest in a large one.
    pub(super) fn announce_read(&self, conv: &str, user: &str, seq: u64) {
        if self.is_large_group(conv) {
            self.gather(conv, |p| {
                p.reads
                    .set(&Arc::from(user), seq, |old, new| *old = (*old).max(new))
            });
            return;
        }
        let others: Vec<Arc<str>> = self
            .members(conv)
            .into_iter()
            .filter(|m| &**m != user)
            .collect();
        self.announce(
            &others,
            json!({"type": "read", "conv": conv, "user": user, "seq": seq}),
        );
    }

    /// `user` joined (`added`) or left a large group: the other members
    /// learn it from the next `members` digest.
    pub(super) fn gather_change(&self, conv: &str, user: &Arc<str>, added: bool) {
        self.gather(conv, |p| p.changes.set(user, added, |old, new| *old = new));
    }

    fn gather(&self, conv: &str, update: impl FnOnce(&mut Pending)) {
        let conv: Arc<str> = conv.into();
        {
            let mut pending = lock(&self.announcements.pending);
            update(pending.entry(conv.clone()).or_default());
        }
        self.metrics
            .announcements_coalesced
            .fetch_add(1, Ordering::Relaxed);
        // The first entry of a window sets its end; later ones leave it.
        let at = now_ms().saturating_add(self.announcements.window_ms);
        if lock(&self.announcements.deadlines).due_by(&conv, at) {
            self.announcements.wake.notify_one();
        }
    }

    /// Message `seq` of `conv` has new reaction counts `summary`: in the
    /// conversation's next `reactions` event.
    pub(super) fn gather_reactions(&self, conv: &str, seq: u64, summary: Value) {
        let conv: Arc<str> = conv.into();
        lock(&self.announcements.reactions.pending)
            .entry(conv.clone())
            .or_default()
            .set(&seq, summary, |old, new| *old = new);
        let at = now_ms().saturating_add(self.announcements.reaction_window_ms);
        if lock(&self.announcements.reactions.deadlines).due_by(&conv, at) {
            self.announcements.wake.notify_one();
        }
    }

    /// `conv`'s occupancy is due an update within the window.
    pub(super) fn occupancy_due(&self, conv: &str) {
        let at = now_ms().saturating_add(self.announcements.occupancy_window_ms);
        if lock(&self.announcements.occupancy.deadlines).due_by(conv, at) {
            self.announcements.wake.notify_one();
        }
    }

    /// Sends `conv`'s changed reaction summaries to its members,
    /// `{"type":"reactions","conv","messages":[{"seq","reactions":{...}}]}`,
    /// at most [`MAX_DIGEST_MESSAGES`]; the rest a window later.
    fn flush_reactions(&self, conv: &Arc<str>) {
        let taken = {
            let mut pending = lock(&self.announcements.reactions.pending);
            let Some(p) = pending.get_mut(conv) else {
                return;
            };
            let taken = p.take(MAX_DIGEST_MESSAGES);
            if p.is_empty() {
                pending.remove(conv);
            } else {
                let at = now_ms().saturating_add(self.announcements.reaction_window_ms);
                lock(&self.announcements.reactions.deadlines).due_by(conv, at);
            }
            taken
        };
        if taken.is_empty() {
            return;
        }
        // The counts as they are now: the summaries gathered may have come
        // out of order (each after its own commit). What the cache no
        // longer holds goes as gathered.
        let messages: Vec<Value> = taken
            .into_iter()
            .map(|(seq, gathered)| {
                let summary = self.cached_summary(conv, seq).unwrap_or(gathered);
                json!({"seq": seq, "reactions": summary})
            })
            .collect();
        self.announce(
            &self.members(conv),
            json!({"type": "reactions", "conv": &**conv, "messages": messages}),
        );
        self.metrics
            .reaction_digests
            .fetch_add(1, Ordering::Relaxed);
    }

    /// Sends what `conv` gathered, at most [`MAX_DIGEST_ENTRIES`] of each
    /// kind, to its members now; the rest is due a window later.
    fn flush_announcements(&self, conv: &Arc<str>) {
        let (reads, changes) = {
            let mut pending = lock(&self.announcements.pending);
            let Some(p) = pending.get_mut(conv) else {
                return;
            };
            let taken = (
                p.reads.take(MAX_DIGEST_ENTRIES),
                p.changes.take(MAX_DIGEST_ENTRIES),
            );
            if p.is_empty() {
                pending.remove(conv);
            } else {
                let at = now_ms().saturating_add(self.announcements.window_ms);
                lock(&self.announcements.deadlines).due_by(conv, at);
            }
            taken
        };
        let members = self.members(conv);
        if !changes.is_empty() {
            let (added, removed): (Vec<_>, Vec<_>) = changes.into_iter().partition(|(_, a)| *a);
            let names = |v: Vec<(Arc<str>, bool)>| -> Vec<Value> {
                v.into_iter().map(|(u, _)| Value::from(&*u)).collect()
            };
            self.announce(
                &members,
                json!({"type": "members", "conv": &**conv, "added": names(added), "removed": names(removed)}),
            );
            self.metrics
                .announcement_digests
                .fetch_add(1, Ordering::Relaxed);
        }
        if !reads.is_empty() {
            let reads: Map<String, Value> = reads
                .into_iter()
                .map(|(u, seq)| (u.to_string(), Value::from(seq)))
                .collect();
            self.announce(
                &members,
                json!({"type": "reads", "conv": &**conv, "reads": reads}),
            );
            self.metrics
                .announcement_digests
                .fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// Sends each conversation's digest when its window ends, until the broker
/// stops.
pub async fn run(chat: Arc<Chat>, mut shutdown: watch::Receiver<bool>) {
    let a = &chat.announcements;
    loop {
        let due = lock(&a.deadlines).take_due(now_ms());
        for conv in due {
            chat.flush_announcements(&conv);
            tokio::task::yield_now().await;
        }
        let due = lock(&a.reactions.deadlines).take_due(now_ms());
        for conv in due {
            chat.flush_reactions(&conv);
            tokio::task::yield_now().await;
        }
        let due = lock(&a.occupancy.deadlines).take_due(now_ms());
        for conv in due {
            chat.flush_occupancy(&conv);
            tokio::task::yield_now().await;
        }
        let next = [
            lock(&a.deadlines).next(),
            lock(&a.reactions.deadlines).next(),
            lock(&a.occupancy.deadlines).next(),
        ]
        .into_iter()
        .flatten()
        .min();
        if !wait_for(next, &chat.announcements.wake, &mut shutdown).await {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use chatmq_bridge::push::Push;
    use std::time::Duration;

    use chatmq_storage::{Store, SyncMode};

    use super::*;
    use crate::broker::Metrics;

    #[test]
    fn one_entry_per_user_merged_and_taken_first_come_first() {
        let mut l: Latest<u64> = Latest::default();
        let max = |old: &mut u64, new: u64| *old = (*old).max(new);
        for (u, seq) in [
            ("bob", 3),
            ("carol", 1),
            ("bob", 2),
            ("dave", 7),
            ("carol", 4),
        ] {
            l.set(&Arc::from(u), seq, max);
        }
        assert_eq!(l.values.len(), 3, "one entry per user");
        let first: Vec<(String, u64)> = l
            .take(2)
            .into_iter()
            .map(|(u, s)| (u.to_string(), s))
            .collect();
        assert_eq!(first, [("bob".to_string(), 3), ("carol".to_string(), 4)]);
        assert!(!l.is_empty());
        assert_eq!(l.take(10).len(), 1);
        assert!(l.is_empty());
    }

    // 600 receipts of 300 readers in a 1,000-member group: one deadline for
    // the conversation, one entry per reader with its highest seq; a flush
    // sends at most MAX_DIGEST_ENTRIES and leaves the rest due again.
    #[tokio::test]
    async fn receipts_of_a_large_group_wait_once_per_reader_under_one_deadline() {
        let dir = tempfile::tempdir().expect("temp dir");
        let store =
            Store::open(dir.path(), SyncMode::Never, Duration::from_millis(5)).expect("store");
        let push = Push::open(store.clone(), &Default::default()).expect("push");
        let mut chat = Chat::new(store, Arc::new(Metrics::default()), push).expect("chat");
        chat.announcements.large_group = 100;
        let members: Vec<String> = (0..1000).map(|i| format!("u{i}")).collect();
        chat.create("big", "t", Some("owner"), &members)
            .await
            .expect("group");
        chat.create("small", "t", Some("owner"), &members[..10])
            .await
            .expect("small group");
        for round in [0, 1] {
            for m in &members[..600] {
                chat.mark_read(m, "big", round).await.expect("read");
            }
        }
        chat.mark_read("u1", "small", 0).await.expect("read");
        assert_eq!(lock(&chat.announcements.deadlines).len(), 1, "one deadline");
        {
            let pending = lock(&chat.announcements.pending);
            assert!(
                !pending.contains_key("small"),
                "a small group is told at once"
            );
            let reads = &pending.get("big").expect("big waits").reads;
            assert_eq!(reads.values.len(), 600);
            assert!(
                reads.values.values().all(|s| *s == 0),
                "head is 0: seqs clamp"
            );
        }
        lock(&chat.announcements.deadlines).take_due(u64::MAX);
        chat.flush_announcements(&Arc::from("big"));
        let left = lock(&chat.announcements.pending)["big"].reads.values.len();
        assert_eq!(left, 600 - MAX_DIGEST_ENTRIES);
        assert_eq!(
            lock(&chat.announcements.deadlines).len(),
            1,
            "the rest is due again"
        );
        chat.flush_announcements(&Arc::from("big"));
        assert!(lock(&chat.announcements.pending).is_empty());
    }
}
