//! Node lifecycle: notices nodes that stopped heartbeating, taints them, and evicts their pods (Ref:
//! kube-controller-manager `node-lifecycle-controller` and its NoExecute taint manager).
//!
//! - A heartbeat is a change of the node's Lease (`kube-node-lease/<node>`, `spec.renewTime`) or of its Ready
//!   condition's `lastHeartbeatTime`. As upstream, the controller times heartbeats with its own clock (when it
//!   saw the change), so clock skew between nodes and the control plane does not matter.
//! - Silent past `--node-monitor-grace-period`: every condition becomes `Unknown` (`NodeStatusUnknown`,
//!   "Kubelet stopped posting node status."), the node gets `node.kubernetes.io/unreachable` with NoSchedule and
//!   NoExecute, and its pods are marked not ready (so Services stop sending traffic to them).
//! - Ready=False reported by the kubelet: `node.kubernetes.io/not-ready` NoSchedule + NoExecute.
//! - Ready=True again: those taints are removed (the node is healed).
//! - Pods on a node with NoExecute taints are deleted once the shortest `tolerationSeconds` of the tolerations
//!   they use has passed since the taint appeared (as this controller observed it); an untolerated taint evicts
//!   at once; a toleration without seconds keeps the pod. The API server gives new pods the not-ready and
//!   unreachable tolerations (DefaultTolerationSeconds, 300 s); pods without them are treated as having them
//!   for `--default-unreachable-toleration-seconds`.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Event, Node, Pod, Taint, Toleration};
use kube::api::{DeleteParams, Patch, PatchParams, PostParams};
use kube::{Api, ResourceExt};
use serde_json::json;
use tokio::sync::Notify;
use tokio::time::Instant;

use super::watch::{self, Tasks};
use super::{now_rfc3339, Context, ControllerError, ControllerFuture};
use crate::scheduler::{tolerates, TAINT_NOT_READY, TAINT_UNREACHABLE};

const NAME: &str = "nodelifecycle";
/// Namespace of node heartbeat Leases.
pub(crate) const NODE_LEASE_NAMESPACE: &str = "kube-node-lease";

pub(crate) fn start(ctx: Context) -> ControllerFuture {
    Box::pin(run(ctx))
}

/// When the controller last saw each node's heartbeat change.
#[derive(Debug, Default)]
pub(crate) struct Heartbeats {
    seen: HashMap<String, (String, Instant)>,
}

impl Heartbeats {
    /// Records the node's current heartbeat marker; returns how long it has been unchanged.
    pub(crate) fn observe(&mut self, node: &str, marker: String, now: Instant) -> Duration {
        match self.seen.get_mut(node) {
            Some((m, at)) if *m == marker => now.saturating_duration_since(*at),
            Some(entry) => {
                *entry = (marker, now);
                Duration::ZERO
            }
            None => {
                self.seen.insert(node.to_owned(), (marker, now));
                Duration::ZERO
            }
        }
    }

    pub(crate) fn retain(&mut self, nodes: &HashSet<String>) {
        self.seen.retain(|n, _| nodes.contains(n));
    }
}

/// The not-ready/unreachable taints a node should carry for its (effective) Ready status.
pub(crate) fn condition_taints(ready: Option<&str>) -> Vec<(&'static str, &'static str)> {
    let key = match ready {
        Some("False") => TAINT_NOT_READY,
        Some("Unknown") => TAINT_UNREACHABLE,
        // Ready, or never reported and still within the grace period: no taint from us.
        _ => return vec![],
    };
    vec![(key, "NoSchedule"), (key, "NoExecute")]
}

fn managed(t: &Taint) -> bool {
    (t.key == TAINT_NOT_READY || t.key == TAINT_UNREACHABLE)
        && (t.effect == "NoSchedule" || t.effect == "NoExecute")
}

/// The node's taints with the not-ready/unreachable ones replaced by `want`; `None` when nothing changes.
pub(crate) fn reconcile_taints(
    current: &[Taint],
    want: &[(&'static str, &'static str)],
    now: &str,
) -> Option<Vec<Taint>> {
    let have: Vec<(&str, &str)> = current
        .iter()
        .filter(|t| managed(t))
        .map(|t| (t.key.as_str(), t.effect.as_str()))
        .collect();
    if have.len() == want.len() && want.iter().all(|w| have.contains(w)) {
        return None;
    }
    let mut out: Vec<Taint> = current.iter().filter(|t| !managed(t)).cloned().collect();
    for (key, effect) in want {
        // Keep the original timeAdded of a taint that stays.
        let existing = current
            .iter()
            .find(|t| t.key == *key && t.effect == *effect);
        out.push(existing.cloned().unwrap_or_else(|| Taint {
            key: (*key).into(),
            effect: (*effect).into(),
            value: None,
            time_added: serde_json::from_value(json!(now)).ok(),
        }));
    }
    Some(out)
}

/// How long after the node's NoExecute taints appeared the pod must go: `Some(0)` at once (a taint it does not
/// tolerate), `Some(d)` after the shortest `tolerationSeconds` among the tolerations used, `None` never.
/// Ref: upstream taint manager `getMinTolerationTime`, DefaultTolerationSeconds admission.
pub(crate) fn eviction_delay(pod: &Pod, taints: &[Taint], default: Duration) -> Option<Duration> {
    let mut tolerations: Vec<Toleration> = pod
        .spec
        .as_ref()
        .and_then(|s| s.tolerations.clone())
        .unwrap_or_default();
    for key in [TAINT_NOT_READY, TAINT_UNREACHABLE] {
        if !tolerations
            .iter()
            .any(|t| tolerates(t, key, "", "NoExecute"))
        {
            tolerations.push(Toleration {
                key: Some(key.into()),
                operator: Some("Exists".into()),
                effect: Some("NoExecute".into()),
                toleration_seconds: Some(default.as_secs() as i64),
                value: None,
            });
        }
    }
    let mut min: Option<Duration> = None;
    for taint in taints.iter().filter(|t| t.effect == "NoExecute") {
        let value = taint.value.as_deref().unwrap_or("");
        let used: Vec<&Toleration> = tolerations
            .iter()
            .filter(|t| tolerates(t, &taint.key, value, "NoExecute"))
            .collect();
        if used.is_empty() {
            return Some(Duration::ZERO);
        }
        for t in used {
            if let Some(s) = t.toleration_seconds {
                let d = Duration::from_secs(s.max(0) as u64);
                min = Some(min.map_or(d, |m| m.min(d)));
            }
        }
    }
    min
}

/// Which of a tainted node's pods are due for eviction at `now` (the NoExecute taints were first seen at
/// `since`), and when the next one will be. Terminating pods and pods already evicted are skipped.
pub(crate) fn evictions<'a>(
    pods: &'a [Arc<Pod>],
    taints: &[Taint],
    since: Instant,
    now: Instant,
    default: Duration,
    evicted: &HashSet<String>,
) -> (Vec<&'a Arc<Pod>>, Option<Instant>) {
    let mut due = Vec::new();
    let mut next: Option<Instant> = None;
    for pod in pods {
        let uid = pod.metadata.uid.as_deref().unwrap_or_default();
        if pod.metadata.deletion_timestamp.is_some() || evicted.contains(uid) {
            continue;
        }
        let Some(delay) = eviction_delay(pod, taints, default) else {
            continue;
        };
        let at = since + delay;
        if at <= now {
            due.push(pod);
        } else {
            next = Some(next.map_or(at, |n| n.min(at)));
        }
    }
    (due, next)
}

/// The node's Ready condition status, if reported.
fn ready_status(node: &Node) -> Option<String> {
    node.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .and_then(|cs| cs.iter().find(|c| c.type_ == "Ready"))
        .map(|c| c.status.clone())
}

fn heartbeat_marker(node: &Node, lease: Option<&Lease>) -> String {
    let renew = lease
        .and_then(|l| l.spec.as_ref())
        .and_then(|s| s.renew_time.as_ref())
        .map(|t| t.0.to_string())
        .unwrap_or_default();
    let hb = node
        .status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .and_then(|cs| cs.iter().find(|c| c.type_ == "Ready"))
        .and_then(|c| c.last_heartbeat_time.as_ref())
        .map(|t| t.0.to_string())
        .unwrap_or_default();
    format!("{renew}|{hb}")
}

struct Monitor {
    ctx: Context,
    heartbeats: Heartbeats,
    /// When we first saw NoExecute taints on each node (eviction clocks start here).
    tainted_since: HashMap<String, Instant>,
    /// Pods already deleted by us (uid), so a lagging cache does not delete twice.
    evicted: HashSet<String>,
    /// The node version (resourceVersion) our last successful writes were based on: while the cache still shows
    /// that version, our writes are not visible yet and must not be repeated (no duplicate NodeNotReady events).
    acted_on: HashMap<String, String>,
}

impl Monitor {
    /// Returns whether the status write succeeded.
    async fn mark_unknown(&self, node: &Node, pods: &[Arc<Pod>]) -> bool {
        let name = node.name_any();
        let now = now_rfc3339();
        let mut conditions: Vec<serde_json::Value> = node
            .status
            .as_ref()
            .and_then(|s| s.conditions.as_ref())
            .into_iter()
            .flatten()
            .map(|c| serde_json::to_value(c).unwrap_or_default())
            .collect();
        if !conditions.iter().any(|c| c["type"] == "Ready") {
            conditions.push(json!({"type": "Ready"}));
        }
        for c in &mut conditions {
            if c["status"] != "Unknown" {
                c["lastTransitionTime"] = json!(now);
            }
            c["status"] = json!("Unknown");
            c["reason"] = json!("NodeStatusUnknown");
            c["message"] = json!("Kubelet stopped posting node status.");
        }
        let api: Api<Node> = Api::all(self.ctx.client.clone());
        let patch = json!({"status": {"conditions": conditions}});
        match api
            .patch_status(&name, &PatchParams::default(), &Patch::Merge(&patch))
            .await
        {
            Ok(_) => tracing::info!(node = %name, "node stopped heartbeating: Ready=Unknown"),
            Err(e) => {
                tracing::warn!(node = %name, error = %e, "cannot mark the node Unknown");
                return false;
            }
        }
        self.event(
            node,
            "NodeNotReady",
            &format!("Node {name} status is now: NodeNotReady"),
        )
        .await;
        // Upstream MarkPodsNotReady: endpoints stop routing to pods that cannot be reached.
        for pod in pods {
            let Some(ns) = pod.metadata.namespace.as_deref() else {
                continue;
            };
            let mut conds: Vec<serde_json::Value> = pod
                .status
                .as_ref()
                .and_then(|s| s.conditions.as_ref())
                .into_iter()
                .flatten()
                .map(|c| serde_json::to_value(c).unwrap_or_default())
                .collect();
            let Some(ready) = conds.iter_mut().find(|c| c["type"] == "Ready") else {
                continue;
            };
            if ready["status"] == "False" {
                continue;
            }
            ready["status"] = json!("False");
            ready["lastTransitionTime"] = json!(now);
            let patch = json!({"status": {"conditions": conds}});
            let pods: Api<Pod> = Api::namespaced(self.ctx.client.clone(), ns);
            if let Err(e) = pods
                .patch_status(
                    &pod.name_any(),
                    &PatchParams::default(),
                    &Patch::Merge(&patch),
                )
                .await
            {
                tracing::debug!(pod = %pod.name_any(), error = %e, "cannot mark pod not ready");
            }
        }
        true
    }

    async fn event(&self, node: &Node, reason: &str, message: &str) {
        let name = node.name_any();
        let now = now_rfc3339();
        let ev: Event = match serde_json::from_value(json!({
            "metadata": {"name": format!("{name}.{:x}", uuid::Uuid::new_v4().as_u128() as u64), "namespace": "default"},
            "involvedObject": {"kind": "Node", "name": name, "uid": name, "apiVersion": "v1"},
            "reason": reason, "message": message, "type": "Normal",
            "source": {"component": "node-controller"}, "reportingComponent": "node-controller",
            "firstTimestamp": now, "lastTimestamp": now, "count": 1,
        })) {
            Ok(e) => e,
            Err(_) => return,
        };
        let api: Api<Event> = Api::namespaced(self.ctx.client.clone(), "default");
        if let Err(e) = api.create(&PostParams::default(), &ev).await {
            tracing::debug!(node = %name, error = %e, "cannot record event");
        }
    }

    /// One pass over every node; returns when the next eviction is due, if any.
    async fn pass(
        &mut self,
        nodes: &[Arc<Node>],
        leases: &BTreeMap<String, Arc<Lease>>,
        pods_by_node: &HashMap<String, Vec<Arc<Pod>>>,
    ) -> Option<Instant> {
        let now = Instant::now();
        let grace = self.ctx.config.node_monitor_grace_period;
        let names: HashSet<String> = nodes.iter().map(|n| n.name_any()).collect();
        self.heartbeats.retain(&names);
        self.tainted_since.retain(|n, _| names.contains(n));
        self.acted_on.retain(|n, _| names.contains(n));
        let mut next: Option<Instant> = None;
        let empty = Vec::new();
        for node in nodes {
            let name = node.name_any();
            let pods = pods_by_node.get(&name).unwrap_or(&empty);
            let silent = self.heartbeats.observe(
                &name,
                heartbeat_marker(node, leases.get(&name).map(|l| &**l)),
                now,
            );
            let mut ready = ready_status(node);
            let version = node.metadata.resource_version.clone().unwrap_or_default();
            let written = self.acted_on.get(&name) == Some(&version);
            let mut acted = false;
            if silent > grace {
                if ready.as_deref() != Some("Unknown") && !written {
                    acted |= self.mark_unknown(node, pods).await;
                }
                ready = Some("Unknown".into());
            }
            let current = node
                .spec
                .as_ref()
                .and_then(|s| s.taints.clone())
                .unwrap_or_default();
            let want = condition_taints(ready.as_deref());
            let taints = match reconcile_taints(&current, &want, &now_rfc3339()) {
                Some(new) if written => new,
                Some(new) => {
                    let api: Api<Node> = Api::all(self.ctx.client.clone());
                    let patch = json!({"spec": {"taints": new}});
                    match api
                        .patch(&name, &PatchParams::default(), &Patch::Merge(&patch))
                        .await
                    {
                        Ok(_) => {
                            acted = true;
                            tracing::info!(node = %name, ready = ?ready, "updated node condition taints")
                        }
                        Err(e) => {
                            tracing::warn!(node = %name, error = %e, "cannot update node taints")
                        }
                    }
                    new
                }
                None => current,
            };
            if acted {
                self.acted_on.insert(name.clone(), version);
            }
            if !taints.iter().any(|t| t.effect == "NoExecute") {
                self.tainted_since.remove(&name);
                continue;
            }
            let since = *self.tainted_since.entry(name.clone()).or_insert(now);
            let (due, later) = evictions(
                pods,
                &taints,
                since,
                now,
                self.ctx.config.pod_eviction_timeout,
                &self.evicted,
            );
            if let Some(l) = later {
                next = Some(next.map_or(l, |n| n.min(l)));
            }
            for pod in due {
                let uid = pod.metadata.uid.clone().unwrap_or_default();
                let ns = pod.metadata.namespace.clone().unwrap_or_default();
                let api: Api<Pod> = Api::namespaced(self.ctx.client.clone(), &ns);
                match api.delete(&pod.name_any(), &DeleteParams::default()).await {
                    Ok(_) => {
                        tracing::info!(node = %name, pod = %format!("{ns}/{}", pod.name_any()), "evicted pod from tainted node");
                        self.evicted.insert(uid);
                    }
                    Err(e) if watch::is_status(&e, 404) => {
                        self.evicted.insert(uid);
                    }
                    Err(e) => tracing::warn!(pod = %pod.name_any(), error = %e, "cannot evict pod"),
                }
            }
        }
        next
    }
}

async fn run(ctx: Context) -> Result<(), ControllerError> {
    let wake = Arc::new(Notify::new());
    let (nodes, t1) = watch::cache(Api::<Node>::all(ctx.client.clone()), wake.clone());
    let (leases, t2) = watch::cache(
        Api::<Lease>::namespaced(ctx.client.clone(), NODE_LEASE_NAMESPACE),
        wake.clone(),
    );
    let (pods, t3) = watch::cache(Api::<Pod>::all(ctx.client.clone()), wake.clone());
    let _tasks = Tasks(vec![t1, t2, t3]);
    watch::ready(NAME, &nodes).await?;
    watch::ready(NAME, &leases).await?;
    watch::ready(NAME, &pods).await?;
    let period = ctx.config.node_monitor_period;
    let mut monitor = Monitor {
        ctx,
        heartbeats: Heartbeats::default(),
        tainted_since: HashMap::new(),
        evicted: HashSet::new(),
        acted_on: HashMap::new(),
    };
    loop {
        let lease_map: BTreeMap<String, Arc<Lease>> = leases
            .state()
            .into_iter()
            .map(|l| (l.name_any(), l))
            .collect();
        let mut by_node: HashMap<String, Vec<Arc<Pod>>> = HashMap::new();
        let live: HashSet<String> = pods
            .state()
            .iter()
            .filter_map(|p| p.metadata.uid.clone())
            .collect();
        monitor.evicted.retain(|u| live.contains(u));
        for p in pods.state() {
            if let Some(n) = p
                .spec
                .as_ref()
                .and_then(|s| s.node_name.clone())
                .filter(|n| !n.is_empty())
            {
                by_node.entry(n).or_default().push(p);
            }
        }
        let next = monitor.pass(&nodes.state(), &lease_map, &by_node).await;
        let deadline = next.map_or(Instant::now() + period, |n| n.min(Instant::now() + period));
        tokio::select! {
            _ = tokio::time::sleep_until(deadline) => {}
            _ = wake.notified() => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(tolerations: serde_json::Value) -> Pod {
        serde_json::from_value(json!({"metadata": {"name": "p"}, "spec": {"containers": [], "tolerations": tolerations}}))
            .expect("pod")
    }

    fn taint(key: &str, effect: &str) -> Taint {
        Taint {
            key: key.into(),
            effect: effect.into(),
            value: None,
            time_added: None,
        }
    }

    const DEFAULT: Duration = Duration::from_secs(300);

    #[test]
    fn pods_without_tolerations_get_the_default_eviction_timeout() {
        let t = [
            taint(TAINT_UNREACHABLE, "NoExecute"),
            taint(TAINT_UNREACHABLE, "NoSchedule"),
        ];
        assert_eq!(eviction_delay(&pod(json!([])), &t, DEFAULT), Some(DEFAULT));
    }

    #[test]
    fn toleration_seconds_untolerated_taints_and_forever_tolerations_decide_eviction() {
        let t = [taint(TAINT_UNREACHABLE, "NoExecute")];
        let short = pod(
            json!([{"key": TAINT_UNREACHABLE, "operator": "Exists", "effect": "NoExecute", "tolerationSeconds": 5}]),
        );
        assert_eq!(
            eviction_delay(&short, &t, DEFAULT),
            Some(Duration::from_secs(5))
        );
        let forever = pod(json!([{"operator": "Exists"}]));
        assert_eq!(eviction_delay(&forever, &t, DEFAULT), None);
        let custom = [
            taint(TAINT_UNREACHABLE, "NoExecute"),
            taint("dedicated", "NoExecute"),
        ];
        assert_eq!(
            eviction_delay(&short, &custom, DEFAULT),
            Some(Duration::ZERO)
        );
    }

    #[test]
    fn taints_follow_the_ready_condition_and_keep_foreign_ones() {
        let foreign = taint("dedicated", "NoSchedule");
        let now = "2026-01-01T00:00:00Z";
        let add = reconcile_taints(
            std::slice::from_ref(&foreign),
            &condition_taints(Some("Unknown")),
            now,
        )
        .expect("change");
        let keys: Vec<(&str, &str)> = add
            .iter()
            .map(|t| (t.key.as_str(), t.effect.as_str()))
            .collect();
        assert_eq!(
            keys,
            [
                ("dedicated", "NoSchedule"),
                (TAINT_UNREACHABLE, "NoSchedule"),
                (TAINT_UNREACHABLE, "NoExecute")
            ]
        );
        assert!(reconcile_taints(&add, &condition_taints(Some("Unknown")), now).is_none());
        let healed = reconcile_taints(&add, &condition_taints(Some("True")), now).expect("heal");
        assert_eq!(healed.len(), 1);
        assert_eq!(healed[0].key, "dedicated");
    }

    #[test]
    fn pods_are_evicted_when_their_shortest_toleration_runs_out() {
        let mk = |name: &str, tolerations: serde_json::Value| -> Arc<Pod> {
            Arc::new(
                serde_json::from_value(json!({"metadata": {"name": name, "uid": name},
                    "spec": {"containers": [], "tolerations": tolerations}}))
                .expect("pod"),
            )
        };
        let pods = [
            mk(
                "quick",
                json!([{"key": TAINT_UNREACHABLE, "operator": "Exists", "effect": "NoExecute", "tolerationSeconds": 2}]),
            ),
            mk("default", json!([])),
            mk("forever", json!([{"operator": "Exists"}])),
            mk("gone", json!([])),
        ];
        let taints = [taint(TAINT_UNREACHABLE, "NoExecute")];
        let t0 = Instant::now();
        let evicted = HashSet::from(["gone".to_owned()]);
        let names = |v: Vec<&Arc<Pod>>| v.iter().map(|p| p.name_any()).collect::<Vec<_>>();
        let d = Duration::from_secs(10);
        let (due, next) = evictions(&pods, &taints, t0, t0 + Duration::from_secs(1), d, &evicted);
        assert!(due.is_empty());
        assert_eq!(next, Some(t0 + Duration::from_secs(2)));
        let (due, next) = evictions(&pods, &taints, t0, t0 + Duration::from_secs(2), d, &evicted);
        assert_eq!(names(due), ["quick"]);
        assert_eq!(next, Some(t0 + d));
        let (due, next) = evictions(&pods, &taints, t0, t0 + d, d, &evicted);
        assert_eq!(
            names(due),
            ["quick", "default"],
            "never 'forever', never twice 'gone'"
        );
        assert_eq!(next, None);
    }

    #[test]
    fn a_node_is_silent_only_while_its_heartbeat_does_not_change() {
        // Explicit instants stand in for the controller's clock.
        let t0 = Instant::now();
        let mut hb = Heartbeats::default();
        assert_eq!(hb.observe("n", "t1".into(), t0), Duration::ZERO);
        let t39 = t0 + Duration::from_secs(39);
        assert_eq!(hb.observe("n", "t1".into(), t39), Duration::from_secs(39));
        let t41 = t0 + Duration::from_secs(41);
        assert!(hb.observe("n", "t1".into(), t41) > Duration::from_secs(40));
        assert_eq!(
            hb.observe("n", "t2".into(), t41),
            Duration::ZERO,
            "renewed: healthy again"
        );
        hb.retain(&HashSet::new());
        assert_eq!(
            hb.observe("n", "t2".into(), t41 + Duration::from_secs(100)),
            Duration::ZERO,
            "forgotten nodes start over"
        );
    }
}
