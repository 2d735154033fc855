//! `/v1/admin/...`: what the operator does to the running broker, with the
//! admin token only (a user's token is refused 403, none 401).
//!
//! `POST /v1/admin/reload` reads the configuration file again and applies
//! what can change live (as SIGHUP does, [`crate::reload`]): 200
//! `{"status":"reloaded","restart_needed":[keys]}`, or 422
//! `invalid_config` with the one-line error (the running settings are
//! kept), or 409 `no_config_file` for a broker started without a file.

use std::sync::Arc;

use axum::extract::State;
use axum::http::StatusCode;
use axum::Json;
use serde_json::{json, Value};

use super::openapi::{Error, Reloaded};
use super::{Api, ApiError, Caller};
use crate::reload::ReloadError;

/// Reads the configuration file again and applies what can change live.
#[utoipa::path(
    post,
    path = "/v1/admin/reload",
    tag = "admin",
    security(("admin_token" = [])),
    responses(
        (status = 200, description = "Applied", body = Reloaded),
        (status = 401, description = "No token, or not a valid one (`WWW-Authenticate: Bearer`)", body = Error),
        (status = 403, description = "`forbidden`: a user's token", body = Error),
        (status = 409, description = "`no_config_file`: started without a file", body = Error),
        (status = 422, description = "`invalid_config`: nothing changed; the message names the key or file", body = Error),
    ),
)]
pub async fn reload(State(api): State<Arc<Api>>, caller: Caller) -> Result<Json<Value>, ApiError> {
    if caller != Caller::Admin {
        return Err(ApiError::forbidden(
            "only the admin token may reload the configuration",
        ));
    }
    let reloader = api.reloader.clone();
    let reloaded = tokio::task::spawn_blocking(move || reloader.reload())
        .await
        .map_err(|_| {
            ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal",
                "the reload did not finish",
            )
        })?;
    match reloaded {
        Ok(r) => Ok(Json(
            json!({"status": "reloaded", "restart_needed": r.restart_needed}),
        )),
        Err(e @ ReloadError::NoSource) => Err(ApiError::new(
            StatusCode::CONFLICT,
            "no_config_file",
            e.to_string(),
        )),
        Err(e) => Err(ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_config",
            e.to_string(),
        )),
    }
}
