//! Socket I/O for one client: read bytes, decode packets, hand them to the
//! channel, write what it answers and what the session has to deliver.
//!
//! Generic over the byte stream, so TCP, TLS and WebSocket connections are
//! served by the same code. Acks that wait for a commit are written in the
//! order their packets arrived [MQTT-4.6.0-2]. Malformed input closes this
//! connection only. Every write has a deadline (`mqtt.write_timeout_secs`):
//! a client that stops reading is closed, and while a write waits, a
//! takeover, shutdown, keepalive expiry or an overloaded session still end
//! the connection.

use std::collections::VecDeque;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;

use bytes::{Buf, BytesMut};
use chatmq_protocol::auth::{self, Auth, AuthReason};
use chatmq_storage::Commit;
use rumqttc::v5::mqttbytes::v5::{
    ConnAck, Connect, ConnectReturnCode, Disconnect, DisconnectProperties, DisconnectReasonCode,
    Packet,
};
use rumqttc::v5::mqttbytes::QoS;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::{oneshot, watch};
use tokio::time::{sleep_until, timeout, Instant};

use crate::admission::Refusal;
use crate::broker::{Broker, Kick, Metrics, Plain, SessionCell};
use crate::channel::{max_packet_size, Channel, Close, Out, JWT_METHOD};
use crate::codec::{self, DecodeError, Frame, Protocol};
use crate::drain::{Drain, Phase};
use crate::login_guard;
use crate::session::{Delivery, Outbound};

const READ_CHUNK: usize = 16 * 1024;
/// Reads that return at least this much keep a read buffer of their own
/// ([`READ_CHUNK`]); a quieter connection reads into its worker's scratch
/// buffer and holds none while idle: most connections are idle most of the
/// time, and their memory is what a broker of many clients pays.
const READ_SMALL: usize = 1024;
/// A connection taken over keeps reading what its client already sent
/// until it has been quiet this long (a DISCONNECT sent just before the
/// client reconnected is then applied first)...
const DRAIN_QUIET: Duration = Duration::from_millis(100);
/// ...but no longer than this, however much the old client keeps sending.
const DRAIN_MAX: Duration = Duration::from_secs(1);

/// The longest a publisher waits before its next read when one of its
/// subscribers' QoS 0 inbox was full (it waits less if that subscriber
/// drains sooner). QoS 0 beyond a full inbox is dropped either way; the
/// pause keeps a publisher from spending the machine's CPU on messages
/// nobody can take, which is what a flooded subscriber's own reader
/// needs. Short, so that one slow subscriber costs a publisher's other
/// subscribers little: at most one pause per read.
const PACE: Duration = Duration::from_millis(2);

/// Serves one client connection from `peer`, which came in on `listener`
/// (`tcp`, `tls`, `ws`, `wss`: [`crate::counter::Listeners`]), until it ends.
pub async fn serve<S>(
    stream: S,
    peer: IpAddr,
    listener: &'static str,
    broker: Arc<Broker>,
    phase: watch::Receiver<Phase>,
) where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let _counted = Counted::new(&broker.metrics, listener);
    let mut conn = Connection {
        channel: Channel::new(broker.clone(), broker.next_id()),
        max_in: max_packet_size(broker.settings.mqtt.max_payload),
        inbuf: BytesMut::new(),
        outbuf: BytesMut::new(),
        last_read: 0,
        pending: VecDeque::new(),
        protocol: None,
        metrics: broker.metrics.clone(),
        taken_over: None,
        expires: None,
        leave_at: None,
    };
    // One stream that the task both reads and writes: no `split`, whose
    // halves share the stream behind an `Arc` and a lock.
    let mut io = stream;
    let close = conn.run(&mut io, &broker, peer, phase).await;
    if let Some(close) = close {
        Box::pin(finish(conn, io, close, &broker)).await;
    }
}

/// Ends a connection that got past CONNECT: releases the session, says
/// why (MQTT 5), and closes the socket gently. Its own future, boxed by
/// the caller: a connection's idle state should not carry its space.
async fn finish<S>(mut conn: Connection, mut io: S, close: Close, broker: &Broker)
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    {
        let why = disconnect_reason(close, conn.channel.session().is_some());
        conn.metrics.disconnects.add(why, 1);
        // The session is released first, then the connection taking it
        // over (if any) may attach: it must not wait for our socket.
        Box::pin(conn.channel.close(close)).await;
        conn.taken_over = None;
        if let (Some(reason), Some(Protocol::V5)) = (close.reason, conn.protocol) {
            conn.outbuf.clear();
            let mut disconnect = Disconnect::new(reason);
            if reason == DisconnectReasonCode::UseAnotherServer {
                disconnect.properties =
                    broker
                        .drain
                        .server_reference()
                        .map(|r| DisconnectProperties {
                            session_expiry_interval: None,
                            reason_string: None,
                            user_properties: Vec::new(),
                            server_reference: Some(r),
                        });
            }
            let d = Packet::Disconnect(disconnect);
            codec::encode(
                &d,
                Protocol::V5,
                &mut conn.outbuf,
                conn.channel.client_max_packet,
            );
        }
        if !conn.outbuf.is_empty() {
            let _ = timeout(Duration::from_secs(1), async {
                io.write_all(&conn.outbuf).await?;
                io.flush().await
            })
            .await;
        }
        let _ = timeout(Duration::from_secs(1), io.shutdown()).await;
        // Lingering close: a socket dropped while the client is still
        // sending (acks for what we wrote, more publishes) answers it with
        // a TCP reset; its next write fails, and some stacks discard what
        // it has not read yet, so it may never see our DISCONNECT and its
        // reason code (MQTT 5 4.13.1). Discard its input until it closes,
        // for at most a second.
        let _ = timeout(Duration::from_secs(1), async {
            loop {
                conn.inbuf.clear();
                conn.inbuf.reserve(READ_CHUNK);
                match io.read_buf(&mut conn.inbuf).await {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {}
                }
            }
        })
        .await;
    }
}

/// Counts an open connection on its listener for as long as its task
/// lives, even if the task panics.
struct Counted(Arc<Metrics>, &'static str);

impl Counted {
    fn new(metrics: &Arc<Metrics>, listener: &'static str) -> Counted {
        metrics.connections.add(listener, 1);
        Counted(metrics.clone(), listener)
    }
}

impl Drop for Counted {
    fn drop(&mut self) {
        self.0.connections.sub(self.1, 1);
    }
}

/// `reason` of `chatmq_disconnects_total`: why connections that got as
/// far as their CONNECT ended. A fixed list (no client makes a series).
pub enum Disconnects {}

impl crate::counter::LabelValues for Disconnects {
    const VALUES: &'static [&'static str] = &[
        "client_disconnect",
        "connection_lost",
        "connect_refused",
        "unspecified_error",
        "malformed_packet",
        "protocol_error",
        "implementation_specific_error",
        "not_authorized",
        "server_busy",
        "server_shutting_down",
        "keep_alive_timeout",
        "session_taken_over",
        "topic_filter_invalid",
        "topic_name_invalid",
        "receive_maximum_exceeded",
        "topic_alias_invalid",
        "packet_too_large",
        "message_rate_too_high",
        "quota_exceeded",
        "administrative_action",
        "payload_format_invalid",
        "retain_not_supported",
        "qos_not_supported",
        "use_another_server",
        "server_moved",
        "shared_subscription_not_supported",
        "connection_rate_exceeded",
        "maximum_connect_time",
        "subscription_identifiers_not_supported",
        "wildcard_subscriptions_not_supported",
    ];
}

/// Why a connection ended, as `chatmq_disconnects_total` counts it: the
/// reason code the broker gave (told to MQTT 5 clients; the same for an
/// MQTT 3.1.1 one, which is just closed), or for a close without one:
/// `connect_refused` (no session: the CONNACK said why),
/// `client_disconnect` (the client sent DISCONNECT), `connection_lost`
/// (the socket closed or broke, a write timed out, or a DISCONNECT 0x04
/// asked for the will: the same close).
pub fn disconnect_reason(close: Close, attached: bool) -> &'static str {
    use DisconnectReasonCode as R;
    match close.reason {
        None if !attached => "connect_refused",
        None if close.will => "connection_lost",
        None => "client_disconnect",
        Some(R::NormalDisconnection) | Some(R::DisconnectWithWillMessage) => "client_disconnect",
        Some(R::UnspecifiedError) => "unspecified_error",
        Some(R::MalformedPacket) => "malformed_packet",
        Some(R::ProtocolError) => "protocol_error",
        Some(R::ImplementationSpecificError) => "implementation_specific_error",
        Some(R::NotAuthorized) => "not_authorized",
        Some(R::ServerBusy) => "server_busy",
        Some(R::ServerShuttingDown) => "server_shutting_down",
        Some(R::KeepAliveTimeout) => "keep_alive_timeout",
        Some(R::SessionTakenOver) => "session_taken_over",
        Some(R::TopicFilterInvalid) => "topic_filter_invalid",
        Some(R::TopicNameInvalid) => "topic_name_invalid",
        Some(R::ReceiveMaximumExceeded) => "receive_maximum_exceeded",
        Some(R::TopicAliasInvalid) => "topic_alias_invalid",
        Some(R::PacketTooLarge) => "packet_too_large",
        Some(R::MessageRateTooHigh) => "message_rate_too_high",
        Some(R::QuotaExceeded) => "quota_exceeded",
        Some(R::AdministrativeAction) => "administrative_action",
        Some(R::PayloadFormatInvalid) => "payload_format_invalid",
        Some(R::RetainNotSupported) => "retain_not_supported",
        Some(R::QoSNotSupported) => "qos_not_supported",
        Some(R::UseAnotherServer) => "use_another_server",
        Some(R::ServerMoved) => "server_moved",
        Some(R::SharedSubscriptionNotSupported) => "shared_subscription_not_supported",
        Some(R::ConnectionRateExceeded) => "connection_rate_exceeded",
        Some(R::MaximumConnectTime) => "maximum_connect_time",
        Some(R::SubscriptionIdentifiersNotSupported) => "subscription_identifiers_not_supported",
        Some(R::WildcardSubscriptionsNotSupported) => "wildcard_subscriptions_not_supported",
    }
}

/// The close of a connection whose session another one took over.
fn taken_over() -> Close {
    Close {
        reason: Some(DisconnectReasonCode::SessionTakenOver),
        will: true,
    }
}

/// The close of every connection when the server stops.
fn shutting_down() -> Close {
    Close {
        reason: Some(DisconnectReasonCode::ServerShuttingDown),
        will: false,
    }
}

/// The close of a connection moved away by a drain: MQTT 5 clients are
/// told to use another server ([`crate::drain`]). Not a failure, so no will.
fn moved_away() -> Close {
    Close {
        reason: Some(DisconnectReasonCode::UseAnotherServer),
        will: false,
    }
}

/// Resolves when the session is taken over, with what the new connection
/// waits on; never if it cannot be any more. Cancel-safe, so it can sit in
/// every `select!`.
async fn kicked_off(kicked: &mut Option<oneshot::Receiver<Kick>>) -> oneshot::Sender<()> {
    loop {
        match kicked.as_mut() {
            Some(k) => {
                let kick = k.await;
                *kicked = None;
                if let Ok(Kick::TakenOver { closed }) = kick {
                    return closed;
                }
            }
            None => std::future::pending::<()>().await,
        }
    }
}

/// Writes and flushes as much of `out` as `wr` takes without waiting:
/// (bytes written, whether all of it is written and flushed), or `Err`
/// if the connection failed. Each step is polled once; a step that would
/// wait is dropped unstarted (tokio's writes are cancel-safe), and the
/// caller waits for it properly.
fn write_now<W: AsyncWrite + Unpin>(wr: &mut W, out: &[u8]) -> Result<(usize, bool), ()> {
    let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
    let mut written = 0;
    while written < out.len() {
        match Pin::new(&mut *wr).poll_write(&mut cx, &out[written..]) {
            Poll::Ready(Ok(0)) | Poll::Ready(Err(_)) => return Err(()),
            Poll::Ready(Ok(n)) => written += n,
            Poll::Pending => return Ok((written, false)),
        }
    }
    match Pin::new(&mut *wr).poll_flush(&mut cx) {
        Poll::Ready(Ok(())) => Ok((written, true)),
        Poll::Ready(Err(_)) => Err(()),
        Poll::Pending => Ok((written, false)),
    }
}

/// How a connection ends when its deadline passes: the end of its drain
/// after a takeover, its moment to leave a draining node, its login's
/// expiry, or else keepalive.
fn deadline_passed(draining: bool, expires: Option<Instant>, leave_at: Option<Instant>) -> Close {
    let now = Instant::now();
    if draining {
        taken_over()
    } else if leave_at.is_some_and(|at| at <= now) {
        moved_away()
    } else if expires.is_some_and(|e| e <= now) {
        Close::violation(DisconnectReasonCode::MaximumConnectTime)
    } else {
        Close::violation(DisconnectReasonCode::KeepAliveTimeout)
    }
}

thread_local! {
    /// The read buffer every quiet connection on this worker shares; a
    /// read borrows it only while it is polled, never across a wait.
    static SCRATCH: std::cell::RefCell<Vec<u8>> = std::cell::RefCell::new(vec![0; READ_CHUNK]);
}

/// Reads what `io` has into `inbuf`, through the worker's [`SCRATCH`]:
/// `inbuf` gets only the bytes read, so a connection waiting for input
/// holds no buffer of its own (the one copy per read costs far less than
/// the read itself).
fn read_some<'a, S: AsyncRead + Unpin>(
    io: &'a mut S,
    inbuf: &'a mut BytesMut,
) -> impl std::future::Future<Output = std::io::Result<usize>> + 'a {
    std::future::poll_fn(move |cx| {
        SCRATCH.with(|scratch| {
            let mut own;
            let mut shared = scratch.try_borrow_mut();
            // Not reachable (no read polls another one), but were it so:
            // a buffer of this read's own, not a failure.
            let space: &mut [u8] = match shared.as_deref_mut() {
                Ok(v) => v,
                Err(_) => {
                    own = vec![0; READ_SMALL];
                    &mut own
                }
            };
            let mut buf = tokio::io::ReadBuf::new(space);
            match Pin::new(&mut *io).poll_read(cx, &mut buf) {
                Poll::Ready(Ok(())) => {
                    let got = buf.filled();
                    inbuf.extend_from_slice(got);
                    Poll::Ready(Ok(got.len()))
                }
                Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
                Poll::Pending => Poll::Pending,
            }
        })
    })
}

/// Waits for `deadline`, or forever without one.
async fn until(deadline: Option<Instant>) {
    match deadline {
        Some(d) => sleep_until(d).await,
        None => std::future::pending().await,
    }
}

/// Waits until `cell`'s session has something new, or forever without one.
async fn woken(cell: &Option<Arc<SessionCell>>) {
    match cell {
        Some(c) => c.wake.notified().await,
        None => std::future::pending().await,
    }
}

/// What a write shares with the connection's loop: a takeover during the
/// write starts the drain, and the drain's or keepalive's deadline ends it.
struct WriteState<'a> {
    drain: &'a Drain,
    kicked: &'a mut Option<oneshot::Receiver<Kick>>,
    drain_end: &'a mut Option<Instant>,
    deadline: &'a mut Option<Instant>,
}

struct Connection {
    channel: Channel,
    max_in: usize,
    inbuf: BytesMut,
    outbuf: BytesMut,
    /// Bytes the last read returned: a connection whose reads fill a small
    /// buffer gets READ_CHUNK; one that goes quiet gives it back.
    last_read: usize,
    /// Acks waiting for their commit, oldest first.
    pending: VecDeque<(Commit, Packet)>,
    protocol: Option<Protocol>,
    metrics: Arc<Metrics>,
    /// Set once taken over: dropped when the session is released, which
    /// lets the new connection attach.
    taken_over: Option<oneshot::Sender<()>>,
    /// When the login ends: its token's expiry, moved on by each
    /// re-authentication (AUTH); checked where keepalive is.
    expires: Option<Instant>,
    /// When this connection leaves a draining node ([`crate::drain`]).
    leave_at: Option<Instant>,
}

impl Connection {
    /// Runs the connection; returns how it ended (`None` if it never got
    /// past CONNECT and there is nothing to clean up beyond the socket).
    async fn run<S>(
        &mut self,
        io: &mut S,
        broker: &Arc<Broker>,
        peer: IpAddr,
        mut phase: watch::Receiver<Phase>,
    ) -> Option<Close>
    where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        // Boxed and over before the loop: the CONNECT packet, the login and
        // the session's attach would otherwise keep their space in this
        // task's state (a local lives in it until the end of its scope,
        // moved or not) for the connection's whole life.
        let (protocol, kicked) = match Box::pin(self.handshake(io, broker, peer)).await {
            Ok(accepted) => accepted,
            Err(close) => return close,
        };
        let mut kicked = Some(kicked);
        // While draining after a takeover: the latest the drain ends.
        let mut drain_end: Option<Instant> = None;
        let keep_alive = u64::from(self.channel.keep_alive);
        // [MQTT-3.1.2-24] one and a half keepalive periods without a packet.
        let idle = (keep_alive > 0).then(|| Duration::from_millis(keep_alive * 1500));
        let next_deadline =
            |expires: Option<Instant>| earliest(idle.map(|d| Instant::now() + d), expires);
        let wake = self.channel.session().cloned();
        let write_timeout = Duration::from_secs(broker.settings.mqtt.write_timeout_secs);
        // A client may send packets right after CONNECT without waiting
        // for CONNACK [MQTT-3.1.4-7]: what came with it is handled now,
        // not when (if ever) the next read returns.
        if let Some(close) = Box::pin(self.handle_buffered(broker, peer, protocol)).await {
            return Some(close);
        }
        // A drain that began while this client was connecting.
        if let Some(close) = self.phase_seen(&mut phase, &broker.drain) {
            return Some(close);
        }
        let mut deadline = next_deadline(self.limit());

        loop {
            self.encode_output();
            match self.acks_resolved() {
                Ok(discards) => self.discard(discards).await,
                Err(close) => return Some(close),
            }
            let mut deliveries = Vec::new();
            let inbox = self.channel.poll_deliveries(&mut deliveries).await;
            // The inbox first: what is in it was routed while the session's
            // queue was empty, before anything now queued.
            self.deliver_inbox(inbox);
            let discards = deliveries
                .into_iter()
                .filter_map(|p| match p {
                    Outbound::Packet(p) => self.encode(p),
                    Outbound::Publish(d) => self.encode_publish(&d),
                })
                .collect();
            self.discard(discards).await;
            if let Some(close) = self.overloaded() {
                return Some(close);
            }
            if !self.outbuf.is_empty() {
                // First without waiting: a socket with room (nearly every
                // write) takes the buffer at once.
                let Ok((written, flushed)) = write_now(io, &self.outbuf) else {
                    return Some(Close {
                        reason: None,
                        will: true,
                    });
                };
                if flushed {
                    self.outbuf.clear();
                } else {
                    // Boxed: the wait for a slow client is a large future,
                    // and an idle connection should not carry its space.
                    let mut state = WriteState {
                        drain: &broker.drain,
                        kicked: &mut kicked,
                        drain_end: &mut drain_end,
                        deadline: &mut deadline,
                    };
                    let rest =
                        self.write_rest(io, written, &mut phase, &wake, write_timeout, &mut state);
                    if let Err(close) = Box::pin(rest).await {
                        return Some(close);
                    }
                }
            }
            // Nothing left over from the last read (no partial packet):
            // the buffer goes, unless the connection is busy enough to
            // refill it at once.
            let busy = self.last_read * 2 >= READ_SMALL;
            if self.inbuf.is_empty() && (!busy || self.inbuf.capacity() > 4 * READ_CHUNK) {
                self.inbuf = BytesMut::new();
            }
            tokio::select! {
                _ = phase.changed() => {
                    if let Some(close) = self.phase_seen(&mut phase, &broker.drain) {
                        return Some(close);
                    }
                    deadline = earliest(deadline, self.leave_at);
                }
                closed = kicked_off(&mut kicked) => (drain_end, deadline) = self.drain(closed),
                done = async { match self.pending.front_mut() { Some((c, _)) => c.await, None => std::future::pending().await } } => {
                    if let Err(e) = done {
                        tracing::error!(error = %e, "commit failed; closing so the client resends");
                        return Some(Close { reason: Some(DisconnectReasonCode::UnspecifiedError), will: false });
                    }
                    let discard = self.pending.pop_front().and_then(|(_, ack)| self.send_ack(ack));
                    self.discard(discard.into_iter().collect()).await;
                }
                _ = woken(&wake) => {}
                _ = until(deadline) => {
                    return Some(deadline_passed(drain_end.is_some(), self.expires, self.leave_at));
                }
                read = read_some(io, &mut self.inbuf) => {
                    match read {
                        Ok(0) | Err(_) => return Some(Close { reason: None, will: true }),
                        Ok(n) => self.last_read = n,
                    }
                    if let Some(close) = Box::pin(self.handle_buffered(broker, peer, protocol)).await {
                        return Some(close);
                    }
                    if let Some(full) = self.channel.take_pressure() {
                        // A subscriber's inbox refused what this client
                        // sent: read on once it has drained, or after PACE.
                        let _ = Box::pin(timeout(PACE, full.inbox.drained())).await;
                    }
                    deadline = match drain_end {
                        Some(end) => Some((Instant::now() + DRAIN_QUIET).min(end)),
                        None => next_deadline(self.limit()),
                    };
                }
            }
        }
    }

    /// Reads and answers the CONNECT: the protocol and the receiver a
    /// takeover of the session arrives on, or how the connection ends
    /// (`None`: nothing to clean up beyond the socket).
    async fn handshake<S>(
        &mut self,
        io: &mut S,
        broker: &Arc<Broker>,
        peer: IpAddr,
    ) -> Result<(Protocol, oneshot::Receiver<Kick>), Option<Close>>
    where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        let connect_timeout = Duration::from_secs(broker.settings.mqtt.connect_timeout_secs);
        let max_connect = broker.settings.mqtt.max_connect_packet;
        let first =
            match Box::pin(timeout(connect_timeout, self.read_connect(io, max_connect))).await {
                Ok(Ok(Some(p))) => p,
                Ok(Err(DecodeError::UnsupportedProtocol(_))) => {
                    // [MQTT-3.1.2-2] answer 0x01 in the 3.1.1 form, then close.
                    let refuse = Packet::ConnAck(ConnAck {
                        session_present: false,
                        code: ConnectReturnCode::UnsupportedProtocolVersion,
                        properties: None,
                    });
                    codec::encode(&refuse, Protocol::V4, &mut self.outbuf, None);
                    return Err(Some(Close {
                        reason: None,
                        will: false,
                    }));
                }
                Ok(Err(e)) => {
                    tracing::debug!(error = %e, "bad CONNECT");
                    if let DecodeError::TooLarge { .. } = e {
                        self.metrics.refused.count(Refusal::ConnectTooLarge);
                    }
                    return Err(None);
                }
                Ok(Ok(None)) => return Err(None),
                Err(_) => {
                    self.metrics.refused.count(Refusal::ConnectTimeout);
                    return Err(None);
                }
            };
        let (protocol, Packet::Connect(connect, will, login)) = first else {
            return Err(None);
        };
        self.protocol = Some(protocol);
        let login = login.map(|mut l| {
            // With the JWT method the token may come as Authentication
            // Data instead of the password.
            if l.password.is_empty() {
                if let Some(token) = jwt_data(&connect) {
                    l.password = token;
                }
            }
            l
        });
        let auth = match login {
            // No credentials, nothing to hash: no hop to a blocking thread
            // (each one holds a stack and a malloc arena).
            None => broker.auth.login(None, None),
            Some(l) => Box::pin(login_guard::login(broker, peer, l.username, l.password)).await,
        };
        let token_expiry = auth.as_ref().ok().and_then(|l| l.expires_at);
        let auth = auth.map(|l| l.identity);
        // Boxed, like `handle` and `close` below: an await keeps its future
        // inside this task's state for the connection's whole life, and an
        // idle connection should pay only for the wait in `select!`.
        let kicked = match Box::pin(self.channel.connect(protocol, connect, will, auth)).await {
            Ok(k) => k,
            Err(close) => {
                self.encode_output();
                return Err(Some(close));
            }
        };
        // A JWT login lasts until its token expires (or a re-authentication
        // moves that on): one more deadline, checked where keepalive is.
        self.expires = token_expiry.and_then(token_deadline);
        Ok((protocol, kicked))
    }

    /// Writes the rest of the output buffer (from `written`) to a client
    /// that did not take it at once: within the write deadline, while a
    /// takeover, shutdown, keepalive or the byte budget may still end the
    /// connection. A wake-up taken meanwhile is given back, so the loop
    /// polls the session again: without it, a message queued while a
    /// write was pending waited for the next wake-up (a subscriber missed
    /// a publish that arrived while its SUBACK was being written).
    async fn write_rest<W: AsyncWrite + Unpin>(
        &mut self,
        wr: &mut W,
        mut written: usize,
        phase: &mut watch::Receiver<Phase>,
        wake: &Option<Arc<SessionCell>>,
        write_timeout: Duration,
        state: &mut WriteState<'_>,
    ) -> Result<(), Close> {
        let broken = Close {
            reason: None,
            will: true,
        };
        // No deadline only if the configured one is past the clock's range.
        let give_up = Instant::now().checked_add(write_timeout);
        let mut flushed = false;
        let mut woke = false;
        // One `write` or `flush` per round, both cancel-safe. Flush: TLS
        // and WebSocket buffer what they are given (for TCP it costs
        // nothing), so a stuck client may block there too.
        while !flushed {
            let out = &self.outbuf;
            let step = async {
                if written < out.len() {
                    wr.write(&out[written..]).await.map(Some)
                } else {
                    wr.flush().await.map(|()| None)
                }
            };
            tokio::select! {
                step = step => match step {
                    Ok(Some(0)) | Err(_) => return Err(broken),
                    Ok(Some(n)) => written += n,
                    Ok(None) => flushed = true,
                },
                _ = until(give_up) => return Err(self.write_timed_out(write_timeout)),
                _ = phase.changed() => {
                    if let Some(close) = self.phase_seen(phase, state.drain) {
                        return Err(close);
                    }
                    *state.deadline = earliest(*state.deadline, self.leave_at);
                }
                closed = kicked_off(state.kicked) => {
                    (*state.drain_end, *state.deadline) = self.drain(closed);
                }
                _ = until(*state.deadline) => {
                    return Err(deadline_passed(state.drain_end.is_some(), self.expires, self.leave_at));
                }
                _ = woken(wake) => {
                    woke = true;
                    if let Some(close) = self.overloaded() {
                        return Err(close);
                    }
                }
            }
        }
        self.outbuf.clear();
        if let (true, Some(cell)) = (woke, wake) {
            cell.wake.notify_one();
        }
        Ok(())
    }

    /// Handles every whole packet in the input buffer; how the connection
    /// ends if one ends it.
    async fn handle_buffered(
        &mut self,
        broker: &Arc<Broker>,
        peer: IpAddr,
        protocol: Protocol,
    ) -> Option<Close> {
        loop {
            // Most of what a busy subscriber sends: applied at once.
            if let Some(ack) = codec::short_ack(&self.inbuf) {
                if let Some(applied) = self.channel.short_ack(ack) {
                    self.inbuf.advance(codec::SHORT_ACK_LEN);
                    match applied {
                        Ok(batch) => {
                            // Not awaited: the worst a crash does is a
                            // resend with DUP.
                            drop(broker.store.submit(batch).await);
                            continue;
                        }
                        Err(close) => {
                            self.encode_output();
                            return Some(close);
                        }
                    }
                }
            }
            match codec::decode_frame(&mut self.inbuf, Some(protocol), self.max_in) {
                Ok(Some((_, Frame::Auth(auth)))) => {
                    if let Err(close) = Box::pin(self.reauthenticate(broker, peer, auth)).await {
                        self.encode_output();
                        return Some(close);
                    }
                }
                Ok(Some((_, Frame::Packet(packet)))) => {
                    if matches!(packet, Packet::Publish(_)) {
                        self.metrics
                            .publishes_received
                            .fetch_add(1, Ordering::Relaxed);
                    }
                    if let Err(close) = Box::pin(self.channel.handle_batched(packet)).await {
                        Box::pin(self.channel.route_deferred()).await;
                        self.encode_output();
                        return Some(close);
                    }
                }
                Ok(None) => {
                    // The QoS 0 publishes of this read, routed together.
                    Box::pin(self.channel.route_deferred()).await;
                    return None;
                }
                Err(e) => {
                    tracing::debug!(client = self.channel.client_id(), error = %e, "closing");
                    Box::pin(self.channel.route_deferred()).await;
                    self.encode_output();
                    return Some(Close::violation(match e {
                        DecodeError::TooLarge { .. } => DisconnectReasonCode::PacketTooLarge,
                        DecodeError::Protocol(_) => DisconnectReasonCode::ProtocolError,
                        _ => DisconnectReasonCode::MalformedPacket,
                    }));
                }
            }
        }
    }

    /// Re-authentication [MQTT-4.12.1]: a client that connected with the
    /// JWT method sends AUTH 0x19 with a new token of the same user. A
    /// valid one moves the connection's end to its expiry and is answered
    /// AUTH 0x00; anything else ends the connection: AUTH without a method
    /// at CONNECT, another method, or another reason code is a protocol
    /// error, a token that does not check out (wrong, expired, another
    /// user's) is DISCONNECT 0x87. Failures count against the login
    /// limits like a bad password at CONNECT.
    async fn reauthenticate(
        &mut self,
        broker: &Arc<Broker>,
        peer: IpAddr,
        auth: Auth,
    ) -> Result<(), Close> {
        let protocol_error = Close::violation(DisconnectReasonCode::ProtocolError);
        let Some(method) = self.channel.auth_method() else {
            return Err(protocol_error);
        };
        if auth.reason != AuthReason::ReAuthenticate || auth.method.as_deref() != Some(method) {
            return Err(protocol_error);
        }
        let refused = Close::violation(DisconnectReasonCode::NotAuthorized);
        let token = auth
            .data
            .as_deref()
            .and_then(|d| std::str::from_utf8(d).ok());
        let (Some(user), Some(token)) = (self.channel.user().cloned(), token) else {
            return Err(refused);
        };
        let login = login_guard::login(broker, peer, user.to_string(), token.to_string()).await;
        match login {
            Ok(l) if l.identity.user() == Some(&user) => {
                self.expires = l.expires_at.and_then(token_deadline);
                self.metrics
                    .reauthentications
                    .fetch_add(1, Ordering::Relaxed);
                self.encode_output();
                let ok = Auth::new(AuthReason::Success, method);
                if !auth::write(&ok, &mut self.outbuf, self.channel.client_max_packet) {
                    return Err(refused);
                }
                Ok(())
            }
            _ => {
                tracing::info!(
                    client = self.channel.client_id(),
                    "re-authentication refused"
                );
                Err(refused)
            }
        }
    }

    /// Taken over: read on what the client already sent until it is quiet
    /// for DRAIN_QUIET, it disconnects, or DRAIN_MAX passes. Returns the
    /// drain's end and the next deadline.
    /// Takes in the node's phase: a stop ends the connection, a drain
    /// sets when it leaves (once; [`crate::drain::Drain::leave_at`]).
    fn phase_seen(&mut self, phase: &mut watch::Receiver<Phase>, drain: &Drain) -> Option<Close> {
        match *phase.borrow_and_update() {
            Phase::Serving => None,
            Phase::Stopping => Some(shutting_down()),
            Phase::Draining => {
                if self.leave_at.is_none() {
                    self.leave_at = Some(drain.leave_at());
                }
                None
            }
        }
    }

    /// The latest this connection may last, keepalive aside: its login's
    /// expiry, or its moment to leave a draining node.
    fn limit(&self) -> Option<Instant> {
        earliest(self.expires, self.leave_at)
    }

    fn drain(&mut self, closed: oneshot::Sender<()>) -> (Option<Instant>, Option<Instant>) {
        self.taken_over = Some(closed);
        let now = Instant::now();
        (Some(now + DRAIN_MAX), Some(now + DRAIN_QUIET))
    }

    /// The session went over its byte budget: counted, logged, closed.
    fn overloaded(&self) -> Option<Close> {
        let close = self.channel.overloaded()?;
        self.metrics
            .overload_disconnects
            .fetch_add(1, Ordering::Relaxed);
        tracing::warn!(
            client = self.channel.client_id(),
            "session over mqtt.session_queue_bytes: the client reads too slowly; disconnecting"
        );
        Some(close)
    }

    /// A write the client did not take within the deadline: counted,
    /// logged, closed (nothing more can be written to tell it why).
    fn write_timed_out(&self, after: Duration) -> Close {
        self.metrics.write_timeouts.fetch_add(1, Ordering::Relaxed);
        tracing::info!(
            client = self.channel.client_id(),
            secs = after.as_secs(),
            "client stopped reading; closing"
        );
        Close {
            reason: None,
            will: true,
        }
    }

    /// The first packet, which must be a CONNECT of at most `max_connect`
    /// bytes: it is read before the client is authenticated, so it is held
    /// to far less than the packets that follow.
    async fn read_connect<R: AsyncRead + Unpin>(
        &mut self,
        rd: &mut R,
        max_connect: usize,
    ) -> Result<Option<(Protocol, Packet)>, DecodeError> {
        let limit = self.max_in.min(max_connect);
        loop {
            if let Some(p) = codec::decode(&mut self.inbuf, None, limit)? {
                return Ok(Some(p));
            }
            match read_some(rd, &mut self.inbuf).await {
                Ok(0) | Err(_) => return Ok(None),
                Ok(_) => {}
            }
        }
    }

    /// Moves the acks at the front of the queue whose commit has already
    /// resolved into the write buffer, oldest first [MQTT-4.6.0-2], so one
    /// write carries them all (a group commit resolves many at once, and a
    /// publish with nothing to store is ready at once) instead of one
    /// `select!` round and one write each.
    fn acks_resolved(&mut self) -> Result<Vec<u16>, Close> {
        let mut discards = Vec::new();
        while let Some((commit, _)) = self.pending.front_mut() {
            match resolved(commit) {
                None => break,
                Some(Err(e)) => {
                    tracing::error!(error = %e, "commit failed; closing so the client resends");
                    return Err(Close {
                        reason: Some(DisconnectReasonCode::UnspecifiedError),
                        will: false,
                    });
                }
                Some(Ok(())) => {
                    let popped = self.pending.pop_front();
                    discards.extend(popped.and_then(|(_, ack)| self.send_ack(ack)));
                }
            }
        }
        Ok(discards)
    }

    /// Encodes an ack whose commit resolved; see [`Connection::encode`].
    fn send_ack(&mut self, ack: Packet) -> Option<u16> {
        if matches!(ack, Packet::PubAck(_)) {
            self.channel.puback_sent();
        }
        self.encode(ack)
    }

    /// Moves the channel's output into the write buffer or the ack queue.
    fn encode_output(&mut self) {
        let protocol = self.protocol.unwrap_or(Protocol::V4);
        for out in self.channel.take_output() {
            match out {
                Out::Now(p) => {
                    let written = codec::encode(
                        &p,
                        protocol,
                        &mut self.outbuf,
                        self.channel.client_max_packet,
                    );
                    if written && matches!(p, Packet::Publish(_)) {
                        self.metrics
                            .messages_delivered
                            .fetch_add(1, Ordering::Relaxed);
                    }
                }
                Out::AfterCommit(c, p) => self.pending.push_back((c, p)),
            }
        }
    }

    /// Encodes `p` into the write buffer. A QoS 1/2 PUBLISH too large for
    /// the client is not written: its packet id is returned, for
    /// [`Connection::discard`]. (Not async itself: the packet would then be
    /// held in the connection's state across every wait.)
    fn encode(&mut self, p: Packet) -> Option<u16> {
        let protocol = self.protocol.unwrap_or(Protocol::V4);
        let written = codec::encode(
            &p,
            protocol,
            &mut self.outbuf,
            self.channel.client_max_packet,
        );
        if written && matches!(p, Packet::Publish(_)) {
            self.metrics
                .messages_delivered
                .fetch_add(1, Ordering::Relaxed);
        }
        match &p {
            Packet::Publish(publish) if !written && publish.qos != QoS::AtMostOnce => {
                Some(publish.pkid)
            }
            _ => None,
        }
    }

    /// Writes the QoS 0 messages waiting in the session's inbox. One routed
    /// to many sessions is copied from the encoding they share
    /// ([`crate::message::Message::wire_qos0`]), RETAIN set in its first
    /// byte where Retain As Published asks; any other is built here. One
    /// too large for the client is left out [MQTT-3.1.2-25]; one that
    /// expired while waiting is dropped [MQTT-3.3.2-5], counted.
    fn deliver_inbox(&mut self, waiting: VecDeque<Plain>) {
        if waiting.is_empty() {
            return;
        }
        let protocol = self.protocol.unwrap_or(Protocol::V4);
        let max = self
            .channel
            .client_max_packet
            .map_or(usize::MAX, |m| m as usize);
        let now = crate::clock::now_ms();
        let (mut copied, mut expired) = (0u64, 0u64);
        for p in waiting {
            if p.msg.is_expired(now) {
                expired += 1;
                continue;
            }
            let wire = if p.shared && p.sub_ids.is_empty() {
                p.msg.wire_qos0(protocol)
            } else {
                None
            };
            match wire {
                Some(w) => {
                    if w.is_empty() || w.len() > max {
                        continue;
                    }
                    let at = self.outbuf.len();
                    self.outbuf.extend_from_slice(w);
                    if p.retain {
                        // The fixed header's RETAIN flag [MQTT-3.3.1-3].
                        self.outbuf[at] |= 0x01;
                    }
                    copied += 1;
                }
                None => {
                    // QoS 0: nothing to settle if it is too large.
                    let _ = self.encode(Packet::Publish(p.to_publish()));
                }
            }
        }
        if copied > 0 {
            self.metrics
                .messages_delivered
                .fetch_add(copied, Ordering::Relaxed);
        }
        if expired > 0 {
            self.metrics
                .messages_dropped
                .fetch_add(expired, Ordering::Relaxed);
        }
    }

    /// Tells the session the PUBLISHes `encode` left out (their packet
    /// ids) count as delivered. Takes ids, not packets, and boxes the
    /// rare work: the connection's state then holds no packet across it.
    async fn discard(&mut self, pkids: Vec<u16>) {
        for pkid in pkids {
            Box::pin(self.channel.discarded(pkid)).await;
        }
    }

    /// Encodes a QoS 1/2 PUBLISH of a shared message, copied from the
    /// encoding every delivery of it shares
    /// ([`wire_acked`](crate::message::Message::wire_acked)) with this
    /// one's packet id and flags; built for it alone if the message has
    /// none. Too large for the client: its packet id, for
    /// [`Connection::discard`] [MQTT-3.1.2-25].
    fn encode_publish(&mut self, d: &Delivery) -> Option<u16> {
        let protocol = self.protocol.unwrap_or(Protocol::V4);
        let max = self
            .channel
            .client_max_packet
            .map_or(usize::MAX, |m| m as usize);
        match d.msg.wire_acked(protocol) {
            Some(wire) if wire.len() <= max && !wire.is_empty() => {
                wire.write(&mut self.outbuf, d.qos, d.pkid, d.dup, d.retain);
                self.metrics
                    .messages_delivered
                    .fetch_add(1, Ordering::Relaxed);
                None
            }
            Some(_) => Some(d.pkid),
            None => self.encode(Packet::Publish(d.to_publish())),
        }
    }
}

/// When a token expiring at `exp` (unix seconds) ends its connection; `None`
/// if that is too far away to represent.
fn token_deadline(exp: u64) -> Option<Instant> {
    let left_ms = exp
        .saturating_mul(1000)
        .saturating_sub(crate::clock::now_ms());
    Instant::now().checked_add(Duration::from_millis(left_ms))
}

/// The token a JWT-method CONNECT carries as Authentication Data.
fn jwt_data(connect: &Connect) -> Option<String> {
    let props = connect.properties.as_ref()?;
    if props.authentication_method.as_deref() != Some(JWT_METHOD) {
        return None;
    }
    let data = props.authentication_data.as_ref()?;
    String::from_utf8(data.to_vec()).ok()
}

fn earliest(a: Option<Instant>, b: Option<Instant>) -> Option<Instant> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

/// The result of `commit` if it has already resolved, without waiting.
fn resolved(commit: &mut Commit) -> Option<Result<(), chatmq_storage::StorageError>> {
    let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
    match std::future::Future::poll(std::pin::Pin::new(commit), &mut cx) {
        std::task::Poll::Ready(r) => Some(r),
        std::task::Poll::Pending => None,
    }
}
