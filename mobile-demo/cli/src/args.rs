//! The command line (clap). The checks clap cannot express (the server
//! URL's scheme and port, the user id's alphabet, the client id's length)
//! run as value parsers, so every mistake is reported the same way.

use std::path::PathBuf;

use anyhow::{bail, Result};
use chatmq_client::Server;
use clap::{CommandFactory, Parser};

/// The commands typed on stdin: shown by `--help` and by `/help`.
const COMMANDS: &str = "\
commands (stdin):
  /open CONV      select a conversation      /dm USER    select dm with USER
  /convs          your conversations, unread /history N  last N messages here
  /edit SEQ TEXT  change your message SEQ    /delete SEQ delete your message SEQ
  /react SEQ EMOJI    react to message SEQ   /unreact SEQ EMOJI  take it back
  /attach FILE [TEXT] send FILE (needs --http)
  /download ID [FILE] save attachment ID (needs --http)
  /quit           leave (the session stays)  TEXT        send TEXT here";

/// chatmq-cli: a terminal chat client for chatmq (MQTT 5)
#[derive(Debug, Parser)]
#[command(name = "chatmq-cli", version, after_help = COMMANDS)]
struct Args {
    /// The broker: HOST:PORT or mqtt://HOST:PORT (MQTT over TCP),
    /// mqtts://HOST:PORT (TLS), ws://HOST:PORT/PATH or wss://HOST:PORT/PATH
    /// (WebSocket, e.g. /mqtt)
    #[arg(long, value_name = "SERVER", value_parser = parse_server)]
    server: Server,
    /// PEM certificate(s) to trust for mqtts://, wss:// and https://
    /// (default: the system's roots)
    #[arg(long, value_name = "FILE")]
    ca: Option<PathBuf>,
    /// The broker's HTTP API, http://HOST:PORT or https://HOST:PORT: for
    /// /attach and /download (the password must then be a JWT)
    #[arg(long, value_name = "URL")]
    http: Option<String>,
    /// Your user id (the MQTT user name)
    #[arg(long, value_name = "USER", value_parser = parse_user)]
    user: String,
    /// A JWT or a static password; CHATMQ_PASSWORD keeps it out of `ps`
    #[arg(
        long,
        value_name = "PASSWORD",
        env = "CHATMQ_PASSWORD",
        hide_env_values = true
    )]
    password: String,
    /// The MQTT client id on first use (default: generated); kept in the
    /// state file afterwards
    #[arg(long, value_name = "ID", value_parser = parse_client_id)]
    client_id: Option<String>,
    /// Where the session is kept (default: chatmq-cli-USER.json)
    #[arg(long, value_name = "FILE")]
    state: Option<PathBuf>,
    /// One JSON object per line on stdout, for programs
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Options {
    pub server: Server,
    /// Certificates to trust for TLS instead of the system's.
    pub ca: Option<PathBuf>,
    /// The HTTP API, for attachments.
    pub http: Option<String>,
    pub user: String,
    pub password: String,
    pub client_id: Option<String>,
    pub state: PathBuf,
    pub json: bool,
}

/// Parses the process's arguments; `--help`, `--version` and mistakes end
/// the process the way clap does (exit 0, or 2 with the mistake named).
pub fn from_env() -> Options {
    Args::parse().into()
}

/// Parses `args` (after the program name), for tests.
#[cfg(test)]
fn parse<I: IntoIterator<Item = String>>(args: I) -> Result<Options, clap::Error> {
    let argv = std::iter::once("chatmq-cli".to_string()).chain(args);
    Args::try_parse_from(argv).map(Options::from)
}

/// The usage text, for `/help`.
pub fn usage() -> String {
    Args::command().render_help().to_string()
}

impl From<Args> for Options {
    fn from(a: Args) -> Options {
        Options {
            server: a.server,
            ca: a.ca,
            http: a.http,
            state: a
                .state
                .unwrap_or_else(|| PathBuf::from(format!("chatmq-cli-{}.json", a.user))),
            user: a.user,
            password: a.password,
            client_id: a.client_id,
            json: a.json,
        }
    }
}

/// `HOST:PORT` or a URL whose scheme picks the transport (the library's
/// parser, so the CLI and an app read an address alike).
fn parse_server(server: &str) -> Result<Server, chatmq_client::Error> {
    server.parse()
}

fn parse_user(user: &str) -> Result<String> {
    if !valid_user(user) {
        bail!("{user:?} is not a user id ([A-Za-z0-9_-], 1 to 64 characters)");
    }
    Ok(user.to_string())
}

fn parse_client_id(id: &str) -> Result<String> {
    if id.is_empty() || id.len() > 128 {
        bail!("a client id has 1 to 128 characters");
    }
    Ok(id.to_string())
}

/// `[A-Za-z0-9_-]{1,64}` (DESIGN §4).
pub fn valid_user(u: &str) -> bool {
    (1..=64).contains(&u.len())
        && u.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

#[cfg(test)]
mod tests {
    use super::*;
    use chatmq_client::Transport;

    fn args(s: &str) -> Vec<String> {
        s.split_whitespace().map(str::to_string).collect()
    }

    /// Parses with CHATMQ_PASSWORD unset (clap reads it for `--password`).
    fn parsed(s: &str) -> Result<Options, clap::Error> {
        parse(args(s))
    }

    #[test]
    fn a_full_command_line_parses() {
        let got = parsed(
            "--server 127.0.0.1:1883 --http http://127.0.0.1:8080 --user alice --password pw --client-id c1 --state s.json --json",
        )
        .unwrap();
        assert_eq!(
            got,
            Options {
                server: Server {
                    host: "127.0.0.1".into(),
                    port: 1883,
                    transport: Transport::Tcp,
                },
                ca: None,
                http: Some("http://127.0.0.1:8080".into()),
                user: "alice".into(),
                password: "pw".into(),
                client_id: Some("c1".into()),
                state: PathBuf::from("s.json"),
                json: true,
            }
        );
    }

    #[test]
    fn defaults() {
        let o = parsed("--server h:1 --user bob --password jwt").unwrap();
        assert_eq!(o.password, "jwt");
        assert_eq!(o.state, PathBuf::from("chatmq-cli-bob.json"));
        assert!(!o.json && o.client_id.is_none());
    }

    #[test]
    fn the_server_url_picks_the_transport() {
        let server = |s: &str| match parsed(&format!("--server {s} --user a --password p")) {
            Ok(o) => (o.server.host, o.server.port, o.server.transport),
            other => panic!("{s}: {other:?}"),
        };
        assert_eq!(server("h:1883"), ("h".into(), 1883, Transport::Tcp));
        assert_eq!(server("mqtt://h:1883"), ("h".into(), 1883, Transport::Tcp));
        assert_eq!(server("mqtts://h:8883"), ("h".into(), 8883, Transport::Tls));
        let ws = "ws://chat.example.com:8083/mqtt";
        assert_eq!(
            server(ws),
            ("chat.example.com".into(), 8083, Transport::Ws(ws.into()))
        );
        let wss = "wss://[::1]:8084/mqtt";
        assert_eq!(
            server(wss),
            ("::1".into(), 8084, Transport::Wss(wss.into()))
        );
        let err = |s: &str| {
            parsed(&format!("--server {s} --user a --password p"))
                .unwrap_err()
                .to_string()
        };
        assert!(err("http://h:80").contains("unknown scheme"));
        assert!(err("mqtt://h:1/x").contains("no path"));
        assert!(err("wss://h/mqtt").contains("HOST:PORT"));
    }

    #[test]
    fn mistakes_are_named() {
        let err = |s: &str| parsed(s).unwrap_err().to_string();
        assert!(err("--user a --password p").contains("--server"));
        assert!(err("--server h --user a --password p").contains("HOST:PORT"));
        assert!(err("--server h:1 --user a/b --password p").contains("user id"));
        if std::env::var_os("CHATMQ_PASSWORD").is_none() {
            assert!(err("--server h:1 --user a").contains("--password"));
        }
        assert!(err("--server h:1 --user a --password p --bogus").contains("--bogus"));
        assert!(err("--server").contains("--server"));
        assert!(err("--server h:1 --user a --password p --client-id").contains("--client-id"));
        let help = parsed("--help").unwrap_err();
        assert_eq!(help.kind(), clap::error::ErrorKind::DisplayHelp);
    }

    #[test]
    fn the_usage_lists_the_options_and_the_stdin_commands() {
        let text = usage();
        for word in [
            "--server",
            "--password",
            "CHATMQ_PASSWORD",
            "/open CONV",
            "/quit",
        ] {
            assert!(text.contains(word), "{word} missing from:\n{text}");
        }
    }
}
