//! The site applies what the hub places: each Work's manifests go through the site's own API
//! with server-side apply under one field manager, so applying the same Work again changes
//! nothing and restarts nothing. The site remembers, in one ConfigMap
//! (`kube-system/edgesite-cloud-link`), its cursor (the hub revision it has applied up to) and
//! which objects each Work placed, so a deleted Work's objects go, and, after a full resync,
//! whatever the hub no longer wants. Objects the hub did not place are never touched.

use std::collections::{BTreeMap, HashMap};

use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::{Api, ApiResource, DeleteParams, DynamicObject, Patch, PatchParams, PostParams};
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
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
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
    /// Work -> per object: applied, message.
    pub results: std::sync::Mutex<HashMap<String, Vec<Applied>>>,
    resources: std::sync::Mutex<HashMap<(String, String), (ApiResource, bool)>>,
}

fn ledger_api(client: &kube::Client) -> Api<ConfigMap> {
    Api::namespaced(client.clone(), LEDGER_NAMESPACE)
}

impl Applier {
    pub fn new(client: kube::Client) -> Applier {
        Applier {
            client,
            ledger: Default::default(),
            results: Default::default(),
            resources: Default::default(),
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

    /// The cursor: the hub revision everything up to which is applied here.
    pub async fn cursor(&self) -> Result<u64, kube::Error> {
        let mut guard = self.ledger.lock().await;
        if guard.is_none() {
            *guard = Some(self.load().await?);
        }
        Ok(guard.as_ref().map(|l| l.revision).unwrap_or(0))
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
    ) -> Result<(ApiResource, bool), kube::Error> {
        let key = (api_version.to_string(), kind.to_string());
        if let Some(found) = self
            .resources
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&key)
        {
            return Ok(found.clone());
        }
        let (group, version) = match api_version.split_once('/') {
            Some((g, v)) => (g, v),
            None => ("", api_version),
        };
        let gvk = kube::api::GroupVersionKind::gvk(group, version, kind);
        let (resource, caps) = kube::discovery::pinned_kind(&self.client, &gvk).await?;
        let found = (resource, caps.scope == kube::discovery::Scope::Namespaced);
        self.resources
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(key, found.clone());
        Ok(found)
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
        api.patch(
            &object.name,
            &PatchParams::apply(MANAGER).force(),
            &Patch::Apply(&manifest),
        )
        .await
        .map(|_| ())
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
                Ok(api) => api.get_opt(&object.name).await.ok().flatten(),
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
