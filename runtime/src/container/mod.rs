//! The lifecycle of one OCI container as a library: create, start, state, kill, delete, list and exec, with the
//! state under a root directory so separate CLI invocations (or a restarted caller) find each container again.
//!
//! Ref: OCI runtime spec runtime.md (lifecycle and operations); runc where the spec is silent (the `exec.fifo`
//! that holds a created container before `start`, error messages, `delete` of a created container).

mod hooks;
mod init;
mod process;
mod rootfs;
mod state;
mod sync;
mod tty;

use std::fs;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::sched::CloneFlags;
use nix::sys::signal::{kill as send_signal, Signal};
use nix::sys::stat::Mode;
use nix::unistd::Pid;
use oci_spec::runtime::{LinuxNamespaceType, Process, Spec};

use crate::cgroups::{self, CgroupError, CgroupManager};
use crate::oci::{self, Bundle, Namespaces, OciError, SeccompProgram};
use state::{now_rfc3339, reap_if_child, Record, StateDir};
pub use state::{ExitStatus, State, Status};
pub use tty::{copy_window_size, proxy_terminal, RawTerminal};
// For the sandbox holder, which reuses the two-stage spawn.
pub(crate) use init::{close_fds_except, spawn, Joins};
pub(crate) use process::Failed;
pub(crate) use state::{alive, proc_stat};
pub(crate) use sync::{channel, Reporter};

/// How long a call waits for another call holding the same container's lock.
const LOCK_WAIT: Duration = Duration::from_secs(10);

/// Errors of container operations; the messages follow runc's where runc has one.
#[derive(Debug, thiserror::Error)]
pub enum ContainerError {
    #[error(transparent)]
    Oci(#[from] OciError),
    #[error("invalid container id format: {0:?}")]
    InvalidId(String),
    #[error("container with id exists: {0}")]
    Exists(String),
    #[error("container does not exist")]
    NotFound(String),
    #[error("container {0} is busy: another operation holds its lock")]
    Busy(String),
    #[error("container not running")]
    NotRunning(String),
    #[error("container {0} is already paused")]
    Paused(String),
    #[error("container not paused")]
    NotPaused(String),
    #[error("cannot start an already running container")]
    AlreadyRunning(String),
    #[error("cannot start a container that has stopped")]
    StartStopped(String),
    #[error("cannot delete container {id} that is not stopped: {status}")]
    NotStopped { id: String, status: Status },
    #[error("cannot allocate tty if runtime will detach without setting console socket")]
    NeedConsoleSocket,
    #[error("console socket {path}: {source}")]
    ConsoleSocket { path: PathBuf, source: io::Error },
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("{path} is corrupt: {source}")]
    Corrupt {
        path: PathBuf,
        source: serde_json::Error,
    },
    #[error("cgroup: {0}")]
    Cgroup(#[from] CgroupError),
    #[error("cgroup {} is already in use by other processes", .0.display())]
    CgroupInUse(PathBuf),
    #[error("{what}: {source}")]
    Sys {
        what: String,
        source: nix::errno::Errno,
    },
    #[error("container init failed: {0}")]
    Init(String),
    #[error("unknown signal {0:?}")]
    UnknownSignal(String),
    #[error("{0}")]
    Cleanup(String),
}

fn sys(what: impl Into<String>) -> impl FnOnce(nix::errno::Errno) -> ContainerError {
    let what = what.into();
    move |source| ContainerError::Sys { what, source }
}

/// Where the terminal of a `terminal: true` process goes.
#[derive(Debug, Default)]
pub enum Console {
    /// No terminal requested (or refused when one is).
    #[default]
    None,
    /// `--console-socket`: a unix socket path that receives the pty master, as with runc.
    Socket(PathBuf),
    /// An already connected socket (e.g. one end of a socketpair in a foreground `run`).
    Connected(UnixStream),
}

/// Options of [`Runtime::create`].
#[derive(Debug, Default)]
pub struct CreateOptions {
    pub pid_file: Option<PathBuf>,
    pub console: Console,
}

/// Options of [`Runtime::exec`]: either a whole `process` or changes to the container's own process.
#[derive(Debug, Default)]
pub struct ExecOptions {
    pub process: Option<Process>,
    pub args: Vec<String>,
    pub env: Vec<String>,
    pub cwd: Option<PathBuf>,
    /// `uid[:gid]` instead of the container's user (runc `exec --user`).
    pub user: Option<(u32, Option<u32>)>,
    pub additional_gids: Vec<u32>,
    pub tty: bool,
    pub console: Console,
    pub pid_file: Option<PathBuf>,
}

/// A container runtime rooted at a state directory.
#[derive(Debug, Clone)]
pub struct Runtime {
    root: PathBuf,
    cgroup_root: PathBuf,
}

/// Ref: runc's id check: letters, digits and `_+-.`, not `.` or `..`.
fn validate_id(id: &str) -> Result<(), ContainerError> {
    let ok = !id.is_empty()
        && id != "."
        && id != ".."
        && id.len() <= 1024
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "_+-.".contains(c));
    if ok {
        Ok(())
    } else {
        Err(ContainerError::InvalidId(id.to_string()))
    }
}

/// Parses a signal as runc does: `KILL`, `SIGKILL` or `9`.
pub fn parse_signal(text: &str) -> Result<Signal, ContainerError> {
    let unknown = || ContainerError::UnknownSignal(text.to_string());
    if let Ok(n) = text.parse::<i32>() {
        return Signal::try_from(n).map_err(|_| unknown());
    }
    let upper = text.to_ascii_uppercase();
    let name = if upper.starts_with("SIG") {
        upper
    } else {
        format!("SIG{upper}")
    };
    name.parse::<Signal>().map_err(|_| unknown())
}

fn namespace_flag(t: LinuxNamespaceType) -> CloneFlags {
    match t {
        LinuxNamespaceType::Mount => CloneFlags::CLONE_NEWNS,
        LinuxNamespaceType::Cgroup => CloneFlags::CLONE_NEWCGROUP,
        LinuxNamespaceType::Uts => CloneFlags::CLONE_NEWUTS,
        LinuxNamespaceType::Ipc => CloneFlags::CLONE_NEWIPC,
        LinuxNamespaceType::User => CloneFlags::CLONE_NEWUSER,
        LinuxNamespaceType::Pid => CloneFlags::CLONE_NEWPID,
        LinuxNamespaceType::Network => CloneFlags::CLONE_NEWNET,
        LinuxNamespaceType::Time => CloneFlags::empty(),
    }
}

fn open_ns(path: &Path) -> Result<OwnedFd, ContainerError> {
    let fd = nix::fcntl::open(
        path,
        nix::fcntl::OFlag::O_RDONLY | nix::fcntl::OFlag::O_CLOEXEC,
        Mode::empty(),
    )
    .map_err(sys(format!("open namespace {}", path.display())))?;
    Ok(fd)
}

/// The cgroup directories to show inside the container's cgroup mount.
fn cgroup_binds(cgroup_root: &Path, cgroups_path: &Path) -> Vec<rootfs::CgroupBind> {
    let rel = cgroups_path.strip_prefix("/").unwrap_or(cgroups_path);
    if cgroup_root.join("cgroup.controllers").exists() {
        return vec![rootfs::CgroupBind::Dir {
            source: cgroup_root.join(rel),
            name: String::new(),
        }];
    }
    let mut out = Vec::new();
    for entry in fs::read_dir(cgroup_root).into_iter().flatten().flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Ok(ft) = entry.file_type() else { continue };
        if ft.is_symlink() {
            if let Ok(target) = fs::read_link(entry.path()) {
                out.push(rootfs::CgroupBind::Link { name, target });
            }
        } else if ft.is_dir() {
            let source = entry.path().join(rel);
            if source.is_dir() {
                out.push(rootfs::CgroupBind::Dir { source, name });
            }
        }
    }
    out
}

fn connect_console(console: Console) -> Result<Option<UnixStream>, ContainerError> {
    match console {
        Console::None => Ok(None),
        Console::Connected(s) => Ok(Some(s)),
        Console::Socket(path) => UnixStream::connect(&path)
            .map(Some)
            .map_err(|source| ContainerError::ConsoleSocket { path, source }),
    }
}

fn write_pid_file(path: &Path, pid: Pid) -> Result<(), ContainerError> {
    // Ref: runc writes the pid file atomically (temp file + rename) so readers never see a partial one.
    let tmp = path.with_extension("tmp-windlass");
    fs::write(&tmp, pid.to_string()).map_err(|source| ContainerError::Io {
        path: tmp.clone(),
        source,
    })?;
    fs::rename(&tmp, path).map_err(|source| ContainerError::Io {
        path: path.to_path_buf(),
        source,
    })
}

impl Runtime {
    /// `root` holds the state directories (runc's `--root`); `cgroup_root` is where cgroup hierarchies are mounted.
    pub fn new(root: impl Into<PathBuf>, cgroup_root: impl Into<PathBuf>) -> Self {
        Self {
            root: root.into(),
            cgroup_root: cgroup_root.into(),
        }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn cgroup_root(&self) -> &Path {
        &self.cgroup_root
    }

    /// Creates a container from the bundle at `bundle`.
    pub fn create(
        &self,
        id: &str,
        bundle: &Path,
        opts: CreateOptions,
    ) -> Result<State, ContainerError> {
        validate_id(id)?;
        let bundle = oci::load_bundle(bundle)?;
        self.create_from(id, bundle, opts)
    }

    /// Creates a container from an already loaded (and possibly adjusted, e.g. by the sandbox) bundle: the init
    /// process is set up in its namespaces and waits for [`Runtime::start`]. On any error nothing is left behind.
    pub fn create_from(
        &self,
        id: &str,
        bundle: Bundle,
        opts: CreateOptions,
    ) -> Result<State, ContainerError> {
        validate_id(id)?;
        oci::validate(&bundle.spec)?;
        let terminal = bundle
            .spec
            .process()
            .as_ref()
            .and_then(|p| p.terminal())
            .unwrap_or(false);
        if terminal && matches!(opts.console, Console::None) {
            return Err(ContainerError::NeedConsoleSocket);
        }
        let seccomp = match bundle
            .spec
            .linux()
            .as_ref()
            .and_then(|l| l.seccomp().clone())
        {
            Some(s) => oci::compile_seccomp(&s)?,
            None => SeccompProgram::default(),
        };
        let dir = StateDir::create(&self.root, id)?;
        let mut owns_cgroup = false;
        let result = dir.lock(id, LOCK_WAIT).and_then(|lock| {
            self.create_locked(id, &dir, &bundle, opts, &seccomp, &mut owns_cgroup)
                .map(|s| (s, lock))
        });
        match result {
            Ok((state, _lock)) => Ok(state),
            Err(e) => {
                // Undo everything: the init (if any), the cgroup, the state directory.
                if let Ok(rec) = dir.read_record(id) {
                    if rec.pid > 0 {
                        let _ = send_signal(Pid::from_raw(rec.pid), Signal::SIGKILL);
                        wait_gone(rec.pid, Duration::from_secs(5));
                    }
                }
                // Only a cgroup this call set up is ours to empty and remove (never one found in use).
                let cgroups_path = self.cgroups_path_of(id, &bundle.spec);
                if owns_cgroup {
                    if let Ok(cg) = cgroups::create_manager(&self.cgroup_root, &cgroups_path) {
                        kill_cgroup(cg.as_ref());
                        let _ = destroy_cgroup(cg.as_ref());
                    }
                }
                let _ = fs::remove_dir_all(&dir.dir);
                Err(e)
            }
        }
    }

    fn cgroups_path_of(&self, id: &str, spec: &Spec) -> PathBuf {
        spec.linux()
            .as_ref()
            .and_then(|l| l.cgroups_path().clone())
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or_else(|| PathBuf::from(format!("/windlass/{id}")))
    }

    fn create_locked(
        &self,
        id: &str,
        dir: &StateDir,
        bundle: &Bundle,
        opts: CreateOptions,
        seccomp: &SeccompProgram,
        owns_cgroup: &mut bool,
    ) -> Result<State, ContainerError> {
        let spec = &bundle.spec;
        let terminal = spec
            .process()
            .as_ref()
            .and_then(|p| p.terminal())
            .unwrap_or(false);
        let ns = Namespaces::of(spec);
        let cgroups_path = self.cgroups_path_of(id, spec);
        let mut rec = Record {
            id: id.to_string(),
            bundle: bundle.path.clone(),
            rootfs: bundle.rootfs.clone(),
            pid: 0,
            pid_start: 0,
            created: now_rfc3339(),
            owner: nix::unistd::User::from_uid(nix::unistd::geteuid())
                .ok()
                .flatten()
                .map(|u| u.name)
                .unwrap_or_else(|| nix::unistd::geteuid().to_string()),
            annotations: spec.annotations().clone().unwrap_or_default(),
            cgroup_root: self.cgroup_root.clone(),
            cgroups_path: cgroups_path.clone(),
            own_pid_ns: ns.creates(LinuxNamespaceType::Pid),
            creating: true,
        };
        dir.write_record(&rec)?;
        state::write_json_atomic(&dir.path(state::CONFIG_COPY), spec)?;

        let cgroup = cgroups::create_manager(&self.cgroup_root, &cgroups_path)?;
        // Ref: runc refuses a cgroup that already has processes (another container's, most likely).
        if !cgroup.pids().unwrap_or_default().is_empty() {
            return Err(ContainerError::CgroupInUse(cgroups_path));
        }
        *owns_cgroup = true;
        cgroup.create()?;
        if let Some(res) = spec.linux().as_ref().and_then(|l| l.resources().as_ref()) {
            cgroup.apply(res)?;
        }

        let fifo = dir.path(state::FIFO_FILE);
        nix::unistd::mkfifo(&fifo, Mode::from_bits_truncate(0o622))
            .map_err(sys(format!("mkfifo {}", fifo.display())))?;

        let console = if terminal {
            connect_console(opts.console)?
        } else {
            None
        };
        // O_RDWR never blocks on a FIFO; the init inherits this and waits for `start`'s byte.
        let fifo_file = fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&fifo)
            .map_err(|source| ContainerError::Io {
                path: fifo.clone(),
                source,
            })?;
        let mut joins = init::Joins {
            fds: Vec::new(),
            unshare: CloneFlags::empty(),
            userns_go: None,
        };
        let hooks = spec.hooks().clone().unwrap_or_default();
        let runtime_hooks: Vec<oci_spec::runtime::Hook> = hooks
            .create_runtime()
            .iter()
            .chain(hooks.prestart().iter())
            .flatten()
            .cloned()
            .collect();
        let mut userns_go = None;
        if ns.creates(LinuxNamespaceType::User) || !runtime_hooks.is_empty() {
            let (r, w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(sys("pipe"))?;
            joins.userns_go = Some(r);
            userns_go = Some(w);
        }
        for (typ, path) in &ns.join {
            joins.fds.push((namespace_flag(*typ), open_ns(path)?));
        }
        for typ in &ns.new {
            joins.unshare |= namespace_flag(*typ);
        }
        let plan = rootfs::RootfsPlan {
            rootfs: bundle.rootfs.clone(),
            bundle: bundle.path.clone(),
            cgroup_binds: cgroup_binds(&self.cgroup_root, &cgroups_path),
        };

        let (listener, reporter) = sync::channel().map_err(sys("pipe"))?;
        let console_fd: Option<RawFd> = console.as_ref().map(|c| c.as_raw_fd());
        let fifo_fd = fifo_file.as_raw_fd();
        let go_fd: Option<RawFd> = joins.userns_go.as_ref().map(|fd| fd.as_raw_fd());
        let keep: Vec<RawFd> = console_fd.into_iter().chain([fifo_fd]).collect();
        let base_state = self.state_of(dir, &rec);
        let stage1 = init::spawn(&joins, Some(cgroup.as_ref()), &keep, &reporter, || {
            init::container_init(init::InitArgs {
                spec,
                plan: &plan,
                fifo: fifo_fd,
                console: console_fd,
                seccomp,
                report: &reporter,
                state: base_state.clone(),
                go: go_fd.filter(|_| !runtime_hooks.is_empty()),
            })
        })
        .map_err(sys("fork"))?;
        drop(reporter);
        drop(console);
        drop(joins);
        drop(fifo_file);
        let linux = spec.linux().clone().unwrap_or_default();
        let mut on_request = |kind: &str, pid: Pid| -> Result<(), String> {
            let go = userns_go
                .as_ref()
                .ok_or("unexpected request from the init")?;
            if kind == "hooks" {
                // createRuntime, then the deprecated prestart, in the runtime's namespaces.
                let mut st = base_state.clone();
                st.pid = pid.as_raw();
                st.status = Status::Creating;
                let json = serde_json::to_string(&st).unwrap_or_default();
                hooks::run(&runtime_hooks, &json, "createRuntime/prestart")?;
                nix::unistd::write(go, &[1]).map_err(|e| format!("resuming the init: {e}"))?;
                return Ok(());
            }
            let map = |m: &Option<Vec<oci_spec::runtime::LinuxIdMapping>>| {
                m.iter()
                    .flatten()
                    .map(|m| format!("{} {} {}\n", m.container_id(), m.host_id(), m.size()))
                    .collect::<String>()
            };
            for (file, text) in [
                ("uid_map", map(linux.uid_mappings())),
                ("gid_map", map(linux.gid_mappings())),
            ] {
                let path = format!("/proc/{pid}/{file}");
                fs::write(&path, &text)
                    .map_err(|e| format!("writing {path} ({}): {e}", text.trim()))?;
            }
            nix::unistd::write(go, &[1]).map_err(|e| format!("resuming stage 1: {e}"))?;
            Ok(())
        };
        let outcome = listener.wait(id, &mut on_request);
        let _ = nix::sys::wait::waitpid(stage1, None);
        if let Some(pid) = outcome.pid {
            rec.pid = pid.as_raw();
            rec.pid_start = proc_stat(rec.pid).map(|(s, _)| s).unwrap_or(0);
            dir.write_record(&rec)?;
        }
        if let Some(err) = outcome.error {
            return Err(ContainerError::Init(err));
        }
        let Some(pid) = outcome.pid.filter(|_| outcome.ready) else {
            return Err(ContainerError::Init(
                "the init process exited during setup".into(),
            ));
        };
        rec.creating = false;
        dir.write_record(&rec)?;
        if let Some(pf) = &opts.pid_file {
            write_pid_file(pf, pid)?;
        }
        tracing::info!(container = %id, pid = pid.as_raw(), "created");
        Ok(self.state_of(dir, &rec))
    }

    fn state_of(&self, dir: &StateDir, rec: &Record) -> State {
        let status = dir.status(rec);
        State {
            oci_version: "1.0.2".into(),
            id: rec.id.clone(),
            pid: if status == Status::Stopped {
                0
            } else {
                rec.pid
            },
            status,
            bundle: rec.bundle.clone(),
            rootfs: rec.rootfs.clone(),
            created: rec.created.clone(),
            owner: rec.owner.clone(),
            annotations: rec.annotations.clone(),
        }
    }

    fn open(&self, id: &str) -> Result<(StateDir, Record), ContainerError> {
        validate_id(id)?;
        let dir = StateDir::new(&self.root, id);
        if !dir.exists() {
            return Err(ContainerError::NotFound(id.to_string()));
        }
        let rec = dir.read_record(id)?;
        Ok((dir, rec))
    }

    /// Lets a created container run its process.
    pub fn start(&self, id: &str) -> Result<State, ContainerError> {
        let (dir, _) = self.open(id)?;
        let _lock = dir.lock(id, LOCK_WAIT)?;
        let rec = dir.read_record(id)?;
        match dir.status(&rec) {
            Status::Created => {}
            Status::Running | Status::Paused => {
                return Err(ContainerError::AlreadyRunning(id.into()))
            }
            Status::Stopped => return Err(ContainerError::StartStopped(id.into())),
            Status::Creating => return Err(ContainerError::Busy(id.into())),
        }
        let fifo = dir.path(state::FIFO_FILE);
        // Non-blocking: ENXIO means no reader, i.e. the init is gone.
        let file = fs::OpenOptions::new()
            .write(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(&fifo)
            .map_err(|source| match source.raw_os_error() {
                Some(libc::ENXIO) => ContainerError::StartStopped(id.into()),
                _ => ContainerError::Io {
                    path: fifo.clone(),
                    source,
                },
            })?;
        use std::io::Write;
        (&file)
            .write_all(&[0])
            .map_err(|source| ContainerError::Io {
                path: fifo.clone(),
                source,
            })?;
        drop(file);
        let _ = fs::remove_file(&fifo);
        tracing::info!(container = %id, "started");
        let state = self.state_of(&dir, &rec);
        self.run_hooks_logged(&dir, &state, "poststart", |h| h.poststart().clone());
        Ok(state)
    }

    /// The container's OCI state.
    pub fn state(&self, id: &str) -> Result<State, ContainerError> {
        let (dir, rec) = self.open(id)?;
        Ok(self.state_of(&dir, &rec))
    }

    /// How the container's init ended, when its reaper recorded it.
    pub fn exit_status(&self, id: &str) -> Result<Option<ExitStatus>, ContainerError> {
        let (dir, _) = self.open(id)?;
        Ok(dir.exit_status())
    }

    /// Records how the init ended (for callers that reaped it themselves).
    pub fn record_exit(&self, id: &str, status: &ExitStatus) -> Result<(), ContainerError> {
        let (dir, _) = self.open(id)?;
        dir.write_exit_status(status)
    }

    /// Changes the resource limits of a created or running container (runc `update`; CRI
    /// UpdateContainerResources), and keeps them in the saved config so `exec` and a later reader see them.
    pub fn update(
        &self,
        id: &str,
        resources: &oci_spec::runtime::LinuxResources,
    ) -> Result<(), ContainerError> {
        let (dir, rec) = self.open(id)?;
        let _lock = dir.lock(id, LOCK_WAIT)?;
        if !matches!(dir.status(&rec), Status::Created | Status::Running) {
            return Err(ContainerError::NotRunning(id.into()));
        }
        let cg = cgroups::create_manager(&rec.cgroup_root, &rec.cgroups_path)?;
        cg.apply(resources)?;
        let path = dir.path(state::CONFIG_COPY);
        let mut spec = oci::load_spec(&path)?;
        let mut linux = spec.linux().clone().unwrap_or_default();
        linux.set_resources(Some(resources.clone()));
        spec.set_linux(Some(linux));
        state::write_json_atomic(&path, &spec)
    }

    /// Freezes every process of a running container (cgroup freezer), as `runc pause`.
    pub fn pause(&self, id: &str) -> Result<(), ContainerError> {
        let (dir, rec) = self.open(id)?;
        let _lock = dir.lock(id, LOCK_WAIT)?;
        match dir.status(&rec) {
            Status::Running | Status::Created => {}
            Status::Paused => return Err(ContainerError::Paused(id.into())),
            _ => return Err(ContainerError::NotRunning(id.into())),
        }
        let cg = cgroups::create_manager(&rec.cgroup_root, &rec.cgroups_path)?;
        cg.freeze(true)?;
        let flag = dir.path(state::PAUSED_FILE);
        fs::write(&flag, b"").map_err(|source| ContainerError::Io { path: flag, source })
    }

    /// Thaws a paused container, as `runc resume`.
    pub fn resume(&self, id: &str) -> Result<(), ContainerError> {
        let (dir, rec) = self.open(id)?;
        let _lock = dir.lock(id, LOCK_WAIT)?;
        if dir.status(&rec) != Status::Paused {
            return Err(ContainerError::NotPaused(id.into()));
        }
        let cg = cgroups::create_manager(&rec.cgroup_root, &rec.cgroups_path)?;
        cg.freeze(false)?;
        let flag = dir.path(state::PAUSED_FILE);
        fs::remove_file(&flag).map_err(|source| ContainerError::Io { path: flag, source })
    }

    /// The cgroup manager of a container, e.g. for stats and OOM reports.
    pub fn cgroup(&self, id: &str) -> Result<Box<dyn CgroupManager>, ContainerError> {
        let (_, rec) = self.open(id)?;
        Ok(cgroups::create_manager(
            &rec.cgroup_root,
            &rec.cgroups_path,
        )?)
    }

    /// Sends `signal` to the init, or with `all` to every process in the container's cgroup.
    pub fn kill(&self, id: &str, signal: Signal, all: bool) -> Result<(), ContainerError> {
        let (dir, rec) = self.open(id)?;
        match dir.status(&rec) {
            Status::Created | Status::Running | Status::Paused => {}
            _ => return Err(ContainerError::NotRunning(id.into())),
        }
        if all {
            let cg = cgroups::create_manager(&rec.cgroup_root, &rec.cgroups_path)?;
            for pid in cg.pids()? {
                let _ = send_signal(pid, signal);
            }
            Ok(())
        } else {
            send_signal(Pid::from_raw(rec.pid), signal).map_err(sys(format!("kill {}", rec.pid)))
        }
    }

    /// Removes a container: refuses a running one unless `force` (then kills it). Kills a created one (as runc
    /// does), reaps, removes the cgroup and the state directory. With `force` a missing container is not an error.
    pub fn delete(&self, id: &str, force: bool) -> Result<(), ContainerError> {
        validate_id(id)?;
        let dir = StateDir::new(&self.root, id);
        if !dir.exists() {
            return if force {
                Ok(())
            } else {
                Err(ContainerError::NotFound(id.into()))
            };
        }
        let _lock = dir.lock(id, LOCK_WAIT)?;
        let rec = match dir.read_record(id) {
            Ok(r) => r,
            // A directory without state.json: an aborted create. Ref: runc removes it in this case too.
            Err(ContainerError::NotFound(_)) | Err(ContainerError::Corrupt { .. }) => {
                let _ = fs::remove_dir_all(&dir.dir);
                return if force {
                    Ok(())
                } else {
                    Err(ContainerError::NotFound(id.into()))
                };
            }
            Err(e) => return Err(e),
        };
        let status = dir.status(&rec);
        if matches!(status, Status::Running | Status::Creating | Status::Paused) && !force {
            return Err(ContainerError::NotStopped {
                id: id.into(),
                status,
            });
        }
        if status == Status::Paused {
            // A frozen task only dies once thawed.
            if let Ok(cg) = cgroups::create_manager(&rec.cgroup_root, &rec.cgroups_path) {
                let _ = cg.freeze(false);
            }
        }
        let mut errors = Vec::new();
        let cg = cgroups::create_manager(&rec.cgroup_root, &rec.cgroups_path);
        if alive(rec.pid, rec.pid_start) {
            let _ = send_signal(Pid::from_raw(rec.pid), Signal::SIGKILL);
        }
        if let Ok(cg) = &cg {
            if !rec.own_pid_ns || status != Status::Stopped {
                kill_cgroup(cg.as_ref());
            }
        }
        if !wait_gone(rec.pid, Duration::from_secs(10)) {
            errors.push(format!("init {} did not die after SIGKILL", rec.pid));
        }
        let mut stopped = self.state_of(&dir, &rec);
        stopped.status = Status::Stopped;
        self.run_hooks_logged(&dir, &stopped, "poststop", |h| h.poststop().clone());
        match cg {
            Ok(cg) => {
                if let Err(e) = destroy_cgroup(cg.as_ref()) {
                    errors.push(format!("removing cgroup: {e}"));
                }
            }
            Err(e) => errors.push(format!("cgroup: {e}")),
        }
        if let Err(e) = remove_state_dir(&dir.dir) {
            errors.push(format!("removing {}: {e}", dir.dir.display()));
        }
        tracing::info!(container = %id, "deleted");
        if errors.is_empty() {
            Ok(())
        } else {
            Err(ContainerError::Cleanup(errors.join("; ")))
        }
    }

    /// Runs poststart/poststop hooks from the saved config; per the spec their failures are only warnings.
    fn run_hooks_logged(
        &self,
        dir: &StateDir,
        state: &State,
        stage: &str,
        pick: impl Fn(&oci_spec::runtime::Hooks) -> Option<Vec<oci_spec::runtime::Hook>>,
    ) {
        let Ok(spec) = oci::load_spec(&dir.path(state::CONFIG_COPY)) else {
            return;
        };
        let Some(list) = spec.hooks().as_ref().and_then(pick) else {
            return;
        };
        let json = serde_json::to_string(state).unwrap_or_default();
        if let Err(e) = hooks::run(&list, &json, stage) {
            tracing::warn!(container = %state.id, "{e}");
        }
    }

    /// Every container under the root, sorted by ID.
    pub fn list(&self) -> Result<Vec<State>, ContainerError> {
        let mut out = Vec::new();
        let entries = match fs::read_dir(&self.root) {
            Ok(e) => e,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(out),
            Err(source) => {
                return Err(ContainerError::Io {
                    path: self.root.clone(),
                    source,
                })
            }
        };
        for entry in entries.flatten() {
            let id = entry.file_name().to_string_lossy().into_owned();
            let dir = StateDir::new(&self.root, &id);
            if let Ok(rec) = dir.read_record(&id) {
                out.push(self.state_of(&dir, &rec));
            }
        }
        out.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(out)
    }

    /// The process `exec` would run: the container's own, changed by `opts`.
    fn exec_process(
        &self,
        dir: &StateDir,
        opts: &ExecOptions,
    ) -> Result<(Process, Spec), ContainerError> {
        let spec = oci::load_spec(&dir.path(state::CONFIG_COPY))?;
        let mut process = match &opts.process {
            Some(p) => p.clone(),
            None => {
                let mut p = spec.process().clone().unwrap_or_default();
                p.set_args(Some(opts.args.clone()));
                let mut env = p.env().clone().unwrap_or_default();
                for kv in &opts.env {
                    let key = kv.split('=').next().unwrap_or_default();
                    env.retain(|e| e.split('=').next() != Some(key));
                    env.push(kv.clone());
                }
                p.set_env(Some(env));
                if let Some(cwd) = &opts.cwd {
                    p.set_cwd(cwd.clone());
                }
                p.set_terminal(Some(opts.tty));
                if let Some((uid, gid)) = opts.user {
                    let mut user = p.user().clone();
                    user.set_uid(uid);
                    user.set_gid(gid.unwrap_or(0));
                    user.set_additional_gids(Some(opts.additional_gids.clone()));
                    p.set_user(user);
                } else if !opts.additional_gids.is_empty() {
                    let mut user = p.user().clone();
                    user.set_additional_gids(Some(opts.additional_gids.clone()));
                    p.set_user(user);
                }
                p
            }
        };
        if process.args().as_ref().is_none_or(|a| a.is_empty()) {
            return Err(OciError::Invalid("exec needs a command".into()).into());
        }
        if !process.cwd().is_absolute() {
            process.set_cwd(PathBuf::from("/"));
        }
        Ok((process, spec))
    }

    /// Runs another process in a running container: its namespaces, cgroup, capabilities, user, seccomp and
    /// no_new_privs. Returns the process's host PID once it has exec'd; the caller waits for it (be a subreaper:
    /// the process is a grandchild).
    pub fn exec(&self, id: &str, opts: ExecOptions) -> Result<Pid, ContainerError> {
        let (dir, rec) = self.open(id)?;
        if !matches!(dir.status(&rec), Status::Running | Status::Created) {
            return Err(ContainerError::NotRunning(id.into()));
        }
        let (process, spec) = self.exec_process(&dir, &opts)?;
        let terminal = process.terminal().unwrap_or(false);
        if terminal && matches!(opts.console, Console::None) {
            return Err(ContainerError::NeedConsoleSocket);
        }
        let seccomp = match spec.linux().as_ref().and_then(|l| l.seccomp().clone()) {
            Some(s) => oci::compile_seccomp(&s)?,
            None => SeccompProgram::default(),
        };
        let cgroup = cgroups::create_manager(&rec.cgroup_root, &rec.cgroups_path)?;
        // Join every namespace of the init that differs from ours (the mount namespace included, which also
        // moves us to its root).
        let mut joins = init::Joins {
            fds: Vec::new(),
            unshare: CloneFlags::empty(),
            userns_go: None,
        };
        for (name, flag) in [
            ("user", CloneFlags::CLONE_NEWUSER),
            ("ipc", CloneFlags::CLONE_NEWIPC),
            ("uts", CloneFlags::CLONE_NEWUTS),
            ("net", CloneFlags::CLONE_NEWNET),
            ("pid", CloneFlags::CLONE_NEWPID),
            ("cgroup", CloneFlags::CLONE_NEWCGROUP),
            ("mnt", CloneFlags::CLONE_NEWNS),
        ] {
            let theirs = PathBuf::from(format!("/proc/{}/ns/{name}", rec.pid));
            let ours = PathBuf::from(format!("/proc/self/ns/{name}"));
            if fs::read_link(&theirs).ok() != fs::read_link(&ours).ok() {
                joins.fds.push((flag, open_ns(&theirs)?));
            }
        }
        if !alive(rec.pid, rec.pid_start) {
            return Err(ContainerError::NotRunning(id.into()));
        }
        let console = if terminal {
            connect_console(opts.console)?
        } else {
            None
        };
        let console_fd: Option<RawFd> = console.as_ref().map(|c| c.as_raw_fd());
        let keep: Vec<RawFd> = console_fd.into_iter().collect();
        let (listener, reporter) = sync::channel().map_err(sys("pipe"))?;
        let stage1 = init::spawn(&joins, Some(cgroup.as_ref()), &keep, &reporter, || {
            init::exec_process(&process, &seccomp, console_fd, &reporter)
        })
        .map_err(sys("fork"))?;
        drop(reporter);
        drop(console);
        let outcome = listener.wait(id, &mut |_, _| {
            Err("unexpected request from the exec'd process".into())
        });
        let _ = nix::sys::wait::waitpid(stage1, None);
        if let Some(err) = outcome.error {
            return Err(ContainerError::Init(err));
        }
        let pid = outcome
            .pid
            .ok_or_else(|| ContainerError::Init("exec process exited during setup".into()))?;
        if let Some(pf) = &opts.pid_file {
            write_pid_file(pf, pid)?;
        }
        Ok(pid)
    }
}

/// SIGKILL to every process of a cgroup (for containers sharing a PID namespace, where killing the init does not
/// take the others with it).
fn kill_cgroup(cg: &dyn CgroupManager) {
    if let Ok(pids) = cg.pids() {
        for pid in pids {
            let _ = send_signal(pid, Signal::SIGKILL);
        }
    }
}

/// Removes a cgroup, retrying briefly: the kernel may still be tearing down just-killed tasks.
fn destroy_cgroup(cg: &dyn CgroupManager) -> Result<(), CgroupError> {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match cg.destroy() {
            Ok(()) => return Ok(()),
            Err(e) if Instant::now() >= deadline => return Err(e),
            Err(_) => {
                kill_cgroup(cg);
                std::thread::sleep(Duration::from_millis(10));
            }
        }
    }
}

/// Waits until `pid` has exited (reaping it if it is our child); false on timeout.
fn wait_gone(pid: i32, timeout: Duration) -> bool {
    if pid <= 0 {
        return true;
    }
    let deadline = Instant::now() + timeout;
    loop {
        reap_if_child(pid);
        match proc_stat(pid) {
            None => return true,
            Some((_, 'Z')) | Some((_, 'X')) => return true,
            _ => {}
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Becomes a child subreaper, so a container init (a grandchild) is reparented to us and can be waited for.
/// Ref: prctl(2) PR_SET_CHILD_SUBREAPER; this machine's PID 1 reaps orphans lazily.
pub fn become_subreaper() -> Result<(), ContainerError> {
    nix::sys::prctl::set_child_subreaper(true).map_err(sys("prctl(PR_SET_CHILD_SUBREAPER)"))
}

/// Reaps every exited child without blocking; returns the (pid, exit code) pairs.
pub fn reap_children() -> Vec<(Pid, i32)> {
    use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
    let mut out = Vec::new();
    loop {
        match waitpid(Pid::from_raw(-1), Some(WaitPidFlag::WNOHANG)) {
            Ok(WaitStatus::Exited(pid, code)) => out.push((pid, code)),
            Ok(WaitStatus::Signaled(pid, sig, _)) => out.push((pid, 128 + sig as i32)),
            Ok(WaitStatus::StillAlive) | Err(_) => break,
            Ok(_) => {}
        }
    }
    out
}

/// The signals a foreground `run`/`exec` passes on to the container. Ref: runc's signal handler forwards all
/// signals; SIGCHLD is ours, and SIGWINCH resizes the terminal instead.
const FORWARDED: [Signal; 9] = [
    Signal::SIGWINCH,
    Signal::SIGHUP,
    Signal::SIGINT,
    Signal::SIGQUIT,
    Signal::SIGTERM,
    Signal::SIGUSR1,
    Signal::SIGUSR2,
    Signal::SIGCONT,
    Signal::SIGTSTP,
];

/// Blocks the forwarded signals and SIGCHLD in the calling thread (call before spawning, so threads inherit it) and
/// returns a signalfd receiving them.
pub fn block_forwarded_signals() -> Result<nix::sys::signalfd::SignalFd, ContainerError> {
    use nix::sys::signal::{SigSet, SigmaskHow};
    let mut set = SigSet::empty();
    for s in FORWARDED {
        set.add(s);
    }
    set.add(Signal::SIGCHLD);
    nix::sys::signal::pthread_sigmask(SigmaskHow::SIG_BLOCK, Some(&set), None)
        .map_err(sys("sigprocmask"))?;
    nix::sys::signalfd::SignalFd::with_flags(&set, nix::sys::signalfd::SfdFlags::SFD_CLOEXEC)
        .map_err(sys("signalfd"))
}

/// Waits for `pid` (our child or, as subreaper, grandchild), forwarding signals from `sfd` to it and reaping any
/// other child meanwhile. Returns its exit code, 128 + signal when killed.
///
/// With `tty` (the pty master of a foreground terminal), SIGWINCH resizes the pty to our terminal's size instead of
/// being forwarded.
pub fn wait_forwarding(
    pid: Pid,
    sfd: &nix::sys::signalfd::SignalFd,
    tty: Option<std::os::fd::BorrowedFd<'_>>,
) -> Result<ExitStatus, ContainerError> {
    use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
    loop {
        loop {
            match waitpid(Pid::from_raw(-1), Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::Exited(p, code)) if p == pid => {
                    return Ok(ExitStatus {
                        code,
                        signal: None,
                        oom_killed: false,
                        finished_at: now_rfc3339(),
                    })
                }
                Ok(WaitStatus::Signaled(p, sig, _)) if p == pid => {
                    return Ok(ExitStatus {
                        code: 128 + sig as i32,
                        signal: Some(sig as i32),
                        oom_killed: false,
                        finished_at: now_rfc3339(),
                    })
                }
                Ok(WaitStatus::StillAlive) => break,
                Ok(_) => continue,
                Err(nix::errno::Errno::ECHILD) => {
                    return Err(ContainerError::Init(format!(
                        "process {pid} is not our child (not a subreaper?)"
                    )))
                }
                Err(e) => {
                    return Err(ContainerError::Sys {
                        what: "waitpid".into(),
                        source: e,
                    })
                }
            }
        }
        match sfd.read_signal() {
            Ok(Some(info)) => {
                let signo = info.ssi_signo as i32;
                if signo == Signal::SIGWINCH as i32 && tty.is_some() {
                    if let Some(master) = tty {
                        tty::copy_window_size(master);
                    }
                } else if signo != Signal::SIGCHLD as i32 {
                    if let Ok(sig) = Signal::try_from(signo) {
                        let _ = send_signal(pid, sig);
                    }
                }
            }
            Ok(None) => {}
            Err(nix::errno::Errno::EINTR) => {}
            Err(e) => {
                return Err(ContainerError::Sys {
                    what: "read signalfd".into(),
                    source: e,
                })
            }
        }
    }
}

/// A unix socketpair for a foreground terminal: one end for the container, one to receive the pty master on.
pub fn console_pair() -> Result<(Console, UnixStream), ContainerError> {
    let (a, b) = UnixStream::pair().map_err(|source| ContainerError::Io {
        path: "socketpair".into(),
        source,
    })?;
    Ok((Console::Connected(a), b))
}

/// Receives the pty master on the local end of [`console_pair`].
pub fn receive_pty(local: &UnixStream) -> Result<OwnedFd, ContainerError> {
    tty::recv_master(local.as_raw_fd()).map_err(|source| ContainerError::Io {
        path: "console socket".into(),
        source,
    })
}

use std::os::unix::fs::OpenOptionsExt;

/// Removes a container's state directory. The shim that reaped the init may still be writing the exit status
/// into it when a forced delete gets here, which makes `remove_dir_all` fail with "Directory not empty"; such a
/// late write is retried a few times (bounded: 5 attempts, 20 ms apart) instead of failing the delete.
fn remove_state_dir(path: &Path) -> io::Result<()> {
    let mut attempts = 0;
    loop {
        match fs::remove_dir_all(path) {
            Err(e) if e.kind() == io::ErrorKind::DirectoryNotEmpty && attempts < 4 => {
                attempts += 1;
                std::thread::sleep(Duration::from_millis(20));
            }
            other => return other,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signals_parse_by_name_with_or_without_sig_and_by_number() {
        assert_eq!(parse_signal("KILL").ok(), Some(Signal::SIGKILL));
        assert_eq!(parse_signal("sigterm").ok(), Some(Signal::SIGTERM));
        assert_eq!(parse_signal("SIGUSR1").ok(), Some(Signal::SIGUSR1));
        assert_eq!(parse_signal("9").ok(), Some(Signal::SIGKILL));
        assert!(parse_signal("NOPE").is_err());
        assert!(parse_signal("99").is_err());
    }

    #[test]
    fn ids_are_restricted_to_a_safe_alphabet() {
        for good in ["a", "web-1", "pod_x.y+z", "A9"] {
            assert!(validate_id(good).is_ok(), "{good}");
        }
        for bad in ["", ".", "..", "../x", "a/b", "a b", "x\0"] {
            assert!(validate_id(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn a_state_directory_refuses_a_second_container_of_the_same_id() {
        let root = tempfile::tempdir().expect("dir");
        StateDir::create(root.path(), "c1").expect("first");
        let err = StateDir::create(root.path(), "c1").expect_err("second");
        assert_eq!(err.to_string(), "container with id exists: c1");
    }

    #[test]
    fn a_missing_state_is_reported_as_not_existing() {
        let root = tempfile::tempdir().expect("dir");
        let rt = Runtime::new(root.path(), root.path());
        assert_eq!(
            rt.state("nope").expect_err("missing").to_string(),
            "container does not exist"
        );
        assert!(rt.list().expect("list").is_empty());
        rt.delete("nope", true)
            .expect("force delete of nothing is fine");
    }
}
