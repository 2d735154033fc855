//! chatmq-protocol: what arrives on the wire, before any broker state.
//!
//! - [`auth`] reads and writes MQTT 5 AUTH (rumqttc's cannot be used);
//! - [`codec`] frames MQTT packets and maps 3.1.1 onto the MQTT 5 model;
//! - [`strict`] checks what the codecs read past (trailing fields,
//!   reserved bits, U+0000);
//! - [`envelope`] parses the chat envelope a client publishes and formats
//!   the one subscribers receive;
//! - [`rpc_request`] parses an RPC request and its parameters.
//!
//! The crate depends on no storage and no runtime, so fuzz targets (`fuzz/`)
//! and other tools link it in seconds; the broker re-exports the codec as
//! `codec` and uses the parsers from its `chat` module.

pub mod auth;
pub mod codec;
pub mod envelope;
pub mod rpc_request;
pub mod strict;
