//! Service-account tokens as kubectl users see them: `kubectl create token` issues a signed token, the API server
//! accepts it as `system:serviceaccount:<ns>:<name>` (RBAC applies to that user and its groups), and it stops
//! working once the service account, or the pod it is bound to, is deleted.

use std::process::Output;

use windlass_tests::control::ControlPlane;
use windlass_tests::require_privileged;

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn a_service_account_token_authenticates_as_the_service_account_until_it_is_deleted() {
    if !require_privileged(&["kubectl"]) {
        return;
    }
    let cp = ControlPlane::start();
    cp.kubectl_ok(&["create", "serviceaccount", "robot"]);
    let token = cp
        .kubectl_ok(&["create", "token", "robot", "--duration=20m"])
        .trim()
        .to_string();
    assert_eq!(token.split('.').count(), 3, "a JWT: {token}");

    // Authenticated as the service account, which has no rights yet.
    let out = cp.kubectl_with_token(&token, &["get", "pods"]);
    assert!(
        stderr(&out).contains(
            r#"User "system:serviceaccount:default:robot" cannot list resource "pods" in API group "" in the namespace "default""#
        ),
        "{}",
        stderr(&out)
    );
    // RBAC on the service account's group applies.
    cp.kubectl_ok(&[
        "create",
        "rolebinding",
        "robots-view",
        "--clusterrole=view",
        "--group=system:serviceaccounts:default",
    ]);
    let out = cp.kubectl_with_token(&token, &["get", "pods"]);
    assert!(out.status.success(), "{}", stderr(&out));

    // A tampered token (another signature) is refused as unauthenticated.
    let mut parts: Vec<String> = token.split('.').map(String::from).collect();
    parts[2] = parts[2].chars().rev().collect();
    let out = cp.kubectl_with_token(&parts.join("."), &["get", "pods"]);
    assert!(stderr(&out).contains("Unauthorized"), "{}", stderr(&out));

    // Tokens outlive API server restarts (the signing key is kept in the data dir)...
    let mut cp = cp;
    cp.restart();
    let out = cp.kubectl_with_token(&token, &["get", "pods"]);
    assert!(out.status.success(), "{}", stderr(&out));

    // ... but not their service account, even if one of the same name is created again.
    cp.kubectl_ok(&["delete", "serviceaccount", "robot"]);
    cp.kubectl_ok(&["create", "serviceaccount", "robot"]);
    let out = cp.kubectl_with_token(&token, &["get", "pods"]);
    assert!(stderr(&out).contains("Unauthorized"), "{}", stderr(&out));
}

#[test]
fn a_token_bound_to_a_pod_dies_with_the_pod_and_bad_requests_are_invalid() {
    if !require_privileged(&["kubectl"]) {
        return;
    }
    let cp = ControlPlane::start();
    cp.kubectl_ok(&["create", "serviceaccount", "worker"]);
    cp.kubectl_ok(&[
        "create",
        "clusterrolebinding",
        "worker-view",
        "--clusterrole=view",
        "--serviceaccount=default:worker",
    ]);
    // Upstream binds a pod's tokens only to the service account the pod runs as.
    cp.kubectl_ok(&[
        "run",
        "holder",
        "--image=busybox",
        "--restart=Never",
        r#"--overrides={"spec":{"serviceAccountName":"worker"}}"#,
    ]);
    let token = cp
        .kubectl_ok(&[
            "create",
            "token",
            "worker",
            "--bound-object-kind=Pod",
            "--bound-object-name=holder",
        ])
        .trim()
        .to_string();
    let out = cp.kubectl_with_token(&token, &["get", "pods", "holder"]);
    assert!(out.status.success(), "{}", stderr(&out));

    // Shorter than upstream's 10-minute minimum: 422 with the field named.
    let err = cp.kubectl_err(&["create", "token", "worker", "--duration=1m"]);
    assert!(
        err.contains("spec.expirationSeconds") && err.contains("less than 10 minutes"),
        "{err}"
    );
    // Bound to a pod that does not exist: NotFound.
    let err = cp.kubectl_err(&[
        "create",
        "token",
        "worker",
        "--bound-object-kind=Pod",
        "--bound-object-name=nobody",
    ]);
    assert!(err.contains("not found"), "{err}");
    // For a service account that does not exist: NotFound.
    let err = cp.kubectl_err(&["create", "token", "ghost"]);
    assert!(
        err.contains(r#"serviceaccounts "ghost" not found"#),
        "{err}"
    );

    // No kubelet runs here, so the pod is removed at once with a zero grace period.
    cp.kubectl_ok(&["delete", "pod", "holder", "--grace-period=0", "--force"]);
    let out = cp.kubectl_with_token(&token, &["get", "pods"]);
    assert!(stderr(&out).contains("Unauthorized"), "{}", stderr(&out));
}
