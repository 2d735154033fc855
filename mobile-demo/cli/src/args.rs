//! The command line, parsed by hand (no argument crate in the workspace).

use std::path::PathBuf;

use anyhow::{anyhow, bail, Result};

pub const USAGE: &str = "\
chatmq-cli: a terminal chat client for chatmq (MQTT 5)

usage: chatmq-cli --server SERVER --user USER --password PASSWORD
                  [--ca FILE] [--client-id ID] [--state FILE] [--json]

  --server SERVER     the broker: HOST:PORT or mqtt://HOST:PORT (MQTT over
                      TCP), mqtts://HOST:PORT (TLS), ws://HOST:PORT/PATH or
                      wss://HOST:PORT/PATH (WebSocket, e.g. /mqtt)
  --ca FILE           PEM certificate(s) to trust for mqtts:// and wss://
                      (default: the system's roots)
  --user USER         your user id (the MQTT user name)
  --password PASSWORD a JWT or a static password; or set CHATMQ_PASSWORD
  --client-id ID      the MQTT client id on first use (default: generated);
                      kept in the state file afterwards
  --state FILE        where the session is kept (default: chatmq-cli-USER.json)
  --json              one JSON object per line on stdout, for programs
  -h, --help          this text

commands (stdin):
  /open CONV      select a conversation      /dm USER    select dm with USER
  /convs          your conversations, unread /history N  last N messages here
  /quit           leave (the session stays)  TEXT        send TEXT here
";

/// How the client reaches the broker.
#[derive(Debug, Clone, PartialEq)]
pub enum Transport {
    Tcp,
    Tls,
    /// MQTT over WebSocket at this URL.
    Ws(String),
    /// MQTT over secure WebSocket at this URL.
    Wss(String),
}

#[derive(Debug, Clone, PartialEq)]
pub struct Options {
    pub host: String,
    pub port: u16,
    pub transport: Transport,
    /// Certificates to trust for TLS instead of the system's.
    pub ca: Option<PathBuf>,
    pub user: String,
    pub password: String,
    pub client_id: Option<String>,
    pub state: PathBuf,
    pub json: bool,
}

/// What the command line asks for.
#[derive(Debug, PartialEq)]
pub enum Invocation {
    Run(Options),
    Help,
}

/// Parses the arguments after the program name; `password_env` is the
/// value of `CHATMQ_PASSWORD`, used when `--password` is absent.
pub fn parse(args: &[String], password_env: Option<String>) -> Result<Invocation> {
    let mut server = None;
    let mut user = None;
    let mut password = None;
    let mut client_id = None;
    let mut state = None;
    let mut ca = None;
    let mut json = false;
    let mut it = args.iter();
    while let Some(arg) = it.next() {
        let mut value = |name: &str| {
            it.next()
                .cloned()
                .ok_or_else(|| anyhow!("{name} needs a value (see --help)"))
        };
        match arg.as_str() {
            "-h" | "--help" => return Ok(Invocation::Help),
            "--server" => server = Some(value("--server")?),
            "--user" => user = Some(value("--user")?),
            "--password" => password = Some(value("--password")?),
            "--client-id" => client_id = Some(value("--client-id")?),
            "--state" => state = Some(PathBuf::from(value("--state")?)),
            "--ca" => ca = Some(PathBuf::from(value("--ca")?)),
            "--json" => json = true,
            other => bail!("unknown argument {other:?} (see --help)"),
        }
    }
    let server = server.ok_or_else(|| anyhow!("--server HOST:PORT is required"))?;
    let (host, port, transport) = parse_server(&server)?;
    let user = user.ok_or_else(|| anyhow!("--user is required"))?;
    if !valid_user(&user) {
        bail!("--user {user:?} is not a user id ([A-Za-z0-9_-], 1 to 64 characters)");
    }
    let password = password
        .or(password_env)
        .ok_or_else(|| anyhow!("--password (or CHATMQ_PASSWORD) is required"))?;
    if let Some(id) = &client_id {
        if id.is_empty() || id.len() > 128 {
            bail!("--client-id must be 1 to 128 characters");
        }
    }
    Ok(Invocation::Run(Options {
        host: host.to_string(),
        port,
        transport,
        ca,
        state: state.unwrap_or_else(|| PathBuf::from(format!("chatmq-cli-{user}.json"))),
        user,
        password,
        client_id,
        json,
    }))
}

/// `HOST:PORT` or a URL whose scheme picks the transport; the WebSocket
/// ones keep the whole URL, which rumqttc connects to.
fn parse_server(server: &str) -> Result<(&str, u16, Transport)> {
    let (scheme, rest) = server.split_once("://").unwrap_or(("mqtt", server));
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, ""),
    };
    let (host, port) = authority
        .rsplit_once(':')
        .and_then(|(h, p)| Some((h.trim_matches(['[', ']']), p.parse::<u16>().ok()?)))
        .filter(|(h, _)| !h.is_empty())
        .ok_or_else(|| anyhow!("--server {server:?} needs a HOST:PORT"))?;
    let transport = match scheme {
        "mqtt" | "tcp" if path.is_empty() => Transport::Tcp,
        "mqtts" | "ssl" if path.is_empty() => Transport::Tls,
        "ws" => Transport::Ws(server.to_string()),
        "wss" => Transport::Wss(server.to_string()),
        "mqtt" | "tcp" | "mqtts" | "ssl" => bail!("--server {server:?}: MQTT over TCP has no path"),
        other => bail!("--server {server:?}: unknown scheme {other:?} (mqtt, mqtts, ws, wss)"),
    };
    Ok((host, port, transport))
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

    fn args(s: &str) -> Vec<String> {
        s.split_whitespace().map(str::to_string).collect()
    }

    #[test]
    fn a_full_command_line_parses() {
        let got = parse(
            &args("--server 127.0.0.1:1883 --user alice --password pw --client-id c1 --state s.json --json"),
            None,
        )
        .unwrap();
        assert_eq!(
            got,
            Invocation::Run(Options {
                host: "127.0.0.1".into(),
                port: 1883,
                transport: Transport::Tcp,
                ca: None,
                user: "alice".into(),
                password: "pw".into(),
                client_id: Some("c1".into()),
                state: PathBuf::from("s.json"),
                json: true,
            })
        );
    }

    #[test]
    fn defaults_and_the_password_from_the_environment() {
        let Invocation::Run(o) =
            parse(&args("--server h:1 --user bob"), Some("jwt".into())).unwrap()
        else {
            panic!("not a run");
        };
        assert_eq!(o.password, "jwt");
        assert_eq!(o.state, PathBuf::from("chatmq-cli-bob.json"));
        assert!(!o.json && o.client_id.is_none());
    }

    #[test]
    fn the_server_url_picks_the_transport() {
        let server =
            |s: &str| match parse(&args(&format!("--server {s} --user a --password p")), None) {
                Ok(Invocation::Run(o)) => (o.host, o.port, o.transport),
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
            parse(&args(&format!("--server {s} --user a --password p")), None)
                .unwrap_err()
                .to_string()
        };
        assert!(err("http://h:80").contains("unknown scheme"));
        assert!(err("mqtt://h:1/x").contains("no path"));
        assert!(err("wss://h/mqtt").contains("HOST:PORT"));
    }

    #[test]
    fn mistakes_are_named() {
        let err = |s: &str| parse(&args(s), None).unwrap_err().to_string();
        assert!(err("--user a --password p").contains("--server"));
        assert!(err("--server h --user a --password p").contains("HOST:PORT"));
        assert!(err("--server h:1 --user a/b --password p").contains("user id"));
        assert!(err("--server h:1 --user a").contains("--password"));
        assert!(err("--server h:1 --user a --password p --bogus").contains("--bogus"));
        assert!(err("--server").contains("needs a value"));
        assert_eq!(parse(&args("--help"), None).unwrap(), Invocation::Help);
    }
}
