//! chatmq-protocol: what arrives on the wire, before any broker state.
//!
//! [`codec`] frames MQTT packets and maps 3.1.1 onto the MQTT 5 model;
//! [`strict`] checks what the codecs read past (trailing fields, reserved
//! bits, U+0000). The crate depends on no storage and no runtime, so fuzz
//! targets and other tools can link it in seconds; the broker re-exports
//! it as `codec`.

pub mod codec;
pub mod strict;
