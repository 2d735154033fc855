//! Where each client id's session is, cluster-wide (issue #12 item 4):
//! the NATS half of sessions that move between nodes. One KV bucket,
//! `{prefix}_sessions`, holds one value per client id, written by the
//! node the client is attached to (or was last attached to), read by a
//! node the client connects to next, and watched by every node so that
//! the node a client left learns it at once (and closes the old
//! connection with 0x8E). What the value says is the broker's business
//! (`broker/src/roaming.rs`); here it is bytes, its key and its revision.
//!
//! Keys: `c.` and the client id in lowercase hex, so that any byte of an
//! MQTT client id makes a valid key and no two ids share one. A client id
//! longer than [`MAX_CLIENT_ID`] bytes has no key: its session stays on
//! its node (docs/CLUSTER.md).

use std::time::Duration;

use async_nats::jetstream::kv::{self, Operation};
use async_nats::jetstream::Context;
use bytes::Bytes;
use futures_util::StreamExt;

use crate::layout::Layout;

/// The longest client id (bytes) whose session moves between nodes: its
/// key is twice as long, well within what a NATS subject may be.
pub const MAX_CLIENT_ID: usize = 256;

/// How long one request to the bucket may take before the caller goes on
/// without it.
const REQUEST: Duration = Duration::from_secs(3);

/// The bucket of sessions.
#[derive(Clone)]
pub struct SessionBook {
    kv: kv::Store,
}

/// A value and the revision it was written at.
pub struct Held {
    pub value: Bytes,
    pub revision: u64,
}

/// One change the watch saw: a client id's new value (`None`: deleted).
pub struct Change {
    pub client_id: String,
    pub value: Option<Bytes>,
    pub revision: u64,
}

/// Why a conditional write did not happen.
#[derive(Debug)]
pub enum Refused {
    /// Someone wrote the key since the revision given: the session is no
    /// longer this writer's.
    Moved,
    /// NATS did not answer or failed; try again later.
    Failed(String),
}

/// The key of `client_id`, `None` for one too long to move.
pub fn key(client_id: &str) -> Option<String> {
    if client_id.is_empty() || client_id.len() > MAX_CLIENT_ID {
        return None;
    }
    let mut k = String::with_capacity(2 + 2 * client_id.len());
    k.push_str("c.");
    for b in client_id.bytes() {
        k.push(char::from(HEX[usize::from(b >> 4)]));
        k.push(char::from(HEX[usize::from(b & 0x0f)]));
    }
    Some(k)
}

const HEX: &[u8; 16] = b"0123456789abcdef";

/// The client id of a key (`None`: not a session key, untrusted input).
pub fn client_id_of(key: &str) -> Option<String> {
    let hex = key.strip_prefix("c.")?.as_bytes();
    if hex.is_empty() || hex.len() % 2 != 0 || hex.len() > 2 * MAX_CLIENT_ID {
        return None;
    }
    let nibble = |c: u8| match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        _ => None,
    };
    let bytes: Option<Vec<u8>> = hex
        .chunks_exact(2)
        .map(|p| Some((nibble(p[0])? << 4) | nibble(p[1])?))
        .collect();
    String::from_utf8(bytes?).ok()
}

impl SessionBook {
    /// Opens the bucket (start-up created it: `shape::ensure`).
    pub async fn open(js: &Context, layout: &Layout) -> Result<SessionBook, String> {
        let kv = tokio::time::timeout(REQUEST, js.get_key_value(layout.sessions_bucket()))
            .await
            .map_err(|_| "no answer".to_string())?
            .map_err(|e| e.to_string())?;
        Ok(SessionBook { kv })
    }

    /// The value of `key` now, if any.
    pub async fn get(&self, key: &str) -> Result<Option<Held>, String> {
        let entry = tokio::time::timeout(REQUEST, self.kv.entry(key))
            .await
            .map_err(|_| "no answer".to_string())?
            .map_err(|e| e.to_string())?;
        Ok(entry.and_then(|e| match e.operation {
            Operation::Put => Some(Held {
                value: e.value,
                revision: e.revision,
            }),
            Operation::Delete | Operation::Purge => None,
        }))
    }

    /// Writes `value` whatever is there (a client attaching here takes its
    /// client id over). Returns the new revision.
    pub async fn put(&self, key: &str, value: Bytes) -> Result<u64, String> {
        tokio::time::timeout(REQUEST, self.kv.put(key, value))
            .await
            .map_err(|_| "no answer".to_string())?
            .map_err(|e| e.to_string())
    }

    /// Writes `value` if the key is still at `revision` (0: if it has no
    /// value).
    pub async fn update(&self, key: &str, value: Bytes, revision: u64) -> Result<u64, Refused> {
        let write = async {
            if revision == 0 {
                self.kv.create(key, value).await.map_err(|e| {
                    if e.kind() == kv::CreateErrorKind::AlreadyExists {
                        Refused::Moved
                    } else {
                        Refused::Failed(e.to_string())
                    }
                })
            } else {
                self.kv.update(key, value, revision).await.map_err(|e| {
                    if e.kind() == kv::UpdateErrorKind::WrongLastRevision {
                        Refused::Moved
                    } else {
                        Refused::Failed(e.to_string())
                    }
                })
            }
        };
        tokio::time::timeout(REQUEST, write)
            .await
            .map_err(|_| Refused::Failed("no answer".to_string()))?
    }

    /// Deletes the key if it is still at `revision` (a later value, of
    /// another node, is left alone: the server refuses the delete).
    pub async fn delete(&self, key: &str, revision: u64) -> Result<(), String> {
        let delete = self.kv.delete_expect_revision(key, Some(revision));
        tokio::time::timeout(REQUEST, delete)
            .await
            .map_err(|_| "no answer".to_string())?
            .map_err(|e| e.to_string())
    }

    /// Every key's latest value, then every change, until the watch fails
    /// (the caller watches again). Keys that are not session keys are
    /// skipped.
    pub async fn watch(
        &self,
    ) -> Result<impl futures_util::Stream<Item = Result<Change, String>>, String> {
        let watch = tokio::time::timeout(REQUEST, self.kv.watch_with_history(">"))
            .await
            .map_err(|_| "no answer".to_string())?
            .map_err(|e| e.to_string())?;
        Ok(watch.filter_map(|entry| async move {
            match entry {
                Err(e) => Some(Err(e.to_string())),
                Ok(e) => {
                    let client_id = client_id_of(&e.key)?;
                    let value = match e.operation {
                        Operation::Put => Some(e.value),
                        Operation::Delete | Operation::Purge => None,
                    };
                    Some(Ok(Change {
                        client_id,
                        value,
                        revision: e.revision,
                    }))
                }
            }
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn any_client_id_has_a_valid_key_of_its_own() {
        for id in ["dev-1", "a.b", "é ü/#+", ">", "*", "x\u{1}y"] {
            let k = key(id).unwrap();
            assert!(
                k.bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'.'),
                "{k}"
            );
            assert_eq!(client_id_of(&k).as_deref(), Some(id));
        }
        assert_ne!(key("ab"), key("a.b"));
    }

    #[test]
    fn long_ids_and_foreign_keys_do_not_roam() {
        assert!(key(&"x".repeat(MAX_CLIENT_ID)).is_some());
        assert!(key(&"x".repeat(MAX_CLIENT_ID + 1)).is_none());
        assert!(key("").is_none());
        for k in ["layout", "c.", "c.abc", "c.zz", "c.ABCD", "p.1"] {
            assert!(client_id_of(k).is_none(), "{k}");
        }
        // Not UTF-8.
        assert!(client_id_of("c.ff").is_none());
    }
}
