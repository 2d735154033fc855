//! The WebSocket-to-MQTT path: after a valid upgrade request, the input is
//! the bytes of WebSocket frames from a client; `WsStream` turns their
//! binary messages into a byte stream, read and decoded as the connection
//! reads a TCP socket. Neither a frame nor the packets in it may panic.
#![no_main]

use std::io;
use std::pin::Pin;
use std::sync::OnceLock;
use std::task::{Context, Poll};

use bytes::BytesMut;
use chatmq_bridge::websocket::{PacketLimits, WsAcceptor};
use chatmq_config::{Mqtt, Websocket};
use libfuzzer_sys::fuzz_target;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};
use tokio::runtime::Runtime;

const UPGRADE: &[u8] = b"GET /mqtt HTTP/1.1\r\n\
Host: chatmq\r\n\
Upgrade: websocket\r\n\
Connection: Upgrade\r\n\
Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
Sec-WebSocket-Version: 13\r\n\
Sec-WebSocket-Protocol: mqtt\r\n\r\n";

/// A client socket in memory: reads yield the upgrade request, then the
/// input, then EOF; what the server writes is discarded. No read crosses
/// the end of the request: tungstenite refuses bytes that arrive with it
/// ("junk after client request"), as a real client waits for the 101.
struct Wire {
    input: Vec<u8>,
    at: usize,
}

impl AsyncRead for Wire {
    fn poll_read(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let end = if self.at < UPGRADE.len() {
            UPGRADE.len()
        } else {
            self.input.len()
        };
        let rest = &self.input[self.at..end];
        let n = rest.len().min(buf.remaining());
        buf.put_slice(&rest[..n]);
        self.at += n;
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for Wire {
    fn poll_write(
        self: Pin<&mut Self>,
        _: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Poll::Ready(Ok(buf.len()))
    }
    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

fn runtime() -> &'static Runtime {
    static RUNTIME: OnceLock<Runtime> = OnceLock::new();
    RUNTIME.get_or_init(|| {
        tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .expect("a current-thread runtime")
    })
}

fn acceptor() -> &'static WsAcceptor {
    static ACCEPTOR: OnceLock<WsAcceptor> = OnceLock::new();
    ACCEPTOR.get_or_init(|| {
        // The limits the broker derives from the default `[mqtt]` section
        // (`channel::max_packet_size`: payload + room for topic and
        // properties).
        let mqtt = Mqtt::default();
        let limits = PacketLimits {
            max_packet: mqtt.max_payload + 65_536 + 1_024,
            max_connect: mqtt.max_connect_packet,
        };
        WsAcceptor::new(&Websocket::default(), limits)
    })
}

fuzz_target!(|data: &[u8]| {
    let mut input = UPGRADE.to_vec();
    input.extend_from_slice(data);
    runtime().block_on(async {
        let wire = Wire { input, at: 0 };
        let mut ws = match acceptor().accept(wire, false).await {
            Ok(ws) => ws,
            Err(e) => panic!("the fixed upgrade request was refused: {e}"),
        };
        let mut buf = BytesMut::new();
        let mut protocol = None;
        loop {
            match ws.read_buf(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {
                    if chatmq_fuzz::read_packets(&mut buf, &mut protocol).is_err() {
                        return;
                    }
                }
            }
        }
    });
});
