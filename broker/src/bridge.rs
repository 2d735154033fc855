//! The local side of the MQTT bridges (`[[bridge.remotes]]`): for each
//! remote, one persistent in-process session ([`crate::embed`]) named
//! `bridge-{name}`, acting as the remote's `local_user` (or anonymous),
//! feeds the link in `chatmq_bridge::mqtt` and publishes what it brings
//! in. The ACL and the chat layer see that session as any client: an
//! inbound mapping onto `chat/{conv}` posts as `local_user`, who must be a
//! member.
//!
//! - out: the session subscribes to each outbound mapping's local filter
//!   with No Local and acknowledges a QoS 1 delivery only when the link
//!   says the remote PUBACKed it (manual acks). Unacknowledged ones stay
//!   in the session's in-flight window, on disk: after a restart the
//!   session resends them.
//! - in: remote messages are published in the order received, several in
//!   flight; each is answered (stored, or refused for good) in that order,
//!   and only then acknowledged to the remote.

use std::collections::VecDeque;
use std::sync::Arc;

use chatmq_bridge::mqtt::{BridgeError, Inbound, Link, LocalEnds, Outbound, Taken};
use chatmq_config::Settings;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;

use crate::broker::Broker;
use crate::embed::{persistent_client, EmbedError, Publisher, SessionOptions};

/// Local publishes from remotes waiting for their answer, per remote.
const INBOUND_IN_FLIGHT: usize = 64;

/// The links the settings ask for, checked (CA files read).
pub fn links(settings: &Settings) -> Result<Vec<Link>, BridgeError> {
    let remotes = settings.bridge.remotes.iter().cloned().enumerate();
    remotes.map(|(i, r)| Link::new(i, r)).collect()
}

/// Runs every link until `stop`.
pub async fn run(broker: Arc<Broker>, links: Vec<Link>, stop: watch::Receiver<bool>) {
    let mut tasks = JoinSet::new();
    for link in links {
        tasks.spawn(one(broker.clone(), link, stop.clone()));
    }
    while tasks.join_next().await.is_some() {}
}

async fn one(broker: Arc<Broker>, link: Link, mut stop: watch::Receiver<bool>) {
    let name = link.name().to_string();
    let remote = link.remote().clone();
    let options = SessionOptions {
        client_id: format!("bridge-{name}"),
        // Capped by mqtt.session_expiry_max.
        expiry_secs: u32::MAX,
        manual_ack: true,
    };
    let user = remote.local_user.as_deref();
    let (mut client, session) = match persistent_client(&broker, user, options, stop.clone()).await
    {
        Ok(c) => c,
        Err(e) => {
            tracing::error!(remote = %name, error = %e, "bridge: no local session; this remote is not bridged");
            return;
        }
    };
    let queue = remote.queue;
    let (out_tx, out_rx) = mpsc::channel(queue);
    let (ack_tx, ack_rx) = mpsc::channel(queue);
    let (in_tx, in_rx) = mpsc::channel(queue);
    let publisher = client.publisher();
    let filters = link.mappings().local_filters();
    let ends = LocalEnds {
        outbound: out_rx,
        acks: ack_tx,
        inbound: in_tx,
    };
    let mut stop_pump = stop.clone();
    let pump = async move {
        for (filter, qos) in filters {
            if let Err(e) = client.subscribe_with(filter.clone(), qos, true).await {
                tracing::error!(remote = %name, %filter, error = %e, "bridge: a local subscription failed");
            }
        }
        loop {
            let delivery = tokio::select! {
                d = client.recv() => d,
                _ = stop_pump.changed() => None,
            };
            let Some(d) = delivery else { return };
            let outbound = Outbound {
                topic: d.topic,
                payload: d.payload,
                qos: d.qos,
                retain: d.retain,
                pkid: d.pkid,
            };
            if out_tx.send(outbound).await.is_err() {
                return;
            }
        }
    };
    let acker = acks(publisher.clone(), ack_rx);
    let inbound = inbound(publisher, in_rx);
    let link = async move {
        link.run(ends, stop.clone()).await;
        // The link is done: so is the session once `stop` ends it.
        let _ = stop.wait_for(|s| *s).await;
    };
    tokio::join!(session, pump, acker, inbound, link);
}

/// Acknowledges to the local session what the remote acknowledged.
async fn acks(publisher: Publisher, mut acks: mpsc::Receiver<u16>) {
    while let Some(pkid) = acks.recv().await {
        if publisher.ack(pkid).await.is_err() {
            return;
        }
    }
}

/// Publishes what comes in, in order, and answers each in order.
async fn inbound(publisher: Publisher, mut messages: mpsc::Receiver<Inbound>) {
    type Answer =
        std::pin::Pin<Box<dyn std::future::Future<Output = Result<(), EmbedError>> + Send>>;
    let mut waiting: VecDeque<(tokio::sync::oneshot::Sender<Taken>, Answer)> = VecDeque::new();
    let mut open = true;
    while open || !waiting.is_empty() {
        let room = open && waiting.len() < INBOUND_IN_FLIGHT;
        tokio::select! {
            m = messages.recv(), if room => {
                let Some(m) = m else { open = false; continue };
                match publisher.send(m.topic, m.payload, m.qos, m.retain).await {
                    Ok(answer) => waiting.push_back((m.done, Box::pin(answer))),
                    Err(_) => return,
                }
            }
            result = async {
                match waiting.front_mut() {
                    Some((_, answer)) => answer.await,
                    None => std::future::pending().await,
                }
            }, if !waiting.is_empty() => {
                let Some((done, _)) = waiting.pop_front() else { continue };
                match result {
                    Ok(()) => {
                        let _ = done.send(Taken::Stored);
                    }
                    // Stopping: unanswered, so the remote resends.
                    Err(EmbedError::Closed) => return,
                    Err(e) => {
                        tracing::debug!(error = %e, "bridge: a message from the remote was refused");
                        let _ = done.send(Taken::Refused);
                    }
                }
            }
        }
    }
}
