//! chatmq-cluster: a chatmq node's link to the NATS JetStream cluster that
//! the nodes of a chatmq cluster share as their order of record
//! (DESIGN §6, `docs/CLUSTER.md`).
//!
//! What it does today (issue #12, item 1): [`Cluster::start`] connects to
//! the NATS servers of `[cluster]` ([`connect`]), then makes sure the
//! JetStream objects of the [`layout`] exist, creating what is missing and
//! refusing, with one line naming the setting, what exists with another
//! shape ([`shape`]). It retries what can pass (no server up yet, no
//! JetStream leader yet) with backoff until `cluster.startup_timeout_secs`.
//! On that handle, [`Node`] (items 2, 3 and the leases of 7) holds the
//! partition leases, runs the owner's publisher of each partition it
//! holds, the ordered consumers that bring every stream to the node's
//! copy, and the request/reply that forwards a publish to the owner;
//! [`wire`] is what the records carry, parsed as untrusted input.
//!
//! It must never open RocksDB or know MQTT; and nothing of it runs without
//! `[cluster]`: the broker only calls it when the section is there.

mod connect;
mod error;
pub mod layout;
pub mod live;
pub mod mqtt;
mod node;
pub mod sessions;
mod shape;
pub mod wire;

use std::time::Duration;

use async_nats::jetstream;
use chatmq_backoff::Backoff;
use chatmq_config::{Chat, Cluster as ClusterSettings};
use tokio::time::Instant;

pub use error::{ClusterError, Mismatch};
pub use layout::Layout;
pub use node::{ChangeRequest, Delivered, Forwarded, Lost, Node, NodeMetrics, Owned, StreamRef};

/// A node connected to NATS, with the layout in place.
pub struct Cluster {
    client: async_nats::Client,
    jetstream: jetstream::Context,
    layout: Layout,
}

/// The first wait between two start-up attempts, and the longest.
const RETRY_BASE: Duration = Duration::from_millis(250);
const RETRY_CAP: Duration = Duration::from_secs(5);

/// How long start-up retries quietly, and then how often it warns why
/// it is still not ready.
const WAIT_WARNING: Duration = Duration::from_secs(10);

/// The longest one start-up attempt may take. Every request in it has its
/// own timeout, but a connection that is stuck (a server that accepted and
/// went silent) must not hold start-up until `startup_timeout_secs`: after
/// this the attempt is abandoned and the next one connects afresh.
const ATTEMPT_CAP: Duration = Duration::from_secs(20);

impl Cluster {
    /// Connects to NATS and ensures the layout, retrying what may pass
    /// until `cluster.startup_timeout_secs`. An error is final: a wrong
    /// setting, a shape NATS already has, or the time is up.
    pub async fn start(settings: &ClusterSettings, chat: &Chat) -> Result<Cluster, ClusterError> {
        let layout = Layout::new(settings, chat);
        let connector = connect::Connector::new(settings).await?;
        let deadline = Instant::now() + Duration::from_secs(settings.startup_timeout_secs);
        let mut backoff = Backoff::new(RETRY_BASE, RETRY_CAP);
        let mut client: Option<async_nats::Client> = None;
        // A short wait (a cluster forming) is quiet, and a start that
        // fails early prints its one line; a long one says why it waits.
        let mut next_warning = Instant::now() + WAIT_WARNING;
        // Set by every attempt that does not end start-up.
        let mut last: error::Failure;
        loop {
            let attempt = async {
                let c = match &client {
                    Some(c) => c.clone(),
                    None => {
                        let c = connector.connect().await?;
                        client = Some(c.clone());
                        c
                    }
                };
                let js = jetstream::new(c.clone());
                shape::ensure(&js, &layout).await?;
                Ok::<_, error::Attempt>((c, js))
            };
            let bound = deadline.min(Instant::now() + ATTEMPT_CAP);
            match tokio::time::timeout_at(bound, attempt).await {
                Ok(Ok((client, jetstream))) => {
                    connector.started();
                    tracing::info!(
                        node = %settings.node_id,
                        partitions = layout.partitions(),
                        "connected to NATS; streams and buckets in place"
                    );
                    return Ok(Cluster {
                        client,
                        jetstream,
                        layout,
                    });
                }
                Ok(Err(error::Attempt::Final(e))) => return Err(e),
                Ok(Err(error::Attempt::Retry(failure))) => {
                    if Instant::now() >= next_warning {
                        next_warning = Instant::now() + WAIT_WARNING;
                        tracing::warn!(key = failure.key, error = %failure.message, "cluster start-up: still not ready; retrying");
                    } else {
                        tracing::debug!(key = failure.key, error = %failure.message, "cluster start-up: retrying");
                    }
                    last = failure;
                }
                Err(_) => {
                    if bound < deadline {
                        tracing::warn!("cluster start-up: an attempt took too long; reconnecting");
                    }
                    last = error::Failure {
                        message: format!("no answer within {} s", ATTEMPT_CAP.as_secs()),
                        ..error::Failure::default()
                    };
                    client = None;
                }
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(ClusterError::gave_up(settings, client.is_some(), last));
            }
            tokio::time::sleep(backoff.next_delay().min(deadline - now)).await;
        }
    }

    /// The NATS connection (it reconnects by itself, to any listed server).
    pub fn client(&self) -> &async_nats::Client {
        &self.client
    }

    /// JetStream on that connection.
    pub fn jetstream(&self) -> &jetstream::Context {
        &self.jetstream
    }

    /// The names and shapes of the streams and buckets.
    pub fn layout(&self) -> &Layout {
        &self.layout
    }

    /// Flushes what this node sent and closes the connection.
    pub async fn shutdown(self) {
        if let Err(e) = self.client.drain().await {
            tracing::debug!(error = %e, "NATS drain at shutdown");
        }
    }
}
