//! `GET /v1/stream`: the fallback transport for browsers where WebSocket
//! is blocked (corporate proxies). A `text/event-stream` (SSE, what
//! `EventSource` reads) carrying what a chat session subscribed to
//! `chat/+`, `typing/+`, `presence/+` and `users/{me}/events` gets;
//! client-to-server goes over the rest of the HTTP API (send, read,
//! history, ...) and `POST /v1/conversations/{conv}/typing`.
//!
//! Each stream is an in-process MQTT session of the caller
//! ([`crate::embed::session`]): the same ACL, membership checks, presence
//! (the user is online while a stream is open), typing throttles and
//! fan-out as a socket client, with no second delivery path to keep in
//! step with the chat layer. What the session does not give is a resume
//! position the *browser* confirmed, so resume is the stream's own: every
//! chat message goes out with `id: <conv>:<seq>,<conv>:<seq>,...`, the
//! last seq sent of each conversation this stream carried (at most
//! [`MAX_CURSORS`]); a reconnect presents it as `Last-Event-ID` (or as
//! `?cursor=`), and the stream first sends what each named conversation
//! has after its seq (history, paged), then live messages, skipping any
//! seq already sent (no duplicate at the seam) and filling from history a
//! live seq that skips ahead (no gap).
//!
//! Bounds: `http.stream_max_per_user` and `http.stream_max_total` open
//! streams (429 / 503, counted); a comment line every
//! `http.stream_heartbeat_secs` keeps proxies from closing an idle one;
//! at most `http.stream_buffer` events wait for a slow reader, and a
//! session queue that overflows ([`crate::embed::DELIVERY_QUEUE`]) ends
//! the stream (counted): the client resumes from its last id, losing
//! nothing.
//!
//! Auth: `EventSource` cannot send headers, so besides `Authorization:
//! Bearer` the JWT may come as `?access_token=`. A URL can end up in proxy
//! logs, which is why the token should be short-lived; chatmq never logs
//! request URIs.

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, State};
use axum::http::header::AUTHORIZATION;
use axum::http::{HeaderMap, StatusCode};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::Json;
use futures_util::stream::Stream;
use rumqttc::v5::mqttbytes::QoS;
use serde::Deserialize;
use serde_json::{json, Value};
use tokio::sync::{mpsc, watch};

use super::conversations::check_conv;
use super::openapi::Error;
use super::{bearer, Api, ApiError, Body, Caller};
use crate::chat::namespace::valid_conv;
use crate::chat::typing::Typing;
use crate::drain::Phase;
use crate::embed::{self, Client, Delivery};

/// Conversations a stream's event id (and a cursor) names at most.
pub const MAX_CURSORS: usize = 256;

/// The open streams, for the bounds and `/metrics`.
pub struct Streams {
    per_user: Mutex<HashMap<Arc<str>, usize>>,
    /// Fires at shutdown: every stream ends so the server can stop.
    stop: watch::Sender<bool>,
    pub opened: AtomicU64,
    /// Refused by `http.stream_max_per_user` / `http.stream_max_total`.
    pub refused: AtomicU64,
    /// Ended because the reader did not keep up.
    pub cut_off: AtomicU64,
}

impl Default for Streams {
    fn default() -> Streams {
        Streams {
            per_user: Mutex::new(HashMap::new()),
            stop: watch::channel(false).0,
            opened: AtomicU64::new(0),
            refused: AtomicU64::new(0),
            cut_off: AtomicU64::new(0),
        }
    }
}

impl Streams {
    /// Streams open now.
    pub fn open(&self) -> usize {
        self.lock().values().sum()
    }

    /// Ends every stream (server shutdown).
    pub fn close_all(&self) {
        let _ = self.stop.send(true);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Arc<str>, usize>> {
        self.per_user.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A place for one more stream of `user`, or why not.
    fn admit(
        self: &Arc<Self>,
        user: &Arc<str>,
        per_user: usize,
        total: usize,
    ) -> Result<Permit, ApiError> {
        let mut open = self.lock();
        let refused = if open.values().sum::<usize>() >= total {
            Some(ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "unavailable",
                "too many streams are open (http.stream_max_total)",
            ))
        } else if open.get(user).copied().unwrap_or(0) >= per_user {
            Some(ApiError::new(
                StatusCode::TOO_MANY_REQUESTS,
                "too_many_streams",
                "this user has too many streams open (http.stream_max_per_user)",
            ))
        } else {
            None
        };
        if let Some(e) = refused {
            self.refused.fetch_add(1, Ordering::Relaxed);
            return Err(e);
        }
        *open.entry(user.clone()).or_insert(0) += 1;
        self.opened.fetch_add(1, Ordering::Relaxed);
        Ok(Permit {
            streams: self.clone(),
            user: user.clone(),
        })
    }
}

/// One open stream's place; given back when the stream ends.
struct Permit {
    streams: Arc<Streams>,
    user: Arc<str>,
}

impl Drop for Permit {
    fn drop(&mut self) {
        let mut open = self.streams.lock();
        if let Some(n) = open.get_mut(&self.user) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                open.remove(&self.user);
            }
        }
    }
}

/// The query of `GET /v1/stream`.
#[derive(Deserialize)]
pub struct StreamQuery {
    /// The JWT, for clients that cannot send headers (`EventSource`).
    access_token: Option<String>,
    /// Where to resume, as an event id: `conv:seq,conv:seq`.
    /// `Last-Event-ID` wins over it.
    cursor: Option<String>,
}

/// A resume position: the last seq the client has of each conversation.
fn parse_cursor(text: &str) -> Result<Vec<(String, u64)>, ApiError> {
    let mut out: Vec<(String, u64)> = Vec::new();
    for entry in text.split(',').map(str::trim).filter(|e| !e.is_empty()) {
        let bad = || ApiError::bad("a cursor is `conv:seq` entries separated by commas");
        let (conv, seq) = entry.rsplit_once(':').ok_or_else(bad)?;
        let seq: u64 = seq.parse().map_err(|_| bad())?;
        if !valid_conv(conv) {
            return Err(bad());
        }
        match out.iter_mut().find(|(c, _)| c == conv) {
            Some((_, s)) => *s = (*s).max(seq),
            None => out.push((conv.to_string(), seq)),
        }
        if out.len() > MAX_CURSORS {
            return Err(ApiError::bad(format!(
                "a cursor names at most {MAX_CURSORS} conversations"
            )));
        }
    }
    Ok(out)
}

/// The user a stream is for: `Authorization: Bearer` or `?access_token=`.
fn stream_user(api: &Api, headers: &HeaderMap, query: &StreamQuery) -> Result<Arc<str>, ApiError> {
    let token = headers
        .get(AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(bearer)
        .or(query.access_token.as_deref().filter(|t| !t.is_empty()))
        .ok_or_else(|| {
            ApiError::unauthorized("send Authorization: Bearer <token> or ?access_token=")
        })?;
    let auth = &api.broker.auth;
    if auth.is_admin_token(token) {
        return Err(ApiError::bad(
            "a stream carries one user's deliveries: open it with a user's token",
        ));
    }
    auth.user_from_token(token).map(Arc::from).ok_or_else(|| {
        ApiError::unauthorized("the token is not valid (wrong signature, expired, or no user id)")
    })
}

/// `GET /v1/stream[?access_token=&cursor=]`: the caller's deliveries as
/// server-sent events (module docs).
#[utoipa::path(
    get,
    path = "/v1/stream",
    tag = "messages",
    params(
        ("access_token" = Option<String>, Query, description = "The user's JWT, for clients that cannot send `Authorization` (EventSource)"),
        ("cursor" = Option<String>, Query, description = "Resume after `conv:seq,conv:seq,...` (a chat event's id); `Last-Event-ID` wins over it"),
        ("Last-Event-ID" = Option<String>, Header, description = "The last chat event's id: resume after it"),
    ),
    security(("user_jwt" = [])),
    responses(
        (status = 200, description = "Server-sent events: `event: chat|typing|presence|event`, `data: {\"topic\",\"payload\"}`; chat events carry `id:`; a comment line every `http.stream_heartbeat_secs`", body = String, content_type = "text/event-stream"),
        (status = 400, description = "`bad_request`: a bad cursor, or the admin token", body = Error),
        (status = 401, description = "No token, or not a valid one (`WWW-Authenticate: Bearer`)", body = Error),
        (status = 429, description = "`too_many_streams`: `http.stream_max_per_user` streams are open", body = Error),
        (status = 503, description = "`unavailable`: `http.stream_max_total` streams are open; `draining`: the node is moving its clients away (`POST /v1/admin/drain`)", body = Error),
    ),
)]
pub async fn open(
    State(api): State<Arc<Api>>,
    headers: HeaderMap,
    query: Result<Query<StreamQuery>, QueryRejection>,
) -> Result<Response, ApiError> {
    let Query(query) = query.map_err(|e| ApiError::bad(e.body_text()))?;
    let user = stream_user(&api, &headers, &query)?;
    if api.broker.drain.phase() != Phase::Serving {
        // Like a closed MQTT listener: the browser tries again, through
        // the load balancer, on a node that is not going away.
        return Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "draining",
            "this node is moving its clients away",
        ));
    }
    let last_event_id = headers
        .get("last-event-id")
        .and_then(|v| v.to_str().ok())
        .filter(|v| !v.trim().is_empty());
    let cursor = match last_event_id.or(query.cursor.as_deref()) {
        Some(text) => parse_cursor(text)?,
        None => Vec::new(),
    };
    let http = &api.broker.settings.http;
    let permit = api
        .streams
        .admit(&user, http.stream_max_per_user, http.stream_max_total)?;
    let unavailable =
        |_| ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "unavailable", "no session");
    let client = embed::session(&api.broker, &user, api.streams.stop.subscribe())
        .await
        .map_err(unavailable)?;
    for (filter, qos) in [
        ("chat/+".to_string(), QoS::AtLeastOnce),
        ("typing/+".to_string(), QoS::AtMostOnce),
        ("presence/+".to_string(), QoS::AtMostOnce),
        (format!("users/{user}/events"), QoS::AtLeastOnce),
    ] {
        client.subscribe(filter, qos).await.map_err(unavailable)?;
    }
    let (tx, rx) = mpsc::channel(http.stream_buffer.max(1));
    let pump = Pump {
        api: api.clone(),
        user,
        client,
        tx,
        last: cursor.iter().cloned().collect(),
        order: cursor.iter().map(|(c, _)| c.clone()).collect(),
        stop: api.streams.stop.subscribe(),
        phase: api.broker.drain.subscribe(),
        _permit: permit,
    };
    tokio::spawn(pump.run(cursor));
    let heartbeat = Duration::from_secs(http.stream_heartbeat_secs.max(1));
    let mut response = Sse::new(Events(rx))
        .keep_alive(KeepAlive::new().interval(heartbeat).text("heartbeat"))
        .into_response();
    // Proxies that buffer (nginx) pass the events on at once.
    response.headers_mut().insert(
        "x-accel-buffering",
        "no".parse().map_err(|_| ApiError::bad("header"))?,
    );
    Ok(response)
}

/// Resolves at `at`; never without one.
async fn until(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// The events of one stream, as the response body reads them.
struct Events(mpsc::Receiver<Event>);

impl Stream for Events {
    type Item = Result<Event, Infallible>;

    fn poll_next(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Self::Item>> {
        self.0.poll_recv(cx).map(|e| e.map(Ok))
    }
}

/// Why a stream's pump stopped.
enum End {
    /// The reader went away, the broker is stopping, or the session ended.
    Closed,
    /// The reader fell behind.
    Slow,
}

/// Moves one stream's deliveries from its session to its response body.
struct Pump {
    api: Arc<Api>,
    user: Arc<str>,
    client: Client,
    tx: mpsc::Sender<Event>,
    /// The last seq sent of each conversation.
    last: HashMap<String, u64>,
    /// The conversations of `last`, the order their entries appear in ids.
    order: Vec<String>,
    stop: watch::Receiver<bool>,
    /// A drain ends the stream at its moment to leave (`crate::drain`):
    /// the browser's `EventSource` reconnects, to another node.
    phase: watch::Receiver<Phase>,
    _permit: Permit,
}

impl Pump {
    async fn run(mut self, cursor: Vec<(String, u64)>) {
        if let End::Slow = self.serve(cursor).await {
            self.api.streams.cut_off.fetch_add(1, Ordering::Relaxed);
            tracing::debug!(user = %self.user, "a slow stream reader was cut off");
        }
    }

    async fn serve(&mut self, cursor: Vec<(String, u64)>) -> End {
        let chat = self.api.broker.chat.clone();
        for (conv, _) in cursor {
            if !chat.is_member(&conv, &self.user) {
                // Not the caller's: nothing of it, not even that it exists.
                self.last.remove(&conv);
                self.order.retain(|c| *c != conv);
                continue;
            }
            if let Err(end) = self.catch_up(&conv, None).await {
                return end;
            }
        }
        let mut leave_at = None;
        loop {
            // Marked seen every round, so `changed` waits for the next one.
            let draining = *self.phase.borrow_and_update() == Phase::Draining;
            if draining && leave_at.is_none() {
                leave_at = Some(self.api.broker.drain.leave_at());
            }
            let delivery = tokio::select! {
                d = self.client.recv() => d,
                _ = self.stop.changed() => return End::Closed,
                _ = self.tx.closed() => return End::Closed,
                _ = self.phase.changed() => continue,
                _ = until(leave_at) => return End::Closed,
            };
            let Some(delivery) = delivery else {
                return End::Closed;
            };
            if self.client.dropped() > 0 {
                return End::Slow;
            }
            if let Err(end) = self.deliver(delivery).await {
                return end;
            }
        }
    }

    /// Sends what `conv` has after the last seq sent, up to (not
    /// including) `until`, from history.
    async fn catch_up(&mut self, conv: &str, until: Option<u64>) -> Result<(), End> {
        let chat = self.api.broker.chat.clone();
        let cap = chat.history_cap;
        loop {
            let after = self.last.get(conv).copied().unwrap_or(0);
            if until.is_some_and(|u| after.saturating_add(1) >= u) {
                return Ok(());
            }
            let page = chat
                .history(conv, Some(after), until, cap, Some(&self.user))
                .await
                .map_err(|_| End::Closed)?;
            let messages = page["messages"].as_array().cloned().unwrap_or_default();
            if messages.is_empty() {
                return Ok(());
            }
            for m in messages {
                let Some(seq) = m["seq"].as_u64() else {
                    continue;
                };
                if seq <= after || until.is_some_and(|u| seq >= u) {
                    continue;
                }
                self.send_chat(conv, seq, m, Pace::Reader).await?;
            }
            if self.last.get(conv).copied().unwrap_or(0) <= after {
                return Ok(());
            }
        }
    }

    async fn deliver(&mut self, d: Delivery) -> Result<(), End> {
        let payload: Value = serde_json::from_slice(&d.payload)
            .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&d.payload).into_owned()));
        let kind = match d.topic.split('/').next() {
            Some("chat") => {
                let conv = d
                    .topic
                    .strip_prefix("chat/")
                    .unwrap_or_default()
                    .to_string();
                let Some(seq) = payload["seq"].as_u64() else {
                    return Ok(());
                };
                match self.last.get(&conv).copied() {
                    Some(last) if seq <= last => return Ok(()), // sent already
                    Some(last) if seq > last.saturating_add(1) => {
                        self.catch_up(&conv, Some(seq)).await?;
                    }
                    _ => {}
                }
                return self.send_chat(&conv, seq, payload, Pace::Live).await;
            }
            Some("typing") => "typing",
            Some("presence") => "presence",
            _ => "event",
        };
        let data = json!({"topic": d.topic, "payload": payload}).to_string();
        self.send(Event::default().event(kind).data(data), Pace::Live)
            .await
    }

    async fn send_chat(
        &mut self,
        conv: &str,
        seq: u64,
        message: Value,
        pace: Pace,
    ) -> Result<(), End> {
        if !self.last.contains_key(conv) && self.order.len() < MAX_CURSORS {
            self.order.push(conv.to_string());
        }
        if self.order.iter().any(|c| c == conv) {
            self.last.insert(conv.to_string(), seq);
        }
        let id = self
            .order
            .iter()
            .filter_map(|c| Some(format!("{c}:{}", self.last.get(c)?)))
            .collect::<Vec<_>>()
            .join(",");
        let data = json!({"topic": format!("chat/{conv}"), "payload": message}).to_string();
        self.send(Event::default().event("chat").id(id).data(data), pace)
            .await
    }

    /// Queues one event for the reader. Live, a full queue means it fell
    /// behind; history waits for room (it is read at the reader's pace,
    /// while live deliveries wait in the session's bounded queue).
    async fn send(&mut self, event: Event, pace: Pace) -> Result<(), End> {
        match pace {
            Pace::Live => match self.tx.try_send(event) {
                Ok(()) => Ok(()),
                Err(mpsc::error::TrySendError::Full(_)) => Err(End::Slow),
                Err(mpsc::error::TrySendError::Closed(_)) => Err(End::Closed),
            },
            Pace::Reader => tokio::select! {
                sent = self.tx.send(event) => sent.map_err(|_| End::Closed),
                _ = self.stop.changed() => Err(End::Closed),
            },
        }
    }
}

/// How an event waits for the reader.
#[derive(Debug, Clone, Copy)]
enum Pace {
    /// A live delivery: no waiting; a full queue cuts the reader off.
    Live,
    /// From history: as fast as the reader takes it.
    Reader,
}

/// The body of `POST /v1/conversations/{conv}/typing`.
#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct TypingBody {
    typing: bool,
}

/// The answer of `POST /v1/conversations/{conv}/typing` (described only:
/// the handler builds it with `json!`).
#[derive(utoipa::ToSchema)]
#[allow(dead_code)]
pub struct Forwarded {
    /// False when throttled (`chat.typing_interval_ms`).
    forwarded: bool,
}

/// `POST /v1/conversations/{conv}/typing` `{"typing": bool}`: a typing
/// indicator, as a publish on `typing/{conv}` (same size cap and throttle;
/// a member's token). `{"forwarded": bool}`.
#[utoipa::path(
    post,
    path = "/v1/conversations/{conv}/typing",
    tag = "messages",
    params(("conv" = String, Path, description = "The conversation id")),
    request_body = TypingBody,
    security(("user_jwt" = [])),
    responses(
        (status = 200, description = "`{\"forwarded\": bool}`: false when throttled (`chat.typing_interval_ms`)", body = Forwarded),
        (status = 400, description = "`bad_request`: a bad id or body, or the admin token", body = Error),
        (status = 401, description = "No token, or not a valid one (`WWW-Authenticate: Bearer`)", body = Error),
        (status = 403, description = "`not_member`: the caller is not a member", body = Error),
    ),
)]
pub async fn typing(
    caller: Caller,
    State(api): State<Arc<Api>>,
    Path(conv): Path<String>,
    Body(body): Body,
) -> Result<Json<Value>, ApiError> {
    let Caller::User(user) = &caller else {
        return Err(ApiError::bad(
            "typing is a user's: call with a user's token",
        ));
    };
    check_conv(&conv)?;
    let TypingBody { typing } = serde_json::from_slice(&body)
        .map_err(|e| ApiError::bad(format!("the body is not {{\"typing\": bool}}: {e}")))?;
    // Forwarded as an MQTT client's `typing/{conv}` payload would be.
    let payload = json!({ "typing": typing }).to_string();
    let chat = &api.broker.chat;
    if !chat.is_member(&conv, user) {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "not_member",
            "you are not a member of this conversation",
        ));
    }
    match chat.typing(&conv, user, "http", payload.as_bytes()) {
        Typing::Forwarded => Ok(Json(json!({"forwarded": true}))),
        Typing::Throttled => Ok(Json(json!({"forwarded": false}))),
        Typing::TooLarge => Err(ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "too_large",
            "larger than chat.typing_max_bytes",
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cursors_are_parsed() {
        let c = parse_cursor("dm:alice:bob:5, room:7,room:3").unwrap();
        assert_eq!(c, vec![("dm:alice:bob".into(), 5), ("room".into(), 7)]);
        assert!(parse_cursor("room").is_err());
        assert!(parse_cursor("room:x").is_err());
        assert!(parse_cursor("bad/conv:1").is_err());
        let many: Vec<String> = (0..=MAX_CURSORS).map(|i| format!("c{i}:1")).collect();
        assert!(parse_cursor(&many.join(",")).is_err());
    }
}
