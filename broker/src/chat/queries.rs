//! Read-side calls (for RPC and HTTP): history pages, a user's
//! conversation list with unread counts, and read receipts.

use chatmq_storage::{Batch, Role};
use serde_json::{json, Value};

use super::{Chat, RpcError};
use crate::blocking;

impl Chat {
    /// History of `conv` in seq order: after `after` (ascending from there)
    /// or before `before` (the latest ones before it), at most `limit`.
    /// Each message is its latest version (edited, or deleted: `body`
    /// null) and carries its reactions' summary, `mine` for `viewer`.
    pub async fn history(
        &self,
        conv: &str,
        after: Option<u64>,
        before: Option<u64>,
        limit: usize,
        viewer: Option<&str>,
    ) -> Result<Value, RpcError> {
        let (head, first) = self.bounds(conv).await?;
        let limit = limit.clamp(1, self.history_cap);
        let store = self.store.clone();
        let c = conv.to_string();
        let page = tokio::task::spawn_blocking(move || match (after, before) {
            // after = u64::MAX: nothing comes after it.
            (Some(a), b) => match a.checked_add(1) {
                Some(from) => store.messages(&c, from, b.unwrap_or(u64::MAX), limit, false),
                None => Ok(Vec::new()),
            },
            (None, b) => store
                .messages(&c, first, b.unwrap_or(u64::MAX), limit, true)
                .map(|mut v| {
                    v.reverse();
                    v
                }),
        })
        .await
        .map_err(|_| RpcError::new("internal", "history read failed"))??;
        let mut messages: Vec<(u64, Value)> = page
            .into_iter()
            .filter_map(|(seq, body)| Some((seq, serde_json::from_slice(&body).ok()?)))
            .collect();
        let seqs: Vec<u64> = messages.iter().map(|(s, _)| *s).collect();
        let mut summaries = self.summaries(conv, &seqs, viewer).await?;
        for (seq, m) in &mut messages {
            if let (Some(r), Some(obj)) = (summaries.remove(seq), m.as_object_mut()) {
                if r.as_object().is_some_and(|o| !o.is_empty()) {
                    obj.insert("reactions".into(), r);
                }
            }
        }
        let messages: Vec<Value> = messages.into_iter().map(|(_, m)| m).collect();
        Ok(json!({"messages": messages, "head": head, "first": first, "epoch": self.epoch()}))
    }

    /// The user's conversations with head seq, read seq and unread count.
    pub async fn list(&self, user: &str) -> Result<Value, RpcError> {
        let convs = self.conversations_of(user);
        // Every read seq in one trip to the blocking pool.
        let reads = {
            let (user, convs) = (user.to_string(), convs.clone());
            blocking::read(&self.store, move |s| {
                convs
                    .iter()
                    .map(|c| s.read_seq(&user, c))
                    .collect::<Result<Vec<_>, _>>()
            })
            .await?
        };
        let mut out = Vec::new();
        for (conv, read) in convs.into_iter().zip(reads) {
            let state = self.conv_state(&conv).await?;
            let (head, title) = {
                let s = state.lock().await;
                (s.record.head, s.record.title.clone())
            };
            let role = match self.role(&conv, user) {
                Some(Role::Owner) => "owner",
                _ => "member",
            };
            let muted = self.push.is_muted(user, &conv);
            out.push(json!({"conv": &*conv, "title": title, "head": head, "read": read, "unread": head.saturating_sub(read), "role": role, "muted": muted}));
        }
        Ok(json!({"conversations": out}))
    }

    /// Records that `user` read `conv` up to `seq` and tells the other
    /// members (a read receipt; coalesced in a large group, see
    /// `announcements.rs`). The read seq never goes backwards.
    pub async fn mark_read(&self, user: &str, conv: &str, seq: u64) -> Result<u64, RpcError> {
        if let Some(r) = self.replicated() {
            let (head, _) = self.bounds(conv).await?;
            let record = chatmq_cluster::wire::MetaRecord::Read {
                user: user.to_string(),
                conv: conv.to_string(),
                seq: seq.min(head),
            };
            self.replicate_meta(&r, record).await?;
            let (user, conv) = (user.to_string(), conv.to_string());
            return Ok(blocking::read(&self.store, move |s| s.read_seq(&user, &conv)).await?);
        }
        self.read_here(user, conv, seq).await
    }

    /// The local half of [`Chat::mark_read`]: what every node of a cluster
    /// applies from the records stream.
    pub(super) async fn read_here(
        &self,
        user: &str,
        conv: &str,
        seq: u64,
    ) -> Result<u64, RpcError> {
        let (head, _) = self.bounds(conv).await?;
        let read = {
            let (user, conv) = (user.to_string(), conv.to_string());
            blocking::read(&self.store, move |s| s.read_seq(&user, &conv)).await?
        };
        let seq = seq.min(head).max(read);
        let mut batch = Batch::new();
        batch.put_read(user, conv, seq);
        self.store.write(batch).await?;
        self.announce_read(conv, user, seq);
        Ok(seq)
    }
}
