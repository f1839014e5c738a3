//! An in-memory [`CgroupManager`] so the container lifecycle and the kubelet can be tested without root.

use std::sync::{Arc, Mutex, MutexGuard};

use nix::unistd::Pid;
use oci_spec::runtime::LinuxResources;

use super::{CgroupError, CgroupManager, CgroupStats};

/// What a [`FakeCgroupManager`] was asked to do, and what it will answer.
#[derive(Debug, Default, Clone)]
pub struct FakeCgroupState {
    pub created: bool,
    pub destroyed: bool,
    pub tasks: Vec<Pid>,
    pub applied: Vec<LinuxResources>,
    pub frozen: bool,
    /// Returned by `stats`.
    pub stats: CgroupStats,
    /// Returned by `oom_killed`.
    pub oom_killed: bool,
}

/// Records calls in shared state (clone the handle to inspect it after boxing the manager).
#[derive(Debug, Default, Clone)]
pub struct FakeCgroupManager {
    state: Arc<Mutex<FakeCgroupState>>,
}

impl FakeCgroupManager {
    pub fn new() -> Self {
        Self::default()
    }

    /// The recorded state; tests may also change the answers through it.
    pub fn state(&self) -> MutexGuard<'_, FakeCgroupState> {
        // A poisoned lock only means another test thread panicked; the data is still what it recorded.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn not_found(&self) -> CgroupError {
        CgroupError::NotFound {
            path: "fake".into(),
        }
    }
}

impl CgroupManager for FakeCgroupManager {
    fn create(&self) -> Result<(), CgroupError> {
        let mut s = self.state();
        s.created = true;
        s.destroyed = false;
        Ok(())
    }

    fn add_task(&self, pid: Pid) -> Result<(), CgroupError> {
        let mut s = self.state();
        if !s.created {
            return Err(self.not_found());
        }
        s.tasks.push(pid);
        Ok(())
    }

    fn apply(&self, resources: &LinuxResources) -> Result<(), CgroupError> {
        self.state().applied.push(resources.clone());
        Ok(())
    }

    fn stats(&self) -> Result<CgroupStats, CgroupError> {
        Ok(self.state().stats.clone())
    }

    fn oom_killed(&self) -> Result<bool, CgroupError> {
        Ok(self.state().oom_killed)
    }

    fn pids(&self) -> Result<Vec<Pid>, CgroupError> {
        Ok(self.state().tasks.clone())
    }

    fn freeze(&self, frozen: bool) -> Result<(), CgroupError> {
        self.state().frozen = frozen;
        Ok(())
    }

    fn destroy(&self) -> Result<(), CgroupError> {
        let mut s = self.state();
        s.destroyed = true;
        s.created = false;
        s.tasks.clear();
        Ok(())
    }
}
