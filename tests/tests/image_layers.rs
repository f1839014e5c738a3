//! Layer unpacking: hostile entries are refused with nothing left behind, metadata survives, and whiteouts across
//! layers give the right merged view through overlayfs — including inside a container run by `runc`.

use std::fs;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::Path;
use std::process::Command;

use windlass_runtime::image::{unpack_layer, PullError, PullOptions, Store, UnpackError};
use windlass_tests::bundle::default_config;
use windlass_tests::image_fixture::{layer_tar, OciLayout, TarEntry};
use windlass_tests::registry::Registry;
use windlass_tests::{require_privileged, run_ok, unique_name, TempDir};

fn scratch() -> TempDir {
    tempfile::Builder::new()
        .prefix("windlass-unpack-")
        .tempdir()
        .expect("tempdir")
}

/// Unpacks `tar` into `<dir>/layer` and returns the result; asserts nothing is left when it fails.
fn unpack(dir: &Path, tar: &[u8]) -> Result<(), UnpackError> {
    let blob = dir.join("blob.tar");
    fs::write(&blob, tar).expect("write blob");
    let dest = dir.join("layer");
    let tmp = dir.join("tmp-unpack");
    let res = unpack_layer(&blob, &dest, &tmp, None).map(|_| ());
    if res.is_err() {
        assert!(!dest.exists(), "a failed unpack leaves no layer");
        assert!(!tmp.exists(), "a failed unpack leaves no temp dir");
    }
    res
}

#[test]
fn every_escape_route_out_of_a_layer_is_refused_and_nothing_is_left() {
    if !require_privileged(&[]) {
        return;
    }
    let dir = scratch();
    let outside = dir.path().join("outside");
    fs::create_dir(&outside).expect("mkdir");
    fs::write(outside.join("secret"), "untouched").expect("write");
    let out = outside.display().to_string();
    let secret = format!("{out}/secret");

    use TarEntry::*;
    type Case<'a> = (&'a str, Vec<TarEntry<'a>>, fn(&UnpackError) -> bool);
    let cases: Vec<Case<'_>> = vec![
        ("dot-dot path", vec![File("../../escaped", b"x")], |e| {
            matches!(e, UnpackError::ParentComponent { .. })
        }),
        (
            "dot-dot in the middle",
            vec![Dir("a/"), File("a/../../escaped", b"x")],
            |e| matches!(e, UnpackError::ParentComponent { .. }),
        ),
        ("absolute path", vec![File(&secret, b"x")], |e| {
            matches!(e, UnpackError::AbsolutePath { .. })
        }),
        (
            "write through a symlink to an outside directory",
            vec![Symlink("link", &out), File("link/pwned", b"x")],
            |e| matches!(e, UnpackError::ThroughSymlink { .. }),
        ),
        (
            "write through a relative symlink climbing out",
            vec![Symlink("up", "../../.."), File("up/pwned", b"x")],
            |e| matches!(e, UnpackError::ThroughSymlink { .. }),
        ),
        (
            "directory through a symlink",
            vec![Symlink("d", &out), Dir("d/sub/")],
            |e| matches!(e, UnpackError::ThroughSymlink { .. }),
        ),
        (
            "hard link to an absolute path",
            vec![HardLink("hl", &secret)],
            |e| matches!(e, UnpackError::BadHardLink { .. }),
        ),
        (
            "hard link climbing out",
            vec![HardLink("hl", "../outside/secret")],
            |e| matches!(e, UnpackError::BadHardLink { .. }),
        ),
        (
            "hard link through a symlink",
            vec![Symlink("s", &out), HardLink("hl", "s/secret")],
            |e| matches!(e, UnpackError::BadHardLink { .. }),
        ),
        (
            "hard link to a file not in the layer",
            vec![HardLink("hl", "etc/shadow")],
            |e| matches!(e, UnpackError::BadHardLink { .. }),
        ),
        (
            "whiteout through a symlink",
            vec![Symlink("w", &out), File("w/.wh.secret", b"")],
            |e| matches!(e, UnpackError::ThroughSymlink { .. }),
        ),
    ];
    for (what, entries, expected) in cases {
        let case_dir = dir.path().join(unique_name("c"));
        fs::create_dir(&case_dir).expect("mkdir");
        let err = unpack(&case_dir, &layer_tar(&entries)).expect_err(what);
        assert!(expected(&err), "{what}: unexpected error {err}");
        assert!(!err.to_string().is_empty());
        assert_eq!(
            fs::read_to_string(outside.join("secret")).expect("secret"),
            "untouched",
            "{what}"
        );
        assert_eq!(
            fs::read_dir(&outside).expect("ls").count(),
            1,
            "{what}: nothing created outside"
        );
        assert!(
            !dir.path().join("escaped").exists() && !Path::new("/escaped").exists(),
            "{what}"
        );
    }

    // A later entry replacing a symlink replaces the link; it never writes to what the link points at.
    let case_dir = dir.path().join("replace");
    fs::create_dir(&case_dir).expect("mkdir");
    unpack(
        &case_dir,
        &layer_tar(&[Symlink("evil", &secret), File("evil", b"inside")]),
    )
    .expect("replacing a symlink is fine");
    assert_eq!(
        fs::read_to_string(outside.join("secret")).expect("secret"),
        "untouched"
    );
    assert_eq!(
        fs::read_to_string(case_dir.join("layer/evil")).expect("evil"),
        "inside"
    );
}

#[test]
fn layer_metadata_links_and_whiteouts_are_unpacked_in_overlay_form() {
    if !require_privileged(&[]) {
        return;
    }
    let dir = scratch();
    let mut builder = tar::Builder::new(Vec::new());
    let mut file = |path: &str, mode: u32, uid: u64, data: &[u8], xattr: Option<(&str, &[u8])>| {
        if let Some((k, v)) = xattr {
            builder
                .append_pax_extensions([(format!("SCHILY.xattr.{k}").as_str(), v)])
                .expect("pax");
        }
        let mut h = tar::Header::new_ustar();
        h.set_path(path).expect("path");
        h.set_mode(mode);
        h.set_uid(uid);
        h.set_gid(uid + 1);
        h.set_mtime(1_600_000_000);
        h.set_size(data.len() as u64);
        h.set_entry_type(if path.ends_with('/') {
            tar::EntryType::Directory
        } else {
            tar::EntryType::Regular
        });
        h.set_cksum();
        builder.append(&h, data).expect("append");
    };
    file("usr/", 0o755, 0, b"", None);
    file("usr/bin/", 0o750, 7, b"", None);
    file(
        "usr/bin/tool",
        0o4711,
        1234,
        b"#!/bin/sh\n",
        Some(("user.origin", b"windlass")),
    );
    file("usr/bin/open", 0o777, 0, b"", None);
    file("etc/.wh.removed", 0o644, 0, b"", None);
    file("opaque/.wh..wh..opq", 0o644, 0, b"", None);
    file(
        "opaque/kept",
        0o600,
        0,
        b"k",
        Some(("trusted.overlay.redirect", b"/elsewhere")),
    );
    let mut tar = builder.into_inner().expect("tar");
    // Hard link and symlink entries from the fixture builder, appended before the end-of-archive blocks.
    tar.truncate(tar.len() - 1024);
    tar.extend(layer_tar(&[
        TarEntry::HardLink("usr/bin/tool-link", "usr/bin/tool"),
        TarEntry::Symlink("usr/bin/sh", "/bin/busybox"),
    ]));
    unpack(dir.path(), &tar).expect("unpack");
    let layer = dir.path().join("layer");

    let tool = fs::metadata(layer.join("usr/bin/tool")).expect("tool");
    assert_eq!(
        tool.permissions().mode() & 0o7777,
        0o4711,
        "set-uid survives chown"
    );
    assert_eq!((tool.uid(), tool.gid()), (1234, 1235));
    assert_eq!(tool.mtime(), 1_600_000_000);
    let dirmeta = fs::metadata(layer.join("usr/bin")).expect("usr/bin");
    assert_eq!(
        (dirmeta.permissions().mode() & 0o7777, dirmeta.uid()),
        (0o750, 7)
    );
    assert_eq!(
        dirmeta.mtime(),
        1_600_000_000,
        "directory mtimes are set after their children"
    );
    let mode = |p: &str| fs::metadata(layer.join(p)).expect(p).permissions().mode() & 0o7777;
    assert_eq!(
        mode("usr/bin/open"),
        0o777,
        "the umask does not narrow layer modes"
    );
    assert_eq!(mode("opaque/kept"), 0o600);
    let link = fs::metadata(layer.join("usr/bin/tool-link")).expect("hard link");
    assert_eq!(link.ino(), tool.ino(), "hard link shares the inode");
    assert_eq!(
        fs::read_link(layer.join("usr/bin/sh")).expect("symlink"),
        Path::new("/bin/busybox")
    );
    assert_eq!(
        getxattr(&layer.join("usr/bin/tool"), "user.origin").as_deref(),
        Some(&b"windlass"[..])
    );

    let wh = fs::symlink_metadata(layer.join("etc/removed")).expect("whiteout");
    assert!(
        wh.file_type().is_char_device() && wh.rdev() == 0,
        "whiteout is a 0:0 char device"
    );
    assert!(!layer.join("etc/.wh.removed").exists());
    assert_eq!(
        getxattr(&layer.join("opaque"), "trusted.overlay.opaque").as_deref(),
        Some(&b"y"[..])
    );
    assert_eq!(
        getxattr(&layer.join("opaque/kept"), "trusted.overlay.redirect"),
        None,
        "overlay xattrs from a layer are dropped"
    );
}

fn getxattr(path: &Path, name: &str) -> Option<Vec<u8>> {
    use std::os::unix::ffi::OsStrExt;
    let p = std::ffi::CString::new(path.as_os_str().as_bytes()).ok()?;
    let n = std::ffi::CString::new(name).ok()?;
    let mut buf = vec![0u8; 256];
    // SAFETY: p and n are NUL-terminated; buf is writable for buf.len() bytes.
    let len =
        unsafe { libc::lgetxattr(p.as_ptr(), n.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
    let len = usize::try_from(len).ok()?;
    buf.truncate(len);
    Some(buf)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malicious_layer_in_a_pulled_image_fails_the_pull_and_leaves_nothing() {
    if !require_privileged(&["docker-registry", "skopeo", "umoci"]) {
        return;
    }
    let layout = OciLayout::new().expect("layout");
    let good = layer_tar(&[TarEntry::Dir("ok/"), TarEntry::File("ok/file", b"fine")]);
    let evil = layer_tar(&[
        TarEntry::Symlink("x", "/etc"),
        TarEntry::File("x/cron.d/evil", b"* * * * * root sh"),
    ]);
    layout.raw_image("evil", &[good, evil]);
    let reg = Registry::start().expect("registry");
    reg.push(&layout.path(), "evil", "test/evil:v1", false);
    let dir = scratch();
    let store = Store::open(dir.path()).expect("store");
    let opts = PullOptions {
        insecure_registries: vec![reg.addr.clone()],
        ..Default::default()
    };
    let reference = format!("{}/test/evil:v1", reg.addr);
    let err = store
        .pull(&reference, &opts)
        .await
        .expect_err("hostile layer");
    assert!(
        matches!(
            &err,
            PullError::Unpack {
                source: UnpackError::ThroughSymlink { .. },
                ..
            }
        ),
        "{err}"
    );
    assert!(!Path::new("/etc/cron.d/evil").exists());
    assert!(store.list().expect("list").is_empty(), "no image record");
    let manifest = layout.manifest("evil");
    let evil_diff = manifest["layers"][1]["digest"].as_str().expect("digest");
    assert!(
        !store.layer_path(evil_diff).expect("path").exists(),
        "no half-unpacked layer"
    );
    assert_eq!(
        fs::read_dir(dir.path().join("tmp")).expect("tmp").count(),
        0
    );
}

/// Builds a four-layer image: busybox; data files; umoci-made whiteout of one file; a hand-made layer with an
/// opaque directory and a whiteout of a whole directory.
fn layered_image(layout: &OciLayout) {
    layout.busybox("bb").expect("busybox");
    layout
        .change("bb", "l2", |r| {
            fs::create_dir_all(r.join("data/dir"))?;
            fs::create_dir_all(r.join("data/dir2"))?;
            fs::write(r.join("data/keep"), "keep\n")?;
            fs::write(r.join("data/gone"), "gone\n")?;
            fs::write(r.join("data/dir/old"), "old\n")?;
            fs::write(r.join("data/dir2/x"), "x\n")
        })
        .expect("layer 2");
    layout
        .change("l2", "layered", |r| fs::remove_file(r.join("data/gone")))
        .expect("layer 3");
    layout
        .add_raw_layer(
            "layered",
            &layer_tar(&[
                TarEntry::Dir("data/"),
                TarEntry::Dir("data/dir/"),
                TarEntry::File("data/dir/.wh..wh..opq", b""),
                TarEntry::File("data/dir/new", b"new\n"),
                TarEntry::File("data/.wh.dir2", b""),
            ]),
        )
        .expect("layer 4");
    layout.config(
        "layered",
        &[
            "--config.cmd",
            "/bin/sh",
            "--config.cmd",
            "-c",
            "--config.cmd",
            "ls /data /data/dir",
        ],
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn whiteouts_across_layers_give_the_merged_view_and_a_container_runs_on_it() {
    if !require_privileged(&["docker-registry", "skopeo", "umoci", "runc"]) {
        return;
    }
    let layout = OciLayout::new().expect("layout");
    layered_image(&layout);
    let reg = Registry::start().expect("registry");
    reg.push(&layout.path(), "layered", "test/layered:v1", false);
    let dir = scratch();
    let store = Store::open(dir.path().join("store")).expect("store");
    let opts = PullOptions {
        insecure_registries: vec![reg.addr.clone()],
        ..Default::default()
    };
    let reference = format!("{}/test/layered:v1", reg.addr);
    let pulled = store.pull(&reference, &opts).await.expect("pull");
    assert_eq!(pulled.record.layers.len(), 4);

    let id = unique_name("ctr");
    let bundle = dir.path().join("bundle");
    let rootfs = bundle.join("rootfs");
    let prepared = store
        .prepare_rootfs(&reference, &id, &rootfs)
        .expect("prepare rootfs");
    // Every later step undoes the mount even when an assertion fails.
    struct Unmount<'a>(&'a Store, &'a str, &'a Path);
    impl Drop for Unmount<'_> {
        fn drop(&mut self) {
            let _ = self.0.remove_rootfs(self.1, self.2);
        }
    }
    let guard = Unmount(&store, &id, &rootfs);

    assert_eq!(
        fs::read_to_string(rootfs.join("data/keep")).expect("keep"),
        "keep\n"
    );
    assert!(
        !rootfs.join("data/gone").exists(),
        "umoci whiteout hides the lower file"
    );
    let dir_listing: Vec<String> = fs::read_dir(rootfs.join("data/dir"))
        .expect("data/dir")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(
        dir_listing,
        vec!["new".to_string()],
        "opaque directory hides lower entries"
    );
    assert!(!rootfs.join("data/dir2").exists(), "directory whiteout");

    // The container is the image's consumer: runc (the runtime-core branch is not merged yet) on our overlay.
    let config = default_config(&[
        "/bin/sh",
        "-c",
        "ls /data /data/dir && echo written > /data/new-file",
    ]);
    fs::write(bundle.join("config.json"), config.to_string()).expect("config.json");
    let runc_root = dir.path().join("runc-root");
    let out = run_ok(
        Command::new("runc")
            .arg("--root")
            .arg(&runc_root)
            .args(["run", "--bundle"])
            .arg(&bundle)
            .arg(&id),
    );
    assert_eq!(out, "/data:\ndir\nkeep\n\n/data/dir:\nnew\n");
    assert_eq!(
        fs::read_to_string(prepared.upper.join("data/new-file")).expect("upper"),
        "written\n"
    );
    for layer in store.layer_dirs(&pulled.record).expect("layer dirs") {
        assert!(
            !layer.join("data/new-file").exists(),
            "writes never reach the shared layers"
        );
    }
    let _ = Command::new("runc")
        .arg("--root")
        .arg(&runc_root)
        .args(["delete", "-f", &id])
        .status();

    assert_eq!(
        store.leases_of(&reference).expect("leases"),
        vec![id.clone()]
    );
    drop(guard);
    assert!(
        !prepared.upper.exists(),
        "upper dir removed with the container"
    );
    assert!(
        store.leases_of(&reference).expect("leases").is_empty(),
        "lease released"
    );
    assert!(
        fs::read_dir(&rootfs).expect("rootfs").next().is_none(),
        "unmounted"
    );
}

#[test]
fn an_overlay_of_more_layers_than_fit_in_one_mount_page_still_mounts() {
    if !require_privileged(&[]) {
        return;
    }
    let dir = scratch();
    let base = dir
        .path()
        .join("a-rather-long-directory-name-to-make-every-lower-path-long-enough");
    let mut lowers = Vec::new();
    for i in 0..80 {
        let l = base.join(format!("layer-{i:03}-0123456789abcdef0123456789abcdef"));
        fs::create_dir_all(&l).expect("mkdir");
        fs::write(l.join(format!("f{i}")), format!("{i}")).expect("write");
        lowers.push(l);
    }
    let total: usize = lowers.iter().map(|l| l.as_os_str().len() + 1).sum();
    assert!(total > 4096, "the test must exceed a page ({total} bytes)");
    let (upper, work, target) = (
        dir.path().join("u"),
        dir.path().join("w"),
        dir.path().join("m"),
    );
    for d in [&upper, &work, &target] {
        fs::create_dir(d).expect("mkdir");
    }
    windlass_runtime::image::mount_overlay(&lowers, &upper, &work, &target).expect("mount");
    let seen = fs::read_dir(&target).map(|d| d.count()).unwrap_or(0);
    let _ = nix_umount(&target);
    assert_eq!(seen, 80, "all layers visible");
}

fn nix_umount(target: &Path) -> std::io::Result<()> {
    let status = Command::new("umount").arg(target).status()?;
    if status.success() {
        Ok(())
    } else {
        Err(std::io::Error::other("umount failed"))
    }
}

#[test]
fn gzip_and_zstd_layers_unpack_to_the_same_content_and_diff_id() {
    if !require_privileged(&[]) {
        return;
    }
    let tar = layer_tar(&[
        TarEntry::Dir("etc/"),
        TarEntry::File("etc/motd", b"compressed\n"),
    ]);
    let diff_id = windlass_tests::image_fixture::sha256(&tar);
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    std::io::Write::write_all(&mut gz, &tar).expect("gzip");
    let gz = gz.finish().expect("gzip");
    let zst = zstd::encode_all(tar.as_slice(), 3).expect("zstd");
    for (name, blob) in [("plain", tar.clone()), ("gzip", gz), ("zstd", zst)] {
        let dir = scratch();
        let path = dir.path().join("blob");
        fs::write(&path, &blob).expect("write");
        let stats = unpack_layer(
            &path,
            &dir.path().join("layer"),
            &dir.path().join("tmp"),
            Some(&diff_id),
        )
        .unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(stats.diff_id, diff_id, "{name}");
        assert_eq!(
            fs::read_to_string(dir.path().join("layer/etc/motd")).expect("motd"),
            "compressed\n",
            "{name}"
        );
    }
    // A diffID that does not match the content is refused, with nothing left.
    let dir = scratch();
    fs::write(dir.path().join("blob"), &tar).expect("write");
    let wrong = windlass_tests::image_fixture::sha256(b"other");
    let err = unpack_layer(
        &dir.path().join("blob"),
        &dir.path().join("layer"),
        &dir.path().join("tmp"),
        Some(&wrong),
    )
    .expect_err("wrong diffID");
    assert!(matches!(err, UnpackError::DiffIdMismatch { .. }), "{err}");
    assert!(!dir.path().join("layer").exists() && !dir.path().join("tmp").exists());
}
