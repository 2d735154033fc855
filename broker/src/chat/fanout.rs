//! Fan-out: the dispatcher shards that wait for each appended message's
//! commit, in append order, and only then offer it to the online members'
//! sessions and resolve the publisher's ack; and the delivery of the
//! server's own messages (events, typing, presence) to connected sessions.
//! Nothing here decides who is a member or gives a seq.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use chatmq_storage::{Batch, Commit, CommitSender};
use rumqttc::v5::mqttbytes::QoS;
use serde_json::Value;
use tokio::sync::mpsc;

use super::namespace::wanted_qos;
use super::{lock, Chat};
use crate::broker::SessionCell;
use crate::message::{min_qos, Message};
use crate::session::Offer;

/// Appended messages waiting in each dispatcher shard.
pub(super) const DISPATCH_QUEUE: usize = 1024;
/// Dispatcher shards: one task each, conversations spread by hash.
pub const DISPATCH_SHARDS: usize = 16;
/// Sessions a fan-out offers a message to before it lets the worker run
/// other tasks: a 10,000-member group does not hold a worker for the
/// whole fan-out.
const FAN_OUT_STEP: usize = 256;

pub(super) enum Dispatch {
    Message {
        conv: Arc<str>,
        seq: u64,
        msg: Arc<Message>,
        commit: Commit,
        done: CommitSender,
        /// The conversation's [`ConvState::failed`].
        failed: Arc<AtomicBool>,
    },
    /// Resolves once everything appended before it is durable and out.
    Barrier(CommitSender),
}

/// Chat deliveries are at most QoS 1: the (conv, seq) pair already gives
/// exactly-once to a client that deduplicates, and a QoS 2 packet id must
/// not be reused after a restart, which replay from the log cannot promise.
pub(super) fn chat_qos(published: QoS, subscribed: QoS) -> QoS {
    min_qos(min_qos(published, subscribed), QoS::AtLeastOnce)
}

impl Chat {
    /// The dispatcher shard of `conv`: every append and barrier of one
    /// conversation goes through the same queue, so they stay in order.
    pub(super) fn shard(&self, conv: &str) -> &mpsc::Sender<Dispatch> {
        use std::hash::{Hash, Hasher};
        let mut h = std::collections::hash_map::DefaultHasher::new();
        conv.hash(&mut h);
        let i = (h.finish() % self.dispatch.len() as u64) as usize;
        &self.dispatch[i]
    }

    /// Runs the dispatcher shards until the broker stops: in each, commits
    /// are awaited in append order, then messages go out.
    ///
    /// The shards run on a thread and runtime of their own. On the
    /// connections' runtime a shard woken by a commit waited behind every
    /// connection task a large fan-out had woken (the pick-up of a small
    /// conversation's commit measured 15 ms at p99 beside a 1,000-member
    /// group); a thread that is mostly idle is run by the OS as soon as it
    /// is woken. Catch-ups still start on the connections' runtime.
    pub async fn run_dispatcher(self: Arc<Self>, shutdown: tokio::sync::watch::Receiver<bool>) {
        let queues: Vec<_> = lock(&self.dispatch_rx).drain(..).collect();
        let _ = self.runtime.set(tokio::runtime::Handle::current());
        let (done, finished) = tokio::sync::oneshot::channel::<()>();
        let chat = self.clone();
        let stop = shutdown.clone();
        let thread = std::thread::Builder::new()
            .name("chatmq-dispatch".into())
            .spawn(move || {
                // Timers only: the shards do no I/O of their own, and an
                // I/O driver would hold descriptors (an epoll and a waker).
                match tokio::runtime::Builder::new_current_thread()
                    .enable_time()
                    .build()
                {
                    Ok(rt) => rt.block_on(chat.run_shards(queues, stop)),
                    Err(e) => tracing::error!(error = %e, "cannot start the chat dispatcher"),
                }
                drop(done);
            });
        if let Err(e) = thread {
            tracing::error!(error = %e, "cannot start the chat dispatcher thread");
            return;
        }
        let _ = finished.await;
    }

    async fn run_shards(
        self: Arc<Self>,
        queues: Vec<mpsc::Receiver<Dispatch>>,
        shutdown: tokio::sync::watch::Receiver<bool>,
    ) {
        let mut shards = tokio::task::JoinSet::new();
        for rx in queues {
            shards.spawn(self.clone().run_shard(rx, shutdown.clone()));
        }
        while shards.join_next().await.is_some() {}
    }

    async fn run_shard(
        self: Arc<Self>,
        mut rx: mpsc::Receiver<Dispatch>,
        mut shutdown: tokio::sync::watch::Receiver<bool>,
    ) {
        loop {
            let item = tokio::select! {
                _ = shutdown.changed() => return,
                item = rx.recv() => match item { Some(i) => i, None => return },
            };
            match item {
                Dispatch::Barrier(done) => done.resolve(Ok(())),
                Dispatch::Message {
                    conv,
                    seq,
                    msg,
                    commit,
                    done,
                    failed,
                } => match commit.await {
                    Ok(()) => {
                        if let Some(slot) = lock(&self.convs).get(&conv) {
                            slot.durable_head.fetch_max(seq, Ordering::AcqRel);
                        }
                        self.fan_out(&conv, seq, &msg).await;
                        done.resolve(Ok(()));
                    }
                    Err(e) => {
                        tracing::error!(error = %e, conv = %conv, seq, "chat commit failed");
                        failed.store(true, Ordering::Release);
                        done.resolve(Err(e));
                    }
                },
            }
        }
    }

    /// The connected sessions of `users`.
    pub(super) fn audience(&self, users: &[Arc<str>]) -> Vec<Arc<SessionCell>> {
        let online = lock(&self.online);
        users
            .iter()
            .filter_map(|u| online.get(u))
            .flatten()
            .cloned()
            .collect()
    }

    async fn fan_out(self: &Arc<Self>, conv: &Arc<str>, seq: u64, msg: &Arc<Message>) {
        let members = self.members(conv);
        let audience = self.audience(&members);
        if audience.len() > 1 {
            msg.mark_shared();
        }
        for (i, cell) in audience.into_iter().enumerate() {
            if i > 0 && i % FAN_OUT_STEP == 0 {
                tokio::task::yield_now().await;
            }
            let offer = {
                let mut slot = cell.lock();
                let s = &mut slot.session;
                let Some(qos) = wanted_qos(s.subscriptions.iter(), &msg.topic) else {
                    continue;
                };
                let qos = chat_qos(msg.qos, qos);
                let mut batch = Batch::new();
                let before = s.dropped;
                let offer = s.offer_chat(conv, seq, msg.clone(), qos, true, &mut batch);
                self.count_dropped(before, s.dropped);
                drop(self.store.submit_now(batch));
                offer
            };
            match offer {
                Offer::Queued => cell.wake_up(),
                Offer::Gap(_) => self.start_catch_up(&cell, conv),
                Offer::Full => {
                    self.metrics
                        .chat_deferred_to_log
                        .fetch_add(1, Ordering::Relaxed);
                }
                Offer::Duplicate => {}
            }
        }
    }

    /// Queues `msg` for every connected session of `users` that subscribed
    /// to its topic, except the client `skip`.
    pub(super) fn deliver(&self, users: &[Arc<str>], msg: &Arc<Message>, skip: Option<&str>) {
        let audience = self.audience(users);
        let fan_out = audience.len() > 1;
        let mut batch = Batch::new();
        let mut dropped = 0;
        for cell in audience {
            if skip == Some(&*cell.client_id) {
                continue;
            }
            let wanted = wanted_qos(cell.lock().session.subscriptions.iter(), &msg.topic);
            if let Some(q) = wanted {
                let qos = min_qos(msg.qos, q);
                dropped += cell.deliver(msg, qos, msg.retain, vec![], fan_out, &mut batch);
            }
        }
        self.count_dropped(0, dropped);
        drop(self.store.submit_now(batch));
    }

    /// An event for `user` on `users/{user}/events` (QoS 1) to each of its
    /// connected sessions subscribed there.
    pub fn send_event(&self, user: &str, event: Value) {
        self.send_payload(user, Bytes::from(event.to_string()));
    }

    fn send_payload(&self, user: &str, payload: Bytes) {
        let msg = Arc::new(Message::from_server(
            format!("users/{user}/events"),
            payload,
            QoS::AtLeastOnce,
            false,
        ));
        self.deliver(&[Arc::from(user)], &msg, None);
    }

    /// The same event to each of `users` (serialised once).
    pub(super) fn announce(&self, users: &[Arc<str>], event: Value) {
        let payload = Bytes::from(event.to_string());
        for u in users {
            self.send_payload(u, payload.clone());
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use chatmq_bridge::push::Push;
    use chatmq_storage::{StorageError, Store, SyncMode};

    use super::*;
    use crate::broker::Metrics;
    use crate::chat::sequencer::tests::envelope;

    // Issue #11 item 3: conversations are sequenced and fanned out in
    // shards. A conversation whose commit hangs (here: one that never
    // resolves) holds up its own shard only: another conversation's
    // message is acknowledged meanwhile.
    #[tokio::test]
    async fn a_stuck_conversation_does_not_hold_up_the_others() {
        let dir = tempfile::tempdir().expect("temp dir");
        let store =
            Store::open(dir.path(), SyncMode::Never, Duration::from_millis(5)).expect("store");
        let push = Push::open(store.clone(), &Default::default()).expect("push");
        let chat = Arc::new(Chat::new(store, Arc::new(Metrics::default()), push).expect("chat"));
        let (_stop, watch) = tokio::sync::watch::channel(false);
        tokio::spawn(chat.clone().run_dispatcher(watch));

        let stuck = "stuck";
        let (_never, hanging) = Commit::deferred();
        let (done, stuck_acked) = Commit::deferred();
        let item = Dispatch::Message {
            conv: stuck.into(),
            seq: 1,
            msg: Arc::new(Message::from_server(
                "chat/stuck".into(),
                Bytes::new(),
                QoS::AtLeastOnce,
                false,
            )),
            commit: hanging,
            done,
            failed: Arc::default(),
        };
        assert!(chat.shard(stuck).send(item).await.is_ok());

        let other = (0..DISPATCH_SHARDS * 8)
            .map(|i| format!("room-{i}"))
            .find(|c| !std::ptr::eq(chat.shard(c), chat.shard(stuck)))
            .expect("a conversation on another shard");
        chat.create(&other, "t", Some("alice"), &[])
            .await
            .expect("room");
        let (commit, seq) = chat
            .append(&other, &"alice".into(), &envelope("m1"), QoS::AtLeastOnce)
            .await
            .expect("appended");
        assert_eq!(seq, 1);
        let acked = tokio::time::timeout(Duration::from_secs(10), commit).await;
        assert!(matches!(acked, Ok(Ok(()))), "held up by the stuck shard");

        // The stuck conversation's own shard still waits, in order.
        let mut stuck_acked = stuck_acked;
        assert!(resolved_now(&mut stuck_acked).is_none());
    }

    fn resolved_now(c: &mut Commit) -> Option<Result<(), StorageError>> {
        use std::future::Future;
        let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
        match std::pin::Pin::new(c).poll(&mut cx) {
            std::task::Poll::Ready(r) => Some(r),
            std::task::Poll::Pending => None,
        }
    }
}
