//! Whether a stopped container is started again (the pod's `restartPolicy`), and the back-off between restarts that
//! shows as `CrashLoopBackOff`.
//!
//! Ref: upstream `kubecontainer.ShouldContainerBeRestarted` (pkg/kubelet/container/helpers.go) and the kubelet's
//! `backOff` (flowcontrol.Backoff with `backOffPeriod` 10 s and `MaxContainerBackOff` 300 s): the delay starts at
//! 10 s, doubles on each restart up to 5 min, and is forgotten once the container has run for twice the maximum
//! (10 min) without restarting.

use std::collections::HashMap;

use k8s_openapi::api::core::v1::{Container, Pod};
use tokio::time::{Duration, Instant};

use crate::status::{RuntimeContainer, RuntimeState};

/// Initial back-off (upstream `backOffPeriod`).
pub const INITIAL_BACK_OFF: Duration = Duration::from_secs(10);
/// Maximum back-off (upstream `MaxContainerBackOff`).
pub const MAX_BACK_OFF: Duration = Duration::from_secs(300);

/// Upstream `ShouldContainerBeRestarted`, given the container's newest instance.
pub fn should_container_be_restarted(
    container: &Container,
    pod: &Pod,
    latest: Option<&RuntimeContainer>,
) -> bool {
    let _ = container;
    // A pod being deleted is never restarted.
    if pod.metadata.deletion_timestamp.is_some() {
        return false;
    }
    let Some(latest) = latest else {
        // Never started: start it.
        return true;
    };
    match latest.state {
        RuntimeState::Running => false,
        RuntimeState::Unknown | RuntimeState::Created => true,
        RuntimeState::Exited => {
            match pod
                .spec
                .as_ref()
                .and_then(|s| s.restart_policy.as_deref())
                .unwrap_or("Always")
            {
                "Never" => false,
                "OnFailure" => latest.exit_code != 0,
                _ => true,
            }
        }
    }
}

/// Per-container restart back-off (upstream `flowcontrol.Backoff` keyed by pod and container).
///
/// Uses tokio's clock so tests drive it with paused time.
#[derive(Debug)]
pub struct BackOff {
    initial: Duration,
    max: Duration,
    entries: HashMap<String, Entry>,
}

#[derive(Debug, Clone, Copy)]
struct Entry {
    delay: Duration,
    /// When the container last (re)started, i.e. when the current back-off window began.
    last_update: Instant,
}

impl Default for BackOff {
    fn default() -> Self {
        Self::new(INITIAL_BACK_OFF, MAX_BACK_OFF)
    }
}

impl BackOff {
    pub fn new(initial: Duration, max: Duration) -> Self {
        Self {
            initial,
            max,
            entries: HashMap::new(),
        }
    }

    /// The key upstream uses: pod full name, pod UID, container name (plus the spec hash, omitted here: a changed
    /// spec gives a changed container name key through the caller if wanted).
    pub fn key(pod_name: &str, pod_namespace: &str, pod_uid: &str, container: &str) -> String {
        format!("{pod_name}_{pod_namespace}_{pod_uid}_{container}")
    }

    /// Whether `key` is still backing off at `now`, given that its last instance finished at `finished_at`.
    /// Returns the remaining wait, as upstream's `doBackOff` does with `IsInBackOffSince(key, finishedAt)`.
    pub fn remaining(&self, key: &str, finished_at: Instant) -> Option<Duration> {
        let entry = self.entries.get(key)?;
        let until = finished_at + entry.delay;
        let now = Instant::now();
        (now < until).then(|| until - now)
    }

    /// Records a restart of `key` now: the first restart waits `initial`, each later one twice the previous, up
    /// to `max`; a container that ran `2 * max` since its last restart starts again at `initial`.
    pub fn next(&mut self, key: &str) -> Duration {
        let now = Instant::now();
        let entry = match self.entries.get(key) {
            Some(e) if now.saturating_duration_since(e.last_update) <= self.max * 2 => Entry {
                delay: (e.delay * 2).min(self.max),
                last_update: now,
            },
            _ => Entry {
                delay: self.initial,
                last_update: now,
            },
        };
        self.entries.insert(key.to_string(), entry);
        entry.delay
    }

    /// The current delay of `key`, if it has one.
    pub fn current(&self, key: &str) -> Option<Duration> {
        self.entries.get(key).map(|e| e.delay)
    }

    /// Forgets entries idle for more than `2 * max` (upstream `GC`), e.g. of deleted pods.
    pub fn gc(&mut self) {
        let now = Instant::now();
        let max = self.max;
        self.entries
            .retain(|_, e| now.saturating_duration_since(e.last_update) <= max * 2);
    }

    /// Forgets `key` (the pod was deleted).
    pub fn forget(&mut self, key: &str) {
        self.entries.remove(key);
    }
}

/// The `CrashLoopBackOff` waiting message upstream shows.
pub fn crash_loop_message(
    delay: Duration,
    container: &str,
    pod_name: &str,
    pod_namespace: &str,
    pod_uid: &str,
) -> String {
    format!(
        "back-off {} restarting failed container={container} pod={pod_name}_{pod_namespace}({pod_uid})",
        go_duration(delay)
    )
}

/// Go's `time.Duration.String()` for whole seconds: `10s`, `1m20s`, `5m0s`.
fn go_duration(d: Duration) -> String {
    let secs = d.as_secs();
    if secs < 60 {
        format!("{secs}s")
    } else {
        format!("{}m{}s", secs / 60, secs % 60)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::PodSpec;
    use k8s_openapi::jiff::Timestamp;

    fn pod(policy: &str) -> Pod {
        Pod {
            spec: Some(PodSpec {
                restart_policy: Some(policy.into()),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    fn exited(code: i32) -> RuntimeContainer {
        RuntimeContainer {
            name: "c".into(),
            id: "windlass://c".into(),
            image: "i".into(),
            image_ref: String::new(),
            state: RuntimeState::Exited,
            created_at: Timestamp::UNIX_EPOCH,
            started_at: None,
            finished_at: None,
            exit_code: code,
            reason: String::new(),
            message: String::new(),
            restart_count: 0,
            spec_hash: String::new(),
        }
    }

    #[test]
    fn restart_policy_decides_which_exits_restart() {
        let c = Container::default();
        let cases = [
            ("Always", 0, true),
            ("Always", 1, true),
            ("OnFailure", 0, false),
            ("OnFailure", 1, true),
            ("Never", 0, false),
            ("Never", 1, false),
        ];
        for (policy, code, want) in cases {
            assert_eq!(
                should_container_be_restarted(&c, &pod(policy), Some(&exited(code))),
                want,
                "{policy} exit {code}"
            );
        }
        assert!(
            should_container_be_restarted(&c, &pod("Never"), None),
            "never started"
        );
        let mut running = exited(0);
        running.state = RuntimeState::Running;
        assert!(!should_container_be_restarted(
            &c,
            &pod("Always"),
            Some(&running)
        ));
        let mut deleting = pod("Always");
        deleting.metadata.deletion_timestamp = Some(
            k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(Timestamp::UNIX_EPOCH),
        );
        assert!(!should_container_be_restarted(
            &c,
            &deleting,
            Some(&exited(1))
        ));
    }

    #[tokio::test(start_paused = true)]
    async fn back_off_doubles_from_10s_to_a_5_minute_cap() {
        let mut b = BackOff::default();
        let got: Vec<u64> = (0..7).map(|_| b.next("k").as_secs()).collect();
        assert_eq!(got, vec![10, 20, 40, 80, 160, 300, 300]);
    }

    #[tokio::test(start_paused = true)]
    async fn back_off_resets_after_ten_minutes_of_running() {
        let mut b = BackOff::default();
        b.next("k");
        b.next("k");
        assert_eq!(b.current("k"), Some(Duration::from_secs(20)));
        tokio::time::advance(Duration::from_secs(599)).await;
        assert_eq!(b.next("k"), Duration::from_secs(40), "still within 10 min");
        tokio::time::advance(Duration::from_secs(601)).await;
        assert_eq!(b.next("k"), Duration::from_secs(10), "reset after 10 min");
    }

    #[tokio::test(start_paused = true)]
    async fn a_container_waits_out_its_back_off_from_when_it_finished() {
        let mut b = BackOff::default();
        let key = BackOff::key("p", "default", "uid", "c");
        assert_eq!(
            b.remaining(&key, Instant::now()),
            None,
            "first start: no wait"
        );
        b.next(&key);
        let finished = Instant::now();
        tokio::time::advance(Duration::from_secs(4)).await;
        assert_eq!(b.remaining(&key, finished), Some(Duration::from_secs(6)));
        tokio::time::advance(Duration::from_secs(6)).await;
        assert_eq!(b.remaining(&key, finished), None);
    }

    #[tokio::test(start_paused = true)]
    async fn gc_forgets_idle_entries() {
        let mut b = BackOff::default();
        b.next("old");
        tokio::time::advance(Duration::from_secs(601)).await;
        b.next("new");
        b.gc();
        assert_eq!(b.current("old"), None);
        assert!(b.current("new").is_some());
    }

    #[test]
    fn the_crash_loop_message_reads_like_upstream() {
        assert_eq!(
            crash_loop_message(Duration::from_secs(40), "app", "web", "default", "u1"),
            "back-off 40s restarting failed container=app pod=web_default(u1)"
        );
        assert_eq!(go_duration(Duration::from_secs(300)), "5m0s");
    }
}
