//! A stand-in for push services: an axum server on 127.0.0.1:0 inside the
//! test process that records every request (HTTP/1.1, or HTTP/2 with prior
//! knowledge, as axum serves both) and answers with scripted replies.
//! [`Mock::start_tls`] serves the same over TLS with a [`TestPki`]
//! certificate, offering HTTP/2 by ALPN, as APNs does.
//!
//! A path ending in `/token` is an OAuth2 token endpoint: it answers
//! `{"access_token": "mock-access-token", "expires_in": 3600}`. Any other
//! request takes the next scripted [`Reply`], or 200 `{}` when none is left.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::{to_bytes, Body};
use axum::extract::{Request, State};
use axum::http::{HeaderName, HeaderValue, StatusCode};
use axum::response::Response;
use axum::serve::Listener;
use axum::Router;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::rustls::{self, ServerConfig};
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;

use crate::tls::TestPki;

/// The access token the mock's token endpoint hands out.
pub const ACCESS_TOKEN: &str = "mock-access-token";

/// A request as the mock saw it.
#[derive(Debug, Clone)]
pub struct Recorded {
    pub method: String,
    pub path: String,
    /// `HTTP/1.1` or `HTTP/2.0`.
    pub version: String,
    /// Names in lower case.
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Recorded {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!(
                "request body is not JSON ({e}): {}",
                String::from_utf8_lossy(&self.body)
            )
        })
    }
}

/// A scripted answer.
#[derive(Debug, Clone)]
pub struct Reply {
    pub status: u16,
    pub headers: Vec<(&'static str, String)>,
    pub body: String,
}

impl Reply {
    pub fn status(status: u16) -> Reply {
        Reply {
            status,
            headers: Vec::new(),
            body: "{}".into(),
        }
    }

    pub fn json(status: u16, body: serde_json::Value) -> Reply {
        Reply {
            status,
            headers: vec![("content-type", "application/json".into())],
            body: body.to_string(),
        }
    }
}

#[derive(Default)]
struct Shared {
    requests: Mutex<Vec<Recorded>>,
    script: Mutex<VecDeque<Reply>>,
}

/// A running mock push service.
pub struct Mock {
    pub addr: SocketAddr,
    /// `http` or `https`.
    scheme: &'static str,
    shared: Arc<Shared>,
    task: tokio::task::JoinHandle<()>,
}

impl Mock {
    /// Plain HTTP (1.1, or 2 with prior knowledge).
    pub async fn start() -> Mock {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind mock");
        Mock::serve(listener, "http")
    }

    /// TLS with `pki`'s server certificate (for 127.0.0.1 and localhost),
    /// ALPN `h2` then `http/1.1`: a client must trust `pki.ca`.
    pub async fn start_tls(pki: &TestPki) -> Mock {
        let certs = CertificateDer::pem_file_iter(&pki.cert)
            .expect("mock certificate")
            .collect::<Result<Vec<_>, _>>()
            .expect("mock certificate PEM");
        let key = PrivateKeyDer::from_pem_file(&pki.key).expect("mock key");
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut config = ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("protocol versions")
            .with_no_client_auth()
            .with_single_cert(certs, key)
            .expect("mock TLS config");
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        let listener = TlsListener {
            tcp: TcpListener::bind("127.0.0.1:0").await.expect("bind mock"),
            acceptor: TlsAcceptor::from(Arc::new(config)),
        };
        Mock::serve(listener, "https")
    }

    fn serve<L: Listener<Addr = SocketAddr>>(listener: L, scheme: &'static str) -> Mock {
        let shared = Arc::new(Shared::default());
        let app = Router::new().fallback(record).with_state(shared.clone());
        let addr = listener.local_addr().expect("mock addr");
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Mock {
            addr,
            scheme,
            shared,
            task,
        }
    }

    /// `http://127.0.0.1:PORT` (or `https://`) + `path`.
    pub fn url(&self, path: &str) -> String {
        format!("{}://{}{path}", self.scheme, self.addr)
    }

    /// Answers the next requests (token requests aside) with `replies`.
    pub fn script(&self, replies: impl IntoIterator<Item = Reply>) {
        self.shared.script.lock().expect("script").extend(replies);
    }

    /// Every request so far whose path ends with `suffix`.
    pub fn requests(&self, suffix: &str) -> Vec<Recorded> {
        self.shared
            .requests
            .lock()
            .expect("requests")
            .iter()
            .filter(|r| r.path.ends_with(suffix))
            .cloned()
            .collect()
    }

    /// Waits until `n` requests ending with `suffix` arrived (panics after
    /// `within`) and returns them all.
    pub async fn wait_for(&self, suffix: &str, n: usize, within: Duration) -> Vec<Recorded> {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let got = self.requests(suffix);
            if got.len() >= n {
                return got;
            }
            if tokio::time::Instant::now() > deadline {
                panic!(
                    "expected {n} requests to *{suffix} within {within:?}, got {}: {got:?}",
                    got.len()
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// Accepts TCP connections and completes their TLS handshakes (one that
/// fails is dropped).
struct TlsListener {
    tcp: TcpListener,
    acceptor: TlsAcceptor,
}

impl Listener for TlsListener {
    type Io = TlsStream<TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        loop {
            let Ok((tcp, peer)) = self.tcp.accept().await else {
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            };
            if let Ok(tls) = self.acceptor.accept(tcp).await {
                return (tls, peer);
            }
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        self.tcp.local_addr()
    }
}

impl Drop for Mock {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn record(State(shared): State<Arc<Shared>>, request: Request) -> Response {
    let (parts, body) = request.into_parts();
    let body = to_bytes(body, 1 << 20).await.unwrap_or_default().to_vec();
    let path = parts.uri.path().to_string();
    let recorded = Recorded {
        method: parts.method.to_string(),
        path: path.clone(),
        version: format!("{:?}", parts.version),
        headers: parts
            .headers
            .iter()
            .map(|(n, v)| (n.to_string(), v.to_str().unwrap_or_default().to_string()))
            .collect(),
        body,
    };
    shared.requests.lock().expect("requests").push(recorded);
    let reply = if path.ends_with("/token") {
        Reply::json(
            200,
            serde_json::json!({"access_token": ACCESS_TOKEN, "expires_in": 3600, "token_type": "Bearer"}),
        )
    } else {
        shared
            .script
            .lock()
            .expect("script")
            .pop_front()
            .unwrap_or_else(|| Reply::status(200))
    };
    let mut response = Response::new(Body::from(reply.body));
    *response.status_mut() = StatusCode::from_u16(reply.status).unwrap_or(StatusCode::OK);
    for (name, value) in reply.headers {
        if let Ok(v) = HeaderValue::from_str(&value) {
            response
                .headers_mut()
                .insert(HeaderName::from_static(name), v);
        }
    }
    response
}
