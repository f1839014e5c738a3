//! `windlass-cni daemon` on lab nodes: it writes the node's conflist from its pod CIDR, converges routes from the
//! nodes file, and follows the file as nodes join; pods attached with the written conflist reach each other.

use std::process::{Command, Stdio};
use std::time::Duration;

use serde_json::{json, Value};
use windlass_tests::cni::{ip_json, CniCall};
use windlass_tests::lab::{can_ping, Lab, LabNode};
use windlass_tests::{require_privileged, wait_for, workspace_binary, ChildGuard};

fn nodes_json(nodes: &[LabNode]) -> String {
    Value::Array(
        nodes
            .iter()
            .map(|n| json!({"name": n.name, "podCIDR": n.pod_cidr, "nodeIP": n.ip.to_string()}))
            .collect(),
    )
    .to_string()
}

/// Writes the nodes file atomically, as an operator or a controller should.
fn write_nodes(path: &std::path::Path, nodes: &[LabNode]) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, nodes_json(nodes)).expect("write nodes");
    std::fs::rename(&tmp, path).expect("rename nodes");
}

fn start_daemon(
    node: &LabNode,
    nodes_file: &std::path::Path,
    conf_dir: &std::path::Path,
) -> ChildGuard {
    let plugin = workspace_binary("windlass-cni");
    ChildGuard::spawn(
        Command::new("ip")
            .args(["netns", "exec", node.netns.name()])
            .arg(&plugin)
            .args([
                "daemon",
                "--node-name",
                &node.name,
                "--mode",
                "vxlan",
                "--mtu",
                "1450",
            ])
            .arg("--nodes-file")
            .arg(nodes_file)
            .arg("--cni-conf-dir")
            .arg(conf_dir)
            .arg("--data-dir")
            .arg(node.data_dir.path())
            .args(["--resync-ms", "300"])
            .stdout(Stdio::null())
            .stderr(Stdio::null()),
    )
    .expect("start daemon")
}

fn route_count(node: &LabNode) -> usize {
    ip_json(&node.netns, &["-4", "route", "show", "proto", "87"])
        .as_array()
        .map_or(0, Vec::len)
}

#[test]
fn the_daemon_writes_the_conflist_and_follows_nodes_joining() {
    if !require_privileged(&["ip", "nft", "busybox"]) {
        return;
    }
    let mut lab = Lab::new(2).expect("lab");
    lab.add_node().expect("third node");
    let dir = tempfile::tempdir().expect("tempdir");
    let nodes_file = dir.path().join("nodes.json");
    write_nodes(&nodes_file, &lab.nodes[..2]);
    let conf_dirs: Vec<_> = lab
        .nodes
        .iter()
        .map(|_| tempfile::tempdir().expect("tempdir"))
        .collect();
    let _daemons: Vec<ChildGuard> = lab
        .nodes
        .iter()
        .zip(&conf_dirs)
        .map(|(n, d)| start_daemon(n, &nodes_file, d.path()))
        .collect();

    // node0 and node1 converge; node2 is not in the file yet, so it has no conflist.
    wait_for("node0's route to node1", Duration::from_secs(15), || {
        (route_count(&lab.nodes[0]) == 1).then_some(())
    });
    let conflist_path = conf_dirs[0].path().join("10-windlass.conflist");
    let conflist: Value = wait_for("node0's conflist", Duration::from_secs(10), || {
        std::fs::read_to_string(&conflist_path)
            .ok()
            .and_then(|t| serde_json::from_str(&t).ok())
    });
    assert_eq!(conflist["plugins"][0]["subnet"], "10.244.1.0/24");
    assert_eq!(conflist["plugins"][0]["mode"], "vxlan");
    assert_eq!(conflist["plugins"][0]["mtu"], 1450);
    assert!(!conf_dirs[2].path().join("10-windlass.conflist").exists());

    // node2 joins the cluster.
    write_nodes(&nodes_file, &lab.nodes);
    for n in &lab.nodes {
        wait_for(
            &format!("{} to route to both others", n.name),
            Duration::from_secs(15),
            || (route_count(n) == 2).then_some(()),
        );
    }
    let conflist2 = wait_for("node2's conflist", Duration::from_secs(10), || {
        std::fs::read_to_string(conf_dirs[2].path().join("10-windlass.conflist")).ok()
    });
    assert!(conflist2.contains("10.244.3.0/24"), "{conflist2}");

    // Pods attached with the conflist each daemon wrote reach each other across nodes.
    let mut pods = Vec::new();
    for (n, d) in lab.nodes.iter().zip(&conf_dirs) {
        let list: Value = serde_json::from_str(
            &std::fs::read_to_string(d.path().join("10-windlass.conflist")).expect("conflist"),
        )
        .expect("json");
        let mut conf = list["plugins"][0].clone();
        conf["cniVersion"] = list["cniVersion"].clone();
        conf["name"] = list["name"].clone();
        let pod = lab.pod_netns().expect("pod");
        let path = pod.path();
        let id = format!("d-{}", n.name);
        let out = CniCall::new(workspace_binary("windlass-cni"), &n.netns, "ADD", &id)
            .netns(&path)
            .run(&conf.to_string())
            .ok()
            .json();
        let ip: std::net::Ipv4Addr = out["ips"][0]["address"]
            .as_str()
            .and_then(|a| a.split('/').next())
            .and_then(|a| a.parse().ok())
            .expect("address");
        pods.push((pod, ip));
    }
    assert!(
        can_ping(&pods[0].0, pods[2].1, 3),
        "node0's pod cannot reach node2's pod"
    );
    assert!(
        can_ping(&pods[2].0, pods[1].1, 3),
        "node2's pod cannot reach node1's pod"
    );
}
