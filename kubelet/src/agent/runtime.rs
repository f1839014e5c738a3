//! The kubelet's view of the container runtime: sandboxes and containers from [`SandboxManager`], root filesystems
//! from the image [`Store`], and the few facts the runtime does not keep (a container's spec hash, image and start
//! time; a sandbox's IPs) in small records under the pod directory, so a restarted kubelet reads them back.
//!
//! Everything here blocks (fork/exec, mounts, file I/O): the pod workers call it through `spawn_blocking`.

use std::collections::HashMap;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::time::Duration;

use k8s_openapi::jiff::Timestamp;
use serde::{Deserialize, Serialize};
use windlass_runtime::image::Store;
use windlass_runtime::{
    ContainerInfo, SandboxInfo, SandboxManager, SandboxState as RtSandboxState, Status,
};

use crate::layout;
use crate::status::{reasons, RuntimeContainer, RuntimeState};
use crate::sync::SandboxState;

/// Failures of the runtime adapter.
#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    #[error(transparent)]
    Sandbox(#[from] windlass_runtime::SandboxError),
    #[error(transparent)]
    Store(#[from] windlass_runtime::image::StoreError),
    #[error(transparent)]
    Bundle(#[from] windlass_runtime::image::BundleError),
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("{path}: {source}")]
    Json {
        path: PathBuf,
        source: serde_json::Error,
    },
    #[error("background task failed: {0}")]
    Join(String),
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> RuntimeError + '_ {
    move |source| RuntimeError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// What the kubelet remembers about one container instance (upstream keeps these in container labels).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub(crate) struct ContainerRecord {
    /// [`crate::sync::container_hash`] of the spec it was created from.
    pub hash: String,
    /// The image as the spec names it.
    pub image: String,
    /// The image's digest reference (`imageID`).
    pub image_ref: String,
    /// When the kubelet started it (RFC 3339); empty while only created.
    #[serde(default)]
    pub started_at: String,
    /// Whether this is an init container.
    #[serde(default)]
    pub init: bool,
}

/// What the kubelet remembers about one sandbox: the IPs CNI gave it.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub(crate) struct SandboxRecord {
    pub ips: Vec<String>,
}

/// One sandbox with its containers, as a sync sees them.
#[derive(Debug, Clone)]
pub(crate) struct PodView {
    pub sandboxes: Vec<SandboxState>,
    pub containers: Vec<RuntimeContainer>,
    /// `(sandbox id, container id)` of every container instance, keyed like [`RuntimeContainer::id`].
    pub locations: HashMap<String, (String, String)>,
    /// The newest sandbox's IPs.
    pub ips: Vec<String>,
}

/// The runtime and image store of one kubelet.
#[derive(Clone)]
pub(crate) struct PodRuntime {
    pub root_dir: PathBuf,
    pub sandboxes: SandboxManager,
    pub images: Store,
}

/// `windlass://<sandbox>/<container>`: the `containerID` the API shows.
pub(crate) fn api_container_id(sandbox_id: &str, container_id: &str) -> String {
    format!("windlass://{sandbox_id}/{container_id}")
}

fn parse_time(s: &str) -> Option<Timestamp> {
    s.parse().ok()
}

fn read_json<T: for<'de> Deserialize<'de>>(path: &Path) -> Result<Option<T>, RuntimeError> {
    match fs::read(path) {
        Ok(bytes) => {
            serde_json::from_slice(&bytes)
                .map(Some)
                .map_err(|source| RuntimeError::Json {
                    path: path.to_path_buf(),
                    source,
                })
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(io_err(path)(e)),
    }
}

fn write_json<T: Serialize>(path: &Path, value: &T) -> Result<(), RuntimeError> {
    if let Some(parent) = path.parent() {
        fs::create_dir_all(parent).map_err(io_err(parent))?;
    }
    let tmp = path.with_extension("tmp");
    let bytes = serde_json::to_vec(value).map_err(|source| RuntimeError::Json {
        path: path.to_path_buf(),
        source,
    })?;
    fs::write(&tmp, bytes).map_err(io_err(&tmp))?;
    fs::rename(&tmp, path).map_err(io_err(path))
}

impl PodRuntime {
    /// `cgroup_mount` is where the cgroup hierarchies are mounted (`/sys/fs/cgroup`); pod cgroup paths (from
    /// `--cgroup-root`) are relative to it.
    pub fn new(
        root_dir: &Path,
        cgroup_mount: &Path,
        runtime_binary: &Path,
    ) -> Result<Self, RuntimeError> {
        Ok(Self {
            root_dir: root_dir.to_path_buf(),
            sandboxes: SandboxManager::new(
                layout::sandboxes_dir(root_dir),
                cgroup_mount,
                runtime_binary,
            ),
            images: Store::open(layout::images_dir(root_dir))?,
        })
    }

    pub fn pod_dir(&self, uid: &str) -> PathBuf {
        layout::pod_dir(&self.root_dir, uid)
    }

    fn records_dir(&self, uid: &str, sandbox_id: &str) -> PathBuf {
        self.pod_dir(uid).join("records").join(sandbox_id)
    }

    /// Where a container instance's bundle (overlay rootfs + config.json) lives.
    pub fn bundle_dir(&self, uid: &str, sandbox_id: &str, container_id: &str) -> PathBuf {
        self.pod_dir(uid)
            .join("bundles")
            .join(sandbox_id)
            .join(container_id)
    }

    /// The image store's lease name for a container instance (unique on the node).
    pub fn lease_id(sandbox_id: &str, container_id: &str) -> String {
        format!("{sandbox_id}_{container_id}")
    }

    pub fn write_container_record(
        &self,
        uid: &str,
        sandbox_id: &str,
        container_id: &str,
        record: &ContainerRecord,
    ) -> Result<(), RuntimeError> {
        write_json(
            &self
                .records_dir(uid, sandbox_id)
                .join(format!("{container_id}.json")),
            record,
        )
    }

    pub fn container_record(
        &self,
        uid: &str,
        sandbox_id: &str,
        container_id: &str,
    ) -> Result<Option<ContainerRecord>, RuntimeError> {
        read_json(
            &self
                .records_dir(uid, sandbox_id)
                .join(format!("{container_id}.json")),
        )
    }

    pub fn write_sandbox_record(
        &self,
        uid: &str,
        sandbox_id: &str,
        record: &SandboxRecord,
    ) -> Result<(), RuntimeError> {
        write_json(
            &self.records_dir(uid, sandbox_id).join("sandbox.json"),
            record,
        )
    }

    fn sandbox_record(&self, uid: &str, sandbox_id: &str) -> SandboxRecord {
        read_json(&self.records_dir(uid, sandbox_id).join("sandbox.json"))
            .ok()
            .flatten()
            .unwrap_or_default()
    }

    /// Every sandbox on the node, grouped by pod UID (from their labels).
    pub fn sandboxes_by_pod(&self) -> Result<HashMap<String, Vec<SandboxInfo>>, RuntimeError> {
        let mut out: HashMap<String, Vec<SandboxInfo>> = HashMap::new();
        for sb in self.sandboxes.list_sandboxes()? {
            if let Some(uid) = sb.labels.get(layout::LABEL_POD_UID) {
                out.entry(uid.clone()).or_default().push(sb);
            }
        }
        Ok(out)
    }

    /// The sandboxes of one pod: IDs are `<uid>-<attempt>` ([`layout::sandbox_id`]), so only those are read,
    /// and their labels must agree.
    pub fn pod_sandboxes(&self, uid: &str) -> Result<Vec<SandboxInfo>, RuntimeError> {
        let dir = layout::sandboxes_dir(&self.root_dir);
        let prefix = format!("{uid}-");
        let entries = match fs::read_dir(&dir) {
            Ok(e) => e,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(io_err(&dir)(e)),
        };
        let mut out = Vec::new();
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let Some(attempt) = name.strip_prefix(&prefix) else {
                continue;
            };
            if attempt.parse::<u32>().is_err() {
                continue;
            }
            match self.sandboxes.sandbox(&name) {
                Ok(sb) if sb.labels.get(layout::LABEL_POD_UID).map(String::as_str) == Some(uid) => {
                    out.push(sb)
                }
                Ok(_) | Err(windlass_runtime::SandboxError::NotFound(_)) => {}
                Err(e) => return Err(e.into()),
            }
        }
        out.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(out)
    }

    /// The pod's sandboxes and container instances as the runtime and the records say.
    pub fn pod_view(&self, uid: &str) -> Result<PodView, RuntimeError> {
        let sandboxes = self.pod_sandboxes(uid)?;
        let mut view = PodView {
            sandboxes: Vec::new(),
            containers: Vec::new(),
            locations: HashMap::new(),
            ips: Vec::new(),
        };
        let mut newest: Option<(Timestamp, Vec<String>)> = None;
        for sb in &sandboxes {
            let record = self.sandbox_record(uid, &sb.id);
            let created_at = parse_time(&sb.created).unwrap_or(Timestamp::UNIX_EPOCH);
            let attempt = sb
                .labels
                .get(layout::LABEL_SANDBOX_ATTEMPT)
                .and_then(|a| a.parse().ok())
                .unwrap_or(0);
            if newest.as_ref().is_none_or(|(t, _)| created_at > *t) {
                newest = Some((created_at, record.ips.clone()));
            }
            view.sandboxes.push(SandboxState {
                id: sb.id.clone(),
                ready: sb.state == RtSandboxState::Ready,
                ip: record.ips.first().cloned(),
                host_network: sb.host_network,
                attempt,
                created_at,
            });
            for mut c in self.sandboxes.list_containers(&sb.id)? {
                if c.status == Status::Stopped && c.exit.is_none() {
                    c = self.settled(&sb.id, c);
                }
                if let Some(rc) = self.runtime_container(uid, &sb.id, &c)? {
                    view.locations
                        .insert(rc.id.clone(), (sb.id.clone(), c.id.clone()));
                    view.containers.push(rc);
                }
            }
        }
        view.ips = newest.map(|(_, ips)| ips).unwrap_or_default();
        Ok(view)
    }

    /// A container that just stopped: its shim records the exit status right after reaping it. Wait for that
    /// (bounded) rather than report an unknown exit, which would wrongly fail a finished pod for good.
    fn settled(&self, sandbox_id: &str, c: ContainerInfo) -> ContainerInfo {
        for _ in 0..30 {
            std::thread::sleep(Duration::from_millis(100));
            match self.sandboxes.container_status(sandbox_id, &c.id) {
                Ok(now) if now.exit.is_some() => return now,
                Ok(_) => {}
                Err(_) => break,
            }
        }
        c
    }

    fn runtime_container(
        &self,
        uid: &str,
        sandbox_id: &str,
        c: &ContainerInfo,
    ) -> Result<Option<RuntimeContainer>, RuntimeError> {
        let Some((name, restart)) = layout::parse_container_id(&c.id) else {
            return Ok(None);
        };
        let record = self
            .container_record(uid, sandbox_id, &c.id)?
            .unwrap_or_default();
        let state = match c.status {
            Status::Creating | Status::Created => RuntimeState::Created,
            Status::Running | Status::Paused => RuntimeState::Running,
            Status::Stopped => RuntimeState::Exited,
        };
        let (exit_code, reason, finished_at) = match &c.exit {
            Some(e) => (
                e.code,
                if e.oom_killed {
                    reasons::OOM_KILLED.to_string()
                } else {
                    String::new()
                },
                parse_time(&e.finished_at),
            ),
            // Stopped without a recorded exit: its shim is gone, so how it ended is unknown.
            None if state == RuntimeState::Exited => {
                (137, reasons::STATUS_UNKNOWN.to_string(), None)
            }
            None => (0, String::new(), None),
        };
        let message = if state == RuntimeState::Exited {
            crate::mounts::read_termination_message(
                &self.pod_dir(uid).join("containers").join(name).join(&c.id),
            )
        } else {
            String::new()
        };
        Ok(Some(RuntimeContainer {
            name: name.to_string(),
            id: api_container_id(sandbox_id, &c.id),
            image: record.image.clone(),
            image_ref: record.image_ref.clone(),
            state,
            created_at: parse_time(&c.created).unwrap_or(Timestamp::UNIX_EPOCH),
            started_at: parse_time(&record.started_at),
            finished_at,
            exit_code,
            reason,
            message,
            restart_count: i32::try_from(restart).unwrap_or(i32::MAX),
            spec_hash: record.hash,
        }))
    }

    /// Stops a container within `grace` (SIGTERM, then SIGKILL).
    pub fn stop_container(
        &self,
        sandbox_id: &str,
        container_id: &str,
        grace: Duration,
    ) -> Result<(), RuntimeError> {
        self.sandboxes
            .stop_container(sandbox_id, container_id, grace)?;
        Ok(())
    }

    /// Removes a container instance: the runtime's container, its bundle (unmounting the rootfs and releasing the
    /// image lease) and its record. Keeps going past failures and reports the first.
    pub fn remove_container(
        &self,
        uid: &str,
        sandbox_id: &str,
        container_id: &str,
    ) -> Result<(), RuntimeError> {
        let mut first: Option<RuntimeError> = None;
        if let Err(e) = self.sandboxes.remove_container(sandbox_id, container_id) {
            first.get_or_insert(e.into());
        }
        let bundle = self.bundle_dir(uid, sandbox_id, container_id);
        if bundle.exists() {
            if let Err(e) = self
                .images
                .remove_bundle(&Self::lease_id(sandbox_id, container_id), &bundle)
            {
                first.get_or_insert(e.into());
            } else if let Err(e) = fs::remove_dir_all(&bundle) {
                if e.kind() != io::ErrorKind::NotFound {
                    first.get_or_insert(io_err(&bundle)(e));
                }
            }
        }
        if let Err(e) = self
            .images
            .release(&Self::lease_id(sandbox_id, container_id))
        {
            first.get_or_insert(e.into());
        }
        let _ = fs::remove_file(
            self.records_dir(uid, sandbox_id)
                .join(format!("{container_id}.json")),
        );
        match first {
            None => Ok(()),
            Some(e) => Err(e),
        }
    }

    /// Removes every container and the sandbox itself (CNI DEL must already have run).
    pub fn remove_sandbox(&self, uid: &str, sandbox_id: &str) -> Vec<String> {
        let mut errors = Vec::new();
        match self.sandboxes.list_containers(sandbox_id) {
            Ok(containers) => {
                for c in containers {
                    if let Err(e) = self.remove_container(uid, sandbox_id, &c.id) {
                        errors.push(e.to_string());
                    }
                }
            }
            Err(windlass_runtime::SandboxError::NotFound(_)) => {}
            Err(e) => errors.push(e.to_string()),
        }
        // Bundles left by containers the runtime no longer lists (e.g. a create that failed half-way).
        let bundles = self.pod_dir(uid).join("bundles").join(sandbox_id);
        if let Ok(entries) = fs::read_dir(&bundles) {
            for entry in entries.flatten() {
                let cid = entry.file_name().to_string_lossy().into_owned();
                if let Err(e) = self
                    .images
                    .remove_bundle(&Self::lease_id(sandbox_id, &cid), &entry.path())
                {
                    errors.push(e.to_string());
                }
                let _ = self.images.release(&Self::lease_id(sandbox_id, &cid));
            }
        }
        if let Err(e) = fs::remove_dir_all(&bundles) {
            if e.kind() != io::ErrorKind::NotFound {
                errors.push(format!("{}: {e}", bundles.display()));
            }
        }
        if let Err(e) = self.sandboxes.remove_sandbox(sandbox_id) {
            errors.push(e.to_string());
        }
        let _ = fs::remove_dir_all(self.records_dir(uid, sandbox_id));
        errors
    }
}
