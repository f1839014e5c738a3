//! The Deployment controller: one ReplicaSet per pod template (named `<deployment>-<pod-template-hash>`),
//! rolled with the RollingUpdate or Recreate strategy, with revisions, history cleanup, proportional scaling
//! while rolling, pause, and the `Available`/`Progressing` conditions `kubectl rollout status` reads
//! (Ref: kubernetes `pkg/controller/deployment/{deployment_controller,sync,rolling,recreate,progress}.go` and
//! `pkg/controller/deployment/util/deployment_util.go`).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use futures_util::{future, StreamExt};
use k8s_openapi::api::apps::v1::{
    Deployment, DeploymentCondition, DeploymentStatus, ReplicaSet, ReplicaSetSpec,
};
use k8s_openapi::api::core::v1::{Pod, PodTemplateSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::api::{DeleteParams, Patch, PatchParams, PostParams, Preconditions};
use kube::runtime::controller::Action;
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::{watcher, Controller, WatchStreamExt};
use kube::{Api, Client, ResourceExt};
use serde_json::json;

use super::ownership::{
    claim, controller_of, controller_ref, deleting, is_already_exists, is_not_found, key_of,
    record_event, selector_is_empty, selector_matches, ClaimError, FIELD_MANAGER,
};
use super::{Context, ControllerError, ControllerFuture};

const NAME: &str = "deployment";
/// The event source upstream's Deployment controller reports as.
const COMPONENT: &str = "deployment-controller";

pub(crate) const REVISION: &str = "deployment.kubernetes.io/revision";
const REVISION_HISTORY: &str = "deployment.kubernetes.io/revision-history";
const DESIRED_REPLICAS: &str = "deployment.kubernetes.io/desired-replicas";
const MAX_REPLICAS: &str = "deployment.kubernetes.io/max-replicas";
pub(crate) const POD_TEMPLATE_HASH: &str = "pod-template-hash";
/// Upstream caps the revision-history annotation at this many characters.
const MAX_REV_HISTORY_CHARS: usize = 2000;

// Condition reasons (Ref: deployment util constants).
const NEW_RS_CREATED: &str = "NewReplicaSetCreated";
const FOUND_NEW_RS: &str = "FoundNewReplicaSet";
const RS_UPDATED: &str = "ReplicaSetUpdated";
const NEW_RS_AVAILABLE: &str = "NewReplicaSetAvailable";
const TIMED_OUT: &str = "ProgressDeadlineExceeded";
const PAUSED: &str = "DeploymentPaused";
const RESUMED: &str = "DeploymentResumed";
const FAILED_RS_CREATE: &str = "FailedRSCreate";

/// What failed while syncing one Deployment.
#[derive(Debug, thiserror::Error)]
pub(crate) enum DeploymentError {
    #[error("deployment {key}: cannot {action}: {source}")]
    Api {
        key: String,
        action: String,
        #[source]
        source: kube::Error,
    },
    #[error("deployment {key}: {source}")]
    Claim {
        key: String,
        #[source]
        source: ClaimError,
    },
    #[error("deployment {key}: replica set name {name} is taken by another object; collision count raised")]
    HashCollision { key: String, name: String },
}

struct State {
    client: Client,
    sets: Store<ReplicaSet>,
    pods: Store<Pod>,
}

pub(crate) fn start(ctx: Context) -> ControllerFuture {
    Box::pin(run(ctx.client))
}

async fn run(client: Client) -> Result<(), ControllerError> {
    let (sets, set_writer) = reflector::store::<ReplicaSet>();
    let (pods, pod_writer) = reflector::store::<Pod>();
    let set_events = watcher(
        Api::<ReplicaSet>::all(client.clone()),
        watcher::Config::default(),
    )
    .default_backoff()
    .reflect(set_writer)
    .touched_objects();
    let pod_events = watcher(Api::<Pod>::all(client.clone()), watcher::Config::default())
        .default_backoff()
        .reflect(pod_writer)
        .touched_objects();
    let controller = Controller::new(
        Api::<Deployment>::all(client.clone()),
        watcher::Config::default(),
    );
    let deployments = controller.store();
    let deployments2 = deployments.clone();
    let sets2 = sets.clone();
    let state = Arc::new(State { client, sets, pods });
    tracing::info!(controller = NAME, "starting");
    controller
        .watches_stream(set_events, move |rs: ReplicaSet| {
            set_owners(&deployments, &rs)
        })
        // Recreate waits for the old pods to be gone; their deletions wake it up.
        .watches_stream(pod_events, move |pod: Pod| {
            let ns = pod.namespace().unwrap_or_default();
            controller_of(&pod.metadata)
                .filter(|o| o.kind == "ReplicaSet")
                .and_then(|o| sets2.get(&ObjectRef::new(&o.name).within(&ns)))
                .map(|rs| set_owners(&deployments2, &rs))
                .unwrap_or_default()
        })
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

/// The Deployments a ReplicaSet event concerns: its controller, or those that could adopt it.
fn set_owners(deployments: &Store<Deployment>, rs: &ReplicaSet) -> Vec<ObjectRef<Deployment>> {
    let ns = rs.namespace().unwrap_or_default();
    if let Some(owner) = controller_of(&rs.metadata) {
        if owner.kind == "Deployment" {
            return vec![ObjectRef::new(&owner.name).within(&ns)];
        }
        return Vec::new();
    }
    deployments
        .state()
        .iter()
        .filter(|d| d.namespace().as_deref() == Some(ns.as_str()))
        .filter(|d| {
            !selector_is_empty(&d.spec.selector) && selector_matches(&d.spec.selector, rs.labels())
        })
        .map(|d| ObjectRef::from_obj(&**d))
        .collect()
}

fn error_policy(d: Arc<Deployment>, err: &DeploymentError, _: Arc<State>) -> Action {
    tracing::warn!(controller = NAME, deployment = %key_of(&*d), error = %err, "sync failed; retrying");
    Action::requeue(Duration::from_secs(1))
}

// ---------------------------------------------------------------------------------------------------------
// Pure helpers (Ref: deployment_util.go).

fn replicas_of(rs: &ReplicaSet) -> i32 {
    rs.spec.replicas.unwrap_or(1)
}

fn desired(d: &Deployment) -> i32 {
    d.spec.replicas.unwrap_or(1)
}

pub(crate) fn revision_of(rs: &ReplicaSet) -> i64 {
    rs.annotations()
        .get(REVISION)
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

fn is_rolling(d: &Deployment) -> bool {
    d.spec.strategy.as_ref().and_then(|s| s.type_.as_deref()) != Some("Recreate")
}

/// An int-or-percent scaled against `total` (upstream `GetScaledValueFromIntOrPercent`); `None` when malformed.
pub(crate) fn scaled_value(v: &IntOrString, total: i32, round_up: bool) -> Option<i32> {
    match v {
        IntOrString::Int(i) => Some(*i),
        IntOrString::String(s) => {
            let pct: i64 = s.strip_suffix('%')?.parse().ok()?;
            let num = pct * i64::from(total);
            Some(if round_up {
                (num + 99).div_euclid(100)
            } else {
                num.div_euclid(100)
            } as i32)
        }
    }
}

/// `(maxSurge, maxUnavailable)` for `desired` replicas: surge rounds up, unavailable down, and both zero
/// becomes unavailable 1 so a rollout can proceed (upstream `ResolveFenceposts`).
pub(crate) fn resolve_fenceposts(
    max_surge: Option<&IntOrString>,
    max_unavailable: Option<&IntOrString>,
    desired: i32,
) -> (i32, i32) {
    let quarter = IntOrString::String("25%".into());
    let surge = scaled_value(max_surge.unwrap_or(&quarter), desired, true).unwrap_or(0);
    let unavailable =
        scaled_value(max_unavailable.unwrap_or(&quarter), desired, false).unwrap_or(0);
    if surge == 0 && unavailable == 0 {
        return (0, 1);
    }
    (surge.max(0), unavailable.max(0))
}

fn fenceposts(d: &Deployment) -> (i32, i32) {
    let ru = d
        .spec
        .strategy
        .as_ref()
        .and_then(|s| s.rolling_update.as_ref());
    resolve_fenceposts(
        ru.and_then(|r| r.max_surge.as_ref()),
        ru.and_then(|r| r.max_unavailable.as_ref()),
        desired(d),
    )
}

fn max_surge(d: &Deployment) -> i32 {
    if !is_rolling(d) {
        return 0;
    }
    fenceposts(d).0
}

fn max_unavailable(d: &Deployment) -> i32 {
    if !is_rolling(d) || desired(d) == 0 {
        return 0;
    }
    fenceposts(d).1.min(desired(d))
}

/// How many replicas the new ReplicaSet should have now (upstream `NewRSNewReplicas`): for RollingUpdate as
/// many as the surge allows, for Recreate all.
pub(crate) fn new_rs_new_replicas(d: &Deployment, all: &[&ReplicaSet], new_rs: &ReplicaSet) -> i32 {
    if !is_rolling(d) {
        return desired(d);
    }
    let new_replicas = replicas_of(new_rs);
    let current: i32 = all.iter().map(|r| replicas_of(r)).sum();
    let max_total = desired(d) + max_surge(d);
    if current >= max_total {
        return new_replicas;
    }
    let scale_up = (max_total - current).min(desired(d) - new_replicas);
    new_replicas + scale_up.max(0)
}

/// FNV-1a, 32 bits (what upstream's `ComputeHash` uses).
fn fnv32a(data: &[u8]) -> u32 {
    let mut h: u32 = 0x811c_9dc5;
    for b in data {
        h ^= u32::from(*b);
        h = h.wrapping_mul(0x0100_0193);
    }
    h
}

/// The `pod-template-hash` of a template: FNV-32a of the template (and the collision count), its decimal
/// digits spelled with upstream's `SafeEncodeString` alphabet (no vowels, no look-alikes).
pub(crate) fn compute_hash(template: &PodTemplateSpec, collision_count: Option<i32>) -> String {
    let mut data = serde_json::to_vec(template).unwrap_or_default();
    if let Some(c) = collision_count {
        data.extend_from_slice(&c.to_le_bytes());
    }
    const ALPHANUMS: &[u8] = b"bcdfghjklmnpqrstvwxz2456789";
    fnv32a(&data)
        .to_string()
        .bytes()
        .map(|b| ALPHANUMS[usize::from(b) % ALPHANUMS.len()] as char)
        .collect()
}

fn without_hash(t: &PodTemplateSpec) -> PodTemplateSpec {
    let mut t = t.clone();
    if let Some(l) = t.metadata.as_mut().and_then(|m| m.labels.as_mut()) {
        l.remove(POD_TEMPLATE_HASH);
    }
    if let Some(m) = t.metadata.as_mut() {
        if m.labels.as_ref().is_some_and(BTreeMap::is_empty) {
            m.labels = None;
        }
    }
    t
}

/// Whether two templates are the same apart from the `pod-template-hash` label (upstream `EqualIgnoreHash`).
pub(crate) fn equal_ignore_hash(a: &PodTemplateSpec, b: &PodTemplateSpec) -> bool {
    without_hash(a) == without_hash(b)
}

fn creation(rs: &ReplicaSet) -> Option<jiff::Timestamp> {
    rs.metadata.creation_timestamp.as_ref().map(|t| t.0)
}

/// Oldest first, then by name (upstream `ReplicaSetsByCreationTimestamp`).
fn by_creation(a: &ReplicaSet, b: &ReplicaSet) -> std::cmp::Ordering {
    creation(a)
        .cmp(&creation(b))
        .then_with(|| a.name_any().cmp(&b.name_any()))
}

/// The ReplicaSet whose template is the Deployment's (the oldest such, as upstream `FindNewReplicaSet`).
fn find_new_index(d: &Deployment, sets: &[ReplicaSet]) -> Option<usize> {
    let mut idx: Vec<usize> = (0..sets.len()).collect();
    idx.sort_by(|a, b| by_creation(&sets[*a], &sets[*b]));
    idx.into_iter().find(|i| {
        sets[*i]
            .spec
            .template
            .as_ref()
            .is_some_and(|t| equal_ignore_hash(t, &d.spec.template))
    })
}

/// How much a ReplicaSet grows or shrinks when the Deployment is resized mid-rollout (upstream
/// `getReplicaSetFraction`): in proportion to its share of the size it was last scaled for.
fn replica_set_fraction(rs: &ReplicaSet, d: &Deployment) -> i32 {
    if desired(d) == 0 {
        return -replicas_of(rs);
    }
    let deployment_replicas = desired(d) + max_surge(d);
    let annotated = rs
        .annotations()
        .get(MAX_REPLICAS)
        .and_then(|v| v.parse::<i32>().ok())
        .unwrap_or_else(|| d.status.as_ref().and_then(|s| s.replicas).unwrap_or(0));
    if annotated == 0 {
        return 0;
    }
    let new_size =
        f64::from(replicas_of(rs)) * f64::from(deployment_replicas) / f64::from(annotated);
    new_size.round() as i32 - replicas_of(rs)
}

/// Upstream `GetProportion`.
fn proportion(rs: &ReplicaSet, d: &Deployment, to_add: i32, added: i32) -> i32 {
    if replicas_of(rs) == 0 || to_add == 0 || to_add == added {
        return 0;
    }
    let fraction = replica_set_fraction(rs, d);
    let allowed = to_add - added;
    if to_add > 0 {
        fraction.min(allowed)
    } else {
        fraction.max(allowed)
    }
}

/// New sizes for the active ReplicaSets when a rolling Deployment is resized mid-rollout (upstream `scale`'s
/// proportional branch): each gets its share; leftovers go to the largest (newest on ties when growing, oldest
/// when shrinking).
pub(crate) fn proportional_sizes(d: &Deployment, active: &[&ReplicaSet]) -> Vec<(String, i32)> {
    let total: i32 = active.iter().map(|r| replicas_of(r)).sum();
    let allowed = if desired(d) > 0 {
        desired(d) + max_surge(d)
    } else {
        0
    };
    let to_add = allowed - total;
    let mut sorted: Vec<&ReplicaSet> = active.to_vec();
    sorted.sort_by(|a, b| {
        replicas_of(b).cmp(&replicas_of(a)).then_with(|| {
            if to_add > 0 {
                by_creation(b, a)
            } else {
                by_creation(a, b)
            }
        })
    });
    let mut added = 0;
    let mut sizes: Vec<(String, i32)> = sorted
        .iter()
        .map(|rs| {
            if to_add == 0 {
                return (rs.name_any(), replicas_of(rs));
            }
            let p = proportion(rs, d, to_add, added);
            added += p;
            (rs.name_any(), replicas_of(rs) + p)
        })
        .collect();
    if let Some(first) = sizes.first_mut() {
        if to_add != 0 {
            first.1 = (first.1 + to_add - added).max(0);
        }
    }
    sizes
}

/// Old ReplicaSets beyond `revisionHistoryLimit` that may be deleted: lowest revisions first, only those fully
/// scaled down and settled (upstream `cleanupDeployment`).
pub(crate) fn sets_to_clean_up(old: &[&ReplicaSet], limit: i32) -> Vec<String> {
    let mut alive: Vec<&ReplicaSet> = old
        .iter()
        .copied()
        .filter(|r| !deleting(&r.metadata))
        .collect();
    let diff = alive.len() as i64 - i64::from(limit.max(0));
    if diff <= 0 {
        return Vec::new();
    }
    alive.sort_by(|a, b| {
        revision_of(a)
            .cmp(&revision_of(b))
            .then_with(|| by_creation(a, b))
    });
    alive
        .iter()
        .take(diff as usize)
        .filter(|r| {
            let st = r.status.as_ref();
            st.map(|s| s.replicas).unwrap_or(0) == 0
                && replicas_of(r) == 0
                && r.metadata.generation.unwrap_or(0)
                    <= st.and_then(|s| s.observed_generation).unwrap_or(0)
        })
        .map(|r| r.name_any())
        .collect()
}

fn is_active(rs: &ReplicaSet) -> bool {
    replicas_of(rs) > 0
}

fn status_replicas(rs: &ReplicaSet) -> i32 {
    rs.status.as_ref().map(|s| s.replicas).unwrap_or(0)
}

fn available(rs: &ReplicaSet) -> i32 {
    rs.status
        .as_ref()
        .and_then(|s| s.available_replicas)
        .unwrap_or(0)
}

fn ready(rs: &ReplicaSet) -> i32 {
    rs.status
        .as_ref()
        .and_then(|s| s.ready_replicas)
        .unwrap_or(0)
}

fn condition<'a>(status: &'a DeploymentStatus, type_: &str) -> Option<&'a DeploymentCondition> {
    status
        .conditions
        .iter()
        .flatten()
        .find(|c| c.type_.as_deref() == Some(type_))
}

fn new_condition(type_: &str, status: &str, reason: &str, message: String) -> DeploymentCondition {
    let now = Time(jiff::Timestamp::now());
    DeploymentCondition {
        type_: Some(type_.into()),
        status: Some(status.into()),
        reason: Some(reason.into()),
        message: Some(message),
        last_update_time: Some(now.clone()),
        last_transition_time: Some(now),
    }
}

/// Upstream `SetDeploymentCondition`: same status and reason is no change; same status keeps the transition
/// time.
fn set_condition(status: &mut DeploymentStatus, mut c: DeploymentCondition) {
    if let Some(cur) = condition(status, c.type_.as_deref().unwrap_or_default()) {
        if cur.status == c.status && cur.reason == c.reason {
            return;
        }
        if cur.status == c.status {
            c.last_transition_time = cur.last_transition_time.clone();
        }
    }
    remove_condition(status, c.type_.as_deref().unwrap_or_default());
    status.conditions.get_or_insert_with(Vec::new).push(c);
}

fn remove_condition(status: &mut DeploymentStatus, type_: &str) {
    if let Some(c) = status.conditions.as_mut() {
        c.retain(|x| x.type_.as_deref() != Some(type_));
    }
}

fn has_progress_deadline(d: &Deployment) -> bool {
    d.spec
        .progress_deadline_seconds
        .is_some_and(|s| s != i32::MAX)
}

/// The status the ReplicaSets add up to (upstream `calculateStatus`).
pub(crate) fn calculate_status(
    d: &Deployment,
    all: &[&ReplicaSet],
    new_rs: Option<&ReplicaSet>,
) -> DeploymentStatus {
    let available_replicas: i32 = all.iter().map(|r| available(r)).sum();
    let total: i32 = all.iter().map(|r| replicas_of(r)).sum();
    let mut status = DeploymentStatus {
        observed_generation: d.metadata.generation,
        replicas: Some(all.iter().map(|r| status_replicas(r)).sum()),
        updated_replicas: Some(new_rs.map(status_replicas).unwrap_or(0)),
        ready_replicas: Some(all.iter().map(|r| ready(r)).sum()),
        available_replicas: Some(available_replicas),
        unavailable_replicas: Some((total - available_replicas).max(0)),
        collision_count: d.status.as_ref().and_then(|s| s.collision_count),
        conditions: d.status.as_ref().and_then(|s| s.conditions.clone()),
        terminating_replicas: None,
    };
    if available_replicas >= desired(d) - max_unavailable(d) {
        set_condition(
            &mut status,
            new_condition(
                "Available",
                "True",
                "MinimumReplicasAvailable",
                "Deployment has minimum availability.".into(),
            ),
        );
    } else {
        set_condition(
            &mut status,
            new_condition(
                "Available",
                "False",
                "MinimumReplicasUnavailable",
                "Deployment does not have minimum availability.".into(),
            ),
        );
    }
    status
}

/// Upstream `DeploymentComplete`.
pub(crate) fn deployment_complete(d: &Deployment, s: &DeploymentStatus) -> bool {
    let want = desired(d);
    s.updated_replicas.unwrap_or(0) == want
        && s.replicas.unwrap_or(0) == want
        && s.available_replicas.unwrap_or(0) == want
        && s.observed_generation.unwrap_or(0) >= d.metadata.generation.unwrap_or(0)
}

/// Upstream `DeploymentProgressing`: more updated, fewer old, more ready or more available replicas than the
/// recorded status.
fn deployment_progressing(d: &Deployment, new: &DeploymentStatus) -> bool {
    let old = d.status.clone().unwrap_or_default();
    let old_old = old.replicas.unwrap_or(0) - old.updated_replicas.unwrap_or(0);
    let new_old = new.replicas.unwrap_or(0) - new.updated_replicas.unwrap_or(0);
    new.updated_replicas.unwrap_or(0) > old.updated_replicas.unwrap_or(0)
        || old_old > new_old
        || new.ready_replicas.unwrap_or(0) > old.ready_replicas.unwrap_or(0)
        || new.available_replicas.unwrap_or(0) > old.available_replicas.unwrap_or(0)
}

/// Upstream `DeploymentTimedOut`: no progress for `progressDeadlineSeconds` since the Progressing condition
/// was last updated.
fn deployment_timed_out(d: &Deployment, s: &DeploymentStatus, now: jiff::Timestamp) -> bool {
    if !has_progress_deadline(d) {
        return false;
    }
    let Some(c) = condition(s, "Progressing") else {
        return false;
    };
    match c.reason.as_deref() {
        Some(NEW_RS_AVAILABLE) => return false,
        Some(TIMED_OUT) => return true,
        _ => {}
    }
    let Some(from) = c.last_update_time.as_ref().map(|t| t.0) else {
        return false;
    };
    let deadline = i64::from(d.spec.progress_deadline_seconds.unwrap_or(600));
    from + jiff::SignedDuration::from_secs(deadline) < now
}

fn deployment_annotations_to_copy(d: &Deployment) -> BTreeMap<String, String> {
    d.annotations()
        .iter()
        .filter(|(k, _)| {
            !matches!(
                k.as_str(),
                "kubectl.kubernetes.io/last-applied-configuration"
                    | REVISION
                    | REVISION_HISTORY
                    | DESIRED_REPLICAS
                    | MAX_REPLICAS
                    | "deprecated.deployment.rollback.to"
            )
        })
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect()
}

/// Upstream `SetNewReplicaSetAnnotations`: copies the Deployment's annotations, raises the revision (keeping
/// the old one in `revision-history` when an old template comes back), and for a new set records the sizes.
fn set_new_rs_annotations(
    d: &Deployment,
    rs: &mut ReplicaSet,
    new_revision: i64,
    exists: bool,
) -> bool {
    let mut changed = false;
    let ann = rs.metadata.annotations.get_or_insert_with(BTreeMap::new);
    for (k, v) in deployment_annotations_to_copy(d) {
        if ann.get(&k) != Some(&v) {
            ann.insert(k, v);
            changed = true;
        }
    }
    let old_revision = ann.get(REVISION).cloned();
    let old_int: i64 = old_revision
        .as_deref()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    if old_int < new_revision {
        ann.insert(REVISION.into(), new_revision.to_string());
        changed = true;
        if let Some(old) = old_revision.filter(|o| !o.is_empty()) {
            let history = match ann.get(REVISION_HISTORY).filter(|h| !h.is_empty()) {
                None => old,
                Some(h) => {
                    let mut parts: Vec<&str> = h.split(',').collect();
                    parts.push(&old);
                    while parts.join(",").len() > MAX_REV_HISTORY_CHARS && parts.len() > 1 {
                        parts.remove(0);
                    }
                    parts.join(",")
                }
            };
            ann.insert(REVISION_HISTORY.into(), history);
        }
    }
    if !exists && set_replicas_annotations(rs, desired(d), desired(d) + max_surge(d)) {
        changed = true;
    }
    changed
}

fn set_replicas_annotations(rs: &mut ReplicaSet, desired: i32, max: i32) -> bool {
    let ann = rs.metadata.annotations.get_or_insert_with(BTreeMap::new);
    let (d, m) = (desired.to_string(), max.to_string());
    let changed = ann.get(DESIRED_REPLICAS) != Some(&d) || ann.get(MAX_REPLICAS) != Some(&m);
    ann.insert(DESIRED_REPLICAS.into(), d);
    ann.insert(MAX_REPLICAS.into(), m);
    changed
}

// ---------------------------------------------------------------------------------------------------------
// The sync, one Deployment at a time over a snapshot of its ReplicaSets.

struct Sync<'a> {
    state: &'a State,
    key: String,
    d: Deployment,
    sets: Vec<ReplicaSet>,
    /// Index of the new ReplicaSet in `sets`.
    new: Option<usize>,
    /// The status as read, to tell whether a write is needed.
    read_status: Option<DeploymentStatus>,
}

impl Sync<'_> {
    fn err(&self, action: impl Into<String>, source: kube::Error) -> DeploymentError {
        DeploymentError::Api {
            key: self.key.clone(),
            action: action.into(),
            source,
        }
    }

    fn ns(&self) -> String {
        self.d.namespace().unwrap_or_default()
    }

    fn rs_api(&self) -> Api<ReplicaSet> {
        Api::namespaced(self.state.client.clone(), &self.ns())
    }

    fn d_api(&self) -> Api<Deployment> {
        Api::namespaced(self.state.client.clone(), &self.ns())
    }

    fn new_rs(&self) -> Option<&ReplicaSet> {
        self.new.map(|i| &self.sets[i])
    }

    fn old(&self) -> Vec<&ReplicaSet> {
        self.sets
            .iter()
            .enumerate()
            .filter(|(i, _)| Some(*i) != self.new)
            .map(|(_, r)| r)
            .collect()
    }

    fn all(&self) -> Vec<&ReplicaSet> {
        self.sets.iter().collect()
    }

    fn status_mut(&mut self) -> &mut DeploymentStatus {
        self.d.status.get_or_insert_with(DeploymentStatus::default)
    }

    /// Writes the Deployment's status if it changed since it was read.
    async fn write_status(&mut self) -> Result<(), DeploymentError> {
        if self.d.status == self.read_status {
            return Ok(());
        }
        let mut body = json!({"status": self.d.status});
        for f in ["conditions", "collisionCount"] {
            if body["status"].get(f).is_none() {
                body["status"][f] = serde_json::Value::Null;
            }
        }
        match self
            .d_api()
            .patch_status(
                &self.d.name_any(),
                &PatchParams::apply(FIELD_MANAGER),
                &Patch::Merge(&body),
            )
            .await
        {
            Ok(_) => {
                self.read_status = self.d.status.clone();
                Ok(())
            }
            Err(e) if is_not_found(&e) => Ok(()),
            Err(e) => Err(self.err("update status", e)),
        }
    }

    /// Records the revision on the Deployment (upstream `SetDeploymentRevision`).
    async fn set_revision(&mut self, revision: &str) -> Result<(), DeploymentError> {
        if self.d.annotations().get(REVISION).map(String::as_str) == Some(revision) {
            return Ok(());
        }
        self.d
            .metadata
            .annotations
            .get_or_insert_with(BTreeMap::new)
            .insert(REVISION.into(), revision.into());
        let patch = json!({"metadata": {"annotations": {REVISION: revision}}});
        match self
            .d_api()
            .patch(
                &self.d.name_any(),
                &PatchParams::apply(FIELD_MANAGER),
                &Patch::Merge(&patch),
            )
            .await
        {
            Ok(_) => Ok(()),
            Err(e) if is_not_found(&e) => Ok(()),
            Err(e) => Err(self.err("record the revision", e)),
        }
    }

    async fn replace_rs(&mut self, idx: usize, rs: ReplicaSet) -> Result<(), DeploymentError> {
        let name = rs.name_any();
        match self
            .rs_api()
            .replace(&name, &PostParams::default(), &rs)
            .await
        {
            Ok(updated) => {
                self.sets[idx] = updated;
                Ok(())
            }
            Err(e) => Err(self.err(format!("update replica set {name}"), e)),
        }
    }

    /// Sets a ReplicaSet's size and its desired/max annotations (upstream `scaleReplicaSet`); true if scaled.
    async fn scale_rs(&mut self, idx: usize, size: i32) -> Result<bool, DeploymentError> {
        let mut rs = self.sets[idx].clone();
        let size_changed = replicas_of(&rs) != size;
        let want = desired(&self.d);
        let ann_changed = set_replicas_annotations(&mut rs, want, want + max_surge(&self.d));
        if !size_changed && !ann_changed {
            return Ok(false);
        }
        let from = replicas_of(&rs);
        rs.spec.replicas = Some(size);
        self.replace_rs(idx, rs).await?;
        if size_changed {
            let verb = if size > from { "up" } else { "down" };
            let rs_name = self.sets[idx].name_any();
            tracing::info!(deployment = %self.key, replicaset = %rs_name, from, to = size,
                "scaled {verb} replica set");
            record_event(
                &self.state.client,
                &self.d,
                COMPONENT,
                false,
                "ScalingReplicaSet",
                format!("Scaled {verb} replica set {rs_name} from {from} to {size}"),
            );
        }
        Ok(size_changed)
    }

    fn index_of(&self, name: &str) -> Option<usize> {
        self.sets.iter().position(|r| r.name_any() == name)
    }

    /// Upstream `getNewReplicaSet`: finds (and annotates) or, when asked, creates the new ReplicaSet.
    async fn new_replica_set(&mut self, create: bool) -> Result<(), DeploymentError> {
        self.new = find_new_index(&self.d, &self.sets);
        let max_old_revision = self.old().iter().map(|r| revision_of(r)).max().unwrap_or(0);
        let new_revision = max_old_revision + 1;
        if let Some(i) = self.new {
            let mut rs = self.sets[i].clone();
            let ann_changed = set_new_rs_annotations(&self.d, &mut rs, new_revision, true);
            let min_ready_changed = rs.spec.min_ready_seconds != self.d.spec.min_ready_seconds;
            if ann_changed || min_ready_changed {
                rs.spec.min_ready_seconds = self.d.spec.min_ready_seconds;
                self.replace_rs(i, rs).await?;
            }
            let revision = self.sets[i]
                .annotations()
                .get(REVISION)
                .cloned()
                .unwrap_or_default();
            self.set_revision(&revision).await?;
            if has_progress_deadline(&self.d)
                && condition(self.status_mut(), "Progressing").is_none()
            {
                let msg = format!("Found new replica set \"{}\"", self.sets[i].name_any());
                set_condition(
                    self.status_mut(),
                    new_condition("Progressing", "True", FOUND_NEW_RS, msg),
                );
                self.write_status().await?;
            }
            return Ok(());
        }
        if !create {
            return Ok(());
        }
        let collision = self.d.status.as_ref().and_then(|s| s.collision_count);
        let hash = compute_hash(&self.d.spec.template, collision);
        let mut template = self.d.spec.template.clone();
        template
            .metadata
            .get_or_insert_with(ObjectMeta::default)
            .labels
            .get_or_insert_with(BTreeMap::new)
            .insert(POD_TEMPLATE_HASH.into(), hash.clone());
        let mut selector = self.d.spec.selector.clone();
        selector
            .match_labels
            .get_or_insert_with(BTreeMap::new)
            .insert(POD_TEMPLATE_HASH.into(), hash.clone());
        let name = format!("{}-{hash}", self.d.name_any());
        let mut rs = ReplicaSet {
            metadata: ObjectMeta {
                name: Some(name.clone()),
                namespace: Some(self.ns()),
                owner_references: Some(vec![controller_ref(&self.d)]),
                labels: template.metadata.as_ref().and_then(|m| m.labels.clone()),
                ..ObjectMeta::default()
            },
            spec: ReplicaSetSpec {
                replicas: Some(0),
                min_ready_seconds: self.d.spec.min_ready_seconds,
                selector,
                template: Some(template),
            },
            status: None,
        };
        let all = self.all();
        let size = new_rs_new_replicas(&self.d, &all, &rs);
        rs.spec.replicas = Some(size);
        set_new_rs_annotations(&self.d, &mut rs, new_revision, false);
        let created = match self.rs_api().create(&PostParams::default(), &rs).await {
            Ok(c) => c,
            Err(e) if is_already_exists(&e) => {
                // Ours already (a lagging cache)? Then use it; otherwise the hash collided: bump the count
                // so the next try gets another name (upstream raises `collisionCount`).
                let existing = self
                    .rs_api()
                    .get(&name)
                    .await
                    .map_err(|e| self.err("read the existing replica set", e))?;
                let ours = controller_of(&existing.metadata)
                    .is_some_and(|r| Some(&r.uid) == self.d.metadata.uid.as_ref());
                let same = existing
                    .spec
                    .template
                    .as_ref()
                    .is_some_and(|t| equal_ignore_hash(t, &self.d.spec.template));
                if ours && same {
                    existing
                } else {
                    let c = collision.unwrap_or(0).saturating_add(1);
                    self.status_mut().collision_count = Some(c);
                    self.write_status().await?;
                    return Err(DeploymentError::HashCollision {
                        key: self.key.clone(),
                        name,
                    });
                }
            }
            Err(e) => {
                if has_progress_deadline(&self.d) {
                    let msg = format!("Failed to create new replica set \"{name}\": {e}");
                    set_condition(
                        self.status_mut(),
                        new_condition("Progressing", "False", FAILED_RS_CREATE, msg),
                    );
                    self.write_status().await?;
                }
                return Err(self.err(format!("create replica set {name}"), e));
            }
        };
        tracing::info!(deployment = %self.key, replicaset = %name, replicas = size, revision = new_revision,
            "created new replica set");
        if size > 0 {
            record_event(
                &self.state.client,
                &self.d,
                COMPONENT,
                false,
                "ScalingReplicaSet",
                format!("Scaled up replica set {name} from 0 to {size}"),
            );
        }
        self.sets.push(created);
        self.new = Some(self.sets.len() - 1);
        self.set_revision(&new_revision.to_string()).await?;
        if has_progress_deadline(&self.d) {
            let msg = format!("Created new replica set \"{name}\"");
            set_condition(
                self.status_mut(),
                new_condition("Progressing", "True", NEW_RS_CREATED, msg),
            );
            self.write_status().await?;
        }
        Ok(())
    }

    /// Upstream `scale`: resizes for a changed `spec.replicas` (proportionally while rolling).
    async fn scale(&mut self) -> Result<(), DeploymentError> {
        let want = desired(&self.d);
        // One active (or, with none active, the newest) set takes the whole size.
        let active: Vec<usize> = (0..self.sets.len())
            .filter(|i| is_active(&self.sets[*i]))
            .collect();
        let target = match active.len() {
            0 => self.new.or_else(|| {
                (0..self.sets.len()).max_by(|a, b| by_creation(&self.sets[*a], &self.sets[*b]))
            }),
            1 => Some(active[0]),
            _ => None,
        };
        if let Some(i) = target {
            if replicas_of(&self.sets[i]) != want {
                self.scale_rs(i, want).await?;
            }
            return Ok(());
        }
        // The new set is saturated: every old one goes to zero.
        if let Some(n) = self.new_rs() {
            let saturated = replicas_of(n) == want
                && n.annotations().get(DESIRED_REPLICAS) == Some(&want.to_string())
                && available(n) == want;
            if saturated {
                for i in active {
                    if Some(i) != self.new {
                        self.scale_rs(i, 0).await?;
                    }
                }
                return Ok(());
            }
        }
        if is_rolling(&self.d) {
            let refs: Vec<&ReplicaSet> = active.iter().map(|i| &self.sets[*i]).collect();
            let sizes = proportional_sizes(&self.d, &refs);
            for (name, size) in sizes {
                if let Some(i) = self.index_of(&name) {
                    self.scale_rs(i, size).await?;
                }
            }
        }
        Ok(())
    }

    /// Upstream `isScalingEvent`: an active set was sized for another `spec.replicas`.
    fn is_scaling_event(&self) -> bool {
        let want = desired(&self.d).to_string();
        self.sets.iter().filter(|r| is_active(r)).any(|r| {
            r.annotations()
                .get(DESIRED_REPLICAS)
                .is_some_and(|v| *v != want)
        })
    }

    /// Upstream `sync`: scale, clean up when paused, and report.
    async fn sync(&mut self) -> Result<(), DeploymentError> {
        self.new_replica_set(false).await?;
        self.scale().await?;
        if self.d.spec.paused == Some(true) {
            self.cleanup().await?;
        }
        let status = calculate_status(&self.d, &self.all(), self.new_rs());
        self.d.status = Some(status);
        self.write_status().await
    }

    /// Upstream `checkPausedConditions`.
    async fn check_paused_conditions(&mut self) -> Result<(), DeploymentError> {
        if !has_progress_deadline(&self.d) {
            return Ok(());
        }
        let paused = self.d.spec.paused == Some(true);
        let cond = self
            .d
            .status
            .as_ref()
            .and_then(|s| condition(s, "Progressing"))
            .cloned();
        if cond.as_ref().and_then(|c| c.reason.as_deref()) == Some(TIMED_OUT) {
            return Ok(());
        }
        let paused_cond = cond.as_ref().and_then(|c| c.reason.as_deref()) == Some(PAUSED);
        if paused && !paused_cond {
            set_condition(
                self.status_mut(),
                new_condition(
                    "Progressing",
                    "Unknown",
                    PAUSED,
                    "Deployment is paused".into(),
                ),
            );
        } else if !paused && paused_cond {
            set_condition(
                self.status_mut(),
                new_condition(
                    "Progressing",
                    "Unknown",
                    RESUMED,
                    "Deployment is resumed".into(),
                ),
            );
        } else {
            return Ok(());
        }
        self.write_status().await
    }

    /// Upstream `cleanupDeployment`.
    async fn cleanup(&mut self) -> Result<(), DeploymentError> {
        let Some(limit) = self.d.spec.revision_history_limit else {
            return Ok(());
        };
        let doomed = sets_to_clean_up(&self.old(), limit);
        for name in doomed {
            let uid = self.index_of(&name).and_then(|i| self.sets[i].uid());
            let dp = DeleteParams {
                preconditions: Some(Preconditions {
                    uid,
                    resource_version: None,
                }),
                ..DeleteParams::background()
            };
            match self.rs_api().delete(&name, &dp).await {
                Ok(_) => {
                    tracing::info!(deployment = %self.key, replicaset = %name, "deleted old replica set")
                }
                Err(e) if is_not_found(&e) => {}
                Err(e) => return Err(self.err(format!("delete old replica set {name}"), e)),
            }
        }
        Ok(())
    }

    /// Upstream `reconcileNewReplicaSet`; true if it scaled.
    async fn reconcile_new(&mut self) -> Result<bool, DeploymentError> {
        let Some(i) = self.new else { return Ok(false) };
        let want = desired(&self.d);
        let have = replicas_of(&self.sets[i]);
        if have == want {
            return Ok(false);
        }
        if have > want {
            return self.scale_rs(i, want).await;
        }
        let size = new_rs_new_replicas(&self.d, &self.all(), &self.sets[i]);
        self.scale_rs(i, size).await
    }

    /// Upstream `reconcileOldReplicaSets`: scales old sets down as far as availability allows, unhealthy
    /// replicas first; true if it scaled.
    async fn reconcile_old(&mut self) -> Result<bool, DeploymentError> {
        let old_total: i32 = self.old().iter().map(|r| replicas_of(r)).sum();
        if old_total == 0 {
            return Ok(false);
        }
        let all_total: i32 = self.sets.iter().map(replicas_of).sum();
        let min_available = desired(&self.d) - max_unavailable(&self.d);
        let new_unavailable = self
            .new_rs()
            .map(|n| replicas_of(n) - available(n))
            .unwrap_or(0);
        let max_scaled_down = all_total - min_available - new_unavailable;
        if max_scaled_down <= 0 {
            return Ok(false);
        }
        let mut old_idx: Vec<usize> = (0..self.sets.len())
            .filter(|i| Some(*i) != self.new && is_active(&self.sets[*i]))
            .collect();
        old_idx.sort_by(|a, b| by_creation(&self.sets[*a], &self.sets[*b]));
        // Unhealthy replicas of old sets go first: they cost no availability.
        let mut cleaned = 0;
        for &i in &old_idx {
            if cleaned >= max_scaled_down {
                break;
            }
            let rs = &self.sets[i];
            let unhealthy = replicas_of(rs) - available(rs);
            if replicas_of(rs) == 0 || unhealthy <= 0 {
                continue;
            }
            let down = unhealthy.min(max_scaled_down - cleaned);
            let size = replicas_of(rs) - down;
            self.scale_rs(i, size).await?;
            cleaned += down;
        }
        // Then as many available ones as keep `minAvailable` (upstream
        // `scaleDownOldReplicaSetsForRollingUpdate`).
        let available_total: i32 = self.sets.iter().map(available).sum();
        let mut scaled = 0;
        if available_total > min_available {
            let total_down = available_total - min_available;
            for &i in &old_idx {
                if scaled >= total_down {
                    break;
                }
                let have = replicas_of(&self.sets[i]);
                if have == 0 {
                    continue;
                }
                let down = have.min(total_down - scaled);
                self.scale_rs(i, have - down).await?;
                scaled += down;
            }
        }
        Ok(cleaned + scaled > 0)
    }

    /// Upstream `syncRolloutStatus`: the status with the Progressing condition.
    async fn sync_rollout_status(&mut self) -> Result<Action, DeploymentError> {
        let mut status = calculate_status(&self.d, &self.all(), self.new_rs());
        if !has_progress_deadline(&self.d) {
            remove_condition(&mut status, "Progressing");
        }
        let cur = condition(&status, "Progressing").cloned();
        let complete_already = status.replicas == status.updated_replicas
            && cur.as_ref().and_then(|c| c.reason.as_deref()) == Some(NEW_RS_AVAILABLE);
        let new_name = self.new_rs().map(|r| r.name_any());
        let what = match &new_name {
            Some(n) => format!("ReplicaSet \"{n}\""),
            None => format!("Deployment \"{}\"", self.d.name_any()),
        };
        if has_progress_deadline(&self.d) && !complete_already {
            if deployment_complete(&self.d, &status) {
                set_condition(
                    &mut status,
                    new_condition(
                        "Progressing",
                        "True",
                        NEW_RS_AVAILABLE,
                        format!("{what} has successfully progressed."),
                    ),
                );
            } else if deployment_progressing(&self.d, &status) {
                let mut c = new_condition(
                    "Progressing",
                    "True",
                    RS_UPDATED,
                    format!("{what} is progressing."),
                );
                // Progress refreshes lastUpdateTime even with the same reason; the transition time stays.
                if let Some(cur) = &cur {
                    if cur.status.as_deref() == Some("True") {
                        c.last_transition_time = cur.last_transition_time.clone();
                    }
                    remove_condition(&mut status, "Progressing");
                }
                set_condition(&mut status, c);
            } else if deployment_timed_out(&self.d, &status, jiff::Timestamp::now()) {
                set_condition(
                    &mut status,
                    new_condition(
                        "Progressing",
                        "False",
                        TIMED_OUT,
                        format!("{what} has timed out progressing."),
                    ),
                );
            }
        }
        // Carry the ReplicaSets' failures over (upstream `getReplicaFailures`).
        let failure = self
            .sets
            .iter()
            .filter_map(|r| r.status.as_ref()?.conditions.as_ref())
            .flatten()
            .find(|c| {
                c.type_.as_deref() == Some("ReplicaFailure") && c.status.as_deref() == Some("True")
            })
            .cloned();
        match failure {
            Some(f) => set_condition(
                &mut status,
                new_condition(
                    "ReplicaFailure",
                    "True",
                    f.reason.as_deref().unwrap_or("FailedCreate"),
                    f.message.unwrap_or_default(),
                ),
            ),
            None => remove_condition(&mut status, "ReplicaFailure"),
        }
        if status.conditions.as_ref().is_some_and(Vec::is_empty) {
            status.conditions = None;
        }
        self.d.status = Some(status);
        self.write_status().await?;
        // A rollout that stops making progress times out without any event: look again at the deadline
        // (upstream `requeueStuckDeployment`).
        let st = self.d.status.clone().unwrap_or_default();
        if let Some(c) = condition(&st, "Progressing") {
            let reason = c.reason.as_deref();
            if has_progress_deadline(&self.d)
                && !matches!(reason, Some(NEW_RS_AVAILABLE | TIMED_OUT))
                && !deployment_complete(&self.d, &st)
            {
                if let Some(from) = c.last_update_time.as_ref().map(|t| t.0) {
                    let deadline = from
                        + jiff::SignedDuration::from_secs(i64::from(
                            self.d.spec.progress_deadline_seconds.unwrap_or(600),
                        ));
                    let left = deadline
                        .duration_since(jiff::Timestamp::now())
                        .as_secs()
                        .max(0)
                        + 1;
                    return Ok(Action::requeue(Duration::from_secs(left as u64)));
                }
            }
        }
        Ok(Action::requeue(Duration::from_secs(300)))
    }

    /// Upstream `rolloutRolling`.
    async fn rollout_rolling(&mut self) -> Result<Action, DeploymentError> {
        self.new_replica_set(true).await?;
        // Act only on settled ReplicaSet statuses: a set whose controller has not seen its latest size yet
        // reports availability that is about to change, and scaling old sets on it could drop below
        // minAvailable.
        let settled = self.sets.iter().all(|r| {
            r.metadata.generation.unwrap_or(0)
                <= r.status
                    .as_ref()
                    .and_then(|s| s.observed_generation)
                    .unwrap_or(0)
        });
        if settled {
            if self.reconcile_new().await? {
                return self.sync_rollout_status().await;
            }
            if self.reconcile_old().await? {
                return self.sync_rollout_status().await;
            }
            let current = self.d.status.clone().unwrap_or_default();
            if deployment_complete(&self.d, &current) {
                self.cleanup().await?;
            }
        }
        self.sync_rollout_status().await
    }

    /// Upstream `rolloutRecreate`: everything old down, wait for its pods to go, then the new set up.
    async fn rollout_recreate(&mut self) -> Result<Action, DeploymentError> {
        self.new_replica_set(false).await?;
        let mut scaled_down = false;
        for i in 0..self.sets.len() {
            if Some(i) != self.new && is_active(&self.sets[i]) {
                scaled_down |= self.scale_rs(i, 0).await?;
            }
        }
        if scaled_down {
            return self.sync_rollout_status().await;
        }
        if self.old_pods_running() {
            return self.sync_rollout_status().await;
        }
        if self.new.is_none() {
            self.new_replica_set(true).await?;
        }
        if let Some(i) = self.new {
            let want = desired(&self.d);
            self.scale_rs(i, want).await?;
        }
        let current = self.d.status.clone().unwrap_or_default();
        if deployment_complete(&self.d, &current) {
            self.cleanup().await?;
        }
        self.sync_rollout_status().await
    }

    /// Upstream `oldPodsRunning`: any pod of an old set still there and not finished.
    fn old_pods_running(&self) -> bool {
        if self.old().iter().any(|r| status_replicas(r) > 0) {
            return true;
        }
        let old_uids: Vec<String> = self.old().iter().filter_map(|r| r.uid()).collect();
        let ns = self.ns();
        self.state.pods.state().iter().any(|p| {
            p.namespace().as_deref() == Some(ns.as_str())
                && controller_of(&p.metadata).is_some_and(|o| old_uids.contains(&o.uid))
                && !matches!(
                    p.status.as_ref().and_then(|s| s.phase.as_deref()),
                    Some("Succeeded" | "Failed")
                )
        })
    }
}

async fn reconcile(d: Arc<Deployment>, state: Arc<State>) -> Result<Action, DeploymentError> {
    let key = key_of(&*d);
    let ns = d.namespace().unwrap_or_default();
    let rs_api: Api<ReplicaSet> = Api::namespaced(state.client.clone(), &ns);
    if selector_is_empty(&d.spec.selector) {
        // Upstream refuses to select every pod; it only records that it saw this generation.
        tracing::warn!(deployment = %key, "selecting all pods is not supported; ignoring");
        return Ok(Action::await_change());
    }
    let candidates: Vec<Arc<ReplicaSet>> = state
        .sets
        .state()
        .into_iter()
        .filter(|r| r.namespace().as_deref() == Some(ns.as_str()))
        .collect();
    let sets = claim(&rs_api, &*d, &d.spec.selector, candidates)
        .await
        .map_err(|source| DeploymentError::Claim {
            key: key.clone(),
            source,
        })?;
    let mut sync = Sync {
        state: &state,
        key,
        d: (*d).clone(),
        sets: sets.iter().map(|r| (**r).clone()).collect(),
        new: None,
        read_status: d.status.clone(),
    };
    if deleting(&d.metadata) {
        // Only report (upstream `syncStatusOnly`).
        sync.new_replica_set(false).await?;
        let status = calculate_status(&sync.d, &sync.all(), sync.new_rs());
        sync.d.status = Some(status);
        sync.write_status().await?;
        return Ok(Action::await_change());
    }
    sync.check_paused_conditions().await?;
    if d.spec.paused == Some(true) {
        sync.sync().await?;
        return Ok(Action::requeue(Duration::from_secs(300)));
    }
    sync.new = find_new_index(&sync.d, &sync.sets);
    if sync.is_scaling_event() {
        sync.sync().await?;
        return Ok(Action::requeue(Duration::from_secs(300)));
    }
    if is_rolling(&d) {
        sync.rollout_rolling().await
    } else {
        sync.rollout_recreate().await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn deployment(replicas: i32, surge: &str, unavailable: &str) -> Deployment {
        let v = |s: &str| match s.parse::<i32>() {
            Ok(i) => json!(i),
            Err(_) => json!(s),
        };
        serde_json::from_value(json!({
            "metadata": {"name": "web", "namespace": "ns", "generation": 1},
            "spec": {
                "replicas": replicas,
                "selector": {"matchLabels": {"app": "web"}},
                "strategy": {"type": "RollingUpdate",
                    "rollingUpdate": {"maxSurge": v(surge), "maxUnavailable": v(unavailable)}},
                "template": {"metadata": {"labels": {"app": "web"}}, "spec": {"containers": [{"name": "c", "image": "i"}]}}
            }
        }))
        .unwrap_or_default()
    }

    fn rs(name: &str, replicas: i32, created: i64, annotations: &[(&str, &str)]) -> ReplicaSet {
        serde_json::from_value(json!({
            "metadata": {"name": name, "creationTimestamp": jiff::Timestamp::from_second(created).unwrap_or_default().to_string(),
                "annotations": annotations.iter().map(|(k, v)| (k.to_string(), json!(v))).collect::<serde_json::Map<_, _>>()},
            "spec": {"replicas": replicas, "selector": {"matchLabels": {"app": "web"}}}
        }))
        .unwrap_or_default()
    }

    #[test]
    fn percentages_round_surge_up_and_unavailable_down() {
        assert_eq!(resolve_fenceposts(None, None, 10), (3, 2));
        assert_eq!(resolve_fenceposts(None, None, 4), (1, 1));
        assert_eq!(resolve_fenceposts(None, None, 1), (1, 0));
        let pct = |s: &str| IntOrString::String(s.into());
        assert_eq!(
            resolve_fenceposts(Some(&pct("0%")), Some(&pct("0%")), 10),
            (0, 1)
        );
        assert_eq!(
            resolve_fenceposts(Some(&IntOrString::Int(2)), Some(&IntOrString::Int(0)), 5),
            (2, 0)
        );
        assert_eq!(scaled_value(&pct("33%"), 10, true), Some(4));
        assert_eq!(scaled_value(&pct("33%"), 10, false), Some(3));
        assert_eq!(scaled_value(&pct("x"), 10, false), None);
    }

    #[test]
    fn max_unavailable_never_exceeds_the_replicas() {
        let d = deployment(2, "1", "5");
        assert_eq!(max_unavailable(&d), 2);
        assert_eq!(max_surge(&d), 1);
    }

    #[test]
    fn new_replica_set_grows_only_within_the_surge() {
        let d = deployment(4, "1", "1");
        let old = rs("old", 4, 1, &[]);
        let new = rs("new", 0, 2, &[]);
        assert_eq!(new_rs_new_replicas(&d, &[&old, &new], &new), 1);
        let new = rs("new", 1, 2, &[]);
        assert_eq!(
            new_rs_new_replicas(&d, &[&old, &new], &new),
            1,
            "at max total"
        );
        let old = rs("old", 2, 1, &[]);
        assert_eq!(new_rs_new_replicas(&d, &[&old, &new], &new), 3);
    }

    #[test]
    fn scaling_mid_rollout_is_proportional() {
        // 10 replicas, surge 3: old has 8, new 5 (sized for 13). Scaling to 20 (surge 5 → 25 allowed) adds 12.
        let d = deployment(20, "25%", "25%");
        let ann = [(MAX_REPLICAS, "13"), (DESIRED_REPLICAS, "10")];
        let old = rs("old", 8, 1, &ann);
        let new = rs("new", 5, 2, &ann);
        let sizes: BTreeMap<String, i32> =
            proportional_sizes(&d, &[&old, &new]).into_iter().collect();
        assert_eq!(sizes["old"] + sizes["new"], 25);
        assert_eq!(sizes["old"], 15); // round(8 * 25 / 13) = 15
        assert_eq!(sizes["new"], 10); // round(5 * 25 / 13) = 10
                                      // Scaling down to 5 (surge 2 → 7 allowed) removes 6 in proportion.
        let d = deployment(5, "25%", "25%");
        let sizes: BTreeMap<String, i32> =
            proportional_sizes(&d, &[&old, &new]).into_iter().collect();
        assert_eq!(sizes["old"] + sizes["new"], 7);
        assert_eq!(sizes["old"], 4);
        assert_eq!(sizes["new"], 3);
    }

    #[test]
    fn history_cleanup_deletes_the_oldest_scaled_down_revisions_only() {
        let r1 = rs("r1", 0, 1, &[(REVISION, "1")]);
        let r2 = rs("r2", 0, 2, &[(REVISION, "2")]);
        let r3 = rs("r3", 1, 3, &[(REVISION, "3")]);
        let r4 = rs("r4", 0, 4, &[(REVISION, "4")]);
        assert_eq!(sets_to_clean_up(&[&r4, &r2, &r1, &r3], 1), ["r1", "r2"]);
        assert_eq!(
            sets_to_clean_up(&[&r4, &r2, &r1, &r3], 10),
            Vec::<String>::new()
        );
        assert_eq!(
            sets_to_clean_up(&[&r4, &r2, &r1, &r3], 0),
            ["r1", "r2", "r4"]
        );
    }

    #[test]
    fn template_hash_ignores_its_own_label_and_changes_with_the_template() {
        let d = deployment(1, "1", "1");
        let h = compute_hash(&d.spec.template, None);
        assert!(!h.is_empty() && h.chars().all(|c| c.is_ascii_alphanumeric()));
        assert_ne!(h, compute_hash(&d.spec.template, Some(1)));
        let mut t = d.spec.template.clone();
        t.metadata
            .get_or_insert_with(ObjectMeta::default)
            .labels
            .get_or_insert_with(BTreeMap::new)
            .insert(POD_TEMPLATE_HASH.into(), h.clone());
        assert!(equal_ignore_hash(&t, &d.spec.template));
        let mut other = d.spec.template.clone();
        if let Some(c) = other.spec.as_mut().map(|s| &mut s.containers[0]) {
            c.image = Some("j".into());
        }
        assert!(!equal_ignore_hash(&other, &d.spec.template));
        assert_ne!(h, compute_hash(&other, None));
    }

    #[test]
    fn rolled_back_revision_keeps_its_old_number_in_the_history() {
        let d = deployment(1, "1", "1");
        let mut r = rs("r1", 1, 1, &[(REVISION, "1")]);
        assert!(set_new_rs_annotations(&d, &mut r, 3, true));
        assert_eq!(r.annotations()[REVISION], "3");
        assert_eq!(r.annotations()[REVISION_HISTORY], "1");
        assert!(set_new_rs_annotations(&d, &mut r, 5, true));
        assert_eq!(r.annotations()[REVISION_HISTORY], "1,3");
        assert!(!set_new_rs_annotations(&d, &mut r, 5, true));
    }

    #[test]
    fn status_sums_the_sets_and_reports_availability() {
        let d = deployment(4, "1", "1");
        let mut old = rs("old", 2, 1, &[]);
        old.status = Some(k8s_openapi::api::apps::v1::ReplicaSetStatus {
            replicas: 2,
            ready_replicas: Some(2),
            available_replicas: Some(2),
            ..Default::default()
        });
        let mut new = rs("new", 3, 2, &[]);
        new.status = Some(k8s_openapi::api::apps::v1::ReplicaSetStatus {
            replicas: 3,
            ready_replicas: Some(1),
            available_replicas: Some(1),
            ..Default::default()
        });
        let s = calculate_status(&d, &[&old, &new], Some(&new));
        assert_eq!(s.replicas, Some(5));
        assert_eq!(s.updated_replicas, Some(3));
        assert_eq!(s.available_replicas, Some(3));
        assert_eq!(s.unavailable_replicas, Some(2));
        let avail = condition(&s, "Available").and_then(|c| c.status.clone());
        assert_eq!(avail.as_deref(), Some("True"));
        assert!(!deployment_complete(&d, &s));
    }
}
