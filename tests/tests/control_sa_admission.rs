//! Service-account credentials for pods as kubectl users see them on a started `windlass-control`: a new pod runs
//! as `default` and gets upstream's projected `kube-api-access-*` volume mounted read-only in every container;
//! `automountServiceAccountToken: false` on the pod or its service account opts out; a pod naming a missing
//! service account is refused with upstream's message; every namespace has the `kube-root-ca.crt` ConfigMap, put
//! back after deletion or edits; and a kubelet may request tokens only for its own pods.

use std::time::Duration;

use serde_json::{json, Value};
use windlass_tests::control::ControlPlane;
use windlass_tests::{require_privileged, wait_for};

const MOUNT_PATH: &str = "/var/run/secrets/kubernetes.io/serviceaccount";

fn pod_json(cp: &ControlPlane, ns: &str, name: &str) -> Value {
    let out = cp.kubectl_ok(&["get", "pod", name, "-n", ns, "-o", "json"]);
    serde_json::from_str(&out).expect("pod json")
}

fn token_volumes(pod: &Value) -> Vec<Value> {
    pod["spec"]["volumes"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|v| {
            v["name"]
                .as_str()
                .is_some_and(|n| n.starts_with("kube-api-access-"))
        })
        .cloned()
        .collect()
}

#[test]
fn a_new_pod_runs_as_default_with_the_api_access_volume_mounted_in_every_container() {
    if !require_privileged(&["kubectl"]) {
        return;
    }
    let cp = ControlPlane::start();
    cp.kubectl_stdin_ok(
        &["apply", "-f", "-"],
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: app\nspec:\n  initContainers:\n  - {name: setup, image: busybox}\n  containers:\n  - name: web\n    image: busybox\n    volumeMounts:\n    - {name: scratch, mountPath: /scratch}\n  - {name: side, image: busybox}\n  volumes:\n  - {name: scratch, emptyDir: {}}\n",
    );
    let pod = pod_json(&cp, "default", "app");
    assert_eq!(pod["spec"]["serviceAccountName"], "default");
    assert_eq!(pod["spec"]["serviceAccount"], "default");
    let volumes = token_volumes(&pod);
    assert_eq!(volumes.len(), 1, "{}", pod["spec"]["volumes"]);
    let name = volumes[0]["name"].as_str().unwrap_or_default().to_string();
    let suffix = &name["kube-api-access-".len()..];
    assert!(
        suffix.len() == 5 && suffix.chars().all(|c| c.is_ascii_alphanumeric()),
        "{name}"
    );
    // Exactly upstream's TokenVolumeSource.
    assert_eq!(
        volumes[0]["projected"],
        json!({
            "defaultMode": 420,
            "sources": [
                {"serviceAccountToken": {"expirationSeconds": 3607, "path": "token"}},
                {"configMap": {"name": "kube-root-ca.crt", "items": [{"key": "ca.crt", "path": "ca.crt"}]}},
                {"downwardAPI": {"items": [{"path": "namespace",
                    "fieldRef": {"apiVersion": "v1", "fieldPath": "metadata.namespace"}}]}},
            ],
        })
    );
    let want = json!({"name": name, "mountPath": MOUNT_PATH, "readOnly": true});
    for (list, container) in [
        ("initContainers", "setup"),
        ("containers", "web"),
        ("containers", "side"),
    ] {
        let c = pod["spec"][list]
            .as_array()
            .and_then(|cs| cs.iter().find(|c| c["name"] == container))
            .unwrap_or_else(|| panic!("container {container}"));
        let mounts = c["volumeMounts"].as_array().cloned().unwrap_or_default();
        assert_eq!(mounts.last(), Some(&want), "{container}: {mounts:?}");
    }
    // The user's own mount stays first in `web`.
    assert_eq!(
        pod["spec"]["containers"][0]["volumeMounts"][0]["name"],
        "scratch"
    );
}

#[test]
fn automount_false_on_the_pod_or_its_service_account_keeps_the_token_out() {
    if !require_privileged(&["kubectl"]) {
        return;
    }
    let cp = ControlPlane::start();
    cp.kubectl_stdin_ok(
        &["apply", "-f", "-"],
        "apiVersion: v1\nkind: ServiceAccount\nmetadata:\n  name: quiet\nautomountServiceAccountToken: false\n",
    );
    let pod = |name: &str, extra: &str| {
        cp.kubectl_stdin_ok(
            &["apply", "-f", "-"],
            &format!(
                "apiVersion: v1\nkind: Pod\nmetadata:\n  name: {name}\nspec:\n{extra}  containers:\n  - {{name: c, image: busybox}}\n"
            ),
        );
        pod_json(&cp, "default", name)
    };
    let opted_out = pod("pod-says-no", "  automountServiceAccountToken: false\n");
    assert!(token_volumes(&opted_out).is_empty(), "{opted_out}");
    assert!(opted_out["spec"]["containers"][0]["volumeMounts"]
        .as_array()
        .is_none_or(|m| m.is_empty()));

    let sa_says_no = pod("sa-says-no", "  serviceAccountName: quiet\n");
    assert!(token_volumes(&sa_says_no).is_empty(), "{sa_says_no}");
    assert_eq!(sa_says_no["spec"]["serviceAccountName"], "quiet");

    // The pod's own setting wins over its service account's.
    let pod_wins = pod(
        "pod-says-yes",
        "  serviceAccountName: quiet\n  automountServiceAccountToken: true\n",
    );
    assert_eq!(token_volumes(&pod_wins).len(), 1, "{pod_wins}");

    // A container that already mounts something at the path is left alone, and so no volume is added.
    cp.kubectl_stdin_ok(
        &["apply", "-f", "-"],
        &format!("apiVersion: v1\nkind: Pod\nmetadata:\n  name: own-mount\nspec:\n  containers:\n  - name: c\n    image: busybox\n    volumeMounts:\n    - {{name: mine, mountPath: {MOUNT_PATH}}}\n  volumes:\n  - name: mine\n    secret: {{secretName: mine}}\n"),
    );
    let own = pod_json(&cp, "default", "own-mount");
    assert!(token_volumes(&own).is_empty(), "{own}");
}

#[test]
fn a_pod_naming_a_missing_service_account_is_refused_with_upstreams_message() {
    if !require_privileged(&["kubectl"]) {
        return;
    }
    let cp = ControlPlane::start();
    let err = cp.kubectl_err(&[
        "run",
        "orphan",
        "--image=busybox",
        "--overrides={\"spec\":{\"serviceAccountName\":\"ghost\"}}",
    ]);
    assert!(
        err.contains(
            r#"pods "orphan" is forbidden: error looking up service account default/ghost: serviceaccount "ghost" not found"#
        ),
        "{err}"
    );
    let out = cp.kubectl(&["get", "pod", "orphan"]);
    assert!(!out.status.success(), "nothing was created");
}

fn root_ca(cp: &ControlPlane, ns: &str) -> Option<Value> {
    let out = cp.kubectl(&[
        "get",
        "configmap",
        "kube-root-ca.crt",
        "-n",
        ns,
        "-o",
        "json",
    ]);
    out.status
        .success()
        .then(|| serde_json::from_slice(&out.stdout).ok())
        .flatten()
}

#[test]
fn every_namespace_gets_the_cluster_ca_config_map_and_it_is_restored_after_delete_or_edit() {
    if !require_privileged(&["kubectl"]) {
        return;
    }
    let cp = ControlPlane::start();
    let ca = std::fs::read_to_string(cp.data_dir().join("pki/ca.crt")).expect("cluster CA");
    let wait = Duration::from_secs(30);
    for ns in ["default", "kube-system", "kube-public", "kube-node-lease"] {
        wait_for(&format!("kube-root-ca.crt in {ns}"), wait, || {
            root_ca(&cp, ns)
        });
    }
    cp.kubectl_ok(&["create", "namespace", "team-a"]);
    let cm = wait_for("kube-root-ca.crt in a new namespace", wait, || {
        root_ca(&cp, "team-a")
    });
    assert_eq!(cm["data"], json!({"ca.crt": ca}));
    assert!(cm["metadata"]["annotations"]["kubernetes.io/description"]
        .as_str()
        .is_some_and(|d| d.contains("kube-apiserver")));

    let uid = cm["metadata"]["uid"].clone();
    cp.kubectl_ok(&["delete", "configmap", "kube-root-ca.crt", "-n", "team-a"]);
    wait_for("kube-root-ca.crt to be recreated", wait, || {
        root_ca(&cp, "team-a").filter(|c| c["metadata"]["uid"] != uid)
    });

    cp.kubectl_ok(&[
        "patch",
        "configmap",
        "kube-root-ca.crt",
        "-n",
        "team-a",
        "--type=merge",
        "-p",
        r#"{"data":{"ca.crt":"forged","extra":"x"}}"#,
    ]);
    wait_for("kube-root-ca.crt to be put back", wait, || {
        root_ca(&cp, "team-a").filter(|c| c["data"] == json!({"ca.crt": ca}))
    });

    // The controller's own role, as upstream bootstraps it.
    let role = cp.kubectl_ok(&[
        "get",
        "clusterrole",
        "system:controller:root-ca-cert-publisher",
        "-o",
        "jsonpath={.rules[0].resources}{.rules[0].verbs}",
    ]);
    assert_eq!(role, r#"["configmaps"]["create","update"]"#);
}

#[test]
fn a_kubelet_gets_tokens_only_for_its_own_pods_and_their_service_accounts() {
    if !require_privileged(&["kubectl"]) {
        return;
    }
    let cp = ControlPlane::start_with(|dir| {
        let file = dir.join("tokens.csv");
        std::fs::write(
            &file,
            "node-one-secret,system:node:node-one,uid-1,\"system:nodes\"\n",
        )
        .expect("token file");
        vec!["--token-auth-file".into(), file.display().to_string()]
    });
    cp.kubectl_ok(&["create", "serviceaccount", "robot"]);
    for (name, node, sa) in [
        ("here", "node-one", "default"),
        ("there", "node-two", "default"),
        ("robot-there", "node-two", "robot"),
    ] {
        cp.kubectl_stdin_ok(
            &["apply", "-f", "-"],
            &format!("apiVersion: v1\nkind: Pod\nmetadata:\n  name: {name}\nspec:\n  nodeName: {node}\n  serviceAccountName: {sa}\n  containers:\n  - {{name: c, image: busybox}}\n"),
        );
    }
    let uid = |name: &str| {
        pod_json(&cp, "default", name)["metadata"]["uid"]
            .as_str()
            .unwrap_or_default()
            .to_string()
    };
    let node = |args: &[&str]| {
        let out = cp.kubectl_with_token("node-one-secret", args);
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let here_uid = uid("here");
    let (ok, err) = node(&[
        "create",
        "token",
        "default",
        "--bound-object-kind=Pod",
        "--bound-object-name=here",
        &format!("--bound-object-uid={here_uid}"),
    ]);
    assert!(ok, "a token bound to its own pod: {err}");

    let (ok, err) = node(&["create", "token", "default"]);
    assert!(
        !ok && err.contains("node requested token not bound to a pod"),
        "{err}"
    );
    let there_uid = uid("there");
    let (ok, err) = node(&[
        "create",
        "token",
        "default",
        "--bound-object-kind=Pod",
        "--bound-object-name=there",
        &format!("--bound-object-uid={there_uid}"),
    ]);
    assert!(
        !ok && err.contains("node requested token bound to a pod scheduled on a different node"),
        "{err}"
    );
    // `robot` runs only on node-two: no relationship to node-one.
    let robot_uid = uid("robot-there");
    let (ok, err) = node(&[
        "create",
        "token",
        "robot",
        "--bound-object-kind=Pod",
        "--bound-object-name=robot-there",
        &format!("--bound-object-uid={robot_uid}"),
    ]);
    assert!(
        !ok && err.contains("no relationship found between node 'node-one' and this object"),
        "{err}"
    );
    // Not even an admin binds a token to a pod running as another service account (upstream TokenREST).
    let err = cp.kubectl_err(&[
        "create",
        "token",
        "robot",
        "--bound-object-kind=Pod",
        "--bound-object-name=here",
    ]);
    assert!(
        err.contains("to pod running with different serviceaccount name"),
        "{err}"
    );
}

#[test]
fn a_mirror_pod_gets_no_token_and_may_not_carry_credentials() {
    if !require_privileged(&["kubectl"]) {
        return;
    }
    let cp = ControlPlane::start();
    let mirror = |name: &str, extra: &str| {
        format!("apiVersion: v1\nkind: Pod\nmetadata:\n  name: {name}\n  annotations: {{kubernetes.io/config.mirror: abc123}}\nspec:\n  nodeName: n1\n{extra}  containers:\n  - {{name: c, image: busybox}}\n")
    };
    cp.kubectl_stdin_ok(&["create", "-f", "-"], &mirror("static-web-n1", ""));
    let pod = pod_json(&cp, "default", "static-web-n1");
    assert!(token_volumes(&pod).is_empty(), "{pod}");
    assert!(pod["spec"]["serviceAccountName"].is_null(), "{pod}");

    let out = cp.kubectl_stdin(
        &["create", "-f", "-"],
        &mirror("static-sa-n1", "  serviceAccountName: default\n"),
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(
            r#"pods "static-sa-n1" is forbidden: a mirror pod may not reference service accounts"#
        ),
        "{err}"
    );
}
