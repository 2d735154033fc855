//! The `chatmq` command: `chatmq serve [--config FILE]` runs the broker,
//! `chatmq config check [--config FILE]` validates a configuration file,
//! and the operator's tools ([`cli`]): `passwd` (a password hash for
//! `[[auth.users]]`), `token` (a user JWT), `status` (what a running node
//! reports), `drain` (move a node's clients away, then stop it). The
//! command line is clap's: `--help` on each.
//!
//! Errors go to stderr as one line naming the key or path to fix, with a
//! non-zero exit. Once listening, `serve` prints one stdout line per
//! listener (`chatmq: mqtt listening on ADDR`, `chatmq: http listening on
//! ADDR`) and then `chatmq: ready`, so scripts and tests can wait for it.

mod cli;

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use chatmq_broker::Server;
use chatmq_config::{LogFormat, Settings};
use clap::{Args, Parser, Subcommand};

/// chatmq: a chat backend that speaks MQTT (3.1.1 and 5) on RocksDB
#[derive(Debug, Parser)]
#[command(name = "chatmq", version, arg_required_else_help = true)]
struct Chatmq {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Runs the broker until SIGTERM or SIGINT
    ///
    /// Prints `chatmq: <listener> listening on ADDR` for each listener, then
    /// `chatmq: ready`; errors are one stderr line naming the key or path.
    Serve(ConfigFile),
    /// Configuration files
    #[command(subcommand, arg_required_else_help = true)]
    Config(ConfigCommand),
    /// Prints an argon2 PHC string for the `password` of an `[[auth.users]]` entry
    ///
    /// The password is read from the terminal without echo (twice), or as
    /// one line from standard input when it is not a terminal:
    /// `printf '%s\n' "$PASSWORD" | chatmq passwd`. An empty one is refused.
    Passwd,
    /// Prints a user JWT the configured broker accepts, for tests and local development
    ///
    /// Signed HS256 with `auth.jwt_secret`, or with --key for a broker that
    /// checks RS256/ES256 tokens against `auth.jwt_public_key`; carries `sub`,
    /// `iat`, `exp` and the configured `auth.jwt_issuer` / `auth.jwt_audience`.
    Token(cli::token::TokenArgs),
    /// Shows what a running node reports: readiness, connections, sessions, queue depths
    ///
    /// Reads `/readyz` and `/metrics` from the node's HTTP API (`http.listen`
    /// of the configuration file, or --url).
    Status(cli::status::StatusArgs),
    /// Moves a running node's clients away, then waits until the node has stopped
    ///
    /// For scale-in and maintenance: the node reports not ready, closes its
    /// MQTT listeners, tells MQTT 5 clients to use another server
    /// (DISCONNECT 0x9C with --server-reference / `drain.server_reference`;
    /// 3.1.1 clients are closed and reconnect) at random moments over
    /// `drain.spread_secs`, then exits 0. Calls `POST /v1/admin/drain` with
    /// the admin token.
    Drain(cli::drain::DrainArgs),
}

#[derive(Debug, Subcommand)]
enum ConfigCommand {
    /// Loads and validates a configuration file (and the environment overrides) without starting
    Check(ConfigFile),
}

/// The configuration file option every subcommand that reads one shares.
#[derive(Debug, Clone, Args)]
pub struct ConfigFile {
    /// The configuration file; `CHATMQ__SECTION__KEY` environment variables override it
    #[arg(
        short = 'c',
        long = "config",
        value_name = "FILE",
        default_value = "config/chatmq.toml"
    )]
    pub path: PathBuf,
}

impl ConfigFile {
    /// The settings, or the one line (naming the key or path) to print.
    pub fn load(&self) -> Result<Settings, String> {
        Settings::load(&self.path).map_err(|e| e.to_string())
    }
}

fn main() -> ExitCode {
    let outcome = match Chatmq::parse().command {
        Command::Serve(config) => return serve(&config.path),
        Command::Config(ConfigCommand::Check(config)) => config
            .load()
            .map(|_| println!("chatmq: {} is valid", config.path.display())),
        Command::Passwd => cli::passwd::run(),
        Command::Token(args) => cli::token::run(&args),
        Command::Drain(args) => cli::drain::run(&args),
        Command::Status(args) => match cli::status::run(&args) {
            Ok(true) => Ok(()),
            // It answered: not ready (starting or stopping).
            Ok(false) => return ExitCode::FAILURE,
            Err(e) => Err(e),
        },
    };
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("chatmq: {e}");
            ExitCode::from(2)
        }
    }
}

fn serve(path: &Path) -> ExitCode {
    let settings = match Settings::load(path) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("chatmq: {e}");
            return ExitCode::from(2);
        }
    };
    let log = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                // The NATS client's own lines stay out unless asked for
                // (RUST_LOG=async_nats=info): `[cluster]` logs what matters
                // itself, and a failed start prints one line.
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,async_nats=off")),
        )
        .with_writer(std::io::stderr);
    match settings.log.format {
        // One object a line; the fields of the spans it is in (an HTTP
        // request's `request_id`) flattened in the current span's.
        LogFormat::Json => log
            .json()
            .with_current_span(true)
            .with_span_list(false)
            .init(),
        LogFormat::Text => log.init(),
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("chatmq: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(async {
        let mut server = match Server::start(settings).await {
            Ok(s) => s,
            Err(e) => {
                eprintln!("chatmq: {e}");
                return ExitCode::FAILURE;
            }
        };
        // `Server::start` binds every listener: both addresses are set.
        let (Some(mqtt), Some(http)) = (server.mqtt_addr, server.http_addr) else {
            eprintln!("chatmq: a listener did not start");
            server.shutdown().await;
            return ExitCode::FAILURE;
        };
        server.reload_from(path.to_path_buf());
        println!("chatmq: mqtt listening on {mqtt}");
        println!("chatmq: http listening on {http}");
        for (name, addr) in &server.edges {
            println!("chatmq: {name} listening on {addr}");
        }
        println!("chatmq: ready");
        tracing::info!(mqtt = %mqtt, http = %http, "chatmq is serving");
        // SIGTERM/SIGINT, or the end of a drain (`chatmq drain`): either
        // way a clean stop, exit 0.
        tokio::select! {
            _ = wait_for_signal() => {}
            _ = server.drained() => {}
        }
        tracing::info!("shutting down");
        server.shutdown().await;
        ExitCode::SUCCESS
    })
}

async fn wait_for_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    match (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) {
        (Ok(mut term), Ok(mut int)) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
        }
        _ => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}
