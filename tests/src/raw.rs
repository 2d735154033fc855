//! Raw bytes on a socket, for what no well-behaved client sends.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::PATIENCE;

/// A 3.1.1 CONNECT for `client_id` with clean session and keepalive 60.
pub fn connect_v4(client_id: &str) -> Vec<u8> {
    let mut body = vec![0, 4, b'M', b'Q', b'T', b'T', 4, 0x02, 0, 60];
    body.extend_from_slice(&(client_id.len() as u16).to_be_bytes());
    body.extend_from_slice(client_id.as_bytes());
    let mut packet = vec![0x10, body.len() as u8];
    packet.extend(body);
    packet
}

/// A 3.1.1 QoS 0 PUBLISH.
pub fn publish_v4(topic: &str, payload: &[u8]) -> Vec<u8> {
    let mut body = Vec::new();
    body.extend_from_slice(&(topic.len() as u16).to_be_bytes());
    body.extend_from_slice(topic.as_bytes());
    body.extend_from_slice(payload);
    let mut packet = vec![0x30, body.len() as u8];
    packet.extend(body);
    packet
}

pub async fn open(addr: SocketAddr) -> TcpStream {
    TcpStream::connect(addr).await.expect("connect")
}

/// Writes `bytes` and reads what comes back until the broker closes the
/// connection (or `PATIENCE` passes: then `closed` is false).
pub async fn exchange(stream: &mut TcpStream, bytes: &[u8]) -> (Vec<u8>, bool) {
    let _ = stream.write_all(bytes).await;
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        match tokio::time::timeout_at(deadline, stream.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return (got, true),
            Ok(Ok(n)) => got.extend_from_slice(&buf[..n]),
            Err(_) => return (got, false),
        }
    }
}

/// Reads for `d` and returns what arrived (without waiting for a close).
pub async fn read_for(stream: &mut TcpStream, d: Duration) -> Vec<u8> {
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    let deadline = tokio::time::Instant::now() + d;
    while let Ok(Ok(n)) = tokio::time::timeout_at(deadline, stream.read(&mut buf)).await {
        if n == 0 {
            break;
        }
        got.extend_from_slice(&buf[..n]);
    }
    got
}

// Packets built and read with rumqttc's codecs, for exchanges a client
// library refuses to make (invalid filters, a second CONNECT, DISCONNECT
// reason codes, topic aliases above the maximum).

pub use rumqttc::mqttbytes::v4 as p4;
pub use rumqttc::v5::mqttbytes::v5 as p5;

/// The bytes of a 3.1.1 packet (written as is, without validation).
pub fn v4_bytes(p: &p4::Packet) -> Vec<u8> {
    let mut b = bytes::BytesMut::new();
    p.write(&mut b, usize::MAX).expect("encode 3.1.1 packet");
    b.to_vec()
}

/// The bytes of an MQTT 5 packet (written as is, without validation).
pub fn v5_bytes(p: &p5::Packet) -> Vec<u8> {
    let mut b = bytes::BytesMut::new();
    p.write(&mut b, None).expect("encode MQTT 5 packet");
    b.to_vec()
}

/// Why no packet came.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Silence {
    /// The broker closed the connection.
    Closed,
    /// The time given passed with the connection still open.
    Timeout,
}

/// A raw connection that reads the broker's answers packet by packet.
pub struct Wire {
    pub stream: TcpStream,
    buf: bytes::BytesMut,
}

impl Wire {
    pub async fn open(addr: SocketAddr) -> Wire {
        Wire::over(open(addr).await)
    }

    /// A wire over a socket the test set up itself (buffer sizes, ...).
    pub fn over(stream: TcpStream) -> Wire {
        Wire {
            stream,
            buf: bytes::BytesMut::new(),
        }
    }

    /// Writes `bytes`; a write the broker no longer reads is not an error.
    pub async fn send(&mut self, bytes: &[u8]) {
        let _ = self.stream.write_all(bytes).await;
    }

    pub async fn send_v4(&mut self, p: &p4::Packet) {
        self.send(&v4_bytes(p)).await;
    }

    pub async fn send_v5(&mut self, p: &p5::Packet) {
        self.send(&v5_bytes(p)).await;
    }

    /// The next 3.1.1 packet from the broker within `within`.
    pub async fn next_v4(&mut self, within: Duration) -> Result<p4::Packet, Silence> {
        self.next_with(within, |buf| match p4::Packet::read(buf, 1 << 28) {
            Ok(p) => Some(p),
            Err(rumqttc::mqttbytes::Error::InsufficientBytes(_)) => None,
            Err(e) => panic!("the broker sent a malformed 3.1.1 packet: {e:?}"),
        })
        .await
    }

    /// The next MQTT 5 packet from the broker within `within`.
    pub async fn next_v5(&mut self, within: Duration) -> Result<p5::Packet, Silence> {
        self.next_with(within, |buf| match p5::Packet::read(buf, None) {
            Ok(p) => Some(p),
            Err(rumqttc::v5::mqttbytes::Error::InsufficientBytes(_)) => None,
            Err(e) => panic!("the broker sent a malformed MQTT 5 packet: {e:?}"),
        })
        .await
    }

    async fn next_with<T>(
        &mut self,
        within: Duration,
        mut decode: impl FnMut(&mut bytes::BytesMut) -> Option<T>,
    ) -> Result<T, Silence> {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            if !self.buf.is_empty() {
                if let Some(p) = decode(&mut self.buf) {
                    return Ok(p);
                }
            }
            match tokio::time::timeout_at(deadline, self.stream.read_buf(&mut self.buf)).await {
                Ok(Ok(0)) | Ok(Err(_)) => return Err(Silence::Closed),
                Ok(Ok(_)) => {}
                Err(_) => return Err(Silence::Timeout),
            }
        }
    }

    /// Waits for the broker to close the connection, discarding whatever
    /// it sends first; false if it is still open after `within`.
    pub async fn closed_within(&mut self, within: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + within;
        let mut scratch = [0u8; 4096];
        loop {
            match tokio::time::timeout_at(deadline, self.stream.read(&mut scratch)).await {
                Ok(Ok(0)) | Ok(Err(_)) => return true,
                Ok(Ok(_)) => {}
                Err(_) => return false,
            }
        }
    }
}

// Packets built byte by byte, for what even rumqttc's encoder cannot be
// made to write (a field its flag does not announce, reserved bits,
// U+0000 in a string).

/// A length-prefixed field (UTF-8 string or binary data).
pub fn field(bytes: &[u8]) -> Vec<u8> {
    let mut out = (bytes.len() as u16).to_be_bytes().to_vec();
    out.extend_from_slice(bytes);
    out
}

/// A variable byte integer (Remaining Length, property lengths).
pub fn varint(mut n: usize) -> Vec<u8> {
    let mut out = Vec::new();
    loop {
        let mut b = (n % 128) as u8;
        n /= 128;
        if n > 0 {
            b |= 0x80;
        }
        out.push(b);
        if n == 0 {
            return out;
        }
    }
}

/// A packet: first byte, Remaining Length, body.
pub fn packet(byte1: u8, body: &[u8]) -> Vec<u8> {
    let mut out = vec![byte1];
    out.extend(varint(body.len()));
    out.extend_from_slice(body);
    out
}

/// A CONNECT of protocol `level` (4 or 5) with keepalive 60, written as
/// given: `flags` as they are, MQTT 5 `properties` (without their length),
/// then `payload` (client id first, then what the flags announce, or not).
pub fn connect_bytes(level: u8, flags: u8, properties: &[u8], payload: &[u8]) -> Vec<u8> {
    let mut body = field(b"MQTT");
    body.extend([level, flags, 0, 60]);
    if level == 5 {
        body.extend(varint(properties.len()));
        body.extend_from_slice(properties);
    }
    body.extend_from_slice(payload);
    packet(0x10, &body)
}

/// A raw MQTT 5 session (clean start, keepalive 0) past its CONNACK.
pub async fn connected_v5(addr: SocketAddr, client_id: &str) -> Wire {
    let mut w = Wire::open(addr).await;
    w.send_v5(&p5::Packet::Connect(
        p5::Connect {
            keep_alive: 0,
            client_id: client_id.into(),
            clean_start: true,
            properties: None,
        },
        None,
        None,
    ))
    .await;
    match w.next_v5(PATIENCE).await {
        Ok(p5::Packet::ConnAck(a)) => assert_eq!(a.code, p5::ConnectReturnCode::Success),
        other => panic!("expected CONNACK, got {other:?}"),
    }
    w
}

/// A raw 3.1.1 session (clean session) past its CONNACK.
pub async fn connected_v4(addr: SocketAddr, client_id: &str) -> Wire {
    let mut w = Wire::open(addr).await;
    w.send(&connect_v4(client_id)).await;
    match w.next_v4(PATIENCE).await {
        Ok(p4::Packet::ConnAck(a)) => assert_eq!(a.code, p4::ConnectReturnCode::Success),
        other => panic!("expected CONNACK, got {other:?}"),
    }
    w
}

/// Expects an MQTT 5 DISCONNECT with `reason`, then the close.
pub async fn expect_disconnect(w: &mut Wire, reason: p5::DisconnectReasonCode) {
    match w.next_v5(PATIENCE).await {
        Ok(p5::Packet::Disconnect(d)) => assert_eq!(d.reason_code, reason),
        other => panic!("expected DISCONNECT {reason:?}, got {other:?}"),
    }
    assert_eq!(w.next_v5(PATIENCE).await, Err(Silence::Closed));
}
