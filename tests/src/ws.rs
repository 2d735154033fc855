//! A raw MQTT-over-WebSocket client for tests of the transport itself:
//! the upgrade request is built by hand, frames are sent as given, and MQTT
//! packets are decoded from whatever binary messages arrive.

use std::net::SocketAddr;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use rumqttc::v5::mqttbytes::v5 as p5;
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::{HeaderValue, Response};
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::{Error, Message};
use tokio_tungstenite::WebSocketStream;

use crate::raw::Silence;

/// An open WebSocket, its handshake response, and undecoded bytes.
pub struct WsWire {
    pub ws: WebSocketStream<TcpStream>,
    /// The subprotocol the server chose, if any.
    pub protocol: Option<String>,
    buf: bytes::BytesMut,
}

/// Opens `ws://addr{path}`, offering `protocols` (none if empty) and an
/// `Origin` if given. `Err` carries the HTTP status of a refused upgrade.
pub async fn open(
    addr: SocketAddr,
    path: &str,
    protocols: &[&str],
    origin: Option<&str>,
) -> Result<WsWire, u16> {
    let mut request = format!("ws://{addr}{path}")
        .into_client_request()
        .expect("request");
    if !protocols.is_empty() {
        let offered = HeaderValue::from_str(&protocols.join(", ")).expect("header");
        request
            .headers_mut()
            .insert("Sec-WebSocket-Protocol", offered);
    }
    if let Some(origin) = origin {
        let origin = HeaderValue::from_str(origin).expect("header");
        request.headers_mut().insert("Origin", origin);
    }
    let tcp = TcpStream::connect(addr).await.expect("connect");
    let upgrade = tokio_tungstenite::client_async(request, tcp);
    match tokio::time::timeout(crate::PATIENCE, upgrade).await {
        Ok(Ok((ws, response))) => Ok(WsWire {
            ws,
            protocol: chosen_protocol(&response),
            buf: bytes::BytesMut::new(),
        }),
        Ok(Err(Error::Http(response))) => Err(response.status().as_u16()),
        Ok(Err(e)) => panic!("websocket upgrade failed: {e}"),
        Err(_) => panic!("websocket upgrade timed out"),
    }
}

fn chosen_protocol<T>(response: &Response<T>) -> Option<String> {
    response
        .headers()
        .get("Sec-WebSocket-Protocol")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string)
}

/// What ended a connection, as the client saw it.
#[derive(Debug, PartialEq, Eq)]
pub enum Ending {
    /// A close frame with this code.
    Close(Option<CloseCode>),
    /// The TCP connection ended without a close frame.
    Dropped,
}

impl WsWire {
    /// Sends `bytes` as one binary message.
    pub async fn send(&mut self, bytes: &[u8]) {
        let _ = self.ws.send(Message::binary(bytes.to_vec())).await;
    }

    pub async fn send_v5(&mut self, p: &p5::Packet) {
        self.send(&crate::raw::v5_bytes(p)).await;
    }

    /// The next MQTT 5 packet, from however many messages it spans.
    pub async fn next_v5(&mut self, within: Duration) -> Result<p5::Packet, Silence> {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            if !self.buf.is_empty() {
                match p5::Packet::read(&mut self.buf, None) {
                    Ok(p) => return Ok(p),
                    Err(rumqttc::v5::mqttbytes::Error::InsufficientBytes(_)) => {}
                    Err(e) => panic!("the broker sent a malformed MQTT 5 packet: {e:?}"),
                }
            }
            match tokio::time::timeout_at(deadline, self.ws.next()).await {
                Ok(Some(Ok(Message::Binary(data)))) => self.buf.extend_from_slice(&data),
                Ok(Some(Ok(Message::Text(_)))) => panic!("the broker sent a text frame"),
                Ok(Some(Ok(_))) => {}
                Ok(Some(Err(_)) | None) => return Err(Silence::Closed),
                Err(_) => return Err(Silence::Timeout),
            }
        }
    }

    /// Reads until the connection ends, within `within`; `None` if it is
    /// still open then.
    pub async fn ending(&mut self, within: Duration) -> Option<Ending> {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            match tokio::time::timeout_at(deadline, self.ws.next()).await {
                Ok(Some(Ok(Message::Close(frame)))) => {
                    return Some(Ending::Close(frame.map(|f| f.code)))
                }
                Ok(Some(Ok(_))) => {}
                Ok(Some(Err(_)) | None) => return Some(Ending::Dropped),
                Err(_) => return None,
            }
        }
    }
}
