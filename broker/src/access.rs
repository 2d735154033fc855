//! Access control: who a client is (authentication) and what it may touch
//! (authorisation by `[[acl.rules]]`).
//!
//! Authentication accepts a static user (`[[auth.users]]`, plaintext or an
//! argon2 PHC string) or a JWT in the password field whose `sub` is the
//! user name, signed HS256 with `jwt_secret` or RS256/ES256 with the key in
//! `jwt_public_key` (`exp` and `nbf` checked, `iss` and `aud` when
//! configured). A user name is a user id of DESIGN §4 or nothing: it is
//! substituted into topics (`%u`, `users/{u}/events`), so a name like `#` or
//! `a/b` never authenticates. Authorisation is default-deny; a deny rule
//! wins over any grant. This module decides; it never talks to a client.
//!
//! Both can be replaced while the broker runs (a configuration reload):
//! the users, keys and rules in force are one snapshot each, swapped
//! whole ([`Authenticator::replace`], [`Acl::replace`]) and read without a
//! lock, so a check sees the old or the new settings, never a mix, and the
//! per-publish and per-delivery ACL checks cost one atomic load more.

use std::collections::HashMap;
use std::sync::Arc;

use arc_swap::ArcSwap;
use argon2::{Argon2, PasswordHash, PasswordVerifier};
use chatmq_config::{Access, AclRule, Auth};
use jsonwebtoken::{Algorithm, DecodingKey, Validation};

use crate::chat::namespace::valid_user;
use crate::login_guard::LoginGuard;
use crate::topic;

/// Why the broker cannot start its access control.
#[derive(Debug, thiserror::Error)]
pub enum AccessError {
    #[error("auth.jwt_public_key {path}: {reason}")]
    PublicKey { path: String, reason: String },
    #[error("auth.users: password of `{user}` is not a valid argon2 PHC string: {reason}")]
    PasswordHash { user: String, reason: String },
}

/// Who a CONNECT turned out to be.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Identity {
    User(Arc<str>),
    Anonymous,
}

impl Identity {
    pub fn user(&self) -> Option<&Arc<str>> {
        match self {
            Identity::User(u) => Some(u),
            Identity::Anonymous => None,
        }
    }
}

/// Who a CONNECT turned out to be, and until when: a JWT login lasts until
/// the token's `exp` (unix seconds), a password login for good.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Login {
    pub identity: Identity,
    pub expires_at: Option<u64>,
}

/// Why a CONNECT was refused; maps to CONNACK codes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// Wrong password, invalid token, or a user name that is not a user id
    /// (0x04 / 0x86).
    BadCredentials,
    /// No credentials and anonymous access is off (0x05 / 0x87).
    NotAuthorized,
    /// Too many failed logins from this address or for this user name; the
    /// credentials were not checked (3.1.1 0x05 / MQTT 5 0x9F).
    RateLimited,
    /// The password-check pool and its queue are full (0x03 / 0x89).
    ServerBusy,
}

enum Secret {
    Plain(String),
    Argon2(String),
}

struct Jwt {
    key: DecodingKey,
    algorithm: Algorithm,
}

/// The users, keys and switches of `[auth]` in force: what a reload
/// replaces. Built (and checked) whole before it is swapped in.
pub struct Credentials {
    users: HashMap<String, Secret>,
    jwt: Vec<Jwt>,
    issuer: Option<String>,
    audience: Option<String>,
    allow_anonymous: bool,
    admin_token: Option<String>,
}

pub struct Authenticator {
    credentials: ArcSwap<Credentials>,
    /// The failed-login limits and the password-check pool. Kept across
    /// reloads: its counts are state, only its limits change.
    pub guard: LoginGuard,
}

/// The claims chatmq reads from a user JWT (`exp`, `nbf`, `iss`, `aud` are
/// checked by the validation itself).
#[derive(serde::Deserialize)]
struct Claims {
    sub: String,
    exp: u64,
}

impl Credentials {
    /// Reads `[auth]`: parses the argon2 strings and loads
    /// `auth.jwt_public_key`, so a bad one is refused before it is used.
    pub fn new(auth: &Auth) -> Result<Credentials, AccessError> {
        let mut users = HashMap::new();
        for u in &auth.users {
            let secret = if u.password.starts_with("$argon2") {
                PasswordHash::new(&u.password).map_err(|e| AccessError::PasswordHash {
                    user: u.name.clone(),
                    reason: e.to_string(),
                })?;
                Secret::Argon2(u.password.clone())
            } else {
                Secret::Plain(u.password.clone())
            };
            users.insert(u.name.clone(), secret);
        }
        let mut jwt = Vec::new();
        if let Some(secret) = &auth.jwt_secret {
            jwt.push(Jwt {
                key: DecodingKey::from_secret(secret.as_bytes()),
                algorithm: Algorithm::HS256,
            });
        }
        if let Some(path) = &auth.jwt_public_key {
            let shown = path.display().to_string();
            let pem = std::fs::read(path).map_err(|e| AccessError::PublicKey {
                path: shown.clone(),
                reason: e.to_string(),
            })?;
            let (key, algorithm) = if let Ok(k) = DecodingKey::from_rsa_pem(&pem) {
                (k, Algorithm::RS256)
            } else if let Ok(k) = DecodingKey::from_ec_pem(&pem) {
                (k, Algorithm::ES256)
            } else {
                return Err(AccessError::PublicKey {
                    path: shown,
                    reason: "not an RSA or EC public key in PEM form".into(),
                });
            };
            jwt.push(Jwt { key, algorithm });
        }
        Ok(Credentials {
            users,
            jwt,
            issuer: auth.jwt_issuer.clone(),
            audience: auth.jwt_audience.clone(),
            allow_anonymous: auth.allow_anonymous,
            admin_token: auth.admin_token.clone(),
        })
    }
}

impl Authenticator {
    pub fn new(auth: &Auth) -> Result<Self, AccessError> {
        Ok(Authenticator {
            credentials: ArcSwap::from_pointee(Credentials::new(auth)?),
            guard: LoginGuard::new(&auth.limits),
        })
    }

    /// Puts `credentials` in force for every check from now on. Clients
    /// already connected stay connected, as in Mosquitto: a login is
    /// checked once, at CONNECT (and a JWT login still ends at its `exp`).
    pub fn replace(&self, credentials: Credentials) {
        self.credentials.store(Arc::new(credentials));
    }

    /// Checks CONNECT credentials. May take milliseconds (argon2): call it
    /// off the async runtime, through the password-check pool when
    /// [`Authenticator::hashes`] says so.
    pub fn authenticate(
        &self,
        username: Option<&str>,
        password: Option<&[u8]>,
    ) -> Result<Identity, Refusal> {
        self.login(username, password).map(|l| l.identity)
    }

    /// [`Authenticator::authenticate`], also saying until when the login holds.
    pub fn login(&self, username: Option<&str>, password: Option<&[u8]>) -> Result<Login, Refusal> {
        // A full reference: the check may run argon2 for milliseconds.
        self.credentials.load_full().login(username, password)
    }

    /// Would checking this user name's password run argon2 (about 19 MiB
    /// and tens of milliseconds)? Such checks go through the bounded pool.
    pub fn hashes(&self, username: &str) -> bool {
        matches!(
            self.credentials.load().users.get(username),
            Some(Secret::Argon2(_))
        )
    }

    /// The user a bearer token (HTTP API) stands for: a JWT checked as a
    /// CONNECT password is, whose `sub` is a valid user id.
    pub fn user_from_token(&self, token: &str) -> Option<String> {
        self.credentials
            .load()
            .jwt_claims(token, None)
            .map(|c| c.sub)
            .filter(|sub| valid_user(sub))
    }

    /// Is `token` the configured `auth.admin_token`? Compared in constant
    /// time; never true when none is configured.
    pub fn is_admin_token(&self, token: &str) -> bool {
        self.credentials
            .load()
            .admin_token
            .as_deref()
            .is_some_and(|admin| constant_time_eq(admin.as_bytes(), token.as_bytes()))
    }
}

impl Credentials {
    fn login(&self, username: Option<&str>, password: Option<&[u8]>) -> Result<Login, Refusal> {
        let Some(username) = username.filter(|u| !u.is_empty()) else {
            return if self.allow_anonymous && password.is_none() {
                Ok(Login {
                    identity: Identity::Anonymous,
                    expires_at: None,
                })
            } else {
                Err(Refusal::NotAuthorized)
            };
        };
        // Before any hashing: a name that is not a user id can be no one.
        if !valid_user(username) {
            return Err(Refusal::BadCredentials);
        }
        let password = password.unwrap_or_default();
        if let Some(secret) = self.users.get(username) {
            let ok = match secret {
                Secret::Plain(p) => constant_time_eq(p.as_bytes(), password),
                Secret::Argon2(phc) => PasswordHash::new(phc)
                    .map(|h| Argon2::default().verify_password(password, &h).is_ok())
                    .unwrap_or(false),
            };
            if ok {
                return Ok(Login {
                    identity: Identity::User(username.into()),
                    expires_at: None,
                });
            }
        }
        let token = std::str::from_utf8(password).map_err(|_| Refusal::BadCredentials)?;
        match self.jwt_claims(token, Some(username)) {
            Some(claims) => Ok(Login {
                identity: Identity::User(username.into()),
                expires_at: Some(claims.exp),
            }),
            None => Err(Refusal::BadCredentials),
        }
    }

    /// The claims of a token signed by a key we hold, unexpired and already
    /// valid (`nbf`), from the configured issuer and for the configured
    /// audience, whose `sub` equals `sub` when one is required. Without a
    /// configured audience a token that names one is refused: it was issued
    /// for another service.
    fn jwt_claims(&self, token: &str, sub: Option<&str>) -> Option<Claims> {
        self.jwt.iter().find_map(|j| {
            let mut v = Validation::new(j.algorithm);
            let mut required = vec!["exp", "sub"];
            if let Some(iss) = &self.issuer {
                v.set_issuer(&[iss]);
                required.push("iss");
            }
            if let Some(aud) = &self.audience {
                v.set_audience(&[aud]);
                required.push("aud");
            }
            v.set_required_spec_claims(&required);
            v.validate_nbf = true;
            v.sub = sub.map(str::to_string);
            v.leeway = 0;
            jsonwebtoken::decode::<Claims>(token, &j.key, &v)
                .ok()
                .map(|data| data.claims)
        })
    }
}

/// `value` if it fills exactly one topic level: not empty, no `/`, no
/// wildcard, no NUL. What `%u` and `%c` may stand for.
fn one_level(value: &str) -> Option<&str> {
    (!value.is_empty() && !value.contains(['/', '+', '#', '\0'])).then_some(value)
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

struct Rule {
    /// `None` for `*`.
    user: Option<String>,
    topic: String,
    access: Access,
}

/// The `[[acl.rules]]`, compiled.
struct Rules {
    rules: Vec<Rule>,
    has_deny: bool,
}

/// The `[[acl.rules]]` in force, replaced whole by a reload.
pub struct Acl {
    current: ArcSwap<Rules>,
}

impl Acl {
    pub fn new(rules: &[AclRule]) -> Acl {
        Acl {
            current: ArcSwap::from_pointee(Rules::new(rules)),
        }
    }

    /// Puts `rules` in force for every check from now on: each new
    /// SUBSCRIBE and PUBLISH, and each delivery's deny check.
    /// Subscriptions granted before are not checked again (as in
    /// Mosquitto and EMQX): a grant removed stops new subscriptions, a
    /// deny rule added also stops deliveries on the topics it covers.
    pub fn replace(&self, rules: &[AclRule]) {
        self.current.store(Arc::new(Rules::new(rules)));
    }

    pub fn can_publish(&self, user: Option<&str>, client_id: &str, topic: &str) -> bool {
        self.current.load().can_publish(user, client_id, topic)
    }

    /// A subscription is granted when a rule covers every topic it could
    /// match and no deny rule covers it. A deny rule that covers only part
    /// of it is enforced per message by [`Acl::can_receive`].
    pub fn can_subscribe(&self, user: Option<&str>, client_id: &str, filter: &str) -> bool {
        self.current.load().can_subscribe(user, client_id, filter)
    }

    /// Delivery-time check: false if a deny rule matches this topic.
    pub fn can_receive(&self, user: Option<&str>, client_id: &str, topic: &str) -> bool {
        self.current.load().can_receive(user, client_id, topic)
    }
}

impl Rules {
    fn new(rules: &[AclRule]) -> Rules {
        Rules {
            rules: rules
                .iter()
                .map(|r| Rule {
                    user: (r.user != "*").then(|| r.user.clone()),
                    topic: r.topic.clone(),
                    access: r.access,
                })
                .collect(),
            has_deny: rules.iter().any(|r| r.access == Access::Deny),
        }
    }

    /// The rules that apply to this client, with `%u` and `%c` filled in.
    /// A rule naming `%u` does not apply to anonymous clients; a rule whose
    /// substitution would inject a wildcard or a level does not apply.
    fn applicable<'a>(
        &'a self,
        user: Option<&'a str>,
        client_id: &'a str,
    ) -> impl Iterator<Item = (String, Access)> + 'a {
        self.rules.iter().filter_map(move |r| {
            if let Some(u) = &r.user {
                if Some(u.as_str()) != user {
                    return None;
                }
            }
            let mut filter = r.topic.clone();
            if filter.contains("%u") {
                filter = filter.replace("%u", one_level(user?)?);
            }
            if filter.contains("%c") {
                filter = filter.replace("%c", one_level(client_id)?);
            }
            Some((filter, r.access))
        })
    }

    fn can_publish(&self, user: Option<&str>, client_id: &str, topic: &str) -> bool {
        let mut granted = false;
        for (filter, access) in self.applicable(user, client_id) {
            if topic::matches(&filter, topic) {
                match access {
                    Access::Deny => return false,
                    Access::Pub | Access::PubSub => granted = true,
                    Access::Sub => {}
                }
            }
        }
        granted
    }

    fn can_subscribe(&self, user: Option<&str>, client_id: &str, filter: &str) -> bool {
        let mut granted = false;
        for (rule, access) in self.applicable(user, client_id) {
            if topic::covers(&rule, filter) {
                match access {
                    Access::Deny => return false,
                    Access::Sub | Access::PubSub => granted = true,
                    Access::Pub => {}
                }
            }
        }
        granted
    }

    fn can_receive(&self, user: Option<&str>, client_id: &str, topic: &str) -> bool {
        if !self.has_deny {
            return true;
        }
        !self
            .applicable(user, client_id)
            .any(|(f, a)| a == Access::Deny && topic::matches(&f, topic))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chatmq_config::User;

    fn rule(user: &str, topic: &str, access: Access) -> AclRule {
        AclRule {
            user: user.into(),
            topic: topic.into(),
            access,
        }
    }

    #[test]
    fn default_deny_and_deny_wins() {
        let acl = Acl::new(&[
            rule("*", "sensors/%u/#", Access::PubSub),
            rule("*", "public/#", Access::Sub),
            rule("*", "public/secret", Access::Deny),
            rule("bob", "#", Access::Pub),
        ]);
        assert!(acl.can_publish(Some("alice"), "c", "sensors/alice/t"));
        assert!(!acl.can_publish(Some("alice"), "c", "sensors/bob/t"));
        assert!(!acl.can_publish(Some("alice"), "c", "public/x"), "sub only");
        assert!(acl.can_subscribe(Some("alice"), "c", "public/+"));
        assert!(!acl.can_subscribe(Some("alice"), "c", "public/secret"));
        assert!(!acl.can_receive(Some("alice"), "c", "public/secret"));
        assert!(acl.can_receive(Some("alice"), "c", "public/other"));
        assert!(
            !acl.can_subscribe(Some("alice"), "c", "sensors/#"),
            "too broad"
        );
        assert!(
            !acl.can_publish(Some("bob"), "c", "public/secret"),
            "deny wins"
        );
        assert!(acl.can_publish(Some("bob"), "c", "anything"));
        assert!(
            !acl.can_publish(None, "c", "sensors/x/t"),
            "%u never matches anonymous"
        );
        assert!(!acl.can_publish(Some("carol"), "c", "other"));
    }

    #[test]
    fn client_id_substitution_cannot_inject_wildcards() {
        let acl = Acl::new(&[rule("*", "clients/%c/#", Access::PubSub)]);
        assert!(acl.can_subscribe(None, "dev1", "clients/dev1/#"));
        assert!(!acl.can_subscribe(None, "#", "clients/#/#"));
        assert!(!acl.can_publish(None, "a/b", "clients/a/b/x"));
    }

    fn auth(users: Vec<User>, secret: Option<&str>, anon: bool) -> Authenticator {
        Authenticator::new(&Auth {
            allow_anonymous: anon,
            jwt_secret: secret.map(Into::into),
            users,
            ..Auth::default()
        })
        .unwrap()
    }

    #[test]
    fn user_substitution_cannot_inject_wildcards_or_levels() {
        let acl = Acl::new(&[rule("*", "sensors/%u/#", Access::PubSub)]);
        assert!(acl.can_subscribe(Some("erin"), "c", "sensors/erin/#"));
        for user in ["#", "+", "a/b", ""] {
            assert!(!acl.can_subscribe(Some(user), "c", "sensors/#"), "{user:?}");
            assert!(
                !acl.can_publish(Some(user), "c", "sensors/dana/t"),
                "{user:?}"
            );
        }
    }

    fn hs256(claims: serde_json::Value) -> String {
        use jsonwebtoken::{encode, EncodingKey, Header};
        encode(
            &Header::new(Algorithm::HS256),
            &claims,
            &EncodingKey::from_secret(b"k"),
        )
        .unwrap()
    }

    #[test]
    fn a_jwt_subject_that_is_not_a_user_id_never_logs_in() {
        let a = auth(vec![], Some("k"), false);
        let exp = jsonwebtoken::get_current_timestamp() + 60;
        for sub in ["#", "+", "a/b", "al ice", "sensors/+"] {
            let t = hs256(serde_json::json!({"sub": sub, "exp": exp}));
            assert_eq!(
                a.authenticate(Some(sub), Some(t.as_bytes())),
                Err(Refusal::BadCredentials),
                "{sub:?}"
            );
            assert_eq!(a.user_from_token(&t), None, "{sub:?}");
        }
    }

    #[test]
    fn jwt_not_before_issuer_and_audience() {
        let now = jsonwebtoken::get_current_timestamp();
        let plain = auth(vec![], Some("k"), false);
        let later = hs256(serde_json::json!({"sub": "alice", "exp": now + 600, "nbf": now + 300}));
        assert_eq!(plain.user_from_token(&later), None, "not valid yet");
        let for_other =
            hs256(serde_json::json!({"sub": "alice", "exp": now + 60, "aud": "billing"}));
        assert_eq!(
            plain.user_from_token(&for_other),
            None,
            "an audience we were not configured for"
        );
        let login = plain
            .login(
                Some("alice"),
                Some(hs256(serde_json::json!({"sub": "alice", "exp": now + 60})).as_bytes()),
            )
            .unwrap();
        assert_eq!(login.expires_at, Some(now + 60));

        let strict = Authenticator::new(&Auth {
            jwt_secret: Some("k".into()),
            jwt_issuer: Some("https://id.example".into()),
            jwt_audience: Some("chatmq".into()),
            ..Auth::default()
        })
        .unwrap();
        let good = hs256(serde_json::json!({
            "sub": "alice", "exp": now + 60, "iss": "https://id.example", "aud": "chatmq"
        }));
        assert_eq!(strict.user_from_token(&good).as_deref(), Some("alice"));
        for claims in [
            serde_json::json!({"sub": "alice", "exp": now + 60, "aud": "chatmq"}),
            serde_json::json!({"sub": "alice", "exp": now + 60, "iss": "https://id.example"}),
            serde_json::json!({"sub": "alice", "exp": now + 60, "iss": "https://evil", "aud": "chatmq"}),
            serde_json::json!({"sub": "alice", "exp": now + 60, "iss": "https://id.example", "aud": "billing"}),
        ] {
            assert_eq!(
                strict.user_from_token(&hs256(claims.clone())),
                None,
                "{claims}"
            );
        }
    }

    #[test]
    fn static_users_plain_and_argon2() {
        use argon2::password_hash::{PasswordHasher, SaltString};
        let salt = SaltString::encode_b64(b"0123456789abcdef").unwrap();
        let phc = Argon2::default()
            .hash_password(b"s3cret", &salt)
            .unwrap()
            .to_string();
        let a = auth(
            vec![
                User {
                    name: "alice".into(),
                    password: "pw".into(),
                },
                User {
                    name: "bob".into(),
                    password: phc,
                },
            ],
            None,
            false,
        );
        assert_eq!(
            a.authenticate(Some("alice"), Some(b"pw")),
            Ok(Identity::User("alice".into()))
        );
        assert_eq!(
            a.authenticate(Some("alice"), Some(b"px")),
            Err(Refusal::BadCredentials)
        );
        assert_eq!(
            a.authenticate(Some("bob"), Some(b"s3cret")),
            Ok(Identity::User("bob".into()))
        );
        assert_eq!(
            a.authenticate(Some("bob"), Some(b"nope")),
            Err(Refusal::BadCredentials)
        );
        assert_eq!(a.authenticate(None, None), Err(Refusal::NotAuthorized));
        assert_eq!(
            a.authenticate(Some("mallory"), Some(b"pw")),
            Err(Refusal::BadCredentials)
        );
    }

    #[test]
    fn jwt_sub_must_be_the_username_and_exp_is_checked() {
        use jsonwebtoken::{encode, EncodingKey, Header};
        let a = auth(vec![], Some("k"), true);
        let now = jsonwebtoken::get_current_timestamp();
        let token = |sub: &str, exp: u64| {
            encode(
                &Header::new(Algorithm::HS256),
                &serde_json::json!({"sub": sub, "exp": exp}),
                &EncodingKey::from_secret(b"k"),
            )
            .unwrap()
        };
        let good = token("alice", now + 60);
        assert_eq!(
            a.authenticate(Some("alice"), Some(good.as_bytes())),
            Ok(Identity::User("alice".into()))
        );
        assert_eq!(
            a.authenticate(Some("bob"), Some(good.as_bytes())),
            Err(Refusal::BadCredentials)
        );
        let expired = token("alice", now - 10);
        assert_eq!(
            a.authenticate(Some("alice"), Some(expired.as_bytes())),
            Err(Refusal::BadCredentials)
        );
        assert_eq!(a.authenticate(None, None), Ok(Identity::Anonymous));
    }

    #[test]
    fn bearer_tokens_name_their_user_or_the_admin() {
        use jsonwebtoken::{encode, EncodingKey, Header};
        let a = auth(vec![], Some("k"), false);
        let now = jsonwebtoken::get_current_timestamp();
        let token = |claims: serde_json::Value, key: &[u8]| {
            encode(
                &Header::new(Algorithm::HS256),
                &claims,
                &EncodingKey::from_secret(key),
            )
            .unwrap()
        };
        let alice = token(serde_json::json!({"sub": "alice", "exp": now + 60}), b"k");
        assert_eq!(a.user_from_token(&alice).as_deref(), Some("alice"));
        let expired = token(serde_json::json!({"sub": "alice", "exp": now - 10}), b"k");
        assert_eq!(a.user_from_token(&expired), None);
        let forged = token(
            serde_json::json!({"sub": "alice", "exp": now + 60}),
            b"other",
        );
        assert_eq!(a.user_from_token(&forged), None);
        let no_exp = token(serde_json::json!({"sub": "alice"}), b"k");
        assert_eq!(a.user_from_token(&no_exp), None);
        let bad_sub = token(serde_json::json!({"sub": "al ice", "exp": now + 60}), b"k");
        assert_eq!(a.user_from_token(&bad_sub), None, "not a user id");
        assert_eq!(a.user_from_token("garbage"), None);

        assert!(!a.is_admin_token("admin"), "no admin token configured");
        let a = Authenticator::new(&Auth {
            jwt_secret: Some("k".into()),
            admin_token: Some("admin".into()),
            ..Auth::default()
        })
        .unwrap();
        assert!(a.is_admin_token("admin"));
        assert!(!a.is_admin_token("admin2"));
        assert!(!a.is_admin_token(""));
        assert!(!a.is_admin_token(&alice));
    }
}
