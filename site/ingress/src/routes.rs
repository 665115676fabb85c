//! The routing table (pure): Ingresses of the site's class compiled into hosts, paths and
//! weighted backends, and the TLS Secrets by host. Requests pick a host group first (exact
//! host, then `*.wildcard`, then rules without a host, as ingress-nginx's server blocks do),
//! then the most specific path (Exact before Prefix, longer before shorter); nothing matched
//! goes to the default backend.

use std::collections::BTreeMap;

use k8s_openapi::api::networking::v1::{Ingress, IngressBackend};

/// The IngressClass the site serves.
pub const CLASS: &str = "edgesite";
/// Its `spec.controller`.
pub const CONTROLLER: &str = "edgesite.io/ingress-controller";
/// The annotation that named a class before `ingressClassName`.
pub const LEGACY_CLASS_ANNOTATION: &str = "kubernetes.io/ingress.class";

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PortRef {
    Number(u16),
    Name(String),
}

impl std::fmt::Display for PortRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PortRef::Number(n) => write!(f, "{n}"),
            PortRef::Name(n) => f.write_str(n),
        }
    }
}

/// A Service port to send requests to, with its share of them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackendRef {
    pub namespace: String,
    pub service: String,
    pub port: PortRef,
    pub weight: u32,
}

impl std::fmt::Display for BackendRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}:{}", self.namespace, self.service, self.port)
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PathMatch {
    Exact(String),
    /// Element-wise prefix, trailing slash ignored: `/foo` matches `/foo`, `/foo/` and
    /// `/foo/bar`, not `/foobar`.
    Prefix(String),
}

impl PathMatch {
    pub fn prefix(path: &str) -> Self {
        let trimmed = path.trim_end_matches('/');
        PathMatch::Prefix(if trimmed.is_empty() {
            "/".to_string()
        } else {
            trimmed.to_string()
        })
    }

    pub fn matches(&self, path: &str) -> bool {
        match self {
            PathMatch::Exact(p) => p == path,
            PathMatch::Prefix(p) if p == "/" => true,
            PathMatch::Prefix(p) => path
                .strip_prefix(p.as_str())
                .is_some_and(|rest| rest.is_empty() || rest.starts_with('/')),
        }
    }
}

/// A header's edits (Gateway API `requestHeaderModifier` / `responseHeaderModifier`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HeaderEdit {
    pub set: Vec<(String, String)>,
    pub add: Vec<(String, String)>,
    pub remove: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PathRewrite {
    Full(String),
    /// The matched prefix replaced by this.
    Prefix(String),
}

/// What a route does to a request besides sending it on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Filter {
    RequestHeaders(HeaderEdit),
    ResponseHeaders(HeaderEdit),
    Redirect {
        scheme: Option<String>,
        hostname: Option<String>,
        port: Option<u16>,
        status: u16,
        path: Option<PathRewrite>,
    },
    Rewrite {
        hostname: Option<String>,
        path: Option<PathRewrite>,
    },
}

/// One match of one host and where it goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    pub path: PathMatch,
    /// The largest request body this route takes (`Some(0)`: no limit; `None`: the node's).
    pub max_body: Option<u64>,
    /// Gateway API matches besides the path: method, headers (lowercase name, exact value),
    /// query parameters (exact).
    pub method: Option<String>,
    pub headers: Vec<(String, String)>,
    pub query: Vec<(String, String)>,
    /// Only for requests on this scheme (`http`, `https`), or on both.
    pub scheme: Option<&'static str>,
    pub filters: Vec<Filter>,
    pub backends: Vec<BackendRef>,
    /// Who asked for it (`Ingress shop/web`, `HTTPRoute shop/web`), for error pages and logs.
    pub source: String,
}

/// What a route is matched against.
pub struct RequestView<'a> {
    pub scheme: &'a str,
    /// Lowercase, without a port.
    pub host: &'a str,
    pub path: &'a str,
    pub method: &'a str,
    pub headers: &'a http::HeaderMap,
    pub query: Option<&'a str>,
}

impl Route {
    /// A route of a path only, to `backends`.
    pub fn to(path: PathMatch, backends: Vec<BackendRef>, source: String) -> Self {
        Route {
            path,
            max_body: None,
            method: None,
            headers: Vec::new(),
            query: Vec::new(),
            scheme: None,
            filters: Vec::new(),
            backends,
            source,
        }
    }

    /// Whether `other` matches exactly the same requests.
    fn same_match(&self, other: &Route) -> bool {
        self.path == other.path
            && self.method == other.method
            && self.headers == other.headers
            && self.query == other.query
            && self.scheme == other.scheme
    }

    fn matches(&self, request: &RequestView<'_>) -> bool {
        self.scheme.is_none_or(|s| s == request.scheme)
            && self.path.matches(request.path)
            && self.method.as_deref().is_none_or(|m| m == request.method)
            && self.headers.iter().all(|(name, value)| {
                request
                    .headers
                    .get_all(name.as_str())
                    .iter()
                    .any(|v| v.as_bytes() == value.as_bytes())
            })
            && self.query.iter().all(|(name, value)| {
                request.query.is_some_and(|q| {
                    q.split('&').any(|pair| {
                        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
                        k == name && v == value
                    })
                })
            })
    }

    /// Sort key (Gateway API precedence, which Ingress's agrees with): Exact path, then the
    /// longest prefix, then a method match, then more header and query matches.
    #[allow(clippy::type_complexity)]
    fn rank(
        &self,
    ) -> (
        u8,
        std::cmp::Reverse<usize>,
        bool,
        std::cmp::Reverse<usize>,
        std::cmp::Reverse<usize>,
    ) {
        let (kind, length) = match &self.path {
            PathMatch::Exact(p) => (0u8, p.len()),
            PathMatch::Prefix(p) => (1u8, p.len()),
        };
        (
            kind,
            std::cmp::Reverse(length),
            self.method.is_none(),
            std::cmp::Reverse(self.headers.len()),
            std::cmp::Reverse(self.query.len()),
        )
    }
}

/// Something wrong with an object, reported as an Event on it; the object's other rules work.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub namespace: String,
    pub name: String,
    pub reason: &'static str,
    pub message: String,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Table {
    /// Host (lowercase) -> routes, most specific first.
    exact: BTreeMap<String, Vec<Route>>,
    /// `*.example.com` keyed by `example.com`.
    wildcard: BTreeMap<String, Vec<Route>>,
    /// Rules without a host.
    any: Vec<Route>,
    default_backend: Option<Route>,
    /// Host (or `*.suffix`) -> (namespace, Secret name).
    tls: BTreeMap<String, (String, String)>,
}

/// The Ingress annotation (ingress-nginx's, found in many manifests) that sets the largest
/// request body its routes take: `8m`, `512k`, `1g`, bytes without a unit, `0` for no limit.
pub const BODY_SIZE_ANNOTATION: &str = "nginx.ingress.kubernetes.io/proxy-body-size";

/// A size as nginx writes it: a number of bytes, or of `k`, `m` or `g` (either case).
pub fn parse_size(text: &str) -> Option<u64> {
    let text = text.trim();
    let (number, unit) = match text.char_indices().last()? {
        (i, c) if c.is_ascii_alphabetic() => (&text[..i], c.to_ascii_lowercase()),
        _ => (text, 'b'),
    };
    let n: u64 = number.parse().ok()?;
    let shift = match unit {
        'b' => 0,
        'k' => 10,
        'm' => 20,
        'g' => 30,
        _ => return None,
    };
    n.checked_mul(1 << shift)
}

/// Whether the site's controller serves `ingress`: its class is ours, or it names none and
/// ours is the default.
pub fn is_ours(ingress: &Ingress, ours_is_default: bool) -> bool {
    let class = ingress
        .spec
        .as_ref()
        .and_then(|s| s.ingress_class_name.as_deref())
        .or_else(|| {
            ingress
                .metadata
                .annotations
                .as_ref()?
                .get(LEGACY_CLASS_ANNOTATION)
                .map(String::as_str)
        });
    match class {
        Some(class) => class == CLASS,
        None => ours_is_default,
    }
}

fn backend_of(namespace: &str, backend: &IngressBackend) -> Option<BackendRef> {
    let service = backend.service.as_ref()?;
    let port = service.port.as_ref()?;
    let port = match (&port.number, &port.name) {
        (Some(n), _) => PortRef::Number(u16::try_from(*n).ok()?),
        (None, Some(name)) => PortRef::Name(name.clone()),
        (None, None) => return None,
    };
    Some(BackendRef {
        namespace: namespace.to_string(),
        service: service.name.clone(),
        port,
        weight: 1,
    })
}

/// Whether `host` is a name an Ingress rule may carry (upstream's validation: DNS-1123
/// subdomain, optionally with a leading `*.`).
fn valid_host(host: &str) -> bool {
    let name = host.strip_prefix("*.").unwrap_or(host);
    !name.is_empty()
        && name.len() <= 253
        && name.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
                && !label.starts_with('-')
                && !label.ends_with('-')
        })
}

impl Table {
    /// Compiles the Ingresses the site serves (already filtered by [`is_ours`]). Oldest first
    /// wins a host and path (or the default backend, or a TLS host) that several name.
    pub fn build(ingresses: &[&Ingress]) -> (Table, Vec<Problem>) {
        let mut ordered: Vec<&Ingress> = ingresses.to_vec();
        ordered.sort_by_key(|i| {
            (
                i.metadata.creation_timestamp.clone().map(|t| t.0),
                i.metadata.namespace.clone(),
                i.metadata.name.clone(),
            )
        });
        let mut table = Table::default();
        let mut problems = Vec::new();
        for ingress in ordered {
            let namespace = ingress.metadata.namespace.clone().unwrap_or_default();
            let name = ingress.metadata.name.clone().unwrap_or_default();
            let source = format!("Ingress {namespace}/{name}");
            let mut problem = |reason: &'static str, message: String| {
                problems.push(Problem {
                    namespace: namespace.clone(),
                    name: name.clone(),
                    reason,
                    message,
                })
            };
            let Some(spec) = &ingress.spec else { continue };
            let max_body = match ingress
                .metadata
                .annotations
                .as_ref()
                .and_then(|a| a.get(BODY_SIZE_ANNOTATION))
            {
                None => None,
                Some(text) => match parse_size(text) {
                    Some(size) => Some(size),
                    None => {
                        problem(
                            "InvalidAnnotation",
                            format!(
                                "{BODY_SIZE_ANNOTATION}: {text:?} is not a size (8m, 512k, 1g, 0 for no limit); the node's limit applies"
                            ),
                        );
                        None
                    }
                },
            };
            if let Some(default) = &spec.default_backend {
                match backend_of(&namespace, default) {
                    Some(backend) if table.default_backend.is_none() => {
                        let mut route =
                            Route::to(PathMatch::prefix("/"), vec![backend], source.clone());
                        route.max_body = max_body;
                        table.default_backend = Some(route);
                    }
                    Some(_) => problem(
                        "Conflict",
                        format!(
                            "the default backend is already {}'s",
                            table.default_backend.as_ref().map_or("", |r| &r.source)
                        ),
                    ),
                    None => problem(
                        "InvalidBackend",
                        "the default backend names no Service port (resource backends are not served)".into(),
                    ),
                }
            }
            for rule in spec.rules.iter().flatten() {
                let host = rule.host.as_deref().map(str::to_ascii_lowercase);
                if let Some(host) = &host
                    && !valid_host(host)
                {
                    problem("InvalidHost", format!("{host:?} is not a valid host name"));
                    continue;
                }
                let routes = match host.as_deref() {
                    None | Some("") => &mut table.any,
                    Some(h) => match h.strip_prefix("*.") {
                        Some(suffix) => table.wildcard.entry(suffix.to_string()).or_default(),
                        None => table.exact.entry(h.to_string()).or_default(),
                    },
                };
                for path in rule.http.iter().flat_map(|h| h.paths.iter()) {
                    let text = path.path.clone().unwrap_or_else(|| "/".into());
                    if !text.starts_with('/') {
                        problem("InvalidPath", format!("path {text:?} must start with /"));
                        continue;
                    }
                    let matcher = match path.path_type.as_str() {
                        "Exact" => PathMatch::Exact(text),
                        _ => PathMatch::prefix(&text), // Prefix, ImplementationSpecific
                    };
                    let Some(backend) = backend_of(&namespace, &path.backend) else {
                        problem(
                            "InvalidBackend",
                            format!("path {matcher:?} names no Service port"),
                        );
                        continue;
                    };
                    let mut route = Route::to(matcher.clone(), vec![backend], source.clone());
                    route.max_body = max_body;
                    if let Some(taken) = routes.iter().find(|r| r.same_match(&route)) {
                        problem(
                            "Conflict",
                            format!(
                                "host {} path {matcher:?} is already {}'s",
                                host.as_deref().unwrap_or("*"),
                                taken.source
                            ),
                        );
                        continue;
                    }
                    routes.push(route);
                }
            }
            for tls in spec.tls.iter().flatten() {
                let Some(secret) = tls.secret_name.clone().filter(|s| !s.is_empty()) else {
                    continue; // upstream: the default certificate
                };
                for host in tls.hosts.iter().flatten() {
                    table
                        .tls
                        .entry(host.to_ascii_lowercase())
                        .or_insert_with(|| (namespace.clone(), secret.clone()));
                }
            }
        }
        table.finish();
        (table, problems)
    }

    /// The routes of `host` (`*.suffix` for a wildcard, `None` for any host), for other kinds of
    /// routes to add to; [`Table::finish`] orders them again.
    pub fn routes_mut(&mut self, host: Option<&str>) -> &mut Vec<Route> {
        match host {
            None => &mut self.any,
            Some(h) => match h.strip_prefix("*.") {
                Some(suffix) => self.wildcard.entry(suffix.to_string()).or_default(),
                None => self.exact.entry(h.to_string()).or_default(),
            },
        }
    }

    /// Adds a TLS Secret for `host` (`*.suffix`, or `""` for names nothing else covers) unless
    /// one is there.
    pub fn add_tls(&mut self, host: &str, namespace: &str, secret: &str) {
        self.tls
            .entry(host.to_ascii_lowercase())
            .or_insert_with(|| (namespace.to_string(), secret.to_string()));
    }

    /// Orders every host's routes by precedence (stable: earlier additions win ties).
    pub fn finish(&mut self) {
        for routes in self
            .exact
            .values_mut()
            .chain(self.wildcard.values_mut())
            .chain(std::iter::once(&mut self.any))
        {
            routes.sort_by_key(|r| r.rank());
        }
    }

    /// The routes of the group `host` falls in.
    fn group(&self, host: &str) -> &[Route] {
        if let Some(routes) = self.exact.get(host) {
            return routes;
        }
        if let Some((_, suffix)) = host.split_once('.')
            && let Some(routes) = self.wildcard.get(suffix)
        {
            return routes;
        }
        &self.any
    }

    /// Where a request goes.
    pub fn route(&self, request: &RequestView<'_>) -> Option<&Route> {
        self.group(request.host)
            .iter()
            .find(|r| r.matches(request))
            .or(self.default_backend.as_ref())
    }

    /// The TLS Secret for `host`, by exact name then wildcard.
    pub fn tls_secret(&self, host: &str) -> Option<&(String, String)> {
        self.tls.get(host).or_else(|| {
            let (_, suffix) = host.split_once('.')?;
            self.tls.get(&format!("*.{suffix}"))
        })
    }

    /// Whether a request for `host` has any route (for redirects' and 404s' sake).
    pub fn has_host(&self, host: &str) -> bool {
        !self.group(host).is_empty()
    }

    /// Every TLS Secret named, deduplicated.
    pub fn tls_secrets(&self) -> Vec<(String, String)> {
        let mut all: Vec<(String, String)> = self.tls.values().cloned().collect();
        all.sort();
        all.dedup();
        all
    }

    /// Hosts with a TLS Secret (`*.suffix` for wildcards).
    pub fn tls_hosts(&self) -> impl Iterator<Item = (&String, &(String, String))> {
        self.tls.iter()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn ingress(name: &str, created: &str, spec: serde_json::Value) -> Ingress {
        serde_json::from_value(json!({
            "metadata": {"name": name, "namespace": "shop", "creationTimestamp": created},
            "spec": spec
        }))
        .unwrap()
    }

    fn target(table: &Table, host: &str, path: &str) -> Option<String> {
        let headers = http::HeaderMap::new();
        let request = RequestView {
            scheme: "http",
            host,
            path,
            method: "GET",
            headers: &headers,
            query: None,
        };
        table.route(&request).map(|r| r.backends[0].to_string())
    }

    #[test]
    fn body_size_annotations_set_the_routes_limit() {
        assert_eq!(parse_size("8m"), Some(8 << 20));
        assert_eq!(parse_size("512K"), Some(512 << 10));
        assert_eq!(parse_size("1g"), Some(1 << 30));
        assert_eq!(parse_size("1024"), Some(1024));
        assert_eq!(parse_size("0"), Some(0));
        for bad in ["", "m", "8x", "-1m", "1.5m", "99999999999999999g"] {
            assert_eq!(parse_size(bad), None, "{bad:?}");
        }
        let rules = json!({"rules": [{"host": "up.example", "http": {"paths": [
            {"path": "/", "pathType": "Prefix", "backend": {"service": {"name": "up", "port": {"number": 80}}}}]}}],
            "defaultBackend": {"service": {"name": "up", "port": {"number": 80}}}});
        let mut small = ingress("small", "2026-01-01T00:00:00Z", rules.clone());
        small.metadata.annotations =
            Some([(BODY_SIZE_ANNOTATION.to_string(), "1k".to_string())].into());
        let (table, problems) = Table::build(&[&small]);
        assert!(problems.is_empty(), "{problems:?}");
        let headers = http::HeaderMap::new();
        let view = |host| RequestView {
            scheme: "http",
            host,
            path: "/",
            method: "POST",
            headers: &headers,
            query: None,
        };
        assert_eq!(
            table.route(&view("up.example")).unwrap().max_body,
            Some(1024)
        );
        assert_eq!(
            table.route(&view("other.example")).unwrap().max_body,
            Some(1024)
        );
        let mut bad = ingress("bad", "2026-01-01T00:00:00Z", rules);
        bad.metadata.annotations =
            Some([(BODY_SIZE_ANNOTATION.to_string(), "lots".to_string())].into());
        let (table, problems) = Table::build(&[&bad]);
        assert_eq!(problems.len(), 1);
        assert_eq!(problems[0].reason, "InvalidAnnotation");
        assert_eq!(
            table.route(&view("up.example")).unwrap().max_body,
            None,
            "the node's limit"
        );
    }

    #[test]
    fn hosts_then_the_most_specific_path() {
        let web = ingress(
            "web",
            "2026-01-01T00:00:00Z",
            json!({
                "rules": [
                    {"host": "shop.example", "http": {"paths": [
                        {"path": "/", "pathType": "Prefix", "backend": {"service": {"name": "front", "port": {"number": 80}}}},
                        {"path": "/api/", "pathType": "Prefix", "backend": {"service": {"name": "api", "port": {"name": "http"}}}},
                        {"path": "/api", "pathType": "Exact", "backend": {"service": {"name": "exact", "port": {"number": 81}}}}
                    ]}},
                    {"host": "*.example", "http": {"paths": [
                        {"path": "/", "pathType": "ImplementationSpecific", "backend": {"service": {"name": "wild", "port": {"number": 80}}}}
                    ]}},
                    {"http": {"paths": [
                        {"path": "/status", "pathType": "Prefix", "backend": {"service": {"name": "status", "port": {"number": 80}}}}
                    ]}}
                ],
                "defaultBackend": {"service": {"name": "fallback", "port": {"number": 80}}},
                "tls": [{"hosts": ["shop.example"], "secretName": "shop-tls"}, {"hosts": ["*.example"], "secretName": "wild-tls"}]
            }),
        );
        let (table, problems) = Table::build(&[&web]);
        assert!(problems.is_empty(), "{problems:?}");
        assert_eq!(
            target(&table, "shop.example", "/").unwrap(),
            "shop/front:80"
        );
        assert_eq!(
            target(&table, "shop.example", "/api").unwrap(),
            "shop/exact:81"
        );
        assert_eq!(
            target(&table, "shop.example", "/api/v1").unwrap(),
            "shop/api:http"
        );
        assert_eq!(
            target(&table, "shop.example", "/api/").unwrap(),
            "shop/api:http"
        );
        assert_eq!(
            target(&table, "shop.example", "/apis").unwrap(),
            "shop/front:80"
        );
        assert_eq!(target(&table, "cdn.example", "/x").unwrap(), "shop/wild:80");
        // A wildcard covers one label only.
        assert_eq!(
            target(&table, "a.b.example", "/status").unwrap(),
            "shop/status:80"
        );
        assert_eq!(
            target(&table, "other", "/nothing").unwrap(),
            "shop/fallback:80"
        );
        assert_eq!(
            table.tls_secret("shop.example").unwrap(),
            &("shop".to_string(), "shop-tls".to_string())
        );
        assert_eq!(table.tls_secret("cdn.example").unwrap().1, "wild-tls");
        assert!(table.tls_secret("example").is_none());
    }

    #[test]
    fn the_oldest_ingress_keeps_a_path_and_bad_rules_do_not_break_the_rest() {
        let first = ingress(
            "first",
            "2026-01-01T00:00:00Z",
            json!({"rules": [{"host": "a.example", "http": {"paths": [
                {"path": "/", "pathType": "Prefix", "backend": {"service": {"name": "one", "port": {"number": 80}}}}
            ]}}]}),
        );
        let second = ingress(
            "second",
            "2026-01-02T00:00:00Z",
            json!({"rules": [
                {"host": "a.example", "http": {"paths": [
                    {"path": "/", "pathType": "Prefix", "backend": {"service": {"name": "two", "port": {"number": 80}}}},
                    {"path": "/two", "pathType": "Prefix", "backend": {"service": {"name": "two", "port": {"number": 80}}}}
                ]}},
                {"host": "Bad_Host!", "http": {"paths": [
                    {"path": "/", "pathType": "Prefix", "backend": {"service": {"name": "two", "port": {"number": 80}}}}
                ]}}
            ]}),
        );
        let (table, problems) = Table::build(&[&second, &first]);
        assert_eq!(target(&table, "a.example", "/").unwrap(), "shop/one:80");
        assert_eq!(
            target(&table, "a.example", "/two/x").unwrap(),
            "shop/two:80"
        );
        let reasons: Vec<&str> = problems.iter().map(|p| p.reason).collect();
        assert_eq!(reasons, ["Conflict", "InvalidHost"], "{problems:?}");
        assert!(problems[0].message.contains("Ingress shop/first"));
        assert!(
            target(&table, "b.example", "/").is_none(),
            "no default: 404"
        );
    }

    #[test]
    fn class_selection() {
        let mut i = ingress("x", "2026-01-01T00:00:00Z", json!({}));
        assert!(is_ours(&i, true));
        assert!(!is_ours(&i, false));
        i.spec.as_mut().unwrap().ingress_class_name = Some("nginx".into());
        assert!(!is_ours(&i, true));
        i.spec.as_mut().unwrap().ingress_class_name = Some(CLASS.into());
        assert!(is_ours(&i, false));
        let mut legacy = ingress("y", "2026-01-01T00:00:00Z", json!({}));
        legacy.metadata.annotations =
            Some([(LEGACY_CLASS_ANNOTATION.to_string(), CLASS.to_string())].into());
        assert!(is_ours(&legacy, false));
    }
}
