//! The shape of chatmq's configuration: every section and key, its type, its
//! default, and the key table ([`KEYS`]) that the loader checks files and the
//! environment against before anything is deserialised.
//!
//! A new key needs a field here *and* a row in [`KEYS`]; the loader's
//! `every_key_reaches_its_field` test fails when one is missing. This module
//! never touches the filesystem or the environment.

use std::fmt;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// Everything the broker reads at start-up, one field per `[section]`.
///
/// Obtained from [`Settings::load`] (a file plus environment overrides) or
/// [`Settings::from_toml`]; both check and validate, so a `Settings` from them
/// is one the broker can run with. `Settings::default()` is what an empty file
/// gives.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct Settings {
    pub node: Node,
    pub mqtt: Mqtt,
    pub auth: Auth,
    pub acl: Acl,
    pub storage: Storage,
    pub http: Http,
    pub chat: Chat,
    pub websocket: Websocket,
    pub push: Push,
    pub attachments: Attachments,
    pub bridge: Bridge,
    pub log: Log,
    pub drain: Drain,
    /// `[cluster]`: several chatmq nodes sharing NATS JetStream; absent: one
    /// node on its own RocksDB, with no NATS at all.
    pub cluster: Option<Cluster>,
}

/// `[log]`: how the broker writes its log (stderr). Read at start-up.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct Log {
    pub format: LogFormat,
}

/// One line per event: for people (`text`) or for log collectors (`json`:
/// one JSON object a line, with the span fields such as `request_id`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

/// The spelling of each [`LogFormat`] in TOML.
pub(crate) const LOG_FORMAT_NAMES: &[&str] = &["text", "json"];

/// `[drain]`: how `chatmq drain` (`POST /v1/admin/drain`) moves this
/// node's clients away before it exits (scale-in, maintenance).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct Drain {
    /// What MQTT 5 clients are told to use instead (the Server Reference
    /// of their DISCONNECT 0x9C, e.g. the load balancer's `host:port`);
    /// none: they are told only to use another server.
    pub server_reference: Option<String>,
    /// The clients leave over this many seconds, each at a random moment
    /// in it, so the nodes that take them are not hit by all at once.
    pub spread_secs: u64,
    /// The node exits at most this long after the spread, even if some
    /// connections have not closed yet.
    pub timeout_secs: u64,
}

impl Default for Drain {
    fn default() -> Self {
        Drain {
            server_reference: None,
            spread_secs: 10,
            timeout_secs: 30,
        }
    }
}

/// `[node]`: where this broker keeps its state.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct Node {
    /// RocksDB directory; relative paths are relative to the working
    /// directory. Created at load time if missing, and must be writable.
    pub data_dir: PathBuf,
}

impl Default for Node {
    fn default() -> Self {
        Node {
            data_dir: PathBuf::from("data"),
        }
    }
}

/// The largest MQTT "remaining length" (four variable-byte digits), hence the
/// largest payload any client could send at all.
pub(crate) const MAX_PAYLOAD_LIMIT: usize = 268_435_455;

/// `[mqtt]`: the MQTT listener and the limits it enforces per client.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct Mqtt {
    /// TCP address of the MQTT listener (`ip:port`; port 0 picks a free one).
    pub listen: SocketAddr,
    /// Largest PUBLISH payload in bytes; larger publishes are refused.
    pub max_payload: usize,
    /// Messages kept for an offline persistent session on plain MQTT topics;
    /// chat topics are stored per conversation instead and are not counted.
    pub max_offline_messages: usize,
    /// Concurrent client connections; further ones are refused.
    pub max_connections: usize,
    /// Subscriptions one session may hold.
    pub max_subscriptions: usize,
    /// Our Receive Maximum, and the cap on unacknowledged outgoing QoS 1/2
    /// messages per client.
    pub max_inflight: u16,
    /// Longest keep-alive in seconds; a client asking more (or 0, "never")
    /// gets this back as MQTT 5 Server Keep Alive.
    pub keepalive_max: u16,
    /// Seconds allowed between TCP accept and CONNECT, so idle sockets cannot
    /// pile up.
    pub connect_timeout_secs: u64,
    /// Cap on session expiry in seconds; also the expiry given to MQTT 3.1.1
    /// `clean_session = 0` sessions, which have no expiry of their own.
    pub session_expiry_max: u32,
    /// Topic Alias Maximum we accept from clients (0: no aliases).
    pub topic_alias_max: u16,
    /// `[mqtt.tls]`: MQTT over TLS on its own listener; absent: no TLS.
    pub tls: Option<Tls>,
    // abuse limits: identity
    /// Persistent sessions one user may hold (connected or waiting); a
    /// CONNECT that would create one more is refused (MQTT 5 0x97 Quota
    /// exceeded, 3.1.1 rc 3). Sessions that end with their connection are
    /// not counted.
    pub max_sessions_per_user: usize,
    /// How long a user's claim on a client id outlives its last session, in
    /// seconds; then the id is free for anyone. A claim is never dropped
    /// while a session of that id exists.
    pub client_owner_ttl_secs: u64,
    /// Sessions anonymous clients may hold together (connected or
    /// stored); beyond it a new persistent anonymous session is refused
    /// like one over a user's quota (0x97 / 3.1.1 rc 3).
    pub max_anonymous_sessions: usize,
    // abuse limits: edges
    /// Concurrent connections from one address (an IPv6 /64 counts as one),
    /// over every MQTT listener; 0: no limit. Over it, a new connection is
    /// closed as soon as it is accepted.
    pub max_connections_per_ip: usize,
    /// New connections per second one address may open, over every MQTT
    /// listener, once its burst is spent; 0: no limit.
    pub accept_rate_per_ip: u32,
    /// New connections one address may open at once after a quiet spell.
    pub accept_burst_per_ip: u32,
    /// Largest CONNECT packet in bytes (client id, credentials, will with
    /// its payload, properties). It is read before the client is
    /// authenticated, so it is kept far below `max_payload`; a larger one
    /// closes the connection. Also the largest WebSocket message before
    /// CONNECT.
    pub max_connect_packet: usize,
    /// Seconds a TCP connection may be silent before the OS probes the peer
    /// (then every 10 s, 3 probes), so a client that vanished without
    /// closing is found even with MQTT keepalive 0; 0: no TCP keepalive.
    pub tcp_keepalive_secs: u64,
    // topics and retained messages (trie)
    /// Levels a topic name or filter may have (PUBLISH, SUBSCRIBE,
    /// UNSUBSCRIBE, will); more is refused (SUBACK 0x8F, PUBACK 0x90).
    pub max_topic_levels: usize,
    /// Bytes a topic name or filter may have; longer is refused like too
    /// many levels.
    pub max_topic_length: usize,
    /// Retained messages the broker keeps; a retained publish on a new topic
    /// beyond it is not retained (MQTT 5 QoS 1/2: refused with 0x97).
    pub max_retained_messages: usize,
    /// Bytes (topic plus payload) of all retained messages together; a
    /// retained publish that would pass it is treated like one over
    /// `max_retained_messages`.
    pub max_retained_bytes: usize,
    /// Retained messages one new subscription is sent; the rest are counted
    /// as dropped and logged.
    pub max_retained_per_subscription: usize,
    // flow control: slow clients, byte budget, publish rates
    /// Seconds a write to a client may take; a client that stops reading
    /// is closed after this.
    pub write_timeout_secs: u64,
    /// Bytes of messages one session may hold in memory (queued and in
    /// flight). Chat beyond it is replayed from the log later; other
    /// messages beyond it drop the oldest, and a connected client is
    /// disconnected as overloaded (MQTT 5: 0x97).
    pub session_queue_bytes: usize,
    /// Publishes per second one connection may send (refill rate).
    pub publish_rate: u64,
    /// Publishes one connection may send at once after a pause.
    pub publish_burst: u64,
    /// Payload bytes per second one connection may publish.
    pub publish_bytes_rate: u64,
    /// Payload bytes one connection may publish at once; at least
    /// `max_payload`, so that one largest message always passes.
    pub publish_bytes_burst: u64,
    /// Publishes per second one user may send over all its connections.
    pub user_publish_rate: u64,
    /// Publishes one user may send at once after a pause.
    pub user_publish_burst: u64,
    /// Payload bytes per second one user may publish.
    pub user_publish_bytes_rate: u64,
    /// Payload bytes one user may publish at once; at least `max_payload`.
    pub user_publish_bytes_burst: u64,
}

impl Default for Mqtt {
    fn default() -> Self {
        Mqtt {
            listen: SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 1883)),
            max_payload: 262_144,
            max_offline_messages: 1000,
            max_connections: 100_000,
            max_subscriptions: 1000,
            max_inflight: 100,
            keepalive_max: 600,
            connect_timeout_secs: 10,
            session_expiry_max: 604_800,
            topic_alias_max: 16,
            tls: None,
            max_sessions_per_user: 100,
            client_owner_ttl_secs: 30 * 24 * 3600,
            max_anonymous_sessions: 100_000,
            max_connections_per_ip: 1000,
            accept_rate_per_ip: 100,
            accept_burst_per_ip: 500,
            max_connect_packet: 65_536,
            tcp_keepalive_secs: 60,
            // Real topics are a few levels and well under 256 bytes (AWS IoT
            // caps them at 8 levels and 256 bytes); these leave ample room
            // and still bound what one name costs the trie and each match.
            max_topic_levels: 128,
            max_topic_length: 4096,
            max_retained_messages: 1_000_000,
            max_retained_bytes: 1 << 30,
            max_retained_per_subscription: 100_000,
            write_timeout_secs: 30,
            session_queue_bytes: 16 * 1024 * 1024,
            publish_rate: 1000,
            publish_burst: 2000,
            publish_bytes_rate: 16 * 1024 * 1024,
            publish_bytes_burst: 32 * 1024 * 1024,
            user_publish_rate: 2000,
            user_publish_burst: 4000,
            user_publish_bytes_rate: 32 * 1024 * 1024,
            user_publish_bytes_burst: 64 * 1024 * 1024,
        }
    }
}

/// `[auth]`: who may connect. A CONNECT password is checked as a JWT (against
/// `jwt_secret` or `jwt_public_key`) or against `users`.
///
/// `Debug` prints secrets as `<redacted>` so logging the settings is safe.
#[derive(Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct Auth {
    /// Accept CONNECT without credentials. Off by default: a chat server
    /// needs to know who is speaking.
    pub allow_anonymous: bool,
    /// HS256 secret for user JWTs.
    pub jwt_secret: Option<String>,
    /// PEM public key (RS256 or ES256) for user JWTs; checked readable at load.
    pub jwt_public_key: Option<PathBuf>,
    /// Bearer token that grants admin access to the HTTP API.
    pub admin_token: Option<String>,
    /// Static users, from `[[auth.users]]`.
    pub users: Vec<User>,
    // abuse limits: identity
    /// Required `iss` of user JWTs; unset: not checked.
    pub jwt_issuer: Option<String>,
    /// Required `aud` of user JWTs; unset: a token that carries an `aud` is
    /// refused (it was meant for another service).
    pub jwt_audience: Option<String>,
    /// `[auth.limits]`: failed-login rate limits and the password-check pool.
    pub limits: LoginLimits,
}

/// `[auth.limits]`: what failed logins and password hashing may cost.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct LoginLimits {
    /// Failed logins from one IP address within `failed_login_window_secs`
    /// after which its CONNECTs are refused without checking credentials
    /// until the window ends (0: no limit).
    pub failed_logins_per_ip: u32,
    /// The same, per user name (0: no limit).
    pub failed_logins_per_user: u32,
    /// The window the two counts above are kept for, in seconds.
    pub failed_login_window_secs: u64,
    /// argon2 password checks running at once (each takes about 19 MiB).
    pub password_checks: usize,
    /// CONNECTs that may wait for a password check; beyond them a CONNECT is
    /// refused as Server busy (MQTT 5 0x89, 3.1.1 rc 3).
    pub password_check_queue: usize,
}

impl Default for LoginLimits {
    fn default() -> Self {
        LoginLimits {
            failed_logins_per_ip: 100,
            failed_logins_per_user: 20,
            failed_login_window_secs: 60,
            password_checks: 2,
            password_check_queue: 64,
        }
    }
}

/// How secrets appear in `Debug` output.
const REDACTED: &str = "<redacted>";

impl fmt::Debug for Auth {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Auth")
            .field("allow_anonymous", &self.allow_anonymous)
            .field("jwt_secret", &self.jwt_secret.as_ref().map(|_| REDACTED))
            .field("jwt_public_key", &self.jwt_public_key)
            .field("admin_token", &self.admin_token.as_ref().map(|_| REDACTED))
            .field("users", &self.users)
            .field("jwt_issuer", &self.jwt_issuer)
            .field("jwt_audience", &self.jwt_audience)
            .field("limits", &self.limits)
            .finish()
    }
}

/// One `[[auth.users]]` entry: a user who logs in with a static password.
#[derive(Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct User {
    /// The user id (`[A-Za-z0-9_-]{1,64}`), unique among `[[auth.users]]`.
    pub name: String,
    /// Plaintext, or an argon2 PHC string (`$argon2id$...`) so the file need
    /// not hold the password itself.
    pub password: String,
}

impl fmt::Debug for User {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("User")
            .field("name", &self.name)
            .field("password", &REDACTED)
            .finish()
    }
}

/// `[acl]`: access to plain MQTT topics (anything outside chat's own
/// topics). With no matching rule, access is denied.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct Acl {
    /// From `[[acl.rules]]`, in file order.
    pub rules: Vec<AclRule>,
}

/// One `[[acl.rules]]` entry.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct AclRule {
    /// `*` for every user, or one user id.
    pub user: String,
    /// An MQTT topic filter; `%u` stands for the user id and `%c` for the
    /// client id, so one rule can give each user a private subtree.
    pub topic: String,
    pub access: Access,
}

/// What an ACL rule allows. When several rules match, `Deny` wins.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Access {
    /// Publish only.
    Pub,
    /// Subscribe only.
    Sub,
    /// Publish and subscribe.
    PubSub,
    /// Neither, overriding any other matching rule.
    Deny,
}

/// The spelling of each [`Access`] in TOML, for the key table and errors.
pub(crate) const ACCESS_NAMES: &[&str] = &["pub", "sub", "pubsub", "deny"];

/// `[storage]`: durability of writes to RocksDB.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct Storage {
    pub sync: SyncMode,
    /// With `sync = "interval"`: milliseconds between syncs.
    pub sync_interval_ms: u64,
}

impl Default for Storage {
    fn default() -> Self {
        Storage {
            sync: SyncMode::Always,
            sync_interval_ms: 100,
        }
    }
}

/// When the storage writer syncs the write-ahead log to disk.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum SyncMode {
    /// Every group commit is synced before it is acknowledged: an
    /// acknowledged message survives a power cut.
    #[default]
    Always,
    /// Synced every `sync_interval_ms`: a power cut may lose that much.
    Interval,
    /// Left to the OS: fastest, and only a process crash is survived.
    Never,
}

/// The spelling of each [`SyncMode`] in TOML, for the key table and errors.
pub(crate) const SYNC_NAMES: &[&str] = &["always", "interval", "never"];

/// `[http]`: the HTTP API (conversations, messages, health, metrics).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct Http {
    /// TCP address of the HTTP listener (`ip:port`; port 0 picks a free one).
    /// Loopback by default: put a TLS proxy in front to expose it.
    pub listen: SocketAddr,
    /// A directory served at `/` (the web demo's build, say); absent: none.
    /// The API's own routes take precedence.
    pub static_dir: Option<PathBuf>,
    // abuse limits: edges
    /// Seconds a client has to send a request's head (request line and
    /// headers); also how long an idle keep-alive connection stays open.
    pub header_timeout_secs: u64,
    /// Seconds from a request's head to its answer, reading the body
    /// included; over it the answer is 408.
    pub request_timeout_secs: u64,
    /// Concurrent HTTP connections; further ones wait in the listen backlog
    /// until one closes.
    pub max_connections: usize,
    /// `GET /v1/stream`: seconds between heartbeat comment lines.
    pub stream_heartbeat_secs: u64,
    /// Open event streams per user; more are refused (429).
    pub stream_max_per_user: usize,
    /// Open event streams in all; more are refused (503).
    pub stream_max_total: usize,
    /// Events waiting for one stream's reader; beyond, it is cut off.
    pub stream_buffer: usize,
}

impl Default for Http {
    fn default() -> Self {
        Http {
            listen: SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::LOCALHOST, 8080)),
            static_dir: None,
            header_timeout_secs: 10,
            request_timeout_secs: 30,
            max_connections: 1024,
            stream_heartbeat_secs: 15,
            stream_max_per_user: 4,
            stream_max_total: 512,
            stream_buffer: 256,
        }
    }
}

/// A TLS listener (`[mqtt.tls]`, `[websocket.tls]`): a certificate chain and
/// its private key, both PEM files, checked readable at load and checked to
/// match at start-up.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct Tls {
    /// TCP address of the TLS listener; absent: port 8883 for MQTT, 8084
    /// for WebSocket, on all interfaces.
    pub listen: Option<SocketAddr>,
    /// PEM certificate chain, leaf first. Required.
    pub cert: PathBuf,
    /// PEM private key (PKCS#8, PKCS#1 or SEC1). Required.
    pub key: PathBuf,
    /// Seconds allowed for the TLS handshake.
    pub handshake_timeout_secs: u64,
}

impl Default for Tls {
    fn default() -> Self {
        Tls {
            listen: None,
            cert: PathBuf::new(),
            key: PathBuf::new(),
            handshake_timeout_secs: 10,
        }
    }
}

/// The default MQTT-over-TLS address: all interfaces, port 8883.
pub const MQTT_TLS_LISTEN: SocketAddr =
    SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 8883));
/// The default secure WebSocket address: all interfaces, port 8084.
pub const WEBSOCKET_TLS_LISTEN: SocketAddr =
    SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 8084));

/// `[websocket]`: MQTT over WebSocket, for browsers. The connections it
/// accepts are served exactly like TCP ones: same auth, same sessions.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct Websocket {
    /// Serve MQTT over WebSocket at all.
    pub enabled: bool,
    /// TCP address of the `ws://` listener (`ip:port`; port 0 picks one).
    pub listen: SocketAddr,
    /// The HTTP path of the upgrade; `/` is accepted too, where MQTT.js goes
    /// when a URL has no path.
    pub path: String,
    /// Seconds allowed from TCP accept to a completed WebSocket upgrade.
    pub handshake_timeout_secs: u64,
    /// Largest single WebSocket frame accepted, in bytes; never more than
    /// the largest MQTT packet (`mqtt.max_payload` + 65 KiB).
    pub max_frame_size: usize,
    /// Largest WebSocket message (frames reassembled), in bytes; never more
    /// than the largest MQTT packet, and before CONNECT never more than
    /// `mqtt.max_connect_packet`.
    pub max_message_size: usize,
    /// Allowed `Origin` headers (`https://chat.example.com`); empty: any.
    pub allowed_origins: Vec<String>,
    /// Concurrent WebSocket connections from one IP address; 0: no limit.
    pub max_connections_per_ip: usize,
    /// `[websocket.tls]`: `wss://` on its own listener; absent: none.
    pub tls: Option<Tls>,
}

impl Default for Websocket {
    fn default() -> Self {
        Websocket {
            enabled: true,
            listen: SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 8083)),
            path: "/mqtt".to_string(),
            handshake_timeout_secs: 10,
            max_frame_size: 1 << 20,
            max_message_size: 16 << 20,
            allowed_origins: Vec::new(),
            max_connections_per_ip: 0,
            tls: None,
        }
    }
}

/// `[push]`: notifications to members with no live session. Each provider
/// is optional; with none configured, no jobs are queued.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct Push {
    /// One notification per user and conversation per this many milliseconds.
    pub debounce_ms: u64,
    /// Requests in flight at once, over all providers.
    pub concurrency: usize,
    /// Attempts per notification before it is given up (429 and 5xx retry).
    pub retry_max_attempts: u32,
    /// First retry delay in milliseconds; doubled per attempt, with jitter.
    pub retry_base_ms: u64,
    /// Longest delay between two attempts, in milliseconds (a longer
    /// Retry-After is capped to it).
    pub retry_max_ms: u64,
    /// The longest message preview put in a notification, in characters.
    pub preview_max_chars: usize,
    pub webhook: Option<Webhook>,
    pub apns: Option<Apns>,
    pub fcm: Option<Fcm>,
}

impl Default for Push {
    fn default() -> Self {
        Push {
            debounce_ms: 2000,
            concurrency: 16,
            retry_max_attempts: 5,
            retry_base_ms: 1000,
            retry_max_ms: 60_000,
            preview_max_chars: 120,
            webhook: None,
            apns: None,
            fcm: None,
        }
    }
}

/// `[push.webhook]`: POST a JSON notification to the operator's service.
///
/// `Debug` prints the secret as `<redacted>`.
#[derive(Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct Webhook {
    /// `http://` or `https://` URL. Required.
    pub url: String,
    /// When set, each request carries `X-Chatmq-Signature: sha256=<hex>`,
    /// the HMAC-SHA256 of the body under this secret.
    pub secret: Option<String>,
}

impl fmt::Debug for Webhook {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Webhook")
            .field("url", &self.url)
            .field("secret", &self.secret.as_ref().map(|_| REDACTED))
            .finish()
    }
}

/// `[push.apns]`: Apple Push Notification service, token auth (.p8 key).
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct Apns {
    /// The .p8 signing key from Apple's developer portal. Required.
    pub key_file: PathBuf,
    /// Its key id. Required.
    pub key_id: String,
    /// The developer team id. Required.
    pub team_id: String,
    /// The app's bundle id (`apns-topic`). Required.
    pub topic: String,
    /// Use Apple's sandbox (development) endpoint.
    pub sandbox: bool,
    /// Where APNs lives (`https://` only), overriding `sandbox`: a proxy,
    /// or a local server in tests. Default: Apple's production or sandbox
    /// host.
    pub endpoint: Option<String>,
    /// A PEM file of CA certificates trusted for the endpoint besides the
    /// usual public roots (a TLS-inspecting proxy, a test server).
    pub ca_file: Option<PathBuf>,
}

/// `[push.fcm]`: Firebase Cloud Messaging, HTTP v1 API, with a service
/// account's OAuth2 flow.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct Fcm {
    /// The service account JSON downloaded from the Firebase console
    /// (`project_id`, `client_email`, `private_key`, `token_uri`). Required.
    pub service_account_file: PathBuf,
    /// Overrides the file's `project_id`.
    pub project_id: Option<String>,
    /// Where the v1 API lives; tests point it at a local server.
    pub base_url: String,
    /// Overrides the file's `token_uri` (the OAuth2 token endpoint).
    pub token_uri: Option<String>,
}

impl Default for Fcm {
    fn default() -> Self {
        Fcm {
            service_account_file: PathBuf::new(),
            project_id: None,
            base_url: "https://fcm.googleapis.com".to_string(),
            token_uri: None,
        }
    }
}

/// `[chat]`: limits of the chat layer: history pages and retention.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct Chat {
    /// The most messages one history call (RPC or HTTP) returns.
    pub history_limit: usize,
    /// Messages kept per conversation, the newest ones; 0 keeps all.
    pub retention_max_messages: u64,
    /// Messages older than this many seconds are dropped; 0 keeps them forever.
    pub retention_max_age_secs: u64,
    // flow control: typing, conversation cache, idempotency keys
    /// Typing indicators forwarded per user and conversation: at most one
    /// per this many milliseconds; the others are dropped and counted.
    pub typing_interval_ms: u64,
    /// Largest typing indicator payload in bytes; larger ones are refused.
    pub typing_max_bytes: usize,
    /// Conversations whose state is kept in memory; idle ones beyond it
    /// are evicted (and read from disk again when used).
    pub conv_cache_max: usize,
    /// Seconds after which an unused conversation's state leaves memory.
    pub conv_idle_secs: u64,
    /// Seconds an idempotency key (conv, sender, envelope id) is kept; a
    /// retry after that is a new message with a new seq.
    pub dedup_ttl_secs: u64,
    // large groups: receipts and membership changes
    /// Groups with more members than this get read receipts and membership
    /// changes coalesced: one `reads` / `members` event per conversation
    /// and window instead of one event per receipt or change to every member.
    pub large_group_members: usize,
    /// The window, in milliseconds, over which a large group's receipts and
    /// membership changes are gathered into one event.
    pub announce_window_ms: u64,
    // reactions and occupancy (issue #13)
    /// Reaction summaries of a conversation's messages go out at most once
    /// per this many milliseconds (one `reactions` event per window).
    pub reaction_window_ms: u64,
    /// Room reactions forwarded per user and conversation: at most one per
    /// this many milliseconds; the others are dropped and counted.
    pub room_reaction_interval_ms: u64,
    /// Occupancy updates on `occupancy/{conv}`: at most one per this many
    /// milliseconds per conversation.
    pub occupancy_window_ms: u64,
}

impl Default for Chat {
    fn default() -> Self {
        Chat {
            history_limit: 200,
            retention_max_messages: 0,
            retention_max_age_secs: 0,
            typing_interval_ms: 500,
            typing_max_bytes: 256,
            conv_cache_max: 10_000,
            conv_idle_secs: 600,
            dedup_ttl_secs: 7 * 24 * 3600,
            large_group_members: 100,
            announce_window_ms: 1000,
            reaction_window_ms: 250,
            room_reaction_interval_ms: 200,
            occupancy_window_ms: 1000,
        }
    }
}

/// `[attachments]`: files members upload to a conversation (issue #13
/// item 5): where they are kept, how large and of which types they may be,
/// and when unreferenced ones are removed.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct Attachments {
    /// Whether the upload and download routes are served at all.
    pub enabled: bool,
    /// Where the files are kept, named by their SHA-256; absent:
    /// `attachments` inside `node.data_dir`. Created at start-up.
    pub dir: Option<PathBuf>,
    /// The largest file in bytes; an upload past it is refused (413).
    pub max_bytes: u64,
    /// The content types an upload may declare (`image/png`, ...); others
    /// are refused (415). Image types are also checked by their first bytes.
    pub content_types: Vec<String>,
    /// Seconds between two runs of the collector, which removes files no
    /// message references any more.
    pub gc_interval_secs: u64,
    /// Seconds an upload is kept without a message referencing it (for the
    /// sender to send that message).
    pub orphan_grace_secs: u64,
    /// Seconds a signed download link (`?token=`) stays valid.
    pub token_ttl_secs: u64,
    /// Uploads one user may have in progress at once.
    pub max_uploads_per_user: usize,
    /// Uploads in progress at once, all users together.
    pub max_uploads: usize,
}

impl Default for Attachments {
    fn default() -> Self {
        Attachments {
            enabled: true,
            dir: None,
            max_bytes: 10 * 1024 * 1024,
            content_types: ["image/png", "image/jpeg", "image/gif", "image/webp"]
                .map(String::from)
                .to_vec(),
            gc_interval_secs: 300,
            orphan_grace_secs: 24 * 3600,
            token_ttl_secs: 300,
            max_uploads_per_user: 4,
            max_uploads: 64,
        }
    }
}

/// `[cluster]`: this node is one of several sharing a NATS JetStream
/// cluster as the order of record (DESIGN §6, `docs/CLUSTER.md`). Every
/// node of a cluster has the same section but for `node_id`.
///
/// `Debug` prints `password` and `token` as `<redacted>`.
#[derive(Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct Cluster {
    /// This node's name among the cluster's nodes (`[A-Za-z0-9_-]{1,64}`),
    /// unique and stable across restarts: partition leases are held in it.
    /// Required.
    pub node_id: String,
    /// Every NATS server of the JetStream cluster (`nats://host:port`, or
    /// `tls://host:port` to require TLS), so that the node still reaches
    /// one when another is down. Required; file only.
    pub nats_urls: Vec<String>,
    /// Partition streams the conversations are spread over. Fixed when the
    /// cluster is created (recorded in NATS): a conversation's partition is
    /// `hash(conv) mod partitions`, so another count would put it elsewhere.
    pub partitions: u32,
    /// Milliseconds a partition owner's lease lives without renewal: how
    /// long writes to a dead node's partitions pause before another node
    /// takes them. The TTL of the leases bucket, the same for every node.
    pub lease_ttl_ms: u64,
    /// Copies NATS keeps of every stream and bucket (1 to 5; 3 rides out the
    /// loss of one NATS server).
    pub replicas: u32,
    /// The first part of every stream, bucket and subject chatmq uses, so
    /// that several chatmq clusters can share one NATS.
    pub name_prefix: String,
    /// Seconds `chatmq serve` keeps trying to reach NATS and set up its
    /// streams before it gives up and exits.
    pub startup_timeout_secs: u64,
    /// NATS user name; with `password`.
    pub user: Option<String>,
    /// NATS password; with `user`.
    pub password: Option<String>,
    /// NATS authentication token; instead of `user`/`password`.
    pub token: Option<String>,
    /// A NATS `.creds` file (user JWT and NKey seed); instead of the others.
    pub creds_file: Option<PathBuf>,
    /// `[cluster.tls]`: TLS to NATS with these files; absent: TLS only for
    /// `tls://` URLs or when the server asks, with the system's roots.
    pub tls: Option<ClusterTls>,
}

impl Default for Cluster {
    fn default() -> Self {
        Cluster {
            node_id: String::new(),
            nats_urls: Vec::new(),
            partitions: 16,
            lease_ttl_ms: 5000,
            replicas: 3,
            name_prefix: "chatmq".to_string(),
            startup_timeout_secs: 60,
            user: None,
            password: None,
            token: None,
            creds_file: None,
            tls: None,
        }
    }
}

impl fmt::Debug for Cluster {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Cluster")
            .field("node_id", &self.node_id)
            .field("nats_urls", &self.nats_urls)
            .field("partitions", &self.partitions)
            .field("lease_ttl_ms", &self.lease_ttl_ms)
            .field("replicas", &self.replicas)
            .field("name_prefix", &self.name_prefix)
            .field("startup_timeout_secs", &self.startup_timeout_secs)
            .field("user", &self.user)
            .field("password", &self.password.as_ref().map(|_| REDACTED))
            .field("token", &self.token.as_ref().map(|_| REDACTED))
            .field("creds_file", &self.creds_file)
            .field("tls", &self.tls)
            .finish()
    }
}

/// `[cluster.tls]`: TLS to the NATS servers. Its presence requires TLS.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct ClusterTls {
    /// PEM CA certificates the NATS servers' certificates are checked
    /// against, besides the system's roots.
    pub ca_file: Option<PathBuf>,
    /// PEM client certificate, for servers that verify clients; with `key`.
    pub cert: Option<PathBuf>,
    /// Its PEM private key; with `cert`.
    pub key: Option<PathBuf>,
}

/// `[bridge]`: MQTT bridges to other brokers.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct Bridge {
    /// From `[[bridge.remotes]]`, one connection each.
    pub remotes: Vec<Remote>,
}

/// One `[[bridge.remotes]]` entry: a remote MQTT broker this one keeps a
/// connection to, and the topics that cross it.
///
/// `Debug` prints the password as `<redacted>`.
#[derive(Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct Remote {
    /// Unique among the remotes (`[A-Za-z0-9_-]{1,64}`): the metrics label
    /// and the local session's client id (`bridge-{name}`). Required.
    pub name: String,
    /// `host:port` of the remote broker. Required.
    pub address: String,
    /// TLS to the remote; `ca_file` is then the trust anchor (PEM).
    pub tls: bool,
    pub ca_file: Option<PathBuf>,
    pub username: Option<String>,
    pub password: Option<String>,
    /// The client id on the remote; default `chatmq-bridge-{name}`.
    pub client_id: Option<String>,
    /// `false` (default): a persistent session on the remote, so what it
    /// queued while the link was down (QoS 1) arrives after a reconnect.
    pub clean_session: bool,
    /// How long the remote keeps the session of a link that is down.
    pub session_expiry_secs: u32,
    pub keepalive_secs: u16,
    /// Reconnect delay: starts here, doubles per failure up to the max.
    pub reconnect_min_ms: u64,
    pub reconnect_max_ms: u64,
    /// The local user the bridge's session acts as (the ACL and the chat
    /// layer see it); unset: anonymous.
    pub local_user: Option<String>,
    /// Messages waiting in each direction; beyond, QoS 0 is dropped (and
    /// counted), QoS 1 waits unacknowledged.
    pub queue: usize,
    /// From `[[bridge.remotes.topics]]`.
    pub topics: Vec<BridgeTopic>,
}

impl Default for Remote {
    fn default() -> Self {
        Remote {
            name: String::new(),
            address: String::new(),
            tls: false,
            ca_file: None,
            username: None,
            password: None,
            client_id: None,
            clean_session: false,
            session_expiry_secs: 7 * 24 * 3600,
            keepalive_secs: 60,
            reconnect_min_ms: 500,
            reconnect_max_ms: 30_000,
            local_user: None,
            queue: 1000,
            topics: Vec::new(),
        }
    }
}

impl fmt::Debug for Remote {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Remote")
            .field("name", &self.name)
            .field("address", &self.address)
            .field("tls", &self.tls)
            .field("ca_file", &self.ca_file)
            .field("username", &self.username)
            .field("password", &self.password.as_ref().map(|_| REDACTED))
            .field("client_id", &self.client_id)
            .field("clean_session", &self.clean_session)
            .field("session_expiry_secs", &self.session_expiry_secs)
            .field("keepalive_secs", &self.keepalive_secs)
            .field("reconnect_min_ms", &self.reconnect_min_ms)
            .field("reconnect_max_ms", &self.reconnect_max_ms)
            .field("local_user", &self.local_user)
            .field("queue", &self.queue)
            .field("topics", &self.topics)
            .finish()
    }
}

/// Which way a bridged topic crosses.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Direction {
    /// Remote to local.
    In,
    /// Local to remote.
    Out,
    #[default]
    Both,
}

const DIRECTION_NAMES: &[&str] = &["in", "out", "both"];

impl Direction {
    pub fn inbound(self) -> bool {
        matches!(self, Direction::In | Direction::Both)
    }
    pub fn outbound(self) -> bool {
        matches!(self, Direction::Out | Direction::Both)
    }
}

/// One `[[bridge.remotes.topics]]` entry, as Mosquitto's `topic` line:
/// the local topic is `local_prefix + pattern`, the remote one
/// `remote_prefix + pattern`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct BridgeTopic {
    /// A topic filter (`+` and `#` allowed). Required.
    pub pattern: String,
    /// `in`, `out` or `both`. Required.
    pub direction: Direction,
    /// 0 or 1 (default): the QoS of both subscriptions and of what is
    /// forwarded.
    pub qos: u8,
    pub local_prefix: String,
    pub remote_prefix: String,
}

impl Default for BridgeTopic {
    fn default() -> Self {
        BridgeTopic {
            pattern: String::new(),
            direction: Direction::Both,
            qos: 1,
            local_prefix: String::new(),
            remote_prefix: String::new(),
        }
    }
}

/// One key of the configuration, as the loader checks it.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Key {
    pub name: &'static str,
    pub kind: Kind,
}

/// What a key's value must be. Checking this before deserialising lets every
/// wrong type or out-of-range value be reported with its full dotted key and
/// where it came from, and makes the serde conversion afterwards infallible.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Kind {
    /// A `[section]` of keys, each optional.
    Section(&'static [Key]),
    /// An array of tables (`[[auth.users]]`) whose keys are all required.
    Tables(&'static [Key]),
    /// An array of tables (`[[bridge.remotes]]`) where only the keys named
    /// in `required` must be present.
    Entries {
        keys: &'static [Key],
        required: &'static [&'static str],
    },
    /// An integer in `min..=max` (the bounds also keep it within its field's type).
    Integer {
        min: i64,
        max: i64,
    },
    Bool,
    /// A non-empty string: names, secrets, paths.
    Text,
    /// An array of non-empty strings (file only).
    TextList,
    /// An `ip:port` socket address.
    Address,
    /// One of a fixed set of words.
    OneOf(&'static [&'static str]),
}

const fn key(name: &'static str, kind: Kind) -> Key {
    Key { name, kind }
}

const fn integer(min: i64, max: i64) -> Kind {
    Kind::Integer { min, max }
}

const U16_MAX: i64 = u16::MAX as i64;
const U32_MAX: i64 = u32::MAX as i64;
/// `usize::MAX`, or `i64::MAX` where that is smaller (64-bit targets).
const USIZE_MAX: i64 = if (usize::MAX as u128) < (i64::MAX as u128) {
    usize::MAX as i64
} else {
    i64::MAX
};

/// Every key a file or the environment may set, mirroring [`Settings`].
pub(crate) const KEYS: &[Key] = &[
    key("node", Kind::Section(&[key("data_dir", Kind::Text)])),
    key(
        "mqtt",
        Kind::Section(&[
            key("listen", Kind::Address),
            key("max_payload", integer(1, MAX_PAYLOAD_LIMIT as i64)),
            key("max_offline_messages", integer(1, USIZE_MAX)),
            key("max_connections", integer(1, USIZE_MAX)),
            key("max_subscriptions", integer(1, USIZE_MAX)),
            key("max_inflight", integer(1, U16_MAX)),
            key("keepalive_max", integer(1, U16_MAX)),
            key("connect_timeout_secs", integer(1, i64::MAX)),
            key("session_expiry_max", integer(0, U32_MAX)),
            key("topic_alias_max", integer(0, U16_MAX)),
            key("tls", Kind::Section(TLS_KEYS)),
            key("max_sessions_per_user", integer(1, USIZE_MAX)),
            key("client_owner_ttl_secs", integer(1, U32_MAX)),
            key("max_anonymous_sessions", integer(0, USIZE_MAX)),
            // abuse limits: edges
            key("max_connections_per_ip", integer(0, USIZE_MAX)),
            key("accept_rate_per_ip", integer(0, U32_MAX)),
            key("accept_burst_per_ip", integer(1, U32_MAX)),
            key("max_connect_packet", integer(256, MAX_PAYLOAD_LIMIT as i64)),
            key("tcp_keepalive_secs", integer(0, U32_MAX)),
            key("max_topic_levels", integer(1, 65_536)),
            key("max_topic_length", integer(1, 65_535)),
            key("max_retained_messages", integer(0, USIZE_MAX)),
            key("max_retained_bytes", integer(0, USIZE_MAX)),
            key("max_retained_per_subscription", integer(0, USIZE_MAX)),
            // flow control
            key("write_timeout_secs", integer(1, i64::MAX)),
            key("session_queue_bytes", integer(1024, USIZE_MAX)),
            key("publish_rate", integer(1, i64::MAX)),
            key("publish_burst", integer(1, i64::MAX)),
            key("publish_bytes_rate", integer(1, i64::MAX)),
            key("publish_bytes_burst", integer(1, i64::MAX)),
            key("user_publish_rate", integer(1, i64::MAX)),
            key("user_publish_burst", integer(1, i64::MAX)),
            key("user_publish_bytes_rate", integer(1, i64::MAX)),
            key("user_publish_bytes_burst", integer(1, i64::MAX)),
        ]),
    ),
    key(
        "auth",
        Kind::Section(&[
            key("allow_anonymous", Kind::Bool),
            key("jwt_secret", Kind::Text),
            key("jwt_public_key", Kind::Text),
            key("admin_token", Kind::Text),
            key(
                "users",
                Kind::Tables(&[key("name", Kind::Text), key("password", Kind::Text)]),
            ),
            key("jwt_issuer", Kind::Text),
            key("jwt_audience", Kind::Text),
            key(
                "limits",
                Kind::Section(&[
                    key("failed_logins_per_ip", integer(0, U32_MAX)),
                    key("failed_logins_per_user", integer(0, U32_MAX)),
                    key("failed_login_window_secs", integer(1, U32_MAX)),
                    key("password_checks", integer(1, 1024)),
                    key("password_check_queue", integer(0, 1 << 20)),
                ]),
            ),
        ]),
    ),
    key(
        "acl",
        Kind::Section(&[key(
            "rules",
            Kind::Tables(&[
                key("user", Kind::Text),
                key("topic", Kind::Text),
                key("access", Kind::OneOf(ACCESS_NAMES)),
            ]),
        )]),
    ),
    key(
        "log",
        Kind::Section(&[key("format", Kind::OneOf(LOG_FORMAT_NAMES))]),
    ),
    key(
        "drain",
        Kind::Section(&[
            key("server_reference", Kind::Text),
            key("spread_secs", integer(0, 3600)),
            key("timeout_secs", integer(1, 3600)),
        ]),
    ),
    key(
        "storage",
        Kind::Section(&[
            key("sync", Kind::OneOf(SYNC_NAMES)),
            key("sync_interval_ms", integer(1, i64::MAX)),
        ]),
    ),
    key(
        "http",
        Kind::Section(&[
            key("listen", Kind::Address),
            key("static_dir", Kind::Text),
            // abuse limits: edges
            key("header_timeout_secs", integer(1, U32_MAX)),
            key("request_timeout_secs", integer(1, U32_MAX)),
            key("max_connections", integer(1, USIZE_MAX)),
            key("stream_heartbeat_secs", integer(1, U32_MAX)),
            key("stream_max_per_user", integer(1, USIZE_MAX)),
            key("stream_max_total", integer(1, USIZE_MAX)),
            key("stream_buffer", integer(1, USIZE_MAX)),
        ]),
    ),
    key(
        "chat",
        Kind::Section(&[
            key("history_limit", integer(1, USIZE_MAX)),
            key("retention_max_messages", integer(0, i64::MAX)),
            key("retention_max_age_secs", integer(0, i64::MAX)),
            // flow control
            key("typing_interval_ms", integer(0, i64::MAX)),
            key("typing_max_bytes", integer(1, USIZE_MAX)),
            key("conv_cache_max", integer(1, USIZE_MAX)),
            key("conv_idle_secs", integer(1, i64::MAX)),
            key("dedup_ttl_secs", integer(1, i64::MAX)),
            // large groups
            key("large_group_members", integer(0, USIZE_MAX)),
            key("announce_window_ms", integer(1, 3_600_000)),
            // reactions and occupancy
            key("reaction_window_ms", integer(1, 3_600_000)),
            key("room_reaction_interval_ms", integer(0, i64::MAX)),
            key("occupancy_window_ms", integer(1, 3_600_000)),
        ]),
    ),
    key(
        "websocket",
        Kind::Section(&[
            key("enabled", Kind::Bool),
            key("listen", Kind::Address),
            key("path", Kind::Text),
            key("handshake_timeout_secs", integer(1, i64::MAX)),
            key("max_frame_size", integer(16, USIZE_MAX)),
            key("max_message_size", integer(16, USIZE_MAX)),
            key("allowed_origins", Kind::TextList),
            key("max_connections_per_ip", integer(0, USIZE_MAX)),
            key("tls", Kind::Section(TLS_KEYS)),
        ]),
    ),
    key(
        "push",
        Kind::Section(&[
            key("debounce_ms", integer(0, i64::MAX)),
            key("concurrency", integer(1, USIZE_MAX)),
            key("retry_max_attempts", integer(1, U32_MAX)),
            key("retry_base_ms", integer(1, i64::MAX)),
            key("retry_max_ms", integer(1, i64::MAX)),
            key("preview_max_chars", integer(0, USIZE_MAX)),
            key(
                "webhook",
                Kind::Section(&[key("url", Kind::Text), key("secret", Kind::Text)]),
            ),
            key(
                "apns",
                Kind::Section(&[
                    key("key_file", Kind::Text),
                    key("key_id", Kind::Text),
                    key("team_id", Kind::Text),
                    key("topic", Kind::Text),
                    key("sandbox", Kind::Bool),
                    key("endpoint", Kind::Text),
                    key("ca_file", Kind::Text),
                ]),
            ),
            key(
                "fcm",
                Kind::Section(&[
                    key("service_account_file", Kind::Text),
                    key("project_id", Kind::Text),
                    key("base_url", Kind::Text),
                    key("token_uri", Kind::Text),
                ]),
            ),
        ]),
    ),
    key(
        "attachments",
        Kind::Section(&[
            key("enabled", Kind::Bool),
            key("dir", Kind::Text),
            key("max_bytes", integer(1, i64::MAX)),
            key("content_types", Kind::TextList),
            key("gc_interval_secs", integer(1, U32_MAX)),
            key("orphan_grace_secs", integer(0, U32_MAX)),
            key("token_ttl_secs", integer(1, U32_MAX)),
            key("max_uploads_per_user", integer(1, USIZE_MAX)),
            key("max_uploads", integer(1, USIZE_MAX)),
        ]),
    ),
    key(
        "bridge",
        Kind::Section(&[key(
            "remotes",
            Kind::Entries {
                keys: &[
                    key("name", Kind::Text),
                    key("address", Kind::Text),
                    key("tls", Kind::Bool),
                    key("ca_file", Kind::Text),
                    key("username", Kind::Text),
                    key("password", Kind::Text),
                    key("client_id", Kind::Text),
                    key("clean_session", Kind::Bool),
                    key("session_expiry_secs", integer(1, U32_MAX)),
                    key("keepalive_secs", integer(5, U16_MAX)),
                    key("reconnect_min_ms", integer(1, i64::MAX)),
                    key("reconnect_max_ms", integer(1, i64::MAX)),
                    key("local_user", Kind::Text),
                    key("queue", integer(1, 1 << 20)),
                    key(
                        "topics",
                        Kind::Entries {
                            keys: &[
                                key("pattern", Kind::Text),
                                key("direction", Kind::OneOf(DIRECTION_NAMES)),
                                key("qos", integer(0, 1)),
                                key("local_prefix", Kind::Text),
                                key("remote_prefix", Kind::Text),
                            ],
                            required: &["pattern", "direction"],
                        },
                    ),
                ],
                required: &["name", "address"],
            },
        )]),
    ),
    key(
        "cluster",
        Kind::Section(&[
            key("node_id", Kind::Text),
            key("nats_urls", Kind::TextList),
            key("partitions", integer(1, MAX_PARTITIONS)),
            key("lease_ttl_ms", integer(1000, 60_000)),
            key("replicas", integer(1, 5)),
            key("name_prefix", Kind::Text),
            key("startup_timeout_secs", integer(1, 3600)),
            key("user", Kind::Text),
            key("password", Kind::Text),
            key("token", Kind::Text),
            key("creds_file", Kind::Text),
            key(
                "tls",
                Kind::Section(&[
                    key("ca_file", Kind::Text),
                    key("cert", Kind::Text),
                    key("key", Kind::Text),
                ]),
            ),
        ]),
    ),
];

/// The most partitions a cluster may have: each is a replicated stream
/// (a Raft group on every NATS server holding it), and DESIGN §6 measured
/// that thousands of them cost NATS gigabytes and minutes of restart.
const MAX_PARTITIONS: i64 = 1024;

/// The keys of a TLS listener section.
const TLS_KEYS: &[Key] = &[
    key("listen", Kind::Address),
    key("cert", Kind::Text),
    key("key", Kind::Text),
    key("handshake_timeout_secs", integer(1, i64::MAX)),
];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_output_hides_secrets() {
        let auth = Auth {
            jwt_secret: Some("hs-secret".into()),
            admin_token: Some("admin-secret".into()),
            users: vec![User {
                name: "alice".into(),
                password: "alice-secret".into(),
            }],
            ..Auth::default()
        };
        let shown = format!("{auth:?}");
        for secret in ["hs-secret", "admin-secret", "alice-secret"] {
            assert!(!shown.contains(secret), "{shown}");
        }
        assert!(
            shown.contains("alice") && shown.contains(REDACTED),
            "{shown}"
        );

        let cluster = Cluster {
            password: Some("nats-secret".into()),
            token: Some("nats-token".into()),
            ..Cluster::default()
        };
        let shown = format!("{cluster:?}");
        assert!(
            !shown.contains("nats-secret") && !shown.contains("nats-token"),
            "{shown}"
        );
    }
}
