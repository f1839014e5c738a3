//! Pod volumes on the node: emptyDir, hostPath, configMap, secret, downwardAPI and projected.
//!
//! Everything a pod's volumes need lives under `<root-dir>/pods/<uid>/volumes/<plugin>/<name>` (upstream's
//! layout, e.g. `kubernetes.io~empty-dir`), so teardown needs only the pod UID — a kubelet restarted after a pod
//! was deleted can still clean up. configMap/secret/downwardAPI/projected content goes through the
//! atomic writer ([`write_atomic`]), so calling [`VolumeManager::setup`] again on resync updates them atomically.

mod atomic_writer;
mod host_path;
mod projection;

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use k8s_openapi::api::core::v1::{ConfigMapProjection, Pod, SecretProjection, Volume};

pub use atomic_writer::{validate_path, write as write_atomic, FileProjection, Payload};
pub use host_path::check_host_path;
pub use projection::{token_expiration_seconds, NoTokens, TokenSource, DEFAULT_MODE};

use crate::env::{ConfigSource, EnvError, PodContext};
use crate::quantity::Amount;

/// What went wrong with a pod volume.
#[derive(Debug, thiserror::Error)]
pub enum VolumeError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("invalid volume payload for {path}: {reason}")]
    InvalidPayload { path: PathBuf, reason: String },
    #[error("{kind} \"{name}\" not found (namespace {namespace})")]
    SourceNotFound {
        kind: &'static str,
        namespace: String,
        name: String,
    },
    #[error("{kind} {namespace}/{name} references non-existent key {key}")]
    KeyNotFound {
        kind: &'static str,
        namespace: String,
        name: String,
        key: String,
    },
    #[error("reading {kind} {namespace}/{name}: {message}")]
    Source {
        kind: &'static str,
        namespace: String,
        name: String,
        message: String,
    },
    #[error("service account token for {namespace}/{service_account}: {message}")]
    Token {
        namespace: String,
        service_account: String,
        message: String,
    },
    #[error("downward API: {0}")]
    Downward(#[from] EnvError),
    #[error("hostPath type check failed: {path} {reason}")]
    HostPathType { path: PathBuf, reason: String },
    #[error("volume {volume}: unsupported volume type")]
    Unsupported { volume: String },
    #[error("volume {volume}: invalid sizeLimit {value:?}")]
    InvalidSize { volume: String, value: String },
    #[error("mounting tmpfs on {path}: {source}")]
    Mount { path: PathBuf, source: nix::Error },
    #[error("unmounting {path}: {source}")]
    Unmount { path: PathBuf, source: nix::Error },
    /// Teardown went through everything; these parts failed.
    #[error("volume teardown: {}", .0.iter().map(ToString::to_string).collect::<Vec<_>>().join("; "))]
    Teardown(Vec<VolumeError>),
}

/// Plugin directory names (upstream `kubernetes.io~<plugin>`).
const EMPTY_DIR: &str = "kubernetes.io~empty-dir";
const CONFIG_MAP: &str = "kubernetes.io~configmap";
const SECRET: &str = "kubernetes.io~secret";
const DOWNWARD_API: &str = "kubernetes.io~downward-api";
const PROJECTED: &str = "kubernetes.io~projected";

/// Settings for the node's volumes.
#[derive(Debug, Clone)]
pub struct VolumeManager {
    root_dir: PathBuf,
    /// Back secret volumes with tmpfs so they never touch disk (upstream does); tests on temp dirs turn it off.
    secrets_in_memory: bool,
}

/// A set-up volume: where its content is on the host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountedVolume {
    pub name: String,
    pub host_path: PathBuf,
    /// Whether the container must mount it read-only regardless of the mount's own flag (secret, configMap,
    /// downwardAPI and projected volumes are read-only upstream).
    pub read_only: bool,
}

impl VolumeManager {
    pub fn new(root_dir: impl Into<PathBuf>) -> Self {
        Self {
            root_dir: root_dir.into(),
            secrets_in_memory: true,
        }
    }

    /// Keeps secret volumes on the node's disk instead of tmpfs (for unprivileged tests).
    pub fn with_secrets_on_disk(mut self) -> Self {
        self.secrets_in_memory = false;
        self
    }

    /// `<root-dir>/pods/<uid>`.
    pub fn pod_dir(&self, pod_uid: &str) -> PathBuf {
        self.root_dir.join("pods").join(pod_uid)
    }

    fn volume_dir(&self, pod_uid: &str, plugin: &str, name: &str) -> PathBuf {
        self.pod_dir(pod_uid)
            .join("volumes")
            .join(plugin)
            .join(name)
    }

    /// Sets up (or refreshes) every volume of `pod`. On error, volumes set up by this call for the first time
    /// are left for [`Self::teardown`], which the pod worker runs when the pod goes away.
    pub fn setup(
        &self,
        pod: &Pod,
        ctx: &PodContext,
        source: &dyn ConfigSource,
        tokens: &dyn TokenSource,
    ) -> Result<Vec<MountedVolume>, VolumeError> {
        let uid = pod.metadata.uid.as_deref().unwrap_or_default();
        let ns = pod.metadata.namespace.as_deref().unwrap_or("default");
        let mut out = Vec::new();
        for v in pod.spec.iter().flat_map(|s| s.volumes.iter().flatten()) {
            out.push(self.setup_one(pod, uid, ns, v, ctx, source, tokens)?);
        }
        Ok(out)
    }

    #[allow(clippy::too_many_arguments)]
    fn setup_one(
        &self,
        pod: &Pod,
        uid: &str,
        ns: &str,
        v: &Volume,
        ctx: &PodContext,
        source: &dyn ConfigSource,
        tokens: &dyn TokenSource,
    ) -> Result<MountedVolume, VolumeError> {
        let mounted = |host_path: PathBuf, read_only: bool| MountedVolume {
            name: v.name.clone(),
            host_path,
            read_only,
        };
        if let Some(e) = &v.empty_dir {
            let dir = self.volume_dir(uid, EMPTY_DIR, &v.name);
            if e.medium.as_deref() == Some("Memory") {
                let size = match &e.size_limit {
                    Some(q) => Some(Amount::of(q).map_err(|_| VolumeError::InvalidSize {
                        volume: v.name.clone(),
                        value: q.0.clone(),
                    })?),
                    None => None,
                };
                mount_tmpfs(&dir, size.map(|s| s.value()))?;
            } else {
                make_dir(&dir)?;
            }
            // emptyDir is world-writable like upstream's (0777), so any container user can use it.
            std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o777))
                .map_err(|e| io(&dir, e))?;
            return Ok(mounted(dir, false));
        }
        if let Some(h) = &v.host_path {
            let path = PathBuf::from(&h.path);
            check_host_path(&path, h.type_.as_deref().unwrap_or(""))?;
            return Ok(mounted(path, false));
        }
        if let Some(cm) = &v.config_map {
            let dir = self.volume_dir(uid, CONFIG_MAP, &v.name);
            let proj = ConfigMapProjection {
                name: cm.name.clone(),
                items: cm.items.clone(),
                optional: cm.optional,
            };
            let payload = projection::config_map_payload(ns, &proj, mode(cm.default_mode), source)?;
            atomic_writer::write(&dir, &payload)?;
            return Ok(mounted(dir, true));
        }
        if let Some(s) = &v.secret {
            let dir = self.volume_dir(uid, SECRET, &v.name);
            let proj = SecretProjection {
                name: s.secret_name.clone().unwrap_or_default(),
                items: s.items.clone(),
                optional: s.optional,
            };
            // Resolve first: a missing secret must not leave a mount behind.
            let payload = projection::secret_payload(ns, &proj, mode(s.default_mode), source)?;
            if self.secrets_in_memory {
                mount_tmpfs(&dir, None)?;
            }
            atomic_writer::write(&dir, &payload)?;
            return Ok(mounted(dir, true));
        }
        if let Some(d) = &v.downward_api {
            let dir = self.volume_dir(uid, DOWNWARD_API, &v.name);
            let payload = projection::downward_payload(
                pod,
                ctx,
                d.items.as_deref().unwrap_or_default(),
                mode(d.default_mode),
            )?;
            atomic_writer::write(&dir, &payload)?;
            return Ok(mounted(dir, true));
        }
        if let Some(p) = &v.projected {
            let dir = self.volume_dir(uid, PROJECTED, &v.name);
            let default_mode = mode(p.default_mode);
            let mut payload = Payload::new();
            for s in p.sources.iter().flatten() {
                let part = if let Some(cm) = &s.config_map {
                    projection::config_map_payload(ns, cm, default_mode, source)?
                } else if let Some(sec) = &s.secret {
                    projection::secret_payload(ns, sec, default_mode, source)?
                } else if let Some(d) = &s.downward_api {
                    projection::downward_payload(
                        pod,
                        ctx,
                        d.items.as_deref().unwrap_or_default(),
                        default_mode,
                    )?
                } else if let Some(t) = &s.service_account_token {
                    projection::token_payload(pod, t, default_mode, tokens)?
                } else {
                    continue;
                };
                payload.extend(part);
            }
            atomic_writer::write(&dir, &payload)?;
            return Ok(mounted(dir, true));
        }
        Err(VolumeError::Unsupported {
            volume: v.name.clone(),
        })
    }

    /// Removes every volume of the pod: unmounts tmpfs-backed ones, deletes `<root-dir>/pods/<uid>/volumes`.
    /// Works from the directory alone (no pod spec needed), keeps going past failures and reports all of them;
    /// never follows into a mount it could not unmount.
    pub fn teardown(&self, pod_uid: &str) -> Result<(), VolumeError> {
        let volumes = self.pod_dir(pod_uid).join("volumes");
        let mut errors = Vec::new();
        let mut blocked = false;
        if let Ok(plugins) = std::fs::read_dir(&volumes) {
            for plugin in plugins.flatten() {
                let Ok(vols) = std::fs::read_dir(plugin.path()) else {
                    continue;
                };
                for vol in vols.flatten() {
                    let path = vol.path();
                    if is_mount_point(&path) {
                        if let Err(e) = unmount(&path) {
                            errors.push(e);
                            blocked = true;
                            continue;
                        }
                    }
                    if let Err(e) = std::fs::remove_dir_all(&path) {
                        if e.kind() != std::io::ErrorKind::NotFound {
                            errors.push(io(&path, e));
                        }
                    }
                }
            }
        }
        if !blocked {
            match std::fs::remove_dir_all(&volumes) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => errors.push(io(&volumes, e)),
            }
        }
        if errors.is_empty() {
            Ok(())
        } else {
            Err(VolumeError::Teardown(errors))
        }
    }
}

fn mode(m: Option<i32>) -> u32 {
    m.map(|m| (m as u32) & 0o7777).unwrap_or(DEFAULT_MODE)
}

fn io(path: &Path, source: std::io::Error) -> VolumeError {
    VolumeError::Io {
        path: path.to_path_buf(),
        source,
    }
}

fn make_dir(dir: &Path) -> Result<(), VolumeError> {
    std::fs::create_dir_all(dir).map_err(|e| io(dir, e))
}

/// Whether `path` is the root of a mount: its device differs from its parent's (or it is `/`).
pub(crate) fn is_mount_point(path: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    let (Ok(m), Some(parent)) = (std::fs::symlink_metadata(path), path.parent()) else {
        return false;
    };
    std::fs::metadata(parent).is_ok_and(|p| p.dev() != m.dev())
}

/// Mounts a tmpfs on `dir` (once: an existing mount is kept, so resync does not stack mounts).
fn mount_tmpfs(dir: &Path, size_bytes: Option<i64>) -> Result<(), VolumeError> {
    use nix::mount::{mount, MsFlags};
    make_dir(dir)?;
    if is_mount_point(dir) {
        return Ok(());
    }
    let mut opts = String::from("mode=0777");
    if let Some(size) = size_bytes.filter(|s| *s > 0) {
        opts.push_str(&format!(",size={size}"));
    }
    mount(
        Some("tmpfs"),
        dir,
        Some("tmpfs"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
        Some(opts.as_str()),
    )
    .map_err(|source| VolumeError::Mount {
        path: dir.to_path_buf(),
        source,
    })
}

fn unmount(dir: &Path) -> Result<(), VolumeError> {
    use nix::mount::{umount2, MntFlags};
    // A busy mount (a container still holds it) is detached so it goes once released, as upstream's
    // CleanupMountPoint falls back to.
    umount2(dir, MntFlags::empty())
        .or_else(|_| umount2(dir, MntFlags::MNT_DETACH))
        .map_err(|source| VolumeError::Unmount {
            path: dir.to_path_buf(),
            source,
        })
}

/// The volumes a container mounts, by name → host path, for the runtime's mount list.
pub fn by_name(volumes: &[MountedVolume]) -> BTreeMap<&str, &MountedVolume> {
    volumes.iter().map(|v| (v.name.as_str(), v)).collect()
}

#[cfg(test)]
mod tests;
