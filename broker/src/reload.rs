//! Live reload: the configuration file read again and applied to the
//! running broker without dropping a connection, on SIGHUP or
//! `POST /v1/admin/reload`.
//!
//! A reload applies the keys of [`chatmq_config::RELOADABLE`]: users, JWT
//! keys and claims, the admin token, anonymous access, the failed-login
//! limits, the ACL rules, the publish rates, and the TLS certificate and
//! key files. Everything is read and checked first (the file as
//! `chatmq config check` would, argon2 strings, the JWT public key, each
//! certificate against its key); only when all of it is good is anything
//! swapped in, so a bad file changes nothing. Each reload logs one line:
//! the error, naming the key or file, or that it was applied; a changed key
//! that only a restart applies is named in a second (warning) line.
//!
//! What connected clients keep (the choices Mosquitto and EMQX make): a
//! login is checked at CONNECT only, so a user removed stays connected
//! until it reconnects; a subscription granted is not checked again, so a
//! grant removed stops new SUBSCRIBEs (and every PUBLISH check) but not an
//! existing subscription, while a deny rule added applies to deliveries
//! at once; a TLS connection keeps the certificate it shook hands with.
//!
//! This module never touches a socket: the listeners hold the TLS
//! acceptors whose certificates it replaces.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use chatmq_bridge::tls::{Certificate, TlsAcceptor, TlsError};
use chatmq_config::{ConfigError, Settings, Tls};
use tokio::sync::watch;

use crate::access::{AccessError, Credentials};
use crate::broker::Broker;

/// Why a reload changed nothing. The message names the key or the file.
#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    #[error("no configuration file to reload: the broker was started from settings in memory")]
    NoSource,
    #[error("{0}")]
    Config(#[from] ConfigError),
    #[error("{0}")]
    Access(#[from] AccessError),
    #[error("{0}")]
    Tls(#[from] TlsError),
}

/// What a reload did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reloaded {
    /// Keys of the new file that differ from the running settings but
    /// apply only after a restart.
    pub restart_needed: Vec<String>,
}

/// Reloads tried, for `/metrics` (a call without a file is not counted).
#[derive(Debug, Default)]
pub struct ReloadMetrics {
    pub applied: AtomicU64,
    pub failed: AtomicU64,
}

/// Applies a new configuration to one running broker.
pub struct Reloader {
    broker: Arc<Broker>,
    /// The TLS listeners' acceptors, by the section that configures them
    /// (`mqtt.tls`, `websocket.tls`).
    tls: Vec<(&'static str, TlsAcceptor)>,
    /// The file to read again; set once by [`crate::Server::reload_from`].
    source: OnceLock<PathBuf>,
    /// One reload at a time: two at once could leave a mix of both.
    running: Mutex<()>,
    pub metrics: ReloadMetrics,
}

impl Reloader {
    pub fn new(broker: Arc<Broker>, tls: Vec<(&'static str, TlsAcceptor)>) -> Reloader {
        Reloader {
            broker,
            tls,
            source: OnceLock::new(),
            running: Mutex::new(()),
            metrics: ReloadMetrics::default(),
        }
    }

    /// Names the file [`Reloader::reload`] reads. Only the first call counts.
    pub fn set_source(&self, path: PathBuf) {
        let _ = self.source.set(path);
    }

    /// Reads the configuration file again (with the environment overrides,
    /// as at start-up) and applies it; logs one line either way. Blocking
    /// (files, the data directory check): call it off the async runtime.
    pub fn reload(&self) -> Result<Reloaded, ReloadError> {
        let result = match self.source.get() {
            Some(path) => match Settings::load(path) {
                Ok(settings) => self.apply(&settings),
                Err(e) => {
                    self.metrics.failed.fetch_add(1, Ordering::Relaxed);
                    Err(e.into())
                }
            },
            None => Err(ReloadError::NoSource),
        };
        match &result {
            Ok(_) => {
                let shown = self.source.get().map(|p| p.display().to_string());
                tracing::info!(
                    file = shown.as_deref().unwrap_or(""),
                    "configuration reloaded"
                );
            }
            Err(e) => {
                tracing::error!("configuration reload failed, the running settings are kept: {e}")
            }
        }
        result
    }

    /// Applies the reloadable keys of `settings`, all or none; counts the
    /// attempt. [`Reloader::reload`] with settings already loaded (a
    /// program's own, when it runs the server without a file).
    pub fn apply(&self, settings: &Settings) -> Result<Reloaded, ReloadError> {
        let _one = self.running.lock().unwrap_or_else(|e| e.into_inner());
        let result = self.prepare(settings).map(|prepared| {
            let broker = &self.broker;
            broker.auth.replace(prepared.credentials);
            broker.auth.guard.set_limits(&settings.auth.limits);
            broker.acl.replace(&settings.acl.rules);
            broker.publish_limits.set(&settings.mqtt);
            for (acceptor, certificate) in prepared.certificates {
                acceptor.set_certificate(certificate);
            }
            let restart_needed = broker.settings.restart_needed(settings);
            if !restart_needed.is_empty() {
                tracing::warn!(
                    "configuration keys changed that apply only after a restart: {}",
                    restart_needed.join(", ")
                );
            }
            Reloaded { restart_needed }
        });
        let counter = match &result {
            Ok(_) => &self.metrics.applied,
            Err(_) => &self.metrics.failed,
        };
        counter.fetch_add(1, Ordering::Relaxed);
        result
    }

    /// Everything that can fail, before anything is changed.
    fn prepare(&self, settings: &Settings) -> Result<Prepared<'_>, ReloadError> {
        let credentials = Credentials::new(&settings.auth)?;
        let mut certificates = Vec::new();
        for (section, acceptor) in &self.tls {
            // A section removed from the file keeps its listener and its
            // certificate until a restart (`restart_needed` names it).
            if let Some(tls) = tls_section(settings, section) {
                certificates.push((acceptor, Certificate::load(section, tls)?));
            }
        }
        Ok(Prepared {
            credentials,
            certificates,
        })
    }
}

/// A reload checked and ready to swap in.
struct Prepared<'a> {
    credentials: Credentials,
    certificates: Vec<(&'a TlsAcceptor, Certificate)>,
}

fn tls_section<'a>(settings: &'a Settings, section: &str) -> Option<&'a Tls> {
    match section {
        "mqtt.tls" => settings.mqtt.tls.as_ref(),
        "websocket.tls" => settings.websocket.tls.as_ref(),
        _ => None,
    }
}

/// Reloads on every SIGHUP until shutdown.
pub async fn on_hangup(
    mut hangup: tokio::signal::unix::Signal,
    reloader: Arc<Reloader>,
    mut shutdown: watch::Receiver<bool>,
) {
    loop {
        tokio::select! {
            _ = shutdown.changed() => break,
            got = hangup.recv() => {
                if got.is_none() {
                    break;
                }
                let reloader = reloader.clone();
                // The outcome is logged and counted by `reload` itself.
                let _ = tokio::task::spawn_blocking(move || reloader.reload()).await;
            }
        }
    }
}
