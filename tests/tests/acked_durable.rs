//! Acknowledged means durable, for the acks that end something: a PUBCOMP
//! frees a packet id, an UNSUBACK ends a subscription. A broker killed
//! with SIGKILL right after sending one must come back with the thing
//! ended, whatever else was keeping its disk busy.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use chatmq_tests::raw::{p4, Wire};
use chatmq_tests::v5::{self, QoS};
use chatmq_tests::{Broker, OPEN, PATIENCE};

const QUIET: Duration = Duration::from_millis(500);
/// Crashes per test: each gives the defect a chance to show.
const ROUNDS: usize = 4;

/// A raw 3.1.1 session of `id` with clean_session 0; returns Session Present.
async fn persistent_v4(b: &Broker, id: &str) -> (Wire, bool) {
    let mut c = p4::Connect::new(id);
    c.clean_session = false;
    c.keep_alive = 60;
    let mut w = Wire::open(b.addr).await;
    w.send_v4(&p4::Packet::Connect(c)).await;
    match w.next_v4(PATIENCE).await {
        Ok(p4::Packet::ConnAck(a)) => {
            assert_eq!(a.code, p4::ConnectReturnCode::Success);
            (w, a.session_present)
        }
        other => panic!("expected CONNACK, got {other:?}"),
    }
}

/// Keeps the broker's writer busy (retained QoS 1 messages, each a synced
/// commit) until `stop` is set or the broker goes away.
async fn disk_load(b: &Broker, stop: Arc<AtomicBool>) -> tokio::task::JoinHandle<()> {
    let loader = v5::connect_ok(b.addr, "loader").await;
    tokio::spawn(async move {
        let mut n = 0u32;
        while !stop.load(Ordering::Relaxed) {
            let topic = format!("load/{}", n % 64);
            n += 1;
            let queued = loader
                .client
                .publish(topic, QoS::AtLeastOnce, true, vec![n as u8; 16 * 1024])
                .await;
            if queued.is_err() {
                return;
            }
        }
    })
}

/// QoS 2 from the client, 3.1.1: PUBLISH `pkid`, PUBREC, PUBREL, PUBCOMP.
async fn publish_qos2(w: &mut Wire, pkid: u16, payload: &[u8]) {
    let mut p = p4::Publish::new(
        "ids/q2",
        rumqttc::mqttbytes::QoS::ExactlyOnce,
        payload.to_vec(),
    );
    p.pkid = pkid;
    w.send_v4(&p4::Packet::Publish(p)).await;
    match w.next_v4(PATIENCE).await {
        Ok(p4::Packet::PubRec(r)) => assert_eq!(r.pkid, pkid),
        other => panic!("expected PUBREC, got {other:?}"),
    }
    w.send_v4(&p4::Packet::PubRel(p4::PubRel::new(pkid))).await;
    match w.next_v4(PATIENCE).await {
        Ok(p4::Packet::PubComp(c)) => assert_eq!(c.pkid, pkid),
        other => panic!("expected PUBCOMP, got {other:?}"),
    }
}

// Issue #10 item 7, [MQTT-4.3.3-9..-11]: after PUBCOMP the client may use
// the packet id for a new message. A device sends a QoS 2 message, gets
// PUBCOMP, and the broker is killed at once; after the restart the
// device's next message with the same packet id is a new message and is
// delivered, not dropped as a resend of the old one.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_packet_id_freed_by_pubcomp_is_free_after_a_crash() {
    let mut b = Broker::start(OPEN);
    let (mut w, _) = persistent_v4(&b, "device").await;
    for round in 0..ROUNDS {
        let stop = Arc::new(AtomicBool::new(false));
        let load = disk_load(&b, stop.clone()).await;
        tokio::time::sleep(Duration::from_millis(100)).await;
        publish_qos2(&mut w, 7, format!("before crash {round}").as_bytes()).await;
        b.kill9();
        stop.store(true, Ordering::Relaxed);
        let _ = tokio::time::timeout(PATIENCE, load).await;

        b.restart();
        let mut watcher = v5::connect_ok(b.addr, "watcher").await;
        watcher.subscribe("ids/#", QoS::AtLeastOnce).await;
        let (again, present) = persistent_v4(&b, "device").await;
        assert!(present);
        w = again;
        let after = format!("after crash {round}");
        publish_qos2(&mut w, 7, after.as_bytes()).await;
        let got = watcher.publish().await;
        assert_eq!(
            String::from_utf8_lossy(&got.payload),
            after,
            "round {round}: the new message with packet id 7 was dropped"
        );
    }
}

// Issue #10 item 7: UNSUBACK comes once the removal is durable. A reader
// unsubscribes, gets UNSUBACK, the broker is killed at once; after the
// restart its session no longer receives the topic.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_unsubscribe_acked_before_a_crash_stays_done() {
    let mut b = Broker::start(OPEN);
    for round in 0..ROUNDS {
        let mut o = v5::options(b.addr, "reader");
        o.set_clean_start(false);
        o.set_session_expiry_interval(Some(3600));
        let mut reader = v5::connect(o.clone()).await.expect("reader connects");
        reader.subscribe("news/#", QoS::AtLeastOnce).await;
        let stop = Arc::new(AtomicBool::new(false));
        let load = disk_load(&b, stop.clone()).await;
        tokio::time::sleep(Duration::from_millis(100)).await;
        reader.unsubscribe("news/#").await;
        b.kill9();
        stop.store(true, Ordering::Relaxed);
        let _ = tokio::time::timeout(PATIENCE, load).await;
        reader.drop_connection();

        b.restart();
        let mut reader = v5::connect(o).await.expect("reader reconnects");
        assert!(reader.connack.session_present);
        let mut publisher = v5::connect_ok(b.addr, "publisher").await;
        publisher
            .publish_acked("news/today", QoS::AtLeastOnce, false, b"headline")
            .await;
        assert!(
            reader.publishes_for(QUIET).await.is_empty(),
            "round {round}: the subscription came back after the crash"
        );
        reader.disconnect().await;
        publisher.disconnect().await;
    }
}
