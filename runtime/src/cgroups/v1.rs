//! cgroup v1: one directory per controller hierarchy (`<root>/memory/<path>`, `<root>/cpu/<path>` ...).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::unistd::Pid;
use oci_spec::runtime::LinuxResources;

use super::plan::{self, FileWrite, Target};
use super::stats::{read_keyed, read_u64, v1_limit};
use super::{fs, CgroupError, CgroupManager, CgroupStats};

/// The v1 hierarchies a container joins, as directory names under the cgroup root. Like runc, every mounted one
/// (including the named `systemd` hierarchy) so tools that read `/proc/<pid>/cgroup` see the container's path in
/// each. The `unified` cgroup2 mount of a hybrid host is left alone: it has no controllers there.
///
/// `add_task` follows this order: blkio before memory, because cgroup writeback attributes dirty pages by the
/// pair (cgroups-rs orders them the same way), and cpuset early so the task lands on its CPUs first.
const HIERARCHIES: &[&str] = &[
    "cpuset",
    "cpu",
    "cpuacct",
    "blkio",
    "memory",
    "pids",
    "freezer",
    "devices",
    "hugetlb",
    "net_cls",
    "net_prio",
    "perf_event",
    "rdma",
    "misc",
    "systemd",
];

/// Whether `root` looks like a v1 cgroup root (any controller hierarchy directory).
pub(crate) fn has_hierarchies(root: &Path) -> bool {
    HIERARCHIES.iter().any(|h| root.join(h).is_dir())
}

/// How long freezing may take before we give up and thaw again (runc waits about as long).
const FREEZE_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug)]
struct Hierarchy {
    /// Controllers mounted together (`cpu` and `cpuacct` are often one `cpu,cpuacct` mount behind two symlinks).
    names: Vec<&'static str>,
    mount: PathBuf,
}

#[derive(Debug)]
pub(crate) struct V1Manager {
    rel: PathBuf,
    hierarchies: Vec<Hierarchy>,
}

impl V1Manager {
    pub(crate) fn new(root: &Path, rel: PathBuf) -> Result<Self, CgroupError> {
        let mut hierarchies: Vec<(PathBuf, Hierarchy)> = Vec::new();
        for name in HIERARCHIES {
            let mount = root.join(name);
            if !mount.is_dir() {
                continue;
            }
            let canonical = std::fs::canonicalize(&mount).map_err(|source| CgroupError::Read {
                path: mount.clone(),
                source,
            })?;
            match hierarchies.iter_mut().find(|(c, _)| *c == canonical) {
                Some((_, h)) => h.names.push(name),
                None => hierarchies.push((
                    canonical,
                    Hierarchy {
                        names: vec![name],
                        mount,
                    },
                )),
            }
        }
        if hierarchies.is_empty() {
            return Err(CgroupError::NoCgroupFs {
                root: root.to_path_buf(),
            });
        }
        Ok(Self {
            rel,
            hierarchies: hierarchies.into_iter().map(|(_, h)| h).collect(),
        })
    }

    /// The container's directory in the hierarchy holding `controller`.
    fn dir(&self, controller: &str) -> Option<PathBuf> {
        self.hierarchies
            .iter()
            .find(|h| h.names.contains(&controller))
            .map(|h| h.mount.join(&self.rel))
    }

    fn require_dir(&self, controller: &str) -> Result<PathBuf, CgroupError> {
        self.dir(controller)
            .ok_or_else(|| CgroupError::MissingController {
                controller: controller.to_string(),
                path: self.rel.clone(),
            })
    }

    fn exists(&self) -> bool {
        self.hierarchies
            .iter()
            .any(|h| h.mount.join(&self.rel).is_dir())
    }

    /// v1 cpusets start empty and refuse tasks (`ENOSPC`) until `cpuset.cpus` and `cpuset.mems` are set, in every
    /// level: copy them down from the parent where empty (runc `cpuset.go` `ensureParent`/`copyIfNeeded`).
    fn populate_cpusets(&self) -> Result<(), CgroupError> {
        let Some(h) = self
            .hierarchies
            .iter()
            .find(|h| h.names.contains(&"cpuset"))
        else {
            return Ok(());
        };
        let mut parent = h.mount.clone();
        for component in self.rel.components() {
            let dir = parent.join(component);
            for file in ["cpuset.cpus", "cpuset.mems"] {
                let Some(current) = fs::read_optional(&dir.join(file))? else {
                    continue;
                };
                if current.trim().is_empty() {
                    let from_parent = fs::read(&parent.join(file))?;
                    fs::write(&dir.join(file), from_parent.trim())?;
                }
            }
            parent = dir;
        }
        Ok(())
    }

    /// Hierarchical accounting must be on before a memcg has children (the kernel refuses the switch after); it
    /// is always 1 since Linux 5.11, older kernels inherit the parent's value. Best effort: log when refused.
    fn enable_memory_hierarchy(dir: &Path) {
        let file = dir.join("memory.use_hierarchy");
        if let Ok(Some(v)) = fs::read_optional(&file) {
            if v.trim() == "0" {
                if let Err(e) = fs::write(&file, "1") {
                    tracing::warn!(error = %e, "cannot enable memory.use_hierarchy");
                }
            }
        }
    }

    fn freezer_state(&self, file: &Path) -> Result<String, CgroupError> {
        Ok(fs::read(file)?.trim().to_string())
    }
}

impl CgroupManager for V1Manager {
    fn create(&self) -> Result<(), CgroupError> {
        let mut created = Vec::new();
        for h in &self.hierarchies {
            let after_mkdir: &dyn Fn(&Path) = if h.names.contains(&"memory") {
                &Self::enable_memory_hierarchy
            } else {
                &|_| {}
            };
            match fs::create_path(&h.mount, &self.rel, after_mkdir) {
                Ok(dirs) => created.extend(dirs),
                Err(e) => {
                    fs::remove_created(&created);
                    return Err(e);
                }
            }
        }
        if let Err(e) = self.populate_cpusets() {
            fs::remove_created(&created);
            return Err(e);
        }
        tracing::debug!(cgroup = %self.rel.display(), created = created.len(), "created v1 cgroup");
        Ok(())
    }

    fn add_task(&self, pid: Pid) -> Result<(), CgroupError> {
        for h in &self.hierarchies {
            fs::write(
                &h.mount.join(&self.rel).join("cgroup.procs"),
                &pid.to_string(),
            )?;
        }
        Ok(())
    }

    fn apply(&self, resources: &LinuxResources) -> Result<(), CgroupError> {
        let memsw_file = self
            .dir("memory")
            .map(|d| d.join("memory.memsw.limit_in_bytes"));
        let memsw = memsw_file.as_ref().is_some_and(|f| f.exists());
        let current_memsw = match memsw_file.as_deref().filter(|_| memsw) {
            Some(f) => read_u64(f)?.map(|v| if v >= (1 << 62) { -1 } else { v as i64 }),
            None => None,
        };
        let writes = plan::plan(
            resources,
            Target::V1 {
                memsw,
                current_memsw,
            },
            &self.rel,
        )?;
        // Resolve and check every file before the first write, so a missing controller changes nothing.
        let mut resolved = Vec::with_capacity(writes.len());
        for FileWrite {
            controller,
            file,
            value,
        } in writes
        {
            let path = self.require_dir(controller)?.join(&file);
            if !path.exists() {
                return Err(CgroupError::MissingFile { path });
            }
            resolved.push((path, value));
        }
        for (path, value) in &resolved {
            fs::write(path, value)?;
        }
        Ok(())
    }

    fn stats(&self) -> Result<CgroupStats, CgroupError> {
        if !self.exists() {
            return Err(CgroupError::NotFound {
                path: self.rel.clone(),
            });
        }
        let mut stats = CgroupStats::default();
        if let Some(dir) = self.dir("cpuacct") {
            stats.cpu_usage_ns = read_u64(&dir.join("cpuacct.usage"))?.unwrap_or(0);
            stats.cpu_user_ns = read_u64(&dir.join("cpuacct.usage_user"))?;
            stats.cpu_system_ns = read_u64(&dir.join("cpuacct.usage_sys"))?;
        }
        if let Some(dir) = self.dir("cpu") {
            let path = dir.join("cpu.stat");
            let content = read_keyed(&path)?;
            stats.cpu_periods = fs::keyed_value(&path, &content, "nr_periods")?.unwrap_or(0);
            stats.cpu_throttled_periods =
                fs::keyed_value(&path, &content, "nr_throttled")?.unwrap_or(0);
            stats.cpu_throttled_ns =
                fs::keyed_value(&path, &content, "throttled_time")?.unwrap_or(0);
        }
        if let Some(dir) = self.dir("memory") {
            stats.memory_usage_bytes = read_u64(&dir.join("memory.usage_in_bytes"))?.unwrap_or(0);
            stats.memory_limit_bytes = v1_limit(read_u64(&dir.join("memory.limit_in_bytes"))?);
            let path = dir.join("memory.stat");
            let content = read_keyed(&path)?;
            // `total_*` include child cgroups (cadvisor uses them for v1).
            let inactive_file =
                fs::keyed_value(&path, &content, "total_inactive_file")?.unwrap_or(0);
            stats.memory_working_set_bytes = stats.memory_usage_bytes.saturating_sub(inactive_file);
            stats.memory_rss_bytes = fs::keyed_value(&path, &content, "total_rss")?.unwrap_or(0);
            stats.memory_cache_bytes =
                fs::keyed_value(&path, &content, "total_cache")?.unwrap_or(0);
            let path = dir.join("memory.oom_control");
            stats.oom_kill_count = fs::keyed_value(&path, &read_keyed(&path)?, "oom_kill")?;
        }
        if let Some(dir) = self.dir("pids") {
            stats.pids_current = read_u64(&dir.join("pids.current"))?.unwrap_or(0);
            stats.pids_limit = read_u64(&dir.join("pids.max"))?;
        }
        Ok(stats)
    }

    fn oom_killed(&self) -> Result<bool, CgroupError> {
        let Some(dir) = self.dir("memory") else {
            return Ok(false);
        };
        if !dir.is_dir() {
            return Err(CgroupError::NotFound { path: dir });
        }
        let path = dir.join("memory.oom_control");
        // `oom_kill` exists since Linux 4.13; before that `memory.failcnt` (times the limit was hit) is the best
        // signal there is, and it may also count hits that reclaim resolved.
        match fs::keyed_value(&path, &read_keyed(&path)?, "oom_kill")? {
            Some(kills) => Ok(kills > 0),
            None => Ok(read_u64(&dir.join("memory.failcnt"))?.unwrap_or(0) > 0),
        }
    }

    fn pids(&self) -> Result<Vec<Pid>, CgroupError> {
        // Any hierarchy holds the same processes; prefer the ones every container is sure to have joined.
        let dir = [
            "pids", "freezer", "memory", "cpu", "cpuacct", "cpuset", "devices", "blkio", "systemd",
        ]
        .iter()
        .filter_map(|c| self.dir(c))
        .find(|d| d.is_dir())
        .ok_or_else(|| CgroupError::NotFound {
            path: self.rel.clone(),
        })?;
        fs::procs_recursive(&dir)
    }

    fn freeze(&self, frozen: bool) -> Result<(), CgroupError> {
        let file = self.require_dir("freezer")?.join("freezer.state");
        let want = if frozen { "FROZEN" } else { "THAWED" };
        fs::write(&file, want)?;
        // Freezing passes through FREEZING until every task stopped (kernel freezer-subsystem.rst).
        let deadline = Instant::now() + FREEZE_TIMEOUT;
        let mut delay = Duration::from_millis(1);
        loop {
            if self.freezer_state(&file)? == want {
                return Ok(());
            }
            if Instant::now() >= deadline {
                if frozen {
                    // Do not leave the container half-frozen.
                    if let Err(e) = fs::write(&file, "THAWED") {
                        tracing::warn!(error = %e, "cannot thaw after a failed freeze");
                    }
                }
                return Err(CgroupError::FreezeTimeout {
                    path: file,
                    state: want,
                    timeout: FREEZE_TIMEOUT,
                });
            }
            // Re-writing the state nudges tasks that were in an uninterruptible sleep (runc does the same).
            std::thread::sleep(delay);
            delay = (delay * 2).min(Duration::from_millis(50));
            fs::write(&file, want)?;
        }
    }

    fn destroy(&self) -> Result<(), CgroupError> {
        let errors: Vec<CgroupError> = self
            .hierarchies
            .iter()
            .flat_map(|h| fs::remove_path(&h.mount, &self.rel))
            .collect();
        if errors.is_empty() {
            tracing::debug!(cgroup = %self.rel.display(), "destroyed v1 cgroup");
            Ok(())
        } else {
            Err(CgroupError::Destroy {
                path: self.rel.clone(),
                errors,
            })
        }
    }
}
