//! Presence: who is online (a user with at least one connected session),
//! the retained-like `presence/{user}` messages, and who is told of a
//! change (users who watch presence and share a conversation).

use std::sync::Arc;

use bytes::Bytes;
use rumqttc::v5::mqttbytes::QoS;
use serde_json::json;

use super::{lock, namespace, Chat};
use crate::broker::SessionCell;
use crate::clock::now_ms;
use crate::message::Message;

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
            self.set_presence(user, true);
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
            self.set_presence(user, false);
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

    fn set_presence(&self, user: &Arc<str>, online: bool) {
        let ts = now_ms();
        lock(&self.presence).insert(user.clone(), (online, ts));
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
                Some(Self::presence_message(u, online, ts))
            })
            .collect()
    }
}
