//! The one error type of this crate. Each message is a single line that names
//! the key (`mqtt.max_payload`, `auth.users[1].name`) or the path at fault,
//! where the value came from, and what was expected, because the broker
//! prints it as its last words before exiting.

use std::io;
use std::path::PathBuf;

/// Why the configuration cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The configuration file could not be read at all.
    #[error("cannot read config file {}: {source}", .path.display())]
    Read { path: PathBuf, source: io::Error },

    /// The file is not valid TOML.
    #[error("invalid TOML in {origin}: {message}")]
    Syntax { origin: String, message: String },

    /// A key that chatmq does not know, often a typo.
    #[error("unknown key {key} in {origin}")]
    UnknownKey { key: String, origin: String },

    /// A key that must be present (inside `[[auth.users]]` or `[[acl.rules]]`).
    #[error("missing key {key} in {origin}")]
    MissingKey { key: String, origin: String },

    /// A value of the wrong type, or a string that is not one of the
    /// accepted spellings.
    #[error("{key}: expected {expected}, found {found} in {origin}")]
    WrongType {
        key: String,
        expected: String,
        found: String,
        origin: String,
    },

    /// A number outside the range its key allows.
    #[error("{key}: must be {range}, found {found} in {origin}")]
    OutOfRange {
        key: String,
        range: String,
        found: i128,
        origin: String,
    },

    /// A value of the right type that breaks a rule (a user id, a topic
    /// filter, a duplicate).
    #[error("{key}: {reason}")]
    Invalid { key: String, reason: String },

    /// A file or directory named by a key cannot be used.
    #[error("{key}: {}: {problem}", .path.display())]
    Path {
        key: String,
        path: PathBuf,
        problem: String,
    },

    /// The environment could not be read (a `CHATMQ__` variable that is not
    /// Unicode), or the `config` crate refused something the key table
    /// allowed, which would be a bug in this crate.
    #[error("{0}")]
    Other(String),
}
