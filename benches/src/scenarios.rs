//! The scenarios: who connects, who subscribes to what, who publishes
//! where, and how the run is timed.
//!
//! A message scenario connects every client, subscribes them, starts the
//! publishers together, discards a warm-up, counts receipts during the
//! window, stops the publishers and drains. Throughput is what receivers
//! got inside the window; drops are deliveries owed (sent x receivers per
//! message) that never arrived; latency is measured from the time each
//! message was due, so in open loop (`rate`) a stall delays every message
//! scheduled behind it and shows in the percentiles.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Result};
use indicatif::ProgressBar;
use serde::{Deserialize, Serialize};
use tokio::task::JoinSet;

use crate::client::{self, ClientKind, Handshaken, Link, PayloadKind};
use crate::probe::{self, now_ns, Probe};
use crate::stats::{percentiles, Receipts, Sends, Window};
use crate::transport::{self, Transport};
use crate::{group, scale};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Scenario {
    Pairs,
    Fanin,
    Fanout,
    Chat,
    Storm,
    Idle,
    Group,
    Scale,
}

impl Scenario {
    pub fn parse(s: &str) -> Result<Scenario> {
        Ok(match s {
            "pairs" => Scenario::Pairs,
            "fanin" | "fan-in" => Scenario::Fanin,
            "fanout" | "fan-out" => Scenario::Fanout,
            "chat" => Scenario::Chat,
            "storm" => Scenario::Storm,
            "idle" => Scenario::Idle,
            "group" => Scenario::Group,
            "scale" => Scenario::Scale,
            other => bail!(
                "unknown scenario `{other}` (pairs, fanin, fanout, chat, storm, idle, group, scale)"
            ),
        })
    }

    pub fn name(self) -> &'static str {
        match self {
            Scenario::Pairs => "pairs",
            Scenario::Fanin => "fanin",
            Scenario::Fanout => "fanout",
            Scenario::Chat => "chat",
            Scenario::Storm => "storm",
            Scenario::Idle => "idle",
            Scenario::Group => "group",
            Scenario::Scale => "scale",
        }
    }
}

/// Everything a run needs to know.
#[derive(Debug, Clone)]
pub struct Params {
    pub scenario: Scenario,
    pub addr: SocketAddr,
    /// More brokers (the nodes of a cluster): client `i` connects to
    /// `addr` and these in turn (raw client only).
    pub more_addrs: Vec<SocketAddr>,
    pub qos: u8,
    /// Pairs, publishers (fan-in), subscribers (fan-out), connections (idle, storm cap).
    pub clients: usize,
    pub groups: usize,
    pub group_size: usize,
    pub payload_size: usize,
    pub warmup: Duration,
    pub duration: Duration,
    /// Open loop: total messages per second over all publishers.
    pub rate: Option<f64>,
    pub inflight: usize,
    pub client: ClientKind,
    /// chatmq: groups are created by RPC and members log in with a JWT.
    pub jwt_secret: Option<String>,
    /// The broker process, for the idle scenario's RSS.
    pub pid: Option<u32>,
    /// Connection scale: checkpoint step and free-memory floor.
    pub scale: scale::Limits,
    /// Names the setting of this run in its outcome (see [`Outcome::variant`]).
    pub variant: Option<String>,
    /// How the idle scenario's connections reach the broker.
    pub transport: Transport,
    /// Makes topics, client ids and message ids unique to this run.
    pub run_id: String,
}

impl Params {
    pub fn new(scenario: Scenario, addr: SocketAddr) -> Params {
        let (clients, qos) = match scenario {
            Scenario::Pairs => (10, 1),
            Scenario::Fanin => (20, 1),
            Scenario::Fanout => (50, 0),
            Scenario::Chat => (0, 1),
            Scenario::Storm => (10_000, 0),
            Scenario::Idle => (2_000, 0),
            Scenario::Group => (0, 1),
            Scenario::Scale => (1_000_000, 0),
        };
        Params {
            scenario,
            addr,
            more_addrs: Vec::new(),
            qos,
            clients,
            groups: 10,
            group_size: 5,
            payload_size: 64,
            warmup: Duration::from_millis(500),
            duration: Duration::from_secs(3),
            rate: None,
            inflight: 100,
            client: ClientKind::Raw,
            jwt_secret: None,
            pid: None,
            scale: scale::Limits::default(),
            variant: None,
            transport: Transport::Tcp,
            run_id: format!("r{:x}", now_ns() ^ u64::from(std::process::id())),
        }
    }
}

/// The result of one run, as printed and as JSON (which `plot` reads back).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct Outcome {
    pub scenario: String,
    pub broker: String,
    pub qos: u8,
    pub clients: usize,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rate: Option<f64>,
    /// Messages received per second inside the window (all receivers).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub throughput: Option<f64>,
    /// Messages published per second inside the window.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub published_per_s: Option<f64>,
    pub sent: u64,
    pub expected: u64,
    pub received: u64,
    pub drops: u64,
    pub duplicates: u64,
    /// Delivery latency from due time, µs: p50, p99, p99.9.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub latency_us: Option<[u64; 3]>,
    /// PUBLISH to PUBACK, µs: p50, p99, p99.9 (chat: the commit latency).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ack_latency_us: Option<[u64; 3]>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub connects_per_s: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub refused: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rss_per_connection_bytes: Option<f64>,
    /// Large group: the small conversation's PUBLISH→PUBACK, µs (p50,
    /// p99, p99.9), alone and during the group's fan-out, and its rate.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub small_ack_idle_us: Option<[u64; 3]>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub small_ack_loaded_us: Option<[u64; 3]>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub small_rate: Option<f64>,
    /// Connection scale: the measurements taken every `--step` connections.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub checkpoints: Vec<scale::Checkpoint>,
    /// Restart: how long from process start until a client was served.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub restart: Option<crate::restart::Timings>,
    /// Which setting of the scenario this row is (`10000 members`, `1
    /// core`, `after kill -9`); part of the key rows compare under.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub variant: Option<String>,
    /// CPU time the broker process used during the run, seconds.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub broker_cpu_s: Option<f64>,
    /// CPU time this load generator used during the run, seconds.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub load_cpu_s: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Something the reader of the figure should know (a broker restarted
    /// after a crash, ...).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
}

/// Runs one scenario against one broker.
pub async fn run(p: &Params, broker: &str, bar: &ProgressBar) -> Outcome {
    let mut out = match p.scenario {
        Scenario::Storm => storm(p, bar).await,
        Scenario::Idle => idle(p, bar).await,
        Scenario::Group => group::run(p, bar).await,
        Scenario::Scale => scale::run(p, bar).await,
        _ => messages(p, bar).await,
    }
    .unwrap_or_else(|e| Outcome {
        error: Some(format!("{e:#}")),
        ..Outcome::default()
    });
    out.scenario = p.scenario.name().into();
    out.broker = broker.into();
    out.qos = p.qos;
    out.clients = match p.scenario {
        Scenario::Chat => p.groups * p.group_size,
        Scenario::Group => p.group_size,
        Scenario::Scale => out.clients,
        _ => p.clients,
    };
    out.rate = out.rate.or(p.rate);
    out.variant = out.variant.take().or_else(|| p.variant.clone());
    out
}

struct Role {
    client_id: String,
    user: Option<String>,
    subscribe: Vec<String>,
    /// (topic, publisher number)
    publish: Option<(String, u32)>,
    /// chatmq chat: (conv, members) this client creates by RPC first.
    creates: Option<(String, Vec<String>)>,
}

fn roles(p: &Params) -> (Vec<Role>, u64) {
    let run = &p.run_id;
    let role = |client_id: String, subscribe: Vec<String>, publish| Role {
        client_id,
        user: None,
        subscribe,
        publish,
        creates: None,
    };
    match p.scenario {
        Scenario::Pairs => {
            let mut v = Vec::new();
            for i in 0..p.clients {
                let topic = format!("bench/{run}/pair/{i}");
                v.push(role(format!("{run}-s{i}"), vec![topic.clone()], None));
                v.push(role(format!("{run}-p{i}"), vec![], Some((topic, i as u32))));
            }
            (v, 1)
        }
        Scenario::Fanin => {
            let topic = format!("bench/{run}/fanin");
            let mut v = vec![role(format!("{run}-s0"), vec![topic.clone()], None)];
            for i in 0..p.clients {
                v.push(role(
                    format!("{run}-p{i}"),
                    vec![],
                    Some((topic.clone(), i as u32)),
                ));
            }
            (v, 1)
        }
        Scenario::Fanout => {
            let topic = format!("bench/{run}/fanout");
            let mut v: Vec<Role> = (0..p.clients)
                .map(|i| role(format!("{run}-s{i}"), vec![topic.clone()], None))
                .collect();
            v.push(role(format!("{run}-p0"), vec![], Some((topic, 0))));
            (v, p.clients as u64)
        }
        Scenario::Chat => {
            let mut v = Vec::new();
            for g in 0..p.groups {
                let conv = format!("{run}-g{g}");
                let topic = format!("chat/{conv}");
                let members: Vec<String> = (0..p.group_size)
                    .map(|m| format!("{run}g{g}m{m}"))
                    .collect();
                for (m, user) in members.iter().enumerate() {
                    let number = (g * p.group_size + m) as u32;
                    let mut r = role(
                        format!("{user}-c"),
                        vec![topic.clone()],
                        Some((topic.clone(), number)),
                    );
                    if p.jwt_secret.is_some() {
                        r.user = Some(user.clone());
                        if m == 0 {
                            r.creates = Some((conv.clone(), members.clone()));
                        }
                    }
                    v.push(r);
                }
            }
            (v, p.group_size as u64)
        }
        Scenario::Storm | Scenario::Idle | Scenario::Group | Scenario::Scale => (Vec::new(), 0),
    }
}

/// An HS256 JWT for `user`, valid for an hour (DESIGN §4 Authentication).
pub fn jwt(secret: &str, user: &str) -> Result<String> {
    #[derive(Serialize)]
    struct Claims<'a> {
        sub: &'a str,
        exp: u64,
    }
    let exp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
        + 3600;
    let token = jsonwebtoken::encode(
        &jsonwebtoken::Header::default(),
        &Claims { sub: user, exp },
        &jsonwebtoken::EncodingKey::from_secret(secret.as_bytes()),
    )?;
    Ok(token)
}

/// Runs `f` over `items` with at most `width` at a time, in order.
pub(crate) async fn bounded<T, R, F, Fut>(items: Vec<T>, width: usize, f: F) -> Vec<Result<R>>
where
    T: Send + 'static,
    R: Send + 'static,
    F: Fn(T) -> Fut,
    Fut: std::future::Future<Output = Result<R>> + Send + 'static,
{
    let mut results: Vec<Option<Result<R>>> = (0..items.len()).map(|_| None).collect();
    let mut set = JoinSet::new();
    for (i, item) in items.into_iter().enumerate() {
        if set.len() >= width {
            if let Some(Ok((j, r))) = set.join_next().await {
                results[j] = Some(r);
            }
        }
        let fut = f(item);
        set.spawn(async move { (i, fut.await) });
    }
    while let Some(joined) = set.join_next().await {
        if let Ok((j, r)) = joined {
            results[j] = Some(r);
        }
    }
    results
        .into_iter()
        .map(|r| r.unwrap_or_else(|| Err(anyhow!("task failed"))))
        .collect()
}

pub(crate) async fn messages(p: &Params, bar: &ProgressBar) -> Result<Outcome> {
    let (roles, fan) = roles(p);
    let payload = if p.scenario == Scenario::Chat {
        PayloadKind::Envelope
    } else {
        PayloadKind::Binary
    };
    let window = Window::new();
    bar.set_message(format!(
        "{} q{}: connecting {} clients",
        p.scenario.name(),
        p.qos,
        roles.len()
    ));

    let mut links: Vec<(Link, Option<(String, u32)>)> = Vec::with_capacity(roles.len());
    if p.client == ClientKind::Rumqttc {
        if p.scenario == Scenario::Chat {
            bail!("--client rumqttc runs the plain scenarios only");
        }
        for r in roles {
            let link = client::rumqttc_link(
                p.addr,
                &r.client_id,
                &r.subscribe,
                p.qos,
                window.clone(),
                payload,
                p.inflight,
            )
            .await?;
            links.push((link, r.publish));
        }
    } else {
        let addrs: Arc<Vec<SocketAddr>> = Arc::new(
            std::iter::once(p.addr)
                .chain(p.more_addrs.iter().copied())
                .collect(),
        );
        let secret = p.jwt_secret.clone();
        let roles = Arc::new(roles);
        let idx: Vec<usize> = (0..roles.len()).collect();
        let shared = roles.clone();
        let connected = bounded(idx.clone(), 32, move |i| {
            let roles = shared.clone();
            let secret = secret.clone();
            let addr = addrs[i % addrs.len()];
            async move {
                let r = &roles[i];
                let login = match (&r.user, &secret) {
                    (Some(u), Some(s)) => Some((u.clone(), jwt(s, u)?)),
                    _ => None,
                };
                let mut h = client::connect(addr, &r.client_id, login.as_ref().map(|(u, t)| (u.as_str(), t.as_str()))).await?;
                if let (Some((conv, members)), Some(user)) = (&r.creates, &r.user) {
                    h.subscribe(&[format!("users/{user}/events")], 1).await?;
                    let req = serde_json::json!({"id": "create", "conv": conv, "title": conv, "members": members});
                    h.rpc("conversation.create", req).await?;
                }
                Ok(h)
            }
        })
        .await;
        let mut hs: Vec<Handshaken> = Vec::with_capacity(connected.len());
        for c in connected {
            hs.push(c?);
        }
        bar.set_message(format!("{} q{}: subscribing", p.scenario.name(), p.qos));
        // Every conversation exists now: members may subscribe.
        let qos = p.qos;
        let pairs: Vec<(usize, Handshaken)> = hs.into_iter().enumerate().collect();
        let shared = roles.clone();
        let subscribed = bounded(pairs, 32, move |(i, mut h)| {
            let roles = shared.clone();
            async move {
                h.subscribe(&roles[i].subscribe, qos).await?;
                Ok(h)
            }
        })
        .await;
        for (i, h) in subscribed.into_iter().enumerate() {
            links.push((
                h?.run(window.clone(), payload, p.inflight),
                roles[i].publish.clone(),
            ));
        }
    }
    // Let routers that apply subscriptions asynchronously catch up.
    tokio::time::sleep(Duration::from_millis(200)).await;

    let publishers = links
        .iter()
        .filter(|(_, plan)| plan.is_some())
        .count()
        .max(1);
    let period_ns = p
        .rate
        .map(|r| (1e9 * publishers as f64 / r.max(1e-3)) as u64);
    let t0 = now_ns();
    let start = t0 + p.warmup.as_nanos() as u64;
    let end = start + p.duration.as_nanos() as u64;
    window.start_ns.store(start, Ordering::Relaxed);
    window.end_ns.store(end, Ordering::Relaxed);

    let mut tasks = JoinSet::new();
    let mut idle_links = Vec::new();
    for (link, plan) in links {
        match plan {
            Some((topic, number)) => {
                let job = Publisher {
                    topic,
                    number,
                    qos: p.qos,
                    size: p.payload_size,
                    payload,
                    run: p.run_id.clone(),
                    period_ns,
                    t0,
                    end,
                    window: window.clone(),
                };
                tasks.spawn(job.run(link));
            }
            None => idle_links.push(link),
        }
    }
    let label = format!("{} q{}", p.scenario.name(), p.qos);
    let ticker = tokio::spawn(progress(
        window.clone(),
        bar.clone(),
        label.clone(),
        t0,
        end,
    ));
    let mut sends = Sends::default();
    let mut done_links = Vec::new();
    while let Some(joined) = tasks.join_next().await {
        let (link, s) = joined.map_err(|e| anyhow!("publisher task: {e}"))?;
        sends.merge(s);
        done_links.push(link);
    }
    ticker.abort();

    // Drain: until receipts stop for 300 ms (2 s at most for QoS 0, 5 s for QoS 1).
    bar.set_message(format!("{label}: draining"));
    let expected = sends.sent * fan;
    let drain_until = Instant::now() + Duration::from_secs(if p.qos == 0 { 2 } else { 5 });
    let mut last = window.received.load(Ordering::Relaxed);
    let mut still = Instant::now();
    while Instant::now() < drain_until && last < expected {
        tokio::time::sleep(Duration::from_millis(50)).await;
        let now = window.received.load(Ordering::Relaxed);
        if now != last {
            last = now;
            still = Instant::now();
        } else if still.elapsed() > Duration::from_millis(300) {
            break;
        }
    }

    let mut receipts = Receipts::default();
    for link in done_links.into_iter().chain(idle_links) {
        let r = link.finish().await;
        receipts.merge(r.receipts);
        sends.merge(r.acks);
    }
    let secs = p.duration.as_secs_f64();
    Ok(Outcome {
        throughput: Some(receipts.in_window as f64 / secs),
        published_per_s: Some(sends.sent_in_window as f64 / secs),
        sent: sends.sent,
        expected,
        received: receipts.unique,
        drops: expected.saturating_sub(receipts.unique),
        duplicates: receipts.duplicates,
        latency_us: percentiles(&receipts.latency),
        ack_latency_us: percentiles(&sends.ack_latency),
        ..Outcome::default()
    })
}

/// One publishing connection's plan: where, how big, how fast, until when.
pub(crate) struct Publisher {
    pub topic: String,
    pub number: u32,
    pub qos: u8,
    pub size: usize,
    pub payload: PayloadKind,
    pub run: String,
    /// Open loop: nanoseconds between messages; `None`: closed loop.
    pub period_ns: Option<u64>,
    /// `now_ns` when the first message is due.
    pub t0: u64,
    /// `now_ns` when publishing stops.
    pub end: u64,
    pub window: Arc<Window>,
}

impl Publisher {
    /// Closed loop: as fast as the connection (QoS 0) or the in-flight
    /// window (QoS 1) allows. Open loop: each message at its due time,
    /// stamped with that time even when it leaves late.
    pub async fn run(self, mut link: Link) -> (Link, Sends) {
        const BURST: usize = 64;
        let mut sends = Sends::default();
        let mut next_due = self.t0;
        let mut seq = 0u64;
        let mut buf = Vec::with_capacity(self.size + 64);
        loop {
            let now = now_ns();
            if now >= self.end {
                break;
            }
            let want = match self.period_ns {
                Some(period) => {
                    if next_due > now {
                        tokio::time::sleep(Duration::from_nanos(
                            (next_due - now).min(self.end - now),
                        ))
                        .await;
                        continue;
                    }
                    (((now - next_due) / period.max(1)) as usize + 1).min(BURST)
                }
                None => BURST,
            };
            let n = link.reserve(self.qos, want).await;
            if n == 0 {
                break;
            }
            let now = now_ns();
            if now >= self.end {
                break;
            }
            for _ in 0..n {
                let due = match self.period_ns {
                    Some(period) => {
                        let d = next_due;
                        next_due += period;
                        d
                    }
                    None => now,
                };
                let probe = Probe {
                    publisher: self.number,
                    seq,
                    due_ns: due,
                };
                match self.payload {
                    PayloadKind::Binary => probe::binary(probe, self.size, &mut buf),
                    PayloadKind::Envelope => probe::envelope(probe, &self.run, self.size, &mut buf),
                }
                if link.publish(&self.topic, self.qos, &buf).await.is_err() {
                    return (link, sends);
                }
                seq += 1;
                sends.sent += 1;
                if self.window.contains(due) {
                    sends.sent_in_window += 1;
                }
            }
            if link.flush().await.is_err() {
                break;
            }
        }
        (link, sends)
    }
}

async fn progress(window: Arc<Window>, bar: ProgressBar, label: String, t0: u64, end: u64) {
    let mut last = (now_ns(), window.received.load(Ordering::Relaxed));
    loop {
        tokio::time::sleep(Duration::from_millis(250)).await;
        let now = (now_ns(), window.received.load(Ordering::Relaxed));
        let rate = (now.1 - last.1) as f64 / ((now.0 - last.0) as f64 / 1e9);
        let left = end.saturating_sub(now.0) as f64 / 1e9;
        let phase = if now.0 < window.start_ns.load(Ordering::Relaxed) {
            "warm-up"
        } else {
            "measuring"
        };
        bar.set_message(format!(
            "{label}: {phase}, {rate:.0} msg/s received, {left:.1} s left"
        ));
        let _ = t0;
        last = now;
    }
}

/// Connects as fast as it can (`width` connections in flight at once),
/// holding every connection, until the broker refuses one, `clients`
/// are open, or the time is up.
async fn storm(p: &Params, bar: &ProgressBar) -> Result<Outcome> {
    let width = 64;
    let deadline = Instant::now() + p.duration;
    let next = Arc::new(AtomicUsize::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let refused = Arc::new(std::sync::Mutex::new(None::<String>));
    let started = Instant::now();
    let mut set = JoinSet::new();
    bar.set_message(format!("storm: connecting up to {}", p.clients));
    for _ in 0..width {
        let (next, stop, refused) = (next.clone(), stop.clone(), refused.clone());
        let (addr, max, run) = (p.addr, p.clients, p.run_id.clone());
        set.spawn(async move {
            let mut held = Vec::new();
            let mut last = Duration::ZERO;
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= max || stop.load(Ordering::Relaxed) || Instant::now() >= deadline {
                    break;
                }
                match client::connect(addr, &format!("{run}-st{i}"), None).await {
                    Ok(h) => {
                        held.push(h.into_stream());
                        last = started.elapsed();
                    }
                    Err(e) => {
                        stop.store(true, Ordering::Relaxed);
                        let mut r = refused.lock().unwrap_or_else(|e| e.into_inner());
                        r.get_or_insert_with(|| format!("after {i} connections: {e:#}"));
                        break;
                    }
                }
            }
            (held, last)
        });
    }
    let mut held = Vec::new();
    let mut last = Duration::ZERO;
    while let Some(Ok((h, l))) = set.join_next().await {
        held.extend(h);
        last = last.max(l);
    }
    let n = held.len();
    drop(held);
    // Let the broker clean up before the next run.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let refused = refused.lock().unwrap_or_else(|e| e.into_inner()).clone();
    Ok(Outcome {
        connects_per_s: Some(n as f64 / last.as_secs_f64().max(1e-3)),
        received: n as u64,
        refused,
        ..Outcome::default()
    })
}

/// Resident memory of a process, bytes (VmRSS in /proc/PID/status).
pub fn rss_bytes(pid: u32) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
        .map(|kb| kb * 1024)
        .ok_or_else(|| anyhow!("no VmRSS in /proc/{pid}/status"))
}

/// Opens `clients` connections that then do nothing, over `p.transport`,
/// and reports how much the broker's resident memory grew per connection.
async fn idle(p: &Params, bar: &ProgressBar) -> Result<Outcome> {
    let pid = p
        .pid
        .ok_or_else(|| anyhow!("the idle scenario needs --pid (the broker's process id)"))?;
    bar.set_message(format!("idle: opening {} connections", p.clients));
    tokio::time::sleep(Duration::from_millis(300)).await;
    let before = rss_bytes(pid)?;
    let (addr, run) = (p.addr, p.run_id.clone());
    let transport = Arc::new(p.transport.clone());
    let opened = bounded((0..p.clients).collect(), 32, move |i| {
        let (run, transport) = (run.clone(), transport.clone());
        async move { transport::open(&transport, addr, &format!("{run}-i{i}")).await }
    })
    .await;
    let mut held = Vec::with_capacity(opened.len());
    for o in opened {
        held.push(o?);
    }
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let after = rss_bytes(pid)?;
    drop(held);
    Ok(Outcome {
        received: p.clients as u64,
        rss_per_connection_bytes: Some(after.saturating_sub(before) as f64 / p.clients as f64),
        ..Outcome::default()
    })
}
