//! Chat on the cluster's order of record (`[cluster]`, issue #12 items 2
//! and 3): where an append goes when the node is one of several.
//!
//! - A message for a partition this node owns is sequenced here as a
//!   single node does (idempotency keys, next seq, under the
//!   conversation's lock), then handed to the partition's publisher
//!   ([`chatmq_cluster::Owned::publish`]) instead of the local writer.
//!   It is acknowledged once this node has applied it from the stream
//!   (so after the stream's ack, and read-your-writes holds here).
//! - A message for a partition another node owns is forwarded to it and
//!   acknowledged when the owner answered (after the stream's ack) and
//!   this node applied it too; while nobody owns it (failover) it is
//!   retried within a bound, then refused.
//! - Every node applies every partition ([`run`]): messages, heads,
//!   idempotency keys and the stream seq in one batch, then fan-out to
//!   its own sessions, as a single node's dispatcher does after a commit.
//! - Membership, conversation creation, read state, push devices and
//!   mutes go through the records stream: published by the node that was
//!   asked, applied by every node (the `*_here` halves of `admin.rs` and
//!   `queries.rs`; `Push` itself for devices and mutes), so the node that
//!   queues a message's pushes knows every member's devices.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use chatmq_cluster::wire::{ChatRecord, ForwardReply, MetaRecord};
use chatmq_cluster::{ChangeRequest, Delivered, Node, Owned, StreamRef};
use chatmq_storage::{Batch, Commit, CommitSender, Role, StorageError};
use rumqttc::v5::mqttbytes::QoS;
use serde_json::{json, Value};
use tokio::sync::watch;

use super::edits::{Change, Changed, Editor, Plan};
use super::fanout::Dispatch;
use super::sequencer::{ConvSlot, Locked};
use super::{lock, namespace, Chat, Envelope, RpcError};
use crate::blocking;
use crate::clock::now_ms;
use crate::message::Message;

/// How long a node waits for its own copy to reach what another node
/// acknowledged (read-your-writes on the node asked).
const LOCAL_APPLY_WAIT: Duration = Duration::from_secs(10);

/// Appends waiting for this node to apply (conv, seq), by (conv, seq).
type Waiters = HashMap<(Arc<str>, u64), Vec<CommitSender>>;

/// The chat layer's link to the cluster.
pub struct Replicated {
    pub node: Arc<Node>,
    /// Appends waiting for this node to apply (conv, seq).
    waiters: Mutex<Waiters>,
    /// How long a publish waits for a partition to have an owner.
    bound: Duration,
}

impl Replicated {
    pub fn new(node: Arc<Node>) -> Replicated {
        let ttl = node.layout().lease_ttl();
        Replicated {
            node,
            waiters: Mutex::new(HashMap::new()),
            // A dead owner's lease expires after the TTL; catching up and
            // taking it over takes a few lease rounds more.
            bound: ttl * 3 + Duration::from_secs(10),
        }
    }
}

impl Chat {
    /// Joins the cluster: from now on appends, membership and read state
    /// go through the streams. Called once, before any client is served.
    pub fn attach_cluster(&self, node: Arc<Node>) {
        let _ = self.replicated.set(Arc::new(Replicated::new(node)));
    }

    /// The cluster node, with `[cluster]` (for `/metrics`).
    pub fn cluster_node(&self) -> Option<Arc<Node>> {
        self.replicated.get().map(|r| r.node.clone())
    }

    pub(super) fn replicated(&self) -> Option<Arc<Replicated>> {
        self.replicated.get().cloned()
    }

    /// A commit that resolves once this node applied (`conv`, `seq`) and
    /// fanned it out. (Checked under the waiters' lock, under which the
    /// applier moves `applied`: no wake-up is missed.)
    fn wait_applied(&self, r: &Replicated, conv: &str, slot: &ConvSlot, seq: u64) -> Commit {
        let (done, commit) = Commit::deferred();
        let mut waiters = lock(&r.waiters);
        if slot.applied.load(Ordering::Acquire) >= seq {
            drop(waiters);
            // Out already, or queued in the conversation's shard: a
            // barrier resolves after it.
            let shard = self.shard(conv).clone();
            tokio::spawn(async move {
                if let Err(e) = shard.send(Dispatch::Barrier(done)).await {
                    if let Dispatch::Barrier(d) = e.0 {
                        d.resolve(Err(StorageError::WriterGone));
                    }
                }
            });
            return commit;
        }
        waiters
            .entry((Arc::from(conv), seq))
            .or_default()
            .push(done);
        commit
    }

    fn fail_waiters(&self, r: &Replicated, conv: &str, seq: u64) {
        let waiting = lock(&r.waiters).remove(&(Arc::from(conv), seq));
        for w in waiting.into_iter().flatten() {
            w.resolve(Err(StorageError::Unavailable(
                "acknowledged by its owner, not applied on this node in time",
            )));
        }
    }

    /// [`Chat::append`] with `[cluster]`.
    pub(super) async fn append_replicated(
        &self,
        r: &Arc<Replicated>,
        conv: &str,
        from: &Arc<str>,
        envelope: &Envelope,
        qos: QoS,
    ) -> Result<(Commit, u64), StorageError> {
        let p = r.node.partition_of(conv);
        let deadline = tokio::time::Instant::now() + r.bound;
        let mut delay = Duration::from_millis(50);
        loop {
            if r.node.owned(p).is_some() {
                if let Some(done) = self.append_owned(r, p, conv, from, envelope).await? {
                    return Ok(done);
                }
            } else if let Some(owner) = r.node.owner_of(p).filter(|o| o != r.node.node_id()) {
                let payload = Bytes::from(
                    json!({"id": envelope.id, "type": envelope.kind, "body": envelope.body})
                        .to_string(),
                );
                let q = match qos {
                    QoS::AtMostOnce => 0,
                    _ => 1,
                };
                match r.node.forward(&owner, conv, from, q, payload).await {
                    Some(ForwardReply::Ok { seq }) => {
                        // Here too before the ack: a read on this node
                        // right after finds it.
                        let slot = self.conv_state(conv).await?;
                        let commit = self.wait_applied(r, conv, &slot, seq);
                        let waited = tokio::time::timeout(LOCAL_APPLY_WAIT, commit).await;
                        if waited.is_err() {
                            tracing::warn!(
                                conv,
                                seq,
                                "acknowledged by the owner; not applied here yet"
                            );
                            self.fail_waiters(r, conv, seq);
                        }
                        return Ok((Commit::ready(), seq));
                    }
                    Some(ForwardReply::Bad) => {
                        tracing::error!(conv, "the owner refused a forwarded envelope");
                        return Err(StorageError::Unavailable(
                            "the owner refused the forwarded envelope",
                        ));
                    }
                    other => {
                        tracing::debug!(conv, partition = p, owner, reply = ?other, "forward: retrying");
                    }
                }
            }
            if tokio::time::Instant::now() >= deadline {
                tracing::warn!(
                    conv,
                    partition = p,
                    "no owner took the publish in time: not acknowledged"
                );
                return Err(StorageError::Unavailable(
                    "no partition owner took it in time",
                ));
            }
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(Duration::from_millis(500));
        }
    }

    /// Sequences a message of `conv` in partition `p`, which this node
    /// owns: `None` if it turned out not to (the caller looks again).
    async fn append_owned(
        &self,
        r: &Arc<Replicated>,
        p: u32,
        conv: &str,
        from: &Arc<str>,
        envelope: &Envelope,
    ) -> Result<Option<(Commit, u64)>, StorageError> {
        let slot = self.conv_state(conv).await?;
        let Some((owned, st)) = self.owner_state(r, p, conv, &slot).await? else {
            return Ok(None);
        };
        let key = (from.clone(), envelope.id.clone());
        let (st, earlier) = self.earlier(conv, &key, st).await?;
        if let Some(seq) = earlier {
            let commit = self.wait_applied(r, conv, &slot, seq);
            return Ok(Some((commit, seq)));
        }
        let seq = st.record.head + 1;
        let ts = now_ms();
        let body = envelope.delivered(conv, seq, from, ts);
        let record = ChatRecord {
            conv: conv.to_string(),
            seq,
            sender: from.to_string(),
            envelope_id: envelope.id.clone(),
            epoch: owned.epoch,
            node: r.node.node_id().to_string(),
            body: Bytes::from(body),
        };
        let commit = self
            .publish_owned(r, p, &owned, st, record, Some(key))
            .await?;
        Ok(commit.map(|c| (c, seq)))
    }

    /// This node's state of `conv` under its lock as the owner of its
    /// partition `p` (read again if the partition changed hands since it
    /// was read); `None` if this node does not own `p`.
    async fn owner_state(
        &self,
        r: &Replicated,
        p: u32,
        conv: &str,
        slot: &ConvSlot,
    ) -> Result<Option<(Owned, Locked)>, StorageError> {
        let Some(owned) = r.node.owned(p) else {
            return Ok(None);
        };
        let mut st = self.locked(conv).await?;
        if st.generation != owned.generation {
            // Taken over (or lost and taken again) since this state was
            // read: what the stream holds is applied here (the lease was
            // taken only then); read it back from the copy.
            self.reload(conv, &mut st.guard).await?;
            let head = st.record.head;
            st.record.head = head.max(slot.applied.load(Ordering::Acquire));
            st.generation = owned.generation;
        }
        Ok(Some((owned, st)))
    }

    /// Publishes `record`, the next seq of its conversation (whose state
    /// `st` is), to partition `p` as its owner. The commit resolves once
    /// this node applied it; `None` if the partition turned out not to be
    /// this node's. `key`: the idempotency key it is remembered by.
    async fn publish_owned(
        &self,
        r: &Arc<Replicated>,
        p: u32,
        owned: &Owned,
        mut st: Locked,
        record: ChatRecord,
        key: Option<(Arc<str>, String)>,
    ) -> Result<Option<Commit>, StorageError> {
        let (conv, seq) = (record.conv.clone(), record.seq);
        if !r.node.fits(record.body.len()) {
            tracing::warn!(
                conv,
                bytes = record.body.len(),
                "message larger than NATS takes"
            );
            return Err(StorageError::Unavailable("larger than NATS takes"));
        }
        let commit = {
            let (done, commit) = Commit::deferred();
            lock(&r.waiters)
                .entry((Arc::from(conv.as_str()), seq))
                .or_default()
                .push(done);
            commit
        };
        match owned.publish(r.node.layout(), p, record).await {
            Ok(acked) => {
                st.record.head = seq;
                if let Some(key) = key {
                    Self::remember(&mut st, key, seq);
                }
                drop(st);
                let (chat_r, c) = (r.clone(), Arc::<str>::from(conv.as_str()));
                let failed = move |chat_r: &Replicated| {
                    let waiting = lock(&chat_r.waiters).remove(&(c.clone(), seq));
                    for w in waiting.into_iter().flatten() {
                        w.resolve(Err(StorageError::Unavailable(
                            "the partition stream did not acknowledge it",
                        )));
                    }
                };
                tokio::spawn(async move {
                    if !matches!(acked.await, Ok(Ok(_))) {
                        failed(&chat_r);
                    }
                });
                Ok(Some(commit))
            }
            Err(_) => {
                st.generation = 0;
                drop(st);
                self.fail_waiters(r, &conv, seq);
                Ok(None)
            }
        }
    }

    /// [`Chat::change`] with `[cluster]`: sequenced by the partition's
    /// owner like a message (forwarded to it when it is another node),
    /// applied by every node from the stream ([`Chat::change_writes`]:
    /// the target rewritten, a delete's texts scrubbed from each node's
    /// files before its node asked answers).
    pub(super) async fn change_replicated(
        &self,
        r: &Arc<Replicated>,
        conv: &str,
        seq: u64,
        who: Editor<'_>,
        change: Change<'_>,
    ) -> Result<(Changed, Vec<u64>), RpcError> {
        let p = r.node.partition_of(conv);
        let deadline = tokio::time::Instant::now() + r.bound;
        let mut delay = Duration::from_millis(50);
        let request = ChangeRequest {
            edit: matches!(change, Change::Edit(_)),
            target: seq,
            admin: matches!(who, Editor::Admin),
        };
        loop {
            if r.node.owned(p).is_some() {
                if let Some(done) = self.change_owned(r, p, conv, seq, who, &change).await? {
                    return Ok(done);
                }
            } else if let Some(owner) = r.node.owner_of(p).filter(|o| o != r.node.node_id()) {
                let body = match &change {
                    Change::Edit(body) => Bytes::from(body.to_string()),
                    Change::Delete => Bytes::new(),
                };
                let by = match who {
                    Editor::User(u) => u,
                    Editor::Admin => "",
                };
                match r
                    .node
                    .forward_change(&owner, conv, by, &request, body)
                    .await
                {
                    Some(ForwardReply::Changed { seq, event_seq }) => {
                        // Applied here too before the answer.
                        let slot = self.conv_state(conv).await?;
                        let commit = self.wait_applied(r, conv, &slot, event_seq);
                        if tokio::time::timeout(LOCAL_APPLY_WAIT, commit)
                            .await
                            .is_err()
                        {
                            tracing::warn!(
                                conv,
                                event_seq,
                                "changed by the owner; not applied here yet"
                            );
                            self.fail_waiters(r, conv, event_seq);
                        }
                        return Ok((Changed { seq, event_seq }, Vec::new()));
                    }
                    Some(ForwardReply::Refused { code, message }) => {
                        return Err(RpcError::new(known_code(&code), message));
                    }
                    other => {
                        tracing::debug!(conv, partition = p, owner, reply = ?other, "forwarded change: retrying");
                    }
                }
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(RpcError::new(
                    "unavailable",
                    "no partition owner took the change in time; retry",
                ));
            }
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(Duration::from_millis(500));
        }
    }

    /// A change of message `seq` of `conv`, on the owner of its partition
    /// `p`: judged on this node's copy once it has applied everything
    /// sequenced before, then sequenced as a change record. `None` if
    /// this node turned out not to own `p`. The seqs to scrub are none:
    /// each node scrubs its own files as it applies the record.
    async fn change_owned(
        &self,
        r: &Arc<Replicated>,
        p: u32,
        conv: &str,
        seq: u64,
        who: Editor<'_>,
        change: &Change<'_>,
    ) -> Result<Option<(Changed, Vec<u64>)>, RpcError> {
        let slot = self.conv_state(conv).await?;
        let deadline = tokio::time::Instant::now() + LOCAL_APPLY_WAIT;
        let (owned, st) = loop {
            let Some((owned, st)) = self.owner_state(r, p, conv, &slot).await? else {
                return Ok(None);
            };
            // The copy has every record sequenced before (the applier
            // takes this lock: waited for without it).
            if slot.applied.load(Ordering::Acquire) >= st.record.head {
                break (owned, st);
            }
            drop(st);
            if tokio::time::Instant::now() >= deadline {
                return Err(RpcError::new(
                    "unavailable",
                    "this node is behind its own stream; retry",
                ));
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        };
        let (what, body) = match self.plan(conv, &st, seq, who, change).await? {
            Plan::Done(changed, _) => return Ok(Some((changed, Vec::new()))),
            Plan::Edit { .. } => match change {
                Change::Edit(body) => ("edit", (*body).clone()),
                Change::Delete => {
                    return Err(RpcError::new("internal", "a delete planned as an edit"))
                }
            },
            Plan::Delete { .. } => ("delete", Value::Null),
        };
        let n = st.record.head + 1;
        let by = who.name().to_string();
        let record = ChatRecord {
            conv: conv.to_string(),
            seq: n,
            sender: by.clone(),
            envelope_id: format!("{what}-{n}"),
            epoch: owned.epoch,
            node: r.node.node_id().to_string(),
            body: Bytes::from(super::edits::event(conv, n, what, &by, now_ms(), seq, body)),
        };
        let Some(commit) = self.publish_owned(r, p, &owned, st, record, None).await? else {
            return Ok(None);
        };
        commit.await?;
        Ok(Some((Changed { seq, event_seq: n }, Vec::new())))
    }

    /// Applies one record of partition `p`'s stream (stream seq `d.seq`):
    /// one batch with the message, the head, the idempotency key and the
    /// stream seq; fan-out to this node's sessions once it is durable.
    async fn apply_chat(&self, r: &Replicated, p: u32, stream: &str, d: Delivered) {
        let stream_seq = d.seq;
        let record = ChatRecord::parse(d.headers.as_ref(), d.payload).filter(|c| {
            namespace::valid_conv(&c.conv)
                && namespace::valid_user(&c.sender)
                && r.node.partition_of(&c.conv) == p
                && c.seq > 0
        });
        let Some(c) = record else {
            tracing::warn!(stream, stream_seq, "not a chat record: skipped");
            self.mark_only(r, StreamRef::Partition(p), stream, stream_seq)
                .await;
            return;
        };
        let slot = match self.conv_state(&c.conv).await {
            Ok(s) => s,
            Err(e) => {
                tracing::error!(error = %e, "applying a chat record: cannot read the conversation");
                return;
            }
        };
        let mut st = slot.state.clone().lock_owned().await;
        let applied = slot.applied.load(Ordering::Acquire);
        if c.seq <= applied {
            drop(st);
            self.mark_only(r, StreamRef::Partition(p), stream, stream_seq)
                .await;
            return;
        }
        if c.seq != applied + 1 {
            tracing::error!(conv = %c.conv, seq = c.seq, applied, "a gap in the conversation's seqs");
        }
        st.record.head = st.record.head.max(c.seq);
        let body: Option<Value> = serde_json::from_slice(&c.body).ok();
        // A change record (an edit, a delete) is the server's: it has no
        // idempotency key a member's message could collide with.
        let is_change = body
            .as_ref()
            .and_then(|b| b.get("type"))
            .and_then(Value::as_str)
            .is_some_and(super::edits::is_event_type);
        if !is_change {
            let sender: Arc<str> = Arc::from(c.sender.as_str());
            Self::remember(&mut st, (sender, c.envelope_id.clone()), c.seq);
        }
        let mut stored = st.record.clone();
        stored.head = c.seq;
        let inner = body
            .as_ref()
            .and_then(|b| b.get("body"))
            .cloned()
            .unwrap_or(Value::Null);
        let ts = body
            .as_ref()
            .and_then(|b| b.get("ts"))
            .and_then(Value::as_u64)
            .unwrap_or_else(now_ms);
        let mut batch = Batch::new();
        // An edit or delete rewrites its target in the same batch.
        let change = match &body {
            Some(envelope) => self.change_writes(&c.conv, envelope, &mut batch).await,
            None => None,
        };
        batch.put_message(&c.conv, c.seq, &c.body);
        batch.put_conversation(&c.conv, &stored);
        if !is_change {
            batch.put_dedup(&c.conv, &c.sender, &c.envelope_id, c.seq);
        }
        let refs = if is_change {
            Vec::new()
        } else {
            super::attachments::referenced_ids(&inner).unwrap_or_default()
        };
        for id in refs {
            batch.put_attachment_ref(&c.conv, c.seq, &id);
        }
        if c.seq == 1 {
            if let Some((a, b)) = namespace::direct_members(&c.conv) {
                batch.put_member(&c.conv, a, Role::Member);
                batch.put_member(&c.conv, b, Role::Member);
                {
                    let mut m = self.members_write();
                    m.add(&c.conv, a, Role::Member);
                    m.add(&c.conv, b, Role::Member);
                }
                self.join(&c.conv, a, 0);
                self.join(&c.conv, b, 0);
            }
        }
        // A push job once, by the node that sequenced it.
        if c.node == r.node.node_id() && !is_change {
            self.queue_pushes(&c.conv, &c.sender, c.seq, &inner, &mut batch);
        }
        batch.put_applied(stream, stream_seq);
        let failed = st.failed.clone();
        drop(st);
        let commit = self.store.submit(batch).await;
        self.metrics.chat_appended.fetch_add(1, Ordering::Relaxed);
        self.retention_due(&c.conv, &stored, ts);
        let msg = Arc::new(Message::from_server(
            format!("chat/{}", c.conv),
            c.body.clone(),
            QoS::AtLeastOnce,
            false,
        ));
        let (done, _out) = Commit::deferred();
        let shard = self.shard(&c.conv);
        let item = Dispatch::Message {
            conv: Arc::from(c.conv.as_str()),
            seq: c.seq,
            msg,
            commit,
            done,
            failed,
        };
        if shard.send(item).await.is_err() {
            return;
        }
        if let Some(change) = change {
            // Once durable (a barrier behind it): the replay cache and, for
            // a delete, this node's files lose the old texts, before the
            // node asked answers.
            let (done, after) = Commit::deferred();
            let ok = shard.send(Dispatch::Barrier(done)).await.is_ok() && after.await.is_ok();
            self.change_applied(&c.conv, change, ok).await;
        }
        let waiting = {
            let mut w = lock(&r.waiters);
            slot.applied.fetch_max(c.seq, Ordering::AcqRel);
            w.remove(&(Arc::from(c.conv.as_str()), c.seq))
        };
        for w in waiting.into_iter().flatten() {
            let _ = shard.send(Dispatch::Barrier(w)).await;
        }
        r.node.mark_applied(StreamRef::Partition(p), stream_seq);
    }

    /// A record that changes nothing here: only the stream seq moves.
    async fn mark_only(&self, r: &Replicated, s: StreamRef, stream: &str, stream_seq: u64) {
        let mut batch = Batch::new();
        batch.put_applied(stream, stream_seq);
        drop(self.store.submit(batch).await);
        r.node.mark_applied(s, stream_seq);
    }

    /// Publishes a membership, creation or read record and waits until
    /// this node applied it (so the caller's next read here sees it).
    pub(super) async fn replicate_meta(
        &self,
        r: &Replicated,
        record: MetaRecord,
    ) -> Result<(), RpcError> {
        let seq = r.node.publish_meta(&record).await.map_err(|e| {
            tracing::warn!(error = %e, "records stream: not acknowledged");
            RpcError::new("unavailable", "the cluster did not take the change; retry")
        })?;
        if !r
            .node
            .wait_applied(StreamRef::Records, seq, LOCAL_APPLY_WAIT)
            .await
        {
            tracing::warn!(seq, "records stream: acknowledged, not applied here yet");
        }
        Ok(())
    }

    /// Applies one record of the records stream. Every kind is
    /// idempotent (a create of an existing conversation, an add of a
    /// member, a remove of a non-member, a read below the stored one
    /// change nothing), so the stream seq is written after it.
    async fn apply_meta(&self, r: &Replicated, stream: &str, d: Delivered) {
        match MetaRecord::parse(&d.payload) {
            Some(MetaRecord::Create {
                conv,
                title,
                owner,
                members,
            }) => {
                if let Err(e) = self
                    .create_here(&conv, &title, owner.as_deref(), &members)
                    .await
                {
                    tracing::debug!(conv, code = e.code, "replicated create: nothing to do");
                }
            }
            Some(MetaRecord::Add { conv, users, by }) => {
                if let Err(e) = self.add_members_here(&conv, &users, by.as_deref()).await {
                    tracing::debug!(conv, code = e.code, "replicated add: nothing to do");
                }
            }
            Some(MetaRecord::Remove { conv, user, by }) => {
                if let Err(e) = self.remove_member_here(&conv, &user, by.as_deref()).await {
                    tracing::debug!(conv, code = e.code, "replicated remove: nothing to do");
                }
            }
            Some(MetaRecord::Read { user, conv, seq }) => {
                if let Err(e) = self.read_here(&user, &conv, seq).await {
                    tracing::debug!(conv, code = e.code, "replicated read: nothing to do");
                }
            }
            Some(MetaRecord::Device {
                user,
                platform,
                token,
                app_id,
                registered,
            }) => {
                self.apply_device(&user, &platform, &token, app_id.as_deref(), registered)
                    .await
            }
            Some(MetaRecord::React {
                conv,
                seq,
                user,
                emoji,
                add,
            }) => {
                // The records stream may run ahead of the partition's:
                // the message first, or it would be taken for gone.
                if !self.has_applied(&conv, seq).await {
                    tracing::warn!(
                        conv,
                        seq,
                        "replicated reaction to a message not applied here in time"
                    );
                }
                let key = (Arc::<str>::from(conv.as_str()), seq);
                if let Err(e) = self.react_here(&key, &user, &emoji, add).await {
                    tracing::debug!(conv, seq, code = e.code, "replicated reaction: not taken");
                }
            }
            Some(MetaRecord::Mute { user, conv, muted }) => {
                if namespace::valid_user(&user) && namespace::valid_conv(&conv) {
                    if let Err(e) = self.push.set_muted(&user, &conv, muted).await {
                        tracing::error!(error = %e, "replicated mute: not written");
                    }
                }
            }
            None => tracing::warn!(stream, seq = d.seq, "not a record: skipped"),
        }
        self.mark_only(r, StreamRef::Records, stream, d.seq).await;
    }

    /// Waits (up to [`LOCAL_APPLY_WAIT`]) until this node applied message
    /// `seq` of `conv`; false if it did not.
    async fn has_applied(&self, conv: &str, seq: u64) -> bool {
        if !namespace::valid_conv(conv) {
            return false;
        }
        let Ok(slot) = self.conv_state(conv).await else {
            return false;
        };
        let deadline = tokio::time::Instant::now() + LOCAL_APPLY_WAIT;
        while slot.applied.load(Ordering::Acquire) < seq {
            if tokio::time::Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        true
    }

    /// A device registration from the records stream (checked again: what
    /// comes from NATS is untrusted). Registering and forgetting are
    /// idempotent, and every node applies them in the stream's order, so
    /// all agree on whose each token is.
    async fn apply_device(
        &self,
        user: &str,
        platform: &str,
        token: &str,
        app_id: Option<&str>,
        registered: bool,
    ) {
        let Some(platform) = chatmq_bridge::push::Platform::parse(platform) else {
            tracing::warn!("replicated device: unknown platform, skipped");
            return;
        };
        if !namespace::valid_user(user) {
            return;
        }
        let outcome = if registered {
            self.push
                .register(user, platform, token, app_id)
                .await
                .map(drop)
        } else {
            self.push.unregister(user, platform, token).await.map(drop)
        };
        if let Err(e) = outcome {
            tracing::warn!(error = %e, "replicated device: not applied");
        }
    }

    /// The owner's side of a forwarded edit or delete: judged and made
    /// here as if asked here (the node asked checked membership; checked
    /// again).
    async fn serve_forwarded_change(
        &self,
        r: &Arc<Replicated>,
        f: &chatmq_cluster::Forwarded,
        request: &ChangeRequest,
    ) -> ForwardReply {
        if !namespace::valid_conv(&f.conv) || (!request.admin && !namespace::valid_user(&f.sender))
        {
            return ForwardReply::Bad;
        }
        let who = if request.admin {
            Editor::Admin
        } else {
            Editor::User(&f.sender)
        };
        let body: Value;
        let change = if request.edit {
            match serde_json::from_slice::<Value>(&f.envelope) {
                Ok(b) => {
                    body = b;
                    Change::Edit(&body)
                }
                Err(_) => return ForwardReply::Bad,
            }
        } else {
            Change::Delete
        };
        let p = r.node.partition_of(&f.conv);
        match self
            .change_owned(r, p, &f.conv, request.target, who, &change)
            .await
        {
            Ok(Some((changed, _))) => ForwardReply::Changed {
                seq: changed.seq,
                event_seq: changed.event_seq,
            },
            Ok(None) => ForwardReply::NotOwner,
            Err(e) => ForwardReply::Refused {
                code: e.code.to_string(),
                message: e.message.chars().take(200).collect(),
            },
        }
    }

    /// The owner's side of a forwarded publish.
    async fn serve_forwarded(self: &Arc<Self>, r: &Arc<Replicated>, f: chatmq_cluster::Forwarded) {
        if let Some(request) = f.change.clone() {
            let reply = self.serve_forwarded_change(r, &f, &request).await;
            r.node.respond(f, reply).await;
            return;
        }
        let reply = match Envelope::parse(&f.envelope) {
            // (The server's change records come only as changes.)
            Ok(envelope) if super::edits::is_event_type(&envelope.kind) => ForwardReply::Bad,
            Ok(envelope) if namespace::valid_conv(&f.conv) && namespace::valid_user(&f.sender) => {
                let p = r.node.partition_of(&f.conv);
                let from: Arc<str> = Arc::from(f.sender.as_str());
                match self.append_owned(r, p, &f.conv, &from, &envelope).await {
                    Ok(Some((commit, seq))) => match commit.await {
                        Ok(()) => ForwardReply::Ok { seq },
                        Err(_) => ForwardReply::Failed,
                    },
                    Ok(None) => ForwardReply::NotOwner,
                    Err(_) => ForwardReply::Failed,
                }
            }
            _ => ForwardReply::Bad,
        };
        r.node.respond(f, reply).await;
    }
}

/// An error code another node answered, as one of the RPC's own.
fn known_code(code: &str) -> &'static str {
    const CODES: [&str; 9] = [
        "not_found",
        "not_editable",
        "forbidden",
        "deleted",
        "too_many_edits",
        "not_member",
        "bad_request",
        "unavailable",
        "internal",
    ];
    CODES.into_iter().find(|c| *c == code).unwrap_or("internal")
}

/// Runs the cluster side of the chat layer until `shutdown`: one applier
/// per partition and one for the records stream, each from where this
/// node's copy stands; the forwarded publishes; the leases.
pub async fn run(chat: Arc<Chat>, shutdown: watch::Receiver<bool>) {
    let Some(r) = chat.replicated() else { return };
    let node = r.node.clone();
    let mut tasks = tokio::task::JoinSet::new();
    let streams: Vec<StreamRef> = (0..node.layout().partitions())
        .map(StreamRef::Partition)
        .chain([StreamRef::Records])
        .collect();
    for s in streams {
        let name = node.stream_name(s);
        let from = {
            let n = name.clone();
            match blocking::read(&chat.store, move |st| st.applied(&n)).await {
                Ok(v) => v,
                Err(e) => {
                    tracing::error!(stream = %name, error = %e, "cannot read where this copy stands");
                    return;
                }
            }
        };
        node.mark_applied(s, from);
        let mut rx = node.consume(s, from + 1, shutdown.clone());
        let (chat, r) = (chat.clone(), r.clone());
        tasks.spawn(async move {
            while let Some(d) = rx.recv().await {
                match s {
                    StreamRef::Partition(p) => chat.apply_chat(&r, p, &name, d).await,
                    StreamRef::Records => chat.apply_meta(&r, &name, d).await,
                    // (Applied by the broker: `crate::remote`.)
                    StreamRef::Retained => {}
                }
            }
        });
    }
    match node.serve_forwarded().await {
        Ok(mut rx) => {
            let (chat, r) = (chat.clone(), r.clone());
            tasks.spawn(async move {
                while let Some(f) = rx.recv().await {
                    let (chat, r) = (chat.clone(), r.clone());
                    tokio::spawn(async move { chat.serve_forwarded(&r, f).await });
                }
            });
        }
        Err(e) => tracing::error!(error = %e, "cannot serve forwarded publishes"),
    }
    tasks.spawn(node.clone().run_leases(shutdown.clone()));
    {
        let (node, stop) = (node.clone(), shutdown.clone());
        tasks.spawn(async move { node.catch_up(stop).await });
    }
    let mut stop = shutdown;
    let _ = stop.changed().await;
    // The leases are given back by their task; the others end with it.
    let _ = tokio::time::timeout(Duration::from_secs(5), async {
        while tasks.join_next().await.is_some() {}
    })
    .await;
}
