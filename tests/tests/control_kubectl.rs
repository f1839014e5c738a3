//! The real kubectl against `windlass-control serve`: every command here is what a user types.

use std::io::{BufRead, BufReader};
use std::process::Stdio;
use std::sync::mpsc;
use std::time::Duration;

use serde_json::Value;
use windlass_tests::control::{kubectl_version_path, ControlPlane};
use windlass_tests::{require_privileged, wait_for, ChildGuard};

const DEPLOYMENT: &str = r#"
apiVersion: apps/v1
kind: Deployment
metadata:
  name: web
  labels: {app: web}
spec:
  replicas: 2
  selector:
    matchLabels: {app: web}
  template:
    metadata:
      labels: {app: web}
    spec:
      containers:
      - name: web
        image: nginx:1.25
        ports:
        - containerPort: 80
        env:
        - {name: MODE, value: blue}
      - name: sidecar
        image: busybox
        command: [sleep, "3600"]
"#;

fn pod(name: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: {name}\n  labels: {{app: demo}}\nspec:\n  containers:\n  - name: main\n    image: busybox:1.36\n    command: [sleep, \"3600\"]\n"
    )
}

fn json(s: &str) -> Value {
    serde_json::from_str(s).unwrap_or_else(|e| panic!("not JSON ({e}): {s}"))
}

#[test]
fn kubectl_version_and_api_resources_show_the_served_kinds() {
    if !require_privileged(&["kubectl"]) {
        return;
    }
    let cp = ControlPlane::start();
    let version = cp.kubectl_ok(&["version", "-o", "json"]);
    let v = json(&version);
    assert_eq!(v["serverVersion"]["major"], "1");
    assert!(v["serverVersion"]["gitVersion"]
        .as_str()
        .unwrap_or_default()
        .starts_with("v1."));

    let resources = cp.kubectl_ok(&["api-resources", "--no-headers"]);
    for (name, short, kind) in [
        ("pods", "po", "Pod"),
        ("services", "svc", "Service"),
        ("deployments", "deploy", "Deployment"),
        ("replicasets", "rs", "ReplicaSet"),
        ("namespaces", "ns", "Namespace"),
        ("nodes", "no", "Node"),
        ("configmaps", "cm", "ConfigMap"),
    ] {
        let line = resources
            .lines()
            .find(|l| l.split_whitespace().next() == Some(name))
            .unwrap_or_else(|| panic!("{name} missing from api-resources:\n{resources}"));
        assert!(line.contains(short) && line.contains(kind), "{line}");
    }
    for name in [
        "endpointslices",
        "leases",
        "clusterroles",
        "rolebindings",
        "secrets",
        "events",
    ] {
        assert!(
            resources.lines().any(|l| l.starts_with(name)),
            "{name} missing:\n{resources}"
        );
    }
    // The bootstrap namespaces and the `kubernetes` service exist from the start.
    let ns = cp.kubectl_ok(&["get", "ns", "-o", "name"]);
    for n in ["default", "kube-system", "kube-public", "kube-node-lease"] {
        assert!(ns.contains(&format!("namespace/{n}")), "{ns}");
    }
    let svc = cp.kubectl_ok(&[
        "get",
        "svc",
        "kubernetes",
        "-o",
        "jsonpath={.spec.clusterIP}",
    ]);
    assert_eq!(svc, "10.96.0.1");
}

#[test]
fn apply_creates_then_strategic_merge_patches_a_deployment() {
    if !require_privileged(&["kubectl"]) {
        return;
    }
    let cp = ControlPlane::start();
    let out = cp.kubectl_stdin_ok(&["apply", "-f", "-"], DEPLOYMENT);
    assert!(out.contains("deployment.apps/web created"), "{out}");
    let d = json(&cp.kubectl_ok(&["get", "deploy", "web", "-o", "json"]));
    assert_eq!(d["metadata"]["generation"], 1);
    assert!(
        d["metadata"]["annotations"]["kubectl.kubernetes.io/last-applied-configuration"]
            .is_string()
    );
    // Upstream defaults.
    assert_eq!(d["spec"]["strategy"]["type"], "RollingUpdate");
    assert_eq!(d["spec"]["template"]["spec"]["restartPolicy"], "Always");
    assert_eq!(
        d["spec"]["template"]["spec"]["containers"][0]["imagePullPolicy"],
        "IfNotPresent"
    );
    assert_eq!(
        d["spec"]["template"]["spec"]["containers"][1]["imagePullPolicy"],
        "Always"
    );

    // Change the image and replicas, drop the env var: kubectl sends a strategic merge patch.
    let changed = DEPLOYMENT
        .replace("nginx:1.25", "nginx:1.26")
        .replace("replicas: 2", "replicas: 3")
        .replace("        env:\n        - {name: MODE, value: blue}\n", "");
    let out = cp.kubectl_stdin_ok(&["apply", "-f", "-"], &changed);
    assert!(out.contains("deployment.apps/web configured"), "{out}");
    let d = json(&cp.kubectl_ok(&["get", "deploy", "web", "-o", "json"]));
    assert_eq!(d["spec"]["replicas"], 3);
    let containers = d["spec"]["template"]["spec"]["containers"]
        .as_array()
        .expect("containers");
    assert_eq!(
        containers.len(),
        2,
        "containers merged by name, none lost or duplicated"
    );
    assert_eq!(containers[0]["image"], "nginx:1.26");
    assert!(
        containers[0].get("env").is_none(),
        "the removed env var is deleted by the patch"
    );
    assert_eq!(containers[1]["name"], "sidecar");
    assert_eq!(
        d["metadata"]["generation"], 2,
        "a spec change bumps the generation"
    );

    // Applying the same manifest again changes nothing.
    let out = cp.kubectl_stdin_ok(&["apply", "-f", "-"], &changed);
    assert!(out.contains("unchanged"), "{out}");

    // Server-side apply creates and updates too.
    let cm = "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: settings\ndata:\n  a: \"1\"\n";
    cp.kubectl_stdin_ok(&["apply", "--server-side", "-f", "-"], cm);
    cp.kubectl_stdin_ok(
        &["apply", "--server-side", "-f", "-"],
        &cm.replace("\"1\"", "\"2\""),
    );
    let c = json(&cp.kubectl_ok(&[
        "get",
        "cm",
        "settings",
        "-o",
        "json",
        "--show-managed-fields",
    ]));
    assert_eq!(c["data"]["a"], "2");
    assert_eq!(c["metadata"]["managedFields"][0]["manager"], "kubectl");

    // `kubectl scale` goes through the scale subresource.
    cp.kubectl_ok(&["scale", "deployment", "web", "--replicas=5"]);
    assert_eq!(
        cp.kubectl_ok(&["get", "deploy", "web", "-o", "jsonpath={.spec.replicas}"]),
        "5"
    );
}

#[test]
fn get_prints_upstream_columns_and_wide_adds_ip_and_node() {
    if !require_privileged(&["kubectl"]) {
        return;
    }
    let cp = ControlPlane::start();
    cp.kubectl_stdin_ok(&["create", "-f", "-"], &pod("p1"));
    let out = cp.kubectl_ok(&["get", "pods"]);
    let header: Vec<&str> = out
        .lines()
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .collect();
    assert_eq!(
        header,
        ["NAME", "READY", "STATUS", "RESTARTS", "AGE"],
        "{out}"
    );
    let row: Vec<&str> = out
        .lines()
        .nth(1)
        .unwrap_or_default()
        .split_whitespace()
        .collect();
    assert_eq!(&row[..4], ["p1", "0/1", "Pending", "0"], "{out}");

    let wide = cp.kubectl_ok(&["get", "pods", "-o", "wide"]);
    let header = wide.lines().next().unwrap_or_default();
    for col in ["IP", "NODE", "NOMINATED NODE", "READINESS GATES"] {
        assert!(header.contains(col), "{wide}");
    }

    cp.kubectl_stdin_ok(&["apply", "-f", "-"], DEPLOYMENT);
    let out = cp.kubectl_ok(&["get", "deployments"]);
    let header: Vec<&str> = out
        .lines()
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .collect();
    assert_eq!(
        header,
        ["NAME", "READY", "UP-TO-DATE", "AVAILABLE", "AGE"],
        "{out}"
    );
    assert!(
        out.lines().nth(1).unwrap_or_default().starts_with("web"),
        "{out}"
    );

    let svc = "apiVersion: v1\nkind: Service\nmetadata:\n  name: web\nspec:\n  type: NodePort\n  selector: {app: web}\n  ports:\n  - port: 80\n";
    cp.kubectl_stdin_ok(&["create", "-f", "-"], svc);
    let out = cp.kubectl_ok(&["get", "services", "web"]);
    let header: Vec<&str> = out
        .lines()
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .collect();
    assert_eq!(
        header,
        [
            "NAME",
            "TYPE",
            "CLUSTER-IP",
            "EXTERNAL-IP",
            "PORT(S)",
            "AGE"
        ],
        "{out}"
    );
    let s = json(&cp.kubectl_ok(&["get", "svc", "web", "-o", "json"]));
    let ip = s["spec"]["clusterIP"]
        .as_str()
        .expect("clusterIP allocated");
    assert!(
        ip.starts_with("10.9") || ip.starts_with("10.10") || ip.starts_with("10.11"),
        "{ip} in 10.96.0.0/12"
    );
    let node_port = s["spec"]["ports"][0]["nodePort"]
        .as_i64()
        .expect("nodePort allocated");
    assert!((30000..=32767).contains(&node_port));
    assert_eq!(
        s["spec"]["ports"][0]["targetPort"], 80,
        "targetPort defaults to port"
    );
    assert_eq!(s["spec"]["ports"][0]["protocol"], "TCP");
    assert_eq!(s["spec"]["sessionAffinity"], "None");
    assert!(out.contains(&format!("80:{node_port}/TCP")), "{out}");

    let node = "apiVersion: v1\nkind: Node\nmetadata:\n  name: n1\n  labels: {node-role.kubernetes.io/control-plane: \"\"}\n";
    cp.kubectl_stdin_ok(&["create", "-f", "-"], node);
    let out = cp.kubectl_ok(&["get", "nodes"]);
    let header: Vec<&str> = out
        .lines()
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .collect();
    assert_eq!(
        header,
        ["NAME", "STATUS", "ROLES", "AGE", "VERSION"],
        "{out}"
    );
    assert!(out.contains("control-plane"), "{out}");

    // Selectors and pagination as kubectl sends them.
    for i in 0..5 {
        cp.kubectl_stdin_ok(
            &["create", "-f", "-"],
            &pod(&format!("q{i}")).replace("app: demo", "app: q"),
        );
    }
    let names = cp.kubectl_ok(&["get", "pods", "-l", "app=q", "--chunk-size=2", "-o", "name"]);
    assert_eq!(names.lines().count(), 5, "{names}");
    // (The deployment's pods, made by the ReplicaSet controller when it runs, are left out.)
    let names = cp.kubectl_ok(&["get", "pods", "-l", "app notin (q,web)", "-o", "name"]);
    assert_eq!(names.trim(), "pod/p1");
    let names = cp.kubectl_ok(&[
        "get",
        "pods",
        "-l",
        "app!=web",
        "--field-selector",
        "metadata.name!=p1,status.phase=Pending",
        "-o",
        "name",
    ]);
    assert_eq!(names.lines().count(), 5, "{names}");
}

#[test]
fn yaml_and_json_output_carry_system_fields_and_defaults() {
    if !require_privileged(&["kubectl"]) {
        return;
    }
    let cp = ControlPlane::start();
    cp.kubectl_stdin_ok(&["create", "-f", "-"], &pod("p1"));
    let p = json(&cp.kubectl_ok(&["get", "pod", "p1", "-o", "json"]));
    assert!(p["metadata"]["uid"].as_str().is_some_and(|u| u.len() == 36));
    assert!(p["metadata"]["resourceVersion"]
        .as_str()
        .is_some_and(|r| r.parse::<i64>().is_ok()));
    assert!(p["metadata"]["creationTimestamp"]
        .as_str()
        .is_some_and(|t| t.ends_with('Z')));
    assert_eq!(p["spec"]["restartPolicy"], "Always");
    assert_eq!(p["spec"]["dnsPolicy"], "ClusterFirst");
    assert_eq!(p["spec"]["terminationGracePeriodSeconds"], 30);
    assert_eq!(p["spec"]["schedulerName"], "default-scheduler");
    assert_eq!(
        p["spec"]["containers"][0]["imagePullPolicy"],
        "IfNotPresent"
    );
    assert_eq!(
        p["spec"]["containers"][0]["terminationMessagePath"],
        "/dev/termination-log"
    );
    assert_eq!(p["status"]["phase"], "Pending");
    assert_eq!(p["status"]["qosClass"], "BestEffort");
    let yaml = cp.kubectl_ok(&["get", "pod", "p1", "-o", "yaml"]);
    assert!(
        yaml.contains("kind: Pod") && yaml.contains("name: p1"),
        "{yaml}"
    );

    // generateName gets a random suffix.
    let gen = "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  generateName: cfg-\ndata: {a: b}\n";
    let out = cp.kubectl_stdin_ok(&["create", "-f", "-", "-o", "name"], gen);
    let name = out
        .trim()
        .strip_prefix("configmap/")
        .expect("configmap name");
    assert!(name.starts_with("cfg-") && name.len() == 9, "{name}");
}

#[test]
fn an_invalid_object_is_rejected_naming_its_field() {
    if !require_privileged(&["kubectl"]) {
        return;
    }
    let cp = ControlPlane::start();
    let bad = "apiVersion: v1\nkind: Pod\nmetadata:\n  name: bad\nspec:\n  containers:\n  - name: c\n    image: \"\"\n    ports: [{containerPort: 70000}]\n";
    let out = cp.kubectl_stdin(&["create", "-f", "-"], bad);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("is invalid"), "{err}");
    assert!(
        err.contains("spec.containers[0].image: Required value"),
        "{err}"
    );
    assert!(
        err.contains("spec.containers[0].ports[0].containerPort"),
        "{err}"
    );

    let mismatch = DEPLOYMENT.replace(
        "labels: {app: web}\n    spec",
        "labels: {app: other}\n    spec",
    );
    let err = String::from_utf8_lossy(&cp.kubectl_stdin(&["create", "-f", "-"], &mismatch).stderr)
        .into_owned();
    assert!(err.contains("spec.template.metadata.labels"), "{err}");

    // Unknown fields are refused under kubectl's default strict validation.
    let unknown = pod("u").replace("spec:\n", "spec:\n  bogusField: 1\n");
    let err = String::from_utf8_lossy(&cp.kubectl_stdin(&["create", "-f", "-"], &unknown).stderr)
        .into_owned();
    assert!(err.contains("unknown field \"spec.bogusField\""), "{err}");

    // Nothing was stored.
    let err = cp.kubectl_err(&["get", "pod", "bad"]);
    assert!(
        err.contains("NotFound") && err.contains("pods \"bad\" not found"),
        "{err}"
    );
    // A namespaced object needs its namespace.
    let err = String::from_utf8_lossy(
        &cp.kubectl_stdin(&["create", "-n", "nope", "-f", "-"], &pod("x"))
            .stderr,
    )
    .into_owned();
    assert!(err.contains("namespaces \"nope\" not found"), "{err}");
}

#[test]
fn a_stale_update_is_rejected_with_a_conflict() {
    if !require_privileged(&["kubectl"]) {
        return;
    }
    let cp = ControlPlane::start();
    cp.kubectl_stdin_ok(&["create", "-f", "-"], &pod("p1"));
    let stale = cp.kubectl_ok(&["get", "pod", "p1", "-o", "yaml"]);
    cp.kubectl_ok(&["label", "pod", "p1", "changed=yes"]);
    let out = cp.kubectl_stdin(&["replace", "-f", "-"], &stale);
    assert!(
        !out.status.success(),
        "a replace with an old resourceVersion must fail"
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("Conflict") && err.contains("the object has been modified"),
        "{err}"
    );
    // A fresh replace works.
    let fresh = cp
        .kubectl_ok(&["get", "pod", "p1", "-o", "yaml"])
        .replace("changed: \"yes\"", "changed: again");
    cp.kubectl_stdin_ok(&["replace", "-f", "-"], &fresh);
    assert_eq!(
        cp.kubectl_ok(&[
            "get",
            "pod",
            "p1",
            "-o",
            "jsonpath={.metadata.labels.changed}"
        ]),
        "again"
    );
    // Pod specs are immutable except for images and a few fields, as upstream.
    let err = cp.kubectl_err(&[
        "patch",
        "pod",
        "p1",
        "-p",
        r#"{"spec":{"restartPolicy":"Never"}}"#,
    ]);
    assert!(err.contains("pod updates may not change fields"), "{err}");
    cp.kubectl_ok(&["set", "image", "pod/p1", "main=busybox:1.37"]);
    assert_eq!(
        cp.kubectl_ok(&[
            "get",
            "pod",
            "p1",
            "-o",
            "jsonpath={.spec.containers[0].image}"
        ]),
        "busybox:1.37"
    );
    // Creating it again conflicts too.
    let err = String::from_utf8_lossy(&cp.kubectl_stdin(&["create", "-f", "-"], &pod("p1")).stderr)
        .into_owned();
    assert!(
        err.contains("AlreadyExists") && err.contains("pods \"p1\" already exists"),
        "{err}"
    );
}

#[test]
fn label_annotate_and_all_three_patch_types_change_the_object() {
    if !require_privileged(&["kubectl"]) {
        return;
    }
    let cp = ControlPlane::start();
    cp.kubectl_stdin_ok(&["apply", "-f", "-"], DEPLOYMENT);
    cp.kubectl_ok(&["label", "deployment", "web", "tier=front"]);
    cp.kubectl_ok(&["annotate", "deployment", "web", "note=hello"]);
    cp.kubectl_ok(&["patch", "deployment", "web", "-p",
        r#"{"spec":{"template":{"spec":{"containers":[{"name":"sidecar","image":"busybox:1.36"}]}}}}"#]);
    cp.kubectl_ok(&[
        "patch",
        "deployment",
        "web",
        "--type=merge",
        "-p",
        r#"{"metadata":{"labels":{"merged":"yes"}}}"#,
    ]);
    cp.kubectl_ok(&[
        "patch",
        "deployment",
        "web",
        "--type=json",
        "-p",
        r#"[{"op":"replace","path":"/spec/replicas","value":4}]"#,
    ]);
    let d = json(&cp.kubectl_ok(&["get", "deploy", "web", "-o", "json"]));
    assert_eq!(d["metadata"]["labels"]["tier"], "front");
    assert_eq!(d["metadata"]["labels"]["merged"], "yes");
    assert_eq!(d["metadata"]["annotations"]["note"], "hello");
    assert_eq!(d["spec"]["replicas"], 4);
    let containers = d["spec"]["template"]["spec"]["containers"]
        .as_array()
        .expect("containers");
    assert_eq!(
        containers.len(),
        2,
        "strategic merge by name keeps the other container"
    );
    assert_eq!(containers[0]["image"], "nginx:1.25");
    assert_eq!(containers[1]["image"], "busybox:1.36");
    cp.kubectl_ok(&["label", "deployment", "web", "tier-"]);
    let labels = cp.kubectl_ok(&["get", "deploy", "web", "-o", "jsonpath={.metadata.labels}"]);
    assert!(!labels.contains("tier"), "{labels}");
    let err = cp.kubectl_err(&[
        "patch",
        "deployment",
        "web",
        "--type=json",
        "-p",
        r#"[{"op":"test","path":"/spec/replicas","value":9}]"#,
    ]);
    assert!(err.contains("Invalid") || err.contains("invalid"), "{err}");
}

#[test]
fn get_watch_sees_events_in_order() {
    if !require_privileged(&["kubectl"]) {
        return;
    }
    let cp = ControlPlane::start();
    cp.kubectl_stdin_ok(&["create", "-f", "-"], &pod("before"));
    let mut watch = ChildGuard::spawn(
        cp.kubectl_cmd()
            .args([
                "get",
                "pods",
                "--watch",
                "--output-watch-events",
                "--no-headers",
            ])
            .stdout(Stdio::piped())
            .stderr(Stdio::null()),
    )
    .expect("start kubectl get -w");
    let stdout = watch.child_mut().stdout.take().expect("stdout");
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let next = || {
        rx.recv_timeout(Duration::from_secs(20))
            .expect("a watch event within 20 s")
    };
    let first = next();
    assert!(
        first.starts_with("ADDED") && first.contains("before"),
        "{first}"
    );
    cp.kubectl_stdin_ok(&["create", "-f", "-"], &pod("during"));
    let l = next();
    assert!(l.starts_with("ADDED") && l.contains("during"), "{l}");
    cp.kubectl_ok(&["label", "pod", "during", "step=2"]);
    let l = next();
    assert!(l.starts_with("MODIFIED") && l.contains("during"), "{l}");
    cp.kubectl_ok(&["delete", "pod", "during", "--wait=false"]);
    let l = next();
    assert!(l.starts_with("DELETED") && l.contains("during"), "{l}");
}

#[test]
fn describe_shows_the_object() {
    if !require_privileged(&["kubectl"]) {
        return;
    }
    let cp = ControlPlane::start();
    cp.kubectl_stdin_ok(&["create", "-f", "-"], &pod("p1"));
    let out = cp.kubectl_ok(&["describe", "pod", "p1"]);
    for want in [
        "Name:",
        "p1",
        "Namespace:",
        "default",
        "busybox:1.36",
        "QoS Class:",
        "BestEffort",
        "Tolerations:",
    ] {
        assert!(out.contains(want), "{want} missing:\n{out}");
    }
    cp.kubectl_stdin_ok(&["apply", "-f", "-"], DEPLOYMENT);
    let out = cp.kubectl_ok(&["describe", "deployment", "web"]);
    assert!(
        out.contains("Replicas:") && out.contains("nginx:1.25"),
        "{out}"
    );
}

#[test]
fn delete_removes_objects_and_a_namespace_takes_its_contents_along() {
    if !require_privileged(&["kubectl"]) {
        return;
    }
    let cp = ControlPlane::start();
    cp.kubectl_stdin_ok(
        &["create", "-f", "-"],
        "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: team\n",
    );
    cp.kubectl_stdin_ok(&["create", "-n", "team", "-f", "-"], &pod("p1"));
    cp.kubectl_stdin_ok(
        &["create", "-n", "team", "-f", "-"],
        "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: c\n",
    );
    let out = cp.kubectl_ok(&["delete", "pod", "p1", "-n", "team"]);
    assert!(out.contains("pod \"p1\" deleted"), "{out}");
    let err = cp.kubectl_err(&["get", "pod", "p1", "-n", "team"]);
    assert!(err.contains("not found"), "{err}");

    // A pod on a node is deleted gracefully: it stays, marked, until its grace period ends or it is confirmed.
    let bound = pod("g1").replace(
        "spec:\n",
        "spec:\n  nodeName: n1\n  terminationGracePeriodSeconds: 60\n",
    );
    cp.kubectl_stdin_ok(&["create", "-n", "team", "-f", "-"], &bound);
    cp.kubectl_ok(&["delete", "pod", "g1", "-n", "team", "--wait=false"]);
    let p = json(&cp.kubectl_ok(&["get", "pod", "g1", "-n", "team", "-o", "json"]));
    assert!(p["metadata"]["deletionTimestamp"].is_string());
    assert_eq!(p["metadata"]["deletionGracePeriodSeconds"], 60);
    let status = cp.kubectl_ok(&["get", "pod", "g1", "-n", "team", "--no-headers"]);
    assert!(status.contains("Terminating"), "{status}");
    cp.kubectl_ok(&[
        "delete",
        "pod",
        "g1",
        "-n",
        "team",
        "--grace-period=0",
        "--force",
    ]);
    cp.kubectl_err(&["get", "pod", "g1", "-n", "team"]);

    // A finalizer holds deletion until it is removed.
    let held = "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: held\n  finalizers: [example.com/hold]\n";
    cp.kubectl_stdin_ok(&["create", "-n", "team", "-f", "-"], held);
    cp.kubectl_ok(&["delete", "cm", "held", "-n", "team", "--wait=false"]);
    let c = json(&cp.kubectl_ok(&["get", "cm", "held", "-n", "team", "-o", "json"]));
    assert!(c["metadata"]["deletionTimestamp"].is_string());
    cp.kubectl_ok(&[
        "patch",
        "cm",
        "held",
        "-n",
        "team",
        "--type=merge",
        "-p",
        r#"{"metadata":{"finalizers":null}}"#,
    ]);
    cp.kubectl_err(&["get", "cm", "held", "-n", "team"]);

    cp.kubectl_ok(&["delete", "namespace", "team", "--timeout=30s"]);
    cp.kubectl_err(&["get", "namespace", "team"]);
    let left = cp.kubectl_ok(&["get", "configmaps", "-A", "-o", "name"]);
    assert!(!left.contains("configmap/c"), "{left}");
}

#[test]
fn explain_describes_fields_from_the_openapi_schema() {
    if !require_privileged(&["kubectl"]) {
        return;
    }
    let cp = ControlPlane::start();
    let out = cp.kubectl_ok(&["explain", "deployment.spec.replicas"]);
    assert!(out.contains("KIND:") && out.contains("Deployment"), "{out}");
    assert!(
        out.contains("replicas") && out.contains("<integer>"),
        "{out}"
    );
    let out = cp.kubectl_ok(&["explain", "pods.spec.containers.image"]);
    assert!(out.contains("<string>"), "{out}");
}

#[test]
fn a_server_restart_loses_nothing() {
    if !require_privileged(&["kubectl"]) {
        return;
    }
    let mut cp = ControlPlane::start();
    cp.kubectl_stdin_ok(&["apply", "-f", "-"], DEPLOYMENT);
    for i in 0..20 {
        cp.kubectl_stdin_ok(&["create", "-f", "-"], &pod(&format!("p{i}")));
    }
    let before = cp.kubectl_ok(&["get", "pods,deployments,services", "-o", "json"]);
    let rv_before: i64 = json(&cp.kubectl_ok(&["get", "--raw", "/api/v1/namespaces/default/pods"]))
        ["metadata"]["resourceVersion"]
        .as_str()
        .and_then(|s| s.parse().ok())
        .expect("list resourceVersion");
    cp.restart();
    let after = cp.kubectl_ok(&["get", "pods,deployments,services", "-o", "json"]);
    let items = |s: &str| json(s)["items"].clone();
    assert_eq!(
        items(&before),
        items(&after),
        "every object survives with the same resourceVersion"
    );
    cp.kubectl_stdin_ok(&["create", "-f", "-"], &pod("new"));
    let rv: i64 = cp
        .kubectl_ok(&[
            "get",
            "pod",
            "new",
            "-o",
            "jsonpath={.metadata.resourceVersion}",
        ])
        .parse()
        .expect("rv");
    assert!(rv > rv_before, "revisions keep growing across restarts");
}

#[test]
fn requests_without_a_client_certificate_are_refused() {
    if !require_privileged(&["curl"]) {
        return;
    }
    let cp = ControlPlane::start();
    let out = std::process::Command::new("curl")
        .args(["-sS", "--cacert"])
        .arg(cp.data_dir().join("pki/ca.crt"))
        .arg(format!("{}/api/v1/namespaces", cp.url()))
        .output()
        .expect("curl");
    let status = json(&String::from_utf8_lossy(&out.stdout));
    assert_eq!(status["kind"], "Status");
    assert_eq!(status["code"], 401);
    assert_eq!(status["reason"], "Unauthorized");
}

#[test]
fn kubectl_1_27_works_through_v2beta1_discovery() {
    if !require_privileged(&["kubectl"]) {
        return;
    }
    let old = kubectl_version_path("1.27");
    if !old.exists() {
        // Fail rather than skip: this machine image promises kubectl 1.27.
        panic!("{} is missing", old.display());
    }
    let cp = ControlPlane::start();
    let run = |args: &[&str]| {
        let out = cp
            .kubectl_version_cmd(Some("1.27"))
            .args(args)
            .output()
            .expect("kubectl 1.27");
        assert!(
            out.status.success(),
            "kubectl 1.27 {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let resources = run(&["api-resources", "--no-headers"]);
    assert!(
        resources.lines().any(|l| l.starts_with("deployments")),
        "{resources}"
    );
    let dir = tempfile::tempdir().expect("tmp");
    let file = dir.path().join("pod.yaml");
    std::fs::write(&file, pod("old")).expect("write manifest");
    run(&[
        "create",
        "--validate=false",
        "-f",
        file.to_str().expect("utf-8 path"),
    ]);
    let out = run(&["get", "pods"]);
    assert!(out.contains("old") && out.contains("Pending"), "{out}");
    wait_for(
        "kubectl 1.27 get po by short name",
        Duration::from_secs(5),
        || {
            run(&["get", "po", "old", "-o", "name"])
                .contains("pod/old")
                .then_some(())
        },
    );
}

#[test]
fn kubectl_create_subcommands_work_over_protobuf() {
    if !require_privileged(&["kubectl"]) {
        return;
    }
    let cp = ControlPlane::start();
    // kubectl ≥1.32 sends these bodies as protobuf.
    cp.kubectl_ok(&["create", "namespace", "pb"]);
    cp.kubectl_ok(&["create", "configmap", "c", "-n", "pb", "--from-literal=a=b"]);
    cp.kubectl_ok(&[
        "create",
        "secret",
        "generic",
        "s",
        "-n",
        "pb",
        "--from-literal=p=q",
    ]);
    cp.kubectl_ok(&[
        "create",
        "deployment",
        "d",
        "-n",
        "pb",
        "--image=nginx:1.25",
        "--replicas=2",
        "--port=80",
    ]);
    cp.kubectl_ok(&[
        "create",
        "service",
        "nodeport",
        "svc",
        "-n",
        "pb",
        "--tcp=80:8080",
    ]);
    cp.kubectl_ok(&["create", "serviceaccount", "sa", "-n", "pb"]);
    cp.kubectl_ok(&[
        "create",
        "role",
        "r",
        "-n",
        "pb",
        "--verb=get,list",
        "--resource=pods",
    ]);
    cp.kubectl_ok(&[
        "create",
        "rolebinding",
        "rb",
        "-n",
        "pb",
        "--role=r",
        "--user=bob",
    ]);
    assert_eq!(
        cp.kubectl_ok(&["get", "cm", "c", "-n", "pb", "-o", "jsonpath={.data.a}"]),
        "b"
    );
    assert_eq!(
        cp.kubectl_ok(&[
            "get",
            "secret",
            "s",
            "-n",
            "pb",
            "-o",
            "jsonpath={.data.p} {.type}"
        ]),
        "cQ== Opaque"
    );
    let d = json(&cp.kubectl_ok(&["get", "deploy", "d", "-n", "pb", "-o", "json"]));
    assert_eq!(d["spec"]["replicas"], 2);
    assert_eq!(
        d["spec"]["template"]["spec"]["containers"][0]["image"],
        "nginx:1.25"
    );
    assert_eq!(
        d["spec"]["template"]["spec"]["containers"][0]["ports"][0]["containerPort"],
        80
    );
    let s = json(&cp.kubectl_ok(&["get", "svc", "svc", "-n", "pb", "-o", "json"]));
    assert_eq!(s["spec"]["type"], "NodePort");
    assert_eq!(s["spec"]["ports"][0]["targetPort"], 8080);
    let rb = json(&cp.kubectl_ok(&["get", "rolebinding", "rb", "-n", "pb", "-o", "json"]));
    assert_eq!(rb["roleRef"]["name"], "r");
    assert_eq!(rb["subjects"][0]["name"], "bob");
}

#[test]
fn a_gracefully_deleted_pod_goes_away_when_its_grace_period_ends_even_across_a_restart() {
    if !require_privileged(&["kubectl"]) {
        return;
    }
    let mut cp = ControlPlane::start();
    for name in ["g1", "g2"] {
        let bound = pod(name).replace(
            "spec:\n",
            "spec:\n  nodeName: n1\n  terminationGracePeriodSeconds: 2\n",
        );
        cp.kubectl_stdin_ok(&["create", "-f", "-"], &bound);
        cp.kubectl_ok(&["delete", "pod", name, "--wait=false"]);
    }
    let terminating = cp.kubectl_ok(&["get", "pods", "--no-headers"]);
    assert_eq!(
        terminating.matches("Terminating").count(),
        2,
        "{terminating}"
    );
    // The server restarts mid-grace: the expiry is re-armed from the stored deletionTimestamp.
    cp.restart();
    wait_for(
        "both pods to be removed after their grace period",
        Duration::from_secs(20),
        || {
            cp.kubectl_ok(&["get", "pods", "-o", "name"])
                .trim()
                .is_empty()
                .then_some(())
        },
    );
}
