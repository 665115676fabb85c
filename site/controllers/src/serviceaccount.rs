//! The ServiceAccount controllers: every namespace that is not being deleted has a `default`
//! ServiceAccount (re-created if deleted), as pods without `serviceAccountName` use it, and a
//! `kube-root-ca.crt` ConfigMap with the cluster CA (upstream's root-ca-cert-publisher); Secrets
//! of type `kubernetes.io/service-account-token` get a token bound to the Secret, the CA and the
//! namespace (upstream's token controller, for manifests that still use them).

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
    #[error("write: {0}")]
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
        client: informers.client_for("service-account-controller"),
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

pub const ROOT_CA: &str = "kube-root-ca.crt";
pub const TOKEN_SECRET_TYPE: &str = "kubernetes.io/service-account-token";
pub const SERVICE_ACCOUNT_NAME: &str = "kubernetes.io/service-account.name";
pub const SERVICE_ACCOUNT_UID: &str = "kubernetes.io/service-account.uid";
/// Legacy tokens do not expire upstream; ours are bound to their Secret and last ten years.
const LEGACY_TOKEN_SECONDS: i64 = 10 * 365 * 24 * 3600;

pub struct CaContext {
    client: kube::Client,
    config_maps: Store<k8s_openapi::api::core::v1::ConfigMap>,
    ca: String,
}

/// Publishes `kube-root-ca.crt` (the cluster CA, PEM) in every live namespace.
pub fn root_ca_publisher(
    informers: &Informers,
    ca: String,
    shutdown: CancellationToken,
) -> impl Future<Output = ()> + Send + 'static {
    use k8s_openapi::api::core::v1::ConfigMap;
    let namespaces = informers.namespaces();
    let config_maps = informers.root_ca_config_maps();
    let context = Arc::new(CaContext {
        client: informers.client_for("root-ca-cert-publisher"),
        config_maps: config_maps.store(),
        ca,
    });
    let own = runner::own_changes(namespaces.subscribe(64));
    let changed = runner::triggers(config_maps.subscribe(256), |c: &Change<ConfigMap>| {
        let cm = c.object();
        if cm.metadata.name.as_deref() != Some(ROOT_CA) {
            return vec![];
        }
        cm.metadata
            .namespace
            .iter()
            .map(|ns| ObjectRef::<Namespace>::new(ns))
            .collect()
    });
    let ready = futures::future::join(namespaces.synced(), config_maps.synced());
    runner::run(
        Loop {
            name: "root-ca-cert-publisher",
            concurrency: 2,
        },
        namespaces.store(),
        ready,
        vec![own, changed],
        publish_ca,
        context,
        shutdown,
    )
}

async fn publish_ca(ns: Arc<Namespace>, ctx: Arc<CaContext>) -> Result<Action, Error> {
    use k8s_openapi::api::core::v1::ConfigMap;
    let name = ns.metadata.name.clone().unwrap_or_default();
    if ns.metadata.deletion_timestamp.is_some() {
        return Ok(Action::await_change());
    }
    let data = std::collections::BTreeMap::from([("ca.crt".to_string(), ctx.ca.clone())]);
    let current = ctx.config_maps.get(&ObjectRef::new(ROOT_CA).within(&name));
    if current
        .as_ref()
        .is_some_and(|c| c.data.as_ref() == Some(&data))
    {
        return Ok(Action::await_change());
    }
    let api: Api<ConfigMap> = Api::namespaced(ctx.client.clone(), &name);
    let mut cm = ConfigMap {
        metadata: ObjectMeta {
            name: Some(ROOT_CA.into()),
            namespace: Some(name.clone()),
            annotations: Some([("kubernetes.io/description".to_string(), "Contains a CA bundle that can be used to verify the kube-apiserver when using internal endpoints such as the internal service IP or kubernetes.default.svc. No other usage is guaranteed across distributions of Kubernetes clusters.".to_string())].into()),
            ..Default::default()
        },
        data: Some(data),
        ..Default::default()
    };
    let result = match current {
        Some(c) => {
            cm.metadata.resource_version = c.metadata.resource_version.clone();
            api.replace(ROOT_CA, &PostParams::default(), &cm).await
        }
        None => api.create(&PostParams::default(), &cm).await,
    };
    match result {
        Ok(_) => Ok(Action::await_change()),
        Err(kube::Error::Api(s)) if s.code == 409 || s.code == 403 || s.code == 404 => {
            Ok(Action::requeue(Duration::from_secs(10)))
        }
        Err(e) => Err(Error::Create(e)),
    }
}

pub struct TokenContext {
    client: kube::Client,
    accounts: Store<ServiceAccount>,
    ca: String,
}

/// Fills `kubernetes.io/service-account-token` Secrets with a token, `ca.crt` and `namespace`.
pub fn token_controller(
    informers: &Informers,
    ca: String,
    shutdown: CancellationToken,
) -> impl Future<Output = ()> + Send + 'static {
    use k8s_openapi::api::core::v1::Secret;
    let secrets = informers.token_secrets();
    let accounts = informers.service_accounts();
    let context = Arc::new(TokenContext {
        client: informers.client_for("tokens-controller"),
        accounts: accounts.store(),
        ca,
    });
    let secret_store = secrets.store();
    let own = runner::triggers(secrets.subscribe(256), |c: &Change<Secret>| match c {
        Change::Applied(s) if s.type_.as_deref() == Some(TOKEN_SECRET_TYPE) => {
            vec![ObjectRef::from_obj(&**s)]
        }
        _ => vec![],
    });
    // A Secret waiting for its ServiceAccount is filled once the account exists.
    let waiting = {
        let secret_store = secret_store.clone();
        runner::triggers(
            accounts.subscribe(256),
            move |c: &Change<ServiceAccount>| {
                let sa = c.object();
                secret_store
                    .state_filter(|s| {
                        s.type_.as_deref() == Some(TOKEN_SECRET_TYPE)
                            && s.metadata.namespace == sa.metadata.namespace
                            && s.metadata
                                .annotations
                                .as_ref()
                                .and_then(|a| a.get(SERVICE_ACCOUNT_NAME))
                                == sa.metadata.name.as_ref()
                    })
                    .iter()
                    .map(|s| ObjectRef::from_obj(&**s))
                    .collect()
            },
        )
    };
    let ready = futures::future::join(secrets.synced(), accounts.synced());
    runner::run(
        Loop {
            name: "serviceaccount-token",
            concurrency: 2,
        },
        secret_store,
        ready,
        vec![own, waiting],
        fill_token,
        context,
        shutdown,
    )
}

async fn fill_token(
    secret: Arc<k8s_openapi::api::core::v1::Secret>,
    ctx: Arc<TokenContext>,
) -> Result<Action, Error> {
    use k8s_openapi::ByteString;
    use k8s_openapi::api::core::v1::Secret;
    if secret.type_.as_deref() != Some(TOKEN_SECRET_TYPE)
        || secret.metadata.deletion_timestamp.is_some()
    {
        return Ok(Action::await_change());
    }
    if secret
        .data
        .as_ref()
        .is_some_and(|d| d.contains_key("token"))
    {
        return Ok(Action::await_change());
    }
    let namespace = secret.metadata.namespace.clone().unwrap_or_default();
    let name = secret.metadata.name.clone().unwrap_or_default();
    let Some(account) = secret
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(SERVICE_ACCOUNT_NAME))
        .cloned()
    else {
        return Ok(Action::await_change());
    };
    let Some(sa) = ctx
        .accounts
        .get(&ObjectRef::new(&account).within(&namespace))
    else {
        // Not there yet: the account's creation triggers us again.
        return Ok(Action::await_change());
    };
    let request = serde_json::json!({
        "apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest",
        "spec": {"expirationSeconds": LEGACY_TOKEN_SECONDS, "boundObjectRef": {"apiVersion": "v1", "kind": "Secret", "name": name, "uid": secret.metadata.uid}}
    });
    let accounts: Api<ServiceAccount> = Api::namespaced(ctx.client.clone(), &namespace);
    let response: serde_json::Value = match accounts
        .create_subresource("token", &account, &PostParams::default(), &request)
        .await
    {
        Ok(r) => r,
        Err(kube::Error::Api(s)) if s.code == 404 || s.code == 409 => {
            return Ok(Action::requeue(Duration::from_secs(5)));
        }
        Err(e) => return Err(Error::Create(e)),
    };
    let token = response
        .pointer("/status/token")
        .and_then(serde_json::Value::as_str)
        .unwrap_or_default()
        .to_string();
    let mut updated: Secret = (*secret).clone();
    let data = updated.data.get_or_insert_with(Default::default);
    data.insert("token".into(), ByteString(token.into_bytes()));
    data.insert("ca.crt".into(), ByteString(ctx.ca.clone().into_bytes()));
    data.insert(
        "namespace".into(),
        ByteString(namespace.clone().into_bytes()),
    );
    updated
        .metadata
        .annotations
        .get_or_insert_with(Default::default)
        .insert(
            SERVICE_ACCOUNT_UID.into(),
            sa.metadata.uid.clone().unwrap_or_default(),
        );
    let secrets: Api<Secret> = Api::namespaced(ctx.client.clone(), &namespace);
    match secrets
        .replace(&name, &PostParams::default(), &updated)
        .await
    {
        Ok(_) => Ok(Action::await_change()),
        Err(kube::Error::Api(s)) if s.code == 409 || s.code == 404 => {
            Ok(Action::requeue(Duration::from_secs(1)))
        }
        Err(e) => Err(Error::Create(e)),
    }
}
