//! Interactive exec in a sandbox container (the kubelet API's `exec`, `kubectl exec [-it]`): the process runs
//! through `windlass-runtime exec`, which waits for it as a subreaper and exits with its exit code, while the caller
//! streams its stdio — plain pipes, or a pty whose master the runtime hands over a console socket (as runc's
//! `--console-socket`), so the caller can also resize it.

use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::net::UnixListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use super::{io_err, validate_id, SandboxError, SandboxManager};
use crate::container::{receive_pty, Status};

/// How long the runtime may take to start the process and send the pty master.
const CONSOLE_TIMEOUT: Duration = Duration::from_secs(15);

/// What to run with [`SandboxManager::exec_process`].
#[derive(Debug, Clone, Default)]
pub struct ExecSpec {
    pub cmd: Vec<String>,
    /// Run on a new pty (stdin, stdout and stderr are all the terminal).
    pub tty: bool,
    /// Give the process a stdin pipe (without a tty); otherwise it reads `/dev/null`.
    pub stdin: bool,
    /// Initial terminal size (columns, rows).
    pub size: Option<(u16, u16)>,
}

/// A running exec: `child` is the `windlass-runtime exec` process, whose exit code is the process's. Without a tty
/// its `stdin` (if asked for), `stdout` and `stderr` are pipes; with one, `terminal` is the pty master.
#[derive(Debug)]
pub struct ExecProcess {
    pub child: Child,
    pub terminal: Option<OwnedFd>,
}

/// Sets a terminal's window size (`TIOCSWINSZ` on the pty master); the process gets `SIGWINCH`.
pub fn resize_terminal(master: &OwnedFd, cols: u16, rows: u16) -> std::io::Result<()> {
    let ws = libc::winsize {
        ws_row: rows,
        ws_col: cols,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCSWINSZ reads a winsize struct that lives across the call; the fd is valid (borrowed).
    if unsafe { libc::ioctl(master.as_raw_fd(), libc::TIOCSWINSZ, &ws) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

impl SandboxManager {
    /// Starts `spec.cmd` in a running container of the sandbox and returns it with its stdio for the caller to
    /// stream. The caller waits for `child` (its exit code is the process's; 1 with a message on the runtime's
    /// stderr if the process could not start) and may send it SIGTERM/SIGINT, which it forwards.
    pub fn exec_process(
        &self,
        sandbox_id: &str,
        id: &str,
        spec: &ExecSpec,
    ) -> Result<ExecProcess, SandboxError> {
        self.load(sandbox_id)?;
        validate_id(id)?;
        if spec.cmd.is_empty() {
            return Err(SandboxError::Oci(crate::oci::OciError::Invalid(
                "exec: no command given".into(),
            )));
        }
        let rt = self.runtime(sandbox_id);
        let st = rt.state(id).map_err(Self::container_err(sandbox_id, id))?;
        if st.status != Status::Running {
            return Err(Self::container_err(sandbox_id, id)(
                crate::container::ContainerError::NotRunning(id.into()),
            ));
        }
        let mut cmd = Command::new(&self.runtime_binary);
        cmd.arg("--root")
            .arg(rt.root())
            .arg("--cgroup-root")
            .arg(&self.cgroup_root)
            .arg("exec");
        if !spec.tty {
            cmd.arg(id)
                .arg("--")
                .args(&spec.cmd)
                .stdin(if spec.stdin {
                    Stdio::piped()
                } else {
                    Stdio::null()
                })
                .stdout(Stdio::piped())
                .stderr(Stdio::piped());
            let child = cmd.spawn().map_err(io_err(&self.runtime_binary))?;
            return Ok(ExecProcess {
                child,
                terminal: None,
            });
        }
        // A unix socket path must fit in sun_path (108 bytes), so it lives in a short directory of the sandbox
        // root's own (not a sandbox: listing skips it), else in the temporary directory.
        static SEQ: AtomicU64 = AtomicU64::new(0);
        let dir = self.root.join(".exec");
        let sock_dir = if dir.as_os_str().len() < 60 {
            dir
        } else {
            std::env::temp_dir()
        };
        std::fs::create_dir_all(&sock_dir).map_err(io_err(&sock_dir))?;
        let sock: PathBuf = sock_dir.join(format!(
            "exec-{}-{}.sock",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_file(&sock);
        let listener = UnixListener::bind(&sock).map_err(io_err(&sock))?;
        let result = (|| {
            listener.set_nonblocking(true).map_err(io_err(&sock))?;
            cmd.arg("--tty")
                .arg("--console-socket")
                .arg(&sock)
                .arg(id)
                .arg("--")
                .args(&spec.cmd)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::piped());
            let mut child = cmd.spawn().map_err(io_err(&self.runtime_binary))?;
            let deadline = Instant::now() + CONSOLE_TIMEOUT;
            let conn = loop {
                match listener.accept() {
                    Ok((c, _)) => break c,
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                    Err(e) => {
                        let _ = child.kill();
                        let _ = child.wait();
                        return Err(io_err(&sock)(e));
                    }
                }
                // The runtime failed before sending a pty (e.g. no such container): its stderr says why.
                if let Ok(Some(status)) = child.try_wait() {
                    let mut msg = String::new();
                    if let Some(mut err) = child.stderr.take() {
                        use std::io::Read;
                        let _ = err.read_to_string(&mut msg);
                    }
                    return Err(SandboxError::Container {
                        sandbox: sandbox_id.into(),
                        container: id.into(),
                        source: crate::container::ContainerError::Init(format!(
                            "exec exited ({status}) before opening a terminal: {}",
                            msg.trim()
                        )),
                    });
                }
                if Instant::now() >= deadline {
                    let _ = child.kill();
                    let _ = child.wait();
                    return Err(SandboxError::Holder(format!(
                        "exec in {id}: no terminal received within {CONSOLE_TIMEOUT:?}"
                    )));
                }
                std::thread::sleep(Duration::from_millis(5));
            };
            let _ = conn.set_nonblocking(false);
            let master = receive_pty(&conn).map_err(Self::container_err(sandbox_id, id))?;
            if let Some((cols, rows)) = spec.size {
                let _ = resize_terminal(&master, cols, rows);
            }
            Ok(ExecProcess {
                child,
                terminal: Some(master),
            })
        })();
        let _ = std::fs::remove_file(&sock);
        result
    }
}
