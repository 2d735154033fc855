//! What is shown of each conversation: every seq once, in order.
//!
//! Deliveries can repeat (a QoS 1 redelivery after a reconnect, a history
//! page overlapping a live message) and, around a resume, arrive ahead of
//! what fills the gap before them. The timeline shows a message when it is
//! the next seq of its conversation, drops anything at or below the last
//! seq shown, and holds a message that skips ahead until a history page
//! fills the gap (asking for that page itself).
//!
//! The last seq shown lives in the state file (`State::last_seq`); the
//! timeline keeps only what is held and which gaps are being fetched.
//! No I/O here: callers persist the state and send the requests.

use std::collections::{BTreeMap, HashSet};

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// A chat message as the broker delivers it (DESIGN §4): on `chat/+` and
/// in `rpc/history` results.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Message {
    /// The conversation id.
    pub conv: String,
    /// Its place in the conversation, assigned by the broker: 1, 2, 3...
    pub seq: u64,
    /// The envelope id the sender chose (ours are `<device>-<n>`).
    pub id: String,
    /// The sender's user id, set by the broker.
    pub from: String,
    /// When the broker stored it, milliseconds since the Unix epoch.
    #[serde(default)]
    pub ts: u64,
    /// The envelope type (`text` unless the sender said otherwise).
    #[serde(rename = "type", default = "text")]
    pub kind: String,
    /// The body as the sender wrote it: any JSON value. After an edit,
    /// in history and replays, the new body; `null` once deleted.
    #[serde(default)]
    pub body: Value,
    /// For a change record (`type` `message.edit` or `message.delete`):
    /// the seq of the message it changes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target: Option<u64>,
    /// In history and replays: the last edit of this message.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub edited: Option<Change>,
    /// In history and replays: the seqs of this message's edit records.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub edits: Vec<u64>,
    /// In history and replays: the message was deleted (its body is gone).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deleted: Option<Deletion>,
    /// In history: the reactions to this message, by emoji, with `mine`.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub reactions: BTreeMap<String, Reaction>,
}

impl Message {
    /// A change record: an edit or a delete of message [`Message::target`].
    pub fn is_change(&self) -> bool {
        self.kind.starts_with("message.")
    }

    /// Deleted: the message itself, or an edit of a message since deleted.
    pub fn is_deleted(&self) -> bool {
        self.deleted.is_some()
    }
}

/// Who changed a message and where the change sits in the log (DESIGN §4,
/// "Edits and deletes").
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Change {
    /// The seq of the change record.
    pub seq: u64,
    /// Who changed it: the sender, the owner or the admin.
    pub by: String,
    /// When, milliseconds since the Unix epoch.
    #[serde(default)]
    pub ts: u64,
}

/// How history marks a deleted message: the delete itself on the message,
/// `true` on the edit records of a message since deleted.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Deletion {
    By(Change),
    Flag(bool),
}

/// One emoji's reactions to a message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reaction {
    /// How many members reacted with it.
    pub count: u64,
    /// Whether we did: in history and in the answer to our own call;
    /// `None` in the summaries everyone gets, which carry counts only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mine: Option<bool>,
}

/// The reactions of one message as a summary event gives them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reactions {
    pub seq: u64,
    /// By emoji; empty when the last reaction was taken back.
    #[serde(default)]
    pub reactions: BTreeMap<String, Reaction>,
}

fn text() -> String {
    "text".into()
}

/// The outcome of a delivery or a history page.
#[derive(Debug, Default, PartialEq)]
pub(crate) struct Step {
    /// Messages to show now, in order.
    pub show: Vec<Message>,
    /// Ask for history of this conversation after this seq.
    pub fetch: Option<(String, u64)>,
}

#[derive(Debug, Default)]
pub(crate) struct Timeline {
    /// Messages ahead of a gap, per conversation, by seq.
    held: BTreeMap<String, BTreeMap<u64, Message>>,
    /// Conversations with a history request unanswered (perhaps lost with
    /// its connection).
    fetching: HashSet<String>,
}

impl Timeline {
    /// A message delivered live (or replayed by the session).
    pub fn live(&mut self, last: &mut BTreeMap<String, u64>, m: Message) -> Step {
        let mut step = Step::default();
        let conv = m.conv.clone();
        match last.get(&conv).copied() {
            // A conversation seen for the first time starts where it is
            // met: the session's cursor began there.
            None => show(last, m, &mut step),
            Some(l) if m.seq <= l => {}
            Some(l) if m.seq == l + 1 => show(last, m, &mut step),
            Some(l) => {
                self.held.entry(conv.clone()).or_default().insert(m.seq, m);
                if self.fetching.insert(conv.clone()) {
                    step.fetch = Some((conv.clone(), l));
                }
            }
        }
        self.release(&conv, last, &mut step);
        step
    }

    /// Asks for history of `conv` after its last seq, whether or not a
    /// request is outstanding (a new connection asks again what the old
    /// one may have lost); `None` if the conversation is unknown.
    pub fn fill(&mut self, last: &BTreeMap<String, u64>, conv: &str) -> Option<(String, u64)> {
        let l = *last.get(conv)?;
        self.fetching.insert(conv.to_string());
        Some((conv.to_string(), l))
    }

    /// A history page of `conv` answering a fill: `messages` in seq order,
    /// `head` the conversation's last seq when the page was read. Asks for
    /// the next page while the page made progress and a gap remains.
    pub fn page(
        &mut self,
        last: &mut BTreeMap<String, u64>,
        conv: &str,
        mut messages: Vec<Message>,
        head: u64,
    ) -> Step {
        self.fetching.remove(conv);
        let mut step = Step::default();
        messages.sort_by_key(|m| m.seq);
        let before = last.get(conv).copied().unwrap_or(0);
        for m in messages.into_iter().filter(|m| m.conv == conv) {
            // History is the log itself: a seq it skips was trimmed by
            // retention, so it is taken even if it is not the next one.
            if m.seq > last.get(conv).copied().unwrap_or(0) {
                show(last, m, &mut step);
            }
        }
        self.release(conv, last, &mut step);
        let now = last.get(conv).copied().unwrap_or(0);
        let held = self.held.get(conv).is_some_and(|h| !h.is_empty());
        if now > before && (now < head || held) {
            self.fetching.insert(conv.to_string());
            step.fetch = Some((conv.to_string(), now));
        } else if held {
            // History has nothing between us and what is held: the seqs
            // in between are gone; show what is held, in order.
            if let Some(h) = self.held.remove(conv) {
                for m in h.into_values().filter(|m| m.seq > now) {
                    show(last, m, &mut step);
                }
            }
        }
        step
    }

    /// A fill the broker answered with an error: the held messages wait
    /// for the next connection.
    pub fn abandon(&mut self, conv: &str) {
        self.fetching.remove(conv);
    }

    /// Conversations still missing history: an unanswered request, or
    /// messages held behind a gap.
    pub fn wanted(&self) -> Vec<String> {
        let mut convs: Vec<String> = self.fetching.iter().cloned().collect();
        convs.extend(
            self.held
                .keys()
                .filter(|c| !self.fetching.contains(*c))
                .cloned(),
        );
        convs.sort();
        convs
    }

    /// Shows held messages of `conv` that are now next in line.
    fn release(&mut self, conv: &str, last: &mut BTreeMap<String, u64>, step: &mut Step) {
        let Some(held) = self.held.get_mut(conv) else {
            return;
        };
        while let Some(entry) = held.first_entry() {
            let l = last.get(conv).copied().unwrap_or(0);
            if *entry.key() <= l {
                entry.remove();
            } else if *entry.key() == l + 1 {
                show(last, entry.remove(), step);
            } else {
                break;
            }
        }
        if held.is_empty() {
            self.held.remove(conv);
        }
    }
}

fn show(last: &mut BTreeMap<String, u64>, m: Message, step: &mut Step) {
    last.insert(m.conv.clone(), m.seq);
    step.show.push(m);
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn msg(conv: &str, seq: u64) -> Message {
        Message {
            conv: conv.into(),
            seq,
            id: format!("m{seq}"),
            from: "bob".into(),
            ts: 1,
            kind: "text".into(),
            body: json!(format!("hi {seq}")),
            target: None,
            edited: None,
            edits: Vec::new(),
            deleted: None,
            reactions: BTreeMap::new(),
        }
    }

    fn seqs(step: &Step) -> Vec<u64> {
        step.show.iter().map(|m| m.seq).collect()
    }

    #[test]
    fn in_order_messages_are_shown_and_repeats_are_dropped() {
        let mut t = Timeline::default();
        let mut last = BTreeMap::from([("c".to_string(), 2)]);
        assert_eq!(seqs(&t.live(&mut last, msg("c", 3))), [3]);
        assert_eq!(seqs(&t.live(&mut last, msg("c", 3))), Vec::<u64>::new());
        assert_eq!(seqs(&t.live(&mut last, msg("c", 1))), Vec::<u64>::new());
        assert_eq!(seqs(&t.live(&mut last, msg("c", 4))), [4]);
        assert_eq!(last["c"], 4);
    }

    #[test]
    fn a_new_conversation_starts_where_it_is_met() {
        let mut t = Timeline::default();
        let mut last = BTreeMap::new();
        let step = t.live(&mut last, msg("team", 7));
        assert_eq!(seqs(&step), [7]);
        assert_eq!(step.fetch, None);
        assert_eq!(last["team"], 7);
    }

    #[test]
    fn a_message_past_a_gap_waits_for_history_which_is_asked_once() {
        let mut t = Timeline::default();
        let mut last = BTreeMap::from([("c".to_string(), 2)]);
        let step = t.live(&mut last, msg("c", 5));
        assert_eq!(seqs(&step), Vec::<u64>::new());
        assert_eq!(step.fetch, Some(("c".into(), 2)));
        let step = t.live(&mut last, msg("c", 6));
        assert_eq!(step.fetch, None, "one request per gap");
        assert_eq!(t.wanted(), ["c"]);

        let step = t.page(
            &mut last,
            "c",
            vec![msg("c", 3), msg("c", 4), msg("c", 5)],
            5,
        );
        assert_eq!(seqs(&step), [3, 4, 5, 6]);
        assert_eq!(step.fetch, None);
        assert_eq!(last["c"], 6);
        assert!(t.wanted().is_empty());
    }

    #[test]
    fn a_fill_pages_until_the_head() {
        let mut t = Timeline::default();
        let mut last = BTreeMap::from([("c".to_string(), 1)]);
        assert_eq!(t.fill(&last, "c"), Some(("c".into(), 1)));
        assert_eq!(t.fill(&last, "unknown"), None);
        assert_eq!(t.wanted(), ["c"]);
        let step = t.page(&mut last, "c", vec![msg("c", 2), msg("c", 3)], 5);
        assert_eq!(seqs(&step), [2, 3]);
        assert_eq!(step.fetch, Some(("c".into(), 3)));
        let step = t.page(&mut last, "c", vec![msg("c", 4), msg("c", 5)], 5);
        assert_eq!(seqs(&step), [4, 5]);
        assert_eq!(step.fetch, None);
    }

    #[test]
    fn live_messages_during_a_fill_come_after_the_history_they_follow() {
        let mut t = Timeline::default();
        let mut last = BTreeMap::from([("c".to_string(), 1)]);
        t.fill(&last, "c");
        assert!(t.live(&mut last, msg("c", 4)).show.is_empty());
        let step = t.page(&mut last, "c", vec![msg("c", 2), msg("c", 3)], 3);
        assert_eq!(seqs(&step), [2, 3, 4]);
    }

    #[test]
    fn what_is_still_wanted_survives_a_failed_request() {
        let mut t = Timeline::default();
        let mut last = BTreeMap::from([("c".to_string(), 1), ("d".to_string(), 4)]);
        assert!(t.live(&mut last, msg("c", 3)).fetch.is_some());
        t.fill(&last, "d");
        t.abandon("c");
        // c still holds 3 behind a gap; d's request is unanswered.
        assert_eq!(t.wanted(), ["c", "d"]);
        assert_eq!(t.fill(&last, "c"), Some(("c".into(), 1)));
        let step = t.page(&mut last, "d", vec![], 4);
        assert!(step.show.is_empty() && step.fetch.is_none());
        assert_eq!(t.wanted(), ["c"]);
    }

    #[test]
    fn a_trimmed_gap_is_skipped_as_history_says() {
        let mut t = Timeline::default();
        let mut last = BTreeMap::from([("c".to_string(), 1)]);
        t.live(&mut last, msg("c", 9));
        // Retention dropped 2..=7: history starts at 8.
        let step = t.page(&mut last, "c", vec![msg("c", 8), msg("c", 9)], 9);
        assert_eq!(seqs(&step), [8, 9]);
        assert_eq!(step.fetch, None);
    }

    #[test]
    fn held_messages_are_shown_when_history_has_nothing_before_them() {
        let mut t = Timeline::default();
        let mut last = BTreeMap::from([("c".to_string(), 1)]);
        t.live(&mut last, msg("c", 4));
        let step = t.page(&mut last, "c", vec![], 4);
        assert_eq!(seqs(&step), [4]);
    }

    #[test]
    fn the_wire_form_parses() {
        let m: Message = serde_json::from_value(json!({
            "conv": "dm:alice:bob", "seq": 3, "id": "x", "from": "alice",
            "ts": 5, "type": "text", "body": {"text": "hi"}
        }))
        .unwrap();
        assert_eq!(m.seq, 3);
        assert_eq!(m.kind, "text");
        assert!(serde_json::from_value::<Message>(json!({"conv": "c", "seq": "3"})).is_err());
    }

    #[test]
    fn history_marks_parse() {
        let m: Message = serde_json::from_value(json!({
            "conv": "c", "seq": 1, "id": "x", "from": "alice", "body": {"text": "hello"},
            "edited": {"seq": 2, "by": "alice", "ts": 9}, "edits": [2],
            "reactions": {"👍": {"count": 2, "mine": true}}
        }))
        .unwrap();
        assert_eq!(m.edited.as_ref().map(|c| c.seq), Some(2));
        assert_eq!(m.edits, [2]);
        assert_eq!(
            m.reactions["👍"],
            Reaction {
                count: 2,
                mine: Some(true)
            }
        );
        assert!(!m.is_deleted() && !m.is_change());
        let gone: Message = serde_json::from_value(json!({
            "conv": "c", "seq": 1, "id": "x", "from": "alice", "body": null,
            "deleted": {"seq": 3, "by": "alice", "ts": 9}
        }))
        .unwrap();
        assert!(matches!(
            gone.deleted,
            Some(Deletion::By(Change { seq: 3, .. }))
        ));
        let record: Message = serde_json::from_value(json!({
            "conv": "c", "seq": 2, "id": "edit-2", "from": "alice", "type": "message.edit",
            "target": 1, "body": null, "deleted": true
        }))
        .unwrap();
        assert!(record.is_change() && record.is_deleted());
        assert_eq!(record.target, Some(1));
        // What a plain message serialises to is unchanged.
        let plain = serde_json::to_value(msg("c", 1)).unwrap();
        assert!(plain.get("target").is_none() && plain.get("reactions").is_none());
    }
}
