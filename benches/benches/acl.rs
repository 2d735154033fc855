//! ACL decisions: the check a PUBLISH and a SUBSCRIBE pay on plain topics.

use chatmq_broker::access::Acl;
use chatmq_config::{Access, AclRule};
use criterion::{criterion_group, criterion_main, Criterion, Throughput};

fn rule(user: &str, topic: &str, access: Access) -> AclRule {
    AclRule {
        user: user.into(),
        topic: topic.into(),
        access,
    }
}

fn bench(c: &mut Criterion) {
    let acl = Acl::new(&[
        rule("*", "sensors/%u/#", Access::PubSub),
        rule("*", "devices/%c/state", Access::Pub),
        rule("*", "public/#", Access::Sub),
        rule("admin", "#", Access::PubSub),
        rule("*", "public/secret/#", Access::Deny),
    ]);
    let mut g = c.benchmark_group("acl");
    g.throughput(Throughput::Elements(1));
    g.bench_function("publish allowed", |b| {
        b.iter(|| acl.can_publish(Some("alice"), "phone-1", "sensors/alice/kitchen/temp"))
    });
    g.bench_function("publish refused", |b| {
        b.iter(|| acl.can_publish(Some("alice"), "phone-1", "sensors/bob/kitchen/temp"))
    });
    g.bench_function("subscribe with partial deny", |b| {
        b.iter(|| acl.can_subscribe(Some("alice"), "phone-1", "public/#"))
    });
    g.bench_function("receive check", |b| {
        b.iter(|| acl.can_receive(Some("alice"), "phone-1", "public/news/today"))
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
