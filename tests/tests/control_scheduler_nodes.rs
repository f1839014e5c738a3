//! `windlass-control serve` runs the scheduler and controllers over its own API: pods are bound to fitting nodes
//! with events, unschedulable pods get upstream's FailedScheduling message, endpoints and endpointslices follow
//! readiness, silent nodes are tainted and lose their pods, nodes get pod CIDRs, and `--controllers` turns
//! controllers off. No kubelet: nodes, leases and pod status are written by the test, as a kubelet would.

use std::process::Command;
use std::time::Duration;

use windlass_tests::control::ControlPlane;
use windlass_tests::{require_privileged, run_ok, unique_name, wait_for};

const WAIT: Duration = Duration::from_secs(30);

/// A node object as a kubelet would register it: Ready, with allocatable resources and labels.
fn node(name: &str, cpu: &str, labels: &str, taints: &str) -> String {
    format!(
        "apiVersion: v1
kind: Node
metadata:
  name: {name}
  labels: {{kubernetes.io/hostname: {name}{labels}}}
spec:
  taints: [{taints}]
status:
  capacity: {{cpu: \"{cpu}\", memory: 8Gi, pods: \"110\"}}
  allocatable: {{cpu: \"{cpu}\", memory: 8Gi, pods: \"110\"}}
  conditions: [{{type: Ready, status: \"True\", reason: KubeletReady}}]
"
    )
}

fn apply(cp: &ControlPlane, manifest: &str) {
    cp.kubectl_stdin_ok(&["apply", "-f", "-"], manifest);
}

fn namespace(cp: &ControlPlane) -> String {
    let ns = unique_name("sch");
    cp.kubectl_ok(&["create", "namespace", &ns]);
    ns
}

fn jsonpath(cp: &ControlPlane, args: &[&str], path: &str) -> String {
    let jp = format!("jsonpath={path}");
    let mut all: Vec<&str> = args.to_vec();
    all.extend(["-o", &jp]);
    let out = cp.kubectl(&all);
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Messages of the pod's events with `reason`.
fn events(cp: &ControlPlane, ns: &str, pod: &str, reason: &str) -> Vec<String> {
    let selector = format!("involvedObject.name={pod},reason={reason}");
    jsonpath(
        cp,
        &["get", "events", "-n", ns, "--field-selector", &selector],
        "{range .items[*]}{.message}{\"\\n\"}{end}",
    )
    .lines()
    .map(String::from)
    .collect()
}

fn now_micro() -> String {
    run_ok(Command::new("date").args(["-u", "+%Y-%m-%dT%H:%M:%S.%6NZ"]))
        .trim()
        .to_string()
}

/// Creates or renews a node's heartbeat Lease in `kube-node-lease`, as the kubelet does every 10 s.
fn renew_lease(cp: &ControlPlane, node: &str) {
    apply(
        cp,
        &format!(
            "apiVersion: coordination.k8s.io/v1
kind: Lease
metadata: {{name: {node}, namespace: kube-node-lease}}
spec: {{holderIdentity: {node}, leaseDurationSeconds: 40, renewTime: \"{}\"}}
",
            now_micro()
        ),
    );
}

#[test]
fn a_pod_is_bound_to_the_only_node_that_fits_with_a_scheduled_event() {
    if !require_privileged(&["kubectl"]) {
        return;
    }
    let cp = ControlPlane::start();
    let p = unique_name("n");
    let ns = namespace(&cp);
    // Too small; no ssd label; tainted; the one that fits.
    apply(&cp, &node(&format!("{p}-small"), "1", ", disk: ssd", ""));
    apply(&cp, &node(&format!("{p}-hdd"), "8", "", ""));
    apply(
        &cp,
        &node(
            &format!("{p}-tainted"),
            "8",
            ", disk: ssd",
            "{key: dedicated, value: gpu, effect: NoSchedule}",
        ),
    );
    let fit = format!("{p}-fit");
    apply(&cp, &node(&fit, "8", ", disk: ssd", ""));
    cp.kubectl_stdin_ok(
        &["apply", "-n", &ns, "-f", "-"],
        "apiVersion: v1
kind: Pod
metadata: {name: web}
spec:
  nodeSelector: {disk: ssd}
  containers: [{name: c, image: busybox, resources: {requests: {cpu: \"2\", memory: 1Gi}}}]
",
    );
    let bound = wait_for("the pod to be bound", WAIT, || {
        Some(jsonpath(
            &cp,
            &["get", "pod", "web", "-n", &ns],
            "{.spec.nodeName}",
        ))
        .filter(|n| !n.is_empty())
    });
    assert_eq!(bound, fit);
    let scheduled = wait_for("the Scheduled event", WAIT, || {
        Some(events(&cp, &ns, "web", "Scheduled")).filter(|e| !e.is_empty())
    });
    assert_eq!(
        scheduled,
        [format!("Successfully assigned {ns}/web to {fit}")]
    );
    let cond = jsonpath(
        &cp,
        &["get", "pod", "web", "-n", &ns],
        "{.status.conditions[?(@.type==\"PodScheduled\")].status}",
    );
    assert_eq!(cond, "True");
}

#[test]
fn an_unschedulable_pod_says_why_and_is_placed_once_a_fitting_node_appears() {
    if !require_privileged(&["kubectl"]) {
        return;
    }
    let cp = ControlPlane::start();
    let p = unique_name("u");
    let ns = namespace(&cp);
    apply(&cp, &node(&format!("{p}-a"), "1", ", zone: a", ""));
    apply(&cp, &node(&format!("{p}-b"), "8", ", zone: b", ""));
    apply(&cp, &node(&format!("{p}-c"), "8", ", zone: c", ""));
    cp.kubectl_stdin_ok(
        &["apply", "-n", &ns, "-f", "-"],
        "apiVersion: v1
kind: Pod
metadata: {name: db}
spec:
  nodeSelector: {zone: a}
  containers: [{name: c, image: busybox, resources: {requests: {cpu: \"2\"}}}]
",
    );
    let failed = wait_for("the FailedScheduling event", WAIT, || {
        Some(events(&cp, &ns, "db", "FailedScheduling")).filter(|e| !e.is_empty())
    });
    assert_eq!(
        failed[0],
        "0/3 nodes are available: 1 Insufficient cpu, 2 node(s) didn't match Pod's node affinity/selector."
    );
    assert_eq!(
        jsonpath(&cp, &["get", "pod", "db", "-n", &ns], "{.spec.nodeName}"),
        ""
    );
    let big = format!("{p}-a2");
    apply(&cp, &node(&big, "4", ", zone: a", ""));
    let bound = wait_for("the pod to be bound to the new node", WAIT, || {
        Some(jsonpath(
            &cp,
            &["get", "pod", "db", "-n", &ns],
            "{.spec.nodeName}",
        ))
        .filter(|n| !n.is_empty())
    });
    assert_eq!(bound, big);
}

#[test]
fn endpoints_and_endpointslices_follow_pod_readiness_and_termination() {
    if !require_privileged(&["kubectl"]) {
        return;
    }
    let cp = ControlPlane::start();
    let ns = namespace(&cp);
    let n = unique_name("e");
    apply(&cp, &node(&n, "8", "", ""));
    cp.kubectl_stdin_ok(
        &["apply", "-n", &ns, "-f", "-"],
        &format!(
            "apiVersion: v1
kind: Service
metadata: {{name: web}}
spec:
  selector: {{app: web}}
  ports: [{{name: http, port: 80, targetPort: http}}, {{name: metrics, port: 9090, targetPort: 9100}}]
---
apiVersion: v1
kind: Pod
metadata: {{name: web-1, labels: {{app: web}}}}
spec:
  nodeName: {n}
  containers: [{{name: c, image: busybox, ports: [{{name: http, containerPort: 8080}}]}}]
"
        ),
    );
    let set_status = |ready: &str| {
        let patch = format!(
            "{{\"status\":{{\"phase\":\"Running\",\"podIP\":\"10.244.0.7\",\"conditions\":[{{\"type\":\"Ready\",\"status\":\"{ready}\"}}]}}}}"
        );
        cp.kubectl_ok(&[
            "patch",
            "pod",
            "web-1",
            "-n",
            &ns,
            "--subresource=status",
            "--type=merge",
            "-p",
            &patch,
        ]);
    };
    let endpoints = || {
        jsonpath(
            &cp,
            &["get", "endpoints", "web", "-n", &ns],
            "{.subsets[*].addresses[*].ip}|{.subsets[*].notReadyAddresses[*].ip}|{.subsets[*].ports[*].port}",
        )
    };
    let slice = || {
        jsonpath(
            &cp,
            &["get", "endpointslices", "-n", &ns, "-l", "kubernetes.io/service-name=web"],
            "{.items[*].metadata.labels.endpointslice\\.kubernetes\\.io/managed-by}|{.items[*].endpoints[*].addresses[*]}|{.items[*].endpoints[*].conditions}|{.items[*].ports[*].port}",
        )
    };
    set_status("True");
    wait_for("a ready address", WAIT, || {
        (endpoints() == "10.244.0.7||8080 9100").then_some(())
    });
    wait_for("a ready endpoint in the slice", WAIT, || {
        (slice()
            == "endpointslice-controller.k8s.io|10.244.0.7|{\"ready\":true,\"serving\":true,\"terminating\":false}|8080 9100")
            .then_some(())
    });
    set_status("False");
    wait_for("a not-ready address", WAIT, || {
        (endpoints() == "|10.244.0.7|8080 9100").then_some(())
    });
    wait_for("a not-ready endpoint in the slice", WAIT, || {
        slice()
            .contains("{\"ready\":false,\"serving\":false,\"terminating\":false}")
            .then_some(())
    });
    set_status("True");
    wait_for("ready again", WAIT, || {
        (endpoints() == "10.244.0.7||8080 9100").then_some(())
    });
    // Bound to a node, so deletion is graceful: the pod terminates (no kubelet confirms it).
    cp.kubectl_ok(&["delete", "pod", "web-1", "-n", &ns, "--wait=false"]);
    wait_for("the terminating pod to leave the endpoints", WAIT, || {
        (endpoints() == "||").then_some(())
    });
    wait_for(
        "a terminating, still serving endpoint in the slice",
        WAIT,
        || {
            slice()
                .contains("{\"ready\":false,\"serving\":true,\"terminating\":true}")
                .then_some(())
        },
    );
}

#[test]
fn a_node_that_stops_renewing_its_lease_is_tainted_loses_its_pod_and_heals() {
    if !require_privileged(&["kubectl", "date"]) {
        return;
    }
    let cp = ControlPlane::start_with(|_| {
        [
            "--node-monitor-grace-period=3s",
            "--node-monitor-period=500ms",
            "--default-unreachable-toleration-seconds=2",
        ]
        .map(String::from)
        .to_vec()
    });
    let ns = namespace(&cp);
    let p = unique_name("l");
    let (dead, alive) = (format!("{p}-dead"), format!("{p}-alive"));
    apply(&cp, &node(&dead, "8", "", ""));
    apply(&cp, &node(&alive, "8", "", ""));
    renew_lease(&cp, &dead);
    renew_lease(&cp, &alive);
    cp.kubectl_stdin_ok(
        &["apply", "-n", &ns, "-f", "-"],
        &format!(
            "apiVersion: v1
kind: Pod
metadata: {{name: victim}}
spec:
  nodeName: {dead}
  containers: [{{name: c, image: busybox}}]
"
        ),
    );
    let tol = jsonpath(
        &cp,
        &["get", "pod", "victim", "-n", &ns],
        "{.spec.tolerations[?(@.key==\"node.kubernetes.io/unreachable\")].tolerationSeconds}",
    );
    assert_eq!(
        tol, "2",
        "--default-unreachable-toleration-seconds is given to new pods"
    );
    let taints = |n: &str| {
        jsonpath(
            &cp,
            &["get", "node", n],
            "{range .spec.taints[*]}{.key}:{.effect} {end}",
        )
    };
    // Only the live node keeps renewing.
    wait_for(
        "the silent node to become Unknown and tainted",
        WAIT,
        || {
            renew_lease(&cp, &alive);
            let ready = jsonpath(
                &cp,
                &["get", "node", &dead],
                "{.status.conditions[?(@.type==\"Ready\")].status}",
            );
            (ready == "Unknown"
            && taints(&dead)
                == "node.kubernetes.io/unreachable:NoSchedule node.kubernetes.io/unreachable:NoExecute ")
            .then_some(())
        },
    );
    let reason = jsonpath(
        &cp,
        &["get", "node", &dead],
        "{.status.conditions[?(@.type==\"Ready\")].reason}",
    );
    assert_eq!(reason, "NodeStatusUnknown");
    wait_for("the pod on the silent node to be evicted", WAIT, || {
        renew_lease(&cp, &alive);
        let out = cp.kubectl(&[
            "get",
            "pod",
            "victim",
            "-n",
            &ns,
            "-o",
            "jsonpath={.metadata.deletionTimestamp}",
        ]);
        (!out.status.success() || !out.stdout.is_empty()).then_some(())
    });
    renew_lease(&cp, &alive);
    assert_eq!(
        taints(&alive),
        "",
        "the node that kept renewing is untouched"
    );
    assert_eq!(
        jsonpath(
            &cp,
            &["get", "node", &alive],
            "{.status.conditions[?(@.type==\"Ready\")].status}"
        ),
        "True"
    );
    // The node comes back: the kubelet renews its lease and reports Ready again.
    renew_lease(&cp, &dead);
    cp.kubectl_ok(&[
        "patch",
        "node",
        &dead,
        "--subresource=status",
        "--type=merge",
        "-p",
        "{\"status\":{\"conditions\":[{\"type\":\"Ready\",\"status\":\"True\",\"reason\":\"KubeletReady\"}]}}",
    ]);
    wait_for("the returning node to lose its taints", WAIT, || {
        renew_lease(&cp, &dead);
        renew_lease(&cp, &alive);
        taints(&dead).is_empty().then_some(())
    });
}

#[test]
fn nodes_get_pod_cidrs_from_the_cluster_cidr() {
    if !require_privileged(&["kubectl"]) {
        return;
    }
    let cp = ControlPlane::start_with(|_| {
        ["--cluster-cidr=10.50.0.0/16", "--node-cidr-mask-size=26"]
            .map(String::from)
            .to_vec()
    });
    let p = unique_name("i");
    let names: Vec<String> = (0..3).map(|i| format!("{p}-{i}")).collect();
    for n in &names {
        apply(&cp, &node(n, "4", "", ""));
    }
    let cidrs: Vec<String> = names
        .iter()
        .map(|n| {
            wait_for("a pod CIDR", WAIT, || {
                Some(jsonpath(
                    &cp,
                    &["get", "node", n],
                    "{.spec.podCIDR}|{.spec.podCIDRs[0]}",
                ))
                .filter(|c| c.len() > 1)
            })
        })
        .collect();
    let mut sorted = cidrs.clone();
    sorted.sort();
    assert_eq!(
        sorted,
        [
            "10.50.0.0/26|10.50.0.0/26",
            "10.50.0.128/26|10.50.0.128/26",
            "10.50.0.64/26|10.50.0.64/26"
        ]
    );
    // A deleted node's range goes to the next node.
    let freed = jsonpath(&cp, &["get", "node", &names[1]], "{.spec.podCIDR}");
    cp.kubectl_ok(&["delete", "node", &names[1]]);
    let next = format!("{p}-new");
    apply(&cp, &node(&next, "4", "", ""));
    let got = wait_for("a pod CIDR for the new node", WAIT, || {
        Some(jsonpath(&cp, &["get", "node", &next], "{.spec.podCIDR}")).filter(|c| !c.is_empty())
    });
    assert_eq!(got, freed);
}

#[test]
fn controllers_flag_turns_node_ipam_off_while_the_others_run() {
    if !require_privileged(&["kubectl"]) {
        return;
    }
    let cp = ControlPlane::start_with(|_| vec!["--controllers=*,-nodeipam".into()]);
    let n = unique_name("o");
    apply(&cp, &node(&n, "4", "", ""));
    let ns = namespace(&cp);
    // The serviceaccount controller runs...
    wait_for("the default ServiceAccount", WAIT, || {
        cp.kubectl(&["get", "serviceaccount", "default", "-n", &ns])
            .status
            .success()
            .then_some(())
    });
    // ...and had time to act on the node too, but node IPAM is off.
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(jsonpath(&cp, &["get", "node", &n], "{.spec.podCIDR}"), "");
    assert!(cp.log().contains("\"serviceaccount\""));
    assert!(!cp.log().contains("\"nodeipam\""), "nodeipam never started");
}

#[test]
fn the_kubernetes_service_points_at_the_api_server() {
    if !require_privileged(&["kubectl"]) {
        return;
    }
    let cp = ControlPlane::start();
    let port = cp.port.to_string();
    assert_eq!(
        jsonpath(
            &cp,
            &["get", "endpoints", "kubernetes", "-n", "default"],
            "{.subsets[0].addresses[0].ip}:{.subsets[0].ports[0].port}"
        ),
        format!("127.0.0.1:{port}")
    );
    assert_eq!(
        jsonpath(
            &cp,
            &[
                "get",
                "endpointslices",
                "-n",
                "default",
                "-l",
                "kubernetes.io/service-name=kubernetes"
            ],
            "{.items[0].endpoints[0].addresses[0]}:{.items[0].ports[0].port}"
        ),
        format!("127.0.0.1:{port}")
    );
}

#[test]
fn a_scheduler_without_an_api_server_of_its_own_schedules_through_a_kubeconfig() {
    if !require_privileged(&["kubectl"]) {
        return;
    }
    // The API server runs every controller but the scheduler...
    let cp = ControlPlane::start_with(|_| vec!["--controllers=*,-scheduler".into()]);
    let log = std::fs::File::create(cp.data_dir().join("scheduler.log")).expect("log");
    // ...which runs in a second process, against the first one's API.
    let _scheduler = windlass_tests::ChildGuard::spawn(
        Command::new(windlass_tests::workspace_binary("windlass-control"))
            .args([
                "serve",
                "--disable-api",
                "--controllers=scheduler",
                "--leader-elect=false",
                "--kubeconfig",
            ])
            .arg(cp.kubeconfig())
            .stdout(std::process::Stdio::null())
            .stderr(log),
    )
    .expect("start the scheduler-only process");
    let n = unique_name("k");
    apply(&cp, &node(&n, "4", "", ""));
    let ns = namespace(&cp);
    cp.kubectl_stdin_ok(
        &["apply", "-n", &ns, "-f", "-"],
        "apiVersion: v1\nkind: Pod\nmetadata: {name: p}\nspec:\n  containers: [{name: c, image: busybox}]\n",
    );
    let bound = wait_for(
        "the pod to be bound by the external scheduler",
        WAIT,
        || {
            Some(jsonpath(
                &cp,
                &["get", "pod", "p", "-n", &ns],
                "{.spec.nodeName}",
            ))
            .filter(|n| !n.is_empty())
        },
    );
    assert_eq!(bound, n);
    assert!(
        !cp.log().contains("starting scheduler"),
        "the API server's own scheduler stays off"
    );
}

#[test]
fn a_deployments_pods_on_a_silent_node_are_replaced_on_another_node() {
    if !require_privileged(&["kubectl", "date"]) {
        return;
    }
    let cp = ControlPlane::start_with(|_| {
        [
            "--node-monitor-grace-period=3s",
            "--node-monitor-period=500ms",
            "--default-unreachable-toleration-seconds=2",
        ]
        .map(String::from)
        .to_vec()
    });
    let ns = namespace(&cp);
    let p = unique_name("r");
    let (dead, alive) = (format!("{p}-dead"), format!("{p}-alive"));
    // Only the soon-silent node exists when the Deployment's pods are placed.
    apply(&cp, &node(&dead, "8", "", ""));
    renew_lease(&cp, &dead);
    cp.kubectl_ok(&[
        "create",
        "deployment",
        "web",
        "-n",
        &ns,
        "--image=busybox",
        "--replicas=2",
    ]);
    let placement = || {
        jsonpath(
            &cp,
            &["get", "pods", "-n", &ns, "-l", "app=web"],
            "{range .items[*]}{.spec.nodeName}{\"/\"}{.metadata.deletionTimestamp}{\" \"}{end}",
        )
    };
    wait_for("both pods to be placed on the first node", WAIT, || {
        renew_lease(&cp, &dead);
        (placement().trim() == format!("{dead}/ {dead}/")).then_some(())
    });

    // A second node joins, and the first one stops renewing its lease.
    apply(&cp, &node(&alive, "8", "", ""));
    renew_lease(&cp, &alive);
    wait_for(
        "the silent node's pods to be evicted and replaced on the live node",
        Duration::from_secs(60),
        || {
            renew_lease(&cp, &alive);
            // Evicted pods keep a deletionTimestamp (no kubelet confirms); the replacements are what count.
            let live: Vec<String> = placement()
                .split_whitespace()
                .filter(|p| p.ends_with('/'))
                .map(String::from)
                .collect();
            (live == [format!("{alive}/"), format!("{alive}/")]).then_some(())
        },
    );
    let ready = jsonpath(
        &cp,
        &["get", "node", &dead],
        "{.status.conditions[?(@.type==\"Ready\")].status}",
    );
    assert_eq!(ready, "Unknown");
}

#[test]
fn pods_of_a_deleted_node_and_terminated_pods_past_the_threshold_are_garbage_collected() {
    if !require_privileged(&["kubectl"]) {
        return;
    }
    let cp = ControlPlane::start_with(|_| {
        [
            "--pod-gc-orphan-quarantine=1s",
            "--terminated-pod-gc-threshold=2",
        ]
        .map(String::from)
        .to_vec()
    });
    let ns = namespace(&cp);
    let p = unique_name("gc");
    let (doomed, kept) = (format!("{p}-doomed"), format!("{p}-kept"));
    apply(&cp, &node(&doomed, "8", "", ""));
    apply(&cp, &node(&kept, "8", "", ""));
    let pod = |name: &str, node: &str| {
        format!(
            "apiVersion: v1
kind: Pod
metadata: {{name: {name}}}
spec:
  nodeName: {node}
  containers: [{{name: c, image: busybox}}]
"
        )
    };
    cp.kubectl_stdin_ok(&["apply", "-n", &ns, "-f", "-"], &pod("orphan", &doomed));
    cp.kubectl_stdin_ok(&["apply", "-n", &ns, "-f", "-"], &pod("running", &kept));
    // Four finished pods, oldest first (same-second timestamps are ordered by name).
    for name in ["done-1", "done-2", "done-3", "done-4"] {
        cp.kubectl_stdin_ok(&["apply", "-n", &ns, "-f", "-"], &pod(name, &kept));
        cp.kubectl_ok(&[
            "patch",
            "pod",
            name,
            "-n",
            &ns,
            "--subresource=status",
            "--type=merge",
            "-p",
            r#"{"status":{"phase":"Succeeded"}}"#,
        ]);
    }
    let pods = || {
        let mut names: Vec<String> = jsonpath(
            &cp,
            &["get", "pods", "-n", &ns],
            "{range .items[*]}{.metadata.name} {end}",
        )
        .split_whitespace()
        .map(String::from)
        .collect();
        names.sort();
        names
    };
    // Only two terminated pods may stay: the two oldest go; the node's other pods are its own business.
    wait_for("the oldest terminated pods to go", WAIT, || {
        (pods() == ["done-3", "done-4", "orphan", "running"]).then_some(())
    });
    // With its node gone (past the 1 s quarantine), the orphan is deleted; the other node's pods stay.
    cp.kubectl_ok(&["delete", "node", &doomed]);
    wait_for("the deleted node's pod to be collected", WAIT, || {
        (pods() == ["done-3", "done-4", "running"]).then_some(())
    });
}
