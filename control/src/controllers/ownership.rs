//! What the workload controllers share: label selectors, controller references, adoption and release of
//! dependents (upstream `ControllerRefManager`), and expectations (upstream `ControllerExpectations`).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt::Debug;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta, OwnerReference};
use kube::api::{Patch, PatchParams};
use kube::{Api, Resource, ResourceExt};
use serde::de::DeserializeOwned;
use serde_json::json;

/// The field manager the controllers write with.
pub(crate) const FIELD_MANAGER: &str = "windlass-controller-manager";

/// Whether `labels` satisfy `selector` (Ref: apimachinery `LabelSelectorAsSelector`). An empty selector matches
/// everything; a malformed expression matches nothing.
pub(crate) fn selector_matches(
    selector: &LabelSelector,
    labels: &BTreeMap<String, String>,
) -> bool {
    for (k, v) in selector.match_labels.iter().flatten() {
        if labels.get(k) != Some(v) {
            return false;
        }
    }
    for e in selector.match_expressions.iter().flatten() {
        let values = e.values.as_deref().unwrap_or_default();
        let have = labels.get(&e.key);
        let ok = match e.operator.as_str() {
            "In" => have.is_some_and(|h| values.contains(h)),
            "NotIn" => have.is_none_or(|h| !values.contains(h)),
            "Exists" => have.is_some(),
            "DoesNotExist" => have.is_none(),
            _ => false,
        };
        if !ok {
            return false;
        }
    }
    true
}

/// Whether a selector selects nothing in particular (upstream refuses to manage with an empty selector).
pub(crate) fn selector_is_empty(selector: &LabelSelector) -> bool {
    selector
        .match_labels
        .as_ref()
        .is_none_or(BTreeMap::is_empty)
        && selector
            .match_expressions
            .as_ref()
            .is_none_or(Vec::is_empty)
}

/// The controlling owner reference of an object, if any.
pub(crate) fn controller_of(meta: &ObjectMeta) -> Option<&OwnerReference> {
    meta.owner_references
        .iter()
        .flatten()
        .find(|r| r.controller == Some(true))
}

/// A controller reference to `owner` (`controller: true`, `blockOwnerDeletion: true`, as upstream's
/// `NewControllerRef`).
pub(crate) fn controller_ref<K: Resource<DynamicType = ()>>(owner: &K) -> OwnerReference {
    OwnerReference {
        api_version: K::api_version(&()).into_owned(),
        kind: K::kind(&()).into_owned(),
        name: owner.name_any(),
        uid: owner.uid().unwrap_or_default(),
        controller: Some(true),
        block_owner_deletion: Some(true),
    }
}

/// Whether an object is being deleted.
pub(crate) fn deleting(meta: &ObjectMeta) -> bool {
    meta.deletion_timestamp.is_some()
}

/// What claiming did not settle.
#[derive(Debug, thiserror::Error)]
#[error("cannot {action} {kind} {namespace}/{name}: {source}")]
pub(crate) struct ClaimError {
    pub action: &'static str,
    pub kind: String,
    pub namespace: String,
    pub name: String,
    #[source]
    pub source: kube::Error,
}

/// Sorts candidates into the ones `owner` controls, adopting orphans that match its selector and releasing
/// owned ones that no longer match (Ref: controller `ControllerRefManager.ClaimObject`). An owner being deleted
/// adopts nothing and releases nothing. Objects being deleted are not adopted.
pub(crate) async fn claim<O, D>(
    api: &Api<D>,
    owner: &O,
    selector: &LabelSelector,
    candidates: Vec<Arc<D>>,
) -> Result<Vec<Arc<D>>, ClaimError>
where
    O: Resource<DynamicType = ()>,
    D: Resource<DynamicType = ()> + Clone + DeserializeOwned + Debug,
{
    let owner_uid = owner.uid().unwrap_or_default();
    let owner_deleting = deleting(owner.meta());
    let mut claimed = Vec::new();
    for obj in candidates {
        let meta = obj.meta();
        let matches = selector_matches(selector, &meta.labels.clone().unwrap_or_default());
        match controller_of(meta) {
            Some(r) if r.uid == owner_uid => {
                if matches || owner_deleting {
                    claimed.push(obj);
                    continue;
                }
                // Release: drop our reference (upstream patches it away by UID).
                let refs: Vec<OwnerReference> = meta
                    .owner_references
                    .iter()
                    .flatten()
                    .filter(|r| r.uid != owner_uid)
                    .cloned()
                    .collect();
                match set_owner_refs(api, &obj, refs).await {
                    Ok(()) => {}
                    // Gone or changed meanwhile: the next sync sees the truth.
                    Err(e) if is_not_found(&e) || is_conflict(&e) => {}
                    Err(e) => return Err(claim_error("release", &*obj, e)),
                }
            }
            Some(_) => {}
            None => {
                if !matches || owner_deleting || deleting(meta) {
                    continue;
                }
                let mut refs: Vec<OwnerReference> =
                    meta.owner_references.clone().unwrap_or_default();
                refs.push(controller_ref(owner));
                match set_owner_refs(api, &obj, refs).await {
                    Ok(()) => {
                        tracing::info!(
                            owner = %owner.name_any(),
                            object = %obj.name_any(),
                            "adopted"
                        );
                        claimed.push(obj);
                    }
                    Err(e) if is_not_found(&e) || is_conflict(&e) => {}
                    Err(e) => return Err(claim_error("adopt", &*obj, e)),
                }
            }
        }
    }
    Ok(claimed)
}

fn claim_error<D: Resource<DynamicType = ()>>(
    action: &'static str,
    obj: &D,
    source: kube::Error,
) -> ClaimError {
    ClaimError {
        action,
        kind: D::kind(&()).into_owned(),
        namespace: obj.namespace().unwrap_or_default(),
        name: obj.name_any(),
        source,
    }
}

/// Replaces an object's owner references, guarded by its UID and resourceVersion so a concurrent change fails
/// with a conflict instead of being overwritten.
async fn set_owner_refs<D>(
    api: &Api<D>,
    obj: &D,
    refs: Vec<OwnerReference>,
) -> Result<(), kube::Error>
where
    D: Resource<DynamicType = ()> + Clone + DeserializeOwned + Debug,
{
    let name = obj.name_any();
    let patch = json!({"metadata": {
        "ownerReferences": refs,
        "uid": obj.uid(),
        "resourceVersion": obj.resource_version(),
    }});
    api.patch(&name, &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .map(|_| ())
}

pub(crate) fn is_not_found(e: &kube::Error) -> bool {
    matches!(e, kube::Error::Api(s) if s.code == 404)
}

pub(crate) fn is_conflict(e: &kube::Error) -> bool {
    matches!(e, kube::Error::Api(s) if s.code == 409)
}

pub(crate) fn is_already_exists(e: &kube::Error) -> bool {
    matches!(e, kube::Error::Api(s) if s.code == 409 && s.reason == "AlreadyExists")
}

/// How long an expectation may stay unmet before the controller stops waiting for its watch (upstream
/// `ExpectationsTimeout`, 5 minutes).
const EXPECTATIONS_TIMEOUT: Duration = Duration::from_secs(300);

#[derive(Debug)]
struct Expectation {
    adds: HashSet<String>,
    /// Names the watch showed before their creation call returned.
    seen: HashSet<String>,
    deletes: HashSet<String>,
    /// Creations that were requested but whose names are not known yet (the server picks them).
    pending_adds: usize,
    since: Instant,
}

/// Creations and deletions a controller made and has not yet seen in its watch, per owner key
/// (`namespace/name`). While any are outstanding the owner is not synced again, so a lagging cache does not make
/// it create or delete twice (Ref: controller `ControllerExpectations`; names instead of counts, so a lost watch
/// event does not leave a count stuck).
#[derive(Debug, Clone, Default)]
pub(crate) struct Expectations {
    inner: Arc<Mutex<HashMap<String, Expectation>>>,
}

impl Expectations {
    fn with<R>(&self, f: impl FnOnce(&mut HashMap<String, Expectation>) -> R) -> R {
        // A poisoned lock only means another sync panicked mid-update; the sets are still usable.
        let mut guard = match self.inner.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        };
        f(&mut guard)
    }

    /// Whether the owner may be synced: nothing outstanding, or waited long enough.
    pub fn satisfied(&self, key: &str) -> bool {
        self.with(|m| match m.get(key) {
            None => true,
            Some(e) => {
                (e.adds.is_empty() && e.deletes.is_empty() && e.pending_adds == 0)
                    || e.since.elapsed() > EXPECTATIONS_TIMEOUT
            }
        })
    }

    /// Starts a round of `adds` creations and the given deletions.
    pub fn expect(&self, key: &str, adds: usize, deletes: impl IntoIterator<Item = String>) {
        self.with(|m| {
            m.insert(
                key.to_string(),
                Expectation {
                    adds: HashSet::new(),
                    seen: HashSet::new(),
                    deletes: deletes.into_iter().collect(),
                    pending_adds: adds,
                    since: Instant::now(),
                },
            );
        });
    }

    /// A creation succeeded: wait for this name in the watch (unless it was seen already).
    pub fn created(&self, key: &str, name: String) {
        self.with(|m| {
            if let Some(e) = m.get_mut(key) {
                e.pending_adds = e.pending_adds.saturating_sub(1);
                if !e.seen.remove(&name) {
                    e.adds.insert(name);
                }
            }
        });
    }

    /// A creation or deletion failed or was skipped: do not wait for it.
    pub fn lower_adds(&self, key: &str, n: usize) {
        self.with(|m| {
            if let Some(e) = m.get_mut(key) {
                e.pending_adds = e.pending_adds.saturating_sub(n);
            }
        });
    }

    pub fn deletion_failed(&self, key: &str, name: &str) {
        self.with(|m| {
            if let Some(e) = m.get_mut(key) {
                e.deletes.remove(name);
            }
        });
    }

    /// The watch showed an object (`gone`: deleted, or being deleted).
    pub fn observed(&self, key: &str, name: &str, gone: bool) {
        self.with(|m| {
            if let Some(e) = m.get_mut(key) {
                if !e.adds.remove(name) && e.pending_adds > 0 {
                    e.seen.insert(name.to_string());
                }
                if gone {
                    e.deletes.remove(name);
                }
            }
        });
    }

    /// The owner is gone: forget it.
    pub fn forget(&self, key: &str) {
        self.with(|m| {
            m.remove(key);
        });
    }
}

/// `namespace/name` of an object.
pub(crate) fn key_of<K: Resource>(obj: &K) -> String {
    format!("{}/{}", obj.namespace().unwrap_or_default(), obj.name_any())
}

/// Logs one outcome of a kube-runtime controller: a failed sync at `warn` (the error policy retries it), an
/// object gone before its sync at `debug`.
pub(crate) fn log_result<K, E, Q>(
    controller: &'static str,
    res: Result<
        (
            kube::runtime::reflector::ObjectRef<K>,
            kube::runtime::controller::Action,
        ),
        kube::runtime::controller::Error<E, Q>,
    >,
) where
    K: Resource,
    E: std::error::Error + 'static,
    Q: std::error::Error + 'static,
{
    use kube::runtime::controller::Error;
    match res {
        Ok(_) => {}
        Err(Error::ObjectNotFound(r)) => {
            tracing::debug!(controller, object = %r, "gone before its sync")
        }
        Err(Error::ReconcilerFailed(..)) => {}
        Err(e) => tracing::warn!(controller, error = %e, "controller error"),
    }
}

/// Records a core/v1 Event about `obj` (what `kubectl describe` lists), without waiting for it: an event that
/// cannot be written is not worth failing or slowing a sync for (upstream's recorder drops them too).
pub(crate) fn record_event<K: Resource<DynamicType = ()>>(
    client: &kube::Client,
    obj: &K,
    component: &'static str,
    warning: bool,
    reason: &'static str,
    message: String,
) {
    let ns = obj.namespace().unwrap_or_else(|| "default".into());
    let now = jiff::Timestamp::now();
    let event = json!({
        "apiVersion": "v1", "kind": "Event",
        "metadata": {"name": format!("{}.{:x}", obj.name_any(), now.as_nanosecond()), "namespace": ns},
        "involvedObject": {
            "apiVersion": K::api_version(&()), "kind": K::kind(&()), "namespace": obj.namespace(),
            "name": obj.name_any(), "uid": obj.uid(), "resourceVersion": obj.resource_version(),
        },
        "reason": reason, "message": message, "type": if warning { "Warning" } else { "Normal" },
        "source": {"component": component},
        "firstTimestamp": now.to_string(), "lastTimestamp": now.to_string(), "count": 1,
        "reportingComponent": component, "reportingInstance": "",
    });
    let api: Api<kube::api::DynamicObject> = Api::namespaced_with(
        client.clone(),
        &ns,
        &kube::api::ApiResource::erase::<k8s_openapi::api::core::v1::Event>(&()),
    );
    tokio::spawn(async move {
        let obj: kube::api::DynamicObject = match serde_json::from_value(event) {
            Ok(o) => o,
            Err(_) => return,
        };
        if let Err(e) = api.create(&kube::api::PostParams::default(), &obj).await {
            tracing::debug!(error = %e, "cannot record event");
        }
    });
}

#[cfg(test)]
mod tests {
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelectorRequirement;

    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn selector_matches_labels_and_expressions() {
        let sel = LabelSelector {
            match_labels: Some(labels(&[("app", "web")])),
            match_expressions: Some(vec![
                LabelSelectorRequirement {
                    key: "tier".into(),
                    operator: "In".into(),
                    values: Some(vec!["a".into(), "b".into()]),
                },
                LabelSelectorRequirement {
                    key: "canary".into(),
                    operator: "DoesNotExist".into(),
                    values: None,
                },
            ]),
        };
        assert!(selector_matches(
            &sel,
            &labels(&[("app", "web"), ("tier", "b")])
        ));
        assert!(!selector_matches(
            &sel,
            &labels(&[("app", "web"), ("tier", "c")])
        ));
        assert!(!selector_matches(
            &sel,
            &labels(&[("app", "web"), ("tier", "a"), ("canary", "1")])
        ));
        assert!(!selector_matches(&sel, &labels(&[("tier", "a")])));
        assert!(selector_matches(&LabelSelector::default(), &labels(&[])));
    }

    #[test]
    fn expectations_hold_until_every_created_and_deleted_pod_is_observed() {
        let e = Expectations::default();
        assert!(e.satisfied("ns/rs"));
        e.expect("ns/rs", 2, ["old".to_string()]);
        assert!(!e.satisfied("ns/rs"));
        e.created("ns/rs", "a".into());
        e.observed("ns/rs", "b", false);
        e.created("ns/rs", "b".into());
        e.observed("ns/rs", "old", true);
        assert!(!e.satisfied("ns/rs"), "a is not seen yet");
        e.observed("ns/rs", "a", false);
        assert!(e.satisfied("ns/rs"));
        e.expect("ns/rs", 3, []);
        e.lower_adds("ns/rs", 3);
        assert!(e.satisfied("ns/rs"));
    }
}
