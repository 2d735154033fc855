//! What an operator imports from `deploy/`: the Grafana dashboard and the
//! Prometheus alert rules read only metrics a running broker exports, and
//! the labels they group by (listener, reason, provider) are there.

use std::collections::BTreeSet;
use std::path::PathBuf;

use chatmq_tests::http::Http;
use chatmq_tests::metrics::{metric, metric_becomes, metric_reaches};
use chatmq_tests::promql::{alert_exprs, dashboard_exprs, exposed_names, missing};
use chatmq_tests::v5::{self, QoS};
use chatmq_tests::{Broker, OPEN, PATIENCE};
use serde_json::Value;

fn deploy(file: &str) -> String {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../deploy")
        .join(file);
    match std::fs::read_to_string(&path) {
        Ok(text) => text,
        Err(e) => panic!("{}: {e}", path.display()),
    }
}

/// A broker that has seen a little traffic: connections that ended in
/// three ways, a publish delivered.
async fn busy_broker() -> Broker {
    let b = Broker::start(OPEN);
    let mut sub = v5::connect_ok(b.addr, "watcher").await;
    sub.subscribe("deploy/#", QoS::AtLeastOnce).await;
    let mut publisher = v5::connect_ok(b.addr, "talker").await;
    publisher
        .publish_acked("deploy/x", QoS::AtLeastOnce, false, b"hello")
        .await;
    let _ = sub.publish().await;
    publisher.disconnect().await;
    // The same client id again: the first connection is taken over.
    let again = v5::connect_ok(b.addr, "watcher").await;
    again.drop_connection();
    b
}

#[tokio::test]
async fn every_metric_of_the_dashboard_and_the_alerts_is_exported() {
    let b = busy_broker().await;
    let text = Http::new(b.http_addr).get("/metrics").await.text();
    let exposed = exposed_names(&text);

    let dashboard: Value = match serde_json::from_str(&deploy("grafana-dashboard.json")) {
        Ok(v) => v,
        Err(e) => panic!("grafana-dashboard.json is not JSON: {e}"),
    };
    let panel_exprs = dashboard_exprs(&dashboard);
    let rule_exprs = alert_exprs(&deploy("prometheus-alerts.yml"));
    assert!(
        panel_exprs.len() >= 20,
        "{} panel queries",
        panel_exprs.len()
    );
    assert!(rule_exprs.len() >= 5, "{} alert rules", rule_exprs.len());

    for (what, exprs) in [("dashboard", &panel_exprs), ("alert rules", &rule_exprs)] {
        let gone = missing(exprs, &exposed);
        assert!(
            gone.is_empty(),
            "the {what} read metrics /metrics does not export: {gone:?}"
        );
    }
    // What the dashboard's panels are about is all there.
    let read: BTreeSet<String> = panel_exprs
        .iter()
        .flat_map(|e| chatmq_tests::promql::metric_names(e))
        .collect();
    for name in [
        "chatmq_connections",
        "chatmq_messages_delivered_total",
        "chatmq_messages_dropped_total",
        "chatmq_chat_messages_appended_total",
        "chatmq_storage_commit_seconds_bucket",
        "chatmq_storage_writer_queue_depth",
        "chatmq_push_sent_total",
        "chatmq_push_failed_total",
    ] {
        assert!(read.contains(name), "the dashboard shows {name}");
    }
}

#[tokio::test]
async fn connections_disconnects_and_push_are_labelled_where_operators_group() {
    let b = busy_broker().await;
    let accepted = "chatmq_connections_accepted_total{listener=\"tcp\"}";
    assert!(metric(&b, accepted).await >= 3.0, "three TCP connections");
    assert_eq!(
        metric(&b, "chatmq_connections_accepted_total{listener=\"ws\"}").await,
        0.0,
        "every listener has its series before its first connection"
    );
    for reason in ["client_disconnect", "session_taken_over", "connection_lost"] {
        let series = format!("chatmq_disconnects_total{{reason=\"{reason}\"}}");
        metric_reaches(&b, &series, 1.0, PATIENCE).await;
    }
    metric_becomes(&b, "chatmq_connections", 0.0).await;
    assert_eq!(
        metric(&b, "chatmq_connections{listener=\"tcp\"}").await,
        metric(&b, "chatmq_connections").await,
        "the bare name reads as the sum over listeners"
    );
    for provider in ["apns", "fcm", "webhook"] {
        for name in ["chatmq_push_sent_total", "chatmq_push_failed_total"] {
            let series = format!("{name}{{provider=\"{provider}\"}}");
            assert_eq!(metric(&b, &series).await, 0.0, "{series}");
        }
    }
}
