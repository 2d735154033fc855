//! The HTTP API's connections: a permit from `http.max_connections` taken
//! before `accept` (so a flood waits in the kernel's backlog), HTTP/1.1
//! served by hyper with a header timeout (a client has
//! `http.header_timeout_secs` to send each request's line and headers, and
//! an idle keep-alive connection is closed after as long), and a graceful
//! end at shutdown. axum's own `serve` sets no header timeout, which let a
//! client that never finishes its headers hold a connection forever.
//!
//! What a request may take once its head is in (`http.request_timeout_secs`)
//! is the router's [`limits`](super::limits) layer; what the bytes on
//! the wire may look like is [`wire`](super::wire). This module never looks
//! at a request.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinSet;

use super::wire::Wire;
use super::{router, Api};
use crate::admission;

/// Serves HTTP on `listener` until `shutdown`, then lets requests in
/// progress finish.
pub async fn serve(listener: TcpListener, api: Arc<Api>, mut shutdown: watch::Receiver<bool>) {
    let app = router(api.clone());
    let header_timeout = Duration::from_secs(api.broker.settings.http.header_timeout_secs);
    let mut connections = JoinSet::new();
    let mut permit = None;
    loop {
        tokio::select! {
            _ = shutdown.changed() => {
                // Event streams never finish by themselves.
                api.streams.close_all();
                break;
            }
            p = api.connections.clone().acquire_owned(), if permit.is_none() => match p {
                Ok(p) => permit = Some(p),
                Err(_) => break, // closed: nothing closes it
            },
            accepted = listener.accept(), if permit.is_some() => match accepted {
                Ok((socket, _)) => {
                    admission::tune(&socket, None);
                    let held = permit.take();
                    let (app, api, shutdown) = (app.clone(), api.clone(), shutdown.clone());
                    connections.spawn(async move {
                        serve_connection(socket, app, header_timeout, &api, shutdown).await;
                        drop(held);
                    });
                }
                Err(e) => {
                    tracing::warn!(error = %e, "HTTP accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
        }
    }
    drop(listener);
    while connections.join_next().await.is_some() {}
}

/// One connection, request after request, until the client closes, a
/// header timeout, or the end of a graceful shutdown.
async fn serve_connection(
    socket: TcpStream,
    app: Router,
    header_timeout: Duration,
    api: &Api,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(header_timeout);
    let io = TokioIo::new(Wire::new(socket));
    let connection = builder.serve_connection(io, TowerToHyperService::new(app));
    tokio::pin!(connection);
    let finished = tokio::select! {
        ended = connection.as_mut() => Some(ended),
        _ = shutdown.changed() => None,
    };
    let ended = match finished {
        Some(ended) => ended,
        None => {
            // Finish the request in progress, then close.
            connection.as_mut().graceful_shutdown();
            connection.await
        }
    };
    if let Err(e) = ended {
        if e.is_timeout() {
            api.timeouts.header.fetch_add(1, Ordering::Relaxed);
        }
        tracing::debug!(error = %e, "HTTP connection ended");
    }
}
