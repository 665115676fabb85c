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
    None
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
        assert_eq!(negotiate(Some("application/vnd.kubernetes.protobuf")), None);
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
