//! What the user types: a command (`/open`, `/dm`, `/convs`, `/history`,
//! `/quit`, `/help`) or a line of text to send.

use crate::args::valid_user;

#[derive(Debug, PartialEq)]
pub enum Command {
    /// Select a conversation for what follows.
    Open(String),
    Convs,
    History(u64),
    Quit,
    Help,
    Send(String),
    /// An empty line: nothing to do.
    Nothing,
}

/// The history page size when `/history` has no number.
const HISTORY_DEFAULT: u64 = 20;

/// Parses one line typed by `me`; `Err` is a message for the user.
pub fn parse(line: &str, me: &str) -> Result<Command, String> {
    let line = line.trim_end_matches(['\r', '\n']);
    if line.trim().is_empty() {
        return Ok(Command::Nothing);
    }
    let Some(rest) = line.strip_prefix('/') else {
        return Ok(Command::Send(line.to_string()));
    };
    let mut words = rest.split_whitespace();
    let name = words.next().unwrap_or_default();
    let arg = words.next();
    if words.next().is_some() {
        return Err(format!("/{name}: too many arguments (try /help)"));
    }
    match (name, arg) {
        ("open", Some(conv)) if valid_conv(conv) => Ok(Command::Open(conv.to_string())),
        ("open", Some(conv)) => Err(format!("{conv:?} is not a conversation id")),
        ("open", None) => Err("/open CONV".into()),
        ("dm", Some(user)) if valid_user(user) && user != me => {
            Ok(Command::Open(direct_conversation(me, user)))
        }
        ("dm", Some(user)) => Err(format!("{user:?}: not another user's id")),
        ("dm", None) => Err("/dm USER".into()),
        ("convs", None) => Ok(Command::Convs),
        ("history", None) => Ok(Command::History(HISTORY_DEFAULT)),
        ("history", Some(n)) => match n.parse::<u64>() {
            Ok(n) if n > 0 => Ok(Command::History(n)),
            _ => Err(format!("/history N: {n:?} is not a positive number")),
        },
        ("quit" | "exit", None) => Ok(Command::Quit),
        ("help", None) => Ok(Command::Help),
        _ => Err(format!("unknown command /{name} (try /help)")),
    }
}

/// `dm:a:b` with a < b bytewise (DESIGN §4).
pub fn direct_conversation(me: &str, other: &str) -> String {
    let (a, b) = if me < other { (me, other) } else { (other, me) };
    format!("dm:{a}:{b}")
}

/// `[A-Za-z0-9_.:-]{1,128}` (DESIGN §4).
fn valid_conv(c: &str) -> bool {
    (1..=128).contains(&c.len())
        && c.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b':' | b'-'))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commands_and_text() {
        assert_eq!(
            parse("hello there", "alice"),
            Ok(Command::Send("hello there".into()))
        );
        assert_eq!(
            parse("/open team-1", "alice"),
            Ok(Command::Open("team-1".into()))
        );
        assert_eq!(
            parse("/dm bob", "alice"),
            Ok(Command::Open("dm:alice:bob".into()))
        );
        assert_eq!(
            parse("/dm alice", "bob"),
            Ok(Command::Open("dm:alice:bob".into()))
        );
        assert_eq!(parse("/history 5", "a"), Ok(Command::History(5)));
        assert_eq!(parse("/history", "a"), Ok(Command::History(20)));
        assert_eq!(parse("/convs", "a"), Ok(Command::Convs));
        assert_eq!(parse("/quit", "a"), Ok(Command::Quit));
        assert_eq!(parse("   ", "a"), Ok(Command::Nothing));
    }

    #[test]
    fn mistakes_are_explained() {
        assert!(parse("/open a/b", "a").is_err());
        assert!(parse("/dm alice", "alice").is_err());
        assert!(parse("/history zero", "a").is_err());
        assert!(parse("/history 0", "a").is_err());
        assert!(parse("/frobnicate", "a").unwrap_err().contains("/help"));
        assert!(parse("/open a b", "a").is_err());
    }
}
