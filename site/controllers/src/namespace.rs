//! The namespace controller: a namespace being deleted (deletionTimestamp set, `kubernetes` in
//! `spec.finalizers`) has every namespaced object in it deleted; once nothing is left, the
//! `kubernetes` finalizer is removed through `namespaces/<name>/finalize` and the API server
//! deletes the namespace.
//!
//! Pods bound to a node that does not exist are deleted at once, as upstream's pod garbage
//! collector would: nothing will ever confirm their graceful termination.

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1::{Namespace, Node, Pod};
use kube::api::{Api, DeleteParams, DynamicObject, ListParams, PostParams};
use kube::discovery::{ApiResource, Discovery, verbs};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::watcher;
use tokio_util::sync::CancellationToken;

/// The finalizer the API server puts on every namespace.
pub const FINALIZER: &str = "kubernetes";

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("discover API resources: {0}")]
    Discovery(#[source] kube::Error),
    #[error("delete {resource} in namespace {namespace}: {source}")]
    Delete {
        resource: String,
        namespace: String,
        #[source]
        source: kube::Error,
    },
    #[error("finalize namespace {namespace}: {source}")]
    Finalize {
        namespace: String,
        #[source]
        source: kube::Error,
    },
}

fn not_found(e: &kube::Error) -> bool {
    matches!(e, kube::Error::Api(status) if status.code == 404)
}

struct Context {
    client: kube::Client,
}

/// Runs the controller until `shutdown`.
pub async fn run(client: kube::Client, shutdown: CancellationToken) {
    let namespaces: Api<Namespace> = Api::all(client.clone());
    let context = Arc::new(Context { client });
    Controller::new(namespaces, watcher::Config::default())
        // Bound everything: at most four namespaces are emptied at once.
        .with_config(kube::runtime::controller::Config::default().concurrency(4))
        .graceful_shutdown_on(async move { shutdown.cancelled().await })
        .run(reconcile, error_policy, context)
        .for_each(|result| async move {
            if let Err(e) = result {
                tracing::debug!(error = %e, "namespace reconcile");
            }
        })
        .await;
}

fn error_policy(ns: Arc<Namespace>, error: &Error, _: Arc<Context>) -> Action {
    tracing::warn!(namespace = ns.metadata.name.as_deref().unwrap_or(""), error = %error, "cannot finish deleting a namespace yet");
    Action::requeue(Duration::from_secs(5))
}

/// Namespaced resources that can be listed and deleted.
async fn namespaced_resources(client: &kube::Client) -> Result<Vec<(ApiResource, bool)>, Error> {
    let discovery = Discovery::new(client.clone())
        .run()
        .await
        .map_err(Error::Discovery)?;
    let mut out = Vec::new();
    for group in discovery.groups() {
        for (resource, caps) in group.recommended_resources() {
            if caps.scope == kube::discovery::Scope::Namespaced
                && caps.supports_operation(verbs::LIST)
                && caps.supports_operation(verbs::DELETE)
            {
                let collection = caps.supports_operation(verbs::DELETE_COLLECTION);
                out.push((resource, collection));
            }
        }
    }
    Ok(out)
}

async fn reconcile(ns: Arc<Namespace>, ctx: Arc<Context>) -> Result<Action, Error> {
    let name = ns.metadata.name.clone().unwrap_or_default();
    let deleting = ns.metadata.deletion_timestamp.is_some();
    let ours = ns
        .spec
        .as_ref()
        .and_then(|s| s.finalizers.as_ref())
        .is_some_and(|f| f.iter().any(|f| f == FINALIZER));
    if !deleting || !ours {
        return Ok(Action::await_change());
    }
    let mut remaining = 0usize;
    for (resource, collection) in namespaced_resources(&ctx.client).await? {
        let api: Api<DynamicObject> = Api::namespaced_with(ctx.client.clone(), &name, &resource);
        let delete_error = |source| Error::Delete {
            resource: resource.plural.clone(),
            namespace: name.clone(),
            source,
        };
        let listed = api
            .list(&ListParams::default())
            .await
            .map_err(delete_error)?;
        if listed.items.is_empty() {
            continue;
        }
        if collection {
            api.delete_collection(&DeleteParams::background(), &ListParams::default())
                .await
                .map_err(delete_error)?;
        } else {
            for item in &listed.items {
                let item_name = item.metadata.name.clone().unwrap_or_default();
                match api.delete(&item_name, &DeleteParams::background()).await {
                    Ok(_) => {}
                    Err(e) if not_found(&e) => {}
                    Err(e) => return Err(delete_error(e)),
                }
            }
        }
        let left = api
            .list(&ListParams::default())
            .await
            .map_err(delete_error)?;
        if resource.plural == "pods" && resource.group.is_empty() {
            remaining += force_orphaned_pods(&ctx.client, &name).await?;
        } else {
            remaining += left.items.len();
        }
    }
    if remaining > 0 {
        // Finalizers or graceful terminations still running: look again soon.
        return Ok(Action::requeue(Duration::from_secs(2)));
    }
    let mut finalized = (*ns).clone();
    if let Some(spec) = finalized.spec.as_mut() {
        spec.finalizers = Some(
            spec.finalizers
                .take()
                .unwrap_or_default()
                .into_iter()
                .filter(|f| f != FINALIZER)
                .collect(),
        );
    }
    let namespaces: Api<Namespace> = Api::all(ctx.client.clone());
    match namespaces
        .replace_subresource("finalize", &name, &PostParams::default(), &finalized)
        .await
    {
        Ok(_) => {}
        Err(e) if not_found(&e) => {}
        Err(source) => {
            return Err(Error::Finalize {
                namespace: name,
                source,
            });
        }
    }
    tracing::info!(namespace = %name, "namespace deleted");
    Ok(Action::await_change())
}

/// Deletes at once the pods of `namespace` bound to nodes that do not exist (nothing will ever
/// confirm their termination) and returns how many pods are still there.
async fn force_orphaned_pods(client: &kube::Client, namespace: &str) -> Result<usize, Error> {
    let pods: Api<Pod> = Api::namespaced(client.clone(), namespace);
    let nodes: Api<Node> = Api::all(client.clone());
    let error = |source| Error::Delete {
        resource: "pods".into(),
        namespace: namespace.to_string(),
        source,
    };
    let mut left = 0;
    for pod in pods
        .list(&ListParams::default())
        .await
        .map_err(error)?
        .items
    {
        let pod_name = pod.metadata.name.clone().unwrap_or_default();
        let node = pod
            .spec
            .as_ref()
            .and_then(|s| s.node_name.clone())
            .unwrap_or_default();
        let node_exists = !node.is_empty() && nodes.get_opt(&node).await.map_err(error)?.is_some();
        if node_exists {
            left += 1;
            continue;
        }
        match pods
            .delete(&pod_name, &DeleteParams::default().grace_period(0))
            .await
        {
            Ok(_) => {}
            Err(e) if not_found(&e) => {}
            Err(e) => return Err(error(e)),
        }
    }
    Ok(left)
}
