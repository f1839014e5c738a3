//! The `windlass-proxy` binary with `--dns-bind-address`: the same source that drives the nftables rules drives
//! cluster DNS, so a Service added to or removed from the watched objects appears in or vanishes from DNS.
//! Runs in a node namespace (10.96.0.10 on its `lo`) with a pod namespace on a veth pair; needs the binary built
//! (`cargo build -p windlass-proxy --bins`).

use std::process::Stdio;
use std::time::Duration;

use serde_json::{json, Value};
use windlass_tests::netns::NetnsGuard;
use windlass_tests::{require_privileged, unique_name, wait_for, workspace_binary, ChildGuard};

fn service(name: &str, cluster_ip: &str) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"namespace": "shop", "name": name},
        "spec": {"clusterIP": cluster_ip, "ports": [{"name": "http", "port": 80, "targetPort": 8080}]}
    })
}

fn headless_slice(service: &str, ips: &[&str]) -> Value {
    json!({
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"namespace": "shop", "name": format!("{service}-1"),
                     "labels": {"kubernetes.io/service-name": service}},
        "addressType": "IPv4",
        "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
        "endpoints": ips.iter().map(|ip| json!({"addresses": [ip], "conditions": {"ready": true}}))
            .collect::<Vec<_>>()
    })
}

fn write_objects(path: &std::path::Path, items: Vec<Value>) {
    let tmp = path.with_extension("tmp");
    let list = json!({"apiVersion": "v1", "kind": "List", "items": items});
    std::fs::write(&tmp, list.to_string()).expect("write services");
    std::fs::rename(&tmp, path).expect("rename services");
}

fn nslookup(pod: &NetnsGuard, name: &str) -> String {
    let out = pod
        .command("busybox")
        .args(["nslookup", "-type=a", name, "10.96.0.10"])
        .output()
        .expect("run busybox nslookup");
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

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
fn the_proxy_serves_dns_for_the_services_it_watches_and_follows_their_changes() {
    if !require_privileged(&["ip", "nft", "busybox"]) {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let node = NetnsGuard::new(&unique_name("dbn")).expect("node netns");
    let pod = NetnsGuard::new(&unique_name("dbp")).expect("pod netns");
    let host_if = unique_name("dbv");
    let node_setup: [&[&str]; 4] = [
        &["ip", "addr", "add", "10.96.0.10/32", "dev", "lo"],
        &[
            "ip",
            "link",
            "add",
            &host_if,
            "type",
            "veth",
            "peer",
            "name",
            "eth0",
            "netns",
            pod.name(),
        ],
        &["ip", "addr", "add", "10.88.0.1/24", "dev", &host_if],
        &["ip", "link", "set", &host_if, "up"],
    ];
    for argv in node_setup {
        node.exec(argv).expect("node netns setup");
    }
    let pod_setup: [&[&str]; 3] = [
        &["ip", "addr", "add", "10.88.0.2/24", "dev", "eth0"],
        &["ip", "link", "set", "eth0", "up"],
        &["ip", "route", "add", "default", "via", "10.88.0.1"],
    ];
    for argv in pod_setup {
        pod.exec(argv).expect("pod netns setup");
    }

    let services = dir.path().join("services.json");
    write_objects(&services, vec![service("web", "10.96.0.20")]);
    let resolv = dir.path().join("resolv.conf");
    std::fs::write(&resolv, "nameserver 127.0.0.1\n").expect("resolv.conf");
    let log = std::fs::File::create(dir.path().join("proxy.log")).expect("proxy log");
    let bin = workspace_binary("windlass-proxy");
    let mut cmd = node.command(bin.to_str().expect("utf-8 path"));
    cmd.args(["--node-name", "n1", "--services-file"])
        .arg(&services)
        .args([
            "--healthz-bind-address",
            "127.0.0.1:10256",
            "--metrics-bind-address",
            "127.0.0.1:10249",
            "--debounce-ms",
            "20",
            "--dns-bind-address",
            "10.96.0.10:53",
            "--dns-upstream-resolv-conf",
        ])
        .arg(&resolv)
        .stdout(Stdio::null())
        .stderr(log);
    let proxy = ChildGuard::spawn(&mut cmd).expect("start windlass-proxy");
    let log = || std::fs::read_to_string(dir.path().join("proxy.log")).unwrap_or_default();

    wait_for("web to resolve", Duration::from_secs(10), || {
        (addresses(&nslookup(&pod, "web.shop.svc.cluster.local")) == ["10.96.0.20"]).then_some(())
    });

    // A new headless Service with endpoints appears; web goes away.
    write_objects(
        &services,
        vec![
            service("db", "None"),
            headless_slice("db", &["10.244.1.7", "10.244.2.8"]),
        ],
    );
    wait_for("db to resolve to its pods", Duration::from_secs(10), || {
        (addresses(&nslookup(&pod, "db.shop.svc.cluster.local")) == ["10.244.1.7", "10.244.2.8"])
            .then_some(())
    });
    let out = nslookup(&pod, "web.shop.svc.cluster.local");
    assert!(out.contains("NXDOMAIN"), "{out}\nproxy log:\n{}", log());
    drop(proxy);
}
