//! The nftables ruleset: computed from the [`Model`] as flat named maps, rendered as `nft -f` scripts.
//!
//! # Design
//!
//! Everything lives in one table, [`TABLE`] (family `ip`). Upstream kube-proxy's nftables mode builds a chain per
//! Service and per endpoint; that grows much faster than linearly (98 s to load 10k Services × 5 endpoints here, see
//! `/work/shared/notes/nftables-scaling.md`). This table instead has a fixed set of chains and keeps per-Service
//! state in named maps, so a full sync is a bulk element load and a change is a few element adds/deletes:
//!
//! * A *frontend* is what a client connects to: `ClusterIP . proto . port`, `externalIP . proto . port`, or a
//!   NodePort `proto . port` on a node address. `service-ips` / `service-nodeports` map a frontend to a verdict
//!   `goto svc-<flavor>-<N>` / `goto np-<flavor>-<N>`, where `N` is the frontend's number of usable endpoints.
//! * **Endpoint choice is exactly uniform.** Chain `svc-<flavor>-<N>` DNATs with
//!   `ip daddr . meta l4proto . th dport . numgen random mod N` looked up in `service-endpoints-<proto>`, holding the
//!   slots `0..N` of that frontend, one per endpoint. So each of 3 endpoints gets exactly 1/3 of new connections
//!   (the notes' 16-fixed-slots design is up to 33% uneven for 5 endpoints). There is one chain per (flavor, N)
//!   actually in use, not per Service: a cluster whose Services have 1–50 endpoints has at most a few hundred
//!   small chains however many Services it has.
//! * The *flavor* decides masquerading: `cip` (ClusterIP: mark for masquerade when the source is outside the
//!   cluster CIDR), `masq` (externalIP/NodePort with `externalTrafficPolicy: Cluster`: always), `local`
//!   (`externalTrafficPolicy: Local`: never, so the endpoint sees the client's address). Marking sets bit
//!   [`MASQUERADE_MARK`] (upstream's 0x4000) and `nat-postrouting` masquerades marked packets, clearing the bit.
//! * **Hairpin**: a pod reaching itself through its Service must be masqueraded, or it would answer itself
//!   directly. After DNAT, `nat-postrouting` masquerades `ip saddr . ip daddr` found in `hairpin-endpoints`, which
//!   holds `ep . ep` for every endpoint on this node (or of unknown node): one flat set, no per-endpoint chain.
//! * **Session affinity** (`ClientIP`): every select chain first tries `dnat` via the dynamic map `affinity`
//!   (`client . frontend : endpoint . port`, per-element timeout). The choice is recorded after DNAT, in filter
//!   chains at priority `dstnat + 10` on new connections: `affinity-services` / `affinity-nodeports` map the
//!   connection's *original* destination (`ct original ...`) to `goto affinity-<timeout>`, which `update`s the map.
//!   The map survives periodic resyncs (only a start-up rebuild or `--cleanup` drops it).
//! * **Pods and `externalTrafficPolicy: Local`**: as upstream does, pods (source in the cluster CIDR) reaching an
//!   externalIP or NodePort of such a Service are not "external": `local-policy-pod-ips` / `-nodeports`, checked
//!   first, send them to any endpoint (chains `svcpod-<N>` / `nppod-<N>`, maps `pod-*endpoints-<proto>`).
//! * **No endpoints**: `no-endpoint-services` / `no-endpoint-nodeports` map such frontends to `goto reject-service`
//!   (TCP reset, ICMP port unreachable otherwise), checked on new connections in input/forward/output at priority
//!   [`FILTER_PRIORITY`] so clients fail at once instead of timing out; a frontend whose endpoints all live on other
//!   nodes while its traffic policy is Local gets `drop`, as upstream does.
//!
//! Hooks: `nat-prerouting` and `nat-output` (node-local clients) at `dstnat` jump to `services`;
//! `nat-postrouting` at `srcnat` jumps to `masquerading`; `filter-input`/`filter-forward`/`filter-output` at
//! [`FILTER_PRIORITY`] jump to `no-endpoints`; `affinity-prerouting`/`affinity-output` at `dstnat + 10` (-90) jump to
//! `affinity-record`.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::net::Ipv4Addr;

use ipnet::Ipv4Net;

use crate::model::{Backend, Model, Protocol, Service, ServiceName, TrafficPolicy};

/// The one table the proxy owns (family `ip`). Nothing outside it is ever changed.
pub const TABLE: &str = "windlass-proxy";
/// The nftables family of [`TABLE`].
pub const FAMILY: &str = "ip";
/// Packet mark bit meaning "masquerade this connection in postrouting". Same bit as upstream kube-proxy.
pub const MASQUERADE_MARK: u32 = 0x4000;
/// Priority of the no-endpoint reject chains: before ordinary filter chains (0) and before DNAT in output, as
/// upstream's nftables mode (`filter - 110`... expressed as -110) does, so a reject wins over a later accept.
pub const FILTER_PRIORITY: i32 = -110;
/// Priority of the DNAT chains (`dstnat`; nft only accepts the keyword in prerouting, so numbers are used).
pub const DSTNAT_PRIORITY: i32 = -100;
/// Priority of the masquerading chain (`srcnat`).
pub const SRCNAT_PRIORITY: i32 = 100;
/// Priority of the affinity-recording chains: just after DNAT, when the packet carries the endpoint's address and
/// the conntrack entry the original one.
pub const AFFINITY_RECORD_PRIORITY: i32 = DSTNAT_PRIORITY + 10;
/// Maximum number of live affinity entries (client × Service).
pub const AFFINITY_MAP_SIZE: u32 = 1_048_576;

// Chain names (documented constants: operators and tests grep for them).
pub const CHAIN_NAT_PREROUTING: &str = "nat-prerouting";
pub const CHAIN_NAT_OUTPUT: &str = "nat-output";
pub const CHAIN_NAT_POSTROUTING: &str = "nat-postrouting";
pub const CHAIN_FILTER_INPUT: &str = "filter-input";
pub const CHAIN_FILTER_FORWARD: &str = "filter-forward";
pub const CHAIN_FILTER_OUTPUT: &str = "filter-output";
pub const CHAIN_AFFINITY_PREROUTING: &str = "affinity-prerouting";
pub const CHAIN_AFFINITY_OUTPUT: &str = "affinity-output";
pub const CHAIN_SERVICES: &str = "services";
pub const CHAIN_MASQUERADING: &str = "masquerading";
pub const CHAIN_NO_ENDPOINTS: &str = "no-endpoints";
pub const CHAIN_REJECT: &str = "reject-service";
pub const CHAIN_AFFINITY_RECORD: &str = "affinity-record";

// Map and set names.
pub const MAP_SERVICE_IPS: &str = "service-ips";
pub const MAP_SERVICE_NODEPORTS: &str = "service-nodeports";
/// Endpoint slots of address frontends, one map per protocol (see [`ELEMENT_MAPS`] for why).
pub const MAP_SERVICE_ENDPOINTS: [&str; 3] = [
    "service-endpoints-tcp",
    "service-endpoints-udp",
    "service-endpoints-sctp",
];
/// Endpoint slots of NodePorts, one map per protocol.
pub const MAP_NODEPORT_ENDPOINTS: [&str; 3] = [
    "nodeport-endpoints-tcp",
    "nodeport-endpoints-udp",
    "nodeport-endpoints-sctp",
];

/// `externalTrafficPolicy: Local` frontends → select chain over *all* endpoints, for clients that are pods: they
/// are not "external", so upstream sends them to any endpoint rather than dropping them on a node without one.
pub const MAP_POD_SHORTCUT_IPS: &str = "local-policy-pod-ips";
pub const MAP_POD_SHORTCUT_NODEPORTS: &str = "local-policy-pod-nodeports";
/// Endpoint slots of those shortcuts, per protocol.
pub const MAP_POD_SHORTCUT_ENDPOINTS: [&str; 3] = [
    "pod-endpoints-tcp",
    "pod-endpoints-udp",
    "pod-endpoints-sctp",
];
pub const MAP_POD_SHORTCUT_NODEPORT_ENDPOINTS: [&str; 3] = [
    "pod-nodeport-endpoints-tcp",
    "pod-nodeport-endpoints-udp",
    "pod-nodeport-endpoints-sctp",
];

fn proto_index(p: Protocol) -> usize {
    match p {
        Protocol::Tcp => 0,
        Protocol::Udp => 1,
        Protocol::Sctp => 2,
    }
}
pub const MAP_NO_ENDPOINT_SERVICES: &str = "no-endpoint-services";
pub const MAP_NO_ENDPOINT_NODEPORTS: &str = "no-endpoint-nodeports";
pub const MAP_AFFINITY_SERVICES: &str = "affinity-services";
pub const MAP_AFFINITY_NODEPORTS: &str = "affinity-nodeports";
pub const MAP_AFFINITY: &str = "affinity";
pub const SET_HAIRPIN: &str = "hairpin-endpoints";
pub const SET_NODEPORT_ADDRESSES: &str = "nodeport-addresses";

/// The maps whose elements the proxy computes, with their declarations (`typeof` keeps nft's type checks).
///
/// nft 1.0.6 cannot read back a `typeof` *value* of `ip daddr . th dport` from the kernel (it reports "conflicting
/// protocols ip vs. th" and then rejects every later rule using the map). A value typed `ip daddr . tcp dport` reads
/// back fine but makes nft add a `meta l4proto tcp` dependency to the DNAT rule, so there is one endpoint map per
/// protocol, each DNAT rule guarded by its protocol.
const ELEMENT_MAPS: &[(&str, &str, &str)] = &[
    (
        "map",
        MAP_SERVICE_IPS,
        "typeof ip daddr . meta l4proto . th dport : verdict ;",
    ),
    (
        "map",
        MAP_SERVICE_NODEPORTS,
        "typeof meta l4proto . th dport : verdict ;",
    ),
    (
        "map",
        MAP_SERVICE_ENDPOINTS[0],
        "typeof ip daddr . meta l4proto . th dport . numgen random mod 1 : ip daddr . tcp dport ;",
    ),
    (
        "map",
        MAP_SERVICE_ENDPOINTS[1],
        "typeof ip daddr . meta l4proto . th dport . numgen random mod 1 : ip daddr . udp dport ;",
    ),
    (
        "map",
        MAP_SERVICE_ENDPOINTS[2],
        "typeof ip daddr . meta l4proto . th dport . numgen random mod 1 : ip daddr . sctp dport ;",
    ),
    (
        "map",
        MAP_NODEPORT_ENDPOINTS[0],
        "typeof meta l4proto . th dport . numgen random mod 1 : ip daddr . tcp dport ;",
    ),
    (
        "map",
        MAP_NODEPORT_ENDPOINTS[1],
        "typeof meta l4proto . th dport . numgen random mod 1 : ip daddr . udp dport ;",
    ),
    (
        "map",
        MAP_NODEPORT_ENDPOINTS[2],
        "typeof meta l4proto . th dport . numgen random mod 1 : ip daddr . sctp dport ;",
    ),
    (
        "map",
        MAP_NO_ENDPOINT_SERVICES,
        "typeof ip daddr . meta l4proto . th dport : verdict ;",
    ),
    (
        "map",
        MAP_NO_ENDPOINT_NODEPORTS,
        "typeof meta l4proto . th dport : verdict ;",
    ),
    (
        "map",
        MAP_AFFINITY_SERVICES,
        "typeof ip daddr . meta l4proto . th dport : verdict ;",
    ),
    (
        "map",
        MAP_AFFINITY_NODEPORTS,
        "typeof meta l4proto . th dport : verdict ;",
    ),
    ("set", SET_HAIRPIN, "typeof ip saddr . ip daddr ;"),
    (
        "map",
        MAP_POD_SHORTCUT_IPS,
        "typeof ip daddr . meta l4proto . th dport : verdict ;",
    ),
    (
        "map",
        MAP_POD_SHORTCUT_NODEPORTS,
        "typeof meta l4proto . th dport : verdict ;",
    ),
    (
        "map",
        MAP_POD_SHORTCUT_ENDPOINTS[0],
        "typeof ip daddr . meta l4proto . th dport . numgen random mod 1 : ip daddr . tcp dport ;",
    ),
    (
        "map",
        MAP_POD_SHORTCUT_ENDPOINTS[1],
        "typeof ip daddr . meta l4proto . th dport . numgen random mod 1 : ip daddr . udp dport ;",
    ),
    (
        "map",
        MAP_POD_SHORTCUT_ENDPOINTS[2],
        "typeof ip daddr . meta l4proto . th dport . numgen random mod 1 : ip daddr . sctp dport ;",
    ),
    (
        "map",
        MAP_POD_SHORTCUT_NODEPORT_ENDPOINTS[0],
        "typeof meta l4proto . th dport . numgen random mod 1 : ip daddr . tcp dport ;",
    ),
    (
        "map",
        MAP_POD_SHORTCUT_NODEPORT_ENDPOINTS[1],
        "typeof meta l4proto . th dport . numgen random mod 1 : ip daddr . udp dport ;",
    ),
    (
        "map",
        MAP_POD_SHORTCUT_NODEPORT_ENDPOINTS[2],
        "typeof meta l4proto . th dport . numgen random mod 1 : ip daddr . sctp dport ;",
    ),
];

const PROTOCOLS: [Protocol; 3] = [Protocol::Tcp, Protocol::Udp, Protocol::Sctp];

/// Node-wide settings the ruleset depends on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RulesetConfig {
    /// This node's name: endpoints with this `nodeName` are local.
    pub node_name: String,
    /// Pod CIDR of the cluster: ClusterIP traffic from outside it is masqueraded.
    pub cluster_cidr: Ipv4Net,
    /// Addresses NodePorts answer on; empty means every local address except 127.0.0.0/8 (`fib daddr type local`).
    pub nodeport_addresses: Vec<Ipv4Net>,
}

/// Masquerading behaviour of a frontend (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Flavor {
    ClusterIp,
    Masquerade,
    Local,
}

impl Flavor {
    fn name(self) -> &'static str {
        match self {
            Flavor::ClusterIp => "cip",
            Flavor::Masquerade => "masq",
            Flavor::Local => "local",
        }
    }
}

/// Where a frontend listens.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum FrontendAddr {
    Ip(Ipv4Addr),
    NodePort,
}

/// A frontend with its protocol and port; the identity used for UDP conntrack cleanup.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) struct Frontend {
    pub addr: FrontendAddr,
    pub protocol: Protocol,
    pub port: u16,
}

impl Frontend {
    fn key(&self) -> String {
        match self.addr {
            FrontendAddr::Ip(ip) => format!("{ip} . {} . {}", self.protocol.nft_name(), self.port),
            FrontendAddr::NodePort => format!("{} . {}", self.protocol.nft_name(), self.port),
        }
    }
}

/// One map element with the number of Services that want it (hairpin entries and chains can be shared).
#[derive(Debug, Clone, PartialEq, Eq)]
struct Elem {
    value: String,
    refs: u32,
}

/// What one Service contributes to the table. Kept per Service so a change recomputes only that Service.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct Fragment {
    elements: Vec<(&'static str, String, String)>,
    chains: Vec<(String, Vec<String>)>,
    udp: Vec<(Frontend, BTreeSet<Ipv4Addr>)>,
    health: Option<(u16, usize)>,
    /// Endpoint addresses, turned into `hairpin-endpoints` elements once the fragment is complete.
    hairpin: BTreeSet<Ipv4Addr>,
}

/// The complete desired state of the table's contents, kept in memory between syncs and updated per Service.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Ruleset {
    /// Map/set name → element key → value ("" for sets) and reference count.
    maps: BTreeMap<&'static str, BTreeMap<String, Elem>>,
    /// Dynamically needed chains (select and affinity chains) → their rules and reference count.
    chains: BTreeMap<String, (Vec<String>, u32)>,
    fragments: BTreeMap<ServiceName, Fragment>,
    /// UDP frontends → endpoint addresses, for conntrack cleanup when an endpoint goes away.
    pub(crate) udp_backends: BTreeMap<Frontend, BTreeSet<Ipv4Addr>>,
    /// healthCheckNodePort → (Service, number of local endpoints).
    pub(crate) health_checks: BTreeMap<u16, (ServiceName, usize)>,
}

/// What an [`Ruleset::update`] touched, with the state before it: enough to render the incremental transaction and
/// to find stale UDP flows, without comparing whole rulesets.
#[derive(Debug, Default)]
pub struct Changes {
    elements: BTreeMap<(&'static str, String), Option<String>>,
    chains: BTreeMap<String, bool>,
    pub(crate) udp: BTreeMap<Frontend, BTreeSet<Ipv4Addr>>,
}

/// Sizes of a ruleset, exported as metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RulesetStats {
    pub elements: usize,
    pub chains: usize,
    pub frontends: usize,
}

impl Ruleset {
    /// Computes the desired ruleset for `model` on the node described by `config`.
    pub fn compute(model: &Model, config: &RulesetConfig) -> Self {
        let mut rs = Ruleset::default();
        for (_, name, _) in ELEMENT_MAPS {
            rs.maps.insert(name, BTreeMap::new());
        }
        for svc in model.services() {
            let frag = build_fragment(svc, model, config);
            rs.add_fragment(svc.name.clone(), frag, None);
        }
        rs
    }

    /// Recomputes only the `dirty` Services (changed, added or deleted) and returns what changed.
    pub fn update<'a>(
        &mut self,
        model: &Model,
        config: &RulesetConfig,
        dirty: impl IntoIterator<Item = &'a ServiceName>,
    ) -> Changes {
        let mut changes = Changes::default();
        for name in dirty {
            if let Some(old) = self.fragments.remove(name) {
                self.remove_fragment(name, old, &mut changes);
            }
            if let Some(svc) = model.service(name) {
                let frag = build_fragment(svc, model, config);
                self.add_fragment(name.clone(), frag, Some(&mut changes));
            }
        }
        changes
    }

    fn add_fragment(
        &mut self,
        name: ServiceName,
        frag: Fragment,
        mut changes: Option<&mut Changes>,
    ) {
        for (map, key, value) in &frag.elements {
            let m = self.maps.entry(map).or_default();
            if let Some(c) = changes.as_deref_mut() {
                c.elements
                    .entry((*map, key.clone()))
                    .or_insert_with(|| m.get(key).map(|e| e.value.clone()));
            }
            match m.get_mut(key) {
                Some(e) => {
                    e.refs += 1;
                    e.value.clone_from(value);
                }
                None => {
                    m.insert(
                        key.clone(),
                        Elem {
                            value: value.clone(),
                            refs: 1,
                        },
                    );
                }
            }
        }
        for (chain, rules) in &frag.chains {
            if let Some(c) = changes.as_deref_mut() {
                c.chains
                    .entry(chain.clone())
                    .or_insert_with(|| self.chains.contains_key(chain));
            }
            self.chains
                .entry(chain.clone())
                .or_insert_with(|| (rules.clone(), 0))
                .1 += 1;
        }
        for (fe, eps) in &frag.udp {
            if let Some(c) = changes.as_deref_mut() {
                c.udp
                    .entry(*fe)
                    .or_insert_with(|| self.udp_backends.get(fe).cloned().unwrap_or_default());
            }
            self.udp_backends.insert(*fe, eps.clone());
        }
        if let Some((port, local)) = frag.health {
            self.health_checks.insert(port, (name.clone(), local));
        }
        self.fragments.insert(name, frag);
    }

    fn remove_fragment(&mut self, name: &ServiceName, frag: Fragment, changes: &mut Changes) {
        for (map, key, _) in frag.elements {
            let Some(m) = self.maps.get_mut(map) else {
                continue;
            };
            changes
                .elements
                .entry((map, key.clone()))
                .or_insert_with(|| m.get(&key).map(|e| e.value.clone()));
            if let Some(e) = m.get_mut(&key) {
                e.refs = e.refs.saturating_sub(1);
                if e.refs == 0 {
                    m.remove(&key);
                }
            }
        }
        for (chain, _) in frag.chains {
            changes
                .chains
                .entry(chain.clone())
                .or_insert_with(|| self.chains.contains_key(&chain));
            if let Some(c) = self.chains.get_mut(&chain) {
                c.1 = c.1.saturating_sub(1);
                if c.1 == 0 {
                    self.chains.remove(&chain);
                }
            }
        }
        for (fe, _) in frag.udp {
            changes
                .udp
                .entry(fe)
                .or_insert_with(|| self.udp_backends.get(&fe).cloned().unwrap_or_default());
            self.udp_backends.remove(&fe);
        }
        if let Some((port, _)) = frag.health {
            if self
                .health_checks
                .get(&port)
                .is_some_and(|(n, _)| n == name)
            {
                self.health_checks.remove(&port);
            }
        }
    }

    /// Endpoints that affinity frontends lost in `changes`: `(frontend key, "ip . port")`. Affinity entries still
    /// pinning clients to them must go, or those clients would be sent to a dead endpoint until the timeout.
    pub(crate) fn lost_affinity_endpoints(&self, changes: &Changes) -> Vec<(String, String)> {
        let mut lost = Vec::new();
        for ((map, key), old) in &changes.elements {
            let Some(old) = old else { continue };
            let (ep_map_of, affinity_map) = if MAP_SERVICE_ENDPOINTS.contains(map)
                || MAP_POD_SHORTCUT_ENDPOINTS.contains(map)
            {
                (*map, MAP_AFFINITY_SERVICES)
            } else if MAP_NODEPORT_ENDPOINTS.contains(map)
                || MAP_POD_SHORTCUT_NODEPORT_ENDPOINTS.contains(map)
            {
                (*map, MAP_AFFINITY_NODEPORTS)
            } else {
                continue;
            };
            let Some((frontend, _slot)) = key.rsplit_once(" . ") else {
                continue;
            };
            if !self
                .maps
                .get(affinity_map)
                .is_some_and(|m| m.contains_key(frontend))
                && !changes
                    .elements
                    .contains_key(&(affinity_map, frontend.to_string()))
            {
                continue;
            }
            let still_there = self.maps.get(ep_map_of).is_some_and(|m| {
                (0..)
                    .map_while(|slot| m.get(&format!("{frontend} . {slot}")))
                    .any(|e| e.value == *old)
            });
            if !still_there {
                lost.push((frontend.to_string(), old.clone()));
            }
        }
        lost.sort();
        lost.dedup();
        lost
    }

    pub fn stats(&self) -> RulesetStats {
        let len = |m: &str| self.maps.get(m).map_or(0, BTreeMap::len);
        RulesetStats {
            elements: self.maps.values().map(BTreeMap::len).sum(),
            chains: self.chains.len() + static_chains_count(),
            frontends: len(MAP_SERVICE_IPS)
                + len(MAP_SERVICE_NODEPORTS)
                + len(MAP_NO_ENDPOINT_SERVICES)
                + len(MAP_NO_ENDPOINT_NODEPORTS),
        }
    }

    /// A script that replaces the whole table atomically: deletes it (if present) and creates it from scratch.
    /// Used at start-up and after a failed sync, when nothing about the kernel's state can be assumed.
    pub fn render_rebuild(&self, config: &RulesetConfig) -> String {
        let mut s = String::with_capacity(self.estimated_len());
        let _ = writeln!(s, "add table {FAMILY} {TABLE}");
        let _ = writeln!(s, "delete table {FAMILY} {TABLE}");
        let _ = writeln!(s, "add table {FAMILY} {TABLE}");
        declare_objects(&mut s, config);
        for name in self.chains.keys() {
            let _ = writeln!(s, "add chain {FAMILY} {TABLE} {name}");
        }
        static_rules(&mut s, config);
        self.dynamic_rules(&mut s, self.chains.keys());
        self.add_elements(&mut s);
        s
    }

    /// A script that rewrites every object's contents in place (repairing drift) but keeps the table, and with it
    /// the dynamic affinity map. Only valid while the kernel holds this ruleset's chains (the last sync succeeded).
    pub fn render_resync(&self, config: &RulesetConfig) -> String {
        let mut s = String::with_capacity(self.estimated_len());
        let _ = writeln!(s, "add table {FAMILY} {TABLE}");
        declare_objects(&mut s, config);
        for (_, hook_chain, _) in static_chain_specs(config) {
            let _ = writeln!(s, "flush chain {FAMILY} {TABLE} {hook_chain}");
        }
        for (kind, name, _) in ELEMENT_MAPS {
            let _ = writeln!(s, "flush {kind} {FAMILY} {TABLE} {name}");
        }
        for name in self.chains.keys() {
            let _ = writeln!(s, "add chain {FAMILY} {TABLE} {name}");
            let _ = writeln!(s, "flush chain {FAMILY} {TABLE} {name}");
        }
        static_rules(&mut s, config);
        self.dynamic_rules(&mut s, self.chains.keys());
        self.add_elements(&mut s);
        s
    }

    /// The transaction for `changes` (from [`Self::update`]): new chains, element deletions and additions (a
    /// changed value is a delete plus an add), then chains no longer used. `None` when nothing changed.
    pub fn render_changes(&self, changes: &Changes) -> Option<String> {
        let mut s = String::new();
        let new_chains: Vec<&String> = changes
            .chains
            .iter()
            .filter(|(c, existed)| !**existed && self.chains.contains_key(*c))
            .map(|(c, _)| c)
            .collect();
        for name in &new_chains {
            let _ = writeln!(s, "add chain {FAMILY} {TABLE} {name}");
        }
        self.dynamic_rules(&mut s, new_chains.iter().copied());
        let mut deletes: BTreeMap<&str, Vec<(&String, Option<&String>)>> = BTreeMap::new();
        let mut adds: BTreeMap<&str, Vec<(&String, Option<&String>)>> = BTreeMap::new();
        for ((map, key), old) in &changes.elements {
            let now = self
                .maps
                .get(map)
                .and_then(|m| m.get(key))
                .map(|e| &e.value);
            if old.as_ref() == now {
                continue;
            }
            let is_map = ELEMENT_MAPS.iter().any(|(k, n, _)| n == map && *k == "map");
            if old.is_some() {
                deletes.entry(map).or_default().push((key, None));
            }
            if let Some(v) = now {
                adds.entry(map)
                    .or_default()
                    .push((key, is_map.then_some(v)));
            }
        }
        for (map, elems) in deletes {
            write_elements(&mut s, "delete", map, elems.into_iter());
        }
        for (map, elems) in adds {
            write_elements(&mut s, "add", map, elems.into_iter());
        }
        for (name, existed) in &changes.chains {
            if *existed && !self.chains.contains_key(name) {
                let _ = writeln!(s, "delete chain {FAMILY} {TABLE} {name}");
            }
        }
        (!s.is_empty()).then_some(s)
    }

    fn estimated_len(&self) -> usize {
        4096 + self.maps.values().map(|m| m.len() * 48).sum::<usize>()
    }

    fn dynamic_rules<'a>(&self, s: &mut String, chains: impl Iterator<Item = &'a String>) {
        for name in chains {
            for rule in self.chains.get(name).map(|c| &c.0).into_iter().flatten() {
                let _ = writeln!(s, "add rule {FAMILY} {TABLE} {name} {rule}");
            }
        }
    }

    fn add_elements(&self, s: &mut String) {
        for (kind, name, _) in ELEMENT_MAPS {
            let Some(m) = self.maps.get(name) else {
                continue;
            };
            let is_map = *kind == "map";
            write_elements(
                s,
                "add",
                name,
                m.iter().map(|(k, e)| (k, is_map.then_some(&e.value))),
            );
        }
    }
}

/// What `svc` contributes: its frontends, their endpoint slots, chains, rejects, affinity, UDP and health checks.
fn build_fragment(svc: &Service, model: &Model, config: &RulesetConfig) -> Fragment {
    let mut frag = Fragment::default();
    if svc.cluster_ips.is_empty() {
        return frag;
    }
    let mut local_addrs = BTreeSet::new();
    for port in &svc.ports {
        let all = model.backends(&svc.name, port, &config.node_name);
        let local: Vec<Backend> = all.iter().filter(|b| b.local).cloned().collect();
        local_addrs.extend(local.iter().map(|b| b.address));
        let (internal, internal_local) = match svc.internal_traffic_policy {
            TrafficPolicy::Cluster => (&all, false),
            TrafficPolicy::Local => (&local, true),
        };
        for ip in &svc.cluster_ips {
            frag.add_frontend(
                Frontend {
                    addr: FrontendAddr::Ip(*ip),
                    protocol: port.protocol,
                    port: port.port,
                },
                internal,
                Flavor::ClusterIp,
                svc.affinity_timeout,
                internal_local && !all.is_empty(),
                config.cluster_cidr,
            );
        }
        let (external, flavor, external_local) = match svc.external_traffic_policy {
            TrafficPolicy::Cluster => (&all, Flavor::Masquerade, false),
            TrafficPolicy::Local => (&local, Flavor::Local, true),
        };
        let external_frontends = svc
            .external_ips
            .iter()
            .map(|ip| (FrontendAddr::Ip(*ip), port.port))
            .chain(port.node_port.map(|np| (FrontendAddr::NodePort, np)));
        for (addr, port_number) in external_frontends {
            if external_local && !all.is_empty() {
                frag.add_pod_shortcut(
                    Frontend {
                        addr,
                        protocol: port.protocol,
                        port: port_number,
                    },
                    &all,
                    config.cluster_cidr,
                );
            }
            frag.add_frontend(
                Frontend {
                    addr,
                    protocol: port.protocol,
                    port: port_number,
                },
                external,
                flavor,
                svc.affinity_timeout,
                external_local && !all.is_empty(),
                config.cluster_cidr,
            );
        }
    }
    if svc.external_traffic_policy == TrafficPolicy::Local {
        if let Some(hc) = svc.health_check_node_port {
            frag.health = Some((hc, local_addrs.len()));
        }
    }
    for a in std::mem::take(&mut frag.hairpin) {
        frag.element(SET_HAIRPIN, format!("{a} . {a}"), String::new());
    }
    frag
}

impl Fragment {
    fn element(&mut self, map: &'static str, key: String, value: String) {
        self.elements.push((map, key, value));
    }

    fn chain(&mut self, name: String, rules: impl FnOnce() -> Vec<String>) {
        if !self.chains.iter().any(|(n, _)| *n == name) {
            let rules = rules();
            self.chains.push((name, rules));
        }
    }

    /// Pods reaching an `externalTrafficPolicy: Local` frontend use every endpoint, without masquerading (their
    /// source is in the cluster CIDR): chains `svcpod-<N>` / `nppod-<N>` over the `pod-*endpoints-*` maps.
    fn add_pod_shortcut(&mut self, fe: Frontend, backends: &[Backend], cluster_cidr: Ipv4Net) {
        let key = fe.key();
        let node_port = fe.addr == FrontendAddr::NodePort;
        let n = backends.len();
        let (chain, vmap, maps) = if node_port {
            (
                format!("nppod-{n}"),
                MAP_POD_SHORTCUT_NODEPORTS,
                &MAP_POD_SHORTCUT_NODEPORT_ENDPOINTS,
            )
        } else {
            (
                format!("svcpod-{n}"),
                MAP_POD_SHORTCUT_IPS,
                &MAP_POD_SHORTCUT_ENDPOINTS,
            )
        };
        self.chain(chain.clone(), || {
            select_rules(Flavor::Local, node_port, n, cluster_cidr, maps)
        });
        self.element(vmap, key.clone(), format!("goto {chain}"));
        for (slot, b) in backends.iter().enumerate() {
            self.element(
                maps[proto_index(fe.protocol)],
                format!("{key} . {slot}"),
                format!("{} . {}", b.address, b.port),
            );
            if b.maybe_local {
                self.hairpin.insert(b.address);
            }
        }
    }

    fn add_frontend(
        &mut self,
        fe: Frontend,
        backends: &[Backend],
        flavor: Flavor,
        affinity: Option<u32>,
        others_elsewhere: bool,
        cluster_cidr: Ipv4Net,
    ) {
        let key = fe.key();
        let node_port = fe.addr == FrontendAddr::NodePort;
        if fe.protocol == Protocol::Udp {
            self.udp
                .push((fe, backends.iter().map(|b| b.address).collect()));
        }
        if backends.is_empty() {
            let verdict = if others_elsewhere {
                "drop".to_string()
            } else {
                format!("goto {CHAIN_REJECT}")
            };
            let map = if node_port {
                MAP_NO_ENDPOINT_NODEPORTS
            } else {
                MAP_NO_ENDPOINT_SERVICES
            };
            self.element(map, key, verdict);
            return;
        }
        let n = backends.len();
        let chain = format!(
            "{}-{}-{n}",
            if node_port { "np" } else { "svc" },
            flavor.name()
        );
        self.chain(chain.clone(), || {
            select_chain_rules(flavor, node_port, n, cluster_cidr)
        });
        let (vmap, endpoints) = if node_port {
            (
                MAP_SERVICE_NODEPORTS,
                MAP_NODEPORT_ENDPOINTS[proto_index(fe.protocol)],
            )
        } else {
            (
                MAP_SERVICE_IPS,
                MAP_SERVICE_ENDPOINTS[proto_index(fe.protocol)],
            )
        };
        self.element(vmap, key.clone(), format!("goto {chain}"));
        for (slot, b) in backends.iter().enumerate() {
            self.element(
                endpoints,
                format!("{key} . {slot}"),
                format!("{} . {}", b.address, b.port),
            );
            // Only a pod on this node can reach itself through this node's rules, so remote endpoints need no
            // hairpin entry (upstream marks every endpoint; this keeps the set to the node's own pods).
            if b.maybe_local {
                self.hairpin.insert(b.address);
            }
        }
        if let Some(timeout) = affinity {
            let chain = format!("affinity-{timeout}");
            self.chain(chain.clone(), || affinity_chain_rules(timeout));
            let map = if node_port {
                MAP_AFFINITY_NODEPORTS
            } else {
                MAP_AFFINITY_SERVICES
            };
            self.element(map, key, format!("goto {chain}"));
        }
    }
}

/// Writes `<verb> element ip windlass-proxy <name> { ... }` in chunks, or nothing when there are no elements.
fn write_elements<'a>(
    s: &mut String,
    verb: &str,
    name: &str,
    elements: impl Iterator<Item = (&'a String, Option<&'a String>)>,
) {
    // Chunks keep single statements (and nft's per-statement memory) bounded; the batch stays one transaction.
    const CHUNK: usize = 8192;
    let mut n = 0;
    for (k, v) in elements {
        if n % CHUNK == 0 {
            if n > 0 {
                s.push_str(" }\n");
            }
            let _ = write!(s, "{verb} element {FAMILY} {TABLE} {name} {{ ");
        } else {
            s.push_str(", ");
        }
        s.push_str(k);
        if let Some(v) = v {
            s.push_str(" : ");
            s.push_str(v);
        }
        n += 1;
    }
    if n > 0 {
        s.push_str(" }\n");
    }
}

/// Declarations of every map, set and static chain (`add` is idempotent for identical definitions).
fn declare_objects(s: &mut String, config: &RulesetConfig) {
    for (kind, name, decl) in ELEMENT_MAPS {
        let _ = writeln!(s, "add {kind} {FAMILY} {TABLE} {name} {{ {decl} }}");
    }
    let _ = writeln!(
        s,
        "add map {FAMILY} {TABLE} {MAP_AFFINITY} {{ type ipv4_addr . ipv4_addr . inet_proto . inet_service : \
         ipv4_addr . inet_service ; flags dynamic,timeout ; timeout {}s ; size {AFFINITY_MAP_SIZE} ; }}",
        crate::model::DEFAULT_AFFINITY_TIMEOUT_SECONDS
    );
    if !config.nodeport_addresses.is_empty() {
        let _ = writeln!(
            s,
            "add set {FAMILY} {TABLE} {SET_NODEPORT_ADDRESSES} {{ type ipv4_addr ; flags interval ; }}"
        );
        let _ = writeln!(s, "flush set {FAMILY} {TABLE} {SET_NODEPORT_ADDRESSES}");
        let list: Vec<String> = config
            .nodeport_addresses
            .iter()
            .map(ToString::to_string)
            .collect();
        let _ = writeln!(
            s,
            "add element {FAMILY} {TABLE} {SET_NODEPORT_ADDRESSES} {{ {} }}",
            list.join(", ")
        );
    }
    for (spec, name, _) in static_chain_specs(config) {
        match spec {
            Some(spec) => {
                let _ = writeln!(s, "add chain {FAMILY} {TABLE} {name} {{ {spec} }}");
            }
            None => {
                let _ = writeln!(s, "add chain {FAMILY} {TABLE} {name}");
            }
        }
    }
}

/// The match selecting packets addressed to a NodePort address.
fn nodeport_match(config: &RulesetConfig) -> String {
    if config.nodeport_addresses.is_empty() {
        // Ref: upstream nftables mode also excludes localhost NodePorts (they need route_localnet).
        "fib daddr type local ip daddr != 127.0.0.0/8".to_string()
    } else {
        format!("ip daddr @{SET_NODEPORT_ADDRESSES}")
    }
}

/// Static chains: (base-chain spec or None for regular chains, name, rules).
fn static_chain_specs(config: &RulesetConfig) -> Vec<(Option<String>, &'static str, Vec<String>)> {
    let hook = |ty: &str, hook: &str, prio: i32| {
        Some(format!(
            "type {ty} hook {hook} priority {prio} ; policy accept ;"
        ))
    };
    let np = nodeport_match(config);
    let mut affinity_record = Vec::new();
    for p in PROTOCOLS {
        let p = p.nft_name();
        affinity_record.push(format!(
            "meta l4proto {p} ct original ip daddr . meta l4proto . ct original proto-dst vmap @{MAP_AFFINITY_SERVICES}"
        ));
    }
    for p in PROTOCOLS {
        let p = p.nft_name();
        affinity_record.push(format!(
            "meta l4proto {p} meta l4proto . ct original proto-dst vmap @{MAP_AFFINITY_NODEPORTS}"
        ));
    }
    vec![
        (
            hook("nat", "prerouting", DSTNAT_PRIORITY),
            CHAIN_NAT_PREROUTING,
            vec![format!("jump {CHAIN_SERVICES}")],
        ),
        (
            hook("nat", "output", DSTNAT_PRIORITY),
            CHAIN_NAT_OUTPUT,
            vec![format!("jump {CHAIN_SERVICES}")],
        ),
        (
            hook("nat", "postrouting", SRCNAT_PRIORITY),
            CHAIN_NAT_POSTROUTING,
            vec![format!("jump {CHAIN_MASQUERADING}")],
        ),
        (
            hook("filter", "input", FILTER_PRIORITY),
            CHAIN_FILTER_INPUT,
            vec![format!("ct state new jump {CHAIN_NO_ENDPOINTS}")],
        ),
        (
            hook("filter", "forward", FILTER_PRIORITY),
            CHAIN_FILTER_FORWARD,
            vec![format!("ct state new jump {CHAIN_NO_ENDPOINTS}")],
        ),
        (
            hook("filter", "output", FILTER_PRIORITY),
            CHAIN_FILTER_OUTPUT,
            vec![format!("ct state new jump {CHAIN_NO_ENDPOINTS}")],
        ),
        (
            hook("filter", "prerouting", AFFINITY_RECORD_PRIORITY),
            CHAIN_AFFINITY_PREROUTING,
            vec![format!(
                "ct state new ct status dnat jump {CHAIN_AFFINITY_RECORD}"
            )],
        ),
        (
            hook("filter", "output", AFFINITY_RECORD_PRIORITY),
            CHAIN_AFFINITY_OUTPUT,
            vec![format!(
                "ct state new ct status dnat jump {CHAIN_AFFINITY_RECORD}"
            )],
        ),
        (
            None,
            CHAIN_SERVICES,
            vec![
                format!(
                    "ip saddr {cidr} ip daddr . meta l4proto . th dport vmap @{MAP_POD_SHORTCUT_IPS}",
                    cidr = config.cluster_cidr
                ),
                format!("ip daddr . meta l4proto . th dport vmap @{MAP_SERVICE_IPS}"),
                format!(
                    "ip saddr {cidr} {np} meta l4proto . th dport vmap @{MAP_POD_SHORTCUT_NODEPORTS}",
                    cidr = config.cluster_cidr
                ),
                format!("{np} meta l4proto . th dport vmap @{MAP_SERVICE_NODEPORTS}"),
            ],
        ),
        (
            None,
            CHAIN_MASQUERADING,
            vec![
                format!(
                    "meta mark & {MASQUERADE_MARK:#010x} == {MASQUERADE_MARK:#010x} \
                     meta mark set meta mark ^ {MASQUERADE_MARK:#010x} masquerade fully-random"
                ),
                format!(
                    "ct status dnat ip saddr . ip daddr @{SET_HAIRPIN} masquerade fully-random"
                ),
            ],
        ),
        (
            None,
            CHAIN_NO_ENDPOINTS,
            vec![
                format!("ip daddr . meta l4proto . th dport vmap @{MAP_NO_ENDPOINT_SERVICES}"),
                format!("{np} meta l4proto . th dport vmap @{MAP_NO_ENDPOINT_NODEPORTS}"),
            ],
        ),
        (
            None,
            CHAIN_REJECT,
            vec![
                "meta l4proto tcp reject with tcp reset".to_string(),
                "reject".to_string(),
            ],
        ),
        (None, CHAIN_AFFINITY_RECORD, affinity_record),
    ]
}

fn static_chains_count() -> usize {
    13
}

fn static_rules(s: &mut String, config: &RulesetConfig) {
    for (_, name, rules) in static_chain_specs(config) {
        for rule in rules {
            let _ = writeln!(s, "add rule {FAMILY} {TABLE} {name} {rule}");
        }
    }
}

/// Rules of `svc-<flavor>-<n>` / `np-<flavor>-<n>`: mark for masquerade per flavor, honour a recorded affinity,
/// else pick one of the `n` slots uniformly.
fn select_chain_rules(
    flavor: Flavor,
    node_port: bool,
    n: usize,
    cluster_cidr: Ipv4Net,
) -> Vec<String> {
    let maps = if node_port {
        &MAP_NODEPORT_ENDPOINTS
    } else {
        &MAP_SERVICE_ENDPOINTS
    };
    select_rules(flavor, node_port, n, cluster_cidr, maps)
}

fn select_rules(
    flavor: Flavor,
    node_port: bool,
    n: usize,
    cluster_cidr: Ipv4Net,
    maps: &[&str; 3],
) -> Vec<String> {
    let mut rules = Vec::new();
    let mark = format!("meta mark set meta mark | {MASQUERADE_MARK:#010x}");
    match flavor {
        Flavor::ClusterIp => rules.push(format!("ip saddr != {cluster_cidr} {mark}")),
        Flavor::Masquerade => rules.push(mark),
        Flavor::Local => {}
    }
    rules.push(format!(
        "dnat ip to ip saddr . ip daddr . meta l4proto . th dport map @{MAP_AFFINITY}"
    ));
    for p in PROTOCOLS {
        let proto = p.nft_name();
        let map = maps[proto_index(p)];
        if node_port {
            rules.push(format!(
                "meta l4proto {proto} dnat ip to meta l4proto . th dport . numgen random mod {n} map @{map}"
            ));
        } else {
            rules.push(format!(
                "meta l4proto {proto} dnat ip to ip daddr . meta l4proto . th dport . numgen random mod {n} map @{map}"
            ));
        }
    }
    rules
}

/// Rules of `affinity-<timeout>`: record `client . original destination → endpoint` for `timeout` seconds.
fn affinity_chain_rules(timeout: u32) -> Vec<String> {
    PROTOCOLS
        .iter()
        .map(|p| {
            format!(
                "meta l4proto {} update @{MAP_AFFINITY} {{ ip saddr . ct original ip daddr . meta l4proto . \
                 ct original proto-dst timeout {timeout}s : ip daddr . th dport }}",
                p.nft_name()
            )
        })
        .collect()
}

/// A script deleting the proxy's table if it exists, and nothing else (`--cleanup`).
pub fn render_cleanup() -> String {
    format!("add table {FAMILY} {TABLE}\ndelete table {FAMILY} {TABLE}\n")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{
        Endpoint, EndpointPort, EndpointSliceInfo, ModelEvent, Service, ServicePort, SliceKey,
    };

    fn val<'a>(rs: &'a Ruleset, map: &str, key: &str) -> &'a str {
        &rs.maps[map][key].value
    }

    fn config() -> RulesetConfig {
        RulesetConfig {
            node_name: "n1".into(),
            cluster_cidr: "10.244.0.0/16".parse().expect("cidr"),
            nodeport_addresses: vec![],
        }
    }

    fn model(endpoints: &[(&str, &str)], affinity: Option<u32>) -> Model {
        let name = ServiceName::new("d", "web");
        let mut m = Model::new();
        m.apply(ModelEvent::ServiceUpsert(Service {
            name: name.clone(),
            cluster_ips: vec![Ipv4Addr::new(10, 96, 0, 20)],
            ports: vec![ServicePort {
                name: "http".into(),
                protocol: Protocol::Tcp,
                port: 80,
                node_port: Some(30080),
            }],
            affinity_timeout: affinity,
            external_traffic_policy: TrafficPolicy::Cluster,
            internal_traffic_policy: TrafficPolicy::Cluster,
            external_ips: vec![],
            health_check_node_port: None,
            external_name: None,
        }));
        m.apply(slice_event(endpoints));
        m
    }

    fn slice_event(endpoints: &[(&str, &str)]) -> ModelEvent {
        ModelEvent::SliceUpsert(
            SliceKey {
                namespace: "d".into(),
                name: "web-1".into(),
            },
            EndpointSliceInfo {
                service: ServiceName::new("d", "web"),
                ports: vec![EndpointPort {
                    name: "http".into(),
                    protocol: Protocol::Tcp,
                    port: 8080,
                }],
                endpoints: endpoints
                    .iter()
                    .map(|(a, node)| Endpoint {
                        address: a.parse().expect("ip"),
                        ready: true,
                        serving: true,
                        terminating: false,
                        node_name: Some(node.to_string()),
                    })
                    .collect(),
            },
        )
    }

    #[test]
    fn each_endpoint_gets_one_slot_of_a_chain_sized_to_the_endpoint_count() {
        let rs = Ruleset::compute(
            &model(
                &[
                    ("10.244.1.2", "n1"),
                    ("10.244.1.3", "n2"),
                    ("10.244.1.4", "n2"),
                ],
                None,
            ),
            &config(),
        );
        let eps = &rs.maps[MAP_SERVICE_ENDPOINTS[0]];
        assert_eq!(eps.len(), 3);
        let tcp = MAP_SERVICE_ENDPOINTS[0];
        assert_eq!(
            val(&rs, tcp, "10.96.0.20 . tcp . 80 . 0"),
            "10.244.1.2 . 8080"
        );
        assert_eq!(
            val(&rs, tcp, "10.96.0.20 . tcp . 80 . 2"),
            "10.244.1.4 . 8080"
        );
        assert_eq!(
            val(&rs, MAP_SERVICE_IPS, "10.96.0.20 . tcp . 80"),
            "goto svc-cip-3"
        );
        assert_eq!(
            val(&rs, MAP_SERVICE_NODEPORTS, "tcp . 30080"),
            "goto np-masq-3"
        );
        let rules = &rs.chains["svc-cip-3"].0;
        assert!(rules
            .iter()
            .any(|r| r.contains("numgen random mod 3 map @service-endpoints-tcp")));
        assert!(rules[0].starts_with("ip saddr != 10.244.0.0/16 meta mark set"));
    }

    #[test]
    fn removing_an_endpoint_is_an_incremental_change_of_elements_and_chains_only() {
        let cfg = config();
        let three = [
            ("10.244.1.2", "n1"),
            ("10.244.1.3", "n1"),
            ("10.244.1.4", "n1"),
        ];
        let mut m = model(&three, None);
        let mut rs = Ruleset::compute(&m, &cfg);
        m.take_dirty();
        m.apply(slice_event(&three[..2]));
        let dirty = m.take_dirty();
        let changes = rs.update(&m, &cfg, &dirty);
        assert_eq!(
            rs.render_rebuild(&cfg),
            Ruleset::compute(&m, &cfg).render_rebuild(&cfg),
            "an incremental update ends where a full computation does"
        );
        let script = rs.render_changes(&changes).expect("a change");
        assert!(
            script.contains("add chain ip windlass-proxy svc-cip-2\n"),
            "{script}"
        );
        assert!(
            script.contains("delete chain ip windlass-proxy svc-cip-3\n"),
            "{script}"
        );
        assert!(script.contains("10.96.0.20 . tcp . 80 . 2"), "{script}");
        assert!(
            !script.contains("delete table") && !script.contains("flush"),
            "{script}"
        );
        // New chains come before elements that use them, old chains are deleted after elements stop using them.
        let add = script.find("add chain").expect("add chain");
        let elem = script.find("add element").expect("add element");
        let del = script.find("delete chain").expect("delete chain");
        assert!(add < elem && elem < del, "{script}");
        let dirty = m.take_dirty();
        let nothing = rs.update(&m, &cfg, &dirty);
        assert_eq!(rs.render_changes(&nothing), None);
    }

    #[test]
    fn services_without_endpoints_are_rejected_and_local_policy_without_local_ones_dropped() {
        let cfg = config();
        let rs = Ruleset::compute(&model(&[], None), &cfg);
        assert_eq!(
            val(&rs, MAP_NO_ENDPOINT_SERVICES, "10.96.0.20 . tcp . 80"),
            "goto reject-service"
        );
        assert_eq!(
            val(&rs, MAP_NO_ENDPOINT_NODEPORTS, "tcp . 30080"),
            "goto reject-service"
        );
        assert!(rs.maps[MAP_SERVICE_IPS].is_empty());

        let mut m = model(&[("10.244.2.2", "n2")], None);
        let mut svc = m.services().next().expect("service").clone();
        svc.external_traffic_policy = TrafficPolicy::Local;
        svc.health_check_node_port = Some(31000);
        m.apply(ModelEvent::ServiceUpsert(svc));
        let rs = Ruleset::compute(&m, &cfg);
        assert_eq!(val(&rs, MAP_NO_ENDPOINT_NODEPORTS, "tcp . 30080"), "drop");
        assert_eq!(
            val(&rs, MAP_SERVICE_IPS, "10.96.0.20 . tcp . 80"),
            "goto svc-cip-1"
        );
        assert_eq!(rs.health_checks[&31000].1, 0);
    }

    #[test]
    fn affinity_services_get_a_recording_chain_for_their_timeout() {
        let rs = Ruleset::compute(&model(&[("10.244.1.2", "n1")], Some(60)), &config());
        assert_eq!(
            val(&rs, MAP_AFFINITY_SERVICES, "10.96.0.20 . tcp . 80"),
            "goto affinity-60"
        );
        assert_eq!(
            val(&rs, MAP_AFFINITY_NODEPORTS, "tcp . 30080"),
            "goto affinity-60"
        );
        assert!(rs.chains["affinity-60"].0[0].contains("timeout 60s"));
        assert!(rs.maps[SET_HAIRPIN].contains_key("10.244.1.2 . 10.244.1.2"));
        let remote = Ruleset::compute(&model(&[("10.244.2.2", "n2")], None), &config());
        assert!(
            remote.maps[SET_HAIRPIN].is_empty(),
            "no hairpin for endpoints elsewhere"
        );
    }
}
