//! The code that runs in the forked children: the two-stage spawn into namespaces, then the container's init (or
//! an `exec`'d process) up to `execve`. Ref: runc's nsexec stages and standard_init_linux.go / setns_init_linux.go.
//!
//! Everything here runs after `fork` in a possibly multi-threaded parent: no logging, no locks; failures are sent to
//! the runtime as text through the [`Reporter`] and the process `_exit`s.

use std::fs::File;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};

use nix::sched::CloneFlags;
use nix::unistd::{ForkResult, Pid};
use oci_spec::runtime::{Process, Spec};

use super::process::{self, Failed};
use super::rootfs::{self, RootfsPlan};
use super::sync::Reporter;
use super::tty;
use crate::cgroups::CgroupManager;
use crate::oci::SeccompProgram;

/// Closes every descriptor from 3 up except `keep`, so a child does not hold another container's pipes or locks
/// (the parent may be a multi-threaded library user spawning several containers at once).
pub(crate) fn close_fds_except(keep: &[RawFd]) {
    let mut keep: Vec<RawFd> = keep.iter().copied().filter(|fd| *fd >= 3).collect();
    keep.sort_unstable();
    let mut next: u32 = 3;
    for k in keep {
        let k = k as u32;
        if k > next {
            // SAFETY: close_range only closes descriptors; none of those in the range are used afterwards.
            unsafe { libc::syscall(libc::SYS_close_range, next, k - 1, 0) };
        }
        next = k + 1;
    }
    // SAFETY: as above.
    unsafe { libc::syscall(libc::SYS_close_range, next, u32::MAX, 0) };
}

fn exit_with(report: &Reporter, failed: Failed) -> ! {
    report.error(&failed);
    // SAFETY: _exit ends the forked child without running the parent's atexit handlers or destructors.
    unsafe { libc::_exit(1) }
}

/// Namespaces to enter, opened before forking.
pub(crate) struct Joins {
    pub(crate) fds: Vec<(CloneFlags, OwnedFd)>,
    pub(crate) unshare: CloneFlags,
    /// With a new user namespace: the read end of the pipe on which the runtime says the ID maps are written.
    pub(crate) userns_go: Option<OwnedFd>,
}

/// Forks stage 1, which joins the cgroup and the namespaces and forks stage 2 (PID 1 of a new PID namespace), reports
/// stage 2's host PID and exits. Stage 2 runs `child`, which only returns on failure. Returns stage 1's PID.
pub(crate) fn spawn(
    joins: &Joins,
    cgroup: Option<&dyn CgroupManager>,
    keep: &[RawFd],
    report: &Reporter,
    child: impl FnOnce() -> Failed,
) -> nix::Result<Pid> {
    // SAFETY: the child only runs the code below and _exits; glibc's fork resets the allocator locks, and the
    // child does no logging, so no lock held by another parent thread is needed.
    match unsafe { nix::unistd::fork() }? {
        ForkResult::Parent { child } => Ok(child),
        ForkResult::Child => {
            let mut fds: Vec<RawFd> = keep.to_vec();
            fds.push(report.raw());
            fds.extend(joins.fds.iter().map(|(_, fd)| fd.as_raw_fd()));
            fds.extend(joins.userns_go.iter().map(|fd| fd.as_raw_fd()));
            close_fds_except(&fds);
            if let Some(cg) = cgroup {
                if let Err(e) = cg.add_task(Pid::this()) {
                    exit_with(report, format!("joining cgroup: {e}"));
                }
            }
            // A joined user namespace first (it grants the capabilities for the rest), the mount namespace last
            // (the order runc uses). All joins precede a new user namespace, which would drop our rights over the
            // host's namespaces.
            let order = |f: CloneFlags| match f {
                CloneFlags::CLONE_NEWUSER => 0,
                CloneFlags::CLONE_NEWNS => 2,
                _ => 1,
            };
            let mut ordered: Vec<&(CloneFlags, OwnedFd)> = joins.fds.iter().collect();
            ordered.sort_by_key(|(f, _)| order(*f));
            for (flag, fd) in ordered {
                if let Err(e) = nix::sched::setns(fd, *flag) {
                    exit_with(report, format!("setns {flag:?}: {e}"));
                }
            }
            let mut unshare = joins.unshare;
            if unshare.contains(CloneFlags::CLONE_NEWUSER) {
                unshare.remove(CloneFlags::CLONE_NEWUSER);
                if let Err(e) = nix::sched::unshare(CloneFlags::CLONE_NEWUSER) {
                    exit_with(report, format!("unshare user namespace: {e}"));
                }
                // Only a process outside the namespace may write its uid_map/gid_map: ask the runtime.
                report.userns(Pid::this());
                let mut go = [0u8; 1];
                let got = joins
                    .userns_go
                    .as_ref()
                    .map(|fd| nix::unistd::read(fd, &mut go));
                if !matches!(got, Some(Ok(1))) {
                    exit_with(
                        report,
                        "the runtime did not write the user namespace ID maps".into(),
                    );
                }
            }
            if joins.unshare.contains(CloneFlags::CLONE_NEWUSER)
                || joins
                    .fds
                    .iter()
                    .any(|(f, _)| *f == CloneFlags::CLONE_NEWUSER)
            {
                // Become root of the user namespace proper (capabilities stay: we were not its root before).
                let root_g = nix::unistd::Gid::from_raw(0);
                let root_u = nix::unistd::Uid::from_raw(0);
                if let Err(e) = nix::unistd::setresgid(root_g, root_g, root_g)
                    .and_then(|_| nix::unistd::setresuid(root_u, root_u, root_u))
                {
                    exit_with(
                        report,
                        format!("becoming root in the user namespace: {e} (is 0 mapped?)"),
                    );
                }
            }
            if let Err(e) = nix::sched::unshare(unshare) {
                exit_with(report, format!("unshare {unshare:?}: {e}"));
            }
            // SAFETY: as for the first fork; this process is single-threaded now.
            match unsafe { nix::unistd::fork() } {
                Err(e) => exit_with(report, format!("fork init: {e}")),
                Ok(ForkResult::Parent { child }) => {
                    report.pid(child);
                    // SAFETY: see exit_with.
                    unsafe { libc::_exit(0) }
                }
                Ok(ForkResult::Child) => {
                    let failed = child();
                    exit_with(report, failed)
                }
            }
        }
    }
}

/// What the container init needs, prepared by the runtime.
pub(crate) struct InitArgs<'a> {
    pub(crate) spec: &'a Spec,
    pub(crate) plan: &'a RootfsPlan,
    /// `exec.fifo`, opened read-write by the runtime (a user-namespaced init may not be allowed to open it).
    pub(crate) fifo: RawFd,
    pub(crate) console: Option<RawFd>,
    pub(crate) seccomp: &'a SeccompProgram,
    pub(crate) report: &'a Reporter,
    /// The state hooks get (PID filled in by the init); the read end of the runtime's "go" pipe when the
    /// createRuntime/prestart hooks must run before `pivot_root`.
    pub(crate) state: super::State,
    pub(crate) go: Option<RawFd>,
}

/// The container's init: filesystem, hostname, sysctls, then the process; blocks on `exec.fifo` until `start`.
pub(crate) fn container_init(a: InitArgs<'_>) -> Failed {
    match init_steps(&a) {
        Ok(never) => match never {},
        Err(e) => e,
    }
}

fn init_steps(a: &InitArgs<'_>) -> Result<std::convert::Infallible, Failed> {
    let process = a.spec.process().clone().ok_or("process is missing")?;
    process::reset_signals();
    nix::unistd::setsid().map_err(|e| format!("setsid: {e}"))?;
    process::apply_oom_score_adj(&process, std::path::Path::new("/proc/self"), a.report);
    // `start` writes one byte into the FIFO that the read below waits for.
    // SAFETY: the runtime passed this fd for the init to own; nothing else in this process uses it.
    let mut fifo = unsafe { <File as std::os::fd::FromRawFd>::from_raw_fd(a.fifo) };
    let hooks = a.spec.hooks().clone().unwrap_or_default();
    let mut state = a.state.clone();
    // Before pivot_root, /proc is still the host's: its "self" is our host PID, which hooks are given.
    state.pid = std::fs::read_link("/proc/self")
        .ok()
        .and_then(|p| p.to_string_lossy().parse().ok())
        .unwrap_or(0);
    let mut before_pivot = || -> Result<(), Failed> {
        if let Some(go) = a.go {
            a.report.hooks(state.pid);
            let mut byte = [0u8; 1];
            // SAFETY: borrowing the inherited pipe fd for one read; it stays open (and is O_CLOEXEC).
            let fd = unsafe { std::os::fd::BorrowedFd::borrow_raw(go) };
            if !matches!(nix::unistd::read(fd, &mut byte), Ok(1)) {
                return Err("the runtime's createRuntime hooks failed".into());
            }
        }
        let json = serde_json::to_string(&state).unwrap_or_default();
        super::hooks::run(
            hooks.create_container().as_deref().unwrap_or_default(),
            &json,
            "createContainer",
        )
    };
    rootfs::prepare(a.spec, a.plan, &mut before_pivot)?;
    if let Some(h) = a.spec.hostname().as_deref().filter(|h| !h.is_empty()) {
        nix::unistd::sethostname(h).map_err(|e| format!("sethostname: {e}"))?;
    }
    if let Some(d) = a.spec.domainname().as_deref().filter(|d| !d.is_empty()) {
        // SAFETY: a valid buffer and its length.
        if unsafe { libc::setdomainname(d.as_ptr().cast(), d.len()) } != 0 {
            return Err(format!(
                "setdomainname: {}",
                std::io::Error::last_os_error()
            ));
        }
    }
    rootfs::apply_sysctls(a.spec)?;
    // Ref: runc creates a missing cwd (before the root may become read-only); Kubernetes' workingDir relies on it.
    let _ = std::fs::create_dir_all(process.cwd());
    if let Some(sock) = a.console {
        let size = process
            .console_size()
            .as_ref()
            .map(|b| (b.height() as u16, b.width() as u16));
        tty::setup_console(sock, size)?;
        let _ = nix::unistd::close(sock);
    }
    rootfs::finalize(a.spec)?;
    let cmd = prepare_process(&process, a.seccomp, a.report)?;
    a.report.ready();
    let mut byte = [0u8; 1];
    use std::io::Read;
    fifo.read_exact(&mut byte)
        .map_err(|e| format!("waiting for start: {e}"))?;
    drop(fifo);
    state.status = super::Status::Running;
    let json = serde_json::to_string(&state).unwrap_or_default();
    super::hooks::run(
        hooks.start_container().as_deref().unwrap_or_default(),
        &json,
        "startContainer",
    )?;
    Err(finish_process(&process, a.seccomp, &cmd))
}

/// Steps shared by init and exec up to the point of no return.
fn prepare_process(
    process: &Process,
    seccomp: &SeccompProgram,
    report: &Reporter,
) -> Result<process::Command, Failed> {
    let entered = process::chdir(process)?;
    process::apply_rlimits(process, report)?;
    process::apply_umask(process);
    let no_new_privs = process.no_new_privileges().unwrap_or(false);
    if !no_new_privs {
        // Without no_new_privs, installing a filter needs CAP_SYS_ADMIN, so it goes in before caps are dropped.
        process::apply_seccomp(seccomp)?;
    }
    process::apply_user_and_caps(process, report)?;
    if !entered {
        nix::unistd::chdir(process.cwd())
            .map_err(|e| format!("chdir to cwd {:?}: {e}", process.cwd()))?;
    }
    process::apply_no_new_privs(process)?;
    process::prepare_command(process)
}

fn finish_process(process: &Process, seccomp: &SeccompProgram, cmd: &process::Command) -> Failed {
    if process.no_new_privileges().unwrap_or(false) {
        // As late as possible, so only execve itself runs under the filter. Ref: runc standard_init_linux.go.
        if let Err(e) = process::apply_seccomp(seccomp) {
            return e;
        }
    }
    process::exec(cmd)
}

/// An `exec`'d process, already inside the container's namespaces and cgroup.
pub(crate) fn exec_process(
    process: &Process,
    seccomp: &SeccompProgram,
    console: Option<RawFd>,
    report: &Reporter,
) -> Failed {
    let run = || -> Result<std::convert::Infallible, Failed> {
        process::reset_signals();
        nix::unistd::setsid().map_err(|e| format!("setsid: {e}"))?;
        process::apply_oom_score_adj(process, std::path::Path::new("/proc/self"), report);
        if let Some(sock) = console {
            let size = process
                .console_size()
                .as_ref()
                .map(|b| (b.height() as u16, b.width() as u16));
            tty::setup_console(sock, size)?;
            let _ = nix::unistd::close(sock);
        }
        let cmd = prepare_process(process, seccomp, report)?;
        // No "ready": the runtime sees the report pipe close (O_CLOEXEC) when execve succeeds.
        Err(finish_process(process, seccomp, &cmd))
    };
    match run() {
        Ok(never) => match never {},
        Err(e) => e,
    }
}
