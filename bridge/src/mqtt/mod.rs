//! MQTT bridges: one connection per `[[bridge.remotes]]` entry to another
//! broker (Mosquitto, EMQX, ...), and the topics that cross it in each
//! direction with their prefixes rewritten ([`topics`]).
//!
//! This module holds the remote side and knows nothing of the broker: the
//! local side (an in-process session of chatmq, `broker/src/bridge.rs`)
//! hands it [`Outbound`] messages and takes [`Inbound`] ones through
//! bounded channels.
//!
//! Delivery at QoS 1, end to end:
//! - out: a local message is acknowledged to the local session (its
//!   packet id comes back on the `acks` channel) only once the remote has
//!   PUBACKed it. What the remote has not acknowledged when the link drops
//!   is published again, in order, on the next connection; what the local
//!   session had not been told is resent by it after a chatmq restart (its
//!   session is persistent). At least once: a restart can duplicate.
//! - in: the remote session is persistent (`clean_session = false`) and
//!   acknowledged by hand: a message is PUBACKed to the remote only once
//!   the local side has stored it (or refused it for good), in the order
//!   received. The remote keeps the rest for the next connection.
//!
//! Loops: both subscriptions are MQTT 5 No Local (the local one on the
//! bridge's own session, the remote one on this connection), so what the
//! bridge publishes on one side never comes back to it on that side.
//!
//! Each connection is a fresh rumqttc event loop: rumqttc's own replay of
//! unacknowledged publishes (dropped when the remote lost the session) is
//! not relied on; the link keeps its own list and republishes it.

pub mod topics;

use std::collections::VecDeque;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use chatmq_config::Remote;
use rumqttc::v5::mqttbytes::v5::{
    Filter, Packet, PubAckReason, Publish, RetainForwardRule, SubscribeReasonCode,
};
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::{AsyncClient, Event, EventLoop, MqttOptions};
use rumqttc::{Outgoing, TlsConfiguration, Transport};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::CertificateDer;
use tokio::sync::{mpsc, oneshot, watch};
use tokio_rustls::rustls::{self, ClientConfig, RootCertStore};

pub use topics::{Crossing, Mappings};

/// Publishes the link keeps unacknowledged by the remote at most (and
/// asks rumqttc to keep in flight at most).
const MAX_OUTSTANDING: usize = 256;
/// Inbound messages handed to the local side and not yet stored.
const MAX_INBOUND_WAITING: usize = 256;

/// A local message for the remote.
#[derive(Debug)]
pub struct Outbound {
    /// The local topic (the link rewrites it).
    pub topic: String,
    pub payload: Bytes,
    pub qos: QoS,
    pub retain: bool,
    /// Sent back on `acks` once the remote acknowledged; 0: nothing to
    /// acknowledge (QoS 0).
    pub pkid: u16,
}

/// A remote message for the local side, already rewritten.
#[derive(Debug)]
pub struct Inbound {
    pub topic: String,
    pub payload: Bytes,
    pub qos: QoS,
    pub retain: bool,
    /// Answered once the local side is done with it. Dropped unanswered
    /// (the broker stopping): the remote is not acknowledged and resends.
    pub done: oneshot::Sender<Taken>,
}

/// What the local side did with an [`Inbound`] message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Taken {
    /// Stored (QoS 1: durable).
    Stored,
    /// Refused for good (the ACL, a bad chat envelope): acknowledged to
    /// the remote all the same, and counted as dropped.
    Refused,
}

/// Per remote, for `/metrics` (label `remote`).
#[derive(Debug, Default)]
pub struct Metrics {
    pub name: String,
    /// 1 while the connection is up.
    pub connected: AtomicU64,
    /// Remote messages published locally.
    pub messages_in: AtomicU64,
    /// Local messages the remote took (PUBACK for QoS 1, sent for QoS 0).
    pub messages_out: AtomicU64,
    /// Connections made after the first.
    pub reconnects: AtomicU64,
    /// Messages given up: no mapping, refused by either side, or QoS 0
    /// with the queue full.
    pub dropped: AtomicU64,
}

impl Metrics {
    pub fn new(name: &str) -> Metrics {
        Metrics {
            name: name.to_string(),
            ..Metrics::default()
        }
    }

    fn add(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }
}

/// Why a remote cannot be set up at start-up (names the key).
#[derive(Debug, thiserror::Error)]
pub enum BridgeError {
    #[error("{key}: {problem}")]
    Setting { key: String, problem: String },
}

/// The local side's ends of one link's channels.
pub struct LocalEnds {
    /// Local messages to send out.
    pub outbound: mpsc::Receiver<Outbound>,
    /// Packet ids of outbound messages the remote acknowledged.
    pub acks: mpsc::Sender<u16>,
    /// Remote messages for the local side.
    pub inbound: mpsc::Sender<Inbound>,
}

/// One remote broker and the topics that cross to it.
pub struct Link {
    remote: Remote,
    index: usize,
    mappings: Mappings,
    tls: Option<Arc<ClientConfig>>,
    host: String,
    port: u16,
    pub metrics: Arc<Metrics>,
}

/// A published message the remote has not acknowledged yet.
struct Sent {
    outbound: Outbound,
    remote_topic: String,
    qos: QoS,
    /// The packet id rumqttc gave it on this connection, once known.
    remote_pkid: Option<u16>,
}

/// Why one connection ended.
enum End {
    Stop,
    Lost,
}

impl Link {
    /// Checks `remote` (the `index`th entry) and reads its CA file.
    pub fn new(index: usize, remote: Remote) -> Result<Link, BridgeError> {
        let key = |field: &str| format!("bridge.remotes[{index}].{field}");
        let setting = |field: &str, problem: String| BridgeError::Setting {
            key: key(field),
            problem,
        };
        let (host, port) = remote
            .address
            .rsplit_once(':')
            .and_then(|(h, p)| {
                Some((
                    h.trim_start_matches('[').trim_end_matches(']'),
                    p.parse().ok()?,
                ))
            })
            .ok_or_else(|| setting("address", format!("{:?} is not host:port", remote.address)))?;
        let tls = match (remote.tls, &remote.ca_file) {
            (true, Some(ca)) => Some(client_config(ca).map_err(|p| setting("ca_file", p))?),
            (true, None) => return Err(setting("ca_file", "required with tls = true".into())),
            (false, _) => None,
        };
        Ok(Link {
            metrics: Arc::new(Metrics::new(&remote.name)),
            mappings: Mappings::new(remote.topics.clone()),
            host: host.to_string(),
            port,
            index,
            tls,
            remote,
        })
    }

    /// The `[[bridge.remotes]]` entry.
    pub fn remote(&self) -> &Remote {
        &self.remote
    }

    pub fn name(&self) -> &str {
        &self.remote.name
    }

    pub fn mappings(&self) -> &Mappings {
        &self.mappings
    }

    /// Keeps the connection up, reconnecting with backoff, until `stop`.
    pub async fn run(self, mut local: LocalEnds, mut stop: watch::Receiver<bool>) {
        let mut outstanding: VecDeque<Sent> = VecDeque::new();
        let min = Duration::from_millis(self.remote.reconnect_min_ms);
        let max = Duration::from_millis(self.remote.reconnect_max_ms);
        let mut delay = min;
        let mut first = true;
        loop {
            if *stop.borrow() {
                return;
            }
            if !first {
                Metrics::add(&self.metrics.reconnects);
            }
            first = false;
            let (end, connected) = self
                .connection(&mut local, &mut outstanding, &mut stop)
                .await;
            self.metrics.connected.store(0, Ordering::Relaxed);
            if let End::Stop = end {
                return;
            }
            if connected {
                delay = min;
            }
            tracing::info!(remote = %self.remote.name, ?delay, "bridge: reconnecting");
            tokio::select! {
                _ = tokio::time::sleep(delay) => {}
                _ = stop.changed() => return,
            }
            delay = delay.saturating_mul(2).min(max);
        }
    }

    fn options(&self) -> MqttOptions {
        let r = &self.remote;
        let id = r
            .client_id
            .clone()
            .unwrap_or_else(|| format!("chatmq-bridge-{}", r.name));
        let mut o = MqttOptions::new(id, self.host.clone(), self.port);
        o.set_keep_alive(Duration::from_secs(u64::from(r.keepalive_secs)))
            .set_clean_start(r.clean_session)
            .set_manual_acks(true)
            .set_connection_timeout(10)
            .set_outgoing_inflight_upper_limit(MAX_OUTSTANDING as u16)
            .set_receive_maximum(Some(MAX_INBOUND_WAITING as u16));
        if !r.clean_session {
            o.set_session_expiry_interval(Some(r.session_expiry_secs));
        }
        if let Some(user) = &r.username {
            o.set_credentials(user.clone(), r.password.clone().unwrap_or_default());
        }
        if let Some(config) = &self.tls {
            o.set_transport(Transport::tls_with_config(TlsConfiguration::Rustls(
                config.clone(),
            )));
        }
        o
    }

    /// One connection, until it is lost or `stop`; returns whether it was
    /// ever up.
    async fn connection(
        &self,
        local: &mut LocalEnds,
        outstanding: &mut VecDeque<Sent>,
        stop: &mut watch::Receiver<bool>,
    ) -> (End, bool) {
        let capacity = self.remote.queue.max(MAX_OUTSTANDING + 16);
        let (client, eventloop) = AsyncClient::new(self.options(), capacity);
        let (events_tx, mut events) = mpsc::channel(64);
        let poller = tokio::spawn(poll(eventloop, events_tx));
        let end = self
            .serve(&client, &mut events, local, outstanding, stop)
            .await;
        poller.abort();
        end
    }

    async fn serve(
        &self,
        client: &AsyncClient,
        events: &mut mpsc::Receiver<Result<Event, String>>,
        local: &mut LocalEnds,
        outstanding: &mut VecDeque<Sent>,
        stop: &mut watch::Receiver<bool>,
    ) -> (End, bool) {
        let name = &self.remote.name;
        let mut connected = false;
        // Inbound QoS 1 messages handed over, in order, with their answer.
        let mut waiting: VecDeque<(Publish, oneshot::Receiver<Taken>)> = VecDeque::new();
        loop {
            let room = connected && outstanding.len() < MAX_OUTSTANDING;
            tokio::select! {
                _ = stop.changed() => return (End::Stop, connected),
                event = events.recv() => match event {
                    None => return (End::Lost, connected),
                    Some(Err(e)) => {
                        tracing::warn!(remote = %name, error = %e, "bridge: connection lost");
                        return (End::Lost, connected);
                    }
                    Some(Ok(Event::Incoming(Packet::ConnAck(_)))) => {
                        connected = true;
                        self.metrics.connected.store(1, Ordering::Relaxed);
                        tracing::info!(remote = %name, "bridge: connected");
                        if !self.subscribe(client).await {
                            return (End::Lost, connected);
                        }
                        // What the last connection left unacknowledged,
                        // first and in order.
                        for sent in outstanding.iter_mut() {
                            sent.remote_pkid = None;
                            let o = &sent.outbound;
                            let r = client
                                .publish(sent.remote_topic.clone(), sent.qos, o.retain, o.payload.clone())
                                .await;
                            if r.is_err() {
                                return (End::Lost, connected);
                            }
                        }
                    }
                    Some(Ok(Event::Outgoing(Outgoing::Publish(pkid)))) if pkid != 0 => {
                        // Requests go out in order: the oldest without an
                        // id is this one.
                        if let Some(s) = outstanding.iter_mut().find(|s| s.remote_pkid.is_none()) {
                            s.remote_pkid = Some(pkid);
                        }
                    }
                    Some(Ok(Event::Incoming(Packet::PubAck(ack)))) => {
                        let at = outstanding.iter().position(|s| s.remote_pkid == Some(ack.pkid));
                        if let Some(sent) = at.and_then(|i| outstanding.remove(i)) {
                            match ack.reason {
                                PubAckReason::Success | PubAckReason::NoMatchingSubscribers => {
                                    Metrics::add(&self.metrics.messages_out)
                                }
                                reason => {
                                    tracing::warn!(remote = %name, topic = %sent.remote_topic, ?reason, "bridge: the remote refused a message");
                                    Metrics::add(&self.metrics.dropped);
                                }
                            }
                            if local.acks.send(sent.outbound.pkid).await.is_err() {
                                return (End::Stop, connected);
                            }
                        }
                    }
                    Some(Ok(Event::Incoming(Packet::SubAck(ack)))) => {
                        let refused = ack.return_codes.iter().filter(|c| !matches!(c, SubscribeReasonCode::Success(_))).count();
                        if refused > 0 {
                            tracing::warn!(remote = %name, refused, codes = ?ack.return_codes, "bridge: the remote refused subscriptions");
                        }
                    }
                    Some(Ok(Event::Incoming(Packet::Publish(p)))) => {
                        if let Some(w) = self.inbound(p, local).await {
                            waiting.push_back(w);
                        }
                    }
                    Some(Ok(_)) => {}
                },
                delivery = local.outbound.recv(), if room => {
                    let Some(o) = delivery else { return (End::Stop, connected) };
                    let Some(c) = self.mappings.to_remote(&o.topic, o.qos) else {
                        Metrics::add(&self.metrics.dropped);
                        if o.pkid != 0 && local.acks.send(o.pkid).await.is_err() {
                            return (End::Stop, connected);
                        }
                        continue;
                    };
                    if client.publish(c.topic.clone(), c.qos, o.retain, o.payload.clone()).await.is_err() {
                        return (End::Lost, connected);
                    }
                    if c.qos == QoS::AtMostOnce {
                        Metrics::add(&self.metrics.messages_out);
                        if o.pkid != 0 && local.acks.send(o.pkid).await.is_err() {
                            return (End::Stop, connected);
                        }
                    } else {
                        outstanding.push_back(Sent { outbound: o, remote_topic: c.topic, qos: c.qos, remote_pkid: None });
                    }
                }
                taken = async {
                    match waiting.front_mut() {
                        Some((_, rx)) => rx.await,
                        None => std::future::pending().await,
                    }
                }, if !waiting.is_empty() => {
                    let Some((p, _)) = waiting.pop_front() else { continue };
                    match taken {
                        Ok(Taken::Stored) => Metrics::add(&self.metrics.messages_in),
                        Ok(Taken::Refused) => Metrics::add(&self.metrics.dropped),
                        // The broker is stopping: not acknowledged.
                        Err(_) => return (End::Stop, connected),
                    }
                    if client.ack(&p).await.is_err() {
                        return (End::Lost, connected);
                    }
                }
            }
        }
    }

    /// Subscribes on the remote to every inbound mapping (No Local).
    async fn subscribe(&self, client: &AsyncClient) -> bool {
        let filters: Vec<Filter> = self
            .mappings
            .remote_filters()
            .into_iter()
            .map(|(path, qos)| Filter {
                path,
                qos,
                nolocal: true,
                preserve_retain: true,
                retain_forward_rule: RetainForwardRule::OnEverySubscribe,
            })
            .collect();
        if filters.is_empty() {
            return true;
        }
        client.subscribe_many(filters).await.is_ok()
    }

    /// Hands a remote message to the local side; returns what must be
    /// acknowledged to the remote once it is stored.
    async fn inbound(
        &self,
        p: Publish,
        local: &mut LocalEnds,
    ) -> Option<(Publish, oneshot::Receiver<Taken>)> {
        let crossing = std::str::from_utf8(&p.topic)
            .ok()
            .and_then(|t| self.mappings.to_local(t, p.qos));
        let (done, answer) = oneshot::channel();
        let Some(c) = crossing else {
            // Not ours (an overlapping subscription of the session's
            // past): acknowledged and dropped.
            Metrics::add(&self.metrics.dropped);
            let _ = done.send(Taken::Refused);
            return (p.qos != QoS::AtMostOnce).then_some((p, answer));
        };
        let inbound = Inbound {
            topic: c.topic,
            payload: p.payload.clone(),
            qos: c.qos,
            retain: p.retain,
            done,
        };
        if p.qos == QoS::AtMostOnce {
            // QoS 0 never waits: a full queue drops it.
            match local.inbound.try_send(inbound) {
                Ok(()) => Metrics::add(&self.metrics.messages_in),
                Err(_) => Metrics::add(&self.metrics.dropped),
            }
            return None;
        }
        if local.inbound.send(inbound).await.is_err() {
            return None;
        }
        Some((p, answer))
    }

    /// The entry's index in `[[bridge.remotes]]`.
    pub fn index(&self) -> usize {
        self.index
    }
}

/// Drives rumqttc's event loop, forwarding its events; ends at the first
/// error (the link makes a new one to reconnect).
async fn poll(mut eventloop: EventLoop, events: mpsc::Sender<Result<Event, String>>) {
    loop {
        let event = eventloop.poll().await.map_err(|e| e.to_string());
        let failed = event.is_err();
        if events.send(event).await.is_err() || failed {
            return;
        }
    }
}

/// A rustls client configuration (ring) trusting the CA certificates in
/// `ca` (PEM).
fn client_config(ca: &Path) -> Result<Arc<ClientConfig>, String> {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(ca)
        .and_then(|c| c.collect::<Result<Vec<_>, _>>())
        .map_err(|e| format!("{}: cannot read a PEM certificate: {e}", ca.display()))?;
    let mut roots = RootCertStore::empty();
    for cert in certs {
        roots
            .add(cert)
            .map_err(|e| format!("{}: not a usable CA certificate: {e}", ca.display()))?;
    }
    if roots.is_empty() {
        return Err(format!("{}: no certificate in it", ca.display()));
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Arc::new(config))
}
