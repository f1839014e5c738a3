//! Applying scripts with the `nft` tool: one `nft -f -` run is one atomic kernel transaction.
//!
//! Text through `nft -f` was measured against JSON through the same tool (`nft -j -f`, which is what the `nftables`
//! crate drives): see BENCHMARKS-proxy.md. Nothing here lists the table; the sync path only writes.

use std::ffi::OsString;
use std::io::Write;
use std::process::{Command, Stdio};

/// Failure to run `nft` or a rejected transaction (nothing of it was applied).
#[derive(Debug, thiserror::Error)]
pub enum NftError {
    #[error("cannot run {program:?}: {source}")]
    Spawn {
        program: OsString,
        source: std::io::Error,
    },
    #[error("nft rejected the transaction ({status}); nothing was applied: {stderr}")]
    Rejected { status: String, stderr: String },
}

/// How to invoke `nft`: the program and leading arguments (e.g. `["ip", "netns", "exec", "lab", "nft"]` in tests).
#[derive(Debug, Clone)]
pub struct Nft {
    argv: Vec<OsString>,
}

impl Default for Nft {
    fn default() -> Self {
        Self::new(vec!["nft".into()])
    }
}

impl Nft {
    /// `argv` must not be empty; an empty one means plain `nft`.
    pub fn new(argv: Vec<OsString>) -> Self {
        if argv.is_empty() {
            return Self::default();
        }
        Self { argv }
    }

    fn command(&self) -> Command {
        let mut cmd = Command::new(&self.argv[0]);
        cmd.args(&self.argv[1..]);
        cmd
    }

    /// Runs `script` as one transaction (`nft -f -`).
    pub fn apply(&self, script: &str) -> Result<(), NftError> {
        let mut cmd = self.command();
        cmd.args(["-f", "-"])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let spawn_err = |source| NftError::Spawn {
            program: self.argv[0].clone(),
            source,
        };
        let mut child = cmd.spawn().map_err(spawn_err)?;
        // Write from a thread: nft may print errors while we are still writing a large script.
        let stdin = child.stdin.take();
        let writer = {
            let script = script.to_owned();
            std::thread::spawn(move || {
                if let Some(mut stdin) = stdin {
                    let _ = stdin.write_all(script.as_bytes());
                }
            })
        };
        let out = child.wait_with_output().map_err(spawn_err)?;
        let _ = writer.join();
        if out.status.success() {
            return Ok(());
        }
        let mut stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        // nft echoes the offending statement; a 100k-element line would drown the log.
        if stderr.len() > 4000 {
            let mut cut = 4000;
            while !stderr.is_char_boundary(cut) {
                cut -= 1;
            }
            stderr.truncate(cut);
            stderr.push('…');
        }
        Err(NftError::Rejected {
            status: out.status.to_string(),
            stderr,
        })
    }
}

/// How to invoke `conntrack` (same convention as [`Nft`]).
#[derive(Debug, Clone)]
pub struct Conntrack {
    argv: Vec<OsString>,
}

impl Default for Conntrack {
    fn default() -> Self {
        Self {
            argv: vec!["conntrack".into()],
        }
    }
}

impl Conntrack {
    pub fn new(argv: Vec<OsString>) -> Self {
        if argv.is_empty() {
            return Self::default();
        }
        Self { argv }
    }

    /// Deletes conntrack entries matching `filter` (e.g. `-p udp --orig-dst 10.96.0.10 --reply-src 10.244.1.5`).
    /// "No entry matched" is success; a missing tool or kernel error is returned as text for the caller to log.
    pub fn delete(&self, filter: &[String]) -> Result<(), String> {
        let out = Command::new(&self.argv[0])
            .args(&self.argv[1..])
            .arg("-D")
            .args(filter)
            .stdin(Stdio::null())
            .output()
            .map_err(|e| format!("cannot run {:?}: {e}", self.argv[0]))?;
        let stderr = String::from_utf8_lossy(&out.stderr);
        // conntrack exits 1 with "0 flow entries have been deleted" when nothing matched.
        if out.status.success() || stderr.contains("0 flow entries") {
            Ok(())
        } else {
            Err(format!(
                "conntrack -D {}: {}",
                filter.join(" "),
                stderr.trim()
            ))
        }
    }
}
