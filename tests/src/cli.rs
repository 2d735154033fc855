//! The `chatmq-cli` terminal client as a child process: lines go to its
//! stdin, and with `--json` every event comes back as one JSON object per
//! line on its stdout, read here on a thread.

use std::io::{BufRead, BufReader, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, ExitStatus, Stdio};
use std::time::Duration;

use serde_json::Value;
use tokio::sync::mpsc;

use crate::PATIENCE;

/// The `chatmq-cli` binary, built next to `chatmq` (`CHATMQ_CLI_BIN`
/// overrides).
pub fn binary() -> PathBuf {
    if let Some(p) = std::env::var_os("CHATMQ_CLI_BIN") {
        return PathBuf::from(p);
    }
    let bin = crate::binary().with_file_name("chatmq-cli");
    assert!(
        bin.exists(),
        "{} is missing: build all targets first (`cargo build --workspace --all-targets`), as scripts/test.sh does",
        bin.display()
    );
    bin
}

/// The state file (chatmq-cli's and chatmq-client's) as JSON.
pub fn state_of(path: &Path) -> Value {
    let text = std::fs::read_to_string(path).expect("read the state file");
    serde_json::from_str(&text).expect("the state file is JSON")
}

/// Waits until the state file says the session's subscriptions are in,
/// so that what is sent next reaches the client live.
pub async fn subscribed(state: &Path) {
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while state_of(state)["subscribed"] != true {
        assert!(tokio::time::Instant::now() < deadline, "never subscribed");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A running `chatmq-cli --json`.
pub struct Cli {
    child: Child,
    stdin: Option<ChildStdin>,
    events: mpsc::Receiver<Value>,
    /// Every event read so far, in order.
    pub log: Vec<Value>,
    stderr: PathBuf,
}

impl Cli {
    /// Starts `user`'s client on the broker at `addr` with a fresh JWT and
    /// the state file `state`; its stderr goes next to the state file.
    pub fn start(addr: SocketAddr, user: &str, state: &Path) -> Cli {
        Cli::start_with_password(addr, user, state, &crate::chat::token(user))
    }

    /// [`Cli::start`] on broker `b` with its HTTP API (`--http`), which
    /// `/attach` and `/download` use.
    pub fn start_with_http(b: &crate::Broker, user: &str, state: &Path) -> Cli {
        let http = format!("http://{}", b.http_addr);
        let password = crate::chat::token(user);
        Cli::start_at(
            &b.addr.to_string(),
            &["--http", &http],
            user,
            state,
            &password,
        )
    }

    /// [`Cli::start`] with the password given.
    pub fn start_with_password(addr: SocketAddr, user: &str, state: &Path, password: &str) -> Cli {
        Cli::start_at(&addr.to_string(), &[], user, state, password)
    }

    /// Starts `chatmq-cli --server server extra...` for `user`.
    pub fn start_at(server: &str, extra: &[&str], user: &str, state: &Path, password: &str) -> Cli {
        let stderr = state.with_extension("stderr");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&stderr)
            .expect("stderr file");
        let mut child = Command::new(binary())
            .arg("--server")
            .arg(server)
            .args(extra)
            .arg("--user")
            .arg(user)
            .arg("--state")
            .arg(state)
            .arg("--json")
            .env("CHATMQ_PASSWORD", password)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(log)
            .spawn()
            .expect("spawn chatmq-cli");
        let stdout = child.stdout.take().expect("stdout");
        let (tx, events) = mpsc::channel(4096);
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                let event = serde_json::from_str(&line).unwrap_or_else(|e| {
                    panic!("chatmq-cli printed a line that is not JSON ({e}): {line}")
                });
                if tx.blocking_send(event).is_err() {
                    return;
                }
            }
        });
        Cli {
            stdin: child.stdin.take(),
            child,
            events,
            log: Vec::new(),
            stderr,
        }
    }

    /// Types `line`.
    pub fn type_line(&mut self, line: &str) {
        let stdin = self.stdin.as_mut().expect("stdin is open");
        writeln!(stdin, "{line}").expect("write to chatmq-cli");
        stdin.flush().expect("flush");
    }

    /// Events until one satisfies `done`, which is returned; panics after
    /// `within` with what arrived.
    pub async fn until(&mut self, within: Duration, mut done: impl FnMut(&Value) -> bool) -> Value {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            match tokio::time::timeout_at(deadline, self.events.recv()).await {
                Ok(Some(event)) => {
                    self.log.push(event.clone());
                    if done(&event) {
                        return event;
                    }
                }
                Ok(None) => panic!(
                    "chatmq-cli ended; stderr: {}\nevents: {:#?}",
                    self.stderr(),
                    self.log
                ),
                Err(_) => panic!(
                    "gave up after {within:?}; stderr: {}\nevents: {:#?}",
                    self.stderr(),
                    self.log
                ),
            }
        }
    }

    /// The next event named `name` (`connected`, `message`, ...).
    pub async fn next_event(&mut self, name: &str) -> Value {
        self.until(PATIENCE, |e| e["event"] == name).await
    }

    /// Every event arriving within `d`.
    pub async fn events_for(&mut self, d: Duration) -> Vec<Value> {
        let deadline = tokio::time::Instant::now() + d;
        let mut got = Vec::new();
        while let Ok(Some(event)) = tokio::time::timeout_at(deadline, self.events.recv()).await {
            self.log.push(event.clone());
            got.push(event);
        }
        got
    }

    /// Events named `name` in the log so far.
    pub fn logged(&self, name: &str) -> Vec<&Value> {
        self.log.iter().filter(|e| e["event"] == name).collect()
    }

    /// Types `/quit` and waits for the process to exit.
    pub async fn quit(&mut self) -> ExitStatus {
        self.type_line("/quit");
        self.wait().await
    }

    /// Waits for the process to exit on its own.
    pub async fn wait(&mut self) -> ExitStatus {
        let deadline = tokio::time::Instant::now() + PATIENCE;
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return status;
            }
            if tokio::time::Instant::now() > deadline {
                panic!("chatmq-cli did not exit; stderr: {}", self.stderr());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// What the client wrote to stderr.
    pub fn stderr(&self) -> String {
        std::fs::read_to_string(&self.stderr).unwrap_or_default()
    }
}

impl Drop for Cli {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
