//! What the user sees: lines for people by default, or with `--json` one
//! JSON object per line (`{"event": ..., ...}`) for programs and tests.
//! Every event goes through here, so both forms always say the same thing.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::Path;
use std::time::Duration;

use serde_json::{json, Value};

use chatmq_client::{Deletion, Downloaded, Message, Reaction, Reactions, Uploaded};

pub struct Printer {
    json: bool,
}

impl Printer {
    pub fn new(json: bool) -> Printer {
        Printer { json }
    }

    pub fn connected(&self, client_id: &str, session_present: bool) {
        self.emit(
            json!({"event": "connected", "client_id": client_id, "session_present": session_present}),
            || {
                let how = if session_present { "session resumed" } else { "new session" };
                format!("* connected as {client_id} ({how})")
            },
        );
    }

    pub fn disconnected(&self, error: &str, retry_in: Duration) {
        let ms = retry_in.as_millis() as u64;
        self.emit(
            json!({"event": "disconnected", "error": error, "retry_in_ms": ms}),
            || {
                format!(
                    "* disconnected ({error}); retrying in {:.1}s",
                    retry_in.as_secs_f64()
                )
            },
        );
    }

    /// A message, a change record (`message.edit` / `message.delete`
    /// naming its `target`), or a replayed message as it is now. JSON:
    /// the message as the broker delivers it, with `event`.
    pub fn message(&self, m: &Message) {
        let mut event = serde_json::to_value(m).unwrap_or_default();
        event["event"] = json!("message");
        self.emit(event, || {
            format!("[{} #{}] {}", m.conv, m.seq, message_text(m))
        });
    }

    /// Our edit or delete went through: `event_seq` is its record.
    pub fn changed(&self, what: &str, conv: &str, seq: u64, event_seq: u64) {
        self.emit(
            json!({"event": what, "conv": conv, "seq": seq, "event_seq": event_seq}),
            || format!("  ({what} #{seq} in {conv})"),
        );
    }

    /// A reactions summary event: one line per message.
    pub fn reactions(&self, conv: &str, messages: &[Reactions]) {
        for r in messages {
            self.emit(
                json!({"event": "reactions", "conv": conv, "seq": r.seq, "reactions": r.reactions}),
                || {
                    format!(
                        "[{conv} #{}] reactions: {}",
                        r.seq,
                        reactions_text(&r.reactions, "none")
                    )
                },
            );
        }
    }

    /// The answer to our `/react` or `/unreact`: the summary with `mine`.
    pub fn reacted(
        &self,
        conv: &str,
        seq: u64,
        emoji: &str,
        added: bool,
        reactions: &BTreeMap<String, Reaction>,
    ) {
        self.emit(
            json!({"event": "reacted", "conv": conv, "seq": seq, "emoji": emoji,
                   "added": added, "reactions": reactions}),
            || {
                format!(
                    "  (#{seq} in {conv}: {})",
                    reactions_text(reactions, "no reactions")
                )
            },
        );
    }

    pub fn uploaded(&self, conv: &str, file: &Path, u: &Uploaded) {
        self.emit(
            json!({"event": "uploaded", "conv": conv, "file": file, "id": u.id,
                   "size": u.size, "content_type": u.content_type}),
            || {
                format!(
                    "  (uploaded {} to {conv}: {} bytes, {}, id {})",
                    file.display(),
                    u.size,
                    u.content_type,
                    u.id
                )
            },
        );
    }

    pub fn downloaded(&self, id: &str, d: &Downloaded) {
        self.emit(
            json!({"event": "downloaded", "id": id, "path": d.path, "size": d.size,
                   "content_type": d.content_type}),
            || {
                format!(
                    "* saved attachment {id} to {} ({} bytes, {})",
                    d.path.display(),
                    d.size,
                    d.content_type
                )
            },
        );
    }

    pub fn sent(&self, id: &str, conv: &str, online: bool) {
        self.emit(json!({"event": "sent", "id": id, "conv": conv}), || {
            let when = if online {
                "sending"
            } else {
                "queued until reconnected"
            };
            format!("  ({when} to {conv})")
        });
    }

    /// In human form only when the seq is unknown: otherwise the message
    /// line itself, with its seq, says it arrived.
    pub fn acked(&self, id: &str, conv: &str, seq: Option<u64>) {
        let event = json!({"event": "acked", "id": id, "conv": conv, "seq": seq});
        if self.json {
            self.emit(event, String::new);
        } else if seq.is_none() {
            self.emit(event, || format!("  (delivered to {conv})"));
        }
    }

    pub fn rejected(&self, id: &str, conv: &str, reason: &str) {
        self.emit(
            json!({"event": "rejected", "id": id, "conv": conv, "reason": reason}),
            || format!("! not delivered to {conv}: {reason}"),
        );
    }

    pub fn opened(&self, conv: &str, last_seq: Option<u64>) {
        self.emit(
            json!({"event": "opened", "conv": conv, "last_seq": last_seq}),
            || format!("* now in {conv}; type to send, /history N to look back"),
        );
    }

    /// The `conversations` RPC result, with unread counts.
    pub fn conversations(&self, list: &[Value], current: Option<&str>) {
        self.emit(
            json!({"event": "conversations", "conversations": list}),
            || {
                if list.is_empty() {
                    return "* no conversations yet".into();
                }
                let lines: Vec<String> = list
                    .iter()
                    .map(|c| {
                        let conv = c["conv"].as_str().unwrap_or("?");
                        let mark = if Some(conv) == current { '>' } else { ' ' };
                        let title = c["title"].as_str().filter(|t| !t.is_empty());
                        let title = title.map(|t| format!(" \"{t}\"")).unwrap_or_default();
                        format!(
                            "{mark} {conv}{title}: {} unread",
                            c["unread"].as_u64().unwrap_or(0)
                        )
                    })
                    .collect();
                lines.join("\n")
            },
        );
    }

    /// A `history` page asked for by `/history`.
    pub fn history(&self, conv: &str, messages: &[Message]) {
        self.emit(
            json!({"event": "history", "conv": conv, "messages": messages}),
            || {
                if messages.is_empty() {
                    return format!("* {conv}: no messages");
                }
                let lines: Vec<String> = messages
                    .iter()
                    .map(|m| format!("  #{} {}", m.seq, message_text(m)))
                    .collect();
                format!("* {conv}, history:\n{}", lines.join("\n"))
            },
        );
    }

    /// An event from `users/{me}/events` that is not a reply of ours.
    pub fn notice(&self, event: &Value) {
        self.emit(json!({"event": "notice", "data": event}), || {
            format!("* {}", event)
        });
    }

    /// A mistake or a failure the user should know about.
    pub fn error(&self, message: &str) {
        self.emit(json!({"event": "error", "message": message}), || {
            format!("! {message}")
        });
    }

    pub fn help(&self) {
        let usage = crate::args::usage();
        self.emit(json!({"event": "help", "usage": usage}), || usage.clone());
    }

    fn emit(&self, json: Value, human: impl FnOnce() -> String) {
        let line = if self.json { json.to_string() } else { human() };
        let mut out = std::io::stdout().lock();
        // A closed stdout (the reader went away) is not worth dying for.
        let _ = writeln!(out, "{line}");
        let _ = out.flush();
    }
}

/// What a message line says after its `[conv #seq]`: who and what, with
/// the marks history and replays carry (edited, deleted, reactions).
fn message_text(m: &Message) -> String {
    let from = &m.from;
    let target = m
        .target
        .map(|t| format!("#{t}"))
        .unwrap_or_else(|| "?".into());
    let mut line = match m.kind.as_str() {
        "message.delete" => format!("{from} deleted {target}"),
        // After a delete the record's text is gone too.
        "message.edit" if m.is_deleted() => format!("{from} edited {target} (since deleted)"),
        "message.edit" => format!("{from} edited {target}: {}", body_text(&m.body)),
        _ => match &m.deleted {
            Some(Deletion::By(change)) => format!("{from}: (deleted by {})", change.by),
            Some(Deletion::Flag(_)) => format!("{from}: (deleted)"),
            None => format!("{from}: {}", body_text(&m.body)),
        },
    };
    if let Some(edit) = m.edited.as_ref().filter(|_| !m.is_deleted()) {
        line.push_str(&format!(" (edited by {})", edit.by));
    }
    if !m.reactions.is_empty() {
        line.push_str(&format!("  {}", reactions_text(&m.reactions, "")));
    }
    line
}

/// `👍 2 (you), ❤️ 1`, or `none` when there are none.
fn reactions_text(reactions: &BTreeMap<String, Reaction>, none: &str) -> String {
    if reactions.is_empty() {
        return none.to_string();
    }
    let parts: Vec<String> = reactions
        .iter()
        .map(|(emoji, r)| {
            let you = if r.mine == Some(true) { " (you)" } else { "" };
            format!("{emoji} {}{you}", r.count)
        })
        .collect();
    parts.join(", ")
}

/// A body as text: a string as is, `{"text": ...}` as its text, anything
/// else as JSON; the attachments a body references follow as
/// `[attachment NAME, TYPE, SIZE bytes: ID]` (`/download ID` saves one).
fn body_text(body: &Value) -> String {
    let attachments = body["attachments"].as_array();
    let mut text = match body {
        Value::String(s) => s.clone(),
        Value::Object(o) => match o.get("text") {
            Some(Value::String(s)) => s.clone(),
            _ if attachments.is_some() => String::new(),
            _ => body.to_string(),
        },
        other => other.to_string(),
    };
    for a in attachments.into_iter().flatten() {
        let mut about: Vec<String> = Vec::new();
        if let Some(name) = a["name"].as_str() {
            about.push(name.to_string());
        }
        if let Some(t) = a["content_type"].as_str() {
            about.push(t.to_string());
        }
        if let Some(size) = a["size"].as_u64() {
            about.push(format!("{size} bytes"));
        }
        let id = a["id"].as_str().unwrap_or("?");
        if !text.is_empty() {
            text.push(' ');
        }
        if about.is_empty() {
            text.push_str(&format!("[attachment {id}]"));
        } else {
            text.push_str(&format!("[attachment {}: {id}]", about.join(", ")));
        }
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(v: Value) -> Message {
        serde_json::from_value(v).unwrap()
    }

    #[test]
    fn changes_and_marks_read_as_a_person_says_them() {
        let edit = message(
            json!({"conv": "c", "seq": 2, "id": "edit-2", "from": "alice",
            "type": "message.edit", "target": 1, "body": "hello"}),
        );
        assert_eq!(message_text(&edit), "alice edited #1: hello");
        let delete = message(
            json!({"conv": "c", "seq": 3, "id": "delete-3", "from": "alice",
            "type": "message.delete", "target": 1, "body": null}),
        );
        assert_eq!(message_text(&delete), "alice deleted #1");
        let edited = message(json!({"conv": "c", "seq": 1, "id": "m", "from": "alice",
            "body": "hello", "edited": {"seq": 2, "by": "alice", "ts": 1}, "edits": [2],
            "reactions": {"👍": {"count": 2, "mine": true}, "🎉": {"count": 1, "mine": false}}}));
        assert_eq!(
            message_text(&edited),
            "alice: hello (edited by alice)  🎉 1, 👍 2 (you)"
        );
        let gone = message(json!({"conv": "c", "seq": 1, "id": "m", "from": "alice",
            "body": null, "edited": {"seq": 2, "by": "alice", "ts": 1},
            "deleted": {"seq": 3, "by": "owner", "ts": 2}}));
        assert_eq!(message_text(&gone), "alice: (deleted by owner)");
        let old_edit = message(
            json!({"conv": "c", "seq": 2, "id": "edit-2", "from": "alice",
            "type": "message.edit", "target": 1, "body": null, "deleted": true}),
        );
        assert_eq!(message_text(&old_edit), "alice edited #1 (since deleted)");
    }

    #[test]
    fn attachments_are_listed_with_their_ids() {
        let body = json!({"text": "look", "attachments": [
            {"id": "ab", "name": "cat.png", "content_type": "image/png", "size": 5}, {"id": "cd"}]});
        assert_eq!(
            body_text(&body),
            "look [attachment cat.png, image/png, 5 bytes: ab] [attachment cd]"
        );
        assert_eq!(
            body_text(&json!({"attachments": [{"id": "ab"}]})),
            "[attachment ab]"
        );
        assert_eq!(body_text(&json!({"n": 1})), "{\"n\":1}");
    }

    #[test]
    fn reactions_read_as_counts() {
        let none = BTreeMap::new();
        assert_eq!(reactions_text(&none, "none"), "none");
        let one = BTreeMap::from([(
            "👍".to_string(),
            Reaction {
                count: 1,
                mine: None,
            },
        )]);
        assert_eq!(reactions_text(&one, "none"), "👍 1");
    }
}
