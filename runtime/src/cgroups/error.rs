//! The one error type of the cgroup module: every variant names the file or directory that failed.

use std::io;
use std::path::PathBuf;
use std::time::Duration;

/// What went wrong while managing a container's cgroup.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CgroupError {
    /// `cgroup_root` holds neither a cgroup v2 root (`cgroup.controllers`) nor v1 controller hierarchies.
    #[error("no cgroup filesystem at {root}: neither cgroup.controllers (v2) nor v1 controller directories")]
    NoCgroupFs { root: PathBuf },

    /// The OCI `cgroupsPath` cannot be used (empty, `..`, not valid UTF-8 ...).
    #[error("invalid cgroups path {path:?}: {reason}")]
    InvalidPath { path: PathBuf, reason: &'static str },

    /// The container's cgroup does not exist (never created, or already destroyed).
    #[error("cgroup {path} does not exist")]
    NotFound { path: PathBuf },

    #[error("cannot create cgroup directory {path}: {source}")]
    Create { path: PathBuf, source: io::Error },

    #[error("cannot read {path}: {source}")]
    Read { path: PathBuf, source: io::Error },

    #[error("cannot write {value:?} to {path}: {source}")]
    Write {
        path: PathBuf,
        value: String,
        source: io::Error,
    },

    #[error("cannot parse {path}: {reason}")]
    Parse { path: PathBuf, reason: String },

    /// The OCI resources are invalid; nothing was written.
    #[error("invalid resources for cgroup {path}: {reason}")]
    InvalidResources { path: PathBuf, reason: String },

    /// The resources need a controller that is not mounted (v1) or not enabled (v2).
    #[error(
        "the {controller} controller is not available for cgroup {path}, but the resources need it"
    )]
    MissingController { controller: String, path: PathBuf },

    /// A control file the resources need does not exist (kernel feature missing, controller not enabled).
    #[error("control file {path} does not exist (the kernel lacks this feature or the controller is not enabled)")]
    MissingFile { path: PathBuf },

    #[error("timed out after {timeout:?} waiting for {path} to become {state}")]
    FreezeTimeout {
        path: PathBuf,
        state: &'static str,
        timeout: Duration,
    },

    #[error("cannot remove cgroup directory {path}: {source}")]
    Remove { path: PathBuf, source: io::Error },

    /// Teardown goes on after a failure; this carries every failure it met.
    #[error("destroying cgroup {path} failed: {}", join_errors(.errors))]
    Destroy {
        path: PathBuf,
        errors: Vec<CgroupError>,
    },
}

fn join_errors(errors: &[CgroupError]) -> String {
    errors
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("; ")
}
