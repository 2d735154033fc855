//! Attachments over the broker's HTTP API (DESIGN §4, "Attachments"):
//! upload a file to a conversation, download one by its id. MQTT carries
//! only the reference (`"attachments": [{"id": ...}]` in a message body);
//! the bytes go over HTTP with the same JWT as a bearer token.
//!
//! This module never touches the state file or the MQTT session: an
//! upload is not in the outbox (the message that references it is).

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

use reqwest::header::{AUTHORIZATION, CONTENT_TYPE};
use reqwest::{StatusCode, Url};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::Error;

/// The largest file the client uploads (read whole into memory) or
/// downloads; the broker's own `[attachments] max_bytes` is usually less.
pub const FILE_MAX: u64 = 100 * 1024 * 1024;
/// How long an upload or a download may take in all.
const TRANSFER_TIMEOUT: Duration = Duration::from_secs(300);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// The broker's answer to an upload.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Uploaded {
    /// The file's SHA-256 in hex: what a message body references.
    pub id: String,
    pub size: u64,
    pub content_type: String,
}

/// A file written by [`crate::Client::download`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Downloaded {
    pub path: PathBuf,
    pub size: u64,
    pub content_type: String,
}

/// The HTTP API of one broker, with our bearer token.
#[derive(Clone)]
pub(crate) struct Api {
    http: reqwest::Client,
    base: Url,
    token: String,
}

/// Not derived: the token stays out of logs.
impl std::fmt::Debug for Api {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Api")
            .field("base", &self.base.as_str())
            .finish()
    }
}

impl Api {
    /// The API at `base` (`http://HOST:PORT` or `https://...`), trusting
    /// `ca_pem` for https when given (else the bundled web roots).
    pub fn new(base: &str, token: &str, ca_pem: Option<&[u8]>) -> Result<Api, Error> {
        let bad = |why: String| Error::Options(format!("the HTTP API address {base:?}: {why}"));
        let form = "it needs http://HOST:PORT or https://HOST:PORT";
        let base = Url::parse(base).map_err(|e| bad(format!("{e}; {form}")))?;
        if !matches!(base.scheme(), "http" | "https") || base.cannot_be_a_base() {
            return Err(bad(form.into()));
        }
        let mut builder = reqwest::Client::builder()
            .connect_timeout(CONNECT_TIMEOUT)
            .timeout(TRANSFER_TIMEOUT);
        if let (Some(pem), "https") = (ca_pem, base.scheme()) {
            for cert in reqwest::Certificate::from_pem_bundle(pem)
                .map_err(|e| Error::Options(format!("the CA certificates: {e}")))?
            {
                builder = builder.add_root_certificate(cert);
            }
        }
        let http = builder
            .build()
            .map_err(|e| Error::Options(format!("the HTTP client: {e}")))?;
        Ok(Api {
            http,
            base,
            token: token.to_string(),
        })
    }

    /// `POST /v1/conversations/{conv}/attachments` with `bytes` as
    /// `content_type`.
    pub async fn upload(
        &self,
        conv: &str,
        content_type: &str,
        bytes: Vec<u8>,
    ) -> Result<Uploaded, Error> {
        if !valid_conv(conv) {
            return Err(Error::Options(format!("{conv:?} is not a conversation id")));
        }
        if bytes.len() as u64 > FILE_MAX {
            return Err(Error::File(format!(
                "{} bytes is more than the {FILE_MAX} the client uploads",
                bytes.len()
            )));
        }
        let url = self.url(&["v1", "conversations", conv, "attachments"]);
        let answer = self
            .http
            .post(url)
            .header(AUTHORIZATION, format!("Bearer {}", self.token))
            .header(CONTENT_TYPE, content_type)
            .body(bytes)
            .send()
            .await
            .map_err(unreachable)?;
        if answer.status() != StatusCode::CREATED {
            return Err(refusal(answer).await);
        }
        answer
            .json::<Uploaded>()
            .await
            .map_err(|e| Error::Unreachable(format!("an unreadable upload answer: {e}")))
    }

    /// `GET /v1/attachments/{id}` into `path`, through a temporary file
    /// next to it so that a failed download leaves nothing at `path`.
    pub async fn download(&self, id: &str, path: &Path) -> Result<Downloaded, Error> {
        if !valid_id(id) {
            return Err(Error::Options(format!(
                "{id:?} is not an attachment id (64 hex digits)"
            )));
        }
        let mut answer = self
            .http
            .get(self.url(&["v1", "attachments", id]))
            .header(AUTHORIZATION, format!("Bearer {}", self.token))
            .send()
            .await
            .map_err(unreachable)?;
        if answer.status() != StatusCode::OK {
            return Err(refusal(answer).await);
        }
        let content_type = answer
            .headers()
            .get(CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("application/octet-stream")
            .to_string();
        let tmp = temporary_path(path);
        let file_error = |e: std::io::Error| Error::File(format!("{}: {e}", path.display()));
        let created = tmp.clone();
        let mut file = blocking(move || std::fs::File::create(created))
            .await
            .map_err(file_error)?;
        let written = async {
            let mut size: u64 = 0;
            while let Some(chunk) = answer.chunk().await.map_err(unreachable)? {
                size = size.saturating_add(chunk.len() as u64);
                if size > FILE_MAX {
                    return Err(Error::File(format!(
                        "the attachment is larger than the {FILE_MAX} bytes the client downloads"
                    )));
                }
                file = blocking(move || {
                    file.write_all(&chunk)?;
                    Ok(file)
                })
                .await
                .map_err(file_error)?;
            }
            let (from, to) = (tmp.clone(), path.to_path_buf());
            blocking(move || {
                file.sync_all()?;
                std::fs::rename(from, to)
            })
            .await
            .map_err(file_error)?;
            Ok(size)
        }
        .await;
        match written {
            Ok(size) => Ok(Downloaded {
                path: path.to_path_buf(),
                size,
                content_type,
            }),
            Err(e) => {
                let _ = blocking(move || std::fs::remove_file(tmp)).await;
                Err(e)
            }
        }
    }

    fn url(&self, segments: &[&str]) -> Url {
        let mut url = self.base.clone();
        if let Ok(mut path) = url.path_segments_mut() {
            path.pop_if_empty().extend(segments);
        }
        url
    }
}

/// Reads the file to upload, refusing one over [`FILE_MAX`] before reading.
pub(crate) async fn read_file(path: &Path) -> Result<Vec<u8>, Error> {
    let named = |e: std::io::Error| Error::File(format!("{}: {e}", path.display()));
    let p = path.to_path_buf();
    let size = blocking(move || std::fs::metadata(p))
        .await
        .map_err(named)?
        .len();
    if size > FILE_MAX {
        return Err(Error::File(format!(
            "{}: {size} bytes is more than the {FILE_MAX} the client uploads",
            path.display()
        )));
    }
    let p = path.to_path_buf();
    blocking(move || std::fs::read(p)).await.map_err(named)
}

/// File I/O off the runtime's threads.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> std::io::Result<T> + Send + 'static,
) -> std::io::Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(std::io::Error::other)?
}

fn unreachable(e: reqwest::Error) -> Error {
    Error::Unreachable(format!("the HTTP API: {e}"))
}

/// An error answer `{"error": {"code", "message"}}` as [`Error::Api`].
async fn refusal(answer: reqwest::Response) -> Error {
    let status = answer.status().as_u16();
    let body: Value = answer.json().await.unwrap_or(Value::Null);
    let error = &body["error"];
    Error::Api {
        status,
        code: error["code"].as_str().unwrap_or("error").to_string(),
        message: error["message"]
            .as_str()
            .unwrap_or("the request failed")
            .to_string(),
    }
}

/// `<path>.part`, beside the file it becomes.
fn temporary_path(path: &Path) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(".part");
    path.with_file_name(name)
}

/// A SHA-256 in lower-case hex, as the broker names files.
pub(crate) fn valid_id(id: &str) -> bool {
    id.len() == 64 && id.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

/// `[A-Za-z0-9_.:-]{1,128}` (DESIGN §4), and not a dot segment of a path.
fn valid_conv(c: &str) -> bool {
    (1..=128).contains(&c.len())
        && c != "."
        && c != ".."
        && c.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b':' | b'-'))
}

/// The content type a file's name suggests: the types the broker
/// recognises by their first bytes, plain text, else
/// `application/octet-stream` (which the broker may refuse).
pub fn content_type_for(path: &Path) -> &'static str {
    let ext = path
        .extension()
        .and_then(|e| e.to_str())
        .map(str::to_ascii_lowercase);
    match ext.as_deref() {
        Some("png") => "image/png",
        Some("jpg" | "jpeg") => "image/jpeg",
        Some("gif") => "image/gif",
        Some("webp") => "image/webp",
        Some("pdf") => "application/pdf",
        Some("txt") => "text/plain",
        _ => "application/octet-stream",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_keep_the_base_path_and_encode_nothing_away() {
        let api = Api::new("http://127.0.0.1:8080", "t", None).unwrap();
        assert_eq!(
            api.url(&["v1", "conversations", "dm:a:b", "attachments"])
                .as_str(),
            "http://127.0.0.1:8080/v1/conversations/dm:a:b/attachments"
        );
        let api = Api::new("https://chat.example.com/api/", "t", None).unwrap();
        assert_eq!(
            api.url(&["v1", "attachments", "ab"]).as_str(),
            "https://chat.example.com/api/v1/attachments/ab"
        );
    }

    #[test]
    fn bad_addresses_and_ids_are_named() {
        let err = |s: &str| Api::new(s, "t", None).unwrap_err().to_string();
        assert!(
            err("127.0.0.1:8080").contains("http://"),
            "{}",
            err("127.0.0.1:8080")
        );
        assert!(err("mqtt://h:1").contains("http://"));
        assert!(valid_id(&"a1".repeat(32)));
        assert!(!valid_id(&"A1".repeat(32)));
        assert!(!valid_id("../../etc/passwd"));
        assert!(!valid_conv("..") && !valid_conv("a/b") && valid_conv("dm:a:b"));
    }

    #[test]
    fn content_types_come_from_the_name() {
        assert_eq!(content_type_for(Path::new("cat.PNG")), "image/png");
        assert_eq!(content_type_for(Path::new("a/b.jpeg")), "image/jpeg");
        assert_eq!(
            content_type_for(Path::new("notes")),
            "application/octet-stream"
        );
        assert_eq!(
            temporary_path(Path::new("d/x.png")),
            Path::new("d/x.png.part")
        );
    }
}
