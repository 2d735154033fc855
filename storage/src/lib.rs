//! chatmq-storage: everything chatmq keeps on disk, in one RocksDB database.
//!
//! The story of a write: the broker builds a [`Batch`] of typed operations
//! (queue a message for a session, store a retained message, ...), hands it
//! to [`Store::submit`], and gets a [`Commit`] that resolves once the batch
//! is durable under the configured [`SyncMode`]. One writer thread drains
//! every batch that is waiting, writes them as one RocksDB `WriteBatch` and
//! syncs once (group commit), so many concurrent publishers share one fsync.
//!
//! Reads are point lookups and prefix scans used at start-up and on session
//! resume; they never go through the writer.
//!
//! This crate knows the schema (column families, key layout, record
//! encoding) and nothing of MQTT's rules: the broker decides what to write.

mod applied;
mod attachment;
mod batch;
mod chat;
mod error;
mod latency;
mod options;
mod owner;
mod push;
mod record;
mod schema;
mod store;
mod writer;

pub use attachment::Upload;
pub use batch::{Batch, SharedBody};
pub use chat::{Cached, DedupPage, Role};
pub use chatmq_config::SyncMode;
pub use error::StorageError;
pub use latency::{LatencySnapshot, COMMIT_BUCKETS};
pub use owner::ClientOwner;
pub use push::{Device, PushJob};
pub use record::{
    ConversationRecord, MessageProps, MessageRecord, OutboxEntry, OutboxState, PushJobRecord,
    RetainedRecord, SessionRecord, SubscriptionRecord,
};
pub use store::{Store, StoredSession};
pub use writer::{Commit, CommitSender};
