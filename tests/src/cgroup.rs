//! A test-owned subtree of the host's cgroups, removed on drop (also when the test panics).
//!
//! Every test puts its cgroups under its own top directory `windlass-test-<unique>`, so parallel tests never share
//! a cgroup and a leftover is easy to attribute. The guard works on plain files, independent of the code under
//! test: on drop it thaws, SIGKILLs whatever still runs in the subtree (only processes the test put there), and
//! removes the directories deepest first in every hierarchy.

use std::fs;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Where the host mounts cgroups.
pub const CGROUP_ROOT: &str = "/sys/fs/cgroup";

pub struct CgroupTreeGuard {
    root: PathBuf,
    top: String,
}

impl CgroupTreeGuard {
    /// A fresh, not yet created, top directory name under [`CGROUP_ROOT`].
    pub fn new() -> Self {
        Self {
            root: PathBuf::from(CGROUP_ROOT),
            top: format!("windlass-test-{}", crate::unique_name("cg")),
        }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The name of the test's top directory (`windlass-test-<unique>`).
    pub fn top(&self) -> &str {
        &self.top
    }

    /// An OCI `cgroupsPath` inside the test's subtree, e.g. `cgroups_path("pod/ctr")`.
    pub fn cgroups_path(&self, rel: &str) -> PathBuf {
        PathBuf::from(format!("/{}/{rel}", self.top))
    }

    /// Every directory of the test's subtree that exists, in any hierarchy (v1 controllers, the `unified` mount,
    /// or the v2 root itself). Empty once everything was cleaned up.
    pub fn leftovers(&self) -> Vec<PathBuf> {
        let mut candidates = vec![self.root.join(&self.top)];
        if let Ok(entries) = fs::read_dir(&self.root) {
            candidates.extend(entries.flatten().map(|e| e.path().join(&self.top)));
        }
        let mut found: Vec<PathBuf> = Vec::new();
        for dir in candidates {
            // `cpu` and `cpuacct` may be symlinks to one `cpu,cpuacct` mount: report each real directory once.
            if let Ok(real) = fs::canonicalize(&dir) {
                if real.is_dir() && !found.contains(&real) {
                    found.push(real);
                }
            }
        }
        found
    }
}

impl Default for CgroupTreeGuard {
    fn default() -> Self {
        Self::new()
    }
}

fn tree_deepest_first(dir: &Path, out: &mut Vec<PathBuf>) {
    if let Ok(entries) = fs::read_dir(dir) {
        for entry in entries.flatten() {
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                tree_deepest_first(&entry.path(), out);
            }
        }
    }
    out.push(dir.to_path_buf());
}

impl Drop for CgroupTreeGuard {
    fn drop(&mut self) {
        let mut dirs = Vec::new();
        for top in self.leftovers() {
            tree_deepest_first(&top, &mut dirs);
        }
        if dirs.is_empty() {
            return;
        }
        // Frozen tasks cannot die: thaw first.
        for dir in &dirs {
            let _ = fs::write(dir.join("freezer.state"), "THAWED");
            let _ = fs::write(dir.join("cgroup.freeze"), "0");
        }
        for _ in 0..100 {
            let mut alive = false;
            for dir in &dirs {
                let procs = fs::read_to_string(dir.join("cgroup.procs")).unwrap_or_default();
                for pid in procs.lines().filter_map(|l| l.trim().parse::<i32>().ok()) {
                    alive = true;
                    // SAFETY: kill(2) has no memory-safety preconditions; the pid is in the test's own cgroup.
                    unsafe { libc::kill(pid, libc::SIGKILL) };
                }
            }
            if !alive {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        for dir in &dirs {
            for _ in 0..50 {
                if fs::remove_dir(dir).is_ok() || !dir.exists() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        let left = self.leftovers();
        if !left.is_empty() {
            eprintln!("CgroupTreeGuard: could not remove {left:?}");
        }
    }
}
