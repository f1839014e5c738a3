//! What a pod worker reads from and writes to the API server: the configMaps and secrets a pod references (as the
//! [`ConfigSource`](crate::env::ConfigSource) the env and volume code read), pull credentials, status patches,
//! Events, and the final deletion.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use k8s_openapi::api::core::v1::{ConfigMap, Event, Pod, PodStatus, Secret};
use kube::api::{DeleteParams, Patch, PatchParams, PostParams, Preconditions};
use kube::{Api, Client};
use windlass_runtime::image::Credentials;

use crate::env::MapSource;
use crate::events::EventAction;

/// The configMaps and secrets `pod` references (env, envFrom, volumes, projected sources).
fn referenced(pod: &Pod) -> (BTreeSet<String>, BTreeSet<String>) {
    let mut cms = BTreeSet::new();
    let mut secrets = BTreeSet::new();
    let Some(spec) = &pod.spec else {
        return (cms, secrets);
    };
    for c in spec
        .containers
        .iter()
        .chain(spec.init_containers.iter().flatten())
    {
        for e in c.env.iter().flatten() {
            if let Some(from) = &e.value_from {
                if let Some(r) = &from.config_map_key_ref {
                    cms.insert(r.name.clone());
                }
                if let Some(r) = &from.secret_key_ref {
                    secrets.insert(r.name.clone());
                }
            }
        }
        for f in c.env_from.iter().flatten() {
            if let Some(r) = &f.config_map_ref {
                cms.insert(r.name.clone());
            }
            if let Some(r) = &f.secret_ref {
                secrets.insert(r.name.clone());
            }
        }
    }
    for v in spec.volumes.iter().flatten() {
        if let Some(cm) = &v.config_map {
            cms.insert(cm.name.clone());
        }
        if let Some(s) = v.secret.as_ref().and_then(|s| s.secret_name.clone()) {
            secrets.insert(s);
        }
        for src in v.projected.iter().flat_map(|p| p.sources.iter().flatten()) {
            if let Some(cm) = &src.config_map {
                cms.insert(cm.name.clone());
            }
            if let Some(s) = &src.secret {
                secrets.insert(s.name.clone());
            }
        }
    }
    (cms, secrets)
}

fn config_map_data(cm: ConfigMap) -> BTreeMap<String, Vec<u8>> {
    let mut out: BTreeMap<String, Vec<u8>> = cm
        .data
        .unwrap_or_default()
        .into_iter()
        .map(|(k, v)| (k, v.into_bytes()))
        .collect();
    for (k, v) in cm.binary_data.unwrap_or_default() {
        out.insert(k, v.0);
    }
    out
}

fn secret_data(s: Secret) -> BTreeMap<String, Vec<u8>> {
    let mut out: BTreeMap<String, Vec<u8>> = s
        .string_data
        .unwrap_or_default()
        .into_iter()
        .map(|(k, v)| (k, v.into_bytes()))
        .collect();
    for (k, v) in s.data.unwrap_or_default() {
        out.insert(k, v.0);
    }
    out
}

/// Reads every configMap and secret the pod references, so env and volume code can use them synchronously.
/// Missing objects are simply absent (the env/volume code reports them, honouring `optional`).
pub(crate) async fn config_source(client: &Client, pod: &Pod) -> Result<MapSource, kube::Error> {
    let ns = pod.metadata.namespace.as_deref().unwrap_or("default");
    let (cms, secrets) = referenced(pod);
    let mut source = MapSource::default();
    let cm_api: Api<ConfigMap> = Api::namespaced(client.clone(), ns);
    for name in cms {
        if let Some(cm) = cm_api.get_opt(&name).await? {
            source
                .config_maps
                .insert((ns.to_string(), name), config_map_data(cm));
        }
    }
    let secret_api: Api<Secret> = Api::namespaced(client.clone(), ns);
    for name in secrets {
        if let Some(s) = secret_api.get_opt(&name).await? {
            source
                .secrets
                .insert((ns.to_string(), name), secret_data(s));
        }
    }
    Ok(source)
}

/// Registry credentials from the pod's `imagePullSecrets`, in order (the first secret naming a registry wins, as
/// upstream tries them in order). Unreadable or missing secrets are skipped with a warning, as upstream does.
pub(crate) async fn pull_credentials(client: &Client, pod: &Pod) -> Credentials {
    let ns = pod.metadata.namespace.as_deref().unwrap_or("default");
    let api: Api<Secret> = Api::namespaced(client.clone(), ns);
    let mut creds = Credentials::default();
    let names = pod
        .spec
        .as_ref()
        .and_then(|s| s.image_pull_secrets.clone())
        .unwrap_or_default();
    for r in names {
        let name = r.name;
        match api.get_opt(&name).await {
            Ok(Some(secret)) => {
                let data = secret_data(secret);
                let Some(bytes) = data
                    .get(".dockerconfigjson")
                    .or_else(|| data.get(".dockercfg"))
                else {
                    continue;
                };
                match Credentials::from_json(bytes, Path::new(&format!("secret/{ns}/{name}"))) {
                    Ok(c) => creds.merge(c),
                    Err(e) => {
                        tracing::warn!(secret = %name, error = %e, "unusable imagePullSecret")
                    }
                }
            }
            Ok(None) => {
                tracing::warn!(secret = %name, "imagePullSecret not found; pulling without it")
            }
            Err(e) => tracing::warn!(secret = %name, error = %e, "cannot read imagePullSecret"),
        }
    }
    creds
}

/// Replaces the pod's status (merge patch of the whole `status`: lists are replaced, as the kubelet owns them).
pub(crate) async fn patch_status(
    client: &Client,
    pod: &Pod,
    status: &PodStatus,
) -> Result<(), kube::Error> {
    let ns = pod.metadata.namespace.as_deref().unwrap_or("default");
    let name = pod.metadata.name.as_deref().unwrap_or_default();
    let api: Api<Pod> = Api::namespaced(client.clone(), ns);
    let mut body = serde_json::json!({ "status": status });
    if let Some(uid) = &pod.metadata.uid {
        // A UID precondition: never write this pod's status onto a new pod of the same name.
        body["metadata"] = serde_json::json!({ "uid": uid });
    }
    api.patch_status(name, &PatchParams::default(), &Patch::Merge(&body))
        .await?;
    Ok(())
}

/// The final deletion once everything of the pod is gone: grace period 0 with a UID precondition (upstream
/// `statusManager` does the same so it never deletes a re-created pod of the same name). Gone already is fine.
pub(crate) async fn delete_pod(client: &Client, pod: &Pod) -> Result<(), kube::Error> {
    let ns = pod.metadata.namespace.as_deref().unwrap_or("default");
    let name = pod.metadata.name.as_deref().unwrap_or_default();
    let api: Api<Pod> = Api::namespaced(client.clone(), ns);
    let params = DeleteParams {
        grace_period_seconds: Some(0),
        preconditions: Some(Preconditions {
            uid: pod.metadata.uid.clone(),
            resource_version: None,
        }),
        ..Default::default()
    };
    match api.delete(name, &params).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(e)) if e.code == 404 || e.code == 409 => Ok(()),
        Err(e) => Err(e),
    }
}

/// Posts an Event (a new one, or the aggregated repeat). Failures are logged: events are best effort.
pub(crate) async fn post_event(client: &Client, action: EventAction) {
    let (event, update) = match action {
        EventAction::Create(e) => (e, false),
        EventAction::Update(e) => (e, true),
    };
    let ns = event
        .metadata
        .namespace
        .clone()
        .unwrap_or_else(|| "default".into());
    let api: Api<Event> = Api::namespaced(client.clone(), &ns);
    let result = if update {
        let name = event.metadata.name.clone().unwrap_or_default();
        let patch = serde_json::json!({
            "count": event.count,
            "lastTimestamp": event.last_timestamp,
            "message": event.message,
        });
        match api
            .patch(&name, &PatchParams::default(), &Patch::Merge(&patch))
            .await
        {
            // Never created (the spam filter dropped the first occurrence) or expired: create it whole, as
            // upstream's recorder falls back to a create when its patch finds nothing.
            Err(kube::Error::Api(e)) if e.code == 404 => {
                api.create(&PostParams::default(), &event).await.map(|_| ())
            }
            other => other.map(|_| ()),
        }
    } else {
        api.create(&PostParams::default(), &event).await.map(|_| ())
    };
    if let Err(e) = result {
        tracing::debug!(error = %e, "event not recorded");
    }
}
