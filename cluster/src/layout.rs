//! The names and shapes of what a chatmq cluster keeps in JetStream
//! (DESIGN §6), from the settings alone: every node with the same
//! `[cluster]` and chat retention computes the same layout.
//!
//! - `P` partition streams `{prefix}_chat_{p}` on subjects
//!   `{prefix}.chat.{p}.>` (a conversation's messages on
//!   `{prefix}.chat.{p}.{conv}`; conversation ids may hold dots, hence
//!   `>`): replicated, on file, limits retention, kept for
//!   `chat.retention_max_age_secs` (0: forever), a two-minute duplicate
//!   window for `Nats-Msg-Id`, no count or byte limit, since they are
//!   the order of record.
//! - The KV bucket `{prefix}_leases`: one key per partition naming its
//!   owner, expiring after `cluster.lease_ttl_ms` unless renewed.
//! - The KV bucket `{prefix}_meta`: the layout record (`layout`), written
//!   by the first node, so that the partition count stays fixed.

use std::time::Duration;

use async_nats::jetstream::stream::{Config, DiscardPolicy, RetentionPolicy, StorageType};
use chatmq_config::{Chat, Cluster as ClusterSettings};
use serde::{Deserialize, Serialize};

/// The duplicate window of the partition streams: how long a resent
/// `Nats-Msg-Id` is recognised by the stream itself (an owner resending
/// after "wrong last sequence" does so within seconds; older retries are
/// caught by the owner's own dedup keys).
pub const DUPLICATE_WINDOW: Duration = Duration::from_secs(120);

/// The version of this layout, in the record.
pub const LAYOUT_VERSION: u32 = 1;

/// The key of the layout record in the meta bucket.
pub const RECORD_KEY: &str = "layout";

/// Names and shapes, for one cluster.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layout {
    prefix: String,
    partitions: u32,
    replicas: usize,
    lease_ttl: Duration,
    max_age: Duration,
}

/// What the meta bucket's `layout` key holds (JSON).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    pub version: u32,
    pub partitions: u32,
}

impl Layout {
    pub fn new(settings: &ClusterSettings, chat: &Chat) -> Layout {
        Layout {
            prefix: settings.name_prefix.clone(),
            partitions: settings.partitions,
            // 1..=5 by the key table.
            replicas: settings.replicas as usize,
            lease_ttl: Duration::from_millis(settings.lease_ttl_ms),
            max_age: Duration::from_secs(chat.retention_max_age_secs),
        }
    }

    pub fn partitions(&self) -> u32 {
        self.partitions
    }

    pub fn replicas(&self) -> usize {
        self.replicas
    }

    pub fn lease_ttl(&self) -> Duration {
        self.lease_ttl
    }

    /// The stream of partition `p`.
    pub fn partition_stream(&self, p: u32) -> String {
        format!("{}_chat_{p}", self.prefix)
    }

    /// The subjects of partition `p`'s stream.
    pub fn partition_subjects(&self, p: u32) -> String {
        format!("{}.chat.{p}.>", self.prefix)
    }

    /// What begins every name (`cluster.name_prefix`).
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// The records stream: membership, conversations and read state.
    pub fn records_stream(&self) -> String {
        format!("{}_records", self.prefix)
    }

    /// The records stream: kept for ever (a new node builds membership
    /// from it), on file, replicated; any node publishes to it.
    pub fn records_config(&self) -> Config {
        Config {
            name: self.records_stream(),
            description: Some("chatmq membership, conversations and read state".to_string()),
            subjects: vec![format!("{}.records.>", self.prefix)],
            retention: RetentionPolicy::Limits,
            storage: StorageType::File,
            num_replicas: self.replicas,
            duplicate_window: DUPLICATE_WINDOW,
            discard: DiscardPolicy::Old,
            ..Config::default()
        }
    }

    pub fn leases_bucket(&self) -> String {
        format!("{}_leases", self.prefix)
    }

    /// The retained messages of plain MQTT, the last of each topic.
    pub fn retained_stream(&self) -> String {
        format!("{}_retained", self.prefix)
    }

    /// The subjects' root of the retained stream (a topic's levels follow,
    /// as `crate::mqtt::Subjects` makes them).
    pub fn retained_root(&self) -> String {
        format!("{}.retained", self.prefix)
    }

    /// The retained stream: one message per subject (a topic), kept for
    /// ever; a cleared topic keeps its empty record.
    pub fn retained_config(&self) -> Config {
        Config {
            name: self.retained_stream(),
            description: Some("chatmq retained messages".to_string()),
            subjects: vec![format!("{}.retained.>", self.prefix)],
            retention: RetentionPolicy::Limits,
            storage: StorageType::File,
            num_replicas: self.replicas,
            max_messages_per_subject: 1,
            duplicate_window: DUPLICATE_WINDOW,
            discard: DiscardPolicy::Old,
            ..Config::default()
        }
    }

    /// Where each client id's session is (`crate::sessions`).
    pub fn sessions_bucket(&self) -> String {
        format!("{}_sessions", self.prefix)
    }

    pub fn meta_bucket(&self) -> String {
        format!("{}_meta", self.prefix)
    }

    pub fn record(&self) -> Record {
        Record {
            version: LAYOUT_VERSION,
            partitions: self.partitions,
        }
    }

    /// The stream partition `p` is created with.
    pub fn partition_config(&self, p: u32) -> Config {
        Config {
            name: self.partition_stream(p),
            description: Some(format!("chatmq partition {p} of {}", self.partitions)),
            subjects: vec![self.partition_subjects(p)],
            retention: RetentionPolicy::Limits,
            storage: StorageType::File,
            num_replicas: self.replicas,
            max_age: self.max_age,
            duplicate_window: DUPLICATE_WINDOW,
            discard: DiscardPolicy::Old,
            ..Config::default()
        }
    }

    /// The bucket of partition leases: one value per key, gone after the
    /// lease TTL unless put again.
    pub fn leases_config(&self) -> async_nats::jetstream::kv::Config {
        async_nats::jetstream::kv::Config {
            bucket: self.leases_bucket(),
            description: "chatmq partition leases".to_string(),
            history: 1,
            max_age: self.lease_ttl,
            storage: StorageType::File,
            num_replicas: self.replicas,
            ..Default::default()
        }
    }

    /// The bucket of sessions: the latest value of each client id, kept
    /// until the session ends (its node deletes it).
    pub fn sessions_config(&self) -> async_nats::jetstream::kv::Config {
        async_nats::jetstream::kv::Config {
            bucket: self.sessions_bucket(),
            description: "chatmq sessions: which node holds each client id".to_string(),
            history: 1,
            storage: StorageType::File,
            num_replicas: self.replicas,
            ..Default::default()
        }
    }

    /// The bucket of cluster-wide records (the layout record first).
    pub fn meta_config(&self) -> async_nats::jetstream::kv::Config {
        async_nats::jetstream::kv::Config {
            bucket: self.meta_bucket(),
            description: "chatmq cluster records".to_string(),
            history: 1,
            storage: StorageType::File,
            num_replicas: self.replicas,
            ..Default::default()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layout() -> Layout {
        let settings = ClusterSettings {
            node_id: "n1".into(),
            nats_urls: vec!["nats://127.0.0.1:4222".into()],
            partitions: 4,
            ..ClusterSettings::default()
        };
        Layout::new(&settings, &Chat::default())
    }

    #[test]
    fn names_follow_the_prefix_and_the_partition() {
        let l = layout();
        assert_eq!(l.partition_stream(3), "chatmq_chat_3");
        assert_eq!(l.partition_subjects(3), "chatmq.chat.3.>");
        assert_eq!(l.leases_bucket(), "chatmq_leases");
        assert_eq!(l.meta_bucket(), "chatmq_meta");
        assert_eq!(l.sessions_bucket(), "chatmq_sessions");
    }

    #[test]
    fn partition_streams_are_the_order_of_record() {
        let c = layout().partition_config(0);
        assert_eq!(c.num_replicas, 3);
        assert_eq!(c.storage, StorageType::File);
        assert_eq!(c.retention, RetentionPolicy::Limits);
        assert_eq!(c.max_age, Duration::ZERO, "kept forever by default");
        assert_eq!(
            (c.max_messages, c.max_bytes, c.max_messages_per_subject),
            (0, 0, 0)
        );
    }

    #[test]
    fn the_record_is_json() {
        let r = layout().record();
        let text = serde_json::to_string(&r).unwrap();
        assert_eq!(text, r#"{"version":1,"partitions":4}"#);
    }
}
