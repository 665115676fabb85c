//! MQTT logins for mappers that run as pods: a Secret of type `edgesite.io/mqtt-login`
//! (`username`, `password`, and `role`: `mapper` when left out, or `reader`) that a pod on this
//! node uses (env, envFrom or a volume) is a login on this node's broker for as long as such a
//! pod is on the node. The node reads it with its own credentials (the Node authorizer lets a
//! node read the Secrets of its pods and no others).
//!
//! The last set is kept in `<data-dir>/agent/mqtt/pods.logins` (0600), so that a mapper pod
//! restarted while the site is unreachable (an offline reboot) still logs in.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::PathBuf;
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1::{Pod, Secret};
use kube::api::Api;
use kube::runtime::watcher;
use tokio_util::sync::CancellationToken;

use crate::logins::{Login, Logins, Role};

/// The Secret type that makes a Secret a login.
pub const SECRET_TYPE: &str = "edgesite.io/mqtt-login";
/// The source name of these logins in [`Logins`].
const SOURCE: &str = "pods";

/// The login a Secret of [`SECRET_TYPE`] holds, or why it holds none.
pub fn login_of(secret: &Secret) -> Result<(String, Login), String> {
    let field = |key: &str| -> Option<String> {
        secret
            .data
            .as_ref()
            .and_then(|d| d.get(key))
            .map(|b| String::from_utf8_lossy(&b.0).trim().to_string())
            .or_else(|| {
                secret
                    .string_data
                    .as_ref()
                    .and_then(|d| d.get(key))
                    .map(|s| s.trim().to_string())
            })
            .filter(|s| !s.is_empty())
    };
    let username = field("username").ok_or("no username key")?;
    let password = field("password").ok_or("no password key")?;
    let role = match field("role").as_deref() {
        None | Some("mapper") => Role::Mapper,
        Some("reader") => Role::Reader,
        Some(other) => {
            return Err(format!(
                "role {other:?}: a Secret may give mapper or reader (full logins go in the node's --mqtt-users file)"
            ));
        }
    };
    Ok((username, Login { password, role }))
}

fn running(pod: &Pod) -> bool {
    pod.metadata.deletion_timestamp.is_none()
        && !matches!(
            pod.status.as_ref().and_then(|s| s.phase.as_deref()),
            Some("Succeeded") | Some("Failed")
        )
}

/// `namespace/name` of every Secret the pods use.
fn secrets_of<'a>(pods: impl Iterator<Item = &'a Pod>) -> BTreeSet<(String, String)> {
    pods.filter(|p| running(p))
        .flat_map(|pod| {
            let ns = pod.metadata.namespace.clone().unwrap_or_default();
            metamanager::references(pod)
                .into_iter()
                .filter(|(kind, _)| kind == "Secret")
                .map(move |(_, name)| (ns.clone(), name))
        })
        .collect()
}

fn save(file: &std::path::Path, logins: &BTreeMap<String, (String, Role)>) -> std::io::Result<()> {
    let mut text = String::from("# written by edgesite: logins of the mapper pods on this node\n");
    for (user, (password, role)) in logins {
        text.push_str(&format!("{user}:{password}:{}\n", role.as_str()));
    }
    crate::logins::write_private(file, &text)
}

fn load(file: &std::path::Path) -> BTreeMap<String, (String, Role)> {
    let Ok(text) = std::fs::read_to_string(file) else {
        return BTreeMap::new();
    };
    match crate::logins::parse_users(&text, &file.display().to_string()) {
        Ok(users) => users
            .into_iter()
            .map(|(u, l)| (u, (l.password, l.role)))
            .collect(),
        Err(e) => {
            tracing::warn!("ignoring the saved pod logins: {e}");
            BTreeMap::new()
        }
    }
}

/// Follows this node's pods and the login Secrets they use until `shutdown`.
pub async fn follow(
    client: kube::Client,
    node: String,
    logins: Logins,
    file: PathBuf,
    shutdown: CancellationToken,
) {
    let mut current = load(&file);
    apply(&logins, &current);
    let pods: Api<Pod> = Api::all(client.clone());
    let config = watcher::Config::default().fields(&format!("spec.nodeName={node}"));
    let mut events = std::pin::pin!(watcher(pods, config));
    let mut on_node: HashMap<String, Pod> = HashMap::new();
    let mut listing: HashMap<String, Pod> = HashMap::new();
    // Secrets change without their pods changing (a new password): read them again now and
    // then.
    let mut resync = tokio::time::interval(Duration::from_secs(60));
    resync.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut synced = false;
    loop {
        let changed = tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = resync.tick() => synced,
            event = events.next() => match event {
                None => return,
                Some(Err(e)) => {
                    tracing::debug!("mapper pod logins: watch: {e}");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    false
                }
                Some(Ok(event)) => {
                    let key = |p: &Pod| format!(
                        "{}/{}",
                        p.metadata.namespace.as_deref().unwrap_or_default(),
                        p.metadata.name.as_deref().unwrap_or_default()
                    );
                    match event {
                        watcher::Event::Init => {
                            listing.clear();
                            false
                        }
                        watcher::Event::InitApply(p) => {
                            listing.insert(key(&p), p);
                            false
                        }
                        watcher::Event::InitDone => {
                            on_node = std::mem::take(&mut listing);
                            synced = true;
                            true
                        }
                        watcher::Event::Apply(p) => {
                            on_node.insert(key(&p), p);
                            synced
                        }
                        watcher::Event::Delete(p) => {
                            on_node.remove(&key(&p));
                            synced
                        }
                    }
                }
            }
        };
        if !changed {
            continue;
        }
        let Some(next) = read_secrets(&client, secrets_of(on_node.values())).await else {
            // The API did not answer: keep what the node had.
            continue;
        };
        if next != current {
            current = next;
            apply(&logins, &current);
            if let Err(e) = save(&file, &current) {
                tracing::warn!(
                    "save the mapper pods' MQTT logins to {}: {e}",
                    file.display()
                );
            }
        }
    }
}

fn apply(logins: &Logins, current: &BTreeMap<String, (String, Role)>) {
    let map = current
        .iter()
        .map(|(u, (password, role))| {
            (
                u.clone(),
                Login {
                    password: password.clone(),
                    role: *role,
                },
            )
        })
        .collect();
    for user in logins.set_source(SOURCE, map) {
        tracing::warn!(
            user,
            "a pod's MQTT login Secret names a login the node already has; it is ignored"
        );
    }
}

/// The logins in `secrets` (those of [`SECRET_TYPE`]); `None` when the API did not answer.
async fn read_secrets(
    client: &kube::Client,
    secrets: BTreeSet<(String, String)>,
) -> Option<BTreeMap<String, (String, Role)>> {
    let mut out = BTreeMap::new();
    for (namespace, name) in secrets {
        let api: Api<Secret> = Api::namespaced(client.clone(), &namespace);
        let secret = match api.get_opt(&name).await {
            Ok(Some(s)) => s,
            Ok(None) => continue,
            // A Secret this node may not read (the pod is gone since) is not a login.
            Err(kube::Error::Api(_)) => continue,
            Err(e) => {
                tracing::debug!("mapper pod logins: read {namespace}/{name}: {e}");
                return None;
            }
        };
        if secret.type_.as_deref() != Some(SECRET_TYPE) {
            continue;
        }
        match login_of(&secret) {
            Ok((user, login)) => {
                if let Some((other, _)) = out.get(&user)
                    && *other != login.password
                {
                    tracing::warn!(
                        user,
                        secret = %format!("{namespace}/{name}"),
                        "two MQTT login Secrets name this user with different passwords; the last one counts"
                    );
                }
                out.insert(user, (login.password, login.role));
            }
            Err(why) => {
                tracing::warn!(secret = %format!("{namespace}/{name}"), "not an MQTT login: {why}");
            }
        }
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::ByteString;

    fn secret(data: &[(&str, &str)]) -> Secret {
        Secret {
            type_: Some(SECRET_TYPE.into()),
            data: Some(
                data.iter()
                    .map(|(k, v)| (k.to_string(), ByteString(v.as_bytes().to_vec())))
                    .collect(),
            ),
            ..Default::default()
        }
    }

    #[test]
    fn secrets_hold_mapper_or_reader_logins() {
        let (user, login) = login_of(&secret(&[("username", "m"), ("password", "p")])).unwrap();
        assert_eq!((user.as_str(), login.role), ("m", Role::Mapper));
        let (_, login) = login_of(&secret(&[
            ("username", "r"),
            ("password", "p"),
            ("role", "reader"),
        ]))
        .unwrap();
        assert_eq!(login.role, Role::Reader);
        assert!(
            login_of(&secret(&[
                ("username", "f"),
                ("password", "p"),
                ("role", "full")
            ]))
            .is_err()
        );
        assert!(login_of(&secret(&[("username", "x")])).is_err());
    }

    #[test]
    fn saved_logins_load_again() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("pods.logins");
        let logins = BTreeMap::from([
            ("a".to_string(), ("pw:1".to_string(), Role::Mapper)),
            ("b".to_string(), ("x".to_string(), Role::Reader)),
        ]);
        save(&file, &logins).unwrap();
        assert_eq!(load(&file), logins);
    }
}
