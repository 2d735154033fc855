//! The one error type of the storage crate.

use std::path::PathBuf;

/// What can go wrong on disk. Every variant says which thing failed, so the
/// operator can act on it.
#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    #[error("cannot open the database at {path}: {source}")]
    Open {
        path: PathBuf,
        source: rocksdb::Error,
    },
    #[error("database error: {0}")]
    Db(#[from] rocksdb::Error),
    #[error("corrupt record in column family `{cf}`: {what}")]
    Corrupt { cf: &'static str, what: String },
    #[error("the storage writer has stopped")]
    WriterGone,
    /// A commit failed; the message says what failed (the writer's
    /// RocksDB error, or what resolved a deferred commit).
    #[error("{0}")]
    Failed(String),
    /// With `[cluster]`: a chat write the cluster did not acknowledge
    /// (nothing is stored; the client resends).
    #[error("not acknowledged by the cluster: {0}")]
    Unavailable(&'static str),
}
