//! Membership changes: creating a group, adding and removing members
//! (owner only, one or many at once), each written before it takes effect
//! and announced on `users/{user}/events`: to every member at once in a
//! small group; in a large one to the user concerned at once and to the
//! others in the next `members` digest (`announcements.rs`), so building a
//! group of N costs O(N), not O(N²).

use std::collections::HashSet;
use std::sync::Arc;

use chatmq_cluster::wire::MetaRecord;
use chatmq_storage::{Batch, Role};
use serde_json::json;

use super::{namespace, Chat, RpcError};

/// The most users one `add_members` call takes (a request's size already
/// bounds it; this keeps one write batch and one reply modest).
pub const MAX_ADD: usize = 10_000;

impl Chat {
    /// Creates a group conversation; `owner` becomes its owner, `members`
    /// its members. Fails if the id is taken or is a direct conversation.
    pub async fn create(
        &self,
        conv: &str,
        title: &str,
        owner: Option<&str>,
        members: &[String],
    ) -> Result<(), RpcError> {
        if !namespace::valid_conv(conv) || conv.starts_with("dm:") {
            return Err(RpcError::bad("conv is not a valid group conversation id"));
        }
        for m in members {
            if !namespace::valid_user(m) {
                return Err(RpcError::bad("members must be user ids"));
            }
        }
        if let Some(r) = self.replicated() {
            if self.members_read().exists(conv) {
                return Err(RpcError::new("exists", "the conversation already exists"));
            }
            let record = MetaRecord::Create {
                conv: conv.to_string(),
                title: title.to_string(),
                owner: owner.map(str::to_string),
                members: members.to_vec(),
            };
            return self.replicate_meta(&r, record).await;
        }
        self.create_here(conv, title, owner, members).await
    }

    /// The local half of [`Chat::create`]: what every node of a cluster
    /// applies from the records stream.
    pub(super) async fn create_here(
        &self,
        conv: &str,
        title: &str,
        owner: Option<&str>,
        members: &[String],
    ) -> Result<(), RpcError> {
        let state = self.conv_state(conv).await?;
        let mut st = state.lock().await;
        // In a cluster, this node may have applied the conversation's
        // first messages before its creation (the two streams are
        // applied side by side): only the members tell it exists.
        let replicated = self.replicated().is_some();
        if self.members_read().exists(conv) || (!replicated && st.record.head > 0) {
            return Err(RpcError::new("exists", "the conversation already exists"));
        }
        st.record.title = title.to_string();
        let mut stored = st.record.clone();
        if replicated {
            // The owner's head may count messages still on their way to
            // the stream: the copy holds what it applied.
            stored.head = state.applied.load(std::sync::atomic::Ordering::Acquire);
        }
        let mut batch = Batch::new();
        batch.put_conversation(conv, &stored);
        let mut all: Vec<(String, Role)> =
            members.iter().map(|m| (m.clone(), Role::Member)).collect();
        if let Some(o) = owner {
            all.retain(|(m, _)| m != o);
            all.push((o.to_string(), Role::Owner));
        }
        for (m, role) in &all {
            batch.put_member(conv, m, *role);
        }
        self.store.write(batch).await?;
        {
            let mut ms = self.members_write();
            for (m, role) in &all {
                ms.add(conv, m, *role);
            }
        }
        for (m, _) in &all {
            self.join(conv, m, 0);
        }
        let users: Vec<Arc<str>> = all.iter().map(|(m, _)| Arc::from(m.as_str())).collect();
        self.announce(
            &users,
            json!({"type": "conversation.created", "conv": conv, "title": title, "by": owner}),
        );
        Ok(())
    }

    /// Adds `user` to `conv`; `by` must be its owner (`None`: an operator).
    pub async fn add_member(
        &self,
        conv: &str,
        user: &str,
        by: Option<&str>,
    ) -> Result<(), RpcError> {
        self.add_members(conv, &[user.to_string()], by)
            .await
            .map(drop)
    }

    /// Adds `users` to `conv` with one write; `by` must be its owner
    /// (`None`: an operator). Returns the users who were not members yet.
    pub async fn add_members(
        &self,
        conv: &str,
        users: &[String],
        by: Option<&str>,
    ) -> Result<Vec<Arc<str>>, RpcError> {
        self.check_owner(conv, by)?;
        if users.len() > MAX_ADD {
            return Err(RpcError::bad(format!(
                "at most {MAX_ADD} users may be added at once"
            )));
        }
        if !users.iter().all(|u| namespace::valid_user(u)) {
            return Err(RpcError::bad("user is not a valid user id"));
        }
        if let Some(r) = self.replicated() {
            let mut seen = HashSet::new();
            let added: Vec<Arc<str>> = users
                .iter()
                .filter(|u| seen.insert(u.as_str()) && !self.is_member(conv, u))
                .map(|u| Arc::from(u.as_str()))
                .collect();
            if added.is_empty() {
                return Ok(added);
            }
            let record = MetaRecord::Add {
                conv: conv.to_string(),
                users: added.iter().map(|u| u.to_string()).collect(),
                by: by.map(str::to_string),
            };
            self.replicate_meta(&r, record).await?;
            return Ok(added);
        }
        self.add_members_here(conv, users, by).await
    }

    /// The local half of [`Chat::add_members`] (checked already).
    pub(super) async fn add_members_here(
        &self,
        conv: &str,
        users: &[String],
        by: Option<&str>,
    ) -> Result<Vec<Arc<str>>, RpcError> {
        let mut seen = HashSet::new();
        let added: Vec<Arc<str>> = users
            .iter()
            .filter(|u| seen.insert(u.as_str()) && !self.is_member(conv, u))
            .map(|u| Arc::from(u.as_str()))
            .collect();
        if added.is_empty() {
            return Ok(added);
        }
        let mut batch = Batch::new();
        for u in &added {
            batch.put_member(conv, u, Role::Member);
        }
        self.store.write(batch).await?;
        {
            let mut ms = self.members_write();
            for u in &added {
                ms.add(conv, u, Role::Member);
            }
        }
        if let Ok((head, _)) = self.bounds(conv).await {
            for u in &added {
                self.join(conv, u, head);
            }
        }
        let event = |u: &str| json!({"type": "member.added", "conv": conv, "user": u, "by": by});
        if self.is_large_group(conv) {
            for u in &added {
                self.send_event(u, event(u));
                self.gather_change(conv, u, true);
            }
        } else {
            let members = self.members(conv);
            for u in &added {
                self.announce(&members, event(u));
            }
        }
        Ok(added)
    }

    /// Removes `user` from `conv`, at once: its live subscriptions stop
    /// receiving the conversation. The owner removes anyone; a member may
    /// remove itself.
    pub async fn remove_member(
        &self,
        conv: &str,
        user: &str,
        by: Option<&str>,
    ) -> Result<(), RpcError> {
        if by != Some(user) {
            self.check_owner(conv, by)?;
        }
        if !self.is_member(conv, user) {
            return Err(RpcError::new("not_found", "the user is not a member"));
        }
        if let Some(r) = self.replicated() {
            let record = MetaRecord::Remove {
                conv: conv.to_string(),
                user: user.to_string(),
                by: by.map(str::to_string),
            };
            return self.replicate_meta(&r, record).await;
        }
        self.remove_member_here(conv, user, by).await
    }

    /// The local half of [`Chat::remove_member`] (checked already).
    pub(super) async fn remove_member_here(
        &self,
        conv: &str,
        user: &str,
        by: Option<&str>,
    ) -> Result<(), RpcError> {
        if !self.is_member(conv, user) {
            return Err(RpcError::new("not_found", "the user is not a member"));
        }
        let mut batch = Batch::new();
        batch.delete_member(conv, user);
        self.store.write(batch).await?;
        let event = json!({"type": "member.removed", "conv": conv, "user": user, "by": by});
        if self.is_large_group(conv) {
            self.members_write().remove(conv, user);
            self.send_event(user, event);
            self.gather_change(conv, &Arc::from(user), false);
        } else {
            let before = self.members(conv);
            self.members_write().remove(conv, user);
            self.announce(&before, event);
        }
        self.occupancy_changed(conv);
        Ok(())
    }

    fn check_owner(&self, conv: &str, by: Option<&str>) -> Result<(), RpcError> {
        if namespace::direct_members(conv).is_some() {
            return Err(RpcError::new(
                "forbidden",
                "direct conversations have fixed members",
            ));
        }
        if !self.members_read().exists(conv) {
            return Err(RpcError::new("not_found", "no such conversation"));
        }
        match by {
            None => Ok(()),
            Some(u) if self.role(conv, u) == Some(Role::Owner) => Ok(()),
            Some(_) => Err(RpcError::new(
                "forbidden",
                "only the owner may change members",
            )),
        }
    }

    /// `user` is now in `conv`, whose head is `head`: each of its sessions
    /// that subscribes to the conversation starts its cursor there, so one
    /// that is offline now replays from it when it comes back.
    pub(super) fn join(&self, conv: &str, user: &str, head: u64) {
        let cells = self.sessions_of(user);
        tracing::debug!(conv, user, head, sessions = cells.len(), "joining");
        let mut batch = Batch::new();
        for cell in cells {
            let mut slot = cell.lock();
            if slot.session.lacks_cursor(conv) {
                slot.session.start_cursor(conv, head, &mut batch);
            }
        }
        drop(self.store.submit_now(batch));
        self.occupancy_changed(conv);
    }
}
