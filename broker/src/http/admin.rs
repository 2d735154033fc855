//! `/v1/admin/...`: what the operator does to the running broker, with the
//! admin token only (a user's token is refused 403, none 401).
//!
//! `POST /v1/admin/reload` reads the configuration file again and applies
//! what can change live (as SIGHUP does, [`crate::reload`]): 200
//! `{"status":"reloaded","restart_needed":[keys]}`, or 422
//! `invalid_config` with the one-line error (the running settings are
//! kept), or 409 `no_config_file` for a broker started without a file.
//!
//! `POST /v1/admin/drain` moves the node's clients away and then stops it
//! ([`crate::drain`]): 202 `{"status":"draining","connections":N,
//! "spread_secs":S,"timeout_secs":T,"server_reference":R}`; the same answer, with the plan
//! in force, when a drain is already under way; 409 `stopping` when the
//! node is shutting down.

use std::sync::Arc;

use axum::extract::State;
use axum::http::StatusCode;
use axum::Json;
use serde_json::{json, Value};

use serde::Deserialize;

use super::openapi::{Draining, Error, Reloaded};
use super::{Api, ApiError, Body, Caller};
use crate::counter::Total;
use crate::drain::{Phase, Plan};
use crate::reload::ReloadError;

/// `POST /v1/admin/drain`: each field overrides `[drain]` for this drain.
#[derive(Debug, Default, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct DrainRequest {
    /// What MQTT 5 clients are told to use instead (`drain.server_reference`).
    server_reference: Option<String>,
    /// Clients leave at random moments over this many seconds, 0..=3600
    /// (`drain.spread_secs`).
    spread_secs: Option<u64>,
}

/// The longest spread a request may ask for (as `drain.spread_secs`).
const MAX_SPREAD_SECS: u64 = 3600;

/// The longest Server Reference accepted (an MQTT string holds 65,535
/// bytes; a `host:port` list is far shorter).
const MAX_REFERENCE: usize = 1024;

/// Starts moving this node's clients away; the node stops once they are gone.
#[utoipa::path(
    post,
    path = "/v1/admin/drain",
    tag = "admin",
    request_body(content = Option<DrainRequest>, description = "Optional; an empty body takes `[drain]` as configured"),
    security(("admin_token" = [])),
    responses(
        (status = 202, description = "Draining (also when a drain was already under way: its plan)", body = Draining),
        (status = 400, description = "`bad_request`: not the JSON above, or out of bounds", body = Error),
        (status = 401, description = "No token, or not a valid one (`WWW-Authenticate: Bearer`)", body = Error),
        (status = 403, description = "`forbidden`: a user's token", body = Error),
        (status = 409, description = "`stopping`: the node is shutting down", body = Error),
    ),
)]
pub async fn drain(
    State(api): State<Arc<Api>>,
    caller: Caller,
    Body(body): Body,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    if caller != Caller::Admin {
        return Err(ApiError::forbidden(
            "only the admin token may drain the node",
        ));
    }
    let request: DrainRequest = if body.iter().all(u8::is_ascii_whitespace) {
        DrainRequest::default()
    } else {
        serde_json::from_slice(&body)
            .map_err(|e| ApiError::bad(format!("not a drain request: {e}")))?
    };
    let broker = &api.broker;
    let mut plan = Plan::from_settings(&broker.settings.drain);
    if let Some(r) = request.server_reference {
        if r.is_empty() || r.len() > MAX_REFERENCE {
            return Err(ApiError::bad(format!(
                "server_reference must be 1..={MAX_REFERENCE} bytes"
            )));
        }
        plan.server_reference = Some(r);
    }
    if let Some(secs) = request.spread_secs {
        if secs > MAX_SPREAD_SECS {
            return Err(ApiError::bad(format!(
                "spread_secs must be 0..={MAX_SPREAD_SECS}"
            )));
        }
        plan.spread = std::time::Duration::from_secs(secs);
    }
    if broker.drain.phase() == Phase::Stopping {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "stopping",
            "the node is shutting down",
        ));
    }
    if broker.drain.start(plan) {
        // Not ready from now on: a load balancer sends no new client.
        api.ready.store(false, std::sync::atomic::Ordering::Release);
    }
    let Some((plan, _)) = broker.drain.plan() else {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "stopping",
            "the node is shutting down",
        ));
    };
    Ok((
        StatusCode::ACCEPTED,
        Json(json!({
            "status": "draining",
            "connections": broker.metrics.connections.total(),
            "spread_secs": plan.spread.as_secs(),
            "timeout_secs": plan.timeout.as_secs(),
            "server_reference": plan.server_reference,
        })),
    ))
}

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
