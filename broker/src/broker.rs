//! The shared state every connection works on: the subscription index,
//! the sessions by client id, the retained messages, and the store.
//!
//! Routing lives here: [`Broker::route`] takes one message to every
//! matching session, applying subscription options, QoS reduction, No Local
//! and shared-subscription choice, and collects the writes that make it
//! durable. The router holds each subscriber's session handle, so a
//! publisher takes no lock but the router's read lock and, one at a time,
//! the sessions it delivers to: never the session map. Lock order, to stay
//! deadlock-free: the session map, then one session, then the router;
//! nothing holds the router while taking another lock.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};
use std::time::Duration;

use chatmq_config::Settings;
use chatmq_storage::{Batch, Cached, Commit, Store};
use crossbeam_utils::sync::{ShardedLock, ShardedLockReadGuard, ShardedLockWriteGuard};
use rumqttc::v5::mqttbytes::QoS;
use tokio::sync::{oneshot, Notify};

use crate::access::{Acl, Authenticator};
use crate::chat::Chat;
use crate::clock::now_ms;
use crate::codec::Protocol;
use crate::counter::{ByLabel, Counter, Listeners};
use crate::deadlines::Deadlines;
use crate::hooks::{Hooks, Interceptors};
use crate::limits::PublishLimits;
use crate::message::{min_qos, Message};
use crate::ownership::{self, Ownership};
use crate::retained::{Change, RetainedStore};
use crate::router::{Router, Sub, SubOptions};
use crate::session::{Outgoing, Session, CURSOR_SAVE_ACKS};
use crate::topic::TopicLimits;

/// Why a connection is told to go away by the broker.
#[derive(Debug)]
pub enum Kick {
    /// Another connection takes the client id over (0x8E). The old one
    /// first handles what its client already sent (a DISCONNECT sent just
    /// before reconnecting must count), closes, and then drops `closed`:
    /// the new connection waits for that before it attaches.
    TakenOver { closed: oneshot::Sender<()> },
}

/// How long a new connection waits for the one it takes over to close:
/// its drain (`connection::DRAIN_MAX`) and its release of the session.
pub const TAKEOVER_WAIT: Duration = Duration::from_secs(2);

/// The connection currently attached to a session.
pub struct Link {
    pub conn_id: u64,
    /// `None` once the takeover was announced.
    kick: Option<oneshot::Sender<Kick>>,
}

impl Link {
    /// Tells the connection it is taken over; the receiver resolves when
    /// it has closed (or will never say).
    fn kick(&mut self) -> Option<oneshot::Receiver<()>> {
        let kick = self.kick.take()?;
        let (closed, done) = oneshot::channel();
        kick.send(Kick::TakenOver { closed }).ok()?;
        Some(done)
    }
}

/// A will waiting for its delay to pass (MQTT 5 Will Delay Interval);
/// when it is due is in [`Broker`]'s will index.
pub struct PendingWill {
    message: Message,
    owner: Option<Arc<str>>,
}

/// A session and who is attached to it, under one lock.
pub struct Slot {
    pub session: Session,
    pub link: Option<Link>,
    /// Boxed: few sessions have one, and every session's lock holds the space.
    pending_will: Option<Box<PendingWill>>,
}

/// Every session by client id, and how many of them anonymous clients
/// created (for `mqtt.max_anonymous_sessions`). Read through `Deref`;
/// changed only by `insert` and `remove`, which keep the count.
#[derive(Default)]
pub struct Sessions {
    map: HashMap<Arc<str>, Arc<SessionCell>>,
    anonymous: usize,
}

impl Sessions {
    fn insert(&mut self, client_id: Arc<str>, cell: Arc<SessionCell>) {
        self.anonymous += usize::from(cell.owner.is_none());
        if let Some(old) = self.map.insert(client_id, cell) {
            self.anonymous -= usize::from(old.owner.is_none());
        }
    }

    fn remove(&mut self, client_id: &str) {
        if let Some(old) = self.map.remove(client_id) {
            self.anonymous -= usize::from(old.owner.is_none());
        }
    }
}

impl std::ops::Deref for Sessions {
    type Target = HashMap<Arc<str>, Arc<SessionCell>>;
    fn deref(&self) -> &Self::Target {
        &self.map
    }
}

/// One client id's session, shared by the broker and its connection.
pub struct SessionCell {
    pub client_id: Arc<str>,
    /// The user the session belongs to; `None` for an anonymous client
    /// (a session's owner never changes).
    pub owner: Option<Arc<str>>,
    slot: Mutex<Slot>,
    /// QoS 0 deliveries to the connected session, taken by its connection
    /// without the session's lock.
    pub inbox: Inbox,
    /// A connection is attached (mirrors `Slot::link`, for publishers that
    /// must not take the session's lock to know).
    online: AtomicBool,
    /// Nothing waits in the session's queue (set as its lock is released).
    /// QoS 0 takes the inbox only then, so that no message goes out ahead
    /// of one its publisher sent before it, whatever their QoS.
    queue_empty: AtomicBool,
    /// The session is persistent (set as its lock is released): what a
    /// publisher stages for it is stored.
    persistent: AtomicBool,
    /// The session's counter of `n` ([`Session::numbers`]), for publishers
    /// that stage without its lock.
    numbers: Arc<AtomicU64>,
    /// Woken when the session has something new to send (through
    /// [`SessionCell::wake_up`]).
    pub wake: Notify,
    /// A wake-up is on its way that the connection has not acted on yet
    /// (cleared as it looks for deliveries): a fan-out that finds it set
    /// does not touch the `Notify` again.
    wake_pending: AtomicBool,
    /// The session left the broker (ended, expired or replaced): a handle
    /// the router still holds for an instant delivers nothing to it.
    ended: AtomicBool,
    /// It left for another node, where its client resumed it: a delayed
    /// will is not published here (`Broker::moved_away`).
    moved: AtomicBool,
}

/// The locked session. Releasing it records whether its queue is empty,
/// which decides where a QoS 0 message goes (see [`Broker::route`]).
pub struct SlotGuard<'a> {
    guard: MutexGuard<'a, Slot>,
    queue_empty: &'a AtomicBool,
    persistent: &'a AtomicBool,
}

impl std::ops::Deref for SlotGuard<'_> {
    type Target = Slot;
    fn deref(&self) -> &Slot {
        &self.guard
    }
}

impl std::ops::DerefMut for SlotGuard<'_> {
    fn deref_mut(&mut self) -> &mut Slot {
        &mut self.guard
    }
}

impl Drop for SlotGuard<'_> {
    fn drop(&mut self) {
        // Before the lock is released: a publisher that reads `true` knows
        // nothing waits in the queue ahead of what it delivers.
        self.queue_empty
            .store(self.guard.session.queue_is_empty(), Ordering::Release);
        self.persistent
            .store(self.guard.session.persistent(), Ordering::Release);
    }
}

/// Which shared groups of this node a message goes to.
#[derive(Clone, Copy)]
enum Shares<'a> {
    /// Every matching one: one node alone, or a message that did not go
    /// to the other nodes.
    All,
    /// None: with `[cluster]`, a message that went through NATS reaches
    /// the shared groups by their queue subscriptions.
    None,
    /// This one group only, and no plain subscriber: NATS chose this
    /// node for it.
    Only { group: &'a str, filter: &'a str },
}

/// One session a message is routed to, and how (see `Broker::targets`).
struct Target {
    cell: Arc<SessionCell>,
    qos: QoS,
    retain_as_published: bool,
    sub_ids: Vec<u32>,
}

impl Target {
    /// The delivery one subscription of `cell` asks for.
    fn new(cell: &Arc<SessionCell>, o: &SubOptions) -> Target {
        Target {
            cell: cell.clone(),
            qos: o.qos,
            retain_as_published: o.retain_as_published,
            sub_ids: if o.identifier != 0 {
                vec![o.identifier]
            } else {
                Vec::new()
            },
        }
    }
}

/// A QoS 0 message on its way to one connected session.
pub struct Plain {
    pub msg: Arc<Message>,
    /// RETAIN as the subscriber sees it (Retain As Published).
    pub retain: bool,
    pub sub_ids: Vec<u32>,
    /// Routed to more than one session: its encoding is shared
    /// ([`Message::wire_qos0`]).
    pub shared: bool,
}

impl Plain {
    /// The QoS 0 PUBLISH this subscriber gets, built for it alone.
    pub fn to_publish(&self) -> rumqttc::v5::mqttbytes::v5::Publish {
        self.msg
            .to_publish(QoS::AtMostOnce, 0, false, self.retain, &self.sub_ids)
    }
}

/// What a publisher left in a connected session's inbox.
pub enum Inboxed {
    /// QoS 0: written out by the connection as it comes.
    Plain(Plain),
    /// QoS 1/2, numbered (and stored, for a persistent session) by its
    /// publisher: taken into the session's queue ([`Session::admit`]).
    Staged(Outgoing),
}

impl Inboxed {
    fn size(&self) -> usize {
        match self {
            Inboxed::Plain(p) => p.msg.budget_size(),
            Inboxed::Staged(o) => o.size(),
        }
    }
}

/// A connected session's mailbox (EMQX's "deliver to the subscriber's
/// mailbox"): a publisher appends under the inbox's own short lock, never
/// the session's, and the session's connection task takes everything at
/// once. QoS 0 goes there only while the session's queue is empty and is
/// written before it; QoS 1/2 is numbered under the inbox's lock, staged,
/// and taken into the queue, after what was queued before it. So the order
/// a publisher sent in holds across QoS levels. Bounded like the session's
/// queue, by `mqtt.max_offline_messages` and `mqtt.session_queue_bytes`:
/// when full, a new QoS 0 message is dropped and counted before anything
/// else is done with it (QoS 0 may be lost; the oldest stay, already on
/// their way), and going over the byte budget also closes the connection
/// as overloaded, as the session queue does; a QoS 1/2 message goes to the
/// queue under the session's lock instead, where the queue's bounds apply.
pub struct Inbox {
    queue: Mutex<std::collections::VecDeque<Inboxed>>,
    len: AtomicUsize,
    bytes: AtomicUsize,
    max_len: usize,
    max_bytes: usize,
    overloaded: AtomicBool,
    /// A message was refused since the last `take`: publishers may wait
    /// on `drained` for the connection to empty the inbox.
    pressed: AtomicBool,
    drained: Notify,
}

impl Inbox {
    fn new(max_len: usize, max_bytes: usize) -> Inbox {
        Inbox {
            queue: Mutex::new(std::collections::VecDeque::new()),
            len: AtomicUsize::new(0),
            bytes: AtomicUsize::new(0),
            max_len,
            max_bytes,
            overloaded: AtomicBool::new(false),
            pressed: AtomicBool::new(false),
            drained: Notify::new(),
        }
    }

    /// Whether a message of `size` bytes must be dropped: one atomic load
    /// each, no lock.
    fn full(&self, size: usize) -> bool {
        if self.len.load(Ordering::Relaxed) >= self.max_len {
            return true;
        }
        if self.bytes.load(Ordering::Relaxed).saturating_add(size) > self.max_bytes {
            self.overloaded.store(true, Ordering::Relaxed);
            return true;
        }
        false
    }

    /// Whether a QoS 1/2 message of `size` bytes may be staged (no lock;
    /// publishers on other cores may stage theirs meanwhile, so the
    /// bounds may be passed by a message each).
    fn has_room(&self, size: usize) -> bool {
        self.len.load(Ordering::Relaxed) < self.max_len
            && self.bytes.load(Ordering::Relaxed).saturating_add(size) <= self.max_bytes
    }

    /// Appends `p` unless the inbox is full (then `false`: dropped).
    fn offer(&self, p: Plain) -> bool {
        let size = p.msg.budget_size();
        if self.full(size) {
            self.pressed.store(true, Ordering::Relaxed);
            return false;
        }
        let mut q = lock(&self.queue);
        // Again under the lock: publishers on other cores may have filled
        // it since the first look.
        if q.len() >= self.max_len {
            self.pressed.store(true, Ordering::Relaxed);
            return false;
        }
        self.bytes.fetch_add(size, Ordering::Relaxed);
        q.push_back(Inboxed::Plain(p));
        self.len.store(q.len(), Ordering::Relaxed);
        true
    }

    /// Numbers a QoS 1/2 message from `numbers` and appends what `stage`
    /// builds of it, under the inbox's lock: staged in the order numbered.
    fn stage(&self, numbers: &AtomicU64, stage: impl FnOnce(u64) -> Outgoing) {
        let mut q = lock(&self.queue);
        let o = stage(numbers.fetch_add(1, Ordering::Relaxed));
        self.bytes.fetch_add(o.size(), Ordering::Relaxed);
        q.push_back(Inboxed::Staged(o));
        self.len.store(q.len(), Ordering::Relaxed);
    }

    /// Everything waiting, oldest first; the inbox is empty after.
    pub fn take(&self) -> std::collections::VecDeque<Inboxed> {
        if self.len.load(Ordering::Relaxed) == 0 {
            return std::collections::VecDeque::new();
        }
        let taken = {
            let mut q = lock(&self.queue);
            self.len.store(0, Ordering::Relaxed);
            std::mem::take(&mut *q)
        };
        let bytes = taken
            .iter()
            .map(Inboxed::size)
            .fold(0usize, usize::saturating_add);
        if self.pressed.swap(false, Ordering::Relaxed) {
            self.drained.notify_waiters();
        }
        // `offer` counts a message's bytes before it is in the queue, so
        // this never goes below zero; saturating all the same.
        let _ = self
            .bytes
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |b| {
                Some(b.saturating_sub(bytes))
            });
        taken
    }

    /// Resolves when the connection next empties the inbox after it
    /// refused a message.
    pub fn drained(&self) -> tokio::sync::futures::Notified<'_> {
        self.drained.notified()
    }

    /// Went over the byte budget since the session last (re)attached.
    pub fn overloaded(&self) -> bool {
        self.overloaded.load(Ordering::Relaxed)
    }

    /// Bytes waiting (for `held_bytes`).
    fn bytes(&self) -> usize {
        self.bytes.load(Ordering::Relaxed)
    }
}

impl SessionCell {
    fn new(session: Session) -> Arc<SessionCell> {
        let inbox = Inbox::new(session.max_queue, session.max_bytes);
        let persistent = AtomicBool::new(session.persistent());
        let numbers = session.numbers();
        Arc::new(SessionCell {
            persistent,
            numbers,
            client_id: session.client_id.clone(),
            owner: session.owner.clone(),
            slot: Mutex::new(Slot {
                session,
                link: None,
                pending_will: None,
            }),
            inbox,
            online: AtomicBool::new(false),
            queue_empty: AtomicBool::new(false),
            wake: Notify::new(),
            wake_pending: AtomicBool::new(false),
            ended: AtomicBool::new(false),
            moved: AtomicBool::new(false),
        })
    }

    /// Attaches (`Some`) or detaches (`None`) a connection, under the
    /// session's lock held as `slot`.
    fn set_link(&self, slot: &mut Slot, link: Option<Link>) {
        self.online.store(link.is_some(), Ordering::Release);
        if link.is_some() {
            self.inbox.overloaded.store(false, Ordering::Relaxed);
        }
        slot.link = link;
    }

    /// A connection is attached (no lock taken).
    pub fn is_online(&self) -> bool {
        self.online.load(Ordering::Acquire)
    }

    /// Delivers a plain (not sequenced chat) message to this session at
    /// `qos` (already reduced), with RETAIN as the subscriber sees it: the
    /// one path every plain delivery takes, routed or from the chat layer
    /// (events, presence, typing). QoS 0 to a connected session with
    /// nothing queued goes to its inbox without the session's lock; the
    /// rest is queued under it, with the writes of a persistent session in
    /// `batch`. `fan_out`: the same message goes to other sessions too (its
    /// encoding is shared). Returns how many messages were dropped (this
    /// one, or older ones it pushed out), for the caller to count.
    pub fn deliver(
        &self,
        msg: &Arc<Message>,
        qos: QoS,
        retain: bool,
        sub_ids: Vec<u32>,
        fan_out: bool,
        batch: &mut Batch,
    ) -> u64 {
        if qos == QoS::AtMostOnce && self.takes_inbox() {
            let plain = Plain {
                msg: msg.clone(),
                retain,
                sub_ids,
                shared: fan_out,
            };
            if !self.inbox.offer(plain) {
                return 1;
            }
            self.wake_up();
            return 0;
        }
        if qos != QoS::AtMostOnce && self.is_online() && self.inbox.has_room(msg.budget_size()) {
            // Staged without the session's lock: numbered in the inbox,
            // stored into this publisher's batch if the session persists.
            let body = self
                .persistent
                .load(Ordering::Acquire)
                .then(|| batch.share_body(msg, || msg.to_record()));
            self.inbox.stage(&self.numbers, |n| {
                Session::staged(
                    &self.client_id,
                    n,
                    msg.clone(),
                    qos,
                    retain,
                    sub_ids,
                    body,
                    batch,
                )
            });
            self.wake_up();
            return 0;
        }
        let mut slot = self.lock();
        let s = &mut slot.session;
        let before = s.dropped;
        s.enqueue(msg.clone(), qos, retain, sub_ids, batch);
        let dropped = s.dropped - before;
        let connected = slot.link.is_some();
        drop(slot);
        if connected {
            self.wake_up();
        }
        dropped
    }

    /// Wakes the connection to send what was just queued (after the queue
    /// or inbox was changed): once per batch of deliveries it has not
    /// looked at yet, not once per delivery.
    pub fn wake_up(&self) {
        if !self.wake_pending.swap(true, Ordering::SeqCst) {
            self.wake.notify_one();
        }
    }

    /// The connection is about to take what waits: a delivery from now on
    /// wakes it again. Called before the queue and inbox are read, so a
    /// delivery that saw the flag still set is among what is read.
    pub fn woke(&self) {
        self.wake_pending.store(false, Ordering::SeqCst);
    }

    /// A QoS 0 message may go to the inbox: connected, and nothing queued
    /// that must go out first.
    fn takes_inbox(&self) -> bool {
        self.is_online() && self.queue_empty.load(Ordering::Acquire)
    }

    /// Takes what waits in the inbox, under the session's lock (`slot`):
    /// staged messages into the queue, and the QoS 0 ones into `direct`
    /// (to be written before the queue) up to the first staged one, and
    /// after it into the queue too, so none overtakes it. Without `direct`
    /// (the connection is not the caller) every QoS 0 message is queued.
    pub fn absorb(
        &self,
        slot: &mut Slot,
        batch: &mut Batch,
        mut direct: Option<&mut std::collections::VecDeque<Plain>>,
    ) {
        let mut staged_before = false;
        for item in self.inbox.take() {
            match item {
                Inboxed::Staged(o) => {
                    staged_before = true;
                    slot.session.admit(o, batch);
                }
                Inboxed::Plain(p) => match direct.as_deref_mut() {
                    Some(d) if !staged_before => d.push_back(p),
                    _ => slot
                        .session
                        .enqueue(p.msg, QoS::AtMostOnce, p.retain, p.sub_ids, batch),
                },
            }
        }
    }

    /// The session leaves the disk (see [`Session::delete_stored`]), with
    /// what its publishers staged and stored for it.
    pub fn delete_stored(&self, slot: &mut Slot, batch: &mut Batch) {
        self.absorb(slot, batch, None);
        slot.session.delete_stored(batch);
    }

    /// Locks the session. A poisoned lock (a panic elsewhere) still yields
    /// the state: the broker keeps serving rather than cascading.
    pub fn lock(&self) -> SlotGuard<'_> {
        SlotGuard {
            guard: self.slot.lock().unwrap_or_else(|e| e.into_inner()),
            queue_empty: &self.queue_empty,
            persistent: &self.persistent,
        }
    }
}

/// What a CONNECT asks of its session.
pub struct Attach {
    pub client_id: Arc<str>,
    pub owner: Option<Arc<str>>,
    pub protocol: Protocol,
    pub clean_start: bool,
    pub expiry_secs: u32,
    pub max_inflight: u16,
    pub conn_id: u64,
    /// With `[cluster]`: the client id's value in the sessions bucket, if
    /// it has one (`crate::roaming`).
    pub roamed: Option<crate::roaming::Roamed>,
}

/// Why a CONNECT may not have the session of its client id.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    /// The client id belongs to another user, or to an anonymous session
    /// (0x87 / 3.1.1 0x05).
    NotOwner,
    /// The user already holds `mqtt.max_sessions_per_user` persistent
    /// sessions (0x97 / 3.1.1 0x03).
    SessionQuota,
    /// The claim could not be read (0x88 / 3.1.1 0x03).
    Unavailable,
}

/// The result of attaching: the session, whether it existed (Session
/// Present), and the channel on which a takeover will be announced.
pub struct Attached {
    pub cell: Arc<SessionCell>,
    pub present: bool,
    pub kicked: oneshot::Receiver<Kick>,
}

/// Counters exported for operators (`GET /metrics`). Shared with the chat
/// layer, which counts what it appends and drops.
#[derive(Default)]
pub struct Metrics {
    /// Open MQTT connections, by listener (once past the TLS and
    /// WebSocket handshakes).
    pub connections: ByLabel<Listeners>,
    /// Connections a listener accepted (admitted: not refused by the
    /// per-address limits), by listener.
    pub accepted: ByLabel<Listeners>,
    /// Connections ended after their CONNECT was read, by why
    /// (`connection::disconnect_reason`).
    pub disconnects: ByLabel<crate::connection::Disconnects>,
    /// PUBLISH packets received from clients (any topic).
    pub publishes_received: Counter,
    /// Plain-MQTT messages routed (publishes and wills).
    pub messages_in: Counter,
    /// PUBLISH packets written to clients (first sends and resends).
    pub messages_delivered: Counter,
    /// Chat messages given a seq (MQTT and HTTP senders).
    pub chat_appended: Counter,
    /// Messages a session dropped: its queue was full or they expired.
    pub messages_dropped: Counter,
    // abuse limits: identity
    /// CONNECTs refused: the client id belongs to someone else.
    pub client_id_refused: Counter,
    /// CONNECTs refused: the user holds its maximum of persistent sessions.
    pub session_quota_refused: Counter,
    /// Logins moved on by an MQTT 5 re-authentication (AUTH 0x19).
    pub reauthentications: Counter,
    /// Connections refused before CONNECT was accepted, by reason.
    pub refused: crate::admission::Refusals,
    // topics and retained messages (trie)
    /// Topic names and filters refused for passing `mqtt.max_topic_levels`
    /// or `mqtt.max_topic_length`.
    pub topics_refused: Counter,
    /// Retained publishes not retained: the store was at its caps.
    pub retained_refused: Counter,
    /// Retained messages a new subscription was not sent: more matched
    /// than `mqtt.max_retained_per_subscription`.
    pub retained_not_sent: Counter,
    // flow control: slow clients, rates, caches
    /// Connections closed because a write did not finish within
    /// `mqtt.write_timeout_secs` (the client stopped reading).
    pub write_timeouts: Counter,
    /// Connections closed because their session went over its byte budget.
    pub overload_disconnects: Counter,
    /// Publishes refused by a per-connection or per-user rate.
    pub publishes_rate_limited: Counter,
    /// Live chat messages not queued in a full session: replayed from the
    /// log once the client drains (deferred, not lost).
    /// Idempotency lookups of a chat message that had to read the disk
    /// (on the blocking pool; the rest are answered from memory).
    pub chat_dedup_disk_reads: Counter,
    pub chat_deferred_to_log: Counter,
    /// Typing indicators dropped by the per-user throttle.
    pub typing_throttled: Counter,
    /// Read receipts and membership changes of large groups gathered into
    /// a digest instead of announced to every member one by one.
    pub announcements_coalesced: Counter,
    /// `reads` and `members` digests sent (one per conversation and kind).
    pub announcement_digests: Counter,
    /// Presence changes not told because the user's window was open (its
    /// end tells the latest state).
    pub presence_coalesced: Counter,
    /// Typing indicators refused for their size.
    pub typing_too_large: Counter,
    /// Reactions added or removed (issue #13; `chat/reactions.rs`).
    pub reactions: Counter,
    /// `reactions` summary events sent, one per conversation and window.
    pub reaction_digests: Counter,
    /// Room reactions dropped by the per-user throttle.
    pub room_reactions_throttled: Counter,
    /// `occupancy/{conv}` updates sent, one per conversation and window.
    pub occupancy_updates: Counter,
    /// Messages edited and deleted (`chat/edits.rs`).
    pub messages_edited: Counter,
    pub messages_deleted: Counter,
    /// Conversation states evicted from memory.
    pub conv_cache_evicted: Counter,
    /// Idempotency keys deleted after `chat.dedup_ttl_secs`.
    pub dedup_expired: Counter,
    /// Catch-up pages read from the log (`chat/replay_pages.rs`).
    pub replay_pages_read: Counter,
    /// Catch-up pages served from one another session read, without a
    /// storage read.
    pub replay_pages_shared: Counter,
}

pub struct Broker {
    pub settings: Arc<Settings>,
    pub chat: Arc<Chat>,
    pub store: Store,
    pub auth: Authenticator,
    pub acl: Acl,
    pub metrics: Arc<Metrics>,
    /// What embedding programs check each client PUBLISH with.
    pub interceptors: Interceptors,
    /// Who may use which client id.
    pub owners: Ownership,
    /// Sharded by thread: a publish read-locks its own cache line, not one
    /// every core bumps; a (rarer) subscribe locks every shard.
    router: ShardedLock<Router<Arc<SessionCell>>>,
    sessions: Mutex<Sessions>,
    /// When disconnected persistent sessions expire (see [`Deadlines`]).
    expiries: Mutex<Deadlines>,
    /// When delayed wills are due.
    wills: Mutex<Deadlines>,
    /// Woken when a deadline earlier than all others is set.
    pub timers: Notify,
    retained: RwLock<RetainedStore>,
    next_id: AtomicU64,
    // flow control
    /// The publish limits in force, and each user's publish rate, shared
    /// by its connections.
    pub publish_limits: PublishLimits,
    /// The MQTT bridges' metrics, one per `[[bridge.remotes]]` (set once
    /// at start-up).
    pub bridges: std::sync::OnceLock<Vec<Arc<chatmq_bridge::mqtt::Metrics>>>,
    /// Serving, draining or stopping: what every connection watches.
    pub drain: crate::drain::Drain,
    /// With `[cluster]`: plain MQTT to and from the other nodes.
    pub remote: std::sync::OnceLock<Arc<crate::remote::Remote>>,
    /// With `[cluster]`: where each client id's session is.
    roaming: std::sync::OnceLock<Arc<crate::roaming::Roaming>>,
}

/// Gives a new session what the value of another node holds: its
/// subscriptions and chat cursors (the client's acknowledgements since
/// its node last wrote them, if it died with the client connected, go out
/// again marked DUP, as after a crash here: see `Broker::restore`).
fn import_roamed(session: &mut Session, r: &crate::roaming::Roamed, batch: &mut Batch) {
    for sub in &r.subscriptions {
        session.subscriptions.insert(
            sub.filter.clone(),
            SubOptions {
                qos: crate::message::qos_from_u8(sub.qos),
                no_local: sub.no_local,
                retain_as_published: sub.retain_as_published,
                retain_handling: sub.retain_handling,
                identifier: sub.identifier,
            },
        );
    }
    let crashed = r.disconnected_at_ms == 0;
    for (conv, seq) in &r.cursors {
        let mut cursor = crate::session::ChatCursor::at(*seq);
        if crashed {
            cursor.dup_until = seq.saturating_add(u64::from(CURSOR_SAVE_ACKS));
        }
        session.chat.insert(conv.as_str().into(), cursor);
        if session.persistent() {
            batch.put_cursor(&session.client_id, conv, *seq);
        }
    }
}

/// When a disconnected session expires (unix ms).
fn expiry_deadline(s: &Session) -> u64 {
    s.disconnected_at_ms
        .saturating_add(u64::from(s.expiry_secs).saturating_mul(1000))
}

fn read<T>(l: &RwLock<T>) -> std::sync::RwLockReadGuard<'_, T> {
    l.read().unwrap_or_else(|e| e.into_inner())
}

fn write<T>(l: &RwLock<T>) -> std::sync::RwLockWriteGuard<'_, T> {
    l.write().unwrap_or_else(|e| e.into_inner())
}

fn read_router<T>(l: &ShardedLock<T>) -> ShardedLockReadGuard<'_, T> {
    l.read().unwrap_or_else(|e| e.into_inner())
}

fn write_router<T>(l: &ShardedLock<T>) -> ShardedLockWriteGuard<'_, T> {
    l.write().unwrap_or_else(|e| e.into_inner())
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Broker {
    /// Builds the broker and restores sessions and retained messages.
    pub fn new(
        settings: Arc<Settings>,
        store: Store,
        auth: Authenticator,
    ) -> Result<Arc<Broker>, chatmq_storage::StorageError> {
        let acl = Acl::new(&settings.acl.rules);
        let publish_limits = PublishLimits::new(&settings.mqtt);
        let metrics = Arc::new(Metrics::default());
        let push = chatmq_bridge::push::Push::open(store.clone(), &settings.push)?;
        let mut chat = Chat::new(store.clone(), metrics.clone(), push)?;
        chat.history_cap = settings.chat.history_limit;
        chat.limit(&settings.chat);
        chat.limit_attachments(&settings.attachments, &settings.node.data_dir);
        let chat = Arc::new(chat);
        let owners = Ownership::new(settings.mqtt.client_owner_ttl_secs);
        let retained = RetainedStore::new(
            settings.mqtt.max_retained_messages,
            settings.mqtt.max_retained_bytes,
        );
        let broker = Broker {
            owners,
            settings,
            chat,
            store,
            auth,
            acl,
            metrics,
            interceptors: Interceptors::default(),
            router: ShardedLock::new(Router::default()),
            sessions: Mutex::new(Sessions::default()),
            expiries: Mutex::new(Deadlines::default()),
            wills: Mutex::new(Deadlines::default()),
            timers: Notify::new(),
            retained: RwLock::new(retained),
            next_id: AtomicU64::new(1),
            publish_limits,
            bridges: std::sync::OnceLock::new(),
            drain: crate::drain::Drain::default(),
            remote: std::sync::OnceLock::new(),
            roaming: std::sync::OnceLock::new(),
        };
        broker.restore()?;
        Ok(Arc::new(broker))
    }

    fn restore(&self) -> Result<(), chatmq_storage::StorageError> {
        let now = now_ms();
        let mut sessions = self.lock_sessions();
        let mut router = write_router(&self.router);
        let mut bodies = crate::session::RestoredBodies::new();
        for mut stored in self.store.load_sessions()? {
            // Connected when the broker died: its last acknowledgements may
            // be newer than the cursors written (see `CURSOR_SAVE_ACKS`).
            let crashed = stored.record.disconnected_at_ms == 0;
            let cursors = std::mem::take(&mut stored.cursors);
            let mut session = Session::restore(stored, now, &mut bodies);
            session.max_queue = self.settings.mqtt.max_offline_messages;
            session.max_bytes = self.settings.mqtt.session_queue_bytes;
            for (conv, seq) in cursors {
                let mut cursor = crate::session::ChatCursor::at(seq);
                if crashed {
                    cursor.dup_until = seq.saturating_add(u64::from(CURSOR_SAVE_ACKS));
                }
                session.chat.insert(conv.into(), cursor);
            }
            let owner = session.owner.clone();
            let cell = SessionCell::new(session);
            for (filter, options) in &cell.lock().session.subscriptions {
                router.subscribe(&cell.client_id, filter, *options, cell.clone());
            }
            if let Some(user) = owner {
                self.chat.register(&user, &cell);
            }
            self.schedule_expiry(&cell.client_id, &cell.lock().session);
            sessions.insert(cell.client_id.clone(), cell);
        }
        drop(router);
        drop(sessions);
        let mut retained = write(&self.retained);
        for record in self.store.load_retained()? {
            retained.restore(Arc::new(Message::from_record(record)));
        }
        Ok(())
    }

    fn lock_sessions(&self) -> MutexGuard<'_, Sessions> {
        lock(&self.sessions)
    }

    /// What the channel asks about the topics the broker owns and the
    /// sessions' lives: the chat layer. (Opaque, so the channel depends on
    /// the [`Hooks`] contract only, and calls it without dynamic dispatch.)
    pub fn hooks(&self) -> &impl Hooks {
        &self.chat
    }

    /// A fresh id for a connection (or a pending will).
    pub fn next_id(&self) -> u64 {
        self.next_id.fetch_add(1, Ordering::Relaxed)
    }

    pub fn session(&self, client_id: &str) -> Option<Arc<SessionCell>> {
        self.lock_sessions().get(client_id).cloned()
    }

    pub fn session_count(&self) -> usize {
        self.lock_sessions().len()
    }

    /// Bytes of messages every session holds in memory, queued or in
    /// flight (each bounded by `mqtt.session_queue_bytes`).
    pub fn held_bytes(&self) -> usize {
        self.lock_sessions()
            .values()
            .map(|c| {
                c.lock()
                    .session
                    .held_bytes()
                    .saturating_add(c.inbox.bytes())
            })
            .fold(0, usize::saturating_add)
    }

    /// Attaches a new connection to the session of its client id: resumes
    /// it, or replaces it when Clean Start is set or it was not persistent.
    /// A connection already attached is kicked [MQTT-3.1.4-3]. Refused,
    /// before anything changes, when the client id is not the caller's
    /// (see [`crate::ownership`]) or a new persistent session would exceed
    /// the user's quota; the claim is written into `batch`.
    pub async fn attach(&self, a: Attach, batch: &mut Batch) -> Result<Attached, Refused> {
        // Held until the new session is in the map: the check and the claim
        // are one step for every CONNECT of this client id.
        let _claim = self.owners.lock(&a.client_id).await;
        // From memory when it can be (nearly always: a new id is ruled out
        // by the bloom filter), else from disk on the blocking pool. The
        // hop was a quarter of the broker's CPU in a connection storm (#11).
        let read = match self.store.client_owner_in_memory(&a.client_id) {
            Ok(Cached::Known(stored)) => Ok(stored),
            Ok(Cached::Uncached) => {
                let id = a.client_id.clone();
                crate::blocking::read(&self.store, move |s| s.client_owner(&id)).await
            }
            Err(e) => Err(e),
        };
        let stored = read.map_err(|e| {
            tracing::error!(error = %e, "cannot read client owner");
            Refused::Unavailable
        })?;
        self.attach_claimed(a, stored, batch)
    }

    /// The rest of [`Broker::attach`], under the claim lock, with the
    /// stored claim read.
    fn attach_claimed(
        &self,
        mut a: Attach,
        stored: Option<chatmq_storage::ClientOwner>,
        batch: &mut Batch,
    ) -> Result<Attached, Refused> {
        let who = a.owner.as_deref();
        let now = now_ms();
        // With `[cluster]`: a session that lives on another node is its
        // owner's there too.
        let roamed = a.roamed.take().filter(|r| r.live(now));
        if roamed.as_ref().is_some_and(|r| r.owner.as_deref() != who) {
            self.metrics
                .client_id_refused
                .fetch_add(1, Ordering::Relaxed);
            return Err(Refused::NotOwner);
        }
        let mut sessions = self.lock_sessions();
        let mut existing = sessions.get(&a.client_id).cloned();
        // The client was attached to another node since this one's session
        // (or this one has none): that node's session is the one resumed,
        // and this node's is stale.
        let node = self.roaming.get().map(|r| r.node());
        let import = roamed.filter(|r| {
            !a.clean_start
                && r.resumable(now)
                && (existing.is_none() || Some(r.node.as_str()) != node)
        });
        if let (Some(_), Some(stale)) = (&import, &existing) {
            self.end_stale(stale, true, &mut sessions, batch);
            existing = None;
        }
        let (session_owner, resumable) = match &existing {
            Some(cell) => {
                let slot = cell.lock();
                (Some(slot.session.owner.clone()), slot.session.persistent())
            }
            None => (None, false),
        };
        if !ownership::admits(
            stored.as_ref(),
            session_owner.as_ref().map(|o| o.as_deref()),
            who,
        ) {
            self.metrics
                .client_id_refused
                .fetch_add(1, Ordering::Relaxed);
            return Err(Refused::NotOwner);
        }
        let resumes = resumable && !a.clean_start;
        // Anonymous clients have no quota of their own: together they may
        // hold `mqtt.max_anonymous_sessions`, and beyond it a new
        // persistent one is refused (one that replaces a session is not new).
        if a.owner.is_none()
            && existing.is_none()
            && a.expiry_secs > 0
            && sessions.anonymous >= self.settings.mqtt.max_anonymous_sessions
        {
            self.metrics
                .session_quota_refused
                .fetch_add(1, Ordering::Relaxed);
            return Err(Refused::SessionQuota);
        }
        if let (Some(user), false, true) = (&a.owner, resumes, a.expiry_secs > 0) {
            if self.persistent_sessions_of(&sessions, user, &a.client_id)
                >= self.settings.mqtt.max_sessions_per_user
            {
                self.metrics
                    .session_quota_refused
                    .fetch_add(1, Ordering::Relaxed);
                return Err(Refused::SessionQuota);
            }
        }
        self.owners
            .stamp(&a.client_id, stored.as_ref(), who, now_ms(), batch);

        let (tx, kicked) = oneshot::channel();
        let link = Link {
            conn_id: a.conn_id,
            kick: Some(tx),
        };
        let mut ended_will = None;
        if let Some(cell) = existing {
            let mut slot = cell.lock();
            if let Some(mut old) = slot.link.take() {
                // Not waited for here: `evict` did, if the client may.
                drop(old.kick());
            }
            let pending = slot.pending_will.take();
            if !a.clean_start && slot.session.persistent() {
                let s = &mut slot.session;
                s.protocol = a.protocol;
                s.expiry_secs = a.expiry_secs;
                s.max_inflight = a.max_inflight;
                s.connected = true;
                s.overloaded = false;
                s.disconnected_at_ms = 0;
                if s.persistent() {
                    batch.put_session(&s.client_id, &s.record());
                } else {
                    // Resumed as a session that now ends with this connection.
                    cell.delete_stored(&mut slot, batch);
                }
                cell.set_link(&mut slot, Some(link));
                drop(slot);
                return Ok(Attached {
                    cell,
                    present: true,
                    kicked,
                });
            }
            // The old session ends here, so does a will waiting on it.
            ended_will = pending;
            let filters: Vec<String> = slot.session.subscriptions.keys().cloned().collect();
            if slot.session.persistent() {
                cell.delete_stored(&mut slot, batch);
            }
            drop(slot);
            cell.ended.store(true, Ordering::Release);
            let mut router = write_router(&self.router);
            for f in &filters {
                if router.unsubscribe(&a.client_id, f) {
                    self.unsubscribed(f);
                }
            }
        }
        let mut session = Session::new(
            a.client_id.clone(),
            a.owner.clone(),
            a.protocol,
            a.expiry_secs,
        );
        session.max_inflight = a.max_inflight;
        session.max_queue = self.settings.mqtt.max_offline_messages;
        session.max_bytes = self.settings.mqtt.session_queue_bytes;
        let present = import.is_some();
        if let Some(r) = &import {
            import_roamed(&mut session, r, batch);
        }
        if session.persistent() {
            batch.put_session(&session.client_id, &session.record());
        }
        let cell = SessionCell::new(session);
        cell.set_link(&mut cell.lock(), Some(link));
        sessions.insert(a.client_id.clone(), cell.clone());
        if present {
            let filters: Vec<(String, SubOptions)> = cell
                .lock()
                .session
                .subscriptions
                .iter()
                .map(|(f, o)| (f.clone(), *o))
                .collect();
            for (f, o) in &filters {
                self.index_subscription(&cell, f, *o);
            }
            if let Some(r) = self.roaming.get() {
                r.metrics.imported.fetch_add(1, Ordering::Relaxed);
            }
        }
        if let Some(user) = &a.owner {
            // Counted from now on by the user's session quota.
            self.chat.register(user, &cell);
        }
        drop(sessions);
        if let Some(w) = ended_will {
            self.route_will(*w, batch);
        }
        Ok(Attached {
            cell,
            present,
            kicked,
        })
    }

    /// Removes this node's session of a client id whose client resumed on
    /// another node since: its subscriptions leave the index, its stored
    /// state the disk. (Under the session map's lock, `sessions`.)
    fn end_stale(
        &self,
        cell: &Arc<SessionCell>,
        resumed: bool,
        sessions: &mut Sessions,
        batch: &mut Batch,
    ) {
        // Before the connection is told: its end reads it.
        cell.moved.store(resumed, Ordering::Release);
        let filters: Vec<String> = {
            let mut slot = cell.lock();
            if let Some(mut old) = slot.link.take() {
                drop(old.kick());
            }
            slot.pending_will = None;
            if slot.session.persistent() {
                cell.delete_stored(&mut slot, batch);
            }
            slot.session.subscriptions.keys().cloned().collect()
        };
        sessions.remove(&cell.client_id);
        cell.ended.store(true, Ordering::Release);
        let mut router = write_router(&self.router);
        for f in &filters {
            if router.unsubscribe(&cell.client_id, f) {
                self.unsubscribed(f);
            }
        }
    }

    /// With `[cluster]`: the client of `client_id` is attached to another
    /// node now (its value there is newer than this node's). The
    /// connection here, if any, is closed with 0x8E like any taken over;
    /// the session here ends without its will when the client resumed it
    /// there (a will of a connection is published as on a takeover).
    pub fn moved_away(self: &Arc<Self>, client_id: &str, resumed: bool) {
        let mut batch = Batch::new();
        let will = {
            let mut sessions = self.lock_sessions();
            let Some(cell) = sessions.get(client_id).cloned() else {
                return;
            };
            let pending = cell.lock().pending_will.take();
            self.end_stale(&cell, resumed, &mut sessions, &mut batch);
            pending
        };
        if let (Some(w), false) = (will, resumed) {
            self.route_will(*w, &mut batch);
        }
        if let Some(r) = self.roaming.get() {
            r.metrics.moved_away.fetch_add(1, Ordering::Relaxed);
        }
        drop(self.store.submit_now(batch));
    }

    /// With `[cluster]`: where each client id's session is.
    pub fn roaming(&self) -> Option<&Arc<crate::roaming::Roaming>> {
        self.roaming.get()
    }

    pub(crate) fn attach_roaming(&self, roaming: Arc<crate::roaming::Roaming>) {
        let _ = self.roaming.set(roaming);
    }

    /// A session's state that another node resumes from changed (its
    /// subscriptions, saved cursors, connection): with `[cluster]`, its
    /// value in the sessions bucket is written again.
    pub fn session_changed(&self, client_id: &Arc<str>) {
        if let Some(r) = self.roaming.get() {
            r.changed(client_id);
        }
    }

    /// The persistent sessions `user` holds under other client ids than
    /// `except`. Called with the session map locked (`sessions`), so two
    /// CONNECTs cannot both take the last place.
    fn persistent_sessions_of(
        &self,
        sessions: &HashMap<Arc<str>, Arc<SessionCell>>,
        user: &str,
        except: &str,
    ) -> usize {
        self.chat
            .sessions_of(user)
            .iter()
            .filter(|cell| {
                *cell.client_id != *except
                    && sessions
                        .get(&cell.client_id)
                        .is_some_and(|c| Arc::ptr_eq(c, cell))
                    && cell.lock().session.persistent()
            })
            .count()
    }

    /// Before `owner` attaches to `client_id`: tells the connection
    /// attached there, if any, to close, and returns what resolves when it
    /// has. Only a connection of the same owner is told: a refused CONNECT
    /// must not disturb anyone.
    pub fn evict(
        &self,
        client_id: &str,
        owner: Option<&Arc<str>>,
    ) -> Option<oneshot::Receiver<()>> {
        let cell = self.session(client_id)?;
        let mut slot = cell.lock();
        if slot.session.owner.as_ref() != owner {
            return None;
        }
        slot.link.as_mut()?.kick()
    }

    /// The connection `conn_id` has ended. A session that does not outlive
    /// it is removed; a persistent one waits for its client, with the will
    /// scheduled if it has a delay. Returns false if the connection no
    /// longer owned the session (taken over).
    pub fn detach(
        self: &Arc<Self>,
        cell: &Arc<SessionCell>,
        conn_id: u64,
        will: Option<(Message, u32)>,
        batch: &mut Batch,
    ) -> bool {
        let mut slot = cell.lock();
        if slot.link.as_ref().map(|l| l.conn_id) != Some(conn_id) {
            // Taken over: the old connection's will is still due
            // [MQTT-3.1.4-3], unless it has a delay and the new connection
            // resumed the session [MQTT-3.1.3-9].
            let owner = slot.session.owner.clone();
            drop(slot);
            if let Some((message, delay)) = will {
                let resumed = cell.moved.load(Ordering::Acquire)
                    || self
                        .session(&cell.client_id)
                        .is_some_and(|c| Arc::ptr_eq(&c, cell));
                if delay == 0 || !resumed {
                    let w = PendingWill { message, owner };
                    self.route_will(w, batch);
                }
            }
            return false;
        }
        cell.set_link(&mut slot, None);
        let owner = slot.session.owner.clone();
        slot.session.connected = false;
        slot.session.disconnected_at_ms = now_ms();
        // What publishers staged is queued (kept while the session waits
        // for its client, off the disk with it if it ends; QoS 0 is not
        // kept for a client that is gone).
        cell.absorb(&mut slot, batch, None);
        self.session_changed(&cell.client_id);
        if !slot.session.persistent() {
            let filters: Vec<String> = slot.session.subscriptions.keys().cloned().collect();
            drop(slot);
            self.remove_session(cell, &filters);
            if let Some((message, _)) = will {
                self.route_will(PendingWill { message, owner }, batch);
            }
            return true;
        }
        slot.session.flush_cursors(batch);
        batch.put_session(&cell.client_id, &slot.session.record());
        self.schedule_expiry(&cell.client_id, &slot.session);
        match will {
            Some((message, 0)) => {
                drop(slot);
                self.route_will(PendingWill { message, owner }, batch);
            }
            Some((message, delay)) => {
                // A will waits for the delay or the end of the session,
                // whichever comes first [MQTT-3.1.3-9].
                let wait = delay.min(slot.session.expiry_secs);
                slot.pending_will = Some(Box::new(PendingWill { message, owner }));
                let due = slot
                    .session
                    .disconnected_at_ms
                    .saturating_add(u64::from(wait).saturating_mul(1000));
                drop(slot);
                self.schedule(&self.wills, &cell.client_id, due);
            }
            None => {}
        }
        true
    }

    fn remove_session(&self, cell: &Arc<SessionCell>, filters: &[String]) {
        let mut sessions = self.lock_sessions();
        if sessions
            .get(&cell.client_id)
            .is_some_and(|c| Arc::ptr_eq(c, cell))
        {
            sessions.remove(&cell.client_id);
            drop(sessions);
            cell.ended.store(true, Ordering::Release);
            let mut router = write_router(&self.router);
            for f in filters {
                if router.unsubscribe(&cell.client_id, f) {
                    self.unsubscribed(f);
                }
            }
        }
    }

    fn route_will(&self, w: PendingWill, batch: &mut Batch) {
        let allowed = self.acl.can_publish(
            w.owner.as_deref(),
            w.message.publisher.as_deref().unwrap_or(""),
            &w.message.topic,
        );
        if allowed {
            self.route(Arc::new(w.message), batch);
        }
    }

    /// Removes persistent sessions whose expiry has passed; a will waiting
    /// on one is published [MQTT-3.1.2-8]. Returns how many were removed.
    /// Indexes when the disconnected session `s` expires.
    fn schedule_expiry(&self, client_id: &Arc<str>, s: &Session) {
        if s.connected {
            return;
        }
        self.schedule(&self.expiries, client_id, expiry_deadline(s));
    }

    /// Sets a deadline in `index`, waking the timer task if it comes first.
    fn schedule(&self, index: &Mutex<Deadlines>, client_id: &Arc<str>, deadline: u64) {
        let first = lock(index).schedule(client_id, deadline);
        if first {
            self.timers.notify_one();
        }
    }

    /// The earliest deadline of a session expiry or a delayed will.
    pub fn next_deadline(&self) -> Option<u64> {
        match (lock(&self.expiries).next(), lock(&self.wills).next()) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// Publishes the delayed wills due at `now_ms` whose session is still
    /// disconnected; returns how many.
    pub fn fire_wills(&self, now_ms: u64) -> usize {
        let due = lock(&self.wills).take_due(now_ms);
        let mut batch = Batch::new();
        let mut fired = 0;
        for client_id in due {
            let Some(cell) = self.session(&client_id) else {
                continue; // the session ended, and its will with it
            };
            // Taken only if still pending: a resumed session took it already.
            let will = cell.lock().pending_will.take();
            if let Some(w) = will {
                self.route_will(*w, &mut batch);
                fired += 1;
            }
        }
        // Queued for the writer; nobody waits for it to be durable.
        drop(self.store.submit_now(batch));
        fired
    }

    /// Ends the disconnected sessions whose expiry has passed at `now_ms`
    /// (their wills, if pending, are published); returns how many. Only
    /// the sessions the index says are due are looked at.
    pub fn expire_sessions(&self, now_ms: u64) -> usize {
        let due = lock(&self.expiries).take_due(now_ms);
        let mut expired = Vec::new();
        let mut later = Vec::new();
        {
            let sessions = self.lock_sessions();
            for client_id in &due {
                let Some(cell) = sessions.get(client_id) else {
                    continue;
                };
                let slot = cell.lock();
                let s = &slot.session;
                if s.connected || slot.link.is_some() {
                    continue; // resumed: indexed again when it leaves
                }
                if now_ms >= expiry_deadline(s) {
                    expired.push(cell.clone());
                } else {
                    // Not due after all: kept, never dropped by a stale entry.
                    later.push((client_id.clone(), expiry_deadline(s)));
                }
            }
        }
        if !later.is_empty() {
            let mut expiries = lock(&self.expiries);
            for (client_id, deadline) in &later {
                expiries.schedule(client_id, *deadline);
            }
        }
        let mut batch = Batch::new();
        for cell in &expired {
            let (filters, will) = {
                let mut slot = cell.lock();
                if slot.link.is_some() {
                    continue; // resumed meanwhile
                }
                cell.delete_stored(&mut slot, &mut batch);
                (
                    slot.session
                        .subscriptions
                        .keys()
                        .cloned()
                        .collect::<Vec<_>>(),
                    slot.pending_will.take(),
                )
            };
            self.remove_session(cell, &filters);
            self.session_changed(&cell.client_id);
            if let Some(w) = will {
                self.route_will(*w, &mut batch);
            }
        }
        // Queued for the writer; nobody waits for it to be durable.
        drop(self.store.submit_now(batch));
        expired.len()
    }

    /// The bounds on topic names and filters, from `[mqtt]`.
    pub fn topic_limits(&self) -> TopicLimits {
        TopicLimits {
            max_levels: self.settings.mqtt.max_topic_levels,
            max_length: self.settings.mqtt.max_topic_length,
        }
    }

    /// Adds `cell`'s subscription to `filter` to the index.
    pub fn index_subscription(&self, cell: &Arc<SessionCell>, filter: &str, options: SubOptions) {
        let mut router = write_router(&self.router);
        if router.subscribe(&cell.client_id, filter, options, cell.clone()) {
            if let Some(r) = self.remote.get() {
                r.subscribed(filter);
            }
        }
    }

    pub fn unindex_subscription(&self, client_id: &str, filter: &str) -> bool {
        let removed = write_router(&self.router).unsubscribe(client_id, filter);
        if removed {
            self.unsubscribed(filter);
        }
        removed
    }

    /// No session of this node holds `filter` once more (with `[cluster]`,
    /// the other nodes may stop sending it).
    fn unsubscribed(&self, filter: &str) {
        if let Some(r) = self.remote.get() {
            r.unsubscribed(filter);
        }
    }

    /// Links this broker to the other nodes of its cluster for plain MQTT
    /// ([`crate::remote`]); the filters its sessions hold so far (those
    /// restored at start-up) are its interest from now on.
    pub(crate) fn attach_remote(&self, remote: Arc<crate::remote::Remote>) {
        let sessions = self.lock_sessions();
        if self.remote.set(remote.clone()).is_err() {
            return;
        }
        for cell in sessions.values() {
            for filter in cell.lock().session.subscriptions.keys() {
                remote.subscribed(filter);
            }
        }
    }

    /// The retained messages a new subscription to `filter` gets: all that
    /// match, up to `mqtt.max_retained_per_subscription`; the rest are
    /// counted and logged.
    pub fn retained_for(&self, filter: &str) -> Vec<Arc<Message>> {
        let limit = self.settings.mqtt.max_retained_per_subscription;
        let (found, beyond) = read(&self.retained).matching(filter, now_ms(), limit);
        if beyond > 0 {
            self.metrics
                .retained_not_sent
                .fetch_add(beyond as u64, Ordering::Relaxed);
            tracing::warn!(
                filter,
                sent = found.len(),
                not_sent = beyond,
                "more retained messages match a new subscription than mqtt.max_retained_per_subscription"
            );
        }
        found
    }

    /// Would `msg` be retained, or is the retained store at its caps?
    pub fn retained_fits(&self, msg: &Message) -> bool {
        read(&self.retained).fits(msg)
    }

    /// Retained messages held, and their bytes (for metrics).
    pub fn retained_size(&self) -> (usize, usize) {
        let retained = read(&self.retained);
        (retained.len(), retained.bytes())
    }

    /// Takes `msg` to every session subscribed to its topic, and keeps it
    /// as the retained message of the topic if it asks to be
    /// [MQTT-3.3.1-5], [MQTT-3.3.1-10]. Durable effects go into `batch`.
    pub fn route(&self, msg: Arc<Message>, batch: &mut Batch) {
        self.route_all(std::slice::from_ref(&msg), batch);
    }

    /// Routes `msgs` (one publisher's, in the order it sent them) as
    /// [`Broker::route`] does each, with one look at the router for all
    /// of them: the publishes of one read share the router's read lock.
    /// Returns a session whose QoS 0 inbox was full, if one was: the
    /// publisher may wait for it a moment before reading more (see
    /// `connection::PACE`).
    pub fn route_all(&self, msgs: &[Arc<Message>], batch: &mut Batch) -> Option<Arc<SessionCell>> {
        let Some(remote) = self.remote.get() else {
            return self.route_here(msgs, batch, true, |_| Shares::All);
        };
        // What went to the other nodes reaches the shared groups through
        // NATS (this node's members included, when NATS picks this node):
        // a group gets each message once, wherever its members are.
        let traveled: Vec<bool> = msgs.iter().map(|m| remote.forward(m)).collect();
        self.route_here(msgs, batch, true, |i| {
            if traveled.get(i).copied().unwrap_or(false) {
                Shares::None
            } else {
                Shares::All
            }
        })
    }

    /// Routes a message a client of another node of the cluster published
    /// ([`crate::remote`]): to this node's plain subscribers only (shared
    /// groups get it from NATS's queue groups), never on.
    pub fn route_remote(&self, msg: Arc<Message>, batch: &mut Batch) {
        // With the retained stream, it decides what is retained here.
        let keep = !self.remote.get().is_some_and(|r| r.retains());
        self.route_here(std::slice::from_ref(&msg), batch, keep, |_| Shares::None);
    }

    /// Routes a message that NATS gave this node for the shared group
    /// `group` of `filter` (published on any node, this one included):
    /// to one of the group's members here, and to nobody else.
    pub fn route_shared(&self, msg: Arc<Message>, group: &str, filter: &str, batch: &mut Batch) {
        self.route_here(std::slice::from_ref(&msg), batch, false, |_| Shares::Only {
            group,
            filter,
        });
    }

    /// A retained message from the cluster's retained stream: kept (or
    /// cleared) here, delivered to nobody (its publish was, by the link).
    pub fn apply_retained(&self, msg: &Message, batch: &mut Batch) {
        if msg.retain {
            self.retain(msg, batch);
        }
    }

    /// [`Broker::route_all`] on this node alone; retained messages are
    /// kept here if `keep_retained`; `shares` says which shared groups
    /// each message (by its index) goes to.
    fn route_here<'s>(
        &self,
        msgs: &[Arc<Message>],
        batch: &mut Batch,
        keep_retained: bool,
        shares: impl Fn(usize) -> Shares<'s>,
    ) -> Option<Arc<SessionCell>> {
        self.metrics
            .messages_in
            .fetch_add(msgs.len() as u64, Ordering::Relaxed);
        for msg in msgs.iter().filter(|m| m.retain && keep_retained) {
            self.retain(msg, batch);
        }
        let mut found: Vec<Vec<Target>> = Vec::with_capacity(msgs.len());
        {
            let router = read_router(&self.router);
            for (i, msg) in msgs.iter().enumerate() {
                found.push(Self::targets(&router, msg, shares(i)));
            }
        }
        let mut dropped = 0u64;
        let mut full = None;
        for (msg, targets) in msgs.iter().zip(found) {
            dropped += self.deliver(msg, targets, batch, &mut full);
        }
        if dropped > 0 {
            self.metrics
                .messages_dropped
                .fetch_add(dropped, Ordering::Relaxed);
        }
        full
    }

    /// Keeps `msg` as its topic's retained message, or clears it.
    fn retain(&self, msg: &Message, batch: &mut Batch) {
        let mut kept = msg.clone();
        kept.publisher = None;
        let kept = Arc::new(kept);
        match write(&self.retained).update(kept.clone()) {
            Change::Kept => batch.put_retained(&kept.to_record()),
            Change::Cleared => batch.delete_retained(&msg.topic),
            Change::Nothing => {}
            // Still delivered to today's subscribers, just not kept.
            Change::Refused => {
                self.metrics
                    .retained_refused
                    .fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// The sessions `msg` goes to: one delivery per client, at the highest
    /// QoS of its matching subscriptions, with all their identifiers
    /// [MQTT-3.3.5-1], and one member of each matching shared group that
    /// `shares` names. Matches are collected as they come, then merged per
    /// session: sorted by handle, so a session several filters match is
    /// one target, without hashing each client id.
    fn targets(
        router: &Router<Arc<SessionCell>>,
        msg: &Message,
        shares: Shares<'_>,
    ) -> Vec<Target> {
        /// A matching shared group: its members, and where the rotation starts.
        type Group = (Vec<(Arc<str>, Sub<Arc<SessionCell>>)>, usize);
        if let Shares::Only { group, filter } = shares {
            return router
                .shared_group(filter, group)
                .map(|m| vec![Self::pick(m.members, m.start)])
                .unwrap_or_default();
        }
        let mut targets: Vec<Target> = Vec::new();
        let mut shared: Vec<Group> = Vec::new();
        let publisher = msg.publisher.as_deref();
        let with_groups = matches!(shares, Shares::All);
        router.for_each_match(
            &msg.topic,
            &mut |client, sub| {
                let o = &sub.options;
                if o.no_local && publisher == Some(&**client) {
                    return; // [MQTT-3.8.3-3]
                }
                targets.push(Target::new(&sub.handle, o));
            },
            &mut |m| {
                if with_groups {
                    shared.push((m.members.to_vec(), m.start));
                }
            },
        );
        if targets.len() > 1 {
            targets.sort_unstable_by_key(|t| Arc::as_ptr(&t.cell) as usize);
            targets.dedup_by(|later, kept| {
                if !Arc::ptr_eq(&later.cell, &kept.cell) {
                    return false;
                }
                if (later.qos as u8) > (kept.qos as u8) {
                    kept.qos = later.qos;
                }
                kept.retain_as_published |= later.retain_as_published;
                kept.sub_ids.append(&mut later.sub_ids);
                true
            });
            for t in &mut targets {
                t.sub_ids.sort_unstable();
            }
        }
        for (members, start) in shared {
            targets.push(Self::pick(&members, start));
        }
        targets
    }

    /// The member of a shared group (not empty) a message goes to: the
    /// first connected one from the rotating index, else the one there.
    fn pick(members: &[(Arc<str>, Sub<Arc<SessionCell>>)], start: usize) -> Target {
        let n = members.len();
        let pick = (0..n)
            .map(|i| &members[(start + i) % n].1)
            .find(|sub| sub.handle.is_online())
            .unwrap_or(&members[start % n].1);
        Target::new(&pick.handle, &pick.options)
    }

    /// Gives `msg` to each of `targets`; returns how many dropped it, and
    /// sets `full` to a session whose inbox was full (see
    /// [`Broker::route_all`]).
    fn deliver(
        &self,
        msg: &Arc<Message>,
        targets: Vec<Target>,
        batch: &mut Batch,
        full: &mut Option<Arc<SessionCell>>,
    ) -> u64 {
        let fan_out = targets.len() > 1;
        if fan_out {
            msg.mark_shared();
        }
        let mut dropped = 0u64;
        for t in targets {
            let cell = t.cell;
            if cell.ended.load(Ordering::Acquire) {
                continue;
            }
            if !self
                .acl
                .can_receive(cell.owner.as_deref(), &cell.client_id, &msg.topic)
            {
                continue;
            }
            let qos = min_qos(msg.qos, t.qos);
            // Retain is cleared on normal delivery unless Retain As
            // Published [MQTT-3.3.1-12], [MQTT-3.3.1-13].
            let retain = t.retain_as_published && msg.retain;
            let lost = cell.deliver(msg, qos, retain, t.sub_ids, fan_out, batch);
            if lost > 0 && qos == QoS::AtMostOnce && full.is_none() {
                *full = Some(cell);
            }
            dropped += lost;
        }
        dropped
    }

    /// Routes one message and submits its writes; the returned commit
    /// resolves when they are durable.
    pub async fn publish(&self, msg: Message) -> Commit {
        let mut batch = Batch::new();
        self.route(Arc::new(msg), &mut batch);
        self.store.submit(batch).await
    }
}
