//! A real NATS JetStream cluster for the `[cluster]` tests: `nats-server`
//! processes (Debian's package, installed by `scripts/setup.sh --test`) on
//! free loopback ports, each with its own store directory in a temporary
//! directory, routed to each other as one cluster.
//!
//! [`NatsCluster::start`] returns once every server is in the JetStream
//! cluster (a stream with a replica on each can be created), so a test
//! starts from a cluster that can place chatmq's streams. Servers can be killed and started again on the
//! same ports and store (for the failover tests of issue #12).
//!
//! async-nats 0.50 cannot parse 2.9's account info (`query_account`,
//! and so `create_key_value`): use stream requests.

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// How long a fresh cluster may take to elect a JetStream leader.
const FORMATION: Duration = Duration::from_secs(60);

/// Whether `nats-server` can be run here.
pub fn available() -> bool {
    crate::tools::available("nats-server", &["--version"])
}

/// Whether a `[cluster]` test must be skipped: only where `nats-server`
/// is missing and this is not CI (where its absence is a failure).
pub fn skip() -> bool {
    if available() {
        return false;
    }
    assert!(
        std::env::var_os("CI").is_none(),
        "nats-server is missing: scripts/setup.sh --test installs it"
    );
    eprintln!("skipped: nats-server is not installed (scripts/setup.sh --test)");
    true
}

/// A free loopback port (bound, then released for the server to take).
pub fn free_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind a free port");
    listener.local_addr().expect("local addr").port()
}

/// One `nats-server` of the cluster.
pub struct NatsServer {
    pub name: String,
    pub client_port: u16,
    pub route_port: u16,
    config: PathBuf,
    log: PathBuf,
    child: Option<Child>,
}

impl NatsServer {
    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.client_port)
    }

    fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("nats log file");
        let child = Command::new("nats-server")
            .arg("-c")
            .arg(&self.config)
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log fd"))
            .stderr(log)
            .spawn()
            .expect("spawn nats-server (scripts/setup.sh --test installs it)");
        self.child = Some(child);
    }

    /// SIGKILL.
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// What the server logged.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

/// A JetStream cluster of `nats-server` processes on loopback.
pub struct NatsCluster {
    pub servers: Vec<NatsServer>,
    dir: tempfile::TempDir,
}

impl NatsCluster {
    /// `n` servers on free ports, ready for JetStream. A free port can
    /// be taken between the probe that found it and the server's bind (a
    /// client's ephemeral port): a server that exits at start-up is a
    /// reason to try again on other ports, up to 3 times.
    pub fn start(n: usize) -> NatsCluster {
        let mut failures = String::new();
        for _ in 0..3 {
            let ports: Vec<u16> = (0..n).map(|_| free_port()).collect();
            match Self::try_start_on(&ports) {
                Ok(cluster) => return cluster,
                Err(logs) => failures.push_str(&logs),
            }
        }
        panic!("NATS did not start in 3 attempts; logs:\n{failures}");
    }

    /// Servers whose client ports are `client_ports` (a test may hand a
    /// port to chatmq before any server listens on it).
    pub fn start_on(client_ports: &[u16]) -> NatsCluster {
        match Self::try_start_on(client_ports) {
            Ok(cluster) => cluster,
            Err(logs) => panic!("NATS did not start; logs:\n{logs}"),
        }
    }

    fn try_start_on(client_ports: &[u16]) -> Result<NatsCluster, String> {
        let dir = tempfile::tempdir().expect("temp dir");
        let route_ports: Vec<u16> = client_ports.iter().map(|_| free_port()).collect();
        let routes: Vec<String> = route_ports
            .iter()
            .map(|p| format!("\"nats-route://127.0.0.1:{p}\""))
            .collect();
        let mut servers = Vec::new();
        for (i, (&client_port, &route_port)) in client_ports.iter().zip(&route_ports).enumerate() {
            let name = format!("n{}", i + 1);
            let store = dir.path().join(&name);
            std::fs::create_dir_all(&store).expect("store dir");
            let config = dir.path().join(format!("{name}.conf"));
            std::fs::write(
                &config,
                format!(
                    "server_name: {name}\n\
                     listen: \"127.0.0.1:{client_port}\"\n\
                     jetstream {{\n  store_dir: {store:?}\n  max_memory_store: 64MB\n  max_file_store: 1GB\n}}\n\
                     cluster {{\n  name: chatmq-test\n  listen: \"127.0.0.1:{route_port}\"\n  routes: [{}]\n}}\n",
                    routes.join(", ")
                ),
            )
            .expect("write nats config");
            servers.push(NatsServer {
                log: dir.path().join(format!("{name}.log")),
                name,
                client_port,
                route_port,
                config,
                child: None,
            });
        }
        for server in &mut servers {
            server.spawn();
        }
        let mut cluster = NatsCluster { servers, dir };
        cluster.wait_for_formation()?;
        Ok(cluster)
    }

    /// Every server's client URL.
    pub fn urls(&self) -> Vec<String> {
        self.servers.iter().map(NatsServer::url).collect()
    }

    /// The `nats_urls = [...]` line of a `[cluster]` section.
    pub fn urls_toml(&self) -> String {
        let quoted: Vec<String> = self.urls().iter().map(|u| format!("{u:?}")).collect();
        format!("nats_urls = [{}]", quoted.join(", "))
    }

    /// Starts server `i` again (same ports, same store).
    pub fn restart(&mut self, i: usize) {
        self.servers[i].kill9();
        self.servers[i].spawn();
    }

    /// Every server's log, for a failure message.
    pub fn logs(&self) -> String {
        self.servers
            .iter()
            .map(|s| format!("--- {} ---\n{}", s.name, s.log()))
            .collect()
    }

    /// A JetStream context on the cluster, for tests to look at streams.
    pub async fn jetstream(&self) -> async_nats::jetstream::Context {
        match self.try_jetstream().await {
            Ok(js) => js,
            Err(e) => panic!("connect to NATS: {e}"),
        }
    }

    async fn try_jetstream(
        &self,
    ) -> Result<async_nats::jetstream::Context, async_nats::ConnectError> {
        let addrs: Vec<async_nats::ServerAddr> = self
            .urls()
            .iter()
            .map(|u| u.parse().expect("server addr"))
            .collect();
        let client = async_nats::connect(addrs).await?;
        Ok(async_nats::jetstream::new(client))
    }

    /// Blocks until every server is in the JetStream cluster: a stream
    /// with one replica on each can be created (a meta leader alone is
    /// not enough: with a server missing, every stream of chatmq's
    /// replicas is refused and a node never becomes ready). `Err` with
    /// the logs if a server exited or the time is up.
    fn wait_for_formation(&mut self) -> Result<(), String> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        let replicas = self.servers.len();
        let deadline = Instant::now() + FORMATION;
        loop {
            let exited = self.servers.iter_mut().find_map(|server| {
                match server.child.as_mut().map(Child::try_wait) {
                    Some(Ok(Some(status))) => {
                        server.child = None;
                        Some(format!("{} exited ({status})", server.name))
                    }
                    _ => None,
                }
            });
            if let Some(exited) = exited {
                return Err(format!("{exited}:\n{}", self.logs()));
            }
            let place = async {
                let Ok(js) = self.try_jetstream().await else {
                    return false;
                };
                let probe = async_nats::jetstream::stream::Config {
                    name: "chatmq-probe".to_string(),
                    num_replicas: replicas,
                    storage: async_nats::jetstream::stream::StorageType::Memory,
                    ..Default::default()
                };
                match js.create_stream(probe).await {
                    Ok(_) => js.delete_stream("chatmq-probe").await.is_ok(),
                    Err(_) => false,
                }
            };
            // The timer is made inside the runtime it needs.
            let placed = runtime
                .block_on(async { tokio::time::timeout(Duration::from_secs(5), place).await });
            if let Ok(true) = placed {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(format!("JetStream did not form:\n{}", self.logs()));
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    pub fn dir(&self) -> &std::path::Path {
        self.dir.path()
    }
}

impl Drop for NatsCluster {
    fn drop(&mut self) {
        for server in &mut self.servers {
            server.kill9();
        }
    }
}
