//! Container logs: the container's stdout and stderr arrive on two FIFOs (containerd's shim
//! writes them); a copier task per container turns them into CRI-format lines
//! (`<RFC 3339 nano time> <stream> <F|P> <text>`, the format every Kubernetes log tool reads)
//! in `<logs>/<namespace>_<pod>_<uid>/<container>/<restart>.log`, rotated by size.

use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::unix::pipe;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// A line longer than this is split into partial (`P`) records, as the CRI does.
const MAX_LINE: usize = 16 * 1024;

/// Rotation settings (kubelet's containerLogMaxSize / containerLogMaxFiles).
#[derive(Clone, Copy, Debug)]
pub struct Rotation {
    pub max_size: u64,
    pub max_files: usize,
}

impl Default for Rotation {
    fn default() -> Self {
        Rotation {
            max_size: 10 << 20,
            max_files: 5,
        }
    }
}

/// The directory of one pod's logs.
pub fn pod_dir(root: &Path, namespace: &str, name: &str, uid: &str) -> PathBuf {
    root.join(format!("{namespace}_{name}_{uid}"))
}

/// The log file of one run of a container.
pub fn container_file(pod_dir: &Path, container: &str, restart: u32) -> PathBuf {
    pod_dir.join(container).join(format!("{restart}.log"))
}

/// Creates the two FIFOs a task writes to.
pub fn make_fifos(dir: &Path, id: &str) -> std::io::Result<(PathBuf, PathBuf)> {
    std::fs::create_dir_all(dir)?;
    let out = dir.join(format!("{id}-stdout"));
    let err = dir.join(format!("{id}-stderr"));
    for p in [&out, &err] {
        if !p.exists() {
            nix::unistd::mkfifo(p.as_path(), nix::sys::stat::Mode::from_bits_truncate(0o600))
                .map_err(|e| std::io::Error::other(format!("mkfifo {}: {e}", p.display())))?;
        }
    }
    Ok((out, err))
}

/// A running copier; `finish` drains what the container wrote and stops it.
pub struct Copier {
    stop: CancellationToken,
    done: tokio::task::JoinHandle<()>,
}

impl Copier {
    /// Opens both FIFOs (read-write, so opening never blocks and the writer may come and go)
    /// and starts copying into `file`.
    /// `tap` also gets every chunk as read (1 stdout, 2 stderr), for `kubectl attach`.
    pub fn start(
        stdout: &Path,
        stderr: &Path,
        file: PathBuf,
        rotation: Rotation,
        tap: Option<tokio::sync::broadcast::Sender<(u8, bytes::Bytes)>>,
    ) -> std::io::Result<Copier> {
        let out = pipe::OpenOptions::new()
            .read_write(true)
            .open_receiver(stdout)?;
        let err = pipe::OpenOptions::new()
            .read_write(true)
            .open_receiver(stderr)?;
        let stop = CancellationToken::new();
        let (tx, rx) = mpsc::channel::<(&'static str, Vec<u8>)>(64);
        let readers = [
            tokio::spawn(read_stream(
                out,
                "stdout",
                tx.clone(),
                stop.clone(),
                tap.clone(),
            )),
            tokio::spawn(read_stream(err, "stderr", tx, stop.clone(), tap)),
        ];
        let done = tokio::spawn(async move {
            write_lines(rx, file, rotation).await;
            for r in readers {
                let _ = r.await;
            }
        });
        Ok(Copier { stop, done })
    }

    /// Copies what is still buffered in the FIFOs, then ends.
    pub async fn finish(self) {
        self.stop.cancel();
        let _ = tokio::time::timeout(Duration::from_secs(5), self.done).await;
    }
}

async fn read_stream(
    mut rx: pipe::Receiver,
    stream: &'static str,
    tx: mpsc::Sender<(&'static str, Vec<u8>)>,
    stop: CancellationToken,
    tap: Option<tokio::sync::broadcast::Sender<(u8, bytes::Bytes)>>,
) {
    let channel = if stream == "stdout" { 1 } else { 2 };
    let mut pending: Vec<u8> = Vec::new();
    let mut buf = vec![0u8; 32 * 1024];
    loop {
        let n = tokio::select! {
            r = rx.read(&mut buf) => match r { Ok(0) | Err(_) => break, Ok(n) => n },
            _ = stop.cancelled() => {
                // Drain: whatever is already in the pipe, then stop.
                match tokio::time::timeout(Duration::from_millis(100), rx.read(&mut buf)).await {
                    Ok(Ok(n)) if n > 0 => n,
                    _ => break,
                }
            }
        };
        if let Some(tap) = &tap
            && tap.receiver_count() > 0
        {
            let _ = tap.send((channel, bytes::Bytes::copy_from_slice(&buf[..n])));
        }
        pending.extend_from_slice(&buf[..n]);
        while let Some(pos) = pending.iter().position(|b| *b == b'\n') {
            let line: Vec<u8> = pending.drain(..=pos).collect();
            if tx.send((stream, line)).await.is_err() {
                return;
            }
        }
        while pending.len() >= MAX_LINE {
            let part: Vec<u8> = pending.drain(..MAX_LINE).collect();
            if tx.send((stream, part)).await.is_err() {
                return;
            }
        }
    }
    if !pending.is_empty() {
        let _ = tx.send((stream, pending)).await;
    }
}

/// One CRI log record for `chunk` (with its newline when the line is complete).
pub fn format_record(time: chrono::DateTime<chrono::Utc>, stream: &str, chunk: &[u8]) -> Vec<u8> {
    let (body, tag) = match chunk.strip_suffix(b"\n") {
        Some(body) => (body, "F"),
        None => (chunk, "P"),
    };
    let mut out = Vec::with_capacity(body.len() + 48);
    out.extend_from_slice(
        time.to_rfc3339_opts(chrono::SecondsFormat::Nanos, true)
            .as_bytes(),
    );
    out.push(b' ');
    out.extend_from_slice(stream.as_bytes());
    out.push(b' ');
    out.extend_from_slice(tag.as_bytes());
    out.push(b' ');
    out.extend_from_slice(body);
    out.push(b'\n');
    out
}

async fn open_append(path: &Path) -> std::io::Result<(tokio::fs::File, u64)> {
    if let Some(dir) = path.parent() {
        tokio::fs::create_dir_all(dir).await?;
    }
    let f = tokio::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .await?;
    let size = f.metadata().await.map(|m| m.len()).unwrap_or(0);
    Ok((f, size))
}

async fn write_lines(
    mut rx: mpsc::Receiver<(&'static str, Vec<u8>)>,
    path: PathBuf,
    rotation: Rotation,
) {
    let (mut file, mut size) = match open_append(&path).await {
        Ok(x) => x,
        Err(e) => {
            tracing::warn!(path = %path.display(), "cannot write container log: {e}");
            // Keep draining so the container never blocks on a full pipe.
            while rx.recv().await.is_some() {}
            return;
        }
    };
    while let Some((stream, chunk)) = rx.recv().await {
        let record = format_record(chrono::Utc::now(), stream, &chunk);
        if size + record.len() as u64 > rotation.max_size && size > 0 {
            let _ = file.flush().await;
            rotate(&path, rotation.max_files).await;
            match open_append(&path).await {
                Ok((f, s)) => {
                    file = f;
                    size = s;
                }
                Err(_) => continue,
            }
        }
        if file.write_all(&record).await.is_ok() {
            size += record.len() as u64;
        }
    }
    let _ = file.flush().await;
}

/// `0.log` -> `0.log.<timestamp>`, keeping at most `max_files` files in all.
async fn rotate(path: &Path, max_files: usize) {
    let stamp = chrono::Utc::now().format("%Y%m%d-%H%M%S%.f");
    let rotated = PathBuf::from(format!("{}.{stamp}", path.display()));
    let _ = tokio::fs::rename(path, &rotated).await;
    let mut old = rotated_files(path);
    while old.len() + 1 > max_files.max(1) {
        let oldest = old.remove(0);
        let _ = tokio::fs::remove_file(oldest).await;
    }
}

/// The rotated files of a log, oldest first.
pub fn rotated_files(path: &Path) -> Vec<PathBuf> {
    let Some(dir) = path.parent() else {
        return vec![];
    };
    let prefix = format!(
        "{}.",
        path.file_name().unwrap_or_default().to_string_lossy()
    );
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with(&prefix))
        .map(|e| e.path())
        .collect();
    files.sort();
    files
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_are_cri_formatted() {
        let t = chrono::DateTime::parse_from_rfc3339("2026-11-22T10:00:00.5Z")
            .unwrap()
            .with_timezone(&chrono::Utc);
        assert_eq!(
            format_record(t, "stdout", b"hello\n"),
            b"2026-11-22T10:00:00.500000000Z stdout F hello\n"
        );
        assert_eq!(
            format_record(t, "stderr", b"part"),
            b"2026-11-22T10:00:00.500000000Z stderr P part\n"
        );
    }
}
