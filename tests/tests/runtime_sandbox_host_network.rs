//! Privileged tests of host-network sandboxes (`hostNetwork` pods) through the runtime library: the holder and the
//! containers live in the caller's network namespace — here a "node" namespace the test creates — nothing is
//! pinned for CNI, and neither creation nor removal changes that namespace's links.

use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;
use std::time::Duration;

use windlass_runtime::{ContainerConfig, SandboxConfig, SandboxManager, SandboxState};
use windlass_tests::bundle::Bundle;
use windlass_tests::lab::in_netns;
use windlass_tests::netns::NetnsGuard;
use windlass_tests::runtime::unique_cgroup;
use windlass_tests::{require_privileged, unique_name, wait_for, workspace_binary};

/// A sandbox root whose sandboxes are removed on drop.
struct Root {
    dir: tempfile::TempDir,
    mgr: SandboxManager,
}

impl Drop for Root {
    fn drop(&mut self) {
        for sb in self.mgr.list_sandboxes().unwrap_or_default() {
            let _ = self.mgr.remove_sandbox(&sb.id);
        }
    }
}

fn root() -> Root {
    let dir = tempfile::Builder::new()
        .prefix("windlass-hostnet-")
        .tempdir()
        .expect("dir");
    let mgr = SandboxManager::new(
        dir.path().join("sandboxes"),
        "/sys/fs/cgroup",
        workspace_binary("windlass-runtime"),
    );
    Root { dir, mgr }
}

/// `name state` of every link in the namespace, sorted.
fn links(node: &NetnsGuard) -> Vec<String> {
    let out = std::process::Command::new("ip")
        .args(["-n", node.name(), "-o", "link", "show"])
        .output()
        .expect("ip link");
    let mut v: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| {
            let name = l.split(": ").nth(1).unwrap_or_default().to_string();
            let up = l.contains(",UP") || l.contains("<UP");
            format!("{name} {up}")
        })
        .collect();
    v.sort();
    v
}

fn host_network_config(id: &str, hostname: &str) -> SandboxConfig {
    SandboxConfig {
        id: id.into(),
        hostname: hostname.into(),
        cgroup_parent: PathBuf::from(unique_cgroup("hostnet")),
        host_network: true,
        ..Default::default()
    }
}

#[test]
fn a_host_network_sandbox_runs_in_the_callers_namespace_and_leaves_its_links_alone() {
    if !require_privileged(&["ip", "/bin/busybox"]) {
        return;
    }
    let node = NetnsGuard::new(&unique_name("wlhn")).expect("node netns");
    let veth = unique_name("hv");
    node.exec(&[
        "ip",
        "link",
        "add",
        &veth,
        "type",
        "veth",
        "peer",
        "name",
        &format!("{veth}p"),
    ])
    .expect("veth in the node namespace");
    node.exec(&["ip", "link", "set", &veth, "up"]).expect("up");
    let before = links(&node);
    let r = root();
    let id = unique_name("hn");

    // The holder is forked from a thread in the node namespace, as a kubelet running there would.
    let info = in_netns(&node.path(), || {
        r.mgr.create_sandbox(&host_network_config(&id, "node-a"))
    })
    .expect("in netns")
    .expect("create host-network sandbox");
    assert_eq!(info.state, SandboxState::Ready);
    assert!(info.host_network);
    assert!(
        info.netns_path.as_os_str().is_empty(),
        "nothing pinned for CNI: {:?}",
        info.netns_path
    );
    let ns_inode = |p: PathBuf| {
        std::fs::metadata(&p)
            .map(|m| (m.dev(), m.ino()))
            .expect("ns")
    };
    assert_eq!(
        ns_inode(PathBuf::from(format!("/proc/{}/ns/net", info.holder_pid))),
        ns_inode(node.path()),
        "the holder is in the node's network namespace"
    );
    assert_eq!(links(&node), before, "setting up touched the node's links");

    // A container of the pod sees the node's interfaces and listens on the node's ports.
    let bundle = Bundle::busybox(&[
        "sh",
        "-c",
        "hostname; cat /proc/net/dev; exec httpd -f -p 18090 -h /",
    ])
    .expect("bundle");
    let log = r.dir.path().join("web.log");
    r.mgr
        .create_container(
            &id,
            &ContainerConfig {
                id: "web".into(),
                bundle: bundle.path().to_path_buf(),
                log_path: log.clone(),
            },
        )
        .expect("create container");
    r.mgr.start_container(&id, "web").expect("start");
    let out = wait_for("the container's output", Duration::from_secs(10), || {
        let text = std::fs::read_to_string(&log).ok()?;
        text.contains(&veth).then_some(text)
    });
    assert!(out.contains("node-a"), "the pod's hostname: {out}");
    wait_for("httpd on the node's port", Duration::from_secs(10), || {
        in_netns(&node.path(), || {
            std::net::TcpStream::connect_timeout(
                &"127.0.0.1:18090".parse().expect("addr"),
                Duration::from_secs(1),
            )
            .ok()
        })
        .ok()
        .flatten()
        .map(|_| ())
    });

    r.mgr.remove_sandbox(&id).expect("remove sandbox");
    assert!(node.path().exists(), "the node's namespace is still there");
    assert_eq!(links(&node), before, "teardown touched the node's links");
    let refused = in_netns(&node.path(), || {
        std::net::TcpStream::connect("127.0.0.1:18090").is_err()
    })
    .expect("in netns");
    assert!(refused, "the container is gone");
}

#[test]
fn a_host_network_sandbox_refuses_network_sysctls_that_would_change_the_node() {
    if !require_privileged(&["ip"]) {
        return;
    }
    let r = root();
    let mut cfg = host_network_config(&unique_name("hn"), "node-a");
    cfg.sysctls
        .insert("net.ipv4.ip_unprivileged_port_start".into(), "0".into());
    let err = r
        .mgr
        .create_sandbox(&cfg)
        .expect_err("a net sysctl on the host network");
    assert!(err.to_string().contains("hostNetwork"), "{err}");
    assert!(r.mgr.list_sandboxes().expect("list").is_empty());
}
