//! Why a node could not join its cluster. Each message is one line that
//! starts with the setting to look at, because `chatmq serve` prints it as
//! its last words before exiting.

use chatmq_config::Cluster as ClusterSettings;

/// Why [`crate::Cluster::start`] gave up.
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    /// A setting NATS cannot use as it is (a URL, a credentials file).
    #[error("{key}: {reason}")]
    Setting { key: String, reason: String },

    /// NATS refused this node's credentials or TLS.
    #[error("{key}: NATS refused the connection: {reason}")]
    Refused { key: String, reason: String },

    /// No listed server answered before `cluster.startup_timeout_secs`.
    #[error("{key}: no NATS server answered within cluster.startup_timeout_secs ({secs} s), tried {urls}: {last}")]
    Unreachable {
        key: String,
        secs: u64,
        urls: String,
        last: String,
    },

    /// Connected, but JetStream did not let the layout be set up in time
    /// (no leader, too few servers for the replicas).
    #[error(
        "{key}: JetStream was not ready within cluster.startup_timeout_secs ({secs} s): {last}"
    )]
    NotReady {
        key: String,
        secs: u64,
        last: String,
    },

    /// A stream or bucket exists with another shape than this node's
    /// settings give it. chatmq never changes an existing one.
    #[error("{0}")]
    Shape(Box<Mismatch>),

    /// The cluster was created with another partition count.
    #[error("cluster.partitions: this node has {configured}, but the cluster in NATS (bucket {bucket}) was created with {recorded}; the partition count is fixed for the life of a cluster")]
    Partitions {
        configured: u32,
        recorded: u32,
        bucket: String,
    },

    /// The layout record in the meta bucket is not one chatmq wrote.
    #[error("cluster.name_prefix: the layout record in NATS bucket {bucket} is not chatmq's ({reason}); choose another cluster.name_prefix or remove the bucket")]
    Record { bucket: String, reason: String },
}

/// The first property in which an existing stream or bucket differs.
#[derive(Debug, thiserror::Error)]
#[error(
    "{key}: NATS {what} exists with {property} {found}, but this node needs {expected}; {hint}"
)]
pub struct Mismatch {
    pub key: String,
    pub what: String,
    pub property: &'static str,
    pub found: String,
    pub expected: String,
    pub hint: String,
}

impl ClusterError {
    /// The time is up; `last` is what the last attempt ran into.
    pub(crate) fn gave_up(settings: &ClusterSettings, connected: bool, last: Failure) -> Self {
        let secs = settings.startup_timeout_secs;
        if connected {
            ClusterError::NotReady {
                key: last.key.to_string(),
                secs,
                last: last.message,
            }
        } else {
            ClusterError::Unreachable {
                key: last.key.to_string(),
                secs,
                urls: settings.nats_urls.join(", "),
                last: last.message,
            }
        }
    }
}

/// What an attempt that may pass ran into: the setting most likely
/// behind it, and what happened.
#[derive(Debug)]
pub(crate) struct Failure {
    pub key: &'static str,
    pub message: String,
}

impl Default for Failure {
    fn default() -> Self {
        Failure {
            key: "cluster.nats_urls",
            message: "no answer".to_string(),
        }
    }
}

/// How one start-up attempt ended, when it did not succeed.
#[derive(Debug)]
pub(crate) enum Attempt {
    /// Worth another try (a server not up yet, no JetStream leader yet).
    Retry(Failure),
    /// Will not pass by waiting.
    Final(ClusterError),
}

impl From<ClusterError> for Attempt {
    fn from(e: ClusterError) -> Self {
        Attempt::Final(e)
    }
}

impl Attempt {
    pub(crate) fn retry(key: &'static str, message: impl Into<String>) -> Self {
        Attempt::Retry(Failure {
            key,
            message: message.into(),
        })
    }
}
