//! Container lifecycle: postStart/preStop hooks and how long a stopping container gets.
//!
//! Ref: upstream `pkg/kubelet/lifecycle/handlers.go` (exec, httpGet and sleep handlers; an HTTP hook fails only
//! when no response arrives, whatever the status) and `kuberuntime_container.go` `killContainer`: the grace
//! period is the pod's `deletionGracePeriodSeconds`, else `terminationGracePeriodSeconds` (default 30), or a
//! failed probe's own `terminationGracePeriodSeconds`; the preStop hook's time comes out of it; whatever
//! remains is at least 2 s before SIGKILL.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::{Container, LifecycleHandler, Pod};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use tokio::time::Instant;

use crate::probes::{http_status, tcp_connect, ExecRunner, ProbeOutcome, Scheme};

/// Upstream `minimumGracePeriodInSeconds`.
pub const MINIMUM_GRACE_PERIOD: Duration = Duration::from_secs(2);
/// The API default `terminationGracePeriodSeconds`.
pub const DEFAULT_GRACE_PERIOD: Duration = Duration::from_secs(30);

/// Why a container is being stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopReason {
    /// The pod is deleted or otherwise torn down.
    PodTermination,
    LivenessProbe,
    StartupProbe,
    /// A spec change or a failed postStart hook.
    Other,
}

fn secs(s: i64) -> Duration {
    Duration::from_secs(s.max(0) as u64)
}

/// The grace period before the preStop hook runs (upstream `setTerminationGracePeriod`).
pub fn grace_period(pod: &Pod, container: &Container, reason: StopReason) -> Duration {
    let spec = pod.spec.as_ref();
    let mut grace = match (
        pod.metadata.deletion_grace_period_seconds,
        spec.and_then(|s| s.termination_grace_period_seconds),
    ) {
        (Some(d), _) => secs(d),
        (None, Some(t)) => secs(t),
        (None, None) => DEFAULT_GRACE_PERIOD,
    };
    // A probe's own terminationGracePeriodSeconds applies when that probe is why we stop (not on deletion).
    let probe = match reason {
        StopReason::LivenessProbe => container.liveness_probe.as_ref(),
        StopReason::StartupProbe => container.startup_probe.as_ref(),
        _ => None,
    };
    if let Some(p) = probe.and_then(|p| p.termination_grace_period_seconds) {
        grace = secs(p);
    }
    grace
}

/// What is left for the stop signal after the preStop hook took `pre_stop_took` (never below 2 s).
pub fn remaining_after_pre_stop(grace: Duration, pre_stop_took: Duration) -> Duration {
    grace
        .saturating_sub(pre_stop_took)
        .max(MINIMUM_GRACE_PERIOD)
}

/// The signal that asks the container to stop: `lifecycle.stopSignal`, else the image's `STOPSIGNAL`, else
/// SIGTERM.
pub fn stop_signal(container: &Container, image_stop_signal: Option<&str>) -> String {
    container
        .lifecycle
        .as_ref()
        .and_then(|l| l.stop_signal.clone())
        .or_else(|| image_stop_signal.map(str::to_string))
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "SIGTERM".into())
}

/// Where a hook runs: the pod's IP and ports, and the container for exec.
#[derive(Debug, Clone)]
pub struct HookTarget<E> {
    pub pod_ip: IpAddr,
    pub container_id: String,
    pub container: Container,
    pub exec: Arc<E>,
}

/// Runs a postStart/preStop handler, giving up after `timeout`. `Err` carries upstream-like text for the
/// `FailedPostStartHook`/`FailedPreStopHook` event.
pub async fn run_hook<E: ExecRunner>(
    handler: &LifecycleHandler,
    target: &HookTarget<E>,
    timeout: Duration,
) -> Result<(), String> {
    let run = async {
        if let Some(e) = &handler.exec {
            let cmd = e.command.clone().unwrap_or_default();
            return match target.exec.exec(&target.container_id, &cmd, timeout).await {
                Ok(0) => Ok(()),
                Ok(code) => Err(format!("Exec lifecycle hook ({cmd:?}) for Container \"{}\" failed - error: command '{}' exited with {code}", target.container.name, cmd.join(" "))),
                Err(e) => Err(format!("Exec lifecycle hook ({cmd:?}) for Container \"{}\" failed - error: {e}", target.container.name)),
            };
        }
        if let Some(h) = &handler.http_get {
            let port = resolve_port(&h.port, &target.container)?;
            let host = h
                .host
                .as_deref()
                .and_then(|h| h.parse::<IpAddr>().ok())
                .unwrap_or(target.pod_ip);
            let scheme = match h.scheme.as_deref() {
                Some(s) if s.eq_ignore_ascii_case("HTTPS") => Scheme::Https,
                _ => Scheme::Http,
            };
            let headers: Vec<(String, String)> = h
                .http_headers
                .iter()
                .flatten()
                .map(|x| (x.name.clone(), x.value.clone()))
                .collect();
            let path = h.path.as_deref().unwrap_or("/");
            return http_status(scheme, SocketAddr::new(host, port), path, &headers, timeout)
                .await
                .map(|_| ())
                .map_err(|e| {
                    format!(
                        "HTTP lifecycle hook ({path}) for Container \"{}\" failed - error: {e}",
                        target.container.name
                    )
                });
        }
        if let Some(t) = &handler.tcp_socket {
            // Deprecated for hooks upstream (it is accepted and ignored with a warning); we try a connect.
            let port = resolve_port(&t.port, &target.container)?;
            return match tcp_connect(SocketAddr::new(target.pod_ip, port), timeout).await {
                ProbeOutcome::Success => Ok(()),
                ProbeOutcome::Failure(m) => Err(m),
            };
        }
        if let Some(s) = &handler.sleep {
            tokio::time::sleep(secs(s.seconds)).await;
            return Ok(());
        }
        Err("lifecycle hook has no handler".into())
    };
    match tokio::time::timeout(timeout, run).await {
        Ok(r) => r,
        Err(_) => Err(format!(
            "lifecycle hook for Container \"{}\" did not finish within {timeout:?}",
            target.container.name
        )),
    }
}

fn resolve_port(port: &IntOrString, c: &Container) -> Result<u16, String> {
    match port {
        IntOrString::Int(n) => u16::try_from(*n).map_err(|_| format!("invalid port number: {n}")),
        IntOrString::String(name) => name.parse::<u16>().or_else(|_| {
            c.ports
                .iter()
                .flatten()
                .find(|p| p.name.as_deref() == Some(name.as_str()))
                .and_then(|p| u16::try_from(p.container_port).ok())
                .ok_or_else(|| format!("couldn't find port: {name}"))
        }),
    }
}

/// Runs the container's preStop hook (if any) within `grace`, and returns how long the stop signal then has.
pub async fn pre_stop<E: ExecRunner>(
    target: &HookTarget<E>,
    grace: Duration,
) -> (Duration, Option<String>) {
    let Some(handler) = target
        .container
        .lifecycle
        .as_ref()
        .and_then(|l| l.pre_stop.as_ref())
    else {
        return (grace.max(MINIMUM_GRACE_PERIOD), None);
    };
    if grace.is_zero() {
        return (MINIMUM_GRACE_PERIOD, None);
    }
    let started = Instant::now();
    let err = run_hook(handler, target, grace).await.err();
    (remaining_after_pre_stop(grace, started.elapsed()), err)
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::{ExecAction, Lifecycle, PodSpec, Probe, SleepAction};
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

    use crate::probes::NoExec;

    fn pod(termination: Option<i64>, deletion: Option<i64>) -> Pod {
        Pod {
            metadata: ObjectMeta {
                deletion_grace_period_seconds: deletion,
                ..Default::default()
            },
            spec: Some(PodSpec {
                termination_grace_period_seconds: termination,
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    #[test]
    fn the_grace_period_comes_from_deletion_spec_probe_or_default() {
        let c = Container {
            liveness_probe: Some(Probe {
                termination_grace_period_seconds: Some(5),
                ..Default::default()
            }),
            ..Default::default()
        };
        assert_eq!(
            grace_period(&pod(None, None), &c, StopReason::PodTermination),
            Duration::from_secs(30)
        );
        assert_eq!(
            grace_period(&pod(Some(60), None), &c, StopReason::PodTermination),
            Duration::from_secs(60)
        );
        assert_eq!(
            grace_period(&pod(Some(60), Some(10)), &c, StopReason::PodTermination),
            Duration::from_secs(10)
        );
        assert_eq!(
            grace_period(&pod(Some(60), None), &c, StopReason::LivenessProbe),
            Duration::from_secs(5)
        );
        assert_eq!(
            grace_period(&pod(Some(60), None), &c, StopReason::StartupProbe),
            Duration::from_secs(60)
        );
        assert_eq!(
            remaining_after_pre_stop(Duration::from_secs(30), Duration::from_secs(12)),
            Duration::from_secs(18)
        );
        assert_eq!(
            remaining_after_pre_stop(Duration::from_secs(3), Duration::from_secs(12)),
            MINIMUM_GRACE_PERIOD
        );
    }

    #[test]
    fn the_stop_signal_prefers_the_container_then_the_image() {
        let mut c = Container::default();
        assert_eq!(stop_signal(&c, None), "SIGTERM");
        assert_eq!(stop_signal(&c, Some("SIGQUIT")), "SIGQUIT");
        c.lifecycle = Some(Lifecycle {
            stop_signal: Some("SIGINT".into()),
            ..Default::default()
        });
        assert_eq!(stop_signal(&c, Some("SIGQUIT")), "SIGINT");
    }

    fn target(lifecycle: Lifecycle) -> HookTarget<NoExec> {
        HookTarget {
            pod_ip: "127.0.0.1".parse().unwrap(),
            container_id: "c1".into(),
            container: Container {
                name: "app".into(),
                lifecycle: Some(lifecycle),
                ..Default::default()
            },
            exec: Arc::new(NoExec),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_sleeping_pre_stop_hook_uses_up_part_of_the_grace_period() {
        let t = target(Lifecycle {
            pre_stop: Some(LifecycleHandler {
                sleep: Some(SleepAction { seconds: 8 }),
                ..Default::default()
            }),
            ..Default::default()
        });
        let (left, err) = pre_stop(&t, Duration::from_secs(30)).await;
        assert_eq!((left, err), (Duration::from_secs(22), None));
        let (left, err) = pre_stop(&t, Duration::from_secs(5)).await;
        assert_eq!(left, MINIMUM_GRACE_PERIOD);
        assert!(
            err.unwrap().contains("did not finish"),
            "cut off at the grace period"
        );
    }

    #[tokio::test]
    async fn hooks_fail_with_a_message_naming_the_container() {
        let t = target(Lifecycle::default());
        let exec = LifecycleHandler {
            exec: Some(ExecAction {
                command: Some(vec!["/bin/true".into()]),
            }),
            ..Default::default()
        };
        let err = run_hook(&exec, &t, Duration::from_secs(1))
            .await
            .unwrap_err();
        assert!(
            err.contains("Container \"app\"") && err.contains("no runtime"),
            "{err}"
        );
        // An HTTP hook only fails without a response: a closed port.
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = l.local_addr().unwrap().port();
        drop(l);
        let http = LifecycleHandler {
            http_get: Some(k8s_openapi::api::core::v1::HTTPGetAction {
                port: IntOrString::Int(port as i32),
                path: Some("/shutdown".into()),
                ..Default::default()
            }),
            ..Default::default()
        };
        let err = run_hook(&http, &t, Duration::from_secs(1))
            .await
            .unwrap_err();
        assert!(
            err.starts_with("HTTP lifecycle hook (/shutdown) for Container \"app\" failed"),
            "{err}"
        );
    }
}
