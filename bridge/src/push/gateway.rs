//! The gateway: takes jobs as they fall due and delivers them.
//!
//! One task waits for the next due job (or a wake-up from a new one);
//! each due job gets a task that reads the user's devices and unread total,
//! sends one notification per device through its provider, and deletes
//! the job from the queue when every device is done. Sends in flight are
//! bounded by `push.concurrency` over all providers; a retry waits without
//! holding a slot. At shutdown jobs in progress are abandoned: they are
//! still on disk and are sent again after the restart.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use chatmq_storage::{Batch, Device, PushJobRecord, StorageError};
use futures_util::future::join_all;
use tokio::sync::{watch, Semaphore};
use tokio::task::JoinSet;

use super::provider::{Notification, Outcome, Provider};
use super::queue::JobKey;
use super::retry::RetryPolicy;
use super::{
    bump, lock, now_ms, ApnsProvider, FcmProvider, Platform, Push, PushError, WebhookProvider,
};

/// The longest the gateway sleeps with nothing due.
const IDLE: Duration = Duration::from_secs(3600);

/// Delivers queued jobs through the configured providers.
#[derive(Clone)]
pub struct Gateway {
    inner: Arc<Inner>,
}

/// Tells whether a user has a live session now (the broker knows).
pub type Presence = Arc<dyn Fn(&str) -> bool + Send + Sync>;

struct Inner {
    push: Arc<Push>,
    providers: HashMap<Platform, Arc<dyn Provider>>,
    permits: Semaphore,
    retry: RetryPolicy,
    /// A user who came online while the job waited out its debounce
    /// window gets no push: the messages reach a live session.
    online: Presence,
}

impl Gateway {
    /// Builds the providers `[push.*]` configures (reading their keys).
    /// `online` tells whether a user has a live session: a user who came
    /// online while the job waited out its debounce window gets no push.
    pub fn new(
        push: Arc<Push>,
        settings: &chatmq_config::Push,
        online: Presence,
    ) -> Result<Gateway, PushError> {
        let mut providers: HashMap<Platform, Arc<dyn Provider>> = HashMap::new();
        if let Some(s) = &settings.webhook {
            providers.insert(Platform::Webhook, Arc::new(WebhookProvider::new(s)?));
        }
        if let Some(s) = &settings.fcm {
            providers.insert(Platform::Fcm, Arc::new(FcmProvider::new(s)?));
        }
        if let Some(s) = &settings.apns {
            providers.insert(Platform::Apns, Arc::new(ApnsProvider::new(s)?));
        }
        Ok(Self::with_providers(push, settings, providers, online))
    }

    /// A gateway with the given providers (tests use their own).
    pub fn with_providers(
        push: Arc<Push>,
        settings: &chatmq_config::Push,
        providers: HashMap<Platform, Arc<dyn Provider>>,
        online: Presence,
    ) -> Gateway {
        Gateway {
            inner: Arc::new(Inner {
                push,
                providers,
                permits: Semaphore::new(settings.concurrency.max(1)),
                retry: RetryPolicy::from_settings(settings),
                online,
            }),
        }
    }

    /// Delivers jobs as they fall due until `shutdown`.
    pub async fn run(self, mut shutdown: watch::Receiver<bool>) {
        let push = self.inner.push.clone();
        let mut deliveries = JoinSet::new();
        loop {
            let now = now_ms();
            let (due, next) = lock(&push.queue).take_due(now);
            for (key, record) in due {
                deliveries.spawn(self.inner.clone().deliver(key, record));
            }
            let wait = next.map_or(IDLE, |t| Duration::from_millis(t.saturating_sub(now)));
            tokio::select! {
                _ = shutdown.changed() => break,
                _ = push.wake.notified() => {}
                _ = tokio::time::sleep(wait) => {}
                Some(_) = deliveries.join_next(), if !deliveries.is_empty() => {}
            }
        }
        deliveries.abort_all();
    }
}

impl Inner {
    async fn deliver(self: Arc<Self>, key: JobKey, record: PushJobRecord) {
        let (_, user, conv) = key.clone();
        if (self.online)(&user) {
            tracing::debug!(user, conv, "push dropped: the user is online now");
            return self.done(&key).await;
        }
        let store = self.push.store.clone();
        let who = user.clone();
        let read = tokio::task::spawn_blocking(move || -> Result<_, StorageError> {
            Ok((store.devices(&who)?, store.unread_total(&who)?))
        })
        .await;
        let (devices, badge) = match read {
            Ok(Ok(found)) => found,
            Ok(Err(e)) => {
                // The job stays on disk and is retried after a restart.
                tracing::error!(error = %e, user, conv, "cannot read devices for a push");
                return;
            }
            Err(_) => return,
        };
        let note = Notification {
            user,
            conv,
            count: record.count,
            seq: record.seq,
            from: record.from,
            preview: record.preview,
            badge,
        };
        let sends = devices.iter().filter_map(|d| {
            let platform = Platform::parse(&d.platform)?;
            let provider = self.providers.get(&platform)?;
            Some(self.send(provider.as_ref(), platform, d, &note))
        });
        join_all(sends).await;
        self.done(&key).await;
    }

    /// Removes a job that needs no more work, from disk and from memory.
    async fn done(&self, key: &JobKey) {
        let mut batch = Batch::new();
        batch.delete_push_job(key.0, &key.1, &key.2);
        if let Err(e) = self.push.store.write(batch).await {
            tracing::error!(error = %e, "cannot delete a finished push job");
        }
        lock(&self.push.queue).finish(key);
    }

    /// Sends to one device, retrying up to the policy's attempts.
    async fn send(
        &self,
        provider: &dyn Provider,
        platform: Platform,
        device: &Device,
        note: &Notification,
    ) {
        let metrics = &self.push.metrics;
        let mut attempt = 1;
        let mut backoff = self.retry.backoff();
        loop {
            let outcome = {
                let Ok(_slot) = self.permits.acquire().await else {
                    return;
                };
                provider.send(device, note).await
            };
            match outcome {
                Outcome::Sent => return metrics.sent.bump(platform),
                Outcome::InvalidToken(why) => {
                    tracing::info!(
                        user = note.user,
                        platform = platform.as_str(),
                        why,
                        "push token is dead; device removed"
                    );
                    metrics.failed.bump(platform);
                    match self
                        .push
                        .unregister(&note.user, platform, &device.token)
                        .await
                    {
                        Ok(true) => bump(&metrics.tokens_removed),
                        Ok(false) => {}
                        Err(e) => tracing::error!(error = %e, "cannot remove a dead device"),
                    }
                    return;
                }
                Outcome::Rejected(why) => {
                    tracing::warn!(
                        user = note.user,
                        platform = platform.as_str(),
                        why,
                        "push rejected"
                    );
                    return metrics.failed.bump(platform);
                }
                Outcome::Retry { after, reason } => {
                    if attempt >= self.retry.max_attempts {
                        tracing::warn!(
                            user = note.user,
                            platform = platform.as_str(),
                            attempts = attempt,
                            reason,
                            "push given up"
                        );
                        return metrics.failed.bump(platform);
                    }
                    metrics.retried.bump(platform);
                    tokio::time::sleep(self.retry.wait(&mut backoff, after)).await;
                    attempt += 1;
                }
            }
        }
    }
}
