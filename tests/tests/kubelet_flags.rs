//! The `windlass-kubelet` flag contract scripts and the lab rely on (issue 6). With every flag given but no
//! reachable API server (a kubeconfig that does not exist), it must check its flags, then fail naming the
//! kubeconfig. The running kubelet is covered end to end in `kubelet_e2e.rs`, static pods from
//! `--pod-manifest-path` (also with the API server down) in `kubelet_static_pods.rs`.

use std::process::Command;

use windlass_tests::workspace_binary;

#[test]
fn every_contract_flag_is_accepted_and_a_missing_kubeconfig_is_named() {
    let dir = tempfile::tempdir().expect("tempdir");
    let manifests = dir.path().join("manifests");
    std::fs::create_dir(&manifests).expect("mkdir");
    std::fs::write(
        manifests.join("web.yaml"),
        "apiVersion: v1\nkind: Pod\nmetadata: {name: web}\nspec: {containers: [{name: w, image: busybox}]}\n",
    )
    .expect("manifest");
    let out = Command::new(workspace_binary("windlass-kubelet"))
        .env("RUST_LOG", "info")
        .env_remove("RUST_BACKTRACE")
        .args([
            "--kubeconfig",
            "/nonexistent/kubeconfig",
            "--node-name",
            "node-a",
            "--node-ip",
            "10.0.0.2",
        ])
        .arg("--root-dir")
        .arg(dir.path())
        .args([
            "--cgroup-root",
            "/windlass-test",
            "--cni-bin-dir",
            "/opt/cni/bin:/usr/lib/cni",
        ])
        .arg("--cni-conf-dir")
        .arg(dir.path().join("net.d"))
        .args([
            "--max-pods",
            "30",
            "--cluster-dns",
            "10.96.0.10",
            "--cluster-domain",
            "cluster.local",
        ])
        .arg("--pod-manifest-path")
        .arg(&manifests)
        .args([
            "--insecure-registry",
            "127.0.0.1:5000",
            "--insecure-registry",
            "127.0.0.1:5001",
        ])
        .args(["--port", "20250", "--healthz-port", "20248"])
        .args(["--runtime-binary", "/usr/bin/true"])
        .output()
        .expect("run windlass-kubelet");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("kubeconfig /nonexistent/kubeconfig"),
        "{stderr}"
    );
}

#[test]
fn an_unusable_flag_value_exits_2_naming_it() {
    let out = Command::new(workspace_binary("windlass-kubelet"))
        .args(["--node-name", "node-a", "--insecure-registry", "no-port"])
        .output()
        .expect("run windlass-kubelet");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("--insecure-registry \"no-port\""),
        "{stderr}"
    );
}
