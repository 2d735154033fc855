//! Topic matching and subscription lookup with 10^5 subscriptions in the
//! router: one per conversation-like topic plus wildcard filters, the
//! shape of a chat deployment's plain-MQTT side.

use std::sync::Arc;

use chatmq_broker::router::{Router, SubOptions};
use chatmq_broker::topic;
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use rumqttc::v5::mqttbytes::QoS;

const SUBSCRIPTIONS: usize = 100_000;

fn options() -> SubOptions {
    SubOptions {
        qos: QoS::AtLeastOnce,
        no_local: false,
        retain_as_published: false,
        retain_handling: 0,
        identifier: 0,
    }
}

fn router() -> Router<()> {
    let mut r = Router::default();
    for i in 0..SUBSCRIPTIONS {
        let client: Arc<str> = format!("client-{i}").into();
        let filter = match i % 10 {
            0 => format!("devices/{}/+/state", i / 10),
            1 => format!("devices/{}/#", i / 10),
            _ => format!("rooms/{}/messages", i),
        };
        r.subscribe(&client, &filter, options(), ());
    }
    // A few broad wildcard subscribers, as monitoring clients have.
    for i in 0..10 {
        r.subscribe(
            &format!("monitor-{i}").into(),
            "rooms/+/messages",
            options(),
            (),
        );
    }
    r
}

fn bench(c: &mut Criterion) {
    let mut g = c.benchmark_group("topics");
    g.throughput(Throughput::Elements(1));
    g.bench_function("matches filter with wildcards", |b| {
        b.iter(|| topic::matches("devices/+/sensors/#", "devices/42/sensors/temp/1"))
    });
    let r = router();
    let mut direct = 0usize;
    g.bench_function("lookup 1e5 subs: exact + 10 wildcard matches", |b| {
        b.iter(|| {
            direct = 0;
            r.for_each_match("rooms/12345/messages", &mut |_, _| direct += 1, &mut |_| {});
            direct
        })
    });
    g.bench_function("lookup 1e5 subs: + and # matches", |b| {
        b.iter(|| {
            direct = 0;
            r.for_each_match(
                "devices/4242/thermostat/state",
                &mut |_, _| direct += 1,
                &mut |_| {},
            );
            direct
        })
    });
    g.bench_function("lookup 1e5 subs: no match", |b| {
        b.iter(|| {
            direct = 0;
            r.for_each_match("nobody/listens/here", &mut |_, _| direct += 1, &mut |_| {});
            direct
        })
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
