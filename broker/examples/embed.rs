//! chatmq embedded in a program: a moderation interceptor refuses any
//! publish whose payload contains a banned word, and an in-process
//! subscriber to `#` prints every message that gets through.
//!
//!     cargo run --example embed -p chatmq-broker [-- CONFIG.toml]
//!
//! Without a configuration file it listens for MQTT on a free local port
//! (printed), keeps its data in a temporary directory, and lets anonymous
//! clients publish and subscribe anywhere. Try it with
//! `mosquitto_pub -p PORT -V mqttv5 -q 1 -t rooms/1 -m 'some darn text'`.

use std::path::PathBuf;

use chatmq_broker::embed::{Embedded, Listeners, Publication, Rejection, Verdict};
use chatmq_config::Settings;

const BANNED: &[&str] = &["darn", "heck"];

/// Refuses a payload that contains a banned word (MQTT 5 clients get
/// PUBACK 0x87 Not authorized); lets everything else through.
fn moderate(p: &Publication<'_>) -> Verdict {
    let text = String::from_utf8_lossy(p.payload).to_lowercase();
    match BANNED.iter().find(|w| text.contains(*w)) {
        Some(word) => {
            eprintln!(
                "refused {} from {}: contains {word:?}",
                p.topic, p.client_id
            );
            Verdict::Reject(Rejection::NotAuthorized)
        }
        None => Verdict::Allow,
    }
}

/// The settings, and the temporary data directory to remove at the end
/// (when there is no configuration file).
fn settings() -> Result<(Settings, Option<PathBuf>), String> {
    if let Some(path) = std::env::args().nth(1) {
        let settings = Settings::load(path.as_ref()).map_err(|e| e.to_string())?;
        return Ok((settings, None));
    }
    let data = std::env::temp_dir().join(format!("chatmq-embed-{}", std::process::id()));
    let settings = Settings::from_toml(&format!(
        r##"
[node]
data_dir = "{}"
[mqtt]
listen = "127.0.0.1:0"
[auth]
allow_anonymous = true
[[acl.rules]]
user = "*"
topic = "#"
access = "pubsub"
"##,
        data.display()
    ))
    .map_err(|e| e.to_string())?;
    Ok((settings, Some(data)))
}

#[tokio::main]
async fn main() -> Result<(), String> {
    let listeners = Listeners {
        mqtt: true,
        http: false,
        edges: false,
    };
    let (settings, scratch) = settings()?;
    let broker = Embedded::start(settings, listeners)
        .await
        .map_err(|e| e.to_string())?;
    broker.register_interceptor(moderate);
    if let Some(addr) = broker.mqtt_addr() {
        println!("mqtt listening on {addr}");
    }

    let mut everything = broker.subscribe("#").await.map_err(|e| e.to_string())?;
    loop {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => break,
            message = everything.recv() => match message {
                Some(m) => println!("{}: {}", m.topic, String::from_utf8_lossy(&m.payload)),
                None => break,
            },
        }
    }
    drop(everything);
    broker.shutdown().await;
    if let Some(dir) = scratch {
        let _ = std::fs::remove_dir_all(dir);
    }
    Ok(())
}
