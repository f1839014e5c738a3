//! End to end: `windlass-control` and `windlass-kubelet` in a node network namespace the test creates, images from
//! a local registry there, pods applied with kubectl and checked the way a user would (kubectl output, HTTP from
//! the node). Pods set `spec.nodeName` themselves (the scheduler is not under test here).

use std::time::{Duration, Instant};

use serde_json::Value;
use windlass_tests::kubelet_lab::{KubeletLab, TOOLS};
use windlass_tests::require_privileged;

fn pod_manifest(lab: &KubeletLab, name: &str, spec: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: {name}\n  namespace: default\nspec:\n  nodeName: {}\n{spec}",
        lab.node_name
    )
}

/// The seed example: one container, port 80 (served here by busybox httpd).
fn nginx_pod(lab: &KubeletLab) -> String {
    pod_manifest(
        lab,
        "nginx-pod",
        &format!(
            "  containers:\n  - name: nginx\n    image: {}\n    ports:\n    - containerPort: 80\n",
            lab.image
        ),
    )
}

fn running_with_ip(p: &Value) -> bool {
    p["status"]["phase"] == "Running"
        && p["status"]["podIP"]
            .as_str()
            .is_some_and(|ip| !ip.is_empty())
        && p["status"]["containerStatuses"][0]["ready"] == true
}

fn container_status<'a>(p: &'a Value, name: &str) -> &'a Value {
    p["status"]["containerStatuses"]
        .as_array()
        .and_then(|cs| cs.iter().find(|c| c["name"] == name))
        .unwrap_or(&Value::Null)
}

fn serves_page(lab: &KubeletLab, ip: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match lab.http_get(ip, 80) {
            Ok(body) if body.contains("200 OK") => return body,
            other => assert!(
                Instant::now() < deadline,
                "no page from {ip}:80: {other:?}\nkubelet log:\n{}",
                lab.kubelet_log()
            ),
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn applied_nginx_pod_runs_with_an_ip_that_serves_http_from_the_node() {
    if !require_privileged(TOOLS) {
        return;
    }
    let lab = KubeletLab::start();
    lab.apply(&nginx_pod(&lab));
    let pod = lab.wait_pod(
        "nginx-pod",
        "Running with an IP",
        Duration::from_secs(90),
        running_with_ip,
    );
    let ip = pod["status"]["podIP"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert_eq!(pod["status"]["hostIP"], "127.0.0.1");
    assert_eq!(pod["status"]["qosClass"], "BestEffort");
    let c = container_status(&pod, "nginx");
    assert_eq!(c["restartCount"], 0);
    assert!(c["state"]["running"]["startedAt"].is_string(), "{c}");
    assert!(
        c["imageID"]
            .as_str()
            .is_some_and(|i| i.contains("@sha256:")),
        "{c}"
    );
    let body = serves_page(&lab, &ip);
    assert!(body.ends_with("hi\n"), "{body}");
    let ready = pod["status"]["conditions"]
        .as_array()
        .and_then(|cs| cs.iter().find(|c| c["type"] == "Ready"))
        .cloned()
        .unwrap_or_default();
    assert_eq!(ready["status"], "True", "{pod}");
}

/// The nginx-pod's httpd runs as PID 1 of its PID namespace without a SIGTERM handler, so the kernel drops
/// SIGTERM and only the SIGKILL at the end of the grace period stops it (as with any such image upstream).
#[test]
fn deleted_pod_is_killed_after_its_grace_period_and_leaves_nothing_behind() {
    if !require_privileged(TOOLS) {
        return;
    }
    let lab = KubeletLab::start();
    lab.apply(&nginx_pod(&lab));
    let pod = lab.wait_pod(
        "nginx-pod",
        "Running",
        Duration::from_secs(90),
        running_with_ip,
    );
    let uid = pod["metadata"]["uid"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    let ip = pod["status"]["podIP"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert_eq!(lab.ip_reservations(), vec![ip.clone()]);
    assert!(!lab.pod_cgroups(&uid).is_empty(), "the pod has its cgroup");

    let started = Instant::now();
    // kubectl waits until the object is gone (the kubelet confirms with a zero-grace delete).
    lab.control.kubectl_ok(&[
        "delete",
        "pod",
        "nginx-pod",
        "--grace-period=3",
        "--timeout=60s",
    ]);
    let took = started.elapsed();
    assert!(
        took >= Duration::from_secs(3) && took < Duration::from_secs(10),
        "deletion took {took:?} with a 3 s grace period"
    );
    assert!(lab.pod("nginx-pod").is_none());
    windlass_tests::wait_for("the pod's traces to go", Duration::from_secs(10), || {
        (lab.sandbox_dirs().is_empty()
            && lab.ip_reservations().is_empty()
            && lab.pod_cgroups(&uid).is_empty()
            && lab.mounts().is_empty()
            && !lab.root.path().join("pods").join(&uid).exists())
        .then_some(())
    });
    assert!(lab.http_get(&ip, 80).is_err(), "nothing answers on {ip}");
}

#[test]
fn pod_that_stops_on_sigterm_is_gone_long_before_its_grace_period_ends() {
    if !require_privileged(TOOLS) {
        return;
    }
    let lab = KubeletLab::start();
    lab.apply(&pod_manifest(
        &lab,
        "polite",
        &format!(
            "  terminationGracePeriodSeconds: 30\n  containers:\n  - name: web\n    image: {}\n    command: [\"sh\", \"-c\", \"trap 'exit 0' TERM; while true; do sleep 0.2; done\"]\n",
            lab.image
        ),
    ));
    lab.wait_pod(
        "polite",
        "Running",
        Duration::from_secs(90),
        running_with_ip,
    );
    let started = Instant::now();
    lab.control
        .kubectl_ok(&["delete", "pod", "polite", "--timeout=60s"]);
    let took = started.elapsed();
    assert!(took < Duration::from_secs(10), "deletion took {took:?}");
    assert!(lab.sandbox_dirs().is_empty());
}

#[test]
fn crashing_container_is_restarted_with_back_off_and_shows_crash_loop_back_off() {
    if !require_privileged(TOOLS) {
        return;
    }
    let lab = KubeletLab::start();
    lab.apply(&pod_manifest(
        &lab,
        "crasher",
        &format!(
            "  containers:\n  - name: crash\n    image: {}\n    command: [\"sh\", \"-c\", \"echo boom; exit 3\"]\n",
            lab.image
        ),
    ));
    let pod = lab.wait_pod(
        "crasher",
        "in CrashLoopBackOff after a restart",
        Duration::from_secs(60),
        |p| {
            let c = container_status(p, "crash");
            c["restartCount"].as_i64().is_some_and(|n| n >= 1)
                && c["state"]["waiting"]["reason"] == "CrashLoopBackOff"
        },
    );
    let c = container_status(&pod, "crash");
    assert_eq!(c["lastState"]["terminated"]["exitCode"], 3, "{c}");
    assert_eq!(c["lastState"]["terminated"]["reason"], "Error", "{c}");
    assert!(
        c["state"]["waiting"]["message"]
            .as_str()
            .is_some_and(|m| m.starts_with("back-off 10s restarting failed container=crash")),
        "{c}"
    );
    assert_eq!(pod["status"]["phase"], "Running");
    // Back-off: the next restart waits ~10 s, so the count does not race ahead.
    std::thread::sleep(Duration::from_secs(3));
    let later = lab.pod("crasher").expect("pod");
    assert!(
        container_status(&later, "crash")["restartCount"].as_i64() <= Some(2),
        "{later}"
    );
}

#[test]
fn two_containers_of_a_pod_share_localhost() {
    if !require_privileged(TOOLS) {
        return;
    }
    let lab = KubeletLab::start();
    lab.apply(&pod_manifest(
        &lab,
        "pair",
        &format!(
            "  restartPolicy: Never\n  containers:\n  - name: server\n    image: {image}\n    command: [\"httpd\", \"-f\", \"-p\", \"8080\", \"-h\", \"/www\"]\n  - name: client\n    image: {image}\n    command: [\"sh\", \"-c\", \"for i in $(seq 50); do wget -q -O /tmp/page http://127.0.0.1:8080/ && grep -q hi /tmp/page && exit 0; sleep 0.2; done; exit 1\"]\n",
            image = lab.image
        ),
    ));
    let pod = lab.wait_pod(
        "pair",
        "with its client done",
        Duration::from_secs(90),
        |p| container_status(p, "client")["state"]["terminated"].is_object(),
    );
    let client = container_status(&pod, "client");
    assert_eq!(client["state"]["terminated"]["exitCode"], 0, "{client}");
    assert_eq!(client["state"]["terminated"]["reason"], "Completed");
    assert!(container_status(&pod, "server")["state"]["running"].is_object());
}

#[test]
fn config_map_reaches_the_container_as_env_and_as_a_volume() {
    if !require_privileged(TOOLS) {
        return;
    }
    // With its own node's credentials: the API server lets it read only what its pods use.
    let lab = KubeletLab::start_with_node_credentials();
    lab.apply(
        "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: settings\n  namespace: default\ndata:\n  greeting: hello\n",
    );
    lab.apply(&pod_manifest(
        &lab,
        "reader",
        &format!(
            "  restartPolicy: Never\n  containers:\n  - name: read\n    image: {}\n    command: [\"sh\", \"-c\", \"echo \\\"$GREETING $(cat /etc/settings/greeting)\\\" > /dev/termination-log\"]\n    env:\n    - name: GREETING\n      valueFrom:\n        configMapKeyRef: {{name: settings, key: greeting}}\n    volumeMounts:\n    - {{name: settings, mountPath: /etc/settings}}\n  volumes:\n  - name: settings\n    configMap: {{name: settings}}\n",
            lab.image
        ),
    ));
    let pod = lab.wait_pod("reader", "Succeeded", Duration::from_secs(90), |p| {
        p["status"]["phase"] == "Succeeded"
    });
    let c = container_status(&pod, "read");
    assert_eq!(c["state"]["terminated"]["exitCode"], 0, "{c}");
    assert_eq!(
        c["state"]["terminated"]["message"].as_str().map(str::trim),
        Some("hello hello"),
        "{c}"
    );
    // A finished pod keeps its object but not its network: the IP goes back to the pool.
    windlass_tests::wait_for(
        "the finished pod's IP to be released",
        Duration::from_secs(20),
        || lab.ip_reservations().is_empty().then_some(()),
    );
    assert_eq!(
        lab.pod("reader").expect("pod")["status"]["phase"],
        "Succeeded"
    );
}

#[test]
fn kubelet_stopped_with_sigterm_and_restarted_adopts_its_running_pod_without_restarting_it() {
    if !require_privileged(TOOLS) {
        return;
    }
    let mut lab = KubeletLab::start();
    lab.apply(&nginx_pod(&lab));
    let before = lab.wait_pod(
        "nginx-pod",
        "Running",
        Duration::from_secs(90),
        running_with_ip,
    );
    let started_at = container_status(&before, "nginx")["state"]["running"]["startedAt"].clone();
    let container_id = container_status(&before, "nginx")["containerID"].clone();
    let ip = before["status"]["podIP"]
        .as_str()
        .unwrap_or_default()
        .to_string();

    // SIGTERM: the kubelet exits cleanly and leaves its pods running, as upstream's does.
    let status = lab.stop_kubelet();
    assert!(
        status.success(),
        "kubelet exit status after SIGTERM: {status}"
    );
    serves_page(&lab, &ip);
    let restarted = Instant::now();
    lab.start_kubelet();
    // The new kubelet is up once it renews the node's lease.
    let node = lab.node_name.clone();
    windlass_tests::wait_for(
        "the new kubelet to renew its lease",
        Duration::from_secs(30),
        || {
            let out = lab.control.kubectl(&[
                "get",
                "lease",
                "-n",
                "kube-node-lease",
                &node,
                "-o",
                "jsonpath={.spec.renewTime}",
            ]);
            let t = String::from_utf8_lossy(&out.stdout).trim().to_string();
            let log = lab.kubelet_log();
            (log.matches("kubelet starting").count() >= 2 && !t.is_empty()).then_some(())
        },
    );
    // Give the adopted pod's worker a few resyncs in which it could (wrongly) restart the container.
    std::thread::sleep(
        Duration::from_secs(6).saturating_sub(restarted.elapsed().min(Duration::from_secs(6))),
    );
    let after = lab.pod("nginx-pod").expect("pod");
    let c = container_status(&after, "nginx");
    assert_eq!(c["restartCount"], 0, "{c}");
    assert_eq!(c["state"]["running"]["startedAt"], started_at, "{c}");
    assert_eq!(c["containerID"], container_id, "{c}");
    assert_eq!(after["status"]["podIP"].as_str(), Some(ip.as_str()));
    serves_page(&lab, &ip);
    assert!(lab.kubelet_log().contains("adopting running pod"));

    // The adopted pod is still fully managed: deleting it cleans up.
    lab.control.kubectl_ok(&[
        "delete",
        "pod",
        "nginx-pod",
        "--grace-period=10",
        "--timeout=60s",
    ]);
    windlass_tests::wait_for(
        "the adopted pod's traces to go",
        Duration::from_secs(10),
        || (lab.sandbox_dirs().is_empty() && lab.ip_reservations().is_empty()).then_some(()),
    );
}

#[test]
fn missing_image_shows_err_image_pull_then_image_pull_back_off() {
    if !require_privileged(TOOLS) {
        return;
    }
    let lab = KubeletLab::start();
    let missing = lab.image.replace("test/httpd:v1", "test/nothing:v1");
    lab.apply(&pod_manifest(
        &lab,
        "nopull",
        &format!("  containers:\n  - name: app\n    image: {missing}\n"),
    ));
    let seen = std::cell::RefCell::new(Vec::<String>::new());
    lab.wait_pod(
        "nopull",
        "in ImagePullBackOff",
        Duration::from_secs(60),
        |p| {
            let reason = container_status(p, "app")["state"]["waiting"]["reason"]
                .as_str()
                .unwrap_or_default()
                .to_string();
            let mut seen = seen.borrow_mut();
            if seen.last() != Some(&reason) {
                seen.push(reason.clone());
            }
            reason == "ImagePullBackOff"
        },
    );
    assert!(
        seen.borrow().iter().any(|r| r == "ErrImagePull"),
        "reasons seen: {:?}",
        seen.borrow()
    );
    let pod = lab.pod("nopull").expect("pod");
    assert_eq!(pod["status"]["phase"], "Pending");
    let events = lab
        .control
        .kubectl_ok(&["get", "events", "-n", "default", "-o", "json"]);
    let events: Value = serde_json::from_str(&events).expect("events json");
    let failed = events["items"].as_array().is_some_and(|items| {
        items.iter().any(|e| {
            e["involvedObject"]["name"] == "nopull"
                && e["reason"] == "Failed"
                && e["message"]
                    .as_str()
                    .is_some_and(|m| m.contains("Failed to pull image"))
        })
    });
    assert!(failed, "a Failed event names the pull: {events}");
}

#[test]
fn failing_liveness_probe_restarts_the_container_and_readiness_gates_ready() {
    if !require_privileged(TOOLS) {
        return;
    }
    let lab = KubeletLab::start();
    // `web` serves on 80 and is ready by httpGet; `sick` is never ready (nothing on 81) and its liveness exec
    // probe fails, so it is restarted.
    lab.apply(&pod_manifest(
        &lab,
        "probed",
        &format!(
            "  containers:\n  - name: web\n    image: {image}\n    readinessProbe:\n      httpGet: {{port: 80, path: /}}\n      periodSeconds: 1\n  - name: sick\n    image: {image}\n    command: [\"sh\", \"-c\", \"trap 'exit 0' TERM; while true; do sleep 0.2; done\"]\n    readinessProbe:\n      tcpSocket: {{port: 81}}\n      periodSeconds: 1\n    livenessProbe:\n      exec: {{command: [\"cat\", \"/tmp/healthy\"]}}\n      periodSeconds: 1\n      failureThreshold: 2\n",
            image = lab.image
        ),
    ));
    let pod = lab.wait_pod(
        "probed",
        "with sick restarted by its liveness probe",
        Duration::from_secs(90),
        |p| {
            container_status(p, "web")["ready"] == true
                && container_status(p, "sick")["restartCount"]
                    .as_i64()
                    .is_some_and(|n| n >= 1)
        },
    );
    assert_eq!(container_status(&pod, "sick")["ready"], false);
    let cond = |t: &str| {
        pod["status"]["conditions"]
            .as_array()
            .and_then(|cs| cs.iter().find(|c| c["type"] == t))
            .map(|c| c["status"].clone())
            .unwrap_or_default()
    };
    assert_eq!(cond("Ready"), "False", "{pod}");
    assert_eq!(cond("ContainersReady"), "False", "{pod}");
    assert_eq!(pod["status"]["phase"], "Running");

    // The failures are Events, as upstream's kubelet records them: a Warning `Unhealthy` per failed try with the
    // probe's output (repeats of one message bump its count instead of adding objects), and `Killing` with why.
    let sick_event = |events: &Value, reason: &str, prefix: &str| -> Option<Value> {
        events["items"].as_array()?.iter().find_map(|e| {
            (e["involvedObject"]["name"] == "probed"
                && e["involvedObject"]["fieldPath"] == "spec.containers{sick}"
                && e["reason"] == reason
                && e["message"].as_str().is_some_and(|m| m.starts_with(prefix)))
            .then(|| e.clone())
        })
    };
    let (liveness, readiness, killing) = windlass_tests::wait_for(
        "Unhealthy and Killing events for the sick container",
        Duration::from_secs(30),
        || {
            let out = lab
                .control
                .kubectl_ok(&["get", "events", "-n", "default", "-o", "json"]);
            let events: Value = serde_json::from_str(&out).ok()?;
            let readiness = sick_event(&events, "Unhealthy", "Readiness probe failed: ")?;
            if readiness["count"].as_i64() < Some(2) {
                return None;
            }
            Some((
                sick_event(&events, "Unhealthy", "Liveness probe failed: ")?,
                readiness,
                sick_event(&events, "Killing", "Container sick failed liveness probe")?,
            ))
        },
    );
    assert_eq!(liveness["type"], "Warning", "{liveness}");
    assert_eq!(liveness["source"]["component"], "kubelet", "{liveness}");
    assert!(
        liveness["message"]
            .as_str()
            .is_some_and(|m| m.contains("/tmp/healthy")),
        "the exec probe's output is the message: {liveness}"
    );
    assert!(
        readiness["message"]
            .as_str()
            .is_some_and(|m| m.contains(":81")),
        "{readiness}"
    );
    assert_eq!(
        killing["message"], "Container sick failed liveness probe, will be restarted",
        "{killing}"
    );
    assert_eq!(killing["type"], "Normal", "{killing}");
    let describe = lab
        .control
        .kubectl_ok(&["describe", "pod", "probed", "-n", "default"]);
    assert!(
        describe.contains("Unhealthy") && describe.contains("Liveness probe failed:"),
        "kubectl describe shows the probe failures:\n{describe}"
    );
}

#[test]
fn init_containers_run_to_completion_in_order_before_the_app_starts() {
    if !require_privileged(TOOLS) {
        return;
    }
    let lab = KubeletLab::start();
    // Each init container appends to a shared emptyDir; the app reports what it found.
    lab.apply(&pod_manifest(
        &lab,
        "inits",
        &format!(
            "  restartPolicy: Never\n  initContainers:\n  - name: first\n    image: {image}\n    command: [\"sh\", \"-c\", \"echo -n one >> /work/order\"]\n    volumeMounts: [{{name: work, mountPath: /work}}]\n  - name: second\n    image: {image}\n    command: [\"sh\", \"-c\", \"echo -n ,two >> /work/order\"]\n    volumeMounts: [{{name: work, mountPath: /work}}]\n  containers:\n  - name: app\n    image: {image}\n    command: [\"sh\", \"-c\", \"cat /work/order > /dev/termination-log\"]\n    volumeMounts: [{{name: work, mountPath: /work}}]\n  volumes:\n  - name: work\n    emptyDir: {{}}\n",
            image = lab.image
        ),
    ));
    let pod = lab.wait_pod("inits", "Succeeded", Duration::from_secs(90), |p| {
        p["status"]["phase"] == "Succeeded"
    });
    let app = container_status(&pod, "app");
    assert_eq!(app["state"]["terminated"]["message"], "one,two", "{app}");
    let inits = pod["status"]["initContainerStatuses"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    assert_eq!(inits.len(), 2, "{pod}");
    for i in &inits {
        assert_eq!(i["state"]["terminated"]["reason"], "Completed", "{i}");
    }
}

#[test]
fn node_registers_with_its_capacity_renews_its_lease_and_is_ready_only_with_a_cni_network() {
    if !require_privileged(TOOLS) {
        return;
    }
    let lab = KubeletLab::start();
    let node: Value = serde_json::from_str(&lab.control.kubectl_ok(&[
        "get",
        "node",
        &lab.node_name,
        "-o",
        "json",
    ]))
    .expect("node json");
    assert_eq!(node["status"]["capacity"]["pods"], "110", "{node}");
    assert_eq!(node["status"]["allocatable"]["pods"], "110", "{node}");
    assert!(node["status"]["capacity"]["cpu"].is_string(), "{node}");
    assert!(node["status"]["nodeInfo"]["kernelVersion"]
        .as_str()
        .is_some_and(|k| !k.is_empty()));
    assert!(node["status"]["nodeInfo"]["containerRuntimeVersion"]
        .as_str()
        .is_some_and(|v| v.starts_with("windlass://")));
    let address = node["status"]["addresses"]
        .as_array()
        .and_then(|a| a.iter().find(|a| a["type"] == "InternalIP"))
        .map(|a| a["address"].clone())
        .unwrap_or_default();
    assert_eq!(address, "127.0.0.1");
    let holder = lab.control.kubectl_ok(&[
        "get",
        "lease",
        "-n",
        "kube-node-lease",
        &lab.node_name,
        "-o",
        "jsonpath={.spec.holderIdentity}",
    ]);
    assert_eq!(holder.trim(), lab.node_name);
    // The plain-HTTP health endpoint on the node's loopback (--healthz-port, 10248 by default).
    let healthz = windlass_tests::lab::in_netns(&lab.netns.path(), || {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect(("127.0.0.1", 10248)).expect("connect to healthz");
        s.set_read_timeout(Some(Duration::from_secs(5)))
            .expect("read timeout");
        s.write_all(b"GET /healthz HTTP/1.0\r\nHost: localhost\r\n\r\n")
            .expect("request");
        let mut out = String::new();
        let _ = s.read_to_string(&mut out);
        out
    })
    .expect("in the node netns");
    assert!(
        healthz.starts_with("HTTP/1.0 200") && healthz.ends_with("ok"),
        "{healthz}"
    );

    let ready = |want: &str| {
        let name = lab.node_name.clone();
        windlass_tests::wait_for(
            &format!("node Ready={want}"),
            Duration::from_secs(40),
            || {
                let out = lab.control.kubectl(&[
                    "get",
                    "node",
                    &name,
                    "-o",
                    "jsonpath={.status.conditions[?(@.type==\"Ready\")].status} {.status.conditions[?(@.type==\"Ready\")].message}",
                ]);
                let text = String::from_utf8_lossy(&out.stdout).to_string();
                text.starts_with(want).then_some(text)
            },
        )
    };
    let conf = lab.cni_dir.path().join("net.d/10-lab.conflist");
    let aside = lab.cni_dir.path().join("10-lab.conflist");
    std::fs::rename(&conf, &aside).expect("move the CNI config away");
    let message = ready("False");
    assert!(message.contains("cni config uninitialized"), "{message}");
    std::fs::rename(&aside, &conf).expect("restore the CNI config");
    ready("True");
}

#[test]
fn container_over_its_memory_limit_is_reported_oom_killed() {
    if !require_privileged(TOOLS) {
        return;
    }
    let lab = KubeletLab::start();
    // dd allocates its whole block at once: 256 MiB against a 32 MiB limit.
    lab.apply(&pod_manifest(
        &lab,
        "hog",
        &format!(
            "  restartPolicy: Never\n  containers:\n  - name: hog\n    image: {}\n    command: [\"dd\", \"if=/dev/zero\", \"of=/dev/null\", \"bs=256M\", \"count=1\"]\n    resources:\n      limits: {{memory: 32Mi, cpu: 500m}}\n",
            lab.image
        ),
    ));
    let pod = lab.wait_pod("hog", "Failed", Duration::from_secs(90), |p| {
        p["status"]["phase"] == "Failed"
    });
    let c = container_status(&pod, "hog");
    assert_eq!(c["state"]["terminated"]["reason"], "OOMKilled", "{c}");
    assert_eq!(c["state"]["terminated"]["exitCode"], 137, "{c}");
    assert_eq!(pod["status"]["qosClass"], "Guaranteed");
}

#[test]
fn secret_reaches_the_container_from_memory_and_its_mount_goes_with_the_pod() {
    if !require_privileged(TOOLS) {
        return;
    }
    // With its own node's credentials: the API server lets it read only what its pods use.
    let lab = KubeletLab::start_with_node_credentials();
    lab.apply(
        "apiVersion: v1\nkind: Secret\nmetadata:\n  name: creds\n  namespace: default\nstringData:\n  password: s3cret\n",
    );
    lab.apply(&pod_manifest(
        &lab,
        "vault",
        &format!(
            "  restartPolicy: Never\n  containers:\n  - name: app\n    image: {}\n    command: [\"sh\", \"-c\", \"echo \\\"$PASSWORD $(cat /secrets/password) $(grep ' /secrets ' /proc/mounts | cut -d' ' -f3)\\\" > /dev/termination-log\"]\n    env:\n    - name: PASSWORD\n      valueFrom:\n        secretKeyRef: {{name: creds, key: password}}\n    volumeMounts:\n    - {{name: creds, mountPath: /secrets}}\n  volumes:\n  - name: creds\n    secret: {{secretName: creds}}\n",
            lab.image
        ),
    ));
    let pod = lab.wait_pod("vault", "Succeeded", Duration::from_secs(90), |p| {
        p["status"]["phase"] == "Succeeded"
    });
    let uid = pod["metadata"]["uid"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert_eq!(
        container_status(&pod, "app")["state"]["terminated"]["message"]
            .as_str()
            .map(str::trim),
        Some("s3cret s3cret tmpfs"),
        "env, file and a tmpfs-backed volume: {pod}"
    );
    // The secret volume is a tmpfs on the node, never written to disk.
    let tmpfs = lab
        .mounts()
        .iter()
        .any(|m| m.contains(&uid) && m.contains("kubernetes.io~secret") && m.contains(" - tmpfs "));
    assert!(tmpfs, "secret tmpfs mount: {:?}", lab.mounts());
    lab.control
        .kubectl_ok(&["delete", "pod", "vault", "--timeout=60s"]);
    windlass_tests::wait_for("the secret mount to go", Duration::from_secs(10), || {
        lab.mounts().is_empty().then_some(())
    });
}

#[test]
fn pod_force_deleted_while_the_kubelet_was_down_is_cleaned_up_when_it_starts() {
    if !require_privileged(TOOLS) {
        return;
    }
    let mut lab = KubeletLab::start();
    lab.apply(&nginx_pod(&lab));
    let pod = lab.wait_pod(
        "nginx-pod",
        "Running",
        Duration::from_secs(90),
        running_with_ip,
    );
    let uid = pod["metadata"]["uid"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    let ip = pod["status"]["podIP"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    lab.kill_kubelet();
    lab.control
        .kubectl_ok(&["delete", "pod", "nginx-pod", "--grace-period=0", "--force"]);
    assert!(lab.pod("nginx-pod").is_none());
    serves_page(&lab, &ip); // nobody stopped it yet
    lab.start_kubelet();
    windlass_tests::wait_for(
        "the orphaned pod to be cleaned up",
        Duration::from_secs(30),
        || {
            (lab.sandbox_dirs().is_empty()
                && lab.ip_reservations().is_empty()
                && lab.pod_cgroups(&uid).is_empty()
                && lab.mounts().is_empty()
                && !lab.root.path().join("pods").join(&uid).exists())
            .then_some(())
        },
    );
    assert!(lab.http_get(&ip, 80).is_err(), "nothing answers on {ip}");
}
