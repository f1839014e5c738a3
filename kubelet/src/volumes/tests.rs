use k8s_openapi::api::core::v1::{
    ConfigMapVolumeSource, Container, DownwardAPIVolumeFile, DownwardAPIVolumeSource,
    EmptyDirVolumeSource, HostPathVolumeSource, KeyToPath, ObjectFieldSelector, PodSpec,
    ProjectedVolumeSource, ResourceFieldSelector, ResourceRequirements, SecretVolumeSource,
    ServiceAccountTokenProjection, VolumeProjection,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

use super::*;
use crate::env::MapSource;

fn pod(volumes: Vec<Volume>) -> Pod {
    Pod {
        metadata: ObjectMeta {
            name: Some("web".into()),
            namespace: Some("shop".into()),
            uid: Some("uid-1".into()),
            labels: Some([("app".to_string(), "web".to_string())].into()),
            ..Default::default()
        },
        spec: Some(PodSpec {
            service_account_name: Some("builder".into()),
            containers: vec![Container {
                name: "app".into(),
                resources: Some(ResourceRequirements {
                    limits: Some([("memory".to_string(), Quantity("64Mi".into()))].into()),
                    ..Default::default()
                }),
                ..Default::default()
            }],
            volumes: Some(volumes),
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn vol(name: &str) -> Volume {
    Volume {
        name: name.into(),
        ..Default::default()
    }
}

fn source() -> MapSource {
    let mut s = MapSource::default();
    s.config_maps.insert(
        ("shop".into(), "cfg".into()),
        [
            ("app.conf".to_string(), b"level=debug".to_vec()),
            ("other".to_string(), b"x".to_vec()),
        ]
        .into(),
    );
    s.secrets.insert(
        ("shop".into(), "creds".into()),
        [("password".to_string(), b"s3cret".to_vec())].into(),
    );
    s
}

struct Tokens;
impl TokenSource for Tokens {
    fn service_account_token(
        &self,
        ns: &str,
        sa: &str,
        aud: Option<&str>,
        exp: i64,
    ) -> Result<Vec<u8>, String> {
        Ok(format!("token:{ns}:{sa}:{}:{exp}", aud.unwrap_or("-")).into_bytes())
    }
}

fn manager(root: &Path) -> VolumeManager {
    VolumeManager::new(root).with_secrets_on_disk()
}

fn read(p: &Path) -> String {
    std::fs::read_to_string(p).unwrap()
}

fn file_mode(p: &Path) -> u32 {
    std::fs::metadata(p).unwrap().permissions().mode() & 0o7777
}

#[test]
fn an_empty_dir_lives_under_the_pod_dir_and_teardown_removes_it() {
    let root = tempfile::tempdir().unwrap();
    let mut v = vol("scratch");
    v.empty_dir = Some(EmptyDirVolumeSource::default());
    let p = pod(vec![v]);
    let m = manager(root.path());
    let mounted = m
        .setup(&p, &PodContext::default(), &source(), &NoTokens)
        .unwrap();
    let dir = root
        .path()
        .join("pods/uid-1/volumes/kubernetes.io~empty-dir/scratch");
    assert_eq!(mounted[0].host_path, dir);
    assert!(!mounted[0].read_only);
    assert_eq!(file_mode(&dir), 0o777);
    std::fs::write(dir.join("f"), "data").unwrap();
    m.teardown("uid-1").unwrap();
    assert!(!root.path().join("pods/uid-1/volumes").exists());
    m.teardown("uid-1").unwrap();
}

#[test]
fn config_map_keys_become_files_and_updates_are_swapped_in() {
    let root = tempfile::tempdir().unwrap();
    let mut v = vol("config");
    v.config_map = Some(ConfigMapVolumeSource {
        name: "cfg".into(),
        ..Default::default()
    });
    let p = pod(vec![v]);
    let m = manager(root.path());
    let mut src = source();
    let mounted = m
        .setup(&p, &PodContext::default(), &src, &NoTokens)
        .unwrap();
    let dir = &mounted[0].host_path;
    assert!(dir.ends_with("kubernetes.io~configmap/config"));
    assert!(mounted[0].read_only);
    assert_eq!(read(&dir.join("app.conf")), "level=debug");
    assert_eq!(file_mode(&dir.join("..data/app.conf")), 0o644);
    let first = std::fs::read_link(dir.join("..data")).unwrap();

    src.config_maps.insert(
        ("shop".into(), "cfg".into()),
        [("app.conf".to_string(), b"level=info".to_vec())].into(),
    );
    m.setup(&p, &PodContext::default(), &src, &NoTokens)
        .unwrap();
    assert_eq!(read(&dir.join("app.conf")), "level=info");
    assert!(!dir.join("other").exists(), "removed key disappears");
    assert_ne!(std::fs::read_link(dir.join("..data")).unwrap(), first);
}

#[test]
fn items_select_keys_paths_and_modes_and_missing_keys_fail_unless_optional() {
    let root = tempfile::tempdir().unwrap();
    let items = |key: &str| {
        Some(vec![KeyToPath {
            key: key.into(),
            path: "conf/app.conf".into(),
            mode: Some(0o400),
            ..Default::default()
        }])
    };
    let mut v = vol("config");
    v.config_map = Some(ConfigMapVolumeSource {
        name: "cfg".into(),
        items: items("app.conf"),
        default_mode: Some(0o600),
        ..Default::default()
    });
    let m = manager(root.path());
    let mounted = m
        .setup(&pod(vec![v]), &PodContext::default(), &source(), &NoTokens)
        .unwrap();
    let dir = &mounted[0].host_path;
    assert_eq!(read(&dir.join("conf/app.conf")), "level=debug");
    assert_eq!(file_mode(&dir.join("..data/conf/app.conf")), 0o400);
    assert!(!dir.join("other").exists());

    let mut bad = vol("bad");
    bad.config_map = Some(ConfigMapVolumeSource {
        name: "cfg".into(),
        items: items("nope"),
        ..Default::default()
    });
    let err = m
        .setup(
            &pod(vec![bad]),
            &PodContext::default(),
            &source(),
            &NoTokens,
        )
        .unwrap_err();
    assert!(matches!(err, VolumeError::KeyNotFound { .. }), "{err}");

    let mut missing = vol("missing");
    missing.config_map = Some(ConfigMapVolumeSource {
        name: "gone".into(),
        optional: Some(true),
        ..Default::default()
    });
    let mounted = m
        .setup(
            &pod(vec![missing.clone()]),
            &PodContext::default(),
            &source(),
            &NoTokens,
        )
        .unwrap();
    assert!(
        mounted[0].host_path.is_dir(),
        "optional and absent: empty volume"
    );
    missing.config_map.as_mut().unwrap().optional = None;
    let err = m
        .setup(
            &pod(vec![missing]),
            &PodContext::default(),
            &source(),
            &NoTokens,
        )
        .unwrap_err();
    assert!(matches!(err, VolumeError::SourceNotFound { .. }), "{err}");
}

#[test]
fn secrets_downward_api_and_projected_volumes_are_written() {
    let root = tempfile::tempdir().unwrap();
    let mut secret = vol("creds");
    secret.secret = Some(SecretVolumeSource {
        secret_name: Some("creds".into()),
        default_mode: Some(0o400),
        ..Default::default()
    });
    let mut downward = vol("info");
    downward.downward_api = Some(DownwardAPIVolumeSource {
        items: Some(vec![
            DownwardAPIVolumeFile {
                path: "labels".into(),
                field_ref: Some(ObjectFieldSelector {
                    field_path: "metadata.labels".into(),
                    ..Default::default()
                }),
                ..Default::default()
            },
            DownwardAPIVolumeFile {
                path: "mem".into(),
                resource_field_ref: Some(ResourceFieldSelector {
                    container_name: Some("app".into()),
                    resource: "limits.memory".into(),
                    divisor: Some(Quantity("1Mi".into())),
                }),
                ..Default::default()
            },
        ]),
        ..Default::default()
    });
    let mut projected = vol("kube-api-access");
    projected.projected = Some(ProjectedVolumeSource {
        sources: Some(vec![
            VolumeProjection {
                service_account_token: Some(ServiceAccountTokenProjection {
                    path: "token".into(),
                    expiration_seconds: Some(3607),
                    ..Default::default()
                }),
                ..Default::default()
            },
            VolumeProjection {
                config_map: Some(ConfigMapProjection {
                    name: "cfg".into(),
                    items: Some(vec![KeyToPath {
                        key: "app.conf".into(),
                        path: "ca.crt".into(),
                        ..Default::default()
                    }]),
                    optional: None,
                }),
                ..Default::default()
            },
            VolumeProjection {
                downward_api: Some(k8s_openapi::api::core::v1::DownwardAPIProjection {
                    items: Some(vec![DownwardAPIVolumeFile {
                        path: "namespace".into(),
                        field_ref: Some(ObjectFieldSelector {
                            field_path: "metadata.namespace".into(),
                            ..Default::default()
                        }),
                        ..Default::default()
                    }]),
                }),
                ..Default::default()
            },
        ]),
        ..Default::default()
    });
    let m = manager(root.path());
    let mounted = m
        .setup(
            &pod(vec![secret, downward, projected]),
            &PodContext::default(),
            &source(),
            &Tokens,
        )
        .unwrap();
    let by = by_name(&mounted);
    let s = &by["creds"].host_path;
    assert!(s.ends_with("kubernetes.io~secret/creds"));
    assert_eq!(read(&s.join("password")), "s3cret");
    assert_eq!(file_mode(&s.join("..data/password")), 0o400);
    let d = &by["info"].host_path;
    assert_eq!(read(&d.join("labels")), "app=\"web\"");
    assert_eq!(read(&d.join("mem")), "64");
    let p = &by["kube-api-access"].host_path;
    assert_eq!(read(&p.join("token")), "token:shop:builder:-:3607");
    assert_eq!(read(&p.join("ca.crt")), "level=debug");
    assert_eq!(read(&p.join("namespace")), "shop");

    m.teardown("uid-1").unwrap();
    assert!(!root.path().join("pods/uid-1/volumes").exists());
}

#[test]
fn a_token_that_cannot_be_had_fails_the_projected_volume() {
    let root = tempfile::tempdir().unwrap();
    let mut projected = vol("tok");
    projected.projected = Some(ProjectedVolumeSource {
        sources: Some(vec![VolumeProjection {
            service_account_token: Some(ServiceAccountTokenProjection {
                path: "token".into(),
                ..Default::default()
            }),
            ..Default::default()
        }]),
        ..Default::default()
    });
    let err = manager(root.path())
        .setup(
            &pod(vec![projected]),
            &PodContext::default(),
            &source(),
            &NoTokens,
        )
        .unwrap_err();
    assert!(err.to_string().contains("shop/builder"), "{err}");
}

#[test]
fn host_path_types_are_checked_and_created() {
    let root = tempfile::tempdir().unwrap();
    let hp = |path: &Path, t: &str| {
        let mut v = vol("h");
        v.host_path = Some(HostPathVolumeSource {
            path: path.display().to_string(),
            type_: Some(t.into()),
        });
        pod(vec![v])
    };
    let m = manager(root.path());
    let ctx = PodContext::default();
    let dir = root.path().join("a/b");
    let mounted = m
        .setup(&hp(&dir, "DirectoryOrCreate"), &ctx, &source(), &NoTokens)
        .unwrap();
    assert_eq!(mounted[0].host_path, dir);
    assert!(dir.is_dir());
    assert_eq!(file_mode(&dir), 0o755);
    m.setup(&hp(&dir, "Directory"), &ctx, &source(), &NoTokens)
        .unwrap();
    let file = root.path().join("a/f");
    m.setup(&hp(&file, "FileOrCreate"), &ctx, &source(), &NoTokens)
        .unwrap();
    assert!(file.is_file());
    assert_eq!(file_mode(&file), 0o644);
    m.setup(&hp(&file, "File"), &ctx, &source(), &NoTokens)
        .unwrap();
    let checks = [
        (&file, "Directory", "is not a directory"),
        (&dir, "File", "is not a file"),
        (&file, "Socket", "is not a socket file"),
        (&file, "BlockDevice", "is not a block device"),
    ];
    for (path, t, why) in checks {
        let err = m
            .setup(&hp(path, t), &ctx, &source(), &NoTokens)
            .unwrap_err();
        assert!(err.to_string().contains(why), "{t}: {err}");
    }
    let missing = root.path().join("nope");
    let err = m
        .setup(&hp(&missing, "Directory"), &ctx, &source(), &NoTokens)
        .unwrap_err();
    assert!(err.to_string().contains("does not exist"));
    let err = m
        .setup(
            &hp(&root.path().join("no/parent/f"), "FileOrCreate"),
            &ctx,
            &source(),
            &NoTokens,
        )
        .unwrap_err();
    assert!(matches!(err, VolumeError::Io { .. }), "{err}");
    let sock_path = root.path().join("s.sock");
    let _sock = std::os::unix::net::UnixListener::bind(&sock_path).unwrap();
    m.setup(&hp(&sock_path, "Socket"), &ctx, &source(), &NoTokens)
        .unwrap();
    m.setup(
        &hp(Path::new("/dev/null"), "CharDevice"),
        &ctx,
        &source(),
        &NoTokens,
    )
    .unwrap();
    m.teardown("uid-1").unwrap();
    assert!(dir.is_dir(), "teardown never touches host paths");
}

#[test]
fn unsupported_volume_types_are_named() {
    let root = tempfile::tempdir().unwrap();
    let err = manager(root.path())
        .setup(
            &pod(vec![vol("nfs")]),
            &PodContext::default(),
            &source(),
            &NoTokens,
        )
        .unwrap_err();
    assert_eq!(err.to_string(), "volume nfs: unsupported volume type");
}
