//! The containerd client: a thin, typed layer over containerd's gRPC services (containers,
//! tasks, content, images, snapshots, diff, leases, events) in one containerd namespace.
//!
//! Everything the node agent asks of containerd goes through [`Containerd`]; nothing else in
//! EdgeSite opens the socket. Errors keep containerd's gRPC status so callers can tell
//! "not found" from a broken daemon.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use containerd_client::services::v1 as api;
use containerd_client::services::v1::snapshots as snap;
use containerd_client::tonic::{Code, Request, Status, transport::Channel};
use containerd_client::types::{Descriptor, Mount};
use prost_types::Any;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

/// The snapshotter every image is unpacked into and every container root lives on.
pub const SNAPSHOTTER: &str = "overlayfs";
/// The shim containerd starts for our tasks.
pub const RUNTIME: &str = "io.containerd.runc.v2";
const SPEC_TYPE_URL: &str = "types.containerd.io/opencontainers/runtime-spec/1/Spec";
/// Chunk size of content writes (containerd's own clients use 1 MiB).
const WRITE_CHUNK: usize = 1 << 20;

#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    #[error(
        "cannot reach containerd at {path}: {reason}. Install and start it (apt-get install containerd runc containernetworking-plugins; the EdgeSite installer does this) or pass --container-runtime-endpoint"
    )]
    Unreachable { path: PathBuf, reason: String },
    #[error("containerd {op}: {status}")]
    Grpc {
        op: &'static str,
        #[source]
        status: Box<Status>,
    },
    #[error("{0}")]
    Invalid(String),
}

impl RuntimeError {
    pub fn is_not_found(&self) -> bool {
        matches!(self, RuntimeError::Grpc { status, .. } if status.code() == Code::NotFound)
    }
    pub fn is_already_exists(&self) -> bool {
        matches!(self, RuntimeError::Grpc { status, .. } if status.code() == Code::AlreadyExists)
    }
}

type Result<T> = std::result::Result<T, RuntimeError>;

fn grpc(op: &'static str) -> impl FnOnce(Status) -> RuntimeError {
    move |status| RuntimeError::Grpc {
        op,
        status: Box::new(status),
    }
}

/// A task's state as containerd reports it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TaskState {
    Created,
    Running {
        pid: u32,
    },
    Stopped {
        exit_code: u32,
        exited_at: Option<prost_types::Timestamp>,
    },
    Paused,
    Unknown,
}

/// One event from containerd that the node agent acts on.
#[derive(Clone, Debug)]
pub enum RuntimeEvent {
    /// A task's init process (exec id empty) or an exec process ended.
    Exit {
        container_id: String,
        exec_id: String,
        exit_code: u32,
    },
    /// The kernel's OOM killer hit the container's cgroup.
    Oom { container_id: String },
}

/// A connection to containerd, scoped to one containerd namespace.
#[derive(Clone)]
pub struct Containerd {
    channel: Channel,
    namespace: String,
    socket: PathBuf,
}

impl Containerd {
    /// Connects and checks the daemon answers; the error names the fix when it does not.
    pub async fn connect(socket: &Path, namespace: &str) -> Result<Self> {
        let unreachable = |reason: String| RuntimeError::Unreachable {
            path: socket.to_path_buf(),
            reason,
        };
        if !socket.exists() {
            return Err(unreachable("the socket does not exist".into()));
        }
        let channel =
            tokio::time::timeout(Duration::from_secs(10), containerd_client::connect(socket))
                .await
                .map_err(|_| unreachable("no answer within 10 s".into()))?
                .map_err(|e| unreachable(e.to_string()))?;
        let me = Containerd {
            channel,
            namespace: namespace.to_string(),
            socket: socket.to_path_buf(),
        };
        me.version()
            .await
            .map_err(|e| unreachable(format!("the version call failed: {e}")))?;
        Ok(me)
    }

    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    pub fn socket(&self) -> &Path {
        &self.socket
    }

    fn req<T>(&self, message: T) -> Request<T> {
        let mut req = Request::new(message);
        if let Ok(v) = self.namespace.parse() {
            req.metadata_mut().insert("containerd-namespace", v);
        }
        req
    }

    fn req_leased<T>(&self, message: T, lease: &str) -> Request<T> {
        let mut req = self.req(message);
        if let Ok(v) = lease.parse() {
            req.metadata_mut().insert("containerd-lease", v);
        }
        req
    }

    /// containerd's version string, e.g. `1.6.20~ds1`.
    pub async fn version(&self) -> Result<String> {
        let mut c = api::version_client::VersionClient::new(self.channel.clone());
        let v = c
            .version(Request::new(()))
            .await
            .map_err(grpc("version"))?
            .into_inner();
        Ok(v.version)
    }

    // ---- leases -------------------------------------------------------------------------

    /// A lease that protects what is written under it from garbage collection until it is
    /// deleted or expires (so a crash mid-pull leaves nothing pinned for ever).
    pub async fn create_lease(&self, expire: Duration) -> Result<String> {
        let id = format!("edgesite-{}", uuid::Uuid::new_v4().simple());
        let expires = chrono::Utc::now() + chrono::Duration::from_std(expire).unwrap_or_default();
        let mut labels = HashMap::new();
        labels.insert(
            "containerd.io/gc.expire".to_string(),
            expires.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
        );
        let mut c = api::leases_client::LeasesClient::new(self.channel.clone());
        c.create(self.req(api::CreateRequest {
            id: id.clone(),
            labels,
        }))
        .await
        .map_err(grpc("create lease"))?;
        Ok(id)
    }

    pub async fn delete_lease(&self, id: &str) -> Result<()> {
        let mut c = api::leases_client::LeasesClient::new(self.channel.clone());
        match c
            .delete(self.req(api::DeleteRequest {
                id: id.to_string(),
                sync: false,
            }))
            .await
        {
            Ok(_) => Ok(()),
            Err(s) if s.code() == Code::NotFound => Ok(()),
            Err(s) => Err(grpc("delete lease")(s)),
        }
    }

    // ---- content --------------------------------------------------------------------------

    /// Whether the content store holds a blob.
    pub async fn content_exists(&self, digest: &str) -> Result<bool> {
        let mut c = api::content_client::ContentClient::new(self.channel.clone());
        match c
            .info(self.req(api::InfoRequest {
                digest: digest.to_string(),
            }))
            .await
        {
            Ok(_) => Ok(true),
            Err(s) if s.code() == Code::NotFound => Ok(false),
            Err(s) => Err(grpc("content info")(s)),
        }
    }

    /// Sets labels on a blob (garbage-collection references).
    pub async fn label_content(&self, digest: &str, labels: HashMap<String, String>) -> Result<()> {
        let mut c = api::content_client::ContentClient::new(self.channel.clone());
        let paths = labels.keys().map(|k| format!("labels.{k}")).collect();
        c.update(self.req(api::UpdateRequest {
            info: Some(api::Info {
                digest: digest.to_string(),
                labels,
                ..Default::default()
            }),
            update_mask: Some(prost_types::FieldMask { paths }),
        }))
        .await
        .map_err(grpc("label content"))?;
        Ok(())
    }

    /// Reads a whole (small) blob: manifests, indexes and configs.
    pub async fn read_content(&self, digest: &str, limit: usize) -> Result<Vec<u8>> {
        use futures::StreamExt;
        let mut c = api::content_client::ContentClient::new(self.channel.clone());
        let mut stream = c
            .read(self.req(api::ReadContentRequest {
                digest: digest.to_string(),
                offset: 0,
                size: 0,
            }))
            .await
            .map_err(grpc("read content"))?
            .into_inner();
        let mut out = Vec::new();
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(grpc("read content"))?;
            out.extend_from_slice(&chunk.data);
            if out.len() > limit {
                return Err(RuntimeError::Invalid(format!(
                    "blob {digest} is larger than {limit} bytes"
                )));
            }
        }
        Ok(out)
    }

    /// Starts a streaming write of one blob under `lease`. `expected` is the digest when known
    /// (containerd verifies it on commit); without it containerd computes and returns it.
    pub async fn write_content(
        &self,
        lease: &str,
        expected: Option<&str>,
        total: Option<u64>,
        labels: HashMap<String, String>,
    ) -> Result<ContentWriter> {
        let (tx, rx) = mpsc::channel::<api::WriteContentRequest>(4);
        let reference = match expected {
            Some(d) => format!("edgesite-{d}"),
            None => format!("edgesite-upload-{}", uuid::Uuid::new_v4().simple()),
        };
        let mut c = api::content_client::ContentClient::new(self.channel.clone());
        // containerd reads the first message before answering the call.
        tx.send(api::WriteContentRequest {
            action: api::WriteAction::Stat as i32,
            r#ref: reference.clone(),
            ..Default::default()
        })
        .await
        .map_err(|_| RuntimeError::Invalid("content writer closed".into()))?;
        let responses = c
            .write(self.req_leased(ReceiverStream::new(rx), lease))
            .await
            .map_err(grpc("write content"))?
            .into_inner();
        let mut writer = ContentWriter {
            tx,
            responses,
            reference,
            expected: expected.map(str::to_string),
            total: total.map(|t| t as i64).unwrap_or(0),
            offset: 0,
            labels,
            hasher: sha2::Sha256::default(),
        };
        // The stat answer tells how much an interrupted earlier write already holds; we
        // restart from zero to keep the digest computation simple.
        let stat = writer.next_response("stat").await?;
        if stat.offset > 0 {
            writer.offset = 0;
        }
        Ok(writer)
    }

    /// Stores a small blob (manifest, index, config) whole, or only labels it when present.
    pub async fn put_content(
        &self,
        lease: &str,
        digest: &str,
        bytes: &[u8],
        labels: HashMap<String, String>,
    ) -> Result<()> {
        if self.content_exists(digest).await? {
            if !labels.is_empty() {
                self.label_content(digest, labels).await?;
            }
            return Ok(());
        }
        let mut w = self
            .write_content(lease, Some(digest), Some(bytes.len() as u64), labels)
            .await?;
        w.write(bytes).await?;
        w.commit().await?;
        Ok(())
    }

    // ---- images ---------------------------------------------------------------------------

    pub async fn get_image(&self, name: &str) -> Result<Option<api::Image>> {
        let mut c = api::images_client::ImagesClient::new(self.channel.clone());
        match c
            .get(self.req(api::GetImageRequest {
                name: name.to_string(),
            }))
            .await
        {
            Ok(r) => Ok(r.into_inner().image),
            Err(s) if s.code() == Code::NotFound => Ok(None),
            Err(s) => Err(grpc("get image")(s)),
        }
    }

    pub async fn list_images(&self) -> Result<Vec<api::Image>> {
        let mut c = api::images_client::ImagesClient::new(self.channel.clone());
        Ok(c.list(self.req(api::ListImagesRequest { filters: vec![] }))
            .await
            .map_err(grpc("list images"))?
            .into_inner()
            .images)
    }

    /// Creates or updates the image record `name` -> `target`.
    pub async fn put_image(
        &self,
        name: &str,
        target: Descriptor,
        labels: HashMap<String, String>,
    ) -> Result<()> {
        let mut c = api::images_client::ImagesClient::new(self.channel.clone());
        let image = api::Image {
            name: name.to_string(),
            labels,
            target: Some(target),
            created_at: None,
            updated_at: None,
        };
        match c
            .create(self.req(api::CreateImageRequest {
                image: Some(image.clone()),
                source_date_epoch: None,
            }))
            .await
        {
            Ok(_) => Ok(()),
            Err(s) if s.code() == Code::AlreadyExists => {
                c.update(self.req(api::UpdateImageRequest {
                    image: Some(image),
                    update_mask: None,
                    source_date_epoch: None,
                }))
                .await
                .map_err(grpc("update image"))?;
                Ok(())
            }
            Err(s) => Err(grpc("create image")(s)),
        }
    }

    pub async fn delete_image(&self, name: &str) -> Result<()> {
        let mut c = api::images_client::ImagesClient::new(self.channel.clone());
        match c
            .delete(self.req(api::DeleteImageRequest {
                name: name.to_string(),
                sync: false,
                target: None,
            }))
            .await
        {
            Ok(_) => Ok(()),
            Err(s) if s.code() == Code::NotFound => Ok(()),
            Err(s) => Err(grpc("delete image")(s)),
        }
    }

    // ---- snapshots and diff ----------------------------------------------------------------

    pub async fn snapshot_exists(&self, key: &str) -> Result<bool> {
        let mut c = snap::snapshots_client::SnapshotsClient::new(self.channel.clone());
        match c
            .stat(self.req(snap::StatSnapshotRequest {
                snapshotter: SNAPSHOTTER.into(),
                key: key.to_string(),
            }))
            .await
        {
            Ok(_) => Ok(true),
            Err(s) if s.code() == Code::NotFound => Ok(false),
            Err(s) => Err(grpc("stat snapshot")(s)),
        }
    }

    /// An active (writable) snapshot on top of `parent`; returns the mounts to use it.
    pub async fn prepare_snapshot(
        &self,
        key: &str,
        parent: &str,
        lease: Option<&str>,
    ) -> Result<Vec<Mount>> {
        let mut c = snap::snapshots_client::SnapshotsClient::new(self.channel.clone());
        let message = snap::PrepareSnapshotRequest {
            snapshotter: SNAPSHOTTER.into(),
            key: key.to_string(),
            parent: parent.to_string(),
            labels: HashMap::new(),
        };
        let req = match lease {
            Some(l) => self.req_leased(message, l),
            None => self.req(message),
        };
        Ok(c.prepare(req)
            .await
            .map_err(grpc("prepare snapshot"))?
            .into_inner()
            .mounts)
    }

    pub async fn snapshot_mounts(&self, key: &str) -> Result<Vec<Mount>> {
        let mut c = snap::snapshots_client::SnapshotsClient::new(self.channel.clone());
        Ok(c.mounts(self.req(snap::MountsRequest {
            snapshotter: SNAPSHOTTER.into(),
            key: key.to_string(),
        }))
        .await
        .map_err(grpc("snapshot mounts"))?
        .into_inner()
        .mounts)
    }

    pub async fn commit_snapshot(&self, name: &str, key: &str, lease: &str) -> Result<()> {
        let mut c = snap::snapshots_client::SnapshotsClient::new(self.channel.clone());
        c.commit(self.req_leased(
            snap::CommitSnapshotRequest {
                snapshotter: SNAPSHOTTER.into(),
                name: name.to_string(),
                key: key.to_string(),
                labels: HashMap::new(),
            },
            lease,
        ))
        .await
        .map_err(grpc("commit snapshot"))?;
        Ok(())
    }

    pub async fn remove_snapshot(&self, key: &str) -> Result<()> {
        let mut c = snap::snapshots_client::SnapshotsClient::new(self.channel.clone());
        match c
            .remove(self.req(snap::RemoveSnapshotRequest {
                snapshotter: SNAPSHOTTER.into(),
                key: key.to_string(),
            }))
            .await
        {
            Ok(_) => Ok(()),
            Err(s) if s.code() == Code::NotFound => Ok(()),
            Err(s) => Err(grpc("remove snapshot")(s)),
        }
    }

    /// Applies a layer blob onto mounts (containerd decompresses and untars it); returns the
    /// digest of the uncompressed layer, which must equal the image config's diff id.
    pub async fn apply_layer(&self, layer: Descriptor, mounts: Vec<Mount>) -> Result<String> {
        let mut c = api::diff_client::DiffClient::new(self.channel.clone());
        let applied = c
            .apply(self.req(api::ApplyRequest {
                diff: Some(layer),
                mounts,
                payloads: HashMap::new(),
                sync_fs: false,
            }))
            .await
            .map_err(grpc("apply layer"))?
            .into_inner()
            .applied
            .map(|d| d.digest)
            .unwrap_or_default();
        Ok(applied)
    }

    // ---- containers ---------------------------------------------------------------------

    /// Creates a container record: its OCI spec (JSON), image name, snapshot and labels.
    pub async fn create_container(
        &self,
        id: &str,
        image: &str,
        snapshot_key: &str,
        spec_json: Vec<u8>,
        labels: HashMap<String, String>,
    ) -> Result<()> {
        let mut c = api::containers_client::ContainersClient::new(self.channel.clone());
        let container = api::Container {
            id: id.to_string(),
            labels,
            image: image.to_string(),
            runtime: Some(api::container::Runtime {
                name: RUNTIME.into(),
                options: None,
            }),
            spec: Some(Any {
                type_url: SPEC_TYPE_URL.into(),
                value: spec_json,
            }),
            snapshotter: SNAPSHOTTER.into(),
            snapshot_key: snapshot_key.to_string(),
            created_at: None,
            updated_at: None,
            extensions: HashMap::new(),
            sandbox: String::new(),
        };
        c.create(self.req(api::CreateContainerRequest {
            container: Some(container),
        }))
        .await
        .map_err(grpc("create container"))?;
        Ok(())
    }

    /// Containers whose labels match every `key==value` given.
    pub async fn list_containers(
        &self,
        label_filter: &[(&str, &str)],
    ) -> Result<Vec<api::Container>> {
        let mut c = api::containers_client::ContainersClient::new(self.channel.clone());
        let filter = label_filter
            .iter()
            .map(|(k, v)| format!("labels.\"{k}\"=={v}"))
            .collect::<Vec<_>>()
            .join(",");
        let filters = if filter.is_empty() {
            vec![]
        } else {
            vec![filter]
        };
        Ok(c.list(self.req(api::ListContainersRequest { filters }))
            .await
            .map_err(grpc("list containers"))?
            .into_inner()
            .containers)
    }

    /// Adds or replaces labels of a container (the agent's durable notes on it).
    pub async fn label_container(&self, id: &str, labels: HashMap<String, String>) -> Result<()> {
        let mut c = api::containers_client::ContainersClient::new(self.channel.clone());
        let paths = labels.keys().map(|k| format!("labels.{k}")).collect();
        c.update(self.req(api::UpdateContainerRequest {
            container: Some(api::Container {
                id: id.to_string(),
                labels,
                ..Default::default()
            }),
            update_mask: Some(prost_types::FieldMask { paths }),
        }))
        .await
        .map_err(grpc("label container"))?;
        Ok(())
    }

    pub async fn delete_container(&self, id: &str) -> Result<()> {
        let mut c = api::containers_client::ContainersClient::new(self.channel.clone());
        match c
            .delete(self.req(api::DeleteContainerRequest { id: id.to_string() }))
            .await
        {
            Ok(_) => Ok(()),
            Err(s) if s.code() == Code::NotFound => Ok(()),
            Err(s) => Err(grpc("delete container")(s)),
        }
    }

    // ---- tasks ----------------------------------------------------------------------------

    /// Creates the container's task (the runc container, not yet started). stdout/stderr are
    /// paths of FIFOs the agent reads.
    /// Creates the container's task with its stdio FIFOs (`stdin` for containers that keep
    /// stdin open; with a terminal, stdout carries both streams).
    pub async fn create_task(&self, id: &str, rootfs: Vec<Mount>, io: ExecIo<'_>) -> Result<u32> {
        let path = |p: Option<&Path>| p.map(|p| p.display().to_string()).unwrap_or_default();
        let mut c = api::tasks_client::TasksClient::new(self.channel.clone());
        Ok(c.create(self.req(api::CreateTaskRequest {
            container_id: id.to_string(),
            rootfs,
            stdin: path(io.stdin),
            stdout: path(io.stdout),
            stderr: path(io.stderr),
            terminal: io.terminal,
            checkpoint: None,
            options: None,
            runtime_path: String::new(),
        }))
        .await
        .map_err(grpc("create task"))?
        .into_inner()
        .pid)
    }

    pub async fn start_task(&self, id: &str) -> Result<u32> {
        let mut c = api::tasks_client::TasksClient::new(self.channel.clone());
        Ok(c.start(self.req(api::StartRequest {
            container_id: id.to_string(),
            exec_id: String::new(),
        }))
        .await
        .map_err(grpc("start task"))?
        .into_inner()
        .pid)
    }

    pub async fn task_state(&self, id: &str) -> Result<Option<TaskState>> {
        let mut c = api::tasks_client::TasksClient::new(self.channel.clone());
        let process = match c
            .get(self.req(api::GetRequest {
                container_id: id.to_string(),
                exec_id: String::new(),
            }))
            .await
        {
            Ok(r) => r.into_inner().process,
            Err(s) if s.code() == Code::NotFound => return Ok(None),
            Err(s) => return Err(grpc("get task")(s)),
        };
        let Some(p) = process else { return Ok(None) };
        use containerd_client::types::v1::Status as S;
        Ok(Some(match S::try_from(p.status).unwrap_or(S::Unknown) {
            S::Created => TaskState::Created,
            S::Running => TaskState::Running { pid: p.pid },
            S::Stopped => TaskState::Stopped {
                exit_code: p.exit_status,
                exited_at: p.exited_at,
            },
            S::Paused | S::Pausing => TaskState::Paused,
            S::Unknown => TaskState::Unknown,
        }))
    }

    /// Sends a signal to the task's processes (`all`: every process of the container).
    pub async fn kill_task(&self, id: &str, signal: i32, all: bool) -> Result<()> {
        let mut c = api::tasks_client::TasksClient::new(self.channel.clone());
        match c
            .kill(self.req(api::KillRequest {
                container_id: id.to_string(),
                exec_id: String::new(),
                signal: signal as u32,
                all,
            }))
            .await
        {
            Ok(_) => Ok(()),
            Err(s) if s.code() == Code::NotFound => Ok(()),
            // Killing a stopped task is not an error for us.
            Err(s) if s.code() == Code::FailedPrecondition => Ok(()),
            Err(s) => Err(grpc("kill task")(s)),
        }
    }

    /// Deletes a stopped task; returns its exit code when it had one.
    pub async fn delete_task(&self, id: &str) -> Result<Option<u32>> {
        let mut c = api::tasks_client::TasksClient::new(self.channel.clone());
        match c
            .delete(self.req(api::DeleteTaskRequest {
                container_id: id.to_string(),
            }))
            .await
        {
            Ok(r) => Ok(Some(r.into_inner().exit_status)),
            Err(s) if s.code() == Code::NotFound => Ok(None),
            Err(s) => Err(grpc("delete task")(s)),
        }
    }

    /// Starts `spec` (an OCI process, JSON) in the container; its output goes to the given
    /// FIFOs. Used by exec probes and hooks.
    pub async fn exec(
        &self,
        id: &str,
        exec_id: &str,
        process_json: Vec<u8>,
        stdout: &Path,
        stderr: &Path,
    ) -> Result<()> {
        self.exec_with(
            id,
            exec_id,
            process_json,
            ExecIo {
                stdin: None,
                stdout: Some(stdout),
                stderr: Some(stderr),
                terminal: false,
            },
        )
        .await
    }

    /// Starts an exec process with the given stdio FIFOs (and a terminal: then stdout carries
    /// both streams).
    pub async fn exec_with(
        &self,
        id: &str,
        exec_id: &str,
        process_json: Vec<u8>,
        io: ExecIo<'_>,
    ) -> Result<()> {
        let path = |p: Option<&Path>| p.map(|p| p.display().to_string()).unwrap_or_default();
        let mut c = api::tasks_client::TasksClient::new(self.channel.clone());
        c.exec(self.req(api::ExecProcessRequest {
            container_id: id.to_string(),
            stdin: path(io.stdin),
            stdout: path(io.stdout),
            stderr: path(io.stderr),
            terminal: io.terminal,
            spec: Some(Any {
                type_url: "types.containerd.io/opencontainers/runtime-spec/1/Process".into(),
                value: process_json,
            }),
            exec_id: exec_id.to_string(),
        }))
        .await
        .map_err(grpc("exec"))?;
        c.start(self.req(api::StartRequest {
            container_id: id.to_string(),
            exec_id: exec_id.to_string(),
        }))
        .await
        .map_err(grpc("start exec"))?;
        Ok(())
    }

    /// Closes the stdin of an exec process (or of the task with an empty `exec_id`): the shim
    /// keeps the stdin FIFO open for writing itself until told so.
    pub async fn close_stdin(&self, id: &str, exec_id: &str) -> Result<()> {
        let mut c = api::tasks_client::TasksClient::new(self.channel.clone());
        c.close_io(self.req(api::CloseIoRequest {
            container_id: id.to_string(),
            exec_id: exec_id.to_string(),
            stdin: true,
        }))
        .await
        .map_err(grpc("close stdin"))?;
        Ok(())
    }

    /// Resizes the terminal of an exec process (or of the task with an empty `exec_id`).
    pub async fn resize_pty(&self, id: &str, exec_id: &str, width: u32, height: u32) -> Result<()> {
        let mut c = api::tasks_client::TasksClient::new(self.channel.clone());
        c.resize_pty(self.req(api::ResizePtyRequest {
            container_id: id.to_string(),
            exec_id: exec_id.to_string(),
            width,
            height,
        }))
        .await
        .map_err(grpc("resize terminal"))?;
        Ok(())
    }

    /// The container's OCI runtime spec (JSON).
    pub async fn container_spec(&self, id: &str) -> Result<serde_json::Value> {
        let mut c = api::containers_client::ContainersClient::new(self.channel.clone());
        let container = c
            .get(self.req(api::GetContainerRequest { id: id.to_string() }))
            .await
            .map_err(grpc("get container"))?
            .into_inner()
            .container
            .and_then(|c| c.spec)
            .map(|s| s.value)
            .unwrap_or_default();
        Ok(serde_json::from_slice(&container).unwrap_or_default())
    }

    /// Waits for an exec process to end and returns its exit code.
    pub async fn wait_exec(&self, id: &str, exec_id: &str) -> Result<u32> {
        let mut c = api::tasks_client::TasksClient::new(self.channel.clone());
        Ok(c.wait(self.req(api::WaitRequest {
            container_id: id.to_string(),
            exec_id: exec_id.to_string(),
        }))
        .await
        .map_err(grpc("wait exec"))?
        .into_inner()
        .exit_status)
    }

    pub async fn delete_exec(&self, id: &str, exec_id: &str) -> Result<()> {
        let mut c = api::tasks_client::TasksClient::new(self.channel.clone());
        match c
            .delete_process(self.req(api::DeleteProcessRequest {
                container_id: id.to_string(),
                exec_id: exec_id.to_string(),
            }))
            .await
        {
            Ok(_) => Ok(()),
            Err(s) if s.code() == Code::NotFound => Ok(()),
            Err(s) => Err(grpc("delete exec")(s)),
        }
    }

    pub async fn kill_exec(&self, id: &str, exec_id: &str, signal: i32) -> Result<()> {
        let mut c = api::tasks_client::TasksClient::new(self.channel.clone());
        match c
            .kill(self.req(api::KillRequest {
                container_id: id.to_string(),
                exec_id: exec_id.to_string(),
                signal: signal as u32,
                all: false,
            }))
            .await
        {
            Ok(_) => Ok(()),
            Err(s) if matches!(s.code(), Code::NotFound | Code::FailedPrecondition) => Ok(()),
            Err(s) => Err(grpc("kill exec")(s)),
        }
    }

    // ---- events ----------------------------------------------------------------------------

    /// Streams task exits and OOM kills of this namespace into `tx` until the stream breaks.
    pub async fn subscribe(&self, tx: mpsc::Sender<RuntimeEvent>) -> Result<()> {
        use futures::StreamExt;
        use prost::Message;
        let mut c = api::events_client::EventsClient::new(self.channel.clone());
        let filters = vec![
            format!("namespace=={},topic==\"/tasks/exit\"", self.namespace),
            format!("namespace=={},topic==\"/tasks/oom\"", self.namespace),
        ];
        let mut stream = c
            .subscribe(Request::new(api::SubscribeRequest { filters }))
            .await
            .map_err(grpc("subscribe to events"))?
            .into_inner();
        while let Some(envelope) = stream.next().await {
            let envelope = envelope.map_err(grpc("event stream"))?;
            let Some(any) = envelope.event else { continue };
            let event = match envelope.topic.as_str() {
                "/tasks/exit" => match containerd_client::events::TaskExit::decode(&*any.value) {
                    Ok(e) => RuntimeEvent::Exit {
                        exec_id: if e.id == e.container_id {
                            String::new()
                        } else {
                            e.id
                        },
                        container_id: e.container_id,
                        exit_code: e.exit_status,
                    },
                    Err(_) => continue,
                },
                "/tasks/oom" => match containerd_client::events::TaskOom::decode(&*any.value) {
                    Ok(e) => RuntimeEvent::Oom {
                        container_id: e.container_id,
                    },
                    Err(_) => continue,
                },
                _ => continue,
            };
            if tx.send(event).await.is_err() {
                return Ok(());
            }
        }
        Ok(())
    }
}

/// One blob being written into containerd's content store.
/// The stdio of an exec process (FIFO paths; `None` discards).
pub struct ExecIo<'a> {
    pub stdin: Option<&'a Path>,
    pub stdout: Option<&'a Path>,
    pub stderr: Option<&'a Path>,
    pub terminal: bool,
}

pub struct ContentWriter {
    tx: mpsc::Sender<api::WriteContentRequest>,
    responses: containerd_client::tonic::Streaming<api::WriteContentResponse>,
    reference: String,
    expected: Option<String>,
    total: i64,
    offset: i64,
    labels: HashMap<String, String>,
    hasher: sha2::Sha256,
}

impl ContentWriter {
    async fn next_response(&mut self, op: &'static str) -> Result<api::WriteContentResponse> {
        match self.responses.message().await {
            Ok(Some(r)) => Ok(r),
            Ok(None) => Err(RuntimeError::Invalid(format!(
                "containerd closed the content write during {op}"
            ))),
            Err(s) => Err(grpc("write content")(s)),
        }
    }

    /// Appends data (split into containerd-sized chunks).
    pub async fn write(&mut self, data: &[u8]) -> Result<()> {
        use sha2::Digest;
        self.hasher.update(data);
        for chunk in data.chunks(WRITE_CHUNK) {
            self.tx
                .send(api::WriteContentRequest {
                    action: api::WriteAction::Write as i32,
                    r#ref: self.reference.clone(),
                    total: self.total,
                    expected: String::new(),
                    offset: self.offset,
                    data: chunk.to_vec(),
                    labels: HashMap::new(),
                })
                .await
                .map_err(|_| RuntimeError::Invalid("containerd ended the content write".into()))?;
            self.offset += chunk.len() as i64;
            self.next_response("write").await?;
        }
        Ok(())
    }

    /// Commits the blob; returns its digest. An identical blob already present is fine.
    pub async fn commit(mut self) -> Result<String> {
        use sha2::Digest;
        let digest = format!("sha256:{:x}", self.hasher.clone().finalize());
        if let Some(expected) = &self.expected
            && *expected != digest
        {
            return Err(RuntimeError::Invalid(format!(
                "content digest mismatch: expected {expected}, got {digest}"
            )));
        }
        let sent = self
            .tx
            .send(api::WriteContentRequest {
                action: api::WriteAction::Commit as i32,
                r#ref: self.reference.clone(),
                total: self.offset,
                expected: digest.clone(),
                offset: self.offset,
                data: vec![],
                labels: std::mem::take(&mut self.labels),
            })
            .await;
        if sent.is_err() {
            return Err(RuntimeError::Invalid(
                "containerd ended the content write".into(),
            ));
        }
        match self.responses.message().await {
            Ok(_) => Ok(digest),
            Err(s) if s.code() == Code::AlreadyExists => Ok(digest),
            Err(s) => Err(grpc("commit content")(s)),
        }
    }
}
