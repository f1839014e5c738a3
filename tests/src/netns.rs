//! Network namespaces owned by a test: created with `ip netns add`, deleted when the guard drops.

use std::io;
use std::path::PathBuf;
use std::process::Command;

/// A named network namespace (`/run/netns/<name>`) that is deleted on drop, with its links.
pub struct NetnsGuard {
    name: String,
}

impl NetnsGuard {
    /// Creates `name` with its loopback up. Use [`crate::unique_name`] for the name.
    pub fn new(name: &str) -> io::Result<Self> {
        let status = Command::new("ip").args(["netns", "add", name]).status()?;
        if !status.success() {
            return Err(io::Error::other(format!(
                "ip netns add {name} failed: {status}"
            )));
        }
        let guard = Self {
            name: name.to_string(),
        };
        guard.exec(&["ip", "link", "set", "lo", "up"])?;
        Ok(guard)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn path(&self) -> PathBuf {
        PathBuf::from("/run/netns").join(&self.name)
    }

    /// A `Command` that runs `program` inside this namespace (`ip netns exec`).
    pub fn command(&self, program: &str) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.name, program]);
        cmd
    }

    /// Runs `argv` in the namespace and fails unless it exits zero.
    pub fn exec(&self, argv: &[&str]) -> io::Result<String> {
        let out = self.command(argv[0]).args(&argv[1..]).output()?;
        if !out.status.success() {
            return Err(io::Error::other(format!(
                "{argv:?} in netns {} failed: {}",
                self.name,
                String::from_utf8_lossy(&out.stderr)
            )));
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }
}

impl Drop for NetnsGuard {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "delete", &self.name])
            .status();
    }
}
