//! The subscription index: which sessions want a topic.
//!
//! A trie over topic levels with `+` and `#` children, so a lookup costs
//! the topic's depth, not the number of subscriptions. Shared subscriptions
//! (`$share/{group}/{filter}`) live at their filter's node as groups; the
//! broker picks one member per group. Each subscription holds a handle `H`
//! to its subscriber (the broker's is the session itself), so a publisher
//! reaches the sessions a topic matches without any other lookup. The
//! router only indexes: it knows nothing of sessions, queues or delivery.

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

/// One subscription as indexed: what it asked for, and its subscriber.
#[derive(Clone)]
pub struct Sub<H> {
    pub options: SubOptions,
    pub handle: H,
}

struct Node<H> {
    children: HashMap<String, Node<H>>,
    /// Plain subscriptions by client id.
    subscribers: HashMap<Arc<str>, Sub<H>>,
    groups: HashMap<String, SharedGroup<H>>,
}

impl<H> Default for Node<H> {
    fn default() -> Self {
        Node {
            children: HashMap::new(),
            subscribers: HashMap::new(),
            groups: HashMap::new(),
        }
    }
}

impl<H> Node<H> {
    fn is_empty(&self) -> bool {
        self.children.is_empty() && self.subscribers.is_empty() && self.groups.is_empty()
    }

    /// Holds nothing of its own and leads to one child only: a link in a
    /// chain that removing the chain's last subscription empties.
    fn is_link(&self) -> bool {
        self.children.len() == 1 && self.subscribers.is_empty() && self.groups.is_empty()
    }
}

/// Dropping a node drops its subtree without recursion: a chain of
/// thousands of levels would otherwise overflow the stack of whoever
/// dropped it (an unsubscribe, the end of a session, shutdown).
impl<H> Drop for Node<H> {
    fn drop(&mut self) {
        let mut orphans: Vec<Node<H>> = self.children.drain().map(|(_, n)| n).collect();
        while let Some(mut node) = orphans.pop() {
            orphans.extend(node.children.drain().map(|(_, n)| n));
            // `node` goes here with no children left.
        }
    }
}

struct SharedGroup<H> {
    members: Vec<(Arc<str>, Sub<H>)>,
    /// Where the next pick starts. Written once per message that reaches
    /// the group (not per message routed), and only for shared groups.
    next: AtomicUsize,
}

impl<H> Default for SharedGroup<H> {
    fn default() -> Self {
        SharedGroup {
            members: Vec::new(),
            next: AtomicUsize::new(0),
        }
    }
}

/// One shared group that matched: the broker delivers to one member,
/// trying them in order from `start`.
pub struct SharedMatch<'a, H> {
    pub members: &'a [(Arc<str>, Sub<H>)],
    pub start: usize,
}

/// The index. Insert, remove and match walk the trie in loops: a topic's
/// depth is the client's choice, so none of them recurses.
pub struct Router<H> {
    root: Node<H>,
}

impl<H> Default for Router<H> {
    fn default() -> Self {
        Router {
            root: Node::default(),
        }
    }
}

impl<H> Router<H> {
    /// Adds or replaces `client`'s subscription to `filter` (already
    /// validated), reached through `handle`. Returns true if it did not
    /// exist before.
    pub fn subscribe(
        &mut self,
        client: &Arc<str>,
        filter: &str,
        options: SubOptions,
        handle: H,
    ) -> bool {
        let sub = Sub { options, handle };
        match parse_shared(filter) {
            Some(Ok((group, inner))) => {
                let node = self.node_mut(inner);
                let group = node.groups.entry(group.to_string()).or_default();
                if let Some(m) = group.members.iter_mut().find(|(c, _)| c == client) {
                    m.1 = sub;
                    false
                } else {
                    group.members.push((client.clone(), sub));
                    true
                }
            }
            Some(Err(())) => false,
            None => self
                .node_mut(filter)
                .subscribers
                .insert(client.clone(), sub)
                .is_none(),
        }
    }

    /// Removes `client`'s subscription to `filter`; true if there was one.
    /// Nodes left empty are pruned.
    pub fn unsubscribe(&mut self, client: &str, filter: &str) -> bool {
        let (path, group) = match parse_shared(filter) {
            Some(Ok((group, inner))) => (inner, Some(group)),
            Some(Err(())) => return false,
            None => (filter, None),
        };
        let levels: Vec<&str> = path.split('/').collect();
        // The deepest node that outlives the removal whatever it empties
        // (the root, or one holding something besides the path below it):
        // if the leaf ends up empty, the chain under it is cut there.
        let mut keep = 0;
        let mut node = &self.root;
        for (depth, level) in levels.iter().enumerate() {
            if depth == 0 || !node.is_link() {
                keep = depth;
            }
            match node.children.get(*level) {
                Some(child) => node = child,
                None => return false,
            }
        }
        let Some(leaf) = self.node_at_mut(&levels) else {
            return false;
        };
        let removed = match group {
            None => leaf.subscribers.remove(client).is_some(),
            Some(g) => match leaf.groups.get_mut(g) {
                None => false,
                Some(grp) => {
                    let before = grp.members.len();
                    grp.members.retain(|(c, _)| &**c != client);
                    let removed = grp.members.len() != before;
                    if grp.members.is_empty() {
                        leaf.groups.remove(g);
                    }
                    removed
                }
            },
        };
        if leaf.is_empty() {
            if let Some(anchor) = self.node_at_mut(&levels[..keep]) {
                // Dropped without recursion (see `Drop for Node`).
                anchor.children.remove(levels[keep]);
            }
        }
        removed
    }

    fn node_mut(&mut self, filter: &str) -> &mut Node<H> {
        let mut node = &mut self.root;
        for level in filter.split('/') {
            node = node.children.entry(level.to_string()).or_default();
        }
        node
    }

    fn node_at_mut(&mut self, levels: &[&str]) -> Option<&mut Node<H>> {
        let mut node = &mut self.root;
        for level in levels {
            node = node.children.get_mut(*level)?;
        }
        Some(node)
    }

    /// The shared group `group` of `filter` (the filter inside
    /// `$share/{group}/`), for one message: its members and where the
    /// rotation starts. `None` if no session here is a member.
    pub fn shared_group(&self, filter: &str, group: &str) -> Option<SharedMatch<'_, H>> {
        let mut node = &self.root;
        for level in filter.split('/') {
            node = node.children.get(level)?;
        }
        let group = node.groups.get(group)?;
        if group.members.is_empty() {
            return None;
        }
        let start = group.next.fetch_add(1, Ordering::Relaxed) % group.members.len();
        Some(SharedMatch {
            members: &group.members,
            start,
        })
    }

    /// Calls `direct` for every plain subscription and `shared` for every
    /// shared group whose filter matches `topic`.
    pub fn for_each_match<'a>(
        &'a self,
        topic: &str,
        direct: &mut dyn FnMut(&'a Arc<str>, &'a Sub<H>),
        shared: &mut dyn FnMut(SharedMatch<'a, H>),
    ) {
        let levels: Vec<&str> = topic.split('/').collect();
        // Wildcards may not match the first level of a `$` topic
        // [MQTT-4.7.2-1].
        let dollar = topic.starts_with('$');
        // Depth-first over (node, levels consumed). Each node pushes at most
        // two children, the literal one and `+`, so the stack holds at most
        // one pending branch per level.
        let mut pending: Vec<(&'a Node<H>, usize)> = vec![(&self.root, 0)];
        while let Some((node, depth)) = pending.pop() {
            let wild = depth > 0 || !dollar;
            if wild {
                if let Some(hash) = node.children.get("#") {
                    emit(hash, direct, shared);
                }
            }
            let Some(level) = levels.get(depth) else {
                emit(node, direct, shared);
                continue;
            };
            if let Some(child) = node.children.get(*level) {
                pending.push((child, depth + 1));
            }
            if wild {
                if let Some(plus) = node.children.get("+") {
                    pending.push((plus, depth + 1));
                }
            }
        }
    }
}

fn emit<'a, H>(
    node: &'a Node<H>,
    direct: &mut dyn FnMut(&'a Arc<str>, &'a Sub<H>),
    shared: &mut dyn FnMut(SharedMatch<'a, H>),
) {
    for (client, sub) in &node.subscribers {
        direct(client, sub);
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

    fn matched(r: &Router<()>, topic: &str) -> Vec<String> {
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
        let mut r = Router::<()>::default();
        let a: Arc<str> = "a".into();
        let b: Arc<str> = "b".into();
        let c: Arc<str> = "c".into();
        r.subscribe(&a, "sport/+/player1", opts(QoS::AtMostOnce), ());
        r.subscribe(&b, "sport/#", opts(QoS::AtMostOnce), ());
        r.subscribe(&c, "#", opts(QoS::AtMostOnce), ());
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
        let mut r = Router::<()>::default();
        let a: Arc<str> = "a".into();
        assert!(r.subscribe(&a, "t", opts(QoS::AtMostOnce), ()));
        assert!(!r.subscribe(&a, "t", opts(QoS::ExactlyOnce), ()));
        let mut qos = vec![];
        r.for_each_match("t", &mut |_, s| qos.push(s.options.qos), &mut |_| {});
        assert_eq!(qos, [QoS::ExactlyOnce]);
    }

    #[test]
    fn a_shared_group_is_found_by_its_filter_and_name_alone() {
        let mut r: Router<()> = Router::default();
        for c in ["x", "y"] {
            let c: Arc<str> = Arc::from(c);
            r.subscribe(&c, "$share/g/jobs/+", opts(QoS::AtLeastOnce), ());
        }
        let picks: Vec<String> = (0..4)
            .map(|_| {
                let m = r.shared_group("jobs/+", "g").expect("the group");
                m.members[m.start].0.to_string()
            })
            .collect();
        assert_eq!(picks, ["x", "y", "x", "y"], "it rotates");
        assert!(r.shared_group("jobs/+", "h").is_none(), "another group");
        assert!(r.shared_group("jobs/#", "g").is_none(), "another filter");
        assert!(r.shared_group("jobs", "g").is_none(), "a node on the way");
        assert!(r.unsubscribe("x", "$share/g/jobs/+"));
        assert!(r.unsubscribe("y", "$share/g/jobs/+"));
        assert!(r.shared_group("jobs/+", "g").is_none(), "no member left");
    }

    #[test]
    fn shared_groups_rotate_between_members() {
        let mut r = Router::<()>::default();
        for c in ["x", "y"] {
            let c: Arc<str> = c.into();
            r.subscribe(&c, "$share/g/jobs/+", opts(QoS::AtLeastOnce), ());
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

    /// A filter of 60,000 levels is indexed, matched, removed and dropped
    /// on a small stack: nothing walks the trie by recursion.
    #[test]
    fn deep_filters_need_no_deep_stack() {
        let deep = format!("sensors/erin/{}", "/".repeat(60_000));
        let run = move || {
            let mut r = Router::<()>::default();
            let a: Arc<str> = "a".into();
            let b: Arc<str> = "b".into();
            r.subscribe(&a, &deep, opts(QoS::AtLeastOnce), ());
            r.subscribe(&b, &format!("{deep}/#"), opts(QoS::AtLeastOnce), ());
            r.subscribe(&b, &format!("$share/g/{deep}"), opts(QoS::AtLeastOnce), ());
            assert_eq!(matched(&r, &deep), ["a", "b", "shared:b"]);
            assert!(r.unsubscribe("a", &deep));
            assert_eq!(matched(&r, &deep), ["b", "shared:b"]);
            assert!(r.unsubscribe("b", &format!("$share/g/{deep}")));
            assert!(r.unsubscribe("b", &format!("{deep}/#")));
            assert!(r.root.children.is_empty(), "the whole chain is pruned");
            // And a router dropped while it still holds a deep chain.
            r.subscribe(&a, &deep, opts(QoS::AtMostOnce), ());
            drop(r);
        };
        let small_stack = std::thread::Builder::new().stack_size(256 * 1024);
        let outcome = small_stack.spawn(run).map(|t| t.join());
        assert!(matches!(outcome, Ok(Ok(()))), "the deep filter overflowed");
    }

    #[test]
    fn pruning_keeps_what_other_subscriptions_need() {
        let mut r = Router::<()>::default();
        let a: Arc<str> = "a".into();
        let b: Arc<str> = "b".into();
        r.subscribe(&a, "x/y/z/w", opts(QoS::AtMostOnce), ());
        r.subscribe(&b, "x/y", opts(QoS::AtMostOnce), ());
        r.subscribe(&b, "x/q/r", opts(QoS::AtMostOnce), ());
        assert!(r.unsubscribe("a", "x/y/z/w"));
        assert!(!r.unsubscribe("a", "x/y/z/w"));
        assert!(!r.unsubscribe("a", "x/y/nothing"));
        assert_eq!(matched(&r, "x/y"), ["b"]);
        assert_eq!(matched(&r, "x/q/r"), ["b"]);
        let x = &r.root.children["x"];
        assert!(!x.children["y"].children.contains_key("z"), "z/w pruned");
        assert!(r.unsubscribe("b", "x/y"));
        assert!(!r.root.children["x"].children.contains_key("y"));
        assert!(r.unsubscribe("b", "x/q/r"));
        assert!(r.root.children.is_empty());
    }
}
