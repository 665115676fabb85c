//! Generic ephemeral volumes, as upstream's ephemeral volume controller: for a pod's volume with
//! `ephemeral.volumeClaimTemplate`, the claim `<pod>-<volume>` is made from the template with
//! the pod as its controller, so it is provisioned like any claim (the scheduler waits for it)
//! and goes with the pod. A claim of that name the pod does not own is not taken over: the pod
//! waits and an Event says why.

use std::collections::HashSet;
use std::sync::Arc;

use k8s_openapi::api::core::v1::{PersistentVolumeClaim, Pod};
use kube::api::{Api, PostParams};
use tokio_util::sync::CancellationToken;

use crate::events::Recorder;
use crate::informer::Informers;
use crate::pods;

/// The claims a pod's ephemeral volumes need: (claim name, the claim to create).
pub fn wanted(pod: &Pod) -> Vec<(String, PersistentVolumeClaim)> {
    let pod_name = pod.metadata.name.as_deref().unwrap_or("");
    pod.spec
        .as_ref()
        .and_then(|s| s.volumes.as_ref())
        .into_iter()
        .flatten()
        .filter_map(|v| {
            let template = v.ephemeral.as_ref()?.volume_claim_template.as_ref()?;
            let name = sitekit::claims::ephemeral_claim(pod_name, &v.name);
            let mut metadata = template.metadata.clone().unwrap_or_default();
            metadata.name = Some(name.clone());
            metadata.namespace = pod.metadata.namespace.clone();
            metadata.generate_name = None;
            metadata.owner_references = Some(vec![pods::controller_reference(pod)]);
            Some((
                name,
                PersistentVolumeClaim {
                    metadata,
                    spec: Some(template.spec.clone()),
                    status: None,
                },
            ))
        })
        .collect()
}

fn owned_by(claim: &PersistentVolumeClaim, pod: &Pod) -> bool {
    pods::controller_uid(&claim.metadata) == pod.metadata.uid.as_deref()
}

pub fn controller(
    informers: &Informers,
    recorder: Recorder,
    shutdown: CancellationToken,
) -> impl Future<Output = ()> + Send + 'static {
    let pods_informer = informers.pods();
    let claims = informers.persistent_volume_claims();
    let (mut pod_changes, mut claim_changes) =
        (pods_informer.subscribe(1024), claims.subscribe(256));
    let (pod_store, claim_store) = (pods_informer.store(), claims.store());
    let ready = futures::future::join(pods_informer.synced(), claims.synced());
    let client = informers.client_for("ephemeral-volume-controller");
    async move {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = ready => {}
        }
        // Conflicts already reported (pod uid, claim name).
        let mut said: HashSet<(String, String)> = HashSet::new();
        loop {
            let claims: Vec<Arc<PersistentVolumeClaim>> = claim_store.state();
            for pod in pod_store.state() {
                if pod.metadata.deletion_timestamp.is_some() || pods::is_terminal(&pod) {
                    continue;
                }
                let namespace = pod.metadata.namespace.clone().unwrap_or_default();
                for (name, claim) in wanted(&pod) {
                    let existing = claims.iter().find(|c| {
                        c.metadata.namespace.as_deref() == Some(&namespace)
                            && c.metadata.name.as_deref() == Some(&name)
                    });
                    match existing {
                        Some(c) if owned_by(c, &pod) => {}
                        Some(_) => {
                            let key = (pod.metadata.uid.clone().unwrap_or_default(), name.clone());
                            if said.insert(key) {
                                recorder.warning(
                                    &*pod,
                                    "FailedBinding",
                                    format!("PVC {namespace}/{name} was not created for the pod"),
                                );
                            }
                        }
                        None => {
                            let api: Api<PersistentVolumeClaim> =
                                Api::namespaced(client.clone(), &namespace);
                            match api.create(&PostParams::default(), &claim).await {
                                Ok(_) => {
                                    tracing::info!(claim = %format!("{namespace}/{name}"), "ephemeral volume claim created")
                                }
                                Err(kube::Error::Api(s)) if s.code == 409 => {}
                                Err(error) => {
                                    recorder.warning(
                                        &*pod,
                                        "FailedCreate",
                                        format!("cannot create the claim {name} of an ephemeral volume: {error}"),
                                    );
                                }
                            }
                        }
                    }
                }
            }
            tokio::select! {
                _ = shutdown.cancelled() => return,
                change = pod_changes.recv() => if change.is_none() { return },
                change = claim_changes.recv() => if change.is_none() { return },
            }
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            while pod_changes.try_recv().is_ok() {}
            while claim_changes.try_recv().is_ok() {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn a_pods_ephemeral_volume_becomes_a_claim_it_owns() {
        let pod: Pod = serde_json::from_value(json!({
            "metadata": {"name": "web", "namespace": "shop", "uid": "u1"},
            "spec": {"containers": [], "volumes": [
                {"name": "scratch", "ephemeral": {"volumeClaimTemplate": {
                    "metadata": {"labels": {"type": "scratch"}},
                    "spec": {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "1Gi"}}}}}},
                {"name": "cfg", "configMap": {"name": "c"}}
            ]},
        }))
        .unwrap();
        let wanted = wanted(&pod);
        assert_eq!(wanted.len(), 1);
        let (name, claim) = &wanted[0];
        assert_eq!(name, "web-scratch");
        assert_eq!(claim.metadata.namespace.as_deref(), Some("shop"));
        assert_eq!(claim.metadata.labels.as_ref().unwrap()["type"], "scratch");
        assert!(owned_by(claim, &pod));
    }
}
