//! chatmq-broker: an MQTT 3.1.1 and 5.0 broker specialised for chat.
//!
//! The story of a packet: [`server`] accepts a socket, once [`admission`]
//! has let it in (a connection permit, the limits of its address), and
//! hands it to [`connection`], which reads bytes and lets [`codec`] turn them into
//! packets (MQTT 3.1.1 is mapped onto the MQTT 5 model there). The
//! [`channel`] is the per-connection protocol state machine: it checks each
//! packet against the rules and [`access`] control, leaves the topics the
//! [`chat`] layer owns to it through the [`hooks`], and asks the
//! [`broker`] to route publishes. The broker finds subscribers through the
//! [`router`] and queues the message in each [`session`], collecting the
//! writes that make it durable; the channel acknowledges only once they are
//! committed. The [`http`] API serves the same chat operations (and
//! health, readiness, metrics) to app servers and operators. A changed
//! configuration file is applied while running by [`reload`] (SIGHUP, or
//! the admin API).
//!
//! Embedding: [`embed::Embedded`] runs a broker inside any tokio program,
//! with in-process clients and publish interceptors (`docs/EMBEDDING.md`);
//! `Server::start(settings)` and `Server::shutdown` are the bare form.

pub mod access;
pub mod admission;
mod blocking;
pub mod bridge;
pub mod broker;
pub mod channel;
#[cfg(test)]
mod channel_tests;
pub mod chat;
mod clock;
pub use chatmq_protocol::codec;
pub mod connection;
pub mod counter;
mod deadlines;
pub mod drain;
pub mod embed;
pub mod exposition;
pub mod hooks;
pub mod http;
pub mod limits;
pub mod login_guard;
pub mod message;
pub mod ownership;
pub mod reload;
pub mod remote;
pub mod retained;
pub mod roaming;
pub mod router;
pub mod server;
pub mod session;
pub mod topic;

pub use server::{Server, StartError};
