//! Resource usage of one cgroup, in the units the kubelet's summary API reports (cadvisor's definitions).

use std::path::Path;

use super::{fs, CgroupError};

/// A snapshot of a cgroup's usage. Fields a kernel or controller does not provide are `None` (or 0 for counters
/// whose controller is absent).
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
#[non_exhaustive]
pub struct CgroupStats {
    /// Total CPU time consumed, in nanoseconds (v1 `cpuacct.usage`, v2 `cpu.stat` `usage_usec` × 1000).
    pub cpu_usage_ns: u64,
    /// CPU time in user mode, in nanoseconds.
    pub cpu_user_ns: Option<u64>,
    /// CPU time in kernel mode, in nanoseconds.
    pub cpu_system_ns: Option<u64>,
    /// CFS enforcement periods elapsed while a quota was set.
    pub cpu_periods: u64,
    /// Periods in which the cgroup was throttled.
    pub cpu_throttled_periods: u64,
    /// Total time throttled, in nanoseconds.
    pub cpu_throttled_ns: u64,
    /// Memory charged to the cgroup (v1 `memory.usage_in_bytes`, v2 `memory.current`).
    pub memory_usage_bytes: u64,
    /// Usage minus inactive file cache: what the kubelet evicts and OOM decisions look at (cadvisor's
    /// `working_set`; v1 `total_inactive_file`, v2 `inactive_file`).
    pub memory_working_set_bytes: u64,
    /// Anonymous memory (v1 `total_rss`, v2 `anon`).
    pub memory_rss_bytes: u64,
    /// Page cache (v1 `total_cache`, v2 `file`).
    pub memory_cache_bytes: u64,
    /// The memory limit, `None` when unlimited.
    pub memory_limit_bytes: Option<u64>,
    /// Tasks (threads included) in the cgroup.
    pub pids_current: u64,
    /// The pids limit, `None` when unlimited.
    pub pids_limit: Option<u64>,
    /// Processes killed by the OOM killer because of this cgroup's limit; `None` when the kernel does not count
    /// them (v1 before Linux 4.13).
    pub oom_kill_count: Option<u64>,
}

/// A number in `path`, `None` when the file is missing (controller or feature absent) or says `max`.
pub(crate) fn read_u64(path: &Path) -> Result<Option<u64>, CgroupError> {
    match fs::read_optional(path)? {
        Some(content) => fs::parse_u64_or_max(path, &content),
        None => Ok(None),
    }
}

/// A flat-keyed file's contents, empty when the file is missing.
pub(crate) fn read_keyed(path: &Path) -> Result<String, CgroupError> {
    Ok(fs::read_optional(path)?.unwrap_or_default())
}

/// v1 reports "no limit" as the largest page-aligned counter (9223372036854771712 on x86-64), not as `max`.
pub(crate) fn v1_limit(value: Option<u64>) -> Option<u64> {
    value.filter(|v| *v < (1 << 62))
}
