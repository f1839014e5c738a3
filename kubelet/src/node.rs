//! The kubelet's Node object and its Lease, as pure functions of what the node's `/proc`, `/etc` and filesystem
//! say, so they are tested on fixture files.
//!
//! Ref: upstream `pkg/kubelet/nodestatus/setters.go` (capacity/allocatable, addresses, nodeInfo, the
//! Ready/MemoryPressure/DiskPressure/PIDPressure conditions with their reasons and messages) and
//! `pkg/kubelet/nodelease` / `component-helpers/apimachinery/lease` (a Lease in `kube-node-lease` named after the
//! node, renewed every 10 s, `leaseDurationSeconds` 40, owned by the Node).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Node, NodeAddress, NodeCondition, NodeStatus, NodeSystemInfo};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta, OwnerReference, Time};
use k8s_openapi::jiff::Timestamp;

/// The runtime version the node reports (`nodeInfo.containerRuntimeVersion`).
pub const CONTAINER_RUNTIME_VERSION: &str = concat!("windlass://", env!("CARGO_PKG_VERSION"));
/// The Kubernetes API version this kubelet speaks, with our own version as build metadata.
pub const KUBELET_VERSION: &str = concat!("v1.33.0-windlass.", env!("CARGO_PKG_VERSION"));
/// Lease renewal interval and duration (upstream `renewInterval` = 10 s, `nodeLeaseDurationSeconds` = 40).
pub const LEASE_RENEW_INTERVAL: Duration = Duration::from_secs(10);
pub const LEASE_DURATION_SECONDS: i32 = 40;
pub const LEASE_NAMESPACE: &str = "kube-node-lease";
/// Upstream `nodeStatusReportFrequency`: with leases, an unchanged status is still re-posted every 5 minutes.
pub const NODE_STATUS_REPORT_FREQUENCY: Duration = Duration::from_secs(300);

/// Default hard eviction thresholds that allocatable subtracts (upstream `memory.available<100Mi`,
/// `nodefs.available<10%`).
pub const EVICTION_MEMORY_AVAILABLE: u64 = 100 * 1024 * 1024;
pub const EVICTION_NODEFS_PERCENT: u64 = 10;
/// PID pressure when fewer than this share of `pid_max` is free (upstream has no default `pid.available`
/// threshold; we report pressure at 10% like the nodefs threshold).
pub const PID_PRESSURE_PERCENT: u64 = 10;

/// Why the node's facts could not be read.
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    #[error("reading {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {reason}")]
    Parse { path: PathBuf, reason: String },
    #[error("statvfs {path}: {source}")]
    Statvfs { path: PathBuf, source: nix::Error },
}

/// Where node facts come from: `/proc`, `/etc`, and the filesystem holding `--root-dir`.
#[derive(Debug, Clone)]
pub struct HostRoots {
    pub proc_root: PathBuf,
    pub etc_root: PathBuf,
    pub fs_root: PathBuf,
}

impl HostRoots {
    pub fn system(root_dir: &Path) -> Self {
        Self {
            proc_root: "/proc".into(),
            etc_root: "/etc".into(),
            fs_root: root_dir.to_path_buf(),
        }
    }
}

/// What the node measured now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeFacts {
    pub cpus: u64,
    pub memory_bytes: u64,
    pub memory_available_bytes: u64,
    pub fs_bytes: u64,
    pub fs_available_bytes: u64,
    pub hugepages_2mi: u64,
    pub pid_max: u64,
    pub processes: u64,
    pub kernel_version: String,
    pub os_image: String,
    pub boot_id: String,
    pub machine_id: String,
}

fn read(path: &Path) -> Result<String, NodeError> {
    std::fs::read_to_string(path).map_err(|source| NodeError::Read {
        path: path.to_path_buf(),
        source,
    })
}

fn parse_err(path: &Path, reason: &str) -> NodeError {
    NodeError::Parse {
        path: path.to_path_buf(),
        reason: reason.into(),
    }
}

/// `/proc/meminfo` fields in bytes (`MemTotal`, `MemAvailable`, ...).
fn meminfo(path: &Path) -> Result<BTreeMap<String, u64>, NodeError> {
    let text = read(path)?;
    let mut out = BTreeMap::new();
    for line in text.lines() {
        let Some((key, rest)) = line.split_once(':') else {
            continue;
        };
        let mut fields = rest.split_whitespace();
        let Some(n) = fields.next().and_then(|n| n.parse::<u64>().ok()) else {
            continue;
        };
        let mult = if fields.next() == Some("kB") { 1024 } else { 1 };
        out.insert(key.to_string(), n * mult);
    }
    Ok(out)
}

/// `PRETTY_NAME` from os-release (quotes removed), or "Linux".
pub fn os_image(os_release: &str) -> String {
    os_release
        .lines()
        .find_map(|l| l.strip_prefix("PRETTY_NAME="))
        .map(|v| v.trim().trim_matches(['"', '\'']).to_string())
        .filter(|v| !v.is_empty())
        .unwrap_or_else(|| "Linux".into())
}

impl NodeFacts {
    pub fn read(roots: &HostRoots) -> Result<Self, NodeError> {
        let p = &roots.proc_root;
        let cpuinfo_path = p.join("cpuinfo");
        let cpus = read(&cpuinfo_path)?
            .lines()
            .filter(|l| l.split(':').next().is_some_and(|k| k.trim() == "processor"))
            .count() as u64;
        if cpus == 0 {
            return Err(parse_err(&cpuinfo_path, "no processor entries"));
        }
        let mem_path = p.join("meminfo");
        let mem = meminfo(&mem_path)?;
        let memory_bytes = *mem
            .get("MemTotal")
            .ok_or_else(|| parse_err(&mem_path, "no MemTotal"))?;
        let memory_available_bytes = mem.get("MemAvailable").copied().unwrap_or(memory_bytes);
        let hugepages_2mi = if mem.get("Hugepagesize") == Some(&(2048 * 1024)) {
            mem.get("HugePages_Total").copied().unwrap_or(0) * 2 * 1024 * 1024
        } else {
            0
        };
        let vfs =
            nix::sys::statvfs::statvfs(&roots.fs_root).map_err(|source| NodeError::Statvfs {
                path: roots.fs_root.clone(),
                source,
            })?;
        let frsize = vfs.fragment_size() as u64;
        let pid_max_path = p.join("sys/kernel/pid_max");
        let pid_max = read(&pid_max_path)?
            .trim()
            .parse()
            .map_err(|_| parse_err(&pid_max_path, "not a number"))?;
        // /proc/loadavg's fourth field is running/total scheduling entities.
        let loadavg_path = p.join("loadavg");
        let processes = read(&loadavg_path)?
            .split_whitespace()
            .nth(3)
            .and_then(|f| f.split('/').nth(1))
            .and_then(|n| n.parse().ok())
            .ok_or_else(|| parse_err(&loadavg_path, "no running/total field"))?;
        Ok(Self {
            cpus,
            memory_bytes,
            memory_available_bytes,
            fs_bytes: vfs.blocks() as u64 * frsize,
            fs_available_bytes: vfs.blocks_available() as u64 * frsize,
            hugepages_2mi,
            pid_max,
            processes,
            kernel_version: read(&p.join("sys/kernel/osrelease"))?.trim().to_string(),
            os_image: os_image(&read(&roots.etc_root.join("os-release")).unwrap_or_default()),
            boot_id: read(&p.join("sys/kernel/random/boot_id"))
                .map(|s| s.trim().to_string())
                .unwrap_or_default(),
            machine_id: read(&roots.etc_root.join("machine-id"))
                .map(|s| s.trim().to_string())
                .unwrap_or_default(),
        })
    }

    pub fn memory_pressure(&self) -> bool {
        self.memory_available_bytes < EVICTION_MEMORY_AVAILABLE
    }

    pub fn disk_pressure(&self) -> bool {
        self.fs_available_bytes * 100 < self.fs_bytes * EVICTION_NODEFS_PERCENT
    }

    pub fn pid_pressure(&self) -> bool {
        let free = self.pid_max.saturating_sub(self.processes);
        free * 100 < self.pid_max * PID_PRESSURE_PERCENT
    }
}

/// The interface of the IPv4 default route, from `<proc>/net/route` (the first line whose destination and mask
/// are 0), as upstream picks the node IP when `--node-ip` is not given.
pub fn default_route_interface(proc_root: &Path) -> Option<String> {
    let table = std::fs::read_to_string(proc_root.join("net/route")).ok()?;
    table.lines().skip(1).find_map(|line| {
        let f: Vec<&str> = line.split_whitespace().collect();
        (f.len() > 7 && f[1] == "00000000" && f[7] == "00000000").then(|| f[0].to_string())
    })
}

/// The node IP when `--node-ip` is not given: the first IPv4 address of the default-route interface, else of
/// any up, non-loopback interface (upstream `ChooseHostInterface`).
pub fn detect_node_ip(proc_root: &Path) -> Option<std::net::IpAddr> {
    let addrs: Vec<(String, std::net::Ipv4Addr)> = nix::ifaddrs::getifaddrs()
        .ok()?
        .filter(|a| {
            !a.flags
                .contains(nix::net::if_::InterfaceFlags::IFF_LOOPBACK)
        })
        .filter(|a| a.flags.contains(nix::net::if_::InterfaceFlags::IFF_UP))
        .filter_map(|a| {
            let ip = a.address?.as_sockaddr_in()?.ip();
            Some((a.interface_name, ip))
        })
        .collect();
    let preferred = default_route_interface(proc_root);
    addrs
        .iter()
        .find(|(name, _)| Some(name) == preferred.as_ref())
        .or_else(|| addrs.first())
        .map(|(_, ip)| std::net::IpAddr::V4(*ip))
}

/// The kubelet's own settings that go into the Node.
#[derive(Debug, Clone)]
pub struct NodeConfig {
    pub node_name: String,
    pub node_ip: String,
    pub hostname: String,
    pub max_pods: u32,
    pub labels: BTreeMap<String, String>,
}

/// Runtime readiness the Ready condition reflects (upstream: runtime and network status).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Readiness {
    /// `None` when ready; otherwise why not, e.g. "container runtime network not ready: cni config uninitialized".
    pub not_ready: Option<String>,
}

fn architecture() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        "powerpc64" => "ppc64le",
        other => other,
    }
}

fn q(s: String) -> Quantity {
    Quantity(s)
}

/// Capacity and allocatable (allocatable = capacity minus the hard eviction thresholds; no reservations).
pub fn resources(
    f: &NodeFacts,
    max_pods: u32,
) -> (BTreeMap<String, Quantity>, BTreeMap<String, Quantity>) {
    let mut capacity = BTreeMap::new();
    capacity.insert("cpu".to_string(), q(f.cpus.to_string()));
    capacity.insert(
        "memory".to_string(),
        q(format!("{}Ki", f.memory_bytes / 1024)),
    );
    capacity.insert(
        "ephemeral-storage".to_string(),
        q(format!("{}Ki", f.fs_bytes / 1024)),
    );
    capacity.insert("pods".to_string(), q(max_pods.to_string()));
    capacity.insert("hugepages-2Mi".to_string(), q(f.hugepages_2mi.to_string()));
    let mut allocatable = capacity.clone();
    let mem = f
        .memory_bytes
        .saturating_sub(EVICTION_MEMORY_AVAILABLE)
        .saturating_sub(f.hugepages_2mi);
    allocatable.insert("memory".to_string(), q(format!("{}Ki", mem / 1024)));
    let fs = f.fs_bytes / 100 * (100 - EVICTION_NODEFS_PERCENT);
    allocatable.insert("ephemeral-storage".to_string(), q(fs.to_string()));
    (capacity, allocatable)
}

fn condition(
    type_: &str,
    ok_status: bool,
    reason: &str,
    message: &str,
    now: Timestamp,
    previous: Option<&NodeStatus>,
) -> NodeCondition {
    let status = if ok_status { "True" } else { "False" };
    // lastTransitionTime moves only when the status does.
    let transition = previous
        .and_then(|p| p.conditions.as_ref())
        .and_then(|cs| cs.iter().find(|c| c.type_ == type_))
        .filter(|c| c.status == status)
        .and_then(|c| c.last_transition_time.clone())
        .unwrap_or(Time(now));
    NodeCondition {
        type_: type_.into(),
        status: status.into(),
        reason: Some(reason.into()),
        message: Some(message.into()),
        last_heartbeat_time: Some(Time(now)),
        last_transition_time: Some(transition),
    }
}

/// The node's conditions with upstream's reasons and messages.
pub fn conditions(
    f: &NodeFacts,
    r: &Readiness,
    now: Timestamp,
    previous: Option<&NodeStatus>,
) -> Vec<NodeCondition> {
    let mem = f.memory_pressure();
    let disk = f.disk_pressure();
    let pid = f.pid_pressure();
    vec![
        if mem {
            condition(
                "MemoryPressure",
                true,
                "KubeletHasInsufficientMemory",
                "kubelet has insufficient memory available",
                now,
                previous,
            )
        } else {
            condition(
                "MemoryPressure",
                false,
                "KubeletHasSufficientMemory",
                "kubelet has sufficient memory available",
                now,
                previous,
            )
        },
        if disk {
            condition(
                "DiskPressure",
                true,
                "KubeletHasDiskPressure",
                "kubelet has disk pressure",
                now,
                previous,
            )
        } else {
            condition(
                "DiskPressure",
                false,
                "KubeletHasNoDiskPressure",
                "kubelet has no disk pressure",
                now,
                previous,
            )
        },
        if pid {
            condition(
                "PIDPressure",
                true,
                "KubeletHasInsufficientPID",
                "kubelet has insufficient PID available",
                now,
                previous,
            )
        } else {
            condition(
                "PIDPressure",
                false,
                "KubeletHasSufficientPID",
                "kubelet has sufficient PID available",
                now,
                previous,
            )
        },
        match &r.not_ready {
            None => condition(
                "Ready",
                true,
                "KubeletReady",
                "kubelet is posting ready status",
                now,
                previous,
            ),
            Some(why) => condition("Ready", false, "KubeletNotReady", why, now, previous),
        },
    ]
}

/// The whole Node object the kubelet registers and updates. `previous` keeps condition transition times.
pub fn build_node(
    cfg: &NodeConfig,
    f: &NodeFacts,
    r: &Readiness,
    now: Timestamp,
    previous: Option<&Node>,
) -> Node {
    let (capacity, allocatable) = resources(f, cfg.max_pods);
    let mut labels = BTreeMap::from([
        ("kubernetes.io/hostname".to_string(), cfg.node_name.clone()),
        ("kubernetes.io/os".to_string(), "linux".to_string()),
        ("kubernetes.io/arch".to_string(), architecture().to_string()),
        ("beta.kubernetes.io/os".to_string(), "linux".to_string()),
        (
            "beta.kubernetes.io/arch".to_string(),
            architecture().to_string(),
        ),
    ]);
    labels.extend(cfg.labels.clone());
    let prev_status = previous.and_then(|n| n.status.as_ref());
    Node {
        metadata: ObjectMeta {
            name: Some(cfg.node_name.clone()),
            labels: Some(labels),
            annotations: Some(BTreeMap::from([(
                "node.alpha.kubernetes.io/ttl".to_string(),
                "0".to_string(),
            )])),
            ..previous.map(|n| n.metadata.clone()).unwrap_or_default()
        },
        spec: Some(previous.and_then(|n| n.spec.clone()).unwrap_or_default()),
        status: Some(NodeStatus {
            capacity: Some(capacity),
            allocatable: Some(allocatable),
            addresses: Some(vec![
                NodeAddress {
                    type_: "InternalIP".into(),
                    address: cfg.node_ip.clone(),
                },
                NodeAddress {
                    type_: "Hostname".into(),
                    address: cfg.hostname.clone(),
                },
            ]),
            conditions: Some(conditions(f, r, now, prev_status)),
            node_info: Some(NodeSystemInfo {
                architecture: architecture().into(),
                boot_id: f.boot_id.clone(),
                container_runtime_version: CONTAINER_RUNTIME_VERSION.into(),
                kernel_version: f.kernel_version.clone(),
                kube_proxy_version: String::new(),
                kubelet_version: KUBELET_VERSION.into(),
                machine_id: f.machine_id.clone(),
                operating_system: "linux".into(),
                os_image: f.os_image.clone(),
                system_uuid: f.machine_id.clone(),
                ..Default::default()
            }),
            daemon_endpoints: prev_status.and_then(|s| s.daemon_endpoints.clone()),
            ..Default::default()
        }),
    }
}

/// Whether to post the node status now: when it changed (ignoring heartbeat times), or every
/// [`NODE_STATUS_REPORT_FREQUENCY`] regardless (upstream's lease-era behaviour).
pub fn should_report_status(
    previous: Option<&Node>,
    next: &Node,
    since_last_report: Duration,
) -> bool {
    fn strip(n: &Node) -> Option<NodeStatus> {
        let mut s = n.status.clone()?;
        for c in s.conditions.iter_mut().flatten() {
            c.last_heartbeat_time = None;
        }
        Some(s)
    }
    match previous {
        None => true,
        Some(p) => strip(p) != strip(next) || since_last_report >= NODE_STATUS_REPORT_FREQUENCY,
    }
}

/// The node's Lease, new or renewed at `now` (holder = node, duration 40 s, owned by the Node so it goes with it).
pub fn renew_lease(
    existing: Option<&Lease>,
    node_name: &str,
    node_uid: Option<&str>,
    now: Timestamp,
) -> Lease {
    let mut lease = existing.cloned().unwrap_or_else(|| Lease {
        metadata: ObjectMeta {
            name: Some(node_name.into()),
            namespace: Some(LEASE_NAMESPACE.into()),
            ..Default::default()
        },
        spec: None,
    });
    if let Some(uid) = node_uid {
        lease.metadata.owner_references = Some(vec![OwnerReference {
            api_version: "v1".into(),
            kind: "Node".into(),
            name: node_name.into(),
            uid: uid.into(),
            ..Default::default()
        }]);
    }
    let mut spec = lease.spec.take().unwrap_or_default();
    spec.holder_identity = Some(node_name.into());
    spec.lease_duration_seconds = Some(LEASE_DURATION_SECONDS);
    spec.renew_time = Some(MicroTime(now));
    lease.spec = Some(spec);
    lease
}

/// Upstream lease controller retry: after a failed renewal, retry at 200 ms doubling to at most 7 s; after a
/// success, wait the renew interval.
pub fn next_lease_attempt(consecutive_failures: u32) -> Duration {
    if consecutive_failures == 0 {
        return LEASE_RENEW_INTERVAL;
    }
    let ms = 200u64.saturating_mul(1u64 << consecutive_failures.saturating_sub(1).min(10));
    Duration::from_millis(ms.min(7000))
}

/// Whether another node's lease has expired at `now` (renewTime + leaseDurationSeconds in the past).
pub fn lease_expired(lease: &Lease, now: Timestamp) -> bool {
    let Some(spec) = &lease.spec else { return true };
    let (Some(renew), Some(duration)) = (&spec.renew_time, spec.lease_duration_seconds) else {
        return true;
    };
    now.as_second() > renew.0.as_second() + i64::from(duration)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixture(meminfo: &str, loadavg: &str) -> (tempfile::TempDir, HostRoots) {
        let dir = tempfile::tempdir().unwrap();
        let proc_root = dir.path().join("proc");
        let etc = dir.path().join("etc");
        std::fs::create_dir_all(proc_root.join("sys/kernel/random")).unwrap();
        std::fs::create_dir_all(&etc).unwrap();
        std::fs::write(
            proc_root.join("cpuinfo"),
            "processor\t: 0\nmodel name\t: X\n\nprocessor\t: 1\nmodel name\t: X\n\nprocessor\t: 2\n",
        )
        .unwrap();
        std::fs::write(proc_root.join("meminfo"), meminfo).unwrap();
        std::fs::write(proc_root.join("loadavg"), loadavg).unwrap();
        std::fs::write(proc_root.join("sys/kernel/pid_max"), "4194304\n").unwrap();
        std::fs::write(proc_root.join("sys/kernel/osrelease"), "6.1.0-18-amd64\n").unwrap();
        std::fs::write(proc_root.join("sys/kernel/random/boot_id"), "b00t\n").unwrap();
        std::fs::write(
            etc.join("os-release"),
            "NAME=\"Debian GNU/Linux\"\nPRETTY_NAME=\"Debian GNU/Linux 12 (bookworm)\"\n",
        )
        .unwrap();
        std::fs::write(etc.join("machine-id"), "abc123\n").unwrap();
        let roots = HostRoots {
            proc_root,
            etc_root: etc,
            fs_root: dir.path().to_path_buf(),
        };
        (dir, roots)
    }

    const MEMINFO: &str = "MemTotal:        8000000 kB\nMemFree:         1000000 kB\nMemAvailable:    4000000 kB\nHugePages_Total:       2\nHugepagesize:       2048 kB\n";

    fn cfg() -> NodeConfig {
        NodeConfig {
            node_name: "node-a".into(),
            node_ip: "10.0.0.2".into(),
            hostname: "node-a".into(),
            max_pods: 110,
            labels: BTreeMap::new(),
        }
    }

    fn ts(s: i64) -> Timestamp {
        Timestamp::from_second(1_700_000_000 + s).unwrap()
    }

    #[test]
    fn facts_come_from_the_fixture_proc_and_etc() {
        let (_d, roots) = fixture(MEMINFO, "0.1 0.2 0.3 2/345 999\n");
        let f = NodeFacts::read(&roots).unwrap();
        assert_eq!(f.cpus, 3);
        assert_eq!(f.memory_bytes, 8_000_000 * 1024);
        assert_eq!(f.memory_available_bytes, 4_000_000 * 1024);
        assert_eq!(f.hugepages_2mi, 4 * 1024 * 1024);
        assert_eq!(f.processes, 345);
        assert_eq!(f.kernel_version, "6.1.0-18-amd64");
        assert_eq!(f.os_image, "Debian GNU/Linux 12 (bookworm)");
        assert_eq!(f.boot_id, "b00t");
        assert!(f.fs_bytes > 0);
        assert!(!f.memory_pressure() && !f.pid_pressure());
    }

    #[test]
    fn the_node_reports_capacity_allocatable_addresses_and_info() {
        let (_d, roots) = fixture(MEMINFO, "0 0 0 1/100 1\n");
        let f = NodeFacts::read(&roots).unwrap();
        let n = build_node(&cfg(), &f, &Readiness::default(), ts(0), None);
        let s = n.status.as_ref().unwrap();
        let cap = s.capacity.as_ref().unwrap();
        assert_eq!(cap["cpu"].0, "3");
        assert_eq!(cap["memory"].0, "8000000Ki");
        assert_eq!(cap["pods"].0, "110");
        let alloc = s.allocatable.as_ref().unwrap();
        assert_eq!(
            alloc["memory"].0,
            format!("{}Ki", 8_000_000 - 100 * 1024 - 4096)
        );
        assert_eq!(alloc["cpu"].0, "3");
        let addrs = s.addresses.as_ref().unwrap();
        assert_eq!(
            (addrs[0].type_.as_str(), addrs[0].address.as_str()),
            ("InternalIP", "10.0.0.2")
        );
        assert_eq!(addrs[1].type_, "Hostname");
        let info = s.node_info.as_ref().unwrap();
        assert_eq!(info.container_runtime_version, "windlass://0.1.0");
        assert_eq!(info.kernel_version, "6.1.0-18-amd64");
        assert_eq!(info.os_image, "Debian GNU/Linux 12 (bookworm)");
        assert!(info.kubelet_version.starts_with("v1."));
        assert_eq!(
            n.metadata.labels.as_ref().unwrap()["kubernetes.io/hostname"],
            "node-a"
        );
        let ready = s
            .conditions
            .as_ref()
            .unwrap()
            .iter()
            .find(|c| c.type_ == "Ready")
            .unwrap();
        assert_eq!(
            (ready.status.as_str(), ready.reason.as_deref()),
            ("True", Some("KubeletReady"))
        );
    }

    #[test]
    fn pressure_conditions_follow_the_thresholds_and_keep_transition_times() {
        let (_d, roots) = fixture(
            "MemTotal: 8000000 kB\nMemAvailable: 50000 kB\n",
            "0 0 0 1/4000000 1\n",
        );
        let mut f = NodeFacts::read(&roots).unwrap();
        // The test is about memory and PID pressure: fix the file system numbers so the host's own disk
        // (statvfs of the temp dir) cannot turn DiskPressure on.
        f.fs_bytes = 100 << 30;
        f.fs_available_bytes = 50 << 30;
        let not_ready = Readiness {
            not_ready: Some("container runtime network not ready: cni config uninitialized".into()),
        };
        let n1 = build_node(&cfg(), &f, &not_ready, ts(0), None);
        let get = |n: &Node, t: &str| {
            n.status
                .as_ref()
                .unwrap()
                .conditions
                .as_ref()
                .unwrap()
                .iter()
                .find(|c| c.type_ == t)
                .unwrap()
                .clone()
        };
        assert_eq!(get(&n1, "MemoryPressure").status, "True");
        assert_eq!(
            get(&n1, "MemoryPressure").reason.as_deref(),
            Some("KubeletHasInsufficientMemory")
        );
        assert_eq!(get(&n1, "PIDPressure").status, "True");
        assert_eq!(
            get(&n1, "DiskPressure").reason.as_deref(),
            Some("KubeletHasNoDiskPressure")
        );
        assert_eq!(get(&n1, "Ready").reason.as_deref(), Some("KubeletNotReady"));
        let n2 = build_node(&cfg(), &f, &Readiness::default(), ts(10), Some(&n1));
        assert_eq!(
            get(&n2, "MemoryPressure").last_transition_time,
            Some(Time(ts(0)))
        );
        assert_eq!(
            get(&n2, "MemoryPressure").last_heartbeat_time,
            Some(Time(ts(10)))
        );
        assert_eq!(get(&n2, "Ready").last_transition_time, Some(Time(ts(10))));
        assert!(
            should_report_status(Some(&n1), &n2, Duration::from_secs(10)),
            "Ready changed"
        );
        let n3 = build_node(&cfg(), &f, &Readiness::default(), ts(20), Some(&n2));
        assert!(
            !should_report_status(Some(&n2), &n3, Duration::from_secs(10)),
            "only heartbeats moved"
        );
        assert!(should_report_status(
            Some(&n2),
            &n3,
            Duration::from_secs(300)
        ));
    }

    #[test]
    fn the_lease_is_held_by_the_node_and_renewed() {
        let l = renew_lease(None, "node-a", Some("uid-1"), ts(0));
        assert_eq!(l.metadata.namespace.as_deref(), Some("kube-node-lease"));
        assert_eq!(l.metadata.name.as_deref(), Some("node-a"));
        let spec = l.spec.as_ref().unwrap();
        assert_eq!(spec.holder_identity.as_deref(), Some("node-a"));
        assert_eq!(spec.lease_duration_seconds, Some(40));
        assert_eq!(
            l.metadata.owner_references.as_ref().unwrap()[0].kind,
            "Node"
        );
        let renewed = renew_lease(Some(&l), "node-a", None, ts(10));
        assert_eq!(
            renewed.spec.as_ref().unwrap().renew_time,
            Some(MicroTime(ts(10)))
        );
        assert!(!lease_expired(&renewed, ts(50)));
        assert!(lease_expired(&renewed, ts(51)));
        assert_eq!(next_lease_attempt(0), Duration::from_secs(10));
        let retries: Vec<u64> = (1..8)
            .map(|n| next_lease_attempt(n).as_millis() as u64)
            .collect();
        assert_eq!(retries, vec![200, 400, 800, 1600, 3200, 6400, 7000]);
    }

    #[test]
    fn the_default_route_interface_comes_from_proc_net_route() {
        let (_d, roots) = fixture(MEMINFO, "0 0 0 1/1 1\n");
        std::fs::create_dir_all(roots.proc_root.join("net")).unwrap();
        std::fs::write(
            roots.proc_root.join("net/route"),
            "Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT\n\
             eth1\t0002A8C0\t00000000\t0001\t0\t0\t0\t00FFFFFF\t0\t0\t0\n\
             eth0\t00000000\t0102A8C0\t0003\t0\t0\t100\t00000000\t0\t0\t0\n",
        )
        .unwrap();
        assert_eq!(
            default_route_interface(&roots.proc_root).as_deref(),
            Some("eth0")
        );
        std::fs::write(roots.proc_root.join("net/route"), "Iface\tDestination\n").unwrap();
        assert_eq!(default_route_interface(&roots.proc_root), None);
    }

    #[test]
    fn missing_proc_files_are_named() {
        let (_d, roots) = fixture(MEMINFO, "garbage\n");
        let err = NodeFacts::read(&roots).unwrap_err();
        assert!(err.to_string().contains("loadavg"), "{err}");
    }
}
