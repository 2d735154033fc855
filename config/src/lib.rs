//! chatmq's settings: their types and defaults, loading them from a TOML file
//! with environment overrides, and validating them, so that the broker starts
//! only with a configuration it can run, and a mistake is reported as one line
//! naming the key or the path.
//!
//! The public API is small:
//! - [`Settings`] and its sections ([`Node`], [`Mqtt`], [`Auth`], [`Acl`],
//!   [`Storage`], [`Http`], [`Chat`], [`Cluster`]), whose `Default` is the documented defaults
//!   (`config/chatmq.toml` spells out every one);
//! - [`Settings::load`]: a file, then `CHATMQ__SECTION__KEY` variables
//!   (`CHATMQ__MQTT__LISTEN=127.0.0.1:0`), then validation;
//! - [`Settings::from_toml`]: the same from a string, without the environment;
//! - [`ConfigError`]: one-line messages such as
//!   `unknown key mqtt.max_paylod in config/chatmq.toml`;
//! - reloading: [`RELOADABLE`] keys a running broker takes from a changed
//!   file, [`Settings::restart_needed`] the changed keys it cannot.
//!
//! Inside, `settings` owns the shape (types, defaults, the key table), `load`
//! reads the sources and checks each key and value against the key table,
//! `validate` checks what types cannot (user ids, topic filters, files),
//! `reload` which keys a reload applies, and `error` the messages. This
//! crate never opens sockets or databases; its one side effect is creating
//! `node.data_dir`.

mod error;
mod load;
mod reload;
mod settings;
mod validate;

pub use error::ConfigError;
pub use reload::{is_reloadable, RELOADABLE};
pub use settings::{
    Access, Acl, AclRule, Apns, Attachments, Auth, Bridge, BridgeTopic, Chat, Cluster, ClusterTls,
    Direction, Drain, Fcm, Http, Log, LogFormat, LoginLimits, Mqtt, Node, Push, Remote, Settings,
    Storage, SyncMode, Tls, User, Webhook, Websocket, MQTT_TLS_LISTEN, WEBSOCKET_TLS_LISTEN,
};
pub use validate::is_user_id;
