//! MQTT codec: decoding and encoding a 64-byte QoS 1 PUBLISH in both
//! protocol versions, as a connection does for every message.

use bytes::{Bytes, BytesMut};
use chatmq_broker::codec::{self, Protocol};
use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use rumqttc::v5::mqttbytes::v5::{Packet, Publish};
use rumqttc::v5::mqttbytes::QoS;

const MAX: usize = 1 << 20;

fn publish() -> Packet {
    let mut p = Publish::new(
        "chat/room-42",
        QoS::AtLeastOnce,
        Bytes::from(vec![b'x'; 64]),
        None,
    );
    p.pkid = 7;
    Packet::Publish(p)
}

fn bench(c: &mut Criterion) {
    let mut g = c.benchmark_group("codec");
    g.throughput(Throughput::Elements(1));
    for protocol in [Protocol::V4, Protocol::V5] {
        let mut wire = BytesMut::new();
        assert!(codec::encode(&publish(), protocol, &mut wire, None));
        let wire = wire.freeze();
        g.bench_function(format!("decode publish {protocol:?}"), |b| {
            b.iter_batched_ref(
                || BytesMut::from(&wire[..]),
                |buf| codec::decode(buf, Some(protocol), MAX).expect("decodes"),
                BatchSize::SmallInput,
            )
        });
        let packet = publish();
        let mut out = BytesMut::with_capacity(4096);
        g.bench_function(format!("encode publish {protocol:?}"), |b| {
            b.iter(|| {
                out.clear();
                codec::encode(&packet, protocol, &mut out, None)
            })
        });
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
