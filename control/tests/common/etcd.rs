//! A real etcd (Debian's `etcd-server`) started by a test: one member or a cluster on loopback ports, each in its
//! own temporary data directory, killed (SIGKILL) and removed when the guard drops.

#![allow(dead_code)] // Each test binary uses a different part of this fixture.

use std::fs::File;
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
            windlass_tests::run_ok(Command::new("openssl").args(args).current_dir(dir));
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
            ("server", "etcd", "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth,clientAuth\n"),
            ("client", "windlass-control", "extendedKeyUsage=clientAuth\n"),
        ] {
            std::fs::write(p(&format!("{name}.ext")), ext).expect("write extensions");
            let (key, csr, crt, extfile) = (format!("{name}.key"), format!("{name}.csr"), format!("{name}.crt"), format!("{name}.ext"));
            openssl(&[&["req"][..], &ec, &["-keyout", &key, "-out", &csr, "-subj", &format!("/CN={cn}")]].concat());
            openssl(&["x509", "-req", "-in", &csr, "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
                "-out", &crt, "-days", "1", "-extfile", &extfile]);
        }
        Self {
            ca: p("ca.crt"),
            server_cert: p("server.crt"),
            server_key: p("server.key"),
            client_cert: p("client.crt"),
            client_key: p("client.key"),
        }
    }

    pub fn connect_options(&self) -> etcd_client::ConnectOptions {
        let read = |p: &Path| std::fs::read(p).expect("read certificate");
        etcd_client::ConnectOptions::new().with_tls(
            etcd_client::TlsOptions::new()
                .ca_certificate(etcd_client::Certificate::from_pem(read(&self.ca)))
                .identity(etcd_client::Identity::from_pem(
                    read(&self.client_cert),
                    read(&self.client_key),
                )),
        )
    }
}

use windlass_tests::free_port;

impl EtcdCluster {
    /// Starts `size` members and waits until the cluster has a leader and serves linearizable reads on every
    /// member.
    pub async fn start(size: usize) -> Self {
        Self::launch(size, None, false).await
    }

    /// Starts `size` members serving clients over TLS (https) with client-certificate authentication.
    pub async fn start_tls(size: usize) -> Self {
        Self::launch(size, None, true).await
    }

    /// Starts one member from an `etcdctl snapshot save` file, restored with `etcdctl snapshot restore` as the
    /// etcd documentation's disaster-recovery procedure does.
    pub async fn start_from_snapshot(snapshot: &Path) -> Self {
        Self::launch(1, Some(snapshot), false).await
    }

    async fn launch(size: usize, snapshot: Option<&Path>, tls: bool) -> Self {
        // `free_port` releases the port before etcd binds it, so a test running in parallel can take it first:
        // then start the whole cluster again on fresh ports (bounded).
        const ATTEMPTS: usize = 3;
        for attempt in 1..=ATTEMPTS {
            match Self::try_launch(size, snapshot, tls).await {
                Ok(cluster) => return cluster,
                Err(_) if attempt < ATTEMPTS => {
                    eprintln!("etcd fixture: a port was taken, retrying on fresh ports ({attempt}/{ATTEMPTS})");
                }
                Err(log) => panic!(
                    "etcd members kept losing their ports to other processes; last log:\n{log}"
                ),
            }
        }
        unreachable!("the loop returns or panics")
    }

    async fn try_launch(size: usize, snapshot: Option<&Path>, tls: bool) -> Result<Self, String> {
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
            m.process = Some(spawn_member(m, &initial_cluster, dir.path(), tls.as_ref()));
        }
        let cluster = Self {
            members,
            tls,
            initial_cluster,
            _dir: dir,
        };
        for i in 0..size {
            cluster.wait_ready(i).await?;
        }
        Ok(cluster)
    }

    /// Options for the fixture's own short-lived probe clients.
    fn probe_options(&self) -> etcd_client::ConnectOptions {
        self.tls
            .as_ref()
            .map_or_else(etcd_client::ConnectOptions::new, Certs::connect_options)
            .with_connect_timeout(Duration::from_millis(500))
            .with_timeout(Duration::from_secs(1))
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
    /// Fails with the member's log when it could not bind its port (see [`EtcdCluster::launch`]).
    async fn wait_ready(&self, i: usize) -> Result<(), String> {
        let m = &self.members[i];
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let ok = async {
                let mut c = etcd_client::Client::connect(
                    [m.client_url.as_str()],
                    Some(self.probe_options()),
                )
                .await
                .ok()?;
                c.get("health", None).await.ok()
            }
            .await
            .is_some();
            if ok {
                return Ok(());
            }
            let log = std::fs::read_to_string(&m.log).unwrap_or_default();
            if log.contains("address already in use") {
                return Err(log);
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
                    Some(self.probe_options()),
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
        let guard = spawn_member(
            &self.members[i],
            &self.initial_cluster,
            self._dir.path(),
            self.tls.as_ref(),
        );
        self.members[i].process = Some(guard);
        if let Err(log) = self.wait_ready(i).await {
            panic!("etcd member {i} could not bind its ports again after a restart; log:\n{log}");
        }
    }

    /// SIGKILLs member `i` (as a crash or power loss would stop it).
    pub fn kill(&mut self, i: usize) {
        if let Some(guard) = self.members[i].process.take() {
            drop(guard); // ChildGuard sends SIGKILL and reaps.
        }
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
    .expect("spawn etcd")
}
