//! Draining a node before it goes away (issue #12 item 8), as an operator
//! scaling in does it: `POST /v1/admin/drain` or `chatmq drain`. The node
//! reports not ready, stops accepting, tells its MQTT 5 clients to use
//! another server (DISCONNECT 0x9C with the Server Reference), closes its
//! MQTT 3.1.1 clients, spreads their leaving over `drain.spread_secs`,
//! keeps their sessions, and exits 0.

use std::net::TcpStream;
use std::time::{Duration, Instant};

use chatmq_tests::http::Http;
use chatmq_tests::raw::{connected_v4, p5, Silence, Wire};
use chatmq_tests::{run_chatmq, Broker, PATIENCE};
use rumqttc::v5::mqttbytes::v5::DisconnectReasonCode;

const ADMIN: &str = "drain-admin-secret";

fn config(spread_secs: u64) -> String {
    format!(
        "[auth]\nallow_anonymous = true\nadmin_token = \"{ADMIN}\"\n\
         [drain]\nserver_reference = \"standby.example:1883\"\nspread_secs = {spread_secs}\ntimeout_secs = 5\n"
    )
}

/// A persistent MQTT 5 session of `id`, on a raw connection (rumqttc
/// turns a server's DISCONNECT into an error and drops its properties).
async fn persistent(b: &Broker, id: &str) -> (Wire, bool) {
    let mut w = Wire::open(b.addr).await;
    let mut properties = p5::ConnectProperties::new();
    properties.session_expiry_interval = Some(3600);
    w.send_v5(&p5::Packet::Connect(
        p5::Connect {
            keep_alive: 0,
            client_id: id.into(),
            clean_start: false,
            properties: Some(properties),
        },
        None,
        None,
    ))
    .await;
    match w.next_v5(PATIENCE).await {
        Ok(p5::Packet::ConnAck(a)) => {
            assert_eq!(a.code, p5::ConnectReturnCode::Success, "{id}");
            (w, a.session_present)
        }
        other => panic!("{id}: expected CONNACK, got {other:?}"),
    }
}

/// Waits for the DISCONNECT the broker sends this client: its reason and
/// Server Reference, and when it came; then the close.
async fn told_to_leave(w: &mut Wire) -> (DisconnectReasonCode, Option<String>, Instant) {
    let within = Duration::from_secs(10);
    match w.next_v5(within).await {
        Ok(p5::Packet::Disconnect(d)) => {
            let at = Instant::now();
            assert_eq!(w.next_v5(PATIENCE).await, Err(Silence::Closed));
            let reference = d.properties.and_then(|p| p.server_reference);
            (d.reason_code, reference, at)
        }
        other => panic!("expected a DISCONNECT, got {other:?}"),
    }
}

#[tokio::test]
async fn a_drained_node_moves_every_client_away_keeps_their_sessions_and_exits_0() {
    const SPREAD: u64 = 2;
    let mut b = Broker::start(&config(SPREAD));
    let http = Http::new(b.http_addr);
    let mut phones = Vec::new();
    for i in 0..10 {
        phones.push(persistent(&b, &format!("phone-{i}")).await.0);
    }
    let mut old = connected_v4(b.addr, "old-device").await;

    // Only the admin token may drain.
    let refused = http.post("/v1/admin/drain", &serde_json::json!({})).await;
    assert_eq!(refused.status, 401, "no token");
    let refused = http
        .with_token("not-the-admin")
        .post("/v1/admin/drain", &serde_json::json!({}))
        .await;
    assert_eq!(refused.status, 401, "a wrong token");
    let bad = http
        .with_token(ADMIN)
        .post(
            "/v1/admin/drain",
            &serde_json::json!({"spread_secs": 99999}),
        )
        .await;
    assert_eq!(bad.status, 400, "a spread out of bounds");
    assert_eq!(http.get("/readyz").await.status, 200, "nothing started yet");

    let started = Instant::now();
    let answer = http
        .with_token(ADMIN)
        .post("/v1/admin/drain", &serde_json::json!({}))
        .await;
    assert_eq!(
        answer.status,
        202,
        "{}",
        String::from_utf8_lossy(&answer.body)
    );
    // Each client watches for its DISCONNECT from now on, on its own.
    let leaving: Vec<_> = phones
        .into_iter()
        .map(|mut w| tokio::spawn(async move { told_to_leave(&mut w).await }))
        .collect();
    let answer = answer.json();
    assert_eq!(answer["status"], "draining");
    assert_eq!(answer["connections"], 11);
    assert_eq!(answer["spread_secs"], SPREAD);
    assert_eq!(answer["server_reference"], "standby.example:1883");

    // A load balancer sees it not ready, and new clients are turned away.
    let ready = http.get("/readyz").await;
    assert_eq!(ready.status, 503);
    assert_eq!(ready.json()["error"]["code"], "draining");
    let again = http
        .with_token(ADMIN)
        .post("/v1/admin/drain", &serde_json::json!({"spread_secs": 0}))
        .await;
    assert_eq!(again.status, 202, "asking twice is fine");
    assert_eq!(
        again.json()["spread_secs"],
        SPREAD,
        "the drain keeps its plan"
    );
    // At once, not when the node exits after the last client left (the
    // last of ten leaves before 1 s into a 2 s spread once in a thousand).
    let deadline = started + Duration::from_secs(1);
    loop {
        match TcpStream::connect_timeout(&b.addr, Duration::from_millis(200)) {
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => break,
            _ => assert!(
                Instant::now() < deadline,
                "the MQTT listener still accepts while draining"
            ),
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // Each MQTT 5 client is told where to go, at its own moment.
    let mut moments = Vec::new();
    for task in leaving {
        let (reason, reference, at) = task.await.expect("watcher");
        assert_eq!(reason, DisconnectReasonCode::UseAnotherServer);
        assert_eq!(reference.as_deref(), Some("standby.example:1883"));
        moments.push(at.duration_since(started));
    }
    let first = moments.iter().min().copied().unwrap_or_default();
    let last = moments.iter().max().copied().unwrap_or_default();
    assert!(
        last - first >= Duration::from_millis(300),
        "the clients left together, not spread over {SPREAD} s: {moments:?}"
    );
    assert!(
        last <= Duration::from_secs(SPREAD) + Duration::from_secs(2),
        "left after the spread: {moments:?}"
    );
    // The 3.1.1 client cannot be told: its connection is closed.
    assert!(
        old.closed_within(PATIENCE).await,
        "the 3.1.1 client is still connected"
    );

    let status = b.wait_exit(Duration::from_secs(SPREAD + 10));
    assert!(status.success(), "the drained node exited with {status:?}");

    // Back on the same disk (or, in a cluster, another node): the
    // sessions were kept.
    b.restart();
    let (_, present) = persistent(&b, "phone-3").await;
    assert!(present, "the session survived the drain");
}

#[test]
fn chatmq_drain_waits_until_the_node_has_stopped() {
    let mut b = Broker::start(&config(0));
    let url = format!("http://{}", b.http_addr);
    let refused = run_chatmq(b.dir(), &["drain", "--url", &url, "--token", "wrong"], &[]);
    assert!(!refused.status.success(), "a wrong token drained the node");
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(stderr.contains("refused the drain"), "{stderr}");

    let out = run_chatmq(
        b.dir(),
        &[
            "drain",
            "--url",
            &url,
            "--server-reference",
            "b.example:1883",
        ],
        &[("CHATMQ_ADMIN_TOKEN", ADMIN)],
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "chatmq drain failed: {stdout} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("drained: the node has stopped"), "{stdout}");
    let status = b.wait_exit(PATIENCE);
    assert!(status.success(), "the node exited with {status:?}");
}
