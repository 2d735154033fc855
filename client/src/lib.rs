//! `chatmq-client`: a chatmq client library that behaves like a well-built
//! mobile app, for bots, tools and apps written in Rust. It is the core of
//! the terminal client `chatmq-cli`.
//!
//! It keeps a persistent MQTT 5 session, reconnects with capped exponential
//! backoff and jitter, resumes from `rpc/history` when the broker lost the
//! session, hands each message to the app once and in seq order per
//! conversation, and keeps an outbox in a state file so that a send
//! survives a lost connection, a broker restart and a restart of the
//! program, and is never repeated (the broker answers a resend of an
//! envelope id with the seq it already assigned).
//!
//! ```no_run
//! use chatmq_client::{Client, Event, Options};
//!
//! # async fn bot() -> Result<(), chatmq_client::Error> {
//! let server = "127.0.0.1:1883".parse()?;
//! let options = Options::new(server, "echo", "a JWT", "echo-state.json");
//! let (client, mut events) = Client::start(options).await?;
//! while let Some(event) = events.next().await {
//!     if let Event::Message(m) = event {
//!         if m.from != "echo" {
//!             client.send(&m.conv, serde_json::json!({"text": "got it"})).await?;
//!         }
//!     }
//! }
//! # Ok(())
//! # }
//! ```
//!
//! # What the crate guarantees
//!
//! - **Once, in order.** [`Event::Message`] comes once per (conv, seq), in
//!   seq order per conversation. Repeats (QoS 1 redeliveries, history
//!   overlapping live messages) are dropped; a message that skips ahead is
//!   held while the gap is fetched from `rpc/history`.
//! - **Acknowledged after it is recorded.** A PUBLISH from the broker is
//!   acknowledged only after the state file records its seq, so a crash in
//!   between costs a redelivery (dropped by the dedup), never a loss on
//!   the broker's side. The seq is recorded when the message is handed to
//!   [`Events`]: a process that dies after that and before the app acted
//!   on it does not get it again (the broker's history still has it).
//! - **Sends survive.** [`Client::send`] returns once the send is in the
//!   state file's outbox, with its envelope id. It is published at QoS 1
//!   (at most 32 in flight), again with the same id after every reconnect
//!   and restart, until the broker acknowledges it ([`Event::Acked`]) or
//!   refuses it ([`Event::Rejected`]).
//!
//! The state file is JSON, rewritten whole through a temporary file,
//! fsync and rename. One state file belongs to one running client.
//!
//! # Edits, deletes, reactions, attachments
//!
//! [`Client::edit`] and [`Client::delete`] change one of our messages by
//! seq; the change is a message of its own, delivered to every member as
//! an [`Event::Message`] of `kind` `message.edit` / `message.delete`
//! naming the changed seq in [`Message::target`], in seq order like any
//! other. History and replays give a changed message as it is now, with
//! [`Message::edited`] or [`Message::deleted`] (the body `null`).
//! [`Client::react`] and [`Client::unreact`] answer the message's summary
//! with our `mine`; everyone gets summaries as [`Event::Reactions`],
//! coalesced by the broker; history has them per message
//! ([`Message::reactions`]). Files go over the HTTP API
//! ([`Options::http`]): [`Client::upload_file`] (or [`Client::upload`])
//! returns the id a message body references as
//! `{"attachments": [{"id": ...}]}`, and [`Client::download`] saves one,
//! for members of a conversation it was uploaded to only.

mod attachments;
mod engine;
mod link;
mod server;
mod state;
mod timeline;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::Value;
use tokio::sync::{mpsc, oneshot};

pub use attachments::{content_type_for, Downloaded, Uploaded, FILE_MAX};
pub use server::{Server, Transport};
pub use timeline::{Change, Deletion, Message, Reaction, Reactions};

use attachments::Api;

use engine::Request;

/// How long a request that needs the broker's answer (history,
/// conversations) waits for it.
pub const RPC_TIMEOUT: Duration = Duration::from_secs(30);

/// What [`Client::start`] needs.
#[derive(Debug, Clone)]
pub struct Options {
    /// The broker and the transport to it.
    pub server: Server,
    /// PEM certificates TLS trusts (`mqtts://`, `wss://`); `None` means the
    /// system bundle, `/etc/ssl/certs/ca-certificates.crt`.
    pub ca_pem: Option<Vec<u8>>,
    /// The user id (the MQTT user name).
    pub user: String,
    /// A JWT or a static password.
    pub password: String,
    /// The MQTT client id on first use; the state file keeps it, and a
    /// different one given later is refused. `None`: generated.
    pub client_id: Option<String>,
    /// A generated client id is `{client_id_prefix}-{random}`.
    pub client_id_prefix: String,
    /// The state file: created on first use.
    pub state: PathBuf,
    /// The broker's HTTP API (`http://HOST:PORT`, `https://...`), for
    /// attachments; `None`: uploads and downloads fail with
    /// [`Error::Options`]. The password goes to it as the bearer token,
    /// so this needs a JWT.
    pub http: Option<String>,
}

impl Options {
    /// Options for `user` on `server`, with the state kept in `state`, the
    /// system's TLS roots and a generated client id.
    pub fn new(
        server: Server,
        user: impl Into<String>,
        password: impl Into<String>,
        state: impl Into<PathBuf>,
    ) -> Options {
        Options {
            server,
            ca_pem: None,
            user: user.into(),
            password: password.into(),
            client_id: None,
            client_id_prefix: "chatmq-client".into(),
            state: state.into(),
            http: None,
        }
    }
}

/// What the client reports, in the order it happened.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// The broker accepted the login. `session_present = false` means it
    /// had no session for us (first use, expired, taken over): the client
    /// subscribes again and fills every known conversation from history.
    Connected {
        client_id: String,
        session_present: bool,
    },
    /// The connection is gone; the client tries again in `retry_in`.
    Disconnected { error: String, retry_in: Duration },
    /// A message, once per (conv, seq), in seq order per conversation. Our
    /// own sends come back too (with `from` = our user). Edits and deletes
    /// come as messages too: `kind` `message.edit` / `message.delete`,
    /// naming the message they change in `target`. Boxed: a message is
    /// large, the other events small.
    Message(Box<Message>),
    /// A send left the outbox: the broker stored it. `seq` is its place in
    /// the conversation (`None` only if its delivery back to us never came
    /// while 1024 later sends were acknowledged).
    Acked {
        id: String,
        conv: String,
        seq: Option<u64>,
    },
    /// The broker refused a send (not a member, invalid envelope, rate
    /// limit); it left the outbox and is not sent again.
    Rejected {
        id: String,
        conv: String,
        reason: String,
    },
    /// The reactions of some messages of `conv` changed: each entry is a
    /// message's whole summary now (counts only, `mine` is `None`). The
    /// broker coalesces them, one event per conversation per
    /// `chat.reaction_window_ms`; live only (history has them after an
    /// absence).
    Reactions {
        conv: String,
        messages: Vec<Reactions>,
    },
    /// An event on `users/{me}/events` that is not an answer to us: member
    /// added or removed, read receipts, ... (DESIGN §4).
    Notice(Value),
    /// Something the app may want to log: an unreadable delivery, a
    /// refused subscription, a history fill the broker failed.
    Warning(String),
    /// The broker refused the login for a reason retrying cannot fix (bad
    /// password, expired JWT, someone else's client id). The last event.
    Refused(String),
    /// The state file cannot be written. The last event: the client stops
    /// rather than acknowledge what it could not record.
    Failed(String),
}

/// Why a call failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The state file cannot be read, parsed or written, or is another
    /// user's.
    #[error("{0}")]
    State(String),
    /// The options are not usable (a server address, TLS roots).
    #[error("{0}")]
    Options(String),
    /// Not connected: the request needs the broker.
    #[error("offline")]
    Offline,
    /// The connection was lost before the broker answered.
    #[error("the connection was lost before the broker answered")]
    Disconnected,
    /// The broker did not answer within [`RPC_TIMEOUT`].
    #[error("the broker did not answer in time")]
    Timeout,
    /// The broker answered with an error (`code` as in DESIGN §4).
    #[error("{code}: {message}")]
    Rpc { code: String, message: String },
    /// The HTTP API answered with an error (`not_found`, `too_large`,
    /// `unsupported_type`, ... as in DESIGN §4).
    #[error("{code}: {message} (HTTP {status})")]
    Api {
        status: u16,
        code: String,
        message: String,
    },
    /// The HTTP API could not be reached, or its answer was cut short.
    #[error("{0}")]
    Unreachable(String),
    /// A local file to upload or download to cannot be read or written.
    #[error("{0}")]
    File(String),
    /// Too many requests wait for an answer already.
    #[error("too many requests are waiting for the broker")]
    Busy,
    /// The outbox holds as many sends as it may.
    #[error("the outbox is full ({0} sends wait for the broker)")]
    OutboxFull(usize),
    /// The client stopped ([`Client::close`], a refused login, a state file
    /// that cannot be written).
    #[error("the client has stopped")]
    Stopped,
}

/// A handle on a running client: cheap to clone, usable from any task.
/// The client stops when [`Client::close`] is called or every handle is
/// dropped; the broker keeps the session for the next start.
#[derive(Debug, Clone)]
pub struct Client {
    requests: mpsc::Sender<Request>,
    user: String,
    client_id: String,
    api: Option<Api>,
}

/// The stream of [`Event`]s of one client. Read it steadily: while 256
/// events wait unread, the client stops reading from the broker (which
/// holds the rest for it), and a request awaiting an answer waits too.
#[derive(Debug)]
pub struct Events {
    events: mpsc::Receiver<Event>,
}

impl Events {
    /// The next event; `None` once the client has stopped.
    pub async fn next(&mut self) -> Option<Event> {
        self.events.recv().await
    }
}

impl Client {
    /// Opens (or creates) the state file and starts connecting in a task of
    /// the current tokio runtime. Fails at once if the state file is
    /// unreadable, corrupt or another user's, or TLS roots cannot be read.
    pub async fn start(options: Options) -> Result<(Client, Events), Error> {
        let api = match &options.http {
            Some(base) => Some(Api::new(
                base,
                &options.password,
                options.ca_pem.as_deref(),
            )?),
            None => None,
        };
        let (requests, events, user, client_id) = engine::start(options)?;
        Ok((
            Client {
                requests,
                user,
                client_id,
                api,
            },
            Events { events },
        ))
    }

    /// Our user id.
    pub fn user(&self) -> &str {
        &self.user
    }

    /// The MQTT client id (kept in the state file).
    pub fn client_id(&self) -> &str {
        &self.client_id
    }

    /// Sends `body` (any JSON value; a string is the usual text) to `conv`
    /// as a `text` envelope. Returns its envelope id once the send is in the
    /// state file; [`Event::Acked`] or [`Event::Rejected`] with that id
    /// follows, even across restarts of the program (the outbox is then
    /// sent again after the first connect).
    pub async fn send(&self, conv: &str, body: Value) -> Result<String, Error> {
        self.ask(|reply| Request::Send {
            conv: conv.to_string(),
            body,
            reply,
        })
        .await?
    }

    /// The last seq handed out for `conv` (`None`: nothing seen yet), and
    /// marks `conv` read up to it, as an app does when it shows a
    /// conversation (best effort: nothing is sent while offline).
    pub async fn open(&self, conv: &str) -> Result<Option<u64>, Error> {
        self.ask(|reply| Request::Open {
            conv: conv.to_string(),
            reply,
        })
        .await
    }

    /// Tells the broker `conv` is read up to `seq` (`rpc/read`: the unread
    /// counts of [`Client::conversations`], read receipts to others).
    /// Best effort: nothing is sent while offline.
    pub async fn mark_read(&self, conv: &str, seq: u64) -> Result<(), Error> {
        self.ask(|reply| Request::MarkRead {
            conv: conv.to_string(),
            seq,
            reply,
        })
        .await
    }

    /// The last `limit` messages of `conv` (`rpc/history`), oldest first.
    /// They are not [`Event::Message`]s and do not move the dedup point.
    pub async fn history(&self, conv: &str, limit: u64) -> Result<Vec<Message>, Error> {
        self.rpc(|reply| Request::History {
            conv: conv.to_string(),
            limit,
            reply,
        })
        .await
    }

    /// Our conversations with their unread counts (`rpc/conversations`):
    /// objects with `conv`, `title`, `unread`, ... as in DESIGN §4.
    pub async fn conversations(&self) -> Result<Vec<Value>, Error> {
        self.rpc(|reply| Request::Conversations { reply }).await
    }

    /// Edits our message `seq` of `conv` to `body` (`rpc/message.edit`; the
    /// conversation's owner may edit anyone's). Returns the seq of the
    /// change record, which every member gets as a `message.edit`
    /// [`Event::Message`] naming `seq` as its `target`.
    pub async fn edit(&self, conv: &str, seq: u64, body: Value) -> Result<u64, Error> {
        let result = self
            .call(
                "message.edit",
                serde_json::json!({"conv": conv, "seq": seq, "body": body}),
            )
            .await?;
        event_seq(&result)
    }

    /// Deletes our message `seq` of `conv` (`rpc/message.delete`; the
    /// owner may delete anyone's): its body is gone from the broker.
    /// Returns the seq of the `message.delete` record.
    pub async fn delete(&self, conv: &str, seq: u64) -> Result<u64, Error> {
        let result = self
            .call(
                "message.delete",
                serde_json::json!({"conv": conv, "seq": seq}),
            )
            .await?;
        event_seq(&result)
    }

    /// Adds our reaction `emoji` to message `seq` of `conv`
    /// (`rpc/reaction.add`; once per emoji, a repeat changes nothing).
    /// Returns the message's summary with our `mine`.
    pub async fn react(
        &self,
        conv: &str,
        seq: u64,
        emoji: &str,
    ) -> Result<BTreeMap<String, Reaction>, Error> {
        self.reaction("reaction.add", conv, seq, emoji).await
    }

    /// Takes our reaction `emoji` to message `seq` of `conv` back
    /// (`rpc/reaction.remove`). Returns the message's summary.
    pub async fn unreact(
        &self,
        conv: &str,
        seq: u64,
        emoji: &str,
    ) -> Result<BTreeMap<String, Reaction>, Error> {
        self.reaction("reaction.remove", conv, seq, emoji).await
    }

    /// Uploads `bytes` of `content_type` to `conv` over the HTTP API
    /// ([`Options::http`]). A message references it by sending a body
    /// `{"text": ..., "attachments": [{"id": <Uploaded::id>, ...}]}`; only
    /// the uploader may reference it, in that conversation. At most
    /// [`FILE_MAX`] bytes (the broker's limit is usually lower).
    pub async fn upload(
        &self,
        conv: &str,
        content_type: &str,
        bytes: Vec<u8>,
    ) -> Result<Uploaded, Error> {
        self.api()?.upload(conv, content_type, bytes).await
    }

    /// [`Client::upload`] of the file at `path`, its type guessed from its
    /// name ([`content_type_for`]).
    pub async fn upload_file(&self, conv: &str, path: &Path) -> Result<Uploaded, Error> {
        let api = self.api()?;
        let bytes = attachments::read_file(path).await?;
        api.upload(conv, content_type_for(path), bytes).await
    }

    /// Downloads attachment `id` into the file `to` (written whole through
    /// `to.part`, so a failure leaves nothing at `to`). The broker serves
    /// it to members of a conversation it was uploaded to; anyone else
    /// gets [`Error::Api`] with `not_found`.
    pub async fn download(&self, id: &str, to: &Path) -> Result<Downloaded, Error> {
        self.api()?.download(id, to).await
    }

    /// Disconnects (the session stays on the broker) and stops the client;
    /// waits up to a second for the DISCONNECT to go out. Other handles
    /// get [`Error::Stopped`] afterwards.
    pub async fn close(self) {
        let _ = self.ask(|reply| Request::Close { reply }).await;
    }

    fn api(&self) -> Result<&Api, Error> {
        self.api.as_ref().ok_or_else(|| {
            Error::Options("attachments need the HTTP API address (Options::http)".into())
        })
    }

    async fn reaction(
        &self,
        method: &'static str,
        conv: &str,
        seq: u64,
        emoji: &str,
    ) -> Result<BTreeMap<String, Reaction>, Error> {
        let result = self
            .call(
                method,
                serde_json::json!({"conv": conv, "seq": seq, "emoji": emoji}),
            )
            .await?;
        serde_json::from_value(result["reactions"].clone())
            .map_err(|e| unexpected(method, e.to_string()))
    }

    /// An RPC whose `result` the caller reads.
    async fn call(&self, method: &'static str, params: Value) -> Result<Value, Error> {
        self.rpc(|reply| Request::Call {
            method,
            params,
            reply,
        })
        .await
    }

    async fn ask<T>(
        &self,
        request: impl FnOnce(oneshot::Sender<T>) -> Request,
    ) -> Result<T, Error> {
        let (tx, rx) = oneshot::channel();
        self.requests
            .send(request(tx))
            .await
            .map_err(|_| Error::Stopped)?;
        rx.await.map_err(|_| Error::Stopped)
    }

    /// A request whose answer comes from the broker, bounded by
    /// [`RPC_TIMEOUT`].
    async fn rpc<T>(
        &self,
        request: impl FnOnce(oneshot::Sender<Result<T, Error>>) -> Request,
    ) -> Result<T, Error> {
        let answer = self.ask(request);
        let answer = tokio::time::timeout(RPC_TIMEOUT, answer)
            .await
            .map_err(|_| Error::Timeout)?;
        match answer {
            // The engine dropped the request: its connection was lost.
            Err(Error::Stopped) if !self.requests.is_closed() => Err(Error::Disconnected),
            other => other?,
        }
    }
}

/// The `event_seq` of an edit's or a delete's result.
fn event_seq(result: &Value) -> Result<u64, Error> {
    result["event_seq"]
        .as_u64()
        .ok_or_else(|| unexpected("message.edit", format!("no event_seq in {result}")))
}

/// A broker answer that does not say what DESIGN §4 says it does.
fn unexpected(method: &str, why: String) -> Error {
    Error::Rpc {
        code: "unexpected_answer".into(),
        message: format!("{method}: {why}"),
    }
}
