//! Memory-backed pod volumes for real: tmpfs mounts with their size limit, gone after teardown.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use k8s_openapi::api::core::v1::{EmptyDirVolumeSource, Pod, PodSpec, SecretVolumeSource, Volume};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use windlass_kubelet::env::{MapSource, PodContext};
use windlass_kubelet::volumes::{NoTokens, VolumeManager};
use windlass_tests::{require_privileged, unique_name};

/// A kubelet root dir whose mounts are lazily unmounted on drop, so a failing test leaves no tmpfs behind.
struct RootDir {
    dir: tempfile::TempDir,
}

impl RootDir {
    fn new() -> Self {
        Self {
            dir: tempfile::tempdir().expect("tempdir"),
        }
    }
    fn path(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for RootDir {
    fn drop(&mut self) {
        for m in mounts_under(self.dir.path()).into_iter().rev() {
            let _ = nix::mount::umount2(&m, nix::mount::MntFlags::MNT_DETACH);
        }
    }
}

/// Mount points under `dir`, from /proc/self/mountinfo (field 5 is the mount point).
fn mounts_under(dir: &Path) -> Vec<PathBuf> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").expect("mountinfo");
    info.lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(PathBuf::from)
        .filter(|p| p.starts_with(dir))
        .collect()
}

fn fs_type(path: &Path) -> Option<String> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    info.lines().find_map(|l| {
        let fields: Vec<&str> = l.split(' ').collect();
        let sep = fields.iter().position(|f| *f == "-")?;
        (Path::new(fields[4]) == path).then(|| fields[sep + 1].to_string())
    })
}

fn pod(uid: &str, volumes: Vec<Volume>) -> Pod {
    Pod {
        metadata: ObjectMeta {
            name: Some("web".into()),
            namespace: Some("default".into()),
            uid: Some(uid.into()),
            ..Default::default()
        },
        spec: Some(PodSpec {
            volumes: Some(volumes),
            ..Default::default()
        }),
        ..Default::default()
    }
}

#[test]
fn a_memory_empty_dir_is_a_size_limited_tmpfs_unmounted_on_teardown() {
    if !require_privileged(&[]) {
        return;
    }
    let root = RootDir::new();
    let uid = unique_name("uid");
    let p = pod(
        &uid,
        vec![Volume {
            name: "cache".into(),
            empty_dir: Some(EmptyDirVolumeSource {
                medium: Some("Memory".into()),
                size_limit: Some(Quantity("1Mi".into())),
                ..Default::default()
            }),
            ..Default::default()
        }],
    );
    let m = VolumeManager::new(root.path());
    let mounted = m
        .setup(&p, &PodContext::default(), &MapSource::default(), &NoTokens)
        .expect("setup");
    let dir = &mounted[0].host_path;
    assert_eq!(
        fs_type(dir).as_deref(),
        Some("tmpfs"),
        "{dir:?} is a tmpfs mount"
    );
    // Resync must not stack a second mount.
    m.setup(&p, &PodContext::default(), &MapSource::default(), &NoTokens)
        .expect("resync");
    assert_eq!(mounts_under(root.path()).len(), 1);

    std::fs::write(dir.join("small"), vec![0u8; 512 * 1024]).expect("512 KiB fits");
    let err =
        std::fs::write(dir.join("big"), vec![0u8; 1024 * 1024]).expect_err("1 MiB more does not");
    assert_eq!(err.raw_os_error(), Some(libc::ENOSPC), "{err}");

    m.teardown(&uid).expect("teardown");
    assert!(mounts_under(root.path()).is_empty(), "unmounted");
    assert!(!m.pod_dir(&uid).join("volumes").exists());
}

#[test]
fn a_secret_volume_is_kept_in_memory_and_removed_with_the_pod() {
    if !require_privileged(&[]) {
        return;
    }
    let root = RootDir::new();
    let uid = unique_name("uid");
    let p = pod(
        &uid,
        vec![Volume {
            name: "creds".into(),
            secret: Some(SecretVolumeSource {
                secret_name: Some("creds".into()),
                ..Default::default()
            }),
            ..Default::default()
        }],
    );
    let mut source = MapSource::default();
    source.secrets.insert(
        ("default".into(), "creds".into()),
        BTreeMap::from([("password".to_string(), b"s3cret".to_vec())]),
    );
    let m = VolumeManager::new(root.path());
    let mounted = m
        .setup(&p, &PodContext::default(), &source, &NoTokens)
        .expect("setup");
    let dir = &mounted[0].host_path;
    assert_eq!(fs_type(dir).as_deref(), Some("tmpfs"));
    assert_eq!(
        std::fs::read_to_string(dir.join("password")).expect("read"),
        "s3cret"
    );

    // A missing required secret fails before anything is mounted.
    let other = pod(
        &unique_name("uid"),
        vec![Volume {
            name: "gone".into(),
            secret: Some(SecretVolumeSource {
                secret_name: Some("gone".into()),
                ..Default::default()
            }),
            ..Default::default()
        }],
    );
    assert!(m
        .setup(&other, &PodContext::default(), &source, &NoTokens)
        .is_err());
    assert_eq!(mounts_under(root.path()).len(), 1);

    m.teardown(&uid).expect("teardown");
    assert!(mounts_under(root.path()).is_empty());
}
