//! Finding a pod's containers from the runtime's state alone (sandbox labels and container IDs as `layout` names
//! them), so the API serves whatever the pod workers run, also right after a kubelet restart.

use std::path::{Path, PathBuf};

use windlass_runtime::{ContainerInfo, SandboxInfo, SandboxManager, SandboxState, Status};

use crate::layout;

/// Why a pod or container could not be found (404s) or the runtime could not be read (500).
#[derive(Debug, thiserror::Error)]
pub(crate) enum LookupError {
    #[error("pod {namespace}/{name} not found on this node")]
    PodNotFound { namespace: String, name: String },
    #[error("container {container:?} not found in pod {namespace}/{name}")]
    ContainerNotFound {
        namespace: String,
        name: String,
        container: String,
    },
    #[error("previous terminated container {container:?} in pod {name:?} not found")]
    NoPrevious { name: String, container: String },
    #[error("container runtime: {0}")]
    Runtime(#[from] windlass_runtime::SandboxError),
}

/// A pod as found in the runtime: its UID and sandboxes (oldest attempt first).
#[derive(Debug, Clone)]
pub(crate) struct Pod {
    pub namespace: String,
    pub name: String,
    pub uid: String,
    pub sandboxes: Vec<SandboxInfo>,
}

/// One instance (restart) of a container.
#[derive(Debug, Clone)]
pub(crate) struct Instance {
    pub sandbox_id: String,
    pub restart: u32,
    pub info: Option<ContainerInfo>,
    pub log_path: PathBuf,
}

impl Instance {
    pub fn running(&self) -> bool {
        self.info
            .as_ref()
            .is_some_and(|i| i.status == Status::Running)
    }
}

fn label<'a>(sb: &'a SandboxInfo, key: &str) -> &'a str {
    sb.labels.get(key).map(String::as_str).unwrap_or_default()
}

fn attempt(sb: &SandboxInfo) -> u32 {
    label(sb, layout::LABEL_SANDBOX_ATTEMPT)
        .parse()
        .ok()
        .or_else(|| sb.id.rsplit_once('-').and_then(|(_, a)| a.parse().ok()))
        .unwrap_or(0)
}

/// Every pod with a sandbox on this node, grouped by UID.
pub(crate) fn list_pods(mgr: &SandboxManager) -> Result<Vec<Pod>, LookupError> {
    let mut pods: Vec<Pod> = Vec::new();
    for sb in mgr.list_sandboxes()? {
        let uid = label(&sb, layout::LABEL_POD_UID).to_string();
        if uid.is_empty() {
            continue;
        }
        match pods.iter_mut().find(|p| p.uid == uid) {
            Some(p) => p.sandboxes.push(sb),
            None => pods.push(Pod {
                namespace: label(&sb, layout::LABEL_POD_NAMESPACE).to_string(),
                name: label(&sb, layout::LABEL_POD_NAME).to_string(),
                uid,
                sandboxes: vec![sb],
            }),
        }
    }
    for p in &mut pods {
        p.sandboxes.sort_by_key(attempt);
    }
    Ok(pods)
}

/// The pod `namespace/name`. When a pod of that name was deleted and created again, the sandboxes of both UIDs may
/// still exist for a moment: the one with a ready sandbox, then the most recently created, wins.
pub(crate) fn find_pod(
    mgr: &SandboxManager,
    namespace: &str,
    name: &str,
) -> Result<Pod, LookupError> {
    let mut candidates: Vec<Pod> = list_pods(mgr)?
        .into_iter()
        .filter(|p| p.namespace == namespace && p.name == name)
        .collect();
    candidates.sort_by_key(|p| {
        let ready = p.sandboxes.iter().any(|s| s.state == SandboxState::Ready);
        let created = p
            .sandboxes
            .iter()
            .map(|s| s.created.clone())
            .max()
            .unwrap_or_default();
        (ready, created)
    });
    candidates.pop().ok_or_else(|| LookupError::PodNotFound {
        namespace: namespace.into(),
        name: name.into(),
    })
}

/// The instances of container `container` of `pod`, oldest first: those the runtime still has, plus older ones
/// of which only the log file is left.
pub(crate) fn instances(
    mgr: &SandboxManager,
    root_dir: &Path,
    pod: &Pod,
    container: &str,
) -> Result<Vec<Instance>, LookupError> {
    let mut out: Vec<Instance> = Vec::new();
    for sb in &pod.sandboxes {
        let containers = match mgr.list_containers(&sb.id) {
            Ok(c) => c,
            // Removed between listing and reading: nothing of it to serve.
            Err(windlass_runtime::SandboxError::NotFound(_)) => continue,
            Err(e) => return Err(e.into()),
        };
        for c in containers {
            let Some((name, restart)) = layout::parse_container_id(&c.id) else {
                continue;
            };
            if name != container {
                continue;
            }
            let log_path = c.log_path.clone().unwrap_or_else(|| {
                layout::container_log_path(
                    root_dir,
                    &pod.namespace,
                    &pod.name,
                    &pod.uid,
                    container,
                    restart,
                )
            });
            out.push(Instance {
                sandbox_id: sb.id.clone(),
                restart,
                info: Some(c),
                log_path,
            });
        }
    }
    // Logs of instances the runtime no longer has (upstream keeps the files of removed containers too).
    let dir = layout::pod_log_dir(root_dir, &pod.namespace, &pod.name, &pod.uid).join(container);
    if let Ok(entries) = std::fs::read_dir(&dir) {
        for e in entries.flatten() {
            let file = e.file_name();
            let Some(restart) = file
                .to_str()
                .and_then(|f| f.strip_suffix(".log"))
                .and_then(|n| n.parse::<u32>().ok())
            else {
                continue;
            };
            if out.iter().any(|i| i.restart == restart) {
                continue;
            }
            out.push(Instance {
                sandbox_id: String::new(),
                restart,
                info: None,
                log_path: e.path(),
            });
        }
    }
    out.sort_by_key(|i| i.restart);
    if out.is_empty() {
        return Err(LookupError::ContainerNotFound {
            namespace: pod.namespace.clone(),
            name: pod.name.clone(),
            container: container.into(),
        });
    }
    Ok(out)
}

/// The newest instance, or with `previous` the one before it.
pub(crate) fn pick(
    mut instances: Vec<Instance>,
    previous: bool,
    pod: &Pod,
    container: &str,
) -> Result<Instance, LookupError> {
    let newest = instances.pop();
    let chosen = if previous { instances.pop() } else { newest };
    chosen.ok_or_else(|| LookupError::NoPrevious {
        name: pod.name.clone(),
        container: container.into(),
    })
}

/// The running instance of `container` (for exec and attach).
pub(crate) fn running_instance(
    mgr: &SandboxManager,
    root_dir: &Path,
    namespace: &str,
    name: &str,
    container: &str,
) -> Result<(Pod, Instance), LookupError> {
    let pod = find_pod(mgr, namespace, name)?;
    let inst = instances(mgr, root_dir, &pod, container)?;
    let running = inst
        .into_iter()
        .rev()
        .find(Instance::running)
        .ok_or_else(|| LookupError::ContainerNotFound {
            namespace: namespace.into(),
            name: name.into(),
            container: format!("{container} (running)"),
        })?;
    Ok((pod, running))
}
