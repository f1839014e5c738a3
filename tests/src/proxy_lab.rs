//! A one-node namespace lab for the service proxy.
//!
//! ```text
//!  client ns (192.168.200.2) ── up0 ── node ns (192.168.200.1, br0 10.244.1.1/24) ── v0..vN ── pod ns (10.244.1.1x)
//! ```
//! Each pod runs busybox `httpd` on port 80 serving `/` (its name) and `/cgi-bin/ip` (the client address it sees),
//! and a UDP socket on port 9000 the test reads. Pod ports are in hairpin mode, as the CNI bridge
//! plugin's `hairpinMode` sets them: with br_netfilter (loaded here, as on real nodes) a pod reaching itself through
//! a Service is bridged back out of the port it came in on. The node's default route points at the client, so it
//! covers the service CIDR (otherwise node-local connects to a ClusterIP fail before the OUTPUT hook). The proxy
//! binary runs inside the node namespace (`ip netns exec`), following a services file the test rewrites.

use std::net::UdpSocket;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::netns::NetnsGuard;
use crate::{unique_name, wait_for, workspace_binary, ChildGuard, TempDir};

/// The node's name in the lab; pods whose `node` is this are local to the proxy.
pub const NODE: &str = "node-a";
pub const NODE_IP: &str = "192.168.200.1";
pub const CLIENT_IP: &str = "192.168.200.2";
pub const BRIDGE_IP: &str = "10.244.1.1";
pub const UDP_PORT: u16 = 9000;

/// A pod: a namespace with an address on the node's bridge and its servers.
pub struct Pod {
    pub name: String,
    pub ip: String,
    pub ns: NetnsGuard,
    /// Bound to 0.0.0.0:[`UDP_PORT`] inside the pod (busybox nc has no UDP in this build).
    pub udp: UdpSocket,
    _servers: Vec<ChildGuard>,
}

/// A UDP socket bound to `addr` inside `ns`: created on a helper thread that entered the namespace (a socket keeps
/// the namespace it was made in), so the test's own threads never leave theirs.
pub fn udp_socket_in(ns: &NetnsGuard, addr: &str) -> UdpSocket {
    let path = ns.path();
    let addr = addr.to_string();
    std::thread::spawn(move || {
        let f = std::fs::File::open(&path).expect("open netns");
        // SAFETY: setns on a valid namespace fd affects only this short-lived helper thread.
        let rc = unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) };
        assert_eq!(rc, 0, "setns: {}", std::io::Error::last_os_error());
        UdpSocket::bind(&addr).expect("bind UDP socket")
    })
    .join()
    .expect("netns helper thread")
}

pub struct ProxyLab {
    // Field order is drop order: the proxy and pods go before the namespaces they live in.
    proxy: Option<ChildGuard>,
    pub pods: Vec<Pod>,
    pub client: NetnsGuard,
    pub node: NetnsGuard,
    pub dir: TempDir,
    services_file: PathBuf,
    generation: u32,
}

fn sh(ns: &NetnsGuard, script: &str) {
    ns.exec(&["sh", "-c", script])
        .unwrap_or_else(|e| panic!("lab set-up step failed: {e}"));
}

impl ProxyLab {
    /// Builds the node, the client and `pods` pods (pods `0..local` are on [`NODE`], the rest on `node-b`).
    pub fn new(pods: usize) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let node = NetnsGuard::new(&unique_name("pxn")).expect("node netns");
        let client = NetnsGuard::new(&unique_name("pxc")).expect("client netns");
        sh(
            &node,
            "ip link add br0 type bridge && ip addr add 10.244.1.1/24 dev br0 && ip link set br0 up && \
             sysctl -qw net.ipv4.ip_forward=1",
        );
        sh(
            &node,
            &format!(
                "ip link add up0 type veth peer name eth0 netns {c} && ip addr add {NODE_IP}/24 dev up0 && \
                 ip link set up0 up && ip route add default via {CLIENT_IP}",
                c = client.name()
            ),
        );
        sh(
            &client,
            &format!(
                "ip addr add {CLIENT_IP}/24 dev eth0 && ip link set eth0 up && \
                 ip route add 10.244.0.0/16 via {NODE_IP}"
            ),
        );
        let mut lab = Self {
            proxy: None,
            pods: Vec::new(),
            client,
            node,
            services_file: dir.path().join("services.json"),
            dir,
            generation: 0,
        };
        for i in 0..pods {
            lab.add_pod(i);
        }
        lab
    }

    fn add_pod(&mut self, i: usize) {
        let name = format!("pod-{i}");
        let ip = format!("10.244.1.{}", 10 + i);
        let ns = NetnsGuard::new(&unique_name("pxp")).expect("pod netns");
        sh(
            &self.node,
            &format!(
                "ip link add v{i} type veth peer name eth0 netns {p} && ip link set v{i} master br0 && \
                 ip link set v{i} type bridge_slave hairpin on && ip link set v{i} up",
                p = ns.name()
            ),
        );
        sh(
            &ns,
            &format!(
                "ip addr add {ip}/24 dev eth0 && ip link set eth0 up && ip route add default via {BRIDGE_IP}"
            ),
        );
        let www = self.dir.path().join(&name);
        std::fs::create_dir_all(www.join("cgi-bin")).expect("www dir");
        std::fs::write(www.join("index.html"), format!("{name}\n")).expect("index");
        let cgi = www.join("cgi-bin/ip");
        std::fs::write(
            &cgi,
            format!("#!/bin/sh\necho 'Content-Type: text/plain'\necho\na=${{REMOTE_ADDR#\\[::ffff:}}\necho \"{name} ${{a%]}}\"\n"),
        )
        .expect("cgi");
        std::fs::set_permissions(&cgi, std::os::unix::fs::PermissionsExt::from_mode(0o755))
            .expect("chmod");
        let httpd = ChildGuard::spawn(
            ns.command("busybox")
                .args(["httpd", "-f", "-p", "80", "-h"])
                .arg(&www)
                .stdout(Stdio::null())
                .stderr(Stdio::null()),
        )
        .expect("httpd");
        let udp = udp_socket_in(&ns, &format!("0.0.0.0:{UDP_PORT}"));
        udp.set_nonblocking(true).expect("nonblocking");
        let pod = Pod {
            name,
            ip,
            ns,
            udp,
            _servers: vec![httpd],
        };
        wait_for("pod httpd to answer", Duration::from_secs(5), || {
            pod.ns
                .exec(&["busybox", "wget", "-q", "-O", "-", "http://127.0.0.1/"])
                .ok()
        });
        self.pods.push(pod);
    }

    /// Writes the services file atomically (the proxy polls its modification time).
    pub fn set_objects(&mut self, items: Vec<Value>) {
        self.generation += 1;
        let tmp = self
            .dir
            .path()
            .join(format!("services.{}.tmp", self.generation));
        let list = json!({"apiVersion": "v1", "kind": "List", "items": items});
        std::fs::write(&tmp, list.to_string()).expect("write services");
        std::fs::rename(&tmp, &self.services_file).expect("rename services");
    }

    pub fn services_file(&self) -> &Path {
        &self.services_file
    }

    /// Starts `windlass-proxy` in the node namespace following the services file (which must exist).
    pub fn start_proxy(&mut self) {
        let bin = workspace_binary("windlass-proxy");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("proxy.log"))
            .expect("proxy log");
        let mut cmd = self.node.command(bin.to_str().expect("utf-8 path"));
        cmd.args(["--node-name", NODE, "--services-file"])
            .arg(&self.services_file)
            .args([
                "--healthz-bind-address",
                "127.0.0.1:10256",
                "--metrics-bind-address",
                "127.0.0.1:10249",
                "--debounce-ms",
                "20",
            ])
            .stdout(Stdio::null())
            .stderr(log);
        self.proxy = Some(ChildGuard::spawn(&mut cmd).expect("start windlass-proxy"));
        wait_for(
            "the proxy to report healthy",
            Duration::from_secs(10),
            || {
                self.fetch(&self.node, "http://127.0.0.1:10256/healthz")
                    .ok()
                    .filter(|b| b.contains("lastUpdated"))
            },
        );
    }

    /// Kills the proxy (SIGKILL: no chance to clean anything up, like a crash).
    pub fn kill_proxy(&mut self) {
        self.proxy = None;
    }

    pub fn proxy_log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("proxy.log")).unwrap_or_default()
    }

    /// `wget -q -O - url` from `ns`, bounded by `timeout 5` (busybox wget's own -T segfaults in this build).
    pub fn fetch(&self, ns: &NetnsGuard, url: &str) -> Result<String, String> {
        let out = ns
            .command("timeout")
            .args(["5", "busybox", "wget", "-q", "-O", "-", url])
            .stdin(Stdio::null())
            .output()
            .map_err(|e| e.to_string())?;
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
        } else {
            Err(format!(
                "wget {url} failed ({}): {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            ))
        }
    }

    /// Like [`Self::fetch`] and returns how long it took.
    pub fn timed_fetch(&self, ns: &NetnsGuard, url: &str) -> (Result<String, String>, Duration) {
        let t = Instant::now();
        let r = self.fetch(ns, url);
        (r, t.elapsed())
    }

    /// Lists one of the proxy's maps or sets in the node namespace (tests may list; the proxy never does).
    pub fn list(&self, kind: &str, name: &str) -> String {
        self.node
            .exec(&["nft", "list", kind, "ip", "windlass-proxy", name])
            .unwrap_or_default()
    }

    /// Waits until the endpoint map contains (or, with `present = false`, lacks) `needle`.
    pub fn wait_endpoints(&self, needle: &str, present: bool) {
        wait_for(
            &format!(
                "service-endpoints to {} {needle}",
                if present { "contain" } else { "lose" }
            ),
            Duration::from_secs(10),
            || {
                (["tcp", "udp"].iter().any(|p| {
                    self.list("map", &format!("service-endpoints-{p}"))
                        .contains(needle)
                }) == present)
                    .then_some(())
            },
        );
    }

    pub fn nft_tables(&self) -> String {
        self.node
            .exec(&["nft", "list", "tables"])
            .unwrap_or_default()
    }

    pub fn run_in(&self, ns: &NetnsGuard, argv: &[&str]) -> std::process::Output {
        let mut cmd: Command = ns.command(argv[0]);
        cmd.args(&argv[1..]).stdin(Stdio::null());
        cmd.output().expect("run command in netns")
    }
}

/// A Service object. `extra` is merged into `spec`.
pub fn service(name: &str, cluster_ip: &str, ports: Value, extra: Value) -> Value {
    let mut spec = json!({"clusterIP": cluster_ip, "clusterIPs": [cluster_ip], "ports": ports});
    if let (Some(s), Some(e)) = (spec.as_object_mut(), extra.as_object()) {
        for (k, v) in e {
            s.insert(k.clone(), v.clone());
        }
    }
    json!({"apiVersion": "v1", "kind": "Service", "metadata": {"namespace": "default", "name": name}, "spec": spec})
}

/// An EndpointSlice of `service` with `endpoints` = (ip, ready, node).
pub fn slice(service: &str, ports: Value, endpoints: &[(&str, bool, &str)]) -> Value {
    let eps: Vec<Value> = endpoints
        .iter()
        .map(|(ip, ready, node)| {
            json!({"addresses": [ip], "conditions": {"ready": ready, "serving": ready, "terminating": false},
                   "nodeName": node})
        })
        .collect();
    json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
           "metadata": {"namespace": "default", "name": format!("{service}-abc"),
                        "labels": {"kubernetes.io/service-name": service}},
           "addressType": "IPv4", "ports": ports, "endpoints": eps})
}
