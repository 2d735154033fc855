//! The chat layer: conversations with sequenced, durable messages.
//!
//! The story of a chat message (DESIGN §3): the channel hands a validated
//! [`Envelope`] from a member to [`Chat::append`]. Under the conversation's
//! lock it is checked against the idempotency keys, gets the next seq, and
//! its writes (message, head, idempotency key) are submitted to the
//! group-commit writer, in seq order. The conversation's dispatcher shard
//! takes appended messages in that same order, waits for each commit, and
//! only then fans the message out to the online members' sessions and
//! resolves the publisher's ack: acked means on disk, and every receiver
//! sees seqs in order. Conversations are spread over [`DISPATCH_SHARDS`]
//! shards, each its own task, so a large group's fan-out (or a slow commit)
//! holds up only the conversations of its shard. A session that lacks earlier seqs (it resumed, or fell behind)
//! reads them from the log first ([`Offer::Gap`]), so replay and live
//! delivery meet without gap or duplicate.
//!
//! Chat topics never go through the plain router: only this module
//! decides who receives them, by membership, so no wildcard can leak a
//! conversation to a non-member.

pub mod dedup;
pub mod membership;
pub mod namespace;
pub mod retention;
pub mod rpc;
pub mod typing;

use std::collections::{HashMap, VecDeque};
use std::ops::Deref;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock, Weak};

use bytes::Bytes;
use chatmq_bridge::push::Push;
use chatmq_storage::{Batch, Commit, CommitSender, ConversationRecord, Role, StorageError, Store};
use rumqttc::v5::mqttbytes::QoS;
use serde_json::{json, Value};
use tokio::sync::mpsc;

use crate::blocking;
use crate::broker::{Metrics, SessionCell};
use crate::clock::now_ms;
use crate::message::{min_qos, Message};
use crate::session::{Offer, Session};
pub use chatmq_protocol::envelope::{BadEnvelope, Envelope};
use membership::Membership;
use namespace::wanted_qos;
use typing::TypingThrottle;

/// Idempotency keys remembered in memory per conversation, on top of the
/// durable ones (covers retries that arrive before the original commits).
const RECENT_IDS: usize = 1024;
/// Messages read from the log per step of a catch-up.
const CATCH_UP_PAGE: usize = 256;
/// Most messages a replay keeps waiting in one session; it continues as
/// the client acknowledges them, so a long absence costs bounded memory.
pub const REPLAY_WINDOW: usize = 1024;
/// Appended messages waiting in each dispatcher shard.
const DISPATCH_QUEUE: usize = 1024;
/// Dispatcher shards: one task each, conversations spread by hash.
pub const DISPATCH_SHARDS: usize = 16;
/// Sessions a fan-out offers a message to before it lets the worker run
/// other tasks: a 10,000-member group does not hold a worker for the
/// whole fan-out.
const FAN_OUT_STEP: usize = 256;

struct ConvState {
    record: ConversationRecord,
    recent: VecDeque<(Arc<str>, String)>,
    recent_seq: HashMap<(Arc<str>, String), u64>,
    /// Set by the dispatcher when a commit of this conversation failed:
    /// `record.head` and `recent` may then count messages that are not on
    /// disk, and the next append reloads them ([`Chat::reload`]).
    failed: Arc<AtomicBool>,
}

/// A conversation's state in memory, with what its eviction must know.
/// Derefs to the per-conversation lock that orders appends.
struct ConvSlot {
    state: Arc<tokio::sync::Mutex<ConvState>>,
    /// The highest seq whose commit resolved (set by the dispatcher). The
    /// state leaves memory only when its head is durable: reloaded from
    /// disk, it must be the same head, or a seq would be given twice.
    durable_head: AtomicU64,
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
struct Locked {
    guard: tokio::sync::OwnedMutexGuard<ConvState>,
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
struct ConvCache {
    max: usize,
    idle_ms: u64,
    /// When idle entries were last swept, and how many entries were left:
    /// a sweep runs when the map has grown by a tenth of `max` since, or
    /// half the idle time has passed.
    swept_ms: u64,
    swept_len: usize,
}

/// What became of a typing indicator.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Typing {
    Forwarded,
    /// Another one went out less than `chat.typing_interval_ms` ago.
    Throttled,
    /// Larger than `chat.typing_max_bytes`.
    TooLarge,
}

enum Dispatch {
    Message {
        conv: Arc<str>,
        seq: u64,
        msg: Arc<Message>,
        commit: Commit,
        done: CommitSender,
        /// The conversation's [`ConvState::failed`].
        failed: Arc<AtomicBool>,
    },
    /// Resolves once everything appended before it is durable and out.
    Barrier(CommitSender),
}

/// The chat layer's state, shared by every connection.
pub struct Chat {
    store: Store,
    membership: RwLock<Membership>,
    convs: Mutex<HashMap<Arc<str>, Arc<ConvSlot>>>,
    conv_cache: Mutex<ConvCache>,
    typing: TypingThrottle,
    typing_max_bytes: usize,
    /// Connected sessions of each user.
    online: Mutex<HashMap<Arc<str>, Vec<Arc<SessionCell>>>>,
    /// Every session of each user, connected or not (to seed cursors).
    sessions: Mutex<HashMap<Arc<str>, Vec<Weak<SessionCell>>>>,
    /// Last known presence of each user: (online, unix ms).
    presence: Mutex<HashMap<Arc<str>, (bool, u64)>>,
    /// Users with a connected session that subscribed to a filter that can
    /// match `presence/...` (over-approximated: an unsubscribe does not
    /// remove one, the last session going offline does). A presence change
    /// is offered to these only, so a member of a large group who flaps
    /// costs O(watchers), not O(members), when few watch presence.
    watchers: Mutex<std::collections::HashSet<Arc<str>>>,
    /// One queue per dispatcher shard (see [`Chat::shard`]).
    dispatch: Vec<mpsc::Sender<Dispatch>>,
    dispatch_rx: Mutex<Vec<mpsc::Receiver<Dispatch>>>,
    /// The most messages one history call returns.
    pub history_cap: usize,
    metrics: Arc<Metrics>,
    /// Devices, mutes and the push queue: offline members get a job.
    pub push: Arc<Push>,
    /// Makes generated conversation ids unique within a millisecond.
    next_conv: AtomicU64,
    /// When each conversation is next due for a trim (`chat/retention.rs`).
    retention: retention::Retention,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Chat {
    pub fn new(store: Store, metrics: Arc<Metrics>, push: Arc<Push>) -> Result<Chat, StorageError> {
        let mut membership = Membership::default();
        for (conv, user, role) in store.all_members()? {
            membership.add(&conv, &user, role);
        }
        let (dispatch, rx) = (0..DISPATCH_SHARDS)
            .map(|_| mpsc::channel(DISPATCH_QUEUE))
            .unzip();
        Ok(Chat {
            store,
            membership: RwLock::new(membership),
            convs: Mutex::new(HashMap::new()),
            conv_cache: Mutex::new(ConvCache {
                max: usize::MAX,
                idle_ms: u64::MAX,
                swept_ms: now_ms(),
                swept_len: 0,
            }),
            typing: TypingThrottle::new(0),
            typing_max_bytes: usize::MAX,
            online: Mutex::new(HashMap::new()),
            sessions: Mutex::new(HashMap::new()),
            presence: Mutex::new(HashMap::new()),
            watchers: Mutex::new(std::collections::HashSet::new()),
            dispatch,
            dispatch_rx: Mutex::new(rx),
            history_cap: 200,
            metrics,
            push,
            next_conv: AtomicU64::new(0),
            retention: retention::Retention::default(),
        })
    }

    /// Applies the flow-control settings of `[chat]`: typing throttle and
    /// size cap, the bounds of the conversation cache.
    pub fn limit(&mut self, settings: &chatmq_config::Chat) {
        self.typing = TypingThrottle::new(settings.typing_interval_ms);
        self.typing_max_bytes = settings.typing_max_bytes;
        let cache = self.conv_cache.get_mut().unwrap_or_else(|e| e.into_inner());
        cache.max = settings.conv_cache_max;
        cache.idle_ms = settings.conv_idle_secs.saturating_mul(1000);
    }

    /// A fresh id for a group conversation created without one.
    pub fn fresh_conv_id(&self) -> String {
        let n = self.next_conv.fetch_add(1, Ordering::Relaxed);
        format!("g-{:x}-{:x}{:x}", now_ms(), std::process::id(), n)
    }

    /// Does `conv` exist: a group with members, or a direct conversation?
    pub fn exists(&self, conv: &str) -> bool {
        self.members_read().exists(conv)
    }

    fn count_dropped(&self, before: u64, after: u64) {
        if after > before {
            self.metrics
                .messages_dropped
                .fetch_add(after - before, Ordering::Relaxed);
        }
    }

    pub fn epoch(&self) -> &str {
        self.store.epoch()
    }

    fn members_read(&self) -> std::sync::RwLockReadGuard<'_, Membership> {
        self.membership.read().unwrap_or_else(|e| e.into_inner())
    }

    fn members_write(&self) -> std::sync::RwLockWriteGuard<'_, Membership> {
        self.membership.write().unwrap_or_else(|e| e.into_inner())
    }

    pub fn is_member(&self, conv: &str, user: &str) -> bool {
        self.members_read().is_member(conv, user)
    }

    pub fn role(&self, conv: &str, user: &str) -> Option<Role> {
        self.members_read().role(conv, user)
    }

    /// Whether `user` has a connected session now.
    pub fn is_online(&self, user: &str) -> bool {
        lock(&self.online).contains_key(user)
    }

    pub fn members(&self, conv: &str) -> Vec<Arc<str>> {
        self.members_read().members(conv)
    }

    pub fn conversations_of(&self, user: &str) -> Vec<Arc<str>> {
        self.members_read().conversations(user)
    }

    /// Does `viewer` see `user`'s presence (they share a conversation)?
    pub fn shares_conversation(&self, viewer: &str, user: &str) -> bool {
        viewer == user || self.members_read().share(viewer, user)
    }

    async fn conv_state(&self, conv: &str) -> Result<Arc<ConvSlot>, StorageError> {
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
            used_ms: AtomicU64::new(now),
            state: Arc::new(tokio::sync::Mutex::new(ConvState {
                record,
                recent: VecDeque::new(),
                recent_seq: HashMap::new(),
                failed: Arc::default(),
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
    async fn locked(&self, conv: &str) -> Result<Locked, StorageError> {
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
        let mut st = self.locked(conv).await?;
        let key = (from.clone(), envelope.id.clone());
        let earlier = match st.recent_seq.get(&key) {
            Some(seq) => Some(*seq),
            None => self.store.dedup(conv, from, &envelope.id)?,
        };
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
        st.recent.push_back(key.clone());
        st.recent_seq.insert(key, seq);
        if st.recent.len() > RECENT_IDS {
            if let Some(old) = st.recent.pop_front() {
                st.recent_seq.remove(&old);
            }
        }
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
    async fn reload(&self, conv: &str, st: &mut ConvState) -> Result<(), StorageError> {
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
    fn queue_pushes(&self, conv: &str, from: &str, seq: u64, body: &Value, batch: &mut Batch) {
        if !self.push.enabled() {
            return;
        }
        let members = self.members(conv);
        let offline: Vec<&str> = {
            let online = lock(&self.online);
            members
                .iter()
                .filter(|u| ***u != *from && !online.contains_key(*u))
                .map(|u| &**u)
                .collect()
        };
        self.push.enqueue(batch, offline, conv, seq, from, body);
    }

    /// The dispatcher shard of `conv`: every append and barrier of one
    /// conversation goes through the same queue, so they stay in order.
    fn shard(&self, conv: &str) -> &mpsc::Sender<Dispatch> {
        use std::hash::{Hash, Hasher};
        let mut h = std::collections::hash_map::DefaultHasher::new();
        conv.hash(&mut h);
        let i = (h.finish() % self.dispatch.len() as u64) as usize;
        &self.dispatch[i]
    }

    /// Runs the dispatcher shards until the broker stops: in each, commits
    /// are awaited in append order, then messages go out.
    pub async fn run_dispatcher(self: Arc<Self>, shutdown: tokio::sync::watch::Receiver<bool>) {
        let queues: Vec<_> = lock(&self.dispatch_rx).drain(..).collect();
        let mut shards = tokio::task::JoinSet::new();
        for rx in queues {
            shards.spawn(self.clone().run_shard(rx, shutdown.clone()));
        }
        while shards.join_next().await.is_some() {}
    }

    async fn run_shard(
        self: Arc<Self>,
        mut rx: mpsc::Receiver<Dispatch>,
        mut shutdown: tokio::sync::watch::Receiver<bool>,
    ) {
        loop {
            let item = tokio::select! {
                _ = shutdown.changed() => return,
                item = rx.recv() => match item { Some(i) => i, None => return },
            };
            match item {
                Dispatch::Barrier(done) => done.resolve(Ok(())),
                Dispatch::Message {
                    conv,
                    seq,
                    msg,
                    commit,
                    done,
                    failed,
                } => match commit.await {
                    Ok(()) => {
                        if let Some(slot) = lock(&self.convs).get(&conv) {
                            slot.durable_head.fetch_max(seq, Ordering::AcqRel);
                        }
                        self.fan_out(&conv, seq, &msg).await;
                        done.resolve(Ok(()));
                    }
                    Err(e) => {
                        tracing::error!(error = %e, conv = %conv, seq, "chat commit failed");
                        failed.store(true, Ordering::Release);
                        done.resolve(Err(e));
                    }
                },
            }
        }
    }

    /// The online sessions of members of `conv` that subscribed to `topic`.
    fn audience(&self, users: &[Arc<str>]) -> Vec<Arc<SessionCell>> {
        let online = lock(&self.online);
        users
            .iter()
            .filter_map(|u| online.get(u))
            .flatten()
            .cloned()
            .collect()
    }

    async fn fan_out(self: &Arc<Self>, conv: &Arc<str>, seq: u64, msg: &Arc<Message>) {
        let members = self.members(conv);
        for (i, cell) in self.audience(&members).into_iter().enumerate() {
            if i > 0 && i % FAN_OUT_STEP == 0 {
                tokio::task::yield_now().await;
            }
            let offer = {
                let mut slot = cell.lock();
                let s = &mut slot.session;
                let Some(qos) = wanted_qos(s.subscriptions.iter(), &msg.topic) else {
                    continue;
                };
                let qos = chat_qos(msg.qos, qos);
                let mut batch = Batch::new();
                let before = s.dropped;
                let offer = s.offer_chat(conv, seq, msg.clone(), qos, true, &mut batch);
                self.count_dropped(before, s.dropped);
                drop(self.store.submit_now(batch));
                offer
            };
            match offer {
                Offer::Queued => cell.wake.notify_one(),
                Offer::Gap(_) => self.start_catch_up(&cell, conv),
                Offer::Full => {
                    self.metrics
                        .chat_deferred_to_log
                        .fetch_add(1, Ordering::Relaxed);
                }
                Offer::Duplicate => {}
            }
        }
    }

    /// Replays `conv` from `from` into a session that is behind, then lets
    /// live delivery continue. If retention already dropped part of what
    /// it missed, the session's user gets a `gap` event saying what.
    /// Starts replaying `conv` from the log into `cell`'s session, unless a
    /// replay of it is already running there.
    pub fn start_catch_up(self: &Arc<Self>, cell: &Arc<SessionCell>, conv: &Arc<str>) {
        if cell.lock().session.catching_up.insert(conv.clone()) {
            tokio::spawn(self.clone().catch_up(cell.clone(), conv.clone()));
        }
    }

    /// Replays `conv` from the log into a session that is behind, a window
    /// at a time (at most [`REPLAY_WINDOW`] messages waiting in the
    /// session; it continues as the client drains them), then lets live
    /// delivery continue. If retention already dropped part of what it
    /// missed, the session's user gets a `gap` event saying what.
    async fn catch_up(self: Arc<Self>, cell: Arc<SessionCell>, conv: Arc<str>) {
        let topic = format!("chat/{conv}");
        let finish = |paused: bool| {
            let mut slot = cell.lock();
            slot.session.catching_up.remove(&conv);
            if paused {
                slot.session.replay_paused.insert(conv.clone());
            }
        };
        let next = || {
            cell.lock()
                .session
                .chat
                .get(&conv)
                .map_or(1, |c| c.queued + 1)
        };
        if let Ok((_, first)) = self.bounds(&conv).await {
            let from = next();
            if from < first {
                let owner = cell.lock().session.owner.clone();
                if let Some(user) = owner {
                    self.send_event(
                        &user,
                        json!({"type": "gap", "conv": &*conv, "from": from, "to": first.saturating_sub(1)}),
                    );
                }
                let mut slot = cell.lock();
                let c = slot.session.chat.entry(conv.clone()).or_default();
                c.queued = c.queued.max(first.saturating_sub(1));
                c.acked = c.acked.max(first.saturating_sub(1));
            }
        }
        // After the flag is cleared, one more read: a live message that found
        // the replay running was committed before it was offered, so this
        // read sees it.
        let mut last_pass = false;
        loop {
            let from = next();
            if cell.lock().session.is_full() {
                return finish(true);
            }
            let store = self.store.clone();
            let c = conv.clone();
            let page = tokio::task::spawn_blocking(move || {
                store.messages(&c, from, u64::MAX, CATCH_UP_PAGE, false)
            })
            .await;
            let page = match page {
                Ok(Ok(p)) => p,
                Ok(Err(e)) => {
                    tracing::error!(error = %e, "catch-up read failed");
                    return finish(false);
                }
                Err(_) => return finish(false),
            };
            let full = page.len() == CATCH_UP_PAGE;
            let mut queued = false;
            let mut session_full = false;
            {
                let mut slot = cell.lock();
                if slot.link.is_none() {
                    drop(slot);
                    return finish(false); // gone again; it resumes from its cursor
                }
                let s = &mut slot.session;
                let Some(sub_qos) = wanted_qos(s.subscriptions.iter(), &topic) else {
                    drop(slot);
                    return finish(false);
                };
                let qos = chat_qos(QoS::AtLeastOnce, sub_qos);
                let mut batch = Batch::new();
                let before = s.dropped;
                for (seq, body) in page {
                    let msg = Arc::new(Message::from_server(
                        topic.clone(),
                        Bytes::from(body),
                        qos,
                        false,
                    ));
                    match s.offer_chat(&conv, seq, msg, qos, false, &mut batch) {
                        Offer::Queued => queued = true,
                        Offer::Full => {
                            session_full = true;
                            break;
                        }
                        Offer::Duplicate | Offer::Gap(_) => {}
                    }
                }
                self.count_dropped(before, s.dropped);
                drop(self.store.submit_now(batch));
            }
            if queued {
                cell.wake.notify_one();
            }
            if session_full {
                // The rest waits in the log until the client drains.
                return finish(true);
            }
            if !full {
                if last_pass {
                    return;
                }
                finish(false);
                last_pass = true;
            }
        }
    }

    /// Resumes replays that paused on a full window once the session has
    /// drained to half of it. Called after each send.
    pub fn refill(self: &Arc<Self>, cell: &Arc<SessionCell>) {
        let paused: Vec<Arc<str>> = {
            let mut slot = cell.lock();
            let s = &mut slot.session;
            if s.replay_paused.is_empty() || !s.has_room_for_replay() {
                return;
            }
            s.replay_paused.drain().collect()
        };
        for conv in paused {
            self.start_catch_up(cell, &conv);
        }
    }

    /// Knows `cell` as one of `user`'s sessions (at restore and connect).
    pub fn register(&self, user: &Arc<str>, cell: &Arc<SessionCell>) {
        let mut sessions = lock(&self.sessions);
        let cells = sessions.entry(user.clone()).or_default();
        cells.retain(|w| w.strong_count() > 0 && !std::ptr::eq(w.as_ptr(), Arc::as_ptr(cell)));
        cells.push(Arc::downgrade(cell));
    }

    /// Every session of `user` still alive, connected or not (a replaced
    /// one may linger while its connection closes).
    pub fn sessions_of(&self, user: &str) -> Vec<Arc<SessionCell>> {
        lock(&self.sessions)
            .get(user)
            .map(|v| v.iter().filter_map(Weak::upgrade).collect())
            .unwrap_or_default()
    }

    /// `user` is now in `conv`, whose head is `head`: each of its sessions
    /// that subscribes to the conversation starts its cursor there, so one
    /// that is offline now replays from it when it comes back.
    fn join(&self, conv: &str, user: &str, head: u64) {
        let cells = self.sessions_of(user);
        tracing::debug!(conv, user, head, sessions = cells.len(), "joining");
        let mut batch = Batch::new();
        for cell in cells {
            let mut slot = cell.lock();
            if slot.session.lacks_cursor(conv) {
                slot.session.start_cursor(conv, head, &mut batch);
            }
        }
        drop(self.store.submit_now(batch));
    }

    /// The committed heads of `user`'s conversations that `cell` has no
    /// cursor for, read off the async workers before a SUBSCRIBE takes the
    /// session lock (see [`Chat::seed`]).
    pub async fn heads_for_seed(&self, user: &str, cell: &SessionCell) -> Heads {
        let convs: Vec<Arc<str>> = {
            let slot = cell.lock();
            self.conversations_of(user)
                .into_iter()
                .filter(|c| !slot.session.chat.contains_key(c))
                .collect()
        };
        if convs.is_empty() {
            return Heads::default();
        }
        let read = blocking::read(&self.store, move |s| {
            convs
                .into_iter()
                .map(|c| Ok((s.conversation(&c)?.map_or(0, |r| r.head), c)))
                .map(|r: Result<_, StorageError>| r.map(|(h, c)| (c, h)))
                .collect::<Result<HashMap<_, _>, _>>()
        })
        .await;
        match read {
            Ok(heads) => Heads(heads),
            Err(e) => {
                tracing::error!(error = %e, "cannot read conversation heads");
                Heads::default()
            }
        }
    }

    /// `session` of `user` is subscribing: every conversation of the user
    /// it now receives and has no cursor for starts at its committed head,
    /// so an offline spell later is replayed on resume. `heads` were read
    /// just before the session lock was taken; a message committed in
    /// between has a higher seq and reaches the session through a
    /// catch-up, so nothing appended after SUBACK is ever mistaken for one
    /// the session already had. A conversation joined in that instant
    /// (absent from `heads`) starts from its cached state, or the log.
    pub fn seed(&self, user: &str, session: &mut Session, heads: &Heads, batch: &mut Batch) {
        for conv in self.conversations_of(user) {
            if !session.lacks_cursor(&conv) {
                continue;
            }
            let head = heads.0.get(&conv).copied().unwrap_or_else(|| {
                lock(&self.convs)
                    .get(&conv)
                    .map_or(0, |slot| slot.durable_head.load(Ordering::Acquire))
            });
            session.start_cursor(&conv, head, batch);
        }
    }

    /// A session of `user` is connected: it is now reached by fan-out,
    /// resumes every conversation it has a cursor for, and the user is
    /// online.
    pub fn session_online(self: &Arc<Self>, user: &Arc<str>, cell: &Arc<SessionCell>) {
        let first = {
            let mut online = lock(&self.online);
            let cells = online.entry(user.clone()).or_default();
            cells.retain(|c| !Arc::ptr_eq(c, cell) && c.client_id != cell.client_id);
            cells.push(cell.clone());
            cells.len() == 1
        };
        self.register(user, cell);
        // What is still queued or in flight goes out again from the session
        // itself (resend with DUP); the log supplies what came after it.
        // After a restart `queued` is the persisted cursor.
        let resume: Vec<Arc<str>> = {
            let mut slot = cell.lock();
            slot.session.replay_paused.clear();
            for filter in slot.session.subscriptions.keys() {
                self.watch_presence(user, filter);
            }
            slot.session.chat.keys().cloned().collect()
        };
        for conv in resume {
            if self.is_member(&conv, user) {
                self.start_catch_up(cell, &conv);
            }
        }
        if first {
            self.set_presence(user, true);
        }
    }

    /// A session of `user` ended; the user goes offline with the last one.
    pub fn session_offline(&self, user: &Arc<str>, cell: &Arc<SessionCell>) {
        let last = {
            let mut online = lock(&self.online);
            let Some(cells) = online.get_mut(user) else {
                return;
            };
            cells.retain(|c| !Arc::ptr_eq(c, cell));
            let empty = cells.is_empty();
            if empty {
                online.remove(user);
                lock(&self.watchers).remove(user);
            }
            empty
        };
        if last {
            self.set_presence(user, false);
        }
    }

    fn presence_message(user: &str, online: bool, ts: u64) -> Arc<Message> {
        let status = if online { "online" } else { "offline" };
        Arc::new(Message::from_server(
            format!("presence/{user}"),
            Bytes::from(json!({"status": status, "ts": ts}).to_string()),
            QoS::AtMostOnce,
            true,
        ))
    }

    fn set_presence(&self, user: &Arc<str>, online: bool) {
        let ts = now_ms();
        lock(&self.presence).insert(user.clone(), (online, ts));
        let msg = Self::presence_message(user, online, ts);
        let viewers: Vec<Arc<str>> = {
            let members = self.members_read();
            let watchers = lock(&self.watchers);
            // Whichever is smaller: the users watching presence, each
            // checked for a shared conversation, or the user's contacts.
            if watchers.len() <= members.contact_bound(user) {
                watchers
                    .iter()
                    .filter(|w| *w == user || members.share(w, user))
                    .cloned()
                    .collect()
            } else {
                let mut all: Vec<Arc<str>> = members
                    .contacts(user)
                    .into_iter()
                    .filter(|c| watchers.contains(c))
                    .collect();
                if !all.contains(user) && watchers.contains(user) {
                    all.push(user.clone());
                }
                all
            }
        };
        self.deliver(&viewers, &msg, None);
    }

    /// A session of `user` subscribed to `filter` (or came online with it):
    /// it may want presence changes from now on.
    pub fn watch_presence(&self, user: &Arc<str>, filter: &str) {
        use namespace::{filter_scope, FilterScope, Topic};
        let reaches = match filter_scope(filter) {
            FilterScope::Wild => true,
            FilterScope::Reserved(Topic::Presence(_), _) => true,
            _ => false,
        };
        if reaches {
            lock(&self.watchers).insert(user.clone());
        }
    }

    /// The presence (retained) messages a new `presence/...` subscription
    /// of `viewer` gets: every user it shares a conversation with.
    pub fn presence_for(&self, viewer: &str, filter: &str) -> Vec<Arc<Message>> {
        let contacts = self.members_read().contacts(viewer);
        let presence = lock(&self.presence);
        contacts
            .iter()
            .chain(std::iter::once(&Arc::<str>::from(viewer)))
            .filter_map(|u| {
                let t = format!("presence/{u}");
                if !crate::topic::matches(filter, &t) {
                    return None;
                }
                let (online, ts) = presence.get(u).copied().unwrap_or((false, 0));
                Some(Self::presence_message(u, online, ts))
            })
            .collect()
    }

    /// Queues `msg` for every connected session of `users` that subscribed
    /// to its topic, except the client `skip`.
    fn deliver(&self, users: &[Arc<str>], msg: &Arc<Message>, skip: Option<&str>) {
        for cell in self.audience(users) {
            if skip == Some(&*cell.client_id) {
                continue;
            }
            let queued = {
                let mut slot = cell.lock();
                let s = &mut slot.session;
                match wanted_qos(s.subscriptions.iter(), &msg.topic) {
                    Some(q) => {
                        let mut batch = Batch::new();
                        let before = s.dropped;
                        s.enqueue(
                            msg.clone(),
                            min_qos(msg.qos, q),
                            msg.retain,
                            vec![],
                            &mut batch,
                        );
                        self.count_dropped(before, s.dropped);
                        drop(self.store.submit_now(batch));
                        true
                    }
                    None => false,
                }
            };
            if queued {
                cell.wake.notify_one();
            }
        }
    }

    /// A typing indicator from `from` in `conv`: to the other members
    /// online now, QoS 0, never stored; size-capped and throttled per user
    /// and conversation (what is not forwarded is counted).
    pub fn typing(&self, conv: &str, from: &str, client_id: &str, payload: &[u8]) -> Typing {
        if payload.len() > self.typing_max_bytes {
            self.metrics
                .typing_too_large
                .fetch_add(1, Ordering::Relaxed);
            return Typing::TooLarge;
        }
        if !self.typing.admit(conv, from, now_ms()) {
            self.metrics
                .typing_throttled
                .fetch_add(1, Ordering::Relaxed);
            return Typing::Throttled;
        }
        let state = serde_json::from_slice::<Value>(payload).unwrap_or(Value::Null);
        let body = json!({"conv": conv, "from": from, "ts": now_ms(), "state": state});
        let msg = Arc::new(Message::from_server(
            format!("typing/{conv}"),
            Bytes::from(body.to_string()),
            QoS::AtMostOnce,
            false,
        ));
        self.deliver(&self.members(conv), &msg, Some(client_id));
        Typing::Forwarded
    }

    /// An event for `user` on `users/{user}/events` (QoS 1) to each of its
    /// connected sessions subscribed there.
    pub fn send_event(&self, user: &str, event: Value) {
        let msg = Arc::new(Message::from_server(
            format!("users/{user}/events"),
            Bytes::from(event.to_string()),
            QoS::AtLeastOnce,
            false,
        ));
        self.deliver(&[Arc::from(user)], &msg, None);
    }

    fn announce(&self, users: &[Arc<str>], event: Value) {
        for u in users {
            self.send_event(u, event.clone());
        }
    }

    /// Creates a group conversation; `owner` becomes its owner, `members`
    /// its members. Fails if the id is taken or is a direct conversation.
    pub async fn create(
        &self,
        conv: &str,
        title: &str,
        owner: Option<&str>,
        members: &[String],
    ) -> Result<(), RpcError> {
        if !namespace::valid_conv(conv) || conv.starts_with("dm:") {
            return Err(RpcError::bad("conv is not a valid group conversation id"));
        }
        for m in members {
            if !namespace::valid_user(m) {
                return Err(RpcError::bad("members must be user ids"));
            }
        }
        let state = self.conv_state(conv).await?;
        let mut st = state.lock().await;
        if self.members_read().exists(conv) || st.record.head > 0 {
            return Err(RpcError::new("exists", "the conversation already exists"));
        }
        st.record.title = title.to_string();
        let mut batch = Batch::new();
        batch.put_conversation(conv, &st.record);
        let mut all: Vec<(String, Role)> =
            members.iter().map(|m| (m.clone(), Role::Member)).collect();
        if let Some(o) = owner {
            all.retain(|(m, _)| m != o);
            all.push((o.to_string(), Role::Owner));
        }
        for (m, role) in &all {
            batch.put_member(conv, m, *role);
        }
        self.store.write(batch).await?;
        {
            let mut ms = self.members_write();
            for (m, role) in &all {
                ms.add(conv, m, *role);
            }
        }
        for (m, _) in &all {
            self.join(conv, m, 0);
        }
        let users: Vec<Arc<str>> = all.iter().map(|(m, _)| Arc::from(m.as_str())).collect();
        self.announce(
            &users,
            json!({"type": "conversation.created", "conv": conv, "title": title, "by": owner}),
        );
        Ok(())
    }

    /// Adds `user` to `conv`; `by` must be its owner (`None`: an operator).
    pub async fn add_member(
        &self,
        conv: &str,
        user: &str,
        by: Option<&str>,
    ) -> Result<(), RpcError> {
        self.check_owner(conv, by)?;
        if !namespace::valid_user(user) {
            return Err(RpcError::bad("user is not a valid user id"));
        }
        if self.is_member(conv, user) {
            return Ok(());
        }
        let mut batch = Batch::new();
        batch.put_member(conv, user, Role::Member);
        self.store.write(batch).await?;
        self.members_write().add(conv, user, Role::Member);
        if let Ok((head, _)) = self.bounds(conv).await {
            self.join(conv, user, head);
        }
        self.announce(
            &self.members(conv),
            json!({"type": "member.added", "conv": conv, "user": user, "by": by}),
        );
        Ok(())
    }

    /// Removes `user` from `conv`, at once: its live subscriptions stop
    /// receiving the conversation. The owner removes anyone; a member may
    /// remove itself.
    pub async fn remove_member(
        &self,
        conv: &str,
        user: &str,
        by: Option<&str>,
    ) -> Result<(), RpcError> {
        if by != Some(user) {
            self.check_owner(conv, by)?;
        }
        if !self.is_member(conv, user) {
            return Err(RpcError::new("not_found", "the user is not a member"));
        }
        let mut batch = Batch::new();
        batch.delete_member(conv, user);
        self.store.write(batch).await?;
        let before = self.members(conv);
        self.members_write().remove(conv, user);
        self.announce(
            &before,
            json!({"type": "member.removed", "conv": conv, "user": user, "by": by}),
        );
        Ok(())
    }

    fn check_owner(&self, conv: &str, by: Option<&str>) -> Result<(), RpcError> {
        if namespace::direct_members(conv).is_some() {
            return Err(RpcError::new(
                "forbidden",
                "direct conversations have fixed members",
            ));
        }
        if !self.members_read().exists(conv) {
            return Err(RpcError::new("not_found", "no such conversation"));
        }
        match by {
            None => Ok(()),
            Some(u) if self.role(conv, u) == Some(Role::Owner) => Ok(()),
            Some(_) => Err(RpcError::new(
                "forbidden",
                "only the owner may change members",
            )),
        }
    }

    /// History of `conv` in seq order: after `after` (ascending from there)
    /// or before `before` (the latest ones before it), at most `limit`.
    pub async fn history(
        &self,
        conv: &str,
        after: Option<u64>,
        before: Option<u64>,
        limit: usize,
    ) -> Result<Value, RpcError> {
        let (head, first) = self.bounds(conv).await?;
        let limit = limit.clamp(1, self.history_cap);
        let store = self.store.clone();
        let c = conv.to_string();
        let page = tokio::task::spawn_blocking(move || match (after, before) {
            // after = u64::MAX: nothing comes after it.
            (Some(a), b) => match a.checked_add(1) {
                Some(from) => store.messages(&c, from, b.unwrap_or(u64::MAX), limit, false),
                None => Ok(Vec::new()),
            },
            (None, b) => store
                .messages(&c, first, b.unwrap_or(u64::MAX), limit, true)
                .map(|mut v| {
                    v.reverse();
                    v
                }),
        })
        .await
        .map_err(|_| RpcError::new("internal", "history read failed"))??;
        let messages: Vec<Value> = page
            .into_iter()
            .filter_map(|(_, body)| serde_json::from_slice(&body).ok())
            .collect();
        Ok(json!({"messages": messages, "head": head, "first": first, "epoch": self.epoch()}))
    }

    /// The user's conversations with head seq, read seq and unread count.
    pub async fn list(&self, user: &str) -> Result<Value, RpcError> {
        let convs = self.conversations_of(user);
        // Every read seq in one trip to the blocking pool.
        let reads = {
            let (user, convs) = (user.to_string(), convs.clone());
            blocking::read(&self.store, move |s| {
                convs
                    .iter()
                    .map(|c| s.read_seq(&user, c))
                    .collect::<Result<Vec<_>, _>>()
            })
            .await?
        };
        let mut out = Vec::new();
        for (conv, read) in convs.into_iter().zip(reads) {
            let state = self.conv_state(&conv).await?;
            let (head, title) = {
                let s = state.lock().await;
                (s.record.head, s.record.title.clone())
            };
            let role = match self.role(&conv, user) {
                Some(Role::Owner) => "owner",
                _ => "member",
            };
            let muted = self.push.is_muted(user, &conv);
            out.push(json!({"conv": &*conv, "title": title, "head": head, "read": read, "unread": head.saturating_sub(read), "role": role, "muted": muted}));
        }
        Ok(json!({"conversations": out}))
    }

    /// Records that `user` read `conv` up to `seq` and tells the other
    /// members (a read receipt). The read seq never goes backwards.
    pub async fn mark_read(&self, user: &str, conv: &str, seq: u64) -> Result<u64, RpcError> {
        let (head, _) = self.bounds(conv).await?;
        let read = {
            let (user, conv) = (user.to_string(), conv.to_string());
            blocking::read(&self.store, move |s| s.read_seq(&user, &conv)).await?
        };
        let seq = seq.min(head).max(read);
        let mut batch = Batch::new();
        batch.put_read(user, conv, seq);
        self.store.write(batch).await?;
        let others: Vec<Arc<str>> = self
            .members(conv)
            .into_iter()
            .filter(|m| &**m != user)
            .collect();
        self.announce(
            &others,
            json!({"type": "read", "conv": conv, "user": user, "seq": seq}),
        );
        Ok(seq)
    }
}

/// Conversation heads read for [`Chat::seed`].
#[derive(Default)]
pub struct Heads(HashMap<Arc<str>, u64>);

/// Chat deliveries are at most QoS 1: the (conv, seq) pair already gives
/// exactly-once to a client that deduplicates, and a QoS 2 packet id must
/// not be reused after a restart, which replay from the log cannot promise.
fn chat_qos(published: QoS, subscribed: QoS) -> QoS {
    min_qos(min_qos(published, subscribed), QoS::AtLeastOnce)
}

/// A refused RPC or HTTP call: a stable code and a sentence.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RpcError {
    pub code: &'static str,
    pub message: String,
}

impl RpcError {
    pub fn new(code: &'static str, message: impl Into<String>) -> RpcError {
        RpcError {
            code,
            message: message.into(),
        }
    }
    pub fn bad(message: impl Into<String>) -> RpcError {
        RpcError::new("bad_request", message)
    }
}

impl From<StorageError> for RpcError {
    fn from(e: StorageError) -> Self {
        tracing::error!(error = %e, "storage error in a chat call");
        RpcError::new("internal", "storage error")
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use chatmq_storage::SyncMode;

    use super::*;

    fn envelope(id: &str) -> Envelope {
        Envelope::parse(format!(r#"{{"id":"{id}","body":"hi"}}"#).as_bytes()).expect("envelope")
    }

    // Issue #10 item 7: a commit of an append fails (here: the writer is
    // gone, as on a failing disk). A retry of the same envelope id must not
    // be acknowledged as a duplicate of a message that is not on disk, and
    // the next message must not leave a hole where the lost one was.
    #[tokio::test]
    async fn a_failed_commit_rolls_the_conversation_back() {
        let dir = tempfile::tempdir().expect("temp dir");
        let store =
            Store::open(dir.path(), SyncMode::Never, Duration::from_millis(5)).expect("store");
        let push = Push::open(store.clone(), &Default::default()).expect("push");
        let chat =
            Arc::new(Chat::new(store.clone(), Arc::new(Metrics::default()), push).expect("chat"));
        let (_stop, watch) = tokio::sync::watch::channel(false);
        tokio::spawn(chat.clone().run_dispatcher(watch));
        chat.create("room", "t", Some("alice"), &[])
            .await
            .expect("room");
        let alice: Arc<str> = "alice".into();
        let send = |id: &'static str| {
            let chat = chat.clone();
            let alice = alice.clone();
            async move {
                let (commit, seq) = chat
                    .append("room", &alice, &envelope(id), QoS::AtLeastOnce)
                    .await
                    .expect("appended");
                (seq, commit.await)
            }
        };
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

    // Issue #11 item 3: conversations are sequenced and fanned out in
    // shards. A conversation whose commit hangs (here: one that never
    // resolves) holds up its own shard only: another conversation's
    // message is acknowledged meanwhile.
    #[tokio::test]
    async fn a_stuck_conversation_does_not_hold_up_the_others() {
        let dir = tempfile::tempdir().expect("temp dir");
        let store =
            Store::open(dir.path(), SyncMode::Never, Duration::from_millis(5)).expect("store");
        let push = Push::open(store.clone(), &Default::default()).expect("push");
        let chat = Arc::new(Chat::new(store, Arc::new(Metrics::default()), push).expect("chat"));
        let (_stop, watch) = tokio::sync::watch::channel(false);
        tokio::spawn(chat.clone().run_dispatcher(watch));

        let stuck = "stuck";
        let (_never, hanging) = Commit::deferred();
        let (done, stuck_acked) = Commit::deferred();
        let item = Dispatch::Message {
            conv: stuck.into(),
            seq: 1,
            msg: Arc::new(Message::from_server(
                "chat/stuck".into(),
                Bytes::new(),
                QoS::AtLeastOnce,
                false,
            )),
            commit: hanging,
            done,
            failed: Arc::default(),
        };
        assert!(chat.shard(stuck).send(item).await.is_ok());

        let other = (0..DISPATCH_SHARDS * 8)
            .map(|i| format!("room-{i}"))
            .find(|c| !std::ptr::eq(chat.shard(c), chat.shard(stuck)))
            .expect("a conversation on another shard");
        chat.create(&other, "t", Some("alice"), &[])
            .await
            .expect("room");
        let (commit, seq) = chat
            .append(&other, &"alice".into(), &envelope("m1"), QoS::AtLeastOnce)
            .await
            .expect("appended");
        assert_eq!(seq, 1);
        let acked = tokio::time::timeout(Duration::from_secs(10), commit).await;
        assert!(matches!(acked, Ok(Ok(()))), "held up by the stuck shard");

        // The stuck conversation's own shard still waits, in order.
        let mut stuck_acked = stuck_acked;
        assert!(resolved_now(&mut stuck_acked).is_none());
    }

    fn resolved_now(c: &mut Commit) -> Option<Result<(), StorageError>> {
        use std::future::Future;
        let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
        match std::pin::Pin::new(c).poll(&mut cx) {
            std::task::Poll::Ready(r) => Some(r),
            std::task::Poll::Pending => None,
        }
    }
}
