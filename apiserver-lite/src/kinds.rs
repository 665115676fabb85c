//! Per-kind behaviour, as upstream's "strategies": one [`Strategy`] value per resource (name
//! rule, defaulting, status and generation handling, validation, the fields each kind can be
//! selected by), registered in [`strategy`]. Pure code over JSON objects; the HTTP layer calls
//! the functions here in upstream's order (decode, default, prepare, validate, store).

use std::collections::BTreeMap;
use std::sync::Arc;

use serde_json::{Map, Value, json};

use crate::error::Cause;
use crate::registry::ResourceInfo;
use crate::validation::{self, Causes, NameRule};

/// What preparing a new object needs besides the object.
pub struct NewObject<'a> {
    pub name: &'a str,
    pub uid: &'a str,
    /// The resource has a status subresource (its status is not the creator's to set).
    pub has_status: bool,
    /// What such a resource's status starts as ([`initial_status`]).
    pub initial_status: Value,
}

/// The status a new object of a kind with a status subresource starts with: upstream's zero
/// status struct as Go writes it (fields without `omitempty` appear as 0), so that clients which
/// read `status` right after a create find one, and typed clients find its required fields.
pub fn initial_status(group: &str, resource: &str) -> Value {
    match (group, resource) {
        ("", "services") | ("networking.k8s.io", "ingresses") => json!({"loadBalancer": {}}),
        ("", "replicationcontrollers") | ("apps", "replicasets") => json!({"replicas": 0}),
        ("apps", "statefulsets") => json!({"replicas": 0, "availableReplicas": 0}),
        ("apps", "daemonsets") => json!({
            "currentNumberScheduled": 0, "numberMisscheduled": 0,
            "desiredNumberScheduled": 0, "numberReady": 0,
        }),
        ("policy", "poddisruptionbudgets") => json!({
            "disruptionsAllowed": 0, "currentHealthy": 0,
            "desiredHealthy": 0, "expectedPods": 0,
        }),
        ("autoscaling", "horizontalpodautoscalers") => {
            json!({"currentReplicas": 0, "desiredReplicas": 0})
        }
        _ => json!({}),
    }
}

/// A kind's behaviour, as upstream's REST strategies: name rule, generation, defaults,
/// preparation for create and update, validation and field selector labels. One value per
/// resource, in [`ResourceInfo::strategy`]; the functions below run a request's part in
/// upstream's order around it.
pub trait Strategy: Send + Sync {
    fn name_rule(&self) -> NameRule {
        NameRule::Subdomain
    }

    /// Whether `metadata.generation` is kept (set to 1 on create, bumped on spec changes).
    fn tracks_generation(&self) -> bool {
        false
    }

    fn defaults(&self, _o: &mut Map<String, Value>) {}

    /// Upstream's PrepareForCreate: by default a resource with a status subresource starts
    /// with its kind's zero status, whatever the creator sent.
    fn prepare_for_create(&self, o: &mut Map<String, Value>, new: &NewObject) {
        if new.has_status {
            o.insert("status".into(), new.initial_status.clone());
        }
    }

    /// Upstream's PrepareForUpdate beyond the generic status/generation rules.
    fn prepare_for_update(&self, _new: &mut Value, _old: &Value) {}

    /// The kind's own validation (metadata is validated for every kind before it).
    fn validate(&self, _object: &Value, _old: Option<&Value>, _causes: &mut Causes) {}

    /// The field selector labels besides `metadata.name` and `metadata.namespace`, with the
    /// JSON pointer of each.
    fn field_labels(&self) -> &'static [(&'static str, &'static str)] {
        &[]
    }
}

/// Kinds with no behaviour of their own.
pub struct Plain;

impl Strategy for Plain {}

/// Custom resources: generation tracked, validated by their version's structural schema.
pub struct Custom {
    pub schema: Arc<Value>,
}

impl Strategy for Custom {
    fn tracks_generation(&self) -> bool {
        true
    }

    /// A custom resource with a status subresource starts without one (upstream's
    /// customResourceStrategy).
    fn prepare_for_create(&self, o: &mut Map<String, Value>, new: &NewObject) {
        if new.has_status {
            o.remove("status");
        }
    }

    fn validate(&self, object: &Value, _old: Option<&Value>, causes: &mut Causes) {
        crate::structural::validate(&self.schema, object, "", &mut causes.0, true);
    }
}

pub fn name_rule(info: &ResourceInfo) -> NameRule {
    info.strategy.name_rule()
}

pub fn tracks_generation(info: &ResourceInfo) -> bool {
    info.strategy.tracks_generation()
}

pub fn apply_defaults(info: &ResourceInfo, object: &mut Value) {
    info.strategy.defaults(obj(object));
}

/// Upstream's PrepareForCreate: status starts empty (or at its initial phase), jobs get their
/// generated selector, namespaces their finalizer and name label.
pub fn prepare_for_create(info: &ResourceInfo, object: &mut Value, uid: &str) {
    let name = object
        .pointer("/metadata/name")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_string();
    let new = NewObject {
        name: &name,
        uid,
        has_status: info.has_status(),
        initial_status: initial_status(&info.group, &info.resource),
    };
    info.strategy.prepare_for_create(obj(object), &new);
}

pub fn prepare_for_update(info: &ResourceInfo, new: &mut Value, old: &Value) {
    info.strategy.prepare_for_update(new, old);
}

/// Validation on create and update (`old` is the stored object on update).
pub fn validate(info: &ResourceInfo, object: &Value, old: Option<&Value>) -> Vec<Cause> {
    let mut causes = Causes::default();
    let meta = object.get("metadata").cloned().unwrap_or(json!({}));
    validation::validate_metadata(&meta, info.namespaced, name_rule(info), &mut causes);
    info.strategy.validate(object, old, &mut causes);
    causes.0
}

pub fn field_labels(info: &ResourceInfo) -> &'static [(&'static str, &'static str)] {
    info.strategy.field_labels()
}

fn obj(value: &mut Value) -> &mut serde_json::Map<String, Value> {
    if !value.is_object() {
        *value = json!({});
    }
    value.as_object_mut().expect("just made an object")
}

fn default(map: &mut serde_json::Map<String, Value>, key: &str, value: Value) {
    if map.get(key).is_none_or(Value::is_null) {
        map.insert(key.to_string(), value);
    }
}

fn image_pull_policy(image: &str) -> &'static str {
    let name = image.rsplit('/').next().unwrap_or(image);
    if image.contains('@') {
        return "IfNotPresent";
    }
    match name.split_once(':') {
        None => "Always",
        Some((_, "latest")) => "Always",
        Some(_) => "IfNotPresent",
    }
}

fn default_container(c: &mut Value) {
    let c = obj(c);
    let image = c
        .get("image")
        .and_then(Value::as_str)
        .unwrap_or("")
        .to_string();
    default(c, "terminationMessagePath", json!("/dev/termination-log"));
    default(c, "terminationMessagePolicy", json!("File"));
    default(c, "imagePullPolicy", json!(image_pull_policy(&image)));
    default(c, "resources", json!({}));
    if let Some(ports) = c.get_mut("ports").and_then(Value::as_array_mut) {
        for p in ports {
            default(obj(p), "protocol", json!("TCP"));
        }
    }
    for probe in ["livenessProbe", "readinessProbe", "startupProbe"] {
        if let Some(p) = c.get_mut(probe).filter(|p| p.is_object()) {
            let p = obj(p);
            default(p, "timeoutSeconds", json!(1));
            default(p, "periodSeconds", json!(10));
            default(p, "successThreshold", json!(1));
            default(p, "failureThreshold", json!(3));
            if let Some(h) = p.get_mut("httpGet").filter(|h| h.is_object()) {
                let h = obj(h);
                default(h, "path", json!("/"));
                default(h, "scheme", json!("HTTP"));
            }
        }
    }
}

/// SetDefaults for a PodSpec (pods and every template).
pub fn default_pod_spec(spec: &mut Value) {
    let s = obj(spec);
    default(s, "restartPolicy", json!("Always"));
    default(s, "terminationGracePeriodSeconds", json!(30));
    default(s, "dnsPolicy", json!("ClusterFirst"));
    default(s, "securityContext", json!({}));
    default(s, "schedulerName", json!("default-scheduler"));
    default(s, "enableServiceLinks", json!(true));
    for list in ["initContainers", "containers", "ephemeralContainers"] {
        if let Some(cs) = s.get_mut(list).and_then(Value::as_array_mut) {
            for c in cs {
                default_container(c);
            }
        }
    }
    if let Some(vols) = s.get_mut("volumes").and_then(Value::as_array_mut) {
        for v in vols {
            let v = obj(v);
            for source in ["configMap", "secret"] {
                if let Some(src) = v.get_mut(source).filter(|x| x.is_object()) {
                    default(obj(src), "defaultMode", json!(420));
                }
            }
        }
    }
}

fn default_template(spec: &mut serde_json::Map<String, Value>) {
    if let Some(t) = spec.get_mut("template").filter(|t| t.is_object()) {
        let t = obj(t);
        if let Some(ps) = t.get_mut("spec") {
            default_pod_spec(ps);
        }
    }
}

fn default_job_spec(spec: &mut serde_json::Map<String, Value>) {
    let completions = spec.get("completions").filter(|v| !v.is_null()).cloned();
    let parallelism = spec.get("parallelism").filter(|v| !v.is_null()).cloned();
    if completions.is_none() && parallelism.is_none() {
        spec.insert("completions".into(), json!(1));
        spec.insert("parallelism".into(), json!(1));
    } else if parallelism.is_none() {
        spec.insert("parallelism".into(), json!(1));
    }
    default(spec, "backoffLimit", json!(6));
    default(spec, "completionMode", json!("NonIndexed"));
    default(spec, "suspend", json!(false));
    default(spec, "podReplacementPolicy", json!("TerminatingOrFailed"));
    default_template(spec);
}

/// Pod QoS class from requests and limits, as upstream computes it at creation.
fn qos_class(spec: &Value) -> &'static str {
    let containers: Vec<&Value> = ["initContainers", "containers"]
        .iter()
        .flat_map(|l| spec.get(*l).and_then(Value::as_array).into_iter().flatten())
        .collect();
    let mut any = false;
    let mut guaranteed = true;
    for c in containers {
        let requests = c.pointer("/resources/requests").and_then(Value::as_object);
        let limits = c.pointer("/resources/limits").and_then(Value::as_object);
        if requests.is_some_and(|r| !r.is_empty()) || limits.is_some_and(|l| !l.is_empty()) {
            any = true;
        }
        for res in ["cpu", "memory"] {
            let limit = limits.and_then(|l| l.get(res));
            let request = requests.and_then(|r| r.get(res)).or(limit);
            if limit.is_none() || request != limit {
                guaranteed = false;
            }
        }
    }
    match (any, guaranteed) {
        (false, _) => "BestEffort",
        (true, true) => "Guaranteed",
        (true, false) => "Burstable",
    }
}

fn validate_binding(object: &Value, causes: &mut Causes) {
    let role_ref = object.get("roleRef").unwrap_or(&Value::Null);
    if role_ref
        .get("name")
        .and_then(Value::as_str)
        .unwrap_or("")
        .is_empty()
    {
        causes.push(Cause::required("roleRef.name"));
    }
    match role_ref.get("kind").and_then(Value::as_str).unwrap_or("") {
        "Role" | "ClusterRole" => {}
        other => causes.push(Cause::unsupported(
            "roleRef.kind",
            &json!(other),
            &["Role", "ClusterRole"],
        )),
    }
    match role_ref
        .get("apiGroup")
        .and_then(Value::as_str)
        .unwrap_or("")
    {
        "rbac.authorization.k8s.io" => {}
        other => causes.push(Cause::unsupported(
            "roleRef.apiGroup",
            &json!(other),
            &["rbac.authorization.k8s.io"],
        )),
    }
    for (i, subject) in object
        .get("subjects")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .enumerate()
    {
        if subject
            .get("name")
            .and_then(Value::as_str)
            .unwrap_or("")
            .is_empty()
        {
            causes.push(Cause::required(format!("subjects[{i}].name")));
        }
        match subject.get("kind").and_then(Value::as_str).unwrap_or("") {
            "User" | "Group" | "ServiceAccount" => {}
            other => causes.push(Cause::unsupported(
                format!("subjects[{i}].kind"),
                &json!(other),
                &["ServiceAccount", "User", "Group"],
            )),
        }
    }
}

fn validate_rules(object: &Value, causes: &mut Causes) {
    for (i, rule) in object
        .get("rules")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .enumerate()
    {
        let list = |k: &str| {
            rule.get(k)
                .and_then(Value::as_array)
                .map(Vec::len)
                .unwrap_or(0)
        };
        if list("verbs") == 0 {
            causes.push(Cause::new(
                "FieldValueRequired",
                format!("rules[{i}].verbs"),
                "Required value: verbs must contain at least one value".into(),
            ));
        }
        if list("nonResourceURLs") == 0 && list("resources") > 0 && list("apiGroups") == 0 {
            causes.push(Cause::new(
                "FieldValueRequired",
                format!("rules[{i}].apiGroups"),
                "Required value: resource rules must supply at least one api group".into(),
            ));
        }
        if list("nonResourceURLs") == 0 && list("resources") == 0 {
            causes.push(Cause::new(
                "FieldValueRequired",
                format!("rules[{i}].resources"),
                "Required value: resource rules must supply at least one resource".into(),
            ));
        }
    }
}

fn validate_endpoint_slice(object: &Value, causes: &mut Causes) {
    match object
        .get("addressType")
        .and_then(Value::as_str)
        .unwrap_or("")
    {
        "IPv4" | "IPv6" | "FQDN" => {}
        "" => causes.push(Cause::required("addressType")),
        other => causes.push(Cause::unsupported(
            "addressType",
            &json!(other),
            &["FQDN", "IPv4", "IPv6"],
        )),
    }
    for (i, e) in object
        .get("endpoints")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .enumerate()
    {
        if e.get("addresses")
            .and_then(Value::as_array)
            .is_none_or(Vec::is_empty)
        {
            causes.push(Cause::required(format!("endpoints[{i}].addresses")));
        }
    }
}

/// Pods are mostly immutable once created.
fn validate_pod_update(old: &Value, new: &Value, causes: &mut Causes) {
    let mutable_stripped = |spec: &Value| {
        let mut s = spec.clone();
        if let Some(m) = s.as_object_mut() {
            m.remove("activeDeadlineSeconds");
            m.remove("tolerations");
            m.remove("terminationGracePeriodSeconds");
            m.remove("schedulingGates");
            for list in ["containers", "initContainers"] {
                if let Some(cs) = m.get_mut(list).and_then(Value::as_array_mut) {
                    for c in cs {
                        if let Some(c) = c.as_object_mut() {
                            c.remove("image");
                            c.remove("resources");
                        }
                    }
                }
            }
        }
        s
    };
    if mutable_stripped(old) != mutable_stripped(new) {
        causes.push(Cause::forbidden(
            "spec",
            "pod updates may not change fields other than `spec.containers[*].image`,`spec.initContainers[*].image`,`spec.activeDeadlineSeconds`,`spec.tolerations` (only additions to existing tolerations),`spec.terminationGracePeriodSeconds` (allow it to be set to 1 if it was previously negative)",
        ));
    }
}

fn field_str(object: &Value, pointer: &str) -> String {
    match object.pointer(pointer) {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Null) | None => String::new(),
        Some(other) => other.to_string(),
    }
}

/// The values a field selector compares against.
pub fn selectable_fields(info: &ResourceInfo, object: &Value) -> BTreeMap<String, String> {
    let mut fields = BTreeMap::new();
    fields.insert("metadata.name".into(), field_str(object, "/metadata/name"));
    if info.namespaced {
        fields.insert(
            "metadata.namespace".into(),
            field_str(object, "/metadata/namespace"),
        );
    }
    for (label, pointer) in field_labels(info) {
        let mut value = field_str(object, pointer);
        if (*label == "spec.unschedulable" || *label == "spec.hostNetwork") && value.is_empty() {
            value = "false".into();
        }
        fields.insert((*label).to_string(), value);
    }
    if let Some(custom) = &info.custom {
        for (label, pointer) in &custom.selectable {
            fields.insert(label.clone(), field_str(object, pointer));
        }
    }
    fields
}

/// Checks a field selector's labels against what the kind supports.
pub fn check_field_labels(
    info: &ResourceInfo,
    labels: impl Iterator<Item = String>,
) -> Result<(), String> {
    for label in labels {
        let known = label == "metadata.name"
            || (label == "metadata.namespace" && info.namespaced)
            || field_labels(info).iter().any(|(l, _)| *l == label)
            || info
                .custom
                .as_ref()
                .is_some_and(|c| c.selectable.iter().any(|(l, _)| *l == label));
        if !known {
            return Err(format!("field label not supported: {label}"));
        }
    }
    Ok(())
}

/// The strategy of pods.
pub struct Pods;

impl Strategy for Pods {
    fn defaults(&self, o: &mut Map<String, Value>) {
        if let Some(spec) = o.get_mut("spec") {
            default_pod_spec(spec);
            let s = obj(spec);
            default(s, "serviceAccountName", json!("default"));
            default(s, "priority", json!(0));
            default(s, "preemptionPolicy", json!("PreemptLowerPriority"));
            if s.get("tolerations").is_none_or(Value::is_null) {
                s.insert("tolerations".into(), json!([]));
            }
            // The DefaultTolerationSeconds admission plugin.
            if let Some(tolerations) = s.get_mut("tolerations").and_then(Value::as_array_mut) {
                for key in [
                    "node.kubernetes.io/not-ready",
                    "node.kubernetes.io/unreachable",
                ] {
                    if !tolerations.iter().any(|t| t["key"] == key) {
                        tolerations.push(json!({"key": key, "operator": "Exists",
                                "effect": "NoExecute", "tolerationSeconds": 300}));
                    }
                }
            }
        }
    }
    fn prepare_for_create(&self, o: &mut Map<String, Value>, _new: &NewObject) {
        let qos = qos_class(o.get("spec").unwrap_or(&Value::Null));
        o.insert(
            "status".into(),
            json!({"phase": "Pending", "qosClass": qos}),
        );
    }
    fn validate(&self, object: &Value, old: Option<&Value>, causes: &mut Causes) {
        let spec = object.get("spec");
        validation::validate_pod_spec(spec, "spec", causes);
        if let (Some(old), Some(spec)) = (old, spec) {
            validate_pod_update(old.get("spec").unwrap_or(&Value::Null), spec, causes);
        }
        // Ephemeral containers come only through the `ephemeralcontainers` subresource.
        if old.is_none()
            && spec
                .and_then(|s| s.get("ephemeralContainers"))
                .and_then(Value::as_array)
                .is_some_and(|a| !a.is_empty())
        {
            causes.push(Cause::forbidden(
                "spec.ephemeralContainers",
                "cannot be set on create",
            ));
        }
    }
    fn field_labels(&self) -> &'static [(&'static str, &'static str)] {
        &[
            ("spec.nodeName", "/spec/nodeName"),
            ("spec.restartPolicy", "/spec/restartPolicy"),
            ("spec.schedulerName", "/spec/schedulerName"),
            ("spec.serviceAccountName", "/spec/serviceAccountName"),
            ("spec.hostNetwork", "/spec/hostNetwork"),
            ("status.phase", "/status/phase"),
            ("status.podIP", "/status/podIP"),
            ("status.nominatedNodeName", "/status/nominatedNodeName"),
        ]
    }
}

/// The strategy of services.
pub struct Services;

impl Strategy for Services {
    fn name_rule(&self) -> NameRule {
        NameRule::Dns1035
    }
    fn defaults(&self, o: &mut Map<String, Value>) {
        let spec = obj(o.entry("spec").or_insert_with(|| json!({})));
        default(spec, "type", json!("ClusterIP"));
        default(spec, "sessionAffinity", json!("None"));
        if spec["type"] != "ExternalName" {
            default(spec, "internalTrafficPolicy", json!("Cluster"));
        }
        if let Some(ports) = spec.get_mut("ports").and_then(Value::as_array_mut) {
            for p in ports {
                let p = obj(p);
                default(p, "protocol", json!("TCP"));
                if let Some(port) = p.get("port").cloned() {
                    default(p, "targetPort", port);
                }
            }
        }
    }
    fn validate(&self, object: &Value, _old: Option<&Value>, causes: &mut Causes) {
        let spec = object.get("spec");
        validation::validate_service(spec, causes);
    }
    fn field_labels(&self) -> &'static [(&'static str, &'static str)] {
        &[
            ("spec.clusterIP", "/spec/clusterIP"),
            ("spec.type", "/spec/type"),
        ]
    }
}

/// The strategy of secrets.
pub struct Secrets;

impl Strategy for Secrets {
    fn defaults(&self, o: &mut Map<String, Value>) {
        default(o, "type", json!("Opaque"));
        if let Some(Value::Object(string_data)) = o.remove("stringData") {
            let data = obj(o.entry("data").or_insert_with(|| json!({})));
            for (k, v) in string_data {
                use base64::Engine;
                let text = v.as_str().unwrap_or_default();
                data.insert(
                    k,
                    json!(base64::engine::general_purpose::STANDARD.encode(text)),
                );
            }
        }
    }
    fn validate(&self, object: &Value, _old: Option<&Value>, causes: &mut Causes) {
        validation::validate_config_keys(object, causes);
        validation::validate_config_size(object, &["data"], causes);
        let data = object.get("data").and_then(Value::as_object);
        let has = |k: &str| data.is_some_and(|d| d.contains_key(k));
        match object
            .get("type")
            .and_then(Value::as_str)
            .unwrap_or("Opaque")
        {
            "kubernetes.io/tls" => {
                for key in ["tls.crt", "tls.key"] {
                    if !has(key) {
                        causes.push(Cause::required(format!("data[{key}]")));
                    }
                }
            }
            "kubernetes.io/dockerconfigjson" if !has(".dockerconfigjson") => {
                causes.push(Cause::required("data[.dockerconfigjson]"));
            }
            "kubernetes.io/basic-auth" if !has("username") && !has("password") => {
                causes.push(Cause::required("data[username]"));
            }
            "kubernetes.io/ssh-auth" if !has("ssh-privatekey") => {
                causes.push(Cause::required("data[ssh-privatekey]"));
            }
            _ => {}
        }
    }
    fn field_labels(&self) -> &'static [(&'static str, &'static str)] {
        &[("type", "/type")]
    }
}

/// The strategy of configmaps.
pub struct ConfigMaps;

impl Strategy for ConfigMaps {
    fn validate(&self, object: &Value, _old: Option<&Value>, causes: &mut Causes) {
        validation::validate_config_keys(object, causes);
        validation::validate_config_size(object, &["binaryData"], causes);
    }
}

/// The strategy of namespaces.
pub struct Namespaces;

impl Strategy for Namespaces {
    fn name_rule(&self) -> NameRule {
        NameRule::Label
    }
    fn prepare_for_create(&self, o: &mut Map<String, Value>, new: &NewObject) {
        let spec = obj(o.entry("spec").or_insert_with(|| json!({})));
        default(spec, "finalizers", json!(["kubernetes"]));
        o.insert("status".into(), json!({"phase": "Active"}));
        let meta = obj(o.entry("metadata").or_insert_with(|| json!({})));
        let labels = obj(meta.entry("labels").or_insert_with(|| json!({})));
        labels.insert("kubernetes.io/metadata.name".into(), json!(new.name));
    }
    /// A namespace's `spec.finalizers` change only through `/finalize`, and its name label
    /// stays.
    fn prepare_for_update(&self, new: &mut Value, old: &Value) {
        if let Some(f) = old.pointer("/spec/finalizers") {
            new["spec"]["finalizers"] = f.clone();
        }
        if let Some(l) = old.pointer("/metadata/labels/kubernetes.io~1metadata.name") {
            let meta = obj(obj(new).entry("metadata").or_insert_with(|| json!({})));
            let labels = meta.entry("labels").or_insert_with(|| json!({}));
            labels["kubernetes.io/metadata.name"] = l.clone();
        }
    }

    fn field_labels(&self) -> &'static [(&'static str, &'static str)] {
        &[("status.phase", "/status/phase")]
    }
}

/// The strategy of nodes (their agent creates them with a status).
pub struct Nodes;

impl Strategy for Nodes {
    fn prepare_for_create(&self, _o: &mut Map<String, Value>, __new: &NewObject) {}
    fn field_labels(&self) -> &'static [(&'static str, &'static str)] {
        &[("spec.unschedulable", "/spec/unschedulable")]
    }
}

/// The strategy of persistentvolumeclaims.
pub struct PersistentVolumeClaims;

impl Strategy for PersistentVolumeClaims {
    fn defaults(&self, o: &mut Map<String, Value>) {
        let spec = obj(o.entry("spec").or_insert_with(|| json!({})));
        default(spec, "volumeMode", json!("Filesystem"));
    }
    fn prepare_for_create(&self, o: &mut Map<String, Value>, _new: &NewObject) {
        o.insert("status".into(), json!({"phase": "Pending"}));
    }
    fn validate(&self, object: &Value, old: Option<&Value>, causes: &mut Causes) {
        let spec = object.get("spec").unwrap_or(&Value::Null);
        if spec
            .get("accessModes")
            .and_then(Value::as_array)
            .is_none_or(Vec::is_empty)
        {
            causes.push(Cause::new(
                "FieldValueRequired",
                "spec.accessModes",
                "Required value: at least 1 access mode is required".into(),
            ));
        }
        if spec.pointer("/resources/requests/storage").is_none() {
            causes.push(Cause::required("spec.resources[storage]"));
        }
        // Upstream's update rule: a bound claim's spec is immutable except its requests.
        if let Some(old) = old {
            let old_spec = old.get("spec").unwrap_or(&Value::Null);
            let bound = old_spec
                .get("volumeName")
                .and_then(Value::as_str)
                .is_some_and(|v| !v.is_empty());
            let without_requests = |s: &Value| {
                let mut s = s.clone();
                if let Some(r) = s.pointer_mut("/resources").and_then(Value::as_object_mut) {
                    r.remove("requests");
                }
                if let Some(m) = s.as_object_mut() {
                    m.remove("volumeAttributesClassName");
                    // Filled in by the binding itself.
                    m.remove("volumeName");
                }
                s
            };
            if bound
                && (without_requests(spec) != without_requests(old_spec)
                    || spec.get("volumeName") != old_spec.get("volumeName"))
            {
                causes.push(Cause::forbidden(
                    "spec",
                    "spec is immutable after creation except resources.requests and volumeAttributesClassName for bound claims",
                ));
            }
            // A bound claim's request may go down only while it stays above what the volume
            // has (upstream's rule with RecoverVolumeExpansionFailure, on by default).
            if bound && let Some(cause) = claim_shrink(spec, old_spec, old) {
                causes.push(cause);
            }
        }
    }
    fn field_labels(&self) -> &'static [(&'static str, &'static str)] {
        &[("spec.volumeName", "/spec/volumeName")]
    }
}

/// A lowered storage request of a bound claim that would go below its volume's capacity.
fn claim_shrink(spec: &Value, old_spec: &Value, old: &Value) -> Option<Cause> {
    let bytes = |v: Option<&Value>| {
        v.and_then(Value::as_str)
            .and_then(sitekit::quantity::parse)
            .map(f64::ceil)
    };
    let new = bytes(spec.pointer("/resources/requests/storage"))?;
    let before = bytes(old_spec.pointer("/resources/requests/storage"))?;
    if new >= before {
        return None;
    }
    match bytes(old.pointer("/status/capacity/storage")) {
        Some(capacity) if new > capacity => None,
        _ => Some(Cause::forbidden(
            "spec.resources.requests.storage",
            "field can not be less than status.capacity",
        )),
    }
}

/// The strategy of persistentvolumes.
pub struct PersistentVolumes;

impl Strategy for PersistentVolumes {
    fn defaults(&self, o: &mut Map<String, Value>) {
        let spec = obj(o.entry("spec").or_insert_with(|| json!({})));
        default(spec, "persistentVolumeReclaimPolicy", json!("Retain"));
        default(spec, "volumeMode", json!("Filesystem"));
    }
    fn prepare_for_create(&self, o: &mut Map<String, Value>, _new: &NewObject) {
        o.insert("status".into(), json!({"phase": "Pending"}));
    }
    fn validate(&self, object: &Value, _old: Option<&Value>, causes: &mut Causes) {
        let spec = object.get("spec").unwrap_or(&Value::Null);
        if spec.pointer("/capacity/storage").is_none() {
            causes.push(Cause::required("spec.capacity"));
        }
        if spec
            .get("accessModes")
            .and_then(Value::as_array)
            .is_none_or(Vec::is_empty)
        {
            causes.push(Cause::required("spec.accessModes"));
        }
        const NOT_SOURCES: &[&str] = &[
            "accessModes",
            "capacity",
            "claimRef",
            "persistentVolumeReclaimPolicy",
            "storageClassName",
            "mountOptions",
            "volumeMode",
            "nodeAffinity",
            "volumeAttributesClassName",
        ];
        let has_source = spec
            .as_object()
            .is_some_and(|m| m.keys().any(|k| !NOT_SOURCES.contains(&k.as_str())));
        if !has_source {
            causes.push(Cause::new(
                "FieldValueRequired",
                "spec",
                "Required value: must specify a volume type".into(),
            ));
        }
    }
}

/// The strategy of events (core/v1).
pub struct CoreEvents;

impl Strategy for CoreEvents {
    fn name_rule(&self) -> NameRule {
        NameRule::PathSegment
    }
    fn field_labels(&self) -> &'static [(&'static str, &'static str)] {
        &[
            ("involvedObject.kind", "/involvedObject/kind"),
            ("involvedObject.namespace", "/involvedObject/namespace"),
            ("involvedObject.name", "/involvedObject/name"),
            ("involvedObject.uid", "/involvedObject/uid"),
            ("involvedObject.apiVersion", "/involvedObject/apiVersion"),
            (
                "involvedObject.resourceVersion",
                "/involvedObject/resourceVersion",
            ),
            ("involvedObject.fieldPath", "/involvedObject/fieldPath"),
            ("reason", "/reason"),
            ("reportingComponent", "/reportingComponent"),
            ("source", "/source/component"),
            ("type", "/type"),
        ]
    }
}

/// The strategy of events (events.k8s.io).
pub struct Events;

impl Strategy for Events {
    fn name_rule(&self) -> NameRule {
        NameRule::PathSegment
    }
    fn field_labels(&self) -> &'static [(&'static str, &'static str)] {
        &[
            ("regarding.kind", "/regarding/kind"),
            ("regarding.namespace", "/regarding/namespace"),
            ("regarding.name", "/regarding/name"),
            ("regarding.uid", "/regarding/uid"),
            ("regarding.apiVersion", "/regarding/apiVersion"),
            ("regarding.resourceVersion", "/regarding/resourceVersion"),
            ("regarding.fieldPath", "/regarding/fieldPath"),
            ("reason", "/reason"),
            ("reportingController", "/reportingController"),
            ("type", "/type"),
        ]
    }
}

/// The strategy of deployments.
pub struct Deployments;

impl Strategy for Deployments {
    fn tracks_generation(&self) -> bool {
        true
    }
    fn defaults(&self, o: &mut Map<String, Value>) {
        let spec = obj(o.entry("spec").or_insert_with(|| json!({})));
        default(spec, "replicas", json!(1));
        default(spec, "revisionHistoryLimit", json!(10));
        default(spec, "progressDeadlineSeconds", json!(600));
        default(spec, "strategy", json!({"type": "RollingUpdate"}));
        let strategy = obj(spec.get_mut("strategy").expect("just set"));
        if strategy
            .get("type")
            .and_then(Value::as_str)
            .unwrap_or("RollingUpdate")
            == "RollingUpdate"
        {
            default(strategy, "type", json!("RollingUpdate"));
            default(strategy, "rollingUpdate", json!({}));
            let ru = obj(strategy.get_mut("rollingUpdate").expect("just set"));
            default(ru, "maxUnavailable", json!("25%"));
            default(ru, "maxSurge", json!("25%"));
        }
        default_template(spec);
    }
    fn validate(&self, object: &Value, old: Option<&Value>, causes: &mut Causes) {
        validate_selector_workload(object, old, causes);
    }
}

/// The strategy of replicasets.
pub struct ReplicaSets;

impl Strategy for ReplicaSets {
    fn tracks_generation(&self) -> bool {
        true
    }
    fn defaults(&self, o: &mut Map<String, Value>) {
        let spec = obj(o.entry("spec").or_insert_with(|| json!({})));
        default(spec, "replicas", json!(1));
        default_template(spec);
    }
    fn validate(&self, object: &Value, old: Option<&Value>, causes: &mut Causes) {
        validate_selector_workload(object, old, causes);
    }
    fn field_labels(&self) -> &'static [(&'static str, &'static str)] {
        &[("status.replicas", "/status/replicas")]
    }
}

/// The strategy of daemonsets.
pub struct DaemonSets;

impl Strategy for DaemonSets {
    fn tracks_generation(&self) -> bool {
        true
    }
    fn defaults(&self, o: &mut Map<String, Value>) {
        let spec = obj(o.entry("spec").or_insert_with(|| json!({})));
        default(spec, "revisionHistoryLimit", json!(10));
        default(spec, "updateStrategy", json!({"type": "RollingUpdate"}));
        let us = obj(spec.get_mut("updateStrategy").expect("just set"));
        if us.get("type").and_then(Value::as_str) == Some("RollingUpdate") {
            default(us, "rollingUpdate", json!({}));
            let ru = obj(us.get_mut("rollingUpdate").expect("just set"));
            default(ru, "maxUnavailable", json!(1));
            default(ru, "maxSurge", json!(0));
        }
        default_template(spec);
    }
    fn validate(&self, object: &Value, old: Option<&Value>, causes: &mut Causes) {
        validate_selector_workload(object, old, causes);
    }
}

/// The strategy of statefulsets.
pub struct StatefulSets;

impl Strategy for StatefulSets {
    fn tracks_generation(&self) -> bool {
        true
    }
    fn defaults(&self, o: &mut Map<String, Value>) {
        let spec = obj(o.entry("spec").or_insert_with(|| json!({})));
        default(spec, "replicas", json!(1));
        default(spec, "podManagementPolicy", json!("OrderedReady"));
        default(spec, "revisionHistoryLimit", json!(10));
        default(
            spec,
            "updateStrategy",
            json!({"type": "RollingUpdate", "rollingUpdate": {"partition": 0}}),
        );
        default(
            spec,
            "persistentVolumeClaimRetentionPolicy",
            json!({"whenDeleted": "Retain", "whenScaled": "Retain"}),
        );
        default_template(spec);
    }
    fn validate(&self, object: &Value, _old: Option<&Value>, causes: &mut Causes) {
        let spec = object.get("spec");
        validation::validate_workload(spec.unwrap_or(&Value::Null), &["Always"], true, causes);
    }
}

/// The strategy of jobs.
pub struct Jobs;

impl Strategy for Jobs {
    fn tracks_generation(&self) -> bool {
        true
    }
    fn defaults(&self, o: &mut Map<String, Value>) {
        let spec = obj(o.entry("spec").or_insert_with(|| json!({})));
        default_job_spec(spec);
    }
    fn prepare_for_create(&self, o: &mut Map<String, Value>, new: &NewObject) {
        let spec = obj(o.entry("spec").or_insert_with(|| json!({})));
        let manual = spec.get("manualSelector").and_then(Value::as_bool) == Some(true);
        if !manual {
            spec.insert(
                "selector".into(),
                json!({"matchLabels": {"batch.kubernetes.io/controller-uid": new.uid}}),
            );
            let template = obj(spec.entry("template").or_insert_with(|| json!({})));
            let meta = obj(template.entry("metadata").or_insert_with(|| json!({})));
            let labels = obj(meta.entry("labels").or_insert_with(|| json!({})));
            labels.insert("batch.kubernetes.io/controller-uid".into(), json!(new.uid));
            labels.insert("batch.kubernetes.io/job-name".into(), json!(new.name));
            labels.insert("controller-uid".into(), json!(new.uid));
            labels.insert("job-name".into(), json!(new.name));
        }
        o.insert("status".into(), json!({}));
    }
    fn validate(&self, object: &Value, _old: Option<&Value>, causes: &mut Causes) {
        let spec = object.get("spec");
        validation::validate_workload(
            spec.unwrap_or(&Value::Null),
            &["OnFailure", "Never"],
            true,
            causes,
        );
        if spec
            .and_then(|s| s.pointer("/template/spec/restartPolicy"))
            .is_none()
        {
            causes.push(Cause::unsupported(
                "spec.template.spec.restartPolicy",
                &json!("Always"),
                &["OnFailure", "Never"],
            ));
        }
    }
    fn field_labels(&self) -> &'static [(&'static str, &'static str)] {
        &[("status.successful", "/status/succeeded")]
    }
}

/// The strategy of cronjobs.
pub struct CronJobs;

impl Strategy for CronJobs {
    fn tracks_generation(&self) -> bool {
        true
    }
    fn defaults(&self, o: &mut Map<String, Value>) {
        let spec = obj(o.entry("spec").or_insert_with(|| json!({})));
        default(spec, "concurrencyPolicy", json!("Allow"));
        default(spec, "suspend", json!(false));
        default(spec, "successfulJobsHistoryLimit", json!(3));
        default(spec, "failedJobsHistoryLimit", json!(1));
        if let Some(jt) = spec.get_mut("jobTemplate").filter(|j| j.is_object())
            && let Some(js) = obj(jt).get_mut("spec").filter(|j| j.is_object())
        {
            default_job_spec(obj(js));
        }
    }
    fn validate(&self, object: &Value, _old: Option<&Value>, causes: &mut Causes) {
        let spec = object.get("spec");
        match spec.and_then(|s| s.get("schedule")).and_then(Value::as_str) {
            None | Some("") => causes.push(Cause::required("spec.schedule")),
            Some(_) => {}
        }
        let template = spec.and_then(|s| s.pointer("/jobTemplate/spec/template/spec"));
        validation::validate_pod_spec(template, "spec.jobTemplate.spec.template.spec", causes);
    }
}

/// The strategy of poddisruptionbudgets.
pub struct PodDisruptionBudgets;

impl Strategy for PodDisruptionBudgets {
    fn tracks_generation(&self) -> bool {
        true
    }
    fn validate(&self, object: &Value, _old: Option<&Value>, causes: &mut Causes) {
        let spec = object.get("spec").unwrap_or(&Value::Null);
        if spec.get("minAvailable").is_some() && spec.get("maxUnavailable").is_some() {
            causes.push(Cause::invalid(
                "spec",
                spec,
                "minAvailable and maxUnavailable cannot be both set",
            ));
        }
    }
}

/// The strategy of rolebindings and clusterrolebindings.
pub struct RoleBindings;

impl Strategy for RoleBindings {
    fn name_rule(&self) -> NameRule {
        NameRule::PathSegment
    }
    fn validate(&self, object: &Value, old: Option<&Value>, causes: &mut Causes) {
        validate_binding(object, causes);
        if let Some(old) = old
            && old.get("roleRef") != object.get("roleRef")
        {
            // Upstream prints the Go value of the old reference.
            let r = |k: &str| {
                old.pointer(&format!("/roleRef/{k}"))
                    .and_then(Value::as_str)
                    .unwrap_or("")
                    .to_string()
            };
            causes.push(Cause::new(
                    "FieldValueInvalid",
                    "roleRef",
                    format!(
                        "Invalid value: rbac.RoleRef{{APIGroup:{:?}, Kind:{:?}, Name:{:?}}}: cannot change roleRef",
                        r("apiGroup"),
                        r("kind"),
                        r("name")
                    ),
                ));
        }
    }
}

/// The strategy of roles and clusterroles.
pub struct Roles;

impl Strategy for Roles {
    fn name_rule(&self) -> NameRule {
        NameRule::PathSegment
    }
    fn validate(&self, object: &Value, _old: Option<&Value>, causes: &mut Causes) {
        validate_rules(object, causes)
    }
}

/// The strategy of endpointslices.
pub struct EndpointSlices;

impl Strategy for EndpointSlices {
    fn validate(&self, object: &Value, _old: Option<&Value>, causes: &mut Causes) {
        validate_endpoint_slice(object, causes);
    }
}

/// The strategy of certificatesigningrequests.
pub struct CertificateSigningRequests;

impl Strategy for CertificateSigningRequests {
    fn validate(&self, object: &Value, _old: Option<&Value>, causes: &mut Causes) {
        crate::certificates::validate(object, &mut causes.0)
    }
}

/// The strategy of ingresses.
pub struct Ingresses;

impl Strategy for Ingresses {
    fn tracks_generation(&self) -> bool {
        true
    }
    fn validate(&self, object: &Value, _old: Option<&Value>, causes: &mut Causes) {
        validation::validate_ingress(object.get("spec"), causes);
    }
}

/// The strategy of networkpolicies.
pub struct NetworkPolicies;

impl Strategy for NetworkPolicies {
    fn tracks_generation(&self) -> bool {
        true
    }
    /// Upstream's defaults: `policyTypes` is `[Ingress]`, with `Egress` when there are egress
    /// rules (kubectl describe reads it), and a port's protocol is TCP.
    fn defaults(&self, o: &mut Map<String, Value>) {
        let Some(spec) = o.get_mut("spec").and_then(Value::as_object_mut) else {
            return;
        };
        let has_egress = spec
            .get("egress")
            .and_then(Value::as_array)
            .is_some_and(|e| !e.is_empty());
        if spec
            .get("policyTypes")
            .and_then(Value::as_array)
            .is_none_or(|t| t.is_empty())
        {
            let types = if has_egress {
                json!(["Ingress", "Egress"])
            } else {
                json!(["Ingress"])
            };
            spec.insert("policyTypes".into(), types);
        }
        for direction in ["ingress", "egress"] {
            for rule in spec
                .get_mut(direction)
                .and_then(Value::as_array_mut)
                .into_iter()
                .flatten()
            {
                for port in rule
                    .get_mut("ports")
                    .and_then(Value::as_array_mut)
                    .into_iter()
                    .flatten()
                    .filter_map(Value::as_object_mut)
                {
                    default(port, "protocol", json!("TCP"));
                }
            }
        }
    }
    fn validate(&self, object: &Value, _old: Option<&Value>, causes: &mut Causes) {
        validation::validate_network_policy(object.get("spec"), causes);
    }
}

/// The strategy of storageclasses.
pub struct StorageClasses;

impl Strategy for StorageClasses {
    fn validate(&self, object: &Value, _old: Option<&Value>, causes: &mut Causes) {
        if object
            .get("provisioner")
            .and_then(Value::as_str)
            .unwrap_or("")
            .is_empty()
        {
            causes.push(Cause::required("provisioner"));
        }
    }
}

/// The strategy of customresourcedefinitions.
pub struct CustomResourceDefinitions;

impl Strategy for CustomResourceDefinitions {
    fn tracks_generation(&self) -> bool {
        true
    }
    fn prepare_for_create(&self, o: &mut Map<String, Value>, _new: &NewObject) {
        let now = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
        let status = crate::crd::status(&Value::Object(o.clone()), &now);
        o.insert("status".into(), status);
    }
    fn prepare_for_update(&self, new: &mut Value, _old: &Value) {
        let now = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
        let mut status = crate::crd::status(new, &now);
        // Keep the original transition times of conditions that did not change.
        if let Some(old) = new
            .pointer("/status/conditions")
            .and_then(Value::as_array)
            .cloned()
            && let Some(conditions) = status.get_mut("conditions").and_then(Value::as_array_mut)
        {
            for c in conditions.iter_mut() {
                if let Some(prev) = old
                    .iter()
                    .find(|p| p["type"] == c["type"] && p["status"] == c["status"])
                {
                    c["lastTransitionTime"] = prev["lastTransitionTime"].clone();
                }
            }
        }
        new["status"] = status;
    }
    fn validate(&self, object: &Value, _old: Option<&Value>, causes: &mut Causes) {
        causes.0.extend(crate::crd::validate(object))
    }
}

/// The strategy of a built-in resource: the one place that ties a resource to its behaviour.
pub fn strategy(group: &str, resource: &str) -> Arc<dyn Strategy> {
    match (group, resource) {
        ("", "pods") => Arc::new(Pods),
        ("", "services") => Arc::new(Services),
        ("", "secrets") => Arc::new(Secrets),
        ("", "configmaps") => Arc::new(ConfigMaps),
        ("", "namespaces") => Arc::new(Namespaces),
        ("", "nodes") => Arc::new(Nodes),
        ("", "persistentvolumeclaims") => Arc::new(PersistentVolumeClaims),
        ("", "persistentvolumes") => Arc::new(PersistentVolumes),
        ("", "events") => Arc::new(CoreEvents),
        ("events.k8s.io", "events") => Arc::new(Events),
        ("apps", "deployments") => Arc::new(Deployments),
        ("apps", "replicasets") => Arc::new(ReplicaSets),
        ("apps", "daemonsets") => Arc::new(DaemonSets),
        ("apps", "statefulsets") => Arc::new(StatefulSets),
        ("batch", "jobs") => Arc::new(Jobs),
        ("batch", "cronjobs") => Arc::new(CronJobs),
        ("policy", "poddisruptionbudgets") => Arc::new(PodDisruptionBudgets),
        ("rbac.authorization.k8s.io", "rolebindings" | "clusterrolebindings") => {
            Arc::new(RoleBindings)
        }
        ("rbac.authorization.k8s.io", "roles" | "clusterroles") => Arc::new(Roles),
        ("discovery.k8s.io", "endpointslices") => Arc::new(EndpointSlices),
        ("networking.k8s.io", "ingresses") => Arc::new(Ingresses),
        ("networking.k8s.io", "networkpolicies") => Arc::new(NetworkPolicies),
        (crate::certificates::GROUP, "certificatesigningrequests") => {
            Arc::new(CertificateSigningRequests)
        }
        ("storage.k8s.io", "storageclasses") => Arc::new(StorageClasses),
        ("apiregistration.k8s.io", "apiservices") => Arc::new(ApiServices),
        ("apiextensions.k8s.io", "customresourcedefinitions") => {
            Arc::new(CustomResourceDefinitions)
        }
        _ => Arc::new(Plain),
    }
}

/// APIServices: named `<version>.<group>` (`v1.` for the core group, which a DNS name cannot be).
pub struct ApiServices;

impl Strategy for ApiServices {
    fn name_rule(&self) -> NameRule {
        NameRule::PathSegment
    }

    fn validate(&self, object: &Value, _old: Option<&Value>, causes: &mut Causes) {
        let name = object
            .pointer("/metadata/name")
            .and_then(Value::as_str)
            .unwrap_or("");
        let spec = |k: &str| {
            object
                .pointer(&format!("/spec/{k}"))
                .and_then(Value::as_str)
                .unwrap_or("")
                .to_string()
        };
        let (version, group) = (spec("version"), spec("group"));
        if version.is_empty() {
            causes.push(Cause::required("spec.version"));
        }
        if name != format!("{version}.{group}") {
            causes.push(Cause::invalid(
                "metadata.name",
                &Value::from(name),
                &format!("must be spec.version + \".\" + spec.group: {version:?}"),
            ));
        }
    }
}

/// Deployments, ReplicaSets and DaemonSets: a workload whose selector is immutable.
fn validate_selector_workload(object: &Value, old: Option<&Value>, causes: &mut Causes) {
    let spec = object.get("spec");
    validation::validate_workload(spec.unwrap_or(&Value::Null), &["Always"], true, causes);
    if let Some(old) = old
        && old.pointer("/spec/selector") != object.pointer("/spec/selector")
    {
        causes.push(Cause::invalid(
            "spec.selector",
            object.pointer("/spec/selector").unwrap_or(&Value::Null),
            "field is immutable",
        ));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::registry::Registry;

    #[test]
    fn a_bound_claim_shrinks_only_above_its_capacity() {
        let registry = Registry::new();
        let info = registry.get("", "v1", "persistentvolumeclaims").unwrap();
        let claim = |request: &str| {
            json!({"metadata": {"name": "data", "namespace": "default"},
                "spec": {"accessModes": ["ReadWriteOnce"], "volumeName": "pv-1",
                    "resources": {"requests": {"storage": request}}},
                "status": {"phase": "Bound", "capacity": {"storage": "1Gi"}}})
        };
        let shown = |new: &str, old: Value| {
            validate(&info, &claim(new), Some(&old))
                .iter()
                .map(Cause::display)
                .collect::<Vec<_>>()
        };
        // Growing, and lowering a failed expansion back to above the capacity, are fine.
        assert!(shown("2Gi", claim("1Gi")).is_empty());
        assert!(shown("1536Mi", claim("2Gi")).is_empty());
        for low in ["1Gi", "512Mi"] {
            assert_eq!(
                shown(low, claim("2Gi")),
                [
                    "spec.resources.requests.storage: Forbidden: field can not be less than status.capacity"
                ],
                "{low}"
            );
        }
        // An unbound claim's spec is free.
        let mut unbound = claim("2Gi");
        unbound["spec"]["volumeName"] = json!(null);
        let mut lower = claim("1Gi");
        lower["spec"]["volumeName"] = json!(null);
        assert!(validate(&info, &lower, Some(&unbound)).is_empty());
    }

    #[test]
    fn deployment_defaults_match_upstream() {
        let registry = Registry::new();
        let info = registry.get("apps", "v1", "deployments").unwrap();
        let mut d = json!({"spec": {"template": {"spec": {"containers": [{"name": "nginx", "image": "nginx:1.14.2", "ports": [{"containerPort": 80}]}]}}}});
        apply_defaults(&info, &mut d);
        assert_eq!(d["spec"]["replicas"], 1);
        assert_eq!(d["spec"]["strategy"]["rollingUpdate"]["maxSurge"], "25%");
        let c = &d["spec"]["template"]["spec"]["containers"][0];
        assert_eq!(c["imagePullPolicy"], "IfNotPresent");
        assert_eq!(c["ports"][0]["protocol"], "TCP");
        assert_eq!(d["spec"]["template"]["spec"]["restartPolicy"], "Always");
    }

    #[test]
    fn network_policy_defaults_match_upstream() {
        let registry = Registry::new();
        let info = registry
            .get("networking.k8s.io", "v1", "networkpolicies")
            .unwrap();
        let mut ingress_only =
            json!({"spec": {"podSelector": {}, "ingress": [{"ports": [{"port": 80}]}]}});
        apply_defaults(&info, &mut ingress_only);
        assert_eq!(ingress_only["spec"]["policyTypes"], json!(["Ingress"]));
        assert_eq!(
            ingress_only["spec"]["ingress"][0]["ports"][0]["protocol"],
            "TCP"
        );
        let mut both = json!({"spec": {"podSelector": {}, "egress": [{"ports": [{"protocol": "UDP", "port": 53}]}]}});
        apply_defaults(&info, &mut both);
        assert_eq!(both["spec"]["policyTypes"], json!(["Ingress", "Egress"]));
        assert_eq!(both["spec"]["egress"][0]["ports"][0]["protocol"], "UDP");
        let mut said = json!({"spec": {"podSelector": {}, "policyTypes": ["Egress"]}});
        apply_defaults(&info, &mut said);
        assert_eq!(said["spec"]["policyTypes"], json!(["Egress"]));
    }

    #[test]
    fn qos() {
        assert_eq!(
            qos_class(&json!({"containers": [{"name": "a"}]})),
            "BestEffort"
        );
        assert_eq!(
            qos_class(
                &json!({"containers": [{"resources": {"limits": {"cpu": "1", "memory": "1Gi"}}}]})
            ),
            "Guaranteed"
        );
        assert_eq!(
            qos_class(&json!({"containers": [{"resources": {"requests": {"cpu": "1"}}}]})),
            "Burstable"
        );
    }

    #[test]
    fn required_fields_of_other_kinds() {
        let registry = Registry::new();
        let check = |resource: (&str, &str), object: Value| -> Vec<String> {
            let info = registry.get(resource.0, "v1", resource.1).unwrap();
            validate(&info, &object, None)
                .iter()
                .map(Cause::display)
                .collect()
        };
        let meta = json!({"name": "x", "namespace": "default"});
        assert_eq!(
            check(
                ("discovery.k8s.io", "endpointslices"),
                json!({"metadata": meta, "endpoints": [{}]})
            ),
            vec![
                "addressType: Required value",
                "endpoints[0].addresses: Required value"
            ]
        );
        let pvc = check(
            ("", "persistentvolumeclaims"),
            json!({"metadata": meta, "spec": {}}),
        );
        assert_eq!(pvc.len(), 2, "{pvc:?}");
        let role = check(
            ("rbac.authorization.k8s.io", "roles"),
            json!({"metadata": meta, "rules": [{"resources": ["pods"]}]}),
        );
        assert_eq!(role.len(), 2, "{role:?}");
        let tls = check(
            ("", "secrets"),
            json!({"metadata": meta, "type": "kubernetes.io/tls", "data": {}}),
        );
        assert_eq!(
            tls,
            vec![
                "data[tls.crt]: Required value",
                "data[tls.key]: Required value"
            ]
        );
        let sc = check(
            ("storage.k8s.io", "storageclasses"),
            json!({"metadata": {"name": "fast"}}),
        );
        assert_eq!(sc, vec!["provisioner: Required value"]);
    }

    #[test]
    fn pod_fields() {
        let registry = Registry::new();
        let info = registry.get("", "v1", "pods").unwrap();
        let f = selectable_fields(
            &info,
            &json!({"metadata": {"name": "p", "namespace": "d"}, "spec": {"nodeName": "n1"}}),
        );
        assert_eq!(f["spec.nodeName"], "n1");
        assert_eq!(f["status.phase"], "");
        assert!(check_field_labels(&info, ["spec.nodeName".to_string()].into_iter()).is_ok());
        assert!(check_field_labels(&info, ["spec.bogus".to_string()].into_iter()).is_err());
    }
}
