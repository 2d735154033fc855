//! The connection-scale scenario (`run scale --clients N [--step S]
//! [--pid PID]`): opens idle MQTT connections, aiming at `--clients`
//! (default 1,000,000), and every `--step` of them records the broker's
//! resident memory per connection, the connect rate over the step, and
//! what the kernel and this process hold, until the target is reached or
//! something gives: the broker refuses or stops answering, a file
//! descriptor limit, or the machine's free memory falling under
//! `--min-free-mb` (so the run never takes the machine down with it).
//!
//! The sockets are held cheaply: each connection sends CONNECT (clean
//! session, keep-alive 0), reads CONNACK, and is then taken out of the
//! runtime as a plain `std::net::TcpStream`: a file descriptor and nothing
//! else, no task, no buffer. Source addresses are spread over
//! 127.0.0.2..127.0.0.40 so that ephemeral ports do not run out.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{anyhow, Result};
use indicatif::ProgressBar;
use serde::{Deserialize, Serialize};
use tokio::task::JoinSet;

use crate::client::{self, Dial};
use crate::scenarios::{rss_bytes, Outcome, Params};

/// Connections being opened at once.
const WIDTH: usize = 128;
/// Free memory is checked this often (connections), between checkpoints too.
const GUARD_EVERY: usize = 5_000;

/// The state of the run after `connections` were open.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct Checkpoint {
    pub connections: usize,
    /// Since the first connect.
    pub seconds: f64,
    /// Over the step that ended here.
    pub connects_per_s: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub broker_rss_bytes: Option<u64>,
    /// The broker's RSS growth since before the first connect, per connection.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rss_per_connection_bytes: Option<f64>,
    /// This process (the load generator).
    pub load_rss_bytes: u64,
    /// MemAvailable of the machine.
    pub mem_available_bytes: u64,
    /// What the machine lost beyond the two processes' RSS growth, per
    /// connection: mostly the kernel's two sockets per connection.
    pub other_per_connection_bytes: f64,
}

/// Knobs of the scale run beyond [`Params`].
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub step: usize,
    pub min_free_bytes: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            step: 50_000,
            min_free_bytes: 2 << 30,
        }
    }
}

pub async fn run(p: &Params, bar: &ProgressBar) -> Result<Outcome> {
    let limits = p.scale;
    let step = limits.step.max(1);
    // Keep a few descriptors for /proc reads and the runtime: hitting
    // this process's own limit would measure the load generator.
    let own_limit = open_files_limit().map(|l| l.saturating_sub(64));
    let target = own_limit.map_or(p.clients, |l| p.clients.min(l));
    let base = Sample::take(p.pid)?;
    let held: Arc<Mutex<Vec<std::net::TcpStream>>> =
        Arc::new(Mutex::new(Vec::with_capacity(p.clients.min(2_000_000))));
    let mut checkpoints: Vec<Checkpoint> = Vec::new();
    let started = Instant::now();
    let mut stopped: Option<String> = None;
    let mut open = 0usize;
    let tag: String = p.run_id.chars().rev().take(6).collect();
    let mut step_started = (Instant::now(), 0usize);
    while open < target && stopped.is_none() {
        let next_checkpoint = ((open / step) + 1) * step;
        let chunk_end = (open + GUARD_EVERY).min(next_checkpoint).min(target);
        stopped = open_range(p, &tag, open, chunk_end, &held).await;
        open = lock(&held).len();
        let now = Sample::take(p.pid)?;
        bar.set_message(format!(
            "scale: {open} connections, {:.1} GiB available",
            now.available as f64 / (1u64 << 30) as f64
        ));
        if open >= next_checkpoint || open >= target || stopped.is_some() {
            let secs = step_started.0.elapsed().as_secs_f64();
            let rate = (open - step_started.1) as f64 / secs.max(1e-3);
            // Let the broker finish what the last connects started.
            tokio::time::sleep(Duration::from_millis(300)).await;
            let c = Sample::take(p.pid)?.checkpoint(&base, open, started, rate);
            bar.println(describe(&c));
            checkpoints.push(c);
            step_started = (Instant::now(), open);
        }
        if stopped.is_none() && now.available < limits.min_free_bytes {
            stopped = Some(format!(
                "stopped at {open} connections: the machine had {} MiB available, under --min-free-mb {}",
                now.available >> 20,
                limits.min_free_bytes >> 20
            ));
        }
    }
    if stopped.is_none() && open < p.clients {
        stopped = Some(format!(
            "stopped at {open} connections: this process may open {} files (ulimit -n)",
            own_limit.map_or(0, |l| l + 64)
        ));
    }
    let total_s = started.elapsed().as_secs_f64();
    let last = checkpoints.last();
    let outcome = Outcome {
        received: open as u64,
        connects_per_s: Some(open as f64 / total_s.max(1e-3)),
        rss_per_connection_bytes: last.and_then(|c| c.rss_per_connection_bytes),
        refused: stopped,
        note: Some(fd_limits(p.pid)),
        clients: open,
        checkpoints,
        ..Outcome::default()
    };
    bar.set_message(format!("scale: closing {open} connections"));
    let held = std::mem::take(&mut *lock(&held));
    drop(held);
    tokio::time::sleep(Duration::from_secs(1)).await;
    Ok(outcome)
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Opens connections `from..to`, WIDTH at a time, into `held`; why it
/// stopped early, if it did.
async fn open_range(
    p: &Params,
    tag: &str,
    from: usize,
    to: usize,
    held: &Arc<Mutex<Vec<std::net::TcpStream>>>,
) -> Option<String> {
    let next = Arc::new(AtomicUsize::new(from));
    let failure: Arc<Mutex<Option<String>>> = Arc::new(Mutex::new(None));
    let mut set = JoinSet::new();
    for _ in 0..WIDTH.min(to - from) {
        let (next, failure, held) = (next.clone(), failure.clone(), held.clone());
        let (addr, tag) = (p.addr, tag.to_string());
        set.spawn(async move {
            loop {
                if lock(&failure).is_some() {
                    return;
                }
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= to {
                    return;
                }
                let dial = Dial {
                    source: client::spread_source(i, addr),
                    keep_alive: 0,
                    ..Dial::default()
                };
                let opened = client::connect_with(addr, &format!("k{tag}{i}"), dial)
                    .await
                    .and_then(|h| Ok(h.into_stream().into_std()?));
                match opened {
                    Ok(s) => lock(&held).push(s),
                    Err(e) => {
                        lock(&failure)
                            .get_or_insert_with(|| format!("connection {i} failed: {e:#}"));
                        return;
                    }
                }
            }
        });
    }
    while set.join_next().await.is_some() {}
    let why = lock(&failure).take();
    why.map(|w| format!("after {} connections, {w}", lock(held).len()))
}

/// Memory figures read at one moment.
struct Sample {
    broker: Option<u64>,
    load: u64,
    available: u64,
}

impl Sample {
    fn take(pid: Option<u32>) -> Result<Sample> {
        Ok(Sample {
            broker: pid.map(rss_bytes).transpose()?,
            load: rss_bytes(std::process::id())?,
            available: mem_available()?,
        })
    }

    fn checkpoint(&self, base: &Sample, n: usize, started: Instant, rate: f64) -> Checkpoint {
        let per = |grown: u64| grown as f64 / n.max(1) as f64;
        let broker_growth = match (self.broker, base.broker) {
            (Some(now), Some(then)) => now.saturating_sub(then),
            _ => 0,
        };
        let load_growth = self.load.saturating_sub(base.load);
        let lost = base.available.saturating_sub(self.available);
        Checkpoint {
            connections: n,
            seconds: started.elapsed().as_secs_f64(),
            connects_per_s: rate,
            broker_rss_bytes: self.broker,
            rss_per_connection_bytes: self.broker.map(|_| per(broker_growth)),
            load_rss_bytes: self.load,
            mem_available_bytes: self.available,
            other_per_connection_bytes: per(lost.saturating_sub(broker_growth + load_growth)),
        }
    }
}

fn describe(c: &Checkpoint) -> String {
    let kib = |b: f64| b / 1024.0;
    format!(
        "scale: {:>8} connections at {:>7.0} conn/s, broker {} , load {:.0} MiB, other {:.1} KiB/conn, {:.1} GiB available",
        c.connections,
        c.connects_per_s,
        match (c.broker_rss_bytes, c.rss_per_connection_bytes) {
            (Some(r), Some(per)) => format!("{:.0} MiB ({:.2} KiB/conn)", r as f64 / 1048576.0, kib(per)),
            _ => "-".into(),
        },
        c.load_rss_bytes as f64 / 1048576.0,
        kib(c.other_per_connection_bytes),
        c.mem_available_bytes as f64 / (1u64 << 30) as f64,
    )
}

fn mem_available() -> Result<u64> {
    let info = std::fs::read_to_string("/proc/meminfo")?;
    info.lines()
        .find_map(|l| l.strip_prefix("MemAvailable:"))
        .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
        .map(|kb| kb * 1024)
        .ok_or_else(|| anyhow!("no MemAvailable in /proc/meminfo"))
}

/// This process's soft limit on open files (`ulimit -n`).
fn open_files_limit() -> Option<usize> {
    let limits = std::fs::read_to_string("/proc/self/limits").ok()?;
    limits
        .lines()
        .find(|l| l.starts_with("Max open files"))?
        .split_whitespace()
        .nth(3)?
        .parse()
        .ok()
}

/// The open-file limits of this process and of the broker, which bound
/// the run before memory does on many machines.
fn fd_limits(pid: Option<u32>) -> String {
    let of = |who: &str| {
        std::fs::read_to_string(format!("/proc/{who}/limits"))
            .ok()
            .and_then(|l| {
                l.lines()
                    .find(|l| l.starts_with("Max open files"))
                    .map(|l| {
                        l.split_whitespace()
                            .skip(3)
                            .take(2)
                            .collect::<Vec<_>>()
                            .join("/")
                    })
            })
            .unwrap_or_else(|| "?".into())
    };
    let mut s = format!("open files (soft/hard): load {}", of("self"));
    if let Some(pid) = pid {
        s.push_str(&format!(", broker {}", of(&pid.to_string())));
    }
    s
}
