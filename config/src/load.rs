//! Loading: read the TOML file, take `CHATMQ__SECTION__KEY` overrides from the
//! environment, check every key and value of both against the key table,
//! merge them with the `config` crate, deserialise, then validate.
//!
//! The key table check comes first because the `config` crate's own errors
//! name an unknown key without its section, and coerce quietly (`1.5` into an
//! integer, `1` into `true`); checking each source ourselves reports the full
//! dotted key and where the value came from.

use std::fs;
use std::net::SocketAddr;
use std::path::Path;

use config::{Config, Environment, File, FileFormat, Map, Source, Value, ValueKind};

use crate::error::ConfigError;
use crate::settings::{Key, Kind, Settings, KEYS};
use crate::validate::validate;

/// Environment variables that override the file start with this, and use it
/// between levels too: `CHATMQ__MQTT__LISTEN` sets `mqtt.listen`.
const ENV_PREFIX: &str = "CHATMQ";
const ENV_SEPARATOR: &str = "__";

impl Settings {
    /// Reads the TOML file at `path`, applies environment overrides
    /// `CHATMQ__SECTION__KEY` (e.g. `CHATMQ__MQTT__LISTEN=127.0.0.1:0`,
    /// `CHATMQ__AUTH__ALLOW_ANONYMOUS=true`, `CHATMQ__NODE__DATA_DIR=/tmp/x`),
    /// then validates, creating `node.data_dir` if it is missing.
    ///
    /// Lists (`[[auth.users]]`, `[[acl.rules]]`) can only come from the file.
    pub fn load(path: &Path) -> Result<Settings, ConfigError> {
        load_with(path, environment())
    }

    /// Like [`Settings::load`] from a TOML string, without the environment:
    /// for tests and for embedding. Still validates, so `node.data_dir` is
    /// created.
    pub fn from_toml(text: &str) -> Result<Settings, ConfigError> {
        let settings = parse(text, "the TOML text", None)?;
        validate(&settings)?;
        Ok(settings)
    }

    /// [`Settings::from_toml`] without the validation step, which reads the
    /// files the settings name and creates `node.data_dir`: the syntax, key,
    /// type and range checks only, with no side effect. For the fuzz target,
    /// which must not create directories that its inputs name.
    pub fn from_toml_unvalidated(text: &str) -> Result<Settings, ConfigError> {
        parse(text, "the TOML text", None)
    }
}

/// The environment source. Values are kept as strings (no `try_parsing`):
/// the key table knows which keys are numbers or booleans, and a secret such
/// as `007` must not become the number 7.
fn environment() -> Environment {
    Environment::with_prefix(ENV_PREFIX)
        .prefix_separator(ENV_SEPARATOR)
        .separator(ENV_SEPARATOR)
}

/// [`Settings::load`] with the environment given, so tests can supply
/// variables without touching the process environment.
fn load_with(path: &Path, env: Environment) -> Result<Settings, ConfigError> {
    let text = fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    let text = text.strip_prefix('\u{feff}').unwrap_or(&text);
    let settings = parse(text, &path.display().to_string(), Some(&env))?;
    validate(&settings)?;
    Ok(settings)
}

/// TOML text plus environment overrides into checked, unvalidated settings.
/// `origin` names the text in errors.
fn parse(text: &str, origin: &str, env: Option<&Environment>) -> Result<Settings, ConfigError> {
    let file = File::from_str(text, FileFormat::Toml);
    let table = file.collect().map_err(|error| ConfigError::Syntax {
        origin: origin.to_string(),
        message: one_line_syntax_error(&error),
    })?;
    check_table(&table, KEYS, "", origin)?;

    let mut builder = Config::builder().add_source(file);
    if let Some(env) = env {
        let mut overrides: Vec<(String, Value)> = env
            .collect()
            .map_err(|error| ConfigError::Other(format!("environment: {error}")))?
            .into_iter()
            .collect();
        overrides.sort_by(|a, b| a.0.cmp(&b.0));
        for (key, value) in overrides {
            check_override(&key, &value)?;
            builder = builder.set_override(key, value).map_err(unexpected)?;
        }
    }
    builder
        .build()
        .and_then(Config::try_deserialize)
        .map_err(unexpected)
}

/// A `config` error after the key table accepted everything: a disagreement
/// between [`KEYS`] and the settings types.
fn unexpected(error: config::ConfigError) -> ConfigError {
    ConfigError::Other(format!(
        "{error} (chatmq-config bug: key table and settings disagree)"
    ))
}

/// The TOML parser's message is a multi-line report with a source snippet;
/// keep its position and its explanation, on one line.
fn one_line_syntax_error(error: &config::ConfigError) -> String {
    let cause = match error {
        config::ConfigError::FileParse { cause, .. } => cause.to_string(),
        other => other.to_string(),
    };
    let mut lines = cause.lines().map(str::trim).filter(|line| {
        // Snippet lines look like `  |` or `3 | key = `.
        let is_snippet = line
            .split_once('|')
            .is_some_and(|(gutter, _)| gutter.trim().chars().all(|c| c.is_ascii_digit()));
        !line.is_empty() && !is_snippet
    });
    let position = lines.next().unwrap_or_default();
    let position = position
        .strip_prefix("TOML parse error ")
        .unwrap_or(position);
    let explanation: Vec<&str> = lines.collect();
    if explanation.is_empty() {
        position.to_string()
    } else {
        format!("{position}: {}", explanation.join("; "))
    }
}

/// Checks a table from the file against `keys`; `prefix` is the dotted path
/// of the table itself ("" at the top).
fn check_table(
    table: &Map<String, Value>,
    keys: &[Key],
    prefix: &str,
    origin: &str,
) -> Result<(), ConfigError> {
    let mut names: Vec<&String> = table.keys().collect();
    names.sort();
    for name in names {
        let path = join(prefix, name);
        let key = keys
            .iter()
            .find(|key| key.name == name.as_str())
            .ok_or_else(|| ConfigError::UnknownKey {
                key: path.clone(),
                origin: origin.to_string(),
            })?;
        if let Some(value) = table.get(name) {
            check_value(&value.kind, key.kind, &path, origin, false)?;
        }
    }
    Ok(())
}

/// Checks one value from the file (`from_env` false: types must match
/// exactly) or from the environment (`from_env` true: everything is a string,
/// and numbers and booleans must parse).
fn check_value(
    value: &ValueKind,
    kind: Kind,
    key: &str,
    origin: &str,
    from_env: bool,
) -> Result<(), ConfigError> {
    let wrong_type = |expected: &str| ConfigError::WrongType {
        key: key.to_string(),
        expected: expected.to_string(),
        found: describe(value),
        origin: origin.to_string(),
    };
    match kind {
        Kind::Section(keys) => match value {
            ValueKind::Table(table) => check_table(table, keys, key, origin),
            _ => Err(wrong_type(&format!("a [{key}] table"))),
        },
        Kind::Tables(keys) => {
            let ValueKind::Array(items) = value else {
                return Err(wrong_type(&format!("an array of tables ([[{key}]])")));
            };
            for (index, item) in items.iter().enumerate() {
                let item_key = format!("{key}[{index}]");
                let ValueKind::Table(table) = &item.kind else {
                    return Err(ConfigError::WrongType {
                        key: item_key,
                        expected: "a table".to_string(),
                        found: describe(&item.kind),
                        origin: origin.to_string(),
                    });
                };
                check_table(table, keys, &item_key, origin)?;
                if let Some(missing) = keys.iter().find(|k| !table.contains_key(k.name)) {
                    return Err(ConfigError::MissingKey {
                        key: join(&item_key, missing.name),
                        origin: origin.to_string(),
                    });
                }
            }
            Ok(())
        }
        Kind::Entries { keys, required } => {
            let ValueKind::Array(items) = value else {
                return Err(wrong_type(&format!("an array of tables ([[{key}]])")));
            };
            for (index, item) in items.iter().enumerate() {
                let item_key = format!("{key}[{index}]");
                let ValueKind::Table(table) = &item.kind else {
                    return Err(ConfigError::WrongType {
                        key: item_key,
                        expected: "a table".to_string(),
                        found: describe(&item.kind),
                        origin: origin.to_string(),
                    });
                };
                check_table(table, keys, &item_key, origin)?;
                if let Some(missing) = required.iter().find(|k| !table.contains_key(**k)) {
                    return Err(ConfigError::MissingKey {
                        key: join(&item_key, missing),
                        origin: origin.to_string(),
                    });
                }
            }
            Ok(())
        }
        Kind::Integer { min, max } => {
            let number = match value {
                ValueKind::I64(n) => Some(i128::from(*n)),
                ValueKind::U64(n) => Some(i128::from(*n)),
                ValueKind::I128(n) => Some(*n),
                ValueKind::U128(n) => i128::try_from(*n).ok(),
                ValueKind::String(s) if from_env => s.parse::<i128>().ok(),
                _ => None,
            };
            let number = number.ok_or_else(|| wrong_type("an integer"))?;
            if (i128::from(min)..=i128::from(max)).contains(&number) {
                Ok(())
            } else {
                Err(ConfigError::OutOfRange {
                    key: key.to_string(),
                    range: describe_range(min, max),
                    found: number,
                    origin: origin.to_string(),
                })
            }
        }
        Kind::Bool => match value {
            ValueKind::Boolean(_) => Ok(()),
            ValueKind::String(s)
                if from_env
                    && (s.eq_ignore_ascii_case("true") || s.eq_ignore_ascii_case("false")) =>
            {
                Ok(())
            }
            _ => Err(wrong_type("true or false")),
        },
        Kind::Text => match value {
            ValueKind::String(s) if !s.is_empty() => Ok(()),
            _ => Err(wrong_type("a non-empty string")),
        },
        Kind::TextList => {
            let ValueKind::Array(items) = value else {
                return Err(wrong_type("an array of strings"));
            };
            for (index, item) in items.iter().enumerate() {
                match &item.kind {
                    ValueKind::String(s) if !s.is_empty() => {}
                    other => {
                        return Err(ConfigError::WrongType {
                            key: format!("{key}[{index}]"),
                            expected: "a non-empty string".to_string(),
                            found: describe(other),
                            origin: origin.to_string(),
                        })
                    }
                }
            }
            Ok(())
        }
        Kind::Address => match value {
            ValueKind::String(s) if s.parse::<SocketAddr>().is_ok() => Ok(()),
            _ => Err(wrong_type(
                "an ip:port socket address such as \"0.0.0.0:1883\" (host names are not resolved)",
            )),
        },
        Kind::OneOf(words) => match value {
            ValueKind::String(s) if words.contains(&s.as_str()) => Ok(()),
            _ => {
                let quoted: Vec<String> = words.iter().map(|w| format!("\"{w}\"")).collect();
                Err(wrong_type(&format!("one of {}", quoted.join(", "))))
            }
        },
    }
}

/// Checks one environment override; `key` is its dotted form (`mqtt.listen`).
fn check_override(key: &str, value: &Value) -> Result<(), ConfigError> {
    let origin = format!(
        "environment variable {ENV_PREFIX}{ENV_SEPARATOR}{}",
        key.to_uppercase().replace('.', ENV_SEPARATOR)
    );
    let unknown = || ConfigError::UnknownKey {
        key: key.to_string(),
        origin: origin.clone(),
    };
    let mut keys = KEYS;
    let mut parts = key.split('.').peekable();
    while let Some(part) = parts.next() {
        let found = keys.iter().find(|k| k.name == part).ok_or_else(unknown)?;
        match (found.kind, parts.peek().is_some()) {
            (Kind::Section(inner), true) => keys = inner,
            (Kind::Section(_) | Kind::Tables(_) | Kind::Entries { .. } | Kind::TextList, false) => {
                return Err(ConfigError::Invalid {
                    key: key.to_string(),
                    reason: format!(
                        "cannot be set from the environment ({origin}); \
                         set single keys such as CHATMQ__MQTT__LISTEN, and lists in the file"
                    ),
                })
            }
            (_, true) => return Err(unknown()),
            (kind, false) => return check_value(&value.kind, kind, key, &origin, true),
        }
    }
    Err(unknown())
}

fn join(prefix: &str, name: &str) -> String {
    if prefix.is_empty() {
        name.to_string()
    } else {
        format!("{prefix}.{name}")
    }
}

/// A value as an error message shows it: strings quoted, others by type.
fn describe(value: &ValueKind) -> String {
    match value {
        ValueKind::Nil => "nothing".to_string(),
        ValueKind::Boolean(b) => b.to_string(),
        ValueKind::I64(n) => n.to_string(),
        ValueKind::I128(n) => n.to_string(),
        ValueKind::U64(n) => n.to_string(),
        ValueKind::U128(n) => n.to_string(),
        ValueKind::Float(f) => f.to_string(),
        ValueKind::String(s) => format!("{s:?}"),
        ValueKind::Table(_) => "a table".to_string(),
        ValueKind::Array(_) => "an array".to_string(),
    }
}

fn describe_range(min: i64, max: i64) -> String {
    if max == i64::MAX {
        format!("at least {min}")
    } else {
        format!("between {min} and {max}")
    }
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;
    use std::path::PathBuf;

    use super::*;
    use crate::settings::{
        Access, Acl, AclRule, Apns, Attachments, Auth, Bridge, BridgeTopic, Chat, Cluster,
        ClusterTls, Direction, Drain, Fcm, Http, Log, LogFormat, LoginLimits, Mqtt, Node, Push,
        Remote, Storage, SyncMode, Tls, User, Webhook, Websocket,
    };

    const DEFAULT_FILE: &str = include_str!("../chatmq.toml");

    /// Parses without environment and without validation (which would create
    /// `./data`), returning the error message.
    fn parse_err(text: &str) -> String {
        match parse(text, "test.toml", None) {
            Ok(settings) => panic!("expected an error, got {settings:?}"),
            Err(error) => error.to_string(),
        }
    }

    fn assert_one_line(message: &str) {
        assert!(!message.contains('\n'), "not one line: {message}");
    }

    /// An environment made of exactly `vars`, leaving the process alone.
    fn env_of(vars: &[(&str, &str)]) -> Environment {
        let map = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        environment().source(Some(map))
    }

    fn env_err(vars: &[(&str, &str)]) -> String {
        match parse("", "test.toml", Some(&env_of(vars))) {
            Ok(settings) => panic!("expected an error, got {settings:?}"),
            Err(error) => error.to_string(),
        }
    }

    #[test]
    fn default_file_equals_default() {
        let settings = parse(DEFAULT_FILE, "chatmq.toml", None).unwrap();
        assert_eq!(settings, Settings::default());
    }

    #[test]
    fn empty_text_gives_defaults() {
        assert_eq!(parse("", "test.toml", None).unwrap(), Settings::default());
    }

    /// The only test that touches the process environment, which is shared by
    /// every test thread; the others inject variables with `env_of`.
    #[test]
    fn environment_overrides_the_file() {
        struct Vars(Vec<&'static str>);
        impl Vars {
            fn set(&mut self, name: &'static str, value: &str) {
                std::env::set_var(name, value);
                self.0.push(name);
            }
        }
        impl Drop for Vars {
            fn drop(&mut self) {
                for name in &self.0 {
                    std::env::remove_var(name);
                }
            }
        }

        let dir = tempfile::tempdir().unwrap();
        let data_dir = dir.path().join("data");
        // From the environment cargo runs the test in: a test binary kept in
        // a shared target directory may have been built in another checkout.
        let manifest_dir = std::env::var_os("CARGO_MANIFEST_DIR").map_or_else(
            || env!("CARGO_MANIFEST_DIR").into(),
            std::path::PathBuf::from,
        );
        let default_file = manifest_dir.join("chatmq.toml");
        let mut vars = Vars(Vec::new());

        // The shipped file loads, and equals the defaults but for data_dir
        // (moved so the test does not create ./data).
        vars.set("CHATMQ__NODE__DATA_DIR", data_dir.to_str().unwrap());
        let settings = Settings::load(&default_file).unwrap();
        let expected = Settings {
            node: Node {
                data_dir: data_dir.clone(),
            },
            ..Settings::default()
        };
        assert_eq!(settings, expected);
        assert!(data_dir.is_dir(), "data_dir is created");

        vars.set("CHATMQ__MQTT__LISTEN", "127.0.0.1:0");
        vars.set("CHATMQ__MQTT__MAX_PAYLOAD", "1024");
        vars.set("CHATMQ__AUTH__ALLOW_ANONYMOUS", "true");
        vars.set("CHATMQ__STORAGE__SYNC", "never");
        vars.set("CHATMQ__AUTH__JWT_SECRET", "007");
        vars.set("CHATMQ__HTTP__LISTEN", "127.0.0.1:0");
        vars.set("CHATMQ__CHAT__RETENTION_MAX_MESSAGES", "5");
        let settings = Settings::load(&default_file).unwrap();
        assert_eq!(settings.node.data_dir, data_dir);
        assert_eq!(
            settings.mqtt.listen,
            "127.0.0.1:0".parse::<SocketAddr>().unwrap()
        );
        assert_eq!(settings.mqtt.max_payload, 1024);
        assert!(settings.auth.allow_anonymous);
        assert_eq!(settings.storage.sync, SyncMode::Never);
        assert_eq!(settings.auth.jwt_secret.as_deref(), Some("007"));
        assert_eq!(
            settings.http.listen,
            "127.0.0.1:0".parse::<SocketAddr>().unwrap()
        );
        assert_eq!(settings.chat.retention_max_messages, 5);
        assert_eq!(settings.chat.history_limit, Chat::default().history_limit);
        assert_eq!(settings.mqtt.max_inflight, Mqtt::default().max_inflight);

        // The environment also overrides a value the file sets.
        let file = dir.path().join("chatmq.toml");
        fs::write(&file, "[mqtt]\nmax_payload = 99\nmax_inflight = 7\n").unwrap();
        let settings = Settings::load(&file).unwrap();
        assert_eq!(settings.mqtt.max_payload, 1024);
        assert_eq!(settings.mqtt.max_inflight, 7);

        vars.set("CHATMQ__MQTT__MAX_PAYLOD", "1");
        let message = Settings::load(&file).unwrap_err().to_string();
        assert_eq!(
            message,
            "unknown key mqtt.max_paylod in environment variable CHATMQ__MQTT__MAX_PAYLOD"
        );
    }

    #[test]
    fn environment_errors_name_the_key_and_the_variable() {
        let message = env_err(&[("CHATMQ__MQTT__LISTEN", "localhost:1883")]);
        assert!(
            message.starts_with(
                "mqtt.listen: expected an ip:port socket address such as \"0.0.0.0:1883\""
            ),
            "{message}"
        );
        assert!(
            message
                .ends_with("found \"localhost:1883\" in environment variable CHATMQ__MQTT__LISTEN"),
            "{message}"
        );
        assert_eq!(
            env_err(&[("CHATMQ__MQTT__MAX_INFLIGHT", "lots")]),
            "mqtt.max_inflight: expected an integer, found \"lots\" \
             in environment variable CHATMQ__MQTT__MAX_INFLIGHT"
        );
        assert_eq!(
            env_err(&[("CHATMQ__MQTT__MAX_INFLIGHT", "70000")]),
            "mqtt.max_inflight: must be between 1 and 65535, found 70000 \
             in environment variable CHATMQ__MQTT__MAX_INFLIGHT"
        );
        assert_eq!(
            env_err(&[("CHATMQ__AUTH__ALLOW_ANONYMOUS", "yes")]),
            "auth.allow_anonymous: expected true or false, found \"yes\" \
             in environment variable CHATMQ__AUTH__ALLOW_ANONYMOUS"
        );
        assert_eq!(
            env_err(&[("CHATMQ__NOPE", "1")]),
            "unknown key nope in environment variable CHATMQ__NOPE"
        );
        assert_eq!(
            env_err(&[("CHATMQ__MQTT__LISTEN__PORT", "1")]),
            "unknown key mqtt.listen.port in environment variable CHATMQ__MQTT__LISTEN__PORT"
        );
        let message = env_err(&[("CHATMQ__AUTH__USERS", "alice")]);
        assert!(
            message.starts_with("auth.users: cannot be set from the environment"),
            "{message}"
        );
        for message in [message, env_err(&[("CHATMQ__MQTT", "x")])] {
            assert_one_line(&message);
        }
        // Variables without the double-underscore prefix are not ours.
        let settings = parse("", "test.toml", Some(&env_of(&[("CHATMQ_LOG", "debug")])));
        assert_eq!(settings.unwrap(), Settings::default());
    }

    #[test]
    fn every_key_reaches_its_field() {
        let text = r#"
            [node]
            data_dir = "/var/lib/chatmq"
            [mqtt]
            listen = "[::1]:11883"
            max_payload = 1
            max_offline_messages = 2
            max_connections = 3
            max_subscriptions = 4
            max_inflight = 5
            keepalive_max = 6
            connect_timeout_secs = 7
            session_expiry_max = 0
            topic_alias_max = 65535
            max_sessions_per_user = 26
            client_owner_ttl_secs = 27
            max_anonymous_sessions = 36
            max_connections_per_ip = 21
            accept_rate_per_ip = 22
            accept_burst_per_ip = 23
            max_connect_packet = 2400
            tcp_keepalive_secs = 25
            write_timeout_secs = 21
            session_queue_bytes = 2048
            publish_rate = 22
            publish_burst = 23
            publish_bytes_rate = 24
            publish_bytes_burst = 25
            user_publish_rate = 26
            user_publish_burst = 27
            user_publish_bytes_rate = 28
            user_publish_bytes_burst = 29
            max_topic_levels = 31
            max_topic_length = 32
            max_retained_messages = 33
            max_retained_bytes = 34
            max_retained_per_subscription = 35
            [mqtt.tls]
            listen = "127.0.0.1:18883"
            cert = "certs/server.crt"
            key = "certs/server.key"
            handshake_timeout_secs = 12
            [auth]
            allow_anonymous = true
            jwt_secret = "hs"
            jwt_public_key = "keys/jwt.pem"
            admin_token = "admin"
            jwt_issuer = "https://issuer.example"
            jwt_audience = "chatmq"
            [auth.limits]
            failed_logins_per_ip = 23
            failed_logins_per_user = 24
            failed_login_window_secs = 25
            password_checks = 26
            password_check_queue = 27
            [[auth.users]]
            name = "alice"
            password = "$argon2id$v=19$m=19456,t=2,p=1$c2FsdA$aGFzaA"
            [[auth.users]]
            name = "bob"
            password = "plain"
            [[acl.rules]]
            user = "*"
            topic = "sensors/%u/#"
            access = "pubsub"
            [[acl.rules]]
            user = "bob"
            topic = "+/secret"
            access = "deny"
            [[acl.rules]]
            user = "alice"
            topic = "news"
            access = "sub"
            [[acl.rules]]
            user = "alice"
            topic = "inbox/%c"
            access = "pub"
            [storage]
            sync = "interval"
            sync_interval_ms = 5
            [http]
            listen = "0.0.0.0:18080"
            static_dir = "web/dist"
            header_timeout_secs = 26
            request_timeout_secs = 27
            max_connections = 28
            [chat]
            history_limit = 9
            retention_max_messages = 10
            retention_max_age_secs = 11
            typing_interval_ms = 30
            typing_max_bytes = 31
            conv_cache_max = 32
            conv_idle_secs = 33
            dedup_ttl_secs = 34
            large_group_members = 35
            announce_window_ms = 36
            reaction_window_ms = 37
            room_reaction_interval_ms = 38
            occupancy_window_ms = 39
            [websocket]
            enabled = false
            listen = "127.0.0.1:18083"
            path = "/ws"
            handshake_timeout_secs = 13
            max_frame_size = 1000
            max_message_size = 2000
            allowed_origins = ["https://chat.example.com", "http://localhost:3000"]
            max_connections_per_ip = 14
            [websocket.tls]
            listen = "127.0.0.1:18084"
            cert = "certs/ws.crt"
            key = "certs/ws.key"
            [push]
            debounce_ms = 15
            concurrency = 16
            retry_max_attempts = 17
            retry_base_ms = 18
            retry_max_ms = 19
            preview_max_chars = 20
            [push.webhook]
            url = "https://push.example.internal/notify"
            secret = "whsec"
            [push.apns]
            key_file = "keys/apns.p8"
            key_id = "KEYID"
            team_id = "TEAMID"
            topic = "com.example.chat"
            sandbox = true
            endpoint = "https://apns-proxy.example.internal:8443"
            ca_file = "certs/proxy-ca.pem"
            [push.fcm]
            service_account_file = "keys/fcm.json"
            project_id = "chat-project"
            base_url = "http://127.0.0.1:9999"
            token_uri = "http://127.0.0.1:9999/token"
            [[bridge.remotes]]
            name = "site1"
            address = "mqtt.example.com:8883"
            tls = true
            ca_file = "certs/remote-ca.pem"
            username = "bridge"
            password = "bpw"
            client_id = "hq"
            clean_session = true
            session_expiry_secs = 41
            keepalive_secs = 42
            reconnect_min_ms = 43
            reconnect_max_ms = 44
            local_user = "bot"
            queue = 45
            [[bridge.remotes.topics]]
            pattern = "sensors/#"
            direction = "in"
            qos = 0
            local_prefix = "site1/"
            remote_prefix = "plant/"
            [log]
            format = "json"
            [drain]
            server_reference = "mqtt.example.com:1883"
            spread_secs = 46
            timeout_secs = 47
            [cluster]
            node_id = "node-7"
            nats_urls = ["nats://10.0.0.1:4222", "tls://10.0.0.2:4222"]
            partitions = 40
            lease_ttl_ms = 4100
            replicas = 5
            name_prefix = "tenant_a"
            startup_timeout_secs = 42
            user = "chatmq"
            password = "natspass"
            token = "natstoken"
            creds_file = "keys/nats.creds"
            [cluster.tls]
            ca_file = "certs/nats-ca.pem"
            cert = "certs/nats-client.crt"
            key = "certs/nats-client.key"
        "#;
        let expected = Settings {
            log: Log {
                format: LogFormat::Json,
            },
            drain: Drain {
                server_reference: Some("mqtt.example.com:1883".into()),
                spread_secs: 46,
                timeout_secs: 47,
            },
            node: Node {
                data_dir: PathBuf::from("/var/lib/chatmq"),
            },
            mqtt: Mqtt {
                listen: "[::1]:11883".parse().unwrap(),
                max_payload: 1,
                max_offline_messages: 2,
                max_connections: 3,
                max_subscriptions: 4,
                max_inflight: 5,
                keepalive_max: 6,
                connect_timeout_secs: 7,
                session_expiry_max: 0,
                topic_alias_max: 65535,
                tls: Some(Tls {
                    listen: Some("127.0.0.1:18883".parse().unwrap()),
                    cert: PathBuf::from("certs/server.crt"),
                    key: PathBuf::from("certs/server.key"),
                    handshake_timeout_secs: 12,
                }),
                max_sessions_per_user: 26,
                client_owner_ttl_secs: 27,
                max_anonymous_sessions: 36,
                max_connections_per_ip: 21,
                accept_rate_per_ip: 22,
                accept_burst_per_ip: 23,
                max_connect_packet: 2400,
                tcp_keepalive_secs: 25,
                write_timeout_secs: 21,
                session_queue_bytes: 2048,
                publish_rate: 22,
                publish_burst: 23,
                publish_bytes_rate: 24,
                publish_bytes_burst: 25,
                user_publish_rate: 26,
                user_publish_burst: 27,
                user_publish_bytes_rate: 28,
                user_publish_bytes_burst: 29,
                max_topic_levels: 31,
                max_topic_length: 32,
                max_retained_messages: 33,
                max_retained_bytes: 34,
                max_retained_per_subscription: 35,
            },
            auth: Auth {
                allow_anonymous: true,
                jwt_secret: Some("hs".into()),
                jwt_public_key: Some(PathBuf::from("keys/jwt.pem")),
                admin_token: Some("admin".into()),
                users: vec![
                    User {
                        name: "alice".into(),
                        password: "$argon2id$v=19$m=19456,t=2,p=1$c2FsdA$aGFzaA".into(),
                    },
                    User {
                        name: "bob".into(),
                        password: "plain".into(),
                    },
                ],
                jwt_issuer: Some("https://issuer.example".into()),
                jwt_audience: Some("chatmq".into()),
                limits: LoginLimits {
                    failed_logins_per_ip: 23,
                    failed_logins_per_user: 24,
                    failed_login_window_secs: 25,
                    password_checks: 26,
                    password_check_queue: 27,
                },
            },
            acl: Acl {
                rules: vec![
                    rule("*", "sensors/%u/#", Access::PubSub),
                    rule("bob", "+/secret", Access::Deny),
                    rule("alice", "news", Access::Sub),
                    rule("alice", "inbox/%c", Access::Pub),
                ],
            },
            storage: Storage {
                sync: SyncMode::Interval,
                sync_interval_ms: 5,
            },
            http: Http {
                listen: "0.0.0.0:18080".parse().unwrap(),
                static_dir: Some(PathBuf::from("web/dist")),
                header_timeout_secs: 26,
                request_timeout_secs: 27,
                max_connections: 28,
                ..Http::default()
            },
            chat: Chat {
                history_limit: 9,
                retention_max_messages: 10,
                retention_max_age_secs: 11,
                typing_interval_ms: 30,
                typing_max_bytes: 31,
                conv_cache_max: 32,
                conv_idle_secs: 33,
                dedup_ttl_secs: 34,
                large_group_members: 35,
                announce_window_ms: 36,
                reaction_window_ms: 37,
                room_reaction_interval_ms: 38,
                occupancy_window_ms: 39,
            },
            websocket: Websocket {
                enabled: false,
                listen: "127.0.0.1:18083".parse().unwrap(),
                path: "/ws".into(),
                handshake_timeout_secs: 13,
                max_frame_size: 1000,
                max_message_size: 2000,
                allowed_origins: vec![
                    "https://chat.example.com".into(),
                    "http://localhost:3000".into(),
                ],
                max_connections_per_ip: 14,
                tls: Some(Tls {
                    listen: Some("127.0.0.1:18084".parse().unwrap()),
                    cert: PathBuf::from("certs/ws.crt"),
                    key: PathBuf::from("certs/ws.key"),
                    handshake_timeout_secs: 10,
                }),
            },
            push: Push {
                debounce_ms: 15,
                concurrency: 16,
                retry_max_attempts: 17,
                retry_base_ms: 18,
                retry_max_ms: 19,
                preview_max_chars: 20,
                webhook: Some(Webhook {
                    url: "https://push.example.internal/notify".into(),
                    secret: Some("whsec".into()),
                }),
                apns: Some(Apns {
                    key_file: PathBuf::from("keys/apns.p8"),
                    key_id: "KEYID".into(),
                    team_id: "TEAMID".into(),
                    topic: "com.example.chat".into(),
                    sandbox: true,
                    endpoint: Some("https://apns-proxy.example.internal:8443".into()),
                    ca_file: Some(PathBuf::from("certs/proxy-ca.pem")),
                }),
                fcm: Some(Fcm {
                    service_account_file: PathBuf::from("keys/fcm.json"),
                    project_id: Some("chat-project".into()),
                    base_url: "http://127.0.0.1:9999".into(),
                    token_uri: Some("http://127.0.0.1:9999/token".into()),
                }),
            },
            attachments: Attachments::default(),
            bridge: Bridge {
                remotes: vec![Remote {
                    name: "site1".into(),
                    address: "mqtt.example.com:8883".into(),
                    tls: true,
                    ca_file: Some(PathBuf::from("certs/remote-ca.pem")),
                    username: Some("bridge".into()),
                    password: Some("bpw".into()),
                    client_id: Some("hq".into()),
                    clean_session: true,
                    session_expiry_secs: 41,
                    keepalive_secs: 42,
                    reconnect_min_ms: 43,
                    reconnect_max_ms: 44,
                    local_user: Some("bot".into()),
                    queue: 45,
                    topics: vec![BridgeTopic {
                        pattern: "sensors/#".into(),
                        direction: Direction::In,
                        qos: 0,
                        local_prefix: "site1/".into(),
                        remote_prefix: "plant/".into(),
                    }],
                }],
            },
            cluster: Some(Cluster {
                node_id: "node-7".into(),
                nats_urls: vec!["nats://10.0.0.1:4222".into(), "tls://10.0.0.2:4222".into()],
                partitions: 40,
                lease_ttl_ms: 4100,
                replicas: 5,
                name_prefix: "tenant_a".into(),
                startup_timeout_secs: 42,
                user: Some("chatmq".into()),
                password: Some("natspass".into()),
                token: Some("natstoken".into()),
                creds_file: Some(PathBuf::from("keys/nats.creds")),
                tls: Some(ClusterTls {
                    ca_file: Some(PathBuf::from("certs/nats-ca.pem")),
                    cert: Some(PathBuf::from("certs/nats-client.crt")),
                    key: Some(PathBuf::from("certs/nats-client.key")),
                }),
            }),
        };
        assert_eq!(parse(text, "test.toml", None).unwrap(), expected);
    }

    fn rule(user: &str, topic: &str, access: Access) -> AclRule {
        AclRule {
            user: user.into(),
            topic: topic.into(),
            access,
        }
    }

    #[test]
    fn missing_file_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.toml");
        let message = load_with(&path, env_of(&[])).unwrap_err().to_string();
        assert!(
            message.starts_with(&format!("cannot read config file {}: ", path.display())),
            "{message}"
        );
        assert!(message.contains("No such file"), "{message}");
    }

    #[test]
    fn syntax_error_is_one_line_naming_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.toml");
        fs::write(&path, "[mqtt]\nmax_payload = = 3\n").unwrap();
        let message = load_with(&path, env_of(&[])).unwrap_err().to_string();
        assert_one_line(&message);
        assert!(
            message.starts_with(&format!("invalid TOML in {}: at line 2", path.display())),
            "{message}"
        );
    }

    #[test]
    fn unknown_keys_are_named_in_full() {
        assert_eq!(
            parse_err("[mqtt]\nmax_paylod = 1\n"),
            "unknown key mqtt.max_paylod in test.toml"
        );
        assert_eq!(
            parse_err("mqtt.max_paylod = 1\n"),
            "unknown key mqtt.max_paylod in test.toml"
        );
        assert_eq!(
            parse_err("verbose = true\n"),
            "unknown key verbose in test.toml"
        );
        assert_eq!(
            parse_err("[websockets]\nlisten = \"0.0.0.0:1\"\n"),
            "unknown key websockets in test.toml"
        );
        assert_eq!(
            parse_err("[[auth.users]]\nname = \"a\"\npassword = \"p\"\n[[auth.users]]\nname = \"b\"\npasword = \"p\"\n"),
            "unknown key auth.users[1].pasword in test.toml"
        );
    }

    #[test]
    fn list_entries_need_all_their_keys() {
        assert_eq!(
            parse_err("[[auth.users]]\nname = \"alice\"\n"),
            "missing key auth.users[0].password in test.toml"
        );
        assert_eq!(
            parse_err("[[acl.rules]]\nuser = \"*\"\ntopic = \"#\"\n"),
            "missing key acl.rules[0].access in test.toml"
        );
    }

    #[test]
    fn wrong_types_name_the_key() {
        assert_eq!(
            parse_err("[mqtt]\nmax_payload = \"abc\"\n"),
            "mqtt.max_payload: expected an integer, found \"abc\" in test.toml"
        );
        assert_eq!(
            parse_err("[mqtt]\nmax_payload = 1.5\n"),
            "mqtt.max_payload: expected an integer, found 1.5 in test.toml"
        );
        assert_eq!(
            parse_err("[auth]\nallow_anonymous = 1\n"),
            "auth.allow_anonymous: expected true or false, found 1 in test.toml"
        );
        assert_eq!(
            parse_err("[auth]\njwt_secret = 1234\n"),
            "auth.jwt_secret: expected a non-empty string, found 1234 in test.toml"
        );
        assert_eq!(
            parse_err("mqtt = 5\n"),
            "mqtt: expected a [mqtt] table, found 5 in test.toml"
        );
        assert_eq!(
            parse_err("[auth.users]\nname = \"alice\"\n"),
            "auth.users: expected an array of tables ([[auth.users]]), found a table in test.toml"
        );
    }

    #[test]
    fn http_listen_is_an_address_on_loopback_by_default() {
        assert_eq!(
            Settings::default().http.listen,
            "127.0.0.1:8080".parse::<SocketAddr>().unwrap()
        );
        let message = parse_err("[http]\nlisten = \"localhost:8080\"\n");
        assert!(
            message.starts_with("http.listen: expected an ip:port socket address"),
            "{message}"
        );
    }

    #[test]
    fn bad_listen_address_is_refused() {
        let message = parse_err("[mqtt]\nlisten = \"0.0.0.0\"\n");
        assert!(
            message.starts_with("mqtt.listen: expected an ip:port socket address"),
            "{message}"
        );
        assert!(
            message.ends_with("found \"0.0.0.0\" in test.toml"),
            "{message}"
        );
    }

    #[test]
    fn out_of_range_values_give_the_range() {
        assert_eq!(
            parse_err("[mqtt]\nmax_payload = 0\n"),
            "mqtt.max_payload: must be between 1 and 268435455, found 0 in test.toml"
        );
        assert_eq!(
            parse_err("[mqtt]\nmax_payload = 268435456\n"),
            "mqtt.max_payload: must be between 1 and 268435455, found 268435456 in test.toml"
        );
        assert_eq!(
            parse_err("[mqtt]\nmax_inflight = 65536\n"),
            "mqtt.max_inflight: must be between 1 and 65535, found 65536 in test.toml"
        );
        assert_eq!(
            parse_err("[mqtt]\nmax_connections = -1\n"),
            "mqtt.max_connections: must be at least 1, found -1 in test.toml"
        );
        assert_eq!(
            parse_err("[storage]\nsync_interval_ms = 0\n"),
            "storage.sync_interval_ms: must be at least 1, found 0 in test.toml"
        );
        assert_eq!(
            parse_err("[chat]\nhistory_limit = 0\n"),
            "chat.history_limit: must be at least 1, found 0 in test.toml"
        );
        assert_eq!(
            parse_err("[cluster]\npartitions = 0\n"),
            "cluster.partitions: must be between 1 and 1024, found 0 in test.toml"
        );
        assert_eq!(
            parse_err("[cluster]\nreplicas = 7\n"),
            "cluster.replicas: must be between 1 and 5, found 7 in test.toml"
        );
        assert_eq!(
            parse_err("[cluster]\nlease_ttl_ms = 500\n"),
            "cluster.lease_ttl_ms: must be between 1000 and 60000, found 500 in test.toml"
        );
        assert_eq!(
            parse_err("[chat]\nretention_max_age_secs = -1\n"),
            "chat.retention_max_age_secs: must be at least 0, found -1 in test.toml"
        );
    }

    #[test]
    fn bad_words_list_the_allowed_ones() {
        assert_eq!(
            parse_err("[[acl.rules]]\nuser = \"*\"\ntopic = \"#\"\naccess = \"write\"\n"),
            "acl.rules[0].access: expected one of \"pub\", \"sub\", \"pubsub\", \"deny\", \
             found \"write\" in test.toml"
        );
        assert_eq!(
            parse_err("[storage]\nsync = \"sometimes\"\n"),
            "storage.sync: expected one of \"always\", \"interval\", \"never\", \
             found \"sometimes\" in test.toml"
        );
    }

    #[test]
    fn from_toml_validates() {
        let message =
            Settings::from_toml("[[auth.users]]\nname = \"no spaces\"\npassword = \"p\"\n")
                .unwrap_err()
                .to_string();
        assert!(message.starts_with("auth.users[0].name: "), "{message}");

        let dir = tempfile::tempdir().unwrap();
        let data_dir = dir.path().join("d");
        let text = format!("[node]\ndata_dir = {:?}\n", data_dir.to_str().unwrap());
        let settings = Settings::from_toml(&text).unwrap();
        assert_eq!(settings.node.data_dir, data_dir);
        assert!(data_dir.is_dir());
    }
}
