//! Routes between nodes: every other node's pod CIDR reachable from this node.
//!
//! - `host-gw`: `<podCIDR> via <node InternalIP>` — nodes must share a layer-2 network (flannel's host-gw).
//! - `vxlan`: flannel-style overlay. A `windlass.1` VXLAN device (VNI 1, UDP 8472, no learning) carries the
//!   local VTEP address `<local podCIDR network>/32`; per remote node: a route `<podCIDR> via <remote VTEP
//!   address> dev windlass.1 onlink`, a permanent neighbour `<remote VTEP address> lladdr <remote VTEP MAC>` and
//!   an FDB entry `<remote VTEP MAC> dst <remote node IP>`. Ref: flannel `backend/vxlan` (device, routes, ARP and
//!   FDB entries) — the kernel never has to learn or flood anything.
//!
//! [`NodeRoutes::reconcile`] takes the complete set of nodes and converges to it, removing what belongs to nodes
//! that left or moved. Routes the agent owns carry [`ROUTE_PROTOCOL`], so stale ones are found after a restart
//! without any state file.

use std::collections::{BTreeMap, HashMap};
use std::net::Ipv4Addr;
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::time::Duration;

use ipnet::Ipv4Net;
use netlink_packet_route::link::InfoKind;
use netlink_packet_route::route::RouteProtocol;
use rtnetlink::{LinkUnspec, LinkVxlan, RouteMessageBuilder};
use tracing::{info, warn};

use crate::netlink::{block_on, format_mac, is_kind, LinkError, Netlink};
use crate::spec::Mode;

/// The VXLAN device (flannel: `flannel.1`).
pub const VXLAN_DEVICE: &str = "windlass.1";
pub const VXLAN_VNI: u32 = 1;
/// The Linux/flannel VXLAN port (IANA's is 4789).
pub const VXLAN_PORT: u16 = 8472;
/// Outer IPv4 (20) + UDP (8) + VXLAN (8) + inner Ethernet (14) headers.
pub const VXLAN_OVERHEAD: u32 = 50;
/// `rtm_protocol` of the routes this agent owns (an unassigned value in iproute2's `rt_protos`).
pub const ROUTE_PROTOCOL: u8 = 87;
const MAIN_TABLE: u32 = 254;

/// One node as the agent sees it (from the Node object: name, `spec.podCIDR`, InternalIP).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeNet {
    pub name: String,
    pub pod_cidr: Ipv4Net,
    pub node_ip: Ipv4Addr,
    /// The node's VTEP MAC; `None` means the deterministic [`vtep_mac`] of its node IP.
    pub vtep_mac: Option<[u8; 6]>,
}

impl NodeNet {
    pub fn new(name: &str, pod_cidr: Ipv4Net, node_ip: Ipv4Addr) -> Self {
        Self {
            name: name.to_string(),
            pod_cidr: pod_cidr.trunc(),
            node_ip,
            vtep_mac: None,
        }
    }

    fn mac(&self) -> [u8; 6] {
        self.vtep_mac.unwrap_or_else(|| vtep_mac(self.node_ip))
    }

    /// The VTEP address: the pod CIDR's network address (flannel uses the same `.0/32` convention).
    fn vtep_ip(&self) -> Ipv4Addr {
        self.pod_cidr.network()
    }
}

/// A VTEP MAC derived from the node IP (`0e:57:<ip>`, locally administered unicast), so nodes need not publish
/// their MAC through the API (flannel stores it in a Node annotation instead).
pub fn vtep_mac(node_ip: Ipv4Addr) -> [u8; 6] {
    let o = node_ip.octets();
    [0x0e, 0x57, o[0], o[1], o[2], o[3]]
}

#[derive(Debug, thiserror::Error)]
pub enum RoutesError {
    #[error(
        "the local node {0} is not in the node list (it needs a podCIDR and an InternalIP first)"
    )]
    LocalNodeUnknown(String),
    #[error("no link holds the local node IP {0} (needed as the VXLAN underlay)")]
    NoUnderlay(Ipv4Addr),
    #[error(transparent)]
    Link(#[from] LinkError),
    #[error("{} node route changes failed: {}", .0.len(), .0.iter().map(|e| e.to_string()).collect::<Vec<_>>().join("; "))]
    Partial(Vec<LinkError>),
}

/// What one reconcile changed.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ReconcileReport {
    pub routes_set: usize,
    pub routes_removed: usize,
    pub neighbours_set: usize,
    pub neighbours_removed: usize,
    pub fdb_set: usize,
    pub fdb_removed: usize,
}

/// Converges this node's routes to the other nodes' pod CIDRs.
#[derive(Debug, Clone)]
pub struct NodeRoutes {
    mode: Mode,
    local_node: String,
    device: String,
}

impl NodeRoutes {
    pub fn new(mode: Mode, local_node: &str) -> Self {
        Self {
            mode,
            local_node: local_node.to_string(),
            device: VXLAN_DEVICE.to_string(),
        }
    }

    pub fn mode(&self) -> Mode {
        self.mode
    }

    /// Converges routes (and in vxlan mode the device, neighbour and FDB entries) to `nodes`, which must be the
    /// complete set including the local node. Works in the calling thread's network namespace. Every node is
    /// attempted even if one fails; failures are returned together.
    pub fn reconcile(&self, nodes: &[NodeNet]) -> Result<ReconcileReport, RoutesError> {
        let span = tracing::info_span!("reconcile", node = %self.local_node, mode = ?self.mode, nodes = nodes.len());
        let _enter = span.enter();
        let local = nodes
            .iter()
            .find(|n| n.name == self.local_node)
            .ok_or_else(|| RoutesError::LocalNodeUnknown(self.local_node.clone()))?;
        let remotes: Vec<&NodeNet> = nodes
            .iter()
            .filter(|n| {
                n.name != self.local_node && !n.pod_cidr.contains(&local.pod_cidr.network())
            })
            .collect();
        let report = block_on(async {
            let nl = Netlink::connect()?;
            match self.mode {
                Mode::HostGw => self.reconcile_host_gw(&nl, &remotes).await,
                Mode::Vxlan => self.reconcile_vxlan(&nl, local, &remotes).await,
            }
        });
        match report {
            Ok((report, errors)) if errors.is_empty() => {
                info!(?report, "node routes converged");
                Ok(report)
            }
            Ok((_, errors)) => Err(RoutesError::Partial(errors)),
            Err(e) => Err(e.into()),
        }
    }

    async fn reconcile_host_gw(
        &self,
        nl: &Netlink,
        remotes: &[&NodeNet],
    ) -> Result<(ReconcileReport, Vec<LinkError>), LinkError> {
        // Leaving vxlan mode: the device (and with it its routes, neighbours and FDB) goes.
        if let Some(dev) = nl.link(&self.device).await? {
            if is_kind(&dev, InfoKind::Vxlan) {
                nl.delete_link(&self.device).await?;
            }
        }
        let desired: BTreeMap<Ipv4Net, (Ipv4Addr, Option<u32>)> = remotes
            .iter()
            .map(|n| (n.pod_cidr, (n.node_ip, None)))
            .collect();
        let mut report = ReconcileReport::default();
        let mut errors = Vec::new();
        self.converge_routes(nl, &desired, false, &mut report, &mut errors)
            .await?;
        Ok((report, errors))
    }

    /// Removes owned routes that are not desired, then sets every desired route that is missing or different.
    async fn converge_routes(
        &self,
        nl: &Netlink,
        desired: &BTreeMap<Ipv4Net, (Ipv4Addr, Option<u32>)>,
        onlink: bool,
        report: &mut ReconcileReport,
        errors: &mut Vec<LinkError>,
    ) -> Result<(), LinkError> {
        let owned: Vec<_> = nl
            .routes()
            .await?
            .into_iter()
            .filter(|r| r.protocol == RouteProtocol::Other(ROUTE_PROTOCOL) && r.table == MAIN_TABLE)
            .collect();
        let mut current: HashMap<Ipv4Net, (Option<Ipv4Addr>, Option<u32>)> = HashMap::new();
        for r in &owned {
            let Ok(dst) = Ipv4Net::new(r.dst, r.prefix) else {
                continue;
            };
            let wanted = desired.get(&dst);
            let matches = wanted.is_some_and(|(gw, oif)| {
                r.gateway == Some(*gw) && (oif.is_none() || r.oif == *oif)
            });
            if matches {
                current.insert(dst, (r.gateway, r.oif));
            } else {
                match nl.delete_route(r).await {
                    Ok(()) => report.routes_removed += 1,
                    Err(e) => errors.push(e),
                }
            }
        }
        for (dst, (gw, oif)) in desired {
            if current.contains_key(dst) {
                continue;
            }
            let mut b = RouteMessageBuilder::<Ipv4Addr>::new()
                .destination_prefix(dst.network(), dst.prefix_len())
                .gateway(*gw)
                .protocol(RouteProtocol::Other(ROUTE_PROTOCOL));
            if let Some(oif) = oif {
                b = b.output_interface(*oif);
            }
            if onlink {
                b = b.onlink();
            }
            match nl
                .replace_route(b.build(), &format!("route {dst} via {gw}"))
                .await
            {
                Ok(()) => report.routes_set += 1,
                Err(e) => {
                    warn!(%dst, %gw, error = %e, "cannot set node route");
                    errors.push(e);
                }
            }
        }
        Ok(())
    }

    async fn reconcile_vxlan(
        &self,
        nl: &Netlink,
        local: &NodeNet,
        remotes: &[&NodeNet],
    ) -> Result<(ReconcileReport, Vec<LinkError>), LinkError> {
        let dev = self.ensure_vxlan_device(nl, local).await?;
        let mut report = ReconcileReport::default();
        let mut errors = Vec::new();

        // Neighbours first, so a route never points at a VTEP address without its MAC.
        let desired_neigh: HashMap<Ipv4Addr, [u8; 6]> =
            remotes.iter().map(|n| (n.vtep_ip(), n.mac())).collect();
        for n in nl.neighbours(dev, false).await? {
            let keep = match n.ip.and_then(|ip| desired_neigh.get(&ip)) {
                Some(want) => n.mac == Some(*want),
                None => false,
            };
            if !keep {
                match nl.delete_neighbour(&n).await {
                    Ok(()) => report.neighbours_removed += 1,
                    Err(e) => errors.push(e),
                }
            }
        }
        for (ip, mac) in &desired_neigh {
            match nl.replace_neighbour(dev, *ip, *mac).await {
                Ok(()) => report.neighbours_set += 1,
                Err(e) => errors.push(e),
            }
        }

        let desired_fdb: HashMap<[u8; 6], Ipv4Addr> =
            remotes.iter().map(|n| (n.mac(), n.node_ip)).collect();
        for f in nl.neighbours(dev, true).await? {
            let keep = match f.mac.and_then(|mac| desired_fdb.get(&mac)) {
                Some(want) => f.ip == Some(*want),
                None => false,
            };
            if !keep {
                match nl.delete_neighbour(&f).await {
                    Ok(()) => report.fdb_removed += 1,
                    Err(e) => errors.push(e),
                }
            }
        }
        for (mac, remote) in &desired_fdb {
            match nl.replace_fdb(dev, *mac, *remote).await {
                Ok(()) => report.fdb_set += 1,
                Err(e) => {
                    warn!(mac = %format_mac(*mac), %remote, error = %e, "cannot set fdb entry");
                    errors.push(e)
                }
            }
        }

        let desired: BTreeMap<Ipv4Net, (Ipv4Addr, Option<u32>)> = remotes
            .iter()
            .map(|n| (n.pod_cidr, (n.vtep_ip(), Some(dev))))
            .collect();
        self.converge_routes(nl, &desired, true, &mut report, &mut errors)
            .await?;
        Ok((report, errors))
    }

    /// Creates (or re-creates, when the local address or MAC changed) the VXLAN device on the link that holds
    /// the node IP, with that link's MTU minus the VXLAN overhead; returns its index.
    async fn ensure_vxlan_device(&self, nl: &Netlink, local: &NodeNet) -> Result<u32, LinkError> {
        let mac = local.mac();
        let mut underlay = None;
        for link in nl.links().await? {
            if link.name == self.device {
                continue;
            }
            if nl
                .addresses(link.index)
                .await?
                .iter()
                .any(|(ip, _)| *ip == local.node_ip)
            {
                underlay = Some(link);
                break;
            }
        }
        let underlay =
            underlay.ok_or(LinkError::NoSuchLink(format!("holding {}", local.node_ip)))?;
        if let Some(existing) = nl.link(&self.device).await? {
            if is_kind(&existing, InfoKind::Vxlan) && existing.mac == Some(mac) {
                return self.finish_device(nl, existing.index, local).await;
            }
            // Wrong MAC (node IP changed) or not ours to keep: start over.
            nl.delete_link(&self.device).await?;
        }
        let mut builder = LinkVxlan::new(&self.device, VXLAN_VNI)
            .port(VXLAN_PORT)
            .local(local.node_ip)
            .dev(underlay.index)
            .learning(false)
            .address(mac.to_vec());
        if let Some(mtu) = underlay.mtu {
            builder = builder.mtu(mtu.saturating_sub(VXLAN_OVERHEAD));
        }
        nl.add_link(
            builder.build(),
            &format!("create vxlan device {}", self.device),
        )
        .await?;
        let dev = nl.require_link(&self.device).await?;
        self.finish_device(nl, dev.index, local).await
    }

    async fn finish_device(
        &self,
        nl: &Netlink,
        index: u32,
        local: &NodeNet,
    ) -> Result<u32, LinkError> {
        let vtep = local.vtep_ip();
        // Exactly one address: the local VTEP (a changed podCIDR leaves an old one behind otherwise).
        for (ip, prefix) in nl.addresses(index).await? {
            if ip != vtep {
                nl.delete_address(index, ip, prefix).await?;
            }
        }
        nl.add_address(index, vtep, 32).await?;
        nl.set_link(
            LinkUnspec::new_with_index(index).up().build(),
            "bring up the vxlan device",
        )
        .await?;
        Ok(index)
    }
}

/// What a node source yields.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NodeEvent {
    /// The complete current set of nodes.
    Nodes(Vec<NodeNet>),
    /// Nothing new within the wait; the agent resyncs the last set (repairing routes someone removed).
    Idle,
    /// The source ended; the agent returns.
    Closed,
}

/// Where the agent learns the cluster's nodes: a kube watcher in production, a channel in tests.
pub trait NodeSource {
    /// Waits up to `timeout` for the next complete set of nodes.
    fn next_event(&mut self, timeout: Duration) -> NodeEvent;
}

impl NodeSource for Receiver<Vec<NodeNet>> {
    fn next_event(&mut self, timeout: Duration) -> NodeEvent {
        match self.recv_timeout(timeout) {
            Ok(mut nodes) => {
                // Only the newest set matters.
                while let Ok(newer) = self.try_recv() {
                    nodes = newer;
                }
                NodeEvent::Nodes(nodes)
            }
            Err(RecvTimeoutError::Timeout) => NodeEvent::Idle,
            Err(RecvTimeoutError::Disconnected) => NodeEvent::Closed,
        }
    }
}

/// The node agent loop: reconciles on every new node set and every `resync` without one, until the source
/// closes. Errors are logged and retried on the next event, never fatal. Returns how many reconciles succeeded.
pub fn run_agent(source: &mut impl NodeSource, routes: &NodeRoutes, resync: Duration) -> usize {
    info!(mode = ?routes.mode(), node = %routes.local_node, "node network agent started");
    let mut last: Option<Vec<NodeNet>> = None;
    let mut ok = 0;
    loop {
        match source.next_event(resync) {
            NodeEvent::Nodes(nodes) => last = Some(nodes),
            NodeEvent::Idle => {}
            NodeEvent::Closed => return ok,
        }
        if let Some(nodes) = &last {
            match routes.reconcile(nodes) {
                Ok(_) => ok += 1,
                Err(e) => {
                    warn!(error = %e, "node routes not converged; retrying on the next event")
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vtep_macs_are_locally_administered_unicast_and_follow_the_node_ip() {
        let mac = vtep_mac(Ipv4Addr::new(172, 30, 0, 2));
        assert_eq!(mac, [0x0e, 0x57, 172, 30, 0, 2]);
        assert_eq!(mac[0] & 0b01, 0, "unicast");
        assert_eq!(mac[0] & 0b10, 0b10, "locally administered");
    }

    #[test]
    fn the_vtep_address_is_the_pod_cidr_network() {
        let n = NodeNet::new(
            "a",
            "10.244.3.7/24".parse().expect("net"),
            Ipv4Addr::new(1, 2, 3, 4),
        );
        assert_eq!(n.vtep_ip(), Ipv4Addr::new(10, 244, 3, 0));
        assert_eq!(n.pod_cidr.to_string(), "10.244.3.0/24");
    }

    #[test]
    fn an_unknown_local_node_is_an_error_not_a_flush() {
        let routes = NodeRoutes::new(Mode::HostGw, "me");
        let other = NodeNet::new(
            "other",
            "10.244.1.0/24".parse().expect("net"),
            Ipv4Addr::new(1, 2, 3, 4),
        );
        assert!(matches!(
            routes.reconcile(&[other]),
            Err(RoutesError::LocalNodeUnknown(_))
        ));
    }
}
