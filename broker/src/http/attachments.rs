//! Attachments over HTTP (issue #13 item 5; the rules and the collector
//! are `chat/attachments.rs`):
//!
//! - `POST /v1/conversations/{conv}/attachments`, a member's token, the
//!   file as the body with its `Content-Type`: the body is streamed to a
//!   temporary file in `[attachments] dir` while it is hashed (SHA-256),
//!   never held whole in memory; refused 413 once it passes `max_bytes`
//!   (at once when `Content-Length` announces more), 415 for a type not in
//!   `content_types` or whose first bytes say another type. The file is
//!   then renamed to its hash, so the same file uploaded twice is one file.
//!   201 `{"id","size","content_type","url"}`; `url` is a signed download
//!   link for the uploader.
//! - `GET /v1/attachments/{id}`, with a bearer token or `?token=` (a
//!   signed link, for `<img src>`): the file, for members of a
//!   conversation it was uploaded to. Anyone else gets the 404 a missing
//!   file gets, so that a content hash cannot be used to learn whether
//!   some conversation holds a known file.
//! - `POST /v1/attachments/{id}/token`: a fresh signed link for a member,
//!   `{"token","url","expires"}` (`token_ttl_secs`).

use std::io::{Read, Write};
use std::sync::atomic::Ordering;
use std::sync::Arc;

use axum::body::Body as AxumBody;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, Request, State};
use axum::http::header::{
    CACHE_CONTROL, CONTENT_DISPOSITION, CONTENT_LENGTH, CONTENT_SECURITY_POLICY, CONTENT_TYPE,
    ETAG, X_CONTENT_TYPE_OPTIONS,
};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use bytes::Bytes;
use chatmq_storage::Upload;
use futures_util::StreamExt;
use serde::Deserialize;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use utoipa::ToSchema;

use super::conversations::check_conv;
use super::openapi::Error;
use super::{Api, ApiError, Caller};
use crate::chat::attachments::{hex, valid_id, TEMP_PREFIX};
use crate::clock::now_ms;

/// Bytes read before the type is judged by its first bytes.
const SNIFF_BYTES: usize = 16;
/// Chunks in flight between the request and the file writer.
const WRITE_QUEUE: usize = 4;
/// Bytes per chunk read from a file for a download.
const READ_CHUNK: usize = 64 * 1024;

/// The largest `Content-Length` the router lets through to `path`, when
/// it is an upload: the upload's handler judges the length itself.
pub(super) fn announced_limit(path: &str) -> Option<u64> {
    let rest = path.strip_prefix("/v1/conversations/")?;
    rest.strip_suffix("/attachments")
        .filter(|conv| !conv.contains('/'))
        .map(|_| u64::MAX)
}

fn not_found() -> ApiError {
    ApiError::new(StatusCode::NOT_FOUND, "not_found", "no such attachment")
}

fn unavailable(e: impl std::fmt::Display) -> ApiError {
    tracing::error!(error = %e, "attachment storage failed");
    ApiError::new(
        StatusCode::SERVICE_UNAVAILABLE,
        "unavailable",
        "the attachment could not be stored or read",
    )
}

/// The type a file's first bytes say, for the types recognised so.
fn sniff(head: &[u8]) -> Option<&'static str> {
    if head.starts_with(b"\x89PNG\r\n\x1a\n") {
        Some("image/png")
    } else if head.starts_with(&[0xFF, 0xD8, 0xFF]) {
        Some("image/jpeg")
    } else if head.starts_with(b"GIF87a") || head.starts_with(b"GIF89a") {
        Some("image/gif")
    } else if head.len() >= 12 && head.starts_with(b"RIFF") && &head[8..12] == b"WEBP" {
        Some("image/webp")
    } else if head.starts_with(b"%PDF-") {
        Some("application/pdf")
    } else {
        None
    }
}

/// Whether `head` (all of the file when shorter than [`SNIFF_BYTES`]) may
/// be of the declared type: a recognised type must be the declared one,
/// and a type that is recognised by its bytes must be recognised.
fn type_matches(declared: &str, head: &[u8]) -> bool {
    const SNIFFED: [&str; 5] = [
        "image/png",
        "image/jpeg",
        "image/gif",
        "image/webp",
        "application/pdf",
    ];
    match sniff(head) {
        Some(t) => t == declared,
        None => !SNIFFED.contains(&declared),
    }
}

/// The media type of a `Content-Type` value, lower-case, without
/// parameters.
fn essence(value: &str) -> String {
    value
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase()
}

/// The file name's extension for a type, for `Content-Disposition`.
fn extension(content_type: &str) -> &'static str {
    match content_type {
        "image/png" => "png",
        "image/jpeg" => "jpg",
        "image/gif" => "gif",
        "image/webp" => "webp",
        "application/pdf" => "pdf",
        "text/plain" => "txt",
        _ => "bin",
    }
}

/// Removes a temporary file unless it was kept (renamed into place);
/// also when the request is dropped halfway (a timeout, a client gone).
struct TempFile(Option<std::path::PathBuf>);

impl Drop for TempFile {
    fn drop(&mut self) {
        if let Some(path) = self.0.take() {
            let _ = std::fs::remove_file(path);
        }
    }
}

fn refused_type(api: &Api, message: impl Into<String>) -> ApiError {
    api.broker
        .chat
        .attachments()
        .metrics
        .refused_type
        .fetch_add(1, Ordering::Relaxed);
    ApiError::new(
        StatusCode::UNSUPPORTED_MEDIA_TYPE,
        "unsupported_type",
        message,
    )
}

fn too_large(api: &Api) -> ApiError {
    let a = api.broker.chat.attachments();
    a.metrics.refused_too_large.fetch_add(1, Ordering::Relaxed);
    ApiError::new(
        StatusCode::PAYLOAD_TOO_LARGE,
        "too_large",
        format!(
            "an attachment may be at most {} bytes",
            a.settings.max_bytes
        ),
    )
}

fn link(api: &Api, id: &str, user: &str) -> Option<(String, String, u64)> {
    let a = api.broker.chat.attachments();
    let exp = (now_ms() / 1000).saturating_add(a.settings.token_ttl_secs);
    let token = a.token(id, user, exp)?;
    let url = format!("/v1/attachments/{id}?token={token}");
    Some((token, url, exp))
}

/// The answer to an upload (described only; built with `json!`).
#[allow(dead_code)]
#[derive(ToSchema)]
pub struct Uploaded {
    /// The file's SHA-256, lower-case hex: the attachment id.
    id: String,
    size: u64,
    content_type: String,
    /// A signed download link for the uploader (`token_ttl_secs`).
    url: Option<String>,
}

/// A signed download link (described only).
#[allow(dead_code)]
#[derive(ToSchema)]
pub struct Link {
    token: String,
    /// `/v1/attachments/{id}?token=...`, for `<img src>`.
    url: String,
    /// Unix seconds.
    expires: u64,
}

/// `POST /v1/conversations/{conv}/attachments`.
#[utoipa::path(
    post,
    path = "/v1/conversations/{conv}/attachments",
    tag = "attachments",
    params(("conv" = String, Path, description = "The conversation id")),
    request_body(content = Vec<u8>, description = "The file, with its `Content-Type` (one of `attachments.content_types`)", content_type = "application/octet-stream"),
    security(("user_jwt" = [])),
    responses(
        (status = 201, description = "Stored under its SHA-256", body = Uploaded),
        (status = 400, description = "`bad_request`: the admin token, a bad id, an empty file", body = Error),
        (status = 401, description = "No token, or not a valid one (`WWW-Authenticate: Bearer`)", body = Error),
        (status = 403, description = "`not_member`: the caller is not a member", body = Error),
        (status = 404, description = "`not_found`: no such conversation, or attachments are off", body = Error),
        (status = 413, description = "`too_large`: over `attachments.max_bytes`", body = Error),
        (status = 415, description = "`unsupported_type`: a type not allowed, or not what the bytes are", body = Error),
        (status = 429, description = "`busy`: too many uploads in progress", body = Error),
        (status = 503, description = "`unavailable`: the file could not be stored", body = Error),
    ),
)]
pub async fn upload(
    caller: Caller,
    State(api): State<Arc<Api>>,
    Path(conv): Path<String>,
    request: Request,
) -> Result<Response, ApiError> {
    let chat = &api.broker.chat;
    let a = chat.attachments();
    if !a.settings.enabled {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "not_found",
            "attachments are turned off on this server",
        ));
    }
    let Caller::User(user) = &caller else {
        return Err(ApiError::bad(
            "the admin token uploads nothing of its own: call with a user's token",
        ));
    };
    check_conv(&conv)?;
    if !chat.exists(&conv) {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "not_found",
            "no such conversation",
        ));
    }
    if !chat.is_member(&conv, user) {
        a.metrics.refused_denied.fetch_add(1, Ordering::Relaxed);
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "not_member",
            "you are not a member of this conversation",
        ));
    }
    let headers = request.headers();
    let declared = headers
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(essence)
        .unwrap_or_default();
    if !a.settings.content_types.contains(&declared) {
        return Err(refused_type(
            &api,
            format!(
                "the content type must be one of {}",
                a.settings.content_types.join(", ")
            ),
        ));
    }
    let announced = headers
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    let max = a.settings.max_bytes;
    if announced.is_some_and(|n| n > max) {
        return Err(too_large(&api));
    }
    let Some(_slot) = a.slot(user) else {
        a.metrics.refused_busy.fetch_add(1, Ordering::Relaxed);
        return Err(ApiError::new(
            StatusCode::TOO_MANY_REQUESTS,
            "busy",
            "too many uploads in progress; try again when one is done",
        ));
    };

    // The file writer: a blocking thread fed chunks through a small queue,
    // so a slow disk slows the client down rather than filling memory.
    let dir = a.dir.clone();
    let mut nonce = [0u8; 8];
    getrandom::fill(&mut nonce).map_err(unavailable)?;
    let tmp_path = dir.join(format!("{TEMP_PREFIX}{}", hex(&nonce)));
    let path = tmp_path.clone();
    let mut file = tokio::task::spawn_blocking(move || {
        std::fs::create_dir_all(&dir)?;
        std::fs::File::create_new(&path)
    })
    .await
    .map_err(unavailable)?
    .map_err(unavailable)?;
    // From here on, however the request ends, the temporary file goes.
    let tmp = TempFile(Some(tmp_path));
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Bytes>(WRITE_QUEUE);
    let writer = tokio::task::spawn_blocking(move || -> std::io::Result<()> {
        while let Some(chunk) = rx.blocking_recv() {
            file.write_all(&chunk)?;
        }
        file.sync_all()
    });

    let mut hasher = Sha256::new();
    let mut size: u64 = 0;
    let mut head: Vec<u8> = Vec::with_capacity(SNIFF_BYTES);
    let mut judged = false;
    let mut stream = request.into_body().into_data_stream();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|e| ApiError::bad(format!("the body could not be read: {e}")))?;
        size = size.saturating_add(chunk.len() as u64);
        if size > max {
            return Err(too_large(&api));
        }
        if !judged {
            let want = SNIFF_BYTES.saturating_sub(head.len()).min(chunk.len());
            head.extend_from_slice(&chunk[..want]);
            if head.len() >= SNIFF_BYTES {
                judged = true;
                if !type_matches(&declared, &head) {
                    return Err(refused_type(&api, format!("the file is not {declared}")));
                }
            }
        }
        hasher.update(&chunk);
        if tx.send(chunk).await.is_err() {
            break;
        }
    }
    drop(tx);
    if !judged && !type_matches(&declared, &head) {
        return Err(refused_type(&api, format!("the file is not {declared}")));
    }
    writer.await.map_err(unavailable)?.map_err(unavailable)?;
    if size == 0 {
        return Err(ApiError::bad("the file is empty"));
    }
    let id = hex(&hasher.finalize());
    if !a.mark(std::slice::from_ref(&id)) {
        return Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "unavailable",
            "this file is being removed; upload it again in a moment",
        ));
    }
    // Into place under its hash: the same file twice is one file.
    let mut tmp = tmp;
    let from = tmp.0.take().unwrap_or_default();
    let to = a.path(&id);
    if let Err(e) = std::fs::rename(&from, &to) {
        let _ = std::fs::remove_file(&from);
        return Err(unavailable(e));
    }
    let record = Upload {
        id: id.clone(),
        conv: conv.clone(),
        uploader: user.to_string(),
        size,
        uploaded_ms: now_ms(),
        content_type: declared.clone(),
    };
    chat.record_upload(&record).await.map_err(unavailable)?;
    a.metrics.uploads.fetch_add(1, Ordering::Relaxed);
    a.metrics.upload_bytes.fetch_add(size, Ordering::Relaxed);
    let url = link(&api, &id, user).map(|(_, url, _)| url);
    let body = json!({"id": id, "size": size, "content_type": declared, "url": url});
    Ok((StatusCode::CREATED, Json(body)).into_response())
}

/// The query of a download.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Download {
    token: Option<String>,
}

/// Who downloads: the bearer token's caller, or the user of a valid
/// signed link; `None` is the admin token.
fn downloader(
    api: &Api,
    headers: &HeaderMap,
    id: &str,
    token: Option<&str>,
) -> Result<Option<String>, ApiError> {
    if headers.contains_key(axum::http::header::AUTHORIZATION) {
        return Ok(match Caller::from_headers(headers, api)? {
            Caller::Admin => None,
            Caller::User(u) => Some(u.to_string()),
        });
    }
    let Some(token) = token else {
        return Err(ApiError::unauthorized(
            "send Authorization: Bearer <token> or a signed link's ?token=",
        ));
    };
    api.broker
        .chat
        .attachments()
        .token_user(id, token, now_ms() / 1000)
        .map(Some)
        .ok_or_else(|| ApiError::unauthorized("the link is not valid or has expired"))
}

/// The uploads of `id` the caller may see; 404 when none.
async fn visible(api: &Api, id: &str, user: Option<&str>) -> Result<Vec<Upload>, ApiError> {
    let chat = &api.broker.chat;
    if !chat.attachments().settings.enabled || !valid_id(id) {
        return Err(not_found());
    }
    let uploads = chat.visible_uploads(id, user).await.map_err(unavailable)?;
    if uploads.is_empty() {
        chat.attachments()
            .metrics
            .refused_denied
            .fetch_add(1, Ordering::Relaxed);
        return Err(not_found());
    }
    Ok(uploads)
}

/// `GET /v1/attachments/{id}[?token=]`.
#[utoipa::path(
    get,
    path = "/v1/attachments/{id}",
    tag = "attachments",
    params(
        ("id" = String, Path, description = "The attachment id (SHA-256, hex)"),
        ("token" = Option<String>, Query, description = "A signed link's token, instead of a bearer token"),
    ),
    security(("user_jwt" = []), ("admin_token" = []), ()),
    responses(
        (status = 200, description = "The file, with its type, length, `nosniff` and `Content-Disposition`", body = Vec<u8>, content_type = "application/octet-stream"),
        (status = 401, description = "No token, or not a valid one, or an expired link", body = Error),
        (status = 404, description = "`not_found`: no such attachment, or not one the caller may see", body = Error),
    ),
)]
pub async fn download(
    State(api): State<Arc<Api>>,
    Path(id): Path<String>,
    query: Result<Query<Download>, QueryRejection>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let Query(query) = query.map_err(|e| ApiError::bad(e.body_text()))?;
    let user = downloader(&api, &headers, &id, query.token.as_deref())?;
    let uploads = visible(&api, &id, user.as_deref()).await?;
    let content_type = uploads
        .first()
        .map(|u| u.content_type.clone())
        .unwrap_or_default();
    let a = api.broker.chat.attachments();
    let path = a.path(&id);
    let opened = tokio::task::spawn_blocking(move || {
        let file = std::fs::File::open(path)?;
        let len = file.metadata()?.len();
        Ok::<_, std::io::Error>((file, len))
    })
    .await
    .map_err(unavailable)?;
    let (mut file, len) = match opened {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Err(not_found()),
        Err(e) => return Err(unavailable(e)),
    };
    // Read on a blocking thread, a chunk at a time, as the client takes it.
    let (tx, rx) = tokio::sync::mpsc::channel::<std::io::Result<Bytes>>(2);
    tokio::task::spawn_blocking(move || {
        let mut buf = vec![0u8; READ_CHUNK];
        loop {
            match file.read(&mut buf) {
                Ok(0) => return,
                Ok(n) => {
                    let chunk = Bytes::copy_from_slice(buf.get(..n).unwrap_or_default());
                    if tx.blocking_send(Ok(chunk)).is_err() {
                        return;
                    }
                }
                Err(e) => {
                    let _ = tx.blocking_send(Err(e));
                    return;
                }
            }
        }
    });
    let stream = futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|item| (item, rx))
    });
    a.metrics.downloads.fetch_add(1, Ordering::Relaxed);
    a.metrics.download_bytes.fetch_add(len, Ordering::Relaxed);
    let disposition = if content_type.starts_with("image/") {
        "inline"
    } else {
        "attachment"
    };
    let mut response = AxumBody::from_stream(stream).into_response();
    let h = response.headers_mut();
    let value = |s: String| HeaderValue::from_str(&s).map_err(unavailable);
    h.insert(CONTENT_TYPE, value(content_type.clone())?);
    h.insert(CONTENT_LENGTH, HeaderValue::from(len));
    h.insert(X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    h.insert(
        CONTENT_DISPOSITION,
        value(format!(
            "{disposition}; filename=\"{id}.{}\"",
            extension(&content_type)
        ))?,
    );
    h.insert(
        CONTENT_SECURITY_POLICY,
        HeaderValue::from_static("default-src 'none'; sandbox"),
    );
    h.insert(
        CACHE_CONTROL,
        HeaderValue::from_static("private, max-age=300"),
    );
    h.insert(ETAG, value(format!("\"{id}\""))?);
    Ok(response)
}

/// `POST /v1/attachments/{id}/token`: a signed link for a member.
#[utoipa::path(
    post,
    path = "/v1/attachments/{id}/token",
    tag = "attachments",
    params(("id" = String, Path, description = "The attachment id (SHA-256, hex)")),
    security(("user_jwt" = [])),
    responses(
        (status = 200, description = "A link valid `attachments.token_ttl_secs`", body = Link),
        (status = 400, description = "`bad_request`: the admin token", body = Error),
        (status = 401, description = "No token, or not a valid one (`WWW-Authenticate: Bearer`)", body = Error),
        (status = 404, description = "`not_found`: no such attachment, or not one the caller may see", body = Error),
    ),
)]
pub async fn token(
    caller: Caller,
    State(api): State<Arc<Api>>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let Caller::User(user) = &caller else {
        return Err(ApiError::bad(
            "links are for users: call with a user's token",
        ));
    };
    visible(&api, &id, Some(user)).await?;
    let (token, url, expires) = link(&api, &id, user).ok_or_else(|| {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "unavailable",
            "signed links are not available on this server",
        )
    })?;
    Ok(Json(
        json!({"token": token, "url": url, "expires": expires}),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn types_are_judged_by_their_first_bytes() {
        let png = b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR";
        assert!(type_matches("image/png", png));
        assert!(!type_matches("image/jpeg", png), "a PNG that claims JPEG");
        assert!(!type_matches("image/png", b"<svg onload=alert(1)>"));
        assert!(!type_matches("text/plain", png), "a PNG that claims text");
        assert!(type_matches("text/plain", b"hello"));
        assert!(type_matches("image/webp", b"RIFF\0\0\0\0WEBPVP8 "));
        assert_eq!(essence("Image/PNG; charset=x"), "image/png");
    }

    #[test]
    fn only_the_upload_route_gets_the_larger_limit() {
        assert_eq!(
            announced_limit("/v1/conversations/room/attachments"),
            Some(u64::MAX)
        );
        assert_eq!(announced_limit("/v1/conversations/room/messages"), None);
        assert_eq!(announced_limit("/v1/conversations/a/b/attachments"), None);
    }
}
