//! The ReplicaSet controller: keeps `spec.replicas` pods matching the selector, owned by the ReplicaSet, and
//! reports what it sees in the status (Ref: kubernetes `pkg/controller/replicaset/replica_set.go`).

use std::cmp::Ordering;
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use futures_util::{future, StreamExt, TryStreamExt};
use k8s_openapi::api::apps::v1::{ReplicaSet, ReplicaSetCondition, ReplicaSetStatus};
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time};
use kube::api::{DeleteParams, Patch, PatchParams, PostParams, Preconditions};
use kube::runtime::controller::Action;
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::{watcher, Controller, WatchStreamExt};
use kube::{Api, Client, ResourceExt};
use serde_json::json;

use super::ownership::{
    claim, controller_of, deleting, is_not_found, key_of, record_event, selector_matches,
    ClaimError, Expectations, FIELD_MANAGER,
};
use super::{Context, ControllerError, ControllerFuture};

const NAME: &str = "replicaset";
/// The event source upstream's ReplicaSet controller reports as.
const COMPONENT: &str = "replicaset-controller";

/// At most this many pods are created or deleted in one sync (upstream `BurstReplicas`).
const BURST_REPLICAS: usize = 500;

/// What failed while syncing one ReplicaSet.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ReplicaSetError {
    #[error("replicaset {key}: cannot {action}: {source}")]
    Api {
        key: String,
        action: &'static str,
        #[source]
        source: kube::Error,
    },
    #[error("replicaset {key}: {0}", key = .1)]
    Claim(#[source] ClaimError, String),
}

struct State {
    client: Client,
    pods: Store<Pod>,
    expectations: Expectations,
}

pub(crate) fn start(ctx: Context) -> ControllerFuture {
    Box::pin(run(ctx.client))
}

async fn run(client: Client) -> Result<(), ControllerError> {
    let (pods, writer) = reflector::store::<Pod>();
    let expectations = Expectations::default();
    let observer = expectations.clone();
    let pod_events = watcher(Api::<Pod>::all(client.clone()), watcher::Config::default())
        .default_backoff()
        .reflect(writer)
        .inspect_ok(move |ev| observe_pod(&observer, ev))
        .touched_objects();
    let controller = Controller::new(
        Api::<ReplicaSet>::all(client.clone()),
        watcher::Config::default(),
    );
    let sets = controller.store();
    let state = Arc::new(State {
        client,
        pods,
        expectations,
    });
    tracing::info!(controller = NAME, "starting");
    controller
        .watches_stream(pod_events, move |pod: Pod| pod_owners(&sets, &pod))
        .run(reconcile, error_policy, state)
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

/// The ReplicaSets a pod event concerns: its controller, or every ReplicaSet that could adopt it.
fn pod_owners(sets: &Store<ReplicaSet>, pod: &Pod) -> Vec<ObjectRef<ReplicaSet>> {
    let ns = pod.namespace().unwrap_or_default();
    if let Some(owner) = controller_of(&pod.metadata) {
        if owner.kind == "ReplicaSet" && owner.api_version == "apps/v1" {
            return vec![ObjectRef::new(&owner.name).within(&ns)];
        }
        return Vec::new();
    }
    let labels = pod.labels();
    sets.state()
        .iter()
        .filter(|rs| rs.namespace().as_deref() == Some(ns.as_str()))
        .filter(|rs| selector_matches(&rs.spec.selector, labels))
        .map(|rs| ObjectRef::from_obj(&**rs))
        .collect()
}

/// Feeds the expectations from the pod watch.
fn observe_pod(expectations: &Expectations, ev: &watcher::Event<Pod>) {
    let (pod, gone) = match ev {
        watcher::Event::Apply(p) | watcher::Event::InitApply(p) => (p, deleting(&p.metadata)),
        watcher::Event::Delete(p) => (p, true),
        watcher::Event::Init | watcher::Event::InitDone => return,
    };
    if let Some(owner) = controller_of(&pod.metadata) {
        let key = format!("{}/{}", pod.namespace().unwrap_or_default(), owner.name);
        expectations.observed(&key, &pod.name_any(), gone);
    }
}

fn error_policy(rs: Arc<ReplicaSet>, err: &ReplicaSetError, _: Arc<State>) -> Action {
    tracing::warn!(controller = NAME, replicaset = %key_of(&*rs), error = %err, "sync failed; retrying");
    Action::requeue(Duration::from_secs(2))
}

/// A pod that counts: not finished and not being deleted (upstream `FilterActivePods`).
pub(crate) fn is_active(pod: &Pod) -> bool {
    let phase = pod.status.as_ref().and_then(|s| s.phase.as_deref());
    !matches!(phase, Some("Succeeded" | "Failed")) && !deleting(&pod.metadata)
}

fn ready_since(pod: &Pod) -> Option<Option<jiff::Timestamp>> {
    pod.status
        .as_ref()?
        .conditions
        .as_ref()?
        .iter()
        .find(|c| c.type_ == "Ready" && c.status == "True")
        .map(|c| c.last_transition_time.as_ref().map(|t| t.0))
}

pub(crate) fn is_ready(pod: &Pod) -> bool {
    ready_since(pod).is_some()
}

/// Ready for at least `min_ready_seconds` (upstream `IsPodAvailable`).
pub(crate) fn is_available(pod: &Pod, min_ready_seconds: i32, now: jiff::Timestamp) -> bool {
    match ready_since(pod) {
        None => false,
        Some(_) if min_ready_seconds <= 0 => true,
        Some(None) => false,
        Some(Some(t)) => t + jiff::SignedDuration::from_secs(i64::from(min_ready_seconds)) <= now,
    }
}

async fn reconcile(rs: Arc<ReplicaSet>, state: Arc<State>) -> Result<Action, ReplicaSetError> {
    let key = key_of(&*rs);
    let ns = rs.namespace().unwrap_or_default();
    let spec = &rs.spec;
    let pod_api: Api<Pod> = Api::namespaced(state.client.clone(), &ns);
    let candidates: Vec<Arc<Pod>> = state
        .pods
        .state()
        .into_iter()
        .filter(|p| p.namespace().as_deref() == Some(ns.as_str()) && is_active(p))
        .collect();
    let pods = claim(&pod_api, &*rs, &spec.selector, candidates)
        .await
        .map_err(|e| ReplicaSetError::Claim(e, key.clone()))?;

    let mut outcome = Manage::default();
    let mut manage_err = None;
    let synced = state.expectations.satisfied(&key);
    if synced && !deleting(&rs.metadata) {
        if let Err(e) = manage_replicas(&state, &rs, &pods, &mut outcome).await {
            manage_err = Some(e);
        }
    }
    if deleting(&rs.metadata) {
        state.expectations.forget(&key);
    }
    let now = jiff::Timestamp::now();
    let remaining: Vec<&Pod> = pods
        .iter()
        .map(|p| &**p)
        .filter(|p| !outcome.deleted.contains(&p.name_any()))
        .collect();
    let mut status = calculate_status(&rs, &remaining, manage_err.as_ref(), now);
    if !synced {
        // The counts may still include pods this controller deleted but has not seen go: do not claim to have
        // acted on the latest spec yet, so the Deployment controller does not scale on counts about to drop.
        status.observed_generation = rs.status.as_ref().and_then(|s| s.observed_generation);
    }
    if status_differs(rs.status.as_ref(), &status) {
        let api: Api<ReplicaSet> = Api::namespaced(state.client.clone(), &ns);
        let mut body = json!({"status": status});
        if status.conditions.is_none() {
            body["status"]["conditions"] = serde_json::Value::Null;
        }
        match api
            .patch_status(
                &rs.name_any(),
                &PatchParams::apply(FIELD_MANAGER),
                &Patch::Merge(&body),
            )
            .await
        {
            Ok(_) => {}
            Err(e) if is_not_found(&e) => return Ok(Action::await_change()),
            Err(source) => {
                return Err(ReplicaSetError::Api {
                    key,
                    action: "update status",
                    source,
                })
            }
        }
    }
    if let Some(e) = manage_err {
        return Err(e);
    }
    if !synced {
        // The watch will bring the missing pods; this is only the fallback if it never does.
        return Ok(Action::requeue(Duration::from_secs(30)));
    }
    // Pods that are ready but not yet available become available without any event: look again then
    // (upstream re-queues after minReadySeconds).
    let min_ready = spec.min_ready_seconds.unwrap_or(0);
    if min_ready > 0 && status.ready_replicas.unwrap_or(0) > status.available_replicas.unwrap_or(0)
    {
        return Ok(Action::requeue(Duration::from_secs(min_ready as u64 + 1)));
    }
    Ok(Action::requeue(Duration::from_secs(300)))
}

#[derive(Default)]
struct Manage {
    deleted: Vec<String>,
}

/// Sizes of the creation batches for `n` pods: 1, 2, 4, ... (upstream `slowStartBatch` with initial batch 1),
/// so that a failing creation (quota, admission) costs one request, not hundreds.
pub(crate) fn slow_start_batches(n: usize) -> Vec<usize> {
    let mut out = Vec::new();
    let (mut left, mut size) = (n, 1usize);
    while left > 0 {
        let b = size.min(left);
        out.push(b);
        left -= b;
        size *= 2;
    }
    out
}

async fn manage_replicas(
    state: &State,
    rs: &ReplicaSet,
    pods: &[Arc<Pod>],
    outcome: &mut Manage,
) -> Result<(), ReplicaSetError> {
    let key = key_of(rs);
    let ns = rs.namespace().unwrap_or_default();
    let desired = rs.spec.replicas.unwrap_or(1).max(0) as usize;
    let pod_api: Api<Pod> = Api::namespaced(state.client.clone(), &ns);
    if pods.len() < desired {
        let n = (desired - pods.len()).min(BURST_REPLICAS);
        state.expectations.expect(&key, n, []);
        let template = pod_from_template(rs);
        let pp = PostParams::default();
        let mut done = 0usize;
        for batch in slow_start_batches(n) {
            let results =
                future::join_all((0..batch).map(|_| pod_api.create(&pp, &template))).await;
            let mut first_err = None;
            for r in results {
                match r {
                    Ok(p) => {
                        tracing::debug!(replicaset = %key, pod = %p.name_any(), "created pod");
                        record_event(
                            &state.client,
                            rs,
                            COMPONENT,
                            false,
                            "SuccessfulCreate",
                            format!("Created pod: {}", p.name_any()),
                        );
                        state.expectations.created(&key, p.name_any());
                    }
                    Err(e) => {
                        state.expectations.lower_adds(&key, 1);
                        // Creating in a terminating namespace is expected to fail; not the ReplicaSet's fault.
                        let terminating = matches!(&e, kube::Error::Api(s) if s.code == 403
                            && s.message.contains("being terminated"));
                        if !terminating && first_err.is_none() {
                            record_event(
                                &state.client,
                                rs,
                                COMPONENT,
                                true,
                                "FailedCreate",
                                format!("Error creating: {e}"),
                            );
                            first_err = Some(e);
                        }
                    }
                }
            }
            done += batch;
            if let Some(source) = first_err {
                // Skip the remaining batches: they would most likely fail the same way.
                state.expectations.lower_adds(&key, n - done);
                return Err(ReplicaSetError::Api {
                    key,
                    action: "create pods",
                    source,
                });
            }
        }
        tracing::info!(replicaset = %key, created = n, "scaled up");
    } else if pods.len() > desired {
        let n = (pods.len() - desired).min(BURST_REPLICAS);
        let victims = pods_to_delete(pods, n);
        let names: Vec<String> = victims.iter().map(|p| p.name_any()).collect();
        state.expectations.expect(&key, 0, names.clone());
        let results = future::join_all(victims.iter().map(|p| {
            let dp = DeleteParams {
                preconditions: Some(Preconditions {
                    uid: p.uid(),
                    resource_version: None,
                }),
                ..DeleteParams::default()
            };
            let api = pod_api.clone();
            let name = p.name_any();
            async move { (name.clone(), api.delete(&name, &dp).await) }
        }))
        .await;
        let mut first_err = None;
        for (name, r) in results {
            match r {
                Ok(_) => {
                    record_event(
                        &state.client,
                        rs,
                        COMPONENT,
                        false,
                        "SuccessfulDelete",
                        format!("Deleted pod: {name}"),
                    );
                    outcome.deleted.push(name);
                }
                Err(e) if is_not_found(&e) => {
                    state.expectations.deletion_failed(&key, &name);
                    outcome.deleted.push(name);
                }
                Err(e) => {
                    state.expectations.deletion_failed(&key, &name);
                    record_event(
                        &state.client,
                        rs,
                        COMPONENT,
                        true,
                        "FailedDelete",
                        format!("Error deleting: {e}"),
                    );
                    first_err.get_or_insert(e);
                }
            }
        }
        tracing::info!(replicaset = %key, deleted = outcome.deleted.len(), "scaled down");
        if let Some(source) = first_err {
            return Err(ReplicaSetError::Api {
                key,
                action: "delete pods",
                source,
            });
        }
    }
    Ok(())
}

/// A new pod from the ReplicaSet's template, controlled by it (upstream `GetPodFromTemplate`).
fn pod_from_template(rs: &ReplicaSet) -> Pod {
    let template = rs.spec.template.clone().unwrap_or_default();
    let tmeta = template.metadata.unwrap_or_default();
    Pod {
        metadata: ObjectMeta {
            generate_name: Some(format!("{}-", rs.name_any())),
            labels: tmeta.labels,
            annotations: tmeta.annotations,
            finalizers: tmeta.finalizers,
            owner_references: Some(vec![super::ownership::controller_ref(rs)]),
            ..ObjectMeta::default()
        },
        spec: template.spec,
        status: None,
    }
}

fn phase_rank(pod: &Pod) -> u8 {
    match pod.status.as_ref().and_then(|s| s.phase.as_deref()) {
        Some("Pending") | None => 0,
        Some("Unknown") => 1,
        Some("Running") => 2,
        _ => 0,
    }
}

fn restarts(pod: &Pod) -> i32 {
    pod.status
        .as_ref()
        .and_then(|s| s.container_statuses.as_ref())
        .map(|c| c.iter().map(|c| c.restart_count).max().unwrap_or(0))
        .unwrap_or(0)
}

fn deletion_cost(pod: &Pod) -> i32 {
    pod.annotations()
        .get("controller.kubernetes.io/pod-deletion-cost")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

fn node_of(pod: &Pod) -> &str {
    pod.spec
        .as_ref()
        .and_then(|s| s.node_name.as_deref())
        .unwrap_or_default()
}

/// Which `n` pods go first when scaling down (upstream `ActivePodsWithRanks.Less`): unscheduled before
/// scheduled, pending before unknown before running, not ready before ready, lower deletion cost first, pods
/// sharing a node with more of their siblings first, ready for less time first, more restarts first, newer first.
pub(crate) fn pods_to_delete(pods: &[Arc<Pod>], n: usize) -> Vec<Arc<Pod>> {
    let mut per_node: HashMap<&str, usize> = HashMap::new();
    for p in pods {
        let node = node_of(p);
        if !node.is_empty() {
            *per_node.entry(node).or_default() += 1;
        }
    }
    let rank = |p: &Pod| per_node.get(node_of(p)).copied().unwrap_or(0);
    let mut sorted: Vec<Arc<Pod>> = pods.to_vec();
    sorted.sort_by(|a, b| {
        let (na, nb) = (node_of(a), node_of(b));
        if na != nb && (na.is_empty() || nb.is_empty()) {
            return if na.is_empty() {
                Ordering::Less
            } else {
                Ordering::Greater
            };
        }
        phase_rank(a)
            .cmp(&phase_rank(b))
            .then(is_ready(a).cmp(&is_ready(b)))
            .then(deletion_cost(a).cmp(&deletion_cost(b)))
            .then(rank(b).cmp(&rank(a)))
            .then_with(
                || match (ready_since(a).flatten(), ready_since(b).flatten()) {
                    // Ready more recently goes first.
                    (Some(x), Some(y)) => y.cmp(&x),
                    _ => Ordering::Equal,
                },
            )
            .then(restarts(b).cmp(&restarts(a)))
            .then_with(|| {
                let (ca, cb) = (
                    a.metadata.creation_timestamp.as_ref().map(|t| t.0),
                    b.metadata.creation_timestamp.as_ref().map(|t| t.0),
                );
                // Newer first; no timestamp counts as newest.
                match (ca, cb) {
                    (None, None) => Ordering::Equal,
                    (None, _) => Ordering::Less,
                    (_, None) => Ordering::Greater,
                    (Some(x), Some(y)) => y.cmp(&x),
                }
            })
    });
    sorted.truncate(n);
    sorted
}

fn template_labels(rs: &ReplicaSet) -> BTreeMap<String, String> {
    rs.spec
        .template
        .as_ref()
        .and_then(|t| t.metadata.as_ref())
        .and_then(|m| m.labels.clone())
        .unwrap_or_default()
}

/// The status the ReplicaSet should report for these (active, owned) pods (upstream `calculateStatus`).
pub(crate) fn calculate_status(
    rs: &ReplicaSet,
    pods: &[&Pod],
    manage_err: Option<&ReplicaSetError>,
    now: jiff::Timestamp,
) -> ReplicaSetStatus {
    let min_ready = rs.spec.min_ready_seconds.unwrap_or(0);
    let tlabels = template_labels(rs);
    let fully_labeled = pods
        .iter()
        .filter(|p| {
            let l = p.labels();
            tlabels.iter().all(|(k, v)| l.get(k) == Some(v))
        })
        .count();
    let ready = pods.iter().filter(|p| is_ready(p)).count();
    let available = pods
        .iter()
        .filter(|p| is_available(p, min_ready, now))
        .count();
    let mut conditions: Vec<ReplicaSetCondition> = rs
        .status
        .as_ref()
        .and_then(|s| s.conditions.clone())
        .unwrap_or_default();
    let has_failure = conditions
        .iter()
        .any(|c| c.type_.as_deref() == Some("ReplicaFailure"));
    match manage_err {
        Some(err) if !has_failure => {
            let desired = rs.spec.replicas.unwrap_or(1) as usize;
            let reason = if pods.len() < desired {
                "FailedCreate"
            } else {
                "FailedDelete"
            };
            conditions.push(ReplicaSetCondition {
                type_: Some("ReplicaFailure".into()),
                status: Some("True".into()),
                reason: Some(reason.into()),
                message: Some(err.to_string()),
                last_transition_time: Some(Time(now)),
            });
        }
        None if has_failure => {
            conditions.retain(|c| c.type_.as_deref() != Some("ReplicaFailure"));
        }
        _ => {}
    }
    ReplicaSetStatus {
        replicas: pods.len() as i32,
        fully_labeled_replicas: Some(fully_labeled as i32),
        ready_replicas: Some(ready as i32),
        available_replicas: Some(available as i32),
        observed_generation: rs.metadata.generation,
        conditions: (!conditions.is_empty()).then_some(conditions),
        terminating_replicas: None,
    }
}

fn status_differs(old: Option<&ReplicaSetStatus>, new: &ReplicaSetStatus) -> bool {
    let Some(old) = old else { return true };
    let z = |v: Option<i32>| v.unwrap_or(0);
    old.replicas != new.replicas
        || z(old.fully_labeled_replicas) != z(new.fully_labeled_replicas)
        || z(old.ready_replicas) != z(new.ready_replicas)
        || z(old.available_replicas) != z(new.available_replicas)
        || old.observed_generation != new.observed_generation
        || old.conditions.as_deref().unwrap_or_default()
            != new.conditions.as_deref().unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use k8s_openapi::api::core::v1::{PodCondition, PodSpec, PodStatus};

    use super::*;

    fn pod(name: &str, node: &str, phase: &str, ready: bool, created: i64) -> Arc<Pod> {
        Arc::new(Pod {
            metadata: ObjectMeta {
                name: Some(name.into()),
                creation_timestamp: Some(Time(
                    jiff::Timestamp::from_second(created).unwrap_or_default(),
                )),
                ..ObjectMeta::default()
            },
            spec: Some(PodSpec {
                node_name: (!node.is_empty()).then(|| node.to_string()),
                ..PodSpec::default()
            }),
            status: Some(PodStatus {
                phase: Some(phase.into()),
                conditions: ready.then(|| {
                    vec![PodCondition {
                        type_: "Ready".into(),
                        status: "True".into(),
                        last_transition_time: Some(Time(
                            jiff::Timestamp::from_second(created + 5).unwrap_or_default(),
                        )),
                        ..PodCondition::default()
                    }]
                }),
                ..PodStatus::default()
            }),
        })
    }

    fn names(pods: &[Arc<Pod>]) -> Vec<String> {
        pods.iter().map(|p| p.name_any()).collect()
    }

    #[test]
    fn scale_down_deletes_unscheduled_then_pending_then_unready_then_newest() {
        let pods = vec![
            pod("old-ready", "n1", "Running", true, 100),
            pod("new-ready", "n2", "Running", true, 200),
            pod("running-unready", "n1", "Running", false, 100),
            pod("pending", "n1", "Pending", false, 100),
            pod("unscheduled", "", "Pending", false, 50),
        ];
        assert_eq!(
            names(&pods_to_delete(&pods, 5)),
            [
                "unscheduled",
                "pending",
                "running-unready",
                "old-ready",
                "new-ready"
            ]
        );
        assert_eq!(names(&pods_to_delete(&pods, 2)), ["unscheduled", "pending"]);
    }

    #[test]
    fn scale_down_prefers_pods_doubled_up_on_a_node() {
        let pods = vec![
            pod("alone", "n1", "Running", true, 100),
            pod("shared-a", "n2", "Running", true, 100),
            pod("shared-b", "n2", "Running", true, 100),
        ];
        assert!(pods_to_delete(&pods, 1)[0].name_any().starts_with("shared"));
    }

    #[test]
    fn slow_start_doubles_batches_up_to_the_total() {
        assert_eq!(slow_start_batches(0), Vec::<usize>::new());
        assert_eq!(slow_start_batches(1), [1]);
        assert_eq!(slow_start_batches(10), [1, 2, 4, 3]);
        assert_eq!(slow_start_batches(15), [1, 2, 4, 8]);
    }

    #[test]
    fn availability_waits_for_min_ready_seconds() {
        let p = pod("a", "n1", "Running", true, 100);
        let at = |s| jiff::Timestamp::from_second(s).unwrap_or_default();
        assert!(is_available(&p, 0, at(105)));
        assert!(!is_available(&p, 10, at(110)));
        assert!(is_available(&p, 10, at(115)));
        assert!(!is_available(
            &pod("b", "n1", "Running", false, 1),
            0,
            at(200)
        ));
    }

    #[test]
    fn a_failed_create_sets_replica_failure_until_a_sync_succeeds() {
        let mut rs: ReplicaSet = serde_json::from_value(json!({
            "metadata": {"name": "web", "namespace": "ns"},
            "spec": {"replicas": 2, "selector": {"matchLabels": {"app": "web"}}}
        }))
        .unwrap_or_default();
        let err = ReplicaSetError::Api {
            key: "ns/web".into(),
            action: "create pods",
            source: kube::Error::Api(
                kube::core::Status::failure("exceeded quota", "Forbidden")
                    .with_code(403)
                    .boxed(),
            ),
        };
        let now = jiff::Timestamp::now();
        let s = calculate_status(&rs, &[], Some(&err), now);
        let c = s.conditions.clone().unwrap_or_default();
        assert_eq!(c.len(), 1);
        assert_eq!(c[0].type_.as_deref(), Some("ReplicaFailure"));
        assert_eq!(c[0].reason.as_deref(), Some("FailedCreate"));
        assert!(c[0]
            .message
            .as_deref()
            .unwrap_or_default()
            .contains("exceeded quota"));
        rs.status = Some(s);
        assert!(calculate_status(&rs, &[], None, now).conditions.is_none());
    }

    #[test]
    fn status_counts_ready_available_and_labeled_pods() {
        let rs: ReplicaSet = serde_json::from_value(json!({
            "metadata": {"name": "web", "generation": 3},
            "spec": {"replicas": 3, "minReadySeconds": 10, "selector": {"matchLabels": {"app": "web"}},
                "template": {"metadata": {"labels": {"app": "web", "tier": "fe"}}}}
        }))
        .unwrap_or_default();
        let mut labeled = (*pod("a", "n1", "Running", true, 100)).clone();
        labeled.metadata.labels = Some(
            [("app", "web"), ("tier", "fe")]
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        );
        let fresh = pod("b", "n1", "Running", true, 1000);
        let unready = pod("c", "n1", "Pending", false, 100);
        let now = jiff::Timestamp::from_second(1006).unwrap_or_default();
        let s = calculate_status(&rs, &[&labeled, &fresh, &unready], None, now);
        assert_eq!(s.replicas, 3);
        assert_eq!(s.fully_labeled_replicas, Some(1));
        assert_eq!(s.ready_replicas, Some(2));
        assert_eq!(s.available_replicas, Some(1));
        assert_eq!(s.observed_generation, Some(3));
        assert!(s.conditions.is_none());
    }
}
