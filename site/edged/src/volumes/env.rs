//! A container's environment: `envFrom` (configMaps, secrets, with prefix), then `env` with
//! `value` (`$(VAR)` expanded over what came before) or `valueFrom` (configMapKeyRef,
//! secretKeyRef, fieldRef, resourceFieldRef); plus the downward API values and ServiceAccount
//! tokens that projected volumes carry.

use std::collections::BTreeMap;
use std::net::IpAddr;

use k8s_openapi::api::authentication::v1::{TokenRequest, TokenRequestSpec};
use k8s_openapi::api::core::v1::{
    Container, Pod, ResourceFieldSelector, ServiceAccountTokenProjection,
};
use kube::api::{Api, PostParams};

use super::atomic;
use crate::Agent;

fn is_valid_env_name(name: &str) -> bool {
    !name.is_empty()
        && !name.as_bytes()[0].is_ascii_digit()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-' || b == b'.')
}

/// A pod field for fieldRef (env or downwardAPI).
pub fn field_value(pod: &Pod, path: &str, pod_ip: Option<IpAddr>) -> Result<String, String> {
    let meta = &pod.metadata;
    let spec = pod.spec.clone().unwrap_or_default();
    let status = pod.status.clone().unwrap_or_default();
    let quoted_key = |prefix: &str| -> Option<String> {
        path.strip_prefix(prefix)?
            .strip_suffix("']")
            .map(String::from)
    };
    if let Some(k) = quoted_key("metadata.labels['") {
        return Ok(meta
            .labels
            .clone()
            .unwrap_or_default()
            .get(&k)
            .cloned()
            .unwrap_or_default());
    }
    if let Some(k) = quoted_key("metadata.annotations['") {
        return Ok(meta
            .annotations
            .clone()
            .unwrap_or_default()
            .get(&k)
            .cloned()
            .unwrap_or_default());
    }
    let map_text = |m: Option<BTreeMap<String, String>>| {
        m.unwrap_or_default()
            .iter()
            .map(|(k, v)| {
                format!(
                    "{k}=\"{}\"",
                    v.replace('\\', "\\\\")
                        .replace('"', "\\\"")
                        .replace('\n', "\\n")
                )
            })
            .collect::<Vec<_>>()
            .join("\n")
    };
    Ok(match path {
        "metadata.name" => meta.name.clone().unwrap_or_default(),
        "metadata.namespace" => meta.namespace.clone().unwrap_or_default(),
        "metadata.uid" => meta.uid.clone().unwrap_or_default(),
        "metadata.labels" => map_text(meta.labels.clone()),
        "metadata.annotations" => map_text(meta.annotations.clone()),
        "spec.nodeName" => spec.node_name.unwrap_or_default(),
        "spec.serviceAccountName" => spec.service_account_name.unwrap_or_default(),
        "status.hostIP" => status.host_ip.unwrap_or_default(),
        "status.hostIPs" => status
            .host_ips
            .unwrap_or_default()
            .iter()
            .map(|i| i.ip.clone())
            .collect::<Vec<_>>()
            .join(","),
        "status.podIP" => pod_ip
            .map(|i| i.to_string())
            .or(status.pod_ip)
            .unwrap_or_default(),
        "status.podIPs" => pod_ip
            .map(|i| i.to_string())
            .or(status.pod_ip)
            .unwrap_or_default(),
        other => return Err(format!("unsupported fieldRef fieldPath {other:?}")),
    })
}

/// A resource for resourceFieldRef: the container's limit (node allocatable when unset) or
/// request, divided by the divisor and rounded up.
pub fn resource_value(
    agent: &Agent,
    pod: &Pod,
    r: &ResourceFieldSelector,
) -> Result<String, String> {
    let spec = pod.spec.clone().unwrap_or_default();
    let container = match r.container_name.as_deref() {
        Some(n) if !n.is_empty() => spec
            .containers
            .iter()
            .chain(spec.init_containers.iter().flatten())
            .find(|c| c.name == n)
            .cloned()
            .ok_or_else(|| format!("resourceFieldRef names unknown container {n:?}"))?,
        _ => spec.containers.first().cloned().unwrap_or_default(),
    };
    let res = container.resources.unwrap_or_default();
    let (kind, name) = r
        .resource
        .split_once('.')
        .ok_or_else(|| format!("unsupported resource {:?}", r.resource))?;
    let q = match kind {
        "limits" => res.limits.unwrap_or_default().get(name).cloned(),
        "requests" => res.requests.unwrap_or_default().get(name).cloned(),
        _ => return Err(format!("unsupported resource {:?}", r.resource)),
    };
    let value = match (q, name) {
        (Some(q), _) => sitekit::quantity::parse(&q.0).unwrap_or(0.0),
        (None, "cpu") => std::thread::available_parallelism()
            .map(|n| n.get() as f64)
            .unwrap_or(1.0),
        (None, "memory") => agent.memory_capacity as f64,
        (None, _) => 0.0,
    };
    let divisor = r
        .divisor
        .as_ref()
        .and_then(|d| sitekit::quantity::parse(&d.0))
        .filter(|d| *d > 0.0)
        .unwrap_or(1.0);
    Ok(((value / divisor).ceil() as i64)
        .max(if value > 0.0 { 1 } else { 0 })
        .to_string())
}

async fn config_map(
    agent: &Agent,
    ns: &str,
    name: &str,
) -> Result<Option<BTreeMap<String, String>>, String> {
    agent
        .meta
        .get::<k8s_openapi::api::core::v1::ConfigMap>(ns, name)
        .await
        .map(|o| o.map(|c| c.data.unwrap_or_default()))
        .map_err(|e| format!("get configmap \"{name}\": {e}"))
}

async fn secret(
    agent: &Agent,
    ns: &str,
    name: &str,
) -> Result<Option<BTreeMap<String, String>>, String> {
    agent
        .meta
        .get::<k8s_openapi::api::core::v1::Secret>(ns, name)
        .await
        .map(|o| {
            o.map(|s| {
                s.data
                    .unwrap_or_default()
                    .into_iter()
                    .map(|(k, v)| (k, String::from_utf8_lossy(&v.0).into_owned()))
                    .collect()
            })
        })
        .map_err(|e| format!("get secret \"{name}\": {e}"))
}

/// Docker-links-style variables for one Service (`WEB_SERVICE_HOST`, `WEB_PORT_80_TCP`, ...).
pub fn service_env(svc: &k8s_openapi::api::core::v1::Service) -> Vec<(String, String)> {
    let Some(spec) = &svc.spec else {
        return vec![];
    };
    let ip = match spec.cluster_ip.as_deref() {
        Some(ip) if !ip.is_empty() && ip != "None" => ip.to_string(),
        _ => return vec![],
    };
    let name = svc
        .metadata
        .name
        .clone()
        .unwrap_or_default()
        .to_uppercase()
        .replace('-', "_");
    let ports = spec.ports.clone().unwrap_or_default();
    let Some(first) = ports.first() else {
        return vec![];
    };
    let mut out = vec![
        (format!("{name}_SERVICE_HOST"), ip.clone()),
        (format!("{name}_SERVICE_PORT"), first.port.to_string()),
    ];
    for p in &ports {
        if let Some(pn) = p.name.as_deref().filter(|n| !n.is_empty()) {
            out.push((
                format!(
                    "{name}_SERVICE_PORT_{}",
                    pn.to_uppercase().replace('-', "_")
                ),
                p.port.to_string(),
            ));
        }
    }
    let proto = |p: &k8s_openapi::api::core::v1::ServicePort| {
        p.protocol.clone().unwrap_or_else(|| "TCP".into())
    };
    out.push((
        format!("{name}_PORT"),
        format!("{}://{ip}:{}", proto(first).to_lowercase(), first.port),
    ));
    for p in &ports {
        let pr = proto(p);
        let prefix = format!("{name}_PORT_{}_{}", p.port, pr.to_uppercase());
        out.push((
            prefix.clone(),
            format!("{}://{ip}:{}", pr.to_lowercase(), p.port),
        ));
        out.push((format!("{prefix}_PROTO"), pr.to_lowercase()));
        out.push((format!("{prefix}_PORT"), p.port.to_string()));
        out.push((format!("{prefix}_ADDR"), ip.clone()));
    }
    out
}

/// The Service variables a pod gets: every Service of its namespace (unless
/// `enableServiceLinks: false`) and always the API server's `kubernetes` Service.
async fn services_env(agent: &Agent, pod: &Pod) -> Vec<(String, String)> {
    use k8s_openapi::api::core::v1::Service;
    let ns = pod.metadata.namespace.clone().unwrap_or_default();
    let links = pod
        .spec
        .as_ref()
        .and_then(|s| s.enable_service_links)
        .unwrap_or(true);
    let mut services: Vec<Service> = Vec::new();
    if links && let Ok(list) = agent.meta.list::<Service>(&ns).await {
        services.extend(list);
    }
    if (ns != "default" || !links)
        && let Ok(Some(k)) = agent.meta.get::<Service>("default", "kubernetes").await
    {
        services.retain(|s| s.metadata.name.as_deref() != Some("kubernetes"));
        services.push(k);
    }
    services.iter().flat_map(service_env).collect()
}

/// The resolved environment of `c`, in order (later entries win).
pub async fn resolve_env(
    agent: &Agent,
    pod: &Pod,
    c: &Container,
    pod_ip: Option<IpAddr>,
) -> Result<Vec<(String, String)>, String> {
    let ns = pod.metadata.namespace.clone().unwrap_or_default();
    let mut out: Vec<(String, String)> = Vec::new();
    let set = |out: &mut Vec<(String, String)>, k: String, v: String| {
        out.retain(|(ek, _)| *ek != k);
        out.push((k, v));
    };
    for from in c.env_from.iter().flatten() {
        let prefix = from.prefix.clone().unwrap_or_default();
        let (data, optional, what) = if let Some(r) = &from.config_map_ref {
            (
                config_map(agent, &ns, &r.name).await?,
                r.optional.unwrap_or(false),
                format!("configmap \"{}\"", r.name),
            )
        } else if let Some(r) = &from.secret_ref {
            (
                secret(agent, &ns, &r.name).await?,
                r.optional.unwrap_or(false),
                format!("secret \"{}\"", r.name),
            )
        } else {
            continue;
        };
        match data {
            Some(data) => {
                for (k, v) in data {
                    let name = format!("{prefix}{k}");
                    // Upstream skips invalid names (with an event); so do we.
                    if is_valid_env_name(&name) {
                        set(&mut out, name, v);
                    }
                }
            }
            None if optional => {}
            None => return Err(format!("{what} not found")),
        }
    }
    for e in c.env.iter().flatten() {
        let value = if let Some(from) = &e.value_from {
            if let Some(r) = &from.config_map_key_ref {
                match config_map(agent, &ns, &r.name).await? {
                    Some(d) => match d.get(&r.key) {
                        Some(v) => v.clone(),
                        None if r.optional.unwrap_or(false) => continue,
                        None => {
                            return Err(format!(
                                "couldn't find key {} in ConfigMap {ns}/{}",
                                r.key, r.name
                            ));
                        }
                    },
                    None if r.optional.unwrap_or(false) => continue,
                    None => return Err(format!("configmap \"{}\" not found", r.name)),
                }
            } else if let Some(r) = &from.secret_key_ref {
                match secret(agent, &ns, &r.name).await? {
                    Some(d) => match d.get(&r.key) {
                        Some(v) => v.clone(),
                        None if r.optional.unwrap_or(false) => continue,
                        None => {
                            return Err(format!(
                                "couldn't find key {} in Secret {ns}/{}",
                                r.key, r.name
                            ));
                        }
                    },
                    None if r.optional.unwrap_or(false) => continue,
                    None => return Err(format!("secret \"{}\" not found", r.name)),
                }
            } else if let Some(f) = &from.field_ref {
                field_value(pod, &f.field_path, pod_ip)?
            } else if let Some(r) = &from.resource_field_ref {
                let mut r = r.clone();
                if r.container_name.as_deref().is_none_or(str::is_empty) {
                    r.container_name = Some(c.name.clone());
                }
                resource_value(agent, pod, &r)?
            } else {
                String::new()
            }
        } else {
            let vars: BTreeMap<String, String> = out.iter().cloned().collect();
            crate::spec::expand(e.value.as_deref().unwrap_or(""), &vars)
        };
        set(&mut out, e.name.clone(), value);
    }
    // Service variables fill in only what the pod did not set itself.
    for (k, v) in services_env(agent, pod).await {
        if !out.iter().any(|(ek, _)| *ek == k) {
            out.insert(0, (k, v));
        }
    }
    Ok(out)
}

/// A bound ServiceAccount token for a projected volume, through the TokenRequest API.
///
/// Tokens are kept in the node cache and renewed after 80% of their lifetime (as the kubelet
/// does); while the API is unreachable the last token is served.
pub async fn service_account_token(
    agent: &Agent,
    pod: &Pod,
    t: &ServiceAccountTokenProjection,
    default_mode: Option<i32>,
) -> Result<atomic::File, String> {
    let ns = pod.metadata.namespace.clone().unwrap_or_default();
    let sa = pod
        .spec
        .as_ref()
        .and_then(|s| s.service_account_name.clone())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "default".into());
    let uid = pod.metadata.uid.clone().unwrap_or_default();
    let key = format!(
        "{uid}/{}/{}",
        t.path,
        t.audience.clone().unwrap_or_default()
    );
    let file = |token: &str| atomic::File {
        path: t.path.clone(),
        content: token.as_bytes().to_vec(),
        mode: default_mode.unwrap_or(0o644) as u32,
    };
    let now = chrono::Utc::now().timestamp();
    let cached = agent.meta.value(TOKEN_KIND, &ns, &key);
    if let Some(c) = &cached
        && let (Some(token), Some(issued), Some(expires)) = (
            c["token"].as_str(),
            c["issued"].as_i64(),
            c["expires"].as_i64(),
        )
        && now < issued + (expires - issued) * 4 / 5
    {
        return Ok(file(token));
    }
    let api: Api<k8s_openapi::api::core::v1::ServiceAccount> =
        Api::namespaced(agent.client.clone(), &ns);
    let request = TokenRequest {
        spec: TokenRequestSpec {
            audiences: t.audience.clone().map(|a| vec![a]).unwrap_or_default(),
            expiration_seconds: Some(t.expiration_seconds.unwrap_or(3607)),
            bound_object_ref: Some(k8s_openapi::api::authentication::v1::BoundObjectReference {
                api_version: Some("v1".into()),
                kind: Some("Pod".into()),
                name: pod.metadata.name.clone(),
                uid: pod.metadata.uid.clone(),
            }),
        },
        ..Default::default()
    };
    let response = agent
        .meta
        .call(
            "token request",
            api.create_subresource::<TokenRequest, _>(
                "token",
                &sa,
                &PostParams::default(),
                &request,
            ),
        )
        .await;
    let response: TokenRequest = match response {
        Ok(r) => r,
        Err(e) if !metamanager::answered(&e) => {
            if let Some(token) = cached.as_ref().and_then(|c| c["token"].as_str()) {
                return Ok(file(token));
            }
            return Err(format!(
                "request a token for serviceaccount \"{sa}\": {e} (and the node has no cached token)"
            ));
        }
        Err(e) => return Err(format!("request a token for serviceaccount \"{sa}\": {e}")),
    };
    let Some(status) = response.status else {
        return Err(format!(
            "request a token for serviceaccount \"{sa}\": the answer has no token"
        ));
    };
    let expires = status.expiration_timestamp.0.as_second();
    agent.meta.put_value(
        TOKEN_KIND,
        &ns,
        &key,
        &serde_json::json!({"token": status.token, "issued": now, "expires": expires}),
    );
    Ok(file(&status.token))
}

/// The cache kind of projected ServiceAccount tokens (keyed by pod uid, path, audience).
const TOKEN_KIND: &str = "ServiceAccountToken";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn service_variables_follow_docker_links() {
        let svc: k8s_openapi::api::core::v1::Service = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "my-web"},
            "spec": {"clusterIP": "10.43.0.10", "ports": [{"name": "http", "port": 80}]}
        }))
        .unwrap();
        let env: BTreeMap<String, String> = service_env(&svc).into_iter().collect();
        assert_eq!(env["MY_WEB_SERVICE_HOST"], "10.43.0.10");
        assert_eq!(env["MY_WEB_SERVICE_PORT"], "80");
        assert_eq!(env["MY_WEB_SERVICE_PORT_HTTP"], "80");
        assert_eq!(env["MY_WEB_PORT"], "tcp://10.43.0.10:80");
        assert_eq!(env["MY_WEB_PORT_80_TCP_ADDR"], "10.43.0.10");
        let headless: k8s_openapi::api::core::v1::Service =
            serde_json::from_value(serde_json::json!({
                "metadata": {"name": "h"}, "spec": {"clusterIP": "None", "ports": [{"port": 80}]}
            }))
            .unwrap();
        assert!(service_env(&headless).is_empty());
    }
}
