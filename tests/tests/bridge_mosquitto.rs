//! The MQTT bridge (`[[bridge.remotes]]`) against a real Mosquitto, the
//! Debian package's `mosquitto` binary, started by each test on a free
//! port with persistence in a temporary directory.
//!
//! As an operator would check it: messages cross both ways with their
//! prefixes rewritten; at QoS 1 none is lost, and the order holds, when
//! either broker restarts in the middle of a stream; a mapping in both
//! directions on the same topics does not echo; and a device publishing on
//! Mosquitto posts into a chat conversation.

use std::collections::HashSet;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use chatmq_tests::chat::{
    self, create_group, json_of, v5_options, v5_until, v5_user, v5_with_events,
};
use chatmq_tests::metrics::{metric, metric_becomes, metric_reaches};
use chatmq_tests::tls::TestPki;
use chatmq_tests::v5::{self, QoS};
use chatmq_tests::{Broker, PATIENCE};
use serde_json::json;

const MOSQUITTO: &str = "/usr/sbin/mosquitto";

/// A Mosquitto process with its config and persistence in `dir`.
struct Mosquitto {
    child: Option<Child>,
    addr: SocketAddr,
    /// The TLS listener, if started with one ([`Mosquitto::start_tls`]).
    tls_port: Option<u16>,
    dir: tempfile::TempDir,
}

fn free_port() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").expect("a free port");
    l.local_addr().expect("its address").port()
}

impl Mosquitto {
    /// `None` (and a SKIPPED line) when the package is not installed.
    fn start() -> Option<Mosquitto> {
        Self::start_with(false)
    }

    /// With a second listener, TLS, whose certificate a throwaway CA
    /// signed (`ca.pem` in its directory).
    fn start_tls() -> Option<Mosquitto> {
        Self::start_with(true)
    }

    fn start_with(tls: bool) -> Option<Mosquitto> {
        if !Path::new(MOSQUITTO).exists() {
            eprintln!("SKIPPED: {MOSQUITTO} is not installed (Debian: mosquitto); run scripts/setup.sh --test");
            return None;
        }
        let port = free_port();
        let dir = tempfile::tempdir().expect("temp dir");
        let mut conf = format!(
            "listener {port} 127.0.0.1\nallow_anonymous true\npersistence true\n\
             persistence_location {}/\nautosave_interval 1\nmax_queued_messages 10000\n\
             max_inflight_messages 20\nlog_dest file {}\nuser {}\n",
            dir.path().display(),
            dir.path().join("mosquitto.log").display(),
            // Run as root, Mosquitto would switch to the `mosquitto` user,
            // who cannot write the temporary directory.
            std::env::var("USER").unwrap_or_else(|_| "root".into())
        );
        let tls_port = tls.then(|| {
            let pki = TestPki::new(dir.path());
            let port = free_port();
            conf.push_str(&format!(
                "listener {port} 127.0.0.1\ncertfile {}\nkeyfile {}\n",
                pki.cert.display(),
                pki.key.display()
            ));
            port
        });
        std::fs::write(dir.path().join("mosquitto.conf"), conf).expect("write mosquitto.conf");
        let mut m = Mosquitto {
            child: None,
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
            tls_port,
            dir,
        };
        m.spawn();
        Some(m)
    }

    fn conf(&self) -> PathBuf {
        self.dir.path().join("mosquitto.conf")
    }

    fn spawn(&mut self) {
        let child = Command::new(MOSQUITTO)
            .arg("-c")
            .arg(self.conf())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn mosquitto");
        self.child = Some(child);
        let deadline = Instant::now() + PATIENCE;
        while TcpStream::connect(self.addr).is_err() {
            assert!(
                Instant::now() < deadline,
                "mosquitto did not listen on {}",
                self.addr
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGTERM (Mosquitto saves its persistence file) and wait.
    fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = Command::new("kill")
                .arg("-TERM")
                .arg(c.id().to_string())
                .status();
            let _ = c.wait();
        }
    }

    /// Stops, waits `down_for`, starts again on the same port and data.
    fn restart(&mut self, down_for: Duration) {
        self.stop();
        std::thread::sleep(down_for);
        self.spawn();
    }
}

impl Drop for Mosquitto {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// A chatmq config: JWT users, every plain topic open to users, and a
/// bridge to `remote` with `topics` (TOML `[[bridge.remotes.topics]]`).
fn config(remote: SocketAddr, local_user: &str, topics: &str) -> String {
    chat::config(&format!(
        "[[acl.rules]]\nuser = \"*\"\ntopic = \"#\"\naccess = \"pubsub\"\n\n\
         [[bridge.remotes]]\nname = \"site1\"\naddress = \"{remote}\"\n\
         local_user = \"{local_user}\"\nreconnect_min_ms = 100\nreconnect_max_ms = 500\n\
         keepalive_secs = 10\n\n{topics}"
    ))
}

fn topic(pattern: &str, direction: &str, local: &str, remote: &str) -> String {
    let mut t = format!(
        "[[bridge.remotes.topics]]\npattern = \"{pattern}\"\ndirection = \"{direction}\"\nqos = 1\n"
    );
    for (key, prefix) in [("local_prefix", local), ("remote_prefix", remote)] {
        if !prefix.is_empty() {
            t.push_str(&format!("{key} = \"{prefix}\"\n"));
        }
    }
    t + "\n"
}

/// A client of Mosquitto (anonymous).
async fn remote_client(m: &Mosquitto, id: &str, persistent: bool) -> v5::Client {
    let mut o = v5::options(m.addr, id);
    if persistent {
        o.set_clean_start(false);
        o.set_session_expiry_interval(Some(600));
    }
    match v5::connect(o).await {
        Ok(c) => c,
        Err(e) => panic!("{id} could not connect to mosquitto: {e}"),
    }
}

async fn bridge_up(b: &Broker) {
    metric_becomes(b, &site1("connected"), 1.0).await;
}

/// Mosquitto, and chatmq bridged to it as `local_user` with `topics`
/// (see [`topic`]), the bridge connected; `None` without Mosquitto.
async fn bridged(local_user: &str, topics: &str) -> Option<(Mosquitto, Broker)> {
    let m = Mosquitto::start()?;
    let b = Broker::start(&config(m.addr, local_user, topics));
    bridge_up(&b).await;
    Some((m, b))
}

/// The name of the bridge metric `name` of the remote `site1`.
fn site1(name: &str) -> String {
    format!("chatmq_bridge_{name}{{remote=\"site1\"}}")
}

/// The bridge metric `name` of the remote `site1` now.
async fn site1_metric(b: &Broker, name: &str) -> f64 {
    metric(b, &site1(name)).await
}

/// The ends of a bridge: alice on chatmq subscribed to `here`, a
/// subscriber on Mosquitto to `there`, and a device on Mosquitto.
async fn ends(
    b: &Broker,
    m: &Mosquitto,
    here: &str,
    there: &str,
) -> (v5::Client, v5::Client, v5::Client) {
    let mut local = v5_user(b, "alice").await;
    local.subscribe(here, QoS::AtLeastOnce).await;
    let mut remote = remote_client(m, "remote-sub", false).await;
    remote.subscribe(there, QoS::AtLeastOnce).await;
    let device = remote_client(m, "device", false).await;
    (local, remote, device)
}

/// A persistent subscriber on Mosquitto (client id `sink`) to `filter`,
/// gone away: its session collects what arrives while it is away.
async fn sink_away(m: &Mosquitto, filter: &str) {
    let mut sink = remote_client(m, "sink", true).await;
    sink.subscribe(filter, QoS::AtLeastOnce).await;
    sink.disconnect().await;
}

/// `sink` (back on its persistent session) gets the numbered payloads
/// `0..n`, every one, first arrivals in order.
async fn gets_all_in_order(sink: &mut v5::Client, n: usize, who: &str) {
    let got = v5_until(sink, Duration::from_secs(30), |g| distinct(g) >= n).await;
    assert_all_in_order(&got, n, who);
}

fn text(p: &v5::Publish) -> String {
    String::from_utf8_lossy(&p.payload).into_owned()
}

/// The numbered payloads `0..n` all arrived, first arrivals in order
/// (QoS 1 may repeat one after a restart; it never loses or reorders).
fn assert_all_in_order(got: &[v5::Publish], n: usize, who: &str) {
    let mut seen = HashSet::new();
    let firsts: Vec<usize> = got
        .iter()
        .filter_map(|p| text(p).parse::<usize>().ok())
        .filter(|i| seen.insert(*i))
        .collect();
    let want: Vec<usize> = (0..n).collect();
    assert_eq!(
        firsts, want,
        "{who}: every message once, in order (first arrivals)"
    );
}

fn distinct(got: &[v5::Publish]) -> usize {
    got.iter().map(text).collect::<HashSet<_>>().len()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_cross_both_ways_with_their_prefixes_rewritten() {
    let topics =
        topic("sensors/#", "in", "site1/", "plant/") + &topic("cmd/#", "out", "hq/", "site1/");
    let Some((m, b)) = bridged("bridgebot", &topics).await else {
        return;
    };

    let (mut local, mut remote, mut device) = ends(&b, &m, "site1/sensors/#", "site1/cmd/#").await;
    // In: plant/... on Mosquitto arrives as site1/... here.
    device
        .publish_acked("plant/sensors/t1", QoS::AtLeastOnce, false, b"21.5")
        .await;
    let p = local.publish().await;
    assert_eq!(chat::v5_topic(&p), "site1/sensors/t1");
    assert_eq!(text(&p), "21.5");
    // Out: hq/... here arrives as site1/... on Mosquitto.
    local
        .publish_acked("hq/cmd/reboot", QoS::AtLeastOnce, false, b"now")
        .await;
    let p = remote.publish().await;
    assert_eq!(String::from_utf8_lossy(&p.topic), "site1/cmd/reboot");
    assert_eq!(text(&p), "now");
    // Topics no mapping names stay where they are.
    device
        .publish_acked("other/x", QoS::AtLeastOnce, false, b"no")
        .await;
    local
        .publish_acked("site1/sensors/local", QoS::AtLeastOnce, false, b"no")
        .await;
    remote.no_publish(Duration::from_millis(500)).await;

    assert_eq!(site1_metric(&b, "messages_in_total").await, 1.0);
    assert_eq!(site1_metric(&b, "messages_out_total").await, 1.0);
    assert_eq!(site1_metric(&b, "reconnects_total").await, 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mapping_both_ways_on_the_same_topics_does_not_echo() {
    let Some((m, b)) = bridged("bridgebot", &topic("shared/#", "both", "", "")).await else {
        return;
    };
    let (mut local, mut remote, mut device) = ends(&b, &m, "shared/#", "shared/#").await;

    device
        .publish_acked("shared/from-remote", QoS::AtLeastOnce, false, b"r")
        .await;
    // (publish_acked reads past what arrives before the ack: publishers
    // are clients of their own.)
    let mut poster = v5_user(&b, "bob").await;
    poster
        .publish_acked("shared/from-local", QoS::AtLeastOnce, false, b"l")
        .await;
    let window = Duration::from_secs(2);
    let here = local.publishes_for(window).await;
    let there = remote.publishes_for(Duration::from_millis(100)).await;
    let topics = |ps: &[v5::Publish]| {
        let mut t: Vec<String> = ps.iter().map(chat::v5_topic).collect();
        t.sort();
        t
    };
    // Each side sees each message exactly once: nothing came back round.
    assert_eq!(topics(&here), ["shared/from-local", "shared/from-remote"]);
    assert_eq!(topics(&there), ["shared/from-local", "shared/from-remote"]);
    assert_eq!(site1_metric(&b, "messages_in_total").await, 1.0);
    assert_eq!(site1_metric(&b, "messages_out_total").await, 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qos1_out_loses_nothing_when_mosquitto_restarts() {
    let out = topic("cmd/#", "out", "hq/", "site1/");
    let Some((mut m, b)) = bridged("bridgebot", &out).await else {
        return;
    };
    // A persistent subscriber on Mosquitto, away while it all happens.
    sink_away(&m, "site1/cmd/#").await;

    // A stream with many messages in flight at once, Mosquitto stopped
    // (SIGTERM: it saves what it acknowledged) a third of the way in. What
    // waits for the remote waits in the bridge's local session, bounded by
    // mqtt.max_offline_messages (1000): the stream stays within it.
    let n = 600;
    let local = v5_user(&b, "alice").await;
    let stream = tokio::spawn(async move {
        for i in 0..n {
            let topic = format!("hq/cmd/{i}");
            let queued = local
                .client
                .publish(topic, QoS::AtLeastOnce, false, i.to_string().into_bytes())
                .await;
            queued.expect("queue publish");
        }
        local
    });
    let third = (n / 3) as f64;
    metric_reaches(
        &b,
        &site1("messages_out_total"),
        third,
        Duration::from_secs(30),
    )
    .await;
    m.restart(Duration::from_millis(700));
    let _local = stream.await.expect("the stream");
    let mut sink = remote_client(&m, "sink", true).await;
    gets_all_in_order(&mut sink, n, "the Mosquitto subscriber").await;
    assert_eq!(metric(&b, "chatmq_messages_dropped_total").await, 0.0);
    assert!(site1_metric(&b, "reconnects_total").await >= 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qos1_in_loses_nothing_when_chatmq_is_killed() {
    let into = topic("sensors/#", "in", "site1/", "plant/");
    let Some((m, mut b)) = bridged("bridgebot", &into).await else {
        return;
    };
    // A persistent subscriber on chatmq, away while it all happens.
    let sink = chat::v5_login(v5_options(b.addr, "alice-sink", "alice", true)).await;
    let mut sink = sink;
    sink.subscribe("site1/sensors/#", QoS::AtLeastOnce).await;
    sink.disconnect().await;

    let n = 300;
    let mut device = remote_client(&m, "device", false).await;
    for i in 0..n {
        device
            .publish_acked(
                &format!("plant/sensors/{i}"),
                QoS::AtLeastOnce,
                false,
                i.to_string().as_bytes(),
            )
            .await;
        if i == n / 3 {
            // kill -9 in the middle of the stream, and start again.
            b.restart();
        }
    }
    let mut sink = chat::v5_login(v5_options(b.addr, "alice-sink", "alice", true)).await;
    gets_all_in_order(&mut sink, n, "the chatmq subscriber").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_on_mosquitto_posts_into_a_chat_conversation() {
    // devices/chat/{conv} on Mosquitto is chat/{conv} here, posted as the
    // user `thermostat`, a member of the conversation.
    let devices = topic("+", "in", "chat/", "devices/chat/");
    let Some((m, b)) = bridged("thermostat", &devices).await else {
        return;
    };
    let mut alice = v5_with_events(&b, "alice").await;
    create_group(&mut alice, "ops", &["thermostat"]).await;
    alice.subscribe("chat/ops", QoS::AtLeastOnce).await;

    let mut device = remote_client(&m, "thermostat-1", false).await;
    let envelope = json!({"id": "t1-0001", "body": {"text": "server room at 31 C"}});
    device
        .publish_acked(
            "devices/chat/ops",
            QoS::AtLeastOnce,
            false,
            envelope.to_string().as_bytes(),
        )
        .await;
    let got = v5_until(&mut alice, PATIENCE, |g| {
        g.iter().any(|p| chat::v5_topic(p) == "chat/ops")
    })
    .await;
    let msg = got
        .iter()
        .find(|p| chat::v5_topic(p) == "chat/ops")
        .map(|p| json_of(&p.payload));
    let msg = msg.expect("the chat message");
    assert_eq!(msg["from"], "thermostat", "{msg}");
    assert_eq!(msg["conv"], "ops", "{msg}");
    assert_eq!(msg["id"], "t1-0001", "{msg}");
    assert_eq!(msg["body"]["text"], "server room at 31 C", "{msg}");
    assert_eq!(msg["seq"], 1, "{msg}");

    // A conversation the device's user is not in is refused (and counted).
    device
        .publish_acked(
            "devices/chat/elsewhere",
            QoS::AtLeastOnce,
            false,
            envelope.to_string().as_bytes(),
        )
        .await;
    metric_becomes(&b, &site1("dropped_total"), 1.0).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qos1_out_waiting_for_a_down_remote_survives_a_chatmq_kill() {
    let out = topic("cmd/#", "out", "hq/", "site1/");
    let Some((mut m, mut b)) = bridged("bridgebot", &out).await else {
        return;
    };
    sink_away(&m, "site1/cmd/#").await;
    // The remote is down: what is published here waits in the bridge's
    // session, acknowledged to the publishers (durable), not to the bridge.
    m.stop();
    metric_becomes(&b, &site1("connected"), 0.0).await;
    let n = 200;
    let mut local = v5_user(&b, "alice").await;
    for i in 0..n {
        let topic = format!("hq/cmd/{i}");
        local
            .publish_acked(&topic, QoS::AtLeastOnce, false, i.to_string().as_bytes())
            .await;
    }
    // kill -9, start again, and only then is the remote back.
    b.restart();
    m.spawn();
    bridge_up(&b).await;
    let mut sink = remote_client(&m, "sink", true).await;
    gets_all_in_order(&mut sink, n, "the Mosquitto subscriber").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_remote_over_tls_is_reached_with_its_ca() {
    let Some(m) = Mosquitto::start_tls() else {
        return;
    };
    let port = m.tls_port.expect("a TLS listener");
    let ca = m.dir.path().join("ca.pem");
    let remote: SocketAddr = ([127, 0, 0, 1], port).into();
    let tls = format!("tls = true\nca_file = \"{}\"\n", ca.display());
    // The TLS keys go in the remote's table, before its topics.
    let conf = config(
        remote,
        "bridgebot",
        &topic("sensors/#", "in", "site1/", "plant/"),
    )
    .replace(
        "keepalive_secs = 10\n",
        &format!("keepalive_secs = 10\n{tls}"),
    );
    let b = Broker::start(&conf);
    bridge_up(&b).await;
    let mut local = v5_user(&b, "alice").await;
    local.subscribe("site1/sensors/#", QoS::AtLeastOnce).await;
    let mut device = remote_client(&m, "device", false).await;
    device
        .publish_acked("plant/sensors/t1", QoS::AtLeastOnce, false, b"tls")
        .await;
    let p = local.publish().await;
    assert_eq!(chat::v5_topic(&p), "site1/sensors/t1");
    assert_eq!(text(&p), "tls");
}
