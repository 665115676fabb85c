//! Source NAT for pod traffic leaving the node: one iptables rule per node (`-s <pod CIDR>
//! ! -d <pod CIDR> -j MASQUERADE`) instead of the bridge plugin's per-pod chains, which cost
//! several iptables calls under the xtables lock for every pod start and stop.

use std::process::Stdio;

fn rule(pod_cidr: &str, node: &str) -> Vec<String> {
    [
        "POSTROUTING",
        "-s",
        pod_cidr,
        "!",
        "-d",
        pod_cidr,
        "-m",
        "comment",
        "--comment",
        &format!("edgesite: pods of {node}"),
        "-j",
        "MASQUERADE",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

async fn iptables(op: &str, rule: &[String]) -> Result<bool, String> {
    let status = tokio::process::Command::new("iptables")
        .args(["-w", "5", "-t", "nat", op])
        .args(rule)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .await
        .map_err(|e| format!("run iptables (install the iptables package): {e}"))?;
    Ok(status.success())
}

/// Adds the node's masquerade rule unless it is there.
pub async fn ensure(pod_cidr: &str, node: &str) -> Result<(), String> {
    let rule = rule(pod_cidr, node);
    if iptables("-C", &rule).await? {
        return Ok(());
    }
    if iptables("-A", &rule).await? {
        Ok(())
    } else {
        Err(format!(
            "iptables could not add the masquerade rule for {pod_cidr}"
        ))
    }
}

/// Keeps the rule in place for the node's pod CIDR as it is assigned or changes (the rule of
/// a previous CIDR goes). It stays when the agent stops: the node's pods run on without it and
/// still need their egress; `uninstall.sh` removes it.
pub async fn run(
    mut pod_cidr: tokio::sync::watch::Receiver<Option<String>>,
    node: String,
    shutdown: tokio_util::sync::CancellationToken,
) {
    let mut current: Option<String> = None;
    loop {
        let cidr = pod_cidr.borrow_and_update().clone();
        if let Some(old) = current.take().filter(|old| Some(old) != cidr.as_ref()) {
            let _ = iptables("-D", &rule(&old, &node)).await;
        }
        if let Some(cidr) = cidr {
            match ensure(&cidr, &node).await {
                Ok(()) => current = Some(cidr),
                Err(e) => tracing::warn!("pod egress: {e}"),
            }
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            changed = pod_cidr.changed() => if changed.is_err() { return },
        }
    }
}
