//! `chatmq-load compare`: starts chatmq, Mosquitto and rumqttd on free
//! loopback ports, runs the same scenarios against each, alternating the
//! order from one scenario to the next so a change in machine load hits
//! every broker alike, and reports each figure with its ratio to
//! Mosquitto, then the issue's targets as met or missed.
//!
//! Fairness: Mosquitto runs with persistence off, `set_tcp_nodelay true`,
//! and chatmq's in-flight window and offline queue limit
//! (`max_inflight_messages 100`, `max_queued_messages 1000`); rumqttd
//! with the same in-flight count and payload limit. chatmq runs with its
//! defaults (`storage.sync = "always"`), anonymous access plus an ACL
//! granting `#` for the plain scenarios, and JWT users for chat.

use std::io::{BufRead, BufReader};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use indicatif::{ProgressBar, ProgressStyle};

use crate::report;
use crate::scenarios::{self, Outcome, Params, Scenario};

pub const JWT_SECRET: &str = "chatmq-bench-secret";
const INFLIGHT: usize = 100;
const QUEUED: usize = 1000;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Chatmq { sync_always: bool },
    Mosquitto,
    Rumqttd,
}

pub struct Binaries {
    pub chatmq: PathBuf,
    pub mosquitto: PathBuf,
    pub rumqttd: Option<PathBuf>,
}

pub struct Broker {
    pub name: String,
    pub kind: Kind,
    pub addr: SocketAddr,
    child: Child,
    dir: PathBuf,
}

impl Drop for Broker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl Broker {
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn start(kind: Kind, bins: &Binaries) -> Result<Broker> {
        let port = free_port()?;
        let addr: SocketAddr = ([127, 0, 0, 1], port).into();
        let name = match kind {
            Kind::Chatmq { sync_always: true } => "chatmq",
            Kind::Chatmq { sync_always: false } => "chatmq-sync-never",
            Kind::Mosquitto => "mosquitto",
            Kind::Rumqttd => "rumqttd",
        };
        let dir =
            std::env::temp_dir().join(format!("chatmq-bench-{}-{name}-{port}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let mut cmd = match kind {
            Kind::Chatmq { sync_always } => {
                let conf = dir.join("chatmq.toml");
                std::fs::write(&conf, chatmq_config(&dir, addr, sync_always))?;
                let mut c = Command::new(&bins.chatmq);
                c.arg("serve")
                    .arg("--config")
                    .arg(&conf)
                    .env("RUST_LOG", "warn");
                c
            }
            Kind::Mosquitto => {
                let conf = dir.join("mosquitto.conf");
                std::fs::write(&conf, mosquitto_config(addr))?;
                let mut c = Command::new(&bins.mosquitto);
                c.arg("-c").arg(&conf);
                c
            }
            Kind::Rumqttd => {
                let conf = dir.join("rumqttd.toml");
                std::fs::write(&conf, rumqttd_config(addr))?;
                let bin = bins
                    .rumqttd
                    .as_ref()
                    .ok_or_else(|| anyhow!("no rumqttd binary given"))?;
                let mut c = Command::new(bin);
                c.arg(&conf);
                c
            }
        };
        let spawned = std::fs::File::create(dir.join("stderr.log")).and_then(|log| {
            cmd.current_dir(&dir)
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(Stdio::from(log))
                .spawn()
        });
        let child = match spawned {
            Ok(c) => c,
            Err(e) => {
                let _ = std::fs::remove_dir_all(&dir);
                return Err(e)
                    .with_context(|| format!("starting {name} ({:?})", cmd.get_program()));
            }
        };
        let mut broker = Broker {
            name: name.into(),
            kind,
            addr,
            child,
            dir,
        };
        broker.wait_ready()?;
        Ok(broker)
    }

    fn wait_ready(&mut self) -> Result<()> {
        // Drain stdout in the background so the broker never blocks on it.
        if let Some(out) = self.child.stdout.take() {
            std::thread::spawn(move || for _ in BufReader::new(out).lines() {});
        }
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if let Some(status) = self.child.try_wait()? {
                let log = std::fs::read_to_string(self.dir.join("stderr.log")).unwrap_or_default();
                bail!(
                    "{} exited ({status}) before listening: {}",
                    self.name,
                    log.trim()
                );
            }
            if TcpStream::connect_timeout(&self.addr, Duration::from_millis(100)).is_ok() {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        bail!("{} did not listen on {} within 30 s", self.name, self.addr)
    }
}

impl Broker {
    /// Does the broker still answer a CONNECT? (rumqttd 0.20's router
    /// thread can panic while the process lives on.)
    async fn healthy(&self) -> bool {
        let probe = crate::client::connect(self.addr, "chatmq-bench-health", None);
        matches!(
            tokio::time::timeout(Duration::from_secs(3), probe).await,
            Ok(Ok(_))
        )
    }

    /// The first line of its stderr that says why it failed, if any.
    fn failure(&self) -> Option<String> {
        let log = std::fs::read_to_string(self.dir.join("stderr.log")).ok()?;
        log.lines()
            .find(|l| l.contains("panicked") || l.contains("error") || l.contains("Error"))
            .map(|l| l.trim().chars().take(160).collect())
    }
}

/// Runs `p` against `b`, first replacing `b` with a fresh process if it
/// stopped answering; the outcome then says so.
async fn measure(
    b: &mut Broker,
    bins: &Binaries,
    mut p: Params,
    bar: &ProgressBar,
) -> Result<Outcome> {
    let mut note = None;
    if !b.healthy().await {
        let why = b.failure().unwrap_or_else(|| "no answer to CONNECT".into());
        note = Some(format!("{} was restarted before this run: {why}", b.name));
        *b = Broker::start(b.kind, bins)?;
    }
    p.addr = b.addr;
    let mut o = scenarios::run(&p, &b.name, bar).await;
    if o.error.is_some() {
        if let Some(why) = b.failure() {
            o.note = Some(why);
        }
    }
    if o.note.is_none() {
        o.note = note;
    }
    bar.println(line(Some(&o)));
    Ok(o)
}

fn free_port() -> Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

fn chatmq_config(dir: &Path, addr: SocketAddr, sync_always: bool) -> String {
    format!(
        r##"[node]
data_dir = "{data}"
[mqtt]
listen = "{addr}"
max_inflight = {INFLIGHT}
max_offline_messages = {QUEUED}
# Every load client comes from 127.0.0.1: no per-address limits.
max_connections_per_ip = 0
accept_rate_per_ip = 0
# Neither peer limits publish rates: these are far above what the load
# can reach, so the engines are compared, not a limit.
publish_rate = 1000000000
publish_burst = 1000000000
publish_bytes_rate = 1000000000000
publish_bytes_burst = 1000000000000
user_publish_rate = 1000000000
user_publish_burst = 1000000000
user_publish_bytes_rate = 1000000000000
user_publish_bytes_burst = 1000000000000
[http]
listen = "127.0.0.1:0"
[websocket]
enabled = false
[auth]
allow_anonymous = true
jwt_secret = "{JWT_SECRET}"
[[acl.rules]]
user = "*"
topic = "#"
access = "pubsub"
[storage]
sync = "{sync}"
"##,
        data = dir.join("data").display(),
        sync = if sync_always { "always" } else { "never" },
    )
}

fn mosquitto_config(addr: SocketAddr) -> String {
    format!(
        "listener {port} {ip}\nallow_anonymous true\npersistence false\nset_tcp_nodelay true\n\
         max_inflight_messages {INFLIGHT}\nmax_queued_messages {QUEUED}\nmax_connections -1\n\
         log_dest stderr\nlog_type error\n",
        port = addr.port(),
        ip = addr.ip()
    )
}

fn rumqttd_config(addr: SocketAddr) -> String {
    format!(
        r#"id = 0
[router]
id = 0
max_connections = 30010
max_outgoing_packet_count = 200
max_segment_size = 104857600
max_segment_count = 10
[v4.1]
name = "v4-1"
listen = "{addr}"
next_connection_delay_ms = 0
[v4.1.connections]
connection_timeout_ms = 60000
max_payload_size = 262144
max_inflight_count = {INFLIGHT}
dynamic_filters = true
"#
    )
}

pub struct Plan {
    pub warmup: Duration,
    pub duration: Duration,
    pub storm_max: usize,
    pub idle_connections: usize,
    /// Scenario names to run; empty: all.
    pub only: Vec<String>,
}

fn wanted(plan: &Plan, name: &str) -> bool {
    plan.only.is_empty() || plan.only.iter().any(|o| o == name)
}

/// Runs every scenario against every broker; returns the outcomes.
pub async fn run(bins: &Binaries, plan: &Plan) -> Result<Vec<Outcome>> {
    let bar = ProgressBar::new_spinner();
    bar.set_style(
        ProgressStyle::with_template("{spinner} [{elapsed_precise}] {prefix}: {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_spinner()),
    );
    bar.enable_steady_tick(Duration::from_millis(120));
    let mut kinds = vec![Kind::Chatmq { sync_always: true }, Kind::Mosquitto];
    if bins.rumqttd.is_some() {
        kinds.push(Kind::Rumqttd);
    }
    let mut brokers = Vec::new();
    for k in &kinds {
        brokers.push(Broker::start(*k, bins)?);
    }
    let mut never = Broker::start(Kind::Chatmq { sync_always: false }, bins)?;
    let mut out: Vec<Outcome> = Vec::new();
    let mut turn = 0usize;

    let base = |scenario, b: &Broker| {
        let mut p = Params::new(scenario, b.addr);
        p.warmup = plan.warmup;
        p.duration = plan.duration;
        if matches!(b.kind, Kind::Chatmq { .. }) {
            p.jwt_secret = Some(JWT_SECRET.into());
        }
        p
    };

    let mut cases: Vec<(Scenario, u8)> = Vec::new();
    for s in [Scenario::Pairs, Scenario::Fanin, Scenario::Fanout] {
        for q in [0, 1] {
            cases.push((s, q));
        }
    }
    for (scenario, qos) in cases {
        if !wanted(plan, scenario.name()) {
            continue;
        }
        for i in order(brokers.len(), turn) {
            let b = &mut brokers[i];
            let mut p = base(scenario, b);
            p.qos = qos;
            bar.set_prefix(format!("{} q{qos} on {}", scenario.name(), b.name));
            out.push(measure(b, bins, p, &bar).await?);
        }
        turn += 1;
    }

    if wanted(plan, "chat") {
        let mut chat_order: Vec<Option<usize>> =
            order(brokers.len(), turn).into_iter().map(Some).collect();
        chat_order.insert(1, None);
        for i in chat_order {
            let b = match i {
                Some(i) => &mut brokers[i],
                None => &mut never,
            };
            let p = base(Scenario::Chat, b);
            bar.set_prefix(format!("chat q1 on {}", b.name));
            out.push(measure(b, bins, p, &bar).await?);
        }
        turn += 1;
    }

    // Latency at half of Mosquitto's highest QoS 1 1:1 rate, open loop.
    if wanted(plan, "latency") {
        let max = out
            .iter()
            .find(|o| {
                o.broker == "mosquitto" && o.scenario == "pairs" && o.qos == 1 && o.rate.is_none()
            })
            .and_then(|o| o.throughput)
            .unwrap_or(20_000.0);
        for i in order(brokers.len(), turn) {
            let b = &mut brokers[i];
            let mut p = base(Scenario::Pairs, b);
            p.qos = 1;
            p.rate = Some(max / 2.0);
            bar.set_prefix(format!("pairs q1 at {:.0}/s on {}", max / 2.0, b.name));
            out.push(measure(b, bins, p, &bar).await?);
        }
        turn += 1;
    }

    if wanted(plan, "storm") {
        for i in order(brokers.len(), turn) {
            let b = &mut brokers[i];
            let mut p = base(Scenario::Storm, b);
            p.clients = plan.storm_max;
            p.duration = plan.duration;
            bar.set_prefix(format!("storm on {}", b.name));
            out.push(measure(b, bins, p, &bar).await?);
        }
        turn += 1;
    }
    drop(never);
    let kinds: Vec<Kind> = brokers.iter().map(|b| b.kind).collect();
    drop(brokers);

    // Memory per idle connection, each on a fresh process, one at a time.
    if wanted(plan, "idle") {
        let n = kinds.len();
        for i in 0..n {
            let kind = kinds[(i + turn) % n];
            let mut b = Broker::start(kind, bins)?;
            let mut p = base(Scenario::Idle, &b);
            p.clients = plan.idle_connections;
            p.pid = Some(b.pid());
            bar.set_prefix(format!("idle on {}", b.name));
            out.push(measure(&mut b, bins, p, &bar).await?);
        }
    }
    bar.finish_and_clear();
    Ok(out)
}

/// The brokers' turns in a scenario: rotated by one each scenario.
fn order(n: usize, by: usize) -> Vec<usize> {
    (0..n).map(|i| (i + by) % n.max(1)).collect()
}

fn line(o: Option<&Outcome>) -> String {
    match o {
        Some(o) => report::table(std::slice::from_ref(o))
            .lines()
            .nth(2)
            .unwrap_or_default()
            .to_string(),
        None => String::new(),
    }
}

/// The issue's targets, each met or missed, from a compare run.
pub fn targets(all: &[Outcome]) -> String {
    let find = |broker: &str, scenario: &str, qos: u8, rate: bool| {
        all.iter().find(|o| {
            o.broker == broker
                && o.scenario == scenario
                && o.qos == qos
                && o.rate.is_some() == rate
                && o.error.is_none()
        })
    };
    let mut s = String::from("targets (chatmq vs mosquitto):\n");
    let mut check = |name: &str, value: Option<f64>, goal: f64, at_least: bool| {
        let verdict = match value {
            Some(v) if (at_least && v >= goal) || (!at_least && v <= goal) => {
                format!("{v:.2}x  met")
            }
            Some(v) => format!("{v:.2}x  MISSED"),
            None => "not measured".into(),
        };
        let op = if at_least { ">=" } else { "<=" };
        s.push_str(&format!("  {name:<52} {op} {goal:.1}x: {verdict}\n"));
    };
    let ratio = |a: Option<&Outcome>, b: Option<&Outcome>, f: fn(&Outcome) -> Option<f64>| match (
        a.and_then(f),
        b.and_then(f),
    ) {
        (Some(x), Some(y)) if y > 0.0 => Some(x / y),
        _ => None,
    };
    let tput = |o: &Outcome| o.throughput;
    check(
        "QoS 1 1:1 throughput",
        ratio(
            find("chatmq", "pairs", 1, false),
            find("mosquitto", "pairs", 1, false),
            tput,
        ),
        1.0,
        true,
    );
    check(
        "QoS 0 fan-out throughput",
        ratio(
            find("chatmq", "fanout", 0, false),
            find("mosquitto", "fanout", 0, false),
            tput,
        ),
        1.5,
        true,
    );
    check(
        "chat QoS 1 (sync=always) vs plain QoS 1 no persistence",
        ratio(
            find("chatmq", "chat", 1, false),
            find("mosquitto", "chat", 1, false),
            tput,
        ),
        1.0,
        true,
    );
    check(
        "p99 latency at half Mosquitto's max rate",
        ratio(
            find("chatmq", "pairs", 1, true),
            find("mosquitto", "pairs", 1, true),
            |o| o.latency_us.map(|l| l[1] as f64),
        ),
        1.0,
        false,
    );
    check(
        "memory per idle connection",
        ratio(
            find("chatmq", "idle", 0, false),
            find("mosquitto", "idle", 0, false),
            |o| o.rss_per_connection_bytes,
        ),
        2.0,
        false,
    );
    s
}
