//! Edits and deletes (issue #13 item 2). A member's message `seq` is
//! changed by its sender or the conversation's owner (or, over HTTP, the
//! admin token). The change is itself a record of the log: it gets the
//! next seq and goes out on `chat/{conv}` like any message, so a session
//! that resumes, or a history page, carries it in order:
//!
//! `{"conv","seq":N,"id":"edit-N","from":<who>,"ts","type":"message.edit","target":T,"body":<new>}`
//! `{"conv","seq":N,"id":"delete-N","from":<who>,"ts","type":"message.delete","target":T,"body":null}`
//!
//! and the stored message `T` is rewritten to its latest version: the new
//! body with `"edited":{"seq":N,"by","ts"}` and the seqs of its edits in
//! `"edits"`, or, deleted, `"body":null` with `"deleted":{"seq":N,"by","ts"}`.
//! A delete also blanks the bodies of the earlier edit events of `T` and
//! drops its reactions, then scrubs the files ([`Scrubber`]): the text is
//! gone from the data directory, not only from every read, when the call
//! answers.
//!
//! Under the conversation's lock, after everything appended before is
//! durable ([`Chat::settled`]), so two changes of one message never race
//! and the target read is the latest. A retried delete (or an edit to the
//! body the message already has) appends nothing and answers the seq of
//! the change that did it. Records whose `type` starts with `message.` are
//! the server's: a client may not publish one ([`is_event_type`]), and
//! they cannot be edited, deleted or reacted to.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use chatmq_storage::{Batch, Role, StorageError, Store};
use serde_json::{json, Map, Value};

use super::sequencer::Locked;
use super::{lock, Chat, RpcError};
use crate::blocking;
use crate::clock::now_ms;

/// Edits one message may have: its `edits` list (and what a delete
/// blanks) stays bounded.
pub const MAX_EDITS: usize = 100;

/// The `type` of the server's change records; reserved for it.
pub fn is_event_type(kind: &str) -> bool {
    kind.starts_with("message.")
}

/// Who asks for a change.
#[derive(Debug, Clone, Copy)]
pub enum Editor<'a> {
    /// A member, by its user id.
    User(&'a str),
    /// The HTTP admin token (moderation): may change any message.
    Admin,
}

impl Editor<'_> {
    pub(super) fn name(&self) -> &str {
        match self {
            Editor::User(u) => u,
            Editor::Admin => super::SYSTEM_EDITOR,
        }
    }
}

/// What a change did: the message's seq, and the seq of the change record
/// (the earlier one when the call changed nothing).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Changed {
    pub seq: u64,
    pub event_seq: u64,
}

impl Changed {
    pub fn json(&self, conv: &str) -> Value {
        json!({"conv": conv, "seq": self.seq, "event_seq": self.event_seq})
    }
}

pub(super) enum Change<'a> {
    Edit(&'a Value),
    Delete,
}

impl Chat {
    /// `who` edits message `seq` of `conv` to `body`.
    pub async fn edit_message(
        &self,
        conv: &str,
        seq: u64,
        who: Editor<'_>,
        body: &Value,
    ) -> Result<Changed, RpcError> {
        Ok(self.change(conv, seq, who, Change::Edit(body)).await?.0)
    }

    /// `who` deletes message `seq` of `conv`; answers once its text is gone
    /// from the files.
    pub async fn delete_message(
        &self,
        conv: &str,
        seq: u64,
        who: Editor<'_>,
    ) -> Result<Changed, RpcError> {
        let (changed, rewritten) = self.change(conv, seq, who, Change::Delete).await?;
        self.scrubber.scrub(&self.store, conv, rewritten).await?;
        Ok(changed)
    }

    pub(super) async fn change(
        &self,
        conv: &str,
        seq: u64,
        who: Editor<'_>,
        change: Change<'_>,
    ) -> Result<(Changed, Vec<u64>), RpcError> {
        if let Editor::User(u) = who {
            if !self.is_member(conv, u) {
                return Err(RpcError::new(
                    "not_member",
                    "you are not a member of this conversation",
                ));
            }
        }
        if let Some(r) = self.replicated() {
            return self.change_replicated(&r, conv, seq, who, change).await;
        }
        let mut st = self.locked(conv).await?;
        self.settled(conv).await?;
        let who_name = who.name().to_string();
        match self.plan(conv, &st, seq, who, &change).await? {
            Plan::Done(changed, rewritten) => Ok((changed, rewritten)),
            Plan::Edit { record, edits } => {
                let Change::Edit(body) = change else {
                    return Err(RpcError::new("internal", "an edit planned for a delete"));
                };
                let (commit, event_seq) = self
                    .append_event(conv, &mut st, |n, ts, batch| {
                        let target = edited(record, body, n, &who_name, ts, &edits);
                        batch.put_message(conv, seq, &target);
                        event(conv, n, "edit", &who_name, ts, seq, body.clone())
                    })
                    .await?;
                drop(st);
                commit.await?;
                self.metrics.messages_edited.fetch_add(1, Ordering::Relaxed);
                self.replay.rewritten(conv, &[seq]);
                Ok((Changed { seq, event_seq }, vec![seq]))
            }
            Plan::Delete { record, edits } => {
                let old_edits = self.stored(conv, &edits).await?;
                // Reactions coming in now are refused from here on; those
                // already submitted are dropped by this batch's range.
                self.forget_reactions(conv, seq);
                let appended = self
                    .append_event(conv, &mut st, |n, ts, batch| {
                        deletion_writes(batch, conv, seq, record, n, &who_name, ts, old_edits);
                        event(conv, n, "delete", &who_name, ts, seq, Value::Null)
                    })
                    .await;
                drop(st);
                let committed = match appended {
                    Ok((commit, event_seq)) => commit.await.map(|()| event_seq),
                    Err(e) => Err(e),
                };
                let event_seq = match committed {
                    Ok(n) => n,
                    Err(e) => {
                        // Not deleted after all: its reactions load again.
                        self.unload_reactions(conv, seq);
                        return Err(e.into());
                    }
                };
                self.metrics
                    .messages_deleted
                    .fetch_add(1, Ordering::Relaxed);
                let mut rewritten = edits;
                rewritten.push(seq);
                self.replay.rewritten(conv, &rewritten);
                Ok((Changed { seq, event_seq }, rewritten))
            }
        }
    }

    /// Stored messages `seqs` of `conv` (those that are there).
    async fn stored(&self, conv: &str, seqs: &[u64]) -> Result<Vec<(u64, Vec<u8>)>, StorageError> {
        let (c, e) = (conv.to_string(), seqs.to_vec());
        let found = blocking::read(&self.store, move |st| {
            e.iter()
                .map(|n| st.message(&c, *n).map(|b| (*n, b)))
                .collect::<Result<Vec<_>, StorageError>>()
        })
        .await?;
        Ok(found
            .into_iter()
            .filter_map(|(n, b)| b.map(|b| (n, b)))
            .collect())
    }

    /// What `change` of message `seq` by `who` comes to, judged on the
    /// conversation's state under `st`, everything before it applied.
    pub(super) async fn plan(
        &self,
        conv: &str,
        st: &Locked,
        seq: u64,
        who: Editor<'_>,
        change: &Change<'_>,
    ) -> Result<Plan, RpcError> {
        let not_found = || RpcError::new("not_found", "no such message");
        if seq < st.record.first || seq > st.record.head {
            return Err(not_found());
        }
        let (c, s) = (conv.to_string(), seq);
        let stored = blocking::read(&self.store, move |st| st.message(&c, s))
            .await?
            .ok_or_else(not_found)?;
        let Ok(Value::Object(record)) = serde_json::from_slice::<Value>(&stored) else {
            return Err(RpcError::new("internal", "a stored message is not JSON"));
        };
        let kind = record.get("type").and_then(Value::as_str).unwrap_or("");
        if is_event_type(kind) {
            return Err(RpcError::new(
                "not_editable",
                "only chat messages can be changed, not change records",
            ));
        }
        let sender = record.get("from").and_then(Value::as_str).unwrap_or("");
        let allowed = match who {
            Editor::Admin => true,
            Editor::User(u) => {
                self.is_member(conv, u) && (u == sender || self.role(conv, u) == Some(Role::Owner))
            }
        };
        if !allowed {
            return Err(RpcError::new(
                "forbidden",
                "only the sender or the conversation's owner may change a message",
            ));
        }
        let edits: Vec<u64> = record
            .get("edits")
            .and_then(Value::as_array)
            .map(|v| v.iter().filter_map(Value::as_u64).collect())
            .unwrap_or_default();
        if let Some(deleted) = record.get("deleted") {
            let event_seq = deleted.get("seq").and_then(Value::as_u64).unwrap_or(0);
            return match change {
                // A retry: already done (scrubbed again, in case the
                // first scrub failed).
                Change::Delete => {
                    let mut rewritten = edits;
                    rewritten.push(seq);
                    Ok(Plan::Done(Changed { seq, event_seq }, rewritten))
                }
                Change::Edit(_) => Err(RpcError::new("deleted", "the message was deleted")),
            };
        }
        match change {
            Change::Edit(body) => {
                if record.get("body") == Some(*body) {
                    let event_seq = edits.last().copied().unwrap_or(seq);
                    return Ok(Plan::Done(Changed { seq, event_seq }, Vec::new()));
                }
                if edits.len() >= MAX_EDITS {
                    return Err(RpcError::new(
                        "too_many_edits",
                        format!("a message can be edited at most {MAX_EDITS} times"),
                    ));
                }
                Ok(Plan::Edit { record, edits })
            }
            Change::Delete => Ok(Plan::Delete { record, edits }),
        }
    }

    /// The writes a change record read from a partition stream makes on
    /// this node's copy (`[cluster]`), in the record's own batch: the
    /// message it targets rewritten as [`Chat::change`] does on one node.
    /// `None` (and no writes) if `envelope` is not a change record or its
    /// target is not a message that takes it (checked by its sequencer;
    /// what comes from NATS is checked again).
    pub(super) async fn change_writes(
        &self,
        conv: &str,
        envelope: &Value,
        batch: &mut Batch,
    ) -> Option<Applied> {
        let kind = envelope.get("type").and_then(Value::as_str)?;
        let edit = match kind {
            "message.edit" => true,
            "message.delete" => false,
            _ => return None,
        };
        let target = envelope.get("target").and_then(Value::as_u64)?;
        let n = envelope.get("seq").and_then(Value::as_u64)?;
        let by = envelope.get("from").and_then(Value::as_str)?;
        let ts = envelope
            .get("ts")
            .and_then(Value::as_u64)
            .unwrap_or_else(now_ms);
        let (_, stored) = self.stored(conv, &[target]).await.ok()?.pop()?;
        let Ok(Value::Object(record)) = serde_json::from_slice::<Value>(&stored) else {
            return None;
        };
        let target_kind = record.get("type").and_then(Value::as_str).unwrap_or("");
        if is_event_type(target_kind) || record.contains_key("deleted") {
            return None;
        }
        let edits: Vec<u64> = record
            .get("edits")
            .and_then(Value::as_array)
            .map(|v| v.iter().filter_map(Value::as_u64).collect())
            .unwrap_or_default();
        if edit {
            let body = envelope.get("body").cloned().unwrap_or(Value::Null);
            batch.put_message(conv, target, &edited(record, &body, n, by, ts, &edits));
            return Some(Applied {
                target,
                rewritten: vec![target],
                deleted: false,
            });
        }
        let old_edits = self.stored(conv, &edits).await.ok()?;
        self.forget_reactions(conv, target);
        deletion_writes(batch, conv, target, record, n, by, ts, old_edits);
        let mut rewritten = edits;
        rewritten.push(target);
        Some(Applied {
            target,
            rewritten,
            deleted: true,
        })
    }

    /// After the batch of [`Chat::change_writes`] is durable (`ok`) or
    /// failed: the replay cache forgets the old texts, and a delete's
    /// are scrubbed from this node's files.
    pub(super) async fn change_applied(&self, conv: &str, applied: Applied, ok: bool) {
        if !ok {
            if applied.deleted {
                self.unload_reactions(conv, applied.target);
            }
            return;
        }
        self.replay.rewritten(conv, &applied.rewritten);
        if applied.deleted {
            self.metrics
                .messages_deleted
                .fetch_add(1, Ordering::Relaxed);
            if let Err(e) = self
                .scrubber
                .scrub(&self.store, conv, applied.rewritten)
                .await
            {
                tracing::error!(conv, error = e.message, "scrubbing a replicated delete");
            }
        } else {
            self.metrics.messages_edited.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// What [`Chat::plan`] decided.
pub(super) enum Plan {
    /// Nothing to append (a retry, or an edit to the body the message
    /// has): what did it, and the seqs to scrub again.
    Done(Changed, Vec<u64>),
    /// An edit of the stored `record`, which has these edits so far.
    Edit {
        record: Map<String, Value>,
        edits: Vec<u64>,
    },
    /// A delete of the stored `record`, and of the texts of its edits.
    Delete {
        record: Map<String, Value>,
        edits: Vec<u64>,
    },
}

/// What a replicated change record did to this node's copy.
pub(super) struct Applied {
    target: u64,
    /// The seqs whose stored text changed.
    rewritten: Vec<u64>,
    deleted: bool,
}

/// The target's latest version after edit `n` by `by` to `body`.
fn edited(
    mut record: Map<String, Value>,
    body: &Value,
    n: u64,
    by: &str,
    ts: u64,
    edits: &[u64],
) -> Vec<u8> {
    record.insert("body".into(), body.clone());
    record.insert("edited".into(), json!({"seq": n, "by": by, "ts": ts}));
    let mut all = edits.to_vec();
    all.push(n);
    record.insert("edits".into(), json!(all));
    Value::Object(record).to_string().into_bytes()
}

/// The writes of delete `n` of message `target` by `by`: the target blank
/// with `deleted`, the earlier edit events (`old_edits`, as stored)
/// blanked, its reactions and attachment references dropped.
#[allow(clippy::too_many_arguments)]
fn deletion_writes(
    batch: &mut Batch,
    conv: &str,
    target: u64,
    mut record: Map<String, Value>,
    n: u64,
    by: &str,
    ts: u64,
    old_edits: Vec<(u64, Vec<u8>)>,
) {
    record.insert("body".into(), Value::Null);
    record.insert("deleted".into(), json!({"seq": n, "by": by, "ts": ts}));
    batch.put_message(conv, target, Value::Object(record).to_string().as_bytes());
    for (e, stored) in old_edits {
        if let Some(blank) = blanked(&stored) {
            batch.put_message(conv, e, &blank);
        }
    }
    batch.delete_reactions(conv, target);
    batch.delete_attachment_refs(conv, target);
}

/// A change record's envelope.
pub(super) fn event(
    conv: &str,
    seq: u64,
    what: &str,
    by: &str,
    ts: u64,
    target: u64,
    body: Value,
) -> Vec<u8> {
    let mut m = Map::new();
    m.insert("conv".into(), json!(conv));
    m.insert("seq".into(), json!(seq));
    m.insert("id".into(), json!(format!("{what}-{seq}")));
    m.insert("from".into(), json!(by));
    m.insert("ts".into(), json!(ts));
    m.insert("type".into(), json!(format!("message.{what}")));
    m.insert("target".into(), json!(target));
    m.insert("body".into(), body);
    Value::Object(m).to_string().into_bytes()
}

/// An edit event with its body gone (the message it edited was deleted).
fn blanked(stored: &[u8]) -> Option<Vec<u8>> {
    let Ok(Value::Object(mut m)) = serde_json::from_slice::<Value>(stored) else {
        return None;
    };
    m.insert("body".into(), Value::Null);
    m.insert("deleted".into(), Value::Bool(true));
    Some(Value::Object(m).to_string().into_bytes())
}

/// Scrubs deleted messages out of the files ([`Store::scrub_messages`]).
/// Deletes that come while a scrub runs wait for the next one, which does
/// all of them at once: a burst of deletes costs a few flushes, not one
/// each.
#[derive(Default)]
pub(super) struct Scrubber {
    state: Arc<Mutex<ScrubState>>,
}

#[derive(Default)]
struct ScrubState {
    pending: HashMap<String, Vec<u64>>,
    /// Told whether the scrub that covered them went well.
    waiting: Vec<tokio::sync::oneshot::Sender<bool>>,
    running: bool,
}

impl Scrubber {
    async fn scrub(&self, store: &Store, conv: &str, seqs: Vec<u64>) -> Result<(), RpcError> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let start = {
            let mut s = lock(&self.state);
            s.pending.entry(conv.to_string()).or_default().extend(seqs);
            s.waiting.push(tx);
            !std::mem::replace(&mut s.running, true)
        };
        if start {
            let (state, store) = (self.state.clone(), store.clone());
            tokio::task::spawn_blocking(move || loop {
                let (pending, waiting) = {
                    let mut s = lock(&state);
                    if s.waiting.is_empty() {
                        s.running = false;
                        return;
                    }
                    (
                        std::mem::take(&mut s.pending),
                        std::mem::take(&mut s.waiting),
                    )
                };
                let mut ok = true;
                for (conv, seqs) in pending {
                    if let Err(e) = store.scrub_messages(&conv, &seqs) {
                        tracing::error!(error = %e, conv = %conv, "scrubbing deleted messages failed");
                        ok = false;
                    }
                }
                for w in waiting {
                    let _ = w.send(ok);
                }
            });
        }
        match rx.await {
            Ok(true) => Ok(()),
            _ => Err(RpcError::new(
                "internal",
                "the message is deleted, but its old text could not be scrubbed from the files",
            )),
        }
    }
}
