//! One benchmark client connection: connect and subscribe in lock-step,
//! then run as a [`Link`], with a reader task (counting receipts, acking
//! QoS 1 deliveries, releasing the in-flight window on PUBACK) and a
//! writer task (coalescing frames into few writes).
//!
//! Two implementations: the lean hand-written path ([`crate::wire`]) used
//! by default, and rumqttc's `AsyncClient` (`--client rumqttc`), kept to
//! show what the client library costs on a 2-core machine.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::{mpsc, watch, Semaphore};
use tokio::task::JoinHandle;

use crate::probe::{self, now_ns, Probe};
use crate::stats::{Receipts, Sends, Tally, Window};
use crate::wire;

pub const KEEP_ALIVE: u16 = 60;
const IO_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientKind {
    Raw,
    Rumqttc,
}

/// How receivers find the probe in a payload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PayloadKind {
    Binary,
    Envelope,
}

impl PayloadKind {
    pub fn parse(self, payload: &[u8]) -> Option<Probe> {
        match self {
            PayloadKind::Binary => probe::parse_binary(payload),
            PayloadKind::Envelope => probe::parse_envelope(payload),
        }
    }
}

/// A connection that has sent CONNECT and got CONNACK, not yet running.
pub struct Handshaken {
    stream: TcpStream,
    buf: BytesMut,
    next_pkid: u16,
}

/// How a connection is opened: from which local address, with which
/// credentials, session and keep-alive.
#[derive(Debug, Clone, Copy)]
pub struct Dial<'a> {
    /// Local address to bind before connecting (spreads ports over
    /// loopback addresses); `None`: the kernel's choice.
    pub source: Option<IpAddr>,
    /// (username, password)
    pub login: Option<(&'a str, &'a str)>,
    /// MQTT 3.1.1 clean session; `false` asks for a persistent session.
    pub clean: bool,
    /// Seconds; 0 asks for none (the broker may impose its maximum).
    pub keep_alive: u16,
}

impl Default for Dial<'_> {
    fn default() -> Self {
        Dial {
            source: None,
            login: None,
            clean: true,
            keep_alive: KEEP_ALIVE,
        }
    }
}

/// The local address the `i`-th of many connections to `broker` binds:
/// 127.0.0.2 to 127.0.0.40 in turn when the broker is on IPv4 loopback,
/// so that hundreds of thousands of connections do not run out of
/// ephemeral ports on one source address.
pub fn spread_source(i: usize, broker: SocketAddr) -> Option<IpAddr> {
    match broker.ip() {
        IpAddr::V4(ip) if ip.is_loopback() => {
            Some(IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2 + (i % 39) as u8)))
        }
        _ => None,
    }
}

/// Opens a TCP connection and completes CONNECT/CONNACK (clean session,
/// keep-alive [`KEEP_ALIVE`]).
pub async fn connect(
    addr: SocketAddr,
    client_id: &str,
    login: Option<(&str, &str)>,
) -> Result<Handshaken> {
    connect_with(
        addr,
        client_id,
        Dial {
            login,
            ..Dial::default()
        },
    )
    .await
}

/// Opens a TCP connection as `dial` says and completes CONNECT/CONNACK.
pub async fn connect_with(addr: SocketAddr, client_id: &str, dial: Dial<'_>) -> Result<Handshaken> {
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    if let Some(ip) = dial.source {
        socket
            .bind(SocketAddr::new(ip, 0))
            .with_context(|| format!("binding the local address {ip}"))?;
    }
    let stream = tokio::time::timeout(IO_TIMEOUT, socket.connect(addr))
        .await
        .map_err(|_| anyhow!("connect to {addr} timed out"))?
        .with_context(|| format!("connecting to {addr}"))?;
    stream.set_nodelay(true)?;
    let mut h = Handshaken {
        stream,
        buf: BytesMut::with_capacity(4096),
        next_pkid: 1,
    };
    let mut out = BytesMut::new();
    wire::connect(&mut out, client_id, dial.login, dial.clean, dial.keep_alive);
    h.stream.write_all(&out).await?;
    let f = h.expect(wire::CONNACK).await?;
    match f.body.get(1) {
        Some(0) => Ok(h),
        Some(code) => bail!("CONNACK refused {client_id}: return code {code}"),
        None => bail!("short CONNACK"),
    }
}

impl Handshaken {
    async fn read_frame(&mut self) -> Result<wire::Frame> {
        loop {
            if let Some(f) = wire::next_frame(&mut self.buf).map_err(|e| anyhow!(e))? {
                return Ok(f);
            }
            let n = tokio::time::timeout(IO_TIMEOUT, self.stream.read_buf(&mut self.buf))
                .await
                .map_err(|_| anyhow!("broker did not answer within {IO_TIMEOUT:?}"))??;
            if n == 0 {
                bail!("broker closed the connection");
            }
        }
    }

    /// Waits for a packet of `kind`, acking QoS 1 deliveries on the way.
    async fn expect(&mut self, kind: u8) -> Result<wire::Frame> {
        loop {
            let f = self.read_frame().await?;
            if f.kind == kind {
                return Ok(f);
            }
            self.ack_if_needed(&f).await?;
        }
    }

    async fn ack_if_needed(&mut self, f: &wire::Frame) -> Result<()> {
        if f.kind == wire::PUBLISH {
            let (_, qos, pkid, _) = wire::parse_publish(f).map_err(|e| anyhow!(e))?;
            if qos > 0 {
                let mut out = BytesMut::new();
                wire::puback(&mut out, pkid);
                self.stream.write_all(&out).await?;
            }
        }
        Ok(())
    }

    fn pkid(&mut self) -> u16 {
        let id = self.next_pkid;
        self.next_pkid = if id == u16::MAX { 1 } else { id + 1 };
        id
    }

    /// Subscribes and waits for SUBACK; fails if any filter was refused.
    pub async fn subscribe(&mut self, filters: &[String], qos: u8) -> Result<()> {
        if filters.is_empty() {
            return Ok(());
        }
        let mut out = BytesMut::new();
        let pkid = self.pkid();
        wire::subscribe(&mut out, pkid, filters, qos);
        self.stream.write_all(&out).await?;
        let f = self.expect(wire::SUBACK).await?;
        if f.body.iter().skip(2).any(|&c| c >= 0x80) {
            bail!("SUBACK refused one of {filters:?}");
        }
        Ok(())
    }

    /// chatmq RPC (DESIGN §4): publishes `request` on `rpc/{method}` and
    /// waits for the reply on `users/{user}/events`, which the caller must
    /// have subscribed to.
    pub async fn rpc(
        &mut self,
        method: &str,
        request: serde_json::Value,
    ) -> Result<serde_json::Value> {
        let id = request.get("id").cloned().unwrap_or_default();
        let mut out = BytesMut::new();
        let pkid = self.pkid();
        wire::publish(
            &mut out,
            &format!("rpc/{method}"),
            1,
            pkid,
            request.to_string().as_bytes(),
        );
        self.stream.write_all(&out).await?;
        loop {
            let f = self.read_frame().await?;
            self.ack_if_needed(&f).await?;
            if f.kind != wire::PUBLISH {
                continue;
            }
            let (_, _, _, payload) = wire::parse_publish(&f).map_err(|e| anyhow!(e))?;
            let Ok(v) = serde_json::from_slice::<serde_json::Value>(&payload) else {
                continue;
            };
            if v["type"] == "rpc" && v["id"] == id {
                if v["ok"] != true {
                    bail!("rpc/{method} failed: {}", v["error"]);
                }
                return Ok(v["result"].clone());
            }
        }
    }

    /// Publishes `payload` on `topic` at QoS 1 and waits for its PUBACK.
    pub async fn publish_acked(&mut self, topic: &str, payload: &[u8]) -> Result<()> {
        let mut out = BytesMut::new();
        let pkid = self.pkid();
        wire::publish(&mut out, topic, 1, pkid, payload);
        self.stream.write_all(&out).await?;
        loop {
            let f = self.expect(wire::PUBACK).await?;
            if wire::packet_id(&f) == pkid {
                return Ok(());
            }
        }
    }

    /// Sends DISCONNECT and closes: a persistent session stays stored.
    pub async fn disconnect(mut self) -> Result<()> {
        let mut out = BytesMut::new();
        wire::disconnect(&mut out);
        self.stream.write_all(&out).await?;
        self.stream.shutdown().await?;
        Ok(())
    }

    /// Starts the reader and writer tasks.
    pub fn run(self, window: Arc<Window>, payload: PayloadKind, inflight: usize) -> Link {
        let (rd, wr) = self.stream.into_split();
        let (tx, rx) = mpsc::channel::<Bytes>(256);
        let (stop, stop_rx) = watch::channel(false);
        let permits = Arc::new(Semaphore::new(inflight));
        let sent_at: Arc<Vec<AtomicU64>> =
            Arc::new((0..=u16::MAX).map(|_| AtomicU64::new(0)).collect());
        let writer = tokio::spawn(write_loop(wr, rx));
        let reader = tokio::spawn(read_loop(
            rd,
            self.buf,
            tx.clone(),
            stop_rx,
            window,
            payload,
            permits.clone(),
            sent_at.clone(),
        ));
        Link::Raw(RawLink {
            tx,
            stop,
            permits,
            sent_at,
            next_pkid: self.next_pkid,
            pending: BytesMut::new(),
            reader,
            writer,
        })
    }

    /// Keeps the connection open doing nothing (idle and storm scenarios).
    pub fn into_stream(self) -> TcpStream {
        self.stream
    }

    /// The receiving side of a member that only listens (the large
    /// group's thousands): one task, a small buffer that grows only for a
    /// burst, QoS 1 deliveries acked in one write per read, every receipt
    /// counted into the shared `tally`. Abort the task to stop it.
    pub fn receive(
        mut self,
        window: Arc<Window>,
        tally: Arc<Tally>,
        payload: PayloadKind,
    ) -> JoinHandle<()> {
        tokio::spawn(async move {
            let mut acks = BytesMut::new();
            let mut due = Vec::new();
            loop {
                if self.buf.capacity() - self.buf.len() < 1024 {
                    self.buf.reserve(4096);
                }
                match self.stream.read_buf(&mut self.buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(_) => {}
                }
                while let Ok(Some(f)) = wire::next_frame(&mut self.buf) {
                    if f.kind != wire::PUBLISH {
                        continue;
                    }
                    let Ok((_, qos, pkid, body)) = wire::parse_publish(&f) else {
                        return;
                    };
                    if qos > 0 {
                        wire::puback(&mut acks, pkid);
                    }
                    due.push(payload.parse(&body).map(|p| p.due_ns));
                }
                tally.record(&window, &due);
                due.clear();
                if !acks.is_empty() && self.stream.write_all(&acks.split()).await.is_err() {
                    return;
                }
            }
        })
    }
}

/// What a link's receiving side returns when it stops.
pub struct Received {
    pub receipts: Receipts,
    pub acks: Sends,
}

async fn write_loop(mut wr: tokio::net::tcp::OwnedWriteHalf, mut rx: mpsc::Receiver<Bytes>) {
    let mut buf = BytesMut::with_capacity(64 * 1024);
    loop {
        let first =
            match tokio::time::timeout(Duration::from_secs(u64::from(KEEP_ALIVE) / 2), rx.recv())
                .await
            {
                Ok(Some(b)) => b,
                Ok(None) => break,
                Err(_) => {
                    wire::pingreq(&mut buf);
                    buf.split().freeze()
                }
            };
        let chunk = match rx.try_recv() {
            Err(_) => first,
            Ok(second) => {
                buf.extend_from_slice(&first);
                buf.extend_from_slice(&second);
                while buf.len() < 256 * 1024 {
                    match rx.try_recv() {
                        Ok(b) => buf.extend_from_slice(&b),
                        Err(_) => break,
                    }
                }
                buf.split().freeze()
            }
        };
        if wr.write_all(&chunk).await.is_err() {
            return;
        }
    }
    let _ = wr.shutdown().await;
}

#[allow(clippy::too_many_arguments)]
async fn read_loop(
    mut rd: tokio::net::tcp::OwnedReadHalf,
    mut buf: BytesMut,
    tx: mpsc::Sender<Bytes>,
    mut stop: watch::Receiver<bool>,
    window: Arc<Window>,
    payload: PayloadKind,
    permits: Arc<Semaphore>,
    sent_at: Arc<Vec<AtomicU64>>,
) -> Received {
    let mut out = Received {
        receipts: Receipts::default(),
        acks: Sends::default(),
    };
    let mut acks = BytesMut::new();
    buf.reserve(64 * 1024);
    loop {
        tokio::select! {
            _ = stop.changed() => break,
            n = rd.read_buf(&mut buf) => match n {
                Ok(0) | Err(_) => break,
                Ok(_) => {}
            },
        }
        let mut got = 0;
        loop {
            let f = match wire::next_frame(&mut buf) {
                Ok(Some(f)) => f,
                Ok(None) => break,
                Err(_) => return out,
            };
            match f.kind {
                wire::PUBLISH => {
                    let Ok((_, qos, pkid, body)) = wire::parse_publish(&f) else {
                        return out;
                    };
                    if qos > 0 {
                        wire::puback(&mut acks, pkid);
                    }
                    out.receipts.record(payload.parse(&body), &window);
                    got += 1;
                }
                wire::PUBACK => {
                    let at = sent_at[wire::packet_id(&f) as usize].load(Ordering::Relaxed);
                    let _ = out
                        .acks
                        .ack_latency
                        .record((now_ns().saturating_sub(at) / 1000).max(1));
                    out.acks.acked += 1;
                    permits.add_permits(1);
                }
                _ => {}
            }
        }
        if got > 0 {
            window.received.fetch_add(got, Ordering::Relaxed);
        }
        if !acks.is_empty() && tx.send(acks.split().freeze()).await.is_err() {
            break;
        }
        if buf.capacity() - buf.len() < 16 * 1024 {
            buf.reserve(64 * 1024);
        }
    }
    out
}

/// A running client: publish through it, then `finish` to collect what
/// its receiving side counted.
pub enum Link {
    Raw(RawLink),
    Rumqttc(RumqttcLink),
}

pub struct RawLink {
    tx: mpsc::Sender<Bytes>,
    stop: watch::Sender<bool>,
    permits: Arc<Semaphore>,
    sent_at: Arc<Vec<AtomicU64>>,
    next_pkid: u16,
    pending: BytesMut,
    reader: JoinHandle<Received>,
    writer: JoinHandle<()>,
}

pub struct RumqttcLink {
    client: rumqttc::AsyncClient,
    stop: watch::Sender<bool>,
    events: JoinHandle<Received>,
}

impl Link {
    /// Waits until at least one message may be sent, and returns how many
    /// of `want` may be sent now (QoS 1: the free in-flight window).
    pub async fn reserve(&mut self, qos: u8, want: usize) -> usize {
        match self {
            Link::Raw(l) if qos > 0 => {
                let mut n = match l.permits.clone().acquire_owned().await {
                    Ok(p) => {
                        p.forget();
                        1
                    }
                    Err(_) => return 0,
                };
                while n < want {
                    match l.permits.try_acquire() {
                        Ok(p) => {
                            p.forget();
                            n += 1;
                        }
                        Err(_) => break,
                    }
                }
                n
            }
            _ => want,
        }
    }

    /// Waits until every message sent at QoS 1 was acknowledged (the
    /// whole in-flight window of `inflight` is free again).
    pub async fn settle(&mut self, inflight: usize) -> Result<()> {
        if let Link::Raw(l) = self {
            let all = l
                .permits
                .acquire_many(inflight as u32)
                .await
                .map_err(|_| anyhow!("connection closed"))?;
            drop(all);
        }
        Ok(())
    }

    /// Queues one PUBLISH (rumqttc: hands it to the client).
    pub async fn publish(&mut self, topic: &str, qos: u8, payload: &[u8]) -> Result<()> {
        match self {
            Link::Raw(l) => {
                let pkid = if qos > 0 {
                    let id = l.next_pkid;
                    l.next_pkid = if id == u16::MAX { 1 } else { id + 1 };
                    l.sent_at[id as usize].store(now_ns(), Ordering::Relaxed);
                    id
                } else {
                    0
                };
                wire::publish(&mut l.pending, topic, qos, pkid, payload);
                Ok(())
            }
            Link::Rumqttc(l) => {
                let q = if qos > 0 {
                    rumqttc::QoS::AtLeastOnce
                } else {
                    rumqttc::QoS::AtMostOnce
                };
                l.client
                    .publish(topic, q, false, payload.to_vec())
                    .await
                    .context("rumqttc publish")
            }
        }
    }

    /// Sends what `publish` queued.
    pub async fn flush(&mut self) -> Result<()> {
        if let Link::Raw(l) = self {
            if !l.pending.is_empty() {
                l.tx.send(l.pending.split().freeze())
                    .await
                    .map_err(|_| anyhow!("connection closed"))?;
            }
        }
        Ok(())
    }

    /// Disconnects and returns what was received.
    pub async fn finish(self) -> Received {
        match self {
            Link::Raw(l) => {
                let _ = l.stop.send(true);
                let received = l.reader.await.unwrap_or_else(|_| Received {
                    receipts: Receipts::default(),
                    acks: Sends::default(),
                });
                let mut out = BytesMut::new();
                wire::disconnect(&mut out);
                let _ = l.tx.send(out.freeze()).await;
                drop(l.tx);
                let _ = tokio::time::timeout(Duration::from_secs(2), l.writer).await;
                received
            }
            Link::Rumqttc(l) => {
                let _ = l.stop.send(true);
                let received = l.events.await.unwrap_or_else(|_| Received {
                    receipts: Receipts::default(),
                    acks: Sends::default(),
                });
                let _ = l.client.try_disconnect();
                received
            }
        }
    }
}

/// The rumqttc path: connects, subscribes, and polls the event loop in a task.
pub async fn rumqttc_link(
    addr: SocketAddr,
    client_id: &str,
    filters: &[String],
    qos: u8,
    window: Arc<Window>,
    payload: PayloadKind,
    inflight: usize,
) -> Result<Link> {
    use rumqttc::{Event, Incoming, MqttOptions, QoS};
    let mut opts = MqttOptions::new(client_id, addr.ip().to_string(), addr.port());
    opts.set_keep_alive(Duration::from_secs(u64::from(KEEP_ALIVE)));
    opts.set_inflight(inflight.min(u16::MAX as usize) as u16);
    opts.set_max_packet_size(1 << 20, 1 << 20);
    let (client, mut events) = rumqttc::AsyncClient::new(opts, 256);
    let q = if qos > 0 {
        QoS::AtLeastOnce
    } else {
        QoS::AtMostOnce
    };
    for f in filters {
        client.subscribe(f, q).await?;
    }
    let mut subacks = 0;
    let mut connected = false;
    while !connected || subacks < filters.len() {
        match tokio::time::timeout(IO_TIMEOUT, events.poll()).await {
            Ok(Ok(Event::Incoming(Incoming::ConnAck(_)))) => connected = true,
            Ok(Ok(Event::Incoming(Incoming::SubAck(_)))) => subacks += 1,
            Ok(Ok(_)) => {}
            Ok(Err(e)) => bail!("rumqttc {client_id}: {e}"),
            Err(_) => bail!("rumqttc {client_id}: no CONNACK/SUBACK"),
        }
    }
    let (stop, mut stop_rx) = watch::channel(false);
    let task = tokio::spawn(async move {
        let mut out = Received {
            receipts: Receipts::default(),
            acks: Sends::default(),
        };
        loop {
            let ev = tokio::select! {
                _ = stop_rx.changed() => break,
                ev = events.poll() => ev,
            };
            match ev {
                Ok(Event::Incoming(Incoming::Publish(p))) => {
                    out.receipts.record(payload.parse(&p.payload), &window);
                    window.received.fetch_add(1, Ordering::Relaxed);
                }
                Ok(Event::Incoming(Incoming::PubAck(_))) => out.acks.acked += 1,
                Ok(_) => {}
                Err(_) => break,
            }
        }
        out
    });
    Ok(Link::Rumqttc(RumqttcLink {
        client,
        stop,
        events: task,
    }))
}
