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
use crate::transport::{self, Transport};

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

/// A listener a broker gets besides plain MQTT on `addr`, for the idle
/// runs over TLS and WebSocket (on a fresh process each).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Extra {
    None,
    /// MQTT over TLS with a self-signed certificate made in its directory.
    Tls,
    /// MQTT over WebSocket at [`transport::WS_PATH`]: chatmq only, Debian's
    /// Mosquitto 2.0.11 is built without websockets ("Unable to start any
    /// listening sockets" for `protocol websockets`).
    WebSocket,
}

pub struct Broker {
    pub name: String,
    pub kind: Kind,
    pub addr: SocketAddr,
    extra: Extra,
    /// The address of the `extra` listener, if any.
    extra_addr: Option<SocketAddr>,
    /// The CPUs it is pinned to (`taskset -c`), if any.
    cpus: Option<String>,
    program: PathBuf,
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
        Broker::start_pinned(kind, bins, None)
    }

    pub fn start_pinned(kind: Kind, bins: &Binaries, cpus: Option<&str>) -> Result<Broker> {
        Broker::start_with(kind, bins, cpus, Extra::None)
    }

    /// Starts `kind` on a free loopback port in a fresh directory, pinned
    /// to `cpus` (a `taskset -c` list) if given, with the `extra` listener
    /// on a second free port, and waits until it listens.
    pub fn start_with(
        kind: Kind,
        bins: &Binaries,
        cpus: Option<&str>,
        extra: Extra,
    ) -> Result<Broker> {
        let port = free_port()?;
        let extra_addr = match extra {
            Extra::None => None,
            Extra::Tls | Extra::WebSocket => Some(SocketAddr::from(([127, 0, 0, 1], free_port()?))),
        };
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
        let program = match kind {
            Kind::Chatmq { .. } => bins.chatmq.clone(),
            Kind::Mosquitto => bins.mosquitto.clone(),
            Kind::Rumqttd => bins
                .rumqttd
                .clone()
                .ok_or_else(|| anyhow!("no rumqttd binary given"))?,
        };
        let listeners = Listeners::new(&dir, addr, extra, extra_addr);
        let configured = listeners.and_then(|l| {
            Ok(match kind {
                Kind::Chatmq { sync_always } => std::fs::write(
                    dir.join("chatmq.toml"),
                    chatmq_config(&dir, &l, sync_always),
                )?,
                Kind::Mosquitto if extra == Extra::WebSocket => {
                    bail!("Mosquitto 2.0.11 from Debian has no websockets")
                }
                Kind::Mosquitto => {
                    std::fs::write(dir.join("mosquitto.conf"), mosquitto_config(&l))?
                }
                Kind::Rumqttd if extra != Extra::None => {
                    bail!("rumqttd is measured over plain TCP only")
                }
                Kind::Rumqttd => std::fs::write(dir.join("rumqttd.toml"), rumqttd_config(addr))?,
            })
        });
        let spawned = configured.and_then(|()| spawn(kind, &program, &dir, cpus));
        let child = match spawned {
            Ok(c) => c,
            Err(e) => {
                let _ = std::fs::remove_dir_all(&dir);
                return Err(e.context(format!("starting {name} ({})", program.display())));
            }
        };
        let mut broker = Broker {
            name: name.into(),
            kind,
            addr,
            extra,
            extra_addr,
            cpus: cpus.map(str::to_string),
            program,
            child,
            dir,
        };
        broker.wait_ready()?;
        Ok(broker)
    }

    /// Where a client reaches it over `transport`.
    pub fn addr_for(&self, transport: &Transport) -> SocketAddr {
        match transport {
            Transport::Tcp => self.addr,
            Transport::Tls(_) | Transport::WebSocket => self.extra_addr.unwrap_or(self.addr),
        }
    }

    /// The transport a client uses to reach its `extra` listener (TLS
    /// trusts the certificate made for it).
    pub fn transport(&self) -> Result<Transport> {
        Ok(match self.extra {
            Extra::None => Transport::Tcp,
            Extra::Tls => Transport::Tls(transport::client_config(&self.dir.join(CERT))?),
            Extra::WebSocket => Transport::WebSocket,
        })
    }

    /// The broker's directory (its data directory is `data/` inside).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Stops the process: SIGKILL if `hard`, else SIGTERM and a wait for
    /// it to exit (30 s, then SIGKILL).
    pub fn stop(&mut self, hard: bool) -> Result<()> {
        if hard {
            self.child.kill().context("kill -9")?;
            self.child.wait()?;
            return Ok(());
        }
        let status = Command::new("kill")
            .args(["-TERM", &self.pid().to_string()])
            .status()
            .context("running kill -TERM")?;
        if !status.success() {
            bail!("kill -TERM {} failed", self.pid());
        }
        let deadline = Instant::now() + Duration::from_secs(30);
        while self.child.try_wait()?.is_none() {
            if Instant::now() > deadline {
                self.child.kill()?;
                self.child.wait()?;
                bail!("{} did not exit within 30 s of SIGTERM", self.name);
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        Ok(())
    }

    /// Starts the stopped process again on the same directory, port and
    /// configuration, and returns at once (the caller times the start).
    pub fn respawn(&mut self) -> Result<()> {
        self.child = spawn(self.kind, &self.program, &self.dir, self.cpus.as_deref())?;
        self.drain_stdout();
        Ok(())
    }

    /// Reads stdout in the background so the broker never blocks on it.
    fn drain_stdout(&mut self) {
        if let Some(out) = self.child.stdout.take() {
            std::thread::spawn(move || for _ in BufReader::new(out).lines() {});
        }
    }

    /// Rewrites chatmq's configuration with another `storage.sync`
    /// (applies at the next start).
    pub fn set_sync(&mut self, sync_always: bool) -> Result<()> {
        if let Kind::Chatmq { .. } = self.kind {
            let l = Listeners::new(&self.dir, self.addr, self.extra, self.extra_addr)?;
            std::fs::write(
                self.dir.join("chatmq.toml"),
                chatmq_config(&self.dir, &l, sync_always),
            )?;
            self.kind = Kind::Chatmq { sync_always };
        }
        Ok(())
    }

    fn wait_ready(&mut self) -> Result<()> {
        self.drain_stdout();
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
            let listening =
                |a: &SocketAddr| TcpStream::connect_timeout(a, Duration::from_millis(100)).is_ok();
            if listening(&self.addr) && self.extra_addr.iter().all(listening) {
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
pub(crate) async fn measure(
    b: &mut Broker,
    bins: &Binaries,
    mut p: Params,
    bar: &ProgressBar,
) -> Result<Outcome> {
    let mut note = None;
    if !b.healthy().await {
        let why = b.failure().unwrap_or_else(|| "no answer to CONNECT".into());
        note = Some(format!("{} was restarted before this run: {why}", b.name));
        *b = Broker::start_with(b.kind, bins, b.cpus.as_deref(), b.extra)?;
    }
    p.addr = b.addr_for(&p.transport);
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

/// Spawns `kind` from its configuration in `dir` (written by
/// `start_pinned`), through `taskset -c` when pinned.
fn spawn(kind: Kind, program: &Path, dir: &Path, cpus: Option<&str>) -> Result<Child> {
    let mut cmd = match cpus {
        Some(list) => {
            let mut c = Command::new("taskset");
            c.arg("-c").arg(list).arg(program);
            c
        }
        None => Command::new(program),
    };
    match kind {
        Kind::Chatmq { .. } => {
            cmd.arg("serve")
                .arg("--config")
                .arg(dir.join("chatmq.toml"))
                .env("RUST_LOG", "warn");
        }
        Kind::Mosquitto => {
            cmd.arg("-c").arg(dir.join("mosquitto.conf"));
        }
        Kind::Rumqttd => {
            cmd.arg(dir.join("rumqttd.toml"));
        }
    }
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join("stderr.log"))?;
    cmd.current_dir(dir)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::from(log))
        .spawn()
        .with_context(|| format!("spawning {:?}", cmd.get_program()))
}

fn free_port() -> Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// The certificate and key files [`Extra::Tls`] makes in a broker's directory.
const CERT: &str = "server.crt";
const KEY: &str = "server.key";

/// A broker's listeners, as its configuration names them.
struct Listeners {
    mqtt: SocketAddr,
    /// MQTT over TLS: address, certificate, key.
    tls: Option<(SocketAddr, PathBuf, PathBuf)>,
    websocket: Option<SocketAddr>,
}

impl Listeners {
    /// Makes the certificate for a TLS listener if there is one (once:
    /// a restarted broker keeps it).
    fn new(
        dir: &Path,
        mqtt: SocketAddr,
        extra: Extra,
        at: Option<SocketAddr>,
    ) -> Result<Listeners> {
        let mut l = Listeners {
            mqtt,
            tls: None,
            websocket: None,
        };
        match (extra, at) {
            (Extra::Tls, Some(at)) => {
                let (cert, key) = (dir.join(CERT), dir.join(KEY));
                if !cert.exists() {
                    transport::self_signed(&cert, &key)?;
                }
                l.tls = Some((at, cert, key));
            }
            (Extra::WebSocket, Some(at)) => l.websocket = Some(at),
            _ => {}
        }
        Ok(l)
    }
}

fn chatmq_config(dir: &Path, l: &Listeners, sync_always: bool) -> String {
    let tls = match &l.tls {
        Some((at, cert, key)) => format!(
            "[mqtt.tls]\nlisten = \"{at}\"\ncert = \"{}\"\nkey = \"{}\"\n",
            cert.display(),
            key.display()
        ),
        None => String::new(),
    };
    let websocket = match l.websocket {
        Some(at) => format!(
            "enabled = true\nlisten = \"{at}\"\npath = \"{}\"",
            transport::WS_PATH
        ),
        None => "enabled = false".to_string(),
    };
    let addr = l.mqtt;
    format!(
        r##"[node]
data_dir = "{data}"
[mqtt]
listen = "{addr}"
max_inflight = {INFLIGHT}
max_offline_messages = {QUEUED}
# Every load client comes from loopback: no per-address limits.
max_connections_per_ip = 0
accept_rate_per_ip = 0
# The scale run aims at 1,000,000 idle anonymous connections that ask for
# no keep-alive; the restart run stores 100,000 sessions. Neither peer
# caps these.
max_connections = 2000000
max_anonymous_sessions = 2000000
keepalive_max = 65535
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
{tls}[http]
listen = "127.0.0.1:0"
[websocket]
{websocket}
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

fn mosquitto_config(l: &Listeners) -> String {
    // Mosquitto 2.0 applies these per listener (no per_listener_settings).
    let mut conf = format!(
        "listener {port} {ip}\nallow_anonymous true\npersistence false\nset_tcp_nodelay true\n\
         max_inflight_messages {INFLIGHT}\nmax_queued_messages {QUEUED}\nmax_connections -1\n\
         log_dest stderr\nlog_type error\n",
        port = l.mqtt.port(),
        ip = l.mqtt.ip()
    );
    if let Some((at, cert, key)) = &l.tls {
        conf.push_str(&format!(
            "listener {} {}\ncertfile {}\nkeyfile {}\nmax_connections -1\n",
            at.port(),
            at.ip(),
            cert.display(),
            key.display()
        ));
    }
    conf
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
    /// Large groups: their sizes.
    pub group_sizes: Vec<usize>,
    /// Connection scale: the target, checkpoint step and free-memory floor.
    pub scale_clients: usize,
    pub scale: crate::scale::Limits,
    /// Restart: what the data directory holds before the restart.
    pub restart: crate::restart::Fill,
    /// Scenario names to run; empty: all but [`ON_REQUEST`].
    pub only: Vec<String>,
}

/// Scenarios that take minutes, and run only when `--only` names them.
pub const ON_REQUEST: [&str; 2] = ["restart", "scale"];

fn wanted(plan: &Plan, name: &str) -> bool {
    if plan.only.is_empty() {
        !ON_REQUEST.contains(&name)
    } else {
        plan.only.iter().any(|o| o == name)
    }
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

    // Large groups: chatmq only (the others have no chat layer).
    if wanted(plan, "groups") {
        for &size in &plan.group_sizes {
            let b = &mut brokers[0];
            let mut p = base(Scenario::Group, b);
            p.group_size = size;
            bar.set_prefix(format!("group of {size} on {}", b.name));
            out.push(measure(b, bins, p, &bar).await?);
        }
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

    if wanted(plan, "cores") {
        out.extend(crate::cores::run(bins, plan, &bar).await?);
    }
    if wanted(plan, "restart") {
        out.extend(crate::restart::run(bins, &plan.restart, &bar).await?);
    }
    // Connection scale, each broker on a fresh process, one at a time.
    if wanted(plan, "scale") {
        // rumqttd is left out: its connections go through its router at
        // under 1,000 per second (see storm) and it holds 43 KiB each.
        for kind in kinds.iter().filter(|k| **k != Kind::Rumqttd) {
            let mut b = Broker::start(*kind, bins)?;
            let mut p = base(Scenario::Scale, &b);
            p.clients = plan.scale_clients;
            p.scale = plan.scale;
            p.pid = Some(b.pid());
            bar.set_prefix(format!("scale on {}", b.name));
            out.push(measure(&mut b, bins, p, &bar).await?);
        }
    }

    // Memory per idle connection, each on a fresh process, one at a time:
    // plain TCP on every broker, then TLS (chatmq, Mosquitto) and
    // WebSocket (chatmq).
    if wanted(plan, "idle") {
        let n = kinds.len();
        for extra in [Extra::None, Extra::Tls, Extra::WebSocket] {
            for i in 0..n {
                let kind = kinds[(i + turn) % n];
                let served = match (kind, extra) {
                    (_, Extra::None) | (Kind::Chatmq { .. }, _) => true,
                    (Kind::Mosquitto, Extra::Tls) => true,
                    _ => false,
                };
                if !served {
                    continue;
                }
                let mut b = Broker::start_with(kind, bins, None, extra)?;
                let mut p = base(Scenario::Idle, &b);
                p.clients = plan.idle_connections;
                p.pid = Some(b.pid());
                p.transport = b.transport()?;
                p.variant = p.transport.variant().map(str::to_string);
                bar.set_prefix(format!(
                    "idle {} on {}",
                    p.variant.as_deref().unwrap_or("tcp"),
                    b.name
                ));
                out.push(measure(&mut b, bins, p, &bar).await?);
            }
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
                && o.variant.is_none()
                && o.error.is_none()
        })
    };
    let variant = |scenario: &str, qos: u8, v: &str| {
        all.iter().find(|o| {
            o.broker == "chatmq"
                && o.scenario == scenario
                && o.qos == qos
                && o.variant.as_deref() == Some(v)
                && o.error.is_none()
        })
    };
    let mut s = String::from("targets (chatmq vs mosquitto):\n");
    let mut check_in = |name: &str, value: Option<f64>, goal: f64, at_least: bool, unit: &str| {
        let verdict = match value {
            Some(v) if (at_least && v >= goal) || (!at_least && v <= goal) => {
                format!("{v:.2}{unit}  met")
            }
            Some(v) => format!("{v:.2}{unit}  MISSED"),
            None => "not measured".into(),
        };
        let op = if at_least { ">=" } else { "<=" };
        s.push_str(&format!("  {name:<56} {op} {goal:.1}{unit}: {verdict}\n"));
    };
    let ratio = |a: Option<&Outcome>, b: Option<&Outcome>, f: fn(&Outcome) -> Option<f64>| match (
        a.and_then(f),
        b.and_then(f),
    ) {
        (Some(x), Some(y)) if y > 0.0 => Some(x / y),
        _ => None,
    };
    let tput = |o: &Outcome| o.throughput;
    let mut check = |name: &str, value, goal, at_least| check_in(name, value, goal, at_least, "x");
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
    for size in [1_000, 10_000] {
        let name = format!("group of {size}: small conv ack p99, fan-out / alone");
        let o = variant("group", 1, &format!("{size} members"));
        let v = o.and_then(|o| match (o.small_ack_loaded_us, o.small_ack_idle_us) {
            (Some(l), Some(i)) => Some(l[1] as f64 / i[1].max(1) as f64),
            _ => None,
        });
        check(&name, v, 2.0, false);
    }
    for (name, scenario, qos) in [
        ("QoS 1 pairs throughput, 2 cores / 1 core", "pairs", 1),
        ("QoS 0 fan-in throughput, 2 cores / 1 core", "fanin", 0),
    ] {
        check(
            name,
            ratio(
                variant(scenario, qos, "2 cores"),
                variant(scenario, qos, "1 core"),
                tput,
            ),
            1.7,
            true,
        );
    }
    check_in(
        "memory per idle TCP connection",
        find("chatmq", "idle", 0, false)
            .and_then(|o| o.rss_per_connection_bytes)
            .map(|b| b / 1024.0),
        1.5,
        false,
        " KiB",
    );
    let served = variant("restart", 0, "after kill -9").and_then(|o| o.restart.as_ref());
    check_in(
        "restart after kill -9: process start until served",
        served.map(|t| t.served_ms / 1e3),
        2.0,
        false,
        " s",
    );
    s
}
