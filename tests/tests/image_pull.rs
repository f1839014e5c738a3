//! Pulling images from a real (Debian `docker-registry`) registry on 127.0.0.1, and from a tiny fake registry
//! that serves a corrupted blob.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::TcpListener;
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use windlass_runtime::image::{Credentials, Platform, PullError, PullOptions, Store, StoreError};
use windlass_tests::image_fixture::{layer_tar, sha256, OciLayout, TarEntry};
use windlass_tests::registry::Registry;
use windlass_tests::{require_privileged, run_ok, workspace_binary, TempDir};

const TOOLS: &[&str] = &["docker-registry", "skopeo", "umoci"];

fn insecure(reg: &Registry) -> PullOptions {
    PullOptions {
        insecure_registries: vec![reg.addr.clone()],
        ..Default::default()
    }
}

fn new_store() -> (TempDir, Store) {
    let dir = tempfile::Builder::new()
        .prefix("windlass-store-")
        .tempdir()
        .expect("tempdir");
    let store = Store::open(dir.path()).expect("open store");
    (dir, store)
}

fn busybox_layout() -> OciLayout {
    let layout = OciLayout::new().expect("layout");
    layout.busybox("bb").expect("busybox image");
    layout
}

fn dir_entries(p: &Path) -> usize {
    std::fs::read_dir(p).map(|d| d.count()).unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn image_pulled_by_tag_in_oci_and_docker_formats_is_stored_and_unpacked() {
    if !require_privileged(TOOLS) {
        return;
    }
    let layout = busybox_layout();
    let reg = Registry::start().expect("registry");
    reg.push(&layout.path(), "bb", "test/busybox:oci", false);
    reg.push(&layout.path(), "bb", "test/busybox:docker", true);
    let (_dir, store) = new_store();

    let oci = store
        .pull(&format!("{}/test/busybox:oci", reg.addr), &insecure(&reg))
        .await
        .expect("pull OCI image");
    assert_eq!(
        oci.record.manifest_media_type,
        "application/vnd.oci.image.manifest.v1+json"
    );
    assert_eq!(
        oci.record.manifest_digest,
        layout.digest("bb"),
        "skopeo keeps an OCI manifest byte for byte"
    );
    assert_eq!(oci.layers_unpacked, 1);

    let docker = store
        .pull(
            &format!("{}/test/busybox:docker", reg.addr),
            &insecure(&reg),
        )
        .await
        .expect("pull Docker schema2 image");
    assert_eq!(
        docker.record.manifest_media_type,
        "application/vnd.docker.distribution.manifest.v2+json"
    );
    assert_eq!(
        docker.layers_unpacked, 0,
        "the same layer content is unpacked once and shared"
    );

    let records = store.list().expect("list");
    assert_eq!(records.len(), 2);
    let layer = store
        .layer_path(&oci.record.layers[0].diff_id)
        .expect("layer path");
    assert!(layer.join("bin/busybox").is_file());
    assert_eq!(
        std::fs::read_link(layer.join("bin/sh")).expect("sh is a symlink"),
        Path::new("busybox")
    );
    let config = store.config(&oci.record).expect("config");
    assert_eq!(
        config.config.and_then(|c| c.cmd),
        Some(vec![
            "/bin/sh".to_string(),
            "-c".into(),
            "echo hello".into()
        ])
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn image_pulled_by_digest_is_verified_and_recorded_under_its_digest() {
    if !require_privileged(TOOLS) {
        return;
    }
    let layout = busybox_layout();
    let reg = Registry::start().expect("registry");
    reg.push(&layout.path(), "bb", "test/busybox:v1", false);
    let digest = layout.digest("bb");
    let (_dir, store) = new_store();
    let reference = format!("{}/test/busybox@{digest}", reg.addr);
    let pulled = store
        .pull(&reference, &insecure(&reg))
        .await
        .expect("pull by digest");
    assert_eq!(pulled.record.manifest_digest, digest);
    assert_eq!(pulled.record.reference, reference);
    assert_eq!(
        store.get(&digest).expect("lookup by digest").reference,
        reference
    );

    // A digest the registry does not have is an error, and leaves no record.
    let missing = format!("{}/test/busybox@{}", reg.addr, sha256(b"nope"));
    let err = store
        .pull(&missing, &insecure(&reg))
        .await
        .expect_err("unknown digest");
    assert!(matches!(err, PullError::Registry { .. }), "{err}");
    assert_eq!(store.list().expect("list").len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn index_is_resolved_to_the_host_platform() {
    if !require_privileged(TOOLS) {
        return;
    }
    let layout = busybox_layout();
    layout
        .change("bb", "amd", |r| std::fs::write(r.join("arch"), "amd64\n"))
        .expect("amd64 image");
    layout
        .change("bb", "arm-src", |r| {
            std::fs::write(r.join("arch"), "arm64\n")
        })
        .expect("arm64 image");
    layout.with_arch("arm-src", "arm", "arm64");
    layout.index_of("multi", &[("amd", "amd64"), ("arm", "arm64")]);
    let reg = Registry::start().expect("registry");
    reg.push(&layout.path(), "multi", "test/multi:v1", false);
    let reference = format!("{}/test/multi:v1", reg.addr);

    let (_dir, store) = new_store();
    let host = store
        .pull(&reference, &insecure(&reg))
        .await
        .expect("pull index");
    assert!(
        host.record.index_digest.is_some(),
        "the index digest is recorded"
    );
    assert_eq!(host.record.manifest_digest, layout.digest("amd"));
    let top = store
        .layer_path(&host.record.layers.last().expect("layers").diff_id)
        .expect("layer path");
    assert_eq!(
        std::fs::read_to_string(top.join("arch")).expect("arch file"),
        "amd64\n"
    );

    let (_dir2, store2) = new_store();
    let arm = PullOptions {
        platform: Platform {
            os: "linux".into(),
            architecture: "arm64".into(),
            variant: None,
        },
        ..insecure(&reg)
    };
    let pulled = store2
        .pull(&reference, &arm)
        .await
        .expect("pull arm64 entry");
    assert_eq!(pulled.record.manifest_digest, layout.digest("arm"));

    let s390x = PullOptions {
        platform: Platform {
            os: "linux".into(),
            architecture: "s390x".into(),
            variant: None,
        },
        ..insecure(&reg)
    };
    let (_dir3, store3) = new_store();
    let err = store3
        .pull(&reference, &s390x)
        .await
        .expect_err("no s390x entry");
    assert!(
        matches!(&err, PullError::NoMatchingPlatform { available, .. } if available.contains("linux/arm64")),
        "{err}"
    );
    assert!(store3.list().expect("list").is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn basic_auth_over_tls_works_with_a_dockerconfigjson_and_a_trusted_ca() {
    if !require_privileged(&["docker-registry", "skopeo", "umoci", "openssl"]) {
        return;
    }
    let layout = busybox_layout();
    let reg = Registry::start_tls_auth("windlass", "s3cret").expect("TLS registry");
    reg.push(&layout.path(), "bb", "private/busybox:v1", true);
    let tls = reg.tls.as_ref().expect("tls");
    let reference = format!("{}/private/busybox:v1", reg.addr);
    let ca = std::fs::read(&tls.ca_pem).expect("read CA");
    let dir = tempfile::tempdir().expect("tempdir");
    let write_auth = |name: &str, password: &str| {
        let auth = base64::engine::general_purpose::STANDARD.encode(format!("windlass:{password}"));
        let path = dir.path().join(name);
        std::fs::write(
            &path,
            format!(
                r#"{{"auths":{{"https://{}":{{"auth":"{auth}"}}}}}}"#,
                reg.addr
            ),
        )
        .expect("write auth file");
        Credentials::from_file(&path).expect("parse auth file")
    };

    let (_d1, store1) = new_store();
    let anonymous = PullOptions {
        ca_certs_pem: vec![ca.clone()],
        attempts: 1,
        ..Default::default()
    };
    let err = store1
        .pull(&reference, &anonymous)
        .await
        .expect_err("anonymous pull");
    assert!(
        err.to_string().contains("401") || err.to_string().to_lowercase().contains("auth"),
        "{err}"
    );
    let wrong = PullOptions {
        credentials: write_auth("wrong.json", "nope"),
        ..anonymous.clone()
    };
    store1
        .pull(&reference, &wrong)
        .await
        .expect_err("wrong password");
    let untrusted = PullOptions {
        credentials: write_auth("right.json", "s3cret"),
        ca_certs_pem: vec![],
        attempts: 1,
        ..Default::default()
    };
    let err = store1
        .pull(&reference, &untrusted)
        .await
        .expect_err("untrusted certificate");
    assert!(
        store1.list().expect("list").is_empty(),
        "failed pulls store no image: {err}"
    );

    let good = PullOptions {
        ca_certs_pem: vec![ca],
        ..untrusted
    };
    let pulled = store1
        .pull(&reference, &good)
        .await
        .expect("authenticated pull");
    assert_eq!(pulled.layers_unpacked, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_pulls_of_one_image_download_it_once() {
    if !require_privileged(TOOLS) {
        return;
    }
    let layout = busybox_layout();
    let reg = Registry::start().expect("registry");
    reg.push(&layout.path(), "bb", "test/busybox:v1", false);
    let manifest = layout.manifest("bb");
    let layer = manifest["layers"][0]["digest"]
        .as_str()
        .expect("layer digest")
        .to_string();
    let reference = format!("{}/test/busybox:v1", reg.addr);

    // In one process: four pulls at once share one download.
    let (_dir, store) = new_store();
    let opts = insecure(&reg);
    let pulls = (0..4).map(|_| {
        let (store, opts, reference) = (store.clone(), opts.clone(), reference.clone());
        tokio::spawn(async move { store.pull(&reference, &opts).await })
    });
    let mut downloaded = 0;
    for p in pulls {
        downloaded += p.await.expect("join").expect("pull").blobs_downloaded;
    }
    assert_eq!(downloaded, 2, "config and layer fetched once in total");
    assert_eq!(
        reg.blob_downloads(&layer),
        1,
        "registry served the layer once"
    );

    // Across processes: four `windlass-runtime image pull`s on one store, coordinated by file locks.
    let (dir2, _store2) = new_store();
    let bin = workspace_binary("windlass-runtime");
    let children: Vec<_> = (0..4)
        .map(|_| {
            Command::new(&bin)
                .args(["image", "pull", "--store"])
                .arg(dir2.path())
                .args(["--insecure-registry", &reg.addr, &reference])
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .expect("spawn pull")
        })
        .collect();
    for c in children {
        let out = c.wait_with_output().expect("wait pull");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    assert_eq!(
        reg.blob_downloads(&layer),
        2,
        "one more download for the second store, not four"
    );
}

/// A registry that serves `blobs` by digest and one manifest for every tag, over plain HTTP, until dropped.
struct FakeRegistry {
    addr: String,
    stop: Arc<AtomicBool>,
}

impl FakeRegistry {
    fn start(manifest: Vec<u8>, blobs: HashMap<String, Vec<u8>>) -> Self {
        Self::start_flaky(manifest, blobs, 0).0
    }

    /// Like `start`, but the first `failures` blob requests get `503 Service Unavailable`; also returns a
    /// counter of blob requests.
    fn start_flaky(
        manifest: Vec<u8>,
        blobs: HashMap<String, Vec<u8>>,
        failures: usize,
    ) -> (Self, Arc<std::sync::atomic::AtomicUsize>) {
        let blob_requests = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let counter = blob_requests.clone();
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("addr").to_string();
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        std::thread::spawn(move || {
            for conn in listener.incoming().take(200) {
                if flag.load(Ordering::SeqCst) {
                    break;
                }
                let Ok(mut conn) = conn else { continue };
                let _ = conn.set_read_timeout(Some(Duration::from_secs(5)));
                let mut buf = Vec::new();
                let mut chunk = [0u8; 1024];
                while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
                    match conn.read(&mut chunk) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => buf.extend_from_slice(&chunk[..n]),
                    }
                }
                let head = String::from_utf8_lossy(&buf);
                let path = head.split_whitespace().nth(1).unwrap_or("/").to_string();
                let (status, ctype, body): (&str, &str, Vec<u8>) = if path == "/v2/" {
                    ("200 OK", "application/json", b"{}".to_vec())
                } else if path.contains("/manifests/") {
                    (
                        "200 OK",
                        "application/vnd.oci.image.manifest.v1+json",
                        manifest.clone(),
                    )
                } else if let Some(d) = path.split("/blobs/").nth(1) {
                    let n = counter.fetch_add(1, Ordering::SeqCst);
                    match blobs.get(d) {
                        Some(_) if n < failures => (
                            "503 Service Unavailable",
                            "application/json",
                            b"{}".to_vec(),
                        ),
                        Some(b) => ("200 OK", "application/octet-stream", b.clone()),
                        None => ("404 Not Found", "application/json", b"{}".to_vec()),
                    }
                } else {
                    ("404 Not Found", "application/json", b"{}".to_vec())
                };
                let _ = write!(
                    conn,
                    "HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                    body.len()
                );
                let _ = conn.write_all(&body);
            }
        });
        (Self { addr, stop }, blob_requests)
    }
}

impl Drop for FakeRegistry {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = std::net::TcpStream::connect(&self.addr);
    }
}

/// A one-layer image (uncompressed layer `layer`) as (manifest, blobs by digest).
fn hand_made_image(
    layer: &[u8],
    served_layer: &[u8],
) -> (Vec<u8>, HashMap<String, Vec<u8>>, String) {
    let layer_digest = sha256(layer);
    let config = serde_json::to_vec(&serde_json::json!({
        "architecture": "amd64", "os": "linux",
        "rootfs": {"type": "layers", "diff_ids": [layer_digest]},
    }))
    .expect("config");
    let config_digest = sha256(&config);
    let manifest = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": config_digest, "size": config.len()},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": layer_digest, "size": layer.len()}],
    }))
    .expect("manifest");
    let blobs = HashMap::from([
        (config_digest, config),
        (layer_digest.clone(), served_layer.to_vec()),
    ]);
    (manifest, blobs, layer_digest)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transient_registry_errors_are_retried_with_backoff() {
    if !require_privileged(&[]) {
        return;
    }
    let layer = layer_tar(&[TarEntry::File("hello", b"hi")]);
    let (manifest, blobs, _) = hand_made_image(&layer, &layer);
    let (fake, requests) = FakeRegistry::start_flaky(manifest.clone(), blobs.clone(), 2);
    let (_dir, store) = new_store();
    let opts = PullOptions {
        insecure_registries: vec![fake.addr.clone()],
        backoff: Duration::from_millis(50),
        ..Default::default()
    };
    let pulled = store
        .pull(&format!("{}/test/flaky:v1", fake.addr), &opts)
        .await
        .expect("pull succeeds after two 503s");
    assert_eq!(pulled.blobs_downloaded, 2);
    assert_eq!(
        requests.load(Ordering::SeqCst),
        4,
        "two failures, then config and layer"
    );

    // With fewer attempts than failures the pull fails and says why.
    let (fake, _) = FakeRegistry::start_flaky(manifest, blobs, 10);
    let opts = PullOptions {
        insecure_registries: vec![fake.addr.clone()],
        backoff: Duration::from_millis(10),
        attempts: 3,
        ..Default::default()
    };
    let (_dir, store) = new_store();
    let err = store
        .pull(&format!("{}/test/flaky:v1", fake.addr), &opts)
        .await
        .expect_err("still failing after 3 attempts");
    assert!(err.to_string().contains("503"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blob_whose_bytes_do_not_match_its_digest_fails_the_pull_and_nothing_is_stored() {
    if !require_privileged(&[]) {
        return;
    }
    let good = layer_tar(&[TarEntry::File("hello", b"good content")]);
    let evil = layer_tar(&[TarEntry::File("hello", b"evil content")]);
    assert_eq!(good.len(), evil.len());
    let (manifest, blobs, layer_digest) = hand_made_image(&good, &evil);
    let fake = FakeRegistry::start(manifest, blobs);
    let (dir, store) = new_store();
    let opts = PullOptions {
        insecure_registries: vec![fake.addr.clone()],
        ..Default::default()
    };
    let reference = format!("{}/test/corrupt:v1", fake.addr);
    let err = store
        .pull(&reference, &opts)
        .await
        .expect_err("corrupted blob");
    assert!(
        matches!(&err, PullError::DigestMismatch { expected, .. } if *expected == layer_digest),
        "{err}"
    );
    assert!(matches!(
        store.get(&reference),
        Err(StoreError::NotFound(_))
    ));
    assert!(
        !store.has_blob(&layer_digest).expect("has_blob"),
        "the bad blob is not stored"
    );
    assert_eq!(
        dir_entries(&dir.path().join("layers")),
        0,
        "nothing unpacked"
    );
    assert_eq!(
        dir_entries(&dir.path().join("tmp")),
        0,
        "no partial download left"
    );

    // The CLI says so and exits non-zero.
    let bin = workspace_binary("windlass-runtime");
    let out = Command::new(bin)
        .args(["image", "pull", "--store"])
        .arg(dir.path())
        .args(["--insecure-registry", &fake.addr, &reference])
        .output()
        .expect("run pull");
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("hashes to"), "{stderr}");
    let listed = run_ok(
        Command::new(workspace_binary("windlass-runtime"))
            .args(["image", "list", "--store"])
            .arg(dir.path()),
    );
    assert!(!listed.contains("corrupt"), "{listed}");
}
