//! root-ca-cert-publisher: every active namespace has the ConfigMap `kube-root-ca.crt` whose `ca.crt` is the
//! cluster CA bundle, so pods can verify the API server (the projected `kube-api-access-*` volume mounts it).
//! Deleted or edited copies are recreated or put back. Ref: kube-controller-manager
//! `pkg/controller/certificates/rootcacertpublisher/publisher.go` (`syncNamespace`).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::{ConfigMap, Namespace};
use kube::api::PostParams;
use kube::runtime::reflector::{ObjectRef, Store};
use kube::runtime::watcher;
use kube::{Api, ResourceExt};
use tokio::sync::Notify;

use super::watch::{self, Tasks};
use super::{Context, ControllerError, ControllerFuture};

const NAME: &str = "root-ca-cert-publisher";
const RESYNC: Duration = Duration::from_secs(30);
/// The ConfigMap's name (upstream `RootCACertConfigMapName`).
pub(crate) const CONFIG_MAP: &str = "kube-root-ca.crt";
/// The key holding the PEM bundle.
const KEY: &str = "ca.crt";
/// Upstream's `DescriptionAnnotation` and text.
const DESCRIPTION_ANNOTATION: &str = "kubernetes.io/description";
const DESCRIPTION: &str = "Contains a CA bundle that can be used to verify the kube-apiserver when using \
internal endpoints such as the internal service IP or kubernetes.default.svc. No other usage is guaranteed \
across distributions of Kubernetes clusters.";

pub(crate) fn start(ctx: Context) -> ControllerFuture {
    Box::pin(run(ctx))
}

/// What to do in one namespace.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Action {
    Create,
    /// Put back data and annotation on the existing object (carrying its resourceVersion).
    Update(Box<ConfigMap>),
}

/// Upstream `syncNamespace`: create when missing; update when `data` is not exactly `{ca.crt: <bundle>}` or the
/// description annotation is missing (other keys, labels and annotations are the user's business only in so far
/// as `data` is replaced whole, as upstream does).
pub(crate) fn desired(current: Option<&ConfigMap>, root_ca: &str) -> Option<Action> {
    let want = BTreeMap::from([(KEY.to_string(), root_ca.to_string())]);
    let Some(cm) = current else {
        return Some(Action::Create);
    };
    let annotated = cm
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(DESCRIPTION_ANNOTATION))
        .is_some_and(|d| !d.is_empty());
    if cm.data.as_ref() == Some(&want) && annotated {
        return None;
    }
    let mut fixed = cm.clone();
    fixed.data = Some(want);
    fixed.binary_data = None;
    fixed
        .metadata
        .annotations
        .get_or_insert_with(BTreeMap::new)
        .insert(DESCRIPTION_ANNOTATION.into(), DESCRIPTION.into());
    fixed.metadata.managed_fields = None;
    Some(Action::Update(Box::new(fixed)))
}

fn new_config_map(root_ca: &str) -> ConfigMap {
    ConfigMap {
        metadata: kube::api::ObjectMeta {
            name: Some(CONFIG_MAP.into()),
            annotations: Some(BTreeMap::from([(
                DESCRIPTION_ANNOTATION.to_string(),
                DESCRIPTION.to_string(),
            )])),
            ..Default::default()
        },
        data: Some(BTreeMap::from([(KEY.to_string(), root_ca.to_string())])),
        ..Default::default()
    }
}

fn active(ns: &Namespace) -> bool {
    ns.metadata.deletion_timestamp.is_none()
        && ns.status.as_ref().and_then(|s| s.phase.as_deref()) != Some("Terminating")
}

async fn sync_namespace(
    client: &kube::Client,
    config_maps: &Store<ConfigMap>,
    ns: &str,
    root_ca: &str,
) -> Result<(), kube::Error> {
    let current = config_maps.get(&ObjectRef::new(CONFIG_MAP).within(ns));
    let api = Api::<ConfigMap>::namespaced(client.clone(), ns);
    match desired(current.as_deref(), root_ca) {
        None => Ok(()),
        Some(Action::Create) => match api
            .create(&PostParams::default(), &new_config_map(root_ca))
            .await
        {
            Ok(_) => {
                tracing::info!(namespace = %ns, "published the root CA");
                Ok(())
            }
            // Already there (the cache lags), or the namespace is gone or terminating: nothing to retry.
            Err(e)
                if watch::is_status(&e, 409)
                    || watch::is_status(&e, 404)
                    || watch::is_status(&e, 403) =>
            {
                tracing::debug!(namespace = %ns, error = %e, "root CA ConfigMap not created");
                Ok(())
            }
            Err(e) => Err(e),
        },
        Some(Action::Update(cm)) => {
            match api.replace(CONFIG_MAP, &PostParams::default(), &cm).await {
                Ok(_) => {
                    tracing::info!(namespace = %ns, "restored the root CA ConfigMap");
                    Ok(())
                }
                // A newer version or a deletion raced us: the watch brings it and the next pass retries.
                Err(e) if watch::is_status(&e, 409) || watch::is_status(&e, 404) => Ok(()),
                Err(e) => Err(e),
            }
        }
    }
}

async fn run(ctx: Context) -> Result<(), ControllerError> {
    let Some(root_ca) = ctx.config.root_ca.clone() else {
        tracing::warn!(
            "no cluster CA bundle known (--root-ca-file, or the kubeconfig's CA): not publishing"
        );
        return Ok(());
    };
    let wake = Arc::new(Notify::new());
    let (namespaces, t1) = watch::cache(Api::<Namespace>::all(ctx.client.clone()), wake.clone());
    // Only the one name matters; the server filters (upstream's informer watches all and filters locally).
    let by_name = watcher::Config::default().fields(&format!("metadata.name={CONFIG_MAP}"));
    let (config_maps, t2) = watch::cache_with(
        Api::<ConfigMap>::all(ctx.client.clone()),
        by_name,
        wake.clone(),
    );
    let _tasks = Tasks(vec![t1, t2]);
    watch::ready(NAME, &namespaces).await?;
    watch::ready(NAME, &config_maps).await?;
    loop {
        let mut names: Vec<String> = namespaces
            .state()
            .iter()
            .filter(|ns| active(ns))
            .map(|ns| ns.name_any())
            .collect();
        names.sort();
        for ns in names {
            if let Err(e) = sync_namespace(&ctx.client, &config_maps, &ns, &root_ca).await {
                // Retried on the next change or resync, as upstream requeues the namespace.
                tracing::warn!(namespace = %ns, error = %e, "cannot publish the root CA");
            }
        }
        let _ = tokio::time::timeout(RESYNC, wake.notified()).await;
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn cm(v: serde_json::Value) -> ConfigMap {
        serde_json::from_value(v).expect("configmap")
    }

    #[test]
    fn a_missing_edited_or_unannotated_copy_is_fixed_and_a_good_one_left_alone() {
        let ca = "-----BEGIN CERTIFICATE-----\nX\n-----END CERTIFICATE-----\n";
        assert_eq!(desired(None, ca), Some(Action::Create));
        let good = new_config_map(ca);
        assert_eq!(desired(Some(&good), ca), None);
        let edited = cm(
            json!({"metadata": {"name": CONFIG_MAP, "resourceVersion": "7",
            "annotations": {DESCRIPTION_ANNOTATION: DESCRIPTION}},
            "data": {"ca.crt": "forged", "extra": "x"}}),
        );
        let Some(Action::Update(fixed)) = desired(Some(&edited), ca) else {
            panic!("an edited copy is put back");
        };
        assert_eq!(fixed.data, good.data);
        assert_eq!(fixed.metadata.resource_version.as_deref(), Some("7"));
        let bare = cm(json!({"metadata": {"name": CONFIG_MAP}, "data": {"ca.crt": ca}}));
        let Some(Action::Update(fixed)) = desired(Some(&bare), ca) else {
            panic!("the description annotation is added");
        };
        assert_eq!(fixed.metadata.annotations, good.metadata.annotations);
    }
}
