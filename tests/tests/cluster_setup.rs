//! `[cluster]` start-up (issue #12, item 1): a chatmq node with the
//! section connects to a real 3-server NATS JetStream cluster and finds
//! or creates its partition streams and KV buckets; one whose settings
//! disagree with what NATS holds refuses to start with one line naming
//! the setting; an unreachable NATS is retried, then given up with one
//! line; until NATS is there `/readyz` says not ready. Without the
//! section no NATS is touched.

use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use async_nats::jetstream::stream::{RetentionPolicy, StorageType};
use chatmq_tests::http::Http;
use chatmq_tests::nats::{free_port, NatsCluster};
use chatmq_tests::{binary, the_error_line, tools, Broker, OPEN};
use futures_util::TryStreamExt;

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
}

/// A config with `[cluster]` for `node` on `nats`, plus `extra` keys of
/// the section.
fn cluster_config(nats: &NatsCluster, node: &str, extra: &str) -> String {
    format!(
        "{OPEN}\n[cluster]\nnode_id = {node:?}\n{}\n{extra}\n",
        nats.urls_toml()
    )
}

/// Runs `chatmq serve` with `config` in a fresh directory until it exits
/// (it must, within `within`), as an operator would: default log filter.
fn serve_until_exit(config: &str, within: Duration) -> Output {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("chatmq.toml");
    std::fs::write(&path, config).expect("write config");
    let child = serve_command(dir.path(), &path)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn chatmq");
    tools::finish_within(child, "chatmq serve", within)
}

fn serve_command(dir: &Path, config: &Path) -> Command {
    let mut cmd = Command::new(binary());
    cmd.current_dir(dir)
        .arg("serve")
        .arg("--config")
        .arg(config)
        .env_remove("RUST_LOG")
        .env("CHATMQ__NODE__DATA_DIR", dir.join("data"))
        .env("CHATMQ__MQTT__LISTEN", "127.0.0.1:0")
        .env("CHATMQ__HTTP__LISTEN", "127.0.0.1:0")
        .env("CHATMQ__WEBSOCKET__LISTEN", "127.0.0.1:0")
        .stdin(Stdio::null());
    cmd
}

#[test]
fn a_node_creates_its_streams_and_buckets_and_later_nodes_reuse_them() {
    if chatmq_tests::nats::skip() {
        return;
    }
    let nats = NatsCluster::start(3);
    let config = cluster_config(&nats, "node-1", "partitions = 4\nlease_ttl_ms = 3000\n");
    let mut node1 = Broker::start(&config);
    let rt = runtime();
    let ready = rt.block_on(Http::new(node1.http_addr).get("/readyz"));
    assert_eq!(ready.status, 200, "{}", ready.text());

    let created = rt.block_on(async {
        let js = nats.jetstream().await;
        let mut created = Vec::new();
        for p in 0..4 {
            let name = format!("chatmq_chat_{p}");
            let mut stream = js
                .get_stream(&name)
                .await
                .unwrap_or_else(|e| panic!("{name}: {e}"));
            let info = stream.info().await.expect("stream info");
            let c = &info.config;
            assert_eq!(c.subjects, vec![format!("chatmq.chat.{p}.>")], "{name}");
            assert_eq!(c.num_replicas, 3, "{name}");
            assert_eq!(c.storage, StorageType::File, "{name}");
            assert_eq!(c.retention, RetentionPolicy::Limits, "{name}");
            assert_eq!(c.max_age, Duration::ZERO, "{name}: kept forever");
            assert_eq!(c.duplicate_window, Duration::from_secs(120), "{name}");
            assert_eq!(
                info.cluster.as_ref().map(|c| c.replicas.len()),
                Some(2),
                "{name}: a leader and two followers"
            );
            created.push(info.created);
        }
        assert!(
            js.get_stream("chatmq_chat_4").await.is_err(),
            "only the 4 partitions"
        );
        let leases = js
            .get_stream("KV_chatmq_leases")
            .await
            .expect("leases bucket");
        let c = &leases.cached_info().config;
        assert_eq!(c.max_age, Duration::from_millis(3000), "lease TTL");
        assert_eq!(c.max_messages_per_subject, 1, "one value per lease");
        assert_eq!(c.num_replicas, 3);
        let meta = js.get_key_value("chatmq_meta").await.expect("meta bucket");
        let record = meta
            .get("layout")
            .await
            .expect("get")
            .expect("a layout record");
        let record: serde_json::Value = serde_json::from_slice(&record).expect("json");
        assert_eq!(record, serde_json::json!({"version": 1, "partitions": 4}));
        created
    });

    // A restart and a second node find them and change nothing.
    node1.restart();
    let node2 = Broker::start(&cluster_config(
        &nats,
        "node-2",
        "partitions = 4\nlease_ttl_ms = 3000\n",
    ));
    let ready = rt.block_on(Http::new(node2.http_addr).get("/readyz"));
    assert_eq!(ready.status, 200);
    rt.block_on(async {
        let js = nats.jetstream().await;
        for (p, when) in created.iter().enumerate() {
            let mut stream = js
                .get_stream(format!("chatmq_chat_{p}"))
                .await
                .expect("stream");
            assert_eq!(
                &stream.info().await.expect("info").created,
                when,
                "not recreated"
            );
        }
    });

    // A node configured for another partition count is refused: the
    // count is fixed for the life of the cluster.
    let out = serve_until_exit(
        &cluster_config(&nats, "node-3", "partitions = 8\nlease_ttl_ms = 3000\n"),
        Duration::from_secs(60),
    );
    let line = the_error_line(&out);
    assert!(
        line.starts_with("chatmq: cluster.partitions: this node has 8, but the cluster in NATS (bucket chatmq_meta) was created with 4"),
        "{line}"
    );
    // And one with another lease TTL.
    let out = serve_until_exit(
        &cluster_config(&nats, "node-3", "partitions = 4\nlease_ttl_ms = 4000\n"),
        Duration::from_secs(60),
    );
    let line = the_error_line(&out);
    assert!(
        line.starts_with("chatmq: cluster.lease_ttl_ms: NATS KV bucket chatmq_leases exists with max_age 3 s, but this node needs 4 s;"),
        "{line}"
    );
    rt.block_on(async {
        let js = nats.jetstream().await;
        assert!(
            js.get_stream("chatmq_chat_4").await.is_err(),
            "the refused node created nothing"
        );
    });
}

#[test]
fn a_stream_of_another_shape_stops_the_node_with_one_line() {
    if chatmq_tests::nats::skip() {
        return;
    }
    let nats = NatsCluster::start(3);
    let rt = runtime();
    rt.block_on(async {
        let js = nats.jetstream().await;
        // Partition 1 of prefix "one" with one replica instead of three.
        js.create_stream(async_nats::jetstream::stream::Config {
            name: "one_chat_1".into(),
            subjects: vec!["one.chat.1.>".into()],
            storage: StorageType::File,
            num_replicas: 1,
            duplicate_window: Duration::from_secs(120),
            ..Default::default()
        })
        .await
        .expect("create one_chat_1");
        // Partition 0 of prefix "two" on other subjects.
        js.create_stream(async_nats::jetstream::stream::Config {
            name: "two_chat_0".into(),
            subjects: vec!["elsewhere.>".into()],
            storage: StorageType::File,
            num_replicas: 3,
            ..Default::default()
        })
        .await
        .expect("create two_chat_0");
    });

    let out = serve_until_exit(
        &cluster_config(&nats, "node-1", "name_prefix = \"one\"\npartitions = 2\n"),
        Duration::from_secs(60),
    );
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let line = the_error_line(&out);
    assert!(
        line.starts_with("chatmq: cluster.replicas: NATS stream one_chat_1 exists with replicas 1, but this node needs 3;"),
        "{line}"
    );

    let out = serve_until_exit(
        &cluster_config(&nats, "node-1", "name_prefix = \"two\"\npartitions = 2\n"),
        Duration::from_secs(60),
    );
    let line = the_error_line(&out);
    assert!(
        line.starts_with("chatmq: cluster.name_prefix: NATS stream two_chat_0 exists with subjects [\"elsewhere.>\"], but this node needs [\"two.chat.0.>\"];"),
        "{line}"
    );
    // Nothing was changed: the streams keep their shape.
    rt.block_on(async {
        let js = nats.jetstream().await;
        let s = js.get_stream("one_chat_1").await.expect("one_chat_1");
        assert_eq!(s.cached_info().config.num_replicas, 1);
        let s = js.get_stream("two_chat_0").await.expect("two_chat_0");
        assert_eq!(
            s.cached_info().config.subjects,
            vec!["elsewhere.>".to_string()]
        );
    });
}

#[test]
fn an_unreachable_nats_is_retried_then_given_up_with_one_line() {
    let port = free_port();
    let config = format!(
        "{OPEN}\n[cluster]\nnode_id = \"node-1\"\nnats_urls = [\"nats://127.0.0.1:{port}\"]\nstartup_timeout_secs = 2\n"
    );
    let started = Instant::now();
    let out = serve_until_exit(&config, Duration::from_secs(30));
    let took = started.elapsed();
    let line = the_error_line(&out);
    assert!(
        line.starts_with(&format!(
            "chatmq: cluster.nats_urls: no NATS server answered within cluster.startup_timeout_secs (2 s), tried nats://127.0.0.1:{port}: "
        )),
        "{line}"
    );
    assert!(
        took >= Duration::from_millis(1500),
        "gave up after {took:?}, before the bound"
    );
    assert!(took < Duration::from_secs(15), "gave up after {took:?}");
}

#[test]
fn readyz_waits_until_nats_is_there() {
    if chatmq_tests::nats::skip() {
        return;
    }
    // chatmq starts first, pointed at ports where no NATS listens yet.
    let ports: Vec<u16> = (0..3).map(|_| free_port()).collect();
    let http_port = free_port();
    let urls: Vec<String> = ports
        .iter()
        .map(|p| format!("\"nats://127.0.0.1:{p}\""))
        .collect();
    let config = format!(
        "{OPEN}\n[cluster]\nnode_id = \"node-1\"\nnats_urls = [{}]\npartitions = 2\nstartup_timeout_secs = 120\n",
        urls.join(", ")
    );
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("chatmq.toml");
    std::fs::write(&path, config).expect("write config");
    let log = std::fs::File::create(dir.path().join("chatmq.log")).expect("log");
    let mut child = serve_command(dir.path(), &path)
        .env("CHATMQ__HTTP__LISTEN", format!("127.0.0.1:{http_port}"))
        // The start-up retries and their reasons, for a failure's message.
        .env("RUST_LOG", "info,chatmq_cluster=debug")
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("spawn chatmq");
    let http = Http::new(format!("127.0.0.1:{http_port}").parse().expect("addr"));
    let rt = runtime();
    let addr = http.addr;
    let status = |rt: &tokio::runtime::Runtime| {
        // Nothing listens until chatmq has bound its ports.
        std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(1)).ok()?;
        Some(rt.block_on(http.get("/readyz")).status)
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut seen = None;
    while Instant::now() < deadline {
        seen = status(&rt);
        if seen.is_some() {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(seen, Some(503), "/readyz while NATS is not there");
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(status(&rt), Some(503), "still not ready");
    assert!(
        child.try_wait().expect("wait").is_none(),
        "chatmq keeps trying"
    );

    let _nats = NatsCluster::start_on(&ports);
    let deadline = Instant::now() + Duration::from_secs(60);
    while status(&rt) != Some(200) {
        assert!(
            Instant::now() < deadline,
            "not ready after NATS came; log:\n{}",
            std::fs::read_to_string(dir.path().join("chatmq.log")).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let _ = child.kill();
    let _ = child.wait();
}

#[test]
fn without_the_section_no_nats_is_touched() {
    if chatmq_tests::nats::skip() {
        return;
    }
    let nats = NatsCluster::start(3);
    // The same NATS is there, but the node is not told of it.
    let broker = Broker::start(OPEN);
    let rt = runtime();
    let ready = rt.block_on(Http::new(broker.http_addr).get("/readyz"));
    assert_eq!(ready.status, 200);
    rt.block_on(async {
        let js = nats.jetstream().await;
        let names: Vec<String> = js.stream_names().try_collect().await.expect("stream names");
        assert!(names.is_empty(), "no stream was created: {names:?}");
    });
}
