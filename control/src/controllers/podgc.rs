//! Pod garbage collection: deletes the pods nothing else will ever finish (Ref: kube-controller-manager
//! `pod-garbage-collector`, `pkg/controller/podgc/gc_controller.go`).
//!
//! - **Orphaned:** pods bound to a node that no longer exists. A node must be missing for the quarantine
//!   (`--pod-gc-orphan-quarantine`, 40 s as upstream's `quarantineTime`, so a pod seen before its node is not
//!   mistaken) and a live read must confirm it is gone. Its pods are then marked `Failed` with a
//!   `DisruptionTarget` condition (reason `DeletionByPodGC`), unless already finished, and deleted at once.
//!   Deployments and ReplicaSets then replace them.
//! - **Unscheduled and terminating:** pods being deleted that were never bound to a node. No kubelet will confirm
//!   their end, so they are deleted at once.
//! - **Terminated:** past `--terminated-pod-gc-threshold` (12500; 0 disables) Succeeded or Failed pods, the
//!   oldest are deleted.
//!
//! Deletions carry the pod's uid as a precondition, so a pod re-created under the same name is left alone.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::{Node, Pod};
use kube::api::{DeleteParams, Patch, PatchParams, Preconditions};
use kube::{Api, ResourceExt};
use serde_json::json;
use tokio::sync::Notify;
use tokio::time::Instant;

use super::watch::{self, is_status, Tasks};
use super::{now_rfc3339, Context, ControllerError, ControllerFuture};

const NAME: &str = "podgc";
/// How often the collector looks even without a change (upstream's `gcCheckPeriod`).
const CHECK_PERIOD: Duration = Duration::from_secs(20);

pub(crate) fn start(ctx: Context) -> ControllerFuture {
    Box::pin(run(ctx))
}

fn node_of(pod: &Pod) -> Option<&str> {
    pod.spec
        .as_ref()
        .and_then(|s| s.node_name.as_deref())
        .filter(|n| !n.is_empty())
}

fn terminated(pod: &Pod) -> bool {
    matches!(
        pod.status.as_ref().and_then(|s| s.phase.as_deref()),
        Some("Succeeded" | "Failed")
    )
}

/// Nodes the pods are bound to that are not in `nodes`, with when each was first seen missing (kept from
/// `missing`, else `now`). Nodes that came back or no pod names any more are dropped.
pub(crate) fn missing_nodes(
    pods: &[Arc<Pod>],
    nodes: &HashSet<String>,
    missing: &HashMap<String, Instant>,
    now: Instant,
) -> HashMap<String, Instant> {
    pods.iter()
        .filter_map(|p| node_of(p))
        .filter(|n| !nodes.contains(*n))
        .map(|n| (n.to_string(), missing.get(n).copied().unwrap_or(now)))
        .collect()
}

/// Pods being deleted that were never bound to a node.
pub(crate) fn unscheduled_terminating(pods: &[Arc<Pod>]) -> Vec<Arc<Pod>> {
    pods.iter()
        .filter(|p| p.metadata.deletion_timestamp.is_some() && node_of(p).is_none())
        .cloned()
        .collect()
}

/// The oldest terminated pods beyond `threshold` (0: none; upstream disables the check then).
pub(crate) fn terminated_over(pods: &[Arc<Pod>], threshold: usize) -> Vec<Arc<Pod>> {
    if threshold == 0 {
        return Vec::new();
    }
    let mut done: Vec<Arc<Pod>> = pods.iter().filter(|p| terminated(p)).cloned().collect();
    if done.len() <= threshold {
        return Vec::new();
    }
    // Oldest first; pods without a timestamp count as oldest, and names break ties so runs agree.
    done.sort_by(|a, b| {
        let at = |p: &Pod| p.metadata.creation_timestamp.as_ref().map(|t| t.0);
        at(a)
            .cmp(&at(b))
            .then_with(|| a.name_any().cmp(&b.name_any()))
    });
    let excess = done.len() - threshold;
    done.truncate(excess);
    done
}

struct Collector {
    ctx: Context,
    /// Nodes pods are bound to that the cache does not have, since when.
    missing: HashMap<String, Instant>,
    /// Pods already deleted by us (uid), so a lagging cache does not delete twice.
    deleted: HashSet<String>,
}

impl Collector {
    async fn delete(&mut self, pod: &Pod, why: &str) -> Result<(), ControllerError> {
        let Some(uid) = pod.metadata.uid.clone() else {
            return Ok(());
        };
        if self.deleted.contains(&uid) {
            return Ok(());
        }
        let ns = pod.namespace().unwrap_or_default();
        let api: Api<Pod> = Api::namespaced(self.ctx.client.clone(), &ns);
        let params = DeleteParams {
            grace_period_seconds: Some(0),
            preconditions: Some(Preconditions {
                uid: Some(uid.clone()),
                resource_version: None,
            }),
            ..DeleteParams::background()
        };
        match api.delete(&pod.name_any(), &params).await {
            Ok(_) => {
                tracing::info!(pod = %format!("{ns}/{}", pod.name_any()), reason = why, "garbage-collected pod");
                self.deleted.insert(uid);
                Ok(())
            }
            // Gone already, or replaced by a pod of the same name: nothing of ours to delete.
            Err(e) if is_status(&e, 404) || is_status(&e, 409) => Ok(()),
            Err(source) => Err(ControllerError::Api {
                controller: NAME,
                source,
            }),
        }
    }

    /// Marks a pod of a deleted node Failed with upstream's DisruptionTarget condition, so its owners and
    /// `kubectl describe` see why it ended.
    async fn mark_failed(&self, pod: &Pod) -> Result<(), ControllerError> {
        if terminated(pod) {
            return Ok(());
        }
        let ns = pod.namespace().unwrap_or_default();
        let api: Api<Pod> = Api::namespaced(self.ctx.client.clone(), &ns);
        let mut conditions: Vec<serde_json::Value> = pod
            .status
            .as_ref()
            .and_then(|s| s.conditions.as_ref())
            .map(|cs| {
                cs.iter()
                    .filter(|c| c.type_ != "DisruptionTarget")
                    .filter_map(|c| serde_json::to_value(c).ok())
                    .collect()
            })
            .unwrap_or_default();
        conditions.push(json!({
            "type": "DisruptionTarget",
            "status": "True",
            "reason": "DeletionByPodGC",
            "message": "PodGC: node no longer exists",
            "lastTransitionTime": now_rfc3339(),
        }));
        let patch = json!({"status": {"phase": "Failed", "conditions": conditions}});
        match api
            .patch_status(
                &pod.name_any(),
                &PatchParams::default(),
                &Patch::Merge(&patch),
            )
            .await
        {
            Ok(_) => Ok(()),
            Err(e) if is_status(&e, 404) => Ok(()),
            Err(source) => Err(ControllerError::Api {
                controller: NAME,
                source,
            }),
        }
    }

    /// Whether the node is really gone: the cache may lag, so a live read decides.
    async fn node_gone(&self, node: &str) -> Result<bool, ControllerError> {
        let api: Api<Node> = Api::all(self.ctx.client.clone());
        match api.get_opt(node).await {
            Ok(found) => Ok(found.is_none()),
            Err(source) => Err(ControllerError::Api {
                controller: NAME,
                source,
            }),
        }
    }

    /// One pass; returns when the next orphan quarantine ends, if one is running.
    async fn pass(
        &mut self,
        pods: &[Arc<Pod>],
        nodes: &HashSet<String>,
    ) -> Result<Option<Instant>, ControllerError> {
        let live: HashSet<&str> = pods
            .iter()
            .filter_map(|p| p.metadata.uid.as_deref())
            .collect();
        self.deleted.retain(|u| live.contains(u.as_str()));

        let now = Instant::now();
        let quarantine = self.ctx.config.pod_gc_orphan_quarantine;
        self.missing = missing_nodes(pods, nodes, &self.missing, now);
        let mut next = None::<Instant>;
        let due: Vec<String> = self
            .missing
            .iter()
            .filter_map(|(node, since)| {
                let ends = *since + quarantine;
                if ends <= now {
                    Some(node.clone())
                } else {
                    next = Some(next.map_or(ends, |n| n.min(ends)));
                    None
                }
            })
            .collect();
        for node in due {
            if !self.node_gone(&node).await? {
                // The cache lags behind a node that exists: start over once it shows up.
                self.missing.remove(&node);
                continue;
            }
            for pod in pods.iter().filter(|p| node_of(p) == Some(node.as_str())) {
                self.mark_failed(pod).await?;
                self.delete(pod, "OrphanedPod").await?;
            }
        }
        for pod in unscheduled_terminating(pods) {
            self.delete(&pod, "UnscheduledTerminating").await?;
        }
        // Pods deleted already (an orphan marked Failed a moment ago, whose deletion the cache has not seen yet)
        // are gone: counting them would delete a pod below the threshold.
        let remaining: Vec<Arc<Pod>> = pods
            .iter()
            .filter(|p| {
                !p.metadata
                    .uid
                    .as_ref()
                    .is_some_and(|u| self.deleted.contains(u))
            })
            .cloned()
            .collect();
        for pod in terminated_over(&remaining, self.ctx.config.terminated_pod_gc_threshold) {
            self.delete(&pod, "TerminatedPodThreshold").await?;
        }
        Ok(next)
    }
}

async fn run(ctx: Context) -> Result<(), ControllerError> {
    let wake = Arc::new(Notify::new());
    let (nodes, t1) = watch::cache(Api::<Node>::all(ctx.client.clone()), wake.clone());
    let (pods, t2) = watch::cache(Api::<Pod>::all(ctx.client.clone()), wake.clone());
    let _tasks = Tasks(vec![t1, t2]);
    watch::ready(NAME, &nodes).await?;
    watch::ready(NAME, &pods).await?;
    let mut collector = Collector {
        ctx,
        missing: HashMap::new(),
        deleted: HashSet::new(),
    };
    loop {
        let node_names: HashSet<String> = nodes.state().iter().map(|n| n.name_any()).collect();
        let next = collector.pass(&pods.state(), &node_names).await?;
        let periodic = Instant::now() + CHECK_PERIOD;
        let deadline = next.map_or(periodic, |n| n.min(periodic));
        tokio::select! {
            _ = tokio::time::sleep_until(deadline) => {}
            _ = wake.notified() => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(name: &str, node: Option<&str>, phase: Option<&str>, created: &str) -> Arc<Pod> {
        Arc::new(
            serde_json::from_value(json!({
                "metadata": {"name": name, "namespace": "ns", "uid": format!("uid-{name}"),
                    "creationTimestamp": created},
                "spec": {"nodeName": node, "containers": []},
                "status": {"phase": phase},
            }))
            .expect("pod"),
        )
    }

    #[test]
    fn a_missing_node_keeps_the_time_it_was_first_missed_until_it_returns() {
        let t0 = Instant::now();
        let pods = vec![
            pod("a", Some("gone"), Some("Running"), "2026-01-01T00:00:00Z"),
            pod("b", Some("here"), Some("Running"), "2026-01-01T00:00:00Z"),
            pod("c", None, Some("Pending"), "2026-01-01T00:00:00Z"),
        ];
        let nodes: HashSet<String> = ["here".to_string()].into();
        let first = missing_nodes(&pods, &nodes, &HashMap::new(), t0);
        assert_eq!(first, HashMap::from([("gone".to_string(), t0)]));
        let later = missing_nodes(&pods, &nodes, &first, t0 + Duration::from_secs(30));
        assert_eq!(later["gone"], t0, "the quarantine clock does not restart");
        let nodes: HashSet<String> = ["here".to_string(), "gone".to_string()].into();
        assert!(
            missing_nodes(&pods, &nodes, &later, t0).is_empty(),
            "the node is back"
        );
    }

    #[test]
    fn only_unbound_pods_being_deleted_are_unscheduled_terminating() {
        let mut deleting = (*pod("d", None, Some("Pending"), "2026-01-01T00:00:00Z")).clone();
        deleting.metadata.deletion_timestamp = deleting.metadata.creation_timestamp.clone();
        let mut bound = (*pod("e", Some("n1"), Some("Running"), "2026-01-01T00:00:00Z")).clone();
        bound.metadata.deletion_timestamp = bound.metadata.creation_timestamp.clone();
        let pods = vec![
            Arc::new(deleting),
            Arc::new(bound),
            pod("f", None, Some("Pending"), "2026-01-01T00:00:00Z"),
        ];
        let names: Vec<String> = unscheduled_terminating(&pods)
            .iter()
            .map(|p| p.name_any())
            .collect();
        assert_eq!(names, ["d"]);
    }

    #[test]
    fn the_oldest_terminated_pods_past_the_threshold_are_chosen() {
        let pods = vec![
            pod("new", Some("n"), Some("Succeeded"), "2026-01-03T00:00:00Z"),
            pod("old", Some("n"), Some("Failed"), "2026-01-01T00:00:00Z"),
            pod(
                "running",
                Some("n"),
                Some("Running"),
                "2025-01-01T00:00:00Z",
            ),
            pod("mid", Some("n"), Some("Succeeded"), "2026-01-02T00:00:00Z"),
        ];
        let names = |v: Vec<Arc<Pod>>| v.iter().map(|p| p.name_any()).collect::<Vec<_>>();
        assert_eq!(names(terminated_over(&pods, 1)), ["old", "mid"]);
        assert_eq!(names(terminated_over(&pods, 3)), Vec::<String>::new());
        assert_eq!(
            names(terminated_over(&pods, 0)),
            Vec::<String>::new(),
            "0 disables"
        );
    }
}
