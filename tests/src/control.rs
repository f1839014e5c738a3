//! A `windlass-control serve` instance for a test: its own data directory and loopback port, killed on drop, and
//! helpers to drive the real `kubectl` against it.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use crate::{wait_for, workspace_binary, ChildGuard, TempDir};

/// A running API server.
pub struct ControlPlane {
    pub dir: TempDir,
    pub port: u16,
    child: Option<ChildGuard>,
    extra_args: Vec<String>,
    /// Where the server runs: `None` for the test's own namespace (bound to 127.0.0.1), or a network namespace and
    /// an address in it (see [`ControlPlane::start_in_netns`]).
    netns: Option<(String, std::net::Ipv4Addr)>,
    /// The etcd member the server stores into when the suite runs on the etcd backend (dropped after the server).
    _etcd: Option<crate::etcd::EtcdCluster>,
}

/// `WINDLASS_TEST_STORE=etcd` runs every [`ControlPlane`] on a real etcd member of its own (`--etcd-servers`)
/// instead of the embedded store, so one test suite covers both backends (`scripts/test.sh` runs the control-plane
/// suites a second time that way).
pub fn store_backend_is_etcd() -> bool {
    std::env::var("WINDLASS_TEST_STORE").is_ok_and(|v| v == "etcd")
}

use crate::free_port;

impl ControlPlane {
    /// Starts a server on a fresh data directory and waits until it answers.
    pub fn start() -> Self {
        Self::start_with(|_| Vec::new())
    }

    /// Like [`ControlPlane::start`], with extra `serve` arguments computed from the data directory (e.g. a token
    /// file written there).
    pub fn start_with(extra_args: impl FnOnce(&Path) -> Vec<String>) -> Self {
        Self::start_where(None, extra_args)
    }

    /// A server inside the network namespace `netns`, bound to `addr` there (an address of one of its links, e.g.
    /// a lab node's switch port), so daemons in other lab namespaces reach it without touching the root namespace.
    /// `kubectl` runs inside that namespace too, and `admin.kubeconfig` names `https://<addr>:<port>`.
    pub fn start_in_netns(
        netns: &str,
        addr: std::net::Ipv4Addr,
        extra_args: impl FnOnce(&Path) -> Vec<String>,
    ) -> Self {
        Self::start_where(Some((netns.to_string(), addr)), extra_args)
    }

    fn start_where(
        netns: Option<(String, std::net::Ipv4Addr)>,
        extra_args: impl FnOnce(&Path) -> Vec<String>,
    ) -> Self {
        let dir = tempfile::Builder::new()
            .prefix("windlass-control-")
            .tempdir()
            .expect("temp data dir");
        let mut extra_args = extra_args(dir.path());
        // The etcd member listens on the test's own loopback, so only servers there use it.
        let etcd = (netns.is_none() && store_backend_is_etcd())
            .then(|| crate::etcd::EtcdCluster::start_blocking(1));
        if let Some(e) = &etcd {
            extra_args.extend(["--etcd-servers".to_string(), e.servers_flag()]);
        }
        let mut cp = Self {
            dir,
            port: free_port(),
            child: None,
            extra_args,
            netns,
            _etcd: etcd,
        };
        cp.spawn();
        cp
    }

    /// The etcd member's client URL when the server runs on the etcd backend.
    pub fn etcd_url(&self) -> Option<&str> {
        self._etcd
            .as_ref()
            .and_then(|e| e.members.first())
            .map(|m| m.client_url.as_str())
    }

    pub fn data_dir(&self) -> &Path {
        self.dir.path()
    }

    pub fn kubeconfig(&self) -> PathBuf {
        self.dir.path().join("admin.kubeconfig")
    }

    /// A `kube` client with the admin credentials (`system:masters`).
    pub async fn kube_client(&self) -> kube::Client {
        crate::install_rustls_provider();
        let kubeconfig =
            kube::config::Kubeconfig::read_from(self.kubeconfig()).expect("read admin.kubeconfig");
        let config = kube::Config::from_custom_kubeconfig(kubeconfig, &Default::default())
            .await
            .expect("kube config from admin.kubeconfig");
        kube::Client::try_from(config).expect("kube client")
    }

    pub fn url(&self) -> String {
        format!("https://{}:{}", self.address(), self.port)
    }

    /// The address the server listens on.
    pub fn address(&self) -> std::net::Ipv4Addr {
        self.netns
            .as_ref()
            .map_or(std::net::Ipv4Addr::LOCALHOST, |(_, a)| *a)
    }

    /// `program` in the server's network namespace (directly when it runs in the test's own).
    fn command_here(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        match &self.netns {
            None => Command::new(program),
            Some((ns, _)) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns]).arg(program);
                c
            }
        }
    }

    fn spawn(&mut self) {
        let log = std::fs::File::create(self.dir.path().join("server.log")).expect("server log");
        let child = ChildGuard::spawn(
            self.command_here(workspace_binary("windlass-control"))
                .args(["serve", "--bind-address"])
                .arg(self.address().to_string())
                .arg("--secure-port")
                .arg(self.port.to_string())
                .arg("--data-dir")
                .arg(self.dir.path())
                .args(&self.extra_args)
                .env("RUST_LOG", "info")
                .stdout(Stdio::null())
                .stderr(log),
        )
        .expect("start windlass-control");
        self.child = Some(child);
        let kubeconfig = self.kubeconfig();
        let port = self.port;
        let local = self.netns.is_none();
        wait_for(
            "the API server to answer /readyz",
            Duration::from_secs(30),
            || {
                if let Some(status) = self
                    .child
                    .as_mut()
                    .and_then(|c| c.child_mut().try_wait().ok().flatten())
                {
                    panic!(
                        "windlass-control exited early ({status}); log:\n{}",
                        self.log()
                    );
                }
                // In another namespace only kubectl (run there) can tell whether it answers.
                if !kubeconfig.exists()
                    || (local && std::net::TcpStream::connect(("127.0.0.1", port)).is_err())
                {
                    return None;
                }
                let out = self.kubectl(&["get", "--raw", "/readyz"]);
                out.status.success().then_some(())
            },
        );
        // New pods need their namespace's `default` ServiceAccount (upstream's e2e framework waits for it too).
        if runs_serviceaccount_controller(&self.extra_args) {
            wait_for(
                "the default ServiceAccount in namespace default",
                Duration::from_secs(30),
                || {
                    let out = self.kubectl(&["get", "serviceaccount", "default", "-o", "name"]);
                    out.status.success().then_some(())
                },
            );
        }
    }

    /// Stops the server (SIGKILL); [`ControlPlane::resume`] starts it again.
    pub fn stop(&mut self) {
        self.child.take();
    }

    /// Starts a stopped server again on the same data directory and port, and waits until it answers.
    pub fn resume(&mut self) {
        self.spawn();
    }

    /// Stops the server (SIGKILL) and starts it again on the same data directory and port.
    pub fn restart(&mut self) {
        self.child.take();
        self.spawn();
    }

    /// The server's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("server.log")).unwrap_or_default()
    }

    /// `kubectl` (the default one on PATH) with this server's admin kubeconfig.
    pub fn kubectl_cmd(&self) -> Command {
        self.kubectl_version_cmd(None)
    }

    /// A specific kubectl version (`"1.27"` runs `kubectl.1.27` from the gcloud SDK's bin dir).
    pub fn kubectl_version_cmd(&self, version: Option<&str>) -> Command {
        let bin = match version {
            None => PathBuf::from("kubectl"),
            Some(v) => kubectl_version_path(v),
        };
        let mut c = self.command_here(bin);
        c.env("KUBECONFIG", self.kubeconfig())
            .env_remove("KUBERNETES_SERVICE_HOST")
            .env("HOME", self.dir.path())
            .stdin(Stdio::null());
        c
    }

    /// kubectl authenticated only by a bearer `token` (no kubeconfig, no client certificate), trusting this
    /// server's CA.
    pub fn kubectl_with_token(&self, token: &str, args: &[&str]) -> Output {
        self.command_here("kubectl")
            .env("HOME", self.dir.path())
            .env_remove("KUBERNETES_SERVICE_HOST")
            .arg("--kubeconfig=/dev/null")
            .arg(format!("--server={}", self.url()))
            .arg(format!(
                "--certificate-authority={}",
                self.dir.path().join("pki/ca.crt").display()
            ))
            .arg(format!("--token={token}"))
            .args(args)
            .stdin(Stdio::null())
            .output()
            .expect("run kubectl")
    }

    pub fn kubectl(&self, args: &[&str]) -> Output {
        self.kubectl_cmd().args(args).output().expect("run kubectl")
    }

    /// Runs kubectl and returns stdout, failing the test (with the server log) if it fails.
    pub fn kubectl_ok(&self, args: &[&str]) -> String {
        let out = self.kubectl(args);
        assert!(
            out.status.success(),
            "kubectl {args:?} failed ({}):\nstdout: {}\nstderr: {}\nserver log tail:\n{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            tail(&self.log(), 30),
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Runs kubectl expecting failure; returns stderr.
    pub fn kubectl_err(&self, args: &[&str]) -> String {
        let out = self.kubectl(args);
        assert!(
            !out.status.success(),
            "kubectl {args:?} unexpectedly succeeded:\n{}",
            String::from_utf8_lossy(&out.stdout)
        );
        String::from_utf8_lossy(&out.stderr).into_owned()
    }

    /// `kubectl apply -f -` / `create -f -` etc. with `manifest` on stdin.
    pub fn kubectl_stdin(&self, args: &[&str], manifest: &str) -> Output {
        use std::io::Write;
        let mut child = self
            .kubectl_cmd()
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("run kubectl");
        child
            .stdin
            .take()
            .expect("stdin")
            .write_all(manifest.as_bytes())
            .expect("write manifest");
        child.wait_with_output().expect("kubectl output")
    }

    pub fn kubectl_stdin_ok(&self, args: &[&str], manifest: &str) -> String {
        let out = self.kubectl_stdin(args, manifest);
        assert!(
            out.status.success(),
            "kubectl {args:?} failed ({}):\nstdout: {}\nstderr: {}\nserver log tail:\n{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            tail(&self.log(), 30),
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

fn tail(s: &str, n: usize) -> String {
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// Path of `kubectl.<version>` next to the real `kubectl` (the gcloud SDK ships several versions).
/// The local port of a `kubectl port-forward` from its first stdout line, "Forwarding from 127.0.0.1:PORT -> N".
pub fn forwarded_local_port(line: &str) -> u16 {
    line.split("127.0.0.1:")
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("no local port in {line:?}"))
}

pub fn kubectl_version_path(version: &str) -> PathBuf {
    let kubectl = crate::which("kubectl").expect("kubectl on PATH");
    let real = std::fs::canonicalize(&kubectl).unwrap_or(kubectl);
    real.parent()
        .map(|d| d.join(format!("kubectl.{version}")))
        .unwrap_or_else(|| PathBuf::from(format!("kubectl.{version}")))
}

/// Whether `serve` with these arguments runs the serviceaccount controller (`--controllers` defaults to `*`).
fn runs_serviceaccount_controller(args: &[String]) -> bool {
    if args.iter().any(|a| a == "--disable-api") {
        return false;
    }
    let mut enabled = true;
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let value = match a.strip_prefix("--controllers=") {
            Some(v) => v.to_string(),
            None if a == "--controllers" => it.next().cloned().unwrap_or_default(),
            None => continue,
        };
        let items: Vec<&str> = value.split(',').map(str::trim).collect();
        enabled = !items.contains(&"-serviceaccount")
            && (items.contains(&"*") || items.contains(&"serviceaccount"));
    }
    enabled
}
