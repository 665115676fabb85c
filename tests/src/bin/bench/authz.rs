//! What authorization costs: the watch and create phases again, as a user RBAC authorizes
//! (`edgesite kubeconfig --user bench`, a RoleBinding to `edit` in its namespace) among 250
//! other bindings and 50 other ClusterRoles, beside the same phases as `system:masters` (which
//! the authorizer allows before looking at any policy) in the same run.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use k8s_openapi::api::core::v1::{ConfigMap, Namespace};
use k8s_openapi::api::rbac::v1::{
    ClusterRole, ClusterRoleBinding, PolicyRule, RoleBinding, RoleRef, Subject,
};
use kube::api::{Api, ListParams, ObjectMeta, PostParams};

use super::{CreateFigures, Row, Server, WatchFigures, client, create_phase, ms, watch_phase};

const NAMESPACE: &str = "bench";

fn binding(namespace: &str, name: &str, role: &str, kind: &str, subject: &str) -> RoleBinding {
    RoleBinding {
        metadata: ObjectMeta {
            name: Some(name.into()),
            namespace: Some(namespace.into()),
            ..Default::default()
        },
        role_ref: RoleRef {
            api_group: "rbac.authorization.k8s.io".into(),
            kind: "ClusterRole".into(),
            name: role.into(),
        },
        subjects: Some(vec![Subject {
            kind: kind.into(),
            name: subject.into(),
            api_group: Some("rbac.authorization.k8s.io".into()),
            ..Default::default()
        }]),
    }
}

/// The policy the user's requests are decided against.
async fn policy(admin: &kube::Client) -> Result<()> {
    let namespaces: Api<Namespace> = Api::all(admin.clone());
    let pp = PostParams::default();
    for i in 0..25 {
        let name = if i == 0 {
            NAMESPACE.to_string()
        } else {
            format!("team-{i}")
        };
        let ns = Namespace {
            metadata: ObjectMeta {
                name: Some(name.clone()),
                ..Default::default()
            },
            ..Default::default()
        };
        namespaces.create(&pp, &ns).await?;
        let bindings: Api<RoleBinding> = Api::namespaced(admin.clone(), &name);
        for j in 0..10 {
            bindings
                .create(
                    &pp,
                    &binding(
                        &name,
                        &format!("other-{j}"),
                        "view",
                        "User",
                        &format!("user-{i}-{j}"),
                    ),
                )
                .await?;
        }
    }
    let bindings: Api<RoleBinding> = Api::namespaced(admin.clone(), NAMESPACE);
    bindings
        .create(
            &pp,
            &binding(NAMESPACE, "bench-edit", "edit", "User", "bench"),
        )
        .await?;
    let roles: Api<ClusterRole> = Api::all(admin.clone());
    let cluster_bindings: Api<ClusterRoleBinding> = Api::all(admin.clone());
    for i in 0..50 {
        let name = format!("widgets-{i}");
        roles
            .create(
                &pp,
                &ClusterRole {
                    metadata: ObjectMeta {
                        name: Some(name.clone()),
                        ..Default::default()
                    },
                    rules: Some(vec![PolicyRule {
                        api_groups: Some(vec![format!("w{i}.example.com")]),
                        resources: Some(vec!["widgets".into(), "gadgets".into()]),
                        verbs: vec!["get".into(), "list".into(), "watch".into()],
                        ..Default::default()
                    }]),
                    ..Default::default()
                },
            )
            .await?;
        cluster_bindings
            .create(
                &pp,
                &ClusterRoleBinding {
                    metadata: ObjectMeta {
                        name: Some(name.clone()),
                        ..Default::default()
                    },
                    role_ref: RoleRef {
                        api_group: "rbac.authorization.k8s.io".into(),
                        kind: "ClusterRole".into(),
                        name,
                    },
                    subjects: Some(vec![Subject {
                        kind: "Group".into(),
                        name: format!("group-{i}"),
                        api_group: Some("rbac.authorization.k8s.io".into()),
                        ..Default::default()
                    }]),
                },
            )
            .await?;
    }
    Ok(())
}

pub async fn rows(
    bin: &Path,
    server: &Server,
    masters_watch: &WatchFigures,
    masters_creates: &CreateFigures,
    rows: &mut Vec<Row>,
) -> Result<()> {
    let admin = client(&server.dir.join("kubeconfig.yaml")).await?;
    policy(&admin).await.context("create the RBAC objects")?;
    let user = server.dir.join("bench.kubeconfig");
    let out = Command::new(bin)
        .args(["kubeconfig", "--user", "bench", "--output"])
        .arg(&user)
        .arg("--data-dir")
        .arg(server.dir.join("data"))
        .output()?;
    if !out.status.success() {
        bail!(
            "edgesite kubeconfig: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    // `edit` holds its rules once the aggregation controller filled them in.
    let api: Api<ConfigMap> = Api::namespaced(client(&user).await?, NAMESPACE);
    let deadline = Instant::now() + Duration::from_secs(20);
    while api.list(&ListParams::default().limit(1)).await.is_err() {
        if Instant::now() > deadline {
            bail!("the bench user was not allowed to list ConfigMaps in {NAMESPACE} after 20 s");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let watch = watch_phase(&user, NAMESPACE).await?;
    let creates = create_phase(&user, NAMESPACE).await?;
    rows.push(Row {
        metric: "watch delivery p99 as an RBAC user (edit by RoleBinding; 250 other bindings, 50 other ClusterRoles)",
        measured: format!("{}; as system:masters {}", watch.describe(), ms(masters_watch.p99)),
        target: "within 10 % of system:masters",
        met: Some(watch.p99.as_secs_f64() <= masters_watch.p99.as_secs_f64() * 1.1),
    });
    rows.push(Row {
        metric: "creates/s as an RBAC user, 32 concurrent clients, 10,000 ConfigMaps",
        measured: format!(
            "{:.0}/s; as system:masters {:.0}/s",
            creates.rate, masters_creates.rate
        ),
        target: "within 10 % of system:masters",
        met: Some(creates.rate >= masters_creates.rate * 0.9),
    });
    rows.push(Row {
        metric: "create latency p99 as an RBAC user",
        measured: format!(
            "{}; as system:masters {}",
            ms(creates.p99),
            ms(masters_creates.p99)
        ),
        target: "within 10 % of system:masters",
        met: Some(creates.p99.as_secs_f64() <= masters_creates.p99.as_secs_f64() * 1.1),
    });
    Ok(())
}
