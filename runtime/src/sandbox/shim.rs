//! The per-container log shim: `windlass-runtime shim`, started by [`super::SandboxManager`]. It detaches (double
//! fork, new session, child subreaper), creates the container with its stdout/stderr on pipes, reports the result
//! to its starter on its original stdout, then copies the pipes into a CRI-format log file and records the init's
//! exit status (and OOM kill) in the container's state directory. Being its own process, it outlives a restart of
//! the kubelet that started it, like containerd's shim or conmon.

use std::fs::{self, File};
use std::io::Write;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use nix::fcntl::OFlag;
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::{ForkResult, Pid};

use super::crilog::CriLogStream;
use crate::container::{become_subreaper, ContainerError, CreateOptions, ExitStatus, Runtime};
use crate::oci;

fn sys(what: &str) -> impl FnOnce(nix::errno::Errno) -> ContainerError + '_ {
    move |source| ContainerError::Sys {
        what: what.to_string(),
        source,
    }
}

fn dup2(from: &impl AsRawFd, to: i32) -> Result<(), ContainerError> {
    // SAFETY: dup2 onto a standard descriptor; both fds are valid.
    if unsafe { libc::dup2(from.as_raw_fd(), to) } < 0 {
        return Err(ContainerError::Sys {
            what: "dup2".into(),
            source: nix::errno::Errno::last(),
        });
    }
    Ok(())
}

/// Runs the shim. Returns in the short-lived first process (so the starter can reap it); the detached shim
/// never returns from here: it exits when the container has exited.
pub fn run_shim(
    rt: &Runtime,
    id: &str,
    bundle: &Path,
    log_path: &Path,
) -> Result<(), ContainerError> {
    // SAFETY: the CLI process is single-threaded here; the child continues as a normal program.
    match unsafe { nix::unistd::fork() }.map_err(sys("fork"))? {
        ForkResult::Parent { .. } => return Ok(()),
        ForkResult::Child => {}
    }
    let code = match detached(rt, id, bundle, log_path) {
        Ok(()) => 0,
        Err(e) => {
            tracing::error!(container = %id, "shim: {e}");
            1
        }
    };
    std::process::exit(code)
}

/// Set by SIGUSR1: reopen the log file (CRI ReopenContainerLog, after the kubelet rotated it).
static REOPEN: AtomicBool = AtomicBool::new(false);

extern "C" fn request_reopen(_: libc::c_int) {
    REOPEN.store(true, Ordering::SeqCst);
}

/// The file in the container's bundle directory holding the shim's PID.
pub(crate) const SHIM_PID_FILE: &str = "shim.pid";

fn detached(rt: &Runtime, id: &str, bundle: &Path, log_path: &Path) -> Result<(), ContainerError> {
    nix::unistd::setsid().map_err(sys("setsid"))?;
    become_subreaper()?;
    let handler = nix::sys::signal::SigAction::new(
        nix::sys::signal::SigHandler::Handler(request_reopen),
        nix::sys::signal::SaFlags::empty(),
        nix::sys::signal::SigSet::empty(),
    );
    // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
    unsafe { nix::sys::signal::sigaction(nix::sys::signal::Signal::SIGUSR1, &handler) }
        .map_err(sys("sigaction"))?;
    let pid_file = bundle.join(SHIM_PID_FILE);
    fs::write(&pid_file, std::process::id().to_string()).map_err(|source| ContainerError::Io {
        path: pid_file,
        source,
    })?;
    // Our stdout is the starter's pipe: keep it aside for the one-line report.
    let report = std::io::stdout()
        .as_fd()
        .try_clone_to_owned()
        .map_err(|source| ContainerError::Io {
            path: "stdout".into(),
            source,
        })?;
    let mut report = File::from(report);
    let result = setup(rt, id, bundle, log_path);
    match result {
        Ok((init, streams, log)) => {
            let _ = writeln!(report, "ok {init}");
            drop(report);
            pump(rt, id, init, streams, log, log_path)
        }
        Err(e) => {
            let _ = writeln!(report, "error {}", e.to_string().replace('\n', " "));
            Err(e)
        }
    }
}

type Streams = [(OwnedFd, CriLogStream); 2];

fn setup(
    rt: &Runtime,
    id: &str,
    bundle: &Path,
    log_path: &Path,
) -> Result<(Pid, Streams, File), ContainerError> {
    if let Some(dir) = log_path.parent() {
        fs::create_dir_all(dir).map_err(|source| ContainerError::Io {
            path: dir.to_path_buf(),
            source,
        })?;
    }
    let log = fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log_path)
        .map_err(|source| ContainerError::Io {
            path: log_path.to_path_buf(),
            source,
        })?;
    let b = oci::load_bundle(bundle)?;
    let (out_r, out_w) = nix::unistd::pipe2(OFlag::O_CLOEXEC).map_err(sys("pipe"))?;
    let (err_r, err_w) = nix::unistd::pipe2(OFlag::O_CLOEXEC).map_err(sys("pipe"))?;
    let null = File::options()
        .read(true)
        .write(true)
        .open("/dev/null")
        .map_err(|source| ContainerError::Io {
            path: "/dev/null".into(),
            source,
        })?;
    // The init inherits fds 0-2: /dev/null and the two pipes.
    dup2(&null, 0)?;
    dup2(&out_w, 1)?;
    dup2(&err_w, 2)?;
    drop((out_w, err_w));
    let created = rt.create_from(id, b, CreateOptions::default());
    // Our own copies of the write ends must go, or the pipes never reach end-of-file.
    dup2(&null, 1)?;
    dup2(&null, 2)?;
    let state = created?;
    Ok((
        Pid::from_raw(state.pid),
        [
            (out_r, CriLogStream::new("stdout")),
            (err_r, CriLogStream::new("stderr")),
        ],
        log,
    ))
}

/// Copies both pipes into the log until they close and the init has been reaped, then records the exit status.
fn pump(
    rt: &Runtime,
    id: &str,
    init: Pid,
    streams: Streams,
    mut log: File,
    log_path: &Path,
) -> Result<(), ContainerError> {
    let mut open = [true, true];
    let mut exit: Option<ExitStatus> = None;
    let mut exited_at: Option<Instant> = None;
    let mut buf = vec![0u8; 64 * 1024];
    let [(out_fd, mut out_s), (err_fd, mut err_s)] = streams;
    loop {
        if REOPEN.swap(false, Ordering::SeqCst) {
            match fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(log_path)
            {
                Ok(f) => log = f,
                Err(e) => tracing::warn!(container = %id, "reopening {}: {e}", log_path.display()),
            }
        }
        while let Ok(ws) = waitpid(Pid::from_raw(-1), Some(WaitPidFlag::WNOHANG)) {
            let (pid, code, signal) = match ws {
                WaitStatus::Exited(p, c) => (p, c, None),
                WaitStatus::Signaled(p, s, _) => (p, 128 + s as i32, Some(s as i32)),
                WaitStatus::StillAlive => break,
                _ => continue,
            };
            if pid == init {
                let oom_killed = rt
                    .cgroup(id)
                    .ok()
                    .and_then(|c| c.oom_killed().ok())
                    .unwrap_or(false);
                exit = Some(ExitStatus {
                    code,
                    signal,
                    oom_killed,
                    finished_at: chrono::Utc::now()
                        .to_rfc3339_opts(chrono::SecondsFormat::Nanos, true),
                });
                exited_at = Some(Instant::now());
            }
        }
        let pipes_done = !open[0] && !open[1];
        // Orphans in a shared PID namespace may hold the pipes: stop copying a second after the init is gone.
        let linger_over = exited_at.is_some_and(|t| t.elapsed() > Duration::from_secs(1));
        if exit.is_some() && (pipes_done || linger_over) {
            break;
        }
        if pipes_done {
            std::thread::sleep(Duration::from_millis(50));
            continue;
        }
        let mut fds = Vec::new();
        let mut which = Vec::new();
        if open[0] {
            fds.push(PollFd::new(out_fd.as_fd(), PollFlags::POLLIN));
            which.push(0);
        }
        if open[1] {
            fds.push(PollFd::new(err_fd.as_fd(), PollFlags::POLLIN));
            which.push(1);
        }
        match poll(&mut fds, PollTimeout::from(100u16)) {
            Ok(0) | Err(nix::errno::Errno::EINTR) => continue,
            Ok(_) => {}
            Err(e) => {
                return Err(ContainerError::Sys {
                    what: "poll".into(),
                    source: e,
                })
            }
        }
        let ready: Vec<usize> = fds
            .iter()
            .zip(&which)
            .filter(|(f, _)| f.revents().is_some_and(|r| !r.is_empty()))
            .map(|(_, w)| *w)
            .collect();
        drop(fds);
        for w in ready {
            let (fd, stream) = if w == 0 {
                (&out_fd, &mut out_s)
            } else {
                (&err_fd, &mut err_s)
            };
            let n = match nix::unistd::read(fd, &mut buf) {
                Ok(n) => n,
                Err(nix::errno::Errno::EINTR | nix::errno::Errno::EAGAIN) => continue,
                Err(_) => 0,
            };
            let written = if n == 0 {
                open[w] = false;
                stream.finish(&mut log)
            } else {
                stream.feed(&mut log, &buf[..n])
            };
            if let Err(e) = written {
                tracing::warn!(container = %id, "writing the log: {e}");
            }
        }
    }
    let _ = out_s.finish(&mut log);
    let _ = err_s.finish(&mut log);
    if let Some(status) = exit {
        rt.record_exit(id, &status)?;
    }
    Ok(())
}
