//! For operators: liveness (`/healthz`), readiness (`/readyz`) and the
//! Prometheus metrics (`/metrics`, text format 0.0.4). None needs a token:
//! bind `http.listen` where only the operator's network reaches.

use std::fmt::{Display, Write};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use axum::extract::State;
use axum::http::header::CONTENT_TYPE;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use chatmq_storage::LatencySnapshot;
use serde_json::{json, Value};

use super::openapi::{Error, Status};
use super::{Api, ApiError};

/// 200 while the process runs.
#[utoipa::path(
    get,
    path = "/healthz",
    tag = "operations",
    responses((status = 200, description = "`{\"status\":\"ok\"}`", body = Status)),
)]
pub async fn healthz() -> Json<Value> {
    Json(json!({"status": "ok"}))
}

/// 200 once the broker serves, 503 while it starts or shuts down.
#[utoipa::path(
    get,
    path = "/readyz",
    tag = "operations",
    responses(
        (status = 200, description = "`{\"status\":\"ready\"}`", body = Status),
        (status = 503, description = "`not_ready`: starting or shutting down", body = Error),
    ),
)]
pub async fn readyz(State(api): State<Arc<Api>>) -> Response {
    if api.ready.load(Ordering::Acquire) {
        Json(json!({"status": "ready"})).into_response()
    } else {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "not_ready",
            "the broker is starting or shutting down",
        )
        .into_response()
    }
}

/// Every metric, in the Prometheus text format 0.0.4.
#[utoipa::path(
    get,
    path = "/metrics",
    tag = "operations",
    responses((
        status = 200,
        description = "Prometheus text exposition",
        body = String,
        content_type = "text/plain; version=0.0.4; charset=utf-8",
    )),
)]
pub async fn metrics(State(api): State<Arc<Api>>) -> impl IntoResponse {
    (
        [(CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")],
        render(&api),
    )
}

/// Every metric, in the Prometheus text exposition format.
fn render(api: &Api) -> String {
    let broker = &api.broker;
    let m = &broker.metrics;
    let count = |c: &dyn crate::counter::Total| c.total();
    let mut out = Exposition::default();
    out.single(
        "chatmq_connections",
        "gauge",
        "Open MQTT connections.",
        m.connections.load(Ordering::Relaxed),
    );
    out.single(
        "chatmq_sessions",
        "gauge",
        "MQTT sessions held: connected ones and persistent ones waiting for their client.",
        broker.session_count(),
    );
    out.single(
        "chatmq_mqtt_publishes_received_total",
        "counter",
        "PUBLISH packets received from MQTT clients.",
        count(&m.publishes_received),
    );
    out.single(
        "chatmq_mqtt_messages_routed_total",
        "counter",
        "Plain-MQTT messages routed to subscribers (publishes and wills).",
        count(&m.messages_in),
    );
    out.single(
        "chatmq_messages_delivered_total",
        "counter",
        "PUBLISH packets written to MQTT clients, resends included.",
        count(&m.messages_delivered),
    );
    out.single(
        "chatmq_chat_messages_appended_total",
        "counter",
        "Chat messages given a seq, from MQTT and HTTP senders.",
        count(&m.chat_appended),
    );
    out.single(
        "chatmq_messages_dropped_total",
        "counter",
        "Messages a session dropped because its queue was full or they expired.",
        count(&m.messages_dropped),
    );
    out.labelled(
        "chatmq_connections_refused_total",
        "counter",
        "Connections closed before CONNECT was accepted, by reason: address_limit, \
         address_rate (mqtt.*_per_ip), handshake (TLS or WebSocket), connect_timeout, \
         connect_too_large.",
        "reason",
        &m.refused.snapshot(),
    );
    out.single(
        "chatmq_http_connections",
        "gauge",
        "Open HTTP API connections (at most http.max_connections).",
        api.open_connections(),
    );
    let reloads = &api.reloader.metrics;
    out.labelled(
        "chatmq_config_reloads_total",
        "counter",
        "Configuration reloads (SIGHUP or POST /v1/admin/reload), by result: applied, \
         failed (a bad file: the running settings were kept).",
        "result",
        &[
            ("applied", count(&reloads.applied)),
            ("failed", count(&reloads.failed)),
        ],
    );
    let timeouts = &api.timeouts;
    out.labelled(
        "chatmq_http_timeouts_total",
        "counter",
        "HTTP requests cut short: header (connection closed, the request line and \
         headers did not arrive within http.header_timeout_secs), request (answered 408 \
         after http.request_timeout_secs).",
        "phase",
        &[
            ("header", count(&timeouts.header)),
            ("request", count(&timeouts.request)),
        ],
    );
    // topics and retained messages (trie)
    out.single(
        "chatmq_topics_refused_total",
        "counter",
        "Topic names and filters refused for passing mqtt.max_topic_levels or mqtt.max_topic_length.",
        count(&m.topics_refused),
    );
    let (retained, retained_bytes) = broker.retained_size();
    out.single(
        "chatmq_retained_messages",
        "gauge",
        "Retained messages held (capped by mqtt.max_retained_messages).",
        retained,
    );
    out.single(
        "chatmq_retained_bytes",
        "gauge",
        "Bytes of retained messages held (capped by mqtt.max_retained_bytes).",
        retained_bytes,
    );
    out.single(
        "chatmq_retained_refused_total",
        "counter",
        "Retained publishes not retained because the retained store was at its caps.",
        count(&m.retained_refused),
    );
    out.single(
        "chatmq_retained_not_sent_total",
        "counter",
        "Retained messages a new subscription was not sent (beyond mqtt.max_retained_per_subscription).",
        count(&m.retained_not_sent),
    );
    let push = &broker.chat.push;
    out.single(
        "chatmq_push_sent_total",
        "counter",
        "Push notifications a provider (APNs, FCM, webhook) accepted.",
        count(&push.metrics.sent),
    );
    out.single(
        "chatmq_push_failed_total",
        "counter",
        "Push notifications given up: rejected, dead token, or out of retries.",
        count(&push.metrics.failed),
    );
    out.single(
        "chatmq_push_retried_total",
        "counter",
        "Push sends repeated after a 429, a 5xx or a network error.",
        count(&push.metrics.retried),
    );
    out.single(
        "chatmq_push_tokens_removed_total",
        "counter",
        "Devices deleted because their provider said the token is dead.",
        count(&push.metrics.tokens_removed),
    );
    out.single(
        "chatmq_push_queue_depth",
        "gauge",
        "Push jobs queued or being sent.",
        push.queue_depth(),
    );
    bridges(broker, &mut out);
    out.histogram(
        "chatmq_storage_commit_seconds",
        "Duration of one storage group commit (write and sync).",
        &broker.store.commit_latency(),
    );
    out.single(
        "chatmq_storage_writer_queue_depth",
        "gauge",
        "Write batches waiting for the storage writer.",
        broker.store.queue_depth(),
    );
    identity(broker, &mut out);
    // flow control: slow clients, rates, caches
    for (name, help, counter) in [
        (
            "chatmq_write_timeouts_total",
            "Connections closed because the client stopped reading (mqtt.write_timeout_secs).",
            &m.write_timeouts,
        ),
        (
            "chatmq_overload_disconnects_total",
            "Connections closed because their session went over mqtt.session_queue_bytes.",
            &m.overload_disconnects,
        ),
        (
            "chatmq_publishes_rate_limited_total",
            "Publishes refused by a per-connection or per-user publish rate.",
            &m.publishes_rate_limited,
        ),
        (
            "chatmq_chat_deferred_to_log_total",
            "Live chat messages a full session did not take; replayed from the log later.",
            &m.chat_deferred_to_log,
        ),
        (
            "chatmq_chat_dedup_disk_reads_total",
            "Chat idempotency lookups that memory could not answer and read the disk (blocking pool).",
            &m.chat_dedup_disk_reads,
        ),
        (
            "chatmq_typing_throttled_total",
            "Typing indicators dropped by the per-user throttle (chat.typing_interval_ms).",
            &m.typing_throttled,
        ),
        (
            "chatmq_announcements_coalesced_total",
            "Large groups' read receipts and membership changes gathered into a digest (chat.large_group_members).",
            &m.announcements_coalesced,
        ),
        (
            "chatmq_announcement_digests_total",
            "reads and members digests sent, one per conversation and window (chat.announce_window_ms).",
            &m.announcement_digests,
        ),
        (
            "chatmq_presence_coalesced_total",
            "Presence changes not told at once: the user's window was open and its end tells the latest state (chat.announce_window_ms).",
            &m.presence_coalesced,
        ),
        (
            "chatmq_typing_too_large_total",
            "Typing indicators refused for their size (chat.typing_max_bytes).",
            &m.typing_too_large,
        ),
        (
            "chatmq_reactions_total",
            "Reactions added or removed.",
            &m.reactions,
        ),
        (
            "chatmq_reaction_digests_total",
            "reactions summary events sent, one per conversation and window (chat.reaction_window_ms).",
            &m.reaction_digests,
        ),
        (
            "chatmq_room_reactions_throttled_total",
            "Room reactions dropped by the per-user throttle (chat.room_reaction_interval_ms).",
            &m.room_reactions_throttled,
        ),
        (
            "chatmq_occupancy_updates_total",
            "occupancy updates sent, one per conversation and window (chat.occupancy_window_ms).",
            &m.occupancy_updates,
        ),
        (
            "chatmq_messages_edited_total",
            "Chat messages edited.",
            &m.messages_edited,
        ),
        (
            "chatmq_messages_deleted_total",
            "Chat messages deleted (and scrubbed from the files).",
            &m.messages_deleted,
        ),
        (
            "chatmq_conv_cache_evicted_total",
            "Conversation states evicted from memory.",
            &m.conv_cache_evicted,
        ),
        (
            "chatmq_dedup_expired_total",
            "Idempotency keys deleted after chat.dedup_ttl_secs.",
            &m.dedup_expired,
        ),
        (
            "chatmq_chat_replay_pages_read_total",
            "Catch-up pages read from the conversation log.",
            &m.replay_pages_read,
        ),
        (
            "chatmq_chat_replay_pages_shared_total",
            "Catch-up pages served from memory, read before for this or another session.",
            &m.replay_pages_shared,
        ),
    ] {
        out.single(name, "counter", help, count(counter));
    }
    out.single(
        "chatmq_session_held_bytes",
        "gauge",
        "Bytes of messages all sessions hold in memory, queued or in flight.",
        broker.held_bytes(),
    );
    out.single(
        "chatmq_conv_cache_size",
        "gauge",
        "Conversation states held in memory.",
        broker.chat.cached_conversations(),
    );
    out.0
}

/// Logins and client-id ownership.
fn identity(broker: &crate::broker::Broker, out: &mut Exposition) {
    let count = |c: &dyn crate::counter::Total| c.total();
    let logins = &broker.auth.guard.metrics;
    out.single(
        "chatmq_login_failures_total",
        "counter",
        "CONNECTs refused for a wrong password or token.",
        count(&logins.failures),
    );
    out.single(
        "chatmq_logins_rate_limited_total",
        "counter",
        "CONNECTs refused unchecked: too many failed logins from their address or for their user name.",
        count(&logins.rate_limited),
    );
    out.single(
        "chatmq_logins_busy_total",
        "counter",
        "CONNECTs refused as Server busy: the password-check queue was full.",
        count(&logins.busy),
    );
    out.single(
        "chatmq_client_id_refused_total",
        "counter",
        "CONNECTs refused: the client id belongs to another user or an anonymous session.",
        count(&broker.metrics.client_id_refused),
    );
    out.single(
        "chatmq_session_quota_refused_total",
        "counter",
        "CONNECTs refused: the user already holds mqtt.max_sessions_per_user persistent sessions.",
        count(&broker.metrics.session_quota_refused),
    );
    out.single(
        "chatmq_reauthentications_total",
        "counter",
        "Logins moved on by an MQTT 5 re-authentication (AUTH 0x19 with a new token).",
        count(&broker.metrics.reauthentications),
    );
    out.single(
        "chatmq_client_owners_removed_total",
        "counter",
        "Client-id claims removed after client_owner_ttl_secs without a session.",
        count(&broker.owners.removed),
    );
    attachment_metrics(out, &broker.chat.attachments().metrics);
}

/// `[attachments]`: uploads, downloads, refusals, the collector.
fn attachment_metrics(out: &mut Exposition, m: &crate::chat::attachments::AttachmentMetrics) {
    let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
    out.single(
        "chatmq_attachment_uploads_total",
        "counter",
        "Attachments uploaded and stored.",
        get(&m.uploads),
    );
    out.single(
        "chatmq_attachment_upload_bytes_total",
        "counter",
        "Bytes of the attachments uploaded.",
        get(&m.upload_bytes),
    );
    out.labelled(
        "chatmq_attachment_refused_total",
        "counter",
        "Attachment uploads and downloads refused, by reason.",
        "reason",
        &[
            ("too_large", get(&m.refused_too_large)),
            ("type", get(&m.refused_type)),
            ("busy", get(&m.refused_busy)),
            ("denied", get(&m.refused_denied)),
        ],
    );
    out.single(
        "chatmq_attachment_downloads_total",
        "counter",
        "Attachment downloads started.",
        get(&m.downloads),
    );
    out.single(
        "chatmq_attachment_download_bytes_total",
        "counter",
        "Bytes of the attachments downloaded.",
        get(&m.download_bytes),
    );
    out.single(
        "chatmq_attachment_gc_files_deleted_total",
        "counter",
        "Attachment files the collector removed (nothing referenced them).",
        get(&m.gc_files_deleted),
    );
    out.single(
        "chatmq_attachment_gc_bytes_deleted_total",
        "counter",
        "Bytes of the attachment files the collector removed.",
        get(&m.gc_bytes_deleted),
    );
    out.single(
        "chatmq_attachment_gc_uploads_forgotten_total",
        "counter",
        "Upload records the collector removed (past orphan_grace_secs, unreferenced).",
        get(&m.gc_uploads_forgotten),
    );
}

/// A Prometheus text exposition being written.
/// The MQTT bridges, labelled by remote (`[[bridge.remotes]]` name).
fn bridges(broker: &crate::broker::Broker, out: &mut Exposition) {
    let Some(links) = broker.bridges.get().filter(|l| !l.is_empty()) else {
        return;
    };
    type Of = fn(&chatmq_bridge::mqtt::Metrics) -> &AtomicU64;
    let families: [(&str, &str, &str, Of); 5] = [
        (
            "chatmq_bridge_connected",
            "gauge",
            "1 while the connection to the remote broker is up.",
            |m| &m.connected,
        ),
        (
            "chatmq_bridge_messages_in_total",
            "counter",
            "Messages from the remote published locally.",
            |m| &m.messages_in,
        ),
        (
            "chatmq_bridge_messages_out_total",
            "counter",
            "Local messages the remote took (PUBACK at QoS 1).",
            |m| &m.messages_out,
        ),
        (
            "chatmq_bridge_reconnects_total",
            "counter",
            "Connections to the remote made again after one was lost or failed.",
            |m| &m.reconnects,
        ),
        (
            "chatmq_bridge_dropped_total",
            "counter",
            "Bridged messages given up: refused by either side, no mapping, or QoS 0 with the queue full.",
            |m| &m.dropped,
        ),
    ];
    for (name, kind, help, of) in families {
        let samples: Vec<(&str, u64)> = links
            .iter()
            .map(|m| (m.name.as_str(), of(m).load(Ordering::Relaxed)))
            .collect();
        out.labelled(name, kind, help, "remote", &samples);
    }
}

#[derive(Default)]
struct Exposition(String);

impl Exposition {
    fn header(&mut self, name: &str, kind: &str, help: &str) {
        let _ = writeln!(self.0, "# HELP {name} {help}");
        let _ = writeln!(self.0, "# TYPE {name} {kind}");
    }

    /// A counter or gauge without labels.
    fn single(&mut self, name: &str, kind: &str, help: &str, value: impl Display) {
        self.header(name, kind, help);
        let _ = writeln!(self.0, "{name} {value}");
    }

    /// A counter or gauge with one label, one sample per label value.
    fn labelled(
        &mut self,
        name: &str,
        kind: &str,
        help: &str,
        label: &str,
        samples: &[(&str, impl Display)],
    ) {
        self.header(name, kind, help);
        for (value, sample) in samples {
            let _ = writeln!(self.0, "{name}{{{label}=\"{value}\"}} {sample}");
        }
    }

    fn histogram(&mut self, name: &str, help: &str, h: &LatencySnapshot) {
        self.header(name, "histogram", help);
        for (bound, n) in &h.buckets {
            let _ = writeln!(self.0, "{name}_bucket{{le=\"{bound}\"}} {n}");
        }
        let _ = writeln!(self.0, "{name}_bucket{{le=\"+Inf\"}} {}", h.count);
        let _ = writeln!(self.0, "{name}_sum {}", h.sum_secs);
        let _ = writeln!(self.0, "{name}_count {}", h.count);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_exposition_has_help_type_and_samples() {
        let mut out = Exposition::default();
        out.single("chatmq_x_total", "counter", "Things.", 3u64);
        out.labelled(
            "chatmq_y_total",
            "counter",
            "Kinds.",
            "reason",
            &[("a", 1u64), ("b", 0)],
        );
        out.histogram(
            "chatmq_h_seconds",
            "Time.",
            &LatencySnapshot {
                buckets: vec![(0.0005, 1), (1.0, 2)],
                count: 3,
                sum_secs: 2.5,
            },
        );
        assert_eq!(
            out.0,
            "# HELP chatmq_x_total Things.\n\
             # TYPE chatmq_x_total counter\n\
             chatmq_x_total 3\n\
             # HELP chatmq_y_total Kinds.\n\
             # TYPE chatmq_y_total counter\n\
             chatmq_y_total{reason=\"a\"} 1\n\
             chatmq_y_total{reason=\"b\"} 0\n\
             # HELP chatmq_h_seconds Time.\n\
             # TYPE chatmq_h_seconds histogram\n\
             chatmq_h_seconds_bucket{le=\"0.0005\"} 1\n\
             chatmq_h_seconds_bucket{le=\"1\"} 2\n\
             chatmq_h_seconds_bucket{le=\"+Inf\"} 3\n\
             chatmq_h_seconds_sum 2.5\n\
             chatmq_h_seconds_count 3\n"
        );
    }
}
