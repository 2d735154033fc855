//! The group-commit writer: one thread that turns many waiting batches into
//! one RocksDB write and one sync.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use rocksdb::{WriteBatch, WriteOptions, DB};
use tokio::sync::{mpsc, oneshot};

use crate::batch::{Batch, Op};
use crate::latency::CommitLatency;
use crate::{StorageError, SyncMode};

/// How many waiting batches one commit may take; bounds the latency a single
/// huge group adds to the first writer in it.
const MAX_GROUP: usize = 512;
/// Batches waiting for the writer; a full queue makes `submit` wait.
pub(crate) const QUEUE: usize = 4096;

pub(crate) enum Job {
    Write(Batch, oneshot::Sender<Result<(), String>>),
    /// Sync the WAL now, whatever the mode (used at shutdown).
    Flush(oneshot::Sender<Result<(), String>>),
}

/// Resolves when a submitted batch is durable under the store's sync mode.
/// Dropping it does not cancel the write.
pub struct Commit(CommitInner);

enum CommitInner {
    Ready,
    Pending(oneshot::Receiver<Result<(), String>>),
}

impl Commit {
    /// A commit with nothing to wait for (an empty batch).
    pub fn ready() -> Self {
        Commit(CommitInner::Ready)
    }

    pub(crate) fn pending(rx: oneshot::Receiver<Result<(), String>>) -> Self {
        Commit(CommitInner::Pending(rx))
    }

    /// A commit resolved by someone else: the sender says when (and
    /// whether) the work it stands for is durable. Dropping the sender
    /// resolves it as failed.
    pub fn deferred() -> (CommitSender, Self) {
        let (tx, rx) = oneshot::channel();
        (CommitSender(tx), Commit::pending(rx))
    }
}

/// Resolves a [`Commit::deferred`].
pub struct CommitSender(oneshot::Sender<Result<(), String>>);

impl CommitSender {
    pub fn resolve(self, result: Result<(), StorageError>) {
        let _ = self.0.send(result.map_err(|e| e.to_string()));
    }
}

impl Future for Commit {
    type Output = Result<(), StorageError>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match &mut self.0 {
            CommitInner::Ready => Poll::Ready(Ok(())),
            CommitInner::Pending(rx) => match Pin::new(rx).poll(cx) {
                Poll::Pending => Poll::Pending,
                Poll::Ready(Ok(Ok(()))) => Poll::Ready(Ok(())),
                Poll::Ready(Ok(Err(e))) => Poll::Ready(Err(StorageError::Failed(e))),
                Poll::Ready(Err(_)) => Poll::Ready(Err(StorageError::WriterGone)),
            },
        }
    }
}

/// Runs until every sender is gone, then syncs what it wrote and returns.
/// Each group commit's duration (write and, with `sync = "always"`, sync)
/// goes into `latency`.
pub(crate) fn run(
    db: Arc<DB>,
    mut jobs: mpsc::Receiver<Job>,
    mode: SyncMode,
    dirty: Arc<AtomicBool>,
    latency: Arc<CommitLatency>,
) {
    let mut options = WriteOptions::default();
    options.set_sync(mode == SyncMode::Always);
    let mut group = Vec::with_capacity(MAX_GROUP);
    let mut flushes = Vec::new();
    while let Some(job) = jobs.blocking_recv() {
        let mut next = Some(job);
        while let Some(job) = next.take() {
            match job {
                Job::Write(batch, reply) => group.push((batch, reply)),
                Job::Flush(reply) => flushes.push(reply),
            }
            if group.len() < MAX_GROUP {
                next = jobs.try_recv().ok();
            }
        }
        if !group.is_empty() {
            let started = Instant::now();
            let result = write_group(&db, &group, &options);
            latency.record(started.elapsed());
            if result.is_ok() && mode != SyncMode::Always {
                dirty.store(true, Ordering::Release);
            }
            for (_, reply) in group.drain(..) {
                let _ = reply.send(result.clone());
            }
        }
        if !flushes.is_empty() {
            let result = db.flush_wal(true).map_err(|e| e.to_string());
            for reply in flushes.drain(..) {
                let _ = reply.send(result.clone());
            }
        }
    }
    if let Err(e) = db.flush_wal(true) {
        tracing::error!(error = %e, "final WAL sync failed");
    }
}

fn write_group(
    db: &DB,
    group: &[(Batch, oneshot::Sender<Result<(), String>>)],
    options: &WriteOptions,
) -> Result<(), String> {
    let mut wb = WriteBatch::default();
    for (batch, _) in group {
        for op in &batch.ops {
            let cf_name = match op {
                Op::Put { cf, .. } | Op::Delete { cf, .. } | Op::DeleteRange { cf, .. } => *cf,
            };
            let cf = db
                .cf_handle(cf_name)
                .ok_or_else(|| format!("column family {cf_name} is missing"))?;
            match op {
                Op::Put { key, value, .. } => wb.put_cf(cf, key, value),
                Op::Delete { key, .. } => wb.delete_cf(cf, key),
                Op::DeleteRange { from, to, .. } => wb.delete_range_cf(cf, from, to),
            }
        }
    }
    db.write_opt(wb, options).map_err(|e| e.to_string())
}

/// For `sync = "interval"`: syncs the WAL every `period` when something was
/// written, until `stop` is set.
pub(crate) fn run_syncer(
    db: Arc<DB>,
    period: Duration,
    dirty: Arc<AtomicBool>,
    stop: Arc<AtomicBool>,
) {
    while !stop.load(Ordering::Acquire) {
        std::thread::sleep(period);
        if dirty.swap(false, Ordering::AcqRel) {
            if let Err(e) = db.flush_wal(true) {
                tracing::error!(error = %e, "periodic WAL sync failed");
            }
        }
    }
}
