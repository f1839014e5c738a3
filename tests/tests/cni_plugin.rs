//! The windlass-cni plugin on one lab node, invoked as a runtime would (`ip netns exec <node> windlass-cni` with
//! `CNI_*` and the configuration on stdin). Everything happens inside namespaces the tests create.

use std::net::Ipv4Addr;
use std::path::PathBuf;

use serde_json::{json, Value};
use windlass_tests::cni::{
    ipam_files, link_names, nft_ruleset, windlass_conf, with_prev_result, CniCall, CniOutput,
};
use windlass_tests::lab::{can_ping, Lab};
use windlass_tests::netns::NetnsGuard;
use windlass_tests::{require_privileged, unique_name, workspace_binary};

const TOOLS: &[&str] = &["ip", "nft", "busybox"];
const NET: &str = "windlass";

fn plugin() -> PathBuf {
    workspace_binary("windlass-cni")
}

/// A one-node lab and the node's configuration.
struct Node {
    lab: Lab,
    conf: String,
}

impl Node {
    fn new() -> Self {
        Self::with_conf(json!({}))
    }

    fn with_conf(extra: Value) -> Self {
        let lab = Lab::new(1).expect("lab");
        let n = &lab.nodes[0];
        let conf = windlass_conf(NET, &n.pod_cidr, n.data_dir.path(), extra);
        Self { lab, conf }
    }

    fn ns(&self) -> &NetnsGuard {
        &self.lab.nodes[0].netns
    }

    fn call<'a>(&'a self, command: &'a str, id: &'a str) -> CniCall<'a> {
        CniCall::new(plugin(), self.ns(), command, id)
    }

    fn add(&self, id: &str, pod: &NetnsGuard) -> CniOutput {
        let path = pod.path();
        self.call("ADD", id).netns(&path).run(&self.conf)
    }

    fn del(&self, id: &str, pod: Option<&NetnsGuard>) -> CniOutput {
        let path = pod.map(|p| p.path());
        let mut call = self.call("DEL", id);
        if let Some(p) = &path {
            call = call.netns(p);
        }
        call.run(&self.conf)
    }

    fn ipam_files(&self) -> Vec<String> {
        ipam_files(self.lab.nodes[0].data_dir.path(), NET)
    }

    fn veths(&self) -> Vec<String> {
        link_names(self.ns())
            .into_iter()
            .filter(|n| n.starts_with("wl"))
            .collect()
    }
}

fn pod_ip(result: &Value) -> Ipv4Addr {
    let addr = result["ips"][0]["address"]
        .as_str()
        .expect("address in result");
    addr.split('/')
        .next()
        .and_then(|a| a.parse().ok())
        .expect("IPv4 address")
}

fn ipv4_of(ns: &NetnsGuard, ifname: &str) -> Vec<String> {
    let v = windlass_tests::cni::ip_json(ns, &["-4", "addr", "show", "dev", ifname]);
    v.as_array()
        .into_iter()
        .flatten()
        .flat_map(|l| l["addr_info"].as_array().cloned().unwrap_or_default())
        .filter_map(|a| {
            Some(format!(
                "{}/{}",
                a["local"].as_str()?,
                a["prefixlen"].as_u64()?
            ))
        })
        .collect()
}

#[test]
fn add_gives_the_pod_eth0_with_its_address_default_route_and_loopback() {
    if !require_privileged(TOOLS) {
        return;
    }
    let node = Node::new();
    let pod = node.lab.pod_netns().expect("pod netns");
    let result = node.add("c1", &pod).ok().json();

    assert_eq!(result["cniVersion"], "1.0.0");
    assert_eq!(result["ips"][0]["address"], "10.244.1.2/24");
    assert_eq!(result["ips"][0]["gateway"], "10.244.1.1");
    assert_eq!(result["ips"][0]["interface"], 2);
    assert_eq!(result["interfaces"][0]["name"], "windlass0");
    assert_eq!(result["interfaces"][2]["name"], "eth0");
    assert_eq!(
        result["interfaces"][2]["sandbox"],
        pod.path().display().to_string()
    );

    assert_eq!(ipv4_of(&pod, "eth0"), vec!["10.244.1.2/24"]);
    let routes = windlass_tests::cni::ip_json(&pod, &["-4", "route", "show", "default"]);
    assert_eq!(routes[0]["gateway"], "10.244.1.1", "{routes}");
    assert_eq!(routes[0]["dev"], "eth0");
    let lo = windlass_tests::cni::ip_json(&pod, &["link", "show", "lo"]);
    assert!(
        lo[0]["flags"]
            .as_array()
            .expect("flags")
            .iter()
            .any(|f| f == "UP"),
        "{lo}"
    );

    // The node side: the bridge holds the gateway, the host veth is a hairpin port of it.
    assert_eq!(ipv4_of(node.ns(), "windlass0"), vec!["10.244.1.1/24"]);
    let veth = result["interfaces"][1]["name"]
        .as_str()
        .expect("veth name")
        .to_string();
    let details = windlass_tests::cni::ip_json(node.ns(), &["-d", "link", "show", &veth]);
    assert_eq!(details[0]["master"], "windlass0", "{details}");
    assert_eq!(
        details[0]["linkinfo"]["info_slave_data"]["hairpin"], true,
        "{details}"
    );
    assert_eq!(node.ipam_files(), vec!["10.244.1.2"]);
}

#[test]
fn pods_on_one_node_ping_each_other_and_the_gateway() {
    if !require_privileged(TOOLS) {
        return;
    }
    let node = Node::new();
    let a = node.lab.pod_netns().expect("pod a");
    let b = node.lab.pod_netns().expect("pod b");
    let ip_a = pod_ip(&node.add("a", &a).ok().json());
    let ip_b = pod_ip(&node.add("b", &b).ok().json());
    assert_ne!(ip_a, ip_b);
    assert!(can_ping(&a, ip_b, 3), "pod a cannot reach pod b at {ip_b}");
    assert!(can_ping(&b, ip_a, 3), "pod b cannot reach pod a at {ip_a}");
    assert!(
        can_ping(&a, Ipv4Addr::new(10, 244, 1, 1), 3),
        "pod a cannot reach its gateway"
    );
}

#[test]
fn del_leaves_no_veth_address_ipam_file_or_pod_rule() {
    if !require_privileged(TOOLS) {
        return;
    }
    let node = Node::new();
    let pod = node.lab.pod_netns().expect("pod");
    let result = node.add("gone", &pod).ok().json();
    let ip = pod_ip(&result);
    assert_eq!(node.veths().len(), 1);

    node.del("gone", Some(&pod)).ok();
    assert!(node.veths().is_empty(), "veth left: {:?}", node.veths());
    assert!(
        !link_names(&pod).contains(&"eth0".to_string()),
        "eth0 left in the pod"
    );
    assert!(
        node.ipam_files().is_empty(),
        "IPAM files left: {:?}",
        node.ipam_files()
    );
    let rules = nft_ruleset(node.ns()).to_string();
    assert!(
        !rules.contains(&ip.to_string()),
        "a rule still names the pod's address: {rules}"
    );
    assert!(
        !rules.contains("gone"),
        "a rule still names the container: {rules}"
    );
}

#[test]
fn a_repeated_add_returns_the_same_result_and_a_repeated_del_succeeds() {
    if !require_privileged(TOOLS) {
        return;
    }
    let node = Node::new();
    let pod = node.lab.pod_netns().expect("pod");
    let first = node.add("twice", &pod).ok().json();
    let second = node.add("twice", &pod).ok().json();
    assert_eq!(first, second);
    assert_eq!(node.veths().len(), 1);
    assert_eq!(node.ipam_files().len(), 1);
    node.del("twice", Some(&pod)).ok();
    node.del("twice", Some(&pod)).ok();
    assert!(node.veths().is_empty() && node.ipam_files().is_empty());
}

#[test]
fn del_of_an_unknown_container_or_a_vanished_netns_succeeds() {
    if !require_privileged(TOOLS) {
        return;
    }
    let node = Node::new();
    assert!(node.del("never-added", None).stdout.trim().is_empty());
    node.del("never-added", None).ok();

    // The pod's namespace is deleted before DEL (a crashed sandbox): DEL still releases the address.
    let pod = node.lab.pod_netns().expect("pod");
    let path = pod.path();
    node.add("crashed", &pod).ok();
    drop(pod);
    node.call("DEL", "crashed")
        .netns(&path)
        .run(&node.conf)
        .ok();
    assert!(node.ipam_files().is_empty());
    assert!(node.veths().is_empty());
}

#[test]
fn check_passes_for_a_healthy_attachment_and_fails_once_it_is_broken() {
    if !require_privileged(TOOLS) {
        return;
    }
    let node = Node::new();
    let pod = node.lab.pod_netns().expect("pod");
    let path = pod.path();
    let result = node.add("chk", &pod).ok().json();
    let conf = with_prev_result(&node.conf, &result);
    node.call("CHECK", "chk").netns(&path).run(&conf).ok();

    // Without prevResult CHECK is refused as an invalid configuration.
    assert_eq!(
        node.call("CHECK", "chk")
            .netns(&path)
            .run(&node.conf)
            .error_code(),
        7
    );

    // Someone removes the pod's address: CHECK reports it.
    pod.exec(&["ip", "addr", "flush", "dev", "eth0"])
        .expect("flush");
    let bad = node.call("CHECK", "chk").netns(&path).run(&conf);
    assert!(!bad.success);
    assert!(
        bad.json()["details"]
            .as_str()
            .unwrap_or_default()
            .contains("10.244.1.2"),
        "{}",
        bad.stdout
    );

    // A prevResult with another address is a mismatch too.
    node.add("chk", &pod).ok();
    let mut other = result.clone();
    other["ips"][0]["address"] = json!("10.244.1.99/24");
    assert!(
        !node
            .call("CHECK", "chk")
            .netns(&path)
            .run(&with_prev_result(&node.conf, &other))
            .success
    );
}

#[test]
fn version_lists_the_supported_spec_versions() {
    if !require_privileged(TOOLS) {
        return;
    }
    let node = Node::new();
    let out = node
        .call("VERSION", "")
        .run(r#"{"cniVersion":"1.0.0"}"#)
        .ok()
        .json();
    assert_eq!(out["cniVersion"], "1.0.0");
    let versions: Vec<&str> = out["supportedVersions"]
        .as_array()
        .expect("list")
        .iter()
        .filter_map(Value::as_str)
        .collect();
    for v in ["0.3.1", "0.4.0", "1.0.0", "1.1.0"] {
        assert!(versions.contains(&v), "{v} missing from {versions:?}");
    }
}

#[test]
fn bad_json_is_error_6_and_leaves_nothing_behind() {
    if !require_privileged(TOOLS) {
        return;
    }
    let node = Node::new();
    let pod = node.lab.pod_netns().expect("pod");
    let path = pod.path();
    let out = node
        .call("ADD", "bad")
        .netns(&path)
        .run("{\"cniVersion\": \"1.0.0\", ");
    assert_eq!(out.error_code(), 6);
    assert!(out.json()["msg"].as_str().is_some_and(|m| !m.is_empty()));
    assert!(node.veths().is_empty() && node.ipam_files().is_empty());
    assert!(!link_names(node.ns()).contains(&"windlass0".to_string()));
}

#[test]
fn a_missing_subnet_is_error_7_and_leaves_nothing_behind() {
    if !require_privileged(TOOLS) {
        return;
    }
    let node = Node::new();
    let pod = node.lab.pod_netns().expect("pod");
    let path = pod.path();
    let conf = json!({"cniVersion": "1.0.0", "name": NET, "type": "windlass-cni",
        "dataDir": node.lab.nodes[0].data_dir.path()})
    .to_string();
    let out = node.call("ADD", "nosubnet").netns(&path).run(&conf);
    assert_eq!(out.error_code(), 7);
    assert!(
        out.json()["msg"]
            .as_str()
            .unwrap_or_default()
            .contains("subnet"),
        "{}",
        out.stdout
    );
    assert!(node.veths().is_empty() && node.ipam_files().is_empty());
}

#[test]
fn an_exhausted_range_is_an_error_and_leaves_no_veth_or_address() {
    if !require_privileged(TOOLS) {
        return;
    }
    let lab = Lab::new(1).expect("lab");
    let n = &lab.nodes[0];
    // A /30 has a gateway and exactly one pod address.
    let conf = windlass_conf(NET, "10.244.9.0/30", n.data_dir.path(), json!({}));
    let first = lab.pod_netns().expect("pod");
    let second = lab.pod_netns().expect("pod");
    let (p1, p2) = (first.path(), second.path());
    CniCall::new(plugin(), &n.netns, "ADD", "one")
        .netns(&p1)
        .run(&conf)
        .ok();
    let out = CniCall::new(plugin(), &n.netns, "ADD", "two")
        .netns(&p2)
        .run(&conf);
    assert_eq!(out.error_code(), 100);
    assert!(
        out.json()["msg"]
            .as_str()
            .unwrap_or_default()
            .contains("10.244.9.0/30"),
        "{}",
        out.stdout
    );
    assert_eq!(ipam_files(n.data_dir.path(), NET), vec!["10.244.9.2"]);
    let veths: Vec<_> = link_names(&n.netns)
        .into_iter()
        .filter(|l| l.starts_with("wl"))
        .collect();
    assert_eq!(veths.len(), 1, "only the first pod's veth: {veths:?}");
    assert!(!link_names(&second).contains(&"eth0".to_string()));
    // STATUS (CNI 1.1) reports the plugin cannot serve ADD.
    let conf11 = conf.replace("\"1.0.0\"", "\"1.1.0\"");
    assert_eq!(
        CniCall::new(plugin(), &n.netns, "STATUS", "")
            .run(&conf11)
            .error_code(),
        50
    );
    CniCall::new(plugin(), &n.netns, "DEL", "one")
        .netns(&p1)
        .run(&conf)
        .ok();
    CniCall::new(plugin(), &n.netns, "STATUS", "")
        .run(&conf11)
        .ok();
}

#[test]
fn a_missing_netns_is_error_3_and_leaves_nothing_behind() {
    if !require_privileged(TOOLS) {
        return;
    }
    let node = Node::new();
    let missing = PathBuf::from("/run/netns").join(unique_name("gone"));
    let out = node.call("ADD", "nons").netns(&missing).run(&node.conf);
    assert_eq!(out.error_code(), 3);
    assert!(node.veths().is_empty() && node.ipam_files().is_empty());
    // Without CNI_NETNS at all it is an environment error.
    assert_eq!(node.call("ADD", "nons").run(&node.conf).error_code(), 4);
}

#[test]
fn a_failed_add_rolls_back_its_veth_and_address() {
    if !require_privileged(TOOLS) {
        return;
    }
    let node = Node::new();
    let pod = node.lab.pod_netns().expect("pod");
    // The pod already has an eth0 (from some other plugin): the veth peer cannot take that name.
    pod.exec(&[
        "ip", "link", "add", "eth0", "type", "veth", "peer", "name", "other0",
    ])
    .expect("veth");
    let out = node.add("clash", &pod);
    assert!(!out.success, "ADD should fail: {}", out.stdout);
    assert!(
        out.json()["msg"]
            .as_str()
            .unwrap_or_default()
            .contains("eth0"),
        "{}",
        out.stdout
    );
    assert!(node.veths().is_empty(), "veth left: {:?}", node.veths());
    assert!(
        node.ipam_files().is_empty(),
        "address left: {:?}",
        node.ipam_files()
    );
}

#[test]
fn masquerade_lives_only_in_table_windlass_cni_and_other_tables_are_untouched() {
    if !require_privileged(TOOLS) {
        return;
    }
    let node = Node::new();
    // Someone else's table on the node.
    node.ns()
        .exec(&["nft", "add table ip theirs; add chain ip theirs post { type nat hook postrouting priority 50; }; add rule ip theirs post ip saddr 192.0.2.0/24 counter"])
        .expect("their table");
    let theirs_before = node
        .ns()
        .exec(&["nft", "-j", "list", "table", "ip", "theirs"])
        .expect("list");

    for i in 0..3 {
        let pod = node.lab.pod_netns().expect("pod");
        node.add(&format!("m{i}"), &pod).ok();
    }
    let ruleset = nft_ruleset(node.ns());
    let items = ruleset["nftables"].as_array().expect("nftables array");
    let tables: Vec<&str> = items
        .iter()
        .filter_map(|i| i["table"]["name"].as_str())
        .collect();
    assert_eq!(tables.len(), 2, "{tables:?}");
    assert!(tables.contains(&"windlass-cni") && tables.contains(&"theirs"));
    let ours: Vec<&Value> = items
        .iter()
        .filter(|i| i["rule"].is_object() && i["rule"]["table"] == "windlass-cni")
        .collect();
    assert_eq!(
        ours.len(),
        1,
        "one masquerade rule per subnet, however many pods: {ours:?}"
    );
    let rule = ours[0]["rule"].to_string();
    assert!(
        rule.contains("masquerade") && rule.contains("10.244.1.0"),
        "{rule}"
    );
    assert_eq!(ours[0]["rule"]["family"], "ip");
    let theirs_after = node
        .ns()
        .exec(&["nft", "-j", "list", "table", "ip", "theirs"])
        .expect("list");
    assert_eq!(theirs_before, theirs_after);
}

#[test]
fn gc_releases_the_addresses_and_veths_of_attachments_the_runtime_no_longer_has() {
    if !require_privileged(TOOLS) {
        return;
    }
    let node = Node::new();
    let pods: Vec<NetnsGuard> = (0..3).map(|_| node.lab.pod_netns().expect("pod")).collect();
    for (i, pod) in pods.iter().enumerate() {
        node.add(&format!("g{i}"), pod).ok();
    }
    assert_eq!(node.ipam_files().len(), 3);
    // CNI 1.1 GC: only g1 is still valid.
    let mut conf: Value = serde_json::from_str(&node.conf).expect("json");
    conf["cniVersion"] = json!("1.1.0");
    conf["cni.dev/valid-attachments"] = json!([{"containerID": "g1", "ifname": "eth0"}]);
    node.call("GC", "").run(&conf.to_string()).ok();
    assert_eq!(node.ipam_files(), vec!["10.244.1.3"]);
    assert_eq!(
        node.veths(),
        vec![windlass_cni::host_veth_name("g1", "eth0")]
    );
    assert!(link_names(&pods[1]).contains(&"eth0".to_string()));
    assert!(!link_names(&pods[0]).contains(&"eth0".to_string()));
}

#[test]
fn gc_restores_a_masquerade_rule_someone_deleted() {
    if !require_privileged(TOOLS) {
        return;
    }
    let node = Node::new();
    let pod = node.lab.pod_netns().expect("pod");
    node.add("keep", &pod).ok();
    let chain = windlass_cni::masquerade_chain_name("10.244.1.0/24".parse().expect("net"));
    node.ns()
        .exec(&["nft", "delete", "table", "ip", "windlass-cni"])
        .expect("delete table");
    let mut conf: Value = serde_json::from_str(&node.conf).expect("json");
    conf["cniVersion"] = json!("1.1.0");
    conf["cni.dev/valid-attachments"] = json!([{"containerID": "keep", "ifname": "eth0"}]);
    node.call("GC", "").run(&conf.to_string()).ok();
    let listed = node
        .ns()
        .exec(&["nft", "list", "chain", "ip", "windlass-cni", &chain])
        .expect("chain restored");
    assert!(listed.contains("masquerade"), "{listed}");
    assert_eq!(
        node.ipam_files(),
        vec!["10.244.1.2"],
        "GC kept the valid attachment"
    );
}
