//! One scheduling cycle over the API boundary: pop a pod from the queue, pick a node, assume it in the cache,
//! bind, and record the event. `runner` feeds [`Cache`] and [`SchedulingQueue`] from the API server's watches and
//! implements [`ClusterApi`] over `pods/binding` and `events`; unit tests use a fake.

use std::collections::HashMap;
use std::time::Instant;

use k8s_openapi::api::core::v1::Pod;

use super::{Cache, PodRequest, ScheduleError, Scheduler, SchedulingQueue};

/// What the scheduler needs from the API server.
#[async_trait::async_trait]
pub trait ClusterApi: Send + Sync {
    /// `POST /api/v1/namespaces/{namespace}/pods/{name}/binding` with target `node`.
    async fn bind(&self, namespace: &str, name: &str, node: &str) -> Result<(), String>;
    /// Records an event about the pod (`Normal`/`Warning`, reason, message), as upstream's event recorder.
    async fn event(&self, pod: &Pod, type_: &str, reason: &str, message: &str);
}

/// What a cycle did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CycleOutcome {
    /// Nothing was ready in the queue.
    Idle,
    Bound {
        pod: String,
        node: String,
    },
    /// Parked for retry; the message is the FailedScheduling event's.
    Failed {
        pod: String,
        message: String,
    },
}

/// Runs one cycle. `pending` holds the unscheduled pods by `namespace/name` (the watch keeps it current).
pub async fn schedule_one(
    api: &dyn ClusterApi,
    scheduler: &mut Scheduler,
    cache: &mut Cache,
    queue: &mut SchedulingQueue,
    pending: &HashMap<String, Pod>,
    now: Instant,
) -> CycleOutcome {
    let Some(key) = queue.pop(now) else {
        return CycleOutcome::Idle;
    };
    let Some(pod) = pending.get(&key) else {
        // Deleted or bound meanwhile.
        queue.forget(&key);
        return CycleOutcome::Idle;
    };
    let fail = |queue: &mut SchedulingQueue, message: String| {
        queue.failed(&key, now);
        CycleOutcome::Failed {
            pod: key.clone(),
            message,
        }
    };
    let req = match PodRequest::from_pod(pod) {
        Ok(r) => r,
        Err(e) => {
            let message = e.to_string();
            api.event(pod, "Warning", "FailedScheduling", &message)
                .await;
            return fail(queue, message);
        }
    };
    let placement = match scheduler.schedule(cache, &req) {
        Ok(p) => p,
        Err(e @ (ScheduleError::NoNodes | ScheduleError::Unfit(_))) => {
            let message = e.to_string();
            tracing::info!(pod = %key, %message, "pod is unschedulable");
            api.event(pod, "Warning", "FailedScheduling", &message)
                .await;
            return fail(queue, message);
        }
    };
    // Assume first so the next cycle sees the capacity, undo if the binding fails (upstream ForgetPod).
    cache.assume(&req, &placement.node);
    let (namespace, name) = key.split_once('/').unwrap_or(("default", key.as_str()));
    match api.bind(namespace, name, &placement.node).await {
        Ok(()) => {
            let message = format!("Successfully assigned {key} to {}", placement.node);
            api.event(pod, "Normal", "Scheduled", &message).await;
            queue.forget(&key);
            CycleOutcome::Bound {
                pod: key,
                node: placement.node,
            }
        }
        Err(e) => {
            cache.remove_pod(&key);
            let message = format!("Binding rejected: {e}");
            api.event(pod, "Warning", "FailedScheduling", &message)
                .await;
            fail(queue, message)
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;
    use std::time::Duration;

    use k8s_openapi::api::core::v1::Node;
    use serde_json::json;

    use super::*;

    #[derive(Default)]
    struct FakeApi {
        reject_binds: bool,
        binds: Mutex<Vec<(String, String, String)>>,
        events: Mutex<Vec<(String, String, String)>>,
    }

    #[async_trait::async_trait]
    impl ClusterApi for FakeApi {
        async fn bind(&self, namespace: &str, name: &str, node: &str) -> Result<(), String> {
            if self.reject_binds {
                return Err("pod already assigned".into());
            }
            self.binds.lock().map_err(|e| e.to_string())?.push((
                namespace.into(),
                name.into(),
                node.into(),
            ));
            Ok(())
        }
        async fn event(&self, _pod: &Pod, type_: &str, reason: &str, message: &str) {
            if let Ok(mut ev) = self.events.lock() {
                ev.push((type_.into(), reason.into(), message.into()));
            }
        }
    }

    fn node(name: &str, cpu: &str) -> Node {
        serde_json::from_value(json!({"metadata": {"name": name}, "status": {
            "allocatable": {"cpu": cpu, "memory": "4Gi", "pods": "10"},
            "conditions": [{"type": "Ready", "status": "True"}]}}))
        .expect("node fixture")
    }

    fn pending(cpu: &str) -> HashMap<String, Pod> {
        let p: Pod = serde_json::from_value(
            json!({"metadata": {"name": "web", "namespace": "ns"}, "spec": {
            "containers": [{"name": "c", "resources": {"requests": {"cpu": cpu}}}]}}),
        )
        .expect("pod fixture");
        HashMap::from([("ns/web".to_owned(), p)])
    }

    #[tokio::test]
    async fn a_fitting_pod_is_bound_assumed_and_reported_scheduled() {
        let api = FakeApi::default();
        let (mut s, mut cache, mut q) = (
            Scheduler::with_seed(1),
            Cache::new(),
            SchedulingQueue::new(),
        );
        cache.upsert_node(&node("n1", "2")).expect("node");
        let now = Instant::now();
        q.add("ns/web", now);
        let out = schedule_one(&api, &mut s, &mut cache, &mut q, &pending("1"), now).await;
        assert_eq!(
            out,
            CycleOutcome::Bound {
                pod: "ns/web".into(),
                node: "n1".into()
            }
        );
        assert_eq!(cache.pod_count(), 1);
        let events = api.events.lock().expect("events").clone();
        assert_eq!(
            events,
            [(
                "Normal".into(),
                "Scheduled".into(),
                "Successfully assigned ns/web to n1".into()
            )]
        );
    }

    #[tokio::test]
    async fn an_unfit_pod_gets_failed_scheduling_and_is_retried_after_a_node_arrives() {
        let api = FakeApi::default();
        let (mut s, mut cache, mut q) = (
            Scheduler::with_seed(1),
            Cache::new(),
            SchedulingQueue::new(),
        );
        cache.upsert_node(&node("small", "1")).expect("node");
        let t0 = Instant::now();
        q.add("ns/web", t0);
        let pods = pending("2");
        let out = schedule_one(&api, &mut s, &mut cache, &mut q, &pods, t0).await;
        let msg = "0/1 nodes are available: 1 Insufficient cpu.";
        assert_eq!(
            out,
            CycleOutcome::Failed {
                pod: "ns/web".into(),
                message: msg.into()
            }
        );
        assert_eq!(
            schedule_one(&api, &mut s, &mut cache, &mut q, &pods, t0).await,
            CycleOutcome::Idle
        );
        cache.upsert_node(&node("big", "4")).expect("node");
        q.cluster_changed(t0);
        let later = t0 + Duration::from_secs(1);
        let out = schedule_one(&api, &mut s, &mut cache, &mut q, &pods, later).await;
        assert_eq!(
            out,
            CycleOutcome::Bound {
                pod: "ns/web".into(),
                node: "big".into()
            }
        );
        let reasons: Vec<String> = api
            .events
            .lock()
            .expect("events")
            .iter()
            .map(|e| e.1.clone())
            .collect();
        assert_eq!(reasons, ["FailedScheduling", "Scheduled"]);
    }

    #[tokio::test]
    async fn a_rejected_binding_releases_the_assumed_capacity() {
        let api = FakeApi {
            reject_binds: true,
            ..FakeApi::default()
        };
        let (mut s, mut cache, mut q) = (
            Scheduler::with_seed(1),
            Cache::new(),
            SchedulingQueue::new(),
        );
        cache.upsert_node(&node("n1", "2")).expect("node");
        let now = Instant::now();
        q.add("ns/web", now);
        let out = schedule_one(&api, &mut s, &mut cache, &mut q, &pending("1"), now).await;
        assert!(matches!(out, CycleOutcome::Failed { .. }), "{out:?}");
        assert_eq!(cache.pod_count(), 0);
    }
}
