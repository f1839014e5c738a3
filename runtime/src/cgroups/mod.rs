//! Container cgroups on cgroup v1 and v2, behind one [`CgroupManager`] trait chosen once by [`create_manager`].
//!
//! A manager is a pure function of `(cgroup_root, cgroups_path)`: it keeps no state of its own, so a restarted
//! runtime or kubelet rebuilds it from the container's OCI `cgroupsPath` and can still read stats, list pids
//! and destroy. Which parent directories `create` made is recorded on the directories themselves (see
//! `fs.rs`: the sticky bit marks them), and `destroy` removes the container's cgroup and the empty parents so
//! marked, stopping at the first parent somebody else made or another container still uses.
//!
//! Lifecycle as the container code drives it: `create_manager(root, cgroupsPath)` → `create` →
//! `apply(linux.resources)` → `add_task(init pid)` before the init execs the user's process → `stats`, `freeze`,
//! `pids` while it runs → after it exits `oom_killed` (to report `OOMKilled`) → SIGKILL whatever `pids` still
//! lists → `destroy`.
//!
//! Why not `cgroups-rs` (the issue asked for it; 0.3.4 and 0.5.1 were read): its hierarchies cannot be pointed at a
//! cgroup root other than the host's. `hierarchies::V2::new`, `is_cgroup2_unified_mode`,
//! `cgroup::supported_controllers` and every `Hierarchy::root_control_group`/`parent_control_group` hard-code
//! `/sys/fs/cgroup` (`UNIFIED_MOUNTPOINT`), and `V1::new` reads `/proc/self/mountinfo`, so neither version can be
//! unit-tested on a temp-dir fixture nor run several nodes side by side. Its `Controller::create` logs and swallows
//! `mkdir` errors and uses `create_dir_all`, which hides which parents it made — exactly what `destroy` needs. Its
//! single controllers could be aimed at a directory, but their readers swallow errors too (`MemController::
//! memory_stat` turns every unreadable file into 0, so a destroyed cgroup reads as an idle one), and the hierarchy
//! work (parents, cpuset propagation, v2 `subtree_control`, removal) would be ours anyway. What remains is one value
//! per control file, so it lives here, with the conversions runc uses, each cited.
//!
//! Layouts: v1 `<root>/<controller>/<path>` for every mounted hierarchy; v2 `<root>/<path>`. A hybrid host (v1
//! controllers plus an empty cgroup2 mount at `<root>/unified`) is driven as v1.

mod error;
#[cfg(any(test, feature = "test-utils"))]
mod fake;
mod fs;
mod plan;
mod stats;
#[cfg(test)]
mod tests;
mod v1;
mod v2;

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

pub use error::CgroupError;
#[cfg(any(test, feature = "test-utils"))]
pub use fake::{FakeCgroupManager, FakeCgroupState};
pub use stats::CgroupStats;

/// One container's cgroup. Every method works on a manager rebuilt by [`create_manager`] after a restart.
pub trait CgroupManager: Send + Sync + std::fmt::Debug {
    /// Makes the cgroup in every controller (v1) or the unified tree (v2), marking the parents it had to make.
    /// Idempotent; on failure it removes what it made.
    fn create(&self) -> Result<(), CgroupError>;
    /// Moves a process (all its threads) into the cgroup.
    fn add_task(&self, pid: nix::unistd::Pid) -> Result<(), CgroupError>;
    /// Applies OCI `linux.resources`. Everything is validated, and every control file checked, before the
    /// first write.
    fn apply(&self, resources: &oci_spec::runtime::LinuxResources) -> Result<(), CgroupError>;
    /// CPU, memory (usage, working set, rss), pids and OOM-kill counters.
    fn stats(&self) -> Result<CgroupStats, CgroupError>;
    /// Whether the kernel's OOM killer killed a process of this cgroup because of its memory limit. Read it
    /// before [`destroy`](CgroupManager::destroy): the counters go with the cgroup.
    fn oom_killed(&self) -> Result<bool, CgroupError>;
    /// Processes in the cgroup and its child cgroups.
    fn pids(&self) -> Result<Vec<nix::unistd::Pid>, CgroupError>;
    /// Freezes (true) or thaws (false) every process, waiting until the kernel reports the new state.
    fn freeze(&self, frozen: bool) -> Result<(), CgroupError>;
    /// Removes the cgroup (and child cgroups) and the empty parents `create` made, without killing anything:
    /// a cgroup that still has processes fails with `EBUSY` after brief retries. Every failure is reported in
    /// [`CgroupError::Destroy`]. Destroying a cgroup that is already gone succeeds.
    fn destroy(&self) -> Result<(), CgroupError>;
}

/// The cgroup version of a host (or fixture).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize)]
pub enum CgroupVersion {
    /// Per-controller hierarchies; also hybrid hosts (v1 controllers plus a cgroup2 mount at `unified/`).
    V1,
    /// The unified hierarchy.
    V2,
}

impl std::fmt::Display for CgroupVersion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            CgroupVersion::V1 => "v1",
            CgroupVersion::V2 => "v2",
        })
    }
}

/// Tells v1 from v2 by the layout under `cgroup_root` (`/sys/fs/cgroup` on a host): a v2 root has
/// `cgroup.controllers`; a v1 root is a directory of controller hierarchies.
pub fn detect_version(cgroup_root: &Path) -> Result<CgroupVersion, CgroupError> {
    if cgroup_root.join("cgroup.controllers").is_file() {
        Ok(CgroupVersion::V2)
    } else if v1::has_hierarchies(cgroup_root) {
        Ok(CgroupVersion::V1)
    } else {
        Err(CgroupError::NoCgroupFs {
            root: cgroup_root.to_path_buf(),
        })
    }
}

/// The manager for the cgroup at `cgroups_path` (an OCI `linux.cgroupsPath`, taken relative to `cgroup_root`
/// whether or not it starts with `/`) on whatever cgroup version `cgroup_root` has.
pub fn create_manager(
    cgroup_root: &Path,
    cgroups_path: &Path,
) -> Result<Box<dyn CgroupManager>, CgroupError> {
    let rel = fs::normalize_cgroups_path(cgroups_path)?;
    let version = detect_version(cgroup_root)?;
    announce_backend(cgroup_root, version);
    Ok(match version {
        CgroupVersion::V1 => Box::new(v1::V1Manager::new(cgroup_root, rel)?),
        CgroupVersion::V2 => Box::new(v2::V2Manager::new(cgroup_root, rel)),
    })
}

/// Logs the chosen backend at `info` once per cgroup root (the factory runs once per container).
fn announce_backend(root: &Path, version: CgroupVersion) {
    static ANNOUNCED: Mutex<Option<HashSet<PathBuf>>> = Mutex::new(None);
    let first = match ANNOUNCED.lock() {
        Ok(mut seen) => seen
            .get_or_insert_with(HashSet::new)
            .insert(root.to_path_buf()),
        Err(_) => true,
    };
    let hybrid = version == CgroupVersion::V1 && root.join("unified/cgroup.controllers").is_file();
    if first {
        tracing::info!(root = %root.display(), %version, hybrid, "cgroup backend chosen");
    } else {
        tracing::debug!(root = %root.display(), %version, hybrid, "cgroup backend chosen");
    }
}
