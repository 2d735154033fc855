//! The terminal front-end on `chatmq-client`: typed lines become calls on
//! the client, the client's events become lines on stdout. Everything a
//! mobile app must get right (session, reconnects, resume, dedup, outbox,
//! the state file) is the library's; this file only reads and prints.
//!
//! `/convs`, `/history`, `/edit`, `/delete`, `/react`, `/unreact` wait for
//! the broker's answer, and `/attach` and `/download` for the HTTP API, in
//! a task of their own, so events keep flowing while they wait.

use std::collections::BTreeMap;
use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use chatmq_client::{
    Client, Downloaded, Error, Event, Message, Options as ClientOptions, Reaction, Uploaded,
};
use serde_json::{json, Value};
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
    /// `/edit` (`what` = `edited`) or `/delete` (`deleted`).
    Changed {
        what: &'static str,
        conv: String,
        seq: u64,
        result: Result<u64, Error>,
    },
    Reacted {
        conv: String,
        seq: u64,
        emoji: String,
        added: bool,
        result: Result<BTreeMap<String, Reaction>, Error>,
    },
    /// `/attach`: the upload, then the envelope id of the message sent
    /// with it.
    Attached {
        conv: String,
        file: PathBuf,
        result: Result<(Uploaded, String), String>,
    },
    Downloaded {
        id: String,
        result: Result<Downloaded, Error>,
    },
}

struct App {
    client: Client,
    out: Printer,
    current: Option<String>,
    /// Whether the last connection event said connected (for the words of
    /// the `sent` line only).
    online: bool,
    /// Whether `--http` was given (attachments need it).
    http: bool,
    answers: mpsc::Sender<Answer>,
}

/// Runs the client until `/quit`, end of input or Ctrl-C.
pub async fn run(opts: Options) -> Result<()> {
    let mut options =
        ClientOptions::new(opts.server.clone(), &opts.user, &opts.password, &opts.state);
    options.client_id = opts.client_id.clone();
    options.client_id_prefix = "chatmq-cli".into();
    options.http = opts.http.clone();
    let https = opts
        .http
        .as_deref()
        .is_some_and(|h| h.starts_with("https:"));
    if let (true, Some(path)) = (opts.server.uses_tls() || https, &opts.ca) {
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
        http: opts.http.is_some(),
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

/// The words for a failed command that needed the broker.
fn failure(command: &str, e: &Error) -> String {
    match e {
        Error::Offline => format!("offline: /{command} needs the broker"),
        other => format!("/{command}: {other}"),
    }
}

const NO_CONVERSATION: &str = "no conversation open: /open CONV or /dm USER first";
const NO_HTTP: &str =
    "attachments go over the broker's HTTP API: start chatmq-cli with --http http://HOST:PORT";

/// `/attach`: reads `file`, uploads it to `conv` and sends a message with
/// `text` referencing it (with the file's name, type and size, which other
/// clients show).
async fn attach(
    client: &Client,
    conv: &str,
    file: &std::path::Path,
    text: String,
) -> Result<(Uploaded, String), String> {
    let uploaded = client
        .upload_file(conv, file)
        .await
        .map_err(|e| failure("attach", &e))?;
    let name = file
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let body = json!({"text": text, "attachments": [{
        "id": uploaded.id, "name": name,
        "content_type": uploaded.content_type, "size": uploaded.size,
    }]});
    let id = client
        .send(conv, body)
        .await
        .map_err(|e| failure("attach", &e))?;
    Ok((uploaded, id))
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
        if matches!(cmd, Command::Attach { .. } | Command::Download { .. }) && !self.http {
            self.out.error(NO_HTTP);
            return Ok(Flow::Continue);
        }
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
            Command::Download { id, to } => {
                // Never a name from someone's message: the id is the name.
                let to = to.unwrap_or_else(|| PathBuf::from(&id));
                self.spawn(|client| async move {
                    let result = client.download(&id, &to).await;
                    Answer::Downloaded { id, result }
                });
            }
            Command::Send(text) => {
                let Some(conv) = self.current.clone() else {
                    self.out.error(NO_CONVERSATION);
                    return Ok(Flow::Continue);
                };
                // Back once the send is in the state file's outbox.
                let id = self.client.send(&conv, Value::String(text)).await?;
                self.out.sent(&id, &conv, self.online);
            }
            in_conversation => {
                let Some(conv) = self.current.clone() else {
                    self.out.error(NO_CONVERSATION);
                    return Ok(Flow::Continue);
                };
                self.in_conversation(conv, in_conversation);
            }
        }
        Ok(Flow::Continue)
    }

    /// A command on the open conversation that waits for an answer.
    fn in_conversation(&mut self, conv: String, cmd: Command) {
        match cmd {
            Command::History(n) => self.spawn(|client| async move {
                let result = client.history(&conv, n).await;
                Answer::History { conv, result }
            }),
            Command::Edit { seq, text } => self.spawn(|client| async move {
                let result = client.edit(&conv, seq, Value::String(text)).await;
                Answer::Changed {
                    what: "edited",
                    conv,
                    seq,
                    result,
                }
            }),
            Command::Delete(seq) => self.spawn(|client| async move {
                let result = client.delete(&conv, seq).await;
                Answer::Changed {
                    what: "deleted",
                    conv,
                    seq,
                    result,
                }
            }),
            Command::React { seq, emoji, add } => self.spawn(|client| async move {
                let result = if add {
                    client.react(&conv, seq, &emoji).await
                } else {
                    client.unreact(&conv, seq, &emoji).await
                };
                Answer::Reacted {
                    conv,
                    seq,
                    emoji,
                    added: add,
                    result,
                }
            }),
            Command::Attach { file, text } => self.spawn(|client| async move {
                let result = attach(&client, &conv, &file, text).await;
                Answer::Attached { conv, file, result }
            }),
            _ => {}
        }
    }

    /// Runs `task` on a clone of the client; its answer is printed when
    /// it comes.
    fn spawn<F>(&self, task: impl FnOnce(Client) -> F)
    where
        F: std::future::Future<Output = Answer> + Send + 'static,
    {
        let answers = self.answers.clone();
        let answer = task(self.client.clone());
        tokio::spawn(async move {
            let _ = answers.send(answer.await).await;
        });
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
            Event::Reactions { conv, messages } => self.out.reactions(&conv, &messages),
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
            Answer::Changed {
                what,
                conv,
                seq,
                result,
            } => match result {
                Ok(event_seq) => self.out.changed(what, &conv, seq, event_seq),
                Err(e) => {
                    let command = if what == "edited" { "edit" } else { "delete" };
                    self.out.error(&failure(command, &e))
                }
            },
            Answer::Reacted {
                conv,
                seq,
                emoji,
                added,
                result,
            } => match result {
                Ok(summary) => self.out.reacted(&conv, seq, &emoji, added, &summary),
                Err(e) => {
                    let command = if added { "react" } else { "unreact" };
                    self.out.error(&failure(command, &e))
                }
            },
            Answer::Attached { conv, file, result } => match result {
                Ok((uploaded, id)) => {
                    self.out.uploaded(&conv, &file, &uploaded);
                    self.out.sent(&id, &conv, self.online);
                }
                Err(e) => self.out.error(&e),
            },
            Answer::Downloaded { id, result } => match result {
                Ok(d) => self.out.downloaded(&id, &d),
                Err(e) => self.out.error(&failure("download", &e)),
            },
        }
    }
}
