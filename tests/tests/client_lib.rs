//! The `chatmq-client` library as a bot author uses it, against the real
//! broker: an echo bot built on the crate answers bob once per message,
//! rides out a broker crash (kill -9, restart on the same data directory
//! and port) with a send that waited in its outbox, and after its own
//! restarts, one with the session kept and one after the broker lost it,
//! shows only what is new and sends what it had queued, exactly once.

use std::collections::HashMap;
use std::path::Path;
use std::time::Duration;

use chatmq_client::{Client, Event, Message, Options};
use chatmq_tests::chat::*;
use chatmq_tests::cli::{state_of, subscribed};
use chatmq_tests::{v5, Broker, PATIENCE};
use serde_json::{json, Value};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

const DM: &str = "dm:bob:bot";
const QUIET: Duration = Duration::from_millis(700);

fn text_of(body: &Value) -> String {
    body.as_str()
        .or_else(|| body["text"].as_str())
        .map(str::to_string)
        .unwrap_or_else(|| body.to_string())
}

/// An echo bot on the crate: it answers every message of someone else with
/// `echo: TEXT` and reports every event it got to the test.
struct Bot {
    client: Client,
    events: mpsc::Receiver<Event>,
    task: JoinHandle<()>,
    /// Every event of this run, in order.
    log: Vec<Event>,
}

impl Bot {
    async fn start(b: &Broker, state: &Path) -> Bot {
        let server = b.addr.to_string().parse().expect("server address");
        let options = Options::new(server, "bot", token("bot"), state);
        let (client, mut events) = Client::start(options).await.expect("start the client");
        let (tx, rx) = mpsc::channel(4096);
        let replier = client.clone();
        let task = tokio::spawn(async move {
            while let Some(event) = events.next().await {
                if let Event::Message(m) = &event {
                    if m.from != "bot" {
                        let reply = json!(format!("echo: {}", text_of(&m.body)));
                        replier.send(&m.conv, reply).await.expect("send a reply");
                    }
                }
                if tx.send(event).await.is_err() {
                    return;
                }
            }
        });
        Bot {
            client,
            events: rx,
            task,
            log: Vec::new(),
        }
    }

    /// Events until one satisfies `done`, which is returned.
    async fn until(&mut self, mut done: impl FnMut(&Event) -> bool) -> Event {
        let deadline = tokio::time::Instant::now() + PATIENCE;
        loop {
            match tokio::time::timeout_at(deadline, self.events.recv()).await {
                Ok(Some(event)) => {
                    self.log.push(event.clone());
                    if done(&event) {
                        return event;
                    }
                }
                Ok(None) => panic!("the bot stopped; events: {:#?}", self.log),
                Err(_) => panic!("gave up after {PATIENCE:?}; events: {:#?}", self.log),
            }
        }
    }

    async fn quiet(&mut self) {
        let deadline = tokio::time::Instant::now() + QUIET;
        while let Ok(Some(event)) = tokio::time::timeout_at(deadline, self.events.recv()).await {
            self.log.push(event);
        }
    }

    async fn connected(&mut self) -> bool {
        match self.until(|e| matches!(e, Event::Connected { .. })).await {
            Event::Connected {
                session_present, ..
            } => session_present,
            _ => unreachable!(),
        }
    }

    /// The seq `Acked` gave the send `id`.
    async fn acked(&mut self, id: &str) -> u64 {
        let done = |e: &Event| matches!(e, Event::Acked { id: i, .. } if i == id);
        let found = self.log.iter().find(|e| done(e)).cloned();
        let event = match found {
            Some(e) => e,
            None => self.until(done).await,
        };
        match event {
            Event::Acked { seq: Some(seq), .. } => seq,
            other => panic!("{id}: acked without a seq: {other:?}"),
        }
    }

    /// The messages this run handed out, as (seq, from, text).
    fn shown(&self) -> Vec<(u64, String, String)> {
        self.log
            .iter()
            .filter_map(|e| match e {
                Event::Message(m) => Some((m.seq, m.from.clone(), text_of(&m.body))),
                _ => None,
            })
            .collect()
    }

    /// Stops the bot the way an app does; the broker keeps its session.
    async fn close(self) {
        self.client.close().await;
        let _ = tokio::time::timeout(PATIENCE, self.task).await;
    }
}

async fn bob_sends(bob: &mut v5::Client, id: &str, text: &str) {
    let ack = bob
        .publish_acked(
            &format!("chat/{DM}"),
            v5::QoS::AtLeastOnce,
            false,
            &envelope(id, text),
        )
        .await;
    match ack {
        Some(v5::Packet::PubAck(a)) => assert_eq!(a.reason, v5::PubAckReason::Success),
        other => panic!("{text}: {other:?}"),
    }
}

/// The conversation as the broker stored it: text -> how many times.
async fn stored(client: &Client) -> (Vec<Message>, HashMap<String, usize>) {
    let history = client.history(DM, 100).await.expect("history");
    let mut count = HashMap::new();
    for m in &history {
        *count.entry(text_of(&m.body)).or_insert(0) += 1;
    }
    (history, count)
}

fn assert_once_in_order(shown: &[(u64, String, String)], who: &str) {
    let seqs: Vec<u64> = shown.iter().map(|(s, _, _)| *s).collect();
    assert!(
        seqs.windows(2).all(|w| w[0] < w[1]),
        "{who}: every seq once, in order: {shown:?}"
    );
}

#[tokio::test]
async fn an_echo_bot_on_the_crate_answers_once_through_crashes_and_restarts() {
    let mut b = Broker::start(&config(""));
    let dir = tempfile::tempdir().expect("temp dir");
    let state = dir.path().join("bot.json");
    let mut bob = v5_user(&b, "bob").await;

    // First run: bob writes, the bot answers once.
    let mut bot = Bot::start(&b, &state).await;
    assert!(!bot.connected().await, "a first run has no session");
    subscribed(&state).await;
    bob_sends(&mut bob, "b-1", "hi").await;
    bot.until(|e| matches!(e, Event::Message(m) if m.from == "bot"))
        .await;
    bot.quiet().await;
    assert_eq!(
        bot.shown(),
        [
            (1, "bob".into(), "hi".into()),
            (2, "bot".into(), "echo: hi".into())
        ]
    );

    // The broker dies; the bot queues a send while it is down.
    b.kill9();
    bot.until(|e| matches!(e, Event::Disconnected { .. })).await;
    let pending = bot
        .client
        .send(DM, json!("while the broker was down"))
        .await
        .expect("send while offline");
    let outbox = state_of(&state)["outbox"].to_string();
    assert!(outbox.contains(&pending), "in the outbox: {outbox}");
    b.restart();
    assert!(bot.connected().await, "the session survived the crash");
    assert_eq!(bot.acked(&pending).await, 3);
    bot.quiet().await;
    assert_once_in_order(&bot.shown(), "first run");
    let (_, count) = stored(&bot.client).await;
    assert_eq!(
        count.get("while the broker was down"),
        Some(&1),
        "{count:?}"
    );
    assert!(state_of(&state)["outbox"]
        .as_array()
        .is_some_and(|o| o.is_empty()));

    // The broker dies again; the bot queues a send and is stopped before
    // the broker is back. bob writes while the bot is away.
    b.kill9();
    bot.until(|e| matches!(e, Event::Disconnected { .. })).await;
    let queued = bot
        .client
        .send(DM, json!("queued before my restart"))
        .await
        .expect("send while offline");
    bot.close().await;
    b.restart();
    let mut bob = v5_user(&b, "bob").await;
    bob_sends(&mut bob, "b-2", "again").await;

    // Second run, same state file: the session is there; the queued send
    // goes out once, bob's new message is shown and answered once, and
    // nothing from the first run is shown again.
    let mut bot = Bot::start(&b, &state).await;
    assert!(bot.connected().await, "the session is kept");
    let queued_seq = bot.acked(&queued).await;
    bot.until(|e| matches!(e, Event::Message(m) if text_of(&m.body) == "echo: again"))
        .await;
    bot.quiet().await;
    let shown = bot.shown();
    assert_once_in_order(&shown, "second run");
    assert!(
        shown.iter().all(|(seq, _, _)| *seq > 3),
        "only what is new: {shown:?}"
    );
    let texts: Vec<&str> = shown.iter().map(|(_, _, t)| t.as_str()).collect();
    for t in ["again", "queued before my restart", "echo: again"] {
        assert_eq!(
            texts.iter().filter(|x| **x == t).count(),
            1,
            "{t}: {shown:?}"
        );
    }
    assert!(queued_seq > 3);
    bot.close().await;

    // bob writes; another login takes the bot's client id with a clean
    // start, so the broker forgets the bot's session. Third run: the bot
    // fills the gap from history after its last seq, answers once, and
    // shows nothing it showed before.
    let client_id = state_of(&state)["client_id"]
        .as_str()
        .expect("client id")
        .to_string();
    bob_sends(&mut bob, "b-3", "while you were away").await;
    let other = v5_login(v5_options(b.addr, &client_id, "bot", false)).await;
    assert!(!other.connack.session_present);
    other.disconnect().await;
    bob_sends(&mut bob, "b-4", "and after").await;

    let mut bot = Bot::start(&b, &state).await;
    assert!(!bot.connected().await, "the broker lost the session");
    bot.until(|e| matches!(e, Event::Message(m) if text_of(&m.body) == "echo: and after"))
        .await;
    bot.quiet().await;
    let shown = bot.shown();
    assert_once_in_order(&shown, "third run");
    let texts: Vec<&str> = shown
        .iter()
        .filter(|(_, from, _)| from == "bob")
        .map(|(_, _, t)| t.as_str())
        .collect();
    assert_eq!(
        texts,
        ["while you were away", "and after"],
        "only the new ones: {shown:?}"
    );

    // The broker's log: every message once, each of bob's answered once.
    let (history, count) = stored(&bot.client).await;
    for (text, n) in &count {
        assert_eq!(*n, 1, "{text} stored {n} times: {history:?}");
    }
    for t in ["hi", "again", "while you were away", "and after"] {
        assert_eq!(count.get(&format!("echo: {t}")), Some(&1), "{count:?}");
    }
    let seqs: Vec<u64> = history.iter().map(|m| m.seq).collect();
    assert_dense(&seqs, seqs.len() as u64, "history");
    bot.close().await;
}

/// The example itself, as its README runs it: `echo_bot` with the settings
/// in its environment answers bob.
#[tokio::test]
async fn the_echo_bot_example_answers() {
    let b = Broker::start(&config(""));
    let dir = tempfile::tempdir().expect("temp dir");
    let bin = chatmq_tests::binary()
        .with_file_name("examples")
        .join("echo_bot");
    assert!(
        bin.exists(),
        "{} is missing: build all targets first (`cargo build --workspace --all-targets`)",
        bin.display()
    );
    let state = dir.path().join("echo.json");
    let mut bot = std::process::Command::new(&bin)
        .env("CHATMQ_SERVER", b.addr.to_string())
        .env("CHATMQ_USER", "bot")
        .env("CHATMQ_PASSWORD", token("bot"))
        .env("CHATMQ_STATE", &state)
        .stdout(std::process::Stdio::null())
        .spawn()
        .expect("start echo_bot");
    // The process writes its state file on start.
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while !state.exists() {
        assert!(tokio::time::Instant::now() < deadline, "no state file");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    subscribed(&state).await;
    let mut bob = v5_user(&b, "bob").await;
    bob.subscribe(&format!("chat/{DM}"), v5::QoS::AtLeastOnce)
        .await;
    bob_sends(&mut bob, "b-1", "ping").await;
    let got = v5_until(&mut bob, PATIENCE, |g| {
        g.iter().any(|p| json_of(&p.payload)["from"] == "bot")
    })
    .await;
    let _ = bot.kill();
    let _ = bot.wait();
    let answer = got
        .iter()
        .map(|p| json_of(&p.payload))
        .find(|v| v["from"] == "bot")
        .expect("an answer");
    assert_eq!(answer["body"], "echo: ping", "{answer}");
}
