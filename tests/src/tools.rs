//! Third-party programs the tests drive (mosquitto_pub/sub, python3 with
//! paho-mqtt, node, openssl): whether one is installed, waiting for one to
//! finish, and test keys made with openssl. `scripts/setup.sh --test` installs them all.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use crate::PATIENCE;

/// True if `program probe...` runs and succeeds; otherwise explains on
/// stderr why the calling test checks nothing.
pub fn available(program: &str, probe: &[&str]) -> bool {
    let ok = Command::new(program)
        .args(probe)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        eprintln!(
            "SKIPPED: `{program} {}` failed: a tool is missing; run scripts/setup.sh --test",
            probe.join(" ")
        );
    }
    ok
}

/// True if the Mosquitto clients are installed (their `--help` exits
/// non-zero, so spawning them is the test).
pub fn mosquitto_available() -> bool {
    let runs = |program: &str| {
        Command::new(program)
            .arg("--help")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok()
    };
    let ok = runs("mosquitto_pub") && runs("mosquitto_sub");
    if !ok {
        eprintln!(
            "SKIPPED: mosquitto_pub/mosquitto_sub are not installed (Debian: mosquitto-clients); run scripts/setup.sh --test"
        );
    }
    ok
}

/// Waits for `child` to exit within `within` and returns its output;
/// panics with what it printed if it does not.
pub fn finish_within(mut child: Child, what: &str, within: Duration) -> Output {
    let deadline = Instant::now() + within;
    loop {
        if child.try_wait().expect("wait").is_some() {
            return child.wait_with_output().expect("output");
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let out = child.wait_with_output().expect("output");
            panic!(
                "{what} did not finish; stdout:\n{}\nstderr:\n{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// [`finish_within`] twice PATIENCE.
pub fn finish(child: Child, what: &str) -> Output {
    finish_within(child, what, PATIENCE * 2)
}

/// Runs `command` to the end within `within` (stdin closed) and returns its
/// stdout; panics with both outputs if it fails.
pub fn succeed(command: &mut Command, what: &str, within: Duration) -> String {
    let child = command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {what}: {e}"));
    let out = finish_within(child, what, within);
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{what} failed: {stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

/// Generates a key pair with `openssl genpkey` (`args` pick the algorithm,
/// e.g. `["-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048"]`) into
/// `dir` as `{name}.key` and `{name}.pub.pem`; returns both paths.
pub fn openssl_pair(dir: &Path, name: &str, args: &[&str]) -> (PathBuf, PathBuf) {
    let private = dir.join(format!("{name}.key"));
    let public = dir.join(format!("{name}.pub.pem"));
    let run = |args: &[&str]| {
        let status = Command::new("openssl")
            .args(args)
            .stderr(Stdio::null())
            .status()
            .expect("openssl is needed to generate the test keys (apt-get install openssl)");
        assert!(status.success(), "openssl {args:?} failed");
    };
    let private_s = private.to_str().expect("utf-8 path");
    let mut gen = vec!["genpkey", "-out", private_s];
    gen.extend_from_slice(args);
    run(&gen);
    let public_s = public.to_str().expect("utf-8 path");
    run(&["pkey", "-in", private_s, "-pubout", "-out", public_s]);
    (private, public)
}
