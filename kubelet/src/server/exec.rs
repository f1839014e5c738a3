//! `exec` and `attach` sessions: the process (or the container's output) behind the channels of
//! [`super::remotecommand`], which carry them over WebSocket or SPDY.

use std::os::fd::{AsFd, OwnedFd};
use std::time::Duration;

use serde_json::{json, Value};
use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::mpsc;
use windlass_runtime::{ExecSpec, SandboxManager};

use super::remotecommand::{Channels, Input, Output, TermSize, STDERR, STDOUT};

/// How long output may still drain after the process exited (a background child can hold the pipes open).
const DRAIN: Duration = Duration::from_secs(2);

/// The query of an exec request (upstream `remotecommand` options: `command` repeated; `stdin`, `stdout`,
/// `stderr`, `tty` as booleans, the API server sending `1`/`true`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct ExecParams {
    pub command: Vec<String>,
    pub stdin: bool,
    pub stdout: bool,
    pub stderr: bool,
    pub tty: bool,
}

impl ExecParams {
    pub fn parse(query: &[(String, String)]) -> Result<Self, String> {
        let on = |v: &str| matches!(v, "1" | "true" | "True" | "TRUE");
        let mut p = ExecParams::default();
        for (k, v) in query {
            match k.as_str() {
                "command" => p.command.push(v.clone()),
                "stdin" | "input" => p.stdin = on(v),
                "stdout" | "output" => p.stdout = on(v),
                "stderr" | "error" => p.stderr = on(v),
                "tty" => p.tty = on(v),
                _ => {}
            }
        }
        if p.command.is_empty() {
            return Err("you must specify at least one command for the container".into());
        }
        if !p.stdin && !p.stdout && !p.stderr {
            return Err("you must specify at least one of stdin, stdout, stderr".into());
        }
        // Ref: upstream refuses a tty together with stderr (a terminal has one output stream).
        if p.tty && p.stderr {
            p.stderr = false;
        }
        Ok(p)
    }
}

/// The `Status` sent on the error channel when the process ended with `code` (Ref: upstream
/// `remotecommand/websocket.go` / `exec.go`).
pub(crate) fn exit_status(code: Option<i32>, command: &[String]) -> Value {
    match code {
        Some(0) => json!({"metadata": {}, "status": "Success"}),
        Some(c) => json!({
            "metadata": {},
            "status": "Failure",
            "message": format!("command terminated with non-zero exit code: error executing command {command:?}, exit code {c}"),
            "reason": "NonZeroExitCode",
            "details": {"causes": [{"reason": "ExitCode", "message": c.to_string()}]},
        }),
        None => json!({
            "metadata": {}, "status": "Failure", "reason": "InternalError",
            "message": "the exec process ended without an exit code",
        }),
    }
}

fn failure_status(message: &str) -> Value {
    json!({"metadata": {}, "status": "Failure", "reason": "InternalError", "code": 500, "message": message})
}

/// A pty master driven by the reactor (non-blocking), so no thread is held while the terminal is idle.
struct Pty(AsyncFd<OwnedFd>);

impl Pty {
    fn new(fd: OwnedFd) -> std::io::Result<Self> {
        let flags = nix::fcntl::fcntl(&fd, nix::fcntl::FcntlArg::F_GETFL)?;
        let flags = nix::fcntl::OFlag::from_bits_truncate(flags) | nix::fcntl::OFlag::O_NONBLOCK;
        nix::fcntl::fcntl(&fd, nix::fcntl::FcntlArg::F_SETFL(flags))?;
        // SAFETY: an OwnedFd is open and keeps its descriptor until dropped, which happens only with the AsyncFd.
        let fd = unsafe { AsyncFd::register(fd) }.map_err(std::io::Error::from)?;
        Ok(Self(fd))
    }

    /// 0 at the end (EIO once every slave fd is closed counts as the end).
    async fn read(&self, buf: &mut [u8]) -> std::io::Result<usize> {
        loop {
            let mut guard = self.0.readable().await?;
            match guard.try_io(|fd| {
                nix::unistd::read(fd.get_ref().as_fd(), buf).map_err(std::io::Error::from)
            }) {
                Ok(Err(e)) if e.raw_os_error() == Some(libc::EIO) => return Ok(0),
                Ok(r) => return r,
                Err(_would_block) => continue,
            }
        }
    }

    async fn write_all(&self, mut data: &[u8]) -> std::io::Result<()> {
        while !data.is_empty() {
            let mut guard = self.0.writable().await?;
            match guard
                .try_io(|fd| nix::unistd::write(fd.get_ref(), data).map_err(std::io::Error::from))
            {
                Ok(Ok(n)) => data = &data[n..],
                Ok(Err(e)) => return Err(e),
                Err(_would_block) => continue,
            }
        }
        Ok(())
    }

    fn resize(&self, s: &TermSize) {
        let _ = windlass_runtime::resize_terminal(self.0.get_ref(), s.width, s.height);
    }
}

/// Copies `r` to channel `ch` until its end or until the session is gone.
async fn pump(mut r: impl AsyncRead + Unpin, ch: u8, tx: mpsc::Sender<Output>) {
    let mut buf = vec![0u8; 32 * 1024];
    loop {
        match r.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => {
                if tx.send(Output::Data(ch, buf[..n].to_vec())).await.is_err() {
                    return;
                }
            }
        }
    }
}

/// Runs one exec session: starts the process, streams its stdio, and ends with its exit status.
pub(crate) async fn session(
    channels: Channels,
    mgr: SandboxManager,
    sandbox_id: String,
    container_id: String,
    params: ExecParams,
) {
    let Channels {
        out: tx,
        mut input,
        done: writer,
    } = channels;
    let spec = ExecSpec {
        cmd: params.command.clone(),
        tty: params.tty,
        stdin: params.stdin,
        size: None,
    };
    let started = {
        let mgr = mgr.clone();
        let (sb, id) = (sandbox_id.clone(), container_id.clone());
        tokio::task::spawn_blocking(move || mgr.exec_process(&sb, &id, &spec)).await
    };
    let mut process = match started {
        Ok(Ok(p)) => p,
        Ok(Err(e)) => {
            finish(tx, writer, failure_status(&e.to_string())).await;
            return;
        }
        Err(e) => {
            finish(tx, writer, failure_status(&e.to_string())).await;
            return;
        }
    };
    let pid = process.child.id();
    let mut pumps = Vec::new();
    let mut stdin: Option<Box<dyn AsyncWrite + Unpin + Send>> = None;
    let mut pty: Option<std::sync::Arc<Pty>> = None;
    if let Some(master) = process.terminal.take() {
        match Pty::new(master) {
            Ok(p) => {
                let p = std::sync::Arc::new(p);
                let reader = p.clone();
                let out = tx.clone();
                pumps.push(tokio::spawn(async move {
                    let mut buf = vec![0u8; 32 * 1024];
                    while let Ok(n) = reader.read(&mut buf).await {
                        if n == 0
                            || out
                                .send(Output::Data(STDOUT, buf[..n].to_vec()))
                                .await
                                .is_err()
                        {
                            break;
                        }
                    }
                }));
                pty = Some(p);
            }
            Err(e) => tracing::warn!(error = %e, "cannot drive the exec terminal"),
        }
    } else {
        if let Some(out) = process.child.stdout.take() {
            if let Ok(out) = tokio::process::ChildStdout::from_std(out) {
                pumps.push(tokio::spawn(pump(out, STDOUT, tx.clone())));
            }
        }
        if let Some(err) = process.child.stderr.take() {
            if let Ok(err) = tokio::process::ChildStderr::from_std(err) {
                pumps.push(tokio::spawn(pump(err, STDERR, tx.clone())));
            }
        }
        if let Some(i) = process.child.stdin.take() {
            if let Ok(i) = tokio::process::ChildStdin::from_std(i) {
                stdin = Some(Box::new(i));
            }
        }
    }
    let mut child = process.child;
    let mut wait = tokio::task::spawn_blocking(move || child.wait());
    let status = loop {
        tokio::select! {
            done = &mut wait => break done.ok().and_then(|r| r.ok()),
            msg = input.recv() => match msg.unwrap_or(Input::Gone) {
                Input::Stdin(data) => {
                    if let Some(p) = &pty {
                        if params.stdin {
                            let _ = p.write_all(&data).await;
                        }
                    } else if let Some(w) = &mut stdin {
                        if w.write_all(&data).await.is_err() || w.flush().await.is_err() {
                            stdin = None;
                        }
                    }
                }
                Input::Resize(s) => {
                    if let Some(p) = &pty {
                        p.resize(&s);
                    }
                }
                Input::CloseStdin => {
                    if let Some(mut w) = stdin.take() {
                        let _ = w.shutdown().await;
                    }
                    if let Some(p) = &pty {
                        // A terminal has no "end of input" but ^D at the start of a line (EOT).
                        let _ = p.write_all(&[4]).await;
                    }
                }
                Input::Ignore => {}
                Input::Gone => {
                    // The client left: stop the process (the runtime's exec forwards SIGTERM), then reap it in
                    // the background.
                    drop(stdin.take());
                    if let Ok(pid) = i32::try_from(pid) {
                        let _ = nix::sys::signal::kill(
                            nix::unistd::Pid::from_raw(pid),
                            nix::sys::signal::Signal::SIGTERM,
                        );
                    }
                    tokio::spawn(async move { let _ = wait.await; });
                    for p in pumps {
                        p.abort();
                    }
                    drop(tx);
                    writer.abort();
                    return;
                }
            }
        }
    };
    drop(stdin);
    for p in pumps {
        let abort = p.abort_handle();
        if tokio::time::timeout(DRAIN, p).await.is_err() {
            abort.abort();
        }
    }
    drop(pty);
    let code = status.and_then(|s| {
        s.code().or_else(|| {
            use std::os::unix::process::ExitStatusExt;
            s.signal().map(|sig| 128 + sig)
        })
    });
    finish(tx, writer, exit_status(code, &params.command)).await;
}

/// `attach`: the container's output as it is written (read from its CRI log, which the log shim owning the
/// container's stdio writes, from `start`: its size when the request came), until the container exits. Its stdin
/// belongs to the shim, so attaching stdin is refused with a Status.
pub(crate) async fn attach_session(
    channels: Channels,
    mgr: SandboxManager,
    sandbox_id: String,
    container_id: String,
    log_path: std::path::PathBuf,
    start: u64,
    params: ExecParams,
) {
    use std::io::{Read, Seek, SeekFrom};
    let Channels {
        out: tx,
        mut input,
        done: writer,
    } = channels;
    if params.stdin {
        let refused = failure_status(
            "attaching stdin is not supported: the container's stdin belongs to its log shim",
        );
        finish(tx, writer, refused).await;
        return;
    }
    let mut file = match std::fs::File::open(&log_path) {
        Ok(mut f) => {
            let _ = f.seek(SeekFrom::Start(start));
            f
        }
        Err(e) => {
            let status = failure_status(&format!("{}: {e}", log_path.display()));
            finish(tx, writer, status).await;
            return;
        }
    };
    let mut pending = Vec::new();
    let mut buf = vec![0u8; 32 * 1024];
    let mut exited = false;
    loop {
        let n = file.read(&mut buf).unwrap_or(0);
        if n > 0 {
            pending.extend_from_slice(&buf[..n]);
            let mut consumed = 0;
            while let Some(pos) = pending[consumed..].iter().position(|b| *b == b'\n') {
                if let Some(e) = super::logs::parse_entry(&pending[consumed..consumed + pos]) {
                    let ch = if e.stream == "stderr" && !params.tty {
                        STDERR
                    } else {
                        STDOUT
                    };
                    let wanted = if ch == STDERR {
                        params.stderr
                    } else {
                        params.stdout
                    };
                    if wanted {
                        let mut data = e.content.to_vec();
                        if e.full {
                            data.push(b'\n');
                        }
                        if tx.send(Output::Data(ch, data)).await.is_err() {
                            return;
                        }
                    }
                }
                consumed += pos + 1;
            }
            pending.drain(..consumed);
            continue;
        }
        if exited {
            break;
        }
        let running = {
            let (mgr, sb, id) = (mgr.clone(), sandbox_id.clone(), container_id.clone());
            tokio::task::spawn_blocking(move || {
                mgr.container_status(&sb, &id)
                    .is_ok_and(|c| c.status == windlass_runtime::Status::Running)
            })
            .await
            .unwrap_or(false)
        };
        if !running {
            exited = true;
            continue;
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(100)) => {}
            msg = input.recv() => {
                if matches!(msg, None | Some(Input::Gone)) {
                    writer.abort();
                    return;
                }
            }
        }
    }
    finish(tx, writer, exit_status(Some(0), &[])).await;
}

/// Sends the final status, which ends the session, and waits (bounded) until it was written.
async fn finish(tx: mpsc::Sender<Output>, writer: tokio::task::JoinHandle<()>, status: Value) {
    let _ = tx.send(Output::Status(status)).await;
    drop(tx);
    let _ = tokio::time::timeout(DRAIN, writer).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn q(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn exec_params_take_repeated_commands_and_tty_drops_stderr() {
        let p = ExecParams::parse(&q(&[
            ("command", "sh"),
            ("command", "-c"),
            ("command", "echo hi"),
            ("stdout", "1"),
            ("stderr", "true"),
            ("tty", "true"),
            ("container", "c"),
        ]))
        .unwrap();
        assert_eq!(p.command, ["sh", "-c", "echo hi"]);
        assert!(p.stdout && p.tty && !p.stderr && !p.stdin);
        assert!(ExecParams::parse(&q(&[("stdout", "1")])).is_err());
        assert!(ExecParams::parse(&q(&[("command", "ls")])).is_err());
    }

    #[test]
    fn exit_codes_become_upstreams_status_objects() {
        assert_eq!(exit_status(Some(0), &[])["status"], "Success");
        let s = exit_status(Some(3), &["sh".into()]);
        assert_eq!(s["reason"], "NonZeroExitCode");
        assert_eq!(s["details"]["causes"][0]["reason"], "ExitCode");
        assert_eq!(s["details"]["causes"][0]["message"], "3");
    }
}
