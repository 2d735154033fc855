//! Who is in which conversation, in memory, mirrored from the `member`
//! column family at start-up. Direct conversations `dm:a:b` need no
//! entry: their two members are in their name.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;

use chatmq_storage::Role;

use super::namespace::direct_members;

#[derive(Default)]
pub struct Membership {
    by_conv: HashMap<Arc<str>, HashMap<Arc<str>, Role>>,
    by_user: HashMap<Arc<str>, BTreeSet<Arc<str>>>,
}

impl Membership {
    pub fn add(&mut self, conv: &str, user: &str, role: Role) {
        let conv: Arc<str> = conv.into();
        let user: Arc<str> = user.into();
        self.by_conv
            .entry(conv.clone())
            .or_default()
            .insert(user.clone(), role);
        self.by_user.entry(user).or_default().insert(conv);
    }

    pub fn remove(&mut self, conv: &str, user: &str) -> bool {
        let removed = self
            .by_conv
            .get_mut(conv)
            .is_some_and(|m| m.remove(user).is_some());
        if let Some(convs) = self.by_user.get_mut(user) {
            convs.remove(conv);
        }
        removed
    }

    pub fn role(&self, conv: &str, user: &str) -> Option<Role> {
        if let Some((a, b)) = direct_members(conv) {
            return (user == a || user == b).then_some(Role::Member);
        }
        self.by_conv.get(conv)?.get(user).copied()
    }

    pub fn is_member(&self, conv: &str, user: &str) -> bool {
        self.role(conv, user).is_some()
    }

    pub fn exists(&self, conv: &str) -> bool {
        direct_members(conv).is_some() || self.by_conv.get(conv).is_some_and(|m| !m.is_empty())
    }

    /// How many members `conv` has, without listing them.
    pub fn len(&self, conv: &str) -> usize {
        if direct_members(conv).is_some() {
            return 2;
        }
        self.by_conv.get(conv).map_or(0, HashMap::len)
    }

    pub fn members(&self, conv: &str) -> Vec<Arc<str>> {
        if let Some((a, b)) = direct_members(conv) {
            return vec![a.into(), b.into()];
        }
        self.by_conv
            .get(conv)
            .map(|m| m.keys().cloned().collect())
            .unwrap_or_default()
    }

    /// The conversations a user is in (direct ones once they have a message).
    pub fn conversations(&self, user: &str) -> Vec<Arc<str>> {
        self.by_user
            .get(user)
            .map(|c| c.iter().cloned().collect())
            .unwrap_or_default()
    }

    /// Do `a` and `b` share a conversation? One membership lookup per
    /// conversation of `a`, not a walk over every member of them.
    pub fn share(&self, a: &str, b: &str) -> bool {
        self.by_user
            .get(a)
            .is_some_and(|convs| convs.iter().any(|c| self.is_member(c, b)))
    }

    /// An upper bound on `contacts(user).len()` without building the set:
    /// the sizes of the user's conversations, added.
    pub fn contact_bound(&self, user: &str) -> usize {
        self.by_user.get(user).map_or(0, |convs| {
            convs
                .iter()
                .map(|c| self.by_conv.get(c).map_or(2, HashMap::len))
                .fold(1, usize::saturating_add)
        })
    }

    /// Users who share at least one conversation with `user`.
    pub fn contacts(&self, user: &str) -> BTreeSet<Arc<str>> {
        let mut out = BTreeSet::new();
        for conv in self.by_user.get(user).into_iter().flatten() {
            out.extend(self.members(conv));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn users_share_a_conversation_exactly_when_one_lists_the_other_as_contact() {
        let mut m = Membership::default();
        m.add("team", "alice", Role::Owner);
        m.add("team", "bob", Role::Member);
        m.add("dm:alice:carol", "alice", Role::Member);
        m.add("dm:alice:carol", "carol", Role::Member);
        m.add("other", "dave", Role::Member);
        for (a, b) in [
            ("alice", "bob"),
            ("alice", "carol"),
            ("bob", "carol"),
            ("dave", "alice"),
        ] {
            assert_eq!(m.share(a, b), m.contacts(a).contains(b), "{a} and {b}");
        }
        assert!(m.share("carol", "alice") && !m.share("bob", "carol"));
        m.remove("team", "bob");
        assert!(!m.share("alice", "bob"));
    }
}
