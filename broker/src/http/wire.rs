//! The bytes of one HTTP connection, as hyper reads and writes them, with
//! the one repair hyper has no option for: a request it cannot parse (a
//! URI over 64 KiB: 414; headers over its buffer: 431; a malformed line or
//! `Content-Length`: 400) is answered by hyper itself, before any handler,
//! with an empty body. That answer is rewritten here into the same status
//! and headers with the API's JSON error body, so a client sees one error
//! shape whatever refused it.
//!
//! hyper's answer is recognised exactly: a write that is one whole response
//! head, status 4xx or 5xx, `content-length: 0`, no `content-type`. Every
//! other error answer has passed through the router's `json_errors` and
//! carries a JSON body and its type, so it never looks like that; anything
//! else passes through untouched.

use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use axum::http::StatusCode;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use super::ApiError;

/// A connection's socket with hyper's own error answers given JSON bodies.
pub struct Wire<S> {
    inner: S,
    /// A rewritten answer still to be written, and how much of it is.
    rewritten: Vec<u8>,
    sent: usize,
}

impl<S> Wire<S> {
    pub fn new(inner: S) -> Wire<S> {
        Wire {
            inner,
            rewritten: Vec::new(),
            sent: 0,
        }
    }
}

impl<S: AsyncWrite + Unpin> Wire<S> {
    /// Writes what is left of a rewritten answer.
    fn poll_drain(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.sent < self.rewritten.len() {
            let n = ready!(Pin::new(&mut self.inner).poll_write(cx, &self.rewritten[self.sent..]))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.sent += n;
        }
        Poll::Ready(Ok(()))
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Wire<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Wire<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        ready!(this.poll_drain(cx))?;
        if let Some(answer) = with_json_body(buf) {
            this.rewritten = answer;
            this.sent = 0;
            // Taken whole; written by this call or the flush that follows.
            if let Poll::Ready(Err(e)) = this.poll_drain(cx) {
                return Poll::Ready(Err(e));
            }
            return Poll::Ready(Ok(buf.len()));
        }
        Pin::new(&mut this.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        ready!(self.poll_drain(cx))?;
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        ready!(self.poll_drain(cx))?;
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// hyper's bodiless error answer in `write`, rewritten with a JSON body;
/// `None` for anything else.
fn with_json_body(write: &[u8]) -> Option<Vec<u8>> {
    let head = write.strip_suffix(b"\r\n\r\n")?;
    if !(head.starts_with(b"HTTP/1.1 ") || head.starts_with(b"HTTP/1.0 ")) {
        return None;
    }
    // One head and nothing after it.
    if head.windows(4).any(|w| w == b"\r\n\r\n") {
        return None;
    }
    let head = std::str::from_utf8(head).ok()?;
    let mut lines = head.split("\r\n");
    let status_line = lines.next()?;
    let status = StatusCode::from_bytes(status_line.get(9..12)?.as_bytes()).ok()?;
    if !(status.is_client_error() || status.is_server_error()) {
        return None;
    }
    let mut headers = Vec::new();
    let mut empty = false;
    for line in lines {
        let (name, value) = line.split_once(':')?;
        if name.eq_ignore_ascii_case("content-type") {
            return None;
        }
        if name.eq_ignore_ascii_case("content-length") {
            empty = value.trim() == "0";
        } else {
            headers.push(line);
        }
    }
    if !empty {
        return None;
    }
    let reason = status.canonical_reason().unwrap_or("error").to_lowercase();
    let body = ApiError::for_status(status, &format!("the request could not be read: {reason}"))
        .body()
        .to_string();
    let mut answer = format!("{status_line}\r\n");
    for line in headers {
        answer.push_str(line);
        answer.push_str("\r\n");
    }
    answer.push_str("content-type: application/json\r\n");
    answer.push_str(&format!("content-length: {}\r\n\r\n", body.len()));
    answer.push_str(&body);
    Some(answer.into_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hypers_bodiless_error_gets_the_json_body() {
        let bare = b"HTTP/1.1 414 URI Too Long\r\ncontent-length: 0\r\ndate: Wed, 02 Dec 2026 07:00:00 GMT\r\n\r\n";
        let answer = String::from_utf8(with_json_body(bare).unwrap()).unwrap();
        let (head, body) = answer.split_once("\r\n\r\n").unwrap();
        assert!(head.starts_with("HTTP/1.1 414 URI Too Long\r\n"), "{head}");
        assert!(
            head.contains("\r\ndate: Wed, 02 Dec 2026 07:00:00 GMT"),
            "{head}"
        );
        assert!(
            head.contains("\r\ncontent-type: application/json"),
            "{head}"
        );
        assert!(
            head.contains(&format!("\r\ncontent-length: {}", body.len())),
            "{head}"
        );
        let json: serde_json::Value = serde_json::from_str(body).unwrap();
        assert_eq!(json["error"]["code"], "uri_too_long");
    }

    #[test]
    fn other_writes_pass_untouched() {
        let cases: [&[u8]; 5] = [
            // A success.
            b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n",
            // An error with its JSON type.
            b"HTTP/1.1 404 Not Found\r\ncontent-type: application/json\r\ncontent-length: 0\r\n\r\n",
            // An error with a body to come.
            b"HTTP/1.1 400 Bad Request\r\ncontent-length: 12\r\n\r\n",
            // A head followed by more.
            b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\n\r\nHTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\n\r\n",
            // Body bytes.
            b"{\"messages\":[]}",
        ];
        for case in cases {
            assert_eq!(
                with_json_body(case),
                None,
                "{}",
                String::from_utf8_lossy(case)
            );
        }
    }
}
