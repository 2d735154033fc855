//! The state file: what the client must not forget between runs.
//!
//! One JSON document, rewritten whole on every change through a temporary
//! file, `fsync` and `rename`, so a crash leaves either the old or the new
//! version, never a torn one. It holds who we are (user, client id, the
//! device tag in our envelope ids), the last seq shown per conversation
//! (the dedup and resume point) and the outbox (sends not yet acknowledged,
//! with the envelope id they will keep across retries).
//!
//! This module never talks to the network.

use std::collections::BTreeMap;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::Error;

type Result<T> = std::result::Result<T, Error>;

fn fail<T>(message: String) -> Result<T> {
    Err(Error::State(message))
}

/// The layout written by this version; another number is refused.
const VERSION: u32 = 1;

/// A send waiting for the broker's acknowledgement.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Pending {
    /// The envelope id: the same on every retry, so the broker can answer
    /// a repeat with the seq it already assigned.
    pub id: String,
    pub conv: String,
    pub body: Value,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct State {
    pub version: u32,
    pub user: String,
    pub client_id: String,
    /// Prefix of our envelope ids, unique to this state file.
    pub device: String,
    /// The number of the next envelope id.
    pub next_id: u64,
    /// Per conversation, the highest seq shown: anything at or below it is
    /// a duplicate; a resume asks for what comes after it.
    pub last_seq: BTreeMap<String, u64>,
    /// Unacknowledged sends, oldest first.
    pub outbox: Vec<Pending>,
    /// The broker's session has our subscriptions (their SUBACK came).
    /// A session created by a CONNECT whose SUBSCRIBE was lost with the
    /// connection is present but empty: this says to subscribe again.
    #[serde(default)]
    pub subscribed: bool,
}

impl State {
    /// A fresh state for `user`; the client id is `client_id` or
    /// `{prefix}-{device tag}`.
    pub fn new(user: &str, client_id: Option<&str>, prefix: &str) -> State {
        let device = format!("{:012x}", fastrand::u64(..=0xffff_ffff_ffff));
        State {
            version: VERSION,
            user: user.to_string(),
            client_id: client_id
                .map(str::to_string)
                .unwrap_or_else(|| format!("{prefix}-{device}")),
            device,
            next_id: 1,
            last_seq: BTreeMap::new(),
            outbox: Vec::new(),
            subscribed: false,
        }
    }

    /// Reads `path`; `None` if it does not exist yet.
    pub fn load(path: &Path) -> Result<Option<State>> {
        let text = match fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return fail(format!("cannot read state file {}: {e}", path.display())),
        };
        // "chatmq-cli state": the format chatmq-cli has always written,
        // and the words its users know.
        let state: State = serde_json::from_str(&text).map_err(|e| {
            Error::State(format!(
                "state file {} is not a chatmq-cli state ({e}); move it away to start afresh \
                 (its unsent messages would be lost)",
                path.display()
            ))
        })?;
        if state.version != VERSION {
            return fail(format!(
                "state file {} has version {}, this client reads version {VERSION}",
                path.display(),
                state.version
            ));
        }
        Ok(Some(state))
    }

    /// The state in `path` for `user`, or a new one. A file written for
    /// another user or another client id is refused: the broker ties a
    /// client id to its first user, and the seqs belong to that session.
    pub fn open(path: &Path, user: &str, client_id: Option<&str>, prefix: &str) -> Result<State> {
        let Some(state) = State::load(path)? else {
            return Ok(State::new(user, client_id, prefix));
        };
        if state.user != user {
            return fail(format!(
                "state file {} belongs to user {}, not {user}; use another state file",
                path.display(),
                state.user
            ));
        }
        if let Some(id) = client_id {
            if id != state.client_id {
                return fail(format!(
                    "state file {} belongs to client id {}; do not set a client id, \
                     or use another state file",
                    path.display(),
                    state.client_id
                ));
            }
        }
        Ok(state)
    }

    /// Writes the whole state to `path` atomically and durably.
    pub fn save(&self, path: &Path) -> Result<()> {
        let tmp = temporary_path(path);
        let text = serde_json::to_vec_pretty(self)
            .map_err(|e| Error::State(format!("encoding the state: {e}")))?;
        let write = || -> std::io::Result<()> {
            let mut f = fs::File::create(&tmp)?;
            f.write_all(&text)?;
            f.write_all(b"\n")?;
            f.sync_all()?;
            fs::rename(&tmp, path)?;
            // The rename itself is durable once the directory is synced;
            // not every platform lets a directory be opened, so best effort.
            if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
                if let Ok(d) = fs::File::open(dir) {
                    let _ = d.sync_all();
                }
            }
            Ok(())
        };
        write()
            .map_err(|e| Error::State(format!("cannot write state file {}: {e}", path.display())))
    }

    /// A new envelope id, unique to this state file (and so to this user,
    /// as long as two devices do not share a state file).
    pub fn new_envelope_id(&mut self) -> String {
        let id = format!("{}-{}", self.device, self.next_id);
        self.next_id += 1;
        id
    }

    /// Removes `id` from the outbox; the removed entry, if it was there.
    pub fn take_pending(&mut self, id: &str) -> Option<Pending> {
        let i = self.outbox.iter().position(|p| p.id == id)?;
        Some(self.outbox.remove(i))
    }
}

fn temporary_path(path: &Path) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(".tmp");
    path.with_file_name(name)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn sample() -> State {
        let mut s = State::new("alice", None, "chatmq-cli");
        s.last_seq.insert("dm:alice:bob".into(), 12);
        let id = s.new_envelope_id();
        s.outbox.push(Pending {
            id,
            conv: "dm:alice:bob".into(),
            body: json!("hello"),
        });
        s
    }

    #[test]
    fn a_saved_state_loads_back_identical() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("alice.json");
        let s = sample();
        s.save(&path).unwrap();
        assert_eq!(State::load(&path).unwrap(), Some(s));
    }

    #[test]
    fn saving_replaces_the_file_and_leaves_no_temporary_behind() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("alice.json");
        let mut s = sample();
        s.save(&path).unwrap();
        s.outbox.clear();
        s.last_seq.insert("dm:alice:bob".into(), 13);
        s.save(&path).unwrap();
        let back = State::load(&path).unwrap().unwrap();
        assert!(back.outbox.is_empty());
        assert_eq!(back.last_seq["dm:alice:bob"], 13);
        let names: Vec<_> = fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, ["alice.json"]);
    }

    #[test]
    fn a_missing_file_is_a_fresh_start_with_a_stable_client_id() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("new.json");
        let s = State::open(&path, "alice", None, "chatmq-cli").unwrap();
        assert!(s.client_id.starts_with("chatmq-cli-"));
        assert!(s.last_seq.is_empty() && s.outbox.is_empty());
        s.save(&path).unwrap();
        let again = State::open(&path, "alice", None, "chatmq-cli").unwrap();
        assert_eq!(again.client_id, s.client_id);
    }

    #[test]
    fn a_corrupt_file_is_a_clear_error_naming_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("alice.json");
        fs::write(&path, "{\"version\": 1, \"user\": ").unwrap();
        let err = State::open(&path, "alice", None, "chatmq-cli")
            .unwrap_err()
            .to_string();
        assert!(err.contains(&path.display().to_string()), "{err}");
        assert!(err.contains("not a chatmq-cli state"), "{err}");
    }

    #[test]
    fn another_users_file_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("alice.json");
        sample().save(&path).unwrap();
        let err = State::open(&path, "bob", None, "chatmq-cli")
            .unwrap_err()
            .to_string();
        assert!(err.contains("belongs to user alice"), "{err}");
    }

    #[test]
    fn a_different_client_id_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("alice.json");
        sample().save(&path).unwrap();
        let err = State::open(&path, "alice", Some("other"), "chatmq-cli")
            .unwrap_err()
            .to_string();
        assert!(err.contains("belongs to client id"), "{err}");
    }

    #[test]
    fn envelope_ids_are_distinct_and_fit_the_envelope_limit() {
        let mut s = State::new("alice", None, "chatmq-cli");
        let a = s.new_envelope_id();
        let b = s.new_envelope_id();
        assert_ne!(a, b);
        assert!(a.len() <= 64);
        assert_ne!(State::new("alice", None, "chatmq-cli").device, s.device);
    }

    #[test]
    fn take_pending_removes_only_that_send() {
        let mut s = sample();
        let first = s.outbox[0].id.clone();
        let second = s.new_envelope_id();
        s.outbox.push(Pending {
            id: second.clone(),
            conv: "team".into(),
            body: json!("x"),
        });
        assert_eq!(s.take_pending(&first).map(|p| p.id), Some(first.clone()));
        assert_eq!(s.take_pending(&first), None);
        assert_eq!(s.outbox.len(), 1);
        assert_eq!(s.outbox[0].id, second);
    }
}
