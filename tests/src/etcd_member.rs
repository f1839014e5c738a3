//! One real etcd member (Debian's `etcd-server`) for a test's API server: loopback ports, a temporary data
//! directory, killed and removed when dropped. (The multi-member, TLS and snapshot fixture lives with the store's
//! own tests in `control/tests/common/etcd.rs`.)

use std::process::{Command, Stdio};
use std::time::Duration;

use crate::{free_port, wait_for, ChildGuard, TempDir};

/// A running single-member etcd.
pub struct EtcdMember {
    pub client_url: String,
    // Field order: the process is killed before its data directory is removed.
    _process: ChildGuard,
    _dir: TempDir,
}

impl EtcdMember {
    /// Starts a member and waits until it answers `etcdctl endpoint health`. A port taken by a parallel test
    /// between `free_port` and etcd's bind makes etcd exit: then it starts again on fresh ports (bounded).
    pub fn start() -> Self {
        const ATTEMPTS: usize = 3;
        let mut last_log = String::new();
        for _ in 0..ATTEMPTS {
            let dir = tempfile::Builder::new()
                .prefix("windlass-etcd-")
                .tempdir()
                .expect("temp dir");
            let client_url = format!("http://127.0.0.1:{}", free_port());
            let peer_url = format!("http://127.0.0.1:{}", free_port());
            let log_path = dir.path().join("etcd.log");
            let log = std::fs::File::create(&log_path).expect("etcd log");
            let mut process = ChildGuard::spawn(
                Command::new("etcd")
                    .args(["--name", "m0", "--data-dir"])
                    .arg(dir.path().join("data"))
                    .args(["--listen-client-urls", &client_url])
                    .args(["--advertise-client-urls", &client_url])
                    .args(["--listen-peer-urls", &peer_url])
                    .args(["--initial-advertise-peer-urls", &peer_url])
                    .args(["--initial-cluster", &format!("m0={peer_url}")])
                    .stdout(Stdio::null())
                    .stderr(log),
            )
            .expect("start etcd (Debian: etcd-server)");
            let healthy = wait_for("etcd to be healthy", Duration::from_secs(30), || {
                if process.child_mut().try_wait().ok().flatten().is_some() {
                    return Some(false);
                }
                let ok = Command::new("etcdctl")
                    .env("ETCDCTL_API", "3")
                    .args(["--endpoints", &client_url, "endpoint", "health"])
                    .args(["--command-timeout=1s"])
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .status()
                    .is_ok_and(|s| s.success());
                ok.then_some(true)
            });
            if healthy {
                return Self {
                    client_url,
                    _process: process,
                    _dir: dir,
                };
            }
            last_log = std::fs::read_to_string(&log_path).unwrap_or_default();
        }
        panic!("etcd did not start in {ATTEMPTS} attempts; last log:\n{last_log}");
    }
}
