//! For operators: liveness (`/healthz`), readiness (`/readyz`) and the
//! metrics (`/metrics`, OpenMetrics text through `prometheus-client`:
//! `crate::exposition`). None needs a token:
//! bind `http.listen` where only the operator's network reaches.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use axum::extract::State;
use axum::http::header::CONTENT_TYPE;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use chatmq_storage::LatencySnapshot;

use crate::broker::Metrics;
use crate::counter::{Counter, Total};
use crate::exposition::{self, Exposition, Histogram};
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
        (status = 503, description = "`not_ready`: starting, shutting down, or (`[cluster]`) catching up with the streams; `draining`: moving its clients away (`POST /v1/admin/drain`)", body = Error),
    ),
)]
pub async fn readyz(State(api): State<Arc<Api>>) -> Response {
    let catching_up = api
        .broker
        .chat
        .cluster_node()
        .is_some_and(|n| !n.caught_up());
    if api.broker.drain.phase() == crate::drain::Phase::Draining {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "draining",
            "the node is moving its clients away before it stops",
        )
        .into_response()
    } else if api.ready.load(Ordering::Acquire) && catching_up {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "not_ready",
            "catching up with the cluster's streams",
        )
        .into_response()
    } else if api.ready.load(Ordering::Acquire) {
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
    ([(CONTENT_TYPE, exposition::CONTENT_TYPE)], render(&api))
}

/// Every metric, in the OpenMetrics text format (what Prometheus scrapes),
/// read now. Built per scrape: each reader holds the API (no cycle).
fn render(api: &Arc<Api>) -> String {
    let mut out = Exposition::new(api.clone());
    out.gauge_by(
        "chatmq_connections",
        "Open MQTT connections, by listener: tcp (mqtt.listen), tls (tls.listen), ws \
         (websocket.listen), wss (websocket.tls_listen).",
        "listener",
        |api| api.broker.metrics.connections.snapshot(),
    );
    out.counter_by(
        "chatmq_connections_accepted_total",
        "Connections a listener accepted (not refused by the per-address limits), by listener: tcp, tls, ws, wss.",
        "listener",
        |api| api.broker.metrics.accepted.snapshot(),
    );
    out.gauge(
        "chatmq_sessions",
        "MQTT sessions held: connected ones and persistent ones waiting for their client.",
        |api| api.broker.session_count() as u64,
    );
    out.counter(
        "chatmq_mqtt_publishes_received_total",
        "PUBLISH packets received from MQTT clients.",
        |api| api.broker.metrics.publishes_received.total(),
    );
    out.counter(
        "chatmq_mqtt_messages_routed_total",
        "Plain-MQTT messages routed to subscribers (publishes and wills).",
        |api| api.broker.metrics.messages_in.total(),
    );
    out.counter(
        "chatmq_messages_delivered_total",
        "PUBLISH packets written to MQTT clients, resends included.",
        |api| api.broker.metrics.messages_delivered.total(),
    );
    out.counter(
        "chatmq_chat_messages_appended_total",
        "Chat messages given a seq, from MQTT and HTTP senders.",
        |api| api.broker.metrics.chat_appended.total(),
    );
    out.counter(
        "chatmq_messages_dropped_total",
        "Messages a session dropped because its queue was full or they expired.",
        |api| api.broker.metrics.messages_dropped.total(),
    );
    out.counter_by(
        "chatmq_disconnects_total",
        "Connections ended after their CONNECT was read, by reason: client_disconnect, \
         connection_lost, connect_refused, or the MQTT 5 reason code the broker gave \
         (session_taken_over, keep_alive_timeout, server_shutting_down, ...).",
        "reason",
        |api| api.broker.metrics.disconnects.snapshot(),
    );
    out.counter_by(
        "chatmq_connections_refused_total",
        "Connections closed before CONNECT was accepted, by reason: address_limit, \
         address_rate (mqtt.*_per_ip), handshake (TLS or WebSocket), connect_timeout, \
         connect_too_large.",
        "reason",
        |api| api.broker.metrics.refused.snapshot(),
    );
    out.gauge(
        "chatmq_http_connections",
        "Open HTTP API connections (at most http.max_connections).",
        |api| api.open_connections() as u64,
    );
    out.gauge(
        "chatmq_http_streams",
        "Open GET /v1/stream event streams.",
        |api| api.streams.open() as u64,
    );
    out.counter_by(
        "chatmq_http_stream_ends_total",
        "Event streams opened, refused (http.stream_max_per_user or http.stream_max_total) \
         and cut off (the reader fell behind), by outcome.",
        "outcome",
        |api| {
            let s = &api.streams;
            vec![
                ("opened", s.opened.load(Ordering::Relaxed)),
                ("refused", s.refused.load(Ordering::Relaxed)),
                ("cut_off", s.cut_off.load(Ordering::Relaxed)),
            ]
        },
    );
    out.counter_by(
        "chatmq_config_reloads_total",
        "Configuration reloads (SIGHUP or POST /v1/admin/reload), by result: applied, \
         failed (a bad file: the running settings were kept).",
        "result",
        |api| {
            let reloads = &api.reloader.metrics;
            vec![
                ("applied", reloads.applied.total()),
                ("failed", reloads.failed.total()),
            ]
        },
    );
    out.counter_by(
        "chatmq_http_timeouts_total",
        "HTTP requests cut short: header (connection closed, the request line and \
         headers did not arrive within http.header_timeout_secs), request (answered 408 \
         after http.request_timeout_secs).",
        "phase",
        |api| {
            vec![
                ("header", api.timeouts.header.total()),
                ("request", api.timeouts.request.total()),
            ]
        },
    );
    // topics and retained messages (trie)
    out.counter("chatmq_topics_refused_total", "Topic names and filters refused for passing mqtt.max_topic_levels or mqtt.max_topic_length.", |api| api.broker.metrics.topics_refused.total());
    out.gauge(
        "chatmq_retained_messages",
        "Retained messages held (capped by mqtt.max_retained_messages).",
        |api| api.broker.retained_size().0 as u64,
    );
    out.gauge(
        "chatmq_retained_bytes",
        "Bytes of retained messages held (capped by mqtt.max_retained_bytes).",
        |api| api.broker.retained_size().1 as u64,
    );
    out.counter(
        "chatmq_retained_refused_total",
        "Retained publishes not retained because the retained store was at its caps.",
        |api| api.broker.metrics.retained_refused.total(),
    );
    out.counter("chatmq_retained_not_sent_total", "Retained messages a new subscription was not sent (beyond mqtt.max_retained_per_subscription).", |api| api.broker.metrics.retained_not_sent.total());
    out.counter_by(
        "chatmq_push_sent_total",
        "Push notifications a provider accepted, by provider: apns, fcm, webhook.",
        "provider",
        |api| api.broker.chat.push.metrics.sent.snapshot(),
    );
    out.counter_by(
        "chatmq_push_failed_total",
        "Push notifications given up (rejected, dead token, or out of retries), by provider.",
        "provider",
        |api| api.broker.chat.push.metrics.failed.snapshot(),
    );
    out.counter_by(
        "chatmq_push_retried_total",
        "Push sends repeated after a 429, a 5xx or a network error, by provider.",
        "provider",
        |api| api.broker.chat.push.metrics.retried.snapshot(),
    );
    out.counter(
        "chatmq_push_tokens_removed_total",
        "Devices deleted because their provider said the token is dead.",
        |api| api.broker.chat.push.metrics.tokens_removed.total(),
    );
    out.gauge(
        "chatmq_push_queue_depth",
        "Push jobs queued or being sent.",
        |api| api.broker.chat.push.queue_depth() as u64,
    );
    bridges(&api.broker, &mut out);
    cluster(&api.broker, &mut out);
    cluster_mqtt(&api.broker, &mut out);
    cluster_sessions(&api.broker, &mut out);
    attachment_metrics(&mut out);
    out.histogram(
        "chatmq_storage_commit_seconds",
        "Duration of one storage group commit (write and sync).",
        |api| {
            let h: LatencySnapshot = api.broker.store.commit_latency();
            Histogram {
                buckets: h.buckets,
                count: h.count,
                sum: h.sum_secs,
            }
        },
    );
    out.gauge(
        "chatmq_storage_writer_queue_depth",
        "Write batches waiting for the storage writer.",
        |api| api.broker.store.queue_depth() as u64,
    );
    identity(&mut out);
    // flow control: slow clients, rates, caches
    let flow: [(&str, &str, MetricsField); 20] = [
        ("chatmq_write_timeouts_total", "Connections closed because the client stopped reading (mqtt.write_timeout_secs).", |m| &m.write_timeouts),
        ("chatmq_overload_disconnects_total", "Connections closed because their session went over mqtt.session_queue_bytes.", |m| &m.overload_disconnects),
        ("chatmq_publishes_rate_limited_total", "Publishes refused by a per-connection or per-user publish rate.", |m| &m.publishes_rate_limited),
        ("chatmq_chat_deferred_to_log_total", "Live chat messages a full session did not take; replayed from the log later.", |m| &m.chat_deferred_to_log),
        ("chatmq_chat_dedup_disk_reads_total", "Chat idempotency lookups that memory could not answer and read the disk (blocking pool).", |m| &m.chat_dedup_disk_reads),
        ("chatmq_typing_throttled_total", "Typing indicators dropped by the per-user throttle (chat.typing_interval_ms).", |m| &m.typing_throttled),
        ("chatmq_announcements_coalesced_total", "Large groups' read receipts and membership changes gathered into a digest (chat.large_group_members).", |m| &m.announcements_coalesced),
        ("chatmq_announcement_digests_total", "reads and members digests sent, one per conversation and window (chat.announce_window_ms).", |m| &m.announcement_digests),
        ("chatmq_presence_coalesced_total", "Presence changes not told at once: the user's window was open and its end tells the latest state (chat.announce_window_ms).", |m| &m.presence_coalesced),
        ("chatmq_typing_too_large_total", "Typing indicators refused for their size (chat.typing_max_bytes).", |m| &m.typing_too_large),
        ("chatmq_reactions_total", "Reactions added or removed.", |m| &m.reactions),
        ("chatmq_reaction_digests_total", "reactions summary events sent, one per conversation and window (chat.reaction_window_ms).", |m| &m.reaction_digests),
        ("chatmq_room_reactions_throttled_total", "Room reactions dropped by the per-user throttle (chat.room_reaction_interval_ms).", |m| &m.room_reactions_throttled),
        ("chatmq_occupancy_updates_total", "occupancy updates sent, one per conversation and window (chat.occupancy_window_ms).", |m| &m.occupancy_updates),
        ("chatmq_messages_edited_total", "Chat messages edited.", |m| &m.messages_edited),
        ("chatmq_messages_deleted_total", "Chat messages deleted (and scrubbed from the files).", |m| &m.messages_deleted),
        ("chatmq_conv_cache_evicted_total", "Conversation states evicted from memory.", |m| &m.conv_cache_evicted),
        ("chatmq_dedup_expired_total", "Idempotency keys deleted after chat.dedup_ttl_secs.", |m| &m.dedup_expired),
        ("chatmq_chat_replay_pages_read_total", "Catch-up pages read from the conversation log.", |m| &m.replay_pages_read),
        ("chatmq_chat_replay_pages_shared_total", "Catch-up pages served from memory, read before for this or another session.", |m| &m.replay_pages_shared),
    ];
    for (name, help, get) in flow {
        out.counter(name, help, move |api| get(&api.broker.metrics).total());
    }
    out.gauge(
        "chatmq_session_held_bytes",
        "Bytes of messages all sessions hold in memory, queued or in flight.",
        |api| api.broker.held_bytes() as u64,
    );
    out.gauge(
        "chatmq_conv_cache_size",
        "Conversation states held in memory.",
        |api| api.broker.chat.cached_conversations() as u64,
    );
    out.render()
}

/// `[attachments]`: uploads, downloads, refusals, the collector.
fn attachment_metrics(out: &mut Exposition<Api>) {
    type Of = fn(&crate::chat::attachments::AttachmentMetrics) -> &AtomicU64;
    let get =
        |api: &Api, of: Of| of(&api.broker.chat.attachments().metrics).load(Ordering::Relaxed);
    let counters: [(&str, &str, Of); 7] = [
        (
            "chatmq_attachment_uploads_total",
            "Attachments uploaded and stored.",
            |m| &m.uploads,
        ),
        (
            "chatmq_attachment_upload_bytes_total",
            "Bytes of the attachments uploaded.",
            |m| &m.upload_bytes,
        ),
        (
            "chatmq_attachment_downloads_total",
            "Attachment downloads started.",
            |m| &m.downloads,
        ),
        (
            "chatmq_attachment_download_bytes_total",
            "Bytes of the attachments downloaded.",
            |m| &m.download_bytes,
        ),
        (
            "chatmq_attachment_gc_files_deleted_total",
            "Attachment files the collector removed (nothing referenced them).",
            |m| &m.gc_files_deleted,
        ),
        (
            "chatmq_attachment_gc_bytes_deleted_total",
            "Bytes of the attachment files the collector removed.",
            |m| &m.gc_bytes_deleted,
        ),
        (
            "chatmq_attachment_gc_uploads_forgotten_total",
            "Upload records the collector removed (past orphan_grace_secs, unreferenced).",
            |m| &m.gc_uploads_forgotten,
        ),
    ];
    for (name, help, of) in counters {
        out.counter(name, help, move |api| get(api, of));
    }
    out.counter_by(
        "chatmq_attachment_refused_total",
        "Attachment uploads and downloads refused, by reason.",
        "reason",
        move |api| {
            vec![
                ("too_large", get(api, |m| &m.refused_too_large)),
                ("type", get(api, |m| &m.refused_type)),
                ("busy", get(api, |m| &m.refused_busy)),
                ("denied", get(api, |m| &m.refused_denied)),
            ]
        },
    );
}

/// `[cluster]`: partitions owned here, each partition's apply lag,
/// forwarded publishes, lease changes; nothing without the section.
fn cluster(broker: &crate::broker::Broker, out: &mut Exposition<Api>) {
    if broker.chat.cluster_node().is_none() {
        return;
    }
    fn node(api: &Api) -> Option<std::sync::Arc<chatmq_cluster::Node>> {
        api.broker.chat.cluster_node()
    }
    out.gauge(
        "chatmq_cluster_partitions_owned",
        "Partitions whose lease this node holds (it sequences their conversations).",
        |api| node(api).map_or(0, |n| n.owned_count() as u64),
    );
    out.gauge_by(
        "chatmq_cluster_apply_lag",
        "Records a partition stream held beyond the last one this node applied, as its consumer last reported.",
        "partition",
        |api| {
            node(api).map_or_else(Vec::new, |n| {
                (0..n.layout().partitions())
                    .map(|p| (p.to_string(), n.apply_lag(p)))
                    .collect()
            })
        },
    );
    out.counter(
        "chatmq_cluster_forwarded_total",
        "Chat publishes forwarded to the partition's owner on another node.",
        |api| node(api).map_or(0, |n| n.metrics.forwarded.load(Ordering::Relaxed)),
    );
    out.counter(
        "chatmq_cluster_forward_failures_total",
        "Forwarded publishes with no answer (retried, to the next owner if it changed).",
        |api| node(api).map_or(0, |n| n.metrics.forward_failures.load(Ordering::Relaxed)),
    );
    out.counter_by(
        "chatmq_cluster_lease_changes_total",
        "Partition leases this node gained (took over) and lost (expired, taken, handed over, or fenced).",
        "change",
        |api| {
            node(api).map_or_else(Vec::new, |n| {
                vec![
                    ("gained", n.metrics.lease_gained.load(Ordering::Relaxed)),
                    ("lost", n.metrics.lease_lost.load(Ordering::Relaxed)),
                ]
            })
        },
    );
    out.counter(
        "chatmq_cluster_resyncs_total",
        "Times an owner's publisher read the stream back after a doubt (wrong last sequence, a lost ack).",
        |api| node(api).map_or(0, |n| n.metrics.resyncs.load(Ordering::Relaxed)),
    );
}

/// The MQTT bridges, labelled by remote (`[[bridge.remotes]]` name);
/// nothing when none is configured.
fn bridges(broker: &crate::broker::Broker, out: &mut Exposition<Api>) {
    if broker.bridges.get().is_none_or(|l| l.is_empty()) {
        return;
    }
    type Of = fn(&chatmq_bridge::mqtt::Metrics) -> &AtomicU64;
    // (name, a gauge, help, the value)
    let families: [(&str, bool, &str, Of); 5] = [
        (
            "chatmq_bridge_connected",
            true,
            "1 while the connection to the remote broker is up.",
            |m| &m.connected,
        ),
        (
            "chatmq_bridge_messages_in_total",
            false,
            "Messages from the remote published locally.",
            |m| &m.messages_in,
        ),
        (
            "chatmq_bridge_messages_out_total",
            false,
            "Local messages the remote took (PUBACK at QoS 1).",
            |m| &m.messages_out,
        ),
        (
            "chatmq_bridge_reconnects_total",
            false,
            "Connections to the remote made again after one was lost or failed.",
            |m| &m.reconnects,
        ),
        (
            "chatmq_bridge_dropped_total",
            false,
            "Bridged messages given up: refused by either side, no mapping, or QoS 0 with the queue full.",
            |m| &m.dropped,
        ),
    ];
    for (name, gauge, help, of) in families {
        let read = move |api: &Api| -> Vec<(String, u64)> {
            api.broker.bridges.get().map_or_else(Vec::new, |links| {
                links
                    .iter()
                    .map(|m| (m.name.clone(), of(m).load(Ordering::Relaxed)))
                    .collect()
            })
        };
        if gauge {
            out.gauge_by(name, help, "remote", read);
        } else {
            out.counter_by(name, help, "remote", read);
        }
    }
}

/// Plain MQTT between the nodes of a cluster (`crate::remote`); nothing
/// without `[cluster]`.
fn cluster_mqtt(broker: &crate::broker::Broker, out: &mut Exposition<Api>) {
    if broker.remote.get().is_none() {
        return;
    }
    type Of = fn(&crate::remote::Remote) -> u64;
    let families: [(&str, bool, &str, Of); 4] = [
        (
            "chatmq_cluster_mqtt_sent_total",
            false,
            "Messages this node's clients published, sent to the other nodes.",
            |r| r.links().metrics.sent.load(Ordering::Relaxed),
        ),
        (
            "chatmq_cluster_mqtt_received_total",
            false,
            "Messages other nodes' clients published, received for this node's subscribers.",
            |r| r.links().metrics.received.load(Ordering::Relaxed),
        ),
        (
            "chatmq_cluster_mqtt_subjects",
            true,
            "NATS subscriptions held for the filters of this node's sessions.",
            |r| r.links().metrics.subjects.load(Ordering::Relaxed),
        ),
        (
            "chatmq_cluster_mqtt_dropped_total",
            false,
            "Messages between nodes lost: a queue full, a publish NATS refused, a topic too long, or a body that was not a message.",
            |r| {
                r.links()
                    .metrics
                    .dropped
                    .load(Ordering::Relaxed)
                    .saturating_add(r.dropped.load(Ordering::Relaxed))
                    .saturating_add(r.refused.load(Ordering::Relaxed))
            },
        ),
    ];
    for (name, gauge, help, of) in families {
        let read = move |api: &Api| api.broker.remote.get().map_or(0, |r| of(r));
        if gauge {
            out.gauge(name, help, read);
        } else {
            out.counter(name, help, read);
        }
    }
}

/// Sessions that move between the nodes (`crate::roaming`); nothing
/// without `[cluster]`.
fn cluster_sessions(broker: &crate::broker::Broker, out: &mut Exposition<Api>) {
    if broker.roaming().is_none() {
        return;
    }
    type Of = fn(&crate::roaming::RoamingMetrics) -> &AtomicU64;
    let families: [(&str, &str, Of); 3] = [
        (
            "chatmq_cluster_sessions_imported_total",
            "Sessions resumed here that their client had on another node.",
            |m| &m.imported,
        ),
        (
            "chatmq_cluster_sessions_moved_away_total",
            "Sessions removed here because their client attached to another node (its connection here closed with 0x8E).",
            |m| &m.moved_away,
        ),
        (
            "chatmq_cluster_sessions_failures_total",
            "Reads and writes of the sessions bucket that failed (NATS away); the node went on with its own sessions.",
            |m| &m.failures,
        ),
    ];
    for (name, help, of) in families {
        out.counter(name, help, move |api: &Api| {
            api.broker
                .roaming()
                .map_or(0, |r| of(&r.metrics).load(Ordering::Relaxed))
        });
    }
    if broker.chat.live_link().is_some() {
        out.counter(
            "chatmq_cluster_live_dropped_total",
            "Presence, typing and room-reaction records between nodes lost: a queue full, or a record that was not one.",
            |api: &Api| {
                api.broker
                    .chat
                    .live_link()
                    .map_or(0, |l| l.dropped.load(Ordering::Relaxed))
            },
        );
    }
}

/// Where a counter of [`Metrics`] is.
type MetricsField = fn(&Metrics) -> &Counter;

/// Logins and client-id ownership.
fn identity(out: &mut Exposition<Api>) {
    out.counter(
        "chatmq_login_failures_total",
        "CONNECTs refused for a wrong password or token.",
        |api| api.broker.auth.guard.metrics.failures.total(),
    );
    out.counter("chatmq_logins_rate_limited_total", "CONNECTs refused unchecked: too many failed logins from their address or for their user name.", |api| api.broker.auth.guard.metrics.rate_limited.total());
    out.counter(
        "chatmq_logins_busy_total",
        "CONNECTs refused as Server busy: the password-check queue was full.",
        |api| api.broker.auth.guard.metrics.busy.total(),
    );
    out.counter(
        "chatmq_client_id_refused_total",
        "CONNECTs refused: the client id belongs to another user or an anonymous session.",
        |api| api.broker.metrics.client_id_refused.total(),
    );
    out.counter(
        "chatmq_session_quota_refused_total",
        "CONNECTs refused: the user already holds mqtt.max_sessions_per_user persistent sessions.",
        |api| api.broker.metrics.session_quota_refused.total(),
    );
    out.counter(
        "chatmq_reauthentications_total",
        "Logins moved on by an MQTT 5 re-authentication (AUTH 0x19 with a new token).",
        |api| api.broker.metrics.reauthentications.total(),
    );
    out.counter(
        "chatmq_client_owners_removed_total",
        "Client-id claims removed after client_owner_ttl_secs without a session.",
        |api| api.broker.owners.removed.total(),
    );
}
