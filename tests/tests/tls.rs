//! TLS for MQTT (`[mqtt.tls]`) and WebSocket (`[websocket.tls]`) with a
//! throwaway CA made at test time: rustls clients that trust only that CA,
//! rumqttc over TLS and `wss://`, and what an operator sees when the
//! certificate files are wrong.

use std::time::Duration;

use chatmq_tests::chat::{self, envelope, json_of, token};
use chatmq_tests::raw::{self, Wire};
use chatmq_tests::tls::TestPki;
use chatmq_tests::{run_chatmq, the_error_line, v4, v5, Broker, OPEN, PATIENCE};
use rumqttc::{TlsConfiguration, Transport};
use rustls_pki_types::ServerName;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

fn tls_config(pki: &TestPki) -> String {
    chat::config(&format!(
        "{}\n{}",
        pki.section("mqtt.tls"),
        pki.section("websocket.tls")
    ))
}

fn simple(pki: &TestPki) -> TlsConfiguration {
    TlsConfiguration::Simple {
        ca: pki.ca_pem(),
        alpn: None,
        client_auth: None,
    }
}

#[tokio::test]
async fn rumqttc_chats_over_tls_and_secure_websocket() {
    let dir = tempfile::tempdir().expect("temp dir");
    let pki = TestPki::new(dir.path());
    let b = Broker::start(&tls_config(&pki));
    let tls = b.listener("mqtt-tls");
    let wss = b.listener("websocket-tls");

    // alice: MQTT 5 over TLS.
    let mut o = v5::MqttOptions::new("alice-tls", "127.0.0.1", tls.port());
    o.set_transport(Transport::tls_with_config(simple(&pki)));
    o.set_credentials("alice", token("alice"));
    let mut alice = chat::v5_login(o).await;
    // bob: 3.1.1 over wss.
    let mut o = v4::MqttOptions::new(
        "bob-wss",
        format!("wss://127.0.0.1:{}/mqtt", wss.port()),
        wss.port(),
    );
    o.set_transport(Transport::wss_with_config(simple(&pki)));
    o.set_credentials("bob", token("bob"));
    let mut bob = chat::v4_login(o).await;

    bob.subscribe("chat/+", v4::QoS::AtLeastOnce).await;
    alice
        .publish_acked(
            "chat/dm:alice:bob",
            v5::QoS::AtLeastOnce,
            false,
            &envelope("t1", "secret"),
        )
        .await;
    let got = json_of(&bob.publish().await.payload);
    assert_eq!(
        (got["seq"].as_u64(), got["from"].as_str()),
        (Some(1), Some("alice"))
    );
    assert_eq!(got["body"]["text"], "secret");
}

#[tokio::test]
async fn the_server_presents_the_configured_certificate() {
    let dir = tempfile::tempdir().expect("temp dir");
    let pki = TestPki::new(dir.path());
    let b = Broker::start(&format!("{OPEN}\n{}", pki.section("mqtt.tls")));
    let addr = b.listener("mqtt-tls");
    let name = ServerName::try_from("localhost").expect("name");

    // Trusting the test CA: the handshake succeeds and MQTT works.
    let connector = TlsConnector::from(pki.client_config());
    let tcp = TcpStream::connect(addr).await.expect("connect");
    let mut stream = connector
        .connect(name.clone(), tcp)
        .await
        .expect("TLS handshake");
    stream
        .write_all(&raw::connect_v4("raw-tls"))
        .await
        .expect("write");
    let mut connack = [0u8; 4];
    tokio::time::timeout(PATIENCE, stream.read_exact(&mut connack))
        .await
        .expect("CONNACK in time")
        .expect("read");
    assert_eq!(connack, [0x20, 0x02, 0x00, 0x00]);

    // Trusting another CA: verification fails on the client side.
    let other_dir = dir.path().join("other");
    std::fs::create_dir_all(&other_dir).expect("mkdir");
    let other = TestPki::new(&other_dir);
    let connector = TlsConnector::from(other.client_config());
    let tcp = TcpStream::connect(addr).await.expect("connect");
    assert!(
        connector.connect(name, tcp).await.is_err(),
        "an untrusted chain must fail"
    );
}

#[tokio::test]
async fn plain_mqtt_on_the_tls_port_is_closed_and_the_broker_serves_on() {
    let dir = tempfile::tempdir().expect("temp dir");
    let pki = TestPki::new(dir.path());
    let b = Broker::start(&format!("{OPEN}\n{}", pki.section("mqtt.tls")));
    let mut wire = Wire::open(b.listener("mqtt-tls")).await;
    wire.send(&raw::connect_v4("plaintext")).await;
    assert!(wire.closed_within(PATIENCE).await, "not TLS: closed");
    let _still = v5::connect_ok(b.addr, "after").await;
}

#[tokio::test]
async fn a_silent_tls_socket_is_closed_after_the_handshake_timeout() {
    let dir = tempfile::tempdir().expect("temp dir");
    let pki = TestPki::new(dir.path());
    let section = pki.section("mqtt.tls") + "handshake_timeout_secs = 1\n";
    let b = Broker::start(&format!("{OPEN}\n{section}"));
    let mut wire = Wire::open(b.listener("mqtt-tls")).await;
    assert!(
        !wire.closed_within(Duration::from_millis(400)).await,
        "open before the timeout"
    );
    assert!(
        wire.closed_within(Duration::from_secs(3)).await,
        "closed after it"
    );
}

/// Starts `chatmq serve` with `config` and returns its one stderr line; it
/// must exit non-zero within PATIENCE.
fn failed_start(dir: &std::path::Path, config: &str) -> String {
    let path = dir.join("chatmq.toml");
    std::fs::write(&path, config).expect("write config");
    let data = dir.join("data").display().to_string();
    let config = path.display().to_string();
    let out = run_chatmq(
        dir,
        &["serve", "--config", &config],
        &[
            ("CHATMQ__NODE__DATA_DIR", &data),
            ("CHATMQ__MQTT__LISTEN", "127.0.0.1:0"),
            ("CHATMQ__HTTP__LISTEN", "127.0.0.1:0"),
            ("CHATMQ__WEBSOCKET__LISTEN", "127.0.0.1:0"),
        ],
    );
    the_error_line(&out)
}

#[test]
fn a_mismatched_certificate_and_key_stop_the_start_naming_the_section() {
    let dir = tempfile::tempdir().expect("temp dir");
    let pki = TestPki::new(dir.path());
    let config = format!(
        "{OPEN}\n[mqtt.tls]\nlisten = \"127.0.0.1:0\"\ncert = \"{}\"\nkey = \"{}\"\n",
        pki.cert.display(),
        pki.other_key.display()
    );
    let line = failed_start(dir.path(), &config);
    assert!(
        line.contains("mqtt.tls: the key does not match the certificate"),
        "{line}"
    );
}

#[test]
fn unreadable_or_wrong_files_are_named_by_key() {
    let dir = tempfile::tempdir().expect("temp dir");
    let pki = TestPki::new(dir.path());
    let missing = dir.path().join("nope.crt");
    let config = format!(
        "{OPEN}\n[mqtt.tls]\ncert = \"{}\"\nkey = \"{}\"\n",
        missing.display(),
        pki.key.display()
    );
    let line = failed_start(dir.path(), &config);
    assert!(
        line.contains("mqtt.tls.cert") && line.contains("nope.crt"),
        "{line}"
    );

    // A certificate given as the key of the secure WebSocket listener.
    let config = format!(
        "{OPEN}\n[websocket.tls]\nlisten = \"127.0.0.1:0\"\ncert = \"{}\"\nkey = \"{}\"\n",
        pki.cert.display(),
        pki.cert.display()
    );
    let line = failed_start(dir.path(), &config);
    assert!(
        line.contains("websocket.tls.key") && line.contains("private key"),
        "{line}"
    );

    // A section without its certificate.
    let config = format!("{OPEN}\n[mqtt.tls]\nkey = \"{}\"\n", pki.key.display());
    let line = failed_start(dir.path(), &config);
    assert!(line.contains("mqtt.tls.cert"), "{line}");
}
