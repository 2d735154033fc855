//! Live reload as an operator does it: edit the configuration file, send
//! SIGHUP (or `POST /v1/admin/reload`), and the running broker takes the
//! new certificate, users and ACL rules without dropping a connection; a
//! bad file changes nothing and says which key is wrong.

use std::path::Path;
use std::process::Command;

use chatmq_tests::chat::{self, token};
use chatmq_tests::http::Http;
use chatmq_tests::metrics::metric_becomes;
use chatmq_tests::raw;
use chatmq_tests::tls::TestPki;
use chatmq_tests::{v5, Broker, PATIENCE};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, ServerName};
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;

const ADMIN: &str = "reload-admin-token";
const APPLIED: &str = "chatmq_config_reloads_total{result=\"applied\"}";
const FAILED: &str = "chatmq_config_reloads_total{result=\"failed\"}";

/// Replaces the broker's configuration file, as an operator edits it.
fn rewrite(b: &Broker, config: &str) {
    std::fs::write(b.dir().join("chatmq.toml"), config).expect("rewrite config");
}

fn hangup(b: &Broker) {
    let pid = b.pid().expect("running");
    let status = Command::new("kill")
        .arg("-HUP")
        .arg(pid.to_string())
        .status()
        .expect("kill -HUP");
    assert!(status.success());
}

fn admin(b: &Broker) -> Http {
    Http::new(b.http_addr).with_token(ADMIN)
}

/// The log lines that contain `needle`.
fn log_lines(b: &Broker, needle: &str) -> Vec<String> {
    b.log()
        .lines()
        .filter(|l| l.contains(needle))
        .map(str::to_string)
        .collect()
}

/// A TLS connection to `addr` trusting only `pki`'s CA.
async fn tls_connect(
    pki: &TestPki,
    addr: std::net::SocketAddr,
) -> std::io::Result<TlsStream<TcpStream>> {
    let name = ServerName::try_from("localhost").expect("name");
    let tcp = TcpStream::connect(addr).await?;
    TlsConnector::from(pki.client_config())
        .connect(name, tcp)
        .await
}

/// The leaf certificate the server presented.
fn presented(stream: &TlsStream<TcpStream>) -> Vec<u8> {
    let (_, session) = stream.get_ref();
    let chain = session.peer_certificates().expect("a certificate");
    chain[0].as_ref().to_vec()
}

/// The leaf certificate of a PEM chain file.
fn leaf(path: &Path) -> Vec<u8> {
    let first = CertificateDer::pem_file_iter(path)
        .expect("cert file")
        .next()
        .expect("a certificate")
        .expect("PEM");
    first.as_ref().to_vec()
}

/// Reads exactly `n` bytes within PATIENCE.
async fn read_n<S: AsyncReadExt + Unpin>(stream: &mut S, n: usize) -> Vec<u8> {
    let mut buf = vec![0u8; n];
    tokio::time::timeout(PATIENCE, stream.read_exact(&mut buf))
        .await
        .expect("an answer in time")
        .expect("read");
    buf
}

/// An anonymous MQTT 3.1.1 session over `stream`: CONNECT, then CONNACK.
async fn mqtt_connect<S: AsyncReadExt + AsyncWriteExt + Unpin>(stream: &mut S, id: &str) {
    stream.write_all(&raw::connect_v4(id)).await.expect("write");
    assert_eq!(read_n(stream, 4).await, [0x20, 0x02, 0x00, 0x00]);
}

/// PINGREQ answered by PINGRESP: the session is alive.
async fn ping<S: AsyncReadExt + AsyncWriteExt + Unpin>(stream: &mut S) {
    stream
        .write_all(&[0xC0, 0x00])
        .await
        .expect("write PINGREQ");
    assert_eq!(read_n(stream, 2).await, [0xD0, 0x00], "PINGRESP");
}

#[tokio::test]
async fn a_certificate_rotated_under_a_connected_client() {
    let dir = tempfile::tempdir().expect("temp dir");
    let old = TestPki::new(dir.path());
    let renewed_dir = dir.path().join("renewed");
    std::fs::create_dir_all(&renewed_dir).expect("mkdir");
    // The renewal comes from another CA, so which one a client sees is
    // beyond doubt.
    let renewed = TestPki::new(&renewed_dir);
    let config = format!(
        "[auth]\nallow_anonymous = true\nadmin_token = \"{ADMIN}\"\n{}{}",
        old.section("mqtt.tls"),
        old.section("websocket.tls")
    );
    let b = Broker::start(&config);
    let addr = b.listener("mqtt-tls");
    let wss = b.listener("websocket-tls");

    let mut before = tls_connect(&old, addr).await.expect("TLS handshake");
    assert_eq!(presented(&before), leaf(&old.cert));
    mqtt_connect(&mut before, "before-rotation").await;

    // The operator's renewal job writes the new files in place, then HUPs.
    std::fs::copy(&renewed.cert, &old.cert).expect("new cert");
    std::fs::copy(&renewed.key, &old.key).expect("new key");
    hangup(&b);
    metric_becomes(&b, APPLIED, 1.0).await;

    ping(&mut before).await;
    let mut after = tls_connect(&renewed, addr)
        .await
        .expect("a new handshake trusts the renewed certificate");
    assert_eq!(presented(&after), leaf(&renewed.cert));
    mqtt_connect(&mut after, "after-rotation").await;
    assert!(
        tls_connect(&old, addr).await.is_err(),
        "the old certificate is no longer presented"
    );
    ping(&mut before).await;
    // The secure WebSocket listener shares the files, and the renewal.
    let secure_ws = tls_connect(&renewed, wss).await.expect("wss handshake");
    assert_eq!(presented(&secure_ws), leaf(&renewed.cert));
    assert!(log_lines(&b, "ERROR").is_empty(), "{}", b.log());
}

#[tokio::test]
async fn an_unreadable_certificate_keeps_the_old_one_and_names_the_file() {
    let dir = tempfile::tempdir().expect("temp dir");
    let pki = TestPki::new(dir.path());
    let config = format!(
        "[auth]\nallow_anonymous = true\nadmin_token = \"{ADMIN}\"\n{}",
        pki.section("mqtt.tls")
    );
    let b = Broker::start(&config);
    let addr = b.listener("mqtt-tls");
    let mut connected = tls_connect(&pki, addr).await.expect("TLS handshake");
    mqtt_connect(&mut connected, "connected").await;

    std::fs::write(&pki.cert, "not a certificate\n").expect("garble");
    // The same reload would also turn anonymous access off: all or nothing.
    rewrite(
        &b,
        &config.replace("allow_anonymous = true", "allow_anonymous = false"),
    );
    let answer = admin(&b).post("/v1/admin/reload", &json!({})).await;
    assert_eq!(answer.status, 422, "{}", answer.text());
    assert_eq!(answer.error_code(), "invalid_config");
    let message = answer.json()["error"]["message"].to_string();
    assert!(message.contains("mqtt.tls.cert"), "{message}");

    let lines = log_lines(&b, "configuration reload failed");
    assert_eq!(lines.len(), 1, "{}", b.log());
    assert!(lines[0].contains("mqtt.tls.cert"), "{}", lines[0]);
    assert_eq!(log_lines(&b, "mqtt.tls.cert").len(), 1, "{}", b.log());

    let mut fresh = tls_connect(&pki, addr)
        .await
        .expect("new handshakes still get the old certificate");
    mqtt_connect(&mut fresh, "fresh-anonymous").await;
    ping(&mut connected).await;
    metric_becomes(&b, FAILED, 1.0).await;
    metric_becomes(&b, APPLIED, 0.0).await;
}

fn acl_config(rules: &[(&str, &str)]) -> String {
    let rules: String = rules
        .iter()
        .map(|(topic, access)| {
            format!("[[acl.rules]]\nuser = \"*\"\ntopic = \"{topic}\"\naccess = \"{access}\"\n")
        })
        .collect();
    chat::config(&rules)
}

#[tokio::test]
async fn an_acl_rule_removed_refuses_new_subscriptions_and_the_connection_stays() {
    let b = Broker::start(&acl_config(&[
        ("news/#", "sub"),
        ("news/#", "pub"),
        ("sensors/#", "sub"),
    ]));
    let mut o = v5::options(b.addr, "alice-acl");
    o.set_credentials("alice", token("alice"));
    let mut alice = v5::connect(o).await.expect("alice connects");
    let granted = alice.subscribe("news/today", v5::QoS::AtLeastOnce).await;
    assert!(
        matches!(granted.return_codes[0], v5::SubscribeReasonCode::Success(_)),
        "{granted:?}"
    );

    rewrite(&b, &acl_config(&[("news/#", "pub"), ("sensors/#", "sub")]));
    hangup(&b);
    metric_becomes(&b, APPLIED, 1.0).await;

    let refused = alice.subscribe("news/tomorrow", v5::QoS::AtLeastOnce).await;
    assert_eq!(
        refused.return_codes,
        [v5::SubscribeReasonCode::NotAuthorized],
        "the rule is gone"
    );
    let still = alice.subscribe("sensors/t", v5::QoS::AtLeastOnce).await;
    assert!(
        matches!(still.return_codes[0], v5::SubscribeReasonCode::Success(_)),
        "the same connection goes on: {still:?}"
    );
    // A subscription granted before the reload is not checked again (as
    // in Mosquitto and EMQX).
    let mut o = v5::options(b.addr, "bob-acl");
    o.set_credentials("bob", token("bob"));
    let mut bob = v5::connect(o).await.expect("bob connects");
    bob.publish_acked("news/today", v5::QoS::AtLeastOnce, false, b"headline")
        .await;
    let got = alice.publish().await;
    assert_eq!(
        (&got.topic[..], &got.payload[..]),
        (&b"news/today"[..], &b"headline"[..])
    );
}

fn users_config(users: &[(&str, &str)]) -> String {
    let users: String = users
        .iter()
        .map(|(name, password)| {
            format!("[[auth.users]]\nname = \"{name}\"\npassword = \"{password}\"\n")
        })
        .collect();
    format!(
        "[auth]\nadmin_token = \"{ADMIN}\"\njwt_secret = \"{}\"\n{users}",
        chat::SECRET
    )
}

async fn login(
    b: &Broker,
    user: &str,
    password: &str,
) -> Result<v5::Client, v5::ConnectReturnCode> {
    let mut o = v5::options(b.addr, &format!("{user}-{password}"));
    o.set_credentials(user, password);
    match v5::connect(o).await {
        Ok(c) => Ok(c),
        Err(v5::ConnectionError::ConnectionRefused(code)) => Err(code),
        Err(e) => panic!("{user}: {e}"),
    }
}

#[tokio::test]
async fn a_user_added_can_log_in_and_a_user_removed_cannot_log_in_again() {
    let b = Broker::start(&users_config(&[("alice", "alice-pw")]));
    let mut alice = login(&b, "alice", "alice-pw").await.expect("alice");
    assert_eq!(
        login(&b, "bob", "bob-pw").await.err(),
        Some(v5::ConnectReturnCode::BadUserNamePassword)
    );

    rewrite(&b, &users_config(&[("bob", "bob-pw")]));
    let answer = admin(&b).post("/v1/admin/reload", &json!({})).await;
    assert_eq!(answer.status, 200, "{}", answer.text());
    assert_eq!(
        answer.json(),
        json!({"status": "reloaded", "restart_needed": []})
    );

    let _bob = login(&b, "bob", "bob-pw").await.expect("bob was added");
    assert_eq!(
        login(&b, "alice", "alice-pw").await.err(),
        Some(v5::ConnectReturnCode::BadUserNamePassword),
        "alice was removed"
    );
    // Connected clients stay connected (as in Mosquitto).
    let ack = alice
        .subscribe("users/alice/events", v5::QoS::AtLeastOnce)
        .await;
    assert!(
        matches!(ack.return_codes[0], v5::SubscribeReasonCode::Success(_)),
        "{ack:?}"
    );
}

#[tokio::test]
async fn a_bad_file_keeps_the_running_settings_and_names_the_key() {
    let good = users_config(&[("alice", "alice-pw")]);
    let b = Broker::start(&good);

    rewrite(&b, &format!("{good}\n[mqtt]\nmax_paylod = 10\n"));
    hangup(&b);
    metric_becomes(&b, FAILED, 1.0).await;
    let lines = log_lines(&b, "mqtt.max_paylod");
    assert_eq!(lines.len(), 1, "one line naming the key:\n{}", b.log());
    assert!(
        lines[0].contains("configuration reload failed"),
        "{}",
        lines[0]
    );
    login(&b, "alice", "alice-pw")
        .await
        .expect("the running users are kept");

    let answer = admin(&b).post("/v1/admin/reload", &json!({})).await;
    assert_eq!(answer.status, 422, "{}", answer.text());
    assert_eq!(answer.error_code(), "invalid_config");
    assert!(
        answer.text().contains("mqtt.max_paylod"),
        "{}",
        answer.text()
    );

    // A wrong value, not only a wrong key, is refused the same way.
    rewrite(
        &b,
        &good.replace("alice-pw", "$argon2id$v=19$m=19456,t=2,p=1$%%%$%%%"),
    );
    let answer = admin(&b).post("/v1/admin/reload", &json!({})).await;
    assert_eq!(answer.status, 422, "{}", answer.text());
    assert!(answer.text().contains("alice"), "{}", answer.text());
    login(&b, "alice", "alice-pw").await.expect("still kept");
    metric_becomes(&b, FAILED, 3.0).await;
    metric_becomes(&b, APPLIED, 0.0).await;
}

#[tokio::test]
async fn the_admin_reload_needs_the_admin_token_and_names_keys_that_need_a_restart() {
    let config = users_config(&[]);
    let b = Broker::start(&config);
    let anyone = Http::new(b.http_addr);
    let answer = anyone.post("/v1/admin/reload", &json!({})).await;
    assert_eq!(answer.status, 401, "{}", answer.text());
    let user = anyone.with_token(&token("alice"));
    let answer = user.post("/v1/admin/reload", &json!({})).await;
    assert_eq!(answer.status, 403, "{}", answer.text());
    metric_becomes(&b, APPLIED, 0.0).await;
    metric_becomes(&b, FAILED, 0.0).await;

    rewrite(&b, &format!("{config}\n[mqtt]\nmax_payload = 1000\n"));
    let answer = admin(&b).post("/v1/admin/reload", &json!({})).await;
    assert_eq!(answer.status, 200, "{}", answer.text());
    assert_eq!(answer.json()["restart_needed"], json!(["mqtt.max_payload"]));
    let lines = log_lines(&b, "mqtt.max_payload");
    assert_eq!(lines.len(), 1, "{}", b.log());
    assert!(lines[0].contains("only after a restart"), "{}", lines[0]);
    metric_becomes(&b, APPLIED, 1.0).await;
}

#[tokio::test]
async fn a_lower_publish_rate_applies_to_a_connected_client() {
    let rules = acl_config(&[("sensors/#", "pub")]);
    let b = Broker::start(&rules);
    let mut o = v5::options(b.addr, "alice-rate");
    o.set_credentials("alice", token("alice"));
    let mut alice = v5::connect(o).await.expect("alice connects");
    let reason = |ack: Option<v5::Packet>| match ack {
        Some(v5::Packet::PubAck(a)) => a.reason,
        other => panic!("expected a PUBACK, got {other:?}"),
    };
    for _ in 0..3 {
        let ack = alice
            .publish_acked("sensors/t", v5::QoS::AtLeastOnce, false, b"x")
            .await;
        assert_eq!(reason(ack), v5::PubAckReason::Success);
    }

    rewrite(
        &b,
        &format!("{rules}\n[mqtt]\npublish_rate = 1\npublish_burst = 1\n"),
    );
    hangup(&b);
    metric_becomes(&b, APPLIED, 1.0).await;
    let mut reasons = Vec::new();
    for _ in 0..3 {
        let ack = alice
            .publish_acked("sensors/t", v5::QoS::AtLeastOnce, false, b"x")
            .await;
        reasons.push(reason(ack));
    }
    assert!(
        reasons.contains(&v5::PubAckReason::QuotaExceeded),
        "one per second now, on the same connection: {reasons:?}"
    );
}
