//! The TLS listener's configuration: certificate chain and key from PEM
//! files, ALPN offering HTTP/2 and HTTP/1.1. The certificate is swappable:
//! a reload reads the files again (a renewed certificate is served to the
//! next handshake, without a restart), and a broken pair is refused.

use std::path::Path;
use std::sync::Arc;

use arc_swap::ArcSwap;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::ServerConfig;

/// The certificate the listener presents, replaced by reloads.
#[derive(Debug)]
pub struct ListenerCert {
    current: ArcSwap<CertifiedKey>,
}

impl ListenerCert {
    /// Reads `cert` and `key`, or says which `[server]` key is at fault and
    /// why: a file that is no PEM, a key that does not match its
    /// certificate.
    pub fn load(cert: &Path, key: &Path) -> Result<ListenerCert, (&'static str, String)> {
        Ok(ListenerCert {
            current: ArcSwap::from_pointee(certified_key(cert, key)?),
        })
    }

    /// Serves `cert` and `key` from the next handshake on; on an error the
    /// certificate in use stays.
    pub fn reload(&self, cert: &Path, key: &Path) -> Result<(), (&'static str, String)> {
        self.current.store(Arc::new(certified_key(cert, key)?));
        Ok(())
    }
}

impl ResolvesServerCert for ListenerCert {
    fn resolve(&self, _client_hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current.load_full())
    }
}

/// The listener's TLS configuration, presenting `cert`.
pub fn server_config(cert: Arc<ListenerCert>) -> Result<ServerConfig, String> {
    let mut config = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS setup: {e}"))?
        .with_no_client_auth()
        .with_cert_resolver(cert);
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(config)
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn certified_key(cert: &Path, key: &Path) -> Result<CertifiedKey, (&'static str, String)> {
    let certs = CertificateDer::pem_file_iter(cert)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|e| ("tls_cert", format!("{}: {e}", cert.display())))?;
    if certs.is_empty() {
        return Err((
            "tls_cert",
            format!("no certificate found in {}", cert.display()),
        ));
    }
    let key = PrivateKeyDer::from_pem_file(key)
        .map_err(|e| ("tls_key", format!("{}: {e}", key.display())))?;
    CertifiedKey::from_der(certs, key, &provider())
        .map_err(|e| ("tls_key", format!("does not match the certificate: {e}")))
}
