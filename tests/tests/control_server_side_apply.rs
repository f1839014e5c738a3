//! Server-side apply against `windlass-control serve` as a user meets it: `kubectl apply --server-side` creating,
//! pruning what a manager stops applying, conflicts with `kubectl scale` and `--force-conflicts`, co-owned fields,
//! `--show-managed-fields`, the move from client-side apply, and kube-rs `Patch::Apply`.

use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::{Api, Patch, PatchParams};
use serde_json::{json, Value};
use windlass_tests::control::ControlPlane;
use windlass_tests::require_privileged;

fn deployment(replicas: u32, labels: &str, containers: &str) -> String {
    format!(
        r#"apiVersion: apps/v1
kind: Deployment
metadata:
  name: web
  labels: {{{labels}}}
spec:
  replicas: {replicas}
  selector:
    matchLabels: {{app: web}}
  template:
    metadata:
      labels: {{app: web}}
    spec:
      containers:
{containers}"#
    )
}

const WEB: &str =
    "      - name: web\n        image: nginx:1.25\n        ports:\n        - containerPort: 80\n";
const SIDECAR: &str =
    "      - name: sidecar\n        image: busybox:1.36\n        command: [sleep, \"3600\"]\n";

fn get_json(cp: &ControlPlane, args: &[&str]) -> Value {
    let mut all = vec!["get"];
    all.extend_from_slice(args);
    all.extend_from_slice(&["-o", "json", "--show-managed-fields"]);
    let out = cp.kubectl_ok(&all);
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("not JSON ({e}): {out}"))
}

/// The managedFields entry of `manager` with `operation`, if any.
fn entry<'a>(obj: &'a Value, manager: &str, operation: &str) -> Option<&'a Value> {
    obj["metadata"]["managedFields"]
        .as_array()?
        .iter()
        .find(|e| e["manager"] == manager && e["operation"] == operation)
}

fn container_names(d: &Value) -> Vec<String> {
    d["spec"]["template"]["spec"]["containers"]
        .as_array()
        .map(|cs| {
            cs.iter()
                .filter_map(|c| c["name"].as_str().map(String::from))
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn server_side_apply_creates_prunes_and_conflicts_with_kubectl_scale_until_forced() {
    if !require_privileged(&["kubectl"]) {
        return;
    }
    let cp = ControlPlane::start();
    let apply =
        |manifest: &str| cp.kubectl_stdin_ok(&["apply", "--server-side", "-f", "-"], manifest);

    let out = apply(&deployment(2, "app: web, tier: front", WEB));
    assert!(
        out.contains("deployment.apps/web serverside-applied"),
        "{out}"
    );
    let d = get_json(&cp, &["deploy", "web"]);
    assert_eq!(d["spec"]["replicas"], 2);
    assert_eq!(d["metadata"]["labels"]["tier"], "front");
    let mine = entry(&d, "kubectl", "Apply").expect("kubectl owns what it applied");
    assert_eq!(mine["fieldsType"], "FieldsV1");
    assert_eq!(mine["apiVersion"], "apps/v1");
    assert!(mine["time"].is_string());
    assert_eq!(
        mine["fieldsV1"]["f:spec"]["f:template"]["f:spec"]["f:containers"][r#"k:{"name":"web"}"#]
            ["f:ports"][r#"k:{"containerPort":80,"protocol":"TCP"}"#],
        json!({".": {}, "f:containerPort": {}}),
        "ports are keyed by containerPort and protocol: {mine}"
    );

    // A label the manager stops applying is removed.
    apply(&deployment(2, "app: web", WEB));
    let d = get_json(&cp, &["deploy", "web"]);
    assert!(
        d["metadata"]["labels"].get("tier").is_none(),
        "{}",
        d["metadata"]
    );
    assert_eq!(d["metadata"]["labels"]["app"], "web");

    // `kubectl scale` takes spec.replicas. It sends no fieldManager, so (as upstream) the manager is its
    // User-Agent's product, `kubectl`, in an Update entry for the scale subresource.
    cp.kubectl_ok(&["scale", "deployment", "web", "--replicas=5"]);
    let scaled = get_json(&cp, &["deploy", "web"]);
    let scaler = entry(&scaled, "kubectl", "Update").unwrap_or_else(|| {
        panic!(
            "kubectl scale's entry missing: {}",
            scaled["metadata"]["managedFields"]
        )
    });
    assert_eq!(scaler["subresource"], "scale");
    assert_eq!(scaler["fieldsV1"], json!({"f:spec": {"f:replicas": {}}}));

    // Applying another value is a conflict naming that manager and the field.
    let out = cp.kubectl_stdin(
        &["apply", "--server-side", "-f", "-"],
        &deployment(3, "app: web", WEB),
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "the conflicting apply must fail");
    assert!(
        stderr.contains(r#"Apply failed with 1 conflict: conflict with "kubectl" with subresource "scale" using apps/v1: .spec.replicas"#),
        "{stderr}"
    );
    let after = get_json(&cp, &["deploy", "web"]);
    assert_eq!(
        after["spec"]["replicas"], 5,
        "a failed apply changes nothing"
    );
    let mine = entry(&after, "kubectl", "Apply").expect("kubectl entry");
    assert!(
        mine["fieldsV1"]["f:spec"].get("f:replicas").is_none(),
        "the scale took spec.replicas from the applier and the failed apply did not take it back: {mine}"
    );

    // --force-conflicts wins and takes the field.
    cp.kubectl_stdin_ok(
        &["apply", "--server-side", "--force-conflicts", "-f", "-"],
        &deployment(3, "app: web", WEB),
    );
    let forced = get_json(&cp, &["deploy", "web"]);
    assert_eq!(forced["spec"]["replicas"], 3);
    assert!(
        entry(&forced, "kubectl", "Update").is_none(),
        "the scaler lost its only field: {}",
        forced["metadata"]["managedFields"]
    );
    let mine = entry(&forced, "kubectl", "Apply").expect("kubectl entry");
    assert!(mine["fieldsV1"]["f:spec"].get("f:replicas").is_some());
}

#[test]
fn two_managers_co_own_a_label_and_show_managed_fields_prints_field_sets() {
    if !require_privileged(&["kubectl"]) {
        return;
    }
    let cp = ControlPlane::start();
    let cm = |labels: &str, data: &str| {
        format!(
            "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: shared\n  labels: {{{labels}}}\ndata: {{{data}}}\n"
        )
    };
    let apply_as = |manager: &str, manifest: &str| {
        cp.kubectl_stdin(
            &[
                "apply",
                "--server-side",
                &format!("--field-manager={manager}"),
                "-f",
                "-",
            ],
            manifest,
        )
    };
    let ok = |out: std::process::Output| {
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    ok(apply_as("alice", &cm("team: a", "a: \"1\"")));
    // Applying the same configuration again writes nothing.
    let rv = |c: &Value| c["metadata"]["resourceVersion"].clone();
    let first = get_json(&cp, &["cm", "shared"]);
    ok(apply_as("alice", &cm("team: a", "a: \"1\"")));
    assert_eq!(rv(&get_json(&cp, &["cm", "shared"])), rv(&first));
    // The same value from another manager is no conflict: both own it.
    ok(apply_as("bob", &cm("team: a", "b: \"2\"")));
    let c = get_json(&cp, &["cm", "shared"]);
    for who in ["alice", "bob"] {
        let e = entry(&c, who, "Apply").unwrap_or_else(|| panic!("{who} entry"));
        assert_eq!(
            e["fieldsV1"]["f:metadata"]["f:labels"],
            json!({"f:team": {}}),
            "{who}"
        );
    }
    assert_eq!(c["data"], json!({"a": "1", "b": "2"}));

    // upstream's YAML form of the field set.
    let yaml = cp.kubectl_ok(&["get", "cm", "shared", "-o", "yaml", "--show-managed-fields"]);
    let expected = "  - apiVersion: v1\n    fieldsType: FieldsV1\n    fieldsV1:\n      f:data:\n        f:a: {}\n      f:metadata:\n        f:labels:\n          f:team: {}\n    manager: alice\n    operation: Apply\n";
    assert!(yaml.contains(expected), "{yaml}");
    let plain = cp.kubectl_ok(&["get", "cm", "shared", "-o", "yaml"]);
    assert!(!plain.contains("managedFields"), "{plain}");

    // Changing a co-owned value conflicts with the other owner.
    let out = apply_as("bob", &cm("team: b", "b: \"2\""));
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(r#"conflict with "alice": .metadata.labels.team"#),
        "{stderr}"
    );

    // alice stops applying the label: bob still owns it, so it stays; then bob alone may change it.
    ok(apply_as("alice", &cm("", "a: \"1\"")));
    let c = get_json(&cp, &["cm", "shared"]);
    assert_eq!(c["metadata"]["labels"]["team"], "a");
    ok(apply_as("bob", &cm("team: b", "b: \"2\"")));
    let c = get_json(&cp, &["cm", "shared"]);
    assert_eq!(c["metadata"]["labels"]["team"], "b");
}

#[test]
fn a_container_left_out_of_the_applied_list_goes_while_another_managers_container_stays() {
    if !require_privileged(&["kubectl"]) {
        return;
    }
    let cp = ControlPlane::start();
    let both = format!("{WEB}{SIDECAR}");
    cp.kubectl_stdin_ok(
        &["apply", "--server-side", "-f", "-"],
        &deployment(1, "app: web", &both),
    );
    // Someone else adds a container with an ordinary (strategic merge) patch.
    cp.kubectl_ok(&[
        "patch",
        "deployment",
        "web",
        "--field-manager=debugger",
        "-p",
        r#"{"spec":{"template":{"spec":{"containers":[{"name":"debug","image":"busybox:1.36"}]}}}}"#,
    ]);
    let d = get_json(&cp, &["deploy", "web"]);
    assert_eq!(container_names(&d), vec!["web", "sidecar", "debug"]);
    let debugger = entry(&d, "debugger", "Update").expect("debugger entry");
    assert!(
        debugger["fieldsV1"]["f:spec"]["f:template"]["f:spec"]["f:containers"]
            .get(r#"k:{"name":"debug"}"#)
            .is_some(),
        "{debugger}"
    );

    cp.kubectl_stdin_ok(
        &["apply", "--server-side", "-f", "-"],
        &deployment(1, "app: web", WEB),
    );
    let d = get_json(&cp, &["deploy", "web"]);
    assert_eq!(container_names(&d), vec!["web", "debug"]);
}

#[test]
fn server_side_apply_takes_over_from_client_side_apply() {
    if !require_privileged(&["kubectl"]) {
        return;
    }
    let cp = ControlPlane::start();
    cp.kubectl_stdin_ok(&["apply", "-f", "-"], &deployment(2, "app: web", WEB));
    let d = get_json(&cp, &["deploy", "web"]);
    assert!(entry(&d, "kubectl-client-side-apply", "Update").is_some());

    // Same intent, new value: no conflict with the fields client-side apply set.
    cp.kubectl_stdin_ok(
        &["apply", "--server-side", "-f", "-"],
        &deployment(4, "app: web", WEB),
    );
    let d = get_json(&cp, &["deploy", "web"]);
    assert_eq!(d["spec"]["replicas"], 4);
    let mine = entry(&d, "kubectl", "Apply").expect("kubectl now applies");
    assert!(mine["fieldsV1"]["f:spec"].get("f:replicas").is_some());
    // kubectl then moves the client-side apply entry over with a JSON patch of managedFields, which the
    // server takes as written: the annotation's owner is `kubectl-last-applied`.
    assert!(
        entry(&d, "kubectl-client-side-apply", "Update").is_none(),
        "{}",
        d["metadata"]["managedFields"]
    );
    let last = entry(&d, "kubectl-last-applied", "Apply").expect("kubectl-last-applied entry");
    assert!(
        last["fieldsV1"]["f:metadata"]["f:annotations"]
            .get("f:kubectl.kubernetes.io/last-applied-configuration")
            .is_some(),
        "{last}"
    );
    // Client-side apply still works afterwards.
    cp.kubectl_stdin_ok(&["apply", "-f", "-"], &deployment(3, "app: web", WEB));
    let d = get_json(&cp, &["deploy", "web"]);
    assert_eq!(d["spec"]["replicas"], 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kube_patch_apply_conflicts_without_force_and_takes_ownership_with_it() {
    if !require_privileged(&["kubectl"]) {
        return;
    }
    let cp = tokio::task::spawn_blocking(ControlPlane::start)
        .await
        .expect("start");
    let client = cp.kube_client().await;
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), "default");
    let config = |v: &str| json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "kube-ssa"}, "data": {"k": v}});

    let created = cms
        .patch(
            "kube-ssa",
            &PatchParams::apply("x"),
            &Patch::Apply(config("1")),
        )
        .await
        .expect("apply creates");
    assert_eq!(
        created
            .data
            .as_ref()
            .and_then(|d| d.get("k"))
            .map(String::as_str),
        Some("1")
    );

    let err = cms
        .patch(
            "kube-ssa",
            &PatchParams::apply("y"),
            &Patch::Apply(config("2")),
        )
        .await
        .expect_err("y changes x's field");
    match err {
        kube::Error::Api(s) => {
            assert_eq!((s.code, s.reason.as_str()), (409, "Conflict"), "{s:?}");
            assert_eq!(
                s.message,
                r#"Apply failed with 1 conflict: conflict with "x": .data.k"#
            );
            let cause = &s.details.expect("details").causes[0];
            assert_eq!(
                (cause.reason.as_str(), cause.field.as_str()),
                ("FieldManagerConflict", ".data.k")
            );
        }
        other => panic!("expected a conflict, got {other:?}"),
    }

    let forced = cms
        .patch(
            "kube-ssa",
            &PatchParams::apply("y").force(),
            &Patch::Apply(config("2")),
        )
        .await
        .expect("forced apply");
    assert_eq!(
        forced
            .data
            .as_ref()
            .and_then(|d| d.get("k"))
            .map(String::as_str),
        Some("2")
    );
    let managers: Vec<(String, Option<String>)> = forced
        .metadata
        .managed_fields
        .unwrap_or_default()
        .into_iter()
        .map(|e| (e.manager.unwrap_or_default(), e.operation))
        .collect();
    assert_eq!(
        managers,
        vec![("y".to_string(), Some("Apply".to_string()))],
        "x lost its only field"
    );

    // Apply without a field manager is refused as upstream refuses it (422 on PatchOptions).
    let req = http::Request::patch("/api/v1/namespaces/default/configmaps/kube-ssa")
        .header("Content-Type", "application/apply-patch+yaml")
        .body(serde_json::to_vec(&config("3")).expect("json"))
        .expect("request");
    match client.request::<Value>(req).await {
        Err(kube::Error::Api(s)) => {
            assert_eq!(s.code, 422, "{s:?}");
            assert!(
                s.message.contains("fieldManager: Required value"),
                "{}",
                s.message
            );
        }
        other => panic!("expected 422, got {other:?}"),
    }

    // managedFields are the server's to write: an apply carrying them is refused (400), the object unchanged.
    let mut with_fields = config("4");
    with_fields["metadata"]["managedFields"] = json!([]);
    let err = cms
        .patch(
            "kube-ssa",
            &PatchParams::apply("y"),
            &Patch::Apply(with_fields),
        )
        .await
        .expect_err("managedFields in an apply");
    match err {
        kube::Error::Api(s) => {
            assert_eq!(
                (s.code, s.message.as_str()),
                (400, "metadata.managedFields must be nil")
            );
        }
        other => panic!("expected 400, got {other:?}"),
    }
    let now = cms.get("kube-ssa").await.expect("get");
    assert_eq!(
        now.data
            .as_ref()
            .and_then(|d| d.get("k"))
            .map(String::as_str),
        Some("2")
    );
}
