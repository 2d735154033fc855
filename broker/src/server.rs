//! Start-up and shutdown: open the store, bind the listeners (MQTT and
//! HTTP), accept connections, sweep expired sessions, apply retention, and
//! stop cleanly.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use chatmq_config::Settings;
use chatmq_storage::Store;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinSet;

use crate::access::{AccessError, Authenticator};
use crate::broker::Broker;
use crate::chat::retention;
use crate::clock::now_ms;
use crate::connection;
use crate::http;

/// Why the server could not start. Each names what to fix.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("node.data_dir {path}: {source}")]
    Storage {
        path: String,
        source: chatmq_storage::StorageError,
    },
    #[error("{0}")]
    Access(#[from] AccessError),
    #[error("mqtt.listen {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("http.listen {addr}: {source}")]
    HttpBind {
        addr: SocketAddr,
        source: std::io::Error,
    },
}

/// A running broker.
pub struct Server {
    pub broker: Arc<Broker>,
    /// Where MQTT over TCP listens (the real port when configured as 0).
    pub mqtt_addr: SocketAddr,
    /// Where the HTTP API listens (the real port when configured as 0).
    pub http_addr: SocketAddr,
    /// What `/readyz` reports: set once serving, cleared at shutdown.
    ready: Arc<AtomicBool>,
    shutdown: watch::Sender<bool>,
    tasks: JoinSet<()>,
}

impl Server {
    /// Opens the store, restores state, binds, and starts serving.
    pub async fn start(settings: Settings) -> Result<Server, StartError> {
        let settings = Arc::new(settings);
        let data_dir = settings.node.data_dir.clone();
        let storage_error = |source| StartError::Storage {
            path: data_dir.display().to_string(),
            source,
        };
        let store = Store::open(
            &data_dir,
            settings.storage.sync,
            Duration::from_millis(settings.storage.sync_interval_ms),
        )
        .map_err(storage_error)?;
        let auth = Authenticator::new(&settings.auth)?;
        let broker = Broker::new(settings.clone(), store, auth).map_err(storage_error)?;
        let listener = TcpListener::bind(settings.mqtt.listen)
            .await
            .map_err(|source| StartError::Bind {
                addr: settings.mqtt.listen,
                source,
            })?;
        let mqtt_addr = listener.local_addr().map_err(|source| StartError::Bind {
            addr: settings.mqtt.listen,
            source,
        })?;
        let http_bind = |source| StartError::HttpBind {
            addr: settings.http.listen,
            source,
        };
        let http_listener = TcpListener::bind(settings.http.listen)
            .await
            .map_err(http_bind)?;
        let http_addr = http_listener.local_addr().map_err(http_bind)?;
        let ready = Arc::new(AtomicBool::new(false));
        let (shutdown, watch) = watch::channel(false);
        let mut tasks = JoinSet::new();
        tasks.spawn(accept_loop(listener, broker.clone(), watch.clone()));
        let api = http::Api::new(broker.clone(), ready.clone());
        tasks.spawn(http::serve(http_listener, api, watch.clone()));
        tasks.spawn(broker.chat.clone().run_dispatcher(watch.clone()));
        if let Some(policy) = retention::Policy::from_settings(&settings.chat) {
            tasks.spawn(retention::run(broker.chat.clone(), policy, watch.clone()));
        }
        tasks.spawn(sweep_sessions(broker.clone(), watch));
        ready.store(true, Ordering::Release);
        Ok(Server {
            broker,
            mqtt_addr,
            http_addr,
            ready,
            shutdown,
            tasks,
        })
    }

    /// Stops accepting, tells every client (MQTT 5: DISCONNECT 0x8B), waits
    /// for connections to finish, then makes everything durable.
    pub async fn shutdown(mut self) {
        self.ready.store(false, Ordering::Release);
        let _ = self.shutdown.send(true);
        let _ = tokio::time::timeout(Duration::from_secs(10), async {
            while self.tasks.join_next().await.is_some() {}
        })
        .await;
        if let Err(e) = self.broker.store.flush().await {
            tracing::error!(error = %e, "final flush failed");
        }
        let store = self.broker.store.clone();
        let _ = tokio::task::spawn_blocking(move || store.close()).await;
    }
}

async fn accept_loop(
    listener: TcpListener,
    broker: Arc<Broker>,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            _ = shutdown.changed() => break,
            accepted = listener.accept() => match accepted {
                Ok((socket, _peer)) => {
                    let _ = socket.set_nodelay(true);
                    connections.spawn(connection::serve(socket, broker.clone(), shutdown.clone()));
                }
                Err(e) => {
                    // Out of file descriptors and the like: back off, keep serving.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
        }
    }
    drop(listener);
    while connections.join_next().await.is_some() {}
}

async fn sweep_sessions(broker: Arc<Broker>, mut shutdown: watch::Receiver<bool>) {
    let mut tick = tokio::time::interval(Duration::from_millis(500));
    loop {
        tokio::select! {
            _ = shutdown.changed() => break,
            _ = tick.tick() => {
                broker.expire_sessions(now_ms());
            }
        }
    }
}
