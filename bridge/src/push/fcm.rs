//! The FCM provider: Firebase Cloud Messaging's HTTP v1 API, authorised
//! by a service account's OAuth2 JWT-bearer flow (an RS256 assertion
//! exchanged at the token URI for an access token, cached until a minute
//! before it expires).
//!
//! Error policy: UNREGISTERED (404), or INVALID_ARGUMENT about the token,
//! deletes the device; 401 drops the cached access token and retries; 429
//! and 5xx retry; anything else is a rejection. An `http://` base URL
//! (tests) is spoken as HTTP/2 with prior knowledge; `https://` negotiates
//! HTTP/2 by ALPN. One client, so one connection per host, multiplexed.

use std::time::{Duration, Instant};

use chatmq_storage::Device;
use futures_util::future::BoxFuture;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use reqwest::StatusCode;
use serde::Deserialize;
use serde_json::{json, Value};

use super::provider::{retryable, short, Notification, Outcome, Provider};
use super::PushError;

/// The OAuth2 scope FCM sends need.
pub const SCOPE: &str = "https://www.googleapis.com/auth/firebase.messaging";
pub const GRANT_TYPE: &str = "urn:ietf:params:oauth:grant-type:jwt-bearer";
const TIMEOUT: Duration = Duration::from_secs(10);
/// An access token is renewed this long before it expires.
const RENEW_BEFORE: Duration = Duration::from_secs(60);

#[derive(Deserialize)]
struct ServiceAccount {
    project_id: Option<String>,
    client_email: String,
    private_key: String,
    token_uri: Option<String>,
}

#[derive(Deserialize)]
struct TokenResponse {
    access_token: String,
    expires_in: u64,
}

pub struct FcmProvider {
    client: reqwest::Client,
    send_url: String,
    token_uri: String,
    client_email: String,
    key: EncodingKey,
    /// The access token and when to renew it.
    token: tokio::sync::Mutex<Option<(String, Instant)>>,
}

/// Why no access token could be had: retry later, or give up.
enum TokenError {
    Retry(String),
    Refused(String),
}

impl FcmProvider {
    pub fn new(settings: &chatmq_config::Fcm) -> Result<FcmProvider, PushError> {
        let key_err = |message: String| PushError::Config {
            key: "push.fcm.service_account_file",
            message: format!("{}: {message}", settings.service_account_file.display()),
        };
        let text = std::fs::read_to_string(&settings.service_account_file)
            .map_err(|e| key_err(format!("cannot read it: {e}")))?;
        let account: ServiceAccount = serde_json::from_str(&text).map_err(|e| {
            key_err(format!(
                "not a service account JSON (client_email, private_key): {e}"
            ))
        })?;
        let key = EncodingKey::from_rsa_pem(account.private_key.as_bytes())
            .map_err(|e| key_err(format!("private_key is not an RSA PEM key: {e}")))?;
        let project_id = settings
            .project_id
            .clone()
            .or(account.project_id)
            .ok_or_else(|| {
                key_err("no project_id in it, and push.fcm.project_id is not set".into())
            })?;
        let token_uri = settings
            .token_uri
            .clone()
            .or(account.token_uri)
            .unwrap_or_else(|| "https://oauth2.googleapis.com/token".to_string());
        let mut builder = reqwest::Client::builder().timeout(TIMEOUT);
        if settings.base_url.starts_with("http://") {
            builder = builder.http2_prior_knowledge();
        }
        let client = builder.build().map_err(|e| PushError::Config {
            key: "push.fcm",
            message: format!("cannot build an HTTP client: {e}"),
        })?;
        Ok(FcmProvider {
            client,
            send_url: format!(
                "{}/v1/projects/{project_id}/messages:send",
                settings.base_url.trim_end_matches('/')
            ),
            token_uri,
            client_email: account.client_email,
            key,
            token: tokio::sync::Mutex::new(None),
        })
    }

    /// The signed JWT the token endpoint exchanges for an access token.
    fn assertion(&self) -> Result<String, jsonwebtoken::errors::Error> {
        let iat = jsonwebtoken::get_current_timestamp();
        let claims = json!({
            "iss": self.client_email,
            "scope": SCOPE,
            "aud": self.token_uri,
            "iat": iat,
            "exp": iat + 3600,
        });
        jsonwebtoken::encode(&Header::new(Algorithm::RS256), &claims, &self.key)
    }

    async fn access_token(&self) -> Result<String, TokenError> {
        let mut cached = self.token.lock().await;
        if let Some((token, renew_at)) = cached.as_ref() {
            if Instant::now() < *renew_at {
                return Ok(token.clone());
            }
        }
        let assertion = self
            .assertion()
            .map_err(|e| TokenError::Refused(format!("cannot sign the OAuth2 assertion: {e}")))?;
        let response = self
            .client
            .post(&self.token_uri)
            .form(&[
                ("grant_type", GRANT_TYPE),
                ("assertion", assertion.as_str()),
            ])
            .send()
            .await
            .map_err(|e| TokenError::Retry(format!("token endpoint unreachable: {e}")))?;
        let status = response.status();
        let text = response.text().await.unwrap_or_default();
        if !status.is_success() {
            let why = format!("token endpoint said {status}: {}", short(&text));
            return Err(
                match status == StatusCode::TOO_MANY_REQUESTS || status.is_server_error() {
                    true => TokenError::Retry(why),
                    false => TokenError::Refused(why),
                },
            );
        }
        let token: TokenResponse = serde_json::from_str(&text).map_err(|e| {
            TokenError::Refused(format!("token endpoint answered {e}: {}", short(&text)))
        })?;
        let lifetime = Duration::from_secs(token.expires_in).saturating_sub(RENEW_BEFORE);
        *cached = Some((token.access_token.clone(), Instant::now() + lifetime));
        Ok(token.access_token)
    }

    /// The v1 `messages:send` body. Collapse and thread ids are the
    /// conversation, so the phone groups a conversation's notifications.
    pub fn message(device: &Device, note: &Notification) -> Value {
        json!({"message": {
            "token": device.token,
            "notification": {"title": note.from, "body": note.preview},
            "data": {
                "conv": note.conv,
                "seq": note.seq.to_string(),
                "count": note.count.to_string(),
                "from": note.from,
            },
            "android": {
                "collapse_key": note.conv,
                "notification": {"tag": note.conv, "notification_count": note.count},
            },
            "apns": {
                "headers": {"apns-collapse-id": super::apns::collapse_id(&note.conv)},
                "payload": {"aps": {"badge": note.badge, "thread-id": note.conv}},
            },
        }})
    }

    async fn post(&self, device: &Device, note: &Notification) -> Outcome {
        let token = match self.access_token().await {
            Ok(t) => t,
            Err(TokenError::Retry(reason)) => {
                return Outcome::Retry {
                    after: None,
                    reason,
                }
            }
            Err(TokenError::Refused(reason)) => return Outcome::Rejected(reason),
        };
        let response = match self
            .client
            .post(&self.send_url)
            .bearer_auth(token)
            .json(&Self::message(device, note))
            .send()
            .await
        {
            Ok(r) => r,
            Err(e) => {
                return Outcome::Retry {
                    after: None,
                    reason: format!("FCM unreachable: {e}"),
                }
            }
        };
        let status = response.status();
        if status.is_success() {
            return Outcome::Sent;
        }
        let headers = response.headers().clone();
        let text = response.text().await.unwrap_or_default();
        if status == StatusCode::UNAUTHORIZED {
            *self.token.lock().await = None;
            return Outcome::Retry {
                after: None,
                reason: "FCM refused the access token; a new one will be fetched".into(),
            };
        }
        classify(status, &headers, &text)
    }
}

/// The outcome of a failed v1 send, from its status and error body.
pub(super) fn classify(
    status: StatusCode,
    headers: &reqwest::header::HeaderMap,
    body: &str,
) -> Outcome {
    if let Some(retry) = retryable(status, headers, body) {
        return retry;
    }
    let error: Value = serde_json::from_str(body).unwrap_or(Value::Null);
    let details = error["error"]["details"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    let code =
        |c: &str| details.iter().any(|d| d["errorCode"] == c) || error["error"]["status"] == c;
    let about_token = details.iter().any(|d| {
        d["fieldViolations"]
            .as_array()
            .is_some_and(|v| v.iter().any(|f| f["field"] == "message.token"))
    });
    if code("UNREGISTERED") || (code("INVALID_ARGUMENT") && about_token) {
        return Outcome::InvalidToken(format!("FCM said {status}: {}", short(body)));
    }
    Outcome::Rejected(format!("FCM said {status}: {}", short(body)))
}

impl Provider for FcmProvider {
    fn send<'a>(&'a self, device: &'a Device, note: &'a Notification) -> BoxFuture<'a, Outcome> {
        Box::pin(self.post(device, note))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use reqwest::header::HeaderMap;

    fn fcm_error(status: &str, detail: Value) -> String {
        json!({"error": {"code": 400, "message": "x", "status": status, "details": [detail]}})
            .to_string()
    }

    #[test]
    fn dead_tokens_are_told_from_other_refusals() {
        let h = HeaderMap::new();
        let unregistered = fcm_error(
            "NOT_FOUND",
            json!({"@type": "type.googleapis.com/google.firebase.fcm.v1.FcmError", "errorCode": "UNREGISTERED"}),
        );
        assert!(matches!(
            classify(StatusCode::NOT_FOUND, &h, &unregistered),
            Outcome::InvalidToken(_)
        ));
        let bad_token = fcm_error(
            "INVALID_ARGUMENT",
            json!({"@type": "type.googleapis.com/google.rpc.BadRequest", "fieldViolations": [{"field": "message.token", "description": "Invalid registration token"}]}),
        );
        assert!(matches!(
            classify(StatusCode::BAD_REQUEST, &h, &bad_token),
            Outcome::InvalidToken(_)
        ));
        let bad_payload = fcm_error(
            "INVALID_ARGUMENT",
            json!({"@type": "type.googleapis.com/google.rpc.BadRequest", "fieldViolations": [{"field": "message.data"}]}),
        );
        assert!(matches!(
            classify(StatusCode::BAD_REQUEST, &h, &bad_payload),
            Outcome::Rejected(_)
        ));
        assert!(matches!(
            classify(StatusCode::FORBIDDEN, &h, "no"),
            Outcome::Rejected(_)
        ));
        assert!(matches!(
            classify(StatusCode::SERVICE_UNAVAILABLE, &h, ""),
            Outcome::Retry { .. }
        ));
    }
}
