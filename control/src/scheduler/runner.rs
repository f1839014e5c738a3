//! The scheduler's I/O: kube-runtime watchers of nodes and pods feed the [`Cache`] and [`SchedulingQueue`], and
//! [`ApiCluster`] implements [`ClusterApi`] with `pods/binding` and core/v1 Events, as kube-scheduler's informers
//! and binder do.
//!
//! - Unscheduled pods of ours (`spec.schedulerName` empty or `default-scheduler`, not terminating, not finished)
//!   wait in the queue; bound pods are placed in the cache (finished ones release their resources).
//! - A pod we bound is remembered until the watch shows its `nodeName`, so a stale update of it is not
//!   scheduled twice (upstream skips assumed pods the same way).
//! - Any node change or pod removal retries parked pods after their backoff (`cluster_changed`).
//! - Nothing is scheduled until both watches have listed once, so existing placements are counted first.

use std::collections::{HashMap, HashSet};
use std::time::Instant as StdInstant;

use futures_util::{FutureExt, StreamExt};
use k8s_openapi::api::core::v1::{Event as CoreEvent, Node, Pod};
use kube::api::{Patch, PatchParams, PostParams};
use kube::runtime::watcher::{self, Event};
use kube::runtime::WatchStreamExt;
use kube::{Api, ResourceExt};
use serde_json::json;

use super::{Cache, ClusterApi, PodRequest, Scheduler, SchedulingQueue};

/// Our `spec.schedulerName`.
pub const SCHEDULER_NAME: &str = "default-scheduler";

/// Why the scheduler loop stopped.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("the {0} watch ended")]
    WatchEnded(&'static str),
}

/// Events remembered for aggregation before the map is cleared (bounds memory).
const MAX_REMEMBERED_EVENTS: usize = 10_000;

/// (pod uid, reason, message).
type EventKey = (String, String, String);

/// [`ClusterApi`] over the API server.
pub struct ApiCluster {
    client: kube::Client,
    /// Events already recorded, by (pod uid, reason, message): name and count, so a repeat (a pod failing again
    /// for the same reason) bumps `count`/`lastTimestamp` instead of adding an object, as client-go's
    /// EventCorrelator does.
    recorded: std::sync::Mutex<HashMap<EventKey, (String, i32)>>,
}

impl ApiCluster {
    pub fn new(client: kube::Client) -> Self {
        Self {
            client,
            recorded: std::sync::Mutex::new(HashMap::new()),
        }
    }
}

fn now_rfc3339() -> String {
    jiff::Timestamp::now()
        .round(jiff::Unit::Second)
        .unwrap_or(jiff::Timestamp::now())
        .to_string()
}

#[async_trait::async_trait]
impl ClusterApi for ApiCluster {
    async fn bind(&self, namespace: &str, name: &str, node: &str) -> Result<(), String> {
        let api: Api<Pod> = Api::namespaced(self.client.clone(), namespace);
        let binding = json!({"apiVersion": "v1", "kind": "Binding",
            "metadata": {"name": name, "namespace": namespace},
            "target": {"apiVersion": "v1", "kind": "Node", "name": node}});
        api.create_subresource::<_, serde_json::Value>(
            "binding",
            name,
            &PostParams::default(),
            &binding,
        )
        .await
        .map(|_| ())
        .map_err(|e| match e {
            kube::Error::Api(s) => s.message.clone(),
            e => e.to_string(),
        })
    }

    /// Recorded in the background: a slow event write must not hold up scheduling (upstream's recorder is
    /// asynchronous too).
    async fn event(&self, pod: &Pod, type_: &str, reason: &str, message: &str) {
        let ns = pod.namespace().unwrap_or_else(|| "default".into());
        let name = pod.name_any();
        let uid = pod.metadata.uid.clone().unwrap_or_default();
        let now = now_rfc3339();
        let api: Api<CoreEvent> = Api::namespaced(self.client.clone(), &ns);
        let (event_name, count) = {
            let mut seen = self.recorded.lock().unwrap_or_else(|p| p.into_inner());
            if seen.len() >= MAX_REMEMBERED_EVENTS {
                seen.clear();
            }
            let entry = seen
                .entry((uid.clone(), reason.to_owned(), message.to_owned()))
                .or_insert_with(|| {
                    (
                        format!("{name}.{:016x}", uuid::Uuid::new_v4().as_u128() as u64),
                        0,
                    )
                });
            entry.1 += 1;
            entry.clone()
        };
        if count > 1 {
            let patch = json!({"count": count, "lastTimestamp": now});
            tokio::spawn(async move {
                if let Err(e) = api
                    .patch(&event_name, &PatchParams::default(), &Patch::Merge(&patch))
                    .await
                {
                    tracing::debug!(error = %e, "cannot update scheduler event");
                }
            });
            return;
        }
        let ev = json!({
            "apiVersion": "v1", "kind": "Event",
            "metadata": {"name": event_name, "namespace": ns},
            "involvedObject": {"apiVersion": "v1", "kind": "Pod", "namespace": ns, "name": name, "uid": uid,
                "resourceVersion": pod.metadata.resource_version.clone().unwrap_or_default()},
            "reason": reason, "message": message, "type": type_,
            "source": {"component": SCHEDULER_NAME}, "reportingComponent": SCHEDULER_NAME,
            "reportingInstance": SCHEDULER_NAME,
            "action": if reason == "Scheduled" { "Binding" } else { "Scheduling" },
            "firstTimestamp": now, "lastTimestamp": now, "count": 1,
        });
        let Ok(ev) = serde_json::from_value::<CoreEvent>(ev) else {
            return;
        };
        tokio::spawn(async move {
            if let Err(e) = api.create(&PostParams::default(), &ev).await {
                tracing::debug!(error = %e, "cannot record scheduler event");
            }
        });
    }
}

fn key_of(pod: &Pod) -> String {
    format!("{}/{}", pod.namespace().unwrap_or_default(), pod.name_any())
}

fn is_ours(pod: &Pod) -> bool {
    pod.spec
        .as_ref()
        .and_then(|s| s.scheduler_name.as_deref())
        .is_none_or(|n| n.is_empty() || n == SCHEDULER_NAME)
}

fn is_finished(pod: &Pod) -> bool {
    matches!(
        pod.status.as_ref().and_then(|s| s.phase.as_deref()),
        Some("Succeeded" | "Failed")
    )
}

/// The loop's state: everything the watches told us, and what we bound ourselves.
#[derive(Default)]
pub(crate) struct State {
    pub(crate) scheduler: Scheduler,
    pub(crate) cache: Cache,
    pub(crate) queue: SchedulingQueue,
    pub(crate) pending: HashMap<String, Pod>,
    /// Pods we bound whose binding the watch has not shown yet, with their uid.
    assumed: HashMap<String, String>,
    placed: HashSet<String>,
    nodes: HashSet<String>,
    relist_pods: Option<HashSet<String>>,
    relist_nodes: Option<HashSet<String>>,
    pods_synced: bool,
    nodes_synced: bool,
}

impl State {
    fn remove_pod(&mut self, key: &str, now: StdInstant) {
        self.pending.remove(key);
        self.queue.forget(key);
        self.assumed.remove(key);
        if self.placed.remove(key) {
            self.cache.remove_pod(key);
            self.queue.cluster_changed(now);
        }
    }

    pub(crate) fn apply_pod(&mut self, pod: Pod, now: StdInstant) {
        let key = key_of(&pod);
        if let Some(seen) = self.relist_pods.as_mut() {
            seen.insert(key.clone());
        }
        let uid = pod.metadata.uid.clone().unwrap_or_default();
        let node = pod
            .spec
            .as_ref()
            .and_then(|s| s.node_name.as_deref())
            .filter(|n| !n.is_empty());
        if node.is_some() {
            self.pending.remove(&key);
            self.queue.forget(&key);
            self.assumed.remove(&key);
            if is_finished(&pod) {
                // Finished pods hold no resources (upstream counts only non-terminal pods).
                if self.placed.remove(&key) {
                    self.cache.remove_pod(&key);
                    self.queue.cluster_changed(now);
                }
                return;
            }
            match self.cache.add_pod(&pod) {
                Ok(()) => {
                    self.placed.insert(key);
                }
                Err(e) => tracing::warn!(pod = %key, error = %e, "cannot account for placed pod"),
            }
            return;
        }
        if self.assumed.get(&key).is_some_and(|u| *u == uid) {
            return;
        }
        // Unscheduled (a recreated pod of the same name replaces whatever we knew).
        if self.placed.contains(&key) || self.assumed.contains_key(&key) {
            self.remove_pod(&key, now);
        }
        if is_ours(&pod) && pod.metadata.deletion_timestamp.is_none() && !is_finished(&pod) {
            self.pending.insert(key.clone(), pod);
            self.queue.add(&key, now);
        } else {
            self.pending.remove(&key);
            self.queue.forget(&key);
        }
    }

    fn apply_node(&mut self, node: &Node, now: StdInstant) {
        let name = node.name_any();
        if let Some(seen) = self.relist_nodes.as_mut() {
            seen.insert(name.clone());
        }
        match self.cache.upsert_node(node) {
            Ok(()) => {
                self.nodes.insert(name);
            }
            Err(e) => tracing::warn!(node = %name, error = %e, "cannot use node"),
        }
        self.queue.cluster_changed(now);
    }

    pub(crate) fn on_pod_event(&mut self, ev: Event<Pod>, now: StdInstant) {
        match ev {
            Event::Apply(p) | Event::InitApply(p) => self.apply_pod(p, now),
            Event::Delete(p) => self.remove_pod(&key_of(&p), now),
            Event::Init => self.relist_pods = Some(HashSet::new()),
            Event::InitDone => {
                // Whatever the relist did not show is gone.
                if let Some(seen) = self.relist_pods.take() {
                    let gone: Vec<String> = self
                        .pending
                        .keys()
                        .chain(self.placed.iter())
                        .filter(|k| !seen.contains(*k))
                        .cloned()
                        .collect();
                    for k in gone {
                        self.remove_pod(&k, now);
                    }
                }
                self.pods_synced = true;
            }
        }
    }

    pub(crate) fn on_node_event(&mut self, ev: Event<Node>, now: StdInstant) {
        match ev {
            Event::Apply(n) | Event::InitApply(n) => self.apply_node(&n, now),
            Event::Delete(n) => {
                let name = n.name_any();
                self.cache.remove_node(&name);
                self.nodes.remove(&name);
            }
            Event::Init => self.relist_nodes = Some(HashSet::new()),
            Event::InitDone => {
                if let Some(seen) = self.relist_nodes.take() {
                    let gone: Vec<String> = self
                        .nodes
                        .iter()
                        .filter(|n| !seen.contains(*n))
                        .cloned()
                        .collect();
                    for n in gone {
                        self.cache.remove_node(&n);
                        self.nodes.remove(&n);
                    }
                }
                self.nodes_synced = true;
            }
        }
    }

    pub(crate) fn synced(&self) -> bool {
        self.pods_synced && self.nodes_synced
    }

    /// One scheduling cycle with the binding left to the caller (upstream's binding cycle runs in its own
    /// goroutine, so the next pod is scheduled while the API write is in flight). On success the pod is assumed
    /// in the cache and returned with its node; the caller binds, then calls [`State::bound`].
    pub(crate) async fn schedule_next(&mut self, api: &dyn ClusterApi, now: StdInstant) -> Next {
        let Some(key) = self.queue.pop(now) else {
            return Next::Idle;
        };
        let Some(pod) = self.pending.get(&key) else {
            self.queue.forget(&key);
            return Next::Again;
        };
        let result = PodRequest::from_pod(pod)
            .map_err(|e| e.to_string())
            .and_then(|req| {
                self.scheduler
                    .schedule(&self.cache, &req)
                    .map(|p| (req, p))
                    .map_err(|e| e.to_string())
            });
        match result {
            Ok((req, placement)) => {
                self.cache.assume(&req, &placement.node);
                let pod = self.pending.remove(&key).unwrap_or_default();
                self.assumed
                    .insert(key.clone(), pod.metadata.uid.clone().unwrap_or_default());
                self.placed.insert(key.clone());
                Next::Bind {
                    key,
                    node: placement.node,
                    pod: Box::new(pod),
                }
            }
            Err(message) => {
                tracing::info!(pod = %key, %message, "pod is unschedulable");
                api.event(pod, "Warning", "FailedScheduling", &message)
                    .await;
                self.queue.failed(&key, now);
                Next::Again
            }
        }
    }

    /// The outcome of a binding started by [`State::schedule_next`]. A rejected binding releases the assumed
    /// capacity and parks the pod for retry (upstream `ForgetPod` + requeue), unless the watch has meanwhile
    /// shown the pod bound or gone.
    pub(crate) async fn bound(
        &mut self,
        api: &dyn ClusterApi,
        key: String,
        node: &str,
        pod: Pod,
        result: Result<(), String>,
        now: StdInstant,
    ) {
        match result {
            Ok(()) => {
                let message = format!("Successfully assigned {key} to {node}");
                api.event(&pod, "Normal", "Scheduled", &message).await;
            }
            Err(e) => {
                let message = format!("Binding rejected: {e}");
                tracing::info!(pod = %key, %message, "binding failed");
                api.event(&pod, "Warning", "FailedScheduling", &message)
                    .await;
                if self.assumed.remove(&key).is_some() {
                    self.placed.remove(&key);
                    self.cache.remove_pod(&key);
                    self.pending.insert(key.clone(), pod);
                    self.queue.failed(&key, now);
                }
            }
        }
    }
}

/// What [`State::schedule_next`] did.
pub(crate) enum Next {
    /// Nothing is ready in the queue.
    Idle,
    /// A pod was handled (failed, or gone meanwhile): look again.
    Again,
    /// Bind `pod` to `node`.
    Bind {
        key: String,
        node: String,
        pod: Box<Pod>,
    },
}

enum Watched {
    Node(Box<Result<Event<Node>, watcher::Error>>),
    Pod(Box<Result<Event<Pod>, watcher::Error>>),
}

impl State {
    fn on_watched(&mut self, item: Watched) {
        let now = StdInstant::now();
        match item {
            Watched::Node(ev) => match *ev {
                Ok(ev) => self.on_node_event(ev, now),
                Err(e) => tracing::debug!(error = %e, "scheduler node watch error; retrying"),
            },
            Watched::Pod(ev) => match *ev {
                Ok(ev) => self.on_pod_event(ev, now),
                Err(e) => tracing::debug!(error = %e, "scheduler pod watch error; retrying"),
            },
        }
    }
}

/// Bindings in flight at once: enough to keep the API server's cores busy while the next pods are scheduled.
const MAX_BINDS_IN_FLIGHT: usize = 32;

type BindResult = (String, String, Box<Pod>, Result<(), String>);

/// Runs the scheduler against the API server until a watch ends (they retry on errors, so normally never).
pub async fn run(client: kube::Client) -> Result<(), RunError> {
    let api = std::sync::Arc::new(ApiCluster::new(client.clone()));
    let nodes = watcher::watcher(Api::<Node>::all(client.clone()), watcher::Config::default())
        .default_backoff()
        .map(|e| Watched::Node(Box::new(e)));
    let pods = watcher::watcher(Api::<Pod>::all(client), watcher::Config::default())
        .default_backoff()
        .map(|e| Watched::Pod(Box::new(e)));
    let mut events = std::pin::pin!(futures_util::stream::select(nodes, pods));
    let mut binds: tokio::task::JoinSet<BindResult> = tokio::task::JoinSet::new();
    let mut state = State::default();
    tracing::info!("scheduler started");
    loop {
        // Take in everything already delivered before deciding, so a burst of pods is queued in one go.
        while let Some(item) = events.next().now_or_never() {
            match item {
                None => return Err(RunError::WatchEnded("node/pod")),
                Some(w) => state.on_watched(w),
            }
        }
        while let Some(done) = binds.try_join_next() {
            if let Ok((key, node, pod, result)) = done {
                state
                    .bound(&*api, key, &node, *pod, result, StdInstant::now())
                    .await;
            }
        }
        let mut idle = true;
        if state.synced() && binds.len() < MAX_BINDS_IN_FLIGHT {
            match state.schedule_next(&*api, StdInstant::now()).await {
                Next::Idle => {}
                Next::Again => idle = false,
                Next::Bind { key, node, pod } => {
                    idle = false;
                    let api = api.clone();
                    binds.spawn(async move {
                        let (ns, name) = key.split_once('/').unwrap_or(("default", key.as_str()));
                        let result = api.bind(ns, name, &node).await;
                        (key, node, pod, result)
                    });
                }
            }
        }
        if !idle {
            continue;
        }
        // Nothing to do now: sleep until the next event, a finished binding, or the next backoff expiry.
        let wake = state
            .queue
            .next_wakeup()
            .map(tokio::time::Instant::from_std);
        let timer = async {
            match wake {
                Some(at) => tokio::time::sleep_until(at).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            item = events.next() => match item {
                None => return Err(RunError::WatchEnded("node/pod")),
                Some(w) => state.on_watched(w),
            },
            Some(done) = binds.join_next(), if !binds.is_empty() => {
                if let Ok((key, node, pod, result)) = done {
                    state.bound(&*api, key, &node, *pod, result, StdInstant::now()).await;
                }
            }
            _ = timer => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::*;

    #[derive(Default)]
    struct Events(Mutex<Vec<(String, String)>>);

    #[async_trait::async_trait]
    impl ClusterApi for Events {
        async fn bind(&self, _: &str, _: &str, _: &str) -> Result<(), String> {
            Ok(())
        }
        async fn event(&self, _pod: &Pod, _type: &str, reason: &str, message: &str) {
            if let Ok(mut e) = self.0.lock() {
                e.push((reason.into(), message.into()));
            }
        }
    }

    fn node(name: &str) -> Node {
        serde_json::from_value(json!({"metadata": {"name": name}, "status": {
            "allocatable": {"cpu": "1", "memory": "1Gi", "pods": "10"},
            "conditions": [{"type": "Ready", "status": "True"}]}}))
        .expect("node")
    }

    fn pod(name: &str, node: Option<&str>) -> Pod {
        serde_json::from_value(json!({"metadata": {"name": name, "namespace": "ns", "uid": name},
            "spec": {"nodeName": node, "containers": [{"name": "c", "resources": {"requests": {"cpu": "600m"}}}]}}))
        .expect("pod")
    }

    fn synced() -> State {
        let mut s = State::default();
        let now = StdInstant::now();
        s.on_node_event(Event::InitDone, now);
        s.on_pod_event(Event::InitDone, now);
        s.on_node_event(Event::Apply(node("n1")), now);
        s
    }

    #[tokio::test]
    async fn a_stale_unscheduled_update_of_a_pod_being_bound_is_not_scheduled_again() {
        let api = Events::default();
        let mut s = synced();
        let now = StdInstant::now();
        s.on_pod_event(Event::Apply(pod("a", None)), now);
        let Next::Bind { key, node, .. } = s.schedule_next(&api, now).await else {
            panic!("expected a binding");
        };
        assert_eq!((key.as_str(), node.as_str()), ("ns/a", "n1"));
        // The watch delivers an older, still unscheduled version of the pod: ignored.
        s.on_pod_event(Event::Apply(pod("a", None)), now);
        assert!(matches!(s.schedule_next(&api, now).await, Next::Idle));
        // A second pod does not fit next to the assumed one.
        s.on_pod_event(Event::Apply(pod("b", None)), now);
        assert!(matches!(s.schedule_next(&api, now).await, Next::Again));
        let msgs = api.0.lock().expect("events").clone();
        assert_eq!(
            msgs,
            [(
                "FailedScheduling".to_owned(),
                "0/1 nodes are available: 1 Insufficient cpu.".to_owned()
            )]
        );
    }

    #[tokio::test]
    async fn a_rejected_binding_frees_the_node_and_requeues_the_pod() {
        let api = Events::default();
        let mut s = synced();
        let now = StdInstant::now();
        s.on_pod_event(Event::Apply(pod("a", None)), now);
        let Next::Bind { key, node, pod } = s.schedule_next(&api, now).await else {
            panic!("expected a binding");
        };
        s.bound(&api, key, &node, *pod, Err("etcd unavailable".into()), now)
            .await;
        assert_eq!(s.cache.pod_count(), 0);
        assert!(s.pending.contains_key("ns/a"));
        // Parked until the cluster changes and the backoff passes.
        s.queue.cluster_changed(now);
        let later = now + std::time::Duration::from_secs(2);
        assert!(matches!(
            s.schedule_next(&api, later).await,
            Next::Bind { .. }
        ));
    }

    #[test]
    fn pods_bound_elsewhere_count_and_finished_or_deleted_ones_free_their_node() {
        let mut s = synced();
        let now = StdInstant::now();
        s.on_pod_event(Event::Apply(pod("x", Some("n1"))), now);
        assert_eq!(s.cache.pod_count(), 1);
        let mut done = pod("x", Some("n1"));
        done.status = serde_json::from_value(json!({"phase": "Succeeded"})).ok();
        s.on_pod_event(Event::Apply(done), now);
        assert_eq!(s.cache.pod_count(), 0);
        s.on_pod_event(Event::Apply(pod("y", Some("n1"))), now);
        s.on_pod_event(Event::Delete(pod("y", Some("n1"))), now);
        assert_eq!(s.cache.pod_count(), 0);
        // A relist that no longer shows a pod removes it.
        s.on_pod_event(Event::Apply(pod("z", Some("n1"))), now);
        s.on_pod_event(Event::Init, now);
        s.on_pod_event(Event::InitDone, now);
        assert_eq!(s.cache.pod_count(), 0);
    }
}
