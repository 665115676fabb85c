//! Certificates by SNI: TLS Secrets (`kubernetes.io/tls`: `tls.crt`, `tls.key`, PEM) named by
//! the Ingresses, looked up by exact host then `*.` wildcard; any other name gets a self-signed
//! default certificate, as ingress-nginx's "fake certificate".

use std::collections::BTreeMap;
use std::sync::{Arc, RwLock};

use rustls::crypto::ring::sign::any_supported_type;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;

#[derive(Debug)]
pub struct SniResolver {
    /// Host (or `*.suffix`) -> certificate.
    certificates: RwLock<BTreeMap<String, Arc<CertifiedKey>>>,
    fallback: Arc<CertifiedKey>,
}

/// A certificate and key from PEM text.
pub fn certified_key(cert_pem: &[u8], key_pem: &[u8]) -> anyhow::Result<CertifiedKey> {
    let certs = rustls_pemfile::certs(&mut &cert_pem[..])
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| anyhow::anyhow!("tls.crt is not PEM: {e}"))?;
    if certs.is_empty() {
        anyhow::bail!("tls.crt holds no certificate");
    }
    let key = rustls_pemfile::private_key(&mut &key_pem[..])
        .map_err(|e| anyhow::anyhow!("tls.key is not PEM: {e}"))?
        .ok_or_else(|| anyhow::anyhow!("tls.key holds no private key"))?;
    let key = any_supported_type(&key).map_err(|e| anyhow::anyhow!("tls.key: {e}"))?;
    Ok(CertifiedKey::new(certs, key))
}

impl SniResolver {
    pub fn new() -> anyhow::Result<Self> {
        let key = rcgen::KeyPair::generate()?;
        let mut params = rcgen::CertificateParams::new(vec!["edgesite-ingress.invalid".into()])?;
        params.distinguished_name.push(
            rcgen::DnType::CommonName,
            "EdgeSite Ingress Default Certificate",
        );
        let cert = params.self_signed(&key)?;
        let fallback = certified_key(cert.pem().as_bytes(), key.serialize_pem().as_bytes())?;
        Ok(Self {
            certificates: RwLock::new(BTreeMap::new()),
            fallback: Arc::new(fallback),
        })
    }

    /// Replaces every host's certificate.
    pub fn set(&self, certificates: BTreeMap<String, Arc<CertifiedKey>>) {
        *self.certificates.write().unwrap_or_else(|e| e.into_inner()) = certificates;
    }

    fn lookup(&self, host: &str) -> Option<Arc<CertifiedKey>> {
        let certificates = self.certificates.read().unwrap_or_else(|e| e.into_inner());
        certificates
            .get(host)
            .cloned()
            .or_else(|| {
                let (_, suffix) = host.split_once('.')?;
                certificates.get(&format!("*.{suffix}")).cloned()
            })
            // A Gateway HTTPS listener without a hostname covers every other name.
            .or_else(|| certificates.get("").cloned())
    }
}

impl ResolvesServerCert for SniResolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let host = hello.server_name().map(str::to_ascii_lowercase);
        host.and_then(|h| self.lookup(&h))
            .or_else(|| Some(self.fallback.clone()))
    }
}

/// The server's TLS settings: SNI through `resolver`, HTTP/2 and HTTP/1.1 by ALPN.
pub fn server_config(resolver: Arc<SniResolver>) -> anyhow::Result<rustls::ServerConfig> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_cert_resolver(resolver);
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(config)
}
