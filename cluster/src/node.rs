//! A running cluster node (issue #12 items 2, 3 and the lease part of 7):
//! the partition leases this node holds, the owner's publisher of each
//! partition it holds, the consumers that bring every stream to this
//! node's copy, and the request/reply that forwards a publish to the
//! owner. It knows streams, headers and sequences; what a record means
//! (RocksDB, sessions, MQTT) is the broker's, behind the [`Node`] methods.

use std::collections::{HashMap, HashSet, VecDeque};
use std::future::IntoFuture;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use async_nats::jetstream::consumer::pull::OrderedConfig;
use async_nats::jetstream::consumer::DeliverPolicy;
use async_nats::jetstream::context::PublishError;
use async_nats::jetstream::kv::{self, Operation};
use async_nats::jetstream::message::PublishMessage;
use async_nats::jetstream::publish::PublishAck;
use async_nats::jetstream::Context;
use async_nats::{HeaderMap, Subject};
use bytes::Bytes;
use chatmq_backoff::Backoff;
use futures_util::StreamExt;
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::Instant;

use crate::layout::Layout;
use crate::wire::{self, ChatRecord, ForwardReply, MetaRecord, H_EXPECTED, H_MSG_ID, H_QOS};
use crate::Cluster;

/// Publishes an owner keeps in flight (DESIGN §6: 19k msg/s with 64).
const WINDOW: usize = 256;
/// Records waiting for an owner's publisher.
const PUBLISH_QUEUE: usize = 4096;
/// Delivered records waiting for the broker to apply them.
const APPLY_QUEUE: usize = 1024;
/// Forwarded publishes waiting for the broker.
const FORWARD_QUEUE: usize = 1024;
/// How long a forwarded publish waits for the owner's answer.
/// (An owner that died after taking it is found out then; the retry goes
/// to the next owner, whose idempotency keys hold it if it was sequenced.)
const FORWARD_TIMEOUT: Duration = Duration::from_secs(5);
/// The most node heartbeats read per round (more nodes than this are not
/// a chatmq cluster).
const MAX_NODES: usize = 1024;
/// How long a stream consumer may deliver nothing before the stream is
/// asked whether records are waiting for it (then it is started again).
const STALL_CHECK: Duration = Duration::from_secs(2);

/// A stream of the order of record.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum StreamRef {
    Partition(u32),
    /// Membership, conversations and read state.
    Records,
    /// Plain MQTT retained messages, the last one of each topic.
    Retained,
}

/// Why an owner's publish did not make it: the partition is no longer
/// this node's (lost, released, or someone else wrote to it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Lost;

/// A record delivered from a stream, in stream order.
pub struct Delivered {
    pub seq: u64,
    pub headers: Option<HeaderMap>,
    pub payload: Bytes,
}

/// A publish another node forwarded to this one, the owner.
pub struct Forwarded {
    pub conv: String,
    /// The sender; for a change, the user who asks for it.
    pub sender: String,
    pub qos: u8,
    /// The envelope; for an edit, the new body (JSON).
    pub envelope: Bytes,
    /// `Some`: not a message but a change of one.
    pub change: Option<ChangeRequest>,
    reply: Option<Subject>,
}

/// A forwarded edit or delete of message `target`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChangeRequest {
    /// True for an edit, false for a delete.
    pub edit: bool,
    pub target: u64,
    /// Asked with the admin token (`sender` is then not a user).
    pub admin: bool,
}

/// Counters for `/metrics`.
#[derive(Default)]
pub struct NodeMetrics {
    pub forwarded: AtomicU64,
    pub forward_failures: AtomicU64,
    pub lease_gained: AtomicU64,
    pub lease_lost: AtomicU64,
    pub resyncs: AtomicU64,
}

/// What this node holds of partition `p`, while it holds it.
struct Held {
    epoch: u64,
    revision: u64,
    /// The lease is trusted until then: well before the bucket's TTL,
    /// counted from when the last renewal was sent.
    valid_until: Instant,
    tx: mpsc::Sender<Pending>,
    stop: watch::Sender<bool>,
}

struct Part {
    applied: watch::Sender<u64>,
    /// Records the stream held beyond the last one delivered here, as
    /// the consumer last reported (the apply lag).
    lag: AtomicU64,
    /// Who holds the lease, as last read.
    owner: Mutex<Option<String>>,
    /// Grows at every gain and loss of this partition here: the broker's
    /// sequencer state of a conversation is valid for one generation.
    generation: AtomicU64,
    held: Mutex<Option<Held>>,
}

/// The value of a lease key.
#[derive(Serialize, Deserialize)]
struct LeaseValue {
    node: String,
    epoch: u64,
}

/// This node's handle on a partition it owns.
#[derive(Clone)]
pub struct Owned {
    pub epoch: u64,
    pub generation: u64,
    tx: mpsc::Sender<Pending>,
}

struct Pending {
    record: ChatRecord,
    subject: String,
    done: oneshot::Sender<Result<u64, Lost>>,
}

impl Owned {
    /// Hands `record` to the partition's publisher; resolves with its
    /// stream seq once the stream acknowledged it. Records of one
    /// partition reach the stream in the order they are handed over.
    pub async fn publish(
        &self,
        layout: &Layout,
        p: u32,
        record: ChatRecord,
    ) -> Result<oneshot::Receiver<Result<u64, Lost>>, Lost> {
        let (done, rx) = oneshot::channel();
        let subject = format!(
            "{}.chat.{p}.{}",
            layout.prefix(),
            wire::subject_token(&record.conv)
        );
        self.tx
            .send(Pending {
                record,
                subject,
                done,
            })
            .await
            .map_err(|_| Lost)?;
        Ok(rx)
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// The running cluster side of a node.
pub struct Node {
    client: async_nats::Client,
    js: Context,
    layout: Layout,
    node_id: String,
    parts: Vec<Part>,
    records_applied: watch::Sender<u64>,
    retained_applied: watch::Sender<u64>,
    /// Set once this copy applied every stream up to where it stood when
    /// the node started (`/readyz` says not ready until then).
    caught_up: std::sync::atomic::AtomicBool,
    /// The nodes whose heartbeat this node saw, and when (the watch of
    /// `node.>` in the leases bucket: [`Node::follow_heartbeats`]).
    heartbeats: Mutex<HashMap<String, Instant>>,
    /// Set by [`Node::hand_over`]: the node is draining; it holds no
    /// partition from now on.
    leaving: std::sync::atomic::AtomicBool,
    pub metrics: NodeMetrics,
}

impl Node {
    pub fn new(cluster: &Cluster, node_id: &str) -> Arc<Node> {
        let parts = (0..cluster.layout().partitions())
            .map(|_| Part {
                applied: watch::channel(0).0,
                lag: AtomicU64::new(0),
                owner: Mutex::new(None),
                generation: AtomicU64::new(1),
                held: Mutex::new(None),
            })
            .collect();
        Arc::new(Node {
            client: cluster.client().clone(),
            js: cluster.jetstream().clone(),
            layout: cluster.layout().clone(),
            node_id: node_id.to_string(),
            parts,
            records_applied: watch::channel(0).0,
            retained_applied: watch::channel(0).0,
            caught_up: std::sync::atomic::AtomicBool::new(false),
            heartbeats: Mutex::new(HashMap::new()),
            leaving: std::sync::atomic::AtomicBool::new(false),
            metrics: NodeMetrics::default(),
        })
    }

    pub fn node_id(&self) -> &str {
        &self.node_id
    }

    pub fn layout(&self) -> &Layout {
        &self.layout
    }

    pub fn partition_of(&self, conv: &str) -> u32 {
        wire::partition_of(conv, self.layout.partitions())
    }

    /// Whether this copy has caught up with the streams as they were
    /// when the node started.
    pub fn caught_up(&self) -> bool {
        self.caught_up.load(Ordering::Acquire)
    }

    /// Waits until every stream is applied here up to its last seq as read
    /// now (read again while NATS does not answer), then marks the node
    /// caught up. Ends early at `shutdown`.
    pub async fn catch_up(&self, mut shutdown: watch::Receiver<bool>) {
        let streams: Vec<StreamRef> = (0..self.layout.partitions())
            .map(StreamRef::Partition)
            .chain([StreamRef::Records])
            .collect();
        for s in streams {
            let last = loop {
                match self.last_seq(s).await {
                    Ok(l) => break l,
                    Err(e) => tracing::debug!(error = %e, "catch-up: reading the stream's end"),
                }
                tokio::select! {
                    _ = shutdown.changed() => return,
                    _ = tokio::time::sleep(Duration::from_millis(500)) => {}
                }
            };
            let mut rx = match s {
                StreamRef::Partition(p) => match self.part(p) {
                    Some(x) => x.applied.subscribe(),
                    None => continue,
                },
                StreamRef::Records => self.records_applied.subscribe(),
                StreamRef::Retained => self.retained_applied.subscribe(),
            };
            tokio::select! {
                _ = shutdown.changed() => return,
                _ = rx.wait_for(|v| *v >= last) => {}
            }
        }
        self.caught_up.store(true, Ordering::Release);
        tracing::info!("caught up with the cluster's streams");
    }

    /// The stream's name.
    pub fn stream_name(&self, s: StreamRef) -> String {
        match s {
            StreamRef::Partition(p) => self.layout.partition_stream(p),
            StreamRef::Records => self.layout.records_stream(),
            StreamRef::Retained => self.layout.retained_stream(),
        }
    }

    /// Whether a record of `len` payload bytes fits NATS's limit, with
    /// room for the headers.
    pub fn fits(&self, len: usize) -> bool {
        // 1 MiB, the server's default, until a server told its own.
        let max = match self.client.server_info().max_payload {
            0 => 1 << 20,
            m => m,
        };
        len.saturating_add(1024) <= max
    }

    fn part(&self, p: u32) -> Option<&Part> {
        self.parts.get(p as usize)
    }

    /// The current generation of partition `p` here.
    pub fn generation(&self, p: u32) -> u64 {
        self.part(p)
            .map(|x| x.generation.load(Ordering::Acquire))
            .unwrap_or(0)
    }

    /// This node's handle on `p`, if it holds a lease it may still trust.
    pub fn owned(&self, p: u32) -> Option<Owned> {
        let part = self.part(p)?;
        let held = lock(&part.held);
        let h = held.as_ref()?;
        if Instant::now() >= h.valid_until {
            return None;
        }
        Some(Owned {
            epoch: h.epoch,
            generation: part.generation.load(Ordering::Acquire),
            tx: h.tx.clone(),
        })
    }

    /// The node is draining: it gives its partitions back at the next
    /// lease round and takes none again, and stops counting as a live
    /// node, so the others take them over while its clients are still
    /// being moved away (their publishes are forwarded meanwhile).
    pub fn hand_over(&self) {
        self.leaving.store(true, Ordering::Release);
    }

    /// How many partitions this node holds.
    pub fn owned_count(&self) -> usize {
        self.parts
            .iter()
            .filter(|p| lock(&p.held).is_some())
            .count()
    }

    /// Partition `p`'s apply lag: records its stream held beyond the last
    /// one delivered here, when one was last delivered.
    pub fn apply_lag(&self, p: u32) -> u64 {
        self.part(p)
            .map(|x| x.lag.load(Ordering::Relaxed))
            .unwrap_or(0)
    }

    /// The node holding `p`'s lease, as last read (maybe this one).
    pub fn owner_of(&self, p: u32) -> Option<String> {
        self.part(p).and_then(|x| lock(&x.owner).clone())
    }

    /// This node's copy holds stream `s` up to `seq`.
    pub fn mark_applied(&self, s: StreamRef, seq: u64) {
        let w = match s {
            StreamRef::Partition(p) => match self.part(p) {
                Some(x) => &x.applied,
                None => return,
            },
            StreamRef::Records => &self.records_applied,
            StreamRef::Retained => &self.retained_applied,
        };
        w.send_if_modified(|v| {
            let grew = seq > *v;
            *v = (*v).max(seq);
            grew
        });
    }

    pub fn applied(&self, s: StreamRef) -> u64 {
        match s {
            StreamRef::Partition(p) => self.part(p).map(|x| *x.applied.borrow()).unwrap_or(0),
            StreamRef::Records => *self.records_applied.borrow(),
            StreamRef::Retained => *self.retained_applied.borrow(),
        }
    }

    /// Waits until this node's copy of `s` reaches `seq`, at most `within`.
    pub async fn wait_applied(&self, s: StreamRef, seq: u64, within: Duration) -> bool {
        let mut rx = match s {
            StreamRef::Partition(p) => match self.part(p) {
                Some(x) => x.applied.subscribe(),
                None => return false,
            },
            StreamRef::Records => self.records_applied.subscribe(),
            StreamRef::Retained => self.retained_applied.subscribe(),
        };
        tokio::time::timeout(within, rx.wait_for(|v| *v >= seq))
            .await
            .is_ok_and(|r| r.is_ok())
    }

    /// The last sequence of stream `s`.
    pub async fn last_seq(&self, s: StreamRef) -> Result<u64, String> {
        let name = self.stream_name(s);
        let mut stream = self.js.get_stream(&name).await.map_err(|e| e.to_string())?;
        let info = stream.info().await.map_err(|e| e.to_string())?;
        Ok(info.state.last_sequence)
    }

    /// Publishes a record to the records stream; its stream seq once
    /// acknowledged. Any node may: these records need no sequencer.
    /// Publishes a retained message (its record, empty payload to clear
    /// it) on `subject` of the retained stream, which keeps the last one
    /// of each; its stream seq once acknowledged.
    pub async fn publish_retained(&self, subject: String, body: Bytes) -> Result<u64, String> {
        let ack = self
            .js
            .publish(subject, body)
            .await
            .map_err(|e| e.to_string())?
            .await
            .map_err(|e| e.to_string())?;
        Ok(ack.sequence)
    }

    pub async fn publish_meta(&self, record: &MetaRecord) -> Result<u64, String> {
        let subject = format!("{}.records.meta", self.layout.prefix());
        let ack = self
            .js
            .publish(subject, record.encode())
            .await
            .map_err(|e| e.to_string())?
            .await
            .map_err(|e| e.to_string())?;
        Ok(ack.sequence)
    }

    /// Every record of `s` from `from` on, in order, for ever: an ordered
    /// consumer, created again from where it stopped when it fails.
    pub fn consume(
        self: &Arc<Self>,
        s: StreamRef,
        from: u64,
        shutdown: watch::Receiver<bool>,
    ) -> mpsc::Receiver<Delivered> {
        let (tx, rx) = mpsc::channel(APPLY_QUEUE);
        let node = self.clone();
        tokio::spawn(async move { node.run_consumer(s, from.max(1), tx, shutdown).await });
        rx
    }

    async fn run_consumer(
        &self,
        s: StreamRef,
        mut next: u64,
        tx: mpsc::Sender<Delivered>,
        mut shutdown: watch::Receiver<bool>,
    ) {
        let name = self.stream_name(s);
        let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(1));
        loop {
            let attempt = async {
                // Bounded: after a NATS server's loss a creation can be
                // placed on the server that is gone and never answer;
                // another try is placed again.
                let create = async {
                    let stream = self.js.get_stream(&name).await.map_err(|e| e.to_string())?;
                    let consumer = stream
                        .create_consumer(OrderedConfig {
                            deliver_policy: DeliverPolicy::ByStartSequence {
                                start_sequence: next,
                            },
                            ..OrderedConfig::default()
                        })
                        .await
                        .map_err(|e| e.to_string())?;
                    consumer.messages().await.map_err(|e| e.to_string())
                };
                let mut messages = tokio::time::timeout(STALL_CHECK, create)
                    .await
                    .map_err(|_| "no consumer within the stall check".to_string())??;
                loop {
                    // A consumer whose server died delivers nothing until
                    // the client notices, which took most of a minute after
                    // a stream leader's loss (its partition could not be
                    // taken over meanwhile: no node caught up). Quiet for
                    // a while with records waiting: start it again.
                    let m = match tokio::time::timeout(STALL_CHECK, messages.next()).await {
                        Ok(Some(m)) => m,
                        Ok(None) => break,
                        Err(_) => match self.last_seq(s).await {
                            Ok(last) if last >= next => {
                                return Err(format!("stalled before {next} of {last}"))
                            }
                            _ => continue,
                        },
                    };
                    let m = m.map_err(|e| e.to_string())?;
                    let seq = match m.info() {
                        Ok(info) => {
                            if let StreamRef::Partition(p) = s {
                                if let Some(part) = self.part(p) {
                                    part.lag.store(info.pending, Ordering::Relaxed);
                                }
                            }
                            info.stream_sequence
                        }
                        Err(e) => return Err(e.to_string()),
                    };
                    if seq < next {
                        continue;
                    }
                    let (msg, _acker) = m.split();
                    let d = Delivered {
                        seq,
                        headers: msg.headers,
                        payload: msg.payload,
                    };
                    if tx.send(d).await.is_err() {
                        return Ok(());
                    }
                    next = seq + 1;
                }
                Err("the consumer ended".to_string())
            };
            tokio::select! {
                _ = shutdown.changed() => return,
                r = attempt => match r {
                    Ok(()) => return,
                    Err(e) => tracing::warn!(stream = %name, next, error = %e, "stream consumer: starting again"),
                },
            }
            tokio::select! {
                _ = shutdown.changed() => return,
                _ = tokio::time::sleep(backoff.next_delay()) => {}
            }
        }
    }

    /// The forwarded publishes for this node, as the owner.
    pub async fn serve_forwarded(&self) -> Result<mpsc::Receiver<Forwarded>, String> {
        let subject = format!("{}.fwd.{}", self.layout.prefix(), self.node_id);
        let mut sub = self
            .client
            .subscribe(subject)
            .await
            .map_err(|e| e.to_string())?;
        let (tx, rx) = mpsc::channel(FORWARD_QUEUE);
        tokio::spawn(async move {
            while let Some(m) = sub.next().await {
                let h = m.headers.as_ref();
                let parsed = h.and_then(|h| {
                    Some((
                        wire::text(h, wire::H_CONV)?,
                        wire::text(h, wire::H_SENDER)?,
                        wire::number(h, H_QOS)?,
                    ))
                });
                let Some((conv, sender, qos)) = parsed else {
                    continue;
                };
                let change = match h.and_then(|h| h.get(wire::H_CHANGE)).map(|v| v.as_str()) {
                    None => None,
                    Some(op) => {
                        let target = h.and_then(|h| wire::number(h, wire::H_TARGET));
                        let admin = h
                            .and_then(|h| h.get(wire::H_ADMIN))
                            .is_some_and(|v| v.as_str() == "1");
                        match (op, target) {
                            ("edit" | "delete", Some(target)) => Some(ChangeRequest {
                                edit: op == "edit",
                                target,
                                admin,
                            }),
                            // Malformed: not served.
                            _ => continue,
                        }
                    }
                };
                let f = Forwarded {
                    conv,
                    sender,
                    qos: u8::try_from(qos.min(2)).unwrap_or(1),
                    envelope: m.payload,
                    change,
                    reply: m.reply,
                };
                if tx.try_send(f).is_err() {
                    tracing::warn!(
                        "forwarded publishes: queue full, one dropped (the sender retries)"
                    );
                }
            }
        });
        Ok(rx)
    }

    /// Answers a forwarded publish.
    pub async fn respond(&self, f: Forwarded, reply: ForwardReply) {
        if let Some(to) = f.reply {
            if let Err(e) = self.client.publish(to, reply.encode()).await {
                tracing::debug!(error = %e, "answering a forwarded publish");
            }
        }
    }

    /// Forwards a publish to `owner`; its answer, or `None` when none came.
    pub async fn forward(
        &self,
        owner: &str,
        conv: &str,
        sender: &str,
        qos: u8,
        envelope: Bytes,
    ) -> Option<ForwardReply> {
        let mut h = HeaderMap::new();
        h.insert(wire::H_CONV, wire::escape(conv));
        h.insert(wire::H_SENDER, wire::escape(sender));
        h.insert(H_QOS, qos.to_string());
        self.ask_owner(owner, h, envelope).await
    }

    /// Forwards a change of message `change.target` of `conv`, asked by
    /// `by`, to `owner` (an edit's new body as `body`); its answer, or
    /// `None` when none came.
    pub async fn forward_change(
        &self,
        owner: &str,
        conv: &str,
        by: &str,
        change: &ChangeRequest,
        body: Bytes,
    ) -> Option<ForwardReply> {
        let mut h = HeaderMap::new();
        h.insert(wire::H_CONV, wire::escape(conv));
        h.insert(wire::H_SENDER, wire::escape(by));
        h.insert(H_QOS, "1");
        h.insert(wire::H_CHANGE, if change.edit { "edit" } else { "delete" });
        h.insert(wire::H_TARGET, change.target.to_string());
        if change.admin {
            h.insert(wire::H_ADMIN, "1");
        }
        self.ask_owner(owner, h, body).await
    }

    async fn ask_owner(&self, owner: &str, h: HeaderMap, payload: Bytes) -> Option<ForwardReply> {
        self.metrics.forwarded.fetch_add(1, Ordering::Relaxed);
        let subject = format!("{}.fwd.{}", self.layout.prefix(), owner);
        let envelope = payload;
        let asked = self.client.request_with_headers(subject, h, envelope);
        let reply = match tokio::time::timeout(FORWARD_TIMEOUT, asked).await {
            Ok(Ok(m)) => ForwardReply::parse(&m.payload),
            _ => None,
        };
        if reply.is_none() {
            self.metrics
                .forward_failures
                .fetch_add(1, Ordering::Relaxed);
        }
        reply
    }

    /// The lease manager: heartbeats, renewals, a fair share of the
    /// partitions, until `shutdown`; then the leases are given back.
    pub async fn run_leases(self: Arc<Self>, mut shutdown: watch::Receiver<bool>) {
        let bucket = self.layout.leases_bucket();
        let kv = loop {
            match self.js.get_key_value(&bucket).await {
                Ok(kv) => break kv,
                Err(e) => tracing::warn!(error = %e, "leases bucket: retrying"),
            }
            tokio::select! {
                _ = shutdown.changed() => return,
                _ = tokio::time::sleep(Duration::from_millis(500)) => {}
            }
        };
        tokio::spawn(self.clone().follow_heartbeats(kv.clone(), shutdown.clone()));
        let every = self.layout.lease_ttl() / 4;
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = shutdown.changed() => break,
                _ = tick.tick() => {}
            }
            let round = tokio::time::timeout(every * 3, self.lease_round(&kv));
            tokio::select! {
                _ = shutdown.changed() => break,
                r = round => if r.is_err() { tracing::warn!("lease round timed out") },
            }
            self.fence_expired();
        }
        // Gone from the live nodes first, so that the others take the
        // partitions at once instead of leaving them to this node's share.
        let heartbeat = format!("node.{}", self.node_id);
        let _ = tokio::time::timeout(Duration::from_secs(2), kv.delete(&heartbeat)).await;
        for p in 0..self.layout.partitions() {
            let _ = tokio::time::timeout(Duration::from_secs(2), self.release(&kv, p)).await;
        }
    }

    /// Keeps [`Node::heartbeats`] from one long-lived watch of the
    /// heartbeat keys, watched again after a failure. (Listing the keys
    /// every lease round created a JetStream consumer twice a second per
    /// node: a request to the meta leader each time, which after a NATS
    /// server loss took longer than the round, so that leases went
    /// unrenewed for most of a minute.)
    async fn follow_heartbeats(
        self: Arc<Self>,
        kv: kv::Store,
        mut shutdown: watch::Receiver<bool>,
    ) {
        loop {
            match kv.watch_with_history("node.>").await {
                Ok(mut entries) => loop {
                    tokio::select! {
                        _ = shutdown.changed() => return,
                        e = entries.next() => match e {
                            Some(Ok(e)) => {
                                let Some(n) = e.key.strip_prefix("node.") else { continue };
                                let mut beats = lock(&self.heartbeats);
                                match e.operation {
                                    Operation::Put => {
                                        if beats.len() < MAX_NODES || beats.contains_key(n) {
                                            beats.insert(n.to_string(), Instant::now());
                                        }
                                    }
                                    Operation::Delete | Operation::Purge => {
                                        beats.remove(n);
                                    }
                                }
                            }
                            Some(Err(e)) => {
                                tracing::debug!(error = %e, "heartbeat watch failed; watching again");
                                break;
                            }
                            None => break,
                        },
                    }
                },
                Err(e) => tracing::debug!(error = %e, "cannot watch heartbeats; again soon"),
            }
            tokio::select! {
                _ = shutdown.changed() => return,
                _ = tokio::time::sleep(Duration::from_millis(500)) => {}
            }
        }
    }

    /// This node and those whose heartbeat was seen within the lease TTL.
    fn live_nodes(&self) -> HashSet<String> {
        let ttl = self.layout.lease_ttl();
        let mut beats = lock(&self.heartbeats);
        beats.retain(|_, seen| seen.elapsed() < ttl);
        let mut live: HashSet<String> = beats.keys().cloned().collect();
        live.insert(self.node_id.clone());
        live
    }

    fn lease_key(p: u32) -> String {
        format!("p.{p}")
    }

    /// Stops sequencing every partition whose lease could not be renewed
    /// in time.
    fn fence_expired(&self) {
        let now = Instant::now();
        for (p, part) in self.parts.iter().enumerate() {
            let expired = lock(&part.held)
                .as_ref()
                .is_some_and(|h| now >= h.valid_until);
            if expired {
                tracing::warn!(
                    partition = p,
                    "lease not renewed in time: no longer sequencing"
                );
                self.lose(p as u32);
            }
        }
    }

    /// This node no longer holds `p`: its publisher stops, failing what
    /// it had not confirmed, and the sequencer state of its conversations
    /// is stale.
    fn lose(&self, p: u32) {
        let Some(part) = self.part(p) else { return };
        if let Some(h) = lock(&part.held).take() {
            let _ = h.stop.send(true);
            part.generation.fetch_add(1, Ordering::AcqRel);
            self.metrics.lease_lost.fetch_add(1, Ordering::Relaxed);
        }
    }

    async fn release(&self, kv: &kv::Store, p: u32) {
        let revision = self
            .part(p)
            .and_then(|x| lock(&x.held).as_ref().map(|h| h.revision));
        self.lose(p);
        if let Some(r) = revision {
            if let Err(e) = kv.delete_expect_revision(Self::lease_key(p), Some(r)).await {
                tracing::debug!(partition = p, error = %e, "giving a lease back");
            }
        }
    }

    async fn lease_round(self: &Arc<Self>, kv: &kv::Store) {
        let ttl = self.layout.lease_ttl();
        let heartbeat = format!("node.{}", self.node_id);
        let leaving = self.leaving.load(Ordering::Acquire);
        if leaving {
            // Draining: no heartbeat (the others count it out of the
            // share), nothing held; it still learns who the owners are,
            // to forward to them.
            if let Err(e) = kv.delete(&heartbeat).await {
                tracing::debug!(error = %e, "node heartbeat");
            }
            for p in 0..self.layout.partitions() {
                if self.part(p).is_some_and(|x| lock(&x.held).is_some()) {
                    tracing::info!(partition = p, "draining: handing the partition over");
                    self.release(kv, p).await;
                }
            }
        } else if let Err(e) = kv.put(&heartbeat, Bytes::new()).await {
            tracing::debug!(error = %e, "node heartbeat");
        }
        // Renew what is held.
        for p in 0..self.layout.partitions() {
            let Some(part) = self.part(p) else { continue };
            let held = lock(&part.held).as_ref().map(|h| (h.revision, h.epoch));
            let Some((revision, epoch)) = held else {
                continue;
            };
            let sent = Instant::now();
            let value = self.lease_value(epoch);
            match kv.update(Self::lease_key(p), value, revision).await {
                Ok(rev) => {
                    if let Some(h) = lock(&part.held).as_mut() {
                        h.revision = rev;
                        h.valid_until = sent + ttl * 3 / 4;
                    }
                }
                Err(e) if e.kind() == kv::UpdateErrorKind::WrongLastRevision => {
                    tracing::warn!(
                        partition = p,
                        "lease taken by another node: no longer sequencing"
                    );
                    self.lose(p);
                }
                Err(e) => tracing::warn!(partition = p, error = %e, "lease renewal failed"),
            }
        }
        // Who holds what, and who is alive.
        let mut owners: HashMap<String, usize> = HashMap::new();
        let mut free = Vec::new();
        for p in 0..self.layout.partitions() {
            let owner = match kv.entry(Self::lease_key(p)).await {
                Ok(Some(e)) if e.operation == Operation::Put => {
                    serde_json::from_slice::<LeaseValue>(&e.value)
                        .ok()
                        .map(|v| v.node)
                }
                Ok(_) => None,
                Err(_) => continue,
            };
            match &owner {
                Some(o) => *owners.entry(o.clone()).or_default() += 1,
                None => free.push(p),
            }
            if let Some(part) = self.part(p) {
                *lock(&part.owner) = owner;
            }
        }
        if leaving {
            return;
        }
        let live = self.live_nodes();
        let n = live.len().max(1) as u32;
        let partitions = self.layout.partitions();
        let ceil = partitions.div_ceil(n) as usize;
        let floor = (partitions / n) as usize;
        let mine = self.owned_count();
        let starved = live
            .iter()
            .any(|l| owners.get(l).copied().unwrap_or(0) < floor);
        if mine > ceil || (mine > floor && starved && free.is_empty()) {
            let top = (0..partitions)
                .rev()
                .find(|p| self.part(*p).is_some_and(|x| lock(&x.held).is_some()));
            if let Some(p) = top {
                tracing::info!(
                    partition = p,
                    nodes = n,
                    "handing a partition over to even the load"
                );
                self.release(kv, p).await;
            }
        } else if mine < ceil && !(starved && mine >= floor) {
            // (A node with its floor leaves what is free to a node below
            // it, rather than taking back what it just handed over.)
            // Spread the free ones: start at a place of this node's own.
            let offset = wire::partition_of(&self.node_id, partitions.max(1)) as usize;
            let len = free.len();
            if len > 0 {
                let p = free[offset % len];
                self.acquire(kv, p).await;
            }
        }
    }

    fn lease_value(&self, epoch: u64) -> Bytes {
        Bytes::from(
            serde_json::to_vec(&LeaseValue {
                node: self.node_id.clone(),
                epoch,
            })
            .unwrap_or_default(),
        )
    }

    /// Takes `p` if it is free and this node's copy is caught up with its
    /// stream; then starts its publisher.
    async fn acquire(self: &Arc<Self>, kv: &kv::Store, p: u32) {
        let s = StreamRef::Partition(p);
        let ttl = self.layout.lease_ttl();
        let Ok(last) = self.last_seq(s).await else {
            return;
        };
        if !self.wait_applied(s, last, ttl / 4).await {
            tracing::debug!(
                partition = p,
                last,
                applied = self.applied(s),
                "not caught up: not taking it yet"
            );
            return;
        }
        let sent = Instant::now();
        let Ok(created) = kv.create(Self::lease_key(p), self.lease_value(0)).await else {
            return;
        };
        // The epoch is the revision of the creation: it grows with every
        // new owner, whoever it is.
        let Ok(revision) = kv
            .update(Self::lease_key(p), self.lease_value(created), created)
            .await
        else {
            return;
        };
        // 2.9.10's per-subject checks may let two creators through: the
        // last write is the owner.
        match kv.entry(Self::lease_key(p)).await {
            Ok(Some(e)) if e.revision == revision => {}
            _ => return,
        }
        // Whatever was written until now must be here before the first seq.
        let caught_up = match self.last_seq(s).await {
            Ok(last) => self.wait_applied(s, last, ttl / 4).await.then_some(last),
            Err(_) => None,
        };
        let Some(confirmed) = caught_up else {
            let _ = kv
                .delete_expect_revision(Self::lease_key(p), Some(revision))
                .await;
            return;
        };
        let Some(part) = self.part(p) else { return };
        let (tx, rx) = mpsc::channel(PUBLISH_QUEUE);
        let (stop, stopped) = watch::channel(false);
        *lock(&part.held) = Some(Held {
            epoch: created,
            revision,
            valid_until: sent + ttl * 3 / 4,
            tx,
            stop,
        });
        *lock(&part.owner) = Some(self.node_id.clone());
        part.generation.fetch_add(1, Ordering::AcqRel);
        self.metrics.lease_gained.fetch_add(1, Ordering::Relaxed);
        tracing::info!(
            partition = p,
            epoch = created,
            stream_seq = confirmed,
            "sequencing partition"
        );
        let node = self.clone();
        tokio::spawn(async move {
            let lost = node.run_publisher(p, created, confirmed, rx, stopped).await;
            if lost {
                node.lose_epoch(p, created);
            }
        });
    }

    /// Loses `p` if it is still held with `epoch`.
    fn lose_epoch(&self, p: u32, epoch: u64) {
        let held = self
            .part(p)
            .is_some_and(|x| lock(&x.held).as_ref().is_some_and(|h| h.epoch == epoch));
        if held {
            self.lose(p);
        }
    }

    /// The owner's publisher of `p`: records in the order handed over,
    /// each with the stream-level expected last sequence it predicts, up
    /// to [`WINDOW`] in flight. Any doubt ("wrong last sequence", a lost
    /// ack, a reconnect) is a resync; a record not its own in the stream
    /// means another owner wrote: it steps down. Returns whether it lost
    /// the partition (rather than being stopped).
    async fn run_publisher(
        &self,
        p: u32,
        epoch: u64,
        mut confirmed: u64,
        mut rx: mpsc::Receiver<Pending>,
        mut stop: watch::Receiver<bool>,
    ) -> bool {
        type AckFuture =
            Pin<Box<dyn std::future::Future<Output = Result<PublishAck, PublishError>> + Send>>;
        let mut queue: VecDeque<Pending> = VecDeque::new();
        let mut inflight: VecDeque<(Pending, u64, AckFuture)> = VecDeque::new();
        let mut next = confirmed;
        let lost = loop {
            if *stop.borrow() {
                break false;
            }
            let mut trouble = false;
            while inflight.len() < WINDOW {
                let item = match queue.pop_front() {
                    Some(i) => i,
                    None => match rx.try_recv() {
                        Ok(i) => i,
                        Err(_) => break,
                    },
                };
                let mut h = item.record.headers();
                h.insert(H_EXPECTED, next.to_string());
                let publish = PublishMessage::build()
                    .headers(h)
                    .payload(item.record.body.clone());
                match self.js.send_publish(item.subject.clone(), publish).await {
                    Ok(ack) => {
                        inflight.push_back((item, next, Box::pin(ack.into_future())));
                        next += 1;
                    }
                    Err(e) => {
                        tracing::warn!(partition = p, error = %e, "publish not sent");
                        queue.push_front(item);
                        trouble = true;
                        break;
                    }
                }
            }
            if !trouble {
                tokio::select! {
                    _ = stop.changed() => break false,
                    item = rx.recv(), if inflight.is_empty() && queue.is_empty() => match item {
                        Some(i) => { queue.push_back(i); continue; }
                        None => break false,
                    },
                    res = async {
                        match inflight.front_mut() {
                            Some(f) => f.2.as_mut().await,
                            None => std::future::pending().await,
                        }
                    } => {
                        let Some((item, expected, _)) = inflight.pop_front() else { continue };
                        match res {
                            Ok(ack) if !ack.duplicate && ack.sequence == expected + 1 => {
                                confirmed = ack.sequence;
                                let _ = item.done.send(Ok(ack.sequence));
                                continue;
                            }
                            Ok(ack) => tracing::warn!(partition = p, seq = ack.sequence, duplicate = ack.duplicate, expected, "unexpected ack: resync"),
                            Err(e) => tracing::warn!(partition = p, error = %e, "publish failed: resync"),
                        }
                        queue.push_front(item);
                    }
                }
            }
            // Resync: what is in flight is in doubt; put it back in order.
            self.metrics.resyncs.fetch_add(1, Ordering::Relaxed);
            while let Some((item, _, _)) = inflight.pop_back() {
                queue.push_front(item);
            }
            match self.resync(p, &mut confirmed, &mut queue, &mut stop).await {
                Ok(()) => next = confirmed,
                Err(lost) => break lost,
            }
        };
        for (item, _, _) in inflight.drain(..) {
            let _ = item.done.send(Err(Lost));
        }
        for item in queue.drain(..) {
            let _ = item.done.send(Err(Lost));
        }
        rx.close();
        while let Ok(item) = rx.try_recv() {
            let _ = item.done.send(Err(Lost));
        }
        tracing::info!(partition = p, epoch, lost, "stopped sequencing partition");
        lost
    }

    /// Reads what the stream holds after `confirmed`: each must be the
    /// next of `queue` (a publish whose ack was lost), confirmed then; a
    /// record of anyone else means another owner: `Err(true)`. `Err(false)`:
    /// stopped meanwhile.
    async fn resync(
        &self,
        p: u32,
        confirmed: &mut u64,
        queue: &mut VecDeque<Pending>,
        stop: &mut watch::Receiver<bool>,
    ) -> Result<(), bool> {
        let name = self.layout.partition_stream(p);
        let mut backoff = Backoff::new(Duration::from_millis(50), Duration::from_secs(1));
        loop {
            if *stop.borrow() {
                return Err(false);
            }
            let attempt = async {
                let last = self.last_seq(StreamRef::Partition(p)).await?;
                if last < *confirmed {
                    return Ok(Err(true));
                }
                if last - *confirmed > queue.len() as u64 {
                    return Ok(Err(true));
                }
                let stream = self.js.get_stream(&name).await.map_err(|e| e.to_string())?;
                while *confirmed < last {
                    let s = *confirmed + 1;
                    let m = stream.get_raw_message(s).await.map_err(|e| e.to_string())?;
                    let id = m.headers.get(H_MSG_ID).map(|v| v.as_str().to_string());
                    match queue.front() {
                        Some(front) if id.as_deref() == Some(front.record.msg_id().as_str()) => {
                            if let Some(item) = queue.pop_front() {
                                let _ = item.done.send(Ok(s));
                            }
                            *confirmed = s;
                        }
                        _ => return Ok(Err(true)),
                    }
                }
                Ok::<_, String>(Ok(()))
            };
            let r = tokio::select! {
                _ = stop.changed() => return Err(false),
                r = tokio::time::timeout(Duration::from_secs(5), attempt) => r,
            };
            match r {
                Ok(Ok(Ok(()))) => return Ok(()),
                Ok(Ok(Err(lost))) => {
                    tracing::warn!(
                        partition = p,
                        "another owner wrote to the partition: stepping down"
                    );
                    return Err(lost);
                }
                Ok(Err(e)) => tracing::warn!(partition = p, error = %e, "resync: retrying"),
                Err(_) => tracing::warn!(partition = p, "resync: timed out, retrying"),
            }
            tokio::select! {
                _ = stop.changed() => return Err(false),
                _ = tokio::time::sleep(backoff.next_delay()) => {}
            }
        }
    }
}
