//! `/metrics` through `prometheus-client`: its registry, metric types and
//! OpenMetrics text encoder (escaping, `# TYPE`/`# HELP`, `_total`, label
//! sets, `# EOF`), over the counters the broker already keeps.
//!
//! The broker's counters stay where they are bumped ([`crate::counter`]:
//! sharded, one cache line per slot, issue #11; plain atomics for what is
//! counted once per connection or push). A metric here is a *reader*: a
//! closure the encoder calls at scrape time, which sums the shards. So a
//! bump costs what it did, and nothing a scrape does touches the hot path.
//!
//! Adding a metric is one call on [`Exposition`], next to its peers in
//! `http/ops.rs`:
//!
//! ```text
//! out.counter("chatmq_things_total", "Things done.", |api| api.broker.metrics.things.total());
//! out.gauge("chatmq_thing_queue_depth", "Things queued.", |api| api.things.depth());
//! out.counter_by("chatmq_thing_errors_total", "Errors, by kind.", "kind", |api| api.errors.snapshot());
//! ```
//!
//! Names are written as they are exposed (`_total` on counters, as
//! Prometheus queries them); the help is one sentence ending in `.`.

use std::fmt;
use std::sync::Arc;

use prometheus_client::encoding::{EncodeMetric, MetricEncoder, NoLabelSet};
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;

/// What a metric reads at scrape time from the owner `T` (the HTTP API).
type Read<T> = Box<dyn Fn(&T, MetricEncoder) -> fmt::Result + Send + Sync>;

/// One metric as the registry holds it: its type and its reader.
struct Reader<T> {
    kind: MetricType,
    owner: Arc<T>,
    read: Read<T>,
}

impl<T> fmt::Debug for Reader<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Reader").field("kind", &self.kind).finish()
    }
}

impl<T> EncodeMetric for Reader<T> {
    fn encode(&self, encoder: MetricEncoder) -> fmt::Result {
        (self.read)(&self.owner, encoder)
    }

    fn metric_type(&self) -> MetricType {
        self.kind
    }
}

/// A scrape being assembled: a registry of readers of `owner`.
pub struct Exposition<T> {
    registry: Registry,
    owner: Arc<T>,
}

/// `prometheus-client` adds `_total` to counters and `.` to help texts.
fn family_name(name: &str, kind: MetricType) -> &str {
    match kind {
        MetricType::Counter => name.strip_suffix("_total").unwrap_or(name),
        _ => name,
    }
}

impl<T: Send + Sync + 'static> Exposition<T> {
    pub fn new(owner: Arc<T>) -> Exposition<T> {
        Exposition {
            registry: Registry::default(),
            owner,
        }
    }

    fn register(&mut self, name: &str, help: &str, kind: MetricType, read: Read<T>) {
        debug_assert!(
            kind != MetricType::Counter || name.ends_with("_total"),
            "counter {name} is exposed with _total"
        );
        let help = help.strip_suffix('.').unwrap_or(help);
        let metric = Reader {
            kind,
            owner: self.owner.clone(),
            read,
        };
        self.registry
            .register(family_name(name, kind), help, metric);
    }

    /// A monotonic count without labels.
    pub fn counter(
        &mut self,
        name: &str,
        help: &str,
        read: impl Fn(&T) -> u64 + Send + Sync + 'static,
    ) {
        let read: Read<T> =
            Box::new(move |t, mut e| e.encode_counter::<NoLabelSet, _, u64>(&read(t), None));
        self.register(name, help, MetricType::Counter, read);
    }

    /// A value that goes up and down, without labels.
    pub fn gauge(
        &mut self,
        name: &str,
        help: &str,
        read: impl Fn(&T) -> u64 + Send + Sync + 'static,
    ) {
        let read: Read<T> = Box::new(move |t, mut e| e.encode_gauge(&read(t)));
        self.register(name, help, MetricType::Gauge, read);
    }

    /// A count per value of one label: `(value, count)` pairs.
    pub fn counter_by<L: AsRef<str>>(
        &mut self,
        name: &str,
        help: &str,
        label: &'static str,
        read: impl Fn(&T) -> Vec<(L, u64)> + Send + Sync + 'static,
    ) {
        let read: Read<T> = Box::new(move |t, mut e| {
            for (value, n) in read(t) {
                e.encode_family(&[(label, value.as_ref())])?
                    .encode_counter::<NoLabelSet, _, u64>(&n, None)?;
            }
            Ok(())
        });
        self.register(name, help, MetricType::Counter, read);
    }

    /// A gauge per value of one label: `(value, level)` pairs.
    pub fn gauge_by<L: AsRef<str>>(
        &mut self,
        name: &str,
        help: &str,
        label: &'static str,
        read: impl Fn(&T) -> Vec<(L, u64)> + Send + Sync + 'static,
    ) {
        let read: Read<T> = Box::new(move |t, mut e| {
            for (value, n) in read(t) {
                e.encode_family(&[(label, value.as_ref())])?
                    .encode_gauge(&n)?;
            }
            Ok(())
        });
        self.register(name, help, MetricType::Gauge, read);
    }

    /// A histogram: cumulative `(upper bound, count)` buckets, the count
    /// of all observations (the `+Inf` bucket) and their sum.
    pub fn histogram(
        &mut self,
        name: &str,
        help: &str,
        read: impl Fn(&T) -> Histogram + Send + Sync + 'static,
    ) {
        let read: Read<T> = Box::new(move |t, mut e| {
            let h = read(t);
            // The encoder takes each bucket's own count and adds them up.
            let mut below = 0u64;
            let mut buckets = Vec::with_capacity(h.buckets.len() + 1);
            for (bound, cumulative) in h.buckets {
                buckets.push((bound, cumulative.saturating_sub(below)));
                below = below.max(cumulative);
            }
            buckets.push((f64::INFINITY, h.count.saturating_sub(below)));
            e.encode_histogram::<NoLabelSet>(h.sum, h.count, &buckets, None)
        });
        self.register(name, help, MetricType::Histogram, read);
    }

    /// The OpenMetrics text of every metric, read now.
    pub fn render(&self) -> String {
        let mut out = String::new();
        if let Err(e) = prometheus_client::encoding::text::encode(&mut out, &self.registry) {
            // Only a writer's error, and a String's never fails.
            tracing::error!(error = %e, "metrics could not be encoded");
        }
        out
    }
}

/// A histogram as a reader gives it.
pub struct Histogram {
    /// `(upper bound, observations at or below it)`, bounds ascending.
    pub buckets: Vec<(f64, u64)>,
    pub count: u64,
    pub sum: f64,
}

/// The `Content-Type` of [`Exposition::render`]'s text.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

#[cfg(test)]
mod tests {
    use super::*;

    struct Things {
        done: u64,
        queued: u64,
    }

    #[test]
    fn counters_gauges_labels_and_histograms_are_openmetrics() {
        let mut out = Exposition::new(Arc::new(Things { done: 3, queued: 2 }));
        out.counter("chatmq_x_total", "Things.", |t| t.done);
        out.gauge("chatmq_q", "Queued.", |t| t.queued);
        out.counter_by("chatmq_y_total", "Kinds.", "reason", |_| {
            vec![("a", 1), ("b", 0)]
        });
        out.histogram("chatmq_h_seconds", "Time.", |_| Histogram {
            buckets: vec![(0.5, 1), (1.0, 2)],
            count: 3,
            sum: 2.5,
        });
        assert_eq!(
            out.render(),
            "# HELP chatmq_x Things.\n\
             # TYPE chatmq_x counter\n\
             chatmq_x_total 3\n\
             # HELP chatmq_q Queued.\n\
             # TYPE chatmq_q gauge\n\
             chatmq_q 2\n\
             # HELP chatmq_y Kinds.\n\
             # TYPE chatmq_y counter\n\
             chatmq_y_total{reason=\"a\"} 1\n\
             chatmq_y_total{reason=\"b\"} 0\n\
             # HELP chatmq_h_seconds Time.\n\
             # TYPE chatmq_h_seconds histogram\n\
             chatmq_h_seconds_sum 2.5\n\
             chatmq_h_seconds_count 3\n\
             chatmq_h_seconds_bucket{le=\"0.5\"} 1\n\
             chatmq_h_seconds_bucket{le=\"1.0\"} 2\n\
             chatmq_h_seconds_bucket{le=\"+Inf\"} 3\n\
             # EOF\n"
        );
    }
}
