//! chatmq's edges, which know nothing of the broker:
//!
//! - [`websocket`]: MQTT over WebSocket. [`websocket::WsAcceptor`] performs
//!   the upgrade (path, `Origin`, subprotocol, limits) and yields a
//!   [`websocket::WsStream`], a byte stream the broker serves exactly like a
//!   TCP socket, whose messages never exceed the MQTT packet limits.
//! - [`tls`]: [`tls::TlsAcceptor`], rustls with the certificate and key a
//!   `[mqtt.tls]` or `[websocket.tls]` section names, for MQTT and `wss`.
//! - [`mqtt`]: bridges to other MQTT brokers (`[[bridge.remotes]]`): the
//!   remote connection, topic rewriting, QoS 1 acknowledged end to end;
//!   the broker supplies the local side through channels.
//! - [`push`]: notifications to members with no live session: the device
//!   registry, mutes, the durable queue and the [`push::Gateway`] that
//!   delivers it through APNs, FCM HTTP v1 or the operator's webhook. It
//!   needs storage, so it sits behind the default feature `push`; without
//!   it the crate builds with no RocksDB (the fuzz targets use that).

#[cfg(feature = "mqtt")]
pub mod mqtt;
#[cfg(feature = "push")]
pub mod push;
pub mod tls;
pub mod websocket;
