//! The reference plugins (containernetworking-plugins `bridge` + `host-local` + `loopback`) keep working on a
//! node that also runs windlass-cni, so they remain a usable alternative.

use std::path::Path;

use serde_json::json;
use windlass_tests::cni::{ipam_files, link_names, windlass_conf, with_prev_result, CniCall};
use windlass_tests::lab::{can_ping, Lab};
use windlass_tests::{require_privileged, workspace_binary};

const REFERENCE_DIR: &str = "/usr/lib/cni";

fn reference_conf(data_dir: &Path) -> String {
    json!({
        "cniVersion": "1.0.0",
        "name": "reference",
        "type": "bridge",
        "bridge": "cni0",
        "isGateway": true,
        "ipam": {"type": "host-local", "subnet": "10.88.0.0/24", "dataDir": data_dir,
            "routes": [{"dst": "0.0.0.0/0"}]},
    })
    .to_string()
}

const LOOPBACK_CONF: &str = r#"{"cniVersion":"1.0.0","name":"reference","type":"loopback"}"#;

#[test]
fn reference_bridge_and_host_local_still_work_beside_windlass_cni() {
    let bridge = format!("{REFERENCE_DIR}/bridge");
    let loopback = format!("{REFERENCE_DIR}/loopback");
    if !require_privileged(&[
        "ip",
        "nft",
        "busybox",
        &bridge,
        &loopback,
        "/usr/lib/cni/host-local",
    ]) {
        return;
    }
    let lab = Lab::new(1).expect("lab");
    let node = &lab.nodes[0];
    let ours = windlass_conf("windlass", &node.pod_cidr, node.data_dir.path(), json!({}));
    let ref_dir = tempfile::tempdir().expect("tempdir");
    let theirs = reference_conf(ref_dir.path());

    let wpod = lab.pod_netns().expect("pod");
    let rpod = lab.pod_netns().expect("pod");
    let (wpath, rpath) = (wpod.path(), rpod.path());
    let plugin = workspace_binary("windlass-cni");
    let wres = CniCall::new(&plugin, &node.netns, "ADD", "ours")
        .netns(&wpath)
        .run(&ours)
        .ok()
        .json();
    let rres = CniCall::new(&bridge, &node.netns, "ADD", "theirs")
        .netns(&rpath)
        .run(&theirs)
        .ok()
        .json();
    CniCall::new(&loopback, &node.netns, "ADD", "theirs")
        .netns(&rpath)
        .ifname("lo")
        .run(LOOPBACK_CONF)
        .ok();

    let rip = rres["ips"][0]["address"]
        .as_str()
        .expect("address")
        .split('/')
        .next()
        .expect("ip");
    let wip = wres["ips"][0]["address"]
        .as_str()
        .expect("address")
        .split('/')
        .next()
        .expect("ip");
    assert!(rip.starts_with("10.88.0."), "{rres}");
    assert!(
        can_ping(&rpod, "10.88.0.1".parse().expect("ip"), 3),
        "reference pod cannot reach its gateway"
    );
    assert!(
        can_ping(&wpod, "10.244.1.1".parse().expect("ip"), 3),
        "windlass pod cannot reach its gateway"
    );
    // The node routes between its two bridges.
    assert!(
        can_ping(&wpod, rip.parse().expect("ip"), 3),
        "windlass pod cannot reach the reference pod"
    );
    assert!(
        can_ping(&rpod, wip.parse().expect("ip"), 3),
        "reference pod cannot reach the windlass pod"
    );

    // The reference attachment still checks out after windlass-cni changed the node.
    CniCall::new(&bridge, &node.netns, "CHECK", "theirs")
        .netns(&rpath)
        .run(&with_prev_result(&theirs, &rres))
        .ok();

    // Deleting ours leaves theirs intact, and the other way round.
    CniCall::new(&plugin, &node.netns, "DEL", "ours")
        .netns(&wpath)
        .run(&ours)
        .ok();
    assert!(link_names(&node.netns).contains(&"cni0".to_string()));
    assert!(can_ping(&rpod, "10.88.0.1".parse().expect("ip"), 3));
    CniCall::new(&bridge, &node.netns, "DEL", "theirs")
        .netns(&rpath)
        .run(&with_prev_result(&theirs, &rres))
        .ok();
    CniCall::new(&loopback, &node.netns, "DEL", "theirs")
        .netns(&rpath)
        .ifname("lo")
        .run(LOOPBACK_CONF)
        .ok();
    assert!(ipam_files(node.data_dir.path(), "windlass").is_empty());
    assert!(ipam_files(ref_dir.path(), "reference").is_empty());
}
