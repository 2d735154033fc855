//! A program embeds chatmq through `chatmq_broker::embed`, and a real MQTT
//! client talks to it over TCP: what the program publishes in-process
//! reaches the client, what the client publishes reaches the program's
//! in-process subscriber, and the program's interceptor rejects or
//! rewrites the client's publishes before anyone receives them.

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use chatmq_broker::embed::{Client, Embedded, Listeners, Publication, Rejection, Verdict};
use chatmq_config::Settings;
use rumqttc::v5::mqttbytes::v5::{Filter, Packet, PubAckReason};
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::{AsyncClient, Event, EventLoop, MqttOptions};
use tokio::time::timeout;

const PATIENCE: Duration = Duration::from_secs(10);
/// How long "reaches nobody" is watched for.
const QUIET: Duration = Duration::from_millis(500);

/// A broker embedded with MQTT over TCP on a free port, no HTTP, anonymous
/// clients allowed everywhere, and the moderation interceptor: a payload
/// with "banned" is not authorized, one with "broken" fails (0x83), and
/// on `shout/...` the payload is upper-cased.
async fn start(dir: &tempfile::TempDir) -> Embedded {
    let config = format!(
        r##"
[node]
data_dir = "{}"
[mqtt]
listen = "127.0.0.1:0"
[auth]
allow_anonymous = true
[[acl.rules]]
user = "*"
topic = "#"
access = "pubsub"
"##,
        dir.path().join("data").display()
    );
    let settings = Settings::from_toml(&config).expect("settings");
    let listeners = Listeners {
        mqtt: true,
        http: false,
        edges: false,
    };
    let broker = Embedded::start(settings, listeners)
        .await
        .expect("the broker starts");
    assert_eq!(broker.http_addr(), None, "HTTP was not asked for");
    broker.register_interceptor(|p: &Publication<'_>| {
        let has = |word: &[u8]| p.payload.windows(word.len()).any(|w| w == word);
        if has(b"banned") {
            Verdict::Reject(Rejection::NotAuthorized)
        } else if has(b"broken") {
            Verdict::Reject(Rejection::ImplementationSpecificError)
        } else if p.topic.starts_with("shout/") {
            Verdict::Rewrite(Bytes::from(p.payload.to_ascii_uppercase()))
        } else {
            Verdict::Allow
        }
    });
    broker
}

/// A real MQTT 5 client over TCP, its event loop driven by the test.
struct Tcp {
    client: AsyncClient,
    events: EventLoop,
}

impl Tcp {
    async fn connect(addr: SocketAddr, id: &str) -> Tcp {
        let mut o = MqttOptions::new(id, addr.ip().to_string(), addr.port());
        o.set_keep_alive(Duration::from_secs(30));
        let (client, mut events) = AsyncClient::new(o, 100);
        loop {
            match timeout(PATIENCE, events.poll()).await {
                Ok(Ok(Event::Incoming(Packet::ConnAck(_)))) => break,
                Ok(Ok(_)) => {}
                other => panic!("no CONNACK: {other:?}"),
            }
        }
        Tcp { client, events }
    }

    /// The next packet the broker sends that `pick` selects.
    async fn next<T>(&mut self, mut pick: impl FnMut(Packet) -> Option<T>) -> T {
        let wait = async {
            loop {
                match self.events.poll().await {
                    Ok(Event::Incoming(p)) => {
                        if let Some(t) = pick(p) {
                            return t;
                        }
                    }
                    Ok(Event::Outgoing(_)) => {}
                    Err(e) => panic!("the TCP client lost its connection: {e}"),
                }
            }
        };
        timeout(PATIENCE, wait).await.expect("in time")
    }

    async fn subscribe(&mut self, filter: &str) {
        self.client
            .subscribe_many([Filter::new(filter, QoS::AtLeastOnce)])
            .await
            .expect("queued");
        self.next(|p| matches!(p, Packet::SubAck(_)).then_some(()))
            .await;
    }

    /// Publishes at QoS 1 and returns the PUBACK's reason code.
    async fn publish(&mut self, topic: &str, payload: &str) -> PubAckReason {
        self.client
            .publish(topic, QoS::AtLeastOnce, false, payload.to_string())
            .await
            .expect("queued");
        self.next(|p| match p {
            Packet::PubAck(a) => Some(a.reason),
            _ => None,
        })
        .await
    }

    /// The next message delivered: (topic, payload).
    async fn message(&mut self) -> (String, String) {
        self.next(|p| match p {
            Packet::Publish(m) => Some((
                String::from_utf8_lossy(&m.topic).into_owned(),
                String::from_utf8_lossy(&m.payload).into_owned(),
            )),
            _ => None,
        })
        .await
    }

    /// No message arrives for a while (the connection stays up).
    async fn quiet(&mut self) {
        let wait = async {
            loop {
                match self.events.poll().await {
                    Ok(Event::Incoming(Packet::Publish(m))) => return Some(m),
                    Ok(_) => {}
                    Err(e) => panic!("the TCP client lost its connection: {e}"),
                }
            }
        };
        if let Ok(Some(m)) = timeout(QUIET, wait).await {
            panic!("a message arrived: {m:?}");
        }
    }
}

async fn received(sub: &mut Client) -> (String, Bytes) {
    let d = timeout(PATIENCE, sub.recv())
        .await
        .expect("in time")
        .expect("the in-process session is up");
    (d.topic, d.payload)
}

/// A program may keep the broker in an `Arc` and use it from any task.
#[test]
fn the_handles_can_be_shared_across_tasks() {
    fn shared<T: Send + Sync>() {}
    shared::<Embedded>();
    shared::<Client>();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_in_process_subscriber_receives_what_a_tcp_client_publishes() {
    let dir = tempfile::tempdir().expect("temp dir");
    let broker = start(&dir).await;
    let mut watcher = broker.subscribe("#").await.expect("subscribed");
    let mut alice = Tcp::connect(broker.mqtt_addr().expect("listening"), "alice").await;

    let reason = alice.publish("rooms/lobby", "hello from tcp").await;
    assert_eq!(reason, PubAckReason::Success);
    let got = received(&mut watcher).await;
    assert_eq!(got, ("rooms/lobby".into(), Bytes::from("hello from tcp")));
    assert_eq!(watcher.dropped(), 0);
    broker.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_in_process_publish_reaches_a_tcp_client() {
    let dir = tempfile::tempdir().expect("temp dir");
    let broker = start(&dir).await;
    let mut bob = Tcp::connect(broker.mqtt_addr().expect("listening"), "bob").await;
    bob.subscribe("news/#").await;

    broker
        .publish("news/today", "from the program", QoS::AtLeastOnce)
        .await
        .expect("acknowledged");
    assert_eq!(
        bob.message().await,
        ("news/today".into(), "from the program".into())
    );
    broker.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_interceptor_rejects_a_banned_publish_and_it_reaches_nobody() {
    let dir = tempfile::tempdir().expect("temp dir");
    let broker = start(&dir).await;
    let addr = broker.mqtt_addr().expect("listening");
    let mut watcher = broker.subscribe("#").await.expect("subscribed");
    let mut bob = Tcp::connect(addr, "bob").await;
    bob.subscribe("rooms/#").await;
    let mut alice = Tcp::connect(addr, "alice").await;

    let reason = alice.publish("rooms/lobby", "a banned word").await;
    assert_eq!(reason, PubAckReason::NotAuthorized);
    let reason = alice.publish("rooms/lobby", "a broken one").await;
    assert_eq!(reason, PubAckReason::ImplementationSpecificError);
    bob.quiet().await;
    assert!(
        watcher.try_recv().is_none(),
        "the in-process subscriber got a rejected publish"
    );

    // Still connected, and a clean message goes through to both.
    assert_eq!(
        alice.publish("rooms/lobby", "all fine").await,
        PubAckReason::Success
    );
    assert_eq!(
        bob.message().await,
        ("rooms/lobby".into(), "all fine".into())
    );
    assert_eq!(received(&mut watcher).await.1, Bytes::from("all fine"));

    // An in-process publish goes through the interceptor as well.
    let refused = broker
        .publish("rooms/lobby", "banned here too", QoS::AtLeastOnce)
        .await;
    assert!(
        matches!(
            refused,
            Err(chatmq_broker::embed::EmbedError::PublishRefused(
                PubAckReason::NotAuthorized
            ))
        ),
        "{refused:?}"
    );
    bob.quiet().await;
    broker.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rewrite_verdict_delivers_the_rewritten_payload() {
    let dir = tempfile::tempdir().expect("temp dir");
    let broker = start(&dir).await;
    let addr = broker.mqtt_addr().expect("listening");
    let mut watcher = broker.subscribe("shout/#").await.expect("subscribed");
    let mut bob = Tcp::connect(addr, "bob").await;
    bob.subscribe("shout/#").await;
    let mut alice = Tcp::connect(addr, "alice").await;

    assert_eq!(
        alice.publish("shout/room", "quiet please").await,
        PubAckReason::Success
    );
    assert_eq!(
        bob.message().await,
        ("shout/room".into(), "QUIET PLEASE".into())
    );
    assert_eq!(received(&mut watcher).await.1, Bytes::from("QUIET PLEASE"));
    broker.shutdown().await;
}

/// QoS 0 reaches an in-process subscriber through its session's inbox, in
/// the order sent, from TCP and from another in-process client.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qos0_reaches_an_in_process_subscriber_in_order() {
    let dir = tempfile::tempdir().expect("temp dir");
    let broker = start(&dir).await;
    let mut watcher = broker.client(None).await.expect("a client");
    watcher
        .subscribe("q0/#", QoS::AtMostOnce)
        .await
        .expect("subscribed");
    let mut alice = Tcp::connect(broker.mqtt_addr().expect("listening"), "alice").await;
    for i in 0..20 {
        alice
            .client
            .publish("q0/b", QoS::AtMostOnce, false, i.to_string())
            .await
            .expect("queued");
    }
    // Drives alice's event loop until her last publish is written.
    let _ = alice.publish("elsewhere", "done").await;
    for i in 0..20 {
        assert_eq!(
            received(&mut watcher).await,
            ("q0/b".into(), Bytes::from(i.to_string()))
        );
    }
    let sender = broker.client(None).await.expect("a client");
    for i in 0..20 {
        sender
            .publish("q0/a", i.to_string(), QoS::AtMostOnce)
            .await
            .expect("sent");
    }
    for i in 0..20 {
        assert_eq!(
            received(&mut watcher).await,
            ("q0/a".into(), Bytes::from(i.to_string()))
        );
    }
    broker.shutdown().await;
}
