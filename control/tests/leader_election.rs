//! Two `windlass-control serve` processes on one etcd: exactly one leads (runs the scheduler and controllers);
//! killing it hands the Lease and the work over to the other within the lease duration.

use std::time::{Duration, Instant};

use windlass_tests::control::ControlPlane;
use windlass_tests::etcd::EtcdCluster;
use windlass_tests::{require_privileged, unique_name, wait_for};

const LEASE_SECS: u64 = 3;

fn holder(cp: &ControlPlane) -> String {
    let out = cp.kubectl(&[
        "get",
        "lease",
        "windlass-control",
        "-n",
        "kube-system",
        "-o",
        "jsonpath={.spec.holderIdentity}",
    ]);
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn leads(cp: &ControlPlane) -> bool {
    cp.log().contains("became the leader")
}

/// A Ready node and an unscheduled pod; returns the node the pod gets bound to (by whichever process leads).
fn scheduled_pod(cp: &ControlPlane, name: &str) -> String {
    let node = unique_name("le");
    cp.kubectl_stdin_ok(
        &["apply", "-f", "-"],
        &format!(
            "apiVersion: v1
kind: Node
metadata: {{name: {node}, labels: {{kubernetes.io/hostname: {node}}}}}
status:
  allocatable: {{cpu: \"4\", memory: 4Gi, pods: \"110\"}}
  conditions: [{{type: Ready, status: \"True\"}}]
---
apiVersion: v1
kind: Pod
metadata: {{name: {name}, namespace: default}}
spec:
  nodeSelector: {{kubernetes.io/hostname: {node}}}
  containers: [{{name: c, image: busybox}}]
"
        ),
    );
    wait_for("the pod to be scheduled", Duration::from_secs(30), || {
        let out = cp.kubectl(&["get", "pod", name, "-o", "jsonpath={.spec.nodeName}"]);
        Some(String::from_utf8_lossy(&out.stdout).into_owned()).filter(|n| !n.is_empty())
    })
}

#[test]
fn killing_the_leader_hands_the_lease_and_the_scheduler_to_the_standby() {
    if !require_privileged(&["etcd", "kubectl"]) {
        return;
    }
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let etcd = rt.block_on(EtcdCluster::start(1));
    let args = |_: &std::path::Path| {
        vec![
            format!("--etcd-servers={}", etcd.servers_flag()),
            format!("--leader-elect-lease-duration={LEASE_SECS}s"),
            "--leader-elect-renew-deadline=2s".into(),
            "--leader-elect-retry-period=250ms".into(),
        ]
    };
    let first = ControlPlane::start_with(args);
    wait_for("the first process to lead", Duration::from_secs(20), || {
        leads(&first).then_some(())
    });
    let second = ControlPlane::start_with(args);
    // Both serve the API; only the first runs controllers.
    let bound = scheduled_pod(&second, "before");
    assert!(!bound.is_empty());
    let leader_id = holder(&second);
    assert!(!leader_id.is_empty());
    assert_eq!(
        holder(&first),
        leader_id,
        "one Lease, seen through both API servers"
    );
    assert!(
        !leads(&second),
        "the standby must not run controllers while the leader lives"
    );
    assert!(second.log().contains("waiting to become the leader"));

    let killed = Instant::now();
    drop(first); // SIGKILL: no graceful release.
    wait_for("the standby to take over", Duration::from_secs(20), || {
        leads(&second).then_some(())
    });
    let took = killed.elapsed();
    let new_id = holder(&second);
    assert_ne!(new_id, leader_id, "the Lease names the new holder");
    // Within the lease duration (plus a retry period and the time to notice), as upstream promises.
    assert!(
        took < Duration::from_secs(LEASE_SECS + 3),
        "hand-over took {took:?} with a {LEASE_SECS}s lease"
    );
    // The new leader schedules.
    scheduled_pod(&second, "after");
}
