//! The ServiceAccount admission plugin for new pods (Ref: kubernetes `plugin/pkg/admission/serviceaccount/
//! admission.go`): a pod runs as `default` unless it names a service account, the service account must exist,
//! and — unless the pod (or, when the pod does not say, its service account) sets
//! `automountServiceAccountToken: false` — the pod gets the projected `kube-api-access-<random>` volume (a bound
//! token, the cluster CA and the namespace) mounted read-only at [`TOKEN_MOUNT_PATH`] in every container and
//! init container. Mirror pods (the kubelet's copies of static pods) are left alone, but may not carry
//! credentials (no service account, secrets or token projections).

use std::sync::Arc;
use std::time::Duration;

use serde_json::{json, Value};

use super::cache::{project_service_account, ServiceAccountState};
use super::objects::{self, meta};
use super::resources;
use super::status::ApiError;
use super::State;

/// Where the token, `ca.crt` and `namespace` appear in containers (upstream `DefaultAPITokenMountPath`).
pub(crate) const TOKEN_MOUNT_PATH: &str = "/var/run/secrets/kubernetes.io/serviceaccount";
/// Prefix of the projected volume's name (upstream `ServiceAccountVolumeName`).
const VOLUME_PREFIX: &str = "kube-api-access-";
/// The service account a pod runs as when it names none (upstream `DefaultServiceAccountName`).
const DEFAULT_SERVICE_ACCOUNT: &str = "default";
/// Token lifetime the volume asks for: upstream's `WarnOnlyBoundTokenExpirationSeconds` (1 h + 7 s, so the
/// issuer can recognise tokens requested by this volume).
const TOKEN_EXPIRATION_SECONDS: i64 = 3607;
/// The ConfigMap the root-ca-cert-publisher keeps in every namespace.
pub(crate) const ROOT_CA_CONFIG_MAP: &str = "kube-root-ca.crt";
/// Annotation that marks a mirror pod (upstream `MirrorPodAnnotationKey`).
const MIRROR_ANNOTATION: &str = "kubernetes.io/config.mirror";
/// Upstream looks up the `default` service account up to 10 times, 100–200 ms apart, because the service
/// account controller may not have created it yet in a brand-new namespace; other names are looked up once.
const DEFAULT_SA_ATTEMPTS: usize = 10;

/// Admits a new pod in `namespace`: defaults its service account, refuses a missing one (403, upstream's
/// message), and adds the token volume and mounts.
pub(crate) async fn admit_pod(
    state: &State,
    namespace: &str,
    pod: &mut Value,
) -> Result<(), ApiError> {
    let is_mirror = meta(pod)
        .get("annotations")
        .and_then(|a| a.get(MIRROR_ANNOTATION))
        .is_some();
    let name = objects::name_of(pod).to_string();
    if is_mirror {
        return match mirror_pod_refusal(pod) {
            Some(why) => Err(ApiError::forbidden(format!(
                "pods \"{name}\" is forbidden: {why}"
            ))),
            None => Ok(()),
        };
    }
    let Some(spec) = pod.get_mut("spec").and_then(Value::as_object_mut) else {
        // Validation reports the missing spec.
        return Ok(());
    };
    // `serviceAccount` is the deprecated spelling; v1 conversion takes it when `serviceAccountName` is empty and
    // always writes both.
    let sa_name = [spec.get("serviceAccountName"), spec.get("serviceAccount")]
        .into_iter()
        .flatten()
        .filter_map(Value::as_str)
        .find(|s| !s.is_empty())
        .unwrap_or(DEFAULT_SERVICE_ACCOUNT)
        .to_string();
    spec.insert("serviceAccountName".into(), json!(sa_name));
    spec.insert("serviceAccount".into(), json!(sa_name));
    let sa = lookup(state, namespace, &sa_name).await?.ok_or_else(|| {
        ApiError::forbidden(format!(
            "pods \"{name}\" is forbidden: error looking up service account {namespace}/{sa_name}: \
             serviceaccount \"{sa_name}\" not found"
        ))
    })?;
    if should_automount(sa.automount, spec.get("automountServiceAccountToken")) {
        mount_token(spec);
    }
    // Pods without their own pull secrets use their service account's (upstream does the same here).
    let has_pull_secrets = spec
        .get("imagePullSecrets")
        .and_then(Value::as_array)
        .is_some_and(|a| !a.is_empty());
    if !has_pull_secrets && !sa.image_pull_secrets.is_empty() {
        spec.insert(
            "imagePullSecrets".into(),
            Value::Array(sa.image_pull_secrets.clone()),
        );
    }
    Ok(())
}

/// Upstream `Validate` for mirror pods: the kubelet's copy of a static pod may not run as a service account,
/// reference secrets, or project a service-account token (a node must not gain credentials through one).
fn mirror_pod_refusal(pod: &Value) -> Option<&'static str> {
    let spec = pod.get("spec")?;
    let named = |v: Option<&Value>| v.and_then(Value::as_str).is_some_and(|s| !s.is_empty());
    if named(spec.get("serviceAccountName")) {
        return Some("a mirror pod may not reference service accounts");
    }
    let list = |v: Option<&Value>| v.and_then(Value::as_array).cloned().unwrap_or_default();
    let volumes = list(spec.get("volumes"));
    let projections: Vec<Value> = volumes
        .iter()
        .flat_map(|v| list(v.pointer("/projected/sources")))
        .collect();
    let containers: Vec<Value> = ["initContainers", "containers", "ephemeralContainers"]
        .iter()
        .flat_map(|l| list(spec.get(*l)))
        .collect();
    let secret_in_env = containers.iter().any(|c| {
        list(c.get("env"))
            .iter()
            .any(|e| e.pointer("/valueFrom/secretKeyRef").is_some())
            || list(c.get("envFrom"))
                .iter()
                .any(|e| e.get("secretRef").is_some())
    });
    let has_secrets = !list(spec.get("imagePullSecrets")).is_empty()
        || volumes.iter().any(|v| v.get("secret").is_some())
        || projections.iter().any(|p| p.get("secret").is_some())
        || secret_in_env;
    if has_secrets {
        return Some("a mirror pod may not reference secrets");
    }
    if projections
        .iter()
        .any(|p| p.get("serviceAccountToken").is_some())
    {
        return Some("a mirror pod may not use ServiceAccountToken volume projections");
    }
    None
}

/// The service account from the watch-fed cache (no store read per pod create, as upstream's plugin reads its
/// lister); one the cache does not have yet is read from the store, retrying for `default` as upstream's live
/// lookup does (the cache may trail a service account created a moment ago by another server or the controller).
async fn lookup(
    state: &State,
    namespace: &str,
    name: &str,
) -> Result<Option<Arc<ServiceAccountState>>, ApiError> {
    let kind = resources::find("", "v1", "serviceaccounts")
        .ok_or_else(|| ApiError::internal("no serviceaccounts kind"))?;
    let key = kind.key(Some(namespace), name);
    if let Some(cached) = state.caches.service_accounts.get(&key) {
        return Ok(Some(cached));
    }
    let attempts = if name == DEFAULT_SERVICE_ACCOUNT {
        DEFAULT_SA_ATTEMPTS
    } else {
        1
    };
    for attempt in 0..attempts {
        if attempt > 0 {
            let jitter = u64::from(uuid::Uuid::new_v4().as_bytes()[0]) % 100;
            tokio::time::sleep(Duration::from_millis(100 + jitter)).await;
        }
        if let (Some(kv), _) = state.store.get(&key).await? {
            return project_service_account(&kv)
                .map(|sa| Some(Arc::new(sa)))
                .ok_or_else(|| {
                    ApiError::internal(format!("stored service account {key} is not valid"))
                });
        }
    }
    Ok(None)
}

/// The pod's `automountServiceAccountToken` wins, then the service account's; the default is to mount.
fn should_automount(sa_says: Option<bool>, pod_says: Option<&Value>) -> bool {
    pod_says
        .and_then(Value::as_bool)
        .or(sa_says)
        .unwrap_or(true)
}

/// The projected volume upstream's `TokenVolumeSource` describes, with the explicit default mode.
fn token_volume(name: &str) -> Value {
    json!({
        "name": name,
        "projected": {
            "defaultMode": 420,
            "sources": [
                {"serviceAccountToken": {"expirationSeconds": TOKEN_EXPIRATION_SECONDS, "path": "token"}},
                {"configMap": {"name": ROOT_CA_CONFIG_MAP, "items": [{"key": "ca.crt", "path": "ca.crt"}]}},
                {"downwardAPI": {"items": [{"path": "namespace",
                    "fieldRef": {"apiVersion": "v1", "fieldPath": "metadata.namespace"}}]}},
            ],
        },
    })
}

/// Upstream `mountServiceAccountToken`: reuse an existing `kube-api-access-*` volume or name a new one, mount it
/// in every (init) container that has nothing at the mount path, and add the volume if any container got it.
fn mount_token(spec: &mut serde_json::Map<String, Value>) {
    let existing = spec
        .get("volumes")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(|v| v.get("name").and_then(Value::as_str))
        .find(|n| n.starts_with(VOLUME_PREFIX))
        .map(String::from);
    let volume_name = existing
        .clone()
        .unwrap_or_else(|| format!("{VOLUME_PREFIX}{}", objects::random_suffix()));
    let mount = json!({"name": volume_name, "readOnly": true, "mountPath": TOKEN_MOUNT_PATH});
    let mut needs_volume = false;
    for list in ["initContainers", "containers"] {
        for c in spec
            .get_mut(list)
            .and_then(Value::as_array_mut)
            .into_iter()
            .flatten()
            .filter_map(Value::as_object_mut)
        {
            let mounts = c.entry("volumeMounts").or_insert_with(|| json!([]));
            let Some(mounts) = mounts.as_array_mut() else {
                continue;
            };
            let taken = mounts
                .iter()
                .any(|m| m.get("mountPath").and_then(Value::as_str) == Some(TOKEN_MOUNT_PATH));
            if !taken {
                mounts.push(mount.clone());
                needs_volume = true;
            }
        }
    }
    if existing.is_none() && needs_volume {
        let volumes = spec.entry("volumes").or_insert_with(|| json!([]));
        if let Some(v) = volumes.as_array_mut() {
            v.push(token_volume(&volume_name));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(v: Value) -> serde_json::Map<String, Value> {
        v.as_object().cloned().unwrap_or_default()
    }

    #[test]
    fn every_container_mounts_one_new_token_volume() {
        let mut s = spec(json!({
            "initContainers": [{"name": "init", "image": "i"}],
            "containers": [{"name": "a", "image": "i", "volumeMounts": [{"name": "data", "mountPath": "/d"}]},
                           {"name": "b", "image": "i"}],
            "volumes": [{"name": "data", "emptyDir": {}}],
        }));
        mount_token(&mut s);
        let volumes = s["volumes"].as_array().cloned().unwrap_or_default();
        assert_eq!(volumes.len(), 2);
        let name = volumes[1]["name"].as_str().unwrap_or_default().to_string();
        assert!(name.starts_with(VOLUME_PREFIX) && name.len() == VOLUME_PREFIX.len() + 5);
        assert_eq!(volumes[1], token_volume(&name));
        for (list, i) in [("initContainers", 0), ("containers", 0), ("containers", 1)] {
            let mounts = s[list][i]["volumeMounts"]
                .as_array()
                .cloned()
                .unwrap_or_default();
            assert_eq!(
                mounts.last(),
                Some(&json!({"name": name, "readOnly": true, "mountPath": TOKEN_MOUNT_PATH}))
            );
        }
    }

    #[test]
    fn a_container_with_its_own_mount_at_the_path_is_left_alone() {
        let mut s = spec(json!({
            "containers": [{"name": "a", "image": "i",
                "volumeMounts": [{"name": "mine", "mountPath": TOKEN_MOUNT_PATH}]}],
            "volumes": [{"name": "mine", "secret": {"secretName": "s"}}],
        }));
        let before = s.clone();
        mount_token(&mut s);
        assert_eq!(s, before, "no container needs the volume, so none is added");
    }

    #[test]
    fn mirror_pods_may_not_carry_credentials() {
        let mirror = |spec: Value| json!({"metadata": {"name": "m"}, "spec": spec});
        let plain = json!({"containers": [{"name": "c", "image": "i"}]});
        assert_eq!(mirror_pod_refusal(&mirror(plain)), None);
        assert_eq!(
            mirror_pod_refusal(&mirror(
                json!({"serviceAccountName": "default", "containers": []})
            )),
            Some("a mirror pod may not reference service accounts")
        );
        assert_eq!(
            mirror_pod_refusal(&mirror(json!({"containers": [{"name": "c",
                "env": [{"name": "P", "valueFrom": {"secretKeyRef": {"name": "s", "key": "k"}}}]}]}))),
            Some("a mirror pod may not reference secrets")
        );
        assert_eq!(
            mirror_pod_refusal(&mirror(json!({"containers": [], "volumes": [{"name": "t",
                "projected": {"sources": [{"serviceAccountToken": {"path": "token"}}]}}]}))),
            Some("a mirror pod may not use ServiceAccountToken volume projections")
        );
    }

    #[test]
    fn the_pod_setting_wins_over_the_service_accounts() {
        assert!(!should_automount(Some(false), None));
        assert!(should_automount(Some(false), Some(&json!(true))));
        assert!(!should_automount(None, Some(&json!(false))));
        assert!(should_automount(None, None));
    }
}
