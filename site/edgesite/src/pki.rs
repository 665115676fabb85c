//! The site's PKI: a cluster CA, the API server's serving certificate and the admin client
//! certificate, created on first start under `<data-dir>/server/tls` and reused afterwards. The
//! serving certificate is re-issued (same CA) when the wanted SANs change, as K3s does: at start,
//! and while the server runs ([`ServingCert`] is what the listener presents, replaced in place).

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use anyhow::{Context, Result, bail};
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType,
};

/// Where the PKI files live.
#[derive(Clone)]
pub struct Pki {
    pub dir: PathBuf,
}

/// PEM text of a certificate and its key.
#[derive(Clone)]
pub struct CertAndKey {
    pub cert: String,
    pub key: String,
}

pub fn write_private(path: &Path, contents: &str) -> Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .with_context(|| format!("create {}", tmp.display()))?;
    f.write_all(contents.as_bytes())?;
    f.sync_all()?;
    std::fs::rename(&tmp, path).with_context(|| format!("write {}", path.display()))?;
    Ok(())
}

fn validity(params: &mut CertificateParams, years: i32) {
    let now = time_now();
    params.not_before = now - rcgen_duration_days(1);
    params.not_after = now + rcgen_duration_days(365 * years as i64);
}

fn time_now() -> time::OffsetDateTime {
    time::OffsetDateTime::now_utc()
}

fn rcgen_duration_days(days: i64) -> time::Duration {
    time::Duration::days(days)
}

impl Pki {
    pub fn new(data_dir: &Path) -> Self {
        Pki {
            dir: data_dir.join("server").join("tls"),
        }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    /// Whether the site's CA exists: the site has started from this data dir before.
    pub fn has_ca(&self) -> bool {
        self.path("ca.crt").exists() && self.path("ca.key").exists()
    }

    fn read_pair(&self, name: &str) -> Option<CertAndKey> {
        let cert = std::fs::read_to_string(self.path(&format!("{name}.crt"))).ok()?;
        let key = std::fs::read_to_string(self.path(&format!("{name}.key"))).ok()?;
        Some(CertAndKey { cert, key })
    }

    fn write_pair(&self, name: &str, pair: &CertAndKey) -> Result<()> {
        write_private(&self.path(&format!("{name}.key")), &pair.key)?;
        write_private(&self.path(&format!("{name}.crt")), &pair.cert)?;
        Ok(())
    }

    /// The key that signs ServiceAccount tokens (PKCS#8 DER), created when absent (K3s keeps
    /// it as `service.key` too).
    pub fn service_account_key(&self) -> Result<Vec<u8>> {
        std::fs::create_dir_all(&self.dir)
            .with_context(|| format!("create {}", self.dir.display()))?;
        let path = self.path("service.key");
        if let Ok(pem) = std::fs::read_to_string(&path) {
            let key = KeyPair::from_pem(&pem)
                .with_context(|| format!("read the service account key {}", path.display()))?;
            return Ok(key.serialize_der());
        }
        let key = KeyPair::generate().context("generate the service account key")?;
        write_private(&path, &key.serialize_pem())?;
        Ok(key.serialize_der())
    }

    /// The CA, created when absent.
    pub fn ca(&self) -> Result<CertAndKey> {
        std::fs::create_dir_all(&self.dir)
            .with_context(|| format!("create {}", self.dir.display()))?;
        if let Some(pair) = self.read_pair("ca") {
            return Ok(pair);
        }
        let key = KeyPair::generate().context("generate CA key")?;
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        let mut dn = DistinguishedName::new();
        dn.push(
            DnType::CommonName,
            format!("edgesite-ca@{}", time_now().unix_timestamp()),
        );
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        validity(&mut params, 10);
        let cert = params.self_signed(&key).context("self-sign the CA")?;
        let pair = CertAndKey {
            cert: cert.pem(),
            key: key.serialize_pem(),
        };
        self.write_pair("ca", &pair)?;
        Ok(pair)
    }

    fn issue(&self, ca: &CertAndKey, mut params: CertificateParams) -> Result<CertAndKey> {
        let ca_key = KeyPair::from_pem(&ca.key).context("read the CA key")?;
        let issuer =
            Issuer::from_ca_cert_pem(&ca.cert, ca_key).context("read the CA certificate")?;
        let key = KeyPair::generate()?;
        validity(&mut params, 1);
        let cert = params
            .signed_by(&key, &issuer)
            .context("sign certificate")?;
        Ok(CertAndKey {
            cert: cert.pem(),
            key: key.serialize_pem(),
        })
    }

    /// The serving certificate for the given names and addresses, re-issued when they change.
    pub fn serving(&self, ca: &CertAndKey, sans: &[String]) -> Result<CertAndKey> {
        let record = sans.join("\n");
        let record_path = self.path("serving.sans");
        if let (Some(pair), Ok(previous)) = (
            self.read_pair("serving"),
            std::fs::read_to_string(&record_path),
        ) && previous == record
        {
            return Ok(pair);
        }
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, "edgesite");
        params.distinguished_name = dn;
        for san in sans {
            match san.parse::<IpAddr>() {
                Ok(ip) => params.subject_alt_names.push(SanType::IpAddress(ip)),
                Err(_)
                    if !san
                        .chars()
                        .all(|c| c.is_ascii_alphanumeric() || "-.*".contains(c))
                        || san.is_empty() =>
                {
                    bail!("--tls-san {san:?} is not a valid DNS name or IP address")
                }
                Err(_) => params.subject_alt_names.push(SanType::DnsName(
                    san.as_str().try_into().with_context(|| {
                        format!("--tls-san {san:?} is not a valid DNS name or IP address")
                    })?,
                )),
            }
        }
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let pair = self.issue(ca, params)?;
        self.write_pair("serving", &pair)?;
        write_private(&record_path, &record)?;
        Ok(pair)
    }

    /// A client certificate (CN = user, O = groups).
    /// A client certificate for a user, signed now and kept nowhere (`edgesite kubeconfig`).
    pub fn user_certificate(
        &self,
        ca: &CertAndKey,
        user: &str,
        groups: &[String],
    ) -> Result<CertAndKey> {
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, user);
        for g in groups {
            dn.push(DnType::OrganizationName, g.as_str());
        }
        params.distinguished_name = dn;
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        self.issue(ca, params)
    }

    /// The embedded etcd member's certificates, signed by the site's CA (re-issued when the
    /// member's addresses change): `etcd-server` (its client port), `etcd-peer` (member to
    /// member, both directions) and `etcd-client` (the API server's). Returns their paths.
    pub fn etcd(&self, ca: &CertAndKey, addresses: &[IpAddr]) -> Result<EtcdTls> {
        let record: Vec<String> = addresses.iter().map(IpAddr::to_string).collect();
        let record = record.join("\n");
        let record_path = self.path("etcd.sans");
        let current = std::fs::read_to_string(&record_path).is_ok_and(|r| r == record)
            && ["etcd-server", "etcd-peer", "etcd-client"]
                .iter()
                .all(|n| self.read_pair(n).is_some());
        if !current {
            let member = |cn: &str, usages: Vec<ExtendedKeyUsagePurpose>| -> Result<CertAndKey> {
                let mut params = CertificateParams::new(Vec::<String>::new())?;
                let mut dn = DistinguishedName::new();
                dn.push(DnType::CommonName, cn);
                params.distinguished_name = dn;
                params
                    .subject_alt_names
                    .push(SanType::DnsName("localhost".try_into()?));
                for ip in addresses {
                    params.subject_alt_names.push(SanType::IpAddress(*ip));
                }
                params.key_usages = vec![
                    KeyUsagePurpose::DigitalSignature,
                    KeyUsagePurpose::KeyEncipherment,
                ];
                params.extended_key_usages = usages;
                self.issue(ca, params)
            };
            let both = || {
                vec![
                    ExtendedKeyUsagePurpose::ServerAuth,
                    ExtendedKeyUsagePurpose::ClientAuth,
                ]
            };
            self.write_pair("etcd-server", &member("etcd-server", both())?)?;
            self.write_pair("etcd-peer", &member("etcd-peer", both())?)?;
            self.write_pair(
                "etcd-client",
                &member("etcd-client", vec![ExtendedKeyUsagePurpose::ClientAuth])?,
            )?;
            write_private(&record_path, &record)?;
        }
        Ok(EtcdTls {
            ca: self.path("ca.crt"),
            server: (self.path("etcd-server.crt"), self.path("etcd-server.key")),
            peer: (self.path("etcd-peer.crt"), self.path("etcd-peer.key")),
            client: (self.path("etcd-client.crt"), self.path("etcd-client.key")),
        })
    }

    pub fn client(
        &self,
        ca: &CertAndKey,
        name: &str,
        user: &str,
        groups: &[&str],
    ) -> Result<CertAndKey> {
        if let Some(pair) = self.read_pair(name) {
            return Ok(pair);
        }
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, user);
        for g in groups {
            dn.push(DnType::OrganizationName, *g);
        }
        params.distinguished_name = dn;
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        let pair = self.issue(ca, params)?;
        self.write_pair(name, &pair)?;
        Ok(pair)
    }
}

/// Where an embedded etcd member's certificates are: (certificate, key) pairs.
#[derive(Debug, Clone)]
pub struct EtcdTls {
    pub ca: PathBuf,
    pub server: (PathBuf, PathBuf),
    pub peer: (PathBuf, PathBuf),
    pub client: (PathBuf, PathBuf),
}

fn certs(pem: &str) -> Result<Vec<rustls::pki_types::CertificateDer<'static>>> {
    let list: Result<Vec<_>, _> = rustls_pemfile::certs(&mut pem.as_bytes()).collect();
    let list = list.context("parse certificate PEM")?;
    if list.is_empty() {
        bail!("no certificate in PEM");
    }
    Ok(list)
}

/// The serving certificate the HTTPS listener presents, replaceable while the server runs (the
/// machine's addresses change: DHCP, a new interface).
#[derive(Debug)]
pub struct ServingCert(RwLock<Arc<rustls::sign::CertifiedKey>>);

impl ServingCert {
    pub fn new(serving: &CertAndKey) -> Result<Arc<ServingCert>> {
        Ok(Arc::new(ServingCert(RwLock::new(certified_key(serving)?))))
    }

    /// Presents `serving` from the next handshake on.
    pub fn replace(&self, serving: &CertAndKey) -> Result<()> {
        let key = certified_key(serving)?;
        *self.0.write().unwrap_or_else(|e| e.into_inner()) = key;
        Ok(())
    }
}

impl rustls::server::ResolvesServerCert for ServingCert {
    fn resolve(
        &self,
        _: rustls::server::ClientHello<'_>,
    ) -> Option<Arc<rustls::sign::CertifiedKey>> {
        Some(self.0.read().unwrap_or_else(|e| e.into_inner()).clone())
    }
}

fn certified_key(serving: &CertAndKey) -> Result<Arc<rustls::sign::CertifiedKey>> {
    let key = rustls_pemfile::private_key(&mut serving.key.as_bytes())
        .context("parse the serving key")?
        .context("no key in the serving key file")?;
    let signing = rustls::crypto::ring::default_provider()
        .key_provider
        .load_private_key(key)
        .context("load the serving key")?;
    Ok(Arc::new(rustls::sign::CertifiedKey::new(
        certs(&serving.cert)?,
        signing,
    )))
}

/// rustls server configuration: the serving certificate, client certificates from the CA
/// accepted (but optional, so bearer tokens work), ALPN h2 and http/1.1.
pub fn server_tls(ca: &CertAndKey, serving: Arc<ServingCert>) -> Result<Arc<rustls::ServerConfig>> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    for c in certs(&ca.cert)? {
        roots.add(c).context("add the CA to the trust store")?;
    }
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
        Arc::new(roots),
        provider.clone(),
    )
    .allow_unauthenticated()
    .build()
    .context("build the client certificate verifier")?;
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .context("TLS protocol versions")?
        .with_client_cert_verifier(verifier)
        .with_cert_resolver(serving);
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// A key and a certificate request for `system:node:<node>` (the agent side of joining).
pub fn node_csr(node: &str) -> Result<(String, String)> {
    identity_csr(&format!("system:node:{node}"), "system:nodes")
}

/// A key and a certificate request for a site's link to a cloud hub.
/// When `cert_pem` starts and stops being valid.
pub fn validity_of(cert_pem: &str) -> Result<(std::time::SystemTime, std::time::SystemTime)> {
    let der = rustls_pemfile::certs(&mut cert_pem.as_bytes())
        .next()
        .context("no certificate in the PEM")??;
    let (_, cert) = x509_parser::parse_x509_certificate(der.as_ref())
        .map_err(|e| anyhow::anyhow!("the certificate cannot be read: {e}"))?;
    let at = |t: x509_parser::time::ASN1Time| {
        std::time::UNIX_EPOCH + std::time::Duration::from_secs(t.timestamp().max(0) as u64)
    };
    Ok((
        at(cert.validity().not_before),
        at(cert.validity().not_after),
    ))
}

pub fn site_csr(site: &str) -> Result<(String, String)> {
    identity_csr(
        &format!("{}{site}", apiserver_lite::cloud_link::SITE_PREFIX),
        apiserver_lite::cloud_link::SITES_GROUP,
    )
}

fn identity_csr(common_name: &str, organization: &str) -> Result<(String, String)> {
    let key = KeyPair::generate().context("generate the key")?;
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, common_name);
    dn.push(DnType::OrganizationName, organization);
    params.distinguished_name = dn;
    let csr = params
        .serialize_request(&key)
        .context("make the certificate request")?;
    Ok((csr.pem()?, key.serialize_pem()))
}

/// A key and a `kubernetes.io/kubelet-serving` request for `node`: subject
/// `system:node:<node>` in `system:nodes`, the node's names and IPs as its alternative names.
pub fn kubelet_serving_csr(node: &str, dns: &[String], ips: &[String]) -> Result<(String, String)> {
    let key = KeyPair::generate().context("generate the kubelet serving key")?;
    let mut params = CertificateParams::new(dns.to_vec())?;
    for ip in ips {
        let ip: std::net::IpAddr = ip.parse().with_context(|| format!("address {ip:?}"))?;
        params.subject_alt_names.push(rcgen::SanType::IpAddress(ip));
    }
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, format!("system:node:{node}"));
    dn.push(DnType::OrganizationName, "system:nodes");
    params.distinguished_name = dn;
    let csr = params
        .serialize_request(&key)
        .context("make the certificate request")?;
    Ok((csr.pem()?, key.serialize_pem()))
}

/// What a `kubernetes.io/kubelet-serving` request names: the node (from `system:node:<node>`
/// in `system:nodes`), its DNS names and its IPs. Errors for anything else in it (upstream's
/// rules: no email or URI names, at least one DNS name or IP).
pub fn kubelet_serving_names(csr_pem: &str) -> Result<(String, Vec<String>, Vec<String>)> {
    let csr = rcgen::CertificateSigningRequestParams::from_pem(csr_pem)
        .context("the certificate request is not a valid PEM CSR")?;
    let params = &csr.params;
    let text = |t: DnType| params.distinguished_name.get(&t).map(dn_text);
    let cn = text(DnType::CommonName).unwrap_or_default();
    let org = text(DnType::OrganizationName).unwrap_or_default();
    let Some(node) = cn.strip_prefix("system:node:").filter(|n| !n.is_empty()) else {
        anyhow::bail!("the subject must be system:node:<name>, not {cn:?}");
    };
    if org != "system:nodes" {
        anyhow::bail!("the organization must be system:nodes, not {org:?}");
    }
    let (mut dns, mut ips) = (Vec::new(), Vec::new());
    for san in &params.subject_alt_names {
        match san {
            rcgen::SanType::DnsName(d) => dns.push(d.as_str().to_string()),
            rcgen::SanType::IpAddress(ip) => ips.push(ip.to_string()),
            _ => anyhow::bail!("only DNS names and IP addresses may be asked for"),
        }
    }
    if dns.is_empty() && ips.is_empty() {
        anyhow::bail!("at least one DNS name or IP address is required");
    }
    Ok((node.to_string(), dns, ips))
}

fn dn_text(value: &rcgen::DnValue) -> String {
    match value {
        rcgen::DnValue::Utf8String(s) => s.clone(),
        rcgen::DnValue::PrintableString(s) => s.as_str().to_string(),
        rcgen::DnValue::Ia5String(s) => s.as_str().to_string(),
        other => format!("{other:?}"),
    }
}

/// Signs an approved `kubernetes.io/kubelet-serving` request: its subject and names as asked
/// (checked by [`kubelet_serving_names`] first), for server authentication, a year.
pub fn sign_kubelet_serving_csr(ca: &CertAndKey, csr_pem: &str) -> Result<String> {
    let mut csr = rcgen::CertificateSigningRequestParams::from_pem(csr_pem)
        .context("the certificate request is not a valid PEM CSR")?;
    kubelet_serving_names(csr_pem)?;
    let ca_key = KeyPair::from_pem(&ca.key).context("read the CA key")?;
    let issuer = Issuer::from_ca_cert_pem(&ca.cert, ca_key).context("read the CA certificate")?;
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    params.distinguished_name = csr.params.distinguished_name.clone();
    params.subject_alt_names = csr.params.subject_alt_names.clone();
    params.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
    ];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    let mut serial: [u8; 16] = rand::random();
    serial[0] &= 0x7f;
    params.serial_number = Some(rcgen::SerialNumber::from_slice(&serial));
    validity(&mut params, 1);
    csr.params = params;
    let cert = csr
        .signed_by(&issuer)
        .context("sign the kubelet serving certificate")?;
    Ok(cert.pem())
}

/// Signs a joining node's request. The subject is set here, whatever the request says: the
/// node gets `system:node:<node>` in `system:nodes`, a client certificate for one year.
pub fn sign_node_csr(ca: &CertAndKey, node: &str, csr_pem: &str) -> Result<String> {
    sign_identity_csr(
        ca,
        &format!("system:node:{node}"),
        "system:nodes",
        csr_pem,
        std::time::Duration::from_secs(365 * 86_400),
    )
}

/// Signs a client certificate for a site attached to a cloud hub (`system:site:<site>` in
/// group `edgesite:sites`).
pub fn sign_site_csr(
    ca: &CertAndKey,
    site: &str,
    csr_pem: &str,
    lifetime: std::time::Duration,
) -> Result<String> {
    sign_identity_csr(
        ca,
        &format!("{}{site}", apiserver_lite::cloud_link::SITE_PREFIX),
        apiserver_lite::cloud_link::SITES_GROUP,
        csr_pem,
        lifetime,
    )
}

/// Signs `csr_pem`'s key as `common_name` in `organization` (a client certificate valid for
/// `lifetime`), whatever names the request itself asked for.
fn sign_identity_csr(
    ca: &CertAndKey,
    common_name: &str,
    organization: &str,
    csr_pem: &str,
    lifetime: std::time::Duration,
) -> Result<String> {
    let mut csr = rcgen::CertificateSigningRequestParams::from_pem(csr_pem)
        .context("the certificate request is not a valid PEM CSR")?;
    let ca_key = KeyPair::from_pem(&ca.key).context("read the CA key")?;
    let issuer = Issuer::from_ca_cert_pem(&ca.cert, ca_key).context("read the CA certificate")?;
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, common_name);
    dn.push(DnType::OrganizationName, organization);
    params.distinguished_name = dn;
    params.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
    ];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    // A random serial: the site remembers it to tell this certificate from the node's earlier
    // and later ones (`edgesite node remove` revokes it).
    let mut serial: [u8; 16] = rand::random();
    serial[0] &= 0x7f;
    params.serial_number = Some(rcgen::SerialNumber::from_slice(&serial));
    let now = time_now();
    // Backdated a little for clocks that run behind (a tenth of a short lifetime, at most five
    // minutes, so that two thirds of the span still fall after the signing).
    let lifetime = lifetime.as_secs() as i64;
    params.not_before = now - time::Duration::seconds((lifetime / 10).min(300));
    params.not_after = now + time::Duration::seconds(lifetime);
    csr.params = params;
    let cert = csr.signed_by(&issuer).context("sign the certificate")?;
    Ok(cert.pem())
}

/// Signs an approved request for a client certificate (`kubernetes.io/kube-apiserver-client`):
/// the subject is the request's own (CN = user, O = groups), valid for `seconds` (at most a
/// year), for client authentication only.
pub fn sign_client_csr(ca: &CertAndKey, csr_pem: &str, seconds: i64) -> Result<String> {
    let mut csr = rcgen::CertificateSigningRequestParams::from_pem(csr_pem)
        .context("the certificate request is not a valid PEM CSR")?;
    let ca_key = KeyPair::from_pem(&ca.key).context("read the CA key")?;
    let issuer = Issuer::from_ca_cert_pem(&ca.cert, ca_key).context("read the CA certificate")?;
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    params.distinguished_name = csr.params.distinguished_name.clone();
    if params.distinguished_name.get(&DnType::CommonName).is_none() {
        anyhow::bail!("the certificate request has no common name (the user name)");
    }
    params.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
    ];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    let now = time_now();
    // Backdated a little for clocks that run behind, as upstream's signer does.
    params.not_before = now - time::Duration::minutes(5);
    params.not_after = now + time::Duration::seconds(seconds.clamp(600, 365 * 24 * 3600));
    csr.params = params;
    let cert = csr
        .signed_by(&issuer)
        .context("sign the client certificate")?;
    Ok(cert.pem())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pki_is_created_once_and_reissued_on_new_sans() {
        let dir = tempfile::tempdir().unwrap();
        let pki = Pki::new(dir.path());
        let ca = pki.ca().unwrap();
        assert_eq!(pki.ca().unwrap().cert, ca.cert);
        let a = pki
            .serving(&ca, &["localhost".into(), "127.0.0.1".into()])
            .unwrap();
        let same = pki
            .serving(&ca, &["localhost".into(), "127.0.0.1".into()])
            .unwrap();
        assert_eq!(a.cert, same.cert);
        let b = pki
            .serving(
                &ca,
                &[
                    "localhost".into(),
                    "127.0.0.1".into(),
                    "site.example".into(),
                ],
            )
            .unwrap();
        assert_ne!(a.cert, b.cert);
        let admin = pki
            .client(&ca, "admin", "admin", &["system:masters"])
            .unwrap();
        let der = certs(&admin.cert).unwrap();
        let id = apiserver_lite::auth::identity_from_certificate(der[0].as_ref()).unwrap();
        assert_eq!(id.user, "admin");
        assert!(id.groups.contains(&"system:masters".to_string()));
        assert!(server_tls(&ca, ServingCert::new(&b).unwrap()).is_ok());
        assert!(pki.serving(&ca, &["not a name!".into()]).is_err());
    }

    #[test]
    fn node_certificates_carry_the_node_identity_whatever_the_request_says() {
        let dir = tempfile::tempdir().unwrap();
        let pki = Pki::new(dir.path());
        let ca = pki.ca().unwrap();
        let (csr, _key) = node_csr("intruder").unwrap();
        let pem = sign_node_csr(&ca, "node-b", &csr).unwrap();
        let der = rustls_pemfile::certs(&mut pem.as_bytes())
            .next()
            .unwrap()
            .unwrap();
        let (_, cert) = x509_parser::parse_x509_certificate(&der).unwrap();
        let subject = cert.subject().to_string();
        assert!(subject.contains("CN=system:node:node-b"), "{subject}");
        assert!(subject.contains("O=system:nodes"), "{subject}");
        assert!(sign_node_csr(&ca, "node-b", "not a csr").is_err());
    }
}
