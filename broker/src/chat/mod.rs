//! The chat layer: conversations with sequenced, durable messages.
//!
//! The story of a chat message (DESIGN §3): the channel hands a validated
//! [`Envelope`] from a member to [`Chat::append`]. Under the conversation's
//! lock it is checked against the idempotency keys, gets the next seq, and
//! its writes (message, head, idempotency key) are submitted to the
//! group-commit writer, in seq order. The conversation's dispatcher shard
//! takes appended messages in that same order, waits for each commit, and
//! only then fans the message out to the online members' sessions and
//! resolves the publisher's ack: acked means on disk, and every receiver
//! sees seqs in order. Conversations are spread over [`DISPATCH_SHARDS`]
//! shards, each its own task, so a large group's fan-out (or a slow commit)
//! holds up only the conversations of its shard. A session that lacks
//! earlier seqs (it resumed, or fell behind) reads them from the log first
//! ([`Offer::Gap`](crate::session::Offer::Gap)), so replay and live
//! delivery meet without gap or duplicate.
//!
//! Chat topics never go through the plain router: only this module
//! decides who receives them, by membership, so no wildcard can leak a
//! conversation to a non-member.
//!
//! Where each part lives: `sequencer.rs` gives seqs and submits writes,
//! `fanout.rs` delivers committed messages (and the server's own events),
//! `catchup.rs` replays from the log (through the pages
//! `replay_pages.rs` shares between sessions), `presence.rs` tracks who is online,
//! `admin.rs` changes membership, `announcements.rs` coalesces large
//! groups' receipts and membership changes, `queries.rs` answers history, lists and
//! read receipts, [`typing`] forwards typing indicators, [`edits`] edits
//! and deletes messages, [`reactions`] keeps reactions and their
//! summaries, `occupancy.rs` counts members and who is connected, [`attachments`]
//! keeps uploaded files' records and collects unreferenced ones, and `hooks.rs` is
//! what the MQTT channel asks (through [`crate::hooks::Hooks`]). This file
//! holds the shared state and its construction.

mod admin;
pub mod announcements;
pub mod attachments;
mod catchup;
pub mod dedup;
pub mod edits;
mod fanout;
mod hooks;
pub mod live;
pub mod membership;
pub mod namespace;
mod occupancy;
pub mod presence;
mod queries;
pub mod reactions;
mod replay_pages;
pub mod replicated;
pub mod retention;
pub mod rpc;
mod sequencer;
pub mod typing;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock, Weak};

use chatmq_bridge::push::Push;
use chatmq_storage::{Role, StorageError, Store};
use tokio::sync::mpsc;

use crate::broker::{Metrics, SessionCell};
use crate::clock::now_ms;
pub use catchup::{Heads, REPLAY_WINDOW};
pub use chatmq_protocol::envelope::{BadEnvelope, Envelope};
pub use fanout::DISPATCH_SHARDS;
use fanout::{Dispatch, DISPATCH_QUEUE};
use membership::Membership;
use sequencer::{ConvCache, ConvSlot};
pub use typing::Typing;
use typing::TypingThrottle;

/// The chat layer's state, shared by every connection.
pub struct Chat {
    store: Store,
    membership: RwLock<Membership>,
    convs: Mutex<HashMap<Arc<str>, Arc<ConvSlot>>>,
    conv_cache: Mutex<ConvCache>,
    typing: TypingThrottle,
    typing_max_bytes: usize,
    /// Connected sessions of each user.
    online: Mutex<HashMap<Arc<str>, Vec<Arc<SessionCell>>>>,
    /// Every session of each user, connected or not (to seed cursors).
    sessions: Mutex<HashMap<Arc<str>, Vec<Weak<SessionCell>>>>,
    /// Last known presence of each user: (online, unix ms).
    presence: Mutex<HashMap<Arc<str>, (bool, u64)>>,
    /// Users with a connected session that subscribed to a filter that can
    /// match `presence/...` (over-approximated: an unsubscribe does not
    /// remove one, the last session going offline does). A presence change
    /// is offered to these only, so a member of a large group who flaps
    /// costs O(watchers), not O(members), when few watch presence.
    watchers: Mutex<std::collections::HashSet<Arc<str>>>,
    /// One queue per dispatcher shard (see [`Chat::shard`]).
    dispatch: Vec<mpsc::Sender<Dispatch>>,
    dispatch_rx: Mutex<Vec<mpsc::Receiver<Dispatch>>>,
    /// The runtime the connections run on, where catch-ups are started
    /// (the dispatcher shards run on a thread of their own).
    runtime: std::sync::OnceLock<tokio::runtime::Handle>,
    /// The most messages one history call returns.
    pub history_cap: usize,
    metrics: Arc<Metrics>,
    /// Devices, mutes and the push queue: offline members get a job.
    pub push: Arc<Push>,
    /// Makes generated conversation ids unique within a millisecond.
    next_conv: AtomicU64,
    /// When each conversation is next due for a trim (`chat/retention.rs`).
    retention: retention::Retention,
    /// Large groups' receipts and membership changes waiting for their
    /// digest (`chat/announcements.rs`).
    announcements: announcements::Announcements,
    /// Users whose presence was told within the last window
    /// (`chat/presence.rs`).
    presence_windows: presence::PresenceWindows,
    /// Log pages read by catch-ups, shared by the sessions replaying the
    /// same conversation (`chat/replay_pages.rs`).
    replay: replay_pages::ReplayPages,
    /// Scrubs deleted messages out of the files (`chat/edits.rs`).
    scrubber: edits::Scrubber,
    /// Who reacted to what, for the messages reacted to lately
    /// (`chat/reactions.rs`).
    reaction_cache: Mutex<reactions::ReactionCache>,
    /// Room reactions forwarded per user and conversation.
    room_reactions: TypingThrottle,
    /// Conversations someone subscribed to `occupancy/{conv}` of
    /// (`chat/occupancy.rs`).
    occupancy_watched: Mutex<std::collections::HashSet<Arc<str>>>,
    /// Uploaded files and their collector (`chat/attachments.rs`).
    attachments: attachments::Attachments,
    /// With `[cluster]`: the streams appends, membership and read state
    /// go through (`chat/replicated.rs`); unset on a single node.
    replicated: std::sync::OnceLock<Arc<replicated::Replicated>>,
    /// With `[cluster]`: presence, typing and room reactions to and from
    /// the other nodes (`chat/live.rs`).
    live: std::sync::OnceLock<Arc<live::LiveLink>>,
}

/// Who a change by the HTTP admin token is recorded as (`by`).
pub const SYSTEM_EDITOR: &str = "system";

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Chat {
    pub fn new(store: Store, metrics: Arc<Metrics>, push: Arc<Push>) -> Result<Chat, StorageError> {
        let mut membership = Membership::default();
        for (conv, user, role) in store.all_members()? {
            membership.add(&conv, &user, role);
        }
        let (dispatch, rx) = (0..DISPATCH_SHARDS)
            .map(|_| mpsc::channel(DISPATCH_QUEUE))
            .unzip();
        Ok(Chat {
            store,
            membership: RwLock::new(membership),
            convs: Mutex::new(HashMap::new()),
            conv_cache: Mutex::new(ConvCache {
                max: usize::MAX,
                idle_ms: u64::MAX,
                swept_ms: now_ms(),
                swept_len: 0,
            }),
            typing: TypingThrottle::new(0),
            typing_max_bytes: usize::MAX,
            online: Mutex::new(HashMap::new()),
            sessions: Mutex::new(HashMap::new()),
            presence: Mutex::new(HashMap::new()),
            watchers: Mutex::new(std::collections::HashSet::new()),
            dispatch,
            dispatch_rx: Mutex::new(rx),
            runtime: std::sync::OnceLock::new(),
            history_cap: 200,
            metrics,
            push,
            next_conv: AtomicU64::new(0),
            retention: retention::Retention::default(),
            announcements: announcements::Announcements::default(),
            presence_windows: presence::PresenceWindows::default(),
            replay: replay_pages::ReplayPages::default(),
            scrubber: edits::Scrubber::default(),
            reaction_cache: Mutex::default(),
            room_reactions: TypingThrottle::new(0),
            occupancy_watched: Mutex::default(),
            attachments: attachments::Attachments::new(
                &chatmq_config::Attachments::default(),
                std::path::Path::new("data"),
            ),
            replicated: std::sync::OnceLock::new(),
            live: std::sync::OnceLock::new(),
        })
    }

    /// Applies the flow-control settings of `[chat]`: typing throttle and
    /// size cap, the bounds of the conversation cache, which groups are
    /// large and their announcement window.
    pub fn limit(&mut self, settings: &chatmq_config::Chat) {
        self.announcements.large_group = settings.large_group_members;
        self.announcements.window_ms = settings.announce_window_ms;
        self.announcements.reaction_window_ms = settings.reaction_window_ms;
        self.announcements.occupancy_window_ms = settings.occupancy_window_ms;
        self.room_reactions = TypingThrottle::new(settings.room_reaction_interval_ms);
        self.typing = TypingThrottle::new(settings.typing_interval_ms);
        self.typing_max_bytes = settings.typing_max_bytes;
        let cache = self.conv_cache.get_mut().unwrap_or_else(|e| e.into_inner());
        cache.max = settings.conv_cache_max;
        cache.idle_ms = settings.conv_idle_secs.saturating_mul(1000);
    }

    /// A fresh id for a group conversation created without one.
    pub fn fresh_conv_id(&self) -> String {
        let n = self.next_conv.fetch_add(1, Ordering::Relaxed);
        format!("g-{:x}-{:x}{:x}", now_ms(), std::process::id(), n)
    }

    /// Does `conv` exist: a group with members, or a direct conversation?
    pub fn exists(&self, conv: &str) -> bool {
        self.members_read().exists(conv)
    }

    fn count_dropped(&self, before: u64, after: u64) {
        if after > before {
            self.metrics
                .messages_dropped
                .fetch_add(after - before, Ordering::Relaxed);
        }
    }

    pub fn epoch(&self) -> &str {
        self.store.epoch()
    }

    fn members_read(&self) -> std::sync::RwLockReadGuard<'_, Membership> {
        self.membership.read().unwrap_or_else(|e| e.into_inner())
    }

    fn members_write(&self) -> std::sync::RwLockWriteGuard<'_, Membership> {
        self.membership.write().unwrap_or_else(|e| e.into_inner())
    }

    pub fn is_member(&self, conv: &str, user: &str) -> bool {
        self.members_read().is_member(conv, user)
    }

    pub fn role(&self, conv: &str, user: &str) -> Option<Role> {
        self.members_read().role(conv, user)
    }

    /// Whether `user` has a connected session now (with `[cluster]`, on
    /// any node).
    pub fn is_online(&self, user: &str) -> bool {
        lock(&self.online).contains_key(user) || self.online_elsewhere(user)
    }

    pub fn members(&self, conv: &str) -> Vec<Arc<str>> {
        self.members_read().members(conv)
    }

    pub fn conversations_of(&self, user: &str) -> Vec<Arc<str>> {
        self.members_read().conversations(user)
    }

    /// Does `viewer` see `user`'s presence (they share a conversation)?
    pub fn shares_conversation(&self, viewer: &str, user: &str) -> bool {
        viewer == user || self.members_read().share(viewer, user)
    }

    /// Knows `cell` as one of `user`'s sessions (at restore and connect).
    pub fn register(&self, user: &Arc<str>, cell: &Arc<SessionCell>) {
        let mut sessions = lock(&self.sessions);
        let cells = sessions.entry(user.clone()).or_default();
        cells.retain(|w| w.strong_count() > 0 && !std::ptr::eq(w.as_ptr(), Arc::as_ptr(cell)));
        cells.push(Arc::downgrade(cell));
    }

    /// Every session of `user` still alive, connected or not (a replaced
    /// one may linger while its connection closes).
    pub fn sessions_of(&self, user: &str) -> Vec<Arc<SessionCell>> {
        lock(&self.sessions)
            .get(user)
            .map(|v| v.iter().filter_map(Weak::upgrade).collect())
            .unwrap_or_default()
    }
}

/// A refused RPC or HTTP call: a stable code and a sentence.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RpcError {
    pub code: &'static str,
    pub message: String,
}

impl RpcError {
    pub fn new(code: &'static str, message: impl Into<String>) -> RpcError {
        RpcError {
            code,
            message: message.into(),
        }
    }
    pub fn bad(message: impl Into<String>) -> RpcError {
        RpcError::new("bad_request", message)
    }
}

impl From<StorageError> for RpcError {
    fn from(e: StorageError) -> Self {
        tracing::error!(error = %e, "storage error in a chat call");
        RpcError::new("internal", "storage error")
    }
}
