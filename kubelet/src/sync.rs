//! What one pod sync must do: compare the desired pod with what the runtime reports and decide which sandbox and
//! containers to create, start or kill.
//!
//! Ref: upstream `pkg/kubelet/kuberuntime/kuberuntime_manager.go` (`computePodActions`, `podSandboxChanged`,
//! `findNextInitContainerToRun`, `isInitContainerFailed`). Pure: the pod worker feeds it the runtime's view and
//! the probe results and carries out the result (with [`crate::restart::BackOff`] deciding whether a start must
//! wait, shown as `CrashLoopBackOff`).

use std::collections::{BTreeMap, HashMap};

use k8s_openapi::api::core::v1::{Container, Pod};
use sha2::{Digest, Sha256};

use crate::probes::ProbeStatus;
use crate::restart::should_container_be_restarted;
use crate::status::{latest, RuntimeContainer, RuntimeState};

/// A pod sandbox as the runtime reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SandboxState {
    pub id: String,
    pub ready: bool,
    /// The sandbox's IP; a pod-network sandbox without one is broken and recreated.
    pub ip: Option<String>,
    pub host_network: bool,
    /// How many sandboxes this pod had before this one (upstream `Attempt`).
    pub attempt: u32,
    pub created_at: k8s_openapi::jiff::Timestamp,
}

/// Why a container is killed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KillReason {
    pub name: String,
    pub message: String,
}

/// The sync's plan.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PodActions {
    /// Stop every container and the sandbox (before recreating it, or because the pod is done).
    pub kill_pod: bool,
    /// Create a new sandbox (after killing the old one).
    pub create_sandbox: bool,
    /// The sandbox kept, if any.
    pub sandbox_id: Option<String>,
    /// The new sandbox's attempt number.
    pub attempt: u32,
    /// Index into `spec.initContainers` of the one to start next.
    pub next_init_container: Option<usize>,
    /// Indexes into `spec.containers` to start.
    pub containers_to_start: Vec<usize>,
    /// Running (or unknown) container IDs to kill, with why.
    pub containers_to_kill: BTreeMap<String, KillReason>,
}

/// A container spec's hash (what upstream stores as the `io.kubernetes.container.hash` label): a change means
/// the container is restarted with the new spec.
pub fn container_hash(c: &Container) -> String {
    let bytes = serde_json::to_vec(c).unwrap_or_default();
    Sha256::digest(&bytes)[..8]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn restart_policy(pod: &Pod) -> &str {
    pod.spec
        .as_ref()
        .and_then(|s| s.restart_policy.as_deref())
        .unwrap_or("Always")
}

fn should_restart_on_failure(pod: &Pod) -> bool {
    restart_policy(pod) != "Never"
}

fn host_network(pod: &Pod) -> bool {
    pod.spec
        .as_ref()
        .and_then(|s| s.host_network)
        .unwrap_or(false)
}

fn is_init_failed(c: &RuntimeContainer) -> bool {
    c.reason == "OOMKilled"
        || (c.state == RuntimeState::Exited && c.exit_code != 0)
        || c.state == RuntimeState::Unknown
}

/// Upstream `podSandboxChanged`: `(create, attempt, kept sandbox id)`.
fn sandbox_changed(pod: &Pod, sandboxes: &[SandboxState]) -> (bool, u32, Option<String>) {
    let mut sorted: Vec<&SandboxState> = sandboxes.iter().collect();
    sorted.sort_by_key(|s| std::cmp::Reverse(s.created_at));
    let Some(newest) = sorted.first() else {
        return (true, 0, None);
    };
    let ready = sorted.iter().filter(|s| s.ready).count();
    let next = newest.attempt + 1;
    if ready > 1 || !newest.ready {
        return (true, next, Some(newest.id.clone()));
    }
    if newest.host_network != host_network(pod) {
        return (true, next, Some(newest.id.clone()));
    }
    if !newest.host_network && newest.ip.as_deref().unwrap_or("").is_empty() {
        return (true, next, Some(newest.id.clone()));
    }
    (false, newest.attempt, Some(newest.id.clone()))
}

/// Upstream `findNextInitContainerToRun`: `(last failed init instance, next init index, done)`.
fn next_init_container<'a>(
    pod: &Pod,
    containers: &'a [RuntimeContainer],
) -> (Option<&'a RuntimeContainer>, Option<usize>, bool) {
    let Some(spec) = pod.spec.as_ref() else {
        return (None, None, true);
    };
    let inits = spec.init_containers.as_deref().unwrap_or_default();
    if inits.is_empty() {
        return (None, None, true);
    }
    // A running app container means initialization happened before.
    if spec
        .containers
        .iter()
        .any(|c| latest(containers, &c.name).is_some_and(|s| s.state == RuntimeState::Running))
    {
        return (None, None, true);
    }
    for c in inits.iter().rev() {
        if let Some(s) = latest(containers, &c.name).filter(|s| is_init_failed(s)) {
            let idx = inits.iter().position(|i| i.name == c.name);
            return (Some(s), idx, false);
        }
    }
    for (i, c) in inits.iter().enumerate().rev() {
        let Some(s) = latest(containers, &c.name) else {
            continue;
        };
        match s.state {
            RuntimeState::Running => return (None, None, false),
            RuntimeState::Exited if i == inits.len() - 1 => return (None, None, true),
            RuntimeState::Exited => return (None, Some(i + 1), false),
            _ => {}
        }
    }
    (None, Some(0), false)
}

fn container_succeeded(c: &Container, containers: &[RuntimeContainer]) -> bool {
    latest(containers, &c.name).is_some_and(|s| s.state == RuntimeState::Exited && s.exit_code == 0)
}

/// Upstream `computePodActions`. `probes` is keyed by container name (results of the running instance).
pub fn compute_pod_actions(
    pod: &Pod,
    sandboxes: &[SandboxState],
    containers: &[RuntimeContainer],
    probes: &HashMap<String, ProbeStatus>,
) -> PodActions {
    let (create, attempt, sandbox_id) = sandbox_changed(pod, sandboxes);
    let mut actions = PodActions {
        kill_pod: create,
        create_sandbox: create,
        sandbox_id,
        attempt,
        ..Default::default()
    };
    let empty = Vec::new();
    let specs = pod.spec.as_ref().map_or(&empty, |s| &s.containers);
    let has_inits = pod
        .spec
        .as_ref()
        .and_then(|s| s.init_containers.as_ref())
        .is_some_and(|i| !i.is_empty());

    if create {
        // A pod that must not restart and already ran does not get a new sandbox.
        if !should_restart_on_failure(pod) && attempt != 0 && !containers.is_empty() {
            actions.create_sandbox = false;
            return actions;
        }
        let to_start: Vec<usize> = specs
            .iter()
            .enumerate()
            .filter(|(_, c)| {
                !(restart_policy(pod) == "OnFailure" && container_succeeded(c, containers))
            })
            .map(|(i, _)| i)
            .collect();
        if to_start.is_empty() && next_init_container(pod, containers).2 {
            actions.create_sandbox = false;
            return actions;
        }
        if has_inits {
            actions.next_init_container = Some(0);
            return actions;
        }
        actions.containers_to_start = to_start;
        return actions;
    }

    let (last_init, next, done) = next_init_container(pod, containers);
    if !done {
        if let Some(next) = next {
            let failed = last_init.is_some_and(is_init_failed);
            if failed && !should_restart_on_failure(pod) {
                actions.kill_pod = true;
            } else {
                if let Some(s) = last_init.filter(|s| s.state == RuntimeState::Unknown) {
                    actions.containers_to_kill.insert(
                        s.id.clone(),
                        KillReason {
                            name: s.name.clone(),
                            message: "Init container is in \"unknown\" state, try killing it before restart"
                                .into(),
                        },
                    );
                }
                actions.next_init_container = Some(next);
            }
        }
        return actions;
    }

    let mut keep = 0;
    for (idx, c) in specs.iter().enumerate() {
        let status = latest(containers, &c.name);
        if status.is_none_or(|s| s.state != RuntimeState::Running) {
            if should_container_be_restarted(c, pod, status) {
                actions.containers_to_start.push(idx);
                if let Some(s) = status.filter(|s| s.state == RuntimeState::Unknown) {
                    actions.containers_to_kill.insert(
                        s.id.clone(),
                        KillReason {
                            name: c.name.clone(),
                            message:
                                "Container is in \"unknown\" state, try killing it before restart"
                                    .into(),
                        },
                    );
                }
            }
            continue;
        }
        let Some(status) = status else { continue };
        let mut restart = should_restart_on_failure(pod);
        let probe = probes.get(&c.name);
        let message = if !status.spec_hash.is_empty() && status.spec_hash != container_hash(c) {
            restart = true;
            format!("Container {} definition changed", c.name)
        } else if let Some(why) = probe.and_then(|p| p.needs_restart.as_deref()) {
            if why.starts_with("Startup") {
                format!("Container {} failed startup probe", c.name)
            } else {
                format!("Container {} failed liveness probe", c.name)
            }
        } else {
            keep += 1;
            continue;
        };
        let message = if restart {
            actions.containers_to_start.push(idx);
            format!("{message}, will be restarted")
        } else {
            message
        };
        actions.containers_to_kill.insert(
            status.id.clone(),
            KillReason {
                name: c.name.clone(),
                message,
            },
        );
    }
    if keep == 0 && actions.containers_to_start.is_empty() {
        actions.kill_pod = true;
    }
    actions
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::PodSpec;
    use k8s_openapi::jiff::Timestamp;

    fn ts(s: i64) -> Timestamp {
        Timestamp::from_second(1_700_000_000 + s).unwrap()
    }

    fn pod(containers: &[&str], inits: &[&str], policy: &str) -> Pod {
        let c = |n: &&str| Container {
            name: n.to_string(),
            image: Some("busybox".into()),
            ..Default::default()
        };
        Pod {
            spec: Some(PodSpec {
                containers: containers.iter().map(c).collect(),
                init_containers: (!inits.is_empty()).then(|| inits.iter().map(c).collect()),
                restart_policy: Some(policy.into()),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    fn sandbox(ready: bool, attempt: u32) -> SandboxState {
        SandboxState {
            id: format!("sb{attempt}"),
            ready,
            ip: Some("10.244.1.5".into()),
            host_network: false,
            attempt,
            created_at: ts(attempt as i64),
        }
    }

    fn inst(name: &str, n: i64, state: RuntimeState, exit: i32) -> RuntimeContainer {
        RuntimeContainer {
            name: name.into(),
            id: format!("{name}-{n}"),
            image: "busybox".into(),
            image_ref: String::new(),
            state,
            created_at: ts(100 + n),
            started_at: None,
            finished_at: None,
            exit_code: exit,
            reason: String::new(),
            message: String::new(),
            restart_count: n as i32,
            spec_hash: String::new(),
        }
    }

    #[test]
    fn a_new_pod_gets_a_sandbox_and_all_its_containers() {
        let a = compute_pod_actions(&pod(&["a", "b"], &[], "Always"), &[], &[], &HashMap::new());
        assert!(a.create_sandbox && a.kill_pod);
        assert_eq!(a.attempt, 0);
        assert_eq!(a.containers_to_start, vec![0, 1]);
        let with_init = compute_pod_actions(
            &pod(&["a"], &["i1", "i2"], "Always"),
            &[],
            &[],
            &HashMap::new(),
        );
        assert_eq!(with_init.next_init_container, Some(0));
        assert!(with_init.containers_to_start.is_empty());
    }

    #[test]
    fn init_containers_run_one_after_another_then_the_app_containers() {
        let p = pod(&["app"], &["i1", "i2"], "Always");
        let sb = [sandbox(true, 0)];
        let none = HashMap::new();
        let a = compute_pod_actions(&p, &sb, &[inst("i1", 0, RuntimeState::Running, 0)], &none);
        assert_eq!(
            (a.next_init_container, a.containers_to_start.len()),
            (None, 0),
            "wait for i1"
        );
        let a = compute_pod_actions(&p, &sb, &[inst("i1", 0, RuntimeState::Exited, 0)], &none);
        assert_eq!(a.next_init_container, Some(1));
        let done = [
            inst("i1", 0, RuntimeState::Exited, 0),
            inst("i2", 1, RuntimeState::Exited, 0),
        ];
        let a = compute_pod_actions(&p, &sb, &done, &none);
        assert_eq!(a.containers_to_start, vec![0]);
        assert!(!a.kill_pod);
    }

    #[test]
    fn a_failed_init_container_is_retried_or_fails_the_pod_under_never() {
        let failed = [inst("i1", 0, RuntimeState::Exited, 1)];
        let sb = [sandbox(true, 0)];
        let a = compute_pod_actions(
            &pod(&["app"], &["i1"], "Always"),
            &sb,
            &failed,
            &HashMap::new(),
        );
        assert_eq!(a.next_init_container, Some(0));
        let a = compute_pod_actions(
            &pod(&["app"], &["i1"], "Never"),
            &sb,
            &failed,
            &HashMap::new(),
        );
        assert!(a.kill_pod);
        assert_eq!(a.next_init_container, None);
    }

    #[test]
    fn exited_containers_restart_per_policy_and_a_finished_pod_is_killed() {
        let sb = [sandbox(true, 0)];
        let none = HashMap::new();
        let exited = [inst("a", 0, RuntimeState::Exited, 0)];
        let a = compute_pod_actions(&pod(&["a"], &[], "Always"), &sb, &exited, &none);
        assert_eq!(a.containers_to_start, vec![0]);
        let a = compute_pod_actions(&pod(&["a"], &[], "OnFailure"), &sb, &exited, &none);
        assert!(a.containers_to_start.is_empty());
        assert!(a.kill_pod, "nothing left to run: stop the sandbox");
        let failed = [inst("a", 0, RuntimeState::Exited, 2)];
        let a = compute_pod_actions(&pod(&["a"], &[], "OnFailure"), &sb, &failed, &none);
        assert_eq!(a.containers_to_start, vec![0]);
    }

    #[test]
    fn a_liveness_failure_kills_and_restarts_the_container() {
        let p = pod(&["a", "b"], &[], "Always");
        let running = [
            inst("a", 0, RuntimeState::Running, 0),
            inst("b", 1, RuntimeState::Running, 0),
        ];
        let probes = HashMap::from([(
            "a".to_string(),
            ProbeStatus {
                needs_restart: Some(
                    "Liveness probe failed: HTTP probe failed with statuscode: 500".into(),
                ),
                ..Default::default()
            },
        )]);
        let a = compute_pod_actions(&p, &[sandbox(true, 0)], &running, &probes);
        assert_eq!(a.containers_to_start, vec![0]);
        assert_eq!(
            a.containers_to_kill["a-0"].message,
            "Container a failed liveness probe, will be restarted"
        );
        assert!(!a.kill_pod);
        let a = compute_pod_actions(
            &pod(&["a"], &[], "Never"),
            &[sandbox(true, 0)],
            &running[..1],
            &probes,
        );
        assert!(a.containers_to_start.is_empty());
        assert!(
            a.kill_pod,
            "Never: killed, not restarted, and nothing else runs"
        );
    }

    #[test]
    fn a_changed_spec_restarts_the_container() {
        let p = pod(&["a"], &[], "Never");
        let mut running = inst("a", 0, RuntimeState::Running, 0);
        running.spec_hash = "0000000000000000".into();
        let a = compute_pod_actions(&p, &[sandbox(true, 0)], &[running.clone()], &HashMap::new());
        assert_eq!(
            a.containers_to_start,
            vec![0],
            "spec changes restart even under Never"
        );
        assert!(a.containers_to_kill["a-0"]
            .message
            .contains("definition changed"));
        running.spec_hash = container_hash(&p.spec.as_ref().unwrap().containers[0]);
        let a = compute_pod_actions(&p, &[sandbox(true, 0)], &[running], &HashMap::new());
        assert_eq!(
            a,
            PodActions {
                sandbox_id: Some("sb0".into()),
                ..Default::default()
            }
        );
    }

    #[test]
    fn a_dead_sandbox_is_recreated_with_the_next_attempt_unless_the_pod_is_done() {
        let p = pod(&["a"], &[], "Always");
        let a = compute_pod_actions(
            &p,
            &[sandbox(false, 0)],
            &[inst("a", 0, RuntimeState::Exited, 137)],
            &HashMap::new(),
        );
        assert!(a.kill_pod && a.create_sandbox);
        assert_eq!(a.attempt, 1);
        assert_eq!(a.containers_to_start, vec![0]);
        let never = pod(&["a"], &[], "Never");
        let a = compute_pod_actions(
            &never,
            &[sandbox(false, 0)],
            &[inst("a", 0, RuntimeState::Exited, 0)],
            &HashMap::new(),
        );
        assert!(a.kill_pod && !a.create_sandbox);
        let mut no_ip = sandbox(true, 2);
        no_ip.ip = None;
        let a = compute_pod_actions(&p, &[no_ip], &[], &HashMap::new());
        assert!(a.create_sandbox);
        assert_eq!(a.attempt, 3);
    }
}
