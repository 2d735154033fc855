//! `/v1/conversations`: a user's list, creating a group conversation,
//! adding (one or many) or removing members, a user's mute and read
//! position. The owner (or the admin token) changes
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

use super::openapi::{
    ConversationList, Created, Error, MemberRemoved, MembersAdded, Muted, Occupancy, ReadPosition,
};
use super::{Api, ApiError, Caller, JsonBody};
use crate::chat::namespace::{valid_conv, valid_user};
use crate::chat::{Chat, RpcError};

/// `GET /v1/conversations`: the caller's conversations with head seq,
/// read seq and unread count (the RPC `conversations`).
#[utoipa::path(
    get,
    path = "/v1/conversations",
    tag = "conversations",
    security(("user_jwt" = [])),
    responses(
        (status = 200, description = "The caller's conversations", body = ConversationList),
        (status = 400, description = "`bad_request`: the admin token has no conversations", body = Error),
        (status = 401, description = "No token, or not a valid one (`WWW-Authenticate: Bearer`)", body = Error),
    ),
)]
pub async fn list(caller: Caller, State(api): State<Arc<Api>>) -> Result<Json<Value>, ApiError> {
    let user = caller.user().ok_or_else(|| {
        ApiError::bad("the admin token has no conversations of its own: call with a user's token")
    })?;
    Ok(Json(api.broker.chat.list(user).await?))
}

/// The body of `POST /v1/conversations`.
#[derive(Deserialize, utoipa::ToSchema)]
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
#[utoipa::path(
    post,
    path = "/v1/conversations",
    tag = "conversations",
    request_body = NewConversation,
    security(("user_jwt" = []), ("admin_token" = [])),
    responses(
        (status = 201, description = "Created", body = Created),
        (status = 400, description = "`bad_request`: a bad id, owner or member, or neither owner nor members", body = Error),
        (status = 401, description = "No token, or not a valid one (`WWW-Authenticate: Bearer`)", body = Error),
        (status = 403, description = "`forbidden`: a user's token naming another owner", body = Error),
        (status = 409, description = "`exists`: the id is taken", body = Error),
    ),
)]
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

/// The body of `POST /v1/conversations/{conv}/members`: one `user`, or
/// many `users` added with one write.
#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewMembers {
    user: Option<String>,
    users: Option<Vec<String>>,
}

/// `POST /v1/conversations/{conv}/members` `{"user": ...}` -> `{"conv",
/// "user"}`, or `{"users": [...]}` -> `{"conv", "added"}` (`added`: those
/// who were not members yet).
#[utoipa::path(
    post,
    path = "/v1/conversations/{conv}/members",
    tag = "conversations",
    params(("conv" = String, Path, description = "The conversation id")),
    request_body = NewMembers,
    security(("user_jwt" = []), ("admin_token" = [])),
    responses(
        (status = 200, description = "Added", body = MembersAdded),
        (status = 400, description = "`bad_request`: neither or both of `user` and `users`, or a bad id", body = Error),
        (status = 401, description = "No token, or not a valid one (`WWW-Authenticate: Bearer`)", body = Error),
        (status = 403, description = "`forbidden`: only the owner or the admin token adds members", body = Error),
        (status = 404, description = "`not_found`: no such conversation", body = Error),
    ),
)]
pub async fn add_member(
    caller: Caller,
    State(api): State<Arc<Api>>,
    Path(conv): Path<String>,
    JsonBody(req): JsonBody<NewMembers>,
) -> Result<Json<Value>, ApiError> {
    check_conv(&conv)?;
    let (users, one) = match (req.user, req.users) {
        (Some(user), None) => (vec![user.clone()], Some(user)),
        (None, Some(users)) => (users, None),
        _ => return Err(ApiError::bad("give either `user` or `users`")),
    };
    let added = api
        .broker
        .chat
        .add_members(&conv, &users, caller.user())
        .await?;
    let added: Vec<&str> = added.iter().map(|u| &**u).collect();
    Ok(Json(match one {
        Some(user) => json!({"conv": conv, "user": user}),
        None => json!({"conv": conv, "added": added}),
    }))
}

/// `DELETE /v1/conversations/{conv}/members/{user}`: the owner, the admin
/// token, or the member itself.
#[utoipa::path(
    delete,
    path = "/v1/conversations/{conv}/members/{user}",
    tag = "conversations",
    params(("conv" = String, Path, description = "The conversation id"), ("user" = String, Path, description = "The member to remove")),
    security(("user_jwt" = []), ("admin_token" = [])),
    responses(
        (status = 200, description = "Removed", body = MemberRemoved),
        (status = 400, description = "`bad_request`: a bad id", body = Error),
        (status = 401, description = "No token, or not a valid one (`WWW-Authenticate: Bearer`)", body = Error),
        (status = 403, description = "`forbidden`: neither the owner, the admin token nor the member", body = Error),
        (status = 404, description = "`not_found`: no such conversation", body = Error),
    ),
)]
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

/// The calling user, a member of `conv`, for a setting of its own; the
/// admin token `lacks` one.
fn member_caller<'a>(
    caller: &'a Caller,
    chat: &Chat,
    conv: &str,
    lacks: &str,
) -> Result<&'a str, ApiError> {
    let user = caller.user().ok_or_else(|| {
        ApiError::bad(format!(
            "the admin token {lacks} of its own: call with a user's token"
        ))
    })?;
    if !valid_conv(conv) || !chat.is_member(conv, user) {
        return Err(
            RpcError::new("not_member", "you are not a member of this conversation").into(),
        );
    }
    Ok(user)
}

/// The body of `PUT /v1/conversations/{id}/mute`.
#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Mute {
    muted: bool,
}

/// `PUT /v1/conversations/{id}/mute` `{"muted": bool}`: the caller's push
/// setting for one conversation (the RPC `conversation.mute`); members only.
#[utoipa::path(
    put,
    path = "/v1/conversations/{conv}/mute",
    tag = "conversations",
    params(("conv" = String, Path, description = "The conversation id")),
    request_body = Mute,
    security(("user_jwt" = [])),
    responses(
        (status = 200, description = "The setting kept", body = Muted),
        (status = 400, description = "`bad_request`: a bad body, or the admin token", body = Error),
        (status = 401, description = "No token, or not a valid one (`WWW-Authenticate: Bearer`)", body = Error),
        (status = 403, description = "`not_member`: the caller is not a member", body = Error),
    ),
)]
pub async fn mute(
    caller: Caller,
    State(api): State<Arc<Api>>,
    Path(conv): Path<String>,
    JsonBody(req): JsonBody<Mute>,
) -> Result<Json<Value>, ApiError> {
    let chat = &api.broker.chat;
    let user = member_caller(&caller, chat, &conv, "has no push settings")?;
    crate::chat::rpc::set_muted(chat, user, &conv, req.muted).await?;
    Ok(Json(json!({"conv": conv, "muted": req.muted})))
}

/// The body of `PUT /v1/conversations/{id}/read`.
#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Read {
    seq: u64,
}

/// `PUT /v1/conversations/{id}/read` `{"seq": n}`: the caller read the
/// conversation up to `seq` (the RPC `read`: a read receipt to the other
/// members, never backwards). `{"conv","seq"}` with the read seq kept.
#[utoipa::path(
    put,
    path = "/v1/conversations/{conv}/read",
    tag = "conversations",
    params(("conv" = String, Path, description = "The conversation id")),
    request_body = Read,
    security(("user_jwt" = [])),
    responses(
        (status = 200, description = "The read seq kept", body = ReadPosition),
        (status = 400, description = "`bad_request`: a bad body, or the admin token", body = Error),
        (status = 401, description = "No token, or not a valid one (`WWW-Authenticate: Bearer`)", body = Error),
        (status = 403, description = "`not_member`: the caller is not a member", body = Error),
    ),
)]
pub async fn read(
    caller: Caller,
    State(api): State<Arc<Api>>,
    Path(conv): Path<String>,
    JsonBody(req): JsonBody<Read>,
) -> Result<Json<Value>, ApiError> {
    let chat = &api.broker.chat;
    let user = member_caller(&caller, chat, &conv, "has no read position")?;
    let seq = chat.mark_read(user, &conv, req.seq).await?;
    Ok(Json(json!({"conv": conv, "seq": seq})))
}

/// `GET /v1/conversations/{id}/occupancy`: `{"conv","members","connected"}`
/// (the RPC `occupancy`), for members and the admin token.
#[utoipa::path(
    get,
    path = "/v1/conversations/{conv}/occupancy",
    tag = "conversations",
    params(("conv" = String, Path, description = "The conversation id")),
    security(("user_jwt" = []), ("admin_token" = [])),
    responses(
        (status = 200, description = "Members and how many are connected", body = Occupancy),
        (status = 400, description = "`bad_request`: a bad id", body = Error),
        (status = 401, description = "No token, or not a valid one (`WWW-Authenticate: Bearer`)", body = Error),
        (status = 403, description = "`not_member`: the caller is not a member", body = Error),
        (status = 404, description = "`not_found`: no such conversation", body = Error),
    ),
)]
pub async fn occupancy(
    caller: Caller,
    State(api): State<Arc<Api>>,
    Path(conv): Path<String>,
) -> Result<Json<Value>, ApiError> {
    check_conv(&conv)?;
    let chat = &api.broker.chat;
    if !chat.exists(&conv) {
        return Err(RpcError::new("not_found", "no such conversation").into());
    }
    if let Caller::User(u) = &caller {
        if !chat.is_member(&conv, u) {
            return Err(
                RpcError::new("not_member", "you are not a member of this conversation").into(),
            );
        }
    }
    Ok(Json(chat.occupancy(&conv)))
}
