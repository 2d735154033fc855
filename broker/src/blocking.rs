//! Storage reads off the async workers. A RocksDB read is usually a few
//! microseconds, but a cold block cache or a compaction makes it a disk
//! read: on a tokio worker that stalls every connection the worker serves.
//! Reads go to the blocking pool; writes already go to the group-commit
//! writer's thread.

use chatmq_storage::{StorageError, Store};

/// Runs `read` on the blocking pool with a handle to `store`.
pub async fn read<T, F>(store: &Store, read: F) -> Result<T, StorageError>
where
    T: Send + 'static,
    F: FnOnce(&Store) -> Result<T, StorageError> + Send + 'static,
{
    let store = store.clone();
    tokio::task::spawn_blocking(move || read(&store))
        .await
        // The blocking pool is gone: the runtime is shutting down.
        .map_err(|_| StorageError::WriterGone)?
}
