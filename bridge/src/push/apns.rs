//! The APNs provider, through the `a2` crate: token auth with a .p8 key,
//! one HTTP/2 connection to Apple. Every notification is an alert
//! (`apns-push-type: alert`, priority 10, kept by Apple for a day) with the
//! conversation as collapse id and thread id. a2's builder has no
//! thread-id, so the payload a2 builds is re-serialised with `thread-id`
//! added to `aps` ([`ApnsPayload`]).
//!
//! a2 cannot be pointed at a test server, so [`ApnsProvider::payload`] and
//! [`classify`] are what the tests check.

use std::fmt;
use std::time::Duration;

use a2::request::notification::{
    CollapseId, DefaultNotificationBuilder, NotificationBuilder, NotificationOptions, Priority,
    PushType,
};
use a2::request::payload::PayloadLike;
use a2::{Client, ClientConfig, Endpoint, ErrorReason};
use chatmq_storage::Device;
use futures_util::future::BoxFuture;
use serde_json::{Map, Value};
use sha2::{Digest, Sha256};

use super::provider::{Notification, Outcome, Provider};
use super::webhook::hex;
use super::PushError;

/// How long Apple keeps trying to deliver a notification.
const EXPIRATION: Duration = Duration::from_secs(24 * 3600);
/// APNs refuses collapse ids longer than this.
const MAX_COLLAPSE_ID: usize = 64;

pub struct ApnsProvider {
    client: Client,
    topic: String,
}

/// The conversation id as a collapse id: itself if it fits APNs' 64 bytes,
/// else the hex SHA-256 of it (64 characters, still one per conversation).
pub fn collapse_id(conv: &str) -> String {
    if conv.len() <= MAX_COLLAPSE_ID {
        conv.to_string()
    } else {
        hex(&Sha256::digest(conv.as_bytes()))
    }
}

/// What a2 sends: headers from `options`, the body from `body`.
#[derive(Debug, serde::Serialize)]
pub struct ApnsPayload<'a> {
    #[serde(skip)]
    options: NotificationOptions<'a>,
    #[serde(skip)]
    token: &'a str,
    #[serde(flatten)]
    body: Map<String, Value>,
}

impl ApnsPayload<'_> {
    pub fn options(&self) -> &NotificationOptions<'_> {
        &self.options
    }

    pub fn body(&self) -> &Map<String, Value> {
        &self.body
    }
}

impl PayloadLike for ApnsPayload<'_> {
    fn get_device_token(&self) -> &str {
        self.token
    }

    fn get_options(&self) -> &NotificationOptions<'_> {
        &self.options
    }
}

impl ApnsProvider {
    pub fn new(settings: &chatmq_config::Apns) -> Result<ApnsProvider, PushError> {
        let key = std::fs::File::open(&settings.key_file).map_err(|e| PushError::Config {
            key: "push.apns.key_file",
            message: format!("{}: cannot read it: {e}", settings.key_file.display()),
        })?;
        let endpoint = if settings.sandbox {
            Endpoint::Sandbox
        } else {
            Endpoint::Production
        };
        let client = Client::token(
            key,
            settings.key_id.as_str(),
            settings.team_id.as_str(),
            ClientConfig::new(endpoint),
        )
        .map_err(|e| PushError::Config {
            key: "push.apns.key_file",
            message: format!(
                "{}: not a usable .p8 (PKCS#8 EC) key: {e}",
                settings.key_file.display()
            ),
        })?;
        Ok(ApnsProvider {
            client,
            topic: settings.topic.clone(),
        })
    }

    /// The notification for `token`: alert (sender, preview), badge,
    /// default sound, thread id and collapse id = the conversation, and
    /// the conversation and seq as custom data for the app.
    pub fn payload<'a>(
        token: &'a str,
        topic: &'a str,
        collapse: &'a str,
        note: &'a Notification,
        now_secs: u64,
    ) -> Result<ApnsPayload<'a>, a2::Error> {
        let options = NotificationOptions {
            apns_push_type: Some(PushType::Alert),
            apns_priority: Some(Priority::High),
            apns_expiration: Some(now_secs + EXPIRATION.as_secs()),
            apns_topic: Some(topic),
            apns_collapse_id: Some(CollapseId::new(collapse)?),
            ..Default::default()
        };
        let badge = u32::try_from(note.badge).unwrap_or(u32::MAX);
        let mut payload = DefaultNotificationBuilder::new()
            .set_title(&note.from)
            .set_body(&note.preview)
            .set_badge(badge)
            .set_sound("default")
            .build(token, options);
        payload.add_custom_data("conv", &note.conv)?;
        payload.add_custom_data("seq", &note.seq)?;
        payload.add_custom_data("count", &note.count)?;
        let mut body = match serde_json::to_value(&payload)? {
            Value::Object(map) => map,
            _ => Map::new(),
        };
        if let Some(Value::Object(aps)) = body.get_mut("aps") {
            aps.insert("thread-id".into(), Value::String(note.conv.clone()));
        }
        Ok(ApnsPayload {
            options: payload.options,
            token,
            body,
        })
    }

    async fn post(&self, device: &Device, note: &Notification) -> Outcome {
        let collapse = collapse_id(&note.conv);
        let now = jsonwebtoken::get_current_timestamp();
        match Self::payload(&device.token, &self.topic, &collapse, note, now) {
            Ok(payload) => classify(self.client.send(payload).await),
            Err(e) => Outcome::Rejected(format!("cannot build the APNs payload: {e}")),
        }
    }
}

/// The outcome of an a2 send: a dead token (410, BadDeviceToken,
/// Unregistered, DeviceTokenNotForTopic) deletes the device; 429, 5xx and
/// connection trouble retry; anything else is a rejection.
pub fn classify(result: Result<a2::Response, a2::Error>) -> Outcome {
    let response = match result {
        Ok(_) => return Outcome::Sent,
        Err(a2::Error::ResponseError(r)) => r,
        Err(
            e @ (a2::Error::ConnectionError(_)
            | a2::Error::ClientError(_)
            | a2::Error::RequestTimeout(_)),
        ) => {
            return Outcome::Retry {
                after: None,
                reason: format!("APNs: {e}"),
            }
        }
        Err(e) => return Outcome::Rejected(format!("APNs: {e}")),
    };
    let reason = response.error.as_ref().map(|e| &e.reason);
    let why = Why(response.code, reason);
    let dead = matches!(
        reason,
        Some(
            ErrorReason::BadDeviceToken
                | ErrorReason::Unregistered
                | ErrorReason::DeviceTokenNotForTopic
        )
    );
    if response.code == 410 || dead {
        Outcome::InvalidToken(why.to_string())
    } else if response.code == 429 || response.code >= 500 {
        Outcome::Retry {
            after: None,
            reason: why.to_string(),
        }
    } else {
        Outcome::Rejected(why.to_string())
    }
}

struct Why<'a>(u16, Option<&'a ErrorReason>);

impl fmt::Display for Why<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.1 {
            Some(r) => write!(f, "APNs said {} {r}", self.0),
            None => write!(f, "APNs said {}", self.0),
        }
    }
}

impl Provider for ApnsProvider {
    fn send<'a>(&'a self, device: &'a Device, note: &'a Notification) -> BoxFuture<'a, Outcome> {
        Box::pin(self.post(device, note))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use a2::{ErrorBody, Response};
    use serde_json::json;

    fn note(conv: &str) -> Notification {
        Notification {
            user: "bob".into(),
            conv: conv.into(),
            count: 3,
            seq: 42,
            from: "alice".into(),
            preview: "see you at 8".into(),
            badge: 7,
        }
    }

    fn refused(code: u16, reason: Option<ErrorReason>) -> Outcome {
        classify(Err(a2::Error::ResponseError(Response {
            error: reason.map(|reason| ErrorBody {
                reason,
                timestamp: None,
            }),
            apns_id: None,
            code,
        })))
    }

    #[test]
    fn the_payload_carries_alert_badge_thread_and_collapse_ids() {
        let n = note("team");
        let payload = ApnsProvider::payload("abcd", "com.example.chat", "team", &n, 1000).unwrap();
        let body = Value::Object(payload.body().clone());
        assert_eq!(
            body,
            json!({
                "aps": {
                    "alert": {"title": "alice", "body": "see you at 8"},
                    "badge": 7,
                    "sound": "default",
                    "mutable-content": 0,
                    "thread-id": "team",
                },
                "conv": "team",
                "seq": 42,
                "count": 3,
            })
        );
        let o = payload.options();
        assert_eq!(o.apns_topic, Some("com.example.chat"));
        assert_eq!(o.apns_collapse_id.as_ref().map(|c| c.value), Some("team"));
        assert_eq!(o.apns_expiration, Some(1000 + 24 * 3600));
        assert!(matches!(o.apns_push_type, Some(PushType::Alert)));
        assert!(matches!(o.apns_priority, Some(Priority::High)));
        assert_eq!(payload.get_device_token(), "abcd");
        // What a2 puts on the wire is this body.
        let wire: Value = serde_json::from_str(&payload.to_json_string().unwrap()).unwrap();
        assert_eq!(wire, body);
    }

    #[test]
    fn long_conversation_ids_get_a_collapse_id_apns_accepts() {
        let conv = "c".repeat(128);
        let id = collapse_id(&conv);
        assert_eq!(id.len(), 64);
        assert_ne!(id, collapse_id(&"d".repeat(128)));
        assert_eq!(collapse_id("dm:a:b"), "dm:a:b");
        let n = note(&conv);
        let payload = ApnsProvider::payload("t", "topic", &id, &n, 0).unwrap();
        assert_eq!(payload.body()["aps"]["thread-id"], json!(conv));
    }

    #[test]
    fn dead_tokens_retries_and_rejections_are_told_apart() {
        assert!(matches!(
            refused(410, Some(ErrorReason::Unregistered)),
            Outcome::InvalidToken(_)
        ));
        assert!(matches!(refused(410, None), Outcome::InvalidToken(_)));
        assert!(matches!(
            refused(400, Some(ErrorReason::BadDeviceToken)),
            Outcome::InvalidToken(_)
        ));
        assert!(matches!(
            refused(400, Some(ErrorReason::DeviceTokenNotForTopic)),
            Outcome::InvalidToken(_)
        ));
        assert!(matches!(
            refused(429, Some(ErrorReason::TooManyRequests)),
            Outcome::Retry { .. }
        ));
        assert!(matches!(
            refused(500, Some(ErrorReason::InternalServerError)),
            Outcome::Retry { .. }
        ));
        assert!(matches!(
            refused(503, Some(ErrorReason::ServiceUnavailable)),
            Outcome::Retry { .. }
        ));
        assert!(matches!(
            refused(400, Some(ErrorReason::PayloadEmpty)),
            Outcome::Rejected(_)
        ));
        assert!(matches!(
            refused(403, Some(ErrorReason::InvalidProviderToken)),
            Outcome::Rejected(_)
        ));
        assert!(matches!(
            classify(Err(a2::Error::RequestTimeout(20))),
            Outcome::Retry { .. }
        ));
        assert!(matches!(
            classify(Ok(Response {
                error: None,
                apns_id: None,
                code: 200
            })),
            Outcome::Sent
        ));
    }

    #[test]
    fn a_p8_key_builds_a_client_and_a_bad_file_names_the_key() {
        let dir = tempfile::tempdir().unwrap();
        let key = dir.path().join("AuthKey.p8");
        let status = std::process::Command::new("openssl")
            .args([
                "genpkey",
                "-algorithm",
                "EC",
                "-pkeyopt",
                "ec_paramgen_curve:P-256",
                "-out",
            ])
            .arg(&key)
            .status()
            .expect("openssl");
        assert!(status.success());
        let mut settings = chatmq_config::Apns {
            key_file: key,
            key_id: "ABC123".into(),
            team_id: "TEAM".into(),
            topic: "com.example.chat".into(),
            sandbox: true,
        };
        assert!(ApnsProvider::new(&settings).is_ok());
        settings.key_file = dir.path().join("missing.p8");
        let err = ApnsProvider::new(&settings).err().unwrap().to_string();
        assert!(err.starts_with("push.apns.key_file"), "{err}");
        std::fs::write(dir.path().join("junk.p8"), "not a key").unwrap();
        settings.key_file = dir.path().join("junk.p8");
        let err = ApnsProvider::new(&settings).err().unwrap().to_string();
        assert!(err.contains("not a usable .p8"), "{err}");
    }
}
