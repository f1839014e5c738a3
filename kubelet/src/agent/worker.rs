//! One pod's worker: syncs the runtime towards the pod's spec whenever the pod changes, a probe result changes,
//! or a resync is due, and tears everything down when the pod is deleted.
//!
//! Ref: upstream `pod_workers.go` (`managePodLoop`), `kubelet.go` (`SyncPod`, `SyncTerminatingPod`,
//! `SyncTerminatedPod`), `kuberuntime_manager.go` (`SyncPod`: kill → sandbox → init container → containers) and
//! `kuberuntime_container.go` (`startContainer`, `killContainer`).

use std::collections::{HashMap, HashSet};
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::{Container, Pod, PodStatus};
use k8s_openapi::jiff::Timestamp;
use tokio::sync::{watch, Notify};
use tokio::time::Instant;
use windlass_runtime::image::{BundleOptions, ContainerProcessSpec, PullOptions};
use windlass_runtime::{ContainerConfig, SandboxConfig};

use super::exit_watch::{ExitWatches, Watched};
use super::runtime::{
    api_container_id, ContainerRecord, PodRuntime, PodView, RuntimeError, SandboxRecord,
};
use super::Shared;
use super::{api, host_network};
use crate::cni::RuntimeConf;
use crate::env::{self, MapSource, PodContext};
use crate::events::{self, reasons as ev, EventType};
use crate::lifecycle::{self, HookTarget, StopReason};
use crate::mounts::{self, MountSpec, PodFiles};
use crate::probes::{ContainerProbes, ExecRunner, NetProber, ProbeKind, ProbeStatus};
use crate::restart::{crash_loop_message, BackOff};
use crate::status::{self, latest, reasons, RuntimeState, StatusInput, WaitingReason};
use crate::sync::{compute_pod_actions, container_hash};
use crate::volumes::MountedVolume;
use crate::{dns, layout, pull, qos};

/// The safety resync of a pod when nothing wakes its worker: container and sandbox exits, pod changes and probe
/// results all wake it at once, so this only refreshes configMap/secret/downwardAPI volumes and catches what an
/// event could have missed. Upstream: `--sync-frequency` 1 min, jittered by up to half of it.
const RESYNC: Duration = Duration::from_secs(60);

/// How soon to look again after something failed (a container that could not start, a status patch the API
/// refused) or when an exit cannot be watched. Upstream's pod workers back off 10 s after a sync error; failures
/// here retry sooner so `ErrImagePull` → `ImagePullBackOff` and similar transitions show promptly.
const RETRY: Duration = Duration::from_secs(2);

/// The resync period for one pod: [`RESYNC`] plus up to half of it, spread by the pod's UID and the sync count, so
/// a hundred pods started together do not resync together (upstream `wait.Jitter(resyncInterval, 0.5)`).
fn jittered_resync(uid: &str, round: u64) -> Duration {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    (uid, round).hash(&mut h);
    let half = RESYNC.as_millis() as u64 / 2;
    RESYNC + Duration::from_millis(h.finish() % half.max(1))
}

/// Why the worker woke up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Wake {
    /// First sync, or the pod object changed: everything is refreshed.
    PodChanged,
    /// The periodic resync: volumes are refreshed too.
    Resync,
    /// A probe result or a container/sandbox exit: only the runtime state matters.
    RuntimeEvent,
}

/// Wall time of a sync's phases, logged at debug for syncs that did something (pod startup profiling).
struct Phases {
    start: Instant,
    last: Instant,
    marks: Vec<(&'static str, Duration)>,
}

impl Phases {
    fn new() -> Self {
        let now = Instant::now();
        Self {
            start: now,
            last: now,
            marks: Vec::new(),
        }
    }

    fn mark(&mut self, phase: &'static str) {
        let now = Instant::now();
        self.marks.push((phase, now - self.last));
        self.last = now;
    }

    fn log(&self, uid: &str) {
        let phases: Vec<String> = self
            .marks
            .iter()
            .map(|(p, d)| format!("{p}={:.1}ms", d.as_secs_f64() * 1000.0))
            .collect();
        tracing::debug!(
            pod = %uid,
            total_ms = format_args!("{:.1}", self.start.elapsed().as_secs_f64() * 1000.0),
            phases = %phases.join(" "),
            "sync timings"
        );
    }
}

/// Runs commands in a pod's containers for exec probes and hooks. Container IDs are the API's
/// (`windlass://<sandbox>/<container>`).
pub(crate) struct SandboxExec {
    rt: PodRuntime,
}

fn split_api_id(id: &str) -> Option<(String, String)> {
    let rest = id.strip_prefix("windlass://")?;
    let (sb, c) = rest.split_once('/')?;
    Some((sb.to_string(), c.to_string()))
}

impl ExecRunner for SandboxExec {
    async fn exec(
        &self,
        container_id: &str,
        cmd: &[String],
        timeout: Duration,
    ) -> Result<i32, String> {
        self.exec_output(container_id, cmd, timeout)
            .await
            .map(|(code, _)| code)
    }

    async fn exec_output(
        &self,
        container_id: &str,
        cmd: &[String],
        timeout: Duration,
    ) -> Result<(i32, String), String> {
        let (sb, cid) = split_api_id(container_id)
            .ok_or_else(|| format!("unknown container {container_id}"))?;
        let rt = self.rt.clone();
        let cmd = cmd.to_vec();
        let result =
            tokio::task::spawn_blocking(move || rt.sandboxes.exec_sync(&sb, &cid, &cmd, timeout))
                .await
                .map_err(|e| e.to_string())?
                .map_err(|e| e.to_string())?;
        if result.timed_out {
            return Err(format!("command timed out after {timeout:?}"));
        }
        // Upstream keeps at most 10 KiB of a probe's output.
        let mut output = result.stdout;
        output.extend_from_slice(&result.stderr);
        output.truncate(10 * 1024);
        Ok((
            result.exit_code,
            String::from_utf8_lossy(&output).into_owned(),
        ))
    }
}

/// Why a container could not be started this sync (shown as its waiting reason).
struct StartFailure {
    reason: &'static str,
    message: String,
}

impl StartFailure {
    fn new(reason: &'static str, message: impl Into<String>) -> Self {
        Self {
            reason,
            message: message.into(),
        }
    }
}

/// What a container start needs from the sync that decided it.
#[derive(Clone, Copy)]
struct StartContext<'a> {
    view: &'a PodView,
    sandbox_id: &'a str,
    files: &'a PodFiles,
    volumes: &'a [MountedVolume],
    /// The configMaps and secrets the pod references, read once per sync.
    source: &'a MapSource,
}

/// How a container start went.
enum Started {
    Yes,
    /// Crash-loop back-off: look again after this long.
    BackingOff(Duration),
    /// Not started (the reason is recorded for the status): retry soon.
    Failed,
}

/// The container instances that have exited and the sandboxes that are not ready.
fn ended(view: &PodView) -> HashSet<String> {
    view.containers
        .iter()
        .filter(|c| c.state == RuntimeState::Exited)
        .map(|c| c.id.clone())
        .chain(
            view.sandboxes
                .iter()
                .filter(|s| !s.ready)
                .map(|s| s.id.clone()),
        )
        .collect()
}

fn is_terminal(status: Option<&PodStatus>) -> bool {
    matches!(
        status.and_then(|s| s.phase.as_deref()),
        Some("Succeeded" | "Failed")
    )
}

/// The message of an `Unhealthy` event (upstream prober.go: `"%s probe failed: %s"`).
fn probe_failure_message(kind: ProbeKind, output: &str) -> String {
    let what = match kind {
        ProbeKind::Liveness => "Liveness",
        ProbeKind::Readiness => "Readiness",
        ProbeKind::Startup => "Startup",
    };
    format!("{what} probe failed: {output}")
}

pub(crate) struct PodWorker {
    shared: Arc<Shared>,
    uid: String,
    pod_rx: watch::Receiver<Option<Pod>>,
    exec: Arc<SandboxExec>,
    backoff: BackOff,
    image_backoff: BackOff,
    /// When each image's last pull failed (its back-off window starts there).
    image_backoff_since: HashMap<String, Instant>,
    /// Last start failure per container name.
    reasons: HashMap<String, WaitingReason>,
    /// Probe workers per running container instance (API container ID) → (container name, workers).
    probes: HashMap<String, (String, ContainerProbes)>,
    /// Woken by probe result changes and by container/sandbox exits.
    wake: Arc<Notify>,
    exits: ExitWatches,
    last_status: Option<PodStatus>,
    /// A static pod (from `--pod-manifest-path`): its status goes to its mirror pod, and nothing deletes it in
    /// the API when it is torn down.
    static_pod: bool,
    /// The UID of the API pod `last_status` was written to (a static pod's mirror can be re-created).
    last_status_target: Option<String>,
    /// Syncs so far (spreads the resync jitter).
    syncs: u64,
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, RuntimeError> + Send + 'static,
) -> Result<T, RuntimeError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| RuntimeError::Join(e.to_string()))?
}

fn pod_name(pod: &Pod) -> (&str, &str) {
    (
        pod.metadata.namespace.as_deref().unwrap_or("default"),
        pod.metadata.name.as_deref().unwrap_or_default(),
    )
}

/// A jiff timestamp in the past as a tokio instant (for back-off windows that start when a container exited).
fn instant_of(ts: Timestamp) -> Instant {
    let ago = Timestamp::now().duration_since(ts).unsigned_abs();
    Instant::now().checked_sub(ago).unwrap_or_else(Instant::now)
}

fn bind_mount(m: &MountSpec) -> serde_json::Value {
    let mut options = vec!["rbind".to_string(), m.propagation.to_string()];
    if m.read_only {
        options.push("ro".into());
    }
    serde_json::json!({
        "destination": m.destination,
        "type": "bind",
        "source": m.source,
        "options": options,
    })
}

/// Upstream's (containerd's) default capability set for containers.
const DEFAULT_CAPS: &[&str] = &[
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_FSETID",
    "CAP_FOWNER",
    "CAP_MKNOD",
    "CAP_NET_RAW",
    "CAP_SETGID",
    "CAP_SETUID",
    "CAP_SETFCAP",
    "CAP_SETPCAP",
    "CAP_NET_BIND_SERVICE",
    "CAP_SYS_CHROOT",
    "CAP_KILL",
    "CAP_AUDIT_WRITE",
];

fn capabilities(c: &Container) -> Vec<String> {
    let sc = c.security_context.as_ref();
    let mut caps: Vec<String> = DEFAULT_CAPS.iter().map(|s| s.to_string()).collect();
    let norm = |s: &str| {
        let up = s.to_uppercase();
        if up.starts_with("CAP_") {
            up
        } else {
            format!("CAP_{up}")
        }
    };
    if let Some(cs) = sc.and_then(|s| s.capabilities.as_ref()) {
        for d in cs.drop.iter().flatten() {
            if d.eq_ignore_ascii_case("ALL") {
                caps.clear();
            } else {
                let d = norm(d);
                caps.retain(|x| *x != d);
            }
        }
        for a in cs.add.iter().flatten() {
            let a = norm(a);
            if !caps.contains(&a) {
                caps.push(a);
            }
        }
    }
    caps
}

/// Applies the kubelet's parts of the container's OCI config to the bundle the image store wrote: mounts,
/// resources, capabilities, read-only root, the pod's shared PID namespace handled by the runtime.
fn edit_config(
    bundle: &std::path::Path,
    pod: &Pod,
    c: &Container,
    mounts: &[MountSpec],
) -> Result<(), StartFailure> {
    let path = bundle.join("config.json");
    let fail = |e: String| StartFailure::new(reasons::CREATE_CONTAINER_ERROR, e);
    let text = std::fs::read(&path).map_err(|e| fail(format!("{}: {e}", path.display())))?;
    let mut spec: serde_json::Value =
        serde_json::from_slice(&text).map_err(|e| fail(format!("{}: {e}", path.display())))?;
    // Kubelet mounts replace any default mount at the same destination (e.g. a volume at /dev/shm).
    let dests: Vec<&str> = mounts.iter().map(|m| m.destination.as_str()).collect();
    if let Some(list) = spec["mounts"].as_array_mut() {
        list.retain(|m| !dests.contains(&m["destination"].as_str().unwrap_or_default()));
        list.extend(mounts.iter().map(bind_mount));
    }
    let resources = qos::container_resources(c)
        .map_err(|e| StartFailure::new(reasons::CREATE_CONTAINER_CONFIG_ERROR, e.to_string()))?;
    spec["linux"]["resources"] =
        serde_json::to_value(&resources).map_err(|e| fail(e.to_string()))?;
    let sc = c.security_context.as_ref();
    let privileged = sc.and_then(|s| s.privileged).unwrap_or(false);
    let caps = if privileged {
        spec["process"]["capabilities"]["bounding"].clone()
    } else {
        serde_json::json!(capabilities(c))
    };
    if !privileged {
        for set in ["bounding", "effective", "permitted"] {
            spec["process"]["capabilities"][set] = caps.clone();
        }
    }
    if sc
        .and_then(|s| s.read_only_root_filesystem)
        .unwrap_or(false)
    {
        spec["root"]["readonly"] = true.into();
    }
    if sc.and_then(|s| s.allow_privilege_escalation) == Some(false) {
        spec["process"]["noNewPrivileges"] = true.into();
    }
    // A negative score needs CAP_SYS_RESOURCE, which some hosts lack: keep the inherited score there rather than
    // fail the pod (the qos module documents why).
    let oom = qos::container_oom_score_adj(pod, c, 0);
    if oom >= 0 {
        spec["process"]["oomScoreAdj"] = oom.into();
    }
    spec["process"]["terminal"] = c.tty.unwrap_or(false).into();
    let out = serde_json::to_vec_pretty(&spec).map_err(|e| fail(e.to_string()))?;
    std::fs::write(&path, out).map_err(|e| fail(format!("{}: {e}", path.display())))
}

impl PodWorker {
    pub(crate) fn new(
        shared: Arc<Shared>,
        uid: String,
        pod_rx: watch::Receiver<Option<Pod>>,
        static_pod: bool,
    ) -> Self {
        let exec = Arc::new(SandboxExec {
            rt: shared.rt.clone(),
        });
        Self {
            shared,
            uid,
            pod_rx,
            exec,
            backoff: BackOff::default(),
            image_backoff: BackOff::default(),
            image_backoff_since: HashMap::new(),
            reasons: HashMap::new(),
            probes: HashMap::new(),
            wake: Arc::new(Notify::new()),
            exits: ExitWatches::default(),
            last_status: None,
            static_pod,
            last_status_target: None,
            syncs: 0,
        }
    }

    /// The worker loop: returns once the pod is torn down.
    pub(crate) async fn run(mut self) {
        let mut next = Duration::ZERO;
        let mut first = true;
        loop {
            let mut why = Wake::PodChanged;
            if !first {
                let notify = self.wake.clone();
                why = tokio::select! {
                    changed = self.pod_rx.changed() => {
                        if changed.is_err() {
                            return; // the manager is gone (kubelet shutting down)
                        }
                        Wake::PodChanged
                    }
                    _ = tokio::time::sleep(next) => Wake::Resync,
                    _ = notify.notified() => Wake::RuntimeEvent,
                };
            }
            first = false;
            let pod = self.pod_rx.borrow_and_update().clone();
            // Sync and termination are boxed: their state machines are large, and an idle worker (most of them)
            // should only hold the small one that waits for the next wake-up.
            match pod {
                None => {
                    Box::pin(self.terminate(None)).await;
                    return;
                }
                Some(p) if p.metadata.deletion_timestamp.is_some() => {
                    Box::pin(self.terminate(Some(&p))).await;
                    // A static pod is not an API object (its mirror pod is the mirror manager's).
                    if self.static_pod {
                        return;
                    }
                    if let Err(e) = api::delete_pod(&self.shared.client, &p).await {
                        tracing::warn!(pod = %self.uid, error = %e, "final pod deletion failed");
                    }
                    return;
                }
                Some(p) => {
                    next = match Box::pin(self.sync(&p, why)).await {
                        Ok(d) => d,
                        Err(e) => {
                            tracing::warn!(pod = %self.uid, error = %e, "pod sync failed");
                            RETRY
                        }
                    };
                }
            }
        }
    }

    async fn view(&self) -> Result<PodView, RuntimeError> {
        let rt = self.shared.rt.clone();
        let uid = self.uid.clone();
        blocking(move || rt.pod_view(&uid)).await
    }

    fn pod_context(&self, pod_ips: &[String]) -> PodContext {
        PodContext {
            node_name: self.shared.cfg.node_name.clone(),
            host_ips: vec![self.shared.node_ip.clone()],
            pod_ips: pod_ips.to_vec(),
            node_allocatable: self
                .shared
                .allocatable
                .read()
                .map(|a| a.clone())
                .unwrap_or_default(),
        }
    }

    /// Probe workers for running containers that have probes; gone or stopped containers lose theirs.
    fn refresh_probes(&mut self, pod: &Pod, view: &PodView) {
        let running: HashMap<&str, &crate::status::RuntimeContainer> = view
            .containers
            .iter()
            .filter(|c| c.state == RuntimeState::Running)
            .map(|c| (c.id.as_str(), c))
            .collect();
        self.probes
            .retain(|id, _| running.contains_key(id.as_str()));
        let Some(spec) = &pod.spec else { return };
        let pod_ip: Option<IpAddr> = view.ips.first().and_then(|ip| ip.parse().ok());
        for (id, rc) in running {
            if self.probes.contains_key(id) {
                continue;
            }
            let Some(c) = spec.containers.iter().find(|c| c.name == rc.name) else {
                continue;
            };
            if c.liveness_probe.is_none()
                && c.readiness_probe.is_none()
                && c.startup_probe.is_none()
            {
                continue;
            }
            let Some(ip) = pod_ip else { continue };
            let prober = NetProber {
                pod_ip: ip,
                container_id: id.to_string(),
                ports: c.ports.clone().unwrap_or_default(),
                exec: self.exec.clone(),
            };
            let started = rc.started_at.map(instant_of).unwrap_or_else(Instant::now);
            // Every failed try is an `Unhealthy` Warning (upstream prober.go); the recorder aggregates repeats.
            let shared = self.shared.clone();
            let object = events::pod_ref(pod, Some(&c.name));
            let on_failure = move |kind: ProbeKind, output: &str| {
                shared.event(
                    &object,
                    EventType::Warning,
                    ev::UNHEALTHY,
                    &probe_failure_message(kind, output),
                );
            };
            let probes =
                ContainerProbes::spawn_with_events(c, Arc::new(prober), started, on_failure);
            let mut rx = probes.watch();
            let notify = self.wake.clone();
            tokio::spawn(async move {
                while rx.changed().await.is_ok() {
                    notify.notify_one();
                }
            });
            self.probes
                .insert(id.to_string(), (rc.name.clone(), probes));
        }
    }

    fn probe_statuses(&self, view: &PodView) -> HashMap<String, ProbeStatus> {
        let mut out = HashMap::new();
        for (id, (name, probes)) in &self.probes {
            // Only the newest instance of a container speaks for it.
            if latest(&view.containers, name).is_some_and(|c| &c.id == id) {
                out.insert(name.clone(), probes.status());
            }
        }
        out
    }

    /// One sync; returns when the next one is due at the latest.
    async fn sync(&mut self, pod: &Pod, why: Wake) -> Result<Duration, RuntimeError> {
        self.syncs += 1;
        let mut next = jittered_resync(&self.uid, self.syncs);
        let mut phases = Phases::new();
        let view = self.view().await?;
        phases.mark("view");
        // A pod that finished (phase Succeeded/Failed, which never changes back) keeps its API object until
        // deleted, but its sandbox stops and its IP is released at once (upstream `SyncTerminatedPod`). The
        // phase we patched last counts too: the watch does not wake the worker for its own status patches. A static
        // pod's own object stays Pending: its phase is the one this worker last wrote onto its mirror.
        let own_status = if self.static_pod {
            None
        } else {
            pod.status.as_ref()
        };
        if is_terminal(own_status) || is_terminal(self.last_status.as_ref()) {
            self.exits.clear();
            let view = if view.sandboxes.iter().any(|s| s.ready) {
                self.kill_pod(Some(pod), &view, StopReason::Other).await;
                self.view().await?
            } else {
                view
            };
            self.update_status(pod, &view, true).await;
            return Ok(RESYNC * 5);
        }
        self.refresh_probes(pod, &view);
        // What had ended when the actions were computed: an exit during this sync needs another look.
        let ended_before: HashSet<String> = ended(&view);
        let probe_status = self.probe_statuses(&view);
        let actions = compute_pod_actions(pod, &view.sandboxes, &view.containers, &probe_status);
        tracing::debug!(pod = %self.uid, ?actions, "sync");
        // Whether the runtime state changed in this sync (then it is read again before the status).
        let mut changed = actions.kill_pod || !actions.containers_to_kill.is_empty();

        if actions.kill_pod {
            self.kill_pod(Some(pod), &view, StopReason::Other).await;
        } else {
            for (id, why) in &actions.containers_to_kill {
                let reason = if why.message.contains("liveness") {
                    StopReason::LivenessProbe
                } else if why.message.contains("startup") {
                    StopReason::StartupProbe
                } else {
                    StopReason::Other
                };
                // Upstream's killContainer message: why it is killed ("Container web failed liveness probe,
                // will be restarted"), else "Stopping container web".
                self.shared.event(
                    &events::pod_ref(pod, Some(&why.name)),
                    EventType::Normal,
                    ev::KILLING,
                    if why.message.is_empty() {
                        format!("Stopping container {}", why.name)
                    } else {
                        why.message.clone()
                    }
                    .as_str(),
                );
                self.probes.remove(id);
                self.kill_container(Some(pod), &view, id, reason).await;
            }
        }

        let sandbox_id = if actions.create_sandbox {
            changed = true;
            let created = self.create_sandbox(pod, actions.attempt, &mut phases).await;
            match created {
                Ok(id) => Some(id),
                Err(e) => {
                    next = next.min(RETRY);
                    self.shared.event(
                        &events::pod_ref(pod, None),
                        EventType::Warning,
                        ev::FAILED_CREATE_POD_SANDBOX,
                        &format!("Failed to create pod sandbox: {e}"),
                    );
                    None
                }
            }
        } else if actions.kill_pod {
            None
        } else {
            actions.sandbox_id.clone()
        };

        if let Some(sandbox_id) = sandbox_id {
            let view = if actions.create_sandbox {
                let v = self.view().await?;
                phases.mark("view");
                v
            } else {
                view.clone()
            };
            let to_start: Vec<(Container, bool)> = match actions.next_init_container {
                Some(i) => pod
                    .spec
                    .as_ref()
                    .and_then(|s| s.init_containers.as_ref())
                    .and_then(|ics| ics.get(i))
                    .map(|c| vec![(c.clone(), true)])
                    .unwrap_or_default(),
                None => actions
                    .containers_to_start
                    .iter()
                    .filter_map(|&i| pod.spec.as_ref()?.containers.get(i).cloned())
                    .map(|c| (c, false))
                    .collect(),
            };
            // Volumes and pod files are refreshed when containers start, when the pod changed and on the periodic
            // resync (configMap/secret/downwardAPI volumes follow their sources, as upstream's do on its sync
            // period); a probe result or an exit alone does not rewrite them.
            let prepare = !to_start.is_empty() || why != Wake::RuntimeEvent;
            match if prepare {
                Some(self.prepare_pod(pod, &view.ips).await)
            } else {
                None
            } {
                None => {}
                Some(Ok((files, volumes, source))) => {
                    phases.mark("prepare");
                    for (c, init) in to_start {
                        changed = true;
                        let ctx = StartContext {
                            view: &view,
                            sandbox_id: &sandbox_id,
                            files: &files,
                            volumes: &volumes,
                            source: &source,
                        };
                        match self.start_container(pod, &ctx, &c, init, &mut phases).await {
                            Started::Yes => {}
                            Started::BackingOff(wait) => next = next.min(wait),
                            Started::Failed => next = next.min(RETRY),
                        }
                    }
                }
                Some(Err(f)) => {
                    next = next.min(RETRY);
                    self.shared.event(
                        &events::pod_ref(pod, None),
                        EventType::Warning,
                        ev::FAILED_MOUNT,
                        &f.message,
                    );
                    for c in pod.spec.iter().flat_map(|s| s.containers.iter()) {
                        self.reasons.insert(
                            c.name.clone(),
                            WaitingReason {
                                reason: f.reason.into(),
                                message: f.message.clone(),
                            },
                        );
                    }
                }
            }
        }

        let view = if changed {
            let v = self.view().await?;
            phases.mark("view");
            v
        } else {
            view
        };
        self.refresh_probes(pod, &view);
        if !self.refresh_exit_watches(&view).await {
            next = next.min(RETRY);
        }
        if ended(&view).difference(&ended_before).next().is_some() {
            // A container or sandbox ended while this sync ran (a container that exits at once ends before its
            // watch exists): sync again now, as upstream's PLEG would report the change.
            next = Duration::ZERO;
        }
        if !self.update_status(pod, &view, false).await {
            next = next.min(RETRY);
        }
        phases.mark("status");
        if changed {
            phases.log(&self.uid);
        }
        // A projected service-account token due for rotation: resync (which rewrites the volumes) by then, not a
        // safety-resync period later; no sooner than RETRY while a refresh keeps failing.
        if let Some(due) = self.shared.tokens.next_refresh(&self.uid) {
            next = next.min(due.max(RETRY));
        }
        if is_terminal(self.last_status.as_ref()) {
            // Finished just now: stop the sandbox and release the IP at once (the next round's terminal branch).
            next = Duration::ZERO;
        }
        Ok(next)
    }

    /// Keeps one exit watch per running container and ready sandbox, so their end wakes this worker; false when
    /// some cannot be watched (then the worker polls at [`RETRY`]).
    async fn refresh_exit_watches(&mut self, view: &PodView) -> bool {
        let mut wanted: HashSet<Watched> = view
            .containers
            .iter()
            .filter(|c| matches!(c.state, RuntimeState::Running | RuntimeState::Created))
            .map(|c| Watched::Container(c.id.clone()))
            .collect();
        wanted.extend(
            view.sandboxes
                .iter()
                .filter(|s| s.ready)
                .map(|s| Watched::Sandbox(s.id.clone())),
        );
        let missing = self.exits.keep_only(&wanted);
        if missing.is_empty() {
            return true;
        }
        let rt = self.shared.rt.clone();
        let locations = view.locations.clone();
        let opened = blocking(move || {
            Ok(missing
                .into_iter()
                .map(|w| {
                    let fd = match &w {
                        Watched::Container(api_id) => match locations.get(api_id) {
                            Some((sb, cid)) => rt.sandboxes.container_exit_fd(sb, cid),
                            None => Ok(None),
                        },
                        Watched::Sandbox(id) => rt.sandboxes.sandbox_exit_fd(id),
                    };
                    (w, fd)
                })
                .collect::<Vec<_>>())
        })
        .await
        .unwrap_or_default();
        let mut all = true;
        for (what, fd) in opened {
            match fd {
                Ok(Some(fd)) => {
                    if let Err(e) = self.exits.watch(what, fd, self.wake.clone()) {
                        tracing::debug!(pod = %self.uid, error = %e, "cannot watch for an exit");
                        all = false;
                    }
                }
                // Ended already (the next sync sees it) or no shim to watch: poll.
                Ok(None) | Err(_) => all = false,
            }
        }
        all
    }

    /// Pod files (`/etc/hosts`, resolv.conf, hostname) and volumes, refreshed every sync (configMap and
    /// secret volumes follow their objects).
    async fn prepare_pod(
        &self,
        pod: &Pod,
        ips: &[String],
    ) -> Result<(PodFiles, Vec<MountedVolume>, MapSource), StartFailure> {
        let source = api::config_source(&self.shared.client, pod)
            .await
            .map_err(|e| {
                StartFailure::new(reasons::CREATE_CONTAINER_CONFIG_ERROR, e.to_string())
            })?;
        // Token requests that fail surface when the volume is set up (with the projection's error).
        let tokens = self.shared.tokens.for_pod(&self.shared.client, pod).await;
        let pod_dir = self.shared.rt.pod_dir(&self.uid);
        let hosts = dns::hosts_file(
            pod,
            ips,
            &self.shared.cfg.cluster_domain,
            &self.shared.node_hosts,
        );
        let resolv = dns::pod_resolv_conf(pod, &self.shared.dns).render();
        let hostname = if host_network::enabled(pod) {
            format!("{}\n", host_network::hostname(&self.shared.cfg.node_name))
        } else {
            dns::hostname_file(pod, &self.shared.cfg.cluster_domain)
        };
        let ctx = self.pod_context(ips);
        let volumes = self.shared.volumes.clone();
        let pod = pod.clone();
        let result = tokio::task::spawn_blocking(move || {
            // Rewritten only when the content changes: containers bind-mount these files, and a rename would
            // leave them looking at the old inode anyway.
            let current = PodFiles {
                hosts: pod_dir.join("etc-hosts"),
                resolv_conf: pod_dir.join("resolv.conf"),
                hostname: pod_dir.join("hostname"),
            };
            let same = |p: &std::path::Path, want: &str| {
                std::fs::read_to_string(p).is_ok_and(|have| have == want)
            };
            let files = if same(&current.hosts, &hosts)
                && same(&current.resolv_conf, &resolv)
                && same(&current.hostname, &hostname)
            {
                current
            } else {
                mounts::write_pod_files(&pod_dir, &hosts, &resolv, &hostname).map_err(|e| {
                    StartFailure::new(reasons::CREATE_CONTAINER_CONFIG_ERROR, e.to_string())
                })?
            };
            let vols = volumes.setup(&pod, &ctx, &source, &tokens).map_err(|e| {
                StartFailure::new(reasons::CREATE_CONTAINER_CONFIG_ERROR, e.to_string())
            })?;
            Ok((files, vols, source))
        })
        .await
        .map_err(|e| StartFailure::new(reasons::CREATE_CONTAINER_ERROR, e.to_string()))?;
        result
    }

    /// Creates the sandbox (pod cgroup, namespaces) and attaches it to the pod network through CNI; undone on
    /// failure. Returns its ID.
    async fn create_sandbox(
        &mut self,
        pod: &Pod,
        attempt: u32,
        phases: &mut Phases,
    ) -> Result<String, String> {
        let (ns, name) = pod_name(pod);
        let id = layout::sandbox_id(&self.uid, attempt);
        let qos_class = qos::pod_qos(pod);
        let spec = pod.spec.clone().unwrap_or_default();
        let labels = HashMap::from([
            (layout::LABEL_POD_NAME.to_string(), name.to_string()),
            (layout::LABEL_POD_NAMESPACE.to_string(), ns.to_string()),
            (layout::LABEL_POD_UID.to_string(), self.uid.clone()),
            (
                layout::LABEL_SANDBOX_ATTEMPT.to_string(),
                attempt.to_string(),
            ),
        ]);
        let sysctls: HashMap<String, String> = spec
            .security_context
            .as_ref()
            .and_then(|s| s.sysctls.clone())
            .unwrap_or_default()
            .into_iter()
            .map(|s| (s.name, s.value))
            .collect();
        let host_net = host_network::enabled(pod);
        let cfg = SandboxConfig {
            id: id.clone(),
            hostname: if host_net {
                host_network::hostname(&self.shared.cfg.node_name)
            } else {
                dns::hostname_and_domain(pod, &self.shared.cfg.cluster_domain).0
            },
            cgroup_parent: qos::pod_cgroup(&self.shared.cfg.cgroup_root, qos_class, &self.uid),
            resources: qos::pod_resources(pod).ok(),
            share_pid: spec.share_process_namespace.unwrap_or(false),
            sysctls,
            labels,
            annotations: HashMap::new(),
            host_network: host_net,
        };
        let rt = self.shared.rt.clone();
        let info = blocking(move || Ok(rt.sandboxes.create_sandbox(&cfg)?))
            .await
            .map_err(|e| e.to_string())?;
        phases.mark("sandbox");
        if host_net {
            // The node's network: no CNI, and the pod's IPs are the node's (upstream: podIPs = hostIPs).
            let record = SandboxRecord {
                ips: host_network::pod_ips(&self.shared.node_ip),
            };
            let rt = self.shared.rt.clone();
            let (uid, sid) = (self.uid.clone(), id.clone());
            if let Err(e) = blocking(move || rt.write_sandbox_record(&uid, &sid, &record)).await {
                let rt = self.shared.rt.clone();
                let (uid, sid) = (self.uid.clone(), id.clone());
                let _ = blocking(move || Ok(rt.remove_sandbox(&uid, &sid))).await;
                return Err(e.to_string());
            }
            tracing::info!(pod = %self.uid, sandbox = %id, "host-network sandbox ready");
            return Ok(id);
        }
        let net = self
            .shared
            .cni
            .network()
            .map_err(|e| format!("network plugin not ready: {e}"));
        let resolv = dns::pod_resolv_conf(pod, &self.shared.dns);
        let attached = match net {
            Ok(net) => {
                let rc = RuntimeConf::for_pod(pod, &id, &info.netns_path, Some(&resolv));
                self.shared
                    .cni
                    .add(&net, &rc)
                    .await
                    .map_err(|e| e.to_string())
            }
            Err(e) => Err(e),
        };
        phases.mark("cni_add");
        let result = match attached {
            Ok(r) => r,
            Err(e) => {
                let rt = self.shared.rt.clone();
                let (uid, sid) = (self.uid.clone(), id.clone());
                let _ = blocking(move || Ok(rt.remove_sandbox(&uid, &sid))).await;
                return Err(e);
            }
        };
        let ips: Vec<String> = result
            .ips_for("eth0")
            .iter()
            .map(ToString::to_string)
            .collect();
        let rt = self.shared.rt.clone();
        let (uid, sid) = (self.uid.clone(), id.clone());
        blocking(move || rt.write_sandbox_record(&uid, &sid, &SandboxRecord { ips }))
            .await
            .map_err(|e| e.to_string())?;
        tracing::info!(pod = %self.uid, sandbox = %id, "sandbox ready");
        Ok(id)
    }

    /// Makes sure the container's image is in the store per its pull policy; the image's digest reference.
    async fn ensure_image(&mut self, pod: &Pod, c: &Container) -> Result<String, StartFailure> {
        let image = c.image.clone().unwrap_or_default();
        let store = self.shared.rt.images.clone();
        let img = image.clone();
        let present = tokio::task::spawn_blocking(move || store.get(&img).ok())
            .await
            .ok()
            .flatten();
        let must_pull =
            pull::should_pull(&image, c.image_pull_policy.as_deref(), present.is_some())
                .map_err(|m| StartFailure::new(reasons::ERR_IMAGE_NEVER_PULL, m))?;
        if !must_pull {
            if let Some(r) = present {
                return Ok(r.repo_digest());
            }
        }
        let key = format!("{}_{image}", self.uid);
        if let Some(at) = self.image_backoff_since.get(&key) {
            if self.image_backoff.remaining(&key, *at).is_some() {
                return Err(StartFailure::new(
                    reasons::IMAGE_PULL_BACK_OFF,
                    pull::image_pull_back_off_message(&image),
                ));
            }
        }
        let container_ref = events::pod_ref(pod, Some(&c.name));
        self.shared.event(
            &container_ref,
            EventType::Normal,
            ev::PULLING,
            &format!("Pulling image \"{image}\""),
        );
        let opts = PullOptions {
            insecure_registries: self.shared.cfg.insecure_registries.clone(),
            credentials: api::pull_credentials(&self.shared.client, pod).await,
            ..Default::default()
        };
        let started = std::time::Instant::now();
        match self.shared.rt.images.pull(&image, &opts).await {
            Ok(outcome) => {
                self.image_backoff.forget(&key);
                self.image_backoff_since.remove(&key);
                self.shared.event(
                    &container_ref,
                    EventType::Normal,
                    ev::PULLED,
                    &format!(
                        "Successfully pulled image \"{image}\" in {:.3}s",
                        started.elapsed().as_secs_f64()
                    ),
                );
                Ok(outcome.record.repo_digest())
            }
            Err(e) => {
                self.image_backoff.next(&key);
                self.image_backoff_since.insert(key, Instant::now());
                let message = format!("Failed to pull image \"{image}\": {e}");
                self.shared
                    .event(&container_ref, EventType::Warning, ev::FAILED, &message);
                Err(StartFailure::new(reasons::ERR_IMAGE_PULL, message))
            }
        }
    }

    /// Starts one container unless it is backing off.
    async fn start_container(
        &mut self,
        pod: &Pod,
        ctx: &StartContext<'_>,
        c: &Container,
        init: bool,
        phases: &mut Phases,
    ) -> Started {
        let view = ctx.view;
        let (ns, name) = pod_name(pod);
        let key = BackOff::key(name, ns, &self.uid, &c.name);
        let previous = latest(&view.containers, &c.name);
        if let Some(prev) = previous.filter(|p| p.state == RuntimeState::Exited) {
            let finished = prev
                .finished_at
                .map(instant_of)
                .unwrap_or_else(Instant::now);
            if let Some(wait) = self.backoff.remaining(&key, finished) {
                let delay = self.backoff.current(&key).unwrap_or(wait);
                let message = crash_loop_message(delay, &c.name, name, ns, &self.uid);
                self.shared.event(
                    &events::pod_ref(pod, Some(&c.name)),
                    EventType::Warning,
                    ev::BACK_OFF,
                    "Back-off restarting failed container",
                );
                self.reasons.insert(
                    c.name.clone(),
                    WaitingReason {
                        reason: reasons::CRASH_LOOP_BACK_OFF.into(),
                        message,
                    },
                );
                return Started::BackingOff(wait);
            }
            self.backoff.next(&key);
        }
        let restart = previous.map(|p| p.restart_count + 1).unwrap_or(0).max(0) as u32;
        match self
            .create_and_start(pod, ctx, c, init, restart, phases)
            .await
        {
            Ok(()) => {
                self.reasons.remove(&c.name);
                Started::Yes
            }
            Err(f) => {
                let backing_off = f.reason == reasons::IMAGE_PULL_BACK_OFF;
                if !backing_off {
                    tracing::warn!(pod = %self.uid, container = %c.name, reason = f.reason, error = %f.message, "container not started");
                }
                if f.reason != reasons::ERR_IMAGE_PULL && !backing_off {
                    self.shared.event(
                        &events::pod_ref(pod, Some(&c.name)),
                        EventType::Warning,
                        ev::FAILED,
                        &format!("Error: {}", f.message),
                    );
                }
                self.reasons.insert(
                    c.name.clone(),
                    WaitingReason {
                        reason: f.reason.into(),
                        message: f.message,
                    },
                );
                Started::Failed
            }
        }
    }

    async fn create_and_start(
        &mut self,
        pod: &Pod,
        start: &StartContext<'_>,
        c: &Container,
        init: bool,
        restart: u32,
        phases: &mut Phases,
    ) -> Result<(), StartFailure> {
        let StartContext {
            view,
            sandbox_id,
            files,
            volumes,
            source,
        } = *start;
        let (ns, name) = pod_name(pod);
        let image_ref = self.ensure_image(pod, c).await?;
        phases.mark("image");
        let image = c.image.clone().unwrap_or_default();
        let cid = layout::container_id(&c.name, restart);
        let ctx = self.pod_context(&view.ips);
        let services = self.shared.services().await;
        phases.mark("services");
        let enable_links = pod
            .spec
            .as_ref()
            .and_then(|s| s.enable_service_links)
            .unwrap_or(true);
        let service_env = env::service_env(&services, ns, enable_links);
        let resolved = env::container_env(pod, c, &ctx, source, &service_env).map_err(|e| {
            StartFailure::new(reasons::CREATE_CONTAINER_CONFIG_ERROR, e.to_string())
        })?;
        if !resolved.invalid_keys.is_empty() {
            self.shared.event(
                &events::pod_ref(pod, Some(&c.name)),
                EventType::Warning,
                ev::INVALID_ENV_VAR_NAMES,
                &format!(
                    "Keys [{}] from the EnvFrom were skipped since they are invalid environment variable names.",
                    resolved.invalid_keys.join(", ")
                ),
            );
        }
        let pod_sc = pod.spec.as_ref().and_then(|s| s.security_context.as_ref());
        let sc = c.security_context.as_ref();
        let to_u32 = |v: Option<i64>| v.and_then(|v| u32::try_from(v).ok());
        let process = ContainerProcessSpec {
            command: c.command.clone().unwrap_or_default(),
            args: c.args.clone().unwrap_or_default(),
            env: resolved.env.vars().to_vec(),
            working_dir: c.working_dir.clone(),
            run_as_user: to_u32(
                sc.and_then(|s| s.run_as_user)
                    .or(pod_sc.and_then(|s| s.run_as_user)),
            ),
            run_as_group: to_u32(
                sc.and_then(|s| s.run_as_group)
                    .or(pod_sc.and_then(|s| s.run_as_group)),
            ),
        };
        let pod_dir = self.shared.rt.pod_dir(&self.uid);
        let mut mounts =
            mounts::container_mounts(c, volumes, &resolved.env, Some(files)).map_err(|e| {
                StartFailure::new(reasons::CREATE_CONTAINER_CONFIG_ERROR, e.to_string())
            })?;
        let term = mounts::termination_log_mount(&pod_dir, c, &cid)
            .map_err(|e| StartFailure::new(reasons::CREATE_CONTAINER_ERROR, e.to_string()))?;
        mounts.push(term);
        let root = self.shared.cfg.root_dir.clone();
        let log_path = layout::container_log_path(&root, ns, name, &self.uid, &c.name, restart);
        let rt = self.shared.rt.clone();
        let bundle = rt.bundle_dir(&self.uid, sandbox_id, &cid);
        let record = ContainerRecord {
            hash: container_hash(c),
            image: image.clone(),
            image_ref,
            started_at: String::new(),
            init,
        };
        let (uid, sid, cid2, pod2, c2) = (
            self.uid.clone(),
            sandbox_id.to_string(),
            cid.clone(),
            pod.clone(),
            c.clone(),
        );
        let created = tokio::task::spawn_blocking(move || -> Result<(), StartFailure> {
            let create_err = |m: String| StartFailure::new(reasons::CREATE_CONTAINER_ERROR, m);
            if let Some(parent) = log_path.parent() {
                std::fs::create_dir_all(parent)
                    .map_err(|e| create_err(format!("{}: {e}", parent.display())))?;
            }
            std::fs::create_dir_all(&bundle)
                .map_err(|e| create_err(format!("{}: {e}", bundle.display())))?;
            let lease = PodRuntime::lease_id(&sid, &cid2);
            let options = BundleOptions {
                container: process,
                network_namespace: None,
                hostname: None,
            };
            rt.images
                .create_bundle(&image, &lease, &bundle, &options)
                .map_err(|e| create_err(e.to_string()))?;
            let undo = |rt: &PodRuntime| {
                let _ = rt.images.remove_bundle(&lease, &bundle);
                let _ = rt.images.release(&lease);
                let _ = std::fs::remove_dir_all(&bundle);
            };
            if let Err(f) = edit_config(&bundle, &pod2, &c2, &mounts) {
                undo(&rt);
                return Err(f);
            }
            rt.write_container_record(&uid, &sid, &cid2, &record)
                .map_err(|e| create_err(e.to_string()))?;
            let cfg = ContainerConfig {
                id: cid2.clone(),
                bundle: bundle.clone(),
                log_path,
            };
            if let Err(e) = rt.sandboxes.create_container(&sid, &cfg) {
                undo(&rt);
                return Err(create_err(e.to_string()));
            }
            Ok(())
        })
        .await
        .map_err(|e| StartFailure::new(reasons::CREATE_CONTAINER_ERROR, e.to_string()))?;
        created?;
        phases.mark("create");
        let cref = events::pod_ref(pod, Some(&c.name));
        self.shared.event(
            &cref,
            EventType::Normal,
            ev::CREATED,
            &format!("Created container: {}", c.name),
        );
        let rt = self.shared.rt.clone();
        let (uid, sid, cid2) = (self.uid.clone(), sandbox_id.to_string(), cid.clone());
        let started = tokio::task::spawn_blocking(move || -> Result<(), String> {
            let now = Timestamp::now().to_string();
            rt.sandboxes
                .start_container(&sid, &cid2)
                .map_err(|e| e.to_string())?;
            let mut record = rt
                .container_record(&uid, &sid, &cid2)
                .ok()
                .flatten()
                .unwrap_or_default();
            record.started_at = now;
            rt.write_container_record(&uid, &sid, &cid2, &record)
                .map_err(|e| e.to_string())
        })
        .await
        .map_err(|e| StartFailure::new(reasons::RUN_CONTAINER_ERROR, e.to_string()))?;
        if let Err(e) = started {
            // A container that never ran is removed, so the next attempt starts clean.
            let rt = self.shared.rt.clone();
            let (uid, sid, cid2) = (self.uid.clone(), sandbox_id.to_string(), cid.clone());
            let _ = blocking(move || rt.remove_container(&uid, &sid, &cid2)).await;
            return Err(StartFailure::new(reasons::RUN_CONTAINER_ERROR, e));
        }
        phases.mark("start");
        self.shared.event(
            &cref,
            EventType::Normal,
            ev::STARTED,
            &format!("Started container {}", c.name),
        );
        tracing::info!(pod = %self.uid, container = %c.name, restart, "container started");
        self.remove_old_instances(view, &c.name, restart).await;
        if let Some(handler) = c.lifecycle.as_ref().and_then(|l| l.post_start.as_ref()) {
            if let Some(ip) = view.ips.first().and_then(|ip| ip.parse().ok()) {
                let target = HookTarget {
                    pod_ip: ip,
                    container_id: api_container_id(sandbox_id, &cid),
                    container: c.clone(),
                    exec: self.exec.clone(),
                };
                let grace = lifecycle::grace_period(pod, c, StopReason::Other);
                if let Err(msg) = lifecycle::run_hook(handler, &target, grace).await {
                    self.shared
                        .event(&cref, EventType::Warning, ev::FAILED_POST_START_HOOK, &msg);
                    // Upstream kills a container whose postStart hook failed.
                    let rt = self.shared.rt.clone();
                    let sid = sandbox_id.to_string();
                    let _ = blocking(move || rt.stop_container(&sid, &cid, grace)).await;
                    return Err(StartFailure::new("PostStartHookError", msg));
                }
            }
        }
        Ok(())
    }

    /// Keeps the new instance and the one before it (for `kubectl logs --previous`); older ones go.
    async fn remove_old_instances(&self, view: &PodView, name: &str, restart: u32) {
        let old: Vec<(String, String)> = view
            .containers
            .iter()
            .filter(|c| {
                c.name == name && c.restart_count >= 0 && (c.restart_count as u32) + 1 < restart
            })
            .filter(|c| c.state == RuntimeState::Exited)
            .filter_map(|c| view.locations.get(&c.id).cloned())
            .collect();
        if old.is_empty() {
            return;
        }
        let rt = self.shared.rt.clone();
        let uid = self.uid.clone();
        let _ = blocking(move || {
            for (sb, cid) in old {
                if let Err(e) = rt.remove_container(&uid, &sb, &cid) {
                    tracing::warn!(container = %cid, error = %e, "removing an old container instance failed");
                }
            }
            Ok(())
        })
        .await;
    }

    /// Stops one container instance: preStop hook, then the stop signal with what is left of the grace period.
    async fn kill_container(
        &self,
        pod: Option<&Pod>,
        view: &PodView,
        api_id: &str,
        reason: StopReason,
    ) {
        let Some((sb, cid)) = view.locations.get(api_id).cloned() else {
            return;
        };
        let name = layout::parse_container_id(&cid)
            .map(|(n, _)| n.to_string())
            .unwrap_or_default();
        let spec = pod.and_then(|p| {
            p.spec.as_ref().and_then(|s| {
                s.containers
                    .iter()
                    .chain(s.init_containers.iter().flatten())
                    .find(|c| c.name == name)
                    .cloned()
            })
        });
        let mut grace = Duration::from_secs(2);
        if let (Some(pod), Some(c)) = (pod, spec.as_ref()) {
            grace = lifecycle::grace_period(pod, c, reason);
            if let Some(ip) = view.ips.first().and_then(|ip| ip.parse().ok()) {
                let target = HookTarget {
                    pod_ip: ip,
                    container_id: api_id.to_string(),
                    container: c.clone(),
                    exec: self.exec.clone(),
                };
                let (left, err) = lifecycle::pre_stop(&target, grace).await;
                if let Some(msg) = err {
                    self.shared.event(
                        &events::pod_ref(pod, Some(&c.name)),
                        EventType::Warning,
                        ev::FAILED_PRE_STOP_HOOK,
                        &msg,
                    );
                }
                grace = left;
            }
        }
        let rt = self.shared.rt.clone();
        if let Err(e) = blocking(move || rt.stop_container(&sb, &cid, grace)).await {
            tracing::warn!(pod = %self.uid, container = %name, error = %e, "stopping container failed");
        }
    }

    /// Stops every running container (in parallel, each with its grace period) and every sandbox, and detaches
    /// the sandboxes from the network. Sandboxes stay on disk (their containers' statuses count restarts).
    async fn kill_pod(&mut self, pod: Option<&Pod>, view: &PodView, reason: StopReason) {
        let running: Vec<String> = view
            .containers
            .iter()
            .filter(|c| matches!(c.state, RuntimeState::Running | RuntimeState::Created))
            .map(|c| c.id.clone())
            .collect();
        if let Some(p) = pod {
            for id in &running {
                if let Some((_, cid)) = view.locations.get(id) {
                    if let Some((name, _)) = layout::parse_container_id(cid) {
                        self.shared.event(
                            &events::pod_ref(p, Some(name)),
                            EventType::Normal,
                            ev::KILLING,
                            &format!("Stopping container {name}"),
                        );
                    }
                }
            }
        }
        // Stop containers concurrently so their grace periods overlap, as upstream's killContainersWithSyncResult.
        futures_util::future::join_all(
            running
                .iter()
                .map(|id| self.kill_container(pod, view, id, reason)),
        )
        .await;
        self.probes.clear();
        for sb in view.sandboxes.iter().filter(|s| s.ready) {
            if !sb.host_network {
                self.detach_network(pod, &sb.id).await;
            }
            let rt = self.shared.rt.clone();
            let id = sb.id.clone();
            if let Err(e) =
                blocking(move || Ok(rt.sandboxes.stop_sandbox(&id, Duration::ZERO)?)).await
            {
                tracing::warn!(pod = %self.uid, sandbox = %sb.id, error = %e, "stopping sandbox failed");
            }
        }
    }

    /// CNI DEL for a sandbox (idempotent; a missing network config is logged).
    async fn detach_network(&self, pod: Option<&Pod>, sandbox_id: &str) {
        let net = match self.shared.cni.network() {
            Ok(n) => n,
            Err(e) => {
                tracing::warn!(pod = %self.uid, error = %e, "no CNI network to detach from");
                return;
            }
        };
        let netns: PathBuf = crate::layout::sandboxes_dir(&self.shared.cfg.root_dir)
            .join(sandbox_id)
            .join("netns");
        let fallback = Pod {
            metadata: k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta {
                uid: Some(self.uid.clone()),
                ..Default::default()
            },
            ..Default::default()
        };
        let rc = RuntimeConf::for_pod(pod.unwrap_or(&fallback), sandbox_id, &netns, None);
        if let Err(e) = self.shared.cni.del(&net, &rc).await {
            tracing::warn!(pod = %self.uid, sandbox = %sandbox_id, error = %e, "CNI DEL failed");
        }
    }

    /// Tears the pod down completely: containers (with their grace periods), network, sandboxes, bundles and
    /// image leases, volumes, the pod directory and logs.
    async fn terminate(&mut self, pod: Option<&Pod>) {
        let view = match self.view().await {
            Ok(v) => v,
            Err(e) => {
                tracing::warn!(pod = %self.uid, error = %e, "cannot read the pod's runtime state");
                return;
            }
        };
        if !view.sandboxes.is_empty() {
            tracing::info!(pod = %self.uid, "terminating pod");
        }
        self.kill_pod(pod, &view, StopReason::PodTermination).await;
        // Names for the log directory: from the pod, else from the sandbox labels.
        let rt = self.shared.rt.clone();
        let uid = self.uid.clone();
        let labels = blocking({
            let rt = rt.clone();
            let uid = uid.clone();
            move || rt.pod_sandboxes(&uid)
        })
        .await
        .unwrap_or_default();
        let names = pod
            .map(|p| {
                let (ns, n) = pod_name(p);
                (ns.to_string(), n.to_string())
            })
            .or_else(|| {
                labels.first().map(|sb| {
                    (
                        sb.labels
                            .get(layout::LABEL_POD_NAMESPACE)
                            .cloned()
                            .unwrap_or_default(),
                        sb.labels
                            .get(layout::LABEL_POD_NAME)
                            .cloned()
                            .unwrap_or_default(),
                    )
                })
            });
        // Sandboxes that were not ready were not detached by kill_pod.
        // Host-network sandboxes never had a CNI attachment: the node's network is not touched.
        for sb in view
            .sandboxes
            .iter()
            .filter(|s| !s.ready && !s.host_network)
        {
            self.detach_network(pod, &sb.id).await;
        }
        let volumes = self.shared.volumes.clone();
        let root = self.shared.cfg.root_dir.clone();
        let ids: Vec<String> = labels.iter().map(|s| s.id.clone()).collect();
        let result = blocking(move || {
            let mut errors = Vec::new();
            for id in ids {
                errors.extend(rt.remove_sandbox(&uid, &id));
            }
            if let Err(e) = volumes.teardown(&uid) {
                errors.push(e.to_string());
            }
            let pod_dir = rt.pod_dir(&uid);
            if errors.is_empty() {
                if let Err(e) = std::fs::remove_dir_all(&pod_dir) {
                    if e.kind() != std::io::ErrorKind::NotFound {
                        errors.push(format!("{}: {e}", pod_dir.display()));
                    }
                }
                if let Some((ns, name)) = names {
                    let _ = std::fs::remove_dir_all(layout::pod_log_dir(&root, &ns, &name, &uid));
                }
            }
            Ok(errors)
        })
        .await;
        match result {
            Ok(errors) if errors.is_empty() => {
                tracing::info!(pod = %self.uid, "pod removed from the node")
            }
            Ok(errors) => {
                tracing::warn!(pod = %self.uid, errors = %errors.join("; "), "pod teardown incomplete")
            }
            Err(e) => tracing::warn!(pod = %self.uid, error = %e, "pod teardown failed"),
        }
        if let Ok(mut rec) = self.shared.events.lock() {
            rec.forget_object(&self.uid);
        }
        self.shared.tokens.forget_pod(&self.uid);
    }

    /// Computes the pod's status and patches it when it differs from what the API (or our last patch) has.
    /// False when the API refused the patch (the caller retries soon).
    async fn update_status(&mut self, pod: &Pod, view: &PodView, terminal: bool) -> bool {
        let probe_status = self.probe_statuses(view);
        let (readiness, startup) = status::probe_maps(&probe_status);
        // Reasons only matter for containers not running now.
        let reasons: HashMap<String, WaitingReason> = self
            .reasons
            .iter()
            .filter(|(name, _)| {
                latest(&view.containers, name).is_none_or(|c| c.state != RuntimeState::Running)
            })
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        let host_ips = vec![self.shared.node_ip.clone()];
        // A static pod's status is written onto its mirror pod (none yet: wait, the next sync tries again), built
        // on what this worker last wrote so a re-created mirror does not reset restart counts or start time.
        let mut mirror_base = None;
        if self.static_pod {
            let Some(mirror) = self.shared.mirrors.mirror_of(pod) else {
                // Not written: look again soon.
                return false;
            };
            let mut base = pod.clone();
            base.status = self
                .last_status
                .clone()
                .or_else(|| mirror.status.clone())
                .or(base.status);
            mirror_base = Some((mirror, base));
        }
        let (target, base) = match &mirror_base {
            Some((mirror, base)) => (mirror, base),
            None => (pod, pod),
        };
        let input = StatusInput {
            pod: base,
            containers: &view.containers,
            pod_ips: &view.ips,
            host_ips: &host_ips,
            reasons: &reasons,
            readiness: &readiness,
            startup: &startup,
            pod_is_terminal: terminal,
            now: Timestamp::now(),
        };
        let status = status::generate_pod_status(&input);
        if target.status.as_ref() == Some(&status)
            || (self.last_status.as_ref() == Some(&status)
                && self.last_status_target == target.metadata.uid)
        {
            return true;
        }
        match api::patch_status(&self.shared.client, target, &status).await {
            Ok(()) => {
                tracing::debug!(pod = %self.uid, phase = ?status.phase, "status patched");
                self.last_status = Some(status);
                self.last_status_target = target.metadata.uid.clone();
                true
            }
            Err(e) => {
                tracing::warn!(pod = %self.uid, error = %e, "status update failed");
                false
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::{Capabilities, SecurityContext};

    fn container(caps: Option<Capabilities>, read_only: bool) -> Container {
        Container {
            name: "web".into(),
            security_context: Some(SecurityContext {
                capabilities: caps,
                read_only_root_filesystem: Some(read_only),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    #[test]
    fn pods_resync_between_one_minute_and_a_minute_and_a_half_at_spread_times() {
        let periods: HashSet<Duration> = (0..50)
            .map(|i| jittered_resync(&format!("uid-{i}"), 1))
            .collect();
        assert!(periods
            .iter()
            .all(|p| *p >= RESYNC && *p < RESYNC + RESYNC / 2));
        assert!(periods.len() > 40, "spread, not synchronised: {periods:?}");
        assert_ne!(jittered_resync("u", 1), jittered_resync("u", 2));
    }

    #[test]
    fn api_container_ids_split_back_into_sandbox_and_container() {
        let id = api_container_id("u1-0", "web.2");
        assert_eq!(id, "windlass://u1-0/web.2");
        assert_eq!(split_api_id(&id), Some(("u1-0".into(), "web.2".into())));
        assert_eq!(split_api_id("containerd://abc"), None);
    }

    #[test]
    fn capabilities_start_from_the_cri_defaults_and_honour_add_and_drop() {
        let plain = capabilities(&container(None, false));
        assert!(plain.contains(&"CAP_NET_BIND_SERVICE".to_string()));
        assert!(!plain.contains(&"CAP_SYS_ADMIN".to_string()));
        let caps = capabilities(&container(
            Some(Capabilities {
                add: Some(vec!["NET_ADMIN".into()]),
                drop: Some(vec!["ALL".into()]),
            }),
            false,
        ));
        assert_eq!(caps, vec!["CAP_NET_ADMIN".to_string()]);
    }

    #[test]
    fn container_config_gets_the_kubelets_mounts_resources_and_security_settings() {
        let dir = tempfile::tempdir().unwrap();
        let spec = serde_json::json!({
            "process": {"args": ["sh"], "capabilities": {"bounding": ["CAP_KILL"]}},
            "root": {"path": "rootfs"},
            "mounts": [{"destination": "/dev/shm", "type": "tmpfs", "source": "shm"}],
            "linux": {},
        });
        std::fs::write(dir.path().join("config.json"), spec.to_string()).unwrap();
        let pod = Pod::default();
        let mounts = vec![MountSpec {
            source: "/var/lib/pods/u/volumes/x".into(),
            destination: "/dev/shm".into(),
            read_only: true,
            propagation: "rprivate",
        }];
        edit_config(dir.path(), &pod, &container(None, true), &mounts)
            .map_err(|f| f.message)
            .unwrap();
        let out: serde_json::Value =
            serde_json::from_slice(&std::fs::read(dir.path().join("config.json")).unwrap())
                .unwrap();
        let m = out["mounts"].as_array().unwrap();
        assert_eq!(
            m.len(),
            1,
            "the volume replaced the default /dev/shm: {m:?}"
        );
        assert_eq!(m[0]["type"], "bind");
        assert_eq!(
            m[0]["options"],
            serde_json::json!(["rbind", "rprivate", "ro"])
        );
        assert_eq!(out["root"]["readonly"], true);
        assert!(out["process"]["capabilities"]["effective"]
            .as_array()
            .unwrap()
            .contains(&"CAP_CHOWN".into()));
        // BestEffort: the cpu shares floor, and the BestEffort OOM score.
        assert_eq!(out["linux"]["resources"]["cpu"]["shares"], 2);
        assert_eq!(out["process"]["oomScoreAdj"], 1000);
    }
}
