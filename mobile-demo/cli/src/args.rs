//! The command line, parsed by hand (no argument crate in the workspace).

use std::path::PathBuf;

use anyhow::{anyhow, bail, Result};

pub const USAGE: &str = "\
chatmq-cli: a terminal chat client for chatmq (MQTT 5)

usage: chatmq-cli --server HOST:PORT --user USER --password PASSWORD
                  [--client-id ID] [--state FILE] [--json]

  --server HOST:PORT  the broker's MQTT listener
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

#[derive(Debug, Clone, PartialEq)]
pub struct Options {
    pub host: String,
    pub port: u16,
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
            "--json" => json = true,
            other => bail!("unknown argument {other:?} (see --help)"),
        }
    }
    let server = server.ok_or_else(|| anyhow!("--server HOST:PORT is required"))?;
    let (host, port) = server
        .rsplit_once(':')
        .and_then(|(h, p)| Some((h.trim_matches(['[', ']']), p.parse::<u16>().ok()?)))
        .filter(|(h, _)| !h.is_empty())
        .ok_or_else(|| anyhow!("--server {server:?} is not HOST:PORT"))?;
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
        state: state.unwrap_or_else(|| PathBuf::from(format!("chatmq-cli-{user}.json"))),
        user,
        password,
        client_id,
        json,
    }))
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
