//! The subscription index: which sessions want a topic.
//!
//! A trie over topic levels with `+` and `#` children, so a lookup costs
//! the topic's depth, not the number of subscriptions. Shared subscriptions
//! (`$share/{group}/{filter}`) live at their filter's node as groups; the
//! broker picks one member per group. The router only indexes: it knows
//! nothing of sessions, queues or delivery.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use rumqttc::v5::mqttbytes::QoS;

use crate::topic::parse_shared;

/// What a subscription asked for (MQTT 5 subscription options).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SubOptions {
    pub qos: QoS,
    pub no_local: bool,
    pub retain_as_published: bool,
    /// 0: send retained on subscribe, 1: only if new, 2: never.
    pub retain_handling: u8,
    /// Subscription identifier; 0 when absent.
    pub identifier: u32,
}

#[derive(Default)]
struct Node {
    children: HashMap<String, Node>,
    subscribers: HashMap<Arc<str>, SubOptions>,
    groups: HashMap<String, SharedGroup>,
}

#[derive(Default)]
struct SharedGroup {
    members: Vec<(Arc<str>, SubOptions)>,
    next: AtomicUsize,
}

/// One shared group that matched: the broker delivers to one member,
/// trying them in order from `start`.
pub struct SharedMatch<'a> {
    pub members: &'a [(Arc<str>, SubOptions)],
    pub start: usize,
}

#[derive(Default)]
pub struct Router {
    root: Node,
}

impl Router {
    /// Adds or replaces `client`'s subscription to `filter` (already
    /// validated). Returns true if it did not exist before.
    pub fn subscribe(&mut self, client: &Arc<str>, filter: &str, options: SubOptions) -> bool {
        match parse_shared(filter) {
            Some(Ok((group, inner))) => {
                let node = self.node_mut(inner);
                let group = node.groups.entry(group.to_string()).or_default();
                if let Some(m) = group.members.iter_mut().find(|(c, _)| c == client) {
                    m.1 = options;
                    false
                } else {
                    group.members.push((client.clone(), options));
                    true
                }
            }
            Some(Err(())) => false,
            None => self
                .node_mut(filter)
                .subscribers
                .insert(client.clone(), options)
                .is_none(),
        }
    }

    /// Removes `client`'s subscription to `filter`; true if there was one.
    pub fn unsubscribe(&mut self, client: &str, filter: &str) -> bool {
        let (path, group) = match parse_shared(filter) {
            Some(Ok((group, inner))) => (inner, Some(group)),
            Some(Err(())) => return false,
            None => (filter, None),
        };
        let levels: Vec<&str> = path.split('/').collect();
        remove(&mut self.root, &levels, client, group)
    }

    fn node_mut(&mut self, filter: &str) -> &mut Node {
        let mut node = &mut self.root;
        for level in filter.split('/') {
            node = node.children.entry(level.to_string()).or_default();
        }
        node
    }

    /// Calls `direct` for every plain subscription and `shared` for every
    /// shared group whose filter matches `topic`.
    pub fn for_each_match<'a>(
        &'a self,
        topic: &str,
        direct: &mut dyn FnMut(&'a Arc<str>, &'a SubOptions),
        shared: &mut dyn FnMut(SharedMatch<'a>),
    ) {
        let levels: Vec<&str> = topic.split('/').collect();
        let dollar = topic.starts_with('$');
        visit(&self.root, &levels, !dollar, direct, shared);
    }
}

fn emit<'a>(
    node: &'a Node,
    direct: &mut dyn FnMut(&'a Arc<str>, &'a SubOptions),
    shared: &mut dyn FnMut(SharedMatch<'a>),
) {
    for (client, options) in &node.subscribers {
        direct(client, options);
    }
    for group in node.groups.values() {
        if !group.members.is_empty() {
            let start = group.next.fetch_add(1, Ordering::Relaxed) % group.members.len();
            shared(SharedMatch {
                members: &group.members,
                start,
            });
        }
    }
}

/// `wild` is false at the root of a `$` topic: wildcards may not match its
/// first level [MQTT-4.7.2-1].
fn visit<'a>(
    node: &'a Node,
    levels: &[&str],
    wild: bool,
    direct: &mut dyn FnMut(&'a Arc<str>, &'a SubOptions),
    shared: &mut dyn FnMut(SharedMatch<'a>),
) {
    if wild {
        if let Some(hash) = node.children.get("#") {
            emit(hash, direct, shared);
        }
    }
    let Some((first, rest)) = levels.split_first() else {
        emit(node, direct, shared);
        return;
    };
    if let Some(child) = node.children.get(*first) {
        visit(child, rest, true, direct, shared);
    }
    if wild {
        if let Some(plus) = node.children.get("+") {
            visit(plus, rest, true, direct, shared);
        }
    }
}

fn remove(node: &mut Node, levels: &[&str], client: &str, group: Option<&str>) -> bool {
    let removed = match levels.split_first() {
        None => match group {
            None => node.subscribers.remove(client).is_some(),
            Some(g) => {
                let Some(grp) = node.groups.get_mut(g) else {
                    return false;
                };
                let before = grp.members.len();
                grp.members.retain(|(c, _)| &**c != client);
                let removed = grp.members.len() != before;
                if grp.members.is_empty() {
                    node.groups.remove(g);
                }
                removed
            }
        },
        Some((first, rest)) => {
            let Some(child) = node.children.get_mut(*first) else {
                return false;
            };
            let removed = remove(child, rest, client, group);
            if child.children.is_empty() && child.subscribers.is_empty() && child.groups.is_empty()
            {
                node.children.remove(*first);
            }
            removed
        }
    };
    removed
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts(qos: QoS) -> SubOptions {
        SubOptions {
            qos,
            no_local: false,
            retain_as_published: false,
            retain_handling: 0,
            identifier: 0,
        }
    }

    fn matched(r: &Router, topic: &str) -> Vec<String> {
        let out = std::cell::RefCell::new(Vec::new());
        r.for_each_match(
            topic,
            &mut |c, _| out.borrow_mut().push(c.to_string()),
            &mut |m| {
                out.borrow_mut()
                    .push(format!("shared:{}", m.members[m.start].0))
            },
        );
        let mut out = out.into_inner();
        out.sort();
        out
    }

    #[test]
    fn wildcards_match_through_the_trie() {
        let mut r = Router::default();
        let a: Arc<str> = "a".into();
        let b: Arc<str> = "b".into();
        let c: Arc<str> = "c".into();
        r.subscribe(&a, "sport/+/player1", opts(QoS::AtMostOnce));
        r.subscribe(&b, "sport/#", opts(QoS::AtMostOnce));
        r.subscribe(&c, "#", opts(QoS::AtMostOnce));
        assert_eq!(matched(&r, "sport/tennis/player1"), ["a", "b", "c"]);
        assert_eq!(matched(&r, "sport"), ["b", "c"]);
        assert_eq!(matched(&r, "other"), ["c"]);
        assert_eq!(matched(&r, "$SYS/x"), Vec::<String>::new());
        assert!(r.unsubscribe("b", "sport/#"));
        assert!(!r.unsubscribe("b", "sport/#"));
        assert_eq!(matched(&r, "sport"), ["c"]);
    }

    #[test]
    fn resubscribing_replaces_options() {
        let mut r = Router::default();
        let a: Arc<str> = "a".into();
        assert!(r.subscribe(&a, "t", opts(QoS::AtMostOnce)));
        assert!(!r.subscribe(&a, "t", opts(QoS::ExactlyOnce)));
        let mut qos = vec![];
        r.for_each_match("t", &mut |_, o| qos.push(o.qos), &mut |_| {});
        assert_eq!(qos, [QoS::ExactlyOnce]);
    }

    #[test]
    fn shared_groups_rotate_between_members() {
        let mut r = Router::default();
        for c in ["x", "y"] {
            let c: Arc<str> = c.into();
            r.subscribe(&c, "$share/g/jobs/+", opts(QoS::AtLeastOnce));
        }
        let first = matched(&r, "jobs/1");
        let second = matched(&r, "jobs/2");
        assert_eq!(first.len(), 1);
        assert_ne!(first, second);
        assert!(r.unsubscribe("x", "$share/g/jobs/+"));
        assert!(r.unsubscribe("y", "$share/g/jobs/+"));
        assert!(matched(&r, "jobs/1").is_empty());
        assert!(r.root.children.is_empty(), "empty nodes are pruned");
    }
}
