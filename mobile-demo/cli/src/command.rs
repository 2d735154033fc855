//! What the user types: a command (`/open`, `/dm`, `/convs`, `/history`,
//! `/edit`, `/delete`, `/react`, `/unreact`, `/attach`, `/download`,
//! `/quit`, `/help`) or a line of text to send.

use std::path::PathBuf;

use crate::args::valid_user;

#[derive(Debug, PartialEq)]
pub enum Command {
    /// Select a conversation for what follows.
    Open(String),
    Convs,
    History(u64),
    /// Our message SEQ of the open conversation gets a new text.
    Edit {
        seq: u64,
        text: String,
    },
    /// Our message SEQ of the open conversation is deleted.
    Delete(u64),
    /// Our reaction EMOJI to message SEQ: added (`add`) or taken back.
    React {
        seq: u64,
        emoji: String,
        add: bool,
    },
    /// Upload FILE and send a message with it (and TEXT, if any).
    Attach {
        file: PathBuf,
        text: String,
    },
    /// Download attachment ID into FILE (default: the id as its name).
    Download {
        id: String,
        to: Option<PathBuf>,
    },
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
    let (name, rest) = rest.split_once(char::is_whitespace).unwrap_or((rest, ""));
    // Commands whose last argument is free text.
    match name {
        "edit" => {
            let (seq, text) = seq_and_rest(name, rest, "/edit SEQ TEXT")?;
            if text.is_empty() {
                return Err("/edit SEQ TEXT: the new text is missing".into());
            }
            return Ok(Command::Edit { seq, text });
        }
        "attach" => {
            let rest = rest.trim();
            let (file, text) = rest.split_once(char::is_whitespace).unwrap_or((rest, ""));
            if file.is_empty() {
                return Err("/attach FILE [TEXT]".into());
            }
            return Ok(Command::Attach {
                file: PathBuf::from(file),
                text: text.trim().to_string(),
            });
        }
        _ => {}
    }
    let words: Vec<&str> = rest.split_whitespace().collect();
    match (name, words.as_slice()) {
        ("delete", [seq]) => Ok(Command::Delete(seq_of(seq, "/delete SEQ")?)),
        ("delete", _) => Err("/delete SEQ".into()),
        (react @ ("react" | "unreact"), [seq, emoji]) => Ok(Command::React {
            seq: seq_of(seq, &format!("/{react} SEQ EMOJI"))?,
            emoji: emoji.to_string(),
            add: react == "react",
        }),
        (react @ ("react" | "unreact"), _) => Err(format!("/{react} SEQ EMOJI")),
        ("download", [id, rest @ ..]) if rest.len() <= 1 => Ok(Command::Download {
            id: id.to_string(),
            to: rest.first().map(PathBuf::from),
        }),
        ("download", _) => Err("/download ID [FILE]".into()),
        _ => simple(name, &words, me),
    }
}

/// The commands of at most one word.
fn simple(name: &str, words: &[&str], me: &str) -> Result<Command, String> {
    if words.len() > 1 {
        return Err(format!("/{name}: too many arguments (try /help)"));
    }
    match (name, words.first().copied()) {
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

/// `SEQ REST...`: a seq and the rest of the line, trimmed.
fn seq_and_rest(name: &str, rest: &str, usage: &str) -> Result<(u64, String), String> {
    let rest = rest.trim_start();
    let (seq, text) = rest.split_once(char::is_whitespace).unwrap_or((rest, ""));
    if seq.is_empty() {
        return Err(format!("{usage} (/{name} needs the seq of a message)"));
    }
    Ok((seq_of(seq, usage)?, text.trim().to_string()))
}

fn seq_of(word: &str, usage: &str) -> Result<u64, String> {
    match word.trim_start_matches('#').parse::<u64>() {
        Ok(n) if n > 0 => Ok(n),
        _ => Err(format!("{usage}: {word:?} is not a message seq")),
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
        assert!(parse("/edit 1", "a").unwrap_err().contains("missing"));
        assert!(parse("/edit x hi", "a")
            .unwrap_err()
            .contains("not a message seq"));
        assert!(parse("/edit", "a").is_err());
        assert!(parse("/delete", "a").is_err());
        assert!(parse("/delete 0", "a").is_err());
        assert!(parse("/react 1", "a").is_err());
        assert!(parse("/unreact 1 x y", "a").is_err());
        assert!(parse("/attach", "a").is_err());
        assert!(parse("/download", "a").is_err());
        assert!(parse("/download a b c", "a").is_err());
    }

    #[test]
    fn changes_reactions_and_attachments() {
        assert_eq!(
            parse("/edit 3 hello  there ", "a"),
            Ok(Command::Edit {
                seq: 3,
                text: "hello  there".into()
            })
        );
        assert_eq!(parse("/delete #3", "a"), Ok(Command::Delete(3)));
        assert_eq!(
            parse("/react 3 👍", "a"),
            Ok(Command::React {
                seq: 3,
                emoji: "👍".into(),
                add: true
            })
        );
        assert_eq!(
            parse("/unreact 3 👍", "a"),
            Ok(Command::React {
                seq: 3,
                emoji: "👍".into(),
                add: false
            })
        );
        assert_eq!(
            parse("/attach cat.png look at this", "a"),
            Ok(Command::Attach {
                file: "cat.png".into(),
                text: "look at this".into()
            })
        );
        assert_eq!(
            parse("/attach cat.png", "a"),
            Ok(Command::Attach {
                file: "cat.png".into(),
                text: String::new()
            })
        );
        assert_eq!(
            parse("/download abc out.png", "a"),
            Ok(Command::Download {
                id: "abc".into(),
                to: Some("out.png".into())
            })
        );
        assert_eq!(
            parse("/download abc", "a"),
            Ok(Command::Download {
                id: "abc".into(),
                to: None
            })
        );
    }
}
