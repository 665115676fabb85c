//! What a request asks for: the parsed path (upstream's `RequestInfo`), query options and the
//! negotiated response form. Pure code.

use std::collections::HashMap;

use crate::error::ApiError;

/// A resource request, parsed from `/api/v1/namespaces/ns/pods/name/status` and friends.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ResourcePath {
    pub group: String,
    pub version: String,
    pub namespace: Option<String>,
    pub resource: String,
    pub name: Option<String>,
    pub subresource: Option<String>,
    /// What follows `.../proxy/` (`nodes/<name>/proxy/metrics`).
    pub proxy_path: Option<String>,
}

/// Every kind of path the server answers.
#[derive(Debug, Clone, PartialEq)]
pub enum Route {
    Version,
    Health(String),
    /// `/api`
    CoreGroup,
    /// `/apis`
    Groups,
    /// `/apis/<group>`
    Group(String),
    /// `/api/v1` or `/apis/<group>/<version>`
    ResourceList(String, String),
    OpenApiV2,
    OpenApiV3Index,
    OpenApiV3(String, String),
    Resource(ResourcePath),
    Unknown,
}

fn decode(segment: &str) -> String {
    percent_decode(segment)
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let hex = |b: u8| (b as char).to_digit(16).map(|d| d as u8);
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%'
            && let (Some(hi), Some(lo)) = (
                bytes.get(i + 1).copied().and_then(hex),
                bytes.get(i + 2).copied().and_then(hex),
            )
        {
            out.push(hi * 16 + lo);
            i += 3;
            continue;
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

pub fn parse_route(path: &str) -> Route {
    let trimmed = path.trim_end_matches('/');
    let segments: Vec<String> = trimmed
        .split('/')
        .filter(|s| !s.is_empty())
        .map(decode)
        .collect();
    let s: Vec<&str> = segments.iter().map(String::as_str).collect();
    match s.as_slice() {
        ["version"] => Route::Version,
        [endpoint @ ("healthz" | "livez" | "readyz"), ..] => Route::Health(endpoint.to_string()),
        ["api"] => Route::CoreGroup,
        ["apis"] => Route::Groups,
        ["apis", group] => Route::Group(group.to_string()),
        ["api", version] => Route::ResourceList(String::new(), version.to_string()),
        ["apis", group, version] => Route::ResourceList(group.to_string(), version.to_string()),
        ["openapi", "v2"] => Route::OpenApiV2,
        ["openapi", "v3"] => Route::OpenApiV3Index,
        ["openapi", "v3", "api", version] => Route::OpenApiV3(String::new(), version.to_string()),
        ["openapi", "v3", "apis", group, version] => {
            Route::OpenApiV3(group.to_string(), version.to_string())
        }
        ["api", version, rest @ ..] => resource_route("", version, rest),
        ["apis", group, version, rest @ ..] => resource_route(group, version, rest),
        _ => Route::Unknown,
    }
}

fn resource_route(group: &str, version: &str, rest: &[&str]) -> Route {
    let mut p = ResourcePath {
        group: group.to_string(),
        version: version.to_string(),
        ..ResourcePath::default()
    };
    let rest = match rest {
        // `/namespaces/<ns>/<resource>...`, but `/namespaces/<name>[/status|/finalize]` is the
        // namespace object itself.
        ["namespaces", ns, resource, tail @ ..]
            if !(tail.is_empty()
                && (*resource == "status" || *resource == "finalize")
                && group.is_empty()) =>
        {
            p.namespace = Some(ns.to_string());
            let mut v = vec![*resource];
            v.extend_from_slice(tail);
            v
        }
        other => other.to_vec(),
    };
    match rest.as_slice() {
        [resource] => p.resource = resource.to_string(),
        [resource, name] => {
            p.resource = resource.to_string();
            p.name = Some(name.to_string());
        }
        [resource, name, sub] => {
            p.resource = resource.to_string();
            p.name = Some(name.to_string());
            p.subresource = Some(sub.to_string());
        }
        [resource, name, "proxy", tail @ ..] => {
            p.resource = resource.to_string();
            p.name = Some(name.to_string());
            p.subresource = Some("proxy".to_string());
            p.proxy_path = Some(tail.join("/"));
        }
        _ => return Route::Unknown,
    }
    Route::Resource(p)
}

/// What a request asks for, as authorization sees it (upstream's `RequestInfo`): the verb from
/// the method (`get`/`list`/`watch`, `create`, `update`, `patch`, `delete`/`deletecollection`;
/// the lower-case method for non-resource paths), the resource, namespace and name.
pub fn attributes(
    method: &http::Method,
    route: &Route,
    path: &str,
    query: Option<&str>,
) -> crate::auth::Attributes {
    let Route::Resource(p) = route else {
        return crate::auth::Attributes::non_resource(&method.as_str().to_lowercase(), path);
    };
    let query = Query::parse(query);
    let fields: Vec<(String, String)> = query
        .get("fieldSelector")
        .map(|s| {
            s.split(',')
                .filter(|r| !r.contains("!="))
                .filter_map(|r| {
                    let (k, v) = r.split_once("==").or_else(|| r.split_once('='))?;
                    Some((k.trim().to_string(), v.trim().to_string()))
                })
                .collect()
        })
        .unwrap_or_default();
    let collection = p.name.is_none();
    let verb = match *method {
        http::Method::GET | http::Method::HEAD if collection => {
            if query.flag("watch").unwrap_or(false) {
                "watch"
            } else {
                "list"
            }
        }
        http::Method::GET | http::Method::HEAD => "get",
        http::Method::POST => "create",
        http::Method::PUT => "update",
        http::Method::PATCH => "patch",
        http::Method::DELETE if collection => "deletecollection",
        http::Method::DELETE => "delete",
        _ => "",
    };
    let mut name = p.name.clone().unwrap_or_default();
    if collection
        && (verb == "list" || verb == "watch")
        && let Some((_, n)) = fields.iter().find(|(f, _)| f == "metadata.name")
    {
        name = n.clone();
    }
    let mut namespace = p.namespace.clone().unwrap_or_default();
    if p.group.is_empty() && p.resource == "namespaces" && namespace.is_empty() {
        namespace = name.clone();
    }
    crate::auth::Attributes {
        verb: verb.to_string(),
        resource_request: true,
        api_group: p.group.clone(),
        api_version: p.version.clone(),
        resource: p.resource.clone(),
        subresource: p.subresource.clone().unwrap_or_default(),
        namespace,
        name,
        path: path.to_string(),
        fields,
    }
}

/// Query parameters, last value wins (as upstream's decoder does for scalars).
#[derive(Debug, Clone, Default)]
pub struct Query(pub HashMap<String, String>);

impl Query {
    pub fn parse(raw: Option<&str>) -> Self {
        let mut map = HashMap::new();
        if let Some(raw) = raw {
            for (k, v) in form_urlencoded::parse(raw.as_bytes()) {
                map.insert(k.into_owned(), v.into_owned());
            }
        }
        Query(map)
    }

    pub fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).map(String::as_str)
    }

    /// `true`, `1` and `True` are true, as upstream's boolean query decoding.
    pub fn flag(&self, key: &str) -> Result<bool, ApiError> {
        match self.get(key) {
            None | Some("") => Ok(false),
            Some("true" | "True" | "TRUE" | "1" | "t" | "T") => Ok(true),
            Some("false" | "False" | "FALSE" | "0" | "f" | "F") => Ok(false),
            Some(other) => Err(ApiError::bad_request(format!(
                "invalid boolean value {other:?} for parameter {key:?}"
            ))),
        }
    }

    pub fn number(&self, key: &str) -> Result<Option<i64>, ApiError> {
        match self.get(key) {
            None | Some("") => Ok(None),
            Some(v) => v.parse().map(Some).map_err(|_| {
                ApiError::bad_request(format!(
                    "invalid value {v:?} for parameter {key:?}: must be an integer"
                ))
            }),
        }
    }
}

/// One media range of an `Accept` header.
#[derive(Debug, Clone, PartialEq)]
pub struct MediaRange {
    pub essence: String,
    pub params: HashMap<String, String>,
}

pub fn parse_accept(header: &str) -> Vec<MediaRange> {
    header
        .split(',')
        .filter_map(|part| {
            let mut pieces = part.split(';');
            let essence = pieces.next()?.trim().to_ascii_lowercase();
            if essence.is_empty() {
                return None;
            }
            let params = pieces
                .filter_map(|p| {
                    let (k, v) = p.split_once('=')?;
                    Some((k.trim().to_string(), v.trim().trim_matches('"').to_string()))
                })
                .collect();
            Some(MediaRange { essence, params })
        })
        .collect()
}

/// What form a response body takes.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Output {
    Json,
    Yaml,
    Table,
    PartialMetadata,
    /// Aggregated discovery (`apidiscovery.k8s.io/v2`).
    AggregatedDiscovery,
    /// `application/vnd.kubernetes.protobuf`, for clients that accept nothing we write in JSON.
    Protobuf,
}

/// Picks the first acceptable media range; `None` means nothing we can produce was accepted.
pub fn negotiate(accept: Option<&str>) -> Option<Output> {
    let Some(accept) = accept.filter(|a| !a.trim().is_empty()) else {
        return Some(Output::Json);
    };
    for range in parse_accept(accept) {
        let json_like = matches!(
            range.essence.as_str(),
            "application/json" | "*/*" | "application/*"
        );
        let yaml = range.essence == "application/yaml";
        if !json_like && !yaml {
            continue;
        }
        match (
            range.params.get("as").map(String::as_str),
            range.params.get("g").map(String::as_str),
            range.params.get("v").map(String::as_str),
        ) {
            (None, _, _) => return Some(if yaml { Output::Yaml } else { Output::Json }),
            (Some("Table"), Some("meta.k8s.io"), Some("v1")) => return Some(Output::Table),
            (
                Some("PartialObjectMetadata" | "PartialObjectMetadataList"),
                Some("meta.k8s.io"),
                Some("v1"),
            ) => {
                return Some(Output::PartialMetadata);
            }
            (Some("APIGroupDiscoveryList"), Some("apidiscovery.k8s.io"), Some("v2")) => {
                return Some(Output::AggregatedDiscovery);
            }
            _ => continue,
        }
    }
    // Protobuf only when nothing JSON is acceptable (client-go's core components ask for it
    // alone); clients that offer both get JSON, which every one of them reads.
    parse_accept(accept)
        .into_iter()
        .any(|r| r.essence == crate::protobuf::CONTENT_TYPE && !r.params.contains_key("as"))
        .then_some(Output::Protobuf)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes() {
        assert_eq!(parse_route("/api"), Route::CoreGroup);
        assert_eq!(
            parse_route("/apis/apps/v1"),
            Route::ResourceList("apps".into(), "v1".into())
        );
        let Route::Resource(p) = parse_route("/api/v1/namespaces/default/pods/web/status") else {
            panic!()
        };
        assert_eq!(p.namespace.as_deref(), Some("default"));
        assert_eq!(p.resource, "pods");
        assert_eq!(p.name.as_deref(), Some("web"));
        assert_eq!(p.subresource.as_deref(), Some("status"));
        let Route::Resource(p) = parse_route("/api/v1/namespaces/kube-system/status") else {
            panic!()
        };
        assert_eq!(p.resource, "namespaces");
        assert_eq!(p.name.as_deref(), Some("kube-system"));
        assert_eq!(p.subresource.as_deref(), Some("status"));
        let Route::Resource(p) = parse_route("/api/v1/namespaces/kube-system") else {
            panic!()
        };
        assert_eq!(
            (p.resource.as_str(), p.name.as_deref(), p.namespace),
            ("namespaces", Some("kube-system"), None)
        );
        let Route::Resource(p) = parse_route("/apis/apps/v1/deployments") else {
            panic!()
        };
        assert_eq!(p.namespace, None);
        assert_eq!(parse_route("/api/v1/a/b/c/d"), Route::Unknown);
        assert_eq!(
            parse_route("/openapi/v3/apis/apps/v1"),
            Route::OpenApiV3("apps".into(), "v1".into())
        );
    }

    #[test]
    fn request_attributes() {
        let get = http::Method::GET;
        let a = |m: &http::Method, path: &str, q: Option<&str>| {
            attributes(m, &parse_route(path), path, q)
        };
        let list = a(&get, "/api/v1/namespaces/prod/pods", Some("limit=500"));
        assert_eq!(
            (
                list.verb.as_str(),
                list.namespace.as_str(),
                list.resource.as_str()
            ),
            ("list", "prod", "pods")
        );
        let watch = a(
            &get,
            "/api/v1/pods",
            Some("watch=1&fieldSelector=spec.nodeName%3Dn1"),
        );
        assert_eq!(watch.verb, "watch");
        assert_eq!(watch.field("spec.nodeName"), Some("n1"));
        let one = a(
            &get,
            "/api/v1/namespaces/d/configmaps",
            Some("fieldSelector=metadata.name%3Dc&watch=true"),
        );
        assert_eq!((one.verb.as_str(), one.name.as_str()), ("watch", "c"));
        let exec = a(
            &http::Method::POST,
            "/api/v1/namespaces/d/pods/p/exec",
            None,
        );
        assert_eq!(
            (
                exec.verb.as_str(),
                exec.subresource.as_str(),
                exec.name.as_str()
            ),
            ("create", "exec", "p")
        );
        let ns = a(&http::Method::DELETE, "/api/v1/namespaces/dev", None);
        assert_eq!(
            (ns.verb.as_str(), ns.namespace.as_str(), ns.name.as_str()),
            ("delete", "dev", "dev")
        );
        let all = a(
            &http::Method::DELETE,
            "/apis/apps/v1/namespaces/d/deployments",
            None,
        );
        assert_eq!(
            (all.verb.as_str(), all.api_group.as_str()),
            ("deletecollection", "apps")
        );
        let path = a(&get, "/apis/apps/v1", None);
        assert!(!path.resource_request);
        assert_eq!(
            (path.verb.as_str(), path.path.as_str()),
            ("get", "/apis/apps/v1")
        );
    }

    #[test]
    fn negotiation() {
        assert_eq!(
            negotiate(Some(
                "application/json;as=Table;v=v1;g=meta.k8s.io,application/json;as=Table;v=v1beta1;g=meta.k8s.io,application/json"
            )),
            Some(Output::Table)
        );
        assert_eq!(
            negotiate(Some("application/vnd.kubernetes.protobuf, */*")),
            Some(Output::Json)
        );
        assert_eq!(
            negotiate(Some("application/vnd.kubernetes.protobuf")),
            Some(Output::Protobuf)
        );
        assert_eq!(
            negotiate(Some(
                "application/vnd.kubernetes.protobuf;as=Table;g=meta.k8s.io;v=v1"
            )),
            None
        );
        assert_eq!(
            negotiate(Some(
                "application/json;g=apidiscovery.k8s.io;v=v2;as=APIGroupDiscoveryList,application/json"
            )),
            Some(Output::AggregatedDiscovery)
        );
        assert_eq!(negotiate(None), Some(Output::Json));
    }

    #[test]
    fn percent_decoding() {
        assert_eq!(percent_decode("a%2Fb"), "a/b");
        assert_eq!(percent_decode("100%"), "100%");
        assert_eq!(percent_decode("%é%4"), "%é%4");
    }
}
