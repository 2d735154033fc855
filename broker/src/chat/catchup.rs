//! Catch-up: a session that lacks earlier seqs of a conversation (it
//! resumed, fell behind, or its window filled) reads them from the log, a
//! window at a time, until it meets live delivery without gap or
//! duplicate; and the cursors a session starts from when it first
//! receives a conversation.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use chatmq_storage::{Batch, StorageError};
use rumqttc::v5::mqttbytes::QoS;
use serde_json::json;

use super::fanout::chat_qos;
use super::namespace::wanted_qos;
use super::replay_pages::Served;
use super::{lock, Chat};
use crate::blocking;
use crate::broker::SessionCell;
use crate::session::{Offer, Session};

/// Most messages a replay keeps waiting in one session; it continues as
/// the client acknowledges them, so a long absence costs bounded memory.
pub const REPLAY_WINDOW: usize = 1024;

/// Conversation heads read for [`Chat::seed`].
#[derive(Default)]
pub struct Heads(HashMap<Arc<str>, u64>);

impl Chat {
    /// Starts replaying `conv` from the log into `cell`'s session, unless a
    /// replay of it is already running there.
    pub fn start_catch_up(self: &Arc<Self>, cell: &Arc<SessionCell>, conv: &Arc<str>) {
        if cell.lock().session.catching_up.insert(conv.clone()) {
            let replay = self.clone().catch_up(cell.clone(), conv.clone());
            match self.runtime.get() {
                Some(main) => drop(main.spawn(replay)),
                None => drop(tokio::spawn(replay)),
            }
        }
    }

    /// Replays `conv` from the log into a session that is behind, a window
    /// at a time (at most [`REPLAY_WINDOW`] messages waiting in the
    /// session; it continues as the client drains them), then lets live
    /// delivery continue. If retention already dropped part of what it
    /// missed, the session's user gets a `gap` event saying what.
    async fn catch_up(self: Arc<Self>, cell: Arc<SessionCell>, conv: Arc<str>) {
        let topic = format!("chat/{conv}");
        let finish = |paused: bool| {
            let mut slot = cell.lock();
            slot.session.catching_up.remove(&conv);
            if paused {
                slot.session.replay_paused.insert(conv.clone());
            }
        };
        let next = || {
            cell.lock()
                .session
                .chat
                .get(&conv)
                .map_or(1, |c| c.queued + 1)
        };
        if let Ok((_, first)) = self.bounds(&conv).await {
            let from = next();
            if from < first {
                let owner = cell.lock().session.owner.clone();
                if let Some(user) = owner {
                    self.send_event(
                        &user,
                        json!({"type": "gap", "conv": &*conv, "from": from, "to": first.saturating_sub(1)}),
                    );
                }
                let mut slot = cell.lock();
                let c = slot.session.chat.entry(conv.clone()).or_default();
                c.queued = c.queued.max(first.saturating_sub(1));
                c.acked = c.acked.max(first.saturating_sub(1));
            }
        }
        // After the flag is cleared, one more read: a live message that found
        // the replay running was committed (and counted in the durable head)
        // before it was offered, so this read sees it.
        let mut last_pass = false;
        // Where the last page ended: a page with holes (a lost seq) is not
        // read again for them.
        let mut read_from = 0;
        loop {
            let from = next().max(read_from);
            if cell.lock().session.is_full() {
                return finish(true);
            }
            let page = self.replay_page(&conv, from).await;
            let page = match page {
                Ok(p) => p,
                Err(e) => {
                    tracing::error!(error = %e, "catch-up read failed");
                    return finish(false);
                }
            };
            read_from = page.next;
            let mut queued = false;
            let mut session_full = false;
            {
                let mut slot = cell.lock();
                if slot.link.is_none() {
                    drop(slot);
                    return finish(false); // gone again; it resumes from its cursor
                }
                let s = &mut slot.session;
                let Some(sub_qos) = wanted_qos(s.subscriptions.iter(), &topic) else {
                    drop(slot);
                    return finish(false);
                };
                let qos = chat_qos(QoS::AtLeastOnce, sub_qos);
                let mut batch = Batch::new();
                let before = s.dropped;
                for (seq, msg) in page.entries {
                    match s.offer_chat(&conv, seq, msg, qos, false, &mut batch) {
                        Offer::Queued => queued = true,
                        Offer::Full => {
                            session_full = true;
                            break;
                        }
                        Offer::Duplicate | Offer::Gap(_) => {}
                    }
                }
                self.count_dropped(before, s.dropped);
                drop(self.store.submit_now(batch));
            }
            if queued {
                cell.wake_up();
            }
            if session_full {
                // The rest waits in the log until the client drains.
                return finish(true);
            }
            if !page.complete {
                if last_pass {
                    return;
                }
                finish(false);
                last_pass = true;
            }
        }
    }

    /// The messages of `conv` from `from` to the end of their page, shared
    /// with the other sessions replaying it (`chat/replay_pages.rs`).
    async fn replay_page(&self, conv: &Arc<str>, from: u64) -> Result<Served, StorageError> {
        // The durable head: every message offered live so far is at or
        // below it. Unknown once the state left memory: read storage.
        let known = lock(&self.convs)
            .get(conv)
            .map_or(u64::MAX, |slot| slot.durable_head.load(Ordering::Acquire));
        let page = self.replay.read(&self.store, conv, from, known).await?;
        if page.read {
            self.metrics
                .replay_pages_read
                .fetch_add(1, Ordering::Relaxed);
        } else if page.shared {
            self.metrics
                .replay_pages_shared
                .fetch_add(1, Ordering::Relaxed);
        }
        Ok(page)
    }

    /// Resumes replays that paused on a full window once the session has
    /// drained to half of it. Called after each send.
    pub fn refill(self: &Arc<Self>, cell: &Arc<SessionCell>) {
        let paused: Vec<Arc<str>> = {
            let mut slot = cell.lock();
            let s = &mut slot.session;
            if s.replay_paused.is_empty() || !s.has_room_for_replay() {
                return;
            }
            std::mem::take(&mut s.replay_paused).into_iter().collect()
        };
        for conv in paused {
            self.start_catch_up(cell, &conv);
        }
    }

    /// The committed heads of `user`'s conversations that `cell` has no
    /// cursor for, read off the async workers before a SUBSCRIBE takes the
    /// session lock (see [`Chat::seed`]).
    pub async fn heads_for_seed(&self, user: &str, cell: &SessionCell) -> Heads {
        let convs: Vec<Arc<str>> = {
            let slot = cell.lock();
            self.conversations_of(user)
                .into_iter()
                .filter(|c| !slot.session.chat.contains_key(c))
                .collect()
        };
        if convs.is_empty() {
            return Heads::default();
        }
        let read = blocking::read(&self.store, move |s| {
            convs
                .into_iter()
                .map(|c| Ok((s.conversation(&c)?.map_or(0, |r| r.head), c)))
                .map(|r: Result<_, StorageError>| r.map(|(h, c)| (c, h)))
                .collect::<Result<HashMap<_, _>, _>>()
        })
        .await;
        match read {
            Ok(heads) => Heads(heads),
            Err(e) => {
                tracing::error!(error = %e, "cannot read conversation heads");
                Heads::default()
            }
        }
    }

    /// `session` of `user` is subscribing: every conversation of the user
    /// it now receives and has no cursor for starts at its committed head,
    /// so an offline spell later is replayed on resume. `heads` were read
    /// just before the session lock was taken; a message committed in
    /// between has a higher seq and reaches the session through a
    /// catch-up, so nothing appended after SUBACK is ever mistaken for one
    /// the session already had. A conversation joined in that instant
    /// (absent from `heads`) starts from its cached state, or the log.
    pub fn seed(&self, user: &str, session: &mut Session, heads: &Heads, batch: &mut Batch) {
        for conv in self.conversations_of(user) {
            if !session.lacks_cursor(&conv) {
                continue;
            }
            let head = heads.0.get(&conv).copied().unwrap_or_else(|| {
                lock(&self.convs)
                    .get(&conv)
                    .map_or(0, |slot| slot.durable_head.load(Ordering::Acquire))
            });
            session.start_cursor(&conv, head, batch);
        }
    }
}
