//! Upstream's validation rules and messages: names, labels, annotations, and the required fields of
//! built-in kinds. Pure code; the result is a list of [`Cause`]s that becomes a 422 `Invalid`.

use std::collections::BTreeSet;

use serde_json::Value;

use crate::error::Cause;

const DNS1123_LABEL_MSG: &str = "a lowercase RFC 1123 label must consist of lower case alphanumeric characters or '-', and must start and end with an alphanumeric character (e.g. 'my-name',  or '123-abc', regex used for validation is '[a-z0-9]([-a-z0-9]*[a-z0-9])?')";
const DNS1123_SUBDOMAIN_MSG: &str = "a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters, '-' or '.', and must start and end with an alphanumeric character (e.g. 'example.com', regex used for validation is '[a-z0-9]([-a-z0-9]*[a-z0-9])?(\\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*')";
const DNS1035_LABEL_MSG: &str = "a DNS-1035 label must consist of lower case alphanumeric characters or '-', start with an alphabetic character, and end with an alphanumeric character (e.g. 'my-name',  or 'abc-123', regex used for validation is '[a-z]([-a-z0-9]*[a-z0-9])?')";
const QUALIFIED_NAME_MSG: &str = "name part must consist of alphanumeric characters, '-', '_' or '.', and must start and end with an alphanumeric character (e.g. 'MyName',  or 'my.name',  or '123-abc', regex used for validation is '([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]')";
const LABEL_VALUE_MSG: &str = "a valid label must be an empty string or consist of alphanumeric characters, '-', '_' or '.', and must start and end with an alphanumeric character (e.g. 'MyValue',  or 'my_value',  or '12345', regex used for validation is '(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?')";
const CONFIG_KEY_MSG: &str = "a valid config key must consist of alphanumeric characters, '-', '_' or '.' (e.g. 'key.name',  or 'KEY_NAME',  or 'key-name', regex used for validation is '[-._a-zA-Z0-9]+')";

fn alnum_lower(c: char) -> bool {
    c.is_ascii_lowercase() || c.is_ascii_digit()
}

fn dns_label_shape(s: &str) -> bool {
    !s.is_empty()
        && s.chars().all(|c| alnum_lower(c) || c == '-')
        && s.starts_with(alnum_lower)
        && s.ends_with(alnum_lower)
}

pub fn is_dns1123_label(s: &str) -> Result<(), String> {
    if s.len() > 63 {
        return Err("must be no more than 63 characters".into());
    }
    if !dns_label_shape(s) {
        return Err(DNS1123_LABEL_MSG.into());
    }
    Ok(())
}

pub fn is_dns1123_subdomain(s: &str) -> Result<(), String> {
    if s.len() > 253 {
        return Err("must be no more than 253 characters".into());
    }
    if s.is_empty() || !s.split('.').all(dns_label_shape) {
        return Err(DNS1123_SUBDOMAIN_MSG.into());
    }
    Ok(())
}

pub fn is_dns1035_label(s: &str) -> Result<(), String> {
    if s.len() > 63 {
        return Err("must be no more than 63 characters".into());
    }
    if !dns_label_shape(s) || !s.starts_with(|c: char| c.is_ascii_lowercase()) {
        return Err(DNS1035_LABEL_MSG.into());
    }
    Ok(())
}

fn name_part_ok(s: &str) -> bool {
    let alnum = |c: char| c.is_ascii_alphanumeric();
    !s.is_empty()
        && s.chars()
            .all(|c| alnum(c) || c == '-' || c == '_' || c == '.')
        && s.starts_with(alnum)
        && s.ends_with(alnum)
}

/// Label keys and annotation keys: `[prefix/]name`.
pub fn is_qualified_name(s: &str) -> Result<(), String> {
    let (prefix, name) = match s.split_once('/') {
        Some((p, n)) => (Some(p), n),
        None => (None, s),
    };
    if let Some(prefix) = prefix {
        if prefix.is_empty() {
            return Err("prefix part must be non-empty".into());
        }
        if let Err(e) = is_dns1123_subdomain(prefix) {
            return Err(format!("prefix part {e}"));
        }
    }
    if name.is_empty() {
        return Err("name part must be non-empty".into());
    }
    if name.len() > 63 {
        return Err("name part must be no more than 63 characters".into());
    }
    if !name_part_ok(name) {
        return Err(QUALIFIED_NAME_MSG.into());
    }
    Ok(())
}

pub fn is_label_value(s: &str) -> Result<(), String> {
    if s.len() > 63 {
        return Err("must be no more than 63 characters".into());
    }
    if !s.is_empty() && !name_part_ok(s) {
        return Err(LABEL_VALUE_MSG.into());
    }
    Ok(())
}

/// RBAC and a few other kinds only forbid what cannot be a path segment.
pub fn is_path_segment_name(s: &str) -> Result<(), String> {
    if s == "." || s == ".." {
        return Err(format!("may not be '{s}'"));
    }
    if s.contains('/') {
        return Err("may not contain '/'".into());
    }
    if s.contains('%') {
        return Err("may not contain '%'".into());
    }
    Ok(())
}

/// How a kind's names are checked.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum NameRule {
    Subdomain,
    Label,
    Dns1035,
    PathSegment,
}

impl NameRule {
    pub fn check(self, s: &str) -> Result<(), String> {
        match self {
            NameRule::Subdomain => is_dns1123_subdomain(s),
            NameRule::Label => is_dns1123_label(s),
            NameRule::Dns1035 => is_dns1035_label(s),
            NameRule::PathSegment => is_path_segment_name(s),
        }
    }
}

/// Collects causes while walking an object.
#[derive(Default)]
pub struct Causes(pub Vec<Cause>);

impl Causes {
    pub fn push(&mut self, cause: Cause) {
        self.0.push(cause);
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    fn required_str<'a>(&mut self, object: &'a Value, key: &str, path: &str) -> Option<&'a str> {
        match object.get(key).and_then(Value::as_str) {
            Some(s) if !s.is_empty() => Some(s),
            _ => {
                self.push(Cause::required(path));
                None
            }
        }
    }
}

/// `metadata`: name, generateName, labels and annotations.
pub fn validate_metadata(meta: &Value, namespaced: bool, rule: NameRule, causes: &mut Causes) {
    let name = meta.get("name").and_then(Value::as_str).unwrap_or("");
    if name.is_empty() {
        causes.push(Cause::new(
            "FieldValueRequired",
            "metadata.name",
            "Required value: name or generateName is required".into(),
        ));
    } else if let Err(why) = rule.check(name) {
        causes.push(Cause::invalid("metadata.name", &Value::from(name), &why));
    }
    let namespace = meta.get("namespace").and_then(Value::as_str).unwrap_or("");
    if namespaced && namespace.is_empty() {
        causes.push(Cause::required("metadata.namespace"));
    }
    if !namespaced && !namespace.is_empty() {
        causes.push(Cause::forbidden(
            "metadata.namespace",
            "not allowed on this type",
        ));
    }
    validate_labels(meta.get("labels"), "metadata.labels", causes);
    if let Some(annotations) = meta.get("annotations").and_then(Value::as_object) {
        let mut total = 0;
        for (k, v) in annotations {
            if let Err(why) = is_qualified_name(&k.to_lowercase()) {
                causes.push(Cause::invalid(
                    "metadata.annotations",
                    &Value::from(k.as_str()),
                    &why,
                ));
            }
            total += k.len() + v.as_str().map(str::len).unwrap_or(0);
        }
        if total > 256 * 1024 {
            causes.push(Cause::too_long("metadata.annotations", 256 * 1024));
        }
    }
}

pub fn validate_labels(labels: Option<&Value>, path: &str, causes: &mut Causes) {
    let Some(labels) = labels.and_then(Value::as_object) else {
        return;
    };
    for (k, v) in labels {
        if let Err(why) = is_qualified_name(k) {
            causes.push(Cause::invalid(path, &Value::from(k.as_str()), &why));
        }
        let value = v.as_str().unwrap_or_default();
        if let Err(why) = is_label_value(value) {
            causes.push(Cause::invalid(path, &Value::from(value), &why));
        }
    }
}

fn items<'a>(object: &'a Value, key: &str) -> &'a [Value] {
    object
        .get(key)
        .and_then(Value::as_array)
        .map(Vec::as_slice)
        .unwrap_or(&[])
}

fn check_port(causes: &mut Causes, value: Option<&Value>, path: &str, required: bool) {
    match value.and_then(Value::as_i64) {
        None if required => causes.push(Cause::required(path)),
        None => {}
        Some(p) if !(1..=65535).contains(&p) => causes.push(Cause::invalid(
            path,
            &Value::from(p),
            "must be between 1 and 65535, inclusive",
        )),
        Some(_) => {}
    }
}

fn check_enum(causes: &mut Causes, object: &Value, key: &str, path: &str, allowed: &[&str]) {
    if let Some(v) = object.get(key).and_then(Value::as_str)
        && !allowed.contains(&v)
    {
        causes.push(Cause::unsupported(path, &Value::from(v), allowed));
    }
}

fn validate_container(c: &Value, path: &str, volumes: &BTreeSet<String>, causes: &mut Causes) {
    if let Some(name) = causes.required_str(c, "name", &format!("{path}.name"))
        && let Err(why) = is_dns1123_label(name)
    {
        causes.push(Cause::invalid(
            format!("{path}.name"),
            &Value::from(name),
            &why,
        ));
    }
    causes.required_str(c, "image", &format!("{path}.image"));
    check_enum(
        causes,
        c,
        "imagePullPolicy",
        &format!("{path}.imagePullPolicy"),
        &["Always", "IfNotPresent", "Never"],
    );
    let mut port_names = BTreeSet::new();
    for (i, p) in items(c, "ports").iter().enumerate() {
        let pp = format!("{path}.ports[{i}]");
        check_port(
            causes,
            p.get("containerPort"),
            &format!("{pp}.containerPort"),
            true,
        );
        check_port(causes, p.get("hostPort"), &format!("{pp}.hostPort"), false);
        check_enum(
            causes,
            p,
            "protocol",
            &format!("{pp}.protocol"),
            &["TCP", "UDP", "SCTP"],
        );
        if let Some(n) = p.get("name").and_then(Value::as_str)
            && !port_names.insert(n.to_string())
        {
            causes.push(Cause::duplicate(format!("{pp}.name"), &Value::from(n)));
        }
    }
    for (i, e) in items(c, "env").iter().enumerate() {
        causes.required_str(e, "name", &format!("{path}.env[{i}].name"));
        // The referenced ConfigMap or Secret must be named (a protobuf body whose embedded
        // LocalObjectReference was lost arrived without one).
        for reference in ["configMapKeyRef", "secretKeyRef"] {
            if let Some(r) = e.pointer(&format!("/valueFrom/{reference}")) {
                let rp = format!("{path}.env[{i}].valueFrom.{reference}");
                causes.required_str(r, "name", &format!("{rp}.name"));
                causes.required_str(r, "key", &format!("{rp}.key"));
            }
        }
    }
    for (i, m) in items(c, "volumeMounts").iter().enumerate() {
        let mp = format!("{path}.volumeMounts[{i}]");
        if let Some(name) = causes.required_str(m, "name", &format!("{mp}.name"))
            && !volumes.contains(name)
        {
            causes.push(Cause::new(
                "FieldValueNotFound",
                format!("{mp}.name"),
                format!("Not found: {name:?}"),
            ));
        }
        causes.required_str(m, "mountPath", &format!("{mp}.mountPath"));
    }
}

/// A PodSpec at `path` (`spec` for pods, `spec.template.spec` for workloads).
pub fn validate_pod_spec(spec: Option<&Value>, path: &str, causes: &mut Causes) {
    validate_pod_spec_with(spec, path, &[], causes);
}

/// A PodSpec whose containers may also mount `claim_volumes` (a StatefulSet's volumeClaimTemplates).
pub fn validate_pod_spec_with(
    spec: Option<&Value>,
    path: &str,
    claim_volumes: &[String],
    causes: &mut Causes,
) {
    let Some(spec) = spec.filter(|s| s.is_object()) else {
        causes.push(Cause::required(format!("{path}.containers")));
        return;
    };
    let mut volumes: BTreeSet<String> = claim_volumes.iter().cloned().collect();
    for (i, v) in items(spec, "volumes").iter().enumerate() {
        // Every field of a volume but its name is a source; it needs one.
        let sources = v.as_object().map_or(0, |o| {
            o.iter()
                .filter(|(k, s)| *k != "name" && !s.is_null())
                .count()
        });
        if sources == 0 {
            causes.push(Cause::new(
                "FieldValueRequired",
                format!("{path}.volumes[{i}]"),
                "Required value: must specify a volume type".to_string(),
            ));
        }
        let vp = format!("{path}.volumes[{i}].name");
        if let Some(name) = causes.required_str(v, "name", &vp) {
            if let Err(why) = is_dns1123_label(name) {
                causes.push(Cause::invalid(&vp, &Value::from(name), &why));
            }
            if !volumes.insert(name.to_string()) {
                causes.push(Cause::duplicate(&vp, &Value::from(name)));
            }
        }
    }
    let containers = items(spec, "containers");
    if containers.is_empty() {
        causes.push(Cause::required(format!("{path}.containers")));
    }
    let mut names = BTreeSet::new();
    for (list, items) in [
        ("initContainers", items(spec, "initContainers")),
        ("containers", containers),
    ] {
        for (i, c) in items.iter().enumerate() {
            let cp = format!("{path}.{list}[{i}]");
            validate_container(c, &cp, &volumes, causes);
            if let Some(name) = c.get("name").and_then(Value::as_str)
                && !name.is_empty()
                && !names.insert(name.to_string())
            {
                causes.push(Cause::duplicate(format!("{cp}.name"), &Value::from(name)));
            }
        }
    }
    check_enum(
        causes,
        spec,
        "restartPolicy",
        &format!("{path}.restartPolicy"),
        &["Always", "OnFailure", "Never"],
    );
    if spec.get("shareProcessNamespace") == Some(&Value::Bool(true))
        && spec.get("hostPID") == Some(&Value::Bool(true))
    {
        causes.push(Cause::invalid(
            format!("{path}.securityContext.shareProcessNamespace"),
            &Value::Bool(true),
            "ShareProcessNamespace and HostPID cannot both be enabled",
        ));
    }
    check_enum(
        causes,
        spec,
        "dnsPolicy",
        &format!("{path}.dnsPolicy"),
        &["ClusterFirstWithHostNet", "ClusterFirst", "Default", "None"],
    );
    if let Some(n) = spec.get("nodeName").and_then(Value::as_str)
        && !n.is_empty()
        && let Err(why) = is_dns1123_subdomain(n)
    {
        causes.push(Cause::invalid(
            format!("{path}.nodeName"),
            &Value::from(n),
            &why,
        ));
    }
    validate_labels(
        spec.get("nodeSelector"),
        &format!("{path}.nodeSelector"),
        causes,
    );
    for (i, t) in items(spec, "tolerations").iter().enumerate() {
        check_enum(
            causes,
            t,
            "operator",
            &format!("{path}.tolerations[{i}].operator"),
            &["Equal", "Exists"],
        );
        check_enum(
            causes,
            t,
            "effect",
            &format!("{path}.tolerations[{i}].effect"),
            &["NoSchedule", "PreferNoSchedule", "NoExecute"],
        );
    }
}

/// A workload's selector and template (Deployment, ReplicaSet, DaemonSet, StatefulSet, Job).
pub fn validate_workload(
    spec: &Value,
    restart_policies: &[&str],
    selector_required: bool,
    causes: &mut Causes,
) {
    let selector = spec.get("selector");
    let has_selector = selector.is_some_and(|s| {
        s.get("matchLabels")
            .and_then(Value::as_object)
            .is_some_and(|m| !m.is_empty())
            || s.get("matchExpressions")
                .and_then(Value::as_array)
                .is_some_and(|a| !a.is_empty())
    });
    if selector_required && !has_selector {
        if selector.is_none() {
            causes.push(Cause::required("spec.selector"));
        } else {
            causes.push(Cause::invalid(
                "spec.selector",
                selector.unwrap_or(&Value::Null),
                "empty selector is invalid for deployment",
            ));
        }
    }
    if let Some(r) = spec.get("replicas").and_then(Value::as_i64)
        && r < 0
    {
        causes.push(Cause::invalid(
            "spec.replicas",
            &Value::from(r),
            "must be greater than or equal to 0",
        ));
    }
    let template = spec.get("template");
    let labels = template.and_then(|t| t.pointer("/metadata/labels"));
    validate_labels(labels, "spec.template.metadata.labels", causes);
    if has_selector && let Some(selector) = selector {
        match crate::selectors::LabelSelector::from_object(selector) {
            Ok(sel) => {
                let map = labels
                    .and_then(Value::as_object)
                    .map(|m| {
                        m.iter()
                            .map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_string()))
                            .collect()
                    })
                    .unwrap_or_default();
                if !sel.matches(&map) {
                    causes.push(Cause::invalid(
                        "spec.template.metadata.labels",
                        &labels.cloned().unwrap_or(Value::Null),
                        "`selector` does not match template `labels`",
                    ));
                }
            }
            Err(why) => causes.push(Cause::invalid("spec.selector", selector, &why)),
        }
    }
    let pod_spec = template.and_then(|t| t.get("spec"));
    let claims: Vec<String> = items(spec, "volumeClaimTemplates")
        .iter()
        .filter_map(|c| {
            c.pointer("/metadata/name")
                .and_then(Value::as_str)
                .map(String::from)
        })
        .collect();
    validate_pod_spec_with(pod_spec, "spec.template.spec", &claims, causes);
    if let Some(p) = pod_spec
        .and_then(|s| s.get("restartPolicy"))
        .and_then(Value::as_str)
        && !restart_policies.contains(&p)
    {
        causes.push(Cause::unsupported(
            "spec.template.spec.restartPolicy",
            &Value::from(p),
            restart_policies,
        ));
    }
}

pub fn validate_service(spec: Option<&Value>, causes: &mut Causes) {
    let Some(spec) = spec else {
        causes.push(Cause::required("spec.ports"));
        return;
    };
    let kind = spec
        .get("type")
        .and_then(Value::as_str)
        .unwrap_or("ClusterIP");
    check_enum(
        causes,
        spec,
        "type",
        "spec.type",
        &["ClusterIP", "NodePort", "LoadBalancer", "ExternalName"],
    );
    let ports = items(spec, "ports");
    let headless = spec.get("clusterIP").and_then(Value::as_str) == Some("None");
    if ports.is_empty() && kind != "ExternalName" && !headless {
        causes.push(Cause::required("spec.ports"));
    }
    if kind == "ExternalName"
        && spec
            .get("externalName")
            .and_then(Value::as_str)
            .unwrap_or("")
            .is_empty()
    {
        causes.push(Cause::required("spec.externalName"));
    }
    let mut names = BTreeSet::new();
    for (i, p) in ports.iter().enumerate() {
        let pp = format!("spec.ports[{i}]");
        let name = p.get("name").and_then(Value::as_str).unwrap_or("");
        if ports.len() > 1 && name.is_empty() {
            causes.push(Cause::required(format!("{pp}.name")));
        }
        if !name.is_empty() && !names.insert(name.to_string()) {
            causes.push(Cause::duplicate(format!("{pp}.name"), &Value::from(name)));
        }
        check_port(causes, p.get("port"), &format!("{pp}.port"), true);
        check_port(causes, p.get("nodePort"), &format!("{pp}.nodePort"), false);
        check_enum(
            causes,
            p,
            "protocol",
            &format!("{pp}.protocol"),
            &["TCP", "UDP", "SCTP"],
        );
        if let Some(t) = p.get("targetPort").and_then(Value::as_i64)
            && !(1..=65535).contains(&t)
        {
            causes.push(Cause::invalid(
                format!("{pp}.targetPort"),
                &Value::from(t),
                "must be between 1 and 65535, inclusive",
            ));
        }
    }
    check_enum(
        causes,
        spec,
        "sessionAffinity",
        "spec.sessionAffinity",
        &["ClientIP", "None"],
    );
    for (key, path) in [
        ("externalTrafficPolicy", "spec.externalTrafficPolicy"),
        ("internalTrafficPolicy", "spec.internalTrafficPolicy"),
    ] {
        check_enum(causes, spec, key, path, &["Cluster", "Local"]);
    }
    if spec.get("externalTrafficPolicy").is_some() && !matches!(kind, "NodePort" | "LoadBalancer") {
        causes.push(Cause::invalid(
            "spec.externalTrafficPolicy",
            &spec["externalTrafficPolicy"],
            "may only be set when `type` is 'NodePort' or 'LoadBalancer'",
        ));
    }
    if spec.get("loadBalancerClass").is_some() && kind != "LoadBalancer" {
        causes.push(Cause::invalid(
            "spec.loadBalancerClass",
            &spec["loadBalancerClass"],
            "may only be used when `type` is 'LoadBalancer'",
        ));
    }
    for (i, ip) in items(spec, "externalIPs").iter().enumerate() {
        if ip
            .as_str()
            .is_none_or(|t| t.parse::<std::net::IpAddr>().is_err())
        {
            causes.push(Cause::invalid(
                format!("spec.externalIPs[{i}]"),
                ip,
                "must be a valid IP address, (e.g. 10.9.8.7 or 2001:db8::ffff)",
            ));
        }
    }
}

/// An Ingress host: a subdomain, optionally with one leading `*.` label, and not an IP.
fn check_ingress_host(causes: &mut Causes, host: &Value, path: &str) {
    let Some(text) = host.as_str() else { return };
    if text.parse::<std::net::IpAddr>().is_ok() {
        causes.push(Cause::invalid(
            path,
            host,
            "must be a DNS name, not an IP address",
        ));
        return;
    }
    let name = text.strip_prefix("*.").unwrap_or(text);
    if is_dns1123_subdomain(name).is_err() {
        let detail = if text.contains('*') {
            "a wildcard DNS-1123 subdomain must start with '*.', followed by a valid DNS subdomain, which must consist of lower case alphanumeric characters, '-' or '.' and end with an alphanumeric character (e.g. '*.example.com', regex used for validation is '\\*\\.[a-z0-9]([-a-z0-9]*[a-z0-9])?(\\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*')"
        } else {
            "a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters, '-' or '.', and must start and end with an alphanumeric character (e.g. 'example.com', regex used for validation is '[a-z0-9]([-a-z0-9]*[a-z0-9])?(\\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*')"
        };
        causes.push(Cause::invalid(path, host, detail));
    }
}

fn check_ingress_backend(causes: &mut Causes, backend: &Value, path: &str) {
    let service = backend.get("service");
    let resource = backend.get("resource");
    match (service, resource) {
        (Some(_), Some(_)) => causes.push(Cause::invalid(
            path,
            backend,
            "cannot set both service and resource backends",
        )),
        (None, None) => causes.push(Cause::invalid(
            path,
            backend,
            "one backend (service or resource) must be specified",
        )),
        (Some(service), None) => {
            if service
                .get("name")
                .and_then(Value::as_str)
                .unwrap_or("")
                .is_empty()
            {
                causes.push(Cause::required(format!("{path}.service.name")));
            }
            let port = service.get("port").cloned().unwrap_or(Value::Null);
            match (port.get("name"), port.get("number")) {
                (Some(_), Some(_)) => causes.push(Cause::invalid(
                    format!("{path}.service.port"),
                    &port,
                    "cannot set both port name & port number",
                )),
                (None, None) => causes.push(Cause::invalid(
                    format!("{path}.service.port"),
                    &port,
                    "port name or number is required",
                )),
                (None, Some(_)) => check_port(
                    causes,
                    port.get("number"),
                    &format!("{path}.service.port.number"),
                    true,
                ),
                (Some(_), None) => {}
            }
        }
        (None, Some(_)) => {}
    }
}

/// `networking.k8s.io/v1` Ingress, as upstream validates it.
pub fn validate_ingress(spec: Option<&Value>, causes: &mut Causes) {
    let Some(spec) = spec else {
        causes.push(Cause::invalid(
            "spec",
            &Value::Null,
            "either `defaultBackend` or `rules` must be specified",
        ));
        return;
    };
    let rules = items(spec, "rules");
    match spec.get("defaultBackend") {
        Some(backend) => check_ingress_backend(causes, backend, "spec.defaultBackend"),
        None if rules.is_empty() => causes.push(Cause::invalid(
            "spec.rules",
            &Value::Array(Vec::new()),
            "either `defaultBackend` or `rules` must be specified",
        )),
        None => {}
    }
    for (i, rule) in rules.iter().enumerate() {
        let rp = format!("spec.rules[{i}]");
        if let Some(host) = rule.get("host") {
            check_ingress_host(causes, host, &format!("{rp}.host"));
        }
        let Some(http) = rule.get("http") else {
            continue;
        };
        let paths = items(http, "paths");
        if paths.is_empty() {
            causes.push(Cause::required(format!("{rp}.http.paths")));
        }
        for (j, p) in paths.iter().enumerate() {
            let pp = format!("{rp}.http.paths[{j}]");
            match p.get("pathType").and_then(Value::as_str) {
                None => causes.push(Cause::required(format!("{pp}.pathType"))),
                Some("Exact" | "Prefix") => {
                    let path = p.get("path").and_then(Value::as_str).unwrap_or("");
                    if !path.starts_with('/') {
                        causes.push(Cause::invalid(
                            format!("{pp}.path"),
                            &Value::from(path),
                            "must be an absolute path",
                        ));
                    }
                }
                Some("ImplementationSpecific") => {}
                Some(_) => check_enum(
                    causes,
                    p,
                    "pathType",
                    &format!("{pp}.pathType"),
                    &["Exact", "Prefix", "ImplementationSpecific"],
                ),
            }
            match p.get("backend") {
                Some(backend) => check_ingress_backend(causes, backend, &format!("{pp}.backend")),
                None => causes.push(Cause::required(format!("{pp}.backend"))),
            }
        }
    }
    for (i, tls) in items(spec, "tls").iter().enumerate() {
        for (j, host) in items(tls, "hosts").iter().enumerate() {
            check_ingress_host(causes, host, &format!("spec.tls[{i}].hosts[{j}]"));
        }
    }
}

/// A CIDR such as 10.0.0.0/8 or fd00::/64: (address, prefix length).
fn parse_cidr(text: &str) -> Option<(std::net::IpAddr, u8)> {
    let (ip, len) = text.split_once('/')?;
    let ip: std::net::IpAddr = ip.parse().ok()?;
    let len: u8 = len.parse().ok()?;
    let max = if ip.is_ipv4() { 32 } else { 128 };
    (len <= max).then_some((ip, len))
}

fn cidr_contains(outer: (std::net::IpAddr, u8), inner: (std::net::IpAddr, u8)) -> bool {
    use std::net::IpAddr::{V4, V6};
    if inner.1 < outer.1 {
        return false;
    }
    match (outer.0, inner.0) {
        (V4(o), V4(i)) => outer.1 == 0 || (u32::from(o) ^ u32::from(i)) >> (32 - outer.1) == 0,
        (V6(o), V6(i)) => outer.1 == 0 || (u128::from(o) ^ u128::from(i)) >> (128 - outer.1) == 0,
        _ => false,
    }
}

/// `networking.k8s.io/v1` NetworkPolicy, as upstream validates it.
pub fn validate_network_policy(spec: Option<&Value>, causes: &mut Causes) {
    let Some(spec) = spec else {
        causes.push(Cause::required("spec"));
        return;
    };
    for (i, t) in items(spec, "policyTypes").iter().enumerate() {
        if !matches!(t.as_str(), Some("Ingress" | "Egress")) {
            causes.push(Cause::unsupported(
                format!("spec.policyTypes[{i}]"),
                t,
                &["Ingress", "Egress"],
            ));
        }
    }
    for (direction, peers_key) in [("ingress", "from"), ("egress", "to")] {
        for (i, rule) in items(spec, direction).iter().enumerate() {
            let rp = format!("spec.{direction}[{i}]");
            for (j, port) in items(rule, "ports").iter().enumerate() {
                let pp = format!("{rp}.ports[{j}]");
                check_enum(
                    causes,
                    port,
                    "protocol",
                    &format!("{pp}.protocol"),
                    &["TCP", "UDP", "SCTP"],
                );
                let number = port.get("port").and_then(Value::as_i64);
                if number.is_some() {
                    check_port(causes, port.get("port"), &format!("{pp}.port"), true);
                }
                if let Some(end) = port.get("endPort").and_then(Value::as_i64) {
                    match number {
                        None => causes.push(Cause::invalid(
                            format!("{pp}.endPort"),
                            &Value::from(end),
                            "may not be specified when `port` is non-numeric",
                        )),
                        Some(n) if end < n => causes.push(Cause::invalid(
                            format!("{pp}.endPort"),
                            &Value::from(end),
                            "must be greater than or equal to `port`",
                        )),
                        Some(_) => {
                            check_port(causes, port.get("endPort"), &format!("{pp}.endPort"), true)
                        }
                    }
                }
            }
            for (j, peer) in items(rule, peers_key).iter().enumerate() {
                let pp = format!("{rp}.{peers_key}[{j}]");
                let Some(block) = peer.get("ipBlock") else {
                    continue;
                };
                if peer.get("podSelector").is_some() || peer.get("namespaceSelector").is_some() {
                    causes.push(Cause::invalid(
                        pp.clone(),
                        peer,
                        "may not specify more than 1 peer type",
                    ));
                }
                let cidr_text = block.get("cidr").and_then(Value::as_str).unwrap_or("");
                let Some(cidr) = parse_cidr(cidr_text) else {
                    causes.push(Cause::invalid(
                        format!("{pp}.ipBlock.cidr"),
                        &Value::from(cidr_text),
                        "must be a valid CIDR value, (e.g. 10.9.8.0/24 or 2001:db8::/64)",
                    ));
                    continue;
                };
                for (k, except) in items(block, "except").iter().enumerate() {
                    let text = except.as_str().unwrap_or("");
                    match parse_cidr(text) {
                        None => causes.push(Cause::invalid(
                            format!("{pp}.ipBlock.except[{k}]"),
                            except,
                            "must be a valid CIDR value, (e.g. 10.9.8.0/24 or 2001:db8::/64)",
                        )),
                        Some(inner) if !cidr_contains(cidr, inner) || inner.1 == cidr.1 => causes
                            .push(Cause::invalid(
                                format!("{pp}.ipBlock.except[{k}]"),
                                except,
                                "must be a strict subset of `cidr`",
                            )),
                        Some(_) => {}
                    }
                }
            }
        }
    }
}

/// ConfigMap and Secret keys.
/// The most data a ConfigMap or Secret holds (upstream's `MaxSecretSize`).
pub const MAX_CONFIG_DATA: usize = 1024 * 1024;

/// A ConfigMap's or Secret's data (values; base64 fields counted decoded) within
/// [`MAX_CONFIG_DATA`], as upstream checks it.
pub fn validate_config_size(object: &Value, base64_fields: &[&str], causes: &mut Causes) {
    let mut total = 0usize;
    for field in ["data", "binaryData"] {
        let Some(map) = object.get(field).and_then(Value::as_object) else {
            continue;
        };
        for v in map.values() {
            let text = v.as_str().unwrap_or_default();
            total += if base64_fields.contains(&field) {
                // Decoded length: three bytes per four characters, less the padding.
                let padding = text.bytes().rev().take_while(|b| *b == b'=').count();
                (text.len() / 4 * 3).saturating_sub(padding)
            } else {
                text.len()
            };
        }
    }
    if total > MAX_CONFIG_DATA {
        causes.push(Cause::too_long("data", MAX_CONFIG_DATA));
    }
}

pub fn validate_config_keys(object: &Value, causes: &mut Causes) {
    let mut seen = BTreeSet::new();
    for field in ["data", "binaryData", "stringData"] {
        if let Some(map) = object.get(field).and_then(Value::as_object) {
            for k in map.keys() {
                let ok = !k.is_empty()
                    && k.len() <= 253
                    && k.chars()
                        .all(|c| c.is_ascii_alphanumeric() || "-._".contains(c))
                    && k != "."
                    && k != "..";
                if !ok {
                    causes.push(Cause::invalid(
                        format!("{field}[{k}]"),
                        &Value::from(k.as_str()),
                        CONFIG_KEY_MSG,
                    ));
                }
                if field == "binaryData" && !seen.insert(k.clone()) {
                    causes.push(Cause::invalid(
                        format!("data[{k}]"),
                        &Value::from(k.as_str()),
                        "duplicate of key present in binaryData",
                    ));
                } else {
                    seen.insert(k.clone());
                }
            }
        }
    }
}

/// Fields an ephemeral container may not set (upstream's list, in its order).
const NOT_FOR_EPHEMERAL: &[&str] = &[
    "ports",
    "livenessProbe",
    "readinessProbe",
    "startupProbe",
    "lifecycle",
    "resources",
    "resizePolicy",
    "restartPolicy",
];

/// An update through `pods/NAME/ephemeralcontainers` (upstream's
/// ValidatePodEphemeralContainersUpdate): existing ephemeral containers stay as they were, new
/// ones are containers without ports, probes, lifecycle or resources, named uniquely in the
/// pod, targeting one of its containers.
pub fn validate_ephemeral_update(spec: &Value, old_spec: &Value) -> Vec<Cause> {
    let mut causes = Causes::default();
    let new = items(spec, "ephemeralContainers");
    for old in items(old_spec, "ephemeralContainers") {
        let name = old.get("name").and_then(Value::as_str).unwrap_or("");
        match new
            .iter()
            .position(|c| c.get("name").and_then(Value::as_str) == Some(name))
        {
            None => causes.push(Cause::forbidden(
                "spec.ephemeralContainers",
                format!("existing ephemeral containers {name:?} may not be removed"),
            )),
            Some(i) if new[i] != *old => causes.push(Cause::forbidden(
                format!("spec.ephemeralContainers[{i}]"),
                format!("existing ephemeral containers {name:?} may not be changed"),
            )),
            Some(_) => {}
        }
    }
    let volumes: BTreeSet<String> = items(spec, "volumes")
        .iter()
        .filter_map(|v| v.get("name").and_then(Value::as_str).map(String::from))
        .collect();
    let mut names: BTreeSet<&str> = BTreeSet::new();
    for list in ["initContainers", "containers"] {
        for c in items(spec, list) {
            if let Some(n) = c.get("name").and_then(Value::as_str) {
                names.insert(n);
            }
        }
    }
    let targets = names.clone();
    for (i, c) in new.iter().enumerate() {
        let path = format!("spec.ephemeralContainers[{i}]");
        validate_container(c, &path, &volumes, &mut causes);
        if let Some(name) = c.get("name").and_then(Value::as_str)
            && !name.is_empty()
            && !names.insert(name)
        {
            causes.push(Cause::duplicate(format!("{path}.name"), &Value::from(name)));
        }
        for field in NOT_FOR_EPHEMERAL {
            let set = match c.get(*field) {
                None | Some(Value::Null) => false,
                Some(Value::Array(a)) => !a.is_empty(),
                Some(Value::Object(o)) => !o.is_empty(),
                Some(_) => true,
            };
            if set {
                causes.push(Cause::forbidden(
                    format!("{path}.{field}"),
                    "cannot be set for an Ephemeral Container",
                ));
            }
        }
        for (j, m) in items(c, "volumeMounts").iter().enumerate() {
            if m.get("subPath")
                .and_then(Value::as_str)
                .is_some_and(|s| !s.is_empty())
            {
                causes.push(Cause::forbidden(
                    format!("{path}.volumeMounts[{j}].subPath"),
                    "cannot be set for an Ephemeral Container",
                ));
            }
        }
        if let Some(target) = c.get("targetContainerName").and_then(Value::as_str)
            && !target.is_empty()
            && !targets.contains(target)
        {
            causes.push(Cause::new(
                "FieldValueNotFound",
                format!("{path}.targetContainerName"),
                format!("Not found: {target:?}"),
            ));
        }
    }
    causes.0
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn ephemeral_containers_are_only_added() {
        let old = json!({"containers": [{"name": "app", "image": "a"}],
            "volumes": [{"name": "data", "emptyDir": {}}],
            "ephemeralContainers": [{"name": "dbg", "image": "busybox"}]});
        let mut new = old.clone();
        new["ephemeralContainers"].as_array_mut().unwrap().push(
            json!({"name": "dbg2", "image": "busybox", "targetContainerName": "app",
                "volumeMounts": [{"name": "data", "mountPath": "/data"}]}),
        );
        assert!(validate_ephemeral_update(&new, &old).is_empty());
        let shown = |causes: Vec<Cause>| causes.iter().map(Cause::display).collect::<Vec<_>>();
        // Removed, changed.
        let mut removed = old.clone();
        removed["ephemeralContainers"] = json!([]);
        assert_eq!(
            shown(validate_ephemeral_update(&removed, &old)),
            [
                "spec.ephemeralContainers: Forbidden: existing ephemeral containers \"dbg\" may not be removed"
            ]
        );
        let mut changed = old.clone();
        changed["ephemeralContainers"][0]["image"] = json!("alpine");
        assert_eq!(
            shown(validate_ephemeral_update(&changed, &old)),
            [
                "spec.ephemeralContainers[0]: Forbidden: existing ephemeral containers \"dbg\" may not be changed"
            ]
        );
        // What a new one may not be.
        let mut bad = old.clone();
        bad["ephemeralContainers"].as_array_mut().unwrap().push(
            json!({"name": "app", "image": "x",
            "ports": [{"containerPort": 80}], "readinessProbe": {"exec": {"command": ["true"]}},
            "resources": {"limits": {"cpu": "1"}}, "targetContainerName": "nope",
            "volumeMounts": [{"name": "data", "mountPath": "/d", "subPath": "x"}]}),
        );
        assert_eq!(
            shown(validate_ephemeral_update(&bad, &old)),
            [
                "spec.ephemeralContainers[1].name: Duplicate value: \"app\"",
                "spec.ephemeralContainers[1].ports: Forbidden: cannot be set for an Ephemeral Container",
                "spec.ephemeralContainers[1].readinessProbe: Forbidden: cannot be set for an Ephemeral Container",
                "spec.ephemeralContainers[1].resources: Forbidden: cannot be set for an Ephemeral Container",
                "spec.ephemeralContainers[1].volumeMounts[0].subPath: Forbidden: cannot be set for an Ephemeral Container",
                "spec.ephemeralContainers[1].targetContainerName: Not found: \"nope\"",
            ]
        );
        // An empty resources object (what clients send by default) is no resources.
        let mut empty = old.clone();
        empty["ephemeralContainers"]
            .as_array_mut()
            .unwrap()
            .push(json!({"name": "d3", "image": "x", "resources": {}}));
        assert!(validate_ephemeral_update(&empty, &old).is_empty());
    }

    #[test]
    fn names() {
        assert!(is_dns1123_subdomain("web.example-1").is_ok());
        assert!(is_dns1123_subdomain("Web").is_err());
        assert!(is_dns1123_label("a.b").is_err());
        assert!(is_dns1035_label("1abc").is_err());
        assert!(is_qualified_name("example.com/app").is_ok());
        assert!(is_qualified_name("-app").is_err());
        assert!(is_label_value("").is_ok());
        assert!(is_label_value("a b").is_err());
    }

    #[test]
    fn pod_spec_rules() {
        let mut causes = Causes::default();
        validate_pod_spec(
            Some(
                &json!({"containers": [{"name": "c"}, {"name": "c", "image": "x",
                "ports": [{"containerPort": 70000}], "volumeMounts": [{"name": "v", "mountPath": "/v"}]}]}),
            ),
            "spec",
            &mut causes,
        );
        let got: Vec<String> = causes.0.iter().map(Cause::display).collect();
        assert_eq!(
            got,
            vec![
                "spec.containers[0].image: Required value",
                "spec.containers[1].ports[0].containerPort: Invalid value: 70000: must be between 1 and 65535, inclusive",
                "spec.containers[1].volumeMounts[0].name: Not found: \"v\"",
                "spec.containers[1].name: Duplicate value: \"c\"",
            ]
        );
    }

    #[test]
    fn ingresses_and_network_policies_as_upstream_validates_them() {
        let display =
            |causes: Causes| -> Vec<String> { causes.0.iter().map(Cause::display).collect() };
        let mut causes = Causes::default();
        validate_ingress(
            Some(&json!({"rules": [
                {"host": "Bad_Host", "http": {"paths": [
                    {"path": "api", "pathType": "Prefix", "backend": {"service": {"name": "web", "port": {"number": 70000}}}},
                    {"path": "/", "backend": {"service": {"name": "web", "port": {"name": "http", "number": 80}}}}
                ]}},
                {"host": "*.example.com", "http": {"paths": [
                    {"path": "/", "pathType": "Prefix", "backend": {"service": {"name": "web", "port": {"name": "http"}}}}
                ]}},
                {"host": "10.0.0.1"}
            ]})),
            &mut causes,
        );
        let got = display(causes);
        assert_eq!(got.len(), 6, "{got:#?}");
        assert!(got[0].starts_with(
            "spec.rules[0].host: Invalid value: \"Bad_Host\": a lowercase RFC 1123 subdomain"
        ));
        assert_eq!(
            got[1],
            "spec.rules[0].http.paths[0].path: Invalid value: \"api\": must be an absolute path"
        );
        assert!(got[2].starts_with(
            "spec.rules[0].http.paths[0].backend.service.port.number: Invalid value: 70000"
        ));
        assert_eq!(
            got[3],
            "spec.rules[0].http.paths[1].pathType: Required value"
        );
        assert!(got[4].contains("cannot set both port name & port number"));
        assert!(got[5].contains("must be a DNS name, not an IP address"));
        let mut causes = Causes::default();
        validate_ingress(Some(&json!({})), &mut causes);
        assert!(
            display(causes)[0].contains("either `defaultBackend` or `rules` must be specified")
        );

        let mut causes = Causes::default();
        validate_network_policy(
            Some(
                &json!({"podSelector": {}, "policyTypes": ["Ingress", "Sideways"], "ingress": [{
                    "from": [
                        {"ipBlock": {"cidr": "10.0.0.0/33"}},
                        {"ipBlock": {"cidr": "10.0.0.0/8", "except": ["10.1.0.0/16", "11.0.0.0/16", "10.0.0.0/8"]}}
                    ],
                    "ports": [{"protocol": "TCP", "port": 8080, "endPort": 80}, {"port": "http", "endPort": 90}]
                }]}),
            ),
            &mut causes,
        );
        let got = display(causes);
        assert_eq!(got.len(), 6, "{got:#?}");
        assert!(got[0].starts_with("spec.policyTypes[1]: Unsupported value: \"Sideways\""));
        assert!(
            got[1].contains("endPort")
                && got[1].contains("must be greater than or equal to `port`")
        );
        assert!(got[2].contains("may not be specified when `port` is non-numeric"));
        assert!(
            got[3].starts_with(
                "spec.ingress[0].from[0].ipBlock.cidr: Invalid value: \"10.0.0.0/33\""
            )
        );
        assert!(
            got[4].starts_with("spec.ingress[0].from[1].ipBlock.except[1]")
                && got[4].contains("strict subset")
        );
        assert!(got[5].starts_with("spec.ingress[0].from[1].ipBlock.except[2]"));
    }

    #[test]
    fn deployment_selector_must_match() {
        let mut causes = Causes::default();
        validate_workload(
            &json!({"selector": {"matchLabels": {"app": "a"}},
                "template": {"metadata": {"labels": {"app": "b"}}, "spec": {"containers": [{"name": "c", "image": "i"}]}}}),
            &["Always"],
            true,
            &mut causes,
        );
        assert_eq!(causes.0.len(), 1);
        assert!(
            causes.0[0]
                .message
                .contains("`selector` does not match template `labels`")
        );
    }
}
