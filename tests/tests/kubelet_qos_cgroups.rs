//! The kubelet's QoS layout and resource conversion applied through the runtime's cgroup managers on the host's
//! real cgroups, under a test-owned subtree (the kubelet's `--cgroup-root`).

use std::path::{Path, PathBuf};

use k8s_openapi::api::core::v1::{Container, Pod, PodSpec, ResourceRequirements};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use windlass_kubelet::qos::{self, QosClass};
use windlass_runtime::cgroups::{self, CgroupVersion};
use windlass_tests::cgroup::CgroupTreeGuard;
use windlass_tests::{require_privileged, unique_name};

fn container(name: &str, req: &[(&str, &str)], lim: &[(&str, &str)]) -> Container {
    let map = |v: &[(&str, &str)]| {
        Some(
            v.iter()
                .map(|(k, q)| (k.to_string(), Quantity(q.to_string())))
                .collect(),
        )
    };
    Container {
        name: name.into(),
        image: Some("busybox".into()),
        resources: Some(ResourceRequirements {
            requests: map(req),
            limits: map(lim),
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn control(root: &Path, version: CgroupVersion, controller: &str, cg: &Path, file: &str) -> String {
    let rel = cg.strip_prefix("/").unwrap_or(cg);
    let path: PathBuf = match version {
        CgroupVersion::V1 => root.join(controller).join(rel).join(file),
        CgroupVersion::V2 => root.join(rel).join(file),
    };
    std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
        .trim()
        .to_string()
}

#[test]
fn a_burstable_pod_gets_its_qos_cgroup_with_summed_shares_quota_and_memory_limit() {
    if !require_privileged(&[]) {
        return;
    }
    let guard = CgroupTreeGuard::new();
    let root = guard.root().to_path_buf();
    let version = cgroups::detect_version(&root).expect("cgroup version");
    // The kubelet's --cgroup-root is the test's own top directory.
    let cgroup_root = PathBuf::from(format!("/{}", guard.top()));
    let uid = unique_name("uid");
    let pod = Pod {
        spec: Some(PodSpec {
            containers: vec![
                container(
                    "web",
                    &[("cpu", "250m")],
                    &[("cpu", "500m"), ("memory", "64Mi")],
                ),
                container(
                    "side",
                    &[("cpu", "250m")],
                    &[("cpu", "500m"), ("memory", "64Mi")],
                ),
            ],
            ..Default::default()
        }),
        ..Default::default()
    };
    let class = qos::pod_qos(&pod);
    assert_eq!(class, QosClass::Burstable);
    let pod_cg = qos::pod_cgroup(&cgroup_root, class, &uid);
    assert!(pod_cg.ends_with(format!("kubepods/burstable/pod{uid}")));
    let web_cg = qos::container_cgroup(&cgroup_root, class, &uid, "web");

    let pod_mgr = cgroups::create_manager(&root, &pod_cg).expect("pod manager");
    pod_mgr.create().expect("create pod cgroup");
    pod_mgr
        .apply(&qos::pod_resources(&pod).expect("pod resources"))
        .expect("apply pod resources");
    let web_mgr = cgroups::create_manager(&root, &web_cg).expect("container manager");
    web_mgr.create().expect("create container cgroup");
    let web = &pod.spec.as_ref().expect("spec").containers[0];
    web_mgr
        .apply(&qos::container_resources(web).expect("container resources"))
        .expect("apply container resources");

    match version {
        CgroupVersion::V1 => {
            assert_eq!(
                control(&root, version, "cpu", &pod_cg, "cpu.shares"),
                "512",
                "250m + 250m"
            );
            assert_eq!(
                control(&root, version, "cpu", &pod_cg, "cpu.cfs_quota_us"),
                "100000",
                "500m + 500m"
            );
            assert_eq!(
                control(&root, version, "cpu", &pod_cg, "cpu.cfs_period_us"),
                "100000"
            );
            assert_eq!(
                control(&root, version, "memory", &pod_cg, "memory.limit_in_bytes"),
                (128u64 << 20).to_string()
            );
            assert_eq!(control(&root, version, "cpu", &web_cg, "cpu.shares"), "256");
            assert_eq!(
                control(&root, version, "cpu", &web_cg, "cpu.cfs_quota_us"),
                "50000"
            );
            assert_eq!(
                control(&root, version, "memory", &web_cg, "memory.limit_in_bytes"),
                (64u64 << 20).to_string()
            );
        }
        CgroupVersion::V2 => {
            assert_eq!(
                control(&root, version, "", &pod_cg, "cpu.max"),
                "100000 100000"
            );
            assert_eq!(
                control(&root, version, "", &pod_cg, "memory.max"),
                (128u64 << 20).to_string()
            );
            assert_eq!(
                control(&root, version, "", &web_cg, "cpu.max"),
                "50000 100000"
            );
            assert_eq!(
                control(&root, version, "", &web_cg, "memory.max"),
                (64u64 << 20).to_string()
            );
        }
    }

    web_mgr.destroy().expect("destroy container cgroup");
    pod_mgr.destroy().expect("destroy pod cgroup");
    assert!(
        guard.leftovers().is_empty(),
        "left: {:?}",
        guard.leftovers()
    );
}
