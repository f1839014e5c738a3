//! `windlass-proxy --kubeconfig` against the real Windlass API server, on a two-node namespace lab with the
//! `windlass-cni` daemons routing between the nodes: a Service and its EndpointSlice created with kubectl are
//! reachable by ClusterIP from a pod and by NodePort from the outside client on every node; removing an endpoint
//! and deleting the Service are followed.

use std::net::Ipv4Addr;
use std::process::Stdio;
use std::time::Duration;

use serde_json::json;
use windlass_tests::api_lab::{ApiLab, CniDaemon};
use windlass_tests::lab::LabNode;
use windlass_tests::netns::NetnsGuard;
use windlass_tests::{require_privileged, wait_for, workspace_binary, ChildGuard, TempDir};

const TOOLS: &[&str] = &["ip", "nft", "busybox", "kubectl", "timeout"];

/// `wget -q -O - url` from `ns`, bounded by `timeout 5` (busybox wget's own -T segfaults in this build).
fn fetch(ns: &NetnsGuard, url: &str) -> Result<String, String> {
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
            "wget {url}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// A pod running busybox httpd on port 80 that answers with its name.
struct WebPod {
    ip: Ipv4Addr,
    node: String,
    _httpd: ChildGuard,
    _ns: NetnsGuard,
    _www: TempDir,
}

fn web_pod(lab: &ApiLab, node: &LabNode, daemon: &CniDaemon, name: &str) -> WebPod {
    let (ns, ip) = lab.attach_pod(node, daemon, name);
    let www = tempfile::tempdir().expect("www");
    std::fs::write(www.path().join("index.html"), format!("{name}\n")).expect("index");
    let httpd = ChildGuard::spawn(
        ns.command("busybox")
            .args(["httpd", "-f", "-p", "80", "-h"])
            .arg(www.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null()),
    )
    .expect("httpd");
    wait_for(&format!("{name}'s httpd"), Duration::from_secs(5), || {
        fetch(&ns, "http://127.0.0.1/").ok()
    });
    WebPod {
        ip,
        node: node.name.clone(),
        _httpd: httpd,
        _ns: ns,
        _www: www,
    }
}

fn start_proxy(lab: &ApiLab, node: &LabNode, logs: &std::path::Path, extra: &[&str]) -> ChildGuard {
    let log = std::fs::File::create(logs.join(format!("proxy-{}.log", node.name))).expect("log");
    let proxy = ChildGuard::spawn(
        node.netns
            .command(workspace_binary("windlass-proxy").to_str().expect("path"))
            .args(["--node-name", &node.name, "--kubeconfig"])
            .arg(lab.kubeconfig())
            .args([
                "--healthz-bind-address",
                "127.0.0.1:10256",
                "--metrics-bind-address",
                "127.0.0.1:10249",
                "--debounce-ms",
                "20",
            ])
            .args(extra)
            .stdout(Stdio::null())
            .stderr(log),
    )
    .expect("start windlass-proxy");
    wait_for(
        &format!("the proxy on {} to sync", node.name),
        Duration::from_secs(20),
        || {
            fetch(&node.netns, "http://127.0.0.1:10256/healthz")
                .ok()
                .filter(|b| b.contains("lastUpdated"))
        },
    );
    proxy
}

fn slice_manifest(service: &str, pods: &[&WebPod]) -> String {
    let endpoints: Vec<_> = pods
        .iter()
        .map(|p| {
            json!({"addresses": [p.ip.to_string()], "nodeName": p.node,
                   "conditions": {"ready": true, "serving": true, "terminating": false}})
        })
        .collect();
    json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
           "metadata": {"name": format!("{service}-1"), "namespace": "default",
                        "labels": {"kubernetes.io/service-name": service}},
           "addressType": "IPv4",
           "ports": [{"name": "http", "port": 80, "protocol": "TCP"}],
           "endpoints": endpoints})
    .to_string()
}

/// Which pods answer `url` from `ns` over `tries` fetches.
fn answers(ns: &NetnsGuard, url: &str, tries: usize) -> std::collections::BTreeSet<String> {
    (0..tries).filter_map(|_| fetch(ns, url).ok()).collect()
}

#[test]
fn services_and_endpoint_slices_created_with_kubectl_are_served_by_cluster_ip_and_node_port() {
    if !require_privileged(TOOLS) {
        return;
    }
    let lab = ApiLab::new(2);
    let logs = tempfile::tempdir().expect("logs");
    let nodes = &lab.lab.nodes;
    for n in nodes {
        lab.register_node(n, true);
    }
    let daemons: Vec<CniDaemon> = nodes
        .iter()
        .map(|n| lab.start_cni_daemon(n, "host-gw", logs.path()))
        .collect();
    for d in &daemons {
        wait_for("the conflists", Duration::from_secs(20), || d.conflist());
    }
    let pods = [
        web_pod(&lab, &nodes[0], &daemons[0], "web-0"),
        web_pod(&lab, &nodes[1], &daemons[1], "web-1"),
    ];
    let (client_pod, _) = lab.attach_pod(&nodes[0], &daemons[0], "client");
    let _proxies: Vec<ChildGuard> = nodes
        .iter()
        .map(|n| start_proxy(&lab, n, logs.path(), &[]))
        .collect();
    let logs_text = || {
        std::fs::read_dir(logs.path())
            .into_iter()
            .flatten()
            .filter_map(Result::ok)
            .map(|e| {
                format!(
                    "== {}\n{}",
                    e.path().display(),
                    std::fs::read_to_string(e.path()).unwrap_or_default()
                )
            })
            .collect::<Vec<_>>()
            .join("\n")
    };

    lab.control.kubectl_stdin_ok(
        &["create", "-f", "-"],
        &json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "web", "namespace": "default"},
                "spec": {"type": "NodePort", "ports": [{"name": "http", "port": 80, "targetPort": 80}]}})
        .to_string(),
    );
    lab.control.kubectl_stdin_ok(
        &["create", "-f", "-"],
        &slice_manifest("web", &[&pods[0], &pods[1]]),
    );
    let cluster_ip =
        lab.control
            .kubectl_ok(&["get", "svc", "web", "-o", "jsonpath={.spec.clusterIP}"]);
    let node_port = lab.control.kubectl_ok(&[
        "get",
        "svc",
        "web",
        "-o",
        "jsonpath={.spec.ports[0].nodePort}",
    ]);
    assert!(
        cluster_ip.parse::<Ipv4Addr>().is_ok(),
        "no ClusterIP: {cluster_ip:?}"
    );
    let service_url = format!("http://{cluster_ip}/");

    // ClusterIP from a pod: both endpoints (one on each node) answer.
    let both: std::collections::BTreeSet<String> =
        ["web-0".to_string(), "web-1".to_string()].into();
    wait_for(
        "both endpoints to answer through the ClusterIP",
        Duration::from_secs(30),
        || (answers(&client_pod, &service_url, 10) == both).then_some(()),
    );
    // NodePort from the outside client, on every node.
    for n in nodes {
        let url = format!("http://{}:{node_port}/", n.ip);
        let got = wait_for(
            &format!("NodePort on {}", n.name),
            Duration::from_secs(15),
            || fetch(&lab.lab.client, &url).ok(),
        );
        assert!(
            got.starts_with("web-"),
            "NodePort on {} answered {got:?}\n{}",
            n.name,
            logs_text()
        );
    }

    // An endpoint is removed from the slice: only web-0 answers from then on.
    lab.control
        .kubectl_stdin_ok(&["replace", "-f", "-"], &slice_manifest("web", &[&pods[0]]));
    let only0: std::collections::BTreeSet<String> = ["web-0".to_string()].into();
    wait_for(
        "the removed endpoint to stop answering",
        Duration::from_secs(15),
        || (answers(&client_pod, &service_url, 8) == only0).then_some(()),
    );
    assert_eq!(
        answers(
            &lab.lab.client,
            &format!("http://{}:{node_port}/", nodes[1].ip),
            6
        ),
        only0,
        "the NodePort on node1 still reaches the removed endpoint"
    );

    // The Service is deleted: its ClusterIP and NodePort stop answering.
    lab.control.kubectl_ok(&["delete", "svc", "web"]);
    wait_for(
        "the deleted Service's ClusterIP to stop answering",
        Duration::from_secs(15),
        || fetch(&client_pod, &service_url).is_err().then_some(()),
    );
    assert!(
        fetch(
            &lab.lab.client,
            &format!("http://{}:{node_port}/", nodes[0].ip)
        )
        .is_err(),
        "the deleted Service's NodePort still answers"
    );
    // The pods themselves are still there: only the Service went.
    assert_eq!(
        fetch(&client_pod, &format!("http://{}/", pods[1].ip)).as_deref(),
        Ok("web-1")
    );
}

/// A pod's `/etc/resolv.conf` as the kubelet writes it for `dnsPolicy: ClusterFirst` in namespace `default`:
/// `ip netns exec` bind-mounts `/etc/netns/<name>/resolv.conf` over `/etc/resolv.conf` for what it runs. Removed on
/// drop.
struct PodResolvConf(std::path::PathBuf);

impl PodResolvConf {
    fn cluster_first(pod: &NetnsGuard) -> Self {
        let dir = std::path::Path::new("/etc/netns").join(pod.name());
        std::fs::create_dir_all(&dir).expect("/etc/netns dir");
        std::fs::write(
            dir.join("resolv.conf"),
            "nameserver 10.96.0.10\nsearch default.svc.cluster.local svc.cluster.local cluster.local\n\
             options ndots:5\n",
        )
        .expect("resolv.conf");
        Self(dir)
    }
}

impl Drop for PodResolvConf {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// `busybox nslookup [-type=T] NAME` from `pod` (its resolv.conf picks the server and search path).
fn nslookup(pod: &NetnsGuard, qtype: &str, name: &str) -> String {
    let out = pod
        .command("timeout")
        .args(["10", "busybox", "nslookup", &format!("-type={qtype}"), name])
        .stdin(Stdio::null())
        .output()
        .expect("nslookup");
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// The addresses in busybox nslookup's answer section.
fn addresses(out: &str) -> Vec<String> {
    let mut v: Vec<String> = out
        .lines()
        .skip_while(|l| !l.starts_with("Name:"))
        .filter_map(|l| l.strip_prefix("Address:").map(|a| a.trim().to_string()))
        .collect();
    v.sort();
    v
}

#[test]
fn cluster_first_pods_resolve_services_from_the_api_through_kube_dns_on_every_node() {
    if !require_privileged(TOOLS) {
        return;
    }
    let lab = ApiLab::new(2);
    let logs = tempfile::tempdir().expect("logs");
    let nodes = &lab.lab.nodes;
    // The API server creates kube-dns at the cluster DNS address, as kubeadm's DNS add-on does.
    assert_eq!(
        lab.control.kubectl_ok(&[
            "get",
            "svc",
            "kube-dns",
            "-n",
            "kube-system",
            "-o",
            "jsonpath={.spec.clusterIP}",
        ]),
        "10.96.0.10"
    );
    for n in nodes {
        lab.register_node(n, true);
    }
    let daemons: Vec<CniDaemon> = nodes
        .iter()
        .map(|n| lab.start_cni_daemon(n, "host-gw", logs.path()))
        .collect();
    for d in &daemons {
        wait_for("the conflists", Duration::from_secs(20), || d.conflist());
    }
    let pods = [
        web_pod(&lab, &nodes[0], &daemons[0], "web-0"),
        web_pod(&lab, &nodes[1], &daemons[1], "web-1"),
    ];
    // No upstream resolvers in the lab: outside names are not part of this test.
    let resolv = logs.path().join("upstream-resolv.conf");
    std::fs::write(&resolv, "nameserver 127.0.0.1\n").expect("resolv.conf");
    let resolv = resolv.to_str().expect("path").to_string();
    let proxies: Vec<ChildGuard> = nodes
        .iter()
        .map(|n| {
            start_proxy(
                &lab,
                n,
                logs.path(),
                &[
                    "--dns-bind-address",
                    "10.96.0.10:53",
                    "--dns-upstream-resolv-conf",
                    &resolv,
                ],
            )
        })
        .collect();

    let ports = json!([{"name": "http", "port": 80, "targetPort": 80}]);
    for (name, spec) in [
        ("web", json!({"ports": ports})),
        ("db", json!({"clusterIP": "None", "ports": ports})),
        (
            "alias",
            json!({"type": "ExternalName", "externalName": "web.default.svc.cluster.local"}),
        ),
    ] {
        lab.control.kubectl_stdin_ok(
            &["create", "-f", "-"],
            &json!({"apiVersion": "v1", "kind": "Service",
                    "metadata": {"name": name, "namespace": "default"}, "spec": spec})
            .to_string(),
        );
    }
    for svc in ["web", "db"] {
        lab.control.kubectl_stdin_ok(
            &["create", "-f", "-"],
            &slice_manifest(svc, &[&pods[0], &pods[1]]),
        );
    }
    let web_ip = lab
        .control
        .kubectl_ok(&["get", "svc", "web", "-o", "jsonpath={.spec.clusterIP}"]);
    let mut pod_ips: Vec<String> = pods.iter().map(|p| p.ip.to_string()).collect();
    pod_ips.sort();

    for (i, (n, d)) in nodes.iter().zip(&daemons).enumerate() {
        let (client, _) = lab.attach_pod(n, d, &format!("dns-client-{i}"));
        let _conf = PodResolvConf::cluster_first(&client);
        // A short name through the search path, via 10.96.0.10 served on this pod's node.
        let out = wait_for(
            &format!("`web` to resolve from a pod on {}", n.name),
            Duration::from_secs(20),
            || {
                let out = nslookup(&client, "a", "web");
                (addresses(&out) == [web_ip.as_str()]).then_some(out)
            },
        );
        assert!(out.contains("web.default.svc.cluster.local"), "{out}");
        // Headless: the ready pod IPs.
        let out = nslookup(&client, "a", "db.default.svc.cluster.local");
        assert_eq!(addresses(&out), pod_ips, "{out}");
        // SRV for the named port.
        let out = nslookup(&client, "srv", "_http._tcp.web.default.svc.cluster.local");
        assert!(
            out.contains("80 web.default.svc.cluster.local"),
            "no SRV for the named port: {out}"
        );
        // ExternalName: a CNAME, chased to the target's address.
        let out = nslookup(&client, "a", "alias.default.svc.cluster.local");
        assert!(
            out.contains("canonical name = web.default.svc.cluster.local"),
            "no CNAME: {out}"
        );
        assert_eq!(addresses(&out), [web_ip.as_str()], "{out}");
        // kube-dns itself.
        let out = nslookup(&client, "a", "kube-dns.kube-system.svc.cluster.local");
        assert_eq!(addresses(&out), ["10.96.0.10"], "{out}");
        // And the Service by name, through the proxy's rules.
        let got = wait_for("web by name over HTTP", Duration::from_secs(10), || {
            fetch(&client, "http://web.default.svc.cluster.local/").ok()
        });
        assert!(got.starts_with("web-"), "{got}");
    }

    // A Service deleted in the API disappears from DNS.
    lab.control.kubectl_ok(&["delete", "svc", "web"]);
    let (client, _) = lab.attach_pod(&nodes[0], &daemons[0], "dns-client-late");
    let _conf = PodResolvConf::cluster_first(&client);
    wait_for("web to be NXDOMAIN", Duration::from_secs(15), || {
        nslookup(&client, "a", "web.default.svc.cluster.local")
            .contains("NXDOMAIN")
            .then_some(())
    });

    // `--cleanup` with the DNS address leaves neither the table nor the address behind.
    drop(proxies);
    let node = &nodes[0].netns;
    let lo = || {
        node.exec(&["ip", "-4", "addr", "show", "dev", "lo"])
            .expect("ip addr")
    };
    assert!(lo().contains("10.96.0.10/32"), "{}", lo());
    let out = node
        .command(workspace_binary("windlass-proxy").to_str().expect("path"))
        .args(["--cleanup", "--dns-bind-address", "10.96.0.10:53"])
        .output()
        .expect("windlass-proxy --cleanup");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!lo().contains("10.96.0.10"), "{}", lo());
    let tables = node.exec(&["nft", "list", "tables"]).expect("nft");
    assert!(!tables.contains("windlass-proxy"), "{tables}");
}
