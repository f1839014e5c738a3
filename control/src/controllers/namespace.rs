//! The namespace controller: when a namespace is deleted (the API server marks it `Terminating`), deletes
//! every namespaced object in it, reports progress in the namespace's conditions, and once nothing is left
//! removes its `kubernetes` finalizer so the API server lets the namespace go (Ref: kubernetes
//! `pkg/controller/namespace/deletion/namespaced_resources_deleter.go`).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use futures_util::{future, StreamExt};
use k8s_openapi::api::core::v1::{Namespace, NamespaceCondition, NamespaceStatus};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::api::{DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::runtime::controller::Action;
use kube::runtime::{watcher, Controller};
use kube::{Api, Client, ResourceExt};
use serde_json::json;

use super::garbage_collector::deletable_kinds;
use super::ownership::{is_not_found, FIELD_MANAGER};
use super::{Context, ControllerError, ControllerFuture};

const NAME: &str = "namespace";
const FINALIZER: &str = "kubernetes";

/// What failed while emptying one namespace.
#[derive(Debug, thiserror::Error)]
pub(crate) enum NamespaceError {
    #[error("namespace {namespace}: resource discovery failed: {source}")]
    Discovery {
        namespace: String,
        #[source]
        source: kube::Error,
    },
    #[error("namespace {namespace}: cannot {action}: {source}")]
    Api {
        namespace: String,
        action: String,
        #[source]
        source: kube::Error,
    },
}

pub(crate) fn start(ctx: Context) -> ControllerFuture {
    Box::pin(run(ctx.client))
}

async fn run(client: Client) -> Result<(), ControllerError> {
    tracing::info!(controller = NAME, "starting");
    Controller::new(
        Api::<Namespace>::all(client.clone()),
        watcher::Config::default(),
    )
    .run(reconcile, error_policy, Arc::new(client))
    .for_each(|res| {
        super::ownership::log_result(NAME, res);
        future::ready(())
    })
    .await;
    Err(ControllerError::Watch {
        controller: NAME,
        message: "the controller stream ended".into(),
    })
}

fn error_policy(ns: Arc<Namespace>, err: &NamespaceError, _: Arc<Client>) -> Action {
    tracing::warn!(controller = NAME, namespace = %ns.name_any(), error = %err, "retrying");
    Action::requeue(Duration::from_secs(2))
}

/// A namespace condition as upstream words it.
fn cond(type_: &str, status: bool, reason: &str, message: String) -> NamespaceCondition {
    NamespaceCondition {
        type_: type_.into(),
        status: if status { "True" } else { "False" }.into(),
        reason: Some(reason.into()),
        message: Some(message),
        last_transition_time: Some(Time(jiff::Timestamp::now())),
    }
}

/// What is left in a namespace, per resource, and which finalizers hold it.
#[derive(Default)]
struct Remaining {
    by_resource: BTreeMap<String, usize>,
    finalizers: BTreeMap<String, usize>,
    failures: Vec<String>,
}

impl Remaining {
    /// Upstream's deletion conditions.
    fn conditions(&self) -> Vec<NamespaceCondition> {
        let mut out = vec![
            cond(
                "NamespaceDeletionDiscoveryFailure",
                false,
                "ResourcesDiscovered",
                "All resources successfully discovered".into(),
            ),
            cond(
                "NamespaceDeletionGroupVersionParsingFailure",
                false,
                "ParsedGroupVersions",
                "All legacy kube types successfully parsed".into(),
            ),
        ];
        out.push(if self.failures.is_empty() {
            cond(
                "NamespaceDeletionContentFailure",
                false,
                "ContentDeleted",
                "All content successfully deleted, may be waiting on finalization".into(),
            )
        } else {
            cond(
                "NamespaceDeletionContentFailure",
                true,
                "ContentDeletionFailed",
                format!(
                    "Failed to delete all resource types, {} remaining: {}",
                    self.failures.len(),
                    self.failures.join(", ")
                ),
            )
        });
        out.push(if self.by_resource.is_empty() {
            cond(
                "NamespaceContentRemaining",
                false,
                "ContentRemoved",
                "All content successfully removed".into(),
            )
        } else {
            let parts: Vec<String> = self
                .by_resource
                .iter()
                .map(|(r, n)| format!("{r} has {n} resource instances"))
                .collect();
            cond(
                "NamespaceContentRemaining",
                true,
                "SomeResourcesRemain",
                format!("Some resources are remaining: {}", parts.join(", ")),
            )
        });
        out.push(if self.finalizers.is_empty() {
            cond(
                "NamespaceFinalizersRemaining",
                false,
                "ContentHasNoFinalizers",
                "All content-preserving finalizers finished".into(),
            )
        } else {
            let parts: Vec<String> = self
                .finalizers
                .iter()
                .map(|(f, n)| format!("{f} in {n} resource instances"))
                .collect();
            cond(
                "NamespaceFinalizersRemaining",
                true,
                "SomeFinalizersRemain",
                format!(
                    "Some content in the namespace has finalizers remaining: {}",
                    parts.join(", ")
                ),
            )
        });
        out
    }
}

async fn reconcile(ns: Arc<Namespace>, client: Arc<Client>) -> Result<Action, NamespaceError> {
    let name = ns.name_any();
    let finalizers: Vec<String> = ns
        .spec
        .as_ref()
        .and_then(|s| s.finalizers.clone())
        .unwrap_or_default();
    if ns.metadata.deletion_timestamp.is_none() || !finalizers.iter().any(|f| f == FINALIZER) {
        return Ok(Action::await_change());
    }
    let kinds = deletable_kinds(&client)
        .await
        .map_err(|source| NamespaceError::Discovery {
            namespace: name.clone(),
            source,
        })?;
    let mut left = Remaining::default();
    for kind in kinds.iter().filter(|k| k.namespaced) {
        let api = kind.api(&client, Some(&name));
        let list = match api.list(&ListParams::default()).await {
            Ok(l) => l,
            Err(e) => {
                left.failures.push(format!("{}: {e}", kind.resource.plural));
                continue;
            }
        };
        if list.items.is_empty() {
            continue;
        }
        let resource = if kind.resource.group.is_empty() {
            kind.resource.plural.clone()
        } else {
            format!("{}.{}", kind.resource.plural, kind.resource.group)
        };
        let mut count = 0;
        for obj in &list.items {
            count += 1;
            for f in obj.finalizers() {
                *left.finalizers.entry(f.clone()).or_default() += 1;
            }
            if obj.metadata.deletion_timestamp.is_some() {
                continue;
            }
            match api
                .delete(&obj.name_any(), &DeleteParams::background())
                .await
            {
                Ok(_) => {}
                Err(e) if is_not_found(&e) => count -= 1,
                Err(e) => left
                    .failures
                    .push(format!("{resource} {}: {e}", obj.name_any())),
            }
        }
        if count > 0 {
            left.by_resource.insert(resource, count);
        }
    }
    let ns_api: Api<Namespace> = Api::all((*client).clone());
    let conditions = left.conditions();
    if status_conditions_differ(ns.status.as_ref(), &conditions) {
        let status = NamespaceStatus {
            phase: Some("Terminating".into()),
            conditions: Some(conditions),
        };
        match ns_api
            .patch_status(
                &name,
                &PatchParams::apply(FIELD_MANAGER),
                &Patch::Merge(json!({"status": status})),
            )
            .await
        {
            Ok(_) => {}
            Err(e) if is_not_found(&e) => return Ok(Action::await_change()),
            Err(source) => {
                return Err(NamespaceError::Api {
                    namespace: name,
                    action: "update status".into(),
                    source,
                })
            }
        }
    }
    if !left.by_resource.is_empty() || !left.failures.is_empty() {
        // Graceful pod deletions and other finalizers take a while; look again soon (upstream estimates the
        // wait from the pods' grace periods).
        return Ok(Action::requeue(Duration::from_secs(1)));
    }
    let mut finalized = (*ns).clone();
    let remaining: Vec<String> = finalizers.into_iter().filter(|f| f != FINALIZER).collect();
    finalized
        .spec
        .get_or_insert_with(Default::default)
        .finalizers = Some(remaining);
    match ns_api
        .replace_subresource("finalize", &name, &PostParams::default(), &finalized)
        .await
    {
        Ok(_) => {
            tracing::info!(controller = NAME, namespace = %name, "namespace emptied; finalized");
            Ok(Action::await_change())
        }
        Err(e) if is_not_found(&e) => Ok(Action::await_change()),
        Err(source) => Err(NamespaceError::Api {
            namespace: name,
            action: "finalize".into(),
            source,
        }),
    }
}

/// Whether the conditions changed in anything but their timestamps.
fn status_conditions_differ(old: Option<&NamespaceStatus>, new: &[NamespaceCondition]) -> bool {
    let strip = |c: &NamespaceCondition| {
        (
            c.type_.clone(),
            c.status.clone(),
            c.reason.clone(),
            c.message.clone(),
        )
    };
    let old: Vec<_> = old
        .and_then(|s| s.conditions.as_ref())
        .map(|c| c.iter().map(strip).collect())
        .unwrap_or_default();
    let new: Vec<_> = new.iter().map(strip).collect();
    old != new
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn conditions_say_what_remains_as_upstream() {
        let mut left = Remaining::default();
        left.by_resource.insert("pods".into(), 2);
        left.finalizers.insert("example.com/hold".into(), 1);
        let c = left.conditions();
        let content = c
            .iter()
            .find(|c| c.type_ == "NamespaceContentRemaining")
            .and_then(|c| c.message.clone());
        assert_eq!(
            content.as_deref(),
            Some("Some resources are remaining: pods has 2 resource instances")
        );
        let fin = c
            .iter()
            .find(|c| c.type_ == "NamespaceFinalizersRemaining")
            .map(|c| c.status.clone());
        assert_eq!(fin.as_deref(), Some("True"));
        assert!(!status_conditions_differ(
            Some(&NamespaceStatus {
                phase: None,
                conditions: Some(left.conditions())
            }),
            &c
        ));
    }
}
