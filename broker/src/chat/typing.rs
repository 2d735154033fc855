//! Typing indicators: how often one user's indicator in one conversation
//! is forwarded. Indicators are QoS 0 and never stored, so a client that
//! sends them in a loop would otherwise multiply its traffic by the number
//! of members; at most one per `chat.typing_interval_ms` goes out, the rest
//! are dropped and counted. [`Chat::typing`] checks the size cap first,
//! then the throttle, then forwards.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use rumqttc::v5::mqttbytes::QoS;
use serde_json::{json, Value};

use super::Chat;
use crate::clock::now_ms;
use crate::message::Message;

/// When each (conversation, user) last had an indicator forwarded.
pub struct TypingThrottle {
    interval_ms: u64,
    last: Mutex<HashMap<(Arc<str>, Arc<str>), u64>>,
}

/// Entries kept before the stale ones (older than the interval, so the
/// same as absent) are swept.
const SWEEP_AT: usize = 4096;

impl TypingThrottle {
    pub fn new(interval_ms: u64) -> TypingThrottle {
        TypingThrottle {
            interval_ms,
            last: Mutex::new(HashMap::new()),
        }
    }

    /// Whether an indicator of `user` in `conv` at `now_ms` is forwarded.
    pub fn admit(&self, conv: &str, user: &str, now_ms: u64) -> bool {
        let mut last = self.last.lock().unwrap_or_else(|e| e.into_inner());
        let interval = self.interval_ms;
        if last.len() >= SWEEP_AT {
            last.retain(|_, t| now_ms.saturating_sub(*t) < interval);
        }
        let key = (Arc::<str>::from(conv), Arc::<str>::from(user));
        match last.get_mut(&key) {
            Some(t) if now_ms.saturating_sub(*t) < interval => false,
            Some(t) => {
                *t = now_ms;
                true
            }
            None => {
                last.insert(key, now_ms);
                true
            }
        }
    }
}

/// What became of a typing indicator.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Typing {
    Forwarded,
    /// Another one went out less than `chat.typing_interval_ms` ago.
    Throttled,
    /// Larger than `chat.typing_max_bytes`.
    TooLarge,
}

impl Chat {
    /// A typing indicator from `from` in `conv`: to the other members
    /// online now, QoS 0, never stored; size-capped and throttled per user
    /// and conversation (what is not forwarded is counted).
    pub fn typing(&self, conv: &str, from: &str, client_id: &str, payload: &[u8]) -> Typing {
        if payload.len() > self.typing_max_bytes {
            self.metrics
                .typing_too_large
                .fetch_add(1, Ordering::Relaxed);
            return Typing::TooLarge;
        }
        if !self.typing.admit(conv, from, now_ms()) {
            self.metrics
                .typing_throttled
                .fetch_add(1, Ordering::Relaxed);
            return Typing::Throttled;
        }
        let state = serde_json::from_slice::<Value>(payload).unwrap_or(Value::Null);
        let body = json!({"conv": conv, "from": from, "ts": now_ms(), "state": state});
        let msg = Arc::new(Message::from_server(
            format!("typing/{conv}"),
            Bytes::from(body.to_string()),
            QoS::AtMostOnce,
            false,
        ));
        self.deliver(&self.members(conv), &msg, Some(client_id));
        self.live_send(chatmq_cluster::live::Live::Conv {
            conv: conv.to_string(),
            topic: msg.topic.clone(),
            body: body.to_string(),
            except: client_id.to_string(),
        });
        Typing::Forwarded
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_indicator_per_interval_per_user_and_conversation() {
        let t = TypingThrottle::new(500);
        assert!(t.admit("room", "alice", 1000));
        assert!(!t.admit("room", "alice", 1499));
        assert!(t.admit("room", "bob", 1499), "another user");
        assert!(t.admit("hall", "alice", 1499), "another conversation");
        assert!(t.admit("room", "alice", 1500));
        assert!(!t.admit("room", "alice", 0), "a clock step back is no time");
    }

    #[test]
    fn stale_entries_are_swept() {
        let t = TypingThrottle::new(10);
        for i in 0..(SWEEP_AT * 3) {
            assert!(t.admit("room", &format!("u{i}"), i as u64 * 100));
        }
        assert!(t.last.lock().unwrap().len() <= SWEEP_AT);
    }
}
