//! The built-in resources, with upstream's names, short names, categories, verbs and subresources.

use std::borrow::Cow;
use std::sync::Arc;

use k8s_openapi::api::{
    apps, authentication, authorization, autoscaling, batch, certificates, coordination, core,
    discovery, events, networking, node, policy, rbac, scheduling, storage,
};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions;
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::Value;

use super::{DecodeError, ResourceInfo, StoredAs, SubresourceInfo, TypedKind};

/// The verbs of an ordinary resource.
pub const ALL_VERBS: &[&str] = &[
    "create",
    "delete",
    "deletecollection",
    "get",
    "list",
    "patch",
    "update",
    "watch",
];
const NO_COLLECTION_DELETE: &[&str] = &[
    "create", "delete", "get", "list", "patch", "update", "watch",
];

fn normalize<T: DeserializeOwned + Serialize>(value: &Value) -> Result<Value, DecodeError> {
    let typed: T = serde_path_to_error::deserialize(value.clone()).map_err(|e| {
        let path = e.path().to_string();
        DecodeError {
            path: if path == "." { String::new() } else { path },
            message: e.into_inner().to_string(),
        }
    })?;
    let mut value = serde_json::to_value(typed).map_err(|e| DecodeError {
        path: String::new(),
        message: e.to_string(),
    })?;
    drop_empty_metadata(&mut value);
    Ok(value)
}

/// The ObjectMeta fields Go writes with `omitempty`.
const OMITTED_WHEN_EMPTY: &[&str] = &[
    "labels",
    "annotations",
    "ownerReferences",
    "finalizers",
    "managedFields",
];

/// Whether `value`, at `metadata.<key>`, is one that the typed form leaves out because it is
/// empty: not an unknown field (rendered Helm charts often carry `labels: {}`).
pub fn omitted_when_empty(key: &str, value: &Value) -> bool {
    let empty = value.as_array().is_some_and(Vec::is_empty)
        || value.as_object().is_some_and(|o| o.is_empty());
    empty && OMITTED_WHEN_EMPTY.contains(&key)
}

/// Go's `omitempty` on ObjectMeta: an emptied list or map (the last owner reference removed by
/// a patch) disappears instead of being stored as `[]` or `{}`.
fn drop_empty_metadata(value: &mut Value) {
    if let Some(meta) = value.get_mut("metadata").and_then(Value::as_object_mut) {
        meta.retain(|key, v| !omitted_when_empty(key, v));
    }
}

fn schema_name<T: schemars::JsonSchema>() -> Cow<'static, str> {
    T::schema_name()
}

fn schema<T: schemars::JsonSchema>(generator: &mut schemars::SchemaGenerator) -> schemars::Schema {
    T::json_schema(generator)
}

fn typed<T: DeserializeOwned + Serialize + schemars::JsonSchema>() -> Option<TypedKind> {
    Some(TypedKind {
        normalize: normalize::<T>,
        schema_name: schema_name::<T>,
        schema: schema::<T>,
    })
}

/// Decodes a subresource body (Scale, Binding, Eviction) the way upstream would.
pub fn normalize_as<T: DeserializeOwned + Serialize>(value: &Value) -> Result<Value, String> {
    normalize::<T>(value).map_err(|e| e.to_string())
}

const STATUS: SubresourceInfo = SubresourceInfo {
    name: "status",
    group: "",
    version: "",
    kind: "",
    verbs: &["get", "patch", "update"],
};

fn status() -> SubresourceInfo {
    STATUS.clone()
}

fn scale() -> SubresourceInfo {
    SubresourceInfo {
        name: "scale",
        group: "autoscaling",
        version: "v1",
        kind: "Scale",
        verbs: &["get", "patch", "update"],
    }
}

#[allow(clippy::too_many_arguments)]
fn resource(
    group: &str,
    version: &str,
    plural: &str,
    kind: &str,
    namespaced: bool,
    short_names: &[&str],
    categories: &[&str],
    verbs: &[&'static str],
    subresources: Vec<SubresourceInfo>,
    typed: Option<TypedKind>,
) -> ResourceInfo {
    ResourceInfo {
        group: group.to_string(),
        version: version.to_string(),
        resource: plural.to_string(),
        singular: kind.to_lowercase(),
        kind: kind.to_string(),
        namespaced,
        short_names: short_names.iter().map(|s| s.to_string()).collect(),
        categories: categories.iter().map(|s| s.to_string()).collect(),
        verbs: verbs.to_vec(),
        subresources,
        typed,
        custom: None,
        strategy: crate::kinds::strategy(group, plural),
        printer: match stored_as(group, version, plural) {
            Some(stored) => Arc::new(crate::tables::ViewPrinter {
                inner: crate::tables::printer(&stored.group, &stored.resource),
                stored: (stored.group, stored.resource),
                view: if group.is_empty() {
                    version.to_string()
                } else {
                    format!("{group}/{version}")
                },
            }),
            None => crate::tables::printer(group, plural),
        },
        stored_as: stored_as(group, version, plural),
    }
}

/// Built-in resources whose objects are another resource's (see [`StoredAs`]).
fn stored_as(group: &str, version: &str, plural: &str) -> Option<StoredAs> {
    match (group, plural) {
        ("events.k8s.io", "events") => Some(StoredAs {
            group: String::new(),
            version: "v1".into(),
            resource: "events".into(),
            kind: "Event".into(),
        }),
        ("autoscaling", "horizontalpodautoscalers") if version == "v1" => Some(StoredAs {
            group: "autoscaling".into(),
            version: "v2".into(),
            resource: "horizontalpodautoscalers".into(),
            kind: "HorizontalPodAutoscaler".into(),
        }),
        _ => None,
    }
}

pub fn resources() -> Vec<ResourceInfo> {
    use apps::v1 as apps_v1;
    use batch::v1 as batch_v1;
    use core::v1 as core_v1;
    let all = &["all"][..];
    let none: &[&str] = &[];
    vec![
        // core/v1
        resource(
            "",
            "v1",
            "configmaps",
            "ConfigMap",
            true,
            &["cm"],
            none,
            ALL_VERBS,
            vec![],
            typed::<core_v1::ConfigMap>(),
        ),
        resource(
            "",
            "v1",
            "endpoints",
            "Endpoints",
            true,
            &["ep"],
            none,
            ALL_VERBS,
            vec![],
            typed::<core_v1::Endpoints>(),
        ),
        resource(
            "",
            "v1",
            "events",
            "Event",
            true,
            &["ev"],
            none,
            ALL_VERBS,
            vec![],
            typed::<core_v1::Event>(),
        ),
        resource(
            "",
            "v1",
            "limitranges",
            "LimitRange",
            true,
            &["limits"],
            none,
            ALL_VERBS,
            vec![],
            typed::<core_v1::LimitRange>(),
        ),
        resource(
            "",
            "v1",
            "namespaces",
            "Namespace",
            false,
            &["ns"],
            none,
            &[
                "create", "delete", "get", "list", "patch", "update", "watch",
            ],
            vec![
                SubresourceInfo {
                    name: "finalize",
                    group: "",
                    version: "",
                    kind: "",
                    verbs: &["update"],
                },
                status(),
            ],
            typed::<core_v1::Namespace>(),
        ),
        resource(
            "",
            "v1",
            "nodes",
            "Node",
            false,
            &["no"],
            none,
            ALL_VERBS,
            vec![
                SubresourceInfo {
                    name: "proxy",
                    group: "",
                    version: "",
                    kind: "NodeProxyOptions",
                    verbs: &["create", "delete", "get", "patch", "update"],
                },
                status(),
            ],
            typed::<core_v1::Node>(),
        ),
        resource(
            "",
            "v1",
            "persistentvolumeclaims",
            "PersistentVolumeClaim",
            true,
            &["pvc"],
            none,
            ALL_VERBS,
            vec![status()],
            typed::<core_v1::PersistentVolumeClaim>(),
        ),
        resource(
            "",
            "v1",
            "persistentvolumes",
            "PersistentVolume",
            false,
            &["pv"],
            none,
            ALL_VERBS,
            vec![status()],
            typed::<core_v1::PersistentVolume>(),
        ),
        resource(
            "",
            "v1",
            "pods",
            "Pod",
            true,
            &["po"],
            all,
            ALL_VERBS,
            vec![
                SubresourceInfo {
                    name: "attach",
                    group: "",
                    version: "",
                    kind: "PodAttachOptions",
                    verbs: &["create", "get"],
                },
                SubresourceInfo {
                    name: "binding",
                    group: "",
                    version: "",
                    kind: "Binding",
                    verbs: &["create"],
                },
                SubresourceInfo {
                    name: "ephemeralcontainers",
                    group: "",
                    version: "",
                    kind: "Pod",
                    verbs: &["get", "patch", "update"],
                },
                SubresourceInfo {
                    name: "eviction",
                    group: "policy",
                    version: "v1",
                    kind: "Eviction",
                    verbs: &["create"],
                },
                SubresourceInfo {
                    name: "exec",
                    group: "",
                    version: "",
                    kind: "PodExecOptions",
                    verbs: &["create", "get"],
                },
                SubresourceInfo {
                    name: "log",
                    group: "",
                    version: "",
                    kind: "Pod",
                    verbs: &["get"],
                },
                SubresourceInfo {
                    name: "portforward",
                    group: "",
                    version: "",
                    kind: "PodPortForwardOptions",
                    verbs: &["create", "get"],
                },
                SubresourceInfo {
                    name: "proxy",
                    group: "",
                    version: "",
                    kind: "PodProxyOptions",
                    verbs: &["create", "delete", "get", "patch", "update"],
                },
                status(),
            ],
            typed::<core_v1::Pod>(),
        ),
        resource(
            "",
            "v1",
            "resourcequotas",
            "ResourceQuota",
            true,
            &["quota"],
            none,
            ALL_VERBS,
            vec![status()],
            typed::<core_v1::ResourceQuota>(),
        ),
        resource(
            "",
            "v1",
            "secrets",
            "Secret",
            true,
            none,
            none,
            ALL_VERBS,
            vec![],
            typed::<core_v1::Secret>(),
        ),
        resource(
            "",
            "v1",
            "serviceaccounts",
            "ServiceAccount",
            true,
            &["sa"],
            none,
            ALL_VERBS,
            vec![SubresourceInfo {
                name: "token",
                group: "authentication.k8s.io",
                version: "v1",
                kind: "TokenRequest",
                verbs: &["create"],
            }],
            typed::<core_v1::ServiceAccount>(),
        ),
        resource(
            "",
            "v1",
            "services",
            "Service",
            true,
            &["svc"],
            all,
            ALL_VERBS,
            vec![
                SubresourceInfo {
                    name: "proxy",
                    group: "",
                    version: "",
                    kind: "ServiceProxyOptions",
                    verbs: &["create", "delete", "get", "patch", "update"],
                },
                status(),
            ],
            typed::<core_v1::Service>(),
        ),
        // apps/v1
        resource(
            "apps",
            "v1",
            "controllerrevisions",
            "ControllerRevision",
            true,
            none,
            none,
            ALL_VERBS,
            vec![],
            typed::<apps_v1::ControllerRevision>(),
        ),
        resource(
            "apps",
            "v1",
            "daemonsets",
            "DaemonSet",
            true,
            &["ds"],
            all,
            ALL_VERBS,
            vec![status()],
            typed::<apps_v1::DaemonSet>(),
        ),
        resource(
            "apps",
            "v1",
            "deployments",
            "Deployment",
            true,
            &["deploy"],
            all,
            ALL_VERBS,
            vec![scale(), status()],
            typed::<apps_v1::Deployment>(),
        ),
        resource(
            "apps",
            "v1",
            "replicasets",
            "ReplicaSet",
            true,
            &["rs"],
            all,
            ALL_VERBS,
            vec![scale(), status()],
            typed::<apps_v1::ReplicaSet>(),
        ),
        resource(
            "apps",
            "v1",
            "statefulsets",
            "StatefulSet",
            true,
            &["sts"],
            all,
            ALL_VERBS,
            vec![scale(), status()],
            typed::<apps_v1::StatefulSet>(),
        ),
        // batch/v1
        resource(
            "batch",
            "v1",
            "cronjobs",
            "CronJob",
            true,
            &["cj"],
            all,
            ALL_VERBS,
            vec![status()],
            typed::<batch_v1::CronJob>(),
        ),
        resource(
            "batch",
            "v1",
            "jobs",
            "Job",
            true,
            none,
            all,
            ALL_VERBS,
            vec![status()],
            typed::<batch_v1::Job>(),
        ),
        // coordination, discovery, events, policy
        resource(
            "coordination.k8s.io",
            "v1",
            "leases",
            "Lease",
            true,
            none,
            none,
            ALL_VERBS,
            vec![],
            typed::<coordination::v1::Lease>(),
        ),
        resource(
            "discovery.k8s.io",
            "v1",
            "endpointslices",
            "EndpointSlice",
            true,
            none,
            none,
            ALL_VERBS,
            vec![],
            typed::<discovery::v1::EndpointSlice>(),
        ),
        resource(
            "events.k8s.io",
            "v1",
            "events",
            "Event",
            true,
            &["ev"],
            none,
            ALL_VERBS,
            vec![],
            typed::<events::v1::Event>(),
        ),
        resource(
            "policy",
            "v1",
            "poddisruptionbudgets",
            "PodDisruptionBudget",
            true,
            &["pdb"],
            none,
            ALL_VERBS,
            vec![status()],
            typed::<policy::v1::PodDisruptionBudget>(),
        ),
        // rbac
        resource(
            "rbac.authorization.k8s.io",
            "v1",
            "clusterrolebindings",
            "ClusterRoleBinding",
            false,
            none,
            none,
            ALL_VERBS,
            vec![],
            typed::<rbac::v1::ClusterRoleBinding>(),
        ),
        resource(
            "rbac.authorization.k8s.io",
            "v1",
            "clusterroles",
            "ClusterRole",
            false,
            none,
            none,
            ALL_VERBS,
            vec![],
            typed::<rbac::v1::ClusterRole>(),
        ),
        resource(
            "rbac.authorization.k8s.io",
            "v1",
            "rolebindings",
            "RoleBinding",
            true,
            none,
            none,
            ALL_VERBS,
            vec![],
            typed::<rbac::v1::RoleBinding>(),
        ),
        resource(
            "rbac.authorization.k8s.io",
            "v1",
            "roles",
            "Role",
            true,
            none,
            none,
            ALL_VERBS,
            vec![],
            typed::<rbac::v1::Role>(),
        ),
        // Kinds common in users' manifests: stored and served (no controllers act on them yet).
        resource(
            "autoscaling",
            "v2",
            "horizontalpodautoscalers",
            "HorizontalPodAutoscaler",
            true,
            &["hpa"],
            all,
            ALL_VERBS,
            vec![status()],
            typed::<autoscaling::v2::HorizontalPodAutoscaler>(),
        ),
        // The same objects in v1's form (a CPU target; the rest in annotations).
        resource(
            "autoscaling",
            "v1",
            "horizontalpodautoscalers",
            "HorizontalPodAutoscaler",
            true,
            &["hpa"],
            all,
            ALL_VERBS,
            vec![status()],
            typed::<autoscaling::v1::HorizontalPodAutoscaler>(),
        ),
        resource(
            "networking.k8s.io",
            "v1",
            "ingressclasses",
            "IngressClass",
            false,
            none,
            none,
            ALL_VERBS,
            vec![],
            typed::<networking::v1::IngressClass>(),
        ),
        resource(
            "networking.k8s.io",
            "v1",
            "ingresses",
            "Ingress",
            true,
            &["ing"],
            none,
            ALL_VERBS,
            vec![status()],
            typed::<networking::v1::Ingress>(),
        ),
        resource(
            "networking.k8s.io",
            "v1",
            "networkpolicies",
            "NetworkPolicy",
            true,
            &["netpol"],
            none,
            ALL_VERBS,
            vec![],
            typed::<networking::v1::NetworkPolicy>(),
        ),
        resource(
            "certificates.k8s.io",
            "v1",
            "certificatesigningrequests",
            "CertificateSigningRequest",
            false,
            &["csr"],
            none,
            ALL_VERBS,
            vec![
                status(),
                SubresourceInfo {
                    name: "approval",
                    group: "",
                    version: "",
                    kind: "",
                    verbs: &["get", "patch", "update"],
                },
            ],
            typed::<certificates::v1::CertificateSigningRequest>(),
        ),
        resource(
            "node.k8s.io",
            "v1",
            "runtimeclasses",
            "RuntimeClass",
            false,
            none,
            none,
            ALL_VERBS,
            vec![],
            typed::<node::v1::RuntimeClass>(),
        ),
        resource(
            "apiregistration.k8s.io",
            "v1",
            "apiservices",
            "APIService",
            false,
            none,
            &["api-extensions"],
            ALL_VERBS,
            vec![status()],
            typed::<k8s_openapi::kube_aggregator::pkg::apis::apiregistration::v1::APIService>(),
        ),
        resource(
            "scheduling.k8s.io",
            "v1",
            "priorityclasses",
            "PriorityClass",
            false,
            &["pc"],
            none,
            ALL_VERBS,
            vec![],
            typed::<scheduling::v1::PriorityClass>(),
        ),
        // reviews: answered, not stored
        resource(
            "authentication.k8s.io",
            "v1",
            "selfsubjectreviews",
            "SelfSubjectReview",
            false,
            none,
            none,
            &["create"],
            vec![],
            typed::<authentication::v1::SelfSubjectReview>(),
        ),
        resource(
            "authorization.k8s.io",
            "v1",
            "selfsubjectaccessreviews",
            "SelfSubjectAccessReview",
            false,
            none,
            none,
            &["create"],
            vec![],
            typed::<authorization::v1::SelfSubjectAccessReview>(),
        ),
        resource(
            "authorization.k8s.io",
            "v1",
            "selfsubjectrulesreviews",
            "SelfSubjectRulesReview",
            true,
            none,
            none,
            &["create"],
            vec![],
            typed::<authorization::v1::SelfSubjectRulesReview>(),
        ),
        resource(
            "authentication.k8s.io",
            "v1",
            "tokenreviews",
            "TokenReview",
            false,
            none,
            none,
            &["create"],
            vec![],
            typed::<authentication::v1::TokenReview>(),
        ),
        resource(
            "authorization.k8s.io",
            "v1",
            "localsubjectaccessreviews",
            "LocalSubjectAccessReview",
            true,
            none,
            none,
            &["create"],
            vec![],
            typed::<authorization::v1::LocalSubjectAccessReview>(),
        ),
        resource(
            "authorization.k8s.io",
            "v1",
            "subjectaccessreviews",
            "SubjectAccessReview",
            false,
            none,
            none,
            &["create"],
            vec![],
            typed::<authorization::v1::SubjectAccessReview>(),
        ),
        // metrics: answered from the node agents' samples, not stored
        resource(
            crate::metrics::GROUP,
            "v1beta1",
            "nodes",
            "NodeMetrics",
            false,
            none,
            none,
            &["get", "list"],
            vec![],
            typed::<crate::metrics::NodeMetrics>(),
        ),
        resource(
            crate::metrics::GROUP,
            "v1beta1",
            "pods",
            "PodMetrics",
            true,
            none,
            none,
            &["get", "list"],
            vec![],
            typed::<crate::metrics::PodMetrics>(),
        ),
        // storage
        resource(
            "storage.k8s.io",
            "v1",
            "storageclasses",
            "StorageClass",
            false,
            &["sc"],
            none,
            ALL_VERBS,
            vec![],
            typed::<storage::v1::StorageClass>(),
        ),
        // apiextensions
        resource(
            "apiextensions.k8s.io",
            "v1",
            "customresourcedefinitions",
            "CustomResourceDefinition",
            false,
            &["crd", "crds"],
            &["api-extensions"],
            ALL_VERBS,
            vec![status()],
            typed::<apiextensions::v1::CustomResourceDefinition>(),
        ),
    ]
    .into_iter()
    .map(|mut r| {
        if r.resource == "services" {
            r.verbs = NO_COLLECTION_DELETE.to_vec();
        }
        r
    })
    .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn normalize_drops_unknown_fields_and_rejects_bad_types() {
        let pod = json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p"},
            "spec": {"containers": [{"name": "c", "image": "busybox", "bogus": 1}]}});
        let r = resources()
            .into_iter()
            .find(|r| r.resource == "pods")
            .unwrap();
        let out = (r.typed.as_ref().unwrap().normalize)(&pod).unwrap();
        assert!(out["spec"]["containers"][0].get("bogus").is_none());
        assert_eq!(out["spec"]["containers"][0]["image"], "busybox");
        let bad = json!({"spec": {"containers": "nope"}});
        assert!((r.typed.as_ref().unwrap().normalize)(&bad).is_err());
    }
}
