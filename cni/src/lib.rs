//! Windlass's CNI plugin and node network agent.
//!
//! - [`run`]: one CNI invocation (ADD, DEL, CHECK, VERSION, GC, STATUS) as the `windlass-cni` binary does it:
//!   a node bridge, a veth pair per pod, host-local style IPAM under `dataDir`, masquerade in the nftables table
//!   `windlass-cni`.
//! - [`NodeRoutes`]: converges the routes to other nodes' pod CIDRs (`host-gw`, or flannel-style `vxlan`).
//! - [`write_conflist`]: the node's CNI configuration from its pod CIDR.

mod conflist;
mod ipam;
mod masq;
mod netlink;
mod plugin;
mod routes;
mod spec;

pub use conflist::{
    conflist_json, write_conflist, ConflistError, ConflistOptions, CONFLIST_FILE, NETWORK_NAME,
};
pub use ipam::{Ipam, IpamError};
pub use masq::{
    chain_name as masquerade_chain_name, ensure_masquerade, remove_masquerade, MasqError,
    TABLE as NFT_TABLE,
};
pub use netlink::LinkError;
pub use plugin::{
    garbage_collect, host_veth_name, release_leaked, run, GcReport, PluginEnv, PluginOutput,
    HOST_VETH_PREFIX,
};
pub use routes::{
    run_agent, vtep_mac, NodeEvent, NodeNet, NodeRoutes, NodeSource, ReconcileReport, RoutesError,
    ROUTE_PROTOCOL, VXLAN_DEVICE, VXLAN_PORT, VXLAN_VNI,
};
pub use spec::{
    Attachment, CniError, CniErrorReply, CniResult, ErrorCode, Mode, NetConf, CNI_VERSION,
    DEFAULT_BRIDGE, DEFAULT_CLUSTER_CIDR, DEFAULT_DATA_DIR, SUPPORTED_VERSIONS,
};
