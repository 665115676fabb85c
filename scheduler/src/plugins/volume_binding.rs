//! VolumeBinding, upstream's plugin of that name in kind: a pod's PersistentVolumeClaims decide
//! where it may go.
//!
//! - A bound claim's volume must be usable on the node (its node affinity: a local volume keeps
//!   its pod on its node).
//! - An unbound claim of a WaitForFirstConsumer class needs, on the node, a free volume that fits
//!   or a provisioner that can make one there (the site's `local-path` provisioner: a node
//!   whose agent offers local storage, with room for what the pod's claims to provision there
//!   request; a class's `allowedTopologies` are honoured).
//! - A missing claim, one being deleted, an unbound claim of an Immediate class or an unknown
//!   class stops the pod at the prefilter with upstream's message.
//!
//! Binding happens after a node is chosen ([`bindings`], done by the scheduler loop before it
//! binds the pod): a free volume is bound to the claim, or the claim is annotated with the
//! node for the provisioner.

use std::collections::HashSet;
use std::sync::Arc;

use controllers::persistent_volume as pv;
use k8s_openapi::api::core::v1::{PersistentVolume, PersistentVolumeClaim};

use super::{FilterPlugin, Reasons};
use crate::framework::{CycleState, NodeInfo, PodInfo, Snapshot, Volumes};

pub const CONFLICT: &str = "node(s) had volume node affinity conflict";
pub const NO_VOLUME: &str = "node(s) didn't find available persistent volumes to bind";
pub const NO_SPACE: &str = "node(s) did not have enough free storage";

/// What the prefilter found for the pod.
#[derive(Default)]
pub struct PreFilterState {
    /// Volumes of the pod's bound claims.
    pub bound: Vec<Arc<PersistentVolume>>,
    /// Unbound claims waiting for this pod's node.
    pub to_bind: Vec<Arc<PersistentVolumeClaim>>,
    pub volumes: Arc<Volumes>,
}

/// What binding one claim on the chosen node means.
#[derive(Debug, Clone, PartialEq)]
pub enum Binding {
    /// Bind this free volume to the claim.
    Volume {
        claim: Arc<PersistentVolumeClaim>,
        volume: Arc<PersistentVolume>,
    },
    /// Ask the provisioner for a volume on the node.
    Provision { claim: Arc<PersistentVolumeClaim> },
}

impl Binding {
    pub fn claim(&self) -> &PersistentVolumeClaim {
        match self {
            Binding::Volume { claim, .. } | Binding::Provision { claim } => claim,
        }
    }
}

/// Whether a claim of this class could be provisioned on the node.
fn can_provision(volumes: &Volumes, claim: &PersistentVolumeClaim, node: &NodeInfo) -> bool {
    let Some(class) = volumes.classes.get(pv::claim_class(claim)) else {
        return false;
    };
    let allowed = class.allowed_topologies.as_deref().unwrap_or(&[]);
    let topology_ok = allowed.is_empty()
        || allowed.iter().any(|term| {
            term.match_label_expressions.iter().flatten().all(|r| {
                node.labels
                    .get(&r.key)
                    .is_some_and(|v| r.values.contains(v))
            })
        });
    if !topology_ok {
        return false;
    }
    if class.provisioner == pv::PROVISIONER {
        // The site's provisioner needs the node's storage directory.
        return node
            .node
            .metadata
            .annotations
            .as_ref()
            .is_some_and(|a| a.contains_key(pv::STORAGE_PATH));
    }
    // Another provisioner: upstream lets it try (it reports its own failures).
    !class.provisioner.is_empty() && class.provisioner != "kubernetes.io/no-provisioner"
}

/// For each unbound claim, what to do on `node`; the reason when some claim cannot be served
/// there. Claims the site's provisioner would make on the node must fit, together, in the free
/// storage its agent published (upstream's capacity check).
pub fn bindings(
    to_bind: &[Arc<PersistentVolumeClaim>],
    volumes: &Volumes,
    node: &NodeInfo,
) -> Result<Vec<Binding>, &'static str> {
    let mut chosen: HashSet<&str> = HashSet::new();
    let mut out = Vec::with_capacity(to_bind.len());
    let room = pv::storage_free(&node.node);
    let mut provisioning: i64 = 0;
    for claim in to_bind {
        let free = volumes
            .volumes
            .iter()
            .filter(|v| !chosen.contains(v.metadata.name.as_deref().unwrap_or("")))
            .map(Arc::as_ref);
        match pv::find_volume(claim, free, Some((&node.labels, node.name.as_str()))) {
            Some(found) => {
                let name = found.metadata.name.as_deref().unwrap_or("");
                chosen.insert(name);
                let volume = volumes.by_name.get(name).ok_or(NO_VOLUME)?.clone();
                out.push(Binding::Volume {
                    claim: claim.clone(),
                    volume,
                });
            }
            None if can_provision(volumes, claim, node) => {
                if provisioned_here(volumes, claim) {
                    provisioning += pv::requested_bytes(claim);
                    if room.is_some_and(|room| provisioning > room) {
                        return Err(NO_SPACE);
                    }
                }
                out.push(Binding::Provision {
                    claim: claim.clone(),
                })
            }
            None => return Err(NO_VOLUME),
        }
    }
    Ok(out)
}

/// Whether the site's own provisioner makes this claim's volume.
fn provisioned_here(volumes: &Volumes, claim: &PersistentVolumeClaim) -> bool {
    volumes
        .classes
        .get(pv::claim_class(claim))
        .is_some_and(|c| c.provisioner == pv::PROVISIONER)
}

/// Whether the pod uses no claims (so the volumes need not be looked at).
pub fn pod_claims_empty(pod: &PodInfo) -> bool {
    pv::pod_claims(&pod.pod).is_empty()
}

/// What binding the pod's unbound claims on the chosen `node` takes (empty when none wait).
pub fn bindings_for(pod: &PodInfo, snapshot: &Snapshot, node: &NodeInfo) -> Vec<Binding> {
    let mut state = CycleState::default();
    if VolumeBinding.pre_filter(pod, snapshot, &mut state).is_err() {
        return Vec::new();
    }
    state
        .volumes
        .and_then(|found| bindings(&found.to_bind, &found.volumes, node).ok())
        .unwrap_or_default()
}

pub struct VolumeBinding;

impl FilterPlugin for VolumeBinding {
    fn name(&self) -> &'static str {
        "VolumeBinding"
    }

    fn pre_filter(
        &self,
        pod: &PodInfo,
        snapshot: &Snapshot,
        state: &mut CycleState,
    ) -> Result<(), String> {
        let names = pv::pod_claims(&pod.pod);
        if names.is_empty() {
            return Ok(());
        }
        let volumes = snapshot.volumes.clone();
        let mut found = PreFilterState {
            volumes: volumes.clone(),
            ..Default::default()
        };
        for name in names {
            let Some(claim) = volumes.claims.get(&(pod.namespace.clone(), name.clone())) else {
                return Err(format!("persistentvolumeclaim \"{name}\" not found"));
            };
            if claim.metadata.deletion_timestamp.is_some() {
                return Err(format!("persistentvolumeclaim \"{name}\" is being deleted"));
            }
            if let Some(volume_name) = pv::volume_name(claim) {
                match volumes.by_name.get(volume_name) {
                    Some(volume) => found.bound.push(volume.clone()),
                    None => {
                        return Err(format!(
                            "pvc {}/{name}'s volume \"{volume_name}\" not found",
                            pod.namespace
                        ));
                    }
                }
                continue;
            }
            let class_name = pv::claim_class(claim);
            let class = volumes.classes.get(class_name);
            if !class_name.is_empty() && class.is_none() {
                return Err(format!(
                    "storageclass.storage.k8s.io \"{class_name}\" not found"
                ));
            }
            if !pv::waits_for_first_consumer(class.map(Arc::as_ref)) {
                return Err("pod has unbound immediate PersistentVolumeClaims".into());
            }
            found.to_bind.push(claim.clone());
        }
        state.volumes = Some(found);
        Ok(())
    }

    fn filter(&self, _pod: &PodInfo, node: &NodeInfo, state: &CycleState) -> Result<(), Reasons> {
        let Some(found) = state.volumes.as_ref() else {
            return Ok(());
        };
        if found
            .bound
            .iter()
            .any(|v| !pv::volume_fits_node(v, &node.labels, &node.name))
        {
            return Err(vec![CONFLICT.into()]);
        }
        if !found.to_bind.is_empty()
            && let Err(reason) = bindings(&found.to_bind, &found.volumes, node)
        {
            return Err(vec![reason.into()]);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::framework::testing::*;
    use serde_json::json;

    fn volumes(claims: Vec<serde_json::Value>, pvs: Vec<serde_json::Value>) -> Arc<Volumes> {
        let classes = vec![Arc::new(pv::default_class())];
        Arc::new(Volumes::new(
            claims.into_iter().map(|c| Arc::new(from_json(c))).collect(),
            pvs.into_iter().map(|v| Arc::new(from_json(v))).collect(),
            classes,
        ))
    }

    fn claim(name: &str, class: &str, volume: Option<&str>) -> serde_json::Value {
        json!({
            "metadata": {"name": name, "namespace": "default", "uid": name},
            "spec": {"storageClassName": class, "accessModes": ["ReadWriteOnce"],
                     "resources": {"requests": {"storage": "1Gi"}}, "volumeName": volume},
        })
    }

    fn local_volume(name: &str, node: &str) -> serde_json::Value {
        json!({
            "metadata": {"name": name},
            "spec": {"storageClassName": "", "accessModes": ["ReadWriteOnce"], "capacity": {"storage": "5Gi"},
                     "local": {"path": "/mnt/disk"},
                     "nodeAffinity": {"required": {"nodeSelectorTerms": [{"matchExpressions": [
                         {"key": "kubernetes.io/hostname", "operator": "In", "values": [node]}]}]}}},
        })
    }

    fn pod_with(claim: &str) -> PodInfo {
        PodInfo::new(Arc::new(from_json(json!({
            "metadata": {"name": "p", "namespace": "default"},
            "spec": {"containers": [{"name": "c", "image": "x"}],
                     "volumes": [{"name": "d", "persistentVolumeClaim": {"claimName": claim}}]},
        }))))
    }

    fn nodes(storage: bool) -> Vec<NodeInfo> {
        ["n1", "n2"]
            .into_iter()
            .map(|n| {
                let mut node = node(n, "2", "4Gi", "110");
                if storage {
                    node.metadata.annotations =
                        Some([(pv::STORAGE_PATH.to_string(), "/s".to_string())].into());
                }
                NodeInfo::new(Arc::new(node))
            })
            .collect()
    }

    /// The filter's answer for the snapshot's `n`th node.
    fn on_node(pod: &PodInfo, snapshot: &Snapshot, n: usize) -> Result<(), Reasons> {
        let mut state = CycleState::default();
        VolumeBinding.pre_filter(pod, snapshot, &mut state).unwrap();
        VolumeBinding.filter(pod, &snapshot.nodes[n], &state)
    }

    fn feasible(pod: &PodInfo, snapshot: &Snapshot) -> Result<Vec<String>, String> {
        let mut state = CycleState::default();
        VolumeBinding.pre_filter(pod, snapshot, &mut state)?;
        Ok(snapshot
            .nodes
            .iter()
            .filter(|n| VolumeBinding.filter(pod, n, &state).is_ok())
            .map(|n| n.name.clone())
            .collect())
    }

    #[test]
    fn a_bound_local_volume_keeps_its_pod_on_its_node() {
        let snapshot = Snapshot {
            nodes: nodes(true),
            volumes: volumes(
                vec![claim("data", "", Some("pv1"))],
                vec![local_volume("pv1", "n2")],
            ),
            ..Default::default()
        };
        assert_eq!(
            feasible(&pod_with("data"), &snapshot),
            Ok(vec!["n2".to_string()])
        );
    }

    #[test]
    fn an_unbound_local_path_claim_goes_where_storage_is_offered() {
        let mut snapshot = Snapshot {
            nodes: nodes(true),
            volumes: volumes(vec![claim("data", pv::CLASS, None)], vec![]),
            ..Default::default()
        };
        assert_eq!(feasible(&pod_with("data"), &snapshot).unwrap().len(), 2);
        snapshot.nodes = nodes(false);
        assert_eq!(
            on_node(&pod_with("data"), &snapshot, 0),
            Err(vec![NO_VOLUME.to_string()])
        );
    }

    #[test]
    fn provisioned_claims_must_fit_in_the_free_storage_a_node_published() {
        // n1 has 1.5 GiB free, n2 2.5 GiB; the pod's two 1 GiB claims fit only on n2.
        let mut n = nodes(true);
        for (node, free) in n.iter_mut().zip([3 << 29, 5 << 29]) {
            let mut object = (*node.node).clone();
            object
                .metadata
                .annotations
                .get_or_insert_with(Default::default)
                .insert(pv::STORAGE_FREE.to_string(), i64::to_string(&free));
            *node = NodeInfo::new(Arc::new(object));
        }
        let snapshot = Snapshot {
            nodes: n,
            volumes: volumes(
                vec![claim("a", pv::CLASS, None), claim("b", pv::CLASS, None)],
                vec![],
            ),
            ..Default::default()
        };
        let pod = PodInfo::new(Arc::new(from_json(json!({
            "metadata": {"name": "p", "namespace": "default"},
            "spec": {"containers": [{"name": "c", "image": "x"}],
                     "volumes": [{"name": "a", "persistentVolumeClaim": {"claimName": "a"}},
                                 {"name": "b", "persistentVolumeClaim": {"claimName": "b"}}]},
        }))));
        assert_eq!(feasible(&pod, &snapshot), Ok(vec!["n2".to_string()]));
        assert_eq!(on_node(&pod, &snapshot, 0), Err(vec![NO_SPACE.to_string()]));
        // One claim fits anywhere.
        assert_eq!(feasible(&pod_with("a"), &snapshot).unwrap().len(), 2);
    }

    #[test]
    fn a_free_static_volume_is_chosen_before_provisioning() {
        let mut c = claim("data", pv::CLASS, None);
        c["spec"]["storageClassName"] = json!(pv::CLASS);
        let mut v = local_volume("pv1", "n1");
        v["spec"]["storageClassName"] = json!(pv::CLASS);
        let vols = volumes(vec![c], vec![v]);
        let claim = vols.claims.values().next().unwrap().clone();
        let n = nodes(true);
        let on_n1 = bindings(std::slice::from_ref(&claim), &vols, &n[0]).unwrap();
        assert!(
            matches!(&on_n1[0], Binding::Volume { volume, .. } if volume.metadata.name.as_deref() == Some("pv1"))
        );
        let on_n2 = bindings(std::slice::from_ref(&claim), &vols, &n[1]).unwrap();
        assert!(matches!(&on_n2[0], Binding::Provision { .. }));
    }

    #[test]
    fn missing_claims_and_immediate_unbound_claims_stop_at_the_prefilter() {
        let snapshot = Snapshot {
            nodes: nodes(true),
            volumes: volumes(vec![claim("manual", "", None)], vec![]),
            ..Default::default()
        };
        assert_eq!(
            feasible(&pod_with("nope"), &snapshot),
            Err("persistentvolumeclaim \"nope\" not found".into())
        );
        assert_eq!(
            feasible(&pod_with("manual"), &snapshot),
            Err("pod has unbound immediate PersistentVolumeClaims".into())
        );
    }
}
