//! MQTT over WebSocket (MQTT 5 §6, MQTT 3.1.1 §6): the upgrade, its checks,
//! and [`WsStream`], which turns binary WebSocket messages back into the
//! byte stream the broker reads from a TCP socket.
//!
//! MQTT packets may be split across messages or packed several to one; the
//! byte stream makes both the same. Text frames are refused with close code
//! 1003, as the specification requires binary data [MQTT-6.0.0-1].

use std::collections::HashMap;
use std::io;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{ready, Context, Poll};
use std::time::Duration;

use bytes::{Buf, Bytes};
use chatmq_config::Websocket;
use futures_util::{Sink, Stream};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_tungstenite::tungstenite::handshake::server::{ErrorResponse, Request, Response};
use tokio_tungstenite::tungstenite::http::{header, HeaderValue, StatusCode};
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, WebSocketConfig};
use tokio_tungstenite::tungstenite::{Error as WsError, Message};
use tokio_tungstenite::WebSocketStream;

/// The subprotocols we speak, in order of preference: `mqtt` (MQTT 3.1.1
/// and 5) and `mqttv3.1`, which older clients still offer.
const SUBPROTOCOLS: &[&str] = &["mqtt", "mqttv3.1"];

/// Why an upgrade did not produce a connection.
#[derive(Debug, thiserror::Error)]
pub enum UpgradeError {
    #[error("websocket handshake timed out")]
    Timeout,
    #[error("websocket handshake failed: {0}")]
    Handshake(#[from] WsError),
}

/// Accepts WebSocket upgrades as `[websocket]` configures them.
#[derive(Debug, Clone)]
pub struct WsAcceptor {
    path: String,
    allowed_origins: Vec<String>,
    handshake_timeout: Duration,
    config: WebSocketConfig,
}

impl WsAcceptor {
    pub fn new(settings: &Websocket) -> WsAcceptor {
        let config = WebSocketConfig::default()
            // The read chunk, allocated per connection: most are idle.
            .read_buffer_size(4096)
            .max_frame_size(Some(settings.max_frame_size))
            .max_message_size(Some(settings.max_message_size));
        WsAcceptor {
            path: settings.path.clone(),
            allowed_origins: settings.allowed_origins.clone(),
            handshake_timeout: Duration::from_secs(settings.handshake_timeout_secs),
            config,
        }
    }

    /// Performs the upgrade on `stream` (TCP or TLS). `over_limit` (from an
    /// [`IpLimiter`]) answers the request with 429 instead, so the client
    /// learns why rather than seeing a dropped socket.
    #[allow(clippy::result_large_err)] // the callback's type is tungstenite's
    pub async fn accept<S>(&self, stream: S, over_limit: bool) -> Result<WsStream<S>, UpgradeError>
    where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        let check = |request: &Request, response: Response| {
            if over_limit {
                return Err(reject(
                    StatusCode::TOO_MANY_REQUESTS,
                    "too many connections from this address",
                ));
            }
            self.check(request, response)
        };
        let upgrade =
            tokio_tungstenite::accept_hdr_async_with_config(stream, check, Some(self.config));
        let ws = tokio::time::timeout(self.handshake_timeout, upgrade)
            .await
            .map_err(|_| UpgradeError::Timeout)??;
        Ok(WsStream::new(ws))
    }

    /// The checks of one upgrade request: path, `Origin`, subprotocol.
    /// (`ErrorResponse` is large, but tungstenite's callback fixes the type.)
    #[allow(clippy::result_large_err)]
    fn check(&self, request: &Request, mut response: Response) -> Result<Response, ErrorResponse> {
        let path = request.uri().path();
        if path != self.path && path != "/" {
            return Err(reject(
                StatusCode::NOT_FOUND,
                "no MQTT endpoint at this path",
            ));
        }
        if !self.allowed_origins.is_empty() {
            let origin = request
                .headers()
                .get(header::ORIGIN)
                .and_then(|v| v.to_str().ok());
            let allowed = origin.is_some_and(|o| self.allowed_origins.iter().any(|a| a == o));
            if !allowed {
                return Err(reject(StatusCode::FORBIDDEN, "origin not allowed"));
            }
        }
        let offered: Vec<&str> = request
            .headers()
            .get_all(header::SEC_WEBSOCKET_PROTOCOL)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .map(str::trim)
            .collect();
        if offered.is_empty() {
            // No subprotocol asked for: simple tools omit it; answer none.
            return Ok(response);
        }
        match SUBPROTOCOLS.iter().find(|p| offered.contains(p)) {
            Some(chosen) => {
                response.headers_mut().insert(
                    header::SEC_WEBSOCKET_PROTOCOL,
                    HeaderValue::from_static(chosen),
                );
                Ok(response)
            }
            None => Err(reject(
                StatusCode::BAD_REQUEST,
                "unsupported subprotocol: offer \"mqtt\"",
            )),
        }
    }
}

fn reject(status: StatusCode, why: &str) -> ErrorResponse {
    let mut response = ErrorResponse::new(Some(why.to_string()));
    *response.status_mut() = status;
    response
}

/// A WebSocket connection as a byte stream: reads yield the payloads of
/// binary messages in order; each write goes out as one binary message.
/// Pings are answered by tungstenite as it reads.
pub struct WsStream<S> {
    ws: WebSocketStream<S>,
    /// What is left of the last binary message read.
    pending: Bytes,
    /// The close code our close frame will carry.
    close_code: CloseCode,
    close_sent: bool,
}

impl<S> WsStream<S> {
    fn new(ws: WebSocketStream<S>) -> WsStream<S> {
        WsStream {
            ws,
            pending: Bytes::new(),
            close_code: CloseCode::Normal,
            close_sent: false,
        }
    }
}

fn to_io(error: WsError) -> io::Error {
    match error {
        WsError::Io(e) => e,
        WsError::ConnectionClosed | WsError::AlreadyClosed => {
            io::Error::new(io::ErrorKind::BrokenPipe, "websocket closed")
        }
        other => io::Error::new(io::ErrorKind::InvalidData, other),
    }
}

impl<S> AsyncRead for WsStream<S>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        while this.pending.is_empty() {
            match ready!(Pin::new(&mut this.ws).poll_next(cx)) {
                // The end of the stream, or the peer's close frame: EOF.
                None | Some(Ok(Message::Close(_))) => return Poll::Ready(Ok(())),
                Some(Ok(Message::Binary(data))) => this.pending = data,
                Some(Ok(Message::Text(_))) => {
                    this.close_code = CloseCode::Unsupported;
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        "MQTT over WebSocket needs binary frames [MQTT-6.0.0-1]",
                    )));
                }
                Some(Ok(Message::Ping(_) | Message::Pong(_) | Message::Frame(_))) => {}
                Some(Err(WsError::Capacity(e))) => {
                    this.close_code = CloseCode::Size;
                    return Poll::Ready(Err(io::Error::new(io::ErrorKind::InvalidData, e)));
                }
                Some(Err(WsError::Protocol(e))) => {
                    this.close_code = CloseCode::Protocol;
                    return Poll::Ready(Err(io::Error::new(io::ErrorKind::InvalidData, e)));
                }
                Some(Err(e)) => return Poll::Ready(Err(to_io(e))),
            }
        }
        let n = this.pending.len().min(buf.remaining());
        buf.put_slice(&this.pending[..n]);
        this.pending.advance(n);
        Poll::Ready(Ok(()))
    }
}

impl<S> AsyncWrite for WsStream<S>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let ws = &mut self.ws;
        ready!(Pin::new(&mut *ws).poll_ready(cx)).map_err(to_io)?;
        Pin::new(&mut *ws)
            .start_send(Message::Binary(Bytes::copy_from_slice(buf)))
            .map_err(to_io)?;
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.ws).poll_flush(cx).map_err(to_io)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if !this.close_sent {
            ready!(Pin::new(&mut this.ws).poll_ready(cx)).map_err(to_io)?;
            let frame = CloseFrame {
                code: this.close_code,
                reason: "".into(),
            };
            Pin::new(&mut this.ws)
                .start_send(Message::Close(Some(frame)))
                .map_err(to_io)?;
            this.close_sent = true;
        }
        match ready!(Pin::new(&mut this.ws).poll_close(cx)) {
            Ok(()) | Err(WsError::ConnectionClosed | WsError::AlreadyClosed) => Poll::Ready(Ok(())),
            Err(e) => Poll::Ready(Err(to_io(e))),
        }
    }
}

/// Counts connections per IP address against `[websocket]
/// max_connections_per_ip`. A [`Slot`] holds one place until dropped.
#[derive(Debug, Clone)]
pub struct IpLimiter {
    max: usize,
    counts: Arc<Mutex<HashMap<IpAddr, usize>>>,
}

/// One connection's place in an [`IpLimiter`].
#[derive(Debug)]
pub struct Slot {
    ip: IpAddr,
    counts: Arc<Mutex<HashMap<IpAddr, usize>>>,
}

impl IpLimiter {
    /// `max` 0 means no limit.
    pub fn new(max: usize) -> IpLimiter {
        IpLimiter {
            max,
            counts: Arc::default(),
        }
    }

    /// A place for one more connection from `ip`, or `None` at the limit.
    pub fn acquire(&self, ip: IpAddr) -> Option<Slot> {
        let mut counts = self.counts.lock().unwrap_or_else(|e| e.into_inner());
        let count = counts.entry(ip).or_insert(0);
        if self.max != 0 && *count >= self.max {
            return None;
        }
        *count += 1;
        Some(Slot {
            ip,
            counts: self.counts.clone(),
        })
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut counts = self.counts.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(count) = counts.get_mut(&self.ip) {
            *count -= 1;
            if *count == 0 {
                counts.remove(&self.ip);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limiter_counts_per_address_and_frees_on_drop() {
        let limiter = IpLimiter::new(2);
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let b: IpAddr = "10.0.0.2".parse().unwrap();
        let first = limiter.acquire(a).unwrap();
        let _second = limiter.acquire(a).unwrap();
        assert!(limiter.acquire(a).is_none());
        assert!(limiter.acquire(b).is_some());
        drop(first);
        assert!(limiter.acquire(a).is_some());
    }

    #[test]
    fn zero_means_no_limit() {
        let limiter = IpLimiter::new(0);
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let slots: Vec<Slot> = (0..100).filter_map(|_| limiter.acquire(a)).collect();
        assert_eq!(slots.len(), 100);
    }
}
