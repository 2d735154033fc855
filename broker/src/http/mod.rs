//! The HTTP API (DESIGN §4), for app servers and operators: `/healthz`,
//! `/readyz`, `/metrics` ([`ops`]), and under `/v1` the chat operations
//! the RPC over MQTT offers: [`conversations`] and their members,
//! [`messages`] (history and server-side send), [`devices`] (push); and
//! the operator's [`admin`] calls (`POST /v1/admin/reload`); their
//! OpenAPI description at `/v1/openapi.json` ([`openapi`]).
//!
//! The story of a request: axum routes it; the [`Caller`] extractor reads
//! `Authorization: Bearer <token>` (the admin token, or a user's JWT
//! checked as a CONNECT password would be); the handler checks what that
//! caller may do and calls the same [`Chat`](crate::chat::Chat) methods the
//! RPC uses, so both paths share one set of rules. Every error is JSON,
//! `{"error":{"code":"...","message":"..."}}`, with a fitting status: the
//! handlers' own, axum's (405, rejections) through [`json_errors`], and
//! those hyper writes by itself through [`wire`].
//!
//! Connections are [`server`]'s: a permit each, a header timeout; a request
//! whose head is in must be answered within `http.request_timeout_secs`
//! ([`limits`]), reading its body included.
//!
//! This module owns HTTP concerns only: no chat rule lives here.

mod admin;
mod attachments;
mod conversations;
mod devices;
mod messages;
mod openapi;
mod ops;
mod server;
pub mod stream;
mod web;
mod wire;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{DefaultBodyLimit, FromRequest, FromRequestParts, Request, State};
use axum::handler::Handler;
use axum::http::header::{AUTHORIZATION, CONTENT_LENGTH, CONTENT_TYPE, WWW_AUTHENTICATE};
use axum::http::request::Parts;
use axum::http::{HeaderValue, Method, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{on, MethodFilter, MethodRouter};
use axum::{Json, Router};
use bytes::Bytes;
use serde::de::DeserializeOwned;
use serde_json::json;
use tokio::sync::Semaphore;

use crate::broker::Broker;
use crate::chat::RpcError;
use crate::reload::Reloader;

pub use openapi::ApiDoc;
pub use server::serve;

/// Room for the JSON around a message body: a send may carry a payload of
/// `mqtt.max_payload` like an MQTT publish, plus its envelope.
const BODY_SLACK: usize = 64 * 1024;

/// What every handler shares.
pub struct Api {
    broker: Arc<Broker>,
    /// Set while the server is serving; `/readyz` reports it.
    ready: Arc<AtomicBool>,
    /// The TLS and WebSocket listeners, for `/v1/client-config`.
    edges: Vec<(&'static str, SocketAddr)>,
    /// `http.max_connections` permits, one per open connection.
    connections: Arc<Semaphore>,
    timeouts: Timeouts,
    /// Applies a changed configuration file (`POST /v1/admin/reload`).
    reloader: Arc<Reloader>,
    /// The open `GET /v1/stream`s.
    streams: Arc<stream::Streams>,
}

/// Requests cut short by a timeout, for `/metrics`.
#[derive(Debug, Default)]
struct Timeouts {
    /// Connections closed because a request's head did not arrive in time.
    header: AtomicU64,
    /// Requests answered 408 after `http.request_timeout_secs`.
    request: AtomicU64,
}

impl Api {
    pub fn new(
        broker: Arc<Broker>,
        ready: Arc<AtomicBool>,
        edges: Vec<(&'static str, SocketAddr)>,
        reloader: Arc<Reloader>,
    ) -> Arc<Api> {
        let connections = Arc::new(Semaphore::new(broker.settings.http.max_connections));
        Arc::new(Api {
            broker,
            ready,
            edges,
            connections,
            timeouts: Timeouts::default(),
            reloader,
            streams: Arc::default(),
        })
    }

    /// The open `GET /v1/stream`s (a drain waits for them to leave too).
    pub fn streams(&self) -> Arc<stream::Streams> {
        self.streams.clone()
    }

    /// The largest request body any route reads.
    fn body_limit(&self) -> usize {
        self.broker
            .settings
            .mqtt
            .max_payload
            .saturating_add(BODY_SLACK)
    }

    /// HTTP connections open now.
    fn open_connections(&self) -> usize {
        let max = self.broker.settings.http.max_connections;
        max.saturating_sub(self.connections.available_permits())
    }
}

/// One route the API serves: what the router is built from and what
/// [`routes`] reports, so the OpenAPI test checks the served list itself.
struct Route {
    method: Method,
    path: &'static str,
    handler: MethodRouter<Arc<Api>>,
}

impl Route {
    fn new<H, T>(method: Method, path: &'static str, handler: H) -> Route
    where
        H: Handler<T, Arc<Api>>,
        T: 'static,
    {
        // Every method of the table is one axum routes; any other would
        // serve nothing (and the OpenAPI test would say so).
        let handler = match MethodFilter::try_from(method.clone()) {
            Ok(filter) => on(filter, handler),
            Err(_) => MethodRouter::new(),
        };
        Route {
            method,
            path,
            handler,
        }
    }
}

/// Every route, one line each. A new route goes here AND gets a
/// `#[utoipa::path]` on its handler listed in [`openapi::ApiDoc`]
/// (docs/ARCHITECTURE.md "The HTTP API"); `tests/tests/openapi.rs` fails
/// until both are done.
fn table() -> Vec<Route> {
    use Method as M;
    vec![
        Route::new(M::GET, "/healthz", ops::healthz),
        Route::new(M::GET, "/readyz", ops::readyz),
        Route::new(M::GET, "/metrics", ops::metrics),
        Route::new(M::GET, "/v1/openapi.json", openapi::document),
        Route::new(M::GET, "/v1/conversations", conversations::list),
        Route::new(M::POST, "/v1/conversations", conversations::create),
        Route::new(
            M::POST,
            "/v1/conversations/{conv}/members",
            conversations::add_member,
        ),
        Route::new(
            M::DELETE,
            "/v1/conversations/{conv}/members/{user}",
            conversations::remove_member,
        ),
        Route::new(M::PUT, "/v1/conversations/{conv}/mute", conversations::mute),
        Route::new(M::PUT, "/v1/conversations/{conv}/read", conversations::read),
        Route::new(
            M::GET,
            "/v1/conversations/{conv}/messages",
            messages::history,
        ),
        Route::new(M::POST, "/v1/conversations/{conv}/messages", messages::send),
        Route::new(
            M::PATCH,
            "/v1/conversations/{conv}/messages/{seq}",
            messages::edit,
        ),
        Route::new(
            M::DELETE,
            "/v1/conversations/{conv}/messages/{seq}",
            messages::delete,
        ),
        Route::new(
            M::PUT,
            "/v1/conversations/{conv}/messages/{seq}/reactions/{emoji}",
            messages::react,
        ),
        Route::new(
            M::DELETE,
            "/v1/conversations/{conv}/messages/{seq}/reactions/{emoji}",
            messages::unreact,
        ),
        Route::new(
            M::GET,
            "/v1/conversations/{conv}/occupancy",
            conversations::occupancy,
        ),
        Route::new(M::POST, "/v1/conversations/{conv}/typing", stream::typing),
        Route::new(M::GET, "/v1/stream", stream::open),
        Route::new(
            M::POST,
            "/v1/conversations/{conv}/attachments",
            attachments::upload,
        ),
        Route::new(M::GET, "/v1/attachments/{id}", attachments::download),
        Route::new(M::POST, "/v1/attachments/{id}/token", attachments::token),
        Route::new(M::GET, "/v1/devices", devices::list),
        Route::new(M::POST, "/v1/devices", devices::register),
        Route::new(
            M::DELETE,
            "/v1/devices/{platform}/{token}",
            devices::unregister,
        ),
        Route::new(M::GET, "/v1/client-config", web::client_config),
        Route::new(M::POST, "/v1/admin/reload", admin::reload),
        Route::new(M::POST, "/v1/admin/drain", admin::drain),
    ]
}

/// The (method, path) of every route the router serves, in the OpenAPI
/// path syntax (`{param}`, as axum's). The static files of
/// `http.static_dir` are the fallback, not a route.
pub fn routes() -> Vec<(Method, &'static str)> {
    table().into_iter().map(|r| (r.method, r.path)).collect()
}

/// The router: the routes of [`table`] (routes of one path merge into one
/// method router), the static-file fallback, the limits and error shape.
pub fn router(api: Arc<Api>) -> Router {
    let body_limit = api.body_limit();
    table()
        .into_iter()
        .fold(Router::new(), |router, r| router.route(r.path, r.handler))
        .fallback(web::static_file)
        .layer(DefaultBodyLimit::max(body_limit))
        .layer(middleware::from_fn_with_state(api.clone(), limits))
        .layer(middleware::map_response(json_errors))
        .layer(middleware::from_fn(request_id))
        .with_state(api)
}

/// The header that carries a request's id both ways.
pub const REQUEST_ID: &str = "x-request-id";

/// The id a request is known by in the logs: the client's `X-Request-Id`
/// (1 to 128 visible ASCII characters), or a new one (16 hex digits).
/// Every log line of the request carries it (the `http` span, with the
/// method and path), the response returns it in `X-Request-Id`, and the
/// request's end is logged (`debug`; `warn` for a 5xx).
async fn request_id(request: Request, next: Next) -> Response {
    let id = request
        .headers()
        .get(REQUEST_ID)
        .and_then(|v| v.to_str().ok())
        .filter(|v| (1..=128).contains(&v.len()) && v.bytes().all(|b| b.is_ascii_graphic()))
        .map_or_else(|| format!("{:016x}", fastrand::u64(..)), str::to_string);
    let span = tracing::info_span!(
        "http",
        request_id = %id,
        method = %request.method(),
        path = %request.uri().path(),
    );
    let started = std::time::Instant::now();
    let mut response = tracing::Instrument::instrument(next.run(request), span.clone()).await;
    let status = response.status().as_u16();
    let ms = started.elapsed().as_millis();
    span.in_scope(|| {
        if status >= 500 {
            tracing::warn!(status, ms, "http request failed");
        } else {
            tracing::debug!(status, ms, "http request");
        }
    });
    if let Ok(v) = HeaderValue::from_str(&id) {
        response.headers_mut().insert(REQUEST_ID, v);
    }
    response
}

/// What any request may ask of the server. A body announced larger than
/// any route accepts is refused (413) at once, before waiting for bytes
/// that would be refused anyway. A request not answered within
/// `http.request_timeout_secs`, its body included (a client may send the
/// headers and then trickle or never finish the body), is answered 408;
/// hyper then closes the connection, since the body was not read to its end.
async fn limits(State(api): State<Arc<Api>>, request: Request, next: Next) -> Response {
    let announced = request
        .headers()
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    let body_limit =
        attachments::announced_limit(request.uri().path()).unwrap_or(api.body_limit() as u64);
    if announced.is_some_and(|n| n > body_limit) {
        return ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "too_large",
            format!("the body may be at most {body_limit} bytes"),
        )
        .into_response();
    }
    let limit = Duration::from_secs(api.broker.settings.http.request_timeout_secs);
    match tokio::time::timeout(limit, next.run(request)).await {
        Ok(response) => response,
        Err(_) => {
            api.timeouts.request.fetch_add(1, Ordering::Relaxed);
            ApiError::new(
                StatusCode::REQUEST_TIMEOUT,
                "timeout",
                "the request was not complete within http.request_timeout_secs",
            )
            .into_response()
        }
    }
}

/// Gives an error answer that is not the API's JSON (axum's own 405, an
/// extractor's plain-text rejection) the JSON shape, keeping its headers
/// (`Allow` on a 405) and its text as the message.
async fn json_errors(response: Response) -> Response {
    let status = response.status();
    let is_json = response
        .headers()
        .get(CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/json"));
    if !(status.is_client_error() || status.is_server_error()) || is_json {
        return response;
    }
    let (mut parts, body) = response.into_parts();
    // axum's texts are a line or two; a longer one is not worth keeping.
    let text = axum::body::to_bytes(body, 4096)
        .await
        .map(|b| String::from_utf8_lossy(&b).trim().to_string())
        .unwrap_or_default();
    let (json, body) = ApiError::for_status(status, &text)
        .into_response()
        .into_parts();
    parts.headers.remove(CONTENT_LENGTH);
    parts.headers.extend(json.headers);
    Response::from_parts(parts, body)
}

/// A refused request: status, a stable code, and a sentence.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    code: &'static str,
    message: String,
}

impl ApiError {
    fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            code,
            message: message.into(),
        }
    }

    fn bad(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::BAD_REQUEST, "bad_request", message)
    }

    fn unauthorized(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::UNAUTHORIZED, "unauthorized", message)
    }

    fn forbidden(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::FORBIDDEN, "forbidden", message)
    }

    /// An error known only by its status (answers axum or hyper made):
    /// the API's code for it, and `message`, or the status's reason.
    fn for_status(status: StatusCode, message: &str) -> ApiError {
        let code = match status.as_u16() {
            400 => "bad_request",
            401 => "unauthorized",
            403 => "forbidden",
            404 => "not_found",
            405 => "method_not_allowed",
            408 => "timeout",
            413 => "too_large",
            414 => "uri_too_long",
            431 => "headers_too_large",
            503 => "unavailable",
            400..=499 => "bad_request",
            _ => "internal",
        };
        let message = if message.is_empty() {
            status.canonical_reason().unwrap_or("error").to_lowercase()
        } else {
            message.to_string()
        };
        ApiError::new(status, code, message)
    }

    /// The body every error answer carries.
    fn body(&self) -> serde_json::Value {
        json!({"error": {"code": self.code, "message": self.message}})
    }
}

impl From<RpcError> for ApiError {
    fn from(e: RpcError) -> ApiError {
        let status = match e.code {
            "bad_request" => StatusCode::BAD_REQUEST,
            "not_member" | "forbidden" => StatusCode::FORBIDDEN,
            "not_found" => StatusCode::NOT_FOUND,
            "exists" | "deleted" | "not_editable" | "too_many_edits" | "too_many_reactions" => {
                StatusCode::CONFLICT
            }
            _ => StatusCode::INTERNAL_SERVER_ERROR,
        };
        ApiError::new(status, e.code, e.message)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = Json(self.body());
        let mut response = (self.status, body).into_response();
        if self.status == StatusCode::UNAUTHORIZED {
            response
                .headers_mut()
                .insert(WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        response
    }
}

/// Who is calling, from `Authorization: Bearer <token>`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Caller {
    /// The `auth.admin_token`: acts for the operator.
    Admin,
    /// A user's JWT.
    User(Arc<str>),
}

impl Caller {
    /// The user, for calls made with a user's token.
    fn user(&self) -> Option<&str> {
        match self {
            Caller::Admin => None,
            Caller::User(u) => Some(u),
        }
    }
}

impl FromRequestParts<Arc<Api>> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, api: &Arc<Api>) -> Result<Caller, ApiError> {
        Caller::from_headers(&parts.headers, api)
    }
}

impl Caller {
    /// The caller an `Authorization` header names.
    fn from_headers(headers: &axum::http::HeaderMap, api: &Api) -> Result<Caller, ApiError> {
        let token = headers
            .get(AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(bearer)
            .ok_or_else(|| ApiError::unauthorized("send Authorization: Bearer <token>"))?;
        let auth = &api.broker.auth;
        if auth.is_admin_token(token) {
            return Ok(Caller::Admin);
        }
        auth.user_from_token(token)
            .map(|u| Caller::User(u.into()))
            .ok_or_else(|| {
                ApiError::unauthorized(
                    "the token is not valid (wrong signature, expired, or no user id)",
                )
            })
    }
}

/// The token of a `Bearer` credential (the scheme is case-insensitive).
fn bearer(header: &str) -> Option<&str> {
    let (scheme, token) = header.split_once(' ')?;
    let token = token.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then_some(token)
}

/// The request body, within the size limit. Unlike axum's own extractors
/// it refuses in the API's JSON error shape.
pub struct Body(pub Bytes);

impl<S: Send + Sync> FromRequest<S> for Body {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Body, ApiError> {
        Bytes::from_request(req, state)
            .await
            .map(Body)
            .map_err(|e| {
                let code = if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
                    "too_large"
                } else {
                    "bad_request"
                };
                ApiError::new(e.status(), code, e.body_text())
            })
    }
}

/// A JSON request body of type `T` (any content type is read as JSON).
pub struct JsonBody<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequest<S> for JsonBody<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<JsonBody<T>, ApiError> {
        let Body(bytes) = Body::from_request(req, state).await?;
        serde_json::from_slice(&bytes)
            .map(JsonBody)
            .map_err(|e| ApiError::bad(format!("the body is not the expected JSON: {e}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bearer_credentials_are_parsed() {
        assert_eq!(bearer("Bearer abc"), Some("abc"));
        assert_eq!(bearer("bearer  abc "), Some("abc"));
        assert_eq!(bearer("Basic abc"), None);
        assert_eq!(bearer("Bearer "), None);
        assert_eq!(bearer("Bearer"), None);
    }

    #[test]
    fn chat_errors_get_their_status() {
        let status = |code| ApiError::from(RpcError::new(code, "x")).status;
        assert_eq!(status("bad_request"), StatusCode::BAD_REQUEST);
        assert_eq!(status("not_member"), StatusCode::FORBIDDEN);
        assert_eq!(status("forbidden"), StatusCode::FORBIDDEN);
        assert_eq!(status("not_found"), StatusCode::NOT_FOUND);
        assert_eq!(status("exists"), StatusCode::CONFLICT);
        assert_eq!(status("internal"), StatusCode::INTERNAL_SERVER_ERROR);
    }
}
