//! The retained messages: the last retained message of each topic
//! [MQTT-3.3.1-5], what a new subscription is sent first [MQTT-3.3.1-9].
//!
//! Owns the in-memory copy and its caps (`mqtt.max_retained_messages`,
//! `mqtt.max_retained_bytes`); the caller mirrors every change into the
//! `retained` column family through its batch. Topics are kept in order, so
//! a filter's literal prefix narrows the lookup to its own subtree instead
//! of the whole store. It never decides who may receive what.

use std::collections::BTreeMap;
use std::ops::Bound;
use std::sync::Arc;

use crate::message::Message;
use crate::topic;

/// What [`RetainedStore::update`] did with a retained publish.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Change {
    /// Kept as the topic's retained message (new or replacing).
    Kept,
    /// An empty payload removed the topic's retained message.
    Cleared,
    /// An empty payload on a topic with nothing retained.
    Nothing,
    /// Over the caps: not retained (it is still routed).
    Refused,
}

pub struct RetainedStore {
    by_topic: BTreeMap<String, Arc<Message>>,
    /// The sum of [`cost`] over `by_topic`.
    bytes: usize,
    max_messages: usize,
    max_bytes: usize,
}

/// What one retained message counts against `mqtt.max_retained_bytes`:
/// everything a client chose the size of.
fn cost(m: &Message) -> usize {
    let p = &m.props;
    let user: usize = p
        .user_properties
        .iter()
        .map(|(k, v)| k.len() + v.len())
        .sum();
    m.topic.len()
        + m.payload.len()
        + p.content_type.as_ref().map_or(0, String::len)
        + p.response_topic.as_ref().map_or(0, String::len)
        + p.correlation_data.as_ref().map_or(0, Vec::len)
        + user
}

impl RetainedStore {
    pub fn new(max_messages: usize, max_bytes: usize) -> RetainedStore {
        RetainedStore {
            by_topic: BTreeMap::new(),
            bytes: 0,
            max_messages,
            max_bytes,
        }
    }

    /// Retained messages held.
    pub fn len(&self) -> usize {
        self.by_topic.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_topic.is_empty()
    }

    /// Bytes held, as counted against `mqtt.max_retained_bytes`.
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// Would retaining `m` on its topic stay within the caps? Replacing a
    /// topic's message does not add to the count; clearing always fits.
    pub fn fits(&self, m: &Message) -> bool {
        if m.payload.is_empty() {
            return true;
        }
        let old = self.by_topic.get(&m.topic);
        let count = self.by_topic.len() + usize::from(old.is_none());
        let freed = old.map_or(0, |o| cost(o));
        let bytes = self.bytes.saturating_sub(freed).saturating_add(cost(m));
        count <= self.max_messages && bytes <= self.max_bytes
    }

    /// Applies a retained publish: an empty payload clears the topic
    /// [MQTT-3.3.1-10], anything else replaces it if it fits.
    pub fn update(&mut self, m: Arc<Message>) -> Change {
        if m.payload.is_empty() {
            return match self.by_topic.remove(&m.topic) {
                Some(old) => {
                    self.bytes = self.bytes.saturating_sub(cost(&old));
                    Change::Cleared
                }
                None => Change::Nothing,
            };
        }
        if !self.fits(&m) {
            return Change::Refused;
        }
        self.restore(m);
        Change::Kept
    }

    /// Puts back a message retained before a restart. The caps held when
    /// it was accepted; if they were lowered since, new retained publishes
    /// are refused until the store is back under them.
    pub fn restore(&mut self, m: Arc<Message>) {
        self.bytes = self.bytes.saturating_add(cost(&m));
        if let Some(old) = self.by_topic.insert(m.topic.clone(), m) {
            self.bytes = self.bytes.saturating_sub(cost(&old));
        }
    }

    /// The unexpired retained messages `filter` matches, at most `limit` of
    /// them, and how many more matched beyond it. A filter without
    /// wildcards is one lookup; otherwise only topics starting with the
    /// filter's literal levels are looked at.
    pub fn matching(&self, filter: &str, now_ms: u64, limit: usize) -> (Vec<Arc<Message>>, usize) {
        let mut found = Vec::new();
        let mut beyond = 0;
        let mut take = |m: &Arc<Message>| {
            if m.is_expired(now_ms) {
                return;
            }
            if found.len() < limit {
                found.push(m.clone());
            } else {
                beyond += 1;
            }
        };
        let literal = literal_prefix(filter);
        if literal.len() == filter.len() {
            if let Some(m) = self.by_topic.get(filter) {
                take(m);
            }
        } else {
            let range: (Bound<&str>, Bound<&str>) = (Bound::Included(literal), Bound::Unbounded);
            for (t, m) in self.by_topic.range::<str, _>(range) {
                if !t.starts_with(literal) {
                    break;
                }
                if topic::matches(filter, t) {
                    take(m);
                }
            }
        }
        (found, beyond)
    }
}

/// The part of `filter` before its first wildcard level: every topic it
/// matches starts with it (`a/b/+` -> `a/b/`, `a/#` -> `a/`, which also
/// covers the parent `a` that `#` matches, `#` -> ``).
fn literal_prefix(filter: &str) -> &str {
    let mut end = 0;
    for level in filter.split('/') {
        if level == "#" && end > 0 {
            // `a/#` matches `a` itself [MQTT-4.7.1-2]: stop short of the
            // separator so `a` is in range.
            return &filter[..end - 1];
        }
        if level == "+" || level == "#" {
            return &filter[..end];
        }
        end += level.len() + 1;
    }
    filter
}

#[cfg(test)]
mod tests {
    use super::*;
    use rumqttc::v5::mqttbytes::QoS;

    fn retained(topic: &str, payload: &str) -> Arc<Message> {
        Arc::new(Message::from_server(
            topic.into(),
            payload.as_bytes().to_vec(),
            QoS::AtLeastOnce,
            true,
        ))
    }

    fn topics(found: &[Arc<Message>]) -> Vec<&str> {
        let mut t: Vec<&str> = found.iter().map(|m| m.topic.as_str()).collect();
        t.sort();
        t
    }

    #[test]
    fn filters_find_their_topics_through_the_literal_prefix() {
        let mut s = RetainedStore::new(100, 10_000);
        for t in ["a", "a/b", "a/b/c", "a/c", "ab", "b/b", "$SYS/x"] {
            assert_eq!(s.update(retained(t, "x")), Change::Kept);
        }
        let all = |f: &str| topics(&s.matching(f, 0, usize::MAX).0).join(" ");
        assert_eq!(all("a/#"), "a a/b a/b/c a/c");
        assert_eq!(all("a/+"), "a/b a/c");
        assert_eq!(all("a/b"), "a/b");
        assert_eq!(all("+/b"), "a/b b/b");
        assert_eq!(all("#"), "a a/b a/b/c a/c ab b/b");
        assert_eq!(all("$SYS/#"), "$SYS/x");
        assert_eq!(all("nothing/+"), "");
        assert_eq!(literal_prefix("a/b/+"), "a/b/");
        assert_eq!(literal_prefix("a/#"), "a");
        assert_eq!(literal_prefix("#"), "");
    }

    #[test]
    fn a_limit_counts_what_it_leaves_out() {
        let mut s = RetainedStore::new(100, 10_000);
        for i in 0..10 {
            s.update(retained(&format!("t/{i}"), "x"));
        }
        let (found, beyond) = s.matching("t/+", 0, 4);
        assert_eq!((found.len(), beyond), (4, 6));
    }

    #[test]
    fn caps_hold_for_count_and_bytes_but_replacing_and_clearing_fit() {
        let mut s = RetainedStore::new(2, 12);
        assert_eq!(s.update(retained("a", "12345")), Change::Kept);
        assert_eq!(s.update(retained("b", "1234")), Change::Kept);
        assert_eq!(s.bytes(), 11);
        assert_eq!(s.update(retained("c", "1")), Change::Refused, "count");
        assert_eq!(s.update(retained("a", "1234567")), Change::Refused, "bytes");
        assert_eq!(s.update(retained("a", "123456")), Change::Kept, "replaces");
        assert_eq!(s.bytes(), 12);
        assert_eq!(s.update(retained("a", "")), Change::Cleared);
        assert_eq!(s.update(retained("a", "")), Change::Nothing);
        assert_eq!((s.len(), s.bytes()), (1, 5));
        assert_eq!(s.update(retained("c", "1")), Change::Kept);
    }
}
