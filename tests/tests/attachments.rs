//! Attachments told as user stories (issue #13 item 5): a member uploads
//! a file to a conversation (streamed to `[attachments] dir`, named by
//! its SHA-256), the other members download it (bearer token or a signed
//! link for `<img src>`), nobody else can, a message references it, and
//! the collector removes it once nothing references it. Real binary, real
//! HTTP over a socket.

use std::path::{Path, PathBuf};
use std::time::Duration;

use chatmq_tests::chat::*;
use chatmq_tests::http::{Http, Response};
use chatmq_tests::metrics::metric;
use chatmq_tests::{v5, Broker, PATIENCE};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Uploads at most this many bytes in these tests.
const MAX_BYTES: usize = 64 * 1024;

fn config(extra: &str) -> String {
    chatmq_tests::chat::config(&format!(
        "[attachments]\nmax_bytes = {MAX_BYTES}\n{extra}\n"
    ))
}

fn api(b: &Broker, user: &str) -> Http {
    Http::new(b.http_addr).with_token(&token(user))
}

fn attachments_dir(b: &Broker) -> PathBuf {
    b.data_dir().join("attachments")
}

/// The names in the attachments directory.
fn files(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .map(|rd| {
            rd.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}

/// A PNG's signature and header chunk, then `n` bytes of `fill`.
fn png(n: usize, fill: u8) -> Vec<u8> {
    let mut v = b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR".to_vec();
    v.extend(std::iter::repeat_n(fill, n));
    v
}

/// alice (owner) and bob in `room`; carol exists but is in no conversation.
async fn room(b: &Broker) {
    let r = api(b, "alice")
        .post(
            "/v1/conversations",
            &json!({"conv": "room", "members": ["bob"]}),
        )
        .await;
    assert_eq!(r.status, 201, "{}", r.text());
}

/// Writes `head` (request line and headers, without the blank line) and
/// `body`, and reads the whole answer (`Connection: close`).
async fn exchange(addr: std::net::SocketAddr, head: &str, body: &[u8]) -> Response {
    let talk = async {
        let mut s = TcpStream::connect(addr).await.expect("connect");
        s.write_all(format!("{head}\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes())
            .await
            .expect("write head");
        // The server may answer (and close) before the body is all sent.
        let _ = s.write_all(body).await;
        read_answer(&mut s).await
    };
    tokio::time::timeout(PATIENCE, talk)
        .await
        .expect("an answer in time")
}

async fn read_answer(s: &mut TcpStream) -> Response {
    let mut raw = Vec::new();
    let _ = s.read_to_end(&mut raw).await;
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .unwrap_or_else(|| panic!("no answer head in {:?}", String::from_utf8_lossy(&raw)));
    let head = String::from_utf8_lossy(&raw[..split]).into_owned();
    let mut lines = head.split("\r\n");
    let status = lines.next().unwrap_or("")[9..12].parse().expect("status");
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    Response {
        status,
        headers,
        body: raw[split + 4..].to_vec(),
    }
}

/// `user` uploads `body` as `content_type` to `conv`.
async fn upload(b: &Broker, user: &str, conv: &str, content_type: &str, body: &[u8]) -> Response {
    let head = format!(
        "POST /v1/conversations/{conv}/attachments HTTP/1.1\r\nAuthorization: Bearer {}\r\nContent-Type: {content_type}\r\nContent-Length: {}",
        token(user),
        body.len()
    );
    exchange(b.http_addr, &head, body).await
}

/// `user`'s download of `id` with a bearer token.
async fn download(b: &Broker, user: &str, id: &str) -> Response {
    let head = format!(
        "GET /v1/attachments/{id} HTTP/1.1\r\nAuthorization: Bearer {}",
        token(user)
    );
    exchange(b.http_addr, &head, b"").await
}

/// A download of `path` (a signed link) without any bearer token.
async fn fetch_link(b: &Broker, path: &str) -> Response {
    exchange(b.http_addr, &format!("GET {path} HTTP/1.1"), b"").await
}

async fn uploaded(b: &Broker, user: &str, body: &[u8]) -> Value {
    let r = upload(b, user, "room", "image/png", body).await;
    assert_eq!(r.status, 201, "{}", r.text());
    r.json()
}

#[tokio::test]
async fn a_member_uploads_a_png_and_another_member_downloads_the_same_bytes() {
    let b = Broker::start(&config(""));
    room(&b).await;
    let bytes = png(20_000, 7);
    let answer = uploaded(&b, "alice", &bytes).await;
    let id = answer["id"].as_str().expect("id").to_string();
    assert_eq!(id.len(), 64, "a SHA-256 in hex: {answer}");
    assert_eq!(answer["size"], bytes.len());
    assert_eq!(answer["content_type"], "image/png");
    assert_eq!(
        files(&attachments_dir(&b)),
        vec![id.clone()],
        "kept under its hash, no temporary file left"
    );

    let r = download(&b, "bob", &id).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.body, bytes, "the same bytes");
    assert_eq!(r.header("content-type"), Some("image/png"));
    assert_eq!(r.header("content-length"), Some(&*bytes.len().to_string()));
    assert_eq!(r.header("x-content-type-options"), Some("nosniff"));
    assert_eq!(
        r.header("content-disposition"),
        Some(&*format!("inline; filename=\"{id}.png\""))
    );

    // The upload's link works without a bearer token (for <img src>), and
    // bob can ask for one of his own.
    let url = answer["url"].as_str().expect("url");
    let r = fetch_link(&b, url).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.body, bytes);
    let r = api(&b, "bob")
        .post(&format!("/v1/attachments/{id}/token"), &json!({}))
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    let r = fetch_link(&b, r.json()["url"].as_str().expect("url")).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.body, bytes);
    assert!(metric(&b, "chatmq_attachment_uploads_total").await >= 1.0);
}

#[tokio::test]
async fn a_non_member_can_neither_download_nor_upload() {
    let b = Broker::start(&config(""));
    room(&b).await;
    let id = uploaded(&b, "alice", &png(100, 1)).await["id"]
        .as_str()
        .expect("id")
        .to_string();

    // carol is told what anyone asking for a file that does not exist is
    // told: nothing that confirms some conversation holds it.
    let r = download(&b, "carol", &id).await;
    assert_eq!(r.status, 404, "{}", r.text());
    assert_eq!(r.error_code(), "not_found");
    assert!(r
        .header("content-type")
        .is_some_and(|t| t.starts_with("application/json")));
    let unknown = download(&b, "carol", &"0".repeat(64)).await;
    assert_eq!((unknown.status, unknown.body), (r.status, r.body));
    let r = api(&b, "carol")
        .post(&format!("/v1/attachments/{id}/token"), &json!({}))
        .await;
    assert_eq!(r.status, 404, "{}", r.text());
    // No token at all, or a forged link.
    let r = fetch_link(&b, &format!("/v1/attachments/{id}")).await;
    assert_eq!(r.status, 401, "{}", r.text());
    let forged = format!(
        "/v1/attachments/{id}?token=carol.9999999999.{}",
        "ab".repeat(32)
    );
    assert_eq!(fetch_link(&b, &forged).await.status, 401);

    let r = upload(&b, "carol", "room", "image/png", &png(100, 2)).await;
    assert_eq!(r.status, 403, "{}", r.text());
    assert_eq!(r.error_code(), "not_member");
    assert_eq!(
        files(&attachments_dir(&b)),
        vec![id],
        "nothing of carol's kept"
    );

    // Once bob leaves the room, he cannot fetch it either.
    let r = api(&b, "alice")
        .delete("/v1/conversations/room/members/bob")
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    let id = files(&attachments_dir(&b)).remove(0);
    assert_eq!(download(&b, "bob", &id).await.status, 404);
    assert_eq!(download(&b, "alice", &id).await.status, 200);
}

#[tokio::test]
async fn an_oversize_upload_is_refused_with_413_without_being_kept() {
    let b = Broker::start(&config(""));
    room(&b).await;
    let dir = attachments_dir(&b);

    // A huge declared length is refused before any byte of the body.
    let head = format!(
        "POST /v1/conversations/room/attachments HTTP/1.1\r\nAuthorization: Bearer {}\r\nContent-Type: image/png\r\nContent-Length: 10000000000",
        token("alice")
    );
    let r = exchange(b.http_addr, &head, b"").await;
    assert_eq!(r.status, 413, "{}", r.text());
    assert_eq!(r.error_code(), "too_large");

    // A chunked body with no length is cut off once it passes the limit:
    // the answer comes while the body is still unfinished (no last chunk
    // sent), so the broker did not wait to hold it all.
    let mut s = TcpStream::connect(b.http_addr).await.expect("connect");
    let head = format!(
        "POST /v1/conversations/room/attachments HTTP/1.1\r\nHost: x\r\nConnection: close\r\nAuthorization: Bearer {}\r\nContent-Type: image/png\r\nTransfer-Encoding: chunked\r\n\r\n",
        token("alice")
    );
    s.write_all(head.as_bytes()).await.expect("head");
    let chunk = png(8 * 1024 - 16, 3);
    for _ in 0..(MAX_BYTES / chunk.len() + 2) {
        let framed = [
            format!("{:x}\r\n", chunk.len()).into_bytes(),
            chunk.clone(),
            b"\r\n".to_vec(),
        ]
        .concat();
        if s.write_all(&framed).await.is_err() {
            break;
        }
    }
    let r = tokio::time::timeout(PATIENCE, read_answer(&mut s))
        .await
        .expect("answered before the body ended");
    assert_eq!(r.status, 413, "{}", r.text());

    // Exactly at the limit is fine; one byte more is not.
    let exact = png(MAX_BYTES - 16, 4);
    assert_eq!(
        upload(&b, "alice", "room", "image/png", &exact)
            .await
            .status,
        201
    );
    let over = png(MAX_BYTES - 15, 4);
    assert_eq!(
        upload(&b, "alice", "room", "image/png", &over).await.status,
        413
    );
    assert_eq!(
        files(&dir).len(),
        1,
        "only the upload within the limit is kept, no temporary file: {:?}",
        files(&dir)
    );
    assert!(metric(&b, "chatmq_attachment_refused_total{reason=\"too_large\"}").await >= 3.0);
}

#[tokio::test]
async fn a_type_not_allowed_or_a_lie_about_it_is_refused_with_415() {
    let b = Broker::start(&config(""));
    room(&b).await;
    let r = upload(
        &b,
        "alice",
        "room",
        "text/html",
        b"<script>alert(1)</script>",
    )
    .await;
    assert_eq!(r.status, 415, "{}", r.text());
    assert_eq!(r.error_code(), "unsupported_type");
    // HTML declared as a PNG, and a PNG declared as a JPEG.
    let r = upload(
        &b,
        "alice",
        "room",
        "image/png",
        b"<html><script>alert(1)</script>",
    )
    .await;
    assert_eq!(r.status, 415, "{}", r.text());
    let r = upload(&b, "alice", "room", "image/jpeg", &png(100, 5)).await;
    assert_eq!(r.status, 415, "{}", r.text());
    let r = upload(&b, "alice", "room", "image/png", &png(100, 5)).await;
    assert_eq!(r.status, 201, "{}", r.text());
    assert_eq!(
        files(&attachments_dir(&b)).len(),
        1,
        "only the true PNG kept: {:?}",
        files(&attachments_dir(&b))
    );
}

#[tokio::test]
async fn the_same_file_uploaded_twice_is_one_file() {
    let b = Broker::start(&config(""));
    room(&b).await;
    let bytes = png(5000, 9);
    let first = uploaded(&b, "alice", &bytes).await;
    let second = uploaded(&b, "bob", &bytes).await;
    assert_eq!(first["id"], second["id"]);
    let other = uploaded(&b, "bob", &png(5000, 8)).await;
    assert_ne!(first["id"], other["id"]);
    assert_eq!(
        files(&attachments_dir(&b)).len(),
        2,
        "{:?}",
        files(&attachments_dir(&b))
    );
}

#[tokio::test]
async fn a_message_referencing_an_attachment_is_delivered_with_the_reference() {
    let b = Broker::start(&config(""));
    room(&b).await;
    let mut bob = v5_user(&b, "bob").await;
    bob.subscribe("chat/room", v5::QoS::AtLeastOnce).await;
    let id = uploaded(&b, "alice", &png(300, 1)).await["id"].clone();
    let body = json!({"text": "look", "attachments": [{"id": id, "name": "cat.png"}]});
    let r = api(&b, "alice")
        .post(
            "/v1/conversations/room/messages",
            &json!({"id": "m1", "body": body}),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    let got = v5_until(&mut bob, PATIENCE, |g| {
        g.iter().any(|p| v5_topic(p) == "chat/room")
    })
    .await;
    let message = got
        .iter()
        .find(|p| v5_topic(p) == "chat/room")
        .map(|p| json_of(&p.payload))
        .expect("the message");
    assert_eq!(message["body"]["attachments"][0]["id"], id);
    assert_eq!(message["body"]["attachments"][0]["name"], "cat.png");

    // Only what the sender uploaded to this conversation may be referenced.
    let r = api(&b, "bob")
        .post(
            "/v1/conversations/room/messages",
            &json!({"id": "m2", "body": {"attachments": [{"id": id}]}}),
        )
        .await;
    assert_eq!(r.status, 400, "not bob's upload: {}", r.text());
    assert_eq!(r.error_code(), "bad_attachment");
    // The same over MQTT: bob's publish naming alice's upload is refused
    // (0x99), alice's own is accepted.
    let refused = json!({"id": "m4", "body": {"attachments": [{"id": id}]}}).to_string();
    let ack = bob
        .publish_acked("chat/room", v5::QoS::AtLeastOnce, false, refused.as_bytes())
        .await;
    match ack {
        Some(v5::Packet::PubAck(a)) => {
            assert_eq!(a.reason, v5::PubAckReason::PayloadFormatInvalid)
        }
        other => panic!("expected a PUBACK, got {other:?}"),
    }
    let mut alice = v5_user(&b, "alice").await;
    let ack = alice
        .publish_acked(
            "chat/room",
            v5::QoS::AtLeastOnce,
            false,
            json!({"id": "m5", "body": body}).to_string().as_bytes(),
        )
        .await;
    match ack {
        Some(v5::Packet::PubAck(a)) => assert_eq!(a.reason, v5::PubAckReason::Success),
        other => panic!("expected a PUBACK, got {other:?}"),
    }
    let r = api(&b, "alice")
        .post(
            "/v1/conversations/room/messages",
            &json!({"id": "m3", "body": {"attachments": [{"id": "../../etc/passwd"}]}}),
        )
        .await;
    assert_eq!(r.status, 400, "{}", r.text());
}

/// Seconds the collector needs here: grace 1 s, a run per second.
const GC: &str = "gc_interval_secs = 1\norphan_grace_secs = 1";

async fn until_gone(path: &Path) -> bool {
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while tokio::time::Instant::now() < deadline {
        if !path.exists() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    false
}

#[tokio::test]
async fn the_collector_removes_a_file_once_nothing_references_it() {
    let b = Broker::start(&config(GC));
    room(&b).await;
    let dir = attachments_dir(&b);
    let kept = uploaded(&b, "alice", &png(300, 1)).await["id"]
        .as_str()
        .expect("id")
        .to_string();
    let orphan = uploaded(&b, "alice", &png(300, 2)).await["id"]
        .as_str()
        .expect("id")
        .to_string();
    let r = api(&b, "alice")
        .post(
            "/v1/conversations/room/messages",
            &json!({"id": "m1", "body": {"attachments": [{"id": kept}]}}),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    let seq = r.json()["seq"].as_u64().expect("seq");

    // Past the grace period the unreferenced upload goes; the referenced
    // one stays (through several collections).
    assert!(
        until_gone(&dir.join(&orphan)).await,
        "the orphan is removed: {:?}",
        files(&dir)
    );
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(dir.join(&kept).exists(), "a referenced file is kept");
    assert_eq!(download(&b, "bob", &kept).await.status, 200);
    assert_eq!(download(&b, "bob", &orphan).await.status, 404);

    // Deleting the message lets it go.
    let r = api(&b, "alice")
        .delete(&format!("/v1/conversations/room/messages/{seq}"))
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(
        until_gone(&dir.join(&kept)).await,
        "removed once unreferenced"
    );
    assert_eq!(download(&b, "bob", &kept).await.status, 404);
    assert!(metric(&b, "chatmq_attachment_gc_files_deleted_total").await >= 2.0);
}

#[tokio::test]
async fn a_download_link_expires() {
    let b = Broker::start(&config("token_ttl_secs = 1"));
    room(&b).await;
    let answer = uploaded(&b, "alice", &png(300, 1)).await;
    let url = answer["url"].as_str().expect("url").to_string();
    assert_eq!(fetch_link(&b, &url).await.status, 200);
    // A link for another file does not open this one.
    let other = uploaded(&b, "alice", &png(300, 2)).await;
    let token = url.split_once("?token=").expect("token").1;
    let r = fetch_link(
        &b,
        &format!(
            "/v1/attachments/{}?token={token}",
            other["id"].as_str().unwrap_or("")
        ),
    )
    .await;
    assert_eq!(r.status, 401, "{}", r.text());
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let r = fetch_link(&b, &url).await;
    assert_eq!(r.status, 401, "{}", r.text());
    // The bearer token still works.
    let id = answer["id"].as_str().expect("id");
    assert_eq!(download(&b, "alice", id).await.status, 200);
}
