//! The one interface every push service is reached through, and what a
//! send can come to.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

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
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let after = headers
        .get(RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| retry_after(v, now));
    Some(Outcome::Retry {
        after,
        reason: format!("{status}: {}", short(body)),
    })
}

/// A Retry-After value (RFC 9110 §10.2.3) as a delay from `now` (Unix
/// seconds): delay-seconds, or an HTTP date in the IMF-fixdate form senders
/// must use (`Sun, 06 Nov 1994 08:49:37 GMT`); a date in the past is 0.
fn retry_after(value: &str, now: u64) -> Option<Duration> {
    let value = value.trim();
    if let Ok(seconds) = value.parse::<u64>() {
        return Some(Duration::from_secs(seconds));
    }
    imf_fixdate(value).map(|at| Duration::from_secs(at.saturating_sub(now)))
}

/// `Sun, 06 Nov 1994 08:49:37 GMT` as Unix seconds.
fn imf_fixdate(value: &str) -> Option<u64> {
    const MONTHS: [&str; 12] = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    let (_weekday, rest) = value.split_once(", ")?;
    let parts: Vec<&str> = rest.split(' ').collect();
    let [day, month, year, time, "GMT"] = parts.as_slice() else {
        return None;
    };
    let day: u64 = day.parse().ok()?;
    let month = MONTHS.iter().position(|m| m == month)? as u64 + 1;
    let year: u64 = year.parse().ok()?;
    let hms: Vec<u64> = time
        .split(':')
        .map(|n| n.parse().ok())
        .collect::<Option<_>>()?;
    let [h, m, s] = hms.as_slice() else {
        return None;
    };
    // Years beyond 9999 are not dates (and would overflow the arithmetic).
    if !(1..=31).contains(&day) || !(1970..=9999).contains(&year) || *h > 23 || *m > 59 || *s > 60 {
        return None;
    }
    // Days from 1970-01-01 to the date (Howard Hinnant's days_from_civil).
    let (y, mo) = if month <= 2 {
        (year - 1, month + 9)
    } else {
        (year, month - 3)
    };
    let era = y / 400;
    let yoe = y % 400;
    let doy = (153 * mo + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = (era * 146_097 + doe).checked_sub(719_468)?;
    Some(days * 86_400 + h * 3600 + m * 60 + s)
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

    #[test]
    fn retry_after_takes_seconds_or_an_http_date() {
        // 784111777 is Sun, 06 Nov 1994 08:49:37 GMT (RFC 9110's example).
        assert_eq!(
            imf_fixdate("Sun, 06 Nov 1994 08:49:37 GMT"),
            Some(784_111_777)
        );
        assert_eq!(imf_fixdate("Thu, 01 Jan 1970 00:00:00 GMT"), Some(0));
        assert_eq!(
            imf_fixdate("Tue, 29 Feb 2028 23:59:59 GMT"),
            Some(1_835_481_599)
        );
        let now = 784_111_777;
        let secs = |v| retry_after(v, now).map(|d| d.as_secs());
        assert_eq!(secs("120"), Some(120));
        assert_eq!(secs("Sun, 06 Nov 1994 08:50:07 GMT"), Some(30));
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
