//! Black-box test support: the real `chatmq` binary on real sockets.
//!
//! [`Broker::start`] writes a config file into a fresh temporary directory,
//! runs the binary on a free port (listen address and data directory come
//! in through `CHATMQ__...` environment overrides, so every test also uses
//! them), and waits for its `chatmq: ready` line. A broker can be killed
//! with SIGKILL or stopped with SIGTERM and started again on the same data.
//!
//! Clients: rumqttc (v4 and v5) through [`v4`] and [`v5`] helpers, raw
//! bytes through [`raw`] (TCP) and [`ws`] (WebSocket), the HTTP API
//! through [`http`], and browsers (Chromium driven by Node scripts) through
//! [`web`]. [`tls`] makes a throwaway CA for the TLS listeners. [`nats`]
//! runs a NATS JetStream cluster for the `[cluster]` tests.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

pub mod chat;
pub mod cli;
pub mod cluster;
pub mod http;
pub mod metrics;
pub mod nats;
pub mod promql;
pub mod push_mock;
pub mod raw;
pub mod tls;
pub mod tools;
pub mod v4;
pub mod v5;
pub mod web;
pub mod ws;

/// How long a test waits for something that should happen promptly.
pub const PATIENCE: Duration = Duration::from_secs(10);

/// How long a broker may take to start: opening RocksDB on a loaded
/// machine (parallel tests, a build next door) can take seconds.
const STARTUP: Duration = Duration::from_secs(30);

/// The `chatmq` binary built from this workspace.
pub fn binary() -> PathBuf {
    if let Some(p) = std::env::var_os("CHATMQ_BIN") {
        return PathBuf::from(p);
    }
    // target/<profile>/deps/<test> -> target/<profile>/chatmq
    let exe = std::env::current_exe().expect("test executable path");
    let profile_dir = exe
        .parent()
        .and_then(|deps| deps.parent())
        .expect("target/<profile> directory");
    let bin = profile_dir.join("chatmq");
    assert!(
        bin.exists(),
        "{} is missing: build it first (`cargo build -p chatmq-broker`), as scripts/test.sh does",
        bin.display()
    );
    bin
}

/// Runs `chatmq` with `args` in `cwd` until it exits (it must, within
/// PATIENCE) and returns what it printed.
pub fn run_chatmq(cwd: &Path, args: &[&str], env: &[(&str, &str)]) -> std::process::Output {
    let mut cmd = Command::new(binary());
    cmd.current_dir(cwd)
        .args(args)
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let child = cmd.spawn().expect("spawn chatmq");
    tools::finish_within(child, &format!("chatmq {args:?}"), PATIENCE)
}

/// The single line a failed start printed on stderr.
pub fn the_error_line(out: &std::process::Output) -> String {
    assert!(!out.status.success(), "expected a non-zero exit");
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(lines.len(), 1, "expected one stderr line, got:\n{stderr}");
    lines[0].to_string()
}

/// A running `chatmq serve` process.
pub struct Broker {
    child: Option<Child>,
    pub addr: SocketAddr,
    /// Where the HTTP API listens.
    pub http_addr: SocketAddr,
    /// Every listener by the name the broker prints (`mqtt`, `http`,
    /// `websocket`, `mqtt-tls`, `websocket-tls`).
    pub listeners: BTreeMap<String, SocketAddr>,
    dir: tempfile::TempDir,
    config: String,
    env: Vec<(String, String)>,
}

impl Broker {
    /// Starts a broker with `config` as its TOML file (may be empty).
    pub fn start(config: &str) -> Broker {
        Self::start_with_env(config, &[])
    }

    /// Starts a broker with extra environment overrides.
    pub fn start_with_env(config: &str, env: &[(&str, &str)]) -> Broker {
        let dir = tempfile::tempdir().expect("temp dir");
        let mut b = Broker {
            child: None,
            addr: "127.0.0.1:0".parse().expect("addr"),
            http_addr: "127.0.0.1:0".parse().expect("addr"),
            listeners: BTreeMap::new(),
            dir,
            config: config.to_string(),
            env: env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        };
        b.spawn(&[]);
        b
    }

    /// Where MQTT over WebSocket listens (`ws://`).
    pub fn ws_addr(&self) -> SocketAddr {
        self.listener("websocket")
    }

    /// A listener by the name the broker prints; panics if there is none.
    pub fn listener(&self, name: &str) -> SocketAddr {
        match self.listeners.get(name) {
            Some(addr) => *addr,
            None => panic!("the broker has no {name} listener: {:?}", self.listeners),
        }
    }

    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The command line that runs this broker, for tests of the CLI itself.
    pub fn command(&self) -> Command {
        let config_path = self.dir.path().join("chatmq.toml");
        std::fs::write(&config_path, &self.config).expect("write config");
        let mut cmd = Command::new(binary());
        cmd.arg("serve")
            .arg("--config")
            .arg(&config_path)
            .env("CHATMQ__NODE__DATA_DIR", self.data_dir())
            // Never the default ports: tests run side by side.
            .env("CHATMQ__MQTT__LISTEN", "127.0.0.1:0")
            .env("CHATMQ__HTTP__LISTEN", "127.0.0.1:0")
            .env("CHATMQ__WEBSOCKET__LISTEN", "127.0.0.1:0")
            // CHATMQ_TEST_LOG=info (or a filter) shows more in the
            // log a failing test prints.
            .env(
                "RUST_LOG",
                std::env::var("CHATMQ_TEST_LOG").unwrap_or_else(|_| "warn".to_string()),
            );
        for (k, v) in &self.env {
            cmd.env(k, v);
        }
        cmd
    }

    /// Runs the binary; `listen` overrides listener addresses (a restart
    /// keeps its ports) as (listener name, address).
    fn spawn(&mut self, listen: &[(String, SocketAddr)]) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("broker.log"))
            .expect("log file");
        let mut command = self.command();
        for (name, addr) in listen {
            command.env(listen_variable(name), addr.to_string());
        }
        let mut child = command
            .stdout(Stdio::piped())
            .stderr(log)
            .spawn()
            .expect("spawn chatmq");
        let stdout = child.stdout.take().expect("stdout");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        let deadline = Instant::now() + STARTUP;
        self.listeners.clear();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok(line) if line == "chatmq: ready" => break,
                Ok(line) => {
                    let listening = line
                        .strip_prefix("chatmq: ")
                        .and_then(|rest| rest.split_once(" listening on "));
                    if let Some((name, addr)) = listening {
                        if let Ok(addr) = addr.parse() {
                            self.listeners.insert(name.to_string(), addr);
                        }
                    }
                }
                Err(_) => {
                    let _ = child.kill();
                    panic!("chatmq did not become ready; log:\n{}", self.log());
                }
            }
        }
        self.addr = self.listener("mqtt");
        self.http_addr = self.listener("http");
        self.child = Some(child);
    }

    /// The broker's stderr so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("broker.log")).unwrap_or_default()
    }

    /// The process id while running, for what `/proc` tells (memory, fds).
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// SIGKILL: no shutdown, no flush.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM, and the exit status once it has stopped.
    pub fn terminate(&mut self) -> ExitStatus {
        let mut c = self.child.take().expect("broker is running");
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(c.id().to_string())
            .status();
        let deadline = Instant::now() + PATIENCE;
        loop {
            if let Ok(Some(status)) = c.try_wait() {
                return status;
            }
            if Instant::now() > deadline {
                let _ = c.kill();
                panic!("chatmq did not stop on SIGTERM");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits for the broker to stop by itself (a drain), and its exit status.
    pub fn wait_exit(&mut self, within: Duration) -> ExitStatus {
        let mut c = self.child.take().expect("broker is running");
        let deadline = Instant::now() + within;
        loop {
            if let Ok(Some(status)) = c.try_wait() {
                return status;
            }
            if Instant::now() > deadline {
                let _ = c.kill();
                panic!(
                    "chatmq did not stop within {within:?}; log:\n{}",
                    self.log()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Starts again on the same data directory and the same ports.
    pub fn restart(&mut self) {
        self.kill9();
        let listen: Vec<(String, SocketAddr)> = self
            .listeners
            .iter()
            .map(|(name, addr)| (name.clone(), *addr))
            .collect();
        let deadline = Instant::now() + PATIENCE;
        // The ports were just freed; retry briefly if the OS has not let go.
        loop {
            let free = listen
                .iter()
                .all(|(_, addr)| std::net::TcpListener::bind(addr).is_ok());
            if free || Instant::now() > deadline {
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        self.spawn(&listen);
    }

    pub fn host(&self) -> String {
        self.addr.ip().to_string()
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }
}

/// The environment variable that sets a listener's address.
fn listen_variable(name: &str) -> String {
    let section = match name {
        "mqtt-tls" => "MQTT__TLS",
        "websocket-tls" => "WEBSOCKET__TLS",
        other => return format!("CHATMQ__{}__LISTEN", other.to_uppercase()),
    };
    format!("CHATMQ__{section}__LISTEN")
}

impl Drop for Broker {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// A config that lets anyone do anything: for tests about the protocol,
/// not about access control.
pub const OPEN: &str = r##"
[auth]
allow_anonymous = true

[[acl.rules]]
user = "*"
topic = "#"
access = "pubsub"
"##;
