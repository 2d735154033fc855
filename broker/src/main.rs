//! The `chatmq` command: `chatmq serve [--config FILE]` runs the broker,
//! `chatmq config check [--config FILE]` validates a configuration file.
//!
//! Errors go to stderr as one line naming the key or path to fix, with a
//! non-zero exit. Once listening, `serve` prints one stdout line per
//! listener (`chatmq: mqtt listening on ADDR`, `chatmq: http listening on
//! ADDR`) and then `chatmq: ready`, so scripts and tests can wait for it.

use std::path::PathBuf;
use std::process::ExitCode;

use chatmq_broker::Server;
use chatmq_config::Settings;

const USAGE: &str = "usage: chatmq serve [--config FILE] | chatmq config check [--config FILE]
  the default FILE is config/chatmq.toml; CHATMQ__SECTION__KEY environment variables override it";
const DEFAULT_CONFIG: &str = "config/chatmq.toml";

enum Command {
    Serve(PathBuf),
    Check(PathBuf),
    Help,
    Version,
}

fn parse(args: &[String]) -> Result<Command, String> {
    let mut words = Vec::new();
    let mut config = PathBuf::from(DEFAULT_CONFIG);
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--config" | "-c" => match it.next() {
                Some(f) => config = PathBuf::from(f),
                None => return Err("--config needs a file".into()),
            },
            "-h" | "--help" | "help" => return Ok(Command::Help),
            "-V" | "--version" => return Ok(Command::Version),
            s if s.starts_with("--config=") => config = PathBuf::from(&s["--config=".len()..]),
            s if s.starts_with('-') => return Err(format!("unknown option {s}")),
            s => words.push(s),
        }
    }
    match words.as_slice() {
        ["serve"] => Ok(Command::Serve(config)),
        ["config", "check"] => Ok(Command::Check(config)),
        [] => Err("no command given".into()),
        other => Err(format!("unknown command `{}`", other.join(" "))),
    }
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let command = match parse(&args) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("chatmq: {e}\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    match command {
        Command::Help => {
            println!("{USAGE}");
            ExitCode::SUCCESS
        }
        Command::Version => {
            println!("chatmq {}", env!("CARGO_PKG_VERSION"));
            ExitCode::SUCCESS
        }
        Command::Check(path) => match Settings::load(&path) {
            Ok(_) => {
                println!("chatmq: {} is valid", path.display());
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("chatmq: {e}");
                ExitCode::from(2)
            }
        },
        Command::Serve(path) => serve(&path),
    }
}

fn serve(path: &std::path::Path) -> ExitCode {
    let settings = match Settings::load(path) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("chatmq: {e}");
            return ExitCode::from(2);
        }
    };
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
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
        wait_for_signal().await;
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
