//! What the cluster tests share (tests/tests/cluster_*.rs): their
//! runtime, waiting for a state to come, and a QoS 1 publish that may
//! meet a node going away.

use std::future::Future;
use std::time::{Duration, Instant};

use rumqttc::v5::mqttbytes::v5::{Packet, PubAckReason};
use rumqttc::v5::mqttbytes::QoS;

use crate::v5;

/// A two-worker runtime, as the tests' clients need.
pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime")
}

/// Polls `check` every 100 ms until it holds; panics naming `what` after
/// 30 s (the nodes apply what others did a moment later).
pub async fn eventually<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + Duration::from_secs(30);
    while !check().await {
        assert!(Instant::now() < deadline, "{what}: not within 30 s");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Publishes at QoS 1 and waits for the PUBACK: `Some(true)` acknowledged,
/// `Some(false)` refused, `None` the connection ended (a DISCONNECT or
/// the node gone) or nothing came within `within`.
pub async fn acked_within(
    c: &mut v5::Client,
    topic: &str,
    payload: &[u8],
    within: Duration,
) -> Option<bool> {
    if c.client
        .publish(topic, QoS::AtLeastOnce, false, payload.to_vec())
        .await
        .is_err()
    {
        return None;
    }
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        match c.next().await {
            Ok(Packet::PubAck(a)) => return Some(a.reason == PubAckReason::Success),
            Ok(Packet::Disconnect(_)) => return None,
            Ok(_) => continue,
            Err(e) if e.contains("nothing arrived") => continue,
            Err(_) => return None,
        }
    }
    None
}

/// `name`'s HTTP API on `b`, with a JWT of theirs.
pub fn user(b: &crate::Broker, name: &str) -> crate::http::Http {
    crate::http::Http::new(b.http_addr).with_token(&crate::chat::token(name))
}

/// The JSON of a 2xx answer; panics with `what`, the status and the body
/// otherwise.
pub fn ok(r: crate::http::Response, what: &str) -> serde_json::Value {
    assert!(
        (200..300).contains(&r.status),
        "{what}: {} {}",
        r.status,
        r.text()
    );
    r.json()
}
