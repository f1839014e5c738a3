//! ServiceAccount controller: every active namespace has a `default` ServiceAccount (Ref: kube-controller-manager
//! `serviceaccount-controller`, `ServiceAccountsController.syncNamespace`). Recreated if deleted.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::{Namespace, ServiceAccount};
use kube::api::PostParams;
use kube::{Api, ResourceExt};
use tokio::sync::Notify;

use super::watch::{self, Tasks};
use super::{Context, ControllerError, ControllerFuture};

const NAME: &str = "serviceaccount";
const RESYNC: Duration = Duration::from_secs(30);
/// The ServiceAccount every namespace gets.
pub(crate) const DEFAULT_SA: &str = "default";

pub(crate) fn start(ctx: Context) -> ControllerFuture {
    Box::pin(run(ctx))
}

/// Namespaces (active, not being deleted) that lack the default ServiceAccount.
pub(crate) fn missing(
    namespaces: &[Arc<Namespace>],
    accounts: &[Arc<ServiceAccount>],
) -> Vec<String> {
    let have: HashSet<&str> = accounts
        .iter()
        .filter(|sa| sa.name_any() == DEFAULT_SA)
        .filter_map(|sa| sa.metadata.namespace.as_deref())
        .collect();
    let mut out: Vec<String> = namespaces
        .iter()
        .filter(|ns| ns.metadata.deletion_timestamp.is_none())
        .filter(|ns| ns.status.as_ref().and_then(|s| s.phase.as_deref()) != Some("Terminating"))
        .map(|ns| ns.name_any())
        .filter(|n| !have.contains(n.as_str()))
        .collect();
    out.sort();
    out
}

async fn run(ctx: Context) -> Result<(), ControllerError> {
    let wake = Arc::new(Notify::new());
    let (namespaces, t1) = watch::cache(Api::<Namespace>::all(ctx.client.clone()), wake.clone());
    let (accounts, t2) = watch::cache(Api::<ServiceAccount>::all(ctx.client.clone()), wake.clone());
    let _tasks = Tasks(vec![t1, t2]);
    watch::ready(NAME, &namespaces).await?;
    watch::ready(NAME, &accounts).await?;
    loop {
        for ns in missing(&namespaces.state(), &accounts.state()) {
            let sa: ServiceAccount = ServiceAccount {
                metadata: kube::api::ObjectMeta {
                    name: Some(DEFAULT_SA.into()),
                    namespace: Some(ns.clone()),
                    ..Default::default()
                },
                ..Default::default()
            };
            match Api::<ServiceAccount>::namespaced(ctx.client.clone(), &ns)
                .create(&PostParams::default(), &sa)
                .await
            {
                Ok(_) => tracing::info!(namespace = %ns, "created the default ServiceAccount"),
                // Already there (our cache lags) or the namespace is going away: nothing to do.
                Err(e)
                    if watch::is_status(&e, 409)
                        || watch::is_status(&e, 403)
                        || watch::is_status(&e, 404) =>
                {
                    tracing::debug!(namespace = %ns, error = %e, "default ServiceAccount not created")
                }
                Err(e) => {
                    tracing::warn!(namespace = %ns, error = %e, "cannot create the default ServiceAccount")
                }
            }
        }
        // A failed create is retried on the next change or resync.
        let _ = tokio::time::timeout(RESYNC, wake.notified()).await;
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn ns(name: &str, phase: &str) -> Arc<Namespace> {
        Arc::new(
            serde_json::from_value(json!({"metadata": {"name": name}, "status": {"phase": phase}}))
                .expect("namespace"),
        )
    }

    fn sa(ns: &str, name: &str) -> Arc<ServiceAccount> {
        Arc::new(
            serde_json::from_value(json!({"metadata": {"name": name, "namespace": ns}}))
                .expect("sa"),
        )
    }

    #[test]
    fn active_namespaces_without_a_default_service_account_get_one() {
        let namespaces = [
            ns("a", "Active"),
            ns("b", "Active"),
            ns("gone", "Terminating"),
        ];
        let accounts = [sa("a", "default"), sa("b", "builder")];
        assert_eq!(missing(&namespaces, &accounts), ["b"]);
    }
}
