//! RPC over MQTT (DESIGN §4): a request `{"id": ..., ...params}` published
//! on `rpc/{method}`, a reply `{"type":"rpc","id":...,"ok":...}`. The same
//! operations back the HTTP API.

use serde_json::{json, Value};

use super::{namespace, Chat, RpcError};

/// Runs `method` for `user` and returns the reply to send back.
pub async fn call(chat: &Chat, user: &str, method: &str, payload: &[u8]) -> Value {
    let request: Value = match serde_json::from_slice(payload) {
        Ok(v @ Value::Object(_)) => v,
        _ => {
            return reply(
                Value::Null,
                Err(RpcError::bad("the request must be a JSON object")),
            )
        }
    };
    let id = request.get("id").cloned().unwrap_or(Value::Null);
    reply(id, dispatch(chat, user, method, &request).await)
}

fn reply(id: Value, result: Result<Value, RpcError>) -> Value {
    match result {
        Ok(result) => json!({"type": "rpc", "id": id, "ok": true, "result": result}),
        Err(e) => {
            json!({"type": "rpc", "id": id, "ok": false, "error": {"code": e.code, "message": e.message}})
        }
    }
}

fn str_param<'a>(req: &'a Value, name: &str) -> Result<&'a str, RpcError> {
    req.get(name)
        .and_then(Value::as_str)
        .ok_or_else(|| RpcError::bad(format!("`{name}` (a string) is required")))
}

fn seq_param(req: &Value, name: &str) -> Result<Option<u64>, RpcError> {
    match req.get(name) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => v
            .as_u64()
            .map(Some)
            .ok_or_else(|| RpcError::bad(format!("`{name}` must be a non-negative integer"))),
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
            )
            .await
        }
        "conversations" => chat.list(user).await,
        "conversation.create" => {
            let conv = match req.get("conv").and_then(Value::as_str) {
                Some(c) => c.to_string(),
                None => chat.fresh_conv_id(),
            };
            let title = req.get("title").and_then(Value::as_str).unwrap_or_default();
            let members: Vec<String> = match req.get("members") {
                None => Vec::new(),
                Some(Value::Array(a)) => a
                    .iter()
                    .map(|m| {
                        m.as_str()
                            .map(str::to_string)
                            .ok_or_else(|| RpcError::bad("`members` must be user ids"))
                    })
                    .collect::<Result<_, _>>()?,
                Some(_) => return Err(RpcError::bad("`members` must be an array of user ids")),
            };
            chat.create(&conv, title, Some(user), &members).await?;
            Ok(json!({"conv": conv}))
        }
        "conversation.add" => {
            let conv = str_param(req, "conv")?;
            chat.add_member(conv, str_param(req, "user")?, Some(user))
                .await?;
            Ok(json!({}))
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
        other => Err(RpcError::new(
            "unknown_method",
            format!("no method `{other}`"),
        )),
    }
}
