//! The API's description: one OpenAPI 3.1 document, [`ApiDoc`], assembled
//! from the `#[utoipa::path]` annotation on each handler, and served at
//! `GET /v1/openapi.json` without a token (it describes the API and grants
//! nothing; the routes it lists check their own tokens).
//!
//! Documenting a route is three small steps beside adding it to the route
//! table (`super::table`): a `#[utoipa::path(...)]` on the handler (method,
//! path, params, body, responses, security), `ToSchema` on its request
//! type (or a type here for a body the handler builds with `json!`), and
//! its handler in `paths(...)` below. `tests/tests/openapi.rs` fails while
//! any route of the table is missing from the document, or the document
//! lists one the router does not serve.
//!
//! Most answers are built with `json!` in the handlers; the types in this
//! module only describe those bodies and are never built.

use std::sync::LazyLock;

use axum::http::header::CONTENT_TYPE;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde_json::Value;
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{Modify, OpenApi, ToSchema};

use super::ApiError;

/// The document. Handlers are listed here; the schemas they name are
/// collected from their annotations.
#[derive(OpenApi)]
#[openapi(
    info(
        title = "chatmq HTTP API",
        description = "The HTTP API of chatmq (docs/DESIGN.md §4): operations, \
            conversations and members, messages, push devices, the web client's \
            configuration and the operator's calls. Every error answer is \
            `{\"error\":{\"code\",\"message\"}}` (schema `Error`).",
        license(name = "Apache-2.0", identifier = "Apache-2.0"),
    ),
    paths(
        super::ops::healthz,
        super::ops::readyz,
        super::ops::metrics,
        super::conversations::list,
        super::conversations::create,
        super::conversations::add_member,
        super::conversations::remove_member,
        super::conversations::mute,
        super::conversations::read,
        super::conversations::occupancy,
        super::messages::history,
        super::messages::send,
        super::messages::edit,
        super::messages::delete,
        super::messages::react,
        super::messages::unreact,
        super::stream::open,
        super::stream::typing,
        super::attachments::upload,
        super::attachments::download,
        super::attachments::token,
        super::devices::list,
        super::devices::register,
        super::devices::unregister,
        super::web::client_config,
        super::admin::reload,
        super::admin::drain,
        document,
    ),
    components(schemas(Error, ErrorDetail)),
    modifiers(&Tokens),
    tags(
        (name = "operations", description = "Health, readiness, metrics and this document: no token"),
        (name = "conversations", description = "Conversations, members, mute and read positions"),
        (name = "messages", description = "History, server-side send, edits, deletes, reactions"),
        (name = "attachments", description = "Files uploaded to a conversation, for its members"),
        (name = "devices", description = "Devices that get push notifications"),
        (name = "web", description = "What a browser page needs besides the API"),
        (name = "admin", description = "The operator's calls: the admin token only"),
    ),
)]
pub struct ApiDoc;

/// The security scheme of a user's JWT.
pub const USER_JWT: &str = "user_jwt";
/// The security scheme of `auth.admin_token`.
pub const ADMIN_TOKEN: &str = "admin_token";

/// The two bearer tokens the `Caller` extractor reads.
struct Tokens;

impl Modify for Tokens {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            USER_JWT,
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .bearer_format("JWT")
                    .description(Some(
                        "A user's JWT (`sub` = user id), checked as an MQTT CONNECT password is.",
                    ))
                    .build(),
            ),
        );
        components.add_security_scheme(
            ADMIN_TOKEN,
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .description(Some("`auth.admin_token`: acts for the operator."))
                    .build(),
            ),
        );
    }
}

/// The document as served, rendered once.
static DOCUMENT: LazyLock<Result<String, String>> =
    LazyLock::new(|| ApiDoc::openapi().to_json().map_err(|e| e.to_string()));

/// The OpenAPI document of this API (the one you are reading).
#[utoipa::path(
    get,
    path = "/v1/openapi.json",
    tag = "operations",
    responses(
        (status = 200, description = "The OpenAPI 3.1 document", content_type = "application/json", body = Object),
    ),
)]
pub async fn document() -> Response {
    match &*DOCUMENT {
        Ok(json) => ([(CONTENT_TYPE, "application/json")], json.clone()).into_response(),
        Err(e) => ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            format!("the API description could not be rendered: {e}"),
        )
        .into_response(),
    }
}

// ---- bodies the handlers build with `json!`: descriptions only ----

/// Every error answer, whoever refused the request.
#[allow(dead_code)]
#[derive(ToSchema)]
#[schema(example = json!({"error": {"code": "not_member", "message": "you are not a member of this conversation"}}))]
pub struct Error {
    error: ErrorDetail,
}

#[allow(dead_code)]
#[derive(ToSchema)]
pub struct ErrorDetail {
    /// A stable code: `bad_request`, `bad_envelope`, `unauthorized`,
    /// `forbidden`, `not_member`, `not_found`, `method_not_allowed`,
    /// `timeout`, `exists`, `deleted`, `not_editable`, `too_many_edits`,
    /// `too_many_reactions`, `no_config_file`, `too_large`, `uri_too_long`,
    /// `headers_too_large`, `invalid_config`, `unavailable`, `not_ready`,
    /// `internal`.
    code: String,
    /// A sentence for people.
    message: String,
}

/// `{"status": "ok"}` or `{"status": "ready"}`.
#[allow(dead_code)]
#[derive(ToSchema)]
pub struct Status {
    status: String,
}

/// One conversation of the caller.
#[allow(dead_code)]
#[derive(ToSchema)]
pub struct ConversationSummary {
    conv: String,
    title: String,
    /// The seq of its latest record.
    head: u64,
    /// The caller's read seq.
    read: u64,
    unread: u64,
    /// `owner` or `member`.
    role: String,
    /// No push for this conversation.
    muted: bool,
}

#[allow(dead_code)]
#[derive(ToSchema)]
pub struct ConversationList {
    conversations: Vec<ConversationSummary>,
}

#[allow(dead_code)]
#[derive(ToSchema)]
pub struct Created {
    conv: String,
}

/// `{"conv","user"}` for one user; `{"conv","added"}` for many.
#[allow(dead_code)]
#[derive(ToSchema)]
pub struct MembersAdded {
    conv: String,
    /// The one user added (a `user` request).
    user: Option<String>,
    /// Those who were not members yet (a `users` request).
    added: Option<Vec<String>>,
}

#[allow(dead_code)]
#[derive(ToSchema)]
pub struct MemberRemoved {
    conv: String,
    user: String,
}

#[allow(dead_code)]
#[derive(ToSchema)]
pub struct Muted {
    conv: String,
    muted: bool,
}

#[allow(dead_code)]
#[derive(ToSchema)]
pub struct ReadPosition {
    conv: String,
    /// The read seq kept (never backwards, at most the head).
    seq: u64,
}

#[allow(dead_code)]
#[derive(ToSchema)]
pub struct Occupancy {
    conv: String,
    members: u64,
    /// Members with a connected session now.
    connected: u64,
}

/// A message as subscribers and history readers get it (DESIGN §4
/// "Envelope"), in its latest version.
#[allow(dead_code)]
#[derive(ToSchema)]
pub struct DeliveredMessage {
    conv: String,
    seq: u64,
    id: String,
    from: String,
    /// Unix milliseconds.
    ts: u64,
    #[schema(rename = "type")]
    kind: String,
    /// Any JSON; null once deleted.
    body: Value,
    /// A change record's message (`message.edit`, `message.delete`).
    target: Option<u64>,
    /// `{"seq","by","ts"}` of the latest edit.
    edited: Option<Value>,
    /// The seqs of its edit records.
    edits: Option<Vec<u64>>,
    /// `{"seq","by","ts"}` of the delete.
    deleted: Option<Value>,
    /// Emoji to `{"count","mine"}`; absent when it has none.
    reactions: Option<Value>,
}

#[allow(dead_code)]
#[derive(ToSchema)]
pub struct HistoryPage {
    messages: Vec<DeliveredMessage>,
    head: u64,
    /// The first seq still kept (retention).
    first: u64,
    /// Changes when the data directory is replaced: seqs of another epoch
    /// are not comparable.
    epoch: String,
}

/// The body of a server-side send: an envelope, and `from` for the admin.
#[allow(dead_code)]
#[derive(ToSchema)]
#[schema(example = json!({"id": "m-1", "body": {"text": "hello"}}))]
pub struct NewMessage {
    /// 1 to 64 characters, unique per sender: a retry gets the same seq.
    id: String,
    /// Any JSON.
    body: Value,
    /// Default `text`; not starting with `message.`.
    #[schema(rename = "type")]
    kind: Option<String>,
    /// The admin token only: the member to send as (default `system`).
    from: Option<String>,
}

#[allow(dead_code)]
#[derive(ToSchema)]
pub struct Sent {
    conv: String,
    seq: u64,
}

/// The body of an edit.
#[allow(dead_code)]
#[derive(ToSchema)]
pub struct EditMessage {
    /// The new body: any JSON.
    body: Value,
}

#[allow(dead_code)]
#[derive(ToSchema)]
pub struct Changed {
    conv: String,
    seq: u64,
    /// The seq of the change record (the earlier one when nothing changed).
    event_seq: u64,
}

#[allow(dead_code)]
#[derive(ToSchema)]
pub struct ReactionCount {
    count: u64,
    /// The caller's own reaction.
    mine: bool,
}

#[allow(dead_code)]
#[derive(ToSchema)]
pub struct Reactions {
    conv: String,
    seq: u64,
    reactions: std::collections::BTreeMap<String, ReactionCount>,
}

#[allow(dead_code)]
#[derive(ToSchema)]
pub struct Device {
    /// `apns`, `fcm` or `webhook`.
    platform: String,
    token: String,
    app_id: Option<String>,
}

#[allow(dead_code)]
#[derive(ToSchema)]
pub struct DeviceList {
    devices: Vec<Device>,
}

#[allow(dead_code)]
#[derive(ToSchema)]
pub struct DeviceRemoved {
    platform: String,
    token: String,
}

#[allow(dead_code)]
#[derive(ToSchema)]
pub struct WebSocketConfig {
    path: String,
    /// The plain WebSocket listener's port, if on.
    port: Option<u16>,
    /// The TLS WebSocket listener's port, if on.
    tls_port: Option<u16>,
}

#[allow(dead_code)]
#[derive(ToSchema)]
pub struct ClientConfig {
    websocket: WebSocketConfig,
}

#[allow(dead_code)]
#[derive(ToSchema)]
pub struct Draining {
    /// `draining`.
    status: String,
    /// MQTT connections open when asked.
    connections: u64,
    /// Over how many seconds the clients leave.
    spread_secs: u64,
    /// The node stops at most this long after the spread.
    timeout_secs: u64,
    /// What MQTT 5 clients are told to use instead, if anything.
    server_reference: Option<String>,
}

#[allow(dead_code)]
#[derive(ToSchema)]
pub struct Reloaded {
    /// `reloaded`.
    status: String,
    /// Keys that changed but take effect only after a restart.
    restart_needed: Vec<String>,
}
