//! Placement, as Karmada's detector, scheduler and binding controller do it, level-triggered:
//! the resource templates that (Cluster)PropagationPolicies select get a (Cluster)ResourceBinding
//! naming the sites their placement picks, and each of those sites gets a Work in its namespace
//! (`karmada-es-<site>`) holding the template as the site must apply it. Only differences are
//! written, so a steady hub writes nothing.
//!
//! Precedence when several policies select one template (Karmada's): a PropagationPolicy before a
//! ClusterPropagationPolicy, then the higher `priority`, then the more specific selector (by name,
//! then by labels, then by kind), then the policy's name.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use kube::api::{Api, ApiResource, DeleteParams, DynamicObject, ListParams, Patch, PatchParams};
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

use apiserver_lite::selectors::LabelSelector;

use crate::resources::Resolved;

/// The hub's writes of bindings and Works are recorded under this manager and carry this label.
pub const MANAGER: &str = "edgesite-cloudhub";
pub const MANAGED_LABEL: &str = "app.kubernetes.io/managed-by";
/// On a Work: the binding it belongs to, `<Kind>/<namespace>/<name>` (namespace empty for a
/// ClusterResourceBinding).
pub const BINDING_ANNOTATION: &str = "work.karmada.io/binding";
/// Labels Karmada puts on what it propagates.
const POLICY_NAME_LABEL: &str = "propagationpolicy.karmada.io/name";
const POLICY_NAMESPACE_LABEL: &str = "propagationpolicy.karmada.io/namespace";
const CLUSTER_POLICY_LABEL: &str = "clusterpropagationpolicy.karmada.io/name";

/// How often placement looks again without being woken by a change.
const PERIOD: Duration = Duration::from_secs(30);
/// How long placement lets a burst of changes gather before a pass.
const SETTLE: Duration = Duration::from_millis(100);

/// Whether a committed change under `key` can change what placement wants: not the datastore's
/// bookkeeping, the bindings placement writes and their statuses, Clusters (which
/// [`super::sites::Sites`] follows), nor anything in `kube-system`.
pub fn concerns_placement(key: &str) -> bool {
    const IGNORED: [&str; 3] = [
        "/cluster.karmada.io/clusters/",
        "/work.karmada.io/resourcebindings/",
        "/work.karmada.io/clusterresourcebindings/",
    ];
    !crate::changes::bookkeeping(key)
        && !IGNORED.iter().any(|p| key.starts_with(p))
        && !key.contains("/kube-system/")
}

/// The namespace of a site's Works at the hub.
pub fn site_namespace(site: &str) -> String {
    format!("karmada-es-{site}")
}

#[derive(Clone, Debug)]
struct Policy {
    cluster_scoped: bool,
    namespace: String,
    name: String,
    priority: i64,
    spec: Value,
}

impl Policy {
    fn from(object: &DynamicObject, cluster_scoped: bool) -> Policy {
        Policy {
            cluster_scoped,
            namespace: object.metadata.namespace.clone().unwrap_or_default(),
            name: object.metadata.name.clone().unwrap_or_default(),
            priority: object.data["spec"]["priority"].as_i64().unwrap_or(0),
            spec: object.data["spec"].clone(),
        }
    }

    fn suspended(&self) -> bool {
        self.spec["suspension"]["dispatching"]
            .as_bool()
            .unwrap_or(false)
    }

    fn labels(&self) -> BTreeMap<String, String> {
        let mut l = BTreeMap::new();
        if self.cluster_scoped {
            l.insert(CLUSTER_POLICY_LABEL.to_string(), self.name.clone());
        } else {
            l.insert(POLICY_NAME_LABEL.to_string(), self.name.clone());
            l.insert(POLICY_NAMESPACE_LABEL.to_string(), self.namespace.clone());
        }
        l
    }
}

/// How specific a selector is (name 3, labels 2, kind 1).
fn specificity(selector: &Value) -> u8 {
    if selector["name"].as_str().is_some_and(|n| !n.is_empty()) {
        3
    } else if selector.get("labelSelector").is_some_and(|s| !s.is_null()) {
        2
    } else {
        1
    }
}

pub use super::sites::Site;

/// The sites a placement picks (Karmada's clusterAffinity).
pub fn pick<'a>(placement: &Value, sites: &'a [Site]) -> Vec<&'a Site> {
    let affinity = &placement["clusterAffinity"];
    let names: Vec<&str> = affinity["clusterNames"]
        .as_array()
        .map(|a| a.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default();
    let exclude: Vec<&str> = affinity["exclude"]
        .as_array()
        .map(|a| a.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default();
    let selector = affinity
        .get("labelSelector")
        .filter(|s| !s.is_null())
        .and_then(|s| LabelSelector::from_object(s).ok());
    sites
        .iter()
        .filter(|s| names.is_empty() || names.contains(&s.name.as_str()))
        .filter(|s| !exclude.contains(&s.name.as_str()))
        .filter(|s| selector.as_ref().is_none_or(|sel| sel.matches(&s.labels)))
        .collect()
}

/// Karmada's Divided replica scheduling with static weights: `replicas` split over `sites` in
/// proportion to each site's weight, the highest weight among the `staticWeightList` rules
/// that select it (every site weighs 1 when no rule selects any). What rounding down leaves goes
/// one each to the heaviest sites, then by name. Sites given no replica are left out.
pub fn divide(replicas: i64, scheduling: &Value, sites: &[&Site]) -> BTreeMap<String, i64> {
    let rules = scheduling["weightPreference"]["staticWeightList"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    let mut weights: Vec<(&Site, i64)> = sites
        .iter()
        .map(|site| {
            let weight = rules
                .iter()
                .filter(|rule| {
                    !pick(
                        &json!({"clusterAffinity": rule["targetCluster"]}),
                        std::slice::from_ref(*site),
                    )
                    .is_empty()
                })
                .filter_map(|rule| rule["weight"].as_i64())
                .max()
                .unwrap_or(0);
            (*site, weight)
        })
        .collect();
    if weights.iter().all(|(_, w)| *w <= 0) {
        for entry in &mut weights {
            entry.1 = 1;
        }
    }
    weights.retain(|(_, w)| *w > 0);
    let total: i64 = weights.iter().map(|(_, w)| w).sum();
    let mut out: BTreeMap<String, i64> = BTreeMap::new();
    if total == 0 || replicas <= 0 {
        return out;
    }
    let mut given = 0;
    for (site, weight) in &weights {
        let share = replicas * weight / total;
        given += share;
        out.insert(site.name.clone(), share);
    }
    weights.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.name.cmp(&b.0.name)));
    for (site, _) in weights.iter().cycle().take((replicas - given) as usize) {
        *out.entry(site.name.clone()).or_default() += 1;
    }
    out.retain(|_, n| *n > 0);
    out
}

/// A template: one object at the hub that some policy places.
#[derive(Clone, Debug)]
struct Template {
    resource: ApiResource,
    namespaced: bool,
    object: DynamicObject,
}

impl Template {
    fn key(&self) -> String {
        format!(
            "{}/{}/{}/{}",
            self.resource.api_version,
            self.resource.kind,
            self.object
                .metadata
                .namespace
                .as_deref()
                .unwrap_or_default(),
            self.object.metadata.name.as_deref().unwrap_or_default()
        )
    }

    /// Karmada's binding name: `<name>-<kind, lower case>`.
    fn binding_name(&self) -> String {
        format!(
            "{}-{}",
            self.object.metadata.name.as_deref().unwrap_or_default(),
            self.resource.kind.to_lowercase()
        )
    }
}

/// What the template becomes at a site: no server-set fields, no status, and what Karmada leaves
/// to the member cluster to fill in (a Service's cluster IPs, a Job's generated selector, a pod's
/// node).
pub fn manifest(
    template: &DynamicObject,
    resource: &ApiResource,
    labels: &BTreeMap<String, String>,
) -> Value {
    let mut object = serde_json::to_value(template).unwrap_or_default();
    object["apiVersion"] = json!(resource.api_version);
    object["kind"] = json!(resource.kind);
    if let Some(o) = object.as_object_mut() {
        o.remove("status");
    }
    if let Some(meta) = object.get_mut("metadata").and_then(Value::as_object_mut) {
        for field in [
            "uid",
            "resourceVersion",
            "creationTimestamp",
            "generation",
            "managedFields",
            "selfLink",
            "ownerReferences",
            "deletionTimestamp",
            "deletionGracePeriodSeconds",
            "finalizers",
        ] {
            meta.remove(field);
        }
        if let Some(a) = meta.get_mut("annotations").and_then(Value::as_object_mut) {
            a.remove("kubectl.kubernetes.io/last-applied-configuration");
            a.remove("deployment.kubernetes.io/revision");
            if a.is_empty() {
                meta.remove("annotations");
            }
        }
        if let Some(l) = meta
            .entry("labels")
            .or_insert_with(|| json!({}))
            .as_object_mut()
        {
            for (k, v) in labels {
                l.insert(k.clone(), json!(v));
            }
        }
    }
    match resource.kind.as_str() {
        "Service" => {
            if let Some(spec) = object.get_mut("spec").and_then(Value::as_object_mut)
                && spec.get("clusterIP").and_then(Value::as_str) != Some("None")
            {
                spec.remove("clusterIP");
                spec.remove("clusterIPs");
            }
        }
        "Job" if object["spec"]["manualSelector"] != json!(true) => {
            if let Some(spec) = object.get_mut("spec").and_then(Value::as_object_mut) {
                spec.remove("selector");
            }
            for path in ["/spec/template/metadata/labels"] {
                if let Some(l) = object.pointer_mut(path).and_then(Value::as_object_mut) {
                    l.retain(|k, _| {
                        !matches!(
                            k.as_str(),
                            "controller-uid"
                                | "batch.kubernetes.io/controller-uid"
                                | "job-name"
                                | "batch.kubernetes.io/job-name"
                        )
                    });
                }
            }
        }
        "Pod" => {
            if let Some(spec) = object.get_mut("spec").and_then(Value::as_object_mut) {
                spec.remove("nodeName");
            }
        }
        "PersistentVolumeClaim" => {
            if let Some(spec) = object.get_mut("spec").and_then(Value::as_object_mut) {
                spec.remove("volumeName");
            }
        }
        "ServiceAccount" => {
            if let Some(o) = object.as_object_mut() {
                o.remove("secrets");
            }
        }
        _ => {}
    }
    object
}

/// The ConfigMaps, Secrets, ServiceAccounts and PersistentVolumeClaims a workload's pods use
/// (`propagateDeps`): (kind, name) in the workload's namespace.
pub fn dependencies(kind: &str, object: &Value) -> BTreeSet<(String, String)> {
    let spec = match kind {
        "Pod" => &object["spec"],
        "Deployment" | "StatefulSet" | "DaemonSet" | "ReplicaSet" | "Job" => {
            &object["spec"]["template"]["spec"]
        }
        "CronJob" => &object["spec"]["jobTemplate"]["spec"]["template"]["spec"],
        _ => return BTreeSet::new(),
    };
    let mut deps = BTreeSet::new();
    let mut add = |kind: &str, name: Option<&str>| {
        if let Some(name) = name.filter(|n| !n.is_empty()) {
            deps.insert((kind.to_string(), name.to_string()));
        }
    };
    add("ServiceAccount", spec["serviceAccountName"].as_str());
    for s in spec["imagePullSecrets"].as_array().into_iter().flatten() {
        add("Secret", s["name"].as_str());
    }
    for v in spec["volumes"].as_array().into_iter().flatten() {
        add("ConfigMap", v["configMap"]["name"].as_str());
        add("Secret", v["secret"]["secretName"].as_str());
        add(
            "PersistentVolumeClaim",
            v["persistentVolumeClaim"]["claimName"].as_str(),
        );
        for p in v["projected"]["sources"].as_array().into_iter().flatten() {
            add("ConfigMap", p["configMap"]["name"].as_str());
            add("Secret", p["secret"]["name"].as_str());
        }
    }
    for list in ["containers", "initContainers"] {
        for c in spec[list].as_array().into_iter().flatten() {
            for e in c["envFrom"].as_array().into_iter().flatten() {
                add("ConfigMap", e["configMapRef"]["name"].as_str());
                add("Secret", e["secretRef"]["name"].as_str());
            }
            for e in c["env"].as_array().into_iter().flatten() {
                add(
                    "ConfigMap",
                    e["valueFrom"]["configMapKeyRef"]["name"].as_str(),
                );
                add("Secret", e["valueFrom"]["secretKeyRef"]["name"].as_str());
            }
        }
    }
    deps
}

/// A dependency to add: the object, the policy of the workload needing it, its sites, and the
/// workload's binding (namespace, name).
type Dependency = (Template, Policy, BTreeSet<String>, (String, String));

/// An (Cluster)OverridePolicy: its namespace (None: cluster-wide), name and spec.
type Override = (Option<String>, String, Value);

/// `manifest` as `site` gets it: every rule of every policy that selects it and targets the site.
fn overridden(manifest: &Value, site: &Site, overrides: &[Override]) -> Value {
    let mut out = manifest.clone();
    let namespace = manifest["metadata"]["namespace"]
        .as_str()
        .unwrap_or_default();
    for (policy_namespace, name, spec) in overrides {
        if policy_namespace
            .as_deref()
            .is_some_and(|ns| ns != namespace)
            || !super::overrides::selects(&spec["resourceSelectors"], manifest)
        {
            continue;
        }
        for rule in spec["overrideRules"].as_array().into_iter().flatten() {
            let target = &rule["targetCluster"];
            let applies = target.is_null()
                || !pick(
                    &json!({"clusterAffinity": target}),
                    std::slice::from_ref(site),
                )
                .is_empty();
            if !applies {
                continue;
            }
            if let Err(error) = super::overrides::apply(&mut out, &rule["overriders"]) {
                tracing::warn!(policy = %name, site = %site.name, %error, "override not applied");
            }
        }
    }
    out
}

/// A binding as placement wants it.
struct Wanted {
    template: Template,
    policy: Policy,
    sites: BTreeSet<String>,
    /// Each site's share of the replicas under Divided scheduling (empty: each gets all).
    replicas: BTreeMap<String, i64>,
    required_by: BTreeSet<(String, String)>,
}

/// The placement loop.
pub struct Placement {
    client: kube::Client,
    resolver: crate::resources::Resolver,
    sites: Arc<super::sites::Sites>,
    /// The sites' namespaces known to exist (made once per site, not looked up every pass).
    namespaces: Mutex<BTreeSet<String>>,
}

impl Placement {
    pub fn new(client: kube::Client, sites: Arc<super::sites::Sites>) -> Placement {
        Placement {
            resolver: crate::resources::Resolver::new(client.clone()),
            client,
            sites,
            namespaces: Mutex::default(),
        }
    }

    /// Runs until `shutdown`, looking when `wake` fires (a moment later, so a burst is one
    /// pass) and every [`PERIOD`] regardless.
    pub async fn run(self, wake: std::sync::Arc<tokio::sync::Notify>, shutdown: CancellationToken) {
        loop {
            if let Err(error) = self.reconcile().await {
                tracing::warn!(%error, "placement");
            }
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = wake.notified() => tokio::time::sleep(SETTLE).await,
                _ = tokio::time::sleep(PERIOD) => {}
            }
        }
    }

    fn namespace_known(&self, name: &str) -> bool {
        self.namespaces
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .contains(name)
    }

    /// The resource for `api_version`/`kind` at the hub, and whether it is namespaced.
    async fn resource(&self, api_version: &str, kind: &str) -> Option<Resolved> {
        self.resolver.resolve(api_version, kind).await.ok()
    }

    async fn templates(&self, policy: &Policy, selector: &Value) -> Vec<Template> {
        let api_version = selector["apiVersion"].as_str().unwrap_or_default();
        let kind = selector["kind"].as_str().unwrap_or_default();
        let Some((resource, namespaced)) = self.resource(api_version, kind).await else {
            return Vec::new();
        };
        // A PropagationPolicy selects in its own namespace only.
        let namespace = if policy.cluster_scoped {
            selector["namespace"].as_str().filter(|n| !n.is_empty())
        } else {
            if selector["namespace"]
                .as_str()
                .is_some_and(|n| !n.is_empty() && n != policy.namespace)
            {
                return Vec::new();
            }
            Some(policy.namespace.as_str())
        };
        if !namespaced && !policy.cluster_scoped {
            return Vec::new();
        }
        let api: Api<DynamicObject> = match (namespaced, namespace) {
            (true, Some(ns)) => Api::namespaced_with(self.client.clone(), ns, &resource),
            _ => Api::all_with(self.client.clone(), &resource),
        };
        let Ok(list) = api.list(&ListParams::default()).await else {
            return Vec::new();
        };
        let name = selector["name"].as_str().filter(|n| !n.is_empty());
        let labels = selector
            .get("labelSelector")
            .filter(|s| !s.is_null())
            .and_then(|s| LabelSelector::from_object(s).ok());
        list.items
            .into_iter()
            .filter(|o| o.metadata.deletion_timestamp.is_none())
            .filter(|o| name.is_none_or(|n| o.metadata.name.as_deref() == Some(n)))
            .filter(|o| {
                labels
                    .as_ref()
                    .is_none_or(|sel| sel.matches(&o.metadata.labels.clone().unwrap_or_default()))
            })
            // The hub's own namespaces are not placed.
            .filter(|o| {
                !o.metadata
                    .namespace
                    .as_deref()
                    .is_some_and(|n| n.starts_with("karmada-es-") || n == "kube-system")
            })
            .map(|object| Template {
                resource: resource.clone(),
                namespaced,
                object,
            })
            .collect()
    }

    /// One pass: what should be bound where, then the writes that make it so.
    pub async fn reconcile(&self) -> Result<(), kube::Error> {
        let Some(sites) = self.sites.snapshot() else {
            // The Clusters are not read yet: placing on no sites would remove every Work.
            return Ok(());
        };
        let mut policies: Vec<(Policy, u8, Value)> = Vec::new();
        for (resource, cluster_scoped) in [
            (crate::crds::propagation_policy(), false),
            (crate::crds::cluster_propagation_policy(), true),
        ] {
            let api: Api<DynamicObject> = Api::all_with(self.client.clone(), &resource);
            for object in api.list(&ListParams::default()).await?.items {
                let policy = Policy::from(&object, cluster_scoped);
                for selector in policy.spec["resourceSelectors"]
                    .as_array()
                    .cloned()
                    .unwrap_or_default()
                {
                    policies.push((policy.clone(), specificity(&selector), selector));
                }
            }
        }
        // Precedence: namespaced first, then priority, specificity, name.
        policies.sort_by(|(a, sa, _), (b, sb, _)| {
            a.cluster_scoped
                .cmp(&b.cluster_scoped)
                .then(b.priority.cmp(&a.priority))
                .then(sb.cmp(sa))
                .then(a.namespace.cmp(&b.namespace))
                .then(a.name.cmp(&b.name))
        });
        let mut wanted: BTreeMap<String, Wanted> = BTreeMap::new();
        for (policy, _, selector) in &policies {
            for template in self.templates(policy, selector).await {
                let key = template.key();
                if wanted.contains_key(&key) {
                    continue;
                }
                let picked: Vec<&Site> = pick(&policy.spec["placement"], &sites)
                    .into_iter()
                    .filter(|s| s.serves(&template.resource.api_version, &template.resource.kind))
                    .collect();
                let scheduling = &policy.spec["placement"]["replicaScheduling"];
                let replicas = match template.object.data["spec"]["replicas"].as_i64() {
                    Some(total) if scheduling["replicaSchedulingType"] == "Divided" => {
                        divide(total, scheduling, &picked)
                    }
                    _ => BTreeMap::new(),
                };
                let picked: BTreeSet<String> = picked
                    .into_iter()
                    .filter(|s| replicas.is_empty() || replicas.contains_key(&s.name))
                    .map(|s| s.name.clone())
                    .collect();
                wanted.insert(
                    key,
                    Wanted {
                        template,
                        policy: policy.clone(),
                        sites: picked,
                        replicas,
                        required_by: BTreeSet::new(),
                    },
                );
            }
        }
        self.add_dependencies(&mut wanted).await;
        // Overrides: cluster-wide ones first, then namespaced ones, each by name.
        let mut overrides: Vec<(Option<String>, String, Value)> = Vec::new();
        for (resource, namespaced) in [
            (crate::crds::cluster_override_policy(), false),
            (crate::crds::override_policy(), true),
        ] {
            let api: Api<DynamicObject> = Api::all_with(self.client.clone(), &resource);
            let mut found: Vec<(Option<String>, String, Value)> = api
                .list(&ListParams::default())
                .await?
                .items
                .into_iter()
                .map(|o| {
                    (
                        namespaced.then(|| o.metadata.namespace.clone().unwrap_or_default()),
                        o.metadata.name.clone().unwrap_or_default(),
                        o.data["spec"].clone(),
                    )
                })
                .collect();
            found.sort_by(|a, b| (&a.0, &a.1).cmp(&(&b.0, &b.1)));
            overrides.extend(found);
        }
        self.write(&sites, &wanted, &overrides).await
    }

    /// `propagateDeps`: what a placed workload's pods use follows it to its sites.
    async fn add_dependencies(&self, wanted: &mut BTreeMap<String, Wanted>) {
        let mut extra: Vec<Dependency> = Vec::new();
        for w in wanted.values() {
            if !w.policy.spec["propagateDeps"].as_bool().unwrap_or(false) {
                continue;
            }
            let namespace = w
                .template
                .object
                .metadata
                .namespace
                .clone()
                .unwrap_or_default();
            let object = serde_json::to_value(&w.template.object).unwrap_or_default();
            for (kind, name) in dependencies(&w.template.resource.kind, &object) {
                let Some((resource, namespaced)) = self.resource("v1", &kind).await else {
                    continue;
                };
                let api: Api<DynamicObject> =
                    Api::namespaced_with(self.client.clone(), &namespace, &resource);
                let Ok(Some(object)) = api.get_opt(&name).await else {
                    continue;
                };
                extra.push((
                    Template {
                        resource,
                        namespaced,
                        object,
                    },
                    w.policy.clone(),
                    w.sites.clone(),
                    (namespace.clone(), w.template.binding_name()),
                ));
            }
        }
        for (template, policy, sites, by) in extra {
            let key = template.key();
            let entry = wanted.entry(key).or_insert_with(|| Wanted {
                template,
                policy,
                sites: BTreeSet::new(),
                replicas: BTreeMap::new(),
                required_by: BTreeSet::new(),
            });
            // A dependency selected by a policy of its own keeps that placement and adds these
            // sites.
            entry.sites.extend(sites);
            entry.required_by.insert(by);
        }
    }

    async fn write(
        &self,
        sites: &[Site],
        wanted: &BTreeMap<String, Wanted>,
        overrides: &[Override],
    ) -> Result<(), kube::Error> {
        let apply = PatchParams::apply(MANAGER).force();
        let managed = ListParams::default().labels(&format!("{MANAGED_LABEL}={MANAGER}"));
        // The sites' namespaces.
        let namespaces: Api<k8s_openapi::api::core::v1::Namespace> = Api::all(self.client.clone());
        for site in sites {
            let name = site_namespace(&site.name);
            if self.namespace_known(&name) {
                continue;
            }
            if namespaces.get_opt(&name).await?.is_none() {
                let ns = json!({"apiVersion": "v1", "kind": "Namespace",
                    "metadata": {"name": name, "labels": {MANAGED_LABEL: MANAGER}}});
                namespaces.patch(&name, &apply, &Patch::Apply(&ns)).await?;
            }
            self.namespaces
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .insert(name);
        }
        // Bindings.
        let mut bindings_wanted: BTreeSet<(bool, String, String)> = BTreeSet::new();
        let mut works_wanted: BTreeMap<(String, String), Value> = BTreeMap::new();
        let existing_works: Api<DynamicObject> =
            Api::all_with(self.client.clone(), &crate::crds::work());
        let current: Vec<DynamicObject> = existing_works.list(&managed).await?.items;
        for w in wanted.values() {
            let t = &w.template;
            let namespace = t.object.metadata.namespace.clone().unwrap_or_default();
            let name = t.binding_name();
            let (resource, api): (ApiResource, Api<DynamicObject>) = if t.namespaced {
                let r = crate::crds::resource_binding();
                let api = Api::namespaced_with(self.client.clone(), &namespace, &r);
                (r, api)
            } else {
                let r = crate::crds::cluster_resource_binding();
                let api = Api::all_with(self.client.clone(), &r);
                (r, api)
            };
            bindings_wanted.insert((t.namespaced, namespace.clone(), name.clone()));
            let replicas = t.object.data["spec"]["replicas"].as_i64();
            let clusters: Vec<Value> = w
                .sites
                .iter()
                .map(|s| match w.replicas.get(s).copied().or(replicas) {
                    Some(r) => json!({"name": s, "replicas": r}),
                    None => json!({"name": s}),
                })
                .collect();
            let mut spec = json!({
                "resource": {
                    "apiVersion": t.resource.api_version,
                    "kind": t.resource.kind,
                    "name": t.object.metadata.name,
                    "uid": t.object.metadata.uid,
                    "resourceVersion": t.object.metadata.resource_version,
                },
                "clusters": clusters,
            });
            if t.namespaced {
                spec["resource"]["namespace"] = json!(namespace);
            }
            if let Some(r) = replicas {
                spec["replicas"] = json!(r);
            }
            if !w.required_by.is_empty() {
                spec["requiredBy"] = json!(
                    w.required_by
                        .iter()
                        .map(|(ns, n)| json!({"namespace": ns, "name": n}))
                        .collect::<Vec<_>>()
                );
            }
            if w.policy.spec["preserveResourcesOnDeletion"].as_bool() == Some(true) {
                spec["preserveResourcesOnDeletion"] = json!(true);
            }
            let existing = api.get_opt(&name).await?;
            if existing.as_ref().map(|c| &c.data["spec"]) != Some(&spec) {
                let mut labels = w.policy.labels();
                labels.insert(MANAGED_LABEL.into(), MANAGER.into());
                let binding = json!({
                    "apiVersion": resource.api_version,
                    "kind": resource.kind,
                    "metadata": {"name": name, "labels": labels},
                    "spec": spec,
                });
                api.patch(&name, &apply, &Patch::Apply(&binding)).await?;
            }
            if w.policy.suspended() {
                // Dispatching paused: the sites keep what they have.
                for work in &current_works_of(&current, &binding_id(t, &namespace, &name)) {
                    works_wanted.insert(
                        (
                            work.metadata.namespace.clone().unwrap_or_default(),
                            work.metadata.name.clone().unwrap_or_default(),
                        ),
                        Value::Null,
                    );
                }
                continue;
            }
            let manifest = manifest(&t.object, &t.resource, &w.policy.labels());
            for site in &w.sites {
                let work_name = work_name(t, &namespace, &name);
                // The site's share first, then its overrides (Karmada's order).
                let mut manifest = manifest.clone();
                if let Some(share) = w.replicas.get(site) {
                    manifest["spec"]["replicas"] = json!(share);
                }
                let manifest = match sites.iter().find(|s| &s.name == site) {
                    Some(s) => overridden(&manifest, s, overrides),
                    None => manifest,
                };
                let mut work = json!({
                    "apiVersion": "work.karmada.io/v1alpha1",
                    "kind": "Work",
                    "metadata": {
                        "name": work_name,
                        "namespace": site_namespace(site),
                        "labels": {MANAGED_LABEL: MANAGER},
                        "annotations": {BINDING_ANNOTATION: binding_id(t, &namespace, &name)},
                    },
                    "spec": {"workload": {"manifests": [manifest]}},
                });
                if w.policy.spec["preserveResourcesOnDeletion"].as_bool() == Some(true) {
                    work["spec"]["preserveResourcesOnDeletion"] = json!(true);
                }
                works_wanted.insert((site_namespace(site), work_name), work);
            }
        }
        // Works: create or update what changed, delete what is no longer wanted.
        for ((namespace, name), work) in &works_wanted {
            if work.is_null() {
                continue;
            }
            let same = current.iter().any(|c| {
                c.metadata.namespace.as_deref() == Some(namespace.as_str())
                    && c.metadata.name.as_deref() == Some(name.as_str())
                    && c.data["spec"] == work["spec"]
                    && c.metadata
                        .annotations
                        .as_ref()
                        .and_then(|a| a.get(BINDING_ANNOTATION))
                        == work["metadata"]["annotations"][BINDING_ANNOTATION]
                            .as_str()
                            .map(String::from)
                            .as_ref()
            });
            if !same {
                let api: Api<DynamicObject> =
                    Api::namespaced_with(self.client.clone(), namespace, &crate::crds::work());
                if let Err(error) = api.patch(name, &apply, &Patch::Apply(work)).await {
                    // The namespace may have been deleted by hand: look again next pass.
                    self.namespaces
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .remove(namespace);
                    return Err(error);
                }
            }
        }
        for c in &current {
            let key = (
                c.metadata.namespace.clone().unwrap_or_default(),
                c.metadata.name.clone().unwrap_or_default(),
            );
            if !works_wanted.contains_key(&key) {
                let api: Api<DynamicObject> =
                    Api::namespaced_with(self.client.clone(), &key.0, &crate::crds::work());
                api.delete(&key.1, &DeleteParams::default())
                    .await
                    .map(|_| ())
                    .or_else(gone)?;
            }
        }
        // Bindings no template needs any more.
        for (namespaced, resource) in [
            (true, crate::crds::resource_binding()),
            (false, crate::crds::cluster_resource_binding()),
        ] {
            let api: Api<DynamicObject> = Api::all_with(self.client.clone(), &resource);
            for b in api.list(&managed).await?.items {
                let namespace = b.metadata.namespace.clone().unwrap_or_default();
                let name = b.metadata.name.clone().unwrap_or_default();
                if !bindings_wanted.contains(&(namespaced, namespace.clone(), name.clone())) {
                    let api: Api<DynamicObject> = if namespaced {
                        Api::namespaced_with(self.client.clone(), &namespace, &resource)
                    } else {
                        Api::all_with(self.client.clone(), &resource)
                    };
                    api.delete(&name, &DeleteParams::default())
                        .await
                        .map(|_| ())
                        .or_else(gone)?;
                }
            }
        }
        Ok(())
    }
}

fn gone(e: kube::Error) -> Result<(), kube::Error> {
    match e {
        kube::Error::Api(s) if s.code == 404 => Ok(()),
        e => Err(e),
    }
}

/// `<Kind>/<namespace>/<name>` of a template's binding.
fn binding_id(t: &Template, namespace: &str, name: &str) -> String {
    if t.namespaced {
        format!("ResourceBinding/{namespace}/{name}")
    } else {
        format!("ClusterResourceBinding//{name}")
    }
}

/// A binding's Work name in each site's namespace: `<namespace>.<binding>` (the binding alone
/// for cluster-scoped templates), unique within the site.
fn work_name(t: &Template, namespace: &str, binding: &str) -> String {
    if t.namespaced {
        format!("{namespace}.{binding}")
    } else {
        binding.to_string()
    }
}

fn current_works_of<'a>(current: &'a [DynamicObject], binding: &str) -> Vec<&'a DynamicObject> {
    current
        .iter()
        .filter(|w| {
            w.metadata
                .annotations
                .as_ref()
                .and_then(|a| a.get(BINDING_ANNOTATION))
                .is_some_and(|b| b == binding)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn site(name: &str, labels: &[(&str, &str)]) -> Site {
        Site::new(
            name,
            labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        )
    }

    #[test]
    fn cluster_affinity_picks_by_name_label_and_exclusion() {
        let sites = vec![
            site("a", &[("region", "eu")]),
            site("b", &[("region", "us")]),
            site("c", &[("region", "eu")]),
        ];
        let names =
            |p: Value| -> Vec<String> { pick(&p, &sites).iter().map(|s| s.name.clone()).collect() };
        assert_eq!(names(json!({})), ["a", "b", "c"]);
        assert_eq!(
            names(json!({"clusterAffinity": {"labelSelector": {"matchLabels": {"region": "eu"}}}})),
            ["a", "c"]
        );
        assert_eq!(
            names(
                json!({"clusterAffinity": {"labelSelector": {"matchLabels": {"region": "eu"}}, "exclude": ["c"]}})
            ),
            ["a"]
        );
        assert_eq!(
            names(json!({"clusterAffinity": {"clusterNames": ["b", "z"]}})),
            ["b"]
        );
    }

    #[test]
    fn dependencies_are_what_the_pods_use() {
        let d = json!({"spec": {"template": {"spec": {
            "serviceAccountName": "sa",
            "volumes": [{"configMap": {"name": "cm"}}, {"secret": {"secretName": "s"}}],
            "containers": [{"envFrom": [{"configMapRef": {"name": "env"}}],
                            "env": [{"valueFrom": {"secretKeyRef": {"name": "k"}}}]}]}}}});
        let deps = dependencies("Deployment", &d);
        let want: BTreeSet<(String, String)> = [
            ("ServiceAccount", "sa"),
            ("ConfigMap", "cm"),
            ("Secret", "s"),
            ("ConfigMap", "env"),
            ("Secret", "k"),
        ]
        .iter()
        .map(|(a, b)| (a.to_string(), b.to_string()))
        .collect();
        assert_eq!(deps, want);
    }

    #[test]
    fn divided_replicas_follow_static_weights_and_rounding_goes_to_the_heaviest() {
        let sites = [
            site("big", &[("size", "big")]),
            site("small-a", &[("size", "small")]),
            site("small-b", &[("size", "small")]),
            site("other", &[]),
        ];
        let all: Vec<&Site> = sites.iter().collect();
        let weights = json!({"replicaSchedulingType": "Divided",
        "replicaDivisionPreference": "Weighted",
        "weightPreference": {"staticWeightList": [
            {"targetCluster": {"labelSelector": {"matchLabels": {"size": "big"}}}, "weight": 3},
            {"targetCluster": {"labelSelector": {"matchLabels": {"size": "small"}}}, "weight": 1},
            {"targetCluster": {"clusterNames": ["small-b"]}, "weight": 2},
        ]}});
        let shares = |n| {
            divide(n, &weights, &all)
                .into_iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect::<Vec<_>>()
                .join(",")
        };
        // Weights 3, 1, 2 (the highest rule for small-b); `other` matches no rule: none.
        assert_eq!(shares(6), "big=3,small-a=1,small-b=2");
        // 7 * 3/6 = 3, 7/6 = 1, 7 * 2/6 = 2: one left, to the heaviest.
        assert_eq!(shares(7), "big=4,small-a=1,small-b=2");
        // Fewer replicas than sites: the lightest get none and are left out.
        assert_eq!(shares(1), "big=1");
        assert_eq!(shares(0), "");
        // No rule selects any site: all weigh 1.
        let even = json!({"replicaSchedulingType": "Divided"});
        let out = divide(5, &even, &all);
        assert_eq!(out.values().sum::<i64>(), 5);
        assert_eq!(out["big"], 2);
        assert_eq!(out["other"], 1);
        assert_eq!(out["small-b"], 1);
    }

    #[test]
    fn placement_wakes_for_policies_templates_and_works_only() {
        for key in [
            "/policy.karmada.io/propagationpolicies/shop/web",
            "/apps/deployments/shop/web",
            "/core/configmaps/shop/settings",
            "/work.karmada.io/works/karmada-es-pop-1/web",
        ] {
            assert!(concerns_placement(key), "{key}");
        }
        for key in [
            "/core/events/shop/web.1",
            "/coordination.k8s.io/leases/kube-system/edgesite-control-plane",
            "/cluster.karmada.io/clusters/pop-1",
            "/work.karmada.io/resourcebindings/shop/web-deployment",
            "/core/secrets/kube-system/pop-1.site-password.edgesite",
        ] {
            assert!(!concerns_placement(key), "{key}");
        }
    }

    #[test]
    fn manifests_leave_out_what_the_site_fills_in() {
        let t: DynamicObject = serde_json::from_value(json!({
            "apiVersion": "v1", "kind": "Service",
            "metadata": {"name": "web", "namespace": "shop", "uid": "u", "resourceVersion": "7",
                         "annotations": {"kubectl.kubernetes.io/last-applied-configuration": "{}"}},
            "spec": {"clusterIP": "10.43.0.9", "clusterIPs": ["10.43.0.9"], "ports": [{"port": 80}]},
            "status": {"loadBalancer": {}}
        }))
        .unwrap();
        let r = ApiResource::erase::<k8s_openapi::api::core::v1::Service>(&());
        let m = manifest(&t, &r, &BTreeMap::new());
        assert!(m.get("status").is_none());
        assert!(m["metadata"].get("uid").is_none() && m["metadata"].get("annotations").is_none());
        assert!(m["spec"].get("clusterIP").is_none());
        assert_eq!(m["spec"]["ports"][0]["port"], 80);
    }
}
