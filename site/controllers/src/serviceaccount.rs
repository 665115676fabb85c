//! The ServiceAccount controller: every namespace that is not being deleted has a `default`
//! ServiceAccount (re-created if deleted), as pods without `serviceAccountName` use it.

use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::{Namespace, ServiceAccount};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::{Api, PostParams};
use kube::runtime::controller::Action;
use kube::runtime::reflector::{ObjectRef, Store};
use tokio_util::sync::CancellationToken;

use crate::informer::{Change, Informers};
use crate::runner::{self, Loop};

pub const DEFAULT: &str = "default";

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("create the default service account: {0}")]
    Create(#[source] kube::Error),
}

pub struct Context {
    client: kube::Client,
    accounts: Store<ServiceAccount>,
}

/// Subscribes to the informers now; the returned future runs the loop.
pub fn controller(
    informers: &Informers,
    shutdown: CancellationToken,
) -> impl Future<Output = ()> + Send + 'static {
    let namespaces = informers.namespaces();
    let accounts = informers.service_accounts();
    let context = Arc::new(Context {
        client: informers.client(),
        accounts: accounts.store(),
    });
    let own = runner::own_changes(namespaces.subscribe(64));
    let deleted = runner::triggers(
        accounts.subscribe(256),
        |c: &Change<ServiceAccount>| match c {
            Change::Deleted(sa) if sa.metadata.name.as_deref() == Some(DEFAULT) => sa
                .metadata
                .namespace
                .iter()
                .map(|ns| ObjectRef::<Namespace>::new(ns))
                .collect(),
            _ => vec![],
        },
    );
    let ready = futures::future::join(namespaces.synced(), accounts.synced());
    runner::run(
        Loop {
            name: "serviceaccount",
            concurrency: 2,
        },
        namespaces.store(),
        ready,
        vec![own, deleted],
        reconcile,
        context,
        shutdown,
    )
}

async fn reconcile(ns: Arc<Namespace>, ctx: Arc<Context>) -> Result<Action, Error> {
    let name = ns.metadata.name.clone().unwrap_or_default();
    let terminating = ns.metadata.deletion_timestamp.is_some()
        || ns.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Terminating");
    if terminating
        || ctx
            .accounts
            .get(&ObjectRef::new(DEFAULT).within(&name))
            .is_some()
    {
        return Ok(Action::await_change());
    }
    let api: Api<ServiceAccount> = Api::namespaced(ctx.client.clone(), &name);
    let sa = ServiceAccount {
        metadata: ObjectMeta {
            name: Some(DEFAULT.into()),
            namespace: Some(name.clone()),
            ..Default::default()
        },
        ..Default::default()
    };
    match api.create(&PostParams::default(), &sa).await {
        Ok(_) => Ok(Action::await_change()),
        // Exists (the cache was behind) or the namespace is going away.
        Err(kube::Error::Api(s)) if s.code == 409 || s.code == 403 || s.code == 404 => {
            Ok(Action::requeue(Duration::from_secs(30)))
        }
        Err(e) => Err(Error::Create(e)),
    }
}
