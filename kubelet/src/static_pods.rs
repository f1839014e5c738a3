//! Static pods from `--pod-manifest-path`, as kubeadm runs its control plane, and their mirror pods.
//!
//! Ref: upstream `pkg/kubelet/config/file.go` and `common.go` (`applyDefaults`): every non-hidden file in the
//! directory (not recursive) holds one Pod (or a PodList) in YAML or JSON. The pod gets a UID hashed from its
//! content, the node and the file; its name gets `-<node-name>` appended; namespace defaults to `default`;
//! `spec.nodeName` is this node; annotations `kubernetes.io/config.hash` (= the UID),
//! `kubernetes.io/config.source: file` and `kubernetes.io/config.seen`; a NoExecute toleration for everything;
//! phase Pending. Its mirror pod in the API additionally carries `kubernetes.io/config.mirror` (= the hash) and
//! is owned by the Node.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use k8s_openapi::api::core::v1::{Pod, PodStatus, Toleration};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{OwnerReference, Time};
use k8s_openapi::jiff::Timestamp;
use sha2::{Digest, Sha256};

pub const CONFIG_HASH_ANNOTATION: &str = "kubernetes.io/config.hash";
pub const CONFIG_SOURCE_ANNOTATION: &str = "kubernetes.io/config.source";
pub const CONFIG_SEEN_ANNOTATION: &str = "kubernetes.io/config.seen";
pub const CONFIG_MIRROR_ANNOTATION: &str = "kubernetes.io/config.mirror";

/// A manifest that could not be used; the others still load.
#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    #[error("reading static pod manifests in {path}: {source}")]
    ReadDir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("reading static pod manifest {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("static pod manifest {path}: {reason}")]
    Invalid { path: PathBuf, reason: String },
}

/// A static pod and the file it came from.
#[derive(Debug, Clone, PartialEq)]
pub struct StaticPod {
    pub pod: Pod,
    pub source: PathBuf,
}

/// What a scan of the manifest directory found: the pods, and the files that were refused (upstream logs and
/// skips them).
#[derive(Debug, Default)]
pub struct Manifests {
    pub pods: Vec<StaticPod>,
    pub errors: Vec<ManifestError>,
}

/// Loads every manifest in `dir` (a missing directory is no pods, as upstream tolerates it).
pub fn load_dir(dir: &Path, node_name: &str, now: Timestamp) -> Result<Manifests, ManifestError> {
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Manifests::default()),
        Err(source) => {
            return Err(ManifestError::ReadDir {
                path: dir.to_path_buf(),
                source,
            })
        }
    };
    let mut files: Vec<PathBuf> = entries
        .filter_map(Result::ok)
        .filter(|e| !e.file_name().to_string_lossy().starts_with('.'))
        .map(|e| e.path())
        .filter(|p| p.is_file())
        .collect();
    files.sort();
    let mut out = Manifests::default();
    let mut names: BTreeMap<(String, String), PathBuf> = BTreeMap::new();
    for file in files {
        match load_file(&file, node_name, now) {
            Ok(pods) => {
                for p in pods {
                    let key = (
                        p.pod.metadata.namespace.clone().unwrap_or_default(),
                        p.pod.metadata.name.clone().unwrap_or_default(),
                    );
                    if let Some(first) = names.get(&key) {
                        out.errors.push(ManifestError::Invalid {
                            path: file.clone(),
                            reason: format!(
                                "pod {}/{} is already defined in {}",
                                key.0,
                                key.1,
                                first.display()
                            ),
                        });
                        continue;
                    }
                    names.insert(key, file.clone());
                    out.pods.push(p);
                }
            }
            Err(e) => out.errors.push(e),
        }
    }
    Ok(out)
}

/// Loads one manifest file (a Pod, or a PodList/List of pods).
pub fn load_file(
    path: &Path,
    node_name: &str,
    now: Timestamp,
) -> Result<Vec<StaticPod>, ManifestError> {
    let text = std::fs::read_to_string(path).map_err(|source| ManifestError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    let invalid = |reason: String| ManifestError::Invalid {
        path: path.to_path_buf(),
        reason,
    };
    // YAML is a superset of JSON, so one parser reads both.
    let value: serde_json::Value =
        serde_yaml_ng::from_str(&text).map_err(|e| invalid(format!("not YAML or JSON: {e}")))?;
    let kind = value.get("kind").and_then(|k| k.as_str()).unwrap_or("");
    let raw_pods = match kind {
        "Pod" => vec![value],
        "PodList" | "List" => value
            .get("items")
            .and_then(|i| i.as_array())
            .cloned()
            .unwrap_or_default(),
        "" => return Err(invalid("no \"kind\"".into())),
        other => return Err(invalid(format!("kind {other:?} is not a Pod"))),
    };
    raw_pods
        .into_iter()
        .map(|raw| {
            if raw.get("apiVersion").and_then(|v| v.as_str()) != Some("v1") {
                return Err(invalid("apiVersion must be v1".into()));
            }
            let pod: Pod =
                serde_json::from_value(raw.clone()).map_err(|e| invalid(e.to_string()))?;
            validate(&pod).map_err(invalid)?;
            Ok(StaticPod {
                pod: apply_defaults(pod, &raw, path, node_name, now),
                source: path.to_path_buf(),
            })
        })
        .collect()
}

fn validate(pod: &Pod) -> Result<(), String> {
    let name = pod.metadata.name.as_deref().unwrap_or("");
    if name.is_empty() {
        return Err("metadata.name is required".into());
    }
    let spec = pod.spec.as_ref().ok_or("spec is required")?;
    if spec.containers.is_empty() {
        return Err("spec.containers must not be empty".into());
    }
    let mut seen = std::collections::HashSet::new();
    for c in spec
        .containers
        .iter()
        .chain(spec.init_containers.iter().flatten())
    {
        if c.name.is_empty() {
            return Err("every container needs a name".into());
        }
        if !seen.insert(c.name.as_str()) {
            return Err(format!("container name {:?} is used twice", c.name));
        }
        if c.image.as_deref().unwrap_or("").is_empty() {
            return Err(format!("container {:?} has no image", c.name));
        }
    }
    Ok(())
}

/// The pod's config hash: SHA-256 over its manifest, the node and the file, as 32 hex digits (upstream hashes the
/// same inputs with MD5, which gives the same length).
pub fn config_hash(raw: &serde_json::Value, node_name: &str, source: &Path) -> String {
    let mut h = Sha256::new();
    // serde_json's Map is ordered, so the encoding is canonical for equal manifests.
    h.update(serde_json::to_vec(raw).unwrap_or_default());
    h.update(format!("host:{node_name}").as_bytes());
    h.update(format!("file:{}", source.display()).as_bytes());
    h.finalize()[..16]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn apply_defaults(
    mut pod: Pod,
    raw: &serde_json::Value,
    path: &Path,
    node_name: &str,
    now: Timestamp,
) -> Pod {
    let hash = config_hash(raw, node_name, path);
    if pod.metadata.uid.as_deref().unwrap_or("").is_empty() {
        pod.metadata.uid = Some(hash.clone());
    }
    let name = pod.metadata.name.take().unwrap_or_default();
    pod.metadata.name = Some(format!("{name}-{node_name}"));
    if pod.metadata.namespace.as_deref().unwrap_or("").is_empty() {
        pod.metadata.namespace = Some("default".into());
    }
    let annotations = pod.metadata.annotations.get_or_insert_with(BTreeMap::new);
    annotations.insert(
        CONFIG_HASH_ANNOTATION.into(),
        pod.metadata.uid.clone().unwrap_or(hash),
    );
    annotations.insert(CONFIG_SOURCE_ANNOTATION.into(), "file".into());
    annotations.insert(CONFIG_SEEN_ANNOTATION.into(), now.to_string());
    if let Some(spec) = pod.spec.as_mut() {
        spec.node_name = Some(node_name.into());
        let tolerations = spec.tolerations.get_or_insert_with(Vec::new);
        let everything = Toleration {
            operator: Some("Exists".into()),
            effect: Some("NoExecute".into()),
            ..Default::default()
        };
        if !tolerations.contains(&everything) {
            tolerations.push(everything);
        }
    }
    pod.status = Some(PodStatus {
        phase: Some("Pending".into()),
        ..Default::default()
    });
    pod
}

/// The mirror pod to create in the API for a static pod: the same pod with `kubernetes.io/config.mirror` set to
/// its hash, owned by the Node (so it goes when the node is deleted), without a UID (the API assigns one).
pub fn mirror_pod(static_pod: &Pod, node_name: &str, node_uid: &str) -> Pod {
    let mut m = static_pod.clone();
    let hash = static_pod
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(CONFIG_HASH_ANNOTATION))
        .cloned()
        .unwrap_or_default();
    m.metadata.uid = None;
    m.metadata.resource_version = None;
    m.metadata
        .annotations
        .get_or_insert_with(BTreeMap::new)
        .insert(CONFIG_MIRROR_ANNOTATION.into(), hash);
    m.metadata.owner_references = Some(vec![OwnerReference {
        api_version: "v1".into(),
        kind: "Node".into(),
        name: node_name.into(),
        uid: node_uid.into(),
        controller: Some(true),
        ..Default::default()
    }]);
    m.status = None;
    m
}

/// A static pod whose manifest went away, as its worker sees it: deleted now with the grace period its spec asks
/// for (upstream kills a removed static pod like a deleted API pod, `terminationGracePeriodSeconds`, default 30).
pub fn deleting(mut pod: Pod) -> Pod {
    let grace = pod
        .spec
        .as_ref()
        .and_then(|s| s.termination_grace_period_seconds)
        .unwrap_or(30);
    pod.metadata.deletion_timestamp = Some(Time(Timestamp::now()));
    pod.metadata.deletion_grace_period_seconds = Some(grace);
    pod
}

/// Whether an API pod is a mirror pod.
pub fn is_mirror_pod(pod: &Pod) -> bool {
    pod.metadata
        .annotations
        .as_ref()
        .is_some_and(|a| a.contains_key(CONFIG_MIRROR_ANNOTATION))
}

/// Whether `mirror` still matches `static_pod` (upstream recreates a mirror pod whose hash differs).
pub fn mirror_is_current(mirror: &Pod, static_pod: &Pod) -> bool {
    let get = |p: &Pod, k: &str| {
        p.metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get(k))
            .cloned()
    };
    get(mirror, CONFIG_MIRROR_ANNOTATION).is_some()
        && get(mirror, CONFIG_MIRROR_ANNOTATION) == get(static_pod, CONFIG_HASH_ANNOTATION)
}

#[cfg(test)]
mod tests {
    use super::*;

    const YAML: &str = "apiVersion: v1\nkind: Pod\nmetadata:\n  name: etcd\n  namespace: kube-system\nspec:\n  hostNetwork: true\n  containers:\n  - name: etcd\n    image: registry.local/etcd:3.5\n    command: [etcd]\n";

    fn now() -> Timestamp {
        Timestamp::from_second(1_700_000_000).unwrap()
    }

    #[test]
    fn yaml_and_json_manifests_load_with_static_pod_defaults() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("etcd.yaml"), YAML).unwrap();
        std::fs::write(
            dir.path().join("web.json"),
            r#"{"apiVersion":"v1","kind":"Pod","metadata":{"name":"web"},"spec":{"containers":[{"name":"w","image":"busybox"}]}}"#,
        )
        .unwrap();
        std::fs::write(dir.path().join(".hidden.yaml"), "garbage").unwrap();
        let m = load_dir(dir.path(), "node-a", now()).unwrap();
        assert!(m.errors.is_empty(), "{:?}", m.errors);
        assert_eq!(m.pods.len(), 2);
        let etcd = &m.pods[0].pod;
        assert_eq!(etcd.metadata.name.as_deref(), Some("etcd-node-a"));
        assert_eq!(etcd.metadata.namespace.as_deref(), Some("kube-system"));
        let a = etcd.metadata.annotations.as_ref().unwrap();
        assert_eq!(a[CONFIG_SOURCE_ANNOTATION], "file");
        assert_eq!(a[CONFIG_HASH_ANNOTATION].len(), 32);
        assert_eq!(Some(&a[CONFIG_HASH_ANNOTATION]), etcd.metadata.uid.as_ref());
        let spec = etcd.spec.as_ref().unwrap();
        assert_eq!(spec.node_name.as_deref(), Some("node-a"));
        assert_eq!(
            spec.tolerations.as_ref().unwrap()[0].effect.as_deref(),
            Some("NoExecute")
        );
        assert_eq!(
            etcd.status.as_ref().unwrap().phase.as_deref(),
            Some("Pending")
        );
        assert_eq!(m.pods[1].pod.metadata.namespace.as_deref(), Some("default"));
    }

    #[test]
    fn the_hash_changes_with_the_manifest_the_node_and_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("etcd.yaml");
        std::fs::write(&f, YAML).unwrap();
        let h = |node: &str| {
            load_file(&f, node, now()).unwrap()[0]
                .pod
                .metadata
                .uid
                .clone()
                .unwrap()
        };
        let first = h("node-a");
        assert_eq!(first, h("node-a"), "stable");
        assert_ne!(first, h("node-b"));
        std::fs::write(&f, YAML.replace("3.5", "3.6")).unwrap();
        assert_ne!(first, h("node-a"));
    }

    #[test]
    fn bad_manifests_are_reported_and_the_rest_still_load() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("a.yaml"), YAML).unwrap();
        std::fs::write(
            dir.path().join("b.yaml"),
            "kind: Deployment\napiVersion: apps/v1\n",
        )
        .unwrap();
        std::fs::write(
            dir.path().join("c.yaml"),
            "apiVersion: v1\nkind: Pod\nmetadata: {name: x}\nspec: {containers: []}\n",
        )
        .unwrap();
        std::fs::write(dir.path().join("d.yaml"), "{ not yaml: [").unwrap();
        std::fs::write(dir.path().join("e.yaml"), YAML).unwrap();
        let m = load_dir(dir.path(), "n", now()).unwrap();
        assert_eq!(m.pods.len(), 1);
        let errs: Vec<String> = m.errors.iter().map(ToString::to_string).collect();
        assert_eq!(errs.len(), 4, "{errs:?}");
        assert!(
            errs[0].contains("b.yaml") && errs[0].contains("not a Pod"),
            "{errs:?}"
        );
        assert!(errs[1].contains("containers must not be empty"), "{errs:?}");
        assert!(errs[2].contains("d.yaml"), "{errs:?}");
        assert!(errs[3].contains("already defined in"), "{errs:?}");
        assert!(load_dir(&dir.path().join("missing"), "n", now())
            .unwrap()
            .pods
            .is_empty());
    }

    #[test]
    fn mirror_pods_carry_the_hash_and_belong_to_the_node() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("etcd.yaml");
        std::fs::write(&f, YAML).unwrap();
        let p = load_file(&f, "node-a", now()).unwrap().remove(0).pod;
        let m = mirror_pod(&p, "node-a", "node-uid");
        assert!(is_mirror_pod(&m));
        assert!(!is_mirror_pod(&p));
        assert!(m.metadata.uid.is_none());
        let a = m.metadata.annotations.as_ref().unwrap();
        assert_eq!(a[CONFIG_MIRROR_ANNOTATION], a[CONFIG_HASH_ANNOTATION]);
        assert_eq!(
            m.metadata.owner_references.as_ref().unwrap()[0].name,
            "node-a"
        );
        assert!(mirror_is_current(&m, &p));
        let mut changed = p.clone();
        changed
            .metadata
            .annotations
            .as_mut()
            .unwrap()
            .insert(CONFIG_HASH_ANNOTATION.into(), "other".into());
        assert!(!mirror_is_current(&m, &changed));
    }
}
