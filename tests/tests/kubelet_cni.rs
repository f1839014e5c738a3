//! The kubelet's CNI client against Debian's reference plugins, in a "node" network namespace (where the kubelet
//! and so its plugins run) and a "pod" namespace (the sandbox). Nothing here touches the root namespace.

use std::time::Duration;

use k8s_openapi::api::core::v1::Pod;
use windlass_kubelet::cni::{
    CniClient, CniError, CniSettings, NetworkConfigList, ProcessExec, RuntimeConf,
};
use windlass_tests::cni_lab::{ipv4_addresses, CniLab, REFERENCE_PLUGINS};
use windlass_tests::{require_privileged, wait_for, ChildGuard};

/// The kubelet's CNI client as it runs inside the lab's node namespace.
fn client(lab: &CniLab) -> CniClient {
    let settings = CniSettings::new(lab.conf_dir.path(), &lab.bin_path(), lab.root_dir.path());
    CniClient::new(settings, ProcessExec::wrapped(lab.node_wrapper()))
}

fn runtime_conf(lab: &CniLab, ifname: &str) -> RuntimeConf {
    RuntimeConf {
        container_id: format!("sandbox-{}", lab.pod.name()),
        netns: lab.pod.path(),
        ifname: ifname.into(),
        args: vec![
            ("IgnoreUnknown".into(), "1".into()),
            ("K8S_POD_NAMESPACE".into(), "default".into()),
            ("K8S_POD_NAME".into(), "nginx-pod".into()),
        ],
        ..Default::default()
    }
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime")
}

#[test]
fn add_gives_the_pod_a_reachable_ip_with_its_host_port_and_del_frees_everything() {
    if !require_privileged(&[
        "ip",
        "busybox",
        "iptables-save",
        "timeout",
        "/usr/lib/cni/bridge",
    ]) {
        return;
    }
    let lab = CniLab::new().expect("lab");
    lab.write_bridge_conflist(
        "10.244.7.0/24",
        &[serde_json::json!({"type": "portmap", "capabilities": {"portMappings": true}, "snat": false})],
    ).expect("conflist");
    let client = client(&lab);
    let net = client.network().expect("network config");
    let lo = NetworkConfigList::loopback("1.0.0");
    // The seed example pod, with a hostPort so portmap has work to do.
    let pod: Pod = serde_json::from_value(serde_json::json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "nginx-pod", "namespace": "default", "uid": "u-1"},
        "spec": {"containers": [{"name": "nginx", "image": "busybox",
                                 "ports": [{"containerPort": 80, "hostPort": 18080}]}]}
    }))
    .expect("pod");
    let sandbox_id = format!("sandbox-{}", lab.pod.name());
    let rt = RuntimeConf::for_pod(&pod, &sandbox_id, &lab.pod.path(), None);
    let rt_lo = runtime_conf(&lab, "lo");

    let rtm = runtime();
    rtm.block_on(client.add(&lo, &rt_lo)).expect("loopback ADD");
    let result = rtm.block_on(client.add(&net, &rt)).expect("ADD");

    let ips = result.ips_for("eth0");
    assert_eq!(ips.len(), 1, "one IPv4 for eth0 in {:?}", result.raw);
    let ip = ips[0].to_string();
    assert!(ip.starts_with("10.244.7."), "{ip} from the subnet");
    assert_eq!(ipv4_addresses(&lab.pod, "eth0"), vec![ip.clone()]);
    assert!(lab
        .pod
        .exec(&["ip", "-j", "addr", "show", "lo"])
        .expect("lo")
        .contains("\"UP\""));
    assert_eq!(lab.reserved_ips(), vec![ip.clone()]);
    // The node reaches the pod through the bridge.
    lab.node
        .exec(&["busybox", "ping", "-c1", "-W1", &ip])
        .expect("node pings the pod");
    // portmap got the port mapping (and only it declared the capability).
    let rules = lab
        .node
        .exec(&["iptables-save", "-t", "nat"])
        .expect("iptables-save");
    assert!(
        rules.contains("--dport 18080"),
        "hostPort rule in:\n{rules}"
    );
    // And it forwards: the node reaches the pod's port 80 through hostPort 18080 on its bridge address.
    let www = tempfile::tempdir().expect("www");
    std::fs::write(www.path().join("index.html"), "hello from the pod\n").expect("index");
    let _httpd = ChildGuard::spawn(
        lab.pod
            .command("busybox")
            .args(["httpd", "-f", "-p", "80", "-h"])
            .arg(www.path()),
    )
    .expect("httpd");
    let body = wait_for(
        "the pod through its hostPort",
        Duration::from_secs(10),
        || {
            lab.node
                .exec(&[
                    "timeout",
                    "2",
                    "busybox",
                    "wget",
                    "-q",
                    "-O",
                    "-",
                    "http://10.244.7.1:18080/",
                ])
                .ok()
        },
    );
    assert_eq!(body, "hello from the pod\n");
    assert_eq!(lab.cache_files().len(), 2, "eth0 and lo results cached");

    // CHECK is exercised in check_passes_after_add_and_fails_once_the_pod_interface_is_gone: Debian's portmap
    // 1.1.1 fails its own CHECK on an IPv4-only result ("could not check ipv6 dnat").

    let veths_before: Vec<_> = lab
        .node_links()
        .into_iter()
        .filter(|l| l.starts_with("veth"))
        .collect();
    assert_eq!(
        veths_before.len(),
        1,
        "one veth in the node: {veths_before:?}"
    );

    rtm.block_on(client.del(&net, &rt)).expect("DEL");
    rtm.block_on(client.del(&lo, &rt_lo)).expect("loopback DEL");
    assert!(
        !lab.node_links().iter().any(|l| l.starts_with("veth")),
        "veth removed: {:?}",
        lab.node_links()
    );
    assert!(!lab.pod_links().contains(&"eth0".to_string()));
    assert!(
        lab.reserved_ips().is_empty(),
        "IP freed: {:?}",
        lab.reserved_ips()
    );
    assert!(
        lab.cache_files().is_empty(),
        "cache removed: {:?}",
        lab.cache_files()
    );
    let rules = lab
        .node
        .exec(&["iptables-save", "-t", "nat"])
        .expect("iptables-save");
    assert!(
        !rules.contains("--dport 18080"),
        "hostPort rule gone:\n{rules}"
    );

    // DEL again (the kubelet retries after a crash) with no cache left is still fine.
    rtm.block_on(client.del(&net, &rt))
        .expect("second DEL tolerates the missing cache");
}

#[test]
fn check_passes_after_add_and_fails_once_the_pod_interface_is_gone() {
    if !require_privileged(&["ip", "/usr/lib/cni/bridge"]) {
        return;
    }
    let lab = CniLab::new().expect("lab");
    lab.write_bridge_conflist("10.244.8.0/24", &[])
        .expect("conflist");
    let client = client(&lab);
    let net = client.network().expect("network config");
    let rt = runtime_conf(&lab, "eth0");
    let rtm = runtime();
    rtm.block_on(client.add(&net, &rt)).expect("ADD");
    rtm.block_on(client.check(&net, &rt))
        .expect("CHECK after ADD");
    lab.pod
        .exec(&["ip", "link", "del", "eth0"])
        .expect("delete eth0");
    let err = rtm
        .block_on(client.check(&net, &rt))
        .expect_err("CHECK must notice");
    assert!(
        matches!(
            err,
            CniError::Plugin {
                command: "CHECK",
                ..
            }
        ),
        "{err}"
    );
    rtm.block_on(client.del(&net, &rt)).expect("DEL");
    assert!(lab.reserved_ips().is_empty());
}

#[test]
fn a_broken_plugin_config_is_a_clear_error_and_leaves_nothing() {
    if !require_privileged(&["ip", "/usr/lib/cni/bridge"]) {
        return;
    }
    let lab = CniLab::new().expect("lab");
    lab.write_bridge_conflist("not-a-subnet", &[])
        .expect("conflist");
    let client = client(&lab);
    let net = client
        .network()
        .expect("network config parses; the plugin judges it");
    let rt = runtime_conf(&lab, "eth0");
    let err = runtime()
        .block_on(client.add(&net, &rt))
        .expect_err("ADD must fail");
    // The clean-up DEL meets the same broken config; the ADD's error is the one that explains it.
    let CniError::Plugin {
        plugin,
        command,
        error,
        ..
    } = err.primary()
    else {
        panic!("expected the plugin's error object, got {err}");
    };
    assert_eq!((plugin.as_str(), *command), ("bridge", "ADD"));
    assert!(
        error.msg.contains("not-a-subnet") || error.details.contains("not-a-subnet"),
        "{error}"
    );
    assert!(err.to_string().contains("not-a-subnet"), "{err}");
    assert!(!lab.node_links().iter().any(|l| l.starts_with("veth")));
    assert!(!lab.pod_links().contains(&"eth0".to_string()));
    assert!(lab.cache_files().is_empty());
    assert!(lab.reserved_ips().is_empty());
}

#[test]
fn a_failing_plugin_later_in_the_chain_is_reported_with_code_and_details_and_undone() {
    if !require_privileged(&["ip", "/usr/lib/cni/bridge"]) {
        return;
    }
    let lab = CniLab::new().expect("lab");
    lab.write_plugin(
        "refuse",
        r#"cat >/dev/null
if [ "$CNI_COMMAND" = ADD ]; then
  echo '{"cniVersion":"1.0.0","code":11,"msg":"try again later","details":"quota exhausted"}'
  exit 1
fi"#,
    )
    .expect("plugin");
    lab.write_bridge_conflist("10.244.9.0/24", &[serde_json::json!({"type": "refuse"})])
        .expect("conflist");
    let client = client(&lab);
    let net = client.network().expect("network config");
    let rt = runtime_conf(&lab, "eth0");
    let err = runtime()
        .block_on(client.add(&net, &rt))
        .expect_err("ADD must fail");
    let CniError::Plugin { plugin, error, .. } = err.primary() else {
        panic!("expected the plugin's error object, got {err}");
    };
    assert_eq!(plugin, "refuse");
    assert_eq!(
        (error.code, error.msg.as_str(), error.details.as_str()),
        (11, "try again later", "quota exhausted")
    );
    // The bridge plugin's veth and address were undone by the clean-up DEL.
    assert!(
        !lab.node_links().iter().any(|l| l.starts_with("veth")),
        "{:?}",
        lab.node_links()
    );
    assert!(!lab.pod_links().contains(&"eth0".to_string()));
    assert!(lab.reserved_ips().is_empty(), "{:?}", lab.reserved_ips());
    assert!(lab.cache_files().is_empty());
}

#[test]
fn a_missing_plugin_names_the_search_path() {
    if !require_privileged(&["ip"]) {
        return;
    }
    let lab = CniLab::new().expect("lab");
    lab.write_bridge_conflist(
        "10.244.10.0/24",
        &[serde_json::json!({"type": "no-such-plugin"})],
    )
    .expect("conflist");
    let client = client(&lab);
    let net = client.network().expect("network config");
    let err = runtime()
        .block_on(client.add(&net, &runtime_conf(&lab, "eth0")))
        .expect_err("ADD must fail");
    let text = err.to_string();
    assert!(
        text.contains("no-such-plugin") && text.contains(REFERENCE_PLUGINS),
        "{text}"
    );
    assert!(lab.reserved_ips().is_empty());
    assert!(!lab.node_links().iter().any(|l| l.starts_with("veth")));
}
