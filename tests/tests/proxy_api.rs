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

fn start_proxy(lab: &ApiLab, node: &LabNode, logs: &std::path::Path) -> ChildGuard {
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
        .map(|n| start_proxy(&lab, n, logs.path()))
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
