//! The cluster CA as the signer of `kubernetes.io/kube-apiserver-client` and
//! `kubernetes.io/kubelet-serving` requests (upstream's csrsigning controller): an approved
//! CertificateSigningRequest gets its certificate in `status.certificate`; one that cannot be
//! signed gets a `Failed` condition saying why. A node's request for its own serving
//! certificate is approved when it names only the node and the addresses its Node reports
//! (what kubelet-csr-approver checks; upstream leaves these to an approver), denied otherwise.
//! It runs with the other loops, as the `kube-system/certificate-controller` ServiceAccount.

use base64::Engine;
use futures::StreamExt;
use k8s_openapi::api::certificates::v1::CertificateSigningRequest;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::{WatchStreamExt, watcher};
use serde_json::json;
use tokio_util::sync::CancellationToken;

use crate::pki::CertAndKey;

/// Upstream's default when a request names no `expirationSeconds`: a year.
const DEFAULT_SECONDS: i64 = 365 * 24 * 3600;

fn approved(csr: &CertificateSigningRequest) -> bool {
    let conditions = csr
        .status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .cloned()
        .unwrap_or_default();
    let has = |t: &str| conditions.iter().any(|c| c.type_ == t);
    has("Approved") && !has("Denied") && !has("Failed")
}

fn decided(csr: &CertificateSigningRequest) -> bool {
    csr.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|c| {
            c.iter()
                .any(|c| c.type_ == "Approved" || c.type_ == "Denied")
        })
}

/// Why a `kubernetes.io/kubelet-serving` request may not be approved, if it may not: it must come
/// from the node it names, and name only that node and the addresses its Node reports.
fn serving_refusal(
    csr: &CertificateSigningRequest,
    node: Option<&k8s_openapi::api::core::v1::Node>,
) -> Option<String> {
    let pem = String::from_utf8_lossy(&csr.spec.request.0).into_owned();
    let (name, dns, ips) = match crate::pki::kubelet_serving_names(&pem) {
        Ok(n) => n,
        Err(e) => return Some(format!("{e:#}")),
    };
    let requester = csr.spec.username.clone().unwrap_or_default();
    if requester != format!("system:node:{name}") {
        return Some(format!(
            "{requester:?} may not ask for a serving certificate of node {name:?}"
        ));
    }
    let Some(node) = node else {
        return Some(format!("node {name:?} does not exist"));
    };
    let reported: Vec<String> = node
        .status
        .as_ref()
        .and_then(|s| s.addresses.clone())
        .unwrap_or_default()
        .into_iter()
        .map(|a| a.address)
        .collect();
    for ip in &ips {
        if !reported.contains(ip) {
            return Some(format!("node {name:?} does not report address {ip}"));
        }
    }
    for d in &dns {
        if *d != name && !reported.contains(d) {
            return Some(format!("node {name:?} does not report host name {d}"));
        }
    }
    None
}

async fn decide_serving(api: &Api<CertificateSigningRequest>, csr: &CertificateSigningRequest) {
    let name = csr.metadata.name.clone().unwrap_or_default();
    let pem = String::from_utf8_lossy(&csr.spec.request.0).into_owned();
    let node_name = crate::pki::kubelet_serving_names(&pem)
        .map(|(n, _, _)| n)
        .unwrap_or_default();
    let nodes: Api<k8s_openapi::api::core::v1::Node> = Api::all(api.clone().into_client());
    let node = match nodes.get_opt(&node_name).await {
        Ok(n) => n,
        Err(e) => {
            tracing::debug!(csr = %name, "read the node: {e}");
            return;
        }
    };
    let now = apiserver_lite::http::resources::now();
    let condition = match serving_refusal(csr, node.as_ref()) {
        None => json!({"type": "Approved", "status": "True", "reason": "AutoApproved",
            "message": "the node's own names and addresses",
            "lastUpdateTime": now, "lastTransitionTime": now}),
        Some(why) => {
            tracing::warn!(csr = %name, "kubelet serving certificate denied: {why}");
            json!({"type": "Denied", "status": "True", "reason": "AddressesNotReported",
                "message": why, "lastUpdateTime": now, "lastTransitionTime": now})
        }
    };
    let body =
        json!({"metadata": {"uid": csr.metadata.uid}, "status": {"conditions": [condition]}});
    if let Err(e) = api
        .patch_approval(&name, &PatchParams::default(), &Patch::Merge(&body))
        .await
    {
        tracing::warn!(csr = %name, "decide the kubelet serving request: {e}");
    }
}

/// Runs until `shutdown`.
pub async fn run(client: kube::Client, ca: CertAndKey, shutdown: CancellationToken) {
    let api: Api<CertificateSigningRequest> = Api::all(client);
    let mut stream = watcher(api.clone(), watcher::Config::default())
        .default_backoff()
        .applied_objects()
        .boxed();
    loop {
        let csr = tokio::select! {
            _ = shutdown.cancelled() => return,
            next = stream.next() => match next {
                Some(Ok(csr)) => csr,
                Some(Err(e)) => {
                    tracing::debug!("certificate signer watch: {e}");
                    continue;
                }
                None => return,
            },
        };
        let serving = csr.spec.signer_name == apiserver_lite::certificates::KUBELET_SERVING;
        if serving && !decided(&csr) {
            decide_serving(&api, &csr).await;
            continue;
        }
        if (csr.spec.signer_name != apiserver_lite::certificates::KUBE_APISERVER_CLIENT && !serving)
            || !approved(&csr)
            || csr
                .status
                .as_ref()
                .and_then(|s| s.certificate.as_ref())
                .is_some()
        {
            continue;
        }
        let name = csr.metadata.name.clone().unwrap_or_default();
        let pem = String::from_utf8_lossy(&csr.spec.request.0).into_owned();
        let seconds = csr
            .spec
            .expiration_seconds
            .map(i64::from)
            .unwrap_or(DEFAULT_SECONDS);
        let ca = ca.clone();
        let signed = tokio::task::spawn_blocking(move || {
            if serving {
                crate::pki::sign_kubelet_serving_csr(&ca, &pem)
            } else {
                crate::pki::sign_client_csr(&ca, &pem, seconds)
            }
        })
        .await;
        let status = match signed {
            Ok(Ok(certificate)) => json!({"status": {"certificate":
                base64::engine::general_purpose::STANDARD.encode(certificate)}}),
            Ok(Err(e)) => {
                tracing::warn!(csr = %name, "cannot sign: {e:#}");
                let now = apiserver_lite::http::resources::now();
                let mut conditions = csr
                    .status
                    .as_ref()
                    .and_then(|s| s.conditions.clone())
                    .map(|c| serde_json::to_value(c).unwrap_or(json!([])))
                    .unwrap_or(json!([]));
                if let Some(list) = conditions.as_array_mut() {
                    list.push(json!({"type": "Failed", "status": "True",
                        "reason": "SignerValidationFailure", "message": format!("{e:#}"),
                        "lastUpdateTime": now, "lastTransitionTime": now}));
                }
                json!({"status": {"conditions": conditions}})
            }
            Err(e) => {
                tracing::warn!(csr = %name, "signing task failed: {e}");
                continue;
            }
        };
        // The uid guards against signing into a request deleted and made again meanwhile.
        let mut body = status;
        body["metadata"] = json!({"uid": csr.metadata.uid});
        if let Err(e) = api
            .patch_status(&name, &PatchParams::default(), &Patch::Merge(&body))
            .await
        {
            tracing::warn!(csr = %name, "write the certificate: {e}");
        }
    }
}

#[cfg(test)]
mod serving_tests {
    use super::*;
    use k8s_openapi::api::certificates::v1::CertificateSigningRequestSpec;
    use k8s_openapi::api::core::v1::{Node, NodeAddress, NodeStatus};

    fn request(node: &str, requester: &str, ips: &[&str]) -> CertificateSigningRequest {
        let ips: Vec<String> = ips.iter().map(|s| s.to_string()).collect();
        let (pem, _) = crate::pki::kubelet_serving_csr(node, &[node.to_string()], &ips).unwrap();
        CertificateSigningRequest {
            spec: CertificateSigningRequestSpec {
                request: k8s_openapi::ByteString(pem.into_bytes()),
                signer_name: apiserver_lite::certificates::KUBELET_SERVING.into(),
                username: Some(requester.into()),
                ..Default::default()
            },
            ..Default::default()
        }
    }

    fn node(addresses: &[&str]) -> Node {
        Node {
            status: Some(NodeStatus {
                addresses: Some(
                    addresses
                        .iter()
                        .map(|a| NodeAddress {
                            address: a.to_string(),
                            type_: "InternalIP".into(),
                        })
                        .collect(),
                ),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    #[test]
    fn a_node_gets_a_serving_certificate_for_its_own_addresses_only() {
        let n = node(&["10.0.0.5"]);
        assert_eq!(
            serving_refusal(
                &request("edge-1", "system:node:edge-1", &["10.0.0.5"]),
                Some(&n)
            ),
            None
        );
        let other = serving_refusal(
            &request("edge-1", "system:node:edge-2", &["10.0.0.5"]),
            Some(&n),
        );
        assert!(other.unwrap().contains("may not ask"));
        let address = serving_refusal(
            &request("edge-1", "system:node:edge-1", &["10.9.9.9"]),
            Some(&n),
        );
        assert!(
            address
                .unwrap()
                .contains("does not report address 10.9.9.9")
        );
        assert!(
            serving_refusal(
                &request("edge-1", "system:node:edge-1", &["10.0.0.5"]),
                None
            )
            .is_some()
        );
        // And the signed certificate is for serving, with the names asked for.
        let ca = crate::pki::Pki::new(tempfile::tempdir().unwrap().path())
            .ca()
            .unwrap();
        let csr = request("edge-1", "system:node:edge-1", &["10.0.0.5"]);
        let pem = String::from_utf8(csr.spec.request.0).unwrap();
        let cert = crate::pki::sign_kubelet_serving_csr(&ca, &pem).unwrap();
        let der = rustls_pemfile::certs(&mut cert.as_bytes())
            .next()
            .unwrap()
            .unwrap();
        let (_, parsed) = x509_parser::parse_x509_certificate(der.as_ref()).unwrap();
        assert!(
            parsed
                .extended_key_usage()
                .unwrap()
                .unwrap()
                .value
                .server_auth
        );
        assert_eq!(
            parsed
                .subject()
                .iter_common_name()
                .next()
                .unwrap()
                .as_str()
                .unwrap(),
            "system:node:edge-1"
        );
    }
}
