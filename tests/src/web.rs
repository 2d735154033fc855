//! Browser test support: the web demo (`mobile-demo/web`) and the Node
//! scripts that drive Debian's Chromium through playwright-core.
//!
//! [`prepare`] runs `scripts/setup.sh --test` once per test process (it
//! installs Chromium and the npm packages if they are missing and builds
//! `dist/`), [`demo_broker`] starts the broker with `config/demo.toml`
//! serving that build, and [`node`] runs a script and returns what it
//! printed, failing the test with that output if it exits non-zero.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Once;
use std::time::{Duration, Instant};

use crate::Broker;

/// A browser script gets this long; the chat scenario takes about 15 s.
const SCRIPT_TIMEOUT: Duration = Duration::from_secs(240);

/// The repository root: from the environment cargo runs the test in (a
/// test binary kept in a shared target directory may have been built in
/// another checkout), else where this crate was built.
pub fn repo() -> PathBuf {
    std::env::var_os("CARGO_MANIFEST_DIR")
        .map_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")), PathBuf::from)
        .parent()
        .expect("tests/ has a parent")
        .to_path_buf()
}

/// The web demo's directory.
pub fn web_dir() -> PathBuf {
    repo().join("mobile-demo/web")
}

/// Installs what the browser tests need and builds the web demo; returns
/// the absolute path of its build (`dist/`).
pub fn prepare() -> PathBuf {
    static SETUP: Once = Once::new();
    SETUP.call_once(|| {
        let out = Command::new(repo().join("scripts/setup.sh"))
            .arg("--test")
            .output()
            .expect("run scripts/setup.sh");
        assert!(
            out.status.success(),
            "scripts/setup.sh --test failed:\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    });
    let dist = web_dir().join("dist");
    assert!(
        dist.join("index.html").is_file(),
        "{} was not built",
        dist.display()
    );
    dist
}

/// A broker configured as the one-command demo (`config/demo.toml`:
/// static users alice, bob and carol, WebSocket on) plus `extra` TOML,
/// serving the web demo's build.
pub fn demo_broker(extra: &str) -> Broker {
    demo_broker_with_env(extra, &[])
}

/// [`demo_broker`] with environment overrides of its keys too.
pub fn demo_broker_with_env(extra: &str, env: &[(&str, &str)]) -> Broker {
    let dist = prepare();
    let demo = std::fs::read_to_string(repo().join("config/demo.toml")).expect("config/demo.toml");
    let dist = dist.to_string_lossy().into_owned();
    let mut all = vec![("CHATMQ__HTTP__STATIC_DIR", dist.as_str())];
    all.extend_from_slice(env);
    Broker::start_with_env(&format!("{demo}\n{extra}\n"), &all)
}

/// Where screenshots and other output of browser tests are kept after the
/// test: `<target dir>/web-e2e/<name>`.
pub fn output_dir(name: &str) -> PathBuf {
    let target = crate::binary()
        .parent()
        .and_then(Path::parent)
        .expect("target directory")
        .to_path_buf();
    target.join("web-e2e").join(name)
}

/// Runs `node <script> <args>` in the web demo's directory; returns its
/// output, or fails the test with it if the script fails or hangs.
pub fn node(script: &str, args: &[&str]) -> String {
    let mut all = vec![script];
    all.extend_from_slice(args);
    run_node(&all, &[], None)
}

/// Runs `node <args>` in the web demo's directory with `env` and
/// `CHATMQ_CONTROL` set to a directory through which the script may ask
/// for a restart of `broker` (same data directory, same ports): it creates
/// `restart.req` there, this restarts the broker and creates
/// `restart.done`. Returns the output, or fails the test with it.
pub fn node_controlling(broker: &mut Broker, args: &[&str], env: &[(&str, &str)]) -> String {
    run_node(args, env, Some(broker))
}

fn run_node(args: &[&str], env: &[(&str, &str)], mut broker: Option<&mut Broker>) -> String {
    let log_dir = tempfile::tempdir().expect("temp dir");
    let log = log_dir.path().join("output.txt");
    let control = log_dir.path().join("control");
    std::fs::create_dir(&control).expect("control dir");
    let file = std::fs::File::create(&log).expect("log file");
    let mut child = Command::new("node")
        .args(args)
        .envs(env.iter().copied())
        .env("CHATMQ_CONTROL", &control)
        .current_dir(web_dir())
        .stdin(Stdio::null())
        .stdout(file.try_clone().expect("log file"))
        .stderr(file)
        .spawn()
        .expect("run node (scripts/setup.sh --test installs it)");
    let deadline = Instant::now() + SCRIPT_TIMEOUT;
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait for node") {
            break Some(status);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        let request = control.join("restart.req");
        if let Some(b) = broker.as_deref_mut() {
            if request.exists() {
                std::fs::remove_file(&request).expect("remove restart.req");
                b.restart();
                std::fs::write(control.join("restart.done"), b"").expect("write restart.done");
            }
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let output = std::fs::read_to_string(&log).unwrap_or_default();
    let what = args.join(" ");
    match status {
        Some(s) if s.success() => output,
        Some(s) => panic!("node {what} failed ({s}):\n{output}"),
        None => panic!("node {what} did not finish within {SCRIPT_TIMEOUT:?}:\n{output}"),
    }
}
