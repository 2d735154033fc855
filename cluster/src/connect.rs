//! The NATS connection: options from `[cluster]` (every URL, credentials,
//! TLS), one pass over the servers per attempt, and what the client's
//! events say once running.
//!
//! The client reconnects by itself after start-up, to any listed server
//! or one the cluster told it about, without limit: a node keeps trying
//! while NATS is away, and what that pauses is the business of the layers
//! above.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_nats::{ConnectErrorKind, ConnectOptions, Event, ServerAddr};
use chatmq_config::Cluster as ClusterSettings;

use crate::error::{Attempt, ClusterError};

/// How long one server may take to accept a connection and answer.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);

/// Connects with the options the settings give.
pub(crate) struct Connector {
    addrs: Vec<ServerAddr>,
    options: ConnectOptions,
    /// Which setting authenticates, for the message when NATS refuses it.
    credentials_key: &'static str,
    /// Set once start-up is over: the events are news from then on.
    started: Arc<AtomicBool>,
}

impl Connector {
    /// Reads the credentials file, parses the URLs; fails only on a
    /// setting that cannot work.
    pub(crate) async fn new(settings: &ClusterSettings) -> Result<Connector, ClusterError> {
        let mut addrs = Vec::with_capacity(settings.nats_urls.len());
        for (index, url) in settings.nats_urls.iter().enumerate() {
            let addr = url
                .parse::<ServerAddr>()
                .map_err(|e| ClusterError::Setting {
                    key: format!("cluster.nats_urls[{index}]"),
                    reason: format!("{url:?}: {e}"),
                })?;
            addrs.push(addr);
        }
        let started = Arc::new(AtomicBool::new(false));
        let mut options = ConnectOptions::new()
            .name(format!("chatmq {}", settings.node_id))
            .connection_timeout(CONNECT_TIMEOUT)
            .event_callback(log_events(started.clone()));
        let mut credentials_key = "cluster.user";
        if let (Some(user), Some(password)) = (&settings.user, &settings.password) {
            options = options.user_and_password(user.clone(), password.clone());
            credentials_key = "cluster.password";
        } else if let Some(token) = &settings.token {
            options = options.token(token.clone());
            credentials_key = "cluster.token";
        } else if let Some(path) = &settings.creds_file {
            options = options
                .credentials_file(path)
                .await
                .map_err(|e| ClusterError::Setting {
                    key: "cluster.creds_file".to_string(),
                    reason: format!("{}: {e}", path.display()),
                })?;
            credentials_key = "cluster.creds_file";
        }
        if let Some(tls) = &settings.tls {
            options = options.require_tls(true);
            if let Some(ca) = &tls.ca_file {
                options = options.add_root_certificates(ca.clone());
            }
            if let (Some(cert), Some(key)) = (&tls.cert, &tls.key) {
                options = options.add_client_certificate(cert.clone(), key.clone());
            }
        }
        Ok(Connector {
            addrs,
            options,
            credentials_key,
            started,
        })
    }

    /// One pass over the servers; refused credentials are final.
    pub(crate) async fn connect(&self) -> Result<async_nats::Client, Attempt> {
        match self.options.clone().connect(self.addrs.clone()).await {
            Ok(client) => Ok(client),
            Err(e) => match e.kind() {
                ConnectErrorKind::AuthorizationViolation | ConnectErrorKind::Authentication => {
                    Err(Attempt::Final(ClusterError::Refused {
                        key: self.credentials_key.to_string(),
                        reason: e.to_string(),
                    }))
                }
                ConnectErrorKind::Tls => Err(Attempt::retry("cluster.tls", e.to_string())),
                _ => Err(Attempt::retry("cluster.nats_urls", e.to_string())),
            },
        }
    }

    /// Start-up is over: from now on the client's events are logged as news.
    pub(crate) fn started(&self) {
        self.started.store(true, Ordering::Release);
    }
}

/// The client's events in the node's log. Before start-up is over they
/// are debug lines, so that a failed start prints only its one error line.
fn log_events(
    started: Arc<AtomicBool>,
) -> impl Fn(Event) -> std::future::Ready<()> + Send + Sync + 'static {
    move |event| {
        if started.load(Ordering::Acquire) {
            match &event {
                Event::Connected => tracing::info!("NATS: connected"),
                Event::Disconnected => tracing::warn!("NATS: disconnected; reconnecting"),
                other => tracing::warn!(event = %other, "NATS"),
            }
        } else {
            tracing::debug!(event = %event, "NATS (start-up)");
        }
        std::future::ready(())
    }
}
