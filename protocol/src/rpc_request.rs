//! The request half of RPC over MQTT (DESIGN §4): the JSON object a client
//! publishes on `rpc/{method}`, and the typed parameters a method reads from
//! it. Parsing only: what a method does, and the reply, are the broker's
//! `chat::rpc`. Every accessor refuses a parameter of the wrong type with a
//! message naming it, so a client learns what to fix.

use serde_json::Value;

/// Why a request or one of its parameters was refused; the broker replies
/// with error code `bad_request` and this message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BadRequest(pub String);

/// The payload as a request: it must be a JSON object (serde_json's nesting
/// limit of 128 bounds the parse).
pub fn parse(payload: &[u8]) -> Result<Value, BadRequest> {
    match serde_json::from_slice(payload) {
        Ok(request @ Value::Object(_)) => Ok(request),
        _ => Err(BadRequest("the request must be a JSON object".into())),
    }
}

/// A required string parameter.
pub fn str_param<'a>(req: &'a Value, name: &str) -> Result<&'a str, BadRequest> {
    req.get(name)
        .and_then(Value::as_str)
        .ok_or_else(|| BadRequest(format!("`{name}` (a string) is required")))
}

/// An optional string parameter (absent or `null` is `None`).
pub fn opt_str_param<'a>(req: &'a Value, name: &str) -> Result<Option<&'a str>, BadRequest> {
    match req.get(name) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => v
            .as_str()
            .map(Some)
            .ok_or_else(|| BadRequest(format!("`{name}` must be a string"))),
    }
}

/// An optional sequence number, count or bound (absent or `null` is `None`).
pub fn seq_param(req: &Value, name: &str) -> Result<Option<u64>, BadRequest> {
    match req.get(name) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => v
            .as_u64()
            .map(Some)
            .ok_or_else(|| BadRequest(format!("`{name}` must be a non-negative integer"))),
    }
}

/// A flag, `default` when absent.
pub fn bool_param(req: &Value, name: &str, default: bool) -> Result<bool, BadRequest> {
    match req.get(name) {
        None => Ok(default),
        Some(v) => v
            .as_bool()
            .ok_or_else(|| BadRequest(format!("`{name}` must be true or false"))),
    }
}

/// A list of user ids (absent is empty). Their grammar is checked where
/// they are used, against the members of a conversation.
pub fn users_param(req: &Value, name: &str) -> Result<Vec<String>, BadRequest> {
    match req.get(name) {
        None => Ok(Vec::new()),
        Some(Value::Array(users)) => users
            .iter()
            .map(|u| {
                u.as_str()
                    .map(str::to_string)
                    .ok_or_else(|| BadRequest(format!("`{name}` must be user ids")))
            })
            .collect(),
        Some(_) => Err(BadRequest(format!("`{name}` must be an array of user ids"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn a_request_is_a_json_object() {
        assert!(parse(br#"{"id":1,"conv":"room"}"#).is_ok());
        for bad in [&b"[]"[..], b"\"x\"", b"1", b"{", b""] {
            assert!(parse(bad).is_err(), "{}", String::from_utf8_lossy(bad));
        }
    }

    #[test]
    fn a_deeply_nested_request_is_refused_not_overflowed() {
        let deep = format!("{{\"a\":{}{}}}", "[".repeat(100_000), "]".repeat(100_000));
        assert!(parse(deep.as_bytes()).is_err());
    }

    #[test]
    fn parameters_of_the_wrong_type_are_named_in_the_refusal() {
        let req = json!({"conv": 5, "limit": -1, "muted": "yes", "members": ["a", 2], "app_id": 3});
        assert_eq!(
            str_param(&req, "conv"),
            Err(BadRequest("`conv` (a string) is required".into()))
        );
        assert!(seq_param(&req, "limit").unwrap_err().0.contains("`limit`"));
        assert!(bool_param(&req, "muted", true).is_err());
        assert!(users_param(&req, "members").is_err());
        assert!(opt_str_param(&req, "app_id").is_err());
    }

    #[test]
    fn absent_parameters_take_their_defaults() {
        let req = json!({"after": null});
        assert_eq!(seq_param(&req, "after"), Ok(None));
        assert_eq!(seq_param(&req, "before"), Ok(None));
        assert_eq!(bool_param(&req, "muted", true), Ok(true));
        assert_eq!(users_param(&req, "members"), Ok(Vec::new()));
        assert_eq!(opt_str_param(&req, "app_id"), Ok(None));
    }
}
