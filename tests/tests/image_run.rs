//! An image pulled from a registry runs as a container with Windlass's own runtime: `image pull`, `image bundle`,
//! `run`, then `image unbundle` — and the image stays leased (not removable) while a bundle uses it.

use std::process::Command;

use windlass_tests::image_fixture::OciLayout;
use windlass_tests::registry::Registry;
use windlass_tests::{require_privileged, unique_name, workspace_binary, TempDir};

fn runtime(store: &TempDir, state: &TempDir) -> impl Fn(&[&str]) -> std::process::Output {
    let bin = workspace_binary("windlass-runtime");
    let store = store.path().to_path_buf();
    let state = state.path().to_path_buf();
    move |args: &[&str]| {
        let mut cmd = Command::new(&bin);
        cmd.arg("--root").arg(&state);
        if args.first() == Some(&"image") {
            cmd.arg("image").arg("--store").arg(&store).args(&args[1..]);
        } else {
            cmd.args(args);
        }
        cmd.output().expect("windlass-runtime runs")
    }
}

fn ok(out: std::process::Output) -> String {
    assert!(
        out.status.success(),
        "exit {}: {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn a_pulled_image_runs_with_its_own_command_and_with_kubernetes_style_args() {
    if !require_privileged(&["docker-registry", "skopeo", "umoci"]) {
        return;
    }
    let layout = OciLayout::new().expect("layout");
    layout.busybox("bb").expect("busybox image");
    let reg = Registry::start().expect("registry");
    reg.push(&layout.path(), "bb", "test/busybox:run", false);
    let image = format!("{}/test/busybox:run", reg.addr);

    let store = tempfile::tempdir().expect("store dir");
    let state = tempfile::tempdir().expect("state dir");
    let rt = runtime(&store, &state);
    ok(rt(&[
        "image",
        "pull",
        "--insecure-registry",
        &reg.addr,
        &image,
    ]));

    // The image's own Cmd (`sh -c 'echo hello'`).
    let work = tempfile::tempdir().expect("bundle dir");
    let id = unique_name("img");
    let bundle = work.path().join("default");
    let bundle_s = bundle.to_str().expect("utf-8 path");
    ok(rt(&["image", "bundle", &image, &id, bundle_s]));
    let out = ok(rt(&["run", "--bundle", bundle_s, &id]));
    assert_eq!(out.trim(), "hello");

    // While the bundle exists the image is leased: rm is refused and nothing is removed.
    let refused = rt(&["image", "rm", &image]);
    assert!(!refused.status.success(), "rm of a leased image must fail");
    ok(rt(&["image", "inspect", &image]));
    ok(rt(&["image", "unbundle", &id, bundle_s]));
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").expect("mountinfo");
    assert!(
        !mounts.contains(bundle_s),
        "rootfs still mounted after unbundle"
    );

    // Kubernetes `args` replace the image Cmd; env is merged in.
    let id2 = unique_name("img");
    let bundle2 = work.path().join("args");
    let bundle2_s = bundle2.to_str().expect("utf-8 path");
    ok(rt(&[
        "image",
        "bundle",
        "--env",
        "GREETING=from-args",
        "--hostname",
        "imgpod",
        &image,
        &id2,
        bundle2_s,
        "--",
        "/bin/sh",
        "-c",
        "echo $GREETING $(hostname) $PATH",
    ]));
    let out = ok(rt(&["run", "--bundle", bundle2_s, &id2]));
    assert_eq!(out.trim(), "from-args imgpod /bin");
    ok(rt(&["image", "unbundle", &id2, bundle2_s]));

    // Once no bundle uses it, the image can be removed.
    ok(rt(&["image", "rm", &image]));
    assert!(!rt(&["image", "inspect", &image]).status.success());
}
