//! MQTT over WebSocket (MQTT 5 §6, MQTT 3.1.1 §6): the upgrade, its checks,
//! and [`WsStream`], which turns binary WebSocket messages back into the
//! byte stream the broker reads from a TCP socket.
//!
//! MQTT packets may be split across messages or packed several to one; the
//! byte stream makes both the same. Text frames are refused with close code
//! 1003, as the specification requires binary data [MQTT-6.0.0-1].
//!
//! A message is never larger than the largest MQTT packet, and before the
//! first packet (CONNECT) has arrived, never larger than the CONNECT limit:
//! an unauthenticated client cannot make the broker hold more for it than
//! it could over TCP.

use std::io;
use std::pin::Pin;
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

/// What the raw bytes of a message may exceed its payload by: frame
/// headers, and the start of the next message read in the same chunk.
const FRAMING_SLACK: usize = 4096;

/// Why an upgrade did not produce a connection.
#[derive(Debug, thiserror::Error)]
pub enum UpgradeError {
    #[error("websocket handshake timed out")]
    Timeout,
    #[error("websocket handshake failed: {0}")]
    Handshake(#[from] WsError),
}

/// The MQTT sizes a WebSocket message must stay within, from `[mqtt]`.
#[derive(Debug, Clone, Copy)]
pub struct PacketLimits {
    /// The largest MQTT packet the broker reads.
    pub max_packet: usize,
    /// The largest CONNECT, the first packet, read before authentication.
    pub max_connect: usize,
}

/// Accepts WebSocket upgrades as `[websocket]` configures them.
#[derive(Debug, Clone)]
pub struct WsAcceptor {
    path: String,
    allowed_origins: Vec<String>,
    handshake_timeout: Duration,
    config: WebSocketConfig,
    max_connect: usize,
}

impl WsAcceptor {
    /// `[websocket]`'s frame and message limits apply, capped at
    /// `limits.max_packet`: a message larger than any packet the broker
    /// would read is refused (1009) before it is assembled.
    pub fn new(settings: &Websocket, limits: PacketLimits) -> WsAcceptor {
        let config = WebSocketConfig::default()
            // The read chunk, allocated per connection: most are idle.
            .read_buffer_size(4096)
            .max_frame_size(Some(settings.max_frame_size.min(limits.max_packet)))
            .max_message_size(Some(settings.max_message_size.min(limits.max_packet)));
        WsAcceptor {
            path: settings.path.clone(),
            allowed_origins: settings.allowed_origins.clone(),
            handshake_timeout: Duration::from_secs(settings.handshake_timeout_secs),
            config,
            max_connect: limits.max_connect,
        }
    }

    /// Performs the upgrade on `stream` (TCP or TLS). `over_limit` (the
    /// address holds `max_connections_per_ip`) answers the request with 429
    /// instead, so the client learns why rather than seeing a dropped socket.
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
        // tungstenite bounds the upgrade request itself (64 KiB).
        let metered = Metered::new(stream);
        let upgrade =
            tokio_tungstenite::accept_hdr_async_with_config(metered, check, Some(self.config));
        let mut ws = tokio::time::timeout(self.handshake_timeout, upgrade)
            .await
            .map_err(|_| UpgradeError::Timeout)??;
        let metered = ws.get_mut();
        metered.since_message = 0;
        metered.limit = Some(self.max_connect.saturating_add(FRAMING_SLACK));
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
    ws: WebSocketStream<Metered<S>>,
    /// What is left of the last binary message read.
    pending: Bytes,
    /// How far the first MQTT packet has been read: until it is complete,
    /// messages are held to the CONNECT limit.
    connect: FirstPacket,
    /// The close code our close frame will carry.
    close_code: CloseCode,
    close_sent: bool,
}

impl<S> WsStream<S> {
    fn new(ws: WebSocketStream<Metered<S>>) -> WsStream<S> {
        WsStream {
            ws,
            pending: Bytes::new(),
            connect: FirstPacket::default(),
            close_code: CloseCode::Normal,
            close_sent: false,
        }
    }
}

/// The socket under tungstenite, counting the bytes read since the last
/// complete message. tungstenite's message limit is fixed when the stream
/// is made, so the tighter limit that holds until CONNECT has arrived is
/// enforced here, on the bytes of a message still being assembled.
struct Metered<S> {
    inner: S,
    /// Bytes read since tungstenite last yielded a message (frame headers
    /// included; up to one read chunk of the next message too).
    since_message: usize,
    /// The most `since_message` may reach; `None`: tungstenite's limit only.
    limit: Option<usize>,
    exceeded: bool,
}

impl<S> Metered<S> {
    fn new(inner: S) -> Metered<S> {
        Metered {
            inner,
            since_message: 0,
            limit: None,
            exceeded: false,
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Metered<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        ready!(Pin::new(&mut self.inner).poll_read(cx, buf))?;
        let read = buf.filled().len().saturating_sub(before);
        self.since_message = self.since_message.saturating_add(read);
        if self.limit.is_some_and(|limit| self.since_message > limit) {
            self.exceeded = true;
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "websocket message over the limit before CONNECT",
            )));
        }
        Poll::Ready(Ok(()))
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Metered<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// Where the first MQTT packet ends, learnt from its fixed header (a type
/// byte, then a remaining length of 1 to 4 bytes, MQTT 5 §2.1.4) as the
/// byte stream passes. A malformed header ends the watch: the broker's
/// decoder refuses the packet anyway.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
enum FirstPacket {
    /// Nothing of it yet.
    #[default]
    Start,
    /// Its type byte and `length_bytes` bytes of its remaining length,
    /// decoded so far into `remaining`.
    Header {
        length_bytes: u8,
        remaining: usize,
    },
    /// Bytes of the packet still to come.
    Body(usize),
    Done,
}

impl FirstPacket {
    fn feed(&mut self, mut bytes: &[u8]) {
        while !bytes.is_empty() {
            match *self {
                FirstPacket::Done => return,
                FirstPacket::Start => {
                    bytes = &bytes[1..];
                    *self = FirstPacket::Header {
                        length_bytes: 0,
                        remaining: 0,
                    };
                }
                FirstPacket::Header {
                    length_bytes,
                    remaining,
                } => {
                    let byte = bytes[0];
                    bytes = &bytes[1..];
                    let remaining = remaining | (usize::from(byte & 0x7F) << (7 * length_bytes));
                    *self = if byte & 0x80 == 0 {
                        FirstPacket::Body(remaining)
                    } else if length_bytes >= 3 {
                        FirstPacket::Done
                    } else {
                        FirstPacket::Header {
                            length_bytes: length_bytes + 1,
                            remaining,
                        }
                    };
                }
                FirstPacket::Body(left) => {
                    let taken = left.min(bytes.len());
                    bytes = &bytes[taken..];
                    *self = FirstPacket::Body(left - taken);
                }
            }
            if *self == FirstPacket::Body(0) {
                *self = FirstPacket::Done;
            }
        }
        if *self == FirstPacket::Body(0) {
            *self = FirstPacket::Done;
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
            let next = ready!(Pin::new(&mut this.ws).poll_next(cx));
            if let Some(Ok(_)) = next {
                this.ws.get_mut().since_message = 0;
            }
            match next {
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
                Some(Err(e)) => {
                    if this.ws.get_ref().exceeded {
                        this.close_code = CloseCode::Size;
                    }
                    return Poll::Ready(Err(to_io(e)));
                }
            }
        }
        let n = this.pending.len().min(buf.remaining());
        buf.put_slice(&this.pending[..n]);
        if this.connect != FirstPacket::Done {
            this.connect.feed(&this.pending[..n]);
            if this.connect == FirstPacket::Done {
                // CONNECT is in: from now on tungstenite's limits (at most
                // the largest packet) apply.
                this.ws.get_mut().limit = None;
            }
        }
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

#[cfg(test)]
mod tests {
    use super::*;

    fn fed(chunks: &[&[u8]]) -> FirstPacket {
        let mut first = FirstPacket::default();
        for chunk in chunks {
            first.feed(chunk);
        }
        first
    }

    #[test]
    fn the_first_packet_ends_where_its_remaining_length_says() {
        // CONNECT with a remaining length of 3.
        assert_eq!(fed(&[&[0x10, 3, 1, 2]]), FirstPacket::Body(1));
        assert_eq!(fed(&[&[0x10, 3, 1, 2, 3]]), FirstPacket::Done);
        assert_eq!(
            fed(&[&[0x10], &[3], &[1, 2], &[3, 0xC0]]),
            FirstPacket::Done
        );
        // 200 = 0xC8 0x01 as a variable byte integer.
        assert_eq!(fed(&[&[0x10, 0xC8], &[0x01]]), FirstPacket::Body(200));
        assert_eq!(fed(&[&[0x10, 0xC8, 0x01], &[0u8; 200]]), FirstPacket::Done);
    }

    #[test]
    fn a_remaining_length_over_four_bytes_ends_the_watch() {
        assert_eq!(fed(&[&[0x10, 0xFF, 0xFF, 0xFF, 0xFF]]), FirstPacket::Done);
        assert_eq!(
            fed(&[&[0x10, 0xFF, 0xFF, 0xFF, 0x7F]]),
            FirstPacket::Body(268_435_455)
        );
    }
}
