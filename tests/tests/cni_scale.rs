//! Many pods added and deleted concurrently on one node: no address is handed out twice and none leaks.

use std::collections::BTreeSet;
use std::net::Ipv4Addr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

use serde_json::json;
use windlass_tests::cni::{ipam_files, link_names, windlass_conf, CniCall};
use windlass_tests::lab::Lab;
use windlass_tests::netns::NetnsGuard;
use windlass_tests::{require_privileged, workspace_binary};

const PODS: usize = 200;
const THREADS: usize = 16;

#[test]
fn two_hundred_pods_added_and_deleted_in_parallel_leak_no_address() {
    if !require_privileged(&["ip", "nft"]) {
        return;
    }
    let lab = Lab::new(1).expect("lab");
    let node = &lab.nodes[0];
    let conf = windlass_conf("windlass", &node.pod_cidr, node.data_dir.path(), json!({}));
    let plugin = workspace_binary("windlass-cni");
    let pods: Vec<NetnsGuard> = (0..PODS)
        .map(|_| lab.pod_netns().expect("pod netns"))
        .collect();

    // ADD all pods from 16 threads at once.
    let next = AtomicUsize::new(0);
    let addresses = Mutex::new(Vec::new());
    std::thread::scope(|s| {
        for _ in 0..THREADS {
            s.spawn(|| loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= PODS {
                    break;
                }
                let path = pods[i].path();
                let id = format!("scale{i}");
                let out = CniCall::new(&plugin, &node.netns, "ADD", &id)
                    .netns(&path)
                    .run(&conf)
                    .ok();
                let ip: Ipv4Addr = out.json()["ips"][0]["address"]
                    .as_str()
                    .and_then(|a| a.split('/').next())
                    .and_then(|a| a.parse().ok())
                    .expect("address");
                addresses.lock().expect("lock").push(ip);
            });
        }
    });
    let addresses = addresses.into_inner().expect("lock");
    let unique: BTreeSet<Ipv4Addr> = addresses.iter().copied().collect();
    assert_eq!(unique.len(), PODS, "an address was handed out twice");
    assert_eq!(ipam_files(node.data_dir.path(), "windlass").len(), PODS);
    let veths = link_names(&node.netns)
        .into_iter()
        .filter(|l| l.starts_with("wl"))
        .count();
    assert_eq!(veths, PODS);

    // DEL all of them, again 16 at a time.
    let next = AtomicUsize::new(0);
    std::thread::scope(|s| {
        for _ in 0..THREADS {
            s.spawn(|| loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= PODS {
                    break;
                }
                let path = pods[i].path();
                let id = format!("scale{i}");
                CniCall::new(&plugin, &node.netns, "DEL", &id)
                    .netns(&path)
                    .run(&conf)
                    .ok();
            });
        }
    });
    assert!(
        ipam_files(node.data_dir.path(), "windlass").is_empty(),
        "leaked addresses: {:?}",
        ipam_files(node.data_dir.path(), "windlass")
    );
    let left: Vec<String> = link_names(&node.netns)
        .into_iter()
        .filter(|l| l.starts_with("wl"))
        .collect();
    assert!(left.is_empty(), "leaked veths: {left:?}");
    // The freed range is usable again: one more pod gets an address.
    let extra = lab.pod_netns().expect("pod");
    let path = extra.path();
    CniCall::new(&plugin, &node.netns, "ADD", "after")
        .netns(&path)
        .run(&conf)
        .ok();
}
