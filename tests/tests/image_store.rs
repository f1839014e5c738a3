//! The content store as an operator sees it: leases block `image rm`, GC reclaims only unreferenced content,
//! import/export round trips (OCI layout directory and tar, `docker save` archives), and the CLI.

use std::fs;
use std::path::Path;
use std::process::Command;

use windlass_runtime::image::{PullOptions, Store, StoreError};
use windlass_tests::image_fixture::OciLayout;
use windlass_tests::registry::Registry;
use windlass_tests::{require_privileged, run_ok, unique_name, workspace_binary, TempDir};

const TOOLS: &[&str] = &["docker-registry", "skopeo", "umoci"];

fn tmp() -> TempDir {
    tempfile::Builder::new()
        .prefix("windlass-store-")
        .tempdir()
        .expect("tempdir")
}

fn count(p: &Path) -> usize {
    fs::read_dir(p).map(|d| d.count()).unwrap_or(0)
}

/// A registry holding `test/base:v1` (busybox) and `test/app:v1` (busybox + one more layer).
fn two_images() -> (OciLayout, Registry) {
    let layout = OciLayout::new().expect("layout");
    layout.busybox("base").expect("busybox");
    layout
        .change("base", "app", |r| fs::write(r.join("app.txt"), "app\n"))
        .expect("app layer");
    let reg = Registry::start().expect("registry");
    reg.push(&layout.path(), "base", "test/base:v1", false);
    reg.push(&layout.path(), "app", "test/app:v1", false);
    (layout, reg)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn image_in_use_cannot_be_removed_and_gc_keeps_only_referenced_content() {
    if !require_privileged(TOOLS) {
        return;
    }
    let (_layout, reg) = two_images();
    let dir = tmp();
    let store = Store::open(dir.path()).expect("store");
    let opts = PullOptions {
        insecure_registries: vec![reg.addr.clone()],
        ..Default::default()
    };
    let base = format!("{}/test/base:v1", reg.addr);
    let app = format!("{}/test/app:v1", reg.addr);
    let base_rec = store.pull(&base, &opts).await.expect("pull base").record;
    let app_rec = store.pull(&app, &opts).await.expect("pull app").record;
    assert_eq!(
        app_rec.layers[0], base_rec.layers[0],
        "the base layer is shared"
    );
    assert_eq!(count(&dir.path().join("layers")), 2);

    let ctr = unique_name("ctr");
    store.lease(&app, &ctr).expect("lease");
    let err = store.remove(&app).expect_err("leased image");
    assert!(
        matches!(&err, StoreError::InUse { containers, .. } if *containers == vec![ctr.clone()]),
        "{err}"
    );
    assert!(err.to_string().contains(&ctr));

    // The CLI refuses too, with the reason, and exits non-zero.
    let out = Command::new(workspace_binary("windlass-runtime"))
        .args(["image", "rm", "--store"])
        .arg(dir.path())
        .arg(&app)
        .output()
        .expect("run rm");
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("in use"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // Nothing is collected while referenced.
    assert_eq!(store.gc().expect("gc"), Default::default());

    store.release(&ctr).expect("release");
    store.remove(&app).expect("remove after release");
    let report = store.gc().expect("gc");
    assert_eq!(report.layers_removed, 1, "only the app's own layer goes");
    assert_eq!(
        report.blobs_removed, 3,
        "app manifest, config and layer blob"
    );
    assert!(store
        .layer_path(&base_rec.layers[0].diff_id)
        .expect("path")
        .is_dir());
    assert!(!store
        .layer_path(&app_rec.layers[1].diff_id)
        .expect("path")
        .exists());

    let out = run_ok(
        Command::new(workspace_binary("windlass-runtime"))
            .args(["image", "rm", "--store"])
            .arg(dir.path())
            .arg(&base),
    );
    assert!(out.contains("removed"), "{out}");
    assert_eq!(count(&dir.path().join("layers")), 0);
    assert_eq!(count(&dir.path().join("blobs/sha256")), 0);
    assert!(store.list().expect("list").is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exported_images_import_into_another_store_unchanged() {
    if !require_privileged(TOOLS) {
        return;
    }
    let (_layout, reg) = two_images();
    let dir = tmp();
    let store = Store::open(dir.path().join("a")).expect("store");
    let app = format!("{}/test/app:v1", reg.addr);
    let opts = PullOptions {
        insecure_registries: vec![reg.addr.clone()],
        ..Default::default()
    };
    let original = store.pull(&app, &opts).await.expect("pull").record;

    // OCI layout directory: skopeo reads it back, and another store imports it.
    let layout_dir = dir.path().join("exported");
    store.export(&app, &layout_dir).expect("export dir");
    let inspected = run_ok(
        Command::new("skopeo")
            .args(["inspect", "--raw"])
            .arg(format!("oci:{}", layout_dir.display())),
    );
    assert!(inspected.contains(&original.config_digest), "{inspected}");
    let other = Store::open(dir.path().join("b")).expect("store b");
    let imported = other.import(&layout_dir, None).expect("import dir");
    assert_eq!(imported.len(), 1);
    assert_eq!(
        imported[0].reference, original.reference,
        "the name travels in the annotations"
    );
    assert_eq!(imported[0].manifest_digest, original.manifest_digest);
    assert_eq!(imported[0].layers, original.layers);
    for l in &imported[0].layers {
        assert!(other.layer_path(&l.diff_id).expect("path").is_dir());
    }

    // Tar, through the CLI, under a new name.
    let tar = dir.path().join("app.tar");
    run_ok(
        Command::new(workspace_binary("windlass-runtime"))
            .args(["image", "export", "--store"])
            .arg(dir.path().join("a"))
            .arg(&app)
            .arg(&tar),
    );
    let out = run_ok(
        Command::new(workspace_binary("windlass-runtime"))
            .args(["image", "import", "--store"])
            .arg(dir.path().join("c"))
            .args(["--name", "lab.local/app:offline"])
            .arg(&tar),
    );
    assert!(
        out.contains("lab.local/app:offline") && out.contains(&original.manifest_digest),
        "{out}"
    );
    let listed = run_ok(
        Command::new(workspace_binary("windlass-runtime"))
            .args(["image", "list", "--store"])
            .arg(dir.path().join("c")),
    );
    assert!(listed.contains("lab.local/app:offline"), "{listed}");
    assert_eq!(
        count(&dir.path().join("c/tmp")),
        0,
        "import scratch space is cleaned up"
    );

    // A `docker save` archive (written by skopeo's docker-archive transport).
    let save = dir.path().join("save.tar");
    run_ok(Command::new("skopeo").args([
        "copy",
        "--quiet",
        &format!("oci:{}", layout_dir.display()),
        &format!("docker-archive:{}:team/app:saved", save.display()),
    ]));
    let d = Store::open(dir.path().join("d")).expect("store d");
    let saved = d.import(&save, None).expect("import docker save");
    assert_eq!(saved[0].reference, "docker.io/team/app:saved");
    assert_eq!(
        saved[0].config_digest, original.config_digest,
        "same image config"
    );
    let diff_ids: Vec<_> = saved[0].layers.iter().map(|l| l.diff_id.clone()).collect();
    let original_diff_ids: Vec<_> = original.layers.iter().map(|l| l.diff_id.clone()).collect();
    assert_eq!(diff_ids, original_diff_ids, "same unpacked layers");
    let inspect = run_ok(
        Command::new(workspace_binary("windlass-runtime"))
            .args(["image", "inspect", "--store"])
            .arg(dir.path().join("d"))
            .arg("team/app:saved"),
    );
    let v: serde_json::Value = serde_json::from_str(&inspect).expect("inspect JSON");
    assert_eq!(v["config"]["config"]["Cmd"][2], "echo hello");
}

#[test]
fn import_of_something_that_is_not_an_image_fails_and_stores_nothing() {
    if !require_privileged(&[]) {
        return;
    }
    let dir = tmp();
    let store = Store::open(dir.path().join("s")).expect("store");
    let junk = dir.path().join("junk");
    fs::create_dir(&junk).expect("mkdir");
    fs::write(junk.join("hello"), "x").expect("write");
    assert!(store.import(&junk, None).is_err());
    let not_tar = dir.path().join("x.tar");
    fs::write(&not_tar, vec![7u8; 4096]).expect("write");
    assert!(store.import(&not_tar, None).is_err());
    assert!(store.list().expect("list").is_empty());
    assert_eq!(count(&dir.path().join("s/tmp")), 0);
}
