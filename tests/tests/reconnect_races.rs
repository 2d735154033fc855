//! A client that says DISCONNECT and reconnects at once (an app going to
//! the background and back, a reconnect button pressed twice) must find
//! its DISCONNECT applied: the session it ended is gone, and the will it
//! discarded is never published. The new CONNECT arrives on another
//! socket, so without care the broker may see it first.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use chatmq_tests::raw::{connect_bytes, field, p5, packet, Wire};
use chatmq_tests::v5::{self, QoS};
use chatmq_tests::{Broker, OPEN, PATIENCE};

const ROUNDS: usize = 200;
/// The rounds stop here even if not all are done (a loaded machine)...
const TIME_LIMIT: Duration = Duration::from_secs(90);
/// ...but this many must have run for the test to mean something.
const AT_LEAST: usize = 50;

/// CONNECT of "racer": Clean Start 0, Session Expiry 300 s, a will on
/// `wills/racer`.
fn racer_connect() -> Vec<u8> {
    let mut props = vec![0x11]; // Session Expiry Interval
    props.extend(300u32.to_be_bytes());
    let mut payload = field(b"racer");
    payload.push(0); // will properties
    payload.extend(field(b"wills/racer"));
    payload.extend(field(b"gone"));
    connect_bytes(5, 0x04, &props, &payload)
}

/// DISCONNECT 0x00; with `Some(0)` it also ends the session.
fn disconnect(session_expiry: Option<u32>) -> Vec<u8> {
    match session_expiry {
        None => vec![0xE0, 0x00],
        Some(secs) => {
            let mut body = vec![0x00, 0x05, 0x11];
            body.extend(secs.to_be_bytes());
            packet(0xE0, &body)
        }
    }
}

async fn connack(w: &mut Wire) -> p5::ConnAck {
    match w.next_v5(PATIENCE).await {
        Ok(p5::Packet::ConnAck(a)) => {
            assert_eq!(a.code, p5::ConnectReturnCode::Success);
            a
        }
        other => panic!("expected CONNACK, got {other:?}"),
    }
}

// Issue #10 item 6, [MQTT-3.14.4-3] and [MQTT-3.1.2-4]: DISCONNECT then an
// immediate reconnect, many times, while other clients keep the broker
// busy. After a DISCONNECT with Session Expiry 0 the new CONNECT never
// gets Session Present 1; after a plain DISCONNECT the session resumes;
// the will is never published.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn disconnect_then_reconnect_at_once_sees_the_disconnect_applied() {
    let b = Broker::start(OPEN);
    let mut watcher = v5::connect_ok(b.addr, "watcher").await;
    watcher.subscribe("wills/#", QoS::AtLeastOnce).await;

    // Parallel load: publishers and a subscriber of their messages.
    let stop = Arc::new(AtomicBool::new(false));
    let mut load = Vec::new();
    let mut sink = v5::connect_ok(b.addr, "sink").await;
    sink.subscribe("load/#", QoS::AtLeastOnce).await;
    for n in 0..3 {
        let mut publisher = v5::connect_ok(b.addr, &format!("load-{n}")).await;
        let stop = stop.clone();
        load.push(tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                publisher
                    .publish_acked(&format!("load/{n}"), QoS::AtLeastOnce, false, &[7; 512])
                    .await;
            }
        }));
    }

    let mut current = Wire::open(b.addr).await;
    current.send(&racer_connect()).await;
    connack(&mut current).await;
    let started = Instant::now();
    let mut rounds = 0;
    while rounds < ROUNDS && started.elapsed() < TIME_LIMIT {
        let ends_session = rounds % 2 == 0;
        current.send(&disconnect(ends_session.then_some(0))).await;
        let mut next = Wire::open(b.addr).await;
        next.send(&racer_connect()).await;
        let ack = connack(&mut next).await;
        if ends_session {
            assert!(
                !ack.session_present,
                "round {rounds}: Session Present 1 after a DISCONNECT with Session Expiry 0"
            );
        } else {
            assert!(
                ack.session_present,
                "round {rounds}: the session was lost after a plain DISCONNECT"
            );
        }
        current = next;
        rounds += 1;
    }
    stop.store(true, Ordering::Relaxed);
    for task in load {
        let _ = tokio::time::timeout(PATIENCE, task).await;
    }
    assert!(
        rounds >= AT_LEAST,
        "only {rounds} rounds ran in {TIME_LIMIT:?}"
    );
    let wills = watcher.publishes_for(Duration::from_secs(1)).await;
    assert!(
        wills.is_empty(),
        "{} wills were published after normal DISCONNECTs in {rounds} rounds",
        wills.len()
    );
}
