//! Running a loop on shared informers: kube-runtime's `applier` (per-object exclusivity,
//! debounce, requeue, bounded concurrency) fed by informer subscriptions mapped to the objects
//! they concern.

use std::convert::Infallible;
use std::fmt::Debug;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use futures::stream::{self, BoxStream, StreamExt};
use kube::Resource;
use kube::runtime::controller::{self, Action, applier};
use kube::runtime::reflector::{ObjectRef, Store};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::informer::Change;

/// A stream of objects to reconcile.
pub type Triggers<K> = BoxStream<'static, ObjectRef<K>>;

/// Maps each change from `rx` to the objects of kind `K` it concerns.
pub fn triggers<X, K, F>(rx: mpsc::Receiver<Change<X>>, map: F) -> Triggers<K>
where
    X: Send + Sync + 'static,
    K: Resource<DynamicType = ()> + 'static,
    F: Fn(&Change<X>) -> Vec<ObjectRef<K>> + Send + 'static,
{
    stream::unfold((rx, map), |(mut rx, map)| async move {
        let change = rx.recv().await?;
        let refs = map(&change);
        Some((stream::iter(refs), (rx, map)))
    })
    .flatten()
    .boxed()
}

/// Every change to a `K` triggers that `K`.
pub fn own_changes<K>(rx: mpsc::Receiver<Change<K>>) -> Triggers<K>
where
    K: Resource<DynamicType = ()> + Send + Sync + 'static,
{
    triggers(rx, |c: &Change<K>| match c {
        Change::Applied(o) => vec![ObjectRef::from_obj(&**o)],
        Change::Deleted(_) => vec![],
    })
}

/// The object that controls `obj` (its ownerReference with `controller: true`), if of kind `K`.
pub fn controller_of<K, X>(obj: &X) -> Option<ObjectRef<K>>
where
    K: Resource<DynamicType = ()>,
    X: Resource,
{
    let owner = obj
        .meta()
        .owner_references
        .as_ref()?
        .iter()
        .find(|o| o.controller == Some(true))?;
    if owner.kind != K::kind(&()) || owner.api_version != K::api_version(&()) {
        return None;
    }
    let mut r = ObjectRef::new(&owner.name);
    if let Some(ns) = obj.meta().namespace.as_deref() {
        r = r.within(ns);
    }
    Some(r)
}

/// Pod changes trigger the pod's controller of kind `K`, and confirm `expectations` on the way.
pub fn owned_pod_triggers<K>(
    rx: mpsc::Receiver<Change<k8s_openapi::api::core::v1::Pod>>,
    expectations: Arc<crate::expectations::Expectations>,
) -> Triggers<K>
where
    K: Resource<DynamicType = ()> + 'static,
{
    triggers(rx, move |c: &Change<k8s_openapi::api::core::v1::Pod>| {
        let pod = c.object();
        let Some(owner) = controller_of::<K, _>(&**pod) else {
            return vec![];
        };
        let gone = matches!(c, Change::Deleted(_)) || pod.metadata.deletion_timestamp.is_some();
        let key = format!(
            "{}/{}",
            owner.namespace.as_deref().unwrap_or(""),
            owner.name
        );
        expectations.observe(&key, pod.metadata.name.as_deref().unwrap_or(""), gone);
        vec![owner]
    })
}

pub struct Loop {
    pub name: &'static str,
    pub concurrency: u16,
}

/// Runs `reconcile` for every triggered object until `shutdown`, once `ready` (the caches it
/// reads are synced).
pub async fn run<K, Ctx, Fut, E>(
    spec: Loop,
    store: Store<K>,
    ready: impl Future,
    triggers: Vec<Triggers<K>>,
    mut reconcile: impl FnMut(Arc<K>, Arc<Ctx>) -> Fut,
    context: Arc<Ctx>,
    shutdown: CancellationToken,
) where
    K: Resource<DynamicType = ()> + Clone + Debug + Send + Sync + 'static,
    Fut: Future<Output = Result<Action, E>> + Send + 'static,
    E: std::error::Error + Send + Sync + 'static,
    Ctx: Send + Sync + 'static,
{
    tokio::select! {
        _ = shutdown.cancelled() => return,
        _ = ready => {}
    }
    tracing::info!(controller = spec.name, "caches synced, starting");
    let queue = stream::select_all(triggers)
        .map(Ok::<_, Infallible>)
        .take_until(shutdown.cancelled_owned());
    let name = spec.name;
    let error_policy = move |obj: Arc<K>, error: &E, _: Arc<Ctx>| {
        tracing::warn!(controller = name, object = %ObjectRef::from_obj(&*obj), error = %error, "reconcile failed; retrying");
        Action::requeue(Duration::from_secs(5))
    };
    let config = controller::Config::default()
        .concurrency(spec.concurrency)
        .debounce(Duration::from_millis(10));
    applier(
        move |obj, ctx| Box::pin(reconcile(obj, ctx)),
        error_policy,
        context,
        store,
        queue,
        config,
    )
    .for_each(|r| async move {
        if let Err(e) = r {
            match e {
                controller::Error::ObjectNotFound(_) => {}
                e => tracing::debug!(controller = name, error = %e, "reconcile"),
            }
        }
    })
    .await;
}
