//! A one-node cluster in a network namespace the test creates: `windlass-control serve` and a local registry on
//! that namespace's loopback, `windlass-kubelet` joined to the namespace with the reference CNI plugins (bridge +
//! host-local + loopback, a unique bridge and subnet), its own root directory and cgroup root, and the busybox
//! httpd image in the registry. Everything is torn down on drop, also when the test fails: the kubelet is killed,
//! every sandbox it left is removed through the runtime library, mounts under its root are detached, and the
//! cgroup subtree is emptied and removed.
//!
//! The kubelet joins only the node's network namespace (`nsenter --net`), not a private mount namespace as
//! `ip netns exec` would give it: a real kubelet shares the host's mounts, and a restarted kubelet must see the
//! network namespace pins and root filesystems its predecessor mounted.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use serde_json::Value;

use crate::cgroup::CgroupTreeGuard;
use crate::control::ControlPlane;
use crate::image_fixture::OciLayout;
use crate::netns::NetnsGuard;
use crate::registry::Registry;
use crate::{unique_name, wait_for, workspace_binary, ChildGuard, TempDir};

/// The tools a test using [`KubeletLab`] needs (pass to [`crate::require_privileged`]).
pub const TOOLS: &[&str] = &[
    "ip",
    "nsenter",
    "kubectl",
    "docker-registry",
    "skopeo",
    "umoci",
    "/usr/lib/cni/bridge",
    "/usr/lib/cni/host-local",
    "/usr/lib/cni/loopback",
];

/// A node with its control plane. Field order is drop order: kubelet, then the rest.
pub struct KubeletLab {
    kubelet: Option<ChildGuard>,
    pub control: ControlPlane,
    _registry: Registry,
    pub root: TempDir,
    pub cni_dir: TempDir,
    pub cgroups: CgroupTreeGuard,
    pub node_name: String,
    pub bridge: String,
    pub subnet: String,
    pub network: String,
    /// The httpd image (`<registry>/test/httpd:v1`): busybox running `httpd -f -p 80 -h /www`, serving "hi".
    pub image: String,
    registry_addr: String,
    pub netns: NetnsGuard,
    /// Extra flags for the next [`KubeletLab::start_kubelet`].
    pub kubelet_args: Vec<String>,
    /// The kubelet's kubeconfig: the admin's, or the node's own (see [`KubeletLab::start_with_node_credentials`]).
    kubelet_kubeconfig: PathBuf,
}

fn next_subnet() -> String {
    // Distinct per test in this process; namespaces keep other processes' labs apart anyway.
    static N: AtomicU32 = AtomicU32::new(0);
    let n = N.fetch_add(1, Ordering::Relaxed);
    format!("10.{}.{}.0/24", 200 + (std::process::id() % 50), n % 250)
}

impl KubeletLab {
    /// Starts everything and waits until the node is Ready.
    pub fn start() -> Self {
        Self::start_as(false)
    }

    /// Like [`KubeletLab::start`], with the kubelet using its node's own credentials (`system:node:<name>` in
    /// `system:nodes`), so the API server's node authorization and NodeRestriction apply to it as in a cluster.
    pub fn start_with_node_credentials() -> Self {
        Self::start_as(true)
    }

    fn start_as(node_credentials: bool) -> Self {
        let netns = NetnsGuard::new(&unique_name("wlk")).expect("node netns");
        let registry = Registry::start_in_netns(netns.name()).expect("registry");
        let layout = OciLayout::new().expect("layout");
        layout.busybox("httpd").expect("busybox image");
        layout.config(
            "httpd",
            &[
                "--config.cmd",
                "httpd",
                "--config.cmd",
                "-f",
                "--config.cmd",
                "-p",
                "--config.cmd",
                "80",
                "--config.cmd",
                "-h",
                "--config.cmd",
                "/www",
            ],
        );
        registry.push(&layout.path(), "httpd", "test/httpd:v1", false);
        let image = format!("{}/test/httpd:v1", registry.addr);
        let registry_addr = registry.addr.clone();
        let control =
            ControlPlane::start_in_netns(netns.name(), std::net::Ipv4Addr::LOCALHOST, |_| {
                Vec::new()
            });
        let root = tempfile::Builder::new()
            .prefix("windlass-kubelet-")
            .tempdir()
            .expect("root dir");
        let cni_dir = tempfile::Builder::new()
            .prefix("windlass-cni-")
            .tempdir()
            .expect("cni dir");
        let network = unique_name("net");
        let bridge = unique_name("wb");
        let subnet = next_subnet();
        let conf = serde_json::json!({
            "cniVersion": "1.0.0",
            "name": network,
            "plugins": [
                {
                    "type": "bridge",
                    "bridge": bridge,
                    "isGateway": true,
                    "ipam": {
                        "type": "host-local",
                        "subnet": subnet,
                        "dataDir": cni_dir.path().join("ipam"),
                        "routes": [{"dst": "0.0.0.0/0"}],
                    },
                },
                {"type": "loopback"},
            ],
        });
        std::fs::create_dir(cni_dir.path().join("net.d")).expect("net.d");
        std::fs::write(
            cni_dir.path().join("net.d/10-lab.conflist"),
            serde_json::to_vec_pretty(&conf).expect("conf json"),
        )
        .expect("write conflist");
        let node_name = unique_name("node-");
        let kubelet_kubeconfig = if node_credentials {
            let out = control.data_dir().join(format!("{node_name}.kubeconfig"));
            let mut cmd = Command::new(workspace_binary("windlass-control"));
            cmd.args(["issue-kubeconfig", "--data-dir"])
                .arg(control.data_dir())
                .args(["--user", &format!("system:node:{node_name}")])
                .args([
                    "--group",
                    "system:nodes",
                    "--server",
                    &control.url(),
                    "--out",
                ])
                .arg(&out);
            crate::run_ok(&mut cmd);
            out
        } else {
            control.kubeconfig()
        };
        let mut lab = Self {
            kubelet: None,
            control,
            _registry: registry,
            root,
            cni_dir,
            cgroups: CgroupTreeGuard::new(),
            node_name,
            bridge,
            subnet,
            network,
            image,
            registry_addr,
            netns,
            kubelet_args: Vec::new(),
            kubelet_kubeconfig,
        };
        lab.start_kubelet();
        lab.wait_node_ready();
        lab
    }

    fn log_path(&self) -> PathBuf {
        self.root.path().join("kubelet.log")
    }

    /// The kubelet's `--pod-manifest-path` (static pods); not created: a test makes it when it needs it.
    pub fn manifest_dir(&self) -> PathBuf {
        self.root.path().join("manifests")
    }

    /// Starts `windlass-kubelet` (appending to its log).
    pub fn start_kubelet(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())
            .expect("kubelet log");
        let child = ChildGuard::spawn(
            Command::new("nsenter")
                .arg(format!("--net={}", self.netns.path().display()))
                .arg(workspace_binary("windlass-kubelet"))
                .arg("--kubeconfig")
                .arg(&self.kubelet_kubeconfig)
                .args(["--node-name", &self.node_name, "--node-ip", "127.0.0.1"])
                .arg("--root-dir")
                .arg(self.root.path())
                .arg("--cgroup-root")
                .arg(format!("/{}", self.cgroups.top()))
                .args(["--cni-bin-dir", "/usr/lib/cni"])
                .arg("--cni-conf-dir")
                .arg(self.cni_dir.path().join("net.d"))
                .args(["--insecure-registry", &self.registry_addr])
                .arg("--pod-manifest-path")
                .arg(self.manifest_dir())
                .arg("--runtime-binary")
                .arg(workspace_binary("windlass-runtime"))
                // The cluster CA signs the API server's kubelet client certificate: exec, logs and port-forward
                // through the API server reach the kubelet API.
                .arg("--client-ca-file")
                .arg(self.control.data_dir().join("pki/ca.crt"))
                .args(&self.kubelet_args)
                .env("RUST_LOG", "info,windlass_kubelet=debug")
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(log),
        )
        .expect("start windlass-kubelet");
        self.kubelet = Some(child);
    }

    /// The running kubelet's PID (it is exec'd by `nsenter`, so this is the kubelet itself).
    pub fn kubelet_pid(&self) -> u32 {
        self.kubelet
            .as_ref()
            .map(ChildGuard::id)
            .expect("kubelet running")
    }

    /// SIGKILLs the kubelet (pods keep running).
    pub fn kill_kubelet(&mut self) {
        self.kubelet.take();
    }

    /// Sends the kubelet SIGTERM and waits (bounded) for it to exit; its exit status.
    pub fn stop_kubelet(&mut self) -> std::process::ExitStatus {
        let mut child = self.kubelet.take().expect("kubelet running").into_inner();
        let pid = nix::unistd::Pid::from_raw(child.id() as i32);
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM)
            .expect("SIGTERM the kubelet");
        wait_for(
            "the kubelet to exit after SIGTERM",
            Duration::from_secs(15),
            || child.try_wait().ok().flatten(),
        )
    }

    /// The kubelet's log so far.
    pub fn kubelet_log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    fn wait_node_ready(&mut self) {
        let name = self.node_name.clone();
        wait_for("the node to be Ready", Duration::from_secs(60), || {
            if let Some(status) = self
                .kubelet
                .as_mut()
                .and_then(|k| k.child_mut().try_wait().ok().flatten())
            {
                panic!(
                    "windlass-kubelet exited ({status}):\n{}",
                    self.kubelet_log()
                );
            }
            let out = self.control.kubectl(&[
                "get",
                "node",
                &name,
                "-o",
                "jsonpath={.status.conditions[?(@.type==\"Ready\")].status}",
            ]);
            (String::from_utf8_lossy(&out.stdout).trim() == "True").then_some(())
        });
    }

    /// `kubectl apply -f -` of a manifest, failing the test (with the kubelet log) on error.
    pub fn apply(&self, manifest: &str) {
        self.control
            .kubectl_stdin_ok(&["apply", "-f", "-"], manifest);
    }

    /// The pod as `kubectl get -o json` shows it, or None once it is gone.
    pub fn pod(&self, name: &str) -> Option<Value> {
        let out = self
            .control
            .kubectl(&["get", "pod", name, "-n", "default", "-o", "json"]);
        if !out.status.success() {
            return None;
        }
        serde_json::from_slice(&out.stdout).ok()
    }

    /// Waits until `check` accepts the pod, failing with the pod and the kubelet log tail after `timeout`.
    pub fn wait_pod(
        &self,
        name: &str,
        what: &str,
        timeout: Duration,
        check: impl Fn(&Value) -> bool,
    ) -> Value {
        let deadline = std::time::Instant::now() + timeout;
        loop {
            let pod = self.pod(name);
            if let Some(p) = pod.as_ref().filter(|p| check(p)) {
                return p.clone();
            }
            if std::time::Instant::now() > deadline {
                let log = self.kubelet_log();
                let lines: Vec<&str> = log.lines().collect();
                panic!(
                    "timed out after {timeout:?} waiting for pod {name} to be {what}; pod:\n{}\nkubelet log tail:\n{}",
                    pod.map(|p| serde_json::to_string_pretty(&p["status"]).unwrap_or_default())
                        .unwrap_or_else(|| "<gone>".into()),
                    lines[lines.len().saturating_sub(60)..].join("\n")
                );
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// An HTTP/1.0 GET of `/` at `ip:port` from inside the node's network namespace: the response, or why not.
    pub fn http_get(&self, ip: &str, port: u16) -> Result<String, String> {
        use std::io::{Read, Write};
        let addr: std::net::SocketAddr = format!("{ip}:{port}")
            .parse()
            .map_err(|e| format!("{ip}:{port}: {e}"))?;
        crate::lab::in_netns(&self.netns.path(), move || {
            let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(2))
                .map_err(|e| format!("connect {addr}: {e}"))?;
            s.set_read_timeout(Some(Duration::from_secs(5)))
                .map_err(|e| e.to_string())?;
            s.write_all(b"GET / HTTP/1.0\r\nHost: pod\r\n\r\n")
                .map_err(|e| e.to_string())?;
            let mut out = String::new();
            s.read_to_string(&mut out).map_err(|e| e.to_string())?;
            Ok(out)
        })
        .map_err(|e| e.to_string())?
    }

    /// The host-local IPAM reservations (one file per IP) of the lab network.
    pub fn ip_reservations(&self) -> Vec<String> {
        let dir = self.cni_dir.path().join("ipam").join(&self.network);
        std::fs::read_dir(dir)
            .map(|d| {
                d.flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .filter(|n| n.parse::<std::net::IpAddr>().is_ok())
                    .collect()
            })
            .unwrap_or_default()
    }

    /// The sandbox directories on the node.
    pub fn sandbox_dirs(&self) -> Vec<String> {
        std::fs::read_dir(self.root.path().join("sandboxes"))
            .map(|d| {
                d.flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default()
    }

    /// The pod cgroup of `uid` in any hierarchy (BestEffort pods: `<root>/kubepods/besteffort/pod<uid>`).
    pub fn pod_cgroups(&self, uid: &str) -> Vec<PathBuf> {
        let mut out = Vec::new();
        for class in ["", "burstable/", "besteffort/"] {
            out.extend(crate::runtime::cgroup_dirs(&format!(
                "/{}/kubepods/{class}pod{uid}",
                self.cgroups.top()
            )));
        }
        out
    }

    /// Mounts under the kubelet's root directory.
    pub fn mounts(&self) -> Vec<String> {
        crate::runtime::mounts_mentioning(&self.root.path().display().to_string())
    }
}

fn unmount_under(root: &Path) {
    let prefix = root.display().to_string();
    let mut points: Vec<String> = std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split(' ').nth(4).map(str::to_string))
        .filter(|p| p.starts_with(&prefix))
        .collect();
    points.sort_by_key(|p| std::cmp::Reverse(p.len()));
    for p in points {
        let _ = nix::mount::umount2(Path::new(&p), nix::mount::MntFlags::MNT_DETACH);
    }
}

impl Drop for KubeletLab {
    fn drop(&mut self) {
        self.kubelet.take();
        // A failing test (or WINDLASS_TEST_LOGS=1) shows what the kubelet said.
        if std::thread::panicking() || std::env::var("WINDLASS_TEST_LOGS").is_ok_and(|v| v == "1") {
            let log = self.kubelet_log();
            let lines: Vec<&str> = log.lines().collect();
            eprintln!(
                "--- kubelet log ({}) tail ---\n{}",
                self.node_name,
                lines[lines.len().saturating_sub(200)..].join("\n")
            );
        }
        // Whatever the kubelet left running: sandboxes (containers, holders, netns pins, cgroups) through the
        // runtime library, then any root filesystem still mounted.
        let mgr = windlass_runtime::SandboxManager::new(
            self.root.path().join("sandboxes"),
            "/sys/fs/cgroup",
            workspace_binary("windlass-runtime"),
        );
        for sb in mgr.list_sandboxes().unwrap_or_default() {
            let _ = mgr.remove_sandbox(&sb.id);
        }
        unmount_under(self.root.path());
    }
}
