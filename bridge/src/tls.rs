//! TLS for the MQTT and WebSocket listeners (rustls, ring provider): the
//! certificate chain and key from the files a `[*.tls]` section names,
//! checked at start-up, and a handshake with a time limit.
//!
//! The certificate can be replaced while the listener runs
//! ([`TlsAcceptor::set_certificate`]): every handshake asks the acceptor's
//! resolver for the current one, so connections made after a reload get
//! the new certificate and connections already open keep the session they
//! negotiated. A 90-day certificate is renewed without a restart.

use std::io;
use std::path::Path;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use chatmq_config::Tls;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_rustls::rustls::server::{ClientHello, ResolvesServerCert};
use tokio_rustls::rustls::sign::CertifiedKey;
use tokio_rustls::rustls::{self, ServerConfig};
pub use tokio_rustls::server::TlsStream;

/// Why a TLS listener cannot be set up; names the key to fix.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{key} {path}: {problem}")]
    File {
        key: String,
        path: String,
        problem: String,
    },
    #[error("{section}: the key does not match the certificate, or is not usable: {source}")]
    Mismatch {
        section: String,
        source: rustls::Error,
    },
}

/// A certificate chain and its private key, loaded and checked to match,
/// ready for [`TlsAcceptor::set_certificate`].
#[derive(Clone)]
pub struct Certificate(Arc<CertifiedKey>);

impl Certificate {
    /// Loads `[section]`'s certificate and key (`section` names them in
    /// errors: `mqtt.tls.cert ...`).
    pub fn load(section: &str, tls: &Tls) -> Result<Certificate, TlsError> {
        let certs = load_certs(&format!("{section}.cert"), &tls.cert)?;
        let key = load_key(&format!("{section}.key"), &tls.key)?;
        let certified = CertifiedKey::from_der(certs, key, &provider()).map_err(|source| {
            TlsError::Mismatch {
                section: section.to_string(),
                source,
            }
        })?;
        Ok(Certificate(Arc::new(certified)))
    }
}

/// Hands every handshake the certificate in force.
#[derive(Debug)]
struct CurrentCertificate(RwLock<Arc<CertifiedKey>>);

impl ResolvesServerCert for CurrentCertificate {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.read().unwrap_or_else(|e| e.into_inner()).clone())
    }
}

fn provider() -> rustls::crypto::CryptoProvider {
    rustls::crypto::ring::default_provider()
}

/// Accepts TLS connections with one certificate chain, which can be
/// replaced while it runs.
#[derive(Clone)]
pub struct TlsAcceptor {
    inner: tokio_rustls::TlsAcceptor,
    current: Arc<CurrentCertificate>,
    handshake_timeout: Duration,
}

impl TlsAcceptor {
    /// Loads `[section]`'s certificate and key. `alpn` lists the protocols
    /// offered in ALPN (`http/1.1` for WebSocket; none for plain MQTT).
    pub fn from_settings(section: &str, tls: &Tls, alpn: &[&str]) -> Result<TlsAcceptor, TlsError> {
        let Certificate(certified) = Certificate::load(section, tls)?;
        let current = Arc::new(CurrentCertificate(RwLock::new(certified)));
        let mismatch = |source| TlsError::Mismatch {
            section: section.to_string(),
            source,
        };
        let mut config = ServerConfig::builder_with_provider(Arc::new(provider()))
            .with_safe_default_protocol_versions()
            .map_err(mismatch)?
            .with_no_client_auth()
            .with_cert_resolver(current.clone());
        config.alpn_protocols = alpn.iter().map(|p| p.as_bytes().to_vec()).collect();
        Ok(TlsAcceptor {
            inner: tokio_rustls::TlsAcceptor::from(Arc::new(config)),
            current,
            handshake_timeout: Duration::from_secs(tls.handshake_timeout_secs),
        })
    }

    /// Serves `certificate` from the next handshake on; connections
    /// already open are not touched.
    pub fn set_certificate(&self, certificate: Certificate) {
        *self.current.0.write().unwrap_or_else(|e| e.into_inner()) = certificate.0;
    }

    /// The server side of a handshake, within the configured time.
    pub async fn accept<S>(&self, stream: S) -> io::Result<TlsStream<S>>
    where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        tokio::time::timeout(self.handshake_timeout, self.inner.accept(stream))
            .await
            .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "TLS handshake timed out"))?
    }
}

fn file_error(key: &str, path: &Path, problem: String) -> TlsError {
    TlsError::File {
        key: key.to_string(),
        path: path.display().to_string(),
        problem,
    }
}

fn load_certs(key: &str, path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_file_iter(path)
        .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
        .map_err(|e| file_error(key, path, format!("cannot read a PEM certificate: {e}")))?;
    if certs.is_empty() {
        return Err(file_error(key, path, "no certificate in it".to_string()));
    }
    Ok(certs)
}

fn load_key(key: &str, path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    PrivateKeyDer::from_pem_file(path)
        .map_err(|e| file_error(key, path, format!("cannot read a PEM private key: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write_pair(dir: &Path, name: &str) -> (std::path::PathBuf, std::path::PathBuf) {
        let certified = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
        let cert = dir.join(format!("{name}.crt"));
        let key = dir.join(format!("{name}.key"));
        std::fs::write(&cert, certified.cert.pem()).unwrap();
        std::fs::write(&key, certified.signing_key.serialize_pem()).unwrap();
        (cert, key)
    }

    fn settings(cert: &Path, key: &Path) -> Tls {
        Tls {
            cert: cert.to_path_buf(),
            key: key.to_path_buf(),
            ..Tls::default()
        }
    }

    #[test]
    fn a_matching_pair_loads() {
        let dir = tempfile::tempdir().unwrap();
        let (cert, key) = write_pair(dir.path(), "a");
        assert!(TlsAcceptor::from_settings("mqtt.tls", &settings(&cert, &key), &[]).is_ok());
    }

    #[test]
    fn a_mismatched_pair_is_refused_naming_the_section() {
        let dir = tempfile::tempdir().unwrap();
        let (cert, _) = write_pair(dir.path(), "a");
        let (_, other_key) = write_pair(dir.path(), "b");
        let error = TlsAcceptor::from_settings("mqtt.tls", &settings(&cert, &other_key), &[])
            .err()
            .unwrap()
            .to_string();
        assert!(
            error.starts_with("mqtt.tls: the key does not match"),
            "{error}"
        );
    }

    #[test]
    fn a_key_file_without_a_key_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let (cert, _) = write_pair(dir.path(), "a");
        // The certificate where the key should be.
        let error = TlsAcceptor::from_settings("websocket.tls", &settings(&cert, &cert), &[])
            .err()
            .unwrap()
            .to_string();
        assert!(error.starts_with("websocket.tls.key "), "{error}");
        assert!(error.contains("private key"), "{error}");
    }

    #[test]
    fn a_cert_file_without_a_certificate_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let (_, key) = write_pair(dir.path(), "a");
        let error = TlsAcceptor::from_settings("mqtt.tls", &settings(&key, &key), &[])
            .err()
            .unwrap()
            .to_string();
        assert!(error.starts_with("mqtt.tls.cert "), "{error}");
        assert!(error.contains("no certificate"), "{error}");
    }
}
