//! Applying scripts with the `nft` tool: one `nft -f -` run is one atomic kernel transaction.
//!
//! Text through `nft -f` was measured against JSON through the same tool (`nft -j -f`, which is what the `nftables`
//! crate drives): see the proxy section of BENCHMARKS.md. Nothing here lists the table; the sync path only writes.

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

/// One live `ClientIP` affinity entry: client, the frontend it used, and the endpoint it is pinned to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct AffinityEntry {
    pub client: String,
    pub daddr: String,
    pub proto: String,
    pub port: u64,
    pub endpoint: String,
}

impl AffinityEntry {
    pub fn key(&self) -> String {
        format!(
            "{} . {} . {} . {}",
            self.client, self.daddr, self.proto, self.port
        )
    }
}

impl Nft {
    /// Lists the live entries of the dynamic affinity map (only that map: it holds one entry per active client and
    /// Service, and is read only when an affinity Service lost an endpoint).
    pub(crate) fn list_affinity(
        &self,
        family: &str,
        table: &str,
        map: &str,
    ) -> Result<Vec<AffinityEntry>, NftError> {
        let out = self
            .command()
            .args(["-j", "list", "map", family, table, map])
            .stdin(Stdio::null())
            .output()
            .map_err(|source| NftError::Spawn {
                program: self.argv[0].clone(),
                source,
            })?;
        if !out.status.success() {
            return Err(NftError::Rejected {
                status: out.status.to_string(),
                stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
            });
        }
        Ok(parse_affinity(&String::from_utf8_lossy(&out.stdout)))
    }
}

/// Parses `nft -j list map` output of the affinity map; malformed entries are skipped.
pub(crate) fn parse_affinity(json: &str) -> Vec<AffinityEntry> {
    let Ok(v) = serde_json::from_str::<serde_json::Value>(json) else {
        return Vec::new();
    };
    let mut entries = Vec::new();
    let objects = v["nftables"].as_array().cloned().unwrap_or_default();
    for obj in objects {
        for pair in obj["map"]["elem"].as_array().into_iter().flatten() {
            let key = &pair[0]["elem"]["val"]["concat"];
            let val = &pair[1]["concat"];
            let (Some(client), Some(daddr), Some(proto), Some(port)) = (
                key[0].as_str(),
                key[1].as_str(),
                key[2].as_str(),
                key[3].as_u64(),
            ) else {
                continue;
            };
            let (Some(ep), Some(ep_port)) = (val[0].as_str(), val[1].as_u64()) else {
                continue;
            };
            entries.push(AffinityEntry {
                client: client.to_string(),
                daddr: daddr.to_string(),
                proto: proto.to_string(),
                port,
                endpoint: format!("{ep} . {ep_port}"),
            });
        }
    }
    entries
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn affinity_entries_are_read_from_nft_json() {
        let json = r#"{"nftables": [{"metainfo": {"version": "1.0.6"}}, {"map": {"family": "ip", "name": "affinity",
            "table": "t", "elem": [[{"elem": {"val": {"concat": ["10.0.0.5", "10.96.0.20", "tcp", 80]},
            "timeout": 60, "expires": 59}}, {"concat": ["10.244.1.2", 8080]}], [{"bad": 1}, {}]]}}]}"#;
        let e = parse_affinity(json);
        assert_eq!(e.len(), 1);
        assert_eq!(e[0].key(), "10.0.0.5 . 10.96.0.20 . tcp . 80");
        assert_eq!(e[0].endpoint, "10.244.1.2 . 8080");
        assert!(parse_affinity("not json").is_empty());
    }
}
