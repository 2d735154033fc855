//! Validation: the rules a type and a range cannot express (user ids, ACL
//! topic filters, duplicates) and the files and directories the settings
//! name. Runs after deserialising, so errors name keys the way the file does
//! (`auth.users[1].name`).
//!
//! The pure checks run first so that a wrong file never gets as far as
//! creating `node.data_dir`. Creating that directory, and a probe file in it
//! that is removed at once, is the only change this crate makes to the system.

use std::collections::HashMap;
use std::fs;
use std::io;
use std::path::Path;

use crate::error::ConfigError;
use crate::settings::{AclRule, Bridge, Mqtt, Push, Settings, Tls, User};

/// Checks what [`Settings::load`] and [`Settings::from_toml`] cannot check by
/// type alone; creates `node.data_dir` if it is missing.
pub(crate) fn validate(settings: &Settings) -> Result<(), ConfigError> {
    check_users(&settings.auth.users)?;
    check_acl_rules(&settings.acl.rules)?;
    if let Some(path) = &settings.auth.jwt_public_key {
        check_readable("auth.jwt_public_key", path)?;
    }
    if let Some(tls) = &settings.mqtt.tls {
        check_tls("mqtt.tls", tls)?;
    }
    check_websocket(settings)?;
    if let Some(dir) = &settings.http.static_dir {
        if !dir.is_dir() {
            return Err(ConfigError::Path {
                key: "http.static_dir".to_string(),
                path: dir.clone(),
                problem: "it is not a directory".to_string(),
            });
        }
    }
    check_push(&settings.push)?;
    check_bridge(&settings.bridge)?;
    check_publish_bursts(&settings.mqtt)?;
    prepare_data_dir(&settings.node.data_dir)
}

/// A required key that was left out of a section that is present.
fn required(key: &str) -> ConfigError {
    ConfigError::Invalid {
        key: key.to_string(),
        reason: "missing, and required when its section is present".to_string(),
    }
}

fn check_required_path(key: &str, path: &Path) -> Result<(), ConfigError> {
    if path.as_os_str().is_empty() {
        return Err(required(key));
    }
    check_readable(key, path)
}

fn check_tls(section: &str, tls: &Tls) -> Result<(), ConfigError> {
    check_required_path(&format!("{section}.cert"), &tls.cert)?;
    check_required_path(&format!("{section}.key"), &tls.key)
}

fn check_websocket(settings: &Settings) -> Result<(), ConfigError> {
    let ws = &settings.websocket;
    if !ws.path.starts_with('/') {
        return Err(ConfigError::Invalid {
            key: "websocket.path".to_string(),
            reason: format!("{:?} must start with \"/\"", ws.path),
        });
    }
    if ws.max_frame_size > ws.max_message_size {
        return Err(ConfigError::Invalid {
            key: "websocket.max_frame_size".to_string(),
            reason: format!(
                "{} is larger than websocket.max_message_size ({})",
                ws.max_frame_size, ws.max_message_size
            ),
        });
    }
    if let Some(tls) = &ws.tls {
        check_tls("websocket.tls", tls)?;
    }
    Ok(())
}

fn check_push(push: &Push) -> Result<(), ConfigError> {
    if push.retry_base_ms > push.retry_max_ms {
        return Err(ConfigError::Invalid {
            key: "push.retry_base_ms".to_string(),
            reason: format!(
                "{} is larger than push.retry_max_ms ({})",
                push.retry_base_ms, push.retry_max_ms
            ),
        });
    }
    if let Some(webhook) = &push.webhook {
        if webhook.url.is_empty() {
            return Err(required("push.webhook.url"));
        }
        if !(webhook.url.starts_with("http://") || webhook.url.starts_with("https://")) {
            return Err(ConfigError::Invalid {
                key: "push.webhook.url".to_string(),
                reason: format!("{:?} is not an http:// or https:// URL", webhook.url),
            });
        }
    }
    if let Some(apns) = &push.apns {
        check_required_path("push.apns.key_file", &apns.key_file)?;
        for (key, value) in [
            ("push.apns.key_id", &apns.key_id),
            ("push.apns.team_id", &apns.team_id),
            ("push.apns.topic", &apns.topic),
        ] {
            if value.is_empty() {
                return Err(required(key));
            }
        }
        if let Some(endpoint) = &apns.endpoint {
            if !endpoint.starts_with("https://") {
                return Err(ConfigError::Invalid {
                    key: "push.apns.endpoint".to_string(),
                    reason: format!(
                        "{endpoint:?} is not an https:// URL (APNs is HTTP/2 over TLS)"
                    ),
                });
            }
        }
        if let Some(ca_file) = &apns.ca_file {
            check_required_path("push.apns.ca_file", ca_file)?;
        }
    }
    if let Some(fcm) = &push.fcm {
        check_required_path("push.fcm.service_account_file", &fcm.service_account_file)?;
    }
    Ok(())
}

/// A byte burst below `max_payload` would refuse the largest message a
/// client may send on every try, however slowly it sent.
fn check_publish_bursts(mqtt: &Mqtt) -> Result<(), ConfigError> {
    for (key, burst) in [
        ("mqtt.publish_bytes_burst", mqtt.publish_bytes_burst),
        (
            "mqtt.user_publish_bytes_burst",
            mqtt.user_publish_bytes_burst,
        ),
    ] {
        if burst < mqtt.max_payload as u64 {
            return Err(ConfigError::Invalid {
                key: key.to_string(),
                reason: format!(
                    "{burst} is smaller than mqtt.max_payload ({}): the largest message could never be published",
                    mqtt.max_payload
                ),
            });
        }
    }
    Ok(())
}

fn check_bridge(bridge: &Bridge) -> Result<(), ConfigError> {
    let mut seen: HashMap<&str, usize> = HashMap::new();
    for (index, remote) in bridge.remotes.iter().enumerate() {
        let at = |field: &str| format!("bridge.remotes[{index}].{field}");
        let invalid = |field: &str, reason: String| ConfigError::Invalid {
            key: at(field),
            reason,
        };
        if !is_user_id(&remote.name) {
            let reason = format!("{:?} is not a valid name ({USER_ID_RULE})", remote.name);
            return Err(invalid("name", reason));
        }
        if let Some(first) = seen.insert(&remote.name, index) {
            let reason = format!(
                "{:?} is already the name of bridge.remotes[{first}]",
                remote.name
            );
            return Err(invalid("name", reason));
        }
        let port = remote
            .address
            .rsplit_once(':')
            .filter(|(host, _)| !host.is_empty())
            .and_then(|(_, port)| port.parse::<u16>().ok());
        if port.is_none_or(|p| p == 0) {
            let reason = format!("{:?} is not host:port", remote.address);
            return Err(invalid("address", reason));
        }
        match (&remote.ca_file, remote.tls) {
            (Some(path), true) => check_readable(&at("ca_file"), path)?,
            (None, true) => {
                let reason = "required when tls = true (the remote's CA, PEM)".to_string();
                return Err(invalid("ca_file", reason));
            }
            (Some(_), false) => {
                let reason = "set, but tls is false".to_string();
                return Err(invalid("ca_file", reason));
            }
            (None, false) => {}
        }
        if remote.password.is_some() && remote.username.is_none() {
            let reason = "a password needs a username".to_string();
            return Err(invalid("password", reason));
        }
        if let Some(user) = &remote.local_user {
            if !is_user_id(user) {
                let reason = format!("{user:?} is not a valid user id ({USER_ID_RULE})");
                return Err(invalid("local_user", reason));
            }
        }
        if remote.reconnect_min_ms > remote.reconnect_max_ms {
            let reason = format!(
                "{} is larger than reconnect_max_ms ({})",
                remote.reconnect_min_ms, remote.reconnect_max_ms
            );
            return Err(invalid("reconnect_min_ms", reason));
        }
        if remote.topics.is_empty() {
            let reason = "no [[bridge.remotes.topics]]: nothing would cross".to_string();
            return Err(invalid("topics", reason));
        }
        for (t, topic) in remote.topics.iter().enumerate() {
            let key = |field: &str| format!("bridge.remotes[{index}].topics[{t}].{field}");
            for (field, prefix) in [
                ("local_prefix", &topic.local_prefix),
                ("remote_prefix", &topic.remote_prefix),
            ] {
                if prefix.contains(['+', '#', '\0']) {
                    return Err(ConfigError::Invalid {
                        key: key(field),
                        reason: format!("{prefix:?} holds a wildcard or NUL"),
                    });
                }
            }
            for (prefix, field) in [
                (&topic.local_prefix, "local_prefix"),
                (&topic.remote_prefix, "remote_prefix"),
            ] {
                let full = format!("{prefix}{}", topic.pattern);
                if let Err(reason) = check_topic_filter(&full) {
                    return Err(ConfigError::Invalid {
                        key: key("pattern"),
                        reason: format!(
                            "{field} + pattern, {full:?}, is not a valid topic filter: {reason}"
                        ),
                    });
                }
            }
        }
    }
    Ok(())
}

/// A user id as the design fixes it (DESIGN §4): `[A-Za-z0-9_-]{1,64}`.
/// The one definition: configured users, JWT subjects and chat topics
/// are all checked with it.
pub fn is_user_id(name: &str) -> bool {
    (1..=64).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

const USER_ID_RULE: &str = "1 to 64 of A-Z a-z 0-9 _ -";

fn check_users(users: &[User]) -> Result<(), ConfigError> {
    let mut seen: HashMap<&str, usize> = HashMap::new();
    for (index, user) in users.iter().enumerate() {
        let key = format!("auth.users[{index}].name");
        if !is_user_id(&user.name) {
            return Err(ConfigError::Invalid {
                key,
                reason: format!("{:?} is not a valid user id ({USER_ID_RULE})", user.name),
            });
        }
        if let Some(first) = seen.insert(&user.name, index) {
            return Err(ConfigError::Invalid {
                key,
                reason: format!("{:?} is already defined in auth.users[{first}]", user.name),
            });
        }
    }
    Ok(())
}

fn check_acl_rules(rules: &[AclRule]) -> Result<(), ConfigError> {
    for (index, rule) in rules.iter().enumerate() {
        if rule.user != "*" && !is_user_id(&rule.user) {
            return Err(ConfigError::Invalid {
                key: format!("acl.rules[{index}].user"),
                reason: format!(
                    "{:?} is neither \"*\" nor a valid user id ({USER_ID_RULE})",
                    rule.user
                ),
            });
        }
        if let Err(reason) = check_topic_filter(&rule.topic) {
            return Err(ConfigError::Invalid {
                key: format!("acl.rules[{index}].topic"),
                reason: format!("{:?} is not a valid topic filter: {reason}", rule.topic),
            });
        }
    }
    Ok(())
}

/// An MQTT topic filter: non-empty, at most 65535 bytes, no NUL, `#` only as
/// the whole last level, `+` only as a whole level. `%u` and `%c` are plain
/// characters here; the broker substitutes them.
fn check_topic_filter(filter: &str) -> Result<(), &'static str> {
    if filter.is_empty() {
        return Err("it is empty");
    }
    if filter.len() > usize::from(u16::MAX) {
        return Err("it is longer than 65535 bytes");
    }
    if filter.contains('\0') {
        return Err("it contains a NUL character");
    }
    let mut levels = filter.split('/').peekable();
    while let Some(level) = levels.next() {
        let last = levels.peek().is_none();
        if level.contains('#') && (level != "#" || !last) {
            return Err("\"#\" must be a whole level and the last one");
        }
        if level.contains('+') && level != "+" {
            return Err("\"+\" must be a whole level");
        }
    }
    Ok(())
}

fn check_readable(key: &str, path: &Path) -> Result<(), ConfigError> {
    fs::read(path).map(drop).map_err(|error| ConfigError::Path {
        key: key.to_string(),
        path: path.to_path_buf(),
        problem: format!("cannot read it: {error}"),
    })
}

/// Creates the data directory if needed and proves it writable by creating
/// and removing a probe file, so a read-only or full disk stops the broker at
/// start-up rather than at its first write.
fn prepare_data_dir(dir: &Path) -> Result<(), ConfigError> {
    let failure = |problem: String| ConfigError::Path {
        key: "node.data_dir".to_string(),
        path: dir.to_path_buf(),
        problem,
    };
    if dir.exists() && !dir.is_dir() {
        return Err(failure("it exists and is not a directory".to_string()));
    }
    fs::create_dir_all(dir).map_err(|error| failure(format!("cannot create it: {error}")))?;
    let probe = dir.join(format!(".chatmq-write-probe-{}", std::process::id()));
    fs::write(&probe, b"").map_err(|error| failure(format!("cannot write in it: {error}")))?;
    match fs::remove_file(&probe) {
        Err(error) if error.kind() != io::ErrorKind::NotFound => Err(failure(format!(
            "cannot remove the probe file {}: {error}",
            probe.display()
        ))),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::settings::{Access, Node};

    /// Settings whose data_dir lives in a fresh temporary directory.
    fn settings_in(dir: &tempfile::TempDir) -> Settings {
        Settings {
            node: Node {
                data_dir: dir.path().join("data"),
            },
            ..Settings::default()
        }
    }

    fn user(name: &str) -> User {
        User {
            name: name.into(),
            password: "p".into(),
        }
    }

    fn rule(user: &str, topic: &str) -> AclRule {
        AclRule {
            user: user.into(),
            topic: topic.into(),
            access: Access::PubSub,
        }
    }

    fn error(settings: &Settings) -> String {
        validate(settings).unwrap_err().to_string()
    }

    #[test]
    fn a_byte_burst_below_the_payload_limit_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = settings_in(&dir);
        s.mqtt.publish_bytes_burst = s.mqtt.max_payload as u64 - 1;
        assert!(
            error(&s).contains("mqtt.publish_bytes_burst"),
            "{}",
            error(&s)
        );
        let mut s = settings_in(&dir);
        s.mqtt.user_publish_bytes_burst = 1;
        assert!(error(&s).contains("mqtt.user_publish_bytes_burst"));
    }

    fn remote(name: &str, address: &str) -> crate::settings::Remote {
        crate::settings::Remote {
            name: name.into(),
            address: address.into(),
            topics: vec![crate::settings::BridgeTopic {
                pattern: "sensors/#".into(),
                ..crate::settings::BridgeTopic::default()
            }],
            ..crate::settings::Remote::default()
        }
    }

    #[test]
    fn bridge_remotes_are_checked_by_key() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = settings_in(&dir);
        s.bridge.remotes = vec![remote("a", "broker.example:1883")];
        assert!(validate(&s).is_ok());
        type Change = Box<dyn Fn(&mut crate::settings::Remote)>;
        let cases: Vec<(Change, &str)> = vec![
            (
                Box::new(|r| r.address = "broker.example".into()),
                "bridge.remotes[0].address",
            ),
            (
                Box::new(|r| r.address = ":1883".into()),
                "bridge.remotes[0].address",
            ),
            (Box::new(|r| r.tls = true), "bridge.remotes[0].ca_file"),
            (
                Box::new(|r| r.password = Some("p".into())),
                "bridge.remotes[0].password",
            ),
            (
                Box::new(|r| r.local_user = Some("a b".into())),
                "bridge.remotes[0].local_user",
            ),
            (
                Box::new(|r| r.reconnect_min_ms = r.reconnect_max_ms + 1),
                "bridge.remotes[0].reconnect_min_ms",
            ),
            (Box::new(|r| r.topics.clear()), "bridge.remotes[0].topics"),
            (
                Box::new(|r| r.topics[0].local_prefix = "a/+/".into()),
                "bridge.remotes[0].topics[0].local_prefix",
            ),
            (
                Box::new(|r| r.topics[0].pattern = "a/#/b".into()),
                "bridge.remotes[0].topics[0].pattern",
            ),
        ];
        for (change, key) in cases {
            let mut r = remote("a", "broker.example:1883");
            change(&mut r);
            s.bridge.remotes = vec![r];
            let e = error(&s);
            assert!(e.starts_with(&format!("{key}: ")), "{e}");
        }
        s.bridge.remotes = vec![remote("a", "x:1"), remote("a", "y:2")];
        assert!(
            error(&s).starts_with("bridge.remotes[1].name: "),
            "{}",
            error(&s)
        );
    }

    #[test]
    fn user_names_must_be_ids() {
        let dir = tempfile::tempdir().unwrap();
        let mut settings = settings_in(&dir);
        settings.auth.users = vec![user("alice"), user("bob smith")];
        assert_eq!(
            error(&settings),
            "auth.users[1].name: \"bob smith\" is not a valid user id (1 to 64 of A-Z a-z 0-9 _ -)"
        );
        settings.auth.users = vec![user(&"a".repeat(65))];
        assert!(error(&settings).starts_with("auth.users[0].name: "));
        settings.auth.users = vec![user(&"a".repeat(64)), user("Bob_2-x")];
        validate(&settings).unwrap();
    }

    #[test]
    fn user_names_must_be_unique() {
        let dir = tempfile::tempdir().unwrap();
        let mut settings = settings_in(&dir);
        settings.auth.users = vec![user("alice"), user("bob"), user("alice")];
        assert_eq!(
            error(&settings),
            "auth.users[2].name: \"alice\" is already defined in auth.users[0]"
        );
    }

    #[test]
    fn acl_user_is_star_or_an_id() {
        let dir = tempfile::tempdir().unwrap();
        let mut settings = settings_in(&dir);
        settings.acl.rules = vec![rule("*", "a"), rule("alice", "b"), rule("al*", "c")];
        assert_eq!(
            error(&settings),
            "acl.rules[2].user: \"al*\" is neither \"*\" nor a valid user id \
             (1 to 64 of A-Z a-z 0-9 _ -)"
        );
    }

    #[test]
    fn acl_topic_must_be_a_filter() {
        let dir = tempfile::tempdir().unwrap();
        let mut settings = settings_in(&dir);
        settings.acl.rules = vec![rule("*", "a/#/b")];
        assert_eq!(
            error(&settings),
            "acl.rules[0].topic: \"a/#/b\" is not a valid topic filter: \
             \"#\" must be a whole level and the last one"
        );
        for bad in ["", "a/b#", "#/", "a/+b", "a+/c", "x\0y"] {
            assert!(check_topic_filter(bad).is_err(), "{bad:?} accepted");
        }
        for good in [
            "#",
            "+",
            "a/#",
            "+/+/#",
            "/",
            "a//b",
            "sensors/%u/#",
            "dev/%c/+",
        ] {
            assert_eq!(check_topic_filter(good), Ok(()), "{good:?} refused");
        }
    }

    #[test]
    fn unreadable_jwt_public_key_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let mut settings = settings_in(&dir);
        let key = dir.path().join("missing.pem");
        settings.auth.jwt_public_key = Some(key.clone());
        let message = error(&settings);
        assert!(
            message.starts_with(&format!(
                "auth.jwt_public_key: {}: cannot read it: ",
                key.display()
            )),
            "{message}"
        );
        fs::write(&key, "-----BEGIN PUBLIC KEY-----\n").unwrap();
        validate(&settings).unwrap();
    }

    #[test]
    fn an_apns_endpoint_must_be_https_and_its_ca_file_readable() {
        let dir = tempfile::tempdir().unwrap();
        let mut settings = settings_in(&dir);
        let key = dir.path().join("AuthKey.p8");
        fs::write(&key, "-----BEGIN PRIVATE KEY-----\n").unwrap();
        let mut apns = crate::Apns {
            key_file: key,
            key_id: "KEY".into(),
            team_id: "TEAM".into(),
            topic: "com.example.chat".into(),
            endpoint: Some("http://127.0.0.1:8443".into()),
            ..Default::default()
        };
        settings.push.apns = Some(apns.clone());
        assert_eq!(
            error(&settings),
            "push.apns.endpoint: \"http://127.0.0.1:8443\" is not an https:// URL \
             (APNs is HTTP/2 over TLS)"
        );
        apns.endpoint = Some("https://127.0.0.1:8443".into());
        apns.ca_file = Some(dir.path().join("missing-ca.pem"));
        settings.push.apns = Some(apns.clone());
        assert!(
            error(&settings).starts_with("push.apns.ca_file: "),
            "{}",
            error(&settings)
        );
        apns.ca_file = None;
        settings.push.apns = Some(apns);
        validate(&settings).unwrap();
    }

    #[test]
    fn data_dir_is_created_when_missing() {
        let dir = tempfile::tempdir().unwrap();
        let mut settings = settings_in(&dir);
        settings.node.data_dir = dir.path().join("a/b/c");
        validate(&settings).unwrap();
        assert!(settings.node.data_dir.is_dir());
        assert_eq!(fs::read_dir(&settings.node.data_dir).unwrap().count(), 0);
    }

    #[test]
    fn data_dir_that_is_a_file_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let mut settings = settings_in(&dir);
        let file = dir.path().join("file");
        fs::write(&file, "").unwrap();
        settings.node.data_dir = file.clone();
        assert_eq!(
            error(&settings),
            format!(
                "node.data_dir: {}: it exists and is not a directory",
                file.display()
            )
        );
        settings.node.data_dir = file.join("below");
        let message = error(&settings);
        assert!(
            message.starts_with(&format!(
                "node.data_dir: {}: cannot create it: ",
                settings.node.data_dir.display()
            )),
            "{message}"
        );
    }

    #[test]
    fn pure_checks_come_before_creating_data_dir() {
        let dir = tempfile::tempdir().unwrap();
        let mut settings = settings_in(&dir);
        settings.auth.users = vec![user("not valid")];
        validate(&settings).unwrap_err();
        assert!(!settings.node.data_dir.exists());
    }
}
