//! Links, addresses, routes and neighbours through rtnetlink, and running work inside another network namespace.
//!
//! A netlink socket belongs to the network namespace its creating thread was in, so pod-side work runs on a
//! dedicated thread that `setns`es into the pod's namespace and opens its own socket there; the process as a
//! whole never changes namespace (the same approach as containernetworking/plugins `ns.Do`, minus Go's
//! thread-locking caveats because the thread exits afterwards).

use std::future::Future;
use std::net::{IpAddr, Ipv4Addr};
use std::os::fd::AsFd;

use futures::TryStreamExt;
use netlink_packet_route::address::AddressAttribute;
use netlink_packet_route::link::{
    InfoBridgePort, InfoData, InfoKind, InfoPortData, InfoPortKind, InfoVeth, LinkAttribute,
    LinkFlags, LinkInfo, LinkMessage,
};
use netlink_packet_route::neighbour::{
    NeighbourAddress, NeighbourAttribute, NeighbourFlags, NeighbourMessage,
};
use netlink_packet_route::route::{RouteAddress, RouteAttribute, RouteMessage, RouteProtocol};
use netlink_packet_route::AddressFamily;
use rtnetlink::{
    Handle, LinkBridge, LinkMessageBuilder, LinkUnspec, LinkVeth, RouteMessageBuilder,
};

#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    #[error("netlink: cannot {what}: {source}")]
    Netlink {
        what: String,
        source: rtnetlink::Error,
    },
    #[error("cannot {what}: {source}")]
    Io {
        what: String,
        source: std::io::Error,
    },
    #[error("cannot enter network namespace: {0}")]
    Setns(nix::errno::Errno),
    #[error("the network-namespace worker thread panicked")]
    WorkerPanicked,
    #[error("link {0} does not exist")]
    NoSuchLink(String),
}

impl LinkError {
    /// The kernel's errno for a netlink failure (positive), if that is what this is.
    pub fn errno(&self) -> Option<i32> {
        match self {
            LinkError::Netlink {
                source: rtnetlink::Error::NetlinkError(msg),
                ..
            } => msg.code.map(|c| -c.get()),
            _ => None,
        }
    }
}

pub(crate) fn nl_err(what: impl Into<String>) -> impl FnOnce(rtnetlink::Error) -> LinkError {
    let what = what.into();
    move |source| LinkError::Netlink { what, source }
}

fn errno_of(e: &rtnetlink::Error) -> Option<i32> {
    match e {
        rtnetlink::Error::NetlinkError(msg) => msg.code.map(|c| -c.get()),
        _ => None,
    }
}

/// Runs `fut` to completion on a fresh single-threaded runtime (the plugin is a short-lived process, and the
/// node agent calls this from a blocking context).
pub(crate) fn block_on<T>(fut: impl Future<Output = Result<T, LinkError>>) -> Result<T, LinkError> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .build()
        .map_err(|source| LinkError::Io {
            what: "start the netlink runtime".into(),
            source,
        })?;
    rt.block_on(fut)
}

/// Runs `f` on a thread that has joined the network namespace `ns` (an open `/run/netns/...` or
/// `/proc/<pid>/ns/net` file); sockets `f` opens belong to that namespace.
pub(crate) fn in_netns<T: Send, E: Send + From<LinkError>>(
    ns: &(impl AsFd + Sync),
    f: impl FnOnce() -> Result<T, E> + Send,
) -> Result<T, E> {
    std::thread::scope(|s| {
        s.spawn(|| {
            nix::sched::setns(ns.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET)
                .map_err(LinkError::Setns)?;
            f()
        })
        .join()
        .unwrap_or_else(|_| Err(LinkError::WorkerPanicked.into()))
    })
}

/// What we need to know about a link.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Link {
    pub index: u32,
    pub name: String,
    pub mac: Option<[u8; 6]>,
    pub controller: Option<u32>,
    pub up: bool,
    pub mtu: Option<u32>,
    pub kind: Option<String>,
}

impl Link {
    fn from_message(msg: &LinkMessage) -> Self {
        let mut link = Link {
            index: msg.header.index,
            name: String::new(),
            mac: None,
            controller: None,
            up: msg.header.flags.contains(LinkFlags::Up),
            mtu: None,
            kind: None,
        };
        for attr in &msg.attributes {
            match attr {
                LinkAttribute::IfName(n) => link.name = n.clone(),
                LinkAttribute::Address(a) if a.len() == 6 => {
                    let mut mac = [0u8; 6];
                    mac.copy_from_slice(a);
                    link.mac = Some(mac);
                }
                LinkAttribute::Controller(c) if *c != 0 => link.controller = Some(*c),
                LinkAttribute::Mtu(m) => link.mtu = Some(*m),
                LinkAttribute::LinkInfo(infos) => {
                    for info in infos {
                        if let LinkInfo::Kind(k) = info {
                            link.kind = Some(k.to_string());
                        }
                    }
                }
                _ => {}
            }
        }
        link
    }

    pub fn mac_string(&self) -> String {
        self.mac.map(format_mac).unwrap_or_default()
    }
}

pub(crate) fn format_mac(mac: [u8; 6]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// An IPv4 route as read back from the kernel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Route4 {
    pub dst: Ipv4Addr,
    pub prefix: u8,
    pub gateway: Option<Ipv4Addr>,
    pub oif: Option<u32>,
    pub protocol: RouteProtocol,
    pub table: u32,
    pub message: RouteMessage,
}

/// A neighbour or FDB entry as read back from the kernel.
#[derive(Debug, Clone)]
pub(crate) struct Neigh {
    pub ip: Option<Ipv4Addr>,
    pub mac: Option<[u8; 6]>,
    pub message: NeighbourMessage,
}

/// A connection to rtnetlink in the namespace of the thread that opened it.
pub(crate) struct Netlink {
    handle: Handle,
}

impl Netlink {
    /// Opens a socket in the calling thread's namespace; must run inside a tokio runtime.
    pub fn connect() -> Result<Self, LinkError> {
        let (conn, handle, _) = rtnetlink::new_connection().map_err(|source| LinkError::Io {
            what: "open a netlink socket".into(),
            source,
        })?;
        tokio::spawn(conn);
        Ok(Self { handle })
    }

    pub async fn link(&self, name: &str) -> Result<Option<Link>, LinkError> {
        let mut stream = self
            .handle
            .link()
            .get()
            .match_name(name.to_string())
            .execute();
        match stream.try_next().await {
            Ok(Some(msg)) => Ok(Some(Link::from_message(&msg))),
            Ok(None) => Ok(None),
            Err(e) if errno_of(&e) == Some(libc::ENODEV) => Ok(None),
            Err(e) => Err(nl_err(format!("look up link {name}"))(e)),
        }
    }

    pub async fn links(&self) -> Result<Vec<Link>, LinkError> {
        let msgs: Vec<LinkMessage> = self
            .handle
            .link()
            .get()
            .execute()
            .try_collect()
            .await
            .map_err(nl_err("list links"))?;
        Ok(msgs.iter().map(Link::from_message).collect())
    }

    pub async fn require_link(&self, name: &str) -> Result<Link, LinkError> {
        self.link(name)
            .await?
            .ok_or_else(|| LinkError::NoSuchLink(name.to_string()))
    }

    /// Creates the bridge if needed (tolerating a concurrent creator) and brings it up.
    /// `mac` is set explicitly: a bridge with a kernel-chosen address adopts its lowest port's MAC, so its
    /// address would change as pods come and go (and a repeated ADD would report a different result).
    pub async fn ensure_bridge(
        &self,
        name: &str,
        mac: [u8; 6],
        mtu: Option<u32>,
    ) -> Result<Link, LinkError> {
        if let Some(link) = self.link(name).await? {
            if !link.up {
                self.set_up(link.index).await?;
            }
            return Ok(link);
        }
        let mut builder = LinkBridge::new(name).address(mac.to_vec()).up();
        if let Some(mtu) = mtu {
            builder = builder.mtu(mtu);
        }
        match self.handle.link().add(builder.build()).execute().await {
            Ok(()) => {}
            Err(e) if errno_of(&e) == Some(libc::EEXIST) => {}
            Err(e) => return Err(nl_err(format!("create bridge {name}"))(e)),
        }
        let link = self.require_link(name).await?;
        if !link.up {
            self.set_up(link.index).await?;
        }
        Ok(link)
    }

    pub async fn set_up(&self, index: u32) -> Result<(), LinkError> {
        self.handle
            .link()
            .set(LinkUnspec::new_with_index(index).up().build())
            .execute()
            .await
            .map_err(nl_err(format!("bring up link #{index}")))
    }

    /// Creates a veth pair whose host end `host` is attached to `bridge` and up, and whose peer is created
    /// directly inside the namespace `peer_ns` as `peer_name` (no temporary name in the host namespace, so two
    /// pods never race for one). Returns the kernel's errno on failure so callers can tell EEXIST apart.
    pub async fn create_veth(
        &self,
        host: &str,
        bridge: u32,
        peer_name: &str,
        peer_ns: &impl AsFd,
        mtu: Option<u32>,
    ) -> Result<(), LinkError> {
        use std::os::fd::AsRawFd;
        let mut peer = LinkMessageBuilder::<LinkUnspec>::new()
            .name(peer_name.to_string())
            .setns_by_fd(peer_ns.as_fd().as_raw_fd());
        if let Some(mtu) = mtu {
            peer = peer.mtu(mtu);
        }
        let mut builder = LinkVeth::new(host, peer_name)
            .set_info_data(InfoData::Veth(InfoVeth::Peer(peer.build())))
            .controller(bridge)
            .up();
        if let Some(mtu) = mtu {
            builder = builder.mtu(mtu);
        }
        self.handle
            .link()
            .add(builder.build())
            .execute()
            .await
            .map_err(nl_err(format!("create veth {host} (peer {peer_name})")))
    }

    /// Hairpin mode on a bridge port, so a pod can reach itself through a service address.
    /// Ref: containernetworking/plugins bridge `setupVeth` (`hairpinMode`).
    pub async fn set_hairpin(&self, index: u32) -> Result<(), LinkError> {
        let msg = LinkUnspec::new_with_index(index)
            .set_port_kind(InfoPortKind::Bridge)
            .set_port_data(InfoPortData::BridgePort(vec![InfoBridgePort::HairpinMode(
                true,
            )]))
            .build();
        self.handle
            .link()
            .set_port(msg)
            .execute()
            .await
            .map_err(nl_err(format!("turn on hairpin mode on link #{index}")))
    }

    /// Deletes a link by name; Ok(false) when it did not exist.
    pub async fn delete_link(&self, name: &str) -> Result<bool, LinkError> {
        let Some(link) = self.link(name).await? else {
            return Ok(false);
        };
        match self.handle.clone().link().del(link.index).execute().await {
            Ok(()) => Ok(true),
            Err(e) if errno_of(&e) == Some(libc::ENODEV) => Ok(false),
            Err(e) => Err(nl_err(format!("delete link {name}"))(e)),
        }
    }

    /// Adds `ip/prefix` to a link; an address that is already there is fine.
    pub async fn add_address(&self, index: u32, ip: Ipv4Addr, prefix: u8) -> Result<(), LinkError> {
        match self
            .handle
            .address()
            .add(index, IpAddr::V4(ip), prefix)
            .execute()
            .await
        {
            Ok(()) => Ok(()),
            Err(e) if errno_of(&e) == Some(libc::EEXIST) => Ok(()),
            Err(e) => Err(nl_err(format!(
                "add address {ip}/{prefix} to link #{index}"
            ))(e)),
        }
    }

    /// Removes `ip/prefix` from a link; an address that is already gone is fine.
    pub async fn delete_address(
        &self,
        index: u32,
        ip: Ipv4Addr,
        prefix: u8,
    ) -> Result<(), LinkError> {
        let mut msg = netlink_packet_route::address::AddressMessage::default();
        msg.header.family = AddressFamily::Inet;
        msg.header.prefix_len = prefix;
        msg.header.index = index;
        msg.attributes.push(AddressAttribute::Local(IpAddr::V4(ip)));
        msg.attributes
            .push(AddressAttribute::Address(IpAddr::V4(ip)));
        match self.handle.address().del(msg).execute().await {
            Ok(()) => Ok(()),
            Err(e) if errno_of(&e) == Some(libc::EADDRNOTAVAIL) => Ok(()),
            Err(e) => Err(nl_err(format!(
                "delete address {ip}/{prefix} from link #{index}"
            ))(e)),
        }
    }

    pub async fn addresses(&self, index: u32) -> Result<Vec<(Ipv4Addr, u8)>, LinkError> {
        let msgs: Vec<_> = self
            .handle
            .address()
            .get()
            .set_link_index_filter(index)
            .execute()
            .try_collect()
            .await
            .map_err(nl_err(format!("list addresses of link #{index}")))?;
        Ok(msgs
            .iter()
            .filter(|m| m.header.index == index)
            .flat_map(|m| {
                m.attributes.iter().filter_map(move |a| match a {
                    AddressAttribute::Address(IpAddr::V4(ip)) => Some((*ip, m.header.prefix_len)),
                    _ => None,
                })
            })
            .collect())
    }

    /// Adds or replaces an IPv4 route in the main table.
    pub async fn replace_route(&self, route: RouteMessage, what: &str) -> Result<(), LinkError> {
        self.handle
            .route()
            .add(route)
            .replace()
            .execute()
            .await
            .map_err(nl_err(what.to_string()))
    }

    /// The default route through `gw` via link `index`.
    pub async fn replace_default_route(&self, index: u32, gw: Ipv4Addr) -> Result<(), LinkError> {
        let route = RouteMessageBuilder::<Ipv4Addr>::new()
            .output_interface(index)
            .gateway(gw)
            .build();
        self.replace_route(route, &format!("add default route via {gw}"))
            .await
    }

    pub async fn routes(&self) -> Result<Vec<Route4>, LinkError> {
        let msgs: Vec<RouteMessage> = self
            .handle
            .route()
            .get(RouteMessageBuilder::<Ipv4Addr>::new().build())
            .execute()
            .try_collect()
            .await
            .map_err(nl_err("list routes"))?;
        Ok(msgs
            .into_iter()
            .filter(|m| m.header.address_family == AddressFamily::Inet)
            .map(|m| {
                let mut r = Route4 {
                    dst: Ipv4Addr::UNSPECIFIED,
                    prefix: m.header.destination_prefix_length,
                    gateway: None,
                    oif: None,
                    protocol: m.header.protocol,
                    table: u32::from(m.header.table),
                    message: m.clone(),
                };
                for attr in &m.attributes {
                    match attr {
                        RouteAttribute::Destination(RouteAddress::Inet(ip)) => r.dst = *ip,
                        RouteAttribute::Gateway(RouteAddress::Inet(ip)) => r.gateway = Some(*ip),
                        RouteAttribute::Oif(i) => r.oif = Some(*i),
                        RouteAttribute::Table(t) => r.table = *t,
                        _ => {}
                    }
                }
                r
            })
            .collect())
    }

    pub async fn delete_route(&self, route: &Route4) -> Result<(), LinkError> {
        match self
            .handle
            .route()
            .del(route.message.clone())
            .execute()
            .await
        {
            Ok(()) => Ok(()),
            Err(e) if errno_of(&e) == Some(libc::ESRCH) => Ok(()),
            Err(e) => Err(nl_err(format!(
                "delete route {}/{}",
                route.dst, route.prefix
            ))(e)),
        }
    }

    /// Neighbour (`AF_INET`) or FDB (`AF_BRIDGE`) entries on link `index`.
    pub async fn neighbours(
        &self,
        index: u32,
        bridge_family: bool,
    ) -> Result<Vec<Neigh>, LinkError> {
        let mut req = self.handle.neighbours().get();
        req.message_mut().header.family = if bridge_family {
            AddressFamily::Bridge
        } else {
            AddressFamily::Inet
        };
        req.message_mut().header.ifindex = index;
        let msgs: Vec<NeighbourMessage> = req
            .execute()
            .try_collect()
            .await
            .map_err(nl_err("list neighbours"))?;
        Ok(msgs
            .into_iter()
            .filter(|m| m.header.ifindex == index)
            .map(|m| {
                let mut n = Neigh {
                    ip: None,
                    mac: None,
                    message: m.clone(),
                };
                for attr in &m.attributes {
                    match attr {
                        NeighbourAttribute::Destination(NeighbourAddress::Inet(ip)) => {
                            n.ip = Some(*ip)
                        }
                        // FDB entries (AF_BRIDGE) carry the VTEP's IPv4 address as raw bytes.
                        NeighbourAttribute::Destination(NeighbourAddress::Other(b))
                            if b.len() == 4 =>
                        {
                            n.ip = Some(Ipv4Addr::new(b[0], b[1], b[2], b[3]))
                        }
                        NeighbourAttribute::LinkLocalAddress(a) if a.len() == 6 => {
                            let mut mac = [0u8; 6];
                            mac.copy_from_slice(a);
                            n.mac = Some(mac);
                        }
                        _ => {}
                    }
                }
                n
            })
            .collect())
    }

    /// `ip neigh replace <ip> lladdr <mac> dev <index> nud permanent`.
    pub async fn replace_neighbour(
        &self,
        index: u32,
        ip: Ipv4Addr,
        mac: [u8; 6],
    ) -> Result<(), LinkError> {
        self.handle
            .neighbours()
            .add(index, IpAddr::V4(ip))
            .link_local_address(&mac)
            .replace()
            .execute()
            .await
            .map_err(nl_err(format!("set neighbour {ip} -> {}", format_mac(mac))))
    }

    /// `bridge fdb replace <mac> dev <index> dst <remote> self permanent`.
    pub async fn replace_fdb(
        &self,
        index: u32,
        mac: [u8; 6],
        remote: Ipv4Addr,
    ) -> Result<(), LinkError> {
        self.handle
            .neighbours()
            .add_bridge(index, &mac)
            .flags(NeighbourFlags::Own)
            .destination(IpAddr::V4(remote))
            .replace()
            .execute()
            .await
            .map_err(nl_err(format!("set fdb {} -> {remote}", format_mac(mac))))
    }

    pub async fn delete_neighbour(&self, n: &Neigh) -> Result<(), LinkError> {
        match self
            .handle
            .neighbours()
            .del(n.message.clone())
            .execute()
            .await
        {
            Ok(()) => Ok(()),
            Err(e) if errno_of(&e) == Some(libc::ENOENT) => Ok(()),
            Err(e) => Err(nl_err("delete neighbour")(e)),
        }
    }

    pub async fn add_link(&self, msg: LinkMessage, what: &str) -> Result<(), LinkError> {
        match self.handle.link().add(msg).execute().await {
            Ok(()) => Ok(()),
            Err(e) if errno_of(&e) == Some(libc::EEXIST) => Ok(()),
            Err(e) => Err(nl_err(what.to_string())(e)),
        }
    }

    pub async fn set_link(&self, msg: LinkMessage, what: &str) -> Result<(), LinkError> {
        self.handle
            .link()
            .set(msg)
            .execute()
            .await
            .map_err(nl_err(what.to_string()))
    }
}

/// Whether a link kind reported by the kernel is `kind`.
pub(crate) fn is_kind(link: &Link, kind: InfoKind) -> bool {
    link.kind.as_deref() == Some(kind.to_string().as_str())
}
