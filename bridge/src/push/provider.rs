//! The one interface every push service is reached through, and what a
//! send can come to.

use std::time::{Duration, SystemTime};

use chatmq_storage::Device;
use futures_util::future::BoxFuture;
use reqwest::header::{HeaderMap, RETRY_AFTER};
use reqwest::StatusCode;

/// One notification for one user about one conversation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Notification {
    pub user: String,
    pub conv: String,
    /// Messages it stands for (collapsed over the debounce window).
    pub count: u32,
    /// The latest of them: seq, sender and preview text.
    pub seq: u64,
    pub from: String,
    pub preview: String,
    /// The user's unread messages over all conversations.
    pub badge: u64,
}

/// What a provider made of one send.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Sent,
    /// Try again later (429, 5xx, network): no sooner than `after` if the
    /// provider said (Retry-After).
    Retry {
        after: Option<Duration>,
        reason: String,
    },
    /// The token is dead (unregistered, malformed, wrong app): the device
    /// is deleted.
    InvalidToken(String),
    /// Refused for another reason: logged and counted, not retried.
    Rejected(String),
}

/// A push service: APNs, FCM, or the operator's webhook.
pub trait Provider: Send + Sync {
    fn send<'a>(&'a self, device: &'a Device, note: &'a Notification) -> BoxFuture<'a, Outcome>;
}

/// The retryable statuses (429 and 5xx), with the delay a Retry-After
/// header asks for (seconds, or an HTTP date).
pub(super) fn retryable(status: StatusCode, headers: &HeaderMap, body: &str) -> Option<Outcome> {
    if status != StatusCode::TOO_MANY_REQUESTS && !status.is_server_error() {
        return None;
    }
    let after = headers
        .get(RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| retry_after(v, SystemTime::now()));
    Some(Outcome::Retry {
        after,
        reason: format!("{status}: {}", short(body)),
    })
}

/// A Retry-After value (RFC 9110 §10.2.3) as a delay from `now`:
/// delay-seconds, or an HTTP date (IMF-fixdate, or the obsolete forms a
/// recipient must accept too); a date in the past is 0.
fn retry_after(value: &str, now: SystemTime) -> Option<Duration> {
    let value = value.trim();
    if let Ok(seconds) = value.parse::<u64>() {
        return Some(Duration::from_secs(seconds));
    }
    let at = httpdate::parse_http_date(value).ok()?;
    Some(at.duration_since(now).unwrap_or_default())
}

/// A response body shortened for a log line.
pub(super) fn short(body: &str) -> String {
    body.chars().take(200).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use reqwest::header::HeaderValue;
    use std::time::UNIX_EPOCH;

    #[test]
    fn throttling_and_server_errors_retry_honouring_retry_after() {
        let mut h = HeaderMap::new();
        assert_eq!(retryable(StatusCode::BAD_REQUEST, &h, ""), None);
        assert_eq!(retryable(StatusCode::OK, &h, ""), None);
        assert!(matches!(
            retryable(StatusCode::SERVICE_UNAVAILABLE, &h, ""),
            Some(Outcome::Retry { after: None, .. })
        ));
        h.insert(RETRY_AFTER, HeaderValue::from_static("7"));
        assert!(matches!(
            retryable(StatusCode::TOO_MANY_REQUESTS, &h, ""),
            Some(Outcome::Retry { after: Some(d), .. }) if d == Duration::from_secs(7)
        ));
    }

    #[test]
    fn retry_after_takes_seconds_or_an_http_date() {
        // 784111777 is Sun, 06 Nov 1994 08:49:37 GMT (RFC 9110's example).
        let now = UNIX_EPOCH + Duration::from_secs(784_111_777);
        let secs = |v| retry_after(v, now).map(|d| d.as_secs());
        assert_eq!(secs("120"), Some(120));
        assert_eq!(secs("Sun, 06 Nov 1994 08:50:07 GMT"), Some(30));
        // The obsolete RFC 850 and asctime forms.
        assert_eq!(secs("Sunday, 06-Nov-94 08:50:07 GMT"), Some(30));
        assert_eq!(secs("Sun Nov  6 08:50:07 1994"), Some(30));
        assert_eq!(
            secs("Sun, 06 Nov 1994 08:00:00 GMT"),
            Some(0),
            "in the past"
        );
        for bad in [
            "soon",
            "Sun, 06 Nov 1994 08:49:37 PST",
            "Sun, 32 Nov 1994 08:49:37 GMT",
            "-5",
            "",
            "Sun, 06 Nov 18446744073709551615 08:49:37 GMT",
            "Sun, 06 Nov 99999 08:49:37 GMT",
        ] {
            assert_eq!(secs(bad), None, "{bad}");
        }
        assert_eq!(
            secs("18446744073709551615"),
            Some(u64::MAX),
            "a huge delay is capped by push.retry_max_ms, not an overflow"
        );
    }
}
