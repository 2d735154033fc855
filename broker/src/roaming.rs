//! Sessions that move between the nodes of a cluster (issue #12 item 4),
//! the broker's half (the bucket: `chatmq_cluster::sessions`).
//!
//! - **Where a session is.** The node a client is attached to writes the
//!   client id's value ([`Roamed`]: its node, owner, expiry, subscriptions
//!   and chat cursors) when the client connects (a *claim*, before
//!   CONNACK), when its subscriptions change, as its chat cursors are
//!   saved (the same coalescing as on disk: `session::CURSOR_SAVE_ACKS`),
//!   and when it disconnects; the session's end deletes it. Every write
//!   after the claim expects the revision this node wrote last, so a node
//!   the client has left can never overwrite the value of the node it
//!   went to.
//! - **Moving.** A CONNECT without Clean Start on a node that has no
//!   session for the client id, or only one that another node's value
//!   has replaced, resumes the value's session: its subscriptions are
//!   indexed here and its chat cursors start the catch-up, exactly as if
//!   this node had restored it from disk (Session Present 1). A value
//!   written while its client was connected (its node died) resumes like a
//!   session after a crash: the seqs it may have acknowledged since its
//!   cursors were written go out again marked DUP, and a client
//!   deduplicates them by (conversation, seq) as after a single node's
//!   crash.
//! - **Taking over.** Every node watches the bucket; a value of another
//!   node for a client id this node holds means the client went there:
//!   its connection here is closed with DISCONNECT 0x8E and its session
//!   removed ([`Broker::moved_away`]).
//! - **Who may.** A client id held by one user on any node is refused to
//!   another (0x87), as on one node.
//! - **What does not move**: plain-MQTT messages queued for a persistent
//!   session while its client was away stay on the node that queued them
//!   (docs/CLUSTER.md says why), and a client id longer than
//!   `sessions::MAX_CLIENT_ID` bytes does not move at all.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use bytes::Bytes;
use chatmq_cluster::sessions::{self, Change, Refused, SessionBook};
use futures_util::StreamExt;
use serde::{Deserialize, Serialize};
use tokio::sync::{watch, Notify};
use tokio::task::JoinSet;

use crate::broker::{Broker, SessionCell};
use crate::clock::now_ms;
use crate::session::Session;

/// A value being claimed: the watch ignores other nodes' older values of
/// the client id until the claim is written.
const CLAIMING: u64 = u64::MAX;

/// How long after its last write a connected session's value is rewritten
/// (and how long a node that died with it connected is trusted to have
/// had it): a device connected for months stays resumable.
const REFRESH: Duration = Duration::from_secs(3600);

/// Writes are gathered this long after the first change.
const GATHER: Duration = Duration::from_millis(50);

/// The value of a client id in the bucket: what a node needs to resume
/// its session.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Roamed {
    /// The node the client is, or was last, attached to.
    pub node: String,
    pub owner: Option<String>,
    /// 4 for MQTT 3.1.1, 5 for MQTT 5.
    pub protocol: u8,
    pub expiry_secs: u32,
    /// Unix ms when its connection ended; 0 while connected.
    pub disconnected_at_ms: u64,
    /// When this value was written (unix ms).
    pub written_ms: u64,
    /// The claim resumed a session (Clean Start 0): a delayed will of the
    /// node left is not published [MQTT-3.1.3-9].
    #[serde(default)]
    pub resumed: bool,
    #[serde(default)]
    pub subscriptions: Vec<RoamedSub>,
    /// The last seq acknowledged, per conversation.
    #[serde(default)]
    pub cursors: Vec<(String, u64)>,
}

/// One subscription with its options.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RoamedSub {
    pub filter: String,
    pub qos: u8,
    #[serde(default)]
    pub no_local: bool,
    #[serde(default)]
    pub retain_as_published: bool,
    #[serde(default)]
    pub retain_handling: u8,
    #[serde(default)]
    pub identifier: u32,
}

impl Roamed {
    fn of(session: &Session, node: &str, resumed: bool) -> Roamed {
        let record = session.record();
        Roamed {
            node: node.to_string(),
            owner: record.owner,
            protocol: record.protocol,
            expiry_secs: record.expiry_secs,
            disconnected_at_ms: if session.connected {
                0
            } else {
                record.disconnected_at_ms
            },
            written_ms: now_ms(),
            resumed,
            subscriptions: record
                .subscriptions
                .into_iter()
                .map(|s| RoamedSub {
                    filter: s.filter,
                    qos: s.qos,
                    no_local: s.no_local,
                    retain_as_published: s.retain_as_published,
                    retain_handling: s.retain_handling,
                    identifier: s.identifier,
                })
                .collect(),
            cursors: session
                .chat
                .iter()
                .map(|(conv, c)| (conv.to_string(), c.acked))
                .collect(),
        }
    }

    /// Until when (unix ms) the session lives without its client: from
    /// its disconnection, or, written while connected, from the last
    /// write plus [`REFRESH`] (its node died with it connected).
    pub fn lives_until_ms(&self) -> u64 {
        let from = if self.disconnected_at_ms != 0 {
            self.disconnected_at_ms
        } else {
            self.written_ms.saturating_add(REFRESH.as_millis() as u64)
        };
        from.saturating_add(u64::from(self.expiry_secs).saturating_mul(1000))
    }

    /// The session still exists somewhere: it may be resumed, and its
    /// client id is its owner's. (A session that ends with its connection
    /// exists while it is connected.)
    pub fn live(&self, now_ms: u64) -> bool {
        now_ms < self.lives_until_ms()
    }

    /// Resumable by a CONNECT without Clean Start.
    pub fn resumable(&self, now_ms: u64) -> bool {
        self.expiry_secs > 0 && self.live(now_ms)
    }

    fn encode(&self) -> Bytes {
        Bytes::from(serde_json::to_vec(self).unwrap_or_default())
    }

    /// `None`: not a value (untrusted input).
    fn parse(b: &[u8]) -> Option<Roamed> {
        serde_json::from_slice(b).ok()
    }
}

/// Counters for `/metrics`.
#[derive(Default)]
pub struct RoamingMetrics {
    /// Sessions resumed here from another node's value.
    pub imported: AtomicU64,
    /// Sessions this node removed because their client went to another.
    pub moved_away: AtomicU64,
    /// Reads and writes of the bucket that failed (NATS away): the
    /// connection went on with this node's own view.
    pub failures: AtomicU64,
}

/// This node's end of the bucket (set once, with `[cluster]`).
pub struct Roaming {
    book: SessionBook,
    node: String,
    /// The revision of each client id's value that this node wrote last:
    /// what its next write expects. [`CLAIMING`] while a CONNECT is on
    /// its way to writing one.
    held: Mutex<HashMap<Arc<str>, u64>>,
    /// Client ids whose value is to be written (or deleted) next round.
    dirty: Mutex<HashSet<Arc<str>>>,
    wake: Notify,
    pub metrics: RoamingMetrics,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Roaming {
    /// This node's id.
    pub fn node(&self) -> &str {
        &self.node
    }

    /// A CONNECT for `client_id` begins: what the bucket says of it, if
    /// anything. Until [`Roaming::claimed`] or [`Roaming::abandoned`],
    /// other nodes' earlier values do not remove what this CONNECT
    /// attaches to. `None` also when NATS does not answer (counted): the
    /// connection goes on with this node's sessions alone.
    pub async fn fetch(&self, client_id: &Arc<str>) -> Option<Roamed> {
        let key = sessions::key(client_id)?;
        lock(&self.held).insert(client_id.clone(), CLAIMING);
        match self.book.get(&key).await {
            Ok(held) => held.and_then(|h| Roamed::parse(&h.value)),
            Err(e) => {
                self.metrics.failures.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(client = %client_id, error = %e, "cannot read the session's node; going on with this node's");
                None
            }
        }
    }

    /// The CONNECT was refused: nothing is claimed.
    pub fn abandoned(&self, client_id: &Arc<str>) {
        let mut held = lock(&self.held);
        if held.get(client_id) == Some(&CLAIMING) {
            held.remove(client_id);
        }
    }

    /// The client is attached here: the value says so (before CONNACK, so
    /// that the node it was attached to closes that connection now).
    pub async fn claimed(&self, cell: &Arc<SessionCell>, resumed: bool) {
        let Some(key) = sessions::key(&cell.client_id) else {
            return;
        };
        let value = Roamed::of(&cell.lock().session, &self.node, resumed).encode();
        match self.book.put(&key, value).await {
            Ok(revision) => {
                lock(&self.held).insert(cell.client_id.clone(), revision);
            }
            Err(e) => {
                self.metrics.failures.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(client = %cell.client_id, error = %e, "cannot record the session's node");
                // The next write reads the value back first.
                lock(&self.held).remove(&cell.client_id);
                self.changed(&cell.client_id);
            }
        }
    }

    /// The session of `client_id` changed (subscriptions, cursors saved,
    /// disconnected, ended): its value is written next round.
    pub fn changed(&self, client_id: &Arc<str>) {
        if sessions::key(client_id).is_none() {
            return;
        }
        lock(&self.dirty).insert(client_id.clone());
        self.wake.notify_one();
    }

    /// Writes one client id's value as its session is now, or deletes it
    /// when the session is gone. A value another node wrote since means
    /// the client went there: the session here is removed.
    async fn sync(&self, broker: &Arc<Broker>, client_id: &Arc<str>) {
        let Some(key) = sessions::key(client_id) else {
            return;
        };
        let held = lock(&self.held).get(client_id).copied();
        if held == Some(CLAIMING) {
            // A CONNECT is claiming it: its claim carries the state.
            return;
        }
        let value = broker.session(client_id).and_then(|cell| {
            let slot = cell.lock();
            let s = &slot.session;
            (s.persistent() || s.connected).then(|| Roamed::of(s, &self.node, false))
        });
        let revision = match held {
            Some(r) => r,
            None => match self.book.get(&key).await {
                Ok(Some(h)) => match Roamed::parse(&h.value) {
                    Some(r) if r.node != self.node => {
                        // Not ours (and never claimed here): leave it.
                        return;
                    }
                    _ => h.revision,
                },
                Ok(None) if value.is_none() => return,
                Ok(None) => 0,
                Err(e) => return self.retry(client_id, &e),
            },
        };
        let Some(value) = value else {
            lock(&self.held).remove(client_id);
            if revision != 0 {
                if let Err(e) = self.book.delete(&key, revision).await {
                    tracing::debug!(client = %client_id, error = %e, "deleting an ended session's value");
                }
            }
            return;
        };
        match self.book.update(&key, value.encode(), revision).await {
            Ok(r) => {
                let mut held = lock(&self.held);
                if held.get(client_id) != Some(&CLAIMING) {
                    held.insert(client_id.clone(), r);
                }
            }
            Err(Refused::Moved) => {
                lock(&self.held).remove(client_id);
                tracing::debug!(client = %client_id, "the session's value is another node's now");
            }
            Err(Refused::Failed(e)) => self.retry(client_id, &e),
        }
    }

    fn retry(&self, client_id: &Arc<str>, error: &str) {
        self.metrics.failures.fetch_add(1, Ordering::Relaxed);
        tracing::debug!(client = %client_id, error, "cannot write the session's value; again later");
        lock(&self.dirty).insert(client_id.clone());
    }

    /// One change the watch saw.
    fn seen(&self, broker: &Arc<Broker>, change: Change) {
        let Some(value) = change.value.as_deref().and_then(Roamed::parse) else {
            return;
        };
        let id: Arc<str> = change.client_id.into();
        let mut held = lock(&self.held);
        let mine = held.get(&id).copied();
        if value.node == self.node {
            // Ours (also our own value replayed after a restart): the next
            // write expects it, unless a newer claim is on its way.
            if mine.is_none_or(|r| r != CLAIMING && r < change.revision) {
                held.insert(id, change.revision);
            }
            return;
        }
        if mine.is_some_and(|r| r >= change.revision) {
            // Older than what this node claimed since (or is claiming).
            return;
        }
        held.remove(&id);
        drop(held);
        broker.moved_away(&id, value.resumed);
    }
}

/// Starts the bucket's writer and watcher (with `[cluster]`).
pub async fn start(
    broker: &Arc<Broker>,
    cluster: &chatmq_cluster::Cluster,
    node: &str,
    tasks: &mut JoinSet<()>,
    stop: &watch::Receiver<bool>,
) -> Result<(), String> {
    let book = SessionBook::open(cluster.jetstream(), cluster.layout()).await?;
    let roaming = Arc::new(Roaming {
        book,
        node: node.to_string(),
        held: Mutex::new(HashMap::new()),
        dirty: Mutex::new(HashSet::new()),
        wake: Notify::new(),
        metrics: RoamingMetrics::default(),
    });
    broker.attach_roaming(roaming.clone());
    tasks.spawn(write(broker.clone(), roaming.clone(), stop.clone()));
    tasks.spawn(follow(broker.clone(), roaming, stop.clone()));
    Ok(())
}

/// Writes what changed, gathered per round; every [`REFRESH`], the value
/// of every session this node holds again.
async fn write(broker: Arc<Broker>, roaming: Arc<Roaming>, mut stop: watch::Receiver<bool>) {
    let mut refresh = tokio::time::interval(REFRESH);
    refresh.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    refresh.tick().await;
    loop {
        tokio::select! {
            _ = stop.changed() => break,
            _ = roaming.wake.notified() => {}
            _ = refresh.tick() => {
                let ids: Vec<Arc<str>> = lock(&roaming.held).keys().cloned().collect();
                lock(&roaming.dirty).extend(ids);
            }
        }
        tokio::time::sleep(GATHER).await;
        let round: Vec<Arc<str>> = lock(&roaming.dirty).drain().collect();
        for id in &round {
            roaming.sync(&broker, id).await;
        }
        if !lock(&roaming.dirty).is_empty() {
            // Failed writes wait a little before the next try.
            tokio::select! {
                _ = stop.changed() => break,
                _ = tokio::time::sleep(Duration::from_millis(500)) => roaming.wake.notify_one(),
            }
        }
    }
    // What changed last (sessions of connections that just closed).
    let round: Vec<Arc<str>> = lock(&roaming.dirty).drain().collect();
    for id in &round {
        roaming.sync(&broker, id).await;
    }
}

/// Watches the bucket (every value first, so a restarted node learns
/// which of its sessions went elsewhere while it was down), again after a
/// failure.
async fn follow(broker: Arc<Broker>, roaming: Arc<Roaming>, mut stop: watch::Receiver<bool>) {
    loop {
        match roaming.book.watch().await {
            Ok(changes) => {
                let mut changes = std::pin::pin!(changes);
                loop {
                    tokio::select! {
                        _ = stop.changed() => return,
                        c = changes.next() => match c {
                            Some(Ok(change)) => roaming.seen(&broker, change),
                            Some(Err(e)) => {
                                tracing::warn!(error = %e, "sessions watch failed; watching again");
                                break;
                            }
                            None => break,
                        },
                    }
                }
            }
            Err(e) => tracing::warn!(error = %e, "cannot watch the sessions bucket; again soon"),
        }
        tokio::select! {
            _ = stop.changed() => return,
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn value(disconnected_at_ms: u64, written_ms: u64, expiry_secs: u32) -> Roamed {
        Roamed {
            node: "n1".into(),
            owner: Some("alice".into()),
            protocol: 5,
            expiry_secs,
            disconnected_at_ms,
            written_ms,
            resumed: false,
            subscriptions: vec![],
            cursors: vec![("c1".into(), 7)],
        }
    }

    #[test]
    fn a_value_lives_for_its_expiry_after_disconnecting() {
        let v = value(10_000, 10_000, 60);
        assert!(v.resumable(69_999));
        assert!(!v.resumable(70_000));
        assert!(
            !value(10_000, 10_000, 0).resumable(10_001),
            "ends with its connection"
        );
    }

    #[test]
    fn a_value_written_while_connected_lives_past_its_refresh() {
        let v = value(0, 10_000, 60);
        let refresh = REFRESH.as_millis() as u64;
        assert!(v.resumable(10_000 + refresh + 59_999));
        assert!(!v.resumable(10_000 + refresh + 60_000));
        // A session that ends with its connection holds its id meanwhile.
        let v = value(0, 10_000, 0);
        assert!(v.live(10_000 + refresh - 1) && !v.resumable(10_001));
    }

    #[test]
    fn values_round_trip_and_foreign_bytes_are_refused() {
        let v = value(1, 2, 3);
        assert_eq!(Roamed::parse(&v.encode()), Some(v));
        assert_eq!(Roamed::parse(b"{\"node\":1}"), None);
        assert_eq!(Roamed::parse(b"\xff"), None);
    }
}
