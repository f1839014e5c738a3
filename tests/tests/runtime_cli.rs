//! The `windlass-runtime` CLI refuses bad bundles and IDs the way runc does: a clear message on stderr, exit code
//! 1, and nothing created.

use serde_json::json;
use windlass_tests::bundle::Bundle;
use windlass_tests::runtime::{cgroup_dirs, set_cgroup, unique_cgroup, RuntimeCli};
use windlass_tests::{require_privileged, unique_name};

fn refused(rt: &RuntimeCli, args: &[&str], message: &str) {
    let out = rt.output(args);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{args:?} should fail: {stderr}");
    assert!(
        stderr.contains(message),
        "{args:?}: expected {message:?} in {stderr}"
    );
    assert!(
        stderr.contains("level=error"),
        "runc-style error line expected: {stderr}"
    );
    assert!(
        rt.state_dirs().is_empty(),
        "{args:?} left state behind: {:?}",
        rt.state_dirs()
    );
}

fn bundle_with_cgroup() -> (Bundle, String) {
    let mut b = Bundle::busybox(&["true"]).expect("bundle");
    let cg = unique_cgroup("cli");
    set_cgroup(&mut b, &cg);
    b.write_config().expect("config");
    (b, cg)
}

#[test]
fn a_bundle_without_config_json_is_refused() {
    if !require_privileged(&["/bin/busybox"]) {
        return;
    }
    let rt = RuntimeCli::new();
    let (b, _) = bundle_with_cgroup();
    std::fs::remove_file(b.path().join("config.json")).expect("rm");
    let bundle = b.path().to_string_lossy().into_owned();
    refused(
        &rt,
        &["create", "--bundle", &bundle, &unique_name("e")],
        "config.json not found in bundle",
    );
    refused(
        &rt,
        &["run", "--bundle", &bundle, &unique_name("e")],
        "config.json not found in bundle",
    );
}

#[test]
fn malformed_json_is_refused() {
    if !require_privileged(&["/bin/busybox"]) {
        return;
    }
    let rt = RuntimeCli::new();
    let (b, cg) = bundle_with_cgroup();
    std::fs::write(b.path().join("config.json"), "{\"ociVersion\": ").expect("write");
    refused(
        &rt,
        &[
            "create",
            "--bundle",
            &b.path().to_string_lossy(),
            &unique_name("e"),
        ],
        "is not valid JSON",
    );
    assert!(cgroup_dirs(&cg).is_empty());
}

#[test]
fn an_unknown_namespace_type_is_refused_by_name() {
    if !require_privileged(&["/bin/busybox"]) {
        return;
    }
    let rt = RuntimeCli::new();
    let (mut b, cg) = bundle_with_cgroup();
    b.config_mut()["linux"]["namespaces"]
        .as_array_mut()
        .expect("namespaces")
        .push(json!({"type": "teleport"}));
    b.write_config().expect("config");
    refused(
        &rt,
        &[
            "create",
            "--bundle",
            &b.path().to_string_lossy(),
            &unique_name("e"),
        ],
        "unknown namespace type \\\"teleport\\\"",
    );
    assert!(cgroup_dirs(&cg).is_empty());
}

#[test]
fn a_missing_rootfs_is_refused() {
    if !require_privileged(&["/bin/busybox"]) {
        return;
    }
    let rt = RuntimeCli::new();
    let (b, cg) = bundle_with_cgroup();
    std::fs::remove_dir_all(b.rootfs()).expect("rm rootfs");
    refused(
        &rt,
        &[
            "create",
            "--bundle",
            &b.path().to_string_lossy(),
            &unique_name("e"),
        ],
        "rootfs",
    );
    refused(
        &rt,
        &[
            "create",
            "--bundle",
            &b.path().to_string_lossy(),
            &unique_name("e"),
        ],
        "does not exist",
    );
    assert!(cgroup_dirs(&cg).is_empty());
}

#[test]
fn a_bad_id_and_unknown_containers_are_refused() {
    if !require_privileged(&["/bin/busybox"]) {
        return;
    }
    let rt = RuntimeCli::new();
    let (b, _) = bundle_with_cgroup();
    refused(
        &rt,
        &[
            "create",
            "--bundle",
            &b.path().to_string_lossy(),
            "../escape",
        ],
        "invalid container id",
    );
    for cmd in [
        &["start", "nope"][..],
        &["state", "nope"],
        &["kill", "nope"],
        &["delete", "nope"],
    ] {
        refused(&rt, cmd, "container does not exist");
    }
}

#[test]
fn list_prints_a_table_and_json() {
    if !require_privileged(&["/bin/busybox"]) {
        return;
    }
    let rt = RuntimeCli::new();
    assert_eq!(rt.ok(&["list", "--format", "json"]).trim(), "[]");
    let (mut b, _) = bundle_with_cgroup();
    b.config_mut()["process"]["args"] = json!(["sleep", "30"]);
    b.write_config().expect("config");
    let id = unique_name("ls");
    rt.ok(&["create", "--bundle", &b.path().to_string_lossy(), &id]);
    let table = rt.ok(&["list"]);
    let header: Vec<&str> = table
        .lines()
        .next()
        .expect("header")
        .split_whitespace()
        .collect();
    assert_eq!(
        header,
        ["ID", "PID", "STATUS", "BUNDLE", "CREATED", "OWNER"]
    );
    let row: Vec<&str> = table
        .lines()
        .nth(1)
        .expect("row")
        .split_whitespace()
        .collect();
    assert_eq!((row[0], row[2]), (id.as_str(), "created"));
    let json: serde_json::Value =
        serde_json::from_str(&rt.ok(&["list", "--format", "json"])).expect("json");
    assert_eq!(json[0]["id"], id.as_str());
    assert_eq!(json[0]["status"], "created");
    assert_eq!(rt.ok(&["list", "-q"]).trim(), id);
    rt.ok(&["delete", &id]);
}
