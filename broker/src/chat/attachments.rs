//! Attachments (issue #13 item 5): files a member uploads to a
//! conversation, kept in `[attachments] dir` under their SHA-256 (the
//! attachment id), referenced by messages (`body.attachments: [{"id"}]`),
//! served to the members of a conversation they were uploaded to, and
//! removed by a collector once nothing needs them.
//!
//! What is stored (the storage crate's `attachment.rs`): one record per
//! (id, conversation, uploader), which says who may see the file (members
//! of those conversations) and lets a message reference only what its
//! sender uploaded to that conversation; and one key per (conv, seq, id)
//! reference, written with the message, dropped with it (delete, or the
//! retention range).
//!
//! The collector ([`run`]) removes an upload record once no message
//! references its id and it is older than `orphan_grace_secs` (the time a
//! sender has to send the message), then every file no record and no
//! reference keeps. The race it must not lose, a new upload or reference
//! of an id while it decides, is closed by [`Guard`]: uploads and
//! references mark their id as recently used, the collector condemns only
//! unmarked ids, and an upload or reference of a condemned id is refused
//! (the client retries) until the collector is done.
//!
//! The HTTP side (streaming, type checks, download links) is
//! `http/attachments.rs`; this file holds the rules and the state.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chatmq_storage::{Batch, StorageError, Upload};
use hmac::{Hmac, Mac};
use serde_json::Value;
use sha2::Sha256;
use tokio::sync::{watch, OwnedSemaphorePermit, Semaphore};

use super::{lock, Chat, RpcError};
use crate::blocking;
use crate::clock::now_ms;

/// Attachments one message may reference.
pub const MAX_REFS: usize = 10;

/// The prefix of a file still being uploaded (never a valid id).
pub const TEMP_PREFIX: &str = ".upload-";

/// How far back (at most; half the grace period when that is shorter) a
/// mark protects an id from a collection: a reference is checked a moment
/// before its message is written, and the collection may have read the
/// references in between.
const MARK_MARGIN_MS: u64 = 60_000;

/// The attachment state a broker keeps.
pub struct Attachments {
    pub settings: chatmq_config::Attachments,
    /// Where the files are.
    pub dir: PathBuf,
    /// Signs download links; new at each start, so links die with the
    /// process (they live minutes anyway).
    key: [u8; 32],
    /// `max_uploads` permits.
    uploads: Arc<Semaphore>,
    /// Uploads in progress per user.
    per_user: Arc<Mutex<HashMap<Arc<str>, usize>>>,
    guard: Mutex<Guard>,
    pub metrics: AttachmentMetrics,
}

/// Counts for `/metrics`.
#[derive(Debug, Default)]
pub struct AttachmentMetrics {
    pub uploads: AtomicU64,
    pub upload_bytes: AtomicU64,
    pub refused_too_large: AtomicU64,
    pub refused_type: AtomicU64,
    pub refused_busy: AtomicU64,
    pub refused_denied: AtomicU64,
    pub downloads: AtomicU64,
    pub download_bytes: AtomicU64,
    pub gc_files_deleted: AtomicU64,
    pub gc_bytes_deleted: AtomicU64,
    pub gc_uploads_forgotten: AtomicU64,
}

/// Ids in use lately, and those the collector is removing now.
#[derive(Default)]
struct Guard {
    marked: HashMap<String, u64>,
    condemned: HashSet<String>,
}

/// An upload in progress: releases its places when dropped.
pub struct UploadSlot {
    _permit: OwnedSemaphorePermit,
    per_user: Arc<Mutex<HashMap<Arc<str>, usize>>>,
    user: Arc<str>,
}

impl Drop for UploadSlot {
    fn drop(&mut self) {
        let mut m = lock(&self.per_user);
        if let Some(n) = m.get_mut(&self.user) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                m.remove(&self.user);
            }
        }
    }
}

/// Whether `id` is an attachment id: 64 lower-case hex digits.
pub fn valid_id(id: &str) -> bool {
    id.len() == 64 && id.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

/// Lower-case hex of `bytes`.
pub fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    bytes.iter().fold(String::new(), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

/// The attachment ids a message body references (`body.attachments`,
/// an array of objects with an `id`), in order, without repeats; an
/// error for a malformed list.
pub fn referenced_ids(body: &Value) -> Result<Vec<String>, RpcError> {
    let Some(list) = body.as_object().and_then(|m| m.get("attachments")) else {
        return Ok(Vec::new());
    };
    let Value::Array(items) = list else {
        return Err(RpcError::bad("body.attachments must be an array"));
    };
    if items.len() > MAX_REFS {
        return Err(RpcError::bad(format!(
            "a message may reference at most {MAX_REFS} attachments"
        )));
    }
    let mut ids = Vec::new();
    for item in items {
        match item.get("id").and_then(Value::as_str) {
            Some(id) if valid_id(id) => {
                if !ids.iter().any(|i| i == id) {
                    ids.push(id.to_string());
                }
            }
            _ => {
                return Err(RpcError::bad(
                    "each of body.attachments needs the `id` its upload answered",
                ))
            }
        }
    }
    Ok(ids)
}

impl Attachments {
    pub fn new(settings: &chatmq_config::Attachments, data_dir: &Path) -> Attachments {
        let mut key = [0u8; 32];
        if getrandom::fill(&mut key).is_err() {
            // No OS randomness: links signed with a key from the clock
            // would be guessable; refuse every link instead.
            tracing::error!("no randomness for attachment links; signed links are refused");
        }
        Attachments {
            dir: settings
                .dir
                .clone()
                .unwrap_or_else(|| data_dir.join("attachments")),
            settings: settings.clone(),
            key,
            uploads: Arc::new(Semaphore::new(settings.max_uploads)),
            per_user: Arc::default(),
            guard: Mutex::default(),
            metrics: AttachmentMetrics::default(),
        }
    }

    /// A place for one more upload by `user`, or `None` when the user or
    /// the server has as many in progress as allowed.
    pub fn slot(&self, user: &Arc<str>) -> Option<UploadSlot> {
        let permit = self.uploads.clone().try_acquire_owned().ok()?;
        let mut m = lock(&self.per_user);
        let n = m.entry(user.clone()).or_insert(0);
        if *n >= self.settings.max_uploads_per_user {
            return None;
        }
        *n += 1;
        Some(UploadSlot {
            _permit: permit,
            per_user: self.per_user.clone(),
            user: user.clone(),
        })
    }

    /// Marks `ids` as in use now, unless the collector is removing one
    /// of them: then `false` (the caller refuses, the client retries).
    pub fn mark(&self, ids: &[String]) -> bool {
        let mut g = lock(&self.guard);
        if ids.iter().any(|id| g.condemned.contains(id)) {
            return false;
        }
        let now = now_ms();
        for id in ids {
            g.marked.insert(id.clone(), now);
        }
        true
    }

    /// The path of attachment `id`'s file.
    pub fn path(&self, id: &str) -> PathBuf {
        self.dir.join(id)
    }

    fn mac(&self) -> Option<Hmac<Sha256>> {
        if self.key == [0u8; 32] {
            return None;
        }
        Hmac::<Sha256>::new_from_slice(&self.key).ok()
    }

    /// A download link's token for `user` and `id`, valid until `exp`
    /// (unix seconds): `<user>.<exp>.<hex HMAC-SHA256 of "id user exp">`.
    pub fn token(&self, id: &str, user: &str, exp: u64) -> Option<String> {
        let mut mac = self.mac()?;
        mac.update(format!("{id} {user} {exp}").as_bytes());
        Some(format!(
            "{user}.{exp}.{}",
            hex(&mac.finalize().into_bytes())
        ))
    }

    /// The user a token was issued to, if it is for `id`, signed by this
    /// process and not expired at `now` (unix seconds).
    pub fn token_user(&self, id: &str, token: &str, now: u64) -> Option<String> {
        let mut parts = token.splitn(3, '.');
        let (user, exp, sig) = (parts.next()?, parts.next()?, parts.next()?);
        let exp_n: u64 = exp.parse().ok()?;
        if exp_n < now || !chatmq_config::is_user_id(user) || sig.len() != 64 {
            return None;
        }
        let sig: Vec<u8> = (0..32)
            .map(|i| u8::from_str_radix(sig.get(i * 2..i * 2 + 2)?, 16).ok())
            .collect::<Option<_>>()?;
        let mut mac = self.mac()?;
        mac.update(format!("{id} {user} {exp}").as_bytes());
        mac.verify_slice(&sig).ok()?;
        Some(user.to_string())
    }
}

impl Chat {
    pub fn attachments(&self) -> &Attachments {
        &self.attachments
    }

    /// Sets up attachments from `[attachments]`.
    pub fn limit_attachments(&mut self, settings: &chatmq_config::Attachments, data_dir: &Path) {
        self.attachments = Attachments::new(settings, data_dir);
    }

    /// Checks the attachments `body` references: each was uploaded by
    /// `sender` to `conv`. Run before [`Chat::append`], which writes the
    /// references.
    pub async fn check_attachments(
        &self,
        conv: &str,
        sender: &str,
        body: &Value,
    ) -> Result<(), RpcError> {
        let ids = referenced_ids(body)?;
        if ids.is_empty() {
            return Ok(());
        }
        if !self.attachments.settings.enabled {
            return Err(RpcError::bad("attachments are turned off on this server"));
        }
        let (c, s, wanted) = (conv.to_string(), sender.to_string(), ids.clone());
        let missing = blocking::read(&self.store, move |st| {
            for id in &wanted {
                let mine = st
                    .uploads_of(id)?
                    .iter()
                    .any(|u| u.conv == c && u.uploader == s);
                if !mine {
                    return Ok(Some(id.clone()));
                }
            }
            Ok(None)
        })
        .await?;
        if let Some(id) = missing {
            return Err(RpcError::new(
                "not_found",
                format!("attachment {id} was not uploaded by the sender to this conversation"),
            ));
        }
        if !self.attachments.mark(&ids) {
            return Err(RpcError::new(
                "unavailable",
                "an attachment is being removed; upload it again",
            ));
        }
        Ok(())
    }

    /// The uploads of `id` to conversations `user` is a member of (all
    /// of them for `None`, the admin token); empty when the user may not
    /// see it.
    pub async fn visible_uploads(
        &self,
        id: &str,
        user: Option<&str>,
    ) -> Result<Vec<Upload>, StorageError> {
        let i = id.to_string();
        let uploads = blocking::read(&self.store, move |st| st.uploads_of(&i)).await?;
        Ok(uploads
            .into_iter()
            .filter(|u| user.is_none_or(|user| self.is_member(&u.conv, user)))
            .collect())
    }

    /// Records an upload (after its file is in place).
    pub async fn record_upload(&self, upload: &Upload) -> Result<(), StorageError> {
        let mut batch = Batch::new();
        batch.put_upload(upload);
        self.store.write(batch).await
    }
}

/// What one collection removed.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Collected {
    pub uploads: u64,
    pub files: u64,
    pub bytes: u64,
}

/// Runs until shutdown: a collection at start, then one per
/// `gc_interval_secs`.
pub async fn run(chat: Arc<Chat>, mut shutdown: watch::Receiver<bool>) {
    let a = chat.attachments();
    if let Err(e) = std::fs::create_dir_all(&a.dir) {
        tracing::error!(error = %e, dir = %a.dir.display(), "cannot create the attachments directory");
    }
    let period = Duration::from_secs(a.settings.gc_interval_secs.max(1));
    loop {
        match collect(&chat).await {
            Ok(c) if c != Collected::default() => {
                tracing::info!(
                    uploads = c.uploads,
                    files = c.files,
                    bytes = c.bytes,
                    "attachments collected"
                );
            }
            Ok(_) => {}
            Err(e) => {
                tracing::error!(error = %e, "attachment collection failed; retrying next period")
            }
        }
        tokio::select! {
            _ = shutdown.changed() => return,
            _ = tokio::time::sleep(period) => {}
        }
    }
}

/// One collection (see the module's story).
pub async fn collect(chat: &Chat) -> Result<Collected, StorageError> {
    let a = chat.attachments();
    let started = now_ms();
    let grace_ms = a.settings.orphan_grace_secs.saturating_mul(1000);
    let store = chat.store.clone();
    let (referenced, uploads) = tokio::task::spawn_blocking(move || {
        Ok::<_, StorageError>((store.referenced_attachments()?, store.all_uploads()?))
    })
    .await
    .map_err(|_| StorageError::WriterGone)??;
    let (stale, live): (Vec<Upload>, Vec<Upload>) = uploads.into_iter().partition(|u| {
        !referenced.contains(&u.id) && started.saturating_sub(u.uploaded_ms) >= grace_ms
    });
    let mut kept: HashSet<String> = referenced;
    kept.extend(live.into_iter().map(|u| u.id));
    // Files on disk that nothing keeps, and leftovers of uploads cut short.
    let dir = a.dir.clone();
    let (k, tmp_age) = (kept.clone(), grace_ms.max(3_600_000));
    let files: Vec<(String, u64, bool)> = tokio::task::spawn_blocking(move || {
        let mut out = Vec::new();
        let Ok(entries) = std::fs::read_dir(&dir) else {
            return out;
        };
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let Ok(meta) = entry.metadata() else { continue };
            if valid_id(&name) && !k.contains(&name) {
                out.push((name, meta.len(), false));
            } else if name.starts_with(TEMP_PREFIX) {
                let age = meta
                    .modified()
                    .ok()
                    .and_then(|m| m.elapsed().ok())
                    .map_or(0, |d| d.as_millis() as u64);
                if age >= tmp_age {
                    out.push((name, meta.len(), true));
                }
            }
        }
        out
    })
    .await
    .map_err(|_| StorageError::WriterGone)?;
    // Condemn what no upload or reference marked meanwhile.
    let (stale, files) = {
        let mut g = lock(&a.guard);
        // An upload's own mark is as old as the upload: past the grace,
        // it no longer protects it.
        let floor = started.saturating_sub(MARK_MARGIN_MS.min(grace_ms / 2));
        g.marked.retain(|_, at| *at >= floor);
        let stale: Vec<Upload> = stale
            .into_iter()
            .filter(|u| !g.marked.contains_key(&u.id))
            .collect();
        let files: Vec<(String, u64, bool)> = files
            .into_iter()
            .filter(|(name, _, tmp)| *tmp || !g.marked.contains_key(name))
            .collect();
        g.condemned.extend(stale.iter().map(|u| u.id.clone()));
        g.condemned.extend(
            files
                .iter()
                .filter(|(_, _, tmp)| !tmp)
                .map(|(n, _, _)| n.clone()),
        );
        (stale, files)
    };
    let result = remove(chat, &stale, &files, &kept).await;
    lock(&a.guard).condemned.clear();
    let c = result?;
    let m = &a.metrics;
    m.gc_uploads_forgotten
        .fetch_add(c.uploads, Ordering::Relaxed);
    m.gc_files_deleted.fetch_add(c.files, Ordering::Relaxed);
    m.gc_bytes_deleted.fetch_add(c.bytes, Ordering::Relaxed);
    Ok(c)
}

async fn remove(
    chat: &Chat,
    stale: &[Upload],
    files: &[(String, u64, bool)],
    kept: &HashSet<String>,
) -> Result<Collected, StorageError> {
    let mut c = Collected::default();
    if !stale.is_empty() {
        let mut batch = Batch::new();
        for u in stale {
            batch.delete_upload(&u.id, &u.conv, &u.uploader);
        }
        chat.store.write(batch).await?;
        c.uploads = stale.len() as u64;
    }
    // Files of the forgotten uploads (unless another upload keeps them),
    // and those found unkept.
    let mut doomed: Vec<(String, u64)> = files.iter().map(|(n, s, _)| (n.clone(), *s)).collect();
    for u in stale {
        if !kept.contains(&u.id) && !doomed.iter().any(|(n, _)| *n == u.id) {
            doomed.push((u.id.clone(), u.size));
        }
    }
    let dir = chat.attachments().dir.clone();
    let (files, bytes) = tokio::task::spawn_blocking(move || {
        let (mut files, mut bytes) = (0u64, 0u64);
        for (name, size) in doomed {
            match std::fs::remove_file(dir.join(&name)) {
                Ok(()) => {
                    files += 1;
                    bytes = bytes.saturating_add(size);
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => tracing::warn!(error = %e, file = %name, "cannot remove an attachment"),
            }
        }
        (files, bytes)
    })
    .await
    .map_err(|_| StorageError::WriterGone)?;
    c.files = files;
    c.bytes = bytes;
    Ok(c)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn references_are_read_from_the_body() {
        let id = "a".repeat(64);
        assert_eq!(
            referenced_ids(&json!("text")).unwrap(),
            Vec::<String>::new()
        );
        assert_eq!(
            referenced_ids(&json!({"text": "hi", "attachments": [{"id": id}, {"id": id}]}))
                .unwrap(),
            vec![id.clone()]
        );
        assert!(referenced_ids(&json!({"attachments": {"id": id}})).is_err());
        assert!(referenced_ids(&json!({"attachments": [{"id": "../etc/passwd"}]})).is_err());
        assert!(referenced_ids(&json!({"attachments": [{"id": "A".repeat(64)}]})).is_err());
        let many: Vec<Value> = (0..=MAX_REFS).map(|_| json!({"id": id})).collect();
        assert!(referenced_ids(&json!({ "attachments": many })).is_err());
    }

    #[test]
    fn a_link_token_is_bound_to_its_file_user_and_time() {
        let a = Attachments::new(&chatmq_config::Attachments::default(), Path::new("/tmp"));
        let id = "b".repeat(64);
        let t = a.token(&id, "al", 100).unwrap();
        assert_eq!(a.token_user(&id, &t, 100).as_deref(), Some("al"));
        assert_eq!(a.token_user(&id, &t, 101), None, "expired");
        assert_eq!(a.token_user(&"c".repeat(64), &t, 50), None, "another file");
        let forged = t.replacen("al.", "bo.", 1);
        assert_eq!(a.token_user(&id, &forged, 50), None, "another user");
        let later = t.replacen(".100.", ".200.", 1);
        assert_eq!(a.token_user(&id, &later, 150), None, "a longer life");
        assert_eq!(a.token_user(&id, "x", 0), None);
    }
}
