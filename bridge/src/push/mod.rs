//! Push notifications for conversation members with no live session
//! (DESIGN §3 step 8).
//!
//! The story of a notification: when the chat layer appends a message it
//! asks [`Push::enqueue`] for each member who is offline. If the member has
//! a device on a configured provider and has not muted the conversation,
//! a job for (user, conversation) is written into the message's own batch
//! (so it is durable exactly when the message is), due `push.debounce_ms`
//! later; further messages before then fold into the same job (count,
//! latest preview). The [`Gateway`] takes jobs as they fall due, reads the
//! user's devices and unread total (the badge), and hands one
//! [`Notification`] per device to its [`Provider`] (APNs, FCM HTTP v1,
//! webhook), retrying 429/5xx with backoff, deleting devices whose token
//! the provider says is dead, and deletes the job once every device is
//! done. A job still on disk after a crash is sent after the restart:
//! delivery is at least once.
//!
//! This module also owns the device registry and the per-user mutes. It
//! knows nothing of the broker: who is online is the caller's business.

mod apns;
mod fcm;
mod gateway;
mod provider;
mod queue;
mod registry;
mod retry;
mod webhook;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{SystemTime, UNIX_EPOCH};

use chatmq_storage::{Batch, Device, StorageError, Store};
use serde_json::Value;
use tokio::sync::Notify;

pub use apns::ApnsProvider;
pub use fcm::FcmProvider;
pub use gateway::{Gateway, Presence};
pub use provider::{Notification, Outcome, Provider};
pub use webhook::WebhookProvider;

use queue::Queue;
use registry::Registry;

/// The longest token accepted at registration (APNs tokens are 64 hex
/// digits, FCM tokens about 160 characters; webhook tokens are the
/// operator's own).
pub const MAX_TOKEN_LEN: usize = 4096;
/// The longest app id accepted at registration.
pub const MAX_APP_ID_LEN: usize = 255;

/// Where a device's notifications go.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Platform {
    Apns,
    Fcm,
    Webhook,
}

impl Platform {
    pub const ALL: [Platform; 3] = [Platform::Apns, Platform::Fcm, Platform::Webhook];

    /// `apns`, `fcm` or `webhook`.
    pub fn parse(name: &str) -> Option<Platform> {
        Platform::ALL.into_iter().find(|p| p.as_str() == name)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Platform::Apns => "apns",
            Platform::Fcm => "fcm",
            Platform::Webhook => "webhook",
        }
    }
}

/// What went wrong in the push layer. Configuration errors name the key.
#[derive(Debug, thiserror::Error)]
pub enum PushError {
    #[error("{key}: {message}")]
    Config { key: &'static str, message: String },
    #[error("{0}")]
    Storage(#[from] StorageError),
    #[error("{0}")]
    Invalid(&'static str),
}

/// Counters for `/metrics`.
#[derive(Debug, Default)]
pub struct PushMetrics {
    /// Notifications a provider accepted.
    pub sent: ByPlatform,
    /// Notifications given up: rejected, dead token, or out of retries.
    pub failed: ByPlatform,
    /// Attempts repeated after a 429, a 5xx or a network error.
    pub retried: ByPlatform,
    /// Devices deleted because their provider called the token dead.
    pub tokens_removed: AtomicU64,
}

/// A count per provider (`provider` label on `/metrics`): bumped once per
/// push attempt, so plain atomics.
#[derive(Debug, Default)]
pub struct ByPlatform([AtomicU64; Platform::ALL.len()]);

impl ByPlatform {
    pub fn bump(&self, platform: Platform) {
        if let Some(c) = self.0.get(platform as usize) {
            c.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// `(provider, count)` for every provider, zeros included.
    pub fn snapshot(&self) -> Vec<(&'static str, u64)> {
        Platform::ALL
            .iter()
            .zip(self.0.iter())
            .map(|(p, c)| (p.as_str(), c.load(Ordering::Relaxed)))
            .collect()
    }
}

/// The push service: device registry, mutes and the job queue. Shared by
/// the chat layer (which enqueues), the RPC and HTTP handlers (which
/// register devices) and the [`Gateway`] (which sends).
pub struct Push {
    store: Store,
    settings: chatmq_config::Push,
    /// Platforms with a provider configured; jobs are queued only for
    /// users with a device on one of them.
    platforms: Vec<Platform>,
    registry: Mutex<Registry>,
    /// Serialises registrations: a token's move between users reads, then
    /// writes, and two moves of one token must not interleave.
    registering: tokio::sync::Mutex<()>,
    queue: Mutex<Queue>,
    /// Wakes the gateway when a job is queued.
    wake: Notify,
    pub metrics: PushMetrics,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Unix milliseconds now.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

impl Push {
    /// Loads the registry, the mutes and the queued jobs from `store`.
    pub fn open(store: Store, settings: &chatmq_config::Push) -> Result<Arc<Push>, StorageError> {
        let mut platforms = Vec::new();
        if settings.apns.is_some() {
            platforms.push(Platform::Apns);
        }
        if settings.fcm.is_some() {
            platforms.push(Platform::Fcm);
        }
        if settings.webhook.is_some() {
            platforms.push(Platform::Webhook);
        }
        let registry = Registry::load(&store, &platforms)?;
        let queue = Queue::load(&store)?;
        Ok(Arc::new(Push {
            store,
            settings: settings.clone(),
            platforms,
            registry: Mutex::new(registry),
            registering: tokio::sync::Mutex::new(()),
            queue: Mutex::new(queue),
            wake: Notify::new(),
            metrics: PushMetrics::default(),
        }))
    }

    /// Is any provider configured?
    pub fn enabled(&self) -> bool {
        !self.platforms.is_empty()
    }

    /// Jobs queued or being sent (for `/metrics`).
    pub fn queue_depth(&self) -> usize {
        lock(&self.queue).len()
    }

    /// Registers a device of `user`. A token registered to another user
    /// moves to `user` (one phone, one account at a time); registering the
    /// same device again only updates its app id.
    pub async fn register(
        &self,
        user: &str,
        platform: Platform,
        token: &str,
        app_id: Option<&str>,
    ) -> Result<Device, PushError> {
        Self::check_device(token, app_id)?;
        let device = Device {
            platform: platform.as_str().to_string(),
            token: token.to_string(),
            app_id: app_id.map(str::to_string),
        };
        let _serial = self.registering.lock().await;
        let owner = self.store.device_owner(platform.as_str(), token)?;
        let mut batch = Batch::new();
        if let Some(previous) = owner.as_deref().filter(|o| *o != user) {
            batch.delete_device(previous, platform.as_str(), token);
        }
        batch.put_device(user, &device);
        self.store.write(batch).await?;
        let mut registry = lock(&self.registry);
        if let Some(previous) = owner.as_deref().filter(|o| *o != user) {
            registry.remove(previous, platform);
        }
        if owner.as_deref() != Some(user) {
            registry.add(user, platform);
        }
        Ok(device)
    }

    /// Whether a device token and app id are what [`Push::register`]
    /// takes (checked before a cluster replicates a registration).
    pub fn check_device(token: &str, app_id: Option<&str>) -> Result<(), PushError> {
        if token.is_empty()
            || token.len() > MAX_TOKEN_LEN
            || token.chars().any(|c| c.is_control() || c.is_whitespace())
        {
            return Err(PushError::Invalid(
                "`token` must be 1 to 4096 characters, without spaces",
            ));
        }
        if app_id.is_some_and(|a| a.is_empty() || a.len() > MAX_APP_ID_LEN) {
            return Err(PushError::Invalid("`app_id` must be 1 to 255 characters"));
        }
        Ok(())
    }

    /// Whether `user` has the device `token` of `platform` (here).
    pub fn has_device(
        &self,
        user: &str,
        platform: Platform,
        token: &str,
    ) -> Result<bool, StorageError> {
        Ok(self
            .store
            .device_owner(platform.as_str(), token)?
            .as_deref()
            == Some(user))
    }

    /// Forgets a device of `user`; `false` if `user` has no such device.
    pub async fn unregister(
        &self,
        user: &str,
        platform: Platform,
        token: &str,
    ) -> Result<bool, PushError> {
        let _serial = self.registering.lock().await;
        if self
            .store
            .device_owner(platform.as_str(), token)?
            .as_deref()
            != Some(user)
        {
            return Ok(false);
        }
        let mut batch = Batch::new();
        batch.delete_device(user, platform.as_str(), token);
        self.store.write(batch).await?;
        lock(&self.registry).remove(user, platform);
        Ok(true)
    }

    /// The devices `user` registered.
    pub fn devices(&self, user: &str) -> Result<Vec<Device>, StorageError> {
        self.store.devices(user)
    }

    /// Mutes or unmutes `conv` for `user`: a muted conversation queues no
    /// notification for that user.
    pub async fn set_muted(&self, user: &str, conv: &str, muted: bool) -> Result<(), StorageError> {
        let mut batch = Batch::new();
        batch.put_mute(user, conv, muted);
        self.store.write(batch).await?;
        lock(&self.registry).set_muted(user, conv, muted);
        Ok(())
    }

    pub fn is_muted(&self, user: &str, conv: &str) -> bool {
        lock(&self.registry).is_muted(user, conv)
    }

    /// Message `seq` of `conv` from `from` reached `users`, who have no
    /// live session: for each who has a device on a configured provider
    /// and has not muted the conversation, adds to (or opens) the job of
    /// (user, conv), writing it into `batch`, the message's own batch.
    /// Returns how many jobs were touched.
    pub fn enqueue<'u>(
        &self,
        batch: &mut Batch,
        users: impl IntoIterator<Item = &'u str>,
        conv: &str,
        seq: u64,
        from: &str,
        body: &Value,
    ) -> usize {
        if !self.enabled() {
            return 0;
        }
        let wanted: Vec<&str> = {
            let registry = lock(&self.registry);
            users
                .into_iter()
                .filter(|u| registry.has_device(u) && !registry.is_muted(u, conv))
                .collect()
        };
        if wanted.is_empty() {
            return 0;
        }
        let preview = preview(body, self.settings.preview_max_chars);
        let due = now_ms().saturating_add(self.settings.debounce_ms);
        let mut opened = false;
        {
            let mut queue = lock(&self.queue);
            for user in &wanted {
                opened |= queue.add(batch, due, user, conv, seq, from, preview.clone());
            }
        }
        if opened {
            self.wake.notify_one();
        }
        wanted.len()
    }
}

/// The text a notification shows for a message body: the body itself if
/// it is a string, its `text` field if it has one, else its JSON; at most
/// `max_chars` characters (an ellipsis marks a cut).
pub fn preview(body: &Value, max_chars: usize) -> String {
    let text = match body {
        Value::String(s) => s.clone(),
        Value::Object(o) => match o.get("text") {
            Some(Value::String(s)) => s.clone(),
            _ => body.to_string(),
        },
        other => other.to_string(),
    };
    if text.chars().count() <= max_chars {
        return text;
    }
    let mut cut: String = text.chars().take(max_chars.saturating_sub(1)).collect();
    cut.push('…');
    cut
}

fn bump(counter: &AtomicU64) {
    counter.fetch_add(1, Ordering::Relaxed);
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn previews_prefer_text_and_are_cut_to_length() {
        assert_eq!(preview(&json!("hello"), 10), "hello");
        assert_eq!(preview(&json!({"text": "hi there"}), 10), "hi there");
        assert_eq!(preview(&json!({"img": 1}), 100), "{\"img\":1}");
        assert_eq!(preview(&json!("abcdefghij"), 5), "abcd…");
        assert_eq!(preview(&json!("ééééé"), 5), "ééééé");
    }

    #[tokio::test]
    async fn only_users_with_a_device_on_a_configured_provider_and_no_mute_get_jobs() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(
            dir.path(),
            chatmq_storage::SyncMode::Never,
            std::time::Duration::from_millis(5),
        )
        .unwrap();
        let settings = chatmq_config::Push {
            webhook: Some(chatmq_config::Webhook {
                url: "http://127.0.0.1:9/".into(),
                secret: None,
            }),
            ..Default::default()
        };
        let push = Push::open(store.clone(), &settings).unwrap();
        push.register("bob", Platform::Webhook, "b1", None)
            .await
            .unwrap();
        push.register("cy", Platform::Apns, "c1", None)
            .await
            .unwrap();
        push.register("dee", Platform::Webhook, "d1", None)
            .await
            .unwrap();
        push.set_muted("dee", "room", true).await.unwrap();
        let mut batch = Batch::new();
        let body = json!("hi");
        let users = ["bob", "cy", "dee", "eve"];
        assert_eq!(push.enqueue(&mut batch, users, "room", 1, "al", &body), 1);
        assert_eq!(push.enqueue(&mut batch, users, "room", 2, "al", &body), 1);
        assert_eq!(push.queue_depth(), 1, "bob's two messages share a job");
        store.write(batch).await.unwrap();

        // The token moves to eve; the queue survives reopening.
        push.register("eve", Platform::Webhook, "b1", None)
            .await
            .unwrap();
        assert!(push.devices("bob").unwrap().is_empty());
        let reopened = Push::open(store.clone(), &settings).unwrap();
        assert_eq!(reopened.queue_depth(), 1);
        assert!(reopened.is_muted("dee", "room"));
        let mut batch = Batch::new();
        assert_eq!(
            reopened.enqueue(&mut batch, users, "room", 3, "al", &body),
            1
        );
        let jobs = store.push_jobs().unwrap();
        assert_eq!((jobs[0].user.as_str(), jobs[0].record.count), ("bob", 2));

        let off = Push::open(store.clone(), &Default::default()).unwrap();
        assert_eq!(
            off.enqueue(&mut Batch::new(), users, "room", 4, "al", &body),
            0
        );
        store.close();
    }

    #[test]
    fn platforms_have_their_contract_names() {
        for p in Platform::ALL {
            assert_eq!(Platform::parse(p.as_str()), Some(p));
        }
        assert_eq!(Platform::parse("gcm"), None);
    }
}
