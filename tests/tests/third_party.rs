//! Interoperability: third-party clients a user might pick, the Mosquitto
//! command-line clients and Eclipse Paho for Python, against the real
//! broker. `scripts/setup.sh --test` installs them; a test whose tool is
//! missing says so on stderr and passes without checking anything.

use std::io::{BufRead, BufReader, Read};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use chatmq_tests::tools::{available, finish, mosquitto_available, succeed};
use chatmq_tests::{Broker, OPEN, PATIENCE};

fn mosquitto(b: &Broker, program: &str, version: &str, args: &[&str]) -> Command {
    let mut cmd = Command::new(program);
    cmd.args(["-h", &b.host(), "-p", &b.port().to_string(), "-V", version])
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    cmd
}

/// Runs mosquitto_pub to completion and asserts it succeeded.
fn mosquitto_pub(b: &Broker, version: &str, args: &[&str]) -> String {
    let child = mosquitto(b, "mosquitto_pub", version, args)
        .spawn()
        .expect("spawn mosquitto_pub");
    let out = finish(child, "mosquitto_pub");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "mosquitto_pub {args:?} failed: {stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

/// A mosquitto_sub (with `-d`, which prints the protocol exchange) that
/// has received its SUBACK; its later output lines arrive on the channel.
struct LiveSub {
    child: Child,
    lines: mpsc::Receiver<String>,
}

impl LiveSub {
    fn start(b: &Broker, version: &str, args: &[&str]) -> LiveSub {
        // mosquitto_sub does not flush its debug lines into a pipe: run it
        // line-buffered (coreutils stdbuf) to see SUBACK as it happens.
        let mut child = Command::new("stdbuf")
            .args(["-oL", "mosquitto_sub"])
            .args(["-h", &b.host(), "-p", &b.port().to_string(), "-V", version])
            .args(args)
            .arg("-d")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn stdbuf mosquitto_sub");
        let stdout = child.stdout.take().expect("stdout");
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    return;
                }
            }
        });
        let mut sub = LiveSub { child, lines };
        sub.until(|l| l.contains("received SUBACK"));
        sub
    }

    /// Output lines up to and including the first that satisfies `done`.
    fn until(&mut self, done: impl Fn(&str) -> bool) -> Vec<String> {
        let deadline = Instant::now() + PATIENCE;
        let mut seen = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    let stop = done(&line);
                    seen.push(line);
                    if stop {
                        return seen;
                    }
                }
                Err(_) => {
                    let _ = self.child.kill();
                    let mut err = String::new();
                    if let Some(mut e) = self.child.stderr.take() {
                        let _ = e.read_to_string(&mut err);
                    }
                    panic!("mosquitto_sub output so far: {seen:#?}\nstderr: {err}");
                }
            }
        }
    }

    /// Every remaining output line once mosquitto_sub has exited.
    fn rest(mut self) -> Vec<String> {
        let status = finish_status(&mut self.child);
        assert!(status.success(), "mosquitto_sub exited with {status}");
        // The reader thread ends at end of output, which may lag the exit.
        let mut rest = Vec::new();
        while let Ok(line) = self.lines.recv_timeout(PATIENCE) {
            rest.push(line);
        }
        rest
    }
}

fn finish_status(child: &mut Child) -> std::process::ExitStatus {
    let deadline = Instant::now() + PATIENCE;
    loop {
        if let Some(s) = child.try_wait().expect("wait") {
            return s;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("mosquitto_sub did not exit");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The `PUBLISH (d0, q1, r0, m2, 'topic', ...` debug lines, as
/// (qos, retain, topic).
fn publishes(lines: &[String]) -> Vec<(u8, bool, String)> {
    lines
        .iter()
        .filter_map(|l| {
            let rest = l.split("received PUBLISH (").nth(1)?;
            let fields: Vec<&str> = rest.split(", ").collect();
            let qos = fields.get(1)?.strip_prefix('q')?.parse().ok()?;
            let retain = *fields.get(2)? == "r1";
            let topic = fields.get(4)?.trim_matches('\'').to_string();
            Some((qos, retain, topic))
        })
        .collect()
}

const VERSIONS: [&str; 2] = ["mqttv311", "mqttv5"];

// A Mosquitto subscriber at QoS 2 receives what mosquitto_pub sends at
// QoS 0, 1 and 2, in order and each at the QoS it was published with; the
// publisher's QoS 1 and 2 exchanges complete (PUBACK, PUBREC/PUBCOMP).
// Both in MQTT 3.1.1 and MQTT 5.
#[test]
fn mosquitto_clients_publish_and_subscribe_at_every_qos() {
    if !mosquitto_available() || !available("stdbuf", &["--version"]) {
        return;
    }
    let broker = Broker::start(OPEN);
    for v in VERSIONS {
        let filter = format!("mosq/{v}/#");
        let sub = LiveSub::start(&broker, v, &["-t", &filter, "-q", "2", "-v", "-C", "3"]);
        for qos in ["0", "1", "2"] {
            let topic = format!("mosq/{v}/q{qos}");
            let out = mosquitto_pub(
                &broker,
                v,
                &["-t", &topic, "-q", qos, "-m", &format!("hello {qos}"), "-d"],
            );
            match qos {
                "1" => assert!(out.contains("received PUBACK"), "{out}"),
                "2" => assert!(
                    out.contains("received PUBREC") && out.contains("received PUBCOMP"),
                    "{out}"
                ),
                _ => {}
            }
        }
        let lines = sub.rest();
        let got = publishes(&lines);
        let want: Vec<(u8, bool, String)> = (0..3)
            .map(|q| (q, false, format!("mosq/{v}/q{q}")))
            .collect();
        assert_eq!(got, want, "{v}: {lines:#?}");
        for q in 0..3 {
            let line = format!("mosq/{v}/q{q} hello {q}");
            assert!(lines.contains(&line), "{v}: {line} missing in {lines:#?}");
        }
    }
}

// mosquitto_pub -r leaves a retained message that a later mosquitto_sub
// gets with RETAIN set; an empty retained message (-r -n) clears it, and
// the next subscriber waits in vain.
#[test]
fn mosquitto_clients_retain_and_clear() {
    if !mosquitto_available() {
        return;
    }
    let broker = Broker::start(OPEN);
    for v in VERSIONS {
        let topic = format!("mosq/{v}/state");
        mosquitto_pub(&broker, v, &["-t", &topic, "-q", "1", "-r", "-m", "on"]);
        let child = mosquitto(
            &broker,
            "mosquitto_sub",
            v,
            &["-t", &topic, "-v", "-d", "-C", "1", "-W", "5"],
        )
        .spawn()
        .expect("spawn mosquitto_sub");
        let out = finish(child, "mosquitto_sub");
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        let lines: Vec<String> = stdout.lines().map(str::to_string).collect();
        assert!(out.status.success(), "{v}: {stdout}");
        assert_eq!(
            publishes(&lines),
            [(0, true, topic.clone())],
            "{v}: {stdout}"
        );
        assert!(lines.contains(&format!("{topic} on")), "{v}: {stdout}");

        mosquitto_pub(&broker, v, &["-t", &topic, "-q", "1", "-r", "-n"]);
        let child = mosquitto(
            &broker,
            "mosquitto_sub",
            v,
            &["-t", &topic, "-v", "-C", "1", "-W", "1"],
        )
        .spawn()
        .expect("spawn mosquitto_sub");
        let out = finish(child, "mosquitto_sub");
        assert!(
            !out.status.success() && out.stdout.is_empty(),
            "{v}: a cleared retained message was delivered: {}",
            String::from_utf8_lossy(&out.stdout)
        );
    }
}

// mosquitto_sub -c -i <id> makes a persistent session (in MQTT 5 with an
// unlimited Session Expiry Interval, capped by the broker): it subscribes
// and leaves (-E), three QoS 1 messages are published, and the same
// client id reconnecting gets all three, in order.
#[test]
fn mosquitto_persistent_session_receives_queued_messages() {
    if !mosquitto_available() {
        return;
    }
    let broker = Broker::start(OPEN);
    for v in VERSIONS {
        let id = format!("mosq-persistent-{v}");
        let topic = format!("mosq/{v}/queue");
        let child = mosquitto(
            &broker,
            "mosquitto_sub",
            v,
            &["-c", "-i", &id, "-q", "1", "-t", &topic, "-E"],
        )
        .spawn()
        .expect("spawn mosquitto_sub");
        let out = finish(child, "mosquitto_sub -E");
        assert!(out.status.success(), "{v}: subscribing failed");
        for i in 1..=3 {
            mosquitto_pub(
                &broker,
                v,
                &["-t", &topic, "-q", "1", "-m", &format!("queued {i}")],
            );
        }
        let child = mosquitto(
            &broker,
            "mosquitto_sub",
            v,
            &[
                "-c", "-i", &id, "-q", "1", "-t", &topic, "-C", "3", "-W", "5",
            ],
        )
        .spawn()
        .expect("spawn mosquitto_sub");
        let out = finish(child, "mosquitto_sub -c");
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(out.status.success(), "{v}: {stdout}");
        assert_eq!(
            stdout.lines().collect::<Vec<_>>(),
            ["queued 1", "queued 2", "queued 3"],
            "{v}"
        );
    }
}

/// A Paho (paho-mqtt 2.x) scenario: a subscriber on `paho/<v>/#` at QoS 2;
/// a publisher sending at QoS 1 and 2 (MQTT 5: with user properties); a
/// third client with a will whose socket is then closed without
/// DISCONNECT. Prints one JSON object: what the subscriber received and
/// the publisher's acknowledgement reasons.
const PAHO_SCENARIO: &str = r#"
import json, sys, threading, time
import paho.mqtt.client as mqtt
from paho.mqtt.properties import Properties
from paho.mqtt.packettypes import PacketTypes

host, port, version = sys.argv[1], int(sys.argv[2]), sys.argv[3]
v5 = version == "5"
proto = mqtt.MQTTv5 if v5 else mqtt.MQTTv311
prefix = "paho/" + version
received, acks, lock = [], [], threading.Lock()

def fail(why):
    print(json.dumps({"error": why}))
    sys.exit(1)

def client(cid):
    return mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=cid, protocol=proto)

def connect(c):
    up = threading.Event()
    outcome = {}
    def on_connect(cl, ud, flags, rc, props):
        outcome["rc"] = str(rc)
        outcome["failed"] = rc.is_failure
        up.set()
    c.on_connect = on_connect
    c.connect(host, port, keepalive=30)
    c.loop_start()
    if not up.wait(10) or outcome["failed"]:
        fail("connect: %s" % outcome)

def user_properties(props, packet_type):
    p = Properties(packet_type)
    p.UserProperty = props
    return p

sub = client("paho-sub-" + version)
subscribed = threading.Event()
def on_message(cl, ud, m):
    entry = {"topic": m.topic, "payload": m.payload.decode(), "qos": m.qos}
    props = getattr(m, "properties", None)
    if v5 and props is not None and hasattr(props, "UserProperty"):
        entry["user_properties"] = [list(kv) for kv in props.UserProperty]
    with lock:
        received.append(entry)
sub.on_message = on_message
sub.on_subscribe = lambda cl, ud, mid, rcs, props: subscribed.set()
connect(sub)
sub.subscribe(prefix + "/#", qos=2)
if not subscribed.wait(10):
    fail("no SUBACK")

pub = client("paho-pub-" + version)
pub.on_publish = lambda cl, ud, mid, rc, props: acks.append(str(rc))
connect(pub)
for qos in (1, 2):
    props = None
    if v5:
        props = user_properties(
            [("trace", "q%d" % qos), ("lang", "fr"), ("lang", "en")], PacketTypes.PUBLISH
        )
    info = pub.publish("%s/q%d" % (prefix, qos), "hello q%d" % qos, qos=qos, properties=props)
    info.wait_for_publish(10)
    if not info.is_published():
        fail("publish at QoS %d not acknowledged" % qos)

will = client("paho-will-" + version)
will_props = user_properties([("why", "crash")], PacketTypes.WILLMESSAGE) if v5 else None
will.will_set(prefix + "/will", "gone", qos=1, properties=will_props)
connect(will)
will.loop_stop()
will.socket().close()  # no DISCONNECT: the will is due

deadline = time.time() + 10
while time.time() < deadline:
    with lock:
        if len(received) >= 3:
            break
    time.sleep(0.05)
time.sleep(0.3)  # anything unexpected after the third message
pub.disconnect()
sub.disconnect()
with lock:
    print(json.dumps({"received": received, "acks": acks}))
"#;

/// Runs the Paho scenario in `version` ("4" or "5") and returns its JSON.
fn paho(broker: &Broker, version: &str) -> Option<serde_json::Value> {
    if !available("python3", &["-c", "import paho.mqtt.client"]) {
        return None;
    }
    let script = broker.dir().join("paho_scenario.py");
    std::fs::write(&script, PAHO_SCENARIO).expect("write script");
    let stdout = succeed(
        Command::new("python3").arg(&script).args([
            &broker.host(),
            &broker.port().to_string(),
            version,
        ]),
        "the paho scenario",
        PATIENCE * 2,
    );
    Some(serde_json::from_str(stdout.trim()).expect("JSON from the paho scenario"))
}

fn entry(topic: &str, payload: &str, qos: u64) -> serde_json::Value {
    serde_json::json!({ "topic": topic, "payload": payload, "qos": qos })
}

// Paho in MQTT 3.1.1: QoS 1 and QoS 2 messages arrive once each, in
// order, at their QoS; a client whose connection is lost without
// DISCONNECT has its will published [MQTT-3.1.2-8].
#[test]
fn paho_v311_pub_sub_and_will() {
    let broker = Broker::start(OPEN);
    let Some(got) = paho(&broker, "4") else {
        return;
    };
    assert_eq!(
        got["received"],
        serde_json::json!([
            entry("paho/4/q1", "hello q1", 1),
            entry("paho/4/q2", "hello q2", 2),
            entry("paho/4/will", "gone", 1),
        ]),
        "{got}"
    );
}

// Paho in MQTT 5: the same, and user properties travel unchanged and in
// order, repeated names included, on messages [MQTT-3.3.2-17],
// [MQTT-3.3.2-18] and on the will; the publisher's acks say Success.
#[test]
fn paho_v5_pub_sub_will_and_user_properties() {
    let broker = Broker::start(OPEN);
    let Some(got) = paho(&broker, "5") else {
        return;
    };
    let with_props = |topic: &str, payload: &str, qos: u64, props: serde_json::Value| {
        let mut e = entry(topic, payload, qos);
        e["user_properties"] = props;
        e
    };
    assert_eq!(
        got["received"],
        serde_json::json!([
            with_props(
                "paho/5/q1",
                "hello q1",
                1,
                serde_json::json!([["trace", "q1"], ["lang", "fr"], ["lang", "en"]])
            ),
            with_props(
                "paho/5/q2",
                "hello q2",
                2,
                serde_json::json!([["trace", "q2"], ["lang", "fr"], ["lang", "en"]])
            ),
            with_props(
                "paho/5/will",
                "gone",
                1,
                serde_json::json!([["why", "crash"]])
            ),
        ]),
        "{got}"
    );
    assert_eq!(
        got["acks"],
        serde_json::json!(["Success", "Success"]),
        "{got}"
    );
}
