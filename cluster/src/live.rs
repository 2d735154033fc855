//! What is live and not stored, between the nodes (issue #12 item 6):
//! presence, typing indicators and room reactions. Core NATS on one
//! subject, `{prefix}.live`, that every node publishes to and subscribes
//! to: at most once, like the local deliveries it stands for (QoS 0,
//! never stored). What a record means is the broker's business
//! (`broker/src/chat/live.rs`); here is its wire form, parsed as
//! untrusted input, and the subscription.

use async_nats::Client;
use bytes::Bytes;
use futures_util::StreamExt;
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

/// The most users one [`Live::Online`] carries.
pub const ONLINE_CHUNK: usize = 256;
/// The largest record a node accepts (a typing state is capped well
/// below by `chat.typing_max_bytes`).
pub const MAX_RECORD: usize = 64 * 1024;

/// One record, with the node that sent it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Sent {
    pub node: String,
    #[serde(flatten)]
    pub live: Live,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Live {
    /// A delivery to the members of `conv` online on every node, but the
    /// session `except` (its sender): a typing indicator, a room reaction.
    Conv {
        conv: String,
        topic: String,
        body: String,
        except: String,
    },
    /// `user` came online on the sending node (its first session there)
    /// or went offline there (its last).
    Presence { user: String, online: bool },
    /// The sending node is alive and has `online` users online.
    Beat { online: usize },
    /// The sending node asks every node for its online users.
    Sync,
    /// Some of the sending node's online users, in answer to a sync.
    Online { users: Vec<String> },
}

impl Sent {
    pub fn encode(&self) -> Bytes {
        Bytes::from(serde_json::to_vec(self).unwrap_or_default())
    }

    /// `None`: not a record, or larger than any node sends.
    pub fn parse(b: &[u8]) -> Option<Sent> {
        if b.len() > MAX_RECORD {
            return None;
        }
        let sent: Sent = serde_json::from_slice(b).ok()?;
        match &sent.live {
            Live::Online { users } if users.len() > ONLINE_CHUNK => None,
            _ => Some(sent),
        }
    }
}

/// The subject of a cluster's live records.
pub fn subject(prefix: &str) -> String {
    format!("{prefix}.live")
}

/// A node's end of the subject.
pub struct Channel {
    client: Client,
    subject: String,
    node: String,
}

impl Channel {
    pub fn new(client: Client, prefix: &str, node: &str) -> Channel {
        Channel {
            client,
            subject: subject(prefix),
            node: node.to_string(),
        }
    }

    /// Sends `live` to the other nodes (at most once: a failure is
    /// logged and the record is gone).
    pub async fn send(&self, live: Live) {
        let body = Sent {
            node: self.node.clone(),
            live,
        }
        .encode();
        if let Err(e) = self.client.publish(self.subject.clone(), body).await {
            tracing::debug!(error = %e, "live record not sent");
        }
    }

    /// The live records of the other nodes (this node's own, echoed by
    /// NATS, are left out), on a queue bounded by `capacity`; what does
    /// not fit, or does not parse, is counted in `dropped`.
    pub async fn subscribe(
        &self,
        capacity: usize,
        dropped: std::sync::Arc<std::sync::atomic::AtomicU64>,
    ) -> Result<mpsc::Receiver<Sent>, String> {
        let mut sub = self
            .client
            .subscribe(self.subject.clone())
            .await
            .map_err(|e| e.to_string())?;
        let (tx, rx) = mpsc::channel(capacity);
        let node = self.node.clone();
        tokio::spawn(async move {
            while let Some(m) = sub.next().await {
                let Some(sent) = Sent::parse(&m.payload) else {
                    dropped.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    continue;
                };
                if sent.node == node {
                    continue;
                }
                match tx.try_send(sent) {
                    Ok(()) => {}
                    Err(mpsc::error::TrySendError::Full(_)) => {
                        dropped.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    }
                    Err(mpsc::error::TrySendError::Closed(_)) => return,
                }
            }
        });
        Ok(rx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_round_trip_and_foreign_ones_are_refused() {
        let s = Sent {
            node: "n1".into(),
            live: Live::Conv {
                conv: "room".into(),
                topic: "typing/room".into(),
                body: "{}".into(),
                except: "alice-phone".into(),
            },
        };
        assert_eq!(Sent::parse(&s.encode()), Some(s));
        assert_eq!(Sent::parse(b"{\"node\":\"n1\",\"kind\":\"nope\"}"), None);
        let big = Sent {
            node: "n1".into(),
            live: Live::Online {
                users: vec!["u".into(); ONLINE_CHUNK + 1],
            },
        };
        assert_eq!(Sent::parse(&big.encode()), None);
        assert_eq!(Sent::parse(&vec![b' '; MAX_RECORD + 1]), None);
    }
}
