//! The pod's API status, computed as upstream's `generateAPIPodStatus`/`convertToAPIContainerStatuses`/`getPhase`
//! (pkg/kubelet/kubelet_pods.go) and `pkg/kubelet/status/generate.go` compute it, from a runtime-neutral view of
//! the pod's container instances.
//!
//! The runtime reports container *instances* ([`RuntimeContainer`], upstream's `kubecontainer.Status`), newest and
//! older ones; the kubelet's worker adds why a container is waiting ([`WaitingReason`], upstream's `reasonCache`:
//! `CrashLoopBackOff`, `ErrImagePull`, `ImagePullBackOff`, `CreateContainerConfigError`) and what the probes say.

use std::collections::HashMap;

use k8s_openapi::api::core::v1::{
    Container, ContainerState, ContainerStateRunning, ContainerStateTerminated,
    ContainerStateWaiting, ContainerStatus, HostIP, Pod, PodCondition, PodIP, PodStatus,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;

use crate::qos;
use crate::restart;

/// Waiting reasons (upstream `pkg/kubelet/container` and `images` constants).
pub mod reasons {
    pub const CONTAINER_CREATING: &str = "ContainerCreating";
    pub const POD_INITIALIZING: &str = "PodInitializing";
    pub const CRASH_LOOP_BACK_OFF: &str = "CrashLoopBackOff";
    pub const ERR_IMAGE_PULL: &str = "ErrImagePull";
    pub const IMAGE_PULL_BACK_OFF: &str = "ImagePullBackOff";
    pub const ERR_IMAGE_NEVER_PULL: &str = "ErrImageNeverPull";
    pub const CREATE_CONTAINER_CONFIG_ERROR: &str = "CreateContainerConfigError";
    pub const CREATE_CONTAINER_ERROR: &str = "CreateContainerError";
    pub const RUN_CONTAINER_ERROR: &str = "RunContainerError";
    /// Terminated reasons, as CRI runtimes (containerd, CRI-O) set them.
    pub const COMPLETED: &str = "Completed";
    pub const ERROR: &str = "Error";
    pub const OOM_KILLED: &str = "OOMKilled";
    pub const STATUS_UNKNOWN: &str = "ContainerStatusUnknown";
}

/// What the runtime says about one container instance.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RuntimeState {
    Created,
    Running,
    Exited,
    Unknown,
}

/// One container instance as the runtime reports it (upstream `kubecontainer.Status`).
#[derive(Debug, Clone)]
pub struct RuntimeContainer {
    /// The spec container's name.
    pub name: String,
    /// `<runtime>://<id>`, e.g. `windlass://3f2a…`.
    pub id: String,
    pub image: String,
    /// The image's digest reference (`ContainerStatus.imageID`).
    pub image_ref: String,
    pub state: RuntimeState,
    pub created_at: Timestamp,
    pub started_at: Option<Timestamp>,
    pub finished_at: Option<Timestamp>,
    pub exit_code: i32,
    /// The runtime's reason (`OOMKilled` when the cgroup OOM killer ended it); empty lets [`terminated_reason`]
    /// choose `Completed` or `Error`.
    pub reason: String,
    pub message: String,
    /// How many times this container had been started before this instance (upstream keeps it in the container's
    /// labels; the runtime stores whatever the kubelet gave it at creation).
    pub restart_count: i32,
    /// [`crate::sync::container_hash`] of the spec this instance was created from (upstream keeps it in a
    /// container label); empty when unknown, which never counts as a change.
    pub spec_hash: String,
}

/// Why the kubelet's last attempt to start a container failed (upstream `reasonCache`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WaitingReason {
    pub reason: String,
    pub message: String,
}

/// Everything a status is computed from.
#[derive(Debug)]
pub struct StatusInput<'a> {
    pub pod: &'a Pod,
    /// All container instances of the pod the runtime knows (any order).
    pub containers: &'a [RuntimeContainer],
    /// Sandbox IPs, IPv4 first.
    pub pod_ips: &'a [String],
    pub host_ips: &'a [String],
    /// Last start failure per container name.
    pub reasons: &'a HashMap<String, WaitingReason>,
    /// Readiness probe results per container name; a running container without an entry (no readiness probe) is
    /// ready once started.
    pub readiness: &'a HashMap<String, bool>,
    /// Startup probe results per container name; without an entry (no startup probe) a running container is started.
    pub startup: &'a HashMap<String, bool>,
    /// The pod is terminal: its containers will not be restarted (e.g. it is being deleted and all have stopped).
    pub pod_is_terminal: bool,
    pub now: Timestamp,
}

/// The readiness and startup maps of [`StatusInput`] from the probe workers' current status per container
/// (containers without that probe are left out, so they count as ready/started once running).
pub fn probe_maps(
    probes: &HashMap<String, crate::probes::ProbeStatus>,
) -> (HashMap<String, bool>, HashMap<String, bool>) {
    let readiness = probes
        .iter()
        .filter_map(|(name, s)| s.ready.map(|r| (name.clone(), r)))
        .collect();
    let startup = probes
        .iter()
        .filter_map(|(name, s)| s.started.map(|r| (name.clone(), r)))
        .collect();
    (readiness, startup)
}

/// `Completed` for exit 0, `Error` otherwise, unless the runtime gave a reason (e.g. `OOMKilled`).
pub fn terminated_reason(exit_code: i32, runtime_reason: &str) -> String {
    if !runtime_reason.is_empty() {
        runtime_reason.to_string()
    } else if exit_code == 0 {
        reasons::COMPLETED.to_string()
    } else {
        reasons::ERROR.to_string()
    }
}

/// The newest instance of `name`, as `podStatus.FindContainerStatusByName`.
pub fn latest<'a>(containers: &'a [RuntimeContainer], name: &str) -> Option<&'a RuntimeContainer> {
    containers
        .iter()
        .filter(|c| c.name == name)
        .max_by_key(|c| c.created_at)
}

fn convert_instance(c: &RuntimeContainer, old: Option<&ContainerStatus>) -> ContainerStatus {
    let mut status = ContainerStatus {
        name: c.name.clone(),
        restart_count: c.restart_count,
        image: c.image.clone(),
        image_id: c.image_ref.clone(),
        container_id: Some(c.id.clone()),
        ..Default::default()
    };
    status.state = Some(match c.state {
        RuntimeState::Running => ContainerState {
            running: Some(ContainerStateRunning {
                started_at: c.started_at.map(Time),
            }),
            ..Default::default()
        },
        RuntimeState::Created => waiting_state("", ""),
        RuntimeState::Exited => ContainerState {
            terminated: Some(ContainerStateTerminated {
                exit_code: c.exit_code,
                reason: Some(terminated_reason(c.exit_code, &c.reason)),
                message: (!c.message.is_empty()).then(|| c.message.clone()),
                started_at: c.started_at.map(Time),
                finished_at: c.finished_at.map(Time),
                container_id: Some(c.id.clone()),
                ..Default::default()
            }),
            ..Default::default()
        },
        RuntimeState::Unknown
            if old
                .and_then(|o| o.state.as_ref())
                .is_some_and(|s| s.running.is_some()) =>
        {
            // Upstream: a container that was running and vanished terminated; "never ran" differs from "ran and
            // failed" for run-once pods.
            status.restart_count = old.map_or(0, |o| o.restart_count) + 1;
            ContainerState {
                terminated: Some(ContainerStateTerminated {
                    exit_code: 137,
                    reason: Some(reasons::STATUS_UNKNOWN.into()),
                    message: Some(
                        "The container could not be located when the pod was terminated".into(),
                    ),
                    ..Default::default()
                }),
                ..Default::default()
            }
        }
        RuntimeState::Unknown => waiting_state("", ""),
    });
    status
}

fn waiting_state(reason: &str, message: &str) -> ContainerState {
    ContainerState {
        waiting: Some(ContainerStateWaiting {
            reason: (!reason.is_empty()).then(|| reason.to_string()),
            message: (!message.is_empty()).then(|| message.to_string()),
        }),
        ..Default::default()
    }
}

fn is_running(s: &ContainerStatus) -> bool {
    s.state.as_ref().is_some_and(|s| s.running.is_some())
}

fn terminated(state: Option<&ContainerState>) -> Option<&ContainerStateTerminated> {
    state.and_then(|s| s.terminated.as_ref())
}

/// Upstream `convertToAPIContainerStatuses` for `specs` (the pod's init containers or its regular containers).
fn container_statuses(
    input: &StatusInput<'_>,
    specs: &[Container],
    previous: &[ContainerStatus],
    has_init_containers: bool,
    is_init: bool,
) -> Vec<ContainerStatus> {
    let default_reason = if has_init_containers {
        reasons::POD_INITIALIZING
    } else {
        reasons::CONTAINER_CREATING
    };
    let old: HashMap<&str, &ContainerStatus> =
        previous.iter().map(|s| (s.name.as_str(), s)).collect();
    let mut statuses: HashMap<String, ContainerStatus> = HashMap::new();
    for spec in specs {
        let mut status = ContainerStatus {
            name: spec.name.clone(),
            image: spec.image.clone().unwrap_or_default(),
            state: Some(waiting_state(default_reason, "")),
            ..Default::default()
        };
        if let Some(o) = old.get(spec.name.as_str()) {
            if terminated(o.state.as_ref()).is_some() {
                status = (*o).clone();
            } else {
                status.restart_count = o.restart_count;
                status.last_state = o.last_state.clone();
            }
        }
        statuses.insert(spec.name.clone(), status);
    }

    // A container that was running and that the runtime no longer reports terminated, not "never started".
    for spec in specs {
        if input.containers.iter().any(|c| c.name == spec.name) {
            continue;
        }
        let Some(o) = old.get(spec.name.as_str()) else {
            continue;
        };
        if terminated(o.state.as_ref()).is_some() || !is_running(o) {
            continue;
        }
        let Some(status) = statuses.get_mut(&spec.name) else {
            continue;
        };
        let is_default = status
            .state
            .as_ref()
            .and_then(|s| s.waiting.as_ref())
            .is_some_and(|w| w.reason.as_deref() == Some(default_reason));
        if !is_default || terminated(status.last_state.as_ref()).is_some() {
            continue;
        }
        status.last_state = Some(ContainerState {
            terminated: Some(ContainerStateTerminated {
                exit_code: 137,
                reason: Some(reasons::STATUS_UNKNOWN.into()),
                message: Some(
                    "The container could not be located when the pod was deleted.  The container used to be Running"
                        .into(),
                ),
                ..Default::default()
            }),
            ..Default::default()
        });
        if input.pod.metadata.deletion_timestamp.is_none() {
            status.restart_count += 1;
        }
    }

    // Newest instance is the state, the one before it the lastState.
    let mut instances: Vec<&RuntimeContainer> = input.containers.iter().collect();
    instances.sort_by_key(|c| std::cmp::Reverse(c.created_at));
    let mut seen: HashMap<&str, u32> = HashMap::new();
    for c in instances {
        if !statuses.contains_key(&c.name) {
            continue;
        }
        let n = seen.entry(c.name.as_str()).or_insert(0);
        if *n >= 2 {
            continue;
        }
        let converted = convert_instance(c, old.get(c.name.as_str()).copied());
        if *n == 0 {
            statuses.insert(c.name.clone(), converted);
        } else if let Some(s) = statuses.get_mut(&c.name) {
            s.last_state = converted.state;
        }
        *n += 1;
    }

    // Containers whose start failed are Waiting with the failure's reason.
    for spec in specs {
        let latest = latest(input.containers, &spec.name);
        if is_init && latest.is_some_and(|l| l.state == RuntimeState::Exited && l.exit_code == 0) {
            continue;
        }
        if !restart::should_container_be_restarted(spec, input.pod, latest) {
            continue;
        }
        let Some(reason) = input.reasons.get(&spec.name) else {
            continue;
        };
        if let Some(status) = statuses.get_mut(&spec.name) {
            if terminated(status.state.as_ref()).is_some() {
                status.last_state = status.state.take();
            }
            status.state = Some(waiting_state(&reason.reason, &reason.message));
        }
    }

    // Probe results (upstream probeManager.UpdatePodStatus): started, then ready.
    for status in statuses.values_mut() {
        let running = is_running(status);
        let started = running && input.startup.get(&status.name).copied().unwrap_or(true);
        status.started = Some(started);
        status.ready = started && input.readiness.get(&status.name).copied().unwrap_or(true);
        if is_init {
            // Upstream probe manager: an init container is ready once it has completed successfully.
            status.ready = terminated(status.state.as_ref()).is_some_and(|t| t.exit_code == 0);
        }
    }

    if is_init {
        specs
            .iter()
            .filter_map(|s| statuses.remove(&s.name))
            .collect()
    } else {
        let mut out: Vec<ContainerStatus> = statuses.into_values().collect();
        out.sort_by(|a, b| a.name.cmp(&b.name));
        out
    }
}

fn find<'a>(statuses: &'a [ContainerStatus], name: &str) -> Option<&'a ContainerStatus> {
    statuses.iter().find(|s| s.name == name)
}

/// The pod phase (upstream `getPhase`, without sidecar init containers).
pub fn phase(pod: &Pod, all: &[ContainerStatus], pod_is_terminal: bool) -> &'static str {
    let Some(spec) = pod.spec.as_ref() else {
        return "Pending";
    };
    let restart_policy = spec.restart_policy.as_deref().unwrap_or("Always");
    let mut pending_init = 0;
    let mut failed_init = 0;
    for c in spec.init_containers.iter().flatten() {
        let Some(s) = find(all, &c.name) else {
            pending_init += 1;
            continue;
        };
        let state = s.state.as_ref();
        if state.is_some_and(|st| st.running.is_some()) {
            pending_init += 1;
        } else if let Some(t) = terminated(state) {
            if t.exit_code != 0 {
                failed_init += 1;
            }
        } else if state.is_some_and(|st| st.waiting.is_some()) {
            match terminated(s.last_state.as_ref()) {
                Some(t) if t.exit_code != 0 => failed_init += 1,
                Some(_) => {}
                None => pending_init += 1,
            }
        } else {
            pending_init += 1;
        }
    }
    let (mut unknown, mut running, mut waiting, mut stopped, mut succeeded) = (0, 0, 0, 0, 0);
    for c in &spec.containers {
        let Some(s) = find(all, &c.name) else {
            unknown += 1;
            continue;
        };
        let state = s.state.as_ref();
        if state.is_some_and(|st| st.running.is_some()) {
            running += 1;
        } else if let Some(t) = terminated(state) {
            stopped += 1;
            if t.exit_code == 0 {
                succeeded += 1;
            }
        } else if state.is_some_and(|st| st.waiting.is_some()) {
            if terminated(s.last_state.as_ref()).is_some() {
                stopped += 1;
            } else {
                waiting += 1;
            }
        } else {
            unknown += 1;
        }
    }
    if failed_init > 0 && restart_policy == "Never" {
        return "Failed";
    }
    let any_regular_started = spec.containers.iter().any(|c| {
        find(all, &c.name).is_some_and(|s| {
            let st = s.state.as_ref();
            st.is_some_and(|st| st.running.is_some() || st.terminated.is_some())
                || terminated(s.last_state.as_ref()).is_some()
        })
    });
    if (pending_init > 0 && !any_regular_started) || waiting > 0 {
        return "Pending";
    }
    if running > 0 && unknown == 0 {
        return "Running";
    }
    if running == 0 && stopped > 0 && unknown == 0 {
        if pod_is_terminal {
            return if stopped == succeeded {
                "Succeeded"
            } else {
                "Failed"
            };
        }
        if restart_policy == "Always" {
            return "Running";
        }
        if stopped == succeeded {
            return "Succeeded";
        }
        if restart_policy == "Never" {
            return "Failed";
        }
        return "Running";
    }
    "Pending"
}

fn condition(type_: &str, ok: bool, reason: Option<&str>, message: Option<String>) -> PodCondition {
    PodCondition {
        type_: type_.into(),
        status: if ok { "True" } else { "False" }.into(),
        reason: reason.map(str::to_string),
        message,
        ..Default::default()
    }
}

/// Go's `%s` of a `[]string`: `[a b]`.
fn go_list(names: &[&str]) -> String {
    format!("[{}]", names.join(" "))
}

fn initialized_condition(pod: &Pod, all: &[ContainerStatus], phase: &str) -> PodCondition {
    let spec = pod.spec.as_ref();
    let inits: Vec<&Container> = spec
        .and_then(|s| s.init_containers.as_ref())
        .map(|v| v.iter().collect())
        .unwrap_or_default();
    if inits.is_empty() {
        return condition("Initialized", true, None, None);
    }
    let mut unknown = Vec::new();
    let mut uninitialized = Vec::new();
    for c in &inits {
        match find(all, &c.name) {
            None => unknown.push(c.name.as_str()),
            Some(s) => {
                if terminated(s.state.as_ref()).is_none_or(|t| t.exit_code != 0) {
                    uninitialized.push(c.name.as_str());
                }
            }
        }
    }
    if phase == "Succeeded" && unknown.is_empty() {
        return condition("Initialized", true, Some("PodCompleted"), None);
    }
    let regular_started = spec.is_some_and(|s| {
        s.containers.iter().any(|c| {
            find(all, &c.name).is_some_and(|st| {
                st.state
                    .as_ref()
                    .is_some_and(|x| x.running.is_some() || x.terminated.is_some())
                    || terminated(st.last_state.as_ref()).is_some()
            })
        })
    });
    if regular_started {
        return condition("Initialized", true, None, None);
    }
    let mut messages = Vec::new();
    if !unknown.is_empty() {
        messages.push(format!(
            "containers with incomplete status: {}",
            go_list(&unknown)
        ));
    }
    if !uninitialized.is_empty() {
        messages.push(format!(
            "containers with incomplete status: {}",
            go_list(&uninitialized)
        ));
    }
    if messages.is_empty() {
        return condition("Initialized", true, None, None);
    }
    condition(
        "Initialized",
        false,
        Some("ContainersNotInitialized"),
        Some(messages.join(", ")),
    )
}

fn containers_ready_condition(
    pod: &Pod,
    statuses: &[ContainerStatus],
    phase: &str,
) -> PodCondition {
    let mut unknown = Vec::new();
    let mut unready = Vec::new();
    for c in pod.spec.iter().flat_map(|s| &s.containers) {
        match find(statuses, &c.name) {
            None => unknown.push(c.name.as_str()),
            Some(s) if !s.ready => unready.push(c.name.as_str()),
            Some(_) => {}
        }
    }
    if phase == "Succeeded" && unknown.is_empty() {
        return condition("ContainersReady", false, Some("PodCompleted"), None);
    }
    let mut messages = Vec::new();
    if !unknown.is_empty() {
        messages.push(format!(
            "containers with unknown status: {}",
            go_list(&unknown)
        ));
    }
    if !unready.is_empty() {
        messages.push(format!(
            "containers with unready status: {}",
            go_list(&unready)
        ));
    }
    if messages.is_empty() {
        condition("ContainersReady", true, None, None)
    } else {
        condition(
            "ContainersReady",
            false,
            Some("ContainersNotReady"),
            Some(messages.join(", ")),
        )
    }
}

fn ready_condition(
    pod: &Pod,
    containers_ready: &PodCondition,
    existing: &[PodCondition],
) -> PodCondition {
    if containers_ready.status != "True" {
        return PodCondition {
            type_: "Ready".into(),
            ..containers_ready.clone()
        };
    }
    // Readiness gates: conditions set by others (upstream generate.go).
    let mut messages = Vec::new();
    for gate in pod
        .spec
        .as_ref()
        .and_then(|s| s.readiness_gates.as_ref())
        .into_iter()
        .flatten()
    {
        match existing.iter().find(|c| c.type_ == gate.condition_type) {
            None => messages.push(format!(
                "corresponding condition of pod readiness gate \"{}\" does not exist.",
                gate.condition_type
            )),
            Some(c) if c.status != "True" => messages.push(format!(
                "the status of pod readiness gate \"{}\" is not \"True\", but {}",
                gate.condition_type, c.status
            )),
            Some(_) => {}
        }
    }
    if messages.is_empty() {
        condition("Ready", true, None, None)
    } else {
        condition(
            "Ready",
            false,
            Some("ReadinessGatesNotReady"),
            Some(messages.join(", ")),
        )
    }
}

/// The conditions the kubelet owns (upstream `PodConditionByKubelet`).
const KUBELET_CONDITIONS: &[&str] = &[
    "PodScheduled",
    "Ready",
    "Initialized",
    "ContainersReady",
    "PodReadyToStartContainers",
];

/// The pod's full API status (upstream `generateAPIPodStatus`).
pub fn generate_pod_status(input: &StatusInput<'_>) -> PodStatus {
    let pod = input.pod;
    let old = pod.status.clone().unwrap_or_default();
    let spec = pod.spec.as_ref();
    let init_specs: &[Container] = spec
        .and_then(|s| s.init_containers.as_deref())
        .unwrap_or_default();
    let specs: &[Container] = spec.map(|s| s.containers.as_slice()).unwrap_or_default();
    let has_init = !init_specs.is_empty();
    let container_statuses = container_statuses(
        input,
        specs,
        old.container_statuses.as_deref().unwrap_or_default(),
        has_init,
        false,
    );
    let init_statuses = container_statuses_for_init(input, init_specs, &old, has_init);
    let all: Vec<ContainerStatus> = container_statuses
        .iter()
        .chain(init_statuses.iter())
        .cloned()
        .collect();
    let mut phase = phase(pod, &all, input.pod_is_terminal).to_string();
    // Pods never leave a terminal phase (upstream's three-way merge).
    if let Some(old_phase) = old.phase.as_deref() {
        if matches!(old_phase, "Failed" | "Succeeded") && phase != old_phase {
            phase = old_phase.to_string();
        }
    }

    let mut conditions: Vec<PodCondition> = old
        .conditions
        .iter()
        .flatten()
        .filter(|c| !KUBELET_CONDITIONS.contains(&c.type_.as_str()))
        .cloned()
        .collect();
    let initialized = initialized_condition(pod, &all, &phase);
    let containers_ready = containers_ready_condition(pod, &container_statuses, &phase);
    let ready = ready_condition(pod, &containers_ready, &conditions);
    let scheduled = condition("PodScheduled", true, None, None);
    for mut c in [initialized, ready, containers_ready, scheduled] {
        // lastTransitionTime moves only when the status does (upstream status manager).
        let previous = old.conditions.iter().flatten().find(|o| o.type_ == c.type_);
        c.last_transition_time = match previous {
            Some(p) if p.status == c.status && p.last_transition_time.is_some() => {
                p.last_transition_time.clone()
            }
            _ => Some(Time(input.now)),
        };
        conditions.push(c);
    }

    let keep_reason = old.phase.as_deref() == Some(phase.as_str());
    PodStatus {
        phase: Some(phase),
        conditions: Some(conditions),
        host_ip: input.host_ips.first().cloned(),
        host_ips: (!input.host_ips.is_empty()).then(|| {
            input
                .host_ips
                .iter()
                .map(|ip| HostIP { ip: ip.clone() })
                .collect()
        }),
        pod_ip: input.pod_ips.first().cloned(),
        pod_ips: (!input.pod_ips.is_empty()).then(|| {
            input
                .pod_ips
                .iter()
                .map(|ip| PodIP { ip: ip.clone() })
                .collect()
        }),
        start_time: old.start_time.clone().or(Some(Time(input.now))),
        qos_class: Some(qos::pod_qos(pod).as_str().to_string()),
        container_statuses: Some(container_statuses),
        init_container_statuses: has_init.then_some(init_statuses),
        reason: if keep_reason {
            old.reason.clone()
        } else {
            None
        },
        message: if keep_reason {
            old.message.clone()
        } else {
            None
        },
        ..Default::default()
    }
}

fn container_statuses_for_init(
    input: &StatusInput<'_>,
    init_specs: &[Container],
    old: &PodStatus,
    has_init: bool,
) -> Vec<ContainerStatus> {
    if init_specs.is_empty() {
        return Vec::new();
    }
    container_statuses(
        input,
        init_specs,
        old.init_container_statuses.as_deref().unwrap_or_default(),
        has_init,
        true,
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::PodSpec;

    fn ts(secs: i64) -> Timestamp {
        Timestamp::from_second(1_700_000_000 + secs).unwrap()
    }

    fn pod(containers: &[&str], inits: &[&str], restart: &str) -> Pod {
        let c = |n: &&str| Container {
            name: n.to_string(),
            image: Some("busybox".into()),
            ..Default::default()
        };
        Pod {
            spec: Some(PodSpec {
                containers: containers.iter().map(c).collect(),
                init_containers: (!inits.is_empty()).then(|| inits.iter().map(c).collect()),
                restart_policy: Some(restart.into()),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    fn inst(name: &str, n: i64, state: RuntimeState, exit: i32) -> RuntimeContainer {
        RuntimeContainer {
            name: name.into(),
            id: format!("windlass://{name}-{n}"),
            image: "busybox".into(),
            image_ref: "sha256:abc".into(),
            state,
            created_at: ts(n * 10),
            started_at: Some(ts(n * 10 + 1)),
            finished_at: (state == RuntimeState::Exited).then(|| ts(n * 10 + 5)),
            exit_code: exit,
            reason: String::new(),
            message: String::new(),
            restart_count: n as i32,
            spec_hash: String::new(),
        }
    }

    struct Fixture {
        reasons: HashMap<String, WaitingReason>,
        readiness: HashMap<String, bool>,
        startup: HashMap<String, bool>,
        ips: Vec<String>,
        host: Vec<String>,
    }

    impl Fixture {
        fn new() -> Self {
            Self {
                reasons: HashMap::new(),
                readiness: HashMap::new(),
                startup: HashMap::new(),
                ips: vec!["10.244.1.5".into()],
                host: vec!["192.168.1.10".into()],
            }
        }
        fn status(&self, pod: &Pod, containers: &[RuntimeContainer]) -> PodStatus {
            generate_pod_status(&StatusInput {
                pod,
                containers,
                pod_ips: &self.ips,
                host_ips: &self.host,
                reasons: &self.reasons,
                readiness: &self.readiness,
                startup: &self.startup,
                pod_is_terminal: false,
                now: ts(1000),
            })
        }
    }

    fn cond<'a>(s: &'a PodStatus, t: &str) -> &'a PodCondition {
        s.conditions
            .as_ref()
            .unwrap()
            .iter()
            .find(|c| c.type_ == t)
            .unwrap()
    }

    fn waiting_reason(s: &ContainerStatus) -> Option<&str> {
        s.state.as_ref()?.waiting.as_ref()?.reason.as_deref()
    }

    #[test]
    fn a_new_pod_is_pending_with_containers_creating() {
        let p = pod(&["web"], &[], "Always");
        let s = Fixture::new().status(&p, &[]);
        assert_eq!(s.phase.as_deref(), Some("Pending"));
        let cs = &s.container_statuses.as_ref().unwrap()[0];
        assert_eq!(waiting_reason(cs), Some("ContainerCreating"));
        assert_eq!(cond(&s, "PodScheduled").status, "True");
        assert_eq!(cond(&s, "Ready").status, "False");
        assert_eq!(
            cond(&s, "Ready").reason.as_deref(),
            Some("ContainersNotReady")
        );
        assert_eq!(
            cond(&s, "ContainersReady").message.as_deref(),
            Some("containers with unready status: [web]")
        );
        assert_eq!(s.qos_class.as_deref(), Some("BestEffort"));
        assert_eq!(s.pod_ip.as_deref(), Some("10.244.1.5"));
        assert_eq!(s.host_ip.as_deref(), Some("192.168.1.10"));
    }

    #[test]
    fn a_running_container_makes_the_pod_running_and_ready() {
        let p = pod(&["web"], &[], "Always");
        let s = Fixture::new().status(&p, &[inst("web", 0, RuntimeState::Running, 0)]);
        assert_eq!(s.phase.as_deref(), Some("Running"));
        let cs = &s.container_statuses.as_ref().unwrap()[0];
        assert!(cs.ready);
        assert_eq!(cs.started, Some(true));
        assert_eq!(cs.container_id.as_deref(), Some("windlass://web-0"));
        assert_eq!(cond(&s, "Ready").status, "True");
        assert_eq!(cond(&s, "ContainersReady").status, "True");
        assert_eq!(cond(&s, "Initialized").status, "True");
    }

    #[test]
    fn an_unstarted_container_is_neither_started_nor_ready() {
        let p = pod(&["web"], &[], "Always");
        let probes = HashMap::from([(
            "web".to_string(),
            crate::probes::ProbeStatus {
                started: Some(false),
                ready: None,
                needs_restart: None,
            },
        )]);
        let (readiness, startup) = probe_maps(&probes);
        let mut f = Fixture::new();
        f.readiness = readiness;
        f.startup = startup;
        let s = f.status(&p, &[inst("web", 0, RuntimeState::Running, 0)]);
        let cs = &s.container_statuses.as_ref().unwrap()[0];
        assert_eq!((cs.started, cs.ready), (Some(false), false));
    }

    #[test]
    fn a_failing_readiness_probe_keeps_the_pod_unready() {
        let p = pod(&["web"], &[], "Always");
        let mut f = Fixture::new();
        f.readiness.insert("web".into(), false);
        let s = f.status(&p, &[inst("web", 0, RuntimeState::Running, 0)]);
        assert_eq!(s.phase.as_deref(), Some("Running"));
        assert_eq!(cond(&s, "Ready").status, "False");
    }

    #[test]
    fn a_crashing_container_shows_crash_loop_back_off_with_its_last_exit() {
        let p = pod(&["app"], &[], "Always");
        let mut f = Fixture::new();
        f.reasons.insert(
            "app".into(),
            WaitingReason {
                reason: reasons::CRASH_LOOP_BACK_OFF.into(),
                message: "back-off 20s restarting failed container=app pod=p_default(uid)".into(),
            },
        );
        let s = f.status(
            &p,
            &[
                inst("app", 0, RuntimeState::Exited, 1),
                inst("app", 1, RuntimeState::Exited, 2),
            ],
        );
        let cs = &s.container_statuses.as_ref().unwrap()[0];
        assert_eq!(waiting_reason(cs), Some("CrashLoopBackOff"));
        let last = cs.last_state.as_ref().unwrap().terminated.as_ref().unwrap();
        assert_eq!((last.exit_code, last.reason.as_deref()), (2, Some("Error")));
        assert_eq!(cs.restart_count, 1);
        assert_eq!(
            s.phase.as_deref(),
            Some("Running"),
            "restarting under Always"
        );
    }

    #[test]
    fn the_previous_instance_is_the_last_state() {
        let p = pod(&["app"], &[], "Always");
        let mut oom = inst("app", 0, RuntimeState::Exited, 137);
        oom.reason = reasons::OOM_KILLED.into();
        let s = Fixture::new().status(&p, &[inst("app", 1, RuntimeState::Running, 0), oom]);
        let cs = &s.container_statuses.as_ref().unwrap()[0];
        assert!(cs.state.as_ref().unwrap().running.is_some());
        let last = cs.last_state.as_ref().unwrap().terminated.as_ref().unwrap();
        assert_eq!(last.reason.as_deref(), Some("OOMKilled"));
        assert_eq!(last.exit_code, 137);
        assert_eq!(cs.restart_count, 1);
    }

    #[test]
    fn completed_containers_under_never_and_onfailure_succeed_or_fail() {
        let ok = [inst("a", 0, RuntimeState::Exited, 0)];
        let bad = [inst("a", 0, RuntimeState::Exited, 3)];
        let f = Fixture::new();
        let s = f.status(&pod(&["a"], &[], "Never"), &ok);
        assert_eq!(s.phase.as_deref(), Some("Succeeded"));
        let t = s.container_statuses.as_ref().unwrap()[0]
            .state
            .as_ref()
            .unwrap()
            .terminated
            .clone()
            .unwrap();
        assert_eq!(t.reason.as_deref(), Some("Completed"));
        assert_eq!(
            cond(&s, "ContainersReady").reason.as_deref(),
            Some("PodCompleted")
        );
        assert_eq!(cond(&s, "Initialized").status, "True");
        assert_eq!(
            f.status(&pod(&["a"], &[], "Never"), &bad).phase.as_deref(),
            Some("Failed")
        );
        assert_eq!(
            f.status(&pod(&["a"], &[], "OnFailure"), &ok)
                .phase
                .as_deref(),
            Some("Succeeded")
        );
        assert_eq!(
            f.status(&pod(&["a"], &[], "OnFailure"), &bad)
                .phase
                .as_deref(),
            Some("Running")
        );
        assert_eq!(
            f.status(&pod(&["a"], &[], "Always"), &ok).phase.as_deref(),
            Some("Running")
        );
    }

    #[test]
    fn image_pull_errors_keep_the_pod_pending() {
        let p = pod(&["web"], &[], "Always");
        let mut f = Fixture::new();
        f.reasons.insert(
            "web".into(),
            WaitingReason {
                reason: reasons::IMAGE_PULL_BACK_OFF.into(),
                message: "Back-off pulling image \"nope:1\"".into(),
            },
        );
        let s = f.status(&p, &[]);
        assert_eq!(s.phase.as_deref(), Some("Pending"));
        let cs = &s.container_statuses.as_ref().unwrap()[0];
        assert_eq!(waiting_reason(cs), Some("ImagePullBackOff"));
    }

    #[test]
    fn init_containers_gate_initialized_and_the_app_waits_with_pod_initializing() {
        let p = pod(&["web"], &["init1", "init2"], "Always");
        let f = Fixture::new();
        let s = f.status(&p, &[inst("init1", 0, RuntimeState::Running, 0)]);
        assert_eq!(s.phase.as_deref(), Some("Pending"));
        let init = cond(&s, "Initialized");
        assert_eq!(init.status, "False");
        assert_eq!(init.reason.as_deref(), Some("ContainersNotInitialized"));
        assert_eq!(
            init.message.as_deref(),
            Some("containers with incomplete status: [init1 init2]")
        );
        let ics = s.init_container_statuses.as_ref().unwrap();
        assert_eq!(ics[0].name, "init1");
        assert_eq!(ics[1].name, "init2");
        assert_eq!(waiting_reason(&ics[1]), Some("PodInitializing"));
        assert_eq!(
            waiting_reason(&s.container_statuses.as_ref().unwrap()[0]),
            Some("PodInitializing")
        );

        let s = f.status(
            &p,
            &[
                inst("init1", 0, RuntimeState::Exited, 0),
                inst("init2", 1, RuntimeState::Exited, 0),
                inst("web", 2, RuntimeState::Running, 0),
            ],
        );
        assert_eq!(cond(&s, "Initialized").status, "True");
        assert_eq!(s.phase.as_deref(), Some("Running"));
        assert!(s.init_container_statuses.as_ref().unwrap()[0].ready);
    }

    #[test]
    fn a_failed_init_container_fails_a_never_restart_pod() {
        let p = pod(&["web"], &["init"], "Never");
        let s = Fixture::new().status(&p, &[inst("init", 0, RuntimeState::Exited, 1)]);
        assert_eq!(s.phase.as_deref(), Some("Failed"));
    }

    #[test]
    fn a_config_error_is_reported_as_create_container_config_error() {
        let p = pod(&["web"], &[], "Always");
        let mut f = Fixture::new();
        f.reasons.insert(
            "web".into(),
            WaitingReason {
                reason: reasons::CREATE_CONTAINER_CONFIG_ERROR.into(),
                message: "configmap \"cfg\" not found".into(),
            },
        );
        let s = f.status(&p, &[]);
        let w = s.container_statuses.as_ref().unwrap()[0]
            .state
            .as_ref()
            .unwrap()
            .waiting
            .clone()
            .unwrap();
        assert_eq!(w.reason.as_deref(), Some("CreateContainerConfigError"));
        assert_eq!(w.message.as_deref(), Some("configmap \"cfg\" not found"));
    }

    #[test]
    fn condition_transition_times_move_only_when_the_status_changes() {
        let mut p = pod(&["web"], &[], "Always");
        let f = Fixture::new();
        let running = [inst("web", 0, RuntimeState::Running, 0)];
        let first = f.status(&p, &running);
        p.status = Some(first.clone());
        let again = generate_pod_status(&StatusInput {
            pod: &p,
            containers: &running,
            pod_ips: &f.ips,
            host_ips: &f.host,
            reasons: &f.reasons,
            readiness: &f.readiness,
            startup: &f.startup,
            pod_is_terminal: false,
            now: ts(5000),
        });
        assert_eq!(
            cond(&again, "Ready").last_transition_time,
            Some(Time(ts(1000)))
        );
        assert_eq!(again.start_time, first.start_time);
    }

    #[test]
    fn a_terminal_phase_is_never_left() {
        let mut p = pod(&["a"], &[], "Never");
        p.status = Some(PodStatus {
            phase: Some("Succeeded".into()),
            ..Default::default()
        });
        let s = Fixture::new().status(&p, &[]);
        assert_eq!(s.phase.as_deref(), Some("Succeeded"));
    }

    #[test]
    fn readiness_gates_hold_ready_until_their_condition_is_true() {
        let mut p = pod(&["web"], &[], "Always");
        if let Some(spec) = p.spec.as_mut() {
            spec.readiness_gates = Some(vec![k8s_openapi::api::core::v1::PodReadinessGate {
                condition_type: "example.com/lb".into(),
            }]);
        }
        let s = Fixture::new().status(&p, &[inst("web", 0, RuntimeState::Running, 0)]);
        let ready = cond(&s, "Ready");
        assert_eq!(ready.status, "False");
        assert_eq!(ready.reason.as_deref(), Some("ReadinessGatesNotReady"));
        assert_eq!(cond(&s, "ContainersReady").status, "True");
    }
}
