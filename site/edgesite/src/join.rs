//! Joining agents to a site.
//!
//! A join token looks like K3s's: `K10<sha256 of the site CA, hex>::<credential>`. The
//! credential is either the server's cluster token or one made by `edgesite token create`
//! (`<id>.<secret>`, a bootstrap token Secret `kube-system/bootstrap-token-<id>` every server
//! takes; kept in `<data-dir>/server/agent-tokens` for this server only when the server does not
//! answer). The agent:
//!
//! 1. fetches `/cacerts` without verification and checks its hash against the token (so a
//!    man in the middle cannot pose as the site);
//! 2. sends a certificate request for `system:node:<name>` with the credential;
//! 3. keeps the signed certificate, the CA and the server URL in `<data-dir>/agent/pki`, so
//!    later starts need no token.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use sha2::Digest;

use crate::pki::CertAndKey;

const TOKENS_FILE: &str = "agent-tokens";

/// The parts of a join token.
#[derive(Debug, PartialEq)]
pub struct JoinToken {
    pub ca_hash: Option<String>,
    pub credential: String,
}

impl JoinToken {
    pub fn parse(text: &str) -> Result<JoinToken> {
        let text = text.trim();
        if text.is_empty() {
            bail!("the join token is empty: print one on the server with `edgesite token create`");
        }
        if let Some(rest) = text.strip_prefix("K10")
            && let Some((hash, credential)) = rest.split_once("::")
        {
            if hash.len() != 64 || !hash.chars().all(|c| c.is_ascii_hexdigit()) {
                bail!(
                    "the join token's CA hash is malformed: copy the whole token printed by `edgesite token create`"
                );
            }
            if credential.is_empty() {
                bail!("the join token has no credential after '::'");
            }
            return Ok(JoinToken {
                ca_hash: Some(hash.to_lowercase()),
                credential: credential.to_string(),
            });
        }
        // A bare credential (no CA pinning), as K3s accepts.
        Ok(JoinToken {
            ca_hash: None,
            credential: text.to_string(),
        })
    }
}

pub fn ca_hash(ca_pem: &str) -> String {
    format!("{:x}", sha2::Sha256::digest(ca_pem.as_bytes()))
}

fn now_unix() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// `edgesite token create`: a new agent token (printed on the last line).
pub fn create_token(data_dir: &Path, ttl: Duration) -> Result<String> {
    use std::io::Write;
    let server_dir = data_dir.join("server");
    let ca = std::fs::read_to_string(server_dir.join("tls").join("ca.crt")).with_context(|| {
        format!(
            "read the site CA in {}: is this the server's data dir (start `edgesite server` once first, or pass --data-dir)?",
            server_dir.display()
        )
    })?;
    let id: String = (0..6)
        .map(|_| {
            char::from(b"abcdefghijklmnopqrstuvwxyz0123456789"[rand::random::<u8>() as usize % 36])
        })
        .collect();
    let secret: String = (0..16)
        .map(|_| {
            char::from(b"abcdefghijklmnopqrstuvwxyz0123456789"[rand::random::<u8>() as usize % 36])
        })
        .collect();
    let expiration = (!ttl.is_zero())
        .then(|| chrono::Duration::from_std(ttl).ok())
        .flatten()
        .map(|ttl| (chrono::Utc::now() + ttl).to_rfc3339_opts(chrono::SecondsFormat::Secs, true));
    let token = format!("K10{}::{id}.{secret}", ca_hash(&ca));
    // A bootstrap token Secret: every server of the site (or hub) takes it.
    let stored = store_bootstrap_token(data_dir, &id, &secret, expiration.as_deref());
    let Err(error) = stored else {
        return Ok(token);
    };
    let path = server_dir.join(TOKENS_FILE);
    eprintln!(
        "warning: the server did not take the token ({error:#}); it is kept in {} and works with this server only",
        path.display()
    );
    let expires = if ttl.is_zero() {
        0
    } else {
        now_unix() + ttl.as_secs()
    };
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
        .with_context(|| format!("write {}", path.display()))?;
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
    }
    writeln!(f, "{id}.{secret}\t{expires}")?;
    f.sync_all()?;
    Ok(token)
}

/// Runs `work` with a client of the server's API as its admin (the admin kubeconfig in the data
/// dir), on a runtime of its own: what the CLI's server-side commands do.
fn as_admin<T, F, Fut>(data_dir: &Path, work: F) -> Result<T>
where
    F: FnOnce(kube::Client) -> Fut,
    Fut: std::future::Future<Output = Result<T>>,
{
    let kubeconfig = data_dir
        .join("server")
        .join("cred")
        .join("admin.kubeconfig");
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let kubeconfig = kube::config::Kubeconfig::read_from(&kubeconfig).with_context(|| {
            format!(
                "read {}: run this on the server (or pass --data-dir)",
                kubeconfig.display()
            )
        })?;
        let mut config = kube::Config::from_custom_kubeconfig(
            kubeconfig,
            &kube::config::KubeConfigOptions::default(),
        )
        .await?;
        config.connect_timeout = Some(Duration::from_secs(5));
        config.read_timeout = Some(Duration::from_secs(30));
        work(kube::Client::try_from(config)?).await
    })
}

/// Creates the Secret `kube-system/bootstrap-token-<id>` through the server's API (its admin
/// kubeconfig in the data dir), as `kubeadm token create` and K3s do.
fn store_bootstrap_token(
    data_dir: &Path,
    id: &str,
    secret: &str,
    expiration: Option<&str>,
) -> Result<()> {
    use k8s_openapi::ByteString;
    use k8s_openapi::api::core::v1::Secret;
    as_admin(data_dir, |client| async move {
        let mut data = std::collections::BTreeMap::new();
        let mut put = |k: &str, v: &str| {
            data.insert(k.to_string(), ByteString(v.as_bytes().to_vec()));
        };
        put("token-id", id);
        put("token-secret", secret);
        put("usage-bootstrap-authentication", "true");
        put("usage-bootstrap-signing", "true");
        put("description", "made by edgesite token create");
        if let Some(at) = expiration {
            put("expiration", at);
        }
        let object = Secret {
            metadata: kube::api::ObjectMeta {
                name: Some(format!("bootstrap-token-{id}")),
                namespace: Some("kube-system".into()),
                ..Default::default()
            },
            type_: Some(apiserver_lite::http::join::BOOTSTRAP_TOKEN_TYPE.into()),
            data: Some(data),
            ..Default::default()
        };
        kube::Api::<Secret>::namespaced(client, "kube-system")
            .create(&kube::api::PostParams::default(), &object)
            .await
            .context("create the token's Secret")?;
        Ok(())
    })
}

/// Who joins with a token: machines as nodes of a site, or sites to a cloud hub.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Joins {
    Nodes,
    /// Sites, with the lifetime of the certificates signed for them.
    Sites(std::time::Duration),
}

/// The server side: checks credentials and signs node (or, on a hub, site) certificates.
pub struct Joiner {
    pub server_dir: PathBuf,
    pub ca: CertAndKey,
    pub cluster_token: String,
    pub joins: Joins,
}

impl Joiner {
    fn valid(&self, credential: &str) -> bool {
        // The cluster token itself (K3s agents join with it too).
        if !self.cluster_token.is_empty() && constant_time_eq(credential, &self.cluster_token) {
            return true;
        }
        // Tokens from `edgesite token create`, read fresh so new ones work without a restart.
        let text = std::fs::read_to_string(self.server_dir.join(TOKENS_FILE)).unwrap_or_default();
        let now = now_unix();
        text.lines().any(|line| {
            let mut parts = line.split('\t');
            let token = parts.next().unwrap_or_default();
            let expires: u64 = parts.next().and_then(|e| e.parse().ok()).unwrap_or(0);
            !token.is_empty()
                && constant_time_eq(credential, token)
                && (expires == 0 || expires > now)
        })
    }
}

fn constant_time_eq(a: &str, b: &str) -> bool {
    a.len() == b.len()
        && a.bytes()
            .zip(b.bytes())
            .fold(0u8, |acc, (x, y)| acc | (x ^ y))
            == 0
}

impl apiserver_lite::node_streams::NodeJoin for Joiner {
    fn authorize(&self, token: &str) -> Result<(), apiserver_lite::node_streams::JoinError> {
        use apiserver_lite::node_streams::JoinError;
        let credential = JoinToken::parse(token)
            .map(|t| t.credential)
            .map_err(|_| JoinError::BadToken)?;
        if !self.valid(&credential) {
            return Err(JoinError::BadToken);
        }
        Ok(())
    }

    fn sign(
        &self,
        name: &str,
        csr: &str,
    ) -> Result<String, apiserver_lite::node_streams::JoinError> {
        match self.joins {
            Joins::Nodes => crate::pki::sign_node_csr(&self.ca, name, csr),
            Joins::Sites(lifetime) => crate::pki::sign_site_csr(&self.ca, name, csr, lifetime),
        }
        .map_err(|e| apiserver_lite::node_streams::JoinError::Invalid(format!("{e:#}")))
    }

    fn bad_token_message(&self) -> String {
        match self.joins {
            Joins::Nodes => apiserver_lite::node_streams::JoinError::BadToken.to_string(),
            Joins::Sites(_) => "the hub token is not valid (expired, revoked or mistyped): create one with `edgesite cloudhub token create` on the hub".into(),
        }
    }
}

/// The agent's stored credentials.
#[derive(Clone)]
pub struct AgentCredentials {
    pub server: String,
    pub ca: String,
    pub cert: String,
    pub key: String,
}

fn pki_dir(data_dir: &Path) -> PathBuf {
    data_dir.join("agent").join("pki")
}

fn insecure_client(proxy: Option<String>) -> Result<reqwest_like::Client> {
    reqwest_like::Client::new(proxy)
}

/// Joins (or reuses an earlier join): returns credentials for `node`.
pub async fn credentials(
    data_dir: &Path,
    server: &str,
    token: Option<&str>,
    node: &str,
) -> Result<AgentCredentials> {
    let dir = pki_dir(data_dir);
    let read = |n: &str| std::fs::read_to_string(dir.join(n));
    if let (Ok(saved_server), Ok(ca), Ok(cert), Ok(key), Ok(saved_node)) = (
        read("server"),
        read("ca.crt"),
        read("node.crt"),
        read("node.key"),
        read("node-name"),
    ) && saved_server.trim() == server
        && saved_node.trim() == node
    {
        check_server_name(server, &ca, None).await?;
        return Ok(AgentCredentials {
            server: server.to_string(),
            ca,
            cert,
            key,
        });
    }
    let Some(token) = token else {
        bail!(
            "this agent has not joined {server} yet: pass --token (print one on the server with `edgesite token create`)"
        );
    };
    let token = JoinToken::parse(token)?;
    let client = insecure_client(None)?;
    let ca = pinned_ca(&client, server, &token, "--server").await?;
    let password = machine_password(&dir, "node-password")?;
    let (csr, key) = crate::pki::node_csr(node)?;
    let body = serde_json::json!({"node": node, "csr": csr, "password": password}).to_string();
    let reply = client
        .post_json(
            &format!("{server}/edgesite/v1/node-join"),
            &token.credential,
            &body,
        )
        .await
        .context("join the site")?;
    let reply: serde_json::Value = serde_json::from_str(&reply).context("the join answer")?;
    let cert = reply["certificate"]
        .as_str()
        .context("the join answer has no certificate")?
        .to_string();
    std::fs::create_dir_all(&dir).with_context(|| format!("create {}", dir.display()))?;
    for (name, content) in [
        ("ca.crt", ca.as_str()),
        ("node.crt", cert.as_str()),
        ("node.key", key.as_str()),
        ("server", server),
        ("node-name", node),
    ] {
        crate::pki::write_private(&dir.join(name), content)?;
    }
    tracing::info!(server, node, "joined the site");
    Ok(AgentCredentials {
        server: server.to_string(),
        ca,
        cert,
        key,
    })
}

/// The CA at `server`, checked against the token's hash (so a man in the middle cannot pose as
/// the server), and the server's certificate checked to name the host in its URL.
async fn pinned_ca(
    client: &reqwest_like::Client,
    server: &str,
    token: &JoinToken,
    flag: &str,
) -> Result<String> {
    let ca = client
        .get(&format!("{server}/cacerts"))
        .await
        .with_context(|| format!("fetch the CA from {server}/cacerts"))?;
    if let Some(want) = &token.ca_hash
        && ca_hash(&ca) != *want
    {
        bail!(
            "the server at {server} presents a CA that does not match the join token: wrong {flag}, or someone in between"
        );
    }
    check_server_name(server, &ca, client.proxy()).await?;
    Ok(ca)
}

/// A site's credentials for its link to a cloud hub.
pub struct SiteCredentials {
    pub ca: String,
    pub cert: String,
    pub key: String,
}

/// Attaches a site to a hub (or reuses an earlier attachment, kept in
/// `<data-dir>/server/cloudhub`): a certificate for `system:site:<site>` from the hub.
pub async fn site_credentials(
    data_dir: &Path,
    hub: &str,
    token: Option<&str>,
    site: &str,
) -> Result<SiteCredentials> {
    let dir = data_dir.join("server").join("cloudhub");
    finish_renewal(&dir);
    let read = |n: &str| std::fs::read_to_string(dir.join(n));
    if let (Ok(saved_hub), Ok(ca), Ok(cert), Ok(key), Ok(saved_site)) = (
        read("hub"),
        read("ca.crt"),
        read("site.crt"),
        read("site.key"),
        read("site-name"),
    ) && saved_hub.trim() == hub
        && saved_site.trim() == site
    {
        let expired = crate::pki::validity_of(&cert)
            .is_ok_and(|(_, until)| until <= std::time::SystemTime::now());
        if !expired || token.is_none() {
            return Ok(SiteCredentials { ca, cert, key });
        }
        // Offline past its certificate's end: attach again with the token (the site password
        // still proves the name is this machine's).
        tracing::info!(
            hub,
            site,
            "the site certificate has expired; attaching again"
        );
    }
    let Some(token) = token else {
        bail!(
            "this site has not attached to the hub {hub} yet (or --site-name changed): pass --cloudhub-token (print one on the hub with `edgesite cloudhub token create`)"
        );
    };
    let token = JoinToken::parse(token)?;
    // Sites reach their hub through the HTTPS proxy the environment names, as the link does.
    let (host, _) = link::dial::host_port(hub)?;
    let client = insecure_client(link::dial::proxy_from_env(&host))?;
    let ca = pinned_ca(&client, hub, &token, "--cloudhub").await?;
    let (csr, key) = crate::pki::site_csr(site)?;
    crate::private_dir(&dir)?;
    let password = machine_password(&dir, "site-password")?;
    let body = serde_json::json!({"site": site, "csr": csr, "password": password}).to_string();
    let reply = client
        .post_json(
            &format!("{hub}/edgesite/v1/site-join"),
            &token.credential,
            &body,
        )
        .await
        .context("attach the site to the hub")?;
    let reply: serde_json::Value = serde_json::from_str(&reply).context("the hub's answer")?;
    let cert = reply["certificate"]
        .as_str()
        .context("the hub's answer has no certificate")?
        .to_string();
    crate::private_dir(&dir)?;
    for (name, content) in [
        ("ca.crt", ca.as_str()),
        ("site.crt", cert.as_str()),
        ("site.key", key.as_str()),
        ("hub", hub),
        ("site-name", site),
    ] {
        crate::pki::write_private(&dir.join(name), content)?;
    }
    tracing::info!(hub, site, "attached to the cloud hub");
    Ok(SiteCredentials { ca, cert, key })
}

/// Completes a renewal a crash interrupted after both new files were written: the key is
/// moved first, then the certificate, so a `.new` certificate left alone is the key's pair.
fn finish_renewal(dir: &Path) {
    let (cert_new, key_new) = (dir.join("site.crt.new"), dir.join("site.key.new"));
    if cert_new.exists() {
        if key_new.exists() {
            let _ = std::fs::rename(&key_new, dir.join("site.key"));
        }
        let _ = std::fs::rename(&cert_new, dir.join("site.crt"));
    } else if key_new.exists() {
        // The certificate never arrived: the key alone is of no use.
        let _ = std::fs::remove_file(&key_new);
    }
}

/// Renews the site's certificate at its hub (with the current one and the site password) and
/// keeps the new one: the credentials to use from now on.
pub async fn renew_site_certificate(
    data_dir: &Path,
    config: &cloudhub::site::SiteConfig,
) -> Result<SiteCredentials> {
    let dir = data_dir.join("server").join("cloudhub");
    let password = std::fs::read_to_string(dir.join("site-password"))
        .context("the site password (attach again with --cloudhub-token)")?;
    let (csr, key) = crate::pki::site_csr(&config.name)?;
    let (cert, signer) = cloudhub::site::renew(config, &csr, password.trim())
        .await
        .context("renew the site's certificate")?;
    crate::pki::write_private(&dir.join("site.key.new"), &key)?;
    crate::pki::write_private(&dir.join("site.crt.new"), &cert)?;
    finish_renewal(&dir);
    tracing::info!(hub = %signer, site = %config.name, "renewed the site's certificate");
    Ok(SiteCredentials {
        ca: config.ca_pem.clone(),
        cert,
        key,
    })
}

/// This machine's node (or site) password (K3s's `/etc/rancher/node/password`): made on the first
/// join and kept, so the machine can join again under its name while another machine cannot take
/// it.
fn machine_password(dir: &Path, file: &str) -> Result<String> {
    let path = dir.join(file);
    if let Ok(text) = std::fs::read_to_string(&path)
        && text.trim().len() >= 16
    {
        return Ok(text.trim().to_string());
    }
    let bytes: [u8; 24] = rand::random();
    let password: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
    crate::pki::write_private(&path, &password)?;
    Ok(password)
}

/// Fails with what to do when the server's certificate does not name the host in `server` (an
/// agent given the server's IP address while the certificate lists only its names would
/// otherwise retry forever). A server that cannot be reached says nothing here: the agent runs
/// on from its cache and the usual retries report it.
async fn check_server_name(server: &str, ca_pem: &str, proxy: Option<&str>) -> Result<()> {
    let (host, port) = link::dial::host_port(server)?;
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls_pemfile::certs(&mut ca_pem.as_bytes()) {
        roots
            .add(cert.context("the site CA")?)
            .context("the site CA")?;
    }
    let tls = rustls::ClientConfig::builder()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let Ok(Ok(tcp)) = tokio::time::timeout(
        Duration::from_secs(5),
        link::dial::tcp_to(&host, port, proxy),
    )
    .await
    else {
        return Ok(());
    };
    let name = rustls::pki_types::ServerName::try_from(host.clone())
        .with_context(|| format!("{host:?} in --server is not a host name or address"))?;
    let handshake = tokio_rustls::TlsConnector::from(Arc::new(tls)).connect(name, tcp);
    let Ok(Err(e)) = tokio::time::timeout(Duration::from_secs(10), handshake).await else {
        return Ok(());
    };
    let rejected = e
        .get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>())
        .and_then(|e| match e {
            rustls::Error::InvalidCertificate(
                rustls::CertificateError::NotValidForName
                | rustls::CertificateError::NotValidForNameContext { .. },
            ) => Some(e.to_string()),
            _ => None,
        });
    if let Some(why) = rejected {
        bail!(
            "the server's certificate does not name {host:?} ({why}): restart the server with --tls-san {host} \
             (a server listening on all addresses lists its machine's addresses by itself), or pass --server with a name it lists"
        );
    }
    Ok(())
}

/// A tiny HTTPS client for the two join calls, which happen before the CA is trusted (the
/// first call's answer is checked against the token's hash instead).
mod reqwest_like {
    use std::sync::Arc;

    use anyhow::{Context, Result, bail};
    use http_body_util::BodyExt;

    #[derive(Debug)]
    struct AcceptAny;

    impl rustls::client::danger::ServerCertVerifier for AcceptAny {
        fn verify_server_cert(
            &self,
            _: &rustls::pki_types::CertificateDer<'_>,
            _: &[rustls::pki_types::CertificateDer<'_>],
            _: &rustls::pki_types::ServerName<'_>,
            _: &[u8],
            _: rustls::pki_types::UnixTime,
        ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
            Ok(rustls::client::danger::ServerCertVerified::assertion())
        }
        fn verify_tls12_signature(
            &self,
            _: &[u8],
            _: &rustls::pki_types::CertificateDer<'_>,
            _: &rustls::DigitallySignedStruct,
        ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
            Ok(rustls::client::danger::HandshakeSignatureValid::assertion())
        }
        fn verify_tls13_signature(
            &self,
            _: &[u8],
            _: &rustls::pki_types::CertificateDer<'_>,
            _: &rustls::DigitallySignedStruct,
        ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
            Ok(rustls::client::danger::HandshakeSignatureValid::assertion())
        }
        fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
            rustls::crypto::ring::default_provider()
                .signature_verification_algorithms
                .supported_schemes()
        }
    }

    pub struct Client {
        tls: Arc<rustls::ClientConfig>,
        proxy: Option<String>,
    }

    impl Client {
        /// The HTTPS proxy this client goes through, if any.
        pub fn proxy(&self) -> Option<&str> {
            self.proxy.as_deref()
        }

        pub fn new(proxy: Option<String>) -> Result<Client> {
            let mut tls = rustls::ClientConfig::builder()
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(AcceptAny))
                .with_no_client_auth();
            tls.alpn_protocols = vec![b"http/1.1".to_vec()];
            Ok(Client {
                tls: Arc::new(tls),
                proxy,
            })
        }

        async fn request(
            &self,
            url: &str,
            method: &str,
            bearer: Option<&str>,
            body: Option<&str>,
        ) -> Result<String> {
            let rest = url
                .strip_prefix("https://")
                .context("the server URL must start with https://")?;
            let (authority, path) = match rest.find('/') {
                Some(i) => (&rest[..i], &rest[i..]),
                None => (rest, "/"),
            };
            let (host, port) = link::dial::host_port(url)?;
            let tcp = link::dial::tcp_to(&host, port, self.proxy.as_deref()).await?;
            let name = rustls::pki_types::ServerName::try_from(host.clone())?;
            let stream = tokio_rustls::TlsConnector::from(self.tls.clone())
                .connect(name, tcp)
                .await
                .with_context(|| format!("TLS with {host}:{port}"))?;
            let (mut sender, conn) =
                hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream)).await?;
            tokio::spawn(conn);
            let mut req = http::Request::builder()
                .method(method)
                .uri(path)
                .header(http::header::HOST, authority)
                .header(http::header::CONTENT_TYPE, "application/json");
            if let Some(b) = bearer {
                req = req.header(http::header::AUTHORIZATION, format!("Bearer {b}"));
            }
            let req = req.body(http_body_util::Full::new(bytes::Bytes::from(
                body.unwrap_or_default().to_string(),
            )))?;
            let response = sender.send_request(req).await?;
            let status = response.status();
            let bytes = response.into_body().collect().await?.to_bytes();
            let text = String::from_utf8_lossy(&bytes).into_owned();
            if !status.is_success() {
                let message = serde_json::from_str::<serde_json::Value>(&text)
                    .ok()
                    .and_then(|v| v["message"].as_str().map(String::from))
                    .unwrap_or(text);
                bail!("{url}: {status}: {message}");
            }
            Ok(text)
        }

        pub async fn get(&self, url: &str) -> Result<String> {
            self.request(url, "GET", None, None).await
        }

        pub async fn post_json(&self, url: &str, bearer: &str, body: &str) -> Result<String> {
            self.request(url, "POST", Some(bearer), Some(body)).await
        }
    }
}

/// A kube client with the agent's certificate.
pub async fn kube_client(c: &AgentCredentials) -> Result<kube::Client> {
    use base64::Engine;
    let b64 = |s: &str| base64::engine::general_purpose::STANDARD.encode(s);
    let kubeconfig = format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- cluster:\n    certificate-authority-data: {}\n    server: {}\n  name: site\ncontexts:\n- context:\n    cluster: site\n    user: node\n  name: node\ncurrent-context: node\nusers:\n- name: node\n  user:\n    client-certificate-data: {}\n    client-key-data: {}\n",
        b64(&c.ca),
        c.server,
        b64(&c.cert),
        b64(&c.key)
    );
    let kubeconfig: kube::config::Kubeconfig = serde_yaml::from_str(&kubeconfig)?;
    let mut config = kube::Config::from_custom_kubeconfig(
        kubeconfig,
        &kube::config::KubeConfigOptions::default(),
    )
    .await?;
    // A node far away notices a dead link quickly and runs from its cache meanwhile.
    config.connect_timeout = Some(std::time::Duration::from_secs(5));
    Ok(kube::Client::try_from(config)?)
}

/// Keeps `Arc` in scope for the joiner's owner.
pub fn joiner(server_dir: &Path, ca: &CertAndKey, cluster_token: &str) -> Arc<Joiner> {
    Arc::new(Joiner {
        server_dir: server_dir.to_path_buf(),
        ca: CertAndKey {
            cert: ca.cert.clone(),
            key: ca.key.clone(),
        },
        cluster_token: cluster_token.to_string(),
        joins: Joins::Nodes,
    })
}

/// The hub's joiner: sites attach with tokens from `edgesite cloudhub token create`.
pub fn site_joiner(
    server_dir: &Path,
    ca: &CertAndKey,
    lifetime: std::time::Duration,
) -> Arc<Joiner> {
    Arc::new(Joiner {
        server_dir: server_dir.to_path_buf(),
        ca: ca.clone(),
        cluster_token: String::new(),
        joins: Joins::Sites(lifetime),
    })
}

/// `edgesite node remove NAME`: on the server, with the admin credentials of its data dir.
/// The node's record keeps no certificate serial (so no certificate of it authenticates, and the
/// mesh, which follows Nodes, drops it once the Node is gone), then the Node is deleted (the pod
/// garbage collector deletes its pods).
pub fn remove_node(data_dir: &Path, name: &str) -> Result<()> {
    use k8s_openapi::api::core::v1::{Node, Secret};
    use kube::api::{Api, DeleteParams, PostParams};
    as_admin(data_dir, |client| async move {
        let nodes: Api<Node> = Api::all(client.clone());
        let secrets: Api<Secret> = Api::namespaced(client, "kube-system");
        let record = apiserver_lite::http::join::password_secret(name);
        nodes
            .get_opt(name)
            .await
            .with_context(|| format!("reach the server to remove node {name:?}"))?;
        match secrets.delete(&record, &DeleteParams::default()).await {
            Ok(_) => {}
            Err(kube::Error::Api(s)) if s.code == 404 => {}
            Err(e) => return Err(e).context("clear the node's record"),
        }
        // A record without a certificate serial: no certificate of this node authenticates
        // (also one of a node that never finished joining), and the name is free.
        let secret: Secret = serde_json::from_value(serde_json::json!({
            "metadata": {"name": record, "labels": {"edgesite.io/node-password": name}},
            "type": "edgesite.io/node-password",
            "stringData": {"removed": chrono_like_now()}
        }))?;
        secrets
            .create(&PostParams::default(), &secret)
            .await
            .context("record the node as removed")?;
        match nodes.delete(name, &DeleteParams::default()).await {
            Ok(_) => {}
            Err(kube::Error::Api(s)) if s.code == 404 => {}
            Err(e) => return Err(e).context("delete the Node"),
        }
        Ok(())
    })
}

/// Now as RFC 3339 (UTC), for records people read.
fn chrono_like_now() -> String {
    time::OffsetDateTime::now_utc()
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_parse_with_and_without_ca_pinning() {
        let hash = "a".repeat(64);
        let t = JoinToken::parse(&format!("K10{hash}::abc.def")).unwrap();
        assert_eq!(t.ca_hash.as_deref(), Some(hash.as_str()));
        assert_eq!(t.credential, "abc.def");
        let bare = JoinToken::parse("secret").unwrap();
        assert_eq!(bare.ca_hash, None);
        assert!(JoinToken::parse("K10abc::x").is_err());
        assert!(JoinToken::parse("").is_err());
    }

    #[test]
    fn created_tokens_are_accepted_until_they_expire() {
        let dir = tempfile::tempdir().unwrap();
        let tls = dir.path().join("server").join("tls");
        std::fs::create_dir_all(&tls).unwrap();
        std::fs::write(tls.join("ca.crt"), "CA").unwrap();
        let token = create_token(dir.path(), Duration::from_secs(3600)).unwrap();
        assert!(token.starts_with(&format!("K10{}::", ca_hash("CA"))));
        let joiner = Joiner {
            server_dir: dir.path().join("server"),
            ca: CertAndKey {
                cert: String::new(),
                key: String::new(),
            },
            cluster_token: "cluster".into(),
            joins: Joins::Nodes,
        };
        let credential = JoinToken::parse(&token).unwrap().credential;
        assert!(joiner.valid(&credential));
        assert!(joiner.valid("cluster"));
        assert!(!joiner.valid("nope"));
        std::fs::write(
            dir.path().join("server").join(TOKENS_FILE),
            format!("{credential}\t1\n"),
        )
        .unwrap();
        assert!(!joiner.valid(&credential), "expired tokens are refused");
    }
}

/// The site's keys a joining server receives: the CA (certificate and key), the key that signs
/// ServiceAccount tokens, and the cluster token. They travel encrypted with the cluster token
/// (PBKDF2-HMAC-SHA256, then AES-256-GCM), so whoever sees the wire without the token learns
/// nothing; the joining server checks the CA against the token's hash too.
const BUNDLE_FILES: [&str; 3] = ["ca.crt", "ca.key", "service.key"];
const PBKDF2_ROUNDS: u32 = 100_000;

fn bundle_key(token: &str, salt: &[u8]) -> ring::aead::LessSafeKey {
    let mut key = [0u8; 32];
    ring::pbkdf2::derive(
        ring::pbkdf2::PBKDF2_HMAC_SHA256,
        std::num::NonZeroU32::new(PBKDF2_ROUNDS).expect("non-zero"),
        salt,
        token.as_bytes(),
        &mut key,
    );
    let unbound =
        ring::aead::UnboundKey::new(&ring::aead::AES_256_GCM, &key).expect("a 32-byte key");
    ring::aead::LessSafeKey::new(unbound)
}

/// `plain` encrypted with `token`: base64 of salt (16 bytes), nonce (12) and ciphertext.
pub fn seal(token: &str, plain: &[u8]) -> Result<String> {
    use base64::Engine;
    let salt: [u8; 16] = rand::random();
    let nonce: [u8; 12] = rand::random();
    let mut data = plain.to_vec();
    bundle_key(token, &salt)
        .seal_in_place_append_tag(
            ring::aead::Nonce::assume_unique_for_key(nonce),
            ring::aead::Aad::empty(),
            &mut data,
        )
        .map_err(|_| anyhow::anyhow!("encrypting the bundle failed"))?;
    let mut out = salt.to_vec();
    out.extend_from_slice(&nonce);
    out.extend_from_slice(&data);
    Ok(base64::engine::general_purpose::STANDARD.encode(out))
}

/// The inverse of [`seal`]; fails when the token is not the one it was sealed with.
pub fn open_sealed(token: &str, sealed: &str) -> Result<Vec<u8>> {
    use base64::Engine;
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(sealed.trim())
        .context("the bundle is not base64")?;
    if bytes.len() < 28 + 16 {
        bail!("the bundle is too short");
    }
    let (salt, rest) = bytes.split_at(16);
    let (nonce, cipher) = rest.split_at(12);
    let mut data = cipher.to_vec();
    let nonce = ring::aead::Nonce::try_assume_unique_for_key(nonce)
        .map_err(|_| anyhow::anyhow!("bad nonce"))?;
    let plain = bundle_key(token, salt)
        .open_in_place(nonce, ring::aead::Aad::empty(), &mut data)
        .map_err(|_| {
            anyhow::anyhow!(
                "the site's keys cannot be decrypted with this token: it is not the site's token"
            )
        })?;
    Ok(plain.to_vec())
}

/// The server side of `edgesite server --server URL --token TOKEN`: on a server whose state is in
/// an embedded etcd.
pub struct ServerJoiner {
    pub server_dir: PathBuf,
    pub cluster_token: String,
    pub etcd: apiserver_lite::storage::etcd::EtcdConfig,
}

impl apiserver_lite::node_streams::NodeJoin for ServerJoiner {
    fn authorize(&self, token: &str) -> Result<(), apiserver_lite::node_streams::JoinError> {
        let credential = JoinToken::parse(token)
            .map(|t| t.credential)
            .map_err(|_| apiserver_lite::node_streams::JoinError::BadToken)?;
        if self.cluster_token.is_empty() || !constant_time_eq(&credential, &self.cluster_token) {
            return Err(apiserver_lite::node_streams::JoinError::BadToken);
        }
        Ok(())
    }

    fn sign(&self, _: &str, _: &str) -> Result<String, apiserver_lite::node_streams::JoinError> {
        Err(apiserver_lite::node_streams::JoinError::Invalid(
            "servers join with server-join".into(),
        ))
    }

    fn bad_token_message(&self) -> String {
        "the token is not this site's cluster token: a server joins with the first server's \
         token (<data-dir>/server/token there); tokens from `edgesite token create` join agents only"
            .into()
    }
}

#[async_trait::async_trait]
impl apiserver_lite::node_streams::ServerJoin for ServerJoiner {
    async fn join_server(
        &self,
        request: serde_json::Value,
    ) -> Result<serde_json::Value, apiserver_lite::node_streams::JoinError> {
        use apiserver_lite::node_streams::JoinError;
        use apiserver_lite::storage::etcd;
        let name = request["name"].as_str().unwrap_or_default();
        let peer = request["peerURL"].as_str().unwrap_or_default();
        if name.is_empty()
            || !name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-._".contains(c))
        {
            return Err(JoinError::Invalid(format!(
                "member name {name:?} is not valid"
            )));
        }
        if !peer.starts_with("https://") {
            return Err(JoinError::Invalid(format!(
                "peer URL {peer:?}: an https:// URL is expected"
            )));
        }
        let failed = |e: apiserver_lite::storage::StorageError| {
            JoinError::Invalid(format!("the site's etcd: {e}"))
        };
        let members = etcd::members(&self.etcd).await.map_err(failed)?;
        let existing = members
            .iter()
            .find(|m| m.peer_urls.iter().any(|u| u == peer));
        let (id, members) = match existing {
            // A retried join (the first answer was lost, or the server restarted before its
            // member started): the member is there already.
            Some(m) if m.name.is_empty() || m.name == name => (m.id, members.clone()),
            Some(m) => {
                return Err(JoinError::Invalid(format!(
                    "etcd member {} already uses peer URL {peer}: remove it first (`edgesite etcd member remove`)",
                    m.name
                )));
            }
            None => etcd::add_learner(&self.etcd, peer).await.map_err(failed)?,
        };
        let voters: Vec<String> = members
            .iter()
            .filter(|m| !m.learner && m.id != id)
            .flat_map(|m| m.client_urls.clone())
            .collect();
        let initial: Vec<String> = members
            .iter()
            .flat_map(|m| {
                let shown = if m.id == id { name } else { m.name.as_str() };
                m.peer_urls
                    .iter()
                    .map(move |u| format!("{shown}={u}"))
                    .collect::<Vec<_>>()
            })
            .collect();
        let tls = self.server_dir.join("tls");
        let mut files = serde_json::Map::new();
        for file in BUNDLE_FILES {
            let text = std::fs::read_to_string(tls.join(file))
                .map_err(|e| JoinError::Invalid(format!("reading {file}: {e}")))?;
            files.insert(file.into(), text.into());
        }
        files.insert("token".into(), self.cluster_token.clone().into());
        let plain = serde_json::Value::Object(files).to_string();
        let bundle = seal(&self.cluster_token, plain.as_bytes())
            .map_err(|e| JoinError::Invalid(e.to_string()))?;
        tracing::info!(member = name, peer, "a server joins the site's etcd");
        Ok(serde_json::json!({
            "bundle": bundle,
            "initialCluster": initial.join(","),
            "voters": voters,
            "memberID": id.to_string(),
        }))
    }
}

/// What a joining server was told: the etcd members to start with.
#[derive(serde::Serialize, serde::Deserialize)]
pub struct JoinedServer {
    pub initial_cluster: String,
    /// Client URLs of the voting members (a learner's own etcd serves no requests until it is
    /// promoted through them).
    #[serde(default)]
    pub voters: Vec<String>,
}

/// The joining side: fetches the site's keys from `server` (checking its CA against the token),
/// writes them into this data dir, and has its etcd member added. A data dir that already
/// belongs to another site is refused.
pub async fn join_server(
    data_dir: &Path,
    server: &str,
    token: &str,
    name: &str,
    peer_url: &str,
) -> Result<JoinedServer> {
    let token = JoinToken::parse(token)?;
    let client = insecure_client(None)?;
    let ca = pinned_ca(&client, server, &token, "--server").await?;
    let tls = data_dir.join("server").join("tls");
    if let Ok(mine) = std::fs::read_to_string(tls.join("ca.crt"))
        && mine != ca
    {
        bail!(
            "this data dir ({}) belongs to another site (its CA is not {server}'s): join with an \
             empty --data-dir",
            data_dir.display()
        );
    }
    let body = serde_json::json!({"name": name, "peerURL": peer_url}).to_string();
    // etcd takes one learner at a time: servers started together join one after another
    // (never wedged, k3s#4335), each waiting until the previous one votes.
    let started = std::time::Instant::now();
    let mut backoff = link::backoff::Backoff::new(
        Duration::from_millis(500),
        Duration::from_secs(5),
        Duration::MAX,
    );
    let reply = loop {
        match client
            .post_json(
                &format!("{server}/edgesite/v1/server-join"),
                &token.credential,
                &body,
            )
            .await
        {
            Ok(reply) => break reply,
            // etcd's words for "not now": a learner is catching up, or a member just changed.
            Err(e)
                if [
                    "too many learner members",
                    "unhealthy cluster",
                    "leader changed",
                    "request timed out",
                    "Timeout expired",
                    "deadline has elapsed",
                ]
                .iter()
                .any(|m| e.to_string().contains(m))
                    && started.elapsed() < Duration::from_secs(600) =>
            {
                tracing::info!("another server is joining the site's etcd; waiting for it");
                tokio::time::sleep(backoff.next(started)).await;
            }
            Err(e) => return Err(e.context("join the site as a server")),
        }
    };
    let reply: serde_json::Value = serde_json::from_str(&reply).context("the join answer")?;
    let bundle = reply["bundle"]
        .as_str()
        .context("the join answer has no keys")?;
    let plain = open_sealed(&token.credential, bundle)?;
    let files: serde_json::Value =
        serde_json::from_slice(&plain).context("the site's keys are not readable")?;
    if files["ca.crt"].as_str() != Some(ca.as_str()) {
        bail!("the keys {server} sent are not for the CA it presents");
    }
    crate::private_dir(&tls)?;
    for file in BUNDLE_FILES {
        let text = files[file]
            .as_str()
            .with_context(|| format!("the site's keys lack {file}"))?;
        crate::pki::write_private(&tls.join(file), text)?;
    }
    let cluster_token = files["token"].as_str().unwrap_or(&token.credential);
    crate::pki::write_private(&data_dir.join("server").join("token"), cluster_token)?;
    let initial_cluster = reply["initialCluster"]
        .as_str()
        .context("the join answer has no etcd members")?
        .to_string();
    let voters = reply["voters"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|u| u.as_str().map(String::from))
                .collect()
        })
        .unwrap_or_default();
    tracing::info!(server, member = name, "joined the site as a server");
    Ok(JoinedServer {
        initial_cluster,
        voters,
    })
}

#[cfg(test)]
mod server_join_tests {
    use super::*;

    #[test]
    fn the_bundle_opens_only_with_its_token() {
        let sealed = seal("s3cret-token", b"the CA key").unwrap();
        assert!(!sealed.contains("the CA key"));
        assert_eq!(open_sealed("s3cret-token", &sealed).unwrap(), b"the CA key");
        let wrong = open_sealed("another-token", &sealed)
            .unwrap_err()
            .to_string();
        assert!(wrong.contains("not the site's token"), "{wrong}");
        assert!(open_sealed("s3cret-token", "AAAA").is_err());
    }
}
