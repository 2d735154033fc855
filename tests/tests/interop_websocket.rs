//! Independent clients over WebSocket and TLS: Eclipse Paho for Python
//! (its `websockets` transport and `tls_set`) and the Mosquitto command-line
//! clients (`--cafile`). `scripts/setup.sh --test` installs them; a test
//! whose tool is missing says so on stderr and checks nothing.

use chatmq_tests::chat::{self, token};
use chatmq_tests::tls::TestPki;
use chatmq_tests::tools::{available, mosquitto_available, succeed};
use chatmq_tests::{Broker, PATIENCE};
use serde_json::{json, Value};
use std::process::{Command, Stdio};

/// The scenario, in Paho's own words. Its one argument is a JSON object
/// with the addresses, tokens and protocol version; it prints one JSON
/// object with what each client saw.
const PAHO_CHAT: &str = r#"
import json, ssl, sys, threading, time
import paho.mqtt.client as mqtt
from paho.mqtt.properties import Properties
from paho.mqtt.packettypes import PacketTypes

cfg = json.loads(sys.argv[1])
v5 = cfg["version"] == 5
PROTO = mqtt.MQTTv5 if v5 else mqtt.MQTTv311
out = {}

def fail(msg):
    print(json.dumps({"error": msg}))
    sys.exit(1)

class Peer:
    """One client: connects, collects chat deliveries, records CONNACK."""
    def __init__(self, client_id, user, transport, port, tls=False, persistent=False):
        self.got = []
        self.lock = threading.Lock()
        self.up = threading.Event()
        self.session_present = None
        self.c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id,
                             transport=transport, protocol=PROTO,
                             clean_session=None if v5 else (not persistent))
        if transport == "websockets":
            self.c.ws_set_options(path=cfg["ws_path"])
        if tls:
            self.c.tls_set(ca_certs=cfg["ca"])
        self.c.username_pw_set(user, cfg["tokens"][user])
        self.c.on_connect = self.on_connect
        self.c.on_message = self.on_message
        props = None
        if v5:
            props = Properties(PacketTypes.CONNECT)
            props.SessionExpiryInterval = 600 if persistent else 0
        self.c.connect(cfg["host"], port, keepalive=30,
                       clean_start=(not persistent) if v5 else mqtt.MQTT_CLEAN_START_FIRST_ONLY,
                       properties=props)
        self.c.loop_start()
        if not self.up.wait(10):
            fail("%s: no CONNACK" % client_id)
        if self.refused:
            fail("%s: refused: %s" % (client_id, self.refused))

    def on_connect(self, c, ud, flags, rc, props):
        self.refused = str(rc) if rc.is_failure else None
        self.session_present = bool(flags.session_present)
        self.up.set()

    def on_message(self, c, ud, m):
        with self.lock:
            self.got.append(json.loads(m.payload))

    def subscribe(self, topic):
        done = threading.Event()
        self.c.on_subscribe = lambda c, ud, mid, rcs, props: done.set()
        self.c.subscribe(topic, qos=1)
        if not done.wait(10):
            fail("no SUBACK for " + topic)

    def send(self, conv, msg_id, text):
        env = json.dumps({"id": msg_id, "body": {"text": text}})
        info = self.c.publish("chat/" + conv, env, qos=1)
        info.wait_for_publish(10)
        if not info.is_published():
            fail("not acknowledged: " + msg_id)

    def wait_for(self, n):
        deadline = time.time() + 10
        while time.time() < deadline:
            with self.lock:
                if len(self.got) >= n:
                    break
            time.sleep(0.05)
        time.sleep(0.3)  # anything extra would show up now
        with self.lock:
            return [(m["conv"], m["seq"], m["from"], m["id"]) for m in self.got]

    def close(self):
        self.c.disconnect()
        self.c.loop_stop()

# 1. Two users chat, both over WebSocket.
alice = Peer("alice-paho", "alice", "websockets", cfg["ws_port"])
bob = Peer("bob-paho", "bob", "websockets", cfg["ws_port"])
alice.subscribe("chat/+")
bob.subscribe("chat/+")
for i in range(3):
    alice.send("dm:alice:bob", "a%d" % i, "hello %d" % i)
for i in range(2):
    bob.send("dm:alice:bob", "b%d" % i, "hi %d" % i)
out["alice"] = alice.wait_for(5)
out["bob"] = bob.wait_for(5)

# 2. carol's session starts over TCP and resumes over WebSocket.
carol = Peer("carol-app", "carol", "tcp", cfg["tcp_port"], persistent=True)
carol.subscribe("chat/+")
carol.close()
time.sleep(0.2)
alice.send("dm:alice:carol", "c0", "while you were away")
alice.send("dm:alice:carol", "c1", "and again")
carol = Peer("carol-app", "carol", "websockets", cfg["ws_port"], persistent=True)
out["carol_session_present"] = carol.session_present
out["carol"] = carol.wait_for(2)
carol.close()

# 3. Over TLS and secure WebSocket, when the broker has them.
if cfg.get("tls_port"):
    for name, transport, port in (("tls", "tcp", cfg["tls_port"]),
                                  ("wss", "websockets", cfg["wss_port"])):
        dave = Peer("dave-" + name, "dave", transport, port, tls=True)
        dave.subscribe("chat/+")
        dave.send("dm:alice:dave", "d-" + name, "over " + name)
        out["dave_" + name] = dave.wait_for(1)
        dave.close()

alice.close()
bob.close()
print(json.dumps(out))
"#;

/// Runs the Paho scenario and returns what it printed.
fn paho_chat(b: &Broker, version: u8, pki: Option<&TestPki>) -> Option<Value> {
    if !available("python3", &["-c", "import paho.mqtt.client"]) {
        return None;
    }
    let tokens: serde_json::Map<String, Value> = ["alice", "bob", "carol", "dave"]
        .iter()
        .map(|u| (u.to_string(), Value::String(token(u))))
        .collect();
    let mut cfg = json!({
        "version": version,
        "host": "127.0.0.1",
        "tcp_port": b.addr.port(),
        "ws_port": b.ws_addr().port(),
        "ws_path": "/mqtt",
        "tokens": tokens,
    });
    if let Some(pki) = pki {
        cfg["ca"] = json!(pki.ca);
        cfg["tls_port"] = json!(b.listener("mqtt-tls").port());
        cfg["wss_port"] = json!(b.listener("websocket-tls").port());
    }
    let script = b.dir().join("paho_chat.py");
    std::fs::write(&script, PAHO_CHAT).expect("write script");
    let stdout = succeed(
        Command::new("python3").arg(&script).arg(cfg.to_string()),
        "the paho scenario",
        PATIENCE * 4,
    );
    Some(serde_json::from_str(stdout.trim()).expect("JSON from the paho scenario"))
}

fn row(conv: &str, seq: u64, from: &str, id: &str) -> Value {
    json!([conv, seq, from, id])
}

fn check_paho_chat(out: &Value) {
    let dm = "dm:alice:bob";
    let expected = json!([
        row(dm, 1, "alice", "a0"),
        row(dm, 2, "alice", "a1"),
        row(dm, 3, "alice", "a2"),
        row(dm, 4, "bob", "b0"),
        row(dm, 5, "bob", "b1"),
    ]);
    assert_eq!(
        out["alice"], expected,
        "alice over WebSocket: every message once, in order"
    );
    assert_eq!(
        out["bob"], expected,
        "bob over WebSocket: every message once, in order"
    );
    assert_eq!(
        out["carol_session_present"], true,
        "the TCP session resumed over WebSocket"
    );
    assert_eq!(
        out["carol"],
        json!([
            row("dm:alice:carol", 1, "alice", "c0"),
            row("dm:alice:carol", 2, "alice", "c1")
        ]),
        "what was queued for carol arrives over WebSocket"
    );
}

#[test]
fn paho_v311_chats_over_websocket_and_resumes_a_tcp_session() {
    let b = Broker::start(&chat::config(""));
    if let Some(out) = paho_chat(&b, 4, None) {
        check_paho_chat(&out);
    }
}

#[test]
fn paho_v5_chats_over_websocket_and_resumes_a_tcp_session() {
    let b = Broker::start(&chat::config(""));
    if let Some(out) = paho_chat(&b, 5, None) {
        check_paho_chat(&out);
    }
}

#[test]
fn paho_over_tls_and_secure_websocket_under_both_versions() {
    let dir = tempfile::tempdir().expect("temp dir");
    let pki = TestPki::new(dir.path());
    let config = chat::config(&format!(
        "{}\n{}",
        pki.section("mqtt.tls"),
        pki.section("websocket.tls")
    ));
    for version in [4, 5] {
        let b = Broker::start(&config);
        let Some(out) = paho_chat(&b, version, Some(&pki)) else {
            return;
        };
        check_paho_chat(&out);
        assert_eq!(
            out["dave_tls"],
            json!([row("dm:alice:dave", 1, "dave", "d-tls")]),
            "v{version} over TLS"
        );
        assert_eq!(
            out["dave_wss"],
            json!([row("dm:alice:dave", 2, "dave", "d-wss")]),
            "v{version} over wss"
        );
    }
}

#[test]
fn mosquitto_clients_over_tls_with_the_test_ca() {
    if !mosquitto_available() {
        return;
    }
    let dir = tempfile::tempdir().expect("temp dir");
    let pki = TestPki::new(dir.path());
    let config = format!("{}\n{}", chatmq_tests::OPEN, pki.section("mqtt.tls"));
    let b = Broker::start(&config);
    let port = b.listener("mqtt-tls").port().to_string();
    let ca = pki.ca.display().to_string();
    let tls_args = ["-h", "127.0.0.1", "-p", &port, "--cafile", &ca];
    // Retained, so the subscriber gets them whenever it is ready.
    for (topic, msg) in [("tls/a", "over tls 1"), ("tls/b", "over tls 2")] {
        let status = Command::new("mosquitto_pub")
            .args(tls_args)
            .args(["-t", topic, "-m", msg, "-q", "1", "-r", "-i", "mosq-pub"])
            .status()
            .expect("run mosquitto_pub");
        assert!(status.success(), "mosquitto_pub over TLS failed");
    }
    let stdout = succeed(
        Command::new("mosquitto_sub").args(tls_args).args([
            "-t", "tls/#", "-q", "1", "-C", "2", "-W", "20", "-v", "-i", "mosq-sub",
        ]),
        "mosquitto_sub",
        PATIENCE * 2,
    );
    let mut lines: Vec<&str> = stdout.lines().collect();
    lines.sort();
    assert_eq!(lines, ["tls/a over tls 1", "tls/b over tls 2"]);

    // A client that does not trust the server's CA is refused by its own
    // verification: the certificate really is the configured one.
    let other_dir = dir.path().join("other");
    std::fs::create_dir_all(&other_dir).expect("mkdir");
    let other_ca = TestPki::new(&other_dir).ca.display().to_string();
    let status = Command::new("mosquitto_pub")
        .args(["-h", "127.0.0.1", "-p", &port, "--cafile", &other_ca])
        .args(["-t", "tls/x", "-m", "x", "-q", "1"])
        .stderr(Stdio::null())
        .status()
        .expect("run mosquitto_pub");
    assert!(!status.success(), "a client trusting another CA must fail");
}
