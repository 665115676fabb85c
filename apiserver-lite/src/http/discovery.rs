//! API discovery: legacy (`/api`, `/apis`, `/apis/<g>`, `/api/v1`, `/apis/<g>/<v>`) and aggregated
//! v2, which kubectl uses only when the response Content-Type is exactly the aggregated media type.

use axum::response::{IntoResponse, Response};
use http::{HeaderValue, StatusCode, header};
use serde_json::{Value, json};

use super::request::Output;
use super::{ApiServer, json_response};
use crate::error::ApiError;
use crate::registry::ResourceInfo;

const AGGREGATED: &str = "application/json;g=apidiscovery.k8s.io;v=v2;as=APIGroupDiscoveryList";

fn aggregated_response(items: Vec<Value>) -> Response {
    let body = json!({
        "kind": "APIGroupDiscoveryList",
        "apiVersion": "apidiscovery.k8s.io/v2",
        "metadata": {},
        "items": items,
    });
    (
        StatusCode::OK,
        [
            (header::CONTENT_TYPE, HeaderValue::from_static(AGGREGATED)),
            (header::VARY, HeaderValue::from_static("Accept")),
        ],
        serde_json::to_vec(&body).unwrap_or_default(),
    )
        .into_response()
}

fn aggregated_resource(info: &ResourceInfo) -> Value {
    let mut r = json!({
        "resource": info.resource,
        "responseKind": {"group": info.group, "version": info.version, "kind": info.kind},
        "scope": if info.namespaced { "Namespaced" } else { "Cluster" },
        "singularResource": info.singular,
        "verbs": info.verbs,
    });
    if !info.short_names.is_empty() {
        r["shortNames"] = json!(info.short_names);
    }
    if !info.categories.is_empty() {
        r["categories"] = json!(info.categories);
    }
    if !info.subresources.is_empty() {
        r["subresources"] = Value::Array(
            info.subresources
                .iter()
                .map(|s| {
                    let (group, version, kind) = subresource_kind(info, s);
                    json!({
                        "subresource": s.name,
                        "responseKind": {"group": group, "version": version, "kind": kind},
                        "verbs": s.verbs,
                    })
                })
                .collect(),
        );
    }
    r
}

fn subresource_kind<'a>(
    info: &'a ResourceInfo,
    s: &'a crate::registry::SubresourceInfo,
) -> (&'a str, &'a str, &'a str) {
    let group = if s.version.is_empty() {
        info.group.as_str()
    } else {
        s.group
    };
    let version = if s.version.is_empty() {
        info.version.as_str()
    } else {
        s.version
    };
    let kind = if s.kind.is_empty() {
        info.kind.as_str()
    } else {
        s.kind
    };
    (group, version, kind)
}

fn aggregated_group(server: &ApiServer, group: &str, versions: &[String]) -> Value {
    let all = server.registry.all();
    let versions: Vec<Value> = versions
        .iter()
        .map(|v| {
            let resources: Vec<Value> = all
                .iter()
                .filter(|r| r.group == group && &r.version == v)
                .map(|r| aggregated_resource(r))
                .collect();
            json!({"version": v, "resources": resources, "freshness": "Current"})
        })
        .collect();
    let mut metadata = json!({"creationTimestamp": null});
    if !group.is_empty() {
        metadata["name"] = json!(group);
    }
    json!({"metadata": metadata, "versions": versions})
}

pub fn core_group(server: &ApiServer, output: Output) -> Response {
    if output == Output::AggregatedDiscovery {
        return aggregated_response(vec![aggregated_group(server, "", &["v1".to_string()])]);
    }
    json_response(
        StatusCode::OK,
        &json!({
            "kind": "APIVersions",
            "versions": ["v1"],
            "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0", "serverAddress": ""}],
        }),
    )
}

fn api_group(group: &str, versions: &[String]) -> Value {
    let versions: Vec<Value> = versions
        .iter()
        .map(|v| json!({"groupVersion": format!("{group}/{v}"), "version": v}))
        .collect();
    json!({
        "name": group,
        "versions": versions,
        "preferredVersion": versions.first().cloned().unwrap_or(Value::Null),
    })
}

pub fn groups(server: &ApiServer, output: Output) -> Response {
    let groups: Vec<(String, Vec<String>)> = server
        .registry
        .groups()
        .into_iter()
        .filter(|(g, _)| !g.is_empty())
        .collect();
    if output == Output::AggregatedDiscovery {
        return aggregated_response(
            groups
                .iter()
                .map(|(g, versions)| aggregated_group(server, g, versions))
                .collect(),
        );
    }
    json_response(
        StatusCode::OK,
        &json!({
            "kind": "APIGroupList",
            "apiVersion": "v1",
            "groups": groups.iter().map(|(g, v)| api_group(g, v)).collect::<Vec<_>>(),
        }),
    )
}

pub fn group(server: &ApiServer, group: &str) -> Result<Response, ApiError> {
    let (_, versions) = server
        .registry
        .groups()
        .into_iter()
        .find(|(g, _)| g == group && !g.is_empty())
        .ok_or_else(ApiError::no_route)?;
    let mut body = api_group(group, &versions);
    body["kind"] = json!("APIGroup");
    body["apiVersion"] = json!("v1");
    Ok(json_response(StatusCode::OK, &body))
}

pub fn resource_list(server: &ApiServer, group: &str, version: &str) -> Result<Response, ApiError> {
    let resources: Vec<_> = server
        .registry
        .all()
        .into_iter()
        .filter(|r| r.group == group && r.version == version)
        .collect();
    if resources.is_empty() {
        return Err(ApiError::no_route());
    }
    let mut list = Vec::new();
    for r in &resources {
        let mut entry = json!({
            "name": r.resource,
            "singularName": r.singular,
            "namespaced": r.namespaced,
            "kind": r.kind,
            "verbs": r.verbs,
        });
        if !r.short_names.is_empty() {
            entry["shortNames"] = json!(r.short_names);
        }
        if !r.categories.is_empty() {
            entry["categories"] = json!(r.categories);
        }
        list.push(entry);
        for s in &r.subresources {
            let (sg, sv, kind) = subresource_kind(r, s);
            let mut sub = json!({
                "name": format!("{}/{}", r.resource, s.name),
                "singularName": "",
                "namespaced": r.namespaced,
                "kind": kind,
                "verbs": s.verbs,
            });
            if sg != r.group || sv != r.version {
                sub["group"] = json!(sg);
                sub["version"] = json!(sv);
            }
            list.push(sub);
        }
    }
    let group_version = if group.is_empty() {
        version.to_string()
    } else {
        format!("{group}/{version}")
    };
    Ok(json_response(
        StatusCode::OK,
        &json!({
            "kind": "APIResourceList",
            "apiVersion": "v1",
            "groupVersion": group_version,
            "resources": list,
        }),
    ))
}
