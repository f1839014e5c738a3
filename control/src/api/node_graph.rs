//! The part of upstream's Node authorizer graph Windlass needs: which secrets and configMaps the pods bound to a
//! node use. A kubelet (`system:node:<name>`) may read a secret or configMap only when a pod bound to its node
//! references it, and only one object at a time: a get, or a list/watch narrowed to one name by a `metadata.name`
//! field selector (what a kubelet's watch-based secret manager sends). Without this, the `system:node` role would
//! let any node read every secret in the cluster.
//!
//! Ref: `plugin/pkg/auth/authorizer/node/node_authorizer.go` (`authorizeReadNamespacedObject`: "can only read
//! individual resources of this type", "no relationship found between node ... and this object"), and
//! `pkg/api/v1/pod/util.go` (`VisitPodSecretNames`, `VisitPodConfigmapNames`) for which pod fields are edges.

use serde::Deserialize;

use super::cache::Projected;
use super::rbac::Attributes;
use super::{resources, State};
use crate::store::{KeyValue, ListOptions, StoreError};

/// The secrets and configMaps one pod bound to a node uses.
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct PodRefs {
    pub node: String,
    pub secrets: Vec<String>,
    pub config_maps: Vec<String>,
}

/// The kinds of object a pod's references lead to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Referenced {
    Secret,
    ConfigMap,
}

impl Referenced {
    /// The kind a core-group request on `resource` reads, if it is one of the graph's.
    pub(crate) fn of_resource(resource: &str) -> Option<Self> {
        match resource {
            "secrets" => Some(Self::Secret),
            "configmaps" => Some(Self::ConfigMap),
            _ => None,
        }
    }

    fn singular(self) -> &'static str {
        match self {
            Self::Secret => "secret",
            Self::ConfigMap => "configmap",
        }
    }
}

impl PodRefs {
    fn uses(&self, node: &str, what: Referenced, name: &str) -> bool {
        let names = match what {
            Referenced::Secret => &self.secrets,
            Referenced::ConfigMap => &self.config_maps,
        };
        self.node == node && names.iter().any(|n| n == name)
    }
}

// Just the pod fields that are edges of the graph; serde skips the rest of the object.
#[derive(Deserialize, Default)]
#[serde(default, rename_all = "camelCase")]
struct PodDoc {
    spec: SpecDoc,
}

#[derive(Deserialize, Default)]
#[serde(default, rename_all = "camelCase")]
struct SpecDoc {
    node_name: Option<String>,
    volumes: Vec<VolumeDoc>,
    containers: Vec<ContainerDoc>,
    init_containers: Vec<ContainerDoc>,
    ephemeral_containers: Vec<ContainerDoc>,
    image_pull_secrets: Vec<NameRef>,
}

/// A `LocalObjectReference` (or any `{name}` reference).
#[derive(Deserialize, Default)]
#[serde(default)]
struct NameRef {
    name: Option<String>,
}

/// Volume sources that name their secret `secretName`.
#[derive(Deserialize, Default)]
#[serde(default, rename_all = "camelCase")]
struct SecretNamed {
    secret_name: Option<String>,
}

/// Volume sources that name their secret `secretRef`.
#[derive(Deserialize, Default)]
#[serde(default, rename_all = "camelCase")]
struct SecretReferring {
    secret_ref: Option<NameRef>,
}

#[derive(Deserialize, Default)]
#[serde(default, rename_all = "camelCase")]
struct VolumeDoc {
    secret: Option<SecretNamed>,
    azure_file: Option<SecretNamed>,
    config_map: Option<NameRef>,
    projected: Option<ProjectedDoc>,
    csi: Option<CsiDoc>,
    cephfs: Option<SecretReferring>,
    cinder: Option<SecretReferring>,
    flex_volume: Option<SecretReferring>,
    iscsi: Option<SecretReferring>,
    rbd: Option<SecretReferring>,
    #[serde(rename = "scaleIO")]
    scale_io: Option<SecretReferring>,
    storageos: Option<SecretReferring>,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct ProjectedDoc {
    sources: Vec<ProjectionDoc>,
}

#[derive(Deserialize, Default)]
#[serde(default, rename_all = "camelCase")]
struct ProjectionDoc {
    secret: Option<NameRef>,
    config_map: Option<NameRef>,
}

#[derive(Deserialize, Default)]
#[serde(default, rename_all = "camelCase")]
struct CsiDoc {
    node_publish_secret_ref: Option<NameRef>,
}

#[derive(Deserialize, Default)]
#[serde(default, rename_all = "camelCase")]
struct ContainerDoc {
    env: Vec<EnvDoc>,
    env_from: Vec<EnvFromDoc>,
}

#[derive(Deserialize, Default)]
#[serde(default, rename_all = "camelCase")]
struct EnvDoc {
    value_from: Option<EnvSourceDoc>,
}

#[derive(Deserialize, Default)]
#[serde(default, rename_all = "camelCase")]
struct EnvSourceDoc {
    secret_key_ref: Option<NameRef>,
    config_map_key_ref: Option<NameRef>,
}

#[derive(Deserialize, Default)]
#[serde(default, rename_all = "camelCase")]
struct EnvFromDoc {
    secret_ref: Option<NameRef>,
    config_map_ref: Option<NameRef>,
}

fn push(names: &mut Vec<String>, name: Option<String>) {
    if let Some(name) = name.filter(|n| !n.is_empty()) {
        if !names.contains(&name) {
            names.push(name);
        }
    }
}

fn refs_of(doc: PodDoc) -> PodRefs {
    let spec = doc.spec;
    let mut refs = PodRefs {
        node: spec.node_name.unwrap_or_default(),
        ..PodRefs::default()
    };
    let (secrets, config_maps) = (&mut refs.secrets, &mut refs.config_maps);
    for r in spec.image_pull_secrets {
        push(secrets, r.name);
    }
    for v in spec.volumes {
        for named in [v.secret, v.azure_file].into_iter().flatten() {
            push(secrets, named.secret_name);
        }
        let referring = [
            v.cephfs,
            v.cinder,
            v.flex_volume,
            v.iscsi,
            v.rbd,
            v.scale_io,
            v.storageos,
        ];
        for r in referring.into_iter().flatten() {
            push(secrets, r.secret_ref.and_then(|r| r.name));
        }
        push(
            secrets,
            v.csi
                .and_then(|c| c.node_publish_secret_ref)
                .and_then(|r| r.name),
        );
        push(config_maps, v.config_map.and_then(|r| r.name));
        for source in v.projected.map(|p| p.sources).unwrap_or_default() {
            push(secrets, source.secret.and_then(|r| r.name));
            push(config_maps, source.config_map.and_then(|r| r.name));
        }
    }
    let containers = spec
        .containers
        .into_iter()
        .chain(spec.init_containers)
        .chain(spec.ephemeral_containers);
    for c in containers {
        for e in c.env {
            if let Some(from) = e.value_from {
                push(secrets, from.secret_key_ref.and_then(|r| r.name));
                push(config_maps, from.config_map_key_ref.and_then(|r| r.name));
            }
        }
        for e in c.env_from {
            push(secrets, e.secret_ref.and_then(|r| r.name));
            push(config_maps, e.config_map_ref.and_then(|r| r.name));
        }
    }
    refs
}

/// The pod cache's projection: a pod bound to a node that uses a secret or configMap. Others are skipped without
/// being parsed when their JSON has no `nodeName` at all (the usual case for a pod just created).
pub(crate) fn project_pod_refs(kv: &KeyValue) -> Projected<PodRefs> {
    if memchr::memmem::find(&kv.value, b"\"nodeName\"").is_none() {
        return Projected::Skip;
    }
    let doc: PodDoc = match serde_json::from_slice(&kv.value) {
        Ok(doc) => doc,
        Err(_) => return Projected::Undecodable,
    };
    let refs = refs_of(doc);
    if refs.node.is_empty() || refs.secrets.is_empty() && refs.config_maps.is_empty() {
        return Projected::Skip;
    }
    Projected::Keep(refs)
}

/// Whether a pod bound to `node` in `namespace` uses the named secret or configMap.
async fn node_uses(
    state: &State,
    node: &str,
    namespace: &str,
    what: Referenced,
    name: &str,
) -> Result<bool, StoreError> {
    let Some(pods) = resources::find("", "v1", "pods") else {
        return Ok(false);
    };
    let prefix = pods.prefix(Some(namespace));
    let cached = state.caches.pod_refs.under(&prefix);
    if cached.iter().any(|r| r.uses(node, what, name)) {
        return Ok(true);
    }
    // The cache follows the store's watch and pod writes do not wait for it: a pod bound a moment ago may not be
    // in it yet. A refusal is rare, so it may afford the store.
    let listed = state.store.list(&prefix, &ListOptions::default()).await?;
    Ok(listed
        .items
        .iter()
        .any(|kv| matches!(project_pod_refs(kv), Projected::Keep(r) if r.uses(node, what, name))))
}

/// The Node authorizer's answer for a node's core-group request on `what` (secrets or configMaps): `None` when
/// allowed, else why not.
pub(crate) async fn refuse_read(
    state: &State,
    node: &str,
    what: Referenced,
    a: &Attributes,
) -> Result<Option<String>, StoreError> {
    let refuse = |why: String| Ok(Some(format!("node \"{node}\" is not allowed to {why}")));
    if !matches!(a.verb.as_str(), "get" | "list" | "watch") || a.subresource.is_some() {
        return refuse(format!(
            "{} {}: nodes may only read them",
            a.verb, a.resource
        ));
    }
    let (Some(namespace), Some(name)) = (a.namespace.as_deref(), a.name.as_deref()) else {
        return refuse(format!(
            "{} {}: can only read individual resources of this type",
            a.verb, a.resource
        ));
    };
    if node_uses(state, node, namespace, what, name).await? {
        return Ok(None);
    }
    refuse(format!(
        "{} {} \"{namespace}/{name}\": no relationship found between node \"{node}\" and this object",
        a.verb,
        what.singular()
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn kv(pod: serde_json::Value) -> KeyValue {
        KeyValue {
            key: "/registry/pods/ns/p".into(),
            value: serde_json::to_vec(&pod).expect("JSON"),
            create_revision: 1,
            mod_revision: 1,
            version: 1,
        }
    }

    fn refs(pod: serde_json::Value) -> Option<PodRefs> {
        match project_pod_refs(&kv(pod)) {
            Projected::Keep(r) => Some(r),
            Projected::Skip => None,
            Projected::Undecodable => panic!("undecodable"),
        }
    }

    #[test]
    fn every_field_upstream_counts_as_an_edge_is_found_once() {
        let pod = json!({"metadata": {"name": "p"}, "spec": {
            "nodeName": "n1",
            "imagePullSecrets": [{"name": "pull"}],
            "volumes": [
                {"name": "a", "secret": {"secretName": "vol-secret"}},
                {"name": "b", "configMap": {"name": "vol-cm"}},
                {"name": "c", "projected": {"sources": [
                    {"secret": {"name": "proj-secret"}}, {"configMap": {"name": "proj-cm"}},
                    {"serviceAccountToken": {"path": "token"}}]}},
                {"name": "d", "csi": {"driver": "x", "nodePublishSecretRef": {"name": "csi-secret"}}},
                {"name": "e", "scaleIO": {"gateway": "g", "system": "s", "secretRef": {"name": "scaleio-secret"}}},
                {"name": "f", "azureFile": {"secretName": "azure-secret", "shareName": "s"}},
                {"name": "g", "emptyDir": {}}
            ],
            "initContainers": [{"name": "i", "image": "x", "envFrom": [{"configMapRef": {"name": "init-cm"}}]}],
            "containers": [{"name": "c", "image": "x",
                "env": [{"name": "A", "valueFrom": {"secretKeyRef": {"name": "env-secret", "key": "k"}}},
                        {"name": "B", "valueFrom": {"configMapKeyRef": {"name": "env-cm", "key": "k"}}},
                        {"name": "C", "valueFrom": {"secretKeyRef": {"name": "env-secret", "key": "other"}}},
                        {"name": "D", "value": "plain"}],
                "envFrom": [{"secretRef": {"name": "from-secret"}}]}],
            "ephemeralContainers": [{"name": "e", "image": "x", "envFrom": [{"secretRef": {"name": "debug-secret"}}]}]
        }});
        let r = refs(pod).expect("a bound pod with references is kept");
        assert_eq!(r.node, "n1");
        let sorted = |names: &[String]| {
            let mut v = names.to_vec();
            v.sort();
            v
        };
        assert_eq!(
            sorted(&r.secrets),
            [
                "azure-secret",
                "csi-secret",
                "debug-secret",
                "env-secret",
                "from-secret",
                "proj-secret",
                "pull",
                "scaleio-secret",
                "vol-secret"
            ],
            "each secret once"
        );
        assert_eq!(
            sorted(&r.config_maps),
            ["env-cm", "init-cm", "proj-cm", "vol-cm"]
        );
        assert!(r.uses("n1", Referenced::Secret, "env-secret"));
        assert!(!r.uses("n2", Referenced::Secret, "env-secret"));
        assert!(!r.uses("n1", Referenced::ConfigMap, "env-secret"));
    }

    #[test]
    fn unbound_pods_and_pods_without_references_are_not_kept() {
        let with_secret = json!({"name": "a", "secret": {"secretName": "s"}});
        assert_eq!(
            refs(json!({"spec": {"volumes": [with_secret], "containers": []}})),
            None,
            "not bound"
        );
        assert_eq!(
            refs(json!({"spec": {"nodeName": "", "volumes": [with_secret]}})),
            None,
            "bound to no node"
        );
        assert_eq!(
            refs(json!({"spec": {"nodeName": "n1", "containers": [{"name": "c", "image": "x"}]}})),
            None,
            "uses nothing"
        );
    }

    #[test]
    fn a_pod_whose_json_does_not_decode_is_reported_not_dropped_silently() {
        let broken = KeyValue {
            value: br#"{"spec": {"nodeName": 7}}"#.to_vec(),
            ..kv(json!({}))
        };
        assert!(matches!(project_pod_refs(&broken), Projected::Undecodable));
    }
}
