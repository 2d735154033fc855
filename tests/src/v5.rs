//! MQTT 5 clients (rumqttc v5) for tests.

use std::net::SocketAddr;
use std::time::Duration;

pub use rumqttc::v5::mqttbytes::v5::{
    ConnAck, ConnAckProperties, ConnectProperties, ConnectReturnCode, Filter, LastWill,
    LastWillProperties, Packet, PubAck, PubAckReason, Publish, PublishProperties,
    RetainForwardRule, SubAck, SubscribeProperties, SubscribeReasonCode,
};
pub use rumqttc::v5::mqttbytes::QoS;
pub use rumqttc::v5::{AsyncClient, ConnectionError, Event, MqttOptions};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use crate::PATIENCE;

/// A connected client whose event loop runs in the background; what the
/// broker sends arrives on `incoming`.
pub struct Client {
    pub client: AsyncClient,
    pub connack: ConnAck,
    incoming: mpsc::UnboundedReceiver<Result<Packet, String>>,
    task: JoinHandle<()>,
}

/// Options for a client of `addr` with id `id` and a 30 s keepalive.
pub fn options(addr: SocketAddr, id: &str) -> MqttOptions {
    let mut o = MqttOptions::new(id, addr.ip().to_string(), addr.port());
    o.set_keep_alive(Duration::from_secs(30));
    o.set_max_packet_size(Some(1 << 20));
    o
}

/// Connects; `Err` carries the refusal (a CONNACK code or an I/O error).
pub async fn connect(opts: MqttOptions) -> Result<Client, ConnectionError> {
    let (client, mut eventloop) = AsyncClient::new(opts, 1000);
    let connack = loop {
        match tokio::time::timeout(PATIENCE, eventloop.poll()).await {
            Ok(Ok(Event::Incoming(Packet::ConnAck(c)))) => break c,
            Ok(Ok(_)) => continue,
            Ok(Err(e)) => return Err(e),
            Err(_) => panic!("no CONNACK within {PATIENCE:?}"),
        }
    };
    let (tx, incoming) = mpsc::unbounded_channel();
    let task = tokio::spawn(async move {
        loop {
            match eventloop.poll().await {
                Ok(Event::Incoming(p)) => {
                    if tx.send(Ok(p)).is_err() {
                        return;
                    }
                }
                Ok(Event::Outgoing(_)) => {}
                Err(e) => {
                    let _ = tx.send(Err(e.to_string()));
                    return;
                }
            }
        }
    });
    Ok(Client {
        client,
        connack,
        incoming,
        task,
    })
}

/// Connects with the default options and panics on refusal.
pub async fn connect_ok(addr: SocketAddr, id: &str) -> Client {
    match connect(options(addr, id)).await {
        Ok(c) => c,
        Err(e) => panic!("{id} could not connect: {e}"),
    }
}

impl Client {
    /// The next packet from the broker other than PINGRESP, within PATIENCE.
    pub async fn next(&mut self) -> Result<Packet, String> {
        loop {
            match tokio::time::timeout(PATIENCE, self.incoming.recv()).await {
                Ok(Some(Ok(Packet::PingResp(_)))) => continue,
                Ok(Some(r)) => return r,
                Ok(None) => return Err("event loop ended".into()),
                Err(_) => return Err(format!("nothing arrived within {PATIENCE:?}")),
            }
        }
    }

    /// The next PUBLISH, skipping acks.
    pub async fn publish(&mut self) -> Publish {
        loop {
            match self.next().await {
                Ok(Packet::Publish(p)) => return p,
                Ok(_) => continue,
                Err(e) => panic!("waiting for a PUBLISH: {e}"),
            }
        }
    }

    /// Asserts that no PUBLISH arrives for `d`.
    pub async fn no_publish(&mut self, d: Duration) {
        let deadline = tokio::time::Instant::now() + d;
        while let Ok(Some(p)) = tokio::time::timeout_at(deadline, self.incoming.recv()).await {
            if let Ok(Packet::Publish(p)) = p {
                panic!("unexpected PUBLISH on {:?}: {:?}", p.topic, p.payload);
            }
        }
    }

    /// Subscribes and returns the SUBACK.
    pub async fn subscribe(&mut self, filter: &str, qos: QoS) -> SubAck {
        self.subscribe_with(Filter::new(filter, qos), None).await
    }

    /// Subscribes with full MQTT 5 options and returns the SUBACK.
    pub async fn subscribe_with(
        &mut self,
        filter: Filter,
        props: Option<SubscribeProperties>,
    ) -> SubAck {
        match props {
            Some(p) => {
                self.client
                    .subscribe_many_with_properties(vec![filter], p)
                    .await
            }
            None => self.client.subscribe_many(vec![filter]).await,
        }
        .expect("queue subscribe");
        loop {
            match self.next().await {
                Ok(Packet::SubAck(s)) => return s,
                Ok(_) => continue,
                Err(e) => panic!("waiting for SUBACK: {e}"),
            }
        }
    }

    /// Publishes and, for QoS 1/2, returns the broker's ack (PUBACK, or
    /// the PUBREC of QoS 2 as a PUBACK-shaped reason).
    pub async fn publish_acked(
        &mut self,
        topic: &str,
        qos: QoS,
        retain: bool,
        payload: &[u8],
    ) -> Option<Packet> {
        self.client
            .publish(topic, qos, retain, payload.to_vec())
            .await
            .expect("queue publish");
        if qos == QoS::AtMostOnce {
            return None;
        }
        loop {
            match self.next().await {
                Ok(p @ Packet::PubAck(_)) | Ok(p @ Packet::PubComp(_)) => return Some(p),
                Ok(Packet::PubRec(r))
                    if r.reason != rumqttc::v5::mqttbytes::v5::PubRecReason::Success =>
                {
                    return Some(Packet::PubRec(r))
                }
                Ok(_) => continue,
                Err(e) => panic!("waiting for the ack: {e}"),
            }
        }
    }

    /// A clean DISCONNECT, then waits for the connection to close.
    pub async fn disconnect(mut self) {
        let _ = self.client.disconnect().await;
        let _ = tokio::time::timeout(PATIENCE, async {
            while self.incoming.recv().await.is_some() {}
        })
        .await;
        self.task.abort();
    }

    /// Drops the connection without DISCONNECT (the will fires).
    pub fn drop_connection(self) {
        self.task.abort();
    }
}

impl Client {
    /// Every PUBLISH that arrives within `d`.
    pub async fn publishes_for(&mut self, d: Duration) -> Vec<Publish> {
        let deadline = tokio::time::Instant::now() + d;
        let mut got = Vec::new();
        while let Ok(Some(p)) = tokio::time::timeout_at(deadline, self.incoming.recv()).await {
            if let Ok(Packet::Publish(p)) = p {
                got.push(p);
            }
        }
        got
    }

    /// Publishes with MQTT 5 properties and, for QoS 1/2, returns the
    /// broker's ack as `publish_acked` does.
    pub async fn publish_props_acked(
        &mut self,
        topic: &str,
        qos: QoS,
        retain: bool,
        payload: &[u8],
        props: PublishProperties,
    ) -> Option<Packet> {
        self.client
            .publish_with_properties(topic, qos, retain, payload.to_vec(), props)
            .await
            .expect("queue publish");
        if qos == QoS::AtMostOnce {
            return None;
        }
        loop {
            match self.next().await {
                Ok(p @ Packet::PubAck(_)) | Ok(p @ Packet::PubComp(_)) => return Some(p),
                Ok(Packet::PubRec(r))
                    if r.reason != rumqttc::v5::mqttbytes::v5::PubRecReason::Success =>
                {
                    return Some(Packet::PubRec(r))
                }
                Ok(_) => continue,
                Err(e) => panic!("waiting for the ack: {e}"),
            }
        }
    }

    /// Unsubscribes and returns the UNSUBACK.
    pub async fn unsubscribe(&mut self, filter: &str) -> rumqttc::v5::mqttbytes::v5::UnsubAck {
        self.client
            .unsubscribe(filter)
            .await
            .expect("queue unsubscribe");
        loop {
            match self.next().await {
                Ok(Packet::UnsubAck(a)) => return a,
                Ok(_) => continue,
                Err(e) => panic!("waiting for UNSUBACK: {e}"),
            }
        }
    }
}

impl Client {
    /// Publishes and, for QoS 1/2, returns the broker's ack as
    /// `publish_acked` does, with the PUBLISHes that arrived meanwhile
    /// (`publish_acked` skips them).
    pub async fn publish_acked_keeping(
        &mut self,
        topic: &str,
        qos: QoS,
        retain: bool,
        payload: &[u8],
    ) -> (Option<Packet>, Vec<Publish>) {
        self.client
            .publish(topic, qos, retain, payload.to_vec())
            .await
            .expect("queue publish");
        let mut kept = Vec::new();
        if qos == QoS::AtMostOnce {
            return (None, kept);
        }
        loop {
            match self.next().await {
                Ok(p @ Packet::PubAck(_)) | Ok(p @ Packet::PubComp(_)) => return (Some(p), kept),
                Ok(Packet::PubRec(r))
                    if r.reason != rumqttc::v5::mqttbytes::v5::PubRecReason::Success =>
                {
                    return (Some(Packet::PubRec(r)), kept)
                }
                Ok(Packet::Publish(p)) => kept.push(p),
                Ok(_) => continue,
                Err(e) => panic!("waiting for the ack: {e}"),
            }
        }
    }
}
