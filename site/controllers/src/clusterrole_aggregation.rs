//! ClusterRole aggregation (upstream's `clusterrole-aggregation` controller): a ClusterRole with
//! an `aggregationRule` gets, as its `rules`, the rules of every other ClusterRole its label
//! selectors match, in name order, without duplicates. This is how `admin`, `edit` and `view`
//! pick up the roles CRD authors label `rbac.authorization.k8s.io/aggregate-to-view: "true"`.

use std::collections::BTreeMap;
use std::sync::Arc;

use k8s_openapi::api::rbac::v1::{ClusterRole, PolicyRule};
use kube::api::{Api, Patch, PatchParams};
use kube::core::{Selector, SelectorExt};
use kube::runtime::controller::Action;
use kube::runtime::reflector::{ObjectRef, Store};
use serde_json::json;
use tokio_util::sync::CancellationToken;

use crate::informer::{Change, Informers};
use crate::runner::{self, Loop};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("write the aggregated rules: {0}")]
    Write(#[source] kube::Error),
}

pub struct Context {
    client: kube::Client,
    roles: Store<ClusterRole>,
}

/// The rules an aggregated role should hold: those of the matching roles, by name, deduplicated.
pub fn aggregated_rules(role: &ClusterRole, all: &[Arc<ClusterRole>]) -> Option<Vec<PolicyRule>> {
    let selectors = role
        .aggregation_rule
        .as_ref()?
        .cluster_role_selectors
        .clone()
        .unwrap_or_default();
    let selectors: Vec<Selector> = selectors
        .into_iter()
        .filter_map(|s| Selector::try_from(s).ok())
        .collect();
    let mut sources: Vec<&Arc<ClusterRole>> = all
        .iter()
        .filter(|other| other.metadata.name != role.metadata.name)
        .filter(|other| {
            let labels: &BTreeMap<String, String> = other
                .metadata
                .labels
                .as_ref()
                .unwrap_or(const { &BTreeMap::new() });
            selectors.iter().any(|s| s.matches(labels))
        })
        .collect();
    sources.sort_by(|a, b| a.metadata.name.cmp(&b.metadata.name));
    let mut rules: Vec<PolicyRule> = Vec::new();
    for source in sources {
        for rule in source.rules.iter().flatten() {
            if !rules.contains(rule) {
                rules.push(rule.clone());
            }
        }
    }
    Some(rules)
}

/// Subscribes to the informer now; the returned future runs the loop.
pub fn controller(
    informers: &Informers,
    shutdown: CancellationToken,
) -> impl Future<Output = ()> + Send + 'static {
    let roles = informers.cluster_roles();
    let store = roles.store();
    let context = Arc::new(Context {
        client: informers.client_for("clusterrole-aggregation-controller"),
        roles: store.clone(),
    });
    // Any role's change may change what an aggregated role gathers: requeue all of those.
    let watched = store.clone();
    let any = runner::triggers(roles.subscribe(256), move |_: &Change<ClusterRole>| {
        watched
            .state()
            .iter()
            .filter(|r| r.aggregation_rule.is_some())
            .map(|r| ObjectRef::from_obj(&**r))
            .collect()
    });
    runner::run(
        Loop {
            name: "clusterrole-aggregation",
            concurrency: 1,
        },
        store,
        roles.synced(),
        vec![any],
        reconcile,
        context,
        shutdown,
    )
}

async fn reconcile(role: Arc<ClusterRole>, ctx: Arc<Context>) -> Result<Action, Error> {
    let Some(rules) = aggregated_rules(&role, &ctx.roles.state()) else {
        return Ok(Action::await_change());
    };
    if role.rules.clone().unwrap_or_default() == rules {
        return Ok(Action::await_change());
    }
    let name = role.metadata.name.clone().unwrap_or_default();
    let api: Api<ClusterRole> = Api::all(ctx.client.clone());
    // The uid guards against writing into a role deleted and made again meanwhile.
    let patch = json!({"metadata": {"uid": role.metadata.uid}, "rules": rules});
    match api
        .patch(&name, &PatchParams::default(), &Patch::Merge(&patch))
        .await
    {
        Ok(_) => Ok(Action::await_change()),
        Err(kube::Error::Api(s)) if s.code == 404 || s.code == 409 => Ok(Action::await_change()),
        Err(e) => Err(Error::Write(e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::rbac::v1::AggregationRule;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta};

    fn role(name: &str, label: Option<&str>, resources: &[&str]) -> Arc<ClusterRole> {
        Arc::new(ClusterRole {
            metadata: ObjectMeta {
                name: Some(name.into()),
                labels: label.map(|l| [(l.to_string(), "true".to_string())].into()),
                ..Default::default()
            },
            rules: Some(
                resources
                    .iter()
                    .map(|r| PolicyRule {
                        verbs: vec!["get".into()],
                        api_groups: Some(vec!["".into()]),
                        resources: Some(vec![r.to_string()]),
                        ..Default::default()
                    })
                    .collect(),
            ),
            aggregation_rule: None,
        })
    }

    #[test]
    fn gathers_the_rules_of_matching_roles_once_in_name_order() {
        let mut view = (*role("view", None, &[])).clone();
        view.aggregation_rule = Some(AggregationRule {
            cluster_role_selectors: Some(vec![LabelSelector {
                match_labels: Some([("agg".to_string(), "true".to_string())].into()),
                ..Default::default()
            }]),
        });
        let all = vec![
            role("b", Some("agg"), &["pods", "widgets"]),
            role("a", Some("agg"), &["pods"]),
            role("c", None, &["secrets"]),
        ];
        let rules = aggregated_rules(&view, &all).unwrap();
        let names: Vec<String> = rules
            .iter()
            .map(|r| r.resources.clone().unwrap()[0].clone())
            .collect();
        assert_eq!(names, vec!["pods", "widgets"]);
        assert!(aggregated_rules(&all[2], &all).is_none());
    }
}
