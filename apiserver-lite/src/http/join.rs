//! `POST /edgesite/v1/node-join`: a machine with a join token gets a node certificate.
//!
//! Outside the Kubernetes API (as K3s's supervisor serves it): the joining agent has no identity
//! yet. Two guards besides the token:
//!
//! - **Attempts are limited per client address**: each refused attempt fills a bucket that
//!   drains one attempt every [`DRAIN`]; a full bucket ([`BURST`]) answers 429 with
//!   `Retry-After` before looking at the token, so guessing tokens is slow.
//! - **A node's name belongs to one machine** (K3s's node passwords): the agent sends a secret
//!   it generated on its first join; its hash is kept in the Secret
//!   `kube-system/<node>.node-password.edgesite`, with the serial of the certificate signed for
//!   it: only that certificate authenticates as the node (the authorizer's cache follows these
//!   Secrets). Another machine asking for the same name is refused while the Node exists;
//!   `edgesite node remove` deletes the Node and empties the record, so the old certificate
//!   stops working and the name is free again.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::{Request, State};
use axum::response::Response;
use http::{HeaderValue, StatusCode, header};
use serde_json::{Value, json};
use sha2::Digest;

use super::listener::PeerAddress;
use super::{ApiServer, error_response, json_response};
use crate::error::ApiError;
use crate::node_streams::JoinError;

/// Refused attempts one address may make in a row.
pub const BURST: f64 = 10.0;
/// How long the bucket takes to forget one refused attempt.
pub const DRAIN: Duration = Duration::from_secs(3);
/// Addresses remembered at most (the oldest idle ones are forgotten first).
const TRACKED: usize = 10_000;

/// The Secret holding a node's password hash.
pub fn password_secret(node: &str) -> String {
    format!("{node}.node-password.edgesite")
}

/// Refused join attempts per client address, as leaky buckets.
#[derive(Default)]
pub struct Failures(Mutex<HashMap<IpAddr, (f64, Instant)>>);

impl Failures {
    fn level(entry: &(f64, Instant), now: Instant) -> f64 {
        (entry.0 - now.duration_since(entry.1).as_secs_f64() / DRAIN.as_secs_f64()).max(0.0)
    }

    /// `Some(wait)` when `ip` must wait before trying again.
    fn blocked(&self, ip: IpAddr) -> Option<Duration> {
        let now = Instant::now();
        let table = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let level = Self::level(table.get(&ip)?, now);
        // Full when it cannot take one more refusal.
        (level > BURST - 1.0).then(|| DRAIN.mul_f64(level - (BURST - 1.0)))
    }

    fn refused(&self, ip: IpAddr) {
        let now = Instant::now();
        let mut table = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if table.len() >= TRACKED {
            table.retain(|_, e| Self::level(e, now) > 0.0);
        }
        if table.len() >= TRACKED {
            return;
        }
        let entry = table.entry(ip).or_insert((0.0, now));
        *entry = (Self::level(entry, now) + 1.0, now);
    }
}

fn hash(password: &str) -> String {
    format!("{:x}", sha2::Sha256::digest(password.as_bytes()))
}

/// What joins: a node of a site, or a site of a cloud hub. Each name belongs to the machine
/// that knows its password.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Joiner {
    Node,
    Site,
}

impl Joiner {
    fn secret(self, name: &str) -> String {
        match self {
            Joiner::Node => password_secret(name),
            Joiner::Site => format!("{name}.site-password.edgesite"),
        }
    }

    /// The object whose existence says the name is taken.
    fn object_key(self, name: &str) -> String {
        match self {
            Joiner::Node => crate::storage::object_key("", "nodes", "", name),
            Joiner::Site => {
                crate::storage::object_key(crate::cloud_link::CLUSTER_GROUP, "clusters", "", name)
            }
        }
    }

    fn taken(self, name: &str) -> String {
        match self {
            Joiner::Node => format!(
                "node {name:?} already exists and belongs to another machine (its node password differs): \
                 give this machine another --node-name, or, if the old machine is gone for good, \
                 remove it first with `edgesite node remove {name}` on the server"
            ),
            Joiner::Site => format!(
                "site {name:?} is already attached from another machine (its site password differs): \
                 give this site another --site-name, or, if the old site is gone for good, \
                 delete it first with `kubectl delete cluster {name}` at the hub"
            ),
        }
    }
}

/// Whether `node` may be (re)joined by the machine that knows `password`: `Ok(true)` when the
/// name is this machine's already, `Ok(false)` when it is free.
async fn may_claim(server: &Arc<ApiServer>, node: &str, password: &str) -> Result<bool, ApiError> {
    may_claim_as(server, Joiner::Node, node, password).await
}

async fn may_claim_as(
    server: &Arc<ApiServer>,
    joiner: Joiner,
    node: &str,
    password: &str,
) -> Result<bool, ApiError> {
    use base64::Engine;
    let key = crate::storage::object_key("", "secrets", "kube-system", &joiner.secret(node));
    let stored = server
        .storage
        .get(&key)
        .await
        .map_err(|e| ApiError::internal(e.to_string()))?;
    let matches = stored.as_ref().is_some_and(|stored| {
        stored
            .object
            .pointer("/data/hash")
            .and_then(Value::as_str)
            .and_then(|h| base64::engine::general_purpose::STANDARD.decode(h).ok())
            .is_some_and(|kept| kept == hash(password).as_bytes())
    });
    if matches {
        return Ok(true);
    }
    // Another machine's name (or a node that joined before node passwords, or the server's own
    // node) while its Node exists: refused.
    let node_key = joiner.object_key(node);
    let node_exists = server
        .storage
        .get(&node_key)
        .await
        .map_err(|e| ApiError::internal(e.to_string()))?
        .is_some();
    if node_exists {
        return Err(ApiError::forbidden(joiner.taken(node)));
    }
    Ok(false)
}

/// Records `node`'s password and the serial of the certificate just signed for it (the one
/// certificate of the node that authenticates from now on), replacing an earlier record.
async fn record(
    server: &Arc<ApiServer>,
    node: &str,
    password: &str,
    serial: &str,
) -> Result<(), ApiError> {
    record_as(server, Joiner::Node, node, password, serial).await
}

async fn record_as(
    server: &Arc<ApiServer>,
    joiner: Joiner,
    node: &str,
    password: &str,
    serial: &str,
) -> Result<(), ApiError> {
    use super::resources::{create_internal, delete_internal};
    use base64::Engine;
    let name = joiner.secret(node);
    let (label, kind) = match joiner {
        Joiner::Node => ("edgesite.io/node-password", "edgesite.io/node-password"),
        Joiner::Site => ("edgesite.io/site-password", "edgesite.io/site-password"),
    };
    match delete_internal(server, "", "v1", "secrets", "kube-system", &name).await {
        Ok(()) => {}
        Err(e) if e.code == 404 => {}
        Err(e) => return Err(e),
    }
    let b64 = |s: &str| base64::engine::general_purpose::STANDARD.encode(s);
    let secret = json!({
        "apiVersion": "v1", "kind": "Secret",
        "metadata": {"name": name, "namespace": "kube-system",
                     "labels": {label: node}},
        "type": kind,
        "data": {"hash": b64(&hash(password)), "serial": b64(serial)}
    });
    match create_internal(server, "", "v1", "secrets", "kube-system", secret).await {
        Ok(_) => Ok(()),
        Err(e) if e.code == 409 => Err(ApiError::conflict(
            if joiner == Joiner::Node {
                "nodes"
            } else {
                "clusters"
            },
            "",
            node,
            "another machine is joining with this name at this moment",
        )),
        Err(e) => Err(e),
    }
}

/// The Secret type of bootstrap tokens (upstream's `bootstrap.kubernetes.io/token`).
pub const BOOTSTRAP_TOKEN_TYPE: &str = "bootstrap.kubernetes.io/token";

/// Whether `token` (`[K10<ca hash>::]<id>.<secret>`) is a bootstrap token of this cluster: a
/// Secret `kube-system/bootstrap-token-<id>` of [`BOOTSTRAP_TOKEN_TYPE`] with that secret,
/// usable for authentication, not expired (upstream's rules for its bootstrap tokens).
pub async fn bootstrap_token_valid(server: &ApiServer, token: &str) -> bool {
    use base64::Engine;
    let credential = token.rsplit("::").next().unwrap_or(token).trim();
    let Some((id, secret)) = credential.split_once('.') else {
        return false;
    };
    let shaped = |t: &str, n: usize| {
        t.len() == n
            && t.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
    };
    if !shaped(id, 6) || !shaped(secret, 16) {
        return false;
    }
    let key = crate::storage::object_key(
        "",
        "secrets",
        "kube-system",
        &format!("bootstrap-token-{id}"),
    );
    let Ok(Some(stored)) = server.storage.get(&key).await else {
        return false;
    };
    let object = &stored.object;
    if object.get("type").and_then(Value::as_str) != Some(BOOTSTRAP_TOKEN_TYPE) {
        return false;
    }
    let field = |name: &str| -> Option<String> {
        let encoded = object.get("data")?.get(name)?.as_str()?;
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(encoded)
            .ok()?;
        String::from_utf8(bytes).ok()
    };
    let same = |a: &str, b: &str| {
        a.len() == b.len()
            && a.bytes()
                .zip(b.bytes())
                .fold(0u8, |acc, (x, y)| acc | (x ^ y))
                == 0
    };
    let unexpired = match field("expiration") {
        None => true,
        Some(at) => {
            chrono::DateTime::parse_from_rfc3339(&at).is_ok_and(|at| at > chrono::Utc::now())
        }
    };
    field("token-id").as_deref() == Some(id)
        && field("token-secret").is_some_and(|s| same(&s, secret))
        && field("usage-bootstrap-authentication").as_deref() == Some("true")
        && unexpired
}

/// The checks every join request passes: POST, the address not blocked for refused attempts,
/// a valid token for `join`, a JSON body. Answers the body, or the response to send.
async fn admit(
    server: &Arc<ApiServer>,
    join: Option<Arc<dyn crate::node_streams::NodeJoin>>,
    what: &str,
    request: Request,
) -> Result<(Arc<dyn crate::node_streams::NodeJoin>, Value), Response> {
    if request.method() != http::Method::POST {
        return Err(error_response(&ApiError::method_not_allowed(
            "get", what, "edgesite",
        )));
    }
    let Some(join) = join else {
        return Err(error_response(&ApiError::service_unavailable(format!(
            "this server does not accept {what} requests"
        ))));
    };
    let ip = request
        .extensions()
        .get::<PeerAddress>()
        .map(|p| p.0.ip().to_canonical());
    if let Some(wait) = ip.and_then(|ip| server.join_failures.blocked(ip)) {
        let seconds = wait.as_secs().max(1);
        let mut response = error_response(&ApiError::too_many_requests(format!(
            "too many refused join attempts from this address: try again in {seconds} s"
        )));
        response.headers_mut().insert(
            header::RETRY_AFTER,
            HeaderValue::from_str(&seconds.to_string()).unwrap_or(HeaderValue::from_static("1")),
        );
        return Err(response);
    }
    let token = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(|t| t.trim().to_string())
        .unwrap_or_default();
    // Node and site joins also take the cluster's bootstrap tokens (Secrets every server
    // shares, as kubeadm and K3s keep them); a server join takes the cluster token only.
    let bootstrapped = what != "server-join" && bootstrap_token_valid(server, &token).await;
    if !bootstrapped && let Err(JoinError::BadToken) = join.authorize(&token) {
        if let Some(ip) = ip {
            server.join_failures.refused(ip);
        }
        let mut e = ApiError::unauthorized();
        e.message = join.bad_token_message();
        return Err(error_response(&e));
    }
    let body = match axum::body::to_bytes(request.into_body(), 64 * 1024).await {
        Ok(b) => b,
        Err(_) => {
            return Err(error_response(&ApiError::bad_request(
                "the join request is too large",
            )));
        }
    };
    match serde_json::from_slice(&body) {
        Ok(v) => Ok((join, v)),
        Err(e) => Err(error_response(&ApiError::bad_request(format!(
            "the join request is not JSON: {e}"
        )))),
    }
}

async fn sign(
    join: Arc<dyn crate::node_streams::NodeJoin>,
    name: &str,
    csr: String,
) -> Result<String, Response> {
    let signed = {
        let name = name.to_string();
        tokio::task::spawn_blocking(move || join.sign(&name, &csr)).await
    };
    match signed {
        Ok(Ok(certificate)) => Ok(certificate),
        Ok(Err(e)) => Err(error_response(&ApiError::bad_request(e.to_string()))),
        Err(e) => Err(error_response(&ApiError::internal(e.to_string()))),
    }
}

/// `POST /edgesite/v1/node-join` with `Authorization: Bearer <token>` and
/// `{"node": NAME, "csr": PEM, "password": SECRET}`: a client certificate for
/// `system:node:NAME`.
pub async fn node_join(State(server): State<Arc<ApiServer>>, request: Request) -> Response {
    let ip = request
        .extensions()
        .get::<PeerAddress>()
        .map(|p| p.0.ip().to_canonical());
    let join = server.node_join.get().cloned();
    let (join, parsed) = match admit(&server, join, "node-join", request).await {
        Ok(x) => x,
        Err(response) => return response,
    };
    let refused = |e: ApiError| {
        if let Some(ip) = ip {
            server.join_failures.refused(ip);
        }
        error_response(&e)
    };
    let node = parsed["node"].as_str().unwrap_or_default().to_string();
    let csr = parsed["csr"].as_str().unwrap_or_default().to_string();
    let password = parsed["password"].as_str().unwrap_or_default();
    if let Err(m) = crate::validation::is_dns1123_subdomain(&node) {
        return error_response(&ApiError::bad_request(format!("node name {node:?}: {m}")));
    }
    if password.len() < 16 {
        return error_response(&ApiError::bad_request(
            "the join request carries no node password: this agent is older than the server; update it",
        ));
    }
    if let Err(e) = may_claim(&server, &node, password).await {
        return refused(e);
    }
    let certificate = match sign(join, &node, csr).await {
        Ok(c) => c,
        Err(response) => return response,
    };
    let Some(serial) = crate::auth::certificate_serial_pem(&certificate) else {
        return error_response(&ApiError::internal("the signed certificate cannot be read"));
    };
    if let Err(e) = record(&server, &node, password, &serial).await {
        return error_response(&e);
    }
    json_response(
        StatusCode::OK,
        &json!({"certificate": certificate, "ca": server.ca_pem.get().cloned().unwrap_or_default()}),
    )
}

/// `POST /edgesite/v1/server-join` with `Authorization: Bearer <the cluster token>` and
/// `{"name": MEMBER, "peerURL": URL}`: another server joins the site's embedded etcd.
pub async fn server_join(State(server): State<Arc<ApiServer>>, request: Request) -> Response {
    let Some(join) = server.server_join.get().cloned() else {
        return error_response(&ApiError::service_unavailable(
            "this server keeps the site's state where no other server can share it (SQLite): \
             start it with --cluster-init first, then join more servers to it",
        ));
    };
    let as_node_join = join.clone() as Arc<dyn crate::node_streams::NodeJoin>;
    let (_, parsed) = match admit(&server, Some(as_node_join), "server-join", request).await {
        Ok(x) => x,
        Err(response) => return response,
    };
    match join.join_server(parsed).await {
        Ok(answer) => json_response(StatusCode::OK, &answer),
        Err(JoinError::BadToken) => {
            let mut e = ApiError::unauthorized();
            e.message = join.bad_token_message();
            error_response(&e)
        }
        Err(JoinError::Invalid(message)) => error_response(&ApiError::bad_request(message)),
    }
}

/// `POST /edgesite/v1/site-join` (a cloud hub) with `Authorization: Bearer <token>` and
/// `{"site": NAME, "csr": PEM}`: a client certificate for `system:site:NAME` in group
/// `edgesite:sites`, which the site's link presents.
pub async fn site_join(State(server): State<Arc<ApiServer>>, request: Request) -> Response {
    let join = server.site_join.get().cloned();
    let (join, parsed) = match admit(&server, join, "site-join", request).await {
        Ok(x) => x,
        Err(response) => return response,
    };
    let site = parsed["site"].as_str().unwrap_or_default().to_string();
    let csr = parsed["csr"].as_str().unwrap_or_default().to_string();
    let password = parsed["password"].as_str().unwrap_or_default();
    if let Err(m) = crate::validation::is_dns1123_label(&site) {
        return error_response(&ApiError::bad_request(format!("site name {site:?}: {m}")));
    }
    if password.len() < 16 {
        return error_response(&ApiError::bad_request(
            "the attach request carries no site password: this site is older than the hub; update it",
        ));
    }
    if let Err(e) = may_claim_as(&server, Joiner::Site, &site, password).await {
        return error_response(&e);
    }
    let certificate = match sign(join, &site, csr).await {
        Ok(c) => c,
        Err(response) => return response,
    };
    let Some(serial) = crate::auth::certificate_serial_pem(&certificate) else {
        return error_response(&ApiError::internal("the signed certificate cannot be read"));
    };
    if let Err(e) = record_as(&server, Joiner::Site, &site, password, &serial).await {
        return error_response(&e);
    }
    tracing::info!(%site, "site joined the hub");
    json_response(
        StatusCode::OK,
        &json!({"certificate": certificate, "ca": server.ca_pem.get().cloned().unwrap_or_default()}),
    )
}

/// `POST /edgesite/v1/site-renew` (a cloud hub), made with a site's current certificate, with
/// `{"csr": PEM, "password": SECRET}`: a new certificate for the same site, which from now on is
/// the one that authenticates (the old one stops working).
pub async fn site_renew(
    server: &Arc<ApiServer>,
    identity: &crate::auth::Identity,
    request: Request,
) -> Response {
    let Some(join) = server.site_join.get().cloned() else {
        return error_response(&ApiError::no_route());
    };
    let Some(site) = crate::cloud_link::site_of(identity).map(str::to_string) else {
        return error_response(&ApiError::forbidden(format!(
            "user \"{}\" is not a site: only a site's own certificate renews itself",
            identity.user
        )));
    };
    if request.method() != http::Method::POST {
        return error_response(&ApiError::method_not_allowed(
            "get",
            "site-renew",
            "edgesite",
        ));
    }
    let body = match axum::body::to_bytes(request.into_body(), 64 * 1024).await {
        Ok(b) => b,
        Err(e) => {
            return error_response(&ApiError::bad_request(format!(
                "the renewal request could not be read: {e}"
            )));
        }
    };
    let parsed: Value = match serde_json::from_slice(&body) {
        Ok(v) => v,
        Err(e) => {
            return error_response(&ApiError::bad_request(format!(
                "the renewal request is not JSON: {e}"
            )));
        }
    };
    let csr = parsed["csr"].as_str().unwrap_or_default().to_string();
    let password = parsed["password"].as_str().unwrap_or_default();
    // The certificate says who; the password proves it is still the machine that attached.
    match may_claim_as(server, Joiner::Site, &site, password).await {
        Ok(true) => {}
        Ok(false) => {
            return error_response(&ApiError::forbidden(format!(
                "site {site:?}: the site password does not match the one it attached with"
            )));
        }
        Err(e) => return error_response(&e),
    }
    let certificate = match sign(join, &site, csr).await {
        Ok(c) => c,
        Err(response) => return response,
    };
    let Some(serial) = crate::auth::certificate_serial_pem(&certificate) else {
        return error_response(&ApiError::internal("the signed certificate cannot be read"));
    };
    if let Err(e) = record_as(server, Joiner::Site, &site, password, &serial).await {
        return error_response(&e);
    }
    tracing::info!(%site, "site renewed its certificate");
    json_response(StatusCode::OK, &json!({"certificate": certificate}))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn bootstrap_tokens_are_secrets_with_a_secret_a_usage_and_an_expiry() {
        use base64::Engine;
        let dir = tempfile::tempdir().unwrap();
        let server = crate::server::prepare_store(
            &crate::server::Datastore::Sqlite(dir.path().join("state.db")),
            64,
            crate::auth::TokenAuthenticator::default(),
            crate::services::ServiceNetwork::default(),
            None,
            tokio_util::sync::CancellationToken::new(),
        )
        .await
        .unwrap();
        let b64 = |s: &str| base64::engine::general_purpose::STANDARD.encode(s);
        let token = |id: &str, secret: &str, usage: &str, expiration: &str| {
            let mut data = json!({"token-id": b64(id), "token-secret": b64(secret),
                "usage-bootstrap-authentication": b64(usage)});
            if !expiration.is_empty() {
                data["expiration"] = json!(b64(expiration));
            }
            json!({"apiVersion": "v1", "kind": "Secret",
                "metadata": {"name": format!("bootstrap-token-{id}"), "namespace": "kube-system"},
                "type": BOOTSTRAP_TOKEN_TYPE, "data": data})
        };
        let later = (chrono::Utc::now() + chrono::Duration::hours(1)).to_rfc3339();
        let earlier = (chrono::Utc::now() - chrono::Duration::hours(1)).to_rfc3339();
        for secret in [
            token("abcdef", "0123456789abcdef", "true", &later),
            token("noexpr", "0123456789abcdef", "true", ""),
            token("expird", "0123456789abcdef", "true", &earlier),
            token("nouse0", "0123456789abcdef", "false", ""),
        ] {
            crate::http::resources::create_internal(
                &server,
                "",
                "v1",
                "secrets",
                "kube-system",
                secret,
            )
            .await
            .unwrap();
        }
        assert!(bootstrap_token_valid(&server, "abcdef.0123456789abcdef").await);
        assert!(
            bootstrap_token_valid(
                &server,
                &format!("K10{}::abcdef.0123456789abcdef", "0".repeat(64))
            )
            .await
        );
        assert!(bootstrap_token_valid(&server, "noexpr.0123456789abcdef").await);
        assert!(!bootstrap_token_valid(&server, "abcdef.0123456789abcdee").await);
        assert!(!bootstrap_token_valid(&server, "expird.0123456789abcdef").await);
        assert!(!bootstrap_token_valid(&server, "nouse0.0123456789abcdef").await);
        assert!(!bootstrap_token_valid(&server, "absent.0123456789abcdef").await);
        assert!(!bootstrap_token_valid(&server, "ABCDEF.0123456789abcdef").await);
        assert!(!bootstrap_token_valid(&server, "not a token").await);
    }

    #[test]
    fn refused_attempts_fill_a_bucket_that_drains() {
        let failures = Failures::default();
        let ip: IpAddr = [10, 0, 0, 1].into();
        for _ in 0..BURST as usize {
            assert!(failures.blocked(ip).is_none());
            failures.refused(ip);
        }
        let wait = failures.blocked(ip).expect("blocked after the burst");
        assert!(wait <= DRAIN + Duration::from_millis(10), "{wait:?}");
        // Another address is not affected.
        assert!(failures.blocked([10, 0, 0, 2].into()).is_none());
        // Drained by one attempt's worth: allowed again.
        let mut table = failures.0.lock().unwrap();
        let entry = table.get_mut(&ip).unwrap();
        entry.1 -= DRAIN;
        drop(table);
        assert!(failures.blocked(ip).is_none());
    }
}
