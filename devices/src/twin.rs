//! The device twin: KubeEdge's MQTT payloads and the rules that change a twin. Pure: no MQTT, no
//! SQL, no API; [`crate::devicetwin`] feeds it messages and carries out what it returns.
//!
//! A twin is one property of one device: the `expected` value (what the cloud or an app wants)
//! and the `actual` value (what the mapper read from the device), each with a version
//! `{cloud, edge}`. Edge updates (MQTT `twin/update`) bump the edge counter; cloud updates (the
//! Device's `spec.properties[].desired`) carry the Device's generation as the cloud counter and
//! are refused when older than what the twin holds, so a stale spec can never flip a value back.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// Keys longer than this are refused with 400 (KubeEdge's limit).
pub const MAX_KEY_BYTES: usize = 128;
/// Values longer than this are refused with 400 (KubeEdge's limit).
pub const MAX_VALUE_BYTES: usize = 512;
/// A device holds at most this many twins: bounds what one client can make the node store.
pub const MAX_TWINS: usize = 1024;

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
pub struct ValueMetadata {
    #[serde(default)]
    pub timestamp: i64,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
pub struct TwinValue {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metadata: Option<ValueMetadata>,
}

impl TwinValue {
    pub fn new(value: &str, timestamp: i64) -> TwinValue {
        TwinValue {
            value: Some(value.to_string()),
            metadata: Some(ValueMetadata { timestamp }),
        }
    }

    pub fn value(&self) -> Option<&str> {
        self.value.as_deref()
    }

    pub fn timestamp(&self) -> i64 {
        self.metadata.as_ref().map(|m| m.timestamp).unwrap_or(0)
    }
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TwinVersion {
    #[serde(default)]
    pub cloud: i64,
    #[serde(default)]
    pub edge: i64,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
pub struct TypeMetadata {
    #[serde(rename = "type", default, skip_serializing_if = "String::is_empty")]
    pub kind: String,
}

/// One twin as it travels in MQTT payloads (and as it is stored).
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
pub struct MsgTwin {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expected: Option<TwinValue>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub actual: Option<TwinValue>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub optional: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metadata: Option<TypeMetadata>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expected_version: Option<TwinVersion>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub actual_version: Option<TwinVersion>,
}

impl MsgTwin {
    fn kind(&self) -> &str {
        self.metadata
            .as_ref()
            .map(|m| m.kind.as_str())
            .unwrap_or("")
    }

    /// The value the mapper should drive the device to, when it differs from what it read.
    pub fn delta(&self) -> Option<&str> {
        let expected = self.expected.as_ref()?.value()?;
        match self.actual.as_ref().and_then(TwinValue::value) {
            Some(actual) if actual == expected => None,
            _ => Some(expected),
        }
    }
}

/// `{event_id, timestamp}`, the head of every KubeEdge message.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
pub struct BaseMessage {
    #[serde(default)]
    pub event_id: String,
    #[serde(default)]
    pub timestamp: i64,
}

/// `twin/update` from a mapper or an app.
#[derive(Deserialize, Debug)]
pub struct TwinUpdate {
    #[serde(flatten)]
    pub base: BaseMessage,
    pub twin: Option<BTreeMap<String, Option<MsgTwin>>>,
}

/// `state/update` from a mapper.
#[derive(Deserialize, Debug)]
pub struct StateUpdate {
    #[serde(flatten)]
    pub base: BaseMessage,
    pub state: Option<String>,
}

/// The result every request gets when it fails (and `code` 200 never travels: success results
/// carry the data instead).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct ErrorResult {
    #[serde(flatten)]
    pub base: BaseMessage,
    pub code: u16,
    pub reason: String,
}

/// Twins of the keys an update changed: the `twin/update/result` of a success.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
pub struct TwinResult {
    #[serde(flatten)]
    pub base: BaseMessage,
    pub twin: BTreeMap<String, MsgTwin>,
}

/// `twin/update/delta`: every twin plus, per key whose expected value differs from the actual
/// one, the expected value.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
pub struct TwinDelta {
    #[serde(flatten)]
    pub base: BaseMessage,
    pub twin: BTreeMap<String, MsgTwin>,
    pub delta: BTreeMap<String, String>,
}

/// `{last, current}` of one key in a `twin/update/document`.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
pub struct TwinDoc {
    pub last: Option<MsgTwin>,
    pub current: Option<MsgTwin>,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
pub struct TwinDocument {
    #[serde(flatten)]
    pub base: BaseMessage,
    pub twin: BTreeMap<String, TwinDoc>,
}

/// Why a request was refused; becomes an [`ErrorResult`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{reason}")]
pub struct Refusal {
    pub code: u16,
    pub reason: String,
}

impl Refusal {
    pub fn bad_request(reason: impl Into<String>) -> Refusal {
        Refusal {
            code: 400,
            reason: reason.into(),
        }
    }
    pub fn not_found(reason: impl Into<String>) -> Refusal {
        Refusal {
            code: 404,
            reason: reason.into(),
        }
    }
    pub fn conflict(reason: impl Into<String>) -> Refusal {
        Refusal {
            code: 409,
            reason: reason.into(),
        }
    }
    pub fn internal(reason: impl Into<String>) -> Refusal {
        Refusal {
            code: 500,
            reason: reason.into(),
        }
    }

    pub fn result(&self, event_id: &str, timestamp: i64) -> ErrorResult {
        ErrorResult {
            base: BaseMessage {
                event_id: event_id.to_string(),
                timestamp,
            },
            code: self.code,
            reason: self.reason.clone(),
        }
    }
}

/// What applying an update changed.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Changes {
    /// The twins of the changed keys after the change (deleted keys are absent).
    pub updated: BTreeMap<String, MsgTwin>,
    /// `{last, current}` per changed key.
    pub document: BTreeMap<String, TwinDoc>,
    /// Whether an actual value changed (so the Device's status must be written).
    pub reported: bool,
    /// Whether an expected value changed (so the mapper must hear a delta).
    pub desired: bool,
}

impl Changes {
    pub fn is_empty(&self) -> bool {
        self.document.is_empty()
    }
}

/// The twins of one device.
pub type Twins = BTreeMap<String, MsgTwin>;

fn check_key(key: &str) -> Result<(), Refusal> {
    if key.is_empty() {
        return Err(Refusal::bad_request("twin key must not be empty"));
    }
    if key.len() > MAX_KEY_BYTES {
        return Err(Refusal::bad_request(format!(
            "twin key {}... is {} bytes; keys are at most {MAX_KEY_BYTES} bytes",
            key.chars().take(16).collect::<String>(),
            key.len()
        )));
    }
    Ok(())
}

fn check_value(key: &str, value: &Option<TwinValue>) -> Result<(), Refusal> {
    if let Some(v) = value.as_ref().and_then(TwinValue::value)
        && v.len() > MAX_VALUE_BYTES
    {
        return Err(Refusal::bad_request(format!(
            "value of twin {key} is {} bytes; values are at most {MAX_VALUE_BYTES} bytes",
            v.len()
        )));
    }
    Ok(())
}

/// Applies a `twin/update` from the edge (a mapper or an app on the node). All or nothing: a
/// refused key leaves every twin as it was.
pub fn apply_edge_update(
    twins: &mut Twins,
    update: &BTreeMap<String, Option<MsgTwin>>,
    now: i64,
) -> Result<Changes, Refusal> {
    if update.is_empty() {
        return Err(Refusal::bad_request("twin update names no twin"));
    }
    let mut added = 0;
    for (key, twin) in update {
        check_key(key)?;
        let Some(twin) = twin else {
            continue;
        };
        check_value(key, &twin.expected)?;
        check_value(key, &twin.actual)?;
        let current = twins.get(key);
        // A version in the request is the version the sender last saw: older than what the twin
        // holds means the sender acts on stale data.
        for (asked, held, which) in [
            (
                twin.expected_version,
                current.and_then(|c| c.expected_version),
                "expected",
            ),
            (
                twin.actual_version,
                current.and_then(|c| c.actual_version),
                "actual",
            ),
        ] {
            if let (Some(asked), Some(held)) = (asked, held)
                && (asked.edge < held.edge || asked.cloud < held.cloud)
            {
                return Err(Refusal::conflict(format!(
                    "version conflict on twin {key}: the {which} value is at version {{cloud: {}, edge: {}}}, the update was made against {{cloud: {}, edge: {}}}",
                    held.cloud, held.edge, asked.cloud, asked.edge
                )));
            }
        }
        if current.is_none() && twin.kind() != "deleted" {
            added += 1;
        }
    }
    if twins.len() + added > MAX_TWINS {
        return Err(Refusal::bad_request(format!(
            "a device holds at most {MAX_TWINS} twins"
        )));
    }

    let mut changes = Changes::default();
    for (key, twin) in update {
        let last = twins.get(key).cloned();
        let deleted = twin.as_ref().is_none_or(|t| t.kind() == "deleted");
        if deleted {
            if let Some(last) = twins.remove(key) {
                changes.reported |= last.actual.is_some();
                changes.desired |= last.expected.is_some();
                changes.document.insert(
                    key.clone(),
                    TwinDoc {
                        last: Some(last),
                        current: None,
                    },
                );
            }
            continue;
        }
        let Some(twin) = twin else { continue };
        let entry = twins.entry(key.clone()).or_default();
        // Versions count every update; `changes` says only whether a value moved (a mapper that
        // reports the same reading every cycle must not cost a status write each time).
        if let Some(expected) = &twin.expected {
            let mut v = expected.clone();
            if v.timestamp() == 0 {
                v.metadata = Some(ValueMetadata { timestamp: now });
            }
            changes.desired |= entry.expected.as_ref().and_then(TwinValue::value) != v.value();
            entry.expected = Some(v);
            let version = entry.expected_version.get_or_insert_default();
            version.edge += 1;
        }
        if let Some(actual) = &twin.actual {
            let mut v = actual.clone();
            if v.timestamp() == 0 {
                v.metadata = Some(ValueMetadata { timestamp: now });
            }
            changes.reported |= entry.actual.as_ref().and_then(TwinValue::value) != v.value();
            entry.actual = Some(v);
            let version = entry.actual_version.get_or_insert_default();
            version.edge += 1;
        }
        if twin.optional.is_some() {
            entry.optional = twin.optional;
        }
        if let Some(meta) = &twin.metadata
            && !meta.kind.is_empty()
        {
            entry.metadata = Some(meta.clone());
        }
        changes.updated.insert(key.clone(), entry.clone());
        changes.document.insert(
            key.clone(),
            TwinDoc {
                last,
                current: Some(entry.clone()),
            },
        );
    }
    Ok(changes)
}

/// One desired value from the Device's spec.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Desired {
    pub value: String,
    /// The model's type of the property (`int`, `float`, ...), kept as the twin's type.
    pub kind: String,
}

/// Applies the desired values of a Device's spec at `generation`. Keys in `previous` (the
/// properties the last applied spec had) that the spec no longer has are deleted. Returns
/// `Err` with a 409 when the spec is older than what the twins already hold (nothing changes).
pub fn apply_cloud_update(
    twins: &mut Twins,
    desired: &BTreeMap<String, Option<Desired>>,
    previous: &[String],
    generation: i64,
    now: i64,
) -> Result<Changes, Refusal> {
    for (key, twin) in twins.iter() {
        if let Some(v) = twin.expected_version
            && v.cloud > generation
            && desired.contains_key(key)
        {
            return Err(Refusal::conflict(format!(
                "stale update of twin {key}: the twin holds the desired value of generation {}, the update is generation {generation}",
                v.cloud
            )));
        }
    }
    let mut changes = Changes::default();
    for (key, want) in desired {
        let last = twins.get(key).cloned();
        let entry = twins.entry(key.clone()).or_default();
        let mut changed = last.is_none();
        if let Some(want) = want {
            if !want.kind.is_empty() && entry.kind() != want.kind {
                entry.metadata = Some(TypeMetadata {
                    kind: want.kind.clone(),
                });
                changed = true;
            }
            let held = entry.expected_version.map(|v| v.cloud).unwrap_or(0);
            // The same generation again (a re-list, a restart) must not undo what an app on the
            // node set since: only a newer spec moves the expected value.
            if generation > held {
                let version = entry.expected_version.get_or_insert_default();
                version.cloud = generation;
                if entry.expected.as_ref().and_then(TwinValue::value) != Some(want.value.as_str()) {
                    entry.expected = Some(TwinValue::new(&want.value, now));
                    changes.desired = true;
                }
                changed = true;
            }
        }
        if changed {
            changes.updated.insert(key.clone(), entry.clone());
            changes.document.insert(
                key.clone(),
                TwinDoc {
                    last,
                    current: Some(entry.clone()),
                },
            );
        }
    }
    for key in previous {
        if !desired.contains_key(key)
            && let Some(last) = twins.remove(key)
        {
            changes.desired |= last.expected.is_some();
            changes.reported |= last.actual.is_some();
            changes.document.insert(
                key.clone(),
                TwinDoc {
                    last: Some(last),
                    current: None,
                },
            );
        }
    }
    Ok(changes)
}

/// The `delta` map of a `twin/update/delta`.
pub fn deltas(twins: &Twins) -> BTreeMap<String, String> {
    twins
        .iter()
        .filter_map(|(k, t)| t.delta().map(|v| (k.clone(), v.to_string())))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn update(json: &str) -> BTreeMap<String, Option<MsgTwin>> {
        serde_json::from_str::<TwinUpdate>(json)
            .unwrap()
            .twin
            .unwrap()
    }

    #[test]
    fn kubeedge_payload_parses_and_round_trips() {
        let json = r#"{"event_id":"e1","timestamp":1690000000000,"twin":{"temperature":{"expected":{"value":"25","metadata":{"timestamp":1690000000000}},"actual":{"value":"23","metadata":{"timestamp":1690000000001}},"optional":false,"metadata":{"type":"updated"},"expected_version":{"cloud":3,"edge":1},"actual_version":{"cloud":0,"edge":7}}}}"#;
        let u: TwinUpdate = serde_json::from_str(json).unwrap();
        assert_eq!(u.base.event_id, "e1");
        let t = u.twin.unwrap()["temperature"].clone().unwrap();
        assert_eq!(t.expected.as_ref().unwrap().value(), Some("25"));
        assert_eq!(t.actual_version, Some(TwinVersion { cloud: 0, edge: 7 }));
        assert_eq!(t.delta(), Some("25"));
        let back = serde_json::to_value(&t).unwrap();
        assert_eq!(back["expected_version"]["cloud"], 3);
        assert_eq!(back["metadata"]["type"], "updated");
    }

    #[test]
    fn edge_updates_bump_the_edge_version() {
        let mut twins = Twins::new();
        let c = apply_edge_update(
            &mut twins,
            &update(r#"{"twin":{"t":{"actual":{"value":"1"}}}}"#),
            10,
        )
        .unwrap();
        assert!(c.reported && !c.desired);
        assert_eq!(twins["t"].actual_version.unwrap().edge, 1);
        assert_eq!(twins["t"].actual.as_ref().unwrap().timestamp(), 10);
        apply_edge_update(
            &mut twins,
            &update(r#"{"twin":{"t":{"actual":{"value":"2"}}}}"#),
            11,
        )
        .unwrap();
        assert_eq!(twins["t"].actual_version.unwrap().edge, 2);
        assert_eq!(twins["t"].actual.as_ref().unwrap().value(), Some("2")); // The same reading again: a new version and timestamp, but no value moved.
        let c = apply_edge_update(
            &mut twins,
            &update(r#"{"twin":{"t":{"actual":{"value":"2"}}}}"#),
            12,
        )
        .unwrap();
        assert!(!c.reported && !c.desired);
        assert_eq!(twins["t"].actual_version.unwrap().edge, 3);
        assert_eq!(twins["t"].actual.as_ref().unwrap().timestamp(), 12);
    }

    #[test]
    fn stale_versions_conflict_and_change_nothing() {
        let mut twins = Twins::new();
        for _ in 0..3 {
            apply_edge_update(
                &mut twins,
                &update(r#"{"twin":{"t":{"actual":{"value":"1"}}}}"#),
                1,
            )
            .unwrap();
        }
        let before = twins.clone();
        let err = apply_edge_update(
            &mut twins,
            &update(r#"{"twin":{"u":{"actual":{"value":"9"}},"t":{"actual":{"value":"2"},"actual_version":{"cloud":0,"edge":1}}}}"#),
            2,
        )
        .unwrap_err();
        assert_eq!(err.code, 409);
        assert_eq!(twins, before);
        // The current version is accepted.
        apply_edge_update(
            &mut twins,
            &update(
                r#"{"twin":{"t":{"actual":{"value":"2"},"actual_version":{"cloud":0,"edge":3}}}}"#,
            ),
            2,
        )
        .unwrap();
        assert_eq!(twins["t"].actual_version.unwrap().edge, 4);
    }

    #[test]
    fn limits_are_400() {
        let mut twins = Twins::new();
        let long_key = "k".repeat(MAX_KEY_BYTES + 1);
        let err = apply_edge_update(
            &mut twins,
            &update(&format!(
                r#"{{"twin":{{"{long_key}":{{"actual":{{"value":"1"}}}}}}}}"#
            )),
            1,
        )
        .unwrap_err();
        assert_eq!(err.code, 400);
        let long_value = "v".repeat(MAX_VALUE_BYTES + 1);
        let err = apply_edge_update(
            &mut twins,
            &update(&format!(
                r#"{{"twin":{{"t":{{"actual":{{"value":"{long_value}"}}}}}}}}"#
            )),
            1,
        )
        .unwrap_err();
        assert_eq!(err.code, 400);
        assert!(twins.is_empty());
        let ok = "v".repeat(MAX_VALUE_BYTES);
        apply_edge_update(
            &mut twins,
            &update(&format!(
                r#"{{"twin":{{"t":{{"actual":{{"value":"{ok}"}}}}}}}}"#
            )),
            1,
        )
        .unwrap();
    }

    #[test]
    fn deleted_removes_a_twin() {
        let mut twins = Twins::new();
        apply_edge_update(
            &mut twins,
            &update(r#"{"twin":{"t":{"actual":{"value":"1"}}}}"#),
            1,
        )
        .unwrap();
        let c = apply_edge_update(
            &mut twins,
            &update(r#"{"twin":{"t":{"metadata":{"type":"deleted"}}}}"#),
            2,
        )
        .unwrap();
        assert!(twins.is_empty());
        assert!(c.document["t"].current.is_none());
    }

    fn desired(pairs: &[(&str, &str)]) -> BTreeMap<String, Option<Desired>> {
        pairs
            .iter()
            .map(|(k, v)| {
                (
                    k.to_string(),
                    Some(Desired {
                        value: v.to_string(),
                        kind: "int".into(),
                    }),
                )
            })
            .collect()
    }

    #[test]
    fn cloud_updates_never_revert() {
        let mut twins = Twins::new();
        let c = apply_cloud_update(&mut twins, &desired(&[("t", "30")]), &[], 1, 5).unwrap();
        assert!(c.desired);
        assert_eq!(deltas(&twins)["t"], "30");
        // An app on the node sets another expected value.
        apply_edge_update(
            &mut twins,
            &update(r#"{"twin":{"t":{"expected":{"value":"31"}}}}"#),
            6,
        )
        .unwrap();
        // The same spec again (a re-list after reconnect) keeps the app's value.
        let c =
            apply_cloud_update(&mut twins, &desired(&[("t", "30")]), &["t".into()], 1, 7).unwrap();
        assert!(c.is_empty());
        assert_eq!(twins["t"].expected.as_ref().unwrap().value(), Some("31"));
        // A newer spec wins.
        apply_cloud_update(&mut twins, &desired(&[("t", "40")]), &["t".into()], 2, 8).unwrap();
        assert_eq!(twins["t"].expected.as_ref().unwrap().value(), Some("40"));
        // An older one is a conflict and changes nothing.
        let before = twins.clone();
        let err = apply_cloud_update(&mut twins, &desired(&[("t", "30")]), &["t".into()], 1, 9)
            .unwrap_err();
        assert_eq!(err.code, 409);
        assert_eq!(twins, before);
        // The mapper reports the value: no delta left.
        apply_edge_update(
            &mut twins,
            &update(r#"{"twin":{"t":{"actual":{"value":"40"}}}}"#),
            10,
        )
        .unwrap();
        assert!(deltas(&twins).is_empty());
        // A property dropped from the spec is deleted.
        let c = apply_cloud_update(&mut twins, &BTreeMap::new(), &["t".into()], 3, 11).unwrap();
        assert!(twins.is_empty() && c.reported);
    }

    proptest::proptest! {
        #[test]
        fn arbitrary_updates_never_panic(json in ".{0,200}") {
            if let Ok(TwinUpdate { twin: Some(u), .. }) = serde_json::from_str::<TwinUpdate>(&json) {
                let mut twins = Twins::new();
                let _ = apply_edge_update(&mut twins, &u, 1);
            }
        }
    }
}
