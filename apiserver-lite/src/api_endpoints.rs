//! The endpoints of the `default/kubernetes` Service: the API servers themselves. Clients in pods
//! reach the API through them, and agents learn from them which servers they may use.
//!
//! One server writes its own address once. Servers sharing a datastore do what upstream's lease
//! endpoint reconciler does: each keeps a record of its advertised address under [`PREFIX`],
//! renewed every [`RENEW`]; a record not renewed for [`TTL`] is dropped by whichever server sees
//! it first; every server writes the Endpoints and EndpointSlices from the live records (a
//! conditional write, so two servers never undo each other). A server that stops removes its
//! record as it goes, so agents hear of it at once rather than after [`TTL`].
//!
//! Servers may listen on different ports (several on one machine): the Endpoints get one subset
//! per port, the EndpointSlices one slice per address family and port (`kubernetes`, then
//! `kubernetes-<port>` or `kubernetes-<port>-ipv6`), as upstream splits any Service's endpoints.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use serde_json::{Value, json};

use crate::http;
use crate::http::ApiServer;
use crate::storage::{StorageError, list_prefix, object_key};

/// Where the servers' records live (not an API resource: the datastore's own bookkeeping, as
/// upstream's `/registry/masterleases/`).
pub const PREFIX: &str = "/edgesite.io/apiserverleases/";
/// How often a server renews its record and rewrites the endpoints.
pub const RENEW: Duration = Duration::from_secs(5);
/// How long a record lives without renewal.
pub const TTL: Duration = Duration::from_secs(15);

const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

/// One API server as its clients reach it.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct ApiEndpoint {
    pub address: SocketAddr,
    /// The server's own node, when it runs one.
    pub node: Option<String>,
}

impl ApiEndpoint {
    fn key(&self) -> String {
        format!("{PREFIX}{}", self.address)
    }

    fn record(&self) -> Value {
        json!({
            "ip": self.address.ip().to_string(),
            "port": self.address.port(),
            "node": self.node,
            "renewed": chrono::Utc::now().to_rfc3339(),
        })
    }

    /// The endpoint a record names, if it is still live at `now`.
    fn live(record: &Value, now: chrono::DateTime<chrono::Utc>) -> Option<ApiEndpoint> {
        let renewed = record.get("renewed")?.as_str()?;
        let renewed = chrono::DateTime::parse_from_rfc3339(renewed).ok()?;
        let age = now.signed_duration_since(renewed);
        if age > chrono::Duration::from_std(TTL).ok()? {
            return None;
        }
        let ip: IpAddr = record.get("ip")?.as_str()?.parse().ok()?;
        let port = u16::try_from(record.get("port")?.as_u64()?).ok()?;
        Some(ApiEndpoint {
            address: SocketAddr::new(ip, port),
            node: record.get("node").and_then(Value::as_str).map(String::from),
        })
    }
}

/// Publishes `me` as an endpoint of the `kubernetes` Service. With `shared` (other servers may
/// use the datastore) it keeps doing so until the server shuts down, then withdraws.
pub async fn publish(
    server: &Arc<ApiServer>,
    me: ApiEndpoint,
    shared: bool,
) -> Result<(), StorageError> {
    if !shared {
        return write(server, &BTreeSet::from([me])).await;
    }
    renew(server, &me).await?;
    reconcile(server, &me).await?;
    let task = server.clone();
    let handle = tokio::spawn(async move {
        let server = task;
        let mut tick = tokio::time::interval(RENEW);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = server.shutdown.cancelled() => break,
                _ = tick.tick() => {}
            }
            let done = async {
                renew(&server, &me).await?;
                reconcile(&server, &me).await
            };
            if let Err(e) = done.await {
                tracing::warn!("the kubernetes Service's endpoints: {e}");
            }
        }
        // Withdraw: the other servers drop this address from the endpoints now.
        let withdraw = async {
            if let Some(held) = server.storage.get(&me.key()).await? {
                server
                    .storage
                    .delete(&me.key(), Some(held.revision))
                    .await?;
            }
            let others = live(&server).await?;
            if !others.is_empty() {
                write(&server, &others).await?;
            }
            Ok::<(), StorageError>(())
        };
        match tokio::time::timeout(Duration::from_secs(3), withdraw).await {
            Ok(Ok(())) => {
                tracing::info!(address = %me.address, "withdrew from the kubernetes Service's endpoints")
            }
            Ok(Err(e)) => tracing::warn!("withdraw from the kubernetes Service's endpoints: {e}"),
            Err(_) => tracing::warn!("withdraw from the kubernetes Service's endpoints: timed out"),
        }
    });
    server
        .finishing
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .push(handle);
    Ok(())
}

async fn renew(server: &ApiServer, me: &ApiEndpoint) -> Result<(), StorageError> {
    let key = me.key();
    match server.storage.get(&key).await? {
        None => match server.storage.create(&key, me.record()).await {
            Ok(_) | Err(StorageError::AlreadyExists(_)) => Ok(()),
            Err(e) => Err(e),
        },
        Some(held) => match server
            .storage
            .update(&key, me.record(), Some(held.revision))
            .await
        {
            Ok(_) | Err(StorageError::Conflict { .. } | StorageError::NotFound(_)) => Ok(()),
            Err(e) => Err(e),
        },
    }
}

/// The live records; expired ones are removed on the way.
async fn live(server: &ApiServer) -> Result<BTreeSet<ApiEndpoint>, StorageError> {
    let now = chrono::Utc::now();
    let listing = server.storage.list(PREFIX, None, None).await?;
    let mut out = BTreeSet::new();
    for item in listing.items {
        let record = item.value()?;
        match ApiEndpoint::live(&record, now) {
            Some(endpoint) => {
                out.insert(endpoint);
            }
            None => {
                // Another server may drop it first: either way it is gone.
                let _ = server.storage.delete(&item.key, Some(item.revision)).await;
            }
        }
    }
    Ok(out)
}

async fn reconcile(server: &Arc<ApiServer>, me: &ApiEndpoint) -> Result<(), StorageError> {
    let mut endpoints = live(server).await?;
    endpoints.insert(me.clone());
    write(server, &endpoints).await
}

/// The Endpoints: one subset per port.
fn endpoints_object(endpoints: &BTreeSet<ApiEndpoint>) -> Value {
    let mut by_port: BTreeMap<u16, Vec<Value>> = BTreeMap::new();
    for e in endpoints {
        let mut address = json!({"ip": e.address.ip().to_string()});
        if let Some(node) = &e.node {
            address["nodeName"] = json!(node);
        }
        by_port.entry(e.address.port()).or_default().push(address);
    }
    let subsets: Vec<Value> = by_port
        .into_iter()
        .map(|(port, addresses)| {
            json!({"addresses": addresses, "ports": [{"name": "https", "port": port, "protocol": "TCP"}]})
        })
        .collect();
    json!({
        "apiVersion": "v1", "kind": "Endpoints",
        "metadata": {"name": "kubernetes", "namespace": "default", "labels": {"endpointslice.kubernetes.io/skip-mirror": "true"}},
        "subsets": subsets
    })
}

/// The EndpointSlices: one per address family and port, by name.
fn slice_objects(endpoints: &BTreeSet<ApiEndpoint>) -> BTreeMap<String, Value> {
    let mut groups: BTreeMap<(bool, u16), Vec<Value>> = BTreeMap::new();
    for e in endpoints {
        let mut endpoint =
            json!({"addresses": [e.address.ip().to_string()], "conditions": {"ready": true}});
        if let Some(node) = &e.node {
            endpoint["nodeName"] = json!(node);
        }
        groups
            .entry((e.address.is_ipv6(), e.address.port()))
            .or_default()
            .push(endpoint);
    }
    let mut out = BTreeMap::new();
    for (i, ((v6, port), endpoints)) in groups.into_iter().enumerate() {
        let name = match (i, v6) {
            (0, _) => "kubernetes".to_string(),
            (_, false) => format!("kubernetes-{port}"),
            (_, true) => format!("kubernetes-{port}-ipv6"),
        };
        let family = if v6 { "IPv6" } else { "IPv4" };
        out.insert(
            name.clone(),
            json!({
                "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
                "metadata": {"name": name, "namespace": "default", "labels": {SERVICE_NAME_LABEL: "kubernetes"}},
                "addressType": family,
                "endpoints": endpoints,
                "ports": [{"name": "https", "port": port, "protocol": "TCP"}]
            }),
        );
    }
    out
}

/// The live API servers as this server last wrote them (this one too).
pub fn servers(server: &ApiServer) -> Vec<SocketAddr> {
    server
        .api_servers
        .read()
        .unwrap_or_else(|e| e.into_inner())
        .clone()
}

/// [`servers`] as `https://host:port` URLs, as links are told them.
pub fn server_urls(server: &ApiServer) -> Vec<String> {
    servers(server)
        .iter()
        .map(|s| format!("https://{s}"))
        .collect()
}

/// Makes the stored Endpoints and EndpointSlices say `endpoints`, writing only what differs.
async fn write(
    server: &Arc<ApiServer>,
    endpoints: &BTreeSet<ApiEndpoint>,
) -> Result<(), StorageError> {
    let addresses: Vec<SocketAddr> = endpoints.iter().map(|e| e.address).collect();
    let changed = servers(server) != addresses;
    let slices = slice_objects(endpoints);
    let mut wanted: Vec<(&str, &str, &str, Value, &[&str])> = vec![(
        "",
        "v1",
        "endpoints",
        endpoints_object(endpoints),
        &["subsets"][..],
    )];
    for slice in slices.values() {
        wanted.push((
            "discovery.k8s.io",
            "v1",
            "endpointslices",
            slice.clone(),
            &["endpoints", "ports", "addressType"][..],
        ));
    }
    for (group, version, resource, object, fields) in wanted {
        let name = object["metadata"]["name"].as_str().unwrap_or("kubernetes");
        let key = object_key(group, resource, "default", name);
        match server.storage.get(&key).await? {
            None => {
                match http::resources::create_internal(
                    server,
                    group,
                    version,
                    resource,
                    "default",
                    object.clone(),
                )
                .await
                {
                    Ok(_) => {}
                    // Another server made it a moment ago: the next round compares.
                    Err(e) if e.code == 409 => {}
                    Err(e) => return Err(StorageError::Backend(e.message)),
                }
            }
            Some(stored) => {
                let mut current = (*stored.object).clone();
                if fields.iter().all(|f| current.get(*f) == object.get(*f)) {
                    continue;
                }
                for f in fields {
                    current[*f] = object[*f].clone();
                }
                match http::resources::update_internal(
                    server, group, version, resource, "default", current,
                )
                .await
                {
                    Ok(_) => {}
                    // Another server wrote it meanwhile: the next round compares again.
                    Err(e) if e.code == 409 || e.code == 404 => {}
                    Err(e) => return Err(StorageError::Backend(e.message)),
                }
            }
        }
    }
    // Slices of ports no server listens on any more (looked for when the servers changed, not
    // on every renewal: the namespace may hold many slices).
    let prefix = list_prefix("discovery.k8s.io", "endpointslices", "default");
    let stale = if changed {
        server.storage.list(&prefix, None, None).await?.items
    } else {
        Vec::new()
    };
    for item in stale {
        let object = item.value()?;
        let name = object
            .pointer("/metadata/name")
            .and_then(Value::as_str)
            .unwrap_or("");
        let ours = object
            .pointer("/metadata/labels")
            .and_then(|l| l.get(SERVICE_NAME_LABEL))
            .and_then(Value::as_str)
            == Some("kubernetes");
        if ours && name.starts_with("kubernetes-") && !slices.contains_key(name) {
            match http::resources::delete_internal(
                server,
                "discovery.k8s.io",
                "v1",
                "endpointslices",
                "default",
                name,
            )
            .await
            {
                Ok(()) => {}
                Err(e) if e.code == 404 || e.code == 409 => {}
                Err(e) => return Err(StorageError::Backend(e.message)),
            }
        }
    }
    *server
        .api_servers
        .write()
        .unwrap_or_else(|e| e.into_inner()) = addresses;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn endpoint(address: &str, node: Option<&str>) -> ApiEndpoint {
        ApiEndpoint {
            address: address.parse().unwrap(),
            node: node.map(String::from),
        }
    }

    #[test]
    fn records_expire_after_the_ttl() {
        let me = endpoint("10.0.0.1:6443", Some("a"));
        let record = me.record();
        let now = chrono::Utc::now();
        assert_eq!(ApiEndpoint::live(&record, now), Some(me));
        let later = now + chrono::Duration::from_std(TTL + Duration::from_secs(1)).unwrap();
        assert_eq!(ApiEndpoint::live(&record, later), None);
        assert_eq!(ApiEndpoint::live(&json!({"ip": "x"}), now), None);
    }

    #[test]
    fn one_subset_and_one_slice_per_port() {
        let set = BTreeSet::from([
            endpoint("10.0.0.1:6443", Some("a")),
            endpoint("10.0.0.2:6443", None),
            endpoint("127.0.0.1:7000", None),
            endpoint("[fd00::1]:6443", None),
        ]);
        let ep = endpoints_object(&set);
        let subsets = ep["subsets"].as_array().unwrap();
        assert_eq!(subsets.len(), 2, "{ep}");
        assert_eq!(subsets[0]["ports"][0]["port"], 6443);
        assert_eq!(subsets[0]["addresses"].as_array().unwrap().len(), 3);
        assert_eq!(subsets[0]["addresses"][0]["nodeName"], "a");
        let slices = slice_objects(&set);
        let names: Vec<&String> = slices.keys().collect();
        assert_eq!(
            names,
            ["kubernetes", "kubernetes-6443-ipv6", "kubernetes-7000"]
        );
        assert_eq!(slices["kubernetes"]["addressType"], "IPv4");
        assert_eq!(
            slices["kubernetes"]["endpoints"].as_array().unwrap().len(),
            2
        );
        assert_eq!(slices["kubernetes-6443-ipv6"]["addressType"], "IPv6");
    }
}
