//! On-disk state: one directory per container under the runtime root, holding `state.json`, the `exec.fifo` while
//! the container is created but not started, a copy of its config, its exit status, and a `lock` file.

use std::collections::HashMap;
use std::fs;
use std::io;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::unistd::Pid;
use serde::{Deserialize, Serialize};

use super::ContainerError;

pub(crate) const STATE_FILE: &str = "state.json";
pub(crate) const FIFO_FILE: &str = "exec.fifo";
pub(crate) const CONFIG_COPY: &str = "config.json";
pub(crate) const EXIT_FILE: &str = "exit.json";
pub(crate) const PAUSED_FILE: &str = "paused";
const LOCK_FILE: &str = "lock";

/// A container's lifecycle status. Ref: OCI runtime spec runtime.md#state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Creating,
    Created,
    Running,
    /// Frozen by `pause` (runc's extra status; the OCI spec has no pause operation).
    Paused,
    Stopped,
}

impl std::fmt::Display for Status {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.pad(match self {
            Self::Creating => "creating",
            Self::Created => "created",
            Self::Running => "running",
            Self::Paused => "paused",
            Self::Stopped => "stopped",
        })
    }
}

/// The OCI state of a container as `state` prints it (runc's extra fields included).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct State {
    #[serde(rename = "ociVersion")]
    pub oci_version: String,
    pub id: String,
    pub pid: i32,
    pub status: Status,
    pub bundle: PathBuf,
    pub rootfs: PathBuf,
    pub created: String,
    pub owner: String,
    #[serde(default, skip_serializing_if = "HashMap::is_empty")]
    pub annotations: HashMap<String, String>,
}

/// How a container's init ended, written by whoever reaped it (a foreground `run` or a sandbox's log shim).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExitStatus {
    /// The exit code, or 128 + the signal number when killed by a signal (shell convention, as runc reports).
    pub code: i32,
    #[serde(default)]
    pub signal: Option<i32>,
    #[serde(default)]
    pub oom_killed: bool,
    pub finished_at: String,
}

/// What `state.json` holds.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct Record {
    pub(crate) id: String,
    pub(crate) bundle: PathBuf,
    pub(crate) rootfs: PathBuf,
    pub(crate) pid: i32,
    /// Start time of `pid` in clock ticks since boot (/proc/<pid>/stat field 22), to detect PID reuse.
    pub(crate) pid_start: u64,
    pub(crate) created: String,
    pub(crate) owner: String,
    pub(crate) annotations: HashMap<String, String>,
    pub(crate) cgroup_root: PathBuf,
    pub(crate) cgroups_path: PathBuf,
    /// The container has its own PID namespace (so killing its init kills everything in it).
    pub(crate) own_pid_ns: bool,
    pub(crate) creating: bool,
}

pub(crate) fn now_rfc3339() -> String {
    chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Nanos, true)
}

/// Start time and state letter of a process, or None if it does not exist.
pub(crate) fn proc_stat(pid: i32) -> Option<(u64, char)> {
    let text = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may contain spaces and parentheses; fields resume after the last ')'.
    let rest = &text[text.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let state = fields.first()?.chars().next()?;
    let start = fields.get(19)?.parse().ok()?;
    Some((start, state))
}

/// Whether `pid` is still the process we started (and not a zombie).
pub(crate) fn alive(pid: i32, start: u64) -> bool {
    pid > 0 && matches!(proc_stat(pid), Some((s, st)) if s == start && st != 'Z' && st != 'X')
}

/// A container's state directory.
#[derive(Debug, Clone)]
pub(crate) struct StateDir {
    pub(crate) dir: PathBuf,
}

impl StateDir {
    pub(crate) fn new(root: &Path, id: &str) -> Self {
        Self { dir: root.join(id) }
    }

    pub(crate) fn path(&self, file: &str) -> PathBuf {
        self.dir.join(file)
    }

    pub(crate) fn exists(&self) -> bool {
        self.dir.is_dir()
    }

    /// Creates the directory; an existing one means the ID is taken.
    pub(crate) fn create(root: &Path, id: &str) -> Result<Self, ContainerError> {
        fs::create_dir_all(root).map_err(|source| ContainerError::Io {
            path: root.to_path_buf(),
            source,
        })?;
        let me = Self::new(root, id);
        match fs::create_dir(&me.dir) {
            Ok(()) => Ok(me),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                Err(ContainerError::Exists(id.to_string()))
            }
            Err(source) => Err(ContainerError::Io {
                path: me.dir.clone(),
                source,
            }),
        }
    }

    /// Takes the container's lock: a POSIX record lock, which (unlike flock) a forked child does not inherit, so a
    /// created container's init never holds it. Waits up to `wait` for another runtime call to finish.
    pub(crate) fn lock(&self, id: &str, wait: Duration) -> Result<Lock, ContainerError> {
        let path = self.path(LOCK_FILE);
        let file = fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(|source| {
                if source.kind() == io::ErrorKind::NotFound {
                    ContainerError::NotFound(id.to_string())
                } else {
                    ContainerError::Io {
                        path: path.clone(),
                        source,
                    }
                }
            })?;
        let deadline = Instant::now() + wait;
        // POSIX locks exclude processes, not threads: a process-wide set does that for threads of a library user.
        loop {
            let mut held = HELD.lock().unwrap_or_else(|e| e.into_inner());
            if held.insert(path.clone()) {
                break;
            }
            drop(held);
            if Instant::now() >= deadline {
                return Err(ContainerError::Busy(id.to_string()));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let held = HeldPath(path.clone());
        loop {
            let fl = libc::flock {
                l_type: libc::F_WRLCK as libc::c_short,
                l_whence: libc::SEEK_SET as libc::c_short,
                l_start: 0,
                l_len: 0,
                l_pid: 0,
            };
            // SAFETY: F_SETLK with a valid flock struct on an fd we own.
            let rc = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_SETLK, &fl) };
            if rc == 0 {
                return Ok(Lock {
                    _file: file,
                    _held: held,
                });
            }
            if Instant::now() >= deadline {
                return Err(ContainerError::Busy(id.to_string()));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    pub(crate) fn write_record(&self, rec: &Record) -> Result<(), ContainerError> {
        write_json_atomic(&self.path(STATE_FILE), rec)
    }

    pub(crate) fn read_record(&self, id: &str) -> Result<Record, ContainerError> {
        let path = self.path(STATE_FILE);
        let text = fs::read_to_string(&path).map_err(|source| {
            if source.kind() == io::ErrorKind::NotFound {
                ContainerError::NotFound(id.to_string())
            } else {
                ContainerError::Io {
                    path: path.clone(),
                    source,
                }
            }
        })?;
        serde_json::from_str(&text).map_err(|source| ContainerError::Corrupt { path, source })
    }

    pub(crate) fn status(&self, rec: &Record) -> Status {
        if rec.creating {
            return if rec.pid > 0 && !alive(rec.pid, rec.pid_start) {
                Status::Stopped
            } else {
                Status::Creating
            };
        }
        if !alive(rec.pid, rec.pid_start) {
            Status::Stopped
        } else if self.path(FIFO_FILE).exists() {
            Status::Created
        } else if self.path(PAUSED_FILE).exists() {
            Status::Paused
        } else {
            Status::Running
        }
    }

    pub(crate) fn exit_status(&self) -> Option<ExitStatus> {
        let text = fs::read_to_string(self.path(EXIT_FILE)).ok()?;
        serde_json::from_str(&text).ok()
    }

    pub(crate) fn write_exit_status(&self, st: &ExitStatus) -> Result<(), ContainerError> {
        write_json_atomic(&self.path(EXIT_FILE), st)
    }
}

/// Held while a runtime call works on a container; released on drop (closing the file).
#[derive(Debug)]
pub(crate) struct Lock {
    _file: fs::File,
    _held: HeldPath,
}

static HELD: std::sync::Mutex<std::collections::BTreeSet<PathBuf>> =
    std::sync::Mutex::new(std::collections::BTreeSet::new());

#[derive(Debug)]
struct HeldPath(PathBuf);

impl Drop for HeldPath {
    fn drop(&mut self) {
        HELD.lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&self.0);
    }
}

pub(crate) fn write_json_atomic<T: Serialize>(
    path: &Path,
    value: &T,
) -> Result<(), ContainerError> {
    let tmp = path.with_extension("tmp");
    let text = serde_json::to_vec_pretty(value).map_err(|source| ContainerError::Corrupt {
        path: path.to_path_buf(),
        source,
    })?;
    fs::write(&tmp, text).map_err(|source| ContainerError::Io {
        path: tmp.clone(),
        source,
    })?;
    fs::rename(&tmp, path).map_err(|source| ContainerError::Io {
        path: path.to_path_buf(),
        source,
    })
}

/// Reaps `pid` if it is our child and has exited; true once it no longer runs.
pub(crate) fn reap_if_child(pid: i32) {
    use nix::sys::wait::{waitpid, WaitPidFlag};
    let _ = waitpid(Pid::from_raw(pid), Some(WaitPidFlag::WNOHANG));
}
