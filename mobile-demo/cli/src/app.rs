//! The terminal front-end on `chatmq-client`: typed lines become calls on
//! the client, the client's events become lines on stdout. Everything a
//! mobile app must get right (session, reconnects, resume, dedup, outbox,
//! the state file) is the library's; this file only reads and prints.
//!
//! `/convs` and `/history` wait for the broker's answer in a task of their
//! own, so events keep flowing while they wait.

use anyhow::{bail, Context, Result};
use chatmq_client::{Client, Error, Event, Message, Options as ClientOptions};
use serde_json::Value;
use tokio::sync::mpsc;

use crate::args::Options;
use crate::command::{self, Command};
use crate::output::Printer;

/// Whether to keep reading commands.
#[derive(Debug, PartialEq)]
enum Flow {
    Continue,
    Quit,
}

/// An answer of the broker to `/convs` or `/history`.
enum Answer {
    Conversations {
        current: Option<String>,
        result: Result<Vec<Value>, Error>,
    },
    History {
        conv: String,
        result: Result<Vec<Message>, Error>,
    },
}

struct App {
    client: Client,
    out: Printer,
    current: Option<String>,
    /// Whether the last connection event said connected (for the words of
    /// the `sent` line only).
    online: bool,
    answers: mpsc::Sender<Answer>,
}

/// Runs the client until `/quit`, end of input or Ctrl-C.
pub async fn run(opts: Options) -> Result<()> {
    let mut options =
        ClientOptions::new(opts.server.clone(), &opts.user, &opts.password, &opts.state);
    options.client_id = opts.client_id.clone();
    options.client_id_prefix = "chatmq-cli".into();
    if let (true, Some(path)) = (opts.server.uses_tls(), &opts.ca) {
        let pem = std::fs::read(path)
            .with_context(|| format!("--ca {}: cannot read it", path.display()))?;
        options.ca_pem = Some(pem);
    }
    let (client, mut events) = Client::start(options).await?;
    let (answers, mut answered) = mpsc::channel(16);
    let mut app = App {
        client,
        out: Printer::new(opts.json),
        current: None,
        online: false,
        answers,
    };
    let mut lines = stdin_lines();
    loop {
        let flow = tokio::select! {
            line = lines.recv() => match line {
                Some(line) => app.command(&line).await?,
                None => Flow::Quit,
            },
            event = events.next() => match event {
                Some(event) => { app.event(event)?; Flow::Continue }
                None => bail!("the client stopped"),
            },
            Some(answer) = answered.recv() => { app.answer(answer); Flow::Continue }
            _ = tokio::signal::ctrl_c() => Flow::Quit,
        };
        if flow == Flow::Quit {
            break;
        }
    }
    app.client.close().await;
    Ok(())
}

/// Lines typed on stdin, read on a thread of their own (a blocking read
/// has no place on the runtime); the channel closes at end of input.
fn stdin_lines() -> mpsc::Receiver<String> {
    let (tx, rx) = mpsc::channel(64);
    std::thread::spawn(move || {
        for line in std::io::stdin().lines() {
            let Ok(line) = line else { break };
            if tx.blocking_send(line).is_err() {
                break;
            }
        }
    });
    rx
}

/// The words for a failed `/convs` or `/history`.
fn failure(command: &str, e: &Error) -> String {
    match e {
        Error::Offline => format!("offline: /{command} needs the broker"),
        other => other.to_string(),
    }
}

impl App {
    async fn command(&mut self, line: &str) -> Result<Flow> {
        let cmd = match command::parse(line, self.client.user()) {
            Ok(cmd) => cmd,
            Err(e) => {
                self.out.error(&e);
                return Ok(Flow::Continue);
            }
        };
        match cmd {
            Command::Nothing => {}
            Command::Quit => return Ok(Flow::Quit),
            Command::Help => self.out.help(),
            Command::Open(conv) => {
                let last = self.client.open(&conv).await?;
                self.out.opened(&conv, last);
                self.current = Some(conv);
            }
            Command::Convs => {
                let client = self.client.clone();
                let answers = self.answers.clone();
                let current = self.current.clone();
                tokio::spawn(async move {
                    let result = client.conversations().await;
                    let _ = answers
                        .send(Answer::Conversations { current, result })
                        .await;
                });
            }
            Command::History(n) => match self.current.clone() {
                Some(conv) => {
                    let client = self.client.clone();
                    let answers = self.answers.clone();
                    tokio::spawn(async move {
                        let result = client.history(&conv, n).await;
                        let _ = answers.send(Answer::History { conv, result }).await;
                    });
                }
                None => self
                    .out
                    .error("no conversation open: /open CONV or /dm USER first"),
            },
            Command::Send(text) => match self.current.clone() {
                Some(conv) => {
                    // Back once the send is in the state file's outbox.
                    let id = self.client.send(&conv, Value::String(text)).await?;
                    self.out.sent(&id, &conv, self.online);
                }
                None => self
                    .out
                    .error("no conversation open: /open CONV or /dm USER first"),
            },
        }
        Ok(Flow::Continue)
    }

    fn event(&mut self, event: Event) -> Result<()> {
        match event {
            Event::Connected {
                client_id,
                session_present,
            } => {
                self.online = true;
                self.out.connected(&client_id, session_present);
            }
            Event::Disconnected { error, retry_in } => {
                self.online = false;
                self.out.disconnected(&error, retry_in);
            }
            Event::Message(m) => self.out.message(&m),
            Event::Acked { id, conv, seq } => self.out.acked(&id, &conv, seq),
            Event::Rejected { id, conv, reason } => self.out.rejected(&id, &conv, &reason),
            Event::Notice(data) => self.out.notice(&data),
            Event::Warning(message) => self.out.error(&message),
            Event::Refused(error) | Event::Failed(error) => bail!(error),
        }
        Ok(())
    }

    fn answer(&mut self, answer: Answer) {
        match answer {
            Answer::Conversations { current, result } => match result {
                Ok(list) => self.out.conversations(&list, current.as_deref()),
                Err(e) => self.out.error(&failure("convs", &e)),
            },
            Answer::History { conv, result } => match result {
                Ok(messages) => self.out.history(&conv, &messages),
                Err(e) => self.out.error(&failure("history", &e)),
            },
        }
    }
}
