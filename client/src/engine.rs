//! The client's behaviour: what each request of the app does, what each
//! packet from the broker does, and when the state file is written. It
//! runs in one task that owns the state; the app talks to it through
//! [`Request`]s and hears from it through [`Event`]s.
//!
//! The story of a send: the request becomes an outbox entry with a new
//! envelope id, the state file is written, the id goes back to the app,
//! then the entry is published at QoS 1 if connected (at most `WINDOW` at
//! a time). It leaves the outbox when the broker acknowledges it: its
//! PUBACK, or the delivery of our own message back to us on `chat/+`,
//! whichever comes first. The `Acked` event waits for that delivery, which
//! carries the seq (the PUBACK comes first in practice and has none).
//! After a reconnect every entry left is published again with the same id;
//! the broker answers a repeat with the seq it already gave.
//!
//! The story of a delivery: the timeline decides whether it is handed out
//! (dedup by (conv, seq), in order), the state file records the new last
//! seq, and only then is the PUBLISH acknowledged (manual acks), so a crash
//! in between means a redelivery, not a loss.
//!
//! The story of a resume: after CONNACK, a session the broker still had
//! replays by itself; a session it lost gets the subscriptions again and
//! every known conversation is filled from `rpc/history` after its last
//! seq.
//!
//! Events wait in a queue of their own until the app takes them; while it
//! holds `EVENTS_HIGH` of them the engine stops reading from the
//! connection (the broker holds the rest), but it keeps serving requests,
//! so an app that sends from its event loop never deadlocks with it.

use std::collections::{HashMap, HashSet, VecDeque};
use std::time::Duration;

use rumqttc::v5::mqttbytes::v5::{Filter, Packet, PubAckReason, Publish, SubscribeReasonCode};
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::{AsyncClient, MqttOptions};
use rumqttc::TlsConfiguration;
use serde::Deserialize;
use serde_json::{json, Value};
use tokio::sync::{mpsc, oneshot};

use crate::link::{self, NetEvent};
use crate::state::{Pending, State};
use crate::timeline::{Message, Reactions, Step, Timeline};
use crate::{Error, Event, Options, Transport};

/// Sends in flight on one connection at most; the rest wait in the outbox.
const WINDOW: usize = 32;
/// Sends the outbox holds at most (what an app may queue while offline).
const OUTBOX_MAX: usize = 10_000;
/// Messages per history page when filling a gap.
const FILL_PAGE: u64 = 100;
/// The session the client asks for (the broker caps it at its
/// `mqtt.session_expiry_max`): a phone may stay away for days.
const SESSION_EXPIRY_SECS: u32 = u32::MAX;
const KEEP_ALIVE: Duration = Duration::from_secs(30);
/// Sends acknowledged by PUBACK whose seq is still to come, at most.
const AWAITING_SEQ: usize = 1024;
/// Requests of the app answered by the broker, waiting at most.
const RPCS_MAX: usize = 256;
/// Events not yet taken by the app above which the connection is not
/// read (one history page may add `FILL_PAGE` more).
const EVENTS_HIGH: usize = 256;
/// Requests the app may queue.
const REQUESTS: usize = 64;
/// How long `close` waits for its DISCONNECT to go out.
const GOODBYE: Duration = Duration::from_secs(1);

/// What the app asks of the engine; each carries where the answer goes.
#[derive(Debug)]
pub(crate) enum Request {
    Send {
        conv: String,
        body: Value,
        reply: oneshot::Sender<Result<String, Error>>,
    },
    Open {
        conv: String,
        reply: oneshot::Sender<Option<u64>>,
    },
    MarkRead {
        conv: String,
        seq: u64,
        reply: oneshot::Sender<()>,
    },
    History {
        conv: String,
        limit: u64,
        reply: oneshot::Sender<Result<Vec<Message>, Error>>,
    },
    Conversations {
        reply: oneshot::Sender<Result<Vec<Value>, Error>>,
    },
    /// Any other RPC (edits, deletes, reactions): its `result` as is.
    Call {
        method: &'static str,
        params: Value,
        reply: oneshot::Sender<Result<Value, Error>>,
    },
    Close {
        reply: oneshot::Sender<()>,
    },
}

/// What an RPC we sent was for.
enum Rpc {
    Conversations(oneshot::Sender<Result<Vec<Value>, Error>>),
    History(oneshot::Sender<Result<Vec<Message>, Error>>),
    Call(oneshot::Sender<Result<Value, Error>>),
    Fill { conv: String },
    Read,
}

/// The connection currently up.
struct Link {
    conn: u64,
    client: AsyncClient,
    /// Publishes asked for whose packet id is not known yet, in order:
    /// the envelope id of a chat send, `None` for an RPC.
    unnumbered: VecDeque<Option<String>>,
    /// Chat sends awaiting PUBACK, by packet id.
    by_pkid: HashMap<u16, String>,
    /// Envelope ids published on this connection and still in the outbox.
    in_flight: HashSet<String>,
}

/// Why the engine stops.
enum Stop {
    /// The app asked (`close`, or every handle dropped).
    Closed(Option<oneshot::Sender<()>>),
    /// The last event says why (boxed: an event is large, a result
    /// carrying it on every step should not be).
    Fatal(Box<Event>),
}

struct Engine {
    opts: Options,
    /// What TLS trusts, for mqtts:// and wss://.
    tls: TlsConfiguration,
    state: State,
    /// The state as last written, to skip writes that change nothing.
    saved: State,
    timeline: Timeline,
    /// Events the app has not taken yet.
    out: VecDeque<Event>,
    link: Option<Link>,
    /// Sends the broker has stored (PUBACK) whose delivery back to us, with
    /// the seq, has not come yet: envelope id -> conversation, oldest first.
    awaiting_seq: VecDeque<(String, String)>,
    rpcs: HashMap<String, Rpc>,
    /// Correlation ids are `{rpc_prefix}-{n}`: fresh per run, so a reply
    /// queued for the session by an earlier run is not taken for ours.
    rpc_prefix: String,
    next_rpc: u64,
}

type Started = (mpsc::Sender<Request>, mpsc::Receiver<Event>, String, String);

/// Opens the state, writes it at once (so the client id is stable from the
/// first run on) and starts the engine and its connection.
pub(crate) fn start(opts: Options) -> Result<Started, Error> {
    let state = State::open(
        &opts.state,
        &opts.user,
        opts.client_id.as_deref(),
        &opts.client_id_prefix,
    )?;
    state.save(&opts.state)?;
    let tls = tls_config(&opts)?;
    let user = opts.user.clone();
    let client_id = state.client_id.clone();
    let engine = Engine::new(opts, state, tls);
    let (requests, requests_rx) = mpsc::channel(REQUESTS);
    let (events_tx, events) = mpsc::channel(EVENTS_HIGH);
    tokio::spawn(engine.run(requests_rx, events_tx));
    Ok((requests, events, user, client_id))
}

/// The system's CA bundle on Debian and its kin: what TLS trusts when no
/// roots are given.
const SYSTEM_CAS: &str = "/etc/ssl/certs/ca-certificates.crt";

/// The certificates TLS trusts: the given ones, else the system bundle.
/// Read only when the transport uses TLS, so a plain client needs no file
/// (and a missing bundle is an error, not rumqttc's panic).
fn tls_config(opts: &Options) -> Result<TlsConfiguration, Error> {
    let ca = match &opts.ca_pem {
        _ if !opts.server.uses_tls() => Vec::new(),
        Some(pem) => pem.clone(),
        None => std::fs::read(SYSTEM_CAS).map_err(|e| {
            Error::Options(format!(
                "no CA certificates given and {SYSTEM_CAS} cannot be read: {e}"
            ))
        })?,
    };
    Ok(TlsConfiguration::Simple {
        ca,
        alpn: None,
        client_auth: None,
    })
}

impl Engine {
    fn new(opts: Options, state: State, tls: TlsConfiguration) -> Engine {
        Engine {
            tls,
            opts,
            saved: state.clone(),
            state,
            timeline: Timeline::default(),
            out: VecDeque::new(),
            link: None,
            awaiting_seq: VecDeque::new(),
            rpcs: HashMap::new(),
            rpc_prefix: format!("r{:08x}", fastrand::u32(..)),
            next_rpc: 1,
        }
    }

    async fn run(mut self, mut requests: mpsc::Receiver<Request>, events: mpsc::Sender<Event>) {
        let (tx, mut net) = mpsc::channel(link::REQUESTS);
        let connection = link::spawn(self.mqtt_options(), tx);
        let stop = loop {
            let step = tokio::select! {
                permit = events.reserve(), if !self.out.is_empty() => {
                    match (permit, self.out.pop_front()) {
                        (Ok(permit), Some(event)) => permit.send(event),
                        // The app dropped its Events: nobody listens.
                        (Err(_), _) => self.out.clear(),
                        (Ok(_), None) => {}
                    }
                    Ok(())
                }
                request = requests.recv() => match request {
                    Some(request) => self.request(request),
                    None => Err(Stop::Closed(None)),
                },
                event = net.recv(), if self.out.len() < EVENTS_HIGH => match event {
                    Some(event) => self.network(event),
                    None => Err(Stop::Fatal(Box::new(Event::Failed(
                        "the connection task stopped".into(),
                    )))),
                },
            };
            if let Err(stop) = step {
                break stop;
            }
        };
        match stop {
            Stop::Closed(reply) => {
                self.leave(&mut net).await;
                connection.abort();
                if let Some(reply) = reply {
                    let _ = reply.send(());
                }
            }
            Stop::Fatal(last) => {
                connection.abort();
                self.out.push_back(*last);
            }
        }
        // What is left goes out before the stream ends; requests get
        // `Stopped` as the channel closes with this task.
        drop(requests);
        for event in self.out.drain(..) {
            if events.send(event).await.is_err() {
                break;
            }
        }
    }

    fn mqtt_options(&self) -> MqttOptions {
        let server = &self.opts.server;
        let broker = match &server.transport {
            Transport::Ws(url) | Transport::Wss(url) => url.as_str(),
            Transport::Tcp | Transport::Tls => server.host.as_str(),
        };
        let mut o = MqttOptions::new(&self.state.client_id, broker, server.port);
        o.set_transport(match &server.transport {
            Transport::Tcp => rumqttc::Transport::Tcp,
            Transport::Tls => rumqttc::Transport::tls_with_config(self.tls.clone()),
            Transport::Ws(_) => rumqttc::Transport::Ws,
            Transport::Wss(_) => rumqttc::Transport::wss_with_config(self.tls.clone()),
        });
        o.set_credentials(&self.opts.user, &self.opts.password);
        o.set_clean_start(false);
        o.set_session_expiry_interval(Some(SESSION_EXPIRY_SECS));
        o.set_keep_alive(KEEP_ALIVE);
        o.set_manual_acks(true);
        o.set_max_packet_size(Some(1 << 20));
        o
    }

    fn events_topic(&self) -> String {
        format!("users/{}/events", self.opts.user)
    }

    fn emit(&mut self, event: Event) {
        self.out.push_back(event);
    }

    /// Writes the state file if the state changed since the last write.
    fn save(&mut self) -> Result<(), Stop> {
        if self.state != self.saved {
            if let Err(e) = self.state.save(&self.opts.state) {
                return Err(Stop::Fatal(Box::new(Event::Failed(e.to_string()))));
            }
            self.saved = self.state.clone();
        }
        Ok(())
    }

    // ---- what the app asks

    fn request(&mut self, request: Request) -> Result<(), Stop> {
        match request {
            Request::Send { conv, body, reply } => {
                if self.state.outbox.len() >= OUTBOX_MAX {
                    let _ = reply.send(Err(Error::OutboxFull(self.state.outbox.len())));
                    return Ok(());
                }
                let id = self.send(conv, body)?;
                let _ = reply.send(Ok(id));
                self.pump();
            }
            Request::Open { conv, reply } => {
                let last = self.state.last_seq.get(&conv).copied();
                if let Some(seq) = last {
                    // What is shown counts as read for the unread counts.
                    self.read(&conv, seq);
                }
                let _ = reply.send(last);
            }
            Request::MarkRead { conv, seq, reply } => {
                self.read(&conv, seq);
                let _ = reply.send(());
            }
            Request::History { conv, limit, reply } => {
                let params = json!({"conv": conv, "limit": limit});
                if let Err((e, Rpc::History(reply))) =
                    self.rpc("history", params, Rpc::History(reply))
                {
                    let _ = reply.send(Err(e));
                }
            }
            Request::Conversations { reply } => {
                if let Err((e, Rpc::Conversations(reply))) =
                    self.rpc("conversations", json!({}), Rpc::Conversations(reply))
                {
                    let _ = reply.send(Err(e));
                }
            }
            Request::Call {
                method,
                params,
                reply,
            } => {
                if let Err((e, Rpc::Call(reply))) = self.rpc(method, params, Rpc::Call(reply)) {
                    let _ = reply.send(Err(e));
                }
            }
            Request::Close { reply } => return Err(Stop::Closed(Some(reply))),
        }
        Ok(())
    }

    /// Persists the send in the outbox; `pump` publishes it.
    fn send(&mut self, conv: String, body: Value) -> Result<String, Stop> {
        let id = self.state.new_envelope_id();
        self.state.outbox.push(Pending {
            id: id.clone(),
            conv,
            body,
        });
        self.save()?;
        Ok(id)
    }

    fn read(&mut self, conv: &str, seq: u64) {
        // Best effort: a read offline is not worth remembering.
        let _ = self.rpc("read", json!({"conv": conv, "seq": seq}), Rpc::Read);
    }

    /// Publishes outbox entries not yet sent on this connection, oldest
    /// first, while the window has room.
    fn pump(&mut self) {
        let Some(link) = self.link.as_mut() else {
            return;
        };
        for p in &self.state.outbox {
            if link.in_flight.len() >= WINDOW {
                break;
            }
            if link.in_flight.contains(&p.id) {
                continue;
            }
            let envelope = json!({"id": p.id, "body": p.body, "type": "text"});
            let topic = format!("chat/{}", p.conv);
            if link
                .client
                .try_publish(topic, QoS::AtLeastOnce, false, envelope.to_string())
                .is_err()
            {
                // The connection is going away; the next one sends it.
                break;
            }
            link.in_flight.insert(p.id.clone());
            link.unnumbered.push_back(Some(p.id.clone()));
        }
    }

    /// Sends an RPC request; its reply comes on our events topic. On
    /// failure `what` comes back with the reason.
    fn rpc(&mut self, method: &str, mut params: Value, what: Rpc) -> Result<(), (Error, Rpc)> {
        let Some(link) = self.link.as_mut() else {
            return Err((Error::Offline, what));
        };
        if self.rpcs.len() >= RPCS_MAX {
            return Err((Error::Busy, what));
        }
        let id = format!("{}-{}", self.rpc_prefix, self.next_rpc);
        self.next_rpc += 1;
        params["id"] = json!(id);
        let topic = format!("rpc/{method}");
        if link
            .client
            .try_publish(topic, QoS::AtLeastOnce, false, params.to_string())
            .is_err()
        {
            return Err((Error::Disconnected, what));
        }
        link.unnumbered.push_back(None);
        self.rpcs.insert(id, what);
        Ok(())
    }

    // ---- what the broker says

    fn network(&mut self, event: NetEvent) -> Result<(), Stop> {
        match event {
            NetEvent::Connected {
                conn,
                client,
                session_present,
            } => self.connected(conn, client, session_present),
            NetEvent::Lost {
                conn,
                error,
                retry_in,
            } => {
                if self.link.as_ref().is_none_or(|l| l.conn == conn) {
                    self.link = None;
                    // Waiting requests learn it by their dropped reply.
                    self.rpcs.clear();
                }
                self.emit(Event::Disconnected { error, retry_in });
                Ok(())
            }
            NetEvent::Refused { error } => Err(Stop::Fatal(Box::new(Event::Refused(error)))),
            NetEvent::Closed => Ok(()),
            NetEvent::Published { conn, pkid } => {
                if let Some(link) = self.link.as_mut().filter(|l| l.conn == conn) {
                    if let Some(Some(id)) = link.unnumbered.pop_front() {
                        link.by_pkid.insert(pkid, id);
                    }
                }
                Ok(())
            }
            NetEvent::Incoming { conn, packet } => {
                if self.link.as_ref().is_some_and(|l| l.conn == conn) {
                    self.incoming(*packet)?;
                }
                Ok(())
            }
        }
    }

    fn connected(
        &mut self,
        conn: u64,
        client: AsyncClient,
        session_present: bool,
    ) -> Result<(), Stop> {
        self.link = Some(Link {
            conn,
            client,
            unnumbered: VecDeque::new(),
            by_pkid: HashMap::new(),
            in_flight: HashSet::new(),
        });
        self.rpcs.clear();
        self.emit(Event::Connected {
            client_id: self.state.client_id.clone(),
            session_present,
        });
        if !session_present {
            self.state.subscribed = false;
            self.save()?;
        }
        if !self.state.subscribed {
            // A new session, or one the broker lost: subscribe (the broker
            // starts its cursors at each conversation's head; what came
            // before is fetched below).
            let filters = [
                Filter::new("chat/+", QoS::AtLeastOnce),
                Filter::new(self.events_topic(), QoS::AtLeastOnce),
            ];
            let subscribed = self
                .link
                .as_ref()
                .is_some_and(|l| l.client.try_subscribe_many(filters).is_ok());
            if !subscribed {
                return Ok(());
            }
        }
        // A lost session misses every conversation; a kept one only what
        // an earlier connection asked for and did not get.
        let mut convs = self.timeline.wanted();
        if !session_present {
            convs.extend(self.state.last_seq.keys().cloned());
            convs.sort();
            convs.dedup();
        }
        for conv in convs {
            if let Some(fetch) = self.timeline.fill(&self.state.last_seq, &conv) {
                self.fetch(fetch);
            }
        }
        self.pump();
        Ok(())
    }

    fn incoming(&mut self, packet: Packet) -> Result<(), Stop> {
        match packet {
            Packet::Publish(p) => {
                self.publish(&p)?;
                if let Some(link) = &self.link {
                    // On failure the broker redelivers after a reconnect,
                    // and the timeline drops the repeat.
                    let _ = link.client.try_ack(&p);
                }
            }
            Packet::PubAck(ack) => {
                let id = self.link.as_mut().and_then(|l| l.by_pkid.remove(&ack.pkid));
                if let Some(id) = id {
                    match ack.reason {
                        PubAckReason::Success | PubAckReason::NoMatchingSubscribers => {
                            self.stored(&id)?
                        }
                        reason => self.rejected(&id, reason)?,
                    }
                }
            }
            Packet::SubAck(ack) => {
                let refused = ack
                    .return_codes
                    .iter()
                    .any(|c| !matches!(c, SubscribeReasonCode::Success(_)));
                if refused {
                    self.emit(Event::Warning(format!(
                        "the broker refused a subscription: {:?}",
                        ack.return_codes
                    )));
                } else {
                    self.state.subscribed = true;
                    self.save()?;
                }
            }
            _ => {}
        }
        Ok(())
    }

    /// A PUBLISH from the broker, before it is acknowledged.
    fn publish(&mut self, p: &Publish) -> Result<(), Stop> {
        let topic = String::from_utf8_lossy(&p.topic);
        if topic.starts_with("chat/") {
            match serde_json::from_slice::<Message>(&p.payload) {
                Ok(m) => {
                    let step = self.receive(m);
                    self.apply(step)?;
                }
                Err(e) => self.emit(Event::Warning(format!(
                    "unreadable message on {topic}: {e}"
                ))),
            }
        } else if topic == self.events_topic() {
            match serde_json::from_slice::<Value>(&p.payload) {
                Ok(event) => self.event(event)?,
                Err(e) => self.emit(Event::Warning(format!("unreadable event: {e}"))),
            }
        }
        Ok(())
    }

    /// A delivered message: our own comes back as the proof of its send.
    fn receive(&mut self, m: Message) -> Step {
        self.echo(&m);
        self.timeline.live(&mut self.state.last_seq, m)
    }

    /// Our own message delivered back: the send it proves is stored, and
    /// this is its seq.
    fn echo(&mut self, m: &Message) {
        if m.from != self.opts.user {
            return;
        }
        let pending = self.forget(&m.id).is_some();
        let awaited = match self.awaiting_seq.iter().position(|(id, _)| *id == m.id) {
            Some(i) => self.awaiting_seq.remove(i).is_some(),
            None => false,
        };
        if pending || awaited {
            self.emit(Event::Acked {
                id: m.id.clone(),
                conv: m.conv.clone(),
                seq: Some(m.seq),
            });
            self.pump();
        }
    }

    /// Writes the state (a delivery may have moved a last seq or emptied an
    /// outbox entry), then hands out what the timeline released and asks
    /// for what it lacks.
    fn apply(&mut self, step: Step) -> Result<(), Stop> {
        self.save()?;
        self.out
            .extend(step.show.into_iter().map(|m| Event::Message(Box::new(m))));
        if let Some(fetch) = step.fetch {
            self.fetch(fetch);
        }
        Ok(())
    }

    fn fetch(&mut self, (conv, after): (String, u64)) {
        let params = json!({"conv": conv, "after": after, "limit": FILL_PAGE});
        // Offline or busy: the timeline still wants it, so the next
        // connection asks again.
        let _ = self.rpc("history", params, Rpc::Fill { conv });
    }

    /// Removes a send from the outbox and from this connection's window.
    fn forget(&mut self, id: &str) -> Option<Pending> {
        if let Some(link) = self.link.as_mut() {
            link.in_flight.remove(id);
        }
        self.state.take_pending(id)
    }

    /// A PUBACK: the send is on disk and leaves the outbox; its `Acked`
    /// event waits for the seq (see `echo`).
    fn stored(&mut self, id: &str) -> Result<(), Stop> {
        if let Some(p) = self.forget(id) {
            self.save()?;
            if self.awaiting_seq.len() >= AWAITING_SEQ {
                if let Some((id, conv)) = self.awaiting_seq.pop_front() {
                    self.emit(Event::Acked {
                        id,
                        conv,
                        seq: None,
                    });
                }
            }
            self.awaiting_seq.push_back((p.id, p.conv));
            self.pump();
        }
        Ok(())
    }

    /// The broker refused a send (MQTT 5 reason code): sending it again
    /// would be refused again, so it leaves the outbox.
    fn rejected(&mut self, id: &str, reason: PubAckReason) -> Result<(), Stop> {
        if let Some(p) = self.forget(id) {
            self.save()?;
            let reason = match reason {
                PubAckReason::NotAuthorized => "not a member of this conversation".to_string(),
                PubAckReason::PayloadFormatInvalid => {
                    "the broker found the envelope invalid".into()
                }
                PubAckReason::QuotaExceeded => "rate limited or too large".into(),
                other => format!("{other:?}"),
            };
            self.emit(Event::Rejected {
                id: p.id,
                conv: p.conv,
                reason,
            });
            self.pump();
        }
        Ok(())
    }

    /// An event on `users/{me}/events`: a reply to one of our RPCs, or
    /// news (membership, read receipts, errors) handed out as a notice.
    fn event(&mut self, event: Value) -> Result<(), Stop> {
        let ours = (event["type"] == "rpc")
            .then(|| event["id"].as_str())
            .flatten()
            .and_then(|id| self.rpcs.remove(id));
        let Some(what) = ours else {
            if event["type"] == "reactions" {
                self.emit(reactions_of(event));
            } else if event["type"] != "rpc" {
                self.emit(Event::Notice(event));
            }
            return Ok(());
        };
        if event["ok"] != true {
            let error = &event["error"];
            let error = Error::Rpc {
                code: error["code"].as_str().unwrap_or("error").to_string(),
                message: error["message"]
                    .as_str()
                    .unwrap_or("the request failed")
                    .to_string(),
            };
            match what {
                Rpc::Fill { conv } => {
                    self.timeline.abandon(&conv);
                    self.emit(Event::Warning(format!("filling {conv}: {error}")));
                }
                Rpc::History(reply) => {
                    let _ = reply.send(Err(error));
                }
                Rpc::Conversations(reply) => {
                    let _ = reply.send(Err(error));
                }
                Rpc::Call(reply) => {
                    let _ = reply.send(Err(error));
                }
                Rpc::Read => {}
            }
            return Ok(());
        }
        let result = &event["result"];
        match what {
            Rpc::Read => {}
            Rpc::Conversations(reply) => {
                let list = result["conversations"]
                    .as_array()
                    .cloned()
                    .unwrap_or_default();
                let _ = reply.send(Ok(list));
            }
            Rpc::History(reply) => {
                let _ = reply.send(Ok(messages_of(result)));
            }
            Rpc::Call(reply) => {
                let _ = reply.send(Ok(result.clone()));
            }
            Rpc::Fill { conv } => {
                let messages = messages_of(result);
                for m in &messages {
                    self.echo(m);
                }
                let head = result["head"].as_u64().unwrap_or(0);
                let step = self
                    .timeline
                    .page(&mut self.state.last_seq, &conv, messages, head);
                self.apply(step)?;
            }
        }
        Ok(())
    }

    /// Sends DISCONNECT (the session stays on the broker) and waits a
    /// moment for it to go out.
    async fn leave(&mut self, net: &mut mpsc::Receiver<NetEvent>) {
        let Some(link) = self.link.take() else {
            return;
        };
        if link.client.try_disconnect().is_err() {
            return;
        }
        let _ = tokio::time::timeout(GOODBYE, async {
            while let Some(event) = net.recv().await {
                if matches!(event, NetEvent::Closed | NetEvent::Lost { .. }) {
                    break;
                }
            }
        })
        .await;
    }
}

/// A `reactions` summary event (DESIGN §4, "Reactions"); one that does not
/// parse is handed out as the notice it is.
fn reactions_of(event: Value) -> Event {
    #[derive(Deserialize)]
    struct Summary {
        conv: String,
        messages: Vec<Reactions>,
    }
    match Summary::deserialize(&event) {
        Ok(Summary { conv, messages }) => Event::Reactions { conv, messages },
        Err(_) => Event::Notice(event),
    }
}

/// The messages of a history result; entries that do not parse are skipped.
fn messages_of(result: &Value) -> Vec<Message> {
    result["messages"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|m| serde_json::from_value(m.clone()).ok())
                .collect()
        })
        .unwrap_or_default()
}
