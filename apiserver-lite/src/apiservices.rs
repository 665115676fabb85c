//! `apiregistration.k8s.io/v1` APIServices: one per group version the server serves, as
//! kube-aggregator's autoregister and crdregistration controllers keep them upstream (clients
//! such as kube-rs and `kubectl get apiservices` read them). All are local (`spec.service` unset)
//! and Available; built-in ones are labelled `onstart`, those of custom resources `true`, and
//! those of a group version no longer served are removed. Objects a user made without that label
//! are left alone.

use std::collections::BTreeMap;
use std::sync::Arc;

use serde_json::{Value, json};

use crate::http::ApiServer;
use crate::http::resources::{create_internal, delete_internal};
use crate::storage::list_prefix;

const GROUP: &str = "apiregistration.k8s.io";
const AUTOMANAGED: &str = "kube-aggregator.kubernetes.io/automanaged";

/// `v1.` for the core group, `v1.apps` for others.
pub fn name(group: &str, version: &str) -> String {
    format!("{version}.{group}")
}

/// The APIServices the registry's group versions call for: name -> object.
fn wanted(server: &ApiServer) -> BTreeMap<String, Value> {
    let custom: Vec<String> = server
        .registry
        .all()
        .iter()
        .filter(|r| r.custom.is_some())
        .map(|r| r.group.clone())
        .collect();
    let mut out = BTreeMap::new();
    for (rank, (group, versions)) in server.registry.groups().into_iter().enumerate() {
        let is_custom = custom.contains(&group);
        for (i, version) in versions.iter().enumerate() {
            // Upstream's order: built-in groups from 18000 down, custom ones at 1000; the
            // preferred (first) version highest.
            let (group_priority, version_priority) = if is_custom {
                (1000, 100 - i as i64)
            } else {
                (18000 - 100 * rank as i64, 15 - i as i64)
            };
            let name = name(&group, version);
            out.insert(
                name.clone(),
                json!({
                    "apiVersion": "apiregistration.k8s.io/v1", "kind": "APIService",
                    "metadata": {"name": name, "labels": {AUTOMANAGED: if is_custom { "true" } else { "onstart" }}},
                    "spec": {"group": group, "version": version,
                             "groupPriorityMinimum": group_priority, "versionPriority": version_priority},
                }),
            );
        }
    }
    out
}

/// [`sync`] on its own task: after a CRD write, whose path [`sync`]'s own writes take again.
pub fn sync_soon(server: Arc<ApiServer>) {
    let task: std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>> =
        Box::pin(async move { sync(&server).await });
    tokio::spawn(task);
}

/// Creates the APIServices of served group versions that have none, marks them Available, and
/// removes the automanaged ones whose group version is no longer served.
pub async fn sync(server: &Arc<ApiServer>) {
    let wanted = wanted(server);
    let existing = match server
        .storage
        .list(&list_prefix(GROUP, "apiservices", ""), None, None)
        .await
    {
        Ok(listing) => listing
            .items
            .iter()
            .filter_map(|i| i.value().ok())
            .collect::<Vec<Value>>(),
        Err(e) => {
            tracing::warn!("APIServices not listed: {e}");
            return;
        }
    };
    let name_of = |o: &Value| {
        o.pointer("/metadata/name")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_string()
    };
    for old in &existing {
        let name = name_of(old);
        let managed = old
            .pointer(&format!(
                "/metadata/labels/{}",
                AUTOMANAGED.replace('/', "~1")
            ))
            .is_some();
        if managed
            && !wanted.contains_key(&name)
            && let Err(e) = delete_internal(server, GROUP, "v1", "apiservices", "", &name).await
        {
            tracing::warn!("APIService {name} not removed: {}", e.message);
        }
    }
    for (name, object) in wanted {
        if existing.iter().any(|o| name_of(o) == name) {
            continue;
        }
        if let Err(e) = create_internal(server, GROUP, "v1", "apiservices", "", object).await
            && e.code != 409
        {
            tracing::warn!("APIService {name} not created: {}", e.message);
            continue;
        }
        // Local group versions are always available (a status written by the server itself).
        let key = crate::storage::object_key(GROUP, "apiservices", "", &name);
        if let Ok(Some(stored)) = server.storage.get(&key).await {
            let mut object = (*stored.object).clone();
            let now = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
            object["status"] = json!({"conditions": [{
                "type": "Available", "status": "True", "lastTransitionTime": now,
                "reason": "Local", "message": "Local APIServices are always available",
            }]});
            if let Err(e) = server
                .storage
                .update(&key, object, Some(stored.revision))
                .await
            {
                tracing::warn!("APIService {name} status not written: {e}");
            }
        }
    }
}
