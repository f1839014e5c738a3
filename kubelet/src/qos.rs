//! QoS classes, the pod cgroup layout, requests/limits as OCI Linux resources, and `oom_score_adj`.
//!
//! Ref: upstream `pkg/apis/core/v1/helper/qos` (GetPodQOS), `pkg/kubelet/cm` (pod and QoS cgroups,
//! `MilliCPUToShares`/`MilliCPUToQuota`, `ResourceConfigForPod`) and `pkg/kubelet/qos/policy.go`.
//!
//! Cgroup layout (relative to `--cgroup-root`): `kubepods/pod<uid>` for Guaranteed pods,
//! `kubepods/burstable/pod<uid>` and `kubepods/besteffort/pod<uid>` for the others, each container below its pod.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use k8s_openapi::api::core::v1::{Container, Pod};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use oci_spec::runtime::{LinuxCpu, LinuxMemory, LinuxResources};

use crate::quantity::{Amount, QuantityError};

/// A pod's quality-of-service class.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QosClass {
    Guaranteed,
    Burstable,
    BestEffort,
}

impl QosClass {
    pub fn as_str(self) -> &'static str {
        match self {
            QosClass::Guaranteed => "Guaranteed",
            QosClass::Burstable => "Burstable",
            QosClass::BestEffort => "BestEffort",
        }
    }
}

/// Upstream `MinShares`, `SharesPerCPU`, `MilliCPUToCPU`, `QuotaPeriod`, `MinQuotaPeriod`.
pub const MIN_SHARES: u64 = 2;
const SHARES_PER_CPU: i64 = 1024;
const MILLI_CPU_TO_CPU: i64 = 1000;
pub const QUOTA_PERIOD: u64 = 100_000;
const MIN_QUOTA: i64 = 1000;

/// Upstream `guaranteedOOMScoreAdj`, `besteffortOOMScoreAdj`.
pub const GUARANTEED_OOM_SCORE_ADJ: i32 = -997;
pub const BEST_EFFORT_OOM_SCORE_ADJ: i32 = 1000;

fn all_containers(pod: &Pod) -> impl Iterator<Item = &Container> {
    pod.spec.iter().flat_map(|s| {
        s.containers
            .iter()
            .chain(s.init_containers.iter().flatten())
    })
}

/// A container's requests, defaulted from its limits where unset (the API server's defaulting, which static
/// pods from files do not get).
fn requests(c: &Container) -> BTreeMap<String, Quantity> {
    let res = c.resources.as_ref();
    let mut out = res.and_then(|r| r.limits.clone()).unwrap_or_default();
    out.extend(res.and_then(|r| r.requests.clone()).unwrap_or_default());
    out
}

fn limits(c: &Container) -> BTreeMap<String, Quantity> {
    c.resources
        .as_ref()
        .and_then(|r| r.limits.clone())
        .unwrap_or_default()
}

fn amount(q: Option<&Quantity>) -> Amount {
    // An unparsable quantity was refused by the API server's validation; treat it as absent here.
    q.and_then(|q| Amount::of(q).ok()).unwrap_or_default()
}

/// Upstream `GetPodQOS`: only cpu and memory count.
pub fn pod_qos(pod: &Pod) -> QosClass {
    let mut req: BTreeMap<&str, Amount> = BTreeMap::new();
    let mut lim: BTreeMap<&str, Amount> = BTreeMap::new();
    let mut guaranteed = true;
    for c in all_containers(pod) {
        let r = requests(c);
        let l = limits(c);
        let mut limits_found = 0;
        for name in ["cpu", "memory"] {
            let rq = amount(r.get(name));
            if rq.is_positive() {
                *req.entry(name).or_default() = req.get(name).copied().unwrap_or_default() + rq;
            }
            let lq = amount(l.get(name));
            if lq.is_positive() {
                limits_found += 1;
                *lim.entry(name).or_default() = lim.get(name).copied().unwrap_or_default() + lq;
            }
        }
        if limits_found != 2 {
            guaranteed = false;
        }
    }
    if req.is_empty() && lim.is_empty() {
        return QosClass::BestEffort;
    }
    if guaranteed && req.iter().all(|(k, v)| lim.get(k) == Some(v)) && req.len() == lim.len() {
        return QosClass::Guaranteed;
    }
    QosClass::Burstable
}

/// `kubepods[/burstable|/besteffort]/pod<uid>` under `cgroup_root`.
pub fn pod_cgroup(cgroup_root: &Path, qos: QosClass, pod_uid: &str) -> PathBuf {
    let kubepods = cgroup_root.join("kubepods");
    let parent = match qos {
        QosClass::Guaranteed => kubepods,
        QosClass::Burstable => kubepods.join("burstable"),
        QosClass::BestEffort => kubepods.join("besteffort"),
    };
    parent.join(format!("pod{pod_uid}"))
}

/// A container's cgroup, below its pod's.
pub fn container_cgroup(
    cgroup_root: &Path,
    qos: QosClass,
    pod_uid: &str,
    container_id: &str,
) -> PathBuf {
    pod_cgroup(cgroup_root, qos, pod_uid).join(container_id)
}

/// Upstream `MilliCPUToShares`.
pub fn milli_cpu_to_shares(milli: i64) -> u64 {
    if milli <= 0 {
        return MIN_SHARES;
    }
    let shares = milli * SHARES_PER_CPU / MILLI_CPU_TO_CPU;
    (shares as u64).max(MIN_SHARES)
}

/// Upstream `MilliCPUToQuota` with the default 100 ms period; `None` for no limit.
pub fn milli_cpu_to_quota(milli: i64) -> Option<i64> {
    if milli <= 0 {
        return None;
    }
    let quota = milli * QUOTA_PERIOD as i64 / MILLI_CPU_TO_CPU;
    Some(quota.max(MIN_QUOTA))
}

/// A container's resources for the runtime: cpu shares from the request, quota/period and memory limit from the
/// limits. Errors name the container and the bad quantity.
pub fn container_resources(c: &Container) -> Result<LinuxResources, QuantityError> {
    let r = requests(c);
    let l = limits(c);
    let parse = |q: Option<&Quantity>| q.map(Amount::of).transpose();
    let cpu_request = parse(r.get("cpu"))?.unwrap_or_default();
    let cpu_limit = parse(l.get("cpu"))?.unwrap_or_default();
    let memory_limit = parse(l.get("memory"))?.unwrap_or_default();
    Ok(resources(
        milli_cpu_to_shares(cpu_request.milli_value()),
        milli_cpu_to_quota(cpu_limit.milli_value()),
        memory_limit.is_positive().then(|| memory_limit.value()),
    ))
}

fn resources(shares: u64, quota: Option<i64>, memory: Option<i64>) -> LinuxResources {
    let mut cpu = LinuxCpu::default();
    cpu.set_shares(Some(shares));
    if let Some(q) = quota {
        cpu.set_quota(Some(q));
        cpu.set_period(Some(QUOTA_PERIOD));
    }
    let mut res = LinuxResources::default();
    res.set_cpu(Some(cpu));
    if let Some(m) = memory {
        let mut mem = LinuxMemory::default();
        mem.set_limit(Some(m));
        res.set_memory(Some(mem));
    }
    res
}

/// The pod cgroup's values (upstream `ResourceConfigForPod`): shares from the summed cpu requests (init containers
/// count as their maximum, as they run one at a time); quota and memory limit only when every container has that
/// limit; BestEffort pods get the minimum shares and no limits.
pub fn pod_resources(pod: &Pod) -> Result<LinuxResources, QuantityError> {
    let qos = pod_qos(pod);
    if qos == QosClass::BestEffort {
        return Ok(resources(MIN_SHARES, None, None));
    }
    let (mut cpu_req, mut cpu_lim, mut mem_lim) = (Amount::ZERO, Amount::ZERO, Amount::ZERO);
    let (mut all_cpu_limited, mut all_mem_limited) = (true, true);
    let (mut init_cpu_req, mut init_cpu_lim, mut init_mem_lim) =
        (Amount::ZERO, Amount::ZERO, Amount::ZERO);
    let spec = pod.spec.as_ref();
    let sum = |c: &Container,
               req: &mut Amount,
               lim: &mut Amount,
               mem: &mut Amount,
               all_cpu: &mut bool,
               all_mem: &mut bool,
               max: bool|
     -> Result<(), QuantityError> {
        let r = requests(c);
        let l = limits(c);
        let combine = |acc: &mut Amount, v: Amount| {
            *acc = if max { (*acc).max(v) } else { *acc + v };
        };
        combine(
            req,
            r.get("cpu")
                .map(Amount::of)
                .transpose()?
                .unwrap_or_default(),
        );
        match l.get("cpu").map(Amount::of).transpose()? {
            Some(v) if v.is_positive() => combine(lim, v),
            _ => *all_cpu = false,
        }
        match l.get("memory").map(Amount::of).transpose()? {
            Some(v) if v.is_positive() => combine(mem, v),
            _ => *all_mem = false,
        }
        Ok(())
    };
    for c in spec.iter().flat_map(|s| &s.containers) {
        sum(
            c,
            &mut cpu_req,
            &mut cpu_lim,
            &mut mem_lim,
            &mut all_cpu_limited,
            &mut all_mem_limited,
            false,
        )?;
    }
    for c in spec.iter().flat_map(|s| s.init_containers.iter().flatten()) {
        sum(
            c,
            &mut init_cpu_req,
            &mut init_cpu_lim,
            &mut init_mem_lim,
            &mut all_cpu_limited,
            &mut all_mem_limited,
            true,
        )?;
    }
    let cpu_req = cpu_req.max(init_cpu_req);
    let cpu_lim = cpu_lim.max(init_cpu_lim);
    let mem_lim = mem_lim.max(init_mem_lim);
    Ok(resources(
        milli_cpu_to_shares(cpu_req.milli_value()),
        all_cpu_limited
            .then(|| milli_cpu_to_quota(cpu_lim.milli_value()))
            .flatten(),
        (all_mem_limited && mem_lim.is_positive()).then(|| mem_lim.value()),
    ))
}

/// Upstream `GetContainerOOMScoreAdjust`: Guaranteed (and `system-node-critical`) -997, BestEffort 1000,
/// Burstable `1000 - 1000 * memoryRequest / memoryCapacity` kept within [3, 999].
///
/// Hosts without `CAP_SYS_RESOURCE` refuse negative values (these test machines do): the runtime should log once
/// and run the container with its inherited score rather than fail the pod.
pub fn container_oom_score_adj(pod: &Pod, c: &Container, memory_capacity: i64) -> i32 {
    if pod
        .spec
        .as_ref()
        .and_then(|s| s.priority_class_name.as_deref())
        == Some("system-node-critical")
    {
        return GUARANTEED_OOM_SCORE_ADJ;
    }
    match pod_qos(pod) {
        QosClass::Guaranteed => return GUARANTEED_OOM_SCORE_ADJ,
        QosClass::BestEffort => return BEST_EFFORT_OOM_SCORE_ADJ,
        QosClass::Burstable => {}
    }
    let request = amount(requests(c).get("memory")).value();
    let capacity = memory_capacity.max(1);
    let adj = 1000 - (1000 * request as i128 / capacity as i128) as i64;
    if adj < i64::from(1000 + GUARANTEED_OOM_SCORE_ADJ) {
        return 1000 + GUARANTEED_OOM_SCORE_ADJ;
    }
    if adj == i64::from(BEST_EFFORT_OOM_SCORE_ADJ) {
        return BEST_EFFORT_OOM_SCORE_ADJ - 1;
    }
    adj as i32
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::{PodSpec, ResourceRequirements};

    fn c(name: &str, req: &[(&str, &str)], lim: &[(&str, &str)]) -> Container {
        let map = |v: &[(&str, &str)]| {
            (!v.is_empty()).then(|| {
                v.iter()
                    .map(|(k, q)| (k.to_string(), Quantity(q.to_string())))
                    .collect()
            })
        };
        Container {
            name: name.into(),
            resources: Some(ResourceRequirements {
                requests: map(req),
                limits: map(lim),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    fn pod(containers: Vec<Container>, inits: Vec<Container>) -> Pod {
        Pod {
            spec: Some(PodSpec {
                containers,
                init_containers: (!inits.is_empty()).then_some(inits),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    #[test]
    fn qos_classes_follow_requests_and_limits() {
        let g = pod(
            vec![c("a", &[], &[("cpu", "500m"), ("memory", "64Mi")])],
            vec![],
        );
        assert_eq!(
            pod_qos(&g),
            QosClass::Guaranteed,
            "limits only: requests default to them"
        );
        let g2 = pod(
            vec![c(
                "a",
                &[("cpu", "0.5"), ("memory", "64Mi")],
                &[("cpu", "500m"), ("memory", "64Mi")],
            )],
            vec![],
        );
        assert_eq!(pod_qos(&g2), QosClass::Guaranteed);
        let b = pod(vec![c("a", &[("cpu", "100m")], &[])], vec![]);
        assert_eq!(pod_qos(&b), QosClass::Burstable);
        let b2 = pod(
            vec![c(
                "a",
                &[("cpu", "100m"), ("memory", "64Mi")],
                &[("cpu", "500m"), ("memory", "64Mi")],
            )],
            vec![],
        );
        assert_eq!(pod_qos(&b2), QosClass::Burstable, "request below limit");
        let b3 = pod(
            vec![
                c("a", &[], &[("cpu", "1"), ("memory", "1Gi")]),
                c("b", &[], &[]),
            ],
            vec![],
        );
        assert_eq!(
            pod_qos(&b3),
            QosClass::Burstable,
            "one container without limits"
        );
        assert_eq!(
            pod_qos(&pod(vec![c("a", &[], &[])], vec![])),
            QosClass::BestEffort
        );
        let ignored = pod(vec![c("a", &[("nvidia.com/gpu", "1")], &[])], vec![]);
        assert_eq!(
            pod_qos(&ignored),
            QosClass::BestEffort,
            "only cpu and memory count"
        );
    }

    #[test]
    fn cgroup_paths_follow_the_upstream_layout() {
        let root = Path::new("/sys/fs/cgroup/cpu/windlass");
        assert_eq!(
            pod_cgroup(root, QosClass::Guaranteed, "u1"),
            Path::new("/sys/fs/cgroup/cpu/windlass/kubepods/podu1")
        );
        assert_eq!(
            container_cgroup(root, QosClass::Burstable, "u1", "web"),
            Path::new("/sys/fs/cgroup/cpu/windlass/kubepods/burstable/podu1/web")
        );
        assert_eq!(
            pod_cgroup(root, QosClass::BestEffort, "u2"),
            Path::new("/sys/fs/cgroup/cpu/windlass/kubepods/besteffort/podu2")
        );
    }

    #[test]
    fn cpu_and_memory_become_shares_quota_and_limit() {
        assert_eq!(milli_cpu_to_shares(0), 2);
        assert_eq!(milli_cpu_to_shares(1), 2);
        assert_eq!(milli_cpu_to_shares(250), 256);
        assert_eq!(milli_cpu_to_shares(1000), 1024);
        assert_eq!(milli_cpu_to_quota(0), None);
        assert_eq!(milli_cpu_to_quota(5), Some(1000), "minimum quota");
        assert_eq!(milli_cpu_to_quota(500), Some(50_000));
        let r = container_resources(&c(
            "a",
            &[("cpu", "250m")],
            &[("cpu", "500m"), ("memory", "128Mi")],
        ))
        .unwrap();
        let cpu = r.cpu().as_ref().unwrap();
        assert_eq!(
            (cpu.shares(), cpu.quota(), cpu.period()),
            (Some(256), Some(50_000), Some(100_000))
        );
        assert_eq!(
            r.memory().as_ref().unwrap().limit(),
            Some(128 * 1024 * 1024)
        );
        let none = container_resources(&c("a", &[], &[])).unwrap();
        assert_eq!(none.cpu().as_ref().unwrap().shares(), Some(2));
        assert_eq!(none.cpu().as_ref().unwrap().quota(), None);
        assert!(none.memory().is_none());
        assert!(container_resources(&c("a", &[("cpu", "lots")], &[])).is_err());
    }

    #[test]
    fn the_pod_cgroup_sums_containers_and_takes_the_largest_init_container() {
        let p = pod(
            vec![
                c(
                    "a",
                    &[("cpu", "100m")],
                    &[("cpu", "200m"), ("memory", "100Mi")],
                ),
                c(
                    "b",
                    &[("cpu", "300m")],
                    &[("cpu", "400m"), ("memory", "50Mi")],
                ),
            ],
            vec![c(
                "init",
                &[("cpu", "1")],
                &[("cpu", "1"), ("memory", "10Mi")],
            )],
        );
        let r = pod_resources(&p).unwrap();
        let cpu = r.cpu().as_ref().unwrap();
        assert_eq!(cpu.shares(), Some(1024), "init's 1 CPU beats the 400m sum");
        assert_eq!(cpu.quota(), Some(100_000));
        assert_eq!(
            r.memory().as_ref().unwrap().limit(),
            Some(150 * 1024 * 1024)
        );

        let partly = pod(
            vec![
                c("a", &[("cpu", "100m")], &[("cpu", "200m")]),
                c("b", &[("cpu", "100m")], &[]),
            ],
            vec![],
        );
        let r = pod_resources(&partly).unwrap();
        assert_eq!(
            r.cpu().as_ref().unwrap().quota(),
            None,
            "b has no cpu limit"
        );
        assert!(r.memory().is_none());
        let be = pod_resources(&pod(vec![c("a", &[], &[])], vec![])).unwrap();
        assert_eq!(be.cpu().as_ref().unwrap().shares(), Some(2));
    }

    #[test]
    fn oom_score_adj_follows_the_qos_class() {
        let cap = 8 * 1024 * 1024 * 1024_i64;
        let g = pod(
            vec![c("a", &[], &[("cpu", "1"), ("memory", "1Gi")])],
            vec![],
        );
        assert_eq!(
            container_oom_score_adj(&g, &g.spec.as_ref().unwrap().containers[0], cap),
            -997
        );
        let be = pod(vec![c("a", &[], &[])], vec![]);
        assert_eq!(
            container_oom_score_adj(&be, &be.spec.as_ref().unwrap().containers[0], cap),
            1000
        );
        let b = pod(vec![c("a", &[("memory", "2Gi")], &[])], vec![]);
        assert_eq!(
            container_oom_score_adj(&b, &b.spec.as_ref().unwrap().containers[0], cap),
            750
        );
        let tiny = pod(vec![c("a", &[("cpu", "1m")], &[])], vec![]);
        assert_eq!(
            container_oom_score_adj(&tiny, &tiny.spec.as_ref().unwrap().containers[0], cap),
            999
        );
        let huge = pod(vec![c("a", &[("memory", "8Gi")], &[])], vec![]);
        assert_eq!(
            container_oom_score_adj(&huge, &huge.spec.as_ref().unwrap().containers[0], cap),
            3
        );
    }
}
