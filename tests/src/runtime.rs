//! Fixtures for runtime tests: a `windlass-runtime` CLI with its own `--root`, and probes for what a container may
//! leave behind (cgroup directories, mounts).

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use crate::bundle::Bundle;
use crate::{unique_name, workspace_binary};

/// Where the cgroup hierarchies are mounted on the test machine.
pub const CGROUP_ROOT: &str = "/sys/fs/cgroup";

/// The `windlass-runtime` binary with a private state root; deletes (forcibly) every container it finds there on
/// drop, so a failing test leaves no process, cgroup or mount behind.
pub struct RuntimeCli {
    root: tempfile::TempDir,
    bin: PathBuf,
}

impl Default for RuntimeCli {
    fn default() -> Self {
        Self::new()
    }
}

impl RuntimeCli {
    pub fn new() -> Self {
        let root = tempfile::Builder::new()
            .prefix("windlass-rt-root-")
            .tempdir()
            .expect("state root");
        Self {
            root,
            bin: workspace_binary("windlass-runtime"),
        }
    }

    pub fn root(&self) -> &Path {
        self.root.path()
    }

    /// `windlass-runtime --root <root> args...` with stdin from /dev/null.
    pub fn command(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(&self.bin);
        cmd.arg("--root")
            .arg(self.root.path())
            .args(args)
            .stdin(Stdio::null());
        cmd
    }

    /// Runs to completion and returns the output (any exit status).
    ///
    /// stdout and stderr go to files, not pipes: a created container's init inherits them and keeps them open,
    /// so reading a pipe to its end would wait for the container (as with runc).
    pub fn output(&self, args: &[&str]) -> Output {
        let out = tempfile::tempfile().expect("stdout file");
        let err = tempfile::tempfile().expect("stderr file");
        let status = self
            .command(args)
            .stdout(out.try_clone().expect("dup"))
            .stderr(err.try_clone().expect("dup"))
            .status()
            .unwrap_or_else(|e| panic!("cannot run windlass-runtime {args:?}: {e}"));
        let read = |mut f: fs::File| {
            use std::io::{Read, Seek};
            let mut v = Vec::new();
            f.seek(std::io::SeekFrom::Start(0)).expect("seek");
            f.read_to_end(&mut v).expect("read");
            v
        };
        Output {
            status,
            stdout: read(out),
            stderr: read(err),
        }
    }

    /// Runs and fails the test unless it exits zero; returns stdout.
    pub fn ok(&self, args: &[&str]) -> String {
        let out = self.output(args);
        assert!(
            out.status.success(),
            "windlass-runtime {args:?} failed ({}):\nstdout: {}\nstderr: {}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// `run` in the foreground: (exit code, stdout, stderr).
    pub fn run(&self, bundle: &Bundle, id: &str) -> (i32, String, String) {
        let out = self.output(&["run", "--bundle", &bundle.path().to_string_lossy(), id]);
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    /// `run --detach`: starts the container in the background and fails the test if that fails.
    pub fn run_detached(&self, bundle: &Bundle, id: &str) {
        self.ok(&[
            "run",
            "--detach",
            "--bundle",
            &bundle.path().to_string_lossy(),
            id,
        ]);
    }

    /// The `status` field of `state ID`, or None if the command fails.
    pub fn status(&self, id: &str) -> Option<String> {
        let out = self.output(&["state", id]);
        if !out.status.success() {
            return None;
        }
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
        v["status"].as_str().map(str::to_string)
    }

    /// The state directories under the root (one per container).
    pub fn state_dirs(&self) -> Vec<String> {
        fs::read_dir(self.root.path())
            .map(|d| {
                d.flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default()
    }
}

impl Drop for RuntimeCli {
    fn drop(&mut self) {
        for id in self.state_dirs() {
            let _ = self.command(&["delete", "--force", &id]).output();
        }
    }
}

/// A cgroup path unique to this test, under a `windlass-test` parent.
pub fn unique_cgroup(prefix: &str) -> String {
    format!("/windlass-test/{}", unique_name(prefix))
}

/// Sets `linux.cgroupsPath` of a bundle (call `write_config` afterwards).
pub fn set_cgroup(bundle: &mut Bundle, path: &str) {
    bundle.config_mut()["linux"]["cgroupsPath"] = serde_json::json!(path);
}

/// The directories of cgroup `path` that exist in any hierarchy under [`CGROUP_ROOT`].
pub fn cgroup_dirs(path: &str) -> Vec<PathBuf> {
    let rel = path.trim_start_matches('/');
    fs::read_dir(CGROUP_ROOT)
        .map(|d| {
            d.flatten()
                .map(|e| e.path().join(rel))
                .filter(|p| p.is_dir())
                .collect()
        })
        .unwrap_or_default()
}

/// Lines of our /proc/self/mountinfo that mention `needle` (e.g. a bundle's rootfs path).
pub fn mounts_mentioning(needle: &str) -> Vec<String> {
    fs::read_to_string("/proc/self/mountinfo")
        .unwrap_or_default()
        .lines()
        .filter(|l| l.contains(needle))
        .map(str::to_string)
        .collect()
}
