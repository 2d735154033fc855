//! Occupancy (issue #13 item 4): how many members a conversation has and
//! how many of them are connected now (a user with at least one connected
//! session counts once). On request (the RPC `occupancy`, `GET
//! /v1/conversations/{id}/occupancy`), and as updates on
//! `occupancy/{conv}` to the members who subscribe there: the current
//! value at once when they subscribe, then at most one update per
//! `chat.occupancy_window_ms` while it changes (`announcements.rs` keeps
//! the windows). Only conversations someone subscribed to are watched,
//! so a user coming online costs a lookup per conversation of theirs, and
//! a conversation nobody watches any more is forgotten at its next update.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use bytes::Bytes;
use rumqttc::v5::mqttbytes::QoS;
use serde_json::{json, Value};

use super::namespace::wanted_qos;
use super::{lock, Chat};
use crate::message::Message;

impl Chat {
    /// `{"conv","members","connected"}` now.
    pub fn occupancy(&self, conv: &str) -> Value {
        let members = self.members(conv);
        let connected = {
            let online = lock(&self.online);
            members
                .iter()
                .filter(|m| online.contains_key(*m) || self.online_elsewhere(m))
                .count()
        };
        json!({"conv": conv, "members": members.len(), "connected": connected})
    }

    pub(super) fn occupancy_message(&self, conv: &str, retain: bool) -> Arc<Message> {
        Arc::new(Message::from_server(
            format!("occupancy/{conv}"),
            Bytes::from(self.occupancy(conv).to_string()),
            QoS::AtMostOnce,
            retain,
        ))
    }

    /// A member subscribed to `occupancy/{conv}`: watched from now on.
    pub(super) fn watch_occupancy(&self, conv: &str) {
        lock(&self.occupancy_watched).insert(conv.into());
    }

    /// `user` came online or went offline: each watched conversation of
    /// theirs is due an update.
    pub(super) fn occupancy_of_user_changed(&self, user: &str) {
        let watched: Vec<Arc<str>> = {
            let w = lock(&self.occupancy_watched);
            if w.is_empty() {
                return;
            }
            self.conversations_of(user)
                .into_iter()
                .filter(|c| w.contains(c))
                .collect()
        };
        for conv in watched {
            self.occupancy_due(&conv);
        }
    }

    /// `conv`'s members changed.
    pub(super) fn occupancy_changed(&self, conv: &str) {
        if lock(&self.occupancy_watched).contains(conv) {
            self.occupancy_due(conv);
        }
    }

    /// Sends `conv`'s occupancy to its members subscribed to it; forgets
    /// the conversation when none is.
    pub(super) fn flush_occupancy(&self, conv: &Arc<str>) {
        let msg = self.occupancy_message(conv, false);
        let members = self.members(conv);
        let watching = self
            .audience(&members)
            .iter()
            .any(|cell| wanted_qos(cell.lock().session.subscriptions.iter(), &msg.topic).is_some());
        if !watching {
            lock(&self.occupancy_watched).remove(conv);
            return;
        }
        self.deliver(&members, &msg, None);
        self.metrics
            .occupancy_updates
            .fetch_add(1, Ordering::Relaxed);
    }
}
