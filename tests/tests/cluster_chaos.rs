//! The cluster under chaos (issue #12 items 7 and 10), as its users would
//! see it: 3 `nats-server` and 3 `chatmq` nodes, four senders on
//! different nodes sending QoS 1 chat to four conversations, and a reader
//! with a persistent session. Mid-run, the node the reader and one sender
//! are on is `kill -9`ed (they reconnect to a survivor: the sender
//! resends what was not acknowledged with the same envelope id, the
//! reader resumes its session), then the nats-server leading a partition
//! stream is `kill -9`ed; both come back. Afterwards every acknowledged
//! message is in every node's history exactly once, seqs dense, each
//! sender's order kept, and the reader saw every seq, with no gap. The
//! longest wait for a PUBACK (the write pause) is printed for
//! docs/CLUSTER.md.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chatmq_tests::chat::{self, envelope, seq_of};
use chatmq_tests::cluster::{acked_within, runtime};
use chatmq_tests::http::Http;
use chatmq_tests::nats::NatsCluster;
use chatmq_tests::{v5, Broker};
use rumqttc::v5::mqttbytes::v5::Packet;
use rumqttc::v5::mqttbytes::QoS;
use serde_json::{json, Value};

const SENDERS: [&str; 4] = ["alice", "bob", "carol", "dave"];
const PER_SENDER: usize = 60;
const READER: &str = "erin";

fn node(nats: &NatsCluster, id: &str) -> Broker {
    Broker::start(&chat::config(&format!(
        "[cluster]\nnode_id = {id:?}\n{}\npartitions = 4\nlease_ttl_ms = 2000\n",
        nats.urls_toml()
    )))
}

fn user(addr: SocketAddr, name: &str) -> Http {
    Http::new(addr).with_token(&chat::token(name))
}

/// Connects `o` to the first node of `addrs` that answers, starting at
/// `from`; the index it is on.
async fn connect_any(
    addrs: &[SocketAddr],
    from: usize,
    options: impl Fn(SocketAddr) -> rumqttc::v5::MqttOptions,
) -> (v5::Client, usize) {
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut i = from;
    loop {
        let addr = addrs[i % addrs.len()];
        if let Ok(Ok(c)) =
            tokio::time::timeout(Duration::from_secs(5), v5::connect(options(addr))).await
        {
            return (c, i % addrs.len());
        }
        assert!(
            Instant::now() < deadline,
            "no node took a connection for 60 s"
        );
        i += 1;
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// An acknowledged message: conversation, envelope id, when it was first
/// sent and how long it took to be acknowledged.
type Acked = (String, String, Instant, Duration);

/// One sender: `PER_SENDER` messages, each resent with the same id on a
/// new connection until acknowledged.
async fn send_all(
    addrs: Vec<SocketAddr>,
    k: usize,
    who: &'static str,
    convs: Vec<String>,
    progress: Arc<Mutex<usize>>,
) -> Vec<Acked> {
    let options = |addr| chat::v5_options(addr, &format!("{who}-sender"), who, false);
    let (mut c, mut on) = connect_any(&addrs, k, options).await;
    let mut out = Vec::new();
    for i in 0..PER_SENDER {
        let conv = &convs[(i + k) % convs.len()];
        let id = format!("{who}-{i}");
        let started = Instant::now();
        loop {
            let r = acked_within(
                &mut c,
                &format!("chat/{conv}"),
                &envelope(&id, "x"),
                Duration::from_secs(20),
            )
            .await;
            if r == Some(true) {
                break;
            }
            assert!(
                started.elapsed() < Duration::from_secs(120),
                "{id} on {conv}: not acknowledged in 120 s"
            );
            // Refused (no owner yet) or cut off: again, on this node or
            // the next, with the same envelope id.
            tokio::time::sleep(Duration::from_millis(200)).await;
            if r.is_none() {
                (c, on) = connect_any(&addrs, on + 1, options).await;
            }
        }
        out.push((conv.clone(), id, started, started.elapsed()));
        *progress.lock().unwrap() += 1;
    }
    out
}

/// What the reader was given: the seqs of each conversation.
type Read = BTreeMap<String, BTreeSet<u64>>;

/// The reader: a persistent session on `chat/+`, resumed on another node
/// when its connection ends; every (conv, seq) it was given, until `stop`.
async fn read_all(addrs: Vec<SocketAddr>, got: Arc<Mutex<Read>>, stop: Arc<Mutex<bool>>) -> usize {
    let options = |addr| chat::v5_options(addr, "erin-reader", READER, true);
    let (mut c, mut on) = connect_any(&addrs, 0, options).await;
    c.subscribe("chat/+", QoS::AtLeastOnce).await;
    let mut moves = 0;
    loop {
        if *stop.lock().unwrap() {
            return moves;
        }
        match tokio::time::timeout(Duration::from_millis(500), c.next()).await {
            Err(_) => continue,
            Ok(Ok(Packet::Publish(p))) => {
                let topic = chat::v5_topic(&p);
                if let Some(conv) = topic.strip_prefix("chat/") {
                    let mut got = got.lock().unwrap();
                    got.entry(conv.to_string())
                        .or_default()
                        .insert(seq_of(&p.payload));
                }
            }
            Ok(Ok(_)) => {}
            Ok(Err(e)) if e.contains("nothing arrived") => {}
            Ok(Err(_)) => {
                (c, on) = connect_any(&addrs, on + 1, options).await;
                assert!(
                    c.connack.session_present,
                    "the reader's session resumed on node {on}"
                );
                moves += 1;
            }
        }
    }
}

/// The name of the nats-server leading `stream`.
async fn leader_of(nats: &NatsCluster, stream: &str) -> Option<String> {
    let js = nats.jetstream().await;
    let mut s = js.get_stream(stream).await.ok()?;
    let info = s.info().await.ok()?;
    info.cluster.as_ref().and_then(|c| c.leader.clone())
}

async fn history(addr: SocketAddr, conv: &str) -> Vec<Value> {
    let r = user(addr, "alice")
        .get(&format!("/v1/conversations/{conv}/messages?limit=500"))
        .await;
    if r.status != 200 {
        return Vec::new();
    }
    r.json()["messages"].as_array().cloned().unwrap_or_default()
}

#[test]
fn killed_nodes_and_nats_servers_under_chat_load_lose_nothing_acknowledged() {
    if chatmq_tests::nats::skip() {
        return;
    }
    let mut nats = NatsCluster::start(3);
    let mut nodes = vec![
        node(&nats, "node-a"),
        node(&nats, "node-b"),
        node(&nats, "node-c"),
    ];
    let addrs: Vec<SocketAddr> = nodes.iter().map(|n| n.addr).collect();
    let rt = runtime();
    let convs: Vec<String> = (0..4).map(|i| format!("chaos-{i}")).collect();
    let members: Vec<&str> = SENDERS.iter().copied().chain([READER]).collect();
    rt.block_on(async {
        for c in &convs {
            let r = user(nodes[1].http_addr, "alice")
                .post("/v1/conversations", &json!({"conv": c, "members": members}))
                .await;
            assert_eq!(r.status, 201, "create {c}: {}", r.text());
        }
        // Known on every node before the reader subscribes there.
        for n in &nodes {
            for c in &convs {
                let deadline = Instant::now() + Duration::from_secs(30);
                while user(n.http_addr, READER)
                    .get(&format!("/v1/conversations/{c}/messages"))
                    .await
                    .status
                    != 200
                {
                    assert!(Instant::now() < deadline, "{c} not on {}", n.http_addr);
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    });

    let stop = Arc::new(Mutex::new(false));
    let progress = Arc::new(Mutex::new(0usize));
    let read = Arc::new(Mutex::new(Read::new()));
    let reader = rt.spawn(read_all(addrs.clone(), read.clone(), stop.clone()));
    let senders: Vec<_> = SENDERS
        .iter()
        .enumerate()
        .map(|(k, who)| {
            rt.spawn(send_all(
                addrs.clone(),
                k,
                who,
                convs.clone(),
                progress.clone(),
            ))
        })
        .collect();
    let total = SENDERS.len() * PER_SENDER;
    let sent = |n: usize| {
        let progress = progress.clone();
        move || *progress.lock().unwrap() >= n
    };
    let wait = |f: &dyn Fn() -> bool, what: &str| {
        let deadline = Instant::now() + Duration::from_secs(120);
        while !f() {
            assert!(Instant::now() < deadline, "{what}");
            std::thread::sleep(Duration::from_millis(50));
        }
    };
    // A third in: node A (the reader's, alice's) dies.
    wait(&sent(total / 3), "a third sent");
    let node_killed = Instant::now();
    nodes[0].kill9();
    // Two thirds in: the nats-server leading partition 0's stream dies.
    wait(&sent(2 * total / 3), "two thirds sent");
    let leader = rt.block_on(leader_of(&nats, "chatmq_chat_0"));
    let killed = leader
        .as_deref()
        .and_then(|l| nats.servers.iter().position(|s| s.name == l))
        .unwrap_or(0);
    let nats_killed = Instant::now();
    nats.servers[killed].kill9();
    wait(&sent(total), "all sent");
    let restarted = Instant::now();
    nats.restart(killed);
    nodes[0].restart();

    let mut acked = Vec::new();
    for s in senders {
        acked.extend(rt.block_on(s).expect("sender"));
    }
    assert_eq!(acked.len(), total);
    let per_conv: HashMap<&str, usize> = convs
        .iter()
        .map(|c| (c.as_str(), acked.iter().filter(|(x, ..)| x == c).count()))
        .collect();

    // The reader has every seq of every conversation (what it missed
    // while it moved is replayed from its cursors).
    let complete = || {
        let read = read.lock().unwrap();
        convs
            .iter()
            .all(|c| read.get(c).map_or(0, BTreeSet::len) >= per_conv[c.as_str()])
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    while !complete() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(200));
    }
    *stop.lock().unwrap() = true;
    let moves = rt.block_on(reader).expect("reader");
    assert!(moves >= 1, "the reader moved off the killed node");
    let read = read.lock().unwrap().clone();
    for c in &convs {
        let seqs = read.get(c).cloned().unwrap_or_default();
        let want: BTreeSet<u64> = (1..=per_conv[c.as_str()] as u64).collect();
        assert_eq!(seqs, want, "the reader's seqs of {c}: no gap");
    }

    rt.block_on(async {
        for (n, node) in nodes.iter().enumerate() {
            for c in &convs {
                let expected = per_conv[c.as_str()];
                let deadline = Instant::now() + Duration::from_secs(60);
                let msgs = loop {
                    let m = history(node.http_addr, c).await;
                    if m.len() >= expected || Instant::now() > deadline {
                        break m;
                    }
                    tokio::time::sleep(Duration::from_millis(200)).await;
                };
                let seqs: Vec<u64> = msgs.iter().filter_map(|m| m["seq"].as_u64()).collect();
                chat::assert_dense(&seqs, expected as u64, &format!("{c} on node {n}"));
                let ids: Vec<&str> = msgs.iter().filter_map(|m| m["id"].as_str()).collect();
                let unique: HashSet<&str> = ids.iter().copied().collect();
                assert_eq!(unique.len(), ids.len(), "{c} on node {n}: an id twice");
                for (conv, id, ..) in acked.iter().filter(|(x, ..)| x == c) {
                    assert!(
                        unique.contains(id.as_str()),
                        "{id} acked but not in {conv} on node {n}"
                    );
                }
                for who in SENDERS {
                    let order: Vec<usize> = ids
                        .iter()
                        .filter_map(|i| i.strip_prefix(&format!("{who}-")))
                        .filter_map(|x| x.parse().ok())
                        .collect();
                    let mut sorted = order.clone();
                    sorted.sort_unstable();
                    assert_eq!(order, sorted, "{who}'s order in {c} on node {n}");
                }
            }
        }
    });
    // The write pause of each kill: the longest wait of a message in flight
    // when it happened (sent before, acknowledged after).
    let pause = |at: Instant| {
        acked
            .iter()
            .filter(|(_, _, start, took)| *start <= at && *start + *took >= at)
            .map(|(.., took)| *took)
            .max()
            .unwrap_or_default()
    };
    // CHAOS_DEBUG=1: what the servers and nodes warned of, and the slowest
    // messages, to see where a pause came from.
    if std::env::var_os("CHAOS_DEBUG").is_some() {
        for srv in &nats.servers {
            for line in srv
                .log()
                .lines()
                .filter(|l| l.contains("[WRN]") || l.contains("[ERR]") || l.contains("leader"))
                .take(80)
            {
                eprintln!("{}: {line}", srv.name);
            }
        }
        for (i, n) in nodes.iter().enumerate() {
            for line in n
                .log()
                .lines()
                .filter(|l| l.contains("WARN") || l.contains("ERROR"))
                .take(60)
            {
                eprintln!("node {i}: {line}");
            }
        }
        let mut slow: Vec<_> = acked.iter().collect();
        slow.sort_by_key(|(.., d)| std::cmp::Reverse(*d));
        for (conv, id, start, took) in slow.iter().take(12) {
            eprintln!(
                "slow {id} {conv}: start {:+.1}s from node kill, {:+.1}s from nats kill, {:+.1}s from restarts; took {took:?}",
                start.duration_since(node_killed).as_secs_f64(),
                start.saturating_duration_since(nats_killed).as_secs_f64() - nats_killed.saturating_duration_since(*start).as_secs_f64(),
                start.saturating_duration_since(restarted).as_secs_f64() - restarted.saturating_duration_since(*start).as_secs_f64(),
            );
        }
    }
    let mut waits: Vec<Duration> = acked.iter().map(|(.., d)| *d).collect();
    waits.sort_unstable();
    eprintln!(
        "cluster chaos: {total} messages, PUBACK p50 {:?}, p99 {:?}, longest {:?}; \
         pause of the node kill {:?}, of the nats-server {} kill {:?}",
        waits[waits.len() / 2],
        waits[waits.len() * 99 / 100],
        waits[waits.len() - 1],
        pause(node_killed),
        leader.as_deref().unwrap_or("?"),
        pause(nats_killed),
    );
}
