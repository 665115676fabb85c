//! The Gateway API (`gateway.networking.k8s.io/v1`, pure): Gateways of the site's class and the
//! HTTPRoutes attached to them, compiled into the same routing [`Table`] as Ingresses, and the
//! conditions their statuses carry.
//!
//! A Gateway's listeners are served on the ingress's own ports: `HTTP` on the HTTP port, `HTTPS`
//! (TLS terminated, certificates from Secrets) on the HTTPS port. HTTPRoutes attach to a
//! Gateway (a listener by `sectionName`) in the route's namespace unless the listener allows
//! `All`; their hostnames intersect the listener's; matches on path (`Exact`, `PathPrefix`),
//! method, headers and query parameters (exact); weighted `backendRefs` to Services (same
//! namespace: ReferenceGrant is not served); filters `RequestHeaderModifier`,
//! `ResponseHeaderModifier`, `RequestRedirect`, `URLRewrite`.

use std::collections::BTreeMap;

use serde::Deserialize;

use crate::routes::{
    BackendRef, Filter, HeaderEdit, PathMatch, PathRewrite, PortRef, Route, Table,
};

pub const GROUP: &str = "gateway.networking.k8s.io";
/// The GatewayClass the site installs, and the controller it names.
pub const CLASS: &str = "edgesite";
pub const CONTROLLER: &str = "edgesite.io/gateway-controller";

#[derive(Deserialize, Default, Debug, Clone)]
#[serde(rename_all = "camelCase", default)]
pub struct Meta {
    pub name: String,
    pub namespace: String,
    pub generation: i64,
    pub creation_timestamp: Option<String>,
}

#[derive(Deserialize, Default, Debug, Clone)]
#[serde(rename_all = "camelCase", default)]
pub struct Gateway {
    pub metadata: Meta,
    pub spec: GatewaySpec,
}

#[derive(Deserialize, Default, Debug, Clone)]
#[serde(rename_all = "camelCase", default)]
pub struct GatewaySpec {
    pub gateway_class_name: String,
    pub listeners: Vec<Listener>,
}

#[derive(Deserialize, Default, Debug, Clone)]
#[serde(rename_all = "camelCase", default)]
pub struct Listener {
    pub name: String,
    pub hostname: Option<String>,
    pub port: u16,
    pub protocol: String,
    pub tls: Option<ListenerTls>,
    pub allowed_routes: Option<AllowedRoutes>,
}

#[derive(Deserialize, Default, Debug, Clone)]
#[serde(rename_all = "camelCase", default)]
pub struct ListenerTls {
    pub mode: Option<String>,
    pub certificate_refs: Vec<ObjectRef>,
}

#[derive(Deserialize, Default, Debug, Clone)]
#[serde(rename_all = "camelCase", default)]
pub struct AllowedRoutes {
    pub namespaces: Option<RouteNamespaces>,
}

#[derive(Deserialize, Default, Debug, Clone)]
#[serde(rename_all = "camelCase", default)]
pub struct RouteNamespaces {
    pub from: Option<String>,
}

#[derive(Deserialize, Default, Debug, Clone, PartialEq, Eq)]
#[serde(rename_all = "camelCase", default)]
pub struct ObjectRef {
    pub group: Option<String>,
    pub kind: Option<String>,
    pub name: String,
    pub namespace: Option<String>,
    pub section_name: Option<String>,
    pub port: Option<u16>,
}

#[derive(Deserialize, Default, Debug, Clone)]
#[serde(rename_all = "camelCase", default)]
pub struct HttpRoute {
    pub metadata: Meta,
    pub spec: HttpRouteSpec,
}

#[derive(Deserialize, Default, Debug, Clone)]
#[serde(rename_all = "camelCase", default)]
pub struct HttpRouteSpec {
    pub parent_refs: Vec<ObjectRef>,
    pub hostnames: Vec<String>,
    pub rules: Vec<Rule>,
}

#[derive(Deserialize, Default, Debug, Clone)]
#[serde(rename_all = "camelCase", default)]
pub struct Rule {
    pub matches: Vec<Match>,
    pub filters: Vec<FilterSpec>,
    pub backend_refs: Vec<BackendSpec>,
}

#[derive(Deserialize, Default, Debug, Clone)]
#[serde(rename_all = "camelCase", default)]
pub struct Match {
    pub path: Option<PathSpec>,
    pub headers: Vec<NameValue>,
    pub query_params: Vec<NameValue>,
    pub method: Option<String>,
}

#[derive(Deserialize, Default, Debug, Clone)]
#[serde(rename_all = "camelCase", default)]
pub struct PathSpec {
    #[serde(rename = "type")]
    pub type_: Option<String>,
    pub value: Option<String>,
}

#[derive(Deserialize, Default, Debug, Clone)]
#[serde(rename_all = "camelCase", default)]
pub struct NameValue {
    #[serde(rename = "type")]
    pub type_: Option<String>,
    pub name: String,
    pub value: String,
}

#[derive(Deserialize, Default, Debug, Clone)]
#[serde(rename_all = "camelCase", default)]
pub struct FilterSpec {
    #[serde(rename = "type")]
    pub type_: String,
    pub request_header_modifier: Option<HeaderModifier>,
    pub response_header_modifier: Option<HeaderModifier>,
    pub request_redirect: Option<Redirect>,
    pub url_rewrite: Option<Rewrite>,
}

#[derive(Deserialize, Default, Debug, Clone)]
#[serde(rename_all = "camelCase", default)]
pub struct HeaderModifier {
    pub set: Vec<NameValue>,
    pub add: Vec<NameValue>,
    pub remove: Vec<String>,
}

#[derive(Deserialize, Default, Debug, Clone)]
#[serde(rename_all = "camelCase", default)]
pub struct Redirect {
    pub scheme: Option<String>,
    pub hostname: Option<String>,
    pub path: Option<PathModifier>,
    pub port: Option<u16>,
    pub status_code: Option<u16>,
}

#[derive(Deserialize, Default, Debug, Clone)]
#[serde(rename_all = "camelCase", default)]
pub struct Rewrite {
    pub hostname: Option<String>,
    pub path: Option<PathModifier>,
}

#[derive(Deserialize, Default, Debug, Clone)]
#[serde(rename_all = "camelCase", default)]
pub struct PathModifier {
    #[serde(rename = "type")]
    pub type_: String,
    pub replace_full_path: Option<String>,
    pub replace_prefix_match: Option<String>,
}

#[derive(Deserialize, Default, Debug, Clone)]
#[serde(rename_all = "camelCase", default)]
pub struct BackendSpec {
    pub group: Option<String>,
    pub kind: Option<String>,
    pub name: String,
    pub namespace: Option<String>,
    pub port: Option<u16>,
    pub weight: Option<u32>,
}

/// A condition to write (`lastTransitionTime` and `observedGeneration` are the writer's).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Condition {
    pub type_: &'static str,
    pub status: bool,
    pub reason: &'static str,
    pub message: String,
}

fn condition(
    type_: &'static str,
    status: bool,
    reason: &'static str,
    message: impl Into<String>,
) -> Condition {
    Condition {
        type_,
        status,
        reason,
        message: message.into(),
    }
}

/// A listener's status.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListenerStatus {
    pub name: String,
    pub attached_routes: u32,
    pub conditions: Vec<Condition>,
}

/// A Gateway's status (besides its addresses).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GatewayStatus {
    pub conditions: Vec<Condition>,
    pub listeners: Vec<ListenerStatus>,
}

/// An HTTPRoute's status for one parentRef naming a Gateway of the site's class.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParentStatus {
    pub parent: ObjectRef,
    pub conditions: Vec<Condition>,
}

#[derive(Debug, Default)]
pub struct Statuses {
    /// By (namespace, name).
    pub gateways: BTreeMap<(String, String), GatewayStatus>,
    pub routes: BTreeMap<(String, String), Vec<ParentStatus>>,
}

/// The ingress's ports, which the listeners must use.
#[derive(Debug, Clone, Copy)]
pub struct Ports {
    pub http: u16,
    pub https: u16,
}

/// Whether `listener` can be served: (scheme, or why not).
fn listener_scheme(
    listener: &Listener,
    ports: Ports,
) -> Result<&'static str, (&'static str, String)> {
    match listener.protocol.as_str() {
        "HTTP" if listener.port == ports.http => Ok("http"),
        "HTTPS" if listener.port == ports.https => {
            let tls = listener.tls.clone().unwrap_or_default();
            if tls.mode.as_deref().is_some_and(|m| m != "Terminate") {
                return Err((
                    "UnsupportedValue",
                    "only TLS mode Terminate is served".into(),
                ));
            }
            if tls.certificate_refs.is_empty() {
                return Err((
                    "InvalidCertificateRef",
                    "an HTTPS listener needs tls.certificateRefs".into(),
                ));
            }
            Ok("https")
        }
        "HTTP" | "HTTPS" => Err((
            "PortUnavailable",
            format!(
                "the site's ingress serves HTTP on port {} and HTTPS on port {}",
                ports.http, ports.https
            ),
        )),
        other => Err((
            "UnsupportedProtocol",
            format!("protocol {other} is not served (HTTP and HTTPS are)"),
        )),
    }
}

/// The hostnames a route serves on a listener: the intersection of both (`None`: any host).
fn hostnames(listener: Option<&str>, route: &[String]) -> Option<Vec<Option<String>>> {
    let route: Vec<String> = route.iter().map(|h| h.to_ascii_lowercase()).collect();
    match (listener.map(str::to_ascii_lowercase), route.is_empty()) {
        (None, true) => Some(vec![None]),
        (None, false) => Some(route.into_iter().map(Some).collect()),
        (Some(l), true) => Some(vec![Some(l)]),
        (Some(l), false) => {
            let covered = |h: &str, pattern: &str| match pattern.strip_prefix("*.") {
                Some(suffix) => h.split_once('.').is_some_and(|(_, rest)| rest == suffix),
                None => h == pattern,
            };
            let both: Vec<Option<String>> = route
                .into_iter()
                .filter_map(|h| {
                    if covered(&h, &l) || h == l {
                        Some(Some(h))
                    } else if h.starts_with("*.") && covered(&l, &h) {
                        Some(Some(l.clone()))
                    } else {
                        None
                    }
                })
                .collect();
            (!both.is_empty()).then_some(both)
        }
    }
}

fn edit_of(modifier: &HeaderModifier) -> HeaderEdit {
    let pairs = |list: &[NameValue]| {
        list.iter()
            .map(|nv| (nv.name.to_ascii_lowercase(), nv.value.clone()))
            .collect()
    };
    HeaderEdit {
        set: pairs(&modifier.set),
        add: pairs(&modifier.add),
        remove: modifier
            .remove
            .iter()
            .map(|n| n.to_ascii_lowercase())
            .collect(),
    }
}

fn path_rewrite(modifier: &PathModifier) -> Option<PathRewrite> {
    match modifier.type_.as_str() {
        "ReplaceFullPath" => Some(PathRewrite::Full(modifier.replace_full_path.clone()?)),
        "ReplacePrefixMatch" => Some(PathRewrite::Prefix(modifier.replace_prefix_match.clone()?)),
        _ => None,
    }
}

/// Adds the site's Gateways and their HTTPRoutes to `table`; returns their statuses.
/// `service_exists(namespace, name)` decides `ResolvedRefs`.
pub fn compile(
    table: &mut Table,
    gateways: &[Gateway],
    routes: &[HttpRoute],
    ports: Ports,
    service_exists: &dyn Fn(&str, &str) -> bool,
) -> Statuses {
    let mut statuses = Statuses::default();
    let mut ours: Vec<&Gateway> = gateways
        .iter()
        .filter(|g| g.spec.gateway_class_name == CLASS)
        .collect();
    ours.sort_by_key(|g| {
        (
            g.metadata.creation_timestamp.clone(),
            g.metadata.namespace.clone(),
            g.metadata.name.clone(),
        )
    });
    let mut ordered: Vec<&HttpRoute> = routes.iter().collect();
    ordered.sort_by_key(|r| {
        (
            r.metadata.creation_timestamp.clone(),
            r.metadata.namespace.clone(),
            r.metadata.name.clone(),
        )
    });
    // attached[(gateway index, listener index)] = routes attached.
    let mut attached: BTreeMap<(usize, usize), u32> = BTreeMap::new();

    for gateway in &ours {
        for listener in &gateway.spec.listeners {
            if let (Ok("https"), Some(tls)) = (listener_scheme(listener, ports), &listener.tls) {
                for cert in &tls.certificate_refs {
                    if cert.kind.as_deref().unwrap_or("Secret") != "Secret" {
                        continue;
                    }
                    let namespace = cert
                        .namespace
                        .clone()
                        .unwrap_or_else(|| gateway.metadata.namespace.clone());
                    table.add_tls(
                        listener.hostname.as_deref().unwrap_or(""),
                        &namespace,
                        &cert.name,
                    );
                }
            }
        }
    }

    for route in ordered {
        let namespace = &route.metadata.namespace;
        let source = format!("HTTPRoute {namespace}/{}", route.metadata.name);
        let mut parents = Vec::new();
        for parent in &route.spec.parent_refs {
            if parent.group.as_deref().unwrap_or(GROUP) != GROUP
                || parent.kind.as_deref().unwrap_or("Gateway") != "Gateway"
            {
                continue;
            }
            let parent_ns = parent
                .namespace
                .clone()
                .unwrap_or_else(|| namespace.clone());
            let Some(gi) = ours
                .iter()
                .position(|g| g.metadata.name == parent.name && g.metadata.namespace == parent_ns)
            else {
                continue; // another controller's Gateway, or none: not ours to report
            };
            let gateway = ours[gi];
            let mut accepted_on = Vec::new();
            let mut refusal = (
                "NoMatchingParent",
                "no listener of the Gateway matches the parentRef".to_string(),
            );
            for (li, listener) in gateway.spec.listeners.iter().enumerate() {
                if parent
                    .section_name
                    .as_deref()
                    .is_some_and(|s| s != listener.name)
                    || parent.port.is_some_and(|p| p != listener.port)
                {
                    continue;
                }
                let Ok(scheme) = listener_scheme(listener, ports) else {
                    continue;
                };
                let from = listener
                    .allowed_routes
                    .as_ref()
                    .and_then(|a| a.namespaces.as_ref())
                    .and_then(|n| n.from.clone())
                    .unwrap_or_else(|| "Same".into());
                let allowed = match from.as_str() {
                    "All" => true,
                    "Same" => *namespace == gateway.metadata.namespace,
                    _ => false, // Selector: not served yet
                };
                if !allowed {
                    refusal = (
                        "NotAllowedByListeners",
                        format!(
                            "listener {} does not allow routes from namespace {namespace}",
                            listener.name
                        ),
                    );
                    continue;
                }
                let Some(hosts) = hostnames(listener.hostname.as_deref(), &route.spec.hostnames)
                else {
                    refusal = (
                        "NoMatchingListenerHostname",
                        "no hostname of the route matches a listener's".into(),
                    );
                    continue;
                };
                *attached.entry((gi, li)).or_default() += 1;
                accepted_on.push((scheme, hosts));
            }

            // Backends, and what cannot be resolved.
            let mut unresolved: Option<(&'static str, String)> = None;
            let mut compiled = Vec::new();
            for rule in &route.spec.rules {
                let mut backends = Vec::new();
                for b in &rule.backend_refs {
                    let kind_ok = b.group.as_deref().unwrap_or("").is_empty()
                        && b.kind.as_deref().unwrap_or("Service") == "Service";
                    let same_ns = b.namespace.as_deref().is_none_or(|n| n == namespace);
                    let weight = b.weight.unwrap_or(1);
                    if !kind_ok {
                        unresolved = Some((
                            "InvalidKind",
                            format!("backendRef {} is not a Service", b.name),
                        ));
                        continue;
                    }
                    if !same_ns {
                        unresolved = Some((
                            "RefNotPermitted",
                            format!(
                                "backendRef {} is in another namespace (ReferenceGrant is not served)",
                                b.name
                            ),
                        ));
                        continue;
                    }
                    let Some(port) = b.port else {
                        unresolved = Some((
                            "UnsupportedValue",
                            format!("backendRef {} names no port", b.name),
                        ));
                        continue;
                    };
                    if !service_exists(namespace, &b.name) {
                        unresolved = Some((
                            "BackendNotFound",
                            format!("Service {namespace}/{} does not exist", b.name),
                        ));
                    }
                    if weight > 0 {
                        backends.push(BackendRef {
                            namespace: namespace.clone(),
                            service: b.name.clone(),
                            port: PortRef::Number(port),
                            weight,
                        });
                    }
                }
                let mut filters = Vec::new();
                for f in &rule.filters {
                    let filter = match f.type_.as_str() {
                        "RequestHeaderModifier" => f
                            .request_header_modifier
                            .as_ref()
                            .map(|m| Filter::RequestHeaders(edit_of(m))),
                        "ResponseHeaderModifier" => f
                            .response_header_modifier
                            .as_ref()
                            .map(|m| Filter::ResponseHeaders(edit_of(m))),
                        "RequestRedirect" => {
                            f.request_redirect.as_ref().map(|r| Filter::Redirect {
                                scheme: r.scheme.clone(),
                                hostname: r.hostname.clone(),
                                port: r.port,
                                status: r.status_code.unwrap_or(302),
                                path: r.path.as_ref().and_then(path_rewrite),
                            })
                        }
                        "URLRewrite" => f.url_rewrite.as_ref().map(|r| Filter::Rewrite {
                            hostname: r.hostname.clone(),
                            path: r.path.as_ref().and_then(path_rewrite),
                        }),
                        _ => None,
                    };
                    filters.extend(filter);
                }
                let matches = if rule.matches.is_empty() {
                    vec![Match::default()]
                } else {
                    rule.matches.clone()
                };
                for m in matches {
                    let path = m.path.clone().unwrap_or_default();
                    let value = path.value.clone().unwrap_or_else(|| "/".into());
                    let matcher = match path.type_.as_deref().unwrap_or("PathPrefix") {
                        "Exact" => PathMatch::Exact(value),
                        "PathPrefix" => PathMatch::prefix(&value),
                        _ => continue, // RegularExpression: not served
                    };
                    compiled.push(Route {
                        max_body: None,
                        path: matcher,
                        method: m.method.clone(),
                        headers: m
                            .headers
                            .iter()
                            .filter(|h| h.type_.as_deref().unwrap_or("Exact") == "Exact")
                            .map(|h| (h.name.to_ascii_lowercase(), h.value.clone()))
                            .collect(),
                        query: m
                            .query_params
                            .iter()
                            .filter(|q| q.type_.as_deref().unwrap_or("Exact") == "Exact")
                            .map(|q| (q.name.clone(), q.value.clone()))
                            .collect(),
                        scheme: None,
                        filters: filters.clone(),
                        backends: backends.clone(),
                        source: source.clone(),
                    });
                }
            }
            for (scheme, hosts) in &accepted_on {
                for host in hosts {
                    let into = table.routes_mut(host.as_deref());
                    for r in &compiled {
                        let mut r = r.clone();
                        r.scheme = Some(scheme);
                        into.push(r);
                    }
                }
            }
            let mut conditions = vec![if accepted_on.is_empty() {
                condition("Accepted", false, refusal.0, refusal.1)
            } else {
                condition("Accepted", true, "Accepted", "Route is accepted")
            }];
            conditions.push(match unresolved {
                Some((reason, message)) => condition("ResolvedRefs", false, reason, message),
                None => condition(
                    "ResolvedRefs",
                    true,
                    "ResolvedRefs",
                    "All references are resolved",
                ),
            });
            let mut parent = parent.clone();
            parent.namespace = Some(parent_ns);
            parents.push(ParentStatus { parent, conditions });
        }
        if !parents.is_empty() {
            statuses
                .routes
                .insert((namespace.clone(), route.metadata.name.clone()), parents);
        }
    }
    table.finish();

    for (gi, gateway) in ours.iter().enumerate() {
        let mut listeners = Vec::new();
        let mut programmed = 0;
        for (li, listener) in gateway.spec.listeners.iter().enumerate() {
            let attached_routes = attached.get(&(gi, li)).copied().unwrap_or(0);
            let conditions = match listener_scheme(listener, ports) {
                Ok(_) => {
                    programmed += 1;
                    vec![
                        condition("Accepted", true, "Accepted", "Listener is accepted"),
                        condition(
                            "Programmed",
                            true,
                            "Programmed",
                            "Listener is served by every node's ingress",
                        ),
                        condition(
                            "ResolvedRefs",
                            true,
                            "ResolvedRefs",
                            "All references are resolved",
                        ),
                    ]
                }
                Err((reason, message)) => {
                    let resolved = reason != "InvalidCertificateRef";
                    vec![
                        condition(
                            "Accepted",
                            !resolved,
                            if resolved { reason } else { "Accepted" },
                            message.clone(),
                        ),
                        condition("Programmed", false, "Invalid", message.clone()),
                        condition(
                            "ResolvedRefs",
                            resolved,
                            if resolved { "ResolvedRefs" } else { reason },
                            message,
                        ),
                    ]
                }
            };
            listeners.push(ListenerStatus {
                name: listener.name.clone(),
                attached_routes,
                conditions,
            });
        }
        let conditions = vec![
            condition("Accepted", true, "Accepted", "Gateway is accepted"),
            if programmed > 0 {
                condition(
                    "Programmed",
                    true,
                    "Programmed",
                    "Gateway is served by every node's ingress",
                )
            } else {
                condition("Programmed", false, "Invalid", "no listener can be served")
            },
        ];
        statuses.gateways.insert(
            (
                gateway.metadata.namespace.clone(),
                gateway.metadata.name.clone(),
            ),
            GatewayStatus {
                conditions,
                listeners,
            },
        );
    }
    statuses
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::routes::RequestView;
    use serde_json::json;

    fn gateway() -> Gateway {
        serde_json::from_value(json!({
            "metadata": {"name": "gw", "namespace": "shop", "creationTimestamp": "2026-01-01T00:00:00Z"},
            "spec": {"gatewayClassName": "edgesite", "listeners": [
                {"name": "http", "port": 80, "protocol": "HTTP"},
                {"name": "https", "port": 443, "protocol": "HTTPS", "hostname": "*.example",
                 "tls": {"certificateRefs": [{"name": "wild-tls"}]}},
                {"name": "odd", "port": 8080, "protocol": "HTTP"}
            ]}
        }))
        .unwrap()
    }

    fn route(spec: serde_json::Value) -> HttpRoute {
        serde_json::from_value(json!({
            "metadata": {"name": "canary", "namespace": "shop", "creationTimestamp": "2026-01-01T00:00:00Z"},
            "spec": spec
        }))
        .unwrap()
    }

    fn request<'a>(
        table: &'a Table,
        host: &str,
        path: &str,
        method: &str,
        headers: &http::HeaderMap,
    ) -> Option<&'a Route> {
        table.route(&RequestView {
            scheme: "http",
            host,
            path,
            method,
            headers,
            query: None,
        })
    }

    #[test]
    fn routes_attach_with_weights_matches_and_filters() {
        let r = route(json!({
            "parentRefs": [{"name": "gw", "sectionName": "http"}],
            "hostnames": ["shop.example"],
            "rules": [
                {"matches": [{"path": {"type": "PathPrefix", "value": "/"}}],
                 "backendRefs": [{"name": "v1", "port": 80, "weight": 80}, {"name": "v2", "port": 80, "weight": 20}]},
                {"matches": [{"path": {"type": "PathPrefix", "value": "/"}, "headers": [{"name": "X-Canary", "value": "yes"}]}],
                 "filters": [{"type": "RequestHeaderModifier", "requestHeaderModifier": {"set": [{"name": "X-Via", "value": "gw"}]}}],
                 "backendRefs": [{"name": "v2", "port": 80}]},
                {"matches": [{"path": {"type": "Exact", "value": "/old"}, "method": "GET"}],
                 "filters": [{"type": "RequestRedirect", "requestRedirect": {"path": {"type": "ReplaceFullPath", "replaceFullPath": "/new"}, "statusCode": 301}}]}
            ]
        }));
        let mut table = Table::default();
        let statuses = compile(
            &mut table,
            &[gateway()],
            &[r],
            Ports {
                http: 80,
                https: 443,
            },
            &|_, n| n != "v2",
        );
        let headers = http::HeaderMap::new();
        let plain = request(&table, "shop.example", "/x", "GET", &headers).unwrap();
        let weights: Vec<(String, u32)> = plain
            .backends
            .iter()
            .map(|b| (b.service.clone(), b.weight))
            .collect();
        assert_eq!(weights, [("v1".to_string(), 80), ("v2".to_string(), 20)]);
        let mut canary = http::HeaderMap::new();
        canary.insert("x-canary", "yes".parse().unwrap());
        let matched = request(&table, "shop.example", "/x", "GET", &canary).unwrap();
        assert_eq!(matched.backends[0].service, "v2");
        assert!(
            matches!(&matched.filters[0], Filter::RequestHeaders(e) if e.set == [("x-via".to_string(), "gw".to_string())])
        );
        let old = request(&table, "shop.example", "/old", "GET", &headers).unwrap();
        assert!(matches!(
            &old.filters[0],
            Filter::Redirect { status: 301, .. }
        ));
        assert!(
            request(&table, "shop.example", "/old", "POST", &headers)
                .unwrap()
                .filters
                .is_empty()
        );
        // Only on the HTTP listener (sectionName), not over HTTPS.
        let https = table.route(&RequestView {
            scheme: "https",
            host: "shop.example",
            path: "/x",
            method: "GET",
            headers: &headers,
            query: None,
        });
        assert!(https.is_none());
        assert!(request(&table, "other.example", "/x", "GET", &headers).is_none());

        let parents = &statuses.routes[&("shop".to_string(), "canary".to_string())];
        assert_eq!(parents[0].conditions[0].reason, "Accepted");
        assert_eq!(parents[0].conditions[1].reason, "BackendNotFound");
        let gw = &statuses.gateways[&("shop".to_string(), "gw".to_string())];
        assert_eq!(gw.listeners[0].attached_routes, 1);
        assert_eq!(gw.listeners[2].conditions[0].reason, "PortUnavailable");
        assert!(
            table
                .tls_secret("a.example")
                .is_some_and(|(_, s)| s == "wild-tls")
        );
    }

    #[test]
    fn hostnames_intersect() {
        assert_eq!(hostnames(None, &[]), Some(vec![None]));
        assert_eq!(
            hostnames(Some("*.example"), &["a.example".into(), "b.other".into()]),
            Some(vec![Some("a.example".into())])
        );
        assert_eq!(
            hostnames(Some("a.example"), &["*.example".into()]),
            Some(vec![Some("a.example".into())])
        );
        assert_eq!(hostnames(Some("a.example"), &["b.example".into()]), None);
    }

    #[test]
    fn a_route_in_another_namespace_needs_the_listener_to_allow_it() {
        let mut r = route(
            json!({"parentRefs": [{"name": "gw", "namespace": "shop"}], "rules": [{"backendRefs": [{"name": "v1", "port": 80}]}]}),
        );
        r.metadata.namespace = "other".into();
        let mut table = Table::default();
        let statuses = compile(
            &mut table,
            &[gateway()],
            &[r],
            Ports {
                http: 80,
                https: 443,
            },
            &|_, _| true,
        );
        let parents = &statuses.routes[&("other".to_string(), "canary".to_string())];
        assert_eq!(parents[0].conditions[0].reason, "NotAllowedByListeners");
    }
}
