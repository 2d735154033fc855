//! The extension points of the MQTT state machine.
//!
//! [`crate::channel`] speaks MQTT and nothing else: it validates packets,
//! keeps the QoS state and acknowledges once writes are durable. What a
//! topic means beyond routing is decided behind two seams, and the channel
//! calls nothing else to ask:
//!
//! - [`Hooks`]: the topics the broker itself owns (for chatmq the chat
//!   namespaces, DESIGN §4), and what happens around a session's life
//!   (online, offline, subscribe). One implementation per broker
//!   ([`crate::chat::Chat`], in `chat/hooks.rs`), called statically: no
//!   dynamic dispatch, no boxed future per packet.
//! - [`Interceptor`]: checks that a program embedding the broker registers
//!   (moderation, say; see `docs/EMBEDDING.md`). Called through
//!   `Arc<dyn Interceptor>` once per client PUBLISH, before the topic's
//!   owner or the router sees it; with none registered, one atomic load.
//!
//! Neither may block: both run on the connection's task.

use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};

use bytes::Bytes;
use chatmq_storage::{Batch, Commit};
use rumqttc::v5::mqttbytes::v5::{DisconnectReasonCode, Filter, PubAckReason, Publish};
use rumqttc::v5::mqttbytes::QoS;

use crate::broker::{Broker, SessionCell};
use crate::session::Session;

/// Who decides a subscription to a filter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Authorization {
    /// Not a namespace the hooks own: the ACL decides.
    Acl,
    Allowed,
    Refused,
}

/// Who sent a PUBLISH, as the hooks see it.
pub struct Publisher<'a> {
    /// Routes what a publish answers with (an RPC reply, say) and holds
    /// the ACL that answer obeys.
    pub broker: &'a Broker,
    pub user: Option<&'a Arc<str>>,
    pub client_id: &'a Arc<str>,
}

/// A publish refused: PUBACK/PUBREC `reason` (MQTT 5); `notify` is the
/// code an MQTT 3.1.1 client, which has no reason codes, is told through
/// [`Hooks::refused`] (`None`: told nothing more).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PublishRefusal {
    pub reason: PubAckReason,
    pub notify: Option<&'static str>,
}

/// What the hooks make of a PUBLISH on a topic they own, before anything
/// runs.
pub enum Checked<J> {
    Refuse(PublishRefusal),
    /// Accepted: the channel runs `job` with [`Hooks::run_publish`].
    /// `once`: a resent QoS 2 PUBLISH (a packet id already received) is
    /// acknowledged without running the job again.
    Run {
        job: J,
        once: bool,
    },
}

/// How a publish the hooks ran is answered.
pub enum Outcome {
    /// Acknowledged at once: nothing to wait for.
    AckNow,
    /// Acknowledged once `Commit` resolves (durable, and for chat: fanned
    /// out).
    AckAfter(Commit),
    Refuse(PublishRefusal),
    /// The connection closes with this reason (the client resends).
    Close(DisconnectReasonCode),
}

/// The topics the broker owns, and the session events it follows. Every
/// method is called by the channel; none sends a packet itself.
pub trait Hooks: Send + Sync {
    /// What a SUBSCRIBE reads before it takes the session lock.
    type Seed: Default + Send;
    /// An accepted publish waiting to run.
    type Job<'a>: Send
    where
        Self: 'a;

    /// Is `topic` one of the hooks' own? Then a PUBLISH to it goes to
    /// [`Hooks::check_publish`], never to the router, and no will may use it.
    fn owns(&self, topic: &str) -> bool;

    /// Who may subscribe to `filter` (already checked for syntax; `shared`:
    /// it came as `$share/{group}/{filter}`).
    fn authorize_subscribe(
        &self,
        user: Option<&Arc<str>>,
        filter: &str,
        shared: bool,
    ) -> Authorization;

    /// A SUBSCRIBE of `user` with `filters` is about to be applied to
    /// `cell`'s session: what must be read first, off the session lock.
    fn before_subscribe(
        &self,
        user: &Arc<str>,
        cell: &SessionCell,
        filters: &[Filter],
    ) -> impl Future<Output = Self::Seed> + Send;

    /// `session` of `user` now holds a subscription to `filter`. With
    /// `retained` (the subscription identifiers), it is owed the retained
    /// messages now, and the hooks queue theirs. Returns whether the
    /// filter reaches the hooks' topics.
    fn subscribed(
        &self,
        user: &Arc<str>,
        filter: &str,
        retained: Option<&[u32]>,
        session: &mut Session,
        batch: &mut Batch,
    ) -> bool;

    /// After a SUBSCRIBE whose filters reach the hooks' topics, under the
    /// same session lock, with what [`Hooks::before_subscribe`] read.
    fn after_subscribe(
        &self,
        user: &Arc<str>,
        session: &mut Session,
        seed: &Self::Seed,
        batch: &mut Batch,
    );

    /// A PUBLISH to an owned topic, past the protocol checks: refused, or
    /// a job to run.
    fn check_publish<'a>(
        &'a self,
        from: &Publisher<'_>,
        topic: &'a str,
        publish: &Publish,
    ) -> Checked<Self::Job<'a>>;

    /// Runs an accepted publish.
    fn run_publish<'a>(
        &'a self,
        from: &Publisher<'_>,
        job: Self::Job<'a>,
        publish: &Publish,
    ) -> impl Future<Output = Outcome> + Send;

    /// A publish of `user`'s MQTT 3.1.1 client was refused with `code`:
    /// tell the user some other way.
    fn refused(&self, user: &Arc<str>, topic: &str, payload: &[u8], code: &'static str);

    /// A session of `user` is connected (after CONNACK).
    fn session_online(&self, user: &Arc<str>, cell: &Arc<SessionCell>);

    /// A session of `user` that this connection owned has ended.
    fn session_offline(&self, user: &Arc<str>, cell: &Arc<SessionCell>);

    /// The connection took what `cell`'s session had to send.
    fn sent(&self, cell: &Arc<SessionCell>);
}

/// A client PUBLISH as an [`Interceptor`] sees it.
#[derive(Debug, Clone, Copy)]
pub struct Publication<'a> {
    pub client_id: &'a str,
    /// The authenticated user, if any.
    pub user: Option<&'a str>,
    pub topic: &'a str,
    /// The payload, as rewritten by the interceptors before this one.
    pub payload: &'a Bytes,
    pub qos: QoS,
    pub retain: bool,
}

/// What an [`Interceptor`] decides about a publish.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    Allow,
    /// Goes on with this payload instead (the topic stays). It is not
    /// checked again against `mqtt.max_payload`; on a chat topic it must
    /// still be a valid envelope.
    Rewrite(Bytes),
    /// Refused: reaches nobody, and the client is told as for any refused
    /// publish (MQTT 5: this reason on PUBACK/PUBREC; 3.1.1: a plain ack,
    /// and on chat topics an `error` event with code `rejected`).
    Reject(Rejection),
}

/// The reason a rejected publish is refused with (MQTT 5).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rejection {
    /// 0x87 Not authorized.
    NotAuthorized,
    /// 0x83 Implementation specific error.
    ImplementationSpecificError,
}

impl Rejection {
    pub fn reason(self) -> PubAckReason {
        match self {
            Rejection::NotAuthorized => PubAckReason::NotAuthorized,
            Rejection::ImplementationSpecificError => PubAckReason::ImplementationSpecificError,
        }
    }
}

/// Inspects each client PUBLISH before it is routed or appended: allow,
/// rewrite or reject. Called on the connection's task, so it must be
/// quick and must not block.
pub trait Interceptor: Send + Sync + 'static {
    fn intercept(&self, publication: &Publication<'_>) -> Verdict;
}

impl<F> Interceptor for F
where
    F: Fn(&Publication<'_>) -> Verdict + Send + Sync + 'static,
{
    fn intercept(&self, publication: &Publication<'_>) -> Verdict {
        self(publication)
    }
}

/// The interceptors registered, called in registration order.
pub struct Interceptors {
    /// Set once one is registered: the common case (none) costs one load.
    any: AtomicBool,
    list: RwLock<Arc<[Arc<dyn Interceptor>]>>,
}

impl Default for Interceptors {
    fn default() -> Self {
        Interceptors {
            any: AtomicBool::new(false),
            list: RwLock::new(Arc::new([])),
        }
    }
}

impl Interceptors {
    pub fn register(&self, interceptor: Arc<dyn Interceptor>) {
        let mut list = self.list.write().unwrap_or_else(|e| e.into_inner());
        let mut all: Vec<_> = list.iter().cloned().collect();
        all.push(interceptor);
        *list = all.into();
        self.any.store(true, Ordering::Release);
    }

    /// Runs every interceptor on `publication`: the first rejection wins;
    /// each sees the payload as the ones before it rewrote it.
    pub fn check(&self, publication: &Publication<'_>) -> Verdict {
        if !self.any.load(Ordering::Acquire) {
            return Verdict::Allow;
        }
        // A copy of the list (an `Arc` clone), so an interceptor that
        // registers another does not wait for itself.
        let list = self.list.read().unwrap_or_else(|e| e.into_inner()).clone();
        let mut rewritten: Option<Bytes> = None;
        for i in list.iter() {
            let seen = Publication {
                payload: rewritten.as_ref().unwrap_or(publication.payload),
                ..*publication
            };
            match i.intercept(&seen) {
                Verdict::Allow => {}
                Verdict::Rewrite(payload) => rewritten = Some(payload),
                reject @ Verdict::Reject(_) => return reject,
            }
        }
        rewritten.map_or(Verdict::Allow, Verdict::Rewrite)
    }
}
