//! Embedding: chatmq inside a Rust program, with in-process clients and
//! publish interceptors (`docs/EMBEDDING.md`).
//!
//! [`Embedded::start`] runs the broker from [`Settings`] with the
//! [`Listeners`] chosen (all, or none for in-process use only). A
//! [`Client`] is an in-process MQTT session: its packets go through the
//! same channel state machine as a socket's (without bytes or codec), so
//! the ACL, retained messages, the chat namespaces and the interceptors
//! apply to it exactly as to a TCP client. What it receives waits in a
//! bounded queue; what does not fit is dropped and counted
//! ([`Client::dropped`], and the broker's `messages_dropped`).
//!
//! An [`Interceptor`] sees every client PUBLISH (in-process ones too)
//! after the protocol checks and before the ACL, the chat layer or the
//! router: it allows, rewrites the payload, or rejects.

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use chatmq_config::Settings;
use chatmq_storage::Commit;
use rumqttc::v5::mqttbytes::v5::{
    ConnectReturnCode, Filter, Packet, PubAck, PubAckReason, PubComp, PubRec, PubRecReason, PubRel,
    Publish, Subscribe, SubscribeReasonCode,
};
use rumqttc::v5::mqttbytes::QoS;
use tokio::sync::{mpsc, oneshot, watch, OnceCell};
use tokio::task::JoinSet;

use crate::access::Identity;
use crate::broker::{Broker, Kick, Metrics, SessionCell};
use crate::channel::{Channel, Close, Out};
use crate::chat::namespace::valid_user;
use crate::codec::Protocol;
pub use crate::hooks::{Interceptor, Publication, Rejection, Verdict};
use crate::server::Server;
pub use crate::server::{Listeners, StartError};

/// Messages an in-process client holds for its reader before it drops.
pub const DELIVERY_QUEUE: usize = 1024;
/// Calls (publish, subscribe) waiting for an in-process session.
const COMMAND_QUEUE: usize = 64;

/// Why an in-process call failed.
#[derive(Debug, thiserror::Error)]
pub enum EmbedError {
    #[error("`{0}` is not a valid user id (letters, digits, `_`, `-`, `.`)")]
    BadUser(String),
    #[error("the broker refused the in-process session: {0:?}")]
    Connect(ConnectReturnCode),
    #[error("the publish was refused: {0:?}")]
    PublishRefused(PubAckReason),
    #[error("the subscription to {filter} was refused: {reason:?}")]
    SubscribeRefused {
        filter: String,
        reason: SubscribeReasonCode,
    },
    #[error("the in-process session has ended (the broker stopped or it was taken over)")]
    Closed,
}

/// A message an in-process client received.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Delivery {
    pub topic: String,
    pub payload: Bytes,
    pub qos: QoS,
    pub retain: bool,
    /// With [`SessionOptions::manual_ack`], what [`Client::ack`] takes
    /// for a QoS 1 delivery; 0 otherwise.
    pub pkid: u16,
}

/// A persistent in-process session ([`persistent_client`]).
#[derive(Debug, Clone)]
pub struct SessionOptions {
    /// Its client id: the same id finds the session again after a restart.
    pub client_id: String,
    /// How long the session outlives its client, in seconds.
    pub expiry_secs: u32,
    /// QoS 1 deliveries are acknowledged by [`Client::ack`], not on
    /// receipt: one not acknowledged when the session ends is sent again
    /// at the next connect (after a restart too).
    pub manual_ack: bool,
}

/// A broker running inside this program.
pub struct Embedded {
    server: Server,
    /// Publishes for [`Embedded::publish`]: an anonymous in-process
    /// client, connected at the first publish.
    publisher: OnceCell<Client>,
    /// The in-process sessions' tasks, ended before the store closes.
    clients: Mutex<JoinSet<()>>,
    stop: watch::Sender<bool>,
}

impl Embedded {
    /// Starts the broker with the `listeners` chosen.
    pub async fn start(settings: Settings, listeners: Listeners) -> Result<Embedded, StartError> {
        let server = Server::start_with(settings, listeners).await?;
        Ok(Embedded {
            server,
            publisher: OnceCell::new(),
            clients: Mutex::new(JoinSet::new()),
            stop: watch::channel(false).0,
        })
    }

    /// Where MQTT over TCP listens, if it does.
    pub fn mqtt_addr(&self) -> Option<SocketAddr> {
        self.server.mqtt_addr
    }

    /// Where the HTTP API listens, if it does.
    pub fn http_addr(&self) -> Option<SocketAddr> {
        self.server.http_addr
    }

    /// The broker itself (its chat layer, metrics, settings).
    pub fn broker(&self) -> &Arc<Broker> {
        &self.server.broker
    }

    /// Adds an interceptor, called after those registered before it.
    pub fn register_interceptor(&self, interceptor: impl Interceptor) {
        self.server
            .broker
            .interceptors
            .register(Arc::new(interceptor));
    }

    /// A new in-process session (clean; it ends when the [`Client`] is
    /// dropped), acting as `user` (trusted: no password) or anonymous.
    pub async fn client(&self, user: Option<&str>) -> Result<Client, EmbedError> {
        let (client, session) = connect(&self.server.broker, user, None).await?;
        let mut stop = self.stop.subscribe();
        self.clients
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .spawn(async move { session.run(&mut stop).await });
        Ok(client)
    }

    /// Publishes as an anonymous in-process client; returns once the
    /// broker acknowledged (QoS 1, 2: durable) or refused it.
    pub async fn publish(
        &self,
        topic: impl Into<String>,
        payload: impl Into<Bytes>,
        qos: QoS,
    ) -> Result<(), EmbedError> {
        let publisher = self.publisher.get_or_try_init(|| self.client(None)).await?;
        publisher.publish(topic, payload, qos).await
    }

    /// A new anonymous in-process client subscribed to `filter` at QoS 1.
    pub async fn subscribe(&self, filter: impl Into<String>) -> Result<Client, EmbedError> {
        let client = self.client(None).await?;
        client.subscribe(filter, QoS::AtLeastOnce).await?;
        Ok(client)
    }

    /// Ends the in-process sessions, then stops the broker as
    /// [`Server::shutdown`] does.
    pub async fn shutdown(self) {
        let _ = self.stop.send(true);
        let mut clients = self.clients.into_inner().unwrap_or_else(|e| e.into_inner());
        while clients.join_next().await.is_some() {}
        self.server.shutdown().await;
    }
}

enum Command {
    Publish {
        publish: Publish,
        done: oneshot::Sender<Result<(), EmbedError>>,
    },
    Subscribe {
        filter: String,
        qos: QoS,
        no_local: bool,
        done: oneshot::Sender<Result<(), EmbedError>>,
    },
    Ack(u16),
}

/// An in-process MQTT session. Dropping it ends the session.
pub struct Client {
    client_id: Arc<str>,
    commands: mpsc::Sender<Command>,
    deliveries: mpsc::Receiver<Delivery>,
    dropped: Arc<AtomicU64>,
}

impl Client {
    pub fn client_id(&self) -> &str {
        &self.client_id
    }

    /// Publishes `payload` to `topic`; returns once the broker
    /// acknowledged (QoS 1, 2: durable) or refused it. QoS 0 returns once
    /// the broker has taken it.
    pub async fn publish(
        &self,
        topic: impl Into<String>,
        payload: impl Into<Bytes>,
        qos: QoS,
    ) -> Result<(), EmbedError> {
        let publish = Publish::new(topic.into(), qos, payload.into(), None);
        let (done, answer) = oneshot::channel();
        self.call(Command::Publish { publish, done }, answer).await
    }

    /// Subscribes to `filter`; returns once the broker granted it.
    pub async fn subscribe(&self, filter: impl Into<String>, qos: QoS) -> Result<(), EmbedError> {
        self.subscribe_with(filter, qos, false).await
    }

    /// Subscribes to `filter`; `no_local`: what this session publishes
    /// itself is not delivered to it (MQTT 5 No Local).
    pub async fn subscribe_with(
        &self,
        filter: impl Into<String>,
        qos: QoS,
        no_local: bool,
    ) -> Result<(), EmbedError> {
        let (done, answer) = oneshot::channel();
        let filter = filter.into();
        let command = Command::Subscribe {
            filter,
            qos,
            no_local,
            done,
        };
        self.call(command, answer).await
    }

    /// Acknowledges a QoS 1 delivery of a [`SessionOptions::manual_ack`]
    /// session (its [`Delivery::pkid`]).
    pub async fn ack(&self, pkid: u16) -> Result<(), EmbedError> {
        self.commands
            .send(Command::Ack(pkid))
            .await
            .map_err(|_| EmbedError::Closed)
    }

    /// A handle that publishes on this session (the same client id, so
    /// its No Local subscriptions skip what the handle publishes).
    pub fn publisher(&self) -> Publisher {
        Publisher {
            commands: self.commands.clone(),
        }
    }

    async fn call(
        &self,
        command: Command,
        answer: oneshot::Receiver<Result<(), EmbedError>>,
    ) -> Result<(), EmbedError> {
        self.commands
            .send(command)
            .await
            .map_err(|_| EmbedError::Closed)?;
        answer.await.unwrap_or(Err(EmbedError::Closed))
    }

    /// The next message received; `None` once the session has ended.
    pub async fn recv(&mut self) -> Option<Delivery> {
        self.deliveries.recv().await
    }

    /// A message already received, if any, without waiting.
    pub fn try_recv(&mut self) -> Option<Delivery> {
        self.deliveries.try_recv().ok()
    }

    /// Messages dropped because the reader did not keep up
    /// ([`DELIVERY_QUEUE`]).
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }
}

/// Publishes on a [`Client`]'s session ([`Client::publisher`]).
#[derive(Clone)]
pub struct Publisher {
    commands: mpsc::Sender<Command>,
}

impl Publisher {
    /// As [`Client::publish`].
    pub async fn publish(
        &self,
        topic: impl Into<String>,
        payload: impl Into<Bytes>,
        qos: QoS,
        retain: bool,
    ) -> Result<(), EmbedError> {
        self.send(topic, payload, qos, retain).await?.await
    }

    /// Hands a publish to the session (publishes are taken in the order
    /// sent) and returns its answer to wait for, so that several can be
    /// in flight at once.
    pub async fn send(
        &self,
        topic: impl Into<String>,
        payload: impl Into<Bytes>,
        qos: QoS,
        retain: bool,
    ) -> Result<impl std::future::Future<Output = Result<(), EmbedError>> + Send, EmbedError> {
        let mut publish = Publish::new(topic.into(), qos, payload.into(), None);
        publish.retain = retain;
        let (done, answer) = oneshot::channel();
        self.commands
            .send(Command::Publish { publish, done })
            .await
            .map_err(|_| EmbedError::Closed)?;
        Ok(async move { answer.await.unwrap_or(Err(EmbedError::Closed)) })
    }

    /// As [`Client::ack`].
    pub async fn ack(&self, pkid: u16) -> Result<(), EmbedError> {
        self.commands
            .send(Command::Ack(pkid))
            .await
            .map_err(|_| EmbedError::Closed)
    }
}

/// Connects a persistent in-process session to `broker` as `user`
/// (trusted) or anonymous. Returns the client and the future that drives
/// the session: the caller runs it (and awaits it before the store closes);
/// it ends when the client is dropped or `stop` turns true.
pub async fn persistent_client(
    broker: &Arc<Broker>,
    user: Option<&str>,
    options: SessionOptions,
    mut stop: watch::Receiver<bool>,
) -> Result<(Client, impl std::future::Future<Output = ()> + Send), EmbedError> {
    let (client, session) = connect(broker, user, Some(options)).await?;
    Ok((client, async move { session.run(&mut stop).await }))
}

/// Connects an in-process session (clean, or as `options` say); the
/// [`Session`] returned drives it.
async fn connect(
    broker: &Arc<Broker>,
    user: Option<&str>,
    options: Option<SessionOptions>,
) -> Result<(Client, Session), EmbedError> {
    let identity = match user {
        Some(u) if valid_user(u) => Identity::User(u.into()),
        Some(u) => return Err(EmbedError::BadUser(u.to_string())),
        None => Identity::Anonymous,
    };
    let (client_id, clean_start, properties, manual_ack): (Arc<str>, _, _, _) = match &options {
        None => {
            let id = format!("embedded-{:x}", broker.next_id()).into();
            (id, true, None, false)
        }
        Some(o) => {
            let properties = rumqttc::v5::mqttbytes::v5::ConnectProperties {
                session_expiry_interval: Some(o.expiry_secs),
                ..rumqttc::v5::mqttbytes::v5::ConnectProperties::new()
            };
            (
                o.client_id.as_str().into(),
                false,
                Some(properties),
                o.manual_ack,
            )
        }
    };
    let mut channel = Channel::new(broker.clone(), broker.next_id());
    let connect = rumqttc::v5::mqttbytes::v5::Connect {
        keep_alive: 0,
        client_id: client_id.to_string(),
        clean_start,
        properties,
    };
    let connected = channel
        .connect(Protocol::V5, connect, None, Ok(identity))
        .await;
    let mut refused = None;
    // What a resumed session resends comes with the CONNACK.
    let mut resent = Vec::new();
    for out in channel.take_output() {
        match out {
            Out::Now(Packet::ConnAck(a)) if a.code != ConnectReturnCode::Success => {
                refused = Some(a.code)
            }
            Out::Now(Packet::ConnAck(_)) => {}
            Out::Now(p) => resent.push(p),
            Out::AfterCommit(..) => {}
        }
    }
    let kicked = match (connected, refused) {
        (Ok(k), None) => k,
        (_, Some(code)) => return Err(EmbedError::Connect(code)),
        (Err(_), None) => return Err(EmbedError::Connect(ConnectReturnCode::UnspecifiedError)),
    };
    let Some(cell) = channel.session().cloned() else {
        return Err(EmbedError::Closed);
    };
    let (commands, rx) = mpsc::channel(COMMAND_QUEUE);
    let (tx, deliveries) = mpsc::channel(DELIVERY_QUEUE);
    let dropped = Arc::new(AtomicU64::new(0));
    let session = Session {
        channel,
        cell,
        commands: rx,
        kicked,
        max_inflight: usize::from(broker.settings.mqtt.max_inflight),
        metrics: broker.metrics.clone(),
        deliveries: tx,
        dropped: dropped.clone(),
        waiting: HashMap::new(),
        pending: VecDeque::new(),
        next_pkid: 0,
        manual_ack,
        resent,
    };
    let client = Client {
        client_id,
        commands,
        deliveries,
        dropped,
    };
    Ok((client, session))
}

/// The task side of a [`Client`]: plays the client's part of MQTT for the
/// channel (acks what it is sent, matches acks to calls).
struct Session {
    channel: Channel,
    cell: Arc<SessionCell>,
    commands: mpsc::Receiver<Command>,
    /// Resolves when another connection takes the client id over.
    kicked: oneshot::Receiver<Kick>,
    /// Calls waiting for an ack at most (the broker's receive maximum:
    /// one more would be a protocol error).
    max_inflight: usize,
    metrics: Arc<Metrics>,
    deliveries: mpsc::Sender<Delivery>,
    dropped: Arc<AtomicU64>,
    /// Calls waiting for their ack, by packet id.
    waiting: HashMap<u16, Answer>,
    /// Acks that wait for a commit, in order.
    pending: VecDeque<(Commit, Packet)>,
    next_pkid: u16,
    /// QoS 1 deliveries wait for [`Client::ack`].
    manual_ack: bool,
    /// Packets a resumed session resent at connect, answered first.
    resent: Vec<Packet>,
}

/// A call waiting for the broker's answer.
struct Answer {
    done: oneshot::Sender<Result<(), EmbedError>>,
    /// The filter of a SUBSCRIBE (for its error).
    filter: Option<String>,
}

impl Session {
    async fn run(mut self, stop: &mut watch::Receiver<bool>) {
        let _ = self.serve(stop).await;
        for (_, a) in self.waiting.drain() {
            let _ = a.done.send(Err(EmbedError::Closed));
        }
        self.channel
            .close(Close {
                reason: None,
                will: false,
            })
            .await;
    }

    /// Runs until the client is dropped, the broker stops, the session is
    /// taken over, or the channel closes it.
    async fn serve(&mut self, stop: &mut watch::Receiver<bool>) -> Result<(), Close> {
        let cell = self.cell.clone();
        for p in std::mem::take(&mut self.resent) {
            self.answer(p).await?;
        }
        loop {
            self.flush().await?;
            let mut packets = Vec::new();
            // QoS 0 from the session's inbox first, as a connection writes
            // it (see `Connection::deliver_inbox`).
            let now = crate::clock::now_ms();
            for p in self.channel.poll_deliveries(&mut packets).await {
                if p.msg.is_expired(now) {
                    self.metrics
                        .messages_dropped
                        .fetch_add(1, Ordering::Relaxed);
                    continue;
                }
                self.answer(Packet::Publish(p.to_publish())).await?;
            }
            for p in packets {
                self.answer(p.into_packet()).await?;
            }
            self.flush().await?;
            let room = self.waiting.len() < self.max_inflight;
            tokio::select! {
                _ = stop.changed() => return Ok(()),
                _ = &mut self.kicked => return Ok(()),
                command = self.commands.recv(), if room => match command {
                    Some(c) => self.command(c).await?,
                    None => return Ok(()),
                },
                done = async {
                    match self.pending.front_mut() {
                        Some((c, _)) => c.await,
                        None => std::future::pending().await,
                    }
                } => {
                    let Some((_, ack)) = self.pending.pop_front() else { continue };
                    if done.is_err() {
                        // Not durable: the calls fail, as a socket
                        // client's connection would close.
                        return Ok(());
                    }
                    if matches!(ack, Packet::PubAck(_)) {
                        self.channel.puback_sent();
                    }
                    self.answer(ack).await?;
                }
                _ = cell.wake.notified() => {}
            }
        }
    }

    /// Answers what the channel has to send now; queues what waits for a
    /// commit.
    async fn flush(&mut self) -> Result<(), Close> {
        loop {
            let out = self.channel.take_output();
            if out.is_empty() {
                return Ok(());
            }
            for o in out {
                match o {
                    Out::Now(p) => self.answer(p).await?,
                    Out::AfterCommit(c, p) => self.pending.push_back((c, p)),
                }
            }
        }
    }

    async fn command(&mut self, command: Command) -> Result<(), Close> {
        match command {
            Command::Publish { mut publish, done } => {
                let qos = publish.qos;
                if qos != QoS::AtMostOnce {
                    publish.pkid = self.pkid();
                    let answer = Answer { done, filter: None };
                    self.waiting.insert(publish.pkid, answer);
                    self.channel.handle(Packet::Publish(publish)).await
                } else {
                    let handled = self.channel.handle(Packet::Publish(publish)).await;
                    let _ = done.send(match &handled {
                        Ok(()) => Ok(()),
                        Err(_) => Err(EmbedError::Closed),
                    });
                    handled
                }
            }
            Command::Ack(pkid) => {
                let ack = PubAck::new(pkid, None);
                self.channel.handle(Packet::PubAck(ack)).await
            }
            Command::Subscribe {
                filter,
                qos,
                no_local,
                done,
            } => {
                let mut f = Filter::new(filter.clone(), qos);
                f.nolocal = no_local;
                let mut subscribe = Subscribe::new(f, None);
                subscribe.pkid = self.pkid();
                let answer = Answer {
                    done,
                    filter: Some(filter),
                };
                self.waiting.insert(subscribe.pkid, answer);
                self.channel.handle(Packet::Subscribe(subscribe)).await
            }
        }
    }

    /// A packet id no call waits on.
    fn pkid(&mut self) -> u16 {
        loop {
            self.next_pkid = self.next_pkid.wrapping_add(1).max(1);
            if !self.waiting.contains_key(&self.next_pkid) {
                return self.next_pkid;
            }
        }
    }

    fn resolve(&mut self, pkid: u16, result: Result<(), EmbedError>) {
        if let Some(a) = self.waiting.remove(&pkid) {
            let _ = a.done.send(result);
        }
    }

    /// Takes one packet the channel sends to its client.
    async fn answer(&mut self, packet: Packet) -> Result<(), Close> {
        match packet {
            Packet::Publish(p) => {
                let manual = self.manual_ack && p.qos == QoS::AtLeastOnce;
                let delivery = Delivery {
                    topic: String::from_utf8_lossy(&p.topic).into_owned(),
                    payload: p.payload.clone(),
                    qos: p.qos,
                    retain: p.retain,
                    pkid: if manual { p.pkid } else { 0 },
                };
                let broker_metrics = &self.metrics;
                match self.deliveries.try_send(delivery) {
                    Ok(()) => {
                        broker_metrics
                            .messages_delivered
                            .fetch_add(1, Ordering::Relaxed);
                    }
                    Err(_) => {
                        self.dropped.fetch_add(1, Ordering::Relaxed);
                        broker_metrics
                            .messages_dropped
                            .fetch_add(1, Ordering::Relaxed);
                    }
                }
                match p.qos {
                    QoS::AtMostOnce => Ok(()),
                    // Acknowledged by `Client::ack` (one dropped above
                    // stays in flight: sent again at the next connect).
                    QoS::AtLeastOnce if manual => Ok(()),
                    QoS::AtLeastOnce => {
                        let ack = PubAck::new(p.pkid, None);
                        self.channel.handle(Packet::PubAck(ack)).await
                    }
                    QoS::ExactlyOnce => {
                        let rec = PubRec::new(p.pkid, None);
                        self.channel.handle(Packet::PubRec(rec)).await
                    }
                }
            }
            Packet::PubRel(r) => {
                let comp = PubComp::new(r.pkid, None);
                self.channel.handle(Packet::PubComp(comp)).await
            }
            Packet::PubAck(a) => {
                let result = match a.reason {
                    PubAckReason::Success | PubAckReason::NoMatchingSubscribers => Ok(()),
                    reason => Err(EmbedError::PublishRefused(reason)),
                };
                self.resolve(a.pkid, result);
                Ok(())
            }
            Packet::PubRec(r) => match r.reason {
                PubRecReason::Success | PubRecReason::NoMatchingSubscribers => {
                    let rel = PubRel::new(r.pkid, None);
                    self.channel.handle(Packet::PubRel(rel)).await
                }
                reason => {
                    self.resolve(r.pkid, Err(EmbedError::PublishRefused(pubrec(reason))));
                    Ok(())
                }
            },
            Packet::PubComp(c) => {
                self.resolve(c.pkid, Ok(()));
                Ok(())
            }
            Packet::SubAck(a) => {
                let code = a.return_codes.first().copied();
                let result = match code {
                    Some(SubscribeReasonCode::Success(_)) => Ok(()),
                    other => {
                        let filter = self
                            .waiting
                            .get(&a.pkid)
                            .and_then(|w| w.filter.clone())
                            .unwrap_or_default();
                        Err(EmbedError::SubscribeRefused {
                            filter,
                            reason: other.unwrap_or(SubscribeReasonCode::Unspecified),
                        })
                    }
                };
                self.resolve(a.pkid, result);
                Ok(())
            }
            // CONNACK was taken at connect; nothing else needs an answer.
            _ => Ok(()),
        }
    }
}

/// The PUBACK form of a PUBREC refusal (what [`EmbedError`] carries).
fn pubrec(reason: PubRecReason) -> PubAckReason {
    match reason {
        PubRecReason::NotAuthorized => PubAckReason::NotAuthorized,
        PubRecReason::QuotaExceeded => PubAckReason::QuotaExceeded,
        PubRecReason::PayloadFormatInvalid => PubAckReason::PayloadFormatInvalid,
        PubRecReason::TopicNameInvalid => PubAckReason::TopicNameInvalid,
        PubRecReason::ImplementationSpecificError => PubAckReason::ImplementationSpecificError,
        _ => PubAckReason::UnspecifiedError,
    }
}
