//! OCI `linux.resources` → the control-file writes that apply them, for v1 and v2.
//!
//! A plan is built and validated completely before anything is written, so bad input changes nothing
//! (`apply` also checks that every file exists first). Values and their conversions follow the OCI runtime spec
//! (config-linux.md#control-groups) and runc where the spec is silent (`libcontainer/cgroups/fs` and `fs2`).

use std::path::Path;

use oci_spec::runtime::{LinuxCpu, LinuxMemory, LinuxResources};

use super::CgroupError;

/// One write of `value` into `file` of the cgroup's directory for `controller`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct FileWrite {
    pub(crate) controller: &'static str,
    pub(crate) file: String,
    pub(crate) value: String,
}

fn w(controller: &'static str, file: impl Into<String>, value: impl ToString) -> FileWrite {
    FileWrite {
        controller,
        file: file.into(),
        value: value.to_string(),
    }
}

/// Which cgroup version a plan is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Target {
    V1 {
        /// `memory.memsw.limit_in_bytes` exists (swap accounting is on).
        memsw: bool,
        /// Current `memory.memsw.limit_in_bytes`, to order the two memory writes as the kernel requires.
        current_memsw: Option<i64>,
    },
    V2,
}

/// Builds the writes for `resources`. `cgroup` is only used in error messages.
pub(crate) fn plan(
    resources: &LinuxResources,
    target: Target,
    cgroup: &Path,
) -> Result<Vec<FileWrite>, CgroupError> {
    let invalid = |reason: String| CgroupError::InvalidResources {
        path: cgroup.to_path_buf(),
        reason,
    };
    let mut writes = Vec::new();
    if let Some(memory) = resources.memory() {
        match target {
            Target::V1 {
                memsw,
                current_memsw,
            } => plan_memory_v1(memory, memsw, current_memsw, &mut writes).map_err(invalid)?,
            Target::V2 => plan_memory_v2(memory, &mut writes).map_err(invalid)?,
        }
    }
    if let Some(cpu) = resources.cpu() {
        plan_cpu(cpu, target, &mut writes).map_err(invalid)?;
    }
    if let Some(pids) = resources.pids() {
        // runc `fs/pids.go`/`fs2/pids.go`: 0 (the field's zero value) leaves the limit alone, a negative limit
        // means unlimited. Kubernetes sends -1 or a positive number.
        match pids.limit() {
            0 => {}
            l if l > 0 => writes.push(w("pids", "pids.max", l)),
            _ => writes.push(w("pids", "pids.max", "max")),
        }
    }
    for limit in resources.hugepage_limits().iter().flatten() {
        let size = limit.page_size();
        check_hugepage_size(size).map_err(invalid)?;
        let bytes = limit.limit();
        if bytes < -1 {
            return Err(invalid(format!(
                "hugepage limit {bytes} for {size} is negative"
            )));
        }
        // v1 spells "unlimited" -1, v2 "max".
        match target {
            Target::V1 { .. } => writes.push(w(
                "hugetlb",
                format!("hugetlb.{size}.limit_in_bytes"),
                bytes,
            )),
            Target::V2 => writes.push(w("hugetlb", format!("hugetlb.{size}.max"), max_or(bytes))),
        }
    }
    if let Some(unified) = resources.unified() {
        match target {
            Target::V1 { .. } if !unified.is_empty() => {
                return Err(invalid(
                    "`unified` keys need cgroup v2, this host runs v1".to_string(),
                ))
            }
            Target::V1 { .. } => {}
            Target::V2 => {
                // Written last so they override the typed fields, as runc does. Sorted for a stable order.
                let mut keys: Vec<_> = unified.iter().collect();
                keys.sort();
                for (key, value) in keys {
                    if key.is_empty() || key.contains('/') || key.starts_with('.') {
                        return Err(invalid(format!(
                            "unified key {key:?} is not a cgroup file name"
                        )));
                    }
                    let controller = unified_controller(key).ok_or_else(|| {
                        invalid(format!(
                            "unified key {key:?} does not name a known controller's file"
                        ))
                    })?;
                    writes.push(w(controller, key.clone(), value));
                }
            }
        }
    }
    // Enforced elsewhere or not at all; say so rather than silently pretend.
    if resources.block_io().is_some() {
        tracing::warn!(cgroup = %cgroup.display(), "blockIO resources are not applied by this runtime");
    }
    if resources.network().is_some() {
        tracing::warn!(cgroup = %cgroup.display(), "network class/priority resources are not applied by this runtime");
    }
    if resources.rdma().as_ref().is_some_and(|r| !r.is_empty()) {
        tracing::warn!(cgroup = %cgroup.display(), "rdma resources are not applied by this runtime");
    }
    if resources.devices().as_ref().is_some_and(|d| !d.is_empty()) {
        // Device access is bounded by the container's /dev (only the spec's devices are created in its mount
        // namespace); the devices cgroup / eBPF program is not programmed yet.
        tracing::debug!(cgroup = %cgroup.display(), "device cgroup rules are not applied by this runtime");
    }
    Ok(writes)
}

/// The controller whose directory holds a v2 file (`memory.high` → memory); `cgroup.*` files belong to the core.
fn unified_controller(key: &str) -> Option<&'static str> {
    let prefix = key.split('.').next()?;
    Some(match prefix {
        "cgroup" => "cgroup",
        "memory" => "memory",
        "cpu" => "cpu",
        "cpuset" => "cpuset",
        "io" => "io",
        "pids" => "pids",
        "hugetlb" => "hugetlb",
        "rdma" => "rdma",
        "misc" => "misc",
        _ => return None,
    })
}

/// `-1` (unlimited) or a positive number of bytes.
fn check_limit(name: &str, value: i64) -> Result<(), String> {
    if value == -1 || value > 0 {
        Ok(())
    } else {
        Err(format!(
            "memory {name} {value} must be positive or -1 (unlimited)"
        ))
    }
}

fn plan_memory_v1(
    memory: &LinuxMemory,
    memsw: bool,
    current_memsw: Option<i64>,
    writes: &mut Vec<FileWrite>,
) -> Result<(), String> {
    let limit = memory.limit();
    let mut swap = memory.swap();
    if let Some(l) = limit {
        check_limit("limit", l)?;
    }
    if let Some(s) = swap {
        check_limit("swap (memory+swap)", s)?;
    }
    if let (Some(l), Some(s)) = (limit, swap) {
        if l > 0 && s > 0 && s < l {
            return Err(format!(
                "memory+swap limit {s} is below the memory limit {l}"
            ));
        }
    }
    // runc: an unlimited memory request without a swap value means "both unlimited".
    if limit == Some(-1) && swap.is_none() && memsw {
        swap = Some(-1);
    }
    if let Some(s) = swap {
        if !memsw {
            tracing::warn!(
                swap = s,
                "swap accounting is off (no memory.memsw.limit_in_bytes): swap limit not applied"
            );
            swap = None;
        }
    }
    match (limit, swap) {
        (Some(l), Some(s)) => {
            // The kernel keeps memory.limit <= memory.memsw.limit at every step: raise memsw first when growing.
            let memsw_first = s == -1 || current_memsw.is_some_and(|cur| cur != -1 && cur < s);
            let lw = w("memory", "memory.limit_in_bytes", l);
            let sw = w("memory", "memory.memsw.limit_in_bytes", s);
            if memsw_first {
                writes.extend([sw, lw]);
            } else {
                writes.extend([lw, sw]);
            }
        }
        (Some(l), None) => writes.push(w("memory", "memory.limit_in_bytes", l)),
        (None, Some(s)) => writes.push(w("memory", "memory.memsw.limit_in_bytes", s)),
        (None, None) => {}
    }
    if let Some(r) = memory.reservation() {
        check_limit("reservation", r)?;
        writes.push(w("memory", "memory.soft_limit_in_bytes", r));
    }
    if let Some(k) = memory.kernel_tcp() {
        check_limit("kernelTCP", k)?;
        writes.push(w("memory", "memory.kmem.tcp.limit_in_bytes", k));
    }
    if memory.kernel().is_some() {
        // Kernel memory limits are deprecated (kernel 5.4) and rejected by 5.16+; runc ignores them too.
        tracing::warn!("memory.kernel is deprecated and not applied");
    }
    if let Some(s) = memory.swappiness() {
        if s > 100 {
            return Err(format!("memory swappiness {s} is above 100"));
        }
        writes.push(w("memory", "memory.swappiness", s));
    }
    if memory.disable_oom_killer() == Some(true) {
        writes.push(w("memory", "memory.oom_control", 1));
    }
    if let Some(h) = memory.use_hierarchy() {
        writes.push(w("memory", "memory.use_hierarchy", u8::from(h)));
    }
    Ok(())
}

/// OCI `memory.swap` is memory+swap; v2 `memory.swap.max` is swap alone. Ref: runc
/// `cgroups.ConvertMemorySwapToCgroupV2Value`.
pub(crate) fn swap_v2(limit: Option<i64>, swap: Option<i64>) -> Result<Option<i64>, String> {
    match (limit, swap) {
        (Some(-1), None) => Ok(Some(-1)),
        (_, None) => Ok(None),
        (_, Some(-1)) => Ok(Some(-1)),
        (None | Some(-1), Some(_)) => Err("a swap limit needs a memory limit".to_string()),
        (Some(l), Some(s)) if s < l => Err(format!(
            "memory+swap limit {s} is below the memory limit {l}"
        )),
        (Some(l), Some(s)) => Ok(Some(s - l)),
    }
}

fn max_or(v: i64) -> String {
    if v == -1 {
        "max".to_string()
    } else {
        v.to_string()
    }
}

fn plan_memory_v2(memory: &LinuxMemory, writes: &mut Vec<FileWrite>) -> Result<(), String> {
    if let Some(l) = memory.limit() {
        check_limit("limit", l)?;
    }
    if let Some(s) = memory.swap() {
        check_limit("swap (memory+swap)", s)?;
    }
    // runc writes swap before the limit; v2 has no ordering constraint between the two.
    if let Some(s) = swap_v2(memory.limit(), memory.swap())? {
        writes.push(w("memory", "memory.swap.max", max_or(s)));
    }
    if let Some(l) = memory.limit() {
        writes.push(w("memory", "memory.max", max_or(l)));
    }
    if let Some(r) = memory.reservation() {
        check_limit("reservation", r)?;
        writes.push(w("memory", "memory.low", max_or(r)));
    }
    if memory.swappiness().is_some() {
        tracing::warn!("memory.swappiness has no cgroup v2 equivalent and is not applied");
    }
    if memory.kernel().is_some() || memory.kernel_tcp().is_some() {
        tracing::warn!("kernel memory limits have no cgroup v2 equivalent and are not applied");
    }
    if memory.disable_oom_killer() == Some(true) {
        return Err("disableOOMKiller is not supported on cgroup v2".to_string());
    }
    Ok(())
}

/// OCI/v1 `cpu.shares` (2..262144) → v2 `cpu.weight` (1..10000). Ref: runc `cgroups.ConvertCPUSharesToCgroupV2Value`.
pub(crate) fn shares_to_weight(shares: u64) -> u64 {
    let shares = shares.clamp(2, 262_144);
    1 + ((shares - 2) * 9999) / 262_142
}

fn plan_cpu(cpu: &LinuxCpu, target: Target, writes: &mut Vec<FileWrite>) -> Result<(), String> {
    if let Some(period) = cpu.period() {
        // Kernel bounds for cfs_period_us (kernel/sched/core.c: 1 ms .. 1 s).
        if !(1_000..=1_000_000).contains(&period) {
            return Err(format!("cpu period {period} us is outside 1000..=1000000"));
        }
    }
    if let Some(quota) = cpu.quota() {
        if quota != -1 && quota < 1_000 {
            return Err(format!(
                "cpu quota {quota} us must be -1 (unlimited) or at least 1000"
            ));
        }
    }
    let v2 = matches!(target, Target::V2);
    if let Some(shares) = cpu.shares().filter(|s| *s != 0) {
        if v2 {
            writes.push(w("cpu", "cpu.weight", shares_to_weight(shares)));
        } else {
            writes.push(w("cpu", "cpu.shares", shares));
        }
    }
    if v2 {
        if cpu.quota().is_some() || cpu.period().is_some() {
            // `cpu.max` is "$MAX $PERIOD"; "max" alone keeps the period (kernel cgroup-v2.rst).
            let max = match cpu.quota() {
                Some(q) if q > 0 => q.to_string(),
                _ => "max".to_string(),
            };
            let value = match cpu.period() {
                Some(p) => format!("{max} {p}"),
                None => max,
            };
            writes.push(w("cpu", "cpu.max", value));
        }
        if let Some(burst) = cpu.burst() {
            writes.push(w("cpu", "cpu.max.burst", burst));
        }
        if cpu.realtime_runtime().is_some() || cpu.realtime_period().is_some() {
            return Err(
                "realtime cpu scheduling limits are not supported on cgroup v2".to_string(),
            );
        }
    } else {
        // Period first: the quota is checked against it (runc writes them in this order too).
        if let Some(period) = cpu.period() {
            writes.push(w("cpu", "cpu.cfs_period_us", period));
        }
        if let Some(quota) = cpu.quota() {
            writes.push(w("cpu", "cpu.cfs_quota_us", quota));
        }
        if let Some(burst) = cpu.burst() {
            writes.push(w("cpu", "cpu.cfs_burst_us", burst));
        }
        if let Some(period) = cpu.realtime_period() {
            writes.push(w("cpu", "cpu.rt_period_us", period));
        }
        if let Some(runtime) = cpu.realtime_runtime() {
            writes.push(w("cpu", "cpu.rt_runtime_us", runtime));
        }
    }
    if let Some(idle) = cpu.idle() {
        if !(0..=1).contains(&idle) {
            return Err(format!("cpu idle {idle} must be 0 or 1"));
        }
        writes.push(w("cpu", "cpu.idle", idle));
    }
    if let Some(cpus) = cpu.cpus().as_deref().filter(|s| !s.is_empty()) {
        check_cpu_list("cpus", cpus)?;
        writes.push(w("cpuset", "cpuset.cpus", cpus));
    }
    if let Some(mems) = cpu.mems().as_deref().filter(|s| !s.is_empty()) {
        check_cpu_list("mems", mems)?;
        writes.push(w("cpuset", "cpuset.mems", mems));
    }
    Ok(())
}

/// The kernel's list format: `0-3,5,7-8` (cgroup-v2.rst "cpuset.cpus"). Checked here so a typo fails before any
/// write rather than halfway.
fn check_cpu_list(name: &str, list: &str) -> Result<(), String> {
    let bad = || format!("cpuset {name} {list:?} is not a list like \"0-3,5\"");
    for part in list.trim().split(',') {
        let (lo, hi) = match part.split_once('-') {
            Some((lo, hi)) => (lo, hi),
            None => (part, part),
        };
        let lo: u32 = lo.trim().parse().map_err(|_| bad())?;
        let hi: u32 = hi.trim().parse().map_err(|_| bad())?;
        if lo > hi {
            return Err(bad());
        }
    }
    Ok(())
}

/// `<number><KB|MB|GB>` as in the hugetlb file names (`hugetlb.2MB.limit_in_bytes`).
fn check_hugepage_size(size: &str) -> Result<(), String> {
    let digits = size.trim_end_matches(|c: char| c.is_ascii_alphabetic());
    let unit = &size[digits.len()..];
    if digits.is_empty()
        || !digits.bytes().all(|b| b.is_ascii_digit())
        || !["KB", "MB", "GB"].contains(&unit)
    {
        return Err(format!("hugepage size {size:?} is not like \"2MB\""));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn resources(json: &str) -> LinuxResources {
        match serde_json::from_str(json) {
            Ok(r) => r,
            Err(e) => panic!("bad test resources {json}: {e}"),
        }
    }

    const V1: Target = Target::V1 {
        memsw: true,
        current_memsw: Some(-1),
    };

    fn files(writes: &[FileWrite]) -> Vec<(&str, &str)> {
        writes
            .iter()
            .map(|w| (w.file.as_str(), w.value.as_str()))
            .collect()
    }

    #[test]
    fn cpu_shares_convert_to_v2_weight_like_runc() {
        assert_eq!(shares_to_weight(2), 1);
        assert_eq!(shares_to_weight(1024), 39);
        assert_eq!(shares_to_weight(262_144), 10_000);
        // Out-of-range shares are clamped the way the kernel clamps cpu.shares, never underflow.
        assert_eq!(shares_to_weight(1), 1);
        assert_eq!(shares_to_weight(1_000_000), 10_000);
    }

    #[test]
    fn kubernetes_burstable_limits_become_v1_files() -> Result<(), CgroupError> {
        let r = resources(
            r#"{"memory":{"limit":67108864,"swap":67108864},"cpu":{"shares":512,"quota":50000,"period":100000,
                "cpus":"0-1","mems":"0"},"pids":{"limit":32}}"#,
        );
        let writes = plan(&r, V1, Path::new("/cg"))?;
        assert_eq!(
            files(&writes),
            vec![
                ("memory.limit_in_bytes", "67108864"),
                ("memory.memsw.limit_in_bytes", "67108864"),
                ("cpu.shares", "512"),
                ("cpu.cfs_period_us", "100000"),
                ("cpu.cfs_quota_us", "50000"),
                ("cpuset.cpus", "0-1"),
                ("cpuset.mems", "0"),
                ("pids.max", "32"),
            ]
        );
        Ok(())
    }

    #[test]
    fn v1_raises_memsw_before_the_memory_limit_when_growing() -> Result<(), CgroupError> {
        let r = resources(r#"{"memory":{"limit":200000000,"swap":400000000}}"#);
        let growing = Target::V1 {
            memsw: true,
            current_memsw: Some(100_000_000),
        };
        assert_eq!(
            files(&plan(&r, growing, Path::new("/cg"))?),
            vec![
                ("memory.memsw.limit_in_bytes", "400000000"),
                ("memory.limit_in_bytes", "200000000")
            ]
        );
        let no_swap_accounting = Target::V1 {
            memsw: false,
            current_memsw: None,
        };
        assert_eq!(
            files(&plan(&r, no_swap_accounting, Path::new("/cg"))?),
            vec![("memory.limit_in_bytes", "200000000")]
        );
        Ok(())
    }

    #[test]
    fn the_same_limits_become_v2_files() -> Result<(), CgroupError> {
        let r = resources(
            r#"{"memory":{"limit":67108864,"swap":100663296,"reservation":1048576},
                "cpu":{"shares":1024,"quota":50000,"period":100000,"cpus":"0"},
                "pids":{"limit":-1},"hugepageLimits":[{"pageSize":"2MB","limit":4194304}],
                "unified":{"memory.oom.group":"1"}}"#,
        );
        assert_eq!(
            files(&plan(&r, Target::V2, Path::new("/cg"))?),
            vec![
                ("memory.swap.max", "33554432"),
                ("memory.max", "67108864"),
                ("memory.low", "1048576"),
                ("cpu.weight", "39"),
                ("cpu.max", "50000 100000"),
                ("cpuset.cpus", "0"),
                ("pids.max", "max"),
                ("hugetlb.2MB.max", "4194304"),
                ("memory.oom.group", "1"),
            ]
        );
        let unlimited =
            resources(r#"{"memory":{"limit":-1},"cpu":{"quota":-1},"pids":{"limit":0}}"#);
        assert_eq!(
            files(&plan(&unlimited, Target::V2, Path::new("/cg"))?),
            vec![
                ("memory.swap.max", "max"),
                ("memory.max", "max"),
                ("cpu.max", "max")
            ]
        );
        Ok(())
    }

    #[test]
    fn invalid_resources_are_rejected_before_any_write() {
        for bad in [
            r#"{"memory":{"limit":0}}"#,
            r#"{"memory":{"limit":100000000,"swap":1000}}"#,
            r#"{"cpu":{"quota":10}}"#,
            r#"{"cpu":{"period":10}}"#,
            r#"{"cpu":{"cpus":"0-x"}}"#,
            r#"{"cpu":{"cpus":"3-1"}}"#,
            r#"{"memory":{"swappiness":101}}"#,
            r#"{"hugepageLimits":[{"pageSize":"2XB","limit":1}]}"#,
        ] {
            assert!(
                matches!(
                    plan(&resources(bad), V1, Path::new("/cg")),
                    Err(CgroupError::InvalidResources { .. })
                ),
                "{bad} accepted on v1"
            );
        }
        for bad in [
            r#"{"unified":{"../memory.max":"1"}}"#,
            r#"{"unified":{"bogus.file":"1"}}"#,
            r#"{"memory":{"swap":1000000}}"#,
            r#"{"cpu":{"realtimeRuntime":1000}}"#,
        ] {
            assert!(
                matches!(
                    plan(&resources(bad), Target::V2, Path::new("/cg")),
                    Err(CgroupError::InvalidResources { .. })
                ),
                "{bad} accepted on v2"
            );
        }
        assert!(plan(
            &resources(r#"{"unified":{"memory.high":"1"}}"#),
            V1,
            Path::new("/cg")
        )
        .is_err());
    }
}
