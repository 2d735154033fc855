//! A session's QoS state: what it subscribed to, what it is owed, what is
//! in flight, and which incoming QoS 2 messages await PUBREL (MQTT 4.4).
//!
//! A session outlives its connections when it is persistent. Every change
//! that must survive a crash is written into the `Batch` the caller passes
//! in; the caller submits it. Packet identifiers of outgoing QoS 1/2
//! messages are derived from a per-session counter `n`, so a message keeps
//! its identifier across reconnects and restarts without another write
//! [MQTT-4.4.0-1].

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use chatmq_storage::{
    Batch, MessageRecord, OutboxEntry, OutboxState, SessionRecord, SharedBody, StoredSession,
    SubscriptionRecord,
};
use rumqttc::v5::mqttbytes::v5::{Packet, PubRel};
use rumqttc::v5::mqttbytes::QoS;

use crate::codec::Protocol;
use crate::message::{qos_from_u8, Message};
use crate::router::SubOptions;

/// Packet ids cycle through 1..=65535.
const PKID_SPACE: u64 = 65_535;
/// A persistent session's chat cursors are written once this many
/// acknowledgements moved them, or at the first acknowledgement this long
/// after an unsaved one ([`Session::flush_cursors`]), and always when the
/// connection ends. A broker killed in between replays at most this many
/// acknowledged messages per session, marked DUP (see
/// [`ChatCursor::dup_until`]).
pub const CURSOR_SAVE_ACKS: u32 = 32;
pub const CURSOR_SAVE_MS: u64 = 1000;

/// A message owed to the client.
#[derive(Debug)]
pub struct Outgoing {
    /// Position among this session's QoS 1/2 messages; 0 for QoS 0.
    n: u64,
    msg: Arc<Message>,
    qos: QoS,
    retain: bool,
    sub_ids: Vec<u32>,
    state: OutboxState,
    /// Sent on some connection already: a resend carries DUP [MQTT-3.3.1-1].
    sent: bool,
    /// A chat message (conversation, seq): kept in the message log, not in
    /// the session's outbox; its acknowledgement moves the cursor.
    chat: Option<(Arc<str>, u64)>,
    /// Outside the `max_queue` bound: a chat message (it is in the log), or
    /// a retained message sent on subscribe (the retained store and
    /// `mqtt.max_retained_per_subscription` bound those). A live message
    /// never evicts one.
    unbounded: bool,
    /// Its stored copy, shared with the other persistent sessions the same
    /// publish went to (a persistent session's QoS 1/2 message, until
    /// PUBREC or its end).
    body: Option<Arc<SharedBody>>,
}

/// What a session sends next.
#[derive(Debug)]
pub enum Outbound {
    Packet(Packet),
    Publish(Delivery),
}

/// A QoS 1/2 PUBLISH of a message shared by several sessions, with this
/// delivery's packet id and flags (no subscription identifiers).
#[derive(Debug)]
pub struct Delivery {
    pub msg: Arc<Message>,
    pub qos: QoS,
    pub pkid: u16,
    pub dup: bool,
    pub retain: bool,
}

impl Delivery {
    /// Built for this delivery alone.
    pub fn to_publish(&self) -> rumqttc::v5::mqttbytes::v5::Publish {
        self.msg
            .to_publish(self.qos, self.pkid, self.dup, self.retain, &[])
    }
}

impl Outbound {
    /// As a packet of its own.
    pub fn into_packet(self) -> Packet {
        match self {
            Outbound::Packet(p) => p,
            Outbound::Publish(d) => Packet::Publish(d.to_publish()),
        }
    }
}

/// The bodies met while restoring sessions, by id: each message is in
/// memory once, however many sessions are owed it.
pub type RestoredBodies = HashMap<u64, (Arc<SharedBody>, Arc<Message>)>;

impl Outgoing {
    fn pkid(&self) -> u16 {
        pkid_of(self.n)
    }

    /// What it costs the session's byte budget.
    pub(crate) fn size(&self) -> usize {
        self.msg.budget_size()
    }

    fn entry(&self) -> OutboxEntry {
        let publish = self.state == OutboxState::Publish;
        let body = self.body.as_ref().filter(|_| publish).map(|b| b.id());
        OutboxEntry {
            state: self.state,
            subscription_ids: self.sub_ids.clone(),
            message: publish.then(|| {
                let mut record = match body {
                    // Only what is this session's own: the body has the rest.
                    Some(_) => MessageRecord::default(),
                    None => self.msg.to_record(),
                };
                record.qos = self.qos as u8;
                record.retain = self.retain;
                record
            }),
            body,
        }
    }
}

/// The packet id of the `n`-th QoS 1/2 message: 1, 2, ... 65535, 1, ...
/// (0 is not a packet id [MQTT-2.2.1-3]).
fn pkid_of(n: u64) -> u16 {
    (n.saturating_sub(1) % PKID_SPACE) as u16 + 1
}

/// What an acknowledgement from the client did to the message it names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ack {
    /// It moved the message on (or repeated the last step).
    Applied,
    /// Nothing is in flight with that packet id.
    Unknown,
    /// The packet id is in flight but waits for another kind of ack
    /// (PUBACK for QoS 2, PUBREC for QoS 1, PUBCOMP before PUBREC): a
    /// protocol error.
    WrongType,
}

/// How far a session has come in one conversation.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ChatCursor {
    /// The last seq the client acknowledged (persisted for resume).
    pub acked: u64,
    /// The last seq queued for sending.
    pub queued: u64,
    /// Seqs up to this one go out with DUP set: the broker restarted after
    /// a crash while the session was connected, so the client may have
    /// acknowledged them after the cursor was last written.
    pub dup_until: u64,
}

impl ChatCursor {
    /// A cursor at `seq`, nothing owed before it.
    pub fn at(seq: u64) -> ChatCursor {
        ChatCursor {
            acked: seq,
            queued: seq,
            dup_until: 0,
        }
    }
}

/// What became of a chat message offered to a session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Offer {
    Queued,
    /// Already queued or acknowledged: dropped.
    Duplicate,
    /// Messages before it are missing here: read the log from this seq.
    Gap(u64),
    /// The session holds all it may (messages or bytes): not queued, the
    /// log keeps it, and the paused replay delivers it once the client
    /// has drained its queue.
    Full,
}

/// The state of one client id.
#[derive(Debug)]
pub struct Session {
    pub client_id: Arc<str>,
    pub owner: Option<Arc<str>>,
    pub protocol: Protocol,
    /// Seconds the session outlives its connection; 0 = ends with it.
    pub expiry_secs: u32,
    pub subscriptions: BTreeMap<String, SubOptions>,
    queue: VecDeque<Outgoing>,
    /// Unbounded messages in `queue` (see `Outgoing::unbounded`): the bound
    /// counts the others, and counting them by a scan cost O(queue) per
    /// message once full.
    unbounded_queued: usize,
    inflight: VecDeque<Outgoing>,
    /// The next `n`, shared with the session's inbox: a publisher that
    /// stages a message there numbers it without the session's lock
    /// ([`Session::staged`], [`Session::admit`]).
    next_n: Arc<AtomicU64>,
    /// Incoming QoS 2 packet ids that got PUBREC and await PUBREL. This
    /// and the sets of conversations below are B-trees: empty in nearly
    /// every session, and an empty one is 24 bytes, a `HashSet` 48 (its
    /// hasher's keys) in every session held.
    inbound: BTreeSet<u16>,
    /// The client's Receive Maximum (capped by ours).
    pub max_inflight: u16,
    /// Bound on messages waiting to be sent; the oldest is dropped first.
    pub max_queue: usize,
    /// Unix ms when the last connection ended; 0 while connected.
    pub disconnected_at_ms: u64,
    pub connected: bool,
    /// Messages dropped because the queue was full or they expired.
    pub dropped: u64,
    /// Per conversation: what was acknowledged and what is queued.
    pub chat: HashMap<Arc<str>, ChatCursor>,
    /// Conversations being replayed from the log (one replay each).
    pub catching_up: BTreeSet<Arc<str>>,
    /// Conversations whose replay paused on a full window; resumed as the
    /// client drains its queue.
    pub replay_paused: BTreeSet<Arc<str>>,
    /// Bytes (topic and payload) of the messages queued and in flight.
    held_bytes: usize,
    /// The byte budget of `held_bytes` (`mqtt.session_queue_bytes`).
    pub max_bytes: usize,
    /// A connected client fell so far behind that messages had to be
    /// dropped for the byte budget: its connection closes as overloaded.
    pub overloaded: bool,
    /// Conversations whose cursor moved since it was last written.
    unsaved_cursors: BTreeSet<Arc<str>>,
    /// Cursors were written since [`Session::take_cursors_saved`].
    cursors_saved: bool,
    /// Acknowledgements since the cursors were last written, and when the
    /// first of them came (unix ms).
    unsaved_acks: u32,
    unsaved_since_ms: u64,
}

impl Session {
    pub fn new(
        client_id: Arc<str>,
        owner: Option<Arc<str>>,
        protocol: Protocol,
        expiry_secs: u32,
    ) -> Self {
        Session {
            client_id,
            owner,
            protocol,
            expiry_secs,
            subscriptions: BTreeMap::new(),
            queue: VecDeque::new(),
            unbounded_queued: 0,
            inflight: VecDeque::new(),
            next_n: Arc::new(AtomicU64::new(1)),
            inbound: BTreeSet::new(),
            max_inflight: u16::MAX,
            max_queue: usize::MAX,
            disconnected_at_ms: 0,
            connected: true,
            dropped: 0,
            chat: HashMap::new(),
            catching_up: BTreeSet::new(),
            replay_paused: BTreeSet::new(),
            held_bytes: 0,
            max_bytes: usize::MAX,
            overloaded: false,
            unsaved_cursors: BTreeSet::new(),
            cursors_saved: false,
            unsaved_acks: 0,
            unsaved_since_ms: 0,
        }
    }

    pub fn persistent(&self) -> bool {
        self.expiry_secs > 0
    }

    /// The session leaves the disk (it ended, or will end with its
    /// connection): its record, its outbox, and the stored messages only
    /// it still referred to.
    pub fn delete_stored(&mut self, batch: &mut Batch) {
        batch.delete_session(&self.client_id);
        for o in self.queue.iter_mut().chain(self.inflight.iter_mut()) {
            batch.release_body(o.body.take().as_ref());
        }
    }

    /// Rebuilds a session from disk; its connection is gone.
    pub fn restore(stored: StoredSession, now_ms: u64, bodies: &mut RestoredBodies) -> Session {
        let r = stored.record;
        let protocol = if r.protocol == 5 {
            Protocol::V5
        } else {
            Protocol::V4
        };
        let mut s = Session::new(
            stored.client_id.into(),
            r.owner.map(Into::into),
            protocol,
            r.expiry_secs,
        );
        s.connected = false;
        // Crashed while connected: the session's clock starts now.
        s.disconnected_at_ms = if r.disconnected_at_ms == 0 {
            now_ms
        } else {
            r.disconnected_at_ms
        };
        for sub in r.subscriptions {
            s.subscriptions.insert(
                sub.filter,
                SubOptions {
                    qos: qos_from_u8(sub.qos),
                    no_local: sub.no_local,
                    retain_as_published: sub.retain_as_published,
                    retain_handling: sub.retain_handling,
                    identifier: sub.identifier,
                },
            );
        }
        for (n, entry) in stored.outbox {
            s.next_n.fetch_max(n.saturating_add(1), Ordering::Relaxed);
            let (qos, retain) = entry
                .message
                .as_ref()
                .map_or((QoS::ExactlyOnce, false), |m| {
                    (qos_from_u8(m.qos), m.retain)
                });
            let (msg, body) = match (entry.body, entry.message) {
                (Some(id), Some(record)) => {
                    let (body, msg) = bodies.entry(id).or_insert_with(|| {
                        (
                            SharedBody::restored(id),
                            Arc::new(Message::from_record(record)),
                        )
                    });
                    body.hold();
                    (msg.clone(), Some(body.clone()))
                }
                (_, record) => (
                    Arc::new(Message::from_record(record.unwrap_or_default())),
                    None,
                ),
            };
            let outgoing = Outgoing {
                n,
                msg,
                qos,
                retain,
                sub_ids: entry.subscription_ids,
                state: entry.state,
                sent: true,
                chat: None,
                unbounded: false,
                body,
            };
            // A message on disk may have been sent before the restart: it goes
            // out again with DUP and its original packet id, through the
            // window like any other. Only PUBREL is owed for released ones.
            s.held_bytes = s.held_bytes.saturating_add(outgoing.size());
            match outgoing.state {
                OutboxState::Publish => s.queue.push_back(outgoing),
                OutboxState::Release => s.inflight.push_back(outgoing),
            }
        }
        s.inbound = stored.inbound.into_iter().collect();
        s
    }

    pub fn record(&self) -> SessionRecord {
        SessionRecord {
            owner: self.owner.as_deref().map(str::to_string),
            protocol: self.protocol.level(),
            expiry_secs: self.expiry_secs,
            disconnected_at_ms: self.disconnected_at_ms,
            subscriptions: self
                .subscriptions
                .iter()
                .map(|(filter, o)| SubscriptionRecord {
                    filter: filter.clone(),
                    qos: o.qos as u8,
                    no_local: o.no_local,
                    retain_as_published: o.retain_as_published,
                    retain_handling: o.retain_handling,
                    identifier: o.identifier,
                })
                .collect(),
        }
    }

    /// Queues a message for the client. QoS 0 messages are not kept for a
    /// disconnected client. When the queue is full the oldest waiting
    /// message is dropped and counted.
    pub fn enqueue(
        &mut self,
        msg: Arc<Message>,
        qos: QoS,
        retain: bool,
        sub_ids: Vec<u32>,
        batch: &mut Batch,
    ) {
        self.push(msg, qos, retain, sub_ids, None, false, batch);
    }

    /// Queues a retained message for a new subscription, with RETAIN set
    /// [MQTT-3.3.1-8]. It does not count against `max_queue`: a wildcard
    /// over many retained topics gets all of them, and live messages do not
    /// evict them.
    pub fn enqueue_retained(
        &mut self,
        msg: Arc<Message>,
        qos: QoS,
        sub_ids: Vec<u32>,
        batch: &mut Batch,
    ) {
        self.push(msg, qos, true, sub_ids, None, true, batch);
    }

    /// The counter of `n` this session and its inbox share.
    pub fn numbers(&self) -> Arc<AtomicU64> {
        self.next_n.clone()
    }

    /// A plain message numbered `n` (0 for QoS 0), stored into `batch`
    /// when it has a `body` (a persistent session's QoS 1/2 message). A
    /// publisher stages one this way for a connected session without the
    /// session's lock (it holds the inbox's, so messages are staged in the
    /// order they are numbered): acknowledged to its publisher only once
    /// durable, like one queued under the lock. [`Session::admit`] takes
    /// it into the queue.
    #[allow(clippy::too_many_arguments)]
    pub fn staged(
        client_id: &str,
        n: u64,
        msg: Arc<Message>,
        qos: QoS,
        retain: bool,
        sub_ids: Vec<u32>,
        body: Option<Arc<SharedBody>>,
        batch: &mut Batch,
    ) -> Outgoing {
        let stored = body.is_some();
        let out = Outgoing {
            n,
            msg,
            qos,
            retain,
            sub_ids,
            state: OutboxState::Publish,
            sent: false,
            chat: None,
            unbounded: false,
            body,
        };
        if stored {
            batch.put_outbox(client_id, n, &out.entry());
        }
        out
    }

    /// Takes a staged message into the queue, within the bounds a message
    /// queued under the lock meets (the oldest plain ones make room; one
    /// that still does not fit is dropped, off the disk too). Returns false
    /// if it was dropped.
    ///
    /// It goes before any message numbered after it that was queued under
    /// the lock while it waited in the inbox, so the queue is in the order
    /// of `n` whenever the connection sends from it (it takes the inbox
    /// first, under the inbox's lock, so a message numbered before one
    /// queued is staged by then): packet ids follow `n`, and that order
    /// keeps them unique while in flight (see [`Session::poll_outbound`]).
    pub fn admit(&mut self, o: Outgoing, batch: &mut Batch) -> bool {
        if !self.make_room(o.size(), false, true, batch) {
            self.dropped += 1;
            self.unqueue(&o, batch);
            return false;
        }
        self.held_bytes = self.held_bytes.saturating_add(o.size());
        let last_numbered = self.queue.iter().rev().find(|q| q.n != 0).map(|q| q.n);
        if last_numbered.is_some_and(|last| last > o.n) {
            let at = self
                .queue
                .iter()
                .position(|q| q.n > o.n)
                .unwrap_or(self.queue.len());
            self.queue.insert(at, o);
        } else {
            self.queue.push_back(o);
        }
        true
    }

    /// Makes room in the queue for a message of `size` bytes: the oldest
    /// waiting plain message goes when the count bound is reached (unless
    /// the message is `unbounded`), and for a `plain` one as many as the
    /// byte budget needs. False if the budget cannot be met.
    fn make_room(&mut self, size: usize, unbounded: bool, plain: bool, batch: &mut Batch) -> bool {
        if !unbounded && self.queue.len() - self.unbounded_queued >= self.max_queue {
            self.drop_oldest_plain(batch);
        }
        if plain {
            // The byte budget: the oldest plain messages make room; a
            // connected client that let it fill up is disconnected.
            while self.held_bytes.saturating_add(size) > self.max_bytes {
                self.overloaded |= self.connected;
                if !self.drop_oldest_plain(batch) {
                    return false;
                }
            }
        }
        true
    }

    fn push(
        &mut self,
        msg: Arc<Message>,
        qos: QoS,
        retain: bool,
        sub_ids: Vec<u32>,
        chat: Option<(Arc<str>, u64)>,
        unbounded: bool,
        batch: &mut Batch,
    ) -> bool {
        if qos == QoS::AtMostOnce && !self.connected {
            return false;
        }
        // The bound is on plain messages (`mqtt.max_offline_messages`); chat
        // messages are in the log, and evicting one would cut a replay short.
        let unbounded = unbounded || chat.is_some();
        let size = msg.budget_size();
        if !self.make_room(size, unbounded, chat.is_none(), batch) {
            self.dropped += 1;
            return false;
        }
        let n = if qos == QoS::AtMostOnce {
            0
        } else {
            self.next_n.fetch_add(1, Ordering::Relaxed)
        };
        let stored = n != 0 && self.persistent() && chat.is_none();
        // One stored copy for every persistent session this publish goes
        // to in this batch; each entry refers to it.
        let body = stored.then(|| batch.share_body(&msg, || msg.to_record()));
        let mut out = Session::staged(&self.client_id, n, msg, qos, retain, sub_ids, body, batch);
        out.chat = chat;
        out.unbounded = unbounded;
        self.unbounded_queued += usize::from(out.unbounded);
        self.held_bytes = self.held_bytes.saturating_add(size);
        self.queue.push_back(out);
        true
    }

    /// Drops the oldest waiting plain message (counted); false if none.
    fn drop_oldest_plain(&mut self, batch: &mut Batch) -> bool {
        let Some(i) = self.queue.iter().position(|o| !o.unbounded) else {
            return false;
        };
        let Some(old) = self.queue.remove(i) else {
            return false;
        };
        self.dropped += 1;
        self.released(&old);
        self.unqueue(&old, batch);
        true
    }

    fn pop_queue(&mut self) -> Option<Outgoing> {
        let o = self.queue.pop_front()?;
        self.unbounded_queued -= usize::from(o.unbounded);
        Some(o)
    }

    /// `o` left the session (sent at QoS 0, acknowledged, dropped): its
    /// bytes no longer count against the budget.
    fn released(&mut self, o: &Outgoing) {
        self.held_bytes = self.held_bytes.saturating_sub(o.size());
    }

    /// Bytes of messages the session holds in memory.
    pub fn held_bytes(&self) -> usize {
        self.held_bytes
    }

    /// Holds as many messages or bytes as it may: replays wait.
    pub fn is_full(&self) -> bool {
        self.pending() >= crate::chat::REPLAY_WINDOW || self.held_bytes >= self.max_bytes
    }

    /// Drained to half of both bounds: a paused replay may go on.
    pub fn has_room_for_replay(&self) -> bool {
        self.pending() <= crate::chat::REPLAY_WINDOW / 2 && self.held_bytes <= self.max_bytes / 2
    }

    /// Messages waiting or in flight.
    /// Nothing waits to be sent (in flight does not count).
    pub fn queue_is_empty(&self) -> bool {
        self.queue.is_empty()
    }

    pub fn pending(&self) -> usize {
        self.queue.len() + self.inflight.len()
    }

    /// Moves what the window allows from the queue onto the wire: QoS 0 at
    /// once, QoS 1/2 while fewer than Receive Maximum are unacknowledged
    /// [MQTT-4.9.0-2]. Expired messages are dropped [MQTT-3.3.2-5].
    pub fn poll_send(&mut self, now_ms: u64, out: &mut Vec<Packet>, batch: &mut Batch) {
        let mut next = Vec::new();
        self.poll_outbound(now_ms, &mut next, batch);
        out.extend(next.into_iter().map(Outbound::into_packet));
    }

    /// [`Session::poll_send`] for the connection: a QoS 1/2 PUBLISH of a
    /// message routed to several sessions, without subscription
    /// identifiers, comes as its message, to be copied from the message's
    /// shared encoding ([`Message::wire_acked`]).
    pub fn poll_outbound(&mut self, now_ms: u64, out: &mut Vec<Outbound>, batch: &mut Batch) {
        while let Some(front) = self.queue.front() {
            if front.msg.is_expired(now_ms) {
                if let Some(old) = self.pop_queue() {
                    self.dropped += 1;
                    self.released(&old);
                    self.unqueue(&old, batch);
                }
                continue;
            }
            if front.n != 0 {
                let window_full = self.inflight.len() >= usize::from(self.max_inflight);
                // Never reuse a packet id that is still in flight.
                let id_wraps = self
                    .inflight
                    .front()
                    .is_some_and(|f| front.n.saturating_sub(f.n) >= PKID_SPACE);
                if window_full || id_wraps {
                    break;
                }
            }
            let Some(mut o) = self.pop_queue() else {
                break;
            };
            out.push(if o.n != 0 && o.sub_ids.is_empty() && o.msg.is_shared() {
                Outbound::Publish(Delivery {
                    msg: o.msg.clone(),
                    qos: o.qos,
                    pkid: o.pkid(),
                    dup: o.sent,
                    retain: o.retain,
                })
            } else {
                Outbound::Packet(Packet::Publish(o.msg.to_publish(
                    o.qos,
                    if o.n == 0 { 0 } else { o.pkid() },
                    o.sent,
                    o.retain,
                    &o.sub_ids,
                )))
            });
            if o.n != 0 {
                o.sent = true;
                self.inflight.push_back(o);
            } else {
                // QoS 0 is done once sent.
                self.released(&o);
                self.settled(&o, batch);
            }
        }
    }

    /// A message left the queue unsent (dropped or expired): its outbox
    /// record goes; a chat message stays in the log and is not counted as
    /// acknowledged, so a resume replays it.
    fn unqueue(&mut self, o: &Outgoing, batch: &mut Batch) {
        if let Some((conv, _)) = &o.chat {
            if let Some(c) = self.chat.get_mut(conv) {
                c.queued = c.acked.min(c.queued);
            }
        } else if o.n != 0 && self.persistent() {
            batch.delete_outbox(&self.client_id, o.n);
            batch.release_body(o.body.as_ref());
        }
    }

    /// A message was delivered: forget it, or advance its conversation's
    /// cursor (persisted for a persistent session, coalesced: see
    /// [`CURSOR_SAVE_ACKS`]).
    fn settled(&mut self, o: &Outgoing, batch: &mut Batch) {
        match &o.chat {
            Some((conv, seq)) => {
                let persistent = self.persistent();
                let c = self.chat.entry(conv.clone()).or_default();
                if *seq > c.acked {
                    c.acked = *seq;
                    if persistent {
                        self.cursor_moved(conv, batch);
                    }
                }
            }
            None if o.n != 0 && self.persistent() => {
                batch.delete_outbox(&self.client_id, o.n);
                batch.release_body(o.body.as_ref());
            }
            None => {}
        }
    }

    /// Counts a moved cursor; writes the unsaved ones when enough
    /// acknowledgements or enough time have gathered.
    fn cursor_moved(&mut self, conv: &Arc<str>, batch: &mut Batch) {
        let now = crate::clock::now_ms();
        if self.unsaved_acks == 0 {
            self.unsaved_since_ms = now;
        }
        self.unsaved_acks = self.unsaved_acks.saturating_add(1);
        if !self.unsaved_cursors.contains(conv) {
            self.unsaved_cursors.insert(conv.clone());
        }
        if self.unsaved_acks >= CURSOR_SAVE_ACKS
            || now.saturating_sub(self.unsaved_since_ms) >= CURSOR_SAVE_MS
        {
            self.flush_cursors(batch);
        }
    }

    /// Writes every chat cursor that moved since it was last written (when
    /// the connection ends, and as acknowledgements gather).
    pub fn flush_cursors(&mut self, batch: &mut Batch) {
        self.cursors_saved |= !self.unsaved_cursors.is_empty();
        for conv in std::mem::take(&mut self.unsaved_cursors) {
            if let Some(c) = self.chat.get(&conv) {
                batch.put_cursor(&self.client_id, &conv, c.acked);
            }
        }
        self.unsaved_acks = 0;
    }

    /// Were cursors written since this was last asked? (With `[cluster]`
    /// the session's value in the sessions bucket follows them.)
    pub fn take_cursors_saved(&mut self) -> bool {
        std::mem::take(&mut self.cursors_saved)
    }

    /// Does this session receive `conv` (a matching chat subscription) but
    /// have no cursor there yet?
    pub fn lacks_cursor(&self, conv: &str) -> bool {
        !self.chat.contains_key(conv)
            && crate::chat::namespace::wanted_qos(
                self.subscriptions.iter(),
                &format!("chat/{conv}"),
            )
            .is_some()
    }

    /// Starts the cursor of `conv` at `head`: what comes after it is owed
    /// (persisted for a persistent session).
    pub fn start_cursor(&mut self, conv: &str, head: u64, batch: &mut Batch) {
        self.chat.insert(conv.into(), ChatCursor::at(head));
        if self.persistent() {
            batch.put_cursor(&self.client_id, conv, head);
        }
    }

    /// Offers chat message `seq` of `conv`. It is queued only if it is the
    /// next one this session lacks, so a replay from the log and live
    /// delivery meet without gap or duplicate. A session that has never
    /// seen `conv` starts at `seq` when `start_here`. A full session takes
    /// nothing (`Offer::Full`): chat is never dropped, the log has it, and
    /// the conversation's replay resumes as the client drains its queue.
    pub fn offer_chat(
        &mut self,
        conv: &Arc<str>,
        seq: u64,
        msg: Arc<Message>,
        qos: QoS,
        start_here: bool,
        batch: &mut Batch,
    ) -> Offer {
        let cursor = match self.chat.get(conv) {
            Some(c) => *c,
            None if start_here => ChatCursor::at(seq.saturating_sub(1)),
            None => return Offer::Duplicate,
        };
        if seq <= cursor.queued {
            return Offer::Duplicate;
        }
        let full = self.is_full()
            || self
                .held_bytes
                .saturating_add(msg.topic.len() + msg.payload.len())
                > self.max_bytes;
        if full || self.replay_paused.contains(conv) {
            self.chat.insert(conv.clone(), cursor);
            self.replay_paused.insert(conv.clone());
            return Offer::Full;
        }
        if seq > cursor.queued.saturating_add(1) {
            self.chat.insert(conv.clone(), cursor);
            return Offer::Gap(cursor.queued.saturating_add(1));
        }
        self.chat.insert(
            conv.clone(),
            ChatCursor {
                queued: seq,
                ..cursor
            },
        );
        let queued = self.push(
            msg,
            qos,
            false,
            Vec::new(),
            Some((conv.clone(), seq)),
            true,
            batch,
        );
        if queued && seq <= cursor.dup_until {
            if let Some(o) = self.queue.back_mut() {
                o.sent = true; // may have reached the client before the crash
            }
        }
        Offer::Queued
    }

    /// On resume: everything unacknowledged goes out again with its original
    /// packet id, PUBLISH with DUP, or PUBREL [MQTT-4.4.0-1].
    pub fn resend(&self, out: &mut Vec<Packet>) {
        for o in &self.inflight {
            match o.state {
                OutboxState::Publish => out.push(Packet::Publish(o.msg.to_publish(
                    o.qos,
                    o.pkid(),
                    true,
                    o.retain,
                    &o.sub_ids,
                ))),
                OutboxState::Release => out.push(Packet::PubRel(PubRel::new(o.pkid(), None))),
            }
        }
    }

    fn position(&self, pkid: u16, qos: QoS, state: OutboxState) -> Option<usize> {
        self.inflight
            .iter()
            .position(|o| o.pkid() == pkid && o.qos == qos && o.state == state)
    }

    /// `Unknown`, or `WrongType` if `pkid` is in flight in another state.
    fn not_expected(&self, pkid: u16) -> Ack {
        if self.inflight.iter().any(|o| o.pkid() == pkid) {
            Ack::WrongType
        } else {
            Ack::Unknown
        }
    }

    /// Removes the in-flight message at `i`: it is delivered.
    fn finish(&mut self, i: usize, batch: &mut Batch) {
        if let Some(o) = self.inflight.remove(i) {
            self.released(&o);
            self.settled(&o, batch);
        }
    }

    /// PUBACK for a QoS 1 message.
    pub fn puback(&mut self, pkid: u16, batch: &mut Batch) -> Ack {
        match self.position(pkid, QoS::AtLeastOnce, OutboxState::Publish) {
            Some(i) => {
                self.finish(i, batch);
                Ack::Applied
            }
            None => self.not_expected(pkid),
        }
    }

    /// PUBREC for a QoS 2 message: from now on only PUBREL is owed. A
    /// PUBREC with a failure reason (`refused`) ends the delivery: no
    /// PUBREL follows [MQTT-4.3.3-4], the message is done.
    pub fn pubrec(&mut self, pkid: u16, refused: bool, batch: &mut Batch) -> Ack {
        let persistent = self.persistent();
        if let Some(i) = self.position(pkid, QoS::ExactlyOnce, OutboxState::Publish) {
            if refused {
                self.finish(i, batch);
            } else if let Some(o) = self.inflight.get_mut(i) {
                o.state = OutboxState::Release;
                if persistent {
                    // Only PUBREL is owed now: the entry no longer needs
                    // the message.
                    batch.put_outbox(&self.client_id, o.n, &o.entry());
                    batch.release_body(o.body.take().as_ref());
                }
            }
            return Ack::Applied;
        }
        // A repeated PUBREC for a message already released is answered again.
        if self
            .position(pkid, QoS::ExactlyOnce, OutboxState::Release)
            .is_some()
        {
            return Ack::Applied;
        }
        self.not_expected(pkid)
    }

    /// PUBCOMP ends a QoS 2 delivery.
    pub fn pubcomp(&mut self, pkid: u16, batch: &mut Batch) -> Ack {
        match self.position(pkid, QoS::ExactlyOnce, OutboxState::Release) {
            Some(i) => {
                self.finish(i, batch);
                Ack::Applied
            }
            None => self.not_expected(pkid),
        }
    }

    /// An incoming QoS 2 PUBLISH: true if it is new and must be routed,
    /// false if it is a resend of one already accepted [MQTT-4.3.3-10].
    pub fn accept_inbound(&mut self, pkid: u16, batch: &mut Batch) -> bool {
        let new = self.inbound.insert(pkid);
        if new && self.persistent() {
            batch.put_inbound(&self.client_id, pkid);
        }
        new
    }

    /// PUBREL from the client: true if the packet id was known.
    pub fn release_inbound(&mut self, pkid: u16, batch: &mut Batch) -> bool {
        let known = self.inbound.remove(&pkid);
        if known && self.persistent() {
            batch.delete_inbound(&self.client_id, pkid);
        }
        known
    }

    /// Drops an in-flight message by packet id, whatever its state: used
    /// when it can never be delivered (larger than the client accepts).
    pub fn forget(&mut self, pkid: u16, batch: &mut Batch) {
        if let Some(i) = self.inflight.iter().position(|o| o.pkid() == pkid) {
            self.dropped += 1;
            self.finish(i, batch);
        }
    }

    /// Incoming QoS 2 messages not yet released.
    pub fn inbound_len(&self) -> usize {
        self.inbound.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use std::collections::HashSet;

    /// Queues `n` plain QoS 1 messages on `t`.
    fn queue_plain(s: &mut Session, n: u64, b: &mut Batch) {
        for _ in 0..n {
            s.enqueue(
                msg("t", QoS::AtLeastOnce),
                QoS::AtLeastOnce,
                false,
                vec![],
                b,
            );
        }
    }

    fn msg(topic: &str, qos: QoS) -> Arc<Message> {
        Arc::new(Message {
            topic: topic.into(),
            payload: Bytes::from_static(b"x"),
            qos,
            retain: false,
            props: Default::default(),
            expires_at_ms: 0,
            publisher: None,
            wire: Default::default(),
        })
    }

    fn session(expiry: u32) -> Session {
        let mut s = Session::new("c".into(), None, Protocol::V5, expiry);
        s.max_inflight = 2;
        s.max_queue = 3;
        s
    }

    fn pkids(out: &[Packet]) -> Vec<u16> {
        out.iter()
            .map(|p| match p {
                Packet::Publish(p) => p.pkid,
                Packet::PubRel(r) => r.pkid,
                _ => u16::MAX,
            })
            .collect()
    }

    /// Stages a plain QoS 1 message as a publisher does: numbered from the
    /// session's counter, stored if `stored`.
    fn stage(s: &Session, b: &mut Batch, stored: bool) -> Outgoing {
        let m = msg("t", QoS::AtLeastOnce);
        let n = s.numbers().fetch_add(1, Ordering::Relaxed);
        let body = stored.then(|| b.share_body(&m, || m.to_record()));
        Session::staged(&s.client_id, n, m, QoS::AtLeastOnce, false, vec![], body, b)
    }

    // A message staged before one queued under the lock but taken in after
    // it goes first: packet ids go out in the order of `n`.
    #[test]
    fn a_staged_message_goes_before_one_numbered_after_it() {
        let mut s = session(60);
        s.max_inflight = 10;
        let mut b = Batch::new();
        let early = stage(&s, &mut b, true);
        queue_plain(&mut s, 1, &mut b); // numbered 2, queued at once
        let later = stage(&s, &mut b, true);
        assert!(s.admit(later, &mut b));
        assert!(s.admit(early, &mut b));
        let mut out = Vec::new();
        s.poll_send(0, &mut out, &mut b);
        assert_eq!(pkids(&out), [1, 2, 3]);
    }

    // A staged message meets the queue's bounds when taken in: the oldest
    // waiting one makes room; one over the byte budget is dropped, and its
    // stored copy deleted.
    #[test]
    fn a_staged_message_meets_the_queues_bounds() {
        let mut s = session(60);
        s.max_inflight = 10;
        let mut b = Batch::new();
        queue_plain(&mut s, 3, &mut b);
        let o = stage(&s, &mut b, true);
        assert!(s.admit(o, &mut b));
        assert_eq!(s.dropped, 1, "the oldest made room");
        let mut out = Vec::new();
        s.poll_send(0, &mut out, &mut b);
        assert_eq!(pkids(&out), [2, 3, 4]);

        for stored in [true, false] {
            let mut s = session(if stored { 60 } else { 0 });
            s.max_bytes = 0;
            let o = stage(&s, &mut Batch::new(), stored);
            let mut b = Batch::new();
            assert!(!s.admit(o, &mut b), "over the byte budget");
            assert_eq!(s.dropped, 1);
            assert_eq!(b.is_empty(), !stored, "its stored copy goes too");
        }
    }

    // [MQTT-4.9.0-2] no more than Receive Maximum unacknowledged QoS>0 sends.
    #[test]
    fn the_window_limits_what_is_in_flight() {
        let mut s = session(0);
        let mut b = Batch::new();
        queue_plain(&mut s, 3, &mut b);
        let mut out = vec![];
        s.poll_send(0, &mut out, &mut b);
        assert_eq!(pkids(&out), [1, 2], "packet ids start at 1");
        out.clear();
        s.poll_send(0, &mut out, &mut b);
        assert!(out.is_empty(), "window is full");
        assert_eq!(s.puback(1, &mut b), Ack::Applied);
        assert_eq!(
            s.puback(1, &mut b),
            Ack::Unknown,
            "a second PUBACK is ignored"
        );
        s.poll_send(0, &mut out, &mut b);
        assert_eq!(pkids(&out), [3]);
        assert!(b.is_empty(), "a clean session writes nothing");
    }

    #[test]
    fn qos0_bypasses_the_window_and_is_not_kept_offline() {
        let mut s = session(60);
        let mut b = Batch::new();
        s.connected = false;
        s.enqueue(
            msg("t", QoS::AtMostOnce),
            QoS::AtMostOnce,
            false,
            vec![],
            &mut b,
        );
        assert_eq!(s.pending(), 0);
        s.connected = true;
        s.enqueue(
            msg("t", QoS::AtMostOnce),
            QoS::AtMostOnce,
            false,
            vec![],
            &mut b,
        );
        let mut out = vec![];
        s.poll_send(0, &mut out, &mut b);
        assert_eq!(pkids(&out), [0]);
        assert!(b.is_empty(), "QoS 0 is never persisted");
    }

    #[test]
    fn a_full_queue_drops_the_oldest() {
        let mut s = session(60);
        let mut b = Batch::new();
        s.max_inflight = 0;
        queue_plain(&mut s, 5, &mut b);
        assert_eq!(s.pending(), 3);
        assert_eq!(s.dropped, 2);
    }

    #[test]
    fn retained_on_subscribe_is_not_bounded_by_the_offline_queue() {
        let mut s = session(60);
        let mut b = Batch::new();
        s.max_inflight = 0;
        for _ in 0..10 {
            let m = msg("r", QoS::AtLeastOnce);
            s.enqueue_retained(m, QoS::AtLeastOnce, vec![], &mut b);
        }
        for _ in 0..4 {
            let m = msg("t", QoS::AtLeastOnce);
            s.enqueue(m, QoS::AtLeastOnce, false, vec![], &mut b);
        }
        // All ten retained stay; the plain bound (3) applies to the rest.
        assert_eq!(s.pending(), 13);
        assert_eq!(s.dropped, 1);
        s.max_inflight = 100;
        let mut out = vec![];
        s.poll_send(0, &mut out, &mut b);
        let retained = out
            .iter()
            .filter(|p| matches!(p, Packet::Publish(p) if p.retain))
            .count();
        assert_eq!(retained, 10, "each with RETAIN set [MQTT-3.3.1-8]");
    }

    #[test]
    fn chat_messages_are_not_bounded_by_the_offline_queue() {
        let mut s = session(60);
        let mut b = Batch::new();
        s.max_inflight = 0;
        let conv: Arc<str> = "room".into();
        for seq in 1..=5 {
            let m = msg("chat/room", QoS::AtLeastOnce);
            let offer = s.offer_chat(&conv, seq, m, QoS::AtLeastOnce, true, &mut b);
            assert_eq!(offer, Offer::Queued);
        }
        for _ in 0..4 {
            let m = msg("t", QoS::AtLeastOnce);
            s.enqueue(m, QoS::AtLeastOnce, false, vec![], &mut b);
        }
        assert_eq!(
            s.pending(),
            5 + 3,
            "every chat message and the 3 newest plain ones"
        );
        assert_eq!(s.dropped, 1);
        assert_eq!(s.chat[&conv].queued, 5);
    }

    #[test]
    fn live_chat_beyond_the_byte_budget_stays_in_the_log_and_pauses_the_conversation() {
        let mut s = session(60);
        let mut b = Batch::new();
        s.max_inflight = 0;
        s.max_bytes = 30; // "chat/room" + "x" = 10 bytes a message
        let conv: Arc<str> = "room".into();
        let offers: Vec<Offer> = (1..=5)
            .map(|seq| {
                let m = msg("chat/room", QoS::AtLeastOnce);
                s.offer_chat(&conv, seq, m, QoS::AtLeastOnce, true, &mut b)
            })
            .collect();
        assert_eq!(
            offers,
            [
                Offer::Queued,
                Offer::Queued,
                Offer::Queued,
                Offer::Full,
                Offer::Full
            ]
        );
        assert_eq!(s.chat[&conv].queued, 3, "the replay resumes at 4");
        assert!(s.replay_paused.contains(&conv));
        assert!(!s.overloaded, "chat never overloads: it waits in the log");
        assert_eq!(s.held_bytes(), 30);
    }

    #[test]
    fn plain_messages_beyond_the_byte_budget_drop_the_oldest_and_overload_a_connected_client() {
        let mut s = session(0);
        let mut b = Batch::new();
        s.max_inflight = 0;
        s.max_queue = 100;
        s.max_bytes = 4; // "t" + "x" = 2 bytes a message
        queue_plain(&mut s, 3, &mut b);
        assert_eq!(s.pending(), 2);
        assert_eq!(s.dropped, 1);
        assert!(s.overloaded);
        assert_eq!(s.held_bytes(), 4);
        s.max_inflight = 10;
        let mut out = vec![];
        s.poll_send(0, &mut out, &mut b);
        assert_eq!(s.puback(pkids(&out)[0], &mut b), Ack::Applied);
        assert_eq!(s.held_bytes(), 2, "an acknowledged message frees its bytes");
    }

    // [MQTT-4.3.3-*] the QoS 2 sender's states; [MQTT-4.4.0-1] resend on resume.
    #[test]
    fn qos2_out_goes_publish_pubrel_pubcomp_and_is_resent_on_resume() {
        let mut s = session(60);
        let mut b = Batch::new();
        s.enqueue(
            msg("t", QoS::ExactlyOnce),
            QoS::ExactlyOnce,
            false,
            vec![],
            &mut b,
        );
        s.enqueue(
            msg("t", QoS::ExactlyOnce),
            QoS::ExactlyOnce,
            false,
            vec![],
            &mut b,
        );
        let mut out = vec![];
        s.poll_send(0, &mut out, &mut b);
        assert_eq!(s.pubrec(1, false, &mut b), Ack::Applied);
        out.clear();
        s.resend(&mut out);
        match (&out[0], &out[1]) {
            (Packet::PubRel(r), Packet::Publish(p)) => {
                assert_eq!(r.pkid, 1);
                assert_eq!(p.pkid, 2);
                assert!(p.dup);
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(
            s.pubcomp(2, &mut b),
            Ack::WrongType,
            "PUBCOMP before PUBREC is a protocol error"
        );
        assert_eq!(s.pubcomp(1, &mut b), Ack::Applied);
        assert_eq!(s.pending(), 1);
        assert!(!b.is_empty(), "a persistent session records each step");
    }

    #[test]
    fn inbound_qos2_is_routed_once() {
        let mut s = session(0);
        let mut b = Batch::new();
        assert!(s.accept_inbound(9, &mut b));
        assert!(!s.accept_inbound(9, &mut b));
        assert!(s.release_inbound(9, &mut b));
        assert!(!s.release_inbound(9, &mut b));
        assert!(s.accept_inbound(9, &mut b));
    }

    #[test]
    fn packet_ids_never_collide_with_one_in_flight() {
        let mut s = session(0);
        s.max_inflight = u16::MAX;
        s.max_queue = usize::MAX;
        let mut b = Batch::new();
        let mut out = vec![];
        queue_plain(&mut s, PKID_SPACE + 5, &mut b);
        s.poll_send(0, &mut out, &mut b);
        assert_eq!(out.len() as u64, PKID_SPACE);
        let ids: HashSet<u16> = pkids(&out).into_iter().collect();
        assert_eq!(ids.len() as u64, PKID_SPACE);
    }

    // [MQTT-4.3.2-*], [MQTT-4.3.3-*]: each QoS has its own acks.
    #[test]
    fn an_ack_of_the_wrong_kind_is_told_apart_from_an_unknown_id() {
        let mut s = session(0);
        let mut b = Batch::new();
        for qos in [QoS::AtLeastOnce, QoS::ExactlyOnce] {
            s.enqueue(msg("t", qos), qos, false, vec![], &mut b);
        }
        let mut out = vec![];
        s.poll_send(0, &mut out, &mut b);
        assert_eq!(pkids(&out), [1, 2]);
        assert_eq!(
            s.pubrec(1, false, &mut b),
            Ack::WrongType,
            "PUBREC for QoS 1"
        );
        assert_eq!(s.pubcomp(1, &mut b), Ack::WrongType, "PUBCOMP for QoS 1");
        assert_eq!(s.puback(2, &mut b), Ack::WrongType, "PUBACK for QoS 2");
        assert_eq!(s.puback(9, &mut b), Ack::Unknown);
        assert_eq!(s.pubcomp(9, &mut b), Ack::Unknown);
        assert_eq!(s.pending(), 2, "nothing was settled by a wrong ack");
    }

    // [MQTT-4.3.3-4] PUBREL follows only a PUBREC below 0x80: a refused
    // QoS 2 delivery is over.
    #[test]
    fn a_refusing_pubrec_ends_the_delivery() {
        let mut s = session(60);
        let mut b = Batch::new();
        s.enqueue(
            msg("t", QoS::ExactlyOnce),
            QoS::ExactlyOnce,
            false,
            vec![],
            &mut b,
        );
        let mut out = vec![];
        s.poll_send(0, &mut out, &mut b);
        assert_eq!(s.pubrec(1, true, &mut b), Ack::Applied);
        assert_eq!(s.pending(), 0);
        out.clear();
        s.resend(&mut out);
        assert!(out.is_empty(), "no PUBREL is owed on resume");
    }

    #[test]
    fn packet_ids_run_from_1_to_65535_and_wrap_to_1() {
        assert_eq!(pkid_of(1), 1);
        assert_eq!(pkid_of(PKID_SPACE), 65_535);
        assert_eq!(pkid_of(PKID_SPACE + 1), 1);
        assert_eq!(pkid_of(0), 1, "never 0, even for a corrupt record");
    }

    #[test]
    fn expired_messages_are_not_sent() {
        let mut s = session(0);
        let mut b = Batch::new();
        let mut m = (*msg("t", QoS::AtLeastOnce)).clone();
        m.expires_at_ms = 10;
        s.enqueue(Arc::new(m), QoS::AtLeastOnce, false, vec![], &mut b);
        let mut out = vec![];
        s.poll_send(11, &mut out, &mut b);
        assert!(out.is_empty());
        assert_eq!(s.dropped, 1);
    }

    /// Delivers chat seqs `from..=to` of `conv` and has the client ack
    /// each; returns the writes the acks made.
    fn deliver_and_ack(s: &mut Session, conv: &Arc<str>, from: u64, to: u64) -> Batch {
        let mut b = Batch::new();
        for seq in from..=to {
            let m = msg("chat/room", QoS::AtLeastOnce);
            assert_eq!(
                s.offer_chat(conv, seq, m, QoS::AtLeastOnce, true, &mut b),
                Offer::Queued
            );
            let mut out = Vec::new();
            s.poll_send(0, &mut out, &mut b);
            for p in out {
                if let Packet::Publish(p) = p {
                    assert_eq!(s.puback(p.pkid, &mut b), Ack::Applied);
                }
            }
        }
        b
    }

    // Issue #11 item 3: a persistent session's cursor is written once per
    // CURSOR_SAVE_ACKS acknowledgements (or when the connection ends), not
    // once per message.
    #[test]
    fn chat_cursor_writes_are_coalesced() {
        let mut s = session(60);
        s.max_inflight = 100;
        s.max_queue = 100;
        let conv: Arc<str> = "room".into();
        let n = u64::from(CURSOR_SAVE_ACKS);
        let b = deliver_and_ack(&mut s, &conv, 1, n - 1);
        assert!(b.is_empty(), "{} acks wrote {} times", n - 1, b.len());
        let b = deliver_and_ack(&mut s, &conv, n, n);
        assert_eq!(b.len(), 1, "the {n}th ack writes the cursor once");
        let b = deliver_and_ack(&mut s, &conv, n + 1, n + 3);
        assert!(b.is_empty());
        let mut end = Batch::new();
        s.flush_cursors(&mut end);
        assert_eq!(end.len(), 1, "the end of the connection writes the rest");
        let mut again = Batch::new();
        s.flush_cursors(&mut again);
        assert!(again.is_empty(), "nothing moved since");
        assert_eq!(s.chat.get(&conv).map(|c| c.acked), Some(n + 3));
    }

    // After a crash the cursor may be older than what the client acked:
    // what it replays up to `dup_until` goes out with DUP set.
    #[test]
    fn seqs_the_client_may_have_acked_before_a_crash_come_back_marked_dup() {
        let mut s = session(60);
        s.max_inflight = 100;
        let conv: Arc<str> = "room".into();
        let mut cursor = ChatCursor::at(10);
        cursor.dup_until = 12;
        s.chat.insert(conv.clone(), cursor);
        let mut b = Batch::new();
        for seq in 11..=14 {
            let m = msg("chat/room", QoS::AtLeastOnce);
            assert_eq!(
                s.offer_chat(&conv, seq, m, QoS::AtLeastOnce, false, &mut b),
                Offer::Queued
            );
        }
        let mut out = Vec::new();
        s.poll_send(0, &mut out, &mut b);
        let dups: Vec<bool> = out
            .iter()
            .map(|p| matches!(p, Packet::Publish(p) if p.dup))
            .collect();
        assert_eq!(dups, [true, true, false, false]);
    }
}
