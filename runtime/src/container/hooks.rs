//! OCI lifecycle hooks: programs run with the container's state JSON on stdin.
//! Ref: OCI runtime spec config.md#posix-platform-hooks and runtime.md#lifecycle.
//!
//! createRuntime and prestart run in the runtime's namespaces once the container's namespaces exist (the init waits
//! before `pivot_root`); createContainer runs in the container's namespaces before `pivot_root` and startContainer
//! right before the process starts (both by the init); poststart after `start`, poststop in `delete`.

use std::io::{Read, Write};
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use oci_spec::runtime::Hook;

/// Runs `hooks` in order, each with `state` on stdin; the first failure (exit status, timeout) is the error.
pub(crate) fn run(hooks: &[Hook], state: &str, stage: &str) -> Result<(), String> {
    for hook in hooks {
        run_one(hook, state).map_err(|e| format!("{stage} hook {}: {e}", hook.path().display()))?;
    }
    Ok(())
}

fn run_one(hook: &Hook, state: &str) -> Result<(), String> {
    let args = hook.args().clone().unwrap_or_default();
    let mut cmd = Command::new(hook.path());
    if let Some((arg0, rest)) = args.split_first() {
        cmd.arg0(arg0).args(rest);
    }
    cmd.env_clear();
    for kv in hook.env().as_deref().unwrap_or_default() {
        if let Some((k, v)) = kv.split_once('=') {
            cmd.env(k, v);
        }
    }
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| e.to_string())?;
    if let Some(mut stdin) = child.stdin.take() {
        // A hook that does not read its stdin is fine (EPIPE).
        let _ = stdin.write_all(state.as_bytes());
    }
    let timeout = hook
        .timeout()
        .filter(|t| *t > 0)
        .map(|t| Duration::from_secs(t as u64));
    let started = Instant::now();
    let status = loop {
        match child.try_wait().map_err(|e| e.to_string())? {
            Some(status) => break status,
            None if timeout.is_some_and(|t| started.elapsed() >= t) => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!("timed out after {:?}", timeout.unwrap_or_default()));
            }
            None => std::thread::sleep(Duration::from_millis(2)),
        }
    };
    if status.success() {
        return Ok(());
    }
    let mut stderr = String::new();
    if let Some(mut e) = child.stderr.take() {
        let _ = e.read_to_string(&mut stderr);
    }
    Err(format!("{status}: {}", stderr.trim()))
}
