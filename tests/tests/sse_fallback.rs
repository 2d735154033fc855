//! The fallback transport as a browser behind a WebSocket-blocking proxy
//! uses it (issue #13 item 1): `GET /v1/stream`, server-sent events over
//! plain HTTP, carrying what a chat session gets, with messages sent over
//! the HTTP API. A stream needs a user's token; a non-member sees nothing
//! of a conversation; live messages and typing arrive; a reconnect with
//! `Last-Event-ID` gets exactly the missed messages, once, in order, and
//! then live ones; idle streams get heartbeats; open streams are bounded
//! per user and in all (429 / 503, on `/metrics`); a draining node ends
//! its streams within the spread and opens no new one.

use std::time::{Duration, Instant};

use chatmq_tests::chat::{config, token};
use chatmq_tests::http::Http;
use chatmq_tests::metrics::metric_becomes;
use chatmq_tests::{Broker, PATIENCE};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// One server-sent event.
#[derive(Debug, Clone)]
struct Event {
    kind: String,
    id: Option<String>,
    data: Value,
}

/// A `GET /v1/stream` read as `EventSource` reads it (HTTP/1.0, so the
/// body is the connection's bytes to its end, no chunking to undo).
struct Stream {
    socket: TcpStream,
    buf: String,
    /// Comment lines seen (heartbeats).
    comments: usize,
}

/// The status line and head of an answer, and the open stream if 200.
async fn open(b: &Broker, query: &str, headers: &[(&str, &str)]) -> (u16, String, Stream) {
    let mut socket = TcpStream::connect(b.http_addr).await.expect("connect");
    let mut head = format!("GET /v1/stream{query} HTTP/1.0\r\nHost: x\r\n");
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str("\r\n");
    socket.write_all(head.as_bytes()).await.expect("write");
    let mut raw = Vec::new();
    let deadline = Instant::now() + PATIENCE;
    let split = loop {
        if let Some(p) = raw.windows(4).position(|w| w == b"\r\n\r\n") {
            break p;
        }
        let mut chunk = [0u8; 4096];
        let n = tokio::time::timeout_at(deadline.into(), socket.read(&mut chunk))
            .await
            .expect("no answer head in time")
            .expect("read");
        assert!(
            n > 0,
            "closed before the head: {:?}",
            String::from_utf8_lossy(&raw)
        );
        raw.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&raw[..split]).into_owned();
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .expect("status");
    let rest = String::from_utf8_lossy(&raw[split + 4..]).into_owned();
    let stream = Stream {
        socket,
        buf: rest,
        comments: 0,
    };
    (status, head, stream)
}

/// A user's stream, which must open.
async fn stream_of(b: &Broker, user: &str, last_event_id: Option<&str>) -> Stream {
    let query = format!("?access_token={}", token(user));
    let mut headers = Vec::new();
    if let Some(id) = last_event_id {
        headers.push(("Last-Event-ID", id));
    }
    let (status, head, s) = open(b, &query, &headers).await;
    assert_eq!(status, 200, "{head}");
    assert!(
        head.to_ascii_lowercase()
            .contains("content-type: text/event-stream"),
        "{head}"
    );
    s
}

impl Stream {
    /// The next event within `wait`, or `None`.
    async fn next(&mut self, wait: Duration) -> Option<Event> {
        let deadline = Instant::now() + wait;
        loop {
            while let Some(end) = self.buf.find("\n\n") {
                let block: String = self.buf.drain(..end + 2).collect();
                let mut event = Event {
                    kind: "message".into(),
                    id: None,
                    data: Value::Null,
                };
                let mut data = String::new();
                for line in block.lines() {
                    if line.starts_with(':') {
                        self.comments += 1;
                    } else if let Some(v) = line.strip_prefix("event:") {
                        event.kind = v.trim().to_string();
                    } else if let Some(v) = line.strip_prefix("id:") {
                        event.id = Some(v.trim().to_string());
                    } else if let Some(v) = line.strip_prefix("data:") {
                        data.push_str(v.trim_start());
                    }
                }
                if !data.is_empty() {
                    event.data = serde_json::from_str(&data).expect("data is JSON");
                    return Some(event);
                }
            }
            let mut chunk = [0u8; 8192];
            let read = tokio::time::timeout_at(deadline.into(), self.socket.read(&mut chunk)).await;
            match read {
                Ok(Ok(n)) if n > 0 => self.buf.push_str(&String::from_utf8_lossy(&chunk[..n])),
                _ => return None,
            }
        }
    }

    /// The next `n` chat events (others skipped), failing if they do not come.
    async fn chats(&mut self, n: usize) -> Vec<Event> {
        let mut out = Vec::new();
        let deadline = Instant::now() + PATIENCE;
        while out.len() < n {
            let left = deadline.saturating_duration_since(Instant::now());
            let e = self
                .next(left)
                .await
                .unwrap_or_else(|| panic!("only {} of {n} chat events came: {out:?}", out.len()));
            if e.kind == "chat" {
                out.push(e);
            }
        }
        out
    }

    /// Every event within `wait`.
    async fn drain(&mut self, wait: Duration) -> Vec<Event> {
        let deadline = Instant::now() + wait;
        let mut out = Vec::new();
        while let Some(e) = self
            .next(deadline.saturating_duration_since(Instant::now()))
            .await
        {
            out.push(e);
        }
        out
    }
}

fn texts(events: &[Event]) -> Vec<String> {
    events
        .iter()
        .map(|e| {
            e.data["payload"]["body"]["text"]
                .as_str()
                .unwrap_or("?")
                .to_string()
        })
        .collect()
}

fn seqs(events: &[Event]) -> Vec<u64> {
    events
        .iter()
        .map(|e| e.data["payload"]["seq"].as_u64().unwrap_or(0))
        .collect()
}

async fn send(b: &Broker, user: &str, conv: &str, text: &str) -> u64 {
    let r = Http::new(b.http_addr)
        .with_token(&token(user))
        .post(
            &format!("/v1/conversations/{conv}/messages"),
            &json!({"id": text, "body": {"text": text}}),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    r.json()["seq"].as_u64().expect("seq")
}

async fn group(b: &Broker, owner: &str, conv: &str, members: &[&str]) {
    let r = Http::new(b.http_addr)
        .with_token(&token(owner))
        .post(
            "/v1/conversations",
            &json!({"conv": conv, "title": conv, "members": members}),
        )
        .await;
    assert_eq!(r.status, 201, "{}", r.text());
}

#[tokio::test]
async fn a_stream_needs_a_users_valid_token() {
    let b = Broker::start(&config(""));
    let (status, head, _) = open(&b, "", &[]).await;
    assert_eq!(status, 401, "{head}");
    let (status, head, _) = open(&b, "?access_token=not-a-jwt", &[]).await;
    assert_eq!(status, 401, "{head}");
    let bearer = format!("Bearer {}", token("bob"));
    let (status, head, _) = open(&b, "", &[("Authorization", &bearer)]).await;
    assert_eq!(status, 200, "the header works too: {head}");
    let log = b.log();
    assert!(
        !log.contains(&token("bob")[..40]),
        "the token is never logged:\n{log}"
    );
}

#[tokio::test]
async fn a_member_gets_messages_and_typing_live_and_a_non_member_nothing() {
    let b = Broker::start(&config(""));
    group(&b, "alice", "room", &["bob"]).await;
    group(&b, "alice", "side", &["mallory"]).await;
    let mut bob = stream_of(&b, "bob", None).await;
    let mut mallory = stream_of(&b, "mallory", None).await;

    send(&b, "alice", "room", "hello bob").await;
    let got = bob.chats(1).await;
    assert_eq!(texts(&got), ["hello bob"]);
    assert_eq!(got[0].data["topic"], "chat/room");
    assert_eq!(got[0].data["payload"]["from"], "alice");
    assert_eq!(got[0].id.as_deref(), Some("room:1"));

    let typing = Http::new(b.http_addr)
        .with_token(&token("alice"))
        .post("/v1/conversations/room/typing", &json!({"typing": true}))
        .await;
    assert_eq!(typing.status, 200, "{}", typing.text());
    let seen = bob.drain(Duration::from_secs(1)).await;
    assert!(
        seen.iter().any(|e| e.kind == "typing"
            && e.data["topic"] == "typing/room"
            && e.data["payload"]["from"] == "alice"),
        "bob sees alice typing: {seen:?}"
    );
    let refused = Http::new(b.http_addr)
        .with_token(&token("mallory"))
        .post("/v1/conversations/room/typing", &json!({"typing": true}))
        .await;
    assert_eq!(refused.status, 403, "{}", refused.text());

    // What mallory's stream carries up to a message of her own
    // conversation: nothing of `room`.
    send(&b, "alice", "side", "hello mallory").await;
    let mut before = Vec::new();
    loop {
        let e = mallory.next(PATIENCE).await.expect("mallory's own message");
        let own = e.kind == "chat" && e.data["topic"] == "chat/side";
        before.push(e);
        if own {
            break;
        }
    }
    assert!(
        !before
            .iter()
            .any(|e| e.data.to_string().contains("room") || e.kind == "typing"),
        "a non-member sees nothing of the room: {before:?}"
    );
    // And a cursor naming it gives her nothing either.
    let mut resumed = stream_of(&b, "mallory", Some("room:0")).await;
    let seen = resumed.drain(Duration::from_millis(700)).await;
    assert!(
        !seen.iter().any(|e| e.kind == "chat"),
        "no history for a non-member: {seen:?}"
    );
}

#[tokio::test]
async fn a_reconnect_with_last_event_id_gets_every_missed_message_once_in_order() {
    let b = Broker::start(&config(""));
    group(&b, "alice", "room", &["bob"]).await;
    group(&b, "alice", "other", &["bob"]).await;
    let mut bob = stream_of(&b, "bob", None).await;
    for i in 1..=3 {
        send(&b, "alice", "room", &format!("m{i}")).await;
    }
    send(&b, "alice", "other", "o1").await;
    let got = bob.chats(4).await;
    let last_id = got[3].id.clone().expect("an id");
    assert_eq!(last_id, "room:3,other:1");
    drop(bob); // offline

    for i in 4..=8 {
        send(&b, "alice", "room", &format!("m{i}")).await;
    }
    send(&b, "alice", "other", "o2").await;

    let mut bob = stream_of(&b, "bob", Some(&last_id)).await;
    let missed = bob.chats(6).await;
    let room: Vec<Event> = missed
        .iter()
        .filter(|e| e.data["topic"] == "chat/room")
        .cloned()
        .collect();
    assert_eq!(texts(&room), ["m4", "m5", "m6", "m7", "m8"]);
    assert_eq!(seqs(&room), [4, 5, 6, 7, 8]);
    let other: Vec<Event> = missed
        .iter()
        .filter(|e| e.data["topic"] == "chat/other")
        .cloned()
        .collect();
    assert_eq!(texts(&other), ["o2"]);

    // Live after the catch-up, and nothing twice at the seam.
    send(&b, "alice", "room", "m9").await;
    let live = bob.chats(1).await;
    assert_eq!(texts(&live), ["m9"]);
    assert_eq!(live[0].id.as_deref(), Some("room:9,other:2"));
    let more = bob.drain(Duration::from_millis(700)).await;
    assert!(
        !more.iter().any(|e| e.kind == "chat"),
        "no duplicate: {more:?}"
    );

    // The same resume by `?cursor=` (a client that keeps its own).
    let query = format!("?access_token={}&cursor=room:7", token("bob"));
    let (status, _, mut again) = open(&b, &query, &[]).await;
    assert_eq!(status, 200);
    assert_eq!(texts(&again.chats(2).await), ["m8", "m9"]);
}

#[tokio::test]
async fn an_idle_stream_gets_heartbeats() {
    let b = Broker::start(&config("[http]\nstream_heartbeat_secs = 1\n"));
    let mut s = stream_of(&b, "bob", None).await;
    let _ = s.drain(Duration::from_millis(3500)).await;
    assert!(s.comments >= 2, "heartbeats seen: {}", s.comments);
}

#[tokio::test]
async fn open_streams_are_bounded_per_user_and_in_all() {
    let b = Broker::start(&config(
        "[http]\nstream_max_per_user = 2\nstream_max_total = 3\nstream_heartbeat_secs = 1\n",
    ));
    let bob1 = stream_of(&b, "bob", None).await;
    let _bob2 = stream_of(&b, "bob", None).await;
    let query = format!("?access_token={}", token("bob"));
    let (status, head, _) = open(&b, &query, &[]).await;
    assert_eq!(status, 429, "a third for bob: {head}");
    let _carol = stream_of(&b, "carol", None).await;
    let query = format!("?access_token={}", token("dave"));
    let (status, head, _) = open(&b, &query, &[]).await;
    assert_eq!(status, 503, "a fourth in all: {head}");
    metric_becomes(
        &b,
        "chatmq_http_stream_ends_total{outcome=\"refused\"}",
        2.0,
    )
    .await;
    metric_becomes(&b, "chatmq_http_streams", 3.0).await;

    // A closed stream gives its place back.
    drop(bob1);
    metric_becomes(&b, "chatmq_http_streams", 2.0).await;
    let _bob3 = stream_of(&b, "bob", None).await;
}

#[tokio::test]
async fn a_reader_that_falls_behind_is_cut_off_and_resumes_without_a_loss() {
    let b = Broker::start(&config("[http]\nstream_buffer = 4\n"));
    group(&b, "alice", "room", &["bob"]).await;
    let mut bob = stream_of(&b, "bob", None).await;
    // Bob reads nothing while about 16 MB come: more than the sockets'
    // buffers hold, so his stream's queue fills.
    let filler = "x".repeat(200_000);
    let http = Http::new(b.http_addr).with_token(&token("alice"));
    const N: u64 = 80;
    for i in 1..=N {
        let r = http
            .post(
                "/v1/conversations/room/messages",
                &json!({"id": format!("big-{i}"), "body": {"text": format!("big {i}"), "filler": filler}}),
            )
            .await;
        assert_eq!(r.status, 200, "{}", r.text());
    }
    metric_becomes(
        &b,
        "chatmq_http_stream_ends_total{outcome=\"cut_off\"}",
        1.0,
    )
    .await;

    // What reached him before the cut, to the end of the stream ...
    let mut got = Vec::new();
    while let Some(e) = bob.next(PATIENCE).await {
        if e.kind == "chat" {
            got.push(e);
        }
    }
    assert!(
        (got.len() as u64) < N,
        "the stream was cut off early: {}",
        got.len()
    );
    let last_id = got.last().and_then(|e| e.id.clone()).unwrap_or_default();
    // ... and the rest after a reconnect from his last id: each once, in order.
    let mut again = stream_of(&b, "bob", Some(&last_id)).await;
    got.extend(again.chats(N as usize - got.len()).await);
    assert_eq!(seqs(&got), (1..=N).collect::<Vec<_>>());
}

/// A node being drained (issue #12 item 8) treats its event streams as
/// it treats MQTT connections: a new one is refused (503 `draining`, the
/// browser tries again through the load balancer), each open one ends at
/// its own moment within the spread (`EventSource` reconnects, to another
/// node), and the node stops once they are gone, not at the drain's
/// timeout.
#[tokio::test]
async fn a_draining_node_ends_its_streams_within_the_spread_and_opens_no_new_one() {
    const ADMIN: &str = "sse-drain-admin";
    let b = Broker::start(
        &config("[drain]\nspread_secs = 3\ntimeout_secs = 30\n")
            .replace("[auth]\n", &format!("[auth]\nadmin_token = \"{ADMIN}\"\n")),
    );
    let mut streams = vec![
        stream_of(&b, "bob", None).await,
        stream_of(&b, "carol", None).await,
        stream_of(&b, "dave", None).await,
    ];
    let started = Instant::now();
    let drain = Http::new(b.http_addr)
        .with_token(ADMIN)
        .post("/v1/admin/drain", &json!({}))
        .await;
    assert_eq!(drain.status, 202, "{}", drain.text());
    let query = format!("?access_token={}", token("erin"));
    let (status, head, _) = open(&b, &query, &[]).await;
    assert_eq!(status, 503, "a new stream while draining: {head}");
    for s in &mut streams {
        while s.next(Duration::from_secs(10)).await.is_some() {}
    }
    let ended = started.elapsed();
    assert!(
        ended < Duration::from_secs(6),
        "the streams lasted {ended:?}: past the 3 s spread, up to the 30 s timeout"
    );
}
