//! Fixtures shared by Windlass's cross-crate and end-to-end tests.
//!
//! Every privileged test starts with [`require_privileged`]: on a developer's unprivileged machine it skips with a
//! message, but under `WINDLASS_REQUIRE_PRIVILEGED=1` (CI) a missing privilege or tool fails the test instead.
//! Everything a test creates is owned by an RAII guard from this crate, so it is removed on failure too, and every
//! name comes from [`unique_name`], so tests can run in parallel.

use std::io;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

pub use tempfile::TempDir;

pub mod api_lab;
pub mod bench;
pub mod bundle;
pub mod cgroup;
pub mod cni;
pub mod cni_lab;
pub mod control;
pub mod etcd;
pub mod image_fixture;
pub mod kubelet_lab;
pub mod lab;
pub mod netns;
pub mod proxy_lab;
pub mod registry;
pub mod runtime;

/// The environment variable CI sets: privileged tests must then fail, never skip, when they cannot run.
pub const REQUIRE_PRIVILEGED_ENV: &str = "WINDLASS_REQUIRE_PRIVILEGED";

/// Whether a privileged test may run: true when we are root and every `tools` entry is on `PATH`.
///
/// Otherwise it panics when `WINDLASS_REQUIRE_PRIVILEGED=1` (so CI fails), or prints why and returns false so a
/// developer's unprivileged run skips the test.
pub fn require_privileged(tools: &[&str]) -> bool {
    let mut missing = Vec::new();
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        missing.push("root".to_string());
    }
    for tool in tools {
        if which(tool).is_none() {
            missing.push(format!("the `{tool}` tool"));
        }
    }
    if missing.is_empty() {
        return true;
    }
    let why = format!("privileged test needs {}", missing.join(", "));
    if std::env::var(REQUIRE_PRIVILEGED_ENV).is_ok_and(|v| v == "1") {
        panic!("{why} ({REQUIRE_PRIVILEGED_ENV}=1, so this fails instead of skipping)");
    }
    eprintln!("SKIPPED: {why}");
    false
}

/// The full path of `tool` if it is an executable on `PATH` (or an existing path itself).
pub fn which(tool: &str) -> Option<PathBuf> {
    if tool.contains('/') {
        let p = PathBuf::from(tool);
        return p.exists().then_some(p);
    }
    let path = std::env::var_os("PATH").unwrap_or_else(|| "/usr/sbin:/usr/bin:/sbin:/bin".into());
    std::env::split_paths(&path)
        .map(|dir| dir.join(tool))
        .find(|candidate| candidate.is_file())
}

/// A name unique to this process and call, short enough for interface names (≤ 15 bytes) when `prefix` is ≤ 4.
pub fn unique_name(prefix: &str) -> String {
    static COUNTER: AtomicU32 = AtomicU32::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    format!("{prefix}{:x}{n:x}", std::process::id() % 0x10_0000)
}

/// Polls `condition` every 20 ms until it returns `Some`, or fails with `what` after `timeout`.
pub fn wait_for<T>(what: &str, timeout: Duration, mut condition: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = condition() {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Runs a command to completion and returns its stdout, failing the test with its stderr if it exits non-zero.
pub fn run_ok(cmd: &mut Command) -> String {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}):\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A child process killed (SIGKILL) and reaped when the guard drops, so a failing test leaves no process behind.
pub struct ChildGuard {
    child: Option<Child>,
}

impl ChildGuard {
    pub fn spawn(cmd: &mut Command) -> io::Result<Self> {
        Ok(Self {
            child: Some(cmd.spawn()?),
        })
    }

    pub fn id(&self) -> u32 {
        self.child.as_ref().map(Child::id).unwrap_or(0)
    }

    pub fn child_mut(&mut self) -> &mut Child {
        self.child.as_mut().expect("child taken")
    }

    /// The child's stdout (spawned piped), line by line, read on a thread of its own: a long-running client such
    /// as `kubectl logs -f` or `kubectl port-forward` keeps writing, and a pipe nobody drains would block or kill it.
    pub fn stdout_lines(&mut self) -> std::sync::mpsc::Receiver<String> {
        use std::io::BufRead;
        let stdout = self.child_mut().stdout.take().expect("stdout piped");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in io::BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    return;
                }
            }
        });
        rx
    }

    /// Takes the child out of the guard, e.g. to wait for it with its output.
    pub fn into_inner(mut self) -> Child {
        self.child.take().expect("child taken")
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        if let Some(child) = self.child.as_mut() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// The workspace's root directory (where the top-level `Cargo.toml` is).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .to_path_buf()
}

/// Path of a binary built from this workspace (e.g. `windlass-runtime`), next to the running test executable.
///
/// Cargo puts integration test executables in `target/<profile>/deps/`, binaries in `target/<profile>/`.
pub fn workspace_binary(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("current test executable");
    // Test executables live in target/<profile>/deps, bench binaries in target/<profile>.
    let dir = exe.parent().expect("executable has a directory");
    let profile_dir = if dir.file_name().is_some_and(|n| n == "deps") {
        dir.parent().expect("target/<profile>")
    } else {
        dir
    };
    let bin = profile_dir.join(name);
    assert!(
        bin.exists(),
        "{} is not built: run `cargo build --workspace --bins` first (the README's test command does)",
        bin.display()
    );
    bin
}

/// Chooses rustls's ring backend for this test process. The workspace enables both of rustls's crypto backends
/// (ring, and aws-lc-rs through reqwest), and then rustls panics rather than pick one for a TLS client.
pub fn install_rustls_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// A loopback TCP port for a server a test starts, free when this returns.
///
/// Ports come from 20000–31999, below the kernel's default ephemeral range (32768–60999): a port picked by
/// binding port 0 is ephemeral, and between our check and the server's own bind an outgoing connection or another
/// test's bind(0) can take it. Each call in a process gets a different port (a process-wide counter, started at a
/// pid-derived offset so concurrent test binaries start apart).
pub fn free_port() -> u16 {
    const FIRST: u32 = 20_000;
    const SPAN: u32 = 12_000;
    static NEXT: AtomicU32 = AtomicU32::new(u32::MAX);
    let _ = NEXT.compare_exchange(
        u32::MAX,
        (std::process::id() * 97) % SPAN,
        Ordering::Relaxed,
        Ordering::Relaxed,
    );
    for _ in 0..SPAN {
        let offset = NEXT.fetch_add(1, Ordering::Relaxed) % SPAN;
        let port = u16::try_from(FIRST + offset).expect("ports stay below 32000");
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free loopback port in {FIRST}..{}", FIRST + SPAN);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn free_ports_are_distinct_bindable_and_below_the_ephemeral_range() {
        let a = free_port();
        let b = free_port();
        assert_ne!(a, b);
        for p in [a, b] {
            assert!((20_000..32_000).contains(&p), "{p}");
            std::net::TcpListener::bind(("127.0.0.1", p)).expect("the port is free");
        }
    }
}
