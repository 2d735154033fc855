//! RPC over MQTT (DESIGN §4): a request `{"id": ..., ...params}` published
//! on `rpc/{method}`, a reply `{"type":"rpc","id":...,"ok":...}`. The same
//! operations back the HTTP API. The request and its parameters are parsed
//! by `chatmq_protocol::rpc_request`, which the fuzz targets exercise.
//!
//! A reply goes to `users/{me}/events`, or to the MQTT 5 Response Topic
//! when the requester may publish there itself: a plain topic its ACL
//! grants, or its own events topic. Any other Response Topic refuses the
//! request unrun, so a reply can never carry the server's voice where the
//! requester has none. The correlation `id` echoed back is a string of at
//! most [`MAX_ID_BYTES`]; a request with another `id` is refused unrun.

use chatmq_bridge::push::{Platform, Push, PushError};
use chatmq_cluster::wire::MetaRecord;
use chatmq_protocol::rpc_request::{
    self, bool_param, opt_str_param, seq_param, str_param, users_param, BadRequest,
};
use chatmq_storage::Device;
use serde_json::{json, Value};

use super::edits::Editor;
use super::namespace::{self, classify, Topic};
use super::{Chat, RpcError};
use crate::access::Acl;
use crate::topic::valid_topic;

/// The longest correlation `id` a request may carry (it is echoed back).
pub const MAX_ID_BYTES: usize = 128;

/// Where the reply to a request goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReplyRoute {
    /// The MQTT 5 Response Topic, a plain topic the requester may publish to.
    ResponseTopic(String),
    /// `users/{me}/events`.
    Events,
    /// A Response Topic the requester may not publish to: the request is
    /// refused (PUBACK 0x87) and not run.
    Refused,
}

/// Where `user`'s reply goes, given the request's Response Topic.
pub fn reply_route(
    acl: &Acl,
    user: &str,
    client_id: &str,
    response_topic: Option<&str>,
) -> ReplyRoute {
    let Some(t) = response_topic else {
        return ReplyRoute::Events;
    };
    if !valid_topic(t) {
        return ReplyRoute::Refused;
    }
    match classify(t) {
        Topic::Plain if acl.can_publish(Some(user), client_id, t) => {
            ReplyRoute::ResponseTopic(t.to_string())
        }
        Topic::Events(owner) if owner == user => ReplyRoute::Events,
        _ => ReplyRoute::Refused,
    }
}

/// The reply (on `users/{me}/events`) to a request refused for its
/// Response Topic.
pub fn refused_response_topic(payload: &[u8]) -> Value {
    let id = serde_json::from_slice::<Value>(payload)
        .ok()
        .and_then(|request| correlation_id(&request).ok())
        .unwrap_or(Value::Null);
    reply(
        id,
        Err(RpcError::new(
            "forbidden",
            "the Response Topic is not one you may publish to; the request was not run",
        )),
    )
}

/// The request's `id` to echo: absent (null) or a string of at most
/// [`MAX_ID_BYTES`].
fn correlation_id(request: &Value) -> Result<Value, RpcError> {
    match request.get("id") {
        None | Some(Value::Null) => Ok(Value::Null),
        Some(Value::String(id)) if id.len() <= MAX_ID_BYTES => Ok(Value::String(id.clone())),
        Some(_) => Err(RpcError::bad(format!(
            "`id` must be a string of at most {MAX_ID_BYTES} bytes"
        ))),
    }
}

/// Runs `method` for `user` and returns the reply to send back.
pub async fn call(chat: &Chat, user: &str, method: &str, payload: &[u8]) -> Value {
    let request = match rpc_request::parse(payload) {
        Ok(request) => request,
        Err(bad) => return reply(Value::Null, Err(bad.into())),
    };
    match correlation_id(&request) {
        Ok(id) => reply(id, dispatch(chat, user, method, &request).await),
        Err(e) => reply(Value::Null, Err(e)),
    }
}

fn reply(id: Value, result: Result<Value, RpcError>) -> Value {
    match result {
        Ok(result) => json!({"type": "rpc", "id": id, "ok": true, "result": result}),
        Err(e) => {
            json!({"type": "rpc", "id": id, "ok": false, "error": {"code": e.code, "message": e.message}})
        }
    }
}

impl From<BadRequest> for RpcError {
    fn from(BadRequest(why): BadRequest) -> Self {
        RpcError::bad(why)
    }
}

/// The conversation named in the request, which `user` must be a member of.
fn member_conv<'a>(chat: &Chat, user: &str, req: &'a Value) -> Result<&'a str, RpcError> {
    let conv = str_param(req, "conv")?;
    if !namespace::valid_conv(conv) {
        return Err(RpcError::bad("`conv` is not a valid conversation id"));
    }
    if !chat.is_member(conv, user) {
        return Err(RpcError::new(
            "not_member",
            "you are not a member of this conversation",
        ));
    }
    Ok(conv)
}

/// The message `seq` a change names.
fn required_seq(req: &Value) -> Result<u64, RpcError> {
    seq_param(req, "seq")?.ok_or_else(|| RpcError::bad("`seq` is required"))
}

fn platform(name: &str) -> Result<Platform, RpcError> {
    Platform::parse(name).ok_or_else(|| RpcError::bad("`platform` must be apns, fcm or webhook"))
}

/// Registers a device of `user` (RPC and HTTP); a token registered to
/// another user moves to this one. With `[cluster]`, through the records
/// stream: every node has every device, so the node that sequences a
/// message (and queues its pushes) knows the devices registered on others.
pub async fn register_device(
    chat: &Chat,
    user: &str,
    platform_name: &str,
    token: &str,
    app_id: Option<&str>,
) -> Result<Device, RpcError> {
    let platform = platform(platform_name)?;
    let Some(r) = chat.replicated() else {
        return chat
            .push
            .register(user, platform, token, app_id)
            .await
            .map_err(push_error);
    };
    Push::check_device(token, app_id).map_err(push_error)?;
    let record = MetaRecord::Device {
        user: user.to_string(),
        platform: platform.as_str().to_string(),
        token: token.to_string(),
        app_id: app_id.map(str::to_string),
        registered: true,
    };
    chat.replicate_meta(&r, record).await?;
    Ok(Device {
        platform: platform.as_str().to_string(),
        token: token.to_string(),
        app_id: app_id.map(str::to_string),
    })
}

/// Forgets a device of `user`; `not_found` if it is not one of theirs.
pub async fn unregister_device(
    chat: &Chat,
    user: &str,
    platform_name: &str,
    token: &str,
) -> Result<(), RpcError> {
    let platform = platform(platform_name)?;
    let not_found = || RpcError::new("not_found", "no such device of yours");
    let Some(r) = chat.replicated() else {
        return match chat.push.unregister(user, platform, token).await {
            Ok(true) => Ok(()),
            Ok(false) => Err(not_found()),
            Err(e) => Err(push_error(e)),
        };
    };
    if !chat.push.has_device(user, platform, token)? {
        return Err(not_found());
    }
    let record = MetaRecord::Device {
        user: user.to_string(),
        platform: platform.as_str().to_string(),
        token: token.to_string(),
        app_id: None,
        registered: false,
    };
    chat.replicate_meta(&r, record).await
}

/// Mutes or unmutes `conv`'s notifications for `user` (RPC and HTTP); with
/// `[cluster]`, on every node, through the records stream.
pub async fn set_muted(chat: &Chat, user: &str, conv: &str, muted: bool) -> Result<(), RpcError> {
    let Some(r) = chat.replicated() else {
        chat.push.set_muted(user, conv, muted).await?;
        return Ok(());
    };
    let record = MetaRecord::Mute {
        user: user.to_string(),
        conv: conv.to_string(),
        muted,
    };
    chat.replicate_meta(&r, record).await
}

/// The devices of `user`, as JSON.
pub fn list_devices(chat: &Chat, user: &str) -> Result<Vec<Value>, RpcError> {
    Ok(chat.push.devices(user)?.iter().map(device_json).collect())
}

pub fn device_json(d: &Device) -> Value {
    json!({"platform": d.platform, "token": d.token, "app_id": d.app_id})
}

fn push_error(e: PushError) -> RpcError {
    match e {
        PushError::Invalid(why) => RpcError::bad(why),
        PushError::Storage(e) => e.into(),
        PushError::Config { .. } => RpcError::new("internal", e.to_string()),
    }
}

async fn dispatch(chat: &Chat, user: &str, method: &str, req: &Value) -> Result<Value, RpcError> {
    match method {
        "history" => {
            let conv = member_conv(chat, user, req)?;
            let limit = seq_param(req, "limit")?.unwrap_or(50) as usize;
            chat.history(
                conv,
                seq_param(req, "after")?,
                seq_param(req, "before")?,
                limit,
                Some(user),
            )
            .await
        }
        "message.edit" => {
            let conv = member_conv(chat, user, req)?;
            let seq = required_seq(req)?;
            let body = req
                .get("body")
                .ok_or_else(|| RpcError::bad("`body` is required"))?;
            let changed = chat
                .edit_message(conv, seq, Editor::User(user), body)
                .await?;
            Ok(changed.json(conv))
        }
        "message.delete" => {
            let conv = member_conv(chat, user, req)?;
            let seq = required_seq(req)?;
            let changed = chat.delete_message(conv, seq, Editor::User(user)).await?;
            Ok(changed.json(conv))
        }
        "reaction.add" | "reaction.remove" => {
            let conv = member_conv(chat, user, req)?;
            let seq = required_seq(req)?;
            let emoji = str_param(req, "emoji")?;
            let add = method == "reaction.add";
            let reactions = chat.react(conv, seq, user, emoji, add).await?;
            Ok(json!({"conv": conv, "seq": seq, "reactions": reactions}))
        }
        "occupancy" => {
            let conv = member_conv(chat, user, req)?;
            Ok(chat.occupancy(conv))
        }
        "conversations" => chat.list(user).await,
        "conversation.create" => {
            let conv = match req.get("conv").and_then(Value::as_str) {
                Some(c) => c.to_string(),
                None => chat.fresh_conv_id(),
            };
            let title = req.get("title").and_then(Value::as_str).unwrap_or_default();
            let members = users_param(req, "members")?;
            chat.create(&conv, title, Some(user), &members).await?;
            Ok(json!({"conv": conv}))
        }
        "conversation.add" => {
            let conv = str_param(req, "conv")?;
            // `user` adds one; `users` many with one write.
            let users = match req.get("users") {
                Some(_) => users_param(req, "users")?,
                None => vec![str_param(req, "user")?.to_string()],
            };
            let added = chat.add_members(conv, &users, Some(user)).await?;
            let added: Vec<&str> = added.iter().map(|u| &**u).collect();
            Ok(json!({"added": added}))
        }
        "conversation.remove" => {
            let conv = str_param(req, "conv")?;
            chat.remove_member(conv, str_param(req, "user")?, Some(user))
                .await?;
            Ok(json!({}))
        }
        "read" => {
            let conv = member_conv(chat, user, req)?;
            let seq = seq_param(req, "seq")?.ok_or_else(|| RpcError::bad("`seq` is required"))?;
            let seq = chat.mark_read(user, conv, seq).await?;
            Ok(json!({"conv": conv, "seq": seq}))
        }
        "conversation.mute" => {
            let conv = member_conv(chat, user, req)?;
            let muted = bool_param(req, "muted", true)?;
            set_muted(chat, user, conv, muted).await?;
            Ok(json!({"conv": conv, "muted": muted}))
        }
        "device.register" => {
            let app_id = opt_str_param(req, "app_id")?;
            let device = register_device(
                chat,
                user,
                str_param(req, "platform")?,
                str_param(req, "token")?,
                app_id,
            )
            .await?;
            Ok(device_json(&device))
        }
        "device.unregister" => {
            unregister_device(
                chat,
                user,
                str_param(req, "platform")?,
                str_param(req, "token")?,
            )
            .await?;
            Ok(json!({}))
        }
        "device.list" => Ok(json!({"devices": list_devices(chat, user)?})),
        other => Err(RpcError::new(
            "unknown_method",
            format!("no method `{other}`"),
        )),
    }
}
