//! `chatmq status`: what a running node reports, read from its HTTP API
//! (`/readyz`, `/metrics`) the way a monitoring system would; no admin
//! token needed, no endpoint of its own.
//!
//! The metrics are read by name from the Prometheus text format and summed
//! over their labels, so a gauge that gains a label (per listener, say)
//! still reads as its total. That is a dozen lines, kept here rather than
//! a parser crate: only unlabelled totals of a few known names are needed.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use clap::Args;
use serde_json::{json, Map, Value};

use crate::ConfigFile;

/// How long one request may take: a node that does not answer in this
/// time is reported as unreachable.
const TIMEOUT: Duration = Duration::from_secs(5);

/// What is shown: (JSON key, human label, metric).
const SHOWN: &[(&str, &str, &str)] = &[
    ("connections", "MQTT connections", "chatmq_connections"),
    ("sessions", "sessions", "chatmq_sessions"),
    (
        "http_connections",
        "HTTP connections",
        "chatmq_http_connections",
    ),
    (
        "session_held_bytes",
        "bytes queued in sessions",
        "chatmq_session_held_bytes",
    ),
    (
        "storage_writer_queue_depth",
        "storage writer queue",
        "chatmq_storage_writer_queue_depth",
    ),
    ("push_queue_depth", "push queue", "chatmq_push_queue_depth"),
    (
        "retained_messages",
        "retained messages",
        "chatmq_retained_messages",
    ),
    (
        "conversations_cached",
        "conversations in memory",
        "chatmq_conv_cache_size",
    ),
];

#[derive(Debug, Args)]
pub struct StatusArgs {
    /// The node's HTTP API, e.g. http://127.0.0.1:8080 (instead of
    /// http.listen from the configuration file)
    #[arg(long, value_name = "URL", conflicts_with = "path")]
    url: Option<String>,
    /// One JSON object on stdout, for scripts
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    config: ConfigFile,
}

/// Prints the node's status; `Ok(false)` when it answers but is not ready.
pub fn run(args: &StatusArgs) -> Result<bool, String> {
    let base = match &args.url {
        Some(url) => url.trim_end_matches('/').to_string(),
        None => format!("http://{}", reachable(args.config.load()?.http.listen)),
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start the runtime: {e}"))?;
    let (ready, metrics) = runtime.block_on(fetch(&base))?;
    if args.json {
        let mut out = Map::new();
        out.insert("url".into(), json!(base));
        out.insert("ready".into(), json!(ready));
        for (key, _, metric) in SHOWN {
            out.insert((*key).into(), json!(metrics.get(*metric)));
        }
        println!("{}", Value::Object(out));
    } else {
        let state = if ready { "ready" } else { "not ready" };
        println!("chatmq at {base}: {state}");
        for (_, label, metric) in SHOWN {
            let value = metrics
                .get(*metric)
                .map_or_else(|| "-".to_string(), |v| v.to_string());
            println!("  {label:<26} {value}");
        }
    }
    Ok(ready)
}

/// Where to reach a listener bound to `listen`: the loopback address of
/// its family when it listens on every address.
pub(crate) fn reachable(listen: SocketAddr) -> SocketAddr {
    let ip = match listen.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
        IpAddr::V6(ip) if ip.is_unspecified() => IpAddr::V6(Ipv6Addr::LOCALHOST),
        ip => ip,
    };
    SocketAddr::new(ip, listen.port())
}

/// Readiness and the metrics of the node at `base`.
async fn fetch(base: &str) -> Result<(bool, HashMap<String, f64>), String> {
    let client = reqwest::Client::builder()
        .timeout(TIMEOUT)
        .build()
        .map_err(|e| format!("cannot make an HTTP client: {e}"))?;
    let unreachable = |e: reqwest::Error| format!("cannot reach the node at {base}: {e}");
    let ready = client
        .get(format!("{base}/readyz"))
        .send()
        .await
        .map_err(unreachable)?
        .status()
        .is_success();
    let response = client
        .get(format!("{base}/metrics"))
        .send()
        .await
        .map_err(unreachable)?;
    if !response.status().is_success() {
        return Err(format!(
            "{base}/metrics answered {}: is this a chatmq HTTP API?",
            response.status()
        ));
    }
    let text = response.text().await.map_err(unreachable)?;
    Ok((ready, totals(&text)))
}

/// Each metric's samples summed over their labels, from the Prometheus
/// text exposition format (`name{labels} value [timestamp]`).
fn totals(text: &str) -> HashMap<String, f64> {
    let mut totals: HashMap<String, f64> = HashMap::new();
    for line in text.lines().map(str::trim) {
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let name_end = line.find(['{', ' ', '\t']).unwrap_or(line.len());
        let name = &line[..name_end];
        // The value follows the labels, whose quoted values may hold spaces.
        let rest = match line[name_end..].strip_prefix('{') {
            Some(labels) => labels.rsplit_once('}').map_or("", |(_, v)| v),
            None => &line[name_end..],
        };
        if let Some(value) = rest
            .split_whitespace()
            .next()
            .and_then(|v| v.parse::<f64>().ok())
        {
            *totals.entry(name.to_string()).or_default() += value;
        }
    }
    totals
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn samples_are_summed_over_labels() {
        let text = "# HELP chatmq_connections Open.\n\
                    # TYPE chatmq_connections gauge\n\
                    chatmq_connections 3\n\
                    chatmq_refused_total{reason=\"a b\"} 2\n\
                    chatmq_refused_total{reason=\"c}\"} 5 1700000000\n\
                    chatmq_sessions{listener=\"mqtt\"} 1\n\
                    chatmq_sessions{listener=\"ws\"} 4\n\
                    garbage\n";
        let t = totals(text);
        assert_eq!(t.get("chatmq_connections"), Some(&3.0));
        assert_eq!(t.get("chatmq_refused_total"), Some(&7.0));
        assert_eq!(t.get("chatmq_sessions"), Some(&5.0));
        assert_eq!(t.get("garbage"), None);
    }

    #[test]
    fn a_wildcard_listener_is_reached_on_loopback() {
        let at = |s: &str| reachable(s.parse().unwrap()).to_string();
        assert_eq!(at("0.0.0.0:8080"), "127.0.0.1:8080");
        assert_eq!(at("[::]:8080"), "[::1]:8080");
        assert_eq!(at("10.0.0.5:8080"), "10.0.0.5:8080");
    }
}
