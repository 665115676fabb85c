//! What a pod worker should do next, decided from the pod's spec and what it observed of its
//! containers (the kubelet's `computePodActions`), and the pod's phase. Pure: the worker
//! (`pod_worker.rs`) observes containerd and carries the plan out.

use k8s_openapi::api::core::v1::PodSpec;

/// Which list of the pod a container comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    Init,
    Main,
    /// Started once, never restarted; may join its target's PID namespace.
    Ephemeral,
}

/// What the worker knows of one container.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Observed {
    /// Never created on this node.
    Absent,
    /// Waiting to (re)start; `ran` when it ran before (a restart in back-off), `starts` how
    /// many times it was started.
    Waiting {
        ran: bool,
        starts: u32,
    },
    Running,
    Exited {
        code: i32,
    },
}

/// The pod's phase, as the kubelet computes it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    Pending,
    Running,
    Succeeded,
    Failed,
}

impl Phase {
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Pending => "Pending",
            Phase::Running => "Running",
            Phase::Succeeded => "Succeeded",
            Phase::Failed => "Failed",
        }
    }

    pub fn finished(self) -> bool {
        matches!(self, Phase::Succeeded | Phase::Failed)
    }
}

/// `restartPolicy` (Always when unset).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RestartPolicy {
    Always,
    OnFailure,
    Never,
}

impl RestartPolicy {
    pub fn of(spec: &PodSpec) -> Self {
        match spec.restart_policy.as_deref() {
            Some("Never") => RestartPolicy::Never,
            Some("OnFailure") => RestartPolicy::OnFailure,
            _ => RestartPolicy::Always,
        }
    }
}

fn sidecar(c: &k8s_openapi::api::core::v1::Container) -> bool {
    c.restart_policy.as_deref() == Some("Always")
}

/// The containers to start now (each is started unless its back-off still runs), in order:
/// ephemeral containers never started yet (also while the pod initializes, as the kubelet);
/// then the first init container not done, alone (init containers run one at a time, sidecars
/// stay running); once all are done, the app containers the restart policy wants running.
pub fn starts(
    spec: &PodSpec,
    ephemeral: &[String],
    observed: impl Fn(&str) -> Observed,
) -> Vec<(String, Role)> {
    let policy = RestartPolicy::of(spec);
    let mut out: Vec<(String, Role)> = ephemeral
        .iter()
        .filter(|name| {
            matches!(
                observed(name),
                Observed::Absent | Observed::Waiting { starts: 0, .. }
            )
        })
        .map(|name| (name.clone(), Role::Ephemeral))
        .collect();
    for c in spec.init_containers.iter().flatten() {
        let sidecar = sidecar(c);
        match observed(&c.name) {
            Observed::Exited { code: 0 } if !sidecar => continue,
            Observed::Running if sidecar => continue,
            Observed::Running => return out,
            Observed::Exited { .. } if policy == RestartPolicy::Never && !sidecar => return out,
            _ => {
                out.push((c.name.clone(), Role::Init));
                return out;
            }
        }
    }
    for c in &spec.containers {
        let due = match observed(&c.name) {
            Observed::Absent | Observed::Waiting { .. } => true,
            Observed::Running => false,
            Observed::Exited { code } => match policy {
                RestartPolicy::Never => false,
                RestartPolicy::OnFailure => code != 0,
                RestartPolicy::Always => true,
            },
        };
        if due {
            out.push((c.name.clone(), Role::Main));
        }
    }
    out
}

/// The pod's phase from its init and app containers (ephemeral containers do not count).
pub fn phase(spec: &PodSpec, observed: impl Fn(&str) -> Observed) -> Phase {
    let policy = RestartPolicy::of(spec);
    for c in spec.init_containers.iter().flatten() {
        let sidecar = sidecar(c);
        match observed(&c.name) {
            Observed::Exited { code: 0 } if !sidecar => {}
            Observed::Running if sidecar => {}
            Observed::Exited { code } if code != 0 && policy == RestartPolicy::Never => {
                return Phase::Failed;
            }
            _ => return Phase::Pending,
        }
    }
    let (mut running, mut waiting, mut succeeded, mut failed) = (0, 0, 0, 0);
    for c in &spec.containers {
        match observed(&c.name) {
            Observed::Running => running += 1,
            Observed::Exited { code: 0 } => succeeded += 1,
            Observed::Exited { .. } => failed += 1,
            // Restarting after a run: counts as running for the phase.
            Observed::Waiting { ran: true, .. } => running += 1,
            _ => waiting += 1,
        }
    }
    if waiting > 0 {
        return Phase::Pending;
    }
    if running > 0 {
        return Phase::Running;
    }
    match policy {
        RestartPolicy::Always => Phase::Running,
        RestartPolicy::OnFailure if failed > 0 => Phase::Running,
        RestartPolicy::Never if failed > 0 => Phase::Failed,
        _ if succeeded + failed > 0 && failed == 0 => Phase::Succeeded,
        _ => Phase::Failed,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use std::collections::HashMap;

    fn spec(v: serde_json::Value) -> PodSpec {
        serde_json::from_value(v).unwrap()
    }

    fn world(states: &[(&str, Observed)]) -> impl Fn(&str) -> Observed {
        let map: HashMap<String, Observed> =
            states.iter().map(|(n, o)| (n.to_string(), *o)).collect();
        move |name: &str| map.get(name).copied().unwrap_or(Observed::Absent)
    }

    fn names(plan: Vec<(String, Role)>) -> Vec<String> {
        plan.into_iter()
            .map(|(n, r)| format!("{n}:{r:?}"))
            .collect()
    }

    #[test]
    fn init_containers_run_one_at_a_time_then_the_app_containers() {
        let s = spec(json!({"initContainers": [{"name": "i1"}, {"name": "i2"}],
            "containers": [{"name": "a"}, {"name": "b"}]}));
        assert_eq!(names(starts(&s, &[], world(&[]))), ["i1:Init"]);
        assert_eq!(
            names(starts(&s, &[], world(&[("i1", Observed::Running)]))),
            Vec::<String>::new()
        );
        assert_eq!(
            names(starts(
                &s,
                &[],
                world(&[("i1", Observed::Exited { code: 0 })])
            )),
            ["i2:Init"]
        );
        // A failed init container is started again (its back-off applies), unless Never.
        assert_eq!(
            names(starts(
                &s,
                &[],
                world(&[("i1", Observed::Exited { code: 1 })])
            )),
            ["i1:Init"]
        );
        let done = world(&[
            ("i1", Observed::Exited { code: 0 }),
            ("i2", Observed::Exited { code: 0 }),
            ("b", Observed::Running),
        ]);
        assert_eq!(names(starts(&s, &[], &done)), ["a:Main"]);
        assert_eq!(phase(&s, &done), Phase::Pending);
        let mut never = s.clone();
        never.restart_policy = Some("Never".into());
        let failed = world(&[("i1", Observed::Exited { code: 1 })]);
        assert!(starts(&never, &[], &failed).is_empty());
        assert_eq!(phase(&never, &failed), Phase::Failed);
    }

    #[test]
    fn sidecars_keep_running_beside_the_app() {
        let s = spec(
            json!({"initContainers": [{"name": "proxy", "restartPolicy": "Always"}],
            "containers": [{"name": "a"}]}),
        );
        assert_eq!(names(starts(&s, &[], world(&[]))), ["proxy:Init"]);
        let up = world(&[("proxy", Observed::Running)]);
        assert_eq!(names(starts(&s, &[], &up)), ["a:Main"]);
        // A sidecar that exited is started again, even after exit code 0.
        let exited = world(&[
            ("proxy", Observed::Exited { code: 0 }),
            ("a", Observed::Running),
        ]);
        assert_eq!(names(starts(&s, &[], &exited)), ["proxy:Init"]);
    }

    #[test]
    fn restart_policies_decide_which_exited_containers_start_again() {
        let states = world(&[
            ("ok", Observed::Exited { code: 0 }),
            ("bad", Observed::Exited { code: 2 }),
        ]);
        let pod = |policy: &str| {
            spec(json!({"restartPolicy": policy, "containers": [{"name": "ok"}, {"name": "bad"}]}))
        };
        assert_eq!(
            names(starts(&pod("Always"), &[], &states)),
            ["ok:Main", "bad:Main"]
        );
        assert_eq!(names(starts(&pod("OnFailure"), &[], &states)), ["bad:Main"]);
        assert!(starts(&pod("Never"), &[], &states).is_empty());
        assert_eq!(phase(&pod("Always"), &states), Phase::Running);
        assert_eq!(phase(&pod("OnFailure"), &states), Phase::Running);
        assert_eq!(phase(&pod("Never"), &states), Phase::Failed);
        let all_ok = world(&[
            ("ok", Observed::Exited { code: 0 }),
            ("bad", Observed::Exited { code: 0 }),
        ]);
        assert_eq!(phase(&pod("OnFailure"), &all_ok), Phase::Succeeded);
        // In back-off after a run it still counts as running.
        let restarting = world(&[
            ("ok", Observed::Running),
            (
                "bad",
                Observed::Waiting {
                    ran: true,
                    starts: 3,
                },
            ),
        ]);
        assert_eq!(phase(&pod("Always"), &restarting), Phase::Running);
        assert_eq!(phase(&pod("Always"), world(&[])), Phase::Pending);
    }

    #[test]
    fn ephemeral_containers_start_once_even_while_the_pod_initializes() {
        let s = spec(json!({"initContainers": [{"name": "i"}], "containers": [{"name": "a"}]}));
        let eph = ["dbg".to_string(), "done".to_string(), "pulling".to_string()];
        let states = world(&[
            ("i", Observed::Running),
            ("done", Observed::Exited { code: 0 }),
            (
                "pulling",
                Observed::Waiting {
                    ran: false,
                    starts: 0,
                },
            ),
        ]);
        assert_eq!(
            names(starts(&s, &eph, &states)),
            ["dbg:Ephemeral", "pulling:Ephemeral"]
        );
        // Started once (even if that start failed): never again.
        let once = world(&[
            ("i", Observed::Exited { code: 0 }),
            ("a", Observed::Running),
            (
                "dbg",
                Observed::Waiting {
                    ran: false,
                    starts: 1,
                },
            ),
            ("done", Observed::Exited { code: 1 }),
            ("pulling", Observed::Running),
        ]);
        assert!(starts(&s, &eph, &once).is_empty());
        // They do not change the phase.
        assert_eq!(phase(&s, &once), Phase::Running);
    }
}
