//! End to end: a pod's API credentials. The API server gives every new pod the projected `kube-api-access-*`
//! volume; the kubelet fills it with a TokenRequest token bound to the pod, the cluster CA from `kube-root-ca.crt`
//! and the namespace. From the pod's files a client (kubectl with `--token` and the pod's `ca.crt`) reaches the
//! API server as `system:serviceaccount:default:default` — until the pod is deleted. Tokens are rotated before
//! they expire (the kubelet's hidden `--token-refresh-fraction` makes that quick here).

use std::process::{Command, Output};
use std::time::Duration;

use serde_json::Value;
use windlass_tests::kubelet_lab::{KubeletLab, TOOLS};
use windlass_tests::{require_privileged, wait_for};

const DIR: &str = "/var/run/secrets/kubernetes.io/serviceaccount";

fn running(p: &Value) -> bool {
    p["status"]["phase"] == "Running" && p["status"]["containerStatuses"][0]["ready"] == true
}

fn sleeper(lab: &KubeletLab, name: &str, volumes: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: {name}\n  namespace: default\nspec:\n  nodeName: {}\n  terminationGracePeriodSeconds: 1\n  containers:\n  - name: c\n    image: {}\n    command: [\"sh\", \"-c\", \"echo $KUBERNETES_SERVICE_HOST:$KUBERNETES_SERVICE_PORT > /tmp/k8s-env; trap 'exit 0' TERM; while true; do sleep 0.2; done\"]\n{volumes}",
        lab.node_name, lab.image
    )
}

/// `kubectl exec <pod> -- <cmd>`'s stdout.
fn exec(lab: &KubeletLab, pod: &str, cmd: &[&str]) -> String {
    let mut args = vec!["exec", pod, "-c", "c", "--"];
    args.extend_from_slice(cmd);
    lab.control.kubectl_ok(&args)
}

/// kubectl in the node's namespace, authenticated only by `token` and trusting only `ca_file`.
fn as_token(lab: &KubeletLab, ca_file: &std::path::Path, token: &str, args: &[&str]) -> Output {
    Command::new("ip")
        .args(["netns", "exec", lab.netns.name(), "kubectl"])
        .env("HOME", lab.control.data_dir())
        .arg("--kubeconfig=/dev/null")
        .arg(format!("--server={}", lab.control.url()))
        .arg(format!("--certificate-authority={}", ca_file.display()))
        .arg(format!("--token={token}"))
        .args(args)
        .output()
        .expect("run kubectl")
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// `kubectl auth whoami` with the token: it must name the pod's service account and its groups.
fn authenticates_as(
    lab: &KubeletLab,
    ca_file: &std::path::Path,
    token: &str,
) -> Result<(), String> {
    let out = as_token(lab, ca_file, token, &["auth", "whoami", "-o", "json"]);
    if !out.status.success() {
        return Err(format!("exit {}: {}", out.status, stderr(&out)));
    }
    let review: Value = serde_json::from_slice(&out.stdout).map_err(|e| e.to_string())?;
    let user = &review["status"]["userInfo"];
    let groups: Vec<&str> = user["groups"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(Value::as_str)
        .collect();
    if user["username"] == "system:serviceaccount:default:default"
        && groups.contains(&"system:serviceaccounts")
        && groups.contains(&"system:serviceaccounts:default")
    {
        Ok(())
    } else {
        Err(format!("unexpected identity: {review}"))
    }
}

/// A lab (whose kubelet trusts the cluster CA for its API, so `kubectl exec` reaches it) with `extra` kubelet flags.
fn lab_with(extra: &[&str]) -> KubeletLab {
    if extra.is_empty() {
        return KubeletLab::start();
    }
    let mut lab = KubeletLab::start();
    lab.stop_kubelet();
    lab.kubelet_args = extra.iter().map(|s| s.to_string()).collect();
    lab.start_kubelet();
    lab
}

#[test]
fn a_pod_reads_its_token_ca_and_namespace_and_the_token_works_until_the_pod_is_deleted() {
    if !require_privileged(TOOLS) {
        return;
    }
    let lab = lab_with(&[]);
    lab.apply(&sleeper(&lab, "client", ""));
    let pod = lab.wait_pod("client", "Running", Duration::from_secs(90), running);
    let volume = pod["spec"]["volumes"][0]["name"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert!(volume.starts_with("kube-api-access-"), "{}", pod["spec"]);

    let token = exec(&lab, "client", &["cat", &format!("{DIR}/token")]);
    let ca = exec(&lab, "client", &["cat", &format!("{DIR}/ca.crt")]);
    let namespace = exec(&lab, "client", &["cat", &format!("{DIR}/namespace")]);
    assert_eq!(namespace, "default");
    assert_eq!(
        ca,
        std::fs::read_to_string(lab.control.data_dir().join("pki/ca.crt")).expect("cluster CA")
    );
    assert_eq!(token.split('.').count(), 3, "a JWT: {token}");
    // Written by the atomic writer: the names are links into the current `..data` generation.
    assert_eq!(
        exec(
            &lab,
            "client",
            &["busybox", "readlink", &format!("{DIR}/token")]
        )
        .trim(),
        "..data/token"
    );
    // The volume is read-only in the container.
    let out = lab.control.kubectl(&[
        "exec",
        "client",
        "-c",
        "c",
        "--",
        "sh",
        "-c",
        &format!("echo x > {DIR}/token"),
    ]);
    assert!(!out.status.success(), "the token volume is writable");
    // In-cluster clients find the API through the `kubernetes` Service's environment.
    // (Recorded by the container's main process at start: what it was started with.)
    let env = exec(&lab, "client", &["cat", "/tmp/k8s-env"]);
    assert_eq!(env.trim(), "10.96.0.1:443");

    // The token, checked against the pod's own ca.crt, authenticates as the pod's service account.
    let ca_dir = tempfile::tempdir().expect("temp dir");
    let ca_file = ca_dir.path().join("ca.crt");
    std::fs::write(&ca_file, &ca).expect("write ca.crt");
    authenticates_as(&lab, &ca_file, &token).expect("the pod's token authenticates");
    // RBAC still applies to it: the default service account may not list pods.
    let out = as_token(&lab, &ca_file, &token, &["get", "pods"]);
    assert!(
        stderr(&out).contains(
            r#"User "system:serviceaccount:default:default" cannot list resource "pods""#
        ),
        "{}",
        stderr(&out)
    );

    lab.control
        .kubectl_ok(&["delete", "pod", "client", "--wait=true", "--timeout=60s"]);
    let out = as_token(&lab, &ca_file, &token, &["auth", "whoami"]);
    assert!(
        stderr(&out).contains("Unauthorized"),
        "a deleted pod's token must stop working: {}",
        stderr(&out)
    );
}

#[test]
fn a_projected_token_is_replaced_before_it_expires_and_both_stay_valid_meanwhile() {
    if !require_privileged(TOOLS) {
        return;
    }
    // 3 % of a 10-minute token: a new one after about 18 s (less up to 10 s of jitter) instead of 8 minutes.
    let lab = lab_with(&["--token-refresh-fraction=0.03"]);
    lab.apply(&sleeper(
        &lab,
        "rotating",
        "    volumeMounts:\n    - {name: short, mountPath: /short}\n  volumes:\n  - name: short\n    projected:\n      sources:\n      - serviceAccountToken: {path: token, expirationSeconds: 600}\n",
    ));
    lab.wait_pod("rotating", "Running", Duration::from_secs(90), running);
    let first = exec(&lab, "rotating", &["cat", "/short/token"]);
    let second = wait_for("the token to be rotated", Duration::from_secs(60), || {
        let now = exec(&lab, "rotating", &["cat", "/short/token"]);
        (now != first && now.split('.').count() == 3).then_some(now)
    });
    let ca_file = lab.control.data_dir().join("pki/ca.crt");
    authenticates_as(&lab, &ca_file, &second).expect("the new token authenticates");
    // The old one has not expired yet: still valid, as upstream (rotation is not revocation).
    authenticates_as(&lab, &ca_file, &first).expect("the old token is still valid");
    let log = lab.kubelet_log();
    assert!(
        log.matches("service account token issued").count() >= 2,
        "{log}"
    );
}

#[test]
fn a_projected_volume_joins_config_map_secret_and_downward_api_with_their_modes_and_follows_updates(
) {
    if !require_privileged(TOOLS) {
        return;
    }
    let lab = lab_with(&[]);
    lab.apply("apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: app-cfg\n  namespace: default\ndata:\n  greeting: hello\n  unused: x\n");
    lab.apply("apiVersion: v1\nkind: Secret\nmetadata:\n  name: app-secret\n  namespace: default\nstringData:\n  password: s3cret\n");
    let mut manifest = sleeper(
        &lab,
        "joined",
        "    volumeMounts:\n    - {name: all, mountPath: /all}\n  volumes:\n  - name: all\n    projected:\n      defaultMode: 0440\n      sources:\n      - configMap:\n          name: app-cfg\n          items:\n          - {key: greeting, path: conf/greeting, mode: 0400}\n      - secret: {name: app-secret}\n      - downwardAPI:\n          items:\n          - path: labels\n            fieldRef: {fieldPath: metadata.labels}\n",
    );
    manifest = manifest.replace(
        "  namespace: default\n",
        "  namespace: default\n  labels: {app: demo}\n",
    );
    lab.apply(&manifest);
    lab.wait_pod("joined", "Running", Duration::from_secs(90), running);
    let read = |path: &str| exec(&lab, "joined", &["cat", path]);
    let mode = |path: &str| {
        exec(&lab, "joined", &["busybox", "stat", "-L", "-c", "%a", path])
            .trim()
            .to_string()
    };
    assert_eq!(read("/all/conf/greeting"), "hello");
    assert_eq!(mode("/all/conf/greeting"), "400", "the item's own mode");
    assert_eq!(read("/all/password"), "s3cret");
    assert_eq!(mode("/all/password"), "440", "the volume's defaultMode");
    assert_eq!(read("/all/labels"), "app=\"demo\"");
    let listing = exec(&lab, "joined", &["busybox", "ls", "/all"]);
    assert!(
        !listing.contains("unused"),
        "only the listed item: {listing}"
    );

    // Kept current: the ConfigMap's new value and the pod's new label appear in the running container.
    lab.control.kubectl_ok(&[
        "patch",
        "configmap",
        "app-cfg",
        "--type=merge",
        "-p",
        r#"{"data":{"greeting":"bye"}}"#,
    ]);
    lab.control
        .kubectl_ok(&["label", "pod", "joined", "tier=web"]);
    wait_for(
        "the projected files to follow",
        Duration::from_secs(60),
        || {
            (read("/all/conf/greeting") == "bye"
                && read("/all/labels") == "app=\"demo\"\ntier=\"web\"")
                .then_some(())
        },
    );
}
