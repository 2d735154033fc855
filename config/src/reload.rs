//! Reloading: which keys a running broker takes from a changed file
//! ([`RELOADABLE`]), and which keys of a new file differ from the running
//! settings but only take effect after a restart
//! ([`Settings::restart_needed`]).
//!
//! The broker decides how to apply a reloadable key; this module only
//! names keys. Values are compared as the settings serialise, so a key
//! spelled out with its default value is no change.

use std::collections::BTreeMap;

use config::{Config, Source, Value, ValueKind};

use crate::settings::Settings;

/// The keys a reload applies without a restart. An entry covers the key
/// and everything under it (`auth.users` covers each `[[auth.users]]`).
/// Everything else (listener addresses, `node.data_dir`, storage, sizes
/// of queues and pools, the chat and push sections) needs a restart.
pub const RELOADABLE: &[&str] = &[
    "auth.allow_anonymous",
    "auth.jwt_secret",
    "auth.jwt_public_key",
    "auth.admin_token",
    "auth.users",
    "auth.jwt_issuer",
    "auth.jwt_audience",
    "auth.limits.failed_logins_per_ip",
    "auth.limits.failed_logins_per_user",
    "auth.limits.failed_login_window_secs",
    "acl.rules",
    "mqtt.publish_rate",
    "mqtt.publish_burst",
    "mqtt.publish_bytes_rate",
    "mqtt.publish_bytes_burst",
    "mqtt.user_publish_rate",
    "mqtt.user_publish_burst",
    "mqtt.user_publish_bytes_rate",
    "mqtt.user_publish_bytes_burst",
    "mqtt.tls.cert",
    "mqtt.tls.key",
    "websocket.tls.cert",
    "websocket.tls.key",
];

/// Whether a reload applies `key` (a dotted key as the file spells it).
pub fn is_reloadable(key: &str) -> bool {
    RELOADABLE.iter().any(|r| {
        key.strip_prefix(r)
            .is_some_and(|rest| rest.is_empty() || rest.starts_with(['.', '[']))
    })
}

impl Settings {
    /// The keys whose value in `new` differs from `self` (the running
    /// settings) and that a reload does not apply, sorted: what the
    /// operator must restart for. A section that appears or disappears
    /// (`[mqtt.tls]` added) is named by its own key.
    pub fn restart_needed(&self, new: &Settings) -> Vec<String> {
        let (old, new) = match (flatten(self), flatten(new)) {
            (Ok(old), Ok(new)) => (old, new),
            // Settings always serialise (strings, numbers, tables); should
            // that ever fail, say so rather than claim nothing changed.
            (Err(e), _) | (_, Err(e)) => return vec![format!("(settings not comparable: {e})")],
        };
        let mut keys: Vec<String> = old
            .keys()
            .chain(new.keys())
            .filter(|k| old.get(*k) != new.get(*k) && !is_reloadable(k))
            .cloned()
            .collect();
        keys.sort();
        keys.dedup();
        keys
    }
}

/// Every leaf of the settings by dotted key (arrays are leaves).
fn flatten(settings: &Settings) -> Result<BTreeMap<String, ValueKind>, config::ConfigError> {
    let table = Config::try_from(settings)?.collect()?;
    let mut leaves = BTreeMap::new();
    add_leaves("", table, &mut leaves);
    Ok(leaves)
}

fn add_leaves(
    prefix: &str,
    table: config::Map<String, Value>,
    leaves: &mut BTreeMap<String, ValueKind>,
) {
    for (name, value) in table {
        let key = if prefix.is_empty() {
            name
        } else {
            format!("{prefix}.{name}")
        };
        match value.kind {
            ValueKind::Table(inner) => add_leaves(&key, inner, leaves),
            leaf => {
                leaves.insert(key, leaf);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::settings::{AclRule, Tls, User};
    use std::path::PathBuf;

    #[test]
    fn reloadable_keys_cover_their_entries_only() {
        assert!(is_reloadable("auth.users"));
        assert!(is_reloadable("auth.users[2].password"));
        assert!(is_reloadable("mqtt.tls.cert"));
        assert!(!is_reloadable("mqtt.tls.listen"));
        assert!(!is_reloadable("auth.users_extra"));
        assert!(!is_reloadable("mqtt.publish_rates"));
        assert!(!is_reloadable("auth.limits.password_checks"));
    }

    #[test]
    fn only_changes_a_reload_cannot_apply_are_named() {
        let old = Settings::default();
        let mut new = old.clone();
        assert!(old.restart_needed(&new).is_empty());
        new.auth.users.push(User {
            name: "alice".into(),
            password: "pw".into(),
        });
        new.acl.rules.push(AclRule {
            user: "*".into(),
            topic: "#".into(),
            access: crate::Access::Sub,
        });
        new.mqtt.publish_rate = 1;
        new.auth.limits.failed_logins_per_ip = 1;
        assert!(old.restart_needed(&new).is_empty(), "all reloadable");
        new.mqtt.listen = "127.0.0.1:1".parse().unwrap();
        new.node.data_dir = PathBuf::from("/elsewhere");
        new.auth.limits.password_checks = 9;
        assert_eq!(
            old.restart_needed(&new),
            [
                "auth.limits.password_checks",
                "mqtt.listen",
                "node.data_dir"
            ]
        );
    }

    #[test]
    fn a_tls_section_added_needs_a_restart_but_new_files_do_not() {
        let tls = |cert: &str| Tls {
            cert: cert.into(),
            key: "k.pem".into(),
            ..Tls::default()
        };
        let mut old = Settings::default();
        let mut new = old.clone();
        new.mqtt.tls = Some(tls("a.pem"));
        assert!(old.restart_needed(&new).contains(&"mqtt.tls".to_string()));
        old.mqtt.tls = Some(tls("a.pem"));
        new.mqtt.tls = Some(tls("b.pem"));
        assert!(old.restart_needed(&new).is_empty());
        new.mqtt.tls = Some(Tls {
            handshake_timeout_secs: 3,
            ..tls("b.pem")
        });
        assert_eq!(
            old.restart_needed(&new),
            ["mqtt.tls.handshake_timeout_secs"]
        );
    }
}
