//! Pods on different lab nodes reach each other once the node routes reconciler ran on every node, in `host-gw`
//! and `vxlan` mode; nodes joining, leaving and moving are followed; traffic leaving the cluster is masqueraded.

use std::net::Ipv4Addr;
use std::sync::mpsc;
use std::time::Duration;

use serde_json::json;
use windlass_cni::{
    run_agent, Mode, NodeNet, NodeRoutes, ReconcileReport, RoutesError, ROUTE_PROTOCOL,
    VXLAN_DEVICE,
};
use windlass_tests::cni::{ip_json, link_names, windlass_conf, CniCall};
use windlass_tests::lab::{can_ping, in_netns, Lab, LabNode, CLIENT_IP};
use windlass_tests::netns::NetnsGuard;
use windlass_tests::{require_privileged, wait_for, workspace_binary};

const TOOLS: &[&str] = &["ip", "nft", "busybox"];

fn conf(node: &LabNode, mode: Mode) -> String {
    let extra = match mode {
        Mode::HostGw => json!({"mode": "host-gw"}),
        // The pods' MTU leaves room for the VXLAN headers, as flannel's subnet.env does.
        Mode::Vxlan => json!({"mode": "vxlan", "mtu": 1450}),
    };
    windlass_conf("windlass", &node.pod_cidr, node.data_dir.path(), extra)
}

/// Attaches a new pod to `node` and returns its namespace and address.
fn pod_on(lab: &Lab, node: &LabNode, id: &str, mode: Mode) -> (NetnsGuard, Ipv4Addr) {
    let pod = lab.pod_netns().expect("pod netns");
    let path = pod.path();
    let out = CniCall::new(workspace_binary("windlass-cni"), &node.netns, "ADD", id)
        .netns(&path)
        .run(&conf(node, mode))
        .ok()
        .json();
    let ip = out["ips"][0]["address"]
        .as_str()
        .and_then(|a| a.split('/').next())
        .and_then(|a| a.parse().ok())
        .expect("pod address");
    (pod, ip)
}

fn node_nets(lab: &Lab) -> Vec<NodeNet> {
    lab.nodes
        .iter()
        .map(|n| NodeNet::new(&n.name, n.pod_cidr.parse().expect("pod cidr"), n.ip))
        .collect()
}

fn reconcile(
    node: &LabNode,
    mode: Mode,
    nodes: &[NodeNet],
) -> Result<ReconcileReport, RoutesError> {
    let routes = NodeRoutes::new(mode, &node.name);
    in_netns(&node.netns.path(), || routes.reconcile(nodes)).expect("enter node netns")
}

fn reconcile_all(lab: &Lab, mode: Mode) {
    let nodes = node_nets(lab);
    for node in &lab.nodes {
        reconcile(node, mode, &nodes).unwrap_or_else(|e| panic!("reconcile on {}: {e}", node.name));
    }
}

/// Routes in `node` that the agent owns (`proto 87`), as `dst -> gateway`.
fn owned_routes(node: &LabNode) -> Vec<(String, String)> {
    let routes = ip_json(
        &node.netns,
        &["-4", "route", "show", "proto", &ROUTE_PROTOCOL.to_string()],
    );
    let mut out: Vec<(String, String)> = routes
        .as_array()
        .into_iter()
        .flatten()
        .map(|r| {
            (
                r["dst"].as_str().unwrap_or_default().to_string(),
                r["gateway"].as_str().unwrap_or_default().to_string(),
            )
        })
        .collect();
    out.sort();
    out
}

fn pods_reach_each_other_across_nodes(mode: Mode) {
    let lab = Lab::new(3).expect("lab");
    let pods: Vec<(NetnsGuard, Ipv4Addr)> = lab
        .nodes
        .iter()
        .map(|n| pod_on(&lab, n, &format!("pod-{}", n.name), mode))
        .collect();
    // Before the reconciler ran, other nodes' pods are unreachable (no route to their pod CIDRs).
    assert!(
        !can_ping(&pods[0].0, pods[1].1, 1),
        "reachable before any node route existed"
    );

    reconcile_all(&lab, mode);
    for (i, (from, _)) in pods.iter().enumerate() {
        for (j, (_, to)) in pods.iter().enumerate() {
            if i != j {
                assert!(
                    can_ping(from, *to, 3),
                    "{mode:?}: pod on node{i} cannot reach pod {to} on node{j}"
                );
            }
        }
    }
    // Converged state is stable: a second reconcile changes nothing.
    let again = reconcile(&lab.nodes[0], mode, &node_nets(&lab)).expect("reconcile");
    assert_eq!(again.routes_set + again.routes_removed, 0, "{again:?}");
}

#[test]
fn pods_on_different_nodes_reach_each_other_in_host_gw_mode() {
    if !require_privileged(TOOLS) {
        return;
    }
    pods_reach_each_other_across_nodes(Mode::HostGw);
}

#[test]
fn pods_on_different_nodes_reach_each_other_in_vxlan_mode() {
    if !require_privileged(TOOLS) {
        return;
    }
    pods_reach_each_other_across_nodes(Mode::Vxlan);
}

#[test]
fn vxlan_mode_builds_a_flannel_style_device_with_fdb_and_neighbour_entries() {
    if !require_privileged(TOOLS) {
        return;
    }
    let lab = Lab::new(2).expect("lab");
    reconcile_all(&lab, Mode::Vxlan);
    let n0 = &lab.nodes[0];
    let dev = ip_json(&n0.netns, &["-d", "link", "show", VXLAN_DEVICE]);
    let info = &dev[0]["linkinfo"]["info_data"];
    assert_eq!(info["id"], 1, "{dev}");
    assert_eq!(info["port"], 8472, "{dev}");
    assert_eq!(info["local"], "172.30.0.10", "{dev}");
    assert_eq!(dev[0]["mtu"], 1450, "{dev}");
    let fdb = n0
        .netns
        .exec(&["bridge", "fdb", "show", "dev", VXLAN_DEVICE])
        .expect("fdb");
    assert!(fdb.contains("0e:57:ac:1e:00:0b dst 172.30.0.11"), "{fdb}");
    let neigh = n0
        .netns
        .exec(&["ip", "neigh", "show", "dev", VXLAN_DEVICE])
        .expect("neigh");
    assert!(
        neigh.contains("10.244.2.0 lladdr 0e:57:ac:1e:00:0b PERMANENT"),
        "{neigh}"
    );
    let route = n0
        .netns
        .exec(&["ip", "route", "show", "10.244.2.0/24"])
        .expect("route");
    assert!(
        route.contains("via 10.244.2.0 dev windlass.1") && route.contains("onlink"),
        "{route}"
    );
}

#[test]
fn a_node_added_later_is_reachable_and_a_node_that_left_loses_its_routes() {
    if !require_privileged(TOOLS) {
        return;
    }
    for mode in [Mode::HostGw, Mode::Vxlan] {
        let mut lab = Lab::new(2).expect("lab");
        let (p0, _) = pod_on(&lab, &lab.nodes[0], "first", mode);
        reconcile_all(&lab, mode);

        lab.add_node().expect("third node");
        let (_p2, ip2) = pod_on(&lab, &lab.nodes[2], "late", mode);
        reconcile_all(&lab, mode);
        assert!(
            can_ping(&p0, ip2, 3),
            "{mode:?}: the late node's pod is unreachable"
        );

        // node2 leaves the cluster: the others forget it.
        let without: Vec<NodeNet> = node_nets(&lab)
            .into_iter()
            .filter(|n| n.name != "node2")
            .collect();
        reconcile(&lab.nodes[0], mode, &without).expect("reconcile");
        let routes = owned_routes(&lab.nodes[0]);
        assert_eq!(routes.len(), 1, "{mode:?}: {routes:?}");
        assert_eq!(routes[0].0, "10.244.2.0/24");
        if mode == Mode::Vxlan {
            let fdb = lab.nodes[0]
                .netns
                .exec(&["bridge", "fdb", "show", "dev", VXLAN_DEVICE])
                .expect("fdb");
            assert!(!fdb.contains("172.30.0.12"), "stale fdb entry: {fdb}");
            let neigh = lab.nodes[0]
                .netns
                .exec(&["ip", "neigh", "show", "dev", VXLAN_DEVICE])
                .expect("neigh");
            assert!(!neigh.contains("10.244.3.0"), "stale neighbour: {neigh}");
        }
    }
}

#[test]
fn a_node_that_changes_its_address_is_followed() {
    if !require_privileged(TOOLS) {
        return;
    }
    let lab = Lab::new(2).expect("lab");
    let (p0, _) = pod_on(&lab, &lab.nodes[0], "a", Mode::HostGw);
    let (_p1, ip1) = pod_on(&lab, &lab.nodes[1], "b", Mode::HostGw);
    reconcile_all(&lab, Mode::HostGw);
    assert!(can_ping(&p0, ip1, 3));

    // node1 moves from .11 to .41.
    let n1 = &lab.nodes[1];
    n1.netns
        .exec(&["ip", "addr", "flush", "dev", "eth0"])
        .expect("flush");
    n1.netns
        .exec(&["ip", "addr", "add", "172.30.0.41/24", "dev", "eth0"])
        .expect("readdress");
    let mut nodes = node_nets(&lab);
    nodes[1].node_ip = Ipv4Addr::new(172, 30, 0, 41);
    for node in &lab.nodes {
        reconcile(node, Mode::HostGw, &nodes).expect("reconcile");
    }
    assert_eq!(
        owned_routes(&lab.nodes[0]),
        vec![("10.244.2.0/24".to_string(), "172.30.0.41".to_string())]
    );
    assert!(
        can_ping(&p0, ip1, 3),
        "pod unreachable after its node moved"
    );
}

#[test]
fn switching_from_vxlan_to_host_gw_removes_the_vxlan_device_and_its_routes() {
    if !require_privileged(TOOLS) {
        return;
    }
    let lab = Lab::new(2).expect("lab");
    let (p0, _) = pod_on(&lab, &lab.nodes[0], "a", Mode::Vxlan);
    let (_p1, ip1) = pod_on(&lab, &lab.nodes[1], "b", Mode::Vxlan);
    reconcile_all(&lab, Mode::Vxlan);
    assert!(link_names(&lab.nodes[0].netns).contains(&VXLAN_DEVICE.to_string()));
    reconcile_all(&lab, Mode::HostGw);
    assert!(!link_names(&lab.nodes[0].netns).contains(&VXLAN_DEVICE.to_string()));
    assert_eq!(
        owned_routes(&lab.nodes[0]),
        vec![("10.244.2.0/24".to_string(), "172.30.0.11".to_string())]
    );
    assert!(can_ping(&p0, ip1, 3));
}

#[test]
fn pod_traffic_leaving_the_cluster_is_masqueraded_to_the_node_address() {
    if !require_privileged(TOOLS) {
        return;
    }
    let lab = Lab::new(1).expect("lab");
    let (pod, _) = pod_on(&lab, &lab.nodes[0], "out", Mode::HostGw);
    // The outside client has no route to 10.244.0.0/16: only masqueraded packets (from 172.30.0.10) get answers.
    assert!(
        can_ping(&pod, CLIENT_IP, 3),
        "pod cannot reach the outside client"
    );
    let conntrack = lab.nodes[0]
        .netns
        .exec(&["conntrack", "-L", "-p", "icmp"])
        .unwrap_or_default();
    if !conntrack.is_empty() {
        assert!(
            conntrack.contains("dst=172.30.0.10"),
            "reply not addressed to the node: {conntrack}"
        );
    }
    // Without masquerade the same ping fails.
    let node = &lab.nodes[0];
    let conf = windlass_conf(
        "plain",
        "10.244.50.0/24",
        node.data_dir.path(),
        json!({"bridge": "plain0", "ipMasq": false}),
    );
    let pod2 = lab.pod_netns().expect("pod");
    let p2 = pod2.path();
    CniCall::new(
        workspace_binary("windlass-cni"),
        &node.netns,
        "ADD",
        "plain",
    )
    .netns(&p2)
    .run(&conf)
    .ok();
    assert!(
        !can_ping(&pod2, CLIENT_IP, 1),
        "unmasqueraded pod traffic got an answer"
    );
}

#[test]
fn the_agent_follows_the_node_sets_its_source_delivers() {
    if !require_privileged(TOOLS) {
        return;
    }
    let mut lab = Lab::new(2).expect("lab");
    lab.add_node().expect("node2");
    let (tx, mut rx) = mpsc::channel::<Vec<NodeNet>>();
    let all = node_nets(&lab);
    let n0 = &lab.nodes[0];
    let path = n0.netns.path();
    let routes = NodeRoutes::new(Mode::HostGw, &n0.name);
    std::thread::scope(|s| {
        let agent = s.spawn(|| {
            in_netns(&path, || {
                run_agent(&mut rx, &routes, Duration::from_millis(200))
            })
            .expect("agent netns")
        });
        tx.send(all[..2].to_vec()).expect("send");
        wait_for("route to node1", Duration::from_secs(10), || {
            (owned_routes(n0).len() == 1).then_some(())
        });
        tx.send(all.clone()).expect("send");
        wait_for(
            "route to the joining node2",
            Duration::from_secs(10),
            || (owned_routes(n0).len() == 2).then_some(()),
        );
        // Someone deletes a route: the periodic resync puts it back.
        n0.netns
            .exec(&["ip", "route", "del", "10.244.3.0/24"])
            .expect("route del");
        wait_for(
            "the resync to restore the route",
            Duration::from_secs(10),
            || (owned_routes(n0).len() == 2).then_some(()),
        );
        drop(tx);
        let converged = agent.join().expect("agent thread");
        assert!(
            converged >= 3,
            "agent reported {converged} successful reconciles"
        );
    });
}
