//! Where a pod lives on the node: sandbox and container IDs, their labels, and log paths.
//!
//! The pod workers create sandboxes and containers under these names, and everything that finds them again (a
//! restarted kubelet adopting its pods, the kubelet API serving logs and exec) reads the same names, so they are
//! fixed here and nowhere else. Log paths follow upstream's `/var/log/pods/<namespace>_<name>_<uid>/<container>/
//! <restart>.log` layout, below `--root-dir`.

use std::path::{Path, PathBuf};

/// Sandbox labels (upstream's CRI label keys) that tie a sandbox to its pod.
pub const LABEL_POD_NAME: &str = "io.kubernetes.pod.name";
pub const LABEL_POD_NAMESPACE: &str = "io.kubernetes.pod.namespace";
pub const LABEL_POD_UID: &str = "io.kubernetes.pod.uid";
/// How many sandboxes the pod had before this one (upstream's sandbox `Attempt`).
pub const LABEL_SANDBOX_ATTEMPT: &str = "windlass.io/sandbox-attempt";

/// The runtime's sandbox state root below `--root-dir`.
pub fn sandboxes_dir(root_dir: &Path) -> PathBuf {
    root_dir.join("sandboxes")
}

/// The image store below `--root-dir`.
pub fn images_dir(root_dir: &Path) -> PathBuf {
    root_dir.join("images")
}

/// Per-pod state (volumes, `/etc/hosts`, resolv.conf, termination logs) below `--root-dir`.
pub fn pod_dir(root_dir: &Path, pod_uid: &str) -> PathBuf {
    root_dir.join("pods").join(pod_uid)
}

/// A sandbox ID: the pod UID and the attempt, so a recreated sandbox never reuses a name.
pub fn sandbox_id(pod_uid: &str, attempt: u32) -> String {
    format!("{pod_uid}-{attempt}")
}

/// A container ID inside its sandbox: the spec container's name and its restart count. Container names are DNS
/// labels (no '.'), so the split in [`parse_container_id`] is unambiguous.
pub fn container_id(container_name: &str, restart_count: u32) -> String {
    format!("{container_name}.{restart_count}")
}

/// `(container name, restart count)` of an ID made by [`container_id`].
pub fn parse_container_id(id: &str) -> Option<(&str, u32)> {
    let (name, restart) = id.rsplit_once('.')?;
    if name.is_empty() || name.contains('.') {
        return None;
    }
    Some((name, restart.parse().ok()?))
}

/// The directory of a pod's container logs.
pub fn pod_log_dir(root_dir: &Path, namespace: &str, name: &str, pod_uid: &str) -> PathBuf {
    root_dir
        .join("logs")
        .join(format!("{namespace}_{name}_{pod_uid}"))
}

/// The CRI-format log of one container instance.
pub fn container_log_path(
    root_dir: &Path,
    namespace: &str,
    name: &str,
    pod_uid: &str,
    container_name: &str,
    restart_count: u32,
) -> PathBuf {
    pod_log_dir(root_dir, namespace, name, pod_uid)
        .join(container_name)
        .join(format!("{restart_count}.log"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn container_ids_round_trip_and_foreign_ids_are_refused() {
        assert_eq!(container_id("web-1", 3), "web-1.3");
        assert_eq!(parse_container_id("web-1.3"), Some(("web-1", 3)));
        assert_eq!(parse_container_id("web"), None);
        assert_eq!(parse_container_id("a.b.1"), None);
        assert_eq!(parse_container_id("web.x"), None);
    }

    #[test]
    fn logs_follow_upstreams_pod_log_layout() {
        assert_eq!(
            container_log_path(Path::new("/k"), "default", "nginx", "u1", "web", 0),
            PathBuf::from("/k/logs/default_nginx_u1/web/0.log")
        );
        assert_eq!(sandbox_id("u1", 2), "u1-2");
    }
}
