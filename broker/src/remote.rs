//! Plain MQTT across the nodes of a cluster (issue #12 item 5), the
//! broker's half: what a client of this node publishes goes to the other
//! nodes, what their clients publish is routed here, and the filters of
//! this node's sessions say what it wants to hear (the NATS half, subjects
//! and interest: `chatmq_cluster::mqtt`).
//!
//! - Only client publishes travel (a message with a publisher, wills
//!   included), and only once: one that came from another node is routed
//!   here and never sent on ([`Broker::route_remote`]). Chat topics never
//!   reach the router, so they never travel this way: the partition
//!   streams carry them.
//! - A message travels encoded as it is stored (`MessageRecord`: topic,
//!   payload, QoS, retain, MQTT 5 properties, expiry), so every property
//!   reaches a subscriber on another node as on this one; the publisher's
//!   client id goes beside it for No Local.
//! - Retained messages also go to the retained stream (one message per
//!   topic, `{prefix}_retained`), which every node applies, in the
//!   stream's order, into its own retained store, from the first record
//!   at each start: so every node has every retained message, including
//!   a node that was down or had no subscriber when it was published, and
//!   all nodes agree on the last one of a topic. A retained message that
//!   arrives over the link is delivered, not retained: only the stream
//!   decides what is retained.
//! - Shared subscriptions span the nodes: a message that went to NATS
//!   reaches the shared groups only through their NATS queue groups (one
//!   node of those with members gets it, and gives it to one of its
//!   members), so a group gets each message once wherever it was
//!   published; one that stayed on this node (a `$` topic, a full queue)
//!   goes to this node's groups directly.
//! - Both queues are bounded; what they drop is counted
//!   (`chatmq_cluster_mqtt_dropped_total`).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use chatmq_cluster::mqtt::{Arrived, Links, Subjects};
use chatmq_storage::{Batch, MessageRecord};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;

use crate::broker::Broker;
use crate::message::Message;
use crate::topic;

/// Messages waiting to be published to the other nodes, at most.
const OUTBOUND: usize = 8192;
/// Messages from other nodes waiting to be routed here, at most.
const INBOUND: usize = 8192;

/// A message on its way to the other nodes.
struct Outbound {
    subject: String,
    publisher: Option<Arc<str>>,
    body: Bytes,
}

/// The broker's end of the link (set once, with `[cluster]`).
pub struct Remote {
    links: Arc<Links>,
    outbound: mpsc::Sender<Outbound>,
    /// Retained messages on their way to the retained stream (subject,
    /// record), once [`start_retained`] ran.
    retained: std::sync::OnceLock<(Subjects, mpsc::Sender<(String, Bytes)>)>,
    /// Publishes not sent because the outbound queue was full.
    pub dropped: AtomicU64,
    /// Messages from other nodes that were not a valid message.
    pub refused: AtomicU64,
}

impl Remote {
    /// Sends what a client of this node published to the other nodes, and
    /// to the shared groups of all (this one's included). False if it
    /// stays here: not a client's publish, a `$` topic, a topic too long
    /// for a subject, or the queue full (counted); this node's shared
    /// groups then get it directly.
    pub(crate) fn forward(&self, msg: &Message) -> bool {
        let Some(publisher) = &msg.publisher else {
            return false;
        };
        if msg.topic.starts_with('$') {
            return false;
        }
        let Some(subject) = self.links.subjects().topic(&msg.topic) else {
            self.dropped.fetch_add(1, Ordering::Relaxed);
            return false;
        };
        let body = Bytes::from(msg.to_record().encode());
        if msg.retain {
            if let Some((subjects, queue)) = self.retained.get() {
                let sent = subjects
                    .topic(&msg.topic)
                    .is_some_and(|s| queue.try_send((s, body.clone())).is_ok());
                if !sent {
                    self.dropped.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
        let out = Outbound {
            subject,
            publisher: Some(publisher.clone()),
            body,
        };
        if self.outbound.try_send(out).is_err() {
            self.dropped.fetch_add(1, Ordering::Relaxed);
            return false;
        }
        true
    }

    /// The retained stream decides what is retained (not the link).
    pub(crate) fn retains(&self) -> bool {
        self.retained.get().is_some()
    }

    /// A session of this node subscribed to `filter` (it was not before):
    /// a plain filter, or a shared group's (`$share/{group}/{filter}`).
    pub(crate) fn subscribed(&self, filter: &str) {
        match topic::parse_shared(filter) {
            Some(Ok((group, inner))) if travels(inner) => self.links.add_share(group, inner),
            Some(_) => {}
            None if travels(filter) => self.links.add_filter(filter),
            None => {}
        }
    }

    /// A session of this node no longer holds `filter`.
    pub(crate) fn unsubscribed(&self, filter: &str) {
        match topic::parse_shared(filter) {
            Some(Ok((group, inner))) if travels(inner) => self.links.remove_share(group, inner),
            Some(_) => {}
            None if travels(filter) => self.links.remove_filter(filter),
            None => {}
        }
    }

    /// The NATS side's counts, for `/metrics`.
    pub fn links(&self) -> &Links {
        &self.links
    }
}

/// Whether what `filter` names can come from another node this way: not
/// the chat layer's topics (`chat/`, `presence/`, `users/`...), which no
/// client publish reaches the router on, so a node holds no NATS
/// subscription for each conversation its sessions follow.
fn travels(filter: &str) -> bool {
    let head = filter.split('/').next().unwrap_or(filter);
    !crate::chat::namespace::RESERVED.contains(&head)
}

/// Links this node's broker to the others for plain MQTT and starts the
/// tasks that carry the messages; runs until `stop`.
pub fn start(
    broker: &Arc<Broker>,
    links: Arc<Links>,
    tasks: &mut JoinSet<()>,
    stop: &watch::Receiver<bool>,
) {
    let (outbound, out_rx) = mpsc::channel(OUTBOUND);
    let (in_tx, in_rx) = mpsc::channel(INBOUND);
    let remote = Arc::new(Remote {
        links: links.clone(),
        outbound,
        retained: std::sync::OnceLock::new(),
        dropped: AtomicU64::new(0),
        refused: AtomicU64::new(0),
    });
    broker.attach_remote(remote.clone());
    tasks.spawn(links.clone().run(in_tx, stop.clone()));
    tasks.spawn(send(links, out_rx, stop.clone()));
    tasks.spawn(receive(broker.clone(), remote, in_rx, stop.clone()));
}

/// Publishes, in order, what this node's clients published.
async fn send(
    links: Arc<Links>,
    mut queue: mpsc::Receiver<Outbound>,
    mut stop: watch::Receiver<bool>,
) {
    loop {
        tokio::select! {
            out = queue.recv() => match out {
                Some(o) => links.publish(o.subject, o.publisher.as_deref(), o.body).await,
                None => break,
            },
            _ = stop.changed() => break,
        }
    }
}

/// Retained messages across the nodes: what this node's clients retain
/// goes to the retained stream; what the stream holds is applied here,
/// in its order, from its first record (a node that was down, or new,
/// gets every retained message).
pub fn start_retained(
    broker: &Arc<Broker>,
    node: Arc<chatmq_cluster::Node>,
    tasks: &mut JoinSet<()>,
    stop: &watch::Receiver<bool>,
) {
    let Some(remote) = broker.remote.get().cloned() else {
        return;
    };
    let (tx, mut rx) = mpsc::channel::<(String, Bytes)>(OUTBOUND);
    let subjects = chatmq_cluster::mqtt::Subjects::under(&node.layout().retained_root());
    if remote.retained.set((subjects, tx)).is_err() {
        return;
    }
    let (publisher, mut stopped) = (node.clone(), stop.clone());
    let counted = remote.clone();
    tasks.spawn(async move {
        loop {
            let (subject, body) = tokio::select! {
                m = rx.recv() => match m {
                    Some(m) => m,
                    None => break,
                },
                _ = stopped.changed() => break,
            };
            // A few tries: a retained message lost here is missing on
            // every other node until it is published again.
            let mut sent = false;
            for attempt in 0..3u32 {
                let publish = publisher.publish_retained(subject.clone(), body.clone());
                match tokio::time::timeout(std::time::Duration::from_secs(5), publish).await {
                    Ok(Ok(_)) => {
                        sent = true;
                        break;
                    }
                    Ok(Err(e)) => tracing::debug!(error = %e, attempt, "retained stream publish"),
                    Err(_) => tracing::debug!(attempt, "retained stream publish: no ack"),
                }
                tokio::time::sleep(std::time::Duration::from_millis(200 << attempt)).await;
            }
            if !sent {
                tracing::warn!(
                    subject,
                    "retained message not written to the retained stream"
                );
                counted.dropped.fetch_add(1, Ordering::Relaxed);
            }
        }
    });
    let mut records = node.consume(chatmq_cluster::StreamRef::Retained, 1, stop.clone());
    let (broker, refused) = (broker.clone(), remote);
    tasks.spawn(async move {
        while let Some(d) = records.recv().await {
            let Some(msg) = checked(&broker, &d.payload) else {
                refused.refused.fetch_add(1, Ordering::Relaxed);
                continue;
            };
            let mut batch = Batch::new();
            broker.apply_retained(&msg, &mut batch);
            drop(broker.store.submit(batch).await);
            node.mark_applied(chatmq_cluster::StreamRef::Retained, d.seq);
        }
    });
}

/// A message record from NATS (untrusted): `None` if it does not decode
/// or names a topic, or carries a payload, this node would refuse.
fn checked(broker: &Broker, body: &[u8]) -> Option<Message> {
    let record = MessageRecord::decode(body).ok()?;
    let limits = broker.topic_limits();
    if !topic::valid_topic(&record.topic)
        || topic::check_topic(&record.topic, &limits).is_err()
        || record.payload.len() > broker.settings.mqtt.max_payload
    {
        return None;
    }
    Some(Message::from_record(record))
}

/// Routes here, in order, what the other nodes' clients published. A body
/// is untrusted (anything on NATS may publish on the subjects): one that
/// does not decode, or names a topic this node would refuse, is dropped.
async fn receive(
    broker: Arc<Broker>,
    remote: Arc<Remote>,
    mut queue: mpsc::Receiver<Arrived>,
    mut stop: watch::Receiver<bool>,
) {
    loop {
        let arrived = tokio::select! {
            a = queue.recv() => match a {
                Some(a) => a,
                None => break,
            },
            _ = stop.changed() => break,
        };
        let Some(mut msg) = checked(&broker, &arrived.body) else {
            remote.refused.fetch_add(1, Ordering::Relaxed);
            continue;
        };
        msg.publisher = arrived.publisher.map(Arc::from);
        let mut batch = Batch::new();
        match &arrived.share {
            Some(share) => {
                broker.route_shared(Arc::new(msg), &share.group, &share.filter, &mut batch)
            }
            None => broker.route_remote(Arc::new(msg), &mut batch),
        }
        // Not waited for: nobody acknowledges a forwarded message; the
        // next one goes to the writer behind it, in order.
        drop(broker.store.submit(batch).await);
    }
}
