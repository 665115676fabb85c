//! The cluster CA as the signer of `kubernetes.io/kube-apiserver-client` requests (upstream's
//! csrsigning controller): an approved CertificateSigningRequest gets its certificate in
//! `status.certificate`; one that cannot be signed gets a `Failed` condition saying why. It runs
//! with the other loops, as the `kube-system/certificate-controller` ServiceAccount.

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
        if csr.spec.signer_name != apiserver_lite::certificates::KUBE_APISERVER_CLIENT
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
        let signed =
            tokio::task::spawn_blocking(move || crate::pki::sign_client_csr(&ca, &pem, seconds))
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
