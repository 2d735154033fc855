//! The expiry of idempotency keys (`chat.dedup_ttl_secs`, default 7 days).
//!
//! Every chat message leaves a key (conv, sender, envelope id) → seq in the
//! `dedup` column family, so that a retry gets the original seq. Kept
//! forever, that column family would grow with every message ever sent. A
//! background task walks it a page at a time on the blocking pool and
//! deletes keys older than the window through the group-commit writer. A
//! retry arriving after the window is a new message with a new seq: a
//! client's outbox does not live for a week.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use chatmq_storage::{Batch, DedupPage};
use tokio::sync::watch;

use super::Chat;
use crate::clock::now_ms;

/// Keys read per step: one step is one short scan and one write.
const PAGE: usize = 1024;

/// How long a full walk waits before the next one: a tenth of the window,
/// at least a second and at most an hour (an expired key outlives its
/// window by at most that).
fn period(ttl_ms: u64) -> Duration {
    Duration::from_millis((ttl_ms / 10).clamp(1000, 3_600_000))
}

/// Runs until shutdown: one walk over the column family per period.
pub async fn run(chat: Arc<Chat>, ttl_secs: u64, mut shutdown: watch::Receiver<bool>) {
    let ttl_ms = ttl_secs.saturating_mul(1000);
    loop {
        tokio::select! {
            _ = shutdown.changed() => return,
            _ = tokio::time::sleep(period(ttl_ms)) => {}
        }
        if let Err(e) = sweep(&chat, ttl_ms).await {
            tracing::error!(error = %e, "idempotency key expiry failed; retrying next period");
        }
    }
}

/// One walk: deletes the keys written more than `ttl_ms` ago. Returns
/// how many went.
pub async fn sweep(chat: &Chat, ttl_ms: u64) -> Result<u64, chatmq_storage::StorageError> {
    let mut from: Option<Vec<u8>> = None;
    let mut expired = 0u64;
    loop {
        let now = now_ms();
        let cutoff = now.saturating_sub(ttl_ms);
        let store = chat.store.clone();
        let start = from.take();
        let page: DedupPage =
            tokio::task::spawn_blocking(move || store.dedup_page(start.as_deref(), cutoff, PAGE))
                .await
                .map_err(|_| chatmq_storage::StorageError::WriterGone)??;
        let n = page.expired.len() as u64;
        if !page.expired.is_empty() || !page.unstamped.is_empty() {
            let mut batch = Batch::new();
            batch.expire_dedup(&page, now);
            chat.store.write(batch).await?;
        }
        expired += n;
        chat.metrics.dedup_expired.fetch_add(n, Ordering::Relaxed);
        match page.next {
            Some(next) => from = Some(next),
            None => return Ok(expired),
        }
    }
}
