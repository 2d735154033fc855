//! How the idle scenario's connections reach the broker: plain TCP, TLS
//! (`[mqtt.tls]`, Mosquitto's `certfile`) or MQTT over WebSocket
//! (`[websocket]`), each opened and taken through CONNECT/CONNACK, then
//! held doing nothing. Also the throwaway certificate the comparison
//! gives the brokers' TLS listeners.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use bytes::BytesMut;
use futures_util::{SinkExt, StreamExt};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, ServerName};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::rustls::{self, ClientConfig, RootCertStore};
use tokio_rustls::TlsConnector;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;

use crate::client::{self, KEEP_ALIVE};
use crate::wire;

const IO_TIMEOUT: Duration = Duration::from_secs(10);

/// The WebSocket path both chatmq (`websocket.path`) and the load tool use.
pub const WS_PATH: &str = "/mqtt";

/// The transport of a run's connections (idle scenario).
#[derive(Debug, Clone, Default)]
pub enum Transport {
    #[default]
    Tcp,
    /// TLS, trusting the CA in this configuration; server name `localhost`.
    Tls(Arc<ClientConfig>),
    /// `ws://addr/mqtt`, subprotocol `mqtt`.
    WebSocket,
}

impl Transport {
    /// The name a run over this transport has in the report (its variant).
    pub fn variant(&self) -> Option<&'static str> {
        match self {
            Transport::Tcp => None,
            Transport::Tls(_) => Some("tls"),
            Transport::WebSocket => Some("websocket"),
        }
    }
}

/// A connection that got its CONNACK; dropping it closes it.
pub type Held = Box<dyn Send>;

/// Dials `addr` over `transport`, sends a clean CONNECT as `client_id` and
/// waits for a successful CONNACK.
pub async fn open(transport: &Transport, addr: SocketAddr, client_id: &str) -> Result<Held> {
    match transport {
        Transport::Tcp => Ok(Box::new(
            client::connect(addr, client_id, None).await?.into_stream(),
        )),
        Transport::Tls(config) => {
            let tcp = dial(addr).await?;
            let name = ServerName::try_from("localhost").map_err(|e| anyhow!("{e}"))?;
            let tls = timed(TlsConnector::from(config.clone()).connect(name, tcp))
                .await?
                .context("TLS handshake")?;
            Ok(Box::new(connect_over(tls, client_id).await?))
        }
        Transport::WebSocket => {
            let tcp = dial(addr).await?;
            let mut request = format!("ws://{addr}{WS_PATH}").into_client_request()?;
            request
                .headers_mut()
                .insert("Sec-WebSocket-Protocol", "mqtt".parse()?);
            let (mut ws, _) = timed(tokio_tungstenite::client_async(request, tcp))
                .await?
                .context("WebSocket upgrade")?;
            let mut out = BytesMut::new();
            wire::connect(&mut out, client_id, None, true, KEEP_ALIVE);
            ws.send(Message::Binary(out.freeze())).await?;
            let mut buf = BytesMut::new();
            loop {
                match timed(ws.next()).await? {
                    Some(Ok(Message::Binary(b))) => buf.extend_from_slice(&b),
                    Some(Ok(_)) => continue,
                    Some(Err(e)) => bail!("WebSocket: {e}"),
                    None => bail!("broker closed the WebSocket"),
                }
                if let Some(f) = wire::next_frame(&mut buf).map_err(|e| anyhow!(e))? {
                    accepted(&f, client_id)?;
                    return Ok(Box::new(ws));
                }
            }
        }
    }
}

async fn dial(addr: SocketAddr) -> Result<TcpStream> {
    let tcp = timed(TcpStream::connect(addr))
        .await?
        .with_context(|| format!("connecting to {addr}"))?;
    tcp.set_nodelay(true)?;
    Ok(tcp)
}

async fn timed<F: std::future::Future>(f: F) -> Result<F::Output> {
    tokio::time::timeout(IO_TIMEOUT, f)
        .await
        .map_err(|_| anyhow!("broker did not answer within {IO_TIMEOUT:?}"))
}

/// CONNECT/CONNACK over an already open byte stream (TLS).
async fn connect_over<S: AsyncRead + AsyncWrite + Unpin>(mut s: S, client_id: &str) -> Result<S> {
    let mut out = BytesMut::new();
    wire::connect(&mut out, client_id, None, true, KEEP_ALIVE);
    s.write_all(&out).await?;
    s.flush().await?;
    let mut buf = BytesMut::with_capacity(64);
    loop {
        if let Some(f) = wire::next_frame(&mut buf).map_err(|e| anyhow!(e))? {
            accepted(&f, client_id)?;
            return Ok(s);
        }
        if timed(s.read_buf(&mut buf)).await?? == 0 {
            bail!("broker closed the connection");
        }
    }
}

fn accepted(f: &wire::Frame, client_id: &str) -> Result<()> {
    if f.kind != wire::CONNACK {
        bail!("expected CONNACK, got packet type {}", f.kind);
    }
    match f.body.get(1) {
        Some(0) => Ok(()),
        Some(code) => bail!("CONNACK refused {client_id}: return code {code}"),
        None => bail!("short CONNACK"),
    }
}

/// Writes a self-signed certificate for `localhost` and 127.0.0.1 and its
/// key as PEM. Clients trust the certificate itself ([`client_config`]).
pub fn self_signed(cert: &Path, key: &Path) -> Result<()> {
    let names = vec!["localhost".to_string(), "127.0.0.1".to_string()];
    let certified = rcgen::generate_simple_self_signed(names)?;
    std::fs::write(cert, certified.cert.pem())?;
    std::fs::write(key, certified.signing_key.serialize_pem())?;
    Ok(())
}

/// A TLS client configuration trusting only the certificates in `ca` (PEM).
pub fn client_config(ca: &Path) -> Result<Arc<ClientConfig>> {
    let mut roots = RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(ca).with_context(|| format!("{}", ca.display()))? {
        roots.add(cert.with_context(|| format!("{}", ca.display()))?)?;
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Arc::new(config))
}
