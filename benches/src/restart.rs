//! The restart scenario (`compare --only restart`): a chatmq data
//! directory holding `--restart-messages` chat messages (default
//! 1,000,000, in 1,000 conversations) and `--restart-sessions` persistent
//! sessions (default 100,000); chatmq is stopped on it (kill -9, then
//! again with SIGTERM) and started again, timed from process start until
//! a client is served: TCP accept, CONNACK, a `history` RPC answered
//! (which must show every message of its conversation), a chat publish
//! acked. Target: under 2 s.
//!
//! The fill takes the fast path: `storage.sync = "never"` while filling
//! (the restarts run with `"always"`), 50 publishers with 100 messages in
//! flight each; sessions are made by connecting with clean session 0
//! (MQTT 3.1.1: they get the broker's `session_expiry_max`), subscribing
//! to the user's events topic, and disconnecting.
//!
//! Mosquitto runs with `persistence false` in the comparison, so it has
//! nothing to restore: its rows are the time from process start to the
//! CONNACK of an empty broker, a floor rather than a peer figure.

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use indicatif::ProgressBar;
use serde::{Deserialize, Serialize};

use crate::client::{self, Dial, Handshaken, PayloadKind};
use crate::compare::{Binaries, Broker, Kind, JWT_SECRET};
use crate::probe::{self, Probe};
use crate::scenarios::{bounded, jwt, rss_bytes, Outcome};
use crate::stats::Window;

const CONVERSATIONS: usize = 1000;
const PUBLISHERS: usize = 50;
const INFLIGHT: usize = 100;
/// Bytes of each stored envelope.
const MESSAGE_SIZE: usize = 120;
/// A restart that serves nobody within this is reported as failed.
const GIVE_UP: Duration = Duration::from_secs(120);

/// What the data directory holds before the restart.
#[derive(Debug, Clone, Copy)]
pub struct Fill {
    pub messages: usize,
    pub sessions: usize,
}

impl Default for Fill {
    fn default() -> Self {
        Fill {
            messages: 1_000_000,
            sessions: 100_000,
        }
    }
}

/// One restart, milliseconds from process start.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct Timings {
    /// How the previous process ended: `kill -9` or `SIGTERM`.
    pub after: String,
    /// How long that took (SIGTERM: until the process exited).
    pub stop_ms: f64,
    pub listening_ms: f64,
    pub connack_ms: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub history_ms: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub publish_ack_ms: Option<f64>,
    /// The last of the above: the client has been served.
    pub served_ms: f64,
    pub stored_messages: u64,
    pub stored_sessions: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub data_bytes: Option<u64>,
    /// The broker's RSS once it served the client.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rss_bytes: Option<u64>,
}

/// Who checks that the restarted broker serves: the first publisher, in
/// its first conversation.
struct Checker {
    user: String,
    conv: String,
    /// Messages the conversation held before the restart.
    head: u64,
}

pub async fn run(bins: &Binaries, fill: &Fill, bar: &ProgressBar) -> Result<Vec<Outcome>> {
    bar.set_prefix("restart");
    let mut b = Broker::start(Kind::Chatmq { sync_always: false }, bins)?;
    let tag = format!("{:x}", probe::now_ns() % 0xff_ffff);
    let started = Instant::now();
    let (messages, checker) = fill_messages(b.addr, fill.messages, &tag, bar).await?;
    let messages_s = started.elapsed().as_secs_f64();
    let started = Instant::now();
    let sessions = fill_sessions(b.addr, fill.sessions, &tag, bar).await?;
    bar.println(format!(
        "restart: stored {messages} messages in {messages_s:.0} s, {sessions} sessions in {:.0} s",
        started.elapsed().as_secs_f64()
    ));
    b.set_sync(true)?;
    let mut out = Vec::new();
    for hard in [true, false] {
        let after = if hard { "kill -9" } else { "SIGTERM" };
        bar.set_message(format!("chatmq: restarting after {after}"));
        let stopping = Instant::now();
        b.stop(hard)?;
        let stop_ms = ms(stopping.elapsed());
        let data_bytes = dir_bytes(&b.dir().join("data")).ok();
        let start = Instant::now();
        b.respawn()?;
        let mut o = match served(b.addr, Some(&checker), start).await {
            Ok(mut t) => {
                t.rss_bytes = rss_bytes(b.pid()).ok();
                t.data_bytes = data_bytes;
                t.stored_messages = messages;
                t.stored_sessions = sessions;
                Outcome {
                    restart: Some(t),
                    ..Outcome::default()
                }
            }
            Err(e) => Outcome {
                error: Some(format!("{e:#}")),
                ..Outcome::default()
            },
        };
        if let Some(t) = &mut o.restart {
            t.after = after.into();
            t.stop_ms = stop_ms;
        }
        out.push(finish(o, "chatmq", after, sessions, bar));
    }
    drop(b);

    let mut m = Broker::start(Kind::Mosquitto, bins)?;
    for hard in [true, false] {
        let after = if hard { "kill -9" } else { "SIGTERM" };
        let stopping = Instant::now();
        m.stop(hard)?;
        let stop_ms = ms(stopping.elapsed());
        let start = Instant::now();
        m.respawn()?;
        let o = match served(m.addr, None, start).await {
            Ok(mut t) => {
                t.after = after.into();
                t.stop_ms = stop_ms;
                t.rss_bytes = rss_bytes(m.pid()).ok();
                Outcome {
                    restart: Some(t),
                    note: Some("persistence false: nothing to restore".into()),
                    ..Outcome::default()
                }
            }
            Err(e) => Outcome {
                error: Some(format!("{e:#}")),
                ..Outcome::default()
            },
        };
        out.push(finish(o, "mosquitto", after, 0, bar));
    }
    Ok(out)
}

fn finish(mut o: Outcome, broker: &str, after: &str, clients: u64, bar: &ProgressBar) -> Outcome {
    o.scenario = "restart".into();
    o.broker = broker.into();
    o.variant = Some(format!("after {after}"));
    o.clients = clients as usize;
    bar.println(
        crate::report::table(std::slice::from_ref(&o))
            .lines()
            .nth(2)
            .unwrap_or_default(),
    );
    o
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// Polls the restarting broker from `start` on until it serves: TCP
/// accept, CONNACK, then with a `checker` (chatmq) a history RPC that
/// must hold the conversation's messages and an acked chat publish.
async fn served(
    addr: std::net::SocketAddr,
    checker: Option<&Checker>,
    start: Instant,
) -> Result<Timings> {
    let deadline = start + GIVE_UP;
    let mut t = Timings::default();
    while tokio::net::TcpStream::connect(addr).await.is_err() {
        if Instant::now() > deadline {
            bail!("nothing listened on {addr} within {GIVE_UP:?}");
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    t.listening_ms = ms(start.elapsed());
    let token = match checker {
        Some(c) => Some(jwt(JWT_SECRET, &c.user)?),
        None => None,
    };
    let login = checker
        .zip(token.as_deref())
        .map(|(c, t)| (c.user.as_str(), t));
    let client_id = checker.map_or("restart-probe".to_string(), |c| format!("{}-probe", c.user));
    let mut h: Handshaken = loop {
        let dial = Dial {
            login,
            ..Dial::default()
        };
        match client::connect_with(addr, &client_id, dial).await {
            Ok(h) => break h,
            Err(e) if Instant::now() > deadline => {
                return Err(e.context(format!("no CONNACK within {GIVE_UP:?}")))
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(5)).await,
        }
    };
    t.connack_ms = ms(start.elapsed());
    t.served_ms = t.connack_ms;
    let Some(c) = checker else {
        return Ok(t);
    };
    h.subscribe(&[format!("users/{}/events", c.user)], 1)
        .await?;
    let req = serde_json::json!({"id": "h", "conv": c.conv, "limit": 50});
    let page = h.rpc("history", req).await?;
    let head = page["head"].as_u64().unwrap_or(0);
    if head < c.head {
        bail!(
            "history of {} after the restart: head {head}, {} were stored",
            c.conv,
            c.head
        );
    }
    t.history_ms = Some(ms(start.elapsed()));
    let probe = Probe {
        publisher: u32::MAX,
        seq: crate::probe::now_ns(),
        due_ns: 0,
    };
    let mut buf = Vec::new();
    probe::envelope(probe, "restart", MESSAGE_SIZE, &mut buf);
    h.publish_acked(&format!("chat/{}", c.conv), &buf).await?;
    t.publish_ack_ms = Some(ms(start.elapsed()));
    t.served_ms = ms(start.elapsed());
    let _ = h.disconnect().await;
    Ok(t)
}

/// Creates the conversations and publishes `total` messages into them;
/// how many were acked, and the checker.
async fn fill_messages(
    addr: std::net::SocketAddr,
    total: usize,
    tag: &str,
    bar: &ProgressBar,
) -> Result<(u64, Checker)> {
    let acked = Arc::new(AtomicU64::new(0));
    let ticker = {
        let (acked, bar) = (acked.clone(), bar.clone());
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_millis(500)).await;
                bar.set_message(format!(
                    "chatmq: {} of {total} messages sent",
                    acked.load(Ordering::Relaxed)
                ));
            }
        })
    };
    let jobs: Vec<usize> = (0..PUBLISHERS).collect();
    let tag_owned = tag.to_string();
    let counter = acked.clone();
    let results = bounded(jobs, PUBLISHERS, move |i| {
        let tag = tag_owned.clone();
        let acked = counter.clone();
        async move {
            let share = total / PUBLISHERS + usize::from(i < total % PUBLISHERS);
            publish_share(addr, &tag, i, share, &acked).await
        }
    })
    .await;
    ticker.abort();
    let mut stored = 0;
    for r in results {
        stored += r?;
    }
    if stored < total as u64 {
        bail!("only {stored} of {total} messages were acked");
    }
    let per_conv = total / CONVERSATIONS;
    Ok((
        stored,
        Checker {
            user: format!("f{tag}_0"),
            conv: format!("c{tag}_0"),
            head: per_conv as u64,
        },
    ))
}

/// Publisher `i`: creates its conversations, publishes `share` messages
/// round-robin over them; how many were acked.
async fn publish_share(
    addr: std::net::SocketAddr,
    tag: &str,
    i: usize,
    share: usize,
    acked: &AtomicU64,
) -> Result<u64> {
    let user = format!("f{tag}_{i}");
    let token = jwt(JWT_SECRET, &user)?;
    let dial = Dial {
        source: client::spread_source(i, addr),
        login: Some((&user, &token)),
        ..Dial::default()
    };
    let mut h = client::connect_with(addr, &user, dial).await?;
    h.subscribe(&[format!("users/{user}/events")], 1).await?;
    let mut topics = Vec::new();
    for k in (i..CONVERSATIONS).step_by(PUBLISHERS) {
        let conv = format!("c{tag}_{k}");
        let req = serde_json::json!({"id": conv, "conv": conv, "title": conv, "members": [user]});
        h.rpc("conversation.create", req).await?;
        topics.push(format!("chat/{conv}"));
    }
    let window = Window::new();
    let mut link = h.run(window, PayloadKind::Envelope, INFLIGHT);
    let mut buf = Vec::with_capacity(MESSAGE_SIZE + 64);
    let mut seq = 0usize;
    while seq < share {
        let n = link.reserve(1, 64.min(share - seq)).await;
        if n == 0 {
            bail!("publisher {i}: the connection closed after {seq} messages");
        }
        for _ in 0..n {
            let probe = Probe {
                publisher: i as u32,
                seq: seq as u64,
                due_ns: 0,
            };
            probe::envelope(probe, tag, MESSAGE_SIZE, &mut buf);
            link.publish(&topics[seq % topics.len()], 1, &buf).await?;
            seq += 1;
        }
        link.flush().await?;
        acked.fetch_add(n as u64, Ordering::Relaxed);
    }
    tokio::time::timeout(Duration::from_secs(60), link.settle(INFLIGHT))
        .await
        .map_err(|_| anyhow!("publisher {i}: acks missing 60 s after the last publish"))??;
    let r = link.finish().await;
    if r.receipts.foreign > 0 {
        bail!(
            "publisher {i}: chatmq sent {} events (rejections?) on users/{user}/events",
            r.receipts.foreign
        );
    }
    Ok(r.acks.acked)
}

/// Makes `n` persistent sessions (clean session 0, one subscription
/// each) and disconnects them; how many.
async fn fill_sessions(
    addr: std::net::SocketAddr,
    n: usize,
    tag: &str,
    bar: &ProgressBar,
) -> Result<u64> {
    let done = Arc::new(AtomicU64::new(0));
    let (counter, tag) = (done.clone(), tag.to_string());
    let bar2 = bar.clone();
    let results = bounded((0..n).collect(), 128, move |i| {
        let (done, tag, bar) = (counter.clone(), tag.clone(), bar2.clone());
        async move {
            let user = format!("s{tag}_{i}");
            let token = jwt(JWT_SECRET, &user)?;
            let dial = Dial {
                source: client::spread_source(i, addr),
                login: Some((&user, &token)),
                clean: false,
                ..Dial::default()
            };
            let mut h = client::connect_with(addr, &user, dial)
                .await
                .with_context(|| format!("session {i}"))?;
            h.subscribe(&[format!("users/{user}/events")], 1).await?;
            h.disconnect().await?;
            let d = done.fetch_add(1, Ordering::Relaxed) + 1;
            if d % 5000 == 0 {
                bar.set_message(format!("chatmq: {d} of {n} sessions stored"));
            }
            Ok(())
        }
    })
    .await;
    for r in results {
        r?;
    }
    Ok(done.load(Ordering::Relaxed))
}

/// Bytes of the files under `dir`.
fn dir_bytes(dir: &Path) -> Result<u64> {
    let mut total = 0;
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let meta = entry.metadata()?;
        total += if meta.is_dir() {
            dir_bytes(&entry.path())?
        } else {
            meta.len()
        };
    }
    Ok(total)
}
