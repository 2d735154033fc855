//! What a broker exports on `/metrics`, as a test reads it.

use std::collections::HashMap;
use std::time::Duration;

use crate::http::Http;
use crate::{Broker, PATIENCE};

/// Every sample, by series (`name` or `name{label="value"}`); a labelled
/// metric also reads as its sum under its bare name, as `chatmq status`
/// and `sum(name)` in PromQL read it (`chatmq_connections` is the total
/// of its `listener` series).
pub async fn metrics(b: &Broker) -> HashMap<String, f64> {
    let text = Http::new(b.http_addr).get("/metrics").await.text();
    parse(&text)
}

/// [`metrics`] of an exposition's text.
pub fn parse(text: &str) -> HashMap<String, f64> {
    let mut series: HashMap<String, f64> = text
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .filter_map(|l| l.rsplit_once(' '))
        .filter_map(|(k, v)| Some((k.to_string(), v.parse().ok()?)))
        .collect();
    let mut sums: HashMap<String, f64> = HashMap::new();
    for (k, v) in &series {
        if let Some((name, _)) = k.split_once('{') {
            *sums.entry(name.to_string()).or_default() += v;
        }
    }
    for (name, sum) in sums {
        series.entry(name).or_insert(sum);
    }
    series
}

/// One series; panics if the broker does not export it.
pub async fn metric(b: &Broker, series: &str) -> f64 {
    match metrics(b).await.get(series) {
        Some(v) => *v,
        None => panic!("the broker exports no {series}"),
    }
}

/// Waits until `series` reaches `at_least`; panics after `within`.
pub async fn metric_reaches(b: &Broker, series: &str, at_least: f64, within: Duration) {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        let v = metric(b, series).await;
        if v >= at_least {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{series} is {v}, expected at least {at_least} within {within:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Waits until `series` reads exactly `want`; panics after PATIENCE.
pub async fn metric_becomes(b: &Broker, series: &str, want: f64) {
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        let got = metric(b, series).await;
        if got == want {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{series} is {got}, expected {want}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
