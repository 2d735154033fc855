//! `chatmq drain`: moves a running node's clients away and waits until it
//! has stopped (`POST /v1/admin/drain`, [`chatmq_broker::drain`]), for
//! scale-in and maintenance. The admin token is `auth.admin_token` of the
//! configuration file, or `--token` / `CHATMQ_ADMIN_TOKEN`.
//!
//! Exits 0 once the node no longer answers (it stopped after its clients
//! left), non-zero if it refused the drain or was still up after the
//! drain's spread and timeout and a margin.

use std::time::{Duration, Instant};

use clap::Args;
use serde_json::{json, Value};

use super::status::reachable;
use crate::ConfigFile;

/// How long one request may take.
const TIMEOUT: Duration = Duration::from_secs(5);

/// How long past the drain's own bound (spread + timeout) the node may
/// take to flush and exit before this command gives up on it.
const EXIT_MARGIN: Duration = Duration::from_secs(15);

#[derive(Debug, Args)]
pub struct DrainArgs {
    /// The node's HTTP API, e.g. http://127.0.0.1:8080 (instead of
    /// http.listen from the configuration file)
    #[arg(long, value_name = "URL")]
    url: Option<String>,
    /// The admin token (instead of auth.admin_token from the configuration file)
    #[arg(long, env = "CHATMQ_ADMIN_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// What MQTT 5 clients are told to use instead, e.g. the load
    /// balancer's host:port (instead of drain.server_reference)
    #[arg(long, value_name = "HOST:PORT")]
    server_reference: Option<String>,
    /// Clients leave at random moments over this many seconds (instead of
    /// drain.spread_secs)
    #[arg(long, value_name = "SECS")]
    spread_secs: Option<u64>,
    /// Return once the drain has started instead of waiting for the node to stop
    #[arg(long)]
    no_wait: bool,
    #[command(flatten)]
    config: ConfigFile,
}

pub fn run(args: &DrainArgs) -> Result<(), String> {
    // The file only when something must come from it.
    let settings = match (&args.url, &args.token) {
        (Some(_), Some(_)) => None,
        _ => Some(args.config.load()?),
    };
    let base = match (&args.url, &settings) {
        (Some(url), _) => url.trim_end_matches('/').to_string(),
        (None, Some(s)) => format!("http://{}", reachable(s.http.listen)),
        (None, None) => return Err("no --url and no configuration file".into()),
    };
    let token = match (&args.token, &settings) {
        (Some(t), _) => t.clone(),
        (None, Some(s)) => s.auth.admin_token.clone().ok_or(
            "auth.admin_token: not set in the configuration file; pass --token or CHATMQ_ADMIN_TOKEN",
        )?,
        (None, None) => return Err("no admin token".into()),
    };
    let mut body = json!({});
    if let Some(r) = &args.server_reference {
        body["server_reference"] = json!(r);
    }
    if let Some(s) = args.spread_secs {
        body["spread_secs"] = json!(s);
    }
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start the runtime: {e}"))?;
    runtime.block_on(drain(&base, &token, body, !args.no_wait))
}

async fn drain(base: &str, token: &str, body: Value, wait: bool) -> Result<(), String> {
    let client = reqwest::Client::builder()
        .timeout(TIMEOUT)
        .build()
        .map_err(|e| format!("cannot make an HTTP client: {e}"))?;
    let response = client
        .post(format!("{base}/v1/admin/drain"))
        .bearer_auth(token)
        .json(&body)
        .send()
        .await
        .map_err(|e| format!("cannot reach the node at {base}: {e}"))?;
    let status = response.status();
    let answer: Value = response.json().await.unwrap_or(Value::Null);
    if !status.is_success() {
        let why = answer["error"]["message"]
            .as_str()
            .unwrap_or("no reason given");
        return Err(format!("{base} refused the drain ({status}): {why}"));
    }
    let connections = answer["connections"].as_u64().unwrap_or(0);
    let spread = answer["spread_secs"].as_u64().unwrap_or(0);
    println!("chatmq: draining {base}: {connections} connections leave over {spread} s");
    if !wait {
        return Ok(());
    }
    // The node stops by spread + timeout at the latest, then flushes.
    let bound = spread.saturating_add(answer["timeout_secs"].as_u64().unwrap_or(0));
    let give_up = Instant::now() + Duration::from_secs(bound) + EXIT_MARGIN;
    loop {
        match client.get(format!("{base}/healthz")).send().await {
            Err(e) if e.is_connect() => {
                println!("chatmq: drained: the node has stopped");
                return Ok(());
            }
            _ if Instant::now() >= give_up => {
                return Err(format!("{base} is still up after the drain's bound"));
            }
            _ => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    }
}
