//! The large-group scenario (chatmq's chat only: `run group --group-size N
//! --jwt-secret S`): one conversation of N members, each its own MQTT
//! connection and JWT user, into which a few members publish open loop;
//! beside it a small conversation publishing at a modest rate, whose
//! PUBLISH→PUBACK latency is measured twice: before the group exists, and
//! during its fan-out. It answers two questions: how fast does chatmq
//! deliver to a huge group, and does that fan-out starve everyone else's
//! commits?
//!
//! The members are lean receivers ([`Handshaken::receive`]): one task and
//! a small buffer each, counting into one shared [`Tally`]. Only the few
//! publishers run as full [`Link`]s.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Result};
use indicatif::ProgressBar;
use tokio::task::JoinSet;

use crate::client::{self, Dial, Handshaken, PayloadKind};
use crate::probe::now_ns;
use crate::scenarios::{bounded, jwt, messages, Outcome, Params, Publisher, Scenario};
use crate::stats::{percentiles, Receipts, Sends, Tally, Window};

/// Members of the small conversation, and what they publish together.
const SMALL_MEMBERS: usize = 3;
const SMALL_RATE: f64 = 30.0;
/// Members of the large group that publish into it.
const PUBLISHERS: usize = 4;
/// Without `--rate`, the group is asked for this many deliveries per
/// second (its publish rate is this divided by its size).
const DEFAULT_DELIVERIES: f64 = 100_000.0;
/// The group's window outlasts the small conversation's run by this,
/// which covers the small conversation's connecting and subscribing.
const SLACK: Duration = Duration::from_millis(1500);

pub async fn run(p: &Params, bar: &ProgressBar) -> Result<Outcome> {
    let secret = p
        .jwt_secret
        .clone()
        .ok_or_else(|| anyhow!("the group scenario is chatmq's chat layer: pass --jwt-secret"))?;
    let n = p.group_size.max(PUBLISHERS);
    let rate = p.rate.unwrap_or(DEFAULT_DELIVERIES / n as f64);

    bar.set_message("group: the small conversation alone");
    let idle = small_conversation(p, "a", bar).await?;

    let (conv, members) = join_group(p, &secret, n, bar).await?;
    let topic = format!("chat/{conv}");
    let window = Window::new();
    let tally = Tally::new();
    let mut receivers = Vec::with_capacity(members.len());
    let mut links = Vec::with_capacity(PUBLISHERS);
    for (i, h) in members.into_iter().enumerate() {
        if i < PUBLISHERS {
            links.push(h.run(window.clone(), PayloadKind::Envelope, p.inflight));
        } else {
            receivers.push(h.receive(window.clone(), tally.clone(), PayloadKind::Envelope));
        }
    }

    let t0 = now_ns();
    let start = t0 + p.warmup.as_nanos() as u64;
    let length = p.warmup + p.duration + SLACK;
    let end = start + length.as_nanos() as u64;
    window.start_ns.store(start, Ordering::Relaxed);
    window.end_ns.store(end, Ordering::Relaxed);
    let period_ns = (1e9 * PUBLISHERS as f64 / rate.max(1e-3)) as u64;
    let mut tasks = JoinSet::new();
    for (i, link) in links.into_iter().enumerate() {
        let job = Publisher {
            topic: topic.clone(),
            number: i as u32,
            qos: 1,
            size: p.payload_size,
            payload: PayloadKind::Envelope,
            run: p.run_id.clone(),
            period_ns: Some(period_ns),
            t0,
            end,
            window: window.clone(),
        };
        tasks.spawn(job.run(link));
    }
    bar.set_message(format!("group of {n}: warming up at {rate:.0} msg/s"));
    tokio::time::sleep(p.warmup).await;
    let loaded = small_conversation(p, "b", bar).await?;

    bar.set_message(format!("group of {n}: finishing the window"));
    let mut sends = Sends::default();
    let mut done = Vec::new();
    while let Some(joined) = tasks.join_next().await {
        let (link, s) = joined.map_err(|e| anyhow!("publisher task: {e}"))?;
        sends.merge(s);
        done.push(link);
    }
    let expected = sends.sent * n as u64;
    drain(&window, expected, bar).await;

    let mut receipts = Receipts::default();
    for link in done {
        let r = link.finish().await;
        receipts.merge(r.receipts);
        sends.merge(r.acks);
    }
    for r in &receivers {
        r.abort();
    }
    let received = receipts.unique + tally.received.load(Ordering::Relaxed);
    let in_window = receipts.in_window + tally.in_window.load(Ordering::Relaxed);
    let mut latency = tally
        .latency
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .clone();
    let _ = latency.add(&receipts.latency);
    let secs = length.as_secs_f64();
    let settled = settle(p, &secret, bar).await?;
    Ok(Outcome {
        rate: Some(rate),
        throughput: Some(in_window as f64 / secs),
        published_per_s: Some(sends.sent_in_window as f64 / secs),
        sent: sends.sent,
        expected,
        received,
        drops: expected.saturating_sub(received),
        duplicates: receipts.duplicates + received.saturating_sub(expected),
        latency_us: percentiles(&latency),
        ack_latency_us: percentiles(&sends.ack_latency),
        small_ack_idle_us: idle,
        small_ack_loaded_us: loaded,
        small_rate: Some(SMALL_RATE),
        variant: Some(format!("{n} members")),
        note: Some(format!(
            "after the {n} members disconnected, a CONNECT was answered after {settled:.1} s"
        )),
        ..Outcome::default()
    })
}

/// The small conversation's run (the chat scenario with one group of
/// three at a fixed rate); its PUBLISH→PUBACK percentiles.
///
/// It runs on a thread and runtime of its own: on the shared runtime its
/// PUBACK would wait behind the thousands of member tasks the generator
/// is busy reading, and the figure would measure the generator's queue,
/// not the broker's. Its own thread is mostly idle, so the OS schedules
/// it as soon as its socket is readable.
async fn small_conversation(p: &Params, tag: &str, bar: &ProgressBar) -> Result<Option<[u64; 3]>> {
    let mut s = Params::new(Scenario::Chat, p.addr);
    s.groups = 1;
    s.group_size = SMALL_MEMBERS;
    s.rate = Some(SMALL_RATE);
    s.warmup = p.warmup;
    s.duration = p.duration;
    s.payload_size = p.payload_size;
    s.jwt_secret = p.jwt_secret.clone();
    s.run_id = format!("{}{tag}", p.run_id);
    let bar = bar.clone();
    let (tx, rx) = tokio::sync::oneshot::channel();
    std::thread::Builder::new()
        .name("small-conversation".into())
        .spawn(move || {
            let run = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(anyhow::Error::from)
                .and_then(|rt| rt.block_on(messages(&s, &bar)));
            let _ = tx.send(run);
        })?;
    let o = rx
        .await
        .map_err(|_| anyhow!("the small conversation's thread ended without a result"))??;
    if o.ack_latency_us.is_none() {
        bail!("the small conversation got no PUBACK");
    }
    Ok(o.ack_latency_us)
}

/// Connects `n` members (source addresses spread over loopback), has the
/// first create the conversation with all of them by RPC, subscribes
/// every one; the conversation's id and the members' connections.
async fn join_group(
    p: &Params,
    secret: &str,
    n: usize,
    bar: &ProgressBar,
) -> Result<(String, Vec<Handshaken>)> {
    // Short ids: the create request lists every member and must stay
    // under mqtt.max_payload (256 KiB) at 10,000 members.
    let tag: String = p.run_id.chars().rev().take(6).collect();
    let conv = format!("g{tag}");
    let users: Vec<String> = (0..n).map(|i| format!("g{tag}_{i}")).collect();
    let started = Instant::now();
    bar.set_message(format!("group of {n}: connecting the members"));
    let addr = p.addr;
    let jobs: Vec<(usize, String, String)> = users
        .iter()
        .enumerate()
        .map(|(i, u)| Ok((i, u.clone(), jwt(secret, u)?)))
        .collect::<Result<_>>()?;
    let connected = bounded(jobs, 64, move |(i, user, token)| async move {
        let dial = Dial {
            source: client::spread_source(i, addr),
            login: Some((&user, &token)),
            // Lean receivers never ping: ask for no keep-alive.
            keep_alive: 0,
            ..Dial::default()
        };
        client::connect_with(addr, &user, dial).await
    })
    .await;
    let mut members = Vec::with_capacity(n);
    for (i, c) in connected.into_iter().enumerate() {
        members.push(c.map_err(|e| e.context(format!("member {i} of {n}")))?);
    }
    let connect_s = started.elapsed().as_secs_f64();

    bar.set_message(format!("group of {n}: creating the conversation"));
    let creator = &mut members[0];
    creator
        .subscribe(&[format!("users/{}/events", users[0])], 1)
        .await?;
    let req = serde_json::json!({"id": "create", "conv": conv, "title": conv, "members": users});
    creator.rpc("conversation.create", req).await?;

    bar.set_message(format!("group of {n}: subscribing"));
    let filter = vec![format!("chat/{conv}")];
    let subscribed = bounded(members, 64, move |mut h| {
        let filter = filter.clone();
        async move {
            h.subscribe(&filter, 1).await?;
            Ok(h)
        }
    })
    .await;
    let mut ready = Vec::with_capacity(n);
    for s in subscribed {
        ready.push(s?);
    }
    bar.println(format!(
        "group of {n}: members connected in {connect_s:.1} s, ready after {:.1} s",
        started.elapsed().as_secs_f64()
    ));
    Ok((conv, ready))
}

/// Waits until the broker answers a CONNECT again once the members are
/// gone (it closes thousands of sessions at once), so that whatever runs
/// next does not measure that; how long it took, seconds.
async fn settle(p: &Params, secret: &str, bar: &ProgressBar) -> Result<f64> {
    bar.set_message("group: waiting for the broker to close the sessions");
    let started = Instant::now();
    let user = format!("{}settle", p.run_id);
    let token = jwt(secret, &user)?;
    tokio::time::sleep(Duration::from_millis(200)).await;
    loop {
        let login = Some((user.as_str(), token.as_str()));
        let probe = client::connect(p.addr, &user, login);
        if let Ok(Ok(h)) = tokio::time::timeout(Duration::from_secs(1), probe).await {
            let _ = h.disconnect().await;
            return Ok(started.elapsed().as_secs_f64());
        }
        if started.elapsed() > Duration::from_secs(60) {
            bail!("the broker did not answer a CONNECT within 60 s of the members leaving");
        }
    }
}

/// Waits until `expected` deliveries arrived or they stop coming (500 ms
/// without one, 10 s at most).
async fn drain(window: &Window, expected: u64, bar: &ProgressBar) {
    bar.set_message("group: draining");
    let until = Instant::now() + Duration::from_secs(10);
    let mut last = window.received.load(Ordering::Relaxed);
    let mut still = Instant::now();
    while Instant::now() < until && last < expected {
        tokio::time::sleep(Duration::from_millis(50)).await;
        let now = window.received.load(Ordering::Relaxed);
        if now != last {
            last = now;
            still = Instant::now();
        } else if still.elapsed() > Duration::from_millis(500) {
            break;
        }
    }
}
