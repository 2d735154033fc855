//! Plain MQTT between the nodes of a cluster (issue #12 item 5): what a
//! client publishes on one node reaches the subscribers on the others.
//!
//! Over core NATS, with the interest routing NATS does itself (EMQX's
//! routes, without a route table of our own): each MQTT topic has a NATS
//! subject under `{prefix}.mqtt`, one token per topic level; a node
//! subscribes to the subjects of the filters its sessions hold (`+` is
//! `*`, a trailing `#` is `>` plus its parent level), so NATS sends a
//! node only the topics it has subscribers for, and a publish nobody
//! subscribed to anywhere costs one message to the nearest server.
//!
//! The broker gives this module opaque bodies (an encoded message) and
//! gets them back; it never sees MQTT packets or RocksDB. Every message
//! carries the node it came from, so a node skips its own publishes
//! (NATS echoes them to its own subscriptions) and nothing is forwarded
//! twice. What the hop guarantees is core NATS': at most once between
//! nodes (docs/CLUSTER.md says why and what that means for QoS 1/2).
//!
//! Shared subscriptions (`$share/{group}/{filter}`) span the nodes as
//! NATS queue groups: each node with members of a group subscribes to
//! the filter's subjects in a queue named after the group and filter, so
//! NATS gives each message to one of those nodes, which gives it to one
//! of its members. The publishing node is one of them like any other: it
//! hears its own message back on a queue subscription (and only there),
//! so a group gets each message once whichever node it was published on.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use async_nats::{Client, HeaderMap};
use bytes::Bytes;
use futures_util::StreamExt;
use sha2::{Digest, Sha256};
use tokio::sync::{mpsc, Notify};

/// The header naming the node a message was published on.
pub const ORIGIN: &str = "Chatmq-Origin";
/// The header naming the publishing client (for No Local on the others).
pub const PUBLISHER: &str = "Chatmq-Publisher";

/// The longest subject sent: NATS refuses a control line over 4 KiB
/// (`max_control_line`), and the headers travel beside it.
const MAX_SUBJECT: usize = 3072;

/// The subjects of plain MQTT topics and filters.
#[derive(Debug, Clone)]
pub struct Subjects {
    root: String,
}

impl Subjects {
    pub fn new(prefix: &str) -> Subjects {
        Subjects {
            root: format!("{prefix}.mqtt"),
        }
    }

    /// Subjects under another root (the retained stream's).
    pub fn under(root: &str) -> Subjects {
        Subjects {
            root: root.to_string(),
        }
    }

    /// The subject of a topic name; `None` for topics that stay on their
    /// node (`$SYS` and other `$` topics, which wildcards never match
    /// [MQTT-4.7.2-1]) and for those too long for a subject.
    pub fn topic(&self, topic: &str) -> Option<String> {
        if topic.starts_with('$') {
            return None;
        }
        let mut subject = self.root.clone();
        for level in topic.split('/') {
            subject.push('.');
            push_level(&mut subject, level);
        }
        (subject.len() <= MAX_SUBJECT).then_some(subject)
    }

    /// The subjects that together match what `filter` matches, for a
    /// filter already validated: `a/+/c` is `a.*.c`; `a/#` is `a.>` and
    /// `a` (MQTT's `#` includes the parent level, NATS's `>` does not);
    /// `#` is `>`. `None` for filters that stay on their node: shared
    /// subscriptions (`$share/...`), filters of `$` topics, and those
    /// too long.
    pub fn filter(&self, filter: &str) -> Option<Vec<String>> {
        if filter.starts_with('$') {
            return None;
        }
        let mut subject = self.root.clone();
        let mut levels = filter.split('/').peekable();
        while let Some(level) = levels.next() {
            if level == "#" && levels.peek().is_none() {
                let parent = (subject.len() > self.root.len()).then(|| subject.clone());
                subject.push_str(".>");
                let mut all = vec![subject];
                all.extend(parent);
                return all.iter().all(|s| s.len() <= MAX_SUBJECT).then_some(all);
            }
            subject.push('.');
            if level == "+" {
                subject.push('*');
            } else {
                push_level(&mut subject, level);
            }
        }
        (subject.len() <= MAX_SUBJECT).then(|| vec![subject])
    }
}

/// One topic level as one NATS token. A level of letters, digits, `-` and
/// `_` is itself; any other (dots, spaces, `*`, `>`, non-ASCII, empty) is
/// `~` and the hex of its bytes. No plain level starts with `~`, so two
/// levels share a token only if they are equal, and a filter's literal
/// level becomes the same token as the topic level it names.
fn push_level(subject: &mut String, level: &str) {
    let plain = !level.is_empty()
        && level
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    if plain {
        subject.push_str(level);
        return;
    }
    subject.push('~');
    for b in level.bytes() {
        subject.push(char::from(HEX[usize::from(b >> 4)]));
        subject.push(char::from(HEX[usize::from(b & 0xf)]));
    }
}

const HEX: &[u8; 16] = b"0123456789abcdef";

/// A shared group as its subscriptions name it: `$share/{group}/{filter}`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Share {
    pub group: String,
    pub filter: String,
}

impl Share {
    /// The NATS queue group of this share group: the same on every node,
    /// and different for every (group, filter) pair, since NATS merges
    /// the queue subscriptions of one name that match a subject, whatever
    /// their subjects (`$share/g/a/+` and `$share/g/a/b` are two MQTT
    /// groups). A digest, so its length is bounded whatever the filter's.
    fn queue(&self) -> String {
        let mut digest = Sha256::new();
        digest.update(self.group.as_bytes());
        digest.update([0]);
        digest.update(self.filter.as_bytes());
        let mut name = String::from("share-");
        for b in digest.finalize().iter().take(16) {
            name.push(char::from(HEX[usize::from(b >> 4)]));
            name.push(char::from(HEX[usize::from(b & 0xf)]));
        }
        name
    }
}

/// A message another node's client published (or, for a shared group,
/// any node's, this one's included).
#[derive(Debug)]
pub struct Arrived {
    /// The publishing client on that node, if it said.
    pub publisher: Option<String>,
    /// What the broker encoded.
    pub body: Bytes,
    /// `Some`: NATS chose this node for this shared group, and the
    /// message goes to one of its members here and to nobody else. `None`:
    /// to this node's plain subscribers, and no shared group.
    pub share: Option<Arc<Share>>,
}

/// Counts for `/metrics`.
#[derive(Debug, Default)]
pub struct LinkMetrics {
    /// Messages published to the other nodes.
    pub sent: AtomicU64,
    /// Messages from other nodes handed to the broker.
    pub received: AtomicU64,
    /// Messages lost on the way: the inbound queue full, a publish NATS
    /// refused, a topic too long for a subject.
    pub dropped: AtomicU64,
    /// NATS subscriptions held for this node's filters.
    pub subjects: AtomicU64,
}

/// The filters this node's sessions hold, counted, and the subjects they
/// need; the shared groups it has members of, counted: what the
/// reconciler subscribes to.
#[derive(Default)]
struct Interest {
    filters: HashMap<String, usize>,
    subjects: HashMap<String, usize>,
    shares: HashMap<Arc<Share>, usize>,
}

/// One NATS subscription the reconciler holds: a subject, and the shared
/// group it is the queue subscription of (`None`: a plain one).
type Held = (String, Option<Arc<Share>>);

/// This node's link for plain MQTT: publishing, and the subscriptions
/// its sessions' filters need. Cheap to share.
pub struct Links {
    client: Client,
    subjects: Subjects,
    node: String,
    interest: Mutex<Interest>,
    changed: Notify,
    pub metrics: LinkMetrics,
}

impl Links {
    pub fn new(client: Client, prefix: &str, node: &str) -> Arc<Links> {
        Arc::new(Links {
            client,
            subjects: Subjects::new(prefix),
            node: node.to_string(),
            interest: Mutex::new(Interest::default()),
            changed: Notify::new(),
            metrics: LinkMetrics::default(),
        })
    }

    pub fn subjects(&self) -> &Subjects {
        &self.subjects
    }

    /// One more session holds `filter` (synchronous: called under the
    /// broker's router lock; the subscribing is done by [`Links::run`]).
    pub fn add_filter(&self, filter: &str) {
        let Some(needed) = self.subjects.filter(filter) else {
            return;
        };
        let mut interest = lock(&self.interest);
        let count = interest.filters.entry(filter.to_string()).or_insert(0);
        *count = count.saturating_add(1);
        if *count > 1 {
            return;
        }
        for s in needed {
            let n = interest.subjects.entry(s).or_insert(0);
            *n = n.saturating_add(1);
        }
        drop(interest);
        self.changed.notify_one();
    }

    /// One session fewer holds `filter`.
    pub fn remove_filter(&self, filter: &str) {
        let Some(needed) = self.subjects.filter(filter) else {
            return;
        };
        let mut interest = lock(&self.interest);
        let Some(count) = interest.filters.get_mut(filter) else {
            return;
        };
        *count = count.saturating_sub(1);
        if *count > 0 {
            return;
        }
        interest.filters.remove(filter);
        for s in needed {
            if let Some(n) = interest.subjects.get_mut(&s) {
                *n = n.saturating_sub(1);
                if *n == 0 {
                    interest.subjects.remove(&s);
                }
            }
        }
        drop(interest);
        self.changed.notify_one();
    }

    /// One more member on this node of the shared group `group` of
    /// `filter` (the filter inside `$share/{group}/`, already validated).
    pub fn add_share(&self, group: &str, filter: &str) {
        if self.subjects.filter(filter).is_none() {
            return;
        }
        let share = Arc::new(Share {
            group: group.to_string(),
            filter: filter.to_string(),
        });
        let mut interest = lock(&self.interest);
        let count = interest.shares.entry(share).or_insert(0);
        *count = count.saturating_add(1);
        let first = *count == 1;
        drop(interest);
        if first {
            self.changed.notify_one();
        }
    }

    /// One member fewer on this node of that shared group.
    pub fn remove_share(&self, group: &str, filter: &str) {
        let share = Share {
            group: group.to_string(),
            filter: filter.to_string(),
        };
        let mut interest = lock(&self.interest);
        let Some(count) = interest.shares.get_mut(&share) else {
            return;
        };
        *count = count.saturating_sub(1);
        if *count > 0 {
            return;
        }
        interest.shares.remove(&share);
        drop(interest);
        self.changed.notify_one();
    }

    /// What the reconciler should hold: the plain subjects, and each
    /// shared group's subjects in its queue.
    fn wanted(&self) -> Vec<Held> {
        let interest = lock(&self.interest);
        let mut wanted: Vec<Held> = interest
            .subjects
            .keys()
            .map(|s| (s.clone(), None))
            .collect();
        for share in interest.shares.keys() {
            for subject in self.subjects.filter(&share.filter).unwrap_or_default() {
                wanted.push((subject, Some(share.clone())));
            }
        }
        wanted
    }

    /// Publishes a message on `subject` (of [`Subjects::topic`]) to the
    /// other nodes, and to the shared groups of all, this one's included.
    /// A publish NATS does not take is counted.
    pub async fn publish(&self, subject: String, publisher: Option<&str>, body: Bytes) {
        let mut headers = HeaderMap::new();
        headers.insert(ORIGIN, self.node.as_str());
        if let Some(p) = publisher {
            headers.insert(PUBLISHER, p);
        }
        match self
            .client
            .publish_with_headers(subject, headers, body)
            .await
        {
            Ok(()) => {
                self.metrics.sent.fetch_add(1, Ordering::Relaxed);
            }
            Err(e) => {
                self.metrics.dropped.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(error = %e, "cluster: a publish to the other nodes failed");
            }
        }
    }

    /// Keeps the NATS subscriptions equal to what the filters need, and
    /// hands every message another node published on them to `inbound`
    /// (bounded: a full queue drops, counted). Runs until `stop`.
    pub async fn run(
        self: Arc<Self>,
        inbound: mpsc::Sender<Arrived>,
        mut stop: tokio::sync::watch::Receiver<bool>,
    ) {
        let mut held: HashMap<Held, tokio::task::JoinHandle<()>> = HashMap::new();
        loop {
            let wanted = self.wanted();
            held.retain(|key, task| {
                let keep = wanted.contains(key);
                if !keep {
                    // Dropping the subscriber (with its task) unsubscribes.
                    task.abort();
                }
                keep
            });
            for key in wanted {
                if held.contains_key(&key) {
                    continue;
                }
                let (subject, share) = &key;
                let subscribed = match share {
                    None => self.client.subscribe(subject.clone()).await,
                    Some(share) => {
                        self.client
                            .queue_subscribe(subject.clone(), share.queue())
                            .await
                    }
                };
                match subscribed {
                    Ok(subscriber) => {
                        let links = self.clone();
                        let inbound = inbound.clone();
                        let task = tokio::spawn(links.forward(subscriber, inbound, share.clone()));
                        held.insert(key, task);
                    }
                    Err(e) => {
                        tracing::warn!(subject, error = %e, "cluster: cannot subscribe");
                    }
                }
            }
            self.metrics
                .subjects
                .store(held.len() as u64, Ordering::Relaxed);
            tokio::select! {
                _ = self.changed.notified() => {}
                _ = stop.changed() => break,
            }
        }
        for (_, task) in held {
            task.abort();
        }
    }

    /// Hands what arrives on one subscription to the broker: on a plain
    /// one, what other nodes published; on a shared group's, what any
    /// node did (NATS chose this node for it).
    async fn forward(
        self: Arc<Self>,
        mut subscriber: async_nats::Subscriber,
        inbound: mpsc::Sender<Arrived>,
        share: Option<Arc<Share>>,
    ) {
        while let Some(m) = subscriber.next().await {
            let header = |name: &str| {
                m.headers
                    .as_ref()
                    .and_then(|h| h.get(name))
                    .map(|v| v.as_str().to_string())
            };
            let Some(origin) = header(ORIGIN) else {
                continue;
            };
            if origin == self.node && share.is_none() {
                continue;
            }
            let arrived = Arrived {
                publisher: header(PUBLISHER),
                body: m.payload,
                share: share.clone(),
            };
            if inbound.try_send(arrived).is_ok() {
                self.metrics.received.fetch_add(1, Ordering::Relaxed);
            } else {
                self.metrics.dropped.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// NATS's subject matching, for the tests: `*` one token, `>` one or
    /// more at the end.
    fn nats_matches(pattern: &str, subject: &str) -> bool {
        let (p, s): (Vec<&str>, Vec<&str>) =
            (pattern.split('.').collect(), subject.split('.').collect());
        for (i, token) in p.iter().enumerate() {
            match *token {
                ">" => return s.len() > i,
                "*" if i < s.len() => {}
                t if s.get(i) == Some(&t) => {}
                _ => return false,
            }
        }
        p.len() == s.len()
    }

    /// MQTT's topic matching [MQTT-4.7], for topics not starting with `$`.
    fn mqtt_matches(filter: &str, topic: &str) -> bool {
        let (f, t): (Vec<&str>, Vec<&str>) =
            (filter.split('/').collect(), topic.split('/').collect());
        for (i, level) in f.iter().enumerate() {
            match *level {
                "#" => return true,
                "+" if i < t.len() => {}
                l if t.get(i) == Some(&l) => {}
                _ => return false,
            }
        }
        f.len() == t.len()
    }

    #[test]
    fn a_filter_matches_on_nats_exactly_what_it_matches_in_mqtt() {
        let s = Subjects::new("chatmq");
        let topics = [
            "a", "a/b", "a/b/c", "a/c", "b", "a/", "/a", "a//c", "a.b", "a b/c", "*/>", "~7e",
            "sensé/1", "a/b/c/d", "", "/",
        ];
        let filters = [
            "#", "a", "a/#", "a/+", "a/+/c", "+", "+/#", "+/+", "a/b/#", "a.b", "*/>", "/#", "+/",
            "a//c", "~7e", "sensé/+",
        ];
        for f in filters {
            let subjects = s.filter(f).expect("a subject");
            for t in topics {
                let subject = s.topic(t).expect("a subject");
                let nats = subjects.iter().any(|p| nats_matches(p, &subject));
                assert_eq!(
                    nats,
                    mqtt_matches(f, t),
                    "filter {f:?} topic {t:?}: {subjects:?} vs {subject}"
                );
            }
        }
    }

    #[test]
    fn what_stays_on_its_node() {
        let s = Subjects::new("chatmq");
        assert_eq!(s.topic("$SYS/broker/load"), None);
        assert_eq!(s.filter("$share/g/jobs/+"), None);
        assert_eq!(s.filter("$SYS/#"), None);
        assert_eq!(s.topic(&"x/".repeat(2000)), None, "too long for a subject");
        assert_eq!(s.topic("a/b"), Some("chatmq.mqtt.a.b".into()));
        assert_eq!(s.topic("a.b"), Some("chatmq.mqtt.~612e62".into()));
    }

    #[test]
    fn each_shared_group_of_each_filter_has_its_own_bounded_queue() {
        let share = |group: &str, filter: &str| Share {
            group: group.into(),
            filter: filter.into(),
        };
        let q = share("g", "a/+").queue();
        assert_eq!(q, share("g", "a/+").queue(), "the same on every node");
        assert_ne!(q, share("g", "a/b").queue(), "another filter");
        assert_ne!(q, share("h", "a/+").queue(), "another group");
        assert_ne!(share("ga", "/b").queue(), share("g", "a/b").queue());
        let long = share("g", &"x/".repeat(30_000)).queue();
        assert_eq!(long.len(), q.len(), "bounded whatever the filter");
        assert!(q.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-'));
    }
}
