//! Who may use a node's MQTT broker, and for what: logins (username, password, role) and the
//! topic permissions of each role.
//!
//! - `full`: every topic (the node's device twin, applications an operator trusts).
//! - `mapper`: what a KubeEdge mapper needs on this node's broker and nothing else: it publishes
//!   its devices' reports and requests (`twin/update`, `twin/get`, `state/update`, `state/get`,
//!   `$ke/events/device/.../data/update`) and the node's membership request, and subscribes to
//!   the twin's answers (`.../result`, `twin/update/delta`, `twin/update/document`) and the
//!   node's membership topics. It cannot publish deltas or results (the twin's voice), nor read
//!   another node's membership.
//! - `reader`: subscribes to device topics; publishes nothing.
//!
//! A node's broker carries only that node's devices, so "device topics" are this node's.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use crate::devicetwin::{DEVICE_PREFIX, NODE_PREFIX};

/// What a login may do.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    Full,
    Mapper,
    Reader,
}

impl std::str::FromStr for Role {
    type Err = String;
    fn from_str(s: &str) -> Result<Role, String> {
        match s {
            "full" => Ok(Role::Full),
            "mapper" => Ok(Role::Mapper),
            "reader" => Ok(Role::Reader),
            other => Err(format!(
                "unknown MQTT role {other:?}: use mapper, reader or full"
            )),
        }
    }
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Full => "full",
            Role::Mapper => "mapper",
            Role::Reader => "reader",
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Login {
    pub password: String,
    pub role: Role,
}

/// The logins a broker accepts: fixed ones (generated, `--mqtt-users`) and ones that come and go
/// by source (for example the Secrets of the mapper pods on this node).
#[derive(Clone, Default)]
pub struct Logins {
    inner: Arc<RwLock<LoginTable>>,
}

#[derive(Default)]
struct LoginTable {
    fixed: HashMap<String, Login>,
    /// source -> (username -> login)
    dynamic: HashMap<String, HashMap<String, Login>>,
}

impl LoginTable {
    /// A fixed login first, then one of any source.
    fn find(&self, username: &str) -> Option<&Login> {
        self.fixed
            .get(username)
            .or_else(|| self.dynamic.values().find_map(|l| l.get(username)))
    }
}

impl Logins {
    pub fn new(fixed: HashMap<String, Login>) -> Logins {
        Logins {
            inner: Arc::new(RwLock::new(LoginTable {
                fixed,
                dynamic: HashMap::new(),
            })),
        }
    }

    /// The login named `username` if `password` is its password (compared in constant time).
    pub fn check(&self, username: &str, password: &str) -> Option<Role> {
        let table = self.inner.read().unwrap_or_else(|e| e.into_inner());
        let login = table.find(username)?;
        constant_time_eq(login.password.as_bytes(), password.as_bytes()).then_some(login.role)
    }

    /// The role of `username` (whose password was checked at CONNECT).
    pub fn role(&self, username: &str) -> Option<Role> {
        let table = self.inner.read().unwrap_or_else(|e| e.into_inner());
        table.find(username).map(|l| l.role)
    }

    /// Replaces the logins of `source`. A username that a fixed login already has is skipped
    /// (and named in the answer): fixed logins cannot be taken over.
    pub fn set_source(&self, source: &str, logins: HashMap<String, Login>) -> Vec<String> {
        let mut table = self.inner.write().unwrap_or_else(|e| e.into_inner());
        let (kept, clashing): (HashMap<_, _>, HashMap<_, _>) = logins
            .into_iter()
            .partition(|(user, _)| !table.fixed.contains_key(user));
        if kept.is_empty() {
            table.dynamic.remove(source);
        } else {
            table.dynamic.insert(source.to_string(), kept);
        }
        clashing.into_keys().collect()
    }

    pub fn len(&self) -> usize {
        let table = self.inner.read().unwrap_or_else(|e| e.into_inner());
        table.fixed.len() + table.dynamic.values().map(HashMap::len).sum::<usize>()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Parses a users file: `username:password[:role]` lines (role `mapper` when left out), `#`
/// comments. A password may contain `:`; the last field is the role only when it names one.
pub fn parse_users(text: &str, origin: &str) -> Result<HashMap<String, Login>, String> {
    let mut users = HashMap::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let Some((user, rest)) = line.split_once(':') else {
            return Err(format!(
                "{origin} line {}: expected username:password[:role]",
                i + 1
            ));
        };
        let (password, role) = match rest.rsplit_once(':') {
            Some((password, role)) if role.parse::<Role>().is_ok() => {
                (password, role.parse::<Role>()?)
            }
            _ => (rest, Role::Mapper),
        };
        if user.is_empty() || password.is_empty() {
            return Err(format!(
                "{origin} line {}: empty username or password",
                i + 1
            ));
        }
        if users
            .insert(
                user.to_string(),
                Login {
                    password: password.to_string(),
                    role,
                },
            )
            .is_some()
        {
            return Err(format!("{origin} line {}: {user} is named twice", i + 1));
        }
    }
    Ok(users)
}

/// The logins a node generates for itself, kept in `<data-dir>/agent/mqtt/`: one file per
/// role, `username:password`, readable by root only.
pub const GENERATED: [(&str, Role); 2] = [
    ("edgesite-mapper", Role::Mapper),
    ("edgesite-reader", Role::Reader),
];

/// The file that holds the generated login of `role` under `data_dir`.
pub fn generated_file(data_dir: &Path, role: Role) -> PathBuf {
    data_dir
        .join("agent")
        .join("mqtt")
        .join(format!("{}.login", role.as_str()))
}

/// Reads the node's generated logins, making any that are missing (or unreadable as a login).
pub fn ensure_generated(data_dir: &Path) -> std::io::Result<HashMap<String, Login>> {
    use std::os::unix::fs::DirBuilderExt;
    let dir = data_dir.join("agent").join("mqtt");
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&dir)?;
    let mut logins = HashMap::new();
    for (user, role) in GENERATED {
        let path = generated_file(data_dir, role);
        let existing = std::fs::read_to_string(&path).ok().and_then(|text| {
            let (u, p) = text.trim().split_once(':')?;
            (u == user && !p.is_empty()).then(|| p.to_string())
        });
        let password = match existing {
            Some(p) => p,
            None => {
                let password = random_password();
                write_private(&path, &format!("{user}:{password}\n"))?;
                password
            }
        };
        logins.insert(user.to_string(), Login { password, role });
    }
    Ok(logins)
}

/// Replaces the file at `path` with `text`, readable by its owner only, atomically (a crash
/// leaves the old file or the new one).
pub fn write_private(path: &Path, text: &str) -> std::io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = path.with_extension("tmp");
    let _ = std::fs::remove_file(&tmp);
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)?;
    std::io::Write::write_all(&mut file, text.as_bytes())?;
    file.sync_all()?;
    std::fs::rename(&tmp, path)
}

/// 32 random lowercase letters and digits.
pub fn random_password() -> String {
    use rand::Rng;
    const CHARS: &[u8] = b"abcdefghijklmnopqrstuvwxyz0123456789";
    let mut rng = rand::rng();
    (0..32)
        .map(|_| char::from(CHARS[rng.random_range(0..CHARS.len())]))
        .collect()
}

/// Reads a `username:password` login file (as [`ensure_generated`] writes them).
pub fn read_login_file(path: &Path) -> Result<(String, String), String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("read the MQTT login {}: {e}", path.display()))?;
    let (user, password) = text.trim().split_once(':').ok_or_else(|| {
        format!(
            "{} is not an MQTT login (username:password)",
            path.display()
        )
    })?;
    Ok((user.to_string(), password.to_string()))
}

/// The topic permissions of `role` on the broker of `node`.
pub struct RoleAcl {
    role: Role,
    publish: Vec<String>,
    subscribe: Vec<String>,
}

impl RoleAcl {
    pub fn new(role: Role, node: &str) -> RoleAcl {
        // A device id is `<namespace>/<name>` or, from mappers before KubeEdge 1.17, a bare name.
        let device = |suffix: &str| {
            [
                format!("{DEVICE_PREFIX}+/{suffix}"),
                format!("{DEVICE_PREFIX}+/+/{suffix}"),
            ]
        };
        let data = [
            "$ke/events/device/+/data/update".to_string(),
            "$ke/events/device/+/+/data/update".to_string(),
        ];
        let (publish, subscribe) = match role {
            Role::Full => (vec!["#".to_string()], vec!["#".to_string()]),
            Role::Mapper => {
                let mut publish: Vec<String> =
                    ["twin/update", "twin/get", "state/update", "state/get"]
                        .iter()
                        .flat_map(|s| device(s))
                        .collect();
                publish.extend(data.iter().cloned());
                publish.push(format!("{NODE_PREFIX}{node}/membership/get"));
                let mut subscribe: Vec<String> = [
                    "twin/update/delta",
                    "twin/update/document",
                    "twin/update/result",
                    "twin/get/result",
                    "state/update/result",
                    "state/get/result",
                ]
                .iter()
                .flat_map(|s| device(s))
                .collect();
                subscribe.push(format!("{NODE_PREFIX}{node}/membership/get/result"));
                subscribe.push(format!("{NODE_PREFIX}{node}/membership/updated"));
                (publish, subscribe)
            }
            Role::Reader => (
                Vec::new(),
                vec![
                    format!("{DEVICE_PREFIX}#"),
                    "$ke/events/device/#".to_string(),
                    format!("{NODE_PREFIX}{node}/membership/updated"),
                ],
            ),
        };
        RoleAcl {
            role,
            publish,
            subscribe,
        }
    }

    pub fn role(&self) -> Role {
        self.role
    }
}

impl rumqttd::TopicAcl for RoleAcl {
    fn may_publish(&self, topic: &str) -> bool {
        self.publish.iter().any(|p| covers(p, topic))
    }
    fn may_subscribe(&self, filter: &str) -> bool {
        self.subscribe.iter().any(|p| covers(p, filter))
    }
}

/// A client with no permission at all (a username the broker no longer knows).
pub struct Nothing;

impl rumqttd::TopicAcl for Nothing {
    fn may_publish(&self, _: &str) -> bool {
        false
    }
    fn may_subscribe(&self, _: &str) -> bool {
        false
    }
}

/// Whether every topic that `filter` matches is matched by `pattern` (both MQTT filters; a
/// topic name is a filter without wildcards). `$` topics are matched by `#` and `+` here as
/// anywhere else in a pattern: a pattern of `#` means everything.
pub fn covers(pattern: &str, filter: &str) -> bool {
    let mut p = pattern.split('/');
    let mut f = filter.split('/');
    loop {
        match (p.next(), f.next()) {
            (Some("#"), _) => return true,
            (Some("+"), Some(level)) => {
                if level == "#" {
                    return false;
                }
            }
            (Some(a), Some(b)) => {
                if a != b || b == "+" || b == "#" {
                    return false;
                }
            }
            (None, None) => return true,
            _ => return false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rumqttd::TopicAcl;

    #[test]
    fn patterns_cover_filters() {
        assert!(covers("#", "$hw/events/device/a/twin/update"));
        assert!(covers("a/+/c", "a/b/c"));
        assert!(covers("a/+/c", "a/+/c"));
        assert!(!covers("a/+/c", "a/#"));
        assert!(!covers("a/b/c", "a/+/c"));
        assert!(!covers("a/+/c", "a/b/c/d"));
        assert!(!covers("a/+/c", "a/b"));
        assert!(covers("a/#", "a/b/c"));
        assert!(covers("a/#", "a/#"));
        assert!(!covers("a/b", "a/#"));
    }

    #[test]
    fn a_mapper_speaks_for_devices_and_the_twin_answers() {
        let m = RoleAcl::new(Role::Mapper, "n1");
        assert!(m.may_publish("$hw/events/device/default/fan/twin/update"));
        assert!(m.may_publish("$hw/events/device/fan/twin/get"));
        assert!(m.may_publish("$hw/events/device/ns/fan/state/update"));
        assert!(m.may_publish("$ke/events/device/ns/fan/data/update"));
        assert!(m.may_publish("$hw/events/node/n1/membership/get"));
        assert!(!m.may_publish("$hw/events/node/n2/membership/get"));
        assert!(!m.may_publish("$hw/events/device/ns/fan/twin/update/delta"));
        assert!(!m.may_publish("$hw/events/device/ns/fan/twin/get/result"));
        assert!(!m.may_publish("anything/else"));
        assert!(m.may_subscribe("$hw/events/device/+/+/twin/update/delta"));
        assert!(m.may_subscribe("$hw/events/device/+/twin/update/delta"));
        assert!(m.may_subscribe("$hw/events/device/ns/fan/twin/get/result"));
        assert!(m.may_subscribe("$hw/events/node/n1/membership/get/result"));
        assert!(!m.may_subscribe("$hw/events/node/n2/membership/updated"));
        assert!(!m.may_subscribe("$hw/events/device/#"));
        assert!(!m.may_subscribe("#"));
        assert!(!m.may_subscribe("$hw/events/device/+/+/twin/update"));
    }

    #[test]
    fn a_reader_reads_device_topics_only() {
        let r = RoleAcl::new(Role::Reader, "n1");
        assert!(r.may_subscribe("$hw/events/device/#"));
        assert!(r.may_subscribe("$hw/events/device/ns/fan/twin/update/document"));
        assert!(r.may_subscribe("$ke/events/device/+/+/data/update"));
        assert!(!r.may_subscribe("#"));
        assert!(!r.may_subscribe("$hw/events/node/n1/membership/get/result"));
        assert!(!r.may_publish("$hw/events/device/ns/fan/twin/update"));
        assert!(!r.may_publish("$hw/events/device/ns/fan/twin/update/delta"));
    }

    #[test]
    fn users_files_name_roles() {
        let users =
            parse_users("# comment\nm:pw\nr:p:w:reader\nf:x:full\nc:a:b\n", "users").unwrap();
        assert_eq!(users["m"].role, Role::Mapper);
        assert_eq!(users["r"].role, Role::Reader);
        assert_eq!(users["r"].password, "p:w");
        assert_eq!(users["f"].role, Role::Full);
        assert_eq!(users["c"].password, "a:b");
        assert!(parse_users("nopassword\n", "u").is_err());
        assert!(parse_users("a:b\na:c\n", "u").is_err());
        assert!(parse_users(":b\n", "u").is_err());
    }

    #[test]
    fn logins_check_passwords_and_sources_cannot_take_fixed_names() {
        let logins = Logins::new(HashMap::from([(
            "m".to_string(),
            Login {
                password: "pw".into(),
                role: Role::Mapper,
            },
        )]));
        assert_eq!(logins.check("m", "pw"), Some(Role::Mapper));
        assert_eq!(logins.check("m", "pW"), None);
        assert_eq!(logins.check("x", "pw"), None);
        let clash = logins.set_source(
            "pod",
            HashMap::from([
                (
                    "m".to_string(),
                    Login {
                        password: "other".into(),
                        role: Role::Full,
                    },
                ),
                (
                    "p".to_string(),
                    Login {
                        password: "q".into(),
                        role: Role::Reader,
                    },
                ),
            ]),
        );
        assert_eq!(clash, vec!["m".to_string()]);
        assert_eq!(logins.check("m", "other"), None);
        assert_eq!(logins.check("p", "q"), Some(Role::Reader));
        logins.set_source("pod", HashMap::new());
        assert_eq!(logins.check("p", "q"), None);
    }

    #[test]
    fn generated_logins_are_kept_and_private() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let first = ensure_generated(dir.path()).unwrap();
        let again = ensure_generated(dir.path()).unwrap();
        assert_eq!(first, again);
        let file = generated_file(dir.path(), Role::Mapper);
        assert_eq!(
            std::fs::metadata(&file).unwrap().permissions().mode() & 0o777,
            0o600
        );
        let (user, password) = read_login_file(&file).unwrap();
        assert_eq!(user, "edgesite-mapper");
        assert_eq!(first[&user].password, password);
    }
}
