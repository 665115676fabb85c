//! Persistent volumes: what upstream's PV controller (`pkg/controller/volume/persistentvolume`),
//! its protection controllers and K3s's local-path provisioner do between them, as one loop.
//!
//! - **Binding**: a claim with no volume gets the smallest Available volume that fits (storage
//!   class, volume mode, access modes, capacity, the claim's selector), both sides written as
//!   upstream writes them (`spec.claimRef`, `spec.volumeName`, `pv.kubernetes.io/bind-completed`,
//!   `pv.kubernetes.io/bound-by-controller`), and the phases kept: claims Pending, Bound or Lost;
//!   volumes Available, Bound, Released or Failed.
//! - **WaitForFirstConsumer**: such a claim is left alone until the scheduler has chosen a node
//!   for its first pod (`volume.kubernetes.io/selected-node`, or a volume it bound there).
//! - **Provisioning** for the `local-path` StorageClass (provisioner `rancher.io/local-path`,
//!   K3s's name, so its manifests and docs apply): a volume per claim, a directory under the
//!   chosen node's storage path (the agent publishes it on its Node as [`STORAGE_PATH`]), with
//!   node affinity to that node. The node's agent creates the directory when a pod mounts it.
//! - **Protection**: `kubernetes.io/pvc-protection` leaves a deleted claim until no pod that is
//!   not finished uses it; `kubernetes.io/pv-protection` leaves a deleted volume until it is not
//!   bound (the API server adds both finalizers at creation).
//!
//! The state is the objects: every change recomputes the actions from the claims, volumes,
//! classes, pods and nodes ([`plan`], pure), and the loop writes them.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;

use k8s_openapi::api::core::v1::{
    Node, ObjectReference, PersistentVolume, PersistentVolumeClaim, Pod,
};
use k8s_openapi::api::storage::v1::StorageClass;
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use kube::api::{Api, Patch, PatchParams, PostParams};
use kube::core::{Selector, SelectorExt};
use serde_json::json;
use tokio_util::sync::CancellationToken;

use crate::events::Recorder;
use crate::informer::Informers;
use sitekit::quantity;

/// The site's StorageClass, installed with it and marked default.
pub const CLASS: &str = "local-path";
/// Its provisioner: K3s's local-path provisioner's name.
pub const PROVISIONER: &str = "rancher.io/local-path";
/// Set by the scheduler on a WaitForFirstConsumer claim: the node its first pod goes to.
pub const SELECTED_NODE: &str = "volume.kubernetes.io/selected-node";
/// Set on a claim whose class has a provisioner: which one is to provision it.
pub const STORAGE_PROVISIONER: &str = "volume.kubernetes.io/storage-provisioner";
/// The same, under the beta name older provisioners read.
pub const BETA_STORAGE_PROVISIONER: &str = "volume.beta.kubernetes.io/storage-provisioner";
/// On a claim: its binding is complete.
pub const BIND_COMPLETED: &str = "pv.kubernetes.io/bind-completed";
/// On a claim or volume: the controller (not a user) bound it.
pub const BOUND_BY_CONTROLLER: &str = "pv.kubernetes.io/bound-by-controller";
/// On a provisioned volume: the provisioner that made it (and will delete it).
pub const PROVISIONED_BY: &str = "pv.kubernetes.io/provisioned-by";
/// The finalizers the API server puts on new claims and volumes.
pub const PVC_PROTECTION: &str = "kubernetes.io/pvc-protection";
pub const PV_PROTECTION: &str = "kubernetes.io/pv-protection";
/// A Node's annotation: the directory its agent keeps local-path volumes in
/// (`--default-local-storage-path`, `<data-dir>/storage` by default).
pub const STORAGE_PATH: &str = "edgesite.io/local-storage-path";
/// The bytes free for unprivileged use on the filesystem of a node's storage path, as its
/// agent last saw them (republished when they move by more than 1 % of the filesystem): the
/// scheduler keeps claims that do not fit off the node, as upstream's storage capacity
/// tracking does.
pub const STORAGE_FREE: &str = "edgesite.io/local-storage-free";
/// The class's annotation that makes it the default.
pub const DEFAULT_CLASS: &str = "storageclass.kubernetes.io/is-default-class";
/// The claim's class under its old annotation, still honoured by upstream.
const BETA_CLASS: &str = "volume.beta.kubernetes.io/storage-class";

type Key = (String, String);

fn annotation<'a>(meta: &'a kube::api::ObjectMeta, key: &str) -> Option<&'a str> {
    meta.annotations
        .as_ref()
        .and_then(|a| a.get(key))
        .map(String::as_str)
}

fn claim_key(claim: &PersistentVolumeClaim) -> Key {
    (
        claim.metadata.namespace.clone().unwrap_or_default(),
        claim.metadata.name.clone().unwrap_or_default(),
    )
}

/// The claim's storage class: `spec.storageClassName`, else the beta annotation, else "".
pub fn claim_class(claim: &PersistentVolumeClaim) -> &str {
    annotation(&claim.metadata, BETA_CLASS)
        .or_else(|| {
            claim
                .spec
                .as_ref()
                .and_then(|s| s.storage_class_name.as_deref())
        })
        .unwrap_or("")
}

/// The volume's storage class ("" for none), the beta annotation first as upstream reads it.
pub fn volume_class(volume: &PersistentVolume) -> &str {
    annotation(&volume.metadata, BETA_CLASS)
        .or_else(|| {
            volume
                .spec
                .as_ref()
                .and_then(|s| s.storage_class_name.as_deref())
        })
        .unwrap_or("")
}

/// Bytes the claim asks for (`spec.resources.requests.storage`).
pub fn requested(claim: &PersistentVolumeClaim) -> i64 {
    claim
        .spec
        .as_ref()
        .and_then(|s| s.resources.as_ref())
        .and_then(|r| r.requests.as_ref())
        .and_then(|r| r.get("storage"))
        .and_then(quantity::units)
        .unwrap_or(0)
}

/// Bytes the volume offers (`spec.capacity.storage`).
pub fn capacity(volume: &PersistentVolume) -> i64 {
    volume
        .spec
        .as_ref()
        .and_then(|s| s.capacity.as_ref())
        .and_then(|c| c.get("storage"))
        .and_then(quantity::units)
        .unwrap_or(0)
}

fn claim_modes(claim: &PersistentVolumeClaim) -> &[String] {
    claim
        .spec
        .as_ref()
        .and_then(|s| s.access_modes.as_deref())
        .unwrap_or(&[])
}

fn volume_modes(volume: &PersistentVolume) -> &[String] {
    volume
        .spec
        .as_ref()
        .and_then(|s| s.access_modes.as_deref())
        .unwrap_or(&[])
}

fn claim_volume_mode(claim: &PersistentVolumeClaim) -> &str {
    claim
        .spec
        .as_ref()
        .and_then(|s| s.volume_mode.as_deref())
        .unwrap_or("Filesystem")
}

fn volume_volume_mode(volume: &PersistentVolume) -> &str {
    volume
        .spec
        .as_ref()
        .and_then(|s| s.volume_mode.as_deref())
        .unwrap_or("Filesystem")
}

/// The claim a volume is bound (or pre-bound) to.
pub fn claim_ref(volume: &PersistentVolume) -> Option<&ObjectReference> {
    volume.spec.as_ref().and_then(|s| s.claim_ref.as_ref())
}

/// The volume a claim is bound (or pre-bound) to.
pub fn volume_name(claim: &PersistentVolumeClaim) -> Option<&str> {
    claim
        .spec
        .as_ref()
        .and_then(|s| s.volume_name.as_deref())
        .filter(|n| !n.is_empty())
}

fn refers_to(reference: &ObjectReference, claim: &PersistentVolumeClaim) -> bool {
    reference.namespace.as_deref() == claim.metadata.namespace.as_deref()
        && reference.name.as_deref() == claim.metadata.name.as_deref()
        && reference
            .uid
            .as_deref()
            .is_none_or(|uid| Some(uid) == claim.metadata.uid.as_deref())
}

/// Whether the class binds only once a pod using the claim is scheduled.
pub fn waits_for_first_consumer(class: Option<&StorageClass>) -> bool {
    class.and_then(|c| c.volume_binding_mode.as_deref()) == Some("WaitForFirstConsumer")
}

/// Whether the volume may be used on a node with these labels: its required node affinity, if
/// any, matches.
pub fn volume_fits_node(
    volume: &PersistentVolume,
    labels: &BTreeMap<String, String>,
    node: &str,
) -> bool {
    let Some(required) = volume
        .spec
        .as_ref()
        .and_then(|s| s.node_affinity.as_ref())
        .and_then(|a| a.required.as_ref())
    else {
        return true;
    };
    required
        .node_selector_terms
        .iter()
        .any(|t| crate::node_match::term_matches(t, labels, node))
}

/// Why a volume cannot serve a claim; `None` when it can (upstream's `checkVolumeSatisfyClaim`
/// plus the selector and the claim it may be pre-bound to).
pub fn mismatch(claim: &PersistentVolumeClaim, volume: &PersistentVolume) -> Option<&'static str> {
    if volume.metadata.deletion_timestamp.is_some() {
        return Some("being deleted");
    }
    if let Some(reference) = claim_ref(volume)
        && !refers_to(reference, claim)
    {
        return Some("bound to another claim");
    }
    if claim_class(claim) != volume_class(volume) {
        return Some("storage class differs");
    }
    if claim_volume_mode(claim) != volume_volume_mode(volume) {
        return Some("volume mode differs");
    }
    let offered = volume_modes(volume);
    if !claim_modes(claim).iter().all(|m| offered.contains(m)) {
        return Some("access modes differ");
    }
    if capacity(volume) < requested(claim) {
        return Some("too small");
    }
    let selector = claim.spec.as_ref().and_then(|s| s.selector.clone());
    if let Some(selector) = selector {
        let labels = volume.metadata.labels.clone().unwrap_or_default();
        let selects = Selector::try_from(selector).is_ok_and(|s| s.matches(&labels));
        if !selects {
            return Some("selector does not match");
        }
    }
    None
}

/// The volume a claim should bind to among `volumes`: one pre-bound to it (its `claimRef`
/// names the claim) first, else the smallest that fits and is free; `node` keeps to volumes
/// usable there (WaitForFirstConsumer).
pub fn find_volume<'v>(
    claim: &PersistentVolumeClaim,
    volumes: impl IntoIterator<Item = &'v PersistentVolume>,
    node: Option<(&BTreeMap<String, String>, &str)>,
) -> Option<&'v PersistentVolume> {
    let mut best: Option<&PersistentVolume> = None;
    for volume in volumes {
        if mismatch(claim, volume).is_some() {
            continue;
        }
        if let Some((labels, name)) = node
            && !volume_fits_node(volume, labels, name)
        {
            continue;
        }
        if claim_ref(volume).is_some() {
            return Some(volume); // pre-bound to this claim
        }
        if best.is_none_or(|b| capacity(volume) < capacity(b)) {
            best = Some(volume);
        }
    }
    best
}

/// The claims a pod uses: its `persistentVolumeClaim` volumes and the claims of its generic
/// ephemeral volumes (`<pod>-<volume>`).
pub fn pod_claims(pod: &Pod) -> Vec<String> {
    let pod_name = pod.metadata.name.as_deref().unwrap_or("");
    pod.spec
        .as_ref()
        .and_then(|s| s.volumes.as_ref())
        .into_iter()
        .flatten()
        .filter_map(|v| {
            if let Some(claim) = &v.persistent_volume_claim {
                Some(claim.claim_name.clone())
            } else {
                v.ephemeral
                    .as_ref()
                    .map(|_| sitekit::claims::ephemeral_claim(pod_name, &v.name))
            }
        })
        .collect()
}

fn is_finished(pod: &Pod) -> bool {
    matches!(
        pod.status.as_ref().and_then(|s| s.phase.as_deref()),
        Some("Succeeded" | "Failed")
    )
}

/// A change the loop writes.
#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    /// `spec.claimRef` of the volume set to the claim.
    BindVolume {
        volume: String,
        claim: Key,
        uid: String,
    },
    /// `spec.volumeName` of the claim set, with the binding annotations.
    BindClaim { claim: Key, volume: String },
    /// The claim's status: phase, and when Bound the volume's capacity and access modes.
    ClaimStatus {
        claim: Key,
        phase: &'static str,
        capacity: Option<Quantity>,
        modes: Vec<String>,
    },
    /// The volume's phase (and message).
    VolumePhase {
        volume: String,
        phase: &'static str,
        message: Option<String>,
    },
    /// `volume.kubernetes.io/storage-provisioner` (and the beta name) on the claim.
    MarkProvisioner { claim: Key, provisioner: String },
    /// A new volume for a claim (its `claimRef` set).
    Provision(Box<PersistentVolume>),
    /// A bound local-path volume grown to what its claim now asks for (a directory has no
    /// size of its own: the figure is what is reported).
    ExpandVolume { volume: String, capacity: Quantity },
    /// A finalizer removed from a claim being deleted.
    ReleaseClaim { claim: Key },
    /// A finalizer removed from a volume being deleted.
    ReleaseVolume { volume: String },
}

/// Something to say about a claim or a volume, once per distinct message.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Said {
    /// `namespace/name` of a claim, or the name of a volume.
    pub about: Subject,
    pub warning: bool,
    pub reason: &'static str,
    pub message: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Subject {
    Claim(Key),
    Volume(String),
}

#[derive(Debug, Default)]
pub struct Plan {
    pub actions: Vec<Action>,
    pub events: Vec<Said>,
}

impl Plan {
    /// A Normal Event about `about`.
    fn tell(&mut self, about: Subject, reason: &'static str, message: impl Into<String>) {
        self.events.push(Said {
            about,
            warning: false,
            reason,
            message: message.into(),
        });
    }

    /// A Warning Event about `about`.
    fn warn(&mut self, about: Subject, reason: &'static str, message: impl Into<String>) {
        self.events.push(Said {
            about,
            warning: true,
            reason,
            message: message.into(),
        });
    }
}

/// Everything the loop looks at.
pub struct World<'w> {
    pub claims: &'w [Arc<PersistentVolumeClaim>],
    pub volumes: &'w [Arc<PersistentVolume>],
    pub classes: &'w [Arc<StorageClass>],
    pub pods: &'w [Arc<Pod>],
    pub nodes: &'w [Arc<Node>],
}

/// A node's published free local storage in bytes (`None`: not published).
pub fn storage_free(node: &Node) -> Option<i64> {
    annotation(&node.metadata, STORAGE_FREE)?.parse().ok()
}

/// A claim's storage request in bytes (0 without one).
pub fn requested_bytes(claim: &PersistentVolumeClaim) -> i64 {
    quantity_of(claim)
        .as_ref()
        .and_then(quantity::units)
        .unwrap_or(0)
}

fn quantity_of(claim: &PersistentVolumeClaim) -> Option<Quantity> {
    claim
        .spec
        .as_ref()
        .and_then(|s| s.resources.as_ref())
        .and_then(|r| r.requests.as_ref())
        .and_then(|r| r.get("storage"))
        .cloned()
}

fn has_finalizer(meta: &kube::api::ObjectMeta, finalizer: &str) -> bool {
    meta.finalizers
        .as_ref()
        .is_some_and(|f| f.iter().any(|x| x == finalizer))
}

fn phase_of_claim(claim: &PersistentVolumeClaim) -> Option<&str> {
    claim.status.as_ref().and_then(|s| s.phase.as_deref())
}

fn phase_of_volume(volume: &PersistentVolume) -> Option<&str> {
    volume.status.as_ref().and_then(|s| s.phase.as_deref())
}

/// The directory of a provisioned volume: `<storage path>/pvc-<uid>_<namespace>_<name>`, as
/// K3s's provisioner names them.
pub fn volume_path(storage: &str, claim: &PersistentVolumeClaim) -> String {
    format!(
        "{}/{}_{}_{}",
        storage.trim_end_matches('/'),
        provisioned_name(claim),
        claim.metadata.namespace.as_deref().unwrap_or(""),
        claim.metadata.name.as_deref().unwrap_or("")
    )
}

/// A provisioned volume's name: `pvc-<claim uid>`, as upstream's provisioners name them.
pub fn provisioned_name(claim: &PersistentVolumeClaim) -> String {
    format!("pvc-{}", claim.metadata.uid.as_deref().unwrap_or(""))
}

/// The volume the local-path provisioner makes for `claim` on `node`, or why it cannot.
pub fn provision(
    claim: &PersistentVolumeClaim,
    class: &StorageClass,
    node: &Node,
) -> Result<PersistentVolume, String> {
    let node_name = node.metadata.name.as_deref().unwrap_or("");
    let modes = claim_modes(claim);
    if let Some(mode) = modes.iter().find(|m| {
        !matches!(
            m.as_str(),
            "ReadWriteOnce" | "ReadWriteOncePod" | "ReadOnlyMany"
        )
    }) {
        return Err(format!(
            "the local-path provisioner cannot give access mode {mode}: a local directory is on one node (use ReadWriteOnce or ReadWriteOncePod)"
        ));
    }
    if claim_volume_mode(claim) == "Block" {
        return Err(
            "the local-path provisioner makes filesystem volumes only (volumeMode: Block asked)"
                .into(),
        );
    }
    let Some(storage) = annotation(&node.metadata, STORAGE_PATH) else {
        return Err(format!(
            "node {node_name} does not offer local storage: its agent has not published {STORAGE_PATH} (an agent older than this server, or not registered yet)"
        ));
    };
    let hostname = node
        .metadata
        .labels
        .as_ref()
        .and_then(|l| l.get("kubernetes.io/hostname"))
        .map(String::as_str)
        .unwrap_or(node_name);
    let (namespace, name) = claim_key(claim);
    let volume = json!({
        "apiVersion": "v1",
        "kind": "PersistentVolume",
        "metadata": {
            "name": provisioned_name(claim),
            "annotations": {
                PROVISIONED_BY: PROVISIONER,
                "local.path.provisioner/selected-node": node_name,
            },
        },
        "spec": {
            "capacity": {"storage": quantity_of(claim).map(|q| q.0).unwrap_or_else(|| "0".into())},
            "accessModes": modes,
            "persistentVolumeReclaimPolicy": class.reclaim_policy.as_deref().unwrap_or("Delete"),
            "storageClassName": class.metadata.name,
            "volumeMode": "Filesystem",
            "claimRef": {
                "apiVersion": "v1",
                "kind": "PersistentVolumeClaim",
                "namespace": namespace,
                "name": name,
                "uid": claim.metadata.uid,
            },
            "nodeAffinity": {"required": {"nodeSelectorTerms": [{"matchExpressions": [
                {"key": "kubernetes.io/hostname", "operator": "In", "values": [hostname]}
            ]}]}},
            "hostPath": {"path": volume_path(storage, claim), "type": "DirectoryOrCreate"},
        },
    });
    serde_json::from_value(volume).map_err(|e| format!("cannot build the volume: {e}"))
}

/// The actions and events that bring the objects to what they should be.
pub fn plan(world: &World) -> Plan {
    let mut plan = Plan::default();
    let classes: HashMap<&str, &StorageClass> = world
        .classes
        .iter()
        .filter_map(|c| Some((c.metadata.name.as_deref()?, c.as_ref())))
        .collect();
    let volumes: HashMap<&str, &PersistentVolume> = world
        .volumes
        .iter()
        .filter_map(|v| Some((v.metadata.name.as_deref()?, v.as_ref())))
        .collect();
    let nodes: HashMap<&str, &Node> = world
        .nodes
        .iter()
        .filter_map(|n| Some((n.metadata.name.as_deref()?, n.as_ref())))
        .collect();
    let claims: HashMap<Key, &PersistentVolumeClaim> = world
        .claims
        .iter()
        .map(|c| (claim_key(c), c.as_ref()))
        .collect();
    // Claims used by a pod that has not finished.
    let in_use: HashSet<Key> = world
        .pods
        .iter()
        .filter(|p| !is_finished(p))
        .flat_map(|p| {
            let namespace = p.metadata.namespace.clone().unwrap_or_default();
            pod_claims(p)
                .into_iter()
                .map(move |c| (namespace.clone(), c))
        })
        .collect();
    // Volumes this pass binds, so two claims do not take one.
    let mut taken: HashSet<&str> = HashSet::new();

    for claim in world.claims.iter().map(Arc::as_ref) {
        let key = claim_key(claim);
        let about = Subject::Claim(key.clone());
        if claim.metadata.deletion_timestamp.is_some() {
            if has_finalizer(&claim.metadata, PVC_PROTECTION) && !in_use.contains(&key) {
                plan.actions.push(Action::ReleaseClaim { claim: key });
            }
            continue;
        }
        if let Some(name) = volume_name(claim) {
            // Bound, or pre-bound by a user or the scheduler.
            match volumes.get(name) {
                None => {
                    if phase_of_claim(claim) == Some("Bound")
                        || phase_of_claim(claim) == Some("Lost")
                    {
                        set_claim_phase(&mut plan, claim, "Lost", None);
                        plan.warn(about, "ClaimLost", "Bound claim has lost its PersistentVolume. Data on the volume is lost!");
                    } else {
                        set_claim_phase(&mut plan, claim, "Pending", None);
                        plan.tell(
                            about,
                            "FailedBinding",
                            format!("volume \"{name}\" not found"),
                        );
                    }
                }
                Some(volume) => match claim_ref(volume) {
                    Some(r) if refers_to(r, claim) => {
                        if r.uid.is_none() {
                            plan.actions.push(Action::BindVolume {
                                volume: name.into(),
                                claim: key.clone(),
                                uid: claim.metadata.uid.clone().unwrap_or_default(),
                            });
                        }
                        if annotation(&claim.metadata, BIND_COMPLETED) != Some("yes") {
                            plan.actions.push(Action::BindClaim {
                                claim: key.clone(),
                                volume: name.into(),
                            });
                        }
                        let grown = requested(claim) > capacity(volume);
                        let expandable = classes
                            .get(claim_class(claim))
                            .is_some_and(|c| c.allow_volume_expansion == Some(true));
                        let ours =
                            annotation(&volume.metadata, PROVISIONED_BY) == Some(PROVISIONER);
                        if grown && expandable && ours {
                            plan.actions.push(Action::ExpandVolume {
                                volume: name.into(),
                                capacity: quantity_of(claim).unwrap_or(Quantity("0".into())),
                            });
                            plan.tell(about.clone(), "VolumeResizeSuccessful", format!(
                                    "resize volume \"{name}\" succeeded: {} (a local-path volume is a directory; the size is what is reported)",
                                    quantity_of(claim).map(|q| q.0).unwrap_or_default()
                                ));
                        } else if grown {
                            plan.warn(about.clone(), "ExternalExpanding", format!(
                                    "waiting for an external controller to expand this PVC: volume \"{name}\" is not one this site's provisioner made in a class that allows expansion"
                                ));
                        }
                        set_claim_phase(&mut plan, claim, "Bound", Some(volume));
                        taken.insert(name);
                    }
                    Some(_) => {
                        set_claim_phase(&mut plan, claim, "Pending", None);
                        plan.warn(
                            about,
                            "FailedBinding",
                            format!("volume \"{name}\" already bound to a different claim."),
                        );
                    }
                    None => match mismatch(claim, volume) {
                        None => {
                            plan.actions.push(Action::BindVolume {
                                volume: name.into(),
                                claim: key.clone(),
                                uid: claim.metadata.uid.clone().unwrap_or_default(),
                            });
                            taken.insert(name);
                        }
                        Some(why) => {
                            set_claim_phase(&mut plan, claim, "Pending", None);
                            plan.warn(
                                about,
                                "FailedBinding",
                                format!("Cannot bind to requested volume \"{name}\": {why}"),
                            );
                        }
                    },
                },
            }
            continue;
        }
        if phase_of_claim(claim) != Some("Pending") {
            set_claim_phase(&mut plan, claim, "Pending", None);
        }
        // A volume pre-bound to this claim (by the scheduler, a provisioner or a user).
        if let Some(volume) = world
            .volumes
            .iter()
            .map(Arc::as_ref)
            .find(|v| claim_ref(v).is_some_and(|r| refers_to(r, claim) && r.uid.is_some()))
        {
            let name = volume.metadata.name.clone().unwrap_or_default();
            plan.actions.push(Action::BindClaim {
                claim: key,
                volume: name,
            });
            continue;
        }
        let class_name = claim_class(claim);
        let class = classes.get(class_name).copied();
        let selected = annotation(&claim.metadata, SELECTED_NODE);
        if waits_for_first_consumer(class) && selected.is_none() {
            plan.tell(
                about,
                "WaitForFirstConsumer",
                "waiting for first consumer to be created before binding",
            );
            continue;
        }
        let node = selected.and_then(|n| nodes.get(n).copied());
        let node_facts = node.map(|n| {
            (
                n.metadata.labels.clone().unwrap_or_default(),
                n.metadata.name.clone().unwrap_or_default(),
            )
        });
        let free = world
            .volumes
            .iter()
            .map(Arc::as_ref)
            .filter(|v| !taken.contains(v.metadata.name.as_deref().unwrap_or("")));
        if let Some(volume) = find_volume(
            claim,
            free,
            node_facts.as_ref().map(|(l, n)| (l, n.as_str())),
        ) {
            let name = volume.metadata.name.as_deref().unwrap_or("");
            taken.insert(name);
            plan.actions.push(Action::BindVolume {
                volume: name.into(),
                claim: key,
                uid: claim.metadata.uid.clone().unwrap_or_default(),
            });
            continue;
        }
        if class_name.is_empty() {
            plan.tell(
                about,
                "FailedBinding",
                "no persistent volumes available for this claim and no storage class is set",
            );
            continue;
        }
        let Some(class) = class else {
            plan.warn(
                about,
                "ProvisioningFailed",
                format!("storageclass.storage.k8s.io \"{class_name}\" not found"),
            );
            continue;
        };
        if class.provisioner != PROVISIONER {
            if annotation(&claim.metadata, STORAGE_PROVISIONER) != Some(class.provisioner.as_str())
            {
                plan.actions.push(Action::MarkProvisioner {
                    claim: key.clone(),
                    provisioner: class.provisioner.clone(),
                });
            }
            plan.tell(about, "ExternalProvisioning", format!(
                    "Waiting for a volume to be created either by the external provisioner '{}' or manually by the system administrator. If volume creation is delayed, please verify that the provisioner is running and correctly registered.",
                    class.provisioner
                ));
            continue;
        }
        if annotation(&claim.metadata, STORAGE_PROVISIONER) != Some(PROVISIONER) {
            plan.actions.push(Action::MarkProvisioner {
                claim: key.clone(),
                provisioner: PROVISIONER.into(),
            });
        }
        let Some(selected) = selected else {
            plan.warn(about, "ProvisioningFailed", format!(
                    "the local-path provisioner needs to know the node: storage class {class_name} must have volumeBindingMode: WaitForFirstConsumer"
                ));
            continue;
        };
        let Some(node) = node else {
            plan.warn(
                about,
                "ProvisioningFailed",
                format!("the selected node {selected} does not exist"),
            );
            continue;
        };
        match provision(claim, class, node) {
            Ok(volume) => {
                plan.tell(
                    about,
                    "ProvisioningSucceeded",
                    format!(
                        "Successfully provisioned volume {} on node {selected}",
                        volume.metadata.name.as_deref().unwrap_or("")
                    ),
                );
                plan.actions.push(Action::Provision(Box::new(volume)));
            }
            Err(message) => plan.warn(about, "ProvisioningFailed", message),
        }
    }

    for volume in world.volumes.iter().map(Arc::as_ref) {
        let name = volume.metadata.name.clone().unwrap_or_default();
        let bound_claim = claim_ref(volume).and_then(|r| {
            let key = (
                r.namespace.clone().unwrap_or_default(),
                r.name.clone().unwrap_or_default(),
            );
            claims.get(&key).copied().filter(|c| refers_to(r, c))
        });
        let (phase, message): (&'static str, Option<String>) = match claim_ref(volume) {
            None => ("Available", None),
            // Pre-bound to a claim not made yet: still available to it.
            Some(r) if r.uid.is_none() => ("Available", None),
            Some(_) if bound_claim.is_some() || taken.contains(name.as_str()) => ("Bound", None),
            Some(_) => match volume
                .spec
                .as_ref()
                .and_then(|s| s.persistent_volume_reclaim_policy.as_deref())
            {
                Some("Delete") if annotation(&volume.metadata, PROVISIONED_BY) == Some(PROVISIONER) => {
                    // The node that holds the directory removes it, then the volume.
                    ("Released", None)
                }
                Some("Delete") => ("Failed", Some(format!(
                    "error getting deleter volume plugin for volume \"{name}\": no deletable volume plugin matched (only volumes of the {CLASS} class are deleted by this site)"
                ))),
                Some("Recycle") => ("Failed", Some("Recycle is deprecated upstream and not done here: delete the data and the volume, or make it Retain".into())),
                _ => ("Released", None),
            },
        };
        let message_now = volume.status.as_ref().and_then(|s| s.message.clone());
        if phase_of_volume(volume) != Some(phase) || message_now != message {
            if phase == "Failed" {
                plan.warn(
                    Subject::Volume(name.clone()),
                    "VolumeFailedDelete",
                    message.clone().unwrap_or_default(),
                );
            }
            plan.actions.push(Action::VolumePhase {
                volume: name.clone(),
                phase,
                message,
            });
        }
        if volume.metadata.deletion_timestamp.is_some()
            && has_finalizer(&volume.metadata, PV_PROTECTION)
            && phase != "Bound"
        {
            plan.actions.push(Action::ReleaseVolume { volume: name });
        }
    }
    plan
}

fn set_claim_phase(
    plan: &mut Plan,
    claim: &PersistentVolumeClaim,
    phase: &'static str,
    volume: Option<&PersistentVolume>,
) {
    let status = claim.status.as_ref();
    let capacity = volume.and_then(|v| {
        v.spec
            .as_ref()
            .and_then(|s| s.capacity.as_ref())
            .and_then(|c| c.get("storage"))
            .cloned()
    });
    let modes = volume.map(|v| volume_modes(v).to_vec()).unwrap_or_default();
    let current_capacity = status
        .and_then(|s| s.capacity.as_ref())
        .and_then(|c| c.get("storage"))
        .cloned();
    let current_modes = status
        .and_then(|s| s.access_modes.clone())
        .unwrap_or_default();
    if phase_of_claim(claim) == Some(phase)
        && (volume.is_none() || (current_capacity == capacity && current_modes == modes))
    {
        return;
    }
    plan.actions.push(Action::ClaimStatus {
        claim: claim_key(claim),
        phase,
        capacity,
        modes,
    });
}

/// The site's default StorageClass, as K3s's `local-path`.
pub fn default_class() -> StorageClass {
    serde_json::from_value(json!({
        "apiVersion": "storage.k8s.io/v1",
        "kind": "StorageClass",
        "metadata": {
            "name": CLASS,
            "annotations": {DEFAULT_CLASS: "true"},
        },
        "provisioner": PROVISIONER,
        "reclaimPolicy": "Delete",
        "volumeBindingMode": "WaitForFirstConsumer",
        "allowVolumeExpansion": true,
    }))
    .expect("a valid StorageClass")
}

/// Installs the default class if it is missing (a user's edits or deletion of a class they
/// replaced are kept: it is made only when no class of that name exists).
async fn install_class(client: &kube::Client) {
    let api: Api<StorageClass> = Api::all(client.clone());
    loop {
        match api.get_opt(CLASS).await {
            Ok(Some(_)) => return,
            Ok(None) => match api.create(&PostParams::default(), &default_class()).await {
                Ok(_) => {
                    tracing::info!(class = CLASS, "default StorageClass installed");
                    return;
                }
                Err(kube::Error::Api(s)) if s.code == 409 => return,
                Err(error) => tracing::warn!(%error, "cannot install the default StorageClass"),
            },
            Err(error) => tracing::warn!(%error, "cannot read the default StorageClass"),
        }
        tokio::time::sleep(std::time::Duration::from_secs(2)).await;
    }
}

/// The loop: installs the default class, then keeps [`plan`] applied.
pub fn controller(
    informers: &Informers,
    recorder: Recorder,
    shutdown: CancellationToken,
) -> impl Future<Output = ()> + Send + 'static {
    let claims = informers.persistent_volume_claims();
    let volumes = informers.persistent_volumes();
    let classes = informers.storage_classes();
    let pods = informers.pods();
    let nodes = informers.nodes();
    let mut changes = (
        claims.subscribe(256),
        volumes.subscribe(256),
        classes.subscribe(16),
        pods.subscribe(1024),
        nodes.subscribe(256),
    );
    let stores = (
        claims.store(),
        volumes.store(),
        classes.store(),
        pods.store(),
        nodes.store(),
    );
    let ready = futures::future::join5(
        claims.synced(),
        volumes.synced(),
        classes.synced(),
        pods.synced(),
        nodes.synced(),
    );
    let client = informers.client_for("persistent-volume-binder");
    async move {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = ready => {}
        }
        install_class(&client).await;
        // What was said, so each message is an Event once (until it changes).
        let mut said: HashMap<Subject, Said> = HashMap::new();
        loop {
            let (claims, volumes, classes, pods, nodes) = (
                stores.0.state(),
                stores.1.state(),
                stores.2.state(),
                stores.3.state(),
                stores.4.state(),
            );
            let plan = plan(&World {
                claims: &claims,
                volumes: &volumes,
                classes: &classes,
                pods: &pods,
                nodes: &nodes,
            });
            let mut failed = false;
            for action in &plan.actions {
                if let Err(error) = apply(&client, action).await {
                    tracing::warn!(?action, %error, "persistent volume change failed");
                    failed = true;
                }
            }
            for event in plan.events {
                if said.get(&event.about) == Some(&event) {
                    continue;
                }
                recorder.publish_ref(
                    reference(&event.about, &claims, &volumes),
                    if event.warning {
                        crate::events::Type::Warning
                    } else {
                        crate::events::Type::Normal
                    },
                    event.reason,
                    event.message.clone(),
                );
                said.insert(event.about.clone(), event);
            }
            said.retain(|about, _| match about {
                Subject::Claim(key) => claims.iter().any(|c| &claim_key(c) == key),
                Subject::Volume(name) => volumes
                    .iter()
                    .any(|v| v.metadata.name.as_deref() == Some(name)),
            });
            let retry = tokio::time::sleep(std::time::Duration::from_secs(if failed {
                5
            } else {
                3600
            }));
            tokio::select! {
                _ = shutdown.cancelled() => return,
                change = changes.0.recv() => if change.is_none() { return },
                change = changes.1.recv() => if change.is_none() { return },
                change = changes.2.recv() => if change.is_none() { return },
                change = changes.3.recv() => if change.is_none() { return },
                change = changes.4.recv() => if change.is_none() { return },
                _ = retry => {}
            }
            // Take the burst.
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            while changes.0.try_recv().is_ok() {}
            while changes.1.try_recv().is_ok() {}
            while changes.2.try_recv().is_ok() {}
            while changes.3.try_recv().is_ok() {}
            while changes.4.try_recv().is_ok() {}
        }
    }
}

fn reference(
    about: &Subject,
    claims: &[Arc<PersistentVolumeClaim>],
    volumes: &[Arc<PersistentVolume>],
) -> ObjectReference {
    use kube::Resource;
    match about {
        Subject::Claim(key) => claims
            .iter()
            .find(|c| &claim_key(c) == key)
            .map(|c| c.object_ref(&()))
            .unwrap_or_else(|| ObjectReference {
                api_version: Some("v1".into()),
                kind: Some("PersistentVolumeClaim".into()),
                namespace: Some(key.0.clone()),
                name: Some(key.1.clone()),
                ..Default::default()
            }),
        Subject::Volume(name) => volumes
            .iter()
            .find(|v| v.metadata.name.as_deref() == Some(name))
            .map(|v| v.object_ref(&()))
            .unwrap_or_else(|| ObjectReference {
                api_version: Some("v1".into()),
                kind: Some("PersistentVolume".into()),
                name: Some(name.clone()),
                ..Default::default()
            }),
    }
}

async fn remove_finalizer<K>(api: &Api<K>, name: &str, finalizer: &str) -> kube::Result<()>
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    let Some(object) = api.get_opt(name).await? else {
        return Ok(());
    };
    let meta = object.meta();
    let Some(position) = meta
        .finalizers
        .as_ref()
        .and_then(|f| f.iter().position(|x| x == finalizer))
    else {
        return Ok(());
    };
    // A JSON patch that tests the finalizer is still where it was, so a concurrent change to
    // the list is not overwritten.
    let patch: json_patch::Patch = serde_json::from_value(json!([
        {"op": "test", "path": format!("/metadata/finalizers/{position}"), "value": finalizer},
        {"op": "remove", "path": format!("/metadata/finalizers/{position}")},
    ]))
    .expect("a valid JSON patch");
    api.patch(name, &PatchParams::default(), &Patch::<()>::Json(patch))
        .await?;
    Ok(())
}

async fn apply(client: &kube::Client, action: &Action) -> kube::Result<()> {
    let volumes: Api<PersistentVolume> = Api::all(client.clone());
    let claims = |namespace: &str| -> Api<PersistentVolumeClaim> {
        Api::namespaced(client.clone(), namespace)
    };
    let merge = PatchParams::default();
    match action {
        Action::BindVolume { volume, claim, uid } => {
            let patch = json!({
                "metadata": {"annotations": {BOUND_BY_CONTROLLER: "yes"}},
                "spec": {"claimRef": {
                    "apiVersion": "v1", "kind": "PersistentVolumeClaim",
                    "namespace": claim.0, "name": claim.1, "uid": uid,
                }},
            });
            volumes.patch(volume, &merge, &Patch::Merge(&patch)).await?;
            tracing::info!(volume, claim = %format!("{}/{}", claim.0, claim.1), "volume bound");
        }
        Action::BindClaim { claim, volume } => {
            let patch = json!({
                "metadata": {"annotations": {BIND_COMPLETED: "yes", BOUND_BY_CONTROLLER: "yes"}},
                "spec": {"volumeName": volume},
            });
            claims(&claim.0)
                .patch(&claim.1, &merge, &Patch::Merge(&patch))
                .await?;
        }
        Action::ClaimStatus {
            claim,
            phase,
            capacity,
            modes,
        } => {
            let patch = match capacity {
                Some(capacity) => json!({"status": {
                    "phase": phase, "capacity": {"storage": capacity}, "accessModes": modes,
                }}),
                None => json!({"status": {"phase": phase}}),
            };
            claims(&claim.0)
                .patch_status(&claim.1, &merge, &Patch::Merge(&patch))
                .await?;
        }
        Action::VolumePhase {
            volume,
            phase,
            message,
        } => {
            let patch = json!({"status": {"phase": phase, "message": message}});
            volumes
                .patch_status(volume, &merge, &Patch::Merge(&patch))
                .await?;
        }
        Action::MarkProvisioner { claim, provisioner } => {
            let patch = json!({"metadata": {"annotations": {
                STORAGE_PROVISIONER: provisioner, BETA_STORAGE_PROVISIONER: provisioner,
            }}});
            claims(&claim.0)
                .patch(&claim.1, &merge, &Patch::Merge(&patch))
                .await?;
        }
        Action::Provision(volume) => match volumes.create(&PostParams::default(), volume).await {
            Ok(_) => {
                tracing::info!(volume = ?volume.metadata.name, "volume provisioned")
            }
            Err(kube::Error::Api(s)) if s.code == 409 => {}
            Err(error) => return Err(error),
        },
        Action::ExpandVolume { volume, capacity } => {
            let patch = json!({"spec": {"capacity": {"storage": capacity}}});
            volumes.patch(volume, &merge, &Patch::Merge(&patch)).await?;
            tracing::info!(volume, capacity = %capacity.0, "volume expanded");
        }
        Action::ReleaseClaim { claim } => {
            remove_finalizer(&claims(&claim.0), &claim.1, PVC_PROTECTION).await?
        }
        Action::ReleaseVolume { volume } => {
            remove_finalizer(&volumes, volume, PV_PROTECTION).await?
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn claim(name: &str, class: Option<&str>, size: &str, modes: &[&str]) -> PersistentVolumeClaim {
        serde_json::from_value(json!({
            "metadata": {"name": name, "namespace": "default", "uid": format!("uid-{name}")},
            "spec": {
                "storageClassName": class,
                "accessModes": modes,
                "resources": {"requests": {"storage": size}},
            },
            "status": {"phase": "Pending"},
        }))
        .unwrap()
    }

    fn volume(name: &str, class: &str, size: &str, policy: &str) -> PersistentVolume {
        serde_json::from_value(json!({
            "metadata": {"name": name},
            "spec": {
                "storageClassName": class,
                "accessModes": ["ReadWriteOnce"],
                "capacity": {"storage": size},
                "persistentVolumeReclaimPolicy": policy,
                "hostPath": {"path": format!("/data/{name}")},
            },
            "status": {"phase": "Available"},
        }))
        .unwrap()
    }

    fn node(name: &str, storage: Option<&str>) -> Node {
        let annotations = storage.map(|s| json!({STORAGE_PATH: s}));
        serde_json::from_value(json!({
            "metadata": {"name": name, "labels": {"kubernetes.io/hostname": name}, "annotations": annotations},
        }))
        .unwrap()
    }

    fn run(
        claims: Vec<PersistentVolumeClaim>,
        volumes: Vec<PersistentVolume>,
        pods: Vec<Pod>,
        nodes: Vec<Node>,
    ) -> Plan {
        let claims: Vec<_> = claims.into_iter().map(Arc::new).collect();
        let volumes: Vec<_> = volumes.into_iter().map(Arc::new).collect();
        let pods: Vec<_> = pods.into_iter().map(Arc::new).collect();
        let nodes: Vec<_> = nodes.into_iter().map(Arc::new).collect();
        let classes = vec![Arc::new(default_class())];
        plan(&World {
            claims: &claims,
            volumes: &volumes,
            classes: &classes,
            pods: &pods,
            nodes: &nodes,
        })
    }

    fn reasons(plan: &Plan) -> Vec<&'static str> {
        plan.events.iter().map(|e| e.reason).collect()
    }

    #[test]
    fn a_claim_binds_the_smallest_volume_that_fits_and_two_claims_never_share_one() {
        let plan = run(
            vec![
                claim("a", Some(""), "1Gi", &["ReadWriteOnce"]),
                claim("b", Some(""), "1Gi", &["ReadWriteOnce"]),
                claim("c", Some(""), "1Gi", &["ReadWriteOnce"]),
            ],
            vec![
                volume("big", "", "10Gi", "Retain"),
                volume("small", "", "2Gi", "Retain"),
                volume("tiny", "", "500Mi", "Retain"),
                volume("other-class", "fast", "1Gi", "Retain"),
            ],
            vec![],
            vec![],
        );
        let binds: Vec<(String, String)> = plan
            .actions
            .iter()
            .filter_map(|a| match a {
                Action::BindVolume { volume, claim, .. } => Some((claim.1.clone(), volume.clone())),
                _ => None,
            })
            .collect();
        assert_eq!(
            binds,
            vec![("a".into(), "small".into()), ("b".into(), "big".into())]
        );
        assert!(
            reasons(&plan).contains(&"FailedBinding"),
            "c finds nothing: {plan:?}"
        );
    }

    #[test]
    fn binding_completes_on_the_claim_then_both_report_bound() {
        let mut v = volume("pv1", "", "5Gi", "Retain");
        v.spec.as_mut().unwrap().claim_ref = Some(ObjectReference {
            namespace: Some("default".into()),
            name: Some("a".into()),
            uid: Some("uid-a".into()),
            ..Default::default()
        });
        let c = claim("a", Some(""), "1Gi", &["ReadWriteOnce"]);
        let plan = run(vec![c.clone()], vec![v.clone()], vec![], vec![]);
        assert!(plan.actions.contains(&Action::BindClaim {
            claim: ("default".into(), "a".into()),
            volume: "pv1".into()
        }));
        let mut bound = c;
        bound.spec.as_mut().unwrap().volume_name = Some("pv1".into());
        bound.metadata.annotations = Some([(BIND_COMPLETED.to_string(), "yes".to_string())].into());
        let plan = run(vec![bound], vec![v], vec![], vec![]);
        assert!(plan.actions.contains(&Action::ClaimStatus {
            claim: ("default".into(), "a".into()),
            phase: "Bound",
            capacity: Some(Quantity("5Gi".into())),
            modes: vec!["ReadWriteOnce".into()],
        }));
        assert!(plan.actions.contains(&Action::VolumePhase {
            volume: "pv1".into(),
            phase: "Bound",
            message: None
        }));
    }

    #[test]
    fn local_path_waits_for_the_scheduler_then_provisions_on_the_chosen_node() {
        let c = claim("data", None, "2Gi", &["ReadWriteOnce"]);
        let mut c = c;
        c.spec.as_mut().unwrap().storage_class_name = Some(CLASS.into());
        let plan = run(
            vec![c.clone()],
            vec![],
            vec![],
            vec![node("n1", Some("/var/lib/edgesite/storage"))],
        );
        assert!(plan.actions.is_empty(), "{plan:?}");
        assert_eq!(reasons(&plan), vec!["WaitForFirstConsumer"]);

        c.metadata.annotations = Some([(SELECTED_NODE.to_string(), "n1".to_string())].into());
        let plan = run(
            vec![c],
            vec![],
            vec![],
            vec![node("n1", Some("/var/lib/edgesite/storage/"))],
        );
        let volume = plan
            .actions
            .iter()
            .find_map(|a| match a {
                Action::Provision(v) => Some(v.clone()),
                _ => None,
            })
            .expect("provisioned");
        let spec = volume.spec.unwrap();
        assert_eq!(volume.metadata.name.as_deref(), Some("pvc-uid-data"));
        assert_eq!(
            spec.host_path.unwrap().path,
            "/var/lib/edgesite/storage/pvc-uid-data_default_data"
        );
        assert_eq!(
            spec.persistent_volume_reclaim_policy.as_deref(),
            Some("Delete")
        );
        assert_eq!(spec.claim_ref.unwrap().uid.as_deref(), Some("uid-data"));
        let term = &spec
            .node_affinity
            .unwrap()
            .required
            .unwrap()
            .node_selector_terms[0];
        assert_eq!(
            term.match_expressions.as_ref().unwrap()[0].values,
            Some(vec!["n1".to_string()])
        );
        assert!(
            plan.actions
                .iter()
                .any(|a| matches!(a, Action::MarkProvisioner { .. }))
        );
        assert_eq!(reasons(&plan), vec!["ProvisioningSucceeded"]);
    }

    #[test]
    fn what_local_path_cannot_give_is_said() {
        let selected = |mut c: PersistentVolumeClaim| {
            c.metadata.annotations = Some([(SELECTED_NODE.to_string(), "n1".to_string())].into());
            c
        };
        let rwx = selected(claim("rwx", Some(CLASS), "1Gi", &["ReadWriteMany"]));
        let unknown = claim("unknown", Some("gold"), "1Gi", &["ReadWriteOnce"]);
        let no_storage = selected(claim("plain", Some(CLASS), "1Gi", &["ReadWriteOnce"]));
        let plan = run(vec![rwx], vec![], vec![], vec![node("n1", Some("/s"))]);
        assert!(plan.events[0].message.contains("ReadWriteMany"), "{plan:?}");
        let plan = run(vec![unknown], vec![], vec![], vec![]);
        assert_eq!(
            plan.events[0].message,
            "storageclass.storage.k8s.io \"gold\" not found"
        );
        let plan = run(vec![no_storage], vec![], vec![], vec![node("n1", None)]);
        assert!(
            plan.events[0]
                .message
                .contains("does not offer local storage"),
            "{plan:?}"
        );
        assert!(
            !plan
                .actions
                .iter()
                .any(|a| matches!(a, Action::Provision(_)))
        );
    }

    #[test]
    fn a_grown_claim_grows_its_local_path_volume() {
        let mut v = volume("pvc-uid-a", CLASS, "1Gi", "Delete");
        v.metadata.annotations =
            Some([(PROVISIONED_BY.to_string(), PROVISIONER.to_string())].into());
        v.spec.as_mut().unwrap().claim_ref = Some(ObjectReference {
            namespace: Some("default".into()),
            name: Some("a".into()),
            uid: Some("uid-a".into()),
            ..Default::default()
        });
        let mut c = claim("a", Some(CLASS), "5Gi", &["ReadWriteOnce"]);
        c.spec.as_mut().unwrap().volume_name = Some("pvc-uid-a".into());
        c.metadata.annotations = Some([(BIND_COMPLETED.to_string(), "yes".to_string())].into());
        let plan = run(vec![c.clone()], vec![v.clone()], vec![], vec![]);
        assert!(plan.actions.contains(&Action::ExpandVolume {
            volume: "pvc-uid-a".into(),
            capacity: Quantity("5Gi".into())
        }));
        assert_eq!(reasons(&plan), vec!["VolumeResizeSuccessful"]);
        // A volume made by hand is not grown here.
        v.metadata.annotations = None;
        let plan = run(vec![c], vec![v], vec![], vec![]);
        assert!(
            !plan
                .actions
                .iter()
                .any(|a| matches!(a, Action::ExpandVolume { .. }))
        );
        assert_eq!(reasons(&plan), vec!["ExternalExpanding"]);
    }

    #[test]
    fn a_deleted_claim_waits_for_its_pods_and_a_volume_for_its_claim() {
        let mut c = claim("a", Some(""), "1Gi", &["ReadWriteOnce"]);
        c.metadata.deletion_timestamp = Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
            k8s_openapi::jiff::Timestamp::now(),
        ));
        c.metadata.finalizers = Some(vec![PVC_PROTECTION.into()]);
        let pod = |phase: &str| -> Pod {
            serde_json::from_value(json!({
                "metadata": {"name": "p", "namespace": "default"},
                "spec": {"containers": [], "volumes": [{"name": "d", "persistentVolumeClaim": {"claimName": "a"}}]},
                "status": {"phase": phase},
            }))
            .unwrap()
        };
        let plan = run(vec![c.clone()], vec![], vec![pod("Running")], vec![]);
        assert!(
            !plan
                .actions
                .iter()
                .any(|a| matches!(a, Action::ReleaseClaim { .. }))
        );
        let plan = run(vec![c], vec![], vec![pod("Succeeded")], vec![]);
        assert!(
            plan.actions
                .iter()
                .any(|a| matches!(a, Action::ReleaseClaim { .. }))
        );
    }

    #[test]
    fn volumes_whose_claim_went_away_are_released_or_failed_by_policy() {
        let gone = |mut v: PersistentVolume| {
            v.spec.as_mut().unwrap().claim_ref = Some(ObjectReference {
                namespace: Some("default".into()),
                name: Some("gone".into()),
                uid: Some("uid-gone".into()),
                ..Default::default()
            });
            v.status.as_mut().unwrap().phase = Some("Bound".into());
            v
        };
        let mut local = gone(volume("local", CLASS, "1Gi", "Delete"));
        local.metadata.annotations =
            Some([(PROVISIONED_BY.to_string(), PROVISIONER.to_string())].into());
        let plan = run(
            vec![],
            vec![
                gone(volume("kept", "", "1Gi", "Retain")),
                gone(volume("manual", "", "1Gi", "Delete")),
                local,
            ],
            vec![],
            vec![],
        );
        let phases: Vec<(String, &str)> = plan
            .actions
            .iter()
            .filter_map(|a| match a {
                Action::VolumePhase { volume, phase, .. } => Some((volume.clone(), *phase)),
                _ => None,
            })
            .collect();
        assert_eq!(
            phases,
            vec![
                ("kept".into(), "Released"),
                ("manual".into(), "Failed"),
                ("local".into(), "Released")
            ]
        );
        assert_eq!(reasons(&plan), vec!["VolumeFailedDelete"]);
    }
}
