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
use kube::api::PostParams;
use kube::runtime::watcher::{self, Event};
use kube::runtime::WatchStreamExt;
use kube::{Api, ResourceExt};
use serde_json::json;

use super::{schedule_one, Cache, ClusterApi, CycleOutcome, Scheduler, SchedulingQueue};

/// Our `spec.schedulerName`.
pub const SCHEDULER_NAME: &str = "default-scheduler";

/// Why the scheduler loop stopped.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("the {0} watch ended")]
    WatchEnded(&'static str),
}

/// [`ClusterApi`] over the API server.
pub struct ApiCluster {
    client: kube::Client,
}

impl ApiCluster {
    pub fn new(client: kube::Client) -> Self {
        Self { client }
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
        let now = now_rfc3339();
        let ev = json!({
            "apiVersion": "v1", "kind": "Event",
            "metadata": {"name": format!("{name}.{:016x}", uuid::Uuid::new_v4().as_u128() as u64), "namespace": ns},
            "involvedObject": {"apiVersion": "v1", "kind": "Pod", "namespace": ns, "name": name,
                "uid": pod.metadata.uid.clone().unwrap_or_default(),
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
        let api: Api<CoreEvent> = Api::namespaced(self.client.clone(), &ns);
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

    /// One scheduling cycle; remembers a successful binding until the watch confirms it.
    pub(crate) async fn cycle(&mut self, api: &dyn ClusterApi, now: StdInstant) -> CycleOutcome {
        let out = schedule_one(
            api,
            &mut self.scheduler,
            &mut self.cache,
            &mut self.queue,
            &self.pending,
            now,
        )
        .await;
        if let CycleOutcome::Bound { pod, .. } = &out {
            if let Some(p) = self.pending.remove(pod) {
                self.assumed
                    .insert(pod.clone(), p.metadata.uid.unwrap_or_default());
                self.placed.insert(pod.clone());
            }
        }
        out
    }
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

/// Runs the scheduler against the API server until a watch ends (they retry on errors, so normally never).
pub async fn run(client: kube::Client) -> Result<(), RunError> {
    let api = ApiCluster::new(client.clone());
    let nodes = watcher::watcher(Api::<Node>::all(client.clone()), watcher::Config::default())
        .default_backoff()
        .map(|e| Watched::Node(Box::new(e)));
    let pods = watcher::watcher(Api::<Pod>::all(client), watcher::Config::default())
        .default_backoff()
        .map(|e| Watched::Pod(Box::new(e)));
    let mut events = std::pin::pin!(futures_util::stream::select(nodes, pods));
    let mut state = State::default();
    tracing::info!("scheduler started");
    loop {
        // Take in everything already delivered before deciding, so a burst of pods is queued in one go.
        let mut first = true;
        loop {
            let next = if first && !state.synced() {
                Some(events.next().await)
            } else {
                events.next().now_or_never()
            };
            first = false;
            let Some(item) = next else { break };
            match item {
                None => return Err(RunError::WatchEnded("node/pod")),
                Some(w) => state.on_watched(w),
            }
        }
        if !state.synced() {
            continue;
        }
        match state.cycle(&api, StdInstant::now()).await {
            CycleOutcome::Idle => {}
            CycleOutcome::Bound { pod, node } => {
                tracing::debug!(%pod, %node, "bound");
                continue;
            }
            CycleOutcome::Failed { .. } => continue,
        }
        // Nothing ready: sleep until the next event or the next backoff expiry.
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
            item = events.next() => {
                match item {
                    None => return Err(RunError::WatchEnded("node/pod")),
                    Some(w) => state.on_watched(w),
                }
            }
            _ = timer => {}
        }
    }
}
