//! The APNs provider: Apple's HTTP/2 provider API (`POST
//! /3/device/<token>`) through the same HTTP client as FCM (reqwest on
//! rustls, HTTP/2 only), authorised by a provider token: an ES256 JWT
//! (`kid` = key id, `iss` = team id, `iat`) signed with the team's .p8 key.
//!
//! Every notification is an alert (`apns-push-type: alert`, priority 10,
//! kept by Apple for a day) with the conversation as collapse id and
//! thread id. The endpoint is Apple's production or sandbox host, or
//! `push.apns.endpoint` (a proxy, a test server), trusting the CAs of
//! `push.apns.ca_file` besides the public roots.
//!
//! Provider token: one is signed and reused for [`TOKEN_LIFETIME`]
//! (Apple refuses a token older than an hour, and refuses new tokens more
//! often than one per 20 minutes). A 403 ExpiredProviderToken or
//! InvalidProviderToken signs a new one and sends again, once.
//!
//! Error policy: 410 (Unregistered, ExpiredToken), BadDeviceToken and
//! DeviceTokenNotForTopic delete the device; 429 and 5xx retry (honouring
//! Retry-After), as do connection errors and timeouts; anything else is a
//! rejection.

use std::time::Duration;

use chatmq_storage::Device;
use futures_util::future::BoxFuture;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use reqwest::header::HeaderMap;
use reqwest::StatusCode;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

use super::provider::{retryable, short, Notification, Outcome, Provider};
use super::webhook::hex;
use super::PushError;

/// Apple's production host.
pub const PRODUCTION: &str = "https://api.push.apple.com";
/// Apple's development host (`push.apns.sandbox = true`).
pub const SANDBOX: &str = "https://api.sandbox.push.apple.com";
/// How long Apple keeps trying to deliver a notification.
const EXPIRATION: Duration = Duration::from_secs(24 * 3600);
/// APNs refuses collapse ids longer than this.
const MAX_COLLAPSE_ID: usize = 64;
const TIMEOUT: Duration = Duration::from_secs(10);
/// How long one provider token is used: inside Apple's hour, and no more
/// often than its 20 minutes between new tokens.
pub const TOKEN_LIFETIME: Duration = Duration::from_secs(50 * 60);

pub struct ApnsProvider {
    client: reqwest::Client,
    /// `https://host[:port]`, no trailing slash.
    endpoint: String,
    topic: String,
    key: EncodingKey,
    key_id: String,
    team_id: String,
    /// The provider token in use.
    token: tokio::sync::Mutex<ProviderToken>,
}

/// A signed provider token and its `iat` (Unix seconds). Its age is told
/// by the wall clock, as Apple tells it (a monotonic clock stops while the
/// machine sleeps).
#[derive(Clone)]
struct ProviderToken {
    jwt: String,
    iat: u64,
}

impl ProviderToken {
    /// Past its lifetime at `now`, or signed in the future (the clock was
    /// set back).
    fn stale(&self, now: u64) -> bool {
        now < self.iat || now - self.iat >= TOKEN_LIFETIME.as_secs()
    }
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

/// APNs device tokens are hex; anything else cannot be one (and would not
/// be a safe URL path).
fn is_device_token(token: &str) -> bool {
    !token.is_empty() && token.bytes().all(|b| b.is_ascii_hexdigit())
}

impl ApnsProvider {
    pub fn new(settings: &chatmq_config::Apns) -> Result<ApnsProvider, PushError> {
        let key_err = |message: String| PushError::Config {
            key: "push.apns.key_file",
            message: format!("{}: {message}", settings.key_file.display()),
        };
        let pem = std::fs::read(&settings.key_file)
            .map_err(|e| key_err(format!("cannot read it: {e}")))?;
        let key = EncodingKey::from_ec_pem(&pem)
            .map_err(|e| key_err(format!("not a usable .p8 (PKCS#8 EC P-256) key: {e}")))?;
        let mut builder = reqwest::Client::builder()
            .timeout(TIMEOUT)
            .http2_prior_knowledge();
        if let Some(path) = &settings.ca_file {
            let ca_err = |message: String| PushError::Config {
                key: "push.apns.ca_file",
                message: format!("{}: {message}", path.display()),
            };
            let bundle = std::fs::read(path).map_err(|e| ca_err(format!("cannot read it: {e}")))?;
            let certs = reqwest::Certificate::from_pem_bundle(&bundle)
                .map_err(|e| ca_err(format!("not PEM certificates: {e}")))?;
            if certs.is_empty() {
                return Err(ca_err("no certificate in it".into()));
            }
            for cert in certs {
                builder = builder.add_root_certificate(cert);
            }
        }
        let client = builder.build().map_err(|e| PushError::Config {
            key: "push.apns",
            message: format!("cannot build an HTTP client: {e}"),
        })?;
        let endpoint = match (&settings.endpoint, settings.sandbox) {
            (Some(url), _) => url.trim_end_matches('/').to_string(),
            (None, true) => SANDBOX.to_string(),
            (None, false) => PRODUCTION.to_string(),
        };
        let mut provider = ApnsProvider {
            client,
            endpoint,
            topic: settings.topic.clone(),
            key,
            key_id: settings.key_id.clone(),
            team_id: settings.team_id.clone(),
            token: tokio::sync::Mutex::new(ProviderToken {
                jwt: String::new(),
                iat: 0,
            }),
        };
        // Signing once proves the key is a P-256 key (a P-384 one parses).
        let first = provider
            .sign(jsonwebtoken::get_current_timestamp())
            .map_err(|e| key_err(format!("not a usable .p8 (PKCS#8 EC P-256) key: {e}")))?;
        *provider.token.get_mut() = first;
        Ok(provider)
    }

    /// A provider token issued at `iat`: header `{"alg":"ES256","kid"}`,
    /// claims `{"iss","iat"}`, as Apple documents it.
    fn sign(&self, iat: u64) -> Result<ProviderToken, jsonwebtoken::errors::Error> {
        let mut header = Header::new(Algorithm::ES256);
        header.typ = None;
        header.kid = Some(self.key_id.clone());
        let claims = json!({"iss": self.team_id, "iat": iat});
        Ok(ProviderToken {
            jwt: jsonwebtoken::encode(&header, &claims, &self.key)?,
            iat,
        })
    }

    /// The token in use, or a new one once it has served its lifetime.
    async fn token(&self) -> Result<ProviderToken, String> {
        let mut current = self.token.lock().await;
        let now = jsonwebtoken::get_current_timestamp();
        if current.stale(now) {
            *current = self
                .sign(now)
                .map_err(|e| format!("cannot sign the APNs provider token: {e}"))?;
        }
        Ok(current.clone())
    }

    /// A new token in place of `refused` (which Apple called expired or
    /// invalid). Sends refused together renew once: whoever comes second
    /// finds the new token in place.
    async fn renew(&self, refused: &ProviderToken) -> Result<ProviderToken, String> {
        let mut current = self.token.lock().await;
        if current.jwt != refused.jwt {
            return Ok(current.clone());
        }
        // ES256 signatures here are deterministic: a token signed within
        // the same second would be the refused one again.
        for _ in 0..30 {
            if jsonwebtoken::get_current_timestamp() > refused.iat {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        *current = self
            .sign(jsonwebtoken::get_current_timestamp())
            .map_err(|e| format!("cannot sign the APNs provider token: {e}"))?;
        Ok(current.clone())
    }

    /// The notification body: alert (sender, preview), badge, default
    /// sound, thread id = the conversation, and the conversation, seq and
    /// count as custom data for the app.
    pub fn payload(note: &Notification) -> Value {
        json!({
            "aps": {
                "alert": {"title": note.from, "body": note.preview},
                "badge": note.badge,
                "sound": "default",
                "thread-id": note.conv,
            },
            "conv": note.conv,
            "seq": note.seq,
            "count": note.count,
        })
    }

    async fn attempt(
        &self,
        device: &Device,
        note: &Notification,
        jwt: &str,
    ) -> Result<reqwest::Response, reqwest::Error> {
        let expiration = jsonwebtoken::get_current_timestamp().saturating_add(EXPIRATION.as_secs());
        self.client
            .post(format!("{}/3/device/{}", self.endpoint, device.token))
            .bearer_auth(jwt)
            .header("apns-topic", &self.topic)
            .header("apns-push-type", "alert")
            .header("apns-priority", "10")
            .header("apns-expiration", expiration.to_string())
            .header("apns-collapse-id", collapse_id(&note.conv))
            .json(&Self::payload(note))
            .send()
            .await
    }

    async fn post(&self, device: &Device, note: &Notification) -> Outcome {
        if !is_device_token(&device.token) {
            return Outcome::InvalidToken("not an APNs device token (hex digits)".into());
        }
        let mut token = match self.token().await {
            Ok(t) => t,
            Err(why) => return Outcome::Rejected(why),
        };
        let mut renewed = false;
        loop {
            let response = match self.attempt(device, note, &token.jwt).await {
                Ok(r) => r,
                // A topic that is no header value: no retry mends it.
                Err(e) if e.is_builder() => {
                    return Outcome::Rejected(format!("cannot build the APNs request: {e}"))
                }
                Err(e) => {
                    return Outcome::Retry {
                        after: None,
                        reason: format!("APNs unreachable: {e}"),
                    }
                }
            };
            let status = response.status();
            if status.is_success() {
                return Outcome::Sent;
            }
            let headers = response.headers().clone();
            let body = response.text().await.unwrap_or_default();
            let stale = matches!(
                reason(&body).as_deref(),
                Some("ExpiredProviderToken" | "InvalidProviderToken")
            );
            if status == StatusCode::FORBIDDEN && stale && !renewed {
                token = match self.renew(&token).await {
                    Ok(t) => t,
                    Err(why) => return Outcome::Rejected(why),
                };
                renewed = true;
                continue;
            }
            return classify(status, &headers, &body);
        }
    }
}

/// The `reason` of an APNs error body (`{"reason": "BadDeviceToken"}`).
fn reason(body: &str) -> Option<String> {
    let value: Value = serde_json::from_str(body).ok()?;
    value["reason"].as_str().map(str::to_string)
}

/// The outcome of a refused send, from its status and error body.
pub(super) fn classify(status: StatusCode, headers: &HeaderMap, body: &str) -> Outcome {
    let reason = reason(body);
    let why = format!(
        "APNs said {status} {}",
        reason.as_deref().unwrap_or_else(|| body.trim())
    );
    let dead = matches!(
        reason.as_deref(),
        Some("BadDeviceToken" | "Unregistered" | "DeviceTokenNotForTopic" | "ExpiredToken")
    );
    if status == StatusCode::GONE || dead {
        Outcome::InvalidToken(short(&why))
    } else if let Some(retry) = retryable(status, headers, body) {
        retry
    } else {
        Outcome::Rejected(short(&why))
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
    use reqwest::header::{HeaderValue, RETRY_AFTER};

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

    fn refused(code: u16, reason: Option<&str>) -> Outcome {
        let body = reason.map_or(String::new(), |r| json!({ "reason": r }).to_string());
        classify(
            StatusCode::from_u16(code).unwrap(),
            &HeaderMap::new(),
            &body,
        )
    }

    #[test]
    fn the_payload_carries_alert_badge_and_thread_id() {
        assert_eq!(
            ApnsProvider::payload(&note("team")),
            json!({
                "aps": {
                    "alert": {"title": "alice", "body": "see you at 8"},
                    "badge": 7,
                    "sound": "default",
                    "thread-id": "team",
                },
                "conv": "team",
                "seq": 42,
                "count": 3,
            })
        );
    }

    #[test]
    fn long_conversation_ids_get_a_collapse_id_apns_accepts() {
        let conv = "c".repeat(128);
        let id = collapse_id(&conv);
        assert_eq!(id.len(), 64);
        assert_ne!(id, collapse_id(&"d".repeat(128)));
        assert_eq!(collapse_id("dm:a:b"), "dm:a:b");
        assert_eq!(
            ApnsProvider::payload(&note(&conv))["aps"]["thread-id"],
            json!(conv)
        );
    }

    #[test]
    fn dead_tokens_retries_and_rejections_are_told_apart() {
        let dead = |o: Outcome| matches!(o, Outcome::InvalidToken(_));
        let retry = |o: Outcome| matches!(o, Outcome::Retry { .. });
        let rejected = |o: Outcome| matches!(o, Outcome::Rejected(_));
        assert!(dead(refused(410, Some("Unregistered"))));
        assert!(dead(refused(410, Some("ExpiredToken"))));
        assert!(dead(refused(410, None)));
        assert!(dead(refused(400, Some("BadDeviceToken"))));
        assert!(dead(refused(400, Some("DeviceTokenNotForTopic"))));
        assert!(retry(refused(429, Some("TooManyRequests"))));
        assert!(retry(refused(500, Some("InternalServerError"))));
        assert!(retry(refused(503, Some("ServiceUnavailable"))));
        assert!(rejected(refused(400, Some("PayloadEmpty"))));
        assert!(rejected(refused(413, Some("PayloadTooLarge"))));
        assert!(rejected(refused(403, Some("InvalidProviderToken"))));
        let mut h = HeaderMap::new();
        h.insert(RETRY_AFTER, HeaderValue::from_static("3"));
        assert!(matches!(
            classify(StatusCode::TOO_MANY_REQUESTS, &h, "{}"),
            Outcome::Retry { after: Some(d), .. } if d == Duration::from_secs(3)
        ));
    }

    #[test]
    fn only_hex_device_tokens_are_sent() {
        assert!(is_device_token(&"ab01".repeat(16)));
        for bad in ["", "../../x", "ab cd", "abc?x=1", "zz"] {
            assert!(!is_device_token(bad), "{bad:?}");
        }
    }

    fn openssl_key(path: &std::path::Path, curve: &str) {
        let status = std::process::Command::new("openssl")
            .args(["genpkey", "-algorithm", "EC", "-pkeyopt"])
            .arg(format!("ec_paramgen_curve:{curve}"))
            .arg("-out")
            .arg(path)
            .status()
            .expect("openssl");
        assert!(status.success());
    }

    #[tokio::test]
    async fn a_token_is_kept_its_lifetime_and_a_renewed_one_is_never_the_refused_one() {
        let dir = tempfile::tempdir().unwrap();
        let key = dir.path().join("AuthKey.p8");
        openssl_key(&key, "P-256");
        let provider = ApnsProvider::new(&chatmq_config::Apns {
            key_file: key,
            key_id: "ABC123".into(),
            team_id: "TEAM".into(),
            topic: "com.example.chat".into(),
            ..Default::default()
        })
        .unwrap();
        let lifetime = TOKEN_LIFETIME.as_secs();
        let aged = |token: &mut ProviderToken, secs: u64| {
            token.iat -= secs;
            token.jwt = format!("issued {}", token.iat);
        };
        // Almost a lifetime old: still the one in use.
        aged(&mut *provider.token.lock().await, lifetime - 60);
        let old = provider.token().await.unwrap();
        assert_eq!(old.jwt, format!("issued {}", old.iat), "kept");
        // A lifetime old: the next send signs a new one, then keeps it.
        aged(&mut *provider.token.lock().await, 60);
        let first = provider.token().await.unwrap();
        assert!(first.iat > old.iat && first.jwt.starts_with("ey"));
        assert_eq!(provider.token().await.unwrap().jwt, first.jwt);

        // Refused within the second it was signed in: the new one differs.
        let renewed = provider.renew(&first).await.unwrap();
        assert!(renewed.iat > first.iat);
        assert_ne!(renewed.jwt, first.jwt);
        let late = provider.renew(&first).await.unwrap();
        assert_eq!(late.jwt, renewed.jwt, "a second refusal of the old one");
        assert_eq!(provider.token().await.unwrap().jwt, renewed.jwt);

        // Signed in the future (the clock was set back): replaced.
        assert!(ProviderToken {
            jwt: String::new(),
            iat: renewed.iat + 120
        }
        .stale(renewed.iat));
    }

    #[tokio::test]
    async fn what_no_retry_mends_is_not_retried() {
        let dir = tempfile::tempdir().unwrap();
        let key = dir.path().join("AuthKey.p8");
        openssl_key(&key, "P-256");
        let provider = ApnsProvider::new(&chatmq_config::Apns {
            key_file: key,
            key_id: "ABC123".into(),
            team_id: "TEAM".into(),
            topic: "com.example\nchat".into(),
            // Nothing listens there: a request that left would retry.
            endpoint: Some("https://127.0.0.1:9".into()),
            ..Default::default()
        })
        .unwrap();
        let device = |token: &str| Device {
            platform: "apns".into(),
            token: token.into(),
            app_id: None,
        };
        let n = note("team");
        assert!(matches!(
            provider.post(&device(&"ab".repeat(32)), &n).await,
            Outcome::Rejected(why) if why.contains("cannot build")
        ));
        assert!(matches!(
            provider.post(&device("../x"), &n).await,
            Outcome::InvalidToken(_)
        ));
    }

    #[test]
    fn a_p8_key_builds_a_provider_and_a_bad_file_names_the_key() {
        let dir = tempfile::tempdir().unwrap();
        let key = dir.path().join("AuthKey.p8");
        openssl_key(&key, "P-256");
        let mut settings = chatmq_config::Apns {
            key_file: key,
            key_id: "ABC123".into(),
            team_id: "TEAM".into(),
            topic: "com.example.chat".into(),
            sandbox: true,
            ..Default::default()
        };
        let provider = ApnsProvider::new(&settings).unwrap();
        assert_eq!(provider.endpoint, SANDBOX);
        settings.sandbox = false;
        assert_eq!(ApnsProvider::new(&settings).unwrap().endpoint, PRODUCTION);
        settings.endpoint = Some("https://127.0.0.1:8443/".into());
        assert_eq!(
            ApnsProvider::new(&settings).unwrap().endpoint,
            "https://127.0.0.1:8443"
        );

        let p384 = dir.path().join("p384.p8");
        openssl_key(&p384, "P-384");
        for (file, contents) in [("missing.p8", None), ("junk.p8", Some("not a key"))] {
            let path = dir.path().join(file);
            if let Some(c) = contents {
                std::fs::write(&path, c).unwrap();
            }
            settings.key_file = path;
            let err = ApnsProvider::new(&settings).err().unwrap().to_string();
            assert!(err.starts_with("push.apns.key_file"), "{err}");
            assert!(err.contains(file), "{err}");
        }
        settings.key_file = p384;
        let err = ApnsProvider::new(&settings).err().unwrap().to_string();
        assert!(err.contains("not a usable .p8"), "{err}");

        settings.key_file = dir.path().join("AuthKey.p8");
        std::fs::write(dir.path().join("ca.pem"), "no certificate here").unwrap();
        settings.ca_file = Some(dir.path().join("ca.pem"));
        let err = ApnsProvider::new(&settings).err().unwrap().to_string();
        assert!(err.starts_with("push.apns.ca_file"), "{err}");
    }
}
