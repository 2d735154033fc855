//! The operator's commands of the `chatmq` binary, used the way an
//! operator would: `chatmq passwd` hashes a password that a broker then
//! accepts, `chatmq token` mints a JWT that the broker accepts over MQTT
//! and HTTP until it expires, `chatmq status` reports a running node, and
//! every subcommand answers `--help`.

use std::io::Write;
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use chatmq_tests::chat;
use chatmq_tests::http::Http;
use chatmq_tests::tools::{finish_within, openssl_pair};
use chatmq_tests::{binary, run_chatmq, v4, Broker, PATIENCE};
use serde_json::Value;

/// Runs `chatmq args...` in `cwd` with `input` on its standard input.
fn chatmq_with_input(cwd: &Path, args: &[&str], input: &[u8]) -> Output {
    let mut child = Command::new(binary())
        .current_dir(cwd)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn chatmq");
    let mut stdin = child.stdin.take().expect("stdin");
    stdin.write_all(input).expect("write stdin");
    drop(stdin);
    finish_within(child, &format!("chatmq {args:?}"), PATIENCE)
}

fn stdout(out: &Output) -> String {
    assert!(
        out.status.success(),
        "exit {:?}; stderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// A 3.1.1 login of `user` with `password`: `Ok` or the CONNACK refusal.
async fn login(
    b: &Broker,
    id: &str,
    user: &str,
    password: &str,
) -> Result<v4::Client, v4::ConnectReturnCode> {
    let mut o = v4::options(b.addr, id);
    o.set_credentials(user, password);
    match v4::connect(o).await {
        Ok(c) => Ok(c),
        Err(v4::ConnectionError::ConnectionRefused(code)) => Err(code),
        Err(e) => panic!("{id}: expected a CONNACK, got {e}"),
    }
}

/// The file a broker was started with (written by `Broker::command`).
fn config_of(b: &Broker) -> PathBuf {
    b.dir().join("chatmq.toml")
}

/// `chatmq token` for `user` against `config`, run in a scratch directory
/// (the default `node.data_dir` is created there, not in the broker's).
fn mint(config: &Path, user: &str, extra: &[&str]) -> Output {
    let scratch = tempfile::tempdir().expect("temp dir");
    let config = config.to_str().expect("utf-8");
    let mut args = vec!["token", "--user", user, "--config", config];
    args.extend_from_slice(extra);
    run_chatmq(scratch.path(), &args, &[])
}

/// A port nothing listens on (bound, then released).
fn free_port() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind");
    l.local_addr().expect("addr")
}

// The operator hashes bob's password with `chatmq passwd` (piped in, as a
// script would), pastes the line into `[[auth.users]]`, and starts the
// broker: bob logs in with that password and not with another one.
#[tokio::test]
async fn a_passwd_hash_lets_its_password_in_and_no_other() {
    let dir = tempfile::tempdir().expect("temp dir");
    let phc = stdout(&chatmq_with_input(
        dir.path(),
        &["passwd"],
        b"correct horse\n",
    ));
    assert!(phc.starts_with("$argon2id$"), "{phc}");
    assert_eq!(phc.lines().count(), 1, "one line: {phc}");
    let again = stdout(&chatmq_with_input(
        dir.path(),
        &["passwd"],
        b"correct horse\r\n",
    ));
    assert_ne!(phc, again, "a fresh salt each time");

    let b = Broker::start(&format!(
        "[[auth.users]]\nname = \"bob\"\npassword = \"{phc}\"\n\
         [[auth.users]]\nname = \"carol\"\npassword = \"{again}\"\n"
    ));
    login(&b, "bob-1", "bob", "correct horse")
        .await
        .expect("bob logs in with his password")
        .disconnect()
        .await;
    // The CRLF line ending was not part of carol's password.
    login(&b, "carol-1", "carol", "correct horse")
        .await
        .expect("carol logs in")
        .disconnect()
        .await;
    assert_eq!(
        login(&b, "bob-2", "bob", "correct horse ").await.err(),
        Some(v4::ConnectReturnCode::BadUserNamePassword)
    );
    assert_eq!(
        login(&b, "bob-3", "bob", "hunter2").await.err(),
        Some(v4::ConnectReturnCode::BadUserNamePassword)
    );
}

// An empty password is refused with one line, and nothing is printed on
// stdout that could be pasted into the configuration.
#[test]
fn passwd_refuses_an_empty_password() {
    let dir = tempfile::tempdir().expect("temp dir");
    for input in [&b""[..], b"\n"] {
        let out = chatmq_with_input(dir.path(), &["passwd"], input);
        assert!(!out.status.success());
        assert!(out.stdout.is_empty(), "{:?}", out.stdout);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains("empty"), "{stderr}");
    }
}

// A developer mints alice's token from the broker's own configuration:
// it logs in over MQTT and authorises HTTP API calls. One minted with a
// one-second lifetime is refused on both once that second has passed.
#[tokio::test]
async fn a_minted_token_is_accepted_until_it_expires() {
    let b = Broker::start(&chat::config(""));
    let token = stdout(&mint(&config_of(&b), "alice", &["--ttl", "1h"]));
    let short = stdout(&mint(&config_of(&b), "alice", &["--ttl", "1s"]));

    login(&b, "alice-1", "alice", &token)
        .await
        .expect("the token logs in over MQTT")
        .disconnect()
        .await;
    let api = Http::new(b.http_addr);
    let r = api.with_token(&token).get("/v1/conversations").await;
    assert_eq!(r.status, 200, "{}", r.text());
    // Not bob's: the token stands for alice only.
    assert_eq!(
        login(&b, "bob-1", "bob", &token).await.err(),
        Some(v4::ConnectReturnCode::BadUserNamePassword)
    );

    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert_eq!(
        login(&b, "alice-2", "alice", &short).await.err(),
        Some(v4::ConnectReturnCode::BadUserNamePassword),
        "an expired token logs in"
    );
    let r = api.with_token(&short).get("/v1/conversations").await;
    assert_eq!(r.status, 401, "{}", r.text());
    // The long one still works.
    login(&b, "alice-3", "alice", &token)
        .await
        .expect("the 1 h token still logs in")
        .disconnect()
        .await;
}

// A broker that requires an issuer and an audience gets both in the
// token, so the minted token is accepted there too.
#[tokio::test]
async fn a_minted_token_carries_the_required_issuer_and_audience() {
    let b = Broker::start(&chat::config("").replace(
        "[auth]\n",
        "[auth]\njwt_issuer = \"https://id.example\"\njwt_audience = \"chat\"\n",
    ));
    let token = stdout(&mint(&config_of(&b), "alice", &[]));
    login(&b, "alice-1", "alice", &token)
        .await
        .expect("the token logs in")
        .disconnect()
        .await;
    // The helper's token (no iss, no aud) is refused: the checks are on.
    assert_eq!(
        login(&b, "alice-2", "alice", &chat::token("alice"))
            .await
            .err(),
        Some(v4::ConnectReturnCode::BadUserNamePassword)
    );
}

// A broker that checks ES256 tokens against a public key: `--key` signs
// with its private half; a key that is not that half is refused by
// `chatmq token` itself, before anyone tries to log in with it.
#[tokio::test]
async fn a_token_signed_with_the_private_key_of_jwt_public_key() {
    let keys = tempfile::tempdir().expect("temp dir");
    let ec = ["-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256"];
    let (private, public) = openssl_pair(keys.path(), "jwt", &ec);
    let (other, _) = openssl_pair(keys.path(), "other", &ec);
    let b = Broker::start(&format!(
        "[auth]\njwt_public_key = \"{}\"\n",
        public.display()
    ));
    let key = private.to_str().expect("utf-8");
    let token = stdout(&mint(&config_of(&b), "alice", &["--key", key]));
    login(&b, "alice-1", "alice", &token)
        .await
        .expect("the ES256 token logs in")
        .disconnect()
        .await;
    let wrong = mint(
        &config_of(&b),
        "alice",
        &["--key", other.to_str().expect("utf-8")],
    );
    assert!(!wrong.status.success());
    assert!(wrong.stdout.is_empty());
    let stderr = String::from_utf8_lossy(&wrong.stderr);
    assert!(stderr.contains("auth.jwt_public_key"), "{stderr}");
    // Without --key there is nothing to sign with: said so.
    let none = mint(&config_of(&b), "alice", &[]);
    let stderr = String::from_utf8_lossy(&none.stderr);
    assert!(
        !none.status.success() && stderr.contains("--key"),
        "{stderr}"
    );
}

/// The value on the line of `chatmq status` that starts with `label`.
fn shown(report: &str, label: &str) -> String {
    report
        .lines()
        .map(str::trim)
        .find_map(|l| l.strip_prefix(label))
        .map(|rest| rest.trim().to_string())
        .unwrap_or_else(|| panic!("no {label:?} in:\n{report}"))
}

// Two clients are connected: `chatmq status` says the node is ready and
// has 2 MQTT connections, as text and as JSON; once one leaves, 1.
#[tokio::test]
async fn status_reports_the_connected_clients() {
    let b = Broker::start(&chat::config(""));
    let url = format!("http://{}", b.http_addr);
    let alice = chat::v4_user(&b, "alice").await;
    let bob = chat::v4_user(&b, "bob").await;
    let dir = tempfile::tempdir().expect("temp dir");

    let report = stdout(&run_chatmq(dir.path(), &["status", "--url", &url], &[]));
    assert!(report.contains("ready"), "{report}");
    assert!(!report.contains("not ready"), "{report}");
    assert_eq!(shown(&report, "MQTT connections"), "2", "{report}");
    assert_eq!(shown(&report, "sessions"), "2", "{report}");

    let json: Value = serde_json::from_str(&stdout(&run_chatmq(
        dir.path(),
        &["status", "--url", &url, "--json"],
        &[],
    )))
    .expect("JSON");
    assert_eq!(json["ready"], true, "{json}");
    assert_eq!(json["connections"], 2.0, "{json}");
    assert!(json["push_queue_depth"].is_number(), "{json}");

    bob.disconnect().await;
    let mut last = String::new();
    for _ in 0..50 {
        last = stdout(&run_chatmq(dir.path(), &["status", "--url", &url], &[]));
        if shown(&last, "MQTT connections") == "1" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(shown(&last, "MQTT connections"), "1", "{last}");
    alice.disconnect().await;
}

// Without --url, status finds the node where its configuration (file and
// environment) says the HTTP API listens; a node that is not there is one
// line on stderr and a non-zero exit.
#[tokio::test]
async fn status_reads_the_address_from_the_configuration() {
    let http = free_port().to_string();
    let b = Broker::start_with_env(&chat::config(""), &[("CHATMQ__HTTP__LISTEN", &http)]);
    let _alice = chat::v4_user(&b, "alice").await;
    let dir = tempfile::tempdir().expect("temp dir");
    let config = config_of(&b);
    let config = config.to_str().expect("utf-8");
    let env = [("CHATMQ__HTTP__LISTEN", http.as_str())];
    let report = stdout(&run_chatmq(dir.path(), &["status", "-c", config], &env));
    assert_eq!(shown(&report, "MQTT connections"), "1", "{report}");

    let nobody = format!("http://{}", free_port());
    let out = run_chatmq(dir.path(), &["status", "--url", &nobody], &[]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(stderr.contains("cannot reach"), "{stderr}");
}

// Every subcommand explains itself with --help and exits 0; the old
// forms `serve --config FILE` and `config check -c FILE` still parse.
#[test]
fn every_subcommand_has_help() {
    let dir = tempfile::tempdir().expect("temp dir");
    for args in [
        &[][..],
        &["serve"],
        &["config"],
        &["config", "check"],
        &["passwd"],
        &["token"],
        &["status"],
    ] {
        let mut args = args.to_vec();
        args.push("--help");
        let out = run_chatmq(dir.path(), &args, &[]);
        let text = stdout(&out);
        assert!(text.contains("Usage: chatmq"), "{args:?}: {text}");
    }
    let version = stdout(&run_chatmq(dir.path(), &["--version"], &[]));
    assert!(version.starts_with("chatmq "), "{version}");
    // No command: the usage, and a non-zero exit.
    let out = run_chatmq(dir.path(), &[], &[]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("Usage: chatmq"));

    std::fs::write(
        dir.path().join("c.toml"),
        "[auth]\nallow_anonymous = true\n",
    )
    .expect("write");
    for args in [
        &["config", "check", "--config", "c.toml"][..],
        &["config", "check", "-c", "c.toml"],
        &["config", "check", "--config=c.toml"],
    ] {
        let out = run_chatmq(
            dir.path(),
            args,
            &[(
                "CHATMQ__NODE__DATA_DIR",
                dir.path().join("data").to_str().expect("utf-8"),
            )],
        );
        assert!(stdout(&out).contains("c.toml is valid"), "{args:?}");
    }
}
