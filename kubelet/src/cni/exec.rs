//! How a plugin binary is run: behind [`PluginExec`] so tests (and a kubelet whose plugins must run in another
//! network namespace) can wrap the invocation, e.g. in `ip netns exec NODE`.

use std::future::Future;
use std::io;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use tokio::io::AsyncWriteExt;

/// What one plugin run produced.
#[derive(Debug, Clone)]
pub struct ExecOutput {
    /// The exit code, or `None` when a signal killed the plugin.
    pub code: Option<i32>,
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
}

/// Why a plugin run did not produce an [`ExecOutput`].
#[derive(Debug, thiserror::Error)]
pub enum ExecError {
    #[error("cannot start {path}: {source}")]
    Spawn { path: PathBuf, source: io::Error },
    #[error("talking to {path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("{path} did not finish within {timeout:?} and was killed")]
    Timeout { path: PathBuf, timeout: Duration },
}

/// Runs a CNI plugin binary with the given environment and stdin.
///
/// The environment is complete: implementations must not add the caller's own environment beyond what they need to
/// start the binary (the spec's parameters are only the `CNI_*` variables).
pub trait PluginExec: Send + Sync {
    fn exec(
        &self,
        plugin: &Path,
        env: &[(String, String)],
        stdin: &[u8],
        timeout: Duration,
    ) -> impl Future<Output = Result<ExecOutput, ExecError>> + Send;
}

/// Runs the plugin as a direct child of this process (the kubelet's own network namespace).
#[derive(Debug, Default, Clone)]
pub struct ProcessExec {
    /// Arguments placed before the plugin path, e.g. `["ip", "netns", "exec", "node1"]`; empty runs it directly.
    pub wrapper: Vec<String>,
}

impl ProcessExec {
    /// Runs plugins through `wrapper` (the first element is the program) followed by the plugin path.
    pub fn wrapped(wrapper: Vec<String>) -> Self {
        Self { wrapper }
    }
}

impl PluginExec for ProcessExec {
    async fn exec(
        &self,
        plugin: &Path,
        env: &[(String, String)],
        stdin: &[u8],
        timeout: Duration,
    ) -> Result<ExecOutput, ExecError> {
        let mut cmd = match self.wrapper.split_first() {
            Some((program, args)) => {
                let mut c = tokio::process::Command::new(program);
                c.args(args).arg(plugin);
                c
            }
            None => tokio::process::Command::new(plugin),
        };
        cmd.env_clear()
            // Plugins such as portmap run iptables/nft and need a PATH to find them.
            .env(
                "PATH",
                std::env::var_os("PATH").unwrap_or_else(|| "/usr/sbin:/usr/bin:/sbin:/bin".into()),
            )
            .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        let mut child = spawn_retrying_busy_text(&mut cmd, plugin, timeout).await?;
        let io_err = |source| ExecError::Io {
            path: plugin.to_path_buf(),
            source,
        };
        let run = async {
            if let Some(mut pipe) = child.stdin.take() {
                // A plugin may exit before reading all of stdin (e.g. on a usage error): that is its answer, not ours.
                match pipe.write_all(stdin).await {
                    Ok(()) => {}
                    Err(e) if e.kind() == io::ErrorKind::BrokenPipe => {}
                    Err(e) => return Err(io_err(e)),
                }
                drop(pipe);
            }
            child.wait_with_output().await.map_err(io_err)
        };
        match tokio::time::timeout(timeout, run).await {
            Ok(out) => {
                let out = out?;
                Ok(ExecOutput {
                    code: out.status.code(),
                    stdout: out.stdout,
                    stderr: out.stderr,
                })
            }
            // Dropping the future drops the child, and kill_on_drop kills it.
            Err(_) => Err(ExecError::Timeout {
                path: plugin.to_path_buf(),
                timeout,
            }),
        }
    }
}

/// How often a spawn that met `ETXTBSY` is tried again, and the first pause (doubled each time).
const BUSY_TEXT_RETRIES: u32 = 5;
const BUSY_TEXT_FIRST_PAUSE: Duration = Duration::from_millis(20);

/// Spawns `cmd`, trying again a few times when the kernel says the binary is still open for writing (`ETXTBSY`).
///
/// That happens when a plugin binary is being replaced while we start it, and, more often, when another thread of
/// this process forked while it held the freshly written file open: the forked child keeps the write descriptor
/// until its own exec closes it. The condition clears by itself within milliseconds, so libcni retries too
/// (invoke.RawExec); every other spawn error is final. The pauses stay within the plugin's own timeout.
async fn spawn_retrying_busy_text(
    cmd: &mut tokio::process::Command,
    plugin: &Path,
    timeout: Duration,
) -> Result<tokio::process::Child, ExecError> {
    let give_up_at = tokio::time::Instant::now() + timeout;
    let mut pause = BUSY_TEXT_FIRST_PAUSE;
    let mut attempt = 0;
    loop {
        match cmd.spawn() {
            Ok(child) => return Ok(child),
            Err(source)
                if source.raw_os_error() == Some(libc::ETXTBSY)
                    && attempt < BUSY_TEXT_RETRIES
                    && tokio::time::Instant::now() + pause < give_up_at =>
            {
                tracing::debug!(plugin = %plugin.display(), attempt, "plugin binary busy, starting it again");
                tokio::time::sleep(pause).await;
                pause *= 2;
                attempt += 1;
            }
            Err(source) => {
                return Err(ExecError::Spawn {
                    path: plugin.to_path_buf(),
                    source,
                })
            }
        }
    }
}

/// Finds `name` in the first directory of `search_path` holding an executable file of that name.
///
/// Ref: libcni invoke.FindInPath.
pub fn find_in_path(name: &str, search_path: &[PathBuf]) -> Option<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    search_path.iter().map(|d| d.join(name)).find(|p| {
        std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn script(dir: &Path, body: &str) -> PathBuf {
        use std::os::unix::fs::PermissionsExt;
        let p = dir.join("plugin");
        std::fs::write(&p, format!("#!/bin/sh\n{body}\n")).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
        p
    }

    #[tokio::test]
    async fn a_plugin_gets_only_the_given_environment_and_stdin() {
        let dir = tempfile::tempdir().unwrap();
        let p = script(dir.path(), r#"echo "$CNI_COMMAND ${HOME:-nohome} $(cat)""#);
        let out = ProcessExec::default()
            .exec(
                &p,
                &[("CNI_COMMAND".into(), "ADD".into())],
                b"{}",
                Duration::from_secs(10),
            )
            .await
            .unwrap();
        assert_eq!(out.code, Some(0));
        assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "ADD nohome {}");
    }

    #[tokio::test]
    async fn a_hanging_plugin_is_killed_at_the_timeout() {
        let dir = tempfile::tempdir().unwrap();
        let p = script(dir.path(), "exec sleep 30");
        let started = std::time::Instant::now();
        let err = ProcessExec::default()
            .exec(&p, &[], b"", Duration::from_millis(300))
            .await
            .unwrap_err();
        assert!(matches!(err, ExecError::Timeout { .. }), "{err}");
        assert!(started.elapsed() < Duration::from_secs(5));
    }

    #[tokio::test]
    async fn a_plugin_still_open_for_writing_starts_once_the_writer_closes_it() {
        let dir = tempfile::tempdir().unwrap();
        let p = script(dir.path(), "echo started");
        // A writer (an upgrade in progress, or a child forked by another thread) holds the binary open: exec fails
        // with ETXTBSY until it lets go.
        let writer = std::fs::OpenOptions::new().append(true).open(&p).unwrap();
        let busy = std::process::Command::new(&p).output().unwrap_err();
        assert_eq!(busy.raw_os_error(), Some(libc::ETXTBSY));
        let release = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(50)).await;
            drop(writer);
        });
        let out = ProcessExec::default()
            .exec(&p, &[], b"", Duration::from_secs(10))
            .await
            .unwrap();
        release.await.unwrap();
        assert_eq!(out.code, Some(0));
        assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "started");
    }

    #[tokio::test]
    async fn a_plugin_that_stays_busy_fails_with_the_kernels_reason() {
        let dir = tempfile::tempdir().unwrap();
        let p = script(dir.path(), "true");
        let _writer = std::fs::OpenOptions::new().append(true).open(&p).unwrap();
        let err = ProcessExec::default()
            .exec(&p, &[], b"", Duration::from_secs(10))
            .await
            .unwrap_err();
        match err {
            ExecError::Spawn { source, .. } => {
                assert_eq!(source.raw_os_error(), Some(libc::ETXTBSY))
            }
            other => panic!("expected a spawn error, got {other}"),
        }
    }

    #[test]
    fn plugins_are_found_in_the_first_directory_that_has_them() {
        let a = tempfile::tempdir().unwrap();
        let b = tempfile::tempdir().unwrap();
        script(b.path(), "true");
        std::fs::write(a.path().join("plugin"), "not executable").unwrap();
        let found = find_in_path("plugin", &[a.path().to_path_buf(), b.path().to_path_buf()]);
        assert_eq!(found, Some(b.path().join("plugin")));
        assert_eq!(find_in_path("other", &[a.path().to_path_buf()]), None);
    }
}
