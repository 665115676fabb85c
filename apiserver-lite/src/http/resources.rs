//! Resource requests: get, list, create, update, patch, delete and the subresources.
//!
//! Writes follow upstream's order: decode (typed round trip, unknown-field policy) -> admission
//! (namespace exists and is not terminating) -> defaults -> prepare (status and generation rules)
//! -> validate -> field management -> storage commit. Updates and patches are optimistic: read,
//! compute, write with the read revision as precondition, retry on a lost race unless the client
//! pinned a resourceVersion itself.

use std::sync::Arc;

use axum::body::Body;
use axum::extract::Request;
use axum::response::Response;
use chrono::{SecondsFormat, Utc};
use http::{Method, StatusCode, header};
use serde_json::{Value, json};

use super::decode;
use super::list_options::list_options;
use super::pipeline::RequestContext;
use super::request::{Output, Query, ResourcePath};
use super::{ApiServer, MAX_BODY, body_response, encode, json_response, with_warnings};
use crate::auth::Identity;
use crate::error::{ApiError, Cause, Details};
use crate::kinds;
use crate::patch::{self, PatchType, fields};
use crate::registry::{ResourceInfo, builtin};
use crate::selectors::LabelSelector;
use crate::storage::{StorageError, Stored, list_prefix, object_key};
use crate::tables::{self, IncludeObject};

/// How many times an unconditional update or patch retries after losing a race. Upstream retries
/// without bound; this bound is far above what contention on one object needs.
const MAX_RETRIES: usize = 64;

/// No wait for the first attempts (races are short), then exponential backoff with jitter, capped.
async fn backoff(attempt: usize) {
    if attempt < 3 {
        return;
    }
    let base_ms = (1u64 << (attempt - 3).min(5)).min(25);
    let jitter = uuid::Uuid::new_v4().as_u128() as u64 % (base_ms * 1000 + 1);
    tokio::time::sleep(std::time::Duration::from_micros(base_ms * 500 + jitter / 2)).await;
}

/// Whether an error says another writer changed the object between our read and our write (the
/// storage precondition failed), so the operation may be computed again. Client preconditions,
/// apply conflicts and validation errors are answers, not races.
fn lost_race(e: &ApiError) -> bool {
    e.code == 409 && e.reason == "Conflict" && e.message.ends_with(crate::error::MODIFIED)
}

pub fn now() -> String {
    Utc::now().to_rfc3339_opts(SecondsFormat::Secs, true)
}

fn storage_error(info: &ResourceInfo, name: &str, e: StorageError) -> ApiError {
    match e {
        StorageError::AlreadyExists(_) => {
            ApiError::already_exists(&info.resource, &info.group, name)
        }
        StorageError::NotFound(_) => ApiError::not_found(&info.resource, &info.group, name),
        StorageError::Conflict { .. } => ApiError::modified(&info.resource, &info.group, name),
        StorageError::Expired { requested, oldest } => {
            ApiError::expired(format!("too old resource version: {requested} ({oldest})"))
        }
        StorageError::Closed => ApiError::service_unavailable("the server is shutting down"),
        StorageError::Backend(msg) => ApiError::internal(msg),
        StorageError::Damaged(msg) => {
            ApiError::internal(format!("the datastore is damaged: {msg}"))
        }
        StorageError::Unavailable(msg) => ApiError::service_unavailable(msg),
        e @ StorageError::TooLarge { .. } => {
            ApiError::new(413, "RequestEntityTooLarge", e.to_string())
        }
    }
}

/// What one write request asked for besides its body.
struct WriteOptions {
    dry_run: bool,
    manager: String,
    validation: FieldValidation,
    warnings: Vec<String>,
}

#[derive(Clone, Copy, PartialEq)]
enum FieldValidation {
    Strict,
    Warn,
    Ignore,
}

fn write_options(query: &Query, request: &Request) -> Result<WriteOptions, ApiError> {
    let dry_run = match query.get("dryRun") {
        None | Some("") => false,
        Some("All") => true,
        Some(other) => {
            return Err(ApiError::bad_request(format!(
                "dryRun: Unsupported value: {other:?}: supported values: \"All\""
            )));
        }
    };
    let validation = match query.get("fieldValidation") {
        None | Some("") | Some("Warn") => FieldValidation::Warn,
        Some("Strict") => FieldValidation::Strict,
        Some("Ignore") => FieldValidation::Ignore,
        Some(other) => {
            return Err(ApiError::bad_request(format!(
                "fieldValidation: Unsupported value: {other:?}: supported values: \"Ignore\", \"Strict\", \"Warn\""
            )));
        }
    };
    let manager = match query.get("fieldManager") {
        Some(m) if !m.is_empty() => {
            if m.len() > 128 {
                return Err(ApiError::invalid(
                    "PatchOptions",
                    "meta.k8s.io",
                    "",
                    vec![Cause::too_long("fieldManager", 128)],
                ));
            }
            m.to_string()
        }
        _ => request
            .headers()
            .get(header::USER_AGENT)
            .and_then(|u| u.to_str().ok())
            .map(|u| u.split('/').next().unwrap_or(u).to_string())
            .filter(|u| !u.is_empty())
            .unwrap_or_else(|| "unknown".into()),
    };
    Ok(WriteOptions {
        dry_run,
        manager,
        validation,
        warnings: Vec::new(),
    })
}

/// Reads the body, refusing more than [`MAX_BODY`] with 413.
async fn read_body(request: Request) -> Result<(http::request::Parts, bytes::Bytes), ApiError> {
    let (parts, body) = request.into_parts();
    if let Some(len) = parts
        .headers
        .get(header::CONTENT_LENGTH)
        .and_then(|l| l.to_str().ok())
        .and_then(|l| l.parse::<usize>().ok())
        && len > MAX_BODY
    {
        return Err(ApiError::too_large());
    }
    let bytes = axum::body::to_bytes(body, MAX_BODY)
        .await
        .map_err(|_| ApiError::too_large())?;
    Ok((parts, bytes))
}

fn content_type(parts: &http::request::Parts) -> String {
    parts
        .headers
        .get(header::CONTENT_TYPE)
        .and_then(|c| c.to_str().ok())
        .unwrap_or("application/json")
        .to_string()
}

/// Decodes a create/update body (see [`decode::document`]), large ones off the async workers.
async fn decode_body(
    parts: &http::request::Parts,
    body: &bytes::Bytes,
) -> Result<(Value, Vec<String>), ApiError> {
    let content_type = content_type(parts);
    decode::off_workers(body, move |b| decode::document(&content_type, b)).await
}

/// Fields present in `input` that the typed round trip dropped: upstream's "unknown fields".
fn unknown_fields(input: &Value, output: &Value, path: &str, found: &mut Vec<String>) {
    match (input, output) {
        (Value::Object(i), Value::Object(o)) => {
            for (k, v) in i {
                if v.is_null() {
                    continue;
                }
                let child = if path.is_empty() {
                    k.clone()
                } else {
                    format!("{path}.{k}")
                };
                match o.get(k) {
                    None if path == "metadata"
                        && crate::registry::builtin::omitted_when_empty(k, v) => {}
                    None => found.push(child),
                    Some(ov) => unknown_fields(v, ov, &child, found),
                }
            }
        }
        (Value::Array(i), Value::Array(o)) => {
            for (n, (iv, ov)) in i.iter().zip(o.iter()).enumerate() {
                unknown_fields(iv, ov, &format!("{path}[{n}]"), found);
            }
        }
        _ => {}
    }
}

/// Checks apiVersion/kind against the URL, decodes through the typed struct (dropping and
/// reporting unknown fields per `fieldValidation`).
fn decode_object(
    info: &ResourceInfo,
    mut value: Value,
    opts: &mut WriteOptions,
) -> Result<Value, ApiError> {
    let api_version = info.api_version();
    match value.get("apiVersion").and_then(Value::as_str) {
        Some(v) if v != api_version => {
            return Err(ApiError::bad_request(format!(
                "the API version in the data ({v}) does not match the expected API version ({api_version})"
            )));
        }
        _ => {}
    }
    match value.get("kind").and_then(Value::as_str) {
        Some(k) if k != info.kind => {
            return Err(ApiError::bad_request(format!(
                "the kind in the data ({k}) does not match the expected kind ({})",
                info.kind
            )));
        }
        _ => {}
    }
    value["apiVersion"] = json!(api_version);
    value["kind"] = json!(info.kind);
    if value
        .get("metadata")
        .is_some_and(|m| !m.is_object() && !m.is_null())
    {
        return Err(ApiError::bad_request(format!(
            "{} in version {:?} cannot be handled as a {}: metadata must be an object",
            info.kind, info.version, info.kind
        )));
    }
    if let Some(custom) = &info.custom {
        if let Some(meta) = value.get("metadata").filter(|m| m.is_object()) {
            let normalized = builtin::normalize_as::<
                k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta,
            >(meta)
            .map_err(|e| {
                ApiError::bad_request(format!(
                    "{} in version {:?} cannot be handled as a {}: metadata: {e}",
                    info.kind, info.version, info.kind
                ))
            })?;
            value["metadata"] = normalized;
        }
        let mut pruned = Vec::new();
        crate::structural::prune_and_default(&custom.schema, &mut value, "", &mut pruned, true);
        report_unknown(pruned, opts)?;
        return Ok(value);
    }
    let Some(typed) = &info.typed else {
        return Ok(value);
    };
    let normalized = (typed.normalize)(&value).map_err(|e| match e.missing_field() {
        // Upstream decodes leniently and its validation reports the field as required.
        Some(field) => ApiError::invalid(
            &info.kind,
            &info.group,
            meta_str(&value, "name"),
            vec![Cause::required(field)],
        ),
        None => ApiError::bad_request(format!(
            "{} in version {:?} cannot be handled as a {}: {e}",
            info.kind, info.version, info.kind
        )),
    })?;
    let mut unknown = Vec::new();
    unknown_fields(&value, &normalized, "", &mut unknown);
    report_unknown(unknown, opts)?;
    Ok(normalized)
}

/// Applies the `fieldValidation` policy to unknown fields.
fn report_unknown(unknown: Vec<String>, opts: &mut WriteOptions) -> Result<(), ApiError> {
    report_fields("unknown", unknown, opts)
}

/// Applies the `fieldValidation` policy to keys the body repeats, as upstream's strict decoder.
fn report_duplicates(duplicates: Vec<String>, opts: &mut WriteOptions) -> Result<(), ApiError> {
    report_fields("duplicate", duplicates, opts)
}

fn report_fields(what: &str, fields: Vec<String>, opts: &mut WriteOptions) -> Result<(), ApiError> {
    let unknown = fields;
    if !unknown.is_empty() {
        match opts.validation {
            FieldValidation::Strict => {
                let list: Vec<String> = unknown
                    .iter()
                    .map(|f| format!("{what} field {f:?}"))
                    .collect();
                return Err(ApiError::bad_request(format!(
                    "strict decoding error: {}",
                    list.join(", ")
                )));
            }
            FieldValidation::Warn => {
                opts.warnings
                    .extend(unknown.iter().map(|f| format!("{what} field {f:?}")));
            }
            FieldValidation::Ignore => {}
        }
    }
    Ok(())
}

fn meta_str<'a>(object: &'a Value, key: &str) -> &'a str {
    object
        .get("metadata")
        .and_then(|m| m.get(key))
        .and_then(Value::as_str)
        .unwrap_or("")
}

fn meta_mut(object: &mut Value) -> &mut serde_json::Map<String, Value> {
    if !object.get("metadata").is_some_and(Value::is_object) {
        object["metadata"] = json!({});
    }
    object["metadata"]
        .as_object_mut()
        .expect("just made an object")
}

fn generate_suffix() -> String {
    // upstream's alphabet: no vowels, no confusable characters.
    const ALPHABET: &[u8] = b"bcdfghjklmnpqrstvwxz2456789";
    let bytes = uuid::Uuid::new_v4().into_bytes();
    bytes[..5]
        .iter()
        .map(|b| ALPHABET[*b as usize % ALPHABET.len()] as char)
        .collect()
}

fn key_of(info: &ResourceInfo, namespace: &str, name: &str) -> String {
    let (group, resource) = info.storage_resource();
    object_key(
        group,
        resource,
        if info.namespaced { namespace } else { "" },
        name,
    )
}

/// Everything except metadata and status: what a generation bump looks at.
fn spec_part(object: &Value) -> Value {
    let mut o = object.clone();
    if let Some(m) = o.as_object_mut() {
        m.remove("metadata");
        m.remove("status");
    }
    o
}

/// The object minus what changes on every write, to tell a no-op update.
fn comparable(object: &Value) -> Value {
    let mut o = object.clone();
    if let Some(meta) = o.get_mut("metadata").and_then(Value::as_object_mut) {
        meta.remove("resourceVersion");
        meta.remove("managedFields");
    }
    o
}

pub async fn handle(
    server: Arc<ApiServer>,
    context: RequestContext,
    path: ResourcePath,
    output: Output,
    request: Request,
) -> Result<Response, ApiError> {
    tracing::debug!(user = %context.user.user, method = %request.method(), path = %request.uri().path(), "request");
    let Some(info) = server
        .registry
        .get(&path.group, &path.version, &path.resource)
    else {
        return Err(ApiError::no_route());
    };
    if path.namespace.is_some() && !info.namespaced {
        return Err(ApiError::no_route());
    }
    if info.namespaced && path.name.is_some() && path.namespace.is_none() {
        return Err(ApiError::no_route());
    }
    // A cloud hub's cluster proxy: Karmada serves it as a subresource of its Clusters.
    if let (Some(hub), Some(name), Some("proxy")) = (
        server.hub.get().cloned(),
        path.name.as_deref(),
        path.subresource.as_deref(),
    ) && info.group == crate::cloud_link::CLUSTER_GROUP
        && info.resource == "clusters"
    {
        // The site must be one the hub knows (404 otherwise, as for any object).
        let key = key_of(&info, "", name);
        let stored = server.storage.get(&key).await;
        if stored.map_err(|e| storage_error(&info, name, e))?.is_none() {
            return Err(ApiError::not_found(&info.resource, &info.group, name));
        }
        return hub
            .proxy(name.to_string(), context.user.clone(), request)
            .await;
    }
    if let Some(sub) = &path.subresource
        && !info.has_subresource(sub)
    {
        return Err(ApiError::no_route());
    }
    let query = Query::parse(request.uri().query());
    let method = request.method().clone();
    let namespace = path.namespace.clone().unwrap_or_default();
    let ctx = Ctx {
        server: server.clone(),
        info: info.clone(),
        namespace,
        output,
        user: context.user.clone(),
    };
    let verb_allowed = |verb: &str| -> Result<(), ApiError> {
        if info.verbs.contains(&verb) {
            Ok(())
        } else {
            Err(ApiError::method_not_allowed(
                verb,
                &info.resource,
                &info.group,
            ))
        }
    };
    if info.group == crate::metrics::GROUP {
        if method != Method::GET {
            return Err(ApiError::method_not_allowed(
                "create",
                &info.resource,
                &info.group,
            ));
        }
        return ctx.metrics(path.name.as_deref(), &query).await;
    }
    match (&method, path.name.as_deref(), path.subresource.as_deref()) {
        (&Method::GET, Some(name), Some("proxy")) if info.resource == "nodes" => {
            let tail = path.proxy_path.clone().unwrap_or_default();
            let raw = request.uri().query().map(String::from);
            ctx.node_proxy(name, &tail, raw.as_deref()).await
        }
        (_, Some(name), Some("proxy"))
            if info.resource == "pods" || info.resource == "services" =>
        {
            let tail = path.proxy_path.clone().unwrap_or_default();
            if info.resource == "pods" {
                super::proxy::pod(&server, &ctx.namespace, name, &tail, request).await
            } else {
                super::proxy::service(&server, &ctx.namespace, name, &tail, request).await
            }
        }
        (&Method::GET, None, None) => {
            if query.flag("watch")? {
                verb_allowed("watch")?;
                super::watch::watch(
                    ctx.server.clone(),
                    ctx.info.clone(),
                    ctx.namespace.clone(),
                    ctx.output,
                    &query,
                )
                .await
            } else {
                verb_allowed("list")?;
                ctx.list(&query).await
            }
        }
        (
            &Method::GET,
            Some(name),
            None | Some("status") | Some("approval") | Some("ephemeralcontainers"),
        ) => ctx.get(name).await,
        (&Method::GET, Some(name), Some("scale")) => ctx.get_scale(name).await,
        (&Method::GET, Some(name), Some("log")) if info.resource == "pods" => {
            ctx.pod_log(name, &query).await
        }
        (
            &Method::GET | &Method::POST,
            Some(name),
            Some(sub @ ("exec" | "attach" | "portforward")),
        ) if info.resource == "pods" => {
            let (name, sub) = (name.to_string(), sub.to_string());
            ctx.pod_stream(&name, &sub, &query, request).await
        }
        (_, Some(name), Some(sub @ ("log" | "exec" | "attach" | "portforward" | "proxy"))) => {
            ctx.node_streaming(name, sub).await
        }
        (&Method::POST, None, None) if super::reviews::is_review(&info) => {
            let (parts, body) = read_body(request).await?;
            let (value, _) = decode_body(&parts, &body).await?;
            let answer =
                super::reviews::answer(&server, &context, &info, &ctx.namespace, value).await?;
            Ok(json_response(StatusCode::CREATED, &answer))
        }
        (&Method::POST, None, None) => {
            verb_allowed("create")?;
            if info.namespaced && path.namespace.is_none() {
                return Err(ApiError::method_not_allowed(
                    "create",
                    &info.resource,
                    &info.group,
                ));
            }
            let mut opts = write_options(&query, &request)?;
            let (parts, body) = read_body(request).await?;
            let (value, duplicates) = decode_body(&parts, &body).await?;
            report_duplicates(duplicates, &mut opts)?;
            let created = ctx.create(value, &mut opts).await?;
            Ok(with_warnings(
                ctx.render(StatusCode::CREATED, &created),
                &opts.warnings,
            ))
        }
        (&Method::POST, Some(name), Some("binding")) => {
            let (parts, body) = read_body(request).await?;
            let (value, _) = decode_body(&parts, &body).await?;
            ctx.bind(name, value).await
        }
        (&Method::POST, Some(name), Some("token")) if ctx.info.resource == "serviceaccounts" => {
            let (parts, body) = read_body(request).await?;
            let (value, _) = decode_body(&parts, &body).await?;
            ctx.token_request(name, value).await
        }
        (&Method::POST, Some(name), Some("eviction")) => {
            let (parts, body) = read_body(request).await?;
            let (value, _) = decode_body(&parts, &body).await?;
            ctx.evict(name, value).await
        }
        (
            &Method::PUT,
            Some(name),
            sub @ (None
            | Some("status")
            | Some("finalize")
            | Some("scale")
            | Some("approval")
            | Some("ephemeralcontainers")),
        ) => {
            verb_allowed("update")?;
            let mut opts = write_options(&query, &request)?;
            let (parts, body) = read_body(request).await?;
            let (value, duplicates) = decode_body(&parts, &body).await?;
            report_duplicates(duplicates, &mut opts)?;
            let (code, updated) = ctx.replace(name, sub, value, &mut opts).await?;
            let response = if sub == Some("scale") {
                encode(code, &updated, output)
            } else {
                ctx.render(code, &updated)
            };
            Ok(with_warnings(response, &opts.warnings))
        }
        (
            &Method::PATCH,
            Some(name),
            sub @ (None
            | Some("status")
            | Some("scale")
            | Some("approval")
            | Some("ephemeralcontainers")),
        ) => {
            verb_allowed("patch")?;
            let mut opts = write_options(&query, &request)?;
            let force = query.flag("force")?;
            let (parts, body) = read_body(request).await?;
            let ctype = content_type(&parts);
            let Some(kind) = PatchType::from_content_type(&ctype) else {
                return Err(ApiError::new(
                    415,
                    "UnsupportedMediaType",
                    format!(
                        "the body of the request was in an unknown format - accepted media types include: {}",
                        PatchType::media_types().join(", ")
                    ),
                ));
            };
            let (code, patched) = ctx.patch(name, sub, kind, &body, force, &mut opts).await?;
            let response = if sub == Some("scale") {
                encode(code, &patched, output)
            } else {
                ctx.render(code, &patched)
            };
            Ok(with_warnings(response, &opts.warnings))
        }
        (&Method::DELETE, Some(name), None) => {
            verb_allowed("delete")?;
            let (parts, body) = read_body(request).await?;
            let options = delete_options(&query, &body, &content_type(&parts))?;
            let (code, object) = ctx.delete(name, &options).await?;
            // A Status when the object is gone at once; else the object, in the asked form.
            if object["kind"] == "Status" {
                Ok(encode(code, &object, output))
            } else {
                Ok(ctx.render(code, &object))
            }
        }
        (&Method::DELETE, None, None) => {
            verb_allowed("deletecollection")?;
            let (parts, body) = read_body(request).await?;
            let options = delete_options(&query, &body, &content_type(&parts))?;
            ctx.delete_collection(&query, &options).await
        }
        _ => Err(ApiError::method_not_allowed(
            &method.as_str().to_lowercase(),
            &info.resource,
            &info.group,
        )),
    }
}

/// A write as [`Ctx::commit`] takes it.
enum Write<'a> {
    Create(Value),
    Update {
        old: &'a Stored,
        new: Value,
    },
    /// `last` is the update that made the object go (its last finalizer removed), if any:
    /// admission sees it as the update it was.
    Delete {
        old: &'a Stored,
        last: Option<&'a Value>,
    },
}

/// The request's target resource and namespace.
pub struct Ctx {
    pub server: Arc<ApiServer>,
    pub info: Arc<ResourceInfo>,
    pub namespace: String,
    pub output: Output,
    /// Who the request acts as: admission (escalation checks, NodeRestriction) asks.
    pub user: Identity,
}

#[derive(Debug, serde::Serialize, serde::Deserialize)]
struct ContinueToken {
    rv: u64,
    start: String,
}

fn decode_continue(token: &str) -> Result<ContinueToken, ApiError> {
    use base64::Engine;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(token)
        .or_else(|_| base64::engine::general_purpose::STANDARD.decode(token))
        .map_err(|_| ApiError::bad_request("continue key is not valid: illegal base64 data"))?;
    serde_json::from_slice(&bytes).map_err(|_| ApiError::bad_request("continue key is not valid"))
}

fn encode_continue(rv: u64, start: &str) -> String {
    use base64::Engine;
    let token = ContinueToken {
        rv,
        start: start.to_string(),
    };
    base64::engine::general_purpose::URL_SAFE_NO_PAD
        .encode(serde_json::to_vec(&token).unwrap_or_default())
}

/// DeleteOptions from the body (kubectl) or the query (the Python client).
#[derive(Debug)]
pub struct DeleteOptions {
    grace_period: Option<i64>,
    propagation: Option<String>,
    precondition_uid: Option<String>,
    precondition_rv: Option<String>,
    dry_run: bool,
}

fn delete_options(
    query: &Query,
    body: &[u8],
    content_type: &str,
) -> Result<DeleteOptions, ApiError> {
    let from_body: Value = if body.iter().all(u8::is_ascii_whitespace) {
        json!({})
    } else if content_type.starts_with(crate::protobuf::CONTENT_TYPE) {
        crate::protobuf::decode(body)
            .map_err(|e| ApiError::bad_request(format!("error decoding DeleteOptions: {e}")))?
    } else {
        serde_json::from_slice(body)
            .map_err(|e| ApiError::bad_request(format!("error decoding DeleteOptions: {e}")))?
    };
    let grace_period = match from_body.get("gracePeriodSeconds").and_then(Value::as_i64) {
        Some(g) => Some(g),
        None => query.number("gracePeriodSeconds")?,
    };
    let mut propagation = from_body
        .get("propagationPolicy")
        .and_then(Value::as_str)
        .map(String::from)
        .or_else(|| {
            query
                .get("propagationPolicy")
                .filter(|p| !p.is_empty())
                .map(String::from)
        });
    let orphan = from_body
        .get("orphanDependents")
        .and_then(Value::as_bool)
        .or(if query.get("orphanDependents").is_some() {
            Some(query.flag("orphanDependents")?)
        } else {
            None
        });
    if let Some(orphan) = orphan {
        if propagation.is_some() {
            return Err(ApiError::invalid(
                "DeleteOptions",
                "meta.k8s.io",
                "",
                vec![Cause::invalid(
                    "propagationPolicy",
                    &json!(propagation),
                    "orphanDependents and deletionPropagation cannot be both set",
                )],
            ));
        }
        propagation = Some(if orphan { "Orphan" } else { "Background" }.into());
    }
    if let Some(p) = &propagation
        && !["Orphan", "Background", "Foreground"].contains(&p.as_str())
    {
        return Err(ApiError::invalid(
            "DeleteOptions",
            "meta.k8s.io",
            "",
            vec![Cause::unsupported(
                "propagationPolicy",
                &json!(p),
                &["Foreground", "Background", "Orphan", "nil"],
            )],
        ));
    }
    if let Some(g) = grace_period
        && g < 0
    {
        return Err(ApiError::invalid(
            "DeleteOptions",
            "meta.k8s.io",
            "",
            vec![Cause::invalid(
                "gracePeriodSeconds",
                &json!(g),
                "must be greater than or equal to 0",
            )],
        ));
    }
    let dry_run = match from_body.get("dryRun").and_then(Value::as_array) {
        Some(list) => list.iter().any(|v| v == "All"),
        None => query.get("dryRun") == Some("All"),
    };
    Ok(DeleteOptions {
        grace_period,
        propagation,
        precondition_uid: from_body
            .pointer("/preconditions/uid")
            .and_then(Value::as_str)
            .map(String::from),
        precondition_rv: from_body
            .pointer("/preconditions/resourceVersion")
            .and_then(Value::as_str)
            .map(String::from),
        dry_run,
    })
}

fn success_status(code: u16, details: Option<Value>) -> Value {
    let mut status = json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success", "code": code});
    if let Some(d) = details {
        status["details"] = d;
    }
    status
}

impl Ctx {
    /// `approve` or `sign` on the request's signer (`signers`, by name or `<domain>/*`), as
    /// upstream asks of whoever approves or signs a CertificateSigningRequest.
    fn signer_allows(&self, verb: &str, csr: &Value, name: &str) -> Result<(), ApiError> {
        let signer = csr
            .pointer("/spec/signerName")
            .and_then(Value::as_str)
            .unwrap_or("");
        let wildcard = format!("{}/*", signer.split('/').next().unwrap_or(""));
        let allowed = [signer, wildcard.as_str()].iter().any(|n| {
            let a =
                crate::auth::Attributes::resource(verb, crate::certificates::GROUP, "signers", "")
                    .named(n);
            self.server.authorizer.authorize(&self.user, &a).allowed()
        });
        if allowed {
            Ok(())
        } else {
            Err(crate::auth::forbidden_error(
                &crate::error::qualified(&self.info.resource, &self.info.group),
                name,
                &self.info.group,
                &self.info.resource,
                format!("user not permitted to {verb} requests with signerName {signer:?}"),
            ))
        }
    }

    /// Priority admission of a new pod, as upstream's plugin: `spec.priority` (and
    /// `preemptionPolicy`) come from its PriorityClass, or from the class marked
    /// `globalDefault` when it names none (0 without one); an unknown class is forbidden, and so
    /// is a priority in the pod that differs from its class's.
    async fn admit_priority(&self, pod: &mut Value) -> Result<(), ApiError> {
        let named = pod
            .pointer("/spec/priorityClassName")
            .and_then(Value::as_str)
            .filter(|n| !n.is_empty())
            .map(str::to_string);
        let name = meta_str(pod, "name").to_string();
        let forbidden = |why: String| crate::auth::forbidden_error("pods", &name, "", "pods", why);
        let class = match &named {
            Some(class) => {
                let key = object_key("scheduling.k8s.io", "priorityclasses", "", class);
                let stored = self
                    .server
                    .storage
                    .get(&key)
                    .await
                    .map_err(|e| storage_error(&self.info, &name, e))?;
                match stored {
                    Some(s) => Some((*s.object).clone()),
                    None => {
                        return Err(forbidden(format!(
                            "no PriorityClass with name {class} was found"
                        )));
                    }
                }
            }
            None => {
                let prefix = list_prefix("scheduling.k8s.io", "priorityclasses", "");
                let listing = self
                    .server
                    .storage
                    .list(&prefix, None, None)
                    .await
                    .map_err(|e| storage_error(&self.info, &name, e))?;
                listing
                    .items
                    .iter()
                    .filter_map(|i| i.value().ok())
                    .filter(|c| c.get("globalDefault") == Some(&json!(true)))
                    // Upstream picks the lowest value among several defaults.
                    .min_by_key(|c| c.get("value").and_then(Value::as_i64).unwrap_or(0))
            }
        };
        let priority = class
            .as_ref()
            .and_then(|c| c.get("value"))
            .and_then(Value::as_i64)
            .unwrap_or(0);
        let policy = class
            .as_ref()
            .and_then(|c| c.get("preemptionPolicy"))
            .and_then(Value::as_str)
            .unwrap_or("PreemptLowerPriority")
            .to_string();
        let spec = pod
            .get_mut("spec")
            .and_then(Value::as_object_mut)
            .ok_or_else(|| ApiError::bad_request("a pod needs a spec"))?;
        if let Some(given) = spec.get("priority").and_then(Value::as_i64)
            && given != priority
        {
            return Err(forbidden(format!(
                "the integer value of priority ({given}) must not be provided in pod spec; priority admission controller computed {priority} from the given PriorityClass name"
            )));
        }
        if let Some(given) = spec.get("preemptionPolicy").and_then(Value::as_str)
            && class.is_some()
            && given != policy
        {
            return Err(forbidden(format!(
                "the string value of PreemptionPolicy ({given}) must not be provided in pod spec; priority admission controller computed {policy} from the given PriorityClass name"
            )));
        }
        if let (None, Some(c)) = (&named, &class) {
            spec.insert("priorityClassName".into(), json!(meta_str(c, "name")));
        }
        spec.insert("priority".into(), json!(priority));
        if class.is_some() || !spec.contains_key("preemptionPolicy") {
            spec.insert("preemptionPolicy".into(), json!(policy));
        }
        Ok(())
    }

    /// The classes (IngressClasses, StorageClasses) marked default by any of `annotations`.
    async fn default_classes(
        &self,
        group: &str,
        resource: &str,
        annotations: &[&str],
    ) -> Result<Vec<Value>, ApiError> {
        let listing = self
            .server
            .storage
            .list(&list_prefix(group, resource, ""), None, None)
            .await
            .map_err(|e| storage_error(&self.info, "", e))?;
        Ok(listing
            .items
            .iter()
            .filter_map(|i| i.value().ok())
            .filter(|c| {
                let marked = c.pointer("/metadata/annotations");
                annotations
                    .iter()
                    .any(|k| marked.and_then(|a| a.get(*k)).and_then(Value::as_str) == Some("true"))
            })
            .collect())
    }

    /// DefaultIngressClass admission: a new Ingress that names no class (nor the legacy
    /// annotation) gets the class marked default, when exactly one is.
    async fn admit_default_ingress_class(&self, ingress: &mut Value) -> Result<(), ApiError> {
        let named = ingress
            .pointer("/spec/ingressClassName")
            .is_some_and(|c| !c.is_null())
            || ingress
                .pointer("/metadata/annotations/kubernetes.io~1ingress.class")
                .is_some();
        if named {
            return Ok(());
        }
        let defaults: Vec<String> = self
            .default_classes(
                "networking.k8s.io",
                "ingressclasses",
                &["ingressclass.kubernetes.io/is-default-class"],
            )
            .await?
            .iter()
            .map(|c| meta_str(c, "name").to_string())
            .collect();
        if let [class] = defaults.as_slice()
            && let Some(spec) = ingress.get_mut("spec").and_then(Value::as_object_mut)
        {
            spec.insert("ingressClassName".into(), json!(class));
        }
        Ok(())
    }

    /// DefaultStorageClass admission: a new claim that names no class (`storageClassName` unset,
    /// not "", and no beta annotation) gets the class marked default; with several, the newest,
    /// as upstream since 1.26.
    async fn admit_default_storage_class(&self, claim: &mut Value) -> Result<(), ApiError> {
        let named = claim
            .pointer("/spec/storageClassName")
            .is_some_and(|c| !c.is_null())
            || claim
                .pointer("/metadata/annotations/volume.beta.kubernetes.io~1storage-class")
                .is_some();
        if named {
            return Ok(());
        }
        let newest = self
            .default_classes(
                "storage.k8s.io",
                "storageclasses",
                &[
                    "storageclass.kubernetes.io/is-default-class",
                    "storageclass.beta.kubernetes.io/is-default-class",
                ],
            )
            .await?
            .into_iter()
            .max_by(|a, b| {
                let created = |c: &Value| {
                    c.pointer("/metadata/creationTimestamp")
                        .and_then(Value::as_str)
                        .unwrap_or("")
                        .to_string()
                };
                created(a)
                    .cmp(&created(b))
                    .then_with(|| meta_str(b, "name").cmp(meta_str(a, "name")))
            });
        if let Some(class) = newest
            && let Some(spec) = claim.get_mut("spec").and_then(Value::as_object_mut)
        {
            spec.insert("storageClassName".into(), json!(meta_str(&class, "name")));
        }
        Ok(())
    }

    /// PersistentVolumeClaimResize admission: a bound claim's storage request changes only
    /// when its class allows expansion.
    async fn admit_claim_resize(&self, claim: &Value, old: &Value) -> Result<(), ApiError> {
        const REQUEST: &str = "/spec/resources/requests/storage";
        let bound = old
            .pointer("/spec/volumeName")
            .and_then(Value::as_str)
            .is_some_and(|v| !v.is_empty());
        if !bound || claim.pointer(REQUEST) == old.pointer(REQUEST) {
            return Ok(());
        }
        let class_name = old
            .pointer("/spec/storageClassName")
            .and_then(Value::as_str)
            .unwrap_or("");
        let key = object_key("storage.k8s.io", "storageclasses", "", class_name);
        let allows = !class_name.is_empty()
            && self
                .server
                .storage
                .get(&key)
                .await
                .map_err(|e| storage_error(&self.info, class_name, e))?
                .is_some_and(|c| c.object.get("allowVolumeExpansion") == Some(&json!(true)));
        if allows {
            return Ok(());
        }
        Err(ApiError::forbidden(format!(
            "persistentvolumeclaims \"{}\" is forbidden: only dynamically provisioned pvc can be resized and the storageclass that provisions the pvc must support resize",
            meta_str(claim, "name")
        )))
    }

    /// ServiceAccount admission of a new pod (`admission::mount_service_account`).
    async fn admit_service_account(&self, pod: &mut Value) -> Result<(), ApiError> {
        let account_name = pod
            .pointer("/spec/serviceAccountName")
            .or_else(|| pod.pointer("/spec/serviceAccount"))
            .and_then(Value::as_str)
            .filter(|n| !n.is_empty())
            .unwrap_or("default")
            .to_string();
        // From the authorizer's cache (as upstream's plugin reads an informer); an account the
        // cache has not seen yet is read from the store.
        let account = match self
            .server
            .authorizer
            .service_account(&self.namespace, &account_name)
        {
            Some(a) => Some(a),
            None => {
                let key = object_key("", "serviceaccounts", &self.namespace, &account_name);
                self.server
                    .storage
                    .get(&key)
                    .await
                    .map_err(|e| storage_error(&self.info, &account_name, e))?
                    .map(|a| (*a.object).clone())
            }
        };
        super::admission::mount_service_account(
            pod,
            account.as_ref(),
            &super::admission::random_suffix(),
        );
        Ok(())
    }

    fn key(&self, name: &str) -> String {
        key_of(&self.info, &self.namespace, name)
    }

    fn not_found(&self, name: &str) -> ApiError {
        ApiError::not_found(&self.info.resource, &self.info.group, name)
    }

    async fn load(&self, name: &str) -> Result<Stored, ApiError> {
        let stored = self
            .server
            .storage
            .get(&self.key(name))
            .await
            .map_err(|e| storage_error(&self.info, name, e))?
            .ok_or_else(|| self.not_found(name))?;
        Ok(self.viewed(stored))
    }

    /// A stored object as this resource serves it ([`ResourceInfo::from_storage`]).
    fn viewed(&self, stored: Stored) -> Stored {
        if self.info.stored_as.is_none() {
            return stored;
        }
        let mut object = Arc::unwrap_or_clone(stored.object);
        self.info.from_storage(&mut object);
        Stored {
            revision: stored.revision,
            object: Arc::new(object),
        }
    }

    /// Renders one object in the negotiated form (reads and the answers of writes alike).
    fn render(&self, code: StatusCode, object: &Value) -> Response {
        match self.output {
            Output::Table => {
                json_response(code, &tables::object_table(&self.info, object, Utc::now()))
            }
            Output::PartialMetadata => json_response(code, &tables::partial_metadata(object)),
            other => encode(code, object, other),
        }
    }

    async fn get(&self, name: &str) -> Result<Response, ApiError> {
        let stored = self.load(name).await?;
        Ok(self.render(StatusCode::OK, &stored.object))
    }

    async fn list(&self, query: &Query) -> Result<Response, ApiError> {
        let opts = list_options(&self.info, query)?;
        let limit = query
            .number("limit")?
            .filter(|l| *l > 0)
            .map(|l| l as usize);
        let mut current = self.server.storage.revision();
        let mut start_after: Option<String> = None;
        let mut list_rv: Option<u64> = None;
        if let Some(token) = query.get("continue").filter(|t| !t.is_empty()) {
            let token = decode_continue(token)?;
            if token.rv < self.server.storage.hub().oldest() {
                return Err(ApiError::expired(
                    "The provided continue parameter is too old to display a consistent list result. You can start a new list without the continue parameter, or use the continue token in this response to retrieve the remainder of the results. Continuing with the provided token results in an inconsistent list - objects that were created, modified, or deleted between the time the first chunk was returned and now may show up in the list.",
                ));
            }
            start_after = Some(token.start);
            list_rv = Some(token.rv);
        }
        if let Some(rv) = query
            .get("resourceVersion")
            .filter(|r| !r.is_empty() && *r != "0")
        {
            let wanted: u64 = rv
                .parse()
                .map_err(|_| ApiError::bad_request(format!("invalid resource version: {rv:?}")))?;
            if wanted > current {
                // Another server may have written it: ask the datastore.
                current = self
                    .server
                    .storage
                    .current_revision()
                    .await
                    .map_err(|e| storage_error(&self.info, "", e))?;
            }
            match query.get("resourceVersionMatch") {
                Some("Exact") if wanted != current => {
                    return Err(ApiError::expired(format!(
                        "too old resource version: {wanted} ({current})"
                    )));
                }
                _ if wanted > current => {
                    return Err(ApiError::new(
                        504,
                        "Timeout",
                        format!("Too large resource version: {wanted}, current: {current}"),
                    ));
                }
                _ => {}
            }
        }
        let (group, resource) = self.info.storage_resource();
        let prefix = list_prefix(group, resource, &self.namespace);
        // Objects stored as another resource are converted, so parsed.
        let converting = self.info.stored_as.is_some();
        let selecting = !opts.labels.is_empty() || !opts.fields.is_empty() || converting;
        // Items stay JSON text unless a selector or the output form needs the object.
        let mut items: Vec<(Arc<str>, Option<Value>)> = Vec::new();
        let mut revision = current;
        let mut continue_after = None;
        let pinned = opts
            .fields
            .pinned("metadata.name")
            .filter(|_| limit.is_none());
        if let Some(name) = pinned.filter(|_| !self.namespace.is_empty() || !self.info.namespaced) {
            // A field selector that pins the name: one read instead of a scan.
            if let Some(s) = self
                .server
                .storage
                .get(&self.key(name))
                .await
                .map_err(|e| storage_error(&self.info, name, e))?
                .map(|s| self.viewed(s))
                && opts.matches(&self.info, &s.object)
            {
                items.push((Arc::from(s.object.to_string()), Some((*s.object).clone())));
            }
        } else {
            let mut cursor = start_after.clone();
            loop {
                let want = limit.map(|l| ((l - items.len()).max(1) * 2).max(64));
                // Every page of one list reads one revision (where the datastore keeps history).
                let listing = self
                    .server
                    .storage
                    .list_at(&prefix, cursor.as_deref(), want, list_rv)
                    .await
                    .map_err(|e| match e {
                        StorageError::Expired { .. } => ApiError::expired(
                            "The provided continue parameter is too old to display a consistent list result. You can start a new list without the continue parameter.",
                        ),
                        e => storage_error(&self.info, "", e),
                    })?;
                revision = listing.revision;
                list_rv.get_or_insert(revision);
                let more = listing.continue_after.is_some();
                let mut last_key = None;
                for item in listing.items {
                    if selecting {
                        let mut value =
                            item.value().map_err(|e| storage_error(&self.info, "", e))?;
                        self.info.from_storage(&mut value);
                        if opts.matches(&self.info, &value) {
                            items.push((item.raw.clone(), Some(value)));
                        }
                    } else {
                        items.push((item.raw.clone(), None));
                    }
                    last_key = Some(item.key);
                    if let Some(l) = limit
                        && items.len() == l
                    {
                        break;
                    }
                }
                match limit {
                    Some(l) if items.len() == l => {
                        // Anything after the last returned key?
                        if let Some(k) = &last_key {
                            let probe = self
                                .server
                                .storage
                                .list_at(&prefix, Some(k), Some(1), list_rv)
                                .await
                                .map_err(|e| storage_error(&self.info, "", e))?;
                            if !probe.items.is_empty() {
                                continue_after = Some(k.clone());
                            }
                        }
                        break;
                    }
                    _ if more => cursor = last_key,
                    _ => break,
                }
            }
        }
        let rv = list_rv.unwrap_or(revision);
        let token = continue_after.map(|k| encode_continue(rv, &k));
        if self.output == Output::Json && !converting {
            // Splice the stored JSON text: no object trees for large lists.
            let mut body =
                Vec::with_capacity(items.iter().map(|(raw, _)| raw.len() + 1).sum::<usize>() + 256);
            let mut metadata = json!({"resourceVersion": rv.to_string()});
            if let Some(t) = &token {
                metadata["continue"] = json!(t);
            }
            body.extend_from_slice(
                format!(
                    "{{\"kind\":{},\"apiVersion\":{},\"metadata\":{},\"items\":[",
                    json!(self.info.list_kind()),
                    json!(self.info.api_version()),
                    metadata
                )
                .as_bytes(),
            );
            for (i, (raw, _)) in items.iter().enumerate() {
                if i > 0 {
                    body.push(b',');
                }
                body.extend_from_slice(raw.as_bytes());
            }
            body.extend_from_slice(b"]}");
            return Ok(body_response(
                StatusCode::OK,
                "application/json",
                Body::from(body),
            ));
        }
        let mut objects = Vec::with_capacity(items.len());
        for (raw, parsed) in items {
            objects.push(match parsed {
                Some(v) => v,
                None => serde_json::from_str(&raw)
                    .map_err(|e| ApiError::internal(format!("corrupt stored object: {e}")))?,
            });
        }
        let refs: Vec<&Value> = objects.iter().collect();
        match self.output {
            Output::Table => {
                let include = match query.get("includeObject") {
                    Some("None") => IncludeObject::None,
                    Some("Object") => IncludeObject::Object,
                    _ => IncludeObject::Metadata,
                };
                Ok(json_response(
                    StatusCode::OK,
                    &tables::table(
                        &self.info,
                        &refs,
                        include,
                        &rv.to_string(),
                        token.as_deref(),
                        Utc::now(),
                    ),
                ))
            }
            output => {
                let (kind, api_version, items): (String, String, Vec<Value>) =
                    if output == Output::PartialMetadata {
                        (
                            "PartialObjectMetadataList".into(),
                            "meta.k8s.io/v1".into(),
                            refs.iter().map(|o| tables::partial_metadata(o)).collect(),
                        )
                    } else {
                        (self.info.list_kind(), self.info.api_version(), objects)
                    };
                let mut metadata = json!({"resourceVersion": rv.to_string()});
                if let Some(t) = token {
                    metadata["continue"] = json!(t);
                }
                let list = json!({
                    "kind": kind,
                    "apiVersion": api_version,
                    "metadata": metadata,
                    "items": items,
                });
                Ok(encode(StatusCode::OK, &list, output))
            }
        }
    }

    /// Admission: the namespace must exist and must not be terminating.
    async fn check_namespace(&self) -> Result<(), ApiError> {
        if !self.info.namespaced {
            return Ok(());
        }
        let key = object_key("", "namespaces", "", &self.namespace);
        let failed = |e| storage_error(&self.info, "", e);
        let recent = self.server.storage.get_recent(&key).await.map_err(failed)?;
        // Not there (yet, as far as this server has heard): ask for certain, as upstream's
        // NamespaceLifecycle looks a namespace its cache lacks up live.
        let namespace = match recent {
            Some(ns) => Some(ns),
            None => self.server.storage.get(&key).await.map_err(failed)?,
        };
        match namespace {
            None => Err(ApiError::not_found("namespaces", "", &self.namespace)),
            Some(ns) if ns.object.pointer("/metadata/deletionTimestamp").is_some() => {
                Err(ApiError::forbidden(format!(
                    "{} {:?} is forbidden: unable to create new content in namespace {} because it is being terminated",
                    crate::error::qualified(&self.info.resource, &self.info.group),
                    "",
                    self.namespace
                ))
                .with_details(Details {
                    kind: self.info.resource.clone(),
                    group: self.info.group.clone(),
                    ..Details::default()
                }))
            }
            Some(_) => Ok(()),
        }
    }

    fn check_namespace_field(&self, object: &mut Value) -> Result<(), ApiError> {
        let body_ns = meta_str(object, "namespace").to_string();
        if self.info.namespaced {
            if !body_ns.is_empty() && body_ns != self.namespace {
                return Err(ApiError::bad_request(
                    "the namespace of the provided object does not match the namespace sent on the request",
                ));
            }
            meta_mut(object).insert("namespace".into(), json!(self.namespace));
        } else if !body_ns.is_empty() {
            meta_mut(object).remove("namespace");
        }
        Ok(())
    }

    fn invalid(&self, object: &Value, causes: Vec<Cause>) -> ApiError {
        ApiError::invalid(
            &self.info.kind,
            &self.info.group,
            meta_str(object, "name"),
            causes,
        )
    }

    fn writer<'a>(
        &'a self,
        opts: &'a WriteOptions,
        time: &'a str,
        subresource: &'a str,
        api_version: &'a str,
    ) -> fields::Writer<'a> {
        fields::Writer {
            manager: &opts.manager,
            api_version,
            time,
            subresource,
        }
    }

    /// Create: the decoded body becomes a stored object.
    async fn create(&self, value: Value, opts: &mut WriteOptions) -> Result<Value, ApiError> {
        let object = decode_object(&self.info, value, opts)?;
        self.create_decoded(object, opts, true).await
    }

    async fn create_decoded(
        &self,
        mut object: Value,
        opts: &mut WriteOptions,
        track: bool,
    ) -> Result<Value, ApiError> {
        self.check_namespace_field(&mut object)?;
        let name = meta_str(&object, "name").to_string();
        let generate = meta_str(&object, "generateName").to_string();
        if name.is_empty() && !generate.is_empty() {
            let generated = format!("{generate}{}", generate_suffix());
            meta_mut(&mut object).insert("name".into(), json!(generated));
        }
        if !meta_str(&object, "resourceVersion").is_empty() {
            return Err(ApiError::bad_request(
                "resourceVersion should not be set on objects to be created",
            ));
        }
        self.check_namespace().await?;
        let uid = uuid::Uuid::new_v4().to_string();
        let time = now();
        {
            let meta = meta_mut(&mut object);
            meta.insert("uid".into(), json!(uid));
            meta.insert("creationTimestamp".into(), json!(time));
            meta.remove("deletionTimestamp");
            meta.remove("deletionGracePeriodSeconds");
            meta.remove("selfLink");
            if kinds::tracks_generation(&self.info) {
                meta.insert("generation".into(), json!(1));
            } else {
                meta.remove("generation");
            }
        }
        if self.info.group.is_empty() && self.info.resource == "pods" {
            self.admit_priority(&mut object).await?;
        }
        kinds::apply_defaults(&self.info, &mut object);
        kinds::prepare_for_create(&self.info, &mut object, &uid);
        if self.info.group == crate::certificates::GROUP {
            crate::certificates::prepare_create(&mut object, &self.user);
        }
        if self.info.group.is_empty() && self.info.resource == "pods" {
            self.admit_service_account(&mut object).await?;
        }
        if self.info.group == "networking.k8s.io" && self.info.resource == "ingresses" {
            self.admit_default_ingress_class(&mut object).await?;
        }
        if self.info.group.is_empty() && self.info.resource == "persistentvolumeclaims" {
            self.admit_default_storage_class(&mut object).await?;
            super::admission::add_finalizer(&mut object, "kubernetes.io/pvc-protection");
        }
        if self.info.group.is_empty() && self.info.resource == "persistentvolumes" {
            super::admission::add_finalizer(&mut object, "kubernetes.io/pv-protection");
        }
        // Held until the object is stored: the addresses stay reserved meanwhile.
        let _reservation = self
            .assign_service_addresses(&mut object, None, opts.dry_run)
            .await?;
        let causes = kinds::validate(&self.info, &object, None);
        if !causes.is_empty() {
            return Err(self.invalid(&object, causes));
        }
        if track {
            let api_version = self.info.api_version();
            let writer = self.writer(opts, &time, "", &api_version);
            fields::track_update(None, &mut object, &writer);
        }
        let name = meta_str(&object, "name").to_string();
        let stored = self
            .commit(&name, Write::Create(object), opts.dry_run)
            .await?;
        Ok((*stored.object).clone())
    }

    /// Cluster IP and node ports of a Service being written (see `services.rs`).
    async fn assign_service_addresses(
        &self,
        object: &mut Value,
        old: Option<&Value>,
        dry_run: bool,
    ) -> Result<Option<crate::services::Reservation>, ApiError> {
        if (self.info.group.as_str(), self.info.resource.as_str()) != ("", "services") {
            return Ok(None);
        }
        match self
            .server
            .services
            .assign(&*self.server.storage, object, old, dry_run)
            .await
        {
            Ok(r) => Ok(Some(r)),
            Err(crate::services::AssignError::Invalid(causes)) => Err(self.invalid(object, causes)),
            Err(crate::services::AssignError::Full(message)) => Err(ApiError::internal(message)),
            Err(crate::services::AssignError::Storage(e)) => Err(ApiError::internal(format!(
                "allocate service addresses: {e}"
            ))),
        }
    }

    /// The one way a write of this resource reaches storage: admission sees it first (the
    /// writer's identity, the object before and after), then the store commits it (optimistic
    /// on the old revision), then derived server state follows ([`Self::after_write`]).
    /// Requests, subresources (binding, eviction's budget update) and the server's own writes
    /// (a deleted CRD's objects) all come through here. A dry run is admitted and not written.
    async fn commit(
        &self,
        name: &str,
        write: Write<'_>,
        dry_run: bool,
    ) -> Result<Stored, ApiError> {
        let user = &self.user;
        let (server, info) = (&self.server, &self.info);
        match &write {
            Write::Create(new) => super::admission::admit(server, user, info, new, None)?,
            Write::Update { old, new } => {
                super::admission::admit(server, user, info, new, Some(&old.object))?
            }
            // A deletion is decided by authorization; the update that led to one (its last
            // finalizer removed) is admitted as the update it was.
            Write::Delete { old, last } => {
                if let Some(last) = last {
                    super::admission::admit(server, user, info, last, Some(&old.object))?;
                }
            }
        }
        let key = self.key(name);
        let storage = &self.server.storage;
        let deleted = matches!(write, Write::Delete { .. });
        // Stored as the resource that owns the objects (see `ResourceInfo::stored_as`).
        let write = match write {
            Write::Create(mut new) if !dry_run => {
                self.info.to_storage(&mut new);
                Write::Create(new)
            }
            Write::Update { old, mut new } if !dry_run => {
                self.info.to_storage(&mut new);
                Write::Update { old, new }
            }
            other => other,
        };
        let stored = match write {
            Write::Create(new) if dry_run => Ok(Stored {
                revision: 0,
                object: Arc::new(new),
            }),
            Write::Update { old, mut new } if dry_run => {
                crate::storage::stamp_revision(&mut new, old.revision);
                Ok(Stored {
                    revision: old.revision,
                    object: Arc::new(new),
                })
            }
            Write::Delete { old, .. } if dry_run => Ok(old.clone()),
            Write::Create(new) => storage.create(&key, new).await,
            Write::Update { old, new } => storage.update(&key, new, Some(old.revision)).await,
            Write::Delete { old, .. } => storage.delete(&key, Some(old.revision)).await,
        }
        .map_err(|e| storage_error(&self.info, name, e))?;
        let stored = self.viewed(stored);
        if !dry_run {
            self.after_write(name, (!deleted).then_some(&*stored.object))
                .await;
        }
        Ok(stored)
    }

    /// Keeps derived server state in step with writes: CRDs change what the server serves.
    async fn after_write(&self, name: &str, object: Option<&Value>) {
        if (self.info.group.as_str(), self.info.resource.as_str())
            != ("apiextensions.k8s.io", "customresourcedefinitions")
        {
            return;
        }
        let before: Vec<Arc<ResourceInfo>> = self
            .server
            .registry
            .all()
            .into_iter()
            .filter(|r| r.custom.is_some() && format!("{}.{}", r.resource, r.group) == name)
            .collect();
        crate::crd::sync(&self.server.registry, name, object);
        // The group versions served changed: so do their APIServices (soon after, as upstream's
        // crdregistration controller; its own writes come back through here).
        crate::apiservices::sync_soon(self.server.clone());
        if object.is_none() {
            // The CRD is gone: so are its custom resources (upstream's customresourcecleanup).
            if let Some(r) = before.first() {
                let prefix = list_prefix(&r.group, &r.resource, "");
                if let Ok(listing) = self.server.storage.list(&prefix, None, None).await {
                    for item in listing.items {
                        let Ok(object) = item.value() else { continue };
                        let old = Stored {
                            revision: item.revision,
                            object: Arc::new(object),
                        };
                        // The server's own cleanup (upstream's customresourcecleanup).
                        let objects = Ctx {
                            server: self.server.clone(),
                            info: r.clone(),
                            namespace: meta_str(&old.object, "namespace").to_string(),
                            output: self.output,
                            user: Identity::loopback(),
                        };
                        let name = meta_str(&old.object, "name").to_string();
                        let write = Write::Delete {
                            old: &old,
                            last: None,
                        };
                        if let Err(e) = Box::pin(objects.commit(&name, write, false)).await {
                            tracing::warn!(key = item.key, error = %e, "delete a custom resource of a deleted CRD");
                        }
                    }
                }
            }
        }
    }

    /// The shared update path. `new` is a full decoded object; `old` is what it replaces.
    /// Returns the stored object, or the deleted one when the update removed the last finalizer.
    async fn update_decoded(
        &self,
        old: &Stored,
        mut new: Value,
        subresource: Option<&str>,
        opts: &mut WriteOptions,
        track: bool,
    ) -> Result<Value, ApiError> {
        let mut _reservation = None;
        let name = meta_str(&old.object, "name").to_string();
        self.check_namespace_field(&mut new)?;
        let body_name = meta_str(&new, "name").to_string();
        if !body_name.is_empty() && body_name != name {
            return Err(ApiError::bad_request(format!(
                "the name of the object ({body_name}) does not match the name on the URL ({name})"
            )));
        }
        let old_object: &Value = &old.object;
        // A uid in the body is a precondition (the kubelet's status patches carry one).
        let new_uid = meta_str(&new, "uid");
        if !new_uid.is_empty() && new_uid != meta_str(old_object, "uid") {
            return Err(ApiError::conflict(
                &self.info.resource,
                &self.info.group,
                &name,
                &format!(
                    "Precondition failed: UID in precondition: {new_uid}, UID in object meta: {}",
                    meta_str(old_object, "uid")
                ),
            ));
        }
        // System metadata always comes from the stored object.
        {
            let old_meta = old_object.get("metadata").cloned().unwrap_or(json!({}));
            let meta = meta_mut(&mut new);
            meta.insert("name".into(), json!(name));
            for key in [
                "uid",
                "creationTimestamp",
                "deletionTimestamp",
                "deletionGracePeriodSeconds",
                "generation",
            ] {
                match old_meta.get(key) {
                    Some(v) => meta.insert(key.into(), v.clone()),
                    None => meta.remove(key),
                };
            }
            meta.remove("resourceVersion");
            meta.remove("selfLink");
            if meta.get("managedFields").is_none()
                && track
                && let Some(m) = old_meta.get("managedFields")
            {
                meta.insert("managedFields".into(), m.clone());
            }
        }
        match subresource {
            Some("status") => {
                // Only status changes through /status.
                let mut merged = old_object.clone();
                merged["status"] = new.get("status").cloned().unwrap_or(Value::Null);
                if merged["status"].is_null() {
                    merged.as_object_mut().expect("object").remove("status");
                }
                if let Some(m) = new.pointer("/metadata/managedFields") {
                    meta_mut(&mut merged).insert("managedFields".into(), m.clone());
                }
                if self.info.group == crate::certificates::GROUP {
                    merged = crate::certificates::status_update(old_object, merged);
                    if merged.pointer("/status/certificate")
                        != old_object.pointer("/status/certificate")
                    {
                        self.signer_allows("sign", old_object, &name)?;
                    }
                }
                new = merged;
            }
            Some("approval") => {
                new = crate::certificates::approval(old_object, &new).map_err(|m| {
                    self.invalid(
                        old_object,
                        vec![Cause::new("FieldValueForbidden", "status.conditions", m)],
                    )
                })?;
                self.signer_allows("approve", old_object, &name)?;
            }
            Some("ephemeralcontainers") => {
                // Only the pod's ephemeral containers change through this subresource.
                let mut merged = old_object.clone();
                merged["spec"]["ephemeralContainers"] = new
                    .pointer("/spec/ephemeralContainers")
                    .cloned()
                    .unwrap_or(json!([]));
                if let Some(m) = new.pointer("/metadata/managedFields") {
                    meta_mut(&mut merged).insert("managedFields".into(), m.clone());
                }
                kinds::apply_defaults(&self.info, &mut merged);
                new = merged;
            }
            Some("finalize") => {
                let mut merged = old_object.clone();
                merged["spec"]["finalizers"] = new
                    .pointer("/spec/finalizers")
                    .cloned()
                    .unwrap_or(json!([]));
                new = merged;
            }
            _ => {
                if self.info.has_status() {
                    match old_object.get("status") {
                        Some(s) => new["status"] = s.clone(),
                        None => {
                            if let Some(m) = new.as_object_mut() {
                                m.remove("status");
                            }
                        }
                    }
                }
                kinds::apply_defaults(&self.info, &mut new);
                kinds::prepare_for_update(&self.info, &mut new, old_object);
                _reservation = self
                    .assign_service_addresses(&mut new, Some(old_object), opts.dry_run)
                    .await?;
                if kinds::tracks_generation(&self.info) && spec_part(old_object) != spec_part(&new)
                {
                    let generation = old_object
                        .pointer("/metadata/generation")
                        .and_then(Value::as_i64)
                        .unwrap_or(0);
                    meta_mut(&mut new).insert("generation".into(), json!(generation + 1));
                }
            }
        }
        let causes = if subresource == Some("ephemeralcontainers") {
            crate::validation::validate_ephemeral_update(
                new.get("spec").unwrap_or(&Value::Null),
                old_object.get("spec").unwrap_or(&Value::Null),
            )
        } else {
            kinds::validate(&self.info, &new, Some(old_object))
        };
        if !causes.is_empty() {
            return Err(self.invalid(&new, causes));
        }
        if self.info.group.is_empty() && self.info.resource == "persistentvolumeclaims" {
            self.admit_claim_resize(&new, old_object).await?;
        }
        // The writer set managedFields itself (kubectl moves client-side apply's ownership to
        // server-side apply so): that alone is a change worth writing.
        let sets_managed_fields = new
            .pointer("/metadata/managedFields")
            .is_some_and(|m| Some(m) != old_object.pointer("/metadata/managedFields"));
        if track {
            let time = now();
            let api_version = self.info.api_version();
            let writer = self.writer(
                opts,
                &time,
                subresource
                    .filter(|s| matches!(*s, "status" | "scale" | "ephemeralcontainers"))
                    .unwrap_or(""),
                &api_version,
            );
            fields::track_update(Some(old_object), &mut new, &writer);
        }
        if comparable(&new) == comparable(old_object) && !sets_managed_fields {
            // A no-op: upstream does not write (and the resourceVersion stays).
            return Ok((*old.object).clone());
        }
        // Removing the last finalizer of an object being deleted completes the deletion.
        let deleting = new.pointer("/metadata/deletionTimestamp").is_some();
        let finalizers_left = new
            .pointer("/metadata/finalizers")
            .and_then(Value::as_array)
            .is_some_and(|f| !f.is_empty());
        let grace_left = new
            .pointer("/metadata/deletionGracePeriodSeconds")
            .and_then(Value::as_i64)
            .unwrap_or(0)
            > 0;
        let namespace_finalizers = self.info.resource == "namespaces"
            && new
                .pointer("/spec/finalizers")
                .and_then(Value::as_array)
                .is_some_and(|f| !f.is_empty());
        if !opts.dry_run && deleting && !finalizers_left && !grace_left && !namespace_finalizers {
            let last = Some(&new);
            let gone = self
                .commit(&name, Write::Delete { old, last }, false)
                .await?;
            return Ok((*gone.object).clone());
        }
        // (A dry run keeps the revision the object has: nothing is written.)
        let stored = self
            .commit(&name, Write::Update { old, new }, opts.dry_run)
            .await?;
        Ok((*stored.object).clone())
    }

    /// PUT.
    async fn replace(
        &self,
        name: &str,
        subresource: Option<&str>,
        value: Value,
        opts: &mut WriteOptions,
    ) -> Result<(StatusCode, Value), ApiError> {
        if subresource == Some("scale") {
            return self.replace_scale(name, value, opts).await;
        }
        let object = decode_object(&self.info, value, opts)?;
        let precondition: Option<u64> =
            match meta_str(&object, "resourceVersion") {
                "" => None,
                rv => Some(rv.parse().map_err(|_| {
                    ApiError::bad_request(format!("invalid resourceVersion {rv:?}"))
                })?),
            };
        for attempt in 0..MAX_RETRIES {
            backoff(attempt).await;
            let old = self.load(name).await?;
            if let Some(expected) = precondition
                && expected != old.revision
            {
                return Err(ApiError::modified(
                    &self.info.resource,
                    &self.info.group,
                    name,
                ));
            }
            match self
                .update_decoded(&old, object.clone(), subresource, opts, true)
                .await
            {
                Err(e) if lost_race(&e) && precondition.is_none() => continue,
                Err(e) => return Err(e),
                Ok(v) => return Ok((StatusCode::OK, v)),
            }
        }
        Err(ApiError::modified(
            &self.info.resource,
            &self.info.group,
            name,
        ))
    }

    /// PATCH: JSON, merge, strategic or apply.
    async fn patch(
        &self,
        name: &str,
        subresource: Option<&str>,
        kind: PatchType,
        body: &bytes::Bytes,
        force: bool,
        opts: &mut WriteOptions,
    ) -> Result<(StatusCode, Value), ApiError> {
        if subresource == Some("scale") {
            return self.patch_scale(name, kind, body, opts).await;
        }
        if kind == PatchType::Apply {
            return self.apply(name, subresource, body, force, opts).await;
        }
        for attempt in 0..MAX_RETRIES {
            backoff(attempt).await;
            let old = self.load(name).await?;
            let patched = patch::apply_patch(kind, &old.object, body, self.info.typed.is_some())?;
            // A resourceVersion the patch itself sets is a precondition (the patched object always
            // carries the live one, so ask the patch, not the result).
            let pinned = patch::pinned_resource_version(kind, body).unwrap_or_default();
            let pinned_changed = !pinned.is_empty() && pinned != old.revision.to_string();
            if pinned_changed {
                return Err(ApiError::modified(
                    &self.info.resource,
                    &self.info.group,
                    name,
                ));
            }
            let object = decode_object(&self.info, patched, opts)?;
            match self
                .update_decoded(&old, object, subresource, opts, true)
                .await
            {
                Err(e) if lost_race(&e) && pinned.is_empty() => continue,
                Err(e) => return Err(e),
                Ok(v) => return Ok((StatusCode::OK, v)),
            }
        }
        Err(ApiError::modified(
            &self.info.resource,
            &self.info.group,
            name,
        ))
    }

    /// Server-side apply.
    async fn apply(
        &self,
        name: &str,
        subresource: Option<&str>,
        body: &bytes::Bytes,
        force: bool,
        opts: &mut WriteOptions,
    ) -> Result<(StatusCode, Value), ApiError> {
        if opts.manager.is_empty() || opts.manager == "unknown" {
            return Err(ApiError::invalid(
                "PatchOptions",
                "meta.k8s.io",
                "",
                vec![Cause::new(
                    "FieldValueRequired",
                    "fieldManager",
                    "Required value: is required for apply patch".into(),
                )],
            ));
        }
        let applied: Value = decode::off_workers(body, decode::yaml)
            .await
            .map_err(|e| ApiError::bad_request(format!("error decoding YAML: {e}")))?;
        if !applied.is_object() {
            return Err(ApiError::bad_request("apply patch must be an object"));
        }
        let mut applied = decode_object(&self.info, applied, opts)?;
        if let Some(meta) = applied.get_mut("metadata").and_then(Value::as_object_mut) {
            if meta.get("managedFields").is_some_and(|m| !m.is_null()) {
                return Err(ApiError::bad_request("metadata.managedFields must be nil"));
            }
            let body_name = meta.get("name").and_then(Value::as_str).unwrap_or("");
            if body_name.is_empty() {
                meta.insert("name".into(), json!(name));
            } else if body_name != name {
                return Err(ApiError::bad_request(format!(
                    "the name of the object ({body_name}) does not match the name on the URL ({name})"
                )));
            }
        }
        let time = now();
        let api_version = self.info.api_version();
        let sub = subresource
            .filter(|s| matches!(*s, "status" | "ephemeralcontainers"))
            .unwrap_or("");
        for attempt in 0..MAX_RETRIES {
            backoff(attempt).await;
            let current = self
                .server
                .storage
                .get(&self.key(name))
                .await
                .map_err(|e| storage_error(&self.info, name, e))?
                .map(|s| self.viewed(s));
            let writer = self.writer(opts, &time, sub, &api_version);
            let merged = fields::apply(
                current.as_ref().map(|c| c.object.as_ref()),
                &applied,
                &writer,
                force,
            )
            .map_err(|conflicts| {
                let causes = conflicts
                    .iter()
                    .map(|c| {
                        Cause::new(
                            "FieldManagerConflict",
                            c.path.clone(),
                            format!("conflict with {:?} using {}", c.manager, c.api_version),
                        )
                    })
                    .collect();
                ApiError::new(409, "Conflict", fields::conflict_message(&conflicts)).with_details(
                    Details {
                        name: name.to_string(),
                        group: self.info.group.clone(),
                        kind: self.info.resource.clone(),
                        causes,
                        ..Details::default()
                    },
                )
            })?;
            let result = match &current {
                None => {
                    if subresource.is_some() {
                        return Err(self.not_found(name));
                    }
                    self.create_decoded(merged, opts, false)
                        .await
                        .map(|v| (StatusCode::CREATED, v))
                }
                Some(old) => self
                    .update_decoded(old, merged, subresource, opts, false)
                    .await
                    .map(|v| (StatusCode::OK, v)),
            };
            match result {
                // Another writer created or changed the object meanwhile: apply again on top.
                Err(e) if lost_race(&e) || e.reason == "AlreadyExists" => continue,
                other => return other,
            }
        }
        Err(ApiError::modified(
            &self.info.resource,
            &self.info.group,
            name,
        ))
    }

    fn scale_of(&self, object: &Value) -> Value {
        let meta = object.get("metadata").cloned().unwrap_or(json!({}));
        json!({
            "kind": "Scale",
            "apiVersion": "autoscaling/v1",
            "metadata": {
                "name": meta.get("name"),
                "namespace": meta.get("namespace"),
                "uid": meta.get("uid"),
                "resourceVersion": meta.get("resourceVersion"),
                "creationTimestamp": meta.get("creationTimestamp"),
            },
            "spec": {"replicas": object.pointer(&self.scale_paths().0).and_then(Value::as_i64).unwrap_or(0)},
            "status": {
                "replicas": object.pointer(&self.scale_paths().1).and_then(Value::as_i64).unwrap_or(0),
                "selector": match self.scale_paths().2 {
                    Some(p) => object.pointer(&p).and_then(Value::as_str).unwrap_or("").to_string(),
                    None => crate::tables::format_selector(object.pointer("/spec/selector")).replace("<none>", ""),
                },
            },
        })
    }

    /// JSON pointers of spec replicas, status replicas and (custom resources) the selector string.
    fn scale_paths(&self) -> (String, String, Option<String>) {
        let pointer = |dotted: &str| -> String {
            dotted
                .trim_start_matches('.')
                .split('.')
                .filter(|p| !p.is_empty())
                .map(|p| format!("/{p}"))
                .collect()
        };
        match self.info.custom.as_ref().and_then(|c| c.scale.as_ref()) {
            Some(paths) => (
                pointer(&paths.spec_replicas),
                pointer(&paths.status_replicas),
                Some(pointer(&paths.label_selector)).filter(|p| !p.is_empty()),
            ),
            None => ("/spec/replicas".into(), "/status/replicas".into(), None),
        }
    }

    async fn get_scale(&self, name: &str) -> Result<Response, ApiError> {
        let stored = self.load(name).await?;
        Ok(json_response(
            StatusCode::OK,
            &self.scale_of(&stored.object),
        ))
    }

    async fn set_replicas(
        &self,
        old: &Stored,
        scale: &Value,
        opts: &mut WriteOptions,
    ) -> Result<Value, ApiError> {
        let scale = builtin::normalize_as::<k8s_openapi::api::autoscaling::v1::Scale>(scale)
            .map_err(|e| {
                ApiError::bad_request(format!(
                    "Scale in version \"v1\" cannot be handled as a Scale: {e}"
                ))
            })?;
        let replicas = scale
            .pointer("/spec/replicas")
            .and_then(Value::as_i64)
            .unwrap_or(0);
        if replicas < 0 {
            return Err(ApiError::invalid(
                "Scale",
                "autoscaling",
                meta_str(&old.object, "name"),
                vec![Cause::invalid(
                    "spec.replicas",
                    &json!(replicas),
                    "must be greater than or equal to 0",
                )],
            ));
        }
        let rv = meta_str(&scale, "resourceVersion");
        if !rv.is_empty() && rv != old.revision.to_string() {
            return Err(ApiError::modified(
                &self.info.resource,
                &self.info.group,
                meta_str(&old.object, "name"),
            ));
        }
        let mut new = (*old.object).clone();
        let mut node = &mut new;
        let spec_path = self.scale_paths().0;
        for part in spec_path.trim_start_matches('/').split('/') {
            if !node.is_object() {
                *node = json!({});
            }
            node = node
                .as_object_mut()
                .expect("made an object")
                .entry(part.to_string())
                .or_insert(Value::Null);
        }
        *node = json!(replicas);
        // Recorded in managedFields as a write through /scale, as upstream records it.
        let updated = self
            .update_decoded(old, new, Some("scale"), opts, true)
            .await?;
        Ok(self.scale_of(&updated))
    }

    async fn replace_scale(
        &self,
        name: &str,
        value: Value,
        opts: &mut WriteOptions,
    ) -> Result<(StatusCode, Value), ApiError> {
        // A Scale without a resourceVersion is unconditional, as upstream: a write that lost
        // the race (a controller wrote status meanwhile) is tried again on the newer object.
        let unconditional = meta_str(&value, "resourceVersion").is_empty();
        for attempt in 0..MAX_RETRIES {
            backoff(attempt).await;
            let old = self.load(name).await?;
            match self.set_replicas(&old, &value, opts).await {
                Err(e) if lost_race(&e) && unconditional => continue,
                Err(e) => return Err(e),
                Ok(updated) => return Ok((StatusCode::OK, updated)),
            }
        }
        Err(ApiError::modified(
            &self.info.resource,
            &self.info.group,
            name,
        ))
    }

    async fn patch_scale(
        &self,
        name: &str,
        kind: PatchType,
        body: &[u8],
        opts: &mut WriteOptions,
    ) -> Result<(StatusCode, Value), ApiError> {
        for attempt in 0..MAX_RETRIES {
            backoff(attempt).await;
            let old = self.load(name).await?;
            let scale = self.scale_of(&old.object);
            let patched = match kind {
                PatchType::Apply => {
                    let applied: Value = decode::yaml(body)
                        .map_err(|e| ApiError::bad_request(format!("error decoding YAML: {e}")))?;
                    let mut s = scale.clone();
                    json_patch::merge(&mut s, &applied);
                    s
                }
                other => patch::apply_patch(other, &scale, body, true)?,
            };
            match self.set_replicas(&old, &patched, opts).await {
                Err(e)
                    if lost_race(&e)
                        && meta_str(&patched, "resourceVersion") == old.revision.to_string() =>
                {
                    continue;
                }
                Err(e) => return Err(e),
                Ok(v) => return Ok((StatusCode::OK, v)),
            }
        }
        Err(ApiError::modified(
            &self.info.resource,
            &self.info.group,
            name,
        ))
    }

    /// DELETE of one object, with graceful deletion, finalizers and propagation.
    async fn delete(
        &self,
        name: &str,
        options: &DeleteOptions,
    ) -> Result<(StatusCode, Value), ApiError> {
        for attempt in 0..MAX_RETRIES {
            backoff(attempt).await;
            let old = self.load(name).await?;
            match self.delete_once(&old, name, options).await {
                Err(e) if lost_race(&e) && options.precondition_rv.is_none() => continue,
                other => return other,
            }
        }
        Err(ApiError::modified(
            &self.info.resource,
            &self.info.group,
            name,
        ))
    }

    async fn delete_once(
        &self,
        old: &Stored,
        name: &str,
        options: &DeleteOptions,
    ) -> Result<(StatusCode, Value), ApiError> {
        let object: &Value = &old.object;
        if let Some(uid) = &options.precondition_uid
            && uid != meta_str(object, "uid")
        {
            return Err(ApiError::conflict(
                &self.info.resource,
                &self.info.group,
                name,
                &format!(
                    "Precondition failed: UID in precondition: {uid}, UID in object meta: {}",
                    meta_str(object, "uid")
                ),
            ));
        }
        if let Some(rv) = &options.precondition_rv
            && *rv != old.revision.to_string()
        {
            return Err(ApiError::conflict(
                &self.info.resource,
                &self.info.group,
                name,
                &format!(
                    "Precondition failed: ResourceVersion in precondition: {rv}, ResourceVersion in object meta: {}",
                    old.revision
                ),
            ));
        }
        let mut new = object.clone();
        let mut finalizers: Vec<Value> = object
            .pointer("/metadata/finalizers")
            .and_then(Value::as_array)
            .cloned()
            .unwrap_or_default();
        let has_owner_dependents_policy = matches!(
            options.propagation.as_deref(),
            Some("Orphan") | Some("Foreground")
        );
        if has_owner_dependents_policy {
            let (add, drop) = match options.propagation.as_deref() {
                Some("Orphan") => ("orphan", "foregroundDeletion"),
                _ => ("foregroundDeletion", "orphan"),
            };
            finalizers.retain(|f| f != drop);
            if !finalizers.iter().any(|f| f == add) {
                finalizers.push(json!(add));
            }
        }
        let already = object.pointer("/metadata/deletionTimestamp").is_some();
        // Graceful deletion of pods that a node runs.
        let graceful_pod = self.info.resource == "pods"
            && self.info.group.is_empty()
            && !meta_str(object, "name").is_empty()
            && object
                .pointer("/spec/nodeName")
                .and_then(Value::as_str)
                .is_some_and(|n| !n.is_empty())
            && !matches!(
                object.pointer("/status/phase").and_then(Value::as_str),
                Some("Succeeded") | Some("Failed")
            );
        let grace = if graceful_pod {
            options
                .grace_period
                .or_else(|| {
                    object
                        .pointer("/spec/terminationGracePeriodSeconds")
                        .and_then(Value::as_i64)
                })
                .unwrap_or(30)
        } else {
            0
        };
        let namespace = self.info.resource == "namespaces" && self.info.group.is_empty();
        let pending = !finalizers.is_empty() || grace > 0 || namespace;
        if !pending {
            let gone = self
                .commit(name, Write::Delete { old, last: None }, options.dry_run)
                .await?;
            if options.dry_run {
                return Ok((StatusCode::OK, new));
            }
            return Ok((StatusCode::OK, (*gone.object).clone()));
        }
        if already {
            // Shorten a pending graceful deletion if asked; otherwise nothing changes.
            let current_grace = object
                .pointer("/metadata/deletionGracePeriodSeconds")
                .and_then(Value::as_i64)
                .unwrap_or(0);
            if !(graceful_pod && grace < current_grace)
                && finalizers
                    == object
                        .pointer("/metadata/finalizers")
                        .and_then(Value::as_array)
                        .cloned()
                        .unwrap_or_default()
            {
                return Ok((StatusCode::ACCEPTED, new));
            }
        }
        {
            let meta = meta_mut(&mut new);
            if !finalizers.is_empty() {
                meta.insert("finalizers".into(), Value::Array(finalizers.clone()));
            }
            let when = Utc::now() + chrono::Duration::seconds(grace);
            meta.insert(
                "deletionTimestamp".into(),
                json!(when.to_rfc3339_opts(SecondsFormat::Secs, true)),
            );
            meta.insert("deletionGracePeriodSeconds".into(), json!(grace));
        }
        if namespace {
            new["status"]["phase"] = json!("Terminating");
        }
        let dry_run = options.dry_run;
        let stored = self
            .commit(
                name,
                Write::Update {
                    old,
                    new: new.clone(),
                },
                dry_run,
            )
            .await?;
        if dry_run {
            return Ok((StatusCode::ACCEPTED, new));
        }
        Ok((StatusCode::ACCEPTED, (*stored.object).clone()))
    }

    async fn delete_collection(
        &self,
        query: &Query,
        options: &DeleteOptions,
    ) -> Result<Response, ApiError> {
        let opts = list_options(&self.info, query)?;
        let (group, resource) = self.info.storage_resource();
        let prefix = list_prefix(group, resource, &self.namespace);
        let listing = self
            .server
            .storage
            .list(&prefix, None, None)
            .await
            .map_err(|e| storage_error(&self.info, "", e))?;
        let mut deleted = Vec::new();
        for item in listing.items {
            let mut object = item.value().map_err(|e| storage_error(&self.info, "", e))?;
            self.info.from_storage(&mut object);
            if !opts.matches(&self.info, &object) {
                continue;
            }
            let name = meta_str(&object, "name").to_string();
            let ctx = Ctx {
                server: self.server.clone(),
                info: self.info.clone(),
                namespace: meta_str(&object, "namespace").to_string(),
                output: self.output,
                user: self.user.clone(),
            };
            match ctx.delete(&name, options).await {
                Ok((_, object)) => deleted.push(object),
                Err(e) if e.code == 404 => {}
                Err(e) => return Err(e),
            }
        }
        let list = json!({
            "kind": self.info.list_kind(),
            "apiVersion": self.info.api_version(),
            "metadata": {"resourceVersion": self.server.storage.revision().to_string()},
            "items": deleted,
        });
        Ok(json_response(StatusCode::OK, &list))
    }

    /// POST pods/x/binding: assigns a node, once, and marks the pod scheduled (as upstream's
    /// binding storage does).
    async fn bind(&self, name: &str, value: Value) -> Result<Response, ApiError> {
        let binding = builtin::normalize_as::<k8s_openapi::api::core::v1::Binding>(&value)
            .map_err(|e| {
                ApiError::bad_request(format!(
                    "Binding in version \"v1\" cannot be handled as a Binding: {e}"
                ))
            })?;
        let node = binding
            .pointer("/target/name")
            .and_then(Value::as_str)
            .unwrap_or("");
        if node.is_empty() {
            return Err(ApiError::invalid(
                "Binding",
                "",
                name,
                vec![Cause::required("target.name")],
            ));
        }
        for attempt in 0..MAX_RETRIES {
            backoff(attempt).await;
            let old = self.load(name).await?;
            if let Some(current) = old
                .object
                .pointer("/spec/nodeName")
                .and_then(Value::as_str)
                .filter(|n| !n.is_empty())
            {
                return Err(ApiError::conflict(
                    "pods",
                    "",
                    name,
                    &format!("pod {name} is already assigned to node {current:?}"),
                ));
            }
            if old.object.pointer("/metadata/deletionTimestamp").is_some() {
                return Err(ApiError::conflict(
                    "pods",
                    "",
                    name,
                    &format!("pod {name} is being deleted, cannot be assigned to a host"),
                ));
            }
            let mut new = (*old.object).clone();
            new["spec"]["nodeName"] = json!(node);
            set_pod_scheduled(&mut new);
            if let Some(annotations) = binding
                .pointer("/metadata/annotations")
                .and_then(Value::as_object)
            {
                let meta = meta_mut(&mut new);
                let target = meta.entry("annotations").or_insert_with(|| json!({}));
                for (k, v) in annotations {
                    target[k] = v.clone();
                }
            }
            match self
                .commit(name, Write::Update { old: &old, new }, false)
                .await
            {
                Err(e) if lost_race(&e) => continue,
                Err(e) => return Err(e),
                Ok(_) => {
                    return Ok(json_response(
                        StatusCode::CREATED,
                        &success_status(201, None),
                    ));
                }
            }
        }
        Err(ApiError::modified("pods", "", name))
    }

    /// POST serviceaccounts/x/token: a signed token for the account (upstream's TokenRequest).
    async fn token_request(&self, name: &str, value: Value) -> Result<Response, ApiError> {
        let Some(issuer) = self.server.service_account_tokens.get() else {
            return Err(ApiError::service_unavailable(
                "this server has no service account signing key configured",
            ));
        };
        super::admission::admit_token_request(&self.server, &self.user, &self.namespace, &value)?;
        let account = self.load(name).await?;
        let spec = value.get("spec").cloned().unwrap_or(json!({}));
        let audiences: Vec<String> = spec
            .get("audiences")
            .and_then(Value::as_array)
            .map(|a| {
                a.iter()
                    .filter_map(Value::as_str)
                    .map(str::to_string)
                    .collect()
            })
            .filter(|a: &Vec<String>| !a.is_empty())
            .unwrap_or_else(|| vec![issuer.issuer().to_string()]);
        let seconds = spec
            .get("expirationSeconds")
            .and_then(Value::as_i64)
            .unwrap_or(crate::service_accounts::DEFAULT_EXPIRATION);
        if seconds < crate::service_accounts::MIN_EXPIRATION {
            return Err(ApiError::invalid(
                "TokenRequest",
                "authentication.k8s.io",
                name,
                vec![Cause::invalid(
                    "spec.expirationSeconds",
                    &json!(seconds),
                    "may not specify a duration less than 10 minutes",
                )],
            ));
        }
        let mut bound = None;
        if let Some(reference) = spec.get("boundObjectRef").filter(|r| r.is_object()) {
            let kind = reference.get("kind").and_then(Value::as_str).unwrap_or("");
            let resource = match kind {
                "Pod" => "pods",
                "Secret" => "secrets",
                other => {
                    return Err(ApiError::invalid(
                        "TokenRequest",
                        "authentication.k8s.io",
                        name,
                        vec![Cause::unsupported(
                            "spec.boundObjectRef.kind",
                            &json!(other),
                            &["Pod", "Secret"],
                        )],
                    ));
                }
            };
            let bound_name = reference.get("name").and_then(Value::as_str).unwrap_or("");
            let key = object_key("", resource, &self.namespace, bound_name);
            let stored = self
                .server
                .storage
                .get(&key)
                .await
                .map_err(|e| storage_error(&self.info, name, e))?
                .ok_or_else(|| ApiError::not_found(resource, "", bound_name))?;
            let uid = meta_str(&stored.object, "uid").to_string();
            if let Some(want) = reference.get("uid").and_then(Value::as_str)
                && want != uid
            {
                return Err(ApiError::conflict(
                    resource,
                    "",
                    bound_name,
                    &format!(
                        "the UID in the bound object reference ({want}) does not match the UID in record ({uid})"
                    ),
                ));
            }
            bound = Some((kind.to_string(), bound_name.to_string(), uid));
        }
        let claims = crate::service_accounts::Claims {
            namespace: self.namespace.clone(),
            name: name.to_string(),
            uid: meta_str(&account.object, "uid").to_string(),
            bound,
        };
        let now = chrono::Utc::now();
        let token = issuer.issue(&claims, &audiences, now.timestamp(), seconds);
        let expires = (now + chrono::Duration::seconds(seconds))
            .to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
        let mut spec_out = spec.clone();
        spec_out["audiences"] = json!(audiences);
        spec_out["expirationSeconds"] = json!(seconds);
        let response = json!({
            "kind": "TokenRequest",
            "apiVersion": "authentication.k8s.io/v1",
            "metadata": {"name": name, "namespace": self.namespace, "creationTimestamp": null},
            "spec": spec_out,
            "status": {"token": token, "expirationTimestamp": expires},
        });
        Ok(json_response(StatusCode::CREATED, &response))
    }

    /// POST pods/x/eviction: a delete that respects PodDisruptionBudgets.
    async fn evict(&self, name: &str, value: Value) -> Result<Response, ApiError> {
        let eviction = match value.get("apiVersion").and_then(Value::as_str) {
            Some("policy/v1beta1") | Some("policy/v1") | None => value.clone(),
            Some(other) => {
                return Err(ApiError::bad_request(format!(
                    "unsupported eviction version {other:?}"
                )));
            }
        };
        let pod = self.load(name).await?;
        let pdbs = self
            .server
            .storage
            .list(
                &list_prefix("policy", "poddisruptionbudgets", &self.namespace),
                None,
                None,
            )
            .await
            .map_err(|e| storage_error(&self.info, name, e))?;
        let terminal = matches!(
            pod.object.pointer("/status/phase").and_then(Value::as_str),
            Some("Succeeded") | Some("Failed")
        );
        if !terminal {
            for raw in pdbs.items {
                let pdb = Stored {
                    revision: raw.revision,
                    object: Arc::new(
                        raw.value()
                            .map_err(|e| storage_error(&self.info, name, e))?,
                    ),
                };
                let Some(selector) = pdb.object.pointer("/spec/selector") else {
                    continue;
                };
                let Ok(sel) = LabelSelector::from_object(selector) else {
                    continue;
                };
                if sel.is_empty() || !sel.matches_object(&pod.object) {
                    continue;
                }
                let allowed = pdb
                    .object
                    .pointer("/status/disruptionsAllowed")
                    .and_then(Value::as_i64)
                    .unwrap_or(0);
                if allowed <= 0 {
                    let pdb_name = meta_str(&pdb.object, "name");
                    let healthy = pdb
                        .object
                        .pointer("/status/currentHealthy")
                        .and_then(Value::as_i64)
                        .unwrap_or(0);
                    let desired = pdb
                        .object
                        .pointer("/status/desiredHealthy")
                        .and_then(Value::as_i64)
                        .unwrap_or(0);
                    let mut e = ApiError::too_many_requests(
                        "Cannot evict pod as it would violate the pod's disruption budget.",
                    );
                    e = e.with_details(Details {
                        causes: vec![Cause::new(
                            "DisruptionBudget",
                            "",
                            format!("The disruption budget {pdb_name} needs {desired} healthy pods and has {healthy} currently"),
                        )],
                        // Upstream sends no Retry-After here: client-go would otherwise retry
                        // inside the request and `kubectl drain --timeout` could not stop it.
                        retry_after_seconds: None,
                        ..Details::default()
                    });
                    return Err(e);
                }
                let mut updated = (*pdb.object).clone();
                updated["status"]["disruptionsAllowed"] = json!(allowed - 1);
                // Upstream records the eviction so the disruption controller does not count
                // the pod as healthy again before it is gone.
                let now = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
                if !updated["status"]["disruptedPods"].is_object() {
                    updated["status"]["disruptedPods"] = json!({});
                }
                updated["status"]["disruptedPods"][name] = json!(now);
                // The budget's update is a write of its own: through the budgets' commit.
                let Some(budgets) =
                    self.server
                        .registry
                        .get("policy", "v1", "poddisruptionbudgets")
                else {
                    return Err(ApiError::internal("poddisruptionbudgets are not served"));
                };
                let budgets = Ctx {
                    server: self.server.clone(),
                    info: budgets,
                    namespace: self.namespace.clone(),
                    output: self.output,
                    user: self.user.clone(),
                };
                let pdb_name = meta_str(&pdb.object, "name").to_string();
                budgets
                    .commit(
                        &pdb_name,
                        Write::Update {
                            old: &pdb,
                            new: updated,
                        },
                        false,
                    )
                    .await
                    .map_err(|e| {
                        if lost_race(&e) {
                            ApiError::too_many_requests(
                                "the disruption budget changed, please retry",
                            )
                        } else {
                            e
                        }
                    })?;
            }
        }
        let options_body = eviction.get("deleteOptions").cloned().unwrap_or(json!({}));
        let options = delete_options(
            &Query::default(),
            &serde_json::to_vec(&options_body).unwrap_or_default(),
            "application/json",
        )?;
        self.delete(name, &options).await?;
        Ok(json_response(
            StatusCode::CREATED,
            &success_status(201, None),
        ))
    }

    /// The pod's node, or the error upstream gives for an unscheduled pod.
    fn node_of(object: &Value, name: &str) -> Result<String, ApiError> {
        let node = object
            .pointer("/spec/nodeName")
            .and_then(Value::as_str)
            .unwrap_or("");
        if node.is_empty() {
            return Err(ApiError::bad_request(format!(
                "pod {name} does not have a host assigned"
            )));
        }
        Ok(node.to_string())
    }

    /// `pods/log`: validated here, served by the pod's node agent.
    async fn pod_log(&self, name: &str, query: &Query) -> Result<Response, ApiError> {
        let object = self.load(name).await?.object;
        let node = Self::node_of(&object, name)?;
        let container = Self::pick_container(&object, name, query.get("container"))?;
        for (key, what) in [
            ("tailLines", "tailLines"),
            ("sinceSeconds", "sinceSeconds"),
            ("limitBytes", "limitBytes"),
        ] {
            if let Some(v) = query.get(key)
                && v.parse::<i64>()
                    .map(|n| n < 0 || (key != "tailLines" && n == 0))
                    .unwrap_or(true)
            {
                return Err(ApiError::bad_request(format!(
                    "{what}: Invalid value: {v:?}: must be {}",
                    if key == "tailLines" {
                        "greater than or equal to 0"
                    } else {
                        "greater than 0"
                    }
                )));
            }
        }
        // (The serializer is not Send: keep it out of the awaits.)
        let forwarded = {
            let mut f = form_urlencoded::Serializer::new(String::new());
            for key in [
                "follow",
                "previous",
                "timestamps",
                "tailLines",
                "sinceSeconds",
                "sinceTime",
                "limitBytes",
            ] {
                if let Some(v) = query.get(key) {
                    f.append_pair(key, v);
                }
            }
            let uid = object
                .pointer("/metadata/uid")
                .and_then(Value::as_str)
                .unwrap_or("");
            f.append_pair("podUID", uid);
            f.finish()
        };
        let path = format!(
            "/containerLogs/{}/{name}/{container}?{forwarded}",
            self.namespace
        );
        self.call_node(&node, path).await
    }

    /// `pods/exec`, `pods/attach`, `pods/portforward`: validated here, bridged to the pod's node
    /// agent by [`crate::streams`].
    async fn pod_stream(
        &self,
        name: &str,
        sub: &str,
        query: &Query,
        request: Request,
    ) -> Result<Response, ApiError> {
        let object = self.load(name).await?.object;
        let node = Self::node_of(&object, name)?;
        let phase = object
            .pointer("/status/phase")
            .and_then(Value::as_str)
            .unwrap_or("");
        if matches!(phase, "Succeeded" | "Failed") {
            return Err(ApiError::bad_request(format!(
                "cannot {} a container in a completed pod; current phase is {phase}",
                if sub == "portforward" {
                    "port-forward to"
                } else {
                    sub
                }
            )));
        }
        let connection = self.server.nodes.get(&node).ok_or_else(|| {
            ApiError::service_unavailable(format!(
                "the node agent of {node} is not connected to this server"
            ))
        })?;
        let uid = object
            .pointer("/metadata/uid")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_string();
        if sub == "portforward" {
            return crate::streams::port_forward(connection, &self.namespace, name, &uid, request)
                .await;
        }
        let container = Self::pick_container(&object, name, query.get("container"))?;
        let wants = crate::streams::Wants {
            stdin: query.flag("stdin")?,
            stdout: query.flag("stdout")?,
            stderr: query.flag("stderr")?,
            tty: query.flag("tty")?,
        };
        let raw = request.uri().query().map(String::from);
        crate::streams::exec(
            connection,
            &self.namespace,
            name,
            &uid,
            &container,
            sub == "attach",
            wants,
            raw.as_deref(),
            request,
        )
        .await
    }

    /// `nodes/<name>/proxy/<path>` (GET): the node agent's HTTP API (`metrics`,
    /// `metrics/resource`, `stats/summary`), as upstream proxies to the kubelet.
    async fn node_proxy(
        &self,
        name: &str,
        tail: &str,
        raw_query: Option<&str>,
    ) -> Result<Response, ApiError> {
        self.load(name).await?;
        let path = match raw_query {
            Some(q) if !q.is_empty() => format!("/{tail}?{q}"),
            _ => format!("/{tail}"),
        };
        self.call_node(name, path).await
    }

    /// `metrics.k8s.io`: NodeMetrics and PodMetrics from the node agents' samples.
    async fn metrics(&self, name: Option<&str>, query: &Query) -> Result<Response, ApiError> {
        let summaries = crate::metrics::summaries(&self.server.nodes).await;
        let mut items = if self.info.resource == "nodes" {
            crate::metrics::node_metrics(&summaries)
        } else {
            // Pod labels, for label selectors (kubectl top pod -l ...).
            let prefix = crate::storage::list_prefix("", "pods", &self.namespace);
            let listing = self
                .server
                .storage
                .list(&prefix, None, None)
                .await
                .map_err(|e| ApiError::internal(e.to_string()))?;
            let mut labels = std::collections::HashMap::new();
            for raw in &listing.items {
                if let Ok(pod) = raw.value() {
                    labels.insert(
                        (
                            meta_str(&pod, "namespace").to_string(),
                            meta_str(&pod, "name").to_string(),
                        ),
                        pod.pointer("/metadata/labels")
                            .cloned()
                            .unwrap_or(json!({})),
                    );
                }
            }
            let mut pods = crate::metrics::pod_metrics(&summaries, &labels);
            // Only pods the store knows (a pod deleted a moment ago is gone).
            pods.retain(|p| {
                labels.contains_key(&(
                    meta_str(p, "namespace").to_string(),
                    meta_str(p, "name").to_string(),
                ))
            });
            pods
        };
        if let Some(selector) = query.get("labelSelector").filter(|s| !s.is_empty()) {
            let selector =
                crate::selectors::LabelSelector::parse(selector).map_err(ApiError::bad_request)?;
            items.retain(|o| selector.matches_object(o));
        }
        if let Some(name) = name {
            let found = items
                .into_iter()
                .find(|o| meta_str(o, "name") == name)
                .ok_or_else(|| self.not_found(name))?;
            return Ok(json_response(StatusCode::OK, &found));
        }
        let kind = if self.info.resource == "nodes" {
            "NodeMetricsList"
        } else {
            "PodMetricsList"
        };
        if self.output == Output::Table {
            let refs: Vec<&Value> = items.iter().collect();
            return Ok(json_response(
                StatusCode::OK,
                &tables::table(
                    &self.info,
                    &refs,
                    tables::IncludeObject::Metadata,
                    "",
                    None,
                    Utc::now(),
                ),
            ));
        }
        Ok(json_response(
            StatusCode::OK,
            &json!({
                "kind": kind,
                "apiVersion": "metrics.k8s.io/v1beta1",
                "metadata": {},
                "items": items,
            }),
        ))
    }

    /// The container a request names, or the only one; upstream's errors otherwise.
    fn pick_container(object: &Value, name: &str, asked: Option<&str>) -> Result<String, ApiError> {
        let names = |path: &str| -> Vec<String> {
            object
                .pointer(path)
                .and_then(Value::as_array)
                .map(|cs| {
                    cs.iter()
                        .filter_map(|c| c["name"].as_str().map(String::from))
                        .collect()
                })
                .unwrap_or_default()
        };
        let containers = names("/spec/containers");
        let all: Vec<String> = names("/spec/initContainers")
            .into_iter()
            .chain(containers.iter().cloned())
            .chain(names("/spec/ephemeralContainers"))
            .collect();
        match asked.filter(|c| !c.is_empty()) {
            Some(c) if all.iter().any(|x| x == c) => Ok(c.to_string()),
            Some(c) => Err(ApiError::bad_request(format!(
                "container {c} is not valid for pod {name}"
            ))),
            None if containers.len() == 1 => Ok(containers[0].clone()),
            None => Err(ApiError::bad_request(format!(
                "a container name must be specified for pod {name}, choose one of: [{}]",
                containers.join(" ")
            ))),
        }
    }

    async fn call_node(&self, node: &str, path: String) -> Result<Response, ApiError> {
        let connection = self.server.nodes.get(node).ok_or_else(|| {
            ApiError::service_unavailable(format!(
                "the node agent of {node} is not connected to this server"
            ))
        })?;
        let request = http::Request::builder()
            .method(Method::GET)
            .uri(path)
            .body(Body::empty())
            .map_err(|e| ApiError::internal(e.to_string()))?;
        let response = connection.call(request).await.map_err(|e| {
            ApiError::service_unavailable(format!("the node agent of {node} failed: {e}"))
        })?;
        let (parts, body) = response.into_parts();
        if parts.status.is_success() {
            let mut out = Response::new(body);
            *out.status_mut() = parts.status;
            if let Some(ct) = parts.headers.get(header::CONTENT_TYPE) {
                out.headers_mut().insert(header::CONTENT_TYPE, ct.clone());
            }
            return Ok(out);
        }
        // The agent answers errors as text: turn them into a Status.
        let bytes = axum::body::to_bytes(body, 64 * 1024)
            .await
            .unwrap_or_default();
        let message = String::from_utf8_lossy(&bytes).trim().to_string();
        Err(match parts.status.as_u16() {
            400 => ApiError::bad_request(message),
            404 => ApiError::bad_request(message),
            _ => ApiError::internal(message),
        })
    }

    /// Exec, attach, port-forward and proxy are served by the node agent.
    async fn node_streaming(&self, name: &str, sub: &str) -> Result<Response, ApiError> {
        let object = self.load(name).await?;
        if self.info.resource == "pods" {
            Self::node_of(&object.object, name)?;
        }
        Err(ApiError::service_unavailable(format!(
            "{}/{sub} is not served by this EdgeSite release yet",
            self.info.resource
        )))
    }
}

/// The request context of the server's own writes.
fn internal_ctx(
    server: &Arc<ApiServer>,
    group: &str,
    version: &str,
    resource: &str,
    namespace: &str,
) -> Result<Ctx, ApiError> {
    let info = server
        .registry
        .get(group, version, resource)
        .ok_or_else(ApiError::no_route)?;
    Ok(Ctx {
        server: server.clone(),
        info,
        namespace: namespace.to_string(),
        output: Output::Json,
        user: Identity::loopback(),
    })
}

/// Deletes an object from inside the server, through the normal write path.
pub async fn delete_internal(
    server: &Arc<ApiServer>,
    group: &str,
    version: &str,
    resource: &str,
    namespace: &str,
    name: &str,
) -> Result<(), ApiError> {
    let ctx = internal_ctx(server, group, version, resource, namespace)?;
    let options = DeleteOptions {
        grace_period: None,
        propagation: None,
        precondition_uid: None,
        precondition_rv: None,
        dry_run: false,
    };
    ctx.delete(name, &options).await.map(|_| ())
}

/// How the server's own writes go through the write path: field manager `edgesite`, strict.
fn internal_write_options() -> WriteOptions {
    WriteOptions {
        dry_run: false,
        manager: "edgesite".into(),
        validation: FieldValidation::Strict,
        warnings: Vec::new(),
    }
}

/// Replaces an object from inside the server, through the normal write path; `object` carries
/// the resourceVersion it was read at (a conflict when another write came between).
pub async fn update_internal(
    server: &Arc<ApiServer>,
    group: &str,
    version: &str,
    resource: &str,
    namespace: &str,
    object: Value,
) -> Result<Value, ApiError> {
    let ctx = internal_ctx(server, group, version, resource, namespace)?;
    let name = meta_str(&object, "name").to_string();
    let mut opts = internal_write_options();
    ctx.replace(&name, None, object, &mut opts)
        .await
        .map(|(_, v)| v)
}

/// Creates an object from inside the server (start-up defaults), through the normal write path.
pub async fn create_internal(
    server: &Arc<ApiServer>,
    group: &str,
    version: &str,
    resource: &str,
    namespace: &str,
    object: Value,
) -> Result<Value, ApiError> {
    let ctx = internal_ctx(server, group, version, resource, namespace)?;
    let mut opts = internal_write_options();
    ctx.create(object, &mut opts).await
}

/// Sets the pod's `PodScheduled` condition to True (replacing a False one from a failed attempt).
fn set_pod_scheduled(pod: &mut Value) {
    let now = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
    let condition = json!({"type": "PodScheduled", "status": "True", "lastProbeTime": null, "lastTransitionTime": now});
    let status = pod
        .as_object_mut()
        .map(|o| o.entry("status").or_insert_with(|| json!({})));
    let Some(status) = status.and_then(Value::as_object_mut) else {
        return;
    };
    let conditions = status.entry("conditions").or_insert_with(|| json!([]));
    let Some(list) = conditions.as_array_mut() else {
        return;
    };
    list.retain(|c| c.get("type").and_then(Value::as_str) != Some("PodScheduled"));
    list.push(condition);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_field_paths() {
        let input =
            json!({"spec": {"containers": [{"name": "a", "bogus": 1}], "nope": true, "ok": null}});
        let output = json!({"spec": {"containers": [{"name": "a"}]}});
        let mut found = Vec::new();
        unknown_fields(&input, &output, "", &mut found);
        assert_eq!(found, vec!["spec.containers[0].bogus", "spec.nope"]);
    }

    #[test]
    fn continue_tokens_round_trip() {
        let t = encode_continue(42, "/core/pods/default/web");
        let back = decode_continue(&t).unwrap();
        assert_eq!(
            (back.rv, back.start.as_str()),
            (42, "/core/pods/default/web")
        );
        assert_eq!(decode_continue("!!!").unwrap_err().code, 400);
    }

    #[test]
    fn delete_options_from_body_and_query() {
        let q = Query::parse(Some("gracePeriodSeconds=5&propagationPolicy=Foreground"));
        let o = delete_options(&q, b"", "application/json").unwrap();
        assert_eq!(o.grace_period, Some(5));
        assert_eq!(o.propagation.as_deref(), Some("Foreground"));
        let o = delete_options(
            &Query::default(),
            br#"{"propagationPolicy":"Orphan","preconditions":{"uid":"u"}}"#,
            "application/json",
        )
        .unwrap();
        assert_eq!(o.propagation.as_deref(), Some("Orphan"));
        assert_eq!(o.precondition_uid.as_deref(), Some("u"));
        assert_eq!(
            delete_options(
                &Query::default(),
                br#"{"propagationPolicy":"Sideways"}"#,
                "application/json"
            )
            .unwrap_err()
            .code,
            422
        );
        assert_eq!(
            delete_options(&Query::default(), b"{", "application/json")
                .unwrap_err()
                .code,
            400
        );
    }
}
