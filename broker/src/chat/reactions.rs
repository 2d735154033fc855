//! Reactions (issue #13 item 3): members add and remove an emoji on a
//! message by its seq, once per (user, emoji). Each reaction is a key of
//! the `reaction` column family, written before the call answers, so
//! reactions survive a restart; history gives each message's summary,
//! `{"👍": {"count": 1000, "mine": true}}`, `mine` for the caller.
//!
//! Live, members do not get one delivery per reaction: the changed
//! messages of a conversation are gathered and their summaries (counts
//! only: the same bytes for every member) go out once per
//! `chat.reaction_window_ms` as one `reactions` event on
//! `users/{user}/events` (`announcements.rs`). A member learns its own
//! state from its call's answer and from history.
//!
//! The users behind each message's counts are cached ([`ReactionCache`]),
//! loaded from the column family on first use (after a writer flush, so
//! every reaction submitted before is read) and bounded; the cache is
//! what makes "once per user and emoji" exact while writes are in flight.
//!
//! With `[cluster]`, a reaction is checked on the node asked, then goes
//! through the records stream and every node applies it
//! ([`Chat::react_here`]) in that stream's order: all nodes have all
//! reactions and agree on the counts, and each tells its own members.
//!
//! Room reactions (`reactions/{conv}`, a live "🎉" with no message) are
//! like typing indicators: QoS 0, never stored, forwarded to the members
//! online, throttled per user and conversation.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::Ordering;
use std::sync::Arc;

use bytes::Bytes;
use chatmq_cluster::wire::MetaRecord;
use chatmq_storage::{Batch, Commit};
use rumqttc::v5::mqttbytes::QoS;
use serde_json::{json, Map, Value};

use super::edits::is_event_type;
use super::{lock, Chat, RpcError};
use crate::blocking;
use crate::clock::now_ms;
use crate::message::Message;

/// The longest reaction, in bytes (a few code points: flags, skin tones
/// and ZWJ sequences are long).
pub const MAX_EMOJI_BYTES: usize = 32;
/// Distinct reactions one message may have.
pub const MAX_DISTINCT: usize = 20;
/// (emoji, user) entries the cache holds over all its messages.
const MAX_CACHED_ENTRIES: usize = 1 << 20;
/// Messages the cache holds.
const MAX_CACHED_MESSAGES: usize = 100_000;

/// The reactions of one message, as loaded and kept up to date.
struct Entry {
    /// False for a message that cannot take reactions (deleted, a change
    /// record, gone).
    open: bool,
    by: BTreeMap<String, HashSet<Arc<str>>>,
    used: u64,
}

impl Entry {
    fn len(&self) -> usize {
        self.by.values().map(HashSet::len).sum()
    }

    /// Counts, and `mine` for `user` when given.
    fn summary(&self, user: Option<&str>) -> Value {
        let mut out = Map::new();
        for (emoji, users) in &self.by {
            let mut e = Map::new();
            e.insert("count".into(), json!(users.len()));
            if let Some(u) = user {
                e.insert("mine".into(), json!(users.contains(u)));
            }
            out.insert(emoji.clone(), Value::Object(e));
        }
        Value::Object(out)
    }
}

#[derive(Default)]
pub(super) struct ReactionCache {
    entries: HashMap<(Arc<str>, u64), Entry>,
    held: usize,
    tick: u64,
    /// Bumped by every eviction: a load that saw one meanwhile reads again.
    evictions: u64,
}

impl ReactionCache {
    fn evict(&mut self) {
        if self.held <= MAX_CACHED_ENTRIES && self.entries.len() <= MAX_CACHED_MESSAGES {
            return;
        }
        let mut by_use: Vec<(u64, (Arc<str>, u64))> = self
            .entries
            .iter()
            .map(|(k, e)| (e.used, k.clone()))
            .collect();
        by_use.sort_unstable();
        for (_, k) in by_use {
            if self.held <= MAX_CACHED_ENTRIES * 9 / 10
                && self.entries.len() <= MAX_CACHED_MESSAGES * 9 / 10
            {
                break;
            }
            if let Some(e) = self.entries.remove(&k) {
                self.held = self.held.saturating_sub(e.len());
            }
        }
        self.evictions += 1;
    }
}

/// What [`Chat::apply_reaction`] did.
enum Applied {
    Done {
        commit: Commit,
        changed: bool,
        /// The summary with the caller's `mine`, and the counts alone.
        mine: Value,
        all: Value,
    },
    /// The message is not in the cache: load it (this many evictions so far).
    NotCached { evictions: u64 },
}

/// Why a message does not take a change of its reactions, if it does not.
fn refusal(e: &Entry, emoji: &str, add: bool) -> Option<RpcError> {
    if !e.open {
        return Some(RpcError::new("not_found", "no such message to react to"));
    }
    if add && !e.by.contains_key(emoji) && e.by.len() >= MAX_DISTINCT {
        return Some(RpcError::new(
            "too_many_reactions",
            format!("a message takes at most {MAX_DISTINCT} distinct reactions"),
        ));
    }
    None
}

/// Is `emoji` a reaction chatmq keeps: 1 to [`MAX_EMOJI_BYTES`] bytes, no
/// whitespace or control characters.
pub fn valid_emoji(emoji: &str) -> bool {
    (1..=MAX_EMOJI_BYTES).contains(&emoji.len())
        && !emoji.chars().any(|c| c.is_control() || c.is_whitespace())
}

impl Chat {
    /// `user` adds (`add`) or removes its `emoji` on message `seq` of
    /// `conv`. Answers the message's summary with `user`'s `mine`, once
    /// the change is durable. Adding twice, or removing what is not
    /// there, changes nothing.
    pub async fn react(
        &self,
        conv: &str,
        seq: u64,
        user: &str,
        emoji: &str,
        add: bool,
    ) -> Result<Value, RpcError> {
        if !valid_emoji(emoji) {
            return Err(RpcError::bad(format!(
                "`emoji` must be 1 to {MAX_EMOJI_BYTES} bytes with no spaces or control characters"
            )));
        }
        if !self.is_member(conv, user) {
            return Err(RpcError::new(
                "not_member",
                "you are not a member of this conversation",
            ));
        }
        let (head, first) = self.bounds(conv).await?;
        if seq < first || seq > head {
            return Err(RpcError::new("not_found", "no such message to react to"));
        }
        let key: (Arc<str>, u64) = (conv.into(), seq);
        if let Some(r) = self.replicated() {
            // Checked here, applied by every node (this one included) in
            // the records stream's order, so all agree on the counts.
            loop {
                let evictions = match self.check_reaction(&key, emoji, add) {
                    Ok(()) => break,
                    Err(Some(refused)) => return Err(refused),
                    Err(None) => lock(&self.reaction_cache).evictions,
                };
                self.cache_reactions(&key, evictions).await?;
            }
            let record = MetaRecord::React {
                conv: conv.to_string(),
                seq,
                user: user.to_string(),
                emoji: emoji.to_string(),
                add,
            };
            self.replicate_meta(&r, record).await?;
            let mut summary = self.summaries(conv, &[seq], Some(user)).await?;
            return Ok(summary.remove(&seq).unwrap_or_else(|| json!({})));
        }
        self.react_here(&key, user, emoji, add).await
    }

    /// [`Chat::react`] on this node's copy (one node alone, or a record
    /// of the cluster's records stream, checked again: what comes from
    /// NATS is untrusted).
    pub(super) async fn react_here(
        &self,
        key: &(Arc<str>, u64),
        user: &str,
        emoji: &str,
        add: bool,
    ) -> Result<Value, RpcError> {
        let (conv, seq) = (&*key.0, key.1);
        if !valid_emoji(emoji) || !self.is_member(conv, user) {
            return Err(RpcError::new("not_member", "not a member, or not an emoji"));
        }
        loop {
            let evictions = match self.apply_reaction(key, user, emoji, add)? {
                Applied::Done {
                    commit,
                    changed,
                    mine,
                    all,
                } => {
                    commit.await?;
                    if changed {
                        self.metrics.reactions.fetch_add(1, Ordering::Relaxed);
                        self.gather_reactions(conv, seq, all);
                    }
                    return Ok(mine);
                }
                Applied::NotCached { evictions } => evictions,
            };
            self.cache_reactions(key, evictions).await?;
        }
    }

    /// Loads a message's reactions into the cache, unless an eviction
    /// since `evictions` (or another load) makes what was read stale.
    async fn cache_reactions(&self, key: &(Arc<str>, u64), evictions: u64) -> Result<(), RpcError> {
        let entry = self.load_reactions(&key.0, key.1).await?;
        let mut cache = lock(&self.reaction_cache);
        if cache.evictions == evictions && !cache.entries.contains_key(key) {
            cache.held = cache.held.saturating_add(entry.len());
            cache.entries.insert(key.clone(), entry);
            cache.evict();
        }
        Ok(())
    }

    /// Whether the cached message takes this change: `Err(None)` if it is
    /// not cached.
    fn check_reaction(
        &self,
        key: &(Arc<str>, u64),
        emoji: &str,
        add: bool,
    ) -> Result<(), Option<RpcError>> {
        let cache = lock(&self.reaction_cache);
        let e = cache.entries.get(key).ok_or(None)?;
        match refusal(e, emoji, add) {
            Some(refused) => Err(Some(refused)),
            None => Ok(()),
        }
    }

    /// The change on the cached entry, its write submitted (under the
    /// cache's lock: the writes of one message's reactions reach the
    /// writer in the order the cache applied them).
    fn apply_reaction(
        &self,
        key: &(Arc<str>, u64),
        user: &str,
        emoji: &str,
        add: bool,
    ) -> Result<Applied, RpcError> {
        let (conv, seq) = (&*key.0, key.1);
        let mut cache = lock(&self.reaction_cache);
        cache.tick += 1;
        let tick = cache.tick;
        let evictions = cache.evictions;
        let Some(e) = cache.entries.get_mut(key) else {
            return Ok(Applied::NotCached { evictions });
        };
        e.used = tick;
        if let Some(refused) = refusal(e, emoji, add) {
            return Err(refused);
        }
        let mut batch = Batch::new();
        let changed = if add {
            let new =
                e.by.entry(emoji.to_string())
                    .or_default()
                    .insert(user.into());
            if new {
                batch.put_reaction(conv, seq, emoji, user);
            }
            new
        } else {
            let gone = e.by.get_mut(emoji).is_some_and(|s| s.remove(user));
            if e.by.get(emoji).is_some_and(HashSet::is_empty) {
                e.by.remove(emoji);
            }
            if gone {
                batch.delete_reaction(conv, seq, emoji, user);
            }
            gone
        };
        let (mine, all) = (e.summary(Some(user)), e.summary(None));
        let commit = if changed {
            cache.held = if add {
                cache.held.saturating_add(1)
            } else {
                cache.held.saturating_sub(1)
            };
            self.store.submit_now(batch)
        } else {
            Commit::ready()
        };
        Ok(Applied::Done {
            commit,
            changed,
            mine,
            all,
        })
    }

    /// A message's reactions from the column family, after everything
    /// submitted before is durable.
    async fn load_reactions(&self, conv: &str, seq: u64) -> Result<Entry, RpcError> {
        self.store.flush().await?;
        let c = conv.to_string();
        let (message, reactions) = blocking::read(&self.store, move |s| {
            Ok((s.message(&c, seq)?, s.reactions(&c, seq)?))
        })
        .await?;
        let open = message
            .and_then(|b| serde_json::from_slice::<Value>(&b).ok())
            .is_some_and(|m| {
                m.get("deleted").is_none()
                    && !is_event_type(m.get("type").and_then(Value::as_str).unwrap_or(""))
            });
        let mut by: BTreeMap<String, HashSet<Arc<str>>> = BTreeMap::new();
        for (emoji, user) in reactions {
            by.entry(emoji).or_default().insert(user.into());
        }
        Ok(Entry { open, by, used: 0 })
    }

    /// The counts of message `seq` of `conv` as the cache has them now.
    pub(super) fn cached_summary(&self, conv: &str, seq: u64) -> Option<Value> {
        let cache = lock(&self.reaction_cache);
        let e = cache.entries.get(&(Arc::from(conv), seq))?;
        e.open.then(|| e.summary(None))
    }

    /// Message `seq` of `conv` takes no more reactions (it is being
    /// deleted): kept in the cache as closed, so no reaction is written
    /// after the delete's batch.
    pub(super) fn forget_reactions(&self, conv: &str, seq: u64) {
        let mut cache = lock(&self.reaction_cache);
        let entry = Entry {
            open: false,
            by: BTreeMap::new(),
            used: cache.tick,
        };
        if let Some(old) = cache.entries.insert((conv.into(), seq), entry) {
            cache.held = cache.held.saturating_sub(old.len());
        }
        cache.evict();
    }

    /// Drops message `seq` of `conv` from the cache (a delete that failed):
    /// the next reaction loads it from storage.
    pub(super) fn unload_reactions(&self, conv: &str, seq: u64) {
        let mut cache = lock(&self.reaction_cache);
        if let Some(old) = cache.entries.remove(&(Arc::from(conv), seq)) {
            cache.held = cache.held.saturating_sub(old.len());
        }
        cache.evictions += 1;
    }

    /// The summaries of messages `seqs` of `conv` for `user` (history).
    pub(super) async fn summaries(
        &self,
        conv: &str,
        seqs: &[u64],
        user: Option<&str>,
    ) -> Result<HashMap<u64, Value>, RpcError> {
        let mut out = HashMap::new();
        let mut missing = Vec::new();
        {
            let cache = lock(&self.reaction_cache);
            for seq in seqs {
                match cache.entries.get(&(Arc::from(conv), *seq)) {
                    Some(e) => {
                        out.insert(*seq, e.summary(user));
                    }
                    None => missing.push(*seq),
                }
            }
        }
        if missing.is_empty() {
            return Ok(out);
        }
        let c = conv.to_string();
        let read = blocking::read(&self.store, move |s| {
            missing
                .into_iter()
                .map(|seq| s.reactions(&c, seq).map(|r| (seq, r)))
                .collect::<Result<Vec<_>, _>>()
        })
        .await?;
        for (seq, reactions) in read {
            let mut by: BTreeMap<String, HashSet<Arc<str>>> = BTreeMap::new();
            for (emoji, u) in reactions {
                by.entry(emoji).or_default().insert(u.into());
            }
            let e = Entry {
                open: true,
                by,
                used: 0,
            };
            out.insert(seq, e.summary(user));
        }
        Ok(out)
    }

    /// A room reaction from `from` in `conv` (on `reactions/{conv}`): to
    /// the other members online, QoS 0, never stored, throttled like
    /// typing. The payload is `{"emoji": "..."}`.
    pub fn room_reaction(
        &self,
        conv: &str,
        from: &str,
        client_id: &str,
        payload: &[u8],
    ) -> Result<bool, &'static str> {
        let emoji = serde_json::from_slice::<Value>(payload)
            .ok()
            .and_then(|v| v.get("emoji").and_then(Value::as_str).map(str::to_string));
        let Some(emoji) = emoji.filter(|e| valid_emoji(e)) else {
            return Err("bad_reaction");
        };
        if !self.room_reactions.admit(conv, from, now_ms()) {
            self.metrics
                .room_reactions_throttled
                .fetch_add(1, Ordering::Relaxed);
            return Ok(false);
        }
        let body = json!({"conv": conv, "from": from, "ts": now_ms(), "emoji": emoji});
        let msg = Arc::new(Message::from_server(
            format!("reactions/{conv}"),
            Bytes::from(body.to_string()),
            QoS::AtMostOnce,
            false,
        ));
        self.deliver(&self.members(conv), &msg, Some(client_id));
        self.live_send(chatmq_cluster::live::Live::Conv {
            conv: conv.to_string(),
            topic: msg.topic.clone(),
            body: body.to_string(),
            except: client_id.to_string(),
        });
        Ok(true)
    }
}
