//! cgroup v2: one unified tree (`<root>/<path>`), controllers enabled top-down through `cgroup.subtree_control`.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::unistd::Pid;
use oci_spec::runtime::LinuxResources;

use super::plan::{self, FileWrite, Target};
use super::stats::{read_keyed, read_u64};
use super::{fs, CgroupError, CgroupManager, CgroupStats};

/// Controllers a container's cgroup gets when the parent offers them (runc enables all available ones).
const CONTROLLERS: &[&str] = &[
    "cpuset", "cpu", "io", "memory", "pids", "hugetlb", "misc", "rdma",
];

const FREEZE_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug)]
pub(crate) struct V2Manager {
    root: PathBuf,
    rel: PathBuf,
    dir: PathBuf,
}

impl V2Manager {
    pub(crate) fn new(root: &Path, rel: PathBuf) -> Self {
        Self {
            root: root.to_path_buf(),
            dir: root.join(&rel),
            rel,
        }
    }

    /// Enables every wanted controller that `dir` offers in its `cgroup.subtree_control`, so its children get them.
    fn enable_controllers(dir: &Path) -> Result<(), CgroupError> {
        // A directory we just made on a test fixture has no control files; on cgroupfs they always exist.
        let Some(available) = fs::read_optional(&dir.join("cgroup.controllers"))? else {
            return Ok(());
        };
        let subtree = dir.join("cgroup.subtree_control");
        let enabled = fs::read_optional(&subtree)?.unwrap_or_default();
        let missing: Vec<String> = available
            .split_whitespace()
            .filter(|c| CONTROLLERS.contains(c))
            .filter(|c| !enabled.split_whitespace().any(|e| e == *c))
            .map(|c| format!("+{c}"))
            .collect();
        if missing.is_empty() {
            return Ok(());
        }
        if fs::write(&subtree, &missing.join(" ")).is_ok() {
            return Ok(());
        }
        // Like runc (`fs2/create.go` `CreateCgroupPath`): one by one, keeping what works. A controller that stays
        // off makes a later `apply` that needs it fail with `MissingController`. EBUSY here means the level has
        // processes of its own (v2's "no internal processes" rule).
        for controller in &missing {
            if let Err(e) = fs::write(&subtree, controller) {
                tracing::warn!(error = %e, "cannot enable a cgroup v2 controller for children");
            }
        }
        Ok(())
    }

    fn controller_enabled(&self, controller: &str) -> bool {
        fs::read_optional(&self.dir.join("cgroup.controllers"))
            .ok()
            .flatten()
            .is_some_and(|c| c.split_whitespace().any(|e| e == controller))
    }

    fn require_exists(&self) -> Result<(), CgroupError> {
        if self.dir.is_dir() {
            Ok(())
        } else {
            Err(CgroupError::NotFound {
                path: self.dir.clone(),
            })
        }
    }

    fn frozen(&self) -> Result<bool, CgroupError> {
        let path = self.dir.join("cgroup.events");
        Ok(fs::keyed_value(&path, &fs::read(&path)?, "frozen")? == Some(1))
    }
}

impl CgroupManager for V2Manager {
    fn create(&self) -> Result<(), CgroupError> {
        let created = fs::create_path(&self.root, &self.rel, &|_| {})?;
        // Top-down: a level can only offer its children what its own parent enabled for it.
        let mut level = self.root.clone();
        let mut levels = vec![level.clone()];
        let parents = self
            .rel
            .parent()
            .map(|p| p.components().collect::<Vec<_>>())
            .unwrap_or_default();
        for component in parents {
            level.push(component);
            levels.push(level.clone());
        }
        for dir in levels {
            if let Err(e) = Self::enable_controllers(&dir) {
                fs::remove_created(&created);
                return Err(e);
            }
        }
        tracing::debug!(cgroup = %self.dir.display(), created = created.len(), "created v2 cgroup");
        Ok(())
    }

    fn add_task(&self, pid: Pid) -> Result<(), CgroupError> {
        fs::write(&self.dir.join("cgroup.procs"), &pid.to_string())
    }

    fn apply(&self, resources: &LinuxResources) -> Result<(), CgroupError> {
        let mut writes = plan::plan(resources, Target::V2, &self.dir)?;
        // Without swap accounting there is no memory.swap.max; "no swap" and "unlimited swap" then need no write
        // (runc `fs2/memory.go` ignores exactly these two values the same way).
        writes.retain(|w| {
            !(w.file == "memory.swap.max"
                && (w.value == "0" || w.value == "max")
                && !self.dir.join(&w.file).exists())
        });
        // Check every file before the first write, so a controller that is not enabled changes nothing.
        for FileWrite {
            controller, file, ..
        } in &writes
        {
            let path = self.dir.join(file);
            if path.exists() {
                continue;
            }
            if *controller != "cgroup" && !self.controller_enabled(controller) {
                return Err(CgroupError::MissingController {
                    controller: controller.to_string(),
                    path: self.dir.clone(),
                });
            }
            return Err(CgroupError::MissingFile { path });
        }
        for FileWrite { file, value, .. } in &writes {
            fs::write(&self.dir.join(file), value)?;
        }
        Ok(())
    }

    fn stats(&self) -> Result<CgroupStats, CgroupError> {
        self.require_exists()?;
        let mut stats = CgroupStats::default();
        let path = self.dir.join("cpu.stat");
        let content = read_keyed(&path)?;
        let usec = |key| -> Result<Option<u64>, CgroupError> {
            Ok(fs::keyed_value(&path, &content, key)?.map(|us| us.saturating_mul(1000)))
        };
        stats.cpu_usage_ns = usec("usage_usec")?.unwrap_or(0);
        stats.cpu_user_ns = usec("user_usec")?;
        stats.cpu_system_ns = usec("system_usec")?;
        stats.cpu_throttled_ns = usec("throttled_usec")?.unwrap_or(0);
        stats.cpu_periods = fs::keyed_value(&path, &content, "nr_periods")?.unwrap_or(0);
        stats.cpu_throttled_periods =
            fs::keyed_value(&path, &content, "nr_throttled")?.unwrap_or(0);

        stats.memory_usage_bytes = read_u64(&self.dir.join("memory.current"))?.unwrap_or(0);
        stats.memory_limit_bytes = read_u64(&self.dir.join("memory.max"))?;
        let path = self.dir.join("memory.stat");
        let content = read_keyed(&path)?;
        // v2 memory.stat is already hierarchical.
        let inactive_file = fs::keyed_value(&path, &content, "inactive_file")?.unwrap_or(0);
        stats.memory_working_set_bytes = stats.memory_usage_bytes.saturating_sub(inactive_file);
        stats.memory_rss_bytes = fs::keyed_value(&path, &content, "anon")?.unwrap_or(0);
        stats.memory_cache_bytes = fs::keyed_value(&path, &content, "file")?.unwrap_or(0);
        let path = self.dir.join("memory.events");
        stats.oom_kill_count = fs::keyed_value(&path, &read_keyed(&path)?, "oom_kill")?;

        stats.pids_current = read_u64(&self.dir.join("pids.current"))?.unwrap_or(0);
        stats.pids_limit = read_u64(&self.dir.join("pids.max"))?;
        Ok(stats)
    }

    fn oom_killed(&self) -> Result<bool, CgroupError> {
        self.require_exists()?;
        let path = self.dir.join("memory.events");
        Ok(fs::keyed_value(&path, &read_keyed(&path)?, "oom_kill")?.unwrap_or(0) > 0)
    }

    fn pids(&self) -> Result<Vec<Pid>, CgroupError> {
        fs::procs_recursive(&self.dir)
    }

    fn freeze(&self, frozen: bool) -> Result<(), CgroupError> {
        let file = self.dir.join("cgroup.freeze");
        if !file.exists() {
            // cgroup.freeze exists since Linux 5.2.
            self.require_exists()?;
            return Err(CgroupError::MissingFile { path: file });
        }
        fs::write(&file, if frozen { "1" } else { "0" })?;
        // `cgroup.events` says `frozen 1` once every task stopped (kernel cgroup-v2.rst "cgroup.freeze").
        let deadline = Instant::now() + FREEZE_TIMEOUT;
        let mut delay = Duration::from_millis(1);
        while self.frozen()? != frozen {
            if Instant::now() >= deadline {
                if frozen {
                    if let Err(e) = fs::write(&file, "0") {
                        tracing::warn!(error = %e, "cannot thaw after a failed freeze");
                    }
                }
                return Err(CgroupError::FreezeTimeout {
                    path: self.dir.join("cgroup.events"),
                    state: if frozen { "frozen" } else { "thawed" },
                    timeout: FREEZE_TIMEOUT,
                });
            }
            std::thread::sleep(delay);
            delay = (delay * 2).min(Duration::from_millis(50));
        }
        Ok(())
    }

    fn destroy(&self) -> Result<(), CgroupError> {
        let errors = fs::remove_path(&self.root, &self.rel);
        if errors.is_empty() {
            tracing::debug!(cgroup = %self.dir.display(), "destroyed v2 cgroup");
            Ok(())
        } else {
            Err(CgroupError::Destroy {
                path: self.dir.clone(),
                errors,
            })
        }
    }
}
