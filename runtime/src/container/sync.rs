//! The pipe over which the forked setup processes report to the runtime: the init's host PID, warnings, the final
//! "ready" and any error. Each message is one line written with one `write(2)` (< PIPE_BUF, so atomic).

use std::fs::File;
use std::io::{BufRead, BufReader};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};

use nix::fcntl::OFlag;
use nix::unistd::Pid;

/// The child's end; all methods ignore write errors (the parent has gone, nothing more to do).
#[derive(Debug)]
pub(crate) struct Reporter {
    fd: OwnedFd,
}

impl Reporter {
    pub(crate) fn raw(&self) -> RawFd {
        self.fd.as_raw_fd()
    }

    fn send(&self, kind: &str, text: &str) {
        let mut line = format!("{kind} {}", text.replace('\n', " "));
        line.truncate(3800);
        line.push('\n');
        let _ = nix::unistd::write(&self.fd, line.as_bytes());
    }

    pub(crate) fn pid(&self, pid: Pid) {
        self.send("pid", &pid.to_string());
    }

    pub(crate) fn warn(&self, text: &str) {
        self.send("warn", text);
    }

    pub(crate) fn error(&self, text: &str) {
        self.send("error", text);
    }

    /// Stage 1 has a new user namespace and waits for its ID maps.
    pub(crate) fn userns(&self, pid: Pid) {
        self.send("userns", &pid.to_string());
    }

    /// The init's namespaces exist: run the createRuntime/prestart hooks (with the init's host PID).
    pub(crate) fn hooks(&self, pid: i32) {
        self.send("hooks", &pid.to_string());
    }

    pub(crate) fn ready(&self) {
        self.send("ready", "");
    }
}

/// What the parent learnt from the setup processes.
#[derive(Debug, Default)]
pub(crate) struct Outcome {
    pub(crate) pid: Option<Pid>,
    pub(crate) error: Option<String>,
    pub(crate) ready: bool,
}

/// The parent's end.
#[derive(Debug)]
pub(crate) struct Listener {
    file: File,
}

pub(crate) fn channel() -> nix::Result<(Listener, Reporter)> {
    let (r, w) = nix::unistd::pipe2(OFlag::O_CLOEXEC)?;
    Ok((
        Listener {
            file: File::from(r),
        },
        Reporter { fd: w },
    ))
}

impl Listener {
    /// Reads until "ready", an error or end of file (every writer gone). Warnings are logged; a "userns" request
    /// (write the ID maps) or "hooks" request (run createRuntime hooks) runs `on_request`, which then lets the
    /// child go on.
    pub(crate) fn wait(
        self,
        what: &str,
        on_request: &mut dyn FnMut(&str, Pid) -> Result<(), String>,
    ) -> Outcome {
        let mut out = Outcome::default();
        for line in BufReader::new(self.file).lines() {
            let Ok(line) = line else { break };
            let (kind, text) = line.split_once(' ').unwrap_or((line.as_str(), ""));
            match kind {
                "pid" => {
                    out.pid = text.trim().parse().ok().map(Pid::from_raw);
                    if out.ready {
                        break;
                    }
                }
                "warn" => tracing::warn!(container = %what, "{text}"),
                "userns" | "hooks" => {
                    let pid = text
                        .trim()
                        .parse()
                        .map(Pid::from_raw)
                        .unwrap_or(Pid::from_raw(0));
                    if let Err(e) = on_request(kind, pid) {
                        out.error = Some(e);
                        break;
                    }
                }
                "error" => {
                    out.error = Some(text.to_string());
                    break;
                }
                "ready" => {
                    out.ready = true;
                    // Stage 2 can report before stage 1 has sent its PID: wait for both.
                    if out.pid.is_some() {
                        break;
                    }
                }
                _ => {}
            }
        }
        out
    }
}
