//! Pod sandboxes: the library API the kubelet uses to run a pod.
//!
//! A sandbox is a holder process (see `holder`) owning the pod's network, IPC and UTS namespaces (and PID namespace
//! when the pod shares one) inside the pod's cgroup. Its network namespace is bind-mounted to
//! `<root>/<id>/netns` for CNI, so it outlives the holder until the sandbox is removed. Containers join those
//! namespaces with their own mount (and, unless shared, PID) namespace and rootfs; each is created by its own log
//! shim process (`windlass-runtime shim`) that writes CRI-format logs and records the exit status. Everything is
//! on disk under the sandbox root, so a restarted caller lists and adopts what is running.
//!
//! A host-network sandbox ([`SandboxConfig::host_network`]) creates no network namespace: its holder stays in the
//! caller's (the node's), nothing is pinned, and its containers join the holder's network namespace.

mod crilog;
mod holder;
mod shim;
mod stream_exec;

use std::collections::HashMap;
use std::fs;
use std::io::{self, BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use nix::mount::MntFlags;
use nix::sched::CloneFlags;
use nix::sys::signal::Signal;
use nix::unistd::Pid;
use oci_spec::runtime::{LinuxNamespace, LinuxNamespaceType, LinuxResources};
use serde::{Deserialize, Serialize};

use crate::cgroups::{self, CgroupError};
use crate::container::{self, ContainerError, ExitStatus, Runtime, Status};
use crate::oci::{self, OciError};
pub use crilog::CriLogStream;
pub use shim::run_shim;
pub use stream_exec::{resize_terminal, ExecProcess, ExecSpec};

const SANDBOX_FILE: &str = "sandbox.json";
const NETNS_FILE: &str = "netns";
const CONTAINERS_DIR: &str = "containers";
const BUNDLES_DIR: &str = "bundles";
/// The holder's own cgroup below the pod cgroup (v2 allows processes only in leaf cgroups).
const HOLDER_CGROUP: &str = "sandbox";

/// Errors of sandbox operations.
#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    #[error("sandbox {0} already exists")]
    Exists(String),
    #[error("sandbox {0} does not exist")]
    NotFound(String),
    #[error("sandbox {0} is not ready: its holder process is gone")]
    NotReady(String),
    #[error("invalid sandbox id {0:?}")]
    InvalidId(String),
    #[error("container {container} in sandbox {sandbox}: {source}")]
    Container {
        sandbox: String,
        container: String,
        #[source]
        source: ContainerError,
    },
    #[error(transparent)]
    Oci(#[from] OciError),
    #[error("cgroup: {0}")]
    Cgroup(#[from] CgroupError),
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("{what}: {source}")]
    Sys {
        what: String,
        source: nix::errno::Errno,
    },
    #[error("sandbox holder: {0}")]
    Holder(String),
    #[error("log shim for {container}: {message}")]
    Shim { container: String, message: String },
    #[error("removing sandbox {id}: {}", errors.join("; "))]
    Teardown { id: String, errors: Vec<String> },
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> SandboxError + '_ {
    move |source| SandboxError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// What a sandbox is created from.
#[derive(Debug, Clone, Default)]
pub struct SandboxConfig {
    pub id: String,
    pub hostname: String,
    /// The pod's cgroup, e.g. `/windlass/kubepods/besteffort/pod<uid>`; created, and removed with the sandbox.
    pub cgroup_parent: PathBuf,
    /// Pod-level resources applied to the pod cgroup.
    pub resources: Option<LinuxResources>,
    /// Containers share the holder's PID namespace (`shareProcessNamespace`).
    pub share_pid: bool,
    /// Namespaced sysctls of the pod (`net.*`, IPC), set in the holder's namespaces.
    pub sysctls: HashMap<String, String>,
    pub labels: HashMap<String, String>,
    pub annotations: HashMap<String, String>,
    /// The pod uses the node's network namespace (`hostNetwork`): the holder joins the caller's network namespace
    /// instead of creating one, nothing is pinned for CNI, and teardown never touches the node's network. The pod
    /// keeps its own UTS namespace carrying the hostname it is given (the node's name), so a container cannot
    /// rename the node (upstream CRI shares the host's UTS namespace, whose name is the same).
    pub host_network: bool,
}

/// Whether the sandbox's holder is alive.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SandboxState {
    Ready,
    NotReady,
}

/// A sandbox as stored on disk and reported to callers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SandboxInfo {
    pub id: String,
    pub hostname: String,
    pub holder_pid: i32,
    holder_start: u64,
    /// The pod's network namespace (a bind mount), to hand to CNI.
    pub netns_path: PathBuf,
    pub cgroup_parent: PathBuf,
    pub share_pid: bool,
    pub created: String,
    pub labels: HashMap<String, String>,
    pub annotations: HashMap<String, String>,
    /// Created with [`SandboxConfig::host_network`]: `netns_path` is empty and containers join the holder's
    /// (the node's) network namespace.
    #[serde(default)]
    pub host_network: bool,
    #[serde(skip_deserializing, default = "not_ready")]
    pub state: SandboxState,
}

fn not_ready() -> SandboxState {
    SandboxState::NotReady
}

/// A container to run in a sandbox: an OCI bundle whose namespaces, hostname and cgroup path the sandbox sets.
#[derive(Debug, Clone)]
pub struct ContainerConfig {
    pub id: String,
    /// Directory with `config.json` and the rootfs it names.
    pub bundle: PathBuf,
    /// The CRI log file the shim writes.
    pub log_path: PathBuf,
}

/// A container of a sandbox as reported to callers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ContainerInfo {
    pub id: String,
    pub sandbox_id: String,
    pub status: Status,
    pub pid: i32,
    pub created: String,
    pub exit: Option<ExitStatus>,
    pub log_path: Option<PathBuf>,
}

/// What [`SandboxManager::exec_sync`] collected.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExecResult {
    pub exit_code: i32,
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
    /// The process was killed because it ran longer than the timeout.
    pub timed_out: bool,
}

#[derive(Debug, Serialize, Deserialize)]
struct ContainerMeta {
    log_path: PathBuf,
}

/// The pod-level runtime API over a state root.
#[derive(Debug, Clone)]
pub struct SandboxManager {
    root: PathBuf,
    cgroup_root: PathBuf,
    runtime_binary: PathBuf,
}

fn validate_id(id: &str) -> Result<(), SandboxError> {
    if !id.is_empty()
        && id != "."
        && id != ".."
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "_+-.".contains(c))
    {
        Ok(())
    } else {
        Err(SandboxError::InvalidId(id.to_string()))
    }
}

impl SandboxManager {
    /// `root` holds one directory per sandbox; `runtime_binary` is the `windlass-runtime` executable (its hidden
    /// `shim` command runs each container's log shim).
    pub fn new(
        root: impl Into<PathBuf>,
        cgroup_root: impl Into<PathBuf>,
        runtime_binary: impl Into<PathBuf>,
    ) -> Self {
        Self {
            root: root.into(),
            cgroup_root: cgroup_root.into(),
            runtime_binary: runtime_binary.into(),
        }
    }

    fn dir(&self, id: &str) -> PathBuf {
        self.root.join(id)
    }

    fn runtime(&self, id: &str) -> Runtime {
        Runtime::new(self.dir(id).join(CONTAINERS_DIR), &self.cgroup_root)
    }

    /// Creates the sandbox: pod cgroup, holder process, pinned network namespace. Undone completely on failure.
    pub fn create_sandbox(&self, cfg: &SandboxConfig) -> Result<SandboxInfo, SandboxError> {
        validate_id(&cfg.id)?;
        for key in cfg.sysctls.keys() {
            match oci::sysctl_namespace(key) {
                Some(LinuxNamespaceType::Ipc) => {}
                Some(LinuxNamespaceType::Network) if !cfg.host_network => {}
                // Ref: upstream pod validation refuses net.* sysctls with hostNetwork: they would change the node.
                Some(LinuxNamespaceType::Network) => {
                    return Err(OciError::Invalid(format!(
                        "pod sysctl {key:?} would change the node's network namespace (hostNetwork)"
                    ))
                    .into())
                }
                _ => {
                    return Err(
                        OciError::Invalid(format!("pod sysctl {key:?} is not namespaced")).into(),
                    )
                }
            }
        }
        fs::create_dir_all(&self.root).map_err(io_err(&self.root))?;
        let dir = self.dir(&cfg.id);
        match fs::create_dir(&dir) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                return Err(SandboxError::Exists(cfg.id.clone()))
            }
            Err(e) => {
                return Err(SandboxError::Io {
                    path: dir,
                    source: e,
                })
            }
        }
        let cgroup_parent = if cfg.cgroup_parent.as_os_str().is_empty() {
            PathBuf::from(format!("/windlass/pod-{}", cfg.id))
        } else {
            cfg.cgroup_parent.clone()
        };
        let mut info = SandboxInfo {
            id: cfg.id.clone(),
            hostname: cfg.hostname.clone(),
            holder_pid: 0,
            holder_start: 0,
            netns_path: if cfg.host_network {
                PathBuf::new()
            } else {
                dir.join(NETNS_FILE)
            },
            cgroup_parent,
            share_pid: cfg.share_pid,
            created: chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Nanos, true),
            labels: cfg.labels.clone(),
            annotations: cfg.annotations.clone(),
            host_network: cfg.host_network,
            state: SandboxState::NotReady,
        };
        match self.start_holder(cfg, &mut info) {
            Ok(()) => {
                info.state = SandboxState::Ready;
                tracing::info!(sandbox = %cfg.id, holder = info.holder_pid, "sandbox created");
                Ok(info)
            }
            Err(e) => {
                let _ = self.teardown(&info);
                Err(e)
            }
        }
    }

    fn start_holder(
        &self,
        cfg: &SandboxConfig,
        info: &mut SandboxInfo,
    ) -> Result<(), SandboxError> {
        let dir = self.dir(&cfg.id);
        write_json(&dir.join(SANDBOX_FILE), info)?;
        let pod_cg = cgroups::create_manager(&self.cgroup_root, &info.cgroup_parent)?;
        pod_cg.create()?;
        if let Some(res) = &cfg.resources {
            pod_cg.apply(res)?;
        }
        let holder_cg =
            cgroups::create_manager(&self.cgroup_root, &info.cgroup_parent.join(HOLDER_CGROUP))?;
        holder_cg.create()?;

        let mut unshare = CloneFlags::CLONE_NEWIPC | CloneFlags::CLONE_NEWUTS;
        if !cfg.host_network {
            unshare |= CloneFlags::CLONE_NEWNET;
        }
        if cfg.share_pid {
            unshare |= CloneFlags::CLONE_NEWPID;
        }
        let joins = container::Joins {
            fds: Vec::new(),
            unshare,
            userns_go: None,
        };
        let (listener, reporter) = container::channel().map_err(|source| SandboxError::Sys {
            what: "pipe".into(),
            source,
        })?;
        let hostname = cfg.hostname.clone();
        let sysctls: Vec<(String, String)> = cfg.sysctls.clone().into_iter().collect();
        let own_network = !cfg.host_network;
        let stage1 = container::spawn(&joins, Some(holder_cg.as_ref()), &[], &reporter, || {
            holder::run(&hostname, &sysctls, own_network, &reporter)
        })
        .map_err(|source| SandboxError::Sys {
            what: "fork".into(),
            source,
        })?;
        drop(reporter);
        let outcome = listener.wait(&cfg.id, &mut |_, _| {
            Err("unexpected user namespace request".into())
        });
        let _ = nix::sys::wait::waitpid(stage1, None);
        if let Some(pid) = outcome.pid {
            info.holder_pid = pid.as_raw();
            info.holder_start = container::proc_stat(pid.as_raw())
                .map(|(s, _)| s)
                .unwrap_or(0);
            write_json(&dir.join(SANDBOX_FILE), info)?;
        }
        if let Some(e) = outcome.error {
            return Err(SandboxError::Holder(e));
        }
        if !outcome.ready || info.holder_pid == 0 {
            return Err(SandboxError::Holder("exited during setup".into()));
        }
        if cfg.host_network {
            // The node's namespace: nothing to pin, nothing for CNI.
            return Ok(());
        }
        // Pin the network namespace for CNI: a bind mount of the holder's nsfs file.
        fs::File::create(&info.netns_path).map_err(io_err(&info.netns_path))?;
        let source = PathBuf::from(format!("/proc/{}/ns/net", info.holder_pid));
        nix::mount::mount(
            Some(&source),
            &info.netns_path,
            None::<&str>,
            nix::mount::MsFlags::MS_BIND,
            None::<&str>,
        )
        .map_err(|source| SandboxError::Sys {
            what: format!("bind {}", info.netns_path.display()),
            source,
        })?;
        Ok(())
    }

    fn load(&self, id: &str) -> Result<SandboxInfo, SandboxError> {
        validate_id(id)?;
        let path = self.dir(id).join(SANDBOX_FILE);
        let text = fs::read_to_string(&path).map_err(|e| {
            if e.kind() == io::ErrorKind::NotFound {
                SandboxError::NotFound(id.to_string())
            } else {
                SandboxError::Io {
                    path: path.clone(),
                    source: e,
                }
            }
        })?;
        let mut info: SandboxInfo = serde_json::from_str(&text).map_err(|e| SandboxError::Io {
            path,
            source: io::Error::other(e),
        })?;
        info.state = if container::alive(info.holder_pid, info.holder_start) {
            SandboxState::Ready
        } else {
            SandboxState::NotReady
        };
        Ok(info)
    }

    /// A sandbox's stored description and whether its holder runs.
    pub fn sandbox(&self, id: &str) -> Result<SandboxInfo, SandboxError> {
        self.load(id)
    }

    /// Every sandbox under the root (e.g. for a restarted kubelet to adopt), sorted by ID.
    pub fn list_sandboxes(&self) -> Result<Vec<SandboxInfo>, SandboxError> {
        let mut out = Vec::new();
        let entries = match fs::read_dir(&self.root) {
            Ok(e) => e,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(out),
            Err(e) => {
                return Err(SandboxError::Io {
                    path: self.root.clone(),
                    source: e,
                })
            }
        };
        for entry in entries.flatten() {
            if let Ok(info) = self.load(&entry.file_name().to_string_lossy()) {
                out.push(info);
            }
        }
        out.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(out)
    }

    fn container_err(
        sandbox: &str,
        container: &str,
    ) -> impl FnOnce(ContainerError) -> SandboxError {
        let (sandbox, container) = (sandbox.to_string(), container.to_string());
        move |source| SandboxError::Container {
            sandbox,
            container,
            source,
        }
    }

    /// Creates a container in the sandbox (its process waits for [`SandboxManager::start_container`]): the
    /// bundle's namespaces are replaced by the sandbox's, its cgroup goes under the pod cgroup, and a log shim
    /// owns its stdio.
    pub fn create_container(
        &self,
        sandbox_id: &str,
        cfg: &ContainerConfig,
    ) -> Result<ContainerInfo, SandboxError> {
        let sb = self.load(sandbox_id)?;
        if sb.state != SandboxState::Ready {
            return Err(SandboxError::NotReady(sandbox_id.into()));
        }
        validate_id(&cfg.id)?;
        let mut bundle = oci::load_bundle(&cfg.bundle)?;
        let spec = &mut bundle.spec;
        let holder_ns = |name: &str| PathBuf::from(format!("/proc/{}/ns/{name}", sb.holder_pid));
        let mut linux = spec.linux().clone().unwrap_or_default();
        let mut namespaces: Vec<LinuxNamespace> = linux
            .namespaces()
            .clone()
            .unwrap_or_default()
            .into_iter()
            .filter(|n| {
                !matches!(
                    n.typ(),
                    LinuxNamespaceType::Network
                        | LinuxNamespaceType::Ipc
                        | LinuxNamespaceType::Uts
                        | LinuxNamespaceType::Pid
                        | LinuxNamespaceType::Mount
                )
            })
            .collect();
        let ns = |typ, path: Option<PathBuf>| {
            let mut n = LinuxNamespace::default();
            n.set_typ(typ);
            n.set_path(path);
            n
        };
        let netns = if sb.host_network {
            holder_ns("net")
        } else {
            sb.netns_path.clone()
        };
        namespaces.push(ns(LinuxNamespaceType::Network, Some(netns)));
        namespaces.push(ns(LinuxNamespaceType::Ipc, Some(holder_ns("ipc"))));
        namespaces.push(ns(LinuxNamespaceType::Uts, Some(holder_ns("uts"))));
        namespaces.push(ns(LinuxNamespaceType::Mount, None));
        namespaces.push(ns(
            LinuxNamespaceType::Pid,
            sb.share_pid.then(|| holder_ns("pid")),
        ));
        linux.set_namespaces(Some(namespaces));
        linux.set_cgroups_path(Some(sb.cgroup_parent.join(&cfg.id)));
        spec.set_linux(Some(linux));
        // The pod's UTS namespace already carries its hostname.
        spec.set_hostname(None);
        spec.set_domainname(None);
        let mut root = spec.root().clone().unwrap_or_default();
        root.set_path(bundle.rootfs.clone());
        spec.set_root(Some(root));
        oci::validate(spec)?;

        // The adjusted bundle the shim creates the container from.
        let bdir = self.dir(sandbox_id).join(BUNDLES_DIR).join(&cfg.id);
        if let Some(parent) = bdir.parent() {
            fs::create_dir_all(parent).map_err(io_err(parent))?;
        }
        // Atomic: of two concurrent creates of one name, exactly one gets the directory.
        match fs::create_dir(&bdir) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                return Err(Self::container_err(sandbox_id, &cfg.id)(
                    ContainerError::Exists(cfg.id.clone()),
                ))
            }
            Err(e) => {
                return Err(SandboxError::Io {
                    path: bdir,
                    source: e,
                })
            }
        }
        let result = self.spawn_shim(sandbox_id, cfg, &bdir, spec);
        if result.is_err() {
            let _ = fs::remove_dir_all(&bdir);
        }
        result?;
        self.container_status(sandbox_id, &cfg.id)
    }

    fn spawn_shim(
        &self,
        sandbox_id: &str,
        cfg: &ContainerConfig,
        bdir: &Path,
        spec: &oci_spec::runtime::Spec,
    ) -> Result<(), SandboxError> {
        write_json(&bdir.join(oci::CONFIG_FILE), spec)?;
        write_json(
            &bdir.join("meta.json"),
            &ContainerMeta {
                log_path: cfg.log_path.clone(),
            },
        )?;
        let rt = self.runtime(sandbox_id);
        let mut child = Command::new(&self.runtime_binary)
            .arg("--root")
            .arg(rt.root())
            .arg("--cgroup-root")
            .arg(&self.cgroup_root)
            .arg("--log")
            .arg(bdir.join("shim.log"))
            .arg("shim")
            .arg("--bundle")
            .arg(bdir)
            .arg("--log-path")
            .arg(&cfg.log_path)
            .arg(&cfg.id)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .map_err(io_err(&self.runtime_binary))?;
        let mut line = String::new();
        if let Some(out) = child.stdout.take() {
            let _ = BufReader::new(out).read_line(&mut line);
        }
        // The first shim process exits at once (the shim proper is detached); reap it.
        let _ = child.wait();
        match line.trim().split_once(' ') {
            Some(("ok", _)) => Ok(()),
            Some(("error", msg)) => Err(SandboxError::Shim {
                container: cfg.id.clone(),
                message: msg.to_string(),
            }),
            _ => Err(SandboxError::Shim {
                container: cfg.id.clone(),
                message: format!("no report ({line:?})"),
            }),
        }
    }

    /// Starts a created container.
    pub fn start_container(
        &self,
        sandbox_id: &str,
        id: &str,
    ) -> Result<ContainerInfo, SandboxError> {
        self.load(sandbox_id)?;
        self.runtime(sandbox_id)
            .start(id)
            .map_err(Self::container_err(sandbox_id, id))?;
        self.container_status(sandbox_id, id)
    }

    /// A container's status, exit status and log path.
    pub fn container_status(
        &self,
        sandbox_id: &str,
        id: &str,
    ) -> Result<ContainerInfo, SandboxError> {
        let rt = self.runtime(sandbox_id);
        let st = rt.state(id).map_err(Self::container_err(sandbox_id, id))?;
        let exit = rt
            .exit_status(id)
            .map_err(Self::container_err(sandbox_id, id))?;
        let meta: Option<ContainerMeta> = fs::read_to_string(
            self.dir(sandbox_id)
                .join(BUNDLES_DIR)
                .join(id)
                .join("meta.json"),
        )
        .ok()
        .and_then(|t| serde_json::from_str(&t).ok());
        Ok(ContainerInfo {
            id: st.id,
            sandbox_id: sandbox_id.to_string(),
            status: st.status,
            pid: st.pid,
            created: st.created,
            exit,
            log_path: meta.map(|m| m.log_path),
        })
    }

    /// A pidfd that becomes readable once the container has ended and its exit status is recorded: the fd of its
    /// log shim, which exits right after writing the exit status. `None` when there is no live shim to watch (the
    /// container stopped already, or its shim is gone): the caller then looks at the state instead. Lets a caller
    /// wait for exits without polling (upstream's PLEG relists every second; an exit event makes that moot).
    pub fn container_exit_fd(
        &self,
        sandbox_id: &str,
        id: &str,
    ) -> Result<Option<std::os::fd::OwnedFd>, SandboxError> {
        validate_id(sandbox_id)?;
        validate_id(id)?;
        let path = self
            .dir(sandbox_id)
            .join(BUNDLES_DIR)
            .join(id)
            .join(shim::SHIM_PID_FILE);
        let pid = match fs::read_to_string(&path) {
            Ok(t) => match t.trim().parse::<i32>() {
                Ok(p) if p > 0 => p,
                _ => return Ok(None),
            },
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(io_err(&path)(e)),
        };
        let Some(fd) = pidfd_open(pid)? else {
            return Ok(None);
        };
        // The fd pins this process; make sure it is this container's shim and not a reused PID.
        let cmdline = fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        let args: Vec<&[u8]> = cmdline
            .split(|b| *b == 0)
            .filter(|a| !a.is_empty())
            .collect();
        let is_shim = args.iter().any(|a| *a == b"shim") && args.last() == Some(&id.as_bytes());
        Ok(is_shim.then_some(fd))
    }

    /// A pidfd that becomes readable when the sandbox's holder process dies; `None` when it is not running.
    pub fn sandbox_exit_fd(&self, id: &str) -> Result<Option<std::os::fd::OwnedFd>, SandboxError> {
        let sb = self.load(id)?;
        if sb.holder_pid <= 0 {
            return Ok(None);
        }
        let Some(fd) = pidfd_open(sb.holder_pid)? else {
            return Ok(None);
        };
        // Checked after opening: the fd now refers to the process that was alive with the recorded start time.
        Ok(container::alive(sb.holder_pid, sb.holder_start).then_some(fd))
    }

    /// Runs `cmd` in a running container and collects its output, killing it after `timeout` (probes, `kubectl
    /// exec` without a terminal). Runs through `windlass-runtime exec`, which waits for the process as a subreaper.
    pub fn exec_sync(
        &self,
        sandbox_id: &str,
        id: &str,
        cmd: &[String],
        timeout: Duration,
    ) -> Result<ExecResult, SandboxError> {
        use std::io::Read;
        self.load(sandbox_id)?;
        validate_id(id)?;
        let rt = self.runtime(sandbox_id);
        let pid_file = self
            .dir(sandbox_id)
            .join(BUNDLES_DIR)
            .join(format!("{id}.exec-{}.pid", std::process::id()));
        let mut child = Command::new(&self.runtime_binary)
            .arg("--root")
            .arg(rt.root())
            .arg("--cgroup-root")
            .arg(&self.cgroup_root)
            .arg("exec")
            .arg("--pid-file")
            .arg(&pid_file)
            .arg(id)
            .arg("--")
            .args(cmd)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(io_err(&self.runtime_binary))?;
        let reader = |r: Option<Box<dyn Read + Send>>| {
            std::thread::spawn(move || {
                let mut buf = Vec::new();
                if let Some(mut r) = r {
                    let _ = r.read_to_end(&mut buf);
                }
                buf
            })
        };
        let out = reader(
            child
                .stdout
                .take()
                .map(|s| Box::new(s) as Box<dyn Read + Send>),
        );
        let err = reader(
            child
                .stderr
                .take()
                .map(|s| Box::new(s) as Box<dyn Read + Send>),
        );
        let mut timed_out = false;
        let deadline = Instant::now() + timeout;
        let status = loop {
            match child.try_wait().map_err(io_err(&self.runtime_binary))? {
                Some(status) => break status,
                None if Instant::now() >= deadline && !timed_out => {
                    timed_out = true;
                    // Kill the process itself (the CLI would only forward a signal), then the CLI ends too.
                    if let Some(pid) = fs::read_to_string(&pid_file)
                        .ok()
                        .and_then(|p| p.trim().parse::<i32>().ok())
                    {
                        let _ = nix::sys::signal::kill(Pid::from_raw(pid), Signal::SIGKILL);
                    }
                    let _ = child.kill();
                }
                None => std::thread::sleep(Duration::from_millis(5)),
            }
        };
        let _ = fs::remove_file(&pid_file);
        Ok(ExecResult {
            exit_code: status.code().unwrap_or(-1),
            stdout: out.join().unwrap_or_default(),
            stderr: err.join().unwrap_or_default(),
            timed_out,
        })
    }

    /// Makes the container's log shim reopen its log file (CRI ReopenContainerLog): after the caller renamed the
    /// file for rotation, new output goes to a new file at the configured path.
    pub fn reopen_container_log(&self, sandbox_id: &str, id: &str) -> Result<(), SandboxError> {
        validate_id(id)?;
        let path = self
            .dir(sandbox_id)
            .join(BUNDLES_DIR)
            .join(id)
            .join(shim::SHIM_PID_FILE);
        let pid: i32 = fs::read_to_string(&path)
            .map_err(io_err(&path))?
            .trim()
            .parse()
            .map_err(|e| SandboxError::Io {
                path: path.clone(),
                source: io::Error::other(e),
            })?;
        // Only a running container has a shim to ask.
        let st = self
            .runtime(sandbox_id)
            .state(id)
            .map_err(Self::container_err(sandbox_id, id))?;
        if st.status != Status::Running {
            return Err(Self::container_err(sandbox_id, id)(
                ContainerError::NotRunning(id.into()),
            ));
        }
        nix::sys::signal::kill(Pid::from_raw(pid), Signal::SIGUSR1).map_err(|source| {
            SandboxError::Sys {
                what: format!("signal log shim {pid}"),
                source,
            }
        })
    }

    /// CPU and memory usage of a container, from its cgroup.
    pub fn container_stats(
        &self,
        sandbox_id: &str,
        id: &str,
    ) -> Result<cgroups::CgroupStats, SandboxError> {
        let cg = self
            .runtime(sandbox_id)
            .cgroup(id)
            .map_err(Self::container_err(sandbox_id, id))?;
        Ok(cg.stats()?)
    }

    /// The containers of a sandbox.
    pub fn list_containers(&self, sandbox_id: &str) -> Result<Vec<ContainerInfo>, SandboxError> {
        self.load(sandbox_id)?;
        let states = self
            .runtime(sandbox_id)
            .list()
            .map_err(Self::container_err(sandbox_id, "*"))?;
        states
            .iter()
            .map(|s| self.container_status(sandbox_id, &s.id))
            .collect()
    }

    /// SIGTERM, then SIGKILL after `grace` if it still runs; returns once it has stopped and the shim recorded
    /// its exit status (bounded).
    pub fn stop_container(
        &self,
        sandbox_id: &str,
        id: &str,
        grace: Duration,
    ) -> Result<ContainerInfo, SandboxError> {
        let rt = self.runtime(sandbox_id);
        let err = Self::container_err(sandbox_id, id);
        let st = rt.state(id).map_err(Self::container_err(sandbox_id, id))?;
        let stopped = |rt: &Runtime| {
            rt.state(id)
                .map(|s| s.status == Status::Stopped)
                .unwrap_or(true)
        };
        if st.status == Status::Paused {
            // Frozen tasks cannot act on SIGTERM (nor die of SIGKILL) until thawed.
            let _ = rt.resume(id);
        }
        if matches!(
            st.status,
            Status::Running | Status::Created | Status::Paused
        ) {
            if !grace.is_zero() {
                let _ = rt.kill(id, Signal::SIGTERM, false);
                wait_until(grace, || stopped(&rt));
            }
            if !stopped(&rt) {
                let _ = rt.kill(id, Signal::SIGKILL, true);
                if !wait_until(Duration::from_secs(10), || stopped(&rt)) {
                    return Err(err(ContainerError::Init(
                        "did not stop after SIGKILL".into(),
                    )));
                }
            }
        }
        // The shim writes the exit status right after reaping the init.
        wait_until(Duration::from_secs(2), || {
            rt.exit_status(id).map(|e| e.is_some()).unwrap_or(true)
        });
        self.container_status(sandbox_id, id)
    }

    /// Removes a container (killing it if needed); its log file stays for the caller to rotate or remove.
    pub fn remove_container(&self, sandbox_id: &str, id: &str) -> Result<(), SandboxError> {
        validate_id(id)?;
        self.runtime(sandbox_id)
            .delete(id, true)
            .map_err(Self::container_err(sandbox_id, id))?;
        let bdir = self.dir(sandbox_id).join(BUNDLES_DIR).join(id);
        match fs::remove_dir_all(&bdir) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(SandboxError::Io {
                path: bdir,
                source: e,
            }),
            _ => Ok(()),
        }
    }

    /// Stops every container (grace period, then SIGKILL) and the holder. The network namespace stays pinned
    /// until the sandbox is removed, so CNI DEL still works.
    pub fn stop_sandbox(&self, id: &str, grace: Duration) -> Result<(), SandboxError> {
        let sb = self.load(id)?;
        let mut errors = Vec::new();
        for c in self.list_containers(id)? {
            if let Err(e) = self.stop_container(id, &c.id, grace) {
                errors.push(e.to_string());
            }
        }
        if container::alive(sb.holder_pid, sb.holder_start) {
            let _ = nix::sys::signal::kill(Pid::from_raw(sb.holder_pid), Signal::SIGKILL);
            if !wait_until(Duration::from_secs(10), || {
                !container::alive(sb.holder_pid, sb.holder_start)
            }) {
                errors.push(format!("holder {} did not die", sb.holder_pid));
            }
            let _ = nix::sys::wait::waitpid(
                Pid::from_raw(sb.holder_pid),
                Some(nix::sys::wait::WaitPidFlag::WNOHANG),
            );
        }
        if errors.is_empty() {
            Ok(())
        } else {
            Err(SandboxError::Teardown {
                id: id.into(),
                errors,
            })
        }
    }

    /// Removes the sandbox: its containers, holder, network namespace pin, cgroups and state. Cleans up all it can
    /// and reports every failure. A missing sandbox is not an error (removal is idempotent, as CRI wants).
    pub fn remove_sandbox(&self, id: &str) -> Result<(), SandboxError> {
        let sb = match self.load(id) {
            Ok(sb) => sb,
            Err(SandboxError::NotFound(_)) => {
                let dir = self.dir(id);
                if dir.exists() {
                    let _ = nix::mount::umount2(&dir.join(NETNS_FILE), MntFlags::MNT_DETACH);
                    fs::remove_dir_all(&dir).map_err(io_err(&dir))?;
                }
                return Ok(());
            }
            Err(e) => return Err(e),
        };
        let mut errors = Vec::new();
        if let Ok(containers) = self.list_containers(id) {
            for c in containers {
                if let Err(e) = self.remove_container(id, &c.id) {
                    errors.push(e.to_string());
                }
            }
        }
        if let Err(SandboxError::Teardown { errors: e, .. }) = self.stop_sandbox(id, Duration::ZERO)
        {
            errors.extend(e);
        }
        if let Err(SandboxError::Teardown { errors: e, .. }) = self.teardown(&sb) {
            errors.extend(e);
        }
        tracing::info!(sandbox = %id, "sandbox removed");
        if errors.is_empty() {
            Ok(())
        } else {
            Err(SandboxError::Teardown {
                id: id.into(),
                errors,
            })
        }
    }

    /// Kills the holder, unpins the netns, removes the cgroups and the state directory, collecting errors.
    fn teardown(&self, sb: &SandboxInfo) -> Result<(), SandboxError> {
        let mut errors = Vec::new();
        if sb.holder_pid > 0 && container::alive(sb.holder_pid, sb.holder_start) {
            let _ = nix::sys::signal::kill(Pid::from_raw(sb.holder_pid), Signal::SIGKILL);
            wait_until(Duration::from_secs(10), || {
                !container::alive(sb.holder_pid, sb.holder_start)
            });
            let _ = nix::sys::wait::waitpid(
                Pid::from_raw(sb.holder_pid),
                Some(nix::sys::wait::WaitPidFlag::WNOHANG),
            );
        }
        if !sb.host_network && !sb.netns_path.as_os_str().is_empty() && sb.netns_path.exists() {
            match nix::mount::umount2(&sb.netns_path, MntFlags::MNT_DETACH) {
                Ok(()) | Err(nix::errno::Errno::EINVAL) => {}
                Err(e) => errors.push(format!("unmount {}: {e}", sb.netns_path.display())),
            }
        }
        for path in [
            sb.cgroup_parent.join(HOLDER_CGROUP),
            sb.cgroup_parent.clone(),
        ] {
            match cgroups::create_manager(&self.cgroup_root, &path) {
                Ok(cg) => {
                    let ok = wait_until(Duration::from_secs(5), || cg.destroy().is_ok());
                    if !ok {
                        if let Err(e) = cg.destroy() {
                            errors.push(format!("cgroup {}: {e}", path.display()));
                        }
                    }
                }
                Err(e) => errors.push(format!("cgroup {}: {e}", path.display())),
            }
        }
        let dir = self.dir(&sb.id);
        if let Err(e) = fs::remove_dir_all(&dir) {
            if e.kind() != io::ErrorKind::NotFound {
                errors.push(format!("{}: {e}", dir.display()));
            }
        }
        if errors.is_empty() {
            Ok(())
        } else {
            Err(SandboxError::Teardown {
                id: sb.id.clone(),
                errors,
            })
        }
    }
}

/// `pidfd_open(2)`: `None` when the process does not exist.
fn pidfd_open(pid: i32) -> Result<Option<std::os::fd::OwnedFd>, SandboxError> {
    use std::os::fd::FromRawFd;
    // SAFETY: pidfd_open takes a PID and flags and returns a new descriptor or -1; no memory is passed.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if fd < 0 {
        let errno = nix::errno::Errno::last();
        return match errno {
            nix::errno::Errno::ESRCH => Ok(None),
            source => Err(SandboxError::Sys {
                what: format!("pidfd_open {pid}"),
                source,
            }),
        };
    }
    // SAFETY: the kernel just returned this descriptor to us and nothing else owns it.
    Ok(Some(unsafe {
        std::os::fd::OwnedFd::from_raw_fd(fd as i32)
    }))
}

fn write_json<T: Serialize>(path: &Path, value: &T) -> Result<(), SandboxError> {
    let tmp = path.with_extension("tmp");
    let text = serde_json::to_vec_pretty(value).map_err(|e| SandboxError::Io {
        path: path.to_path_buf(),
        source: io::Error::other(e),
    })?;
    fs::write(&tmp, text).map_err(io_err(&tmp))?;
    fs::rename(&tmp, path).map_err(io_err(path))
}

/// Polls `done` every 10 ms for up to `timeout`; true if it became true.
fn wait_until(timeout: Duration, mut done: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if done() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}
