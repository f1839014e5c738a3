//! Windlass's CNI plugin and node network agent.
//!
//! - [`run`]: one CNI invocation (ADD, DEL, CHECK, VERSION, GC, STATUS) as the `windlass-cni` binary does it:
//!   a node bridge, a veth pair per pod, host-local style IPAM under `dataDir`, masquerade in the nftables table
//!   `windlass-cni`.
//! - [`NodeRoutes`]: converges the routes to other nodes' pod CIDRs (`host-gw`, or flannel-style `vxlan`);
//!   [`run_agent`] drives it from any [`NodeSource`]: `windlass-cni daemon` watches Node objects on the API
//!   server ([`KubeNodeSource`]), or follows a nodes file ([`FileNodeSource`]).
//! - [`write_conflist`]: the node's CNI configuration from its pod CIDR (the daemon writes it once the node has one).
//!
//! Network configuration (the contract the kubelet and lab scripts rely on):
//!
//! ```json
//! {
//!   "cniVersion": "1.0.0", "name": "windlass", "type": "windlass-cni",
//!   "bridge": "windlass0",            // default
//!   "subnet": "10.244.1.0/24",        // required: the node's pod CIDR; .1 is the gateway on the bridge
//!   "dataDir": "/var/lib/windlass/cni", // default; IPAM state in <dataDir>/<name>/
//!   "mtu": 1450,                      // optional: bridge, veth and pod MTU
//!   "mode": "host-gw",                // or "vxlan": read by the node agent, recorded by the plugin
//!   "ipMasq": true,                   // default: masquerade pod traffic leaving clusterCIDR
//!   "clusterCIDR": "10.244.0.0/16"    // default
//! }
//! ```
//!
//! Error codes: the spec's 1-7, 11 and 50, plus 100 (no free address in the subnet) and 101 (CHECK found the
//! attachment different from `prevResult`).

mod agent;
mod conflist;
mod ipam;
mod kube_source;
mod masq;
mod netlink;
mod plugin;
mod routes;
mod spec;

pub use agent::{read_nodes_file, run_daemon, FileNodeSource, NodesFileError, WithConflist};
pub use conflist::{
    conflist_json, write_conflist, ConflistError, ConflistOptions, CONFLIST_FILE, NETWORK_NAME,
};
pub use ipam::{Ipam, IpamError};
pub use kube_source::{node_net, KubeNodeSource, KubeSourceError};
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
