//! The connection to the broker: connect, report what happens, and when
//! the connection is lost, reconnect after a backoff, for as long as the
//! program runs.
//!
//! Each connection gets a fresh rumqttc `EventLoop`: what must be sent
//! again after a loss is decided by the outbox in the state file, not by
//! rumqttc's in-memory queue, so no send is repeated by two layers and a
//! restarted program behaves like a reconnected one. This module knows
//! nothing of chat; it only moves packets and reports the connection's
//! life to the app, tagged with a connection number so that a late event
//! of a dead connection is recognised.

use std::time::Duration;

use rumqttc::v5::mqttbytes::v5::{ConnectReturnCode, Packet};
use rumqttc::v5::{AsyncClient, ConnectionError, Event, MqttOptions};
use rumqttc::Outgoing;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use chatmq_backoff::Backoff;

/// The first reconnect waits about this long...
const BACKOFF_BASE: Duration = Duration::from_millis(250);
/// ...doubling up to this.
const BACKOFF_CAP: Duration = Duration::from_secs(10);
/// Requests the app may queue towards one connection (the outbox window
/// plus RPCs, subscriptions and acks stay well below it).
pub(crate) const REQUESTS: usize = 512;

/// What happens to the connection.
pub(crate) enum NetEvent {
    /// CONNACK received: `client` sends on this connection.
    Connected {
        conn: u64,
        client: AsyncClient,
        session_present: bool,
    },
    /// A packet from the broker (boxed: a PUBLISH is large, the other
    /// events small).
    Incoming { conn: u64, packet: Box<Packet> },
    /// A PUBLISH went out with this packet id; these come in the order the
    /// publishes were asked for.
    Published { conn: u64, pkid: u16 },
    /// Our DISCONNECT went out.
    Closed,
    /// The connection is gone (or could not be made); the next attempt is
    /// in `retry_in`.
    Lost {
        conn: u64,
        error: String,
        retry_in: Duration,
    },
    /// The broker refused us for a reason retrying cannot fix.
    Refused { error: String },
}

/// Runs the connection in a task that reports to `events` until the
/// receiver is dropped.
pub(crate) fn spawn(options: MqttOptions, events: mpsc::Sender<NetEvent>) -> JoinHandle<()> {
    tokio::spawn(run(options, events))
}

async fn run(options: MqttOptions, events: mpsc::Sender<NetEvent>) {
    let mut backoff = Backoff::new(BACKOFF_BASE, BACKOFF_CAP);
    let mut conn = 0;
    loop {
        conn += 1;
        let (client, mut eventloop) = AsyncClient::new(options.clone(), REQUESTS);
        let error = loop {
            let event = match eventloop.poll().await {
                Ok(Event::Incoming(Packet::ConnAck(ack))) => {
                    backoff.reset();
                    NetEvent::Connected {
                        conn,
                        client: client.clone(),
                        session_present: ack.session_present,
                    }
                }
                Ok(Event::Incoming(packet)) => NetEvent::Incoming {
                    conn,
                    packet: Box::new(packet),
                },
                Ok(Event::Outgoing(Outgoing::Publish(pkid))) => NetEvent::Published { conn, pkid },
                Ok(Event::Outgoing(Outgoing::Disconnect)) => NetEvent::Closed,
                Ok(Event::Outgoing(_)) => continue,
                Err(ConnectionError::ConnectionRefused(code)) if hopeless(code) => {
                    let error = format!(
                        "the broker refused the login ({code:?}): check the user and the \
                         password (a JWT may have expired) and that the client id is yours"
                    );
                    let _ = events.send(NetEvent::Refused { error }).await;
                    return;
                }
                Err(e) => break e.to_string(),
            };
            if events.send(event).await.is_err() {
                return;
            }
        };
        let retry_in = backoff.next_delay();
        let lost = NetEvent::Lost {
            conn,
            error,
            retry_in,
        };
        if events.send(lost).await.is_err() {
            return;
        }
        tokio::time::sleep(retry_in).await;
    }
}

/// Refusals that the same CONNECT would get again.
fn hopeless(code: ConnectReturnCode) -> bool {
    matches!(
        code,
        ConnectReturnCode::BadUserNamePassword
            | ConnectReturnCode::NotAuthorized
            | ConnectReturnCode::Banned
            | ConnectReturnCode::BadAuthenticationMethod
            | ConnectReturnCode::ClientIdentifierNotValid
            | ConnectReturnCode::BadClientId
            | ConnectReturnCode::RefusedProtocolVersion
            | ConnectReturnCode::UnsupportedProtocolVersion
    )
}
