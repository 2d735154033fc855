//! The channel state machine fed with packets alone: no socket, a real
//! broker and store in a temp dir. Each test plays what a client would send
//! and checks what it would be answered (`take_output`) and what a session
//! would receive (`poll_deliveries`). Two channels in one test are a
//! publisher and a subscriber.

use rumqttc::v5::mqttbytes::v5::*;
use rumqttc::v5::mqttbytes::QoS;

use support::*;

use crate::access::Identity;
use crate::broker::Kick;
use crate::channel::{Close, Out};
use crate::codec::Protocol::{V4, V5};

/// Builds brokers, channels and packets so the tests read as conversations.
mod support {
    use std::sync::Arc;
    use std::time::Duration;

    use chatmq_config::{Access, AclRule, Settings, User};
    use chatmq_storage::{Store, SyncMode};
    use rumqttc::v5::mqttbytes::v5::*;
    use rumqttc::v5::mqttbytes::QoS;
    use tempfile::TempDir;
    use tokio::sync::oneshot;

    use crate::access::{Authenticator, Identity, Refusal};
    use crate::broker::{Broker, Kick};
    use crate::channel::{Channel, Close, Out};
    use crate::codec::Protocol::{self, V5};
    use crate::session::Outbound;

    pub struct Fixture {
        pub broker: Arc<Broker>,
        _dir: TempDir,
    }

    /// Anonymous access on, a static user `alice`/`pw`, every topic allowed
    /// except `secret/#`.
    pub fn broker() -> Fixture {
        broker_with(|_| {})
    }

    pub fn broker_with(adjust: impl FnOnce(&mut Settings)) -> Fixture {
        let dir = tempfile::tempdir().expect("temp dir");
        let mut settings = Settings::default();
        settings.node.data_dir = dir.path().to_path_buf();
        settings.auth.allow_anonymous = true;
        settings.auth.users = vec![User {
            name: "alice".into(),
            password: "pw".into(),
        }];
        settings.acl.rules = vec![
            AclRule {
                user: "*".into(),
                topic: "#".into(),
                access: Access::PubSub,
            },
            AclRule {
                user: "*".into(),
                topic: "secret/#".into(),
                access: Access::Deny,
            },
        ];
        adjust(&mut settings);
        let store = Store::open(dir.path(), SyncMode::Never, Duration::from_millis(100))
            .expect("store opens");
        let auth = Authenticator::new(&settings.auth).expect("authenticator");
        let broker = Broker::new(Arc::new(settings), store, auth).expect("broker");
        Fixture { broker, _dir: dir }
    }

    /// A connected client: its channel, the CONNACK it got, what was resent
    /// after the CONNACK, and the receiver a takeover fires.
    pub struct Client {
        pub channel: Channel,
        pub connack: ConnAck,
        pub resent: Vec<Packet>,
        pub kicked: oneshot::Receiver<Kick>,
    }

    impl Fixture {
        pub fn channel(&self) -> Channel {
            Channel::new(self.broker.clone(), self.broker.next_id())
        }

        /// CONNECT with the given authentication result; the refusal is the
        /// CONNACK and how the connection closes.
        pub async fn try_connect(
            &self,
            protocol: Protocol,
            connect: Connect,
            will: Option<LastWill>,
            auth: Result<Identity, Refusal>,
        ) -> Result<Client, (ConnAck, Close)> {
            let mut channel = self.channel();
            let result = channel.connect(protocol, connect, will, auth).await;
            let mut packets = answers(&mut channel).await.into_iter();
            let connack = match packets.next() {
                Some(Packet::ConnAck(c)) => c,
                other => panic!("expected CONNACK first, got {other:?}"),
            };
            match result {
                Ok(kicked) => Ok(Client {
                    channel,
                    connack,
                    resent: packets.collect(),
                    kicked,
                }),
                Err(close) => Err((connack, close)),
            }
        }

        /// An anonymous CONNECT that must succeed.
        pub async fn connect(&self, protocol: Protocol, connect: Connect) -> Client {
            self.connect_with_will(protocol, connect, None).await
        }

        pub async fn connect_with_will(
            &self,
            protocol: Protocol,
            connect: Connect,
            will: Option<LastWill>,
        ) -> Client {
            let client = self
                .try_connect(protocol, connect, will, Ok(Identity::Anonymous))
                .await
                .unwrap_or_else(|(ack, _)| panic!("refused: {ack:?}"));
            assert_eq!(client.connack.code, ConnectReturnCode::Success);
            client
        }

        /// A clean MQTT 5 client subscribed to `filter` at `qos`.
        pub async fn subscriber(&self, client_id: &str, filter: &str, qos: QoS) -> Client {
            let mut c = self.connect(V5, connect(client_id, true)).await;
            let codes = c.subscribe(vec![Filter::new(filter, qos)], None).await;
            assert_eq!(codes, [SubscribeReasonCode::Success(qos)]);
            c
        }
    }

    /// Takes the channel's output in order, awaiting each commit the way
    /// the connection does before it writes the ack.
    pub async fn answers(channel: &mut Channel) -> Vec<Packet> {
        let mut packets = Vec::new();
        for out in channel.take_output() {
            match out {
                Out::Now(p) => packets.push(p),
                Out::AfterCommit(commit, p) => {
                    commit.await.expect("commit succeeds");
                    if matches!(p, Packet::PubAck(_)) {
                        channel.puback_sent();
                    }
                    packets.push(p);
                }
            }
        }
        packets
    }

    impl Client {
        /// Handles a packet that must keep the connection open; returns the
        /// answers.
        pub async fn send(&mut self, packet: Packet) -> Vec<Packet> {
            if let Err(close) = self.channel.handle(packet).await {
                panic!("unexpected close: {close:?}");
            }
            answers(&mut self.channel).await
        }

        /// Handles a packet that must end the connection.
        pub async fn send_closing(&mut self, packet: Packet) -> Close {
            match self.channel.handle(packet).await {
                Err(close) => close,
                Ok(()) => panic!("the connection stayed open"),
            }
        }

        pub async fn publish(&mut self, p: Publish) -> Vec<Packet> {
            self.send(Packet::Publish(p)).await
        }

        pub async fn subscribe(
            &mut self,
            filters: Vec<Filter>,
            id: Option<usize>,
        ) -> Vec<SubscribeReasonCode> {
            let properties = id.map(|id| SubscribeProperties {
                id: Some(id),
                user_properties: vec![],
            });
            let mut sub = Subscribe::new_many(filters, properties);
            sub.pkid = 1;
            match self.send(Packet::Subscribe(sub)).await.as_slice() {
                [Packet::SubAck(ack)] => {
                    assert_eq!(ack.pkid, 1);
                    ack.return_codes.clone()
                }
                other => panic!("expected one SUBACK, got {other:?}"),
            }
        }

        /// What the session delivers now.
        pub async fn received(&mut self) -> Vec<Publish> {
            let mut packets = Vec::new();
            let mut queued = Vec::new();
            // QoS 0 to a connected session with nothing queued waits in
            // its inbox, which the connection task writes out first
            // (`Connection::deliver_inbox`).
            for p in self.channel.poll_deliveries(&mut queued).await {
                packets.push(Packet::Publish(p.to_publish()));
            }
            packets.extend(queued.into_iter().map(Outbound::into_packet));
            packets
                .into_iter()
                .map(|p| match p {
                    Packet::Publish(p) => p,
                    other => panic!("a delivery that is not a PUBLISH: {other:?}"),
                })
                .collect()
        }
    }

    impl Client {
        /// Plays the old connection of a takeover: waits to be told, ends
        /// as `close` (after whatever it still had to read), and lets the
        /// new connection attach, as `connection::serve` does.
        pub async fn closes_on_takeover(&mut self, close: Close) {
            match (&mut self.kicked).await {
                Ok(Kick::TakenOver { closed }) => {
                    self.channel.close(close).await;
                    drop(closed);
                }
                Err(_) => panic!("the old connection was not told of the takeover"),
            }
        }
    }

    /// Stops the store's writer: every commit from now on fails, as a
    /// failing disk would make it.
    pub async fn fail_commits(fx: &Fixture) {
        let store = fx.broker.store.clone();
        tokio::task::spawn_blocking(move || store.close())
            .await
            .expect("writer stops");
    }

    /// The connection ended without DISCONNECT (network loss).
    pub fn lost() -> Close {
        Close {
            reason: None,
            will: true,
        }
    }

    pub fn connect(client_id: &str, clean_start: bool) -> Connect {
        Connect {
            keep_alive: 30,
            client_id: client_id.into(),
            clean_start,
            properties: None,
        }
    }

    /// An MQTT 5 CONNECT with a Session Expiry Interval.
    pub fn persistent(client_id: &str, clean_start: bool, expiry_secs: u32) -> Connect {
        let mut props = ConnectProperties::new();
        props.session_expiry_interval = Some(expiry_secs);
        Connect {
            properties: Some(props),
            ..connect(client_id, clean_start)
        }
    }

    pub fn publish(topic: &str, qos: QoS, pkid: u16, payload: &'static [u8]) -> Publish {
        let mut p = Publish::new(topic, qos, payload, None);
        p.pkid = pkid;
        p
    }

    pub fn with_alias(mut p: Publish, alias: u16) -> Publish {
        p.properties = Some(PublishProperties {
            topic_alias: Some(alias),
            ..Default::default()
        });
        p
    }

    pub fn payloads(received: &[Publish]) -> Vec<&[u8]> {
        received.iter().map(|p| &p.payload[..]).collect()
    }
}

// ---- CONNECT -------------------------------------------------------------

// [MQTT-3.2.2-2] Clean Start 1 answers Session Present 0; [MQTT-3.2.2-3] a
// resumed session answers Session Present 1.
#[tokio::test]
async fn session_present_says_whether_a_session_was_resumed() {
    let fx = broker();
    let mut first = fx.connect(V5, persistent("phone", false, 60)).await;
    assert!(!first.connack.session_present, "nothing to resume yet");
    first.channel.close(lost()).await;

    let mut again = fx.connect(V5, persistent("phone", false, 60)).await;
    assert!(again.connack.session_present);
    again.channel.close(lost()).await;

    let fresh = fx.connect(V5, persistent("phone", true, 60)).await;
    assert!(!fresh.connack.session_present, "Clean Start discards it");
}

// A session with expiry 0 ends with its connection: nothing to resume.
#[tokio::test]
async fn a_session_without_expiry_is_not_resumed() {
    let fx = broker();
    let mut first = fx.connect(V5, connect("tmp", false)).await;
    first.channel.close(lost()).await;
    assert!(fx.broker.session("tmp").is_none());
    let again = fx.connect(V5, connect("tmp", false)).await;
    assert!(!again.connack.session_present);
}

// MQTT 3.1.1: clean_session 0 resumes [MQTT-3.2.2-2 of 3.1.1], 1 does not.
#[tokio::test]
async fn v4_clean_session_0_resumes() {
    let fx = broker();
    let mut first = fx.connect(V4, connect("old", false)).await;
    assert!(!first.connack.session_present);
    assert_eq!(first.connack.properties, None, "3.1.1 has no properties");
    first.channel.close(lost()).await;
    let again = fx.connect(V4, connect("old", false)).await;
    assert!(again.connack.session_present);
}

// [MQTT-3.1.3-6], [MQTT-3.2.2-16] an empty client id gets one assigned and
// announced in Assigned Client Identifier.
#[tokio::test]
async fn v5_empty_client_id_is_assigned_one() {
    let fx = broker();
    let a = fx.connect(V5, connect("", true)).await;
    let b = fx.connect(V5, connect("", true)).await;
    let assigned = |c: &Client| {
        c.connack
            .properties
            .as_ref()
            .and_then(|p| p.assigned_client_identifier.clone())
            .expect("Assigned Client Identifier")
    };
    assert!(!assigned(&a).is_empty());
    assert_eq!(a.channel.client_id(), assigned(&a));
    assert_ne!(assigned(&a), assigned(&b), "each client gets its own");
}

// [MQTT-3.1.3-8] 3.1.1: an empty client id with clean_session 0 is refused
// with 0x02 (Identifier rejected); with clean_session 1 it is accepted.
#[tokio::test]
async fn v4_empty_client_id_needs_clean_session() {
    let fx = broker();
    let (ack, close) = fx
        .try_connect(V4, connect("", false), None, Ok(Identity::Anonymous))
        .await
        .err()
        .expect("refused");
    assert_eq!(ack.code, ConnectReturnCode::ClientIdentifierNotValid);
    assert!(!ack.session_present);
    assert_eq!(
        close,
        Close {
            reason: None,
            will: false
        }
    );
    assert_eq!(fx.broker.session_count(), 0, "no session was created");

    let ok = fx.connect(V4, connect("", true)).await;
    assert!(!ok.channel.client_id().is_empty());
}

// [MQTT-3.1.4-2] a refused CONNECT gets a CONNACK with the reason and no
// session: wrong password -> Bad User Name or Password (0x86 / 3.1.1 0x04),
// no credentials with anonymous off -> Not Authorized (0x87 / 0x05).
#[tokio::test]
async fn bad_credentials_are_refused() {
    let fx = broker_with(|s| s.auth.allow_anonymous = false);
    let auth = &fx.broker.auth;

    let wrong = auth.authenticate(Some("alice"), Some(b"nope"));
    let (ack, _) = fx
        .try_connect(V5, connect("a1", true), None, wrong)
        .await
        .err()
        .expect("refused");
    assert_eq!(ack.code, ConnectReturnCode::BadUserNamePassword);

    let anonymous = auth.authenticate(None, None);
    let (ack, _) = fx
        .try_connect(V4, connect("a2", true), None, anonymous)
        .await
        .err()
        .expect("refused");
    assert_eq!(ack.code, ConnectReturnCode::NotAuthorized);
    assert_eq!(fx.broker.session_count(), 0);

    let right = auth.authenticate(Some("alice"), Some(b"pw"));
    assert_eq!(right, Ok(Identity::User("alice".into())));
    let Ok(ok) = fx.try_connect(V5, connect("a3", true), None, right).await else {
        panic!("refused");
    };
    assert_eq!(ok.connack.code, ConnectReturnCode::Success);
}

// A client id belongs to the first user who used it (ARCHITECTURE.md).
#[tokio::test]
async fn another_users_client_id_is_refused() {
    let fx = broker();
    let alice = Ok(Identity::User("alice".into()));
    let Ok(mut first) = fx
        .try_connect(V5, connect("alices-phone", true), None, alice)
        .await
    else {
        panic!("refused");
    };
    first.channel.close(lost()).await;
    let bob = Ok(Identity::User("bob".into()));
    let (ack, _) = fx
        .try_connect(V5, connect("alices-phone", true), None, bob)
        .await
        .err()
        .expect("refused");
    assert_eq!(ack.code, ConnectReturnCode::NotAuthorized);
}

// ---- PUBLISH from the client ---------------------------------------------

// Ack means on disk: a QoS 1 PUBACK is only due once the commit of the
// writes the message caused resolves [MQTT-4.3.2-2 (PUBACK carries the id)].
#[tokio::test]
async fn qos1_puback_waits_for_the_commit() {
    let fx = broker();
    let mut sub = fx.connect(V5, persistent("sub", true, 60)).await;
    sub.subscribe(vec![Filter::new("q1/t", QoS::AtLeastOnce)], None)
        .await;
    let mut publisher = fx.connect(V5, connect("pub", true)).await;

    publisher
        .channel
        .handle(Packet::Publish(publish("q1/t", QoS::AtLeastOnce, 7, b"hi")))
        .await
        .expect("accepted");
    let mut out = publisher.channel.take_output();
    assert_eq!(out.len(), 1, "one answer");
    match out.pop() {
        Some(Out::AfterCommit(commit, Packet::PubAck(ack))) => {
            assert_eq!(ack.pkid, 7);
            assert_eq!(ack.reason, PubAckReason::Success);
            commit.await.expect("the commit resolves, the ack is due");
        }
        Some(Out::Now(p)) => panic!("acked before the commit: {p:?}"),
        _ => panic!("expected a PUBACK after the commit"),
    }
    assert_eq!(payloads(&sub.received().await), [b"hi"]);
}

// Issue #11 item 1: QoS 1 to a connected persistent session is staged in
// its inbox, not queued under its lock. A thread holds the subscriber's
// session lock while three messages are published: each is acknowledged
// (after its commit) while the lock is still held, each is on disk in the
// session's outbox by then, and the subscriber gets all three once, in
// order, with packet ids 1, 2, 3, when it next looks.
#[tokio::test]
async fn a_publisher_is_not_held_up_by_a_subscribers_session_lock() {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    let fx = broker();
    let mut sub = fx.connect(V5, persistent("sub", true, 60)).await;
    sub.subscribe(vec![Filter::new("lk/t", QoS::AtLeastOnce)], None)
        .await;
    let mut publisher = fx.connect(V5, connect("pub", true)).await;
    let cell = fx.broker.session("sub").expect("the session");

    let holding = Arc::new(AtomicBool::new(false));
    let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
    let (locked_tx, locked_rx) = std::sync::mpsc::channel::<()>();
    let holder = {
        let (cell, holding) = (cell.clone(), holding.clone());
        std::thread::spawn(move || {
            let slot = cell.lock();
            holding.store(true, Ordering::SeqCst);
            let _ = locked_tx.send(());
            // Until the publisher is done, or long enough for a broken
            // broker's publisher to get through after it and fail below.
            let _ = done_rx.recv_timeout(std::time::Duration::from_secs(10));
            holding.store(false, Ordering::SeqCst);
            drop(slot);
        })
    };
    locked_rx.recv().expect("the lock is held");
    for (pkid, body) in [(1u16, b"m1"), (2, b"m2"), (3, b"m3")] {
        publisher
            .channel
            .handle(Packet::Publish(publish(
                "lk/t",
                QoS::AtLeastOnce,
                pkid,
                body,
            )))
            .await
            .expect("accepted");
        let acks = answers(&mut publisher.channel).await;
        assert!(
            matches!(acks.as_slice(), [Packet::PubAck(a)] if a.pkid == pkid),
            "{acks:?}"
        );
        assert!(
            holding.load(Ordering::SeqCst),
            "acked only after the subscriber's lock was released"
        );
    }
    let stored = fx.broker.store.load_sessions().expect("load");
    let outbox = &stored
        .iter()
        .find(|s| s.client_id == "sub")
        .expect("stored session")
        .outbox;
    assert_eq!(outbox.len(), 3, "each is on disk before its PUBACK");
    let _ = done_tx.send(());
    holder.join().expect("holder");

    let got = sub.received().await;
    assert_eq!(payloads(&got), [b"m1", b"m2", b"m3"]);
    assert_eq!(got.iter().map(|p| p.pkid).collect::<Vec<_>>(), [1, 2, 3]);
    assert!(sub.received().await.is_empty(), "once");
}

// [MQTT-4.3.3-10] until PUBREL, a resent QoS 2 PUBLISH with the same packet
// id gets PUBREC again and is not delivered twice; [MQTT-4.3.3-11] PUBREL
// gets PUBCOMP; afterwards the id is free for a new message.
#[tokio::test]
async fn qos2_inbound_flow_delivers_once() {
    let fx = broker();
    let mut sub = fx.subscriber("sub", "q2/t", QoS::ExactlyOnce).await;
    let mut publisher = fx.connect(V5, connect("pub", true)).await;

    let p = publish("q2/t", QoS::ExactlyOnce, 5, b"once");
    publisher
        .channel
        .handle(Packet::Publish(p.clone()))
        .await
        .expect("accepted");
    assert!(
        matches!(
            publisher.channel.take_output().as_slice(),
            [Out::AfterCommit(_, Packet::PubRec(r))] if r.pkid == 5 && r.reason == PubRecReason::Success
        ),
        "PUBREC waits for the commit"
    );
    assert_eq!(sub.received().await.len(), 1);

    let mut resent = p.clone();
    resent.dup = true;
    assert_eq!(
        publisher.publish(resent).await,
        [Packet::PubRec(PubRec::new(5, None))]
    );
    assert!(sub.received().await.is_empty(), "not routed twice");

    assert_eq!(
        publisher.send(Packet::PubRel(PubRel::new(5, None))).await,
        [Packet::PubComp(PubComp::new(5, None))]
    );

    publisher.publish(p).await;
    assert_eq!(sub.received().await.len(), 1, "id 5 is a new message now");
}

// MQTT 5: PUBREL for an id the broker does not hold gets PUBCOMP 0x92
// (Packet Identifier not found); 3.1.1 has no reason codes.
#[tokio::test]
async fn pubrel_for_an_unknown_id_gets_0x92() {
    let fx = broker();
    let mut v5 = fx.connect(V5, connect("five", true)).await;
    match v5
        .send(Packet::PubRel(PubRel::new(42, None)))
        .await
        .as_slice()
    {
        [Packet::PubComp(c)] => {
            assert_eq!(c.pkid, 42);
            assert_eq!(c.reason, PubCompReason::PacketIdentifierNotFound);
        }
        other => panic!("expected PUBCOMP, got {other:?}"),
    }
    let mut v4 = fx.connect(V4, connect("four", true)).await;
    assert_eq!(
        v4.send(Packet::PubRel(PubRel::new(42, None))).await,
        [Packet::PubComp(PubComp::new(42, None))]
    );
}

// ---- delivery to subscribers ---------------------------------------------

// [MQTT-4.3.3-1 .. -9] outgoing QoS 2: PUBLISH, client PUBREC -> PUBREL,
// client PUBCOMP ends it; a PUBREC for an unknown id gets PUBREL 0x92.
#[tokio::test]
async fn outgoing_qos2_flow() {
    let fx = broker();
    let mut sub = fx.subscriber("sub", "out/t", QoS::ExactlyOnce).await;
    let mut publisher = fx.connect(V5, connect("pub", true)).await;
    publisher
        .publish(publish("out/t", QoS::ExactlyOnce, 1, b"x"))
        .await;

    let got = sub.received().await;
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].qos, QoS::ExactlyOnce);
    assert!(!got[0].dup);
    let id = got[0].pkid;
    assert_ne!(id, 0);

    assert_eq!(
        sub.send(Packet::PubRec(PubRec::new(id, None))).await,
        [Packet::PubRel(PubRel::new(id, None))]
    );
    let pending = |c: &Client| {
        c.channel
            .session()
            .expect("session")
            .lock()
            .session
            .pending()
    };
    assert_eq!(pending(&sub), 1, "PUBREL still owed");

    assert!(sub
        .send(Packet::PubComp(PubComp::new(id, None)))
        .await
        .is_empty());
    assert_eq!(pending(&sub), 0, "delivery complete");

    match sub
        .send(Packet::PubRec(PubRec::new(id, None)))
        .await
        .as_slice()
    {
        [Packet::PubRel(r)] => assert_eq!(r.reason, PubRelReason::PacketIdentifierNotFound),
        other => panic!("expected PUBREL, got {other:?}"),
    }
}

// [MQTT-3.8.4-8] delivered at the minimum of the publish and subscription QoS.
#[tokio::test]
async fn delivery_qos_is_the_lower_of_publish_and_subscription() {
    let fx = broker();
    let mut one = fx.subscriber("one", "m/t", QoS::AtLeastOnce).await;
    let mut two = fx.subscriber("two", "m/t", QoS::ExactlyOnce).await;
    let mut publisher = fx.connect(V5, connect("pub", true)).await;

    publisher
        .publish(publish("m/t", QoS::ExactlyOnce, 1, b"a"))
        .await;
    publisher
        .publish(publish("m/t", QoS::AtMostOnce, 0, b"b"))
        .await;
    publisher
        .publish(publish("m/t", QoS::AtLeastOnce, 2, b"c"))
        .await;

    let qos = |r: Vec<Publish>| r.iter().map(|p| p.qos).collect::<Vec<_>>();
    assert_eq!(
        qos(one.received().await),
        [QoS::AtLeastOnce, QoS::AtMostOnce, QoS::AtLeastOnce]
    );
    assert_eq!(
        qos(two.received().await),
        [QoS::ExactlyOnce, QoS::AtMostOnce, QoS::AtLeastOnce]
    );
}

// [MQTT-3.8.3-3] No Local: a client does not get its own messages back on
// that subscription; others still do.
#[tokio::test]
async fn no_local_skips_the_publisher() {
    let fx = broker();
    let mut me = fx.connect(V5, connect("me", true)).await;
    let mut filter = Filter::new("room/1", QoS::AtLeastOnce);
    filter.nolocal = true;
    me.subscribe(vec![filter], None).await;
    let mut other = fx.subscriber("other", "room/1", QoS::AtLeastOnce).await;

    me.publish(publish("room/1", QoS::AtLeastOnce, 1, b"hello"))
        .await;
    assert!(me.received().await.is_empty());
    assert_eq!(payloads(&other.received().await), [b"hello"]);

    other
        .publish(publish("room/1", QoS::AtLeastOnce, 1, b"back"))
        .await;
    assert_eq!(payloads(&me.received().await), [b"back"]);
}

// [MQTT-3.3.1-12] live deliveries clear RETAIN unless [MQTT-3.3.1-13]
// Retain As Published keeps it as the publisher set it.
#[tokio::test]
async fn retain_as_published() {
    let fx = broker();
    let mut kept = fx.connect(V5, connect("kept", true)).await;
    let mut filter = Filter::new("rap/t", QoS::AtMostOnce);
    filter.preserve_retain = true;
    kept.subscribe(vec![filter], None).await;
    let mut plain = fx.subscriber("plain", "rap/t", QoS::AtMostOnce).await;
    let mut publisher = fx.connect(V5, connect("pub", true)).await;

    let mut p = publish("rap/t", QoS::AtMostOnce, 0, b"state");
    p.retain = true;
    publisher.publish(p).await;
    publisher
        .publish(publish("rap/t", QoS::AtMostOnce, 0, b"live"))
        .await;

    let flags = |r: Vec<Publish>| r.iter().map(|p| p.retain).collect::<Vec<_>>();
    assert_eq!(flags(kept.received().await), [true, false]);
    assert_eq!(flags(plain.received().await), [false, false]);
}

// A retained message goes to a new subscription with RETAIN set; Retain
// Handling 0 sends it on every subscribe [MQTT-3.3.1-9], 1 only when the
// subscription is new [MQTT-3.3.1-10], 2 never [MQTT-3.3.1-11].
#[tokio::test]
async fn retained_message_on_subscribe_follows_retain_handling() {
    let fx = broker();
    let mut publisher = fx.connect(V5, connect("pub", true)).await;
    let mut p = publish("r/t", QoS::AtLeastOnce, 1, b"last");
    p.retain = true;
    publisher.publish(p).await;

    let mut always = fx.connect(V5, connect("always", true)).await;
    always
        .subscribe(vec![Filter::new("r/#", QoS::AtLeastOnce)], None)
        .await;
    let got = always.received().await;
    assert_eq!(payloads(&got), [b"last"]);
    assert!(got[0].retain, "sent because of the subscription: RETAIN 1");
    assert_eq!(got[0].qos, QoS::AtLeastOnce);
    always
        .subscribe(vec![Filter::new("r/#", QoS::AtLeastOnce)], None)
        .await;
    assert_eq!(always.received().await.len(), 1, "again on re-subscribe");

    let mut new_only = fx.connect(V5, connect("new-only", true)).await;
    let mut filter = Filter::new("r/#", QoS::AtLeastOnce);
    filter.retain_forward_rule = RetainForwardRule::OnNewSubscribe;
    new_only.subscribe(vec![filter.clone()], None).await;
    assert_eq!(new_only.received().await.len(), 1);
    new_only.subscribe(vec![filter], None).await;
    assert!(
        new_only.received().await.is_empty(),
        "not for an existing one"
    );

    let mut never = fx.connect(V5, connect("never", true)).await;
    let mut filter = Filter::new("r/#", QoS::AtLeastOnce);
    filter.retain_forward_rule = RetainForwardRule::Never;
    never.subscribe(vec![filter], None).await;
    assert!(never.received().await.is_empty());
}

// [MQTT-3.3.4-3], [MQTT-3.3.4-4] one copy per client carrying the
// identifiers of every matching subscription; none when none was given.
#[tokio::test]
async fn subscription_identifiers_come_with_the_delivery() {
    let fx = broker();
    let mut sub = fx.connect(V5, connect("sub", true)).await;
    sub.subscribe(vec![Filter::new("id/+", QoS::AtLeastOnce)], Some(7))
        .await;
    sub.subscribe(vec![Filter::new("id/#", QoS::AtMostOnce)], Some(9))
        .await;
    sub.subscribe(vec![Filter::new("plain/t", QoS::AtMostOnce)], None)
        .await;
    let mut publisher = fx.connect(V5, connect("pub", true)).await;
    publisher
        .publish(publish("id/x", QoS::AtLeastOnce, 1, b"a"))
        .await;
    publisher
        .publish(publish("plain/t", QoS::AtMostOnce, 0, b"b"))
        .await;

    let got = sub.received().await;
    assert_eq!(got.len(), 2, "one copy per matching message");
    let mut ids = got[0]
        .properties
        .as_ref()
        .expect("properties")
        .subscription_identifiers
        .clone();
    ids.sort();
    assert_eq!(ids, [7, 9]);
    assert_eq!(got[0].qos, QoS::AtLeastOnce, "highest matching QoS");
    let none = got[1]
        .properties
        .as_ref()
        .map(|p| p.subscription_identifiers.clone())
        .unwrap_or_default();
    assert!(none.is_empty());
}

// ---- limits and errors ---------------------------------------------------

// [MQTT-3.3.2-12] a Topic Alias maps to the topic it was first sent with;
// [MQTT-3.3.2-9] an alias above the Topic Alias Maximum we announced closes
// with 0x94; an alias never set, with an empty topic, is a protocol error.
#[tokio::test]
async fn topic_aliases() {
    let fx = broker_with(|s| s.mqtt.topic_alias_max = 4);
    let mut sub = fx.subscriber("sub", "alias/t", QoS::AtMostOnce).await;
    let mut publisher = fx.connect(V5, connect("pub", true)).await;
    let announced = publisher
        .connack
        .properties
        .as_ref()
        .unwrap()
        .topic_alias_max;
    assert_eq!(announced, Some(4));

    publisher
        .publish(with_alias(publish("alias/t", QoS::AtMostOnce, 0, b"1"), 4))
        .await;
    publisher
        .publish(with_alias(publish("", QoS::AtMostOnce, 0, b"2"), 4))
        .await;
    let got = sub.received().await;
    assert_eq!(payloads(&got), [b"1", b"2"]);
    assert!(got.iter().all(|p| &p.topic[..] == b"alias/t"));

    let close = publisher
        .send_closing(Packet::Publish(with_alias(
            publish("alias/t", QoS::AtMostOnce, 0, b"3"),
            5,
        )))
        .await;
    assert_eq!(close.reason, Some(DisconnectReasonCode::TopicAliasInvalid));
    assert!(close.will, "a protocol violation publishes the will");

    let mut other = fx.connect(V5, connect("other", true)).await;
    let close = other
        .send_closing(Packet::Publish(with_alias(
            publish("", QoS::AtMostOnce, 0, b"?"),
            2,
        )))
        .await;
    assert_eq!(close.reason, Some(DisconnectReasonCode::ProtocolError));
}

// MQTT 5 §3.3.4: more unacknowledged QoS 1/2 PUBLISHes than the Receive
// Maximum we announced closes with 0x93 (Receive Maximum exceeded).
#[tokio::test]
async fn receive_maximum_exceeded_closes_with_0x93() {
    let fx = broker_with(|s| s.mqtt.max_inflight = 2);
    let mut c = fx.connect(V5, connect("busy", true)).await;
    let announced = c.connack.properties.as_ref().unwrap().receive_max;
    assert_eq!(announced, Some(2));

    // Acked ones free the window.
    for pkid in 1..=4 {
        c.publish(publish("rm/t", QoS::AtLeastOnce, pkid, b"x"))
            .await;
    }
    // Two PUBACKs not yet written: the window is full.
    for pkid in 5..=6 {
        c.channel
            .handle(Packet::Publish(publish(
                "rm/t",
                QoS::AtLeastOnce,
                pkid,
                b"x",
            )))
            .await
            .expect("within the window");
    }
    let close = c
        .send_closing(Packet::Publish(publish("rm/t", QoS::AtLeastOnce, 7, b"x")))
        .await;
    assert_eq!(
        close.reason,
        Some(DisconnectReasonCode::ReceiveMaximumExceeded)
    );
}

// A payload above mqtt.max_payload is refused with 0x97 (Quota exceeded),
// not delivered; one at the limit goes through.
#[tokio::test]
async fn payload_over_max_payload_gets_0x97() {
    let fx = broker_with(|s| s.mqtt.max_payload = 8);
    let mut sub = fx.subscriber("sub", "big/t", QoS::AtLeastOnce).await;
    let mut publisher = fx.connect(V5, connect("pub", true)).await;

    match publisher
        .publish(publish("big/t", QoS::AtLeastOnce, 1, b"123456789"))
        .await
        .as_slice()
    {
        [Packet::PubAck(a)] => assert_eq!(a.reason, PubAckReason::QuotaExceeded),
        other => panic!("expected PUBACK, got {other:?}"),
    }
    match publisher
        .publish(publish("big/t", QoS::ExactlyOnce, 2, b"123456789"))
        .await
        .as_slice()
    {
        [Packet::PubRec(r)] => assert_eq!(r.reason, PubRecReason::QuotaExceeded),
        other => panic!("expected PUBREC, got {other:?}"),
    }
    assert!(sub.received().await.is_empty());

    assert_eq!(
        publisher
            .publish(publish("big/t", QoS::AtLeastOnce, 3, b"12345678"))
            .await,
        [Packet::PubAck(PubAck::new(3, None))]
    );
    assert_eq!(payloads(&sub.received().await), [b"12345678"]);
}

// The ACL refuses: PUBLISH -> PUBACK 0x87 (MQTT 5; 3.1.1 gets a plain ack,
// [MQTT-3.3.5-2]) and nothing is delivered; SUBSCRIBE -> SUBACK 0x87 for the
// refused filter only.
#[tokio::test]
async fn acl_refusals() {
    let fx = broker();
    let mut watcher = fx.subscriber("watcher", "#", QoS::AtLeastOnce).await;
    let mut c = fx.connect(V5, connect("c", true)).await;

    match c
        .publish(publish("secret/x", QoS::AtLeastOnce, 1, b"no"))
        .await
        .as_slice()
    {
        [Packet::PubAck(a)] => assert_eq!(a.reason, PubAckReason::NotAuthorized),
        other => panic!("expected PUBACK, got {other:?}"),
    }
    let mut old = fx.connect(V4, connect("old", true)).await;
    assert_eq!(
        old.publish(publish("secret/x", QoS::AtLeastOnce, 1, b"no"))
            .await,
        [Packet::PubAck(PubAck::new(1, None))]
    );
    assert!(watcher.received().await.is_empty());

    let codes = c
        .subscribe(
            vec![
                Filter::new("secret/#", QoS::AtLeastOnce),
                Filter::new("open/t", QoS::AtLeastOnce),
            ],
            None,
        )
        .await;
    assert_eq!(
        codes,
        [
            SubscribeReasonCode::NotAuthorized,
            SubscribeReasonCode::Success(QoS::AtLeastOnce)
        ]
    );
}

// [MQTT-4.7.1-2], [MQTT-4.7.1-3] a malformed filter gets SUBACK 0x8F for
// that filter; the others in the same SUBSCRIBE are granted.
#[tokio::test]
async fn invalid_filter_gets_0x8f() {
    let fx = broker();
    let mut c = fx.connect(V5, connect("c", true)).await;
    let codes = c
        .subscribe(
            vec![
                Filter::new("a/#/b", QoS::AtMostOnce),
                Filter::new("a+", QoS::AtMostOnce),
                Filter::new("$share/g", QoS::AtMostOnce),
                Filter::new("a/+", QoS::AtMostOnce),
            ],
            None,
        )
        .await;
    assert_eq!(
        codes,
        [
            SubscribeReasonCode::TopicFilterInvalid,
            SubscribeReasonCode::TopicFilterInvalid,
            SubscribeReasonCode::TopicFilterInvalid,
            SubscribeReasonCode::Success(QoS::AtMostOnce)
        ]
    );
}

// [MQTT-3.8.3-4] No Local on a shared subscription is a protocol error.
#[tokio::test]
async fn shared_subscription_with_no_local_is_a_protocol_error() {
    let fx = broker();
    let mut c = fx.connect(V5, connect("c", true)).await;
    let mut filter = Filter::new("$share/g/t", QoS::AtMostOnce);
    filter.nolocal = true;
    let close = c
        .send_closing(Packet::Subscribe(Subscribe::new(filter, None)))
        .await;
    assert_eq!(close.reason, Some(DisconnectReasonCode::ProtocolError));
}

// ---- DISCONNECT and wills ------------------------------------------------

fn disconnect_with_expiry(secs: u32) -> Packet {
    Packet::Disconnect(Disconnect {
        reason_code: DisconnectReasonCode::NormalDisconnection,
        properties: Some(DisconnectProperties {
            session_expiry_interval: Some(secs),
            reason_string: None,
            user_properties: vec![],
            server_reference: None,
        }),
    })
}

// [MQTT-3.14.2-2] a session that ends with its connection (expiry 0 at
// CONNECT) cannot be given an expiry at DISCONNECT.
#[tokio::test]
async fn disconnect_cannot_make_a_session_persistent() {
    let fx = broker();
    let mut c = fx.connect(V5, connect("c", true)).await;
    let close = c.send_closing(disconnect_with_expiry(60)).await;
    assert_eq!(close.reason, Some(DisconnectReasonCode::ProtocolError));
}

// The other way is allowed: DISCONNECT with expiry 0 ends a persistent
// session with the connection.
#[tokio::test]
async fn disconnect_can_end_a_persistent_session() {
    let fx = broker();
    let mut c = fx.connect(V5, persistent("c", true, 60)).await;
    let close = c.send_closing(disconnect_with_expiry(0)).await;
    assert_eq!(close.reason, None);
    c.channel.close(close).await;
    assert!(fx.broker.session("c").is_none());
}

fn will(topic: &str) -> Option<LastWill> {
    Some(LastWill::new(
        topic,
        b"gone".to_vec(),
        QoS::AtLeastOnce,
        false,
        None,
    ))
}

// [MQTT-3.14.4-3] a normal DISCONNECT discards the will; 0x04 (Disconnect
// with Will Message) keeps it and it is published when the connection ends.
#[tokio::test]
async fn disconnect_decides_whether_the_will_is_published() {
    let fx = broker();
    let mut watcher = fx.subscriber("watcher", "wills/#", QoS::AtLeastOnce).await;

    let mut polite = fx
        .connect_with_will(V5, connect("polite", true), will("wills/polite"))
        .await;
    let close = polite
        .send_closing(Packet::Disconnect(Disconnect::new(
            DisconnectReasonCode::NormalDisconnection,
        )))
        .await;
    assert_eq!(
        close,
        Close {
            reason: None,
            will: false
        }
    );
    polite.channel.close(close).await;
    assert!(watcher.received().await.is_empty());

    let mut leaving = fx
        .connect_with_will(V5, connect("leaving", true), will("wills/leaving"))
        .await;
    let close = leaving
        .send_closing(Packet::Disconnect(Disconnect::new(
            DisconnectReasonCode::DisconnectWithWillMessage,
        )))
        .await;
    assert_eq!(
        close,
        Close {
            reason: None,
            will: true
        }
    );
    leaving.channel.close(close).await;
    let got = watcher.received().await;
    assert_eq!(payloads(&got), [b"gone"]);
    assert_eq!(&got[0].topic[..], b"wills/leaving");
}

// ---- session takeover ----------------------------------------------------

// [MQTT-3.1.4-3] a second connection with the same client id takes the
// session over: the first is told (Kick::TakenOver), the session with what
// it owes moves to the second; the unacked message is resent with DUP and
// its packet id [MQTT-4.4.0-1], the queued one follows.
#[tokio::test]
async fn takeover_moves_the_session_to_the_new_connection() {
    let fx = broker();
    let mut first = fx.connect(V5, persistent("dev", false, 60)).await;
    first
        .subscribe(vec![Filter::new("inbox/dev", QoS::AtLeastOnce)], None)
        .await;
    let mut publisher = fx.connect(V5, connect("pub", true)).await;

    publisher
        .publish(publish("inbox/dev", QoS::AtLeastOnce, 1, b"m1"))
        .await;
    let in_flight = first.received().await;
    assert_eq!(payloads(&in_flight), [b"m1"]);
    publisher
        .publish(publish("inbox/dev", QoS::AtLeastOnce, 2, b"m2"))
        .await;

    let (mut second, ()) = tokio::join!(
        fx.connect(V5, persistent("dev", false, 60)),
        first.closes_on_takeover(Close {
            reason: Some(DisconnectReasonCode::SessionTakenOver),
            will: true,
        })
    );
    assert!(second.connack.session_present);
    match second.resent.as_slice() {
        [Packet::Publish(p)] => {
            assert!(p.dup);
            assert_eq!(p.pkid, in_flight[0].pkid);
            assert_eq!(&p.payload[..], b"m1");
        }
        other => panic!("expected m1 resent, got {other:?}"),
    }
    assert_eq!(payloads(&second.received().await), [b"m2"]);

    // The old connection's end did not take the session with it.
    publisher
        .publish(publish("inbox/dev", QoS::AtLeastOnce, 3, b"m3"))
        .await;
    assert_eq!(payloads(&second.received().await), [b"m3"]);
}

// ARCHITECTURE.md: wills fire on takeover (delay 0), as the connection of
// the existing client is closed [MQTT-3.1.4-3].
#[tokio::test]
async fn takeover_publishes_the_old_connections_will() {
    let fx = broker();
    let mut watcher = fx.subscriber("watcher", "wills/#", QoS::AtLeastOnce).await;
    let mut first = fx
        .connect_with_will(V5, connect("dev", true), will("wills/dev"))
        .await;
    let (_second, ()) = tokio::join!(
        fx.connect(V5, connect("dev", true)),
        first.closes_on_takeover(Close {
            reason: Some(DisconnectReasonCode::SessionTakenOver),
            will: true,
        })
    );
    assert_eq!(payloads(&watcher.received().await), [b"gone"]);
}

// [MQTT-3.1.3-9] a will with a delay is not published when the new
// connection resumes the session before the delay has passed.
#[tokio::test]
async fn takeover_that_resumes_cancels_a_delayed_will() {
    let fx = broker();
    let mut watcher = fx.subscriber("watcher", "wills/#", QoS::AtLeastOnce).await;
    let mut delayed = will("wills/dev");
    if let Some(w) = delayed.as_mut() {
        w.properties = Some(LastWillProperties {
            delay_interval: Some(30),
            payload_format_indicator: None,
            message_expiry_interval: None,
            content_type: None,
            response_topic: None,
            correlation_data: None,
            user_properties: vec![],
        });
    }
    let mut first = fx
        .connect_with_will(V5, persistent("dev", false, 60), delayed)
        .await;
    let (second, ()) = tokio::join!(
        fx.connect(V5, persistent("dev", false, 60)),
        first.closes_on_takeover(Close {
            reason: Some(DisconnectReasonCode::SessionTakenOver),
            will: true,
        })
    );
    assert!(second.connack.session_present);
    assert!(watcher.received().await.is_empty());
}

// Issue #10 item 6: a client that sends DISCONNECT (Session Expiry 0) and
// reconnects at once must find the DISCONNECT applied. The new connection
// waits for the old one, which still reads what its client sent, to close.
#[tokio::test]
async fn a_takeover_waits_for_the_old_connection_to_apply_its_disconnect() {
    let fx = broker();
    let mut watcher = fx.subscriber("watcher", "wills/#", QoS::AtLeastOnce).await;
    let mut first = fx
        .connect_with_will(V5, persistent("phone", false, 60), will("wills/phone"))
        .await;
    let old = async {
        let Ok(Kick::TakenOver { closed }) = (&mut first.kicked).await else {
            panic!("the old connection was not told");
        };
        // Still in its socket buffer when the takeover came: DISCONNECT
        // with Session Expiry 0.
        let close = first.send_closing(disconnect_with_expiry(0)).await;
        first.channel.close(close).await;
        drop(closed);
    };
    let (second, ()) = tokio::join!(fx.connect(V5, persistent("phone", false, 60)), old);
    assert!(
        !second.connack.session_present,
        "the session ended with the DISCONNECT before the new connection"
    );
    assert!(
        watcher.received().await.is_empty(),
        "a normal DISCONNECT discards the will"
    );
}

// A connection refused (another user's client id) must not disturb the
// one attached.
#[tokio::test]
async fn a_connect_of_another_owner_does_not_evict_the_attached_connection() {
    let fx = broker();
    let mut alice = fx
        .try_connect(
            V5,
            persistent("alices-phone", false, 60),
            None,
            Ok(Identity::User("alice".into())),
        )
        .await
        .unwrap_or_else(|(ack, _)| panic!("refused: {ack:?}"));
    assert!(fx.broker.evict("alices-phone", None).is_none());
    assert!(
        alice.kicked.try_recv().is_err(),
        "alice was not told anything"
    );
}

// Issue #10 item 7: PUBCOMP tells the client the packet id is free; it
// must be free on disk too, or after a crash the client's next QoS 2
// message with that id is taken for a resend and dropped.
#[tokio::test]
async fn pubcomp_waits_for_the_packet_id_to_be_released_on_disk() {
    let fx = broker();
    let mut publisher = fx.connect(V5, persistent("pub", true, 60)).await;
    publisher
        .publish(publish("q2/t", QoS::ExactlyOnce, 5, b"once"))
        .await;
    fail_commits(&fx).await;
    publisher
        .channel
        .handle(Packet::PubRel(PubRel::new(5, None)))
        .await
        .expect("PUBREL is accepted");
    match publisher.channel.take_output().as_slice() {
        [Out::AfterCommit(_, Packet::PubComp(c))] => assert_eq!(c.pkid, 5),
        [Out::Now(p)] => panic!("{p:?} went out before the release was durable"),
        other => panic!("expected one PUBCOMP, got {} outputs", other.len()),
    }
}

// Issue #10 item 7: UNSUBACK only after the removal is on disk; a failed
// write closes the connection instead of confirming.
#[tokio::test]
async fn unsuback_is_not_sent_when_its_write_fails() {
    let fx = broker();
    let mut c = fx.connect(V5, persistent("c", true, 60)).await;
    c.subscribe(vec![Filter::new("news/#", QoS::AtLeastOnce)], None)
        .await;
    fail_commits(&fx).await;
    let mut unsub = Unsubscribe::new("news/#", None);
    unsub.pkid = 2;
    let close = c.send_closing(Packet::Unsubscribe(unsub)).await;
    assert_eq!(close.reason, Some(DisconnectReasonCode::UnspecifiedError));
    assert!(
        c.channel.take_output().is_empty(),
        "no UNSUBACK for a removal that is not durable"
    );
}

// [MQTT-4.3.2-*], [MQTT-4.3.3-*]: each QoS has its own acknowledgements; a
// PUBACK for a QoS 2 delivery, or a PUBCOMP before PUBREC, is a protocol
// error (MQTT 5: DISCONNECT 0x82).
#[tokio::test]
async fn an_ack_of_the_wrong_type_is_a_protocol_error() {
    let fx = broker();
    let mut sub = fx.subscriber("sub", "w/t", QoS::ExactlyOnce).await;
    let mut publisher = fx.connect(V5, connect("pub", true)).await;
    publisher
        .publish(publish("w/t", QoS::ExactlyOnce, 1, b"x"))
        .await;
    let id = sub.received().await[0].pkid;
    let close = sub
        .send_closing(Packet::PubComp(PubComp::new(id, None)))
        .await;
    assert_eq!(close.reason, Some(DisconnectReasonCode::ProtocolError));

    let mut sub = fx.subscriber("sub1", "w1/t", QoS::ExactlyOnce).await;
    publisher
        .publish(publish("w1/t", QoS::ExactlyOnce, 2, b"x"))
        .await;
    let id = sub.received().await[0].pkid;
    let close = sub
        .send_closing(Packet::PubAck(PubAck::new(id, None)))
        .await;
    assert_eq!(close.reason, Some(DisconnectReasonCode::ProtocolError));
}

// [MQTT-4.3.3-4] PUBREL answers only a PUBREC below 0x80: a subscriber
// refusing a QoS 2 message ends its delivery.
#[tokio::test]
async fn a_refusing_pubrec_gets_no_pubrel() {
    let fx = broker();
    let mut sub = fx.subscriber("sub", "r/t", QoS::ExactlyOnce).await;
    let mut publisher = fx.connect(V5, connect("pub", true)).await;
    publisher
        .publish(publish("r/t", QoS::ExactlyOnce, 1, b"x"))
        .await;
    let id = sub.received().await[0].pkid;
    let mut rec = PubRec::new(id, None);
    rec.reason = PubRecReason::QuotaExceeded;
    assert!(sub.send(Packet::PubRec(rec)).await.is_empty(), "no PUBREL");
    let pending = sub
        .channel
        .session()
        .expect("session")
        .lock()
        .session
        .pending();
    assert_eq!(pending, 0, "the message is done");
}

// [MQTT-2.2.1-3] packet ids are non-zero, and the first one is 1.
#[tokio::test]
async fn the_first_packet_id_of_a_session_is_1() {
    let fx = broker();
    let mut sub = fx.subscriber("sub", "ids/t", QoS::AtLeastOnce).await;
    let mut publisher = fx.connect(V5, connect("pub", true)).await;
    publisher
        .publish(publish("ids/t", QoS::AtLeastOnce, 1, b"x"))
        .await;
    assert_eq!(sub.received().await[0].pkid, 1);
}

// [MQTT-4.12.0-1] an Authentication Method the server does not support is
// refused with 0x8C.
#[tokio::test]
async fn an_unsupported_authentication_method_gets_0x8c() {
    let fx = broker();
    let mut c = connect("c", true);
    let mut props = ConnectProperties::new();
    props.authentication_method = Some("SCRAM-SHA-256".into());
    c.properties = Some(props);
    let (ack, _) = fx
        .try_connect(V5, c, None, Ok(Identity::Anonymous))
        .await
        .err()
        .expect("refused");
    assert_eq!(ack.code, ConnectReturnCode::BadAuthenticationMethod);
}

// [MQTT-3.1.4-1] a 3.1.1 CONNECT that does not conform closes the
// connection without a CONNACK: 3.1.1 has no code for a bad will, and
// rc 3 would tell the client the server is unavailable.
#[tokio::test]
async fn a_v4_will_on_an_invalid_topic_closes_without_connack() {
    let fx = broker();
    let mut channel = fx.channel();
    let result = channel
        .connect(
            V4,
            connect("c", true),
            will("wills/+"),
            Ok(Identity::Anonymous),
        )
        .await;
    assert!(result.is_err());
    assert!(answers(&mut channel).await.is_empty(), "no CONNACK");
}

// [MQTT-3.1.2-24], [MQTT-3.1.2-25] nothing larger than the client's
// Maximum Packet Size is sent: a CONNACK that is too large loses its
// optional properties; one that cannot fit at all closes the connection.
#[tokio::test]
async fn a_connack_too_large_for_the_client_drops_what_it_may() {
    let fx = broker();
    let with_max = |max: u32| {
        let mut props = ConnectProperties::new();
        props.max_packet_size = Some(max);
        Connect {
            properties: Some(props),
            ..connect("", true)
        }
    };
    let small = fx.connect(V5, with_max(40)).await;
    let size = Packet::ConnAck(small.connack.clone()).size();
    assert!(size <= 40, "CONNACK of {size} bytes");
    let p = small.connack.properties.expect("properties");
    assert!(
        p.assigned_client_identifier.is_some(),
        "the assigned id stays"
    );
    assert_eq!(p.receive_max, Some(100));
    assert_eq!(p.topic_alias_max, None, "optional: dropped");

    let mut channel = fx.channel();
    let result = channel
        .connect(V5, with_max(8), None, Ok(Identity::Anonymous))
        .await;
    assert!(result.is_err(), "not even the short CONNACK fits");
    assert!(answers(&mut channel).await.is_empty());
}

// DISCONNECT with Session Expiry 0 ends a stored session: it must leave
// the disk too, or a restart brings it back (Session Present 1).
#[tokio::test]
async fn a_session_ended_at_disconnect_is_deleted_from_disk() {
    let fx = broker();
    let mut c = fx.connect(V5, persistent("c", true, 60)).await;
    let close = c.send_closing(disconnect_with_expiry(0)).await;
    c.channel.close(close).await;
    fx.broker.store.flush().await.expect("flush");
    let stored = fx.broker.store.load_sessions().expect("sessions");
    assert!(stored.iter().all(|s| s.client_id != "c"), "still on disk");
}

// A connection task that dies without closing (a panic unwinds through
// it, or its future is dropped) must not leave its user online or its
// session attached: the channel's drop releases both.
#[tokio::test]
async fn a_channel_dropped_without_close_releases_session_and_presence() {
    let fx = broker();
    let alice = Ok(Identity::User("alice".into()));
    let Ok(client) = fx
        .try_connect(V5, connect("alices-phone", true), None, alice)
        .await
    else {
        panic!("refused");
    };
    assert!(fx.broker.chat.is_online("alice"));
    assert_eq!(fx.broker.session_count(), 1);
    drop(client);
    assert!(!fx.broker.chat.is_online("alice"), "presence released");
    assert_eq!(fx.broker.session_count(), 0, "the clean session ended");
}
