//! A throwaway certificate authority made at test time (rcgen): a CA and a
//! server certificate for `localhost` and 127.0.0.1 signed by it, written as
//! PEM files for the broker's `[mqtt.tls]` / `[websocket.tls]`, and client
//! settings that trust only that CA.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::CertificateDer;
use tokio_rustls::rustls::{self, ClientConfig, RootCertStore};

/// PEM files of a test CA and a server certificate it signed.
pub struct TestPki {
    /// The CA certificate, which clients trust.
    pub ca: PathBuf,
    /// The server's certificate chain (leaf, then the CA).
    pub cert: PathBuf,
    /// The server's private key (PKCS#8).
    pub key: PathBuf,
    /// A key that belongs to no certificate here, for mismatch tests.
    pub other_key: PathBuf,
}

impl TestPki {
    /// Makes the CA and the server certificate, written under `dir`.
    pub fn new(dir: &Path) -> TestPki {
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(DnType::CommonName, "chatmq test CA");
        let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate().expect("CA key"))
            .expect("self-sign the CA");
        let server_key = KeyPair::generate().expect("server key");
        let mut params =
            CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()])
                .expect("server params");
        params
            .distinguished_name
            .push(DnType::CommonName, "localhost");
        let server = params
            .signed_by(&server_key, &ca)
            .expect("sign the server certificate");
        let pki = TestPki {
            ca: dir.join("ca.pem"),
            cert: dir.join("server.crt"),
            key: dir.join("server.key"),
            other_key: dir.join("other.key"),
        };
        std::fs::write(&pki.ca, ca.pem()).expect("write CA");
        std::fs::write(&pki.cert, format!("{}{}", server.pem(), ca.pem())).expect("write cert");
        std::fs::write(&pki.key, server_key.serialize_pem()).expect("write key");
        let other = KeyPair::generate().expect("other key");
        std::fs::write(&pki.other_key, other.serialize_pem()).expect("write other key");
        pki
    }

    /// A TOML section (`[mqtt.tls]`, `[websocket.tls]`) serving this
    /// certificate on a free loopback port.
    pub fn section(&self, name: &str) -> String {
        format!(
            "[{name}]\nlisten = \"127.0.0.1:0\"\ncert = \"{}\"\nkey = \"{}\"\n",
            self.cert.display(),
            self.key.display()
        )
    }

    /// The CA certificate in PEM, as rumqttc's `TlsConfiguration::Simple` wants it.
    pub fn ca_pem(&self) -> Vec<u8> {
        std::fs::read(&self.ca).expect("read CA")
    }

    /// A rustls client configuration trusting only this CA.
    pub fn client_config(&self) -> Arc<ClientConfig> {
        let mut roots = RootCertStore::empty();
        for cert in CertificateDer::pem_file_iter(&self.ca).expect("CA file") {
            roots.add(cert.expect("CA cert")).expect("add CA");
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("protocol versions")
            .with_root_certificates(roots)
            .with_no_client_auth();
        Arc::new(config)
    }
}
