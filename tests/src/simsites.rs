//! Simulated sites for the cloud hub's tests and benchmarks: N sites in one process, each
//! speaking the real site side of the link (`cloudhub::site::run`: dial, upgrade, HTTP/2, the
//! cursor, sync batches, the status stream) over its own TLS connection with its own certificate,
//! with an in-memory [`cloudhub::site::Backend`] instead of a whole API server: it holds what the
//! hub placed, reports a site's cluster status, and reports placed Deployments as a site whose
//! pods all became ready would.
//!
//! This lives in the test crate only: the product binary can never start it.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use anyhow::{Context, Result};
use cloudhub::protocol::{ObjectStatus, SyncBatch};
use cloudhub::site::apply::WorkRecord;
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

/// What one simulated site holds and has seen.
#[derive(Default)]
struct State {
    revision: u64,
    works: BTreeMap<String, (WorkRecord, Vec<Value>)>,
    /// `kind/namespace/name` -> when it was first applied.
    first_applied: HashMap<String, Instant>,
    batches: u64,
    full_batches: u64,
    cursor_asks: u64,
}

/// One simulated site.
pub struct SimSite {
    pub name: String,
    state: Mutex<State>,
}

fn key(manifest: &Value) -> String {
    format!(
        "{}/{}/{}",
        manifest["kind"].as_str().unwrap_or_default(),
        manifest["metadata"]["namespace"]
            .as_str()
            .unwrap_or_default(),
        manifest["metadata"]["name"].as_str().unwrap_or_default()
    )
}

/// A site's APIs as a small real site serves them (the shape and size of what a site reports).
fn api_enablements() -> Value {
    let groups: &[(&str, &[(&str, &str)])] = &[
        (
            "v1",
            &[
                ("configmaps", "ConfigMap"),
                ("endpoints", "Endpoints"),
                ("events", "Event"),
                ("namespaces", "Namespace"),
                ("nodes", "Node"),
                ("persistentvolumeclaims", "PersistentVolumeClaim"),
                ("pods", "Pod"),
                ("secrets", "Secret"),
                ("serviceaccounts", "ServiceAccount"),
                ("services", "Service"),
            ],
        ),
        (
            "apps/v1",
            &[
                ("daemonsets", "DaemonSet"),
                ("deployments", "Deployment"),
                ("replicasets", "ReplicaSet"),
                ("statefulsets", "StatefulSet"),
            ],
        ),
        ("batch/v1", &[("cronjobs", "CronJob"), ("jobs", "Job")]),
        (
            "autoscaling/v2",
            &[("horizontalpodautoscalers", "HorizontalPodAutoscaler")],
        ),
        ("networking.k8s.io/v1", &[("ingresses", "Ingress")]),
        (
            "policy/v1",
            &[("poddisruptionbudgets", "PodDisruptionBudget")],
        ),
        (
            "rbac.authorization.k8s.io/v1",
            &[
                ("clusterrolebindings", "ClusterRoleBinding"),
                ("clusterroles", "ClusterRole"),
                ("rolebindings", "RoleBinding"),
                ("roles", "Role"),
            ],
        ),
        (
            "devices.kubeedge.io/v1beta1",
            &[("devicemodels", "DeviceModel"), ("devices", "Device")],
        ),
    ];
    json!(
        groups
            .iter()
            .map(|(gv, resources)| json!({
                "groupVersion": gv,
                "resources": resources.iter().map(|(n, k)| json!({"name": n, "kind": k})).collect::<Vec<_>>(),
            }))
            .collect::<Vec<_>>()
    )
}

#[async_trait::async_trait]
impl cloudhub::site::Backend for SimSite {
    async fn cursor(&self) -> Result<u64, String> {
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        s.cursor_asks += 1;
        Ok(s.revision)
    }

    async fn apply(&self, batch: SyncBatch) -> Result<u64, String> {
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        s.batches += 1;
        if batch.full {
            s.full_batches += 1;
        }
        let mut seen = Vec::new();
        for work in &batch.works {
            let name = work["metadata"]["name"]
                .as_str()
                .unwrap_or_default()
                .to_string();
            let manifests = work["spec"]["workload"]["manifests"]
                .as_array()
                .cloned()
                .unwrap_or_default();
            for m in &manifests {
                s.first_applied.entry(key(m)).or_insert_with(Instant::now);
            }
            let record = WorkRecord {
                binding: work["metadata"]["annotations"]
                    [cloudhub::hub::placement::BINDING_ANNOTATION]
                    .as_str()
                    .unwrap_or_default()
                    .to_string(),
                version: work["metadata"]["resourceVersion"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string(),
                preserve: false,
                objects: Vec::new(),
            };
            seen.push(name.clone());
            s.works.insert(name, (record, manifests));
        }
        for work in &batch.deleted {
            if let Some(name) = work["metadata"]["name"].as_str() {
                s.works.remove(name);
            }
        }
        if batch.full {
            s.works.retain(|k, _| seen.contains(k));
        }
        s.revision = if batch.full {
            batch.revision
        } else {
            s.revision.max(batch.revision)
        };
        Ok(s.revision)
    }

    async fn holdings(&self) -> Result<BTreeMap<String, String>, String> {
        let s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        Ok(s.works
            .iter()
            .map(|(k, (r, _))| (k.clone(), r.version.clone()))
            .collect())
    }

    async fn cluster_status(&self) -> Result<Value, String> {
        Ok(json!({
            "kubernetesVersion": apiserver_lite::http::KUBE_GIT_VERSION,
            "apiEnablements": api_enablements(),
            "nodeSummary": {"totalNum": 1, "readyNum": 1},
            "resourceSummary": {
                "allocatable": {"cpu": "4", "memory": "8589934592", "pods": "110"},
                "allocating": {"cpu": "0", "memory": "0", "pods": "0"},
                "allocated": {"cpu": "0", "memory": "0", "pods": "0"},
            },
        }))
    }

    async fn works(&self) -> BTreeMap<String, WorkRecord> {
        let s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        s.works
            .iter()
            .map(|(k, (r, _))| (k.clone(), r.clone()))
            .collect()
    }

    async fn report(&self, work: &str, _: &WorkRecord) -> Vec<ObjectStatus> {
        let s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let Some((_, manifests)) = s.works.get(work) else {
            return Vec::new();
        };
        manifests
            .iter()
            .map(|m| {
                let kind = m["kind"].as_str().unwrap_or_default().to_string();
                // A Deployment whose pods all became ready; anything else exists.
                let status = if kind == "Deployment" {
                    let r = m["spec"]["replicas"].as_i64().unwrap_or(1);
                    json!({"observedGeneration": 1, "replicas": r, "readyReplicas": r,
                           "updatedReplicas": r, "availableReplicas": r})
                } else {
                    Value::Null
                };
                ObjectStatus {
                    api_version: m["apiVersion"].as_str().unwrap_or_default().to_string(),
                    kind,
                    namespace: m["metadata"]["namespace"]
                        .as_str()
                        .unwrap_or_default()
                        .to_string(),
                    name: m["metadata"]["name"]
                        .as_str()
                        .unwrap_or_default()
                        .to_string(),
                    applied: true,
                    message: String::new(),
                    health: "Healthy".into(),
                    status,
                }
            })
            .collect()
    }

    fn serve_api(&self, _: ::link::pipe::BodyIo<axum::body::Body>) -> bool {
        false
    }
}

/// Counters of one simulated site.
#[derive(Debug, Clone, Copy, Default)]
pub struct Counts {
    pub batches: u64,
    pub full_batches: u64,
    pub cursor_asks: u64,
}

/// N simulated sites attached to one hub.
pub struct SimSites {
    pub sites: Vec<Arc<SimSite>>,
    shutdown: CancellationToken,
}

impl Drop for SimSites {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// A client certificate for `system:site:<name>`, signed with the hub's CA (as the hub signs
/// a site's at its join).
fn site_certificate(ca_cert: &str, ca_key: &str, name: &str) -> Result<(String, String)> {
    use rcgen::{
        CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, Issuer, KeyPair,
    };
    let issuer = Issuer::from_ca_cert_pem(ca_cert, KeyPair::from_pem(ca_key)?)?;
    let key = KeyPair::generate()?;
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, format!("system:site:{name}"));
    dn.push(DnType::OrganizationName, "edgesite:sites");
    params.distinguished_name = dn;
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    let cert = params.signed_by(&key, &issuer)?;
    Ok((cert.pem(), key.serialize_pem()))
}

impl SimSites {
    /// Attaches `count` sites named `<prefix><i>` with `labels` to the hub at `hub` whose data
    /// dir is `hub_data` (its CA signs their certificates). Call inside a tokio runtime.
    pub fn start(
        hub: &str,
        hub_data: &std::path::Path,
        count: usize,
        prefix: &str,
        labels: &BTreeMap<String, String>,
    ) -> Result<SimSites> {
        let tls = hub_data.join("server").join("tls");
        let ca = std::fs::read_to_string(tls.join("ca.crt")).context("the hub's CA")?;
        let ca_key = std::fs::read_to_string(tls.join("ca.key")).context("the hub's CA key")?;
        let shutdown = CancellationToken::new();
        let mut sites = Vec::new();
        for i in 0..count {
            let name = format!("{prefix}{i}");
            let (cert, key) = site_certificate(&ca, &ca_key, &name)?;
            let site = Arc::new(SimSite {
                name: name.clone(),
                state: Mutex::default(),
            });
            let config = cloudhub::site::SiteConfig {
                hub: hub.to_string(),
                name,
                labels: labels.clone(),
                ca_pem: ca.clone(),
                cert_pem: cert,
                key_pem: key,
                servers_file: None,
            };
            tokio::spawn(cloudhub::site::run(config, site.clone(), shutdown.clone()));
            sites.push(site);
        }
        Ok(SimSites { sites, shutdown })
    }

    /// When each site first applied `kind/namespace/name` (None: not yet).
    pub fn first_applied(&self, key: &str) -> Vec<Option<Instant>> {
        self.sites
            .iter()
            .map(|s| {
                s.state
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .first_applied
                    .get(key)
                    .copied()
            })
            .collect()
    }

    pub fn counts(&self) -> Vec<Counts> {
        self.sites
            .iter()
            .map(|s| {
                let st = s.state.lock().unwrap_or_else(|e| e.into_inner());
                Counts {
                    batches: st.batches,
                    full_batches: st.full_batches,
                    cursor_asks: st.cursor_asks,
                }
            })
            .collect()
    }
}
