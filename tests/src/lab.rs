//! A namespace lab of "nodes" on a lab switch, for network tests that never touch the root namespace.
//!
//! ```text
//!   [client 172.30.0.250]   [node0 172.30.0.10]  [node1 172.30.0.11] ...
//!            \                     |                   /
//!             `------- switch netns: bridge sw0 -------'
//! ```
//! Every node is a network namespace with `eth0` on the switch's bridge; node `i` owns pod CIDR
//! `10.244.<i+1>.0/24`. Links are created from inside the lab's namespaces (`ip -n <ns> link add ... peer ...
//! netns <other>`), so not even a temporary link appears in the root namespace. Addresses repeat between labs:
//! each lab is its own isolated set of namespaces. Everything is deleted when the [`Lab`] drops.

use std::io;
use std::net::Ipv4Addr;
use std::os::fd::AsFd;
use std::path::Path;
use std::process::Command;

use crate::netns::NetnsGuard;
use crate::{unique_name, TempDir};

/// The lab switch's subnet.
pub const LAB_PREFIX_LEN: u8 = 24;
/// The outside client: on the switch, but with no route to any pod CIDR (so it only sees masqueraded traffic).
pub const CLIENT_IP: Ipv4Addr = Ipv4Addr::new(172, 30, 0, 250);

fn ip(args: &[&str]) -> io::Result<()> {
    let out = Command::new("ip").args(args).output()?;
    if !out.status.success() {
        return Err(io::Error::other(format!(
            "ip {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        )));
    }
    Ok(())
}

/// One node of the lab.
pub struct LabNode {
    /// The node's name as the cluster knows it (`node0`, `node1`, ...).
    pub name: String,
    pub index: usize,
    pub ip: Ipv4Addr,
    /// `10.244.<index+1>.0/24`.
    pub pod_cidr: String,
    /// The plugin's `dataDir` on this node.
    pub data_dir: TempDir,
    pub netns: NetnsGuard,
}

impl LabNode {
    /// The gateway (bridge) address of the node's pod CIDR.
    pub fn gateway(&self) -> Ipv4Addr {
        Ipv4Addr::new(10, 244, self.index as u8 + 1, 1)
    }
}

/// A lab switch with nodes and an outside client. Drop order: nodes, client, then the switch.
pub struct Lab {
    pub nodes: Vec<LabNode>,
    pub client: NetnsGuard,
    pub switch: NetnsGuard,
    prefix: String,
    /// Whether the switch also routes to a second segment (see [`Lab::add_remote_node`]).
    routed: bool,
}

impl Lab {
    /// A switch, an outside client and `nodes` nodes.
    pub fn new(nodes: usize) -> io::Result<Self> {
        let prefix = unique_name("wl");
        let switch = NetnsGuard::new(&format!("{prefix}-sw"))?;
        ip(&["-n", switch.name(), "link", "add", "sw0", "type", "bridge"])?;
        ip(&["-n", switch.name(), "link", "set", "sw0", "up"])?;
        let client = NetnsGuard::new(&format!("{prefix}-client"))?;
        let mut lab = Self {
            nodes: Vec::new(),
            client,
            switch,
            prefix,
            routed: false,
        };
        lab.plug(lab.client.name().to_string().as_str(), "client", CLIENT_IP)?;
        for _ in 0..nodes {
            lab.add_node()?;
        }
        Ok(lab)
    }

    /// Connects namespace `ns` to the switch as `eth0` with `addr/24`; the switch side is `port` (unique per lab,
    /// at most 15 bytes; nodes use `p<index>`).
    pub fn plug(&self, ns: &str, port: &str, addr: Ipv4Addr) -> io::Result<()> {
        let sw = self.switch.name();
        ip(&[
            "-n", sw, "link", "add", port, "type", "veth", "peer", "name", "eth0", "netns", ns,
        ])?;
        ip(&["-n", sw, "link", "set", port, "master", "sw0", "up"])?;
        ip(&[
            "-n",
            ns,
            "addr",
            "add",
            &format!("{addr}/{LAB_PREFIX_LEN}"),
            "dev",
            "eth0",
        ])?;
        ip(&["-n", ns, "link", "set", "eth0", "up"])?;
        Ok(())
    }

    /// Adds one more node (a node joining later) and returns it.
    pub fn add_node(&mut self) -> io::Result<&LabNode> {
        let index = self.nodes.len();
        let node_ip = Ipv4Addr::new(172, 30, 0, 10 + index as u8);
        let netns = NetnsGuard::new(&format!("{}-n{index}", self.prefix))?;
        self.plug(netns.name(), &format!("p{index}"), node_ip)?;
        if self.routed {
            ip(&[
                "-n",
                netns.name(),
                "route",
                "add",
                "172.31.0.0/24",
                "via",
                "172.30.0.1",
            ])?;
        }
        self.push_node(index, netns, node_ip)
    }

    /// Adds a node on a second segment, `172.31.0.0/24` on the switch's bridge `sw1`, that the first segment
    /// reaches only through the switch namespace acting as a router (172.30.0.1 / 172.31.0.1): the nodes do
    /// not share a layer-2 network, as in a cluster spread over racks or subnets.
    pub fn add_remote_node(&mut self) -> io::Result<&LabNode> {
        let sw = self.switch.name().to_string();
        if !self.routed {
            ip(&["-n", &sw, "addr", "add", "172.30.0.1/24", "dev", "sw0"])?;
            ip(&["-n", &sw, "link", "add", "sw1", "type", "bridge"])?;
            ip(&["-n", &sw, "addr", "add", "172.31.0.1/24", "dev", "sw1"])?;
            ip(&["-n", &sw, "link", "set", "sw1", "up"])?;
            self.switch
                .exec(&["sh", "-c", "echo 1 > /proc/sys/net/ipv4/ip_forward"])?;
            for n in &self.nodes {
                ip(&[
                    "-n",
                    n.netns.name(),
                    "route",
                    "add",
                    "172.31.0.0/24",
                    "via",
                    "172.30.0.1",
                ])?;
            }
            self.routed = true;
        }
        let index = self.nodes.len();
        let node_ip = Ipv4Addr::new(172, 31, 0, 10 + index as u8);
        let netns = NetnsGuard::new(&format!("{}-n{index}", self.prefix))?;
        let port = format!("p{index}");
        ip(&[
            "-n",
            &sw,
            "link",
            "add",
            &port,
            "type",
            "veth",
            "peer",
            "name",
            "eth0",
            "netns",
            netns.name(),
        ])?;
        ip(&["-n", &sw, "link", "set", &port, "master", "sw1", "up"])?;
        ip(&[
            "-n",
            netns.name(),
            "addr",
            "add",
            &format!("{node_ip}/24"),
            "dev",
            "eth0",
        ])?;
        ip(&["-n", netns.name(), "link", "set", "eth0", "up"])?;
        ip(&[
            "-n",
            netns.name(),
            "route",
            "add",
            "default",
            "via",
            "172.31.0.1",
        ])?;
        self.push_node(index, netns, node_ip)
    }

    fn push_node(
        &mut self,
        index: usize,
        netns: NetnsGuard,
        node_ip: Ipv4Addr,
    ) -> io::Result<&LabNode> {
        let name = format!("node{index}");
        self.nodes.push(LabNode {
            name,
            index,
            ip: node_ip,
            pod_cidr: format!("10.244.{}.0/24", index + 1),
            data_dir: tempfile::tempdir()?,
            netns,
        });
        Ok(&self.nodes[index])
    }

    /// A fresh pod network namespace (not yet attached to anything).
    pub fn pod_netns(&self) -> io::Result<NetnsGuard> {
        NetnsGuard::new(&unique_name("wlpod"))
    }
}

/// Runs `f` on a thread that joined the network namespace at `netns` (e.g. a library call that must act inside
/// a lab node). The calling thread and the rest of the test process stay where they are.
pub fn in_netns<T: Send>(netns: &Path, f: impl FnOnce() -> T + Send) -> io::Result<T> {
    let file = std::fs::File::open(netns)?;
    std::thread::scope(|s| {
        s.spawn(|| {
            use std::os::fd::AsRawFd;
            // SAFETY: setns on a valid, open namespace fd; it only changes this (scoped, soon finished) thread.
            if unsafe { libc::setns(file.as_fd().as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(f())
        })
        .join()
        .map_err(|_| io::Error::other("the in-netns thread panicked"))?
    })
}

/// Whether `from` can ping `to` (busybox `ping -c1 -W1`, retried for up to `tries` seconds so ARP and
/// forwarding may settle).
pub fn can_ping(from: &NetnsGuard, to: Ipv4Addr, tries: u32) -> bool {
    (0..tries.max(1)).any(|_| {
        from.command("busybox")
            .args(["ping", "-c1", "-W1", &to.to_string()])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    })
}
