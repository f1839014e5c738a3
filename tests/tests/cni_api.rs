//! `windlass-cni daemon --kubeconfig` against the real Windlass API server: it follows Node objects (pod CIDR,
//! InternalIP) into routes between the lab nodes, writes each node's conflist once its Node has a pod CIDR, and
//! removes the routes of a Node that is deleted. Pods attached with the written conflists reach each other.

use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use windlass_tests::api_lab::{ApiLab, CniDaemon};
use windlass_tests::cni::ip_json;
use windlass_tests::lab::{can_ping, LabNode};
use windlass_tests::netns::NetnsGuard;
use windlass_tests::{require_privileged, wait_for};

const TOOLS: &[&str] = &["ip", "nft", "busybox", "kubectl"];

/// The agent's routes (`proto 87`) in a node, as destinations.
fn owned_routes(node: &LabNode) -> Vec<String> {
    let mut v: Vec<String> = ip_json(&node.netns, &["-4", "route", "show", "proto", "87"])
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|r| r["dst"].as_str().map(str::to_string))
        .collect();
    v.sort();
    v
}

/// Waits until `node`'s agent routes are exactly `want`; on timeout fails with what is there and the logs.
fn wait_routes(node: &LabNode, want: &[&str], logs: &dyn Fn() -> String) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let have = owned_routes(node);
        if have == want {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{}'s routes are {have:?}, not {want:?}; daemon logs:\n{}",
            node.name,
            logs()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Gives `node` a second address on the lab switch and reports it as the Node's InternalIP; waits until `peer`
/// reaches `node`'s pod CIDR through it (host-gw: the route's gateway; vxlan: the FDB entry's destination).
fn node_ip_moves(lab: &ApiLab, node: &LabNode, peer: &LabNode, mode: &str) {
    let new_ip = Ipv4Addr::new(172, 30, 0, 40 + node.index as u8);
    node.netns
        .exec(&["ip", "addr", "add", &format!("{new_ip}/24"), "dev", "eth0"])
        .expect("second address");
    lab.set_node_ip(&node.name, new_ip);
    let want = new_ip.to_string();
    wait_for(
        &format!("{} to reach {} via {new_ip}", peer.name, node.name),
        Duration::from_secs(20),
        || {
            let found = if mode == "host-gw" {
                ip_json(&peer.netns, &["-4", "route", "show", &node.pod_cidr])[0]["gateway"]
                    .as_str()
                    .map(str::to_string)
            } else {
                peer.netns
                    .exec(&["bridge", "fdb", "show", "dev", "windlass.1"])
                    .ok()
                    .filter(|fdb| fdb.contains(&format!("dst {want}")))
                    .map(|_| want.clone())
            };
            (found.as_deref() == Some(want.as_str())).then_some(())
        },
    );
}

fn daemons_follow_nodes_in_the_api(mode: &str) {
    let lab = ApiLab::new(3);
    let logs = tempfile::tempdir().expect("logs");
    let nodes = &lab.lab.nodes;
    // node0 and node1 are registered with pod CIDRs; node2 registers without one (IPAM has not run for it).
    lab.register_node(&nodes[0], true);
    lab.register_node(&nodes[1], true);
    lab.register_node(&nodes[2], false);
    let daemons: Vec<CniDaemon> = nodes
        .iter()
        .map(|n| lab.start_cni_daemon(n, mode, logs.path()))
        .collect();
    let dump = || {
        daemons
            .iter()
            .map(CniDaemon::log_text)
            .collect::<Vec<_>>()
            .join("\n----\n")
    };

    wait_routes(&nodes[0], &["10.244.2.0/24"], &dump);
    wait_routes(&nodes[1], &["10.244.1.0/24"], &dump);
    let c0 = wait_for("node0's conflist", Duration::from_secs(10), || {
        daemons[0].conflist()
    });
    assert_eq!(c0["plugins"][0]["subnet"], "10.244.1.0/24");
    assert_eq!(c0["plugins"][0]["mode"], mode);
    // node2 has no pod CIDR: no conflist (so the kubelet starts no pod there), nobody routes to it, and it has
    // no pods to route for.
    assert!(owned_routes(&nodes[2]).is_empty());
    assert!(
        daemons[2].conflist().is_none(),
        "a conflist before the pod CIDR was set"
    );

    // The node IPAM controller's part: node2 gets its range. Its conflist appears; the others route to it.
    lab.set_pod_cidr(&nodes[2]);
    let c2 = wait_for("node2's conflist", Duration::from_secs(15), || {
        daemons[2].conflist()
    });
    assert_eq!(c2["plugins"][0]["subnet"], "10.244.3.0/24", "{}", dump());
    wait_routes(&nodes[0], &["10.244.2.0/24", "10.244.3.0/24"], &dump);
    wait_routes(&nodes[1], &["10.244.1.0/24", "10.244.3.0/24"], &dump);
    wait_routes(&nodes[2], &["10.244.1.0/24", "10.244.2.0/24"], &dump);

    let pods: Vec<(NetnsGuard, Ipv4Addr)> = nodes
        .iter()
        .zip(&daemons)
        .map(|(n, d)| lab.attach_pod(n, d, &format!("api-{}", n.name)))
        .collect();
    for (i, (from, _)) in pods.iter().enumerate() {
        for (j, (_, to)) in pods.iter().enumerate() {
            if i != j {
                assert!(
                    can_ping(from, *to, 5),
                    "{mode}: pod on node{i} cannot reach pod {to} on node{j}\n{}",
                    dump()
                );
            }
        }
    }

    // node1 moves to another address (its kubelet reports a new InternalIP): the others follow it there.
    node_ip_moves(&lab, &nodes[1], &nodes[0], mode);
    assert!(
        can_ping(&pods[0].0, pods[1].1, 5),
        "{mode}: node1's pod is unreachable after node1 changed address\n{}",
        dump()
    );

    // node1 is deleted from the cluster: the others drop their route to it.
    lab.control.kubectl_ok(&["delete", "node", "node1"]);
    wait_routes(&nodes[0], &["10.244.3.0/24"], &dump);
    wait_routes(&nodes[2], &["10.244.1.0/24"], &dump);
    assert!(
        can_ping(&pods[0].0, pods[2].1, 5),
        "node0 → node2 broke when node1 left"
    );
    assert!(
        !can_ping(&pods[0].0, pods[1].1, 1),
        "the deleted node's pods are still routed"
    );
}

#[test]
fn host_gw_daemons_follow_node_objects_and_write_the_conflist_once_the_pod_cidr_is_set() {
    if !require_privileged(TOOLS) {
        return;
    }
    daemons_follow_nodes_in_the_api("host-gw");
}

#[test]
fn vxlan_daemons_follow_node_objects_and_write_the_conflist_once_the_pod_cidr_is_set() {
    if !require_privileged(TOOLS) {
        return;
    }
    daemons_follow_nodes_in_the_api("vxlan");
}
