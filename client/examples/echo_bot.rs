//! An echo bot on `chatmq-client`: it answers every message someone else
//! writes in one of its conversations with `echo: TEXT`, once, even across
//! broker restarts and its own restarts (the state file remembers what it
//! has answered and what it has still to send).
//!
//!     CHATMQ_SERVER=127.0.0.1:1883 CHATMQ_USER=echo CHATMQ_PASSWORD="$JWT" \
//!         cargo run --example echo_bot
//!
//! `CHATMQ_STATE` names the state file (default `echo-bot-USER.json`),
//! `CHATMQ_CA` a PEM file TLS trusts (`mqtts://`, `wss://`).

use std::process::ExitCode;

use chatmq_client::{Client, Event, Message, Options};
use serde_json::{json, Value};

/// The text of a body: a string as is, `{"text": ...}` as its text,
/// anything else as JSON.
fn text_of(body: &Value) -> String {
    match body {
        Value::String(s) => s.clone(),
        Value::Object(o) => match o.get("text") {
            Some(Value::String(s)) => s.clone(),
            _ => body.to_string(),
        },
        other => other.to_string(),
    }
}

/// What the bot says to `m`, if anything: nothing to its own messages.
fn reply_to(me: &str, m: &Message) -> Option<Value> {
    (m.from != me).then(|| json!(format!("echo: {}", text_of(&m.body))))
}

fn setting(name: &str) -> Result<String, String> {
    std::env::var(name).map_err(|_| format!("set {name}"))
}

async fn run() -> Result<(), String> {
    let server = setting("CHATMQ_SERVER")?
        .parse()
        .map_err(|e| format!("CHATMQ_SERVER: {e}"))?;
    let user = setting("CHATMQ_USER")?;
    let state = std::env::var("CHATMQ_STATE").unwrap_or_else(|_| format!("echo-bot-{user}.json"));
    let mut options = Options::new(server, &user, setting("CHATMQ_PASSWORD")?, state);
    options.client_id_prefix = "echo-bot".into();
    if let Ok(ca) = std::env::var("CHATMQ_CA") {
        options.ca_pem = Some(std::fs::read(&ca).map_err(|e| format!("CHATMQ_CA {ca}: {e}"))?);
    }
    let (client, mut events) = Client::start(options).await.map_err(|e| e.to_string())?;
    loop {
        let event = tokio::select! {
            event = events.next() => event,
            _ = tokio::signal::ctrl_c() => break,
        };
        let Some(event) = event else { break };
        match event {
            Event::Message(m) => {
                if let Some(reply) = reply_to(client.user(), &m) {
                    // In the outbox when this returns: sent when it can be.
                    let id = client
                        .send(&m.conv, reply)
                        .await
                        .map_err(|e| e.to_string())?;
                    println!("{} #{} from {}: answered ({id})", m.conv, m.seq, m.from);
                }
            }
            Event::Connected {
                session_present, ..
            } => {
                println!("connected (session present: {session_present})")
            }
            Event::Disconnected { error, retry_in } => {
                println!("disconnected ({error}), retrying in {retry_in:?}")
            }
            Event::Rejected { conv, reason, .. } => println!("{conv}: not sent: {reason}"),
            Event::Refused(why) | Event::Failed(why) => return Err(why),
            _ => {}
        }
    }
    client.close().await;
    Ok(())
}

#[tokio::main]
async fn main() -> ExitCode {
    match run().await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("echo_bot: {e}");
            ExitCode::FAILURE
        }
    }
}
