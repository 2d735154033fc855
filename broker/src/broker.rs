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
use chatmq_storage::{Batch, Commit, Store};
use rumqttc::v5::mqttbytes::QoS;
use tokio::sync::{oneshot, Notify};

use crate::access::{Acl, Authenticator};
use crate::chat::Chat;
use crate::clock::now_ms;
use crate::codec::Protocol;
use crate::counter::Counter;
use crate::deadlines::Deadlines;
use crate::limits::{RateLimit, UserRates};
use crate::message::{min_qos, Message};
use crate::ownership::{self, Ownership};
use crate::retained::{Change, RetainedStore};
use crate::router::{Router, Sub, SubOptions};
use crate::session::{Session, CURSOR_SAVE_ACKS};
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
    pending_will: Option<PendingWill>,
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
        self.anonymous += usize::from(cell.anonymous);
        if let Some(old) = self.map.insert(client_id, cell) {
            self.anonymous -= usize::from(old.anonymous);
        }
    }

    fn remove(&mut self, client_id: &str) {
        if let Some(old) = self.map.remove(client_id) {
            self.anonymous -= usize::from(old.anonymous);
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
    /// Created by an anonymous client (a session's owner never changes).
    anonymous: bool,
    slot: Mutex<Slot>,
    /// Woken when the session has something new to send.
    pub wake: Notify,
    /// The session left the broker (ended, expired or replaced): a handle
    /// the router still holds for an instant delivers nothing to it.
    ended: AtomicBool,
}

impl SessionCell {
    fn new(session: Session) -> Arc<SessionCell> {
        Arc::new(SessionCell {
            client_id: session.client_id.clone(),
            anonymous: session.owner.is_none(),
            slot: Mutex::new(Slot {
                session,
                link: None,
                pending_will: None,
            }),
            wake: Notify::new(),
            ended: AtomicBool::new(false),
        })
    }

    /// Locks the session. A poisoned lock (a panic elsewhere) still yields
    /// the state: the broker keeps serving rather than cascading.
    pub fn lock(&self) -> MutexGuard<'_, Slot> {
        self.slot.lock().unwrap_or_else(|e| e.into_inner())
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
    /// Open MQTT connections.
    pub connections: AtomicUsize,
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
    pub chat_deferred_to_log: Counter,
    /// Typing indicators dropped by the per-user throttle.
    pub typing_throttled: Counter,
    /// Typing indicators refused for their size.
    pub typing_too_large: Counter,
    /// Conversation states evicted from memory.
    pub conv_cache_evicted: Counter,
    /// Idempotency keys deleted after `chat.dedup_ttl_secs`.
    pub dedup_expired: Counter,
}

pub struct Broker {
    pub settings: Arc<Settings>,
    pub chat: Arc<Chat>,
    pub store: Store,
    pub auth: Authenticator,
    pub acl: Acl,
    pub metrics: Arc<Metrics>,
    /// Who may use which client id.
    pub owners: Ownership,
    router: RwLock<Router<Arc<SessionCell>>>,
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
    /// Each user's publish rate, shared by its connections.
    pub user_rates: UserRates,
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
        let user_rates = UserRates::new(RateLimit::user(&settings.mqtt));
        let metrics = Arc::new(Metrics::default());
        let push = chatmq_bridge::push::Push::open(store.clone(), &settings.push)?;
        let mut chat = Chat::new(store.clone(), metrics.clone(), push)?;
        chat.history_cap = settings.chat.history_limit;
        chat.limit(&settings.chat);
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
            router: RwLock::new(Router::default()),
            sessions: Mutex::new(Sessions::default()),
            expiries: Mutex::new(Deadlines::default()),
            wills: Mutex::new(Deadlines::default()),
            timers: Notify::new(),
            retained: RwLock::new(retained),
            next_id: AtomicU64::new(1),
            user_rates,
        };
        broker.restore()?;
        Ok(Arc::new(broker))
    }

    fn restore(&self) -> Result<(), chatmq_storage::StorageError> {
        let now = now_ms();
        let mut sessions = self.lock_sessions();
        let mut router = write(&self.router);
        for mut stored in self.store.load_sessions()? {
            // Connected when the broker died: its last acknowledgements may
            // be newer than the cursors written (see `CURSOR_SAVE_ACKS`).
            let crashed = stored.record.disconnected_at_ms == 0;
            let cursors = std::mem::take(&mut stored.cursors);
            let mut session = Session::restore(stored, now);
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
            .map(|c| c.lock().session.held_bytes())
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
        let id = a.client_id.clone();
        let stored = crate::blocking::read(&self.store, move |s| s.client_owner(&id))
            .await
            .map_err(|e| {
                tracing::error!(error = %e, "cannot read client owner");
                Refused::Unavailable
            })?;
        self.attach_claimed(a, stored, batch)
    }

    /// The rest of [`Broker::attach`], under the claim lock, with the
    /// stored claim read.
    fn attach_claimed(
        &self,
        a: Attach,
        stored: Option<chatmq_storage::ClientOwner>,
        batch: &mut Batch,
    ) -> Result<Attached, Refused> {
        let who = a.owner.as_deref();
        let mut sessions = self.lock_sessions();
        let existing = sessions.get(&a.client_id).cloned();
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
                    batch.delete_session(&s.client_id);
                }
                slot.link = Some(link);
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
                batch.delete_session(&slot.session.client_id);
            }
            drop(slot);
            cell.ended.store(true, Ordering::Release);
            let mut router = write(&self.router);
            for f in &filters {
                router.unsubscribe(&a.client_id, f);
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
        if session.persistent() {
            batch.put_session(&session.client_id, &session.record());
        }
        let cell = SessionCell::new(session);
        cell.lock().link = Some(link);
        sessions.insert(a.client_id.clone(), cell.clone());
        if let Some(user) = &a.owner {
            // Counted from now on by the user's session quota.
            self.chat.register(user, &cell);
        }
        drop(sessions);
        if let Some(w) = ended_will {
            self.route_will(w, batch);
        }
        Ok(Attached {
            cell,
            present: false,
            kicked,
        })
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
                let resumed = self
                    .session(&cell.client_id)
                    .is_some_and(|c| Arc::ptr_eq(&c, cell));
                if delay == 0 || !resumed {
                    let w = PendingWill { message, owner };
                    self.route_will(w, batch);
                }
            }
            return false;
        }
        slot.link = None;
        let owner = slot.session.owner.clone();
        slot.session.connected = false;
        slot.session.disconnected_at_ms = now_ms();
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
                slot.pending_will = Some(PendingWill { message, owner });
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
            let mut router = write(&self.router);
            for f in filters {
                router.unsubscribe(&cell.client_id, f);
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
                self.route_will(w, &mut batch);
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
            batch.delete_session(&cell.client_id);
            if let Some(w) = will {
                self.route_will(w, &mut batch);
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
        write(&self.router).subscribe(&cell.client_id, filter, options, cell.clone());
    }

    pub fn unindex_subscription(&self, client_id: &str, filter: &str) -> bool {
        write(&self.router).unsubscribe(client_id, filter)
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
        self.metrics.messages_in.fetch_add(1, Ordering::Relaxed);
        if msg.retain {
            let mut kept = (*msg).clone();
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

        // One delivery per client, at the highest QoS of its matching
        // subscriptions, with all their identifiers [MQTT-3.3.5-1].
        struct Target {
            cell: Arc<SessionCell>,
            qos: QoS,
            retain_as_published: bool,
            sub_ids: Vec<u32>,
        }
        /// A matching shared group: its members, and where the rotation starts.
        type Group = (Vec<(Arc<str>, Sub<Arc<SessionCell>>)>, usize);
        let mut direct: HashMap<Arc<str>, Target> = HashMap::new();
        let mut shared: Vec<Group> = Vec::new();
        {
            let router = read(&self.router);
            let publisher = msg.publisher.as_deref();
            router.for_each_match(
                &msg.topic,
                &mut |client, sub| {
                    let o = &sub.options;
                    if o.no_local && publisher == Some(&**client) {
                        return; // [MQTT-3.8.3-3]
                    }
                    let t = direct.entry(client.clone()).or_insert_with(|| Target {
                        cell: sub.handle.clone(),
                        qos: QoS::AtMostOnce,
                        retain_as_published: false,
                        sub_ids: Vec::new(),
                    });
                    if (o.qos as u8) > (t.qos as u8) {
                        t.qos = o.qos;
                    }
                    t.retain_as_published |= o.retain_as_published;
                    if o.identifier != 0 {
                        t.sub_ids.push(o.identifier);
                    }
                },
                &mut |m| shared.push((m.members.to_vec(), m.start)),
            );
        }
        if direct.is_empty() && shared.is_empty() {
            return;
        }
        let mut targets = Vec::with_capacity(direct.len() + shared.len());
        for (_, t) in direct {
            targets.push((t.cell, t.qos, t.retain_as_published, t.sub_ids));
        }
        for (members, start) in shared {
            // Prefer a connected member, starting from the rotating index.
            let n = members.len();
            let pick = (0..n)
                .map(|i| &members[(start + i) % n].1)
                .find(|sub| sub.handle.lock().link.is_some())
                .unwrap_or(&members[start % n].1);
            let o = pick.options;
            let ids = if o.identifier != 0 {
                vec![o.identifier]
            } else {
                vec![]
            };
            targets.push((pick.handle.clone(), o.qos, o.retain_as_published, ids));
        }
        for (cell, sub_qos, rap, ids) in targets {
            if cell.ended.load(Ordering::Acquire) {
                continue;
            }
            let mut slot = cell.lock();
            let s = &mut slot.session;
            if !self
                .acl
                .can_receive(s.owner.as_deref(), &s.client_id, &msg.topic)
            {
                continue;
            }
            let before = s.dropped;
            // Retain is cleared on normal delivery unless Retain As
            // Published [MQTT-3.3.1-12], [MQTT-3.3.1-13].
            s.enqueue(
                msg.clone(),
                min_qos(msg.qos, sub_qos),
                rap && msg.retain,
                ids,
                batch,
            );
            let dropped = s.dropped - before;
            let connected = slot.link.is_some();
            drop(slot);
            if dropped > 0 {
                self.metrics
                    .messages_dropped
                    .fetch_add(dropped, Ordering::Relaxed);
            }
            if connected {
                cell.wake.notify_one();
            }
        }
    }

    /// Routes one message and submits its writes; the returned commit
    /// resolves when they are durable.
    pub async fn publish(&self, msg: Message) -> Commit {
        let mut batch = Batch::new();
        self.route(Arc::new(msg), &mut batch);
        self.store.submit(batch).await
    }
}
