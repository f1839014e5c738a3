//! A real etcd (Debian's `etcd-server`) started by a test: one member or a cluster on loopback ports, each in its
//! own temporary data directory, killed (SIGKILL) and removed when the guard drops.

#![allow(dead_code)] // Each test binary uses a different part of this fixture.

use std::fs::File;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use windlass_tests::{ChildGuard, TempDir};

/// Raft timings much shorter than etcd's defaults (100 ms / 1000 ms), so a new leader is elected quickly after a
/// member is killed. The election timeout must be at least 5× the heartbeat (etcd refuses otherwise).
const HEARTBEAT_MS: u32 = 25;
const ELECTION_MS: u32 = 250;

/// One etcd member.
pub struct Member {
    pub name: String,
    pub client_url: String,
    pub peer_url: String,
    pub data_dir: PathBuf,
    pub log: PathBuf,
    process: Option<ChildGuard>,
}

/// An etcd cluster (of one or more members) started for one test.
pub struct EtcdCluster {
    pub members: Vec<Member>,
    initial_cluster: String,
    _dir: TempDir,
}

/// A free loopback TCP port (the listener is closed at once; etcd binds it right after).
fn free_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind a free loopback port");
    listener.local_addr().expect("local address").port()
}

impl EtcdCluster {
    /// Starts `size` members and waits until the cluster has a leader and serves linearizable reads on every
    /// member.
    pub async fn start(size: usize) -> Self {
        Self::launch(size, None).await
    }

    /// Starts one member from an `etcdctl snapshot save` file, restored with `etcdctl snapshot restore` as the
    /// etcd documentation's disaster-recovery procedure does.
    pub async fn start_from_snapshot(snapshot: &Path) -> Self {
        Self::launch(1, Some(snapshot)).await
    }

    async fn launch(size: usize, snapshot: Option<&Path>) -> Self {
        let dir = tempfile::Builder::new()
            .prefix("windlass-etcd-")
            .tempdir()
            .expect("temp dir");
        let mut members: Vec<Member> = (0..size)
            .map(|i| {
                let name = format!("m{i}");
                Member {
                    client_url: format!("http://127.0.0.1:{}", free_port()),
                    peer_url: format!("http://127.0.0.1:{}", free_port()),
                    data_dir: dir.path().join(&name),
                    log: dir.path().join(format!("{name}.log")),
                    name,
                    process: None,
                }
            })
            .collect();
        let initial_cluster = members
            .iter()
            .map(|m| format!("{}={}", m.name, m.peer_url))
            .collect::<Vec<_>>()
            .join(",");
        if let Some(snapshot) = snapshot {
            for m in &members {
                windlass_tests::run_ok(
                    Command::new("etcdctl")
                        .env("ETCDCTL_API", "3")
                        .args(["snapshot", "restore"])
                        .arg(snapshot)
                        .arg("--data-dir")
                        .arg(&m.data_dir)
                        .args(["--name", &m.name, "--initial-cluster", &initial_cluster])
                        .args(["--initial-advertise-peer-urls", &m.peer_url]),
                );
            }
        }
        for m in &mut members {
            m.process = Some(spawn_member(m, &initial_cluster, dir.path()));
        }
        let cluster = Self {
            members,
            initial_cluster,
            _dir: dir,
        };
        for i in 0..size {
            cluster.wait_ready(i).await;
        }
        cluster
    }

    /// Client URLs of every member (also the killed ones: a client configured with all of them must cope).
    pub fn endpoints(&self) -> Vec<String> {
        self.members.iter().map(|m| m.client_url.clone()).collect()
    }

    /// The `--etcd-servers` value for this cluster.
    pub fn servers_flag(&self) -> String {
        self.endpoints().join(",")
    }

    /// Waits until member `i` answers a linearizable read (so it has a leader).
    async fn wait_ready(&self, i: usize) {
        let m = &self.members[i];
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let ok = async {
                let mut c = etcd_client::Client::connect(
                    [m.client_url.as_str()],
                    Some(
                        etcd_client::ConnectOptions::new()
                            .with_connect_timeout(Duration::from_millis(500))
                            .with_timeout(Duration::from_secs(1)),
                    ),
                )
                .await
                .ok()?;
                c.get("health", None).await.ok()
            }
            .await
            .is_some();
            if ok {
                return;
            }
            if Instant::now() > deadline {
                panic!(
                    "etcd member {} ({}) not ready after 30 s; log:\n{}",
                    m.name,
                    m.client_url,
                    std::fs::read_to_string(&m.log).unwrap_or_default()
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The index of the current leader, as the live members report it.
    pub async fn leader(&self) -> usize {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            for m in self.members.iter().filter(|m| m.process.is_some()) {
                let Ok(mut c) = etcd_client::Client::connect(
                    [m.client_url.as_str()],
                    Some(
                        etcd_client::ConnectOptions::new()
                            .with_connect_timeout(Duration::from_millis(500))
                            .with_timeout(Duration::from_secs(1)),
                    ),
                )
                .await
                else {
                    continue;
                };
                let Ok(status) = c.status().await else {
                    continue;
                };
                let leader = status.leader();
                if leader == 0 {
                    continue;
                }
                let Ok(list) = c.member_list().await else {
                    continue;
                };
                let name = list
                    .members()
                    .iter()
                    .find(|mm| mm.id() == leader)
                    .map(|mm| mm.name().to_string());
                if let Some(i) = name.and_then(|n| self.members.iter().position(|m| m.name == n)) {
                    if self.members[i].process.is_some() {
                        return i;
                    }
                }
            }
            assert!(Instant::now() < deadline, "no etcd leader after 20 s");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Starts killed member `i` again on its data directory (it rejoins the cluster) and waits until it serves.
    pub async fn restart(&mut self, i: usize) {
        assert!(self.members[i].process.is_none(), "member {i} is running");
        let guard = spawn_member(&self.members[i], &self.initial_cluster, self._dir.path());
        self.members[i].process = Some(guard);
        self.wait_ready(i).await;
    }

    /// SIGKILLs member `i` (as a crash or power loss would stop it).
    pub fn kill(&mut self, i: usize) {
        if let Some(guard) = self.members[i].process.take() {
            drop(guard); // ChildGuard sends SIGKILL and reaps.
        }
    }
}

fn spawn_member(m: &Member, initial_cluster: &str, dir: &Path) -> ChildGuard {
    let log = File::options()
        .create(true)
        .append(true)
        .open(&m.log)
        .expect("etcd log file");
    let log2 = log.try_clone().expect("etcd log file");
    ChildGuard::spawn(
        Command::new("etcd")
            .arg("--name")
            .arg(&m.name)
            .arg("--data-dir")
            .arg(&m.data_dir)
            .arg("--listen-client-urls")
            .arg(&m.client_url)
            .arg("--advertise-client-urls")
            .arg(&m.client_url)
            .arg("--listen-peer-urls")
            .arg(&m.peer_url)
            .arg("--initial-advertise-peer-urls")
            .arg(&m.peer_url)
            .arg("--initial-cluster")
            .arg(initial_cluster)
            .arg("--initial-cluster-state")
            .arg("new")
            .arg("--initial-cluster-token")
            .arg(dir.file_name().unwrap_or_default())
            .arg("--heartbeat-interval")
            .arg(HEARTBEAT_MS.to_string())
            .arg("--election-timeout")
            .arg(ELECTION_MS.to_string())
            .arg("--logger")
            .arg("zap")
            .arg("--log-outputs")
            .arg("stderr")
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log2),
    )
    .expect("spawn etcd")
}
