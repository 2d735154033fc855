//! `/v1/conversations/{conv}/messages`: history pages, and server-side
//! send. A send goes through [`Chat::append`](crate::chat::Chat::append),
//! the pipeline an MQTT publish takes (idempotency by `(conv, sender, id)`,
//! the next seq, fan-out to members in seq order), and is answered once
//! the message is durable. Edits, deletes and reactions of one message
//! (`.../messages/{seq}`) are the RPCs `message.edit`, `message.delete`,
//! `reaction.add` and `reaction.remove` (`chat/edits.rs`, `chat/reactions.rs`).

use std::sync::Arc;

use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::Json;
use rumqttc::v5::mqttbytes::QoS;
use serde::Deserialize;
use serde_json::{json, Value};

use super::conversations::check_conv;
use super::openapi::{Changed, EditMessage, Error, HistoryPage, NewMessage, Reactions, Sent};
use super::{Api, ApiError, Body, Caller};
use crate::chat::edits::{is_event_type, Editor};
use crate::chat::namespace::valid_user;
use crate::chat::{BadEnvelope, Envelope};

/// Who sends when the admin token sends without `from`; it may write to
/// any existing conversation.
pub const SYSTEM_USER: &str = "system";

/// Messages a history call returns when it names no limit (as the RPC).
const DEFAULT_LIMIT: u64 = 50;

/// The query of a history call.
#[derive(Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct Page {
    /// Ascending from the message after this seq.
    after: Option<u64>,
    /// The latest messages before this seq.
    before: Option<u64>,
    /// At most this many (capped by `chat.history_limit`).
    limit: Option<u64>,
}

/// `GET /v1/conversations/{conv}/messages?after=&before=&limit=`: for
/// members and the admin token. `{"messages":[...],"head":N,"first":N,"epoch":"..."}`.
#[utoipa::path(
    get,
    path = "/v1/conversations/{conv}/messages",
    tag = "messages",
    params(("conv" = String, Path, description = "The conversation id"), Page),
    security(("user_jwt" = []), ("admin_token" = [])),
    responses(
        (status = 200, description = "One page of messages in seq order", body = HistoryPage),
        (status = 400, description = "`bad_request`: a bad id or query", body = Error),
        (status = 401, description = "No token, or not a valid one (`WWW-Authenticate: Bearer`)", body = Error),
        (status = 403, description = "`not_member`: the caller is not a member", body = Error),
        (status = 404, description = "`not_found`: no such conversation", body = Error),
    ),
)]
pub async fn history(
    caller: Caller,
    State(api): State<Arc<Api>>,
    Path(conv): Path<String>,
    page: Result<Query<Page>, QueryRejection>,
) -> Result<Json<Value>, ApiError> {
    let Query(page) = page.map_err(|e| ApiError::bad(e.body_text()))?;
    let chat = &api.broker.chat;
    check_conv(&conv)?;
    if !chat.exists(&conv) {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "not_found",
            "no such conversation",
        ));
    }
    if let Caller::User(u) = &caller {
        if !chat.is_member(&conv, u) {
            return Err(not_member("you are not a member of this conversation"));
        }
    }
    let limit = usize::try_from(page.limit.unwrap_or(DEFAULT_LIMIT)).unwrap_or(usize::MAX);
    Ok(Json(
        chat.history(&conv, page.after, page.before, limit, caller.user())
            .await?,
    ))
}

/// `POST /v1/conversations/{conv}/messages` `{"id","body","type"?,"from"?}`:
/// a user's token sends as that user (a member); the admin token sends as
/// `from` (a member) or, without it, as [`SYSTEM_USER`]. Answers
/// `{"conv","seq"}` once the message is on disk; a retry of the same `id`
/// gets the same seq.
#[utoipa::path(
    post,
    path = "/v1/conversations/{conv}/messages",
    tag = "messages",
    params(("conv" = String, Path, description = "The conversation id")),
    request_body = NewMessage,
    security(("user_jwt" = []), ("admin_token" = [])),
    responses(
        (status = 200, description = "Durable, with its seq", body = Sent),
        (status = 400, description = "`bad_envelope` or `bad_request`", body = Error),
        (status = 401, description = "No token, or not a valid one (`WWW-Authenticate: Bearer`)", body = Error),
        (status = 403, description = "`not_member`, or `forbidden`: a user's token sending as another", body = Error),
        (status = 404, description = "`not_found`: no such conversation", body = Error),
        (status = 413, description = "`too_large`: over `mqtt.max_payload`", body = Error),
        (status = 503, description = "`unavailable`: the message could not be stored", body = Error),
    ),
)]
pub async fn send(
    caller: Caller,
    State(api): State<Arc<Api>>,
    Path(conv): Path<String>,
    Body(body): Body,
) -> Result<Json<Value>, ApiError> {
    let broker = &api.broker;
    if body.len() > broker.settings.mqtt.max_payload {
        return Err(ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "too_large",
            "the message is larger than mqtt.max_payload",
        ));
    }
    let mut request: Value = serde_json::from_slice(&body).map_err(|e| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "bad_envelope",
            format!("not JSON: {e}"),
        )
    })?;
    let from = match request.as_object_mut().and_then(|m| m.remove("from")) {
        None | Some(Value::Null) => None,
        Some(Value::String(f)) => Some(f),
        Some(_) => return Err(ApiError::bad("`from` must be a user id")),
    };
    let envelope = Envelope::from_value(request)
        .map_err(|BadEnvelope(why)| ApiError::new(StatusCode::BAD_REQUEST, "bad_envelope", why))?;
    if is_event_type(&envelope.kind) {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "bad_envelope",
            "types starting with `message.` are the server's change records",
        ));
    }
    check_conv(&conv)?;
    let chat = &broker.chat;
    if !chat.exists(&conv) {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "not_found",
            "no such conversation",
        ));
    }
    let sender: Arc<str> = match (&caller, from) {
        (Caller::User(u), None) => u.clone(),
        (Caller::User(u), Some(f)) if *f == **u => u.clone(),
        (Caller::User(_), Some(_)) => {
            return Err(ApiError::forbidden(
                "only the admin token may send as another user",
            ))
        }
        (Caller::Admin, Some(f)) if valid_user(&f) => f.into(),
        (Caller::Admin, Some(_)) => return Err(ApiError::bad("`from` is not a valid user id")),
        (Caller::Admin, None) => SYSTEM_USER.into(),
    };
    let as_system = caller == Caller::Admin && &*sender == SYSTEM_USER;
    if !as_system && !chat.is_member(&conv, &sender) {
        return Err(not_member(
            "the sender is not a member of this conversation",
        ));
    }
    // An attachment must be the sender's upload to this conversation.
    chat.check_attachments(&conv, &sender, &envelope.body)
        .await
        .map_err(|e| match e.code {
            "bad_request" => ApiError::new(StatusCode::BAD_REQUEST, "bad_attachment", e.message),
            "not_found" => ApiError::new(StatusCode::BAD_REQUEST, "bad_attachment", e.message),
            "unavailable" => {
                ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "unavailable", e.message)
            }
            _ => ApiError::from(e),
        })?;
    let unavailable = |e: chatmq_storage::StorageError| {
        tracing::error!(error = %e, conv = %conv, "server-side send failed");
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "unavailable",
            "the message could not be stored",
        )
    };
    let (commit, seq) = chat
        .append(&conv, &sender, &envelope, QoS::AtLeastOnce)
        .await
        .map_err(unavailable)?;
    commit.await.map_err(unavailable)?;
    Ok(Json(json!({"conv": conv, "seq": seq})))
}

fn not_member(message: &str) -> ApiError {
    ApiError::new(StatusCode::FORBIDDEN, "not_member", message)
}

/// A message of `conv` the caller may see: the conversation exists and a
/// user's token is a member's.
fn visible(chat: &crate::chat::Chat, caller: &Caller, conv: &str) -> Result<(), ApiError> {
    check_conv(conv)?;
    if !chat.exists(conv) {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "not_found",
            "no such conversation",
        ));
    }
    if let Caller::User(u) = caller {
        if !chat.is_member(conv, u) {
            return Err(not_member("you are not a member of this conversation"));
        }
    }
    Ok(())
}

fn editor(caller: &Caller) -> Editor<'_> {
    match caller {
        Caller::User(u) => Editor::User(u),
        Caller::Admin => Editor::Admin,
    }
}

/// `PATCH /v1/conversations/{conv}/messages/{seq}` `{"body": ...}`: the
/// sender or the owner (or the admin token) edits the message (the RPC
/// `message.edit`). `{"conv","seq","event_seq"}` once the change is durable
/// and out; the body is bounded as a send is (`mqtt.max_payload`).
#[utoipa::path(
    patch,
    path = "/v1/conversations/{conv}/messages/{seq}",
    tag = "messages",
    params(("conv" = String, Path, description = "The conversation id"), ("seq" = u64, Path, description = "The message's seq")),
    request_body = EditMessage,
    security(("user_jwt" = []), ("admin_token" = [])),
    responses(
        (status = 200, description = "Edited (or already so)", body = Changed),
        (status = 400, description = "`bad_request`: no `body`, not JSON", body = Error),
        (status = 401, description = "No token, or not a valid one (`WWW-Authenticate: Bearer`)", body = Error),
        (status = 403, description = "`not_member`, or `forbidden`: neither sender nor owner", body = Error),
        (status = 404, description = "`not_found`: no such conversation or message", body = Error),
        (status = 409, description = "`not_editable`, `deleted` or `too_many_edits`", body = Error),
        (status = 413, description = "`too_large`: over `mqtt.max_payload`", body = Error),
    ),
)]
pub async fn edit(
    caller: Caller,
    State(api): State<Arc<Api>>,
    Path((conv, seq)): Path<(String, u64)>,
    Body(body): Body,
) -> Result<Json<Value>, ApiError> {
    if body.len() > api.broker.settings.mqtt.max_payload {
        return Err(ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "too_large",
            "the edit is larger than mqtt.max_payload",
        ));
    }
    let request: Value =
        serde_json::from_slice(&body).map_err(|e| ApiError::bad(format!("not JSON: {e}")))?;
    let Some(new_body) = request.get("body") else {
        return Err(ApiError::bad("`body` is required"));
    };
    let chat = &api.broker.chat;
    visible(chat, &caller, &conv)?;
    let changed = chat
        .edit_message(&conv, seq, editor(&caller), new_body)
        .await?;
    Ok(Json(changed.json(&conv)))
}

/// `DELETE /v1/conversations/{conv}/messages/{seq}`: the sender or the
/// owner (or the admin token) deletes the message (the RPC
/// `message.delete`); answered once its text is gone from the files. A
/// retry answers the same.
#[utoipa::path(
    delete,
    path = "/v1/conversations/{conv}/messages/{seq}",
    tag = "messages",
    params(("conv" = String, Path, description = "The conversation id"), ("seq" = u64, Path, description = "The message's seq")),
    security(("user_jwt" = []), ("admin_token" = [])),
    responses(
        (status = 200, description = "Deleted (or already so)", body = Changed),
        (status = 401, description = "No token, or not a valid one (`WWW-Authenticate: Bearer`)", body = Error),
        (status = 403, description = "`not_member`, or `forbidden`: neither sender nor owner", body = Error),
        (status = 404, description = "`not_found`: no such conversation or message", body = Error),
        (status = 409, description = "`not_editable`: a change record", body = Error),
    ),
)]
pub async fn delete(
    caller: Caller,
    State(api): State<Arc<Api>>,
    Path((conv, seq)): Path<(String, u64)>,
) -> Result<Json<Value>, ApiError> {
    let chat = &api.broker.chat;
    visible(chat, &caller, &conv)?;
    let changed = chat.delete_message(&conv, seq, editor(&caller)).await?;
    Ok(Json(changed.json(&conv)))
}

/// `PUT /v1/conversations/{conv}/messages/{seq}/reactions/{emoji}`: the
/// caller (a member) reacts (the RPC `reaction.add`);
/// `{"conv","seq","reactions":{"👍":{"count","mine"}}}`.
#[utoipa::path(
    put,
    path = "/v1/conversations/{conv}/messages/{seq}/reactions/{emoji}",
    tag = "messages",
    params(("conv" = String, Path, description = "The conversation id"), ("seq" = u64, Path, description = "The message's seq"), ("emoji" = String, Path, description = "1 to 32 bytes, percent-encoded, no whitespace or control characters")),
    security(("user_jwt" = [])),
    responses(
        (status = 200, description = "The message's reactions now", body = Reactions),
        (status = 400, description = "`bad_request`: a bad emoji, or the admin token", body = Error),
        (status = 401, description = "No token, or not a valid one (`WWW-Authenticate: Bearer`)", body = Error),
        (status = 403, description = "`not_member`: the caller is not a member", body = Error),
        (status = 404, description = "`not_found`: no such conversation or message", body = Error),
        (status = 409, description = "`too_many_reactions`", body = Error),
    ),
)]
pub async fn react(
    caller: Caller,
    State(api): State<Arc<Api>>,
    Path((conv, seq, emoji)): Path<(String, u64, String)>,
) -> Result<Json<Value>, ApiError> {
    reaction(caller, api, conv, seq, emoji, true).await
}

/// `DELETE /v1/conversations/{conv}/messages/{seq}/reactions/{emoji}`: the
/// caller takes its reaction back (the RPC `reaction.remove`).
#[utoipa::path(
    delete,
    path = "/v1/conversations/{conv}/messages/{seq}/reactions/{emoji}",
    tag = "messages",
    params(("conv" = String, Path, description = "The conversation id"), ("seq" = u64, Path, description = "The message's seq"), ("emoji" = String, Path, description = "1 to 32 bytes, percent-encoded, no whitespace or control characters")),
    security(("user_jwt" = [])),
    responses(
        (status = 200, description = "The message's reactions now", body = Reactions),
        (status = 400, description = "`bad_request`: a bad emoji, or the admin token", body = Error),
        (status = 401, description = "No token, or not a valid one (`WWW-Authenticate: Bearer`)", body = Error),
        (status = 403, description = "`not_member`: the caller is not a member", body = Error),
        (status = 404, description = "`not_found`: no such conversation or message", body = Error),
    ),
)]
pub async fn unreact(
    caller: Caller,
    State(api): State<Arc<Api>>,
    Path((conv, seq, emoji)): Path<(String, u64, String)>,
) -> Result<Json<Value>, ApiError> {
    reaction(caller, api, conv, seq, emoji, false).await
}

async fn reaction(
    caller: Caller,
    api: Arc<Api>,
    conv: String,
    seq: u64,
    emoji: String,
    add: bool,
) -> Result<Json<Value>, ApiError> {
    let Caller::User(user) = &caller else {
        return Err(ApiError::bad(
            "the admin token has no reactions of its own: call with a user's token",
        ));
    };
    let chat = &api.broker.chat;
    visible(chat, &caller, &conv)?;
    let reactions = chat.react(&conv, seq, user, &emoji, add).await?;
    Ok(Json(
        json!({"conv": conv, "seq": seq, "reactions": reactions}),
    ))
}
