//! Liveness, readiness and startup probes (exec, httpGet, tcpSocket), with upstream's timing:
//! `initialDelaySeconds`, `periodSeconds` (10), `timeoutSeconds` (1), `successThreshold` (1),
//! `failureThreshold` (3). Liveness and readiness wait until the startup probe succeeded.
//!
//! One prober task per running container reports only changes to the pod worker, which owns the
//! consequences: readiness sets the container's `ready` (and so the pod's Ready condition and
//! its endpoints), a failed liveness or startup probe restarts the container.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::{Container, Probe};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use tokio::sync::mpsc;

use crate::Agent;
use crate::pod_worker::PodMessage;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Liveness,
    Readiness,
    Startup,
}

impl Kind {
    pub fn name(self) -> &'static str {
        match self {
            Kind::Liveness => "Liveness",
            Kind::Readiness => "Readiness",
            Kind::Startup => "Startup",
        }
    }
}

/// What a prober tells its worker.
#[derive(Debug)]
pub struct Outcome {
    pub container_id: String,
    pub kind: Kind,
    /// The probe's settled result (after the thresholds).
    pub success: bool,
    /// A single failed attempt worth an `Unhealthy` event (not yet settled).
    pub message: Option<String>,
}

struct Timing {
    initial_delay: Duration,
    period: Duration,
    timeout: Duration,
    success_threshold: u32,
    failure_threshold: u32,
}

fn timing(p: &Probe) -> Timing {
    let secs =
        |v: Option<i32>, default: i32| Duration::from_secs(v.unwrap_or(default).max(0) as u64);
    Timing {
        initial_delay: secs(p.initial_delay_seconds, 0),
        period: secs(p.period_seconds, 10).max(Duration::from_secs(1)),
        timeout: secs(p.timeout_seconds, 1).max(Duration::from_secs(1)),
        success_threshold: p.success_threshold.unwrap_or(1).max(1) as u32,
        failure_threshold: p.failure_threshold.unwrap_or(3).max(1) as u32,
    }
}

/// One probe attempt: Ok on success, Err with the reason.
pub async fn attempt(
    agent: &Agent,
    container_id: &str,
    probe: &Probe,
    pod_ip: Option<IpAddr>,
    named_ports: &[(String, i32)],
    timeout: Duration,
) -> Result<(), String> {
    if let Some(exec) = &probe.exec {
        let command = exec.command.clone().unwrap_or_default();
        let (code, output) = crate::hooks::exec_in(agent, container_id, &command, timeout).await?;
        return if code == 0 {
            Ok(())
        } else {
            Err(format!(
                "command {command:?} exited with {code}: {}",
                output.trim()
            ))
        };
    }
    if let Some(get) = &probe.http_get {
        let code = crate::hooks::http_get(get, pod_ip, named_ports, timeout).await?;
        return if (200..400).contains(&code) {
            Ok(())
        } else {
            Err(format!("HTTP probe failed with statuscode: {code}"))
        };
    }
    if let Some(tcp) = &probe.tcp_socket {
        let host = tcp
            .host
            .clone()
            .filter(|h| !h.is_empty())
            .or_else(|| pod_ip.map(|i| i.to_string()))
            .ok_or("the pod has no IP yet")?;
        let port = match &tcp.port {
            IntOrString::Int(p) => *p as u16,
            IntOrString::String(name) => named_ports
                .iter()
                .find(|(n, _)| n == name)
                .map(|(_, p)| *p as u16)
                .ok_or_else(|| format!("port {name:?} is not a named port of the container"))?,
        };
        return match tokio::time::timeout(
            timeout,
            tokio::net::TcpStream::connect((host.as_str(), port)),
        )
        .await
        {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(e)) => Err(format!("dial tcp {host}:{port}: {e}")),
            Err(_) => Err(format!("dial tcp {host}:{port}: i/o timeout")),
        };
    }
    if probe.grpc.is_some() {
        return Err("gRPC probes are not supported by this node".into());
    }
    Err("the probe has no exec, httpGet or tcpSocket action".into())
}

/// What is probed: a container of a pod.
#[derive(Clone)]
struct Target {
    agent: Arc<Agent>,
    container_id: String,
    pod_ip: Option<IpAddr>,
    /// Named container ports.
    ports: Vec<(String, i32)>,
}

/// Runs one kind of probe until the task is aborted; `gate` holds it until startup succeeded.
async fn run_one(
    target: Target,
    kind: Kind,
    probe: Probe,
    tx: mpsc::Sender<PodMessage>,
    mut gate: tokio::sync::watch::Receiver<bool>,
) {
    let Target {
        agent,
        container_id,
        pod_ip,
        ports,
    } = target;
    let _ = gate.wait_for(|started| *started).await;
    let t = timing(&probe);
    tokio::time::sleep(t.initial_delay).await;
    let (mut successes, mut failures) = (0u32, 0u32);
    // Readiness starts unready; liveness and startup start "not failed".
    let mut settled: Option<bool> = None;
    loop {
        let result = attempt(&agent, &container_id, &probe, pod_ip, &ports, t.timeout).await;
        let mut message = None;
        match result {
            Ok(()) => {
                successes += 1;
                failures = 0;
            }
            Err(m) => {
                failures += 1;
                successes = 0;
                message = Some(m);
            }
        }
        let now = if successes >= t.success_threshold {
            Some(true)
        } else if failures >= t.failure_threshold {
            Some(false)
        } else {
            settled
        };
        let changed = now.is_some() && now != settled;
        if changed || message.is_some() {
            let outcome = Outcome {
                container_id: container_id.clone(),
                kind,
                success: now.unwrap_or(kind != Kind::Readiness),
                message,
            };
            if tx.send(PodMessage::Probe(outcome)).await.is_err() {
                return;
            }
        }
        if changed {
            settled = now;
            if kind == Kind::Startup && now == Some(true) {
                return;
            }
            if now == Some(false) && kind != Kind::Readiness {
                // The worker restarts the container; this task ends with it.
                failures = 0;
            }
        }
        tokio::time::sleep(t.period).await;
    }
}

/// Starts the probers of a container that just started; abort the handles when it stops.
pub fn start(
    agent: &Arc<Agent>,
    container_id: &str,
    c: &Container,
    pod_ip: Option<IpAddr>,
    tx: &mpsc::Sender<PodMessage>,
) -> Vec<tokio::task::JoinHandle<()>> {
    let ports: Vec<(String, i32)> = c
        .ports
        .iter()
        .flatten()
        .filter_map(|p| Some((p.name.clone()?, p.container_port)))
        .collect();
    let (started_tx, started_rx) = tokio::sync::watch::channel(c.startup_probe.is_none());
    let mut handles = Vec::new();
    let target = Target {
        agent: agent.clone(),
        container_id: container_id.to_string(),
        pod_ip,
        ports,
    };
    if let Some(probe) = c.startup_probe.clone() {
        let (target, tx) = (target.clone(), tx.clone());
        let (gate_tx, gate_rx) = tokio::sync::watch::channel(true);
        handles.push(tokio::spawn(async move {
            // Forward the startup result to the other probers' gate as well.
            let (inner_tx, mut inner_rx) = mpsc::channel::<PodMessage>(4);
            let runner = tokio::spawn(run_one(target, Kind::Startup, probe, inner_tx, gate_rx));
            while let Some(m) = inner_rx.recv().await {
                if let PodMessage::Probe(o) = &m
                    && o.message.is_none()
                    && o.success
                {
                    let _ = started_tx.send(true);
                }
                if tx.send(m).await.is_err() {
                    break;
                }
            }
            drop(gate_tx);
            runner.abort();
        }));
    }
    for (kind, probe) in [
        (Kind::Liveness, c.liveness_probe.clone()),
        (Kind::Readiness, c.readiness_probe.clone()),
    ] {
        if let Some(probe) = probe {
            handles.push(tokio::spawn(run_one(
                target.clone(),
                kind,
                probe,
                tx.clone(),
                started_rx.clone(),
            )));
        }
    }
    handles
}
