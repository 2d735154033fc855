//! Start-up and shutdown: open the store, bind the listeners (MQTT and
//! HTTP), accept connections (each admitted by [`admission`] first), sweep
//! expired sessions, apply retention, reload the configuration on SIGHUP
//! ([`Server::reload_from`], [`crate::reload`]), and stop cleanly.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use chatmq_bridge::push::{Gateway, PushError};
use chatmq_bridge::tls::{TlsAcceptor, TlsError, TlsStream};
use chatmq_bridge::websocket::{PacketLimits, WsAcceptor};
use chatmq_config::{Settings, MQTT_TLS_LISTEN, WEBSOCKET_TLS_LISTEN};
use chatmq_storage::Store;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio::time::Instant;

use crate::access::{AccessError, Authenticator};
use crate::admission::{AddressLimiter, AddressLimits, Admission, Admitted, Refusal};
use crate::broker::Broker;
use crate::channel::max_packet_size;
use crate::chat::{self, retention};
use crate::clock::now_ms;
use crate::connection;
use crate::counter::Total;
use crate::drain::Phase;
use crate::http;
use crate::reload::{self, Reloader};

/// Why the server could not start. Each names what to fix.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("node.data_dir {path}: {source}")]
    Storage {
        path: String,
        source: chatmq_storage::StorageError,
    },
    #[error("{0}")]
    Access(#[from] AccessError),
    #[error("mqtt.listen {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("http.listen {addr}: {source}")]
    HttpBind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    /// Another listener's address could not be bound; `key` names it.
    #[error("{key} {addr}: {source}")]
    ListenerBind {
        key: &'static str,
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("{0}")]
    Tls(#[from] TlsError),
    #[error("{0}")]
    Push(#[from] PushError),
    #[error("{0}")]
    Bridge(#[from] chatmq_bridge::mqtt::BridgeError),
    /// `[cluster]`: NATS unreachable in time, or its streams shaped
    /// otherwise; the message starts with the setting.
    #[error("{0}")]
    Cluster(#[from] chatmq_cluster::ClusterError),
}

/// How the bytes of a listener's connections reach MQTT.
#[derive(Clone)]
enum Transport {
    Tcp,
    Tls(TlsAcceptor),
    Ws(WsAcceptor, AddressLimiter),
    Wss(TlsAcceptor, WsAcceptor, AddressLimiter),
}

impl Transport {
    /// Its `listener` label on `/metrics` ([`crate::counter::Listeners`]).
    fn listener(&self) -> &'static str {
        match self {
            Transport::Tcp => "tcp",
            Transport::Tls(_) => "tls",
            Transport::Ws(..) => "ws",
            Transport::Wss(..) => "wss",
        }
    }
}

/// A listener the settings ask for beyond MQTT and HTTP: its name as
/// `main` prints it, the key that sets its address, the address, and its
/// transport (certificates already loaded).
struct Edge {
    name: &'static str,
    key: &'static str,
    addr: SocketAddr,
    transport: Transport,
}

/// A bound edge listener, not yet serving, and the address it got.
struct Listener {
    name: &'static str,
    socket: TcpListener,
    local: SocketAddr,
    transport: Transport,
}

impl Edge {
    async fn bind(self) -> Result<Listener, StartError> {
        let (key, addr) = (self.key, self.addr);
        let bind_error = |source| StartError::ListenerBind { key, addr, source };
        let socket = TcpListener::bind(addr).await.map_err(bind_error)?;
        let local = socket.local_addr().map_err(bind_error)?;
        Ok(Listener {
            name: self.name,
            socket,
            local,
            transport: self.transport,
        })
    }
}

/// The TLS and WebSocket listeners the settings ask for, with their
/// certificates loaded: called before anything else at start-up, so a bad
/// certificate or key stops the broker with its own message before the
/// store is opened or a port bound.
fn plan_edges(settings: &Settings) -> Result<Vec<Edge>, StartError> {
    let mut edges = Vec::new();
    if let Some(tls) = &settings.mqtt.tls {
        edges.push(Edge {
            name: "mqtt-tls",
            key: "mqtt.tls.listen",
            addr: tls.listen.unwrap_or(MQTT_TLS_LISTEN),
            transport: Transport::Tls(TlsAcceptor::from_settings("mqtt.tls", tls, &[])?),
        });
    }
    let ws = &settings.websocket;
    if ws.enabled {
        let limits = PacketLimits {
            max_packet: max_packet_size(settings.mqtt.max_payload),
            max_connect: settings.mqtt.max_connect_packet,
        };
        let upgrade = WsAcceptor::new(ws, limits);
        // `websocket.max_connections_per_ip`, answered 429 by the upgrade.
        let limiter = AddressLimiter::new(AddressLimits {
            max_open: ws.max_connections_per_ip,
            rate_per_sec: 0,
            burst: 0,
        });
        let secure = match &ws.tls {
            Some(tls) => Some(Edge {
                name: "websocket-tls",
                key: "websocket.tls.listen",
                addr: tls.listen.unwrap_or(WEBSOCKET_TLS_LISTEN),
                transport: Transport::Wss(
                    TlsAcceptor::from_settings("websocket.tls", tls, &["http/1.1"])?,
                    upgrade.clone(),
                    limiter.clone(),
                ),
            }),
            None => None,
        };
        edges.push(Edge {
            name: "websocket",
            key: "websocket.listen",
            addr: ws.listen,
            transport: Transport::Ws(upgrade, limiter),
        });
        edges.extend(secure);
    }
    Ok(edges)
}

/// The acceptors of the TLS listeners, by the section that configures
/// them: what a reload gives new certificates.
fn tls_acceptors(edges: &[Edge]) -> Vec<(&'static str, TlsAcceptor)> {
    edges
        .iter()
        .filter_map(|edge| match &edge.transport {
            Transport::Tls(tls) => Some(("mqtt.tls", tls.clone())),
            Transport::Wss(tls, _, _) => Some(("websocket.tls", tls.clone())),
            Transport::Tcp | Transport::Ws(..) => None,
        })
        .collect()
}

/// Which listeners [`Server::start_with`] binds. A program that embeds
/// the broker may serve only in-process clients (`crate::embed`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Listeners {
    /// MQTT over TCP at `mqtt.listen`.
    pub mqtt: bool,
    /// The HTTP API at `http.listen`.
    pub http: bool,
    /// The TLS and WebSocket listeners the settings enable.
    pub edges: bool,
}

impl Listeners {
    /// Every listener the settings ask for: what `chatmq serve` binds.
    pub const ALL: Listeners = Listeners {
        mqtt: true,
        http: true,
        edges: true,
    };
    /// None: in-process clients only.
    pub const NONE: Listeners = Listeners {
        mqtt: false,
        http: false,
        edges: false,
    };
}

/// How long start-up waits for a `[cluster]` node to catch up with the
/// streams before it reports ready anyway (and `/readyz` says not ready
/// until it has).
const CATCH_UP_BEFORE_READY: Duration = Duration::from_secs(3);

/// A running broker.
pub struct Server {
    pub broker: Arc<Broker>,
    /// Where MQTT over TCP listens (the real port when configured as 0);
    /// `None` when not asked to listen.
    pub mqtt_addr: Option<SocketAddr>,
    /// Where the HTTP API listens (the real port when configured as 0);
    /// `None` when not asked to listen.
    pub http_addr: Option<SocketAddr>,
    /// The other listeners (`mqtt-tls`, `websocket`, `websocket-tls`) and
    /// where they listen.
    pub edges: Vec<(&'static str, SocketAddr)>,
    /// Applies a changed configuration (SIGHUP, `POST /v1/admin/reload`).
    pub reloader: Arc<Reloader>,
    /// The link to NATS with `[cluster]`; `None` without (no NATS at all).
    pub cluster: Option<chatmq_cluster::Cluster>,
    /// What `/readyz` reports: set once serving, cleared at shutdown.
    ready: Arc<AtomicBool>,
    shutdown: watch::Sender<bool>,
    tasks: JoinSet<()>,
    /// The HTTP API's event streams, when it is served.
    streams: Option<Arc<http::stream::Streams>>,
}

impl Server {
    /// Binds every listener, opens the store, restores state, and starts
    /// serving.
    pub async fn start(settings: Settings) -> Result<Server, StartError> {
        Server::start_with(settings, Listeners::ALL).await
    }

    /// [`Server::start`] with only the `listeners` chosen.
    pub async fn start_with(
        settings: Settings,
        listeners: Listeners,
    ) -> Result<Server, StartError> {
        let settings = Arc::new(settings);
        let planned_edges = match listeners.edges {
            true => plan_edges(&settings)?,
            false => Vec::new(),
        };
        let data_dir = settings.node.data_dir.clone();
        let storage_error = |source| StartError::Storage {
            path: data_dir.display().to_string(),
            source,
        };
        let mqtt_bind = |source| StartError::Bind {
            addr: settings.mqtt.listen,
            source,
        };
        let (listener, mqtt_addr) =
            bind_if(listeners.mqtt, settings.mqtt.listen, mqtt_bind).await?;
        let http_bind = |source| StartError::HttpBind {
            addr: settings.http.listen,
            source,
        };
        let (http_listener, http_addr) =
            bind_if(listeners.http, settings.http.listen, http_bind).await?;
        let tls = tls_acceptors(&planned_edges);
        let mut edge_listeners = Vec::new();
        for edge in planned_edges {
            edge_listeners.push(edge.bind().await?);
        }
        let auth = Authenticator::new(&settings.auth)?;
        let links = crate::bridge::links(&settings)?;
        // The store last: once it is open, a failure must close it (its
        // writer thread would otherwise still be in RocksDB while the
        // process exits), so what can fail without it comes first.
        let store = Store::open(
            &data_dir,
            settings.storage.sync,
            Duration::from_millis(settings.storage.sync_interval_ms),
        )
        .map_err(storage_error)?;
        let broker = match Broker::new(settings.clone(), store.clone(), auth) {
            Ok(b) => b,
            Err(e) => {
                store.close();
                return Err(storage_error(e));
            }
        };
        let chat = broker.chat.clone();
        let online = Arc::new(move |user: &str| chat.is_online(user));
        let gateway = match Gateway::new(broker.chat.push.clone(), &settings.push, online) {
            Ok(g) => g,
            Err(e) => {
                broker.store.close();
                return Err(e.into());
            }
        };
        let edges: Vec<_> = edge_listeners.iter().map(|l| (l.name, l.local)).collect();
        let reloader = Arc::new(Reloader::new(broker.clone(), tls));
        let ready = Arc::new(AtomicBool::new(false));
        let (shutdown, watch) = watch::channel(false);
        let mut tasks = JoinSet::new();
        let mut streams = None;
        if let Some(http_listener) = http_listener {
            let api = http::Api::new(
                broker.clone(),
                ready.clone(),
                edges.clone(),
                reloader.clone(),
            );
            streams = Some(api.streams());
            tasks.spawn(http::serve(http_listener, api, watch.clone()));
        }
        // With `[cluster]`, NATS and its streams before any MQTT client is
        // served: the sockets are bound, so clients wait in the backlog,
        // and `/readyz` answers not ready meanwhile.
        let cluster = match &settings.cluster {
            Some(cluster) => match chatmq_cluster::Cluster::start(cluster, &settings.chat).await {
                Ok(c) => Some(c),
                Err(e) => {
                    let _ = shutdown.send(true);
                    while tasks.join_next().await.is_some() {}
                    let store = broker.store.clone();
                    let _ = tokio::task::spawn_blocking(move || store.close()).await;
                    return Err(e.into());
                }
            },
            None => None,
        };
        // With `[cluster]`, chat goes through the streams from the start.
        if let (Some(c), Some(cs)) = (&cluster, &settings.cluster) {
            let node = chatmq_cluster::Node::new(c, &cs.node_id);
            broker.chat.attach_cluster(node.clone());
            tasks.spawn(chat::replicated::run(broker.chat.clone(), watch.clone()));
            // A short catch-up (a fresh cluster, a node stopped briefly)
            // is over before "ready"; a longer one goes on behind a
            // `/readyz` that says not ready until it is.
            let _ = tokio::time::timeout(CATCH_UP_BEFORE_READY, async {
                while !node.caught_up() {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            })
            .await;
        }
        // With `[cluster]`, plain MQTT to and from the other nodes, before
        // any client can subscribe or publish.
        if let (Some(c), Some(cs)) = (&cluster, &settings.cluster) {
            let links =
                chatmq_cluster::mqtt::Links::new(c.client().clone(), &cs.name_prefix, &cs.node_id);
            crate::remote::start(&broker, links, &mut tasks, &watch);
            if let Some(node) = broker.chat.cluster_node() {
                crate::remote::start_retained(&broker, node, &mut tasks, &watch);
            }
            // Presence, typing and room reactions across the nodes.
            let channel = chatmq_cluster::live::Channel::new(
                c.client().clone(),
                &cs.name_prefix,
                &cs.node_id,
            );
            match chat::live::start(broker.chat.clone(), channel, watch.clone()).await {
                Ok(task) => {
                    tasks.spawn(async move {
                        let _ = task.await;
                    });
                }
                Err(e) => {
                    tracing::error!(error = %e, "live link unavailable: presence and typing stay on this node")
                }
            }
            // Sessions that move between the nodes (after the remote link:
            // a session resumed here subscribes through it).
            if let Err(e) = crate::roaming::start(&broker, c, &cs.node_id, &mut tasks, &watch).await
            {
                tracing::error!(error = %e, "sessions bucket unavailable: sessions stay on their node");
            }
        }
        // One budget for every MQTT listener: `mqtt.max_connections` counts
        // connections, whatever their transport.
        let admission = Admission::new(&settings.mqtt);
        if let Some(listener) = listener {
            tasks.spawn(accept_loop(
                listener,
                Transport::Tcp,
                admission.clone(),
                broker.clone(),
            ));
        }
        for edge in edge_listeners {
            tasks.spawn(accept_loop(
                edge.socket,
                edge.transport,
                admission.clone(),
                broker.clone(),
            ));
        }
        tasks.spawn(broker.chat.clone().run_dispatcher(watch.clone()));
        tasks.spawn(chat::announcements::run(broker.chat.clone(), watch.clone()));
        tasks.spawn(chat::presence::run(broker.chat.clone(), watch.clone()));
        tasks.spawn(gateway.run(watch.clone()));
        if let Some(policy) = retention::Policy::from_settings(&settings.chat) {
            tasks.spawn(retention::run(broker.chat.clone(), policy, watch.clone()));
        }
        if settings.attachments.enabled {
            tasks.spawn(chat::attachments::run(broker.chat.clone(), watch.clone()));
        }
        tasks.spawn(crate::ownership::sweep(broker.clone(), watch.clone()));
        tasks.spawn(chat::dedup::run(
            broker.chat.clone(),
            settings.chat.dedup_ttl_secs,
            watch.clone(),
        ));
        let _ = broker
            .bridges
            .set(links.iter().map(|l| l.metrics.clone()).collect());
        if !links.is_empty() {
            tasks.spawn(crate::bridge::run(broker.clone(), links, watch.clone()));
        }
        tasks.spawn(sweep_sessions(broker.clone(), watch));
        ready.store(true, Ordering::Release);
        Ok(Server {
            broker,
            mqtt_addr,
            http_addr,
            edges,
            reloader,
            cluster,
            ready,
            shutdown,
            tasks,
            streams,
        })
    }

    /// Makes `path` the file a reload reads, and reloads it on every
    /// SIGHUP from now on (what `chatmq serve` does, right after start).
    /// Without it, `POST /v1/admin/reload` answers that there is no file;
    /// a program running the server itself may call [`Reloader::apply`]
    /// on [`Server::reloader`] with its own settings instead.
    pub fn reload_from(&mut self, path: PathBuf) {
        self.reloader.set_source(path);
        // Listened for here, not in the task: a SIGHUP right after "ready"
        // (before the task first ran) would take the default action and
        // end the process.
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::hangup()) {
            Ok(hangup) => {
                let shutdown = self.shutdown.subscribe();
                self.tasks
                    .spawn(reload::on_hangup(hangup, self.reloader.clone(), shutdown));
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot listen for SIGHUP: reload through the HTTP API");
            }
        }
    }

    /// Resolves once a drain ([`crate::drain`], `POST /v1/admin/drain`) is
    /// over: no MQTT connection and no event stream left, or the plan's
    /// timeout after its spread. Never without a drain. The caller then
    /// shuts down.
    pub async fn drained(&self) {
        let mut phase = self.broker.drain.subscribe();
        while *phase.borrow_and_update() != Phase::Draining {
            if phase.changed().await.is_err() {
                return std::future::pending().await;
            }
        }
        let Some((plan, started)) = self.broker.drain.plan() else {
            return;
        };
        if let Some(node) = self.broker.chat.cluster_node() {
            // The partitions move first, while the clients still forward.
            node.hand_over();
        }
        let give_up = started + plan.spread + plan.timeout;
        tracing::info!(
            connections = self.broker.metrics.connections.total(),
            spread_secs = plan.spread.as_secs(),
            "draining: moving the clients away"
        );
        let left = || {
            let streams = self.streams.as_ref().map_or(0, |s| s.open());
            self.broker
                .metrics
                .connections
                .total()
                .saturating_add(streams as u64)
        };
        while left() > 0 && Instant::now() < give_up {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let left = left();
        if left > 0 {
            tracing::warn!(
                connections = left,
                "drain timed out; stopping with connections left"
            );
        } else {
            tracing::info!("drained: no connection left");
        }
    }

    /// Stops accepting, tells every client (MQTT 5: DISCONNECT 0x8B), waits
    /// for connections to finish, then makes everything durable.
    pub async fn shutdown(mut self) {
        self.ready.store(false, Ordering::Release);
        self.broker.drain.stop();
        let _ = self.shutdown.send(true);
        let _ = tokio::time::timeout(Duration::from_secs(10), async {
            while self.tasks.join_next().await.is_some() {}
        })
        .await;
        if let Some(cluster) = self.cluster.take() {
            cluster.shutdown().await;
        }
        if let Err(e) = self.broker.store.flush().await {
            tracing::error!(error = %e, "final flush failed");
        }
        let store = self.broker.store.clone();
        let _ = tokio::task::spawn_blocking(move || store.close()).await;
    }
}

/// Accepts connections while there are permits: beyond
/// `mqtt.max_connections` a listener holds the one socket it accepted,
/// unread, until a permit frees, and further connections wait in the
/// kernel's backlog and cost nothing here. (A listener waiting holds no
/// permit, so an idle listener never takes a place from a busy one.) An
/// admitted connection holds its permit and address place until its task
/// ends.
/// Binds `addr` if the listener is wanted: the listener and the address
/// it got (`None`, `None` when turned off).
async fn bind_if(
    wanted: bool,
    addr: SocketAddr,
    error: impl Fn(std::io::Error) -> StartError,
) -> Result<(Option<TcpListener>, Option<SocketAddr>), StartError> {
    if !wanted {
        return Ok((None, None));
    }
    let listener = TcpListener::bind(addr).await.map_err(&error)?;
    let local = listener.local_addr().map_err(error)?;
    Ok((Some(listener), Some(local)))
}

/// Stops when the node drains or stops ([`Phase`]): the listening socket
/// is closed, so clients that still come are refused by the kernel and
/// try another address; the connections it started are waited for.
async fn accept_loop(
    listener: TcpListener,
    transport: Transport,
    admission: Admission,
    broker: Arc<Broker>,
) {
    let mut connections = JoinSet::new();
    let inherits = admission.tune_listener(&listener);
    let mut phase = broker.drain.subscribe();
    loop {
        if *phase.borrow_and_update() != Phase::Serving {
            break;
        }
        tokio::select! {
            _ = phase.changed() => continue,
            accepted = listener.accept() => match accepted {
                Ok((socket, peer)) => {
                    let p = tokio::select! {
                        _ = phase.changed() => break,
                        p = admission.permit() => match p {
                            Some(p) => p,
                            None => break,
                        },
                    };
                    let admitted = match admission.admit(p, &socket, peer.ip(), inherits) {
                        Ok(a) => a,
                        Err(why) => {
                            // Closed before a byte is read: a flood from one
                            // address costs an accept and a close.
                            tracing::debug!(%peer, reason = why.label(), "connection refused");
                            broker.metrics.refused.count(why);
                            continue;
                        }
                    };
                    broker.metrics.accepted.add(transport.listener(), 1);
                    let phase = broker.drain.subscribe();
                    spawn_connection(&mut connections, &transport, socket, peer, admitted, broker.clone(), phase);
                }
                Err(e) => {
                    // Out of file descriptors and the like: back off, keep serving.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
        }
    }
    drop(listener);
    while connections.join_next().await.is_some() {}
}

/// Serves one admitted connection in its own task. One task type per
/// transport, so a plain TCP connection carries nothing of TLS or
/// WebSocket in its future.
fn spawn_connection(
    connections: &mut JoinSet<()>,
    transport: &Transport,
    socket: TcpStream,
    peer: SocketAddr,
    admitted: Admitted,
    broker: Arc<Broker>,
    shutdown: watch::Receiver<Phase>,
) {
    match transport {
        Transport::Tcp => {
            connections.spawn(async move {
                connection::serve(socket, peer.ip(), "tcp", broker, shutdown).await;
                drop(admitted);
            });
        }
        Transport::Tls(tls) => {
            let tls = tls.clone();
            connections.spawn(async move {
                if let Some(stream) = handshake(&tls, socket, peer, &broker).await {
                    connection::serve(stream, peer.ip(), "tls", broker, shutdown).await
                }
                drop(admitted);
            });
        }
        Transport::Ws(ws, limiter) => {
            let (ws, limiter) = (ws.clone(), limiter.clone());
            connections.spawn(async move {
                serve_ws(socket, peer, &ws, &limiter, "ws", broker, shutdown).await;
                drop(admitted);
            });
        }
        Transport::Wss(tls, ws, limiter) => {
            let (tls, ws, limiter) = (tls.clone(), ws.clone(), limiter.clone());
            connections.spawn(async move {
                if let Some(stream) = handshake(&tls, socket, peer, &broker).await {
                    serve_ws(stream, peer, &ws, &limiter, "wss", broker, shutdown).await
                }
                drop(admitted);
            });
        }
    }
}

/// The server side of a TLS handshake; a failure (a plaintext client, a
/// timeout, an untrusted chain) ends only this connection.
async fn handshake(
    tls: &TlsAcceptor,
    socket: TcpStream,
    peer: SocketAddr,
    broker: &Broker,
) -> Option<TlsStream<TcpStream>> {
    match tls.accept(socket).await {
        Ok(stream) => Some(stream),
        Err(e) => {
            tracing::debug!(%peer, error = %e, "TLS handshake failed");
            broker.metrics.refused.count(Refusal::Handshake);
            None
        }
    }
}

/// Upgrades to WebSocket (refusing with 429 over
/// `websocket.max_connections_per_ip`), then serves MQTT on it like on any
/// socket.
async fn serve_ws<S>(
    stream: S,
    peer: SocketAddr,
    ws: &WsAcceptor,
    limiter: &AddressLimiter,
    listener: &'static str,
    broker: Arc<Broker>,
    shutdown: watch::Receiver<Phase>,
) where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let place = limiter.enter(peer.ip(), std::time::Instant::now()).ok();
    match ws.accept(stream, place.is_none()).await {
        Ok(stream) => connection::serve(stream, peer.ip(), listener, broker, shutdown).await,
        Err(e) => {
            tracing::debug!(%peer, error = %e, "websocket upgrade refused or failed");
            broker.metrics.refused.count(Refusal::Handshake);
        }
    }
    drop(place);
}

async fn sweep_sessions(broker: Arc<Broker>, mut shutdown: watch::Receiver<bool>) {
    loop {
        let now = now_ms();
        broker.expire_sessions(now);
        broker.fire_wills(now);
        // Asleep until the earliest deadline, or until an earlier one is
        // set; at most a minute, so a clock stepped back is caught up.
        let wait = broker
            .next_deadline()
            .map_or(TIMER_IDLE, |t| Duration::from_millis(t.saturating_sub(now)))
            .min(TIMER_IDLE);
        tokio::select! {
            _ = shutdown.changed() => break,
            _ = broker.timers.notified() => {}
            _ = tokio::time::sleep(wait) => {}
        }
    }
}

/// The longest the timer task sleeps with no deadline due.
const TIMER_IDLE: Duration = Duration::from_secs(60);
