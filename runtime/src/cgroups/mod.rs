//! PLACEHOLDER cgroup manager so the container code builds and its tests run; the `cgroups` branch replaces this
//! file with the real v1/v2 managers behind the same trait and factory.
//!
//! It creates the cgroup directory in each v1 hierarchy (or the one v2 directory), moves tasks in, applies the
//! memory, pids and cpu limits, and removes the directories (and the empty parents it created) again.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use nix::unistd::Pid;
use oci_spec::runtime::LinuxResources;

#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    #[error("cgroup {path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("cgroup path {0} must be absolute and stay inside the cgroup root")]
    BadPath(PathBuf),
}

/// Usage figures for the kubelet.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CgroupStats {
    pub cpu_usage_ns: u64,
    pub memory_usage_bytes: u64,
    pub memory_working_set_bytes: u64,
    pub pids: u64,
}

pub trait CgroupManager: Send + Sync + std::fmt::Debug {
    fn create(&self) -> Result<(), CgroupError>;
    fn add_task(&self, pid: Pid) -> Result<(), CgroupError>;
    fn apply(&self, resources: &LinuxResources) -> Result<(), CgroupError>;
    fn stats(&self) -> Result<CgroupStats, CgroupError>;
    fn oom_killed(&self) -> Result<bool, CgroupError>;
    fn pids(&self) -> Result<Vec<Pid>, CgroupError>;
    fn freeze(&self, frozen: bool) -> Result<(), CgroupError>;
    fn destroy(&self) -> Result<(), CgroupError>;
}

pub fn create_manager(
    cgroup_root: &Path,
    cgroups_path: &Path,
) -> Result<Box<dyn CgroupManager>, CgroupError> {
    let rel = cgroups_path
        .strip_prefix("/")
        .map_err(|_| CgroupError::BadPath(cgroups_path.to_path_buf()))?;
    if rel.as_os_str().is_empty()
        || rel
            .components()
            .any(|c| !matches!(c, std::path::Component::Normal(_)))
    {
        return Err(CgroupError::BadPath(cgroups_path.to_path_buf()));
    }
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| CgroupError::Io { path, source }
    };
    let mut hierarchies = Vec::new();
    if cgroup_root.join("cgroup.controllers").exists() {
        hierarchies.push(cgroup_root.to_path_buf());
    } else {
        for entry in fs::read_dir(cgroup_root).map_err(io(cgroup_root))? {
            let entry = entry.map_err(io(cgroup_root))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            let is_dir = entry.file_type().map(|t| t.is_dir()).unwrap_or(false);
            // cpuset needs cpus/mems copied into each new level; the real manager handles it.
            if is_dir && !matches!(name.as_str(), "cpuset" | "unified" | "systemd") {
                hierarchies.push(entry.path());
            }
        }
    }
    hierarchies.sort();
    Ok(Box::new(Placeholder {
        dirs: hierarchies
            .iter()
            .map(|h| (h.clone(), h.join(rel)))
            .collect(),
    }))
}

#[derive(Debug)]
struct Placeholder {
    /// (hierarchy root, cgroup dir) per hierarchy.
    dirs: Vec<(PathBuf, PathBuf)>,
}

impl Placeholder {
    fn write(dir: &Path, file: &str, value: &str) -> Result<bool, CgroupError> {
        let path = dir.join(file);
        if !path.exists() {
            return Ok(false);
        }
        fs::write(&path, value).map_err(|source| CgroupError::Io { path, source })?;
        Ok(true)
    }
}

impl CgroupManager for Placeholder {
    fn create(&self) -> Result<(), CgroupError> {
        for (_, dir) in &self.dirs {
            // A sibling's destroy may remove a shared empty parent while we create below it: retry.
            let mut attempt = 0;
            loop {
                match fs::create_dir_all(dir) {
                    Ok(()) => break,
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound && attempt < 10 => {
                        attempt += 1
                    }
                    Err(source) => {
                        return Err(CgroupError::Io {
                            path: dir.clone(),
                            source,
                        })
                    }
                }
            }
        }
        Ok(())
    }

    fn add_task(&self, pid: Pid) -> Result<(), CgroupError> {
        for (_, dir) in &self.dirs {
            Self::write(dir, "cgroup.procs", &pid.to_string())?;
        }
        Ok(())
    }

    fn apply(&self, r: &LinuxResources) -> Result<(), CgroupError> {
        for (_, dir) in &self.dirs {
            if let Some(limit) = r.memory().as_ref().and_then(|m| m.limit()) {
                if !Self::write(dir, "memory.limit_in_bytes", &limit.to_string())? {
                    Self::write(dir, "memory.max", &limit.to_string())?;
                }
            }
            if let Some(pids) = r.pids().as_ref().map(|p| p.limit()) {
                let v = if pids > 0 {
                    pids.to_string()
                } else {
                    "max".into()
                };
                Self::write(dir, "pids.max", &v)?;
            }
            if let Some(cpu) = r.cpu() {
                if let Some(p) = cpu.period() {
                    Self::write(dir, "cpu.cfs_period_us", &p.to_string())?;
                }
                if let Some(q) = cpu.quota() {
                    Self::write(dir, "cpu.cfs_quota_us", &q.to_string())?;
                }
                if let Some(s) = cpu.shares() {
                    Self::write(dir, "cpu.shares", &s.to_string())?;
                }
            }
        }
        Ok(())
    }

    fn stats(&self) -> Result<CgroupStats, CgroupError> {
        Ok(CgroupStats::default())
    }

    fn oom_killed(&self) -> Result<bool, CgroupError> {
        for (_, dir) in &self.dirs {
            let text = fs::read_to_string(dir.join("memory.oom_control"))
                .or_else(|_| fs::read_to_string(dir.join("memory.events")))
                .unwrap_or_default();
            if text
                .lines()
                .any(|l| l.starts_with("oom_kill ") && !l.ends_with(" 0"))
            {
                return Ok(true);
            }
        }
        Ok(false)
    }

    fn pids(&self) -> Result<Vec<Pid>, CgroupError> {
        let mut out = Vec::new();
        for (_, dir) in &self.dirs {
            if let Ok(text) = fs::read_to_string(dir.join("cgroup.procs")) {
                out.extend(
                    text.lines()
                        .filter_map(|l| l.trim().parse().ok())
                        .map(Pid::from_raw),
                );
            }
        }
        out.sort();
        out.dedup();
        Ok(out)
    }

    fn freeze(&self, frozen: bool) -> Result<(), CgroupError> {
        for (_, dir) in &self.dirs {
            Self::write(
                dir,
                "freezer.state",
                if frozen { "FROZEN" } else { "THAWED" },
            )?;
        }
        Ok(())
    }

    fn destroy(&self) -> Result<(), CgroupError> {
        let mut first_err = None;
        for (root, dir) in &self.dirs {
            if dir.exists() {
                if let Err(source) = fs::remove_dir(dir) {
                    first_err.get_or_insert(CgroupError::Io {
                        path: dir.clone(),
                        source,
                    });
                    continue;
                }
            }
            // Empty parents go too (rmdir refuses non-empty ones, so a sibling's parent stays).
            let mut d = dir.parent();
            while let Some(p) = d {
                if p == root.as_path() || !p.starts_with(root) || fs::remove_dir(p).is_err() {
                    break;
                }
                d = p.parent();
            }
        }
        first_err.map_or(Ok(()), Err)
    }
}
