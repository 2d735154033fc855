//! The one interface every push service is reached through, and what a
//! send can come to.

use std::time::Duration;

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
/// header asks for (in seconds; an HTTP date is not honoured).
pub(super) fn retryable(status: StatusCode, headers: &HeaderMap, body: &str) -> Option<Outcome> {
    if status != StatusCode::TOO_MANY_REQUESTS && !status.is_server_error() {
        return None;
    }
    let after = headers
        .get(RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok())
        .map(Duration::from_secs);
    Some(Outcome::Retry {
        after,
        reason: format!("{status}: {}", short(body)),
    })
}

/// A response body shortened for a log line.
pub(super) fn short(body: &str) -> String {
    body.chars().take(200).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use reqwest::header::HeaderValue;

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
}
