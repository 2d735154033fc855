//! The chat layer behind the channel's [`Hooks`]: who may subscribe to
//! the chat namespaces (members only, a user's own events), what a
//! publish to them does (DESIGN §4: a message is appended, a typing
//! indicator forwarded, an RPC run), and what a session's connect,
//! subscribe and disconnect mean for cursors, replay and presence. The
//! MQTT side (acks, QoS 2 state) stays in the channel.

use std::sync::Arc;

use chatmq_storage::Batch;
use rumqttc::v5::mqttbytes::v5::{DisconnectReasonCode, Filter, PubAckReason, Publish};
use rumqttc::v5::mqttbytes::QoS;

use super::edits::is_event_type;
use super::namespace::{classify, filter_scope, valid_conv, valid_user, FilterScope, Topic};
use super::{rpc, Chat, Envelope, Heads, Typing};
use crate::broker::SessionCell;
use crate::hooks::{Authorization, Checked, Hooks, Outcome, PublishRefusal, Publisher};
use crate::message::Message;
use crate::session::Session;
use crate::topic::parse_shared;

/// An accepted publish to a chat topic, waiting to run.
pub enum Job<'a> {
    Message {
        conv: &'a str,
        envelope: Envelope,
    },
    Typing {
        conv: &'a str,
    },
    RoomReaction {
        conv: &'a str,
    },
    Rpc {
        method: &'a str,
        route: rpc::ReplyRoute,
    },
}

fn refuse<J>(reason: PubAckReason, code: &'static str) -> Checked<J> {
    Checked::Refuse(PublishRefusal {
        reason,
        notify: Some(code),
    })
}

impl Hooks for Arc<Chat> {
    type Seed = Heads;
    type Job<'a> = Job<'a>;

    fn owns(&self, topic: &str) -> bool {
        classify(topic) != Topic::Plain
    }

    /// A filter reaching chat topics through wildcards is left to the ACL
    /// and filtered per message by membership.
    fn authorize_subscribe(
        &self,
        user: Option<&Arc<str>>,
        filter: &str,
        shared: bool,
    ) -> Authorization {
        let FilterScope::Reserved(ns, _) = filter_scope(filter) else {
            return Authorization::Acl;
        };
        let Some(user) = user else {
            return Authorization::Refused;
        };
        if shared {
            return Authorization::Refused;
        }
        let ok = match ns {
            Topic::Chat(rest) | Topic::Typing(rest) | Topic::Reactions(rest) => {
                rest == "+" || rest == "#" || (valid_conv(rest) && self.is_member(rest, user))
            }
            // One conversation at a time: only those are watched.
            Topic::Occupancy(rest) => valid_conv(rest) && self.is_member(rest, user),
            Topic::Presence(rest) => {
                rest == "+"
                    || rest == "#"
                    || (valid_user(rest) && self.shares_conversation(user, rest))
            }
            Topic::Events(owner) => owner == &**user,
            Topic::Rpc(_) | Topic::Plain => false,
        };
        if ok {
            Authorization::Allowed
        } else {
            Authorization::Refused
        }
    }

    /// Only a SUBSCRIBE with a filter that can reach chat topics reads
    /// conversation heads (see [`Chat::seed`]).
    async fn before_subscribe(
        &self,
        user: &Arc<str>,
        cell: &SessionCell,
        filters: &[Filter],
    ) -> Heads {
        if filters.iter().any(|f| may_reach_chat(&f.path)) {
            self.heads_for_seed(user, cell).await
        } else {
            Heads::default()
        }
    }

    fn subscribed(
        &self,
        user: &Arc<str>,
        filter: &str,
        retained: Option<&[u32]>,
        session: &mut Session,
        batch: &mut Batch,
    ) -> bool {
        let scope = filter_scope(filter);
        let reaches = scope != FilterScope::Plain;
        if let (Some(ids), true) = (retained, reaches) {
            // presence/{u} is retained: a new subscriber learns it.
            for m in self.presence_for(user, filter) {
                session.enqueue(m, QoS::AtMostOnce, true, ids.to_vec(), batch);
            }
        }
        if let FilterScope::Reserved(Topic::Occupancy(conv), _) = scope {
            // Like a retained message: the count now, then updates.
            self.watch_occupancy(conv);
            if let Some(ids) = retained {
                let m = self.occupancy_message(conv, true);
                session.enqueue(m, QoS::AtMostOnce, true, ids.to_vec(), batch);
            }
        }
        self.watch_presence(user, filter);
        reaches
    }

    /// Conversations the new subscriptions reach get a cursor, written
    /// with them.
    fn after_subscribe(
        &self,
        user: &Arc<str>,
        session: &mut Session,
        seed: &Heads,
        batch: &mut Batch,
    ) {
        self.seed(user, session, seed, batch);
    }

    fn check_publish<'a>(
        &'a self,
        from: &Publisher<'_>,
        topic: &'a str,
        p: &Publish,
    ) -> Checked<Job<'a>> {
        let Some(user) = from.user else {
            return Checked::Refuse(PublishRefusal {
                reason: PubAckReason::NotAuthorized,
                notify: None,
            });
        };
        match classify(topic) {
            Topic::Chat(conv) => {
                if !valid_conv(conv) {
                    return refuse(PubAckReason::TopicNameInvalid, "bad_conversation");
                }
                if !self.is_member(conv, user) {
                    return refuse(PubAckReason::NotAuthorized, "not_member");
                }
                match Envelope::parse(&p.payload) {
                    // Change records (`message.edit`, ...) are the server's.
                    Ok(envelope) if is_event_type(&envelope.kind) => {
                        refuse(PubAckReason::PayloadFormatInvalid, "bad_envelope")
                    }
                    Ok(envelope) => Checked::Run {
                        job: Job::Message { conv, envelope },
                        once: true,
                    },
                    Err(_) => refuse(PubAckReason::PayloadFormatInvalid, "bad_envelope"),
                }
            }
            Topic::Typing(conv) => {
                if !valid_conv(conv) || !self.is_member(conv, user) {
                    return refuse(PubAckReason::NotAuthorized, "not_member");
                }
                Checked::Run {
                    job: Job::Typing { conv },
                    once: false,
                }
            }
            Topic::Reactions(conv) => {
                if !valid_conv(conv) || !self.is_member(conv, user) {
                    return refuse(PubAckReason::NotAuthorized, "not_member");
                }
                if p.payload.len() > self.typing_max_bytes {
                    return refuse(PubAckReason::QuotaExceeded, "too_large");
                }
                Checked::Run {
                    job: Job::RoomReaction { conv },
                    once: false,
                }
            }
            Topic::Rpc(method) => {
                let response_topic = p
                    .properties
                    .as_ref()
                    .and_then(|pp| pp.response_topic.as_deref());
                match rpc::reply_route(&from.broker.acl, user, from.client_id, response_topic) {
                    rpc::ReplyRoute::Refused => {
                        // Not run: its reply could not go where it was asked to.
                        self.send_event(user, rpc::refused_response_topic(&p.payload));
                        Checked::Refuse(PublishRefusal {
                            reason: PubAckReason::NotAuthorized,
                            notify: None,
                        })
                    }
                    route => Checked::Run {
                        job: Job::Rpc { method, route },
                        once: false,
                    },
                }
            }
            Topic::Presence(_) | Topic::Events(_) | Topic::Occupancy(_) | Topic::Plain => {
                refuse(PubAckReason::NotAuthorized, "server_only")
            }
        }
    }

    async fn run_publish<'a>(&'a self, from: &Publisher<'_>, job: Job<'a>, p: &Publish) -> Outcome {
        // `check_publish` runs jobs for users only.
        let Some(user) = from.user else {
            return Outcome::Refuse(PublishRefusal {
                reason: PubAckReason::NotAuthorized,
                notify: None,
            });
        };
        match job {
            Job::Message { conv, envelope } => {
                // An attachment must be the sender's upload to `conv`.
                if let Err(e) = self.check_attachments(conv, user, &envelope.body).await {
                    tracing::debug!(code = e.code, message = %e.message, "attachment refused");
                    return Outcome::Refuse(PublishRefusal {
                        reason: PubAckReason::PayloadFormatInvalid,
                        notify: Some("bad_attachment"),
                    });
                }
                match self.append(conv, user, &envelope, p.qos).await {
                    Ok((commit, _seq)) => Outcome::AckAfter(commit),
                    Err(e) => {
                        tracing::error!(error = %e, "chat append failed");
                        Outcome::Close(DisconnectReasonCode::UnspecifiedError)
                    }
                }
            }
            Job::Typing { conv } => match self.typing(conv, user, from.client_id, &p.payload) {
                Typing::TooLarge => Outcome::Refuse(PublishRefusal {
                    reason: PubAckReason::QuotaExceeded,
                    notify: Some("too_large"),
                }),
                // A throttled indicator is acknowledged and dropped:
                // it is QoS 0 chatter, the next one will tell the same.
                Typing::Forwarded | Typing::Throttled => Outcome::AckNow,
            },
            Job::RoomReaction { conv } => {
                match self.room_reaction(conv, user, from.client_id, &p.payload) {
                    Err(code) => Outcome::Refuse(PublishRefusal {
                        reason: PubAckReason::PayloadFormatInvalid,
                        notify: Some(code),
                    }),
                    // A throttled one is acknowledged and dropped, as typing.
                    Ok(_) => Outcome::AckNow,
                }
            }
            Job::Rpc { method, route } => {
                let reply = rpc::call(self, user, method, &p.payload).await;
                match route {
                    rpc::ReplyRoute::ResponseTopic(t) => {
                        // MQTT 5 request/response: the reply goes to the
                        // Response Topic with the Correlation Data.
                        let mut msg = Message::from_publish(t, p, None);
                        msg.payload = reply.to_string().into();
                        msg.qos = QoS::AtLeastOnce;
                        msg.retain = false;
                        msg.props.response_topic = None;
                        drop(from.broker.publish(msg).await);
                    }
                    _ => self.send_event(user, reply),
                }
                Outcome::AckNow
            }
        }
    }

    /// By an error event on `users/{user}/events`.
    fn refused(&self, user: &Arc<str>, topic: &str, payload: &[u8], code: &'static str) {
        let id = serde_json::from_slice::<serde_json::Value>(payload)
            .ok()
            .and_then(|v| v.get("id").cloned())
            .unwrap_or(serde_json::Value::Null);
        self.send_event(
            user,
            serde_json::json!({"type": "error", "code": code, "topic": topic, "id": id}),
        );
    }

    /// Presence, and the replay of missed chat messages.
    fn session_online(&self, user: &Arc<str>, cell: &Arc<SessionCell>) {
        Chat::session_online(self, user, cell);
    }

    fn session_offline(&self, user: &Arc<str>, cell: &Arc<SessionCell>) {
        Chat::session_offline(self, user, cell);
    }

    /// Replays paused on a full window resume as the session drains.
    fn sent(&self, cell: &Arc<SessionCell>) {
        self.refill(cell);
    }
}

/// Could `filter` (shared or not) receive chat topics? Then a SUBSCRIBE
/// reads conversation heads first (see [`Chat::seed`]).
fn may_reach_chat(filter: &str) -> bool {
    let inner = match parse_shared(filter) {
        Some(Ok((_, inner))) => inner,
        Some(Err(())) => return false,
        None => filter,
    };
    filter_scope(inner) != FilterScope::Plain
}
