//! What the user sees: lines for people by default, or with `--json` one
//! JSON object per line (`{"event": ..., ...}`) for programs and tests.
//! Every event goes through here, so both forms always say the same thing.

use std::io::Write;
use std::time::Duration;

use serde_json::{json, Value};

use chatmq_client::Message;

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

    pub fn message(&self, m: &Message) {
        self.emit(
            json!({"event": "message", "conv": m.conv, "seq": m.seq, "from": m.from,
                   "id": m.id, "ts": m.ts, "type": m.kind, "body": m.body}),
            || format!("[{} #{}] {}: {}", m.conv, m.seq, m.from, body_text(&m.body)),
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
                    .map(|m| format!("  #{} {}: {}", m.seq, m.from, body_text(&m.body)))
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

/// A body as text: a string as is, `{"text": ...}` as its text, anything
/// else as JSON.
fn body_text(body: &Value) -> String {
    match body {
        Value::String(s) => s.clone(),
        Value::Object(o) => match o.get("text") {
            Some(Value::String(s)) => s.clone(),
            _ => body.to_string(),
        },
        other => other.to_string(),
    }
}
