//! `/v1/conversations`: a user's list, creating a group conversation, and
//! adding or removing members. The owner (or the admin token) changes
//! members; a member may remove itself. The rules are
//! [`Chat::create`](crate::chat::Chat::create),
//! [`add_member`](crate::chat::Chat::add_member) and
//! [`remove_member`](crate::chat::Chat::remove_member), as over RPC.

use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Value};

use super::{Api, ApiError, Caller, JsonBody};
use crate::chat::namespace::{valid_conv, valid_user};
use crate::chat::RpcError;

/// `GET /v1/conversations`: the caller's conversations with head seq,
/// read seq and unread count (the RPC `conversations`).
pub async fn list(caller: Caller, State(api): State<Arc<Api>>) -> Result<Json<Value>, ApiError> {
    let user = caller.user().ok_or_else(|| {
        ApiError::bad("the admin token has no conversations of its own: call with a user's token")
    })?;
    Ok(Json(api.broker.chat.list(user).await?))
}

/// The body of `POST /v1/conversations`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NewConversation {
    /// Generated when absent.
    conv: Option<String>,
    #[serde(default)]
    title: String,
    #[serde(default)]
    members: Vec<String>,
    /// Only the admin token may name an owner other than the caller.
    owner: Option<String>,
}

/// `POST /v1/conversations`: with a user's token the user becomes the
/// owner; with the admin token `owner` is optional (without one, only the
/// admin token changes its members). 201 `{"conv": ...}`.
pub async fn create(
    caller: Caller,
    State(api): State<Arc<Api>>,
    JsonBody(req): JsonBody<NewConversation>,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    let owner = match (&caller, req.owner) {
        (Caller::User(u), None) => Some(u.to_string()),
        (Caller::User(u), Some(o)) if *o == **u => Some(o),
        (Caller::User(_), Some(_)) => {
            return Err(ApiError::forbidden(
                "only the admin token may make someone else the owner",
            ))
        }
        (Caller::Admin, owner) => owner,
    };
    if owner.as_deref().is_some_and(|o| !valid_user(o)) {
        return Err(ApiError::bad("`owner` is not a valid user id"));
    }
    if owner.is_none() && req.members.is_empty() {
        return Err(ApiError::bad(
            "a conversation needs an owner or at least one member",
        ));
    }
    let chat = &api.broker.chat;
    let conv = req.conv.unwrap_or_else(|| chat.fresh_conv_id());
    chat.create(&conv, &req.title, owner.as_deref(), &req.members)
        .await?;
    Ok((StatusCode::CREATED, Json(json!({"conv": conv}))))
}

/// The body of `POST /v1/conversations/{conv}/members`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NewMember {
    user: String,
}

/// `POST /v1/conversations/{conv}/members` `{"user": ...}`.
pub async fn add_member(
    caller: Caller,
    State(api): State<Arc<Api>>,
    Path(conv): Path<String>,
    JsonBody(req): JsonBody<NewMember>,
) -> Result<Json<Value>, ApiError> {
    check_conv(&conv)?;
    api.broker
        .chat
        .add_member(&conv, &req.user, caller.user())
        .await?;
    Ok(Json(json!({"conv": conv, "user": req.user})))
}

/// `DELETE /v1/conversations/{conv}/members/{user}`.
pub async fn remove_member(
    caller: Caller,
    State(api): State<Arc<Api>>,
    Path((conv, user)): Path<(String, String)>,
) -> Result<Json<Value>, ApiError> {
    check_conv(&conv)?;
    api.broker
        .chat
        .remove_member(&conv, &user, caller.user())
        .await?;
    Ok(Json(json!({"conv": conv, "user": user})))
}

/// A conversation id from the path.
pub(super) fn check_conv(conv: &str) -> Result<(), ApiError> {
    if valid_conv(conv) {
        Ok(())
    } else {
        Err(ApiError::bad("not a valid conversation id"))
    }
}

/// The body of `PUT /v1/conversations/{id}/mute`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Mute {
    muted: bool,
}

/// `PUT /v1/conversations/{id}/mute` `{"muted": bool}`: the caller's push
/// setting for one conversation (the RPC `conversation.mute`); members only.
pub async fn mute(
    caller: Caller,
    State(api): State<Arc<Api>>,
    Path(conv): Path<String>,
    JsonBody(req): JsonBody<Mute>,
) -> Result<Json<Value>, ApiError> {
    let user = caller.user().ok_or_else(|| {
        ApiError::bad("the admin token has no push settings of its own: call with a user's token")
    })?;
    let chat = &api.broker.chat;
    if !valid_conv(&conv) || !chat.is_member(&conv, user) {
        return Err(
            RpcError::new("not_member", "you are not a member of this conversation").into(),
        );
    }
    chat.push
        .set_muted(user, &conv, req.muted)
        .await
        .map_err(RpcError::from)?;
    Ok(Json(json!({"conv": conv, "muted": req.muted})))
}
