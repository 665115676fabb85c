//! Lifecycle hooks (postStart, preStop) and the exec/HTTP/TCP actions probes share: run a
//! command in the container through containerd, or send an HTTP GET to the pod.

use std::net::IpAddr;
use std::time::Duration;

use k8s_openapi::api::core::v1::{HTTPGetAction, LifecycleHandler};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::Agent;

/// Runs `command` in container `id`; returns its exit code and the first 4 KiB of output.
pub async fn exec_in(
    agent: &Agent,
    id: &str,
    command: &[String],
    timeout: Duration,
) -> Result<(u32, String), String> {
    let rt = &agent.runtime;
    let exec_id = format!("exec-{}", uuid::Uuid::new_v4().simple());
    let dir = agent.config.root.join("exec");
    let (out, err) = crate::logs::make_fifos(&dir, &exec_id).map_err(|e| e.to_string())?;
    let cleanup = |out: std::path::PathBuf, err: std::path::PathBuf| {
        let _ = std::fs::remove_file(out);
        let _ = std::fs::remove_file(err);
    };
    let mut reader = match tokio::net::unix::pipe::OpenOptions::new()
        .read_write(true)
        .open_receiver(&out)
    {
        Ok(r) => r,
        Err(e) => {
            cleanup(out, err);
            return Err(e.to_string());
        }
    };
    let process = serde_json::json!({
        "args": command,
        "cwd": "/",
        "env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"],
        "user": {"uid": 0, "gid": 0},
        "terminal": false,
    });
    // stderr goes to the same pipe.
    let result = async {
        rt.exec(
            id,
            &exec_id,
            serde_json::to_vec(&process).unwrap_or_default(),
            &out,
            &out,
        )
        .await
        .map_err(|e| e.to_string())?;
        let wait = rt.wait_exec(id, &exec_id);
        match tokio::time::timeout(timeout, wait).await {
            Ok(r) => r.map_err(|e| e.to_string()),
            Err(_) => {
                let _ = rt.kill_exec(id, &exec_id, libc::SIGKILL).await;
                Err(format!("command timed out after {}s", timeout.as_secs()))
            }
        }
    }
    .await;
    // Deleting the process waits for the shim to finish copying its output into the FIFO,
    // which can trail the exit under load; then what it wrote is all there to read.
    let _ = rt.delete_exec(id, &exec_id).await;
    let mut output = vec![0u8; 4096];
    let n = tokio::time::timeout(Duration::from_millis(50), reader.read(&mut output))
        .await
        .ok()
        .and_then(|r| r.ok())
        .unwrap_or(0);
    output.truncate(n);
    cleanup(out, err);
    result.map(|code| (code, String::from_utf8_lossy(&output).into_owned()))
}

fn port_of(port: &IntOrString, c_ports: &[(String, i32)]) -> Result<u16, String> {
    match port {
        IntOrString::Int(p) => Ok(*p as u16),
        IntOrString::String(name) => c_ports
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, p)| *p as u16)
            .or_else(|| name.parse().ok())
            .ok_or_else(|| format!("port {name:?} is not a named port of the container")),
    }
}

/// An HTTP GET to the pod (httpGet hooks and probes); returns the status code.
pub async fn http_get(
    action: &HTTPGetAction,
    pod_ip: Option<IpAddr>,
    named_ports: &[(String, i32)],
    timeout: Duration,
) -> Result<u16, String> {
    let host = action
        .host
        .clone()
        .filter(|h| !h.is_empty())
        .or_else(|| pod_ip.map(|i| i.to_string()))
        .ok_or("the pod has no IP yet")?;
    let port = port_of(&action.port, named_ports)?;
    let path = action.path.clone().unwrap_or_else(|| "/".into());
    let scheme = action.scheme.clone().unwrap_or_else(|| "HTTP".into());
    if scheme.eq_ignore_ascii_case("HTTPS") {
        return Err("HTTPS probes and hooks are not supported yet".into());
    }
    let work = async {
        let mut stream = tokio::net::TcpStream::connect((host.as_str(), port))
            .await
            .map_err(|e| format!("dial tcp {host}:{port}: {e}"))?;
        let mut request = format!(
            "GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nUser-Agent: kube-probe/1.33\r\nAccept: */*\r\nConnection: close\r\n"
        );
        for h in action.http_headers.iter().flatten() {
            request.push_str(&format!("{}: {}\r\n", h.name, h.value));
        }
        request.push_str("\r\n");
        stream
            .write_all(request.as_bytes())
            .await
            .map_err(|e| e.to_string())?;
        let mut head = vec![0u8; 1024];
        let mut filled = 0;
        while filled < 12 {
            let n = stream
                .read(&mut head[filled..])
                .await
                .map_err(|e| e.to_string())?;
            if n == 0 {
                break;
            }
            filled += n;
        }
        let line = String::from_utf8_lossy(&head[..filled]).into_owned();
        line.split_whitespace()
            .nth(1)
            .and_then(|c| c.parse::<u16>().ok())
            .ok_or_else(|| format!("not an HTTP response from {host}:{port}"))
    };
    tokio::time::timeout(timeout, work)
        .await
        .map_err(|_| format!("Get \"http://{host}:{port}{path}\": context deadline exceeded"))?
}

/// Runs a lifecycle hook; Err carries the message for the event.
pub async fn run(
    agent: &Agent,
    id: &str,
    handler: &LifecycleHandler,
    pod_ip: Option<IpAddr>,
    timeout: Duration,
) -> Result<(), String> {
    if let Some(exec) = &handler.exec {
        let command = exec.command.clone().unwrap_or_default();
        let (code, output) = exec_in(agent, id, &command, timeout).await?;
        if code != 0 {
            return Err(format!(
                "command '{}' exited with {code}: {output}",
                command.join(" ")
            ));
        }
        return Ok(());
    }
    if let Some(get) = &handler.http_get {
        let code = http_get(get, pod_ip, &[], timeout).await?;
        if !(200..400).contains(&code) {
            return Err(format!("HTTP hook returned status {code}"));
        }
        return Ok(());
    }
    if let Some(sleep) = &handler.sleep {
        tokio::time::sleep(Duration::from_secs(sleep.seconds.max(0) as u64).min(timeout)).await;
        return Ok(());
    }
    Err("the hook has no exec, httpGet or sleep action".into())
}
