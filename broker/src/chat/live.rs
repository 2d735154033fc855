//! Presence, typing and room reactions across the nodes of a cluster
//! (issue #12 item 6), the broker's half (the wire: `chatmq_cluster::live`).
//!
//! - **Presence is online while any session on any node is.** Each node
//!   tells the others when a user's first session there connects and its
//!   last one leaves, and keeps, per other node, the users online there.
//!   A user's presence (`presence/{user}`, what `presence_for`, occupancy
//!   and push judge by) is online when it is online here or on any other
//!   node; a change is told to this node's watchers when that flips, with
//!   the same window as a local change.
//! - **A node's view of another is rebuilt, never trusted for ever.**
//!   Every node beats every [`BEAT`]; one not heard for [`NODE_GONE`] is
//!   taken as gone with all its users (a killed node's users go offline
//!   within that bound). A node that starts asks the others for their
//!   users (`Sync`), and the others forget what they knew of it; one that
//!   hears a node it has no view of asks too.
//! - **Typing and room reactions** go to the members online on the other
//!   nodes as well, but the session that sent them, exactly as here.
//! - At most once, as the local deliveries they stand for: both queues are
//!   bounded, and what does not fit, or does not parse, is counted
//!   (`chatmq_cluster_live_dropped_total`).

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use chatmq_cluster::live::{self, Live, Sent, ONLINE_CHUNK};
use rumqttc::v5::mqttbytes::QoS;
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;

use super::{lock, Chat};
use crate::message::Message;

/// How often a node says it is alive.
pub const BEAT: Duration = Duration::from_secs(2);
/// A node not heard for this long is gone, with its users.
pub const NODE_GONE: Duration = Duration::from_secs(10);
/// Records waiting to be sent, and received ones waiting to be applied.
const QUEUE: usize = 8192;
/// The most other nodes a node keeps a view of.
const MAX_NODES: usize = 1024;
/// The longest user id a record may name.
const MAX_USER: usize = 256;
/// A sync is asked for, and answered, at most this often.
const SYNC_EVERY: Duration = Duration::from_secs(1);

/// This node's end of the live link (set once, with `[cluster]`).
pub struct LiveLink {
    out: mpsc::Sender<Live>,
    remote: Mutex<Remote>,
    /// Records not sent or not applied: a queue full, a record that did
    /// not parse.
    pub dropped: Arc<AtomicU64>,
}

/// What this node knows of the users online on the others.
#[derive(Default)]
struct Remote {
    nodes: HashMap<String, View>,
    /// How many other nodes each user is online on.
    users: HashMap<Arc<str>, usize>,
}

struct View {
    users: HashSet<Arc<str>>,
    heard: Instant,
}

impl Remote {
    /// Marks `user` online (or not) on `node`; whether it is online on
    /// some other node before and after.
    fn set(&mut self, node: &str, user: &Arc<str>, online: bool) -> (bool, bool) {
        let before = self.users.contains_key(user);
        let Some(view) = self.view(node) else {
            return (before, before);
        };
        let changed = if online {
            view.users.insert(user.clone())
        } else {
            view.users.remove(user)
        };
        if changed {
            if online {
                *self.users.entry(user.clone()).or_default() += 1;
            } else if let Some(n) = self.users.get_mut(user) {
                *n = n.saturating_sub(1);
                if *n == 0 {
                    self.users.remove(user);
                }
            }
        }
        (before, self.users.contains_key(user))
    }

    /// The view of `node`, heard now (`None`: too many nodes).
    fn view(&mut self, node: &str) -> Option<&mut View> {
        if !self.nodes.contains_key(node) && self.nodes.len() >= MAX_NODES {
            return None;
        }
        let view = self.nodes.entry(node.to_string()).or_insert_with(|| View {
            users: HashSet::new(),
            heard: Instant::now(),
        });
        view.heard = Instant::now();
        Some(view)
    }

    /// Forgets `node`; the users online nowhere else now.
    fn forget(&mut self, node: &str) -> Vec<Arc<str>> {
        let Some(view) = self.nodes.remove(node) else {
            return Vec::new();
        };
        let mut gone = Vec::new();
        for user in view.users {
            if let Some(n) = self.users.get_mut(&user) {
                *n = n.saturating_sub(1);
                if *n == 0 {
                    self.users.remove(&user);
                    gone.push(user);
                }
            }
        }
        gone
    }
}

impl Chat {
    /// With `[cluster]`: presence, typing and room reactions reach the
    /// other nodes through `link`.
    pub fn attach_live(&self, link: Arc<LiveLink>) {
        let _ = self.live.set(link);
    }

    pub fn live_link(&self) -> Option<&Arc<LiveLink>> {
        self.live.get()
    }

    /// Tells the other nodes (nothing without `[cluster]`).
    pub(super) fn live_send(&self, live: Live) {
        if let Some(link) = self.live.get() {
            if link.out.try_send(live).is_err() {
                link.dropped.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// Is `user` online on another node?
    pub(super) fn online_elsewhere(&self, user: &str) -> bool {
        self.live
            .get()
            .is_some_and(|l| lock(&l.remote).users.contains_key(user))
    }

    fn online_here(&self, user: &str) -> bool {
        lock(&self.online).contains_key(user)
    }

    /// `user`'s presence on the other nodes flipped (`online`): told here
    /// unless a session here decides it anyway.
    fn remote_flipped(&self, user: &Arc<str>, online: bool) {
        if self.online_here(user) {
            return;
        }
        self.set_presence(user, online);
        self.occupancy_of_user_changed(user);
    }

    /// One record from `node`.
    fn apply_live(&self, link: &LiveLink, node: &str, live: Live) {
        match live {
            Live::Conv {
                conv,
                topic,
                body,
                except,
            } => {
                let allowed = topic.strip_prefix("typing/") == Some(conv.as_str())
                    || topic.strip_prefix("reactions/") == Some(conv.as_str());
                if !allowed || body.len() > self.typing_max_bytes.max(1024) + 512 {
                    link.dropped.fetch_add(1, Ordering::Relaxed);
                    return;
                }
                let msg = Arc::new(Message::from_server(
                    topic,
                    Bytes::from(body),
                    QoS::AtMostOnce,
                    false,
                ));
                self.deliver(&self.members(&conv), &msg, Some(&except));
            }
            Live::Presence { user, online } => {
                if user.is_empty() || user.len() > MAX_USER {
                    link.dropped.fetch_add(1, Ordering::Relaxed);
                    return;
                }
                let user: Arc<str> = user.into();
                let (before, after) = lock(&link.remote).set(node, &user, online);
                if before != after {
                    self.remote_flipped(&user, after);
                }
            }
            Live::Online { users } => {
                for user in users {
                    if user.is_empty() || user.len() > MAX_USER {
                        continue;
                    }
                    let user: Arc<str> = user.into();
                    let (before, after) = lock(&link.remote).set(node, &user, true);
                    if before != after {
                        self.remote_flipped(&user, after);
                    }
                }
            }
            Live::Beat { .. } | Live::Sync => {}
        }
    }

    /// Forgets what `node` had online; those online nowhere now go offline.
    fn forget_node(&self, link: &LiveLink, node: &str) {
        let gone = lock(&link.remote).forget(node);
        for user in gone {
            self.remote_flipped(&user, false);
        }
    }

    /// The users online here, for a sync.
    fn online_users(&self) -> Vec<String> {
        lock(&self.online).keys().map(|u| u.to_string()).collect()
    }
}

/// Starts the link (with `[cluster]`): subscribes, then runs until `stop`.
pub async fn start(
    chat: Arc<Chat>,
    channel: live::Channel,
    stop: watch::Receiver<bool>,
) -> Result<tokio::task::JoinHandle<()>, String> {
    let dropped = Arc::new(AtomicU64::new(0));
    let inbound = channel.subscribe(QUEUE, dropped.clone()).await?;
    let (out, out_rx) = mpsc::channel(QUEUE);
    let link = Arc::new(LiveLink {
        out,
        remote: Mutex::new(Remote::default()),
        dropped,
    });
    chat.attach_live(link.clone());
    Ok(tokio::spawn(run(
        chat, link, channel, inbound, out_rx, stop,
    )))
}

async fn run(
    chat: Arc<Chat>,
    link: Arc<LiveLink>,
    channel: live::Channel,
    mut inbound: mpsc::Receiver<Sent>,
    mut out: mpsc::Receiver<Live>,
    mut stop: watch::Receiver<bool>,
) {
    // Just started: nobody here yet; the others say who is on them.
    channel.send(Live::Sync).await;
    let mut beat = tokio::time::interval(BEAT);
    beat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut asked: Option<Instant> = None;
    let mut answered: Option<Instant> = None;
    let recent = |at: &Option<Instant>| at.is_some_and(|t| t.elapsed() < SYNC_EVERY);
    loop {
        tokio::select! {
            _ = stop.changed() => break,
            Some(live) = out.recv() => channel.send(live).await,
            Some(sent) = inbound.recv() => {
                let known = lock(&link.remote).nodes.contains_key(&sent.node);
                match &sent.live {
                    Live::Sync => {
                        // It started again: what it had is gone.
                        chat.forget_node(&link, &sent.node);
                        let _ = lock(&link.remote).view(&sent.node);
                        if !recent(&answered) {
                            answered = Some(Instant::now());
                            for users in chat.online_users().chunks(ONLINE_CHUNK) {
                                channel.send(Live::Online { users: users.to_vec() }).await;
                            }
                        }
                        continue;
                    }
                    Live::Beat { .. } if !known && !recent(&asked) => {
                        // A node this one has no view of (it came back, or
                        // this one started after it): ask who is on it.
                        asked = Some(Instant::now());
                        channel.send(Live::Sync).await;
                    }
                    _ => {}
                }
                let _ = lock(&link.remote).view(&sent.node);
                chat.apply_live(&link, &sent.node, sent.live);
            }
            _ = beat.tick() => {
                let online = lock(&chat.online).len();
                channel.send(Live::Beat { online }).await;
                let silent: Vec<String> = lock(&link.remote)
                    .nodes
                    .iter()
                    .filter(|(_, v)| v.heard.elapsed() >= NODE_GONE)
                    .map(|(n, _)| n.clone())
                    .collect();
                for n in silent {
                    tracing::info!(node = %n, "no word from a node: its users are offline here");
                    chat.forget_node(&link, &n);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_user_is_online_elsewhere_while_any_other_node_has_it() {
        let mut r = Remote::default();
        let alice: Arc<str> = "alice".into();
        assert_eq!(r.set("n2", &alice, true), (false, true));
        assert_eq!(r.set("n3", &alice, true), (true, true));
        assert_eq!(r.set("n3", &alice, true), (true, true), "idempotent");
        assert_eq!(r.set("n2", &alice, false), (true, true), "still on n3");
        assert_eq!(r.forget("n3"), vec![alice.clone()], "offline everywhere");
        assert!(!r.users.contains_key("alice"));
        assert_eq!(r.set("n2", &alice, false), (false, false), "not there");
    }
}
