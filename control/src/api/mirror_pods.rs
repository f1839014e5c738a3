//! What NodeRestriction lets a kubelet create: mirror pods of its static pods, and nothing else.
//!
//! Ref: upstream `plugin/pkg/admission/noderestriction/admission.go` (`admitPodCreate`): the pod must carry the
//! `kubernetes.io/config.mirror` annotation, be bound to the node, have exactly one owner reference — the node
//! itself (`v1`, `Node`, its name and UID), as controller, without `blockOwnerDeletion` — and reference no other
//! API object: no service account, no secrets (image pull secrets, env, envFrom, secret and projected volumes and
//! the volume plugins' secret references), no configMaps, no persistentVolumeClaims or ephemeral volumes, no
//! resource claims. A static pod that needs such objects has to be a normal pod.

use serde_json::Value;

/// The annotation marking a mirror pod (upstream `MirrorPodAnnotationKey`).
pub(crate) const MIRROR_ANNOTATION: &str = "kubernetes.io/config.mirror";

/// Why `node` (whose Node object has `node_uid`; `None` when it does not exist) may not create `pod`.
pub(crate) fn refuse_create(node: &str, node_uid: Option<&str>, pod: &Value) -> Option<String> {
    let has_mirror_annotation = pod
        .pointer("/metadata/annotations")
        .and_then(Value::as_object)
        .is_some_and(|a| a.contains_key(MIRROR_ANNOTATION));
    if !has_mirror_annotation {
        return Some(format!(
            "pod does not have \"{MIRROR_ANNOTATION}\" annotation, node \"{node}\" can only create mirror pods"
        ));
    }
    if pod.pointer("/spec/nodeName").and_then(Value::as_str) != Some(node) {
        return Some(format!(
            "node \"{node}\" can only create pods with spec.nodeName set to itself"
        ));
    }
    let owners = pod
        .pointer("/metadata/ownerReferences")
        .and_then(Value::as_array)
        .map(Vec::as_slice)
        .unwrap_or_default();
    let owner = match owners {
        [] => {
            return Some(format!(
                "node \"{node}\" can only create pods with an owner reference set to itself"
            ))
        }
        [one] => one,
        _ => {
            return Some(format!(
                "node \"{node}\" can only create pods with a single owner reference set to itself"
            ))
        }
    };
    let field = |k: &str| owner.get(k).and_then(Value::as_str);
    if field("apiVersion") != Some("v1")
        || field("kind") != Some("Node")
        || field("name") != Some(node)
    {
        return Some(format!(
            "node \"{node}\" can only create pods with an owner reference set to itself"
        ));
    }
    if owner.get("controller").and_then(Value::as_bool) != Some(true) {
        return Some(format!(
            "node \"{node}\" can only create pods with a controller owner reference set to itself"
        ));
    }
    if owner.get("blockOwnerDeletion").and_then(Value::as_bool) == Some(true) {
        return Some(format!(
            "node \"{node}\" must not set blockOwnerDeletion on an owner reference"
        ));
    }
    match node_uid {
        None => return Some(format!("node \"{node}\" not found")),
        Some(uid) if field("uid") != Some(uid) => {
            return Some(format!(
                "node {node} UID mismatch: expected {uid} got {}",
                field("uid").unwrap_or_default()
            ))
        }
        Some(_) => {}
    }
    let spec = pod.get("spec").cloned().unwrap_or(Value::Null);
    if spec
        .get("serviceAccountName")
        .and_then(Value::as_str)
        .is_some_and(|s| !s.is_empty())
        || spec
            .get("serviceAccount")
            .and_then(Value::as_str)
            .is_some_and(|s| !s.is_empty())
    {
        return Some(format!(
            "node \"{node}\" can not create pods that reference a service account"
        ));
    }
    if references_secrets(&spec) {
        return Some(format!(
            "node \"{node}\" can not create pods that reference secrets"
        ));
    }
    if references_config_maps(&spec) {
        return Some(format!(
            "node \"{node}\" can not create pods that reference configmaps"
        ));
    }
    for v in array(&spec, "volumes") {
        if v.get("persistentVolumeClaim").is_some() || v.get("ephemeral").is_some() {
            return Some(format!(
                "node \"{node}\" can not create pods that reference persistentvolumeclaims"
            ));
        }
    }
    if !array(&spec, "resourceClaims").is_empty() {
        return Some(format!(
            "node \"{node}\" can not create pods that reference resourceclaims"
        ));
    }
    None
}

fn array<'a>(v: &'a Value, key: &str) -> &'a [Value] {
    v.get(key)
        .and_then(Value::as_array)
        .map(Vec::as_slice)
        .unwrap_or_default()
}

/// Every container of the pod: init, regular and ephemeral (upstream `AllContainers`).
fn containers(spec: &Value) -> impl Iterator<Item = &Value> {
    array(spec, "initContainers")
        .iter()
        .chain(array(spec, "containers"))
        .chain(array(spec, "ephemeralContainers"))
}

/// Upstream `VisitPodSecretNames`.
fn references_secrets(spec: &Value) -> bool {
    if !array(spec, "imagePullSecrets").is_empty() {
        return true;
    }
    for c in containers(spec) {
        if array(c, "envFrom")
            .iter()
            .any(|f| f.get("secretRef").is_some())
            || array(c, "env")
                .iter()
                .any(|e| e.pointer("/valueFrom/secretKeyRef").is_some())
        {
            return true;
        }
    }
    for v in array(spec, "volumes") {
        let plugin_secret = [
            "/secret",
            "/azureFile/secretName",
            "/cephfs/secretRef",
            "/cinder/secretRef",
            "/flexVolume/secretRef",
            "/iscsi/secretRef",
            "/rbd/secretRef",
            "/scaleIO/secretRef",
            "/storageos/secretRef",
            "/csi/nodePublishSecretRef",
        ];
        if plugin_secret.iter().any(|p| v.pointer(p).is_some()) {
            return true;
        }
        if v.get("projected").is_some_and(|p| {
            array(p, "sources")
                .iter()
                .any(|s| s.get("secret").is_some())
        }) {
            return true;
        }
    }
    false
}

/// Upstream `VisitPodConfigmapNames`.
fn references_config_maps(spec: &Value) -> bool {
    for c in containers(spec) {
        if array(c, "envFrom")
            .iter()
            .any(|f| f.get("configMapRef").is_some())
            || array(c, "env")
                .iter()
                .any(|e| e.pointer("/valueFrom/configMapKeyRef").is_some())
        {
            return true;
        }
    }
    array(spec, "volumes").iter().any(|v| {
        v.get("configMap").is_some()
            || v.get("projected").is_some_and(|p| {
                array(p, "sources")
                    .iter()
                    .any(|s| s.get("configMap").is_some())
            })
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a panic in a test is its failure message
mod tests {
    use super::*;
    use serde_json::json;

    fn mirror() -> Value {
        json!({
            "metadata": {
                "name": "web-n1",
                "annotations": {MIRROR_ANNOTATION: "abc"},
                "ownerReferences": [{"apiVersion": "v1", "kind": "Node", "name": "n1", "uid": "u1", "controller": true}],
            },
            "spec": {"nodeName": "n1", "containers": [{"name": "w", "image": "busybox"}]},
        })
    }

    #[test]
    fn a_node_may_create_its_own_mirror_pods() {
        assert_eq!(refuse_create("n1", Some("u1"), &mirror()), None);
    }

    #[test]
    fn a_node_may_not_create_ordinary_pods_or_mirror_pods_of_other_nodes() {
        let mut plain = mirror();
        plain["metadata"]["annotations"] = json!({});
        assert!(refuse_create("n1", Some("u1"), &plain)
            .unwrap()
            .contains("can only create mirror pods"));
        let mut other = mirror();
        other["spec"]["nodeName"] = json!("n2");
        assert!(refuse_create("n1", Some("u1"), &other)
            .unwrap()
            .contains("spec.nodeName set to itself"));
        assert!(refuse_create("n1", Some("u2"), &mirror())
            .unwrap()
            .contains("UID mismatch"));
        assert!(refuse_create("n1", None, &mirror()).is_some());
        let mut not_controller = mirror();
        not_controller["metadata"]["ownerReferences"][0]["controller"] = json!(false);
        assert!(refuse_create("n1", Some("u1"), &not_controller).is_some());
        let mut blocking = mirror();
        blocking["metadata"]["ownerReferences"][0]["blockOwnerDeletion"] = json!(true);
        assert!(refuse_create("n1", Some("u1"), &blocking).is_some());
        let mut orphan = mirror();
        orphan["metadata"]["ownerReferences"] = json!([]);
        assert!(refuse_create("n1", Some("u1"), &orphan).is_some());
    }

    #[test]
    fn mirror_pods_may_not_reference_other_api_objects() {
        let cases = [
            ("serviceAccountName", json!("builder"), "service account"),
            ("imagePullSecrets", json!([{"name": "reg"}]), "secrets"),
            (
                "volumes",
                json!([{"name": "s", "secret": {"secretName": "x"}}]),
                "secrets",
            ),
            (
                "volumes",
                json!([{"name": "p", "projected": {"sources": [{"configMap": {"name": "x"}}]}}]),
                "configmaps",
            ),
            (
                "volumes",
                json!([{"name": "c", "persistentVolumeClaim": {"claimName": "x"}}]),
                "persistentvolumeclaims",
            ),
            (
                "containers",
                json!([{"name": "w", "image": "b", "env": [{"name": "A", "valueFrom": {"configMapKeyRef": {"name": "x", "key": "k"}}}]}]),
                "configmaps",
            ),
            (
                "containers",
                json!([{"name": "w", "image": "b", "envFrom": [{"secretRef": {"name": "x"}}]}]),
                "secrets",
            ),
        ];
        for (field, value, why) in cases {
            let mut p = mirror();
            p["spec"][field] = value;
            let refused = refuse_create("n1", Some("u1"), &p);
            assert!(
                refused.as_deref().is_some_and(|r| r.contains(why)),
                "{field}: {refused:?}"
            );
        }
        let mut host_path = mirror();
        host_path["spec"]["volumes"] = json!([{"name": "h", "hostPath": {"path": "/etc"}}]);
        assert_eq!(refuse_create("n1", Some("u1"), &host_path), None);
    }
}
