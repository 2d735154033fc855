//! `/v1/devices`: the devices that get push notifications, as the RPC
//! `device.register` / `device.unregister` / `device.list` offer them. A
//! user's token acts for that user; the admin token acts for the user it
//! names (`user` in the body or the query).

use std::sync::Arc;

use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Value};

use super::openapi::{Device, DeviceList, DeviceRemoved, Error};
use super::{Api, ApiError, Caller, JsonBody};
use crate::chat::namespace::valid_user;
use crate::chat::rpc::{device_json, list_devices, register_device, unregister_device};

/// `?user=`: whom the admin token acts for.
#[derive(Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct ForUser {
    /// The admin token only: the user it acts for (required with it).
    user: Option<String>,
}

/// The user a call is for: the caller, or the user the admin names.
fn subject(caller: &Caller, named: Option<String>) -> Result<String, ApiError> {
    match (caller, named) {
        (Caller::User(u), None) => Ok(u.to_string()),
        (Caller::User(u), Some(n)) if *n == **u => Ok(n),
        (Caller::User(_), Some(_)) => Err(ApiError::forbidden(
            "only the admin token may act for another user",
        )),
        (Caller::Admin, Some(n)) if valid_user(&n) => Ok(n),
        (Caller::Admin, Some(_)) => Err(ApiError::bad("`user` is not a valid user id")),
        (Caller::Admin, None) => Err(ApiError::bad(
            "the admin token has no devices of its own: name a `user`",
        )),
    }
}

/// `GET /v1/devices`: `{"devices": [{"platform","token","app_id"}]}`.
#[utoipa::path(
    get,
    path = "/v1/devices",
    tag = "devices",
    params(ForUser),
    security(("user_jwt" = []), ("admin_token" = [])),
    responses(
        (status = 200, description = "The user's devices", body = DeviceList),
        (status = 400, description = "`bad_request`: the admin token named no valid `user`", body = Error),
        (status = 401, description = "No token, or not a valid one (`WWW-Authenticate: Bearer`)", body = Error),
        (status = 403, description = "`forbidden`: a user's token naming another user", body = Error),
    ),
)]
pub async fn list(
    caller: Caller,
    State(api): State<Arc<Api>>,
    Query(q): Query<ForUser>,
) -> Result<Json<Value>, ApiError> {
    let user = subject(&caller, q.user)?;
    Ok(Json(
        json!({"devices": list_devices(&api.broker.chat, &user)?}),
    ))
}

/// The body of `POST /v1/devices`.
#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewDevice {
    /// `apns`, `fcm` or `webhook`.
    platform: String,
    token: String,
    app_id: Option<String>,
    /// The admin token only: whose device it is.
    user: Option<String>,
}

/// `POST /v1/devices` `{platform, token, app_id?, user?}`: 201 with the
/// device. A token registered to another user moves to this one.
#[utoipa::path(
    post,
    path = "/v1/devices",
    tag = "devices",
    request_body = NewDevice,
    security(("user_jwt" = []), ("admin_token" = [])),
    responses(
        (status = 201, description = "Registered", body = Device),
        (status = 400, description = "`bad_request`: a bad platform, token or user", body = Error),
        (status = 401, description = "No token, or not a valid one (`WWW-Authenticate: Bearer`)", body = Error),
        (status = 403, description = "`forbidden`: a user's token naming another user", body = Error),
    ),
)]
pub async fn register(
    caller: Caller,
    State(api): State<Arc<Api>>,
    JsonBody(req): JsonBody<NewDevice>,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    let user = subject(&caller, req.user)?;
    let device = register_device(
        &api.broker.chat,
        &user,
        &req.platform,
        &req.token,
        req.app_id.as_deref(),
    )
    .await?;
    Ok((StatusCode::CREATED, Json(device_json(&device))))
}

/// `DELETE /v1/devices/{platform}/{token}?user=`: 200 `{"platform","token"}`,
/// 404 if the caller has no such device.
#[utoipa::path(
    delete,
    path = "/v1/devices/{platform}/{token}",
    tag = "devices",
    params(
        ("platform" = String, Path, description = "`apns`, `fcm` or `webhook`"),
        ("token" = String, Path, description = "The device token, percent-encoded"),
        ForUser,
    ),
    security(("user_jwt" = []), ("admin_token" = [])),
    responses(
        (status = 200, description = "Removed", body = DeviceRemoved),
        (status = 400, description = "`bad_request`", body = Error),
        (status = 401, description = "No token, or not a valid one (`WWW-Authenticate: Bearer`)", body = Error),
        (status = 403, description = "`forbidden`: a user's token naming another user", body = Error),
        (status = 404, description = "`not_found`: the user has no such device", body = Error),
    ),
)]
pub async fn unregister(
    caller: Caller,
    State(api): State<Arc<Api>>,
    Path((platform, token)): Path<(String, String)>,
    Query(q): Query<ForUser>,
) -> Result<Json<Value>, ApiError> {
    let user = subject(&caller, q.user)?;
    unregister_device(&api.broker.chat, &user, &platform, &token).await?;
    Ok(Json(json!({"platform": platform, "token": token})))
}
