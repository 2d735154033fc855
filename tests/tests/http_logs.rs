//! What an operator reads in the log of the HTTP API: every request has an
//! id (the client's `X-Request-Id`, or a new one), returned in the response
//! and carried by the request's log lines; `[log] format = "json"` makes
//! each line one JSON object.

use std::time::Duration;

use chatmq_tests::http::Http;
use chatmq_tests::{Broker, OPEN, PATIENCE};
use serde_json::Value;

/// A broker logging JSON, HTTP requests included (they are `debug`).
fn json_logging() -> Broker {
    Broker::start_with_env(
        &format!("{OPEN}\n[log]\nformat = \"json\"\n"),
        &[("RUST_LOG", "info,chatmq_broker::http=debug")],
    )
}

/// The log's lines as JSON, once one matches `want`; panics after PATIENCE.
async fn log_line(b: &Broker, want: impl Fn(&Value) -> bool) -> (Vec<Value>, Value) {
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        let text = b.log();
        let lines: Vec<Value> = text
            .lines()
            .map(|l| match serde_json::from_str(l) {
                Ok(v) => v,
                Err(e) => panic!("not a JSON log line ({e}): {l}"),
            })
            .collect();
        if let Some(found) = lines.iter().find(|v| want(v)).cloned() {
            return (lines, found);
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no such line in the log:\n{text}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn a_request_id_is_returned_and_logged_as_json() {
    let b = json_logging();
    let http = Http::new(b.http_addr);

    let r = http
        .with_header("X-Request-Id", "checkout-7f3a")
        .get("/healthz")
        .await;
    assert_eq!(
        r.header("x-request-id"),
        Some("checkout-7f3a"),
        "the client's id is kept"
    );

    let r = http.get("/v1/conversations").await;
    assert_eq!(r.status, 401);
    let made = r.header("x-request-id").map(str::to_string);
    let made = made.unwrap_or_else(|| panic!("no request id made"));
    assert!(
        made.len() == 16 && made.bytes().all(|c| c.is_ascii_hexdigit()),
        "a new id: {made}"
    );

    let unfit = "x".repeat(200);
    let r = http
        .with_header("X-Request-Id", &unfit)
        .get("/healthz")
        .await;
    let replaced = r.header("x-request-id").unwrap_or_default();
    assert!(
        replaced != unfit && replaced.len() == 16,
        "an id too long is replaced: {replaced}"
    );

    let (_, line) = log_line(&b, |v| v["span"]["request_id"] == "checkout-7f3a").await;
    assert_eq!(line["span"]["path"], "/healthz");
    assert_eq!(line["span"]["method"], "GET");
    assert_eq!(line["fields"]["status"], 200);
    // The broker's own lines are JSON too (every line is checked to be).
    // Waited for: it is written just after "ready", which a loaded
    // machine may let the requests above overtake.
    log_line(&b, |v| v["fields"]["message"] == "chatmq is serving").await;
    let (_, line) = log_line(&b, |v| v["span"]["request_id"] == made.as_str()).await;
    assert_eq!(line["fields"]["status"], 401);
}
