//! The webhook provider: POSTs the notification as JSON to the operator's
//! service (`push.webhook.url`), which delivers it however it likes. With
//! `push.webhook.secret` the request carries
//! `X-Chatmq-Signature: sha256=<hex HMAC-SHA256 of the body>`.
//!
//! Status policy: 2xx sent; 410 Gone means the token is dead (the device
//! is deleted); 429 and 5xx retry; anything else is a rejection.

use std::time::Duration;

use chatmq_storage::Device;
use futures_util::future::BoxFuture;
use hmac::{Hmac, Mac};
use reqwest::StatusCode;
use serde_json::json;
use sha2::Sha256;

use super::provider::{retryable, short, Notification, Outcome, Provider};
use super::PushError;

/// The signature header.
pub const SIGNATURE_HEADER: &str = "X-Chatmq-Signature";
const TIMEOUT: Duration = Duration::from_secs(10);

pub struct WebhookProvider {
    client: reqwest::Client,
    url: String,
    secret: Option<Vec<u8>>,
}

impl WebhookProvider {
    pub fn new(settings: &chatmq_config::Webhook) -> Result<WebhookProvider, PushError> {
        let client = reqwest::Client::builder()
            .timeout(TIMEOUT)
            .build()
            .map_err(|e| PushError::Config {
                key: "push.webhook",
                message: format!("cannot build an HTTP client: {e}"),
            })?;
        Ok(WebhookProvider {
            client,
            url: settings.url.clone(),
            secret: settings.secret.as_ref().map(|s| s.as_bytes().to_vec()),
        })
    }

    /// The documented body:
    /// `{"user","platform","token","conv","count","preview":{"from","body"}}`.
    pub fn body(device: &Device, note: &Notification) -> Vec<u8> {
        json!({
            "user": note.user,
            "platform": device.platform,
            "token": device.token,
            "conv": note.conv,
            "count": note.count,
            "preview": {"from": note.from, "body": note.preview},
        })
        .to_string()
        .into_bytes()
    }

    async fn post(&self, device: &Device, note: &Notification) -> Outcome {
        let body = Self::body(device, note);
        let mut request = self
            .client
            .post(&self.url)
            .header(reqwest::header::CONTENT_TYPE, "application/json");
        if let Some(secret) = &self.secret {
            request = request.header(SIGNATURE_HEADER, signature(secret, &body));
        }
        let response = match request.body(body).send().await {
            Ok(r) => r,
            Err(e) => {
                return Outcome::Retry {
                    after: None,
                    reason: format!("webhook unreachable: {e}"),
                }
            }
        };
        let status = response.status();
        if status.is_success() {
            return Outcome::Sent;
        }
        let headers = response.headers().clone();
        let text = response.text().await.unwrap_or_default();
        if let Some(retry) = retryable(status, &headers, &text) {
            return retry;
        }
        if status == StatusCode::GONE {
            return Outcome::InvalidToken(format!("webhook said 410 Gone: {}", short(&text)));
        }
        Outcome::Rejected(format!("webhook said {status}: {}", short(&text)))
    }
}

impl Provider for WebhookProvider {
    fn send<'a>(&'a self, device: &'a Device, note: &'a Notification) -> BoxFuture<'a, Outcome> {
        Box::pin(self.post(device, note))
    }
}

/// `sha256=<hex HMAC-SHA256 of body under secret>`.
pub fn signature(secret: &[u8], body: &[u8]) -> String {
    // HMAC takes a key of any length: this cannot fail.
    let mut mac = match Hmac::<Sha256>::new_from_slice(secret) {
        Ok(m) => m,
        Err(_) => return String::new(),
    };
    mac.update(body);
    format!("sha256={}", hex(&mac.finalize().into_bytes()))
}

pub(super) fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_signature_is_the_rfc_4231_hmac() {
        // RFC 4231 test case 2.
        assert_eq!(
            signature(b"Jefe", b"what do ya want for nothing?"),
            "sha256=5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }
}
