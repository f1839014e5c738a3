//! The shared fixtures are themselves checked against reference tools, so a runtime test failure means the runtime.

use std::process::Command;

use windlass_tests::bundle::Bundle;
use windlass_tests::{require_privileged, run_ok, unique_name};

#[test]
fn busybox_bundle_runs_under_the_reference_runtime_runc() {
    if !require_privileged(&["runc"]) {
        return;
    }
    let bundle = Bundle::busybox(&[
        "sh",
        "-c",
        "echo $(hostname) $(cat /proc/1/cmdline | tr '\\0' ' ')",
    ])
    .expect("bundle");
    let root = tempfile::tempdir().expect("tempdir");
    let id = unique_name("fx");
    let out = run_ok(
        Command::new("runc")
            .arg("--root")
            .arg(root.path())
            .arg("run")
            .arg("--bundle")
            .arg(bundle.path())
            .arg(&id),
    );
    assert_eq!(
        out.trim(),
        "windlass sh -c echo $(hostname) $(cat /proc/1/cmdline | tr '\\0' ' ')"
    );
}
