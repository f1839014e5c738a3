//! What a container mounts: its `volumeMounts` resolved against the pod's set-up volumes, the kubelet-managed
//! `/etc/hosts`, `/etc/resolv.conf`, `/etc/hostname`, and the termination-message file.
//!
//! Ref: upstream `pkg/kubelet/kubelet_pods.go` (`makeMounts`, `makeHostsMount`, subPath/subPathExpr checks) and
//! `kuberuntime_container.go` (termination message path under `<root-dir>/pods/<uid>/containers/<name>/`).

use std::io::Write;
use std::path::{Component, Path, PathBuf};

use k8s_openapi::api::core::v1::Container;

use crate::env::{expand, Env};
use crate::volumes::MountedVolume;

/// A bind mount for the runtime's OCI spec.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountSpec {
    pub source: PathBuf,
    pub destination: String,
    pub read_only: bool,
    /// `rprivate` (default), `rslave` (HostToContainer) or `rshared` (Bidirectional).
    pub propagation: &'static str,
}

/// Why a container's mounts cannot be built (a `CreateContainerConfigError`).
#[derive(Debug, thiserror::Error)]
pub enum MountError {
    #[error("cannot find volume \"{volume}\" to mount into container \"{container}\"")]
    NoVolume { volume: String, container: String },
    #[error("invalid subPath {sub_path:?} for volume {volume}: {reason}")]
    SubPath {
        volume: String,
        sub_path: String,
        reason: String,
    },
    #[error("unknown mountPropagation {0:?}")]
    Propagation(String),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

fn io(path: &Path, source: std::io::Error) -> MountError {
    MountError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Upstream `validateSubPath`-style checks, then resolves the subpath inside the volume, creating it as a
/// directory when missing (upstream does), and refuses one that escapes the volume through symlinks.
fn resolve_sub_path(volume: &MountedVolume, sub_path: &str) -> Result<PathBuf, MountError> {
    let bad = |reason: &str| MountError::SubPath {
        volume: volume.name.clone(),
        sub_path: sub_path.into(),
        reason: reason.into(),
    };
    let p = Path::new(sub_path);
    if p.is_absolute() {
        return Err(bad("must be a relative path"));
    }
    if p.components().any(|c| c == Component::ParentDir) {
        return Err(bad("must not contain '..'"));
    }
    // Walk one component at a time: every existing prefix must resolve inside the volume before anything is
    // created below it, so a symlink in the volume cannot make us create or mount host paths. (A container could
    // still swap a component between this check and the mount; upstream closes that with openat-based bind
    // mounts, which the runtime's mount code should use.)
    let root = volume
        .host_path
        .canonicalize()
        .map_err(|e| io(&volume.host_path, e))?;
    let mut cur = root.clone();
    for comp in p.components() {
        let Component::Normal(part) = comp else {
            continue;
        };
        let next = cur.join(part);
        match std::fs::symlink_metadata(&next) {
            Ok(_) => {
                let resolved = next.canonicalize().map_err(|e| io(&next, e))?;
                if !resolved.starts_with(&root) {
                    return Err(bad("resolves outside the volume"));
                }
                cur = resolved;
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                std::fs::create_dir(&next).map_err(|e| io(&next, e))?;
                cur = next;
            }
            Err(e) => return Err(io(&next, e)),
        }
    }
    Ok(cur)
}

/// The container's volume mounts, in spec order, plus `/etc/hosts` (unless the container mounts its own).
/// `env` expands `subPathExpr`.
pub fn container_mounts(
    container: &Container,
    volumes: &[MountedVolume],
    env: &Env,
    pod_files: Option<&PodFiles>,
) -> Result<Vec<MountSpec>, MountError> {
    let mut out = Vec::new();
    for vm in container.volume_mounts.iter().flatten() {
        let volume =
            volumes
                .iter()
                .find(|v| v.name == vm.name)
                .ok_or_else(|| MountError::NoVolume {
                    volume: vm.name.clone(),
                    container: container.name.clone(),
                })?;
        let sub_path = match (&vm.sub_path, &vm.sub_path_expr) {
            (Some(s), _) if !s.is_empty() => Some(s.clone()),
            (_, Some(e)) if !e.is_empty() => {
                let lookup = |n: &str| env.get(n).map(str::to_string);
                Some(expand(e, &lookup))
            }
            _ => None,
        };
        let source = match sub_path {
            Some(s) => resolve_sub_path(volume, &s)?,
            None => volume.host_path.clone(),
        };
        let propagation = match vm.mount_propagation.as_deref() {
            None | Some("") | Some("None") => "rprivate",
            Some("HostToContainer") => "rslave",
            Some("Bidirectional") => "rshared",
            Some(other) => return Err(MountError::Propagation(other.into())),
        };
        out.push(MountSpec {
            source,
            destination: vm.mount_path.clone(),
            read_only: vm.read_only.unwrap_or(false) || volume.read_only,
            propagation,
        });
    }
    if let Some(files) = pod_files {
        for (dest, src) in [
            ("/etc/hosts", &files.hosts),
            ("/etc/resolv.conf", &files.resolv_conf),
            ("/etc/hostname", &files.hostname),
        ] {
            if !out.iter().any(|m| m.destination == dest) {
                out.push(MountSpec {
                    source: src.clone(),
                    destination: dest.into(),
                    read_only: false,
                    propagation: "rprivate",
                });
            }
        }
    }
    Ok(out)
}

/// The per-pod files the kubelet manages under `<root-dir>/pods/<uid>/`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodFiles {
    pub hosts: PathBuf,
    pub resolv_conf: PathBuf,
    pub hostname: PathBuf,
}

fn write_replace(path: &Path, content: &str) -> Result<(), MountError> {
    // Write then rename, so a container reading the file never sees it half written.
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::File::create(&tmp).map_err(|e| io(&tmp, e))?;
    f.write_all(content.as_bytes()).map_err(|e| io(&tmp, e))?;
    f.sync_all().map_err(|e| io(&tmp, e))?;
    std::fs::rename(&tmp, path).map_err(|e| io(path, e))
}

/// Writes the pod's `etc-hosts`, `resolv.conf` and `hostname` under `pod_dir`.
pub fn write_pod_files(
    pod_dir: &Path,
    hosts: &str,
    resolv_conf: &str,
    hostname: &str,
) -> Result<PodFiles, MountError> {
    std::fs::create_dir_all(pod_dir).map_err(|e| io(pod_dir, e))?;
    let files = PodFiles {
        hosts: pod_dir.join("etc-hosts"),
        resolv_conf: pod_dir.join("resolv.conf"),
        hostname: pod_dir.join("hostname"),
    };
    write_replace(&files.hosts, hosts)?;
    write_replace(&files.resolv_conf, resolv_conf)?;
    write_replace(&files.hostname, hostname)?;
    Ok(files)
}

/// The termination-message file for one container instance (`<pod_dir>/containers/<name>/<instance>`), created
/// empty and world-writable so any container user can write its message; mounted at `terminationMessagePath`
/// (default `/dev/termination-log`).
pub fn termination_log_mount(
    pod_dir: &Path,
    container: &Container,
    instance: &str,
) -> Result<MountSpec, MountError> {
    use std::os::unix::fs::PermissionsExt;
    let dir = pod_dir.join("containers").join(&container.name);
    std::fs::create_dir_all(&dir).map_err(|e| io(&dir, e))?;
    let file = dir.join(instance);
    std::fs::File::create(&file).map_err(|e| io(&file, e))?;
    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o666))
        .map_err(|e| io(&file, e))?;
    Ok(MountSpec {
        source: file,
        destination: container
            .termination_message_path
            .clone()
            .filter(|p| !p.is_empty())
            .unwrap_or_else(|| "/dev/termination-log".into()),
        read_only: false,
        propagation: "rprivate",
    })
}

/// The message a terminated container leaves (upstream reads at most 4096 bytes; with
/// `FallbackToLogsOnError` the caller supplies the log tail when this is empty and the container failed).
pub fn read_termination_message(path: &Path) -> String {
    let data = std::fs::read(path).unwrap_or_default();
    String::from_utf8_lossy(&data[..data.len().min(4096)]).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::VolumeMount;

    fn vm(name: &str, path: &str) -> VolumeMount {
        VolumeMount {
            name: name.into(),
            mount_path: path.into(),
            ..Default::default()
        }
    }

    fn vol(name: &str, dir: &Path, read_only: bool) -> MountedVolume {
        MountedVolume {
            name: name.into(),
            host_path: dir.to_path_buf(),
            read_only,
        }
    }

    #[test]
    fn volume_mounts_resolve_with_sub_paths_read_only_and_propagation() {
        let d = tempfile::tempdir().unwrap();
        let data = d.path().join("data");
        let cfg = d.path().join("cfg");
        std::fs::create_dir_all(&data).unwrap();
        std::fs::create_dir_all(&cfg).unwrap();
        let mut env = Env::default();
        env.set("POD".into(), "web-0".into());
        let c = Container {
            name: "app".into(),
            volume_mounts: Some(vec![
                VolumeMount {
                    sub_path: Some("logs".into()),
                    read_only: Some(true),
                    ..vm("data", "/var/log/app")
                },
                VolumeMount {
                    sub_path_expr: Some("pods/$(POD)".into()),
                    mount_propagation: Some("HostToContainer".into()),
                    ..vm("data", "/per-pod")
                },
                vm("cfg", "/etc/app"),
            ]),
            ..Default::default()
        };
        let volumes = [vol("data", &data, false), vol("cfg", &cfg, true)];
        let files = write_pod_files(
            d.path(),
            "127.0.0.1\tlocalhost\n",
            "nameserver 10.96.0.10\n",
            "web\n",
        )
        .unwrap();
        let m = container_mounts(&c, &volumes, &env, Some(&files)).unwrap();
        let data = data.canonicalize().unwrap();
        assert_eq!(m[0].source, data.join("logs"));
        assert!(m[0].read_only);
        assert!(data.join("logs").is_dir(), "subPath created");
        assert_eq!(m[1].source, data.join("pods/web-0"));
        assert_eq!(m[1].propagation, "rslave");
        assert!(m[2].read_only, "configMap-like volumes are read-only");
        let dests: Vec<&str> = m.iter().map(|m| m.destination.as_str()).collect();
        assert_eq!(
            dests,
            vec![
                "/var/log/app",
                "/per-pod",
                "/etc/app",
                "/etc/hosts",
                "/etc/resolv.conf",
                "/etc/hostname"
            ]
        );
        assert_eq!(
            std::fs::read_to_string(&files.resolv_conf).unwrap(),
            "nameserver 10.96.0.10\n"
        );
    }

    #[test]
    fn escaping_sub_paths_and_unknown_volumes_are_refused() {
        let d = tempfile::tempdir().unwrap();
        let data = d.path().join("data");
        std::fs::create_dir_all(&data).unwrap();
        std::os::unix::fs::symlink("/etc", data.join("evil")).unwrap();
        let volumes = [vol("data", &data, false)];
        let with = |sub: &str| Container {
            name: "app".into(),
            volume_mounts: Some(vec![VolumeMount {
                sub_path: Some(sub.into()),
                ..vm("data", "/x")
            }]),
            ..Default::default()
        };
        for (sub, why) in [
            ("../x", "'..'"),
            ("/etc", "relative"),
            ("evil", "outside the volume"),
        ] {
            let err = container_mounts(&with(sub), &volumes, &Env::default(), None).unwrap_err();
            assert!(err.to_string().contains(why), "{sub}: {err}");
        }
        assert!(!Path::new("/etc/windlass-must-not-exist").exists());
        let c = Container {
            name: "app".into(),
            volume_mounts: Some(vec![vm("nope", "/x")]),
            ..Default::default()
        };
        let err = container_mounts(&c, &volumes, &Env::default(), None).unwrap_err();
        assert_eq!(
            err.to_string(),
            "cannot find volume \"nope\" to mount into container \"app\""
        );
    }

    #[test]
    fn a_container_mounting_its_own_hosts_file_keeps_it() {
        let d = tempfile::tempdir().unwrap();
        let files = write_pod_files(d.path(), "h", "r", "n").unwrap();
        let c = Container {
            name: "app".into(),
            volume_mounts: Some(vec![vm("v", "/etc/hosts")]),
            ..Default::default()
        };
        let m = container_mounts(
            &c,
            &[vol("v", d.path(), false)],
            &Env::default(),
            Some(&files),
        )
        .unwrap();
        assert_eq!(
            m.iter().filter(|m| m.destination == "/etc/hosts").count(),
            1
        );
        assert_eq!(m[0].source, d.path());
    }

    #[test]
    fn the_termination_log_is_a_writable_file_per_instance() {
        let d = tempfile::tempdir().unwrap();
        let c = Container {
            name: "app".into(),
            ..Default::default()
        };
        let m = termination_log_mount(d.path(), &c, "0a1b").unwrap();
        assert_eq!(m.destination, "/dev/termination-log");
        assert_eq!(m.source, d.path().join("containers/app/0a1b"));
        std::fs::write(&m.source, "x".repeat(5000)).unwrap();
        assert_eq!(read_termination_message(&m.source).len(), 4096);
    }
}
