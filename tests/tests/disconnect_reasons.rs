//! The broker's DISCONNECT reaches an MQTT 5 client with its reason code,
//! even when the client is still sending. Found by the Eclipse Paho
//! interoperability suite (client_test5.py test_flow_control2): the reason
//! code was written as 0x00, and a client answering PUBRECs while the
//! broker closed got a TCP reset (its next write failed).

use std::time::Duration;

use chatmq_tests::raw::{connected_v5, p5, Silence, Wire};
use chatmq_tests::{Broker, OPEN, PATIENCE};
use rumqttc::v5::mqttbytes::v5::DisconnectReasonCode;
use rumqttc::v5::mqttbytes::QoS;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A broker that accepts two unacknowledged QoS 1/2 publishes per client.
fn receive_maximum_two() -> Broker {
    Broker::start(&format!("{OPEN}\n[mqtt]\nmax_inflight = 2\n"))
}

/// Three QoS 2 publishes, never released: one more than Receive Maximum.
async fn exceed_receive_maximum(w: &mut Wire) {
    for pkid in 1..=3u16 {
        let mut p = p5::Publish::new("flow/x", QoS::ExactlyOnce, format!("m{pkid}"), None);
        p.pkid = pkid;
        w.send_v5(&p5::Packet::Publish(p)).await;
    }
}

/// Reads until the DISCONNECT, answering each PUBREC with a PUBREL as a
/// client does; returns its reason code.
async fn disconnect_reason(w: &mut Wire) -> DisconnectReasonCode {
    loop {
        match w.next_v5(PATIENCE).await {
            Ok(p5::Packet::PubRec(r)) => {
                w.send_v5(&p5::Packet::PubRel(p5::PubRel::new(r.pkid, None)))
                    .await
            }
            Ok(p5::Packet::Disconnect(d)) => return d.reason_code,
            other => panic!("expected PUBREC or DISCONNECT, got {other:?}"),
        }
    }
}

// MQTT 5 3.3.4: a Server that receives more than Receive Maximum
// unacknowledged QoS 1/2 PUBLISH packets sends DISCONNECT 0x93;
// [MQTT-3.14.2-1] with that reason code, not 0x00.
#[tokio::test]
async fn exceeding_receive_maximum_is_told_with_reason_0x93() {
    let b = receive_maximum_two();
    let mut w = connected_v5(b.addr, "flow1").await;
    exceed_receive_maximum(&mut w).await;
    assert_eq!(
        disconnect_reason(&mut w).await,
        DisconnectReasonCode::ReceiveMaximumExceeded
    );
    assert_eq!(w.next_v5(PATIENCE).await, Err(Silence::Closed));
}

// [MQTT-3.14.4-2] the broker closes after its DISCONNECT, but a client
// that is still writing (acks, publishes in flight) must not be answered
// with a TCP reset: its writes would fail before it reads the reason code.
#[tokio::test]
async fn a_client_still_writing_after_the_disconnect_is_not_reset() {
    let b = receive_maximum_two();
    let mut w = connected_v5(b.addr, "flow2").await;
    exceed_receive_maximum(&mut w).await;
    disconnect_reason(&mut w).await;
    let pubrel = chatmq_tests::raw::v5_bytes(&p5::Packet::PubRel(p5::PubRel::new(1, None)));
    // Late enough for the broker to be done with the connection, within
    // the second it keeps draining.
    for pause in [300, 200] {
        tokio::time::sleep(Duration::from_millis(pause)).await;
        w.stream
            .write_all(&pubrel)
            .await
            .expect("a write after the broker's DISCONNECT must not be reset");
    }
    let mut rest = [0u8; 16];
    let read = tokio::time::timeout(PATIENCE, w.stream.read(&mut rest))
        .await
        .expect("the broker closes");
    assert_eq!(read.expect("an orderly close, not a reset"), 0);
}
