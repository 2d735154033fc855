//! The per-connection protocol state machine (MQTT 3.1 to 3.14).
//!
//! A channel takes decoded packets and produces the packets to send back,
//! some of them only after a storage commit (an ack means on disk). It
//! owns the connection's protocol state: the negotiated version and limits,
//! the will, topic aliases, keepalive. It never touches a socket, so the
//! protocol can be tested with packets alone; `connection.rs` does the I/O.
//! What a topic means beyond routing (the chat namespaces) it asks
//! [`crate::hooks`], never the chat layer directly.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use chatmq_storage::{Batch, Commit};
use rumqttc::v5::mqttbytes::v5::*;
use rumqttc::v5::mqttbytes::QoS;
use tokio::sync::oneshot;
use tokio::time::timeout;

use crate::access::{Identity, Refusal};
use crate::broker::{Attach, Broker, Kick, Plain, Refused, SessionCell, TAKEOVER_WAIT};
use crate::clock::now_ms;
use crate::codec::Protocol;
use crate::codec::ShortAck;
use crate::hooks::{Authorization, Checked, Hooks, Outcome, Publication, Publisher, Verdict};
use crate::limits::{self, PublishRate, UserRate};
use crate::message::{min_qos, Message};
use crate::router::SubOptions;
use crate::session::{Ack, Outbound, Session};
use crate::topic::{check_filter, check_topic, parse_shared, Refusal as TopicRefusal};

/// A packet to write, now or once its writes are durable.
pub enum Out {
    Now(Packet),
    AfterCommit(Commit, Packet),
}

/// How a connection ends: the DISCONNECT reason an MQTT 5 client is told
/// (`None`: just close), and whether the will is published.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Close {
    pub reason: Option<DisconnectReasonCode>,
    pub will: bool,
}

impl Close {
    /// A protocol violation by the client: tell it why (MQTT 5), publish its will.
    pub fn violation(reason: DisconnectReasonCode) -> Close {
        Close {
            reason: Some(reason),
            will: true,
        }
    }
    /// The client said DISCONNECT.
    fn by_client(will: bool) -> Close {
        Close { reason: None, will }
    }
    /// Refused at CONNECT: the CONNACK said why.
    fn refused() -> Close {
        Close {
            reason: None,
            will: false,
        }
    }
}

/// The largest packet we accept: the payload limit plus room for the
/// longest topic and properties.
pub fn max_packet_size(max_payload: usize) -> usize {
    (max_payload + 65_536 + 1_024).min(268_435_460)
}

/// The one Authentication Method offered [MQTT-4.12]: a JWT login that
/// the client refreshes with AUTH (reason 0x19, the new token as
/// Authentication Data) before it expires, instead of reconnecting.
pub const JWT_METHOD: &str = "JWT";

pub struct Channel {
    broker: Arc<Broker>,
    pub conn_id: u64,
    pub protocol: Protocol,
    client_id: Arc<str>,
    identity: Identity,
    /// The Authentication Method of the CONNECT, when the client asked
    /// for one we offer ([`JWT_METHOD`]): it may re-authenticate with AUTH.
    auth_method: Option<&'static str>,
    cell: Option<Arc<SessionCell>>,
    /// The will and its delay in seconds. Boxed: most clients set none,
    /// and every connection's state would hold a message's space.
    will: Option<Box<(Message, u32)>>,
    /// The keepalive in force, seconds; 0 = none.
    pub keep_alive: u16,
    aliases: HashMap<u16, String>,
    /// The client's Maximum Packet Size: larger packets are not sent to it.
    pub client_max_packet: Option<u32>,
    /// Incoming QoS 1 PUBLISHes whose PUBACK is not yet sent.
    unacked_qos1: usize,
    out: Vec<Out>,
    /// This connection's publish rate (`mqtt.publish_*`), and the
    /// generation of the limits it was made with (a reload changes them).
    rate: PublishRate,
    rate_generation: u64,
    /// Its user's, shared with the user's other connections.
    user_rate: Option<UserRate>,
    /// QoS 0 publishes read together, waiting to be routed together
    /// (`handle_batched`, `route_deferred`).
    deferred: Vec<Arc<Message>>,
    /// A subscriber whose QoS 0 inbox refused this client's publishes
    /// since the connection last asked (`take_pressure`).
    pressure: Option<Arc<SessionCell>>,
}

/// QoS 0 publishes of one read routed at once, at most (the rest in the
/// next round): enough to share the router's lock, few enough that a
/// subscriber hears of the first soon.
const ROUTE_BATCH: usize = 64;

impl Channel {
    pub fn new(broker: Arc<Broker>, conn_id: u64) -> Channel {
        let (limit, rate_generation) = broker.publish_limits.connection();
        Channel {
            conn_id,
            protocol: Protocol::V4,
            client_id: "".into(),
            identity: Identity::Anonymous,
            auth_method: None,
            cell: None,
            will: None,
            keep_alive: 0,
            aliases: HashMap::new(),
            client_max_packet: None,
            unacked_qos1: 0,
            out: Vec::new(),
            rate: PublishRate::new(limit, Instant::now()),
            rate_generation,
            user_rate: None,
            deferred: Vec::new(),
            pressure: None,
            broker,
        }
    }

    /// The Authentication Method negotiated at CONNECT, if any.
    pub fn auth_method(&self) -> Option<&'static str> {
        self.auth_method
    }

    /// The authenticated user, if any.
    pub fn user(&self) -> Option<&Arc<str>> {
        self.identity.user()
    }

    pub fn client_id(&self) -> &str {
        &self.client_id
    }

    pub fn take_output(&mut self) -> Vec<Out> {
        std::mem::take(&mut self.out)
    }

    fn send(&mut self, p: Packet) {
        self.out.push(Out::Now(p));
    }

    /// Refuses a CONNECT the client should not have sent. MQTT 5 is told
    /// why; 3.1.1 has no code for it (the closest would claim "server
    /// unavailable"), so the connection closes without CONNACK
    /// [MQTT-3.1.4-1].
    fn refuse_invalid(&mut self, v5_code: ConnectReturnCode) -> Close {
        match self.protocol {
            Protocol::V5 => self.refuse_connect(v5_code),
            Protocol::V4 => Close::refused(),
        }
    }

    fn refuse_connect(&mut self, code: ConnectReturnCode) -> Close {
        self.send(Packet::ConnAck(ConnAck {
            session_present: false,
            code,
            properties: None,
        }));
        Close::refused()
    }

    /// Handles CONNECT once authentication has run. On success the
    /// CONNACK and any resent messages are queued, and the receiver that
    /// announces a takeover is returned.
    pub async fn connect(
        &mut self,
        protocol: Protocol,
        connect: Connect,
        will: Option<LastWill>,
        auth: Result<Identity, Refusal>,
    ) -> Result<oneshot::Receiver<Kick>, Close> {
        use ConnectReturnCode as Rc;
        self.protocol = protocol;
        let settings = self.broker.settings.clone();
        let mqtt = &settings.mqtt;
        let props = connect
            .properties
            .clone()
            .unwrap_or_else(empty_connect_props);
        match props.authentication_method.as_deref() {
            None => {}
            // The token is the password (or the Authentication Data); the
            // method announces that the client will refresh it with AUTH.
            Some(JWT_METHOD) => self.auth_method = Some(JWT_METHOD),
            // [MQTT-4.12.0-1] no other method is offered.
            Some(_) => return Err(self.refuse_connect(Rc::BadAuthenticationMethod)),
        }

        let mut assigned = None;
        let client_id: Arc<str> = if connect.client_id.is_empty() {
            // [MQTT-3.1.3-8] 3.1.1 refuses an empty id for a persistent session.
            if protocol == Protocol::V4 && !connect.clean_start {
                return Err(self.refuse_connect(Rc::ClientIdentifierNotValid));
            }
            let id = format!("auto-{:x}-{:x}", now_ms(), self.broker.next_id());
            assigned = Some(id.clone());
            id.into()
        } else {
            connect.client_id.as_str().into()
        };

        let identity = match auth {
            Ok(i) => i,
            Err(Refusal::BadCredentials) => {
                return Err(self.refuse_connect(Rc::BadUserNamePassword))
            }
            Err(Refusal::NotAuthorized) => return Err(self.refuse_connect(Rc::NotAuthorized)),
            // MQTT 5 can say why; 3.1.1's "not authorized" stops a retry loop.
            Err(Refusal::RateLimited) if protocol == Protocol::V5 => {
                return Err(self.refuse_connect(Rc::ConnectionRateExceeded))
            }
            Err(Refusal::RateLimited) => return Err(self.refuse_connect(Rc::NotAuthorized)),
            Err(Refusal::ServerBusy) => return Err(self.refuse_connect(Rc::ServerBusy)),
        };

        let mut batch = Batch::new();

        if let Some(w) = will {
            let topic = match String::from_utf8(w.topic.to_vec()) {
                Ok(t) if check_topic(&t, &self.broker.topic_limits()).is_ok() => t,
                _ => return Err(self.refuse_invalid(Rc::TopicNameInvalid)),
            };
            if self.broker.hooks().owns(&topic) {
                // Chat topics are published by members, never by wills.
                return Err(self.refuse_connect(match protocol {
                    Protocol::V4 => Rc::NotAuthorized,
                    Protocol::V5 => Rc::TopicNameInvalid,
                }));
            }
            if w.message.len() > mqtt.max_payload {
                return Err(self.refuse_invalid(Rc::PacketTooLarge));
            }
            let delay = w
                .properties
                .as_ref()
                .and_then(|p| p.delay_interval)
                .unwrap_or(0);
            let publish = Publish {
                dup: false,
                qos: w.qos,
                retain: w.retain,
                topic: w.topic.clone(),
                pkid: 0,
                payload: w.message.clone(),
                properties: w.properties.map(|p| PublishProperties {
                    payload_format_indicator: p.payload_format_indicator,
                    message_expiry_interval: p.message_expiry_interval,
                    topic_alias: None,
                    response_topic: p.response_topic,
                    correlation_data: p.correlation_data,
                    user_properties: p.user_properties,
                    subscription_identifiers: vec![],
                    content_type: p.content_type,
                }),
            };
            self.will = Some(Box::new((
                Message::from_publish(topic, &publish, Some(client_id.clone())),
                delay,
            )));
        }

        let expiry_secs = match protocol {
            Protocol::V4 if connect.clean_start => 0,
            Protocol::V4 => mqtt.session_expiry_max,
            Protocol::V5 => props.session_expiry_interval.unwrap_or(0),
        };
        let capped_expiry = expiry_secs.min(mqtt.session_expiry_max);
        let max_inflight = props
            .receive_maximum
            .unwrap_or(u16::MAX)
            .min(mqtt.max_inflight)
            .max(1);
        self.client_max_packet = props.max_packet_size;

        let mut server_keep_alive = None;
        self.keep_alive = connect.keep_alive;
        if connect.keep_alive == 0 || connect.keep_alive > mqtt.keepalive_max {
            // MQTT 5 is told (Server Keep Alive); 3.1.1 cannot be, but its
            // connection is closed all the same after 1.5 x keepalive_max
            // without a packet: no connection is kept forever in silence.
            self.keep_alive = mqtt.keepalive_max;
            if protocol == Protocol::V5 {
                server_keep_alive = Some(mqtt.keepalive_max);
            }
        }

        let full = (protocol == Protocol::V5).then(|| ConnAckProperties {
            session_expiry_interval: (capped_expiry != expiry_secs).then_some(capped_expiry),
            receive_max: Some(mqtt.max_inflight),
            max_qos: None,
            retain_available: Some(1),
            max_packet_size: Some(max_packet_size(mqtt.max_payload) as u32),
            assigned_client_identifier: assigned,
            topic_alias_max: Some(mqtt.topic_alias_max),
            reason_string: None,
            user_properties: vec![],
            wildcard_subscription_available: Some(1),
            subscription_identifiers_available: Some(1),
            shared_subscription_available: Some(1),
            server_keep_alive,
            response_information: None,
            server_reference: None,
            authentication_method: self.auth_method.map(str::to_string),
            authentication_data: None,
        });
        let Some(properties) = fit_connack(full, self.client_max_packet) else {
            // Not even the CONNACK fits the client's Maximum Packet Size:
            // nothing can be said to it [MQTT-3.1.2-24].
            tracing::debug!(client = %client_id, "CONNACK larger than the client accepts");
            return Err(Close::refused());
        };

        // With `[cluster]`: where the client id's session is (another node,
        // if the client was last attached there). Refused CONNECTs disturb
        // nobody: the other node's connection is closed by the claim below.
        let roaming = self.broker.roaming().cloned();
        let roamed = match &roaming {
            Some(r) => r.fetch(&client_id).await,
            None => None,
        };

        // A connection still attached to the client id goes first: what its
        // client sent before reconnecting (DISCONNECT, its session expiry)
        // is applied before the new connection sees the session.
        if let Some(closed) = self.broker.evict(&client_id, identity.user()) {
            if timeout(TAKEOVER_WAIT, closed).await.is_err() {
                tracing::warn!(client = %client_id, "the connection taken over did not close in time");
            }
        }

        let attached = self
            .broker
            .attach(
                Attach {
                    client_id: client_id.clone(),
                    owner: identity.user().cloned(),
                    protocol,
                    clean_start: connect.clean_start,
                    expiry_secs: capped_expiry,
                    max_inflight,
                    conn_id: self.conn_id,
                    roamed,
                },
                &mut batch,
            )
            .await;
        if let (Err(_), Some(r)) = (&attached, &roaming) {
            r.abandoned(&client_id);
        }
        let attached = match attached {
            Ok(a) => a,
            Err(Refused::NotOwner) => return Err(self.refuse_connect(Rc::NotAuthorized)),
            Err(Refused::SessionQuota) => return Err(self.refuse_connect(Rc::QuotaExceeded)),
            Err(Refused::Unavailable) => return Err(self.refuse_connect(Rc::ServerUnavailable)),
        };
        self.client_id = client_id;
        self.user_rate = identity.user().map(|u| self.broker.publish_limits.of(u));
        self.identity = identity;
        self.cell = Some(attached.cell.clone());
        // The session and the client id's owner are on disk before CONNACK.
        if let Err(e) = self.broker.store.write(batch).await {
            tracing::error!(error = %e, "cannot persist the session");
            if let Some(r) = &roaming {
                r.abandoned(&self.client_id);
            }
            return Err(self.refuse_connect(Rc::ServerUnavailable));
        }
        if let Some(r) = &roaming {
            // Before CONNACK: the node the client was attached to closes
            // that connection (0x8E) on seeing this.
            r.claimed(&attached.cell, attached.present && !connect.clean_start)
                .await;
        }

        self.send(Packet::ConnAck(ConnAck {
            // [MQTT-3.2.2-2] Clean Start always answers Session Present 0.
            session_present: attached.present && !connect.clean_start,
            code: Rc::Success,
            properties,
        }));
        if let Identity::User(user) = &self.identity {
            // After CONNACK: presence, and the replay of missed chat messages.
            self.broker.hooks().session_online(user, &attached.cell);
        }
        if attached.present {
            let mut resend = Vec::new();
            attached.cell.lock().session.resend(&mut resend);
            for p in resend {
                self.send(p);
            }
        }
        Ok(attached.kicked)
    }

    /// Handles one packet after CONNECT.
    pub async fn handle(&mut self, packet: Packet) -> Result<(), Close> {
        self.route_deferred().await;
        self.handle_packet(packet, false).await
    }

    /// Handles one of several packets read together: a plain QoS 0
    /// publish may wait in `deferred` to be routed with the ones after it,
    /// until the caller's `route_deferred` (or any other packet: nothing
    /// overtakes what the client sent before it).
    pub async fn handle_batched(&mut self, packet: Packet) -> Result<(), Close> {
        match &packet {
            Packet::Publish(p) if p.qos == QoS::AtMostOnce => {}
            _ => self.route_deferred().await,
        }
        self.handle_packet(packet, true).await
    }

    /// Routes the QoS 0 publishes waiting in `deferred`, in order, under
    /// one look at the router ([`Broker::route_all`]).
    pub async fn route_deferred(&mut self) {
        if self.deferred.is_empty() {
            return;
        }
        let mut batch = Batch::new();
        if let Some(full) = self.broker.route_all(&self.deferred, &mut batch) {
            self.pressure = Some(full);
        }
        self.deferred.clear();
        if self.deferred.capacity() > ROUTE_BATCH {
            self.deferred = Vec::new();
        }
        if !batch.is_empty() {
            // Retained updates: QoS 0 has no ack to wait for them.
            drop(self.broker.store.submit(batch).await);
        }
    }

    /// A subscriber this client's QoS 0 publishes found full, once.
    pub fn take_pressure(&mut self) -> Option<Arc<SessionCell>> {
        self.pressure.take()
    }

    async fn handle_packet(&mut self, packet: Packet, defer: bool) -> Result<(), Close> {
        match packet {
            Packet::Publish(p) => self.publish(p, defer).await,
            Packet::PubAck(a) => self.acked(|s, b| s.puback(a.pkid, b)).await.map(drop),
            Packet::PubRec(a) => {
                let refused = !matches!(
                    a.reason,
                    PubRecReason::Success | PubRecReason::NoMatchingSubscribers
                );
                let ack = self.acked(|s, b| s.pubrec(a.pkid, refused, b)).await?;
                if refused {
                    // [MQTT-4.3.3-4] PUBREL answers only a PUBREC below 0x80.
                    return Ok(());
                }
                let mut rel = PubRel::new(a.pkid, None);
                if ack == Ack::Unknown && self.protocol == Protocol::V5 {
                    rel.reason = PubRelReason::PacketIdentifierNotFound;
                }
                self.send(Packet::PubRel(rel));
                Ok(())
            }
            Packet::PubComp(a) => self.acked(|s, b| s.pubcomp(a.pkid, b)).await.map(drop),
            Packet::PubRel(r) => {
                let mut known = false;
                let commit = self
                    .settle(|s, b| known = s.release_inbound(r.pkid, b))
                    .await;
                let mut comp = PubComp::new(r.pkid, None);
                if !known && self.protocol == Protocol::V5 {
                    comp.reason = PubCompReason::PacketIdentifierNotFound;
                }
                // Only once the packet id is free on disk too: after a crash
                // a stale id would make the client's next message with it
                // look like a resend, and it would be dropped.
                self.out
                    .push(Out::AfterCommit(commit, Packet::PubComp(comp)));
                Ok(())
            }
            Packet::Subscribe(s) => self.subscribe(s).await,
            Packet::Unsubscribe(u) => self.unsubscribe(u).await,
            Packet::PingReq(_) => {
                self.send(Packet::PingResp(PingResp));
                Ok(())
            }
            Packet::Disconnect(d) => self.disconnect(d),
            // The decoder lets nothing else through after CONNECT.
            _ => Err(Close::violation(DisconnectReasonCode::ProtocolError)),
        }
    }

    /// Applies a change to the session and submits what it wrote; the
    /// commit resolves when that is durable.
    async fn settle(&mut self, f: impl FnOnce(&mut Session, &mut Batch)) -> Commit {
        let Some(cell) = &self.cell else {
            return Commit::ready();
        };
        let mut batch = Batch::new();
        f(&mut cell.lock().session, &mut batch);
        self.broker.store.submit(batch).await
    }

    /// Applies an acknowledgement from the client (PUBACK, PUBREC,
    /// PUBCOMP). One of the wrong kind for its packet id is a protocol
    /// error (MQTT 5: DISCONNECT 0x82; 3.1.1: close) [MQTT-4.8.0-1].
    async fn acked(
        &mut self,
        f: impl FnOnce(&mut Session, &mut Batch) -> Ack,
    ) -> Result<Ack, Close> {
        let (ack, batch) = self.apply_ack(f);
        // Not awaited: the worst a crash does is a resend with DUP.
        drop(self.broker.store.submit(batch).await);
        ack_checked(ack)
    }

    /// The acknowledgement `f` applies, under the session's lock, and what
    /// it wrote.
    fn apply_ack(&self, f: impl FnOnce(&mut Session, &mut Batch) -> Ack) -> (Ack, Batch) {
        let mut batch = Batch::new();
        let ack = match &self.cell {
            Some(cell) => {
                let mut slot = cell.lock();
                let ack = f(&mut slot.session, &mut batch);
                if slot.session.take_cursors_saved() {
                    self.broker.session_changed(&cell.client_id);
                }
                ack
            }
            None => Ack::Unknown,
        };
        (ack, batch)
    }

    /// A PUBACK or PUBCOMP the connection read in its short form
    /// ([`codec::short_ack`]), applied without a packet or a future: what
    /// it wrote, for the connection to submit, or the close a wrong one
    /// calls for. `None`: it must take the full path (QoS 0 publishes of
    /// this read are waiting to be routed first).
    pub fn short_ack(&mut self, ack: ShortAck) -> Option<Result<Batch, Close>> {
        if !self.deferred.is_empty() || self.cell.is_none() {
            return None;
        }
        let (ack, batch) = self.apply_ack(|s, b| match ack {
            ShortAck::PubAck(pkid) => s.puback(pkid, b),
            ShortAck::PubComp(pkid) => s.pubcomp(pkid, b),
        });
        Some(ack_checked(ack).map(|_| batch))
    }

    fn refuse_publish(&mut self, p: &Publish, v5_code: PubAckReason) {
        match p.qos {
            QoS::AtMostOnce => {}
            QoS::AtLeastOnce => {
                let mut ack = PubAck::new(p.pkid, None);
                if self.protocol == Protocol::V5 {
                    ack.reason = v5_code;
                }
                self.send(Packet::PubAck(ack));
            }
            QoS::ExactlyOnce => {
                let mut rec = PubRec::new(p.pkid, None);
                if self.protocol == Protocol::V5 {
                    rec.reason = match v5_code {
                        PubAckReason::NotAuthorized => PubRecReason::NotAuthorized,
                        PubAckReason::QuotaExceeded => PubRecReason::QuotaExceeded,
                        PubAckReason::PayloadFormatInvalid => PubRecReason::PayloadFormatInvalid,
                        PubAckReason::TopicNameInvalid => PubRecReason::TopicNameInvalid,
                        PubAckReason::ImplementationSpecificError => {
                            PubRecReason::ImplementationSpecificError
                        }
                        _ => PubRecReason::UnspecifiedError,
                    };
                }
                self.send(Packet::PubRec(rec));
            }
        }
    }

    async fn publish(&mut self, mut p: Publish, defer: bool) -> Result<(), Close> {
        let settings = self.broker.settings.clone();
        let mqtt = &settings.mqtt;
        let alias = p.properties.as_mut().and_then(|pp| pp.topic_alias.take());
        if let Some(alias) = alias {
            if alias == 0 || alias > mqtt.topic_alias_max {
                return Err(Close::violation(DisconnectReasonCode::TopicAliasInvalid));
            }
            if p.topic.is_empty() {
                match self.aliases.get(&alias) {
                    Some(t) => p.topic = t.clone().into_bytes().into(),
                    None => return Err(Close::violation(DisconnectReasonCode::ProtocolError)),
                }
            } else if let Ok(t) = std::str::from_utf8(&p.topic) {
                self.aliases.insert(alias, t.to_string());
            }
        }
        let topic = match std::str::from_utf8(&p.topic) {
            Ok(t) => t.to_string(),
            Err(_) => return Err(Close::violation(DisconnectReasonCode::MalformedPacket)),
        };
        if let Err(refusal) = check_topic(&topic, &self.broker.topic_limits()) {
            return self.refuse_topic(&p, refusal);
        }
        let cell = self
            .cell
            .clone()
            .ok_or(Close::violation(DisconnectReasonCode::ProtocolError))?;
        if p.qos != QoS::AtMostOnce && self.protocol == Protocol::V5 {
            let in_flight = self.unacked_qos1 + cell.lock().session.inbound_len();
            if in_flight >= usize::from(mqtt.max_inflight) {
                return Err(Close::violation(
                    DisconnectReasonCode::ReceiveMaximumExceeded,
                ));
            }
        }
        if p.payload.len() > mqtt.max_payload {
            self.refuse_publish(&p, PubAckReason::QuotaExceeded);
            return Ok(());
        }
        // [MQTT-3.3.2-4] a payload marked UTF-8 must be UTF-8.
        let utf8_marked = p
            .properties
            .as_ref()
            .and_then(|pp| pp.payload_format_indicator)
            == Some(1);
        if utf8_marked && std::str::from_utf8(&p.payload).is_err() {
            self.refuse_publish(&p, PubAckReason::PayloadFormatInvalid);
            return Ok(());
        }
        if !self.within_rate(p.payload.len()) {
            return self.refuse_rate(&p, &topic);
        }
        let verdict = self.broker.interceptors.check(&Publication {
            client_id: &self.client_id,
            user: self.identity.user().map(|u| &**u),
            topic: &topic,
            payload: &p.payload,
            qos: p.qos,
            retain: p.retain,
        });
        let owned = self.broker.hooks().owns(&topic);
        match verdict {
            Verdict::Allow => {}
            Verdict::Rewrite(payload) => p.payload = payload,
            Verdict::Reject(why) if owned => {
                self.refuse_chat(&p, &topic, why.reason(), "rejected");
                return Ok(());
            }
            Verdict::Reject(why) => {
                self.refuse_publish(&p, why.reason());
                return Ok(());
            }
        }
        if owned {
            self.route_deferred().await;
            return self.publish_reserved(&topic, &p).await;
        }
        let user = self.identity.user().map(|u| &**u);
        if !self.broker.acl.can_publish(user, &self.client_id, &topic) {
            self.refuse_publish(&p, PubAckReason::NotAuthorized);
            return Ok(());
        }

        let msg = Message::from_publish(topic, &p, Some(self.client_id.clone()));
        // An MQTT 5 QoS 1/2 client can be told the retained store is full
        // before anything happens; others are routed and just not retained.
        if p.retain
            && p.qos != QoS::AtMostOnce
            && self.protocol == Protocol::V5
            && !self.broker.retained_fits(&msg)
        {
            let refused = &self.broker.metrics.retained_refused;
            refused.fetch_add(1, Ordering::Relaxed);
            self.refuse_publish(&p, PubAckReason::QuotaExceeded);
            return Ok(());
        }
        let mut batch = Batch::new();
        match p.qos {
            QoS::AtMostOnce if defer => {
                self.deferred.push(Arc::new(msg));
                if self.deferred.len() >= ROUTE_BATCH {
                    self.route_deferred().await;
                }
            }
            QoS::AtMostOnce => {
                self.broker.route(Arc::new(msg), &mut batch);
                drop(self.broker.store.submit(batch).await);
            }
            QoS::AtLeastOnce => {
                self.broker.route(Arc::new(msg), &mut batch);
                let commit = self.broker.store.submit(batch).await;
                self.unacked_qos1 += 1;
                self.out.push(Out::AfterCommit(
                    commit,
                    Packet::PubAck(PubAck::new(p.pkid, None)),
                ));
            }
            QoS::ExactlyOnce => {
                // A resent QoS 2 PUBLISH is acknowledged, not routed again.
                let new = cell.lock().session.accept_inbound(p.pkid, &mut batch);
                if new {
                    self.broker.route(Arc::new(msg), &mut batch);
                }
                let commit = self.broker.store.submit(batch).await;
                self.out.push(Out::AfterCommit(
                    commit,
                    Packet::PubRec(PubRec::new(p.pkid, None)),
                ));
            }
        }
        Ok(())
    }

    /// A PUBLISH topic name that is not accepted. NUL is a malformed packet
    /// [MQTT-1.5.4-2]; a wildcard breaks [MQTT-3.3.2-2] (DISCONNECT 0x90).
    /// A name over `mqtt.max_topic_levels`/`max_topic_length` is valid MQTT:
    /// an MQTT 5 QoS 1/2 publish is refused alone (PUBACK/PUBREC 0x90);
    /// QoS 0 and MQTT 3.1.1 have no ack to say it in, so they are closed.
    fn refuse_topic(&mut self, p: &Publish, refusal: TopicRefusal) -> Result<(), Close> {
        match refusal {
            TopicRefusal::Malformed => Err(Close::violation(DisconnectReasonCode::MalformedPacket)),
            TopicRefusal::Invalid => Err(Close::violation(DisconnectReasonCode::TopicNameInvalid)),
            TopicRefusal::OverLimit => {
                let refused = &self.broker.metrics.topics_refused;
                refused.fetch_add(1, Ordering::Relaxed);
                if self.protocol == Protocol::V5 && p.qos != QoS::AtMostOnce {
                    self.refuse_publish(p, PubAckReason::TopicNameInvalid);
                    Ok(())
                } else {
                    Err(Close::violation(DisconnectReasonCode::TopicNameInvalid))
                }
            }
        }
    }

    /// Charges a publish of `bytes` to this connection's rate and its
    /// user's; false (and nothing charged) if either is spent.
    fn within_rate(&mut self, bytes: usize) -> bool {
        let now = Instant::now();
        if let Some((limit, generation)) =
            self.broker.publish_limits.newer_than(self.rate_generation)
        {
            self.rate.relimit(limit, now);
            self.rate_generation = generation;
        }
        match &self.user_rate {
            Some(user) => limits::admit(
                &mut [&mut self.rate, &mut limits::lock_rate(user)],
                bytes,
                now,
            ),
            None => limits::admit(&mut [&mut self.rate], bytes, now),
        }
    }

    /// A publish over its rate, counted. MQTT 5 QoS 1/2 get PUBACK/PUBREC
    /// 0x97 Quota exceeded: 0x96 Message rate too high is not a PUBACK or
    /// PUBREC reason code in MQTT 5 (3.4.2.1), only a DISCONNECT one, so a
    /// QoS 0 flood, which has no ack, ends with DISCONNECT 0x96. MQTT
    /// 3.1.1 gets its normal ack and a `rate_limited` error event.
    fn refuse_rate(&mut self, p: &Publish, topic: &str) -> Result<(), Close> {
        self.broker
            .metrics
            .publishes_rate_limited
            .fetch_add(1, Ordering::Relaxed);
        if p.qos == QoS::AtMostOnce && self.protocol == Protocol::V5 {
            return Err(Close::violation(DisconnectReasonCode::MessageRateTooHigh));
        }
        self.refuse_chat(p, topic, PubAckReason::QuotaExceeded, "rate_limited");
        Ok(())
    }

    /// Whether this connection's session went over its byte budget (the
    /// client reads too slowly for what it is sent): then the connection
    /// closes, MQTT 5 with DISCONNECT 0x97 Quota exceeded.
    pub fn overloaded(&self) -> Option<Close> {
        let cell = self.cell.as_ref()?;
        let slot = cell.lock();
        let mine = slot.link.as_ref().map(|l| l.conn_id) == Some(self.conn_id);
        (mine && (slot.session.overloaded || cell.inbox.overloaded()))
            .then_some(Close::violation(DisconnectReasonCode::QuotaExceeded))
    }

    /// The connection wrote a PUBACK that waited for a commit.
    pub fn puback_sent(&mut self) {
        self.unacked_qos1 = self.unacked_qos1.saturating_sub(1);
    }

    async fn subscribe(&mut self, s: Subscribe) -> Result<(), Close> {
        use SubscribeReasonCode as Rc;
        let identifier = s.properties.as_ref().and_then(|p| p.id).unwrap_or(0);
        if s.properties.as_ref().and_then(|p| p.id) == Some(0) || identifier > 268_435_455 {
            return Err(Close::violation(DisconnectReasonCode::ProtocolError));
        }
        let cell = self
            .cell
            .clone()
            .ok_or(Close::violation(DisconnectReasonCode::ProtocolError))?;
        // [MQTT-1.5.4-2] checked before any filter takes effect.
        if s.filters.iter().any(|f| f.path.contains('\0')) {
            return Err(Close::violation(DisconnectReasonCode::MalformedPacket));
        }
        let mqtt = &self.broker.settings.mqtt;
        let limits = self.broker.topic_limits();
        let user = self.identity.user().cloned();
        let mut codes = Vec::with_capacity(s.filters.len());
        let mut batch = Batch::new();
        // Only a filter that can reach the hooks' topics (chat) runs
        // `after_subscribe`: a SUBSCRIBE of plain filters skips it.
        let mut reaches_owned = false;
        // A SUBSCRIBE whose filters were all refused rewrites nothing.
        let mut changed = false;
        let hooks = self.broker.hooks();
        let seed = match &user {
            Some(u) => hooks.before_subscribe(u, &cell, &s.filters).await,
            None => Default::default(),
        };
        {
            let mut slot = cell.lock();
            let session = &mut slot.session;
            let dropped_before = session.dropped;
            for f in &s.filters {
                let (inner, shared) = match parse_shared(&f.path) {
                    Some(Ok((_, inner))) => (inner, true),
                    Some(Err(())) => {
                        codes.push(Rc::TopicFilterInvalid);
                        continue;
                    }
                    None => (f.path.as_str(), false),
                };
                if let Err(refusal) = check_filter(inner, &limits) {
                    if refusal == TopicRefusal::OverLimit {
                        let refused = &self.broker.metrics.topics_refused;
                        refused.fetch_add(1, Ordering::Relaxed);
                    }
                    codes.push(Rc::TopicFilterInvalid);
                    continue;
                }
                if shared && f.nolocal {
                    // [MQTT-3.8.3-4]
                    return Err(Close::violation(DisconnectReasonCode::ProtocolError));
                }
                if let Err(code) = self.authorize_subscription(user.as_ref(), inner, shared) {
                    codes.push(code);
                    continue;
                }
                let existed = session.subscriptions.contains_key(&f.path);
                if !existed && session.subscriptions.len() >= mqtt.max_subscriptions {
                    codes.push(Rc::QuotaExceeded);
                    continue;
                }
                let options = SubOptions {
                    qos: f.qos,
                    no_local: f.nolocal,
                    retain_as_published: f.preserve_retain,
                    retain_handling: match f.retain_forward_rule {
                        RetainForwardRule::OnEverySubscribe => 0,
                        RetainForwardRule::OnNewSubscribe => 1,
                        RetainForwardRule::Never => 2,
                    },
                    identifier: identifier as u32,
                };
                session.subscriptions.insert(f.path.clone(), options);
                changed = true;
                // Indexed under the session lock: a message published now
                // queues behind the retained ones below.
                self.broker.index_subscription(&cell, &f.path, options);
                let send_retained = !shared
                    && match options.retain_handling {
                        0 => true,
                        1 => !existed,
                        _ => false,
                    };
                let ids = if send_retained && identifier != 0 {
                    vec![identifier as u32]
                } else {
                    vec![]
                };
                if send_retained {
                    for m in self.broker.retained_for(inner) {
                        if self
                            .broker
                            .acl
                            .can_receive(user.as_deref(), &self.client_id, &m.topic)
                        {
                            // [MQTT-3.3.1-8] retained on subscribe keep RETAIN set.
                            let qos = min_qos(m.qos, f.qos);
                            session.enqueue_retained(m.clone(), qos, ids.clone(), &mut batch);
                        }
                    }
                }
                if let Some(u) = &user {
                    let retained = send_retained.then_some(&ids[..]);
                    reaches_owned |= hooks.subscribed(u, inner, retained, session, &mut batch);
                }
                codes.push(Rc::Success(f.qos));
            }
            let dropped = session.dropped - dropped_before;
            if dropped > 0 {
                let counter = &self.broker.metrics.messages_dropped;
                counter.fetch_add(dropped, Ordering::Relaxed);
            }
            if let (Some(u), true) = (&user, reaches_owned) {
                hooks.after_subscribe(u, session, &seed, &mut batch);
            }
            if changed && session.persistent() {
                batch.put_session(&session.client_id, &session.record());
            }
            if session.persistent() {
                self.broker.session_changed(&session.client_id);
            }
        }
        // The subscription is on disk before SUBACK promises it.
        if let Err(e) = self.broker.store.write(batch).await {
            tracing::error!(error = %e, "cannot persist subscription");
            return Err(Close::violation(DisconnectReasonCode::UnspecifiedError));
        }
        self.send(Packet::SubAck(SubAck {
            pkid: s.pkid,
            return_codes: codes,
            properties: None,
        }));
        Ok(())
    }

    async fn unsubscribe(&mut self, u: Unsubscribe) -> Result<(), Close> {
        let cell = self
            .cell
            .clone()
            .ok_or(Close::violation(DisconnectReasonCode::ProtocolError))?;
        // [MQTT-1.5.4-2]
        if u.filters.iter().any(|f| f.contains('\0')) {
            return Err(Close::violation(DisconnectReasonCode::MalformedPacket));
        }
        let limits = self.broker.topic_limits();
        let mut reasons = Vec::with_capacity(u.filters.len());
        let mut batch = Batch::new();
        {
            let mut slot = cell.lock();
            let session = &mut slot.session;
            let mut changed = false;
            for f in &u.filters {
                if session.subscriptions.remove(f).is_some() {
                    self.broker.unindex_subscription(&self.client_id, f);
                    reasons.push(UnsubAckReason::Success);
                    changed = true;
                } else if parse_shared(f).is_none() && check_filter(f, &limits).is_err() {
                    reasons.push(UnsubAckReason::TopicFilterInvalid);
                } else {
                    reasons.push(UnsubAckReason::NoSubscriptionExisted);
                }
            }
            if changed && session.persistent() {
                batch.put_session(&session.client_id, &session.record());
                self.broker.session_changed(&session.client_id);
            }
        }
        // The removal is on disk before UNSUBACK confirms it.
        if let Err(e) = self.broker.store.write(batch).await {
            tracing::error!(error = %e, "cannot persist unsubscribe");
            return Err(Close::violation(DisconnectReasonCode::UnspecifiedError));
        }
        self.send(Packet::UnsubAck(UnsubAck {
            pkid: u.pkid,
            reasons,
            properties: None,
        }));
        Ok(())
    }

    fn disconnect(&mut self, d: Disconnect) -> Result<(), Close> {
        // [MQTT-3.14.4-3] a normal DISCONNECT discards the will; 0x04 keeps it.
        let close =
            Close::by_client(d.reason_code == DisconnectReasonCode::DisconnectWithWillMessage);
        let expiry = d
            .properties
            .as_ref()
            .and_then(|p| p.session_expiry_interval);
        let (Some(expiry), Some(cell)) = (expiry, &self.cell) else {
            return Err(close);
        };
        let mut slot = cell.lock();
        if slot.link.as_ref().map(|l| l.conn_id) != Some(self.conn_id) {
            // Taken over meanwhile: the session and its expiry belong to
            // the new connection now.
            return Err(close);
        }
        // [MQTT-3.14.2-2] a session that ends with its connection cannot be
        // made persistent at DISCONNECT.
        if slot.session.expiry_secs == 0 && expiry != 0 {
            return Err(Close::violation(DisconnectReasonCode::ProtocolError));
        }
        let was_stored = slot.session.persistent();
        slot.session.expiry_secs = expiry.min(self.broker.settings.mqtt.session_expiry_max);
        if was_stored && !slot.session.persistent() {
            // It ends with this connection: off the disk too, or a restart
            // would bring it back.
            let mut batch = Batch::new();
            cell.delete_stored(&mut slot, &mut batch);
            drop(self.broker.store.submit_now(batch));
        }
        Err(close)
    }

    /// Moves what the session may send now into `packets`, after taking
    /// what its publishers staged in its inbox into its queue. Also returns
    /// the QoS 0 messages waiting in the inbox ahead of any staged one, to
    /// be written before `packets`: taken under the session's lock, after
    /// anything its publishers routed before what is now queued.
    pub async fn poll_deliveries(&mut self, packets: &mut Vec<Outbound>) -> VecDeque<Plain> {
        let Some(cell) = &self.cell else {
            return VecDeque::new();
        };
        let mut batch = Batch::new();
        let inbox;
        cell.woke();
        let expired = {
            let mut slot = cell.lock();
            let before = slot.session.dropped;
            let mut direct = VecDeque::new();
            cell.absorb(&mut slot, &mut batch, Some(&mut direct));
            inbox = direct;
            slot.session.poll_outbound(now_ms(), packets, &mut batch);
            slot.session.dropped - before
        };
        if expired > 0 {
            self.broker
                .metrics
                .messages_dropped
                .fetch_add(expired, Ordering::Relaxed);
        }
        if !batch.is_empty() {
            // Boxed: rare (expired messages of a persistent session), and
            // the connection's idle state should not carry its space.
            drop(Box::pin(self.broker.store.submit(batch)).await);
        }
        self.broker.hooks().sent(cell);
        inbox
    }

    /// A PUBLISH too large for the client was discarded: it counts as
    /// delivered [MQTT-3.1.2-25].
    pub async fn discarded(&mut self, pkid: u16) {
        drop(self.settle(|s, b| s.forget(pkid, b)).await);
    }

    /// The connection is gone: release the session, publish the will if due.
    pub async fn close(&mut self, close: Close) {
        // What the client sent before it went is routed before its will.
        self.route_deferred().await;
        let Some(cell) = self.cell.take() else { return };
        let will = if close.will {
            self.will.take().map(|w| *w)
        } else {
            None
        };
        let mut batch = Batch::new();
        let owned = self.broker.detach(&cell, self.conn_id, will, &mut batch);
        if let (true, Some(user)) = (owned, self.identity.user()) {
            self.broker.hooks().session_offline(user, &cell);
        }
        drop(self.broker.store.submit(batch).await);
    }

    /// Who may subscribe to what: the hooks decide their namespaces
    /// (chat: members only, a user's own events), the ACL everything else.
    fn authorize_subscription(
        &self,
        user: Option<&Arc<str>>,
        filter: &str,
        shared: bool,
    ) -> Result<(), SubscribeReasonCode> {
        let allowed = match self
            .broker
            .hooks()
            .authorize_subscribe(user, filter, shared)
        {
            Authorization::Acl => {
                self.broker
                    .acl
                    .can_subscribe(user.map(|u| &**u), &self.client_id, filter)
            }
            Authorization::Allowed => true,
            Authorization::Refused => false,
        };
        if allowed {
            Ok(())
        } else {
            Err(SubscribeReasonCode::NotAuthorized)
        }
    }

    /// Refuses a publish on a chat topic: MQTT 5 by reason code, MQTT 3.1.1
    /// (which has none) as the hooks tell it (chat: an error event on
    /// `users/{user}/events`).
    fn refuse_chat(&mut self, p: &Publish, topic: &str, reason: PubAckReason, code: &'static str) {
        self.refuse_publish(p, reason);
        if self.protocol == Protocol::V4 {
            if let Some(user) = self.identity.user() {
                self.broker.hooks().refused(user, topic, &p.payload, code);
            }
        }
    }

    /// A publish on a topic the hooks own (chat: DESIGN §4). The hooks
    /// check it and run it; the channel keeps the MQTT side: a QoS 2
    /// resend of a publish that must run once is acknowledged, not run
    /// again, and the ack waits for what the run says.
    async fn publish_reserved(&mut self, topic: &str, p: &Publish) -> Result<(), Close> {
        let broker = self.broker.clone();
        let hooks = broker.hooks();
        let from = Publisher {
            broker: &broker,
            user: self.identity.user(),
            client_id: &self.client_id,
        };
        let job = match hooks.check_publish(&from, topic, p) {
            Checked::Refuse(r) => {
                match r.notify {
                    Some(code) => self.refuse_chat(p, topic, r.reason, code),
                    None => self.refuse_publish(p, r.reason),
                }
                return Ok(());
            }
            Checked::Run { job, once } => {
                if once && p.qos == QoS::ExactlyOnce {
                    let cell = self
                        .cell
                        .clone()
                        .ok_or(Close::violation(DisconnectReasonCode::ProtocolError))?;
                    let mut batch = Batch::new();
                    let new = cell.lock().session.accept_inbound(p.pkid, &mut batch);
                    let inbound = self.broker.store.submit(batch).await;
                    if !new {
                        self.out.push(Out::AfterCommit(
                            inbound,
                            Packet::PubRec(PubRec::new(p.pkid, None)),
                        ));
                        return Ok(());
                    }
                    drop(inbound);
                }
                job
            }
        };
        match hooks.run_publish(&from, job, p).await {
            Outcome::AckNow => self.ack_now(p),
            Outcome::AckAfter(commit) => match p.qos {
                QoS::AtMostOnce => {}
                QoS::AtLeastOnce => {
                    self.unacked_qos1 += 1;
                    self.out.push(Out::AfterCommit(
                        commit,
                        Packet::PubAck(PubAck::new(p.pkid, None)),
                    ));
                }
                QoS::ExactlyOnce => {
                    self.out.push(Out::AfterCommit(
                        commit,
                        Packet::PubRec(PubRec::new(p.pkid, None)),
                    ));
                }
            },
            Outcome::Refuse(r) => match r.notify {
                Some(code) => self.refuse_chat(p, topic, r.reason, code),
                None => self.refuse_publish(p, r.reason),
            },
            Outcome::Close(reason) => return Err(Close::violation(reason)),
        }
        Ok(())
    }

    /// Acknowledges a publish that has nothing to wait for.
    fn ack_now(&mut self, p: &Publish) {
        match p.qos {
            QoS::AtMostOnce => {}
            QoS::AtLeastOnce => self.send(Packet::PubAck(PubAck::new(p.pkid, None))),
            QoS::ExactlyOnce => {
                if let Some(cell) = &self.cell {
                    let mut batch = Batch::new();
                    cell.lock().session.accept_inbound(p.pkid, &mut batch);
                    drop(self.broker.store.submit_now(batch));
                }
                self.send(Packet::PubRec(PubRec::new(p.pkid, None)));
            }
        }
    }

    pub fn session(&self) -> Option<&Arc<SessionCell>> {
        self.cell.as_ref()
    }
}

/// The CONNACK properties in a form that fits the client's Maximum Packet
/// Size [MQTT-3.1.2-24]: all of them, or else only those whose absence
/// would mislead the client (its assigned id, the session expiry and
/// keepalive in force, our receive maximum and packet size). The others
/// may go: absent, the availability flags mean what ours say, a missing
/// Topic Alias Maximum means none, and reason strings and user properties
/// are optional by definition [MQTT-3.2.2-19, -20]. `None`: even that
/// does not fit.
fn fit_connack(
    full: Option<ConnAckProperties>,
    max: Option<u32>,
) -> Option<Option<ConnAckProperties>> {
    let fits = |p: &Option<ConnAckProperties>| {
        let connack = Packet::ConnAck(ConnAck {
            session_present: false,
            code: ConnectReturnCode::Success,
            properties: p.clone(),
        });
        max.is_none_or(|m| connack.size() <= m as usize)
    };
    if fits(&full) {
        return Some(full);
    }
    let essential = full.map(|p| ConnAckProperties {
        session_expiry_interval: p.session_expiry_interval,
        receive_max: p.receive_max,
        max_qos: p.max_qos,
        retain_available: None,
        max_packet_size: p.max_packet_size,
        assigned_client_identifier: p.assigned_client_identifier,
        topic_alias_max: None,
        reason_string: None,
        user_properties: vec![],
        wildcard_subscription_available: None,
        subscription_identifiers_available: None,
        shared_subscription_available: None,
        server_keep_alive: p.server_keep_alive,
        response_information: None,
        server_reference: None,
        authentication_method: p.authentication_method,
        authentication_data: None,
    });
    fits(&essential).then_some(essential)
}

/// A connection task that ends without `close` (it panicked, or its future
/// was dropped) still releases its session and its user's presence, and
/// its will is due as after any abrupt loss.
impl Drop for Channel {
    fn drop(&mut self) {
        let Some(cell) = self.cell.take() else { return };
        let mut batch = Batch::new();
        let owned = self.broker.detach(
            &cell,
            self.conn_id,
            self.will.take().map(|w| *w),
            &mut batch,
        );
        if let (true, Some(user)) = (owned, self.identity.user()) {
            self.broker.hooks().session_offline(user, &cell);
        }
        drop(self.broker.store.submit_now(batch));
    }
}

/// An acknowledgement of the wrong kind for its packet id is a protocol
/// error (MQTT 5: DISCONNECT 0x82; 3.1.1: close) [MQTT-4.8.0-1].
fn ack_checked(ack: Ack) -> Result<Ack, Close> {
    match ack {
        Ack::WrongType => Err(Close::violation(DisconnectReasonCode::ProtocolError)),
        ack => Ok(ack),
    }
}

fn empty_connect_props() -> ConnectProperties {
    ConnectProperties {
        session_expiry_interval: None,
        receive_maximum: None,
        max_packet_size: None,
        topic_alias_max: None,
        request_response_info: None,
        request_problem_info: None,
        user_properties: vec![],
        authentication_method: None,
        authentication_data: None,
    }
}
