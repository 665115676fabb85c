//! `kubectl logs` on the node: reads the CRI-format files `logs.rs` writes (rotated ones too),
//! with `tailLines`, `sinceSeconds`/`sinceTime`, `timestamps`, `limitBytes`, `previous` and
//! `follow` (which ends when the container stops).

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::{Path as UrlPath, Query, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use serde::Deserialize;
use tokio::io::{AsyncBufReadExt, AsyncSeekExt};
use tokio::sync::mpsc;

use crate::Agent;
use crate::pod_worker::{LABEL_ATTEMPT, LABEL_CONTAINER, LABEL_POD_UID};

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct LogQuery {
    #[serde(default)]
    follow: Option<String>,
    #[serde(default)]
    previous: Option<String>,
    #[serde(default)]
    timestamps: Option<String>,
    #[serde(default)]
    tail_lines: Option<i64>,
    #[serde(default)]
    since_seconds: Option<i64>,
    #[serde(default)]
    since_time: Option<String>,
    #[serde(default)]
    limit_bytes: Option<i64>,
    #[serde(default, rename = "podUID")]
    pod_uid: Option<String>,
}

fn flag(v: &Option<String>) -> bool {
    matches!(v.as_deref(), Some("true" | "1" | "True"))
}

fn bad(status: StatusCode, message: String) -> Response {
    (status, message).into_response()
}

/// One parsed CRI record.
#[derive(Debug, PartialEq)]
pub struct Record<'a> {
    pub time: &'a str,
    pub stream: &'a str,
    pub partial: bool,
    pub content: &'a str,
}

pub fn parse(line: &str) -> Option<Record<'_>> {
    let mut parts = line.splitn(4, ' ');
    let time = parts.next()?;
    let stream = parts.next()?;
    let tag = parts.next()?;
    let content = parts.next().unwrap_or("");
    Some(Record {
        time,
        stream,
        partial: tag == "P",
        content,
    })
}

/// Renders a record as `kubectl logs` shows it.
fn render(r: &Record<'_>, timestamps: bool) -> String {
    let mut out = String::with_capacity(r.content.len() + 40);
    if timestamps {
        out.push_str(r.time);
        out.push(' ');
    }
    out.push_str(r.content);
    if !r.partial {
        out.push('\n');
    }
    out
}

fn attempts(dir: &Path) -> Vec<(u32, PathBuf)> {
    let mut out: Vec<(u32, PathBuf)> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            let n = name.strip_suffix(".log")?.parse().ok()?;
            Some((n, e.path()))
        })
        .collect();
    out.sort();
    out
}

fn pod_log_dir(agent: &Agent, ns: &str, pod: &str, uid: Option<&str>) -> Option<PathBuf> {
    let root = agent.config.logs_dir();
    if let Some(uid) = uid.filter(|u| !u.is_empty()) {
        let dir = crate::logs::pod_dir(&root, ns, pod, uid);
        return dir.exists().then_some(dir);
    }
    let prefix = format!("{ns}_{pod}_");
    std::fs::read_dir(&root)
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with(&prefix))
        .max_by_key(|e| e.metadata().and_then(|m| m.modified()).ok())
        .map(|e| e.path())
}

fn since_cutoff(q: &LogQuery) -> Option<String> {
    if let Some(s) = q.since_seconds {
        let t = chrono::Utc::now() - chrono::Duration::seconds(s);
        return Some(t.to_rfc3339_opts(chrono::SecondsFormat::Nanos, true));
    }
    q.since_time.as_ref().and_then(|t| {
        chrono::DateTime::parse_from_rfc3339(t).ok().map(|t| {
            t.with_timezone(&chrono::Utc)
                .to_rfc3339_opts(chrono::SecondsFormat::Nanos, true)
        })
    })
}

/// Whether the log's container still runs (so `follow` should go on).
async fn still_running(agent: &Agent, uid: &str, container: &str, attempt: u32) -> bool {
    let attempt = attempt.to_string();
    let Ok(found) = agent
        .runtime
        .list_containers(&[
            (LABEL_POD_UID, uid),
            (LABEL_CONTAINER, container),
            (LABEL_ATTEMPT, attempt.as_str()),
        ])
        .await
    else {
        return false;
    };
    for c in found {
        if let Ok(Some(crate::runtime::containerd::TaskState::Running { .. })) =
            agent.runtime.task_state(&c.id).await
        {
            return true;
        }
    }
    false
}

pub async fn container_logs(
    State(agent): State<Arc<Agent>>,
    UrlPath((ns, pod, container)): UrlPath<(String, String, String)>,
    Query(q): Query<LogQuery>,
) -> Response {
    let Some(dir) = pod_log_dir(&agent, &ns, &pod, q.pod_uid.as_deref()) else {
        return bad(
            StatusCode::BAD_REQUEST,
            format!(
                "container \"{container}\" in pod \"{pod}\" is waiting to start: ContainerCreating"
            ),
        );
    };
    let uid = dir
        .file_name()
        .and_then(|n| n.to_string_lossy().rsplit('_').next().map(String::from))
        .unwrap_or_default();
    let runs = attempts(&dir.join(&container));
    let previous = flag(&q.previous);
    let chosen = if previous {
        runs.len().checked_sub(2).map(|i| runs[i].clone())
    } else {
        runs.last().cloned()
    };
    let Some((attempt, file)) = chosen else {
        return bad(
            StatusCode::BAD_REQUEST,
            if previous {
                format!("previous terminated container \"{container}\" in pod \"{pod}\" not found")
            } else {
                format!(
                    "container \"{container}\" in pod \"{pod}\" is waiting to start: ContainerCreating"
                )
            },
        );
    };
    let timestamps = flag(&q.timestamps);
    let follow = flag(&q.follow) && !previous;
    let since = since_cutoff(&q);
    let limit = q.limit_bytes.filter(|l| *l > 0).map(|l| l as u64);
    let tail = q.tail_lines.filter(|t| *t >= 0).map(|t| t as usize);
    let (tx, rx) = mpsc::channel::<Result<Bytes, std::io::Error>>(16);
    tokio::spawn(async move {
        let mut sent: u64 = 0;
        let send = async |text: String, sent: &mut u64| -> bool {
            let mut bytes = text.into_bytes();
            if let Some(limit) = limit {
                if *sent >= limit {
                    return false;
                }
                bytes.truncate((limit - *sent) as usize);
            }
            *sent += bytes.len() as u64;
            tx.send(Ok(Bytes::from(bytes))).await.is_ok() && limit.is_none_or(|l| *sent < l)
        };
        // What is there now: rotated files, then the live one.
        let mut files = crate::logs::rotated_files(&file);
        files.push(file.clone());
        let mut lines: VecDeque<String> = VecDeque::new();
        let mut position = 0u64;
        for f in &files {
            let Ok(text) = tokio::fs::read_to_string(f).await else {
                continue;
            };
            if *f == file {
                position = text.len() as u64;
            }
            for line in text.lines() {
                let Some(r) = parse(line) else { continue };
                if since.as_deref().is_some_and(|s| r.time < s) {
                    continue;
                }
                lines.push_back(render(&r, timestamps));
                if let Some(t) = tail {
                    while lines.len() > t {
                        lines.pop_front();
                    }
                }
            }
        }
        if tail == Some(0) {
            lines.clear();
        }
        for l in lines {
            if !send(l, &mut sent).await {
                return;
            }
        }
        if !follow {
            return;
        }
        let Ok(handle) = tokio::fs::File::open(&file).await else {
            return;
        };
        let mut reader = tokio::io::BufReader::new(handle);
        if reader
            .seek(std::io::SeekFrom::Start(position))
            .await
            .is_err()
        {
            return;
        }
        let mut line = String::new();
        let mut idle = 0u32;
        loop {
            line.clear();
            match reader.read_line(&mut line).await {
                Ok(0) => {}
                Ok(_) if line.ends_with('\n') => {
                    idle = 0;
                    if let Some(r) = parse(line.trim_end_matches('\n'))
                        && !send(render(&r, timestamps), &mut sent).await
                    {
                        return;
                    }
                    continue;
                }
                Ok(_) => {
                    // A record still being written: read it again whole.
                    let back = line.len() as i64;
                    let _ = reader.seek(std::io::SeekFrom::Current(-back)).await;
                }
                Err(_) => return,
            }
            if tx.is_closed() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
            idle += 1;
            // Rotated away: continue in the new file.
            if let (Ok(now), Ok(open)) = (
                tokio::fs::metadata(&file).await,
                reader.get_ref().metadata().await,
            ) {
                use std::os::unix::fs::MetadataExt;
                if now.ino() != open.ino() {
                    let Ok(handle) = tokio::fs::File::open(&file).await else {
                        return;
                    };
                    reader = tokio::io::BufReader::new(handle);
                    continue;
                }
            }
            if idle.is_multiple_of(10) && !still_running(&agent, &uid, &container, attempt).await {
                // Drain what the copier flushed last, then end.
                tokio::time::sleep(Duration::from_millis(200)).await;
                loop {
                    line.clear();
                    match reader.read_line(&mut line).await {
                        Ok(n) if n > 0 && line.ends_with('\n') => {
                            if let Some(r) = parse(line.trim_end_matches('\n'))
                                && !send(render(&r, timestamps), &mut sent).await
                            {
                                return;
                            }
                        }
                        _ => return,
                    }
                }
            }
        }
    });
    let stream = tokio_stream::wrappers::ReceiverStream::new(rx);
    Response::builder()
        .status(StatusCode::OK)
        .header(header::CONTENT_TYPE, "text/plain")
        .body(Body::from_stream(stream))
        .unwrap_or_else(|_| StatusCode::INTERNAL_SERVER_ERROR.into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_render_with_and_without_timestamps() {
        let r = parse("2026-11-22T10:00:00.5Z stdout F hello world").unwrap();
        assert_eq!(r.content, "hello world");
        assert_eq!(render(&r, false), "hello world\n");
        assert_eq!(render(&r, true), "2026-11-22T10:00:00.5Z hello world\n");
        let p = parse("2026-11-22T10:00:00.5Z stdout P part").unwrap();
        assert_eq!(render(&p, false), "part");
        let empty = parse("2026-11-22T10:00:00.5Z stdout F").unwrap();
        assert_eq!(render(&empty, false), "\n");
    }
}
