//! A real etcd (Debian's `etcd-server`) for tests: one member or a cluster on loopback ports, optionally serving
//! clients over TLS with client-certificate authentication or restored from a snapshot; each member in its own
//! temporary data directory, killed (SIGKILL) and removed when the fixture drops.
//!
//! One fixture for every suite: [`crate::control::ControlPlane`] runs its API server on a member of its own under
//! `WINDLASS_TEST_STORE=etcd` (blocking [`EtcdCluster::start_blocking`]), and the store's tests in `control/tests`
//! kill leaders, restart members and restore snapshots (the `async` methods). The fixture probes members with
//! `etcdctl`, so it is plain blocking code; the `async` methods run it on tokio's blocking pool, so an async test's
//! other tasks keep running while it waits.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::{free_port, run_ok, ChildGuard, TempDir};

/// Raft timings much shorter than etcd's defaults (100 ms / 1000 ms), so a new leader is elected quickly after a
/// member is killed. The election timeout must be at least 5× the heartbeat (etcd refuses otherwise).
const HEARTBEAT_MS: u32 = 25;
const ELECTION_MS: u32 = 250;
/// How long a member may take to serve after it started.
const READY_TIMEOUT: Duration = Duration::from_secs(30);
/// How often a member is probed.
const PROBE_INTERVAL: Duration = Duration::from_millis(50);

/// One etcd member.
pub struct Member {
    pub name: String,
    pub client_url: String,
    pub peer_url: String,
    pub data_dir: PathBuf,
    pub log: PathBuf,
    process: Option<ChildGuard>,
}

impl Member {
    /// The member's process id while it runs (for benchmarks' CPU accounting).
    pub fn pid(&self) -> Option<u32> {
        self.process.as_ref().map(ChildGuard::id)
    }
}

/// An etcd cluster (of one or more members) started for one test.
pub struct EtcdCluster {
    pub members: Vec<Member>,
    /// Set when the members serve clients over TLS and require client certificates.
    pub tls: Option<Certs>,
    initial_cluster: String,
    _dir: TempDir,
}

/// PEM files of a test CA, an etcd serving certificate (127.0.0.1) and a client certificate it signed.
#[derive(Clone, Debug)]
pub struct Certs {
    pub ca: PathBuf,
    pub server_cert: PathBuf,
    pub server_key: PathBuf,
    pub client_cert: PathBuf,
    pub client_key: PathBuf,
}

impl Certs {
    /// Makes the certificates in `dir` with the `openssl` tool (EC P-256, valid one day).
    pub fn generate(dir: &Path) -> Self {
        let p = |name: &str| dir.join(name);
        let openssl = |args: &[&str]| {
            run_ok(Command::new("openssl").args(args).current_dir(dir));
        };
        let ec = [
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
        ];
        openssl(
            &[
                &["req", "-x509"][..],
                &ec,
                &["-keyout", "ca.key", "-out", "ca.crt"],
                &["-subj", "/CN=windlass-test-etcd-ca", "-days", "1"],
            ]
            .concat(),
        );
        for (name, cn, ext) in [
            (
                "server",
                "etcd",
                "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth,clientAuth\n",
            ),
            ("client", "windlass-control", "extendedKeyUsage=clientAuth\n"),
        ] {
            std::fs::write(p(&format!("{name}.ext")), ext).expect("write extensions");
            let (key, csr, crt, extfile) = (
                format!("{name}.key"),
                format!("{name}.csr"),
                format!("{name}.crt"),
                format!("{name}.ext"),
            );
            let subject = format!("/CN={cn}");
            openssl(&[&["req"][..], &ec, &["-keyout", &key, "-out", &csr, "-subj", &subject]].concat());
            openssl(&[
                "x509", "-req", "-in", &csr, "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial", "-out",
                &crt, "-days", "1", "-extfile", &extfile,
            ]);
        }
        Self {
            ca: p("ca.crt"),
            server_cert: p("server.crt"),
            server_key: p("server.key"),
            client_cert: p("client.crt"),
            client_key: p("client.key"),
        }
    }
}

/// `etcdctl` aimed at one member, with the cluster's client certificate when it serves TLS.
#[derive(Clone)]
struct Etcdctl(Option<Certs>);

impl Etcdctl {
    fn command(&self, endpoint: &str, args: &[&str]) -> Command {
        let mut c = Command::new("etcdctl");
        c.env("ETCDCTL_API", "3")
            .args([
                "--endpoints",
                endpoint,
                "--dial-timeout=1s",
                "--command-timeout=1s",
            ])
            .stdin(Stdio::null())
            .stderr(Stdio::null());
        if let Some(certs) = &self.0 {
            c.arg("--cacert")
                .arg(&certs.ca)
                .arg("--cert")
                .arg(&certs.client_cert)
                .arg("--key")
                .arg(&certs.client_key);
        }
        c.args(args);
        c
    }

    /// Whether the member serves a linearizable read (so it has a leader): `etcdctl endpoint health`.
    fn healthy(&self, endpoint: &str) -> bool {
        self.command(endpoint, &["endpoint", "health"])
            .stdout(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    }

    /// `(member ID, leader ID)` as the member reports them (`etcdctl endpoint status`); the leader is 0 while
    /// there is none.
    fn status(&self, endpoint: &str) -> Option<(u64, u64)> {
        let out = self
            .command(endpoint, &["endpoint", "status", "-w", "json"])
            .output()
            .ok()
            .filter(|o| o.status.success())?;
        let v: Value = serde_json::from_slice(&out.stdout).ok()?;
        let status = &v[0]["Status"];
        Some((
            status["header"]["member_id"].as_u64()?,
            status["leader"].as_u64()?,
        ))
    }
}

/// Waits until the member at `url` serves; `Err(its log)` when it lost its port to another process (or exited),
/// so the caller starts again on fresh ports.
fn wait_ready(
    etcdctl: &Etcdctl,
    name: &str,
    url: &str,
    log: &Path,
    mut exited: impl FnMut() -> bool,
) -> Result<(), String> {
    let deadline = Instant::now() + READY_TIMEOUT;
    loop {
        if etcdctl.healthy(url) {
            return Ok(());
        }
        let text = std::fs::read_to_string(log).unwrap_or_default();
        if text.contains("address already in use") || exited() {
            return Err(text);
        }
        assert!(
            Instant::now() < deadline,
            "etcd member {name} ({url}) not ready after {READY_TIMEOUT:?}; log:\n{text}"
        );
        std::thread::sleep(PROBE_INTERVAL);
    }
}

/// Runs blocking fixture code on tokio's blocking pool; a panic there fails the calling test as it is.
async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    match tokio::task::spawn_blocking(f).await {
        Ok(v) => v,
        Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
        Err(e) => panic!("etcd fixture task: {e}"),
    }
}

impl EtcdCluster {
    /// Starts `size` plain-HTTP members and waits until each serves linearizable reads (blocking).
    pub fn start_blocking(size: usize) -> Self {
        Self::launch(size, None, false)
    }

    /// Starts `size` members and waits until the cluster has a leader and serves linearizable reads on every
    /// member.
    pub async fn start(size: usize) -> Self {
        blocking(move || Self::launch(size, None, false)).await
    }

    /// Starts `size` members serving clients over TLS (https) with client-certificate authentication.
    pub async fn start_tls(size: usize) -> Self {
        blocking(move || Self::launch(size, None, true)).await
    }

    /// Starts one member from an `etcdctl snapshot save` file, restored with `etcdctl snapshot restore` as the
    /// etcd documentation's disaster-recovery procedure does.
    pub async fn start_from_snapshot(snapshot: &Path) -> Self {
        let snapshot = snapshot.to_path_buf();
        blocking(move || Self::launch(1, Some(&snapshot), false)).await
    }

    fn launch(size: usize, snapshot: Option<&Path>, tls: bool) -> Self {
        // `free_port` releases the port before etcd binds it, so a test running in parallel can take it first:
        // then start the whole cluster again on fresh ports (bounded).
        const ATTEMPTS: usize = 3;
        let mut last_log = String::new();
        for attempt in 1..=ATTEMPTS {
            match Self::try_launch(size, snapshot, tls) {
                Ok(cluster) => return cluster,
                Err(log) => {
                    eprintln!("etcd fixture: a member lost its port, retrying on fresh ports ({attempt}/{ATTEMPTS})");
                    last_log = log;
                }
            }
        }
        panic!("etcd members kept losing their ports to other processes; last log:\n{last_log}");
    }

    fn try_launch(size: usize, snapshot: Option<&Path>, tls: bool) -> Result<Self, String> {
        let dir = tempfile::Builder::new()
            .prefix("windlass-etcd-")
            .tempdir()
            .expect("temp dir");
        let tls = tls.then(|| Certs::generate(dir.path()));
        let scheme = if tls.is_some() { "https" } else { "http" };
        let mut members: Vec<Member> = (0..size)
            .map(|i| {
                let name = format!("m{i}");
                Member {
                    client_url: format!("{scheme}://127.0.0.1:{}", free_port()),
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
                run_ok(
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
            m.process = Some(spawn_member(m, &initial_cluster, dir.path(), tls.as_ref()));
        }
        let etcdctl = Etcdctl(tls.clone());
        for m in &mut members {
            let process = m.process.as_mut().expect("just spawned");
            wait_ready(&etcdctl, &m.name, &m.client_url, &m.log, || {
                process.child_mut().try_wait().ok().flatten().is_some()
            })?;
        }
        Ok(Self {
            members,
            tls,
            initial_cluster,
            _dir: dir,
        })
    }

    /// Client URLs of every member (also the killed ones: a client configured with all of them must cope).
    pub fn endpoints(&self) -> Vec<String> {
        self.members.iter().map(|m| m.client_url.clone()).collect()
    }

    /// The `--etcd-servers` value for this cluster.
    pub fn servers_flag(&self) -> String {
        self.endpoints().join(",")
    }

    /// The index of the current leader, as the live members report it.
    pub async fn leader(&self) -> usize {
        let etcdctl = Etcdctl(self.tls.clone());
        let live: Vec<(usize, String)> = self
            .members
            .iter()
            .enumerate()
            .filter(|(_, m)| m.process.is_some())
            .map(|(i, m)| (i, m.client_url.clone()))
            .collect();
        blocking(move || {
            let deadline = Instant::now() + Duration::from_secs(20);
            loop {
                let reports: Vec<(usize, u64, u64)> = live
                    .iter()
                    .filter_map(|(i, url)| etcdctl.status(url).map(|(id, leader)| (*i, id, leader)))
                    .collect();
                let leader = reports.iter().find_map(|(_, _, leader)| {
                    reports
                        .iter()
                        .find(|(_, id, _)| *leader != 0 && id == leader)
                        .map(|(i, _, _)| *i)
                });
                if let Some(i) = leader {
                    return i;
                }
                assert!(Instant::now() < deadline, "no etcd leader after 20 s");
                std::thread::sleep(PROBE_INTERVAL);
            }
        })
        .await
    }

    /// Starts killed member `i` again on its data directory (it rejoins the cluster) and waits until it serves.
    pub async fn restart(&mut self, i: usize) {
        assert!(self.members[i].process.is_none(), "member {i} is running");
        let m = &self.members[i];
        let mut process = spawn_member(
            m,
            &self.initial_cluster,
            self._dir.path(),
            self.tls.as_ref(),
        );
        let etcdctl = Etcdctl(self.tls.clone());
        let (name, url, log) = (m.name.clone(), m.client_url.clone(), m.log.clone());
        let (process, ready) = blocking(move || {
            let ready = wait_ready(&etcdctl, &name, &url, &log, || {
                process.child_mut().try_wait().ok().flatten().is_some()
            });
            (process, ready)
        })
        .await;
        if let Err(log) = ready {
            panic!("etcd member {i} could not serve again after a restart; log:\n{log}");
        }
        self.members[i].process = Some(process);
    }

    /// SIGKILLs member `i` (as a crash or power loss would stop it).
    pub fn kill(&mut self, i: usize) {
        // ChildGuard sends SIGKILL and reaps.
        drop(self.members[i].process.take());
    }
}

fn spawn_member(m: &Member, initial_cluster: &str, dir: &Path, tls: Option<&Certs>) -> ChildGuard {
    let mut cmd = Command::new("etcd");
    if let Some(certs) = tls {
        cmd.arg("--cert-file")
            .arg(&certs.server_cert)
            .arg("--key-file")
            .arg(&certs.server_key)
            .arg("--trusted-ca-file")
            .arg(&certs.ca)
            .arg("--client-cert-auth");
    }
    let log = File::options()
        .create(true)
        .append(true)
        .open(&m.log)
        .expect("etcd log file");
    let log2 = log.try_clone().expect("etcd log file");
    ChildGuard::spawn(
        cmd.arg("--name")
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
    .expect("spawn etcd (Debian: etcd-server)")
}
