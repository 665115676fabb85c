//! The arithmetic of a rollout, as upstream does it: how far `maxSurge` / `maxUnavailable`
//! allow the new ReplicaSet to grow and the old ones to shrink. Pure.

use k8s_openapi::api::apps::v1::{Deployment, ReplicaSet};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

pub fn spec_replicas(rs: &ReplicaSet) -> i32 {
    rs.spec.as_ref().and_then(|s| s.replicas).unwrap_or(0)
}

pub fn available(rs: &ReplicaSet) -> i32 {
    rs.status
        .as_ref()
        .and_then(|s| s.available_replicas)
        .unwrap_or(0)
}

pub fn desired(d: &Deployment) -> i32 {
    d.spec.as_ref().and_then(|s| s.replicas).unwrap_or(1)
}

pub fn is_rolling(d: &Deployment) -> bool {
    d.spec
        .as_ref()
        .and_then(|s| s.strategy.as_ref())
        .and_then(|s| s.type_.as_deref())
        .unwrap_or("RollingUpdate")
        == "RollingUpdate"
}

fn scaled(value: Option<&IntOrString>, total: i32, round_up: bool, default: i32) -> i32 {
    match value {
        None => default,
        Some(IntOrString::Int(i)) => *i,
        Some(IntOrString::String(s)) => {
            let pct: i64 = s.trim_end_matches('%').parse().unwrap_or(0);
            let v = pct * i64::from(total);
            (if round_up { (v + 99) / 100 } else { v / 100 }) as i32
        }
    }
}

/// (maxSurge, maxUnavailable) as numbers; never both zero (upstream then allows one unavailable).
pub fn fenceposts(d: &Deployment) -> (i32, i32) {
    if !is_rolling(d) {
        return (0, 0);
    }
    let replicas = desired(d);
    let ru = d
        .spec
        .as_ref()
        .and_then(|s| s.strategy.as_ref())
        .and_then(|s| s.rolling_update.as_ref());
    let surge = scaled(
        ru.and_then(|r| r.max_surge.as_ref()),
        replicas,
        true,
        (replicas * 25 + 99) / 100,
    );
    let unavailable = scaled(
        ru.and_then(|r| r.max_unavailable.as_ref()),
        replicas,
        false,
        replicas * 25 / 100,
    );
    if surge == 0 && unavailable == 0 {
        (0, 1)
    } else {
        (surge, unavailable)
    }
}

/// Upstream's `MaxUnavailable`: zero for Recreate or zero replicas, at most the replicas.
pub fn max_unavailable(d: &Deployment) -> i32 {
    if !is_rolling(d) || desired(d) == 0 {
        return 0;
    }
    fenceposts(d).1.min(desired(d))
}

/// How many replicas the new ReplicaSet should have now.
pub fn new_rs_replicas(d: &Deployment, all: &[&ReplicaSet], new_current: i32) -> i32 {
    let replicas = desired(d);
    if !is_rolling(d) {
        return replicas;
    }
    if new_current >= replicas {
        return replicas;
    }
    let (surge, _) = fenceposts(d);
    let current: i32 = all.iter().map(|rs| spec_replicas(rs)).sum();
    let max_total = replicas + surge;
    if current >= max_total {
        return new_current;
    }
    let up = (max_total - current).min(replicas - new_current);
    new_current + up
}

/// How many old replicas may go now: (scale-down of unhealthy ones is handled by the caller).
/// Upstream's `maxScaledDown`: all - minAvailable - unavailable in the new ReplicaSet.
pub fn max_scaled_down(d: &Deployment, all: &[&ReplicaSet], new: Option<&ReplicaSet>) -> i32 {
    let all_pods: i32 = all.iter().map(|rs| spec_replicas(rs)).sum();
    let min_available = desired(d) - max_unavailable(d);
    let new_unavailable = new.map_or(0, |n| spec_replicas(n) - available(n));
    all_pods - min_available - new_unavailable
}

/// Available replicas above the minimum, which healthy old replicas may be scaled down by.
pub fn available_above_minimum(d: &Deployment, all: &[&ReplicaSet]) -> i32 {
    let available: i32 = all.iter().map(|rs| available(rs)).sum();
    available - (desired(d) - max_unavailable(d))
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn deployment(
        replicas: i32,
        surge: serde_json::Value,
        unavailable: serde_json::Value,
    ) -> Deployment {
        serde_json::from_value(json!({
            "metadata": {"name": "d"},
            "spec": {"replicas": replicas, "selector": {}, "template": {},
                "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": surge, "maxUnavailable": unavailable}}}
        }))
        .unwrap()
    }

    fn rs(replicas: i32, available: i32) -> ReplicaSet {
        serde_json::from_value(json!({"spec": {"replicas": replicas, "selector": {}}, "status": {"replicas": replicas, "availableReplicas": available}})).unwrap()
    }

    #[test]
    fn percentages_round_like_upstream() {
        assert_eq!(
            fenceposts(&deployment(10, json!("25%"), json!("25%"))),
            (3, 2)
        );
        assert_eq!(fenceposts(&deployment(3, json!(0), json!(0))), (0, 1));
        assert_eq!(fenceposts(&deployment(4, json!(1), json!("0%"))), (1, 0));
    }

    #[test]
    fn new_replica_set_grows_within_surge() {
        let d = deployment(3, json!(1), json!(0));
        let old = rs(3, 3);
        let new = rs(0, 0);
        assert_eq!(new_rs_replicas(&d, &[&old, &new], 0), 1, "3 old + 1 surge");
        let old = rs(2, 2);
        let new = rs(1, 1);
        assert_eq!(new_rs_replicas(&d, &[&old, &new], 1), 2);
        let new = rs(3, 3);
        assert_eq!(new_rs_replicas(&d, &[&new], 3), 3);
    }

    #[test]
    fn old_replica_sets_shrink_only_while_enough_are_available() {
        let d = deployment(3, json!(1), json!(0));
        let old = rs(3, 3);
        let new = rs(1, 0);
        assert_eq!(
            max_scaled_down(&d, &[&old, &new], Some(&new)),
            0,
            "new pod not available yet"
        );
        let new = rs(1, 1);
        assert_eq!(max_scaled_down(&d, &[&old, &new], Some(&new)), 1);
        assert_eq!(available_above_minimum(&d, &[&old, &new]), 1);
    }
}
