//! Presence: who is online (a user with at least one connected session),
//! the retained-like `presence/{user}` messages, and who is told of a
//! change (users who watch presence and share a conversation).
//!
//! A user's changes are told at most once per `chat.announce_window_ms`
//! (issue #11 item 3): the first change goes out at once and opens a
//! window; changes within it only update what [`Chat::presence_for`]
//! answers, and when the window ends the latest state goes out if it
//! differs from what was told (opening another window), else nothing. So a
//! member who flaps costs its watchers one delivery per window, not one per
//! flap, and a flap that ends where it began costs none, unless a new
//! subscription was given the user's state meanwhile (it may have been
//! given the flap's middle): then the window's end tells the latest state.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use rumqttc::v5::mqttbytes::QoS;
use serde_json::json;
use tokio::sync::{watch, Notify};

use super::{lock, namespace, Chat};
use crate::broker::SessionCell;
use crate::clock::now_ms;
use crate::deadlines::{wait_for, Deadlines};
use crate::message::Message;

/// The users whose presence was told less than a window ago.
#[derive(Default)]
pub(super) struct PresenceWindows {
    /// User -> the state told when its window opened (online or not).
    told: Mutex<HashMap<Arc<str>, bool>>,
    /// Users whose state a new subscription was given while their window
    /// was open (`presence_for`): that state may be one the window's end
    /// would not tell (a flap back to what was told), so the end tells
    /// the latest state to them as well.
    served: Mutex<std::collections::HashSet<Arc<str>>>,
    /// When each user's window ends.
    deadlines: Mutex<Deadlines>,
    /// Woken when a window ends before every other.
    wake: Notify,
}

impl Chat {
    /// A session of `user` is connected: it is now reached by fan-out,
    /// resumes every conversation it has a cursor for, and the user is
    /// online.
    pub fn session_online(self: &Arc<Self>, user: &Arc<str>, cell: &Arc<SessionCell>) {
        let first = {
            let mut online = lock(&self.online);
            let cells = online.entry(user.clone()).or_default();
            cells.retain(|c| !Arc::ptr_eq(c, cell) && c.client_id != cell.client_id);
            cells.push(cell.clone());
            cells.len() == 1
        };
        self.register(user, cell);
        // What is still queued or in flight goes out again from the session
        // itself (resend with DUP); the log supplies what came after it.
        // After a restart `queued` is the persisted cursor.
        let resume: Vec<Arc<str>> = {
            let mut slot = cell.lock();
            slot.session.replay_paused.clear();
            for filter in slot.session.subscriptions.keys() {
                self.watch_presence(user, filter);
            }
            slot.session.chat.keys().cloned().collect()
        };
        for conv in resume {
            if self.is_member(&conv, user) {
                self.start_catch_up(cell, &conv);
            }
        }
        if first {
            self.live_send(chatmq_cluster::live::Live::Presence {
                user: user.to_string(),
                online: true,
            });
            if !self.online_elsewhere(user) {
                self.set_presence(user, true);
                self.occupancy_of_user_changed(user);
            }
        }
    }

    /// A session of `user` ended; the user goes offline with the last one.
    pub fn session_offline(&self, user: &Arc<str>, cell: &Arc<SessionCell>) {
        let last = {
            let mut online = lock(&self.online);
            let Some(cells) = online.get_mut(user) else {
                return;
            };
            cells.retain(|c| !Arc::ptr_eq(c, cell));
            let empty = cells.is_empty();
            if empty {
                online.remove(user);
                lock(&self.watchers).remove(user);
            }
            empty
        };
        if last {
            self.live_send(chatmq_cluster::live::Live::Presence {
                user: user.to_string(),
                online: false,
            });
            if !self.online_elsewhere(user) {
                self.set_presence(user, false);
                self.occupancy_of_user_changed(user);
            }
        }
    }

    fn presence_message(user: &str, online: bool, ts: u64) -> Arc<Message> {
        let status = if online { "online" } else { "offline" };
        Arc::new(Message::from_server(
            format!("presence/{user}"),
            Bytes::from(json!({"status": status, "ts": ts}).to_string()),
            QoS::AtMostOnce,
            true,
        ))
    }

    pub(super) fn set_presence(&self, user: &Arc<str>, online: bool) {
        let ts = now_ms();
        lock(&self.presence).insert(user.clone(), (online, ts));
        {
            let mut told = lock(&self.presence_windows.told);
            if told.contains_key(user) {
                // Told less than a window ago: the window's end tells the
                // latest state.
                self.metrics
                    .presence_coalesced
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                return;
            }
            told.insert(user.clone(), online);
        }
        self.open_presence_window(user, ts);
        self.tell_presence(user, online, ts);
    }

    fn open_presence_window(&self, user: &Arc<str>, now: u64) {
        let at = now.saturating_add(self.announcements.window_ms);
        if lock(&self.presence_windows.deadlines).schedule(user, at) {
            self.presence_windows.wake.notify_one();
        }
    }

    /// `user`'s window ended: its latest state goes out if it is not what
    /// was told.
    fn close_presence_window(&self, user: &Arc<str>) {
        let (online, ts) = {
            let mut told = lock(&self.presence_windows.told);
            // Read under `told`: a change that found the window open has
            // updated `presence` before it looked, so it is seen here.
            let (online, ts) = lock(&self.presence)
                .get(user)
                .copied()
                .unwrap_or((false, 0));
            let served = lock(&self.presence_windows.served).remove(user);
            match told.get_mut(user) {
                Some(last) if *last != online || served => *last = online,
                _ => {
                    told.remove(user);
                    return;
                }
            }
            (online, ts)
        };
        self.open_presence_window(user, now_ms());
        self.tell_presence(user, online, ts);
    }

    /// Delivers `user`'s presence to the users who watch it.
    fn tell_presence(&self, user: &Arc<str>, online: bool, ts: u64) {
        let msg = Self::presence_message(user, online, ts);
        let viewers: Vec<Arc<str>> = {
            let members = self.members_read();
            let watchers = lock(&self.watchers);
            // Whichever is smaller: the users watching presence, each
            // checked for a shared conversation, or the user's contacts.
            if watchers.len() <= members.contact_bound(user) {
                watchers
                    .iter()
                    .filter(|w| *w == user || members.share(w, user))
                    .cloned()
                    .collect()
            } else {
                let mut all: Vec<Arc<str>> = members
                    .contacts(user)
                    .into_iter()
                    .filter(|c| watchers.contains(c))
                    .collect();
                if !all.contains(user) && watchers.contains(user) {
                    all.push(user.clone());
                }
                all
            }
        };
        self.deliver(&viewers, &msg, None);
    }

    /// A session of `user` subscribed to `filter` (or came online with it):
    /// it may want presence changes from now on.
    pub fn watch_presence(&self, user: &Arc<str>, filter: &str) {
        use namespace::{filter_scope, FilterScope, Topic};
        let reaches = match filter_scope(filter) {
            FilterScope::Wild => true,
            FilterScope::Reserved(Topic::Presence(_), _) => true,
            _ => false,
        };
        if reaches {
            lock(&self.watchers).insert(user.clone());
        }
    }

    /// The presence (retained) messages a new `presence/...` subscription
    /// of `viewer` gets: every user it shares a conversation with.
    pub fn presence_for(&self, viewer: &str, filter: &str) -> Vec<Arc<Message>> {
        let contacts = self.members_read().contacts(viewer);
        let told = lock(&self.presence_windows.told);
        let mut served = lock(&self.presence_windows.served);
        let presence = lock(&self.presence);
        contacts
            .iter()
            .chain(std::iter::once(&Arc::<str>::from(viewer)))
            .filter_map(|u| {
                let t = format!("presence/{u}");
                if !crate::topic::matches(filter, &t) {
                    return None;
                }
                let (online, ts) = presence.get(u).copied().unwrap_or((false, 0));
                if told.contains_key(u) {
                    served.insert(u.clone());
                }
                Some(Self::presence_message(u, online, ts))
            })
            .collect()
    }
}

/// Ends presence windows as they fall due, until the broker stops.
pub async fn run(chat: Arc<Chat>, mut shutdown: watch::Receiver<bool>) {
    loop {
        let due = lock(&chat.presence_windows.deadlines).take_due(now_ms());
        for user in due {
            chat.close_presence_window(&user);
            tokio::task::yield_now().await;
        }
        let next = lock(&chat.presence_windows.deadlines).next();
        if !wait_for(next, &chat.presence_windows.wake, &mut shutdown).await {
            return;
        }
    }
}
