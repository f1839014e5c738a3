//! Authentication and authorization as kubectl users see them: bearer tokens from a static token file, RBAC with
//! the default roles, 403 Status for forbidden requests, `kubectl auth can-i`, and the audit log.

use std::path::Path;
use std::process::Command;

use serde_json::Value;
use windlass_tests::control::ControlPlane;
use windlass_tests::require_privileged;

fn start() -> ControlPlane {
    ControlPlane::start_with(|dir: &Path| {
        let tokens = dir.join("tokens.csv");
        std::fs::write(
            &tokens,
            "bob-token,bob,1001\nalice-token,alice,1002,\"dev,qa\"\n",
        )
        .expect("token file");
        vec![
            "--token-auth-file".into(),
            tokens.display().to_string(),
            "--audit-log-path".into(),
            dir.join("audit.log").display().to_string(),
        ]
    })
}

fn stdout(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stdout).trim().to_string()
}

#[test]
fn a_user_without_bindings_is_forbidden_until_bound_to_a_role() {
    if !require_privileged(&["kubectl"]) {
        return;
    }
    let cp = start();
    let out = cp.kubectl_with_token("bob-token", &["get", "pods"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("Forbidden")
            && err.contains(r#"User "bob" cannot list resource "pods" in API group "" in the namespace "default""#),
        "{err}"
    );
    // Discovery is open to every authenticated user (system:discovery), so kubectl can resolve resources.
    assert!(cp
        .kubectl_with_token("bob-token", &["api-resources"])
        .status
        .success());
    assert_eq!(
        stdout(&cp.kubectl_with_token("bob-token", &["auth", "can-i", "list", "pods"])),
        "no"
    );

    cp.kubectl_ok(&[
        "create",
        "rolebinding",
        "bob-view",
        "--clusterrole=view",
        "--user=bob",
        "-n",
        "default",
    ]);
    let out = cp.kubectl_with_token("bob-token", &["get", "pods"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        stdout(&cp.kubectl_with_token("bob-token", &["auth", "can-i", "list", "pods"])),
        "yes"
    );
    assert_eq!(
        stdout(&cp.kubectl_with_token("bob-token", &["auth", "can-i", "create", "deployments"])),
        "no"
    );
    assert_eq!(
        stdout(&cp.kubectl_with_token("bob-token", &["auth", "can-i", "get", "secrets"])),
        "no",
        "view excludes secrets"
    );
    assert_eq!(
        stdout(&cp.kubectl_with_token(
            "bob-token",
            &["auth", "can-i", "list", "pods", "-n", "kube-system"]
        )),
        "no"
    );
    let out = cp.kubectl_with_token(
        "bob-token",
        &["create", "configmap", "x", "--from-literal=a=b"],
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot create resource \"configmaps\""));

    // Groups from the token file count: bind `edit` to group dev, alice gets it.
    cp.kubectl_ok(&[
        "create",
        "clusterrolebinding",
        "dev-edit",
        "--clusterrole=edit",
        "--group=dev",
    ]);
    assert_eq!(
        stdout(&cp.kubectl_with_token(
            "alice-token",
            &[
                "auth",
                "can-i",
                "create",
                "deployments",
                "-n",
                "kube-system"
            ]
        )),
        "yes"
    );
    assert_eq!(
        stdout(&cp.kubectl_with_token("alice-token", &["auth", "can-i", "create", "rolebindings"])),
        "no",
        "edit cannot grant"
    );
    // The admin (system:masters) may do anything.
    assert_eq!(cp.kubectl_ok(&["auth", "can-i", "*", "*"]).trim(), "yes");

    // A wrong token is a 401.
    let out = cp.kubectl_with_token("nope", &["get", "pods"]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("Unauthorized"));

    // Every request is in the audit log with user, verb, resource and code.
    let log = std::fs::read_to_string(cp.data_dir().join("audit.log")).expect("audit log");
    let records: Vec<Value> = log
        .lines()
        .map(|l| serde_json::from_str(l).expect("JSON line"))
        .collect();
    assert!(records.iter().any(|r| r["user"] == "bob"
        && r["verb"] == "list"
        && r["resource"] == "pods"
        && r["code"] == 403));
    assert!(records.iter().any(|r| r["user"] == "bob"
        && r["verb"] == "list"
        && r["resource"] == "pods"
        && r["code"] == 200));
    assert!(records.iter().any(|r| r["user"] == "admin"
        && r["verb"] == "create"
        && r["resource"] == "rolebindings"
        && r["code"] == 201));
}

/// The authorizer answers from a cache fed by the store's watch; a change made through the API must still take
/// effect for the very next request (the write is acknowledged once the cache has it), and a role edited or a
/// binding deleted must stop granting just as promptly.
#[test]
fn rbac_changes_take_effect_for_the_next_request() {
    if !require_privileged(&["kubectl"]) {
        return;
    }
    let cp = start();
    let can_bob = |verb: &str, what: &str| {
        stdout(&cp.kubectl_with_token(
            "bob-token",
            &["auth", "can-i", verb, what, "-n", "kube-public"],
        ))
    };
    assert_eq!(can_bob("get", "configmaps"), "no");
    cp.kubectl_ok(&[
        "create",
        "clusterrole",
        "cm-reader",
        "--verb=get",
        "--resource=configmaps",
    ]);
    let bound = std::time::Instant::now();
    cp.kubectl_ok(&[
        "create",
        "clusterrolebinding",
        "bob-cm",
        "--clusterrole=cm-reader",
        "--user=bob",
    ]);
    // Bounded: the first request after the create must already be allowed; the bound only keeps a broken
    // cache from hanging the test.
    assert_eq!(can_bob("get", "configmaps"), "yes");
    assert!(bound.elapsed() < std::time::Duration::from_secs(10));
    let out = cp.kubectl_with_token(
        "bob-token",
        &["get", "configmap", "-n", "kube-public", "nope"],
    );
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("NotFound"),
        "allowed through to the handler: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Editing the role changes what the binding grants.
    assert_eq!(can_bob("list", "configmaps"), "no");
    cp.kubectl_ok(&[
        "patch",
        "clusterrole",
        "cm-reader",
        "--type=json",
        "-p",
        r#"[{"op": "replace", "path": "/rules/0/verbs", "value": ["get", "list"]}]"#,
    ]);
    assert_eq!(can_bob("list", "configmaps"), "yes");
    // Deleting the binding revokes at once.
    cp.kubectl_ok(&["delete", "clusterrolebinding", "bob-cm"]);
    assert_eq!(can_bob("get", "configmaps"), "no");
    let out = cp.kubectl_with_token("bob-token", &["get", "configmaps", "-n", "kube-public"]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("Forbidden"));
}

#[test]
fn default_cluster_roles_are_bootstrapped() {
    if !require_privileged(&["kubectl"]) {
        return;
    }
    let cp = start();
    let roles = cp.kubectl_ok(&["get", "clusterroles", "-o", "name"]);
    for r in ["cluster-admin", "admin", "edit", "view"] {
        assert!(
            roles.contains(&format!("clusterrole.rbac.authorization.k8s.io/{r}\n")),
            "{roles}"
        );
    }
    let b = cp.kubectl_ok(&[
        "get",
        "clusterrolebinding",
        "cluster-admin",
        "-o",
        "jsonpath={.subjects[0].name}",
    ]);
    assert_eq!(b, "system:masters");
}

#[test]
fn a_client_certificate_names_the_user_and_groups() {
    if !require_privileged(&["kubectl"]) {
        return;
    }
    let cp = start();
    let kubeconfig = cp.data_dir().join("carol.kubeconfig");
    let out = Command::new(windlass_tests::workspace_binary("windlass-control"))
        .args([
            "issue-kubeconfig",
            "--user",
            "carol",
            "--group",
            "ops",
            "--server",
            &cp.url(),
        ])
        .arg("--data-dir")
        .arg(cp.data_dir())
        .arg("--out")
        .arg(&kubeconfig)
        .output()
        .expect("issue-kubeconfig");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let carol = |args: &[&str]| {
        Command::new("kubectl")
            .env("HOME", cp.data_dir())
            .env("KUBECONFIG", &kubeconfig)
            .args(args)
            .output()
            .expect("kubectl as carol")
    };
    let err = String::from_utf8_lossy(&carol(&["get", "nodes"]).stderr).into_owned();
    assert!(
        err.contains(r#"User "carol" cannot list resource "nodes""#),
        "{err}"
    );
    cp.kubectl_ok(&[
        "create",
        "clusterrolebinding",
        "ops-admin",
        "--clusterrole=cluster-admin",
        "--group=ops",
    ]);
    let out = carol(&["get", "nodes"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
