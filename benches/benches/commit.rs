//! The chat write path: the sequencer (`Chat::append`: idempotency check,
//! next seq, record) plus the group-commit writer (one RocksDB WriteBatch
//! and one fsync for every append waiting), with `storage.sync` "always"
//! and "never". One appender measures the commit latency alone; 64
//! concurrent appenders (one conversation each) measure what group commit
//! buys. After the criterion groups it prints append-to-durable latency
//! percentiles (hdrhistogram) for 64 concurrent appenders.

use std::sync::Arc;
use std::time::{Duration, Instant};

use chatmq_broker::chat::Envelope;
use chatmq_broker::Server;
use chatmq_config::{Settings, SyncMode};
use criterion::{criterion_group, Criterion, Throughput};
use rumqttc::v5::mqttbytes::QoS;
use tokio::runtime::Runtime;

const WRITERS: usize = 64;

struct Bench {
    rt: Runtime,
    server: Option<Server>,
    _dir: tempfile::TempDir,
}

impl Bench {
    fn new(sync: SyncMode) -> Bench {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
            .expect("runtime");
        let dir = tempfile::tempdir().expect("temp dir");
        let mut settings = Settings::default();
        settings.node.data_dir = dir.path().join("data");
        settings.mqtt.listen = "127.0.0.1:0".parse().expect("addr");
        settings.http.listen = "127.0.0.1:0".parse().expect("addr");
        settings.storage.sync = sync;
        let server = rt.block_on(Server::start(settings)).expect("broker starts");
        Bench {
            rt,
            server: Some(server),
            _dir: dir,
        }
    }

    fn server(&self) -> &Server {
        self.server.as_ref().expect("running")
    }
}

impl Drop for Bench {
    fn drop(&mut self) {
        if let Some(s) = self.server.take() {
            self.rt.block_on(s.shutdown());
        }
    }
}

fn envelope(n: u64) -> Envelope {
    Envelope::parse(
        format!(r#"{{"id":"m{n}","body":"hello, this is a chat message of ordinary length"}}"#)
            .as_bytes(),
    )
    .expect("valid envelope")
}

/// `count` appends by one writer, each awaited until durable.
async fn append_serial(server: &Server, conv: &str, from: &Arc<str>, start: u64, count: u64) {
    for n in start..start + count {
        let (commit, _) = server
            .broker
            .chat
            .append(conv, from, &envelope(n), QoS::AtLeastOnce)
            .await
            .expect("append");
        commit.await.expect("durable");
    }
}

fn bench_mode(c: &mut Criterion, name: &str, sync: SyncMode) {
    let b = Bench::new(sync);
    let mut g = c.benchmark_group(format!("append+commit sync={name}"));
    g.throughput(Throughput::Elements(1));
    if sync == SyncMode::Always {
        g.sample_size(10).measurement_time(Duration::from_secs(3));
    }
    let from: Arc<str> = "alice".into();
    let mut next = 0u64;
    g.bench_function("1 writer", |bn| {
        bn.iter_custom(|iters| {
            let start = next;
            next += iters;
            let t = Instant::now();
            b.rt.block_on(append_serial(
                b.server(),
                "dm:alice:bob",
                &from,
                start,
                iters,
            ));
            t.elapsed()
        })
    });
    g.bench_function(format!("{WRITERS} writers"), |bn| {
        bn.iter_custom(|iters| {
            let per = iters.div_ceil(WRITERS as u64);
            let start = next;
            next += per;
            let t = Instant::now();
            b.rt.block_on(async {
                let mut set = tokio::task::JoinSet::new();
                for w in 0..WRITERS {
                    let broker = b.server().broker.clone();
                    set.spawn(async move {
                        let from: Arc<str> = format!("u{w}").into();
                        let conv = format!("dm:u{w}:zz");
                        for n in start..start + per {
                            let (commit, _) = broker
                                .chat
                                .append(&conv, &from, &envelope(n), QoS::AtLeastOnce)
                                .await
                                .expect("append");
                            commit.await.expect("durable");
                        }
                    });
                }
                while set.join_next().await.is_some() {}
            });
            t.elapsed()
                .mul_f64(iters as f64 / (per * WRITERS as u64) as f64)
        })
    });
    g.finish();
}

fn benches(c: &mut Criterion) {
    bench_mode(c, "always", SyncMode::Always);
    bench_mode(c, "never", SyncMode::Never);
}

/// Append-to-durable latency percentiles with 64 concurrent appenders.
fn percentiles(name: &str, sync: SyncMode) {
    let b = Bench::new(sync);
    let (hist, count, secs) = b.rt.block_on(async {
        let deadline = Instant::now() + Duration::from_secs(2);
        let mut set = tokio::task::JoinSet::new();
        for w in 0..WRITERS {
            let broker = b.server().broker.clone();
            set.spawn(async move {
                let mut h = hdrhistogram::Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)
                    .expect("histogram");
                let from: Arc<str> = format!("u{w}").into();
                let conv = format!("dm:u{w}:zz");
                let mut n = 0u64;
                while Instant::now() < deadline {
                    let t = Instant::now();
                    let (commit, _) = broker
                        .chat
                        .append(&conv, &from, &envelope(n), QoS::AtLeastOnce)
                        .await
                        .expect("append");
                    commit.await.expect("durable");
                    h.record(t.elapsed().as_micros().max(1) as u64)
                        .expect("in range");
                    n += 1;
                }
                h
            });
        }
        let mut all =
            hdrhistogram::Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).expect("histogram");
        while let Some(Ok(h)) = set.join_next().await {
            all.add(&h).expect("same bounds");
        }
        let count = all.len();
        (all, count, 2.0)
    });
    println!(
        "commit latency sync={name}, {WRITERS} appenders: {:.0} msg/s, p50 {} us, p99 {} us, p99.9 {} us, max {} us",
        count as f64 / secs,
        hist.value_at_quantile(0.5),
        hist.value_at_quantile(0.99),
        hist.value_at_quantile(0.999),
        hist.max()
    );
}

criterion_group!(group, benches);

fn main() {
    group();
    percentiles("always", SyncMode::Always);
    percentiles("never", SyncMode::Never);
    Criterion::default().configure_from_args().final_summary();
}
