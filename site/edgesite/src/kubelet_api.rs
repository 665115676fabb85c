//! The kubelet's own API on each node (`--kubelet-port`, 10250 by default): what Prometheus,
//! metrics-server and kubelet clients reach on a node without the API server in between.
//!
//! - TLS with a serving certificate from the site CA for the node's name and addresses, asked
//!   for as upstream's kubelet does: a `kubernetes.io/kubelet-serving` CertificateSigningRequest
//!   the control plane approves and signs ([`crate::csr_signer`]), kept in the data dir so a node
//!   that restarts offline serves at once.
//! - Authentication as the kubelet's: a client certificate from the site CA, or a bearer token
//!   the API server vouches for (TokenReview); authorization asked of the API server
//!   (SubjectAccessReview on `nodes/<subresource>` of this node: `stats`, `metrics`, `log`,
//!   `proxy` for the rest), both cached briefly.
//! - Paths: `/healthz`, `/pods`, `/stats/summary`, `/metrics`, `/metrics/resource`,
//!   `/metrics/cadvisor`, `/containerLogs/{ns}/{pod}/{container}`, and upgraded
//!   `/exec`, `/attach` (`/{ns}/{pod}[/{uid}]/{container}`) and `/portForward/{ns}/{pod}[/{uid}]`
//!   in every stream protocol the API server speaks ([`apiserver_lite::streams`]), served by the
//!   node agent's own handlers in process.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use axum::Router;
use axum::body::Body;
use axum::extract::{Request, State};
use axum::response::{IntoResponse, Response};
use http::{StatusCode, header};
use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec};
use k8s_openapi::api::authorization::v1::{
    NonResourceAttributes, ResourceAttributes, SubjectAccessReview, SubjectAccessReviewSpec,
};
use k8s_openapi::api::certificates::v1::{
    CertificateSigningRequest, CertificateSigningRequestSpec,
};
use k8s_openapi::api::core::v1::Node;
use kube::api::{Api, PostParams};
use tokio_util::sync::CancellationToken;

use apiserver_lite::auth::Identity;
use apiserver_lite::http::pipeline::TransportIdentity;
use apiserver_lite::node_streams::InProcess;

/// How long an answer of the API server about a token or an access is reused.
const CACHE_FOR: Duration = Duration::from_secs(30);
/// Entries kept at most in each cache.
const CACHED: usize = 1024;

/// Where the node's serving certificate and key are kept.
fn paths(dir: &Path) -> (PathBuf, PathBuf) {
    (
        dir.join("kubelet-serving.crt"),
        dir.join("kubelet-serving.key"),
    )
}

/// The node's addresses as its Node reports them (IPs and host names), and its name.
async fn names(client: &kube::Client, node: &str) -> Option<(Vec<String>, Vec<String>)> {
    let node_object = Api::<Node>::all(client.clone()).get(node).await.ok()?;
    let addresses = node_object.status?.addresses?;
    let mut ips = Vec::new();
    let mut dns = vec![node.to_string()];
    for a in addresses {
        if a.address.parse::<std::net::IpAddr>().is_ok() {
            ips.push(a.address);
        } else if !dns.contains(&a.address) {
            dns.push(a.address);
        }
    }
    (!ips.is_empty()).then_some((dns, ips))
}

/// Whether `cert_pem` still names every one of `sans` and lasts another day.
fn still_good(cert_pem: &str, sans: &[String]) -> bool {
    let Ok(der) = rustls_pemfile::certs(&mut cert_pem.as_bytes())
        .next()
        .transpose()
    else {
        return false;
    };
    let Some(der) = der else { return false };
    let Ok((_, cert)) = x509_parser::parse_x509_certificate(der.as_ref()) else {
        return false;
    };
    let expires = cert.validity().not_after.timestamp();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0);
    if expires < now + 24 * 3600 {
        return false;
    }
    let mut named: Vec<String> = Vec::new();
    if let Ok(Some(ext)) = cert.subject_alternative_name() {
        for n in &ext.value.general_names {
            match n {
                x509_parser::extensions::GeneralName::DNSName(d) => named.push(d.to_string()),
                x509_parser::extensions::GeneralName::IPAddress(ip) => {
                    let text = match ip.len() {
                        4 => std::net::IpAddr::from(<[u8; 4]>::try_from(*ip).unwrap_or([0; 4]))
                            .to_string(),
                        16 => std::net::IpAddr::from(<[u8; 16]>::try_from(*ip).unwrap_or([0; 16]))
                            .to_string(),
                        _ => continue,
                    };
                    named.push(text);
                }
                _ => {}
            }
        }
    }
    sans.iter().all(|s| named.contains(s))
}

/// The node's serving certificate: the kept one while it still fits the node's addresses, or a
/// new one through a `kubernetes.io/kubelet-serving` request. Waits for the Node's addresses and
/// the signer, retrying until `shutdown`.
pub async fn serving_certificate(
    client: &kube::Client,
    node: &str,
    dir: &Path,
    shutdown: &CancellationToken,
) -> Option<crate::pki::CertAndKey> {
    let (cert_path, key_path) = paths(dir);
    let kept = match (
        std::fs::read_to_string(&cert_path),
        std::fs::read_to_string(&key_path),
    ) {
        (Ok(cert), Ok(key)) => Some(crate::pki::CertAndKey { cert, key }),
        _ => None,
    };
    let mut attempt = 0u32;
    let mut backoff =
        controllers::backoff::Backoff::new(Duration::from_secs(1), Duration::from_secs(30));
    loop {
        match names(client, node).await {
            Some((dns, ips)) => {
                let sans: Vec<String> = dns.iter().chain(&ips).cloned().collect();
                if let Some(kept) = &kept
                    && still_good(&kept.cert, &sans)
                {
                    return Some(kept.clone());
                }
                match request_certificate(client, node, &dns, &ips, shutdown).await {
                    Ok(pair) => {
                        let saved = std::fs::create_dir_all(dir)
                            .map_err(anyhow::Error::from)
                            .and_then(|_| crate::pki::write_private(&cert_path, &pair.cert))
                            .and_then(|_| crate::pki::write_private(&key_path, &pair.key));
                        if let Err(e) = saved {
                            tracing::warn!("keep the kubelet serving certificate: {e:#}");
                        }
                        return Some(pair);
                    }
                    Err(e) => tracing::warn!("kubelet serving certificate: {e:#}"),
                }
            }
            // Offline at start: a kept certificate serves until the addresses can be checked.
            None if kept.is_some() && attempt == 0 => return kept,
            None => {}
        }
        attempt += 1;
        let wait = backoff.next_wait();
        tokio::select! {
            _ = shutdown.cancelled() => return None,
            _ = tokio::time::sleep(wait) => {}
        }
    }
}

async fn request_certificate(
    client: &kube::Client,
    node: &str,
    dns: &[String],
    ips: &[String],
    shutdown: &CancellationToken,
) -> Result<crate::pki::CertAndKey> {
    let (csr_pem, key) = crate::pki::kubelet_serving_csr(node, dns, ips)?;
    let api: Api<CertificateSigningRequest> = Api::all(client.clone());
    let request = CertificateSigningRequest {
        metadata: kube::api::ObjectMeta {
            generate_name: Some(format!("csr-{node}-")),
            ..Default::default()
        },
        spec: CertificateSigningRequestSpec {
            request: k8s_openapi::ByteString(csr_pem.into_bytes()),
            signer_name: apiserver_lite::certificates::KUBELET_SERVING.into(),
            usages: Some(vec![
                "digital signature".into(),
                "key encipherment".into(),
                "server auth".into(),
            ]),
            ..Default::default()
        },
        status: None,
    };
    let created = api
        .create(&PostParams::default(), &request)
        .await
        .context("create the CertificateSigningRequest")?;
    let name = created.metadata.name.unwrap_or_default();
    let deadline = Instant::now() + Duration::from_secs(60);
    while Instant::now() < deadline && !shutdown.is_cancelled() {
        let csr = api.get(&name).await.context("read the request")?;
        let status = csr.status.unwrap_or_default();
        if let Some(cert) = status.certificate {
            let cert = String::from_utf8(cert.0).context("the certificate is not PEM")?;
            tracing::info!(csr = %name, "kubelet serving certificate signed");
            return Ok(crate::pki::CertAndKey { cert, key });
        }
        if let Some(c) = status
            .conditions
            .unwrap_or_default()
            .iter()
            .find(|c| (c.type_ == "Denied" || c.type_ == "Failed") && c.status == "True")
        {
            anyhow::bail!(
                "request {name} was {}: {}",
                c.type_.to_lowercase(),
                c.message.clone().unwrap_or_default()
            );
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    anyhow::bail!("request {name} was not signed within a minute")
}

/// Answers of the API server, kept for [`CACHE_FOR`].
struct Cache<V> {
    entries: Mutex<HashMap<String, (Instant, V)>>,
}

impl<V: Clone> Cache<V> {
    fn new() -> Self {
        Cache {
            entries: Mutex::new(HashMap::new()),
        }
    }

    fn get(&self, key: &str) -> Option<V> {
        let entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        entries
            .get(key)
            .filter(|(at, _)| at.elapsed() < CACHE_FOR)
            .map(|(_, v)| v.clone())
    }

    fn put(&self, key: String, value: V) {
        let mut entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        if entries.len() >= CACHED {
            entries.retain(|_, (at, _)| at.elapsed() < CACHE_FOR);
        }
        if entries.len() < CACHED {
            entries.insert(key, (Instant::now(), value));
        }
    }
}

pub struct KubeletApi {
    node: String,
    client: kube::Client,
    /// The node agent's own handlers (the ones the API server reaches through the tunnel).
    local: Router,
    tokens: Cache<Option<Identity>>,
    decisions: Cache<Result<(), String>>,
}

impl KubeletApi {
    pub fn new(node: &str, client: kube::Client, local: Router) -> Arc<Self> {
        Arc::new(KubeletApi {
            node: node.to_string(),
            client,
            local,
            tokens: Cache::new(),
            decisions: Cache::new(),
        })
    }
}

/// What the kubelet API of one node needs; `port` 0 turns it off.
pub struct Settings {
    pub port: u16,
    pub node: String,
    /// The node's own client (`system:node:<name>`).
    pub client: kube::Client,
    pub ca_pem: String,
    /// Where the serving certificate is kept (`<data-dir>/agent/pki`).
    pub cert_dir: PathBuf,
    pub shutdown: CancellationToken,
}

impl Settings {
    /// Starts serving the agent's handlers (`local`); stops when the guard is dropped.
    pub fn start(self, local: &Router) -> Option<tokio_util::sync::DropGuard> {
        if self.port == 0 {
            return None;
        }
        let stop = self.shutdown.child_token();
        let api = KubeletApi::new(&self.node, self.client, local.clone());
        tokio::spawn(run(
            api,
            self.port,
            self.ca_pem,
            self.cert_dir,
            stop.clone(),
        ));
        Some(stop.drop_guard())
    }
}

/// Serves the kubelet API on `port` of every address until `shutdown`, once the serving
/// certificate is at hand.
pub async fn run(
    api: Arc<KubeletApi>,
    port: u16,
    ca_pem: String,
    cert_dir: PathBuf,
    shutdown: CancellationToken,
) {
    let Some(serving) = serving_certificate(&api.client, &api.node, &cert_dir, &shutdown).await
    else {
        return;
    };
    let tls = crate::pki::ServingCert::new(&serving).and_then(|cert| {
        crate::pki::server_tls(
            &crate::pki::CertAndKey {
                cert: ca_pem,
                key: String::new(),
            },
            cert,
        )
    });
    let tls = match tls {
        Ok(t) => t,
        Err(e) => {
            tracing::error!("kubelet API TLS: {e:#}");
            return;
        }
    };
    let listener = match tokio::net::TcpListener::bind(("0.0.0.0", port)).await {
        Ok(l) => l,
        Err(e) => {
            tracing::error!(
                port,
                "the kubelet API cannot listen: {e} (another kubelet or site on this machine? move it with --kubelet-port, or 0 to turn it off)"
            );
            return;
        }
    };
    tracing::info!(port, node = %api.node, "kubelet API listening");
    let app = Router::new().fallback(handle).with_state(api);
    if let Err(e) = apiserver_lite::http::serve(listener, tls, app, shutdown).await {
        tracing::error!("kubelet API: {e}");
    }
}

fn plain(code: StatusCode, text: impl Into<String>) -> Response {
    (code, [(header::CONTENT_TYPE, "text/plain")], text.into()).into_response()
}

/// A client certificate's identity, or a bearer token the API server vouches for.
async fn authenticate(
    api: &KubeletApi,
    certificate: Option<Identity>,
    bearer: Option<String>,
) -> Option<Identity> {
    if let Some(identity) = certificate {
        return Some(identity);
    }
    let token = bearer?;
    if let Some(known) = api.tokens.get(&token) {
        return known;
    }
    let review = TokenReview {
        spec: TokenReviewSpec {
            token: Some(token.clone()),
            ..Default::default()
        },
        ..Default::default()
    };
    let answer = Api::<TokenReview>::all(api.client.clone())
        .create(&PostParams::default(), &review)
        .await;
    let identity = match answer {
        Ok(r) => r
            .status
            .filter(|s| s.authenticated == Some(true))
            .and_then(|s| s.user)
            .map(|u| {
                let groups: Vec<&str> = u.groups.iter().flatten().map(String::as_str).collect();
                let mut id = Identity::new(u.username.unwrap_or_default(), &groups);
                id.uid = u.uid.unwrap_or_default();
                id.extra = u.extra.unwrap_or_default().into_iter().collect();
                id
            }),
        Err(e) => {
            tracing::debug!("kubelet API token review: {e}");
            return None;
        }
    };
    api.tokens.put(token, identity.clone());
    identity
}

/// The kubelet's authorization attributes for a path: the verb from the method and the
/// `nodes` subresource from the path, as upstream's kubelet names them.
fn attributes(method: &http::Method, path: &str) -> (&'static str, &'static str) {
    let verb = match *method {
        http::Method::GET | http::Method::HEAD => "get",
        http::Method::POST => "create",
        http::Method::PUT => "update",
        http::Method::PATCH => "patch",
        http::Method::DELETE => "delete",
        _ => "get",
    };
    let under = |prefix: &str| path == prefix || path.starts_with(&format!("{prefix}/"));
    let subresource = if under("/stats") {
        "stats"
    } else if under("/metrics") {
        "metrics"
    } else if under("/logs") {
        "log"
    } else if under("/spec") {
        "spec"
    } else {
        "proxy"
    };
    (verb, subresource)
}

async fn authorize(
    api: &KubeletApi,
    who: &Identity,
    verb: &str,
    subresource: &str,
) -> Result<(), String> {
    let key = format!(
        "{}\u{0}{}\u{0}{verb}\u{0}{subresource}",
        who.user,
        who.groups.join(",")
    );
    if let Some(decision) = api.decisions.get(&key) {
        return decision;
    }
    let review = SubjectAccessReview {
        spec: SubjectAccessReviewSpec {
            user: Some(who.user.clone()),
            uid: (!who.uid.is_empty()).then(|| who.uid.clone()),
            groups: Some(who.groups.clone()),
            extra: (!who.extra.is_empty()).then(|| who.extra.clone().into_iter().collect()),
            resource_attributes: Some(ResourceAttributes {
                verb: Some(verb.into()),
                resource: Some("nodes".into()),
                subresource: Some(subresource.into()),
                name: Some(api.node.clone()),
                ..Default::default()
            }),
            non_resource_attributes: None::<NonResourceAttributes>,
        },
        ..Default::default()
    };
    let decision = match Api::<SubjectAccessReview>::all(api.client.clone())
        .create(&PostParams::default(), &review)
        .await
    {
        Ok(r) if r.status.as_ref().is_some_and(|s| s.allowed) => Ok(()),
        Ok(_) => Err(format!(
            "Forbidden (user={}, verb={verb}, resource=nodes, subresource={subresource})",
            who.user
        )),
        // Not cached: the API server may be back soon.
        Err(e) => return Err(format!("cannot ask the API server for authorization: {e}")),
    };
    api.decisions.put(key, decision.clone());
    decision
}

fn flag(query: &str, names: &[&str]) -> bool {
    form_urlencoded::parse(query.as_bytes())
        .any(|(k, v)| names.contains(&k.as_ref()) && (v == "1" || v == "true"))
}

async fn handle(State(api): State<Arc<KubeletApi>>, request: Request) -> Response {
    let certificate = request
        .extensions()
        .get::<TransportIdentity>()
        .map(|t| t.identity.clone());
    let bearer = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(|t| t.trim().to_string());
    let Some(who) = authenticate(&api, certificate, bearer).await else {
        return plain(StatusCode::UNAUTHORIZED, "Unauthorized");
    };
    let path = request.uri().path().to_string();
    let (verb, subresource) = attributes(request.method(), &path);
    if let Err(why) = authorize(&api, &who, verb, subresource).await {
        return plain(StatusCode::FORBIDDEN, why);
    }
    let parts: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    let query = request.uri().query().unwrap_or("").to_string();
    let local: Arc<dyn apiserver_lite::node_streams::NodeConnection> =
        Arc::new(InProcess(api.local.clone()));
    let upgrade = request.headers().contains_key(header::UPGRADE);
    let result = match parts.as_slice() {
        [which @ ("exec" | "attach"), ns, pod, rest @ ..] if upgrade && !rest.is_empty() => {
            let (uid, container) = match rest {
                [container] => ("", *container),
                [uid, container] => (*uid, *container),
                _ => return plain(StatusCode::NOT_FOUND, "404 page not found"),
            };
            let wants = apiserver_lite::streams::Wants {
                stdin: flag(&query, &["input", "stdin"]),
                stdout: flag(&query, &["output", "stdout"]),
                stderr: flag(&query, &["error", "stderr"]),
                tty: flag(&query, &["tty"]),
            };
            apiserver_lite::streams::exec(
                local,
                ns,
                pod,
                uid,
                container,
                *which == "attach",
                wants,
                Some(&query),
                request,
            )
            .await
        }
        ["portForward", ns, pod, rest @ ..] if upgrade && rest.len() <= 1 => {
            let uid = rest.first().copied().unwrap_or("");
            apiserver_lite::streams::port_forward(local, ns, pod, uid, request).await
        }
        ["healthz"]
        | ["pods"]
        | ["stats", "summary"]
        | ["metrics"]
        | ["metrics", "resource" | "cadvisor"]
        | ["containerLogs", _, _, _]
            if request.method() == http::Method::GET =>
        {
            // The agent's own handlers; bodies are not forwarded (GETs).
            let (parts, _) = request.into_parts();
            let forwarded = http::Request::from_parts(parts, Body::empty());
            match local.call(forwarded).await {
                Ok(r) => return r,
                Err(e) => return plain(StatusCode::INTERNAL_SERVER_ERROR, e),
            }
        }
        _ => return plain(StatusCode::NOT_FOUND, "404 page not found"),
    };
    match result {
        Ok(r) => r,
        Err(e) => apiserver_lite::http::error_response(&e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_map_to_the_kubelets_subresources() {
        use http::Method;
        assert_eq!(attributes(&Method::GET, "/stats/summary"), ("get", "stats"));
        assert_eq!(
            attributes(&Method::GET, "/metrics/cadvisor"),
            ("get", "metrics")
        );
        assert_eq!(attributes(&Method::GET, "/metrics"), ("get", "metrics"));
        assert_eq!(attributes(&Method::GET, "/pods"), ("get", "proxy"));
        assert_eq!(
            attributes(&Method::POST, "/exec/a/b/c"),
            ("create", "proxy")
        );
        assert_eq!(attributes(&Method::GET, "/metricsx"), ("get", "proxy"));
    }
}
