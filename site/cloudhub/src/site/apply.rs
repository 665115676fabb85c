//! The site applies what the hub places: each Work's manifests go through the site's own API
//! with server-side apply under one field manager, so applying the same Work again changes
//! nothing and restarts nothing. The site remembers, in one ConfigMap
//! (`kube-system/edgesite-cloud-link`), its cursor (the hub revision it has applied up to) and
//! which objects each Work placed, so a deleted Work's objects go, and, after a full resync,
//! whatever the hub no longer wants. Objects the hub did not place are never touched; objects it
//! placed that someone changed or deleted at the site are put back (with an Event saying why).

use std::collections::{BTreeMap, HashMap};

use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::{Api, DeleteParams, DynamicObject, Patch, PatchParams, PostParams};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::protocol::{ObjectStatus, SyncBatch};

/// The field manager of everything the hub places.
pub const MANAGER: &str = "edgesite-cloudhub";
/// Where the site keeps its cursor and what each Work placed.
pub const LEDGER_NAMESPACE: &str = "kube-system";
pub const LEDGER_NAME: &str = "edgesite-cloud-link";
/// Karmada's label on what it placed in a member cluster.
const MANAGED_LABEL: &str = "karmada.io/managed";
const WORK_ANNOTATION: &str = "work.karmada.io/name";

/// One object a Work placed.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ObjectRef {
    pub api_version: String,
    pub kind: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub namespace: String,
    pub name: String,
}

impl ObjectRef {
    fn of(manifest: &Value) -> ObjectRef {
        ObjectRef {
            api_version: manifest["apiVersion"].as_str().unwrap_or_default().into(),
            kind: manifest["kind"].as_str().unwrap_or_default().into(),
            namespace: manifest["metadata"]["namespace"]
                .as_str()
                .unwrap_or_default()
                .into(),
            name: manifest["metadata"]["name"]
                .as_str()
                .unwrap_or_default()
                .into(),
        }
    }
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct WorkRecord {
    pub binding: String,
    /// The Work's resourceVersion at the hub when it was applied here.
    #[serde(default)]
    pub version: String,
    #[serde(default)]
    pub preserve: bool,
    pub objects: Vec<ObjectRef>,
}

/// What applying one object said: the object, whether it was applied, why not.
pub type Applied = (ObjectRef, bool, String);

/// The cursor and what each Work placed.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Ledger {
    pub revision: u64,
    pub works: BTreeMap<String, WorkRecord>,
}

/// The site's applier: the ledger, and what applying each object last said.
pub struct Applier {
    client: kube::Client,
    ledger: tokio::sync::Mutex<Option<Ledger>>,
    /// Each Work's manifests as last received (in memory: a site that restarted asks the hub
    /// for all its Works once, see [`Applier::cursor`]).
    manifests: std::sync::Mutex<HashMap<String, Vec<Value>>>,
    /// The resourceVersion each placed object had after the site last applied it: another
    /// version means someone changed it (or its status moved), and it is applied again.
    versions: std::sync::Mutex<HashMap<ObjectRef, String>>,
    /// Work -> per object: applied, message.
    pub results: std::sync::Mutex<HashMap<String, Vec<Applied>>>,
    resources: crate::resources::Resolver,
}

fn ledger_api(client: &kube::Client) -> Api<ConfigMap> {
    Api::namespaced(client.clone(), LEDGER_NAMESPACE)
}

impl Applier {
    pub fn new(client: kube::Client) -> Applier {
        Applier {
            client: client.clone(),
            ledger: Default::default(),
            manifests: Default::default(),
            versions: Default::default(),
            results: Default::default(),
            resources: crate::resources::Resolver::new(client.clone()),
        }
    }

    async fn load(&self) -> Result<Ledger, kube::Error> {
        let found = ledger_api(&self.client).get_opt(LEDGER_NAME).await?;
        Ok(found
            .and_then(|cm| cm.data)
            .and_then(|d| d.get("ledger").cloned())
            .and_then(|text| serde_json::from_str(&text).ok())
            .unwrap_or_default())
    }

    async fn save(&self, ledger: &Ledger) -> Result<(), kube::Error> {
        let cm = json!({
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": {"name": LEDGER_NAME, "namespace": LEDGER_NAMESPACE},
            "data": {"ledger": serde_json::to_string(ledger).unwrap_or_default()},
        });
        ledger_api(&self.client)
            .patch(
                LEDGER_NAME,
                &PatchParams::apply(MANAGER).force(),
                &Patch::Apply(&cm),
            )
            .await
            .map(|_| ())
    }

    /// The cursor: the hub revision everything up to which is applied here. A site that holds
    /// Works but not their manifests (it restarted) answers 0, so the hub sends all its Works
    /// once and placed objects can be kept as the hub wants them again.
    pub async fn cursor(&self) -> Result<u64, kube::Error> {
        let mut guard = self.ledger.lock().await;
        if guard.is_none() {
            *guard = Some(self.load().await?);
        }
        let ledger = guard.as_ref().cloned().unwrap_or_default();
        let known = self
            .manifests
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .len();
        if known < ledger.works.len() {
            return Ok(0);
        }
        Ok(ledger.revision)
    }

    /// Each Work held here and the version applied.
    pub async fn holdings(&self) -> Result<BTreeMap<String, String>, kube::Error> {
        let mut guard = self.ledger.lock().await;
        if guard.is_none() {
            *guard = Some(self.load().await?);
        }
        Ok(guard
            .as_ref()
            .map(|l| {
                l.works
                    .iter()
                    .map(|(k, r)| (k.clone(), r.version.clone()))
                    .collect()
            })
            .unwrap_or_default())
    }

    /// The Works this site holds and their objects (for the status reports).
    pub async fn works(&self) -> BTreeMap<String, WorkRecord> {
        self.ledger
            .lock()
            .await
            .as_ref()
            .map(|l| l.works.clone())
            .unwrap_or_default()
    }

    /// The API resource of `api_version`/`kind` at the site, and whether it is namespaced.
    pub async fn resource(
        &self,
        api_version: &str,
        kind: &str,
    ) -> Result<crate::resources::Resolved, kube::Error> {
        self.resources.resolve(api_version, kind).await
    }

    pub async fn api_for(&self, object: &ObjectRef) -> Result<Api<DynamicObject>, kube::Error> {
        let (resource, namespaced) = self.resource(&object.api_version, &object.kind).await?;
        Ok(if namespaced {
            Api::namespaced_with(self.client.clone(), &object.namespace, &resource)
        } else {
            Api::all_with(self.client.clone(), &resource)
        })
    }

    async fn ensure_namespace(&self, namespace: &str) -> Result<(), kube::Error> {
        if namespace.is_empty() {
            return Ok(());
        }
        let api: Api<k8s_openapi::api::core::v1::Namespace> = Api::all(self.client.clone());
        if api.get_opt(namespace).await?.is_some() {
            return Ok(());
        }
        let ns = json!({"apiVersion": "v1", "kind": "Namespace",
            "metadata": {"name": namespace, "labels": {MANAGED_LABEL: "true"}}});
        match api
            .create(
                &PostParams::default(),
                &serde_json::from_value(ns).map_err(kube::Error::SerdeError)?,
            )
            .await
        {
            Ok(_) => Ok(()),
            Err(kube::Error::Api(e)) if e.code == 409 => Ok(()),
            Err(e) => Err(e),
        }
    }

    async fn apply_one(&self, work: &str, manifest: &Value) -> Result<(), kube::Error> {
        let object = ObjectRef::of(manifest);
        let (_, namespaced) = self.resource(&object.api_version, &object.kind).await?;
        if namespaced {
            self.ensure_namespace(&object.namespace).await?;
        }
        let mut manifest = manifest.clone();
        manifest["metadata"]["labels"][MANAGED_LABEL] = json!("true");
        manifest["metadata"]["annotations"][WORK_ANNOTATION] = json!(work);
        let api = self.api_for(&object).await?;
        let applied = api
            .patch(
                &object.name,
                &PatchParams::apply(MANAGER).force(),
                &Patch::Apply(&manifest),
            )
            .await?;
        if let Some(version) = applied.metadata.resource_version {
            self.versions
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .insert(object, version);
        }
        Ok(())
    }

    /// Puts a placed object back as the hub wants it when it is gone or was changed at the
    /// site, with an Event saying why. `found` is the object as it is now.
    async fn keep(&self, work: &str, object: &ObjectRef, found: Option<&DynamicObject>) {
        let recorded = self
            .versions
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(object)
            .cloned();
        let current = found.and_then(|f| f.metadata.resource_version.clone());
        if found.is_some() && (recorded.is_none() || recorded == current) {
            if recorded.is_none()
                && let Some(v) = current
            {
                self.versions
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .insert(object.clone(), v);
            }
            return;
        }
        let manifest = self
            .manifests
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(work)
            .and_then(|m| m.iter().find(|m| ObjectRef::of(m) == *object).cloned());
        let Some(manifest) = manifest else { return };
        if let Err(error) = self.apply_one(work, &manifest).await {
            tracing::warn!(kind = %object.kind, name = %object.name, %error, "could not restore what the hub places");
            return;
        }
        let after = self
            .versions
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(object)
            .cloned();
        // The same version after applying: only the status (or fields the hub does not set)
        // moved, nothing to undo.
        if found.is_some() && after == current {
            return;
        }
        let why = if found.is_none() {
            "it was deleted here"
        } else {
            "it was changed here"
        };
        tracing::info!(kind = %object.kind, namespace = %object.namespace, name = %object.name, "restored what the hub places: {why}");
        self.event(
            object,
            "Restored",
            &format!(
                "the cloud hub places this object (Work {work}) and {why}: it was put back as the hub wants it; change it at the hub"
            ),
        )
        .await;
    }

    async fn event(&self, object: &ObjectRef, reason: &str, message: &str) {
        let namespace = if object.namespace.is_empty() {
            "default"
        } else {
            &object.namespace
        };
        let now = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
        let event = json!({
            "apiVersion": "v1",
            "kind": "Event",
            "metadata": {"generateName": format!("{}.", object.name), "namespace": namespace},
            "involvedObject": {
                "apiVersion": object.api_version,
                "kind": object.kind,
                "namespace": object.namespace,
                "name": object.name,
            },
            "reason": reason,
            "message": message,
            "type": "Warning",
            "source": {"component": "edgesite-cloud-link"},
            "firstTimestamp": now,
            "lastTimestamp": now,
            "count": 1,
        });
        let api: Api<k8s_openapi::api::core::v1::Event> =
            Api::namespaced(self.client.clone(), namespace);
        if let Ok(event) = serde_json::from_value(event)
            && let Err(error) = api.create(&PostParams::default(), &event).await
        {
            tracing::debug!(%error, "event not recorded");
        }
    }

    async fn delete_one(&self, object: &ObjectRef) {
        let result = match self.api_for(object).await {
            Ok(api) => api
                .delete(&object.name, &DeleteParams::background())
                .await
                .map(|_| ()),
            Err(e) => Err(e),
        };
        match result {
            Ok(()) => {
                tracing::info!(kind = %object.kind, namespace = %object.namespace, name = %object.name, "removed: the hub no longer places it")
            }
            Err(kube::Error::Api(e)) if e.code == 404 => {}
            Err(error) => {
                tracing::warn!(kind = %object.kind, name = %object.name, %error, "could not remove what the hub no longer places")
            }
        }
    }

    /// Applies one batch; answers the cursor recorded. Failures of single objects are results
    /// (reported to the hub), not errors: the batch is still acknowledged, and the hub sends the
    /// Work again when it changes.
    pub async fn apply(&self, batch: SyncBatch) -> Result<u64, kube::Error> {
        let mut guard = self.ledger.lock().await;
        if guard.is_none() {
            *guard = Some(self.load().await?);
        }
        let mut ledger = guard.clone().unwrap_or_default();
        let mut seen: Vec<String> = Vec::new();
        // Namespaces and definitions first, so what lives in them can be applied next.
        let mut works = batch.works.clone();
        works.sort_by_key(|w| {
            let kind = w["spec"]["workload"]["manifests"][0]["kind"]
                .as_str()
                .unwrap_or_default();
            match kind {
                "Namespace" => 0,
                "CustomResourceDefinition" => 1,
                "ServiceAccount" | "ConfigMap" | "Secret" | "PersistentVolumeClaim" => 2,
                _ => 3,
            }
        });
        for work in &works {
            let name = work["metadata"]["name"]
                .as_str()
                .unwrap_or_default()
                .to_string();
            seen.push(name.clone());
            let binding = work["metadata"]["annotations"]
                [crate::hub::placement::BINDING_ANNOTATION]
                .as_str()
                .unwrap_or_default()
                .to_string();
            let manifests = work["spec"]["workload"]["manifests"]
                .as_array()
                .cloned()
                .unwrap_or_default();
            // Known before applying, so the drift check never puts back an older version.
            self.manifests
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .insert(name.clone(), manifests.clone());
            let mut results = Vec::new();
            for manifest in &manifests {
                let object = ObjectRef::of(manifest);
                match self.apply_one(&name, manifest).await {
                    Ok(()) => results.push((object, true, String::new())),
                    Err(error) => {
                        tracing::warn!(work = %name, kind = %object.kind, name = %object.name, %error, "could not apply what the hub places");
                        results.push((object, false, error.to_string()));
                    }
                }
            }
            let objects: Vec<ObjectRef> = results.iter().map(|(o, _, _)| o.clone()).collect();
            if let Some(before) = ledger.works.get(&name) {
                for old in &before.objects {
                    if !objects.contains(old) {
                        self.delete_one(old).await;
                    }
                }
            }
            self.results
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .insert(name.clone(), results);
            ledger.works.insert(
                name,
                WorkRecord {
                    binding,
                    version: work["metadata"]["resourceVersion"]
                        .as_str()
                        .unwrap_or_default()
                        .to_string(),
                    preserve: work["spec"]["preserveResourcesOnDeletion"] == json!(true),
                    objects,
                },
            );
        }
        let mut removed: Vec<String> = batch
            .deleted
            .iter()
            .filter_map(|w| w["metadata"]["name"].as_str().map(str::to_string))
            .collect();
        if batch.full {
            removed.extend(ledger.works.keys().filter(|k| !seen.contains(k)).cloned());
        }
        for name in removed {
            if let Some(record) = ledger.works.remove(&name) {
                if !record.preserve {
                    for object in &record.objects {
                        self.delete_one(object).await;
                    }
                }
                self.results
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .remove(&name);
                self.manifests
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .remove(&name);
            }
        }
        ledger.revision = ledger.revision.max(batch.revision);
        if batch.full {
            ledger.revision = batch.revision;
        }
        self.save(&ledger).await?;
        let revision = ledger.revision;
        *guard = Some(ledger);
        Ok(revision)
    }

    /// What the site holds of `work`: each object's status and health.
    pub async fn report(&self, work: &str, record: &WorkRecord) -> Vec<ObjectStatus> {
        let results = self
            .results
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(work)
            .cloned()
            .unwrap_or_default();
        let mut out = Vec::new();
        for object in &record.objects {
            let (applied, message) = results
                .iter()
                .find(|(o, _, _)| o == object)
                .map(|(_, a, m)| (*a, m.clone()))
                .unwrap_or((true, String::new()));
            let found = match self.api_for(object).await {
                Ok(api) => match api.get_opt(&object.name).await {
                    Ok(found) => {
                        if applied {
                            self.keep(work, object, found.as_ref()).await;
                        }
                        found
                    }
                    Err(_) => None,
                },
                Err(_) => None,
            };
            let (status, health) = match &found {
                Some(o) => (o.data["status"].clone(), health(&object.kind, o)),
                None => (Value::Null, "Unknown".to_string()),
            };
            out.push(ObjectStatus {
                api_version: object.api_version.clone(),
                kind: object.kind.clone(),
                namespace: object.namespace.clone(),
                name: object.name.clone(),
                applied: applied && found.is_some(),
                message: if found.is_none() && applied {
                    "not found at the site".into()
                } else {
                    message
                },
                health,
                status,
            });
        }
        out
    }
}

/// Karmada's default health interpretation for the built-in kinds; anything else that exists is
/// Healthy.
pub fn health(kind: &str, object: &DynamicObject) -> String {
    let spec = &object.data["spec"];
    let status = &object.data["status"];
    let n = |v: &Value| v.as_i64().unwrap_or(0);
    let observed = n(&status["observedGeneration"]) >= object.metadata.generation.unwrap_or(0);
    let healthy = match kind {
        "Deployment" | "StatefulSet" | "ReplicaSet" => {
            let want = spec["replicas"].as_i64().unwrap_or(1);
            let available = if kind == "StatefulSet" {
                n(&status["readyReplicas"])
            } else {
                n(&status["availableReplicas"])
            };
            observed
                && available >= want
                && (kind == "ReplicaSet" || n(&status["updatedReplicas"]) >= want)
        }
        "DaemonSet" => {
            observed
                && n(&status["updatedNumberScheduled"]) >= n(&status["desiredNumberScheduled"])
                && n(&status["numberAvailable"]) >= n(&status["desiredNumberScheduled"])
        }
        "Job" => n(&status["failed"]) == 0 || status["completionTime"].is_string(),
        "Pod" => matches!(status["phase"].as_str(), Some("Running" | "Succeeded")),
        "PersistentVolumeClaim" => status["phase"] == "Bound",
        _ => true,
    };
    if healthy { "Healthy" } else { "Unhealthy" }.to_string()
}
