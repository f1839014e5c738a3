//! `exec` over WebSocket with the Kubernetes channel protocols (Ref: apimachinery `wsstream` and
//! `remotecommand` constants; KEP-4006 for v5): every binary message starts with a channel byte — 0 stdin,
//! 1 stdout, 2 stderr, 3 error (a `Status` JSON ends the session: `Success`, or `NonZeroExitCode` with the exit
//! code as a cause), 4 resize (`{"Width":W,"Height":H}`) — and `v5.channel.k8s.io` adds 255, "close": `[255, 0]`
//! ends stdin.

use std::os::fd::{AsFd, OwnedFd};
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;
use windlass_runtime::{ExecSpec, SandboxManager};

pub(crate) const STDIN: u8 = 0;
pub(crate) const STDOUT: u8 = 1;
pub(crate) const STDERR: u8 = 2;
pub(crate) const ERROR: u8 = 3;
pub(crate) const RESIZE: u8 = 4;
pub(crate) const CLOSE: u8 = 255;

pub(crate) const V5: &str = "v5.channel.k8s.io";
pub(crate) const V4: &str = "v4.channel.k8s.io";

/// How long output may still drain after the process exited (a background child can hold the pipes open).
const DRAIN: Duration = Duration::from_secs(2);

/// The subprotocol to answer with: the newest we speak of those offered (`Sec-WebSocket-Protocol`).
pub(crate) fn negotiate(offered: &str) -> Option<&'static str> {
    let offered: Vec<&str> = offered.split(',').map(str::trim).collect();
    [V5, V4].into_iter().find(|p| offered.contains(p))
}

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

/// A message on `channel`.
pub(crate) fn frame(channel: u8, data: &[u8]) -> Message {
    let mut v = Vec::with_capacity(data.len() + 1);
    v.push(channel);
    v.extend_from_slice(data);
    Message::Binary(v.into())
}

/// A decoded resize message.
#[derive(Debug, serde::Deserialize, PartialEq, Eq)]
pub(crate) struct TermSize {
    #[serde(rename = "Width")]
    pub width: u16,
    #[serde(rename = "Height")]
    pub height: u16,
}

/// What the client sent, decoded.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Input {
    Stdin(Vec<u8>),
    Resize(TermSize),
    CloseStdin,
    Ignore,
    Gone,
}

pub(crate) fn decode_input(
    msg: Option<Result<Message, impl std::fmt::Display>>,
    v5: bool,
) -> Input {
    match msg {
        Some(Ok(Message::Binary(b))) => match b.first() {
            Some(&STDIN) => Input::Stdin(b[1..].to_vec()),
            Some(&RESIZE) => serde_json::from_slice(&b[1..])
                .map(Input::Resize)
                .unwrap_or(Input::Ignore),
            Some(&CLOSE) if v5 && b.get(1) == Some(&STDIN) => Input::CloseStdin,
            _ => Input::Ignore,
        },
        Some(Ok(Message::Close(_))) | None | Some(Err(_)) => Input::Gone,
        Some(Ok(_)) => Input::Ignore,
    }
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
async fn pump(mut r: impl AsyncRead + Unpin, ch: u8, tx: mpsc::Sender<Message>) {
    let mut buf = vec![0u8; 32 * 1024];
    loop {
        match r.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => {
                if tx.send(frame(ch, &buf[..n])).await.is_err() {
                    return;
                }
            }
        }
    }
}

/// Runs one exec session on an accepted WebSocket: starts the process, streams its stdio, and ends with its exit
/// status on the error channel.
pub(crate) async fn session<S>(
    ws: WebSocketStream<S>,
    protocol: &'static str,
    mgr: SandboxManager,
    sandbox_id: String,
    container_id: String,
    params: ExecParams,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let v5 = protocol == V5;
    let (mut sink, mut source) = ws.split();
    let (tx, mut rx) = mpsc::channel::<Message>(64);
    let writer = tokio::spawn(async move {
        while let Some(m) = rx.recv().await {
            let close = matches!(m, Message::Close(_));
            if sink.send(m).await.is_err() || close {
                break;
            }
        }
        let _ = sink.flush().await;
    });
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
            finish(&tx, failure_status(&e.to_string())).await;
            drop(tx);
            let _ = writer.await;
            return;
        }
        Err(e) => {
            finish(&tx, failure_status(&e.to_string())).await;
            drop(tx);
            let _ = writer.await;
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
                        if n == 0 || out.send(frame(STDOUT, &buf[..n])).await.is_err() {
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
            msg = source.next() => match decode_input(msg, v5) {
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
    finish(&tx, exit_status(code, &params.command)).await;
    drop(tx);
    let _ = tokio::time::timeout(DRAIN, writer).await;
}

/// `attach`: the container's output as it is written (read from its CRI log, which the log shim owning the
/// container's stdio writes, from `start`: its size when the request came), until the container exits. Its stdin belongs to the shim, so attaching stdin is
/// refused with a Status.
pub(crate) async fn attach_session<S>(
    ws: WebSocketStream<S>,
    mgr: SandboxManager,
    sandbox_id: String,
    container_id: String,
    log_path: std::path::PathBuf,
    start: u64,
    params: ExecParams,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    use std::io::{Read, Seek, SeekFrom};
    let (mut sink, mut source) = ws.split();
    let (tx, mut rx) = mpsc::channel::<Message>(64);
    let writer = tokio::spawn(async move {
        while let Some(m) = rx.recv().await {
            let close = matches!(m, Message::Close(_));
            if sink.send(m).await.is_err() || close {
                break;
            }
        }
        let _ = sink.flush().await;
    });
    if params.stdin {
        finish(
            &tx,
            failure_status(
                "attaching stdin is not supported: the container's stdin belongs to its log shim",
            ),
        )
        .await;
        drop(tx);
        let _ = tokio::time::timeout(DRAIN, writer).await;
        return;
    }
    let mut file = match std::fs::File::open(&log_path) {
        Ok(mut f) => {
            let _ = f.seek(SeekFrom::Start(start));
            f
        }
        Err(e) => {
            finish(&tx, failure_status(&format!("{}: {e}", log_path.display()))).await;
            drop(tx);
            let _ = tokio::time::timeout(DRAIN, writer).await;
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
                        if tx.send(frame(ch, &data)).await.is_err() {
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
            msg = source.next() => {
                if decode_input(msg, false) == Input::Gone {
                    writer.abort();
                    return;
                }
            }
        }
    }
    finish(&tx, exit_status(Some(0), &[])).await;
    drop(tx);
    let _ = tokio::time::timeout(DRAIN, writer).await;
}

/// Sends the final status and a normal close.
async fn finish(tx: &mpsc::Sender<Message>, status: Value) {
    let _ = tx.send(frame(ERROR, status.to_string().as_bytes())).await;
    let _ = tx
        .send(Message::Close(Some(CloseFrame {
            code: CloseCode::Normal,
            reason: "".into(),
        })))
        .await;
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
    fn the_newest_offered_channel_protocol_is_chosen() {
        assert_eq!(negotiate("v4.channel.k8s.io, v5.channel.k8s.io"), Some(V5));
        assert_eq!(negotiate("v4.channel.k8s.io,channel.k8s.io"), Some(V4));
        assert_eq!(negotiate("base64.channel.k8s.io"), None);
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
    fn frames_carry_their_channel_and_client_input_decodes() {
        assert_eq!(frame(STDERR, b"x"), Message::Binary(vec![2, b'x'].into()));
        let m = |b: &[u8]| Some(Ok::<_, String>(Message::Binary(b.to_vec().into())));
        assert_eq!(
            decode_input(m(b"\x00ls\n"), true),
            Input::Stdin(b"ls\n".to_vec())
        );
        assert_eq!(
            decode_input(m(b"\x04{\"Width\":80,\"Height\":24}"), false),
            Input::Resize(TermSize {
                width: 80,
                height: 24
            })
        );
        assert_eq!(decode_input(m(&[255, 0]), true), Input::CloseStdin);
        // v4 has no close signal.
        assert_eq!(decode_input(m(&[255, 0]), false), Input::Ignore);
        assert_eq!(
            decode_input(None::<Result<Message, String>>, true),
            Input::Gone
        );
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
